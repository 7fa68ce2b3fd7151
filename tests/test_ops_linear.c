// tests/test_ops_linear.c: ag_linear and ag_rmsnorm: values against the definitions written
// out here, gradient checks on several shapes (non-powers of two, 1-D to 4-D inputs),
// f32 against f64, optimized kernels against the reference ones, gradient accumulation,
// frozen weights and the exact error messages.
#include "harness/harness.h"
#include "autograd/internal.h"

#include <math.h>
#include <string.h>

// ---- helpers ------------------------------------------------------------------------------

static void check_grad(const gc_case *g, int64_t expect_checked) {
    gc_result res;
    ck_assert_ok(gc_gradcheck(g, &res));
    ck_assert_int_eq(res.checked, expect_checked);
    ck_assert_msg(res.max_rel <= 1e-6, "max rel %g at input %d elem %lld (%g vs %g)",
                  res.max_rel, res.worst_input, (long long)res.worst_elem, res.analytic,
                  res.numeric);
}

static void check_f32_and_fast(const gc_case *g) {
    double rel;
    ck_assert_ok(gc_f32_vs_f64(g, &rel));
    ck_assert_msg(rel <= 1e-5, "f32 vs f64: %g", rel);
    ck_assert_ok(gc_fast_vs_ref(g, &rel));
    ck_assert_msg(rel <= 1e-5, "fast vs ref: %g", rel);
}

static int64_t numel_of(int nd, const int64_t *s) {
    int64_t n = 1;
    for (int i = 0; i < nd; i++)
        n *= s[i];
    return n;
}

// ---- linear -------------------------------------------------------------------------------

static ag_tensor *build_linear(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    return ag_linear(c, in[0], in[1]);
}

// x feeds two linears whose outputs are added: a rule that overwrote instead of
// accumulating would give half of dx.
static ag_tensor *build_linear_twice(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    return ag_add(c, ag_linear(c, in[0], in[1]), ag_linear(c, in[0], in[2]));
}

typedef struct {
    int nd;
    int64_t x[4];
    int64_t out;
} linear_shape;

static const linear_shape linear_shapes[] = {
    {1, {5}, 3}, {2, {1, 1}, 1}, {2, {3, 5}, 4}, {3, {2, 3, 7}, 6}, {4, {2, 1, 3, 4}, 5},
    {2, {9, 6}, 11},
};

START_TEST(test_linear_gradcheck) {
    const linear_shape *s = &linear_shapes[_i];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 10 + (uint64_t)_i);
    int64_t in_f = s->x[s->nd - 1], ws[2] = {s->out, in_f};
    ag_tensor *in[2] = {gc_rand(&a, &r, s->nd, s->x, -1, 1, true),
                        gc_rand(&a, &r, 2, ws, -1, 1, true)};
    gc_case g = {.n_in = 2, .in = in, .build = build_linear};
    check_grad(&g, numel_of(s->nd, s->x) + s->out * in_f);
    check_f32_and_fast(&g);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_linear_accumulates) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 3);
    int64_t xs[2] = {4, 5}, ws[2] = {3, 5};
    ag_tensor *in[3] = {gc_rand(&a, &r, 2, xs, -1, 1, true), gc_rand(&a, &r, 2, ws, -1, 1, true),
                        gc_rand(&a, &r, 2, ws, -1, 1, false)};
    gc_case g = {.n_in = 3, .in = in, .build = build_linear_twice};
    check_grad(&g, 20 + 15);
    check_f32_and_fast(&g);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_linear_matches_definition) {
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_rng r;
        ag_rng_seed(&r, 4);
        int64_t xs[3] = {2, 3, 7};
        ag_tensor *x = ag_tensor_new(&c.act, AG_F64, 3, xs);
        ag_tensor *w = ag_tensor_new2(&c.act, AG_F64, 5, 7);
        ag_fill_uniform(x, &r, -1, 1);
        ag_fill_uniform(w, &r, -1, 1);
        ag_tensor *y = ag_linear(&c, x, w);
        ck_assert_tensor(y);
        ck_assert_int_eq(y->ndim, 3);
        ck_assert_int_eq(y->shape[0], 2);
        ck_assert_int_eq(y->shape[1], 3);
        ck_assert_int_eq(y->shape[2], 5);
        for (int64_t t = 0; t < 6; t++)
            for (int64_t o = 0; o < 5; o++) {
                double want = 0;
                for (int64_t i = 0; i < 7; i++)
                    want += ag_get(x, t * 7 + i) * ag_get(w, o * 7 + i);
                ck_assert_double_eq_tol(ag_get(y, t * 5 + o), want, 1e-13);
            }
        ag_ctx_free(&c);
    }
    ag_set_reference_kernels(false);
}
END_TEST

