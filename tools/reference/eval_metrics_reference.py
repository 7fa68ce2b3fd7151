#!/usr/bin/env python3
"""Reference values for molt's SQuAD-style text metrics (tests/test_eval_metrics.c).

Writes tests/fixtures/eval/squad.json: prediction/reference pairs with the normalized texts,
exact match and bag-of-tokens F1 as SQuAD v1.1's evaluation defines them (lower-case, drop
string.punctuation, replace the words a/an/the by a space, split on whitespace and join with
one space; F1 from the multiset intersection of the tokens, 1 when both sides have no token,
0 when one side has none). molt's exact_match:squad and token_f1:squad must give the same
values. The pairs are ASCII (molt folds only ASCII case) plus UTF-8 without upper case.

Needs only the Python standard library. Run from the repository root:
  python3 tools/reference/eval_metrics_reference.py
"""
import collections
import json
import re
import string

OUT = "tests/fixtures/eval/squad.json"

PAIRS = [
    ("The  Cat sat on the mat.", "a cat sat on mat"),
    ("Paris, France!", "paris"),
    ("the the the", "cat"),
    ("", "the"),
    ("", ""),
    ("New York City", "new york"),
    ("a b b c", "b b b d"),
    ("It's 42.", "its 42"),
    ("  Hello\tWorld\n", "hello world"),
    ("An apple; an orange", "apple orange"),
    ("theatre", "the atre"),
    ("$1,000.50 (approx.)", "100050 approx"),
    ("caf\u00e9 \u00fcber", "caf\u00e9 \u00fcber alles"),
    ("x y z", "z y x"),
    ("Answer: A", "answer"),
    ("{\"a\": 1}", "a 1"),
]


def normalize(s):
    s = s.lower()
    s = "".join(c for c in s if c not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1(pred, ref):
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def main():
    cases = [{"pred": p, "ref": r, "norm_pred": normalize(p), "norm_ref": normalize(r),
              "exact": float(normalize(p) == normalize(r)), "f1": f1(p, r)} for p, r in PAIRS]
    with open(OUT, "w") as f:
        json.dump({"about": __doc__.strip().splitlines()[0], "cases": cases}, f, indent=1,
                  ensure_ascii=False)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
