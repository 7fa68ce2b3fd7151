// autograd/ops_moe_multi.c: routed experts over a batch whose tokens carry different adapters
// (ag_moe_experts_multi): builder, operand checks, reference composition and backward. The
// optimized forward (cpu/k_moe_multi.c) shares each expert's base products among all its
// rows, whatever their adapters. The reference forward and the backward split the batch into
// one group per adapter (plus the rows without expert LoRA) and run each group through the
// single-adapter ops (ag_moe_experts_lora(_q), ag_moe_experts(_q)) exactly as if that adapter
// were served alone; the backward does so in a scratch context, recording, and scatters the
// gradients of x and the routing weights back to their rows (the LoRA matrices receive theirs
// directly). Not here: 2-D linears of many adapters (ops_lora_multi.c).
#include "quant_internal.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#define OP "moe_experts_multi"

// What the node keeps: the quantized stacks (or NULL) and every adapter's rank and scale.
typedef struct {
    const ag_qweight *gu_q, *down_q;
    int n;
    int r[];
} multi_saved;

static bool has_lora(const ag_expert_lora *l) { return l->a_gate_up || l->a_down; }

static molt_status check(const ag_tensor *x, const ag_tensor *w, const ag_tensor *idx,
                         const ag_expert_stacks *st, const ag_tensor *slot, int n,
                         const ag_expert_lora *set) {
    if (!st)
        return molt_err(MOLT_EARG, OP ": no expert stacks");
    MOLT_TRY(ag_check_cpu_float(OP, "x", x)); // this op runs on the CPU only
    if (st->gate_up_q && st->gate_up_q->device != AG_CPU)
        return molt_err(MOLT_EUNSUPPORTED, OP ": the quantized stacks live on %s; this op "
                        "runs on the CPU only", ag_device_name(st->gate_up_q->device));
    bool dense = st->gate_up || st->down, quant = st->gate_up_q || st->down_q;
    if (dense == quant)
        return molt_err(MOLT_EARG, OP ": give either the dense stacks or the quantized ones");
    int64_t E, I2;
    if (dense) {
        MOLT_TRY(ag_check_expert_dense(OP, x, w, idx, st->gate_up, st->down));
        E = st->gate_up->shape[0];
        I2 = st->gate_up->shape[1];
    } else {
        MOLT_TRY(ag_check_expert_quant(OP, x, w, idx, st->gate_up_q, st->down_q));
        E = st->gate_up_q->n_mat;
        I2 = st->gate_up_q->rows;
    }
    MOLT_TRY(ag_check_i32(OP, "slot", slot));
    int64_t T = x->shape[0];
    if (slot->ndim != 1 || slot->shape[0] != T) {
        char b[80];
        return molt_err(MOLT_EARG, OP ": slot is %s, expected I32 [%lld]",
                        ag_shape_str(slot, b, sizeof b), (long long)T);
    }
    if (n < 0 || (n > 0 && !set))
        return molt_err(MOLT_EARG, OP ": %d adapters with %s set", n, set ? "a" : "no");
    for (int s = 0; s < n; s++)
        if (has_lora(&set[s]) && ag_check_expert_lora(OP, &set[s], x, E, I2) != MOLT_OK)
            return molt_err_wrap(MOLT_EARG, OP ": adapter %d", s);
    const int32_t *sl = slot->data;
    for (int64_t t = 0; t < T; t++)
        if (sl[t] < -1 || sl[t] >= n)
            return molt_err(MOLT_EARG, OP ": slot[%lld] = %d is outside [-1, %d)", (long long)t,
                            (int)sl[t], n);
    return MOLT_OK;
}

// The group of row t: its adapter when that adapter has expert LoRA, else -1.
static int group_of(const int32_t *slot, int64_t t, int n, const ag_expert_lora *set) {
    int s = slot[t];
    return s >= 0 && s < n && has_lora(&set[s]) ? s : -1;
}

// Rows of group g into rows[], returning their count.
static int64_t group_rows(int64_t *rows, const int32_t *slot, int64_t T, int g, int n,
                          const ag_expert_lora *set) {
    int64_t m = 0;
    for (int64_t t = 0; t < T; t++)
        if (group_of(slot, t, n, set) == g)
            rows[m++] = t;
    return m;
}

// New tensor of rows[0..m) of t (any dtype, 2-D) in c's activations.
static ag_tensor *take_rows(ag_ctx *c, const ag_tensor *t, const int64_t *rows, int64_t m) {
    ag_tensor *o = ag_tensor_new2(&c->act, t->dtype, m, t->shape[1]);
    if (!o)
        return NULL;
    size_t w = (size_t)t->shape[1] * ag_dtype_size(t->dtype);
    for (int64_t i = 0; i < m; i++)
        memcpy((char *)o->data + i * w, (const char *)t->data + rows[i] * w, w);
    return o;
}

