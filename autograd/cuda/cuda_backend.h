// autograd/cuda/cuda_backend.h: the C-callable surface of the CUDA code (compiled by nvcc
// only when the build has CUDA; autograd/backend_cuda.c turns tensors into these calls).
//
// Conventions. Every function returns 0 on success and non-zero on failure, with a message
// (file, line, the failing call and the CUDA or cuBLAS error) readable by molt_cuda_error()
// on the same thread. All work is queued on one compute stream per process and is
// asynchronous unless a function says it synchronizes; pointers named like tensors are
// device pointers. Activations come as f32 or bf16 (`dt`); arithmetic is f32 (sums of a
// whole row in double where the CPU reference does so), and results are rounded to `dt`
// once. Backward kernels accumulate (+=) into their gradient outputs, as the CPU kernels
// of autograd/cpu/ do; each kernel mirrors the CPU reference kernel named beside it, which
// is the ground truth its tests compare against. Kernels that need scratch take a
// workspace `ws` of the size the matching *_ws_bytes function gives (never allocate).
#ifndef MOLT_CUDA_BACKEND_H
#define MOLT_CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { MOLT_CUDA_F32 = 0, MOLT_CUDA_BF16 = 1 } molt_cuda_dtype;

// ---- runtime (cuda_backend.cu) ------------------------------------------------------------
const char *molt_cuda_error(void); // the message of this thread's last failure
int molt_cuda_device_count(int *n);
int molt_cuda_device_props(int dev, char *name, size_t name_cap, int *sm_major, int *sm_minor,
                           size_t *total_mem);
int molt_cuda_mem_info(size_t *free_bytes, size_t *total_bytes);
int molt_cuda_runtime_version(int *v);
int molt_cuda_cublas_version(int *v); // major*10000 + minor*100 + patch; needs no GPU
int molt_cuda_cudnn_version(void);    // opened to read it (unused yet); 0 when absent
int molt_cuda_nccl_version(void);     // opened to read it (unused yet); 0 when absent
// Device 0, its compute stream; every other function calls it first. Idempotent.
int molt_cuda_init(void);
int molt_cuda_malloc(void **p, size_t bytes); // one cudaMalloc (arenas call it once each)
int molt_cuda_free(void *p);                  // waits for the stream first
int molt_cuda_memset(void *p, int v, size_t bytes);
int molt_cuda_h2d(void *dst, const void *src, size_t bytes); // src reusable on return
int molt_cuda_d2h(void *dst, const void *src, size_t bytes); // synchronizes
int molt_cuda_d2d(void *dst, const void *src, size_t bytes);
int molt_cuda_sync(void);
// Event pair around stream work: start records ev[0]; stop records ev[1], waits and gives
// the seconds between them.
int molt_cuda_timer_start(void **ev);
int molt_cuda_timer_stop(void **ev, double *seconds);

// ---- matrix products (blas.cu) -------------------------------------------------------------
// Row-major C (M, N) = alpha op(A) op(B) + beta C through cuBLASLt with f32 compute: A is
// (M, K), or stored (K, M) when ta; B is (K, N), or stored (N, K) when tb. A and B are `ab`
// elements, C is `c` elements. f32 runs with TF32 off (parity with the CPU).
int molt_cuda_gemm(molt_cuda_dtype ab, molt_cuda_dtype c, int ta, int tb, int64_t M, int64_t N,
                   int64_t K, float alpha, const void *A, int64_t lda, const void *B,
                   int64_t ldb, float beta, void *C, int64_t ldc);
// The same product through the classic cublasGemmEx (the benchmarks' baseline).
int molt_cuda_gemm_cublas(molt_cuda_dtype ab, molt_cuda_dtype c, int ta, int tb, int64_t M,
                          int64_t N, int64_t K, float alpha, const void *A, int64_t lda,
                          const void *B, int64_t ldb, float beta, void *C, int64_t ldc);
// 1 when cuBLAS has cublasGemmGroupedBatchedEx (12.5 or newer), 0 otherwise or without GPU.
int molt_cuda_has_grouped_gemm(void);

