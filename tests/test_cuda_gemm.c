// tests/test_cuda_gemm.c: the cuBLASLt products against the CPU reference kernels of
// cpu/k_linear.c (in double, on the same inputs): linear forward, dx and dW (both
// accumulating into what the buffers held), and the general row-major GEMM with every
// transpose combination; odd sizes, one row, no rows. f32 runs with TF32 off: 1e-5 relative.
// bf16: inputs rounded to bf16 on both sides, f32 accumulation, the result rounded once to
// bf16 (2^-9 = 1.95e-3 relative per element): bound 4e-3. Exits 77 without a GPU.
#include "harness/cuda_check.h"

#include "autograd/cpu/kernels.h"

#include <stdio.h>

#ifdef MOLT_HAVE_CUDA

typedef struct {
    int64_t T, in, out;
} lsize;

static const lsize sizes[] = {{37, 129, 65}, {1, 64, 33}, {256, 96, 200}, {5, 7, 3}};

// One size, one dtype: forward, then both backward products.
static void linear_case(lsize s, int bf16, ag_rng *r) {
    int64_t T = s.T, in = s.in, out = s.out;
    float *x = molt_malloc((size_t)(T * in) * 4), *w = molt_malloc((size_t)(out * in) * 4);
    float *dy = molt_malloc((size_t)(T * out) * 4), *dx0 = molt_malloc((size_t)(T * in) * 4);
    float *dw0 = molt_malloc((size_t)(out * in) * 4), *got = molt_malloc((size_t)(T * in + out * in + T * out) * 4);
    fill_f(x, T * in, r, -1, 1);
    fill_f(w, out * in, r, -1, 1);
    fill_f(dy, T * out, r, -1, 1);
    fill_f(dx0, T * in, r, -1, 1);
    fill_f(dw0, out * in, r, -1, 1);
    if (bf16) { // both sides compute on the same bf16 values
        round_bf16(x, NULL, T * in);
        round_bf16(w, NULL, out * in);
        round_bf16(dy, NULL, T * out);
        round_bf16(dx0, NULL, T * in);
        round_bf16(dw0, NULL, out * in);
    }
    double tol = bf16 ? 4e-3 : 1e-5;
    molt_cuda_dtype dt = bf16 ? MOLT_CUDA_BF16 : MOLT_CUDA_F32;
    void *dX = cu_up_as(x, T * in, bf16), *dW = cu_up_as(w, out * in, bf16);
    void *dDY = cu_up_as(dy, T * out, bf16), *dY = cu_alloc((size_t)(T * out) * 4);
    void *dDX = cu_up_as(dx0, T * in, bf16), *dDW = cu_up_as(dw0, out * in, bf16);
    ck_cuda(molt_cuda_linear_fwd(dt, dY, dX, dW, T, in, out));
    ck_cuda(molt_cuda_linear_bwd_x(dt, dDX, dDY, dW, T, in, out));
    ck_cuda(molt_cuda_linear_bwd_w(dt, dDW, dDY, dX, T, in, out));
    double *x64 = to_f64(x, T * in), *w64 = to_f64(w, out * in), *dy64 = to_f64(dy, T * out);
    double *y64 = molt_malloc((size_t)(T * out) * 8), *dx64 = to_f64(dx0, T * in),
           *dw64 = to_f64(dw0, out * in);
    linear_fwd_ref_f64(y64, x64, w64, T, in, out);
    linear_bwd_x_ref_f64(dx64, dy64, w64, T, in, out);
    linear_bwd_w_ref_f64(dw64, dy64, x64, T, in, out);
    char what[96];
    cu_down_as(got, dY, T * out, bf16);
    snprintf(what, sizeof what, "linear fwd %s T %lld in %lld out %lld", bf16 ? "bf16" : "f32",
             (long long)T, (long long)in, (long long)out);
    ck_close(got, y64, T * out, tol, what);
    cu_down_as(got, dDX, T * in, bf16);
    snprintf(what, sizeof what, "linear dx %s T %lld", bf16 ? "bf16" : "f32", (long long)T);
    ck_close(got, dx64, T * in, tol, what);
    cu_down_as(got, dDW, out * in, bf16);
    snprintf(what, sizeof what, "linear dw %s T %lld", bf16 ? "bf16" : "f32", (long long)T);
    ck_close(got, dw64, out * in, tol, what);
    molt_free(x64), molt_free(w64), molt_free(dy64), molt_free(y64), molt_free(dx64);
    molt_free(dw64), molt_free(x), molt_free(w), molt_free(dy), molt_free(dx0), molt_free(dw0);
    molt_free(got);
    cu_free_all();
}

