// tests/test_ops_shape.c: cast, reshape, transpose, slice, split, concat and expand:
// forward values against index arithmetic written here, gradient checks, f32-vs-f64, the
// bf16 and i32 paths, and the exact error messages for bad operands.
#include "harness/harness.h"
#include "autograd/internal.h"

#include <math.h>
#include <string.h>

// ---- helpers ---------------------------------------------------------------------------

static void unravel(int64_t i, int nd, const int64_t *shape, int64_t *idx) {
    for (int k = nd - 1; k >= 0; k--) {
        idx[k] = i % shape[k];
        i /= shape[k];
    }
}

static int64_t ravel(int nd, const int64_t *shape, const int64_t *idx) {
    int64_t o = 0;
    for (int k = 0; k < nd; k++)
        o = o * shape[k] + idx[k];
    return o;
}

// Distinct small integers (negated every third, exact in every dtype) so that a misplaced
// element is always seen.
static ag_tensor *distinct(ag_arena *a, ag_dtype dt, int nd, const int64_t *shape) {
    ag_tensor *t = ag_tensor_new(a, dt, nd, shape);
    for (int64_t i = 0; t && i < t->numel; i++)
        ag_set(t, i, (i % 3 == 0 ? -1.0 : 1.0) * (double)(i + 1));
    return t;
}

static void expect_shape(const ag_tensor *t, int nd, const int64_t *shape) {
    ck_assert_int_eq(t->ndim, nd);
    for (int k = 0; k < nd; k++)
        ck_assert_int_eq(t->shape[k], shape[k]);
}

// Gradient check plus f32-vs-f64 on one case.
static void expect_grads(gc_case *g) {
    gc_result r;
    ck_assert_ok(gc_gradcheck(g, &r));
    ck_assert_int_gt(r.checked, 0);
    ck_assert_msg(r.max_rel <= 1e-6, "max rel %g at input %d elem %lld (%g vs %g)", r.max_rel,
                  r.worst_input, (long long)r.worst_elem, r.analytic, r.numeric);
    double rel;
    ck_assert_ok(gc_f32_vs_f64(g, &rel));
    ck_assert_double_le(rel, 1e-5);
}

// Attributes of the op under test, passed to the build functions.
typedef struct {
    int d0, d1;
    int64_t start, len;
    int n;
    int64_t sizes[4];
    int order[4];
    int nd;
    int64_t shape[4];
} op_args;

// ---- cast ------------------------------------------------------------------------------

START_TEST(test_cast_values) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new1(&c.act, AG_F64, 3);
    ag_set(x, 0, 1.0 / 3);
    ag_set(x, 1, -2.5);
    ag_set(x, 2, 0.1);
    ag_tensor *f = ag_cast(&c, x, AG_F32), *b = ag_cast(&c, x, AG_BF16);
    ag_tensor *h = ag_cast(&c, x, AG_F16);
    ck_assert_tensor(f);
    ck_assert_tensor(b);
    ck_assert_tensor(h);
    ck_assert_int_eq(b->dtype, AG_BF16);
    ck_assert_double_eq(ag_get(f, 0), (double)(float)(1.0 / 3));
    ck_assert_double_eq(ag_get(f, 2), (double)0.1f);
    // 1/3 = 1.010101...b x 2^-2: 8 significant bits round up to 1.0101011b (171/512),
    // 11 bits round down to 1.0101010101b (1365/4096)
    ck_assert_double_eq(ag_get(b, 0), 171.0 / 512);
    ck_assert_double_eq(ag_get(h, 0), 1365.0 / 4096);
    ck_assert_double_eq(ag_get(b, 1), -2.5);
    ck_assert_double_eq(ag_get(h, 1), -2.5);
    // f16 -> bf16 rounds 1.0101010101b up to 1.0101011b; bf16 -> f16 is exact
    ag_tensor *hb = ag_cast(&c, h, AG_BF16), *bh = ag_cast(&c, b, AG_F16);
    ck_assert_double_eq(ag_get(hb, 0), 171.0 / 512);
    ck_assert_double_eq(ag_get(bh, 0), 171.0 / 512);
    // back to f64 exactly, and a same-dtype cast is a copy
    ag_tensor *f64 = ag_cast(&c, f, AG_F64), *same = ag_cast(&c, x, AG_F64);
    for (int i = 0; i < 3; i++) {
        ck_assert_double_eq(ag_get(f64, i), ag_get(f, i));
        ck_assert_double_eq(ag_get(same, i), ag_get(x, i));
    }
    ck_assert_ptr_ne(same->data, x->data);
    ag_ctx_free(&c);
}
END_TEST

