#!/usr/bin/env python3
"""Training throughput and peak memory: `molt train` against PyTorch + PEFT, same setup.

One run trains the same LoRA configuration twice on CPU, each in its own process:
  molt     `molt train --config FILE.yaml`, base F32 (--quant none) or NF4 (--quant nf4)
  pytorch  transformers + PEFT: the same base model, the same adapter (exported by molt
           from the same spec, B = 0 as at the start of training), the same token rows,
           AdamW with the same settings, torch.set_num_threads(THREADS); with --quant nf4
           the base is loaded through bitsandbytes (NF4, double quantization, F32 compute)
and prints tokens/s and peak RSS side by side with the ratio molt / PyTorch. --all runs
the four rows tiny/small x none/nf4 in one invocation and prints them as one table. Each
case runs --repeat rounds (molt, then PyTorch, in each round, so both see the same spells
of machine noise) and each side's fastest round is reported.

NF4 on both sides quantizes the same matrices: transformers keeps the routed experts as
fused 3-D parameters that bitsandbytes leaves in F32 (it replaces nn.Linear modules only),
and it keeps lm_head and the router in F32 too; molt's spec `nf4,experts=f32` quantizes
exactly the attention, shared-expert and dense-MLP projections, so both sides train LoRA
on every target, experts included, over the same NF4 matrices.

Setup: `molt init-model --preset PRESET --seed 1` (with the Tekken tokenizer); synthetic
{"text": ...} records from a fixed seed, tokenized by `molt data render`; rows of SEQ_LEN
tokens packed from whole examples: molt packs them itself (its order within a shuffle
window may differ), the PyTorch side packs the same ids greedily in file order, positions
from 0 in each example. Both sides compute every position of every row (PyTorch runs
plain causal attention over a packed row, molt keeps examples apart with segments: the
same amount of work), so throughput is counted as rows * SEQ_LEN * (steps - 1) over
the time from the end of the first step to the end of the last (loading and the first,
warm-up step excluded on both sides; molt's times are the elapsed_s of its metrics
records). Peak RSS is the whole process (os.wait4), so
the PyTorch figure includes the Python interpreter and the torch libraries, and both
include loading (molt quantizes while loading, bitsandbytes too).

Run: /work/venv-ref/bin/python tools/bench/bench_train.py --molt build/molt [--threads 2]
     [--preset tiny|small] [--quant none|nf4] [--all] [--repeat 2] [--steps N]
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# molt's base quantization for each --quant, matching what bitsandbytes quantizes
MOLT_QUANT = {"none": "none", "nf4": "nf4,experts=f32"}
DEFAULT_STEPS = {"tiny": 12, "small": 8}
TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
           "up_proj", "down_proj", "experts"]
WORDS = ("the a of to and in is it that for on with as was by at be this from or an are "
         "model expert layer token train adapter weight matrix gradient memory fast small "
         "router attention value query key rank alpha batch step loss learning rate").split()


def spec_of(a):
    return f"r={a.rank},alpha={2 * a.rank},seed=1,targets={'+'.join(TARGETS)}"


def write_data(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 70)))
            f.write(json.dumps({"text": text}) + "\n")


def pack_rows(examples, seq_len, pad):
    """Greedy packing of whole examples into rows: ids, labels (-100 = no loss), positions
    (from 0 in each example; padding continues the last one)."""
    rows, cur = [], ([], [], [])

    def close(row):
        ids, labels, pos = row
        n = seq_len - len(ids)
        start = pos[-1] + 1 if pos else 0
        rows.append((ids + [pad] * n, labels + [-100] * n, pos + list(range(start, start + n))))

    for ex_ids, ex_mask in examples:
        if cur[0] and len(cur[0]) + len(ex_ids) > seq_len:
            close(cur)
            cur = ([], [], [])
        cur[0].extend(ex_ids)
        # position t's label is token t+1 of the same example when that one is trained
        cur[1].extend(ex_ids[t + 1] if ex_mask[t + 1] else -100 for t in range(len(ex_ids) - 1))
        cur[1].append(-100)
        cur[2].extend(range(len(ex_ids)))
    if cur[0]:
        close(cur)
    return rows


def torch_worker(a):
    """The PyTorch side, in its own process: prints one JSON line."""
    import resource

    import torch
    from peft import PeftModel
    from transformers import Mistral4ForCausalLM

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = json.loads(Path(a.rows).read_text())
    if a.quant == "nf4":
        from transformers import BitsAndBytesConfig
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        try:
            base = Mistral4ForCausalLM.from_pretrained(a.model, dtype=torch.float32,
                                                       quantization_config=q, device_map="cpu")
        except Exception as e:  # reported as an unavailable row, not a crash of the run
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            return
    else:
        base = Mistral4ForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, a.adapter, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    B, S = a.batch, a.seq_len
    losses, ends = [], []
    for step in range(a.steps):
        batch = [rows[(step * B + i) % len(rows)] for i in range(B)]
        ids = torch.tensor([r[0] for r in batch])
        labels = torch.tensor([r[1] for r in batch])
        pos = torch.tensor([r[2] for r in batch])
        logits = model(input_ids=ids, position_ids=pos).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                 ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        ends.append(time.perf_counter())
    loop_s = ends[-1] - ends[0]  # steps 2..N: the first one warms up
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n4 = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    print(json.dumps({"loop_s": loop_s, "peak_rss_kb": rss, "first_loss": losses[0],
                      "last_loss": losses[-1], "torch": torch.__version__, "linear4bit": n4}))


def run_measured(cmd, env, allow_fail=False):
    """Runs cmd; returns (stdout, stderr, peak RSS in KB) of that process alone. A failure
    ends the run unless allow_fail, which returns stdout None and stderr's tail."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        o, e = out.read().decode(), err.read().decode()
    if p.returncode != 0:
        if allow_fail:
            return None, f"exit {p.returncode}: {e[-3000:]}", ru.ru_maxrss
        sys.exit(f"{cmd[0]} failed ({p.returncode}):\n{e[-3000:]}")
    return o, e, ru.ru_maxrss


