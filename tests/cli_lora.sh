#!/usr/bin/env bash
# tests/cli_lora.sh: `molt export` and `molt merge` as a user runs them: a fresh adapter
# from a spec to a PEFT directory, PEFT directory to a molt adapter file and back, merging
# either into the tiny model in f32 and bf16 (the merged files' values are checked in
# test_lora.c's merge tests; here: the files, the parameter table, determinism), and the
# message and exit status of bad invocations. $1: the molt binary. The exit status is the
# verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

run "$molt" init-model --preset tiny --seed 1 --out "$tmp/m" --no-tokenizer
same "init-model" "$rc" 0
spec="r=4,alpha=8,targets=q_a_proj+o_proj+shared_experts.up_proj"

run "$molt" export --model "$tmp/m" --spec "$spec" --b-std 0.1 --out "$tmp/peft"
same "export --spec" "$rc" 0
has "parameter table" "$out" "attn"
for f in adapter_config.json adapter_model.safetensors; do
    [ -s "$tmp/peft/$f" ] && ok "peft has $f" || bad "peft lacks $f"
done
run "$molt" export --model "$tmp/m" --adapter "$tmp/peft" --format molt --out "$tmp/a.h5"
same "peft -> molt file" "$rc" 0
same "the molt file is HDF5" "$(head -c 4 "$tmp/a.h5" | tail -c 3)" "HDF"
run "$molt" export --model "$tmp/m" --adapter "$tmp/a.h5" --out "$tmp/peft2"
same "molt file -> peft" "$rc" 0
cmp -s "$tmp/peft/adapter_model.safetensors" "$tmp/peft2/adapter_model.safetensors" &&
    ok "peft -> molt -> peft keeps the tensors" || bad "tensors changed through the molt file"
cmp -s "$tmp/peft/adapter_config.json" "$tmp/peft2/adapter_config.json" &&
    ok "and the config" || bad "adapter_config.json changed through the molt file"

run "$molt" merge --model "$tmp/m" --adapter "$tmp/peft" --out "$tmp/merged"
same "merge f32" "$rc" 0
[ -s "$tmp/merged/model.safetensors" ] && [ -s "$tmp/merged/config.json" ] &&
    ok "merged files" || bad "merged files missing"
run "$molt" merge --model "$tmp/m" --adapter "$tmp/a.h5" --out "$tmp/merged2"
cmp -s "$tmp/merged/model.safetensors" "$tmp/merged2/model.safetensors" &&
    ok "merge from either adapter form is identical" || bad "merges differ"
cmp -s "$tmp/m/model.safetensors" "$tmp/merged/model.safetensors" &&
    bad "merge left the weights unchanged" || ok "merge changed the weights"
run "$molt" merge --model "$tmp/m" --adapter "$tmp/peft" --out "$tmp/mbf" --dtype bf16
same "merge bf16" "$rc" 0
has "bf16 config" "$(cat "$tmp/mbf/config.json")" '"dtype": "bfloat16"'
run "$molt" merge --model "$tmp/merged" --adapter "$tmp/peft" --out "$tmp/again"
same "a merged model loads again" "$rc" 0

run "$molt" merge --model "$tmp/m" --adapter "$tmp/peft" --out "$tmp/x" --dtype fp16
same "bad dtype" "$rc" 2
has "bad dtype message" "$err" "--dtype 'fp16' is not one of f32, bf16"
run "$molt" export --model "$tmp/m" --out "$tmp/x"
same "export without a source" "$rc" 2
run "$molt" export --model "$tmp/m" --spec "r=4,targets=q_proj" --out "$tmp/x"
same "no-match target" "$rc" 1
has "no-match message" "$err" "target 'q_proj' matches no module of the model"
run "$molt" export --model "$tmp/m" --adapter "$tmp/nowhere" --out "$tmp/x"
same "missing adapter" "$rc" 1
has "missing adapter message" "$err" "no such file or directory"
echo "r=4,targets=q_a_proj" >"$tmp/notes.txt"
run "$molt" merge --model "$tmp/m" --adapter "$tmp/notes.txt" --out "$tmp/x"
same "a text file as adapter" "$rc" 1
has "text file message" "$err" "adapter $tmp/notes.txt: not an HDF5 file (expected a PEFT \
directory holding adapter_config.json, a molt adapter file (HDF5) or a training checkpoint)"
run "$molt" export --checkpoint c.h5 --format peft --out "$tmp/x"
same "checkpoint not yet readable" "$rc" 1
run "$molt" merge --frobnicate
same "unknown option" "$rc" 2
cli_done
