#!/usr/bin/env bash
# tools/quickstart.sh: molt from a fresh checkout to a served adapter, in about two minutes on
# two cores: installs the build dependencies (tools/setup.sh), builds, writes the tiny
# random-init base model with the Tekken tokenizer, trains a QLoRA adapter on an NF4 copy of
# it to answer "NAME has D OBJECTs. How many OBJECTs does NAME have? Answer in words."
# (configs/train/quickstart.yaml, data configs/data/count-*.jsonl from
# tools/make_quickstart_data.py), compares the base with and without the adapter on 200
# held-out questions about people never named in training (molt eval: loss and exact match,
# intervals, paired test, report.html; configs/eval/quickstart.yaml), draws the learning
# curves (molt report), then serves the base and the adapter over HTTP (molt serve), asks
# both one held-out question with curl and stops the server.
#
# It fails (exit 1) unless the adapter beats the base: held-out exact match at least 0.90
# for the adapter, at most 0.10 for the base, the paired difference significant (McNemar,
# p < 0.01) and the held-out loss lower. Everything goes to out/quickstart/.
#
#   tools/quickstart.sh [--molt BIN] [--out DIR] [--seed S] [--steps N] [--limit N] [--no-bars]
#
#   --molt BIN  use this molt binary: no set-up, no build (the CLI test does this)
#   --out DIR   write into DIR instead of out/quickstart (it is replaced)
#   --seed S    another draw of everything random: the base model's weights (init seed S),
#               the data (make_quickstart_data.py --seed S, written to DIR/data) and the
#               training seed S; without it: init seed 1, the committed data, training seed 1
#   --steps N   train N steps instead of the config's 800
#   --limit N   evaluate the first N held-out questions only
#   --no-bars   print the figures but do not fail on them (short runs)
#
# It is a demonstration, not a benchmark: the figures it prints are those of this run.
# Needs curl and python3 (both installed by tools/setup.sh). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS

molt=""
out=out/quickstart
seed=""
steps=""
limit=""
bars=1
usage() {
    echo "usage: $0 [--molt BIN] [--out DIR] [--seed S] [--steps N] [--limit N] [--no-bars]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case $1 in
    --molt) [ $# -ge 2 ] || usage; molt=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
    --seed) [ $# -ge 2 ] || usage; seed=$2; shift 2 ;;
    --steps) [ $# -ge 2 ] || usage; steps=$2; shift 2 ;;
    --limit) [ $# -ge 2 ] || usage; limit=$2; shift 2 ;;
    --no-bars) bars=0; shift ;;
    *) usage ;;
    esac
done
[[ -z "$seed" || "$seed" =~ ^(0|[1-9][0-9]{0,8})$ ]] || { echo "quickstart: seed '$seed' is not an integer 0-999999999" >&2; exit 2; }
for n in "$steps" "$limit"; do
    [[ -z "$n" || "$n" =~ ^[1-9][0-9]*$ ]] || { echo "quickstart: '$n' is not a positive integer" >&2; exit 2; }
done

jobs=$(nproc 2>/dev/null || echo 2) # before OMP_NUM_THREADS is set: nproc honours it
# The tiny model's operations are too small for a second OpenMP thread to pay off, and on a
# machine shared with other jobs two spinning threads on two cores train ten times slower
# than one (measured: 480-800 tok/s against 5000). One thread unless the caller says otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?"; }
echo "quickstart: load average $(load) at the start; OMP_NUM_THREADS=$OMP_NUM_THREADS"

if [ -z "$molt" ]; then
    echo "== 1/7 dependencies"
    ./tools/setup.sh --no-venv
    echo "== 2/7 build (build-quickstart/, -j$jobs)"
    cmake -S . -B build-quickstart -DCMAKE_BUILD_TYPE=Release -DMOLT_TESTS=OFF >/dev/null
    cmake --build build-quickstart -j"$jobs" --target molt >/dev/null
    molt=./build-quickstart/molt
    echo "built $molt in $((SECONDS - t0)) s"
else
    echo "== 1-2/7 set-up and build skipped: $molt"
fi
for tool in curl python3; do
    command -v "$tool" >/dev/null || { echo "quickstart: needs $tool (tools/setup.sh installs it)" >&2; exit 1; }
done

cfg=configs/train/quickstart.yaml
suite=configs/eval/quickstart.yaml
train_set=configs/data/count-train.jsonl
held_set=configs/data/count-eval.jsonl
echo "== 3/7 base model: the tiny preset, random init (seed ${seed:-1}), Tekken tokenizer -> $out/base"
rm -rf "$out"
mkdir -p "$out"
"$molt" init-model --preset tiny --seed "${seed:-1}" --out "$out/base"
if [ -n "$seed" ]; then
    mkdir -p "$out/data"
    python3 tools/make_quickstart_data.py "$out/data" --seed "$seed"
    train_set=$out/data/count-train.jsonl
    held_set=$out/data/count-eval.jsonl
fi
echo "task: $(wc -l <"$train_set") training questions ($train_set), such as"
head -n 2 "$train_set" | sed 's/^/    /'
echo "held out: $(wc -l <"$held_set") questions about people never named in training ($held_set)"

echo "== 4/7 training the adapter: QLoRA on the NF4 base ($cfg)"
train_args=(--set "model.path=$out/base" --set "output_dir=$out/run"
            --set "data.train=$train_set" --set "data.eval=$held_set" --set "train.seed=${seed:-1}")
[ -n "$steps" ] && train_args+=(--set "train.steps=$steps" --set "checkpoint.every=$steps" --set "eval.every=$steps")
"$molt" train --config "$cfg" "${train_args[@]}"

