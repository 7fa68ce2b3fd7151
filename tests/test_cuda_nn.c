// tests/test_cuda_nn.c: the elementwise, softmax, SwiGLU, embedding, dropout, RMSNorm and
// RoPE kernels against the CPU kernels of cpu/k_elem.c, k_nn.c, k_linear.c and k_rope.c on
// the same inputs, forward and backward (backward kernels accumulate into random initial
// gradients, as the CPU ones do). Bit for bit where both sides do the same f32 operations
// (elementwise, casts, dropout, embedding forward); 1e-5 relative against the double
// reference where libm functions or summation order differ (softmax, SwiGLU, RMSNorm, the
// atomic embedding backward); RoPE against the f32 CPU kernel (float angles, as the model
// computes them) at 1e-5. bf16: the f32 result rounded once to bf16 gives the same bits for
// elementwise ops; softmax and RMSNorm round their output once: bound 4e-3. Exits 77 without
// a GPU.
#include "harness/cuda_check.h"

#include "autograd/cpu/kernels.h"

#include <stdio.h>

#ifdef MOLT_HAVE_CUDA

#define N_EW 100003 // not a multiple of any block size

START_TEST(test_elementwise_bits) {
    ag_rng r;
    ag_rng_seed(&r, 201);
    int64_t n = N_EW;
    float *a = molt_malloc(n * 4), *b = molt_malloc(n * 4), *g = molt_malloc(n * 4);
    float *ref = molt_malloc(n * 4), *got = molt_malloc(n * 4);
    fill_f(a, n, &r, -3, 3);
    fill_f(b, n, &r, -3, 3);
    fill_f(g, n, &r, -3, 3);
    void *da = cu_up(a, n * 4), *db = cu_up(b, n * 4), *dy = cu_alloc(n * 4);
    ck_cuda(molt_cuda_add(MOLT_CUDA_F32, dy, da, db, n));
    add_fwd_f32(ref, a, b, n);
    cu_down(got, dy, n * 4);
    ck_same_bits(got, ref, n, "add");
    ck_cuda(molt_cuda_mul(MOLT_CUDA_F32, dy, da, db, n));
    mul_fwd_f32(ref, a, b, n);
    cu_down(got, dy, n * 4);
    ck_same_bits(got, ref, n, "mul");
    ck_cuda(molt_cuda_scale(MOLT_CUDA_F32, dy, da, 0.37f, n));
    scale_fwd_f32(ref, a, 0.37f, n);
    cu_down(got, dy, n * 4);
    ck_same_bits(got, ref, n, "scale");
    // backward accumulations into g
    void *dg = cu_up(g, n * 4);
    ck_cuda(molt_cuda_acc(MOLT_CUDA_F32, dg, da, n));
    ck_cuda(molt_cuda_acc_mul(MOLT_CUDA_F32, dg, da, db, n));
    ck_cuda(molt_cuda_acc_scale(MOLT_CUDA_F32, dg, db, -1.25f, n));
    memcpy(ref, g, n * 4);
    acc_f32(ref, a, n);
    acc_mul_f32(ref, a, b, n);
    acc_scale_f32(ref, b, -1.25f, n);
    cu_down(got, dg, n * 4);
    ck_same_bits(got, ref, n, "acc, acc_mul, acc_scale");
    // bf16: the f32 result rounded once
    round_bf16(a, NULL, n);
    round_bf16(b, NULL, n);
    void *ha = cu_up_as(a, n, 1), *hb = cu_up_as(b, n, 1), *hy = cu_alloc(n * 2);
    ck_cuda(molt_cuda_mul(MOLT_CUDA_BF16, hy, ha, hb, n));
    mul_fwd_f32(ref, a, b, n);
    round_bf16(ref, NULL, n);
    cu_down_as(got, hy, n, 1);
    ck_same_bits(got, ref, n, "mul bf16");
    // casts both ways (round to nearest even)
    fill_f(a, n, &r, -300, 300);
    da = cu_up(a, n * 4);
    ck_cuda(molt_cuda_cast(MOLT_CUDA_BF16, hy, MOLT_CUDA_F32, da, n));
    memcpy(ref, a, n * 4);
    round_bf16(ref, NULL, n);
    cu_down_as(got, hy, n, 1);
    ck_same_bits(got, ref, n, "cast f32 -> bf16");
    ck_cuda(molt_cuda_cast(MOLT_CUDA_F32, dy, MOLT_CUDA_BF16, hy, n));
    cu_down(got, dy, n * 4);
    ck_same_bits(got, ref, n, "cast bf16 -> f32");
    // g += the bf16 values, widened (cast backward)
    cu_down(g, dg, n * 4);
    acc_f32(g, ref, n);
    ck_cuda(molt_cuda_acc_cast(MOLT_CUDA_F32, dg, MOLT_CUDA_BF16, hy, n));
    cu_down(got, dg, n * 4);
    ck_same_bits(got, g, n, "acc_cast bf16 -> f32");
    molt_free(a), molt_free(b), molt_free(g), molt_free(ref), molt_free(got);
    cu_free_all();
}
END_TEST

