// autograd/cpu/k_quant.h: kernels for linear layers and routed experts whose weight is a
// frozen quantized matrix (prototypes; the kernel view type has a guard, the prototypes have
// none on purpose: read once per element type). `_ref` kernels dequantize one element at a
// time and multiply with plain loops (the ground truth); the others dequantize a tile of the
// weight into a small per-thread buffer and hand it to BLAS, OpenMP across tiles. The full
// dequantized matrix is never held. Backward kernels accumulate (+=) into their outputs.
// Sizes: T rows of activations; each weight matrix is [rows = out, cols = in].
#include <stddef.h>
#include <stdint.h>

#ifndef MOLT_K_QUANT_TYPES
#define MOLT_K_QUANT_TYPES

// Same order as ag_qformat (autograd.h).
enum { KQ_F32, KQ_BF16, KQ_INT8, KQ_FP8, KQ_NF4 };

// What a kernel needs to decode a quantized weight of n_mat matrices [rows, cols], stored
// row-major over the flattened [n_mat, rows, cols] tensor (filled by quant.c from an
// ag_qweight; operands are validated there).
typedef struct {
    int format;
    int64_t n_mat, rows, cols;
    const void *data;           // see ag_qweight.data
    const float *scale;         // INT8 per row; FP8 per row or per matrix; NF4 plain absmax
    int scale_per_row;          // FP8: 1 when scale has one entry per row
    const uint8_t *absmax_q;    // NF4 double-quantized absmax codes, or NULL
    const float *absmax_scale;  // NF4 second-level scales (one per 256 blocks)
    float absmax_offset;        // NF4 mean absmax added back
    const float *nf4_code;      // (16) NF4 code values
    const float *dyn_code;      // (256) signed dynamic map for the absmax codes
    const float *fp8_code;      // (256) E4M3 byte -> value
} kq_weight;

#endif

// One element (flat index i over all matrices), decoded the plain way.
real K(kq_elem)(const kq_weight *w, int64_t i);
// dst (n) = elements [start, start + n) of the flattened weight, block by block. Gives the
// same values as kq_elem.
void K(kq_dequant_range)(real *dst, const kq_weight *w, int64_t start, int64_t n);

// y (T, rows) = x (T, cols) . W_e^T, W_e = matrix e (rows, cols). y is overwritten.
void K(qlinear_fwd_ref)(real *y, const real *x, const kq_weight *w, int64_t e, int64_t T);
// dx (T, cols) += dy (T, rows) . W_e
void K(qlinear_bwd_x_ref)(real *dx, const real *dy, const kq_weight *w, int64_t e, int64_t T);

// Bytes of scratch the optimized kernels need for T rows with up to `nthreads` threads.
size_t K(qlinear_ws_bytes)(const kq_weight *w, int64_t T, int nthreads);
// Optimized versions of the above (same contracts); ws holds qlinear_ws_bytes(w, T, nthreads)
// bytes. Small problems run on one thread whatever nthreads says.
void K(qlinear_fwd)(real *y, const real *x, const kq_weight *w, int64_t e, int64_t T,
                    int nthreads, void *ws);
void K(qlinear_bwd_x)(real *dx, const real *dy, const kq_weight *w, int64_t e, int64_t T,
                      int nthreads, void *ws);

// Routed experts with quantized weights: gu has E matrices (2I, H) (gate rows first), down E
// matrices (H, I). Contracts as moe_experts_fwd_ref / moe_experts_bwd_ref (k_moe.h): y is
// overwritten; dx and dw are accumulated and either may be NULL. idx values lie in [0, E).
void K(qmoe_fwd_ref)(real *y,              // y (T, H)
                     const real *x,        // x (T, H)
                     const real *w,        // w (T, k)
                     const int32_t *idx,   // idx (T, k)
                     const kq_weight *gu, const kq_weight *down, int64_t T, int64_t k);
void K(qmoe_bwd_ref)(real *dx,             // dx (T, H) or NULL
                     real *dw,             // dw (T, k) or NULL
                     const real *dy,       // dy (T, H)
                     const real *x, const real *w, const int32_t *idx,
                     const kq_weight *gu, const kq_weight *down, int64_t T, int64_t k);
// Workspace of the optimized expert kernels.
size_t K(qmoe_ws_bytes)(const kq_weight *gu, const kq_weight *down, int64_t T, int64_t k,
                        int nthreads);
// Optimized: slots sorted by expert, gathered in blocks, each block through the fused
// quantized GEMMs above; results added to the tokens' rows in a fixed order.
void K(qmoe_fwd)(real *y, const real *x, const real *w, const int32_t *idx,
                 const kq_weight *gu, const kq_weight *down, int64_t T, int64_t k,
                 int nthreads, void *ws);
// Inference forward (same contract and workspace) on the batch-invariant products
// (bi_linear_q, k_bi.h): a token's row depends on that token alone.
void K(qmoe_fwd_bi)(real *y, const real *x, const real *w, const int32_t *idx,
                    const kq_weight *gu, const kq_weight *down, int64_t T, int64_t k,
                    int nthreads, void *ws);
void K(qmoe_bwd)(real *dx, real *dw, const real *dy, const real *x, const real *w,
                 const int32_t *idx, const kq_weight *gu, const kq_weight *down, int64_t T,
                 int64_t k, int nthreads, void *ws);