// ---- elementwise, softmax, SwiGLU, embedding, dropout (k_nn.cu; cpu/k_elem.c, k_nn.c) ----
int molt_cuda_add(molt_cuda_dtype dt, void *y, const void *a, const void *b, int64_t n);
int molt_cuda_mul(molt_cuda_dtype dt, void *y, const void *a, const void *b, int64_t n);
int molt_cuda_scale(molt_cuda_dtype dt, void *y, const void *a, float s, int64_t n);
// g += dy; g += dy * o; g += dy * s (the backward accumulations of add, mul, scale)
int molt_cuda_acc(molt_cuda_dtype dt, void *g, const void *dy, int64_t n);
int molt_cuda_acc_mul(molt_cuda_dtype dt, void *g, const void *dy, const void *o, int64_t n);
int molt_cuda_acc_scale(molt_cuda_dtype dt, void *g, const void *dy, float s, int64_t n);
// dst (n) = src (n) converted (round to nearest even into bf16)
int molt_cuda_cast(molt_cuda_dtype dst_dt, void *dst, molt_cuda_dtype src_dt, const void *src,
                   int64_t n);
// g (n) += dy (n) converted to g's type
int molt_cuda_acc_cast(molt_cuda_dtype g_dt, void *g, molt_cuda_dtype dy_dt, const void *dy,
                       int64_t n);
int molt_cuda_fill(molt_cuda_dtype dt, void *y, float v, int64_t n);
// softmax over the last dim, sum in double (softmax_fwd_ref); backward dx += y (dy - dy.y)
int molt_cuda_softmax_fwd(molt_cuda_dtype dt, void *y, const void *x, int64_t rows,
                          int64_t cols);
int molt_cuda_softmax_bwd(molt_cuda_dtype dt, void *dx, const void *y, const void *dy,
                          int64_t rows, int64_t cols);
// y = silu(g) * u; dg += dy u silu'(g), du += dy silu(g) (dg or du may be NULL)
int molt_cuda_swiglu_fwd(molt_cuda_dtype dt, void *y, const void *g, const void *u, int64_t n);
int molt_cuda_swiglu_bwd(molt_cuda_dtype dt, void *dg, void *du, const void *g, const void *u,
                         const void *dy, int64_t n);
// y (n, c) = table[ids] (ids I32 (n), in [0, V)); backward dtable[ids[t]] += dy[t] by atomic
// adds (the order of repeated ids is not fixed: rounding may differ from run to run)
int molt_cuda_embedding_fwd(molt_cuda_dtype dt, void *y, const void *table,
                            const int32_t *ids, int64_t n, int64_t c);
int molt_cuda_embedding_bwd(molt_cuda_dtype dt, void *dtable, const void *dy,
                            const int32_t *ids, int64_t n, int64_t c);
// inverted dropout with the CPU's counter-based keep mask (same seed -> same mask)
// (element i draws the mask of flat index first + i)
int molt_cuda_dropout_fwd(molt_cuda_dtype dt, void *y, const void *x, uint64_t seed, double p,
                          int64_t first, int64_t n);
int molt_cuda_dropout_bwd(molt_cuda_dtype dt, void *dx, const void *dy, uint64_t seed,
                          double p, int64_t first, int64_t n);

// ---- linear and RMSNorm (k_linear.cu; cpu/k_linear.c) ------------------------------------
// y (T, out) = x (T, in) w (out, in)^T, overwritten
int molt_cuda_linear_fwd(molt_cuda_dtype dt, void *y, const void *x, const void *w, int64_t T,
                         int64_t in, int64_t out);
// dx (T, in) += dy (T, out) w (out, in)
int molt_cuda_linear_bwd_x(molt_cuda_dtype dt, void *dx, const void *dy, const void *w,
                           int64_t T, int64_t in, int64_t out);
// dw (out, in) += dy (T, out)^T x (T, in)
int molt_cuda_linear_bwd_w(molt_cuda_dtype dt, void *dw, const void *dy, const void *x,
                           int64_t T, int64_t in, int64_t out);
// y (T, C) = x rstd w with rstd (T, f32, may be NULL) = 1 / sqrt(mean(x^2) + eps), the
// mean of squares in double
int molt_cuda_rmsnorm_fwd(molt_cuda_dtype dt, void *y, float *rstd, const void *x,
                          const void *w, int64_t T, int64_t C, double eps);
size_t molt_cuda_rmsnorm_ws_bytes(int64_t T, int64_t C);
// dx (T, C) += .., dw (C) += .. (either may be NULL); dw summed over rows in a fixed order
int molt_cuda_rmsnorm_bwd(molt_cuda_dtype dt, void *dx, void *dw, const void *dy,
                          const void *x, const void *w, const float *rstd, int64_t T,
                          int64_t C, void *ws);

