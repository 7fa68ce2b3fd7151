// autograd/ops_elem.c: add, mul, scale, sum (builders and backward rules). The pattern
// every op file follows: check operands, allocate the result, run the kernel for the dtype,
// record a node only when needed; backward accumulates into the inputs' grads.
#include "internal.h"
#include "cpu/kernels.h"

static molt_status check_binary(const char *op, const ag_tensor *a, const ag_tensor *b) {
    MOLT_TRY(ag_check_cpu_float(op, "a", a));
    MOLT_TRY(ag_check_cpu_float(op, "b", b));
    MOLT_TRY(ag_check_same_dtype(op, "a", a, "b", b));
    if (!ag_same_shape(a, b)) {
        char ba[80], bb[80];
        return molt_err(MOLT_EARG, "%s: shapes differ: a %s, b %s", op,
                        ag_shape_str(a, ba, sizeof ba), ag_shape_str(b, bb, sizeof bb));
    }
    return MOLT_OK;
}

static ag_tensor *binary(ag_ctx *c, ag_op op, ag_tensor *a, ag_tensor *b) {
    if (check_binary(ag_op_name(op), a, b) != MOLT_OK)
        return NULL;
    ag_tensor *y = ag_out_new(c, a->dtype, a->ndim, a->shape);
    if (!y)
        return NULL;
    bool f32 = a->dtype == AG_F32;
    if (op == AG_OP_ADD) {
        if (f32) add_fwd_f32(y->data, a->data, b->data, a->numel);
        else add_fwd_f64(y->data, a->data, b->data, a->numel);
    } else {
        if (f32) mul_fwd_f32(y->data, a->data, b->data, a->numel);
        else mul_fwd_f64(y->data, a->data, b->data, a->numel);
    }
    ag_tensor *ins[2] = {a, b};
    if (ag_should_record(c, 2, ins) && !ag_record(c, op, y, 2, ins))
        return NULL;
    return y;
}

ag_tensor *ag_add(ag_ctx *c, ag_tensor *a, ag_tensor *b) { return binary(c, AG_OP_ADD, a, b); }
ag_tensor *ag_mul(ag_ctx *c, ag_tensor *a, ag_tensor *b) { return binary(c, AG_OP_MUL, a, b); }

// g += dy (times `other` when given)
static void acc_into(ag_tensor *g, const ag_tensor *dy, const ag_tensor *other) {
    if (g->dtype == AG_F32) {
        if (other) acc_mul_f32(g->data, dy->data, other->data, g->numel);
        else acc_f32(g->data, dy->data, g->numel);
    } else {
        if (other) acc_mul_f64(g->data, dy->data, other->data, g->numel);
        else acc_f64(g->data, dy->data, g->numel);
    }
}

molt_status ag_backward_add(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    for (int i = 0; i < 2; i++) {
        ag_tensor *g = ag_grad_of(n->in[i], &st);
        if (st != MOLT_OK)
            return st;
        if (g)
            acc_into(g, n->out->grad, NULL);
    }
    return MOLT_OK;
}

molt_status ag_backward_mul(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    for (int i = 0; i < 2; i++) {
        ag_tensor *g = ag_grad_of(n->in[i], &st);
        if (st != MOLT_OK)
            return st;
        if (g)
            acc_into(g, n->out->grad, n->in[1 - i]);
    }
    return MOLT_OK;
}

ag_tensor *ag_scale(ag_ctx *c, ag_tensor *a, double s) {
    if (ag_check_cpu_float("scale", "a", a) != MOLT_OK)
        return NULL;
    ag_tensor *y = ag_out_new(c, a->dtype, a->ndim, a->shape);
    if (!y)
        return NULL;
    if (a->dtype == AG_F32) scale_fwd_f32(y->data, a->data, (float)s, a->numel);
    else scale_fwd_f64(y->data, a->data, s, a->numel);
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
    if (g && g->dtype == AG_F32) acc_scale_f32(g->data, dy->data, (float)n->f[0], g->numel);
    else if (g) acc_scale_f64(g->data, dy->data, n->f[0], g->numel);
    return st;
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
