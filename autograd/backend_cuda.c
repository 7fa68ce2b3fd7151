// autograd/backend_cuda.c: the CUDA backend table: tensors and qweights on the GPU turned
// into the calls of cuda/cuda_backend.h (dtype f32 or bf16; workspace carved from the
// context's device arena and given back when the op's kernels are queued). Compiled in
// every build; without MOLT_HAVE_CUDA the table does not exist and ag_backend_cuda_table()
// returns NULL. Not here: the kernels (cuda/*.cu), operand checks (the op builders).
#include "backend.h"

#ifndef MOLT_HAVE_CUDA

const ag_backend *ag_backend_cuda_table(void) { return NULL; }

#else

#include "cuda/cuda_backend.h"
#include "quant_internal.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

// CUDA failures become MOLT_EDEVICE with the CUDA message.
#define CUDA_TRY(what, expr)                                                            \
    do {                                                                                \
        if ((expr) != 0)                                                                \
            return molt_err(MOLT_EDEVICE, "%s: %s", (what), molt_cuda_error());         \
    } while (0)

static molt_cuda_dtype dt_of(const ag_tensor *t) {
    return t->dtype == AG_BF16 ? MOLT_CUDA_BF16 : MOLT_CUDA_F32;
}

// ---- memory ----------------------------------------------------------------------------------

static molt_status cu_alloc(void **p, size_t bytes) {
    CUDA_TRY("cuda alloc", molt_cuda_malloc(p, bytes));
    return MOLT_OK;
}
static void cu_free(void *p) { molt_cuda_free(p); }
static molt_status cu_zero(void *p, size_t bytes) {
    CUDA_TRY("cuda memset", molt_cuda_memset(p, 0, bytes));
    return MOLT_OK;
}
static molt_status cu_to_host(void *dst, const void *src, size_t bytes) {
    CUDA_TRY("cuda copy to host", molt_cuda_d2h(dst, src, bytes));
    return MOLT_OK;
}
static molt_status cu_from_host(void *dst, const void *src, size_t bytes) {
    CUDA_TRY("cuda copy from host", molt_cuda_h2d(dst, src, bytes));
    return MOLT_OK;
}
static molt_status cu_copy(void *dst, const void *src, size_t bytes) {
    CUDA_TRY("cuda copy", molt_cuda_d2d(dst, src, bytes));
    return MOLT_OK;
}
static molt_status cu_fill(ag_tensor *t, double v) {
    if (t->dtype != AG_F32 && t->dtype != AG_BF16) {
        for (int64_t i = 0; i < t->numel; i++)
            ag_set(t, i, v);
        return MOLT_OK;
    }
    CUDA_TRY("fill", molt_cuda_fill(dt_of(t), t->data, (float)v, t->numel));
    return MOLT_OK;
}

// Workspace of one op from the context's device arena; give it back with ws_end.
static void *ws_begin(ag_ctx *c, size_t bytes, size_t *mark) {
    ag_arena *a = ag_ctx_arena(c, AG_CUDA);
    if (!a)
        return NULL;
    *mark = ag_arena_mark(a);
    return ag_arena_alloc(a, bytes ? bytes : 1);
}
static void ws_end(ag_ctx *c, size_t mark) { ag_arena_rewind(&c->dev_act, mark); }

// The code tables of the quantized formats, uploaded once.
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;
static int tables_rc;
static void tables_upload(void) {
    ag_qweight q = {0};
    kq_weight v;
    ag_qweight_view(&v, &q); // only the tables are read
    tables_rc = molt_cuda_set_quant_tables(v.nf4_code, v.dyn_code, v.fp8_code);
}

static molt_status qw_of(molt_cuda_qw *o, const ag_qweight *q) {
    pthread_once(&tables_once, tables_upload);
    if (tables_rc)
        return molt_err(MOLT_EDEVICE, "quantized weights: %s", molt_cuda_error());
    *o = (molt_cuda_qw){.format = (int)q->format, .n_mat = q->n_mat, .rows = q->rows,
                        .cols = q->cols, .data = q->data, .scale = q->scale,
                        .scale_per_row = q->fp8_per_row,
                        .absmax_q = q->nf4_double_quant ? q->absmax_q : NULL,
                        .absmax_scale = q->absmax_scale, .absmax_offset = q->absmax_offset};
    return MOLT_OK;
}

