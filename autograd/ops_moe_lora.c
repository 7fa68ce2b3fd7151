// autograd/ops_moe_lora.c: routed experts with LoRA adapters on the frozen 3D expert weights
// (builder and backward rule of ag_moe_experts_lora). Not here: the frozen-expert op
// (ops_moe.c), the router, LoRA on ordinary 2D linears, loading adapter files, dropout
// (PEFT refuses lora_dropout on targeted parameters, so there is none to match).
//
// Layout and formula (PEFT 0.21 src/peft/tuners/lora/layer.py, class ParamWrapper;
// transformers 5.x src/transformers/models/mistral4/modeling_mistral4.py, Mistral4Experts):
// - Mistral4Experts holds gate_up_proj [E, 2I, H] and down_proj [E, H, I] and applies them as
//   F.linear(x, W[e]) = x W[e]^T, so each W[e] is [out, in]: in = H for gate_up, in = I for
//   down. The class is decorated without is_transposed (False).
// - ParamWrapper reads a 3D shape as (E, d1, d2); for is_transposed False it swaps to
//   in_features = d2, out_features = d1 and builds lora_A = Linear(d2 -> r*E), whose weight
//   is A [r*E, in], and lora_B = Linear(r*E -> d1), weight B [out, r*E].
// - get_delta_weight reshapes A to (E, r, in): A_e[k, i] = A[e*r + k, i], and B to
//   (out, r, E): B_e[o, k] = B[o, k*E + e], then einsum "o r e, e r i -> e o i", i.e.
//   delta_W[e] = s * B_e A_e  ([out, r] x [r, in]), with s = lora_alpha / r, or
//   lora_alpha / sqrt(r) with use_rslora (update_layer). With one adapter the forward folds
//   the same product into the weight (baddbmm(W, B_e, A_e, alpha = s)).
// So the expert computes x W_eff[e]^T with W_eff[e] = W[e] + s B_e A_e; for a row x that is
// x W[e]^T + s (x A_e^T) B_e^T, which the optimized kernel evaluates without forming delta_W.
// Gradients (dW_eff[e] = sum over e's slots of d_out in^T):
// dA_e = s B_e^T dW_eff[e], dB_e = s dW_eff[e] A_e^T.
//
// Backward memory: nothing is saved; like ag_moe_experts, the backward recomputes the
// gate/up activations. The reference kernels merge the weights (two full expert stacks) and
// form dense weight gradients: they are for tests, not for model-sized runs.
#include "internal.h"
#include "cpu/kernels.h"

#include <math.h>

#define OP "moe_experts_lora"

// ---- checks ------------------------------------------------------------------------------

static molt_status check_base(const ag_tensor *x, const ag_tensor *w, const ag_tensor *idx,
                              const ag_tensor *gu, const ag_tensor *down) {
    MOLT_TRY(ag_check_cpu_float(OP, "x", x));
    MOLT_TRY(ag_check_cpu_float(OP, "weights", w));
    MOLT_TRY(ag_check_i32(OP, "idx", idx));
    MOLT_TRY(ag_check_cpu_float(OP, "w_gate_up", gu));
    MOLT_TRY(ag_check_cpu_float(OP, "w_down", down));
    MOLT_TRY(ag_check_same_dtype(OP, "x", x, "weights", w));
    MOLT_TRY(ag_check_same_dtype(OP, "x", x, "w_gate_up", gu));
    MOLT_TRY(ag_check_same_dtype(OP, "x", x, "w_down", down));
    MOLT_TRY(ag_check_ndim(OP, "x", x, 2, 2));
    MOLT_TRY(ag_check_ndim(OP, "weights", w, 2, 2));
    MOLT_TRY(ag_check_ndim(OP, "idx", idx, 2, 2));
    MOLT_TRY(ag_check_ndim(OP, "w_gate_up", gu, 3, 3));
    MOLT_TRY(ag_check_ndim(OP, "w_down", down, 3, 3));
    if (gu->requires_grad || down->requires_grad)
        return molt_err(MOLT_EARG, OP ": %s requires grad, but expert weights are frozen "
                        "(train the LoRA matrices instead)",
                        gu->requires_grad ? "w_gate_up" : "w_down");
    char b0[80], b1[80], b2[80];
    int64_t T = x->shape[0], H = x->shape[1];
    if (w->shape[0] != T || !ag_same_shape(idx, w))
        return molt_err(MOLT_EARG, OP ": weights %s and idx %s must both be [%lld, k] for x %s",
                        ag_shape_str(w, b0, sizeof b0), ag_shape_str(idx, b1, sizeof b1),
                        (long long)T, ag_shape_str(x, b2, sizeof b2));
    if (gu->shape[2] != H || gu->shape[1] % 2 != 0)
        return molt_err(MOLT_EARG, OP ": w_gate_up is %s, expected [E, 2I, %lld] for x %s",
                        ag_shape_str(gu, b0, sizeof b0), (long long)H,
                        ag_shape_str(x, b1, sizeof b1));
    int64_t E = gu->shape[0], I = gu->shape[1] / 2;
    if (down->shape[0] != E || down->shape[1] != H || down->shape[2] != I)
        return molt_err(MOLT_EARG, OP ": w_down is %s, expected [%lld, %lld, %lld] "
                        "(E, H, I from w_gate_up and x)", ag_shape_str(down, b0, sizeof b0),
                        (long long)E, (long long)H, (long long)I);
    if (E > INT32_MAX || idx->numel > INT32_MAX)
        return molt_err(MOLT_EARG, OP ": more than 2^31 experts or slots");
    const int32_t *ix = idx->data;
    for (int64_t s = 0; s < idx->numel; s++)
        if (ix[s] < 0 || ix[s] >= E)
            return molt_err(MOLT_EARG, OP ": idx[t=%lld, j=%lld] = %d is out of range [0, %lld)",
                            (long long)(s / idx->shape[1]), (long long)(s % idx->shape[1]),
                            ix[s], (long long)E);
    return MOLT_OK;
}

