// autograd/ops_lora_multi.c: several LoRA adapters over one batch, each row with its own
// adapter (ag_lora_multi): the builder with its operand checks and the backward rule. This is
// how one forward serves requests of many adapters at once (serving, evaluation): the base
// projection runs once over all rows, and this op adds each row's low-rank term. Kernels in
// cpu/k_lora_multi.c. Not here: the base projection, dropout (inference has none), the
// routed experts (ops_moe_multi.c).
#include "internal.h"
#include "cpu/kernels.h"

#include <limits.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#define OP "lora_multi"

// Checks one adapter's pair against x [T, in] and `out`.
static molt_status check_pair(const ag_tensor *x, const ag_lora_ab *l, int s, int64_t out) {
    char b0[80], b1[80];
    if (!l->a != !l->b)
        return molt_err(MOLT_EARG, OP ": adapter %d has %s without %s (set both or neither)", s,
                        l->a ? "a" : "b", l->a ? "b" : "a");
    if (!l->a)
        return MOLT_OK;
    MOLT_TRY(ag_check_cpu_float(OP, "a", l->a));
    MOLT_TRY(ag_check_cpu_float(OP, "b", l->b));
    MOLT_TRY(ag_check_same_dtype(OP, "x", x, "a", l->a));
    MOLT_TRY(ag_check_same_dtype(OP, "x", x, "b", l->b));
    int64_t in = x->shape[1];
    if (l->a->ndim != 2 || l->a->shape[1] != in || l->a->shape[0] < 1 ||
        l->a->shape[0] > INT_MAX)
        return molt_err(MOLT_EARG, OP ": adapter %d: a is %s, expected [r, %lld] with r >= 1", s,
                        ag_shape_str(l->a, b0, sizeof b0), (long long)in);
    int64_t r = l->a->shape[0];
    if (l->b->ndim != 2 || l->b->shape[0] != out || l->b->shape[1] != r)
        return molt_err(MOLT_EARG, OP ": adapter %d: b is %s, expected [%lld, %lld] for a %s", s,
                        ag_shape_str(l->b, b0, sizeof b0), (long long)out, (long long)r,
                        ag_shape_str(l->a, b1, sizeof b1));
    if (!isfinite(l->scale))
        return molt_err(MOLT_EARG, OP ": adapter %d: scale %g is not finite", s, l->scale);
    return MOLT_OK;
}

static molt_status check(const ag_tensor *x, const ag_tensor *slot, int n,
                         const ag_lora_ab *set, int64_t out) {
    MOLT_TRY(ag_check_cpu_float(OP, "x", x));
    MOLT_TRY(ag_check_ndim(OP, "x", x, 2, 2));
    MOLT_TRY(ag_check_i32(OP, "slot", slot));
    char b0[80], b1[80];
    int64_t T = x->shape[0];
    if (slot->ndim != 1 || slot->shape[0] != T)
        return molt_err(MOLT_EARG, OP ": slot is %s, expected I32 [%lld] (one per row of x %s)",
                        ag_shape_str(slot, b0, sizeof b0), (long long)T,
                        ag_shape_str(x, b1, sizeof b1));
    if (n < 0 || (n > 0 && !set))
        return molt_err(MOLT_EARG, OP ": %d adapters with %s set", n, set ? "a" : "no");
    if (out < 1 || out > INT_MAX || x->shape[1] > INT_MAX || T > INT_MAX)
        return molt_err(MOLT_EARG, OP ": %lld output features for x %s (1 to %d each)",
                        (long long)out, ag_shape_str(x, b0, sizeof b0), INT_MAX);
    for (int s = 0; s < n; s++)
        MOLT_TRY(check_pair(x, &set[s], s, out));
    const int32_t *sl = slot->data;
    for (int64_t t = 0; t < T; t++)
        if (sl[t] < -1 || sl[t] >= n)
            return molt_err(MOLT_EARG, OP ": slot[%lld] = %d is outside [-1, %d)", (long long)t,
                            (int)sl[t], n);
    return MOLT_OK;
}

