#!/usr/bin/env bash
# tools/gpu-check.sh: everything of molt that needs a GPU, in one run that ends with one
# pass/fail summary, sized to finish within 8 minutes on an H100/H200 (a short loan of a
# GPU is enough). What it is not: the CPU test suite (tools/test.sh), or the comparison with
# other training stacks (tools/bench/).
#
# Steps, each with its own time limit, logs under $LOG (below):
#   device    nvidia-smi: the GPU, its driver, memory and compute capability; molt info
#   build     CUDA ON, warnings are errors, machine code for this GPU only (fast); only the
#             binaries below are built
#   tests     every tests/test_cuda*.c program: each GPU kernel, forward and backward, against
#             the CPU reference kernels on the same inputs, and the device model with the
#             real CUDA table; a program that skips (77: no GPU seen) counts as a failure here.
#             Then test_device_model (the stand-in device) and cli_bench_ops (which runs
#             `molt bench ops --device cuda --quick` when a GPU is there).
#   memcheck  compute-sanitizer --tool memcheck on every test_cuda* program (out-of-bounds
#             and misaligned accesses to device memory); NOT RUN where the tool is missing
#             or refuses the device (gVisor machines)
#   bench     molt bench ops --device cuda: cuBLASLt against cuBLAS, the NF4 linear against
#             cuBLAS bf16 on the decoded matrix, the NF4 decode GEMV against the copy rate
#
# Usage:
#   tools/gpu-check.sh                  build in build-gpu/ and check (a machine with nvcc,
#                                       the -dev packages of tools/setup.sh, and a GPU)
#   tools/gpu-check.sh --bundle FILE    build here (nvcc needed, no GPU) for sm_80 and sm_90
#                                       and pack the programs with the shared libraries
#                                       they load into FILE (.tar.gz), for a GPU machine
#                                       that cannot build molt
#   tools/gpu-check.sh --from FILE      check with the programs of such a bundle
# Environment: LOG (default: $OUT/gpu-check when $OUT is set, else build-gpu/gpu-check-logs),
# JOBS (build jobs; default: all cores). Exit status 0 only when every step that ran passed
# and the tests and the benchmark ran.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
start=$(date +%s)

mode=build
file=
case "${1:-}" in
"") ;;
--bundle | --from)
    mode=${1#--}
    file=${2:-}
    [ -n "$file" ] || { echo "gpu-check: $1 needs a file name" >&2; exit 2; }
    file=$(realpath -m "$file")
    ;;
-h | --help)
    sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "gpu-check: unknown argument '$1' (see --help)" >&2
    exit 2
    ;;
esac

jobs=${JOBS:-$(nproc 2>/dev/null || echo 4)}
if [ -n "${LOG:-}" ]; then
    log=$LOG
elif [ -n "${OUT:-}" ]; then
    log=$OUT/gpu-check
else
    log=$root/build-gpu/gpu-check-logs
fi
mkdir -p "$log"

# the programs run on the GPU side
cuda_tests=$(cd tests && ls test_cuda*.c | sed 's/\.c$//')
targets="molt test_device_model $cuda_tests"

# ---- summary bookkeeping ---------------------------------------------------------------
rows=()
failed=0
row() { # step result seconds note (cut to fit a line; the logs have it all)
    rows+=("$(printf '%-26s %-8s %6ss  %.110s' "$1" "$2" "$3" "$4")")
    [ "$2" = FAIL ] && failed=1
    printf '%s\n' "${rows[-1]}"
}
summary() {
    echo
    echo "==== gpu-check summary ($(( $(date +%s) - start ))s in all; logs in $log)"
    printf '%s\n' "${rows[@]}"
    if [ "$failed" -eq 0 ]; then
        echo "==== gpu-check: PASS"
    else
        echo "==== gpu-check: FAIL"
    fi
    exit "$failed"
}
elapsed() { echo $(( $(date +%s) - start )); }

