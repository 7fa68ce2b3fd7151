// autograd/bench_cuda.c: `molt bench ops --device cuda`: the GPU's matrix products next to
// their baselines measured in the same run: linear (cuBLASLt, bf16 with f32 accumulation,
// and f32 with TF32 off) against the classic cublasGemmEx on the same shape; the NF4 linear
// of prefill (decoded tiles + cuBLASLt) against cublasGemmEx in bf16 on the already
// decoded matrix; the NF4 decode GEMV in GB/s of weight bytes against a device-to-device
// copy (bytes read + written). Times are CUDA events around each call, the median of the
// timed runs after warm-ups. Not here: the CPU tables (bench.c), correctness (the tests).
#include "bench_util.h"
#include "quant_internal.h"

#include <stdlib.h>
#include <string.h>

#ifndef MOLT_HAVE_CUDA

int ag_bench_cuda(const ag_bench_opts *o) {
    (void)o;
    fprintf(stderr, "molt bench ops: --device cuda: this build has no CUDA\n");
    return 1;
}

#else

#include "cuda/cuda_backend.h"

#define CMD "molt bench ops --device cuda"
#define WARMUP 3

typedef int (*cu_call_fn)(void *user);

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// Median seconds of `reps` timed calls after WARMUP untimed ones; 0 or a CUDA failure.
static int time_median(cu_call_fn fn, void *user, int reps, double *median) {
    double t[64];
    if (reps > 64)
        reps = 64;
    for (int i = 0; i < WARMUP; i++)
        if (fn(user))
            return 1;
    for (int i = 0; i < reps; i++) {
        void *ev[2];
        if (molt_cuda_timer_start(ev) || fn(user) || molt_cuda_timer_stop(ev, &t[i]))
            return 1;
    }
    qsort(t, (size_t)reps, sizeof t[0], cmp_double);
    *median = t[reps / 2];
    return 0;
}

// Device buffers of the run (freed at the end).
static void *bufs[32];
static int n_bufs;

static void *dev_alloc(size_t bytes) {
    void *p = NULL;
    if (n_bufs >= 32 || molt_cuda_malloc(&p, bytes))
        return NULL;
    bufs[n_bufs++] = p;
    return p;
}

static void dev_free_all(void) {
    for (int i = 0; i < n_bufs; i++)
        molt_cuda_free(bufs[i]);
    n_bufs = 0;
}

// Fills a device buffer of n elements (f32 or bf16) with uniform values in [-1, 1): a random
// block uploaded again and again (never zeros: they run faster than data).
static int dev_fill(void *d, int64_t n, int bf16, ag_rng *r) {
    enum { BLOCK = 1 << 20 };
    static float blk[BLOCK];
    static uint16_t bb[BLOCK];
    for (int i = 0; i < BLOCK; i++) {
        blk[i] = (float)(2 * ag_rng_uniform(r) - 1);
        bb[i] = ag_f32_to_bf16(blk[i]);
    }
    size_t es = bf16 ? 2 : 4;
    for (int64_t i = 0; i < n; i += BLOCK) {
        int64_t m = n - i < BLOCK ? n - i : BLOCK;
        if (molt_cuda_h2d((char *)d + (size_t)i * es, bf16 ? (void *)bb : (void *)blk,
                          (size_t)m * es))
            return 1;
    }
    return molt_cuda_sync();
}

typedef struct {
    molt_cuda_dtype dt;
    int64_t T, in, out;
    void *x, *w, *y, *ws;
    const molt_cuda_qw *q;
    const void *src;
    void *dst;
    size_t bytes;
} job;

