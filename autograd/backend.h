// autograd/backend.h: the backend table inside autograd/. An op builder checks its
// operands (the same checks on every device), asks ag_backend_of() for the backend of its
// operands' device (one device for all of them, else an error naming both), allocates its
// result there and calls the table's entry; backward rules do the same. The CPU table
// (backend.c) points at the CPU kernel selection each op file has always done (reference,
// optimized or batch-invariant kernels); the CUDA table (backend_cuda.c) turns tensors into
// the calls of autograd/cuda/cuda_backend.h. A NULL entry means "this op has no kernel on
// that device yet", reported as MOLT_EUNSUPPORTED naming the op and the device. Not part of
// the public API; unit tests of autograd may include it.
#ifndef MOLT_AUTOGRAD_BACKEND_H
#define MOLT_AUTOGRAD_BACKEND_H

#include "internal.h"

typedef struct ag_backend ag_backend;

// Operand bundle of the routed-expert ops (dense or quantized stacks, LoRA or none).
typedef struct {
    ag_tensor *x, *w, *idx;             // [T, H], [T, k], I32 [T, k]
    ag_tensor *gu, *down;               // dense stacks, or NULL
    const ag_qweight *qgu, *qdown;      // quantized stacks, or NULL
    const ag_expert_lora *lora;         // or NULL
} ag_experts_args;

// Gradient buffers of the routed-expert ops (NULL: not needed).
typedef struct {
    ag_tensor *dx, *dw, *da_gu, *db_gu, *da_d, *db_d;
} ag_experts_grads;

// Operands of the fused cross-entropy: in[] = {h, w, targets, mask, h2, w2} as recorded.
typedef struct {
    ag_tensor *const *in;
    int64_t chunk;
    double msum; // sum of the mask (T when there is none)
} ag_ce_args;

struct ag_backend {
    const char *name; // "cpu", "cuda"
    ag_device device;
    bool float_ok[AG_DTYPE_COUNT]; // float dtypes the kernels take
    bool ce_fuses;                 // ce_forward can form the gradient to h (the fused path)

    // memory (device pointers of this backend)
    molt_status (*mem_alloc)(void **p, size_t bytes);
    void (*mem_free)(void *p);
    molt_status (*mem_zero)(void *p, size_t bytes);
    molt_status (*to_host)(void *dst, const void *src, size_t bytes); // synchronizes
    molt_status (*from_host)(void *dst, const void *src, size_t bytes);
    molt_status (*copy)(void *dst, const void *src, size_t bytes);
    molt_status (*fill)(ag_tensor *t, double v);

    // elementwise: y = a + b, a * b, a * s; backward g += dy, dy * o, s * dy
    molt_status (*add)(ag_tensor *y, const ag_tensor *a, const ag_tensor *b);
    molt_status (*mul)(ag_tensor *y, const ag_tensor *a, const ag_tensor *b);
    molt_status (*scale)(ag_tensor *y, const ag_tensor *a, double s);
    molt_status (*acc)(ag_tensor *g, const ag_tensor *dy);
    molt_status (*acc_mul)(ag_tensor *g, const ag_tensor *dy, const ag_tensor *o);
    molt_status (*acc_scale)(ag_tensor *g, const ag_tensor *dy, double s);
    // y = a converted to y's dtype; g += dy converted to g's dtype (cast, reshape backward)
    molt_status (*cast)(ag_tensor *y, const ag_tensor *a);
    molt_status (*acc_cast)(ag_tensor *g, const ag_tensor *dy);

