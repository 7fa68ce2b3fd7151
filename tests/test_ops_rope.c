// tests/test_ops_rope.c: rotary frequency tables (plain and YaRN, Mistral Small 4's numbers),
// ag_yarn_mscale, and ag_rope: against a direct implementation written here, float-angle
// semantics of the f32 path, gradient checks, f32 vs f64, fast vs reference, exact errors.
#include "harness/harness.h"
#include "autograd/internal.h"

#include <math.h>
#include <string.h>

static const double PI = 3.14159265358979323846;

static ag_rope_config small4_config(void) {
    return (ag_rope_config){.theta = 10000, .rot_dim = 64, .yarn = true, .factor = 128,
                            .original_max_pos = 8192, .beta_fast = 32, .beta_slow = 1,
                            .mscale = 1, .mscale_all_dim = 1};
}

START_TEST(test_yarn_mscale) {
    // SPECS: m = 0.1 * ln(128) + 1 = 1.48520 (0.1 * 4.85203 + 1)
    ck_assert_double_eq_tol(ag_yarn_mscale(128, 1), 1.48520, 5e-6);
    ck_assert_double_eq_tol(ag_yarn_mscale(128, 1), 0.1 * log(128.0) + 1, 1e-15);
    ck_assert_double_eq_tol(ag_yarn_mscale(40, 0.707), 0.0707 * log(40.0) + 1, 1e-15);
    ck_assert_double_eq(ag_yarn_mscale(1, 5), 1.0);   // no scaling at factor 1
    ck_assert_double_eq(ag_yarn_mscale(0.5, 1), 1.0); // nor below
    // the attention scale of SPECS section 2: d^-0.5 * m^2 for head dim 128 -> 0.194969
    double m = ag_yarn_mscale(128, 1);
    ck_assert_double_eq_tol(m * m / sqrt(128.0), 0.194969, 5e-7);
}
END_TEST

START_TEST(test_table_plain) {
    ag_rope_table t;
    ag_rope_config cfg = {.theta = 10000, .rot_dim = 8};
    ck_assert_ok(ag_rope_table_init(&t, &cfg));
    ck_assert_int_eq(t.rot_dim, 8);
    ck_assert_double_eq(t.attn_factor, 1.0);
    // 10000^(-2i/8) = 10^-i
    double want[4] = {1, 0.1, 0.01, 0.001};
    for (int i = 0; i < 4; i++)
        ck_assert_double_eq_tol(t.inv_freq[i], want[i], 1e-16);
    cfg = (ag_rope_config){.theta = 500000, .rot_dim = 128};
    ck_assert_ok(ag_rope_table_init(&t, &cfg));
    for (int i = 0; i < 64; i++)
        ck_assert_double_eq_tol(t.inv_freq[i], exp(-log(500000.0) * i / 64.0), 1e-15);
}
END_TEST

// YaRN written from the paper's definitions, independently of the library: the pair index
// at which a frequency makes `beta` turns over the original context is the i solving
// orig * inv_freq_i / (2 pi) = beta with inv_freq_i = theta^(-2i/d).
static void yarn_expected(const ag_rope_config *c, double *inv, double *attn) {
    int half = c->rot_dim / 2;
    double i_fast = half * log(c->original_max_pos / (2 * PI * c->beta_fast)) / log(c->theta);
    double i_slow = half * log(c->original_max_pos / (2 * PI * c->beta_slow)) / log(c->theta);
    double lo = floor(i_fast), hi = ceil(i_slow);
    if (lo < 0)
        lo = 0;
    if (hi > c->rot_dim - 1)
        hi = c->rot_dim - 1;
    if (lo == hi)
        hi += 0.001;
    for (int i = 0; i < half; i++) {
        double f = exp(-2.0 * i / c->rot_dim * log(c->theta));
        double w = (i - lo) / (hi - lo); // weight of the interpolated frequency
        w = w < 0 ? 0 : w > 1 ? 1 : w;
        inv[i] = (1 - w) * f + w * f / c->factor;
    }
    double g = c->factor > 1 ? 1 + 0.1 * log(c->factor) : 1;
    double gm = c->factor > 1 ? 1 + 0.1 * c->mscale * log(c->factor) : 1;
    double ga = c->factor > 1 ? 1 + 0.1 * c->mscale_all_dim * log(c->factor) : 1;
    *attn = (c->mscale != 0 && c->mscale_all_dim != 0) ? gm / ga : g;
}

