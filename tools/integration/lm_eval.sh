#!/usr/bin/env bash
# tools/integration/lm_eval.sh: lm-evaluation-harness against `molt serve`, as a user would
# run it: model `local-completions` on /v1/completions with molt's /tokenize, /detokenize
# and /tokenizer_info as its remote tokenizer (token-id prompts, echo + logprobs for
# loglikelihood), on two small tasks shipped here: molt_digits_mc (loglikelihood, acc) and
# molt_digits_gen (generate_until, exact_match). Not part of CI: lm-eval pulls in a large stack of Python packages.
#
#   tools/integration/lm_eval.sh [--model DIR] [--adapter PATH] [--limit N] [--molt BIN]
#
# Without --model it writes the tiny random-init model; with --adapter the requests name the
# adapter ("model": "adapter"). lm-eval goes into a virtualenv outside the repository
# ($MOLT_LMEVAL_VENV, default ~/.cache/molt/lm-eval-venv), made on the first run.
# lm_eval/digits.jsonl holds the first 20 records of configs/data/digits-eval.jsonl, each
# with the answer of the record 7 further on as the other choice (the right one first on
# even lines).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
molt=$root/build/molt
model=""
adapter=""
limit=20
while [ $# -gt 0 ]; do
    case $1 in
    --model) model=$2; shift 2 ;;
    --adapter) adapter=$2; shift 2 ;;
    --limit) limit=$2; shift 2 ;;
    --molt) molt=$2; shift 2 ;;
    *) echo "usage: $0 [--model DIR] [--adapter PATH] [--limit N] [--molt BIN]" >&2; exit 2 ;;
    esac
done
"$molt" serve --help >/dev/null 2>&1 || { echo "lm_eval.sh: $molt has no serve command" >&2; exit 1; }

venv=${MOLT_LMEVAL_VENV:-$HOME/.cache/molt/lm-eval-venv}
if ! "$venv/bin/python" -c 'import lm_eval, tenacity' 2>/dev/null; then
    echo "== lm-eval into $venv (first run: a few minutes)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "lm-eval[api]==0.4.13"
fi

tmp=$(mktemp -d)
server=""
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$tmp"' EXIT
if [ -z "$model" ]; then
    "$molt" init-model --preset tiny --seed 1 --out "$tmp/m" >/dev/null
    model=$tmp/m
fi
mkdir -p "$tmp/tasks"
for t in digits_mc digits_gen; do
    sed "s|DATA|$root/tools/integration/lm_eval/digits.jsonl|" \
        "$root/tools/integration/lm_eval/$t.yaml" >"$tmp/tasks/$t.yaml"
done

args=(--model "$model" --served-model-name base --port 0 --access-log "$tmp/access.log")
name=base
if [ -n "$adapter" ]; then
    args+=(--adapter "adapter=$adapter")
    name=adapter
fi
"$molt" serve "${args[@]}" >"$tmp/serve.out" 2>"$tmp/serve.err" &
server=$!
port=""
for _ in $(seq 1 600); do
    port=$(sed -n 's|.*listening on http://[^ ]*:\([0-9][0-9]*\)$|\1|p' "$tmp/serve.out")
    [ -n "$port" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$tmp/serve.err" >&2; exit 1; }
    sleep 0.1
done
[ -n "$port" ] || { echo "lm_eval.sh: molt serve did not start" >&2; exit 1; }
cat "$tmp/serve.out"

echo "== lm_eval local-completions on http://127.0.0.1:$port (model \"$name\")"
OPENAI_API_KEY=none "$venv/bin/lm_eval" --model local-completions \
    --model_args "model=$name,base_url=http://127.0.0.1:$port/v1/completions,tokenizer_backend=remote,tokenized_requests=True,num_concurrent=4,max_retries=1,max_length=512" \
    --tasks molt_digits_mc,molt_digits_gen --include_path "$tmp/tasks" --limit "$limit" \
    --batch_size 1 2>&1 | tee "$tmp/lm_eval.log" | grep -v -E "^\s*$" | tail -20
kill -TERM "$server"
wait "$server" && server=""
echo "== requests answered: $(grep -c '"status":200' "$tmp/access.log") with status 200, $(grep -vc '"status":200' "$tmp/access.log") other"
