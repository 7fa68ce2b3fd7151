// tests/test_ops_ce_lowrank.c: ag_cross_entropy_linear2, the chunked cross-entropy over
// logits h w^T + h2 w2^T (a LoRA on the output projection): gradient checks wrt h, w, h2
// and w2, equality with the unfused definition written out here, equality with the
// one-term loss over the concatenations [h, h2] and [w, w2], the optimized kernels' token
// tiles, O(T) saved state, and the exact error messages. The one-term form has its own
// tests (test_ops_ce.c).
#include "harness/harness.h"
#include "harness/ce_ref.h"
#include "autograd/internal.h"
#include "autograd/cpu/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int64_t T, C, V, R, chunk;
    const double *mask; // (T) or NULL
} lr_shape;

// in: h [T, C], w [V, C], targets I32 [T], mask [T] or NULL, h2 [T, R], w2 [V, R] (F64)
typedef struct {
    ag_tensor *in[6];
} lr_problem;

static void problem_init(lr_problem *p, ag_arena *a, const lr_shape *s, uint64_t seed) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    int64_t hs[2] = {s->T, s->C}, ws[2] = {s->V, s->C}, h2s[2] = {s->T, s->R};
    int64_t w2s[2] = {s->V, s->R};
    p->in[0] = gc_rand(a, &r, 2, hs, -1, 1, true);
    p->in[1] = gc_rand(a, &r, 2, ws, -1, 1, true);
    p->in[2] = ag_tensor_new1(a, AG_I32, s->T);
    for (int64_t t = 0; t < s->T; t++)
        ag_set(p->in[2], t, (double)(ag_rng_next(&r) % (uint64_t)s->V));
    p->in[3] = NULL;
    if (s->mask) {
        p->in[3] = ag_tensor_new1(a, AG_F64, s->T);
        for (int64_t t = 0; t < s->T; t++)
            ag_set(p->in[3], t, s->mask[t]);
    }
    p->in[4] = gc_rand(a, &r, 2, h2s, -1, 1, true);
    p->in[5] = gc_rand(a, &r, 2, w2s, -1, 1, true);
}

static ag_tensor *build_lr(ag_ctx *c, ag_tensor **in, void *user) {
    const lr_shape *s = user;
    return ag_cross_entropy_linear2(c, in[0], in[1], in[4], in[5], in[2], in[3], s->chunk);
}

// The loss from its definition with every logit materialized (harness/ce_ref.c); g
// (T x V, optional) gets d loss / d logits, from which the test derives the input
// gradients by loops.
static double unfused(const lr_problem *p, double *g) {
    const ag_tensor *h = p->in[0], *w = p->in[1];
    double *z = ce_ref_logits(h, w, p->in[4], p->in[5]);
    double loss = ce_ref_loss(z, h->shape[0], w->shape[0], p->in[2], p->in[3], g);
    free(z);
    return loss;
}

// out (rows, width) = g^T-or-g (rows x K) times x (K, width): trans picks g^T.
static void matmul(double *out, const double *g, const ag_tensor *x, int64_t rows, int64_t K,
                   int64_t width, bool trans, int64_t ld) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < width; j++) {
            double acc = 0;
            for (int64_t k = 0; k < K; k++)
                acc += (trans ? g[k * ld + i] : g[i * ld + k]) * ag_get(x, k * width + j);
            out[i * width + j] = acc;
        }
}

static double rel_err(const ag_tensor *got, const double *want) {
    double md = 0, mw = 1e-300;
    for (int64_t i = 0; i < got->numel; i++) {
        md = fmax(md, fabs(ag_get(got, i) - want[i]));
        mw = fmax(mw, fabs(want[i]));
    }
    return md / mw;
}

static const double mask_a[5] = {1, 0, 0.5, 1, 2};
static const double mask_b[6] = {0, 1, 1, 0, 1, 0};
static const lr_shape grad_shapes[] = {
    {3, 4, 5, 2, 2, NULL},  {5, 3, 7, 1, 3, mask_a}, {1, 1, 2, 1, 1, NULL},
    {6, 5, 13, 3, 4, mask_b}, {4, 6, 9, 5, 100, NULL},
};

