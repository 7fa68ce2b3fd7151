#!/usr/bin/env bash
# Installs dependencies, builds molt, runs the whole test suite, then rebuilds the unit
# tests with AddressSanitizer + UndefinedBehaviorSanitizer and runs them again.
# The exit status is the verdict.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=$(nproc 2>/dev/null || echo 2)
start=$(date +%s)

tools/setup.sh

# Where nvcc is installed the CUDA code must build (sm_80 and sm_90, warnings are errors,
# GPU or not): MOLT_CUDA=ON makes a failed detection an error instead of a CPU-only build.
cuda=(-DMOLT_CUDA=AUTO)
nvcc=$(command -v nvcc || true)
[ -z "$nvcc" ] && [ -x /usr/local/cuda/bin/nvcc ] && nvcc=/usr/local/cuda/bin/nvcc
[ -n "$nvcc" ] && cuda=(-DMOLT_CUDA=ON "-DCMAKE_CUDA_COMPILER=$nvcc")
echo "== build (Release, warnings are errors, ${cuda[0]})"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOLT_WERROR=ON "${cuda[@]}" \
    >build-configure.log 2>&1 || { cat build-configure.log; exit 1; }
grep "molt: CUDA" build-configure.log || true
cmake --build build -j"$jobs"

echo "== test suite"
(cd build && ctest --output-on-failure -j"$jobs" --timeout 1500)

echo "== sanitizer build (ASan + UBSan)"
cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DMOLT_WERROR=ON -DMOLT_SANITIZE=ON \
    -DMOLT_CUDA=OFF >build-asan-configure.log 2>&1 || { cat build-asan-configure.log; exit 1; }
cmake --build build-asan -j"$jobs"

echo "== test suite under sanitizers"
# Check forks each test; LeakSanitizer runs in the children too.
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
(cd build-asan && MOLT_SANITIZED=1 ctest --output-on-failure -j"$jobs" --timeout 3000)

echo "== fuzzing the checkpoint parsers (clang + libFuzzer, bounded time)"
CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOLT_FUZZ=ON -DMOLT_CUDA=OFF \
    >build-fuzz-configure.log 2>&1 || { cat build-fuzz-configure.log; exit 1; }
fuzz_targets=$(cd tests/fuzz && ls fuzz_*.c | sed 's/\.c$//')
cmake --build build-fuzz -j"$jobs" --target $fuzz_targets
(cd build-fuzz && ctest --output-on-failure -R '^fuzz_')

echo "== all tests passed in $(( $(date +%s) - start ))s"
