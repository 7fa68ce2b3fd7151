// tests/test_ops_ce.c: ag_cross_entropy_linear, the chunked linear + cross-entropy loss:
// gradient checks wrt h and w, equality with an unfused computation written out here
// (logits by loops, log-softmax, picking the targets), independence from the chunk size,
// the optimized kernels' token tiles, the fused path (w frozen: the gradient to h made by
// the forward), mask semantics, O(T) saved state, and the exact
// error messages.
#include "harness/harness.h"
#include "harness/ce_ref.h"
#include "autograd/internal.h"
#include "autograd/cpu/kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---- problem setup and the unfused definition ----------------------------------------------

typedef struct {
    int64_t T, C, V, chunk;
    const double *mask; // (T) or NULL
} ce_shape;

typedef struct {
    ag_tensor *in[4]; // h [T, C] F64, w [V, C] F64, targets I32 [T], mask F64 [T] or NULL
} ce_problem;

static void problem_init(ce_problem *p, ag_arena *a, const ce_shape *s, uint64_t seed) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    int64_t hs[2] = {s->T, s->C}, ws[2] = {s->V, s->C};
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
}

// The loss from its definition (harness/ce_ref.c); dh and dw (when not NULL) get its
// gradient, derived by loops from d loss / d logits.
static double unfused(const ag_tensor *h, const ag_tensor *w, const ag_tensor *tg,
                      const ag_tensor *mask, double *dh, double *dw) {
    int64_t T = h->shape[0], C = h->shape[1], V = w->shape[0];
    double *z = ce_ref_logits(h, w, NULL, NULL), *g = malloc((size_t)(T * V) * sizeof *g);
    ck_assert_ptr_nonnull(g);
    double loss = ce_ref_loss(z, T, V, tg, mask, g);
    for (int64_t t = 0; dh && t < T; t++)
        for (int64_t c = 0; c < C; c++) {
            double acc = 0;
            for (int64_t v = 0; v < V; v++)
                acc += g[t * V + v] * ag_get(w, v * C + c);
            dh[t * C + c] = acc;
        }
    for (int64_t v = 0; dw && v < V; v++)
        for (int64_t c = 0; c < C; c++) {
            double acc = 0;
            for (int64_t t = 0; t < T; t++)
                acc += g[t * V + v] * ag_get(h, t * C + c);
            dw[v * C + c] = acc;
        }
    free(z);
    free(g);
    return loss;
}

static ag_tensor *build_ce(ag_ctx *c, ag_tensor **in, void *user) {
    const ce_shape *s = user;
    return ag_cross_entropy_linear(c, in[0], in[1], in[2], in[3], s->chunk);
}

// max |got - want| / max |want| over n values (got a tensor, want doubles)
static double rel_err(const ag_tensor *got, const double *want, int64_t n) {
    double md = 0, mw = 1e-300;
    for (int64_t i = 0; i < n; i++) {
        md = fmax(md, fabs(ag_get(got, i) - want[i]));
        mw = fmax(mw, fabs(want[i]));
    }
    return md / mw;
}

// ---- gradient checks ----------------------------------------------------------------------

static const double mask_a[5] = {1, 0, 0.5, 1, 2};
static const double mask_b[6] = {0, 1, 1, 0, 1, 0};
static const ce_shape grad_shapes[] = {
    {3, 4, 5, 2, NULL},    {5, 3, 7, 3, mask_a}, {1, 1, 2, 1, NULL},
    {6, 5, 13, 4, mask_b}, {4, 6, 9, 100, NULL}, {7, 2, 3, 3, NULL},
};

