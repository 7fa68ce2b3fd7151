// autograd/autograd.h: the public API of molt's tensor and automatic-differentiation engine.
//
// Execution is eager: every op builder checks its operands, allocates its result from the
// context's activation arena, runs the kernel at once and, when grad mode is on and some
// input requires a gradient, records a node on the tape. ag_backward() walks the tape in
// reverse, accumulates into each tensor's `grad` and releases what the nodes saved.
// With grad mode off nothing is recorded and nothing is allocated for backward.
//
// Frozen quantized weights (qweights) live here too, as the weight operand of the linear and
// expert ops. Not here: the model, adapters, training (those build on this API).
#ifndef MOLT_AUTOGRAD_H
#define MOLT_AUTOGRAD_H

#include <stdbool.h>
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/err.h"

#define AG_MAX_DIMS 4

typedef enum { AG_F32, AG_F64, AG_BF16, AG_F16, AG_I32, AG_DTYPE_COUNT } ag_dtype;
typedef enum { AG_CPU, AG_CUDA, AG_DEVICE_COUNT } ag_device;

const char *ag_dtype_name(ag_dtype dt);
size_t ag_dtype_size(ag_dtype dt);

// ---------------------------------------------------------------------------------------
// Arenas: bump allocators by lifetime (weights, params, per-step activations, KV pages).
// Host arenas hand out 64-byte aligned pieces from chunks; reset leaves one chunk (the
// largest, or one of the high-water mark with its pages touched when the step spilled).
// Device arenas (ag_arena_init_device) hold ONE block of device memory, taken at init and
// carved in 256-byte aligned pieces: no device allocation per op; a request that does not
// fit is an error naming the arena and its sizes. The tensor structs of a device arena live
// in a host arena beside it.
typedef struct ag_arena_chunk ag_arena_chunk;
typedef struct ag_arena {
    const char *name;      // for messages ("activations", "params", ...)
    ag_arena_chunk *head;  // host arenas: newest chunk first
    size_t chunk_bytes;    // host arenas: default chunk size
    size_t used;           // bytes handed out since the last reset
    size_t peak;           // high-water mark of `used`
    size_t reserved;       // bytes held in chunks (device arenas: the block's size)
    ag_device device;      // where the memory lives: AG_CPU for host arenas
    void *dev_base;        // device arenas: the block
    struct ag_arena *meta; // device arenas: the host arena of their tensor structs
} ag_arena;

void ag_arena_init(ag_arena *a, const char *name, size_t chunk_bytes);
// A device arena of `bytes` on dev (AG_CPU gives a host arena with that chunk size).
// MOLT_EDEVICE when the device has no backend or the allocation fails.
molt_status ag_arena_init_device(ag_arena *a, const char *name, ag_device dev, size_t bytes);
void *ag_arena_alloc(ag_arena *a, size_t bytes); // NULL and an error message on failure
// The same without zeroing the bytes of a host arena (a device arena still zeroes them): for
// outputs that their kernel writes in full.
void *ag_arena_alloc_uninit(ag_arena *a, size_t bytes);
void ag_arena_reset(ag_arena *a);
void ag_arena_free(ag_arena *a);
// Device arenas: everything allocated after a mark is given back by rewinding to it
// (workspace of one op). Work already queued on the device's stream that uses that memory
// is ordered before any later use, so rewinding needs no synchronization.
size_t ag_arena_mark(const ag_arena *a);
void ag_arena_rewind(ag_arena *a, size_t mark);

// ---------------------------------------------------------------------------------------
// Tensors: contiguous, row-major, up to 4 dims. Data and struct live in `arena`.
typedef struct ag_tensor {
    ag_dtype dtype;
    ag_device device;
    int ndim;
    int64_t shape[AG_MAX_DIMS];
    int64_t numel;
    void *data;
    struct ag_tensor *grad; // same shape and dtype; NULL until backward writes it
    bool requires_grad;     // leaf set by the user, or produced by a recorded op
    ag_arena *arena;        // where data and grad come from
    char name[32];          // optional, for messages
} ag_tensor;

// New zero-filled tensor in arena `a`; NULL (with message) on bad shape or no memory.
ag_tensor *ag_tensor_new(ag_arena *a, ag_dtype dt, int ndim, const int64_t *shape);
// The same with the data not zeroed on the host (ag_arena_alloc_uninit).
ag_tensor *ag_tensor_new_uninit(ag_arena *a, ag_dtype dt, int ndim, const int64_t *shape);
ag_tensor *ag_tensor_new2(ag_arena *a, ag_dtype dt, int64_t d0, int64_t d1);
ag_tensor *ag_tensor_new1(ag_arena *a, ag_dtype dt, int64_t d0);
void ag_tensor_set_name(ag_tensor *t, const char *name);
// "[2, 3, 4] f32" into buf; returns buf (for messages).
const char *ag_shape_str(const ag_tensor *t, char *buf, size_t cap);
bool ag_same_shape(const ag_tensor *a, const ag_tensor *b);
// Element access for tests and slow paths (converts through double). On a device tensor each
// call is one synchronous copy of one element.
double ag_get(const ag_tensor *t, int64_t i);
void ag_set(ag_tensor *t, int64_t i, double v);
// Allocates t->grad (zeroed, in t's arena, so on t's device) if missing; returns it or NULL
// (also when t has no arena: tensors made by ag_to_device cannot take gradients).
ag_tensor *ag_grad_ensure(ag_tensor *t);
void ag_grad_zero(ag_tensor *t);

// bf16 <-> f32 (round to nearest even, NaN kept quiet).
uint16_t ag_f32_to_bf16(float f);
float ag_bf16_to_f32(uint16_t b);