// ---- elementwise -----------------------------------------------------------------------------

static molt_status cu_add(ag_tensor *y, const ag_tensor *a, const ag_tensor *b) {
    CUDA_TRY("add", molt_cuda_add(dt_of(a), y->data, a->data, b->data, a->numel));
    return MOLT_OK;
}
static molt_status cu_mul(ag_tensor *y, const ag_tensor *a, const ag_tensor *b) {
    CUDA_TRY("mul", molt_cuda_mul(dt_of(a), y->data, a->data, b->data, a->numel));
    return MOLT_OK;
}
static molt_status cu_scale(ag_tensor *y, const ag_tensor *a, double s) {
    CUDA_TRY("scale", molt_cuda_scale(dt_of(a), y->data, a->data, (float)s, a->numel));
    return MOLT_OK;
}
static molt_status cu_acc(ag_tensor *g, const ag_tensor *dy) {
    CUDA_TRY("acc", molt_cuda_acc(dt_of(g), g->data, dy->data, g->numel));
    return MOLT_OK;
}
static molt_status cu_acc_mul(ag_tensor *g, const ag_tensor *dy, const ag_tensor *o) {
    CUDA_TRY("acc_mul", molt_cuda_acc_mul(dt_of(g), g->data, dy->data, o->data, g->numel));
    return MOLT_OK;
}
static molt_status cu_acc_scale(ag_tensor *g, const ag_tensor *dy, double s) {
    CUDA_TRY("acc_scale", molt_cuda_acc_scale(dt_of(g), g->data, dy->data, (float)s, g->numel));
    return MOLT_OK;
}

// Conversions between f32 and bf16 (the dtypes of the CUDA kernels).
static molt_status cu_cast(ag_tensor *y, const ag_tensor *a) {
    CUDA_TRY("cast", molt_cuda_cast(dt_of(y), y->data, dt_of(a), a->data, a->numel));
    return MOLT_OK;
}
static molt_status cu_acc_cast(ag_tensor *g, const ag_tensor *dy) {
    CUDA_TRY("cast backward", molt_cuda_acc_cast(dt_of(g), g->data, dt_of(dy), dy->data,
                                                 g->numel));
    return MOLT_OK;
}

// ---- linear, RMSNorm -------------------------------------------------------------------------

static molt_status cu_linear_fwd(ag_ctx *c, ag_tensor *y, const ag_tensor *x,
                                 const ag_tensor *w, bool rec) {
    (void)c;
    (void)rec;
    CUDA_TRY("linear", molt_cuda_linear_fwd(dt_of(x), y->data, x->data, w->data, ag_rows(x),
                                            w->shape[1], w->shape[0]));
    return MOLT_OK;
}

static molt_status cu_linear_bwd(ag_ctx *c, ag_tensor *dx, ag_tensor *dw, const ag_tensor *dy,
                                 const ag_tensor *x, const ag_tensor *w) {
    (void)c;
    int64_t T = ag_rows(x), in = w->shape[1], out = w->shape[0];
    if (dx)
        CUDA_TRY("linear backward", molt_cuda_linear_bwd_x(dt_of(x), dx->data, dy->data, w->data,
                                                           T, in, out));
    if (dw)
        CUDA_TRY("linear backward", molt_cuda_linear_bwd_w(dt_of(x), dw->data, dy->data, x->data,
                                                           T, in, out));
    return MOLT_OK;
}

static molt_status cu_rmsnorm_fwd(ag_ctx *c, ag_tensor *y, void *rstd, const ag_tensor *x,
                                  const ag_tensor *w, double eps) {
    (void)c;
    CUDA_TRY("rmsnorm", molt_cuda_rmsnorm_fwd(dt_of(x), y->data, rstd, x->data, w->data,
                                              ag_rows(x), ag_cols(x), eps));
    return MOLT_OK;
}

