// autograd/ops_bx.c: the bf16-pair linear of inference's vocabulary projection (contract in
// autograd.h, kernels and their order in cpu/k_bx.h): packing, the builder with its operand
// checks, the backward rule for x. Host only: AMX is a CPU feature.
#include "internal.h"
#include "cpu/kernels.h"

#include <omp.h>
#include <string.h>

#define LINBX "linear_bx"

bool ag_bx_available(void) { return bx_amx(); }

// A weight either packing takes: an F32 host matrix holding data.
static molt_status check_weight(const ag_tensor *w) {
    if (w && w->dtype == AG_F32 && w->ndim == 2 && w->device == AG_CPU && w->data)
        return MOLT_OK;
    char b[80];
    return molt_err(MOLT_EARG, LINBX ": the weight is %s, expected an F32 host matrix",
                    w ? ag_shape_str(w, b, sizeof b) : "NULL");
}

bool ag_bx_packs_in_place(const ag_tensor *w) {
    return w && w->ndim == 2 && bx_pack_in_place_ok(w->shape[0], w->shape[1]);
}

molt_status ag_bx_pack(ag_arena *a, const ag_tensor *w, int nthreads, ag_bxweight *out) {
    memset(out, 0, sizeof *out);
    MOLT_TRY(check_weight(w));
    int64_t rows = w->shape[0], cols = w->shape[1];
    uint16_t *d = ag_arena_alloc_uninit(a, bx_pack_bytes(rows, cols));
    if (!d)
        return molt_err_wrap(MOLT_ENOMEM, LINBX ": packing a [%lld, %lld] weight",
                             (long long)rows, (long long)cols);
    bx_pack(d, w->data, rows, cols, nthreads);
    *out = (ag_bxweight){.data = d, .rows = rows, .cols = cols};
    return MOLT_OK;
}

molt_status ag_bx_pack_in_place(ag_tensor *w, int nthreads, ag_bxweight *out) {
    memset(out, 0, sizeof *out);
    MOLT_TRY(check_weight(w));
    char b[80];
    int64_t rows = w->shape[0], cols = w->shape[1];
    if (!ag_bx_packs_in_place(w))
        return molt_err(MOLT_EARG, LINBX ": %s cannot be packed over itself (rows a multiple "
                        "of %d and columns of %d)", ag_shape_str(w, b, sizeof b), BX_RT, BX_KT);
    if (!bx_pack_in_place(w->data, rows, cols, nthreads))
        return molt_err(MOLT_ENOMEM, LINBX ": out of memory for a panel's copy while packing %s",
                        ag_shape_str(w, b, sizeof b));
    *out = (ag_bxweight){.data = w->data, .rows = rows, .cols = cols};
    w->data = NULL;
    return MOLT_OK;
}

static molt_status check(ag_tensor *x, const ag_bxweight *w) {
    MOLT_TRY(ag_check_cpu_float(LINBX, "x", x));
    char b[80];
    if (x->dtype != AG_F32)
        return molt_err(MOLT_EARG, LINBX ": x %s is F64; the bf16 products take F32",
                        ag_shape_str(x, b, sizeof b));
    if (!w || !w->data)
        return molt_err(MOLT_EARG, LINBX ": no packed weight");
    if (ag_cols(x) != w->cols)
        return molt_err(MOLT_EARG, LINBX ": x %s does not match the packed weight [%lld, %lld]: "
                        "x's last dim must equal its in features", ag_shape_str(x, b, sizeof b),
                        (long long)w->rows, (long long)w->cols);
    return MOLT_OK;
}

ag_tensor *ag_linear_bx(ag_ctx *c, ag_tensor *x, const ag_bxweight *w) {
    if (check(x, w) != MOLT_OK)
        return NULL;
    int64_t shape[AG_MAX_DIMS], T = ag_rows(x);
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = w->rows;
    // both kernels write y in full
    ag_tensor *y = ag_out_new_uninit_on(c, AG_CPU, AG_F32, x->ndim, shape);
    if (!y)
        return NULL;
    if (ag_reference_kernels() || !bx_amx()) {
        bx_linear_ref(y->data, x->data, w->data, T, w->rows, w->cols);
    } else {
        int nt = omp_get_max_threads();
        size_t bytes = bx_ws_bytes(T, w->cols, nt);
        void *ws = ag_arena_alloc_uninit(&c->act, bytes); // 64-byte aligned, freed at reset
        if (!ws)
            return NULL;
        bx_linear(y->data, x->data, w->data, T, w->rows, w->cols, nt, ws);
    }
    if (ag_should_record(c, 1, &x)) {
        ag_node *n = ag_record(c, AG_OP_LINEAR_BX, y, 1, &x);
        if (!n)
            return NULL;
        n->ptr = w;
    }
    return y;
}

// dx += dy (hi + lo of W); W is frozen.
molt_status ag_backward_linear_bx(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *x = n->in[0], *dx = ag_grad_of(x, &st), *dy = n->out->grad;
    const ag_bxweight *w = n->ptr;
    if (!dx)
        return st;
    if (!w)
        return molt_err(MOLT_EINTERNAL, LINBX ": node lost its weight");
    bx_linear_bwd_x(dx->data, dy->data, w->data, ag_rows(x), w->rows, w->cols);
    return MOLT_OK;
}
