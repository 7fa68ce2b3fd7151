#!/usr/bin/env bash
# tests/cli_eval_split.sh: `molt train` with data.eval_split: --help documents the key; a
# 2-step run on the tiny preset holds out part of the digit-spelling training data and logs an
# eval_loss; --eval-only evaluates on the held-out part; the split together with data.eval,
# and a split that leaves one side empty, fail with their messages. $1: the molt binary.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

run "$molt" train --help
has "--help lists data.eval_split" "$out" "data.eval_split"

run "$molt" init-model --preset tiny --seed 1 --out "$tmp/base"
same "init-model" "$rc" 0
head -n 40 "$src/configs/data/digits-train.jsonl" >"$tmp/train.jsonl"
cat >"$tmp/c.yaml" <<YAML
model: {path: $tmp/base}
adapter: {r: 4, alpha: 8, targets: [q_a_proj, o_proj]}
data: {train: $tmp/train.jsonl, eval: $src/configs/data/digits-eval.jsonl, format: alpaca, max_seq_len: 48}
train: {steps: 2, seed: 3}
optim: {lr: 0.01}
output_dir: $tmp/run
YAML
run "$molt" train --config "$tmp/c.yaml" --quiet --set data.eval= --set data.eval_split=0.1
same "training with a 0.1 split" "$rc" 0
[ "$rc" == 0 ] || echo "$err"
same "2 metrics rows" "$(wc -l <"$tmp/run/metrics.jsonl")" 2
has "eval_loss logged" "$(tail -n 1 "$tmp/run/metrics.jsonl")" '"eval_loss":'
has "resolved config" "$(cat "$tmp/run/config.resolved.yaml")" "eval_split: 0.10000000000000001"

run "$molt" train --config "$tmp/c.yaml" --eval-only --quiet --set data.eval= \
    --set data.eval_split=0.1
same "--eval-only on the split" "$rc" 0
has "--eval-only prints the loss" "$out" "eval_loss "

run "$molt" train --config "$tmp/c.yaml" --quiet --set data.eval_split=0.1
same "data.eval with data.eval_split (config error)" "$rc" 2
has "both set: message" "$err" \
    "keys 'data.eval' and 'data.eval_split' exclude each other (set 'data.eval=' to clear the files)"

head -n 1 "$tmp/train.jsonl" >"$tmp/one.jsonl"
run "$molt" train --config "$tmp/c.yaml" --quiet --set data.eval= --set data.eval_split=0.4 \
    --set data.train="$tmp/one.jsonl" --set output_dir="$tmp/one"
same "split of one record" "$rc" 1
has "empty side: message" "$err" "$tmp/one.jsonl: no usable example"
has "empty side: names the split" "$err" "the 0.4 hold-out split"

cli_done