static int run_linear(void *u) {
    job *j = u;
    return molt_cuda_linear_fwd(j->dt, j->y, j->x, j->w, j->T, j->in, j->out);
}
static int run_cublas(void *u) {
    job *j = u;
    return molt_cuda_gemm_cublas(j->dt, j->dt, 0, 1, j->T, j->out, j->in, 1.0f, j->x, j->in,
                                 j->w, j->in, 0.0f, j->y, j->out);
}
static int run_qlinear(void *u) {
    job *j = u;
    return molt_cuda_qlinear_fwd(j->dt, j->y, j->x, j->q, 0, j->T, j->ws);
}
static int run_copy(void *u) {
    job *j = u;
    return molt_cuda_d2d(j->dst, j->src, j->bytes);
}

static void print_row(const char *op, const char *shape, const char *dt, double s,
                      double tflops, double gbs, const char *base, double ratio) {
    char tf[16] = "-", gb[16] = "-";
    if (tflops > 0)
        snprintf(tf, sizeof tf, "%.2f", tflops);
    if (gbs > 0)
        snprintf(gb, sizeof gb, "%.1f", gbs);
    printf("%-9s %-27s %-5s %9.3f %9s %9s  %-30s %7.3f\n", op, shape, dt, s * 1e3, tf, gb, base,
           ratio);
    fflush(stdout);
}

static int fail(const char *what) {
    fprintf(stderr, CMD ": %s: %s\n", what, molt_cuda_error());
    dev_free_all();
    return 1;
}

typedef struct {
    int64_t T, in, out;
} lshape;

static int bench_linear(const ag_bench_opts *o, lshape s, int bf16, ag_rng *r) {
    job j = {.dt = bf16 ? MOLT_CUDA_BF16 : MOLT_CUDA_F32, .T = s.T, .in = s.in, .out = s.out};
    size_t es = bf16 ? 2 : 4;
    j.x = dev_alloc((size_t)(s.T * s.in) * es);
    j.w = dev_alloc((size_t)(s.out * s.in) * es);
    j.y = dev_alloc((size_t)(s.T * s.out) * es);
    if (!j.x || !j.w || !j.y || dev_fill(j.x, s.T * s.in, bf16, r) ||
        dev_fill(j.w, s.out * s.in, bf16, r))
        return fail("linear buffers");
    double t_lt, t_cb;
    int reps = o->repeat < 10 ? 10 : o->repeat;
    if (time_median(run_linear, &j, reps, &t_lt) || time_median(run_cublas, &j, reps, &t_cb))
        return fail("linear");
    double flops = 2.0 * (double)s.T * (double)s.in * (double)s.out;
    char shape[48], base[40];
    snprintf(shape, sizeof shape, "T=%lld,in=%lld,out=%lld", (long long)s.T, (long long)s.in,
             (long long)s.out);
    snprintf(base, sizeof base, "cublasGemmEx %.2f TFLOP/s", flops / t_cb * 1e-12);
    print_row("linear", shape, bf16 ? "bf16" : "f32", t_lt, flops / t_lt * 1e-12, 0, base,
              t_cb / t_lt);
    dev_free_all();
    return 0;
}

// An NF4 [rows, cols] qweight with random storage on the device (the GEMV's speed does not
// depend on the values; quantizing a matrix this large on the CPU would take minutes).
static int nf4_random(ag_qweight *qd, ag_arena *a, ag_qweight *q, int64_t rows, int64_t cols,
                      ag_rng *r) {
    if (ag_qweight_alloc(q, AG_Q_NF4, 2, (int64_t[]){rows, cols}, NULL) != MOLT_OK)
        return 1;
    uint8_t *d = q->data;
    for (int64_t i = 0; i < (q->numel + 1) / 2; i++)
        d[i] = (uint8_t)ag_rng_next(r);
    for (int64_t b = 0; b < q->n_blocks; b++)
        q->absmax_q[b] = (uint8_t)(128 + ag_rng_next(r) % 100);
    for (int64_t b = 0; b < q->n_blocks2; b++)
        q->absmax_scale[b] = 0.02f;
    q->absmax_offset = 0.05f;
    if (ag_arena_init_device(a, "bench weights", AG_CUDA, q->bytes + (1u << 20)) != MOLT_OK ||
        ag_qweight_to(qd, q, a) != MOLT_OK) {
        fprintf(stderr, CMD ": %s\n", molt_err_msg());
        return 1;
    }
    kq_weight v;
    ag_qweight_view(&v, q);
    return molt_cuda_set_quant_tables(v.nf4_code, v.dyn_code, v.fp8_code);
}

