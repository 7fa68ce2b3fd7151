// autograd/cpu/k_lora_multi.h: kernels of several LoRA adapters applied to one batch, each
// row with its own adapter (prototypes; no include guard on purpose: read once per element
// type by cpu/kernels.h, after k_bi.h). Sizes: T rows, `in` input and `out` output features,
// n adapters ("slots"), adapter s of rank r_s. Row t uses slot[t]: -1 (or an adapter with no
// matrices here) contributes nothing. Operands are validated by the op (ops_lora_multi.c).
#include <stddef.h>
#include <stdbool.h>
#include <stdint.h>

// One adapter on this module: delta = s * (x A^T) B^T.
typedef struct {
    const real *a; // a (r, in) or NULL: no LoRA for this slot
    const real *b; // b (out, r)
    int64_t r;
    real s;
} K(lora_ab);

// Reference: y (T, out) overwritten; rows of other slots are zero. Plain loops in double.
void K(lora_multi_fwd_ref)(real *y,             // y (T, out)
                           const real *x,       // x (T, in)
                           const int32_t *slot, // slot (T)
                           const K(lora_ab) *set, int n, int64_t T, int64_t in, int64_t out);
// Reference backward, accumulating: dx += s dy B A per row; da[s] += s (dy B)^T x and
// db[s] += s dy^T (x A^T) over the rows of slot s. dx, da, db (and da[s], db[s]) may be NULL.
void K(lora_multi_bwd_ref)(real *dx,            // dx (T, in) or NULL
                           real *const *da,     // da[s] (r_s, in) or NULL
                           real *const *db,     // db[s] (out, r_s) or NULL
                           const real *dy,      // dy (T, out)
                           const real *x,       // x (T, in)
                           const int32_t *slot, // slot (T)
                           const K(lora_ab) *set, int n, int64_t T, int64_t in, int64_t out);

// Workspace (bytes) of the optimized kernels.
size_t K(lora_multi_ws_bytes)(const K(lora_ab) *set, int n, int64_t T, int64_t in,
                              int64_t out);
// Optimized forward: rows grouped by slot (stable), each group gathered and put through two
// batch-invariant products (k_bi.h), h = x A^T then d = h B^T, and scaled: y = d * s, the
// same arithmetic as linear -> linear -> scale on one adapter, and a row's result depends
// on that row alone.
// bx (T) or NULL: rows t with bx[t] != 0 take h B^T as bf16 pairs (bxq_linear,
// k_bx.h; f32 only), bx_ws then holding lora_multi_bx_ws_bytes. acc: y holds values that
// the terms are added to (y + d * s per element, rows of no adapter left as they are)
// instead of being overwritten.
void K(lora_multi_fwd)(real *y, const real *x, const int32_t *slot, const uint8_t *bx,
                       const K(lora_ab) *set, int n, int64_t T, int64_t in, int64_t out,
                       int nthreads, void *ws, void *bx_ws, bool acc);
// Bytes of lora_multi_fwd's bx_ws for a team of nthreads threads.
size_t K(lora_multi_bx_ws_bytes)(const K(lora_ab) *set, int n, int64_t T, int nthreads);
// Optimized backward (BLAS per group), same contract as the reference.
void K(lora_multi_bwd)(real *dx, real *const *da, real *const *db, const real *dy,
                       const real *x, const int32_t *slot, const K(lora_ab) *set, int n,
                       int64_t T, int64_t in, int64_t out, void *ws);