static molt_status cu_rmsnorm_bwd(ag_ctx *c, ag_tensor *dx, ag_tensor *dw, const ag_tensor *dy,
                                  const ag_tensor *x, const ag_tensor *w, const void *rstd) {
    int64_t T = ag_rows(x), C = ag_cols(x);
    size_t mark = 0;
    void *ws = dw ? ws_begin(c, molt_cuda_rmsnorm_ws_bytes(T, C), &mark) : NULL;
    if (dw && !ws)
        return MOLT_ENOMEM;
    int rc = molt_cuda_rmsnorm_bwd(dt_of(x), dx ? dx->data : NULL, dw ? dw->data : NULL,
                                   dy->data, x->data, w->data, rstd, T, C, ws);
    if (dw)
        ws_end(c, mark);
    CUDA_TRY("rmsnorm backward", rc);
    return MOLT_OK;
}

static size_t cu_rstd_size(ag_dtype dt) {
    (void)dt;
    return sizeof(float);
}

// ---- softmax, SwiGLU, embedding, dropout, RoPE -------------------------------------------------

static molt_status cu_softmax_fwd(ag_tensor *y, const ag_tensor *x) {
    CUDA_TRY("softmax", molt_cuda_softmax_fwd(dt_of(x), y->data, x->data, ag_rows(x),
                                              ag_cols(x)));
    return MOLT_OK;
}
static molt_status cu_softmax_bwd(ag_tensor *dx, const ag_tensor *y, const ag_tensor *dy) {
    CUDA_TRY("softmax backward", molt_cuda_softmax_bwd(dt_of(y), dx->data, y->data, dy->data,
                                                       ag_rows(y), ag_cols(y)));
    return MOLT_OK;
}
static molt_status cu_swiglu_fwd(ag_tensor *y, const ag_tensor *g, const ag_tensor *u) {
    CUDA_TRY("swiglu", molt_cuda_swiglu_fwd(dt_of(g), y->data, g->data, u->data, g->numel));
    return MOLT_OK;
}
static molt_status cu_swiglu_bwd(ag_tensor *dg, ag_tensor *du, const ag_tensor *g,
                                 const ag_tensor *u, const ag_tensor *dy) {
    CUDA_TRY("swiglu backward", molt_cuda_swiglu_bwd(dt_of(g), dg ? dg->data : NULL,
                                                     du ? du->data : NULL, g->data, u->data,
                                                     dy->data, g->numel));
    return MOLT_OK;
}
static molt_status cu_embedding_fwd(ag_tensor *y, const ag_tensor *table, const ag_tensor *ids) {
    CUDA_TRY("embedding", molt_cuda_embedding_fwd(dt_of(table), y->data, table->data, ids->data,
                                                  ids->numel, table->shape[1]));
    return MOLT_OK;
}
static molt_status cu_embedding_bwd(ag_tensor *dtable, const ag_tensor *dy, const ag_tensor *ids) {
    CUDA_TRY("embedding backward", molt_cuda_embedding_bwd(dt_of(dtable), dtable->data, dy->data,
                                                           ids->data, ids->numel,
                                                           dtable->shape[1]));
    return MOLT_OK;
}
static molt_status cu_dropout_fwd(ag_tensor *y, const ag_tensor *a, uint64_t seed, double p,
                                  int64_t first) {
    CUDA_TRY("dropout",
             molt_cuda_dropout_fwd(dt_of(a), y->data, a->data, seed, p, first, a->numel));
    return MOLT_OK;
}
static molt_status cu_dropout_bwd(ag_tensor *dx, const ag_tensor *dy, uint64_t seed, double p,
                                  int64_t first) {
    CUDA_TRY("dropout backward", molt_cuda_dropout_bwd(dt_of(dx), dx->data, dy->data, seed, p,
                                                       first, dx->numel));
    return MOLT_OK;
}

static molt_status rope_of(molt_cuda_rope *r, const ag_rope_table *tb) {
    int half = tb->rot_dim / 2;
    if (half < 1 || half > MOLT_CUDA_ROPE_MAX_HALF)
        return molt_err(MOLT_EARG, "rope: %d rotary dims, at most %d on cuda", tb->rot_dim,
                        2 * MOLT_CUDA_ROPE_MAX_HALF);
    memset(r, 0, sizeof *r);
    for (int i = 0; i < half; i++)
        r->inv_freq[i] = (float)tb->inv_freq[i];
    r->half = half;
    r->attn = (float)tb->attn_factor;
    return MOLT_OK;
}

