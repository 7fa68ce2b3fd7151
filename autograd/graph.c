// autograd/graph.c: the context, the tape, the op table and the backward walk.
#include "internal.h"

#include <signal.h>

#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const op_names[] = {
    "add", "mul", "scale", "sum", "cast", "reshape", "transpose", "slice", "concat",
    "expand", "dropout", "embedding", "linear", "rmsnorm", "softmax", "swiglu", "rope",
    "attention", "moe_router", "moe_experts", "cross_entropy_linear", "linear_q",
    "moe_experts_q", "moe_experts_lora", "moe_experts_lora_q", "checkpoint", "lora_multi",
    "moe_experts_multi", "ep_dispatch", "ep_combine", "linear_bx",
};
static const ag_backward_fn op_backward[] = {
    ag_backward_add, ag_backward_mul, ag_backward_scale, ag_backward_sum,
    ag_backward_cast, ag_backward_reshape, ag_backward_transpose, ag_backward_slice,
    ag_backward_concat, ag_backward_expand, ag_backward_dropout, ag_backward_embedding,
    ag_backward_linear, ag_backward_rmsnorm, ag_backward_softmax, ag_backward_swiglu,
    ag_backward_rope, ag_backward_attention, ag_backward_moe_router,
    ag_backward_moe_experts, ag_backward_ce_linear, ag_backward_linear_q,
    ag_backward_moe_experts_q, ag_backward_moe_experts_lora, ag_backward_moe_experts_lora_q,
    ag_backward_checkpoint, ag_backward_lora_multi, ag_backward_moe_experts_multi,
    ag_backward_ep_dispatch, ag_backward_ep_combine, ag_backward_linear_bx,
};
_Static_assert(AG_OP_COUNT == AG_OP_COUNT_EXPECTED, "update the op tables for the new op");
_Static_assert(sizeof(op_names) / sizeof(op_names[0]) == AG_OP_COUNT, "op_names");
_Static_assert(sizeof(op_backward) / sizeof(op_backward[0]) == AG_OP_COUNT, "op_backward");

const char *ag_op_name(ag_op op) { return (unsigned)op < AG_OP_COUNT ? op_names[op] : "?"; }

static _Thread_local bool use_reference;
void ag_set_reference_kernels(bool on) { use_reference = on; }
bool ag_reference_kernels(void) { return use_reference; }

// ---- profile ------------------------------------------------------------------------------

