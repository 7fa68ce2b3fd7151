// autograd/bench_quant.c: `molt bench quant`: storage bits per parameter of each weight
// format, and the throughput of the fused quantized linear (ag_linear_q forward and its
// input gradient dx = dy W, optimized CPU kernels, f32) next to cblas_sgemm on the
// dequantized matrix, same shapes, measured in the same run. Not here: the routed experts
// (they are these GEMMs per expert), CUDA.
#include "quant_internal.h"

#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CMD "molt bench quant"

typedef struct {
    int threads; // 0: the OpenMP/OpenBLAS defaults
    int repeat;  // timed runs after one warm-up; the best is reported
    bool quick;  // tiny sizes, a smoke test
} bq_opts;

typedef struct {
    int64_t T, in, out;
} bq_size;

static const bq_size sizes_full[] = {{512, 1024, 1024}, {512, 4096, 1024}, {512, 1024, 4096},
                                     {64, 4096, 4096}};
static const bq_size sizes_quick[] = {{48, 192, 160}, {16, 130, 70}};
static const ag_qformat bench_formats[] = {AG_Q_NF4, AG_Q_INT8};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void usage(FILE *f) {
    fprintf(f, "usage: " CMD " [--threads N] [--repeat R] [--quick]\n\n"
               "Prints the storage bits per parameter of each weight format, then times the\n"
               "fused quantized linear (NF4 with double quantization, INT8) forward and input\n"
               "gradient against cblas_sgemm on the dequantized f32 matrix, same shapes, same "
               "run.\n\n"
               "  --threads N   OpenMP and OpenBLAS threads (default: the OpenMP default)\n"
               "  --repeat R    timed runs per row after one warm-up; the best is shown "
               "(default 3)\n"
               "  --quick       tiny sizes, a smoke test (the numbers mean little)\n");
}

static bool parse_count(const char *flag, const char *s, int lo, int hi, int *out) {
    char *end;
    errno = 0;
    long v = s ? strtol(s, &end, 10) : 0;
    if (!s || errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, CMD ": %s expects an integer in %d..%d, got '%s'\n", flag, lo, hi,
                s ? s : "");
        return false;
    }
    *out = (int)v;
    return true;
}

// -1 to go on, else the exit status.
static int parse_opts(int argc, char **argv, bq_opts *o) {
    *o = (bq_opts){.repeat = 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--quick")) {
            o->quick = true;
        } else if (!strcmp(a, "--threads")) {
            if (!parse_count(a, i + 1 < argc ? argv[++i] : NULL, 1, 1024, &o->threads))
                return 2;
        } else if (!strcmp(a, "--repeat")) {
            if (!parse_count(a, i + 1 < argc ? argv[++i] : NULL, 1, 1000, &o->repeat))
                return 2;
        } else {
            fprintf(stderr, CMD ": unknown option '%s'\n\n", a);
            usage(stderr);
            return 2;
        }
    }
    return -1;
}

static ag_tensor *rand_tensor(ag_arena *a, ag_rng *r, int64_t d0, int64_t d1, double sd) {
    ag_tensor *t = ag_tensor_new2(a, AG_F32, d0, d1);
    if (t)
        ag_fill_normal(t, r, 0, sd);
    return t;
}

// ---- storage --------------------------------------------------------------------------------