// ---------------------------------------------------------------------------------------
// Seeded random numbers (splitmix64-seeded xoshiro256**): used by init and dropout.
typedef struct {
    uint64_t s[4];
} ag_rng;
void ag_rng_seed(ag_rng *r, uint64_t seed);
uint64_t ag_rng_next(ag_rng *r);
double ag_rng_uniform(ag_rng *r); // [0, 1)
double ag_rng_normal(ag_rng *r);  // N(0, 1)
void ag_fill_uniform(ag_tensor *t, ag_rng *r, double lo, double hi);
void ag_fill_normal(ag_tensor *t, ag_rng *r, double mean, double std);

// ---------------------------------------------------------------------------------------
// Context: grad mode, the tape and the activation arena.
typedef struct ag_node ag_node;
typedef struct {
    bool grad_mode;      // record nodes (training) or not (inference)
    ag_arena act;        // activations and their grads; reset by ag_ctx_step_reset
    ag_node **tape;      // recorded nodes in execution order
    int n_tape, cap_tape;
    size_t saved_bytes;  // bytes currently held by nodes for backward
    size_t saved_peak;
    struct ag_profile *prof; // per-op times when MOLT_PROFILE is set (else NULL)
    bool prof_borrowed;      // prof belongs to a parent context (activation checkpointing)
    ag_arena dev_act;        // device activations, grads, saved state and op workspace;
                             // set up by ag_ctx_use_device, reset with act
    int64_t row_offset;      // the first dim of this process's activations starts at this
                             // row of the whole batch (data parallelism; 0 otherwise):
                             // dropout masks follow the global row, whatever the split
} ag_ctx;

// Sets up a context and makes sure the BLAS library is loaded (ag_blas_init): its error is
// returned with the context usable for everything but BLAS-backed kernels.
molt_status ag_ctx_init(ag_ctx *c);
// A stop request for long computations (Ctrl-C, SIGTERM): a signal handler sets it with
// ag_interrupt_set (async-signal-safe); the model forward checks it between layers and
// ag_backward between nodes, and they return MOLT_EINTERRUPTED when it is set.
void ag_interrupt_set(int sig);
int ag_interrupt_pending(void); // the signal number, 0 when none
void ag_interrupt_clear(void);

// Loads the BLAS library (OpenBLAS) once, with as many threads (OPENBLAS_NUM_THREADS, else
// OpenMP's count) as the free address space holds buffers for. MOLT_ENOMEM saying so when
// not even one thread fits (ulimit -v), MOLT_EUNSUPPORTED when the library cannot be
// loaded; later calls return the same result at once.
molt_status ag_blas_init(void);
// openblas_get_config() of the loaded library, or why it could not be loaded.
const char *ag_blas_describe(void);
// Frees the context; with MOLT_PROFILE=1 in the environment at ag_ctx_init, first prints
// the per-op profile to stderr (see ag_profile_print).
void ag_ctx_free(ag_ctx *c);
// Per-op times of a context created with MOLT_PROFILE=1: backward time of each op exactly,
// forward time as the wall time between consecutive recorded nodes (an op's compute plus
// the caller's code before it; ops that record nothing count toward the next recorded one).
// Recomputation inside activation checkpointing counts toward the inner ops, and the
// checkpoint row's backward includes them (it is left out of the total). Prints a table
// sorted by total time; nothing when profiling is off or nothing was recorded.
void ag_profile_print(const ag_ctx *c, FILE *f);
void ag_ctx_set_grad(ag_ctx *c, bool on);
// Gives the context a device arena of `bytes` on dev for the results of ops on that device
// (one allocation, reset by ag_ctx_step_reset). Without it the first device op takes
// MOLT_DEVICE_ACT_MIB (environment; default 1024) MiB. Calling it again replaces the arena
// (every device tensor of the context is gone). MOLT_EDEVICE when the device is missing.
molt_status ag_ctx_use_device(ag_ctx *c, ag_device dev, size_t bytes);
// Drops the tape (releasing saved state) and resets the activation arena.
void ag_ctx_step_reset(ag_ctx *c);
// Seeds loss->grad with 1 (loss must have one element) and runs the tape backward.
molt_status ag_backward(ag_ctx *c, ag_tensor *loss);

// Kernel selection: reference kernels (plain loops, the ground truth) or optimized ones
// (BLAS, OpenMP). Tests compare the two.
void ag_set_reference_kernels(bool on);
bool ag_reference_kernels(void);

// ---------------------------------------------------------------------------------------
// Ops. Every builder returns the result, or NULL with an error message naming the op and
// the offending shapes/dtypes. Float ops take F32 or F64 operands (all the same dtype);
// BF16/F16 tensors go through ag_cast first. Integer operands (ids, segments) are I32.

// Elementwise and shape.
ag_tensor *ag_add(ag_ctx *c, ag_tensor *a, ag_tensor *b);     // same shape
ag_tensor *ag_mul(ag_ctx *c, ag_tensor *a, ag_tensor *b);     // same shape
ag_tensor *ag_scale(ag_ctx *c, ag_tensor *a, double s);
ag_tensor *ag_sum(ag_ctx *c, ag_tensor *a);                   // all elements -> [1]
ag_tensor *ag_cast(ag_ctx *c, ag_tensor *a, ag_dtype to);     // F32/F64/BF16/F16
ag_tensor *ag_reshape(ag_ctx *c, ag_tensor *a, int ndim, const int64_t *shape);
ag_tensor *ag_transpose(ag_ctx *c, ag_tensor *a, int d0, int d1);
// a[..., start:start+len, ...] along `dim`.
ag_tensor *ag_slice(ag_ctx *c, ag_tensor *a, int dim, int64_t start, int64_t len);
// Splits along `dim` into n pieces of sizes[i] (summing to the dim); outs[i] receives each.
molt_status ag_split(ag_ctx *c, ag_tensor *a, int dim, int n, const int64_t *sizes,
                     ag_tensor **outs);
