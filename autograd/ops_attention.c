// autograd/ops_attention.c: rotary embedding (frequency tables with YaRN, ag_rope) and
// causal packed-sequence attention (ag_attention): builders and backward rules. The kernels
// live in cpu/k_rope.c and cpu/k_attention.c. Not here: the MLA projections, the KV cache or
// the llama-4 query temperature itself (the model computes qtemp and passes it in).
#include "backend.h"
#include "cpu/kernels.h"

#include <limits.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#define ROPE_MAX_DIM 512 // twice the capacity of ag_rope_table.inv_freq
#define ROPE_PI 3.14159265358979323846

// ---- frequency tables ------------------------------------------------------------------

double ag_yarn_mscale(double scale, double m) {
    if (scale <= 1)
        return 1.0;
    return 0.1 * m * log(scale) + 1.0;
}

static molt_status check_finite_min(const char *what, double v, double lo, bool strict) {
    if (isfinite(v) && (strict ? v > lo : v >= lo))
        return MOLT_OK;
    return molt_err(MOLT_EARG, "rope_table: %s is %g, expected a finite number %s %g", what, v,
                    strict ? ">" : ">=", lo);
}

static molt_status check_rope_config(const ag_rope_config *cfg) {
    int d = cfg->rot_dim;
    if (d <= 0 || d % 2 != 0 || d > ROPE_MAX_DIM)
        return molt_err(MOLT_EARG, "rope_table: rot_dim is %d, expected an even number in 2..%d",
                        d, ROPE_MAX_DIM);
    MOLT_TRY(check_finite_min("theta", cfg->theta, 0, true));
    if (!cfg->yarn)
        return MOLT_OK;
    // the correction range divides by ln(theta)
    MOLT_TRY(check_finite_min("theta (yarn)", cfg->theta, 1, true));
    MOLT_TRY(check_finite_min("yarn factor", cfg->factor, 1, false));
    MOLT_TRY(check_finite_min("yarn original_max_pos", cfg->original_max_pos, 0, true));
    MOLT_TRY(check_finite_min("yarn beta_fast", cfg->beta_fast, 0, true));
    MOLT_TRY(check_finite_min("yarn beta_slow", cfg->beta_slow, 0, true));
    MOLT_TRY(check_finite_min("yarn mscale", cfg->mscale, 0, false));
    MOLT_TRY(check_finite_min("yarn mscale_all_dim", cfg->mscale_all_dim, 0, false));
    return MOLT_OK;
}

// The rotary dim index at which a frequency completes `rotations` turns over the original
// context: d * ln(orig / (rotations * 2 pi)) / (2 ln theta).
static double yarn_correction_dim(double rotations, const ag_rope_config *cfg) {
    return cfg->rot_dim * log(cfg->original_max_pos / (rotations * 2 * ROPE_PI)) /
           (2 * log(cfg->theta));
}

// Fills inv_freq[i] = theta^(-2i/d); with YaRN, frequencies between the correction dims of
// beta_fast (floor, at least 0) and beta_slow (ceil, at most d - 1) blend linearly from the
// original ("extrapolated") value to the value divided by factor ("interpolated"), and the
// cos/sin factor is mscale(factor, mscale) / mscale(factor, mscale_all_dim). As in
// transformers, a zero mscale or mscale_all_dim means "not given": the factor is then
// mscale(factor, 1). Everything is evaluated in double. On error *t is left untouched.
molt_status ag_rope_table_init(ag_rope_table *t, const ag_rope_config *cfg) {
    if (!t || !cfg)
        return molt_err(MOLT_EARG, "rope_table: %s is NULL", t ? "cfg" : "table");
    MOLT_TRY(check_rope_config(cfg));
    int d = cfg->rot_dim, half = d / 2;
    double low = 0, high = 1;
    if (cfg->yarn) {
        low = fmax(floor(yarn_correction_dim(cfg->beta_fast, cfg)), 0);
        high = fmin(ceil(yarn_correction_dim(cfg->beta_slow, cfg)), d - 1);
        if (low == high)
            high += 0.001; // a step instead of a ramp, without dividing by zero
    }
    memset(t, 0, sizeof *t);
    t->rot_dim = d;
    t->attn_factor = 1.0;
    for (int i = 0; i < half; i++) {
        double base = pow(cfg->theta, 2.0 * i / d), extra = 1 / base;
        t->inv_freq[i] = extra;
        if (cfg->yarn) {
            double ramp = fmin(fmax((i - low) / (high - low), 0), 1);
            t->inv_freq[i] = extra / cfg->factor * ramp + extra * (1 - ramp);
        }
    }
    if (cfg->yarn) {
        if (cfg->mscale != 0 && cfg->mscale_all_dim != 0)
            t->attn_factor = ag_yarn_mscale(cfg->factor, cfg->mscale) /
                             ag_yarn_mscale(cfg->factor, cfg->mscale_all_dim);
        else
            t->attn_factor = ag_yarn_mscale(cfg->factor, 1);
    }
    return MOLT_OK;
}

