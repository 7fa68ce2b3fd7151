#!/usr/bin/env bash
# tests/cli_bench_quant.sh: `molt bench quant --quick` prints the storage table (NF4 with
# double quantization at most 4.13 bits/param) and a fwd and a dx row for NF4 and INT8 on
# every size, each with positive timings and rates; bad options are refused.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

out=$("$molt" bench quant --quick --repeat 2 --threads 2) || fail "molt bench quant --quick exited $?"
grep -q "vs_sgemm" <<<"$out" || fail "no table header: $out"
grep -q "2 threads" <<<"$out" || fail "--threads 2 not reported: $out"
bits=$(awk '/^nf4 \+ double quantization/ { print $(NF-1) }' <<<"$out")
[ -n "$bits" ] || fail "no nf4+dq storage row: $out"
awk -v b="$bits" 'BEGIN { exit !(b > 4.0 && b <= 4.13) }' || fail "nf4+dq uses $bits bits/param"
for fmt in nf4 int8; do
    for pass in fwd dx; do
        n=$(awk -v f="$fmt" -v p="$pass" '$1 == f && $3 == p' <<<"$out" | wc -l)
        [ "$n" -eq 2 ] || fail "expected 2 '$fmt $pass' rows, got $n: $out"
    done
done
# columns: fmt shape pass ms GFLOP/s sgemm_ms sgemm_GF vs_sgemm bits/param W_MiB
bad=$(awk '($1 == "nf4" || $1 == "int8") && ($3 == "fwd" || $3 == "dx") {
    for (i = 4; i <= 9; i++) if (!($i ~ /^[0-9.]+$/) || $i + 0 <= 0) print }' <<<"$out")
[ -z "$bad" ] || fail "non-positive or missing numbers: $bad"

"$molt" bench quant --bogus 2>/dev/null && fail "unknown option accepted"
"$molt" bench quant --repeat 0 2>"$tmp/err" && fail "--repeat 0 accepted"
grep -q "\-\-repeat '0' is not an integer in \[1, 1000\]" "$tmp/err" || fail "no message for --repeat 0"
"$molt" bench quant --threads 2>/dev/null && fail "--threads without a value accepted"
"$molt" bench quant --help | grep -q -- "--quick" || fail "--help does not describe --quick"
ok "bench quant"
cli_done
