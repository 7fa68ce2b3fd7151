#!/usr/bin/env bash
# tests/cli_tokenize.sh: `molt tokenize` and `molt bench tokenize` as a user runs them: the
# parity corpus through --jsonl (file and stdin) for both shipped tokenizers against the
# reference ids, --text, --bos/--eos, blank lines, and the message and exit status of each
# bad invocation. $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
fix=$src/tests/fixtures/tokenizer
tekken=$src/configs/tokenizers/tekken.json
ds=$src/configs/tokenizers/deepseek-v3-tokenizer.json

# ---- ids of the whole corpus, one line per record -------------------------------------
run "$molt" tokenize --tokenizer "$tekken" --jsonl "$fix/corpus.jsonl"
grep -v '^#' "$fix/tekken.ids" >"$tmp/want"
if [ $rc -eq 0 ] && cmp -s "$tmp/out" "$tmp/want"; then ok "tekken corpus ids"; else
    bad "tekken corpus ids (rc $rc, $(diff "$tmp/out" "$tmp/want" | grep -c '^<') lines differ) $err"; fi

"$molt" tokenize --tokenizer "$ds" --jsonl - <"$fix/corpus.jsonl" >"$tmp/out" 2>"$tmp/err"
rc=$?
grep -v '^#' "$fix/deepseek-v3.ids" >"$tmp/want"
if [ $rc -eq 0 ] && cmp -s "$tmp/out" "$tmp/want"; then ok "tokenizer.json corpus ids (stdin)"; else
    bad "tokenizer.json corpus ids (rc $rc) $(cat "$tmp/err")"; fi

# ---- --text, --bos/--eos ---------------------------------------------------------------
run "$molt" tokenize --tokenizer "$tekken" --text '{"reasoning_effort": "high"}'
same "golden ids" "$rc $out" "0 19227 80277 1302 13196 1609 1449 2811 1429 24871 46005"

run "$molt" tokenize --tokenizer "$tekken" --text '[INST]' --bos --eos
read -r -a ids <<<"$out"
same "--bos first" "${ids[0]}" 1
same "--eos last" "${ids[-1]}" 2
special=0
for i in "${ids[@]:1:${#ids[@]}-2}"; do [ "$i" -lt 1000 ] && special=1; done
same "[INST] in text gives no special id" "$special" 0
[ ${#ids[@]} -ge 4 ] && ok "[INST] is several ordinary tokens" || bad "[INST] ids: $out"

small=$fix/small-bytelevel.json
printf '{"text": "a"}\n\n  \n{"text": "bb"}\n{"text": ""}\n' >"$tmp/blank.jsonl"
run "$molt" tokenize --tokenizer "$small" --jsonl "$tmp/blank.jsonl"
same "blank lines skipped, empty text gives an empty line" "$rc $(wc -l <"$tmp/out" | tr -d ' ')" "0 3"

# ---- bad invocations -------------------------------------------------------------------
run "$molt" tokenize --text x
same "no --tokenizer: status" "$rc" 2
[[ $err == *"need --tokenizer and one of --text, --jsonl"* ]] && ok "no --tokenizer: message" ||
    bad "no --tokenizer: $err"

run "$molt" tokenize --tokenizer "$small" --text x --jsonl y
same "both --text and --jsonl" "$rc" 2

run "$molt" tokenize --tokenizer "$small" --frobnicate
same "unknown option" "$rc $(head -1 "$tmp/err")" "2 molt tokenize: unknown option '--frobnicate'"

run "$molt" tokenize --tokenizer "$tmp/nope.json" --text x
same "missing tokenizer file" "$rc $err" \
    "1 molt tokenize: $tmp/nope.json: cannot open: No such file or directory"

printf '{"text": "a"}\n{"txt": 1}\n' >"$tmp/bad.jsonl"
run "$molt" tokenize --tokenizer "$small" --jsonl "$tmp/bad.jsonl"
same "record without text" "$rc $err" \
    "1 molt tokenize: $tmp/bad.jsonl:2: expected an object with a string \"text\""

printf '{"text": "a"\n' >"$tmp/bad2.jsonl"
run "$molt" tokenize --tokenizer "$small" --jsonl "$tmp/bad2.jsonl"
[[ $rc -eq 1 && $err == "molt tokenize: $tmp/bad2.jsonl:1: column "* ]] && ok "malformed JSON line" ||
    bad "malformed JSON line: $rc $err"

run "$molt" tokenize --tokenizer "$small" --text x --bos
same "--bos without a known start token" "$rc $err" \
    "1 molt tokenize: $small: no start (--bos) token is known for this tokenizer"

run "$molt" tokenize --help
same "--help" "$rc $(echo "$out" | head -1)" \
    "0 usage: molt tokenize --tokenizer FILE (--text TEXT | --jsonl FILE) [--bos] [--eos]"

# ---- molt bench tokenize ---------------------------------------------------------------
run "$molt" bench tokenize --tokenizer "$small" --jsonl "$fix/corpus.jsonl" --seconds 0 --tsv
IFS=$'\t' read -r f kind load bytes tokens mbps <<<"$out"
"$molt" tokenize --tokenizer "$small" --jsonl "$fix/corpus.jsonl" >"$tmp/ids"
same "bench: file, kind, tokens" "$rc $f $kind $tokens" \
    "0 $small tokenizer.json $(wc -w <"$tmp/ids" | tr -d ' ')"
awk -v m="$mbps" 'BEGIN { exit !(m > 0) }' && ok "bench: MB/s > 0 ($mbps)" || bad "bench: MB/s '$mbps'"

run "$molt" bench tokenize --seconds -1
same "bench: bad --seconds" "$rc" 2

cli_done