START_TEST(test_softmax) {
    ag_rng r;
    ag_rng_seed(&r, 202);
    const int64_t shapes[][2] = {{33, 7}, {3, 131072}, {64, 300}, {1, 1}};
    for (size_t s = 0; s < 4; s++) {
        int64_t rows = shapes[s][0], cols = shapes[s][1], n = rows * cols;
        float *x = molt_malloc(n * 4), *y = molt_malloc(n * 4), *dy = molt_malloc(n * 4);
        float *dx0 = molt_malloc(n * 4), *got = molt_malloc(n * 4);
        fill_f(x, n, &r, -20, 20);
        fill_f(y, n, &r, 0, 1);
        fill_f(dy, n, &r, -1, 1);
        fill_f(dx0, n, &r, -1, 1);
        double *x64 = to_f64(x, n), *y64 = molt_malloc(n * 8), *yb = to_f64(y, n);
        double *dy64 = to_f64(dy, n), *dx64 = to_f64(dx0, n);
        softmax_fwd_ref_f64(y64, x64, rows, cols);
        softmax_bwd_ref_f64(dx64, yb, dy64, rows, cols);
        void *dX = cu_up(x, n * 4), *dYo = cu_alloc(n * 4), *dY = cu_up(y, n * 4);
        void *dDY = cu_up(dy, n * 4), *dDX = cu_up(dx0, n * 4);
        ck_cuda(molt_cuda_softmax_fwd(MOLT_CUDA_F32, dYo, dX, rows, cols));
        ck_cuda(molt_cuda_softmax_bwd(MOLT_CUDA_F32, dDX, dY, dDY, rows, cols));
        cu_down(got, dYo, n * 4);
        ck_close(got, y64, n, 1e-5, "softmax fwd f32");
        cu_down(got, dDX, n * 4);
        ck_close(got, dx64, n, 1e-5, "softmax bwd f32");
        // bf16 forward: rounded inputs, one rounding of the output
        round_bf16(x, NULL, n);
        for (int64_t i = 0; i < n; i++)
            x64[i] = x[i];
        softmax_fwd_ref_f64(y64, x64, rows, cols);
        void *hX = cu_up_as(x, n, 1), *hY = cu_alloc(n * 2);
        ck_cuda(molt_cuda_softmax_fwd(MOLT_CUDA_BF16, hY, hX, rows, cols));
        cu_down_as(got, hY, n, 1);
        ck_close(got, y64, n, 4e-3, "softmax fwd bf16");
        molt_free(x), molt_free(y), molt_free(dy), molt_free(dx0), molt_free(got);
        molt_free(x64), molt_free(y64), molt_free(yb), molt_free(dy64), molt_free(dx64);
        cu_free_all();
    }
}
END_TEST

