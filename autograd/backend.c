// autograd/backend.c: the backend registry (which table serves which device, the
// one-device rule for an op's operands and its messages, the test override), the
// device-aware operand checks, and the CPU table: host memory, the elementwise kernels and
// the ag_cpu_* entries each op file defines next to its builder. Not here: the CUDA table
// (backend_cuda.c), the op builders.
#include "backend.h"
#include "cpu/kernels.h"

#include <string.h>

static const ag_backend *override_of[AG_DEVICE_COUNT];

void ag_backend_override(ag_device dev, const ag_backend *be) {
    if ((unsigned)dev < AG_DEVICE_COUNT)
        override_of[dev] = be;
}

const char *ag_device_name(ag_device dev) {
    return dev == AG_CPU ? "cpu" : dev == AG_CUDA ? "cuda" : "?";
}

const ag_backend *ag_backend_get(const char *op, ag_device dev) {
    if ((unsigned)dev >= AG_DEVICE_COUNT) {
        molt_err(MOLT_EARG, "%s: unknown device %d", op, (int)dev);
        return NULL;
    }
    if (override_of[dev])
        return override_of[dev];
    if (dev == AG_CPU)
        return &ag_backend_cpu;
    const ag_backend *be = ag_backend_cuda_table();
    if (!be)
        molt_err(MOLT_EDEVICE, "%s: this build has no CUDA", op);
    return be;
}

// The device shared by the non-NULL tensors; MOLT_EARG naming two that differ.
static molt_status one_device(const char *op, int n, ag_tensor *const *ts,
                              const char *const *names, ag_device *dev) {
    int first = -1;
    for (int i = 0; i < n; i++) {
        if (!ts[i])
            continue;
        if (first < 0)
            first = i;
        else if (ts[i]->device != ts[first]->device)
            return molt_err(MOLT_EARG, "%s: %s is on %s, %s is on %s: an op's operands must "
                            "be on one device (copy with ag_tensor_to)", op, names[first],
                            ag_device_name(ts[first]->device), names[i],
                            ag_device_name(ts[i]->device));
    }
    *dev = first < 0 ? AG_CPU : ts[first]->device;
    return MOLT_OK;
}

const ag_backend *ag_backend_of(const char *op, int n, ag_tensor *const *ts,
                                const char *const *names) {
    ag_device dev;
    if (one_device(op, n, ts, names, &dev) != MOLT_OK)
        return NULL;
    return ag_backend_get(op, dev);
}

static molt_status float_ok(const char *op, const char *what, const ag_tensor *t,
                            const ag_backend *be) {
    if (be->float_ok[t->dtype])
        return MOLT_OK;
    char b[80];
    if (be->device == AG_CPU)
        return molt_err(MOLT_EARG, "%s: %s is %s, expected f32 or f64 (cast bf16/f16 first)",
                        op, what, ag_shape_str(t, b, sizeof b));
    return molt_err(MOLT_EARG, "%s: %s is %s, expected %s on %s", op, what,
                    ag_shape_str(t, b, sizeof b), be->float_ok[AG_BF16] ? "f32 or bf16" : "f32",
                    be->name);
}

molt_status ag_backend_pick(const char *op, int n, ag_tensor *const *ts,
                            const char *const *names, const ag_backend **be) {
    *be = NULL;
    ag_device dev;
    MOLT_TRY(one_device(op, n, ts, names, &dev));
    const ag_backend *b = ag_backend_get(op, dev);
    if (!b)
        return MOLT_EDEVICE;
    for (int i = 0; i < n; i++)
        if (ts[i] && ts[i]->dtype != AG_I32)
            MOLT_TRY(float_ok(op, names[i], ts[i], b));
    *be = b;
    return MOLT_OK;
}

const ag_backend *ag_backend_for_floats(const char *op, int n, ag_tensor *const *ts,
                                        const char *const *names) {
    const ag_backend *be;
    return ag_backend_pick(op, n, ts, names, &be) == MOLT_OK ? be : NULL;
}

molt_status ag_check_qweight_device(const char *op, const char *xname, const ag_tensor *x,
                                    const char *qname, const ag_qweight *q) {
    if (!q || q->device == x->device)
        return MOLT_OK;
    return molt_err(MOLT_EARG, "%s: %s is on %s, %s is on %s: an op's operands must be on one "
                    "device (copy the qweight with ag_qweight_to)", op, xname,
                    ag_device_name(x->device), qname, ag_device_name(q->device));
}

const ag_backend *ag_backend_node(const ag_node *n) {
    const ag_backend *be = ag_backend_get(ag_op_name(n->op), n->out->device);
    MOLT_ASSERT(be != NULL); // the forward ran on this device
    return be;
}