// ---- rope ------------------------------------------------------------------------------

static molt_status check_rope(ag_tensor *x, ag_tensor *pos, const ag_rope_table *tb,
                              int start, const ag_backend **be) {
    static const char *const names[2] = {"x", "pos"};
    char bx[80], bp[80];
    MOLT_TRY(ag_check_float("rope", "x", x));
    MOLT_TRY(ag_check_ndim("rope", "x", x, 2, 4));
    MOLT_TRY(ag_check_int32("rope", "pos", pos));
    ag_tensor *ts[2] = {x, pos};
    MOLT_TRY(ag_backend_pick("rope", 2, ts, names, be));
    if (pos->ndim != 1 || pos->shape[0] != x->shape[0])
        return molt_err(MOLT_EARG, "rope: pos is %s, expected [%lld] (one position per row of x "
                        "%s)", ag_shape_str(pos, bp, sizeof bp), (long long)x->shape[0],
                        ag_shape_str(x, bx, sizeof bx));
    if (!tb)
        return molt_err(MOLT_EARG, "rope: table is NULL");
    if (tb->rot_dim <= 0 || tb->rot_dim % 2 != 0 || tb->rot_dim > ROPE_MAX_DIM)
        return molt_err(MOLT_EARG, "rope: table has rot_dim %d, expected an even number in "
                        "2..%d (set it up with ag_rope_table_init)", tb->rot_dim, ROPE_MAX_DIM);
    int64_t D = x->shape[x->ndim - 1];
    if (start < 0 || start + (int64_t)tb->rot_dim > D)
        return molt_err(MOLT_EARG, "rope: rotary dims [%d, %lld) do not fit in the last dim of "
                        "x %s", start, (long long)start + tb->rot_dim,
                        ag_shape_str(x, bx, sizeof bx));
    const void *pv;
    void *copy;
    MOLT_TRY(ag_host_view("rope", pos, &pv, &copy));
    const int32_t *p = pv;
    molt_status st = MOLT_OK;
    for (int64_t t = 0; t < pos->numel && st == MOLT_OK; t++)
        if (p[t] < 0)
            st = molt_err(MOLT_EARG, "rope: pos[%lld] is %d, expected >= 0", (long long)t,
                          (int)p[t]);
    molt_free(copy);
    return st;
}

typedef struct {
    int64_t T, rows, D;
} rope_dims;

static rope_dims rope_dims_of(const ag_tensor *x) {
    rope_dims r = {.T = x->shape[0], .D = x->shape[x->ndim - 1]};
    r.rows = x->numel / (r.T * r.D);
    return r;
}

// f32 inputs get float angles, float(pos) * float(inv_freq), like transformers
// (cpu/k_rope.c); f64 inputs double ones.
molt_status ag_cpu_rope_fwd(ag_tensor *y, const ag_tensor *x, const ag_tensor *pos,
                            const ag_rope_table *tb, int start) {
    rope_dims r = rope_dims_of(x);
    int half = tb->rot_dim / 2;
    double af = tb->attn_factor;
    bool ref = ag_reference_kernels();
    if (x->dtype == AG_F32)
        (ref ? rope_fwd_ref_f32 : rope_fwd_fast_f32)(y->data, x->data, pos->data, tb->inv_freq,
                                                     half, af, r.T, r.rows, r.D, start);
    else
        (ref ? rope_fwd_ref_f64 : rope_fwd_fast_f64)(y->data, x->data, pos->data, tb->inv_freq,
                                                     half, af, r.T, r.rows, r.D, start);
    return MOLT_OK;
}

