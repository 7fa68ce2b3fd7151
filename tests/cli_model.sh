#!/usr/bin/env bash
# tests/cli_model.sh: `molt init-model` and `molt forward` as a user runs them: the files a
# model directory gets, determinism for a seed, the dtype and layout options, logits of a
# token file (one tensor per non-blank line, shapes and size; their values are checked
# against transformers in test_model_forward.c), forward on the bf16, fp8 and Mistral-layout
# copies, and the message and exit status of each bad invocation. $1: the molt binary. The
# exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

# ---- init-model ------------------------------------------------------------------------
run "$molt" init-model --preset tiny --out "$tmp/a" --seed 1234
same "init-model tiny: status" "$rc" 0
for f in config.json model.safetensors tekken.json; do
    [ -s "$tmp/a/$f" ] && ok "writes $f" || bad "no $f"; done
cmp -s "$tmp/a/tekken.json" "$src/configs/tokenizers/tekken.json" && ok "tokenizer copied" ||
    bad "tekken.json differs from configs/tokenizers/tekken.json"
grep -q '"model_type": "mistral4"' "$tmp/a/config.json" && ok "config model_type" ||
    bad "config.json lacks model_type mistral4"
grep -q '"dtype": "float32"' "$tmp/a/config.json" && ok "config dtype" || bad "config dtype"
header "$tmp/a/model.safetensors" | grep -q '"model.layers.2.mlp.experts.gate_up_proj":{"dtype":"F32","shape":\[8,32,32\]' &&
    ok "fused experts [E, 2I, H]" || bad "fused expert tensor: $(header "$tmp/a/model.safetensors" | head -c 300)"

run "$molt" init-model --preset tiny --out "$tmp/b" --seed 1234 --no-tokenizer
cmp -s "$tmp/a/model.safetensors" "$tmp/b/model.safetensors" && ok "same seed, same file" ||
    bad "same seed gave different weights"
[ ! -e "$tmp/b/tekken.json" ] && ok "--no-tokenizer" || bad "--no-tokenizer wrote tekken.json"
run "$molt" init-model --preset tiny --out "$tmp/c" --seed 1235 --no-tokenizer
cmp -s "$tmp/a/model.safetensors" "$tmp/c/model.safetensors" && bad "seed ignored" ||
    ok "another seed, other weights"

run "$molt" init-model --preset tiny --out "$tmp/bf" --seed 1234 --dtype bf16 --no-tokenizer
same "bf16: status" "$rc" 0
header "$tmp/bf/model.safetensors" | grep -q '"lm_head.weight":{"dtype":"BF16"' && ok "bf16 weights" ||
    bad "bf16: lm_head not BF16"
grep -q '"dtype": "bfloat16"' "$tmp/bf/config.json" && ok "bf16 config dtype" || bad "bf16 config"
run "$molt" init-model --preset tiny-grouped --out "$tmp/fp8" --dtype fp8 --layout per-expert --no-tokenizer
same "fp8 per-expert: status" "$rc" 0
header "$tmp/fp8/model.safetensors" | grep -q '"model.layers.1.mlp.experts.7.down_proj.weight":{"dtype":"F8_E4M3"' &&
    ok "fp8 per-expert tensor" || bad "fp8 per-expert tensor missing"
header "$tmp/fp8/model.safetensors" | grep -q '"model.layers.1.mlp.experts.7.down_proj.weight_scale_inv":{"dtype":"F32","shape":\[\]' &&
    ok "fp8 per-tensor scale" || bad "fp8 scale missing"
run "$molt" init-model --preset tiny --out "$tmp/mi" --layout mistral --no-tokenizer
[ -s "$tmp/mi/consolidated.safetensors" ] && ok "mistral layout file" || bad "no consolidated.safetensors"
header "$tmp/mi/consolidated.safetensors" | grep -q '"layers.0.attention.wkv_a_with_mqa.weight"' &&
    ok "mistral names" || bad "mistral names missing"

