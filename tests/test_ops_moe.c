// tests/test_ops_moe.c: the MoE router (selection against brute force, group limiting, ties,
// gradients, errors) and the routed experts (forward against direct sums, gradients w.r.t. x
// and the routing weights, optimized vs reference kernels, errors), then both composed.
#include "harness/harness.h"
#include "autograd/internal.h"

#include <math.h>
#include <string.h>

#define MAXE 16

// ---- helpers -------------------------------------------------------------------------------

// Logits whose values in a row are a shuffled progression with step 0.45 plus noise in
// [-0.05, 0.05]: every pair differs by >= 0.35, so finite-difference steps never change
// which experts are chosen. (Group scores are not separated by construction; a flip there
// would show as a gross gradient mismatch, not pass silently.)
static ag_tensor *separated_logits(ag_arena *a, ag_rng *r, int64_t T, int64_t E, bool grad) {
    ag_tensor *l = ag_tensor_new2(a, AG_F64, T, E);
    int perm[MAXE];
    for (int64_t t = 0; t < T; t++) {
        for (int e = 0; e < E; e++)
            perm[e] = e;
        for (int e = (int)E - 1; e > 0; e--) {
            int s = (int)(ag_rng_next(r) % (uint64_t)(e + 1)), tmp = perm[e];
            perm[e] = perm[s];
            perm[s] = tmp;
        }
        for (int64_t e = 0; e < E; e++)
            ag_set(l, t * E + e, 0.45 * perm[e] - 0.2 * (double)E + 0.1 * ag_rng_uniform(r) - 0.05);
    }
    l->requires_grad = grad;
    return l;
}

static void softmax_ref(double *p, const double *l, int E) {
    double m = l[0], s = 0;
    for (int e = 1; e < E; e++)
        m = fmax(m, l[e]);
    for (int e = 0; e < E; e++)
        s += (p[e] = exp(l[e] - m));
    for (int e = 0; e < E; e++)
        p[e] /= s;
}

static int popcount(unsigned v) {
    int n = 0;
    for (; v; v &= v - 1)
        n++;
    return n;
}

// Brute force selection of one row: the best scoring pair of each group, then the subset of
// topk_group groups with the largest total, then the k-subset of their experts with the
// largest total prob. Returns the chosen set as a bit mask; p gets the softmax.
static unsigned brute_select(const double *l, int E, const ag_router_config *cfg, double *p) {
    softmax_ref(p, l, E);
    int gsz = E / cfg->n_group;
    double gscore[MAXE];
    for (int g = 0; g < cfg->n_group; g++) {
        double best = gsz == 1 ? p[g] : -1;
        for (int i = 0; i < gsz; i++)
            for (int j = i + 1; j < gsz; j++)
                best = fmax(best, p[g * gsz + i] + p[g * gsz + j]);
        gscore[g] = best;
    }
    unsigned best_groups = 0;
    double best_sum = -1;
    for (unsigned m = 0; m < (1u << cfg->n_group); m++) {
        if (popcount(m) != cfg->topk_group)
            continue;
        double s = 0;
        for (int g = 0; g < cfg->n_group; g++)
            if (m & (1u << g))
                s += gscore[g];
        if (s > best_sum) {
            best_sum = s;
            best_groups = m;
        }
    }
    unsigned best_set = 0;
    best_sum = -1;
    for (unsigned m = 0; m < (1u << E); m++) {
        if (popcount(m) != cfg->top_k)
            continue;
        double s = 0;
        bool ok = true;
        for (int e = 0; e < E; e++)
            if (m & (1u << e)) {
                ok = ok && (best_groups & (1u << (e / gsz)));
                s += p[e];
            }
        if (ok && s > best_sum) {
            best_sum = s;
            best_set = m;
        }
    }
    return best_set;
}

static ag_tensor *build_router(ag_ctx *c, ag_tensor **in, void *user) {
    ag_tensor *idx;
    return ag_moe_router(c, in[0], user, &idx);
}

typedef struct {
    int64_t T, E;
    ag_router_config cfg;
} router_case;

