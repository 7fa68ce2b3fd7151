// autograd/ops_moe.c: the MoE router (softmax, group-limited top-k, normalized weights) and
// the routed experts with frozen weights (builders and backward rules). Not here: the
// router's logits (an ordinary ag_linear), the shared expert (linears + ag_swiglu), LoRA on
// routed experts, expert parallelism across ranks.
//
// Router semantics follow transformers' Mistral4TopkRouter: scores = softmax(logits) over
// all E experts; with n_group > 1 the topk_group groups with the largest sum of their top-2
// scores stay eligible (a group of one expert scores its single score); top-k of the eligible
// scores; weights = chosen scores / (their sum + 1e-20) when norm_topk_prob, times scaling.
// The reference fills excluded scores with 0 before its top-k; here excluded experts are
// never chosen, which is the same choice unless an eligible score underflows to exactly 0.
// idx rows are in descending score order; among equal scores (and equal group scores) the
// lowest index comes first.
//
// Expert backward memory: nothing is saved. The gate/up activations of each (token, choice)
// would cost 2*T*k*I numbers per layer (268 MB in f32 for T = 4096 at Mistral Small 4 size);
// the backward recomputes them instead with one more GEMM (a third of the forward's work).
#include "internal.h"
#include "cpu/kernels.h"

#include <omp.h>

#define ROUTER "moe_router"
#define EXPERTS "moe_experts"

// ---- router ----------------------------------------------------------------------------

static molt_status check_router_cfg(const ag_router_config *cfg, int64_t E) {
    if (!cfg)
        return molt_err(MOLT_EARG, ROUTER ": cfg is NULL");
    if (cfg->top_k < 1 || cfg->top_k > E)
        return molt_err(MOLT_EARG, ROUTER ": top_k %d is out of range [1, %lld] (E experts)",
                        cfg->top_k, (long long)E);
    if (cfg->n_group < 1 || E % cfg->n_group != 0)
        return molt_err(MOLT_EARG, ROUTER ": n_group %d does not divide the %lld experts",
                        cfg->n_group, (long long)E);
    if (cfg->topk_group < 1 || cfg->topk_group > cfg->n_group)
        return molt_err(MOLT_EARG, ROUTER ": topk_group %d is out of range [1, %d] (n_group)",
                        cfg->topk_group, cfg->n_group);
    int64_t eligible = (int64_t)cfg->topk_group * (E / cfg->n_group);
    if (cfg->top_k > eligible)
        return molt_err(MOLT_EARG,
                        ROUTER ": top_k %d exceeds the %lld experts in %d kept groups of %lld",
                        cfg->top_k, (long long)eligible, cfg->topk_group,
                        (long long)(E / cfg->n_group));
    return MOLT_OK;
}

static molt_status check_router(const ag_tensor *logits, const ag_router_config *cfg,
                                ag_tensor **idx) {
    if (!idx)
        return molt_err(MOLT_EARG, ROUTER ": idx (the output pointer) is NULL");
    MOLT_TRY(ag_check_cpu_float(ROUTER, "logits", logits));
    MOLT_TRY(ag_check_ndim(ROUTER, "logits", logits, 2, 2));
    if (logits->shape[1] > INT32_MAX)
        return molt_err(MOLT_EARG, ROUTER ": %lld experts do not fit i32 indices",
                        (long long)logits->shape[1]);
    return check_router_cfg(cfg, logits->shape[1]);
}

// Runs the router kernel; probs (T*E reals of the logits' dtype) receives the softmax.
static molt_status router_run(ag_tensor *w, ag_tensor *idx, void *probs, const ag_tensor *logits,
                              const ag_router_config *cfg) {
    int64_t T = logits->shape[0], E = logits->shape[1];
    void *gs = molt_malloc((size_t)(T * cfg->n_group) * ag_dtype_size(logits->dtype));
    if (!gs)
        return molt_err(MOLT_ENOMEM, ROUTER ": out of memory for group scores");
    int par = !ag_reference_kernels();
    if (logits->dtype == AG_F32)
        moe_router_fwd_f32(w->data, idx->data, probs, gs, logits->data, T, E, cfg->top_k,
                           cfg->n_group, cfg->topk_group, cfg->norm_topk_prob,
                           (float)cfg->scaling, par);
    else
        moe_router_fwd_f64(w->data, idx->data, probs, gs, logits->data, T, E, cfg->top_k,
                           cfg->n_group, cfg->topk_group, cfg->norm_topk_prob, cfg->scaling,
                           par);
    molt_free(gs);
    return MOLT_OK;
}