// The kernels' view of the adapters (f32 or f64 by `f32`).
static void views(const ag_lora_ab *set, int n, bool f32, lora_ab_f32 *v32, lora_ab_f64 *v64) {
    for (int s = 0; s < n; s++) {
        const ag_lora_ab *l = &set[s];
        int64_t r = l->a ? l->a->shape[0] : 0;
        if (f32)
            v32[s] = (lora_ab_f32){l->a ? l->a->data : NULL, l->b ? l->b->data : NULL, r,
                                   (float)l->scale};
        else
            v64[s] = (lora_ab_f64){l->a ? l->a->data : NULL, l->b ? l->b->data : NULL, r,
                                   l->scale};
    }
}

// Scratch of the views and of the optimized kernels (NULL with a message on no memory).
typedef struct {
    lora_ab_f32 *v32;
    lora_ab_f64 *v64;
    void *ws;
} scratch;

static molt_status scratch_new(scratch *sc, const ag_lora_ab *set, int n, bool f32, int64_t T,
                               int64_t in, int64_t out, bool want_ws) {
    memset(sc, 0, sizeof *sc);
    size_t nv = (size_t)(n > 0 ? n : 1);
    sc->v32 = molt_calloc(nv, sizeof *sc->v32);
    sc->v64 = molt_calloc(nv, sizeof *sc->v64);
    if (!sc->v32 || !sc->v64)
        return molt_err(MOLT_ENOMEM, OP ": out of memory");
    views(set, n, f32, sc->v32, sc->v64);
    if (!want_ws)
        return MOLT_OK;
    size_t bytes = f32 ? lora_multi_ws_bytes_f32(sc->v32, n, T, in, out)
                       : lora_multi_ws_bytes_f64(sc->v64, n, T, in, out);
    sc->ws = molt_malloc(bytes);
    return sc->ws ? MOLT_OK
                  : molt_err(MOLT_ENOMEM, OP ": out of memory for %zu bytes of scratch", bytes);
}

static void scratch_free(scratch *sc) {
    molt_free(sc->v32);
    molt_free(sc->v64);
    molt_free(sc->ws);
}

// Contract in autograd.h. The node keeps the adapters' scales (n doubles); inputs are
// x, slot, then a and b of every adapter (NULL for none).
ag_tensor *ag_lora_multi(ag_ctx *c, ag_tensor *x, ag_tensor *slot, int n,
                         const ag_lora_ab *set, int64_t out) {
    return ag_lora_multi_rows(c, x, slot, n, set, out, NULL, NULL);
}

ag_tensor *ag_lora_multi_rows(ag_ctx *c, ag_tensor *x, ag_tensor *slot, int n,
                              const ag_lora_ab *set, int64_t out, const uint8_t *bx,
                              ag_tensor *acc) {
    if (check(x, slot, n, set, out) != MOLT_OK)
        return NULL;
    if (bx && x->dtype != AG_F32) {
        char b[80];
        molt_err(MOLT_EARG, OP ": x %s has rows marked for the bf16-pair products, which take "
                 "F32", ag_shape_str(x, b, sizeof b));
        return NULL;
    }
    int64_t T = x->shape[0], in = x->shape[1];
    int n_in = 2 + 2 * n;
    ag_tensor **ins = molt_calloc((size_t)n_in, sizeof *ins);
    if (!ins) {
        molt_err(MOLT_ENOMEM, OP ": out of memory");
        return NULL;
    }
    ins[0] = x;
    ins[1] = slot;
    for (int s = 0; s < n; s++) {
        ins[2 + 2 * s] = set[s].a;
        ins[3 + 2 * s] = set[s].b;
    }
    bool rec = ag_should_record(c, n_in, ins), ref = ag_reference_kernels();
    bool f32 = x->dtype == AG_F32;
    // in place into acc: not recorded, optimized kernels, acc a host [T, out] of x's type
    bool in_place = acc && !rec && !ref && acc->device == AG_CPU && acc->dtype == x->dtype &&
                    acc->ndim == 2 && acc->shape[0] == T && acc->shape[1] == out;
    // both kernels write y in full (rows of no adapter as zeros)
    ag_tensor *y = in_place ? acc
                            : ag_out_new_uninit_on(c, AG_CPU, x->dtype, 2, (int64_t[]){T, out});
    if (!y) {
        molt_free(ins);
        return NULL;
    }
    scratch sc;
    molt_status st = scratch_new(&sc, set, n, f32, T, in, out, !ref);
    int nt = omp_get_max_threads();
    void *bws = NULL; // the marked rows' bxq_linear scratch (f32, optimized kernels)
    if (st == MOLT_OK && f32 && !ref && bx &&
        !(bws = ag_arena_alloc_uninit(&c->act, lora_multi_bx_ws_bytes_f32(sc.v32, n, T, nt))))
        st = MOLT_ENOMEM;
    if (st == MOLT_OK) {
        if (ref && f32)
            lora_multi_fwd_ref_f32(y->data, x->data, slot->data, sc.v32, n, T, in, out);
        else if (ref)
            lora_multi_fwd_ref_f64(y->data, x->data, slot->data, sc.v64, n, T, in, out);
        else if (f32)
            lora_multi_fwd_f32(y->data, x->data, slot->data, bx, sc.v32, n, T, in, out, nt,
                               sc.ws, bws, in_place);
        else
            lora_multi_fwd_f64(y->data, x->data, slot->data, NULL, sc.v64, n, T, in, out, nt,
                               sc.ws, NULL, in_place);
    }
    scratch_free(&sc);
    bool ok = st == MOLT_OK;
    if (ok && rec) {
        ag_node *nd = ag_record(c, AG_OP_LORA_MULTI, y, n_in, ins);
        double *scales = nd ? ag_node_save(c, nd, (size_t)(n > 0 ? n : 1) * sizeof *scales)
                            : NULL;
        ok = scales != NULL;
        for (int s = 0; ok && s < n; s++)
            scales[s] = set[s].scale;
        if (nd)
            nd->i[0] = n;
    }
    molt_free(ins);
    return ok ? y : NULL;
}

