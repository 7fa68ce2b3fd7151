// tests/test_bxq_linear.c: the bf16-pair products of prompt rows (bxq_linear, cpu/k_bx.h)
// and the ops that mark rows for them (ag_linear_q_rows, ag_moe_experts_multi_rows).
//  - the halves: bxq_half rounds to nearest even, takes subnormals as zero, keeps NaN; the
//    kernel's own halves (weights through every format's decode, NF4's per-block tables
//    included, and x) are exactly bxq_half's: with one-hot x (or one-hot weight rows) each
//    output is hi + lo of one value, which an f32 sum holds exactly;
//  - the kernel (where the processor has AMX-BF16 and AVX512-BF16; the rest runs
//    everywhere): against the reference of the same products summed in f64 within an f32
//    sum's rounding, on every weight format and awkward sizes; batch invariance: each row
//    has the same bits for T = 1 .. 70, alone or among others, for 1, 2 or 3 threads; y
//    written in full; against the F32 product within 2e-5 of the largest output;
//  - ag_linear_q_rows: marked rows give bxq_linear's bits (the reference's with the
//    reference kernels forced), unmarked rows ag_linear_q's, with few or most rows marked; backward for x = finite
//    differences; operand errors;
//  - ag_moe_experts_multi_rows: a marked token's row has the same bits alone or in any
//    batch, with or without adapters; unmarked tokens keep ag_moe_experts_multi's bits;
//    close to the reference;
//  - ag_lora_multi_rows: the same for the adapters' low-rank terms (ranks 4-16), and the
//    terms added in place onto a base projection with ag_add's bits.
#include "harness/harness.h"
#include "autograd/quant_internal.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    ag_qformat f;
    bool dq, per_row;
    const char *name;
} fmt_case;

static const fmt_case fmts[] = {
    {AG_Q_F32, true, true, "f32"},      {AG_Q_BF16, true, true, "bf16"},
    {AG_Q_INT8, true, true, "int8"},    {AG_Q_FP8, true, true, "fp8/row"},
    {AG_Q_NF4, true, true, "nf4+dq"},   {AG_Q_NF4, false, true, "nf4"},
};
#define N_FMTS 6

// rows: under a block, not a multiple of 16 or 32, more than a panel; cols: under a tile,
// not a multiple of 32, NF4 rows inside blocks (96), multiples of 64.
static const int64_t sizes[][2] = {{1, 64}, {5, 20}, {17, 96}, {40, 128}, {70, 200}, {33, 512}};
#define N_SIZES 6

static const int64_t t_list[] = {1, 2, 15, 16, 17, 33, 70};
#define N_T 7
#define T_MAX 70

static bool amx(void) {
    if (!bxq_available())
        printf("no AMX-BF16 with AVX512-BF16 here: the kernel itself is not run\n");
    return bxq_available();
}

// A stack of two matrices [2, rows, cols] (the tests use matrix 1).
static void make_weight(ag_qweight *q, ag_arena *a, const fmt_case *fc, int64_t rows,
                        int64_t cols, uint64_t seed) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    ag_tensor *w = ag_tensor_new(a, AG_F32, 3, (int64_t[]){2, rows, cols});
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

static void *ws_for(const kq_weight *v, int64_t T, int nt) {
    void *ws = aligned_alloc(64, (bxq_ws_bytes(v, T, nt) + 63) / 64 * 64);
    ck_assert_ptr_nonnull(ws);
    return ws;
}

static float f32_of(uint16_t h) { return bx_bf16(h); }

// hi + lo of v, as bxq_linear takes it.
static float pair_of(float v) {
    uint16_t h = bxq_half(v);
    return f32_of(h) + f32_of(bxq_half(v - f32_of(h)));
}

// ---- halves ----------------------------------------------------------------------------------

