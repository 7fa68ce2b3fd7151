#!/usr/bin/env python3
"""molt eval figures: one run over the base and 4 adapters against 5 single-system runs.

On a model (the `small` preset by default, NF4 base) with 4 LoRA adapters (r=16 on attention
and routed experts, written once by `molt export --spec`), three eval sets of N examples each
(loss: alpaca records; choice: 4 choices per record; generate: short answers, 16 tokens at
most), generated here with a fixed seed. It runs, side by side in one invocation:
    one `molt eval` with the base and the 4 adapters over the three sets
    5 `molt eval` runs, one system each, over the same sets
and prints wall time and peak RSS (VmHWM, from /usr/bin/time) of the single run against the
sum and the maximum of the five, and the choice task's prompt tokens computed against what
lm-evaluation-harness computes (context + choice for every choice: molt's "one request per
example and choice" count). Targets (issue 11): one run's wall time at most the sum of the
five, data read once, memory about one base plus the adapters.

Run: python3 tools/bench/bench_eval.py --molt build/molt [--model DIR | --preset small]
        [--quant nf4] [--examples 500] [--work DIR] [--threads 2]
Not part of tools/test.sh.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import time

TARGETS = ("q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+"
           "experts.gate_up_proj+experts.down_proj")
WORDS = "zero one two three four five six seven eight nine".split()


def sh(cmd, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"bench_eval: {' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def datasets(work, n, seed):
    rng = random.Random(seed)
    paths = {}
    rows = {"loss": [], "choice": [], "generate": []}
    for i in range(n):
        ds = [rng.randrange(10) for _ in range(rng.randrange(2, 5))]
        q = "Spell out the digits: " + " ".join(map(str, ds))
        a = " ".join(WORDS[d] for d in ds)
        rows["loss"].append({"instruction": q, "output": a})
        rows["generate"].append({"instruction": q, "output": a, "category": f"len{len(ds)}"})
        wrong = [" " + " ".join(WORDS[(d + k) % 10] for d in ds) for k in (1, 2, 3)]
        ans = rng.randrange(4)
        choices = wrong[:ans] + [" " + a] + wrong[ans:]
        rows["choice"].append({"prompt": q + "\nAnswer:", "choices": choices, "answer": ans})
    for k, v in rows.items():
        p = os.path.join(work, f"{k}.jsonl")
        with open(p, "w") as f:
            for r in v:
                f.write(json.dumps(r) + "\n")
        paths[k] = p
    return paths


def suite(work, name, model, quant, systems, paths, out):
    p = os.path.join(work, f"{name}.yaml")
    with open(p, "w") as f:
        f.write(f"model: {model}\n")
        if quant != "none":
            f.write(f"base_quant: {quant}\n")
        f.write(f"base: {'true' if 'base' in systems else 'false'}\n")
        ads = {k: v for k, v in systems.items() if k != "base"}
        if ads:
            f.write("adapters:\n" + "".join(f"  {k}: {v}\n" for k, v in ads.items()))
        f.write(f"resamples: 2000\nout: {out}\ndatasets:\n")
        f.write(f"  loss: {{path: {paths['loss']}, task: loss}}\n")
        f.write(f"  choice: {{path: {paths['choice']}, task: choice}}\n")
        f.write(f"  gen: {{path: {paths['generate']}, task: generate, metrics: [exact_match], "
                f"max_tokens: 16}}\n")
    return p


def timed_eval(molt, cfg, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    r = sh(["/usr/bin/time", "-v", molt, "eval", "--config", cfg, "--quiet"], env=env)
    wall = time.perf_counter() - t0
    hwm = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    m = re.search(r"molt eval: .*prompt tokens computed (\d+) \((\d+) from the prefix cache; "
                  r"one request per example and choice would compute (\d+)\)", r.stdout)
    c = re.search(r"^choice: prompt tokens computed (\d+) \((\d+) from the prefix cache; one "
                  r"request per example and choice would compute (\d+)\)", r.stdout, re.M)
    return {"wall_s": wall, "rss_mib": hwm / 1024, "computed": int(m.group(1)),
            "cached": int(m.group(2)), "naive": int(m.group(3)),
            "choice_computed": int(c.group(1)), "choice_naive": int(c.group(3)),
            "stdout": r.stdout}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molt", required=True)
    ap.add_argument("--model")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--examples", type=int, default=500)
    ap.add_argument("--work", default="/tmp/molt-bench-eval")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not os.path.exists("/usr/bin/time"):
        sys.exit("bench_eval: needs /usr/bin/time (Debian package time)")
    os.makedirs(args.work, exist_ok=True)
    model = args.model or os.path.join(args.work, args.preset)
    if not os.path.exists(os.path.join(model, "config.json")):
        sh([args.molt, "init-model", "--preset", args.preset, "--seed", "1", "--out", model])
    systems = {"base": None}
    for i in range(4):
        p = os.path.join(args.work, f"adapter{i}")
        if not os.path.exists(os.path.join(p, "adapter_config.json")):
            sh([args.molt, "export", "--model", model, "--spec",
                f"r=16,alpha=32,seed={i + 1},targets={TARGETS}", "--format", "peft",
                "--out", p, "--force"])
        systems[f"r16_{i}"] = p
    paths = datasets(args.work, args.examples, args.seed)
    print(f"bench_eval: {os.path.basename(model)} ({args.quant}), {args.examples} examples per "
          f"task, base + 4 adapters, {args.threads} threads", flush=True)
    one = timed_eval(args.molt, suite(args.work, "all", model, args.quant, systems, paths,
                                      os.path.join(args.work, "out-all")), args.threads)
    print(f"  one run, 5 systems: {one['wall_s']:.1f} s, peak RSS {one['rss_mib']:.0f} MiB",
          flush=True)
    singles = []
    for name, path in systems.items():
        r = timed_eval(args.molt, suite(args.work, name, model, args.quant, {name: path}, paths,
                                        os.path.join(args.work, f"out-{name}")), args.threads)
        singles.append(r)
        print(f"  {name} alone: {r['wall_s']:.1f} s, peak RSS {r['rss_mib']:.0f} MiB", flush=True)
    tot = sum(r["wall_s"] for r in singles)
    print("\n| run | wall s | peak RSS MiB | prompt tokens computed | one request per choice |")
    print("|---|---|---|---|---|")
    print(f"| one molt eval, 5 systems | {one['wall_s']:.1f} | {one['rss_mib']:.0f} | "
          f"{one['computed']} | {one['naive']} |")
    print(f"| 5 single-system runs (sum / max) | {tot:.1f} | "
          f"{sum(r['rss_mib'] for r in singles):.0f} / {max(r['rss_mib'] for r in singles):.0f} | "
          f"{sum(r['computed'] for r in singles)} | {sum(r['naive'] for r in singles)} |")
    print(f"one run / sum of five: wall {one['wall_s'] / tot:.2f}x, memory "
          f"{one['rss_mib'] / sum(r['rss_mib'] for r in singles):.2f}x of 5 runs "
          f"({one['rss_mib'] / max(r['rss_mib'] for r in singles):.2f}x of one)")
    print(f"choice task: {one['choice_computed']} prompt tokens computed against "
          f"{one['choice_naive']} for one request per example and choice (lm-evaluation-harness' "
          f"count): {one['choice_naive'] / max(one['choice_computed'], 1):.2f}x fewer")


if __name__ == "__main__":
    main()
