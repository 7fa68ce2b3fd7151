#!/usr/bin/env bash
# tests/cli_read_errors.sh: a failure to read is an error, never taken for the end of the
# input: a directory given as a file is refused by name, a read error (/proc/self/mem reads
# fail with EIO) carries errno's text, and an input without line ends (/dev/zero) is refused
# at a cap instead of being read until memory runs out. For `molt tokenize --jsonl`, `molt
# bench tokenize`, `molt forward --tokens`, `molt generate --prompt-file` and `molt data`.
# $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

tok=$src/configs/tokenizers/tekken.json
failed_with() { # NAME WANT: the last run exited 1 with WANT in its message
    [ "$rc" -eq 1 ] && ok "$1: exit status 1" || bad "$1: exit status $rc"
    has_err "$1: message" "$2"
}
run "$molt" tokenize --tokenizer "$tok" --jsonl "$tmp"
failed_with "tokenize --jsonl DIR" "is a directory"
same "tokenize --jsonl DIR: no output" "$out" ""
run timeout 60 "$molt" tokenize --tokenizer "$tok" --jsonl /dev/zero
failed_with "tokenize --jsonl /dev/zero" "/dev/zero:1: line longer than"
run "$molt" tokenize --tokenizer "$tok" --jsonl /proc/self/mem
failed_with "tokenize: a read error" "read error: Input/output error"
run "$molt" bench tokenize --tokenizer "$tok" --jsonl "$tmp" --seconds 0
failed_with "bench tokenize --jsonl DIR" "is a directory"
run timeout 60 "$molt" data inspect --data /dev/zero --tokenizer "$tok"
failed_with "data inspect --data /dev/zero" "not a JSON lines file"
run "$molt" data inspect --data "$tmp" --tokenizer "$tok"
failed_with "data inspect --data DIR" "$tmp"
run "$molt" init-model --preset tiny --out "$tmp/m"
run "$molt" forward --model "$tmp/m" --tokens /proc/self/mem --out "$tmp/l.safetensors"
failed_with "forward --tokens: a read error" "read error"
run timeout 60 "$molt" generate --model "$tmp/m" --prompt-file /dev/zero --max-tokens 1
failed_with "generate --prompt-file /dev/zero" "longer than 256 MiB"
cli_done
