// autograd/ops_qlinear.c: linear and routed experts whose weights are frozen quantized
// matrices (ag_qweight): builders with their operand checks, and backward rules. A qweight
// never gets a gradient; the activations (and routing weights) do. The kernels are in
// cpu/k_quant.c; the formats in quant.c. Not here: bias terms, LoRA (built on top of these
// by the model), quantizing activations.
#include "quant_internal.h"
#include "backend.h"

#include <limits.h>
#include <omp.h>
#include <string.h>

#define LINQ "linear_q"
#define EXPQ "moe_experts_q"

// BLAS indexes with int: larger operands are refused up front rather than truncated.
static molt_status check_int(const char *op, const char *what, int64_t n) {
    if (n <= INT_MAX)
        return MOLT_OK;
    return molt_err(MOLT_EARG, "%s: %s is %lld, more than BLAS can index (%d)", op, what,
                    (long long)n, INT_MAX);
}

// Scratch for the optimized kernels (NULL with a message on no memory).
static void *scratch(const char *op, size_t bytes) {
    void *p = molt_malloc(bytes ? bytes : 1);
    if (!p)
        molt_err(MOLT_ENOMEM, "%s: out of memory for %zu bytes of scratch", op, bytes);
    return p;
}

// ---- linear ---------------------------------------------------------------------------------

static molt_status linear_q_check(ag_tensor *x, const ag_qweight *w, const ag_backend **be) {
    static const char *const names[1] = {"x"};
    MOLT_TRY(ag_check_float(LINQ, "x", x));
    MOLT_TRY(ag_backend_pick(LINQ, 1, &x, names, be));
    MOLT_TRY(ag_qweight_check_operand(LINQ, "w", w));
    MOLT_TRY(ag_check_qweight_device(LINQ, "x", x, "w", w));
    char bx[80], bw[96];
    if (w->ndim != 2)
        return molt_err(MOLT_EARG, LINQ ": w %s is a stack of %lld matrices; a linear takes "
                        "one [out, in] matrix (experts go through ag_moe_experts_q)",
                        ag_qweight_str(w, bw, sizeof bw), (long long)w->n_mat);
    if (ag_cols(x) != w->cols)
        return molt_err(MOLT_EARG, LINQ ": x %s does not match w %s: x's last dim must equal "
                        "w's dim 1 (in features)", ag_shape_str(x, bx, sizeof bx),
                        ag_qweight_str(w, bw, sizeof bw));
    MOLT_TRY(check_int(LINQ, "the row count of x", ag_rows(x)));
    MOLT_TRY(check_int(LINQ, "in features", w->cols));
    return check_int(LINQ, "out features", w->rows);
}

// rec: the op is being recorded (training: the BLAS kernels); otherwise the batch-invariant
// ones (cpu/k_bi.h).
molt_status ag_cpu_linear_q_fwd(ag_ctx *c, ag_tensor *y, const ag_tensor *x,
                                const ag_qweight *w, bool rec) {
    (void)c;
    kq_weight v;
    ag_qweight_view(&v, w);
    int64_t T = ag_rows(x);
    bool f32 = x->dtype == AG_F32;
    if (ag_reference_kernels()) {
        if (f32) qlinear_fwd_ref_f32(y->data, x->data, &v, 0, T);
        else qlinear_fwd_ref_f64(y->data, x->data, &v, 0, T);
        return MOLT_OK;
    }
    int nt = omp_get_max_threads();
    size_t bytes = rec && f32 ? qlinear_ws_bytes_f32(&v, T, nt)
                   : rec      ? qlinear_ws_bytes_f64(&v, T, nt)
                   : f32      ? bi_linear_q_ws_bytes_f32(&v, T, nt)
                              : bi_linear_q_ws_bytes_f64(&v, T, nt);
    void *ws = scratch(LINQ, bytes);
    if (!ws)
        return MOLT_ENOMEM;
    if (!rec && f32) bi_linear_q_f32(y->data, x->data, &v, 0, T, nt, ws);
    else if (!rec) bi_linear_q_f64(y->data, x->data, &v, 0, T, nt, ws);
    else if (f32) qlinear_fwd_f32(y->data, x->data, &v, 0, T, nt, ws);
    else qlinear_fwd_f64(y->data, x->data, &v, 0, T, nt, ws);
    molt_free(ws);
    return MOLT_OK;
}

