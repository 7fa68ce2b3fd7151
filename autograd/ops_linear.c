// autograd/ops_linear.c: linear (y = x W^T), RMSNorm and the fused linear + cross-entropy
// loss: builders with their operand checks, backward rules, and their CPU entries
// (ag_cpu_*: the choice between the kernels of cpu/k_linear.c and cpu/k_ce.c). Other
// devices run through their backend table (backend.h). Not here: bias terms, quantized
// weights (their own op), softmax on its own (ops_shape.c).
#include "backend.h"
#include "cpu/kernels.h"

#include <limits.h>
#include <math.h>
#include <omp.h>
#include <string.h>

// BLAS indexes with int: larger operands are refused up front rather than truncated.
static molt_status check_blas_size(const char *op, const char *what, int64_t n) {
    if (n <= INT_MAX)
        return MOLT_OK;
    return molt_err(MOLT_EARG, "%s: %s is %lld, more than BLAS can index (%d)", op, what,
                    (long long)n, INT_MAX);
}

// ---- linear -----------------------------------------------------------------------------

static molt_status linear_check(ag_tensor *x, ag_tensor *w, const ag_backend **be) {
    static const char *const names[2] = {"x", "w"};
    MOLT_TRY(ag_check_float("linear", "x", x));
    MOLT_TRY(ag_check_float("linear", "w", w));
    ag_tensor *ts[2] = {x, w};
    MOLT_TRY(ag_backend_pick("linear", 2, ts, names, be));
    MOLT_TRY(ag_check_same_dtype("linear", "x", x, "w", w));
    MOLT_TRY(ag_check_ndim("linear", "w", w, 2, 2));
    if (ag_cols(x) != w->shape[1]) {
        char bx[80], bw[80];
        return molt_err(MOLT_EARG, "linear: x %s does not match w %s: x's last dim must equal "
                        "w's dim 1 (in features)", ag_shape_str(x, bx, sizeof bx),
                        ag_shape_str(w, bw, sizeof bw));
    }
    MOLT_TRY(check_blas_size("linear", "the row count of x", ag_rows(x)));
    MOLT_TRY(check_blas_size("linear", "in features", w->shape[1]));
    return check_blas_size("linear", "out features", w->shape[0]);
}

// Recorded (training) the CPU forward is one BLAS GEMM; otherwise it is bi_linear
// (cpu/k_bi.h); the reference kernels when forced.
molt_status ag_cpu_linear_fwd(ag_ctx *c, ag_tensor *y, const ag_tensor *x, const ag_tensor *w,
                              bool rec) {
    (void)c;
    int64_t T = ag_rows(x), in = w->shape[1], out = w->shape[0];
    bool ref = ag_reference_kernels();
    int nt = omp_get_max_threads();
    if (x->dtype == AG_F32 && !ref && !rec) // inference: batch-invariant
        bi_linear_f32(y->data, x->data, w->data, T, out, in, nt);
    else if (x->dtype == AG_F32) // training (BLAS) or the reference
        (ref ? linear_fwd_ref_f32 : linear_fwd_f32)(y->data, x->data, w->data, T, in, out);
    else if (!ref && !rec)
        bi_linear_f64(y->data, x->data, w->data, T, out, in, nt);
    else
        (ref ? linear_fwd_ref_f64 : linear_fwd_f64)(y->data, x->data, w->data, T, in, out);
    return MOLT_OK;
}

molt_status ag_cpu_linear_bwd(ag_ctx *c, ag_tensor *dx, ag_tensor *dw, const ag_tensor *dy,
                              const ag_tensor *x, const ag_tensor *w) {
    (void)c;
    int64_t T = ag_rows(x), in = w->shape[1], out = w->shape[0];
    bool ref = ag_reference_kernels(), f32 = x->dtype == AG_F32;
    if (dx && f32)
        (ref ? linear_bwd_x_ref_f32 : linear_bwd_x_f32)(dx->data, dy->data, w->data, T, in, out);
    else if (dx)
        (ref ? linear_bwd_x_ref_f64 : linear_bwd_x_f64)(dx->data, dy->data, w->data, T, in, out);
    if (dw && f32)
        (ref ? linear_bwd_w_ref_f32 : linear_bwd_w_f32)(dw->data, dy->data, x->data, T, in, out);
    else if (dw)
        (ref ? linear_bwd_w_ref_f64 : linear_bwd_w_f64)(dw->data, dy->data, x->data, T, in, out);
    return MOLT_OK;
}

