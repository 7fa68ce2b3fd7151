#!/usr/bin/env bash
# tests/cli_data.sh: `molt data inspect|render|bench` on small files written here: counts,
# trained fraction, the exact message of a bad record (stop) and its count (skip), rendered
# ids against `molt tokenize`, compressed input, usage errors.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
tok=$src/configs/tokenizers/tekken.json

cat >"$tmp/good.jsonl" <<'JSONL'
{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
{"instruction": "Add", "input": "2+2", "output": "4"}

{"text": "Just text."}
JSONL
out=$("$molt" data inspect --data "$tmp/good.jsonl" --tokenizer "$tok") || fail "inspect exited $?"
grep -qx "records: 3 (chat 1, alpaca 1, text 1)" <<<"$out" || fail "counts: $out"
grep -qx "bad records skipped: 0" <<<"$out" || fail "bad count: $out"
grep -qx "blank lines: 1" <<<"$out" || fail "blank lines: $out"
grep -q "^trained tokens: [0-9]* ([0-9.]*%)$" <<<"$out" || fail "trained fraction: $out"
grep -q "^length histogram" <<<"$out" || fail "histogram: $out"
ok "inspect: counts"

# render: the text record is <s> + its tokens + </s>, all trained after <s>
all=$("$molt" data render --data "$tmp/good.jsonl" --tokenizer "$tok" --limit 9)
[ "$(wc -l <<<"$all")" -eq 3 ] || fail "render printed $(wc -l <<<"$all") lines"
line=$(sed -n 3p <<<"$all")
ids=$("$molt" tokenize --tokenizer "$tok" --text "Just text." | sed 's/ /, /g')
[ "$line" = "{\"ids\": [1, $ids, 2], \"mask\": [0, $(sed 's/[0-9][0-9]*/1/g' <<<"$ids"), 1]}" ] \
    || fail "render: $line (tokens: $ids)"
ok "render"

# a bad record stops with its position; skipped, it is counted by reason
printf '{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n' >"$tmp/bad.jsonl"
"$molt" data inspect --data "$tmp/bad.jsonl" --tokenizer "$tok" >/dev/null 2>"$tmp/err" \
    && fail "a bad record did not stop inspect"
want="molt data inspect: $tmp/bad.jsonl:3:14: invalid JSON: string or '}' expected near '}'"
[ "$(cat "$tmp/err")" = "$want" ] || fail "message: $(cat "$tmp/err")"
out=$("$molt" data inspect --data "$tmp/bad.jsonl" --tokenizer "$tok" --on-bad-record skip) \
    || fail "skip exited $?"
grep -qx "records: 3 (text 3)" <<<"$out" || fail "skip counts: $out"
grep -qx "bad records skipped: 1 (invalid JSON 1)" <<<"$out" || fail "skip reasons: $out"
"$molt" data inspect --data "$tmp/good.jsonl" --tokenizer "$tok" --max-seq-len 21 \
    --on-bad-record truncate | grep -qx "truncated: 1" || fail "truncate count"
# cut at 8 tokens the chat example keeps no trained token: a bad record, not a truncation
"$molt" data inspect --data "$tmp/good.jsonl" --tokenizer "$tok" --max-seq-len 8 \
    --on-bad-record truncate >/dev/null 2>"$tmp/err" && fail "an empty truncation was kept"
grep -q "good.jsonl:1:1: example has 19 tokens, more than max_seq_len 8, and cut there it keeps no trained token" \
    "$tmp/err" || fail "empty truncation message: $(cat "$tmp/err")"
ok "bad records: stop, skip, truncate"

# compressed input reads the same
if command -v gzip >/dev/null; then
    gzip -c "$tmp/good.jsonl" >"$tmp/good.jsonl.gz"
    b=$("$molt" data render --data "$tmp/good.jsonl.gz" --tokenizer "$tok" --limit 1)
    [ "$b" = "$(head -1 <<<"$all")" ] || fail "gzip input renders differently"
    out=$("$molt" data bench --data "$tmp/good.jsonl.gz" --tokenizer "$tok" --max-seq-len 64 \
        --rows 2) || fail "bench exited $?"
    grep -q "3 examples, .* examples/s, .* MB/s" <<<"$(tr '\n' ' ' <<<"$out")" \
        || fail "bench: $out"
    ok "compressed input"
fi

# usage errors exit 2 with a reason
"$molt" data inspect --tokenizer "$tok" 2>"$tmp/err" && fail "no --data accepted"
grep -q "no --data given" "$tmp/err" || fail "no reason for missing --data"
"$molt" data inspect --data x --tokenizer "$tok" --format yaml 2>"$tmp/err"
[ $? -eq 2 ] || fail "bad --format did not exit 2"
grep -q "unknown data format 'yaml'" "$tmp/err" || fail "no reason for --format"
"$molt" data frob 2>/dev/null; [ $? -eq 2 ] || fail "unknown subcommand did not exit 2"
"$molt" data inspect --data "$tmp/none.jsonl" --tokenizer "$tok" 2>"$tmp/err" \
    && fail "missing file accepted"
[ "$(cat "$tmp/err")" = "molt data inspect: cannot open $tmp/none.jsonl: no such file" ] \
    || fail "missing file: $(cat "$tmp/err")"
ok "usage errors"
cli_done
