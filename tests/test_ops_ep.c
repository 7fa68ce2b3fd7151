// tests/test_ops_ep.c: the expert-parallel ops (ag_ep_route_new, ag_ep_dispatch,
// ag_ep_combine) around the routed experts with LoRA, in f64. One process (a local
// communicator): finite differences through route + dispatch + experts + combine, and the
// result equal to ag_moe_experts_lora on the same tokens. Then the program starts itself as 2
// and 4 MPI ranks; each rank owns E / size experts (their base weights and LoRA shard) and
// its own tokens, and checks
//   - forward and every gradient (its tokens, its routing weights, its experts' LoRA shard)
//     against ag_moe_experts_lora run on every rank's tokens gathered into one process with
//     all experts (the reference);
//   - finite differences of the global loss (summed over ranks) by each rank's inputs, one
//     rank perturbing at a time;
//   - a batch routed entirely to rank 0's experts (the other ranks receive no rows), and a
//     rank without tokens that only serves its experts.
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "autograd/comm/comm.h"
#include "harness/harness.h"
#include "harness/mpi_env.h"

enum { T = 3, H = 4, I = 3, E = 4, KK = 2, R = 2 };

typedef struct {
    ag_comm *comm;
    int P, me, nl, e0;            // ranks, this rank, experts per rank, first own expert
    ag_tensor *gu, *dn;           // own experts' base weights [nl, 2I, H], [nl, H, I]
    ag_tensor *gu_all, *dn_all;   // all experts (the reference)
    ag_tensor *a_gu, *b_gu, *a_d, *b_d;         // own LoRA shard (requires grad)
    ag_tensor *a_gu_all, *b_gu_all, *a_d_all, *b_d_all; // full LoRA
    ag_arena ar;
} world;

static ag_comm *g_comm;

// Full LoRA (the same values on every rank: one seed) and this rank's shard of it: A rows
// e0*r .. (e0+nl)*r, B columns k*nl + e' taken from k*E + e0 + e'.
static void slice_b(const ag_tensor *full, ag_tensor *mine, int nl, int e0) {
    int64_t rows = full->shape[0];
    for (int64_t o = 0; o < rows; o++)
        for (int k = 0; k < R; k++)
            for (int e = 0; e < nl; e++)
                ag_set(mine, o * R * nl + k * nl + e, ag_get(full, o * R * E + k * E + e0 + e));
}

static void slice_a(const ag_tensor *full, ag_tensor *mine, int e0) {
    int64_t cols = full->shape[1], first = (int64_t)e0 * R * cols;
    for (int64_t i = 0; i < mine->numel; i++)
        ag_set(mine, i, ag_get(full, first + i));
}

static void world_init(world *w, ag_comm *comm) {
    memset(w, 0, sizeof *w);
    w->comm = comm;
    w->P = ag_comm_size(comm);
    w->me = ag_comm_rank(comm);
    w->nl = E / w->P;
    w->e0 = w->me * w->nl;
    ag_arena_init(&w->ar, "ep test", 0);
    ag_rng rng;
    ag_rng_seed(&rng, 77);
    w->gu_all = gc_rand(&w->ar, &rng, 3, (int64_t[]){E, 2 * I, H}, -0.6, 0.6, false);
    w->dn_all = gc_rand(&w->ar, &rng, 3, (int64_t[]){E, H, I}, -0.6, 0.6, false);
    w->a_gu_all = gc_rand(&w->ar, &rng, 2, (int64_t[]){R * E, H}, -0.5, 0.5, true);
    w->b_gu_all = gc_rand(&w->ar, &rng, 2, (int64_t[]){2 * I, R * E}, -0.5, 0.5, true);
    w->a_d_all = gc_rand(&w->ar, &rng, 2, (int64_t[]){R * E, I}, -0.5, 0.5, true);
    w->b_d_all = gc_rand(&w->ar, &rng, 2, (int64_t[]){H, R * E}, -0.5, 0.5, true);
    int nl = w->nl;
    w->gu = ag_tensor_new(&w->ar, AG_F64, 3, (int64_t[]){nl, 2 * I, H});
    w->dn = ag_tensor_new(&w->ar, AG_F64, 3, (int64_t[]){nl, H, I});
    memcpy(w->gu->data, (double *)w->gu_all->data + (int64_t)w->e0 * 2 * I * H,
           (size_t)w->gu->numel * sizeof(double));
    memcpy(w->dn->data, (double *)w->dn_all->data + (int64_t)w->e0 * H * I,
           (size_t)w->dn->numel * sizeof(double));
    w->a_gu = ag_tensor_new2(&w->ar, AG_F64, R * nl, H);
    w->b_gu = ag_tensor_new2(&w->ar, AG_F64, 2 * I, R * nl);
    w->a_d = ag_tensor_new2(&w->ar, AG_F64, R * nl, I);
    w->b_d = ag_tensor_new2(&w->ar, AG_F64, H, R * nl);
    slice_a(w->a_gu_all, w->a_gu, w->e0);
    slice_a(w->a_d_all, w->a_d, w->e0);
    slice_b(w->b_gu_all, w->b_gu, nl, w->e0);
    slice_b(w->b_d_all, w->b_d, nl, w->e0);
    w->a_gu->requires_grad = w->b_gu->requires_grad = true;
    w->a_d->requires_grad = w->b_d->requires_grad = true;
}