// Contract (autograd.h): weights [T, k] differentiable w.r.t. logits; *idx = I32 [T, k] (the
// node's aux output, never differentiated). The softmax [T, E] is saved for backward.
ag_tensor *ag_moe_router(ag_ctx *c, ag_tensor *logits, const ag_router_config *cfg,
                         ag_tensor **idx) {
    if (idx)
        *idx = NULL;
    if (check_router(logits, cfg, idx) != MOLT_OK)
        return NULL;
    int64_t T = logits->shape[0], E = logits->shape[1], k = cfg->top_k;
    ag_tensor *w = ag_out_new(c, logits->dtype, 2, (int64_t[]){T, k});
    ag_tensor *ix = ag_out_new(c, AG_I32, 2, (int64_t[]){T, k});
    if (!w || !ix)
        return NULL;
    size_t pbytes = (size_t)(T * E) * ag_dtype_size(logits->dtype);
    ag_node *n = NULL;
    void *probs;
    if (ag_should_record(c, 1, &logits)) {
        if (!(n = ag_record(c, AG_OP_MOE_ROUTER, w, 1, &logits)))
            return NULL;
        n->aux = ix;
        n->i[0] = cfg->norm_topk_prob;
        n->f[0] = cfg->scaling;
        probs = ag_node_save(c, n, pbytes);
    } else {
        probs = molt_malloc(pbytes);
        if (!probs)
            molt_err(MOLT_ENOMEM, ROUTER ": out of memory for %zu bytes of scores", pbytes);
    }
    if (!probs)
        return NULL;
    molt_status st = router_run(w, ix, probs, logits, cfg);
    if (!n)
        molt_free(probs);
    if (st != MOLT_OK)
        return NULL;
    *idx = ix;
    return w;
}

molt_status ag_backward_moe_router(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *dl = ag_grad_of(n->in[0], &st), *dw = n->out->grad;
    if (!dl)
        return st;
    if (!n->saved || !n->aux)
        return molt_err(MOLT_EINTERNAL, ROUTER ": node lost its saved scores");
    int64_t T = dl->shape[0], E = dl->shape[1], k = n->out->shape[1];
    int norm = (int)n->i[0];
    if (dl->dtype == AG_F32)
        moe_router_bwd_f32(dl->data, dw->data, n->saved, n->aux->data, T, E, k, norm,
                           (float)n->f[0]);
    else
        moe_router_bwd_f64(dl->data, dw->data, n->saved, n->aux->data, T, E, k, norm, n->f[0]);
    return MOLT_OK;
}

// ---- experts -----------------------------------------------------------------------------

static molt_status check_frozen(const char *what, const ag_tensor *t) {
    if (t->requires_grad)
        return molt_err(MOLT_EARG, EXPERTS ": %s requires grad, but expert weights are frozen "
                        "(this op gives no gradient to them)", what);
    return MOLT_OK;
}

static molt_status check_expert_shapes(const ag_tensor *x, const ag_tensor *w,
                                       const ag_tensor *idx, const ag_tensor *gu,
                                       const ag_tensor *down) {
    char b0[80], b1[80];
    int64_t T = x->shape[0], H = x->shape[1];
    if (w->shape[0] != T)
        return molt_err(MOLT_EARG, EXPERTS ": weights %s and x %s differ in tokens",
                        ag_shape_str(w, b0, sizeof b0), ag_shape_str(x, b1, sizeof b1));
    if (!ag_same_shape(idx, w))
        return molt_err(MOLT_EARG, EXPERTS ": idx %s and weights %s differ in shape",
                        ag_shape_str(idx, b0, sizeof b0), ag_shape_str(w, b1, sizeof b1));
    if (gu->shape[2] != H || gu->shape[1] % 2 != 0)
        return molt_err(MOLT_EARG, EXPERTS ": w_gate_up is %s, expected [E, 2I, %lld] for x %s",
                        ag_shape_str(gu, b0, sizeof b0), (long long)H,
                        ag_shape_str(x, b1, sizeof b1));
    int64_t E = gu->shape[0], I = gu->shape[1] / 2;
    if (down->shape[0] != E || down->shape[1] != H || down->shape[2] != I)
        return molt_err(MOLT_EARG, EXPERTS ": w_down is %s, expected [%lld, %lld, %lld] "
                        "(E, H, I from w_gate_up and x)", ag_shape_str(down, b0, sizeof b0),
                        (long long)E, (long long)H, (long long)I);
    return MOLT_OK;
}

