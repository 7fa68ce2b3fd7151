#!/usr/bin/env python3
"""tools/make_quickstart_data.py: writes the shipped instruction datasets (Alpaca-format
JSONL) from seeded generators, so the committed files can be regenerated exactly:

    python3 tools/make_quickstart_data.py configs/data [--seed S]

count-train.jsonl, count-eval.jsonl: the quickstart's task (tools/quickstart.sh). A word
problem whose answer is one number, given as a word:

    {"instruction": "Omar has 7 shells. How many shells does Omar have? Answer in words.",
     "output": "seven"}

The answer depends on one token of the prompt (the digit 0-9) through a fixed mapping the
random-init base does not know; the name and the object around it are distractors. The
held-out set is disjoint from the training set by construction: the 95 real names are
shuffled (seeded) and split, 16 for evaluation only, so no held-out question names a person
that occurs in any training question (the 36 objects, each digit and the sentence pattern
occur in both). The training questions also name ~300 made-up people ("Fagika", "Sejize":
2-3 random consonant-vowel syllables, never one of the real names), so that the adapter sees
many different tokens where the name stands and learns to look past them; real names are
one to three tokens long, made-up ones one to four, so the digit's position varies too.
2000 distinct training questions, 200 distinct held-out ones. --seed S draws another split
and other questions (tools/quickstart.sh --seed S); the committed files use the default
seed.

digits-train.jsonl, digits-eval.jsonl: spelling out 2-5 digits as words ("4 0 7" ->
"four zero seven"), 400 + 60 examples (held-out digit strings never occur in the training
file); the CLI tests train on these. Not affected by --seed.

This script is what it is: a data generator. It neither trains nor checks anything.
"""
import argparse
import itertools
import json
import random

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

NAMES = ["Ada", "Alex", "Anna", "Ben", "Bob", "Carl", "Dana", "Emma", "Eve", "Finn", "Gina",
         "Hugo", "Ivan", "Jack", "Kate", "Leo", "Lily", "Max", "Mia", "Nina", "Omar", "Paul",
         "Rosa", "Ruth", "Sam", "Tina", "Uma", "Vera", "Will", "Zoe", "Adam", "Clara", "Ella",
         "Igor", "Lucy", "Nora", "Oscar", "Pia", "Ravi", "Sara", "Theo", "Yara", "Hans", "Iris",
         "Kofi", "Lena", "Mark", "Olga", "Amir", "Bea", "Chen", "Dev", "Edgar", "Fatima",
         "Gus", "Hana", "Ines", "Jonas", "Kai", "Lars", "Mei", "Nils", "Otto", "Priya", "Quinn",
         "Rita", "Sven", "Tom", "Ugo", "Vik", "Wen", "Xena", "Yusuf", "Zara", "Aiko", "Boris",
         "Cora", "Dmitri", "Elif", "Femi", "Greta", "Hiro", "Ilse", "Jana", "Karl", "Luis",
         "Mona", "Nadia", "Oleg", "Pedro", "Rahel", "Saul", "Tariq", "Wanda", "Alma"]
OBJECTS = ["apple", "pear", "book", "cat", "dog", "pen", "coin", "card", "shoe", "hat", "cup",
           "key", "bird", "boat", "egg", "ring", "stamp", "plum", "shell", "toy", "lamp",
           "cake", "kite", "sock", "vase", "bead", "star", "bell", "rock", "bag", "drum", "coat",
           "bowl", "duck", "frog", "nut"]
COUNT_SEED = 20240615
EVAL_NAMES = 16
MADE_NAMES = 300  # drawn; the few that equal a real name are dropped
CONSONANTS, VOWELS = "bdfghjklmnprstvz", "aeiou"
N_TRAIN, N_EVAL = 2000, 200


def count_question(name, obj, d):
    has = f"{d} {obj}" if d == 1 else f"{d} {obj}s"
    return {"instruction": f"{name} has {has}. How many {obj}s does {name} have? "
                           "Answer in words.",
            "output": WORDS[d]}


def count_sets(seed):
    rng = random.Random(seed)
    names, objects = NAMES[:], OBJECTS[:]
    rng.shuffle(names)
    rng.shuffle(objects)
    made = set()
    while len(made) < MADE_NAMES:
        n = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randrange(2, 4)))
        made.add(n.capitalize())
    made = sorted(made - set(NAMES))
    held, train = (names[:EVAL_NAMES], objects), (names[EVAL_NAMES:] + made, objects)

    def draw(part, n):
        combos = list(itertools.product(part[0], part[1], range(10)))
        return [count_question(*c) for c in rng.sample(combos, n)]
    return draw(train, N_TRAIN), draw(held, N_EVAL)


def digits_sets():
    rng = random.Random(20240601)
    seen, rows = set(), []
    while len(rows) < 460:
        digits = tuple(str(rng.randrange(10)) for _ in range(rng.randrange(2, 6)))
        if digits not in seen:
            seen.add(digits)
            rows.append({"instruction": "Spell out the digits: " + " ".join(digits),
                         "output": " ".join(WORDS[int(d)] for d in digits)})
    return rows[:400], rows[400:]


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="configs/data", help="output directory")
    ap.add_argument("--seed", type=int, default=COUNT_SEED,
                    help=f"seed of the counting task's split and draws (default {COUNT_SEED})")
    a = ap.parse_args()
    train, held = count_sets(a.seed)
    assert not ({r["instruction"].split()[0] for r in train}
                & {r["instruction"].split()[0] for r in held}), "a held-out name occurs in training"
    write(f"{a.out}/count-train.jsonl", train)
    write(f"{a.out}/count-eval.jsonl", held)
    train, held = digits_sets()
    write(f"{a.out}/digits-train.jsonl", train)
    write(f"{a.out}/digits-eval.jsonl", held)


if __name__ == "__main__":
    main()
