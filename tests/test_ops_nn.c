// tests/test_ops_nn.c: softmax, swiglu, embedding and dropout: forward values against
// formulas written here, gradient checks, f32-vs-f64, OpenMP kernels against the reference
// ones, dropout's mask reproducibility and statistics, and exact error messages.
#include "harness/harness.h"
#include "autograd/internal.h"

#include <math.h>
#include <string.h>

// Gradient check of both kernel sets (the reference ones are the ground truth the optimized
// ones are compared with), then f32 against f64.
static void expect_gradcheck(gc_case *g) {
    for (int ref = 1; ref >= 0; ref--) {
        ag_set_reference_kernels(ref);
        gc_result r;
        ck_assert_ok(gc_gradcheck(g, &r));
        ck_assert_int_gt(r.checked, 0);
        ck_assert_msg(r.max_rel <= 1e-6, "%s kernels: max rel %g at input %d elem %lld (%g vs "
                      "%g)", ref ? "reference" : "optimized", r.max_rel, r.worst_input,
                      (long long)r.worst_elem, r.analytic, r.numeric);
    }
    double rel;
    ck_assert_ok(gc_f32_vs_f64(g, &rel));
    ck_assert_double_le(rel, 1e-5);
}

static void expect_fast_matches_ref(gc_case *g) {
    double rel;
    ck_assert_ok(gc_fast_vs_ref(g, &rel));
    ck_assert_double_le(rel, 1e-5);
}

// Shapes with 1..4 dims and odd sizes, shared by the softmax and swiglu checks.
static const int64_t shapes[5][4] = {{1}, {7}, {3, 5}, {2, 3, 4}, {2, 2, 3, 5}};
static const int nds[5] = {1, 1, 2, 3, 4};

// ---- softmax ---------------------------------------------------------------------------

static ag_tensor *build_softmax(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    return ag_softmax(c, in[0]);
}

// y_j = 1 / sum_k exp(x_k - x_j): no max, no normalizing pass, so not the kernel's recipe.
START_TEST(test_softmax_values) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_rng r;
    ag_rng_seed(&r, 1);
    for (int s = 0; s < 5; s++) {
        ag_tensor *x = gc_rand(&c.act, &r, nds[s], shapes[s], -3, 3, false);
        ag_tensor *y = ag_softmax(&c, x);
        ck_assert_tensor(y);
        ck_assert(ag_same_shape(x, y));
        int64_t cols = shapes[s][nds[s] - 1];
        for (int64_t row = 0; row < x->numel / cols; row++) {
            double total = 0;
            for (int64_t j = 0; j < cols; j++) {
                double den = 0, xj = ag_get(x, row * cols + j);
                for (int64_t k = 0; k < cols; k++)
                    den += exp(ag_get(x, row * cols + k) - xj);
                double got = ag_get(y, row * cols + j);
                ck_assert_double_le(fabs(got - 1 / den), 1e-15);
                total += got;
            }
            ck_assert_double_le(fabs(total - 1), 1e-14);
        }
    }
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_softmax_stable_for_large_inputs) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, 2, 3);
    double v[6] = {1000, 1001, 1002, -1e30, 0, -1e30};
    for (int i = 0; i < 6; i++)
        ag_set(x, i, v[i]);
    ag_tensor *y = ag_softmax(&c, x);
    ck_assert_tensor(y);
    double e1 = exp(-1.0), e2 = exp(-2.0), den = 1 + e1 + e2;
    ck_assert_double_le(fabs(ag_get(y, 0) - e2 / den), 1e-7);
    ck_assert_double_le(fabs(ag_get(y, 1) - e1 / den), 1e-7);
    ck_assert_double_le(fabs(ag_get(y, 2) - 1 / den), 1e-7);
    ck_assert_double_eq(ag_get(y, 3), 0);
    ck_assert_double_eq(ag_get(y, 4), 1);
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_gradcheck_softmax) {
    for (int s = 0; s < 5; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 10 + s);
        ag_tensor *in[1] = {gc_rand(&a, &r, nds[s], shapes[s], -2, 2, true)};
        gc_case g = {.n_in = 1, .in = in, .build = build_softmax};
        expect_gradcheck(&g);
        ag_arena_free(&a);
    }
}
END_TEST