static molt_status check_idx_range(const ag_tensor *idx, int64_t E) {
    const int32_t *ix = idx->data;
    int64_t k = idx->shape[1];
    for (int64_t s = 0; s < idx->numel; s++)
        if (ix[s] < 0 || ix[s] >= E)
            return molt_err(MOLT_EARG, EXPERTS ": idx[t=%lld, j=%lld] = %d is out of range "
                            "[0, %lld)", (long long)(s / k), (long long)(s % k), ix[s],
                            (long long)E);
    return MOLT_OK;
}

static molt_status check_experts(const ag_tensor *x, const ag_tensor *w, const ag_tensor *idx,
                                 const ag_tensor *gu, const ag_tensor *down) {
    MOLT_TRY(ag_check_cpu_float(EXPERTS, "x", x));
    MOLT_TRY(ag_check_cpu_float(EXPERTS, "weights", w));
    MOLT_TRY(ag_check_i32(EXPERTS, "idx", idx));
    MOLT_TRY(ag_check_cpu_float(EXPERTS, "w_gate_up", gu));
    MOLT_TRY(ag_check_cpu_float(EXPERTS, "w_down", down));
    MOLT_TRY(ag_check_same_dtype(EXPERTS, "x", x, "weights", w));
    MOLT_TRY(ag_check_same_dtype(EXPERTS, "x", x, "w_gate_up", gu));
    MOLT_TRY(ag_check_same_dtype(EXPERTS, "x", x, "w_down", down));
    MOLT_TRY(ag_check_ndim(EXPERTS, "x", x, 2, 2));
    MOLT_TRY(ag_check_ndim(EXPERTS, "weights", w, 2, 2));
    MOLT_TRY(ag_check_ndim(EXPERTS, "idx", idx, 2, 2));
    MOLT_TRY(ag_check_ndim(EXPERTS, "w_gate_up", gu, 3, 3));
    MOLT_TRY(ag_check_ndim(EXPERTS, "w_down", down, 3, 3));
    MOLT_TRY(check_frozen("w_gate_up", gu));
    MOLT_TRY(check_frozen("w_down", down));
    MOLT_TRY(check_expert_shapes(x, w, idx, gu, down));
    if (gu->shape[0] > INT32_MAX || idx->numel > INT32_MAX)
        return molt_err(MOLT_EARG, EXPERTS ": more than 2^31 experts or slots");
    return check_idx_range(idx, gu->shape[0]);
}

typedef struct {
    int64_t T, k, E, H, I;
} expert_dims;

static expert_dims dims_of(const ag_tensor *x, const ag_tensor *w, const ag_tensor *gu) {
    return (expert_dims){x->shape[0], w->shape[1], gu->shape[0], x->shape[1], gu->shape[1] / 2};
}

// Workspace for the optimized kernels (NULL with a message on no memory).
static void *experts_ws(const expert_dims *d, ag_dtype dt) {
    size_t bytes = dt == AG_F32 ? moe_experts_ws_bytes_f32(d->T, d->k, d->E, d->H, d->I)
                                : moe_experts_ws_bytes_f64(d->T, d->k, d->E, d->H, d->I);
    void *ws = molt_malloc(bytes);
    if (!ws)
        molt_err(MOLT_ENOMEM, EXPERTS ": out of memory for a %zu-byte workspace", bytes);
    return ws;
}