// dst rows[i] (+)= src row i.
static void put_rows(ag_tensor *dst, const ag_tensor *src, const int64_t *rows, int64_t m,
                     bool add) {
    int64_t W = dst->shape[1];
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < W; j++) {
            int64_t at = rows[i] * W + j;
            double v = ag_get(src, i * W + j);
            ag_set(dst, at, add ? ag_get(dst, at) + v : v);
        }
}

// The single-adapter op on one group's rows (g = -1: the frozen experts alone).
static ag_tensor *group_op(ag_ctx *c, ag_tensor *x, ag_tensor *w, ag_tensor *idx,
                           const ag_expert_stacks *st, int g, const ag_expert_lora *set) {
    if (g < 0)
        return st->gate_up ? ag_moe_experts(c, x, w, idx, st->gate_up, st->down)
                           : ag_moe_experts_q(c, x, w, idx, st->gate_up_q, st->down_q);
    return st->gate_up ? ag_moe_experts_lora(c, x, w, idx, st->gate_up, st->down, &set[g])
                       : ag_moe_experts_lora_q(c, x, w, idx, st->gate_up_q, st->down_q, &set[g]);
}

// Reference forward: each group through the single-adapter op, alone.
static molt_status ref_fwd(ag_tensor *y, ag_tensor *x, ag_tensor *w, ag_tensor *idx,
                           const ag_expert_stacks *st, ag_tensor *slot, int n,
                           const ag_expert_lora *set) {
    int64_t T = x->shape[0];
    int64_t *rows = molt_malloc((size_t)(T > 0 ? T : 1) * sizeof *rows);
    if (!rows)
        return molt_err(MOLT_ENOMEM, OP ": out of memory");
    molt_status status = MOLT_OK;
    for (int g = -1; status == MOLT_OK && g < n; g++) {
        int64_t m = group_rows(rows, slot->data, T, g, n, set);
        if (m == 0)
            continue;
        ag_ctx sub;
        ag_ctx_init(&sub);
        ag_ctx_set_grad(&sub, false);
        ag_tensor *yg = group_op(&sub, take_rows(&sub, x, rows, m), take_rows(&sub, w, rows, m),
                                 take_rows(&sub, idx, rows, m), st, g, set);
        if (yg)
            put_rows(y, yg, rows, m, false);
        else
            status = molt_err_wrap(MOLT_EARG, OP ": adapter group %d", g);
        ag_ctx_free(&sub);
    }
    molt_free(rows);
    return status;
}

#define DEFINE_FAST(S, R)                                                                     \
    static molt_status fast_fwd_##S(ag_tensor *y, ag_tensor *x, ag_tensor *w, ag_tensor *idx, \
                                    const ag_expert_stacks *st, ag_tensor *slot, int n,       \
                                    const ag_expert_lora *set, const uint8_t *bx) {           \
        kq_weight qg, qd;                                                                     \
        moe_stacks_##S ms = {NULL, NULL, NULL, NULL};                                         \
        int64_t E, I;                                                                         \
        if (st->gate_up) {                                                                    \
            ms.gu = st->gate_up->data;                                                        \
            ms.down = st->down->data;                                                         \
            E = st->gate_up->shape[0];                                                        \
            I = st->gate_up->shape[1] / 2;                                                    \
        } else {                                                                              \
            ag_qweight_view(&qg, st->gate_up_q);                                              \
            ag_qweight_view(&qd, st->down_q);                                                 \
            ms.qgu = &qg;                                                                     \
            ms.qd = &qd;                                                                      \
            E = st->gate_up_q->n_mat;                                                         \
            I = st->gate_up_q->rows / 2;                                                      \
        }                                                                                     \
        moe_lora_##S *ls = molt_calloc((size_t)(n > 0 ? n : 1), sizeof *ls);                 \
        if (!ls)                                                                              \
            return molt_err(MOLT_ENOMEM, OP ": out of memory");                               \
        for (int s = 0; s < n; s++) {                                                         \
            const ag_expert_lora *l = &set[s];                                                \
            if (!has_lora(l))                                                                 \
                continue;                                                                     \
            ls[s] = (moe_lora_##S){l->a_gate_up ? l->a_gate_up->data : NULL,                  \
                                   l->b_gate_up ? l->b_gate_up->data : NULL,                  \
                                   l->a_down ? l->a_down->data : NULL,                        \
                                   l->b_down ? l->b_down->data : NULL, l->r, (R)l->scale,     \
                                   l->bp_gate_up ? l->bp_gate_up->data : NULL,                \
                                   l->bp_down ? l->bp_down->data : NULL};                     \
        }                                                                                     \
        int64_t T = x->shape[0], k = w->shape[1], H = x->shape[1];                            \
        int nt = omp_get_max_threads();                                                       \
        size_t bytes = moe_multi_ws_bytes_##S(&ms, ls, n, T, k, E, H, I, nt);                 \
        void *ws = molt_malloc(bytes);                                                        \
        if (!ws) {                                                                            \
            molt_free(ls);                                                                    \
            return molt_err(MOLT_ENOMEM, OP ": out of memory for a %zu-byte workspace",       \
                            bytes);                                                           \
        }                                                                                     \
        moe_multi_fwd_##S(y->data, x->data, w->data, idx->data, slot->data, bx, &ms, ls, n, T, \
                          k, E, H, I, nt, ws);                                                \
        molt_free(ws);                                                                        \
        molt_free(ls);                                                                        \
        return MOLT_OK;                                                                       \
    }