// L = sum(cast(...) * w) with w F64 constants: the gradient is w converted along the chain.
START_TEST(test_cast_backward) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_arena p;
    ag_arena_init(&p, "params", 0);
    ag_tensor *x = ag_tensor_new1(&p, AG_F32, 4), *w = ag_tensor_new1(&p, AG_F64, 4);
    x->requires_grad = true;
    // exact in f32 (so the two contributions add up the same in either order), not in bf16
    double wv[4] = {(float)(1.0 / 3), (float)-0.7, (float)1e-3, 2.0};
    for (int i = 0; i < 4; i++) {
        ag_set(x, i, i - 1.5);
        ag_set(w, i, wv[i]);
    }
    // used twice: f32 -> f64 directly, and f32 -> bf16 -> f64
    ag_tensor *y1 = ag_cast(&c, x, AG_F64);
    ag_tensor *y2 = ag_cast(&c, ag_cast(&c, x, AG_BF16), AG_F64);
    ag_tensor *l = ag_sum(&c, ag_add(&c, ag_mul(&c, y1, w), ag_mul(&c, y2, w)));
    ck_assert_tensor(l);
    ck_assert_ok(ag_backward(&c, l));
    ck_assert_int_eq(x->grad->dtype, AG_F32);
    for (int i = 0; i < 4; i++) {
        double via_bf16 = ag_bf16_to_f32(ag_f32_to_bf16((float)wv[i]));
        ck_assert_double_eq(ag_get(x->grad, i), (double)(float)(wv[i] + via_bf16));
    }
    // a bf16 leaf that requires grad gets a bf16 gradient (documented in ops_shape.c);
    // used twice, its two (bf16-exact) contributions add up
    ag_ctx_step_reset(&c);
    ag_tensor *xb = ag_tensor_new1(&p, AG_BF16, 4);
    xb->requires_grad = true;
    l = ag_sum(&c, ag_add(&c, ag_mul(&c, ag_cast(&c, xb, AG_F64), w),
                          ag_mul(&c, ag_cast(&c, ag_cast(&c, xb, AG_F32), AG_F64), w)));
    ck_assert_ok(ag_backward(&c, l));
    ck_assert_int_eq(xb->grad->dtype, AG_BF16);
    for (int i = 0; i < 4; i++)
        ck_assert_double_eq(ag_get(xb->grad, i),
                            2 * ag_bf16_to_f32(ag_f32_to_bf16((float)wv[i])));
    ag_ctx_free(&c);
    ag_arena_free(&p);
}
END_TEST

START_TEST(test_cast_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new1(&c.act, AG_F32, 2), *i = ag_tensor_new1(&c.act, AG_I32, 2);
    ck_assert_ptr_null(ag_cast(&c, i, AG_F32));
    ck_assert_str_eq(molt_err_msg(), "cast: a is [2] i32; cast converts between f32, f64, "
                                     "bf16 and f16");
    ck_assert_ptr_null(ag_cast(&c, x, AG_I32));
    ck_assert_str_eq(molt_err_msg(), "cast: target dtype i32 is not supported; cast converts "
                                     "between f32, f64, bf16 and f16");
    ck_assert_ptr_null(ag_cast(&c, x, (ag_dtype)9));
    ck_assert_str_eq(molt_err_msg(), "cast: unknown target dtype 9");
    ck_assert_ptr_null(ag_cast(&c, NULL, AG_F32));
    ck_assert_str_eq(molt_err_msg(), "cast: a is NULL");
    ag_ctx_free(&c);
}
END_TEST

// f64 -> f32 -> f64 times a second input. The inputs are multiples of 2^-8 in [-1, 1) and
// the step is 0.25, so every perturbed value is exact in f32: the finite difference of this
// (per input linear) function is exact and the check is not swamped by f32 rounding.
static ag_tensor *build_cast(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    ag_tensor *back = ag_cast(c, ag_cast(c, in[0], AG_F32), in[0]->dtype);
    return ag_mul(c, back, in[1]);
}

// For f32-vs-f64: a trip through bf16 and f16 gives the same values from either start.
static ag_tensor *build_cast_low(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    ag_tensor *t = ag_cast(c, ag_cast(c, in[0], AG_BF16), AG_F16);
    return ag_cast(c, t, in[0]->dtype);
}

static void dyadic(ag_tensor *t) {
    for (int64_t i = 0; i < t->numel; i++)
        ag_set(t, i, floor(ag_get(t, i) * 256) / 256);
}