// ---- rotary embedding (k_rope.cu; cpu/k_rope.c) -------------------------------------------
#define MOLT_CUDA_ROPE_MAX_HALF 256
typedef struct {
    float inv_freq[MOLT_CUDA_ROPE_MAX_HALF]; // (half) rounded to float as the f32 CPU does
    int half;
    float attn; // cos/sin factor
} molt_cuda_rope;
// x, y (T, rows, D); rotates dims [start, start + 2 half) at positions pos (I32 (T)), pairs
// interleaved in, de-interleaved out; backward dx += R^T dy (dims outside the slice: dx += dy)
int molt_cuda_rope_fwd(molt_cuda_dtype dt, void *y, const void *x, const int32_t *pos,
                       const molt_cuda_rope *r, int64_t T, int64_t rows, int64_t D,
                       int64_t start);
int molt_cuda_rope_bwd(molt_cuda_dtype dt, void *dx, const void *dy, const int32_t *pos,
                       const molt_cuda_rope *r, int64_t T, int64_t rows, int64_t D,
                       int64_t start);

// ---- quantized weights (k_quant.cu; cpu/k_quant.c) -----------------------------------------
// A qweight in its stored form on the device (the fields of cpu/k_quant.h's kq_weight; the
// code tables live in constant memory, uploaded once by molt_cuda_set_quant_tables).
enum { MOLT_CUDA_Q_F32, MOLT_CUDA_Q_BF16, MOLT_CUDA_Q_INT8, MOLT_CUDA_Q_FP8, MOLT_CUDA_Q_NF4 };
typedef struct {
    int format;
    int64_t n_mat, rows, cols;
    const void *data;
    const float *scale;        // INT8 per row; FP8 per row or per matrix; NF4 plain absmax
    int scale_per_row;         // FP8
    const uint8_t *absmax_q;   // NF4 double-quantized absmax codes, or NULL
    const float *absmax_scale; // NF4 second-level scales (one per 256 blocks)
    float absmax_offset;
} molt_cuda_qw;
// nf4 (16), dyn (256) and fp8 (256) code tables, copied to constant memory.
int molt_cuda_set_quant_tables(const float *nf4, const float *dyn, const float *fp8);
// dst (n) = flat elements [start, start + n) of w, decoded in f32 as kq_elem does (same
// bits), then rounded to dt
int molt_cuda_dequant(molt_cuda_dtype dt, void *dst, const molt_cuda_qw *w, int64_t start,
                      int64_t n);
// y (T, rows) = x (T, cols) W_e^T, overwritten: NF4 with T <= 8 reads the packed weights
// directly (molt_cuda_nf4_gemv), else rows of W_e are decoded into ws by tiles and go
// through cuBLASLt
size_t molt_cuda_qlinear_ws_bytes(molt_cuda_dtype dt, const molt_cuda_qw *w, int64_t T);
int molt_cuda_qlinear_fwd(molt_cuda_dtype dt, void *y, const void *x, const molt_cuda_qw *w,
                          int64_t e, int64_t T, void *ws);
// dx (T, cols) += dy (T, rows) W_e
int molt_cuda_qlinear_bwd_x(molt_cuda_dtype dt, void *dx, const void *dy,
                            const molt_cuda_qw *w, int64_t e, int64_t T, void *ws);
// The decode GEMV: 1 <= T <= 8, NF4 only; y overwritten. Sums in f32.
#define MOLT_CUDA_GEMV_MAX_T 8
int molt_cuda_nf4_gemv(molt_cuda_dtype dt, void *y, const void *x, const molt_cuda_qw *w,
                       int64_t e, int64_t T);

// ---- MoE router and routed experts (k_moe.cu; cpu/k_moe.c, k_moe_lora.c, k_quant.c) ----
// Router in f32: probs (T, E) = softmax(logits) (sum in double); group-limited top-k as
// moe_router_fwd (ties: lowest index); w (T, k), idx (T, k).
int molt_cuda_router_fwd(float *w, int32_t *idx, float *probs, const float *logits, int64_t T,
                         int64_t E, int64_t k, int64_t n_group, int64_t topk_group, int norm,
                         float scaling);
// dlogits (T, E) += through scaling, normalization, gather and softmax
int molt_cuda_router_bwd(float *dlogits, const float *dw, const float *probs,
                         const int32_t *idx, int64_t T, int64_t E, int64_t k, int norm,
                         float scaling);
