// autograd/bench_quant.c: `molt bench quant`: storage bits per parameter of each weight
// format, and the throughput of the fused quantized linear (ag_linear_q forward and its
// input gradient dx = dy W, optimized CPU kernels, f32) next to ag_blas_sgemm on the
// dequantized matrix, same shapes, measured in the same run. Not here: the routed experts
// (they are these GEMMs per expert), CUDA.
#include "bench_util.h"
#include "quant_internal.h"

#include "cpu/k_blas.h"
#include <stdio.h>
#include <string.h>

#define CMD "molt bench quant"

typedef struct {
    int64_t T, in, out;
} bq_size;

static const bq_size sizes_full[] = {{512, 1024, 1024}, {512, 4096, 1024}, {512, 1024, 4096},
                                     {64, 4096, 4096}};
static const bq_size sizes_quick[] = {{48, 192, 160}, {16, 130, 70}};
static const ag_qformat bench_formats[] = {AG_Q_NF4, AG_Q_INT8};

static void usage(FILE *f) {
    fprintf(f, "usage: " CMD " [--threads N] [--repeat R] [--quick]\n\n"
               "Prints the storage bits per parameter of each weight format, then times the\n"
               "fused quantized linear (NF4 with double quantization, INT8) forward and input\n"
               "gradient against ag_blas_sgemm on the dequantized f32 matrix, same shapes, same "
               "run.\n\n");
    ag_bench_usage_opts(f);
}

static ag_tensor *rand_tensor(ag_arena *a, ag_rng *r, int64_t d0, int64_t d1, double sd) {
    ag_tensor *t = ag_tensor_new2(a, AG_F32, d0, d1);
    if (t)
        ag_fill_normal(t, r, 0, sd);
    return t;
}

// ---- storage --------------------------------------------------------------------------------

static int print_storage(const ag_bench_opts *o) {
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

// The parts of one timed run (run_once), in the order they run.
enum { PART_FWD, PART_DX, PART_SG_FWD, PART_SG_DX, N_PARTS };

typedef struct {
    ag_ctx c;
    ag_tensor *x;
    const ag_qweight *q;
    const ag_tensor *wd, *dy; // the dequantized weight, a fixed output gradient
    float *ybuf, *dxbuf;      // outputs of the baseline sgemm calls
} bq_run;

// One repetition: fused forward, its dx (the op's own backward rule on a fixed dy), then the
// two baseline sgemm calls on the dequantized matrix, so all four see the same conditions.
static molt_status run_once(void *user, double *t) {
    bq_run *b = user;
    ag_ctx *c = &b->c;
    ag_tensor *x = b->x;
    const ag_tensor *wd = b->wd, *dy = b->dy;
    int T = (int)x->shape[0], in = (int)x->shape[1], out = (int)b->q->rows;
    ag_ctx_step_reset(c);
    double t0 = ag_bench_now();
    ag_tensor *y = ag_linear_q(c, x, b->q);
    double t1 = ag_bench_now();
    if (!y || c->n_tape != 1)
        return y ? molt_err(MOLT_EINTERNAL, "bench: linear_q recorded no node") : MOLT_EARG;
    ag_tensor *g = ag_grad_ensure(y);
    if (!g)
        return MOLT_ENOMEM;
    memcpy(g->data, dy->data, (size_t)dy->numel * sizeof(float));
    double t2 = ag_bench_now();
    MOLT_TRY(ag_backward_linear_q(c, c->tape[0]));
    double t3 = ag_bench_now();
    ag_blas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, out, in, 1, x->data, in, wd->data,
                in, 0, b->ybuf, out);
    double t4 = ag_bench_now();
    ag_blas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, in, out, 1, dy->data, out,
                wd->data, in, 0, b->dxbuf, in);
    double t5 = ag_bench_now();
    t[PART_FWD] = t1 - t0;
    t[PART_DX] = t3 - t2;
    t[PART_SG_FWD] = t4 - t3;
    t[PART_SG_DX] = t5 - t4;
    return MOLT_OK;
}

// The best seconds of each part in best[N_PARTS], and the format's bits per parameter.
static molt_status time_format(const ag_bench_opts *o, bq_size s, ag_qformat f, double *best,
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
    *bits = ag_qweight_bits_per_param(&q);
    bq_run b = {.x = x, .q = &q, .wd = wd, .dy = dy, .ybuf = ybuf,
                .dxbuf = ybuf ? ybuf + s.T * s.out : NULL};
    ag_ctx_init(&b.c);
    if (x)
        x->requires_grad = true;
    if (st == MOLT_OK)
        st = ag_bench_best_of(o, run_once, &b, N_PARTS, best);
    ag_ctx_free(&b.c);
    ag_qweight_free(&q);
    molt_free(ybuf);
    ag_arena_free(&a);
    return st;
}

static void print_row(ag_qformat f, bq_size s, const char *pass, double sec, double sg_sec,
                      double bits) {
    double flops = 2.0 * (double)s.T * (double)s.in * (double)s.out;
    double gf = ag_bench_gflops(flops, sec), sg = ag_bench_gflops(flops, sg_sec);
    char shape[48];
    snprintf(shape, sizeof shape, "T=%lld,%lld->%lld", (long long)s.T, (long long)s.in,
             (long long)s.out);
    printf("%-5s %-20s %-4s %9.3f %9.2f %9.3f %9.2f %9.3f %10.4f %8.2f\n", ag_qformat_name(f),
           shape, pass, sec * 1e3, gf, sg_sec * 1e3, sg, gf / sg, bits,
           (double)(s.in * s.out) * bits / 8 / (1 << 20));
    fflush(stdout);
}

int ag_cmd_bench_quant(int argc, char **argv) {
    ag_bench_opts o;
    int rc = ag_bench_parse_opts(CMD, usage, false, argc, argv, &o);
    if (rc >= 0)
        return rc;
    ag_bench_setup(&o);
    ag_bench_print_title(CMD, "f32 activations, optimized CPU kernels", &o);
    printf("\n");
    if (print_storage(&o) != 0)
        return 1;
    printf("fused linear: fwd y = x W^T and dx = dy W, 2*T*in*out flops each; sgemm = "
           "ag_blas_sgemm of the\nsame product on the dequantized f32 W (in memory all along), "
           "timed in the same run.\nvs_sgemm = fused GFLOP/s / sgemm GFLOP/s; W_MiB = the "
           "quantized weight's storage.\n\n");
    printf("%-5s %-20s %-4s %9s %9s %9s %9s %9s %10s %8s\n", "fmt", "shape", "pass", "ms",
           "GFLOP/s", "sgemm_ms", "sgemm_GF", "vs_sgemm", "bits/param", "W_MiB");
    const bq_size *sz = o.quick ? sizes_quick : sizes_full;
    size_t n = o.quick ? sizeof sizes_quick / sizeof *sz : sizeof sizes_full / sizeof *sz;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < sizeof bench_formats / sizeof *bench_formats; j++) {
            double t[N_PARTS], bits;
            if (time_format(&o, sz[i], bench_formats[j], t, &bits) != MOLT_OK) {
                fprintf(stderr, CMD ": %s\n", molt_err_msg());
                return 1;
            }
            print_row(bench_formats[j], sz[i], "fwd", t[PART_FWD], t[PART_SG_FWD], bits);
            print_row(bench_formats[j], sz[i], "dx", t[PART_DX], t[PART_SG_DX], bits);
        }
    return 0;
}
