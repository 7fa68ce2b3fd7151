#!/usr/bin/env python3
"""Reference logits and greedy continuations for molt's model tests (tests/test_model_forward.c).

The models are not committed: `molt init-model` is deterministic, so this script asks the
molt binary for them and records a SHA-256 of each weights file; the C test writes the
same model again, checks the digest, then compares its forward pass with what is stored.

Variants (all from `molt init-model --seed 1234`):
  tiny          --preset tiny                 F32 weights, loaded by transformers'
                                              Mistral4ForCausalLM.from_pretrained
  tiny_bf16     --preset tiny --dtype bf16    BF16 file, loaded the same way (upcast to F32)
  tiny_fp8      --preset tiny --dtype fp8     F8_E4M3 + per-tensor weight_scale_inv; transformers
                                              cannot load it on CPU, so the script dequantizes
                                              it (fp8 -> f32 times the scale) into the state dict
  tiny_grouped  --preset tiny-grouped         n_group 2 / topk_group 1, q_proj (no q_lora_rank),
                                              routed_scaling_factor 1.5

Inputs (shared by all variants), each run by transformers one segment at a time in F32 with
eager attention:
  seq 0  9 tokens, positions 0..8
  seq 1  37 tokens, positions 0..36 (past original_max_position_embeddings 32: the llama-4
         query temperature changes)
  seq 2  two packed segments of 6 and 7 tokens, positions restarting at 0 (molt runs them as
         one packed batch; the reference is the concatenation of the two separate runs)
  seq 3  8 tokens at positions 60..67 (explicit position_ids)

Written to tests/fixtures/model/reference.safetensors (all F32/I32):
  input.ids.K, input.pos.K, input.seg.K   [T_K] the batch of sequence K as molt runs it
  input.cols                              [NC] vocabulary columns kept for every token
  V.sub.K        [T_K, NC]  logits at input.cols
  V.top_ids.K    [T_K, 8]   top-8 token ids per row (descending), V.top_vals.K their logits
  V.absmax.K     [T_K]      max |logit| of each full row (the tolerance scale)
  V.full         [1, vocab] the full logits row of seq 0's last token (tiny only)
  V.greedy.prompt.J, V.greedy.out.J [20], V.greedy.gap.J [20]: greedy continuation (generate,
                 do_sample=False, no eos stop, use_cache=False) and the top-1 minus top-2
                 logit gap at each step (tiny and tiny_grouped)
Metadata: the digest, preset, seed and dtype of each variant, package versions.

Run (the virtualenv outside the repository has torch, transformers, safetensors, numpy):
  /work/venv-ref/bin/python tools/reference/model_parity.py --molt build/molt
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
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import Mistral4Config, Mistral4ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "model" / "reference.safetensors"
SEED = 1234
INPUT_SEED = 7
N_COLS = 1024
TOP = 8
N_GREEDY = 20

VARIANTS = [
    # name, preset, dtype, greedy, full row
    ("tiny", "tiny", "f32", True, True),
    ("tiny_bf16", "tiny", "bf16", False, False),
    ("tiny_fp8", "tiny", "fp8", False, False),
    ("tiny_grouped", "tiny-grouped", "f32", True, False),
]


def make_inputs(vocab):
    """Batches as molt runs them: (ids, pos, seg) per sequence, and the segments of each."""
    rng = np.random.default_rng(INPUT_SEED)
    ids = lambda n: rng.integers(0, vocab, size=n).astype(np.int32)
    seqs = []
    seqs.append([(ids(9), np.arange(9))])
    seqs.append([(ids(37), np.arange(37))])
    seqs.append([(ids(6), np.arange(6)), (ids(7), np.arange(7))])
    seqs.append([(ids(8), np.arange(60, 68))])
    return seqs


def batch_arrays(segments):
    ids = np.concatenate([s[0] for s in segments]).astype(np.int32)
    pos = np.concatenate([s[1] for s in segments]).astype(np.int32)
    seg = np.concatenate([np.full(len(s[0]), k) for k, s in enumerate(segments)]).astype(np.int32)
    return ids, pos, seg


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def init_model(molt, preset, dtype, out):
    cmd = [molt, "init-model", "--preset", preset, "--seed", str(SEED), "--out", str(out),
           "--dtype", dtype, "--no-tokenizer"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def load_hf(path):
    model, info = Mistral4ForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if bad or info.get("error_msgs"):
        sys.exit(f"transformers did not load {path} cleanly: {info}")
    return model.eval()


def load_fp8(path):
    """The FP8 file dequantized by hand: real = fp8 * weight_scale_inv."""
    config = Mistral4Config.from_pretrained(path)
    model = Mistral4ForCausalLM(config).to(torch.float32)
    state = {}
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for k in keys:
            if k.endswith("_scale_inv"):
                continue
            t = f.get_tensor(k)
            if t.dtype == torch.float8_e4m3fn:
                s = f.get_tensor(k + "_scale_inv").to(torch.float32)
                t = t.to(torch.float32) * s
            state[k] = t.to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        sys.exit(f"fp8 state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


@torch.no_grad()
def logits_of(model, segments):
    rows = []
    for ids, pos in segments:
        out = model(input_ids=torch.tensor(ids, dtype=torch.long)[None],
                    position_ids=torch.tensor(pos, dtype=torch.long)[None])
        rows.append(out.logits[0].float())
    return torch.cat(rows, 0)


@torch.no_grad()
def greedy(model, prompt):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 11
    x = torch.tensor(prompt, dtype=torch.long)[None]
    out = model.generate(x, max_new_tokens=N_GREEDY, do_sample=False, use_cache=False)[0]
    cached = model.generate(x, max_new_tokens=N_GREEDY, do_sample=False, use_cache=True)[0]
    if not torch.equal(out, cached):
        print("warning: cached and uncached greedy decoding differ", file=sys.stderr)
    gen = out[len(prompt):].numpy().astype(np.int32)
    full = model(input_ids=out[None, :-1]).logits[0]
    gaps = []
    for i in range(N_GREEDY):
        top = torch.topk(full[len(prompt) - 1 + i], 2).values
        gaps.append(float(top[0] - top[1]))
    return gen, np.array(gaps, dtype=np.float32)


def record_variant(name, model, seqs, cols, tensors, want_greedy, want_full):
    for k, segments in enumerate(seqs):
        lg = logits_of(model, segments)
        tensors[f"{name}.sub.{k}"] = lg[:, cols].numpy().astype(np.float32)
        top = torch.topk(lg, TOP, dim=-1)
        tensors[f"{name}.top_ids.{k}"] = top.indices.numpy().astype(np.int32)
        tensors[f"{name}.top_vals.{k}"] = top.values.numpy().astype(np.float32)
        tensors[f"{name}.absmax.{k}"] = lg.abs().amax(-1).numpy().astype(np.float32)
        if want_full and k == 0:
            tensors[f"{name}.full"] = lg[-1:].numpy().astype(np.float32)
    if want_greedy:
        prompts = [seqs[0][0][0], seqs[2][0][0]]
        for j, p in enumerate(prompts):
            gen, gaps = greedy(model, p.tolist())
            tensors[f"{name}.greedy.prompt.{j}"] = p.astype(np.int32)
            tensors[f"{name}.greedy.out.{j}"] = gen
            tensors[f"{name}.greedy.gap.{j}"] = gaps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--molt", required=True, help="path to the molt binary")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    meta = {"script": "tools/reference/model_parity.py", "seed": str(SEED),
            "python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "numpy"):
        meta[pkg] = version(pkg)
    tensors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, preset, dtype, want_greedy, want_full in VARIANTS:
            d = Path(tmp) / name
            init_model(args.molt, preset, dtype, d)
            cfg = json.loads((d / "config.json").read_text())
            if not tensors:
                seqs = make_inputs(cfg["vocab_size"])
                step = cfg["vocab_size"] // N_COLS
                cols = np.arange(N_COLS) * step + (np.arange(N_COLS) * 37) % step
                tensors["input.cols"] = cols.astype(np.int32)
                for k, segments in enumerate(seqs):
                    ids, pos, seg = batch_arrays(segments)
                    tensors[f"input.ids.{k}"], tensors[f"input.pos.{k}"] = ids, pos
                    tensors[f"input.seg.{k}"] = seg
            meta[f"{name}.sha256"] = sha256(d / "model.safetensors")
            meta[f"{name}.preset"] = preset
            meta[f"{name}.dtype"] = dtype
            model = load_fp8(d) if dtype == "fp8" else load_hf(d)
            record_variant(name, model, seqs, cols, tensors, want_greedy, want_full)
            print(f"{name}: done", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=meta)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
