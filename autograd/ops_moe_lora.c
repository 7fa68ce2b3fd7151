// autograd/ops_moe_lora.c: routed experts with LoRA adapters on the frozen 3D expert weights
// (builders and backward rules of ag_moe_experts_lora, dense stacks, and
// ag_moe_experts_lora_q, quantized stacks: QLoRA on the experts). Not here: the frozen-expert
// ops (ops_moe.c, ops_qlinear.c), the router, LoRA on ordinary 2D linears, loading adapter
// files, dropout (PEFT refuses lora_dropout on targeted parameters, so there is none to
// match).
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
//
// Quantized stacks (the _q op) are the same computation on the decoded weights: the
// reference decodes both whole stacks element by element (kq_elem) and runs the dense
// reference; the optimized kernel decodes one busy expert at a time into a per-thread buffer.
#include "quant_internal.h"
#include "backend.h"

#include <math.h>
#include <string.h>

#define OP "moe_experts_lora"
#define OPQ "moe_experts_lora_q"

// ---- checks ------------------------------------------------------------------------------

// E and the slot count fit int32, and every idx value lies in [0, E) (read back once when
// idx lives on a device).
molt_status ag_check_expert_idx(const char *op, const ag_tensor *idx, int64_t E) {
    if (E > INT32_MAX || idx->numel > INT32_MAX)
        return molt_err(MOLT_EARG, "%s: more than 2^31 experts or slots", op);
    const void *iv;
    void *copy;
    MOLT_TRY(ag_host_view(op, idx, &iv, &copy));
    const int32_t *ix = iv;
    molt_status st = MOLT_OK;
    for (int64_t s = 0; s < idx->numel && st == MOLT_OK; s++)
        if (ix[s] < 0 || ix[s] >= E)
            st = molt_err(MOLT_EARG, "%s: idx[t=%lld, j=%lld] = %d is out of range [0, %lld)",
                          op, (long long)(s / idx->shape[1]), (long long)(s % idx->shape[1]),
                          ix[s], (long long)E);
    molt_free(copy);
    return st;
}

molt_status ag_check_expert_dense(const char *op, const ag_tensor *x, const ag_tensor *w,
                                  const ag_tensor *idx, const ag_tensor *gu,
                                  const ag_tensor *down) {
    static const char *const names[5] = {"x", "weights", "idx", "w_gate_up", "w_down"};
    MOLT_TRY(ag_check_float(op, "x", x));
    MOLT_TRY(ag_check_float(op, "weights", w));
    MOLT_TRY(ag_check_int32(op, "idx", idx));
    MOLT_TRY(ag_check_float(op, "w_gate_up", gu));
    MOLT_TRY(ag_check_float(op, "w_down", down));
    ag_tensor *ts[5] = {(ag_tensor *)x, (ag_tensor *)w, (ag_tensor *)idx, (ag_tensor *)gu,
                        (ag_tensor *)down};
    const ag_backend *be;
    MOLT_TRY(ag_backend_pick(op, 5, ts, names, &be));
    MOLT_TRY(ag_check_same_dtype(op, "x", x, "weights", w));
    MOLT_TRY(ag_check_same_dtype(op, "x", x, "w_gate_up", gu));
    MOLT_TRY(ag_check_same_dtype(op, "x", x, "w_down", down));
    MOLT_TRY(ag_check_ndim(op, "x", x, 2, 2));
    MOLT_TRY(ag_check_ndim(op, "weights", w, 2, 2));
    MOLT_TRY(ag_check_ndim(op, "idx", idx, 2, 2));
    MOLT_TRY(ag_check_ndim(op, "w_gate_up", gu, 3, 3));
    MOLT_TRY(ag_check_ndim(op, "w_down", down, 3, 3));
    if (gu->requires_grad || down->requires_grad)
        return molt_err(MOLT_EARG, "%s: %s requires grad, but expert weights are frozen "
                        "(train the LoRA matrices instead)",
                        op, gu->requires_grad ? "w_gate_up" : "w_down");
    char b0[80], b1[80], b2[80];
    int64_t T = x->shape[0], H = x->shape[1];
    if (w->shape[0] != T || !ag_same_shape(idx, w))
        return molt_err(MOLT_EARG, "%s: weights %s and idx %s must both be [%lld, k] for x %s",
                        op, ag_shape_str(w, b0, sizeof b0), ag_shape_str(idx, b1, sizeof b1),
                        (long long)T, ag_shape_str(x, b2, sizeof b2));
    if (gu->shape[2] != H || gu->shape[1] % 2 != 0)
        return molt_err(MOLT_EARG, "%s: w_gate_up is %s, expected [E, 2I, %lld] for x %s",
                        op, ag_shape_str(gu, b0, sizeof b0), (long long)H,
                        ag_shape_str(x, b1, sizeof b1));
    int64_t E = gu->shape[0], I = gu->shape[1] / 2;
    if (down->shape[0] != E || down->shape[1] != H || down->shape[2] != I)
        return molt_err(MOLT_EARG, "%s: w_down is %s, expected [%lld, %lld, %lld] "
                        "(E, H, I from w_gate_up and x)", op, ag_shape_str(down, b0, sizeof b0),
                        (long long)E, (long long)H, (long long)I);
    return ag_check_expert_idx(op, idx, E);
}

