// tests/test_ops_attention.c: causal packed-sequence attention. Checks against a brute-force
// implementation that materializes every T x T score matrix, packed sequences against
// separate runs (outputs and gradient isolation), segments that are not contiguous, the
// memory kept for backward, gradient checks (Dqk != Dv, qtemp, q and k one tensor), f32 vs
// f64, optimized vs reference kernels, and the exact error messages.
#include "harness/harness.h"
#include "autograd/internal.h"

#include <math.h>
#include <string.h>

typedef struct {
    int64_t T, H, Dqk, Dv;
} dims;

// Brute force in double: full score matrices, explicit mask, softmax, weighted sum.
static void attention_brute(double *out, const ag_tensor *q, const ag_tensor *k,
                            const ag_tensor *v, const int32_t *seg, const ag_tensor *qtemp,
                            double scale, dims d) {
    double *sc = malloc(sizeof(double) * (size_t)(d.T * d.T));
    for (int64_t h = 0; h < d.H; h++) {
        for (int64_t t = 0; t < d.T; t++)
            for (int64_t s = 0; s < d.T; s++) {
                double dot = 0;
                for (int64_t e = 0; e < d.Dqk; e++)
                    dot += ag_get(q, (t * d.H + h) * d.Dqk + e) * ag_get(k, (s * d.H + h) * d.Dqk + e);
                double temp = qtemp ? ag_get(qtemp, t) : 1.0;
                bool ok = s <= t && seg[s] == seg[t];
                sc[t * d.T + s] = ok ? scale * temp * dot : -INFINITY;
            }
        for (int64_t t = 0; t < d.T; t++) {
            double m = -INFINITY, z = 0;
            for (int64_t s = 0; s < d.T; s++)
                m = fmax(m, sc[t * d.T + s]);
            for (int64_t s = 0; s < d.T; s++)
                z += exp(sc[t * d.T + s] - m);
            for (int64_t e = 0; e < d.Dv; e++) {
                double acc = 0;
                for (int64_t s = 0; s < d.T; s++)
                    acc += exp(sc[t * d.T + s] - m) / z * ag_get(v, (s * d.H + h) * d.Dv + e);
                out[(t * d.H + h) * d.Dv + e] = acc;
            }
        }
    }
    free(sc);
}

static ag_tensor *seg_tensor(ag_arena *a, int64_t T, const int32_t *vals) {
    ag_tensor *s = ag_tensor_new1(a, AG_I32, T);
    memcpy(s->data, vals, (size_t)T * sizeof(int32_t));
    return s;
}

// qtemp like the llama-4 temperature: 1 + 0.1 ln(1 + floor(pos / 4)), positions restarting
// at each segment.
static ag_tensor *qtemp_tensor(ag_arena *a, int64_t T, const int32_t *seg) {
    ag_tensor *t = ag_tensor_new1(a, AG_F64, T);
    int64_t p = 0;
    for (int64_t i = 0; i < T; i++) {
        p = (i > 0 && seg[i] == seg[i - 1]) ? p + 1 : 0;
        ag_set(t, i, 1 + 0.1 * log(1 + floor(p / 4.0)));
    }
    return t;
}

typedef struct {
    double scale;
    bool qk_same; // use in[0] as both q and k
} attn_args;

static ag_tensor *build_attn(ag_ctx *c, ag_tensor **in, void *user) {
    attn_args *a = user;
    return ag_attention(c, in[0], a->qk_same ? in[0] : in[1], in[2], in[3], in[4], a->scale);
}

typedef struct {
    dims d;
    int32_t seg[160];
    bool qtemp;
} attn_case;

static void fill_segments(int32_t *seg, int64_t T, int nseg) {
    for (int64_t t = 0; t < T; t++)
        seg[t] = (int32_t)(t * nseg / T);
}

static void make_inputs(ag_arena *a, ag_rng *r, const attn_case *ac, ag_tensor **in) {
    int64_t sq[3] = {ac->d.T, ac->d.H, ac->d.Dqk}, sv[3] = {ac->d.T, ac->d.H, ac->d.Dv};
    in[0] = gc_rand(a, r, 3, sq, -1, 1, true);
    in[1] = gc_rand(a, r, 3, sq, -1, 1, true);
    in[2] = gc_rand(a, r, 3, sv, -1, 1, true);
    in[3] = seg_tensor(a, ac->d.T, ac->seg);
    in[4] = ac->qtemp ? qtemp_tensor(a, ac->d.T, ac->seg) : NULL;
}