START_TEST(test_softmax_fast_vs_ref) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 3);
    int64_t big[2] = {70, 600}; // above the kernels' parallel threshold
    ag_tensor *in[1] = {gc_rand(&a, &r, 2, big, -4, 4, true)};
    gc_case g = {.n_in = 1, .in = in, .build = build_softmax};
    expect_fast_matches_ref(&g);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_softmax_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ck_assert_ptr_null(ag_softmax(&c, ag_tensor_new2(&c.act, AG_BF16, 2, 3)));
    ck_assert_str_eq(molt_err_msg(), "softmax: x is [2, 3] bf16, expected f32 or f64 (cast "
                                     "bf16/f16 first)");
    ck_assert_ptr_null(ag_softmax(&c, NULL));
    ck_assert_str_eq(molt_err_msg(), "softmax: x is NULL");
    ag_ctx_free(&c);
}
END_TEST

// ---- swiglu ----------------------------------------------------------------------------

static ag_tensor *build_swiglu(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    return ag_swiglu(c, in[0], in[1]);
}

START_TEST(test_swiglu_values) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_rng r;
    ag_rng_seed(&r, 2);
    for (int s = 0; s < 5; s++) {
        ag_tensor *g = gc_rand(&c.act, &r, nds[s], shapes[s], -4, 4, false);
        ag_tensor *u = gc_rand(&c.act, &r, nds[s], shapes[s], -2, 2, false);
        ag_tensor *y = ag_swiglu(&c, g, u);
        ck_assert_tensor(y);
        for (int64_t i = 0; i < y->numel; i++) {
            double gv = ag_get(g, i), want = gv * ag_get(u, i) / (1 + exp(-gv));
            ck_assert_double_le(fabs(ag_get(y, i) - want), 1e-15);
        }
    }
    // saturated gates stay finite, forward and backward
    ag_tensor *g = ag_tensor_new1(&c.act, AG_F32, 2), *u = ag_tensor_new1(&c.act, AG_F32, 2);
    g->requires_grad = u->requires_grad = true;
    ag_set(g, 0, -1000);
    ag_set(g, 1, 1000);
    ag_set(u, 0, 2);
    ag_set(u, 1, 3);
    ag_tensor *y = ag_swiglu(&c, g, u);
    ck_assert_double_eq(ag_get(y, 0), 0);
    ck_assert_double_eq(ag_get(y, 1), 3000);
    ck_assert_ok(ag_backward(&c, ag_sum(&c, y)));
    ck_assert_double_eq(ag_get(g->grad, 0), 0);
    ck_assert_double_eq(ag_get(g->grad, 1), 3);
    ck_assert_double_eq(ag_get(u->grad, 1), 1000);
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_gradcheck_swiglu) {
    for (int s = 0; s < 5; s++) {
        for (int which = 0; which < 3; which++) { // both inputs, only gate, only up
            ag_arena a;
            ag_arena_init(&a, "t", 0);
            ag_rng r;
            ag_rng_seed(&r, 20 + s);
            ag_tensor *in[2] = {gc_rand(&a, &r, nds[s], shapes[s], -3, 3, which != 2),
                                gc_rand(&a, &r, nds[s], shapes[s], -2, 2, which != 1)};
            gc_case g = {.n_in = 2, .in = in, .build = build_swiglu};
            expect_gradcheck(&g);
            ag_arena_free(&a);
        }
    }
}
END_TEST

START_TEST(test_swiglu_fast_vs_ref) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 4);
    int64_t big[2] = {9, 4999}; // odd total, several parallel blocks and a short last one
    ag_tensor *in[2] = {gc_rand(&a, &r, 2, big, -5, 5, true), gc_rand(&a, &r, 2, big, -2, 2, true)};
    gc_case g = {.n_in = 2, .in = in, .build = build_swiglu};
    expect_fast_matches_ref(&g);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_swiglu_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *a = ag_tensor_new2(&c.act, AG_F32, 2, 3), *b = ag_tensor_new2(&c.act, AG_F32, 3, 2);
    ag_tensor *d = ag_tensor_new2(&c.act, AG_F64, 2, 3), *h = ag_tensor_new2(&c.act, AG_F16, 2, 3);
    ck_assert_ptr_null(ag_swiglu(&c, a, b));
    ck_assert_str_eq(molt_err_msg(), "swiglu: shapes differ: gate [2, 3] f32, up [3, 2] f32");
    ck_assert_ptr_null(ag_swiglu(&c, a, d));
    ck_assert_str_eq(molt_err_msg(), "swiglu: gate [2, 3] f32 and up [2, 3] f64 differ in "
                                     "dtype");
    ck_assert_ptr_null(ag_swiglu(&c, a, h));
    ck_assert_str_eq(molt_err_msg(), "swiglu: up is [2, 3] f16, expected f32 or f64 (cast "
                                     "bf16/f16 first)");
    ag_ctx_free(&c);
}
END_TEST

