// tests/test_qlinear.c: ag_linear_q and ag_moe_experts_q (quantized frozen weights): outputs
// and gradients against ag_linear / ag_moe_experts on the dequantized weights, for every
// format, on shapes that are not multiples of the NF4 block (64) and large enough to use
// several threads; gradient checks with respect to the activations (f64), f32 against f64,
// optimized against reference kernels; gradient accumulation, what gets recorded, and the
// exact error messages.
#include "harness/harness.h"
#include "harness/thread_probe.h"
#include "autograd/internal.h"

#include <math.h>
#include <omp.h>
#include <string.h>

// ---- helpers --------------------------------------------------------------------------------

// Random normal weights of `shape` quantized to `f` (NF4 with double quantization; FP8 per
// row unless per_tensor).
static void make_qw(ag_qweight *q, ag_arena *a, ag_qformat f, int ndim, const int64_t *shape,
                    uint64_t seed, bool per_tensor) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    ag_tensor *w = ag_tensor_new(a, AG_F32, ndim, shape);
    ck_assert_tensor(w);
    ag_fill_normal(w, &r, 0, 0.5);
    ag_qopts o = ag_qopts_default();
    o.fp8_per_row = !per_tensor;
    ck_assert_ok(ag_qweight_quantize(q, w, f, &o));
}

static ag_tensor *rand_f32(ag_arena *a, ag_rng *r, int ndim, const int64_t *shape, bool grad) {
    ag_tensor *t = ag_tensor_new(a, AG_F32, ndim, shape);
    ck_assert_tensor(t);
    ag_fill_uniform(t, r, -1, 1);
    t->requires_grad = grad;
    return t;
}

static ag_tensor *copy_f32(ag_arena *a, const ag_tensor *t, bool grad) {
    ag_tensor *c = gc_clone(a, t, AG_F32);
    ck_assert_tensor(c);
    c->requires_grad = grad;
    return c;
}

static void check_rel(const char *what, const ag_tensor *got, const ag_tensor *want, double tol) {
    ck_assert_tensor(got);
    ck_assert_tensor(want);
    ck_assert_int_eq(got->numel, want->numel);
    double rel = gc_max_rel_diff(got, want);
    ck_assert_msg(rel <= tol, "%s: max rel diff %g > %g", what, rel, tol);
}

// L = sum(y * R) with R fixed, so that backward sees a non-trivial dy.
static ag_tensor *weighted_loss(ag_ctx *c, ag_tensor *y, uint64_t seed) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    ag_tensor *R = ag_out_new(c, y->dtype, y->ndim, y->shape);
    ck_assert_tensor(R);
    ag_fill_uniform(R, &r, -1, 1);
    return ag_sum(c, ag_mul(c, y, R));
}

static const ag_qformat formats[] = {AG_Q_F32, AG_Q_BF16, AG_Q_INT8, AG_Q_FP8, AG_Q_NF4,
                                     AG_Q_FP8};
#define N_FORMATS 6 // the last entry is FP8 with a per-tensor scale

// ---- linear: against ag_linear on the dequantized matrix ------------------------------------

typedef struct {
    int nd;
    int64_t x[3];
    int64_t out;
} lq_shape;

static const lq_shape lq_shapes[] = {
    {2, {5, 64}, 3},     {2, {7, 130}, 70},  {2, {1, 65}, 129},
    {3, {2, 3, 100}, 33}, {2, {64, 200}, 300}, // 7.7 Mflop: the multi-threaded paths
};
#define N_LQ_SHAPES 5

START_TEST(test_linear_q_matches_dequantized) {
    const lq_shape *s = &lq_shapes[_i % N_LQ_SHAPES];
    int fi = _i / N_LQ_SHAPES;
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 100 + (uint64_t)_i);
    int64_t in = s->x[s->nd - 1], ws[2] = {s->out, in};
    ag_qweight q;
    make_qw(&q, &a, formats[fi], 2, ws, 200 + (uint64_t)_i, fi == N_FORMATS - 1);
    ag_tensor *wd = ag_qweight_dequantize(&a, &q);
    ck_assert_tensor(wd);
    ag_tensor *x0 = rand_f32(&a, &r, s->nd, s->x, true);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_tensor *xq = copy_f32(&a, x0, true), *xd = copy_f32(&a, x0, true);
        ag_tensor *yq = ag_linear_q(&c, xq, &q), *yd = ag_linear(&c, xd, wd);
        check_rel(ref ? "forward (reference kernels)" : "forward", yq, yd, 1e-5);
        ck_assert_int_eq(yq->ndim, s->nd);
        ck_assert_int_eq(yq->shape[s->nd - 1], s->out);
        ck_assert_ok(ag_backward(&c, ag_add(&c, weighted_loss(&c, yq, 7), weighted_loss(&c, yd, 7))));
        check_rel(ref ? "dx (reference kernels)" : "dx", xq->grad, xd->grad, 1e-5);
        ck_assert_ptr_null(wd->grad); // frozen
        ag_ctx_free(&c);
    }
    ag_set_reference_kernels(false);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// ---- linear: gradient checks ------------------------------------------------------------------

