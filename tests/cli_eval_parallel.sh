#!/usr/bin/env bash
# tests/cli_eval_parallel.sh: `molt eval` under mpirun against one process, on the tiny preset
# with the base and two adapters (one with routed-expert LoRA) over a loss, a choice and a
# generate dataset, mixed in every engine step:
#   - data parallel (2 ranks): report.md, report.json and samples.jsonl byte for byte;
#   - experts split (1x2, 2x2, 1x4): the same examples, systems, predictions and 0/1
#     metrics, every loss within 1e-6 relative (only the summation order of the experts'
#     results differs), the same token losses;
#   - layouts that cannot work, with their messages.
# $1: the molt binary. Needs the MPI launcher CMake found (MOLT_MPIEXEC); 77 without one.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=1
if [ -z "${MOLT_MPIEXEC:-}" ] || [ ! -x "$MOLT_MPIEXEC" ]; then
    echo "no MPI launcher (MOLT_MPIEXEC): skipped"
    exit 77
fi

# ranks NP ARGS...: molt eval ARGS on NP oversubscribed ranks (as root too)
ranks() {
    local np=$1
    shift
    local lsan=()
    [ -n "${MOLT_SANITIZED:-}" ] &&
        lsan=(env "LSAN_OPTIONS=suppressions=$src/tests/harness/lsan_mpi.supp:print_suppressions=0")
    run env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
        OMPI_MCA_mpi_yield_when_idle=1 "${lsan[@]}" \
        "$MOLT_MPIEXEC" --oversubscribe -np "$np" "$molt" eval "$@"
}

eval_fixture
python3 - "$tmp" <<'PY'
import json, sys, random
tmp = sys.argv[1]
rng = random.Random(3)
words = "zero one two three four five six seven eight nine".split()
with open(f"{tmp}/choice.jsonl", "w") as f:
    for i in range(9):
        ds = [rng.randrange(10) for _ in range(3)]
        ctx = "Spell out the digits: " + " ".join(map(str, ds)) + "\nAnswer:"
        right = " " + " ".join(words[d] for d in ds)
        wrong = [" " + " ".join(words[(d + k) % 10] for d in ds) for k in (1, 2)]
        f.write(json.dumps({"prompt": ctx, "choices": [wrong[0], right, wrong[1]],
                            "answer": 1, "id": f"c{i}"}) + "\n")
PY
cat >"$tmp/suite.yaml" <<YAML
model: $tmp/base
base: true
adapters: {A: $tmp/run/adapter, B: $tmp/run2/adapter.h5}
resamples: 300
datasets:
  digits_loss: {path: $tmp/eval.jsonl, task: loss}
  digits_choice: {path: $tmp/choice.jsonl, task: choice}
  digits_gen: {path: $tmp/eval.jsonl, task: generate, metrics: [exact_match, token_f1],
               max_tokens: 6}
YAML

run "$molt" eval --config "$tmp/suite.yaml" --out "$tmp/one" --quiet
same "one process" "$rc" 0
one_out=$out

# ---- data parallel: the same files --------------------------------------------------------
ranks 2 --config "$tmp/suite.yaml" --out "$tmp/dp" --quiet
same "2 ranks: exit" "$rc" 0
for f in report.md report.json samples.jsonl; do
    cmp -s "$tmp/one/$f" "$tmp/dp/$f" && ok "2 ranks: $f equals one process's" \
        || bad "2 ranks: $f differs from one process's"
done
same "2 ranks: the same token losses" "$(echo "$out" | grep 'token loss')" \
    "$(echo "$one_out" | grep 'token loss')"
has "2 ranks: rank 0 counts every example" "$out" "molt eval: 33 examples x 3 systems"
[ "$(echo "$out" | grep -c '^molt eval: 33 examples')" = 1 ] && ok "2 ranks: one summary" \
    || bad "2 ranks: the summary printed $(echo "$out" | grep -c '^molt eval: 33 examples') times"

# ---- experts split over the ranks ----------------------------------------------------------
# compare DIR: the same samples as one process's, losses within 1e-6 relative
compare() {
    python3 - "$tmp/one/samples.jsonl" "$1/samples.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1])]
b = [json.loads(l) for l in open(sys.argv[2])]
assert len(a) == len(b) == 99, (len(a), len(b))
worst = 0.0
for x, y in zip(a, b):
    for k in ("dataset", "id", "system", "prediction", "target"):
        assert x[k] == y[k], (k, x, y)
    for k, v in x["metrics"].items():
        if k == "loss":
            continue
        assert v == y["metrics"][k], (k, x, y)
    if x["loss"] is not None:
        worst = max(worst, abs(x["loss"] - y["loss"]) / abs(x["loss"]))
assert worst <= 1e-6, worst
print(f"{worst:.2g}")
PY
}
for layout in "2 2" "4 2" "4 4"; do
    set -- $layout
    ranks "$1" --config "$tmp/suite.yaml" --out "$tmp/ep$1$2" --quiet --set parallel.expert="$2"
    same "$1 ranks, experts over $2: exit" "$rc" 0
    worst=$(compare "$tmp/ep$1$2" 2>"$tmp/why") && ok "$1 ranks, experts over $2: the same \
samples, losses within $worst relative" || bad "$1 ranks, experts over $2: $(tail -n 2 "$tmp/why")"
    python3 - "$one_out" "$out" <<'PY' && ok "$1 ranks, experts over $2: token losses within 1e-6" \
        || bad "$1 ranks, experts over $2: token losses differ"
import sys
def losses(text):
    return [float(l.split()[4]) for l in text.splitlines() if " token loss " in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert len(a) == len(b) == 3 and all(abs(x - y) <= 1e-6 * abs(x) for x, y in zip(a, b)), (a, b)
PY
done

# ---- layouts that cannot work --------------------------------------------------------------
ranks 2 --config "$tmp/suite.yaml" --quiet --set parallel.expert=3
[ "$rc" -ne 0 ] && ok "parallel.expert=3 on 2 ranks fails" || bad "parallel.expert=3: exit 0"
has_err "parallel.expert=3: message" "parallel.expert = 3 does not divide the 2 ranks"
ranks 2 --config "$tmp/suite.yaml" --quiet --set parallel.expert=2 --set parallel.data=2
[ "$rc" -ne 0 ] && ok "2 x 2 on 2 ranks fails" || bad "2 x 2 on 2 ranks: exit 0"
has_err "2 x 2 on 2 ranks: message" "parallel.data x parallel.expert = 2 x 2 = 4, but the job has 2"
ranks 2 --config "$tmp/suite.yaml" --quiet --set parallel.expert=x
[ "$rc" -ne 0 ] && ok "parallel.expert=x fails" || bad "parallel.expert=x: exit 0"
has_err "parallel.expert=x: names the key" "parallel.expert"
cli_done