ag_tensor *ag_concat(ag_ctx *c, int n, ag_tensor *const *xs, int dim);
// Repeats a size-1 dimension `dim` n times (backward sums over it).
ag_tensor *ag_expand(ag_ctx *c, ag_tensor *a, int dim, int64_t n);
// Inverted dropout: zeroes with probability p, scales survivors by 1/(1-p). The mask comes
// from rng (advanced by one draw per call) and is regenerated, not stored, for backward.
ag_tensor *ag_dropout(ag_ctx *c, ag_tensor *a, double p, ag_rng *rng);

// Neural-network ops.
ag_tensor *ag_embedding(ag_ctx *c, ag_tensor *table /* [V, C] */, ag_tensor *ids /* I32 [T] */);
// y = x W^T, x [..., in], W [out, in] -> [..., out]. W may be frozen (no grad for W) while
// x still receives dx = dy W. In inference (not recorded: grad mode off, or neither operand
// requires grad; reference kernels not forced) a row's result does not depend on the other
// rows: each element is summed in an order fixed by `in` alone (bi_linear, cpu/k_bi.h), the
// same bits for any row count, row order or thread count. Recorded (training), the forward
// is a BLAS GEMM, whose rounding may change with the row count.
ag_tensor *ag_linear(ag_ctx *c, ag_tensor *x, ag_tensor *w);
// The inference product of ag_linear on plain arrays, on the calling thread (for kernels
// that already run one work item per thread): y (T, rows) = x (T, cols) . w (rows, cols)^T,
// y overwritten, each element summed in bi_linear's fixed order (the bits of ag_linear in
// inference for any T). f32 only.
void ag_bi_matmul(float *y, const float *x, const float *w, int64_t T, int64_t rows,
                  int64_t cols);
// y[j] = dot(a, rows[j]) over K elements for j < n, each in bi_linear's fixed order (the bits
// ag_bi_matmul gives for a against those rows); on the calling thread. f32 only.
void ag_bi_dots(float *y, const float *a, const float *const *rows, int64_t n, int64_t K);
// y[k] = sum over s < n of p[s] * rows[s][k] for k < K, y overwritten, the terms added in
// increasing s from 0 (cpu/k_bi.h: bi_wsum): a fixed order, whatever else is computed beside
// it; on the calling thread. f32 only.
void ag_bi_wsum(float *y, const float *p, const float *const *rows, int64_t n, int64_t K);
// The vocabulary projection of inference on Intel AMX (cpu/k_bx.h). An F32 matrix packed
// once into two bf16 planes, hi and lo (the same 4 bytes per element as F32), multiplies an
// F32 x split the same way, in three bf16 tile products summed in f32: about 1e-6 of the
// largest output away from F32, batch-invariant like ag_linear (a fixed order per element,
// whatever T, the other rows or the threads), and on a 131072 x 512 matrix 1.7x faster than
// ag_linear's inference kernel at 31 rows.
typedef struct {
    uint16_t *data; // bx_pack's layout, in the arena given to ag_bx_pack
    int64_t rows, cols;
} ag_bxweight;
// True when this processor and kernel run AMX-BF16 tiles and the environment does not set
// MOLT_AMX=0 (asked once per process).
bool ag_bx_available(void);
// Packs the F32 host matrix w [rows, cols] into arena a (nthreads threads).
molt_status ag_bx_pack(ag_arena *a, const ag_tensor *w, int nthreads, ag_bxweight *out);
// True when w's packed form takes exactly its bytes (rows a multiple of 16, columns of 32).
bool ag_bx_packs_in_place(const ag_tensor *w);
// Packs w over its own bytes (ag_bx_packs_in_place): out takes w's data and
// w is left shape-only (data NULL). MOLT_ENOMEM (w unchanged) without memory for one
// panel's copy (512 rows).
molt_status ag_bx_pack_in_place(ag_tensor *w, int nthreads, ag_bxweight *out);
// y = x W^T for x F32 [..., cols] on the host -> [..., rows]. On AMX when available, else (and
// with the reference kernels forced) the plain-C reference of the same products. Recorded,
// x receives dx = dy (hi + lo); W never gets a gradient.
ag_tensor *ag_linear_bx(ag_ctx *c, ag_tensor *x, const ag_bxweight *w);
// y = x * rsqrt(mean(x^2, last dim) + eps) * w, w [C].
ag_tensor *ag_rmsnorm(ag_ctx *c, ag_tensor *x, ag_tensor *w, double eps);
ag_tensor *ag_softmax(ag_ctx *c, ag_tensor *x);               // over the last dim
// z[i] = exp(z[i] - sub) for i < n in place, returning the sum of the new values: the
// vectorized exp of the fused loss (cpu/k_vexp.h), each element a function of its own value
// alone and the sum in an order fixed by n; on the calling thread. f32 only.
double ag_vexp_sum(float *z, int64_t n, float sub);
ag_tensor *ag_swiglu(ag_ctx *c, ag_tensor *gate, ag_tensor *up); // silu(gate) * up

