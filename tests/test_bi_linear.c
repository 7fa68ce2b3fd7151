// tests/test_bi_linear.c: the batch-invariant inference products (bi_linear, bi_linear_q;
// cpu/k_bi.h) and their use by ag_linear / ag_linear_q with grad off. Properties, each on
// every weight format (dense F32; quantized F32, BF16, INT8, FP8 per row and per matrix, NF4
// with and without double quantization), on awkward sizes and on every instruction-set copy
// the processor runs:
//  - each row's output has the same bits for T = 1, 2, 3, 5, 8, 17, 64, 300, for rows given
//    in another order or as a subset, and for 1, 2 or 3 threads;
//  - bi_linear_q equals bi_linear on the dequantized matrix bit for bit (one order for all
//    formats; every FP8 code is covered), and the AVX2 copy equals the AVX-512F copy;
//  - accuracy against the double-accumulating reference kernels (linear_fwd_ref,
//    qlinear_fwd_ref) within the error bound of a float dot product in that order;
//  - ag_linear / ag_linear_q give the batch-invariant bits with grad off, and BLAS's while
//    recording (training); ag_moe_experts / ag_moe_experts_q with grad off give each token
//    the same row alone or in any batch, close to the reference kernels.
#include "harness/harness.h"
#include "autograd/quant_internal.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#define T_MAX 300
static const int64_t t_list[] = {1, 2, 3, 5, 8, 17, 64, 300};
#define N_T 8

// ---- weights -------------------------------------------------------------------------------

typedef struct {
    ag_qformat f;
    bool dq, per_row; // NF4 double quantization; FP8 per-row scales
    const char *name;
} fmt_case;

static const fmt_case fmts[] = {
    {AG_Q_F32, true, true, "f32"},      {AG_Q_BF16, true, true, "bf16"},
    {AG_Q_INT8, true, true, "int8"},    {AG_Q_FP8, true, true, "fp8/row"},
    {AG_Q_FP8, true, false, "fp8/mat"}, {AG_Q_NF4, true, true, "nf4+dq"},
    {AG_Q_NF4, false, true, "nf4"},
};
#define N_FMTS 7

typedef struct {
    int64_t rows, cols;
} size2;

// cols: below one vector, not a multiple of 16, of 64 (NF4 rows inside blocks), multiples of
// 64 (NF4 decoded in registers); rows: 1, 3, 17 and more than a tile or a panel.
static const size2 sizes[] = {{1, 1},   {3, 15},  {17, 17},  {5, 77},   {70, 130},
                              {3, 64},  {17, 128}, {33, 320}, {1, 512}, {300, 64}};
#define N_SIZES 10

// A stack of two matrices [2, rows, cols] (the tests use matrix 1: NF4 blocks and FP8
// per-matrix scales then depend on the matrix index) with normal values.
static void make_weight(ag_qweight *q, ag_arena *a, const fmt_case *fc, size2 s, uint64_t seed) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    int64_t shape[3] = {2, s.rows, s.cols};
    ag_tensor *w = ag_tensor_new(a, AG_F32, 3, shape);
    ck_assert_tensor(w);
    ag_fill_normal(w, &r, 0, 0.5);
    ag_qopts o = {.nf4_double_quant = fc->dq, .fp8_per_row = fc->per_row};
    ck_assert_ok(ag_qweight_quantize(q, w, fc->f, &o));
}

static float *rand_x(int64_t n, uint64_t seed) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    float *x = malloc((size_t)(n ? n : 1) * sizeof *x);
    ck_assert_ptr_nonnull(x);
    for (int64_t i = 0; i < n; i++)
        x[i] = (float)(2 * ag_rng_uniform(&r) - 1);
    return x;
}

static float *alloc_f(int64_t n) {
    float *p = malloc((size_t)(n ? n : 1) * sizeof *p);
    ck_assert_ptr_nonnull(p);
    return p;
}

// y (T, rows) = bi_linear_q on matrix 1 of v with its own workspace.
static void run_q(float *y, const float *x, const kq_weight *v, int64_t T, int nt) {
    size_t b = bi_linear_q_ws_bytes_f32(v, T, nt);
    void *ws = malloc(b ? b : 1);
    ck_assert_ptr_nonnull(ws);
    bi_linear_q_f32(y, x, v, 1, T, nt, ws);
    free(ws);
}