START_TEST(test_gradcheck_cast) {
    int64_t shapes[4][4] = {{5}, {3, 7}, {2, 3, 5}, {2, 1, 3, 2}};
    for (int s = 0; s < 4; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 10 + s);
        ag_tensor *in[2] = {gc_rand(&a, &r, s + 1, shapes[s], -1, 1, true),
                            gc_rand(&a, &r, s + 1, shapes[s], -1, 1, true)};
        dyadic(in[0]);
        dyadic(in[1]);
        gc_case g = {.n_in = 2, .in = in, .build = build_cast, .eps = 0.25};
        expect_grads(&g);
        gc_case lo = {.n_in = 1, .in = in, .build = build_cast_low};
        double rel;
        ck_assert_ok(gc_f32_vs_f64(&lo, &rel));
        ck_assert_double_eq(rel, 0);
        ag_arena_free(&a);
    }
}
END_TEST

// ---- reshape ---------------------------------------------------------------------------

START_TEST(test_reshape_shares_data) {
    ag_ctx c;
    ag_ctx_init(&c);
    int64_t s[3] = {2, 3, 4}, s2[2] = {6, 4};
    ag_tensor *x = distinct(&c.act, AG_F32, 3, s), *ids = distinct(&c.act, AG_I32, 3, s);
    ag_tensor *y = ag_reshape(&c, x, 2, s2), *yi = ag_reshape(&c, ids, 2, s2);
    ck_assert_tensor(y);
    ck_assert_tensor(yi);
    expect_shape(y, 2, s2);
    ck_assert_int_eq(y->numel, 24);
    ck_assert_ptr_eq(y->data, x->data);
    ck_assert_int_eq(yi->dtype, AG_I32);
    ck_assert_int_eq(y->shape[2], 1); // unused dims read as 1, as for new tensors
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_reshape_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    int64_t s[2] = {2, 3}, bad[2] = {4, 2}, zero[2] = {6, 0}, big[2] = {INT64_MAX, 2};
    ag_tensor *x = ag_tensor_new(&c.act, AG_F32, 2, s);
    ck_assert_ptr_null(ag_reshape(&c, x, 2, bad));
    ck_assert_str_eq(molt_err_msg(), "reshape: cannot view [2, 3] f32 (6 elements) as [4, 2]");
    ck_assert_ptr_null(ag_reshape(&c, x, 5, bad));
    ck_assert_str_eq(molt_err_msg(), "reshape: 5 dims requested, expected 1..4");
    ck_assert_ptr_null(ag_reshape(&c, x, 2, zero));
    ck_assert_str_eq(molt_err_msg(), "reshape: new dim 1 has size 0, expected 1..6");
    ck_assert_ptr_null(ag_reshape(&c, x, 2, big));
    ck_assert_str_eq(molt_err_msg(),
                     "reshape: new dim 0 has size 9223372036854775807, expected 1..6");
    ck_assert_ptr_null(ag_reshape(&c, x, 2, NULL));
    ck_assert_str_eq(molt_err_msg(), "reshape: shape is NULL");
    ag_tensor *ids = ag_tensor_new(&c.act, AG_I32, 2, s);
    ids->requires_grad = true;
    ck_assert_ptr_null(ag_reshape(&c, ids, 1, (int64_t[]){6}));
    ck_assert_str_eq(molt_err_msg(), "reshape: a is [2, 3] i32 and requires grad; integer "
                                     "tensors are not differentiable");
    ag_ctx_free(&c);
}
END_TEST

// reshape(reshape(x) * w) + x: element order through both reshapes and accumulation into x.
static ag_tensor *build_reshape(ag_ctx *c, ag_tensor **in, void *user) {
    op_args *o = user;
    ag_tensor *x = in[0];
    ag_tensor *t = ag_mul(c, ag_reshape(c, x, o->nd, o->shape), in[1]);
    return ag_add(c, ag_reshape(c, t, x->ndim, x->shape), x);
}

START_TEST(test_gradcheck_reshape) {
    int64_t from[3][4] = {{12}, {3, 5}, {2, 3, 1, 7}};
    op_args to[3] = {{.nd = 3, .shape = {2, 3, 2}}, {.nd = 1, .shape = {15}},
                     {.nd = 2, .shape = {7, 6}}};
    int nds[3] = {1, 2, 4};
    for (int s = 0; s < 3; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 20 + s);
        ag_tensor *in[2] = {gc_rand(&a, &r, nds[s], from[s], -1, 1, true),
                            gc_rand(&a, &r, to[s].nd, to[s].shape, -1, 1, true)};
        gc_case g = {.n_in = 2, .in = in, .build = build_reshape, .user = &to[s]};
        expect_grads(&g);
        ag_arena_free(&a);
    }
}
END_TEST