START_TEST(test_half) {
    ck_assert_uint_eq(bxq_half(1.0f), 0x3f80);
    ck_assert_uint_eq(bxq_half(-2.5f), 0xc020);
    // ties to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7
    ck_assert_uint_eq(bxq_half(1.0f + 0x1p-8f), 0x3f80);
    ck_assert_uint_eq(bxq_half(1.0f + 3 * 0x1p-8f), 0x3f82);
    ck_assert_uint_eq(bxq_half(0x1p-140f), 0x0000);  // subnormal: zero
    ck_assert_uint_eq(bxq_half(-0x1p-140f), 0x8000); // with its sign
    ck_assert(isnan(f32_of(bxq_half(NAN))));
    ck_assert(isinf(f32_of(bxq_half(INFINITY))));
    // hi + lo within 2^-17 of normal values
    ag_rng r;
    ag_rng_seed(&r, 5);
    for (int i = 0; i < 100000; i++) {
        float v = (float)ldexp(2 * ag_rng_uniform(&r) - 1, (int)(ag_rng_uniform(&r) * 200) - 100);
        ck_assert_msg(fabs((double)pair_of(v) - v) <= 0x1p-17 * fabs((double)v),
                      "%.9g: hi + lo %.9g", (double)v, (double)pair_of(v));
    }
}
END_TEST

