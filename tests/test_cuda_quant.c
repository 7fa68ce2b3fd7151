// tests/test_cuda_quant.c: quantized weights on the GPU in their stored form (moved by
// ag_qweight_to into a CUDA arena): decoding against cpu/k_quant.c's kq_dequant_range bit
// for bit (NF4 with and without double quantization, INT8, FP8 per row and per tensor, BF16,
// F32; odd widths so that NF4 blocks and bytes straddle rows; ranges starting mid-block),
// and the quantized linear forward and input gradient against qlinear_*_ref in double: the
// NF4 GEMV for 1..8 rows (row starts aligned to 32 weights, and not), the decoded-tile GEMM
// above, a matrix of a 3-D stack. f32: 1e-5 relative. bf16 activations: the GEMV rounds only
// its output (2^-9), the tile path also the decoded weights (2^-9): bound 8e-3. Exits 77
// without a GPU.
#include "harness/cuda_check.h"

#include "autograd/quant_internal.h"

#include <stdio.h>

#ifdef MOLT_HAVE_CUDA

static ag_arena host, dev;

static void setup(void) {
    ag_arena_init(&host, "host", 0);
    ck_assert_ok(ag_arena_init_device(&dev, "weights", AG_CUDA, (size_t)64 << 20));
}

static void teardown(void) {
    ag_arena_free(&dev);
    ag_arena_free(&host);
    cu_free_all();
}

typedef struct {
    ag_qformat fmt;
    bool dq, per_row;
    const char *name;
} qcase;

static const qcase cases[] = {
    {AG_Q_NF4, true, true, "nf4+dq"},   {AG_Q_NF4, false, true, "nf4"},
    {AG_Q_INT8, false, true, "int8"},   {AG_Q_FP8, false, true, "fp8/row"},
    {AG_Q_FP8, false, false, "fp8/tensor"}, {AG_Q_BF16, false, true, "bf16"},
    {AG_Q_F32, false, true, "f32"},
};

// q (host) and its device copy qd, with the kernel views of both.
static void make(ag_qweight *q, ag_qweight *qd, kq_weight *v, molt_cuda_qw *cw, const qcase *k,
                 int ndim, const int64_t *shape, ag_rng *r) {
    ag_tensor *w = ag_tensor_new(&host, AG_F32, ndim, shape);
    fill_f(w->data, w->numel, r, -1, 1);
    ag_qopts o = {.nf4_double_quant = k->dq, .fp8_per_row = k->per_row};
    ck_assert_ok(ag_qweight_quantize(q, w, k->fmt, &o));
    ck_assert_ok(ag_qweight_to(qd, q, &dev));
    ag_qweight_view(v, q);
    ck_cuda(molt_cuda_set_quant_tables(v->nf4_code, v->dyn_code, v->fp8_code));
    *cw = (molt_cuda_qw){.format = (int)qd->format, .n_mat = qd->n_mat, .rows = qd->rows,
                         .cols = qd->cols, .data = qd->data, .scale = qd->scale,
                         .scale_per_row = qd->fp8_per_row,
                         .absmax_q = qd->nf4_double_quant ? qd->absmax_q : NULL,
                         .absmax_scale = qd->absmax_scale, .absmax_offset = qd->absmax_offset};
}

START_TEST(test_dequant_bits) {
    ag_rng r;
    ag_rng_seed(&r, 301);
    const int64_t s3[3] = {3, 20, 70}; // 4200 values: blocks of 64 cross rows and matrices
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        ag_qweight q, qd;
        kq_weight v;
        molt_cuda_qw cw;
        make(&q, &qd, &v, &cw, &cases[c], 3, s3, &r);
        int64_t n = q.numel;
        float *ref = molt_malloc(n * 4), *got = molt_malloc(n * 4);
        kq_dequant_range_f32(ref, &v, 0, n);
        void *d = cu_alloc(n * 4);
        ck_cuda(molt_cuda_dequant(MOLT_CUDA_F32, d, &cw, 0, n));
        cu_down(got, d, n * 4);
        char what[64];
        snprintf(what, sizeof what, "dequant %s", cases[c].name);
        ck_same_bits(got, ref, n, what);
        // a range starting on an odd element inside a block
        ck_cuda(molt_cuda_dequant(MOLT_CUDA_F32, d, &cw, 37, 1001));
        kq_dequant_range_f32(ref, &v, 37, 1001);
        cu_down(got, d, 1001 * 4);
        ck_same_bits(got, ref, 1001, what);
        // into bf16: the f32 value rounded once
        ck_cuda(molt_cuda_dequant(MOLT_CUDA_BF16, d, &cw, 0, n));
        kq_dequant_range_f32(ref, &v, 0, n);
        round_bf16(ref, NULL, n);
        cu_down_as(got, d, n, 1);
        ck_same_bits(got, ref, n, what);
        molt_free(ref), molt_free(got);
        ag_qweight_free(&q);
    }
}
END_TEST

