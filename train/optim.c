// train/optim.c: AdamW over F32 CPU parameters, global gradient-norm clipping and the
// gradient-accumulation helpers.
//
// The update reproduces torch.optim.AdamW's single-tensor CPU path operation by operation:
// Python-side scalars (1 - lr*wd, 1 - b1, lr / (1 - b1^t), sqrt(1 - b2^t)) are computed in
// double and rounded to float once, as PyTorch does when a Python number meets a float32
// tensor; the per-element arithmetic is float in PyTorch's order. lerp uses a fused
// multiply-add as PyTorch's vectorized CPU lerp does. The build is C11 without GNU
// extensions, so the compiler does not contract the other expressions into FMAs.
//
// Not here: schedules (schedule.c), device (CUDA) parameters, the training loop.
#include "train.h"

#include <math.h>
#include <string.h>

// clang contracts a*b + c into an FMA by default even in C11 mode; the rounding must stay
// PyTorch's.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

void opt_adamw_defaults(opt_adamw_config *cfg) {
    cfg->beta1 = 0.9;
    cfg->beta2 = 0.999;
    cfg->eps = 1e-8;
    cfg->weight_decay = 0.01;
}

static molt_status check_config(const opt_adamw_config *c) {
    if (!(c->beta1 >= 0 && c->beta1 < 1) || !(c->beta2 >= 0 && c->beta2 < 1))
        return molt_err(MOLT_EARG, "adamw: betas must be in [0, 1), got (%g, %g)", c->beta1,
                        c->beta2);
    if (!(c->eps >= 0) || !isfinite(c->eps))
        return molt_err(MOLT_EARG, "adamw: eps must be a finite number >= 0, got %g", c->eps);
    if (!(c->weight_decay >= 0) || !isfinite(c->weight_decay))
        return molt_err(MOLT_EARG, "adamw: weight_decay must be a finite number >= 0, got %g",
                        c->weight_decay);
    return MOLT_OK;
}

static molt_status check_param(const ag_tensor *p, int i) {
    if (!p)
        return molt_err(MOLT_EARG, "adamw: parameter %d is NULL", i);
    if (p->dtype != AG_F32 || p->device != AG_CPU)
        return molt_err(MOLT_EARG, "adamw: parameter %d '%s' must be f32 on the CPU, got %s",
                        i, p->name, ag_dtype_name(p->dtype));
    return MOLT_OK;
}

molt_status opt_adamw_init(opt_adamw *o, int n, ag_tensor *const *params,
                           const opt_adamw_config *cfg) {
    memset(o, 0, sizeof *o);
    if (n < 0)
        return molt_err(MOLT_EARG, "adamw: negative parameter count %d", n);
    MOLT_TRY(check_config(cfg));
    for (int i = 0; i < n; i++)
        MOLT_TRY(check_param(params[i], i));
    o->cfg = *cfg;
    o->n = n;
    size_t k = n > 0 ? (size_t)n : 1;
    o->params = molt_calloc(k, sizeof *o->params);
    o->m = molt_calloc(k, sizeof *o->m);
    o->v = molt_calloc(k, sizeof *o->v);
    o->steps = molt_calloc(k, sizeof *o->steps);
    if (!o->params || !o->m || !o->v || !o->steps)
        goto oom;
    for (int i = 0; i < n; i++) {
        o->params[i] = params[i];
        o->m[i] = molt_calloc((size_t)params[i]->numel, sizeof(float));
        o->v[i] = molt_calloc((size_t)params[i]->numel, sizeof(float));
        if (!o->m[i] || !o->v[i])
            goto oom;
    }
    return MOLT_OK;
oom:
    opt_adamw_free(o);
    return molt_err(MOLT_ENOMEM, "adamw: out of memory for the moments of %d parameters", n);
}

void opt_adamw_free(opt_adamw *o) {
    for (int i = 0; o->m && o->v && i < o->n; i++) {
        molt_free(o->m[i]);
        molt_free(o->v[i]);
    }
    molt_free(o->params);
    molt_free(o->m);
    molt_free(o->v);
    molt_free(o->steps);
    memset(o, 0, sizeof *o);
}

// Float scalars of one update of a parameter at step t (already incremented).
typedef struct {
    float decay;    // 1 - lr*wd
    float w1;       // 1 - beta1, the lerp weight
    float b2, c2;   // beta2, 1 - beta2
    float neg_step; // -lr / (1 - beta1^t)
    float bc2_sqrt; // sqrt(1 - beta2^t)
    float eps;
} adamw_scalars;

static adamw_scalars scalars_at(const opt_adamw_config *c, double lr, int64_t t) {
    adamw_scalars s;
    double bc1 = 1.0 - pow(c->beta1, (double)t), bc2 = 1.0 - pow(c->beta2, (double)t);
    s.decay = (float)(1.0 - lr * c->weight_decay);
    s.w1 = (float)(1.0 - c->beta1);
    s.b2 = (float)c->beta2;
    s.c2 = (float)(1.0 - c->beta2);
    s.neg_step = (float)(-(lr / bc1));
    s.bc2_sqrt = (float)pow(bc2, 0.5);
    s.eps = (float)c->eps;
    return s;
}

// torch's lerp(m, g, w): m + w*(g - m) for |w| < 0.5, else g - (g - m)*(1 - w), each as
// one fused multiply-add.
static float lerp_f(float m, float g, float w) {
    float d = g - m;
    return fabsf(w) < 0.5f ? fmaf(w, d, m) : fmaf(w - 1.0f, d, g);
}

