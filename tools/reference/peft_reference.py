#!/usr/bin/env python3
"""Reference logits of the tiny model with PEFT adapters exported by molt (tests/test_peft.c).

Nothing but logits is committed. The molt binary writes the base model
(`molt init-model --preset tiny --seed 1234`) and each adapter
(`molt export --spec SPEC --b-std STD --b-seed SEED --format peft`: A initialized from the
spec's seed, B drawn from N(0, STD) so the adapter changes the output); transformers loads
the model and PEFT's PeftModel.from_pretrained loads the adapter directory. The C test
rebuilds the same model and adapters from the specs in the fixture's metadata, sends each
adapter through molt's PEFT export and import, and compares its logits.

Variants:
  attn_mlp   attention projections + dense MLP + shared experts; the shared experts get their
             own rank and alpha (rank_pattern / alpha_pattern in adapter_config.json)
  rslora     o_proj, the router (PEFT target_parameters mlp.gate.weight) and lm_head, rsLoRA
  experts    routed experts (target_parameters mlp.experts.gate_up_proj / down_proj, one A/B
             pair per expert) and q_b_proj

Written to tests/fixtures/peft/reference.safetensors (F32/I32):
  input.ids, input.pos [T]     one sequence, positions from 0
  input.cols [NC]              vocabulary columns kept
  V.sub [T, NC]                logits at input.cols with adapter V
  V.absmax [T]                 max |logit| of each full row (the tolerance scale)
  V.base_gap [1]               max |logits with adapter - logits without| (must be large)
Metadata: per variant V.spec, V.b_std, V.b_seed; the model digest; package versions.

Run: /work/venv-ref/bin/python tools/reference/peft_reference.py --molt build/molt
"""
import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from safetensors.numpy import save_file
from transformers import Mistral4ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "peft" / "reference.safetensors"
SEED = 1234
N_TOKENS = 8
N_COLS = 256
INPUT_SEED = 11

VARIANTS = [
    # name, spec, b_std, b_seed
    ("attn_mlp", "r=4,alpha=8,seed=5,targets=q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+"
     "o_proj+gate_proj+up_proj+down_proj,r.shared=2,alpha.shared=6", 0.05, 99),
    ("rslora", "r=3,alpha=5,rslora=1,seed=6,targets=o_proj+gate+lm_head", 0.05, 98),
    ("experts", "r=2,alpha=4,seed=7,targets=experts+q_b_proj", 0.05, 97),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd):
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)


@torch.no_grad()
def logits(model, ids):
    x = torch.tensor(ids, dtype=torch.long)[None]
    pos = torch.arange(len(ids), dtype=torch.long)[None]
    return model(input_ids=x, position_ids=pos).logits[0].float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--molt", required=True, help="path to the molt binary")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(2)
    meta = {"script": "tools/reference/peft_reference.py", "seed": str(SEED),
            "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "safetensors", "numpy"):
        meta[pkg] = version(pkg)
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        run([args.molt, "init-model", "--preset", "tiny", "--seed", SEED, "--out", model_dir,
             "--no-tokenizer"])
        meta["model.sha256"] = sha256(model_dir / "model.safetensors")
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        rng = np.random.default_rng(INPUT_SEED)
        ids = rng.integers(0, vocab, size=N_TOKENS).astype(np.int32)
        step = vocab // N_COLS
        cols = (np.arange(N_COLS) * step + (np.arange(N_COLS) * 37) % step).astype(np.int32)
        tensors["input.ids"] = ids
        tensors["input.pos"] = np.arange(N_TOKENS, dtype=np.int32)
        tensors["input.cols"] = cols
        base = Mistral4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                   attn_implementation="eager").eval()
        base_logits = logits(base, ids.tolist())
        for name, spec, b_std, b_seed in VARIANTS:
            adir = Path(tmp) / name
            run([args.molt, "export", "--model", model_dir, "--spec", spec, "--b-std", b_std,
                 "--b-seed", b_seed, "--format", "peft", "--out", adir])
            fresh = Mistral4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                        attn_implementation="eager")
            model = PeftModel.from_pretrained(fresh, adir).eval()
            lg = logits(model, ids.tolist())
            tensors[f"{name}.sub"] = lg[:, cols].numpy().astype(np.float32)
            tensors[f"{name}.absmax"] = lg.abs().amax(-1).numpy().astype(np.float32)
            gap = float((lg - base_logits).abs().max())
            tensors[f"{name}.base_gap"] = np.array([gap], dtype=np.float32)
            meta[f"{name}.spec"] = spec
            meta[f"{name}.b_std"] = repr(b_std)
            meta[f"{name}.b_seed"] = str(b_seed)
            meta[f"{name}.adapter_config"] = (adir / "adapter_config.json").read_text()
            print(f"{name}: max |adapter - base| = {gap:.4g}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
