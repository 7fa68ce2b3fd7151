#!/usr/bin/env bash
# tests/cli_bench_ckpt.sh: `molt bench ckpt --quick` (tiny preset, rank 4) prints the
# checkpoint row with the adapter's parameter count (recomputed here from the tiny preset's
# shapes), positive write/read seconds and a size that holds the parameters and both AdamW
# moments in F32; bad options are refused. $1: the molt binary.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

out=$("$molt" bench ckpt --quick) || fail "molt bench ckpt --quick exited $?"
# per rank: attention (q_a 24x32, q_b 64x24, kv_a 24x32, kv_b 80x16, o 32x48) in + out over
# 3 layers, shared expert (16x32 twice, 32x16) and routed experts (8 x (32+32), 8 x (32+16))
# over the 2 MoE layers
per_r=$(( 3 * ((24+32) + (64+24) + (24+32) + (80+16) + (32+48)) \
        + 2 * (3 * (16+32)) + 2 * (8 * (32+32) + 8 * (32+16)) ))
row=$(awk '$1 == "checkpoint" && NF == 5' <<<"$out")
[ -n "$row" ] || fail "no checkpoint row: $out"
read -r _ params tensors tw tr <<<"$row"
[ "$params" -eq $(( 4 * per_r )) ] || fail "adapter params $params, expected $(( 4 * per_r ))"
awk -v a="$tw" -v b="$tr" 'BEGIN { exit !(a > 0 && b > 0) }' || fail "times $tw $tr"
mib=$(sed -nE 's/^checkpoint size ([0-9.]+) MiB.*/\1/p' <<<"$out")
[ -n "$mib" ] || fail "no size line: $out"
awk -v m="$mib" -v p="$params" 'BEGIN { b = 12 * p / 1048576; exit !(m >= b && m < b + 1) }' \
    || fail "size $mib MiB for $params parameters"

"$molt" bench ckpt --bogus 2>/dev/null && fail "unknown option accepted"
"$molt" bench ckpt --r 0 2>"$tmp/err" && fail "--r 0 accepted"
grep -q "\-\-r '0' is not an integer in \[1, 4096\]" "$tmp/err" || fail "no message for --r 0"
"$molt" bench ckpt --help | grep -q -- "--quick" || fail "--help does not describe --quick"
ok "bench ckpt"
cli_done
