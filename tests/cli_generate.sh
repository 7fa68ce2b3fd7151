#!/usr/bin/env bash
# tests/cli_generate.sh: `molt generate` and `molt bench generate` as a user runs them, on a
# fresh `molt init-model --preset tiny`: greedy output is deterministic and the same with
# both attention forms, --max-tokens bounds the count (and a shorter run's text is a prefix
# of a longer one's), a seeded sampling run repeats, --chat wraps the prompt in the chat
# template, --prompt-file equals --prompt, and every bad invocation gives its message and
# exit status (2 usage, 1 failure). The token values themselves are checked against
# transformers in test_kvcache.c. $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

# count of generated tokens and of prompt tokens in the summary line
gen_count() { sed -n 's/.*generated \([0-9]*\) tokens.*/\1/p' <<<"$err"; }
prompt_count() { sed -n 's/.*: \([0-9]*\) prompt tokens.*/\1/p' <<<"$err"; }

run "$molt" init-model --preset tiny --out "$tmp/m" --seed 5
same "init-model: status" "$rc" 0
m=$tmp/m

# ---- greedy --------------------------------------------------------------------------------
run "$molt" generate --model "$m" --prompt "The quick brown fox" --max-tokens 8
same "greedy: status" "$rc" 0
g1=$out
n=$(gen_count)
if [[ "$err" == *"generated 8 tokens (token limit)"* ]] ||
   [[ "$err" == *"(end of sequence)"* && ${n:-99} -le 8 ]]; then ok "stops at --max-tokens 8"
else bad "count: $err"; fi
same "prompt tokens: <s> + text" "$(prompt_count)" 5
run "$molt" generate --model "$m" --prompt "The quick brown fox" --max-tokens 8
same "greedy is deterministic" "$out" "$g1"
run "$molt" generate --model "$m" --prompt "The quick brown fox" --max-tokens 8 --attn expanded
same "expanded attention gives the same text" "$out" "$g1"
run "$molt" generate --model "$m" --prompt "The quick brown fox" --max-tokens 3
same "--max-tokens 3: status" "$rc" 0
[[ "$g1" == "$out"* ]] && ok "3-token text is a prefix of the 8-token text" ||
    bad "prefix: '$out' vs '$g1'"
run "$molt" generate --model "$m" --prompt "The quick brown fox" --max-tokens 0
same "--max-tokens 0: status" "$rc" 0
same "--max-tokens 0: no text" "$out" ""
has_err "--max-tokens 0: count" "generated 0 tokens"

# ---- sampling --------------------------------------------------------------------------------
sample=(generate --model "$m" --prompt "Once upon" --max-tokens 10 --temperature 1.5
        --top-k 40 --top-p 0.95 --seed 9)
run "$molt" "${sample[@]}"
same "sampling: status" "$rc" 0
s1=$out
run "$molt" "${sample[@]}"
same "sampling with a seed repeats" "$out" "$s1"

# ---- chat and prompt file --------------------------------------------------------------------
run "$molt" generate --model "$m" --prompt "Hello" --max-tokens 4
plain=$(prompt_count)
run "$molt" generate --model "$m" --prompt "Hello" --max-tokens 4 --chat
same "--chat: status" "$rc" 0
chat=$(prompt_count)
# <s> [MODEL_SETTINGS] ... [/MODEL_SETTINGS] [INST] Hello [/INST]
if [ -n "$chat" ] && [ -n "$plain" ] && [ "$chat" -gt $((plain + 4)) ]; then
    ok "--chat adds the template's tokens ($plain -> $chat)"
else bad "--chat prompt tokens: plain '$plain', chat '$chat'"; fi
printf 'The quick brown fox' >"$tmp/prompt.txt"
run "$molt" generate --model "$m" --prompt-file "$tmp/prompt.txt" --max-tokens 8
same "--prompt-file: status" "$rc" 0
same "--prompt-file equals --prompt" "$out" "$g1"

