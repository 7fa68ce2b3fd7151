#!/usr/bin/env python3
"""tools/make_quickstart_data.py: writes the quickstart's instruction dataset: spelling out
short digit strings as words ("4 0 7" -> "four zero seven"), a deterministic task a tiny
random-init model learns with a LoRA adapter in a couple of minutes on CPU. Alpaca-format
JSONL; a seeded generator, so the committed files can be regenerated exactly:

    python3 tools/make_quickstart_data.py configs/data

writes quickstart-train.jsonl (400 examples) and quickstart-eval.jsonl (60 held-out digit
strings that never occur in the training file).
"""
import json
import random
import sys

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def example(digits):
    return {"instruction": "Spell out the digits: " + " ".join(digits),
            "output": " ".join(WORDS[int(d)] for d in digits)}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "configs/data"
    rng = random.Random(20240601)
    seen, rows = set(), []
    while len(rows) < 460:
        digits = tuple(str(rng.randrange(10)) for _ in range(rng.randrange(2, 6)))
        if digits not in seen:
            seen.add(digits)
            rows.append(example(digits))
    for name, part in (("quickstart-train.jsonl", rows[:400]), ("quickstart-eval.jsonl", rows[400:])):
        with open(f"{out}/{name}", "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