// Contract in autograd.h. Nothing is saved: backward reads x and w themselves.
ag_tensor *ag_linear(ag_ctx *c, ag_tensor *x, ag_tensor *w) {
    const ag_backend *be;
    if (linear_check(x, w, &be) != MOLT_OK)
        return NULL;
    int64_t shape[AG_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = w->shape[0];
    // every forward kernel writes y in full (bi_linear, a GEMM with beta 0, the reference)
    ag_tensor *y = ag_out_new_uninit_on(c, x->device, x->dtype, x->ndim, shape);
    if (!y)
        return NULL;
    ag_tensor *ins[2] = {x, w};
    bool rec = ag_should_record(c, 2, ins);
    if (AG_BE_CALL(be, linear_fwd, "linear", c, y, x, w, rec) != MOLT_OK)
        return NULL;
    if (rec && !ag_record(c, AG_OP_LINEAR, y, 2, ins))
        return NULL;
    return y;
}

void ag_bi_matmul(float *y, const float *x, const float *w, int64_t T, int64_t rows,
                  int64_t cols) {
    bi_linear_f32(y, x, w, T, rows, cols, 1);
}

void ag_bi_dots(float *y, const float *a, const float *const *rows, int64_t n, int64_t K) {
    bi_dots_f32(y, a, rows, n, K);
}

void ag_bi_wsum(float *y, const float *p, const float *const *rows, int64_t n, int64_t K) {
    bi_wsum_f32(y, p, rows, n, K);
}

// dx += dy W whenever x requires grad (also with W frozen); dW += dy^T x only when W does.
molt_status ag_backward_linear(ag_ctx *c, ag_node *n) {
    ag_tensor *x = n->in[0], *w = n->in[1], *dy = n->out->grad;
    molt_status st = MOLT_OK;
    ag_tensor *dx = ag_grad_of(x, &st);
    if (st != MOLT_OK)
        return st;
    ag_tensor *dw = ag_grad_of(w, &st);
    if (st != MOLT_OK)
        return st;
    return AG_BE_CALL(ag_backend_node(n), linear_bwd, "linear backward", c, dx, dw, dy, x, w);
}

// ---- RMSNorm ----------------------------------------------------------------------------

static molt_status rmsnorm_check(ag_tensor *x, ag_tensor *w, double eps,
                                 const ag_backend **be) {
    static const char *const names[2] = {"x", "w"};
    MOLT_TRY(ag_check_float("rmsnorm", "x", x));
    MOLT_TRY(ag_check_float("rmsnorm", "w", w));
    ag_tensor *ts[2] = {x, w};
    MOLT_TRY(ag_backend_pick("rmsnorm", 2, ts, names, be));
    MOLT_TRY(ag_check_same_dtype("rmsnorm", "x", x, "w", w));
    if (w->ndim != 1 || w->shape[0] != ag_cols(x)) {
        char bx[80], bw[80];
        return molt_err(MOLT_EARG, "rmsnorm: w %s does not match x %s: w must be [%lld], the "
                        "size of x's last dim", ag_shape_str(w, bw, sizeof bw),
                        ag_shape_str(x, bx, sizeof bx), (long long)ag_cols(x));
    }
    if (!isfinite(eps) || eps < 0)
        return molt_err(MOLT_EARG, "rmsnorm: eps must be finite and >= 0, got %g", eps);
    return MOLT_OK;
}

molt_status ag_cpu_rmsnorm_fwd(ag_ctx *c, ag_tensor *y, void *rstd, const ag_tensor *x,
                               const ag_tensor *w, double eps) {
    (void)c;
    int64_t T = ag_rows(x), C = ag_cols(x);
    bool ref = ag_reference_kernels();
    if (x->dtype == AG_F32)
        (ref ? rmsnorm_fwd_ref_f32 : rmsnorm_fwd_f32)(y->data, rstd, x->data, w->data, T, C, eps);
    else
        (ref ? rmsnorm_fwd_ref_f64 : rmsnorm_fwd_f64)(y->data, rstd, x->data, w->data, T, C, eps);
    return MOLT_OK;
}

molt_status ag_cpu_rmsnorm_bwd(ag_ctx *c, ag_tensor *dx, ag_tensor *dw, const ag_tensor *dy,
                               const ag_tensor *x, const ag_tensor *w, const void *rstd) {
    (void)c;
    void *pdx = dx ? dx->data : NULL, *pdw = dw ? dw->data : NULL;
    int64_t T = ag_rows(x), C = ag_cols(x);
    bool ref = ag_reference_kernels();
    if (x->dtype == AG_F32)
        (ref ? rmsnorm_bwd_ref_f32 : rmsnorm_bwd_f32)(pdx, pdw, dy->data, x->data, w->data,
                                                      rstd, T, C);
    else
        (ref ? rmsnorm_bwd_ref_f64 : rmsnorm_bwd_f64)(pdx, pdw, dy->data, x->data, w->data,
                                                      rstd, T, C);
    return MOLT_OK;
}

// Contract in autograd.h. When recorded, the node keeps the per-row rstd (rows x the
// backend's rstd size, on x's device); the mean of squares is accumulated in double.
ag_tensor *ag_rmsnorm(ag_ctx *c, ag_tensor *x, ag_tensor *w, double eps) {
    const ag_backend *be;
    if (rmsnorm_check(x, w, eps, &be) != MOLT_OK)
        return NULL;
    ag_tensor *y = ag_out_new_on(c, x->device, x->dtype, x->ndim, x->shape);
    if (!y)
        return NULL;
    void *rstd = NULL;
    ag_tensor *ins[2] = {x, w};
    if (ag_should_record(c, 2, ins)) {
        ag_node *n = ag_record(c, AG_OP_RMSNORM, y, 2, ins);
        size_t rb = (size_t)ag_rows(x) * be->rmsnorm_rstd_size(x->dtype);
        if (!n || !(rstd = ag_node_save_on(c, n, x->device, rb)))
            return NULL;
        n->f[0] = eps;
    }
    if (AG_BE_CALL(be, rmsnorm_fwd, "rmsnorm", c, y, rstd, x, w, eps) != MOLT_OK)
        return NULL;
    return y;
}

molt_status ag_backward_rmsnorm(ag_ctx *c, ag_node *n) {
    ag_tensor *x = n->in[0], *w = n->in[1], *dy = n->out->grad;
    if (!n->saved)
        return molt_err(MOLT_EINTERNAL, "rmsnorm: backward found no saved rstd");
    molt_status st = MOLT_OK;
    ag_tensor *dx = ag_grad_of(x, &st);
    if (st != MOLT_OK)
        return st;
    ag_tensor *dw = ag_grad_of(w, &st);
    if (st != MOLT_OK)
        return st;
    return AG_BE_CALL(ag_backend_node(n), rmsnorm_bwd, "rmsnorm backward", c, dx, dw, dy, x, w,
                      n->saved);
}

// ---- fused linear + cross-entropy -------------------------------------------------------
// loss = sum_t mask_t (lse_t - z[t, target_t]) / sum_t mask_t with z = h w^T and lse_t the
// logsumexp of row t; 0 (with zero gradients) when the mask sums to 0. The node keeps only
// lse (T doubles) and the mask sum: backward recomputes the logits chunk by chunk. The
// two-term form adds z += h2 w2^T (a LoRA on the output projection: h2 = s x A^T [T, r],
// w2 = B [V, r]) inside the same chunks, so neither [T, V] logits nor a merged copy of w
// ever exist. Both forms record one node with inputs {h, w, targets, mask, h2, w2}.

#define CE "cross_entropy_linear"
// Elements of scratch per optimized call (h tile, dh tile, logits block): the token tile is
// sized so that tile x (2C + chunk) stays near this.
#define CE_SCRATCH_ELEMS ((int64_t)1 << 24)

static molt_status ce_check_shapes(const ag_tensor *h, const ag_tensor *w,
                                   const ag_tensor *targets, const ag_tensor *mask) {
    char bh[80], bo[80];
    MOLT_TRY(ag_check_float(CE, "h", h));
    MOLT_TRY(ag_check_float(CE, "w", w));
    MOLT_TRY(ag_check_same_dtype(CE, "h", h, "w", w));
    MOLT_TRY(ag_check_ndim(CE, "h", h, 2, 2));
    MOLT_TRY(ag_check_ndim(CE, "w", w, 2, 2));
    if (h->shape[1] != w->shape[1])
        return molt_err(MOLT_EARG, CE ": h %s and w %s differ in hidden size (dim 1)",
                        ag_shape_str(h, bh, sizeof bh), ag_shape_str(w, bo, sizeof bo));
    MOLT_TRY(ag_check_int32(CE, "targets", targets));
    if (targets->ndim != 1 || targets->shape[0] != h->shape[0])
        return molt_err(MOLT_EARG, CE ": targets %s must be [%lld], one per row of h %s",
                        ag_shape_str(targets, bo, sizeof bo), (long long)h->shape[0],
                        ag_shape_str(h, bh, sizeof bh));
    if (!mask)
        return MOLT_OK;
    MOLT_TRY(ag_check_float(CE, "mask", mask));
    MOLT_TRY(ag_check_same_dtype(CE, "h", h, "mask", mask));
    if (mask->ndim != 1 || mask->shape[0] != h->shape[0])
        return molt_err(MOLT_EARG, CE ": mask %s must be [%lld], one per row of h %s",
                        ag_shape_str(mask, bo, sizeof bo), (long long)h->shape[0],
                        ag_shape_str(h, bh, sizeof bh));
    if (mask->requires_grad)
        return molt_err(MOLT_EARG, CE ": mask requires grad, but the loss is not "
                        "differentiated with respect to its weights");
    return MOLT_OK;
}

// Every target in [0, V), every mask weight finite and >= 0; *msum = the mask's sum (T
// without a mask). Device operands are read back once each.
static molt_status ce_check_values(const ag_tensor *w, const ag_tensor *targets,
                                   const ag_tensor *mask, double *msum) {
    const void *tv, *mv = NULL;
    void *tcopy = NULL, *mcopy = NULL;
    MOLT_TRY(ag_host_view(CE, targets, &tv, &tcopy));
    molt_status st = mask ? ag_host_view(CE, mask, &mv, &mcopy) : MOLT_OK;
    const int32_t *tg = tv;
    int64_t V = w->shape[0], T = targets->numel;
    for (int64_t t = 0; st == MOLT_OK && t < T; t++)
        if (tg[t] < 0 || tg[t] >= V)
            st = molt_err(MOLT_EARG, CE ": targets[%lld] = %d is outside the vocabulary "
                          "[0, %lld)", (long long)t, (int)tg[t], (long long)V);
    // the host copy of the mask as a tensor view, for ag_get
    ag_tensor hm = mask ? *mask : (ag_tensor){0};
    hm.data = (void *)mv;
    hm.device = AG_CPU;
    *msum = 0;
    for (int64_t t = 0; st == MOLT_OK && t < T; t++) {
        double m = mask ? ag_get(&hm, t) : 1.0;
        if (!isfinite(m) || m < 0)
            st = molt_err(MOLT_EARG, CE ": mask[%lld] = %g must be finite and >= 0",
                          (long long)t, m);
        *msum += m;
    }
    molt_free(tcopy);
    molt_free(mcopy);
    return st;
}

// h2 [T, R] and w2 [V, R], both or neither, of h's dtype.
static molt_status ce_check_lowrank(const ag_tensor *h, const ag_tensor *w,
                                    const ag_tensor *h2, const ag_tensor *w2) {
    if (!h2 && !w2)
        return MOLT_OK;
    if (!h2 || !w2)
        return molt_err(MOLT_EARG, CE ": h2 and w2 come together (got only %s)",
                        h2 ? "h2" : "w2");
    char b1[80], b2[80], b3[80], b4[80];
    MOLT_TRY(ag_check_float(CE, "h2", h2));
    MOLT_TRY(ag_check_float(CE, "w2", w2));
    MOLT_TRY(ag_check_same_dtype(CE, "h", h, "h2", h2));
    MOLT_TRY(ag_check_same_dtype(CE, "h", h, "w2", w2));
    MOLT_TRY(ag_check_ndim(CE, "h2", h2, 2, 2));
    MOLT_TRY(ag_check_ndim(CE, "w2", w2, 2, 2));
    if (h2->shape[0] != h->shape[0] || w2->shape[0] != w->shape[0] ||
        h2->shape[1] != w2->shape[1] || h2->shape[1] < 1)
        return molt_err(MOLT_EARG, CE ": h2 %s and w2 %s must be [T, r] and [V, r] with h %s "
                        "and w %s", ag_shape_str(h2, b1, sizeof b1),
                        ag_shape_str(w2, b2, sizeof b2), ag_shape_str(h, b3, sizeof b3),
                        ag_shape_str(w, b4, sizeof b4));
    return check_blas_size(CE, "the rank", h2->shape[1]);
}

static molt_status ce_check(ag_tensor *const *in, int64_t chunk, const ag_backend **be,
                            double *msum) {
    static const char *const names[6] = {"h", "w", "targets", "mask", "h2", "w2"};
    ag_tensor *h = in[0], *w = in[1], *targets = in[2], *mask = in[3], *h2 = in[4], *w2 = in[5];
    MOLT_TRY(ce_check_shapes(h, w, targets, mask));
    MOLT_TRY(ce_check_lowrank(h, w, h2, w2));
    MOLT_TRY(ag_backend_pick(CE, 6, in, names, be));
    if (chunk < 1)
        return molt_err(MOLT_EARG, CE ": chunk must be >= 1, got %lld", (long long)chunk);
    MOLT_TRY(check_blas_size(CE, "the token count", h->shape[0]));
    MOLT_TRY(check_blas_size(CE, "the hidden size", h->shape[1]));
    MOLT_TRY(check_blas_size(CE, "the vocabulary size", w->shape[0]));
    return ce_check_values(w, targets, mask, msum);
}

static double mask_at(const ag_tensor *mask, int64_t t) {
    return mask ? ag_get(mask, t) : 1.0;
}

// Sizes, counted tokens and scratch of one kernel call. The reference kernels need only
// the sizes; the optimized ones get the tokens with a nonzero mask and a workspace.
typedef struct {
    ce_dims d;
    ce_lowrank lr; // d.lr points here when the call has the low-rank term
    int64_t *rows;
    void *work;
} ce_plan;

static void ce_plan_free(ce_plan *p) {
    molt_free(p->rows);
    molt_free(p->work);
    p->rows = NULL;
    p->work = NULL;
}

// h2/w2 NULL: no low-rank term; dh2/dw2 are only read by backward (NULL in forward).
static molt_status ce_plan_init(ce_plan *p, const ag_tensor *h, const ag_tensor *w,
                                const ag_tensor *h2, const ag_tensor *w2, void *dh2, void *dw2,
                                const ag_tensor *mask, int64_t chunk, bool ref) {
    memset(p, 0, sizeof *p);
    int64_t T = h->shape[0], C = h->shape[1], V = w->shape[0], R = h2 ? h2->shape[1] : 0;
    p->d = (ce_dims){.T = T, .C = C, .V = V, .chunk = chunk < V ? chunk : V, .tile = 1};
    if (h2) {
        p->lr = (ce_lowrank){.R = R, .h2 = h2->data, .w2 = w2->data, .dh2 = dh2, .dw2 = dw2};
        p->d.lr = &p->lr;
    }
    if (ref)
        return MOLT_OK;
    p->rows = molt_malloc((size_t)T * sizeof *p->rows);
    if (!p->rows)
        return molt_err(MOLT_ENOMEM, CE ": out of memory listing %lld tokens", (long long)T);
    for (int64_t t = 0; t < T; t++)
        if (mask_at(mask, t) != 0)
            p->rows[p->d.n_rows++] = t;
    p->d.rows = p->rows;
    if (p->d.n_rows == 0)
        return MOLT_OK;
    int64_t tile = CE_SCRATCH_ELEMS / (2 * C + 2 * R + p->d.chunk);
    tile = tile < 1 ? 1 : tile > p->d.n_rows ? p->d.n_rows : tile;
    // the same number of tiles, evenly sized: no thin last tile (a thin GEMM, and one more
    // pass over w for few tokens)
    int64_t n_tiles = (p->d.n_rows + tile - 1) / tile;
    p->d.tile = (p->d.n_rows + n_tiles - 1) / n_tiles;
    size_t bytes = h->dtype == AG_F32 ? ce_work_bytes_f32(&p->d) : ce_work_bytes_f64(&p->d);
    p->work = molt_malloc(bytes);
    if (!p->work) {
        ce_plan_free(p);
        return molt_err(MOLT_ENOMEM, CE ": out of memory for %zu bytes of scratch", bytes);
    }
    return MOLT_OK;
}

// lse (T) of every counted token and the loss; with dh non-NULL (the fused path: no
// low-rank term, optimized kernels) also the gradient to h for dloss = 1, rows of uncounted
// tokens left as they are.
molt_status ag_cpu_ce_forward(ag_ctx *c, const ag_ce_args *a, double *lse, void *dh,
                              double *loss) {
    (void)c;
    ag_tensor *const *in = a->in;
    const ag_tensor *h = in[0], *w = in[1], *targets = in[2], *mask = in[3];
    int64_t T = h->shape[0];
    double msum = a->msum;
    bool ref = ag_reference_kernels();
    ce_plan p;
    MOLT_TRY(ce_plan_init(&p, h, w, in[4], in[5], NULL, NULL, mask, a->chunk, ref));
    double *zt = molt_calloc((size_t)T, sizeof *zt);
    if (!zt) {
        ce_plan_free(&p);
        return molt_err(MOLT_ENOMEM, CE ": out of memory for %lld target logits", (long long)T);
    }
    const void *pm = mask ? mask->data : NULL;
    double scale = msum > 0 ? 1.0 / msum : 0.0;
    if (h->dtype == AG_F32) {
        if (ref) ce_fwd_ref_f32(lse, zt, h->data, w->data, targets->data, &p.d);
        else if (dh) ce_fwd_grad_f32(lse, zt, dh, p.work, h->data, w->data, targets->data, pm,
                                     scale, &p.d);
        else ce_fwd_f32(lse, zt, p.work, h->data, w->data, targets->data, &p.d);
    } else {
        if (ref) ce_fwd_ref_f64(lse, zt, h->data, w->data, targets->data, &p.d);
        else if (dh) ce_fwd_grad_f64(lse, zt, dh, p.work, h->data, w->data, targets->data, pm,
                                     scale, &p.d);
        else ce_fwd_f64(lse, zt, p.work, h->data, w->data, targets->data, &p.d);
    }
    if (ag_interrupt_pending()) { // the kernel stopped early: its results are incomplete
        molt_free(zt);
        ce_plan_free(&p);
        return molt_err(MOLT_EINTERRUPTED, CE ": interrupted");
    }
    double acc = 0;
    for (int64_t t = 0; t < T; t++) {
        double m = mask_at(mask, t);
        if (m != 0)
            acc += m * (lse[t] - zt[t]);
    }
    *loss = msum > 0 ? acc / msum : 0.0;
    molt_free(zt);
    ce_plan_free(&p);
    return MOLT_OK;
}

// Contract in autograd.h. mask has h's dtype, its weights must be finite and >= 0 and it
// must not require grad; every target (masked or not) must lie in [0, V). chunk larger
// than V means one chunk. When recorded, the node saves T doubles (the per-token
// logsumexp), nothing that grows with V; when only h takes a gradient (w frozen, the
// usual case of an adapter) the optimized CPU forward computes that gradient on the way and
// the node keeps it instead (T doubles and T x C elements): backward then only scales it.
ag_tensor *ag_cross_entropy_linear(ag_ctx *c, ag_tensor *h, ag_tensor *w, ag_tensor *targets,
                                   ag_tensor *mask, int64_t chunk) {
    return ag_cross_entropy_linear2(c, h, w, NULL, NULL, targets, mask, chunk);
}

// Contract in autograd.h; as ag_cross_entropy_linear (the low-rank term is never fused).
// On a device the saved state lives in the context's device arena and the loss is formed
// on the host from the logsumexps and target logits read back (2T doubles).
ag_tensor *ag_cross_entropy_linear2(ag_ctx *c, ag_tensor *h, ag_tensor *w, ag_tensor *h2,
                                    ag_tensor *w2, ag_tensor *targets, ag_tensor *mask,
                                    int64_t chunk) {
    return ag_cross_entropy_linear_norm(c, h, w, h2, w2, targets, mask, chunk, 0);
}

// Contract in autograd.h. The normalizer takes the place of the mask's sum everywhere (the
// loss, the gradient scale saved for backward).
ag_tensor *ag_cross_entropy_linear_norm(ag_ctx *c, ag_tensor *h, ag_tensor *w, ag_tensor *h2,
                                        ag_tensor *w2, ag_tensor *targets, ag_tensor *mask,
                                        int64_t chunk, double norm) {
    ag_tensor *ins[6] = {h, w, targets, mask, h2, w2};
    const ag_backend *be;
    double msum = 0;
    if (ce_check(ins, chunk, &be, &msum) != MOLT_OK)
        return NULL;
    if (!(norm >= 0) || !isfinite(norm)) {
        molt_err(MOLT_EARG, CE ": normalizer %g is not a finite number >= 0", norm);
        return NULL;
    }
    int64_t T = h->shape[0], C = h->shape[1], one = 1;
    if (norm > 0 && msum > 0)
        msum = norm;
    ag_tensor *y = NULL;
    bool record = ag_should_record(c, 6, ins);
    bool fused = record && be->ce_fuses && !ag_reference_kernels() && !h2 &&
                 h->requires_grad && !w->requires_grad;
    size_t lse_bytes = (size_t)T * sizeof(double);
    size_t dh_bytes = fused ? (size_t)(T * C) * ag_dtype_size(h->dtype) : 0;
    // lse, then (fused) the gradient to h: the layout of the node's saved state
    bool host = h->device == AG_CPU;
    ag_arena *da = host ? NULL : ag_ctx_arena(c, h->device);
    unsigned char *buf = host ? molt_calloc(1, lse_bytes + dh_bytes)
                         : da ? ag_arena_alloc(da, lse_bytes + dh_bytes)
                              : NULL;
    if (!buf) {
        if (host)
            molt_err(MOLT_ENOMEM, CE ": out of memory for %zu bytes of per-token state",
                     lse_bytes + dh_bytes);
        return NULL;
    }
    double *lse = (double *)buf, loss = 0;
    ag_ce_args a = {ins, chunk, msum};
    if (AG_BE_CALL(be, ce_forward, CE, c, &a, lse, fused ? buf + lse_bytes : NULL, &loss) ==
        MOLT_OK)
        y = ag_out_new_on(c, h->device, h->dtype, 1, &one);
    if (y && record) {
        ag_node *n = ag_record(c, AG_OP_CE_LINEAR, y, 6, ins);
        void *saved = !n ? NULL : host ? ag_node_save(c, n, lse_bytes + dh_bytes) : buf;
        if (saved) {
            if (host) {
                memcpy(saved, buf, lse_bytes + dh_bytes);
            } else {
                n->saved = buf; // the device arena's until the step's reset
                n->saved_dev = true;
            }
            n->f[0] = msum;
            n->i[0] = chunk;
            n->i[1] = fused;
        } else {
            y = NULL;
        }
    }
    if (host)
        molt_free(buf);
    if (y)
        ag_set(y, 0, loss);
    return y;
}

// dh += g * the gradient the fused forward saved (CPU only: only the CPU fuses).
static molt_status ce_backward_fused(ag_node *n, ag_tensor *dh, double g) {
    const unsigned char *saved = n->saved;
    const void *src = saved + (size_t)n->in[0]->shape[0] * sizeof(double);
    if (dh->dtype == AG_F32)
        acc_scale_f32(dh->data, src, (float)g, dh->numel);
    else
        acc_scale_f64(dh->data, src, g, dh->numel);
    return MOLT_OK;
}

molt_status ag_cpu_ce_backward(ag_ctx *c, const ag_ce_args *a, const double *lse, double scale,
                               ag_tensor *dh, ag_tensor *dw, ag_tensor *dh2, ag_tensor *dw2) {
    (void)c;
    ag_tensor *h = a->in[0], *w = a->in[1], *targets = a->in[2], *mask = a->in[3];
    ag_tensor *h2 = a->in[4], *w2 = a->in[5];
    bool ref = ag_reference_kernels();
    ce_plan p;
    MOLT_TRY(ce_plan_init(&p, h, w, h2, w2, dh2 ? dh2->data : NULL, dw2 ? dw2->data : NULL,
                          mask, a->chunk, ref));
    void *pdh = dh ? dh->data : NULL, *pdw = dw ? dw->data : NULL;
    const void *pm = mask ? mask->data : NULL;
    const int32_t *tg = targets->data;
    if (h->dtype == AG_F32) {
        if (ref) ce_bwd_ref_f32(pdh, pdw, h->data, w->data, tg, pm, scale, lse, &p.d);
        else ce_bwd_f32(pdh, pdw, p.work, h->data, w->data, tg, pm, scale, lse, &p.d);
    } else {
        if (ref) ce_bwd_ref_f64(pdh, pdw, h->data, w->data, tg, pm, scale, lse, &p.d);
        else ce_bwd_f64(pdh, pdw, p.work, h->data, w->data, tg, pm, scale, lse, &p.d);
    }
    ce_plan_free(&p);
    if (ag_interrupt_pending()) // the kernel stopped early: the gradients are incomplete
        return molt_err(MOLT_EINTERRUPTED, CE " backward: interrupted");
    return MOLT_OK;
}

molt_status ag_backward_ce_linear(ag_ctx *c, ag_node *n) {
    ag_tensor *h = n->in[0], *w = n->in[1];
    if (!n->saved)
        return molt_err(MOLT_EINTERNAL, CE ": backward found no saved logsumexp");
    molt_status st = MOLT_OK;
    ag_tensor *dh = ag_grad_of(h, &st);
    if (st != MOLT_OK)
        return st;
    ag_tensor *dw = ag_grad_of(w, &st);
    if (st != MOLT_OK)
        return st;
    ag_tensor *h2 = n->in[4], *w2 = n->in[5];
    ag_tensor *dh2 = h2 ? ag_grad_of(h2, &st) : NULL;
    if (st != MOLT_OK)
        return st;
    ag_tensor *dw2 = w2 ? ag_grad_of(w2, &st) : NULL;
    if (st != MOLT_OK)
        return st;
    double msum = n->f[0];
    if (msum == 0 || (!dh && !dw && !dh2 && !dw2))
        return MOLT_OK; // the loss is the constant 0: zero gradients
    double g = ag_get(n->out->grad, 0);
    if (n->i[1]) // fused: only h takes a gradient, computed by the forward
        return ce_backward_fused(n, dh, g);
    ag_ce_args a = {n->in, n->i[0], msum};
    return AG_BE_CALL(ag_backend_node(n), ce_backward, CE " backward", c, &a, n->saved,
                      g / msum, dh, dw, dh2, dw2);
}
