# tests/harness/serve_lib.sh: what the end-to-end tests of `molt serve` (tests/cli_serve_*.sh)
# share, sourced after cli_lib.sh:
#     . "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
#     . "$(dirname "$0")/harness/serve_lib.sh" || exit 1
# It skips the test (exit 77) when the binary has no `serve` command (built without the
# serving engine) or when the project virtualenv (.venv, made by tools/setup.sh) lacks the
# openai client, and defines
#   py                  the virtualenv's python
#   serve_model         writes the tiny model to $tmp/m and two adapters ($tmp/ad1, $tmp/ad2:
#                       PEFT directories exported with random B so they change the output)
#   serve_start NAME ARGS...   starts `molt serve --port 0 ARGS` in the background (stdout in
#                       $tmp/NAME.out, stderr in $tmp/NAME.err), waits for its "listening on"
#                       line and for GET /health; sets server_pid, port and url
#   serve_stop          SIGTERM, then waits; sets serve_rc to the exit status
#   metric NAME         the value of a /metrics line (NAME with its labels), "" if absent
# A server still running when the script exits is killed.

"$molt" serve --help >/dev/null 2>&1 || { echo "skip: molt has no serve command"; exit 77; }
py="$src/.venv/bin/python"
"$py" -c 'import openai' 2>/dev/null || { echo "skip: $src/.venv lacks openai (run tools/setup.sh)"; exit 77; }

server_pid=""
trap '[ -n "$server_pid" ] && kill -9 "$server_pid" 2>/dev/null; rm -rf "$tmp"' EXIT

serve_model() {
    "$molt" init-model --preset tiny --seed 7 --out "$tmp/m" >"$tmp/init.log" 2>&1 \
        || fail "init-model: $(tail -3 "$tmp/init.log")"
    local spec="r=4,alpha=8,targets=q_b_proj+kv_b_proj+o_proj+shared_experts.up_proj"
    local k
    for k in 1 2; do
        "$molt" export --model "$tmp/m" --spec "$spec" --b-std 0.5 --b-seed "$k" \
            --out "$tmp/ad$k" >"$tmp/export.log" 2>&1 || fail "export: $(tail -3 "$tmp/export.log")"
    done
}

serve_start() {
    local name=$1
    shift
    "$molt" serve --port 0 "$@" >"$tmp/$name.out" 2>"$tmp/$name.err" &
    server_pid=$!
    port=""
    local i
    for i in $(seq 1 600); do
        port=$(sed -n 's|.*listening on http://[^ ]*:\([0-9][0-9]*\)$|\1|p' "$tmp/$name.out")
        [ -n "$port" ] && break
        kill -0 "$server_pid" 2>/dev/null || fail "molt serve exited: $(tail -5 "$tmp/$name.err")"
        sleep 0.1
    done
    [ -n "$port" ] || fail "molt serve did not start listening: $(tail -5 "$tmp/$name.err")"
    url="http://127.0.0.1:$port"
    for i in $(seq 1 100); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$url/health")" == 200 ] && return 0
        sleep 0.1
    done
    fail "GET /health never answered 200"
}

serve_stop() {
    kill -TERM "$server_pid"
    wait "$server_pid"
    serve_rc=$?
    server_pid=""
}

metric() {
    curl -s ${api_key:+-H "Authorization: Bearer $api_key"} "$url/metrics" \
        | awk -v n="$1" '$1 == n { print $2 }'
}