static molt_status cu_rope_fwd(ag_tensor *y, const ag_tensor *x, const ag_tensor *pos,
                               const ag_rope_table *tb, int start) {
    molt_cuda_rope r;
    MOLT_TRY(rope_of(&r, tb));
    int64_t T = x->shape[0], D = x->shape[x->ndim - 1], rows = x->numel / (T * D);
    CUDA_TRY("rope", molt_cuda_rope_fwd(dt_of(x), y->data, x->data, pos->data, &r, T, rows, D,
                                        start));
    return MOLT_OK;
}

static molt_status cu_rope_bwd(ag_tensor *dx, const ag_tensor *dy, const ag_tensor *pos,
                               const ag_rope_table *tb, int start) {
    molt_cuda_rope r;
    MOLT_TRY(rope_of(&r, tb));
    int64_t T = dx->shape[0], D = dx->shape[dx->ndim - 1], rows = dx->numel / (T * D);
    CUDA_TRY("rope backward", molt_cuda_rope_bwd(dt_of(dx), dx->data, dy->data, pos->data, &r,
                                                 T, rows, D, start));
    return MOLT_OK;
}

// ---- router, quantized linear, experts --------------------------------------------------------

static molt_status cu_router_fwd(ag_ctx *c, ag_tensor *w, ag_tensor *idx, void *probs,
                                 const ag_tensor *logits, const ag_router_config *cfg) {
    (void)c;
    if (logits->dtype != AG_F32)
        return molt_err(MOLT_EARG, "moe_router: logits must be f32 on cuda (softmax "
                        "statistics stay in f32)");
    CUDA_TRY("moe_router", molt_cuda_router_fwd(w->data, idx->data, probs, logits->data,
                                                logits->shape[0], logits->shape[1], cfg->top_k,
                                                cfg->n_group, cfg->topk_group,
                                                cfg->norm_topk_prob, (float)cfg->scaling));
    return MOLT_OK;
}

static molt_status cu_router_bwd(ag_ctx *c, ag_tensor *dlogits, const ag_tensor *dw,
                                 const void *probs, const ag_tensor *idx,
                                 const ag_router_config *cfg) {
    (void)c;
    CUDA_TRY("moe_router backward",
             molt_cuda_router_bwd(dlogits->data, dw->data, probs, idx->data, dlogits->shape[0],
                                  dlogits->shape[1], idx->shape[1], cfg->norm_topk_prob,
                                  (float)cfg->scaling));
    return MOLT_OK;
}

static molt_status cu_linear_q_fwd(ag_ctx *c, ag_tensor *y, const ag_tensor *x,
                                   const ag_qweight *q, bool rec) {
    (void)rec;
    molt_cuda_qw w;
    MOLT_TRY(qw_of(&w, q));
    int64_t T = ag_rows(x);
    size_t mark = 0;
    void *ws = ws_begin(c, molt_cuda_qlinear_ws_bytes(dt_of(x), &w, T), &mark);
    if (!ws)
        return MOLT_ENOMEM;
    int rc = molt_cuda_qlinear_fwd(dt_of(x), y->data, x->data, &w, 0, T, ws);
    ws_end(c, mark);
    CUDA_TRY("linear_q", rc);
    return MOLT_OK;
}

static molt_status cu_linear_q_bwd(ag_ctx *c, ag_tensor *dx, const ag_tensor *dy,
                                   const ag_qweight *q) {
    molt_cuda_qw w;
    MOLT_TRY(qw_of(&w, q));
    int64_t T = ag_rows(dx);
    size_t mark = 0;
    void *ws = ws_begin(c, molt_cuda_qlinear_ws_bytes(dt_of(dx), &w, T), &mark);
    if (!ws)
        return MOLT_ENOMEM;
    int rc = molt_cuda_qlinear_bwd_x(dt_of(dx), dx->data, dy->data, &w, 0, T, ws);
    ws_end(c, mark);
    CUDA_TRY("linear_q backward", rc);
    return MOLT_OK;
}

static const void *data_or_null(const ag_tensor *t) { return t ? t->data : NULL; }