static void check_against_expected(const ag_rope_config *cfg) {
    ag_rope_table t;
    double inv[256], attn;
    ck_assert_ok(ag_rope_table_init(&t, cfg));
    yarn_expected(cfg, inv, &attn);
    for (int i = 0; i < cfg->rot_dim / 2; i++)
        ck_assert_msg(fabs(t.inv_freq[i] - inv[i]) <= 1e-13 * inv[i], "inv_freq[%d] %.17g vs %.17g",
                      i, t.inv_freq[i], inv[i]);
    ck_assert_double_eq_tol(t.attn_factor, attn, 1e-15);
}

START_TEST(test_table_small4) {
    ag_rope_config cfg = small4_config();
    check_against_expected(&cfg);
    // By hand: the correction dims are 32 ln(8192/(64 pi)) / ln(10^4) = 12.88 -> 12 and
    // 32 ln(8192/(2 pi)) / ln(10^4) = 24.92 -> 25, so pairs 0..12 keep theta^(-2i/64), pairs
    // 25..31 are divided by 128, and in between the weight of the divided one is (i-12)/13.
    ag_rope_table t;
    ck_assert_ok(ag_rope_table_init(&t, &cfg));
    ck_assert_double_eq_tol(t.inv_freq[0], 1.0, 1e-16);
    ck_assert_double_eq_tol(t.inv_freq[12], pow(10.0, -1.5), 1e-17);                // 10^(-4*24/64)
    ck_assert_double_eq_tol(t.inv_freq[16], (4.0 / 13) / 12800 + (9.0 / 13) / 100, 1e-17);
    ck_assert_double_eq_tol(t.inv_freq[25], pow(10.0, -3.125) / 128, 1e-19);        // 10^(-4*50/64)
    ck_assert_double_eq_tol(t.inv_freq[31], pow(10.0, -3.875) / 128, 1e-20);
    ck_assert_double_gt(t.inv_freq[13], pow(10.0, -4.0 * 26 / 64) / 128);           // strictly blended
    ck_assert_double_lt(t.inv_freq[13], pow(10.0, -4.0 * 26 / 64));
    ck_assert_double_eq(t.attn_factor, 1.0); // mscale == mscale_all_dim
}
END_TEST

START_TEST(test_table_yarn_variants) {
    // DeepSeek-V3 style numbers, the attention factor from both mscales, from one (the other
    // "absent"), a range clamped at 0 and at d - 1, and factor 1 (no change at all).
    ag_rope_config v[] = {
        {.theta = 10000, .rot_dim = 64, .yarn = true, .factor = 40, .original_max_pos = 4096,
         .beta_fast = 32, .beta_slow = 1, .mscale = 1, .mscale_all_dim = 0.707},
        {.theta = 10000, .rot_dim = 64, .yarn = true, .factor = 40, .original_max_pos = 4096,
         .beta_fast = 32, .beta_slow = 1, .mscale = 1, .mscale_all_dim = 0},
        {.theta = 10000, .rot_dim = 16, .yarn = true, .factor = 4, .original_max_pos = 10,
         .beta_fast = 32, .beta_slow = 1, .mscale = 1, .mscale_all_dim = 1},
        {.theta = 100, .rot_dim = 16, .yarn = true, .factor = 8, .original_max_pos = 1e12,
         .beta_fast = 32, .beta_slow = 1, .mscale = 2, .mscale_all_dim = 1},
        {.theta = 10000, .rot_dim = 32, .yarn = true, .factor = 1, .original_max_pos = 2048,
         .beta_fast = 32, .beta_slow = 1, .mscale = 1, .mscale_all_dim = 1},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        check_against_expected(&v[i]);
    ag_rope_table t;
    ck_assert_ok(ag_rope_table_init(&t, &v[1]));
    ck_assert_double_eq_tol(t.attn_factor, 0.1 * log(40.0) + 1, 1e-15);
    ck_assert_ok(ag_rope_table_init(&t, &v[4]));
    for (int i = 0; i < 16; i++)
        ck_assert_double_eq_tol(t.inv_freq[i], pow(10000.0, -2.0 * i / 32), 1e-16);
}
END_TEST

static void expect_table_error(ag_rope_config cfg, const char *msg) {
    ag_rope_table t;
    memset(&t, 0x5a, sizeof t);
    ck_assert_int_eq(ag_rope_table_init(&t, &cfg), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), msg);
    ck_assert_int_eq(t.rot_dim, 0x5a5a5a5a); // untouched on error
}

