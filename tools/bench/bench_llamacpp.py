#!/usr/bin/env python3
"""Single-stream prefill and decode: molt against llama.cpp on the same weights and threads.

For each GGUF file given (the same model converted from molt's Hugging Face directory, e.g.
F32, Q4_0, Q4_K_M) the script measures, alternately in each of --rounds rounds so both
sides see the same spells of machine noise, and keeps each side's best round:

  llama.cpp  `llama-bench -t THREADS -p P -n 0` (prefill of P tokens) and
             `llama-bench -t THREADS -p 0 -n G -d P` (G decode tokens after P of context)
  molt       F32 GGUF: `molt bench generate --model DIR --prompt-tokens P --gen-tokens G`
             (its absorbed-attention row, the path `molt generate` takes);
             quantized GGUF: the same with --base-quant SPEC when the molt binary's bench
             accepts it, else `molt generate --base-quant SPEC --prompt-file F` with a
             prompt of exactly P tokens (<s> + P-1 one-token words) and its summary line
             (no warm-up there: the first touch of the weights counts in its prefill)

with OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = THREADS for molt. It prints one table:
prefill and decode tokens/s of each side and the ratio molt / llama.cpp, with the load
average seen during the rounds. It builds and downloads nothing; tools/bench/README.md
says how to get llama-bench and the GGUF files (llama.cpp's source ships in the
llama-cpp-python sdist on PyPI; convert_hf_to_gguf.py needs a tokenizer.json, written by
tools/bench/tekken_to_tokenizer_json.py).

Run: python3 tools/bench/bench_llamacpp.py --llama-bench /work/llamacpp-build/bin/llama-bench
        --gguf small-f32.gguf small-q4_0.gguf --molt build/molt --model /work/models/small
        [--threads 2] [--rounds 3] [--prompt-tokens 128,512] [--gen-tokens 128]
        [--molt-quant nf4,lm_head=nf4] [--llama-args '--repack 0']
Needs only the Python standard library.
"""
import argparse
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile

WORDS = ("the a of to and in is it that for on with as was by at be this from or an are "
         "model expert layer token train weight matrix memory fast small value query key rank "
         "batch step loss rate time day year world house water light music river city "
         "garden window table summer winter morning evening number letter story friend").split()


def run(cmd, env=None, timeout=3600):
    # generated text from random weights need not be UTF-8
    p = subprocess.run(cmd, capture_output=True, env=env, timeout=timeout)
    out = p.stdout.decode("utf-8", "replace")
    err = p.stderr.decode("utf-8", "replace")
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)}: exit {p.returncode}\n{err[-3000:]}")
    return out, err


def gguf_type(path):
    """general.file_type of a GGUF file: read from the header (key/values come first)."""
    import struct
    names = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
             10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
             16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        _ver, _nt, nkv = struct.unpack("<IQQ", f.read(20))

        def rstr():
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", "replace")

        def skip(t):
            if t == 8:
                rstr()
            elif t == 9:
                et, n = struct.unpack("<IQ", f.read(12))
                for _ in range(n):
                    skip(et)
            else:
                f.read(sizes[t])

        for _ in range(nkv):
            key = rstr()
            (t,) = struct.unpack("<I", f.read(4))
            if key == "general.file_type" and t == 4:
                (v,) = struct.unpack("<I", f.read(4))
                return names.get(v, f"type{v}")
            skip(t)
    return "?"


def llama_side(a, gguf, prompts, gen):
    """{('pp', P): tok/s, ('tg', P): tok/s} from two llama-bench runs (JSON output)."""
    base = [a.llama_bench, "-m", gguf, "-t", str(a.threads), "-r", str(a.llama_reps),
            "-o", "json"] + shlex.split(a.llama_args)
    out = {}
    pp, _ = run(base + ["-p", ",".join(map(str, prompts)), "-n", "0"])
    for r in json.loads(pp):
        out[("pp", r["n_prompt"])] = r["avg_ts"]
    tg, _ = run(base + ["-p", "0", "-n", str(gen), "-d", ",".join(map(str, prompts))])
    for r in json.loads(tg):
        out[("tg", r["n_depth"])] = r["avg_ts"]
    return out