// ---- transpose -------------------------------------------------------------------------

START_TEST(test_transpose_values) {
    int64_t shapes[4][4] = {{5}, {3, 4}, {2, 3, 5}, {2, 3, 1, 4}};
    ag_ctx c;
    ag_ctx_init(&c);
    for (int s = 0; s < 4; s++) {
        int nd = s + 1;
        for (int d0 = 0; d0 < nd; d0++)
            for (int d1 = 0; d1 < nd; d1++)
                for (int dt = 0; dt < 3; dt++) {
                    ag_dtype dts[3] = {AG_F64, AG_BF16, AG_I32};
                    ag_tensor *x = distinct(&c.act, dts[dt], nd, shapes[s]);
                    ag_tensor *y = ag_transpose(&c, x, d0, d1);
                    ck_assert_tensor(y);
                    int64_t want[4], idx[4];
                    memcpy(want, shapes[s], sizeof want);
                    want[d0] = shapes[s][d1];
                    want[d1] = shapes[s][d0];
                    expect_shape(y, nd, want);
                    ck_assert_int_eq(y->dtype, dts[dt]);
                    for (int64_t o = 0; o < y->numel; o++) {
                        unravel(o, nd, y->shape, idx);
                        int64_t t = idx[d0];
                        idx[d0] = idx[d1];
                        idx[d1] = t;
                        ck_assert_double_eq(ag_get(y, o), ag_get(x, ravel(nd, x->shape, idx)));
                    }
                }
    }
    ag_ctx_free(&c);
}
END_TEST

// transpose(x) * transpose(x): two nodes accumulate into x, every element moves.
static ag_tensor *build_transpose(ag_ctx *c, ag_tensor **in, void *user) {
    op_args *o = user;
    return ag_mul(c, ag_transpose(c, in[0], o->d0, o->d1), ag_transpose(c, in[0], o->d0, o->d1));
}

START_TEST(test_gradcheck_transpose) {
    int64_t shapes[4][4] = {{7}, {3, 5}, {2, 3, 5}, {2, 3, 2, 3}};
    int pairs[4][2] = {{0, 0}, {1, 0}, {0, 2}, {1, 3}};
    for (int s = 0; s < 4; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 30 + s);
        ag_tensor *in[1] = {gc_rand(&a, &r, s + 1, shapes[s], -1, 1, true)};
        op_args o = {.d0 = pairs[s][0], .d1 = pairs[s][1]};
        gc_case g = {.n_in = 1, .in = in, .build = build_transpose, .user = &o};
        expect_grads(&g);
        ag_arena_free(&a);
    }
}
END_TEST

static double bf16_round(double v) { return ag_bf16_to_f32(ag_f32_to_bf16((float)v)); }

// The bf16 backward path of the walks: x f32 -> bf16 -> two transposes concatenated -> f64,
// L = sum(y * w). The bf16 gradient of the cast output gets both contributions.
START_TEST(test_transpose_bf16_backward) {
    ag_ctx c;
    ag_ctx_init(&c);
    int64_t s[3] = {2, 3, 4}, st[3] = {4, 3, 2}, s2[3] = {8, 3, 2};
    ag_tensor *x = distinct(&c.act, AG_F32, 3, s), *w = distinct(&c.act, AG_F64, 3, s2);
    x->requires_grad = true;
    for (int64_t i = 0; i < w->numel; i++)
        ag_set(w, i, ag_get(w, i) / 7); // not representable in bf16: rounding shows
    ag_tensor *xb = ag_cast(&c, x, AG_BF16);
    ag_tensor *t2[2] = {ag_transpose(&c, xb, 0, 2), ag_transpose(&c, xb, 2, 0)};
    ag_tensor *y = ag_cast(&c, ag_concat(&c, 2, t2, 0), AG_F64);
    ck_assert_ok(ag_backward(&c, ag_sum(&c, ag_mul(&c, y, w))));
    int64_t idx[3];
    for (int64_t i = 0; i < x->numel; i++) {
        unravel(i, 3, s, idx);
        int64_t t = idx[0];
        idx[0] = idx[2];
        idx[2] = t;
        double wa = ag_get(w, ravel(3, st, idx)), wb = ag_get(w, 24 + ravel(3, st, idx));
        ck_assert_double_eq(ag_get(x->grad, i), bf16_round(bf16_round(wa) + bf16_round(wb)));
    }
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_transpose_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, 2, 3);
    ck_assert_ptr_null(ag_transpose(&c, x, 0, 2));
    ck_assert_str_eq(molt_err_msg(),
                     "transpose: dim 2 is out of range for [2, 3] f32 (expected 0..1)");
    ck_assert_ptr_null(ag_transpose(&c, x, -1, 0));
    ck_assert_str_eq(molt_err_msg(),
                     "transpose: dim -1 is out of range for [2, 3] f32 (expected 0..1)");
    ck_assert_ptr_null(ag_transpose(&c, NULL, 0, 1));
    ck_assert_str_eq(molt_err_msg(), "transpose: a is NULL");
    ag_ctx_free(&c);
}
END_TEST

