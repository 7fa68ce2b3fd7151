#!/usr/bin/env python3
"""Encode throughput of molt's tokenizers beside tiktoken and Hugging Face tokenizers.

One run, one text file, one thread each: `molt bench tokenize` times molt's Tekken and
tokenizer.json encoders; this script then times tiktoken on the same Tekken ranks and pattern
and Hugging Face `tokenizers` on the same DeepSeek-V3 tokenizer.json, on the same lines, and
prints the table. Every encoder gets the text cut into lines at '\\n' (newline kept), encodes
all lines per pass, and reports its fastest pass in MB/s (10^6 bytes per second). Token
totals are printed too: equal totals are a cheap check that the encoders did the same work.

Default text (no --text): about --size-mb MB mixing prose (/usr/share/common-licenses),
code (the Python standard library's sources, sorted by path) and the multilingual test
corpus, one third each, written to a temporary file.

Usage (from anywhere; Python with tiktoken and tokenizers, e.g. /work/venv/bin/python):
  bench_tokenize.py [--molt build/molt] [--text FILE] [--seconds 3] [--size-mb 4]
"""
import argparse
import base64
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"          # tokenizers: one thread
os.environ["TOKENIZERS_PARALLELISM"] = "false"

ROOT = Path(__file__).resolve().parents[2]
TEKKEN = ROOT / "configs" / "tokenizers" / "tekken.json"
HF_JSON = ROOT / "configs" / "tokenizers" / "deepseek-v3-tokenizer.json"
CORPUS = ROOT / "tests" / "fixtures" / "tokenizer" / "corpus.jsonl"


def take(paths, budget):
    out, n = [], 0
    for p in paths:
        try:
            s = Path(p).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out.append(s if s.endswith("\n") else s + "\n")
        n += len(out[-1].encode())
        if n >= budget:
            break
    return "".join(out)


def default_text(size_mb):
    third = int(size_mb * 1e6 / 3)
    prose = take(sorted(Path("/usr/share/common-licenses").glob("*")), third)
    code = take(sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")), third)
    records = [json.loads(l)["text"] for l in CORPUS.read_text(encoding="utf-8").split("\n") if l]
    multi, n = [], 0
    while n < third:
        for r in records:
            multi.append(r.replace("\n", " ") + "\n")
            n += len(multi[-1].encode())
    return prose + code + "".join(multi)


def lines_of(data):
    """Lines at b'\\n' only (molt's cut), newline kept, as str."""
    parts = data.split(b"\n")
    out = [p + b"\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    return [p.decode("utf-8") for p in out]


def timed(fn, seconds):
    best, spent, passes, tokens = None, 0.0, 0, 0
    while spent < seconds or passes < 2:
        t0 = time.perf_counter()
        tokens = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
        spent += dt
        passes += 1
    return best, tokens


def tiktoken_tekken():
    import tiktoken
    d = json.loads(TEKKEN.read_text(encoding="utf-8"))
    c = d["config"]
    n = min(len(d["vocab"]), c["default_vocab_size"] - c["default_num_special_tokens"])
    ranks = {base64.b64decode(v["token_bytes"]): v["rank"] for v in d["vocab"][:n]}
    return tiktoken.Encoding(name="tekken", pat_str=c["pattern"], mergeable_ranks=ranks,
                             special_tokens={})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molt", default=str(ROOT / "build" / "molt"))
    ap.add_argument("--text")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size-mb", type=float, default=4.0)
    a = ap.parse_args()

    tmp = None
    if a.text:
        path = Path(a.text)
    else:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")
        tmp.write(default_text(a.size_mb))
        tmp.close()
        path = Path(tmp.name)
    data = path.read_bytes()
    lines = lines_of(data)

    try:
        out = subprocess.run([a.molt, "bench", "tokenize", "--tokenizer", str(TEKKEN),
                              "--tokenizer", str(HF_JSON), "--text", str(path),
                              "--seconds", str(a.seconds), "--tsv"],
                             check=True, capture_output=True, text=True, cwd=ROOT).stdout
        molt = [l.split("\t") for l in out.strip().split("\n")]

        import tokenizers
        enc = tiktoken_tekken()
        # A plain loop: encode_ordinary_batch's thread pool costs more than it saves here.
        tt, tt_tokens = timed(lambda: sum(len(enc.encode_ordinary(l)) for l in lines),
                              a.seconds)
        hf = tokenizers.Tokenizer.from_file(str(HF_JSON))
        hf.encode_special_tokens = True
        # encode_batch_fast skips the character offsets that molt does not compute either.
        batch = getattr(hf, "encode_batch_fast", hf.encode_batch)
        ht, hf_tokens = timed(lambda: sum(len(e.ids) for e in batch(
            lines, add_special_tokens=False)), a.seconds)
    finally:
        if tmp:
            os.unlink(tmp.name)

    mb = len(data) / 1e6
    rows = [("molt tekken.json", "tekken", float(molt[0][5]), int(molt[0][4])),
            (f"tiktoken {version('tiktoken')}", "tekken", mb / tt, tt_tokens),
            ("molt tokenizer.json", "deepseek-v3", float(molt[1][5]), int(molt[1][4])),
            (f"HF tokenizers {version('tokenizers')}", "deepseek-v3", mb / ht, hf_tokens)]
    print(f"text: {path if a.text else 'default mix'}, {len(data)} bytes, {len(lines)} lines; "
          "one thread; fastest pass")
    print(f"{'encoder':<26} {'vocabulary':<12} {'MB/s':>8} {'tokens':>10}")
    for name, vocab, mbps, tokens in rows:
        print(f"{name:<26} {vocab:<12} {mbps:8.2f} {tokens:10d}")
    same = rows[0][3] == rows[1][3] and rows[2][3] == rows[3][3]
    print("token totals " + ("agree" if same else "DIFFER") + " between molt and the references")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
