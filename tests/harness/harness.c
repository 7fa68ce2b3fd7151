// tests/harness/harness.c: gradient-check and comparison helpers used by the op tests.
#include "harness.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

ag_tensor *gc_clone(ag_arena *a, const ag_tensor *t, ag_dtype dt) {
    if (!t)
        return NULL;
    if (t->dtype == AG_I32)
        dt = AG_I32;
    ag_tensor *c = ag_tensor_new(a, dt, t->ndim, t->shape);
    if (!c)
        return NULL;
    for (int64_t i = 0; i < t->numel; i++)
        ag_set(c, i, ag_get(t, i));
    c->requires_grad = t->requires_grad;
    memcpy(c->name, t->name, sizeof c->name);
    return c;
}

ag_tensor *gc_rand(ag_arena *a, ag_rng *r, int ndim, const int64_t *shape, double lo,
                   double hi, bool requires_grad) {
    ag_tensor *t = ag_tensor_new(a, AG_F64, ndim, shape);
    if (!t)
        return NULL;
    ag_fill_uniform(t, r, lo, hi);
    t->requires_grad = requires_grad;
    return t;
}

double gc_max_rel_diff(const ag_tensor *a, const ag_tensor *b) {
    double md = 0, mb = 0;
    for (int64_t i = 0; i < b->numel; i++) {
        double x = ag_get(a, i), y = ag_get(b, i);
        double d = fabs(x - y);
        if (isnan(d))
            return INFINITY;
        if (d > md)
            md = d;
        if (fabs(y) > mb)
            mb = fabs(y);
    }
    return md / (mb > 1e-30 ? mb : 1e-30);
}

// Inputs converted to dtype dt in arena a (floats only; I32 kept).
static molt_status clone_inputs(ag_arena *a, const gc_case *g, ag_dtype dt, ag_tensor **out) {
    for (int i = 0; i < g->n_in; i++) {
        out[i] = NULL;
        if (g->in[i] && !(out[i] = gc_clone(a, g->in[i], dt)))
            return MOLT_ENOMEM;
    }
    return MOLT_OK;
}

// L = sum(out * R), in double, with R regenerated from a fixed seed.
static double weighted_sum(const ag_tensor *y) {
    ag_rng r;
    ag_rng_seed(&r, 1234);
    double s = 0;
    for (int64_t i = 0; i < y->numel; i++)
        s += ag_get(y, i) * (ag_rng_uniform(&r) - 0.5);
    return s;
}

static ag_tensor *weights_like(ag_ctx *c, const ag_tensor *y) {
    ag_tensor *w = ag_tensor_new(&c->act, y->dtype, y->ndim, y->shape);
    if (!w)
        return NULL;
    ag_rng r;
    ag_rng_seed(&r, 1234);
    for (int64_t i = 0; i < y->numel; i++)
        ag_set(w, i, ag_rng_uniform(&r) - 0.5);
    return w;
}

// Forward + backward of L on inputs `in`; gradients are left in in[i]->grad.
static molt_status run_backward(const gc_case *g, ag_ctx *c, ag_tensor **in) {
    ag_tensor *y = g->build(c, in, g->user);
    if (!y)
        return molt_err_wrap(MOLT_EARG, "gradcheck build");
    ag_tensor *w = weights_like(c, y);
    if (!w)
        return MOLT_ENOMEM;
    ag_tensor *l = ag_sum(c, ag_mul(c, y, w));
    if (!l)
        return MOLT_EARG;
    return ag_backward(c, l);
}

static molt_status eval_loss(const gc_case *g, ag_tensor **in, double *loss) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_ctx_set_grad(&c, false);
    ag_tensor *y = g->build(&c, in, g->user);
    if (!y) {
        ag_ctx_free(&c);
        return molt_err_wrap(MOLT_EARG, "gradcheck build (no grad)");
    }
    *loss = weighted_sum(y);
    ag_ctx_free(&c);
    return MOLT_OK;
}