static ag_tensor *build_linear_q(ag_ctx *c, ag_tensor **in, void *user) {
    return ag_linear_q(c, in[0], user);
}

START_TEST(test_linear_q_gradcheck) {
    static const ag_qformat f[] = {AG_Q_NF4, AG_Q_INT8, AG_Q_FP8, AG_Q_BF16};
    static const lq_shape sh[] = {{2, {3, 70}, 5}, {3, {2, 2, 9}, 4}, {2, {4, 33}, 7},
                                  {2, {1, 130}, 3}};
    const lq_shape *s = &sh[_i];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 300 + (uint64_t)_i);
    int64_t in = s->x[s->nd - 1], ws[2] = {s->out, in};
    ag_qweight q;
    make_qw(&q, &a, f[_i], 2, ws, 400 + (uint64_t)_i, false);
    ag_tensor *x = gc_rand(&a, &r, s->nd, s->x, -1, 1, true);
    gc_case g = {.n_in = 1, .in = &x, .build = build_linear_q, .user = &q};
    gc_result res;
    ck_assert_ok(gc_gradcheck(&g, &res));
    ck_assert_int_eq(res.checked, x->numel);
    ck_assert_msg(res.max_rel <= 1e-6, "max rel %g at elem %lld (%g vs %g)", res.max_rel,
                  (long long)res.worst_elem, res.analytic, res.numeric);
    double rel;
    ck_assert_ok(gc_f32_vs_f64(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "f32 vs f64: %g", rel);
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "fast vs ref: %g", rel);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// x feeds two quantized linears: a rule that overwrote dx instead of adding would lose one.
START_TEST(test_linear_q_accumulates_and_records) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 500);
    int64_t ws[2] = {6, 80}, xs[2] = {4, 80};
    ag_qweight q1, q2;
    make_qw(&q1, &a, AG_Q_NF4, 2, ws, 501, false);
    make_qw(&q2, &a, AG_Q_INT8, 2, ws, 502, false);
    ag_tensor *w1 = ag_qweight_dequantize(&a, &q1), *w2 = ag_qweight_dequantize(&a, &q2);
    ag_tensor *x0 = rand_f32(&a, &r, 2, xs, true);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *xq = copy_f32(&a, x0, true), *xd = copy_f32(&a, x0, true);
    ag_tensor *lq = weighted_loss(&c, ag_add(&c, ag_linear_q(&c, xq, &q1), ag_linear_q(&c, xq, &q2)), 3);
    ag_tensor *ld = weighted_loss(&c, ag_add(&c, ag_linear(&c, xd, w1), ag_linear(&c, xd, w2)), 3);
    ck_assert_ok(ag_backward(&c, ag_add(&c, lq, ld)));
    check_rel("accumulated dx", xq->grad, xd->grad, 1e-5);
    // nothing is recorded when x needs no gradient, or with grad mode off
    ag_tensor *xn = copy_f32(&a, x0, false);
    ck_assert_tensor(ag_linear_q(&c, xn, &q1));
    ck_assert_int_eq(c.n_tape, 0);
    ag_ctx_set_grad(&c, false);
    ag_tensor *y = ag_linear_q(&c, xq, &q1);
    ck_assert_tensor(y);
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert(!y->requires_grad);
    ag_ctx_set_grad(&c, true);
    y = ag_linear_q(&c, xq, &q1);
    ck_assert_int_eq(c.n_tape, 1);
    ck_assert_str_eq(ag_op_name(c.tape[0]->op), "linear_q");
    ck_assert_ptr_eq(c.tape[0]->ptr, &q1);
    ck_assert_int_eq(c.saved_bytes, 0);
    ag_ctx_free(&c);
    ag_qweight_free(&q1);
    ag_qweight_free(&q2);
    ag_arena_free(&a);
}
END_TEST