// rec: the op is being recorded (training: BLAS); otherwise the batch-invariant products.
static molt_status experts_fwd(ag_tensor *y, const ag_tensor *x, const ag_tensor *w,
                               const ag_tensor *idx, const ag_tensor *gu, const ag_tensor *down,
                               bool rec) {
    expert_dims d = dims_of(x, w, gu);
    bool f32 = x->dtype == AG_F32;
    if (ag_reference_kernels()) {
        if (f32)
            moe_experts_fwd_ref_f32(y->data, x->data, w->data, idx->data, gu->data, down->data,
                                    d.T, d.k, d.H, d.I);
        else
            moe_experts_fwd_ref_f64(y->data, x->data, w->data, idx->data, gu->data, down->data,
                                    d.T, d.k, d.H, d.I);
        return MOLT_OK;
    }
    void *ws = experts_ws(&d, x->dtype);
    if (!ws)
        return MOLT_ENOMEM;
    int nt = omp_get_max_threads();
    if (f32 && !rec)
        moe_experts_fwd_bi_f32(y->data, x->data, w->data, idx->data, gu->data, down->data, d.T,
                               d.k, d.E, d.H, d.I, nt, ws);
    else if (!rec)
        moe_experts_fwd_bi_f64(y->data, x->data, w->data, idx->data, gu->data, down->data, d.T,
                               d.k, d.E, d.H, d.I, nt, ws);
    else if (f32)
        moe_experts_fwd_f32(y->data, x->data, w->data, idx->data, gu->data, down->data, d.T, d.k,
                            d.E, d.H, d.I, ws);
    else
        moe_experts_fwd_f64(y->data, x->data, w->data, idx->data, gu->data, down->data, d.T, d.k,
                            d.E, d.H, d.I, ws);
    molt_free(ws);
    return MOLT_OK;
}

// Contract (autograd.h): y [T, H] = sum_j weights[t,j] * expert_idx[t,j](x_t). x and weights
// may require grad; w_gate_up and w_down must not (frozen base weights). idx values must lie
// in [0, E); duplicates within a row are allowed and simply add up.
ag_tensor *ag_moe_experts(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                          ag_tensor *w_gate_up, ag_tensor *w_down) {
    if (check_experts(x, weights, idx, w_gate_up, w_down) != MOLT_OK)
        return NULL;
    ag_tensor *y = ag_out_new(c, x->dtype, 2, x->shape);
    ag_tensor *ins[5] = {x, weights, idx, w_gate_up, w_down};
    bool rec = ag_should_record(c, 5, ins);
    if (!y || experts_fwd(y, x, weights, idx, w_gate_up, w_down, rec) != MOLT_OK)
        return NULL;
    if (rec && !ag_record(c, AG_OP_MOE_EXPERTS, y, 5, ins))
        return NULL;
    return y;
}

molt_status ag_backward_moe_experts(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *x = n->in[0], *w = n->in[1], *idx = n->in[2], *gu = n->in[3], *down = n->in[4];
    ag_tensor *gx = ag_grad_of(x, &st), *gw = st == MOLT_OK ? ag_grad_of(w, &st) : NULL;
    if (st != MOLT_OK || (!gx && !gw))
        return st;
    expert_dims d = dims_of(x, w, gu);
    const ag_tensor *dy = n->out->grad;
    bool f32 = x->dtype == AG_F32;
    void *dxp = gx ? gx->data : NULL, *dwp = gw ? gw->data : NULL;
    if (ag_reference_kernels()) {
        if (f32)
            moe_experts_bwd_ref_f32(dxp, dwp, dy->data, x->data, w->data, idx->data, gu->data,
                                    down->data, d.T, d.k, d.H, d.I);
        else
            moe_experts_bwd_ref_f64(dxp, dwp, dy->data, x->data, w->data, idx->data, gu->data,
                                    down->data, d.T, d.k, d.H, d.I);
        return MOLT_OK;
    }
    void *ws = experts_ws(&d, x->dtype);
    if (!ws)
        return MOLT_ENOMEM;
    if (f32)
        moe_experts_bwd_f32(dxp, dwp, dy->data, x->data, w->data, idx->data, gu->data,
                            down->data, d.T, d.k, d.E, d.H, d.I, ws);
    else
        moe_experts_bwd_f64(dxp, dwp, dy->data, x->data, w->data, idx->data, gu->data,
                            down->data, d.T, d.k, d.E, d.H, d.I, ws);
    molt_free(ws);
    return MOLT_OK;
}
