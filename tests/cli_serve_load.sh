#!/usr/bin/env bash
# tests/cli_serve_load.sh: `molt serve` under load on the tiny model: 64 concurrent greedy
# requests over 4 adapters and the base all complete and each equals its solo run, and the
# KV blocks in use return to 0; a client killed mid-stream has its request cancelled (the
# access log says so, nothing keeps running, no block stays used); SIGTERM during a stream
# lets it finish and the server exits 0. $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
. "$(dirname "$0")/harness/serve_lib.sh" || exit 1

serve_model
spec="r=4,alpha=8,targets=q_b_proj+kv_b_proj+o_proj+shared_experts.up_proj"
for k in 3 4; do
    "$molt" export --model "$tmp/m" --spec "$spec" --b-std 0.5 --b-seed "$k" --format molt \
        --out "$tmp/ad$k.h5" >/dev/null 2>&1 || fail "export adapter $k"
done
api_key=""
serve_start load --model "$tmp/m" --served-model-name tiny --adapter "a1=$tmp/ad1" \
    --adapter "a2=$tmp/ad2" --adapter "a3=$tmp/ad3.h5" --adapter "a4=$tmp/ad4.h5" \
    --max-num-seqs 32 --access-log "$tmp/access.log" --shutdown-grace-s 300

if "$py" "$src/tests/harness/serve_client.py" concurrency "$url" "" 64 tiny a1 a2 a3 a4 \
    >"$tmp/conc.log" 2>&1; then
    ok "$(grep '^ok:' "$tmp/conc.log" | head -1 | cut -c5-)"
else
    bad "concurrency: $(tail -5 "$tmp/conc.log")"
fi
settled() { # waits for the engine to go idle
    local i
    for i in $(seq 1 600); do # a busy machine may take a while
        [ "$(metric molt_num_requests_running)" == 0 ] && [ "$(metric molt_kv_blocks_used)" == 0 ] \
            && return 0
        sleep 0.1
    done
    return 1
}
settled && ok "KV blocks in use back to 0" \
    || bad "after the load: running $(metric molt_num_requests_running), blocks $(metric molt_kv_blocks_used)"

# a client killed mid-stream
"$py" "$src/tests/harness/serve_client.py" stream "$url" "" a2 480 >"$tmp/kill.log" 2>&1 &
client=$!
for i in $(seq 1 1200); do grep -q started "$tmp/kill.log" && break; sleep 0.05; done
kill -9 "$client" 2>/dev/null
wait "$client" 2>/dev/null
settled && ok "killed client: nothing left running" \
    || bad "killed client: running $(metric molt_num_requests_running), blocks $(metric molt_kv_blocks_used)"
sleep 0.2
# the one request whose client went away (the /metrics polls above log lines after it)
grep '"path":"/v1/completions"' "$tmp/access.log" | grep -q '"client_gone":true' \
    && ok "killed client: logged as gone" || bad "killed client: not logged as gone"

# SIGTERM while a stream runs: it finishes, then the server exits 0
"$py" "$src/tests/harness/serve_client.py" stream "$url" "" a3 480 >"$tmp/drain.log" 2>&1 &
client=$!
for i in $(seq 1 1200); do grep -q started "$tmp/drain.log" && break; sleep 0.05; done
serve_stop
wait "$client"
same "drain: the stream finished" "$(grep '^finish' "$tmp/drain.log")" "finish length"
same "drain: exit status" "$serve_rc" 0
cli_done
