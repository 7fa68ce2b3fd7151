#!/usr/bin/env bash
# tests/cli_export_ckpt.sh: `molt export --checkpoint`: 3 training steps on the tiny preset
# (LoRA with dropout, routed experts adapted too), then the adapter of the last checkpoint
# exported as a PEFT directory and as a molt file must equal, byte for byte, what training
# wrote to output_dir/adapter/ and output_dir/adapter.h5. --model replaces the
# model named in the checkpoint; a missing, a truncated and a non-checkpoint file are
# refused with messages naming the file; the usual `molt export` forms still work.
# $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

same_file() { cmp -s "$2" "$3" && ok "$1" || bad "$1: $2 and $3 differ"; }

run "$molt" init-model --preset tiny --seed 1 --out "$tmp/base"
same "init-model" "$rc" 0
cp -r "$tmp/base" "$tmp/base2"
head -n 12 "$src/configs/data/digits-train.jsonl" >"$tmp/train.jsonl"
cat >"$tmp/c.yaml" <<YAML
model: {path: $tmp/base}
adapter: {r: 4, alpha: 8, dropout: 0.1, targets: [q_a_proj, o_proj, shared_experts.up_proj, experts]}
data: {train: $tmp/train.jsonl, format: alpaca, max_seq_len: 48}
train: {steps: 3, seed: 2}
optim: {lr: 0.01}
output_dir: $tmp/run
YAML
run "$molt" train --config "$tmp/c.yaml" --quiet
same "3-step training run" "$rc" 0
ck="$tmp/run/checkpoints/step-3.h5"
[ -f "$ck" ] && ok "last checkpoint" || bad "no $ck"

run "$molt" export --checkpoint "$ck" --out "$tmp/peft"
same "export --checkpoint (peft)" "$rc" 0
has "names the step" "$out" "(step 3)"
same_file "PEFT tensors equal the trained adapter" "$tmp/peft/adapter_model.safetensors" \
    "$tmp/run/adapter/adapter_model.safetensors"
same_file "PEFT config equals the trained one" "$tmp/peft/adapter_config.json" \
    "$tmp/run/adapter/adapter_config.json"
run "$molt" export --checkpoint "$ck" --format molt --out "$tmp/a.h5"
same "export --checkpoint --format molt" "$rc" 0
same_file "molt file equals the trained one" "$tmp/a.h5" "$tmp/run/adapter.h5"
run "$molt" export --checkpoint "$ck" --model "$tmp/base2" --out "$tmp/peft2"
same "export --checkpoint --model" "$rc" 0
same_file "same tensors with --model" "$tmp/peft2/adapter_model.safetensors" \
    "$tmp/run/adapter/adapter_model.safetensors"
has "--model is the base name" "$(cat "$tmp/peft2/adapter_config.json")" "$tmp/base2"

# errors
run "$molt" export --checkpoint "$tmp/none.h5" --out "$tmp/x"
same "missing checkpoint" "$rc" 1
has "missing checkpoint names the file" "$err" "$tmp/none.h5"
head -c $(( $(stat -c %s "$ck") / 2 )) "$ck" >"$tmp/half.h5"
run "$molt" export --checkpoint "$tmp/half.h5" --out "$tmp/x"
same "truncated checkpoint" "$rc" 1
has "truncated checkpoint names the file" "$err" "$tmp/half.h5"
[ -e "$tmp/x" ] && bad "output written for a bad checkpoint" || ok "nothing written"
run "$molt" export --checkpoint "$tmp/train.jsonl" --out "$tmp/x"
same "not a checkpoint" "$rc" 1
has "not a checkpoint names the file" "$err" "$tmp/train.jsonl"
run "$molt" export --checkpoint "$ck"
same "no --out" "$rc" 2
run "$molt" export --checkpoint "$ck" --out "$tmp/x" --spec r=2
same "--spec with --checkpoint" "$rc" 2
has "--spec refused" "$err" "'--spec' does not go with --checkpoint"

# the other forms still go to the adapter exporter
run "$molt" export --model "$tmp/base" --adapter "$tmp/run/adapter.h5" --out "$tmp/p3"
same "export --adapter" "$rc" 0
same_file "adapter file to PEFT" "$tmp/p3/adapter_model.safetensors" \
    "$tmp/run/adapter/adapter_model.safetensors"
run "$molt" export --help
same "--help" "$rc" 0
has "--help shows --checkpoint" "$out" "--checkpoint CKPT"
has "--help shows --adapter" "$out" "--adapter SRC"
cli_done