START_TEST(test_ce_gradcheck) {
    const ce_shape *s = &grad_shapes[_i];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_problem p;
    problem_init(&p, &a, s, 30 + (uint64_t)_i);
    // Step 1e-5 rather than the default 1e-6: rows of w that no token targets get gradients
    // 1e3 times smaller than the largest, where the default step's rounding noise (loss
    // ~ log V, times 1e-16, over 1e-6) reaches 1e-6 relative. Truncation error at 1e-5
    // is ~1e-10.
    gc_case g = {.n_in = 4, .in = p.in, .build = build_ce, .user = (void *)s, .eps = 1e-5};
    gc_result res;
    ck_assert_ok(gc_gradcheck(&g, &res));
    ck_assert_int_eq(res.checked, s->T * s->C + s->V * s->C);
    ck_assert_msg(res.max_rel <= 1e-6, "max rel %g at input %d elem %lld (%g vs %g)",
                  res.max_rel, res.worst_input, (long long)res.worst_elem, res.analytic,
                  res.numeric);
    double rel;
    ck_assert_ok(gc_f32_vs_f64(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "f32 vs f64: %g", rel);
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "fast vs ref: %g", rel);
    // w frozen: only h is checked, and it still gets its gradient
    p.in[1]->requires_grad = false;
    ck_assert_ok(gc_gradcheck(&g, &res));
    ck_assert_int_eq(res.checked, s->T * s->C);
    ck_assert_double_le(res.max_rel, 1e-6);
    ag_arena_free(&a);
}
END_TEST

// Bigger than the gradient checks: logit blocks large enough for the OpenMP team (36
// counted tokens x 500 columns), a partial last chunk of one column, skipped tokens.
START_TEST(test_ce_fast_vs_ref_larger) {
    double mask[48];
    for (int t = 0; t < 48; t++)
        mask[t] = t % 4 == 1 ? 0 : 1;
    ce_shape s = {48, 8, 1001, 500, mask};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_problem p;
    problem_init(&p, &a, &s, 99);
    gc_case g = {.n_in = 4, .in = p.in, .build = build_ce, .user = &s};
    double rel;
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "fast vs ref: %g", rel);
    ag_arena_free(&a);
}
END_TEST

// ---- against the unfused definition, and chunk independence ----------------------------

// Runs the op on float copies of p in dtype dt with dloss = dscale; fills loss, dh, dw.
static void run_op(const ce_problem *p, ag_dtype dt, int64_t chunk, double dscale,
                   double *loss, double *dh, double *dw) {
    ag_arena a;
    ag_arena_init(&a, "run", 0);
    ag_tensor *in[4];
    for (int i = 0; i < 4; i++)
        in[i] = gc_clone(&a, p->in[i], dt);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *l = ag_cross_entropy_linear(&c, in[0], in[1], in[2], in[3], chunk);
    ck_assert_tensor(l);
    *loss = ag_get(l, 0);
    ck_assert_ok(ag_backward(&c, ag_scale(&c, l, dscale)));
    for (int64_t i = 0; i < in[0]->numel; i++)
        dh[i] = ag_get(in[0]->grad, i);
    for (int64_t i = 0; i < in[1]->numel; i++)
        dw[i] = ag_get(in[1]->grad, i);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}

