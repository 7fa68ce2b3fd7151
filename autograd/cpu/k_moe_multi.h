// autograd/cpu/k_moe_multi.h: the routed experts of one batch whose tokens carry different
// adapters (prototypes; no include guard on purpose: read once per element type by
// cpu/kernels.h, after k_moe_lora.h and k_bi.h). Sizes as in k_moe.h (T tokens, E experts,
// k experts per token, H hidden, I expert intermediate size); n adapters, each a K(moe_lora)
// of k_moe_lora.h (PEFT's target_parameters layout) whose a_gu and a_d may both be NULL.
// Operands are validated by the op (ops_moe_multi.c). Forward only: the op's reference path
// and its backward run each adapter's rows through the single-adapter kernels.
#include <stddef.h>
#include <stdint.h>

// Expert weights: dense stacks, or quantized ones (one of the two pairs is set).
typedef struct {
    const real *gu;       // gu (E, 2I, H) gate rows first, or NULL
    const real *down;     // down (E, H, I), or NULL
    const kq_weight *qgu; // quantized gu (E matrices (2I, H)), or NULL
    const kq_weight *qd;  // quantized down (E matrices (H, I)), or NULL
} K(moe_stacks);

// Expert e's B_e from b (out, r*E), PEFT's layout, into bp (out, r): bp[o, q] = b[o, q*E + e].
void K(moe_lora_b_expert)(real *bp, const real *b, int64_t out, int64_t r, int64_t E,
                          int64_t e);
// Bytes of workspace moe_multi_fwd needs with a team of nthreads threads.
size_t K(moe_multi_ws_bytes)(const K(moe_stacks) *st, const K(moe_lora) *set, int n,
                             int64_t T, int64_t k, int64_t E, int64_t H, int64_t I,
                             int nthreads);
// bx (T) or NULL: tokens t with bx[t] != 0 take a quantized expert's base products, and
// their adapters' (X A_e^T) B_e^T, as bxq_linear computes them (k_bx.h; f32 only: on AMX
// where bxq_available(), else its reference), their rows sorted after the others' within
// each expert.
// y (T, H) overwritten: y[t] = sum_j w[t,j] * expert_e(x_t), e = idx[t,j], expert e with the
// LoRA of adapter slot[t] (-1: none) on its two matrices. The base products of an expert run
// once over all its rows, whatever their adapters (a quantized expert is decoded once per
// block of up to 256 rows); each adapter's low-rank terms are added to its own rows. All
// products are batch-invariant (k_bi.h) and a token's k expert outputs are summed in j
// order, so a token's result does not depend on the rest of the batch or the thread count.
void K(moe_multi_fwd)(real *y,             // y (T, H)
                      const real *x,       // x (T, H)
                      const real *w,       // w (T, k)
                      const int32_t *idx,  // idx (T, k)
                      const int32_t *slot, // slot (T)
                      const uint8_t *bx,   // bx (T) or NULL
                      const K(moe_stacks) *st, const K(moe_lora) *set, int n, int64_t T,
                      int64_t k, int64_t E, int64_t H, int64_t I, int nthreads, void *ws);
