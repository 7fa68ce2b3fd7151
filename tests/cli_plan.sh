#!/usr/bin/env bash
# tests/cli_plan.sh: `molt plan` from the command line: --help, the parts it prints, the
# verdict and exit status against --gpu-mib (Mistral Small 4, NF4 base, LoRA r=16 on attention
# and experts, seq 4096 with activation checkpointing: does not fit one 80 GB device, fits 2
# and 8), the expert share falling as 1/E, and bad input (missing options, a layout that does
# not split, an unknown model, a bad quant or adapter spec). The numbers themselves are
# checked against measured runs by tests/test_plan.c. $1: the molt binary.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

ad="r=16,alpha=32,targets=q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+experts"
run "$molt" plan --help
same "help exit" "$rc" 0
has_out "help names --act-ckpt" "--act-ckpt"
has_out "help names --gpu-mib" "--gpu-mib"
run "$molt" help plan
same "molt help plan" "$rc" 0

plan() { run "$molt" plan --model mistral-small-4 --quant nf4 --adapter "$ad" --seq-len 4096 \
             --gpu-mib 81920 --act-ckpt "$@"; }
plan --ranks 1 --batch 1
same "1 x 80 GB: does not fit" "$rc" 1
has_out "verdict no" "fits: no"
for part in "base weights" "routed experts" "adapter (LoRA A, B)" "gradients" \
            "optimizer state" "activations, no checkpointing" "activations, checkpointing" \
            "communication buffers" "KV cache" "total (training, device)" "host side:" \
            "checkpoint staging (rank 0)"; do
    has_out "prints $part" "$part"
done
one=$(grep "routed experts" "$tmp/out" | awk '{print $3}')
plan --ranks 2 --parallel expert=2 --batch 2
same "2 x 80 GB: fits" "$rc" 0
has_out "verdict yes" "fits: yes"
has_out "64 of 128 experts" "(64 of 128 experts per layer)"
two=$(grep "routed experts" "$tmp/out" | awk '{print $3}')
plan --ranks 8 --parallel data=1,expert=8 --batch 8
same "8 x 80 GB: fits" "$rc" 0
has_out "16 of 128 experts" "(16 of 128 experts per layer)"
eight=$(grep "routed experts" "$tmp/out" | awk '{print $3}')
# the expert share falls as 1/E (to the MiB printed)
awk -v a="$one" -v b="$two" -v c="$eight" 'BEGIN { exit !(a > 0 && (a / 2 - b) ^ 2 < 1 && (a / 8 - c) ^ 2 < 1) }' \
    && ok "expert share 1/E: $one, $two, $eight MiB" || bad "expert share: $one, $two, $eight MiB"

run "$molt" plan --model tiny --ranks 1 --adapter r=4,targets=o_proj --seq-len 16 --batch 1
same "tiny on this machine" "$rc" 0
has_out "CPU total" "total of a CPU run"

run "$molt" plan --model tiny --ranks 2 --adapter r=4,targets=o_proj --seq-len 16
same "missing --batch" "$rc" 2
has_err "names the required options" "--batch"
run "$molt" plan --model tiny --ranks 3 --parallel expert=3 --adapter r=4,targets=o_proj \
    --seq-len 16 --batch 3
same "experts do not split" "$rc" 1
has_err "says why" "8 routed experts do not split over 3 ranks"
run "$molt" plan --model tiny --ranks 2 --adapter r=4,targets=o_proj --seq-len 16 --batch 3
same "batch does not split" "$rc" 1
has_err "names the batch" "a batch of 3 rows does not split evenly over 2 ranks"
run "$molt" plan --model tiny --ranks 2 --parallel data=x --adapter r=4,targets=o_proj \
    --seq-len 16 --batch 2
same "bad --parallel" "$rc" 2
has_err "names --parallel" "--parallel 'data=x'"
run "$molt" plan --model no-such-model --ranks 1 --adapter r=4,targets=o_proj --seq-len 16 \
    --batch 1
same "unknown model" "$rc" 1
has_err "names the model" "no-such-model"
run "$molt" plan --model tiny --ranks 1 --quant nf5 --adapter r=4,targets=o_proj --seq-len 16 \
    --batch 1
same "bad quant" "$rc" 2
has_err "names the format" "nf5"
run "$molt" plan --model tiny --ranks 1 --adapter r=4,targets=no_such_module --seq-len 16 \
    --batch 1
same "target matching nothing" "$rc" 1
has_err "names the target" "no_such_module"
cli_done