static molt_status experts_of(molt_cuda_experts *p, molt_cuda_qw *qgu, molt_cuda_qw *qd,
                              const ag_experts_args *a) {
    memset(p, 0, sizeof *p);
    p->dt = dt_of(a->x);
    p->T = a->x->shape[0];
    p->H = a->x->shape[1];
    p->k = a->w->shape[1];
    p->x = a->x->data;
    p->w = a->w->data;
    p->idx = a->idx->data;
    if (a->qgu) {
        MOLT_TRY(qw_of(qgu, a->qgu));
        MOLT_TRY(qw_of(qd, a->qdown));
        p->qgu = qgu;
        p->qd = qd;
        p->E = a->qgu->n_mat;
        p->I = a->qgu->rows / 2;
    } else {
        p->wgu = a->gu->data;
        p->wd = a->down->data;
        p->E = a->gu->shape[0];
        p->I = a->gu->shape[1] / 2;
    }
    if (a->lora) {
        p->a_gu = data_or_null(a->lora->a_gate_up);
        p->b_gu = data_or_null(a->lora->b_gate_up);
        p->a_d = data_or_null(a->lora->a_down);
        p->b_d = data_or_null(a->lora->b_down);
        p->r = a->lora->r;
        p->s = (float)a->lora->scale;
    }
    return MOLT_OK;
}

static molt_status cu_experts_fwd(ag_ctx *c, ag_tensor *y, const ag_experts_args *a, bool rec) {
    (void)rec;
    molt_cuda_experts p;
    molt_cuda_qw qgu, qd;
    MOLT_TRY(experts_of(&p, &qgu, &qd, a));
    size_t mark = 0;
    void *ws = ws_begin(c, molt_cuda_experts_ws_bytes(&p), &mark);
    if (!ws)
        return MOLT_ENOMEM;
    int rc = molt_cuda_experts_fwd(&p, y->data, ws);
    ws_end(c, mark);
    CUDA_TRY("moe_experts", rc);
    return MOLT_OK;
}

static void *grad_data(ag_tensor *t) { return t ? t->data : NULL; }

static molt_status cu_experts_bwd(ag_ctx *c, const ag_experts_args *a, const ag_tensor *dy,
                                  const ag_experts_grads *g) {
    molt_cuda_experts p;
    molt_cuda_qw qgu, qd;
    MOLT_TRY(experts_of(&p, &qgu, &qd, a));
    molt_cuda_experts_grads cg = {grad_data(g->dx), grad_data(g->dw), grad_data(g->da_gu),
                                  grad_data(g->db_gu), grad_data(g->da_d), grad_data(g->db_d)};
    size_t mark = 0;
    void *ws = ws_begin(c, molt_cuda_experts_ws_bytes(&p), &mark);
    if (!ws)
        return MOLT_ENOMEM;
    int rc = molt_cuda_experts_bwd(&p, dy->data, &cg, ws);
    ws_end(c, mark);
    CUDA_TRY("moe_experts backward", rc);
    return MOLT_OK;
}

// ---- fused cross-entropy --------------------------------------------------------------------

static void ce_of(molt_cuda_ce *p, const ag_ce_args *a) {
    ag_tensor *h = a->in[0], *w = a->in[1], *h2 = a->in[4], *w2 = a->in[5];
    int64_t V = w->shape[0];
    *p = (molt_cuda_ce){.dt = dt_of(h), .T = h->shape[0], .C = h->shape[1], .V = V,
                        .chunk = a->chunk < V ? a->chunk : V, .R = h2 ? h2->shape[1] : 0,
                        .h = h->data, .w = w->data, .h2 = data_or_null(h2),
                        .w2 = data_or_null(w2), .targets = a->in[2]->data};
}