START_TEST(test_ce_matches_unfused) {
    static const double mask[7] = {1, 1, 0, 2, 1, 0, 0.25};
    ce_shape s = {7, 6, 11, 3, mask};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_problem p;
    problem_init(&p, &a, &s, 5);
    double dh_want[42], dw_want[66], dh[42], dw[66], loss;
    double want = unfused(p.in[0], p.in[1], p.in[2], p.in[3], dh_want, dw_want);
    ck_assert_double_gt(want, 0.5); // random logits: about log(11) per token
    for (int i = 0; i < 66; i++)
        dw_want[i] *= 2.5;
    for (int i = 0; i < 42; i++)
        dh_want[i] *= 2.5;
    for (int ref = 0; ref < 2; ref++)
        for (int dt = 0; dt < 2; dt++) {
            ag_set_reference_kernels(ref);
            double tol = dt ? 1e-12 : 2e-6;
            run_op(&p, dt ? AG_F64 : AG_F32, s.chunk, 2.5, &loss, dh, dw);
            // the f32 run sees rounded inputs: compare its loss with the definition on those
            ag_tensor *h32 = gc_clone(&a, p.in[0], AG_F32), *w32 = gc_clone(&a, p.in[1], AG_F32);
            double want_dt = dt ? want : unfused(h32, w32, p.in[2], p.in[3], NULL, NULL);
            ck_assert_double_le(fabs(loss - want_dt), tol * want_dt);
            ag_tensor *dht = gc_clone(&a, p.in[0], AG_F64), *dwt = gc_clone(&a, p.in[1], AG_F64);
            for (int i = 0; i < 42; i++)
                ag_set(dht, i, dh[i]);
            for (int i = 0; i < 66; i++)
                ag_set(dwt, i, dw[i]);
            ck_assert_double_le(rel_err(dht, dh_want, 42), dt ? 1e-12 : 1e-5);
            ck_assert_double_le(rel_err(dwt, dw_want, 66), dt ? 1e-12 : 1e-5);
        }
    ag_set_reference_kernels(false);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_ce_chunk_independence) {
    static const double mask[9] = {1, 1, 0, 1, 0, 0, 1, 1, 1};
    // the masked problem makes the optimized kernels gather scattered tokens; without a
    // mask they use the rows of h in place
    for (int masked = 0; masked < 2; masked++) {
        ce_shape s = {9, 5, 11, 0, masked ? mask : NULL};
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ce_problem p;
        problem_init(&p, &a, &s, 12 + (uint64_t)masked);
        static const int64_t chunks[4] = {11, 1, 3, 18};
        for (int ref = 0; ref < 2; ref++)
            for (int dt = 0; dt < 2; dt++) {
                ag_set_reference_kernels(ref);
                double l0 = 0, dh0[45], dw0[55], tol = dt ? 1e-13 : 1e-6;
                for (int k = 0; k < 4; k++) {
                    double l, dh[45], dw[55];
                    run_op(&p, dt ? AG_F64 : AG_F32, chunks[k], 1.0, &l, dh, dw);
                    if (k == 0) {
                        l0 = l;
                        memcpy(dh0, dh, sizeof dh);
                        memcpy(dw0, dw, sizeof dw);
                        continue;
                    }
                    ck_assert_msg(fabs(l - l0) <= tol * l0, "chunk %lld: loss %.17g vs %.17g",
                                  (long long)chunks[k], l, l0);
                    for (int i = 0; i < 45; i++)
                        ck_assert_double_le(fabs(dh[i] - dh0[i]), tol);
                    for (int i = 0; i < 55; i++)
                        ck_assert_double_le(fabs(dw[i] - dw0[i]), tol);
                }
            }
        ag_set_reference_kernels(false);
        ag_arena_free(&a);
    }
}
END_TEST

// The optimized kernels called directly with token tiles smaller than the token list (the
// op sizes tiles by a memory budget, so small problems always fit one tile): a mix of
// consecutive and scattered tokens, against the reference kernels.
START_TEST(test_ce_kernel_tiles) {
    enum { T = 10, C = 3, V = 7 };
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_shape s = {T, C, V, 0, NULL};
    ce_problem p;
    problem_init(&p, &a, &s, 41);
    const double *h = p.in[0]->data, *w = p.in[1]->data;
    const int32_t *tg = p.in[2]->data;
    static const int64_t rows[6] = {0, 2, 3, 4, 7, 9};
    double mask[T] = {0}, lse_ref[T], zt_ref[T], dh_ref[T * C] = {0}, dw_ref[V * C] = {0};
    for (int i = 0; i < 6; i++)
        mask[rows[i]] = 1 + 0.1 * i;
    ce_dims d = {.T = T, .C = C, .V = V, .chunk = V, .tile = 1};
    ce_fwd_ref_f64(lse_ref, zt_ref, h, w, tg, &d);
    ce_bwd_ref_f64(dh_ref, dw_ref, h, w, tg, mask, 0.3, lse_ref, &d);
    for (int64_t tile = 1; tile <= 6; tile++)
        for (int64_t chunk = 1; chunk <= V; chunk += 3) {
            d = (ce_dims){.T = T, .C = C, .V = V, .chunk = chunk, .tile = tile, .rows = rows,
                          .n_rows = 6};
            void *work = malloc(ce_work_bytes_f64(&d));
            double lse[T] = {0}, zt[T] = {0}, dh[T * C] = {0}, dw[V * C] = {0};
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
            free(work);
        }
    ag_arena_free(&a);
}
END_TEST