static const router_case router_cases[] = {
    {3, 4, {1, 1, 1, false, 1.0}},
    {5, 6, {2, 1, 1, false, 2.5}},
    {4, 6, {3, 1, 1, true, 1.0}},
    {4, 8, {3, 4, 2, true, 1.5}},
    {7, 12, {4, 3, 2, false, 0.7}},
    {3, 9, {2, 3, 1, true, 1.0}},
    {5, 10, {3, 5, 3, true, 2.0}},
};
#define N_ROUTER_CASES (int)(sizeof router_cases / sizeof router_cases[0])

// ---- router ----------------------------------------------------------------------------------

START_TEST(test_router_matches_brute_force) {
    for (int ci = 0; ci < N_ROUTER_CASES; ci++) {
        const router_case *rc = &router_cases[ci];
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 40 + ci);
        ag_ctx c;
        ag_ctx_init(&c);
        // plain uniform logits here (not the separated ones): selection only, no gradients
        int64_t shape[2] = {rc->T * 4, rc->E};
        ag_tensor *l = gc_rand(&a, &r, 2, shape, -2, 2, false), *idx = NULL;
        ag_tensor *w = ag_moe_router(&c, l, &rc->cfg, &idx);
        ck_assert_tensor(w);
        ck_assert_tensor(idx);
        ck_assert_int_eq(idx->dtype, AG_I32);
        int k = rc->cfg.top_k;
        ck_assert_int_eq(w->shape[0], shape[0]);
        ck_assert_int_eq(w->shape[1], k);
        for (int64_t t = 0; t < shape[0]; t++) {
            double p[MAXE];
            unsigned want = brute_select((const double *)l->data + t * rc->E, (int)rc->E,
                                         &rc->cfg, p);
            unsigned got = 0;
            double sel = 0;
            for (int j = 0; j < k; j++) {
                int e = (int)ag_get(idx, t * k + j);
                ck_assert(e >= 0 && e < rc->E);
                got |= 1u << e;
                sel += p[e];
                if (j > 0) // descending order of score
                    ck_assert(p[e] <= p[(int)ag_get(idx, t * k + j - 1)]);
            }
            ck_assert_msg(got == want, "case %d row %lld: chose %#x, brute force %#x", ci,
                          (long long)t, got, want);
            for (int j = 0; j < k; j++) {
                double pe = p[(int)ag_get(idx, t * k + j)];
                double ww = (rc->cfg.norm_topk_prob ? pe / (sel + 1e-20) : pe) * rc->cfg.scaling;
                ck_assert_double_eq_tol(ag_get(w, t * k + j), ww, 1e-14);
            }
        }
        ag_ctx_free(&c);
        ag_arena_free(&a);
    }
}
END_TEST

// Runs the router on one row of logits (f64) and returns idx/weights through the arrays.
static void route_row(const double *logits, int E, ag_router_config cfg, int *idx, double *w) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *l = ag_tensor_new2(&c.act, AG_F64, 1, E), *ix = NULL;
    for (int e = 0; e < E; e++)
        ag_set(l, e, logits[e]);
    ag_tensor *y = ag_moe_router(&c, l, &cfg, &ix);
    ck_assert_tensor(y);
    for (int j = 0; j < cfg.top_k; j++) {
        idx[j] = (int)ag_get(ix, j);
        w[j] = ag_get(y, j);
    }
    ag_ctx_free(&c);
}

START_TEST(test_router_group_limit_changes_choice) {
    // probs {0.40, 0.01 | 0.30, 0.29}: expert 0 has the best score, but group 1's top-2 sum
    // (0.59) beats group 0's (0.41), so with one kept group expert 0 is not eligible.
    double l[4] = {log(0.40), log(0.01), log(0.30), log(0.29)}, w[2];
    int idx[2];
    route_row(l, 4, (ag_router_config){1, 2, 1, false, 1.0}, idx, w);
    ck_assert_int_eq(idx[0], 2);
    ck_assert_double_eq_tol(w[0], 0.30, 1e-15);
    route_row(l, 4, (ag_router_config){1, 2, 2, false, 1.0}, idx, w);
    ck_assert_int_eq(idx[0], 0);
    route_row(l, 4, (ag_router_config){1, 1, 1, true, 3.0}, idx, w);
    ck_assert_int_eq(idx[0], 0);
    ck_assert_double_eq_tol(w[0], 3.0, 1e-15); // one expert normalized: scaling itself
    route_row(l, 4, (ag_router_config){2, 2, 1, true, 2.0}, idx, w);
    ck_assert_int_eq(idx[0], 2);
    ck_assert_int_eq(idx[1], 3);
    ck_assert_double_eq_tol(w[0], 2.0 * 0.30 / 0.59, 1e-14);
    ck_assert_double_eq_tol(w[1], 2.0 * 0.29 / 0.59, 1e-14);
}
END_TEST