molt_status ag_check_float(const char *op, const char *what, const ag_tensor *t) {
    MOLT_TRY(ag_check_not_null(op, what, t));
    const ag_backend *be = ag_backend_get(op, t->device);
    if (!be)
        return MOLT_EDEVICE; // ag_backend_get said why
    return float_ok(op, what, t, be);
}

molt_status ag_check_int32(const char *op, const char *what, const ag_tensor *t) {
    MOLT_TRY(ag_check_not_null(op, what, t));
    if (t->dtype == AG_I32)
        return MOLT_OK;
    char b[80];
    return molt_err(MOLT_EARG, "%s: %s is %s, expected i32", op, what,
                    ag_shape_str(t, b, sizeof b));
}

molt_status ag_host_view(const char *op, const ag_tensor *t, const void **data, void **copy) {
    *copy = NULL;
    if (t->device == AG_CPU) {
        *data = t->data;
        return MOLT_OK;
    }
    const ag_backend *be = ag_backend_get(op, t->device);
    if (!be)
        return MOLT_EDEVICE;
    size_t bytes = (size_t)t->numel * ag_dtype_size(t->dtype);
    void *h = molt_malloc(bytes ? bytes : 1);
    if (!h)
        return molt_err(MOLT_ENOMEM, "%s: out of memory reading %zu bytes back", op, bytes);
    molt_status st = be->to_host(h, t->data, bytes);
    if (st != MOLT_OK) {
        molt_free(h);
        return molt_err_wrap(st, "%s: reading an operand back from %s", op, be->name);
    }
    *data = h;
    *copy = h;
    return MOLT_OK;
}

// ---- the CPU table -----------------------------------------------------------------------

static molt_status cpu_alloc(void **p, size_t bytes) {
    *p = molt_malloc(bytes ? bytes : 1);
    return *p ? MOLT_OK : molt_err(MOLT_ENOMEM, "cpu: out of memory for %zu bytes", bytes);
}
static void cpu_free(void *p) { molt_free(p); }
static molt_status cpu_zero(void *p, size_t bytes) {
    memset(p, 0, bytes);
    return MOLT_OK;
}
static molt_status cpu_copy(void *dst, const void *src, size_t bytes) {
    memcpy(dst, src, bytes);
    return MOLT_OK;
}
static molt_status cpu_fill(ag_tensor *t, double v) {
    for (int64_t i = 0; i < t->numel; i++)
        ag_set(t, i, v);
    return MOLT_OK;
}

static molt_status cpu_add(ag_tensor *y, const ag_tensor *a, const ag_tensor *b) {
    if (a->dtype == AG_F32) add_fwd_f32(y->data, a->data, b->data, a->numel);
    else add_fwd_f64(y->data, a->data, b->data, a->numel);
    return MOLT_OK;
}
static molt_status cpu_mul(ag_tensor *y, const ag_tensor *a, const ag_tensor *b) {
    if (a->dtype == AG_F32) mul_fwd_f32(y->data, a->data, b->data, a->numel);
    else mul_fwd_f64(y->data, a->data, b->data, a->numel);
    return MOLT_OK;
}
static molt_status cpu_scale(ag_tensor *y, const ag_tensor *a, double s) {
    if (a->dtype == AG_F32) scale_fwd_f32(y->data, a->data, (float)s, a->numel);
    else scale_fwd_f64(y->data, a->data, s, a->numel);
    return MOLT_OK;
}
static molt_status cpu_acc(ag_tensor *g, const ag_tensor *dy) {
    if (g->dtype == AG_F32) acc_f32(g->data, dy->data, g->numel);
    else acc_f64(g->data, dy->data, g->numel);
    return MOLT_OK;
}
static molt_status cpu_acc_mul(ag_tensor *g, const ag_tensor *dy, const ag_tensor *o) {
    if (g->dtype == AG_F32) acc_mul_f32(g->data, dy->data, o->data, g->numel);
    else acc_mul_f64(g->data, dy->data, o->data, g->numel);
    return MOLT_OK;
}
static molt_status cpu_acc_scale(ag_tensor *g, const ag_tensor *dy, double s) {
    if (g->dtype == AG_F32) acc_scale_f32(g->data, dy->data, (float)s, g->numel);
    else acc_scale_f64(g->data, dy->data, s, g->numel);
    return MOLT_OK;
}
static size_t cpu_rstd_size(ag_dtype dt) { return ag_dtype_size(dt); }