molt_status ag_backward_lora_multi(ag_ctx *c, ag_node *nd) {
    (void)c;
    int n = (int)nd->i[0];
    ag_tensor *x = nd->in[0], *slot = nd->in[1], *dy = nd->out->grad;
    const double *scales = nd->saved;
    if (!scales)
        return molt_err(MOLT_EINTERNAL, OP ": backward found no saved scales");
    int64_t T = x->shape[0], in = x->shape[1], out = nd->out->shape[1];
    bool f32 = x->dtype == AG_F32, ref = ag_reference_kernels();
    molt_status st = MOLT_OK;
    ag_tensor *dx = ag_grad_of(x, &st);
    ag_lora_ab *set = molt_calloc((size_t)(n > 0 ? n : 1), sizeof *set);
    void **da = molt_calloc((size_t)(n > 0 ? n : 1), sizeof *da);
    void **db = molt_calloc((size_t)(n > 0 ? n : 1), sizeof *db);
    if (!set || !da || !db)
        st = molt_err(MOLT_ENOMEM, OP ": out of memory in backward");
    for (int s = 0; st == MOLT_OK && s < n; s++) {
        set[s] = (ag_lora_ab){nd->in[2 + 2 * s], nd->in[3 + 2 * s], scales[s]};
        ag_tensor *ga = ag_grad_of(set[s].a, &st), *gb = ag_grad_of(set[s].b, &st);
        da[s] = ga ? ga->data : NULL;
        db[s] = gb ? gb->data : NULL;
    }
    scratch sc = {0};
    if (st == MOLT_OK)
        st = scratch_new(&sc, set, n, f32, T, in, out, !ref);
    if (st == MOLT_OK) {
        void *pdx = dx ? dx->data : NULL;
        if (ref && f32)
            lora_multi_bwd_ref_f32(pdx, (float *const *)da, (float *const *)db, dy->data,
                                   x->data, slot->data, sc.v32, n, T, in, out);
        else if (ref)
            lora_multi_bwd_ref_f64(pdx, (double *const *)da, (double *const *)db, dy->data,
                                   x->data, slot->data, sc.v64, n, T, in, out);
        else if (f32)
            lora_multi_bwd_f32(pdx, (float *const *)da, (float *const *)db, dy->data, x->data,
                               slot->data, sc.v32, n, T, in, out, sc.ws);
        else
            lora_multi_bwd_f64(pdx, (double *const *)da, (double *const *)db, dy->data,
                               x->data, slot->data, sc.v64, n, T, in, out, sc.ws);
    }
    scratch_free(&sc);
    molt_free(set);
    molt_free(da);
    molt_free(db);
    return st;
}