// One LoRA matrix: float, x's dtype, exactly [d0, d1]. `dims` spells the expected shape.
static molt_status check_factor(const char *what, const ag_tensor *t, const ag_tensor *x,
                                int64_t d0, int64_t d1, const char *dims) {
    MOLT_TRY(ag_check_cpu_float(OP, what, t));
    MOLT_TRY(ag_check_same_dtype(OP, "x", x, what, t));
    if (t->ndim == 2 && t->shape[0] == d0 && t->shape[1] == d1)
        return MOLT_OK;
    char b[80];
    return molt_err(MOLT_EARG, OP ": %s is %s, expected [%lld, %lld] (%s)", what,
                    ag_shape_str(t, b, sizeof b), (long long)d0, (long long)d1, dims);
}

static molt_status check_pair(const char *wa, const ag_tensor *a, const char *wb,
                              const ag_tensor *b) {
    if (!a != !b)
        return molt_err(MOLT_EARG, OP ": %s is given without %s (set both or neither)",
                        a ? wa : wb, a ? wb : wa);
    return MOLT_OK;
}

static molt_status check_lora(const ag_expert_lora *l, const ag_tensor *x, const ag_tensor *gu) {
    if (!l)
        return molt_err(MOLT_EARG, OP ": lora is NULL (use ag_moe_experts without adapters)");
    if (l->r < 1)
        return molt_err(MOLT_EARG, OP ": rank r = %d, expected >= 1", l->r);
    if (!isfinite(l->scale))
        return molt_err(MOLT_EARG, OP ": scale %g is not finite", l->scale);
    MOLT_TRY(check_pair("a_gate_up", l->a_gate_up, "b_gate_up", l->b_gate_up));
    MOLT_TRY(check_pair("a_down", l->a_down, "b_down", l->b_down));
    int64_t rE = (int64_t)l->r * gu->shape[0], H = x->shape[1], I2 = gu->shape[1];
    if (l->a_gate_up) {
        MOLT_TRY(check_factor("a_gate_up", l->a_gate_up, x, rE, H, "r*E, H"));
        MOLT_TRY(check_factor("b_gate_up", l->b_gate_up, x, I2, rE, "2I, r*E"));
    }
    if (l->a_down) {
        MOLT_TRY(check_factor("a_down", l->a_down, x, rE, I2 / 2, "r*E, I"));
        MOLT_TRY(check_factor("b_down", l->b_down, x, H, rE, "H, r*E"));
    }
    return MOLT_OK;
}

// ---- kernels for one dtype -----------------------------------------------------------------

// Everything a kernel call needs, as untyped pointers (f32 or f64 per `f32`).
typedef struct {
    bool f32;
    int64_t T, k, E, H, I, r;
    double s;
    const void *x, *w, *gu, *down, *agu, *bgu, *ad, *bd; // agu/ad NULL without that LoRA
    const int32_t *idx;
} lora_run;

typedef struct {
    void *dx, *dw, *agu, *bgu, *ad, *bd; // NULL where no gradient is wanted
} lora_grads;

static const void *data_or_null(const ag_tensor *t) { return t ? t->data : NULL; }

// The node's inputs: x, weights, idx, w_gate_up, w_down, a_gu, b_gu, a_d, b_d.
static lora_run run_of(ag_tensor *const *in, int r, double s) {
    const ag_tensor *x = in[0], *gu = in[3];
    return (lora_run){x->dtype == AG_F32, x->shape[0], in[1]->shape[1], gu->shape[0],
                      x->shape[1], gu->shape[1] / 2, r, s, x->data, in[1]->data, gu->data,
                      in[4]->data, data_or_null(in[5]), data_or_null(in[6]),
                      data_or_null(in[7]), data_or_null(in[8]), in[2]->data};
}