START_TEST(test_table_errors) {
    ag_rope_config ok = small4_config(), c;
    c = ok, c.rot_dim = 7;
    expect_table_error(c, "rope_table: rot_dim is 7, expected an even number in 2..512");
    c = ok, c.rot_dim = 0;
    expect_table_error(c, "rope_table: rot_dim is 0, expected an even number in 2..512");
    c = ok, c.rot_dim = 514;
    expect_table_error(c, "rope_table: rot_dim is 514, expected an even number in 2..512");
    c = ok, c.theta = 0;
    expect_table_error(c, "rope_table: theta is 0, expected a finite number > 0");
    c = ok, c.theta = 1;
    expect_table_error(c, "rope_table: theta (yarn) is 1, expected a finite number > 1");
    c = ok, c.factor = 0.5;
    expect_table_error(c, "rope_table: yarn factor is 0.5, expected a finite number >= 1");
    c = ok, c.factor = INFINITY;
    expect_table_error(c, "rope_table: yarn factor is inf, expected a finite number >= 1");
    c = ok, c.original_max_pos = 0;
    expect_table_error(c, "rope_table: yarn original_max_pos is 0, expected a finite number > 0");
    c = ok, c.beta_fast = -1;
    expect_table_error(c, "rope_table: yarn beta_fast is -1, expected a finite number > 0");
    c = ok, c.beta_slow = 0;
    expect_table_error(c, "rope_table: yarn beta_slow is 0, expected a finite number > 0");
    c = ok, c.mscale = NAN;
    expect_table_error(c, "rope_table: yarn mscale is nan, expected a finite number >= 0");
    c = ok, c.mscale_all_dim = -1;
    expect_table_error(c, "rope_table: yarn mscale_all_dim is -1, expected a finite number >= 0");
    // theta 1 is legal without YaRN (every frequency 1)
    c = (ag_rope_config){.theta = 1, .rot_dim = 4};
    ag_rope_table t;
    ck_assert_ok(ag_rope_table_init(&t, &c));
    ck_assert_int_eq(ag_rope_table_init(NULL, &c), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "rope_table: table is NULL");
    ck_assert_int_eq(ag_rope_table_init(&t, NULL), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "rope_table: cfg is NULL");
}
END_TEST

// ---- ag_rope against a direct implementation ----------------------------------------------

// Direct rope in double: each pair as a complex number times e^{i angle}, real parts to the
// first half of the slice, imaginary parts to the second.
static void rope_direct(double *y, const double *x, const int32_t *pos, const ag_rope_table *t,
                        int64_t T, int64_t rows, int64_t D, int start) {
    int half = t->rot_dim / 2;
    for (int64_t r = 0; r < T * rows; r++) {
        const double *xr = x + r * D;
        double *yr = y + r * D;
        memcpy(yr, xr, (size_t)D * sizeof *yr);
        double re[256], im[256];
        for (int i = 0; i < half; i++) {
            re[i] = xr[start + 2 * i];
            im[i] = xr[start + 2 * i + 1];
        }
        for (int i = 0; i < half; i++) {
            double a = pos[r / rows] * t->inv_freq[i], cr = t->attn_factor * cos(a),
                   ci = t->attn_factor * sin(a);
            yr[start + i] = re[i] * cr - im[i] * ci;
            yr[start + half + i] = re[i] * ci + im[i] * cr;
        }
    }
}

