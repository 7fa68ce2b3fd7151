#!/usr/bin/env bash
# tests/cli_train.sh: `molt train` as a user runs it on the tiny preset: --help lists the
# keys; a short QLoRA run (NF4 base) writes the resolved config, metrics with the learning
# rates of the configured schedule (constant with warmup, recomputed here from its
# definition), checkpoints and the adapter in both formats; --eval-only gives the base loss
# and a different loss with the trained adapter; Ctrl-C (SIGINT) writes a checkpoint and
# exits 130, and --resume auto finishes the run. $1: the molt binary. Exit status = verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

run "$molt" train --help
same "--help" "$rc" 0
has "--help lists keys" "$out" "schedule.warmup_steps"
run "$molt" train
same "no --config" "$rc" 2

run "$molt" init-model --preset tiny --seed 1 --out "$tmp/base"
same "init-model" "$rc" 0
head -n 40 "$src/configs/data/quickstart-train.jsonl" >"$tmp/train.jsonl"
head -n 6 "$src/configs/data/quickstart-eval.jsonl" >"$tmp/eval.jsonl"
cat >"$tmp/c.yaml" <<YAML
model: {path: $tmp/base, quant: nf4}
adapter: {r: 4, alpha: 8, targets: [q_a_proj, o_proj, shared_experts.down_proj]}
data: {train: $tmp/train.jsonl, eval: $tmp/eval.jsonl, format: alpaca, max_seq_len: 48}
train: {steps: 6, seed: 2}
optim: {lr: 0.01}
schedule: {kind: constant, warmup_steps: 2}
output_dir: $tmp/run
YAML
run "$molt" train --config "$tmp/c.yaml"
same "NF4 training run" "$rc" 0
same "6 metrics rows" "$(wc -l <"$tmp/run/metrics.jsonl")" 6
lrs=$(sed -E 's/.*"lr":([^,]*).*/\1/' "$tmp/run/metrics.jsonl" | tr '\n' ' ')
want=$(awk 'BEGIN { for (s = 0; s < 6; s++) printf "%.17g ", 0.01 * (s < 2 ? s / 2 : 1) }')
same "constant-with-warmup learning rates" "$lrs" "$want"
has "resolved config" "$(cat "$tmp/run/config.resolved.yaml")" 'quant: "nf4"'
[ -f "$tmp/run/checkpoints/step-6.h5" ] && ok "final checkpoint" || bad "no final checkpoint"
[ -s "$tmp/run/adapter/adapter_config.json" ] && ok "PEFT adapter" || bad "no PEFT adapter"
[ -s "$tmp/run/adapter.h5" ] && ok "molt adapter" || bad "no molt adapter"
has "eval at the end" "$(tail -n 1 "$tmp/run/metrics.jsonl")" '"eval_loss":'
run "$molt" report --run "$tmp/run"
same "molt report reads the run's metrics.jsonl" "$rc:$out" "0:$tmp/run/report.html"
has "report draws the eval loss" "$(cat "$tmp/run/report.html")" "eval loss"

run "$molt" train --config "$tmp/c.yaml" --eval-only --quiet
same "--eval-only (base)" "$rc" 0
base=$(echo "$out" | awk '{print $2}')
run "$molt" train --config "$tmp/c.yaml" --eval-only --quiet --adapter "$tmp/run/adapter"
same "--eval-only (adapter)" "$rc" 0
tuned=$(echo "$out" | awk '{print $2}')
[ -n "$base" ] && [ "$base" != "$tuned" ] && ok "adapter changes the eval loss ($base -> $tuned)" \
    || bad "eval losses: base '$base', adapter '$tuned'"

# Ctrl-C: a checkpoint, exit 130, then --resume auto completes
"$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/int" --set train.steps=400 \
    --set model.quant=none >"$tmp/iout" 2>"$tmp/ierr" &
pid=$!
for _ in $(seq 600); do
    [ "$(cat "$tmp/int/metrics.jsonl" 2>/dev/null | wc -l)" -ge 2 ] && break
    sleep 0.1
done
kill -INT $pid
wait $pid
same "SIGINT exit status" "$?" 130
has "SIGINT message" "$(cat "$tmp/ierr")" "interrupted by Ctrl-C (SIGINT)"
has "SIGINT message: the checkpoint" "$(cat "$tmp/ierr")" ": checkpoint of step"
n=$(ls "$tmp/int/checkpoints" | wc -l)
same "one checkpoint after SIGINT" "$n" 1
run "$molt" train --config "$tmp/c.yaml" --set output_dir="$tmp/int" --set train.steps=400 \
    --set model.quant=none --set train.steps=8 --resume auto
same "resume after SIGINT" "$rc" 0
cli_done