// W frozen (requires_grad false): x still gets dy W, W gets no grad buffer. And the
// other way round, and nothing recorded when neither needs a gradient.
START_TEST(test_linear_frozen_weight) {
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_arena p;
        ag_arena_init(&p, "params", 0);
        ag_rng r;
        ag_rng_seed(&r, 6);
        ag_tensor *x = ag_tensor_new2(&p, AG_F64, 3, 4), *w = ag_tensor_new2(&p, AG_F64, 5, 4);
        ag_fill_uniform(x, &r, -1, 1);
        ag_fill_uniform(w, &r, -1, 1);
        x->requires_grad = true;
        ag_tensor *y = ag_linear(&c, x, w);
        ck_assert_tensor(y);
        ck_assert_int_eq(c.n_tape, 1);
        // L = sum(y * y): dy = 2 y, dx[t,i] = sum_o 2 y[t,o] w[o,i]
        ck_assert_ok(ag_backward(&c, ag_sum(&c, ag_mul(&c, y, y))));
        ck_assert_ptr_nonnull(x->grad);
        ck_assert_ptr_null(w->grad);
        for (int64_t t = 0; t < 3; t++)
            for (int64_t i = 0; i < 4; i++) {
                double want = 0;
                for (int64_t o = 0; o < 5; o++)
                    want += 2 * ag_get(y, t * 5 + o) * ag_get(w, o * 4 + i);
                ck_assert_double_eq_tol(ag_get(x->grad, t * 4 + i), want, 1e-12);
            }
        ag_ctx_step_reset(&c);
        // x frozen, w trained: dw[o,i] = sum_t 2 y[t,o] x[t,i]
        x->requires_grad = false;
        x->grad = NULL;
        w->requires_grad = true;
        y = ag_linear(&c, x, w);
        ck_assert_ok(ag_backward(&c, ag_sum(&c, ag_mul(&c, y, y))));
        ck_assert_ptr_null(x->grad);
        ck_assert_ptr_nonnull(w->grad);
        for (int64_t o = 0; o < 5; o++)
            for (int64_t i = 0; i < 4; i++) {
                double want = 0;
                for (int64_t t = 0; t < 3; t++)
                    want += 2 * ag_get(y, t * 5 + o) * ag_get(x, t * 4 + i);
                ck_assert_double_eq_tol(ag_get(w->grad, o * 4 + i), want, 1e-12);
            }
        ag_ctx_step_reset(&c);
        w->requires_grad = false;
        ck_assert_tensor(ag_linear(&c, x, w));
        ck_assert_int_eq(c.n_tape, 0);
        ck_assert_uint_eq(c.saved_bytes, 0);
        ag_ctx_free(&c);
        ag_arena_free(&p);
    }
    ag_set_reference_kernels(false);
}
END_TEST

START_TEST(test_linear_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    int64_t s3[3] = {2, 3, 4};
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, 2, 3), *w = ag_tensor_new2(&c.act, AG_F32, 4, 5);
    ag_tensor *w64 = ag_tensor_new2(&c.act, AG_F64, 4, 3);
    ag_tensor *w3 = ag_tensor_new(&c.act, AG_F32, 3, s3);
    ag_tensor *xi = ag_tensor_new2(&c.act, AG_I32, 2, 3);
    ag_tensor *xb = ag_tensor_new2(&c.act, AG_BF16, 2, 3);
    ck_assert_ptr_null(ag_linear(&c, x, w));
    ck_assert_str_eq(molt_err_msg(), "linear: x [2, 3] f32 does not match w [4, 5] f32: x's last "
                                     "dim must equal w's dim 1 (in features)");
    ck_assert_ptr_null(ag_linear(&c, x, w64));
    ck_assert_str_eq(molt_err_msg(), "linear: x [2, 3] f32 and w [4, 3] f64 differ in dtype");
    ck_assert_ptr_null(ag_linear(&c, x, w3));
    ck_assert_str_eq(molt_err_msg(), "linear: w is [2, 3, 4] f32, expected 2 dims");
    ck_assert_ptr_null(ag_linear(&c, xi, w));
    ck_assert_str_eq(molt_err_msg(),
                     "linear: x is [2, 3] i32, expected f32 or f64 (cast bf16/f16 first)");
    ck_assert_ptr_null(ag_linear(&c, xb, w));
    ck_assert_str_eq(molt_err_msg(),
                     "linear: x is [2, 3] bf16, expected f32 or f64 (cast bf16/f16 first)");
    ck_assert_ptr_null(ag_linear(&c, x, NULL));
    ck_assert_str_eq(molt_err_msg(), "linear: w is NULL");
    ck_assert_int_eq(c.n_tape, 0);
    ag_ctx_free(&c);
}
END_TEST

