#!/usr/bin/env bash
# tests/cli_train_qlora.sh: QLoRA on the routed experts. `molt train` on the tiny preset
# loaded with model.quant nf4 (routed experts quantized) and a LoRA on the experts only:
# the experts group has trainable parameters, the loss of a single repeated example stays
# finite and falls, and the saved adapter changes the logits of `molt forward` on the NF4
# base. $1: the molt binary. Exit status = verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

"$molt" init-model --preset tiny --seed 3 --out "$tmp/base" >/dev/null 2>"$tmp/err" \
    || fail "init-model: $(cat "$tmp/err")"
head -n 1 "$src/configs/data/digits-train.jsonl" >"$tmp/one.jsonl"
cat >"$tmp/c.yaml" <<YAML
model: {path: $tmp/base, quant: nf4}
adapter: {r: 4, alpha: 16, targets: [experts]}
data: {train: $tmp/one.jsonl, format: alpaca, max_seq_len: 48}
train: {steps: 6, seed: 5}
optim: {lr: 0.05}
output_dir: $tmp/run
YAML

run "$molt" train --config "$tmp/c.yaml"
[ "$rc" -eq 0 ] || fail "train on an nf4 base with expert LoRA: $err"
ok "train on an nf4 base with expert LoRA"
# the parameter table: "experts  UNITS  RANKS  TRAINABLE"
row=$(printf '%s\n%s\n' "$out" "$err" | grep -E '^experts +[0-9]' | head -n 1)
n=$(echo "$row" | awk '{print $4}')
if [ -n "$n" ] && [ "$n" -gt 0 ]; then ok "experts group trains $n parameters"
else bad "experts group has no trainable parameters: '$row'"; fi
grep -q 'quant: "nf4"' "$tmp/run/config.resolved.yaml" && ok "resolved config says nf4" \
    || bad "resolved config lacks quant: \"nf4\""

losses=$(sed -E 's/.*"loss":([^,}]*).*/\1/' "$tmp/run/metrics.jsonl" | tr '\n' ' ')
same "6 steps logged" "$(wc -l <"$tmp/run/metrics.jsonl")" 6
verdict=$(echo "$losses" | awk '{
    for (i = 1; i <= NF; i++)
        if ($i != $i + 0 || $i ~ /nan|inf/) { print "not finite"; exit }
    if (!($NF < $1 - 0.5)) { print "not falling"; exit }
    print "ok" }')
same "loss finite and falling ($losses)" "$verdict" ok

# the adapter, applied to the NF4 base, changes the logits
echo "1 5 9 13 17 21" >"$tmp/tokens.txt"
run "$molt" forward --model "$tmp/base" --tokens "$tmp/tokens.txt" --base-quant nf4 \
    --out "$tmp/plain.safetensors"
same "forward on the nf4 base" "$rc" 0
run "$molt" forward --model "$tmp/base" --tokens "$tmp/tokens.txt" --base-quant nf4 \
    --adapter "$tmp/run/adapter" --out "$tmp/adapted.safetensors"
[ "$rc" -eq 0 ] && ok "forward on the nf4 base with the expert adapter" \
    || bad "forward on the nf4 base with the expert adapter: $err"
if [ -s "$tmp/plain.safetensors" ] && [ -s "$tmp/adapted.safetensors" ] \
    && ! cmp -s "$tmp/plain.safetensors" "$tmp/adapted.safetensors"; then
    ok "the expert adapter changes the logits"
else
    bad "the expert adapter leaves the logits unchanged (or no output)"
fi
cli_done