DEFINE_FAST(f32, float)
DEFINE_FAST(f64, double)

molt_status ag_expert_b_per_expert(ag_arena *a, const ag_tensor *b, int r, ag_tensor **bp) {
    *bp = NULL;
    if (b->dtype != AG_F32 || b->ndim != 2 || r < 1 || b->shape[1] % r != 0)
        return molt_err(MOLT_EARG, OP ": B of %d dims, %lld wide, is not an F32 [out, r*E] for "
                        "rank %d", b->ndim, (long long)b->shape[b->ndim - 1], r);
    int64_t out = b->shape[0], E = b->shape[1] / r;
    ag_tensor *t = ag_tensor_new_uninit(a, AG_F32, 3, (int64_t[]){E, out, r});
    if (!t)
        return MOLT_ENOMEM;
    for (int64_t e = 0; e < E; e++)
        moe_lora_b_expert_f32((float *)t->data + e * out * r, b->data, out, r, E, e);
    *bp = t;
    return MOLT_OK;
}

// Contract in autograd.h. Node inputs: x, weights, idx, slot, gate_up, down (NULL when
// quantized), then a_gu, b_gu, a_d, b_d of every adapter.
ag_tensor *ag_moe_experts_multi(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                                const ag_expert_stacks *st, ag_tensor *slot, int n,
                                const ag_expert_lora *set) {
    return ag_moe_experts_multi_rows(c, x, weights, idx, st, slot, n, set, NULL);
}

ag_tensor *ag_moe_experts_multi_rows(ag_ctx *c, ag_tensor *x, ag_tensor *weights,
                                     ag_tensor *idx, const ag_expert_stacks *st, ag_tensor *slot,
                                     int n, const ag_expert_lora *set, const uint8_t *bx) {
    if (check(x, weights, idx, st, slot, n, set) != MOLT_OK)
        return NULL;
    if (bx && x->dtype != AG_F32) {
        char b[80];
        molt_err(MOLT_EARG, OP ": x %s has rows marked for the bf16-pair products, which take "
                 "F32", ag_shape_str(x, b, sizeof b));
        return NULL;
    }
    ag_tensor *y = ag_out_new(c, x->dtype, 2, x->shape);
    if (!y)
        return NULL;
    molt_status status;
    if (ag_reference_kernels())
        status = ref_fwd(y, x, weights, idx, st, slot, n, set);
    else if (x->dtype == AG_F32)
        status = fast_fwd_f32(y, x, weights, idx, st, slot, n, set, bx);
    else
        status = fast_fwd_f64(y, x, weights, idx, st, slot, n, set, NULL);
    if (status != MOLT_OK)
        return NULL;
    int n_in = 6 + 4 * n;
    ag_tensor **ins = molt_calloc((size_t)n_in, sizeof *ins);
    if (!ins) {
        molt_err(MOLT_ENOMEM, OP ": out of memory");
        return NULL;
    }
    ag_tensor *head[6] = {x, weights, idx, slot, st->gate_up, st->down};
    memcpy(ins, head, sizeof head);
    for (int s = 0; s < n; s++) {
        ins[6 + 4 * s] = set[s].a_gate_up;
        ins[7 + 4 * s] = set[s].b_gate_up;
        ins[8 + 4 * s] = set[s].a_down;
        ins[9 + 4 * s] = set[s].b_down;
    }
    bool ok = true;
    if (ag_should_record(c, n_in, ins)) {
        ag_node *nd = ag_record(c, AG_OP_MOE_EXPERTS_MULTI, y, n_in, ins);
        size_t bytes = sizeof(multi_saved) + (size_t)(n > 0 ? n : 1) * (sizeof(int) +
                                                                         sizeof(double));
        multi_saved *sv = nd ? ag_node_save(c, nd, bytes) : NULL;
        ok = sv != NULL;
        if (ok) {
            sv->gu_q = st->gate_up_q;
            sv->down_q = st->down_q;
            sv->n = n;
            double *scales = (double *)(sv->r + (n > 0 ? n : 1));
            for (int s = 0; s < n; s++) {
                sv->r[s] = set[s].r;
                scales[s] = set[s].scale;
            }
        }
    }
    molt_free(ins);
    return ok ? y : NULL;
}

