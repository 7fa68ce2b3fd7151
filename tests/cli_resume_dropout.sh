#!/usr/bin/env bash
# tests/cli_resume_dropout.sh: exact resume of `molt train` with LoRA dropout on (tiny
# preset): the dropout stream is part of the checkpoint, so 6 steps without a break equal 3
# steps, a SIGKILL right after the step-3 checkpoint, and --resume auto for the rest (same
# metrics at full precision, bit-identical adapter). Also: dropout changes the training loss
# against p = 0 (from step 2 on; at step 1 B = 0 hides the mask). $1: the molt binary.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

differ() { if [ "$2" != "$3" ]; then ok "$1"; else bad "$1: both '$2'"; fi; }
loss_at() { sed -n "$1"p "$2" | sed -E 's/.*"loss":([^,}]*).*/\1/'; }

run "$molt" init-model --preset tiny --seed 1 --out "$tmp/base"
same "init-model" "$rc" 0
head -n 24 "$src/configs/data/digits-train.jsonl" >"$tmp/train.jsonl"
head -n 4 "$src/configs/data/digits-eval.jsonl" >"$tmp/eval.jsonl"
cat >"$tmp/c.yaml" <<YAML
model:
  path: $tmp/base
adapter:
  r: 4
  alpha: 8
  dropout: 0.3
  targets: [q_a_proj, kv_b_proj, o_proj, shared_experts.up_proj, gate_proj]
data:
  train: $tmp/train.jsonl
  eval: [$tmp/eval.jsonl]
  format: alpaca
  max_seq_len: 48
train:
  batch_size: 1
  grad_accum: 2
  steps: 6
  seed: 3
optim:
  lr: 0.01
schedule:
  kind: constant
checkpoint:
  every: 3
eval:
  every: 6
YAML

run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/a"
same "run with dropout" "$rc" 0
[ "$rc" == 0 ] || echo "$err"
same "6 metrics rows" "$(wc -l <"$tmp/a/metrics.jsonl" 2>/dev/null)" 6
# step 1 starts from B = 0, where the mask cannot matter; step 2 differs (constant lr, so
# the shorter run has the same schedule)
run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/z2" --set adapter.dropout=0 \
    --set train.steps=2
same "run without dropout" "$rc" 0
differ "dropout changes the step-2 loss" "$(loss_at 2 "$tmp/a/metrics.jsonl")" \
    "$(loss_at 2 "$tmp/z2/metrics.jsonl")"
same "step-1 loss unchanged (B = 0)" "$(loss_at 1 "$tmp/a/metrics.jsonl")" \
    "$(loss_at 1 "$tmp/z2/metrics.jsonl")"

MOLT_TEST_KILL_AT_STEP=3 run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/b"
same "SIGKILL at step 3" "$rc" 137
run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/b" --resume auto
same "resume" "$rc" 0
[[ "$err" == *"step-3.h5 (step 3)"* ]] && ok "resumed from step 3" || bad "resume point: $err"
same "resumed metrics identical" "$(metrics_fields "$tmp/b/metrics.jsonl")" \
    "$(metrics_fields "$tmp/a/metrics.jsonl")"
cmp -s "$tmp/a/adapter.h5" "$tmp/b/adapter.h5" && ok "adapter bit-identical" \
    || bad "adapter differs after resume"
cli_done