static int print_storage(const bq_opts *o) {
    const int64_t rows = o->quick ? 1024 : 4096, cols = rows;
    ag_arena a;
    ag_arena_init(&a, "bench", 0);
    ag_rng r;
    ag_rng_seed(&r, 1);
    ag_tensor *w = rand_tensor(&a, &r, rows, cols, 0.02);
    struct {
        ag_qformat f;
        ag_qopts o;
        const char *label;
    } rows_[] = {
        {AG_Q_F32, ag_qopts_default(), "f32"},
        {AG_Q_BF16, ag_qopts_default(), "bf16"},
        {AG_Q_INT8, ag_qopts_default(), "int8 (per-row fp32 scale)"},
        {AG_Q_FP8, ag_qopts_default(), "fp8 e4m3 (per-row fp32 scale)"},
        {AG_Q_NF4, {.nf4_double_quant = false, .fp8_per_row = true}, "nf4 (fp32 absmax)"},
        {AG_Q_NF4, ag_qopts_default(), "nf4 + double quantization"},
    };
    printf("storage of a [%lld, %lld] weight:\n%-32s %12s %10s %12s\n", (long long)rows,
           (long long)cols, "format", "bytes", "bits/param", "f32_ratio");
    int rc = w ? 0 : 1;
    for (size_t i = 0; rc == 0 && i < sizeof rows_ / sizeof *rows_; i++) {
        ag_qweight q;
        if (ag_qweight_quantize(&q, w, rows_[i].f, &rows_[i].o) != MOLT_OK) {
            fprintf(stderr, CMD ": %s\n", molt_err_msg());
            rc = 1;
            break;
        }
        double bits = ag_qweight_bits_per_param(&q);
        printf("%-32s %12zu %10.4f %12.2f\n", rows_[i].label, q.bytes, bits, 32 / bits);
        ag_qweight_free(&q);
    }
    printf("\n");
    ag_arena_free(&a);
    return rc;
}

// ---- throughput -------------------------------------------------------------------------------

typedef struct {
    double fwd, dx, sg_fwd, sg_dx; // best seconds
} bq_times;

// One repetition: fused forward, its dx (the op's own backward rule on a fixed dy), then the
// two baseline sgemm calls on the dequantized matrix, so all four see the same conditions.
static molt_status run_once(ag_ctx *c, ag_tensor *x, const ag_qweight *q, const ag_tensor *wd,
                            const ag_tensor *dy, float *ybuf, float *dxbuf, bq_times *t) {
    int T = (int)x->shape[0], in = (int)x->shape[1], out = (int)q->rows;
    ag_ctx_step_reset(c);
    double t0 = now_s();
    ag_tensor *y = ag_linear_q(c, x, q);
    double t1 = now_s();
    if (!y || c->n_tape != 1)
        return y ? molt_err(MOLT_EINTERNAL, "bench: linear_q recorded no node") : MOLT_EARG;
    ag_tensor *g = ag_grad_ensure(y);
    if (!g)
        return MOLT_ENOMEM;
    memcpy(g->data, dy->data, (size_t)dy->numel * sizeof(float));
    double t2 = now_s();
    MOLT_TRY(ag_backward_linear_q(c, c->tape[0]));
    double t3 = now_s();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, out, in, 1, x->data, in, wd->data,
                in, 0, ybuf, out);
    double t4 = now_s();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, in, out, 1, dy->data, out,
                wd->data, in, 0, dxbuf, in);
    double t5 = now_s();
    *t = (bq_times){t1 - t0, t3 - t2, t4 - t3, t5 - t4};
    return MOLT_OK;
}

