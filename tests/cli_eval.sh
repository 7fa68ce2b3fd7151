#!/usr/bin/env bash
# tests/cli_eval.sh: `molt eval` on the tiny preset with the base and two adapters trained
# here (one on an NF4 copy's shapes, both loaded as PEFT dir / molt file / checkpoint):
# the loss task equals `molt train --eval-only` (token-weighted, 1e-6 relative) for the base
# and an adapter; choice and generate tasks through a suite file with --set overrides; the
# report files; the choice context computed once (fewer tokens than one request per
# choice); bad input (FILE:LINE errors, --on-bad-record skip, empty set, duplicate names,
# an adapter that does not fit, unknown keys). $1: the molt binary.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

run "$molt" eval --help
same "--help" "$rc" 0
has "--help names the tasks" "$out" "acc_norm"

eval_fixture

# ---- loss: equal to molt train --eval-only ----------------------------------------------
run "$molt" train --config "$tmp/c.yaml" --eval-only --quiet
want_base=$(echo "$out" | awk '{print $2}')
run "$molt" train --config "$tmp/c.yaml" --eval-only --quiet --adapter "$tmp/run/adapter"
want_a=$(echo "$out" | awk '{print $2}')
run "$molt" eval --model "$tmp/base" --base --adapter A="$tmp/run/adapter" \
    --adapter B="$tmp/run2/adapter.h5" --adapter Ack="$tmp/run/checkpoints/step-8.h5" \
    --data "$tmp/eval.jsonl" --task loss --out "$tmp/ev1" --resamples 500 --quiet
same "loss run" "$rc" 0
got_base=$(echo "$out" | awk '/: base token loss/ {print $5}')
got_a=$(echo "$out" | awk '/: A token loss/ {print $5}')
got_ck=$(echo "$out" | awk '/: Ack token loss/ {print $5}')
close() { awk -v a="$1" -v b="$2" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && d <= 1e-6 * (b < 0 ? -b : b)) }'; }
close "$got_base" "$want_base" && ok "base loss = train --eval-only ($got_base, $want_base)" \
    || bad "base loss $got_base vs train --eval-only $want_base"
close "$got_a" "$want_a" && ok "adapter loss = train --eval-only ($got_a, $want_a)" \
    || bad "adapter loss $got_a vs train --eval-only $want_a"
same "the checkpoint's adapter gives the same loss" "$got_ck" "$got_a"
for f in report.md report.json samples.jsonl report.html; do
    [ -s "$tmp/ev1/$f" ] && ok "report file $f" || bad "no $f"
done
same "samples: one line per example and system" "$(wc -l <"$tmp/ev1/samples.jsonl")" 48
has "report.md compares with the base" "$(cat "$tmp/ev1/report.md")" "vs base"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); assert r['config']['adapters']['A']" \
    "$tmp/ev1/report.json" 2>/dev/null && ok "report.json has the configuration" \
    || bad "report.json lacks config.adapters.A"

# ---- choice and generate through a suite file ----------------------------------------------
python3 - "$tmp" <<'PY'
import json, sys, random
tmp = sys.argv[1]
rng = random.Random(3)
words = "zero one two three four five six seven eight nine".split()
with open(f"{tmp}/choice.jsonl", "w") as f:
    for i in range(10):
        ds = [rng.randrange(10) for _ in range(3)]
        ctx = "Spell out the digits: " + " ".join(map(str, ds)) + "\nAnswer:"
        right = " " + " ".join(words[d] for d in ds)
        wrong = [" " + " ".join(words[(d + k) % 10] for d in ds) for k in (1, 2, 3)]
        choices = wrong[:2] + [right] + wrong[2:]
        rec = {"prompt": ctx, "choices": choices, "answer": 2,
               "category": "short" if i % 2 else "long"}
        if i % 3 == 0:
            rec = {"messages": [{"role": "user", "content": ctx}], "choices": choices,
                   "answer": 2, "id": f"m{i}"}
        f.write(json.dumps(rec) + "\n")
PY
cat >"$tmp/suite.yaml" <<YAML
model: $tmp/base
base: true
adapters: {A: $tmp/run/adapter, B: $tmp/run2/adapter}
resamples: 300
seed: 4
out: $tmp/ev2
datasets:
  digits_choice: {path: $tmp/choice.jsonl, task: choice}
  digits_gen:
    path: $tmp/eval.jsonl
    task: generate
    metrics: [exact_match, contains]
    max_tokens: 12
    stop: ["\n"]
