// autograd/cpu/k_ce.h: kernels of the fused linear + cross-entropy loss (prototypes; no
// include guard on purpose: read once per element type, except the guarded block of
// type-independent declarations). Logits z[t, v] = h_t . w_v (+ h2_t . w2_v with the optional
// low-rank term) are produced a vocabulary chunk at a time and folded into a running
// logsumexp; nothing of size T x V exists at any time.
// Operands are validated by ops_linear.c (targets in [0, V), 1 <= chunk <= V).
#ifndef MOLT_CPU_K_CE_TYPES
#define MOLT_CPU_K_CE_TYPES
#include <stddef.h>
#include <stdint.h>

// Optional second, low-rank product of the logits (a LoRA on the output projection):
// z[t, v] += h2_t . w2_v. Pointers are of the call's element type; the gradient pointers
// may be NULL (that operand needs none) and are read by the backward kernels only.
typedef struct {
    int64_t R;          // rank, >= 1
    const void *h2;     // (T, R)
    const void *w2;     // (V, R)
    void *dh2, *dw2;    // (T, R), (V, R) or NULL
} ce_lowrank;

// Sizes and the token list of one call, the same for both element types.
typedef struct {
    int64_t T, C, V;     // tokens, hidden size, vocabulary
    int64_t chunk;       // vocabulary columns per step, 1..V
    int64_t tile;        // tokens per GEMM tile (optimized kernels), >= 1
    const int64_t *rows; // (n_rows) the tokens that count (nonzero mask), ascending
    int64_t n_rows;
    const ce_lowrank *lr; // NULL: logits are h w^T alone
} ce_dims;
#endif

// Reference forward, plain loops over every token (rows and tile unused): lse (T) gets
// logsumexp_v z[t, v] and zt (T) the target logit z[t, targets[t]], both in double.
void K(ce_fwd_ref)(double *lse, double *zt, const real *h /* (T, C) */,
                   const real *w /* (V, C) */, const int32_t *targets /* (T) */,
                   const ce_dims *d);
// Reference backward. With p = softmax(z[t]) and coef_t = scale * mask[t] (mask NULL = 1):
// dh[t] += sum_v coef_t (p_v - [v == target]) w_v and dw[v] += the same times h_t. dh or dw
// may be NULL (that input needs no gradient).
void K(ce_bwd_ref)(real *dh /* (T, C) */, real *dw /* (V, C) */, const real *h,
                   const real *w, const int32_t *targets, const real *mask /* (T) */,
                   double scale, const double *lse /* (T) */, const ce_dims *d);

// Bytes of scratch the optimized kernels need for d's tile, chunk and C.
size_t K(ce_work_bytes)(const ce_dims *d);
// Optimized forward: same results as the reference for the tokens in d->rows (others are
// left untouched). Token tiles are gathered, each chunk's logits come from one GEMM, the
// running max/sum update is spread over OpenMP threads. work: ce_work_bytes(d) bytes.
void K(ce_fwd)(double *lse, double *zt, void *work, const real *h, const real *w,
               const int32_t *targets, const ce_dims *d);
// Optimized backward over d->rows (the only tokens with nonzero coef): recomputes each
// chunk's logits by GEMM, then two more GEMMs accumulate into dh and dw.
void K(ce_bwd)(real *dh, real *dw, void *work, const real *h, const real *w,
               const int32_t *targets, const real *mask, double scale, const double *lse,
               const ce_dims *d);
// Optimized forward that also yields the gradient to h when w takes none and there is no
// low-rank term (d->lr must be NULL): lse and zt as ce_fwd, and for every token in d->rows
// dh[t] = scale * mask[t] * (sum_v softmax(z[t])_v w_v - w_target) (overwritten; other rows
// untouched). Two GEMMs per chunk, the softmax weights accumulated flash-style.
void K(ce_fwd_grad)(double *lse, double *zt, real *dh /* (T, C) */, void *work,
                    const real *h, const real *w, const int32_t *targets,
                    const real *mask /* (T) or NULL */, double scale, const ce_dims *d);
