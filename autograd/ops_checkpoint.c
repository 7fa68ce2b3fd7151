// autograd/ops_checkpoint.c: activation checkpointing. ag_checkpoint runs a caller's
// sub-graph in a scratch context, keeps only its output and records one node holding the
// inputs; backward re-runs the sub-graph with recording on (in a fresh scratch context) and
// backpropagates the incoming gradient through it into the inputs and into every trainable
// tensor the sub-graph captured. Memory of the sub-graph's activations and saved state is
// thereby traded for a second forward. Not here: deciding what to checkpoint (the model does).
#include "internal.h"

#include <string.h>

#define CKPT_OP "checkpoint"
#define CKPT_MAX_IN 64

// What the node keeps: how to rebuild the sub-graph and the generator states it started at.
typedef struct {
    ag_checkpoint_fn fn;
    void *user;
    int n_rng;
    ag_rng *rngs[AG_CKPT_MAX_RNG];
    ag_rng start[AG_CKPT_MAX_RNG]; // rngs[i] as it was when the forward began
} ckpt_saved;

static molt_status check_args(ag_checkpoint_fn fn, int n_in, ag_tensor *const *inputs,
                              int n_rng, ag_rng *const *rngs) {
    if (!fn)
        return molt_err(MOLT_EARG, CKPT_OP ": fn is NULL");
    if (n_in < 0 || n_in > CKPT_MAX_IN)
        return molt_err(MOLT_EARG, CKPT_OP ": n_in is %d, expected 0..%d", n_in, CKPT_MAX_IN);
    if (n_in > 0 && !inputs)
        return molt_err(MOLT_EARG, CKPT_OP ": inputs is NULL with n_in %d", n_in);
    if (n_rng < 0 || n_rng > AG_CKPT_MAX_RNG)
        return molt_err(MOLT_EARG, CKPT_OP ": n_rng is %d, expected 0..%d", n_rng,
                        AG_CKPT_MAX_RNG);
    for (int i = 0; i < n_rng; i++)
        if (!rngs || !rngs[i])
            return molt_err(MOLT_EARG, CKPT_OP ": rng %d is NULL", i);
    return MOLT_OK;
}

// The scratch context's high-water marks count toward the caller's: its activations and
// saved state exist on top of what the caller holds at that moment.
static void fold_peaks(ag_ctx *c, const ag_ctx *sub) {
    size_t act = c->act.used + sub->act.peak;
    if (act > c->act.peak)
        c->act.peak = act;
    size_t saved = c->saved_bytes + sub->saved_peak;
    if (saved > c->saved_peak)
        c->saved_peak = saved;
}

// Checks that fn's result y is a tensor fn made in `sub` (not an input or captured tensor,
// whose copy would silently detach it) and lives on the CPU.
static molt_status check_result(const ag_ctx *sub, const ag_tensor *y, const char *when) {
    if (!y)
        return molt_err_wrap(MOLT_EARG, CKPT_OP ": fn failed during the %s", when);
    if (y->arena != &sub->act)
        return molt_err(MOLT_EARG, CKPT_OP ": fn returned a tensor it did not create (one of "
                        "its inputs or a captured tensor) during the %s; return a new result",
                        when);
    if (y->device != AG_CPU)
        return molt_err(MOLT_EUNSUPPORTED, CKPT_OP ": fn returned a CUDA tensor; checkpointing "
                        "runs on the CPU only");
    return MOLT_OK;
}