// With x one-hot at k, y[t, o] = hi + lo of weight (o, k) exactly: the kernel's weight
// halves (every format's decode) are bxq_half's. With the weight's rows one-hot (F32),
// y[t, o] = hi + lo of x[t, o]: x's halves too, subnormals and ties included.
START_TEST(test_kernel_halves) {
    if (!amx())
        return;
    const fmt_case *fc = &fmts[_i];
    int64_t rows = 40, cols = 128;
    ag_arena a;
    ag_arena_init(&a, "bxq", 0);
    ag_qweight q;
    make_weight(&q, &a, fc, rows, cols, 31);
    kq_weight v;
    ag_qweight_view(&v, &q);
    float *x = calloc((size_t)(cols * cols), sizeof *x), *y = malloc((size_t)(cols * rows) * 4);
    float *w = malloc((size_t)cols * sizeof *w);
    ck_assert(x && y && w);
    for (int64_t k = 0; k < cols; k++)
        x[k * cols + k] = 1.0f;
    void *ws = ws_for(&v, cols, 2);
    bxq_linear(y, x, &v, 1, cols, 2, ws);
    for (int64_t o = 0; o < rows; o++) {
        bi_decode_f32(w, &v, rows + o, 1);
        for (int64_t k = 0; k < cols; k++)
            ck_assert_msg(y[k * rows + o] == pair_of(w[k]), "%s (%lld, %lld): %.9g vs %.9g",
                          fc->name, (long long)o, (long long)k, (double)y[k * rows + o],
                          (double)pair_of(w[k]));
    }
    free(ws);
    // x's halves: identity weight
    ag_tensor *id = ag_tensor_new2(&a, AG_F32, 64, 64);
    ck_assert_tensor(id);
    for (int64_t i = 0; i < 64; i++)
        ((float *)id->data)[i * 64 + i] = 1.0f;
    ag_qweight qi;
    ck_assert_ok(ag_qweight_quantize(&qi, id, AG_Q_F32, NULL));
    kq_weight vi;
    ag_qweight_view(&vi, &qi);
    float *xs = rand_x(3 * 64, 9);
    xs[0] = 0x1p-140f;                         // subnormal
    xs[1] = 1.0f + 0x1p-8f;                    // tie
    xs[2] = 1.0f + 0x1p-8f + 0x1p-20f;         // above the tie
    xs[3] = -(1.0f + 3 * 0x1p-8f);
    ws = ws_for(&vi, 3, 1);
    bxq_linear(y, xs, &vi, 0, 3, 1, ws);
    for (int64_t i = 0; i < 3 * 64; i++)
        ck_assert_msg(y[i] == pair_of(xs[i]), "x %lld: %.9g vs %.9g", (long long)i,
                      (double)y[i], (double)pair_of(xs[i]));
    free(ws);
    free(xs);
    ag_qweight_free(&qi);
    free(w);
    free(y);
    free(x);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// ---- the kernel ------------------------------------------------------------------------------

START_TEST(test_kernel) {
    if (!amx())
        return;
    for (int f = 0; f < N_FMTS; f++) {
        const fmt_case *fc = &fmts[f];
        int64_t rows = sizes[_i][0], cols = sizes[_i][1];
        ag_arena a;
        ag_arena_init(&a, "bxq", 0);
        ag_qweight q;
        make_weight(&q, &a, fc, rows, cols, 11 + (uint64_t)_i);
        kq_weight v;
        ag_qweight_view(&v, &q);
        float *x = rand_x(T_MAX * cols, 23 + (uint64_t)_i);
        size_t yb = (size_t)(T_MAX * rows) * sizeof(float);
        float *y = malloc(yb), *alone = malloc(yb), *ref = malloc(yb), *f32 = malloc(yb);
        float *w = malloc((size_t)cols * sizeof *w);
        ck_assert(y && alone && ref && f32 && w);
        void *ws = ws_for(&v, T_MAX, 3);
        for (int64_t t = 0; t < T_MAX; t++)
            bxq_linear(alone + t * rows, x + t * cols, &v, 1, 1, 1, ws);
        bxq_linear_ref(ref, x, &v, 1, T_MAX);
        double md = 0, my = 0;
        for (int64_t o = 0; o < rows; o++) {
            bi_decode_f32(w, &v, rows + o, 1);
            for (int64_t t = 0; t < T_MAX; t++) {
                double mag = 0, exact = 0;
                for (int64_t k = 0; k < cols; k++) {
                    mag += fabs((double)x[t * cols + k] * w[k]);
                    exact += (double)x[t * cols + k] * w[k];
                }
                double got = alone[t * rows + o];
                ck_assert_msg(fabs(got - ref[t * rows + o]) <= 1e-6 * mag + 1e-30,
                              "%s %lldx%lld t %lld o %lld: %.9g vs ref %.9g", fc->name,
                              (long long)rows, (long long)cols, (long long)t, (long long)o, got,
                              (double)ref[t * rows + o]);
                md = fmax(md, fabs(got - exact));
                my = fmax(my, fabs(exact));
            }
        }
        ck_assert_msg(md <= 2e-5 * my, "%s %lldx%lld: %.3g from the exact product (max %.3g)",
                      fc->name, (long long)rows, (long long)cols, md, my);
        for (int ti = 0; ti < N_T; ti++)
            for (int nt = 1; nt <= 3; nt++) {
                int64_t T = t_list[ti], off = (T_MAX - T) / 2;
                for (int64_t i = 0; i < T * rows; i++)
                    y[i] = NAN;
                bxq_linear(y, x + off * cols, &v, 1, T, nt, ws);
                ck_assert_msg(!memcmp(y, alone + off * rows, (size_t)(T * rows) * sizeof *y),
                              "%s %lldx%lld: T=%lld with %d threads differs from rows alone",
                              fc->name, (long long)rows, (long long)cols, (long long)T, nt);
            }
        free(ws);
        free(w);
        free(f32);
        free(ref);
        free(alone);
        free(y);
        free(x);
        ag_qweight_free(&q);
        ag_arena_free(&a);
    }
}
END_TEST

// ---- ag_linear_q_rows ------------------------------------------------------------------------

START_TEST(test_op_rows) {
    int64_t T = 9, rows = 50, cols = 128;
    ag_arena a;
    ag_arena_init(&a, "bxq", 0);
    ag_qweight q;
    make_weight(&q, &a, &fmts[4], rows, cols, 41);
    ag_qweight q2; // matrix 1 of the stack as its own 2-D weight
    {
        ag_tensor *w2 = ag_qweight_dequantize(&a, &q);
        ck_assert_tensor(w2);
        ag_tensor *m1 = ag_tensor_new2(&a, AG_F32, rows, cols);
        ck_assert_tensor(m1);
        memcpy(m1->data, (float *)w2->data + rows * cols, (size_t)(rows * cols) * 4);
        ck_assert_ok(ag_qweight_quantize(&q2, m1, AG_Q_NF4, NULL));
    }
    kq_weight v;
    ag_qweight_view(&v, &q2);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, T, cols);
    ck_assert_tensor(x);
    float *xr = rand_x(T * cols, 3);
    memcpy(x->data, xr, (size_t)(T * cols) * 4);
    // _i = 0: rows of both kinds gathered; 1: nearly all marked (all through bxq_linear in
    // place, the unmarked one again in F32)
    uint8_t mark[9] = {1, 0, 0, 1, 1, 0, 1, 0, 1};
    if (_i == 1)
        memset(mark + 1, 1, 7);
    ag_tensor *y = ag_linear_q_rows(&c, x, &q2, mark);
    ag_tensor *yq = ag_linear_q(&c, x, &q2);
    ck_assert_tensor(y);
    ck_assert_tensor(yq);
    float *one = malloc((size_t)rows * 4);
    ck_assert_ptr_nonnull(one);
    void *ws = ws_for(&v, 1, 1);
    for (int64_t t = 0; t < T; t++) {
        const float *got = (const float *)y->data + t * rows;
        if (!mark[t]) {
            ck_assert_msg(!memcmp(got, (float *)yq->data + t * rows, (size_t)rows * 4),
                          "unmarked row %lld differs from ag_linear_q", (long long)t);
            continue;
        }
        if (bxq_available())
            bxq_linear(one, xr + t * cols, &v, 0, 1, 1, ws);
        else
            bxq_linear_ref(one, xr + t * cols, &v, 0, 1);
        ck_assert_msg(!memcmp(got, one, (size_t)rows * 4), "marked row %lld", (long long)t);
    }
    // the reference kernels forced: the reference's values
    ag_set_reference_kernels(true);
    ag_tensor *yr = ag_linear_q_rows(&c, x, &q2, mark);
    ag_set_reference_kernels(false);
    ck_assert_tensor(yr);
    bxq_linear_ref(one, xr, &v, 0, 1);
    ck_assert(!memcmp(yr->data, one, (size_t)rows * 4));
    // nothing marked: ag_linear_q itself
    uint8_t none[9] = {0};
    ag_tensor *y0 = ag_linear_q_rows(&c, x, &q2, none);
    ck_assert_tensor(y0);
    ck_assert(!memcmp(y0->data, yq->data, (size_t)(T * rows) * 4));
    // F64 x with marked rows: refused with a message
    ag_tensor *x64 = ag_tensor_new2(&c.act, AG_F64, T, cols);
    ck_assert_ptr_null(ag_linear_q_rows(&c, x64, &q2, mark));
    ck_assert(strstr(molt_err_msg(), "F32") != NULL);
    ag_tensor *bad = ag_tensor_new2(&c.act, AG_F32, T, cols + 1);
    ck_assert_ptr_null(ag_linear_q_rows(&c, bad, &q2, mark));
    free(ws);
    free(one);
    free(xr);
    ag_ctx_free(&c);
    ag_qweight_free(&q2);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// L = sum(y * R), in double.
static double loss_of(const float *y, const float *R, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += (double)y[i] * R[i];
    return s;
}

START_TEST(test_op_backward) {
    int64_t T = 3, rows = 24, cols = 64;
    ag_arena a;
    ag_arena_init(&a, "bxq", 0);
    ag_tensor *w = ag_tensor_new2(&a, AG_F32, rows, cols);
    ck_assert_tensor(w);
    ag_rng r;
    ag_rng_seed(&r, 8);
    ag_fill_normal(w, &r, 0, 0.5);
    ag_qweight q;
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_NF4, NULL));
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c)); // grad mode on
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, T, cols);
    ck_assert_tensor(x);
    x->requires_grad = true;
    float *xr = rand_x(T * cols, 4), *R = rand_x(T * rows, 5);
    memcpy(x->data, xr, (size_t)(T * cols) * 4);
    uint8_t mark[3] = {1, 0, 1};
    ag_tensor *y = ag_linear_q_rows(&c, x, &q, mark);
    ck_assert_tensor(y);
    ag_tensor *rt = ag_tensor_new2(&c.act, AG_F32, T, rows);
    ck_assert_tensor(rt);
    memcpy(rt->data, R, (size_t)(T * rows) * 4);
    ag_tensor *l = ag_sum(&c, ag_mul(&c, y, rt));
    ck_assert_tensor(l);
    ck_assert_ok(ag_backward(&c, l));
    ck_assert_ptr_nonnull(x->grad);
    // finite differences of the forward itself (no recording), a large step: it is linear
    ag_ctx f;
    ck_assert_ok(ag_ctx_init(&f));
    ag_ctx_set_grad(&f, false);
    ag_tensor *xf = ag_tensor_new2(&f.act, AG_F32, T, cols);
    ck_assert_tensor(xf);
    double eps = 0.25, worst = 0;
    for (int64_t i = 0; i < T * cols; i++) {
        double lp, lm;
        for (int s = 0; s < 2; s++) {
            memcpy(xf->data, xr, (size_t)(T * cols) * 4);
            ((float *)xf->data)[i] += (float)(s ? -eps : eps);
            ag_tensor *yf = ag_linear_q_rows(&f, xf, &q, mark);
            ck_assert_tensor(yf);
            *(s ? &lm : &lp) = loss_of(yf->data, R, T * rows);
        }
        double num = (lp - lm) / (2 * eps), ana = ((float *)x->grad->data)[i];
        worst = fmax(worst, fabs(num - ana) / fmax(fabs(num), 1e-2));
    }
    ck_assert_msg(worst < 1e-3, "dx against finite differences: %.3g", worst);
    ag_ctx_free(&f);
    free(R);
    free(xr);
    ag_ctx_free(&c);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// ---- ag_moe_experts_multi_rows ---------------------------------------------------------------