// Backward of one group: the single-adapter op recorded in a scratch context on the group's
// rows, its output gradient set from dy, run backward; dx and dw rows scattered back.
static molt_status group_backward(ag_ctx *c, ag_node *nd, const ag_expert_stacks *st, int g,
                                  const ag_expert_lora *set, const int64_t *rows, int64_t m,
                                  ag_tensor *dx, ag_tensor *dw) {
    ag_tensor *x = nd->in[0], *w = nd->in[1], *idx = nd->in[2];
    ag_ctx sub;
    ag_ctx_init(&sub);
    ag_ctx_borrow_profile(&sub, c);
    ag_ctx_set_grad(&sub, true);
    molt_status status = MOLT_OK;
    ag_tensor *xg = take_rows(&sub, x, rows, m), *wg = take_rows(&sub, w, rows, m);
    ag_tensor *ig = take_rows(&sub, idx, rows, m), *dyg = take_rows(&sub, nd->out->grad, rows, m);
    if (!xg || !wg || !ig || !dyg)
        status = molt_err(MOLT_ENOMEM, OP ": out of memory in backward");
    if (status == MOLT_OK) {
        xg->requires_grad = x->requires_grad;
        wg->requires_grad = w->requires_grad;
        ag_tensor *yg = group_op(&sub, xg, wg, ig, st, g, set);
        if (!yg)
            status = molt_err_wrap(MOLT_EARG, OP ": backward of adapter group %d", g);
        else if (yg->requires_grad) {
            ag_tensor *gy = ag_grad_ensure(yg);
            if (!gy)
                status = MOLT_ENOMEM;
            else {
                memcpy(gy->data, dyg->data, (size_t)gy->numel * ag_dtype_size(gy->dtype));
                status = ag_tape_backward(&sub);
            }
        }
    }
    if (status == MOLT_OK && dx && xg->grad)
        put_rows(dx, xg->grad, rows, m, true);
    if (status == MOLT_OK && dw && wg->grad)
        put_rows(dw, wg->grad, rows, m, true);
    ag_ctx_free(&sub);
    return status;
}

molt_status ag_backward_moe_experts_multi(ag_ctx *c, ag_node *nd) {
    const multi_saved *sv = nd->saved;
    if (!sv)
        return molt_err(MOLT_EINTERNAL, OP ": backward found no saved state");
    int n = sv->n;
    const double *scales = (const double *)(sv->r + (n > 0 ? n : 1));
    ag_expert_stacks st = {nd->in[4], nd->in[5], sv->gu_q, sv->down_q};
    molt_status status = MOLT_OK;
    ag_tensor *dx = ag_grad_of(nd->in[0], &status), *dw = ag_grad_of(nd->in[1], &status);
    int64_t T = nd->in[0]->shape[0];
    ag_expert_lora *set = molt_calloc((size_t)(n > 0 ? n : 1), sizeof *set);
    int64_t *rows = molt_malloc((size_t)(T > 0 ? T : 1) * sizeof *rows);
    if (!set || !rows)
        status = molt_err(MOLT_ENOMEM, OP ": out of memory in backward");
    for (int s = 0; status == MOLT_OK && s < n; s++)
        set[s] = (ag_expert_lora){nd->in[6 + 4 * s], nd->in[7 + 4 * s], nd->in[8 + 4 * s],
                                  nd->in[9 + 4 * s], sv->r[s], scales[s], NULL, NULL};
    for (int g = -1; status == MOLT_OK && g < n; g++) {
        int64_t m = group_rows(rows, nd->in[3]->data, T, g, n, set);
        bool lora_grad = g >= 0 && ((set[g].a_gate_up && (set[g].a_gate_up->requires_grad ||
                                                          set[g].b_gate_up->requires_grad)) ||
                                    (set[g].a_down && (set[g].a_down->requires_grad ||
                                                       set[g].b_down->requires_grad)));
        if (m > 0 && (dx || dw || lora_grad))
            status = group_backward(c, nd, &st, g, set, rows, m, dx, dw);
    }
    molt_free(set);
    molt_free(rows);
    return status;
}