molt_status ag_cpu_rope_bwd(ag_tensor *dx, const ag_tensor *dy, const ag_tensor *pos,
                            const ag_rope_table *tb, int start) {
    rope_dims r = rope_dims_of(dx);
    int half = tb->rot_dim / 2;
    bool ref = ag_reference_kernels();
    if (dx->dtype == AG_F32)
        (ref ? rope_bwd_ref_f32 : rope_bwd_fast_f32)(dx->data, dy->data, pos->data, tb->inv_freq,
                                                     half, tb->attn_factor, r.T, r.rows, r.D,
                                                     start);
    else
        (ref ? rope_bwd_ref_f64 : rope_bwd_fast_f64)(dx->data, dy->data, pos->data, tb->inv_freq,
                                                     half, tb->attn_factor, r.T, r.rows, r.D,
                                                     start);
    return MOLT_OK;
}

// Rotates dims [start, start + rot_dim) of x's last dim; see autograd.h. The table is kept
// by pointer for backward: it must outlive the tape (model tables do).
ag_tensor *ag_rope(ag_ctx *c, ag_tensor *x, ag_tensor *pos, const ag_rope_table *table,
                   int start) {
    const ag_backend *be;
    if (check_rope(x, pos, table, start, &be) != MOLT_OK)
        return NULL;
    ag_tensor *y = ag_out_new_on(c, x->device, x->dtype, x->ndim, x->shape);
    if (!y || AG_BE_CALL(be, rope_fwd, "rope", y, x, pos, table, start) != MOLT_OK)
        return NULL;
    if (ag_should_record(c, 1, &x)) {
        ag_tensor *ins[2] = {x, pos};
        ag_node *n = ag_record(c, AG_OP_ROPE, y, 2, ins);
        if (!n)
            return NULL;
        n->ptr = table;
        n->i[0] = start;
    }
    return y;
}

// dx += R^T dy with R the per-pair rotation (times attn_factor) of the forward; dims outside
// the rotary slice pass dy through.
molt_status ag_backward_rope(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *x = n->in[0], *pos = n->in[1], *dy = n->out->grad;
    ag_tensor *g = ag_grad_of(x, &st);
    if (!g)
        return st;
    return AG_BE_CALL(ag_backend_node(n), rope_bwd, "rope backward", g, dy, pos, n->ptr,
                      (int)n->i[0]);
}

// ---- attention -------------------------------------------------------------------------

static molt_status check_attention_operands(const ag_tensor *q, const ag_tensor *k,
                                            const ag_tensor *v) {
    char bq[80], bk[80];
    MOLT_TRY(ag_check_cpu_float("attention", "q", q));
    MOLT_TRY(ag_check_cpu_float("attention", "k", k));
    MOLT_TRY(ag_check_cpu_float("attention", "v", v));
    MOLT_TRY(ag_check_same_dtype("attention", "q", q, "k", k));
    MOLT_TRY(ag_check_same_dtype("attention", "q", q, "v", v));
    MOLT_TRY(ag_check_ndim("attention", "q", q, 3, 3));
    MOLT_TRY(ag_check_ndim("attention", "k", k, 3, 3));
    MOLT_TRY(ag_check_ndim("attention", "v", v, 3, 3));
    if (!ag_same_shape(q, k))
        return molt_err(MOLT_EARG, "attention: q %s and k %s differ in shape",
                        ag_shape_str(q, bq, sizeof bq), ag_shape_str(k, bk, sizeof bk));
    if (v->shape[0] != q->shape[0] || v->shape[1] != q->shape[1])
        return molt_err(MOLT_EARG, "attention: v %s does not match q %s in T and H",
                        ag_shape_str(v, bk, sizeof bk), ag_shape_str(q, bq, sizeof bq));
    // the optimized kernels hand sizes to BLAS as int
    if (q->shape[0] > INT_MAX || q->shape[1] * q->shape[2] > INT_MAX ||
        v->shape[1] * v->shape[2] > INT_MAX)
        return molt_err(MOLT_EARG, "attention: q %s is too large", ag_shape_str(q, bq, sizeof bq));
    return MOLT_OK;
}