// lse goes to the node's saved state (device); zt to the workspace; both come back to the
// host for the loss, which is formed as the CPU forms it.
static molt_status cu_ce_forward(ag_ctx *c, const ag_ce_args *a, double *lse, void *dh,
                                 double *loss) {
    if (dh)
        return molt_err(MOLT_EINTERNAL, "cross_entropy_linear: no fused gradient on cuda");
    molt_cuda_ce p;
    ce_of(&p, a);
    int64_t T = p.T;
    size_t mark = 0, zb = (size_t)T * sizeof(double);
    char *ws = ws_begin(c, molt_cuda_ce_ws_bytes(&p) + 256 + zb, &mark);
    if (!ws)
        return MOLT_ENOMEM;
    double *zt = (double *)ws;
    int rc = molt_cuda_ce_fwd(&p, lse, zt, ws + ((zb + 255) & ~(size_t)255));
    double *h = rc ? NULL : molt_malloc(2 * zb + 1);
    if (!rc && h)
        rc = molt_cuda_d2h(h, lse, zb) || molt_cuda_d2h(h + T, zt, zb);
    ws_end(c, mark);
    if (rc) {
        molt_free(h);
        CUDA_TRY("cross_entropy_linear", rc);
    }
    if (!h)
        return molt_err(MOLT_ENOMEM, "cross_entropy_linear: out of memory");
    const ag_tensor *mask = a->in[3];
    const void *mv = NULL;
    void *copy = NULL;
    molt_status st = mask ? ag_host_view("cross_entropy_linear", mask, &mv, &copy) : MOLT_OK;
    double acc = 0;
    for (int64_t t = 0; st == MOLT_OK && t < T; t++) {
        double m = !mask ? 1.0
                   : mask->dtype == AG_F32 ? ((const float *)mv)[t]
                                           : ag_bf16_to_f32(((const uint16_t *)mv)[t]);
        if (m != 0)
            acc += m * (h[t] - h[T + t]);
    }
    *loss = a->msum > 0 ? acc / a->msum : 0.0;
    molt_free(copy);
    molt_free(h);
    return st;
}

static molt_status cu_ce_backward(ag_ctx *c, const ag_ce_args *a, const double *lse,
                                  double scale, ag_tensor *dh, ag_tensor *dw, ag_tensor *dh2,
                                  ag_tensor *dw2) {
    molt_cuda_ce p;
    ce_of(&p, a);
    size_t mark = 0;
    void *ws = ws_begin(c, molt_cuda_ce_ws_bytes(&p), &mark);
    if (!ws)
        return MOLT_ENOMEM;
    const ag_tensor *mask = a->in[3];
    int rc = molt_cuda_ce_bwd(&p, data_or_null(mask), scale, lse, grad_data(dh), grad_data(dw),
                              grad_data(dh2), grad_data(dw2), ws);
    ws_end(c, mark);
    CUDA_TRY("cross_entropy_linear backward", rc);
    return MOLT_OK;
}

// ---- fused optimizer steps ------------------------------------------------------------------

static molt_status cu_adamw_multi(ag_ctx *c, const ag_adamw_item *items, int n) {
    molt_cuda_adamw_item *ci = molt_malloc((size_t)n * sizeof *ci);
    int64_t *numel = molt_malloc((size_t)n * sizeof *numel);
    if (!ci || !numel) {
        molt_free(ci);
        molt_free(numel);
        return molt_err(MOLT_ENOMEM, "adamw_multi: out of memory for %d items", n);
    }
    for (int i = 0; i < n; i++) {
        const ag_adamw_item *it = &items[i];
        ci[i] = (molt_cuda_adamw_item){it->p->data, it->g->data, it->m->data, it->v->data,
                                       it->p->numel, it->decay, it->w1, it->b2, it->c2,
                                       it->neg_step, it->bc2_sqrt, it->eps, it->apply_decay};
        numel[i] = it->p->numel;
    }
    size_t mark = 0;
    void *ws = ws_begin(c, molt_cuda_multi_ws_bytes(n, numel), &mark);
    int rc = ws ? molt_cuda_adamw(ci, n, ws) : 0;
    if (ws)
        ws_end(c, mark);
    molt_free(ci);
    molt_free(numel);
    if (!ws)
        return MOLT_ENOMEM;
    CUDA_TRY("adamw_multi", rc);
    return MOLT_OK;
}