// Forward with grad mode on: the sub-graph is built (and recorded) in a scratch context that
// is dropped as soon as its output is copied out, so nothing of it outlives this call.
static ag_tensor *forward_recorded(ag_ctx *c, ag_checkpoint_fn fn, void *user, int n_in,
                                   ag_tensor *const *inputs, int n_rng, ag_rng *const *rngs) {
    ckpt_saved s = {.fn = fn, .user = user, .n_rng = n_rng};
    for (int i = 0; i < n_rng; i++) {
        s.rngs[i] = rngs[i];
        s.start[i] = *rngs[i];
    }
    ag_ctx sub;
    ag_ctx_init(&sub);
    ag_ctx_borrow_profile(&sub, c);
    sub.row_offset = c->row_offset;
    ag_tensor *y = fn(&sub, inputs, user);
    ag_tensor *out = NULL;
    if (check_result(&sub, y, "forward") != MOLT_OK)
        goto done;
    out = ag_out_new(c, y->dtype, y->ndim, y->shape);
    if (!out)
        goto done;
    memcpy(out->data, y->data, (size_t)y->numel * ag_dtype_size(y->dtype));
    // nothing inside needed a gradient: a constant as far as the caller's tape goes
    if (y->requires_grad) {
        ag_node *n = ag_record(c, AG_OP_CHECKPOINT, out, n_in, inputs);
        ckpt_saved *keep = n ? ag_node_save(c, n, sizeof *keep) : NULL;
        if (!keep)
            out = NULL;
        else
            *keep = s;
    }
done:
    fold_peaks(c, &sub);
    ag_ctx_free(&sub);
    return out;
}

ag_tensor *ag_checkpoint(ag_ctx *c, ag_checkpoint_fn fn, void *user, int n_in,
                         ag_tensor *const *inputs, int n_rng, ag_rng *const *rngs) {
    if (check_args(fn, n_in, inputs, n_rng, rngs) != MOLT_OK)
        return NULL;
    if (!c->grad_mode) {
        ag_tensor *y = fn(c, inputs, user);
        if (!y)
            molt_err_wrap(MOLT_EARG, CKPT_OP ": fn failed");
        return y;
    }
    return forward_recorded(c, fn, user, n_in, inputs, n_rng, rngs);
}

// Re-runs fn in `sub` with every generator put back where the forward found it; the
// generators are then returned to their current states (later draws stay unaffected).
static ag_tensor *recompute(ag_ctx *sub, ag_node *n, const ckpt_saved *s) {
    ag_rng now[AG_CKPT_MAX_RNG];
    for (int i = 0; i < s->n_rng; i++) {
        now[i] = *s->rngs[i];
        *s->rngs[i] = s->start[i];
    }
    ag_tensor *y = s->fn(sub, n->in, s->user);
    for (int i = 0; i < s->n_rng; i++)
        *s->rngs[i] = now[i];
    return y;
}

static molt_status backward_in(ag_ctx *sub, ag_node *n, const ckpt_saved *s) {
    ag_tensor *y = recompute(sub, n, s);
    MOLT_TRY(check_result(sub, y, "recomputation"));
    if (y->dtype != n->out->dtype || !ag_same_shape(y, n->out)) {
        char a[80], b[80];
        return molt_err(MOLT_EARG, CKPT_OP ": recomputation gave %s, the forward gave %s (fn "
                        "must be deterministic)", ag_shape_str(y, a, sizeof a),
                        ag_shape_str(n->out, b, sizeof b));
    }
    if (!y->requires_grad)
        return molt_err(MOLT_EARG, CKPT_OP ": recomputation does not depend on any tensor "
                        "that requires grad, the forward did (fn must be deterministic)");
    ag_tensor *g = ag_grad_ensure(y);
    if (!g)
        return MOLT_ENOMEM;
    memcpy(g->data, n->out->grad->data, (size_t)g->numel * ag_dtype_size(g->dtype));
    return ag_tape_backward(sub);
}

molt_status ag_backward_checkpoint(ag_ctx *c, ag_node *n) {
    const ckpt_saved *s = n->saved;
    MOLT_ASSERT(s != NULL);
    ag_ctx sub;
    ag_ctx_init(&sub);
    ag_ctx_borrow_profile(&sub, c);
    sub.row_offset = c->row_offset;
    molt_status st = backward_in(&sub, n, s);
    fold_peaks(c, &sub);
    ag_ctx_free(&sub);
    return st;
}
