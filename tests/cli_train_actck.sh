#!/usr/bin/env bash
# tests/cli_train_actck.sh: `molt train` with train.activation_checkpointing=true gives the
# same per-step losses and gradient norms (metrics.jsonl, digits as printed) as without it,
# on the tiny preset with LoRA dropout on, for an unquantized base (routed-expert LoRA too)
# and an NF4 one (2-D targets; tests/cli_train_qlora.sh trains LoRA on NF4 experts). $1:
# the molt binary. Exit status = verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

"$molt" init-model --preset tiny --seed 3 --out "$tmp/base" >/dev/null 2>"$tmp/err" \
    || { cat "$tmp/err"; exit 1; }
head -n 24 "$src/configs/data/digits-train.jsonl" >"$tmp/train.jsonl"
cat >"$tmp/c.yaml" <<YAML
model: {path: $tmp/base, quant: none}
adapter:
  r: 4
  alpha: 8
  dropout: 0.2
  targets: [q_a_proj, kv_b_proj, o_proj, gate_proj, down_proj, EXPERTS]
data: {train: $tmp/train.jsonl, format: alpaca, max_seq_len: 48}
train: {steps: 4, seed: 5}
optim: {lr: 0.01}
output_dir: $tmp/run
YAML
sed 's/, EXPERTS//' "$tmp/c.yaml" >"$tmp/c-nf4.yaml"
sed -i 's/EXPERTS/experts/' "$tmp/c.yaml"
mv "$tmp/c.yaml" "$tmp/c-none.yaml"

# the loss and grad_norm fields of every row, in order
field() { sed -E "s/.*\"$2\":([^,}]*).*/\1/" "$1" | tr '\n' ' '; }

for quant in none nf4; do
    for ac in false true; do
        out="$tmp/run-$quant-$ac"
        if "$molt" train --config "$tmp/c-$quant.yaml" --quiet --set model.quant=$quant \
            --set train.activation_checkpointing=$ac --set output_dir="$out" \
            >"$tmp/out" 2>"$tmp/err"; then
            ok "train quant=$quant activation_checkpointing=$ac"
        else
            bad "train quant=$quant activation_checkpointing=$ac: $(cat "$tmp/err")"
        fi
    done
    a="$tmp/run-$quant-false/metrics.jsonl"
    b="$tmp/run-$quant-true/metrics.jsonl"
    same "4 rows ($quant)" "$(wc -l <"$b" 2>/dev/null)" 4
    la=$(field "$a" loss)
    same "same losses ($quant: $la)" "$(field "$b" loss)" "$la"
    ga=$(field "$a" grad_norm)
    same "same grad norms ($quant: $ga)" "$(field "$b" grad_norm)" "$ga"
    grep -q 'activation_checkpointing: true' "$tmp/run-$quant-true/config.resolved.yaml" \
        && ok "resolved config says true" || bad "resolved config lacks the flag"
done
cli_done