START_TEST(test_matches_brute_force) {
    attn_case cases[3] = {{.d = {9, 2, 6, 4}, .qtemp = true},
                          {.d = {70, 3, 5, 7}},
                          {.d = {150, 2, 8, 3}, .qtemp = true}};
    fill_segments(cases[0].seg, 9, 1);
    // interleaved segments (not contiguous): each token sees only earlier tokens of its id
    for (int t = 0; t < 70; t++)
        cases[1].seg[t] = (t * 7 % 3 == 0) ? 5 : (t % 2 ? -1 : 2);
    fill_segments(cases[2].seg, 150, 4);
    for (int ci = 0; ci < 3; ci++) {
        attn_case *ac = &cases[ci];
        ag_ctx c;
        ag_ctx_init(&c);
        ag_rng r;
        ag_rng_seed(&r, 70 + ci);
        ag_tensor *in[5];
        make_inputs(&c.act, &r, ac, in);
        double scale = 0.37, *want = malloc(sizeof(double) * (size_t)(ac->d.T * ac->d.H * ac->d.Dv));
        attention_brute(want, in[0], in[1], in[2], ac->seg, in[4], scale, ac->d);
        for (int ref = 0; ref < 2; ref++) {
            ag_set_reference_kernels(ref);
            for (int f32 = 0; f32 < 2; f32++) {
                ag_tensor *q = gc_clone(&c.act, in[0], f32 ? AG_F32 : AG_F64);
                ag_tensor *k = gc_clone(&c.act, in[1], f32 ? AG_F32 : AG_F64);
                ag_tensor *v = gc_clone(&c.act, in[2], f32 ? AG_F32 : AG_F64);
                ag_tensor *qt = gc_clone(&c.act, in[4], f32 ? AG_F32 : AG_F64);
                ag_tensor *y = ag_attention(&c, q, k, v, in[3], qt, scale);
                ck_assert_tensor(y);
                ck_assert_int_eq(y->shape[2], ac->d.Dv);
                double tol = f32 ? 2e-6 : 1e-13;
                for (int64_t i = 0; i < y->numel; i++)
                    ck_assert_msg(fabs(ag_get(y, i) - want[i]) <= tol,
                                  "case %d ref %d f32 %d elem %lld: %.17g vs %.17g", ci, ref, f32,
                                  (long long)i, ag_get(y, i), want[i]);
            }
        }
        ag_set_reference_kernels(false);
        free(want);
        ag_ctx_free(&c);
    }
}
END_TEST

static void gradcheck_case(const attn_case *ac, bool qk_same, uint64_t seed) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, seed);
    ag_tensor *in[5];
    make_inputs(&a, &r, ac, in);
    in[1]->requires_grad = !qk_same; // unused then
    attn_args args = {.scale = 0.8, .qk_same = qk_same};
    gc_case g = {.n_in = 5, .in = in, .build = build_attn, .user = &args};
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        gc_result res;
        ck_assert_ok(gc_gradcheck(&g, &res));
        ck_assert_msg(res.max_rel <= 1e-6, "T %lld H %lld: max rel %g at input %d elem %lld "
                      "(%g vs %g)", (long long)ac->d.T, (long long)ac->d.H, res.max_rel,
                      res.worst_input, (long long)res.worst_elem, res.analytic, res.numeric);
    }
    ag_set_reference_kernels(false);
    double rel;
    ck_assert_ok(gc_f32_vs_f64(&g, &rel));
    ck_assert_double_le(rel, 1e-5);
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_double_le(rel, 1e-5);
    ag_arena_free(&a);
}

START_TEST(test_gradcheck) {
    attn_case cases[] = {
        {.d = {1, 1, 1, 1}},
        {.d = {5, 2, 6, 4}},
        {.d = {5, 2, 6, 4}, .qtemp = true},
        {.d = {7, 3, 5, 3}, .qtemp = true},
        {.d = {6, 1, 3, 5}},
    };
    int nseg[] = {1, 1, 1, 2, 3};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        fill_segments(cases[i].seg, cases[i].d.T, nseg[i]);
        gradcheck_case(&cases[i], false, 200 + i);
    }
    // q and k the same tensor: both gradients must accumulate into it
    gradcheck_case(&cases[3], true, 300);
}
END_TEST

