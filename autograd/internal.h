// autograd/internal.h: what op files share inside autograd/ (nodes, the op table, builder
// helpers). Not part of the public API: nothing outside autograd/ includes it, except the
// unit tests of autograd itself.
#ifndef MOLT_AUTOGRAD_INTERNAL_H
#define MOLT_AUTOGRAD_INTERNAL_H

#include "autograd.h"

// Every op has a name, a builder (in its ops_*.c file), CPU kernels (cpu/) and a backward
// rule. Adding an op means adding it here, to op_names and op_backward in graph.c; the
// static_assert there breaks the build until every table knows it.
typedef enum {
    AG_OP_ADD,
    AG_OP_MUL,
    AG_OP_SCALE,
    AG_OP_SUM,
    AG_OP_CAST,
    AG_OP_RESHAPE,
    AG_OP_TRANSPOSE,
    AG_OP_SLICE,
    AG_OP_CONCAT,
    AG_OP_EXPAND,
    AG_OP_DROPOUT,
    AG_OP_EMBEDDING,
    AG_OP_LINEAR,
    AG_OP_RMSNORM,
    AG_OP_SOFTMAX,
    AG_OP_SWIGLU,
    AG_OP_ROPE,
    AG_OP_ATTENTION,
    AG_OP_MOE_ROUTER,
    AG_OP_MOE_EXPERTS,
    AG_OP_CE_LINEAR,
    AG_OP_LINEAR_Q,
    AG_OP_MOE_EXPERTS_Q,
    AG_OP_MOE_EXPERTS_LORA,
    AG_OP_MOE_EXPERTS_LORA_Q,
    AG_OP_CHECKPOINT,
    AG_OP_LORA_MULTI,
    AG_OP_MOE_EXPERTS_MULTI,
    AG_OP_EP_DISPATCH,
    AG_OP_EP_COMBINE,
    AG_OP_LINEAR_BX,
    AG_OP_COUNT
} ag_op;
#define AG_OP_COUNT_EXPECTED 31

// A recorded op. Attributes go in f[]/i[]/ptr; state kept for backward in `saved`
// (allocated by ag_node_save, released right after the node's backward runs or when the
// tape is dropped).
struct ag_node {
    ag_op op;
    ag_tensor *out;
    ag_tensor *aux;       // optional second output that is not differentiated (router idx)
    double f[4];
    int64_t i[8];
    const void *ptr;      // attribute owned elsewhere that outlives the tape (rope table)
    void *saved;
    size_t saved_bytes;
    bool saved_dev;       // saved lives in the context's device arena (not freed per node)
    int n_in;
    ag_tensor *in[];      // n_in inputs (NULL allowed for optional operands)
};

typedef molt_status (*ag_backward_fn)(ag_ctx *c, ag_node *n);

const char *ag_op_name(ag_op op);

// Builder helpers -------------------------------------------------------------------------
// New result tensor in the activation arena (zeroed).
ag_tensor *ag_out_new(ag_ctx *c, ag_dtype dt, int ndim, const int64_t *shape);
// The same on device dev: the host activation arena for AG_CPU, else the context's device
// arena (set up on first use, see ag_ctx_use_device).
ag_tensor *ag_out_new_on(ag_ctx *c, ag_device dev, ag_dtype dt, int ndim,
                         const int64_t *shape);
// ag_out_new_on for an output its kernel writes in full (not zeroed on the host).
ag_tensor *ag_out_new_uninit_on(ag_ctx *c, ag_device dev, ag_dtype dt, int ndim,
                                const int64_t *shape);
// The arena of dev's activations (NULL with a message when it cannot be set up).
ag_arena *ag_ctx_arena(ag_ctx *c, ag_device dev);
// A host arena's piece, or for a device arena a piece of its host arena (tensor structs).
void *ag_arena_alloc_meta(ag_arena *a, size_t bytes);
// True when grad mode is on and some non-NULL input requires grad.
bool ag_should_record(const ag_ctx *c, int n, ag_tensor *const *ins);
// Records a node with n inputs producing out (marks out->requires_grad). NULL on no memory.
// Makes sub record its op times into parent's profile (no-op when parent has none).
void ag_ctx_borrow_profile(ag_ctx *sub, const ag_ctx *parent);
ag_node *ag_record(ag_ctx *c, ag_op op, ag_tensor *out, int n, ag_tensor *const *ins);
// Allocates `bytes` of saved state on node n (released after its backward).
void *ag_node_save(ag_ctx *c, ag_node *n, size_t bytes);
// The same in dev's memory: ag_node_save for AG_CPU, else zeroed memory from the context's
// device arena (given back at the step's reset).
void *ag_node_save_on(ag_ctx *c, ag_node *n, ag_device dev, size_t bytes);