// Rotary embedding tables: inverse frequencies for the rotary dims (YaRN-corrected when the
// config asks for it) and the cos/sin attention factor.
typedef struct {
    int rot_dim;            // rotary dims (even); the table holds rot_dim/2 frequencies
    double inv_freq[256];   // [rot_dim/2]
    double attn_factor;     // multiplies cos and sin (YaRN mscale ratio; 1 when unused)
} ag_rope_table;
typedef struct {
    double theta;                 // rope base
    int rot_dim;                  // qk_rope_head_dim
    bool yarn;                    // rope_type "yarn"
    double factor;                // YaRN scaling factor
    double original_max_pos;      // original_max_position_embeddings
    double beta_fast, beta_slow;
    double mscale, mscale_all_dim;
} ag_rope_config;
molt_status ag_rope_table_init(ag_rope_table *t, const ag_rope_config *cfg);
// YaRN get_mscale(scale, m) = 0.1 m ln(scale) + 1 for scale > 1, else 1.
double ag_yarn_mscale(double scale, double m);
// Rotates dims [start, start + table->rot_dim) of the last dim of x ([T, ..., D], T the
// first dim) at positions pos (I32 [T]). Input pairs are interleaved (x[2i], x[2i+1]); the
// output slice is de-interleaved: first half the rotated evens, second half the odds.
ag_tensor *ag_rope(ag_ctx *c, ag_tensor *x, ag_tensor *pos, const ag_rope_table *table,
                   int start);

// Causal attention over packed sequences. q, k [T, H, Dqk], v [T, H, Dv] -> [T, H, Dv].
// Token t attends to s <= t with seg[s] == seg[t]. Score = scale * qtemp[t] * q_t . k_s;
// qtemp (F32/F64 [T], may be NULL for 1) is the per-position query temperature, not
// differentiated. Nothing of size T x T is kept for backward.
ag_tensor *ag_attention(ag_ctx *c, ag_tensor *q, ag_tensor *k, ag_tensor *v,
                        ag_tensor *seg /* I32 [T] */, ag_tensor *qtemp, double scale);

// MoE router. logits [T, E] -> weights [T, k] (differentiable), *idx = I32 [T, k].
// softmax over E; with n_group > 1 keep the topk_group groups with the largest sum of their
// top-2 scores; top-k of the kept scores; weights = chosen scores, divided by their
// sum + 1e-20 when norm_topk_prob, times scaling.
typedef struct {
    int top_k, n_group, topk_group;
    bool norm_topk_prob;
    double scaling;
} ag_router_config;
ag_tensor *ag_moe_router(ag_ctx *c, ag_tensor *logits, const ag_router_config *cfg,
                         ag_tensor **idx);
// Routed experts with frozen weights. x [T, H], weights [T, k], idx I32 [T, k],
// w_gate_up [E, 2I, H] (gate rows first), w_down [E, H, I] -> [T, H] = sum_j weights[t,j] *
// down_e(silu(gate_e x) * up_e x). Gradients reach x and weights. In inference (not
// recorded, reference kernels not forced) a token's row does not depend on the other rows:
// its products are batch-invariant (as ag_linear's) and its experts are added in
// increasing expert order.
ag_tensor *ag_moe_experts(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                          ag_tensor *w_gate_up, ag_tensor *w_down);

// ---- LoRA on routed experts (autograd/ops_moe_lora.c) ----
// Adapters on the 3D expert stacks in PEFT's target_parameters layout: for a stack W
// [E, out, in], A is [r*E, in] (rows e*r..e*r+r-1 are expert e's) and B is [out, r*E]
// (column k*E + e is expert e's rank k); expert e uses W[e] + scale * B_e A_e. A pair may be
// left NULL (both matrices) for no adapter on that stack. No dropout (PEFT has none there).
typedef struct {
    ag_tensor *a_gate_up; // [r*E, H] or NULL
    ag_tensor *b_gate_up; // [2I, r*E]
    ag_tensor *a_down;    // [r*E, I] or NULL
    ag_tensor *b_down;    // [H, r*E]
    int r;                // rank per expert
    double scale;         // lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    // Optional, forward only (ag_moe_experts_multi's optimized kernel): b_gate_up and b_down
    // re-laid per expert, [E, 2I, r] and [E, H, r] (element [e, o, q] = b[o, q*E + e]), so
    // that one expert's B is read without touching the others'. NULL: gathered per call.
    ag_tensor *bp_gate_up, *bp_down;
} ag_expert_lora;
// ag_moe_experts with the adapters applied (never merged: the optimized kernel uses the
// low-rank products). Gradients reach x, weights and every LoRA matrix that requires grad;
// w_gate_up and w_down stay frozen. LoRA matrices share x's dtype.
ag_tensor *ag_moe_experts_lora(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                               ag_tensor *w_gate_up, ag_tensor *w_down,
                               const ag_expert_lora *lora);
// The same with quantized expert stacks (QLoRA on the experts): gate_up [E, 2I, H] and down
// [E, H, I] are 3-D qweights (see ag_qweight below), used as their decoded values. Gradients
// reach x, weights and every LoRA matrix that requires grad, never the qweights; both
// qweights must outlive the tape. The optimized kernel decodes one expert's two matrices at a
// time per thread (3IH reals each); the quantized storage is all that stays resident.
typedef struct ag_qweight ag_qweight;
ag_tensor *ag_moe_experts_lora_q(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                                 const ag_qweight *gate_up, const ag_qweight *down,
                                 const ag_expert_lora *lora);
// ---- end LoRA on routed experts ----