// Several query blocks of the optimized kernel, with and without segments and qtemp; the
// first case is large enough for the kernel to use its whole OpenMP team.
START_TEST(test_fast_vs_ref_large) {
    attn_case cases[] = {{.d = {160, 5, 24, 16}, .qtemp = true}, {.d = {130, 2, 7, 9}}};
    fill_segments(cases[0].seg, 160, 3);
    fill_segments(cases[1].seg, 130, 1);
    for (int i = 0; i < 2; i++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 500 + i);
        ag_tensor *in[5];
        make_inputs(&a, &r, &cases[i], in);
        attn_args args = {.scale = 0.3};
        gc_case g = {.n_in = 5, .in = in, .build = build_attn, .user = &args};
        double rel;
        ck_assert_ok(gc_fast_vs_ref(&g, &rel));
        ck_assert_double_le(rel, 1e-5);
        ck_assert_ok(gc_f32_vs_f64(&g, &rel));
        ck_assert_double_le(rel, 1e-5);
        ag_arena_free(&a);
    }
}
END_TEST

// Only the [T, H] log-sum-exp is kept for backward; nothing of size T x T anywhere.
START_TEST(test_memory_is_linear_in_T) {
    const int64_t T = 64, H = 4;
    attn_case ac = {.d = {T, H, 16, 8}, .qtemp = true};
    fill_segments(ac.seg, T, 2);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_arena p;
        ag_arena_init(&p, "params", 0);
        ag_rng r;
        ag_rng_seed(&r, 9);
        ag_tensor *in[5];
        make_inputs(&p, &r, &ac, in);
        ag_tensor *q = gc_clone(&p, in[0], AG_F32), *k = gc_clone(&p, in[1], AG_F32);
        ag_tensor *v = gc_clone(&p, in[2], AG_F32), *qt = gc_clone(&p, in[4], AG_F32);
        qt->requires_grad = false;
        size_t used0 = c.act.used;
        ag_tensor *y = ag_attention(&c, q, k, v, in[3], qt, 0.25);
        ck_assert_tensor(y);
        ck_assert_uint_eq(c.saved_peak, (size_t)(T * H) * sizeof(float));
        size_t out_bytes = (size_t)(T * H * 8) * sizeof(float);
        ck_assert_uint_le(c.act.used - used0, out_bytes + sizeof(ag_tensor) + 128);
        ag_tensor *l = ag_sum(&c, y);
        ck_assert_ok(ag_backward(&c, l));
        ck_assert_uint_eq(c.saved_bytes, 0);
        ck_assert_uint_eq(c.saved_peak, (size_t)(T * H) * sizeof(float));
        ag_ctx_free(&c);
        ag_arena_free(&p);
    }
    ag_set_reference_kernels(false);
}
END_TEST

// Rows [r0, r0 + n) of x (rows along the first dim) as a new tensor.
static ag_tensor *rows_of(ag_arena *a, const ag_tensor *x, int64_t r0, int64_t n) {
    int64_t s[AG_MAX_DIMS];
    memcpy(s, x->shape, sizeof s);
    s[0] = n;
    ag_tensor *y = ag_tensor_new(a, x->dtype, x->ndim, s);
    int64_t w = x->numel / x->shape[0];
    for (int64_t i = 0; i < n * w; i++)
        ag_set(y, i, ag_get(x, r0 * w + i));
    y->requires_grad = x->requires_grad;
    return y;
}

// out = attention, loss = sum(out * mask) with mask zero outside rows [r0, r0 + n).
static void run_masked(ag_ctx *c, ag_tensor **qkv, ag_tensor *seg, ag_tensor *qt, int64_t r0,
                       int64_t n, ag_tensor **out) {
    ag_tensor *y = ag_attention(c, qkv[0], qkv[1], qkv[2], seg, qt, 0.5);
    ck_assert_tensor(y);
    ag_tensor *m = ag_tensor_new(&c->act, y->dtype, 3, y->shape);
    int64_t w = y->shape[1] * y->shape[2];
    for (int64_t i = 0; i < y->numel; i++)
        ag_set(m, i, (i / w >= r0 && i / w < r0 + n) ? 0.25 + 0.01 * (double)((i - r0 * w) % 17) : 0.0);
    ck_assert_ok(ag_backward(c, ag_sum(c, ag_mul(c, y, m))));
    *out = y;
}