START_TEST(test_swiglu) {
    ag_rng r;
    ag_rng_seed(&r, 203);
    int64_t n = 77777;
    float *g = molt_malloc(n * 4), *u = molt_malloc(n * 4), *dy = molt_malloc(n * 4);
    float *dg0 = molt_malloc(n * 4), *du0 = molt_malloc(n * 4), *got = molt_malloc(n * 4);
    fill_f(g, n, &r, -8, 8);
    fill_f(u, n, &r, -2, 2);
    fill_f(dy, n, &r, -1, 1);
    fill_f(dg0, n, &r, -1, 1);
    fill_f(du0, n, &r, -1, 1);
    double *g64 = to_f64(g, n), *u64 = to_f64(u, n), *dy64 = to_f64(dy, n);
    double *y64 = molt_malloc(n * 8), *dg64 = to_f64(dg0, n), *du64 = to_f64(du0, n);
    swiglu_fwd_ref_f64(y64, g64, u64, n);
    swiglu_bwd_ref_f64(dg64, du64, g64, u64, dy64, n);
    void *dG = cu_up(g, n * 4), *dU = cu_up(u, n * 4), *dY = cu_alloc(n * 4);
    void *dDY = cu_up(dy, n * 4), *dDG = cu_up(dg0, n * 4), *dDU = cu_up(du0, n * 4);
    ck_cuda(molt_cuda_swiglu_fwd(MOLT_CUDA_F32, dY, dG, dU, n));
    ck_cuda(molt_cuda_swiglu_bwd(MOLT_CUDA_F32, dDG, dDU, dG, dU, dDY, n));
    cu_down(got, dY, n * 4);
    ck_close(got, y64, n, 1e-5, "swiglu fwd");
    cu_down(got, dDG, n * 4);
    ck_close(got, dg64, n, 1e-5, "swiglu dgate");
    cu_down(got, dDU, n * 4);
    ck_close(got, du64, n, 1e-5, "swiglu dup");
    // only one gradient wanted: du accumulates a second time, dg is not touched
    ck_cuda(molt_cuda_swiglu_bwd(MOLT_CUDA_F32, NULL, dDU, dG, dU, dDY, n));
    swiglu_bwd_ref_f64(dg64, du64, g64, u64, dy64, n); // dg64 is scratch from here on
    cu_down(got, dDU, n * 4);
    ck_close(got, du64, n, 1e-5, "swiglu dup (no dgate)");
    molt_free(g), molt_free(u), molt_free(dy), molt_free(dg0), molt_free(du0), molt_free(got);
    molt_free(g64), molt_free(u64), molt_free(dy64), molt_free(y64), molt_free(dg64);
    molt_free(du64);
    cu_free_all();
}
END_TEST

START_TEST(test_embedding) {
    ag_rng r;
    ag_rng_seed(&r, 204);
    const int64_t V = 1000, C = 67, n = 513;
    float *table = molt_malloc(V * C * 4), *dy = molt_malloc(n * C * 4);
    float *dt0 = molt_malloc(V * C * 4), *got = molt_malloc(V * C * 4), *ref = molt_malloc(V * C * 4);
    int32_t *ids = molt_malloc(n * 4);
    fill_f(table, V * C, &r, -1, 1);
    fill_f(dy, n * C, &r, -1, 1);
    fill_f(dt0, V * C, &r, -1, 1);
    for (int64_t t = 0; t < n; t++) // repeated ids, the first and last rows
        ids[t] = t % 5 == 0 ? 3 : t % 7 == 0 ? (int32_t)(V - 1) : (int32_t)(ag_rng_next(&r) % V);
    void *dT = cu_up(table, V * C * 4), *dI = cu_up(ids, n * 4), *dY = cu_alloc(n * C * 4);
    ck_cuda(molt_cuda_embedding_fwd(MOLT_CUDA_F32, dY, dT, dI, n, C));
    embedding_fwd_ref_f32(ref, table, ids, n, C);
    cu_down(got, dY, n * C * 4);
    ck_same_bits(got, ref, n * C, "embedding fwd");
    void *dDT = cu_up(dt0, V * C * 4), *dDY = cu_up(dy, n * C * 4);
    ck_cuda(molt_cuda_embedding_bwd(MOLT_CUDA_F32, dDT, dDY, dI, n, C));
    double *dt64 = to_f64(dt0, V * C), *dy64 = to_f64(dy, n * C);
    embedding_bwd_ref_f64(dt64, dy64, ids, n, C);
    cu_down(got, dDT, V * C * 4);
    ck_close(got, dt64, V * C, 1e-5, "embedding bwd (atomic adds)");
    molt_free(table), molt_free(dy), molt_free(dt0), molt_free(got), molt_free(ref);
    molt_free(ids), molt_free(dt64), molt_free(dy64);
    cu_free_all();
}
END_TEST