START_TEST(test_router_ties_lowest_index_first) {
    double flat[6] = {0, 0, 0, 0, 0, 0}, w[3];
    int idx[3];
    route_row(flat, 6, (ag_router_config){3, 1, 1, true, 1.0}, idx, w);
    for (int j = 0; j < 3; j++) {
        ck_assert_int_eq(idx[j], j);
        ck_assert_double_eq_tol(w[j], 1.0 / 3, 1e-15);
    }
    double part[5] = {1, 3, 3, 0, 3};
    route_row(part, 5, (ag_router_config){2, 1, 1, false, 1.0}, idx, w);
    ck_assert_int_eq(idx[0], 1);
    ck_assert_int_eq(idx[1], 2);
    // equal group scores: the lower group is kept
    route_row(flat, 6, (ag_router_config){2, 3, 1, false, 1.0}, idx, w);
    ck_assert_int_eq(idx[0], 0);
    ck_assert_int_eq(idx[1], 1);
    // groups of one expert score by their single prob: keep experts 1 and 2
    double single[3] = {0.1, 0.5, 0.3};
    route_row(single, 3, (ag_router_config){2, 3, 2, false, 1.0}, idx, w);
    ck_assert_int_eq(idx[0], 1);
    ck_assert_int_eq(idx[1], 2);
}
END_TEST

START_TEST(test_router_nan_logits_give_valid_indices) {
    // NaN in, NaN weights out, but never an index the experts op would refuse
    double l[6] = {NAN, 0.5, NAN, 1.0, -1.0, NAN}, w[3];
    int idx[3];
    const ag_router_config cfgs[2] = {{3, 1, 1, true, 1.0}, {3, 3, 2, true, 1.0}};
    for (int ci = 0; ci < 2; ci++) {
        route_row(l, 6, cfgs[ci], idx, w);
        for (int j = 0; j < 3; j++) {
            ck_assert(idx[j] >= 0 && idx[j] < 6);
            for (int i = 0; i < j; i++)
                ck_assert_int_ne(idx[i], idx[j]);
        }
    }
}
END_TEST

START_TEST(test_router_gradcheck) {
    for (int ci = 0; ci < N_ROUTER_CASES; ci++) {
        const router_case *rc = &router_cases[ci];
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 70 + ci);
        ag_tensor *in[1] = {separated_logits(&a, &r, rc->T, rc->E, true)};
        gc_case g = {.n_in = 1, .in = in, .build = build_router, .user = (void *)&rc->cfg};
        for (int ref = 0; ref < 2; ref++) {
            ag_set_reference_kernels(ref);
            gc_result res;
            ck_assert_ok(gc_gradcheck(&g, &res));
            ck_assert_int_eq(res.checked, rc->T * rc->E);
            ck_assert_msg(res.max_rel <= 1e-6, "case %d: max rel %g at elem %lld (%g vs %g)",
                          ci, res.max_rel, (long long)res.worst_elem, res.analytic, res.numeric);
        }
        double rel;
        ck_assert_ok(gc_f32_vs_f64(&g, &rel));
        ck_assert_double_le(rel, 1e-5);
        ck_assert_ok(gc_fast_vs_ref(&g, &rel));
        ck_assert_double_le(rel, 1e-6);
        ag_arena_free(&a);
    }
}
END_TEST