// ptrs[i], numel[i] of ts; molt_malloc'ed (free both)
static molt_status multi_lists(ag_tensor *const *ts, int n, float ***ptrs, int64_t **numel) {
    *ptrs = molt_malloc((size_t)n * sizeof **ptrs);
    *numel = molt_malloc((size_t)n * sizeof **numel);
    if (!*ptrs || !*numel) {
        molt_free(*ptrs);
        molt_free(*numel);
        return molt_err(MOLT_ENOMEM, "multi-tensor op: out of memory for %d tensors", n);
    }
    for (int i = 0; i < n; i++) {
        (*ptrs)[i] = ts[i]->data;
        (*numel)[i] = ts[i]->numel;
    }
    return MOLT_OK;
}

static molt_status cu_sumsq_multi(ag_ctx *c, ag_tensor *const *ts, int n, double *out) {
    float **ptrs;
    int64_t *numel;
    MOLT_TRY(multi_lists(ts, n, &ptrs, &numel));
    size_t mark = 0;
    void *ws = ws_begin(c, molt_cuda_multi_ws_bytes(n, numel), &mark);
    int rc = ws ? molt_cuda_sumsq((const float *const *)ptrs, numel, n, out, ws) : 0;
    if (ws)
        ws_end(c, mark);
    molt_free(ptrs);
    molt_free(numel);
    if (!ws)
        return MOLT_ENOMEM;
    CUDA_TRY("sumsq_multi", rc);
    return MOLT_OK;
}

static molt_status cu_scale_multi(ag_ctx *c, ag_tensor *const *ts, int n, double s) {
    float **ptrs;
    int64_t *numel;
    MOLT_TRY(multi_lists(ts, n, &ptrs, &numel));
    size_t mark = 0;
    void *ws = ws_begin(c, molt_cuda_multi_ws_bytes(n, numel), &mark);
    int rc = ws ? molt_cuda_multi_scale(ptrs, numel, n, (float)s, ws) : 0;
    if (ws)
        ws_end(c, mark);
    molt_free(ptrs);
    molt_free(numel);
    if (!ws)
        return MOLT_ENOMEM;
    CUDA_TRY("scale_multi", rc);
    return MOLT_OK;
}

static const ag_backend cuda_table = {
    .name = "cuda",
    .device = AG_CUDA,
    .float_ok = {[AG_F32] = true, [AG_BF16] = true},
    .ce_fuses = false,
    .mem_alloc = cu_alloc,
    .mem_free = cu_free,
    .mem_zero = cu_zero,
    .to_host = cu_to_host,
    .from_host = cu_from_host,
    .copy = cu_copy,
    .fill = cu_fill,
    .add = cu_add,
    .mul = cu_mul,
    .scale = cu_scale,
    .acc = cu_acc,
    .acc_mul = cu_acc_mul,
    .acc_scale = cu_acc_scale,
    .cast = cu_cast,
    .acc_cast = cu_acc_cast,
    .linear_fwd = cu_linear_fwd,
    .linear_bwd = cu_linear_bwd,
    .rmsnorm_fwd = cu_rmsnorm_fwd,
    .rmsnorm_bwd = cu_rmsnorm_bwd,
    .rmsnorm_rstd_size = cu_rstd_size,
    .softmax_fwd = cu_softmax_fwd,
    .softmax_bwd = cu_softmax_bwd,
    .swiglu_fwd = cu_swiglu_fwd,
    .swiglu_bwd = cu_swiglu_bwd,
    .embedding_fwd = cu_embedding_fwd,
    .embedding_bwd = cu_embedding_bwd,
    .dropout_fwd = cu_dropout_fwd,
    .dropout_bwd = cu_dropout_bwd,
    .rope_fwd = cu_rope_fwd,
    .rope_bwd = cu_rope_bwd,
    .router_fwd = cu_router_fwd,
    .router_bwd = cu_router_bwd,
    .linear_q_fwd = cu_linear_q_fwd,
    .linear_q_bwd = cu_linear_q_bwd,
    .experts_fwd = cu_experts_fwd,
    .experts_bwd = cu_experts_bwd,
    .ce_forward = cu_ce_forward,
    .ce_backward = cu_ce_backward,
    .adamw_multi = cu_adamw_multi,
    .sumsq_multi = cu_sumsq_multi,
    .scale_multi = cu_scale_multi,
};

const ag_backend *ag_backend_cuda_table(void) { return &cuda_table; }

#endif