struct ag_profile {
    double last;                 // time of the previous recorded node (or of the reset)
    double fwd[AG_OP_COUNT], bwd[AG_OP_COUNT];
    int64_t n_fwd[AG_OP_COUNT], n_bwd[AG_OP_COUNT];
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void profile_fwd(ag_ctx *c, ag_op op) {
    double t = now_s();
    c->prof->fwd[op] += t - c->prof->last;
    c->prof->n_fwd[op]++;
    c->prof->last = t;
}

void ag_profile_print(const ag_ctx *c, FILE *f) {
    const struct ag_profile *p = c->prof;
    int64_t calls = 0;
    for (int i = 0; p && i < AG_OP_COUNT; i++)
        calls += p->n_fwd[i] + p->n_bwd[i];
    if (!p || calls == 0) // nothing was recorded (inference): nothing to show
        return;
    int order[AG_OP_COUNT];
    double total = 0;
    for (int i = 0; i < AG_OP_COUNT; i++) {
        order[i] = i;
        total += p->fwd[i] + (i == AG_OP_CHECKPOINT ? 0 : p->bwd[i]);
    }
    for (int i = 1; i < AG_OP_COUNT; i++) // insertion sort by total time, largest first
        for (int j = i; j > 0 && p->fwd[order[j]] + p->bwd[order[j]] >
                                     p->fwd[order[j - 1]] + p->bwd[order[j - 1]]; j--) {
            int t = order[j];
            order[j] = order[j - 1];
            order[j - 1] = t;
        }
    fprintf(f, "profile: %-22s %10s %10s %8s %8s %6s\n", "op", "forward_s", "backward_s",
            "calls", "bwd", "share");
    for (int i = 0; i < AG_OP_COUNT; i++) {
        int o = order[i];
        double t = p->fwd[o] + p->bwd[o];
        if (p->n_fwd[o] == 0 && p->n_bwd[o] == 0)
            continue;
        fprintf(f, "profile: %-22s %10.3f %10.3f %8lld %8lld %5.1f%%\n", op_names[o], p->fwd[o],
                p->bwd[o], (long long)p->n_fwd[o], (long long)p->n_bwd[o],
                total > 0 ? 100 * t / total : 0.0);
    }
    fprintf(f, "profile: %-22s %21.3f\n", "total", total);
}

void ag_ctx_borrow_profile(ag_ctx *sub, const ag_ctx *parent) {
    if (sub->prof && !sub->prof_borrowed)
        molt_free(sub->prof);
    sub->prof = parent->prof;
    sub->prof_borrowed = parent->prof != NULL;
}

molt_status ag_ctx_init(ag_ctx *c) {
    memset(c, 0, sizeof *c);
    c->grad_mode = true;
    ag_arena_init(&c->act, "activations", (size_t)4 << 20);
    const char *e = getenv("MOLT_PROFILE");
    if (e && *e && strcmp(e, "0") != 0) {
        c->prof = molt_calloc(1, sizeof *c->prof);
        if (!c->prof)
            return molt_err(MOLT_ENOMEM, "MOLT_PROFILE: out of memory for the profile");
        c->prof->last = now_s();
    }
    return ag_blas_init();
}

void ag_ctx_set_grad(ag_ctx *c, bool on) { c->grad_mode = on; }

static void node_release(ag_ctx *c, ag_node *n) {
    if (n->saved_dev) { // the device arena's, given back at the step's reset
        n->saved = NULL;
        n->saved_dev = false;
    } else if (n->saved) {
        molt_free(n->saved);
        c->saved_bytes -= n->saved_bytes;
        n->saved = NULL;
        n->saved_bytes = 0;
    }
}

static void tape_drop(ag_ctx *c) {
    for (int i = 0; i < c->n_tape; i++) {
        node_release(c, c->tape[i]);
        molt_free(c->tape[i]);
    }
    c->n_tape = 0;
}

void ag_ctx_step_reset(ag_ctx *c) {
    tape_drop(c);
    ag_arena_reset(&c->act);
    if (c->dev_act.device != AG_CPU)
        ag_arena_reset(&c->dev_act);
    if (c->prof)
        c->prof->last = now_s();
}

void ag_ctx_free(ag_ctx *c) {
    if (c->prof && !c->prof_borrowed) {
        ag_profile_print(c, stderr);
        molt_free(c->prof);
    }
    tape_drop(c);
    molt_free(c->tape);
    ag_arena_free(&c->act);
    ag_arena_free(&c->dev_act);
    memset(c, 0, sizeof *c);
}

molt_status ag_ctx_use_device(ag_ctx *c, ag_device dev, size_t bytes) {
    if (dev == AG_CPU)
        return MOLT_OK;
    tape_drop(c);
    ag_arena_free(&c->dev_act);
    memset(&c->dev_act, 0, sizeof c->dev_act);
    return ag_arena_init_device(&c->dev_act, "device activations", dev, bytes);
}

ag_arena *ag_ctx_arena(ag_ctx *c, ag_device dev) {
    if (dev == AG_CPU)
        return &c->act;
    if (c->dev_act.device != dev) {
        const char *e = getenv("MOLT_DEVICE_ACT_MIB");
        long mib = e && *e ? strtol(e, NULL, 10) : 1024;
        if (mib < 1)
            mib = 1024;
        if (ag_ctx_use_device(c, dev, (size_t)mib << 20) != MOLT_OK)
            return NULL;
    }
    return &c->dev_act;
}

ag_tensor *ag_out_new(ag_ctx *c, ag_dtype dt, int ndim, const int64_t *shape) {
    return ag_tensor_new(&c->act, dt, ndim, shape);
}

ag_tensor *ag_out_new_on(ag_ctx *c, ag_device dev, ag_dtype dt, int ndim,
                         const int64_t *shape) {
    ag_arena *a = ag_ctx_arena(c, dev);
    return a ? ag_tensor_new(a, dt, ndim, shape) : NULL;
}

ag_tensor *ag_out_new_uninit_on(ag_ctx *c, ag_device dev, ag_dtype dt, int ndim,
                                const int64_t *shape) {
    ag_arena *a = ag_ctx_arena(c, dev);
    return a ? ag_tensor_new_uninit(a, dt, ndim, shape) : NULL;
}

bool ag_should_record(const ag_ctx *c, int n, ag_tensor *const *ins) {
    if (!c->grad_mode)
        return false;
    for (int i = 0; i < n; i++)
        if (ins[i] && ins[i]->requires_grad)
            return true;
    return false;
}

ag_node *ag_record(ag_ctx *c, ag_op op, ag_tensor *out, int n, ag_tensor *const *ins) {
    if (c->n_tape == c->cap_tape) {
        int cap = c->cap_tape ? 2 * c->cap_tape : 256;
        ag_node **t = molt_realloc(c->tape, (size_t)cap * sizeof *t);
        if (!t) {
            molt_err(MOLT_ENOMEM, "%s: out of memory growing the tape", ag_op_name(op));
            return NULL;
        }
        c->tape = t;
        c->cap_tape = cap;
    }
    ag_node *nd = molt_calloc(1, sizeof *nd + (size_t)n * sizeof(ag_tensor *));
    if (!nd) {
        molt_err(MOLT_ENOMEM, "%s: out of memory recording a node", ag_op_name(op));
        return NULL;
    }
    nd->op = op;
    nd->out = out;
    nd->n_in = n;
    for (int i = 0; i < n; i++)
        nd->in[i] = ins[i];
    out->requires_grad = true;
    c->tape[c->n_tape++] = nd;
    if (c->prof)
        profile_fwd(c, op);
    return nd;
}

void *ag_node_save(ag_ctx *c, ag_node *n, size_t bytes) {
    void *p = molt_calloc(1, bytes);
    if (!p) {
        molt_err(MOLT_ENOMEM, "%s: out of memory saving %zu bytes for backward",
                 ag_op_name(n->op), bytes);
        return NULL;
    }
    MOLT_ASSERT(n->saved == NULL);
    n->saved = p;
    n->saved_bytes = bytes;
    c->saved_bytes += bytes;
    if (c->saved_bytes > c->saved_peak)
        c->saved_peak = c->saved_bytes;
    return p;
}

void *ag_node_save_on(ag_ctx *c, ag_node *n, ag_device dev, size_t bytes) {
    if (dev == AG_CPU)
        return ag_node_save(c, n, bytes);
    ag_arena *a = ag_ctx_arena(c, dev);
    void *p = a ? ag_arena_alloc(a, bytes) : NULL;
    if (!p)
        return NULL;
    MOLT_ASSERT(n->saved == NULL);
    n->saved = p;
    n->saved_dev = true;
    return p;
}

ag_tensor *ag_grad_of(ag_tensor *t, molt_status *st) {
    if (!t || !t->requires_grad)
        return NULL;
    ag_tensor *g = ag_grad_ensure(t);
    if (!g)
        *st = MOLT_ENOMEM;
    return g;
}

molt_status ag_backward(ag_ctx *c, ag_tensor *loss) {
    if (!loss)
        return molt_err(MOLT_EARG, "backward: loss is NULL");
    if (loss->numel != 1) {
        char b[64];
        return molt_err(MOLT_EARG, "backward: loss must have one element, got %s",
                        ag_shape_str(loss, b, sizeof b));
    }
    if (!loss->requires_grad)
        return molt_err(MOLT_EARG, "backward: loss does not depend on any tensor that "
                                   "requires grad (or grad mode was off)");
    ag_tensor *g = ag_grad_ensure(loss);
    if (!g)
        return MOLT_ENOMEM;
    ag_set(g, 0, 1.0);
    return ag_tape_backward(c);
}

static volatile sig_atomic_t interrupt_sig;
void ag_interrupt_set(int sig) { interrupt_sig = sig ? sig : -1; }
int ag_interrupt_pending(void) { return interrupt_sig; }
void ag_interrupt_clear(void) { interrupt_sig = 0; }

molt_status ag_tape_backward(ag_ctx *c) {
    for (int i = c->n_tape - 1; i >= 0; i--) {
        if (interrupt_sig)
            return molt_err(MOLT_EINTERRUPTED, "backward: interrupted (signal %d)",
                            (int)interrupt_sig);
        ag_node *n = c->tape[i];
        if (n->out->grad) {
            double t0 = c->prof ? now_s() : 0;
            molt_status st = op_backward[n->op](c, n);
            if (c->prof) {
                c->prof->bwd[n->op] += now_s() - t0;
                c->prof->n_bwd[n->op]++;
            }
            if (st != MOLT_OK)
                return molt_err_wrap(st, "backward of %s", ag_op_name(n->op));
            MOLT_ASSERT(n->out->grad->numel == n->out->numel);
        }
        node_release(c, n);
    }
    tape_drop(c);
    return MOLT_OK;
}

// ---- checks shared by the builders ----------------------------------------------------

molt_status ag_check_not_null(const char *op, const char *what, const ag_tensor *t) {
    return t ? MOLT_OK : molt_err(MOLT_EARG, "%s: %s is NULL", op, what);
}

molt_status ag_check_cpu_float(const char *op, const char *what, const ag_tensor *t) {
    MOLT_TRY(ag_check_not_null(op, what, t));
    char b[80];
    if (t->dtype != AG_F32 && t->dtype != AG_F64)
        return molt_err(MOLT_EARG, "%s: %s is %s, expected f32 or f64 (cast bf16/f16 first)",
                        op, what, ag_shape_str(t, b, sizeof b));
    if (t->device != AG_CPU)
        return molt_err(MOLT_EUNSUPPORTED, "%s: %s lives on a CUDA device; this op runs on "
                        "the CPU only", op, what);
    return MOLT_OK;
}

molt_status ag_check_i32(const char *op, const char *what, const ag_tensor *t) {
    MOLT_TRY(ag_check_not_null(op, what, t));
    char b[80];
    if (t->dtype != AG_I32)
        return molt_err(MOLT_EARG, "%s: %s is %s, expected i32", op, what,
                        ag_shape_str(t, b, sizeof b));
    if (t->device != AG_CPU)
        return molt_err(MOLT_EUNSUPPORTED, "%s: %s lives on a CUDA device", op, what);
    return MOLT_OK;
}

molt_status ag_check_same_dtype(const char *op, const char *wa, const ag_tensor *a,
                                const char *wb, const ag_tensor *b) {
    if (a->dtype == b->dtype)
        return MOLT_OK;
    char ba[80], bb[80];
    return molt_err(MOLT_EARG, "%s: %s %s and %s %s differ in dtype", op, wa,
                    ag_shape_str(a, ba, sizeof ba), wb, ag_shape_str(b, bb, sizeof bb));
}

molt_status ag_check_ndim(const char *op, const char *what, const ag_tensor *t, int lo, int hi) {
    if (t->ndim >= lo && t->ndim <= hi)
        return MOLT_OK;
    char b[80];
    if (lo == hi)
        return molt_err(MOLT_EARG, "%s: %s is %s, expected %d dims", op, what,
                        ag_shape_str(t, b, sizeof b), lo);
    return molt_err(MOLT_EARG, "%s: %s is %s, expected %d..%d dims", op, what,
                    ag_shape_str(t, b, sizeof b), lo, hi);
}

int64_t ag_rows(const ag_tensor *t) { return t->numel / t->shape[t->ndim - 1]; }
int64_t ag_cols(const ag_tensor *t) { return t->shape[t->ndim - 1]; }