// Enough rows for the optimized router to use threads: rows are independent, so the
// result must be identical to the serial reference.
START_TEST(test_router_parallel_matches_serial) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 12);
    int64_t shape[2] = {2100, 8};
    ag_tensor *l = gc_rand(&a, &r, 2, shape, -3, 3, false), *idx[2], *w[2];
    ag_router_config cfg = {3, 4, 2, true, 1.5};
    ag_ctx c;
    ag_ctx_init(&c);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        w[ref] = ag_moe_router(&c, l, &cfg, &idx[ref]);
        ck_assert_tensor(w[ref]);
    }
    ck_assert_mem_eq(idx[0]->data, idx[1]->data, (size_t)idx[0]->numel * sizeof(int32_t));
    ck_assert_mem_eq(w[0]->data, w[1]->data, (size_t)w[0]->numel * sizeof(double));
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_router_records_and_saves) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *l = ag_tensor_new2(&c.act, AG_F64, 3, 5), *idx = NULL;
    ag_router_config cfg = {2, 1, 1, true, 1.0};
    ag_tensor *w = ag_moe_router(&c, l, &cfg, &idx);
    ck_assert_tensor(w);
    ck_assert_int_eq(c.n_tape, 0); // nothing requires grad
    l->requires_grad = true;
    ag_ctx_set_grad(&c, false);
    ck_assert_tensor(ag_moe_router(&c, l, &cfg, &idx));
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert_uint_eq(c.saved_bytes, 0);
    ag_ctx_set_grad(&c, true);
    w = ag_moe_router(&c, l, &cfg, &idx);
    ck_assert_int_eq(c.n_tape, 1);
    ck_assert_ptr_eq(c.tape[0]->aux, idx);
    ck_assert(!idx->requires_grad);
    ck_assert_uint_eq(c.saved_bytes, 3 * 5 * sizeof(double));
    ck_assert_ok(ag_backward(&c, ag_sum(&c, w)));
    ck_assert_uint_eq(c.saved_bytes, 0);
    ck_assert_ptr_nonnull(l->grad);
    ck_assert_ptr_null(idx->grad);
    ag_ctx_free(&c);
}
END_TEST

static void router_err(ag_ctx *c, ag_tensor *l, ag_router_config cfg, const char *msg) {
    ag_tensor *idx = (ag_tensor *)1;
    ck_assert_ptr_null(ag_moe_router(c, l, &cfg, &idx));
    ck_assert_ptr_null(idx);
    ck_assert_str_eq(molt_err_msg(), msg);
}

START_TEST(test_router_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *l = ag_tensor_new2(&c.act, AG_F32, 2, 6), *l1 = ag_tensor_new1(&c.act, AG_F32, 6);
    ag_tensor *li = ag_tensor_new2(&c.act, AG_I32, 2, 6);
    router_err(&c, l, (ag_router_config){0, 1, 1, true, 1}, 
               "moe_router: top_k 0 is out of range [1, 6] (E experts)");
    router_err(&c, l, (ag_router_config){7, 1, 1, true, 1},
               "moe_router: top_k 7 is out of range [1, 6] (E experts)");
    router_err(&c, l, (ag_router_config){2, 4, 1, true, 1},
               "moe_router: n_group 4 does not divide the 6 experts");
    router_err(&c, l, (ag_router_config){2, 0, 1, true, 1},
               "moe_router: n_group 0 does not divide the 6 experts");
    router_err(&c, l, (ag_router_config){2, 2, 3, true, 1},
               "moe_router: topk_group 3 is out of range [1, 2] (n_group)");
    router_err(&c, l, (ag_router_config){2, 2, 0, true, 1},
               "moe_router: topk_group 0 is out of range [1, 2] (n_group)");
    router_err(&c, l, (ag_router_config){4, 3, 1, true, 1},
               "moe_router: top_k 4 exceeds the 2 experts in 1 kept groups of 2");
    router_err(&c, l1, (ag_router_config){1, 1, 1, true, 1},
               "moe_router: logits is [6] f32, expected 2 dims");
    router_err(&c, li, (ag_router_config){1, 1, 1, true, 1},
               "moe_router: logits is [2, 6] i32, expected f32 or f64 (cast bf16/f16 first)");
    router_err(&c, NULL, (ag_router_config){1, 1, 1, true, 1}, "moe_router: logits is NULL");
    ag_tensor *idx;
    ck_assert_ptr_null(ag_moe_router(&c, l, NULL, &idx));
    ck_assert_str_eq(molt_err_msg(), "moe_router: cfg is NULL");
    ag_router_config ok = {1, 1, 1, true, 1};
    ck_assert_ptr_null(ag_moe_router(&c, l, &ok, NULL));
    ck_assert_str_eq(molt_err_msg(), "moe_router: idx (the output pointer) is NULL");
    ag_ctx_free(&c);
}
END_TEST