// ---- RMSNorm ------------------------------------------------------------------------------

typedef struct {
    double eps;
} rms_args;

static ag_tensor *build_rmsnorm(ag_ctx *c, ag_tensor **in, void *user) {
    return ag_rmsnorm(c, in[0], in[1], ((rms_args *)user)->eps);
}

// x used by the norm and again elementwise: dx must be the sum of both paths.
static ag_tensor *build_rmsnorm_twice(ag_ctx *c, ag_tensor **in, void *user) {
    return ag_add(c, ag_rmsnorm(c, in[0], in[1], ((rms_args *)user)->eps), ag_mul(c, in[0], in[0]));
}

typedef struct {
    int nd;
    int64_t x[4];
    double eps;
} rms_shape;

// With C = 1 the output is about sign(x) w unless eps is comparable to x^2: a large eps there
// gives a derivative that finite differences resolve.
static const rms_shape rms_shapes[] = {
    {1, {13}, 1e-6}, {2, {1, 1}, 0.3}, {2, {3, 5}, 1e-6}, {3, {2, 3, 7}, 0.1},
    {4, {2, 1, 3, 8}, 1e-6}, {2, {4, 33}, 0},
};

START_TEST(test_rmsnorm_gradcheck) {
    const rms_shape *s = &rms_shapes[_i];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 20 + (uint64_t)_i);
    int64_t C = s->x[s->nd - 1];
    ag_tensor *in[2] = {gc_rand(&a, &r, s->nd, s->x, -1, 1, true),
                        gc_rand(&a, &r, 1, &C, 0.5, 1.5, true)};
    rms_args args = {s->eps};
    gc_case g = {.n_in = 2, .in = in, .build = build_rmsnorm, .user = &args};
    check_grad(&g, numel_of(s->nd, s->x) + C);
    check_f32_and_fast(&g);
    g.build = build_rmsnorm_twice;
    check_grad(&g, numel_of(s->nd, s->x) + C);
    ag_arena_free(&a);
}
END_TEST

// Large enough for the OpenMP team (64 x 300 elements) and several dw column blocks with a
// partial last one, fast against reference only.
START_TEST(test_rmsnorm_fast_vs_ref_wide) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 77);
    int64_t xs[2] = {64, 300}, C = 300;
    ag_tensor *in[2] = {gc_rand(&a, &r, 2, xs, -2, 2, true), gc_rand(&a, &r, 1, &C, -1, 1, true)};
    rms_args args = {1e-6};
    gc_case g = {.n_in = 2, .in = in, .build = build_rmsnorm, .user = &args};
    double rel;
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "fast vs ref: %g", rel);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_rmsnorm_matches_definition_and_saves_rstd) {
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        for (int dt = 0; dt < 2; dt++) {
            ag_dtype dtype = dt ? AG_F64 : AG_F32;
            ag_ctx c;
            ag_ctx_init(&c);
            ag_rng r;
            ag_rng_seed(&r, 8);
            int64_t xs[3] = {2, 3, 10};
            ag_tensor *x = ag_tensor_new(&c.act, dtype, 3, xs);
            ag_tensor *w = ag_tensor_new1(&c.act, dtype, 10);
            ag_fill_uniform(x, &r, -3, 3);
            ag_fill_uniform(w, &r, -1, 1);
            w->requires_grad = true;
            double eps = 1e-3;
            ag_tensor *y = ag_rmsnorm(&c, x, w, eps);
            ck_assert_tensor(y);
            // one rstd per row, of the element type, and nothing else
            ck_assert_uint_eq(c.saved_bytes, 6 * ag_dtype_size(dtype));
            for (int64_t t = 0; t < 6; t++) {
                double ss = 0;
                for (int64_t j = 0; j < 10; j++)
                    ss += ag_get(x, t * 10 + j) * ag_get(x, t * 10 + j);
                double rs = 1 / sqrt(ss / 10 + eps);
                for (int64_t j = 0; j < 10; j++) {
                    double want = ag_get(x, t * 10 + j) * rs * ag_get(w, j);
                    double tol = dt ? 1e-14 : 1e-6 * fabs(want) + 1e-7;
                    ck_assert_double_eq_tol(ag_get(y, t * 10 + j), want, tol);
                }
            }
            // grad mode off: nothing recorded or saved
            ag_ctx_set_grad(&c, false);
            ck_assert_tensor(ag_rmsnorm(&c, x, w, eps));
            ck_assert_int_eq(c.n_tape, 1);
            ck_assert_uint_eq(c.saved_peak, 6 * ag_dtype_size(dtype));
            ag_ctx_free(&c);
        }
    }
    ag_set_reference_kernels(false);
}
END_TEST