// A product too small for a team of threads (under 4 Mflop) runs its tiles' GEMMs outside any
// parallel region: inside one, even one that runs on a single thread, the BLAS library's own
// parallel region would be a nested one, which OpenMP runs on threads it starts for that
// region alone (a thread or more per GEMM). Forward and backward, after a warm-up.
START_TEST(test_linear_q_small_starts_no_threads) {
    omp_set_num_threads(2);
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 600);
    int64_t ws[2] = {64, 64}, xs[2] = {448, 64}; // 2 * 448 * 64 * 64 = 3.7 Mflop
    ag_qweight q;
    make_qw(&q, &a, AG_Q_NF4, 2, ws, 601, false);
    ag_tensor *x = rand_f32(&a, &r, 2, xs, true);
    long before = 0;
    for (int i = 0; i < 12; i++) {
        if (i == 2)
            before = harness_threads_started();
        ag_ctx c;
        ag_ctx_init(&c);
        ck_assert_ok(ag_backward(&c, weighted_loss(&c, ag_linear_q(&c, x, &q), 7)));
        ag_ctx_free(&c);
    }
    ck_assert_int_eq(harness_threads_started(), before);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_linear_q_errors) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_ctx c;
    ag_ctx_init(&c);
    int64_t ws[2] = {3, 5}, es[3] = {2, 3, 5};
    ag_qweight q, qe;
    make_qw(&q, &a, AG_Q_INT8, 2, ws, 1, false);
    make_qw(&qe, &a, AG_Q_NF4, 3, es, 2, false);
    ag_tensor *x = ag_tensor_new2(&a, AG_F32, 2, 4), *xi = ag_tensor_new2(&a, AG_I32, 2, 5);
    ck_assert_ptr_null(ag_linear_q(&c, x, &q));
    ck_assert_str_eq(molt_err_msg(), "linear_q: x [2, 4] f32 does not match w [3, 5] int8: x's "
                                     "last dim must equal w's dim 1 (in features)");
    ck_assert_ptr_null(ag_linear_q(&c, xi, &q));
    ck_assert_str_eq(molt_err_msg(),
                     "linear_q: x is [2, 5] i32, expected f32 or f64 (cast bf16/f16 first)");
    ag_tensor *x5 = ag_tensor_new2(&a, AG_F32, 2, 5);
    ck_assert_ptr_null(ag_linear_q(&c, x5, &qe));
    ck_assert_str_eq(molt_err_msg(), "linear_q: w [2, 3, 5] nf4+dq is a stack of 2 matrices; a "
                                     "linear takes one [out, in] matrix (experts go through "
                                     "ag_moe_experts_q)");
    ck_assert_ptr_null(ag_linear_q(&c, x5, NULL));
    ck_assert_str_eq(molt_err_msg(), "linear_q: w is NULL");
    ck_assert_ptr_null(ag_linear_q(&c, NULL, &q));
    ck_assert_str_eq(molt_err_msg(), "linear_q: x is NULL");
    q.scale[1] = NAN; // corrupt scales are caught before any kernel runs
    ck_assert_ptr_null(ag_linear_q(&c, x5, &q));
    ck_assert_str_eq(molt_err_msg(), "linear_q: [3, 5] int8 has scale[1] = nan; expected a "
                                     "finite, non-negative value");
    q.scale[1] = 1;
    q.cols = 6; // fields that disagree with the shape
    ck_assert_ptr_null(ag_linear_q(&c, x5, &q));
    ck_assert_str_eq(molt_err_msg(), "linear_q: w [3, 5] int8 has size fields that do not match "
                                     "its shape (n_mat 1, rows 3, cols 6, numel 15, blocks 0/0)");
    q.cols = 5;
    q.format = (ag_qformat)7;
    ck_assert_ptr_null(ag_linear_q(&c, x5, &q));
    ck_assert_str_eq(molt_err_msg(), "linear_q: unknown qweight format 7");
    q.format = AG_Q_INT8;
    ck_assert_tensor(ag_linear_q(&c, x5, &q));
    ag_ctx_free(&c);
    ag_qweight_free(&q);
    ag_qweight_free(&qe);
    ag_arena_free(&a);
}
END_TEST