// ---- experts ---------------------------------------------------------------------------------

typedef struct {
    int64_t T, H, I, E, k;
} expert_case;

// Operands of ag_moe_experts: x and weights trainable (F64 masters), idx random (distinct
// per row unless dup), frozen expert weights.
typedef struct {
    ag_tensor *in[5]; // x, weights, idx, w_gate_up, w_down
} expert_ops;

static expert_ops make_experts(ag_arena *a, ag_rng *r, expert_case d, bool dup) {
    expert_ops o;
    o.in[0] = gc_rand(a, r, 2, (int64_t[]){d.T, d.H}, -1, 1, true);
    o.in[1] = gc_rand(a, r, 2, (int64_t[]){d.T, d.k}, 0.1, 1, true);
    o.in[2] = ag_tensor_new2(a, AG_I32, d.T, d.k);
    for (int64_t t = 0; t < d.T; t++)
        for (int64_t j = 0; j < d.k; j++) {
            int64_t e;
            bool again;
            do { // distinct experts within a row, like the router gives
                e = (int64_t)(ag_rng_next(r) % (uint64_t)d.E);
                again = false;
                for (int64_t i = 0; i < j && !dup; i++)
                    again = again || ag_get(o.in[2], t * d.k + i) == (double)e;
            } while (again);
            ag_set(o.in[2], t * d.k + j, (double)e);
        }
    o.in[3] = gc_rand(a, r, 3, (int64_t[]){d.E, 2 * d.I, d.H}, -0.6, 0.6, false);
    o.in[4] = gc_rand(a, r, 3, (int64_t[]){d.E, d.H, d.I}, -0.6, 0.6, false);
    return o;
}

static ag_tensor *build_experts(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    return ag_moe_experts(c, in[0], in[1], in[2], in[3], in[4]);
}

static const expert_case expert_cases[] = {
    {1, 3, 2, 2, 1}, {3, 4, 2, 3, 2}, {5, 7, 3, 5, 3}, {6, 5, 5, 4, 1}, {4, 6, 3, 6, 4},
};
#define N_EXPERT_CASES (int)(sizeof expert_cases / sizeof expert_cases[0])

// y by the definition, written out once more in the test.
static double expert_y(const expert_ops *o, expert_case d, int64_t t, int64_t h) {
    double y = 0;
    for (int64_t j = 0; j < d.k; j++) {
        int64_t e = (int64_t)ag_get(o->in[2], t * d.k + j);
        for (int64_t i = 0; i < d.I; i++) {
            double g = 0, u = 0;
            for (int64_t q = 0; q < d.H; q++) {
                double xv = ag_get(o->in[0], t * d.H + q);
                g += ag_get(o->in[3], (e * 2 * d.I + i) * d.H + q) * xv;
                u += ag_get(o->in[3], (e * 2 * d.I + d.I + i) * d.H + q) * xv;
            }
            double act = g / (1 + exp(-g)) * u;
            y += ag_get(o->in[1], t * d.k + j) * ag_get(o->in[4], (e * d.H + h) * d.I + i) * act;
        }
    }
    return y;
}

START_TEST(test_experts_forward_matches_definition) {
    for (int ci = 0; ci < N_EXPERT_CASES; ci++) {
        expert_case d = expert_cases[ci];
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 200 + ci);
        expert_ops o = make_experts(&a, &r, d, ci == 2);
        for (int ref = 0; ref < 2; ref++) {
            ag_set_reference_kernels(ref);
            ag_ctx c;
            ag_ctx_init(&c);
            ag_tensor *y = build_experts(&c, o.in, NULL);
            ck_assert_tensor(y);
            for (int64_t t = 0; t < d.T; t++)
                for (int64_t h = 0; h < d.H; h++)
                    ck_assert_double_eq_tol(ag_get(y, t * d.H + h), expert_y(&o, d, t, h), 1e-12);
            ag_ctx_free(&c);
        }
        ag_arena_free(&a);
    }
}
END_TEST