static molt_cuda_qw view_of(const ag_qweight *q) {
    return (molt_cuda_qw){.format = (int)q->format, .n_mat = q->n_mat, .rows = q->rows,
                          .cols = q->cols, .data = q->data, .scale = q->scale,
                          .scale_per_row = q->fp8_per_row,
                          .absmax_q = q->nf4_double_quant ? q->absmax_q : NULL,
                          .absmax_scale = q->absmax_scale, .absmax_offset = q->absmax_offset};
}

// Prefill: the NF4 linear against cuBLAS bf16 on the decoded matrix.
static int bench_nf4_prefill(const ag_bench_opts *o, int64_t T, int64_t rows, int64_t cols,
                             ag_rng *r) {
    ag_qweight q = {0}, qd = {0};
    ag_arena a = {0};
    if (nf4_random(&qd, &a, &q, rows, cols, r)) {
        ag_qweight_free(&q);
        ag_arena_free(&a);
        return fail("nf4 weights");
    }
    molt_cuda_qw cw = view_of(&qd);
    job j = {.dt = MOLT_CUDA_BF16, .T = T, .in = cols, .out = rows, .q = &cw};
    j.x = dev_alloc((size_t)(T * cols) * 2);
    j.y = dev_alloc((size_t)(T * rows) * 2);
    j.w = dev_alloc((size_t)(rows * cols) * 2);
    j.ws = dev_alloc(molt_cuda_qlinear_ws_bytes(MOLT_CUDA_BF16, &cw, T));
    int rc = !j.x || !j.y || !j.w || !j.ws || dev_fill(j.x, T * cols, 1, r) ||
             molt_cuda_dequant(MOLT_CUDA_BF16, j.w, &cw, 0, rows * cols);
    double t_q = 0, t_cb = 0;
    int reps = o->repeat < 10 ? 10 : o->repeat;
    if (!rc)
        rc = time_median(run_qlinear, &j, reps, &t_q) || time_median(run_cublas, &j, reps, &t_cb);
    ag_qweight_free(&q);
    ag_arena_free(&a);
    if (rc)
        return fail("nf4 prefill");
    double flops = 2.0 * (double)T * (double)rows * (double)cols;
    char shape[48], base[40];
    snprintf(shape, sizeof shape, "T=%lld,[%lld,%lld] nf4", (long long)T, (long long)rows,
             (long long)cols);
    snprintf(base, sizeof base, "cuBLAS bf16 decoded %.2f TF/s", flops / t_cb * 1e-12);
    print_row("linear_q", shape, "bf16", t_q, flops / t_q * 1e-12, 0, base, t_cb / t_q);
    dev_free_all();
    return 0;
}

