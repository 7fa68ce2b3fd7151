// autograd/ops_elem.c: add, mul, scale, sum (builders and backward rules). The pattern
// every device-aware op file follows: check operands, pick the backend of their device,
// allocate the result there, run the backend's kernel, record a node only when needed;
// backward accumulates into the inputs' grads through the same backend. sum runs on the CPU
// only.
#include "backend.h"
#include "cpu/kernels.h"

static const char *const AB[2] = {"a", "b"};

static molt_status check_binary(const char *op, ag_tensor *a, ag_tensor *b,
                                const ag_backend **be) {
    MOLT_TRY(ag_check_float(op, "a", a));
    MOLT_TRY(ag_check_float(op, "b", b));
    ag_tensor *ts[2] = {a, b};
    MOLT_TRY(ag_backend_pick(op, 2, ts, AB, be));
    MOLT_TRY(ag_check_same_dtype(op, "a", a, "b", b));
    if (!ag_same_shape(a, b)) {
        char ba[80], bb[80];
        return molt_err(MOLT_EARG, "%s: shapes differ: a %s, b %s", op,
                        ag_shape_str(a, ba, sizeof ba), ag_shape_str(b, bb, sizeof bb));
    }
    return MOLT_OK;
}

static ag_tensor *binary(ag_ctx *c, ag_op op, ag_tensor *a, ag_tensor *b) {
    const ag_backend *be;
    if (check_binary(ag_op_name(op), a, b, &be) != MOLT_OK)
        return NULL;
    // every backend's add and mul write y in full
    ag_tensor *y = ag_out_new_uninit_on(c, a->device, a->dtype, a->ndim, a->shape);
    if (!y)
        return NULL;
    molt_status st = op == AG_OP_ADD ? AG_BE_CALL(be, add, "add", y, a, b)
                                     : AG_BE_CALL(be, mul, "mul", y, a, b);
    if (st != MOLT_OK)
        return NULL;
    ag_tensor *ins[2] = {a, b};
    if (ag_should_record(c, 2, ins) && !ag_record(c, op, y, 2, ins))
        return NULL;
    return y;
}

ag_tensor *ag_add(ag_ctx *c, ag_tensor *a, ag_tensor *b) { return binary(c, AG_OP_ADD, a, b); }
ag_tensor *ag_mul(ag_ctx *c, ag_tensor *a, ag_tensor *b) { return binary(c, AG_OP_MUL, a, b); }

molt_status ag_backward_add(ag_ctx *c, ag_node *n) {
    (void)c;
    const ag_backend *be = ag_backend_node(n);
    molt_status st = MOLT_OK;
    for (int i = 0; i < 2; i++) {
        ag_tensor *g = ag_grad_of(n->in[i], &st);
        if (st != MOLT_OK)
            return st;
        if (g)
            MOLT_TRY(AG_BE_CALL(be, acc, "add backward", g, n->out->grad));
    }
    return MOLT_OK;
}

molt_status ag_backward_mul(ag_ctx *c, ag_node *n) {
    (void)c;
    const ag_backend *be = ag_backend_node(n);
    molt_status st = MOLT_OK;
    for (int i = 0; i < 2; i++) {
        ag_tensor *g = ag_grad_of(n->in[i], &st);
        if (st != MOLT_OK)
            return st;
        if (g)
            MOLT_TRY(AG_BE_CALL(be, acc_mul, "mul backward", g, n->out->grad, n->in[1 - i]));
    }
    return MOLT_OK;
}

ag_tensor *ag_scale(ag_ctx *c, ag_tensor *a, double s) {
    const ag_backend *be;
    static const char *const A[1] = {"a"};
    if (ag_check_float("scale", "a", a) != MOLT_OK ||
        ag_backend_pick("scale", 1, &a, A, &be) != MOLT_OK)
        return NULL;
    ag_tensor *y = ag_out_new_on(c, a->device, a->dtype, a->ndim, a->shape);
    if (!y || AG_BE_CALL(be, scale, "scale", y, a, s) != MOLT_OK)
        return NULL;
    if (ag_should_record(c, 1, &a)) {
        ag_node *n = ag_record(c, AG_OP_SCALE, y, 1, &a);
        if (!n)
            return NULL;
        n->f[0] = s;
    }
    return y;
}

molt_status ag_backward_scale(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *g = ag_grad_of(n->in[0], &st), *dy = n->out->grad;
    if (!g)
        return st;
    return AG_BE_CALL(ag_backend_node(n), acc_scale, "scale backward", g, dy, n->f[0]);
}

ag_tensor *ag_sum(ag_ctx *c, ag_tensor *a) {
    if (ag_check_cpu_float("sum", "a", a) != MOLT_OK)
        return NULL;
    int64_t one = 1;
    ag_tensor *y = ag_out_new(c, a->dtype, 1, &one);
    if (!y)
        return NULL;
    if (a->dtype == AG_F32) ((float *)y->data)[0] = sum_fwd_f32(a->data, a->numel);
    else ((double *)y->data)[0] = sum_fwd_f64(a->data, a->numel);
    if (ag_should_record(c, 1, &a) && !ag_record(c, AG_OP_SUM, y, 1, &a))
        return NULL;
    return y;
}

molt_status ag_backward_sum(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *g = ag_grad_of(n->in[0], &st);
    if (!g)
        return st;
    double dy = ag_get(n->out->grad, 0);
    for (int64_t i = 0; i < g->numel; i++)
        ag_set(g, i, ag_get(g, i) + dy);
    return MOLT_OK;
}