// p, g, m, v (n): one AdamW update in place.
static void adamw_update(float *p, const float *g, float *m, float *v, int64_t n,
                         const adamw_scalars *s, bool decay) {
    for (int64_t i = 0; i < n; i++) {
        float pi = decay ? p[i] * s->decay : p[i];
        m[i] = lerp_f(m[i], g[i], s->w1);
        v[i] = v[i] * s->b2;
        v[i] = v[i] + s->c2 * g[i] * g[i];
        float denom = sqrtf(v[i]) / s->bc2_sqrt + s->eps;
        p[i] = pi + s->neg_step * m[i] / denom;
    }
}

// Whether one AdamW update of p (n) would leave p, m and v finite: the same arithmetic as
// adamw_update, nothing written.
static bool update_finite(const float *p, const float *g, const float *m, const float *v,
                          int64_t n, const adamw_scalars *s, bool decay) {
    bool ok = true;
    for (int64_t i = 0; i < n; i++) {
        float pi = decay ? p[i] * s->decay : p[i];
        float mi = lerp_f(m[i], g[i], s->w1);
        float vi = v[i] * s->b2;
        vi = vi + s->c2 * g[i] * g[i];
        float denom = sqrtf(vi) / s->bc2_sqrt + s->eps;
        float pn = pi + s->neg_step * mi / denom;
        ok &= isfinite(pn) && isfinite(mi) && isfinite(vi);
    }
    return ok;
}

int opt_adamw_nonfinite(const opt_adamw *o, double lr) {
    for (int i = 0; i < o->n; i++) {
        const ag_tensor *p = o->params[i];
        if (!p->grad || p->grad->dtype != AG_F32 || p->grad->numel != p->numel)
            continue;
        adamw_scalars s = scalars_at(&o->cfg, lr, o->steps[i] + 1);
        if (!update_finite(p->data, p->grad->data, o->m[i], o->v[i], p->numel, &s,
                           o->cfg.weight_decay != 0))
            return i;
    }
    return -1;
}

molt_status opt_adamw_step(opt_adamw *o, double lr) {
    if (!isfinite(lr) || lr < 0)
        return molt_err(MOLT_EARG, "adamw: learning rate must be finite and >= 0, got %g", lr);
    for (int i = 0; i < o->n; i++) {
        ag_tensor *p = o->params[i];
        if (!p->grad)
            continue;
        if (p->grad->dtype != AG_F32 || p->grad->numel != p->numel)
            return molt_err(MOLT_EARG, "adamw: gradient of '%s' is not f32 of %lld elements",
                            p->name, (long long)p->numel);
    }
    for (int i = 0; i < o->n; i++) {
        ag_tensor *p = o->params[i];
        if (!p->grad)
            continue;
        o->steps[i] += 1;
        adamw_scalars s = scalars_at(&o->cfg, lr, o->steps[i]);
        adamw_update(p->data, p->grad->data, o->m[i], o->v[i], p->numel, &s,
                     o->cfg.weight_decay != 0);
    }
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Clipping and accumulation.

// The float L2 norm of one gradient (squares summed in double).
static float grad_norm_f(const ag_tensor *g) {
    const float *x = g->data;
    double ss = 0;
    for (int64_t i = 0; i < g->numel; i++)
        ss += (double)x[i] * (double)x[i];
    return (float)sqrt(ss);
}

double opt_grad_sumsq(ag_tensor *const *params, int n) {
    // torch takes the norm of each gradient, then the norm of those norms.
    double ss = 0;
    for (int i = 0; i < n; i++) {
        const ag_tensor *g = params[i] ? params[i]->grad : NULL;
        if (!g)
            continue;
        double gn = grad_norm_f(g);
        ss += gn * gn;
    }
    return ss;
}

void opt_clip_to(ag_tensor *const *params, int n, double max_norm, float total) {
    if (max_norm <= 0 || !isfinite(total))
        return;
    float coef = (float)max_norm / (total + 1e-6f);
    if (coef >= 1.0f)
        return; // torch multiplies by the clamped 1.0, which changes nothing
    for (int i = 0; i < n; i++) {
        ag_tensor *g = params[i] ? params[i]->grad : NULL;
        if (!g)
            continue;
        float *x = g->data;
        for (int64_t j = 0; j < g->numel; j++)
            x[j] *= coef;
    }
}

molt_status opt_clip_grad_norm(ag_tensor *const *params, int n, double max_norm,
                               double *total_norm) {
    for (int i = 0; i < n; i++) {
        const ag_tensor *g = params[i] ? params[i]->grad : NULL;
        if (g && g->dtype != AG_F32)
            return molt_err(MOLT_EARG, "clip_grad_norm: gradient of '%s' is %s, expected f32",
                            params[i]->name, ag_dtype_name(g->dtype));
    }
    float total = (float)sqrt(opt_grad_sumsq(params, n));
    if (total_norm)
        *total_norm = total;
    opt_clip_to(params, n, max_norm, total);
    return MOLT_OK;
}

void opt_grads_scale(ag_tensor *const *params, int n, double s) {
    for (int i = 0; i < n; i++) {
        ag_tensor *g = params[i] ? params[i]->grad : NULL;
        if (!g)
            continue;
        if (g->dtype == AG_F32) {
            float *x = g->data, f = (float)s;
            for (int64_t j = 0; j < g->numel; j++)
                x[j] *= f;
        } else {
            for (int64_t j = 0; j < g->numel; j++)
                ag_set(g, j, ag_get(g, j) * s);
        }
    }
}

void opt_grads_zero(ag_tensor *const *params, int n) {
    for (int i = 0; i < n; i++)
        if (params[i] && params[i]->grad)
            ag_grad_zero(params[i]);
}