// ---- slice and split -------------------------------------------------------------------

START_TEST(test_slice_values) {
    int64_t shapes[4][4] = {{6}, {3, 5}, {2, 4, 3}, {2, 3, 5, 2}};
    ag_ctx c;
    ag_ctx_init(&c);
    for (int s = 0; s < 4; s++) {
        int nd = s + 1;
        for (int dim = 0; dim < nd; dim++)
            for (int64_t start = 0; start < shapes[s][dim]; start++) {
                int64_t len = (shapes[s][dim] - start + 1) / 2, idx[4];
                ag_tensor *x = distinct(&c.act, s == 2 ? AG_I32 : AG_F32, nd, shapes[s]);
                ag_tensor *y = ag_slice(&c, x, dim, start, len);
                ck_assert_tensor(y);
                ck_assert_int_eq(y->shape[dim], len);
                for (int64_t o = 0; o < y->numel; o++) {
                    unravel(o, nd, y->shape, idx);
                    idx[dim] += start;
                    ck_assert_double_eq(ag_get(y, o), ag_get(x, ravel(nd, x->shape, idx)));
                }
            }
    }
    ag_ctx_free(&c);
}
END_TEST

static ag_tensor *build_slice(ag_ctx *c, ag_tensor **in, void *user) {
    op_args *o = user;
    return ag_slice(c, in[0], o->d0, o->start, o->len);
}

START_TEST(test_gradcheck_slice) {
    int64_t shapes[4][4] = {{7}, {3, 5}, {2, 5, 3}, {2, 3, 3, 2}};
    op_args args[4] = {{.d0 = 0, .start = 2, .len = 4}, {.d0 = 1, .start = 1, .len = 3},
                       {.d0 = 1, .start = 4, .len = 1}, {.d0 = 2, .start = 0, .len = 2}};
    for (int s = 0; s < 4; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 40 + s);
        ag_tensor *in[1] = {gc_rand(&a, &r, s + 1, shapes[s], -1, 1, true)};
        gc_case g = {.n_in = 1, .in = in, .build = build_slice, .user = &args[s]};
        expect_grads(&g);
        ag_arena_free(&a);
    }
}
END_TEST

START_TEST(test_slice_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, 2, 5);
    ck_assert_ptr_null(ag_slice(&c, x, 1, 3, 3));
    ck_assert_str_eq(molt_err_msg(), "slice: range [3, 3 + 3) is empty or outside dim 1 "
                                     "(size 5) of [2, 5] f32");
    ck_assert_ptr_null(ag_slice(&c, x, 1, -1, 2));
    ck_assert_str_eq(molt_err_msg(), "slice: range [-1, -1 + 2) is empty or outside dim 1 "
                                     "(size 5) of [2, 5] f32");
    ck_assert_ptr_null(ag_slice(&c, x, 0, 0, 0));
    ck_assert_str_eq(molt_err_msg(), "slice: range [0, 0 + 0) is empty or outside dim 0 "
                                     "(size 2) of [2, 5] f32");
    ck_assert_ptr_null(ag_slice(&c, x, 1, INT64_MAX, 2));
    ck_assert_ptr_null(ag_slice(&c, x, 2, 0, 1));
    ck_assert_str_eq(molt_err_msg(), "slice: dim 2 is out of range for [2, 5] f32 (expected "
                                     "0..1)");
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_split_values_and_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    int64_t s[3] = {2, 6, 3};
    ag_tensor *x = distinct(&c.act, AG_F64, 3, s), *outs[3];
    int64_t sizes[3] = {1, 3, 2};
    ck_assert_ok(ag_split(&c, x, 1, 3, sizes, outs));
    int64_t start = 0;
    for (int i = 0; i < 3; i++) {
        ag_tensor *want = ag_slice(&c, x, 1, start, sizes[i]);
        ck_assert_int_eq(outs[i]->shape[1], sizes[i]);
        ck_assert_double_eq(gc_max_rel_diff(outs[i], want), 0);
        start += sizes[i];
    }
    int64_t short_sizes[2] = {2, 3}, zero[2] = {6, 0};
    ck_assert_int_eq(ag_split(&c, x, 1, 2, short_sizes, outs), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "split: sizes sum to 5 but dim 1 of [2, 6, 3] f64 has "
                                     "size 6");
    ck_assert_int_eq(ag_split(&c, x, 1, 2, zero, outs), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "split: sizes[1] = 0, expected 1..6");
    ck_assert_int_eq(ag_split(&c, x, 1, 0, sizes, outs), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "split: n = 0, expected >= 1");
    ck_assert_int_eq(ag_split(&c, x, 1, 3, NULL, outs), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "split: sizes or outs is NULL");
    ck_assert_int_eq(ag_split(&c, x, 3, 3, sizes, outs), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "split: dim 3 is out of range for [2, 6, 3] f64 "
                                     "(expected 0..2)");
    ag_ctx_free(&c);
}
END_TEST