START_TEST(test_packed_equals_separate) {
    const int64_t TA = 5, TB = 6, T = TA + TB, H = 2;
    attn_case ac = {.d = {T, H, 6, 4}, .qtemp = true};
    for (int t = 0; t < T; t++)
        ac.seg[t] = t < TA ? 3 : 8;
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_arena p;
        ag_arena_init(&p, "params", 0);
        ag_rng r;
        ag_rng_seed(&r, 77);
        ag_tensor *in[5];
        make_inputs(&p, &r, &ac, in);
        ag_tensor *packed[3], *parts[2][3], *qt = gc_clone(&p, in[4], AG_F32);
        for (int j = 0; j < 3; j++) {
            packed[j] = gc_clone(&p, in[j], AG_F32);
            parts[0][j] = rows_of(&p, packed[j], 0, TA);
            parts[1][j] = rows_of(&p, packed[j], TA, TB);
        }
        int32_t zeros[16] = {0};
        ag_tensor *seg_a = seg_tensor(&p, TA, zeros), *seg_b = seg_tensor(&p, TB, zeros);
        ag_tensor *qt_a = rows_of(&p, qt, 0, TA), *qt_b = rows_of(&p, qt, TA, TB);
        // the loss looks at segment B only: segment A must get exactly zero gradient
        ag_ctx c;
        ag_ctx_init(&c);
        ag_tensor *yp, *yb, *ya;
        run_masked(&c, packed, in[3], qt, TA, TB, &yp);
        run_masked(&c, parts[1], seg_b, qt_b, 0, TB, &yb);
        run_masked(&c, parts[0], seg_a, qt_a, 0, 0, &ya);
        int64_t wv = H * 4, wq = H * 6;
        double tol = ref ? 0.0 : 1e-6; // the reference kernel adds the same terms in order
        for (int64_t i = 0; i < T * wv; i++) {
            double want = i < TA * wv ? ag_get(ya, i) : ag_get(yb, i - TA * wv);
            ck_assert_msg(fabs(ag_get(yp, i) - want) <= tol, "ref %d out %lld", ref, (long long)i);
        }
        for (int j = 0; j < 3; j++) {
            int64_t w = j == 2 ? wv : wq;
            ck_assert_ptr_nonnull(packed[j]->grad);
            for (int64_t i = 0; i < T * w; i++) {
                double g = ag_get(packed[j]->grad, i);
                if (i < TA * w)
                    ck_assert_msg(g == 0.0, "input %d row %lld got %g from the other segment", j,
                                  (long long)(i / w), g);
                else
                    ck_assert_msg(fabs(g - ag_get(parts[1][j]->grad, i - TA * w)) <= tol,
                                  "ref %d input %d grad %lld", ref, j, (long long)i);
            }
        }
        ag_ctx_free(&c);
        ag_arena_free(&p);
    }
    ag_set_reference_kernels(false);
}
END_TEST