echo "== 5/7 molt eval: base against base + adapter on the held-out questions ($suite)"
eval_args=(--set "model=$out/base" --set "adapters.count=$out/run/adapter" --set "out=$out/eval"
           --set "datasets.held_out_loss.path=$held_set" --set "datasets.held_out_answers.path=$held_set")
[ -n "$limit" ] && eval_args+=(--set "limit=$limit")
"$molt" eval --config "$suite" --quiet "${eval_args[@]}" | tee "$out/eval.txt"
# The bars, read from report.json: exact match and loss per system, the paired test.
verdict=0
python3 - "$out/eval/report.json" "$bars" >"$out/verdict.txt" <<'PY' || verdict=$?
import json, sys
report, bars = json.load(open(sys.argv[1])), sys.argv[2] == "1"
def row(dataset, metric, system):
    d = next(d for d in report["datasets"] if d["name"] == dataset)
    m = next(m for m in d["tables"][0]["metrics"] if m["metric"] == metric)
    return next(s for s in m["systems"] if s["system"] == system)
em_base = row("held_out_answers", "exact_match:case+space", "base")["mean"]
em = row("held_out_answers", "exact_match:case+space", "count")
loss_base = row("held_out_loss", "loss", "base")["mean"]
loss = row("held_out_loss", "loss", "count")["mean"]
vs = em["vs_baseline"]
print(f"held-out exact match: base {em_base:.3f}, adapter {em['mean']:.3f} "
      f"[{em['ci'][0]:.3f}, {em['ci'][1]:.3f}]; difference {vs['diff']:+.3f}, "
      f"McNemar p = {vs['p']:.3g}, win/tie/loss {vs['win']}/{vs['tie']}/{vs['loss']}")
print(f"held-out loss (mean per question): base {loss_base:.4f}, adapter {loss:.4f}")
fails = []
if em["mean"] < 0.90: fails.append(f"adapter exact match {em['mean']:.3f} < 0.90")
if em_base > 0.10: fails.append(f"base exact match {em_base:.3f} > 0.10")
if not (vs["diff"] > 0 and vs["p"] < 0.01): fails.append("the difference is not significant at 0.01")
if not loss < loss_base: fails.append("the adapter does not lower the held-out loss")
if not bars:
    print("bars not checked (--no-bars)")
elif fails:
    print("the adapter does NOT beat the base: " + "; ".join(fails))
    sys.exit(1)
else:
    print("the adapter beats the base (exact match >= 0.90 where the base's <= 0.10, p < 0.01, lower loss)")
PY
cat "$out/verdict.txt"
[ "$verdict" == 0 ] || { echo "quickstart: FAILED after $((SECONDS - t0)) s" >&2; exit 1; }
echo "report: $out/eval/report.html (tables, charts), report.md, report.json, samples.jsonl"

echo "== 6/7 molt report: the training run's learning curves"
"$molt" report --run "$out/run"

echo "== 7/7 molt serve: the base and the adapter over HTTP"
"$molt" serve --model "$out/base" --base-quant nf4 --served-model-name base \
    --adapter "count=$out/run/adapter" --port 0 --kv-cache-mib 16 \
    >"$out/serve.out" 2>"$out/serve.log" &
server=$!
trap 'kill -9 "$server" 2>/dev/null || true' EXIT
port=""
# the model loads and quantizes before the server listens: up to 2 minutes on a busy machine
# (the loop stops as soon as the port shows, or the server exits)
for _ in $(seq 1 1200); do
    port=$(sed -n 's|.*listening on http://[^ ]*:\([0-9][0-9]*\)$|\1|p' "$out/serve.out")
    [ -n "$port" ] && break
    kill -0 "$server" 2>/dev/null || { cat "$out/serve.log" >&2; echo "quickstart: molt serve exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$port" ] || { echo "quickstart: molt serve did not start" >&2; exit 1; }
sed 's/^/    /' "$out/serve.out"
# One held-out question (the first with the answer "seven"), asked of both models.
question=$(python3 -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["output"] == "seven":
        print(r["instruction"]); break' "$held_set")
for model in base count; do
    body=$(python3 -c 'import json, sys
print(json.dumps({"model": sys.argv[1], "messages": [{"role": "user", "content": sys.argv[2]}],
                  "max_tokens": 8, "temperature": 0}))' "$model" "$question")
    echo "\$ curl -s localhost:$port/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": \"$question\"}], \"max_tokens\": 8, \"temperature\": 0}'"
    curl -s "localhost:$port/v1/chat/completions" -H 'Content-Type: application/json' \
        -d "$body" >"$out/answer-$model.json"
    python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("    %-5s answers %s" % (sys.argv[2], json.dumps(r["choices"][0]["message"]["content"], ensure_ascii=False)))' \
        "$out/answer-$model.json" "$model"
done
kill -TERM "$server"
rc=0
wait "$server" || rc=$?
trap - EXIT
tail -n 2 "$out/serve.log" | sed 's/^/    /'
[ "$rc" == 0 ] || { echo "quickstart: molt serve exited with status $rc" >&2; exit 1; }
echo "molt serve stopped cleanly (exit status 0); its access log: $out/serve.log"

echo
echo "quickstart: done in $((SECONDS - t0)) s (load average $(load) at the end)"
head -n 1 "$out/verdict.txt"
echo "adapter: $out/run/adapter (PEFT) and $out/run/adapter.h5"
echo "pages: $out/eval/report.html (base against adapter), $out/run/report.html (learning curves)"