// ---- several adapters in one batch (autograd/ops_lora_multi.c) ----
// One adapter's LoRA on a linear [out, in]: delta = scale * (x A^T) B^T.
typedef struct {
    ag_tensor *a; // [r, in] or NULL: this adapter does not adapt the module
    ag_tensor *b; // [out, r] (NULL with a)
    double scale; // lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
} ag_lora_ab;
// The LoRA terms of n adapters over one batch, row t under adapter slot[t]: x [T, in],
// slot I32 [T] with values in [-1, n) -> [T, out], row t = set[slot[t]].scale *
// (x_t A^T) B^T, zero for slot -1 or an adapter with a NULL. Ranks may differ between
// adapters. Computed as linear -> linear -> scale would on each adapter alone (the same bits
// when those linears run batch-invariantly), one gather and two low-rank products per
// adapter present; a row's result does not depend on the other rows. Gradients reach x and
// every A and B that requires grad. Add the result to the base projection.
ag_tensor *ag_lora_multi(ag_ctx *c, ag_tensor *x, ag_tensor *slot, int n,
                         const ag_lora_ab *set, int64_t out);
// ag_lora_multi where the rows t with bx[t] != 0 (bx [T], NULL: none) take the second
// low-rank product, (x A^T) B^T, as bf16 pairs (cpu/k_bx.h's bxq_linear on B as an F32
// matrix; x A^T stays F32), as ag_linear_q_rows does for the base; x F32 then. The
// reference kernels compute every row in F32. Recorded, backward is ag_lora_multi's. acc
// (or NULL): the base projection the terms go onto; when nothing is recorded (and the
// reference kernels are not forced) the terms are added into acc's rows in place, the bits of ag_add(acc, terms) on rows with an
// adapter, rows without one left as they are, and acc is returned; otherwise the terms
// are returned, for the caller to add.
ag_tensor *ag_lora_multi_rows(ag_ctx *c, ag_tensor *x, ag_tensor *slot, int n,
                              const ag_lora_ab *set, int64_t out, const uint8_t *bx,
                              ag_tensor *acc);
// Routed-expert stacks for ag_moe_experts_multi: dense (gate_up [E, 2I, H], down [E, H, I],
// frozen) or quantized (3-D qweights of the same shapes); exactly one pair is set.
typedef struct {
    ag_tensor *gate_up, *down;
    const ag_qweight *gate_up_q, *down_q;
} ag_expert_stacks;
// Routed experts of a batch whose tokens carry different adapters: token t uses adapter
// slot[t] (I32 [T], values in [-1, n); -1 = none), whose expert LoRA is set[slot[t]] (all four
// matrices NULL = none; ranks may differ between adapters). x [T, H], weights [T, k],
// idx I32 [T, k] -> [T, H]: per token what ag_moe_experts_lora (or ag_moe_experts) computes
// with that adapter alone. The optimized kernel runs each expert's base products once over
// all its rows (a quantized expert is decoded once per block of rows) and adds each
// adapter's low-rank terms to its own rows; a token's result does not depend on the rest of
// the batch. Gradients reach x, weights and every LoRA matrix that requires grad (computed
// adapter group by adapter group with the single-adapter ops); the stacks stay frozen and
// quantized ones must outlive the tape.
ag_tensor *ag_moe_experts_multi(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                                const ag_expert_stacks *w, ag_tensor *slot, int n,
                                const ag_expert_lora *set);
// ag_moe_experts_multi where the tokens t with bx[t] != 0 (bx [T], NULL: none) take the
// quantized experts' base products as ag_linear_q_rows does, and their adapters' second
// low-rank product as ag_lora_multi_rows does (dense stacks ignore bx). The reference
// kernels compute every row in F32.
ag_tensor *ag_moe_experts_multi_rows(ag_ctx *c, ag_tensor *x, ag_tensor *weights,
                                     ag_tensor *idx, const ag_expert_stacks *w, ag_tensor *slot,
                                     int n, const ag_expert_lora *set, const uint8_t *bx);
// An expert LoRA's B [out, r*E] (F32) re-laid per expert into *bp, a new tensor of arena a,
// [E, out, r]: ag_expert_lora's bp_gate_up / bp_down. MOLT_EARG when b is not F32, not 2-D
// or not r times a whole number of experts wide; MOLT_ENOMEM.
molt_status ag_expert_b_per_expert(ag_arena *a, const ag_tensor *b, int r, ag_tensor **bp);

// ---- expert parallelism (autograd/ops_ep.c; the collectives are autograd/comm/comm.h) ----
// The E routed experts are split in contiguous blocks over the ranks of a communicator (rank
// p owns experts [p*E/size, (p+1)*E/size)). A route sends each routing slot (token t,
// choice j) of this rank's tokens to the owner of expert idx[t, j]; the owner runs its
// experts on the rows it receives without weights, and the results come back to be weighted
// and summed per token. Both ops are collectives: every rank of the communicator calls them
// in the same order (and, when recorded, their backward runs on every rank too).
typedef struct ag_comm ag_comm;
typedef struct ag_ep_route ag_ep_route;
// Builds the route of idx I32 [T, k] (expert ids in [0, n_experts)) with optional per-token
// tags I32 [T] (adapter slots; NULL = none) carried to the owners. idx NULL: this rank has no
// tokens (it only serves its experts). Collective (two small all-to-alls); lives in c's
// activation arena until the next step reset. NULL with a message on bad operands (E not
// divisible by the ranks, idx out of range) or a failed collective.
ag_ep_route *ag_ep_route_new(ag_ctx *c, ag_comm *comm, ag_tensor *idx, ag_tensor *tag,
                             int64_t n_experts);