// Expert-parallel build: in = {x [T,H], w [T,k], idx, A_gu, B_gu, A_d, B_d (this rank's
// shard)}; idx NULL = no tokens here.
static ag_tensor *ep_build(ag_ctx *c, ag_tensor **in, void *user) {
    world *w = user;
    ag_ep_route *rt = ag_ep_route_new(c, w->comm, in[2], NULL, E);
    ag_tensor *xr = rt ? ag_ep_dispatch(c, rt, in[0]) : NULL;
    if (!xr)
        return NULL;
    ag_tensor *y;
    int64_t n = ag_ep_route_rows(rt);
    ag_expert_lora l = {in[3], in[4], in[5], in[6], R, 0.7, NULL, NULL};
    if (n > 0) {
        ag_tensor *ones = ag_tensor_new2(&c->act, in[0]->dtype, n, 1);
        for (int64_t i = 0; i < n; i++)
            ag_set(ones, i, 1.0);
        y = ag_moe_experts_lora(c, xr, ones, ag_ep_route_local_idx(rt), w->gu, w->dn, &l);
    } else {
        y = xr; // a placeholder: nothing was routed here
    }
    return y ? ag_ep_combine(c, rt, y, in[2] ? in[1] : NULL) : NULL;
}

// The reference on one process: all experts, in = {x, w, idx, full A_gu, B_gu, A_d, B_d}.
static ag_tensor *ref_build(ag_ctx *c, ag_tensor **in, void *user) {
    world *w = user;
    ag_expert_lora l = {in[3], in[4], in[5], in[6], R, 0.7, NULL, NULL};
    return ag_moe_experts_lora(c, in[0], in[1], in[2], w->gu_all, w->dn_all, &l);
}

// Token inputs of rank `rank`: x, w (requires grad), idx (k distinct experts per token;
// all_to_zero routes every token to expert 0).
static void tokens(ag_arena *a, int rank, bool all_to_zero, ag_tensor **x, ag_tensor **wt,
                   ag_tensor **idx) {
    ag_rng rng;
    ag_rng_seed(&rng, 1000 + (uint64_t)rank);
    *x = gc_rand(a, &rng, 2, (int64_t[]){T, H}, -1, 1, true);
    *wt = gc_rand(a, &rng, 2, (int64_t[]){T, KK}, 0.1, 1, true);
    *idx = ag_tensor_new2(a, AG_I32, T, KK);
    int32_t *id = (*idx)->data;
    for (int t = 0; t < T; t++) {
        int e = (int)(ag_rng_next(&rng) % E);
        id[t * KK] = all_to_zero ? 0 : e;
        id[t * KK + 1] = all_to_zero ? 1 % E : (e + 1 + (int)(ag_rng_next(&rng) % (E - 1))) % E;
    }
}

// ---- one process ----------------------------------------------------------------------------