// Bitwise equality of rows: got row i must be want row idx[i] (idx NULL: row i).
static void same_rows(const char *what, const float *got, const float *want, const int64_t *idx,
                      int64_t T, int64_t rows) {
    for (int64_t i = 0; i < T; i++) {
        int64_t src = idx ? idx[i] : i;
        if (memcmp(got + i * rows, want + src * rows, (size_t)rows * sizeof *got) == 0)
            continue;
        for (int64_t o = 0; o < rows; o++)
            ck_assert_msg(memcmp(&got[i * rows + o], &want[src * rows + o], sizeof *got) == 0,
                          "%s: row %lld (source row %lld), column %lld: %.9g vs %.9g", what,
                          (long long)i, (long long)src, (long long)o,
                          (double)got[i * rows + o], (double)want[src * rows + o]);
    }
}

// ---- invariance --------------------------------------------------------------------------

// Every T of t_list, reversed and subset row orders, 1-3 threads: the same row bits as one
// call on all T_MAX rows with 2 threads.
static void check_invariance(const kq_weight *v, const char *name) {
    int64_t rows = v->rows, cols = v->cols;
    float *x = rand_x(T_MAX * cols, 7), *full = alloc_f(T_MAX * rows);
    float *y = alloc_f(T_MAX * rows), *xp = alloc_f(T_MAX * cols);
    run_q(full, x, v, T_MAX, 2);
    char what[160];
    for (int ti = 0; ti < N_T; ti++)
        for (int nt = 1; nt <= 3; nt++) {
            run_q(y, x, v, t_list[ti], nt);
            snprintf(what, sizeof what, "%s [%lld x %lld] %s T=%lld threads=%d", name,
                     (long long)rows, (long long)cols, bi_isa_name(bi_isa()),
                     (long long)t_list[ti], nt);
            same_rows(what, y, full, NULL, t_list[ti], rows);
        }
    // reversed order of all rows, then every third row from the end (a subset)
    int64_t idx[T_MAX], n = 0;
    for (int pass = 0; pass < 2; pass++) {
        n = 0;
        for (int64_t i = T_MAX - 1; i >= 0; i -= pass ? 3 : 1)
            idx[n++] = i;
        for (int64_t i = 0; i < n; i++)
            memcpy(xp + i * cols, x + idx[i] * cols, (size_t)cols * sizeof *x);
        run_q(y, xp, v, n, 3);
        snprintf(what, sizeof what, "%s [%lld x %lld] %s, %s", name, (long long)rows,
                 (long long)cols, bi_isa_name(bi_isa()), pass ? "subset" : "reversed");
        same_rows(what, y, full, idx, n, rows);
    }
    free(x);
    free(full);
    free(y);
    free(xp);
}

