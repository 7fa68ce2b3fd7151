#!/usr/bin/env bash
# tools/quickstart.sh: molt from a fresh checkout to a trained adapter: installs the build
# dependencies (tools/setup.sh), builds, writes the tiny random-init base model with the
# Tekken tokenizer, trains a LoRA adapter on an NF4-quantized copy of it (QLoRA) to spell out
# digits (configs/train/quickstart.yaml, data in configs/data/quickstart-*.jsonl), and
# compares the held-out loss of the base model with and without the adapter. Everything goes
# to out/quickstart/. Run from anywhere: ./tools/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=$(nproc 2>/dev/null || echo 2)
cfg=configs/train/quickstart.yaml

echo "== 1/6 dependencies"
./tools/setup.sh --no-venv

echo "== 2/6 build (build-quickstart/, -j$jobs)"
cmake -S . -B build-quickstart -DCMAKE_BUILD_TYPE=Release -DMOLT_TESTS=OFF >/dev/null
cmake --build build-quickstart -j"$jobs" --target molt >/dev/null
molt=./build-quickstart/molt

echo "== 3/6 tiny base model (random init) + Tekken tokenizer -> out/quickstart/base"
rm -rf out/quickstart
"$molt" init-model --preset tiny --seed 1 --out out/quickstart/base

echo "== 4/6 held-out loss of the base model"
"$molt" train --config "$cfg" --eval-only --quiet | tee out/quickstart/eval-base.txt

echo "== 5/6 training the adapter (NF4 base, LoRA r=16): watch the loss fall"
"$molt" train --config "$cfg"

echo "== 6/6 held-out loss with the adapter"
"$molt" train --config "$cfg" --eval-only --quiet --adapter out/quickstart/run/adapter \
    | tee out/quickstart/eval-adapter.txt

first=$(head -n 1 out/quickstart/run/metrics.jsonl | sed -E 's/.*"loss":([^,]*).*/\1/')
last=$(tail -n 1 out/quickstart/run/metrics.jsonl | sed -E 's/.*"loss":([^,]*).*/\1/')
base=$(awk '{print $2}' out/quickstart/eval-base.txt)
tuned=$(awk '{print $2}' out/quickstart/eval-adapter.txt)
echo
echo "training loss: first step $first, last step $last"
echo "eval loss:     base $base, base + adapter $tuned"
if awk -v b="$base" -v t="$tuned" 'BEGIN { exit !(t < b) }'; then
    echo "the adapter lowers the held-out loss"
else
    echo "the adapter did NOT lower the held-out loss" >&2
    exit 1
fi

prompt="Spell out the digits: 3 1 4"
echo "== generation (NF4 base) without and with the adapter: \"$prompt\""
"$molt" generate --model out/quickstart/base --base-quant nf4 --chat --prompt "$prompt" --max-tokens 12
"$molt" generate --model out/quickstart/base --base-quant nf4 --chat --prompt "$prompt" --max-tokens 12 \
    --adapter out/quickstart/run/adapter
echo "adapter: out/quickstart/run/adapter (PEFT) and out/quickstart/run/adapter.h5"
echo "== training report (loss, learning rate, gradient norm, tokens/s against step)"
"$molt" report --run out/quickstart/run