START_TEST(local_gradcheck) {
    ag_comm *comm;
    ck_assert_ok(ag_comm_local(&comm));
    world w;
    world_init(&w, comm);
    ag_tensor *x, *wt, *idx;
    tokens(&w.ar, 0, false, &x, &wt, &idx);
    ag_tensor *in[7] = {x, wt, idx, w.a_gu, w.b_gu, w.a_d, w.b_d};
    gc_case g = {.n_in = 7, .in = in, .build = ep_build, .user = &w};
    gc_result r;
    ck_assert_ok(gc_gradcheck(&g, &r));
    ck_assert_msg(r.max_rel < 1e-6, "input %d elem %lld: analytic %g numeric %g (rel %g)",
                  r.worst_input, (long long)r.worst_elem, r.analytic, r.numeric, r.max_rel);
    // the same values as the experts run in place
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_tensor *y = ep_build(&c, in, &w);
    ag_tensor *ref = ref_build(&c, in, &w);
    ck_assert_tensor(y);
    ck_assert_tensor(ref);
    ck_assert_msg(gc_max_rel_diff(y, ref) < 1e-14, "ep vs in place %g", gc_max_rel_diff(y, ref));
    ag_ctx_free(&c);
    ag_arena_free(&w.ar);
    ag_comm_free(comm);
}
END_TEST

START_TEST(bad_routes) {
    ag_comm *comm;
    ck_assert_ok(ag_comm_local(&comm));
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_tensor *idx = ag_tensor_new2(&c.act, AG_I32, 2, 2);
    ((int32_t *)idx->data)[3] = 9;
    ck_assert(ag_ep_route_new(&c, comm, idx, NULL, 4) == NULL);
    ck_assert_msg(strstr(molt_err_msg(), "9"), "%s", molt_err_msg());
    ((int32_t *)idx->data)[3] = 1;
    ck_assert(ag_ep_route_new(&c, NULL, idx, NULL, 4) == NULL);
    ag_tensor *tag = ag_tensor_new1(&c.act, AG_I32, 3);
    ck_assert(ag_ep_route_new(&c, comm, idx, tag, 4) == NULL);
    ck_assert_msg(strstr(molt_err_msg(), "tag"), "%s", molt_err_msg());
    ag_ep_route *r = ag_ep_route_new(&c, comm, idx, NULL, 4);
    ck_assert_ptr_nonnull(r);
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, 3, 5);
    ck_assert(ag_ep_dispatch(&c, r, x) == NULL);
    ck_assert_msg(strstr(molt_err_msg(), "expected [2, 5]"), "%s", molt_err_msg());
    ag_ctx_free(&c);
    ag_comm_free(comm);
}
END_TEST

START_TEST(two_ranks) { mpi_env_run_self("test_ops_ep", 2); }
END_TEST
START_TEST(four_ranks) { mpi_env_run_self("test_ops_ep", 4); }
END_TEST

// ---- as one of several ranks -----------------------------------------------------------------

// Every rank's tokens gathered: the reference inputs (x, w, idx of all ranks, rank-major).
static void gather_all(world *w, bool all_to_zero, ag_tensor **x, ag_tensor **wt,
                       ag_tensor **idx) {
    int P = w->P;
    *x = ag_tensor_new2(&w->ar, AG_F64, (int64_t)P * T, H);
    *wt = ag_tensor_new2(&w->ar, AG_F64, (int64_t)P * T, KK);
    *idx = ag_tensor_new2(&w->ar, AG_I32, (int64_t)P * T, KK);
    for (int p = 0; p < P; p++) {
        ag_tensor *xp, *wp, *ip;
        tokens(&w->ar, p, all_to_zero, &xp, &wp, &ip);
        memcpy((double *)(*x)->data + p * T * H, xp->data, sizeof(double) * T * H);
        memcpy((double *)(*wt)->data + p * T * KK, wp->data, sizeof(double) * T * KK);
        memcpy((int32_t *)(*idx)->data + p * T * KK, ip->data, sizeof(int32_t) * T * KK);
    }
    (*x)->requires_grad = (*wt)->requires_grad = true;
}

// Weights of the loss sum(out * Rw): rank p's rows get the seed 500 + p.
static ag_tensor *loss_weights(ag_ctx *c, int rank, int rows) {
    ag_tensor *r = ag_tensor_new2(&c->act, AG_F64, rows, H);
    ag_rng rng;
    for (int64_t i = 0; i < r->numel; i++) {
        if (i % (T * H) == 0)
            ag_rng_seed(&rng, 500 + (uint64_t)(rank + i / (T * H)));
        ag_set(r, i, ag_rng_uniform(&rng) - 0.5);
    }
    return r;
}