int64_t ag_ep_route_rows(const ag_ep_route *r);         // R: rows this rank receives
ag_tensor *ag_ep_route_local_idx(const ag_ep_route *r); // I32 [R, 1]: expert among this
                                                        // rank's (NULL when R is 0)
ag_tensor *ag_ep_route_tags(const ag_ep_route *r);      // I32 [R] tags (-1 without), or NULL
// x [T, H] -> [R, H] (one zero placeholder row when R is 0): the rows routed to this rank's
// experts, in rank order of their senders, each sender's in (t, j) order. For a route
// without tokens x is any [1, H] tensor (only H and its dtype are used). Gradients reach x.
ag_tensor *ag_ep_dispatch(ag_ctx *c, const ag_ep_route *r, ag_tensor *x);
// y [R, H] (the experts' unweighted outputs of the received rows; any [1, H] tensor when R is
// 0), w [T, k] (NULL for a route without tokens) -> [T, H]: out[t] = sum_j w[t, j] * y of
// row (t, j) back from its owner ([1, H] zeros without tokens). Gradients reach y and w.
ag_tensor *ag_ep_combine(ag_ctx *c, const ag_ep_route *r, ag_tensor *y, ag_tensor *w);

// Mean cross-entropy of softmax(h W^T) against targets over tokens with mask[t] != 0,
// computed in vocabulary chunks of `chunk` columns: the [T, V] logits are never held.
// h [T, C], w [V, C], targets I32 [T], mask F32/F64 [T] (weights; NULL = all ones) -> [1].
ag_tensor *ag_cross_entropy_linear(ag_ctx *c, ag_tensor *h, ag_tensor *w, ag_tensor *targets,
                                   ag_tensor *mask, int64_t chunk);
// The same loss over logits h W^T + h2 W2^T (a LoRA on the output projection: h2 =
// scale * dropout(h) A^T, W2 = B), still chunked: no [T, V] logits, no merged weight.
// h2 [T, r], w2 [V, r] of h's dtype, both or neither (neither = ag_cross_entropy_linear).
// Gradients reach h, w, h2 and w2, whichever require grad.
ag_tensor *ag_cross_entropy_linear2(ag_ctx *c, ag_tensor *h, ag_tensor *w, ag_tensor *h2,
                                    ag_tensor *w2, ag_tensor *targets, ag_tensor *mask,
                                    int64_t chunk);
// The same with the summed loss divided by norm instead of the mask's sum (norm 0: the
// mask's sum; a mask summing to 0 still gives 0): the rows of one rank of a batch split over
// ranks give their share of the whole batch's mean, with the per-token gradients one process
// computes.
ag_tensor *ag_cross_entropy_linear_norm(ag_ctx *c, ag_tensor *h, ag_tensor *w, ag_tensor *h2,
                                        ag_tensor *w2, ag_tensor *targets, ag_tensor *mask,
                                        int64_t chunk, double norm);

// ---- activation checkpointing (autograd/ops_checkpoint.c) ----
// fn builds a sub-graph on c from inputs[0..n_in) (and whatever it captures through user)
// and returns one new tensor it created, or NULL with a message.
typedef ag_tensor *(*ag_checkpoint_fn)(ag_ctx *c, ag_tensor *const *inputs, void *user);
#define AG_CKPT_MAX_RNG 8
// y = fn(inputs) without keeping the sub-graph: with grad mode on, fn runs in a scratch
// context that is dropped once y is copied out, and one node holding the inputs is recorded
// (only when something inside required grad). Backward runs fn again with recording on and
// backpropagates y's gradient into the inputs and every captured tensor that requires grad
// (accumulating, as any op). Grad mode off: just fn(c, inputs, user).
// Contract: user, the inputs and the rngs must outlive the tape, and fn must give the same
// result from the same inputs and generator states. rngs[0..n_rng) are the generators fn
// draws from (dropout): their states at the forward are put back for the recomputation and
// restored afterwards. Nested checkpoints work. Errors: NULL with a "checkpoint: ..." message
// (fn failing, or returning a tensor it did not create); the recomputation's errors come
// back from ag_backward.
ag_tensor *ag_checkpoint(ag_ctx *c, ag_checkpoint_fn fn, void *user, int n_in,
                         ag_tensor *const *inputs, int n_rng, ag_rng *const *rngs);

// ---------------------------------------------------------------------------------------
// Devices (CPU always; CUDA when compiled in and a GPU is visible).
//
// Every tensor lives on one device (t->device, the device of its arena). Ops run on the
// device of their operands, through that device's backend table (autograd/backend.h):
// results, gradients and saved state are allocated there (device activations come from the
// context's device arena, see ag_ctx_use_device); an op given operands on two devices fails
// with a message naming both ("linear: x is on cuda, w is on cpu"); an op that has no
// kernel on that device yet fails with MOLT_EUNSUPPORTED naming the op and the device.
// Only explicit copies (ag_tensor_to, ag_tensor_copy, ag_to_device, ag_qweight_to, ag_get
// and ag_set) move data between devices.
typedef struct {
    int cuda_compiled;   // 1 when built with CUDA
    int cuda_devices;    // visible GPUs (0 when none or not compiled)
    char cuda_error[128];// why none are visible, when cuda_compiled
} ag_device_info;
void ag_device_query(ag_device_info *info);
const char *ag_device_name(ag_device dev); // "cpu", "cuda"
// One-line description of device i ("NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB").
molt_status ag_cuda_describe(int i, char *buf, size_t cap);
// Copies t to a new tensor on `dev` (allocated outside arenas; free with ag_device_tensor_free).
ag_tensor *ag_to_device(ag_tensor *t, ag_device dev);
void ag_device_tensor_free(ag_tensor *t);
// Copy of t (same shape, dtype and stored bits) in arena a, on a's device; requires_grad is
// false and there is no grad. NULL with a message on error.
ag_tensor *ag_tensor_to(ag_arena *a, const ag_tensor *t);
// Copies src into dst (same shape and dtype, any devices). Synchronous when dst is on the CPU.
molt_status ag_tensor_copy(ag_tensor *dst, const ag_tensor *src);
// Elementwise y = a + b on whatever device a and b live on (both the same); y same device.
molt_status ag_device_add(ag_tensor *y, const ag_tensor *a, const ag_tensor *b);
// Waits until the device has finished the work queued so far (no-op on the CPU).
molt_status ag_device_sync(ag_device dev);