// Optimized kernels for element type S (f32/f64, real type R).
#define DEFINE_FAST(S, R)                                                                     \
    static void fast_fwd_##S(void *y, const lora_run *p, void *ws) {                          \
        moe_lora_##S l = {p->agu, p->bgu, p->ad, p->bd, p->r, (R)p->s};                        \
        moe_experts_lora_fwd_##S(y, p->x, p->w, p->idx, p->gu, p->down, &l, p->T, p->k, p->E, \
                                 p->H, p->I, ws);                                             \
    }                                                                                         \
    static void fast_bwd_##S(const lora_grads *g, const void *dy, const lora_run *p,          \
                             void *ws) {                                                      \
        moe_lora_##S l = {p->agu, p->bgu, p->ad, p->bd, p->r, (R)p->s};                        \
        moe_lora_grad_##S lg = {g->agu, g->bgu, g->ad, g->bd};                                \
        moe_experts_lora_bwd_##S(g->dx, g->dw, &lg, dy, p->x, p->w, p->idx, p->gu, p->down,   \
                                 &l, p->T, p->k, p->E, p->H, p->I, ws);                       \
    }
DEFINE_FAST(f32, float)
DEFINE_FAST(f64, double)

static molt_status run_fast(void *y, const lora_grads *g, const void *dy, const lora_run *p) {
    size_t bytes = p->f32 ? moe_experts_lora_ws_bytes_f32(p->T, p->k, p->E, p->H, p->I, p->r)
                          : moe_experts_lora_ws_bytes_f64(p->T, p->k, p->E, p->H, p->I, p->r);
    void *ws = molt_malloc(bytes);
    if (!ws)
        return molt_err(MOLT_ENOMEM, OP ": out of memory for a %zu-byte workspace", bytes);
    if (y && p->f32)
        fast_fwd_f32(y, p, ws);
    else if (y)
        fast_fwd_f64(y, p, ws);
    else if (p->f32)
        fast_bwd_f32(g, dy, p, ws);
    else
        fast_bwd_f64(g, dy, p, ws);
    molt_free(ws);
    return MOLT_OK;
}

// Reference: the merged stacks W + s B_e A_e (materialized), then k_moe.c's reference loops.
typedef struct {
    void *gu, *down; // (E, 2I, H), (E, H, I)
} merged;

static molt_status merge(merged *m, const lora_run *p) {
    size_t es = p->f32 ? sizeof(float) : sizeof(double);
    size_t ngu = (size_t)(p->E * 2 * p->I * p->H), nd = (size_t)(p->E * p->H * p->I);
    m->gu = molt_malloc(ngu * es);
    m->down = molt_malloc(nd * es);
    if (!m->gu || !m->down) {
        molt_free(m->gu);
        molt_free(m->down);
        return molt_err(MOLT_ENOMEM, OP ": out of memory merging the reference weights");
    }
    if (p->f32) {
        moe_lora_merge_f32(m->gu, p->gu, p->agu, p->bgu, p->E, 2 * p->I, p->H, p->r,
                           (float)p->s);
        moe_lora_merge_f32(m->down, p->down, p->ad, p->bd, p->E, p->H, p->I, p->r,
                           (float)p->s);
    } else {
        moe_lora_merge_f64(m->gu, p->gu, p->agu, p->bgu, p->E, 2 * p->I, p->H, p->r, p->s);
        moe_lora_merge_f64(m->down, p->down, p->ad, p->bd, p->E, p->H, p->I, p->r, p->s);
    }
    return MOLT_OK;
}

static molt_status ref_fwd(void *y, const lora_run *p) {
    merged m;
    MOLT_TRY(merge(&m, p));
    if (p->f32)
        moe_experts_fwd_ref_f32(y, p->x, p->w, p->idx, m.gu, m.down, p->T, p->k, p->H, p->I);
    else
        moe_experts_fwd_ref_f64(y, p->x, p->w, p->idx, m.gu, m.down, p->T, p->k, p->H, p->I);
    molt_free(m.gu);
    molt_free(m.down);
    return MOLT_OK;
}