// Contract in autograd.h. Nothing is saved: backward reads x's shape and w itself.
ag_tensor *ag_linear_q(ag_ctx *c, ag_tensor *x, const ag_qweight *w) {
    const ag_backend *be;
    if (linear_q_check(x, w, &be) != MOLT_OK)
        return NULL;
    int64_t shape[AG_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = w->rows;
    bool rec = ag_should_record(c, 1, &x);
    // inference on the host runs bi_linear_q, which writes y in full
    bool full = !rec && x->device == AG_CPU && !ag_reference_kernels();
    ag_tensor *y = full ? ag_out_new_uninit_on(c, x->device, x->dtype, x->ndim, shape)
                        : ag_out_new_on(c, x->device, x->dtype, x->ndim, shape);
    if (!y || AG_BE_CALL(be, linear_q_fwd, LINQ, c, y, x, w, rec) != MOLT_OK)
        return NULL;
    if (rec) {
        ag_node *n = ag_record(c, AG_OP_LINEAR_Q, y, 1, &x);
        if (!n)
            return NULL;
        n->ptr = w;
    }
    return y;
}

bool ag_bxq_available(void) { return bxq_available(); }

// Rows of x (T, C) whose mark equals `want`, gathered into dst; returns how many.
static int64_t gather_rows(float *dst, const float *x, const uint8_t *bx, int64_t T, int64_t C,
                           bool want) {
    int64_t n = 0;
    for (int64_t t = 0; t < T; t++)
        if ((bx[t] != 0) == want)
            memcpy(dst + (n++) * C, x + t * C, (size_t)C * sizeof *dst);
    return n;
}

// y rows of one kind from src (their rows in order).
static void scatter_rows(float *y, const float *src, const uint8_t *bx, int64_t T, int64_t C,
                         bool want) {
    int64_t n = 0;
    for (int64_t t = 0; t < T; t++)
        if ((bx[t] != 0) == want)
            memcpy(y + t * C, src + (n++) * C, (size_t)C * sizeof *y);
}

// y (T, rows) of the marked rows x (T, cols), contiguous.
static molt_status bxq_rows(ag_ctx *c, float *y, const float *x, const kq_weight *v, int64_t T) {
    if (ag_reference_kernels() || !bxq_available()) {
        bxq_linear_ref(y, x, v, 0, T);
        return MOLT_OK;
    }
    int nt = omp_get_max_threads();
    void *ws = ag_arena_alloc_uninit(&c->act, bxq_ws_bytes(v, T, nt)); // 64-byte aligned
    if (!ws)
        return molt_err(MOLT_ENOMEM, LINQ ": out of memory for the bf16-pair workspace");
    bxq_linear(y, x, v, 0, T, nt, ws);
    return MOLT_OK;
}

// The F32 rows (T, cols) through the batch-invariant kernel (or the reference).
static molt_status f32_rows(float *y, const float *x, const kq_weight *v, int64_t T) {
    if (ag_reference_kernels()) {
        qlinear_fwd_ref_f32(y, x, v, 0, T);
        return MOLT_OK;
    }
    int nt = omp_get_max_threads();
    void *ws = scratch(LINQ, bi_linear_q_ws_bytes_f32(v, T, nt));
    if (!ws)
        return MOLT_ENOMEM;
    bi_linear_q_f32(y, x, v, 0, T, nt, ws);
    molt_free(ws);
    return MOLT_OK;
}

// Contract in autograd.h.
ag_tensor *ag_linear_q_rows(ag_ctx *c, ag_tensor *x, const ag_qweight *w, const uint8_t *bx) {
    const ag_backend *be;
    if (!bx || linear_q_check(x, w, &be) != MOLT_OK)
        return bx ? NULL : ag_linear_q(c, x, w);
    int64_t T = ag_rows(x), marked = 0;
    for (int64_t t = 0; t < T; t++)
        marked += bx[t] != 0;
    if (marked == 0)
        return ag_linear_q(c, x, w);
    char b[80];
    if (x->device != AG_CPU || x->dtype != AG_F32) {
        molt_err(MOLT_EARG, LINQ ": x %s has rows marked for the bf16-pair products, which take "
                 "F32 on the host", ag_shape_str(x, b, sizeof b));
        return NULL;
    }
    int64_t shape[AG_MAX_DIMS], R = w->rows, C = w->cols;
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = R;
    ag_tensor *y = ag_out_new_uninit_on(c, AG_CPU, AG_F32, x->ndim, shape);
    if (!y)
        return NULL;
    kq_weight v;
    ag_qweight_view(&v, w);
    float *yd = y->data;
    const float *xd = x->data;
    if (4 * marked >= 3 * T) {
        // (nearly) all marked: every row through bxq_linear in place (no copies of the
        // marked rows), then the few others again in F32 over theirs
        if (bxq_rows(c, yd, xd, &v, T) != MOLT_OK)
            return NULL;
        int64_t rest = T - marked;
        if (rest > 0) {
            float *xb = ag_arena_alloc_uninit(&c->act, (size_t)(rest * C) * sizeof *xb);
            float *yb = ag_arena_alloc_uninit(&c->act, (size_t)(rest * R) * sizeof *yb);
            if (!xb || !yb) {
                molt_err(MOLT_ENOMEM, LINQ ": out of memory for the rows' copies");
                return NULL;
            }
            gather_rows(xb, xd, bx, T, C, false);
            if (f32_rows(yb, xb, &v, rest) != MOLT_OK)
                return NULL;
            scatter_rows(yd, yb, bx, T, R, false);
        }
    } else {
        int64_t rest = T - marked;
        float *xa = ag_arena_alloc_uninit(&c->act, (size_t)(T * C) * sizeof *xa);
        float *ya = ag_arena_alloc_uninit(&c->act, (size_t)(T * R) * sizeof *ya);
        if (!xa || !ya) {
            molt_err(MOLT_ENOMEM, LINQ ": out of memory for the rows' copies");
            return NULL;
        }
        gather_rows(xa, xd, bx, T, C, true);
        if (bxq_rows(c, ya, xa, &v, marked) != MOLT_OK)
            return NULL;
        scatter_rows(yd, ya, bx, T, R, true);
        gather_rows(xa, xd, bx, T, C, false);
        if (f32_rows(ya, xa, &v, rest) != MOLT_OK)
            return NULL;
        scatter_rows(yd, ya, bx, T, R, false);
    }
    if (ag_should_record(c, 1, &x)) {
        ag_node *n = ag_record(c, AG_OP_LINEAR_Q, y, 1, &x);
        if (!n)
            return NULL;
        n->ptr = w;
    }
    return y;
}

molt_status ag_cpu_linear_q_bwd(ag_ctx *c, ag_tensor *dx, const ag_tensor *dy,
                                const ag_qweight *w) {
    (void)c;
    kq_weight v;
    ag_qweight_view(&v, w);
    int64_t T = ag_rows(dx);
    bool f32 = dx->dtype == AG_F32;
    if (ag_reference_kernels()) {
        if (f32) qlinear_bwd_x_ref_f32(dx->data, dy->data, &v, 0, T);
        else qlinear_bwd_x_ref_f64(dx->data, dy->data, &v, 0, T);
        return MOLT_OK;
    }
    int nt = omp_get_max_threads();
    void *ws = scratch(LINQ, f32 ? qlinear_ws_bytes_f32(&v, T, nt) : qlinear_ws_bytes_f64(&v, T, nt));
    if (!ws)
        return MOLT_ENOMEM;
    if (f32) qlinear_bwd_x_f32(dx->data, dy->data, &v, 0, T, nt, ws);
    else qlinear_bwd_x_f64(dx->data, dy->data, &v, 0, T, nt, ws);
    molt_free(ws);
    return MOLT_OK;
}

// dx += dy W (W is frozen: no gradient for it).
molt_status ag_backward_linear_q(ag_ctx *c, ag_node *n) {
    molt_status st = MOLT_OK;
    ag_tensor *x = n->in[0], *dx = ag_grad_of(x, &st), *dy = n->out->grad;
    const ag_qweight *w = n->ptr;
    if (!dx)
        return st;
    if (!w)
        return molt_err(MOLT_EINTERNAL, LINQ ": node lost its weight");
    return AG_BE_CALL(ag_backend_node(n), linear_q_bwd, LINQ " backward", c, dx, dy, w);
}

// ---- routed experts -------------------------------------------------------------------------

static molt_status experts_q_shapes(const ag_tensor *x, const ag_tensor *w,
                                    const ag_tensor *idx, const ag_qweight *gu,
                                    const ag_qweight *down) {
    char b0[96], b1[96];
    int64_t T = x->shape[0];
    if (w->shape[0] != T)
        return molt_err(MOLT_EARG, EXPQ ": weights %s and x %s differ in tokens",
                        ag_shape_str(w, b0, sizeof b0), ag_shape_str(x, b1, sizeof b1));
    if (!ag_same_shape(idx, w))
        return molt_err(MOLT_EARG, EXPQ ": idx %s and weights %s differ in shape",
                        ag_shape_str(idx, b0, sizeof b0), ag_shape_str(w, b1, sizeof b1));
    return ag_check_expert_qweights(EXPQ, x, gu, down);
}

// Contract in quant_internal.h.
molt_status ag_check_expert_qweights(const char *op, const ag_tensor *x, const ag_qweight *gu,
                                     const ag_qweight *down) {
    char b0[96], b1[96];
    int64_t H = x->shape[1];
    if (gu->ndim != 3 || gu->cols != H || gu->rows % 2 != 0)
        return molt_err(MOLT_EARG, "%s: gate_up is %s, expected [E, 2I, %lld] for x %s", op,
                        ag_qweight_str(gu, b0, sizeof b0), (long long)H,
                        ag_shape_str(x, b1, sizeof b1));
    int64_t E = gu->n_mat, I = gu->rows / 2;
    if (down->ndim != 3 || down->n_mat != E || down->rows != H || down->cols != I)
        return molt_err(MOLT_EARG, "%s: down is %s, expected [%lld, %lld, %lld] (E, H, I "
                        "from gate_up and x)", op, ag_qweight_str(down, b0, sizeof b0),
                        (long long)E, (long long)H, (long long)I);
    return MOLT_OK;
}

static molt_status experts_q_check(ag_tensor *x, ag_tensor *w, ag_tensor *idx,
                                   const ag_qweight *gu, const ag_qweight *down,
                                   const ag_backend **be) {
    static const char *const names[3] = {"x", "weights", "idx"};
    MOLT_TRY(ag_check_float(EXPQ, "x", x));
    MOLT_TRY(ag_check_float(EXPQ, "weights", w));
    MOLT_TRY(ag_check_int32(EXPQ, "idx", idx));
    ag_tensor *ts[3] = {x, w, idx};
    MOLT_TRY(ag_backend_pick(EXPQ, 3, ts, names, be));
    MOLT_TRY(ag_check_same_dtype(EXPQ, "x", x, "weights", w));
    MOLT_TRY(ag_check_ndim(EXPQ, "x", x, 2, 2));
    MOLT_TRY(ag_check_ndim(EXPQ, "weights", w, 2, 2));
    MOLT_TRY(ag_check_ndim(EXPQ, "idx", idx, 2, 2));
    MOLT_TRY(ag_qweight_check_operand(EXPQ, "gate_up", gu));
    MOLT_TRY(ag_qweight_check_operand(EXPQ, "down", down));
    MOLT_TRY(ag_check_qweight_device(EXPQ, "x", x, "gate_up", gu));
    MOLT_TRY(ag_check_qweight_device(EXPQ, "x", x, "down", down));
    MOLT_TRY(experts_q_shapes(x, w, idx, gu, down));
    MOLT_TRY(check_int(EXPQ, "the slot count T*k", idx->numel));
    MOLT_TRY(check_int(EXPQ, "the expert count", gu->n_mat));
    MOLT_TRY(check_int(EXPQ, "2I", gu->rows));
    MOLT_TRY(check_int(EXPQ, "H", gu->cols));
    return ag_check_expert_idx(EXPQ, idx, gu->n_mat);
}

typedef struct {
    kq_weight gu, down;
    int64_t T, k;
    int nt;
    void *ws; // optimized kernels only
} experts_run;

static molt_status experts_run_init(experts_run *r, const ag_tensor *idx, const ag_qweight *gu,
                                    const ag_qweight *down, ag_dtype dt) {
    ag_qweight_view(&r->gu, gu);
    ag_qweight_view(&r->down, down);
    r->T = idx->shape[0];
    r->k = idx->shape[1];
    r->nt = omp_get_max_threads();
    r->ws = NULL;
    if (ag_reference_kernels())
        return MOLT_OK;
    size_t bytes = dt == AG_F32 ? qmoe_ws_bytes_f32(&r->gu, &r->down, r->T, r->k, r->nt)
                                : qmoe_ws_bytes_f64(&r->gu, &r->down, r->T, r->k, r->nt);
    r->ws = scratch(EXPQ, bytes);
    return r->ws ? MOLT_OK : MOLT_ENOMEM;
}

// rec: the op is being recorded (training: BLAS); otherwise the batch-invariant products.
molt_status ag_cpu_moe_q_fwd(ag_tensor *y, const ag_tensor *x, const ag_tensor *w,
                             const ag_tensor *idx, const ag_qweight *gu, const ag_qweight *down,
                             bool rec) {
    experts_run r;
    MOLT_TRY(experts_run_init(&r, idx, gu, down, x->dtype));
    bool f32 = x->dtype == AG_F32;
    if (!r.ws && f32)
        qmoe_fwd_ref_f32(y->data, x->data, w->data, idx->data, &r.gu, &r.down, r.T, r.k);
    else if (!r.ws)
        qmoe_fwd_ref_f64(y->data, x->data, w->data, idx->data, &r.gu, &r.down, r.T, r.k);
    else if (!rec && f32)
        qmoe_fwd_bi_f32(y->data, x->data, w->data, idx->data, &r.gu, &r.down, r.T, r.k, r.nt,
                        r.ws);
    else if (!rec)
        qmoe_fwd_bi_f64(y->data, x->data, w->data, idx->data, &r.gu, &r.down, r.T, r.k, r.nt,
                        r.ws);
    else if (f32)
        qmoe_fwd_f32(y->data, x->data, w->data, idx->data, &r.gu, &r.down, r.T, r.k, r.nt, r.ws);
    else
        qmoe_fwd_f64(y->data, x->data, w->data, idx->data, &r.gu, &r.down, r.T, r.k, r.nt, r.ws);
    molt_free(r.ws);
    return MOLT_OK;
}

// Contract in autograd.h. idx values must lie in [0, E); duplicates within a row add up.
// The node saves the two qweight pointers (16 bytes); both must outlive the tape.
ag_tensor *ag_moe_experts_q(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                            const ag_qweight *gate_up, const ag_qweight *down) {
    const ag_backend *be;
    if (experts_q_check(x, weights, idx, gate_up, down, &be) != MOLT_OK)
        return NULL;
    ag_tensor *y = ag_out_new_on(c, x->device, x->dtype, 2, x->shape);
    ag_tensor *ins[3] = {x, weights, idx};
    bool rec = ag_should_record(c, 3, ins);
    ag_experts_args a = {x, weights, idx, NULL, NULL, gate_up, down, NULL};
    if (!y || AG_BE_CALL(be, experts_fwd, EXPQ, c, y, &a, rec) != MOLT_OK)
        return NULL;
    if (rec) {
        ag_node *n = ag_record(c, AG_OP_MOE_EXPERTS_Q, y, 3, ins);
        const ag_qweight **saved = n ? ag_node_save(c, n, 2 * sizeof *saved) : NULL;
        if (!saved)
            return NULL;
        saved[0] = gate_up;
        saved[1] = down;
    }
    return y;
}

molt_status ag_cpu_moe_q_bwd(ag_tensor *gx, ag_tensor *gw, const ag_tensor *dy,
                             const ag_tensor *x, const ag_tensor *w, const ag_tensor *idx,
                             const ag_qweight *gu, const ag_qweight *down) {
    experts_run r;
    MOLT_TRY(experts_run_init(&r, idx, gu, down, x->dtype));
    void *dxp = gx ? gx->data : NULL, *dwp = gw ? gw->data : NULL;
    bool f32 = x->dtype == AG_F32;
    if (!r.ws && f32)
        qmoe_bwd_ref_f32(dxp, dwp, dy->data, x->data, w->data, idx->data, &r.gu, &r.down, r.T,
                         r.k);
    else if (!r.ws)
        qmoe_bwd_ref_f64(dxp, dwp, dy->data, x->data, w->data, idx->data, &r.gu, &r.down, r.T,
                         r.k);
    else if (f32)
        qmoe_bwd_f32(dxp, dwp, dy->data, x->data, w->data, idx->data, &r.gu, &r.down, r.T, r.k,
                     r.nt, r.ws);
    else
        qmoe_bwd_f64(dxp, dwp, dy->data, x->data, w->data, idx->data, &r.gu, &r.down, r.T, r.k,
                     r.nt, r.ws);
    molt_free(r.ws);
    return MOLT_OK;
}

molt_status ag_backward_moe_experts_q(ag_ctx *c, ag_node *n) {
    molt_status st = MOLT_OK;
    ag_tensor *x = n->in[0], *w = n->in[1], *idx = n->in[2];
    ag_tensor *gx = ag_grad_of(x, &st), *gw = st == MOLT_OK ? ag_grad_of(w, &st) : NULL;
    if (st != MOLT_OK || (!gx && !gw))
        return st;
    const ag_qweight *const *qw = n->saved;
    if (!qw)
        return molt_err(MOLT_EINTERNAL, EXPQ ": node lost its weights");
    ag_experts_args a = {x, w, idx, NULL, NULL, qw[0], qw[1], NULL};
    ag_experts_grads g = {gx, gw, NULL, NULL, NULL, NULL};
    return AG_BE_CALL(ag_backend_node(n), experts_bwd, EXPQ " backward", c, &a, n->out->grad,
                      &g);
}