enum { E = 4, H = 64, I = 32, KK = 2, NT = 12, NA = 2, R = 4 };

typedef struct {
    ag_arena a;
    ag_qweight gu, down;
    ag_expert_lora set[NA];
} moe_case;

static ag_tensor *filled(ag_arena *a, int64_t r0, int64_t c0, uint64_t seed, double sd) {
    ag_tensor *t = ag_tensor_new2(a, AG_F32, r0, c0);
    ck_assert_tensor(t);
    ag_rng r;
    ag_rng_seed(&r, seed);
    ag_fill_normal(t, &r, 0, sd);
    return t;
}

static void moe_init(moe_case *m) {
    ag_arena_init(&m->a, "moe", 0);
    ag_rng r;
    ag_rng_seed(&r, 17);
    ag_tensor *gu = ag_tensor_new(&m->a, AG_F32, 3, (int64_t[]){E, 2 * I, H});
    ag_tensor *dn = ag_tensor_new(&m->a, AG_F32, 3, (int64_t[]){E, H, I});
    ck_assert_tensor(gu);
    ck_assert_tensor(dn);
    ag_fill_normal(gu, &r, 0, 0.3);
    ag_fill_normal(dn, &r, 0, 0.3);
    ck_assert_ok(ag_qweight_quantize(&m->gu, gu, AG_Q_NF4, NULL));
    ck_assert_ok(ag_qweight_quantize(&m->down, dn, AG_Q_NF4, NULL));
    for (int s = 0; s < NA; s++)
        m->set[s] = (ag_expert_lora){filled(&m->a, R * E, H, 40 + s, 0.2),
                                     filled(&m->a, 2 * I, R * E, 50 + s, 0.2),
                                     filled(&m->a, R * E, I, 60 + s, 0.2),
                                     filled(&m->a, H, R * E, 70 + s, 0.2), R, 0.5, NULL, NULL};
}