    // y = x W^T; rec: the op is recorded (training) rather than inference
    molt_status (*linear_fwd)(ag_ctx *c, ag_tensor *y, const ag_tensor *x, const ag_tensor *w,
                              bool rec);
    // dx += dy W, dw += dy^T x (either NULL)
    molt_status (*linear_bwd)(ag_ctx *c, ag_tensor *dx, ag_tensor *dw, const ag_tensor *dy,
                              const ag_tensor *x, const ag_tensor *w);
    // rstd: rows elements of x's dtype on the CPU, f32 on CUDA (may be NULL)
    molt_status (*rmsnorm_fwd)(ag_ctx *c, ag_tensor *y, void *rstd, const ag_tensor *x,
                               const ag_tensor *w, double eps);
    molt_status (*rmsnorm_bwd)(ag_ctx *c, ag_tensor *dx, ag_tensor *dw, const ag_tensor *dy,
                               const ag_tensor *x, const ag_tensor *w, const void *rstd);
    // bytes of saved rstd per row (x's element size on the CPU, 4 on CUDA)
    size_t (*rmsnorm_rstd_size)(ag_dtype dt);
    molt_status (*softmax_fwd)(ag_tensor *y, const ag_tensor *x);
    molt_status (*softmax_bwd)(ag_tensor *dx, const ag_tensor *y, const ag_tensor *dy);
    molt_status (*swiglu_fwd)(ag_tensor *y, const ag_tensor *g, const ag_tensor *u);
    molt_status (*swiglu_bwd)(ag_tensor *dg, ag_tensor *du, const ag_tensor *g,
                              const ag_tensor *u, const ag_tensor *dy);
    molt_status (*embedding_fwd)(ag_tensor *y, const ag_tensor *table, const ag_tensor *ids);
    molt_status (*embedding_bwd)(ag_tensor *dtable, const ag_tensor *dy, const ag_tensor *ids);
    // first: the flat index of element 0 in the whole batch (the mask follows it)
    molt_status (*dropout_fwd)(ag_tensor *y, const ag_tensor *a, uint64_t seed, double p,
                               int64_t first);
    molt_status (*dropout_bwd)(ag_tensor *dx, const ag_tensor *dy, uint64_t seed, double p,
                               int64_t first);
    molt_status (*rope_fwd)(ag_tensor *y, const ag_tensor *x, const ag_tensor *pos,
                            const ag_rope_table *tb, int start);
    molt_status (*rope_bwd)(ag_tensor *dx, const ag_tensor *dy, const ag_tensor *pos,
                            const ag_rope_table *tb, int start);
    // probs: T * E elements of logits' dtype (saved for backward by the op)
    molt_status (*router_fwd)(ag_ctx *c, ag_tensor *w, ag_tensor *idx, void *probs,
                              const ag_tensor *logits, const ag_router_config *cfg);
    molt_status (*router_bwd)(ag_ctx *c, ag_tensor *dlogits, const ag_tensor *dw,
                              const void *probs, const ag_tensor *idx,
                              const ag_router_config *cfg);
    molt_status (*linear_q_fwd)(ag_ctx *c, ag_tensor *y, const ag_tensor *x,
                                const ag_qweight *q, bool rec);
    molt_status (*linear_q_bwd)(ag_ctx *c, ag_tensor *dx, const ag_tensor *dy,
                                const ag_qweight *q);
    // routed experts (every variant: dense or quantized stacks, LoRA or not)
    molt_status (*experts_fwd)(ag_ctx *c, ag_tensor *y, const ag_experts_args *a, bool rec);
    molt_status (*experts_bwd)(ag_ctx *c, const ag_experts_args *a, const ag_tensor *dy,
                               const ag_experts_grads *g);
    // fused cross-entropy: lse (T doubles, backend memory), then with dh (fused, only when
    // ce_fuses) the gradient to h for dloss = 1; *loss on the host
    molt_status (*ce_forward)(ag_ctx *c, const ag_ce_args *a, double *lse, void *dh,
                              double *loss);
    molt_status (*ce_backward)(ag_ctx *c, const ag_ce_args *a, const double *lse, double scale,
                               ag_tensor *dh, ag_tensor *dw, ag_tensor *dh2, ag_tensor *dw2);
    // fused optimizer steps (autograd.h)
    molt_status (*adamw_multi)(ag_ctx *c, const ag_adamw_item *items, int n);
    molt_status (*sumsq_multi)(ag_ctx *c, ag_tensor *const *ts, int n, double *out);
    molt_status (*scale_multi)(ag_ctx *c, ag_tensor *const *ts, int n, double s);
};

extern const ag_backend ag_backend_cpu;
// The CUDA table, or NULL when the build has no CUDA (backend_cuda.c).
const ag_backend *ag_backend_cuda_table(void);

// The backend of device dev; NULL with "<op>: this build has no CUDA" style messages.
const ag_backend *ag_backend_get(const char *op, ag_device dev);
// The backend shared by the non-NULL tensors ts[0..n): NULL with "<op>: x is on cpu, w is on
// cuda" when two differ. names[i] names ts[i] in messages.
const ag_backend *ag_backend_of(const char *op, int n, ag_tensor *const *ts,
                                const char *const *names);
// The same, then checks that every non-NULL float operand's dtype is one the backend's
// kernels take ("<op>: x is [2, 3] f64, expected f32 or bf16 on cuda").
const ag_backend *ag_backend_for_floats(const char *op, int n, ag_tensor *const *ts,
                                        const char *const *names);
// ag_backend_for_floats as a status: MOLT_EARG (mixed devices, bad dtype) or MOLT_EDEVICE
// (no backend), with *be set on success.
molt_status ag_backend_pick(const char *op, int n, ag_tensor *const *ts,
                            const char *const *names, const ag_backend **be);
// A qweight operand on the same device as the tensor x ("linear_q: x is on cuda, w is on
// cpu: ...").
molt_status ag_check_qweight_device(const char *op, const char *xname, const ag_tensor *x,
                                    const char *qname, const ag_qweight *q);
// The backend of a recorded node (its output's device; its forward ran there).
const ag_backend *ag_backend_node(const ag_node *n);
// Tests only: serve `dev` from `be` (NULL restores the built-in table). Lets the device
// model run on the CPU with a stand-in table whose memory is host memory.
void ag_backend_override(ag_device dev, const ag_backend *be);

// Required entry: MOLT_EUNSUPPORTED "<op> has no kernel on <device> yet" when NULL.
#define AG_BE_CALL(be, entry, opname, ...)                                                \
    ((be)->entry ? (be)->entry(__VA_ARGS__)                                               \
                 : molt_err(MOLT_EUNSUPPORTED, "%s has no kernel on %s yet", (opname),     \
                            (be)->name))