START_TEST(test_linear_f32_and_bf16) {
    ag_rng r;
    ag_rng_seed(&r, 101);
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        linear_case(sizes[i], 0, &r);
        linear_case(sizes[i], 1, &r);
    }
}
END_TEST

START_TEST(test_linear_no_rows) {
    float one = 1.0f;
    void *x = cu_up(&one, 4), *w = cu_up(&one, 4), *y = cu_up(&one, 4);
    ck_cuda(molt_cuda_linear_fwd(MOLT_CUDA_F32, y, x, w, 0, 1, 1));
    ck_cuda(molt_cuda_linear_bwd_w(MOLT_CUDA_F32, w, y, x, 0, 1, 1)); // K = 0, beta 1: no-op
    float back = 0;
    cu_down(&back, y, 4);
    ck_assert_float_eq(back, 1.0f); // untouched
    cu_down(&back, w, 4);
    ck_assert_float_eq(back, 1.0f);
    cu_free_all();
}
END_TEST

// The general GEMM: C = alpha op(A) op(B) + beta C in every transpose combination, against
// plain double loops.
START_TEST(test_gemm_transposes) {
    ag_rng r;
    ag_rng_seed(&r, 102);
    const int64_t M = 19, N = 23, K = 31;
    float *A = molt_malloc(M * K * 4), *B = molt_malloc(K * N * 4), *C = molt_malloc(M * N * 4);
    float *got = molt_malloc(M * N * 4);
    double *ref = molt_malloc(M * N * 8);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            fill_f(A, M * K, &r, -1, 1);
            fill_f(B, K * N, &r, -1, 1);
            fill_f(C, M * N, &r, -1, 1);
            // A stored (M, K) or (K, M); B stored (K, N) or (N, K)
            int64_t lda = ta ? M : K, ldb = tb ? K : N;
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) {
                    double acc = 0;
                    for (int64_t k = 0; k < K; k++)
                        acc += (double)(ta ? A[k * lda + i] : A[i * lda + k]) *
                               (tb ? B[j * ldb + k] : B[k * ldb + j]);
                    ref[i * N + j] = 0.75 * acc - 0.5 * C[i * N + j];
                }
            void *dA = cu_up(A, M * K * 4), *dB = cu_up(B, K * N * 4), *dC = cu_up(C, M * N * 4);
            ck_cuda(molt_cuda_gemm(MOLT_CUDA_F32, MOLT_CUDA_F32, ta, tb, M, N, K, 0.75f, dA, lda,
                                   dB, ldb, -0.5f, dC, N));
            cu_down(got, dC, M * N * 4);
            ck_close(got, ref, M * N, 1e-5, ta ? (tb ? "gemm TT" : "gemm TN")
                                               : (tb ? "gemm NT" : "gemm NN"));
            cu_free_all();
        }
    molt_free(A), molt_free(B), molt_free(C), molt_free(got), molt_free(ref);
}
END_TEST

int main(void) {
    Suite *s = suite_create("cuda_gemm");
    TCase *tc = tcase_create("gemm");
    tcase_add_checked_fixture(tc, NULL, cu_free_all);
    tcase_add_test(tc, test_linear_f32_and_bf16);
    tcase_add_test(tc, test_linear_no_rows);
    tcase_add_test(tc, test_gemm_transposes);
    suite_add_tcase(s, tc);
    return cuda_test_main(s);
}

#else

int main(void) {
    printf("SKIP: built without CUDA\n");
    return 77;
}

#endif
