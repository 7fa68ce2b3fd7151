#!/usr/bin/env bash
# tests/cli_quantize.sh: `molt quantize`, `molt forward --base-quant` and `molt bench
# quant-model` as a user runs them: the files of a pre-quantized directory and the
# bitsandbytes names in its header, logits of the pre-quantized copy equal to quantizing on
# load, --double-quant off, an FP8 checkpoint kept as loaded, the figures the benchmark
# prints, and the message and exit status of bad invocations and of a corrupt file.
# $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

run "$molt" init-model --preset tiny --out "$tmp/m" --seed 7
same "init-model: status" "$rc" 0
run "$molt" init-model --preset tiny --out "$tmp/m8" --seed 7 --dtype fp8 --no-tokenizer
same "init-model fp8: status" "$rc" 0

# ---- quantize --------------------------------------------------------------------------
run "$molt" quantize --model "$tmp/m" --quant nf4 --out "$tmp/q"
same "quantize nf4: status" "$rc" 0
has_out "quantize reports the spec" "experts=nf4"
for f in config.json model.safetensors tekken.json; do
    [ -s "$tmp/q/$f" ] && ok "quantized dir has $f" || bad "quantized dir lacks $f"; done
h=$(header "$tmp/q/model.safetensors")
w=model.layers.0.self_attn.o_proj.weight
for k in "\"$w\":{\"dtype\":\"U8\"" "\"$w.absmax\"" "\"$w.quant_map\"" "\"$w.nested_absmax\"" \
         "\"$w.nested_quant_map\"" "\"$w.quant_state.bitsandbytes__nf4\"" \
         "\"molt_quant\":\"attention=nf4"; do
    [[ "$h" == *"$k"* ]] && ok "header has $k" || bad "header lacks $k"; done
size_q=$(stat -c %s "$tmp/q/model.safetensors")
size_f=$(stat -c %s "$tmp/m/model.safetensors")
[ "$size_q" -lt "$size_f" ] && ok "quantized file is smaller" || bad "sizes $size_q vs $size_f"

echo "1 2 3 400 5000 60" >"$tmp/tok"
run "$molt" forward --model "$tmp/m" --tokens "$tmp/tok" --out "$tmp/a.st" --base-quant nf4
same "forward --base-quant nf4: status" "$rc" 0
run "$molt" forward --model "$tmp/q" --tokens "$tmp/tok" --out "$tmp/b.st"
same "forward on the pre-quantized dir: status" "$rc" 0
cmp -s "$tmp/a.st" "$tmp/b.st" && ok "pre-quantized logits equal quantize-on-load" ||
    bad "pre-quantized logits differ"
run "$molt" forward --model "$tmp/m" --tokens "$tmp/tok" --out "$tmp/c.st"
cmp -s "$tmp/a.st" "$tmp/c.st" && bad "nf4 logits equal the F32 ones" || ok "nf4 changes logits"

run "$molt" quantize --model "$tmp/m" --quant nf4,attention=bf16 --double-quant off \
    --out "$tmp/q2"
same "quantize --double-quant off: status" "$rc" 0
h=$(header "$tmp/q2/model.safetensors")
[[ "$h" == *"nested_absmax"* ]] && bad "nested state without double quant" ||
    ok "no nested state without double quant"
[[ "$h" == *"\"$w\":{\"dtype\":\"BF16\""* ]] && ok "attention=bf16 stored as BF16" ||
    bad "attention not BF16"

