// autograd/bench_bi.c: the batch-invariant inference products in `molt bench ops`: decode
// (T = 1, 8 and 32) as GB/s of weight bytes next to a plain read of as many bytes (bi_read, the
// same threads, the same run), and prefill (T = 128, 512) as GFLOP/s next to sgemm on
// the same shape (the dequantized matrix for NF4), for dense F32 and NF4 weights at shapes of
// the small preset and of Mistral Small 4. Not here: the training kernels' rows (bench.c),
// the other quantized formats (their decoding is checked by tests; NF4 is the served one).
#include "bench_util.h"
#include "quant_internal.h"

#include "cpu/k_blas.h"
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>

typedef struct {
    const char *model, *name;
    int64_t rows, cols; // weight [rows = out, cols = in]
    bool prefill;       // also timed at T = 128 and 512
} bi_shape;

static const bi_shape shapes_full[] = {
    {"small", "q_a", 256, 512, true},
    {"small", "kv_b", 768, 128, true},
    {"small", "expert.gate_up", 768, 512, true},
    {"small", "expert.down", 512, 384, true},
    {"small", "lm_head", 131072, 512, false},
    {"ms4", "expert.gate_up", 4096, 4096, true},
    {"ms4", "expert.down", 4096, 2048, true},
};
static const bi_shape shapes_quick[] = {{"quick", "a", 96, 128, true},
                                        {"quick", "b", 70, 192, true}};
// decode: one sequence, a few, and a serving step's batch (32 sequences)
static const int64_t t_decode[] = {1, 8, 32}, t_prefill[] = {128, 512};
#define N_DECODE (int)(sizeof t_decode / sizeof *t_decode)
#define N_PREFILL (int)(sizeof t_prefill / sizeof *t_prefill)

// The parts of one timed run, in the order they run.
enum { PART_BI, PART_BASE, N_PARTS };

typedef struct {
    const bi_shape *s;
    int64_t T;
    bool nf4, decode;  // NF4 (else dense F32); decode: the baseline is a read, else sgemm
    const uint16_t *bx; // the bf16-pair packed matrix (timed instead of bi_linear) or NULL
    int nt;
    const float *x, *w; // x (T, cols); w: the f32 (or dequantized) matrix
    kq_weight v;        // NF4 view
    void *ws;
    float *y, *rd;      // y (T, rows); rd: bytes_w of data for the read
    int64_t bytes_w;    // weight bytes the kernel reads
    int inner;          // calls of each part per run
    float sink;
} bi_run;

static double run_bi(bi_run *b) {
    int64_t rows = b->s->rows, cols = b->s->cols;
    double t0 = ag_bench_now();
    if (b->bx)
        bx_linear(b->y, b->x, b->bx, b->T, rows, cols, b->nt, b->ws);
    else if (b->nf4)
        bi_linear_q_f32(b->y, b->x, &b->v, 0, b->T, b->nt, b->ws);
    else
        bi_linear_f32(b->y, b->x, b->w, b->T, rows, cols, b->nt);
    return ag_bench_now() - t0;
}

static double run_base(bi_run *b) {
    int64_t rows = b->s->rows, cols = b->s->cols;
    double t0 = ag_bench_now();
    if (b->decode)
        b->sink += bi_read(b->rd, b->bytes_w / 4, b->nt);
    else
        ag_blas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)b->T, (int)rows, (int)cols, 1,
                    b->x, (int)cols, b->w, (int)cols, 0, b->y, (int)rows);
    return ag_bench_now() - t0;
}

// One run: `inner` calls of each (alternating), keeping each one's fastest call: short calls
// are repeated so that a run lasts ~10 ms or more, and a call that lost its core to another
// process does not decide the figure.
static molt_status run_once(void *user, double *t) {
    bi_run *b = user;
    t[PART_BI] = t[PART_BASE] = INFINITY;
    for (int i = 0; i < b->inner; i++) {
        t[PART_BI] = fmin(t[PART_BI], run_bi(b));
        t[PART_BASE] = fmin(t[PART_BASE], run_base(b));
    }
    return MOLT_OK;
}

static void print_row(const bi_run *b, const double *t) {
    char shape[64];
    snprintf(shape, sizeof shape, "%s %s [%lld,%lld]", b->s->model, b->s->name,
             (long long)b->s->rows, (long long)b->s->cols);
    double flops = 2.0 * (double)b->T * (double)b->s->rows * (double)b->s->cols;
    if (b->decode) {
        double gb = (double)b->bytes_w / t[PART_BI] * 1e-9;
        double rb = (double)b->bytes_w / t[PART_BASE] * 1e-9;
        printf("%-4s %-30s %4lld %9.4f %9.2f %9.2f %8.3f %9.2f\n",
               b->bx ? "bx" : b->nf4 ? "nf4" : "f32", shape,
               (long long)b->T, t[PART_BI] * 1e3, gb, rb, gb / rb,
               ag_bench_gflops(flops, t[PART_BI]));
    } else {
        double gf = ag_bench_gflops(flops, t[PART_BI]), sg = ag_bench_gflops(flops, t[PART_BASE]);
        printf("%-4s %-30s %4lld %9.4f %9.2f %9.2f %8.3f\n", b->nf4 ? "nf4" : "f32", shape,
               (long long)b->T, t[PART_BI] * 1e3, gf, sg, gf / sg);
    }
    fflush(stdout);
}

