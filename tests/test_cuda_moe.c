// tests/test_cuda_moe.c: the MoE router and routed experts on the GPU against the CPU
// reference kernels of cpu/k_moe.c and k_moe_lora.c on the same inputs.
//
// Router (f32): the chosen experts equal the CPU's exactly (random logits: no ties), the
// weights and softmax agree to 1e-5 (expf differs by an ulp or two), with and without
// group-limited selection and normalization, at Mistral Small 4's 128 experts top-4; the
// backward against the f64 reference on the same saved scores, 1e-5.
// Experts: forward y and backward dx, dw and the four LoRA gradients against the f64
// reference on merged weights (moe_lora_merge + moe_experts_*_ref, moe_experts_dweight_ref +
// moe_lora_grad_from_dense), for dense stacks, quantized stacks (NF4, INT8; the reference
// decodes them with kq_dequant_range), LoRA on both stacks or on one, experts that receive
// no token, one expert chosen twice by a token. f32: 1e-5 relative. bf16 (inputs rounded to
// bf16 on both sides): the GPU rounds G, the SwiGLU output and each expert's output to bf16
// before the next product, four roundings of 2^-9 in a row: forward bound 1.5e-2; the
// backward adds five more (dO, dact, dG, dxs, dx): bound 3e-2. Exits 77 without a GPU.
#include "harness/cuda_check.h"

#include "autograd/quant_internal.h"

#include <stdio.h>
#include <string.h>

#ifdef MOLT_HAVE_CUDA

// ---- router --------------------------------------------------------------------------------

static void router_case(int64_t T, int64_t E, int64_t k, int64_t ng, int64_t kg, int norm,
                        float scaling, ag_rng *r) {
    float *l = molt_malloc(T * E * 4), *p = molt_malloc(T * E * 4), *gs = molt_malloc(T * ng * 4);
    float *w = molt_malloc(T * k * 4), *got = molt_malloc(T * E * 4), *dw = molt_malloc(T * k * 4);
    float *dl0 = molt_malloc(T * E * 4);
    int32_t *idx = molt_malloc(T * k * 4), *gidx = molt_malloc(T * k * 4);
    fill_f(l, T * E, r, -4, 4);
    fill_f(dw, T * k, r, -1, 1);
    fill_f(dl0, T * E, r, -1, 1);
    moe_router_fwd_f32(w, idx, p, gs, l, T, E, k, ng, kg, norm, scaling, 0);
    void *dL = cu_up(l, T * E * 4), *dW = cu_alloc(T * k * 4), *dI = cu_alloc(T * k * 4);
    void *dP = cu_alloc(T * E * 4);
    ck_cuda(molt_cuda_router_fwd(dW, dI, dP, dL, T, E, k, ng, kg, norm, scaling));
    cu_down(gidx, dI, T * k * 4);
    for (int64_t i = 0; i < T * k; i++)
        ck_assert_msg(gidx[i] == idx[i], "router E %lld k %lld groups %lld/%lld: idx[%lld] is "
                      "%d, CPU %d", (long long)E, (long long)k, (long long)kg, (long long)ng,
                      (long long)i, gidx[i], idx[i]);
    cu_down(got, dW, T * k * 4);
    ck_close_f(got, w, T * k, 1e-5, "router weights");
    cu_down(got, dP, T * E * 4);
    ck_close_f(got, p, T * E, 1e-5, "router softmax");
    // backward on the CPU's scores and choices
    double *dl64 = to_f64(dl0, T * E), *dw64 = to_f64(dw, T * k), *p64 = to_f64(p, T * E);
    moe_router_bwd_f64(dl64, dw64, p64, idx, T, E, k, norm, scaling);
    void *dDL = cu_up(dl0, T * E * 4), *dDW = cu_up(dw, T * k * 4), *dPc = cu_up(p, T * E * 4);
    void *dIc = cu_up(idx, T * k * 4);
    ck_cuda(molt_cuda_router_bwd(dDL, dDW, dPc, dIc, T, E, k, norm, scaling));
    cu_down(got, dDL, T * E * 4);
    ck_close(got, dl64, T * E, 1e-5, "router backward");
    molt_free(l), molt_free(p), molt_free(gs), molt_free(w), molt_free(got), molt_free(dw);
    molt_free(dl0), molt_free(idx), molt_free(gidx), molt_free(dl64), molt_free(dw64);
    molt_free(p64);
    cu_free_all();
}