// ---- embedding -------------------------------------------------------------------------

static ag_tensor *ids_new(ag_arena *a, int nd, const int64_t *shape, int64_t v, ag_rng *r) {
    ag_tensor *t = ag_tensor_new(a, AG_I32, nd, shape);
    for (int64_t i = 0; t && i < t->numel; i++)
        ag_set(t, i, (double)(ag_rng_next(r) % (uint64_t)v));
    return t;
}

static ag_tensor *build_embedding(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    return ag_embedding(c, in[0], in[1]);
}

START_TEST(test_embedding_values) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_rng r;
    ag_rng_seed(&r, 5);
    int64_t ids_shapes[3][3] = {{5}, {2, 3}, {2, 2, 3}};
    int64_t tshape[2] = {6, 4};
    ag_tensor *table = gc_rand(&c.act, &r, 2, tshape, -1, 1, false);
    for (int s = 0; s < 3; s++) {
        ag_tensor *ids = ids_new(&c.act, s + 1, ids_shapes[s], 6, &r);
        ag_tensor *y = ag_embedding(&c, table, ids);
        ck_assert_tensor(y);
        ck_assert_int_eq(y->ndim, s + 2);
        for (int k = 0; k <= s; k++)
            ck_assert_int_eq(y->shape[k], ids_shapes[s][k]);
        ck_assert_int_eq(y->shape[s + 1], 4);
        for (int64_t t = 0; t < ids->numel; t++)
            for (int64_t j = 0; j < 4; j++)
                ck_assert_double_eq(ag_get(y, t * 4 + j),
                                    ag_get(table, (int64_t)ag_get(ids, t) * 4 + j));
    }
    ck_assert_int_eq(c.n_tape, 0); // a frozen table records nothing
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_gradcheck_embedding) {
    // small vocabularies so that ids repeat and their gradients must add up
    int64_t tshapes[3][2] = {{4, 3}, {7, 5}, {3, 2}}, ids_shapes[3][3] = {{6}, {2, 5}, {2, 2, 3}};
    for (int s = 0; s < 3; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 30 + s);
        ag_tensor *in[2] = {gc_rand(&a, &r, 2, tshapes[s], -1, 1, true),
                            ids_new(&a, s + 1, ids_shapes[s], tshapes[s][0], &r)};
        gc_case g = {.n_in = 2, .in = in, .build = build_embedding};
        expect_gradcheck(&g);
        ag_arena_free(&a);
    }
}
END_TEST

START_TEST(test_embedding_fast_vs_ref) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 6);
    int64_t tshape[2] = {50, 700}, ids_shape[2] = {4, 16};
    ag_tensor *in[2] = {gc_rand(&a, &r, 2, tshape, -1, 1, true),
                        ids_new(&a, 2, ids_shape, 50, &r)};
    gc_case g = {.n_in = 2, .in = in, .build = build_embedding};
    expect_fast_matches_ref(&g);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_embedding_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *table = ag_tensor_new2(&c.act, AG_F32, 50, 8);
    ag_tensor *ids = ag_tensor_new2(&c.act, AG_I32, 2, 4);
    ag_set(ids, 5, 50);
    ck_assert_ptr_null(ag_embedding(&c, table, ids));
    ck_assert_str_eq(molt_err_msg(), "embedding: id 50 at position 5 of ids [2, 4] i32 is out "
                                     "of range for table [50, 8] f32 (valid ids 0..49)");
    ag_set(ids, 5, 0);
    ag_set(ids, 2, -1);
    ck_assert_ptr_null(ag_embedding(&c, table, ids));
    ck_assert_str_eq(molt_err_msg(), "embedding: id -1 at position 2 of ids [2, 4] i32 is out "
                                     "of range for table [50, 8] f32 (valid ids 0..49)");
    ck_assert_ptr_null(ag_embedding(&c, table, ag_tensor_new1(&c.act, AG_F32, 3)));
    ck_assert_str_eq(molt_err_msg(), "embedding: ids is [3] f32, expected i32");
    ck_assert_ptr_null(ag_embedding(&c, ag_tensor_new1(&c.act, AG_F32, 3), ids));
    ck_assert_str_eq(molt_err_msg(), "embedding: table is [3] f32, expected 2 dims");
    ck_assert_ptr_null(ag_embedding(&c, ag_tensor_new2(&c.act, AG_BF16, 5, 2), ids));
    ck_assert_str_eq(molt_err_msg(), "embedding: table is [5, 2] bf16, expected f32 or f64 "
                                     "(cast bf16/f16 first)");
    int64_t s4[4] = {1, 1, 1, 2};
    ck_assert_ptr_null(ag_embedding(&c, table, ag_tensor_new(&c.act, AG_I32, 4, s4)));
    ck_assert_str_eq(molt_err_msg(), "embedding: ids is [1, 1, 1, 2] i32, expected 1..3 dims");
    ag_ctx_free(&c);
}
END_TEST

