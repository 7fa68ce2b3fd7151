# tests/harness/cli_lib.sh: the set-up and check helpers the CLI tests (tests/cli_*.sh)
# share. Each sources it first, with its own arguments:
#     . "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
# It is not a test itself, which is why it lives here: CMakeLists.txt registers every
# tests/cli_*.sh as one (run from the build directory as `bash SCRIPT MOLT_BINARY`, with
# MOLT_SOURCE_DIR in the environment).
#
# Sourcing it turns on `set -u` and defines
#   molt    $1, the molt binary under test (required)
#   src     the source tree: $MOLT_SOURCE_DIR, else the tree that holds this file; exported
#           as MOLT_SOURCE_DIR, where the binary looks for presets and tokenizers
#   tmp     a fresh temporary directory, removed when the script exits
#   passed, failed   the counts of checks so far
# A script reports each check with ok or bad (or a helper built on them), stops with fail
# where the remaining checks would mean nothing, and ends with cli_done, which makes the exit
# status the verdict: 0 when every check passed, 1 otherwise.

set -u
molt=${1:?usage: $0 MOLT_BINARY}
src=${MOLT_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
export MOLT_SOURCE_DIR=$src
tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

# ok NAME, bad NAME: one check passed, one failed.
ok() { echo "ok: $1"; passed=$((passed + 1)); }
bad() { echo "FAIL: $1"; failed=$((failed + 1)); }
# cli_done: prints the counts and exits with the verdict. The status is 0 or 1, never the
# count itself (77 would read as a skip, 256 as a pass).
cli_done() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ] && exit 0
    exit 1
}
# fail MESSAGE...: a failed check after which nothing else can be checked: reports and exits.
fail() { bad "$*"; cli_done; }

# same NAME GOT WANT
same() { if [ "$2" == "$3" ]; then ok "$1"; else bad "$1: got '$2', expected '$3'"; fi; }
# has NAME TEXT WANT: TEXT contains WANT
has() { if [[ "$2" == *"$3"* ]]; then ok "$1"; else bad "$1: '$2' lacks '$3'"; fi; }

# run CMD...: runs CMD and records its stdout, stderr and exit status in out, err and rc
run() {
    "$@" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    out=$(cat "$tmp/out")
    err=$(cat "$tmp/err")
}
# has_err NAME WANT, has_out NAME WANT: the stderr, the stdout of the last run contains WANT
has_err() { if [[ "$err" == *"$2"* ]]; then ok "$1"; else bad "$1: stderr '$err' lacks '$2'"; fi; }
has_out() { if [[ "$out" == *"$2"* ]]; then ok "$1"; else bad "$1: stdout '$out' lacks '$2'"; fi; }

# header FILE: the JSON header of a safetensors file (8-byte little-endian length, then it)
header() {
    local n
    n=$(od -An -t u8 -N 8 "$1" | tr -d ' ')
    dd if="$1" bs=1 skip=8 count="$n" 2>/dev/null
}
# metrics_fields FILE: the deterministic fields of a metrics.jsonl (tokens_per_s and
# elapsed_s are wall-clock)
metrics_fields() { sed -E 's/,"tokens_per_s":[^,}]*//; s/,"elapsed_s":[^,}]*//' "$1"; }

# eval_fixture: what the `molt eval` tests evaluate: the tiny preset in $tmp/base, the first
# 40 digits-train and 12 digits-eval records in $tmp/train.jsonl and $tmp/eval.jsonl, and two
# adapters trained 8 steps from $tmp/c.yaml: A ($tmp/run; r=4 on q_a, o and the routed
# experts) and B ($tmp/run2; r=2 on kv_b and o, another seed). Each step is a check.
eval_fixture() {
    run "$molt" init-model --preset tiny --seed 1 --out "$tmp/base"
    same "init-model" "$rc" 0
    head -n 40 "$src/configs/data/digits-train.jsonl" >"$tmp/train.jsonl"
    head -n 12 "$src/configs/data/digits-eval.jsonl" >"$tmp/eval.jsonl"
    cat >"$tmp/c.yaml" <<YAML
model: {path: $tmp/base}
adapter: {r: 4, alpha: 8, targets: [q_a_proj, o_proj, experts.gate_up_proj, experts.down_proj]}
data: {train: $tmp/train.jsonl, eval: $tmp/eval.jsonl, format: alpaca, max_seq_len: 64}
train: {steps: 8, seed: 2}
optim: {lr: 0.02}
output_dir: $tmp/run
YAML
    run "$molt" train --config "$tmp/c.yaml" --quiet
    same "train adapter A" "$rc" 0
    run "$molt" train --config "$tmp/c.yaml" --quiet --set output_dir="$tmp/run2" \
        --set train.seed=5 --set adapter.r=2 --set adapter.targets=kv_b_proj,o_proj
    same "train adapter B (another rank and targets)" "$rc" 0
}