START_TEST(test_experts_gradcheck) {
    for (int ci = 0; ci < N_EXPERT_CASES; ci++) {
        expert_case d = expert_cases[ci];
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 300 + ci);
        expert_ops o = make_experts(&a, &r, d, ci == 1); // one case with repeated experts
        gc_case g = {.n_in = 5, .in = o.in, .build = build_experts};
        for (int ref = 0; ref < 2; ref++) {
            ag_set_reference_kernels(ref);
            gc_result res;
            ck_assert_ok(gc_gradcheck(&g, &res));
            ck_assert_int_eq(res.checked, d.T * d.H + d.T * d.k);
            ck_assert_msg(res.max_rel <= 1e-6, "case %d ref %d: max rel %g at input %d elem "
                          "%lld (%g vs %g)", ci, ref, res.max_rel, res.worst_input,
                          (long long)res.worst_elem, res.analytic, res.numeric);
        }
        // only one of the two inputs trainable: the other gets nothing
        o.in[1]->requires_grad = false;
        gc_result res;
        ck_assert_ok(gc_gradcheck(&g, &res));
        ck_assert_double_le(res.max_rel, 1e-6);
        o.in[1]->requires_grad = true;
        o.in[0]->requires_grad = false;
        ck_assert_ok(gc_gradcheck(&g, &res));
        ck_assert_double_le(res.max_rel, 1e-6);
        o.in[0]->requires_grad = true;
        double rel;
        ck_assert_ok(gc_f32_vs_f64(&g, &rel));
        ck_assert_double_le(rel, 1e-5);
        ag_arena_free(&a);
    }
}
END_TEST

// Moves every choice of expert `gone` to the lowest expert not yet in that row.
static void leave_expert_unused(ag_tensor *idx, int gone, int64_t E) {
    int64_t k = idx->shape[1];
    for (int64_t t = 0; t < idx->shape[0]; t++)
        for (int64_t j = 0; j < k; j++) {
            if (ag_get(idx, t * k + j) != gone)
                continue;
            for (int64_t e = 0; e < E; e++) {
                bool used = e == gone;
                for (int64_t i = 0; i < k; i++)
                    used = used || ag_get(idx, t * k + i) == (double)e;
                if (!used) {
                    ag_set(idx, t * k + j, (double)e);
                    break;
                }
            }
        }
}

START_TEST(test_experts_fast_vs_ref) {
    // more slots per expert than one row block of the optimized kernel (256), an expert with
    // no tokens, odd sizes
    const expert_case cases[] = {{300, 6, 5, 2, 2}, {37, 9, 7, 9, 2}, {70, 10, 4, 5, 4}};
    for (int ci = 0; ci < 3; ci++) {
        expert_case d = cases[ci];
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 400 + ci);
        expert_ops o = make_experts(&a, &r, d, false);
        if (ci == 1)
            leave_expert_unused(o.in[2], 4, d.E);
        gc_case g = {.n_in = 5, .in = o.in, .build = build_experts};
        double rel;
        ck_assert_ok(gc_fast_vs_ref(&g, &rel));
        ck_assert_double_le(rel, 1e-5);
        ag_arena_free(&a);
    }
}
END_TEST

START_TEST(test_experts_weights_stay_frozen) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 9);
    expert_ops o = make_experts(&a, &r, (expert_case){4, 5, 3, 3, 2}, false);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *y = build_experts(&c, o.in, NULL);
    ck_assert_int_eq(c.n_tape, 1);
    ck_assert_uint_eq(c.saved_bytes, 0); // activations are recomputed, not saved
    ck_assert_ok(ag_backward(&c, ag_sum(&c, y)));
    ck_assert_ptr_nonnull(o.in[0]->grad);
    ck_assert_ptr_nonnull(o.in[1]->grad);
    ck_assert_ptr_null(o.in[2]->grad);
    ck_assert_ptr_null(o.in[3]->grad);
    ck_assert_ptr_null(o.in[4]->grad);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_moe_out_of_memory) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 11);
    expert_ops o = make_experts(&a, &r, (expert_case){4, 5, 3, 3, 2}, false);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_set_reference_kernels(false);
    ck_assert_tensor(build_experts(&c, o.in, NULL)); // the arena now has room for results
    molt_alloc_fail_after(0);
    ck_assert_ptr_null(build_experts(&c, o.in, NULL));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "moe_experts: out of memory"));
    ag_tensor *l = ag_tensor_new2(&c.act, AG_F64, 4, 3), *idx = NULL;
    ag_router_config cfg = {2, 1, 1, true, 1.0};
    ck_assert_tensor(ag_moe_router(&c, l, &cfg, &idx));
    molt_alloc_fail_after(0);
    ck_assert_ptr_null(ag_moe_router(&c, l, &cfg, &idx));
    ck_assert_ptr_null(idx);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "moe_router: out of memory"));
    molt_alloc_fail_after(-1);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