START_TEST(test_invariance) {
    const fmt_case *fc = &fmts[_i % N_FMTS];
    size2 s = sizes[_i / N_FMTS];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_qweight q;
    make_weight(&q, &a, fc, s, 100 + (uint64_t)_i);
    kq_weight v;
    ag_qweight_view(&v, &q);
    for (int isa = bi_isa_best(); isa >= 0; isa--) {
        ck_assert_int_eq(bi_set_isa(isa), isa);
        check_invariance(&v, fc->name);
    }
    bi_set_isa(-1);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// Dense bi_linear: the same over T, orders and threads (it is also what the quantized F32
// format runs, but through its own entry point here).
START_TEST(test_invariance_dense) {
    size2 s = sizes[_i];
    int64_t rows = s.rows, cols = s.cols;
    float *w = rand_x(rows * cols, 5), *x = rand_x(T_MAX * cols, 6);
    float *full = alloc_f(T_MAX * rows), *y = alloc_f(T_MAX * rows);
    for (int isa = bi_isa_best(); isa >= 0; isa--) {
        bi_set_isa(isa);
        bi_linear_f32(full, x, w, T_MAX, rows, cols, 2);
        for (int ti = 0; ti < N_T; ti++)
            for (int nt = 1; nt <= 3; nt++) {
                bi_linear_f32(y, x, w, t_list[ti], rows, cols, nt);
                char what[96];
                snprintf(what, sizeof what, "dense [%lld x %lld] %s T=%lld threads=%d",
                         (long long)rows, (long long)cols, bi_isa_name(isa),
                         (long long)t_list[ti], nt);
                same_rows(what, y, full, NULL, t_list[ti], rows);
            }
        // rows 299, 298, ... 0 against the forward order
        int64_t idx[T_MAX];
        float *xp = alloc_f(T_MAX * cols);
        for (int64_t i = 0; i < T_MAX; i++) {
            idx[i] = T_MAX - 1 - i;
            memcpy(xp + i * cols, x + idx[i] * cols, (size_t)cols * sizeof *x);
        }
        bi_linear_f32(y, xp, w, T_MAX, rows, cols, 3);
        same_rows("dense reversed", y, full, idx, T_MAX, rows);
        free(xp);
    }
    bi_set_isa(-1);
    free(w);
    free(x);
    free(full);
    free(y);
}
END_TEST

// Dense bi_linear over several panels per thread, with enough rows of x that each group of
// rows meets the whole panel and the later passes bring in the thread's next panel: every
// row of a 200-row product has the bits of that row alone (which streams the weights once
// per tile), for 1-3 threads and every copy. y starts as NaN, so a panel that no thread
// computes shows.
START_TEST(test_dense_panels) {
    const int64_t rows = 5000, cols = 64, T = 200;
    float *w = rand_x(rows * cols, 21), *x = rand_x(T * cols, 22);
    float *one = alloc_f(T * rows), *y = alloc_f(T * rows);
    for (int isa = bi_isa_best(); isa >= 0; isa--) {
        bi_set_isa(isa);
        for (int64_t t = 0; t < T; t++)
            bi_linear_f32(one + t * rows, x + t * cols, w, 1, rows, cols, 1);
        for (int nt = 1; nt <= 3; nt++) {
            for (int64_t i = 0; i < T * rows; i++)
                y[i] = NAN;
            bi_linear_f32(y, x, w, T, rows, cols, nt);
            char what[64];
            snprintf(what, sizeof what, "dense panels %s threads=%d", bi_isa_name(isa), nt);
            same_rows(what, y, one, NULL, T, rows);
        }
    }
    bi_set_isa(-1);
    free(w);
    free(x);
    free(one);
    free(y);
}
END_TEST

// ---- one order for every format, and across copies ---------------------------------------

// bi_linear_q on matrix 1 == bi_linear on that matrix dequantized (kq_dequant_range's
// values), for T in registers (<= 8) and through the decode buffer (> 8).
static void check_vs_dense(const kq_weight *v, const char *name) {
    int64_t rows = v->rows, cols = v->cols;
    float *wd = alloc_f(rows * cols), *x = rand_x(64 * cols, 9);
    float *yq = alloc_f(64 * rows), *yd = alloc_f(64 * rows);
    kq_dequant_range_f32(wd, v, rows * cols, rows * cols);
    for (int64_t T = 1; T <= 64; T *= 4) {
        run_q(yq, x, v, T, 2);
        bi_linear_f32(yd, x, wd, T, rows, cols, 2);
        char what[128];
        snprintf(what, sizeof what, "%s [%lld x %lld] %s T=%lld: quantized vs dequantized",
                 name, (long long)rows, (long long)cols, bi_isa_name(bi_isa()), (long long)T);
        same_rows(what, yq, yd, NULL, T, rows);
    }
    free(wd);
    free(x);
    free(yq);
    free(yd);
}

START_TEST(test_quant_equals_dequantized) {
    const fmt_case *fc = &fmts[_i % N_FMTS];
    size2 s = sizes[_i / N_FMTS];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_qweight q;
    make_weight(&q, &a, fc, s, 300 + (uint64_t)_i);
    kq_weight v;
    ag_qweight_view(&v, &q);
    for (int isa = bi_isa_best(); isa >= 0; isa--) {
        bi_set_isa(isa);
        check_vs_dense(&v, fc->name);
    }
    bi_set_isa(-1);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// Every E4M3 code but the two NaNs, in every lane position, through the arithmetic decoding
// of the vector copies: equal to the format's table (via the dequantized product).
START_TEST(test_fp8_every_code) {
    int64_t rows = 9, cols = 254 + 18, shape[2] = {rows, cols};
    uint8_t *codes = malloc((size_t)(rows * cols));
    ck_assert_ptr_nonnull(codes);
    for (int64_t i = 0; i < rows * cols; i++) {
        int c = (int)((i * 7 + i / cols) % 254); // 0..253, skipping 0x7f and 0xff below
        codes[i] = (uint8_t)(c < 0x7f ? c : c + 1);
    }
    float scale = 0.37f;
    ag_qweight q;
    ck_assert_ok(ag_qweight_from_fp8(&q, codes, 2, shape, &scale));
    kq_weight v;
    ag_qweight_view(&v, &q);
    float *wd = alloc_f(rows * cols), *x = rand_x(cols * 3, 4), *yq = alloc_f(3 * rows);
    float *yd = alloc_f(3 * rows);
    kq_dequant_range_f32(wd, &v, 0, rows * cols);
    for (int isa = bi_isa_best(); isa >= 0; isa--) {
        bi_set_isa(isa);
        size_t b = bi_linear_q_ws_bytes_f32(&v, 3, 1);
        void *ws = malloc(b ? b : 1);
        bi_linear_q_f32(yq, x, &v, 0, 3, 1, ws);
        free(ws);
        bi_linear_f32(yd, x, wd, 3, rows, cols, 1);
        same_rows(bi_isa_name(isa), yq, yd, NULL, 3, rows);
        // one-hot rows of x pick single weights: decoded values compared directly
        float *e = calloc((size_t)cols, sizeof *e), yo[9];
        for (int64_t k = 0; k < cols; k += 13) {
            e[k] = 1;
            ws = malloc(b ? b : 1);
            bi_linear_q_f32(yo, e, &v, 0, 1, 1, ws);
            free(ws);
            for (int64_t o = 0; o < rows; o++)
                ck_assert_msg(yo[o] == v.fp8_code[codes[o * cols + k]] * scale,
                              "%s: code 0x%02x decodes to %g", bi_isa_name(isa),
                              codes[o * cols + k], (double)yo[o]);
            e[k] = 0;
        }
        free(e);
    }
    bi_set_isa(-1);
    free(codes);
    free(wd);
    free(x);
    free(yq);
    free(yd);
    ag_qweight_free(&q);
}
END_TEST

// The AVX2 copy adds in the same order with the same fused multiply-adds as the AVX-512F one.
START_TEST(test_copies_agree) {
    if (bi_isa_best() < BI_ISA_AVX512)
        return; // only one FMA copy runs here: nothing to compare
    const fmt_case *fc = &fmts[_i % N_FMTS];
    size2 s = sizes[_i / N_FMTS];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_qweight q;
    make_weight(&q, &a, fc, s, 500 + (uint64_t)_i);
    kq_weight v;
    ag_qweight_view(&v, &q);
    float *x = rand_x(17 * s.cols, 3), *y5 = alloc_f(17 * s.rows), *y2 = alloc_f(17 * s.rows);
    for (int64_t T = 1; T <= 17; T += 16) {
        bi_set_isa(BI_ISA_AVX512);
        run_q(y5, x, &v, T, 2);
        bi_set_isa(BI_ISA_AVX2);
        run_q(y2, x, &v, T, 2);
        same_rows(fc->name, y2, y5, NULL, T, s.rows);
    }
    bi_set_isa(-1);
    free(x);
    free(y5);
    free(y2);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// ---- accuracy --------------------------------------------------------------------------------

// |y - ref| <= (cols/16 + 6) u sum_k |x_k w_k| + u |ref|: a chain of cols/16 multiply-adds
// per lane and 4 levels of the tree (u = 2^-24), and ref rounded from double.
static void check_accuracy(const char *what, const float *y, const float *ref, const float *x,
                           const float *wd, int64_t T, int64_t rows, int64_t cols) {
    const double u = 0x1p-24;
    for (int64_t t = 0; t < T; t++)
        for (int64_t o = 0; o < rows; o++) {
            double mag = 0;
            for (int64_t k = 0; k < cols; k++)
                mag += fabs((double)x[t * cols + k] * wd[o * cols + k]);
            double r = ref[t * rows + o], err = fabs((double)y[t * rows + o] - r);
            double bound = ((double)cols / 16 + 6) * u * mag + u * fabs(r);
            ck_assert_msg(err <= bound, "%s: y[%lld, %lld] = %.9g, reference %.9g, |diff| %g > %g",
                          what, (long long)t, (long long)o, (double)y[t * rows + o], r, err,
                          bound);
        }
}

START_TEST(test_accuracy) {
    const fmt_case *fc = &fmts[_i % N_FMTS];
    size2 s = sizes[_i / N_FMTS];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_qweight q;
    make_weight(&q, &a, fc, s, 700 + (uint64_t)_i);
    kq_weight v;
    ag_qweight_view(&v, &q);
    int64_t T = 17, rows = s.rows, cols = s.cols;
    float *x = rand_x(T * cols, 8), *wd = alloc_f(rows * cols);
    float *y = alloc_f(T * rows), *ref = alloc_f(T * rows), *refd = alloc_f(T * rows);
    kq_dequant_range_f32(wd, &v, rows * cols, rows * cols);
    qlinear_fwd_ref_f32(ref, x, &v, 1, T);
    linear_fwd_ref_f32(refd, x, wd, T, cols, rows);
    for (int isa = bi_isa_best(); isa >= 0; isa--) {
        bi_set_isa(isa);
        char what[96];
        snprintf(what, sizeof what, "%s [%lld x %lld] %s", fc->name, (long long)rows,
                 (long long)cols, bi_isa_name(isa));
        run_q(y, x, &v, T, 2);
        check_accuracy(what, y, ref, x, wd, T, rows, cols);
        bi_linear_f32(y, x, wd, T, rows, cols, 2);
        check_accuracy(what, y, refd, x, wd, T, rows, cols);
    }
    bi_set_isa(-1);
    free(x);
    free(wd);
    free(y);
    free(ref);
    free(refd);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// f64: the plain loops against the references, and invariant too.
START_TEST(test_f64) {
    int64_t T = 17, rows = 33, cols = 77;
    double *x = malloc((size_t)(T * cols) * sizeof *x), *w = malloc((size_t)(rows * cols) * sizeof *w);
    double *y = malloc((size_t)(T * rows) * sizeof *y), *y1 = malloc((size_t)rows * sizeof *y1);
    double *ref = malloc((size_t)(T * rows) * sizeof *ref);
    ck_assert(x && w && y && y1 && ref);
    ag_rng r;
    ag_rng_seed(&r, 2);
    for (int64_t i = 0; i < T * cols; i++)
        x[i] = 2 * ag_rng_uniform(&r) - 1;
    for (int64_t i = 0; i < rows * cols; i++)
        w[i] = 2 * ag_rng_uniform(&r) - 1;
    bi_linear_f64(y, x, w, T, rows, cols, 3);
    linear_fwd_ref_f64(ref, x, w, T, cols, rows);
    for (int64_t i = 0; i < T * rows; i++)
        ck_assert_msg(fabs(y[i] - ref[i]) <= 1e-13, "f64 y[%lld] %.17g vs %.17g", (long long)i,
                      y[i], ref[i]);
    bi_linear_f64(y1, x + 5 * cols, w, 1, rows, cols, 1);
    ck_assert(memcmp(y1, y + 5 * rows, (size_t)rows * sizeof *y1) == 0);
    free(x);
    free(w);
    free(y);
    free(y1);
    free(ref);
}
END_TEST

// ---- through the ops ----------------------------------------------------------------------

// ag_linear with grad off: bi_linear's bits, row by row whatever T; recording: BLAS's.
START_TEST(test_ag_linear) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 11);
    int64_t in = 200, out = 70, T = 64;
    ag_tensor *x = ag_tensor_new2(&a, AG_F32, T, in), *w = ag_tensor_new2(&a, AG_F32, out, in);
    ck_assert(x && w);
    ag_fill_uniform(x, &r, -1, 1);
    ag_fill_uniform(w, &r, -1, 1);
    float *want = alloc_f(T * out), *blas = alloc_f(T * out);
    bi_linear_f32(want, x->data, w->data, T, out, in, 1);
    linear_fwd_f32(blas, x->data, w->data, T, in, out);
    for (int nt = 1; nt <= 3; nt++) {
        omp_set_num_threads(nt);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_ctx_set_grad(&c, false);
        x->requires_grad = true;
        w->requires_grad = true;
        ag_tensor *y = ag_linear(&c, x, w);
        ck_assert_tensor(y);
        same_rows("ag_linear, grad off", y->data, want, NULL, T, out);
        for (int64_t t = 0; t < T; t += 13) { // one row alone
            ag_tensor *x1 = ag_slice(&c, x, 0, t, 1);
            ag_tensor *y1 = ag_linear(&c, x1, w);
            ck_assert_tensor(y1);
            same_rows("ag_linear, one row", y1->data, want + t * out, NULL, 1, out);
        }
        // grad on, but nothing requires grad: nothing is recorded, inference kernels
        ag_ctx_set_grad(&c, true);
        x->requires_grad = w->requires_grad = false;
        y = ag_linear(&c, x, w);
        same_rows("ag_linear, nothing requires grad", y->data, want, NULL, T, out);
        // recording: the training kernels
        x->requires_grad = true;
        y = ag_linear(&c, x, w);
        same_rows("ag_linear, recording", y->data, blas, NULL, T, out);
        ag_ctx_free(&c);
    }
    omp_set_num_threads(2);
    free(want);
    free(blas);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_ag_linear_q) {
    const fmt_case *fc = &fmts[_i];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 12);
    int64_t in = 128, out = 70, T = 20;
    ag_tensor *w = ag_tensor_new2(&a, AG_F32, out, in), *x = ag_tensor_new2(&a, AG_F32, T, in);
    ck_assert(w && x);
    ag_fill_normal(w, &r, 0, 0.5);
    ag_fill_uniform(x, &r, -1, 1);
    ag_qopts o = {.nf4_double_quant = fc->dq, .fp8_per_row = fc->per_row};
    ag_qweight q;
    ck_assert_ok(ag_qweight_quantize(&q, w, fc->f, &o));
    kq_weight v;
    ag_qweight_view(&v, &q);
    float *want = alloc_f(T * out);
    size_t b = bi_linear_q_ws_bytes_f32(&v, T, 1);
    void *ws = malloc(b ? b : 1);
    bi_linear_q_f32(want, x->data, &v, 0, T, 1, ws);
    free(ws);
    for (int nt = 1; nt <= 3; nt++) {
        omp_set_num_threads(nt);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_ctx_set_grad(&c, false);
        x->requires_grad = true;
        ag_tensor *y = ag_linear_q(&c, x, &q);
        ck_assert_tensor(y);
        same_rows(fc->name, y->data, want, NULL, T, out);
        for (int64_t t = 0; t < T; t += 7) {
            ag_tensor *y1 = ag_linear_q(&c, ag_slice(&c, x, 0, t, 1), &q);
            ck_assert_tensor(y1);
            same_rows(fc->name, y1->data, want + t * out, NULL, 1, out);
        }
        ag_ctx_set_grad(&c, true); // recording: the BLAS kernels, same values to rounding
        y = ag_linear_q(&c, x, &q);
        ck_assert_tensor(y);
        ck_assert_int_eq(c.n_tape, 1);
        for (int64_t i = 0; i < T * out; i++)
            ck_assert(fabsf(((float *)y->data)[i] - want[i]) <= 1e-4f * (1 + fabsf(want[i])));
        ag_ctx_free(&c);
    }
    omp_set_num_threads(2);
    free(want);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// ---- routed experts with grad off ----------------------------------------------------------

// x [T, H], routing weights [T, k] and expert choices (any, duplicates included) for E
// experts; the experts' output row of each token must not depend on the other tokens.
typedef struct {
    int64_t T, k, E, H, I;
    ag_tensor *x, *w, *idx, *gu, *down;
} moe_case;

static void moe_case_init(moe_case *m, ag_arena *a, int64_t T, int64_t H, int64_t I) {
    *m = (moe_case){.T = T, .k = 2, .E = 5, .H = H, .I = I};
    ag_rng r;
    ag_rng_seed(&r, 31);
    m->x = ag_tensor_new2(a, AG_F32, T, H);
    m->w = ag_tensor_new2(a, AG_F32, T, m->k);
    m->idx = ag_tensor_new2(a, AG_I32, T, m->k);
    m->gu = ag_tensor_new(a, AG_F32, 3, (int64_t[]){m->E, 2 * I, H});
    m->down = ag_tensor_new(a, AG_F32, 3, (int64_t[]){m->E, H, I});
    ck_assert(m->x && m->w && m->idx && m->gu && m->down);
    ag_fill_uniform(m->x, &r, -1, 1);
    ag_fill_uniform(m->w, &r, 0, 1);
    ag_fill_normal(m->gu, &r, 0, 0.2);
    ag_fill_normal(m->down, &r, 0, 0.2);
    int32_t *ix = m->idx->data;
    for (int64_t s = 0; s < T * m->k; s++)
        ix[s] = (int32_t)(ag_rng_next(&r) % (uint64_t)m->E);
}

// Rows [t0, t0 + n) of the case as their own batch (new tensors in arena a).
static void moe_rows(ag_tensor **out, ag_arena *a, const moe_case *m, int64_t t0, int64_t n) {
    ag_tensor *src[3] = {m->x, m->w, m->idx};
    for (int i = 0; i < 3; i++) {
        int64_t cols = src[i]->shape[1];
        out[i] = ag_tensor_new2(a, src[i]->dtype, n, cols);
        ck_assert_tensor(out[i]);
        memcpy(out[i]->data, (char *)src[i]->data + t0 * cols * 4, (size_t)(n * cols) * 4);
    }
}

// ag_moe_experts (dense), or ag_moe_experts_q when gu/down qweights are given.
static ag_tensor *run_experts(ag_ctx *c, ag_tensor **in, const moe_case *m,
                              const ag_qweight *qgu, const ag_qweight *qd) {
    return qgu ? ag_moe_experts_q(c, in[0], in[1], in[2], qgu, qd)
               : ag_moe_experts(c, in[0], in[1], in[2], m->gu, m->down);
}

static void check_experts_invariant(const moe_case *m, const ag_qweight *qgu,
                                    const ag_qweight *qd, const char *name) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_ctx_set_grad(&c, false);
    omp_set_num_threads(2);
    ag_tensor *all[3] = {m->x, m->w, m->idx};
    ag_tensor *full = run_experts(&c, all, m, qgu, qd);
    ck_assert_tensor(full);
    // accuracy: the reference kernels on the same operands
    ag_set_reference_kernels(true);
    ag_tensor *ref = run_experts(&c, all, m, qgu, qd);
    ag_set_reference_kernels(false);
    ck_assert_tensor(ref);
    double rel = gc_max_rel_diff(full, ref);
    ck_assert_msg(rel <= 2e-5, "%s: max rel diff to the reference %g", name, rel);
    static const int64_t spans[][2] = {{0, 1}, {5, 1}, {3, 8}, {0, 17}, {20, 44}};
    for (int nt = 1; nt <= 3; nt++) {
        omp_set_num_threads(nt);
        for (size_t i = 0; i < sizeof spans / sizeof *spans; i++) {
            int64_t t0 = spans[i][0], n = spans[i][1];
            ag_tensor *in[3];
            moe_rows(in, &a, m, t0, n);
            ag_tensor *y = run_experts(&c, in, m, qgu, qd);
            ck_assert_tensor(y);
            char what[96];
            snprintf(what, sizeof what, "%s rows %lld..%lld, %d threads", name, (long long)t0,
                     (long long)(t0 + n - 1), nt);
            same_rows(what, y->data, (float *)full->data + t0 * m->H, NULL, n, m->H);
        }
    }
    omp_set_num_threads(2);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}

// _i = 0: dense experts; 1: NF4 + DQ; 2: INT8.
// ---- dots and weighted sums over row pointers ----------------------------------------------

// K: below a vector, not a multiple of 16, one and several times the registers of a weighted
// sum (128 floats in the AVX-512F copy), and past them; n: a partial tile and several.
static const int64_t rowset_k[] = {1, 15, 17, 64, 128, 160, 300};
static const int64_t rowset_n[] = {1, 5, 13, 40};
#define N_RK 7
#define N_RN 4

// n rows of K values, each its own allocation (as paged cache rows are), and a dense copy.
static float **rowset(int64_t n, int64_t K, uint64_t seed, float *dense) {
    float **r = malloc((size_t)n * sizeof *r);
    ck_assert_ptr_nonnull(r);
    for (int64_t j = 0; j < n; j++) {
        r[j] = rand_x(K, seed + (uint64_t)j);
        memcpy(dense + j * K, r[j], (size_t)K * sizeof *dense);
    }
    return r;
}

static void rowset_free(float **r, int64_t n) {
    for (int64_t j = 0; j < n; j++)
        free(r[j]);
    free(r);
}

// bi_dots gives bi_linear's bits for the same vector against the same rows, on every copy,
// and stays within float rounding of the f64 sums.
START_TEST(test_dots) {
    int64_t K = rowset_k[_i % N_RK], n = rowset_n[_i / N_RK];
    float *dense = alloc_f(n * K), *a = rand_x(K, 50), *y = alloc_f(n), *want = alloc_f(n);
    float **rows = rowset(n, K, 60, dense);
    for (int isa = bi_isa_best(); isa >= 0; isa--) {
        bi_set_isa(isa);
        bi_dots_f32(y, a, (const float *const *)rows, n, K);
        bi_linear_f32(want, a, dense, 1, n, K, 1);
        char what[96];
        snprintf(what, sizeof what, "dots %s n=%lld K=%lld", bi_isa_name(isa), (long long)n,
                 (long long)K);
        same_rows(what, y, want, NULL, 1, n);
        for (int64_t j = 0; j < n; j++) {
            double ref = 0, mag = 0;
            for (int64_t k = 0; k < K; k++) {
                ref += (double)a[k] * rows[j][k];
                mag += fabs((double)a[k] * rows[j][k]);
            }
            ck_assert_msg(fabs(y[j] - ref) <= 1e-6 * mag + 1e-30, "%s row %lld: %g vs %g",
                          what, (long long)j, (double)y[j], ref);
        }
    }
    bi_set_isa(-1);
    rowset_free(rows, n);
    free(dense);
    free(a);
    free(y);
    free(want);
}
END_TEST

// bi_wsum adds p[s] * rows[s][k] in increasing s from 0 with one fused multiply-add per term
// (fmaf) in the FMA copies and a product then a sum in the baseline copy: the same bits as
// those loops, for every element and copy.
START_TEST(test_wsum) {
    int64_t K = rowset_k[_i % N_RK], n = rowset_n[_i / N_RK];
    float *dense = alloc_f(n * K), *p = rand_x(n, 70), *y = alloc_f(K);
    float **rows = rowset(n, K, 80, dense);
    for (int isa = bi_isa_best(); isa >= 0; isa--) {
        bi_set_isa(isa);
        bi_wsum_f32(y, p, (const float *const *)rows, n, K);
        for (int64_t k = 0; k < K; k++) {
            float acc = 0;
            for (int64_t s = 0; s < n; s++) {
                if (isa == BI_ISA_BASE) {
                    volatile float prod = p[s] * rows[s][k]; // rounded on its own
                    acc = acc + prod;
                } else {
                    acc = fmaf(p[s], rows[s][k], acc);
                }
            }
            ck_assert_msg(memcmp(&acc, &y[k], sizeof acc) == 0,
                          "wsum %s n=%lld K=%lld element %lld: %.9g vs %.9g", bi_isa_name(isa),
                          (long long)n, (long long)K, (long long)k, (double)y[k], (double)acc);
        }
    }
    bi_set_isa(-1);
    // f64: the plain sums
    double *pd = malloc((size_t)n * sizeof *pd), *yd = malloc((size_t)K * sizeof *yd);
    double **rd = malloc((size_t)n * sizeof *rd);
    ck_assert(pd && yd && rd);
    for (int64_t s = 0; s < n; s++) {
        pd[s] = p[s];
        rd[s] = malloc((size_t)K * sizeof **rd);
        ck_assert_ptr_nonnull(rd[s]);
        for (int64_t k = 0; k < K; k++)
            rd[s][k] = rows[s][k];
    }
    bi_wsum_f64(yd, pd, (const double *const *)rd, n, K);
    for (int64_t k = 0; k < K; k++) {
        double ref = 0;
        for (int64_t s = 0; s < n; s++)
            ref += pd[s] * rd[s][k];
        ck_assert(yd[k] == ref);
    }
    for (int64_t s = 0; s < n; s++)
        free(rd[s]);
    free(rd);
    free(pd);
    free(yd);
    rowset_free(rows, n);
    free(dense);
    free(p);
    free(y);
}
END_TEST

START_TEST(test_experts_invariant) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    moe_case m;
    moe_case_init(&m, &a, 64, 128, 96);
    if (_i == 0) {
        check_experts_invariant(&m, NULL, NULL, "moe_experts");
    } else {
        const fmt_case *f = &fmts[_i == 1 ? 5 : 2];
        ag_qweight qgu, qd;
        ag_qopts o = {.nf4_double_quant = f->dq, .fp8_per_row = true};
        ck_assert_ok(ag_qweight_quantize(&qgu, m.gu, f->f, &o));
        ck_assert_ok(ag_qweight_quantize(&qd, m.down, f->f, &o));
        check_experts_invariant(&m, &qgu, &qd, f->name);
        ag_qweight_free(&qgu);
        ag_qweight_free(&qd);
    }
    ag_arena_free(&a);
}
END_TEST

int main(void) {
    Suite *s = suite_create("bi_linear");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_loop_test(tc, test_invariance, 0, N_FMTS * N_SIZES);
    tcase_add_loop_test(tc, test_invariance_dense, 0, N_SIZES);
    tcase_add_test(tc, test_dense_panels);
    tcase_add_loop_test(tc, test_quant_equals_dequantized, 0, N_FMTS * N_SIZES);
    tcase_add_test(tc, test_fp8_every_code);
    tcase_add_loop_test(tc, test_copies_agree, 0, N_FMTS * N_SIZES);
    tcase_add_loop_test(tc, test_accuracy, 0, N_FMTS * N_SIZES);
    tcase_add_test(tc, test_f64);
    tcase_add_test(tc, test_ag_linear);
    tcase_add_loop_test(tc, test_ag_linear_q, 0, N_FMTS);
    tcase_add_loop_test(tc, test_experts_invariant, 0, 3);
    tcase_add_loop_test(tc, test_dots, 0, N_RK * N_RN);
    tcase_add_loop_test(tc, test_wsum, 0, N_RK * N_RN);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
