#!/usr/bin/env bash
# tests/cli_bench_ops.sh: `molt bench ops --quick` prints a fwd and a bwd row for every linear
# and attention size and for the fused loss, each with positive timings and rates, then the
# batch-invariant products' decode and prefill rows (f32 and nf4); bad options are refused.
# --device cuda: with a GPU, the quick GPU tables (linear, NF4 linear, NF4 GEMV rows with
# positive rates); without one (or in a build without CUDA), exit 1 with the reason, unless
# MOLT_EXPECT_GPU=1 (tools/gpu-check.sh) says there must be a GPU.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

out=$("$molt" bench ops --quick --repeat 2 --threads 2) || fail "molt bench ops --quick exited $?"
grep -q "vs_sgemm" <<<"$out" || fail "no table header: $out"
grep -q "K = H\*(Dqk+Dv)/2" <<<"$out" || fail "attention baseline not explained: $out"
for op in linear attention; do
    for pass in fwd bwd; do
        n=$(awk -v op="$op" -v pass="$pass" '$1 == op && $3 == pass' <<<"$out" | wc -l)
        [ "$n" -eq 2 ] || fail "expected 2 '$op $pass' rows, got $n: $out"
    done
done
n=$(awk '$1 == "ce_linear" && $3 == "fwd"' <<<"$out" | wc -l)
[ "$n" -eq 1 ] || fail "expected 1 'ce_linear fwd' row, got $n: $out"
# the loss's backward only scales the saved gradient: a time and the sgemm rate
bad=$(awk '$1 == "ce_linear" && $3 == "bwd" &&
           !($4 ~ /^[0-9.]+$/ && $5 == "-" && $6 + 0 > 0)' <<<"$out")
[ -z "$bad" ] && grep -q "^ce_linear .* bwd" <<<"$out" || fail "bad ce_linear bwd row: $out$bad"
# columns: op shape pass ms GFLOP/s sgemm_GFLOP/s vs_sgemm, all numbers > 0
bad=$(awk '($1 == "linear" || $1 == "attention" || ($1 == "ce_linear" && $3 == "fwd")) {
    for (i = 4; i <= 7; i++) if (!($i ~ /^[0-9.]+$/) || $i + 0 <= 0) print }' <<<"$out")
[ -z "$bad" ] || fail "non-positive or missing numbers: $bad"
grep -q "2 threads" <<<"$out" || fail "--threads 2 not reported: $out"
# batch-invariant products: per quick shape and format, decode rows T = 1, 8 (ms GB/s
# read_GB/s vs_read GFLOP/s) and prefill rows T = 128, 512 (ms GFLOP/s sgemm_GF vs_sgemm)
grep -q "read_GB/s" <<<"$out" && grep -q "vs_sgemm = GFLOP/s / sgemm_GFLOP/s" <<<"$out" ||
    fail "no batch-invariant tables: $out"
for f in f32 nf4; do
    for t in 1 8 128 512; do
        n=$(awk -v f="$f" -v t="$t" '$1 == f && $2 == "quick" && $5 == t' <<<"$out" | wc -l)
        [ "$n" -eq 2 ] || fail "expected 2 '$f' rows with T=$t, got $n: $out"
    done
done
# the kernel's own time and rate must be positive; the baselines beside them (a plain read,
# sgemm) and the ratios may print as 0.00 where a sanitizer build slows them past the
# printed precision
bad=$(awk '($1 == "f32" || $1 == "nf4") && $2 == "quick" {
    for (i = 6; i <= NF; i++) if (!($i ~ /^[0-9.]+$/) || (i <= 7 && $i + 0 <= 0)) print }' <<<"$out")
[ -z "$bad" ] || fail "non-positive or missing numbers in the batch-invariant rows: $bad"

"$molt" bench ops --bogus 2>/dev/null && fail "unknown option accepted"
"$molt" bench ops --threads 0 2>"$tmp/err" && fail "--threads 0 accepted"
grep -q "\-\-threads '0' is not an integer in \[1, 1024\]" "$tmp/err" || fail "no message for --threads 0"
"$molt" bench ops --repeat 2>/dev/null && fail "--repeat without a value accepted"
"$molt" bench ops --help | grep -q -- "--quick" || fail "--help does not describe --quick"

"$molt" bench ops --device tpu 2>"$tmp/err" && fail "--device tpu accepted"
grep -q "\-\-device 'tpu' is not one of cpu, cuda" "$tmp/err" || fail "no message for --device tpu: $(cat "$tmp/err")"
"$molt" bench quant --device cuda 2>/dev/null && fail "molt bench quant accepted --device"
if "$molt" bench ops --device cuda --quick >"$tmp/gpu" 2>"$tmp/err"; then
    for op in linear linear_q nf4_gemv; do
        grep -q "^$op " "$tmp/gpu" || fail "no '$op' row in the GPU tables: $(cat "$tmp/gpu")"
    done
    # columns: op shape dtype ms TFLOP/s GB/s baseline... vs: ms and vs positive
    bad=$(awk '$1 == "linear" || $1 == "linear_q" || $1 == "nf4_gemv" {
        if (!($4 + 0 > 0) || !($NF + 0 > 0)) print }' "$tmp/gpu")
    [ -z "$bad" ] || fail "non-positive numbers in the GPU tables: $bad"
    ok "bench ops --device cuda (GPU tables)"
else
    rc=$?
    [ "${MOLT_EXPECT_GPU:-0}" = 1 ] && fail "--device cuda failed on a GPU machine: $(cat "$tmp/err")"
    [ "$rc" -eq 1 ] || fail "--device cuda without a GPU exited $rc, expected 1"
    grep -Eq "no CUDA device visible|this build has no CUDA" "$tmp/err" ||
        fail "--device cuda without a GPU: no reason given: $(cat "$tmp/err")"
fi
ok "bench ops"
cli_done
