#!/usr/bin/env bash
# tests/cli_info.sh: `molt info` and the top-level command handling.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

out=$("$molt" info) || fail "molt info exited $?"
for want in "molt " "BLAS:" "OpenMP:" "CUDA:" "cuBLAS:" "cuDNN:" "NCCL:" "MPI:" "devices:" "cpu:"; do
    grep -q "$want" <<<"$out" || fail "molt info lacks '$want': $out"
done
"$molt" info --bogus 2>/dev/null && fail "unknown option accepted"
"$molt" frobnicate 2>"$tmp/err" && fail "unknown command accepted"
grep -q "unknown command 'frobnicate'" "$tmp/err" || fail "no message for unknown command"
"$molt" >/dev/null 2>&1 && fail "no command should exit non-zero"
"$molt" --help | grep -q "commands:" || fail "--help lists no commands"
ok "info"
cli_done