# ---- forward ---------------------------------------------------------------------------
printf '1 2 3 4 5\n\n  \n7,8,9\n131071\n' >"$tmp/tokens.txt"
run "$molt" forward --model "$tmp/a" --tokens "$tmp/tokens.txt" --out "$tmp/lg.safetensors"
same "forward: status" "$rc" 0
h=$(header "$tmp/lg.safetensors")
for want in '"logits.0":{"dtype":"F32","shape":[5,131072]' '"logits.1":{"dtype":"F32","shape":[3,131072]' \
    '"logits.2":{"dtype":"F32","shape":[1,131072]'; do
    [[ "$h" == *"$want"* ]] && ok "forward writes $want" || bad "forward header lacks $want: $h"; done
[[ "$h" == *'logits.3'* ]] && bad "blank lines made sequences" || ok "blank lines skipped"
size=$(stat -c %s "$tmp/lg.safetensors")
[ "$size" -ge $(((5 + 3 + 1) * 131072 * 4)) ] && ok "logits data size" || bad "file too small: $size"
for d in fp8 mi bf; do
    run "$molt" forward --model "$tmp/$d" --tokens "$tmp/tokens.txt" --out "$tmp/lg-$d.safetensors"
    same "forward on the $d copy: status" "$rc" 0
done

# ---- bad invocations -------------------------------------------------------------------
run "$molt" init-model --out "$tmp/x"
same "no --preset: status" "$rc" 2
has_err "no --preset: message" "--preset and --out are required"
run "$molt" init-model --preset nope --out "$tmp/x"
same "unknown preset: status" "$rc" 1
has_err "unknown preset: message" "preset 'nope' not found"
run "$molt" init-model --preset tiny --out "$tmp/x" --dtype f64
same "bad --dtype: status" "$rc" 2
has_err "bad --dtype: message" "--dtype 'f64' is not one of f32, bf16, fp8"
run "$molt" init-model --preset tiny --out "$tmp/x" --seed -3
same "bad --seed: status" "$rc" 2
run "$molt" init-model --preset tiny --out "$tmp/x" --bogus
same "unknown option: status" "$rc" 2
has_err "unknown option: message" "unknown option '--bogus'"
run "$molt" init-model --preset mistral-small-4 --out "$tmp/x" --no-tokenizer
same "huge preset refused: status" "$rc" 1
has_err "huge preset refused: message" "raise --max-gb"
run "$molt" init-model --preset tiny --out "$tmp/x" --tokenizer "$tmp/none.json"
same "missing tokenizer: status" "$rc" 1

run "$molt" forward --model "$tmp/a" --tokens "$tmp/tokens.txt" --out "$tmp/o" --adapter foo
same "--adapter missing: status" "$rc" 1
has_err "--adapter missing: message" "molt forward: adapter foo: no such file or directory"
run "$molt" forward --model "$tmp/a" --tokens "$tmp/tokens.txt"
same "no --out: status" "$rc" 2
printf '1 2\n3 abc 4\n' >"$tmp/badtok.txt"
run "$molt" forward --model "$tmp/a" --tokens "$tmp/badtok.txt" --out "$tmp/o"
same "bad token: status" "$rc" 1
has_err "bad token: message" "badtok.txt:2: 'abc' is not a token id"
printf '1 131072\n' >"$tmp/range.txt"
run "$molt" forward --model "$tmp/a" --tokens "$tmp/range.txt" --out "$tmp/o"
has_err "token out of range: message" \
    "range.txt:1: token 131072 is outside the vocabulary [0, 131072)"
printf '\n\n' >"$tmp/empty.txt"
run "$molt" forward --model "$tmp/a" --tokens "$tmp/empty.txt" --out "$tmp/o"
has_err "no sequences: message" "no token sequences"
run "$molt" forward --model "$tmp/nowhere" --tokens "$tmp/tokens.txt" --out "$tmp/o"
same "missing model: status" "$rc" 1
has_err "missing model: message" "model directory $tmp/nowhere: No such file or directory"
[ ! -e "$tmp/o" ] && ok "no output on failure" || bad "output written despite failure"

cli_done
