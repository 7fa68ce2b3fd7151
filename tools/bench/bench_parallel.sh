#!/usr/bin/env bash
# tools/bench/bench_parallel.sh: `molt train` on the small preset with 1, 2 and 4 ranks (the
# routed experts split over all of them), printing per rank the peak of molt's data against
# `molt plan`, the bytes each collective moved against what the layout implies, and the split
# of the run's time into collectives and the rest. Not part of tools/test.sh.
#   tools/bench/bench_parallel.sh [BUILD_DIR] [STEPS]
# Environment: MPIEXEC (default mpirun), OMP_NUM_THREADS (default 1 per rank).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build}
steps=${2:-4}
molt=$build/molt
launcher=${MPIEXEC:-mpirun}
export MOLT_SOURCE_DIR=$root OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_mpi_yield_when_idle=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$molt" init-model --preset small --seed 1 --out "$tmp/small" >/dev/null
seq=128
batch=4
ad="r=8,alpha=16,targets=q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+shared_experts.up_proj+experts"
cfg() { # $1 ranks
    cat >"$tmp/c$1.yaml" <<YAML
model:
  path: $tmp/small
adapter:
  spec: "$ad"
data:
  train: $root/configs/data/digits-train.jsonl
  format: alpaca
  max_seq_len: $seq
train:
  batch_size: $batch
  steps: $steps
optim:
  lr: 0.001
checkpoint:
  every: 0
parallel:
  expert: $1
output_dir: $tmp/run$1
YAML
}
conf() { grep "\"$1\"" "$tmp/small/config.json" | head -1 | tr -dc '0-9'; }
H=$(conf hidden_size); K=$(conf num_experts_per_tok); L=$(conf num_hidden_layers)
dense=$(conf first_k_dense_replace); Lm=$((L - dense))
echo "small preset: H=$H, k=$K, $Lm MoE layers; batch $batch x $seq tokens, $steps steps, LoRA $ad"
for n in 1 2 4; do
    cfg "$n"
    plan=$("$molt" plan --model "$tmp/small" --ranks "$n" --parallel "expert=$n" --adapter "$ad" \
           --seq-len "$seq" --batch "$batch" | tee "$tmp/plan$n")
    num() { grep "$1" "$tmp/plan$n" | head -1 | sed 's/ MiB.*//' | awk '{print $NF}'; }
    p0=$(num "total of a CPU run, rank 0")
    p1=$(num "total of a CPU run  ")
    ex=$(grep "  routed experts" "$tmp/plan$n" | awk '{print $3}')
    repl=$(grep "adapter (LoRA" "$tmp/plan$n" | sed 's/.*(\([0-9]*\) replicated.*/\1/')
    start=$(date +%s.%N)
    if [ "$n" = 1 ]; then
        MOLT_PROFILE=1 "$molt" train --config "$tmp/c$n.yaml" >"$tmp/log$n" 2>&1
    else
        MOLT_PROFILE=1 "$launcher" --oversubscribe -np "$n" "$molt" train --config "$tmp/c$n.yaml" \
            >"$tmp/log$n" 2>&1
    fi
    wall=$(echo "$(date +%s.%N) - $start" | bc)
    echo "== $n rank(s): wall ${wall}s; routed experts per rank ${ex} MiB (plan)"
    grep "memory per rank" "$tmp/log$n" | sed 's/^molt train: //'
    echo "plan: rank 0 ${p0} MiB, other ranks ${p1} MiB"
    grep "time in collectives" "$tmp/log$n" | sed 's/^molt train: //' || true
    [ "$n" = 1 ] && continue
    # each rank prints its own collectives: their mean over the ranks
    T=$((batch / n * seq))
    awk -v n="$n" -v T="$T" -v H="$H" -v K="$K" -v Lm="$Lm" -v steps="$steps" -v repl="$repl" '
        /^comm: / { key = $2 " " $3; mib[key] += $(NF-2) / n; calls[key] = $4 }
        END {
            off = T * K * (n - 1) / n                      # rows per layer leaving this rank
            a2a = steps * Lm * (4 * off * H * 4 + off * 2 * 4 + (n - 1) * 8) / 1048576
            ar = steps * (repl * 4 + 3 * 8 + 4) / 1048576  # gradients, token count, loss, stop
            printf "collective        calls/rank   MiB/rank (mean)   formula MiB\n"
            printf "expert alltoallv  %10d   %15.3f   %11.3f   (4 x rows off-rank x H x 4 B + routing, per MoE layer; uniform routing)\n", calls["expert alltoallv"], mib["expert alltoallv"], a2a
            printf "world allreduce   %10d   %15.3f   %11.3f   (replicated LoRA gradients, 4 B each, + scalars)\n", calls["world allreduce"], mib["world allreduce"], ar
        }' "$tmp/log$n"
done
