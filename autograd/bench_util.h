// autograd/bench_util.h: what the micro-benchmarks of autograd/ (`molt bench ops` in bench.c,
// `molt bench quant` in bench_quant.c) share: their options and how they are read, the
// title line, the clock, the best-of-N timing loop and rates. Not part of the public API,
// and not the benchmarks themselves (sizes, baselines, tables stay in each file).
#ifndef MOLT_AUTOGRAD_BENCH_UTIL_H
#define MOLT_AUTOGRAD_BENCH_UTIL_H

#include "autograd.h"

#include <stdio.h>

typedef struct {
    int threads; // 0: leave the OpenMP/OpenBLAS defaults
    int repeat;  // timed runs per row (after one warm-up); the best is reported
    bool quick;  // tiny sizes: checks that everything runs, numbers mean little
} ag_bench_opts;

// The most parts one timed run may report to ag_bench_best_of.
#define AG_BENCH_MAX_PARTS 8

// Reads argv[1..argc-1] into *o: --threads N (1..1024), --repeat R (1..1000, default 3),
// --quick, --help or -h. Messages go to stderr and start with "cmd: "; usage prints the
// command's help text (to stdout for --help, to stderr after an unknown option). Returns -1
// when the benchmark should run, else the exit status: 0 after --help, 2 on a bad option.
int ag_bench_parse_opts(const char *cmd, void (*usage)(FILE *f), int argc, char **argv,
                        ag_bench_opts *o);
// Prints the lines of a usage text that describe those options.
void ag_bench_usage_opts(FILE *f);
// Applies o->threads to OpenMP and OpenBLAS (when set) and selects the optimized kernels.
void ag_bench_setup(const ag_bench_opts *o);
// Prints "cmd: what, N threads, best of R timed runs after one warm-up" and a newline, N
// being the OpenMP threads in effect (after ag_bench_setup) and " (--quick sizes)" added
// under --quick.
void ag_bench_print_title(const char *cmd, const char *what, const ag_bench_opts *o);

// Seconds on the monotonic clock.
double ag_bench_now(void);
// The rate in GFLOP/s of `flops` floating-point operations done in `seconds`.
double ag_bench_gflops(double flops, double seconds);

// One timed run of a benchmark row: stores the seconds of each of its n parts in
// seconds[0..n-1] (all parts of one run see the same machine conditions).
typedef molt_status (*ag_bench_run_fn)(void *user, double *seconds);
// Runs run(user) once to warm caches and thread pools, then o->repeat timed times, and
// leaves in best[k] the smallest seconds[k] over the timed runs (n <= AG_BENCH_MAX_PARTS).
// Stops at the first run that fails and returns its status.
molt_status ag_bench_best_of(const ag_bench_opts *o, ag_bench_run_fn run, void *user, int n,
                             double *best);

// The batch-invariant inference products' tables of `molt bench ops` (bench_bi.c); returns
// the exit status (1 after printing the error).
int ag_bench_bi(const ag_bench_opts *o);

#endif