// Split, then reassemble the pieces in another order, dropping one: its part of the
// gradient must stay zero, the others must land where they came from.
static ag_tensor *build_split(ag_ctx *c, ag_tensor **in, void *user) {
    op_args *o = user;
    ag_tensor *p[4];
    if (ag_split(c, in[0], o->d0, o->n, o->sizes, p) != MOLT_OK)
        return NULL;
    ag_tensor *keep[4];
    for (int i = 0; i < o->n - 1; i++)
        keep[i] = p[o->order[i]];
    return ag_concat(c, o->n - 1, keep, o->d0);
}

START_TEST(test_gradcheck_split) {
    int64_t shapes[3][4] = {{9}, {3, 7}, {2, 3, 5, 2}};
    op_args args[3] = {{.d0 = 0, .n = 3, .sizes = {2, 4, 3}, .order = {2, 0}},
                       {.d0 = 1, .n = 4, .sizes = {1, 2, 3, 1}, .order = {3, 1, 0}},
                       {.d0 = 2, .n = 2, .sizes = {4, 1}, .order = {1}}};
    int nds[3] = {1, 2, 4};
    for (int s = 0; s < 3; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 50 + s);
        ag_tensor *in[1] = {gc_rand(&a, &r, nds[s], shapes[s], -1, 1, true)};
        gc_case g = {.n_in = 1, .in = in, .build = build_split, .user = &args[s]};
        expect_grads(&g);
        ag_arena_free(&a);
    }
}
END_TEST

// ---- concat ----------------------------------------------------------------------------

START_TEST(test_concat_values) {
    int64_t base[4][4] = {{4}, {3, 2}, {2, 3, 2}, {2, 1, 3, 2}};
    ag_ctx c;
    ag_ctx_init(&c);
    for (int s = 0; s < 4; s++) {
        int nd = s + 1;
        for (int dim = 0; dim < nd; dim++) {
            ag_tensor *xs[3];
            int64_t sh[4], total = 0, idx[4];
            for (int i = 0; i < 3; i++) {
                memcpy(sh, base[s], sizeof sh);
                sh[dim] = i + 1; // sizes 1, 2, 3 along dim
                total += sh[dim];
                xs[i] = distinct(&c.act, s == 1 ? AG_I32 : AG_F32, nd, sh);
                for (int64_t j = 0; j < xs[i]->numel; j++)
                    ag_set(xs[i], j, ag_get(xs[i], j) + 100 * i);
            }
            ag_tensor *y = ag_concat(&c, 3, xs, dim);
            ck_assert_tensor(y);
            ck_assert_int_eq(y->shape[dim], total);
            for (int64_t o = 0; o < y->numel; o++) {
                unravel(o, nd, y->shape, idx);
                int k = 0;
                while (idx[dim] >= xs[k]->shape[dim])
                    idx[dim] -= xs[k++]->shape[dim];
                ck_assert_double_eq(ag_get(y, o), ag_get(xs[k], ravel(nd, xs[k]->shape, idx)));
            }
        }
    }
    ag_ctx_free(&c);
}
END_TEST

static ag_tensor *build_concat(ag_ctx *c, ag_tensor **in, void *user) {
    op_args *o = user;
    return ag_concat(c, o->n, in, o->d0);
}