// x [T, H], weights [T, k] and idx I32 [T, k] (the operands both ops share), on one device.
static molt_status check_routing(const char *op, const ag_tensor *x, const ag_tensor *w,
                                 const ag_tensor *idx) {
    static const char *const names[3] = {"x", "weights", "idx"};
    MOLT_TRY(ag_check_float(op, "x", x));
    MOLT_TRY(ag_check_float(op, "weights", w));
    MOLT_TRY(ag_check_int32(op, "idx", idx));
    ag_tensor *ts[3] = {(ag_tensor *)x, (ag_tensor *)w, (ag_tensor *)idx};
    const ag_backend *be;
    MOLT_TRY(ag_backend_pick(op, 3, ts, names, &be));
    MOLT_TRY(ag_check_same_dtype(op, "x", x, "weights", w));
    MOLT_TRY(ag_check_ndim(op, "x", x, 2, 2));
    MOLT_TRY(ag_check_ndim(op, "weights", w, 2, 2));
    MOLT_TRY(ag_check_ndim(op, "idx", idx, 2, 2));
    char b0[80], b1[80], b2[80];
    if (w->shape[0] != x->shape[0] || !ag_same_shape(idx, w))
        return molt_err(MOLT_EARG, "%s: weights %s and idx %s must both be [%lld, k] for x %s",
                        op, ag_shape_str(w, b0, sizeof b0), ag_shape_str(idx, b1, sizeof b1),
                        (long long)x->shape[0], ag_shape_str(x, b2, sizeof b2));
    return MOLT_OK;
}

// Quantized stacks: gate_up [E, 2I, H] and down [E, H, I] qweights for x [T, H].
molt_status ag_check_expert_quant(const char *op, const ag_tensor *x, const ag_tensor *w,
                                  const ag_tensor *idx, const ag_qweight *gu,
                                  const ag_qweight *down) {
    MOLT_TRY(check_routing(op, x, w, idx));
    MOLT_TRY(ag_qweight_check_operand(op, "gate_up", gu));
    MOLT_TRY(ag_qweight_check_operand(op, "down", down));
    MOLT_TRY(ag_check_qweight_device(op, "x", x, "gate_up", gu));
    MOLT_TRY(ag_check_qweight_device(op, "x", x, "down", down));
    MOLT_TRY(ag_check_expert_qweights(op, x, gu, down));
    int64_t H = x->shape[1], E = gu->n_mat, I = gu->rows / 2;
    // BLAS indexes an expert's (2I, H) matrix with int
    if (2 * I * H > INT32_MAX)
        return molt_err(MOLT_EARG, "%s: an expert's gate_up has %lld elements, more than "
                        "2^31", op, (long long)(2 * I * H));
    return ag_check_expert_idx(op, idx, E);
}

// One LoRA matrix: float, x's dtype, exactly [d0, d1]. `dims` spells the expected shape.
static molt_status check_factor(const char *op, const char *what, const ag_tensor *t,
                                const ag_tensor *x, int64_t d0, int64_t d1, const char *dims) {
    MOLT_TRY(ag_check_float(op, what, t));
    MOLT_TRY(ag_check_same_dtype(op, "x", x, what, t));
    if (t->device != x->device)
        return molt_err(MOLT_EARG, "%s: x is on %s, %s is on %s: an op's operands must be on "
                        "one device (copy with ag_tensor_to)", op, ag_device_name(x->device),
                        what, ag_device_name(t->device));
    if (t->ndim == 2 && t->shape[0] == d0 && t->shape[1] == d1)
        return MOLT_OK;
    char b[80];
    return molt_err(MOLT_EARG, "%s: %s is %s, expected [%lld, %lld] (%s)", op, what,
                    ag_shape_str(t, b, sizeof b), (long long)d0, (long long)d1, dims);
}