// y = x W_e^T and dx += dy W_e for a matrix e of a [E, rows, cols] stack.
static void qlinear_case(const qcase *k, int64_t E, int64_t rows, int64_t cols, int64_t e,
                         int64_t T, int bf16, ag_rng *r) {
    ag_qweight q, qd;
    kq_weight v;
    molt_cuda_qw cw;
    const int64_t shape[3] = {E, rows, cols};
    make(&q, &qd, &v, &cw, k, 3, shape, r);
    float *x = molt_malloc(T * cols * 4), *dy = molt_malloc(T * rows * 4);
    float *dx0 = molt_malloc(T * cols * 4), *got = molt_malloc((T * (rows + cols)) * 4);
    fill_f(x, T * cols, r, -1, 1);
    fill_f(dy, T * rows, r, -1, 1);
    fill_f(dx0, T * cols, r, -1, 1);
    if (bf16) {
        round_bf16(x, NULL, T * cols);
        round_bf16(dy, NULL, T * rows);
        round_bf16(dx0, NULL, T * cols);
    }
    double *x64 = to_f64(x, T * cols), *dy64 = to_f64(dy, T * rows), *dx64 = to_f64(dx0, T * cols);
    double *y64 = molt_malloc(T * rows * 8);
    qlinear_fwd_ref_f64(y64, x64, &v, e, T);
    qlinear_bwd_x_ref_f64(dx64, dy64, &v, e, T);
    molt_cuda_dtype dt = bf16 ? MOLT_CUDA_BF16 : MOLT_CUDA_F32;
    void *dX = cu_up_as(x, T * cols, bf16), *dDY = cu_up_as(dy, T * rows, bf16);
    void *dDX = cu_up_as(dx0, T * cols, bf16), *dY = cu_alloc(T * rows * 4);
    void *ws = cu_alloc(molt_cuda_qlinear_ws_bytes(dt, &cw, T));
    ck_cuda(molt_cuda_qlinear_fwd(dt, dY, dX, &cw, e, T, ws));
    ck_cuda(molt_cuda_qlinear_bwd_x(dt, dDX, dDY, &cw, e, T, ws));
    double tol = bf16 ? 8e-3 : 1e-5;
    char what[96];
    snprintf(what, sizeof what, "qlinear fwd %s %s T %lld [%lld, %lld]", k->name,
             bf16 ? "bf16" : "f32", (long long)T, (long long)rows, (long long)cols);
    cu_down_as(got, dY, T * rows, bf16);
    ck_close(got, y64, T * rows, tol, what);
    snprintf(what, sizeof what, "qlinear dx %s %s T %lld", k->name, bf16 ? "bf16" : "f32",
             (long long)T);
    cu_down_as(got, dDX, T * cols, bf16);
    ck_close(got, dx64, T * cols, tol, what);
    molt_free(x), molt_free(dy), molt_free(dx0), molt_free(got), molt_free(x64);
    molt_free(dy64), molt_free(dx64), molt_free(y64);
    ag_qweight_free(&q);
}

START_TEST(test_qlinear_formats) {
    ag_rng r;
    ag_rng_seed(&r, 302);
    const int64_t Ts[] = {1, 3, 9, 40};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (size_t t = 0; t < 4; t++)
            qlinear_case(&cases[c], 2, 33, 130, 1, Ts[t], 0, &r);
}
END_TEST

// The NF4 GEMV for every row count it serves, on rows aligned to 32 weights (the packed
// 16-byte path) and not, in f32 and bf16; T = 9 goes through the tiles.
START_TEST(test_nf4_gemv) {
    ag_rng r;
    ag_rng_seed(&r, 303);
    for (int64_t T = 1; T <= 9; T++) {
        qlinear_case(&cases[0], 1, 96, 256, 0, T, 0, &r);   // aligned rows
        qlinear_case(&cases[0], 3, 17, 100, 2, T, 0, &r);   // rows start mid-block
        qlinear_case(&cases[1], 1, 64, 512, 0, T, 1, &r);   // plain absmax, bf16
    }
}
END_TEST

START_TEST(test_gemv_refuses_other_shapes) {
    ag_rng r;
    ag_rng_seed(&r, 304);
    ag_qweight q, qd;
    kq_weight v;
    molt_cuda_qw cw;
    make(&q, &qd, &v, &cw, &cases[2], 2, (int64_t[]){8, 64}, &r); // int8
    void *x = cu_alloc(9 * 64 * 4), *y = cu_alloc(9 * 8 * 4);
    ck_assert_int_ne(molt_cuda_nf4_gemv(MOLT_CUDA_F32, y, x, &cw, 0, 1), 0);
    ck_assert_ptr_nonnull(strstr(molt_cuda_error(), "needs NF4 weights"));
    ag_qweight_free(&q);
}
END_TEST

int main(void) {
    Suite *s = suite_create("cuda_quant");
    TCase *tc = tcase_create("quant");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_dequant_bits);
    tcase_add_test(tc, test_qlinear_formats);
    tcase_add_test(tc, test_nf4_gemv);
    tcase_add_test(tc, test_gemv_refuses_other_shapes);
    suite_add_tcase(s, tc);
    return cuda_test_main(s);
}

#else

int main(void) {
    printf("SKIP: built without CUDA\n");
    return 77;
}

#endif