static ag_tensor *pos_tensor(ag_arena *a, int64_t T, const int32_t *vals) {
    ag_tensor *p = ag_tensor_new1(a, AG_I32, T);
    memcpy(p->data, vals, (size_t)T * sizeof(int32_t));
    return p;
}

typedef struct {
    const ag_rope_table *table;
    int start;
} rope_args;

static ag_tensor *build_rope(ag_ctx *c, ag_tensor **in, void *user) {
    rope_args *a = user;
    return ag_rope(c, in[0], in[1], a->table, a->start);
}

typedef struct {
    int ndim;
    int64_t shape[4];
    int rot, start;
    bool yarn;
} rope_case;

static const rope_case rope_cases[] = {
    {2, {3, 8}, 8, 0, false},
    {3, {4, 2, 10}, 6, 3, true},
    {4, {5, 2, 3, 7}, 4, 1, true},
    {3, {6, 1, 64}, 64, 0, true},
};

static void table_for(ag_rope_table *t, const rope_case *rc) {
    // with mscale_all_dim "absent" the cos/sin factor is 1 + 0.1 ln 16, exercising it
    ag_rope_config cfg = {.theta = 10000, .rot_dim = rc->rot, .yarn = rc->yarn, .factor = 16,
                          .original_max_pos = 64, .beta_fast = 32, .beta_slow = 1, .mscale = 1};
    ck_assert_ok(ag_rope_table_init(t, &cfg));
}

START_TEST(test_rope_matches_direct) {
    for (size_t ci = 0; ci < sizeof rope_cases / sizeof rope_cases[0]; ci++) {
        const rope_case *rc = &rope_cases[ci];
        ag_rope_table tb;
        table_for(&tb, rc);
        ck_assert(!rc->yarn || tb.attn_factor > 1.2);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_rng r;
        ag_rng_seed(&r, 10 + ci);
        ag_tensor *x = gc_rand(&c.act, &r, rc->ndim, rc->shape, -1, 1, false);
        int64_t T = rc->shape[0], D = rc->shape[rc->ndim - 1];
        int32_t pv[8] = {0, 1, 7, 100, 4096, 65537, 3, 12};
        ag_tensor *pos = pos_tensor(&c.act, T, pv);
        double want[1024];
        ck_assert_int_le(x->numel, 1024);
        rope_direct(want, x->data, pv, &tb, T, x->numel / (T * D), D, rc->start);
        for (int ref = 0; ref < 2; ref++) {
            ag_set_reference_kernels(ref);
            ag_tensor *y = ag_rope(&c, x, pos, &tb, rc->start);
            ck_assert_tensor(y);
            for (int64_t i = 0; i < x->numel; i++)
                ck_assert_msg(fabs(ag_get(y, i) - want[i]) <= 1e-14, "case %zu ref %d elem %lld",
                              ci, ref, (long long)i);
        }
        ag_set_reference_kernels(false);
        ag_ctx_free(&c);
    }
}
END_TEST