run "$molt" quantize --model "$tmp/m8" --quant fp8 --out "$tmp/q8"
same "quantize an fp8 checkpoint to fp8: status" "$rc" 0
# the E4M3 bytes of the projection are the file's own
tensor_bytes() { # NAME FILE: the data bytes of tensor NAME, in hex
    local hdr n lo hi
    hdr=$(header "$2")
    n=$(od -An -t u8 -N 8 "$2" | tr -d ' ')
    lo=$(sed -E "s/.*\"$1\":\{[^}]*\"data_offsets\":\[([0-9]+),([0-9]+)\].*/\1/" <<<"$hdr")
    hi=$(sed -E "s/.*\"$1\":\{[^}]*\"data_offsets\":\[([0-9]+),([0-9]+)\].*/\2/" <<<"$hdr")
    dd if="$2" bs=1 skip=$((8 + n + lo)) count=$((hi - lo)) 2>/dev/null | od -An -t x1
}
a=$(tensor_bytes "$w" "$tmp/m8/model.safetensors")
b=$(tensor_bytes "$w" "$tmp/q8/model.safetensors")
[ -n "$a" ] && [ "$a" == "$b" ] && ok "fp8 codes kept as loaded" || bad "fp8 codes changed"

# ---- generation (KV cache) on a quantized base -------------------------------------------
run "$molt" generate --model "$tmp/m" --prompt "Hello" --max-tokens 6 --base-quant nf4
same "generate --base-quant nf4: status" "$rc" 0
gen_a=$out
run "$molt" generate --model "$tmp/q" --prompt "Hello" --max-tokens 6
same "generate on the pre-quantized dir: status" "$rc" 0
same "generate: pre-quantized text equals quantize-on-load" "$out" "$gen_a"
run "$molt" generate --model "$tmp/m" --prompt "Hello" --max-tokens 6 --base-quant nf4 \
    --attn expanded
same "generate nf4: expanded attention gives the same text" "$out" "$gen_a"

# ---- bad invocations and a corrupt file ------------------------------------------------
run "$molt" quantize --model "$tmp/m" --quant nf5 --out "$tmp/x"
same "bad format: status" "$rc" 2
has_err "bad format: message" "quant spec 'nf5': unknown format 'nf5'"
run "$molt" quantize --model "$tmp/m" --quant nf4
same "missing --out: status" "$rc" 2
run "$molt" quantize --model "$tmp/m" --quant nf4 --double-quant maybe --out "$tmp/x"
same "bad --double-quant: status" "$rc" 2
run "$molt" forward --model "$tmp/m" --tokens "$tmp/tok" --out "$tmp/d.st" --base-quant nf4,x=f32
same "forward bad --base-quant: status" "$rc" 2
has_err "forward bad --base-quant: message" "unknown group 'x'"
# the JSON blob of o_proj overwritten in place: same length, no longer JSON
cp -r "$tmp/q" "$tmp/bad"
hdr=$(header "$tmp/q/model.safetensors")
n=$(od -An -t u8 -N 8 "$tmp/q/model.safetensors" | tr -d ' ')
off=$(sed -E "s/.*\"$w.quant_state.bitsandbytes__nf4\":\{[^}]*\"data_offsets\":\[([0-9]+),.*/\1/" \
    <<<"$hdr")
printf 'XXXX' | dd of="$tmp/bad/model.safetensors" bs=1 seek=$((8 + n + off)) conv=notrunc \
    2>/dev/null
run "$molt" forward --model "$tmp/bad" --tokens "$tmp/tok" --out "$tmp/e.st"
same "corrupt quant_state: status" "$rc" 1
has_err "corrupt quant_state: message" "quantized weight '$w': quant_state is not a JSON object"

# ---- bench -----------------------------------------------------------------------------
run "$molt" bench quant-model --model "$tmp/m"
same "bench quant-model: status" "$rc" 0
for f in f32 bf16 int8 fp8 nf4; do
    grep -qE "^$f +[0-9.]+ " <<<"$out" && ok "bench row $f" || bad "bench lacks row $f"; done
has_out "bench projects the full model" "full model (mistral-small-4)"
nf4_bits=$(awk '$1 == "nf4" {print $2}' <<<"$out")
awk -v b="$nf4_bits" 'BEGIN {exit !(b > 4.0 && b < 4.2)}' && ok "nf4 bits/param $nf4_bits" ||
    bad "nf4 bits/param $nf4_bits"

cli_done