static molt_status check_pair(const char *op, const char *wa, const ag_tensor *a,
                              const char *wb, const ag_tensor *b) {
    if (!a != !b)
        return molt_err(MOLT_EARG, "%s: %s is given without %s (set both or neither)", op,
                        a ? wa : wb, a ? wb : wa);
    return MOLT_OK;
}

// The adapters of E experts with gate_up rows I2 (= 2I) for x [T, H].
molt_status ag_check_expert_lora(const char *op, const ag_expert_lora *l, const ag_tensor *x,
                                 int64_t E, int64_t I2) {
    if (!l)
        return molt_err(MOLT_EARG, "%s: lora is NULL (use %s without adapters)", op,
                        strcmp(op, OPQ) ? "ag_moe_experts" : "ag_moe_experts_q");
    if (l->r < 1)
        return molt_err(MOLT_EARG, "%s: rank r = %d, expected >= 1", op, l->r);
    if (!isfinite(l->scale))
        return molt_err(MOLT_EARG, "%s: scale %g is not finite", op, l->scale);
    MOLT_TRY(check_pair(op, "a_gate_up", l->a_gate_up, "b_gate_up", l->b_gate_up));
    MOLT_TRY(check_pair(op, "a_down", l->a_down, "b_down", l->b_down));
    int64_t rE = (int64_t)l->r * E, H = x->shape[1];
    if (l->a_gate_up) {
        MOLT_TRY(check_factor(op, "a_gate_up", l->a_gate_up, x, rE, H, "r*E, H"));
        MOLT_TRY(check_factor(op, "b_gate_up", l->b_gate_up, x, I2, rE, "2I, r*E"));
    }
    if (l->a_down) {
        MOLT_TRY(check_factor(op, "a_down", l->a_down, x, rE, I2 / 2, "r*E, I"));
        MOLT_TRY(check_factor(op, "b_down", l->b_down, x, H, rE, "H, r*E"));
    }
    return MOLT_OK;
}

// ---- kernels for one dtype -----------------------------------------------------------------

// Everything a kernel call needs, as untyped pointers (f32 or f64 per `f32`). The expert
// stacks are either dense (gu, down) or quantized (quant set, views qgu, qd).
typedef struct {
    bool f32;
    int64_t T, k, E, H, I, r;
    double s;
    const void *x, *w, *gu, *down, *agu, *bgu, *ad, *bd; // agu/ad NULL without that LoRA
    const int32_t *idx;
    bool quant;
    kq_weight qgu, qd;
} lora_run;

typedef struct {
    void *dx, *dw, *agu, *bgu, *ad, *bd; // NULL where no gradient is wanted
} lora_grads;

static const void *data_or_null(const ag_tensor *t) { return t ? t->data : NULL; }

// The node's inputs: x, weights, idx, w_gate_up, w_down (both NULL with quantized stacks),
// a_gu, b_gu, a_d, b_d. E experts of intermediate size I.
static lora_run run_of(ag_tensor *const *in, int64_t E, int64_t I, int r, double s) {
    const ag_tensor *x = in[0];
    return (lora_run){x->dtype == AG_F32, x->shape[0], in[1]->shape[1], E, x->shape[1], I, r,
                      s, x->data, in[1]->data, data_or_null(in[3]), data_or_null(in[4]),
                      data_or_null(in[5]), data_or_null(in[6]), data_or_null(in[7]),
                      data_or_null(in[8]), in[2]->data, false, {0}, {0}};
}

// The same with quantized stacks gu and down.
static lora_run run_of_q(ag_tensor *const *in, const ag_qweight *gu, const ag_qweight *down,
                         int r, double s) {
    lora_run p = run_of(in, gu->n_mat, gu->rows / 2, r, s);
    p.quant = true;
    ag_qweight_view(&p.qgu, gu);
    ag_qweight_view(&p.qd, down);
    return p;
}