// Rows rows[0..n) of the batch (x, w, idx, slot, mark) through the op.
static ag_tensor *moe_rows(ag_ctx *c, moe_case *m, const float *x, const float *w,
                           const int32_t *idx, const int32_t *slot, const uint8_t *mark,
                           const int *rows, int n, bool use_mark) {
    ag_tensor *xt = ag_tensor_new2(&c->act, AG_F32, n, H), *wt = ag_tensor_new2(&c->act, AG_F32, n, KK);
    ag_tensor *it = ag_tensor_new2(&c->act, AG_I32, n, KK), *st = ag_tensor_new1(&c->act, AG_I32, n);
    ck_assert(xt && wt && it && st);
    uint8_t mk[NT];
    for (int i = 0; i < n; i++) {
        int t = rows[i];
        memcpy((float *)xt->data + i * H, x + t * H, H * 4);
        memcpy((float *)wt->data + i * KK, w + t * KK, KK * 4);
        memcpy((int32_t *)it->data + i * KK, idx + t * KK, KK * 4);
        ((int32_t *)st->data)[i] = slot[t];
        mk[i] = mark[t];
    }
    ag_expert_stacks sk = {NULL, NULL, &m->gu, &m->down};
    return ag_moe_experts_multi_rows(c, xt, wt, it, &sk, st, NA, m->set, use_mark ? mk : NULL);
}