START_TEST(test_gradcheck_concat) {
    // three inputs differing along dim; the middle one does not require grad
    int64_t base[4][4] = {{3}, {3, 5}, {2, 3, 5}, {2, 3, 2, 2}};
    int dims[4] = {0, 1, 0, 3};
    for (int s = 0; s < 4; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 60 + s);
        ag_tensor *in[3];
        for (int i = 0; i < 3; i++) {
            int64_t sh[4];
            memcpy(sh, base[s], sizeof sh);
            sh[dims[s]] += i;
            in[i] = gc_rand(&a, &r, s + 1, sh, -1, 1, i != 1);
        }
        op_args o = {.n = 3, .d0 = dims[s]};
        gc_case g = {.n_in = 3, .in = in, .build = build_concat, .user = &o};
        expect_grads(&g);
        ag_arena_free(&a);
    }
}
END_TEST

START_TEST(test_concat_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *a = ag_tensor_new2(&c.act, AG_F32, 2, 3), *b = ag_tensor_new2(&c.act, AG_F32, 3, 4);
    ag_tensor *d = ag_tensor_new2(&c.act, AG_F64, 2, 3), *e = ag_tensor_new1(&c.act, AG_F32, 3);
    ck_assert_ptr_null(ag_concat(&c, 2, (ag_tensor *[]){a, b}, 0));
    ck_assert_str_eq(molt_err_msg(), "concat: xs[0] [2, 3] f32 and xs[1] [3, 4] f32 differ "
                                     "outside dim 0");
    ck_assert_ptr_null(ag_concat(&c, 2, (ag_tensor *[]){a, e}, 0));
    ck_assert_str_eq(molt_err_msg(), "concat: xs[0] [2, 3] f32 and xs[1] [3] f32 differ "
                                     "outside dim 0");
    ck_assert_ptr_null(ag_concat(&c, 2, (ag_tensor *[]){a, d}, 0));
    ck_assert_str_eq(molt_err_msg(), "concat: xs[0] [2, 3] f32 and xs[1] [2, 3] f64 differ "
                                     "in dtype");
    ck_assert_ptr_null(ag_concat(&c, 2, (ag_tensor *[]){a, NULL}, 0));
    ck_assert_str_eq(molt_err_msg(), "concat: xs[1] is NULL");
    ck_assert_ptr_null(ag_concat(&c, 2, (ag_tensor *[]){a, a}, 2));
    ck_assert_str_eq(molt_err_msg(), "concat: dim 2 is out of range for [2, 3] f32 (expected "
                                     "0..1)");
    ck_assert_ptr_null(ag_concat(&c, 0, (ag_tensor *[]){a}, 0));
    ck_assert_str_eq(molt_err_msg(), "concat: n = 0, expected >= 1");
    ck_assert_ptr_null(ag_concat(&c, 1, NULL, 0));
    ck_assert_str_eq(molt_err_msg(), "concat: xs is NULL");
    // a single input is a copy
    ag_tensor *y = ag_concat(&c, 1, (ag_tensor *[]){b}, 1);
    ck_assert_tensor(y);
    ck_assert_double_eq(gc_max_rel_diff(y, b), 0);
    ag_ctx_free(&c);
}
END_TEST

// ---- expand ----------------------------------------------------------------------------

START_TEST(test_expand_values_and_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    int64_t shapes[4][4] = {{1}, {3, 1}, {2, 1, 3}, {2, 3, 2, 1}}, idx[4];
    int dims[4] = {0, 1, 1, 3};
    for (int s = 0; s < 4; s++) {
        int nd = s + 1, d = dims[s];
        ag_tensor *x = distinct(&c.act, s == 1 ? AG_BF16 : AG_F32, nd, shapes[s]);
        ag_tensor *y = ag_expand(&c, x, d, 4);
        ck_assert_tensor(y);
        int64_t want[4];
        memcpy(want, shapes[s], sizeof want);
        want[d] = 4;
        expect_shape(y, nd, want);
        for (int64_t o = 0; o < y->numel; o++) {
            unravel(o, nd, y->shape, idx);
            idx[d] = 0;
            ck_assert_double_eq(ag_get(y, o), ag_get(x, ravel(nd, shapes[s], idx)));
        }
    }
    int64_t s[3] = {2, 1, 3};
    ag_tensor *x = distinct(&c.act, AG_F32, 3, s);
    ck_assert_ptr_null(ag_expand(&c, x, 2, 4));
    ck_assert_str_eq(molt_err_msg(), "expand: dim 2 of [2, 1, 3] f32 has size 3, expected 1");
    ck_assert_ptr_null(ag_expand(&c, x, 1, 0));
    ck_assert_str_eq(molt_err_msg(), "expand: n = 0, expected >= 1");
    ck_assert_ptr_null(ag_expand(&c, x, 3, 2));
    ck_assert_str_eq(molt_err_msg(), "expand: dim 3 is out of range for [2, 1, 3] f32 "
                                     "(expected 0..2)");
    ag_ctx_free(&c);
}
END_TEST