// LoRA gradients from dense gradients of the merged weights (m holds the merged stacks).
static molt_status ref_lora_grads(const lora_grads *g, const void *dy, const lora_run *p,
                                  const merged *m) {
    size_t es = p->f32 ? sizeof(float) : sizeof(double);
    void *dgu = molt_calloc((size_t)(p->E * 2 * p->I * p->H), es);
    void *dd = molt_calloc((size_t)(p->E * p->H * p->I), es);
    if (!dgu || !dd) {
        molt_free(dgu);
        molt_free(dd);
        return molt_err(MOLT_ENOMEM, OP ": out of memory for the reference weight gradients");
    }
    if (p->f32) {
        moe_experts_dweight_ref_f32(dgu, dd, dy, p->x, p->w, p->idx, m->gu, m->down, p->T,
                                    p->k, p->H, p->I);
        if (p->agu)
            moe_lora_grad_from_dense_f32(g->agu, g->bgu, dgu, p->agu, p->bgu, p->E, 2 * p->I,
                                         p->H, p->r, (float)p->s);
        if (p->ad)
            moe_lora_grad_from_dense_f32(g->ad, g->bd, dd, p->ad, p->bd, p->E, p->H, p->I,
                                         p->r, (float)p->s);
    } else {
        moe_experts_dweight_ref_f64(dgu, dd, dy, p->x, p->w, p->idx, m->gu, m->down, p->T,
                                    p->k, p->H, p->I);
        if (p->agu)
            moe_lora_grad_from_dense_f64(g->agu, g->bgu, dgu, p->agu, p->bgu, p->E, 2 * p->I,
                                         p->H, p->r, p->s);
        if (p->ad)
            moe_lora_grad_from_dense_f64(g->ad, g->bd, dd, p->ad, p->bd, p->E, p->H, p->I, p->r,
                                         p->s);
    }
    molt_free(dgu);
    molt_free(dd);
    return MOLT_OK;
}

static molt_status ref_bwd(const lora_grads *g, const void *dy, const lora_run *p) {
    merged m;
    MOLT_TRY(merge(&m, p));
    if (g->dx || g->dw) {
        if (p->f32)
            moe_experts_bwd_ref_f32(g->dx, g->dw, dy, p->x, p->w, p->idx, m.gu, m.down, p->T,
                                    p->k, p->H, p->I);
        else
            moe_experts_bwd_ref_f64(g->dx, g->dw, dy, p->x, p->w, p->idx, m.gu, m.down, p->T,
                                    p->k, p->H, p->I);
    }
    molt_status st = MOLT_OK;
    if (g->agu || g->bgu || g->ad || g->bd)
        st = ref_lora_grads(g, dy, p, &m);
    molt_free(m.gu);
    molt_free(m.down);
    return st;
}

// ---- builder and backward ----------------------------------------------------------------

// Contract (autograd.h): y [T, H] = sum_j weights[t,j] * expert_e(x_t) with e = idx[t,j]
// and expert e's weights W[e] + scale * B_e A_e (PEFT's target_parameters layout). x,
// weights and the four LoRA matrices may require grad; the base weights must not.
ag_tensor *ag_moe_experts_lora(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                               ag_tensor *w_gate_up, ag_tensor *w_down,
                               const ag_expert_lora *lora) {
    if (check_base(x, weights, idx, w_gate_up, w_down) != MOLT_OK ||
        check_lora(lora, x, w_gate_up) != MOLT_OK)
        return NULL;
    ag_tensor *ins[9] = {x, weights, idx, w_gate_up, w_down, lora->a_gate_up, lora->b_gate_up,
                         lora->a_down, lora->b_down};
    ag_tensor *y = ag_out_new(c, x->dtype, 2, x->shape);
    if (!y)
        return NULL;
    lora_run p = run_of(ins, lora->r, lora->scale);
    molt_status st = ag_reference_kernels() ? ref_fwd(y->data, &p) : run_fast(y->data, NULL,
                                                                              NULL, &p);
    if (st != MOLT_OK)
        return NULL;
    if (ag_should_record(c, 9, ins)) {
        ag_node *n = ag_record(c, AG_OP_MOE_EXPERTS_LORA, y, 9, ins);
        if (!n)
            return NULL;
        n->i[0] = lora->r;
        n->f[0] = lora->scale;
    }
    return y;
}

molt_status ag_backward_moe_experts_lora(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *gt[6] = {NULL};
    static const int which[6] = {0, 1, 5, 6, 7, 8}; // x, weights, a_gu, b_gu, a_d, b_d
    bool any = false;
    for (int i = 0; i < 6 && st == MOLT_OK; i++) {
        gt[i] = ag_grad_of(n->in[which[i]], &st);
        any = any || gt[i];
    }
    if (st != MOLT_OK || !any)
        return st;
    lora_grads g = {gt[0] ? gt[0]->data : NULL, gt[1] ? gt[1]->data : NULL,
                    gt[2] ? gt[2]->data : NULL, gt[3] ? gt[3]->data : NULL,
                    gt[4] ? gt[4]->data : NULL, gt[5] ? gt[5]->data : NULL};
    lora_run p = run_of(n->in, (int)n->i[0], n->f[0]);
    const void *dy = n->out->grad->data;
    return ag_reference_kernels() ? ref_bwd(&g, dy, &p) : run_fast(NULL, &g, dy, &p);
}