START_TEST(test_moe_rows) {
    moe_case m;
    moe_init(&m);
    float *x = rand_x(NT * H, 81), w[NT * KK];
    int32_t idx[NT * KK], slot[NT];
    uint8_t mark[NT];
    for (int t = 0; t < NT; t++) {
        idx[t * KK] = t % E;
        idx[t * KK + 1] = (t * 3 + 1) % E;
        w[t * KK] = 0.6f;
        w[t * KK + 1] = 0.4f;
        slot[t] = t % 3 - 1;
        mark[t] = (uint8_t)(t % 4 != 1);
    }
    int all[NT], rev[NT];
    for (int t = 0; t < NT; t++) {
        all[t] = t;
        rev[t] = NT - 1 - t;
    }
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_tensor *full = moe_rows(&c, &m, x, w, idx, slot, mark, all, NT, true);
    ag_tensor *plain = moe_rows(&c, &m, x, w, idx, slot, mark, all, NT, false);
    ag_tensor *back = moe_rows(&c, &m, x, w, idx, slot, mark, rev, NT, true);
    ck_assert(full && plain && back);
    double md = 0, my = 0;
    for (int t = 0; t < NT; t++) {
        const float *ft = (const float *)full->data + t * H;
        ag_tensor *one = moe_rows(&c, &m, x, w, idx, slot, mark, &t, 1, true);
        ck_assert_tensor(one);
        ck_assert_msg(!memcmp(ft, one->data, H * 4), "token %d alone differs", t);
        ck_assert_msg(!memcmp(ft, (float *)back->data + (NT - 1 - t) * H, H * 4),
                      "token %d in reversed order differs", t);
        if (!mark[t])
            ck_assert_msg(!memcmp(ft, (float *)plain->data + t * H, H * 4),
                          "unmarked token %d differs from the op without marks", t);
        for (int h = 0; h < H; h++) {
            md = fmax(md, fabs((double)ft[h] - ((float *)plain->data)[t * H + h]));
            my = fmax(my, fabs((double)((float *)plain->data)[t * H + h]));
        }
    }
    ck_assert_msg(md <= 2e-5 * my, "marked tokens %.3g from F32 (max %.3g)", md, my);
    ck_assert_msg(!bxq_available() || md > 0, "no marked token changed: the marks were ignored");
    free(x);
    ag_ctx_free(&c);
    ag_qweight_free(&m.gu);
    ag_qweight_free(&m.down);
    ag_arena_free(&m.a);
}
END_TEST

// ---- ag_lora_multi_rows ----------------------------------------------------------------------