const ag_backend ag_backend_cpu = {
    .name = "cpu",
    .device = AG_CPU,
    .float_ok = {[AG_F32] = true, [AG_F64] = true},
    .ce_fuses = true,
    .mem_alloc = cpu_alloc,
    .mem_free = cpu_free,
    .mem_zero = cpu_zero,
    .to_host = cpu_copy,
    .from_host = cpu_copy,
    .copy = cpu_copy,
    .fill = cpu_fill,
    .add = cpu_add,
    .mul = cpu_mul,
    .scale = cpu_scale,
    .acc = cpu_acc,
    .acc_mul = cpu_acc_mul,
    .acc_scale = cpu_acc_scale,
    .cast = ag_cpu_cast,
    .acc_cast = ag_cpu_acc_cast,
    .linear_fwd = ag_cpu_linear_fwd,
    .linear_bwd = ag_cpu_linear_bwd,
    .rmsnorm_fwd = ag_cpu_rmsnorm_fwd,
    .rmsnorm_bwd = ag_cpu_rmsnorm_bwd,
    .rmsnorm_rstd_size = cpu_rstd_size,
    .softmax_fwd = ag_cpu_softmax_fwd,
    .softmax_bwd = ag_cpu_softmax_bwd,
    .swiglu_fwd = ag_cpu_swiglu_fwd,
    .swiglu_bwd = ag_cpu_swiglu_bwd,
    .embedding_fwd = ag_cpu_embedding_fwd,
    .embedding_bwd = ag_cpu_embedding_bwd,
    .dropout_fwd = ag_cpu_dropout_fwd,
    .dropout_bwd = ag_cpu_dropout_bwd,
    .rope_fwd = ag_cpu_rope_fwd,
    .rope_bwd = ag_cpu_rope_bwd,
    .router_fwd = ag_cpu_router_fwd,
    .router_bwd = ag_cpu_router_bwd,
    .linear_q_fwd = ag_cpu_linear_q_fwd,
    .linear_q_bwd = ag_cpu_linear_q_bwd,
    .experts_fwd = ag_cpu_experts_fwd,
    .experts_bwd = ag_cpu_experts_bwd,
    .ce_forward = ag_cpu_ce_forward,
    .ce_backward = ag_cpu_ce_backward,
    // the CPU optimizer is train/optim.c
    .adamw_multi = NULL,
    .sumsq_multi = NULL,
    .scale_multi = NULL,
};

// ---- fused optimizer steps (dispatch) ------------------------------------------------------

static const ag_backend *multi_backend(const char *op, ag_tensor *const *ts, int n) {
    if (n < 1 || !ts[0]) {
        molt_err(MOLT_EARG, "%s: %s", op, n < 1 ? "no tensors" : "tensor 0 is NULL");
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        char b[80];
        if (!ts[i] || ts[i]->dtype != AG_F32 || ts[i]->device != ts[0]->device) {
            if (ts[i])
                ag_shape_str(ts[i], b, sizeof b);
            molt_err(MOLT_EARG, "%s: tensor %d is %s, expected f32 on %s like tensor 0", op, i,
                     ts[i] ? b : "NULL", ag_device_name(ts[0]->device));
            return NULL;
        }
    }
    return ag_backend_get(op, ts[0]->device);
}

molt_status ag_adamw_multi(ag_ctx *c, const ag_adamw_item *items, int n) {
    if (n == 0)
        return MOLT_OK;
    if (n < 0 || !items)
        return molt_err(MOLT_EARG, "adamw_multi: %d items", n);
    for (int i = 0; i < n; i++) {
        const ag_adamw_item *it = &items[i];
        ag_tensor *ts[4] = {it->p, (ag_tensor *)it->g, it->m, it->v};
        if (!multi_backend("adamw_multi", ts, 4))
            return molt_err_wrap(MOLT_EARG, "item %d", i);
        if (it->g->numel != it->p->numel || it->m->numel != it->p->numel ||
            it->v->numel != it->p->numel)
            return molt_err(MOLT_EARG, "adamw_multi: item %d: p, g, m, v differ in size", i);
        if (it->p->device != items[0].p->device)
            return molt_err(MOLT_EARG, "adamw_multi: item %d is on %s, item 0 on %s", i,
                            ag_device_name(it->p->device), ag_device_name(items[0].p->device));
    }
    const ag_backend *be = ag_backend_get("adamw_multi", items[0].p->device);
    if (!be)
        return MOLT_EDEVICE;
    return AG_BE_CALL(be, adamw_multi, "adamw_multi", c, items, n);
}

molt_status ag_sumsq_multi(ag_ctx *c, ag_tensor *const *ts, int n, double *out) {
    if (n == 0)
        return MOLT_OK;
    const ag_backend *be = multi_backend("sumsq_multi", ts, n);
    if (!be)
        return MOLT_EARG;
    return AG_BE_CALL(be, sumsq_multi, "sumsq_multi", c, ts, n, out);
}

molt_status ag_scale_multi(ag_ctx *c, ag_tensor *const *ts, int n, double s) {
    if (n == 0)
        return MOLT_OK;
    const ag_backend *be = multi_backend("scale_multi", ts, n);
    if (!be)
        return MOLT_EARG;
    return AG_BE_CALL(be, scale_multi, "scale_multi", c, ts, n, s);
}