// ---- the fused path: w frozen, the gradient to h computed by the forward --------------------

// The fused kernel called directly, against the reference backward's dh: token tiles
// smaller than the token list, scattered tokens, chunks that do not divide V, weighted
// mask, and logits large enough (h scaled by `gain`) that the running max moves from chunk
// to chunk and the accumulator rows get rescaled. Rows of uncounted tokens are untouched.
START_TEST(test_ce_fused_kernel_tiles) {
    enum { T = 10, C = 3, V = 11 };
    static const double gains[2] = {1, 25};
    for (int gi = 0; gi < 2; gi++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ce_shape s = {T, C, V, 0, NULL};
        ce_problem p;
        problem_init(&p, &a, &s, 43 + (uint64_t)gi);
        double *h = p.in[0]->data;
        for (int i = 0; i < T * C; i++)
            h[i] *= gains[gi];
        const double *w = p.in[1]->data;
        const int32_t *tg = p.in[2]->data;
        static const int64_t rows[6] = {0, 2, 3, 4, 7, 9};
        double mask[T] = {0}, lse_ref[T], zt_ref[T], dh_ref[T * C] = {0};
        for (int i = 0; i < 6; i++)
            mask[rows[i]] = 1 + 0.1 * i;
        ce_dims d = {.T = T, .C = C, .V = V, .chunk = V, .tile = 1};
        ce_fwd_ref_f64(lse_ref, zt_ref, h, w, tg, &d);
        ce_bwd_ref_f64(dh_ref, NULL, h, w, tg, mask, 0.3, lse_ref, &d);
        for (int64_t tile = 1; tile <= 6; tile++)
            for (int64_t chunk = 1; chunk <= V; chunk += 2) {
                d = (ce_dims){.T = T, .C = C, .V = V, .chunk = chunk, .tile = tile,
                              .rows = rows, .n_rows = 6};
                void *work = malloc(ce_work_bytes_f64(&d));
                double lse[T] = {0}, zt[T] = {0}, dh[T * C];
                for (int i = 0; i < T * C; i++)
                    dh[i] = 7; // uncounted rows must keep this
                ce_fwd_grad_f64(lse, zt, dh, work, h, w, tg, mask, 0.3, &d);
                for (int i = 0; i < 6; i++) {
                    ck_assert_double_eq_tol(lse[rows[i]], lse_ref[rows[i]],
                                            1e-13 * fmax(1, fabs(lse_ref[rows[i]])));
                    ck_assert_double_eq_tol(zt[rows[i]], zt_ref[rows[i]],
                                            1e-13 * fmax(1, fabs(zt_ref[rows[i]])));
                }
                for (int t = 0; t < T; t++)
                    for (int c = 0; c < C; c++) {
                        double want = mask[t] != 0 ? dh_ref[t * C + c] : 7;
                        ck_assert_msg(fabs(dh[t * C + c] - want) <= 1e-13,
                                      "gain %g tile %lld chunk %lld dh[%d,%d] %.17g vs %.17g",
                                      gains[gi], (long long)tile, (long long)chunk, t, c,
                                      dh[t * C + c], want);
                    }
                free(work);
            }
        ag_arena_free(&a);
    }
}
END_TEST

