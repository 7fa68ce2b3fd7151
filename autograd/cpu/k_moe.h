// autograd/cpu/k_moe.h: MoE router and routed-expert kernels (prototypes; no include guard on
// purpose). Sizes: T tokens, E experts, k experts per token, H hidden, I expert intermediate
// size, G groups. Operands are validated by the op (ops_moe.c): idx values lie in [0, E).
#include <stddef.h>

// Router forward. probs = softmax(logits) per row; with topk_group < n_group only the
// topk_group groups with the largest sum of their top-2 probs stay eligible; idx gets the k
// eligible experts with the largest probs, in descending order (lowest index first among
// equal values, for groups too); w = chosen probs, divided by their sum + 1e-20 when norm,
// times scaling. gscore is scratch. par != 0 lets large batches of rows use OpenMP threads.
void K(moe_router_fwd)(real *w,             // w (T, k)
                       int32_t *idx,        // idx (T, k)
                       real *probs,         // probs (T, E)
                       real *gscore,        // gscore (T, G) scratch
                       const real *logits,  // logits (T, E)
                       int64_t T, int64_t E, int64_t k, int64_t n_group, int64_t topk_group,
                       int norm, real scaling, int par);
// Router backward: dlogits += d(w)/d(logits)^T dw through scaling, normalization, the gather
// of the chosen probs and the softmax over all E.
void K(moe_router_bwd)(real *dlogits,       // dlogits (T, E), accumulated
                       const real *dw,      // dw (T, k)
                       const real *probs,   // probs (T, E) saved by the forward
                       const int32_t *idx,  // idx (T, k)
                       int64_t T, int64_t E, int64_t k, int norm, real scaling);

// Routed experts, reference loops: y[t] = sum_j w[t,j] * down_e(silu(gate_e x_t) * up_e x_t)
// with e = idx[t,j]. y is overwritten.
void K(moe_experts_fwd_ref)(real *y,            // y (T, H)
                            const real *x,      // x (T, H)
                            const real *w,      // w (T, k)
                            const int32_t *idx, // idx (T, k)
                            const real *wgu,    // wgu (E, 2I, H), gate rows first
                            const real *wd,     // wd (E, H, I)
                            int64_t T, int64_t k, int64_t H, int64_t I);
// Backward of the above, recomputing gate/up per (t, j). dx and dw are accumulated; either
// may be NULL when that input needs no gradient.
void K(moe_experts_bwd_ref)(real *dx,           // dx (T, H) or NULL
                            real *dw,           // dw (T, k) or NULL
                            const real *dy,     // dy (T, H)
                            const real *x,      // x (T, H)
                            const real *w,      // w (T, k)
                            const int32_t *idx, // idx (T, k)
                            const real *wgu,    // wgu (E, 2I, H)
                            const real *wd,     // wd (E, H, I)
                            int64_t T, int64_t k, int64_t H, int64_t I);

// Bytes of workspace the optimized expert kernels need.
size_t K(moe_experts_ws_bytes)(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I);
// Optimized forward: slots sorted by expert, gathered, two GEMMs per block of rows, results
// added to the tokens' rows in a fixed order (same result for any thread count).
void K(moe_experts_fwd)(real *y, const real *x, const real *w, const int32_t *idx,
                        const real *wgu, const real *wd, int64_t T, int64_t k, int64_t E,
                        int64_t H, int64_t I, void *ws);
// Inference forward (same contract and workspace): the GEMMs are batch-invariant products
// (bi_linear, k_bi.h), so a token's row depends on that token alone: the experts it chose
// are added in increasing expert order whatever the other tokens are. nthreads as bi_linear.
void K(moe_experts_fwd_bi)(real *y, const real *x, const real *w, const int32_t *idx,
                           const real *wgu, const real *wd, int64_t T, int64_t k, int64_t E,
                           int64_t H, int64_t I, int nthreads, void *ws);
// Optimized backward (same contract as the reference one), three GEMMs per block of rows.
void K(moe_experts_bwd)(real *dx, real *dw, const real *dy, const real *x, const real *w,
                        const int32_t *idx, const real *wgu, const real *wd, int64_t T,
                        int64_t k, int64_t E, int64_t H, int64_t I, void *ws);
// Shared by the expert kernels (plain, LoRA, quantized): stable counting sort of n routing
// slots by expert (off (E+1) prefix sums, cur (E) scratch, perm (n) slot of each sorted
// position), gathering the slots' token rows, and adding rows back to their tokens.
void K(moe_dispatch)(int64_t *off, int64_t *cur, int32_t *perm, const int32_t *idx, int64_t n,
                     int64_t E);
void K(moe_gather)(real *dst, const real *src, const int32_t *perm, int64_t nb, int64_t k,
                   int64_t H);                                        // dst (nb, H), src (T, H)
void K(moe_scatter_add)(real *dst, const real *src, const int32_t *perm, int64_t nb,
                        int64_t k, int64_t H);                        // dst (T, H), src (nb, H)