// Only w trained (the usual case for a norm before a LoRA target is the opposite, but both
// must work): x gets no buffer.
START_TEST(test_rmsnorm_partial_grads) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_arena p;
    ag_arena_init(&p, "params", 0);
    ag_tensor *x = ag_tensor_new2(&p, AG_F64, 2, 3), *w = ag_tensor_new1(&p, AG_F64, 3);
    double xv[6] = {1, 2, 3, -1, 0, 4};
    for (int i = 0; i < 6; i++)
        ag_set(x, i, xv[i]);
    for (int i = 0; i < 3; i++)
        ag_set(w, i, 1);
    w->requires_grad = true;
    ck_assert_ok(ag_backward(&c, ag_sum(&c, ag_rmsnorm(&c, x, w, 0))));
    ck_assert_ptr_null(x->grad);
    // dL/dw_j = sum_t x[t,j] / rms_t with rms = sqrt(14/3) and sqrt(17/3)
    double r0 = sqrt(14.0 / 3), r1 = sqrt(17.0 / 3);
    for (int j = 0; j < 3; j++)
        ck_assert_double_eq_tol(ag_get(w->grad, j), xv[j] / r0 + xv[3 + j] / r1, 1e-14);
    ag_ctx_free(&c);
    ag_arena_free(&p);
}
END_TEST

START_TEST(test_rmsnorm_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, 2, 3), *w5 = ag_tensor_new1(&c.act, AG_F32, 5);
    ag_tensor *w2d = ag_tensor_new2(&c.act, AG_F32, 1, 3), *w64 = ag_tensor_new1(&c.act, AG_F64, 3);
    ag_tensor *w = ag_tensor_new1(&c.act, AG_F32, 3), *xi = ag_tensor_new2(&c.act, AG_I32, 2, 3);
    ck_assert_ptr_null(ag_rmsnorm(&c, x, w5, 1e-6));
    ck_assert_str_eq(molt_err_msg(), "rmsnorm: w [5] f32 does not match x [2, 3] f32: w must be "
                                     "[3], the size of x's last dim");
    ck_assert_ptr_null(ag_rmsnorm(&c, x, w2d, 1e-6));
    ck_assert_str_eq(molt_err_msg(), "rmsnorm: w [1, 3] f32 does not match x [2, 3] f32: w must "
                                     "be [3], the size of x's last dim");
    ck_assert_ptr_null(ag_rmsnorm(&c, x, w64, 1e-6));
    ck_assert_str_eq(molt_err_msg(), "rmsnorm: x [2, 3] f32 and w [3] f64 differ in dtype");
    ck_assert_ptr_null(ag_rmsnorm(&c, xi, w, 1e-6));
    ck_assert_str_eq(molt_err_msg(),
                     "rmsnorm: x is [2, 3] i32, expected f32 or f64 (cast bf16/f16 first)");
    ck_assert_ptr_null(ag_rmsnorm(&c, x, w, -1));
    ck_assert_str_eq(molt_err_msg(), "rmsnorm: eps must be finite and >= 0, got -1");
    ck_assert_ptr_null(ag_rmsnorm(&c, x, w, NAN));
    ck_assert_str_eq(molt_err_msg(), "rmsnorm: eps must be finite and >= 0, got nan");
    ck_assert_ptr_null(ag_rmsnorm(&c, NULL, w, 1e-6));
    ck_assert_str_eq(molt_err_msg(), "rmsnorm: x is NULL");
    ag_ctx_free(&c);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_linear");
    TCase *tc = tcase_create("linear");
    tcase_add_loop_test(tc, test_linear_gradcheck, 0,
                        (int)(sizeof linear_shapes / sizeof linear_shapes[0]));
    tcase_add_test(tc, test_linear_accumulates);
    tcase_add_test(tc, test_linear_matches_definition);
    tcase_add_test(tc, test_linear_frozen_weight);
    tcase_add_test(tc, test_linear_errors);
    suite_add_tcase(s, tc);
    TCase *tr = tcase_create("rmsnorm");
    tcase_add_loop_test(tr, test_rmsnorm_gradcheck, 0,
                        (int)(sizeof rms_shapes / sizeof rms_shapes[0]));
    tcase_add_test(tr, test_rmsnorm_fast_vs_ref_wide);
    tcase_add_test(tr, test_rmsnorm_matches_definition_and_saves_rstd);
    tcase_add_test(tr, test_rmsnorm_partial_grads);
    tcase_add_test(tr, test_rmsnorm_errors);
    suite_add_tcase(s, tr);
    return harness_run(s);
}