// Through the op with w frozen: loss and dh equal the unfused definition for an upstream
// gradient of 2.5 (f32 and f64, optimized and reference kernels), and the node keeps T
// doubles plus T x C elements (the saved gradient) when the optimized kernels run, T
// doubles with the reference ones.
START_TEST(test_ce_fused_matches_unfused) {
    static const double mask[7] = {1, 1, 0, 2, 1, 0, 0.25};
    enum { T = 7, C = 6, V = 11 };
    ce_shape s = {T, C, V, 4, mask};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_problem p;
    problem_init(&p, &a, &s, 8);
    double dh_want[T * C];
    double want = unfused(p.in[0], p.in[1], p.in[2], p.in[3], dh_want, NULL);
    for (int i = 0; i < T * C; i++)
        dh_want[i] *= 2.5;
    for (int ref = 0; ref < 2; ref++)
        for (int dt = 0; dt < 2; dt++) {
            ag_set_reference_kernels(ref);
            ag_dtype t = dt ? AG_F64 : AG_F32;
            ag_arena r;
            ag_arena_init(&r, "run", 0);
            ag_tensor *in[4];
            for (int i = 0; i < 4; i++)
                in[i] = gc_clone(&r, p.in[i], t);
            in[1]->requires_grad = false;
            ag_ctx c;
            ag_ctx_init(&c);
            ag_tensor *l = ag_cross_entropy_linear(&c, in[0], in[1], in[2], in[3], s.chunk);
            ck_assert_tensor(l);
            size_t saved = T * sizeof(double) + (ref ? 0 : T * C * ag_dtype_size(t));
            ck_assert_uint_eq(c.saved_bytes, saved);
            ck_assert_ok(ag_backward(&c, ag_scale(&c, l, 2.5)));
            ck_assert_ptr_null(in[1]->grad);
            double tol = dt ? 1e-12 : 2e-6;
            ag_tensor *h32 = gc_clone(&a, p.in[0], AG_F32), *w32 = gc_clone(&a, p.in[1], AG_F32);
            double want_dt = dt ? want : unfused(h32, w32, p.in[2], p.in[3], NULL, NULL);
            ck_assert_double_le(fabs(ag_get(l, 0) - want_dt), tol * want_dt);
            ck_assert_double_le(rel_err(in[0]->grad, dh_want, T * C), dt ? 1e-12 : 1e-5);
            ag_ctx_free(&c);
            ag_arena_free(&r);
        }
    ag_set_reference_kernels(false);
    ag_arena_free(&a);
}
END_TEST

// Larger than the gradient checks, w frozen: blocks big enough for the OpenMP team, a
// partial last chunk, skipped tokens, against the reference kernels.
START_TEST(test_ce_fused_fast_vs_ref_larger) {
    double mask[48];
    for (int t = 0; t < 48; t++)
        mask[t] = t % 5 == 2 ? 0 : 1 + 0.01 * t;
    ce_shape s = {48, 8, 1001, 300, mask};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_problem p;
    problem_init(&p, &a, &s, 77);
    p.in[1]->requires_grad = false;
    gc_case g = {.n_in = 4, .in = p.in, .build = build_ce, .user = &s};
    double rel;
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "fast vs ref: %g", rel);
    ag_arena_free(&a);
}
END_TEST

// ---- mask semantics -----------------------------------------------------------------------