// Checks that return MOLT_EARG with "<op>: <what> ..." messages.
molt_status ag_check_cpu_float(const char *op, const char *what, const ag_tensor *t);
molt_status ag_check_i32(const char *op, const char *what, const ag_tensor *t);
// Device-aware versions (backend.c): a float dtype that t's device's kernels take ("x is
// [2, 3] bf16, expected f32 or f64 (cast bf16/f16 first)" on the CPU), an I32 tensor on any
// device.
molt_status ag_check_float(const char *op, const char *what, const ag_tensor *t);
molt_status ag_check_int32(const char *op, const char *what, const ag_tensor *t);
// Host-readable values of t: t->data on the CPU, else a copy made with molt_malloc into
// *copy (free it with molt_free; NULL when none was made). For checks of ids and targets
// (one synchronizing copy per call on a device).
molt_status ag_host_view(const char *op, const ag_tensor *t, const void **data, void **copy);
molt_status ag_check_same_dtype(const char *op, const char *wa, const ag_tensor *a,
                                const char *wb, const ag_tensor *b);
molt_status ag_check_ndim(const char *op, const char *what, const ag_tensor *t, int lo, int hi);
molt_status ag_check_not_null(const char *op, const char *what, const ag_tensor *t);
// Rows of x viewed as 2D: product of all but the last dim.
int64_t ag_rows(const ag_tensor *t);
int64_t ag_cols(const ag_tensor *t);

// Routed-expert operand checks shared by the expert ops (ops_moe_lora.c): idx values in
// [0, E); x [T, H], weights [T, k], idx [T, k] with dense frozen stacks gu [E, 2I, H] and
// down [E, H, I], or quantized ones; one adapter's four matrices (PEFT's target_parameters
// layout, see ag_expert_lora) for E experts with I2 = 2I gate/up rows.
molt_status ag_check_expert_idx(const char *op, const ag_tensor *idx, int64_t E);
molt_status ag_check_expert_dense(const char *op, const ag_tensor *x, const ag_tensor *w,
                                  const ag_tensor *idx, const ag_tensor *gu,
                                  const ag_tensor *down);
molt_status ag_check_expert_quant(const char *op, const ag_tensor *x, const ag_tensor *w,
                                  const ag_tensor *idx, const ag_qweight *gu,
                                  const ag_qweight *down);
molt_status ag_check_expert_lora(const char *op, const ag_expert_lora *l, const ag_tensor *x,
                                 int64_t E, int64_t I2);

// Backward helpers ------------------------------------------------------------------------
// Gradient buffer of input t if t requires grad (allocating it), else NULL. On allocation
// failure returns NULL and sets *st.
ag_tensor *ag_grad_of(ag_tensor *t, molt_status *st);

// Backward rules, one per op (defined in the op files).
molt_status ag_backward_add(ag_ctx *c, ag_node *n);
molt_status ag_backward_mul(ag_ctx *c, ag_node *n);
molt_status ag_backward_scale(ag_ctx *c, ag_node *n);
molt_status ag_backward_sum(ag_ctx *c, ag_node *n);
molt_status ag_backward_cast(ag_ctx *c, ag_node *n);
molt_status ag_backward_reshape(ag_ctx *c, ag_node *n);
molt_status ag_backward_transpose(ag_ctx *c, ag_node *n);
molt_status ag_backward_slice(ag_ctx *c, ag_node *n);
molt_status ag_backward_concat(ag_ctx *c, ag_node *n);
molt_status ag_backward_expand(ag_ctx *c, ag_node *n);
molt_status ag_backward_dropout(ag_ctx *c, ag_node *n);
molt_status ag_backward_embedding(ag_ctx *c, ag_node *n);
molt_status ag_backward_linear(ag_ctx *c, ag_node *n);
molt_status ag_backward_rmsnorm(ag_ctx *c, ag_node *n);
molt_status ag_backward_softmax(ag_ctx *c, ag_node *n);
molt_status ag_backward_swiglu(ag_ctx *c, ag_node *n);
molt_status ag_backward_rope(ag_ctx *c, ag_node *n);
molt_status ag_backward_attention(ag_ctx *c, ag_node *n);
molt_status ag_backward_moe_router(ag_ctx *c, ag_node *n);
molt_status ag_backward_moe_experts(ag_ctx *c, ag_node *n);
molt_status ag_backward_ce_linear(ag_ctx *c, ag_node *n);
molt_status ag_backward_linear_q(ag_ctx *c, ag_node *n);
molt_status ag_backward_linear_bx(ag_ctx *c, ag_node *n);
molt_status ag_backward_moe_experts_q(ag_ctx *c, ag_node *n);
molt_status ag_backward_moe_experts_lora(ag_ctx *c, ag_node *n);
molt_status ag_backward_moe_experts_lora_q(ag_ctx *c, ag_node *n);
molt_status ag_backward_checkpoint(ag_ctx *c, ag_node *n);
molt_status ag_backward_lora_multi(ag_ctx *c, ag_node *n);
molt_status ag_backward_moe_experts_multi(ag_ctx *c, ag_node *n);
molt_status ag_backward_ep_dispatch(ag_ctx *c, ag_node *n);
molt_status ag_backward_ep_combine(ag_ctx *c, ag_node *n);

// Runs c's tape backward from the grads already set on node outputs (no seeding), then
// drops it. ag_backward seeds the loss and calls this; checkpoint recomputation too.
molt_status ag_tape_backward(ag_ctx *c);

#endif