// Decode: the NF4 GEMV in GB/s of weight storage against the copy bandwidth.
static int bench_nf4_gemv(const ag_bench_opts *o, int64_t rows, int64_t cols, double copy_gbs,
                          ag_rng *r) {
    ag_qweight q = {0}, qd = {0};
    ag_arena a = {0};
    if (nf4_random(&qd, &a, &q, rows, cols, r)) {
        ag_qweight_free(&q);
        ag_arena_free(&a);
        return fail("nf4 weights");
    }
    molt_cuda_qw cw = view_of(&qd);
    const int64_t Ts[3] = {1, 4, 8};
    int rc = 0;
    for (int k = 0; k < 3 && !rc; k++) {
        job j = {.dt = MOLT_CUDA_BF16, .T = Ts[k], .in = cols, .out = rows, .q = &cw};
        j.x = dev_alloc((size_t)(Ts[k] * cols) * 2);
        j.y = dev_alloc((size_t)(Ts[k] * rows) * 2);
        j.ws = dev_alloc(molt_cuda_qlinear_ws_bytes(MOLT_CUDA_BF16, &cw, Ts[k]));
        rc = !j.x || !j.y || !j.ws || dev_fill(j.x, Ts[k] * cols, 1, r);
        double t = 0;
        int reps = o->repeat < 20 ? 20 : o->repeat;
        if (!rc)
            rc = time_median(run_qlinear, &j, reps, &t);
        if (!rc) {
            double gbs = (double)q.bytes / t * 1e-9;
            char shape[48], base[40];
            snprintf(shape, sizeof shape, "T=%lld,[%lld,%lld] nf4", (long long)Ts[k],
                     (long long)rows, (long long)cols);
            snprintf(base, sizeof base, "copy %.0f GB/s", copy_gbs);
            print_row("nf4_gemv", shape, "bf16", t, 0, gbs, base, gbs / copy_gbs);
        }
        dev_free_all();
    }
    ag_qweight_free(&q);
    ag_arena_free(&a);
    return rc ? fail("nf4 gemv") : 0;
}

int ag_bench_cuda(const ag_bench_opts *o) {
    ag_device_info info;
    ag_device_query(&info);
    if (info.cuda_devices < 1) {
        fprintf(stderr, CMD ": no CUDA device visible (%s)\n", info.cuda_error);
        return 1;
    }
    char name[256];
    if (ag_cuda_describe(0, name, sizeof name) != MOLT_OK) {
        fprintf(stderr, CMD ": %s\n", molt_err_msg());
        return 1;
    }
    printf(CMD ": %s; median of the timed runs (at least 10) after %d warm-ups, CUDA events\n",
           name, WARMUP);
    printf("rates: TFLOP/s = 2*T*in*out / time; GB/s of the GEMV = weight bytes (packed codes +\n"
           "absmax) / time; vs = the row's rate / the baseline's rate in this run\n\n");
    ag_rng r;
    ag_rng_seed(&r, 42);
    // the copy ceiling: bytes read + written
    size_t cb = o->quick ? ((size_t)64 << 20) : ((size_t)1 << 30);
    job cj = {.src = dev_alloc(cb), .dst = dev_alloc(cb), .bytes = cb};
    double tc = 0;
    if (!cj.src || !cj.dst || time_median(run_copy, &cj, 10, &tc))
        return fail("copy");
    double copy_gbs = 2.0 * (double)cb / tc * 1e-9;
    dev_free_all();
    printf("copy: %zu MiB device to device, %.0f GB/s (read + written)\n\n", cb >> 20, copy_gbs);
    printf("%-9s %-27s %-5s %9s %9s %9s  %-30s %7s\n", "op", "shape", "dtype", "ms", "TFLOP/s",
           "GB/s", "baseline", "vs");
    static const lshape full[] = {{4096, 4096, 4096}, {8192, 8192, 8192}, {512, 4096, 4096},
                                  {16384, 4096, 2048}};
    static const lshape quick[] = {{64, 128, 96}, {33, 65, 17}};
    const lshape *ls = o->quick ? quick : full;
    int nl = o->quick ? 2 : 4;
    for (int i = 0; i < nl; i++)
        if (bench_linear(o, ls[i], 1, &r))
            return 1;
    if (bench_linear(o, o->quick ? quick[0] : full[0], 0, &r))
        return 1;
    int64_t qr = o->quick ? 256 : 4096, qc = o->quick ? 512 : 4096;
    if (bench_nf4_prefill(o, o->quick ? 64 : 512, qr, qc, &r) ||
        bench_nf4_prefill(o, o->quick ? 128 : 4096, qr, qc, &r))
        return 1;
    // decode: a matrix several times the L2 (32768 x 8192 NF4: 130 MiB)
    return bench_nf4_gemv(o, o->quick ? 1024 : 32768, o->quick ? 1024 : 8192, copy_gbs, &r);
}

#endif
