#!/usr/bin/env bash
# tests/cli_train_guards.sh: what `molt train` checks so that a run never ends with lost
# work or a silently wrong adapter, each on the tiny preset:
#   - every input is opened and checked at start-up: a missing, empty, unparseable or
#     all-too-long data.eval is refused before training (nothing written); a failing
#     evaluation mid-run still writes the checkpoint of its step first;
#   - a resume with another adapter spec (targets, rank, alpha) is refused;
#   - a non-finite loss, gradient norm or update stops the run naming the step (no NaN
#     adapter is saved); train.on_nonfinite: skip skips those updates; forward and merge
#     refuse non-finite adapters and logits;
#   - truncation that leaves no trained token is a bad record; a run without trained
#     tokens is an error;
#   - lengths past max_position_embeddings, and steps that cannot fit in memory, are refused
#     before the model loads (train) or before running (forward);
#   - data.train FILE@W mixes by weight; bad weights are refused;
#   - a pre-quantized base trains, evaluates and merges (dequantized);
#   - a refused run leaves config.resolved.yaml as it was.
# $1: the molt binary. The exit status is the verdict.
. "$(dirname "$0")/harness/cli_lib.sh" "$@" || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

run "$molt" init-model --preset tiny --seed 1 --out "$tmp/base"
same "init-model" "$rc" 0
head -n 24 "$src/configs/data/digits-train.jsonl" >"$tmp/train.jsonl"
head -n 4 "$src/configs/data/digits-eval.jsonl" >"$tmp/eval.jsonl"
cat >"$tmp/c.yaml" <<YAML
model: {path: $tmp/base}
adapter: {r: 4, alpha: 8, targets: [q_a_proj, o_proj]}
data: {train: $tmp/train.jsonl, eval: $tmp/eval.jsonl, format: alpaca, max_seq_len: 48}
train: {steps: 4, seed: 1}
checkpoint: {every: 2, keep_last: 0}
eval: {every: 2}
output_dir: $tmp/run
YAML
t() { run "$molt" train --config "$tmp/c.yaml" --quiet "$@"; }
refused() { # NAME WANT: the last run failed with WANT in its message
    [ "$rc" -ne 0 ] && ok "$1: refused" || bad "$1: accepted"
    has_err "$1: message" "$2"
}

# ---- start-up checks of the inputs --------------------------------------------------------
t --set data.eval="$tmp/none.jsonl" --set output_dir="$tmp/r1"
refused "missing data.eval" "none.jsonl"
[ -e "$tmp/r1" ] && bad "a refused run created output_dir" || ok "nothing written"
: >"$tmp/empty.jsonl"
t --set data.eval="$tmp/empty.jsonl" --set output_dir="$tmp/r1"
refused "empty data.eval" "data.eval"
echo "not json" >"$tmp/junk.jsonl"
t --set data.eval="$tmp/junk.jsonl" --set output_dir="$tmp/r1"
refused "unparseable data.eval" "junk.jsonl:1"
long=$(printf 'word %.0s' $(seq 200))
echo "{\"instruction\": \"say\", \"output\": \"$long\"}" >"$tmp/long.jsonl"
t --set data.eval="$tmp/long.jsonl" --set data.on_bad=skip --set output_dir="$tmp/r1"
refused "data.eval all too long" "no usable example in the data (1 bad record skipped: too long 1)"
has_err "data.eval all too long: names the key" "data.eval"
[ -e "$tmp/r1" ] && bad "a refused run created output_dir" || ok "nothing written"

# a failing evaluation mid-run: the checkpoint of its step is written first
MOLT_TEST_FAIL_EVAL_AT_STEP=2 run "$molt" train --config "$tmp/c.yaml" --quiet \
    --set output_dir="$tmp/ev"
refused "evaluation failing at step 2" "checkpoint of step 2 was written first"
[ -s "$tmp/ev/checkpoints/step-2.h5" ] && ok "checkpoint of step 2" || bad "no checkpoint"
run "$molt" train --config "$tmp/c.yaml" --quiet --set output_dir="$tmp/ev" --resume auto
same "resumes after the failed evaluation" "$rc" 0

# ---- resume with another adapter ----------------------------------------------------------
t --set train.steps=2
same "a run of 2 steps" "$rc" 0
sums=$(sha256sum "$tmp/run/checkpoints/"* "$tmp/run/config.resolved.yaml")
for change in "adapter.targets=q_a_proj" "adapter.r=8" "adapter.alpha=4"; do
    t --set "$change" --resume auto
    refused "resume with $change" "was trained with another adapter"
done
has_err "the message shows both specs" "targets=q_a_proj+o_proj"
same "refused resumes leave the checkpoints and resolved config" \
    "$(sha256sum "$tmp/run/checkpoints/"* "$tmp/run/config.resolved.yaml")" "$sums"
t --set optim.lr=0.5
refused "a fresh run over checkpoints" "already holds checkpoints"
same "a refused run leaves config.resolved.yaml" \
    "$(sha256sum "$tmp/run/checkpoints/"* "$tmp/run/config.resolved.yaml")" "$sums"
t --resume auto
same "resume with the same adapter" "$rc" 0