// Optimized kernels for element type S (f32/f64, real type R).
#define DEFINE_FAST(S, R)                                                                     \
    static void fast_fwd_##S(void *y, const lora_run *p, void *ws) {                          \
        moe_lora_##S l = {p->agu, p->bgu, p->ad, p->bd, p->r, (R)p->s, NULL, NULL};            \
        if (p->quant)                                                                         \
            moe_experts_lora_q_fwd_##S(y, p->x, p->w, p->idx, &p->qgu, &p->qd, &l, p->T, p->k, \
                                       p->E, p->H, p->I, ws);                                 \
        else                                                                                  \
            moe_experts_lora_fwd_##S(y, p->x, p->w, p->idx, p->gu, p->down, &l, p->T, p->k,   \
                                     p->E, p->H, p->I, ws);                                   \
    }                                                                                         \
    static void fast_bwd_##S(const lora_grads *g, const void *dy, const lora_run *p,          \
                             void *ws) {                                                      \
        moe_lora_##S l = {p->agu, p->bgu, p->ad, p->bd, p->r, (R)p->s, NULL, NULL};            \
        moe_lora_grad_##S lg = {g->agu, g->bgu, g->ad, g->bd};                                \
        if (p->quant)                                                                         \
            moe_experts_lora_q_bwd_##S(g->dx, g->dw, &lg, dy, p->x, p->w, p->idx, &p->qgu,    \
                                       &p->qd, &l, p->T, p->k, p->E, p->H, p->I, ws);         \
        else                                                                                  \
            moe_experts_lora_bwd_##S(g->dx, g->dw, &lg, dy, p->x, p->w, p->idx, p->gu,        \
                                     p->down, &l, p->T, p->k, p->E, p->H, p->I, ws);          \
    }
DEFINE_FAST(f32, float)
DEFINE_FAST(f64, double)

static size_t fast_ws_bytes(const lora_run *p) {
    if (p->quant)
        return p->f32 ? moe_experts_lora_q_ws_bytes_f32(p->T, p->k, p->E, p->H, p->I, p->r)
                      : moe_experts_lora_q_ws_bytes_f64(p->T, p->k, p->E, p->H, p->I, p->r);
    return p->f32 ? moe_experts_lora_ws_bytes_f32(p->T, p->k, p->E, p->H, p->I, p->r)
                  : moe_experts_lora_ws_bytes_f64(p->T, p->k, p->E, p->H, p->I, p->r);
}