# ---- build -----------------------------------------------------------------------------
build_dir=$root/build-gpu
nvcc=$(command -v nvcc || true)
[ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
configure() { # archs
    cmake -S "$root" -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOLT_WERROR=ON \
        -DMOLT_CUDA=ON ${nvcc:+"-DCMAKE_CUDA_COMPILER=$nvcc"} "-DMOLT_CUDA_ARCHS=$1" \
        >"$log/configure.log" 2>&1
}
build() { # [timeout seconds]
    # shellcheck disable=SC2086
    timeout "${1:-3600}" cmake --build "$build_dir" -j"$jobs" --target $targets \
        >"$log/build.log" 2>&1
}

if [ "$mode" = bundle ]; then
    echo "== bundle: building for sm_80 and sm_90 in $build_dir"
    configure "80;90" || { cat "$log/configure.log"; exit 1; }
    build || { tail -50 "$log/build.log"; exit 1; }
    stage=$(mktemp -d)
    mkdir -p "$stage/bin" "$stage/lib"
    for t in $targets; do
        strip -o "$stage/bin/$t" "$build_dir/$t"
    done
    # Shared libraries the programs link, and OpenBLAS (opened at run time) with its own,
    # except the C library's and the compiler's, which every machine has in a newer version.
    blas=$(sed -n 's/^-- molt: OpenBLAS [^:]*: \(.*\) (loaded at run time)$/\1/p' "$log/configure.log")
    libs=$( (for t in $targets; do ldd "$build_dir/$t"; done; [ -n "$blas" ] && ldd "$blas") |
        awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | sort -u |
        grep -Ev '/(libc|libm|libdl|libpthread|librt|libresolv|ld-linux[^/]*|libstdc\+\+|libgcc_s|libcuda)\.so')
    for l in $libs; do cp -L "$l" "$stage/lib/"; done
    [ -n "$blas" ] && cp -L "$blas" "$stage/lib/libopenblas.so.0"
    tar -C "$stage" -czf "$file" bin lib
    rm -rf "$stage"
    echo "== bundle: $file ($(du -h "$file" | cut -f1)): $(echo $targets | wc -w) programs," \
        "$(echo $libs | wc -w) libraries"
    exit 0
fi

# ---- device ----------------------------------------------------------------------------
echo "== device"
t0=$(date +%s)
cap=
if command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
        >"$log/device.txt" 2>&1; then
    cat "$log/device.txt"
    cap=$(head -1 "$log/device.txt" | awk -F', *' '{ print $4 }' | tr -d '.')
    row device PASS $(( $(date +%s) - t0 )) "$(head -1 "$log/device.txt")"
else
    cat "$log/device.txt" 2>/dev/null
    row device FAIL $(( $(date +%s) - t0 )) "nvidia-smi found no GPU"
    summary
fi

# ---- build, or unpack a bundle -----------------------------------------------------------
t0=$(date +%s)
if [ "$mode" = from ]; then
    echo "== unpacking $file"
    bin=$root/build-gpu-bundle
    rm -rf "$bin" && mkdir -p "$bin"
    if tar -C "$bin" -xzf "$file"; then
        # the bundle supplies only the libraries this machine lacks (its own, newer ones win)
        if command -v ldconfig >/dev/null 2>&1 || [ -x /sbin/ldconfig ]; then
            have=$(PATH=$PATH:/sbin ldconfig -p | awk '{ print $1 }')
            kept=0
            for l in "$bin"/lib/*; do
                n=$(basename "$l")
                if [ "$n" != libopenblas.so.0 ] && grep -qx "$n" <<<"$have"; then
                    rm -f "$l"
                else
                    kept=$((kept + 1))
                fi
            done
            echo "the bundle supplies $kept libraries this machine lacks"
        fi
        export LD_LIBRARY_PATH="$bin/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        [ -f "$bin/lib/libopenblas.so.0" ] && export MOLT_BLAS_LIBRARY="$bin/lib/libopenblas.so.0"
        export MOLT_DATA_DIR=$root/configs # the bundle's own build tree is not here
        bin=$bin/bin
        row "build (bundle)" PASS $(( $(date +%s) - t0 )) "programs from $file"
    else
        row "build (bundle)" FAIL $(( $(date +%s) - t0 )) "cannot unpack $file"
        summary
    fi
else
    archs=${cap:-90}
    echo "== build (CUDA for sm_$archs, warnings are errors, $jobs jobs)"
    if ! configure "$archs"; then
        tail -30 "$log/configure.log"
        row build FAIL $(( $(date +%s) - t0 )) "configure failed (missing -dev packages? then use --bundle/--from); $log/configure.log"
        summary
    fi
    if ! build 300; then
        tail -40 "$log/build.log"
        row build FAIL $(( $(date +%s) - t0 )) "see $log/build.log"
        summary
    fi
    bin=$build_dir
    row build PASS $(( $(date +%s) - t0 )) "sm_$archs, -DMOLT_WERROR=ON"
fi
export MOLT_SOURCE_DIR=$root OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} CK_DEFAULT_TIMEOUT=120
"$bin/molt" info >"$log/molt-info.txt" 2>&1
sed -n '/CUDA:/,/cuda:/p' "$log/molt-info.txt"

# ---- tests -------------------------------------------------------------------------------
echo "== tests (each against the CPU reference kernels)"
for t in $cuda_tests test_device_model; do
    t0=$(date +%s)
    timeout 90 "$bin/$t" >"$log/$t.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    checks=$(grep -Eo '[0-9]+%: Checks: [0-9]+, Failures: [0-9]+, Errors: [0-9]+' "$log/$t.log" | tail -1)
    case $rc in
    0) row "$t" PASS $secs "$checks" ;;
    77) row "$t" FAIL $secs "skipped: $(head -1 "$log/$t.log")" ;;
    124) row "$t" FAIL $secs "timed out (90 s)" ;;
    *) row "$t" FAIL $secs "exit $rc: $(grep -m1 -E ':[EF]:' "$log/$t.log" | cut -c1-160)" ;;
    esac
done
t0=$(date +%s)
if MOLT_EXPECT_GPU=1 timeout 120 bash tests/cli_bench_ops.sh "$bin/molt" >"$log/cli_bench_ops.log" 2>&1; then
    row cli_bench_ops PASS $(( $(date +%s) - t0 )) "bench ops --device cuda --quick rows checked"
else
    row cli_bench_ops FAIL $(( $(date +%s) - t0 )) "$(grep -m1 '^FAIL' "$log/cli_bench_ops.log" || tail -1 "$log/cli_bench_ops.log")"
fi

# ---- memcheck ----------------------------------------------------------------------------
# All programs at once (one GPU, many cores): the tool slows every kernel and cuBLAS call.
# Memory access errors only: device memory held for the whole process (the cuBLASLt
# workspace) is not a leak, and errors that libraries provoke and handle inside are not ours.
echo "== compute-sanitizer memcheck"
san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -z "$san" ]; then
    row memcheck "NOT RUN" 0 "compute-sanitizer not found"
elif [ "$(elapsed)" -gt 330 ]; then
    row memcheck "NOT RUN" 0 "out of time ($(elapsed)s used before it)"
else
    t0=$(date +%s)
    limit=$(( 420 - $(elapsed) ))
    [ "$limit" -gt 150 ] && limit=150
    pids=()
    for t in $cuda_tests; do
        timeout "$limit" "$san" --tool memcheck --report-api-errors no --error-exitcode 9 \
            "$bin/$t" >"$log/memcheck-$t.log" 2>&1 &
        pids+=("$!")
    done
    i=0
    for t in $cuda_tests; do
        wait "${pids[$i]}"
        rc=$?
        i=$((i + 1))
        secs=$(( $(date +%s) - t0 ))
        errs=$(grep -Eo 'ERROR SUMMARY: [0-9]+ errors?' "$log/memcheck-$t.log" | tail -1)
        refused=$(grep -m1 -E 'Device not supported|^=+ .*[Nn]ot supported' "$log/memcheck-$t.log")
        if [ -n "$refused" ]; then
            row "memcheck $t" "NOT RUN" $secs "the tool refuses this device: $(cut -c1-120 <<<"$refused")"
        elif [ $rc -eq 0 ]; then
            row "memcheck $t" PASS $secs "${errs:-no errors}"
        elif [ $rc -eq 124 ]; then
            row "memcheck $t" FAIL $secs "timed out ($limit s)"
        else
            row "memcheck $t" FAIL $secs "exit $rc, ${errs:-see log}: $log/memcheck-$t.log"
        fi
    done
fi

# ---- benchmark ---------------------------------------------------------------------------
echo "== molt bench ops --device cuda"
if [ "$(elapsed)" -gt 430 ]; then
    row bench FAIL 0 "out of time ($(elapsed)s used before it)"
else
    t0=$(date +%s)
    if timeout 60 "$bin/molt" bench ops --device cuda >"$log/bench.txt" 2>&1; then
        cat "$log/bench.txt"
        row bench PASS $(( $(date +%s) - t0 )) "table in $log/bench.txt"
    else
        cat "$log/bench.txt"
        row bench FAIL $(( $(date +%s) - t0 )) "$(tail -1 "$log/bench.txt" | cut -c1-160)"
    fi
fi

summary
