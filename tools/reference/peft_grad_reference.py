#!/usr/bin/env python3
"""Reference loss and LoRA gradients of the tiny model with a PEFT adapter (tests/test_peft_grad.c).

The molt binary writes the base model (`molt init-model --preset tiny --seed 1234`) and the
adapter (`molt export --spec SPEC --b-std STD --b-seed SEED --format peft`: A initialized from
the spec's seed, B drawn from N(0, STD) so that the gradients of A are not zero).
transformers loads the model in F32 and PEFT's PeftModel.from_pretrained the adapter, made
trainable. One fixed batch of two sequences of different lengths goes through the model;
the loss is the mean cross-entropy over the unmasked tokens of both sequences together
(sum over both / number of unmasked tokens), which is what molt computes for the same two
sequences packed into one batch with a 0/1 mask. The script computes it from the logits
itself, so no transformers loss reduction is involved. Then loss.backward().

The adapter covers attention (q_a/q_b/kv_a/kv_b/o_proj), the dense MLP and shared experts
(gate/up/down_proj; the shared experts with their own rank and alpha via rank_pattern /
alpha_pattern) and the routed experts (target_parameters mlp.experts.gate_up_proj and
mlp.experts.down_proj, one A/B pair per expert).

Written to tests/fixtures/peft_grad/reference.safetensors:
  input.ids, input.pos, input.seg, input.targets  I32 [T]  the packed batch (a masked
                                                   token's target is 0: molt wants every
                                                   target in range)
  input.mask                                       F32 [T]  1 = counted in the loss
  loss                                             F32 [1]
  grad.<PEFT tensor name>                          F32      d loss / d that A or B
Metadata: spec, b_std, b_seed, the sequence lengths, the model digest, package versions,
the loss in full precision, and how far this F32 run is from the same run in F64 (the
noise floor of the reference itself).

Run: /work/venv-ref/bin/python tools/reference/peft_grad_reference.py --molt build/molt
"""
import argparse
import hashlib
import platform
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.numpy import load_file, save_file
from transformers import Mistral4ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "peft_grad" / "reference.safetensors"
SEED = 1234
SPEC = ("r=4,alpha=8,seed=21,targets=q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+"
        "gate_proj+up_proj+down_proj+experts,r.shared=2,alpha.shared=6,r.experts=3,"
        "alpha.experts=5")
B_STD = 0.05
B_SEED = 77
LENGTHS = (13, 11)
INPUT_SEED = 5
# Tokens of each sequence left out of the loss besides its last one (no next token):
# a "prompt" at the start of the first sequence and one token inside the second.
MASKED = ((0, 1, 2), (6,))


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cmd):
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)


def make_batch(vocab):
    """Sequences, their next-token labels (-100 = not counted) and the packed form."""
    rng = np.random.default_rng(INPUT_SEED)
    seqs, labels = [], []
    for n, masked in zip(LENGTHS, MASKED):
        ids = rng.integers(0, vocab, size=n).astype(np.int64)
        lab = np.full(n, -100, dtype=np.int64)
        lab[:-1] = ids[1:]
        lab[list(masked)] = -100
        seqs.append(ids)
        labels.append(lab)
    packed = {
        "input.ids": np.concatenate(seqs).astype(np.int32),
        "input.pos": np.concatenate([np.arange(n) for n in LENGTHS]).astype(np.int32),
        "input.seg": np.concatenate([np.full(n, i) for i, n in enumerate(LENGTHS)]
                                    ).astype(np.int32),
        "input.targets": np.concatenate([np.maximum(lab, 0) for lab in labels]
                                        ).astype(np.int32),
        "input.mask": np.concatenate([(lab != -100) for lab in labels]).astype(np.float32),
    }
    return seqs, labels, packed


def loss_of(model, seqs, labels):
    """Mean cross-entropy over the unmasked tokens of all sequences together."""
    total, count = 0.0, 0
    for ids, lab in zip(seqs, labels):
        x = torch.tensor(ids)[None]
        pos = torch.arange(len(ids))[None]
        logits = model(input_ids=x, position_ids=pos).logits[0]
        y = torch.tensor(lab)
        total = total + F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")
        count += int((y != -100).sum())
    return total / count


def lora_grads(model, dtype):
    """d loss / d every LoRA matrix, under the names PEFT saves them with."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A.default." not in name and ".lora_B.default." not in name:
            sys.exit(f"unexpected trainable parameter {name}")
        if p.grad is None:
            sys.exit(f"{name} got no gradient")
        out[name.replace(".default.", ".")] = p.grad.detach().to(dtype).numpy()
    return out


def reference(model_dir, adir, seqs, labels, dtype):
    # eager experts: the grouped-matmul path takes no F64
    base = Mistral4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                               attn_implementation="eager",
                                               experts_implementation="eager")
    model = PeftModel.from_pretrained(base, adir, is_trainable=True).to(dtype)
    model.train()  # no dropout is configured; train() only mirrors a training step
    loss = loss_of(model, seqs, labels)
    loss.backward()
    return float(loss.detach()), lora_grads(model, torch.float64)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--molt", required=True, help="path to the molt binary")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    meta = {"script": "tools/reference/peft_grad_reference.py", "seed": str(SEED),
            "spec": SPEC, "b_std": repr(B_STD), "b_seed": str(B_SEED),
            "lengths": ",".join(map(str, LENGTHS)), "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "safetensors", "numpy"):
        meta[pkg] = version(pkg)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        run([args.molt, "init-model", "--preset", "tiny", "--seed", SEED, "--out", model_dir,
             "--no-tokenizer"])
        meta["model.sha256"] = sha256(model_dir / "model.safetensors")
        adir = Path(tmp) / "adapter"
        run([args.molt, "export", "--model", model_dir, "--spec", SPEC, "--b-std", B_STD,
             "--b-seed", B_SEED, "--format", "peft", "--out", adir])
        meta["adapter_config"] = (adir / "adapter_config.json").read_text()
        saved = load_file(adir / "adapter_model.safetensors")
        vocab = Mistral4ForCausalLM.config_class.from_pretrained(model_dir).vocab_size
        seqs, labels, tensors = make_batch(vocab)
        loss32, g32 = reference(model_dir, adir, seqs, labels, torch.float32)
        loss64, g64 = reference(model_dir, adir, seqs, labels, torch.float64)
    if set(g32) != set(saved):
        sys.exit(f"gradient names differ from the adapter file: {sorted(set(g32) ^ set(saved))}")
    worst = 0.0
    for name, g in g32.items():
        scale = float(np.abs(g64[name]).max())
        if scale == 0.0:
            sys.exit(f"{name}: zero gradient")
        worst = max(worst, float(np.abs(g - g64[name]).max()) / scale)
        tensors["grad." + name] = g.astype(np.float32)
    tensors["loss"] = np.array([loss32], dtype=np.float32)
    meta["loss"] = repr(loss32)
    meta["loss.f64"] = repr(loss64)
    meta["f32_vs_f64.max_rel"] = f"{worst:.3g}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    print(f"loss {loss32:.7g} (F64 {loss64:.7g}); {len(g32)} gradients; F32 vs F64 worst "
          f"relative {worst:.3g}", file=sys.stderr)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
