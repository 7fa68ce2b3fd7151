#!/usr/bin/env bash
# tests/cli_serve_api.sh: `molt serve` end to end on the tiny model with two adapters exported
# by molt, on an ephemeral loopback port: the official openai client (completions equal to
# `molt generate`, chat, streaming with usage, echo + logprobs, model = adapter, 404, 401,
# runtime load/unload), then raw curl for the error statuses (400 with the JSON position or
# the field, 400 over --max-model-len with both numbers, 413, 401, 403 outside --adapter-dir),
# and a clean exit on SIGTERM. $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
. "$(dirname "$0")/harness/serve_lib.sh" || exit 1

serve_model
api_key=k-$RANDOM$RANDOM
generated=$("$molt" generate --model "$tmp/m" --prompt "Once upon a time" --max-tokens 12 2>/dev/null)
generated_ad=$("$molt" generate --model "$tmp/m" --adapter "$tmp/ad1" --prompt "Once upon a time" \
    --max-tokens 12 2>/dev/null)
serve_start api --model "$tmp/m" --served-model-name tiny --adapter "ad1=$tmp/ad1" \
    --allow-runtime-adapters --adapter-dir "$tmp" --api-key "$api_key" --max-body-bytes 4096 \
    --access-log "$tmp/access.log"
has "start-up line: adapters" "$(cat "$tmp/api.out")" "ad1 = $tmp/ad1"
has "start-up line: KV capacity" "$(cat "$tmp/api.out")" "KV cache"
has "start-up line: vocabulary projection" "$(cat "$tmp/api.out")" "vocabulary projection"
has "start-up line: prompt products" "$(cat "$tmp/api.out")" "prompt tokens' quantized products"

if "$py" "$src/tests/harness/serve_client.py" suite "$url" "$api_key" tiny ad1 "$generated" "$generated_ad" \
    >"$tmp/suite.log" 2>&1; then
    ok "openai client suite ($(grep -c '^ok:' "$tmp/suite.log") checks)"
else
    bad "openai client suite: $(grep -v '^ok:' "$tmp/suite.log" | tail -20)"
fi

# curl STATUS_WANTED NAME BODY [extra curl args]: POST /v1/completions, checks the status
auth=(-H "Authorization: Bearer $api_key")
post() {
    local want=$1 name=$2 body=$3
    shift 3
    local got
    got=$(curl -s -o "$tmp/body" -w '%{http_code}' "${auth[@]}" -H 'Content-Type: application/json' \
        --data-binary "$body" "$@" "$url/v1/completions")
    same "$name: status" "$got" "$want"
}
post 400 "invalid JSON" '{"model": "tiny", "prompt": "x",,}'
has "invalid JSON: position" "$(cat "$tmp/body")" "line 1 column"
post 400 "wrong type" '{"model": "tiny", "prompt": "x", "max_tokens": "many"}'
has "wrong type: names the field" "$(cat "$tmp/body")" '"param":"max_tokens"'
post 400 "temperature out of range" '{"model": "tiny", "prompt": "x", "temperature": -1}'
post 400 "over max-model-len" '{"model": "tiny", "prompt": "x", "max_tokens": 100000}'
has "over max-model-len: both numbers" "$(cat "$tmp/body")" "100002"
post 200 "unknown fields ignored" '{"model": "tiny", "prompt": "x", "max_tokens": 2, "frobnicate": {"a": 1}}'
post 404 "unknown model" '{"model": "nope", "prompt": "x"}'
same "unknown model: body" "$(cat "$tmp/body")" \
    '{"error":{"message":"The model `nope` does not exist.","type":"NotFoundError","param":"model","code":404}}'
big=$(head -c 5000 /dev/zero | tr '\0' ' ')
post 413 "body over --max-body-bytes" "{\"prompt\": \"x\"$big}"
same "no key: 401" "$(curl -s -o /dev/null -w '%{http_code}' "$url/v1/models")" 401
same "no key on /health: 200" "$(curl -s -o /dev/null -w '%{http_code}' "$url/health")" 200
loadst() {
    curl -s -o "$tmp/body" -w '%{http_code}' "${auth[@]}" -H 'Content-Type: application/json' \
        --data-binary "$1" "$url/v1/load_lora_adapter"
}
mkdir -p "$tmp/outside" && cp -r "$tmp/ad2" "$tmp/outside/x"
ln -s "$tmp/outside/x" "$tmp/m/linked" 2>/dev/null
same "load outside --adapter-dir: 403" "$(loadst "{\"lora_name\": \"o\", \"lora_path\": \"/etc\"}")" 403
same "load a missing path: 404" "$(loadst '{"lora_name": "o", "lora_path": "nothing-here"}')" 404
same "load without a name: 400" "$(loadst '{"lora_path": "ad2"}')" 400
grep -q '"status":200' "$tmp/access.log" && ok "access log lines" || bad "access log: $(head -3 "$tmp/access.log")"

serve_stop
same "SIGTERM: exit status" "$serve_rc" 0
cli_done