static molt_status run_fast(void *y, const lora_grads *g, const void *dy, const lora_run *p) {
    size_t bytes = fast_ws_bytes(p);
    void *ws = molt_malloc(bytes);
    if (!ws)
        return molt_err(MOLT_ENOMEM, "%s: out of memory for a %zu-byte workspace",
                        p->quant ? OPQ : OP, bytes);
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

// Reference with quantized stacks: both stacks decoded element by element (kq_elem) into
// dense ones, then the dense reference above (fwd when y, else bwd).
static molt_status ref_q(void *y, const lora_grads *g, const void *dy, const lora_run *p) {
    size_t es = p->f32 ? sizeof(float) : sizeof(double);
    int64_t ngu = p->qgu.n_mat * p->qgu.rows * p->qgu.cols;
    int64_t nd = p->qd.n_mat * p->qd.rows * p->qd.cols;
    void *gu = molt_malloc((size_t)ngu * es), *down = molt_malloc((size_t)nd * es);
    if (!gu || !down) {
        molt_free(gu);
        molt_free(down);
        return molt_err(MOLT_ENOMEM, OPQ ": out of memory decoding the reference weights");
    }
    for (int64_t i = 0; i < ngu; i++) {
        if (p->f32)
            ((float *)gu)[i] = kq_elem_f32(&p->qgu, i);
        else
            ((double *)gu)[i] = kq_elem_f64(&p->qgu, i);
    }
    for (int64_t i = 0; i < nd; i++) {
        if (p->f32)
            ((float *)down)[i] = kq_elem_f32(&p->qd, i);
        else
            ((double *)down)[i] = kq_elem_f64(&p->qd, i);
    }
    lora_run dense = *p;
    dense.quant = false;
    dense.gu = gu;
    dense.down = down;
    molt_status st = y ? ref_fwd(y, &dense) : ref_bwd(g, dy, &dense);
    molt_free(gu);
    molt_free(down);
    return st;
}

// Either kernel family, forward (y given) or backward.
static molt_status run_any(void *y, const lora_grads *g, const void *dy, const lora_run *p) {
    if (!ag_reference_kernels())
        return run_fast(y, g, dy, p);
    if (p->quant)
        return ref_q(y, g, dy, p);
    return y ? ref_fwd(y, p) : ref_bwd(g, dy, p);
}

// ---- the CPU entries of every routed-expert variant ---------------------------------------

// The nine operands of the LoRA kernels, in the nodes' order.
static void lora_ins(ag_tensor **ins, const ag_experts_args *a) {
    const ag_expert_lora *l = a->lora;
    ag_tensor *v[9] = {a->x, a->w, a->idx, a->gu, a->down, l->a_gate_up, l->b_gate_up,
                       l->a_down, l->b_down};
    memcpy(ins, v, sizeof v);
}

molt_status ag_cpu_experts_fwd(ag_ctx *c, ag_tensor *y, const ag_experts_args *a, bool rec) {
    (void)c;
    if (!a->lora && a->qgu)
        return ag_cpu_moe_q_fwd(y, a->x, a->w, a->idx, a->qgu, a->qdown, rec);
    if (!a->lora)
        return ag_cpu_moe_dense_fwd(y, a->x, a->w, a->idx, a->gu, a->down, rec);
    ag_tensor *ins[9];
    lora_ins(ins, a);
    lora_run p = a->qgu ? run_of_q(ins, a->qgu, a->qdown, a->lora->r, a->lora->scale)
                        : run_of(ins, a->gu->shape[0], a->gu->shape[1] / 2, a->lora->r,
                                 a->lora->scale);
    return run_any(y->data, NULL, NULL, &p);
}

static void *data_of(ag_tensor *t) { return t ? t->data : NULL; }

molt_status ag_cpu_experts_bwd(ag_ctx *c, const ag_experts_args *a, const ag_tensor *dy,
                               const ag_experts_grads *g) {
    (void)c;
    if (!a->lora && a->qgu)
        return ag_cpu_moe_q_bwd(g->dx, g->dw, dy, a->x, a->w, a->idx, a->qgu, a->qdown);
    if (!a->lora)
        return ag_cpu_moe_dense_bwd(g->dx, g->dw, dy, a->x, a->w, a->idx, a->gu, a->down);
    ag_tensor *ins[9];
    lora_ins(ins, a);
    lora_run p = a->qgu ? run_of_q(ins, a->qgu, a->qdown, a->lora->r, a->lora->scale)
                        : run_of(ins, a->gu->shape[0], a->gu->shape[1] / 2, a->lora->r,
                                 a->lora->scale);
    lora_grads lg = {data_of(g->dx), data_of(g->dw), data_of(g->da_gu), data_of(g->db_gu),
                     data_of(g->da_d), data_of(g->db_d)};
    return run_any(NULL, &lg, dy->data, &p);
}

// ---- builders and backward ---------------------------------------------------------------

// Contract (autograd.h): y [T, H] = sum_j weights[t,j] * expert_e(x_t) with e = idx[t,j]
// and expert e's weights W[e] + scale * B_e A_e (PEFT's target_parameters layout). x,
// weights and the four LoRA matrices may require grad; the base weights must not.
ag_tensor *ag_moe_experts_lora(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                               ag_tensor *w_gate_up, ag_tensor *w_down,
                               const ag_expert_lora *lora) {
    if (ag_check_expert_dense(OP, x, weights, idx, w_gate_up, w_down) != MOLT_OK ||
        ag_check_expert_lora(OP, lora, x, w_gate_up->shape[0], w_gate_up->shape[1]) != MOLT_OK)
        return NULL;
    const ag_backend *be = ag_backend_get(OP, x->device);
    ag_tensor *ins[9] = {x, weights, idx, w_gate_up, w_down, lora->a_gate_up, lora->b_gate_up,
                         lora->a_down, lora->b_down};
    ag_tensor *y = be ? ag_out_new_on(c, x->device, x->dtype, 2, x->shape) : NULL;
    if (!y)
        return NULL;
    bool rec = ag_should_record(c, 9, ins);
    ag_experts_args a = {x, weights, idx, w_gate_up, w_down, NULL, NULL, lora};
    if (AG_BE_CALL(be, experts_fwd, OP, c, y, &a, rec) != MOLT_OK)
        return NULL;
    if (rec) {
        ag_node *n = ag_record(c, AG_OP_MOE_EXPERTS_LORA, y, 9, ins);
        if (!n)
            return NULL;
        n->i[0] = lora->r;
        n->f[0] = lora->scale;
    }
    return y;
}

// Gradient buffers of x, weights and the four LoRA matrices (those that require grad);
// false when none does (or on error, with *st set).
static bool grads_of(ag_node *n, ag_experts_grads *g, molt_status *st) {
    ag_tensor *gt[6] = {NULL};
    static const int which[6] = {0, 1, 5, 6, 7, 8}; // x, weights, a_gu, b_gu, a_d, b_d
    bool any = false;
    for (int i = 0; i < 6 && *st == MOLT_OK; i++) {
        gt[i] = ag_grad_of(n->in[which[i]], st);
        any = any || gt[i];
    }
    *g = (ag_experts_grads){gt[0], gt[1], gt[2], gt[3], gt[4], gt[5]};
    return *st == MOLT_OK && any;
}

// The node's LoRA, rebuilt from its inputs and attributes.
static ag_expert_lora lora_of(const ag_node *n) {
    return (ag_expert_lora){n->in[5], n->in[6], n->in[7], n->in[8], (int)n->i[0], n->f[0], NULL,
                            NULL};
}

molt_status ag_backward_moe_experts_lora(ag_ctx *c, ag_node *n) {
    molt_status st = MOLT_OK;
    ag_experts_grads g;
    if (!grads_of(n, &g, &st))
        return st;
    ag_expert_lora l = lora_of(n);
    ag_experts_args a = {n->in[0], n->in[1], n->in[2], n->in[3], n->in[4], NULL, NULL, &l};
    return AG_BE_CALL(ag_backend_node(n), experts_bwd, OP " backward", c, &a, n->out->grad,
                      &g);
}

// Contract (autograd.h): ag_moe_experts_lora on the decoded quantized stacks. The node has
// the same nine inputs with NULL in the two weight slots and saves the two qweight pointers
// (16 bytes); both must outlive the tape.
ag_tensor *ag_moe_experts_lora_q(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                                 const ag_qweight *gate_up, const ag_qweight *down,
                                 const ag_expert_lora *lora) {
    if (ag_check_expert_quant(OPQ, x, weights, idx, gate_up, down) != MOLT_OK ||
        ag_check_expert_lora(OPQ, lora, x, gate_up->n_mat, gate_up->rows) != MOLT_OK)
        return NULL;
    const ag_backend *be = ag_backend_get(OPQ, x->device);
    ag_tensor *ins[9] = {x, weights, idx, NULL, NULL, lora->a_gate_up, lora->b_gate_up,
                         lora->a_down, lora->b_down};
    ag_tensor *y = be ? ag_out_new_on(c, x->device, x->dtype, 2, x->shape) : NULL;
    if (!y)
        return NULL;
    bool rec = ag_should_record(c, 9, ins);
    ag_experts_args a = {x, weights, idx, NULL, NULL, gate_up, down, lora};
    if (AG_BE_CALL(be, experts_fwd, OPQ, c, y, &a, rec) != MOLT_OK)
        return NULL;
    if (rec) {
        ag_node *n = ag_record(c, AG_OP_MOE_EXPERTS_LORA_Q, y, 9, ins);
        const ag_qweight **saved = n ? ag_node_save(c, n, 2 * sizeof *saved) : NULL;
        if (!saved)
            return NULL;
        saved[0] = gate_up;
        saved[1] = down;
        n->i[0] = lora->r;
        n->f[0] = lora->scale;
    }
    return y;
}

molt_status ag_backward_moe_experts_lora_q(ag_ctx *c, ag_node *n) {
    molt_status st = MOLT_OK;
    ag_experts_grads g;
    if (!grads_of(n, &g, &st))
        return st;
    const ag_qweight *const *qw = n->saved;
    if (!qw)
        return molt_err(MOLT_EINTERNAL, OPQ ": node lost its weights");
    ag_expert_lora l = lora_of(n);
    ag_experts_args a = {n->in[0], n->in[1], n->in[2], NULL, NULL, qw[0], qw[1], &l};
    return AG_BE_CALL(ag_backend_node(n), experts_bwd, OPQ " backward", c, &a, n->out->grad,
                      &g);
}
