// autograd/bench_util.c: options, clock and timing loop shared by the micro-benchmarks of
// autograd/ (see bench_util.h).
#include "bench_util.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static bool parse_count(const char *cmd, const char *flag, const char *s, int lo, int hi,
                        int *out) {
    char *end;
    errno = 0;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "%s: %s expects an integer in %d..%d, got '%s'\n", cmd, flag, lo, hi,
                s ? s : "");
        return false;
    }
    *out = (int)v;
    return true;
}

int ag_bench_parse_opts(const char *cmd, void (*usage)(FILE *f), int argc, char **argv,
                        ag_bench_opts *o) {
    *o = (ag_bench_opts){.repeat = 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--quick")) {
            o->quick = true;
        } else if (!strcmp(a, "--threads")) {
            if (!parse_count(cmd, a, i + 1 < argc ? argv[++i] : NULL, 1, 1024, &o->threads))
                return 2;
        } else if (!strcmp(a, "--repeat")) {
            if (!parse_count(cmd, a, i + 1 < argc ? argv[++i] : NULL, 1, 1000, &o->repeat))
                return 2;
        } else {
            fprintf(stderr, "%s: unknown option '%s'\n\n", cmd, a);
            usage(stderr);
            return 2;
        }
    }
    return -1;
}

void ag_bench_usage_opts(FILE *f) {
    fprintf(f, "  --threads N   OpenMP and OpenBLAS threads (default: the OpenMP default)\n"
               "  --repeat R    timed runs per row after one warm-up; the best is shown "
               "(default 3)\n"
               "  --quick       tiny sizes, a smoke test (the numbers mean little)\n");
}

void ag_bench_setup(const ag_bench_opts *o) {
    if (o->threads > 0) {
        omp_set_num_threads(o->threads);
        openblas_set_num_threads(o->threads);
    }
    ag_set_reference_kernels(false);
}

void ag_bench_print_title(const char *cmd, const char *what, const ag_bench_opts *o) {
    printf("%s: %s, %d threads, best of %d timed runs after one warm-up%s\n", cmd, what,
           omp_get_max_threads(), o->repeat, o->quick ? " (--quick sizes)" : "");
}

double ag_bench_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double ag_bench_gflops(double flops, double seconds) { return flops / seconds * 1e-9; }

molt_status ag_bench_best_of(const ag_bench_opts *o, ag_bench_run_fn run, void *user, int n,
                             double *best) {
    MOLT_ASSERT(n >= 1 && n <= AG_BENCH_MAX_PARTS);
    for (int k = 0; k < n; k++)
        best[k] = INFINITY;
    for (int i = 0; i <= o->repeat; i++) {
        double t[AG_BENCH_MAX_PARTS] = {0};
        MOLT_TRY(run(user, t));
        if (i > 0) // run 0 is the warm-up
            for (int k = 0; k < n; k++)
                best[k] = fmin(best[k], t[k]);
    }
    return MOLT_OK;
}