START_TEST(test_ce_masked_tokens_contribute_nothing) {
    static const double mask[6] = {1, 0, 1, 1, 0, 1};
    ce_shape s = {6, 4, 9, 4, mask};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_problem p;
    problem_init(&p, &a, &s, 7);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        double l1, l2, dh1[24], dw1[36], dh2[24], dw2[36];
        run_op(&p, AG_F64, s.chunk, 1.0, &l1, dh1, dw1);
        // masked tokens' rows of dh are exactly zero
        for (int c = 0; c < 4; c++) {
            ck_assert_double_eq(dh1[1 * 4 + c], 0);
            ck_assert_double_eq(dh1[4 * 4 + c], 0);
        }
        // changing what the masked tokens see changes nothing at all
        for (int c = 0; c < 4; c++) {
            ag_set(p.in[0], 1 * 4 + c, 50.0 * (c + 1));
            ag_set(p.in[0], 4 * 4 + c, -30.0);
        }
        ag_set(p.in[2], 1, 8);
        ag_set(p.in[2], 4, 0);
        run_op(&p, AG_F64, s.chunk, 1.0, &l2, dh2, dw2);
        ck_assert_double_eq(l1, l2);
        ck_assert_mem_eq(dw1, dw2, sizeof dw1);
        // the same as the problem made of the counted tokens only, without a mask
        ce_problem q;
        ce_shape s4 = {4, 4, 9, 4, NULL};
        problem_init(&q, &a, &s4, 1);
        static const int keep[4] = {0, 2, 3, 5};
        for (int i = 0; i < 4; i++) {
            for (int c = 0; c < 4; c++)
                ag_set(q.in[0], i * 4 + c, ag_get(p.in[0], keep[i] * 4 + c));
            ag_set(q.in[2], i, ag_get(p.in[2], keep[i]));
        }
        for (int i = 0; i < 36; i++)
            ag_set(q.in[1], i, ag_get(p.in[1], i));
        double l3, dh3[16], dw3[36];
        run_op(&q, AG_F64, 4, 1.0, &l3, dh3, dw3);
        ck_assert_double_eq_tol(l3, l1, 1e-13);
        for (int i = 0; i < 36; i++)
            ck_assert_double_eq_tol(dw3[i], dw1[i], 1e-13);
        for (int i = 0; i < 4; i++)
            for (int c = 0; c < 4; c++)
                ck_assert_double_eq_tol(dh3[i * 4 + c], dh1[keep[i] * 4 + c], 1e-13);
    }
    ag_set_reference_kernels(false);
    ag_arena_free(&a);
}
END_TEST

// A weight of 2 counts a token twice: same as duplicating it with weight 1.
START_TEST(test_ce_mask_weights) {
    static const double mask[2] = {2, 1};
    ce_shape s = {2, 3, 5, 2, mask}, s3 = {3, 3, 5, 2, NULL};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_problem p, q;
    problem_init(&p, &a, &s, 2);
    problem_init(&q, &a, &s3, 3);
    static const int src[3] = {0, 0, 1};
    for (int i = 0; i < 3; i++) {
        for (int c = 0; c < 3; c++)
            ag_set(q.in[0], i * 3 + c, ag_get(p.in[0], src[i] * 3 + c));
        ag_set(q.in[2], i, ag_get(p.in[2], src[i]));
    }
    for (int i = 0; i < 15; i++)
        ag_set(q.in[1], i, ag_get(p.in[1], i));
    double l1, l2, dh1[6], dw1[15], dh2[9], dw2[15];
    run_op(&p, AG_F64, 2, 1.0, &l1, dh1, dw1);
    run_op(&q, AG_F64, 2, 1.0, &l2, dh2, dw2);
    ck_assert_double_eq_tol(l1, l2, 1e-14);
    for (int i = 0; i < 15; i++)
        ck_assert_double_eq_tol(dw1[i], dw2[i], 1e-14);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_ce_all_masked) {
    static const double mask[4] = {0, 0, 0, 0};
    ce_shape s = {4, 3, 5, 2, mask};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_problem p;
    problem_init(&p, &a, &s, 9);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        double l, dh[12], dw[15];
        for (int i = 0; i < 12; i++)
            dh[i] = 1;
        run_op(&p, AG_F32, 2, 1.0, &l, dh, dw); // fails the test if a grad buffer is missing
        ck_assert_double_eq(l, 0);
        for (int i = 0; i < 12; i++)
            ck_assert_double_eq(dh[i], 0);
        for (int i = 0; i < 15; i++)
            ck_assert_double_eq(dw[i], 0);
    }
    ag_set_reference_kernels(false);
    ag_arena_free(&a);
}
END_TEST

// ---- memory -------------------------------------------------------------------------------