static ag_tensor *build_expand(ag_ctx *c, ag_tensor **in, void *user) {
    op_args *o = user;
    return ag_mul(c, ag_expand(c, in[0], o->d0, o->len), in[1]);
}

START_TEST(test_gradcheck_expand) {
    int64_t shapes[4][4] = {{1}, {3, 1}, {1, 3, 5}, {2, 3, 1, 2}};
    op_args args[4] = {{.d0 = 0, .len = 5}, {.d0 = 1, .len = 7}, {.d0 = 0, .len = 3},
                       {.d0 = 2, .len = 3}};
    for (int s = 0; s < 4; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 70 + s);
        int64_t big[4];
        memcpy(big, shapes[s], sizeof big);
        big[args[s].d0] = args[s].len;
        ag_tensor *in[2] = {gc_rand(&a, &r, s + 1, shapes[s], -1, 1, true),
                            gc_rand(&a, &r, s + 1, big, -1, 1, true)};
        gc_case g = {.n_in = 2, .in = in, .build = build_expand, .user = &args[s]};
        expect_grads(&g);
        ag_arena_free(&a);
    }
}
END_TEST

// ---- recording -------------------------------------------------------------------------

START_TEST(test_shape_ops_record_only_when_needed) {
    ag_ctx c;
    ag_ctx_init(&c);
    int64_t s[2] = {2, 3};
    ag_tensor *x = distinct(&c.act, AG_F32, 2, s), *outs[2];
    ag_tensor *y[6] = {ag_cast(&c, x, AG_F64), ag_reshape(&c, x, 1, (int64_t[]){6}),
                       ag_transpose(&c, x, 0, 1), ag_slice(&c, x, 1, 1, 2),
                       ag_concat(&c, 2, (ag_tensor *[]){x, x}, 0),
                       ag_expand(&c, ag_slice(&c, x, 0, 0, 1), 0, 3)};
    ck_assert_ok(ag_split(&c, x, 0, 2, (int64_t[]){1, 1}, outs));
    for (int i = 0; i < 6; i++) {
        ck_assert_tensor(y[i]);
        ck_assert(!y[i]->requires_grad);
    }
    ck_assert_int_eq(c.n_tape, 0);
    x->requires_grad = true;
    ck_assert_tensor(ag_transpose(&c, x, 0, 1));
    ck_assert_ok(ag_split(&c, x, 1, 2, (int64_t[]){1, 2}, outs));
    ck_assert_int_eq(c.n_tape, 3); // one transpose and a slice node per piece
    ck_assert(outs[1]->requires_grad);
    ck_assert_uint_eq(c.saved_bytes, 0);
    ag_ctx_free(&c);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_shape");
    TCase *tc = tcase_create("shape");
    tcase_add_test(tc, test_cast_values);
    tcase_add_test(tc, test_cast_backward);
    tcase_add_test(tc, test_cast_errors);
    tcase_add_test(tc, test_gradcheck_cast);
    tcase_add_test(tc, test_reshape_shares_data);
    tcase_add_test(tc, test_reshape_errors);
    tcase_add_test(tc, test_gradcheck_reshape);
    tcase_add_test(tc, test_transpose_values);
    tcase_add_test(tc, test_gradcheck_transpose);
    tcase_add_test(tc, test_transpose_bf16_backward);
    tcase_add_test(tc, test_transpose_errors);
    tcase_add_test(tc, test_slice_values);
    tcase_add_test(tc, test_gradcheck_slice);
    tcase_add_test(tc, test_slice_errors);
    tcase_add_test(tc, test_split_values_and_errors);
    tcase_add_test(tc, test_gradcheck_split);
    tcase_add_test(tc, test_concat_values);
    tcase_add_test(tc, test_gradcheck_concat);
    tcase_add_test(tc, test_concat_errors);
    tcase_add_test(tc, test_expand_values_and_errors);
    tcase_add_test(tc, test_gradcheck_expand);
    tcase_add_test(tc, test_shape_ops_record_only_when_needed);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