// Fused optimizer steps over many tensors (one launch each on CUDA; no CPU kernels here:
// the CPU optimizer is train/optim.c, which these reproduce). One AdamW update of an f32
// parameter p with gradient g and moments m, v, the float scalars formed as train/optim.c
// forms them for this step.
typedef struct {
    ag_tensor *p;
    const ag_tensor *g;
    ag_tensor *m, *v;
    float decay, w1, b2, c2, neg_step, bc2_sqrt, eps;
    bool apply_decay;
} ag_adamw_item;
// All tensors on one device, f32, each p, g, m, v of the same size; bits equal to
// train/optim.c's update on the CPU.
molt_status ag_adamw_multi(ag_ctx *c, const ag_adamw_item *items, int n);
// out[i] = sum of squares of ts[i] (f32), in double; synchronizes.
molt_status ag_sumsq_multi(ag_ctx *c, ag_tensor *const *ts, int n, double *out);
// ts[i] *= s for every tensor (f32).
molt_status ag_scale_multi(ag_ctx *c, ag_tensor *const *ts, int n, double s);

// ---------------------------------------------------------------------------------------
// Frozen quantized weights (autograd/quant.c, ops_qlinear.c). A qweight is only ever the
// weight operand of ag_linear_q / ag_moe_experts_q / ag_moe_experts_lora_q: it has no
// gradient, but gradients flow through it to the activations. Storage is owned by the
// struct (molt_malloc) and released by ag_qweight_free; kernels dequantize it tile by tile
// (ag_moe_experts_lora_q: expert by expert) and never hold the whole matrix.
typedef enum {
    AG_Q_F32,  // plain floats
    AG_Q_BF16, // bf16 bits
    AG_Q_INT8, // int8, symmetric, one fp32 scale per output row: w = q * scale[row]
    AG_Q_FP8,  // E4M3 bytes times an fp32 scale per matrix (as loaded) or per output row
    AG_Q_NF4,  // bitsandbytes NF4: blocks of 64, optionally double-quantized absmax
    AG_Q_FORMAT_COUNT
} ag_qformat;

#define AG_NF4_BLOCK 64     // values per NF4 block (one absmax each)
#define AG_NF4_DQ_BLOCK 256 // absmax values per second-level block (double quantization)

typedef struct {
    bool nf4_double_quant; // NF4: quantize the absmax to 8 bits (bitsandbytes
                           // compress_statistics); default true
    bool fp8_per_row;      // FP8 from F32: one scale per output row (default true) or one
                           // per matrix
} ag_qopts;

typedef struct ag_qweight { // tagged: ag_moe_experts_lora_q above declares it first
    ag_qformat format;
    int ndim;                // 2: [out, in]; 3: [E, out, in], E matrices (experts)
    int64_t shape[3];
    int64_t n_mat, rows, cols; // E (1 for 2-D), out, in
    int64_t numel;             // n_mat * rows * cols
    bool fp8_per_row;          // FP8: scale has n_mat * rows entries, else n_mat
    bool nf4_double_quant;     // NF4: absmax is stored as absmax_q/absmax_scale/offset
    // Storage (row-major over the flattened [E, out, in] weight; unused pointers are NULL):
    void *data;                // F32 float[numel], BF16 uint16[numel], INT8 int8[numel],
                               // FP8 uint8[numel], NF4 uint8[(numel + 1) / 2] with the
                               // first value of each pair in the high nibble
    float *scale;              // INT8 [n_mat * rows]; FP8 [n_mat] or [n_mat * rows];
                               // NF4 without double quantization: absmax [n_blocks]
    uint8_t *absmax_q;         // NF4 + DQ: [n_blocks] codes of the signed dynamic map
    float *absmax_scale;       // NF4 + DQ: [n_blocks2] second-level (fp32) scales
    float absmax_offset;       // NF4 + DQ: mean of the absmax, added back on dequantization
    int64_t n_blocks;          // NF4: ceil(numel / 64)
    int64_t n_blocks2;         // NF4 + DQ: ceil(n_blocks / 256)
    size_t bytes;              // bytes of all storage above
    void *mem;                 // the single allocation behind the storage pointers (host
                               // qweights; NULL for device copies, owned by their arena)
    ag_device device;          // where the storage lives
} ag_qweight;

// Defaults: NF4 double quantization on, FP8 per-row scales.
ag_qopts ag_qopts_default(void);
// Allocates zeroed storage for a qweight of `format` and shape (ndim 2 or 3); a loader fills
// it and then calls ag_qweight_check. On error *q is left empty (safe to free).
molt_status ag_qweight_alloc(ag_qweight *q, ag_qformat format, int ndim, const int64_t *shape,
                             const ag_qopts *opts);
// Bytes ag_qweight_alloc takes for such a qweight (its one allocation, 64-byte aligned
// pieces); 0 for a bad format or shape. For memory plans.
size_t ag_qweight_storage_bytes(ag_qformat format, int ndim, const int64_t *shape,
                                const ag_qopts *opts);