static molt_status time_format(const bq_opts *o, bq_size s, ag_qformat f, bq_times *best,
                               double *bits) {
    ag_arena a;
    ag_arena_init(&a, "bench", 0);
    ag_rng r;
    ag_rng_seed(&r, 2);
    ag_tensor *w = rand_tensor(&a, &r, s.out, s.in, 0.02), *x = rand_tensor(&a, &r, s.T, s.in, 1);
    ag_tensor *dy = rand_tensor(&a, &r, s.T, s.out, 1);
    float *ybuf = molt_malloc((size_t)(s.T * s.out + s.T * s.in) * sizeof(float));
    ag_qweight q = {0};
    molt_status st = w && x && dy && ybuf ? ag_qweight_quantize(&q, w, f, NULL) : MOLT_ENOMEM;
    ag_tensor *wd = st == MOLT_OK ? ag_qweight_dequantize(&a, &q) : NULL;
    if (st == MOLT_OK && !wd)
        st = MOLT_ENOMEM;
    *best = (bq_times){INFINITY, INFINITY, INFINITY, INFINITY};
    *bits = ag_qweight_bits_per_param(&q);
    ag_ctx c;
    ag_ctx_init(&c);
    if (x)
        x->requires_grad = true;
    for (int i = 0; st == MOLT_OK && i <= o->repeat; i++) {
        bq_times t = {0, 0, 0, 0};
        st = run_once(&c, x, &q, wd, dy, ybuf, ybuf + s.T * s.out, &t);
        if (st == MOLT_OK && i > 0) { // the first run warms caches and thread pools
            best->fwd = fmin(best->fwd, t.fwd);
            best->dx = fmin(best->dx, t.dx);
            best->sg_fwd = fmin(best->sg_fwd, t.sg_fwd);
            best->sg_dx = fmin(best->sg_dx, t.sg_dx);
        }
    }
    ag_ctx_free(&c);
    ag_qweight_free(&q);
    molt_free(ybuf);
    ag_arena_free(&a);
    return st;
}

static void print_row(ag_qformat f, bq_size s, const char *pass, double sec, double sg_sec,
                      double bits) {
    double flops = 2.0 * (double)s.T * (double)s.in * (double)s.out;
    double gf = flops / sec * 1e-9, sg = flops / sg_sec * 1e-9;
    char shape[48];
    snprintf(shape, sizeof shape, "T=%lld,%lld->%lld", (long long)s.T, (long long)s.in,
             (long long)s.out);
    printf("%-5s %-20s %-4s %9.3f %9.2f %9.3f %9.2f %9.3f %10.4f %8.2f\n", ag_qformat_name(f),
           shape, pass, sec * 1e3, gf, sg_sec * 1e3, sg, gf / sg, bits,
           (double)(s.in * s.out) * bits / 8 / (1 << 20));
    fflush(stdout);
}

int ag_cmd_bench_quant(int argc, char **argv) {
    bq_opts o;
    int rc = parse_opts(argc, argv, &o);
    if (rc >= 0)
        return rc;
    if (o.threads > 0) {
        omp_set_num_threads(o.threads);
        openblas_set_num_threads(o.threads);
    }
    ag_set_reference_kernels(false);
    printf(CMD ": f32 activations, optimized CPU kernels, %d threads, best of %d timed runs "
           "after one warm-up%s\n\n", omp_get_max_threads(), o.repeat,
           o.quick ? " (--quick sizes)" : "");
    if (print_storage(&o) != 0)
        return 1;
    printf("fused linear: fwd y = x W^T and dx = dy W, 2*T*in*out flops each; sgemm = "
           "cblas_sgemm of the\nsame product on the dequantized f32 W (in memory all along), "
           "timed in the same run.\nvs_sgemm = fused GFLOP/s / sgemm GFLOP/s; W_MiB = the "
           "quantized weight's storage.\n\n");
    printf("%-5s %-20s %-4s %9s %9s %9s %9s %9s %10s %8s\n", "fmt", "shape", "pass", "ms",
           "GFLOP/s", "sgemm_ms", "sgemm_GF", "vs_sgemm", "bits/param", "W_MiB");
    const bq_size *sz = o.quick ? sizes_quick : sizes_full;
    size_t n = o.quick ? sizeof sizes_quick / sizeof *sz : sizeof sizes_full / sizeof *sz;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < sizeof bench_formats / sizeof *bench_formats; j++) {
            bq_times t;
            double bits;
            if (time_format(&o, sz[i], bench_formats[j], &t, &bits) != MOLT_OK) {
                fprintf(stderr, CMD ": %s\n", molt_err_msg());
                return 1;
            }
            print_row(bench_formats[j], sz[i], "fwd", t.fwd, t.sg_fwd, bits);
            print_row(bench_formats[j], sz[i], "dx", t.dx, t.sg_dx, bits);
        }
    return 0;
}