START_TEST(test_lr_gradcheck) {
    const lr_shape *s = &grad_shapes[_i];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    lr_problem p;
    problem_init(&p, &a, s, 70 + (uint64_t)_i);
    // step 1e-5 as in test_ops_ce.c: untargeted rows of w/w2 have tiny gradients
    gc_case g = {.n_in = 6, .in = p.in, .build = build_lr, .user = (void *)s, .eps = 1e-5};
    gc_result res;
    ck_assert_ok(gc_gradcheck(&g, &res));
    ck_assert_int_eq(res.checked, (s->T + s->V) * (s->C + s->R));
    ck_assert_msg(res.max_rel <= 1e-6, "max rel %g at input %d elem %lld (%g vs %g)",
                  res.max_rel, res.worst_input, (long long)res.worst_elem, res.analytic,
                  res.numeric);
    double rel;
    ck_assert_ok(gc_f32_vs_f64(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "f32 vs f64: %g", rel);
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "fast vs ref: %g", rel);
    // the model's case: w frozen, gradients to h, h2 and w2 only
    p.in[1]->requires_grad = false;
    ck_assert_ok(gc_gradcheck(&g, &res));
    ck_assert_int_eq(res.checked, s->T * s->C + (s->T + s->V) * s->R);
    ck_assert_double_le(res.max_rel, 1e-6);
    ag_arena_free(&a);
}
END_TEST

// Loss and all four gradients against the definition, both kernels, both dtypes, with a
// mask that makes the optimized kernels gather scattered tokens.
START_TEST(test_lr_matches_unfused) {
    static const double mask[7] = {1, 1, 0, 2, 1, 0, 0.25};
    lr_shape s = {7, 6, 11, 3, 4, mask};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    lr_problem p;
    problem_init(&p, &a, &s, 5);
    double g[7 * 11], want[4][66];
    double loss = unfused(&p, g);
    ck_assert_double_gt(loss, 0.5);
    matmul(want[0], g, p.in[1], 7, 11, 6, false, 11); // dh = g w
    matmul(want[1], g, p.in[0], 11, 7, 6, true, 11);  // dw = g^T h
    matmul(want[2], g, p.in[5], 7, 11, 3, false, 11); // dh2 = g w2
    matmul(want[3], g, p.in[4], 11, 7, 3, true, 11);  // dw2 = g^T h2
    static const int grad_in[4] = {0, 1, 4, 5};
    for (int ref = 0; ref < 2; ref++)
        for (int dt = 0; dt < 2; dt++) {
            ag_set_reference_kernels(ref);
            ag_arena r;
            ag_arena_init(&r, "run", 0);
            ag_tensor *in[6];
            for (int i = 0; i < 6; i++)
                in[i] = gc_clone(&r, p.in[i], dt ? AG_F64 : AG_F32);
            ag_ctx c;
            ag_ctx_init(&c);
            ag_tensor *l = build_lr(&c, in, &s);
            ck_assert_tensor(l);
            ck_assert_double_le(fabs(ag_get(l, 0) - loss), (dt ? 1e-12 : 1e-5) * loss);
            ck_assert_ok(ag_backward(&c, l));
            for (int k = 0; k < 4; k++)
                ck_assert_msg(rel_err(in[grad_in[k]]->grad, want[k]) <= (dt ? 1e-12 : 1e-5),
                              "ref %d dt %d input %d: %g", ref, dt, grad_in[k],
                              rel_err(in[grad_in[k]]->grad, want[k]));
            ag_ctx_free(&c);
            ag_arena_free(&r);
        }
    ag_set_reference_kernels(false);
    ag_arena_free(&a);
}
END_TEST