// ---- the CPU entries, defined in the op files next to their builders ----------------------
molt_status ag_cpu_linear_fwd(ag_ctx *c, ag_tensor *y, const ag_tensor *x, const ag_tensor *w,
                              bool rec);
molt_status ag_cpu_linear_bwd(ag_ctx *c, ag_tensor *dx, ag_tensor *dw, const ag_tensor *dy,
                              const ag_tensor *x, const ag_tensor *w);
molt_status ag_cpu_rmsnorm_fwd(ag_ctx *c, ag_tensor *y, void *rstd, const ag_tensor *x,
                               const ag_tensor *w, double eps);
molt_status ag_cpu_rmsnorm_bwd(ag_ctx *c, ag_tensor *dx, ag_tensor *dw, const ag_tensor *dy,
                               const ag_tensor *x, const ag_tensor *w, const void *rstd);
molt_status ag_cpu_ce_forward(ag_ctx *c, const ag_ce_args *a, double *lse, void *dh,
                              double *loss);
molt_status ag_cpu_ce_backward(ag_ctx *c, const ag_ce_args *a, const double *lse, double scale,
                               ag_tensor *dh, ag_tensor *dw, ag_tensor *dh2, ag_tensor *dw2);
molt_status ag_cpu_cast(ag_tensor *y, const ag_tensor *a);
molt_status ag_cpu_acc_cast(ag_tensor *g, const ag_tensor *dy);
molt_status ag_cpu_softmax_fwd(ag_tensor *y, const ag_tensor *x);
molt_status ag_cpu_softmax_bwd(ag_tensor *dx, const ag_tensor *y, const ag_tensor *dy);
molt_status ag_cpu_swiglu_fwd(ag_tensor *y, const ag_tensor *g, const ag_tensor *u);
molt_status ag_cpu_swiglu_bwd(ag_tensor *dg, ag_tensor *du, const ag_tensor *g,
                              const ag_tensor *u, const ag_tensor *dy);
molt_status ag_cpu_embedding_fwd(ag_tensor *y, const ag_tensor *table, const ag_tensor *ids);
molt_status ag_cpu_embedding_bwd(ag_tensor *dtable, const ag_tensor *dy, const ag_tensor *ids);
molt_status ag_cpu_dropout_fwd(ag_tensor *y, const ag_tensor *a, uint64_t seed, double p,
                               int64_t first);
molt_status ag_cpu_dropout_bwd(ag_tensor *dx, const ag_tensor *dy, uint64_t seed, double p,
                               int64_t first);
molt_status ag_cpu_rope_fwd(ag_tensor *y, const ag_tensor *x, const ag_tensor *pos,
                            const ag_rope_table *tb, int start);
molt_status ag_cpu_rope_bwd(ag_tensor *dx, const ag_tensor *dy, const ag_tensor *pos,
                            const ag_rope_table *tb, int start);
molt_status ag_cpu_router_fwd(ag_ctx *c, ag_tensor *w, ag_tensor *idx, void *probs,
                              const ag_tensor *logits, const ag_router_config *cfg);
molt_status ag_cpu_router_bwd(ag_ctx *c, ag_tensor *dlogits, const ag_tensor *dw,
                              const void *probs, const ag_tensor *idx,
                              const ag_router_config *cfg);
molt_status ag_cpu_linear_q_fwd(ag_ctx *c, ag_tensor *y, const ag_tensor *x,
                                const ag_qweight *q, bool rec);
molt_status ag_cpu_linear_q_bwd(ag_ctx *c, ag_tensor *dx, const ag_tensor *dy,
                                const ag_qweight *q);
// the variants behind ag_cpu_experts_*: frozen dense (ops_moe.c) and quantized
// (ops_qlinear.c) stacks without LoRA; LoRA on either (ops_moe_lora.c)
molt_status ag_cpu_moe_dense_fwd(ag_tensor *y, const ag_tensor *x, const ag_tensor *w,
                                 const ag_tensor *idx, const ag_tensor *gu,
                                 const ag_tensor *down, bool rec);
molt_status ag_cpu_moe_dense_bwd(ag_tensor *gx, ag_tensor *gw, const ag_tensor *dy,
                                 const ag_tensor *x, const ag_tensor *w, const ag_tensor *idx,
                                 const ag_tensor *gu, const ag_tensor *down);
molt_status ag_cpu_moe_q_fwd(ag_tensor *y, const ag_tensor *x, const ag_tensor *w,
                             const ag_tensor *idx, const ag_qweight *gu, const ag_qweight *down,
                             bool rec);
molt_status ag_cpu_moe_q_bwd(ag_tensor *gx, ag_tensor *gw, const ag_tensor *dy,
                             const ag_tensor *x, const ag_tensor *w, const ag_tensor *idx,
                             const ag_qweight *gu, const ag_qweight *down);
molt_status ag_cpu_experts_fwd(ag_ctx *c, ag_tensor *y, const ag_experts_args *a, bool rec);
molt_status ag_cpu_experts_bwd(ag_ctx *c, const ag_experts_args *a, const ag_tensor *dy,
                               const ag_experts_grads *g);

#endif
