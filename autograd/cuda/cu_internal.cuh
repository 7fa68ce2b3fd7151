// autograd/cuda/cu_internal.cuh: what the .cu files of autograd/cuda/ share: the error
// message and the checking macros (CUDA runtime and cuBLAS status codes, with file, line and
// the failing expression), the process's compute stream, element access for the two
// activation types (f32, bf16) and launch helpers. Not part of the C API (cuda_backend.h).
#ifndef MOLT_CU_INTERNAL_CUH
#define MOLT_CU_INTERNAL_CUH

#include "cuda_backend.h"

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// Sets this thread's CUDA error message (read back by molt_cuda_error) and returns 1.
int cu_fail(const char *file, int line, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

#define CU_CHECK(expr)                                                                   \
    do {                                                                                 \
        cudaError_t cu_e_ = (expr);                                                      \
        if (cu_e_ != cudaSuccess)                                                        \
            return cu_fail(__FILE__, __LINE__, "%s: %s (%s)", #expr,                     \
                           cudaGetErrorString(cu_e_), cudaGetErrorName(cu_e_));          \
    } while (0)

#define CUBLAS_CHECK(expr)                                                               \
    do {                                                                                 \
        cublasStatus_t cu_s_ = (expr);                                                   \
        if (cu_s_ != CUBLAS_STATUS_SUCCESS)                                              \
            return cu_fail(__FILE__, __LINE__, "%s: cuBLAS status %d", #expr, (int)cu_s_); \
    } while (0)

// Propagates a non-zero return of another molt_cuda / cu_ function.
#define CU_TRY(expr)                  \
    do {                              \
        int cu_r_ = (expr);           \
        if (cu_r_)                    \
            return cu_r_;             \
    } while (0)

// After every launch: launch errors at once; with MOLT_CUDA_SYNC=1 in the environment also
// execution errors (the stream is synchronized), so a failing kernel is named where it ran.
int cu_after_launch(const char *file, int line, const char *kernel);
#define CU_LAUNCHED(name) CU_TRY(cu_after_launch(__FILE__, __LINE__, name))

// The compute stream (created by molt_cuda_init, which every entry point calls first).
cudaStream_t cu_stream(void);
// Makes sure the stream, the cuBLAS/cuBLASLt handles and the tables exist.
int cu_ready(void);
// dlopen of a CUDA library by soname, then from the toolkit's library folder of the build
// (MOLT_CUDA_LIBDIR) when the loader's paths lack it; NULL with the loader's message in
// why (why_cap bytes) when neither opens.
void *cu_dlopen(const char *soname, char *why, size_t why_cap);

// Grid size for n independent items at `threads` per block, capped at 65535 x 8 blocks;
// kernels loop with a grid stride.
static inline unsigned cu_blocks(int64_t n, int threads) {
    int64_t b = (n + threads - 1) / threads;
    if (b < 1)
        b = 1;
    if (b > 65535 * 8)
        b = 65535 * 8;
    return (unsigned)b;
}

// Element access: activations are f32 or bf16, arithmetic is f32.
__device__ __forceinline__ float cu_ld(const float *p, int64_t i) { return p[i]; }
__device__ __forceinline__ float cu_ld(const __nv_bfloat16 *p, int64_t i) {
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ void cu_st(float *p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void cu_st(__nv_bfloat16 *p, int64_t i, float v) {
    p[i] = __float2bfloat16_rn(v);
}

// Sum over a warp (all 32 lanes active), result in every lane.
__device__ __forceinline__ float cu_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double cu_warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float cu_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum of a double (blockDim.x a multiple of 32, at most 1024); every thread gets
// the total. `red` is 32 doubles of shared memory. Adds in a fixed order: deterministic.
__device__ __forceinline__ double cu_block_sum_d(double v, double *red) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cu_warp_sum_d(v);
    __syncthreads(); // red may still be read by a previous call
    if (lane == 0)
        red[wid] = v;
    __syncthreads();
    double t = 0;
    for (int i = 0; i < nw; i++)
        t += red[i];
    return t;
}

__device__ __forceinline__ float cu_block_max(float v, float *red) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = cu_warp_max(v);
    __syncthreads();
    if (lane == 0)
        red[wid] = v;
    __syncthreads();
    float t = red[0];
    for (int i = 1; i < nw; i++)
        t = fmaxf(t, red[i]);
    return t;
}

// The cuBLAS / cuBLASLt entry points, opened on first use (see blas.cu).
int cu_blas_ready(void);
// Row-major C (M, N) = alpha op(A) op(B) + beta C through cuBLASLt, f32 compute. A and B
// are `ab` elements, C is `c` elements; ta/tb: A is stored (K, M) / B is stored (N, K) when
// set. f32 operands run with TF32 off.
int cu_gemm(molt_cuda_dtype ab, molt_cuda_dtype c, bool ta, bool tb, int64_t M, int64_t N,
            int64_t K, float alpha, const void *A, int64_t lda, const void *B, int64_t ldb,
            float beta, void *C, int64_t ldc);
// One GEMM per problem i, row-major, the same types, transposes and leading dimensions for
// all: C_i (M_i, N_i) = alpha op(A_i) op(B_i) + beta C_i with K_i the inner size. Problems
// with an empty M, N or K are skipped (with K_i == 0 and beta != 1, C_i is NOT scaled: the
// callers only pass beta 0 with K_i > 0 or beta 1). Uses cublasGemmGroupedBatchedEx when the
// library has it and takes the types (the pointer arrays go to `ptrs`, 3 * n device pointers
// of scratch), else one cu_gemm per problem.
int cu_gemm_grouped(molt_cuda_dtype ab, molt_cuda_dtype c, bool ta, bool tb, int n,
                    const int64_t *M, const int64_t *N, const int64_t *K, float alpha,
                    const void *const *A, int64_t lda, const void *const *B, int64_t ldb,
                    float beta, void *const *C, int64_t ldc, void **ptrs);

// Decodes flat elements [start, start + n) of a quantized weight into dst (dt), as
// molt_cuda_dequant does, without the entry checks (k_quant.cu).
int cu_dequant(molt_cuda_dtype dt, void *dst, const molt_cuda_qw *w, int64_t start, int64_t n);

static inline size_t cu_dtype_size(molt_cuda_dtype dt) { return dt == MOLT_CUDA_BF16 ? 2 : 4; }

// Aligns workspace pieces to 256 bytes.
static inline size_t cu_align(size_t b) { return (b + 255) & ~(size_t)255; }
// Takes `bytes` from the workspace cursor *p (advancing it).
static inline void *cu_take(char **p, size_t bytes) {
    void *r = *p;
    *p += cu_align(bytes);
    return r;
}

#endif
