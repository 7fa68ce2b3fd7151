#!/usr/bin/env bash
# tests/cli_ulimit.sh: under a limited address space (ulimit -v 550000, about 537 MiB) every
# command either works or stops with a clear message: none hangs (OpenBLAS's start-up used
# to spin forever at 100% CPU there, even for `molt --version`), none dies of a signal.
# Each command runs under `timeout`; the files it needs are made first, without the limit.
# Skipped under the sanitizers (AddressSanitizer cannot start under such a limit).
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
[ -n "${MOLT_SANITIZED:-}" ] && { echo "skipped: sanitizer build"; exit 77; }

run "$molt" init-model --preset tiny --seed 1 --out "$tmp/base"
same "init-model (no limit)" "$rc" 0
head -n 8 "$src/configs/data/digits-train.jsonl" >"$tmp/train.jsonl"
printf '1 22 333 4444\n' >"$tmp/tokens"
cat >"$tmp/c.yaml" <<YAML
model: {path: $tmp/base}
adapter: {r: 2, targets: [q_a_proj]}
data: {train: $tmp/train.jsonl, format: alpaca, max_seq_len: 48}
train: {steps: 2}
output_dir: $tmp/run
YAML

LIMIT_KB=550000
# limited NAME CMD...: CMD under the limit works (0) or fails with a message (1 or 2)
limited() {
    local name=$1
    shift
    ( ulimit -v "$LIMIT_KB" && exec timeout 120 "$@" ) >"$tmp/out" 2>"$tmp/err"
    rc=$?
    local msg
    msg=$(grep -v '^$' "$tmp/err" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        ok "$name works"
    elif [ "$rc" -eq 124 ]; then
        bad "$name hangs under ulimit -v $LIMIT_KB"
    elif [ "$rc" -gt 2 ]; then
        bad "$name died (status $rc): $msg"
    elif [[ "$msg" == *"molt"*": "* ]]; then
        ok "$name refuses clearly: $msg"
    else
        bad "$name failed without a message (status $rc)"
    fi
}

limited "--version" "$molt" --version
has "--version output" "$(cat "$tmp/out")" "molt "
limited "help" "$molt" help
limited "info" "$molt" info
limited "tokenize" "$molt" tokenize --tokenizer "$tmp/base/tekken.json" --text "hello"
limited "data inspect" "$molt" data inspect --data "$tmp/train.jsonl" \
    --tokenizer "$tmp/base/tekken.json"
limited "init-model" "$molt" init-model --preset tiny --out "$tmp/m2"
limited "forward" "$molt" forward --model "$tmp/base" --tokens "$tmp/tokens" \
    --out "$tmp/l.safetensors"
limited "generate" "$molt" generate --model "$tmp/base" --prompt hi --max-tokens 2
limited "quantize" "$molt" quantize --model "$tmp/base" --quant nf4 --out "$tmp/q"
limited "train" "$molt" train --config "$tmp/c.yaml" --quiet
limited "export --spec" "$molt" export --model "$tmp/base" --spec r=2,targets=o_proj \
    --out "$tmp/peft"
limited "bench ckpt" "$molt" bench ckpt --quick

cli_done