// Quantizes an F32 CPU tensor [out, in] or [E, out, in] (finite values) to `format`
// (opts NULL = defaults). NF4 follows bitsandbytes' quantize_4bit (nf4, blocksize 64,
// compress_statistics = nf4_double_quant) bit for bit; INT8 rounds w * 127 / absmax(row) to
// nearest even; FP8 rounds w / scale to nearest even E4M3 with scale = absmax / 448.
molt_status ag_qweight_quantize(ag_qweight *q, const ag_tensor *w, ag_qformat format,
                                const ag_qopts *opts);
// Wraps E4M3 bytes as loaded from a checkpoint (copied, never re-quantized) with one scale
// per matrix that multiplies (real = fp8 * scales[e]); ndim 2 or 3 as above.
molt_status ag_qweight_from_fp8(ag_qweight *q, const uint8_t *e4m3, int ndim,
                                const int64_t *shape, const float *scales);
// Validates a qweight (format, shape, storage sizes, finite scales, no FP8 NaN codes).
molt_status ag_qweight_check(const ag_qweight *q);
// Copies a host qweight to arena a's device in its stored form (NF4 stays packed with its
// absmax codes and second-level scales, FP8 stays E4M3 with its scales: the same bytes).
// dst's storage belongs to the arena (ag_qweight_free releases nothing of it). The source is
// checked first (ag_qweight_check): device copies are not checked again by the ops.
molt_status ag_qweight_to(ag_qweight *dst, const ag_qweight *src, ag_arena *a);
// The F32 tensor the qweight stands for (shape [out, in] or [E, out, in]) in arena a.
ag_tensor *ag_qweight_dequantize(ag_arena *a, const ag_qweight *q);
void ag_qweight_free(ag_qweight *q);
// Storage bits per parameter (8 * bytes / numel).
double ag_qweight_bits_per_param(const ag_qweight *q);
const char *ag_qformat_name(ag_qformat f);

// Shards of NF4 expert stacks (autograd/quant_shard.c). The double-quantized absmax state of
// a whole stack of n_blocks blocks: codes [n_blocks], scales [ceil(n_blocks / 256)], offset.
typedef struct {
    const uint8_t *codes;
    const float *scales;
    float offset;
    int64_t n_blocks;
} ag_nf4_dq_state;
// q is NF4 with plain absmax and holds blocks [first_block, first_block + q->n_blocks) of a
// stack whose double quantization is st. Re-expresses q's absmax as st stores them: double
// quantized with st's codes, scales and offset when q's blocks start on a group of 256 and
// end on one (or at the stack's end), else plain absmax holding the values st decodes to
// (4.5 bits per parameter instead of 4.127). Either way q dequantizes bit for bit as the
// whole stack does. On error q is unchanged.
molt_status ag_qweight_nf4_restate(ag_qweight *q, const ag_nf4_dq_state *st,
                                   int64_t first_block);
// The double quantization of a stack's plain absmax (nb values, overwritten): what
// ag_qweight_quantize stores (codes [nb], scales [ceil(nb / 256)], *offset).
void ag_nf4_dq_encode(float *absmax, int64_t nb, uint8_t *codes, float *scales, float *offset);

// y = x W^T with W a 2-D qweight [out, in]: x [..., in] (F32 or F64) -> [..., out]. Recorded
// only when x requires grad; backward gives dx = dy W (W gets no gradient). The node keeps a
// pointer to w, which must outlive the tape. In inference (not recorded, reference kernels
// not forced) a row's result does not depend on the other rows, as for ag_linear
// (bi_linear_q: weights decoded in registers, the bits of ag_linear on the dequantized
// matrix); recorded, the forward goes through BLAS on dequantized tiles.
ag_tensor *ag_linear_q(ag_ctx *c, ag_tensor *x, const ag_qweight *w);
// ag_linear_q where the rows t with bx[t] != 0 (bx [rows of x], NULL: none) take the
// bf16-pair products of cpu/k_bx.h instead (bxq_linear: W's decoded values and x split into
// bf16 hi + lo, three products summed in f32, batch-invariant; a few 1e-6 of the largest
// output from F32), on AMX when ag_bxq_available(), else (and with the reference kernels
// forced) through the plain-C reference of the same products. Inference uses it for prompt
// rows, whose products dominate prefill. x F32 on the host when any row is marked.
// Recorded, backward is ag_linear_q's (dx = dy W for every row).
ag_tensor *ag_linear_q_rows(ag_ctx *c, ag_tensor *x, const ag_qweight *w, const uint8_t *bx);
// True when bxq_linear runs on this processor (ag_bx_available and AVX512-BF16).
bool ag_bxq_available(void);
// ag_moe_experts with quantized experts: gate_up [E, 2I, H] (gate rows first) and down
// [E, H, I] qweights (3-D, one matrix per expert); gradients reach x and weights. In
// inference a token's row does not depend on the other rows, as for ag_moe_experts.
ag_tensor *ag_moe_experts_q(ag_ctx *c, ag_tensor *x, ag_tensor *weights, ag_tensor *idx,
                            const ag_qweight *gate_up, const ag_qweight *down);

int ag_cmd_bench_quant(int argc, char **argv); // molt bench quant

// ---------------------------------------------------------------------------------------
// Command-line entry points served by this module (called from molt.c). Return the process
// exit status; errors are printed to stderr.
int ag_cmd_info(int argc, char **argv);      // molt info
int ag_cmd_bench_ops(int argc, char **argv); // molt bench ops

#endif