// The two-term loss is the one-term loss over [h, h2] and [w, w2] (concatenated along the
// hidden dim): same value, and the concatenation's gradients split back into the parts.
START_TEST(test_lr_equals_concatenated) {
    static const double mask[9] = {1, 1, 0, 1, 0, 0, 1, 1, 1};
    lr_shape s = {9, 5, 300, 4, 64, mask};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    lr_problem p;
    problem_init(&p, &a, &s, 12);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_ctx c;
        ag_ctx_init(&c);
        // two fresh copies of the inputs, one per route, so that gradients do not mix
        ag_tensor *x[6], *y[6];
        for (int i = 0; i < 6; i++) {
            x[i] = gc_clone(&a, p.in[i], AG_F64);
            y[i] = gc_clone(&a, p.in[i], AG_F64);
        }
        ag_tensor *l2 = build_lr(&c, x, &s);
        ck_assert_tensor(l2);
        ck_assert_ok(ag_backward(&c, l2));
        ag_tensor *hc[2] = {y[0], y[4]}, *wc[2] = {y[1], y[5]};
        ag_tensor *hh = ag_concat(&c, 2, hc, 1), *ww = ag_concat(&c, 2, wc, 1);
        ag_tensor *l1 = ag_cross_entropy_linear(&c, hh, ww, y[2], y[3], s.chunk);
        ck_assert_tensor(l1);
        ck_assert_double_eq_tol(ag_get(l1, 0), ag_get(l2, 0), 1e-12);
        ck_assert_ok(ag_backward(&c, l1));
        static const int idx[4] = {0, 1, 4, 5};
        for (int k = 0; k < 4; k++)
            ck_assert_double_le(gc_max_rel_diff(x[idx[k]]->grad, y[idx[k]]->grad), 1e-12);
        ag_ctx_free(&c);
    }
    ag_set_reference_kernels(false);
    ag_arena_free(&a);
}
END_TEST

// The optimized kernels called directly with tiles smaller than the token list, scattered
// and consecutive tokens, against the reference kernels.
START_TEST(test_lr_kernel_tiles) {
    enum { T = 10, C = 3, V = 7, R = 2 };
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    lr_shape s = {T, C, V, R, 0, NULL};
    lr_problem p;
    problem_init(&p, &a, &s, 41);
    const double *h = p.in[0]->data, *w = p.in[1]->data;
    const int32_t *tg = p.in[2]->data;
    static const int64_t rows[6] = {0, 2, 3, 4, 7, 9};
    double mask[T] = {0}, lse_ref[T], zt_ref[T], dh_ref[T * C] = {0}, dw_ref[V * C] = {0};
    double dh2_ref[T * R] = {0}, dw2_ref[V * R] = {0};
    for (int i = 0; i < 6; i++)
        mask[rows[i]] = 1 + 0.1 * i;
    ce_lowrank lr = {.R = R, .h2 = p.in[4]->data, .w2 = p.in[5]->data, .dh2 = dh2_ref,
                     .dw2 = dw2_ref};
    ce_dims d = {.T = T, .C = C, .V = V, .chunk = V, .tile = 1, .lr = &lr};
    ce_fwd_ref_f64(lse_ref, zt_ref, h, w, tg, &d);
    ce_bwd_ref_f64(dh_ref, dw_ref, h, w, tg, mask, 0.3, lse_ref, &d);
    for (int64_t tile = 1; tile <= 6; tile++)
        for (int64_t chunk = 1; chunk <= V; chunk += 3) {
            double lse[T] = {0}, zt[T] = {0}, dh[T * C] = {0}, dw[V * C] = {0};
            double dh2[T * R] = {0}, dw2[V * R] = {0};
            lr.dh2 = dh2;
            lr.dw2 = dw2;
            d = (ce_dims){.T = T, .C = C, .V = V, .chunk = chunk, .tile = tile, .rows = rows,
                          .n_rows = 6, .lr = &lr};
            void *work = malloc(ce_work_bytes_f64(&d));
            ce_fwd_f64(lse, zt, work, h, w, tg, &d);
            ce_bwd_f64(dh, dw, work, h, w, tg, mask, 0.3, lse, &d);
            for (int i = 0; i < 6; i++) {
                ck_assert_double_eq_tol(lse[rows[i]], lse_ref[rows[i]], 1e-13);
                ck_assert_double_eq_tol(zt[rows[i]], zt_ref[rows[i]], 1e-13);
            }
            for (int i = 0; i < T * C; i++)
                ck_assert_double_eq_tol(dh[i], dh_ref[i], 1e-13);
            for (int i = 0; i < V * C; i++)
                ck_assert_double_eq_tol(dw[i], dw_ref[i], 1e-13);
            for (int i = 0; i < T * R; i++)
                ck_assert_double_eq_tol(dh2[i], dh2_ref[i], 1e-13);
            for (int i = 0; i < V * R; i++)
                ck_assert_double_eq_tol(dw2[i], dw2_ref[i], 1e-13);
            free(work);
        }
    ag_arena_free(&a);
}
END_TEST

