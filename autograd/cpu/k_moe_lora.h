// autograd/cpu/k_moe_lora.h: kernels of the routed experts with LoRA on the expert weights
// (prototypes; no include guard on purpose). Sizes as in k_moe.h (T tokens, E experts, k
// experts per token, H hidden, I expert intermediate size) plus r, the LoRA rank.
//
// LoRA matrices come in PEFT's stored layout for a 3D parameter W [E, O, In]:
// A [r*E, In] (rows e*r..e*r+r-1 belong to expert e) and B [O, r*E] (column k*E + e is
// expert e, rank k); W_eff[e] = W[e] + s * B_e A_e (see ops_moe_lora.c for the derivation).
// Operands are validated by the op (ops_moe_lora.c): idx values lie in [0, E).
// The quantized variants take the kq_weight view of k_quant.h (read before this file).
#include <stddef.h>

// The LoRA of one expert stack pair. A NULL a_gu (a_d) means gate_up (down) has no LoRA.
typedef struct {
    const real *a_gu; // a_gu (r*E, H) or NULL
    const real *b_gu; // b_gu (2I, r*E)
    const real *a_d;  // a_d (r*E, I) or NULL
    const real *b_d;  // b_d (H, r*E)
    int64_t r;
    real s;           // scaling: alpha / r, or alpha / sqrt(r) with rsLoRA
    // Optional (read by moe_multi_fwd only): b_gu and b_d re-laid per expert, (E, 2I, r) and
    // (E, H, r), the same values: expert e's B is then one contiguous block.
    const real *bp_gu, *bp_d;
} K(moe_lora);

// Gradient buffers of the four LoRA matrices (same shapes), accumulated; NULL when not
// needed.
typedef struct {
    real *a_gu, *b_gu, *a_d, *b_d;
} K(moe_lora_grad);

// Reference: w_eff[e] = w[e] + s * B_e A_e for every expert, the dense delta materialized.
// With a NULL a, w_eff is a copy of w.
void K(moe_lora_merge)(real *w_eff,        // w_eff (E, O, In)
                       const real *w,      // w (E, O, In)
                       const real *a,      // a (r*E, In) or NULL
                       const real *b,      // b (O, r*E)
                       int64_t E, int64_t O, int64_t In, int64_t r, real s);

// Reference: gradients of the merged expert weights, dw_gu[e] += sum over the slots routed
// to e of dh x^T and dw_d[e] += dy z^T (h the gate/up pre-activations, z the routing-weighted
// SwiGLU output), recomputed per slot from the merged weights.
void K(moe_experts_dweight_ref)(real *dw_gu,        // dw_gu (E, 2I, H), accumulated
                                real *dw_d,         // dw_d (E, H, I), accumulated
                                const real *dy,     // dy (T, H)
                                const real *x,      // x (T, H)
                                const real *w,      // w (T, k)
                                const int32_t *idx, // idx (T, k)
                                const real *wgu,    // wgu (E, 2I, H) merged
                                const real *wd,     // wd (E, H, I) merged
                                int64_t T, int64_t k, int64_t H, int64_t I);

// Reference chain rule from a merged weight's gradient to its LoRA factors:
// dA_e += s B_e^T dW[e], dB_e += s dW[e] A_e^T. Either of da, db may be NULL.
void K(moe_lora_grad_from_dense)(real *da,         // da (r*E, In) or NULL, accumulated
                                 real *db,         // db (O, r*E) or NULL, accumulated
                                 const real *dw,   // dw (E, O, In)
                                 const real *a,    // a (r*E, In)
                                 const real *b,    // b (O, r*E)
                                 int64_t E, int64_t O, int64_t In, int64_t r, real s);

// Bytes of workspace the optimized kernels need.
size_t K(moe_experts_lora_ws_bytes)(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                                    int64_t r);
// Optimized forward, y overwritten: slots sorted by expert, per block of rows the base GEMMs
// plus the low-rank products (X A_e^T) B_e^T; no dense delta is formed.
void K(moe_experts_lora_fwd)(real *y,            // y (T, H)
                             const real *x,      // x (T, H)
                             const real *w,      // w (T, k)
                             const int32_t *idx, // idx (T, k)
                             const real *wgu,    // wgu (E, 2I, H)
                             const real *wd,     // wd (E, H, I)
                             const K(moe_lora) *lora,
                             int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, void *ws);
// Optimized backward: dx, dw and the LoRA gradients accumulated (any may be NULL).
void K(moe_experts_lora_bwd)(real *dx,           // dx (T, H) or NULL
                             real *dw,           // dw (T, k) or NULL
                             const K(moe_lora_grad) *g,
                             const real *dy,     // dy (T, H)
                             const real *x,      // x (T, H)
                             const real *w,      // w (T, k)
                             const int32_t *idx, // idx (T, k)
                             const real *wgu,    // wgu (E, 2I, H)
                             const real *wd,     // wd (E, H, I)
                             const K(moe_lora) *lora,
                             int64_t T, int64_t k, int64_t E, int64_t H, int64_t I, void *ws);

// Quantized expert stacks: gu holds E matrices (2I, H) (gate rows first), down E matrices
// (H, I). Same contracts as the two kernels above; each busy expert's matrices are decoded
// (kq_dequant_range) into a per-thread buffer and go through the same GEMMs, so with F32
// stacks the results equal the dense kernels' bit for bit. The workspace adds one decode
// buffer of 3IH reals per thread of the OpenMP team.
size_t K(moe_experts_lora_q_ws_bytes)(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                                      int64_t r);
void K(moe_experts_lora_q_fwd)(real *y,            // y (T, H)
                               const real *x,      // x (T, H)
                               const real *w,      // w (T, k)
                               const int32_t *idx, // idx (T, k)
                               const kq_weight *gu, const kq_weight *down,
                               const K(moe_lora) *lora,
                               int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                               void *ws);
void K(moe_experts_lora_q_bwd)(real *dx,           // dx (T, H) or NULL
                               real *dw,           // dw (T, k) or NULL
                               const K(moe_lora_grad) *g,
                               const real *dy,     // dy (T, H)
                               const real *x,      // x (T, H)
                               const real *w,      // w (T, k)
                               const int32_t *idx, // idx (T, k)
                               const kq_weight *gu, const kq_weight *down,
                               const K(moe_lora) *lora,
                               int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                               void *ws);