// Times one shape in one format (0 F32, 1 NF4, 2 bf16 pairs) at every T of its tables,
// printing into the decode table (section 0) or the prefill one (section 1).
static molt_status bench_shape(const ag_bench_opts *o, const bi_shape *s, int fmt, int section) {
    bool nf4 = fmt == 1;
    int64_t rows = s->rows, cols = s->cols;
    int64_t tmax = section ? t_prefill[N_PREFILL - 1] : t_decode[N_DECODE - 1];
    ag_arena a;
    ag_arena_init(&a, "bench", 0);
    ag_rng r;
    ag_rng_seed(&r, 21);
    ag_tensor *w = ag_tensor_new2(&a, AG_F32, rows, cols), *x = ag_tensor_new2(&a, AG_F32, tmax, cols);
    ag_tensor *y = ag_tensor_new2(&a, AG_F32, tmax, rows);
    ag_qweight q = {0};
    bi_run b = {.s = s, .nf4 = nf4, .decode = section == 0, .nt = omp_get_max_threads()};
    molt_status st = w && x && y ? MOLT_OK : MOLT_ENOMEM;
    if (st == MOLT_OK) {
        ag_fill_normal(w, &r, 0, 0.02);
        ag_fill_uniform(x, &r, -1, 1);
        b.w = w->data;
        b.x = x->data;
        b.y = y->data;
        b.bytes_w = rows * cols * 4;
    }
    if (st == MOLT_OK && nf4) {
        st = ag_qweight_quantize(&q, w, AG_Q_NF4, NULL);
        ag_tensor *wd = st == MOLT_OK ? ag_qweight_dequantize(&a, &q) : NULL;
        if (st == MOLT_OK && !wd)
            st = MOLT_ENOMEM;
        if (st == MOLT_OK) {
            ag_qweight_view(&b.v, &q);
            b.w = wd->data; // the sgemm baseline's matrix
            b.bytes_w = (int64_t)q.bytes;
        }
    }
    if (st == MOLT_OK && fmt == 2) {
        uint16_t *p = ag_arena_alloc_uninit(&a, bx_pack_bytes(rows, cols));
        if (p)
            bx_pack(p, b.w, rows, cols, b.nt);
        b.bx = p;
        st = p ? MOLT_OK : MOLT_ENOMEM;
    }
    if (st == MOLT_OK && b.decode && !(b.rd = ag_arena_alloc(&a, (size_t)b.bytes_w + 64)))
        st = MOLT_ENOMEM;
    if (b.rd)
        memset(b.rd, 0, (size_t)b.bytes_w);
    const int64_t *ts = section ? t_prefill : t_decode;
    for (int i = 0; st == MOLT_OK && i < (section ? N_PREFILL : N_DECODE); i++) {
        b.T = ts[i];
        double work = b.decode ? (double)b.bytes_w / 1e9 : 2.0 * (double)(b.T * rows * cols) / 1e11;
        b.inner = (int)fmin(200, fmax(1, 0.01 / work)); // ~10 ms at 1 GB/s or 100 GFLOP/s
        size_t wsb = nf4 ? bi_linear_q_ws_bytes_f32(&b.v, b.T, b.nt)
                     : fmt == 2 ? bx_ws_bytes(b.T, cols, b.nt) : 0;
        b.ws = molt_malloc(wsb ? wsb : 1);
        double t[N_PARTS];
        st = b.ws ? ag_bench_best_of(o, run_once, &b, N_PARTS, t) : MOLT_ENOMEM;
        molt_free(b.ws);
        if (st == MOLT_OK)
            print_row(&b, t);
    }
    ag_qweight_free(&q);
    ag_arena_free(&a);
    return st;
}

int ag_bench_bi(const ag_bench_opts *o) {
    const bi_shape *ss = o->quick ? shapes_quick : shapes_full;
    size_t n = o->quick ? sizeof shapes_quick / sizeof *ss : sizeof shapes_full / sizeof *ss;
    printf("\nbatch-invariant inference products (bi_linear, bi_linear_q; %s copy), f32 "
           "activations\n", bi_isa_name(bi_isa()));
    printf("decode: GB/s of weight bytes (f32: 4/weight; nf4: its storage, absmax included);\n"
           "read_GB/s = a plain vector read of as many bytes, same threads, same run;\n"
           "vs_read = GB/s / read_GB/s. Each figure is the fastest call (short calls repeated,\n"
           "alternating with the baseline's).\n");
    if (bx_amx())
        printf("bx: the F32 matrix as bf16 hi + lo pairs on AMX tiles (bx_linear; serving's\n"
               "vocabulary projection), 4 bytes/weight.\n");
    printf("%-4s %-30s %4s %9s %9s %9s %8s %9s\n", "fmt", "shape", "T", "ms", "GB/s",
           "read_GB/s", "vs_read", "GFLOP/s");
    for (int sec = 0; sec < 2; sec++) {
        if (sec == 1) {
            printf("\nprefill: GFLOP/s (2*T*rows*cols) against sgemm on the same shape "
                   "(for nf4: on the\ndequantized matrix); vs_sgemm = GFLOP/s / sgemm_GFLOP/s.\n");
            printf("%-4s %-30s %4s %9s %9s %9s %8s\n", "fmt", "shape", "T", "ms", "GFLOP/s",
                   "sgemm_GF", "vs_sgemm");
        }
        for (size_t i = 0; i < n; i++) {
            if (sec == 1 && !ss[i].prefill)
                continue;
            for (int f = 0; f < (sec == 0 && bx_amx() ? 3 : 2); f++)
                if (bench_shape(o, &ss[i], f, sec) != MOLT_OK) {
                    fprintf(stderr, "molt bench ops: %s\n", molt_err_msg());
                    return 1;
                }
        }
    }
    return 0;
}