START_TEST(test_not_recorded_without_grad) {
    ag_ctx c;
    ag_ctx_init(&c);
    int64_t s[3] = {4, 2, 3};
    ag_tensor *q = ag_tensor_new(&c.act, AG_F32, 3, s), *k = ag_tensor_new(&c.act, AG_F32, 3, s);
    ag_tensor *v = ag_tensor_new(&c.act, AG_F32, 3, s);
    int32_t sv[4] = {0, 0, 1, 1};
    ag_tensor *seg = seg_tensor(&c.act, 4, sv);
    q->requires_grad = true;
    ag_ctx_set_grad(&c, false);
    ck_assert_tensor(ag_attention(&c, q, k, v, seg, NULL, 1.0));
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert_uint_eq(c.saved_peak, 0);
    ag_ctx_set_grad(&c, true);
    ck_assert_tensor(ag_attention(&c, q, k, v, seg, NULL, 1.0));
    ck_assert_int_eq(c.n_tape, 1);
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_arena *a = &c.act;
    int64_t sq[3] = {4, 2, 6}, sk5[3] = {4, 2, 5}, sv[3] = {4, 2, 4}, sv3[3] = {4, 3, 4};
    ag_tensor *q = ag_tensor_new(a, AG_F32, 3, sq), *k = ag_tensor_new(a, AG_F32, 3, sq);
    ag_tensor *v = ag_tensor_new(a, AG_F32, 3, sv);
    ag_tensor *k64 = ag_tensor_new(a, AG_F64, 3, sq), *k5 = ag_tensor_new(a, AG_F32, 3, sk5);
    ag_tensor *vbad = ag_tensor_new(a, AG_F32, 3, sv3), *qi = ag_tensor_new(a, AG_I32, 3, sq);
    ag_tensor *q2 = ag_tensor_new2(a, AG_F32, 4, 12);
    int32_t s4[4] = {0, 0, 0, 0};
    ag_tensor *seg = seg_tensor(a, 4, s4), *seg5 = ag_tensor_new1(a, AG_I32, 5);
    ag_tensor *segf = ag_tensor_new1(a, AG_F32, 4);
    ag_tensor *qt = ag_tensor_new1(a, AG_F32, 4), *qt64 = ag_tensor_new1(a, AG_F64, 4);
    ag_tensor *qt3 = ag_tensor_new1(a, AG_F32, 3);
    struct {
        ag_tensor *q, *k, *v, *seg, *qt;
        double scale;
        const char *msg;
    } bad[] = {
        {NULL, k, v, seg, NULL, 1, "attention: q is NULL"},
        {qi, k, v, seg, NULL, 1, "attention: q is [4, 2, 6] i32, expected f32 or f64 (cast bf16/f16 first)"},
        {q, k64, v, seg, NULL, 1, "attention: q [4, 2, 6] f32 and k [4, 2, 6] f64 differ in dtype"},
        {q2, k, v, seg, NULL, 1, "attention: q is [4, 12] f32, expected 3 dims"},
        {q, k5, v, seg, NULL, 1, "attention: q [4, 2, 6] f32 and k [4, 2, 5] f32 differ in shape"},
        {q, k, vbad, seg, NULL, 1, "attention: v [4, 3, 4] f32 does not match q [4, 2, 6] f32 in T and H"},
        {q, k, v, NULL, NULL, 1, "attention: seg is NULL"},
        {q, k, v, segf, NULL, 1, "attention: seg is [4] f32, expected i32"},
        {q, k, v, seg5, NULL, 1, "attention: seg is [5] i32, expected [4]"},
        {q, k, v, seg, qt64, 1, "attention: q [4, 2, 6] f32 and qtemp [4] f64 differ in dtype"},
        {q, k, v, seg, qt3, 1, "attention: qtemp is [3] f32, expected [4]"},
        {q, k, v, seg, qt, NAN, "attention: scale is nan, expected a finite number"},
        {q, k, v, seg, qt, INFINITY, "attention: scale is inf, expected a finite number"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_ptr_null(ag_attention(&c, bad[i].q, bad[i].k, bad[i].v, bad[i].seg, bad[i].qt,
                                        bad[i].scale));
        ck_assert_str_eq(molt_err_msg(), bad[i].msg);
    }
    qt->requires_grad = true;
    ck_assert_ptr_null(ag_attention(&c, q, k, v, seg, qt, 1));
    ck_assert_str_eq(molt_err_msg(), "attention: qtemp requires grad, but the query temperature "
                                     "is not differentiated");
    ag_ctx_set_grad(&c, false); // nothing is differentiated then: allowed
    ck_assert_tensor(ag_attention(&c, q, k, v, seg, qt, 1));
    ag_ctx_free(&c);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_attention");
    TCase *tc = tcase_create("attention");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_matches_brute_force);
    tcase_add_test(tc, test_gradcheck);
    tcase_add_test(tc, test_fast_vs_ref_large);
    tcase_add_test(tc, test_memory_is_linear_in_T);
    tcase_add_test(tc, test_packed_equals_separate);
    tcase_add_test(tc, test_not_recorded_without_grad);
    tcase_add_test(tc, test_errors);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