// got NULL: a gradient never written (no rows reached this rank's experts) is zero.
static void check_close(const char *what, const ag_tensor *got, const ag_tensor *want,
                        int64_t want_off, const world *w, int64_t n) {
    double md = 0, mw = 0;
    for (int64_t i = 0; i < n; i++) {
        double g = got ? ag_get(got, i) : 0, v = ag_get(want, want_off + i);
        md = fmax(md, fabs(g - v));
        mw = fmax(mw, fabs(v));
    }
    ck_assert_msg(md <= 1e-12 * fmax(mw, 1), "rank %d: %s differs by %g (max %g)", w->me, what,
                  md, mw);
}

// Forward and gradients against the one-process reference.
static void against_reference(bool all_to_zero) {
    world w;
    world_init(&w, g_comm);
    ag_tensor *x, *wt, *idx, *xa, *wa, *ia;
    tokens(&w.ar, w.me, all_to_zero, &x, &wt, &idx);
    gather_all(&w, all_to_zero, &xa, &wa, &ia);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_tensor *in[7] = {x, wt, idx, w.a_gu, w.b_gu, w.a_d, w.b_d};
    ag_tensor *y = ep_build(&c, in, &w);
    ck_assert_tensor(y);
    ag_tensor *l = ag_sum(&c, ag_mul(&c, y, loss_weights(&c, w.me, T)));
    ck_assert_ok(ag_backward(&c, l));
    ag_ctx cr;
    ck_assert_ok(ag_ctx_init(&cr));
    ag_tensor *ri[7] = {xa, wa, ia, w.a_gu_all, w.b_gu_all, w.a_d_all, w.b_d_all};
    ag_tensor *yr = ref_build(&cr, ri, &w);
    ck_assert_tensor(yr);
    ag_tensor *lr = ag_sum(&cr, ag_mul(&cr, yr, loss_weights(&cr, 0, w.P * T)));
    ck_assert_ok(ag_backward(&cr, lr));
    check_close("output", y, yr, (int64_t)w.me * T * H, &w, y->numel);
    check_close("dx", x->grad, xa->grad, (int64_t)w.me * T * H, &w, x->numel);
    check_close("dw", wt->grad, wa->grad, (int64_t)w.me * T * KK, &w, wt->numel);
    // the shard's LoRA gradients: taken from the reference's full ones
    ag_tensor *sa = ag_tensor_new2(&w.ar, AG_F64, R * w.nl, H);
    ag_tensor *sb = ag_tensor_new2(&w.ar, AG_F64, 2 * I, R * w.nl);
    ag_tensor *sad = ag_tensor_new2(&w.ar, AG_F64, R * w.nl, I);
    ag_tensor *sbd = ag_tensor_new2(&w.ar, AG_F64, H, R * w.nl);
    slice_a(w.a_gu_all->grad, sa, w.e0);
    slice_b(w.b_gu_all->grad, sb, w.nl, w.e0);
    slice_a(w.a_d_all->grad, sad, w.e0);
    slice_b(w.b_d_all->grad, sbd, w.nl, w.e0);
    check_close("dA gate_up", w.a_gu->grad, sa, 0, &w, sa->numel);
    check_close("dB gate_up", w.b_gu->grad, sb, 0, &w, sb->numel);
    check_close("dA down", w.a_d->grad, sad, 0, &w, sad->numel);
    check_close("dB down", w.b_d->grad, sbd, 0, &w, sbd->numel);
    ag_ctx_free(&c);
    ag_ctx_free(&cr);
    ag_arena_free(&w.ar);
}

START_TEST(mpi_against_reference) { against_reference(false); }
END_TEST
START_TEST(mpi_rows_to_one_rank) { against_reference(true); }
END_TEST

// Global loss (every rank's sum(out * Rw), summed over ranks) without recording.
static double global_loss(world *w, ag_tensor **in) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_ctx_set_grad(&c, false);
    ag_tensor *y = ep_build(&c, in, w);
    ck_assert_tensor(y);
    ag_tensor *rw = loss_weights(&c, w->me, T);
    double s = 0;
    for (int64_t i = 0; i < y->numel; i++)
        s += ag_get(y, i) * ag_get(rw, i);
    ag_ctx_free(&c);
    ck_assert_ok(ag_comm_allreduce(w->comm, &s, 1, AG_F64, AG_COMM_SUM));
    return s;
}