static void experts_err(ag_ctx *c, ag_tensor **in, const char *msg) {
    ck_assert_ptr_null(ag_moe_experts(c, in[0], in[1], in[2], in[3], in[4]));
    ck_assert_str_eq(molt_err_msg(), msg);
}

START_TEST(test_experts_errors) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 10);
    expert_ops o = make_experts(&a, &r, (expert_case){3, 5, 2, 4, 2}, false);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *in[5];
    memcpy(in, o.in, sizeof in);
    ck_assert_tensor(ag_moe_experts(&c, in[0], in[1], in[2], in[3], in[4]));

    in[3]->requires_grad = true;
    experts_err(&c, in, "moe_experts: w_gate_up requires grad, but expert weights are frozen "
                        "(this op gives no gradient to them)");
    in[3]->requires_grad = false;
    in[4]->requires_grad = true;
    experts_err(&c, in, "moe_experts: w_down requires grad, but expert weights are frozen "
                        "(this op gives no gradient to them)");
    in[4]->requires_grad = false;

    in[4] = gc_clone(&a, o.in[4], AG_F32);
    experts_err(&c, in, "moe_experts: x [3, 5] f64 and w_down [4, 5, 2] f32 differ in dtype");
    in[4] = o.in[4];
    in[1] = gc_clone(&a, o.in[1], AG_F32);
    experts_err(&c, in, "moe_experts: x [3, 5] f64 and weights [3, 2] f32 differ in dtype");
    in[1] = o.in[1];
    in[2] = gc_clone(&a, o.in[1], AG_F64);
    experts_err(&c, in, "moe_experts: idx is [3, 2] f64, expected i32");
    in[2] = o.in[2];

    ag_set(in[2], 2 * 2 + 1, 4);
    experts_err(&c, in, "moe_experts: idx[t=2, j=1] = 4 is out of range [0, 4)");
    ag_set(in[2], 2 * 2 + 1, -1);
    experts_err(&c, in, "moe_experts: idx[t=2, j=1] = -1 is out of range [0, 4)");
    ag_set(in[2], 2 * 2 + 1, 0);

    in[1] = ag_tensor_new2(&a, AG_F64, 4, 2);
    experts_err(&c, in, "moe_experts: weights [4, 2] f64 and x [3, 5] f64 differ in tokens");
    in[1] = ag_tensor_new2(&a, AG_F64, 3, 3);
    experts_err(&c, in, "moe_experts: idx [3, 2] i32 and weights [3, 3] f64 differ in shape");
    in[1] = o.in[1];
    in[3] = ag_tensor_new(&a, AG_F64, 3, (int64_t[]){4, 4, 6});
    experts_err(&c, in, "moe_experts: w_gate_up is [4, 4, 6] f64, expected [E, 2I, 5] for x "
                        "[3, 5] f64");
    in[3] = ag_tensor_new(&a, AG_F64, 3, (int64_t[]){4, 3, 5});
    experts_err(&c, in, "moe_experts: w_gate_up is [4, 3, 5] f64, expected [E, 2I, 5] for x "
                        "[3, 5] f64");
    in[3] = o.in[3];
    in[4] = ag_tensor_new(&a, AG_F64, 3, (int64_t[]){4, 2, 5});
    experts_err(&c, in, "moe_experts: w_down is [4, 2, 5] f64, expected [4, 5, 2] (E, H, I "
                        "from w_gate_up and x)");
    in[4] = ag_tensor_new(&a, AG_F64, 3, (int64_t[]){3, 5, 2});
    experts_err(&c, in, "moe_experts: w_down is [3, 5, 2] f64, expected [4, 5, 2] (E, H, I "
                        "from w_gate_up and x)");
    in[4] = ag_tensor_new2(&a, AG_F64, 5, 2);
    experts_err(&c, in, "moe_experts: w_down is [5, 2] f64, expected 3 dims");
    in[4] = o.in[4];
    in[0] = ag_tensor_new1(&a, AG_F64, 5);
    experts_err(&c, in, "moe_experts: x is [5] f64, expected 2 dims");
    in[0] = NULL;
    experts_err(&c, in, "moe_experts: x is NULL");
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