// Saved state stays T doubles with the second term, at two vocabulary sizes.
START_TEST(test_lr_saved_state_is_O_T) {
    enum { T = 8 };
    for (int k = 0; k < 2; k++) {
        int64_t V = k ? 4096 : 16;
        lr_shape s = {T, 4, V, 2, 64, NULL};
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        lr_problem p;
        problem_init(&p, &a, &s, 4);
        ag_ctx c;
        ag_ctx_init(&c);
        ck_assert_tensor(build_lr(&c, p.in, &s));
        ck_assert_uint_eq(c.saved_bytes, T * sizeof(double));
        ag_ctx_free(&c);
        ag_arena_free(&a);
    }
}
END_TEST

START_TEST(test_lr_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_arena *A = &c.act;
    ag_tensor *h = ag_tensor_new2(A, AG_F32, 3, 4), *w = ag_tensor_new2(A, AG_F32, 5, 4);
    ag_tensor *tg = ag_tensor_new1(A, AG_I32, 3), *h2 = ag_tensor_new2(A, AG_F32, 3, 2);
    ag_tensor *w2 = ag_tensor_new2(A, AG_F32, 5, 2), *w2r = ag_tensor_new2(A, AG_F32, 5, 3);
    ag_tensor *h2t = ag_tensor_new2(A, AG_F32, 4, 2), *h264 = ag_tensor_new2(A, AG_F64, 3, 2);
    h->requires_grad = true;
    ck_assert_ptr_null(ag_cross_entropy_linear2(&c, h, w, h2, NULL, tg, NULL, 2));
    ck_assert_str_eq(molt_err_msg(), "cross_entropy_linear: h2 and w2 come together (got "
                                     "only h2)");
    ck_assert_ptr_null(ag_cross_entropy_linear2(&c, h, w, NULL, w2, tg, NULL, 2));
    ck_assert_str_eq(molt_err_msg(), "cross_entropy_linear: h2 and w2 come together (got "
                                     "only w2)");
    ck_assert_ptr_null(ag_cross_entropy_linear2(&c, h, w, h2, w2r, tg, NULL, 2));
    ck_assert_str_eq(molt_err_msg(), "cross_entropy_linear: h2 [3, 2] f32 and w2 [5, 3] f32 "
                                     "must be [T, r] and [V, r] with h [3, 4] f32 and w "
                                     "[5, 4] f32");
    ck_assert_ptr_null(ag_cross_entropy_linear2(&c, h, w, h2t, w2, tg, NULL, 2));
    ck_assert_str_eq(molt_err_msg(), "cross_entropy_linear: h2 [4, 2] f32 and w2 [5, 2] f32 "
                                     "must be [T, r] and [V, r] with h [3, 4] f32 and w "
                                     "[5, 4] f32");
    ck_assert_ptr_null(ag_cross_entropy_linear2(&c, h, w, h264, w2, tg, NULL, 2));
    ck_assert_str_eq(molt_err_msg(), "cross_entropy_linear: h [3, 4] f32 and h2 [3, 2] f64 differ "
                                     "in dtype");
    ck_assert_tensor(ag_cross_entropy_linear2(&c, h, w, h2, w2, tg, NULL, 2));
    ag_ctx_free(&c);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("ops_ce_lowrank");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_lr_gradcheck, 0,
                        (int)(sizeof grad_shapes / sizeof grad_shapes[0]));
    tcase_add_test(tc, test_lr_matches_unfused);
    tcase_add_test(tc, test_lr_equals_concatenated);
    tcase_add_test(tc, test_lr_kernel_tiles);
    tcase_add_test(tc, test_lr_saved_state_is_O_T);
    tcase_add_test(tc, test_lr_errors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) { return harness_run(suite()); }