// ---- dropout ---------------------------------------------------------------------------

typedef struct {
    double p;
    uint64_t seed;
} drop_args;

// Re-seeds on every call: each finite-difference evaluation sees the same mask.
static ag_tensor *build_dropout(ag_ctx *c, ag_tensor **in, void *user) {
    drop_args *d = user;
    ag_rng r;
    ag_rng_seed(&r, d->seed);
    return ag_dropout(c, in[0], d->p, &r);
}

START_TEST(test_dropout_reproducible) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new1(&c.act, AG_F32, 1000);
    for (int64_t i = 0; i < x->numel; i++)
        ag_set(x, i, 1 + i % 7);
    ag_rng r1, r2, r3, step;
    ag_rng_seed(&r1, 7);
    ag_rng_seed(&r2, 7);
    ag_rng_seed(&r3, 8);
    step = r1;
    ag_rng_next(&step);
    ag_tensor *y1 = ag_dropout(&c, x, 0.4, &r1), *y2 = ag_dropout(&c, x, 0.4, &r2);
    ag_tensor *y3 = ag_dropout(&c, x, 0.4, &r3);
    ck_assert_tensor(y1);
    ck_assert_int_eq(memcmp(y1->data, y2->data, 4000), 0);
    ck_assert_int_ne(memcmp(y1->data, y3->data, 4000), 0);
    // the caller's generator advanced by exactly one draw
    ck_assert_int_eq(memcmp(&r1, &step, sizeof step), 0);
    // the next call from the advanced generator draws a different mask
    ag_tensor *y4 = ag_dropout(&c, x, 0.4, &r1);
    ck_assert_int_ne(memcmp(y1->data, y4->data, 4000), 0);
    // p = 0 is an exact copy and still takes its one draw
    step = r1;
    ag_rng_next(&step);
    ag_tensor *y0 = ag_dropout(&c, x, 0, &r1);
    ck_assert_int_eq(memcmp(y0->data, x->data, 4000), 0);
    ck_assert_int_eq(memcmp(&r1, &step, sizeof step), 0);
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_dropout_statistics) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_rng r;
    ag_rng_seed(&r, 9);
    int64_t n = 20000;
    ag_tensor *x = gc_rand(&c.act, &r, 1, &n, 0.5, 1.5, false);
    ag_tensor *x32 = gc_clone(&c.act, x, AG_F32);
    double ps[3] = {0.1, 0.5, 0.9};
    for (int k = 0; k < 3; k++) {
        ag_tensor *ys[2] = {ag_dropout(&c, x, ps[k], &r), ag_dropout(&c, x32, ps[k], &r)};
        for (int v = 0; v < 2; v++) {
            ck_assert_tensor(ys[v]);
            int64_t kept = 0;
            for (int64_t i = 0; i < n; i++) {
                double y = ag_get(ys[v], i), want = ag_get(v ? x32 : x, i) / (1 - ps[k]);
                if (y == 0)
                    continue;
                kept++;
                ck_assert_double_le(fabs(y - want), (v ? 2e-7 : 1e-15) * want);
            }
            // binomial standard deviation is at most 0.0036 here: 0.02 is over 5 of them
            ck_assert_double_le(fabs((double)kept / n - (1 - ps[k])), 0.02);
        }
    }
    ag_ctx_free(&c);
}
END_TEST