# ---- errors ------------------------------------------------------------------------------------
run "$molt" generate --prompt x
same "no --model: status" "$rc" 2
has_err "no --model: message" "molt generate: --model is required"
run "$molt" generate --model "$m"
same "no prompt: status" "$rc" 2
has_err "no prompt: message" "give exactly one of --prompt and --prompt-file"
run "$molt" generate --model "$m" --prompt x --prompt-file "$tmp/prompt.txt"
same "two prompts: status" "$rc" 2
run "$molt" generate --model "$m" --prompt-file "$tmp/missing.txt"
same "missing prompt file: status" "$rc" 1
has_err "missing prompt file: message" "cannot open prompt file $tmp/missing.txt: No such file"
run "$molt" generate --model "$tmp/nowhere" --prompt x
same "missing model: status" "$rc" 1
has_err "missing model: message" "model directory $tmp/nowhere: No such file or directory"
run "$molt" generate --model "$m" --prompt x --temperature -1
same "negative temperature: status" "$rc" 2
has_err "negative temperature: message" "--temperature '-1' is not a number >= 0"
run "$molt" generate --model "$m" --prompt x --top-p 0
has_err "top-p 0: message" "--top-p '0' is not a number in (0, 1]"
run "$molt" generate --model "$m" --prompt x --top-k five
has_err "top-k: message" "--top-k 'five' is not an integer >= 0"
run "$molt" generate --model "$m" --prompt x --max-tokens -3
has_err "max-tokens: message" "--max-tokens '-3' is not an integer >= 0"
run "$molt" generate --model "$m" --prompt x --attn flash
has_err "attn: message" "--attn 'flash' is not one of absorbed, expanded"
run "$molt" generate --model "$m" --prompt x --max-tokens
same "missing value: status" "$rc" 2
has_err "missing value: message" "--max-tokens needs a value"
run "$molt" generate --model "$m" --prompt x --beam 4
same "unknown option: status" "$rc" 2
has_err "unknown option: message" "unknown option '--beam'"
run "$molt" generate --model "$m" --prompt x --max-tokens 1000
same "past the positions: status" "$rc" 1
has_err "past the positions: message" "positions, more than the model's max_position_embeddings 512"
run "$molt" generate --help
same "--help: status" "$rc" 0

# ---- bench ---------------------------------------------------------------------------------------
run "$molt" bench generate --preset tiny --prompt-tokens 8 --gen-tokens 4
same "bench generate: status" "$rc" 0
[[ "$out" == *"| tiny |"*"| absorbed | 8 |"*"| tiny |"*"| expanded | 8 |"* ]] &&
    ok "bench generate: one row per attention form" || bad "bench table: $out"
run "$molt" bench generate --model "$m" --prompt-tokens 4 --gen-tokens 2
same "bench generate --model: status" "$rc" 0
# the vocabulary projection: on AMX where the processor has AMX-BF16, F32 with MOLT_AMX=0
if grep -q amx_bf16 /proc/cpuinfo && grep -q amx_tile /proc/cpuinfo; then
    has "bench generate: AMX head" "$out" "vocabulary projection on AMX"
else
    has "bench generate: F32 head without AMX" "$out" "vocabulary projection F32"
fi
MOLT_AMX=0 run "$molt" bench generate --model "$m" --prompt-tokens 4 --gen-tokens 2
has "bench generate: MOLT_AMX=0 keeps F32" "$out" "vocabulary projection F32"
# the prompt's quantized products: on AMX (with AVX512-BF16) for a quantized base only
run "$molt" bench generate --model "$m" --base-quant nf4 --prompt-tokens 4 --gen-tokens 2
if grep -q amx_bf16 /proc/cpuinfo && grep -q avx512_bf16 /proc/cpuinfo; then
    has "bench generate: NF4 prompt products on AMX" "$out" "prompt products on AMX"
else
    has "bench generate: NF4 prompt products F32 without AMX" "$out" "prompt products F32"
fi
has "bench generate: F32 base keeps F32 prompt products" "$(MOLT_AMX=1 "$molt" bench generate --model "$m" --prompt-tokens 4 --gen-tokens 2 2>&1)" "prompt products F32"
MOLT_AMX=0 run "$molt" bench generate --model "$m" --base-quant nf4 --prompt-tokens 4 --gen-tokens 2
has "bench generate: MOLT_AMX=0 keeps F32 prompt products" "$out" "prompt products F32"
run "$molt" bench generate --prompt-tokens 4
same "bench without a model: status" "$rc" 2
has_err "bench without a model: message" "give exactly one of --model and --preset"
run "$molt" bench generate --preset tiny --gen-tokens 0
same "bench zero tokens: status" "$rc" 2

cli_done