// f32: angle = float(pos) * float(inv_freq) in float, as transformers computes it.
START_TEST(test_rope_f32_uses_float_angles) {
    ag_rope_table tb;
    ag_rope_config cfg = {.theta = 10000, .rot_dim = 8};
    ck_assert_ok(ag_rope_table_init(&tb, &cfg));
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, 2, 8);
    for (int i = 0; i < 16; i++)
        ag_set(x, i, 0.25 + 0.1 * i);
    int32_t pv[2] = {1000003, 5};
    ag_tensor *pos = pos_tensor(&c.act, 2, pv);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_tensor *y = ag_rope(&c, x, pos, &tb, 0);
        ck_assert_tensor(y);
        double max_vs_double = 0;
        for (int t = 0; t < 2; t++)
            for (int i = 0; i < 4; i++) {
                float fa = (float)pv[t] * (float)tb.inv_freq[i];
                float xe = (float)ag_get(x, t * 8 + 2 * i), xo = (float)ag_get(x, t * 8 + 2 * i + 1);
                float w0 = xe * cosf(fa) - xo * sinf(fa), w1 = xo * cosf(fa) + xe * sinf(fa);
                ck_assert_double_eq_tol(ag_get(y, t * 8 + i), w0, 2e-6);
                ck_assert_double_eq_tol(ag_get(y, t * 8 + 4 + i), w1, 2e-6);
                double da = pv[t] * tb.inv_freq[i];
                double d0 = xe * cos(da) - xo * sin(da);
                max_vs_double = fmax(max_vs_double, fabs(d0 - w0));
            }
        // at position ~1e6 float angles are visibly off the exact ones; that is the contract
        ck_assert_double_gt(max_vs_double, 1e-3);
    }
    ag_set_reference_kernels(false);
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_rope_gradcheck) {
    for (size_t ci = 0; ci < sizeof rope_cases / sizeof rope_cases[0]; ci++) {
        const rope_case *rc = &rope_cases[ci];
        ag_rope_table tb;
        table_for(&tb, rc);
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 40 + ci);
        int32_t pv[8] = {3, 0, 17, 9, 30, 1, 22, 5};
        ag_tensor *in[2] = {gc_rand(&a, &r, rc->ndim, rc->shape, -1, 1, true),
                            pos_tensor(&a, rc->shape[0], pv)};
        rope_args args = {&tb, rc->start};
        gc_case g = {.n_in = 2, .in = in, .build = build_rope, .user = &args};
        for (int ref = 0; ref < 2; ref++) {
            ag_set_reference_kernels(ref);
            gc_result res;
            ck_assert_ok(gc_gradcheck(&g, &res));
            ck_assert_int_eq(res.checked, in[0]->numel);
            ck_assert_msg(res.max_rel <= 1e-6, "case %zu: max rel %g at elem %lld (%g vs %g)", ci,
                          res.max_rel, (long long)res.worst_elem, res.analytic, res.numeric);
        }
        ag_set_reference_kernels(false);
        double rel;
        ck_assert_ok(gc_f32_vs_f64(&g, &rel));
        ck_assert_double_le(rel, 1e-5);
        ck_assert_ok(gc_fast_vs_ref(&g, &rel));
        ck_assert_double_le(rel, 1e-6);
        ag_arena_free(&a);
    }
}
END_TEST

// Large enough for the optimized kernels to spread positions over threads.
START_TEST(test_rope_fast_vs_ref_large) {
    rope_case rc = {3, {64, 8, 80}, 64, 16, true};
    ag_rope_table tb;
    table_for(&tb, &rc);
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 8);
    int32_t pv[64];
    for (int t = 0; t < 64; t++)
        pv[t] = t * 37 % 101;
    ag_tensor *in[2] = {gc_rand(&a, &r, rc.ndim, rc.shape, -1, 1, true), pos_tensor(&a, 64, pv)};
    rope_args args = {&tb, rc.start};
    gc_case g = {.n_in = 2, .in = in, .build = build_rope, .user = &args};
    double rel;
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_double_le(rel, 1e-6);
    ag_arena_free(&a);
}
END_TEST