def molt_config(a, work, data, quant, steps):
    t = ", ".join(TARGETS)
    return f"""model:
  path: {work}/base
  quant: "{MOLT_QUANT[quant]}"
adapter:
  r: {a.rank}
  alpha: {2 * a.rank}
  seed: 1
  targets: [{t}]
data:
  train: {data}
  format: text
  max_seq_len: {a.seq_len}
  packing: true
  shuffle: false
train:
  batch_size: {a.batch}
  grad_accum: 1
  steps: {steps}
  seed: 1
  log_every: 1
optim:
  lr: {a.lr}
  weight_decay: 0.0
  max_grad_norm: 1.0
schedule:
  kind: constant
  warmup_steps: 0
output_dir: {work}/run
checkpoint:
  every: 0
  keep_last: 1
"""


def run_case(a, molt, env, preset, quant):
    """Trains PRESET with base QUANT on both sides; returns a dict of the figures (the
    PyTorch ones None with the reason in torch_error when that side cannot run)."""
    steps = a.steps or DEFAULT_STEPS[preset]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([str(molt), "init-model", "--preset", preset, "--seed", "1", "--out",
                        str(work / "base")], check=True, stdout=subprocess.DEVNULL)
        data = work / "train.jsonl"
        write_data(data, a.records, 3)
        rendered = subprocess.run([str(molt), "data", "render", "--data", str(data),
                                   "--tokenizer", str(work / "base" / "tekken.json"),
                                   "--format", "text", "--max-seq-len", str(a.seq_len)],
                                  check=True, capture_output=True, text=True).stdout
        examples = [(r["ids"], r["mask"]) for r in map(json.loads, rendered.splitlines())]
        cfg = json.loads((work / "base" / "config.json").read_text())
        rows = pack_rows(examples, a.seq_len, cfg.get("pad_token_id") or 0)
        if len(rows) < a.batch * steps:
            sys.exit(f"{len(rows)} rows for {a.batch * steps} wanted: raise --records")
        (work / "rows.json").write_text(json.dumps(rows))
        subprocess.run([str(molt), "export", "--model", str(work / "base"), "--spec", spec_of(a),
                        "--format", "peft", "--out", str(work / "adapter")], check=True,
                       stdout=subprocess.DEVNULL)
        (work / "train.yaml").write_text(molt_config(a, work, data, quant, steps))

        # --repeat rounds, molt then PyTorch in each, so that both sides see the same spells
        # of machine noise; each side's best round is reported
        best_molt, best_torch = None, None
        for _ in range(a.repeat):
            shutil.rmtree(work / "run", ignore_errors=True)
            _, _, molt_rss = run_measured([molt, "train", "--config", work / "train.yaml",
                                           "--quiet"], env)
            recs = [json.loads(x)
                    for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
            recs = [r for r in recs if "elapsed_s" in r and "tokens" in r]
            # steps 2..N: the first (arena growth, first touch of every buffer, thread
            # pools) is warm-up
            molt_s = recs[-1]["elapsed_s"] - recs[0]["elapsed_s"]
            if best_molt is None or molt_s < best_molt[0]:
                best_molt = (molt_s, molt_rss, recs)
            out, err, torch_rss = run_measured(
                [sys.executable, __file__, "--worker", "--model", work / "base", "--adapter",
                 work / "adapter", "--rows", work / "rows.json", "--threads", a.threads,
                 "--steps", steps, "--batch", a.batch, "--seq-len", a.seq_len, "--lr", a.lr,
                 "--quant", quant], env, allow_fail=True)
            pt = json.loads(out.strip().splitlines()[-1]) if out else {"error": err.strip()}
            if "error" in pt:
                best_torch = (None, None, pt)
                continue
            if best_torch is None or (best_torch[0] is not None and pt["loop_s"] < best_torch[0]):
                best_torch = (pt["loop_s"], torch_rss, pt)
    molt_s, molt_rss, recs = best_molt
    _, torch_rss, pt = best_torch
    row_tokens = a.batch * a.seq_len * (steps - 1)
    r = {"preset": preset, "quant": quant, "steps": steps,
         "molt_tps": row_tokens / molt_s, "molt_rss_mb": molt_rss / 1024,
         "molt_loss": (recs[0]["loss"], recs[-1]["loss"]),
         "molt_own_tps": recs[-1].get("tokens_per_s", 0), "torch_tps": None,
         "torch_rss_mb": None, "torch_error": pt.get("error")}
    if not r["torch_error"]:
        r.update(torch_tps=row_tokens / pt["loop_s"], torch_rss_mb=torch_rss / 1024,
                 torch_loss=(pt["first_loss"], pt["last_loss"]), torch=pt["torch"],
                 linear4bit=pt["linear4bit"])
    return r


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average %.2f %.2f %.2f" % os.getloadavg()


def print_table(a, results, load_start, load_end):
    print(f"LoRA r={a.rank} alpha={2 * a.rank} on {'+'.join(TARGETS)}; batch {a.batch} rows "
          f"x {a.seq_len} tokens; {a.threads} threads on {os.cpu_count()} CPUs; tokens/s over "
          f"steps 2..N (first step warm-up), best of {a.repeat} interleaved rounds per side")
    print(f"base quant nf4: molt model.quant '{MOLT_QUANT['nf4']}', PyTorch bitsandbytes NF4 "
          f"(double quant, F32 compute) on nn.Linear; routed experts, router, lm_head F32 on "
          f"both sides; LoRA targets identical")
    print(f"uptime at start: {load_start}")
    print(f"{'preset':7}{'base':6}{'steps':>6}{'molt tok/s':>12}{'torch tok/s':>13}"
          f"{'ratio':>8}{'molt RSS MB':>13}{'torch RSS MB':>14}{'RSS ratio':>11}")
    for r in results:
        head = f"{r['preset']:7}{r['quant']:6}{r['steps']:6d}{r['molt_tps']:12.0f}"
        if r["torch_error"]:
            print(f"{head}{'unavail.':>13}{'-':>8}{r['molt_rss_mb']:13.1f}{'-':>14}{'-':>11}")
            continue
        print(f"{head}{r['torch_tps']:13.0f}{r['molt_tps'] / r['torch_tps']:7.2f}x"
              f"{r['molt_rss_mb']:13.1f}{r['torch_rss_mb']:14.1f}"
              f"{r['molt_rss_mb'] / r['torch_rss_mb']:10.2f}x")
    print(f"uptime at end:   {load_end}")
    print("ratio = molt / PyTorch (throughput >= 1.5x and memory < 1x wanted)")
    for r in results:
        tag = f"{r['preset']}/{r['quant']}:"
        line = (f"{tag:12} loss molt {r['molt_loss'][0]:.4f} -> {r['molt_loss'][1]:.4f}, "
                f"molt's own tokens/s (non-padding) {r['molt_own_tps']:.0f}")
        if r["torch_error"]:
            line += f"; PyTorch unavailable: {r['torch_error']}"
        else:
            line += (f"; torch {r['torch_loss'][0]:.4f} -> {r['torch_loss'][1]:.4f} "
                     f"(torch {r['torch']}, {r['linear4bit']} Linear4bit modules)")
        print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--molt", help="path to the molt binary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", choices=sorted(DEFAULT_STEPS), default="tiny")
    ap.add_argument("--quant", choices=sorted(MOLT_QUANT), default="none",
                    help="base weights: none (F32) or nf4")
    ap.add_argument("--all", action="store_true",
                    help="run tiny and small with none and nf4 and print one table")
    ap.add_argument("--steps", type=int, default=0,
                    help="optimizer steps, >= 2; the first is warm-up and not timed "
                         "(default: 12 for tiny, 8 for small)")
    ap.add_argument("--batch", type=int, default=2, help="rows per step")
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds per case (molt then PyTorch in each); the best of each side "
                         "is reported (default 2)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--records", type=int, default=600)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.repeat < 1:
        ap.error("--repeat must be >= 1")
    if a.steps == 1 or a.steps < 0:
        ap.error("--steps must be >= 2 (the first step is warm-up)")
    if a.worker:
        return torch_worker(a)
    if not a.molt:
        ap.error("--molt is required")
    molt = Path(a.molt).resolve()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads))
    cases = ([(p, q) for p in ("tiny", "small") for q in ("none", "nf4")] if a.all
             else [(a.preset, a.quant)])
    load_start = uptime()
    results = []
    for preset, quant in cases:
        results.append(run_case(a, molt, env, preset, quant))
        print(f"done {preset}/{quant}", file=sys.stderr, flush=True)
    print_table(a, results, load_start, uptime())


if __name__ == "__main__":
    main()