START_TEST(test_router) {
    ag_rng r;
    ag_rng_seed(&r, 401);
    router_case(67, 16, 4, 1, 1, 1, 1.0f, &r);
    router_case(67, 16, 3, 4, 2, 1, 2.5f, &r);  // group-limited
    router_case(33, 24, 2, 8, 3, 0, 1.0f, &r);  // not normalized
    router_case(129, 128, 4, 1, 1, 1, 1.0f, &r); // Mistral Small 4
    router_case(5, 3, 3, 3, 3, 1, 1.0f, &r);     // every expert chosen, groups of one
}
END_TEST

// ---- experts -------------------------------------------------------------------------------

typedef struct {
    int64_t T, k, E, H, I, r;
    int lora;         // 0 none, 1 gate_up only, 2 both stacks
    int quant;        // -1 dense, else an ag_qformat
    int bf16;
    int sparse;       // route to experts 0, 3 and 5 only (the others get no token)
} ecase;

typedef struct {
    float *x, *w, *gu, *down, *agu, *bgu, *ad, *bd; // host values (bf16-rounded in bf16 runs)
    int32_t *idx;
    double *gu64, *down64; // the stacks the reference uses (decoded when quantized)
} edata;

static float *rnd(int64_t n, ag_rng *r, double a, int bf16) {
    float *p = molt_malloc((size_t)n * 4 + 4);
    fill_f(p, n, r, -a, a);
    if (bf16)
        round_bf16(p, NULL, n);
    return p;
}

static void edata_make(edata *d, const ecase *c, ag_rng *r, ag_arena *host, ag_qweight *q) {
    int64_t T = c->T, k = c->k, E = c->E, H = c->H, I = c->I, rE = c->r * E;
    d->x = rnd(T * H, r, 1, c->bf16);
    d->w = rnd(T * k, r, 1, c->bf16);
    d->gu = rnd(E * 2 * I * H, r, 0.3, c->bf16);
    d->down = rnd(E * H * I, r, 0.3, c->bf16);
    d->agu = rnd(rE * H, r, 0.3, c->bf16);
    d->bgu = rnd(2 * I * rE, r, 0.3, c->bf16);
    d->ad = rnd(rE * I, r, 0.3, c->bf16);
    d->bd = rnd(H * rE, r, 0.3, c->bf16);
    d->idx = molt_malloc((size_t)(T * k) * 4);
    static const int32_t some[3] = {0, 3, 5};
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++) {
            int32_t e = c->sparse ? some[(t + j) % 3] : (int32_t)(ag_rng_next(r) % (uint64_t)E);
            if (t == 1 && j == 1)
                e = d->idx[t * k]; // the same expert twice in one row
            d->idx[t * k + j] = e;
        }
    d->gu64 = to_f64(d->gu, E * 2 * I * H);
    d->down64 = to_f64(d->down, E * H * I);
    if (c->quant >= 0) { // the reference decodes exactly what the GPU decodes
        ag_tensor *tg = ag_tensor_new(host, AG_F32, 3, (int64_t[]){E, 2 * I, H});
        ag_tensor *td = ag_tensor_new(host, AG_F32, 3, (int64_t[]){E, H, I});
        memcpy(tg->data, d->gu, (size_t)tg->numel * 4);
        memcpy(td->data, d->down, (size_t)td->numel * 4);
        ck_assert_ok(ag_qweight_quantize(&q[0], tg, (ag_qformat)c->quant, NULL));
        ck_assert_ok(ag_qweight_quantize(&q[1], td, (ag_qformat)c->quant, NULL));
        kq_weight v;
        ag_qweight_view(&v, &q[0]);
        kq_dequant_range_f64(d->gu64, &v, 0, tg->numel);
        ag_qweight_view(&v, &q[1]);
        kq_dequant_range_f64(d->down64, &v, 0, td->numel);
        ck_cuda(molt_cuda_set_quant_tables(v.nf4_code, v.dyn_code, v.fp8_code));
    }
}