// With attn_factor 1 the rotation is orthogonal: for L = sum(y*y)/2, dL/dx = R^T R x = x.
START_TEST(test_rope_backward_is_transpose) {
    ag_rope_table tb;
    ag_rope_config cfg = {.theta = 10000, .rot_dim = 6};
    ck_assert_ok(ag_rope_table_init(&tb, &cfg));
    ag_ctx c;
    ag_ctx_init(&c);
    ag_rng r;
    ag_rng_seed(&r, 3);
    int64_t s[3] = {4, 3, 9};
    ag_tensor *x = gc_rand(&c.act, &r, 3, s, -1, 1, true);
    int32_t pv[4] = {0, 5, 11, 1000};
    ag_tensor *y = ag_rope(&c, x, pos_tensor(&c.act, 4, pv), &tb, 2);
    ck_assert_tensor(y);
    ag_tensor *l = ag_scale(&c, ag_sum(&c, ag_mul(&c, y, y)), 0.5);
    ck_assert_ok(ag_backward(&c, l));
    for (int64_t i = 0; i < x->numel; i++)
        ck_assert_double_eq_tol(ag_get(x->grad, i), ag_get(x, i), 1e-14);
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_rope_errors) {
    ag_rope_table tb, zero;
    memset(&zero, 0, sizeof zero);
    ag_rope_config cfg = {.theta = 10000, .rot_dim = 4};
    ck_assert_ok(ag_rope_table_init(&tb, &cfg));
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, 3, 6), *x1 = ag_tensor_new1(&c.act, AG_F32, 6);
    ag_tensor *xi = ag_tensor_new2(&c.act, AG_I32, 3, 6);
    ag_tensor *p = ag_tensor_new1(&c.act, AG_I32, 3), *p2 = ag_tensor_new1(&c.act, AG_I32, 2);
    ag_tensor *pf = ag_tensor_new1(&c.act, AG_F32, 3);
    ck_assert_ptr_null(ag_rope(&c, x1, p, &tb, 0));
    ck_assert_str_eq(molt_err_msg(), "rope: x is [6] f32, expected 2..4 dims");
    ck_assert_ptr_null(ag_rope(&c, xi, p, &tb, 0));
    ck_assert_str_eq(molt_err_msg(), "rope: x is [3, 6] i32, expected f32 or f64 (cast bf16/f16 first)");
    ck_assert_ptr_null(ag_rope(&c, NULL, p, &tb, 0));
    ck_assert_str_eq(molt_err_msg(), "rope: x is NULL");
    ck_assert_ptr_null(ag_rope(&c, x, pf, &tb, 0));
    ck_assert_str_eq(molt_err_msg(), "rope: pos is [3] f32, expected i32");
    ck_assert_ptr_null(ag_rope(&c, x, p2, &tb, 0));
    ck_assert_str_eq(molt_err_msg(),
                     "rope: pos is [2] i32, expected [3] (one position per row of x [3, 6] f32)");
    ck_assert_ptr_null(ag_rope(&c, x, p, NULL, 0));
    ck_assert_str_eq(molt_err_msg(), "rope: table is NULL");
    ck_assert_ptr_null(ag_rope(&c, x, p, &zero, 0));
    ck_assert_str_eq(molt_err_msg(), "rope: table has rot_dim 0, expected an even number in "
                                     "2..512 (set it up with ag_rope_table_init)");
    ck_assert_ptr_null(ag_rope(&c, x, p, &tb, 3));
    ck_assert_str_eq(molt_err_msg(), "rope: rotary dims [3, 7) do not fit in the last dim of x "
                                     "[3, 6] f32");
    ck_assert_ptr_null(ag_rope(&c, x, p, &tb, -1));
    ck_assert_str_eq(molt_err_msg(), "rope: rotary dims [-1, 3) do not fit in the last dim of x "
                                     "[3, 6] f32");
    ((int32_t *)p->data)[2] = -4;
    ck_assert_ptr_null(ag_rope(&c, x, p, &tb, 2));
    ck_assert_str_eq(molt_err_msg(), "rope: pos[2] is -4, expected >= 0");
    ((int32_t *)p->data)[2] = 0;
    ck_assert_ptr_nonnull(ag_rope(&c, x, p, &tb, 2)); // the last dims exactly
    ck_assert_int_eq(c.n_tape, 0);                    // nothing requires grad
    ag_ctx_free(&c);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_rope");
    TCase *tc = tcase_create("rope");
    tcase_add_test(tc, test_yarn_mscale);
    tcase_add_test(tc, test_table_plain);
    tcase_add_test(tc, test_table_small4);
    tcase_add_test(tc, test_table_yarn_variants);
    tcase_add_test(tc, test_table_errors);
    tcase_add_test(tc, test_rope_matches_direct);
    tcase_add_test(tc, test_rope_f32_uses_float_angles);
    tcase_add_test(tc, test_rope_gradcheck);
    tcase_add_test(tc, test_rope_fast_vs_ref_large);
    tcase_add_test(tc, test_rope_backward_is_transpose);
    tcase_add_test(tc, test_rope_errors);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
