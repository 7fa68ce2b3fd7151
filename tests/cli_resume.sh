#!/usr/bin/env bash
# tests/cli_resume.sh: exact resume of `molt train` on the tiny preset: 20 steps without a
# break, against 10 steps, a SIGKILL right after the step-10 checkpoint is on disk, and
# --resume auto for the rest: the metrics (loss, lr, grad_norm, eval_loss at full precision)
# and the final adapter files must be identical. Then a kill in the middle of writing the
# step-15 checkpoint with the step-10 file corrupted as well: resume must skip both and
# continue from step 5 to the same result. Also: a fresh run refuses a directory holding
# checkpoints, a checkpoint of another base model is refused unless --force. $1: the molt
# binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

run "$molt" init-model --preset tiny --seed 1 --out "$tmp/base"
same "init-model" "$rc" 0
run "$molt" init-model --preset tiny --seed 2 --out "$tmp/other"
same "init-model (another base)" "$rc" 0
head -n 60 "$src/configs/data/digits-train.jsonl" >"$tmp/train.jsonl"
head -n 8 "$src/configs/data/digits-eval.jsonl" >"$tmp/eval.jsonl"
cat >"$tmp/c.yaml" <<YAML
model:
  path: $tmp/base
adapter:
  r: 4
  alpha: 8
  targets: [q_a_proj, kv_b_proj, o_proj, shared_experts.up_proj, gate_proj]
data:
  train: $tmp/train.jsonl
  eval: [$tmp/eval.jsonl]
  format: alpaca
  max_seq_len: 48
train:
  batch_size: 1
  grad_accum: 2
  steps: 20
  seed: 3
optim:
  lr: 0.01
  weight_decay: 0.01
  max_grad_norm: 0.5
schedule:
  kind: cosine
  warmup_steps: 3
checkpoint:
  every: 5
  keep_last: 3
eval:
  every: 10
YAML

run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/a"
same "uninterrupted run" "$rc" 0
same "20 metrics rows" "$(wc -l <"$tmp/a/metrics.jsonl")" 20
same "eval_loss at steps 10 and 20" "$(grep -c eval_loss "$tmp/a/metrics.jsonl")" 2
for f in config.resolved.yaml adapter.h5 adapter/adapter_config.json \
         adapter/adapter_model.safetensors checkpoints/step-20.h5; do
    [ -s "$tmp/a/$f" ] && ok "run has $f" || bad "run lacks $f"
done
same "keep_last 3" "$(ls "$tmp/a/checkpoints" | tr '\n' ' ')" "step-10.h5 step-15.h5 step-20.h5 "
first=$(sed -n 1p "$tmp/a/metrics.jsonl")
last=$(sed -n 20p "$tmp/a/metrics.jsonl")
has "metrics fields" "$first" '{"step":1,"loss":'
has "metrics lr, grad_norm, tokens" "$first" '"lr":0,"grad_norm":'
has "metrics eval_loss" "$last" '"eval_loss":'

# killed right after the step-10 checkpoint, then resumed
MOLT_TEST_KILL_AT_STEP=10 run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/b"
same "SIGKILL at step 10" "$rc" 137
same "10 rows before the kill" "$(wc -l <"$tmp/b/metrics.jsonl")" 10
run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/b"
same "fresh run refuses a directory with checkpoints" "$rc" 1
has "refusal names --resume" "$err" "--resume auto"
run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/b" --resume auto
same "resume" "$rc" 0
has "resumed from step 10" "$err" "step-10.h5 (step 10)"
same "resumed metrics identical" "$(metrics_fields "$tmp/b/metrics.jsonl")" \
    "$(metrics_fields "$tmp/a/metrics.jsonl")"
cmp -s "$tmp/a/adapter.h5" "$tmp/b/adapter.h5" && ok "adapter bit-identical" \
    || bad "adapter differs after resume"
cmp -s "$tmp/a/adapter/adapter_model.safetensors" "$tmp/b/adapter/adapter_model.safetensors" \
    && ok "PEFT adapter bit-identical" || bad "PEFT adapter differs after resume"

# killed while writing step 15, and the step-10 file corrupted: back to step 5
MOLT_TEST_KILL_IN_CKPT_WRITE=15 run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/c"
same "SIGKILL in checkpoint write" "$rc" 137
[ -f "$tmp/c/checkpoints/step-15.h5.tmp" ] && ok "partial .tmp left" || bad "no partial .tmp"
[ -f "$tmp/c/checkpoints/step-15.h5" ] && bad "step-15.h5 exists" || ok "no step-15.h5"
f10="$tmp/c/checkpoints/step-10.h5"
head -c $(( $(stat -c %s "$f10") / 2 )) "$f10" >"$tmp/half" && mv "$tmp/half" "$f10"
run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/c" --resume auto
same "resume past a corrupt checkpoint" "$rc" 0
has "corrupt checkpoint reported" "$err" "skipping checkpoint $f10"
has "resumed from step 5" "$err" "step-5.h5 (step 5)"
same "metrics identical after the fallback" "$(metrics_fields "$tmp/c/metrics.jsonl")" \
    "$(metrics_fields "$tmp/a/metrics.jsonl")"
cmp -s "$tmp/a/adapter.h5" "$tmp/c/adapter.h5" && ok "adapter bit-identical (2)" \
    || bad "adapter differs after the fallback"

# another base model
run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/a" --set model.path="$tmp/other" \
    --resume auto
same "another base refused" "$rc" 1
has "refusal names the hash" "$err" "weights index hash differs"
run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/a" --set model.path="$tmp/other" \
    --resume auto --force
same "another base with --force" "$rc" 0
has "--force warns" "$err" "warning (--force)"

# config errors name the key and where it came from
printf 'model:\n  path: x\n  colour: red\n' >"$tmp/bad.yaml"
run "$molt" train --config "$tmp/bad.yaml"
same "unknown key" "$rc" 2
has "unknown key message" "$err" "config $tmp/bad.yaml:3: unknown key 'model.colour'"
run "$molt" train --config "$tmp/c.yaml" --set optim.lr=fast --set output_dir="$tmp/x"
same "bad --set" "$rc" 2
has "bad --set message" "$err" "config --set optim.lr=fast: key 'optim.lr': expected a non-negative number, got 'fast'"
cli_done