static molt_status check_attention(const ag_ctx *c, const ag_tensor *q, const ag_tensor *k,
                                   const ag_tensor *v, const ag_tensor *seg,
                                   const ag_tensor *qtemp, double scale) {
    char b[80];
    MOLT_TRY(check_attention_operands(q, k, v));
    long long T = (long long)q->shape[0];
    MOLT_TRY(ag_check_i32("attention", "seg", seg));
    if (seg->ndim != 1 || seg->shape[0] != T)
        return molt_err(MOLT_EARG, "attention: seg is %s, expected [%lld]",
                        ag_shape_str(seg, b, sizeof b), T);
    if (qtemp) {
        MOLT_TRY(ag_check_cpu_float("attention", "qtemp", qtemp));
        MOLT_TRY(ag_check_same_dtype("attention", "q", q, "qtemp", qtemp));
        if (qtemp->ndim != 1 || qtemp->shape[0] != T)
            return molt_err(MOLT_EARG, "attention: qtemp is %s, expected [%lld]",
                            ag_shape_str(qtemp, b, sizeof b), T);
        if (c->grad_mode && qtemp->requires_grad)
            return molt_err(MOLT_EARG, "attention: qtemp requires grad, but the query "
                            "temperature is not differentiated");
    }
    if (!isfinite(scale))
        return molt_err(MOLT_EARG, "attention: scale is %g, expected a finite number", scale);
    return MOLT_OK;
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

// Scratch of the optimized kernels: kv_lo (T) then the per-thread workspace.
typedef struct {
    void *mem;
    int64_t *kv_lo;
    void *ws;
    int nthreads;
} attn_scratch;

// kv_lo[t] = smallest s with seg[s] == seg[t], by sorting (segment, position) keys; works
// for segments that are not contiguous too.
static void segment_starts(int64_t *kv_lo, int64_t *keys, const int32_t *seg, int64_t T) {
    for (int64_t t = 0; t < T; t++)
        keys[t] = (int64_t)seg[t] * ((int64_t)1 << 32) + t;
    qsort(keys, (size_t)T, sizeof *keys, cmp_i64);
    int64_t first = 0;
    for (int64_t i = 0; i < T; i++) {
        int64_t t = keys[i] & 0xffffffff;
        if (i == 0 || seg[t] != seg[keys[i - 1] & 0xffffffff])
            first = t;
        kv_lo[t] = first;
    }
}

static molt_status attn_scratch_new(attn_scratch *s, const ag_tensor *seg, ag_dtype dt) {
    int64_t T = seg->numel;
    s->nthreads = omp_get_max_threads();
    size_t ws = dt == AG_F32 ? attention_ws_bytes_f32(T, s->nthreads)
                             : attention_ws_bytes_f64(T, s->nthreads);
    size_t head = ((size_t)T * 2 * sizeof(int64_t) + 63) & ~(size_t)63;
    s->mem = molt_malloc(head + ws + 64);
    if (!s->mem)
        return molt_err(MOLT_ENOMEM, "attention: out of memory for %zu bytes of workspace",
                        head + ws);
    s->kv_lo = s->mem;
    s->ws = (char *)s->mem + head;
    segment_starts(s->kv_lo, s->kv_lo + T, seg->data, T);
    return MOLT_OK;
}

typedef struct {
    int64_t T, H, Dqk, Dv;
} attn_dims;

static attn_dims attn_dims_of(const ag_tensor *q, const ag_tensor *v) {
    return (attn_dims){q->shape[0], q->shape[1], q->shape[2], v->shape[2]};
}

static void attn_forward(ag_tensor *y, void *lse, const ag_tensor *q, const ag_tensor *k,
                         const ag_tensor *v, const ag_tensor *seg, const ag_tensor *qtemp,
                         double scale, const attn_scratch *s) {
    attn_dims d = attn_dims_of(q, v);
    const void *qt = qtemp ? qtemp->data : NULL;
    if (q->dtype == AG_F32) {
        if (!s)
            attention_fwd_ref_f32(y->data, lse, q->data, k->data, v->data, seg->data, qt, scale,
                                  d.T, d.H, d.Dqk, d.Dv);
        else
            attention_fwd_fast_f32(y->data, lse, q->data, k->data, v->data, seg->data, s->kv_lo,
                                   qt, scale, d.T, d.H, d.Dqk, d.Dv, s->ws, s->nthreads);
    } else {
        if (!s)
            attention_fwd_ref_f64(y->data, lse, q->data, k->data, v->data, seg->data, qt, scale,
                                  d.T, d.H, d.Dqk, d.Dv);
        else
            attention_fwd_fast_f64(y->data, lse, q->data, k->data, v->data, seg->data, s->kv_lo,
                                   qt, scale, d.T, d.H, d.Dqk, d.Dv, s->ws, s->nthreads);
    }
}

// Causal packed attention; see autograd.h. Saves only the log-sum-exp [T, H] for backward.
ag_tensor *ag_attention(ag_ctx *c, ag_tensor *q, ag_tensor *k, ag_tensor *v, ag_tensor *seg,
                        ag_tensor *qtemp, double scale) {
    if (check_attention(c, q, k, v, seg, qtemp, scale) != MOLT_OK)
        return NULL;
    int64_t shape[3] = {q->shape[0], q->shape[1], v->shape[2]};
    ag_tensor *y = ag_out_new(c, q->dtype, 3, shape);
    if (!y)
        return NULL;
    attn_scratch s = {0};
    bool fast = !ag_reference_kernels();
    if (fast && attn_scratch_new(&s, seg, q->dtype) != MOLT_OK)
        return NULL;
    void *lse = NULL;
    ag_tensor *qkv[3] = {q, k, v};
    if (ag_should_record(c, 3, qkv)) {
        ag_tensor *ins[5] = {q, k, v, seg, qtemp};
        ag_node *n = ag_record(c, AG_OP_ATTENTION, y, 5, ins);
        lse = n ? ag_node_save(c, n, (size_t)(q->shape[0] * q->shape[1]) *
                                         ag_dtype_size(q->dtype))
                : NULL;
        if (!lse) {
            molt_free(s.mem);
            return NULL;
        }
        n->f[0] = scale;
    }
    attn_forward(y, lse, q, k, v, seg, qtemp, scale, fast ? &s : NULL);
    molt_free(s.mem);
    return y;
}

molt_status ag_backward_attention(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *q = n->in[0], *k = n->in[1], *v = n->in[2], *seg = n->in[3], *qtemp = n->in[4];
    ag_tensor *gq = ag_grad_of(q, &st), *gk = ag_grad_of(k, &st), *gv = ag_grad_of(v, &st);
    if (st != MOLT_OK || (!gq && !gk && !gv))
        return st;
    MOLT_ASSERT(n->saved != NULL);
    attn_dims d = attn_dims_of(q, v);
    attn_scratch s = {0};
    bool fast = !ag_reference_kernels();
    if (fast)
        MOLT_TRY(attn_scratch_new(&s, seg, q->dtype));
    void *dq = gq ? gq->data : NULL, *dk = gk ? gk->data : NULL, *dv = gv ? gv->data : NULL;
    const void *qt = qtemp ? qtemp->data : NULL, *dy = n->out->grad->data, *o = n->out->data;
    double sc = n->f[0];
    if (q->dtype == AG_F32) {
        if (fast)
            attention_bwd_fast_f32(dq, dk, dv, dy, o, n->saved, q->data, k->data, v->data,
                                   seg->data, s.kv_lo, qt, sc, d.T, d.H, d.Dqk, d.Dv, s.ws,
                                   s.nthreads);
        else
            attention_bwd_ref_f32(dq, dk, dv, dy, o, n->saved, q->data, k->data, v->data,
                                  seg->data, qt, sc, d.T, d.H, d.Dqk, d.Dv);
    } else {
        if (fast)
            attention_bwd_fast_f64(dq, dk, dv, dy, o, n->saved, q->data, k->data, v->data,
                                   seg->data, s.kv_lo, qt, sc, d.T, d.H, d.Dqk, d.Dv, s.ws,
                                   s.nthreads);
        else
            attention_bwd_ref_f64(dq, dk, dv, dy, o, n->saved, q->data, k->data, v->data,
                                  seg->data, qt, sc, d.T, d.H, d.Dqk, d.Dv);
    }
    molt_free(s.mem);
    return MOLT_OK;
}