// Finite differences of the global loss, one rank's one element at a time.
START_TEST(mpi_finite_differences) {
    world w;
    world_init(&w, g_comm);
    ag_tensor *x, *wt, *idx;
    tokens(&w.ar, w.me, false, &x, &wt, &idx);
    ag_tensor *in[7] = {x, wt, idx, w.a_gu, w.b_gu, w.a_d, w.b_d};
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_tensor *y = ep_build(&c, in, &w);
    ck_assert_tensor(y);
    ck_assert_ok(ag_backward(&c, ag_sum(&c, ag_mul(&c, y, loss_weights(&c, w.me, T)))));
    const int check[] = {0, 1, 3, 6}; // x, w, A_gu, A_d (B checked against the reference)
    double eps = 1e-6, worst = 0;
    for (int q = 0; q < w.P; q++)
        for (size_t ci = 0; ci < sizeof check / sizeof *check; ci++) {
            ag_tensor *t = in[check[ci]];
            for (int64_t j = 0; j < t->numel; j++) {
                double v = ag_get(t, j);
                if (w.me == q)
                    ag_set(t, j, v + eps);
                double lp = global_loss(&w, in);
                if (w.me == q)
                    ag_set(t, j, v - eps);
                double lm = global_loss(&w, in);
                if (w.me == q)
                    ag_set(t, j, v);
                if (w.me != q)
                    continue;
                double num = (lp - lm) / (2 * eps), an = t->grad ? ag_get(t->grad, j) : 0;
                double rel = fabs(num - an) / fmax(fmax(fabs(num), fabs(an)), 1e-6);
                worst = fmax(worst, rel);
            }
        }
    ck_assert_msg(worst < 1e-5, "rank %d: worst finite-difference error %g", w.me, worst);
    ag_ctx_free(&c);
    ag_arena_free(&w.ar);
}
END_TEST

// The last rank has no tokens: it only serves its experts to the others (inference).
START_TEST(mpi_rank_without_tokens) {
    world w;
    world_init(&w, g_comm);
    bool serve = w.me == w.P - 1;
    ag_tensor *x, *wt, *idx;
    tokens(&w.ar, w.me, false, &x, &wt, &idx);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_tensor *in[7] = {x, wt, serve ? NULL : idx, w.a_gu, w.b_gu, w.a_d, w.b_d};
    ag_tensor *y = ep_build(&c, in, &w);
    ck_assert_tensor(y);
    if (!serve) {
        ag_tensor *ri[7] = {x, wt, idx, w.a_gu_all, w.b_gu_all, w.a_d_all, w.b_d_all};
        ag_tensor *yr = ref_build(&c, ri, &w);
        ck_assert_tensor(yr);
        check_close("output", y, yr, 0, &w, y->numel);
    }
    ag_ctx_free(&c);
    ag_arena_free(&w.ar);
}
END_TEST

int main(void) {
    if (mpi_env_is_rank()) {
        if (ag_comm_world(60, &g_comm) != MOLT_OK) {
            fprintf(stderr, "test_ops_ep: %s\n", molt_err_msg());
            return 1;
        }
        Suite *s = suite_create("ep (ranks)");
        TCase *tc = tcase_create("mpi");
        tcase_set_timeout(tc, 300);
        tcase_add_test(tc, mpi_against_reference);
        tcase_add_test(tc, mpi_rows_to_one_rank);
        tcase_add_test(tc, mpi_finite_differences);
        tcase_add_test(tc, mpi_rank_without_tokens);
        suite_add_tcase(s, tc);
        int rc = harness_run(s);
        ag_comm_free(g_comm);
        return rc;
    }
    Suite *s = suite_create("ops_ep");
    TCase *tc = tcase_create("local");
    tcase_add_test(tc, local_gradcheck);
    tcase_add_test(tc, bad_routes);
    suite_add_tcase(s, tc);
    TCase *tm = tcase_create("launch");
    tcase_set_timeout(tm, 600);
    tcase_add_test(tm, two_ranks);
    tcase_add_test(tm, four_ranks);
    suite_add_tcase(s, tm);
    return harness_run(s);
}