START_TEST(test_lora_rows) {
    enum { T = 40, IN = 96, OUT = 80, N = 3 };
    ag_arena a;
    ag_arena_init(&a, "lora", 0);
    ag_lora_ab set[N];
    for (int s = 0; s < N; s++) // ranks 16, 4 and 12
        set[s] = (ag_lora_ab){filled(&a, s == 1 ? 4 : 16 - 4 * (s / 2), IN, 90 + s, 0.3),
                              filled(&a, OUT, s == 1 ? 4 : 16 - 4 * (s / 2), 95 + s, 0.3), 0.75};
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, T, IN), *slot = ag_tensor_new1(&c.act, AG_I32, T);
    ck_assert(x && slot);
    float *xr = rand_x(T * IN, 12);
    memcpy(x->data, xr, sizeof(float) * T * IN);
    uint8_t mark[T];
    for (int t = 0; t < T; t++) {
        ((int32_t *)slot->data)[t] = t % (N + 1) - 1;
        mark[t] = (uint8_t)(t % 5 != 2);
    }
    ag_tensor *y = ag_lora_multi_rows(&c, x, slot, N, set, OUT, mark, NULL);
    ag_tensor *yf = ag_lora_multi(&c, x, slot, N, set, OUT);
    ck_assert(y && yf);
    double md = 0, my = 0;
    for (int t = 0; t < T; t++) {
        const float *got = (const float *)y->data + t * OUT;
        ag_tensor *x1 = ag_slice(&c, x, 0, t, 1), *s1 = ag_slice(&c, slot, 0, t, 1);
        ag_tensor *y1 = ag_lora_multi_rows(&c, x1, s1, N, set, OUT, &mark[t], NULL);
        ck_assert_tensor(y1);
        ck_assert_msg(!memcmp(got, y1->data, OUT * sizeof(float)), "row %d alone differs", t);
        if (!mark[t])
            ck_assert_msg(!memcmp(got, (float *)yf->data + t * OUT, OUT * sizeof(float)),
                          "unmarked row %d differs from ag_lora_multi", t);
        for (int o = 0; o < OUT; o++) {
            md = fmax(md, fabs((double)got[o] - ((float *)yf->data)[t * OUT + o]));
            my = fmax(my, fabs((double)((float *)yf->data)[t * OUT + o]));
        }
    }
    ck_assert_msg(md <= 2e-5 * my, "marked rows %.3g from F32 (max %.3g)", md, my);
    ck_assert_msg(md > 0, "no marked row changed: the marks were ignored");
    ag_tensor *x64 = ag_tensor_new2(&c.act, AG_F64, T, IN);
    ck_assert_ptr_null(ag_lora_multi_rows(&c, x64, slot, N, set, OUT, mark, NULL));
    // onto a base projection in place: the bits of adding the terms, rows of no adapter
    // (slot -1) as they were, a negative zero included
    ag_tensor *base = filled(&c.act, T, OUT, 77, 1.0), *keep = ag_tensor_new2(&c.act, AG_F32, T, OUT);
    ck_assert(base && keep);
    ((float *)base->data)[0] = -0.0f; // row 0 has slot -1
    memcpy(keep->data, base->data, sizeof(float) * T * OUT);
    ag_tensor *sum = ag_add(&c, keep, y);
    ag_tensor *in = ag_lora_multi_rows(&c, x, slot, N, set, OUT, mark, base);
    ck_assert_ptr_eq(in, base);
    for (int t = 0; t < T; t++) {
        const float *want = ((int32_t *)slot->data)[t] < 0 ? (const float *)keep->data + t * OUT
                                                           : (const float *)sum->data + t * OUT;
        ck_assert_msg(!memcmp((float *)base->data + t * OUT, want, OUT * sizeof(float)),
                      "row %d in place", t);
    }
    ck_assert(signbit(((float *)base->data)[0]));
    // recorded (grad mode), the terms come back for the caller to add
    ag_ctx_set_grad(&c, true);
    set[0].a->requires_grad = true;
    ag_tensor *rec = ag_lora_multi_rows(&c, x, slot, N, set, OUT, mark, base);
    ck_assert_tensor(rec);
    ck_assert_ptr_ne(rec, base);
    ck_assert(!memcmp(rec->data, y->data, sizeof(float) * T * OUT));
    set[0].a->requires_grad = false;
    ag_ctx_set_grad(&c, false);
    free(xr);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

int main(void) {
    Suite *s = suite_create("bxq_linear");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_half);
    tcase_add_loop_test(tc, test_kernel_halves, 0, N_FMTS);
    tcase_add_loop_test(tc, test_kernel, 0, N_SIZES);
    tcase_add_loop_test(tc, test_op_rows, 0, 2);
    tcase_add_test(tc, test_op_backward);
    tcase_add_test(tc, test_moe_rows);
    tcase_add_test(tc, test_lora_rows);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
