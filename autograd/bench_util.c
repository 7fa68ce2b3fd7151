// autograd/bench_util.c: options, clock and timing loop shared by the micro-benchmarks of
// autograd/ (see bench_util.h).
#include "bench_util.h"

#include "../common/opt.h"

#include "cpu/k_blas.h"
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

// The --help text: the benchmark's usage, captured (its printer writes to a FILE).
static char *usage_text(void (*usage)(FILE *f)) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f)
        return NULL;
    usage(f);
    fclose(f);
    return buf;
}

int ag_bench_parse_opts(const char *cmd, void (*usage)(FILE *f), bool device, int argc,
                        char **argv, ag_bench_opts *o) {
    *o = (ag_bench_opts){.repeat = 3};
    const char *threads = NULL, *repeat = NULL, *dev = NULL;
    molt_opt opts[] = {MOLT_OPT("--threads", &threads), MOLT_OPT("--repeat", &repeat),
                       MOLT_OPT_FLAG("--quick", &o->quick), MOLT_OPT_END, MOLT_OPT_END};
    if (device)
        opts[3] = (molt_opt)MOLT_OPT("--device", &dev);
    char *text = usage_text(usage);
    int rc = molt_opts_parse(cmd, text ? text : "", opts, argc, argv, 1, NULL);
    free(text); // from open_memstream
    if (rc)
        return rc < 0 ? 0 : rc;
    int64_t t = 0, r = 3;
    static const char *const devices[] = {"cpu", "cuda"};
    int d = 0;
    if (!molt_opt_int(cmd, "--threads", threads, 1, 1024, &t) ||
        !molt_opt_int(cmd, "--repeat", repeat, 1, 1000, &r) ||
        !molt_opt_choice(cmd, "--device", dev, devices, 2, &d))
        return 2;
    o->cuda = d == 1;
    o->threads = (int)t;
    o->repeat = (int)r;
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
        ag_blas_set_threads(o->threads);
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