def molt_env(threads):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = str(threads)
    return env


def bench_has_quant(molt):
    out, _ = run([molt, "bench", "generate", "--help"])
    return "--base-quant" in out


def molt_bench(a, prompt, gen, quant):
    cmd = [a.molt, "bench", "generate", "--model", a.model, "--prompt-tokens", str(prompt),
           "--gen-tokens", str(gen)] + (["--base-quant", quant] if quant else [])
    out, _ = run(cmd, env=molt_env(a.threads))
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 9 and cells[4] == a.molt_attn:
            return float(cells[6]), float(cells[8]), ""
    raise RuntimeError(f"no '{a.molt_attn}' row in molt bench generate output:\n{out}")


def one_token_words(molt, tokenizer):
    """WORDS whose ' word' is exactly one token (so a text of n of them is n tokens)."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for w in WORDS:
            f.write(json.dumps({"text": " " + w}) + "\n")
    try:
        out, _ = run([molt, "tokenize", "--tokenizer", tokenizer, "--jsonl", f.name])
    finally:
        os.unlink(f.name)
    return [w for w, line in zip(WORDS, out.splitlines()) if len(line.split()) == 1]


def prompt_file(a, n_tokens, words, tmp):
    """A text file that molt generate turns into exactly n_tokens ids (<s> included)."""
    rng = random.Random(n_tokens)
    text = "".join(" " + rng.choice(words) for _ in range(n_tokens - 1))
    path = os.path.join(tmp, f"prompt{n_tokens}.txt")
    with open(path, "w") as f:
        f.write(text)
    out, _ = run([a.molt, "tokenize", "--tokenizer", a.tokenizer, "--text", text, "--bos"])
    if len(out.split()) != n_tokens:
        raise RuntimeError(f"prompt of {n_tokens} tokens came out as {len(out.split())}")
    return path


GEN_RE = re.compile(r"(\d+) prompt tokens, generated (\d+) tokens \(([^)]*)\), prefill "
                    r"([\d.]+) tok/s, decode ([\d.]+) tok/s")


def molt_generate(a, pfile, gen, quant):
    cmd = [a.molt, "generate", "--model", a.model, "--prompt-file", pfile, "--max-tokens",
           str(gen), "--attn", a.molt_attn] + (["--base-quant", quant] if quant else [])
    _, err = run(cmd, env=molt_env(a.threads))
    m = GEN_RE.search(err)
    if not m:
        raise RuntimeError(f"no summary line in molt generate output:\n{err[-2000:]}")
    note = "" if int(m.group(2)) == gen else f"stopped after {m.group(2)} tokens ({m.group(3)})"
    return float(m.group(4)), float(m.group(5)), note


def main():
    ap = argparse.ArgumentParser(
        description="molt vs llama.cpp single-stream prefill/decode, same weights and threads",
        epilog="Get llama-bench and the GGUF files as tools/bench/README.md says (pip "
               "download --no-binary :all: --no-deps llama-cpp-python; cmake its "
               "vendor/llama.cpp; tekken_to_tokenizer_json.py; convert_hf_to_gguf.py "
               "--outtype f32; llama-quantize Q4_0 / Q4_K_M). Nothing is built or "
               "downloaded here.")
    ap.add_argument("--llama-bench", required=True, help="path of the llama-bench binary")
    ap.add_argument("--gguf", required=True, nargs="+", help="GGUF file(s) of the model")
    ap.add_argument("--molt", required=True, help="path of the molt binary")
    ap.add_argument("--model", required=True, help="molt's model directory (HF layout, F32)")
    ap.add_argument("--tokenizer", help="tokenizer for the molt generate prompt "
                    "(default MODEL/tekken.json)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds, best kept")
    ap.add_argument("--prompt-tokens", default="128,512", help="prompt lengths, comma list")
    ap.add_argument("--gen-tokens", type=int, default=128, help="decode tokens")
    ap.add_argument("--molt-quant", default="nf4,lm_head=nf4",
                    help="molt --base-quant SPEC for quantized GGUF files")
    ap.add_argument("--molt-attn", default="absorbed", choices=["absorbed", "expanded"],
                    help="molt's cached-attention form")
    ap.add_argument("--llama-args", default="",
                    help="extra llama-bench arguments, e.g. '--repack 0'")
    ap.add_argument("--llama-reps", type=int, default=1, help="llama-bench -r per round")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    a = ap.parse_args()
    prompts = [int(x) for x in a.prompt_tokens.split(",") if x]
    if a.threads < 1 or a.rounds < 1 or a.gen_tokens < 1 or not prompts or min(prompts) < 2:
        sys.exit("--threads, --rounds, --gen-tokens must be >= 1 and prompts >= 2 tokens")
    for p in [a.llama_bench, a.molt] + a.gguf:
        if not os.path.exists(p):
            sys.exit(f"{p}: not found (see --help for how to obtain it)")
    a.tokenizer = a.tokenizer or os.path.join(a.model, "tekken.json")
    quant_in_bench = bench_has_quant(a.molt)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        words = None
        for gguf in a.gguf:
            ftype = gguf_type(gguf)
            quant = None if ftype == "F32" else a.molt_quant
            use_bench = quant is None or quant_in_bench
            pfiles = {}
            if not use_bench:
                words = words or one_token_words(a.molt, a.tokenizer)
                pfiles = {p: prompt_file(a, p, words, tmp) for p in prompts}
            best_l, best_m, notes, loads = {}, {}, set(), []
            for rnd in range(a.rounds):
                loads.append(os.getloadavg()[0])
                for k, v in llama_side(a, gguf, prompts, a.gen_tokens).items():
                    best_l[k] = max(best_l.get(k, 0.0), v)
                for p in prompts:
                    pf, dec, note = (molt_bench(a, p, a.gen_tokens, quant) if use_bench else
                                     molt_generate(a, pfiles[p], a.gen_tokens, quant))
                    if note:
                        notes.add(note)
                    best_m[("pp", p)] = max(best_m.get(("pp", p), 0.0), pf)
                    best_m[("tg", p)] = max(best_m.get(("tg", p), 0.0), dec)
                print(f"# {os.path.basename(gguf)} round {rnd + 1}/{a.rounds} done "
                      f"(load {loads[-1]:.2f})", file=sys.stderr)
            for p in prompts:
                row = {
                    "gguf": os.path.basename(gguf), "llama_type": ftype,
                    "molt_weights": quant or "f32",
                    "molt_tool": "bench generate" if use_bench else "generate",
                    "prompt": p, "gen": a.gen_tokens,
                    "molt_prefill": best_m[("pp", p)], "llama_prefill": best_l[("pp", p)],
                    "molt_decode": best_m[("tg", p)], "llama_decode": best_l[("tg", p)],
                    "load_min": min(loads), "load_max": max(loads), "notes": sorted(notes)}
                rows.append(row)
                print("# " + json.dumps(row), file=sys.stderr, flush=True)
    print(f"threads {a.threads}, best of {a.rounds} alternating rounds; decode = "
          f"{a.gen_tokens} tokens after the prompt (llama-bench -d P); molt attention "
          f"{a.molt_attn}; llama-bench extra args: '{a.llama_args}'")
    print("| llama.cpp weights | molt weights (tool) | prompt | prefill molt | prefill llama.cpp"
          " | ratio | decode molt | decode llama.cpp | ratio | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['llama_type']} ({r['gguf']}) | {r['molt_weights']} ({r['molt_tool']}) | "
              f"{r['prompt']} | {r['molt_prefill']:.1f} | {r['llama_prefill']:.1f} | "
              f"{r['molt_prefill'] / r['llama_prefill']:.2f}x | {r['molt_decode']:.1f} | "
              f"{r['llama_decode']:.1f} | {r['molt_decode'] / r['llama_decode']:.2f}x | "
              f"{r['load_min']:.1f}-{r['load_max']:.1f} |")
    for r in rows:
        for n in r["notes"]:
            print(f"note: {r['gguf']} molt: {n}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
