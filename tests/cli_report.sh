#!/usr/bin/env bash
# tests/cli_report.sh: `molt report --run DIR`: a metrics.jsonl in the format molt train
# writes (train/metrics.c) becomes DIR/report.html (or --out FILE) with four charts that
# rsvg-convert renders, the run's config shown escaped, and the path on stdout; bad logs
# and bad usage get precise errors.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1

run_dir=$tmp/run
mkdir -p "$run_dir"
for s in $(seq 1 30); do
    ev=""
    [ $((s % 10)) -eq 0 ] && ev=",\"eval_loss\":$(awk -v s="$s" 'BEGIN { print 3 - s / 20 }')"
    printf '{"step":%d,"loss":%s,"lr":%s,"grad_norm":%s,"tokens":%d,"tokens_per_s":%s,"elapsed_s":%s%s}\n' \
        "$s" "$(awk -v s="$s" 'BEGIN { print 10 * exp(-s / 8) + 2 }')" \
        "$(awk -v s="$s" 'BEGIN { print 0.001 * (s < 5 ? s / 5 : 1) }')" \
        "$(awk -v s="$s" 'BEGIN { print 1 + 1 / s }')" $((s * 512)) 1500.5 "$s" "$ev"
done >"$run_dir/metrics.jsonl"
printf 'model:\n  path: "a <b> & c"\n' >"$run_dir/config.resolved.yaml"

run "$molt" report --run "$run_dir"
same "report exits 0" "$rc" 0
same "report prints the path" "$out" "$run_dir/report.html"
[ -s "$run_dir/report.html" ] || fail "no report.html"
html=$(cat "$run_dir/report.html")
same "four charts" "$(grep -c '<svg ' <<<"$html")" 4
has "loss chart" "$html" "<title>loss</title>"
has "learning rate chart" "$html" "<title>learning rate</title>"
has "grad norm chart" "$html" "<title>gradient norm (before clipping)</title>"
has "throughput chart" "$html" "<title>throughput</title>"
has "eval loss series" "$html" "eval loss"
has "config escaped" "$html" "path: &quot;a &lt;b&gt; &amp; c&quot;"
has "summary" "$html" "30 logged, 1 to 30"
same "nothing external" "$(grep -c -E '<script|<link|src=|url\(' <<<"$html")" 0

if command -v rsvg-convert >/dev/null; then
    awk '/<svg /{f=1; n++} f{print > (dir "/chart" n ".svg")} /<\/svg>/{f=0}' dir="$tmp" \
        "$run_dir/report.html"
    for i in 1 2 3 4; do
        if rsvg-convert -o "$tmp/chart$i.png" "$tmp/chart$i.svg" 2>"$tmp/rsvg.err"; then
            size=$(od -An -t u1 -j 16 -N 8 "$tmp/chart$i.png" | awk '{print ($1*16777216+$2*65536+$3*256+$4) "x" ($5*16777216+$6*65536+$7*256+$8)}')
            same "chart $i renders at its size" "$size" "720x320"
        else
            bad "chart $i does not render: $(cat "$tmp/rsvg.err")"
        fi
    done
else
    echo "rsvg-convert not found (librsvg2-bin): rendering not checked"
fi

run "$molt" report --run "$run_dir" --out "$tmp/other.html"
same "--out exits 0" "$rc" 0
same "--out path printed" "$out" "$tmp/other.html"
cmp -s "$tmp/other.html" "$run_dir/report.html" && ok "same log, same page" || bad "pages differ"

# a run killed mid-line: the unfinished last line is reported and left out
cp "$run_dir/metrics.jsonl" "$tmp/m.jsonl"
mkdir -p "$tmp/cut" && { cat "$tmp/m.jsonl"; printf '{"step":31,"lo'; } >"$tmp/cut/metrics.jsonl"
run "$molt" report --run "$tmp/cut"
same "cut log exits 0" "$rc" 0
has_err "cut line reported" "metrics.jsonl:31: ignoring the unfinished last line"

# bad input
mkdir -p "$tmp/bad" "$tmp/empty" "$tmp/none"
{ head -n 3 "$tmp/m.jsonl"; echo '{"step":4,"loss":"x"}'; tail -n 2 "$tmp/m.jsonl"; } >"$tmp/bad/metrics.jsonl"
run "$molt" report --run "$tmp/bad"
same "bad value exits 1" "$rc" 1
has_err "bad value names file:line and key" "$tmp/bad/metrics.jsonl:4: \"loss\" must be a number or null"
printf 'not json\n' >"$tmp/bad/metrics.jsonl"
run "$molt" report --run "$tmp/bad"
has_err "not JSON names file:line" "$tmp/bad/metrics.jsonl:1: not JSON"
printf '{"loss":1}\n' >"$tmp/bad/metrics.jsonl"
run "$molt" report --run "$tmp/bad"
has_err "no step" "metrics.jsonl:1: expected an object with an integer \"step\""
: >"$tmp/empty/metrics.jsonl"
run "$molt" report --run "$tmp/empty"
same "empty log exits 1" "$rc" 1
has_err "empty log" "no metrics"
run "$molt" report --run "$tmp/none"
has_err "missing log" "cannot open $tmp/none/metrics.jsonl"
[ -e "$tmp/none/report.html" ] && bad "report written for a missing log" || ok "nothing written"
run "$molt" report --run "$run_dir" --out "$tmp/no/such/dir/r.html"
same "unwritable out exits 1" "$rc" 1
has_err "unwritable out named" "$tmp/no/such/dir/r.html"

# usage
run "$molt" report
same "no --run exits 2" "$rc" 2
has_err "no --run" "--run OUTPUT_DIR is required"
run "$molt" report --run
same "--run without value exits 2" "$rc" 2
run "$molt" report --run "$run_dir" --bogus
has_err "unknown option" "unknown option '--bogus'"
run "$molt" report --help
same "--help exits 0" "$rc" 0
has_out "--help usage" "usage: molt report --run OUTPUT_DIR"
run "$molt" --help
has_out "listed in molt --help" "report"
cli_done