static void edata_free(edata *d) {
    float *fs[8] = {d->x, d->w, d->gu, d->down, d->agu, d->bgu, d->ad, d->bd};
    for (int i = 0; i < 8; i++)
        molt_free(fs[i]);
    molt_free(d->idx), molt_free(d->gu64), molt_free(d->down64);
}

static molt_cuda_qw view_of(const ag_qweight *q) {
    return (molt_cuda_qw){.format = (int)q->format, .n_mat = q->n_mat, .rows = q->rows,
                          .cols = q->cols, .data = q->data, .scale = q->scale,
                          .scale_per_row = q->fp8_per_row,
                          .absmax_q = q->nf4_double_quant ? q->absmax_q : NULL,
                          .absmax_scale = q->absmax_scale, .absmax_offset = q->absmax_offset};
}

static void experts_case(const ecase *c, ag_rng *r) {
    int64_t T = c->T, k = c->k, E = c->E, H = c->H, I = c->I, R = c->r, rE = R * E;
    float s = 0.75f;
    ag_arena host, dev;
    ag_arena_init(&host, "host", 0);
    ck_assert_ok(ag_arena_init_device(&dev, "weights", AG_CUDA, (size_t)32 << 20));
    ag_qweight q[2] = {{0}}, qd[2] = {{0}};
    edata d;
    edata_make(&d, c, r, &host, q);
    int bf = c->bf16;
    bool lgu = c->lora >= 1, ld = c->lora >= 2;
    // ---- reference, f64 on merged weights
    double *x64 = to_f64(d.x, T * H), *w64 = to_f64(d.w, T * k);
    double *agu64 = to_f64(d.agu, rE * H), *bgu64 = to_f64(d.bgu, 2 * I * rE);
    double *ad64 = to_f64(d.ad, rE * I), *bd64 = to_f64(d.bd, H * rE);
    double *mgu = molt_malloc((size_t)(E * 2 * I * H) * 8), *md = molt_malloc((size_t)(E * H * I) * 8);
    moe_lora_merge_f64(mgu, d.gu64, lgu ? agu64 : NULL, bgu64, E, 2 * I, H, R, s);
    moe_lora_merge_f64(md, d.down64, ld ? ad64 : NULL, bd64, E, H, I, R, s);
    double *y64 = molt_malloc((size_t)(T * H) * 8);
    moe_experts_fwd_ref_f64(y64, x64, w64, d.idx, mgu, md, T, k, H, I);
    float *dy = rnd(T * H, r, 1, bf), *dx0 = rnd(T * H, r, 1, bf), *dw0 = rnd(T * k, r, 1, bf);
    float *g0[4] = {rnd(rE * H, r, 1, bf), rnd(2 * I * rE, r, 1, bf), rnd(rE * I, r, 1, bf),
                    rnd(H * rE, r, 1, bf)};
    double *dy64 = to_f64(dy, T * H), *dx64 = to_f64(dx0, T * H), *dw64 = to_f64(dw0, T * k);
    moe_experts_bwd_ref_f64(dx64, dw64, dy64, x64, w64, d.idx, mgu, md, T, k, H, I);
    double *dgu = molt_calloc((size_t)(E * 2 * I * H), 8), *dd = molt_calloc((size_t)(E * H * I), 8);
    moe_experts_dweight_ref_f64(dgu, dd, dy64, x64, w64, d.idx, mgu, md, T, k, H, I);
    double *ga64[4] = {to_f64(g0[0], rE * H), to_f64(g0[1], 2 * I * rE), to_f64(g0[2], rE * I),
                       to_f64(g0[3], H * rE)};
    if (lgu)
        moe_lora_grad_from_dense_f64(ga64[0], ga64[1], dgu, agu64, bgu64, E, 2 * I, H, R, s);
    if (ld)
        moe_lora_grad_from_dense_f64(ga64[2], ga64[3], dd, ad64, bd64, E, H, I, R, s);
    // ---- GPU
    molt_cuda_experts p = {.dt = bf ? MOLT_CUDA_BF16 : MOLT_CUDA_F32, .T = T, .k = k, .E = E,
                           .H = H, .I = I, .r = R, .s = s};
    p.x = cu_up_as(d.x, T * H, bf);
    p.w = cu_up_as(d.w, T * k, bf);
    p.idx = cu_up(d.idx, (size_t)(T * k) * 4);
    molt_cuda_qw qgu, qdn;
    if (c->quant >= 0) {
        ck_assert_ok(ag_qweight_to(&qd[0], &q[0], &dev));
        ck_assert_ok(ag_qweight_to(&qd[1], &q[1], &dev));
        qgu = view_of(&qd[0]);
        qdn = view_of(&qd[1]);
        p.qgu = &qgu;
        p.qd = &qdn;
    } else {
        p.wgu = cu_up_as(d.gu, E * 2 * I * H, bf);
        p.wd = cu_up_as(d.down, E * H * I, bf);
    }
    if (lgu) {
        p.a_gu = cu_up_as(d.agu, rE * H, bf);
        p.b_gu = cu_up_as(d.bgu, 2 * I * rE, bf);
    }
    if (ld) {
        p.a_d = cu_up_as(d.ad, rE * I, bf);
        p.b_d = cu_up_as(d.bd, H * rE, bf);
    }
    void *ws = cu_alloc(molt_cuda_experts_ws_bytes(&p)), *dY = cu_alloc((size_t)(T * H) * 4);
    ck_cuda(molt_cuda_experts_fwd(&p, dY, ws));
    molt_cuda_experts_grads g = {cu_up_as(dx0, T * H, bf), cu_up_as(dw0, T * k, bf), NULL, NULL,
                                 NULL, NULL};
    if (lgu) {
        g.da_gu = cu_up_as(g0[0], rE * H, bf);
        g.db_gu = cu_up_as(g0[1], 2 * I * rE, bf);
    }
    if (ld) {
        g.da_d = cu_up_as(g0[2], rE * I, bf);
        g.db_d = cu_up_as(g0[3], H * rE, bf);
    }
    void *dDY = cu_up_as(dy, T * H, bf);
    ck_cuda(molt_cuda_experts_bwd(&p, dDY, &g, ws));
    // ---- compare
    double tf = bf ? 1.5e-2 : 1e-5, tb = bf ? 3e-2 : 1e-5;
    char what[128];
    float *got = molt_malloc((size_t)(E * 2 * I * H + T * H) * 4);
    const char *kind = c->quant < 0 ? "dense" : ag_qformat_name((ag_qformat)c->quant);
#define CHECK(devp, ref, n, tol, name)                                                     \
    do {                                                                                   \
        cu_down_as(got, devp, n, bf);                                                      \
        snprintf(what, sizeof what, "experts %s lora %d %s%s: %s", kind, c->lora,          \
                 bf ? "bf16" : "f32", c->sparse ? " sparse" : "", name);                   \
        ck_close(got, ref, n, tol, what);                                                  \
    } while (0)
    CHECK(dY, y64, T * H, tf, "y");
    CHECK(g.dx, dx64, T * H, tb, "dx");
    CHECK(g.dw, dw64, T * k, tb, "dw");
    if (lgu) {
        CHECK(g.da_gu, ga64[0], rE * H, tb, "d a_gate_up");
        CHECK(g.db_gu, ga64[1], 2 * I * rE, tb, "d b_gate_up");
    }
    if (ld) {
        CHECK(g.da_d, ga64[2], rE * I, tb, "d a_down");
        CHECK(g.db_d, ga64[3], H * rE, tb, "d b_down");
    }
#undef CHECK
    molt_free(got), molt_free(x64), molt_free(w64), molt_free(agu64), molt_free(bgu64);
    molt_free(ad64), molt_free(bd64), molt_free(mgu), molt_free(md), molt_free(y64);
    molt_free(dy), molt_free(dx0), molt_free(dw0), molt_free(dy64), molt_free(dx64);
    molt_free(dw64), molt_free(dgu), molt_free(dd);
    for (int i = 0; i < 4; i++)
        molt_free(g0[i]), molt_free(ga64[i]);
    edata_free(&d);
    ag_qweight_free(&q[0]), ag_qweight_free(&q[1]);
    ag_arena_free(&dev);
    ag_arena_free(&host);
    cu_free_all();
}

