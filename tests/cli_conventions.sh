#!/usr/bin/env bash
# tests/cli_conventions.sh: the command-line rules every molt command shares
# (common/opt.h): `molt help CMD` equals `molt CMD --help`, --flag=value, a value that
# starts with -- is refused as missing, flags take no value, unknown options and stray
# arguments are usage errors (exit 2); the top-level usage lists every command and every
# bench; `molt --version` names the version and the git commit.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

tok=$src/configs/tokenizers/tekken.json

# every command (and bench) listed by the top-level usage, help both ways
cmds=$("$molt" --help | sed -n '/^commands:/,/^$/p' | awk 'NF > 1 && $1 != "commands:" {
    if ($1 == "bench") print $1 " " $2; else print $1 }')
for want in info tokenize data init-model forward quantize generate export merge train \
    "bench ops" "bench quant" "bench quant-model" "bench tokenize" "bench generate" \
    "bench ckpt"; do
    grep -qx "$want" <<<"$cmds" || bad "top-level usage lacks '$want'"
done
while read -r c; do
    [ -z "$c" ] && continue
    # shellcheck disable=SC2086
    a=$("$molt" $c --help 2>&1); rc_a=$?
    # shellcheck disable=SC2086
    b=$("$molt" help $c 2>&1); rc_b=$?
    if [ "$rc_a" -eq 0 ] && [ "$rc_b" -eq 0 ] && [ "$a" == "$b" ] && [[ "$a" == *usage* ]]; then
        ok "molt help $c"
    else
        bad "molt help $c ($rc_b) differs from molt $c --help ($rc_a)"
    fi
done <<<"$cmds"
run "$molt" help frobnicate
same "help of an unknown command: status" "$rc" 2
has_err "help of an unknown command: message" "unknown command 'frobnicate'"

# --flag=value means --flag value
run "$molt" tokenize --tokenizer "$tok" --text "hello world"
want=$out
run "$molt" tokenize --tokenizer="$tok" --text="hello world"
same "--flag=value" "$rc $out" "0 $want"
run "$molt" tokenize "--tokenizer=$tok" --text=--not-an-option
same "a value starting with -- through --flag=value" "$rc" 0

# a value that starts with -- is a missing value
run "$molt" init-model --out --preset tiny
same "value starting with --: status" "$rc" 2
has_err "value starting with --: message" "--out needs a value (got the option '--preset'"
[ -e ./--preset ] && bad "a directory named --preset was written"
run "$molt" generate --model "$tmp/none" --prompt
same "missing value at the end: status" "$rc" 2
has_err "missing value at the end: message" "molt generate: --prompt needs a value"
run "$molt" tokenize --tokenizer= --text x
same "empty --flag=: status" "$rc" 2
has_err "empty --flag=: message" "--tokenizer needs a value"
# flags take no value; unknown options and stray words are refused
run "$molt" tokenize --tokenizer "$tok" --text x --bos=yes
same "flag with a value: status" "$rc" 2
has_err "flag with a value: message" "--bos takes no value"
run "$molt" merge --model a --adapter b --out c --frobnicate=3
same "unknown --x=v: status" "$rc" 2
has_err "unknown --x=v: message" "unknown option '--frobnicate'"
run "$molt" quantize --model a stray --quant nf4 --out b
same "stray argument: status" "$rc" 2
has_err "stray argument: message" "unexpected argument 'stray'"
has_err "usage hint" "run 'molt quantize --help'"
# --help wins wherever it stands as an option, not when it is a value
run "$molt" tokenize --bogus --help
same "--help after a bad option" "$rc" 0
run "$molt" generate --model "$tmp/none" --prompt -h
same "-h as a value is a value" "$rc" 1

# --version: the version and the commit
run "$molt" --version
same "--version: status" "$rc" 0
[[ "$out" =~ ^molt\ [0-9]+\.[0-9]+\.[0-9]+\ \(git\ [^\)]+\)$ ]] && ok "--version format" ||
    bad "--version: '$out'"
# the commit named is one of this repository's (the one built; HEAD may have moved since)
if command -v git >/dev/null && git -C "$src" rev-parse HEAD >/dev/null 2>&1; then
    commit=$(sed -E 's/.*\(git (.*-g)?([0-9a-f]{7,40})(-dirty)?\)$/\2/' <<<"$out")
    git -C "$src" cat-file -e "$commit^{commit}" 2>/dev/null && ok "--version names commit $commit" ||
        bad "--version: '$out' names no commit of $src"
fi
info=$("$molt" info | head -1)
same "molt info's first line is the version" "$info" "$out"

cli_done
