// tests/test_cuda_ce.c: the cross-entropy fused with the output projection on the GPU
// against cpu/k_ce.c's reference kernels in double on the same inputs: per-token logsumexp
// and target logit, then the gradients to h, w and the low-rank pair (h2, w2) of a LoRA on
// the output projection, accumulated into random initial gradients, with a mask holding
// zeros and fractional weights; vocabulary chunks that do not divide V, one token, the
// 131072-token vocabulary. f32: 1e-5 relative. bf16 (inputs rounded on both sides): the
// logits are f32 sums of exact products, so lse keeps 1e-5; the gradients go through the
// bf16-rounded softmax-minus-onehot block and a bf16 output, two roundings of 2^-9: bound
// 8e-3. Exits 77 without a GPU.
#include "harness/cuda_check.h"

#include "autograd/cpu/kernels.h"

#include <stdio.h>

#ifdef MOLT_HAVE_CUDA

typedef struct {
    int64_t T, C, V, chunk, R;
    int bf16;
} cecase;

static void ce_case(const cecase *c, ag_rng *r) {
    int64_t T = c->T, C = c->C, V = c->V, R = c->R;
    int bf = c->bf16;
    float *h = molt_malloc(T * C * 4), *w = molt_malloc(V * C * 4), *mask = molt_malloc(T * 4);
    float *h2 = molt_malloc(T * (R + 1) * 4), *w2 = molt_malloc(V * (R + 1) * 4);
    float *g0[4] = {molt_malloc(T * C * 4), molt_malloc(V * C * 4), molt_malloc(T * (R + 1) * 4),
                    molt_malloc(V * (R + 1) * 4)};
    int32_t *tg = molt_malloc(T * 4);
    fill_f(h, T * C, r, -1, 1);
    fill_f(w, V * C, r, -1, 1);
    fill_f(h2, T * R, r, -1, 1);
    fill_f(w2, V * R, r, -1, 1);
    fill_f(g0[0], T * C, r, -1, 1);
    fill_f(g0[1], V * C, r, -1, 1);
    fill_f(g0[2], T * R, r, -1, 1);
    fill_f(g0[3], V * R, r, -1, 1);
    double msum = 0;
    for (int64_t t = 0; t < T; t++) {
        tg[t] = (int32_t)(ag_rng_next(r) % (uint64_t)V);
        mask[t] = t % 4 == 1 ? 0.0f : t % 4 == 2 ? 0.5f : 1.0f;
        msum += mask[t];
    }
    if (bf) {
        float *all[8] = {h, w, h2, w2, g0[0], g0[1], g0[2], g0[3]};
        int64_t ns[8] = {T * C, V * C, T * R, V * R, T * C, V * C, T * R, V * R};
        for (int i = 0; i < 8; i++)
            round_bf16(all[i], NULL, ns[i]);
    }
    double scale = msum > 0 ? 1.0 / msum : 0.0;
    // reference
    double *h64 = to_f64(h, T * C), *w64 = to_f64(w, V * C), *h264 = to_f64(h2, T * R);
    double *w264 = to_f64(w2, V * R), *m64 = to_f64(mask, T);
    double *g64[4] = {to_f64(g0[0], T * C), to_f64(g0[1], V * C), to_f64(g0[2], T * R),
                      to_f64(g0[3], V * R)};
    double *lse = molt_malloc(T * 8), *zt = molt_malloc(T * 8);
    ce_lowrank lr = {.R = R, .h2 = h264, .w2 = w264, .dh2 = g64[2], .dw2 = g64[3]};
    ce_dims d = {.T = T, .C = C, .V = V, .chunk = c->chunk, .tile = 1, .lr = R ? &lr : NULL};
    ce_fwd_ref_f64(lse, zt, h64, w64, tg, &d);
    ce_bwd_ref_f64(g64[0], g64[1], h64, w64, tg, m64, scale, lse, &d);
    // GPU
    molt_cuda_ce p = {.dt = bf ? MOLT_CUDA_BF16 : MOLT_CUDA_F32, .T = T, .C = C, .V = V,
                      .chunk = c->chunk, .R = R};
    p.h = cu_up_as(h, T * C, bf);
    p.w = cu_up_as(w, V * C, bf);
    p.h2 = R ? cu_up_as(h2, T * R, bf) : NULL;
    p.w2 = R ? cu_up_as(w2, V * R, bf) : NULL;
    p.targets = cu_up(tg, T * 4);
    void *dmask = cu_up_as(mask, T, bf), *ws = cu_alloc(molt_cuda_ce_ws_bytes(&p));
    double *dl = cu_alloc(T * 8), *dz = cu_alloc(T * 8);
    ck_cuda(molt_cuda_ce_fwd(&p, dl, dz, ws));
    void *dg[4] = {cu_up_as(g0[0], T * C, bf), cu_up_as(g0[1], V * C, bf),
                   R ? cu_up_as(g0[2], T * R, bf) : NULL, R ? cu_up_as(g0[3], V * R, bf) : NULL};
    ck_cuda(molt_cuda_ce_bwd(&p, dmask, scale, dl, dg[0], dg[1], dg[2], dg[3], ws));
    double *hl = molt_malloc(T * 8), *hz = molt_malloc(T * 8);
    cu_down(hl, dl, T * 8);
    cu_down(hz, dz, T * 8);
    float *got = molt_malloc((V * C + T) * 4);
    for (int64_t t = 0; t < T; t++)
        got[t] = (float)hl[t];
    char what[96];
    snprintf(what, sizeof what, "ce T %lld V %lld chunk %lld R %lld %s", (long long)T,
             (long long)V, (long long)c->chunk, (long long)R, bf ? "bf16" : "f32");
    ck_close(got, lse, T, 1e-5, what);
    for (int64_t t = 0; t < T; t++)
        got[t] = (float)hz[t];
    ck_close(got, zt, T, 1e-5, what);
    double tol = bf ? 8e-3 : 1e-5;
    int64_t ns[4] = {T * C, V * C, T * R, V * R};
    static const char *const names[4] = {"dh", "dw", "dh2", "dw2"};
    for (int i = 0; i < (R ? 4 : 2); i++) {
        cu_down_as(got, dg[i], ns[i], bf);
        char w2s[128];
        snprintf(w2s, sizeof w2s, "%s: %s", what, names[i]);
        ck_close(got, g64[i], ns[i], tol, w2s);
    }
    molt_free(h), molt_free(w), molt_free(mask), molt_free(h2), molt_free(w2), molt_free(tg);
    molt_free(h64), molt_free(w64), molt_free(h264), molt_free(w264), molt_free(m64);
    molt_free(lse), molt_free(zt), molt_free(hl), molt_free(hz), molt_free(got);
    for (int i = 0; i < 4; i++)
        molt_free(g0[i]), molt_free(g64[i]);
    cu_free_all();
}

START_TEST(test_ce_f32) {
    ag_rng r;
    ag_rng_seed(&r, 501);
    cecase cs[] = {{37, 48, 1000, 128, 0, 0}, {37, 48, 1000, 128, 3, 0}, {1, 16, 77, 100, 2, 0},
                   {8, 16, 131072, 8192, 0, 0}, {12, 24, 300, 300, 4, 0}};
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
        ce_case(&cs[i], &r);
}
END_TEST

START_TEST(test_ce_bf16) {
    ag_rng r;
    ag_rng_seed(&r, 502);
    cecase cs[] = {{37, 64, 1000, 256, 0, 1}, {20, 32, 515, 128, 4, 1}};
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
        ce_case(&cs[i], &r);
}
END_TEST

int main(void) {
    Suite *s = suite_create("cuda_ce");
    TCase *tc = tcase_create("ce");
    tcase_add_checked_fixture(tc, NULL, cu_free_all);
    tcase_add_test(tc, test_ce_f32);
    tcase_add_test(tc, test_ce_bf16);
    suite_add_tcase(s, tc);
    return cuda_test_main(s);
}

#else

int main(void) {
    printf("SKIP: built without CUDA\n");
    return 77;
}

#endif