START_TEST(test_experts_dense) {
    ag_rng r;
    ag_rng_seed(&r, 402);
    ecase cs[] = {
        {37, 3, 8, 48, 40, 2, 0, -1, 0, 0}, {37, 3, 8, 48, 40, 2, 2, -1, 0, 0},
        {37, 3, 8, 48, 40, 2, 1, -1, 0, 0}, {29, 2, 8, 33, 21, 3, 2, -1, 0, 1},
        {1, 4, 16, 64, 32, 1, 2, -1, 0, 0},
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
        experts_case(&cs[i], &r);
}
END_TEST

START_TEST(test_experts_quantized) {
    ag_rng r;
    ag_rng_seed(&r, 403);
    ecase cs[] = {
        {37, 3, 8, 64, 40, 2, 2, AG_Q_NF4, 0, 0}, {21, 2, 8, 48, 24, 2, 0, AG_Q_INT8, 0, 1},
        {9, 3, 4, 130, 34, 2, 1, AG_Q_NF4, 0, 0},
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
        experts_case(&cs[i], &r);
}
END_TEST

START_TEST(test_experts_bf16) {
    ag_rng r;
    ag_rng_seed(&r, 404);
    ecase cs[] = {
        {37, 3, 8, 64, 48, 2, 2, -1, 1, 0}, {25, 2, 8, 64, 32, 2, 2, AG_Q_NF4, 1, 1},
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
        experts_case(&cs[i], &r);
}
END_TEST

START_TEST(test_experts_no_tokens) {
    ecase c = {0, 2, 4, 8, 8, 1, 0, -1, 0, 0};
    molt_cuda_experts p = {.dt = MOLT_CUDA_F32, .T = c.T, .k = c.k, .E = c.E, .H = c.H, .I = c.I};
    float z = 0;
    p.wgu = p.wd = p.x = p.w = cu_up(&z, 4);
    ck_cuda(molt_cuda_experts_fwd(&p, NULL, NULL));
    molt_cuda_experts_grads g = {0};
    ck_cuda(molt_cuda_experts_bwd(&p, NULL, &g, NULL));
    cu_free_all();
}
END_TEST

int main(void) {
    Suite *s = suite_create("cuda_moe");
    TCase *tc = tcase_create("moe");
    tcase_add_checked_fixture(tc, NULL, cu_free_all);
    tcase_add_test(tc, test_router);
    tcase_add_test(tc, test_experts_dense);
    tcase_add_test(tc, test_experts_quantized);
    tcase_add_test(tc, test_experts_bf16);
    tcase_add_test(tc, test_experts_no_tokens);
    suite_add_tcase(s, tc);
    return cuda_test_main(s);
}

#else

int main(void) {
    printf("SKIP: built without CUDA\n");
    return 77;
}

#endif