// Backward regenerates the forward mask: dx = dy / (1 - p) exactly where y survived.
START_TEST(test_dropout_backward_same_mask) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_arena p;
    ag_arena_init(&p, "params", 0);
    ag_rng r;
    ag_rng_seed(&r, 11);
    int64_t n = 257;
    ag_tensor *x = gc_rand(&p, &r, 1, &n, 0.5, 1.5, true), *w = gc_rand(&p, &r, 1, &n, -1, 1, false);
    double prob = 0.3;
    ag_tensor *y = ag_dropout(&c, x, prob, &r);
    ck_assert_tensor(y);
    ck_assert_uint_eq(c.saved_bytes, sizeof(ag_rng)); // the generator, never the mask
    ag_rng after = r;
    ck_assert_ok(ag_backward(&c, ag_sum(&c, ag_mul(&c, y, w))));
    ck_assert_int_eq(memcmp(&after, &r, sizeof r), 0); // backward used its own copy
    ck_assert_uint_eq(c.saved_bytes, 0);
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) {
        double want = ag_get(y, i) != 0 ? ag_get(w, i) / (1 - prob) : 0;
        ck_assert_double_le(fabs(ag_get(x->grad, i) - want), 1e-15);
        kept += ag_get(y, i) != 0;
    }
    ck_assert_int_gt(kept, 0);
    ck_assert_int_lt(kept, n);
    ag_ctx_free(&c);
    ag_arena_free(&p);
}
END_TEST

START_TEST(test_gradcheck_dropout) {
    double ps[5] = {0.3, 0.5, 0.0, 0.3, 0.7};
    for (int s = 0; s < 5; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 40 + s);
        ag_tensor *in[1] = {gc_rand(&a, &r, nds[s], shapes[s], -1, 1, true)};
        drop_args d = {.p = ps[s], .seed = 100 + (uint64_t)s};
        gc_case g = {.n_in = 1, .in = in, .build = build_dropout, .user = &d};
        expect_gradcheck(&g);
        ag_arena_free(&a);
    }
}
END_TEST

START_TEST(test_dropout_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_rng r, before;
    ag_rng_seed(&r, 1);
    before = r;
    ag_tensor *x = ag_tensor_new1(&c.act, AG_F32, 3);
    ck_assert_ptr_null(ag_dropout(&c, x, 1, &r));
    ck_assert_str_eq(molt_err_msg(), "dropout: p = 1 is outside [0, 1)");
    ck_assert_ptr_null(ag_dropout(&c, x, -0.1, &r));
    ck_assert_str_eq(molt_err_msg(), "dropout: p = -0.1 is outside [0, 1)");
    ck_assert_ptr_null(ag_dropout(&c, x, NAN, &r));
    ck_assert_str_eq(molt_err_msg(), "dropout: p = nan is outside [0, 1)");
    ck_assert_ptr_null(ag_dropout(&c, x, 0.5, NULL));
    ck_assert_str_eq(molt_err_msg(), "dropout: rng is NULL");
    ck_assert_ptr_null(ag_dropout(&c, ag_tensor_new1(&c.act, AG_I32, 3), 0.5, &r));
    ck_assert_str_eq(molt_err_msg(), "dropout: a is [3] i32, expected f32 or f64 (cast "
                                     "bf16/f16 first)");
    ck_assert_int_eq(memcmp(&r, &before, sizeof r), 0);
    // out of memory while saving the generator: NULL, and the caller's stream is untouched
    x->requires_grad = true;
    ck_assert_tensor(ag_dropout(&c, x, 0.5, &r)); // warm up the tape and the arena
    before = r;
    molt_alloc_fail_after(1); // 0: the node, 1: its saved state
    ck_assert_ptr_null(ag_dropout(&c, x, 0.5, &r));
    molt_alloc_fail_after(-1);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "out of memory saving"));
    ck_assert_int_eq(memcmp(&r, &before, sizeof r), 0);
    ag_ctx_free(&c);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_nn");
    TCase *tc = tcase_create("nn");
    tcase_add_test(tc, test_softmax_values);
    tcase_add_test(tc, test_softmax_stable_for_large_inputs);
    tcase_add_test(tc, test_gradcheck_softmax);
    tcase_add_test(tc, test_softmax_fast_vs_ref);
    tcase_add_test(tc, test_softmax_errors);
    tcase_add_test(tc, test_swiglu_values);
    tcase_add_test(tc, test_gradcheck_swiglu);
    tcase_add_test(tc, test_swiglu_fast_vs_ref);
    tcase_add_test(tc, test_swiglu_errors);
    tcase_add_test(tc, test_embedding_values);
    tcase_add_test(tc, test_gradcheck_embedding);
    tcase_add_test(tc, test_embedding_fast_vs_ref);
    tcase_add_test(tc, test_embedding_errors);
    tcase_add_test(tc, test_dropout_reproducible);
    tcase_add_test(tc, test_dropout_statistics);
    tcase_add_test(tc, test_dropout_backward_same_mask);
    tcase_add_test(tc, test_gradcheck_dropout);
    tcase_add_test(tc, test_dropout_errors);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