// State kept for backward is the per-token logsumexp: T doubles whatever V, and the
// activation arena only holds the [1] loss. Checked at two vocabulary sizes.
START_TEST(test_ce_saved_state_is_O_T) {
    enum { T = 8 };
    size_t act_delta[2];
    for (int k = 0; k < 2; k++) {
        int64_t V = k ? 4096 : 16;
        ce_shape s = {T, 4, V, 64, NULL};
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ce_problem p;
        problem_init(&p, &a, &s, 4);
        ag_ctx c;
        ag_ctx_init(&c);
        size_t used0 = c.act.used;
        ag_tensor *l = ag_cross_entropy_linear(&c, p.in[0], p.in[1], p.in[2], NULL, s.chunk);
        ck_assert_tensor(l);
        act_delta[k] = c.act.used - used0;
        ck_assert_uint_eq(c.saved_bytes, T * sizeof(double));
        ck_assert_ok(ag_backward(&c, l));
        ck_assert_uint_eq(c.saved_bytes, 0);
        ck_assert_uint_eq(c.saved_peak, T * sizeof(double));
        ck_assert_uint_lt(c.saved_peak, (size_t)(T * V) * sizeof(float));
        ag_ctx_free(&c);
        ag_arena_free(&a);
    }
    ck_assert_uint_eq(act_delta[0], act_delta[1]);
}
END_TEST

START_TEST(test_ce_grad_mode_off) {
    ce_shape s = {3, 2, 4, 2, NULL};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_problem p;
    problem_init(&p, &a, &s, 6);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_ctx_set_grad(&c, false);
    ag_tensor *l = ag_cross_entropy_linear(&c, p.in[0], p.in[1], p.in[2], NULL, 2);
    ck_assert_tensor(l);
    ck_assert(!l->requires_grad);
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert_uint_eq(c.saved_peak, 0);
    ck_assert_double_eq_tol(ag_get(l, 0), unfused(p.in[0], p.in[1], p.in[2], NULL, NULL, NULL),
                            1e-13);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

// Every allocation of forward and backward failing in turn: a NULL result or status with an
// out-of-memory message, never a crash (and no leak under the sanitizers).
START_TEST(test_ce_out_of_memory) {
    static const double mask[5] = {1, 0, 1, 1, 0};
    ce_shape s = {5, 3, 7, 2, mask};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ce_problem p;
    problem_init(&p, &a, &s, 8);
    int failures = 0;
    for (long n = 0; n < 12; n++) {
        ag_ctx c;
        ag_ctx_init(&c);
        molt_alloc_fail_after(n);
        ag_tensor *l = ag_cross_entropy_linear(&c, p.in[0], p.in[1], p.in[2], p.in[3], 2);
        molt_status st = l ? ag_backward(&c, l) : MOLT_ENOMEM;
        molt_alloc_fail_after(-1);
        if (!l || st != MOLT_OK) {
            failures++;
            ck_assert_msg(strstr(molt_err_msg(), "out of memory") != NULL, "n=%ld: %s", n,
                          molt_err_msg());
        }
        ag_ctx_free(&c);
    }
    ck_assert_int_ge(failures, 4);
    ag_arena_free(&a);
}
END_TEST

// ---- errors -------------------------------------------------------------------------------

START_TEST(test_ce_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_arena *A = &c.act;
    int64_t s3[3] = {2, 3, 4};
    ag_tensor *h = ag_tensor_new2(A, AG_F32, 3, 4), *w = ag_tensor_new2(A, AG_F32, 5, 4);
    ag_tensor *tg = ag_tensor_new1(A, AG_I32, 3), *m = ag_tensor_new1(A, AG_F32, 3);
    ag_tensor *h3 = ag_tensor_new(A, AG_F32, 3, s3), *w6 = ag_tensor_new2(A, AG_F32, 5, 6);
    ag_tensor *w64 = ag_tensor_new2(A, AG_F64, 5, 4), *tgf = ag_tensor_new1(A, AG_F32, 3);
    ag_tensor *tg4 = ag_tensor_new1(A, AG_I32, 4), *m2 = ag_tensor_new2(A, AG_F32, 3, 1);
    ag_tensor *m64 = ag_tensor_new1(A, AG_F64, 3), *mg = ag_tensor_new1(A, AG_F32, 3);
    mg->requires_grad = true;
    h->requires_grad = true;
    for (int i = 0; i < 3; i++)
        ag_set(m, i, 1);
#define CE_FAILS(expr, msg)                                                                \
    do {                                                                                   \
        ck_assert_ptr_null(expr);                                                          \
        ck_assert_str_eq(molt_err_msg(), msg);                                             \
    } while (0)
    ag_set(tg, 2, 7);
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tg, m, 2),
             "cross_entropy_linear: targets[2] = 7 is outside the vocabulary [0, 5)");
    ag_set(tg, 2, 4);
    ag_set(tg, 0, -1);
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tg, NULL, 2),
             "cross_entropy_linear: targets[0] = -1 is outside the vocabulary [0, 5)");
    ag_set(tg, 0, 0);
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tg, m, 0),
             "cross_entropy_linear: chunk must be >= 1, got 0");
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tg, m, -3),
             "cross_entropy_linear: chunk must be >= 1, got -3");
    CE_FAILS(ag_cross_entropy_linear(&c, h3, w, tg, m, 2),
             "cross_entropy_linear: h is [2, 3, 4] f32, expected 2 dims");
    CE_FAILS(ag_cross_entropy_linear(&c, h, w6, tg, m, 2),
             "cross_entropy_linear: h [3, 4] f32 and w [5, 6] f32 differ in hidden size (dim 1)");
    CE_FAILS(ag_cross_entropy_linear(&c, h, w64, tg, m, 2),
             "cross_entropy_linear: h [3, 4] f32 and w [5, 4] f64 differ in dtype");
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tgf, m, 2),
             "cross_entropy_linear: targets is [3] f32, expected i32");
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tg4, m, 2),
             "cross_entropy_linear: targets [4] i32 must be [3], one per row of h [3, 4] f32");
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, NULL, m, 2),
             "cross_entropy_linear: targets is NULL");
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tg, m2, 2),
             "cross_entropy_linear: mask [3, 1] f32 must be [3], one per row of h [3, 4] f32");
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tg, m64, 2),
             "cross_entropy_linear: h [3, 4] f32 and mask [3] f64 differ in dtype");
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tg, mg, 2),
             "cross_entropy_linear: mask requires grad, but the loss is not differentiated "
             "with respect to its weights");
    ag_set(m, 1, -0.5);
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tg, m, 2),
             "cross_entropy_linear: mask[1] = -0.5 must be finite and >= 0");
    ag_set(m, 1, NAN);
    CE_FAILS(ag_cross_entropy_linear(&c, h, w, tg, m, 2),
             "cross_entropy_linear: mask[1] = nan must be finite and >= 0");
    ag_set(m, 1, 1);
    CE_FAILS(ag_cross_entropy_linear(&c, tg, w, tg, m, 2),
             "cross_entropy_linear: h is [3] i32, expected f32 or f64 (cast bf16/f16 first)");
