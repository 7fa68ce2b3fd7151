#!/usr/bin/env python3
"""Write a Hugging Face tokenizer.json (+ tokenizer_config.json) from a Mistral tekken.json.

llama.cpp's convert_hf_to_gguf.py reads the vocabulary through transformers' AutoTokenizer
and so needs tokenizer.json beside the weights; molt's models carry tekken.json only. This
script lets transformers do the conversion (its Tekken converter in
transformers.integrations.mistral: byte-level BPE with the tekken regex as a Split
pre-tokenizer, merges derived from the ranks, ids shifted past the special tokens) and then
checks the result: the `tokenizers` library with the written tokenizer.json must encode a
fixed set of strings (ASCII, accents, CJK, emoji, digits, code, whitespace runs) to the same
ids as `molt tokenize` with the original tekken.json. It exits 1 on any difference.

It is not part of molt's build or tests; it runs in a Python virtualenv with transformers
and tokenizers (see tools/bench/README.md).

Run: python tools/bench/tekken_to_tokenizer_json.py --tekken DIR/tekken.json --out DIR
        [--molt build/molt] [--check-jsonl FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

SAMPLES = [
    "Hello, world! 123 héllo",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\tand\nnew lines\n\n\n",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 🙂🚀 and symbols ∑∫√ ≤≥ → «quotes»",
    "def f(x):\n    return x ** 2  # square\n",
    "1234567890 3.14159 -42 1e-6 0x1F",
    "Ünïcödé Çàfé naïve résumé façade",
    "[INST] not special in plain text [/INST] </s> <s>",
    "https://example.com/path?query=1&b=2 user@example.org",
    "Mixed-CASE words: iPhone, McDonald's, e.g., U.S.A.",
    "Ÿ̶̢e̸s̷ combining marks and zero\u200bwidth",
]


def convert(tekken, out_dir):
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer
    tok = convert_tekken_tokenizer(tekken)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer.json")
    if not os.path.isfile(path):
        sys.exit(f"transformers did not write {path}")
    return path


def molt_ids(molt, tekken, texts):
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
        name = f.name
    try:
        out = subprocess.run([molt, "tokenize", "--tokenizer", tekken, "--jsonl", name],
                             check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(name)
    lines = out.splitlines()
    if len(lines) != len(texts):
        sys.exit(f"molt tokenize printed {len(lines)} lines for {len(texts)} texts")
    return [[int(x) for x in line.split()] for line in lines]


def check(tokenizer_json, tekken, molt, texts):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tokenizer_json)
    # "[INST]" and friends are added tokens in tokenizer.json, matched before the BPE;
    # plain text in molt (and in mistral-common) never yields them, so compare that way.
    tok.encode_special_tokens = True
    want = molt_ids(molt, tekken, texts)
    bad = 0
    for text, w in zip(texts, want):
        got = tok.encode(text, add_special_tokens=False).ids
        if got != w:
            bad += 1
            print(f"DIFF {text!r}\n  tokenizer.json {got}\n  molt          {w}")
    print(f"{len(texts) - bad}/{len(texts)} strings encode identically "
          f"(tokenizer.json via tokenizers vs molt tokenize on tekken.json)")
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tekken", required=True, help="tekken.json to convert")
    ap.add_argument("--out", required=True, help="directory for tokenizer.json")
    ap.add_argument("--molt", help="molt binary: compare ids with `molt tokenize`")
    ap.add_argument("--check-jsonl", help='more strings to compare, one {"text": ...} a line')
    a = ap.parse_args()
    path = convert(a.tekken, a.out)
    print(f"wrote {path}")
    if not a.molt:
        return 0
    texts = list(SAMPLES)
    if a.check_jsonl:
        with open(a.check_jsonl) as f:
            texts += [json.loads(line)["text"] for line in f if line.strip()]
    return 1 if check(path, a.tekken, a.molt, texts) else 0


if __name__ == "__main__":
    sys.exit(main())
