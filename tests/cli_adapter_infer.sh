#!/usr/bin/env bash
# tests/cli_adapter_infer.sh: `molt forward --adapter` and `molt generate --adapter` on the
# tiny model: an adapter changes the logits; base + adapter gives the same logits file and
# the same greedy text as the merged model written by `molt merge`; a PEFT directory and
# a molt adapter file give identical results; a missing adapter is a clear error.
# $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
check() { if "${@:2}" >"$tmp/log" 2>&1; then ok "$1"; else bad "$1: $(tail -3 "$tmp/log")"; fi; }

check "init-model" "$molt" init-model --preset tiny --seed 7 --out "$tmp/m"
spec="r=4,alpha=8,targets=q_b_proj+kv_b_proj+o_proj+shared_experts.up_proj"
check "export a non-trivial adapter" "$molt" export --model "$tmp/m" --spec "$spec" \
    --b-std 0.5 --b-seed 3 --out "$tmp/peft"
check "same adapter as a molt file" "$molt" export --model "$tmp/m" --adapter "$tmp/peft" \
    --format molt --out "$tmp/a.h5"
check "merge f32" "$molt" merge --model "$tmp/m" --adapter "$tmp/peft" --out "$tmp/merged" \
    --dtype f32

printf '1 22177 1766 3174\n1 3074 1093\n' >"$tmp/tokens"
check "forward base" "$molt" forward --model "$tmp/m" --tokens "$tmp/tokens" --out "$tmp/base.st"
check "forward + PEFT adapter" "$molt" forward --model "$tmp/m" --adapter "$tmp/peft" \
    --tokens "$tmp/tokens" --out "$tmp/peft.st"
check "forward + molt adapter" "$molt" forward --model "$tmp/m" --adapter "$tmp/a.h5" \
    --tokens "$tmp/tokens" --out "$tmp/molt.st"
cmp -s "$tmp/base.st" "$tmp/peft.st" && bad "the adapter changed no logit" || ok "adapter changes logits"
cmp -s "$tmp/peft.st" "$tmp/molt.st" && ok "PEFT dir and molt file agree" \
    || bad "PEFT dir and molt file give different logits"

gen() { "$molt" generate --model "$1" --prompt "Once upon a time" --max-tokens 12 "${@:2}" 2>/dev/null; }
base_text=$(gen "$tmp/m")
ad_text=$(gen "$tmp/m" --adapter "$tmp/peft")
merged_text=$(gen "$tmp/merged")
[ -n "$ad_text" ] && [ "$ad_text" != "$base_text" ] && ok "generate --adapter changes the text" \
    || bad "generate --adapter: '$ad_text' vs base '$base_text'"
[ "$ad_text" == "$merged_text" ] && ok "base + adapter generates what the merged model does" \
    || bad "adapter '$ad_text' vs merged '$merged_text'"

"$molt" forward --model "$tmp/m" --adapter "$tmp/nope" --tokens "$tmp/tokens" \
    --out "$tmp/x.st" 2>"$tmp/err"
rc=$?
[ $rc -eq 1 ] && grep -q "adapter $tmp/nope" "$tmp/err" && ok "missing adapter: clear error" \
    || bad "missing adapter: rc $rc, $(cat "$tmp/err")"
"$molt" generate --model "$tmp/m" --prompt hi --adapter "$tmp/nope" 2>"$tmp/err" >/dev/null
rc=$?
[ $rc -ne 0 ] && grep -q "adapter $tmp/nope" "$tmp/err" && ok "generate: missing adapter" \
    || bad "generate missing adapter: rc $rc, $(cat "$tmp/err")"

cli_done