START_TEST(test_dropout_same_mask) {
    ag_rng r;
    ag_rng_seed(&r, 205);
    int64_t n = 65537;
    float *x = molt_malloc(n * 4), *g0 = molt_malloc(n * 4), *ref = molt_malloc(n * 4);
    float *got = molt_malloc(n * 4);
    fill_f(x, n, &r, -1, 1);
    fill_f(g0, n, &r, -1, 1);
    uint64_t seed = ag_rng_next(&r);
    double ps[3] = {0.0, 0.1, 0.5};
    for (int k = 0; k < 3; k++) {
        void *dX = cu_up(x, n * 4), *dY = cu_alloc(n * 4), *dG = cu_up(g0, n * 4);
        int64_t first = k * 12345; // a rank's rows start inside the whole batch
        ck_cuda(molt_cuda_dropout_fwd(MOLT_CUDA_F32, dY, dX, seed, ps[k], first, n));
        dropout_fwd_f32(ref, x, seed, ps[k], first, n);
        cu_down(got, dY, n * 4);
        ck_same_bits(got, ref, n, "dropout fwd");
        ck_cuda(molt_cuda_dropout_bwd(MOLT_CUDA_F32, dG, dX, seed, ps[k], first, n));
        memcpy(ref, g0, n * 4);
        dropout_bwd_f32(ref, x, seed, ps[k], first, n);
        cu_down(got, dG, n * 4);
        ck_same_bits(got, ref, n, "dropout bwd");
        cu_free_all();
    }
    molt_free(x), molt_free(g0), molt_free(ref), molt_free(got);
}
END_TEST

START_TEST(test_rmsnorm) {
    ag_rng r;
    ag_rng_seed(&r, 206);
    const int64_t shapes[][2] = {{37, 129}, {1, 4096}, {300, 32}, {65, 1}};
    for (size_t s = 0; s < 4; s++) {
        int64_t T = shapes[s][0], C = shapes[s][1], n = T * C;
        float *x = molt_malloc(n * 4), *w = molt_malloc(C * 4), *dy = molt_malloc(n * 4);
        float *dx0 = molt_malloc(n * 4), *dw0 = molt_malloc(C * 4), *got = molt_malloc(n * 4);
        fill_f(x, n, &r, -2, 2);
        fill_f(w, C, &r, 0.5, 1.5);
        fill_f(dy, n, &r, -1, 1);
        fill_f(dx0, n, &r, -1, 1);
        fill_f(dw0, C, &r, -1, 1);
        double *x64 = to_f64(x, n), *w64 = to_f64(w, C), *dy64 = to_f64(dy, n);
        double *y64 = molt_malloc(n * 8), *r64 = molt_malloc(T * 8);
        double *dx64 = to_f64(dx0, n), *dw64 = to_f64(dw0, C);
        rmsnorm_fwd_ref_f64(y64, r64, x64, w64, T, C, 1e-6);
        rmsnorm_bwd_ref_f64(dx64, dw64, dy64, x64, w64, r64, T, C);
        void *dX = cu_up(x, n * 4), *dW = cu_up(w, C * 4), *dY = cu_alloc(n * 4);
        float *dR = cu_alloc(T * 4);
        void *dDY = cu_up(dy, n * 4), *dDX = cu_up(dx0, n * 4), *dDW = cu_up(dw0, C * 4);
        void *ws = cu_alloc(molt_cuda_rmsnorm_ws_bytes(T, C));
        ck_cuda(molt_cuda_rmsnorm_fwd(MOLT_CUDA_F32, dY, dR, dX, dW, T, C, 1e-6));
        ck_cuda(molt_cuda_rmsnorm_bwd(MOLT_CUDA_F32, dDX, dDW, dDY, dX, dW, dR, T, C, ws));
        cu_down(got, dY, n * 4);
        ck_close(got, y64, n, 1e-5, "rmsnorm fwd");
        cu_down(got, dR, T * 4);
        ck_close(got, r64, T, 1e-6, "rmsnorm rstd");
        cu_down(got, dDX, n * 4);
        ck_close(got, dx64, n, 1e-5, "rmsnorm dx");
        cu_down(got, dDW, C * 4);
        ck_close(got, dw64, C, 1e-5, "rmsnorm dw");
        // bf16 forward: one rounding of the output
        round_bf16(x, NULL, n);
        round_bf16(w, NULL, C);
        for (int64_t i = 0; i < n; i++)
            x64[i] = x[i];
        for (int64_t i = 0; i < C; i++)
            w64[i] = w[i];
        rmsnorm_fwd_ref_f64(y64, r64, x64, w64, T, C, 1e-6);
        void *hX = cu_up_as(x, n, 1), *hW = cu_up_as(w, C, 1), *hY = cu_alloc(n * 2);
        ck_cuda(molt_cuda_rmsnorm_fwd(MOLT_CUDA_BF16, hY, NULL, hX, hW, T, C, 1e-6));
        cu_down_as(got, hY, n, 1);
        ck_close(got, y64, n, 4e-3, "rmsnorm fwd bf16");
        molt_free(x), molt_free(w), molt_free(dy), molt_free(dx0), molt_free(dw0);
        molt_free(got), molt_free(x64), molt_free(w64), molt_free(dy64), molt_free(y64);
        molt_free(r64), molt_free(dx64), molt_free(dw64);
        cu_free_all();
    }
}
END_TEST