molt_status gc_gradcheck(const gc_case *g, gc_result *r) {
    memset(r, 0, sizeof *r);
    double eps = g->eps > 0 ? g->eps : 1e-6;
    ag_arena a;
    ag_arena_init(&a, "gradcheck", 0);
    ag_tensor *in[16];
    MOLT_ASSERT(g->n_in <= 16);
    molt_status st = clone_inputs(&a, g, AG_F64, in);
    ag_ctx c;
    ag_ctx_init(&c);
    if (st == MOLT_OK)
        st = run_backward(g, &c, in);
    for (int i = 0; st == MOLT_OK && i < g->n_in; i++) {
        ag_tensor *x = in[i];
        if (!x || !x->requires_grad || x->dtype == AG_I32)
            continue;
        ag_tensor *num = ag_tensor_new(&a, AG_F64, x->ndim, x->shape);
        if (!num) {
            st = MOLT_ENOMEM;
            break;
        }
        double nmax = 0;
        for (int64_t j = 0; j < x->numel && st == MOLT_OK; j++) {
            double v = ag_get(x, j), lp = 0, lm = 0;
            ag_set(x, j, v + eps);
            st = eval_loss(g, in, &lp);
            ag_set(x, j, v - eps);
            if (st == MOLT_OK)
                st = eval_loss(g, in, &lm);
            ag_set(x, j, v);
            double d = (lp - lm) / (2 * eps);
            ag_set(num, j, d);
            if (fabs(d) > nmax)
                nmax = fabs(d);
        }
        double floor = fmax(1e-3 * nmax, 1e-8);
        for (int64_t j = 0; j < x->numel && st == MOLT_OK; j++) {
            double an = x->grad ? ag_get(x->grad, j) : 0.0, nu = ag_get(num, j);
            double rel = fabs(an - nu) / fmax(fmax(fabs(an), fabs(nu)), floor);
            if (isnan(rel))
                rel = INFINITY;
            r->checked++;
            if (rel > r->max_rel || r->checked == 1) {
                r->max_rel = rel;
                r->worst_input = i;
                r->worst_elem = j;
                r->analytic = an;
                r->numeric = nu;
            }
        }
    }
    ag_ctx_free(&c);
    ag_arena_free(&a);
    return st;
}

molt_status gc_f32_vs_f64(const gc_case *g, double *rel) {
    ag_arena a;
    ag_arena_init(&a, "f32vsf64", 0);
    ag_tensor *in32[16], *in64[16];
    molt_status st = clone_inputs(&a, g, AG_F32, in32);
    if (st == MOLT_OK)
        st = clone_inputs(&a, g, AG_F64, in64);
    // the f64 run sees exactly the f32-rounded values
    for (int i = 0; st == MOLT_OK && i < g->n_in; i++)
        if (in64[i] && in64[i]->dtype == AG_F64)
            for (int64_t j = 0; j < in64[i]->numel; j++)
                ag_set(in64[i], j, ag_get(in32[i], j));
    ag_ctx c32, c64;
    ag_ctx_init(&c32);
    ag_ctx_init(&c64);
    ag_ctx_set_grad(&c32, false);
    ag_ctx_set_grad(&c64, false);
    if (st == MOLT_OK) {
        ag_tensor *y32 = g->build(&c32, in32, g->user), *y64 = g->build(&c64, in64, g->user);
        if (!y32 || !y64)
            st = molt_err_wrap(MOLT_EARG, "f32-vs-f64 build");
        else
            *rel = gc_max_rel_diff(y32, y64);
    }
    ag_ctx_free(&c32);
    ag_ctx_free(&c64);
    ag_arena_free(&a);
    return st;
}

molt_status gc_fast_vs_ref(const gc_case *g, double *rel) {
    ag_arena a;
    ag_arena_init(&a, "fastvsref", 0);
    ag_tensor *inf[16], *inr[16];
    molt_status st = clone_inputs(&a, g, AG_F32, inf);
    if (st == MOLT_OK)
        st = clone_inputs(&a, g, AG_F32, inr);
    ag_ctx cf, cr;
    ag_ctx_init(&cf);
    ag_ctx_init(&cr);
    bool was = ag_reference_kernels();
    *rel = 0;
    if (st == MOLT_OK) {
        ag_set_reference_kernels(false);
        ag_tensor *yf = g->build(&cf, inf, g->user);
        ag_tensor *wf = yf ? weights_like(&cf, yf) : NULL;
        ag_tensor *lf = wf ? ag_sum(&cf, ag_mul(&cf, yf, wf)) : NULL;
        ag_set_reference_kernels(true);
        ag_tensor *yr = g->build(&cr, inr, g->user);
        ag_tensor *wr = yr ? weights_like(&cr, yr) : NULL;
        ag_tensor *lr = wr ? ag_sum(&cr, ag_mul(&cr, yr, wr)) : NULL;
        if (!lf || !lr) {
            st = molt_err_wrap(MOLT_EARG, "fast-vs-reference build");
        } else {
            *rel = gc_max_rel_diff(yf, yr);
            bool any_grad = lf->requires_grad && lr->requires_grad;
            if (any_grad) {
                ag_set_reference_kernels(false);
                st = ag_backward(&cf, lf);
                ag_set_reference_kernels(true);
                if (st == MOLT_OK)
                    st = ag_backward(&cr, lr);
            }
            for (int i = 0; any_grad && st == MOLT_OK && i < g->n_in; i++) {
                if (!inf[i] || !inf[i]->requires_grad)
                    continue;
                if (!inf[i]->grad || !inr[i]->grad) {
                    st = molt_err(MOLT_EINTERNAL, "input %d got no gradient", i);
                    break;
                }
                double d = gc_max_rel_diff(inf[i]->grad, inr[i]->grad);
                if (d > *rel)
                    *rel = d;
            }
        }
    }
    ag_set_reference_kernels(was);
    ag_ctx_free(&cf);
    ag_ctx_free(&cr);
    ag_arena_free(&a);
    return st;
}

int harness_run(Suite *s) {
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