// ---- routed experts ---------------------------------------------------------------------------

typedef struct {
    int64_t T, k, E, H, I;
} mq_shape;

static const mq_shape mq_shapes[] = {{5, 2, 3, 12, 6}, {9, 3, 4, 70, 33}, {40, 2, 3, 128, 96}};

static ag_tensor *rand_idx(ag_arena *a, ag_rng *r, int64_t T, int64_t k, int64_t E) {
    ag_tensor *idx = ag_tensor_new2(a, AG_I32, T, k);
    ck_assert_tensor(idx);
    int32_t *p = idx->data;
    for (int64_t i = 0; i < T * k; i++)
        p[i] = (int32_t)(ag_rng_uniform(r) * (double)E);
    p[0] = p[1 % (T * k)]; // a duplicate choice in one row is allowed and adds up
    return idx;
}

START_TEST(test_moe_q_matches_dequantized) {
    const mq_shape *s = &mq_shapes[_i % 3];
    ag_qformat f = _i < 3 ? AG_Q_NF4 : _i < 6 ? AG_Q_INT8 : AG_Q_FP8;
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 600 + (uint64_t)_i);
    int64_t gs[3] = {s->E, 2 * s->I, s->H}, ds[3] = {s->E, s->H, s->I};
    ag_qweight gu, dn;
    make_qw(&gu, &a, f, 3, gs, 601 + (uint64_t)_i, _i >= 6);
    make_qw(&dn, &a, f, 3, ds, 701 + (uint64_t)_i, _i >= 6);
    ag_tensor *gud = ag_qweight_dequantize(&a, &gu), *dnd = ag_qweight_dequantize(&a, &dn);
    int64_t xs[2] = {s->T, s->H}, wsz[2] = {s->T, s->k};
    ag_tensor *x0 = rand_f32(&a, &r, 2, xs, true), *w0 = rand_f32(&a, &r, 2, wsz, true);
    ag_tensor *idx = rand_idx(&a, &r, s->T, s->k, s->E);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_tensor *xq = copy_f32(&a, x0, true), *xd = copy_f32(&a, x0, true);
        ag_tensor *wq = copy_f32(&a, w0, true), *wd = copy_f32(&a, w0, true);
        ag_tensor *yq = ag_moe_experts_q(&c, xq, wq, idx, &gu, &dn);
        ag_tensor *yd = ag_moe_experts(&c, xd, wd, idx, gud, dnd);
        check_rel("experts forward", yq, yd, 1e-5);
        ck_assert_ok(ag_backward(&c, ag_add(&c, weighted_loss(&c, yq, 9), weighted_loss(&c, yd, 9))));
        check_rel("experts dx", xq->grad, xd->grad, 1e-5);
        check_rel("experts dweights", wq->grad, wd->grad, 1e-5);
        ag_ctx_free(&c);
    }
    ag_set_reference_kernels(false);
    ag_qweight_free(&gu);
    ag_qweight_free(&dn);
    ag_arena_free(&a);
}
END_TEST

typedef struct {
    const ag_qweight *gu, *dn;
    ag_tensor *idx;
} moe_user;

static ag_tensor *build_moe_q(ag_ctx *c, ag_tensor **in, void *user) {
    moe_user *u = user;
    return ag_moe_experts_q(c, in[0], in[1], u->idx, u->gu, u->dn);
}