YAML
run "$molt" eval --config "$tmp/suite.yaml" --set datasets.digits_gen.max_tokens=6 \
    --set 'datasets.digits_gen.metrics=[exact_match:squad, token_f1]' --quiet
same "suite run" "$rc" 0
has "choice table" "$out" "digits_choice (task choice, 10 examples)"
has "acc_norm row" "$out" "acc_norm"
has "token_f1 replaced contains" "$out" "token_f1"
has "per-category table" "$(cat "$tmp/ev2/report.md")" "short"
line=$(echo "$out" | grep '^digits_choice: prompt tokens computed')
computed=$(echo "$line" | sed -nE 's/.*prompt tokens computed ([0-9]+).*/\1/p')
naive=$(echo "$line" | sed -nE 's/.*would compute ([0-9]+)\).*/\1/p')
[ -n "$computed" ] && [ "$computed" -lt "$naive" ] \
    && ok "contexts computed once: $computed prompt tokens, $naive one request per choice" \
    || bad "prompt tokens computed '$computed', naive '$naive'"
gen_tokens=$(python3 -c "
import json,sys
n=0
for l in open(sys.argv[1]):
    r=json.loads(l)
    if r['dataset']=='digits_gen': n+=1
print(n)" "$tmp/ev2/samples.jsonl")
same "generate samples: 12 examples x 3 systems" "$gen_tokens" 36

# ---- bad input -------------------------------------------------------------------------------
printf '%s\n' '{"prompt": "a", "choices": [" b", " c"], "answer": 1}' \
    '{"prompt": "a", "choices": [" b", " c"], "answer": 5}' >"$tmp/badchoice.jsonl"
run "$molt" eval --model "$tmp/base" --base --data "$tmp/badchoice.jsonl" --task choice --quiet
same "answer out of range: exit 1" "$rc" 1
has_err "answer out of range: FILE:LINE" "$tmp/badchoice.jsonl:2:1: field \"answer\" must be an integer index"
run "$molt" eval --model "$tmp/base" --base --data "$tmp/badchoice.jsonl" --task choice --quiet \
    --on-bad-record skip --resamples 100
same "--on-bad-record skip" "$rc" 0
has_out "the bad record is counted" "1 bad records skipped"
printf '%s\n' '{"instruction": "x"}' >"$tmp/noref.jsonl"
run "$molt" eval --model "$tmp/base" --base --data "$tmp/noref.jsonl" --task generate --quiet
has_err "generate record without a reference" "noref.jsonl:1:1: a generate record needs a reference"
: >"$tmp/empty.jsonl"
run "$molt" eval --model "$tmp/base" --base --data "$tmp/empty.jsonl" --quiet
has_err "empty eval set" "no usable record"
run "$molt" eval --model "$tmp/base" --adapter x="$tmp/run/adapter" --adapter x="$tmp/run2/adapter" \
    --base --data "$tmp/eval.jsonl" --quiet
same "one name twice on the command line: the last one wins" "$rc" 0
run "$molt" eval --model "$tmp/base" --base --adapter base="$tmp/run/adapter" \
    --data "$tmp/eval.jsonl" --quiet
has_err "two systems with one name" "two systems are named 'base'"
run "$molt" init-model --preset tiny-grouped --seed 1 --out "$tmp/other"
run "$molt" eval --model "$tmp/other" --base --adapter A="$tmp/run/adapter" \
    --data "$tmp/eval.jsonl" --quiet
same "adapter that does not fit: exit 1" "$rc" 1
has_err "names the adapter" "adapter A ("
run "$molt" eval --model "$tmp/base" --base --data "$tmp/eval.jsonl" --set nonsense=1 --quiet
has_err "unknown --set key" "unknown key 'nonsense'"
run "$molt" eval --model "$tmp/base" --data "$tmp/eval.jsonl" --quiet
has_err "no system" "no system to evaluate"
run "$molt" eval --model "$tmp/base" --base --data "$tmp/eval.jsonl" --baseline zz --quiet
has_err "unknown baseline" "the baseline 'zz' is not one of the systems"
cli_done