// Routed experts: y[t] = sum_j w[t,j] down_e(silu(gate_e x_t) * up_e x_t), e = idx[t,j], with
// expert e's weights dense (wgu (E, 2I, H) gate rows first, wd (E, H, I), dt) or quantized
// (qgu, qd) and an optional LoRA in PEFT's layout (a_gu (r E, H), b_gu (2I, r E), a_d
// (r E, I), b_d (H, r E), dt; a NULL pair = none): W_e + s B_e A_e, never merged.
typedef struct {
    molt_cuda_dtype dt;
    int64_t T, k, E, H, I;
    const void *x;       // (T, H)
    const void *w;       // (T, k) routing weights
    const int32_t *idx;  // (T, k), values in [0, E)
    const void *wgu, *wd;               // dense stacks, or NULL with qgu/qd
    const molt_cuda_qw *qgu, *qd;       // quantized stacks (host structs), or NULL
    const void *a_gu, *b_gu, *a_d, *b_d; // LoRA or NULL
    int64_t r;
    float s;
} molt_cuda_experts;
typedef struct {
    void *dx;  // (T, H) or NULL
    void *dw;  // (T, k) or NULL
    void *da_gu, *db_gu, *da_d, *db_d; // LoRA gradients or NULL
} molt_cuda_experts_grads;
size_t molt_cuda_experts_ws_bytes(const molt_cuda_experts *p);
// y (T, H) overwritten. Synchronizes once (the per-expert row counts size the GEMMs).
int molt_cuda_experts_fwd(const molt_cuda_experts *p, void *y, void *ws);
// recomputes the forward's intermediates, then accumulates every non-NULL gradient
int molt_cuda_experts_bwd(const molt_cuda_experts *p, const void *dy,
                          const molt_cuda_experts_grads *g, void *ws);

// ---- fused output projection + cross-entropy (k_ce.cu; cpu/k_ce.c) ------------------------
// Logits z = h w^T (+ h2 w2^T) a vocabulary chunk at a time, never (T, V) at once.
typedef struct {
    molt_cuda_dtype dt;
    int64_t T, C, V, chunk, R; // R = 0: no low-rank term
    const void *h;             // (T, C)
    const void *w;             // (V, C)
    const void *h2, *w2;       // (T, R), (V, R) or NULL
    const int32_t *targets;    // (T) in [0, V)
} molt_cuda_ce;
size_t molt_cuda_ce_ws_bytes(const molt_cuda_ce *p);
// lse (T) = logsumexp_v z[t, v] and zt (T) = z[t, target] (double, device)
int molt_cuda_ce_fwd(const molt_cuda_ce *p, double *lse, double *zt, void *ws);
// g = coef_t (softmax(z_t) - onehot), coef_t = scale * mask[t] (mask (T) dt or NULL = 1):
// dh += g w, dw += g^T h, dh2 += g w2, dw2 += g^T h2 (any may be NULL)
int molt_cuda_ce_bwd(const molt_cuda_ce *p, const void *mask, double scale, const double *lse,
                     void *dh, void *dw, void *dh2, void *dw2, void *ws);

// ---- optimizer (k_optim.cu; train/optim.c) ---------------------------------------------------
// One AdamW update of one f32 parameter tensor, scalars as train/optim.c forms them.
typedef struct {
    float *p;
    const float *g;
    float *m, *v;
    int64_t n;
    float decay, w1, b2, c2, neg_step, bc2_sqrt, eps;
    int apply_decay;
} molt_cuda_adamw_item;
size_t molt_cuda_multi_ws_bytes(int n, const int64_t *numel);
// Every item in one launch; per element the same float operations, in the same order and
// without contraction, as train/optim.c (equal bits).
int molt_cuda_adamw(const molt_cuda_adamw_item *items, int n, void *ws);
// sumsq[i] (host) = sum of squares of x[i] (numel[i] f32), in double, in a fixed order;
// one launch for all tensors plus one reduction. Synchronizes.
int molt_cuda_sumsq(const float *const *x, const int64_t *numel, int n, double *sumsq,
                    void *ws);
// x[i] *= s for every tensor, one launch.
int molt_cuda_multi_scale(float *const *x, const int64_t *numel, int n, float s, void *ws);

#ifdef __cplusplus
}
#endif
#endif