START_TEST(test_moe_q_gradcheck) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 800 + (uint64_t)_i);
    int64_t T = 4, k = 2, E = 3, H = 10, I = 5;
    int64_t gs[3] = {E, 2 * I, H}, ds[3] = {E, H, I}, xs[2] = {T, H}, wsz[2] = {T, k};
    ag_qweight gu, dn;
    make_qw(&gu, &a, _i ? AG_Q_INT8 : AG_Q_NF4, 3, gs, 801, false);
    make_qw(&dn, &a, _i ? AG_Q_INT8 : AG_Q_NF4, 3, ds, 802, false);
    ag_tensor *in[2] = {gc_rand(&a, &r, 2, xs, -1, 1, true), gc_rand(&a, &r, 2, wsz, 0, 1, true)};
    moe_user u = {&gu, &dn, rand_idx(&a, &r, T, k, E)};
    gc_case g = {.n_in = 2, .in = in, .build = build_moe_q, .user = &u};
    gc_result res;
    ck_assert_ok(gc_gradcheck(&g, &res));
    ck_assert_int_eq(res.checked, T * H + T * k);
    ck_assert_msg(res.max_rel <= 1e-6, "max rel %g at input %d elem %lld (%g vs %g)",
                  res.max_rel, res.worst_input, (long long)res.worst_elem, res.analytic,
                  res.numeric);
    double rel;
    ck_assert_ok(gc_f32_vs_f64(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "f32 vs f64: %g", rel);
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "fast vs ref: %g", rel);
    ag_qweight_free(&gu);
    ag_qweight_free(&dn);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_moe_q_errors) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_rng r;
    ag_rng_seed(&r, 900);
    int64_t gs[3] = {3, 8, 6}, ds[3] = {3, 6, 4}, ds2[3] = {2, 6, 4}, ws[2] = {8, 6};
    ag_qweight gu, dn, dn2, flat;
    make_qw(&gu, &a, AG_Q_NF4, 3, gs, 1, false);
    make_qw(&dn, &a, AG_Q_NF4, 3, ds, 2, false);
    make_qw(&dn2, &a, AG_Q_NF4, 3, ds2, 3, false);
    make_qw(&flat, &a, AG_Q_NF4, 2, ws, 4, false);
    int64_t xs[2] = {2, 6}, wsz[2] = {2, 2};
    ag_tensor *x = rand_f32(&a, &r, 2, xs, true), *w = rand_f32(&a, &r, 2, wsz, true);
    ag_tensor *idx = ag_tensor_new2(&a, AG_I32, 2, 2);
    ck_assert_tensor(ag_moe_experts_q(&c, x, w, idx, &gu, &dn));
    ck_assert_ptr_null(ag_moe_experts_q(&c, x, w, idx, &gu, &dn2));
    ck_assert_str_eq(molt_err_msg(), "moe_experts_q: down is [2, 6, 4] nf4+dq, expected [3, 6, 4] "
                                     "(E, H, I from gate_up and x)");
    ck_assert_ptr_null(ag_moe_experts_q(&c, x, w, idx, &flat, &dn));
    ck_assert_str_eq(molt_err_msg(), "moe_experts_q: gate_up is [8, 6] nf4+dq, expected [E, 2I, "
                                     "6] for x [2, 6] f32");
    ((int32_t *)idx->data)[3] = 3;
    ck_assert_ptr_null(ag_moe_experts_q(&c, x, w, idx, &gu, &dn));
    ck_assert_str_eq(molt_err_msg(), "moe_experts_q: idx[t=1, j=1] = 3 is out of range [0, 3)");
    ((int32_t *)idx->data)[3] = 0;
    ag_tensor *w3 = ag_tensor_new2(&a, AG_F32, 2, 3);
    ck_assert_ptr_null(ag_moe_experts_q(&c, x, w3, idx, &gu, &dn));
    ck_assert_str_eq(molt_err_msg(), "moe_experts_q: idx [2, 2] i32 and weights [2, 3] f32 differ "
                                     "in shape");
    ck_assert_ptr_null(ag_moe_experts_q(&c, x, w, idx, &gu, NULL));
    ck_assert_str_eq(molt_err_msg(), "moe_experts_q: down is NULL");
    ag_ctx_free(&c);
    ag_qweight_free(&gu);
    ag_qweight_free(&dn);
    ag_qweight_free(&dn2);
    ag_qweight_free(&flat);
    ag_arena_free(&a);
}
END_TEST

int main(void) {
    Suite *s = suite_create("qlinear");
    TCase *tl = tcase_create("linear_q");
    tcase_add_loop_test(tl, test_linear_q_matches_dequantized, 0, N_FORMATS * N_LQ_SHAPES);
    tcase_add_loop_test(tl, test_linear_q_gradcheck, 0, 4);
    tcase_add_test(tl, test_linear_q_accumulates_and_records);
    tcase_add_test(tl, test_linear_q_errors);
    tcase_add_test(tl, test_linear_q_small_starts_no_threads);
    suite_add_tcase(s, tl);
    TCase *tm = tcase_create("moe_experts_q");
    tcase_add_loop_test(tm, test_moe_q_matches_dequantized, 0, 9);
    tcase_add_loop_test(tm, test_moe_q_gradcheck, 0, 2);
    tcase_add_test(tm, test_moe_q_errors);
    suite_add_tcase(s, tm);
    return harness_run(s);
}