#undef CE_FAILS
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert_uint_eq(c.saved_bytes, 0);
    // and the corrected call goes through
    ck_assert_tensor(ag_cross_entropy_linear(&c, h, w, tg, m, 2));
    ck_assert_int_eq(c.n_tape, 1);
    ag_ctx_free(&c);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_ce");
    TCase *tc = tcase_create("ce");
    tcase_add_loop_test(tc, test_ce_gradcheck, 0,
                        (int)(sizeof grad_shapes / sizeof grad_shapes[0]));
    tcase_add_test(tc, test_ce_fast_vs_ref_larger);
    tcase_add_test(tc, test_ce_matches_unfused);
    tcase_add_test(tc, test_ce_chunk_independence);
    tcase_add_test(tc, test_ce_kernel_tiles);
    tcase_add_test(tc, test_ce_fused_kernel_tiles);
    tcase_add_test(tc, test_ce_fused_matches_unfused);
    tcase_add_test(tc, test_ce_fused_fast_vs_ref_larger);
    tcase_add_test(tc, test_ce_masked_tokens_contribute_nothing);
    tcase_add_test(tc, test_ce_mask_weights);
    tcase_add_test(tc, test_ce_all_masked);
    tcase_add_test(tc, test_ce_saved_state_is_O_T);
    tcase_add_test(tc, test_ce_grad_mode_off);
    tcase_add_test(tc, test_ce_out_of_memory);
    tcase_add_test(tc, test_ce_errors);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