// YaRN table of Mistral Small 4 (64 rotary dims, factor 128), positions up to 20000: the
// f32 CPU kernel computes the same float angles, so the bound covers cosf/sinf only.
START_TEST(test_rope_yarn) {
    ag_rope_config cfg = {.theta = 10000, .rot_dim = 64, .yarn = true, .factor = 128,
                          .original_max_pos = 8192, .beta_fast = 32, .beta_slow = 1,
                          .mscale = 1, .mscale_all_dim = 1};
    ag_rope_table tb;
    ck_assert_ok(ag_rope_table_init(&tb, &cfg));
    molt_cuda_rope cr = {.half = tb.rot_dim / 2, .attn = (float)tb.attn_factor};
    for (int i = 0; i < cr.half; i++)
        cr.inv_freq[i] = (float)tb.inv_freq[i];
    ag_rng r;
    ag_rng_seed(&r, 207);
    const int64_t T = 41, rows = 3, D = 96, start = 16, n = T * rows * D; // a slice inside D
    float *x = molt_malloc(n * 4), *dy = molt_malloc(n * 4), *dx0 = molt_malloc(n * 4);
    float *ref = molt_malloc(n * 4), *got = molt_malloc(n * 4);
    int32_t *pos = molt_malloc(T * 4);
    fill_f(x, n, &r, -1, 1);
    fill_f(dy, n, &r, -1, 1);
    fill_f(dx0, n, &r, -1, 1);
    for (int64_t t = 0; t < T; t++)
        pos[t] = (int32_t)(t * 487 % 20000);
    void *dX = cu_up(x, n * 4), *dY = cu_alloc(n * 4), *dP = cu_up(pos, T * 4);
    void *dDY = cu_up(dy, n * 4), *dDX = cu_up(dx0, n * 4);
    ck_cuda(molt_cuda_rope_fwd(MOLT_CUDA_F32, dY, dX, dP, &cr, T, rows, D, start));
    ck_cuda(molt_cuda_rope_bwd(MOLT_CUDA_F32, dDX, dDY, dP, &cr, T, rows, D, start));
    rope_fwd_ref_f32(ref, x, pos, tb.inv_freq, cr.half, tb.attn_factor, T, rows, D, start);
    cu_down(got, dY, n * 4);
    ck_close_f(got, ref, n, 1e-5, "rope fwd");
    memcpy(ref, dx0, n * 4);
    rope_bwd_ref_f32(ref, dy, pos, tb.inv_freq, cr.half, tb.attn_factor, T, rows, D, start);
    cu_down(got, dDX, n * 4);
    ck_close_f(got, ref, n, 1e-5, "rope bwd");
    molt_free(x), molt_free(dy), molt_free(dx0), molt_free(ref), molt_free(got), molt_free(pos);
    cu_free_all();
}
END_TEST

int main(void) {
    Suite *s = suite_create("cuda_nn");
    TCase *tc = tcase_create("nn");
    tcase_add_checked_fixture(tc, NULL, cu_free_all);
    tcase_add_test(tc, test_elementwise_bits);
    tcase_add_test(tc, test_softmax);
    tcase_add_test(tc, test_swiglu);
    tcase_add_test(tc, test_embedding);
    tcase_add_test(tc, test_dropout_same_mask);
    tcase_add_test(tc, test_rmsnorm);
    tcase_add_test(tc, test_rope_yarn);
    suite_add_tcase(s, tc);
    return cuda_test_main(s);
}

#else

int main(void) {
    printf("SKIP: built without CUDA\n");
    return 77;
}

#endif