// ---- router + experts ----------------------------------------------------------------------

// logits = x wr^T + bias: gradients reach x through the experts' input and through the
// routing weights, and reach bias through the router alone.
static ag_tensor *build_moe(ag_ctx *c, ag_tensor **in, void *user) {
    ag_tensor *logits = ag_add(c, ag_linear(c, in[0], in[1]), in[2]), *idx = NULL;
    ag_tensor *w = logits ? ag_moe_router(c, logits, user, &idx) : NULL;
    return w ? ag_moe_experts(c, in[0], w, idx, in[3], in[4]) : NULL;
}

START_TEST(test_router_and_experts_gradcheck) {
    const struct {
        int64_t T, E, H, I;
        ag_router_config cfg;
    } cases[] = {
        {5, 6, 5, 3, {2, 1, 1, true, 1.0}},
        {4, 8, 3, 2, {3, 4, 2, true, 2.5}},
        {3, 6, 6, 4, {2, 3, 1, false, 1.3}},
    };
    for (int ci = 0; ci < 3; ci++) {
        int64_t T = cases[ci].T, E = cases[ci].E, H = cases[ci].H, I = cases[ci].I;
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 500 + ci);
        // |x| <= 1 and |wr| <= 0.03 move the logits by <= 0.18: below the 0.35 gaps
        ag_tensor *in[5] = {
            gc_rand(&a, &r, 2, (int64_t[]){T, H}, -1, 1, true),
            gc_rand(&a, &r, 2, (int64_t[]){E, H}, -0.03, 0.03, false),
            separated_logits(&a, &r, T, E, true),
            gc_rand(&a, &r, 3, (int64_t[]){E, 2 * I, H}, -0.6, 0.6, false),
            gc_rand(&a, &r, 3, (int64_t[]){E, H, I}, -0.6, 0.6, false),
        };
        gc_case g = {.n_in = 5, .in = in, .build = build_moe, .user = (void *)&cases[ci].cfg};
        for (int ref = 0; ref < 2; ref++) {
            ag_set_reference_kernels(ref);
            gc_result res;
            ck_assert_ok(gc_gradcheck(&g, &res));
            ck_assert_int_eq(res.checked, T * H + T * E);
            ck_assert_msg(res.max_rel <= 1e-6, "case %d ref %d: max rel %g at input %d elem "
                          "%lld (%g vs %g)", ci, ref, res.max_rel, res.worst_input,
                          (long long)res.worst_elem, res.analytic, res.numeric);
        }
        double rel;
        ck_assert_ok(gc_f32_vs_f64(&g, &rel));
        ck_assert_double_le(rel, 1e-5);
        ck_assert_ok(gc_fast_vs_ref(&g, &rel));
        ck_assert_double_le(rel, 1e-5);
        ag_arena_free(&a);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_moe");
    TCase *tc = tcase_create("moe");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_router_matches_brute_force);
    tcase_add_test(tc, test_router_group_limit_changes_choice);
    tcase_add_test(tc, test_router_ties_lowest_index_first);
    tcase_add_test(tc, test_router_nan_logits_give_valid_indices);
    tcase_add_test(tc, test_router_gradcheck);
    tcase_add_test(tc, test_router_parallel_matches_serial);
    tcase_add_test(tc, test_router_records_and_saves);
    tcase_add_test(tc, test_router_errors);
    tcase_add_test(tc, test_experts_forward_matches_definition);
    tcase_add_test(tc, test_experts_gradcheck);
    tcase_add_test(tc, test_experts_fast_vs_ref);
    tcase_add_test(tc, test_experts_weights_stay_frozen);
    tcase_add_test(tc, test_experts_errors);
    tcase_add_test(tc, test_moe_out_of_memory);
    tcase_add_test(tc, test_router_and_experts_gradcheck);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