# ---- non-finite training --------------------------------------------------------------------
nf="--set output_dir=$tmp/nf --set optim.lr=1e30 --set optim.max_grad_norm=0"
# shellcheck disable=SC2086
t $nf
[ "$rc" -eq 1 ] && [[ "$err" =~ train:\ step\ [0-9]+:\ the\ (loss|gradient\ norm|update) ]] &&
    ok "lr 1e30 without clipping: stopped, naming the step" || bad "lr 1e30: $rc '$err'"
has_err "what to do" "train.on_nonfinite: skip"
[ -e "$tmp/nf/adapter.h5" ] && bad "an adapter was saved" || ok "no adapter saved"
t --set output_dir="$tmp/eps" --set optim.eps=0
refused "eps 0" "train: step 1: the update of"
has_err "eps 0: names the parameter" "would not be finite"
t --set output_dir="$tmp/nfs" --set optim.eps=0 --set train.on_nonfinite=skip
same "on_nonfinite: skip finishes" "$rc" 0
has_err "skipped steps reported" "4 steps skipped for a non-finite loss or update"
run "$molt" forward --model "$tmp/base" --tokens <(echo "1 2 3") --adapter "$tmp/nfs/adapter" \
    --out "$tmp/l.safetensors"
same "the adapter of a skipping run is finite" "$rc" 0

# non-finite adapters and logits
run "$molt" export --model "$tmp/base" --spec r=2,targets=o_proj --b-std 0.1 --out "$tmp/A"
n=$(od -An -t u8 -N 8 "$tmp/A/adapter_model.safetensors" | tr -d ' ')
printf '\x00\x00\xc0\x7f' | dd of="$tmp/A/adapter_model.safetensors" bs=1 seek=$((8 + n)) \
    conv=notrunc 2>/dev/null
run "$molt" forward --model "$tmp/base" --tokens <(echo "1 2 3") --adapter "$tmp/A" \
    --out "$tmp/l2.safetensors"
refused "forward with a NaN adapter" "holds a non-finite value"
[ -e "$tmp/l2.safetensors" ] && bad "logits written" || ok "no logits written"
run "$molt" merge --model "$tmp/base" --adapter "$tmp/A" --out "$tmp/M"
refused "merge with a NaN adapter" "holds a non-finite value"
run "$molt" export --model "$tmp/base" --spec r=2,targets=o_proj+q_a_proj --b-std 3e37 \
    --out "$tmp/H"
run "$molt" forward --model "$tmp/base" --tokens <(echo "1 2 3") --adapter "$tmp/H" \
    --out "$tmp/l3.safetensors"
refused "forward whose logits overflow" "logits hold a non-finite value"
[ -e "$tmp/l3.safetensors" ] && bad "logits written" || ok "no logits written"

# ---- zero trained tokens --------------------------------------------------------------------
t --set output_dir="$tmp/tr" --set data.on_bad=truncate --set data.max_seq_len=6 \
    --set data.eval=
refused "truncation that cuts every trained token" "keeps no trained token"

# ---- lengths and memory ---------------------------------------------------------------------
t --set output_dir="$tmp/big" --set data.max_seq_len=100000000
refused "max_seq_len past the positions" "more than the model's max_position_embeddings 512"
t --set output_dir="$tmp/big" --set train.batch_size=100000000 --set data.max_seq_len=512
refused "a step larger than memory" "out of memory: a step of 100000000 x 512 tokens"
seq -s ' ' 1 600 >"$tmp/long.txt"
run "$molt" forward --model "$tmp/base" --tokens "$tmp/long.txt" --out "$tmp/l4.safetensors"
refused "forward past the positions" "sequence 0: 600 positions, more than"

# ---- mixing weights -------------------------------------------------------------------------
cat >"$tmp/w.yaml" <<YAML
model: {path: $tmp/base}
adapter: {r: 2, targets: [o_proj]}
data: {train: $tmp/train.jsonl, format: alpaca, max_seq_len: 48, packing: false}
train: {epochs: 1, batch_size: 4}
output_dir: $tmp/w1
YAML
run "$molt" train --config "$tmp/w.yaml" --quiet
one=$(wc -l <"$tmp/w1/metrics.jsonl")
run "$molt" train --config "$tmp/w.yaml" --quiet --set output_dir="$tmp/w2" \
    --set data.train="$tmp/train.jsonl@2"
same "weight 2 reads the data twice per epoch" "$(wc -l <"$tmp/w2/metrics.jsonl")" $((2 * one))
run "$molt" train --config "$tmp/w.yaml" --quiet --set data.train="$tmp/train.jsonl@0"
refused "weight 0" "mixing weight '0' is not a number > 0"

# ---- a pre-quantized base -------------------------------------------------------------------
run "$molt" quantize --model "$tmp/base" --quant nf4 --out "$tmp/Q"
same "quantize" "$rc" 0
t --set model.path="$tmp/Q" --set output_dir="$tmp/q" --set train.steps=2
same "training on a pre-quantized base" "$rc" 0
t --set model.path="$tmp/Q" --eval-only
same "--eval-only on a pre-quantized base" "$rc" 0
run "$molt" merge --model "$tmp/Q" --adapter "$tmp/q/adapter" --out "$tmp/QM"
same "merge into a pre-quantized base" "$rc" 0
has_err "merge says it dequantizes" "dequantized to F32"
run "$molt" forward --model "$tmp/QM" --tokens <(echo "1 2 3") --out "$tmp/l5.safetensors"
same "the merged model loads" "$rc" 0

cli_done
