#!/usr/bin/env bash
# tests/cli_quickstart.sh: tools/quickstart.sh itself, with the binary under test (no set-up,
# no build), data and seeds drawn with --seed 3, 20 training steps and 10 held-out questions,
# bars off: each step leaves its output (the drawn data, the base model, the adapter, molt
# eval's two tables with intervals and the paired test and its four report files, molt
# report's page, the two curl answers, the server's clean exit). Then the bars on a 2-step
# run on the committed data: the script must fail, saying the adapter does not beat the base;
# and bad arguments. Accuracy itself is the quickstart's own bar, not this test's. Needs curl
# and python3 (skipped without them). $1: the molt binary.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
"$molt" serve --help >/dev/null 2>&1 || { echo "skip: molt has no serve command"; exit 77; }
for t in curl python3; do
    command -v "$t" >/dev/null || { echo "skip: no $t"; exit 77; }
done
molt=$(cd "$(dirname "$molt")" && pwd)/$(basename "$molt")
qs=$src/tools/quickstart.sh

run bash "$qs" --molt "$molt" --out "$tmp/q" --seed 3 --steps 20 --limit 10 --no-bars
same "short quickstart: exit status" "$rc" 0
[ "$rc" == 0 ] || fail "short quickstart: $(tail -20 "$tmp/err")"
[ -s "$tmp/q/base/config.json" ] && ok "base model written" || bad "no $tmp/q/base/config.json"
# --seed 3 draws its own data into the run's directory and trains and evaluates on it
same "--seed: training set drawn" "$(wc -l <"$tmp/q/data/count-train.jsonl" 2>/dev/null)" 2000
same "--seed: held-out set drawn" "$(wc -l <"$tmp/q/data/count-eval.jsonl" 2>/dev/null)" 200
cmp -s "$tmp/q/data/count-eval.jsonl" "$src/configs/data/count-eval.jsonl" \
    && bad "--seed 3 drew the committed held-out set" || ok "--seed 3: other questions"
has "resolved config trains on the drawn set" "$(cat "$tmp/q/run/config.resolved.yaml" 2>/dev/null)" \
    "$tmp/q/data/count-train.jsonl"
has_err "training logged its last step" "molt train: step 20 eval_loss"
[ -s "$tmp/q/run/adapter.h5" ] && [ -d "$tmp/q/run/adapter" ] && ok "adapter saved (PEFT and .h5)" \
    || bad "no adapter in $tmp/q/run"

# molt eval: the two tables, base and adapter rows with an interval, the paired columns
has_out "loss table" "held_out_loss (task loss, 10 examples)"
has_out "exact-match table" "held_out_answers (task generate, 10 examples)"
has_out "paired columns" "vs base [95% CI]"
rows=$(echo "$out" | grep -cE '^(base \(baseline\)|count) +(loss|exact_match:case\+space) +-?[0-9.]+ \[')
same "four rows with intervals (2 systems x 2 tables)" "$rows" 4
echo "$out" | grep -qE '^count +exact_match:case\+space .* [0-9]+/[0-9]+/[0-9]+ +10$' \
    && ok "adapter row has p-value and win/tie/loss" || bad "no paired test on the adapter's row"
for f in report.html report.md report.json samples.jsonl; do
    [ -s "$tmp/q/eval/$f" ] && ok "eval $f" || bad "no $tmp/q/eval/$f"
done
has_out "report.html's path printed" "$tmp/q/eval/report.html"
has_out "the figures printed" "held-out exact match: base "
has_out "bars off" "bars not checked (--no-bars)"

# molt report
[ -s "$tmp/q/run/report.html" ] && ok "learning curves page" || bad "no $tmp/q/run/report.html"
has "report page has charts" "$(cat "$tmp/q/run/report.html" 2>/dev/null)" "<svg"
has_out "its path printed" "$tmp/q/run/report.html"

# molt serve: one answer from each model, then a clean exit
for m in base count; do
    a=$(python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
assert r["model"] == sys.argv[2], r["model"]
print(type(r["choices"][0]["message"]["content"]).__name__)' "$tmp/q/answer-$m.json" "$m" 2>&1)
    same "curl answer of $m" "$a" "str"
done
echo "$out" | grep -qE '^ +base +answers ".*"$' && ok "base answer shown" || bad "no base answer line"
echo "$out" | grep -qE '^ +count +answers ".*"$' && ok "adapter answer shown" || bad "no adapter answer line"
has_out "server stopped cleanly" "molt serve stopped cleanly (exit status 0)"
has "server log: stopped" "$(cat "$tmp/q/serve.log")" "molt serve: stopped"
same "access log: two requests answered 200" "$(grep -c '"status":200' "$tmp/q/serve.log")" 2
has_out "total time printed" "quickstart: done in "

# the bars: a 2-step adapter does not beat the base, and the script says so
run bash "$qs" --molt "$molt" --out "$tmp/q2" --steps 2 --limit 10
same "bars on a 2-step run: exit status" "$rc" 1
has_out "says why" "the adapter does NOT beat the base: adapter exact match"
has_err "says it failed" "quickstart: FAILED"
[ -e "$tmp/q2/serve.out" ] && bad "served after failing the bars" || ok "stops before serving"

# bad arguments
run bash "$qs" --molt "$molt" --steps 0
same "--steps 0: exit 2" "$rc" 2
has_err "--steps 0: says why" "'0' is not a positive integer"
run bash "$qs" --molt "$molt" --seed x1
same "--seed x1: exit 2" "$rc" 2
has_err "--seed x1: says why" "seed 'x1' is not an integer"
run bash "$qs" --frobnicate
same "unknown option: exit 2" "$rc" 2
has_err "unknown option: usage" "usage:"
cli_done
