// autograd/cuda/k_linear.cu: linear (y = x W^T) through cuBLASLt and RMSNorm, forward and
// backward, for f32 and bf16 activations. Mirrors cpu/k_linear.c: the three products of
// linear are the same GEMMs (backward accumulates with beta = 1), RMSNorm keeps the CPU's
// double statistic and double backward arithmetic. Not here: bias terms, quantized weights
// (k_quant.cu).
#include "cu_internal.cuh"

typedef __nv_bfloat16 bf16;

#define DISPATCH(dt, call)                     \
    do {                                       \
        if ((dt) == MOLT_CUDA_BF16) {          \
            typedef bf16 T;                    \
            call;                              \
        } else {                               \
            typedef float T;                   \
            call;                              \
        }                                      \
    } while (0)

// ---- linear --------------------------------------------------------------------------------

extern "C" int molt_cuda_linear_fwd(molt_cuda_dtype dt, void *y, const void *x, const void *w,
                                    int64_t T, int64_t in, int64_t out) {
    return cu_gemm(dt, dt, false, true, T, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
}

extern "C" int molt_cuda_linear_bwd_x(molt_cuda_dtype dt, void *dx, const void *dy,
                                      const void *w, int64_t T, int64_t in, int64_t out) {
    return cu_gemm(dt, dt, false, false, T, in, out, 1.0f, dy, out, w, in, 1.0f, dx, in);
}

extern "C" int molt_cuda_linear_bwd_w(molt_cuda_dtype dt, void *dw, const void *dy,
                                      const void *x, int64_t T, int64_t in, int64_t out) {
    return cu_gemm(dt, dt, true, false, out, in, T, 1.0f, dy, out, x, in, 1.0f, dw, in);
}

// ---- RMSNorm -------------------------------------------------------------------------------

static int row_threads(int64_t cols) {
    int64_t t = (cols + 31) / 32 * 32;
    return t > 256 ? 256 : (int)t;
}

// One block per row: ss in double, r = float(1 / sqrt(ss / C + eps)), y = (x r) w.
template <typename T>
__global__ static void rms_fwd_kernel(T *y, float *rstd, const T *x, const T *w, int64_t C,
                                      double eps) {
    __shared__ double red[32];
    int64_t off = (int64_t)blockIdx.x * C;
    double ss = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        double v = cu_ld(x, off + j);
        ss += v * v;
    }
    ss = cu_block_sum_d(ss, red);
    float r = (float)(1.0 / sqrt(ss / (double)C + eps));
    if (rstd && threadIdx.x == 0)
        rstd[blockIdx.x] = r;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
        cu_st(y, off + j, __fmul_rn(__fmul_rn(cu_ld(x, off + j), r), cu_ld(w, j)));
}

// dx_j += r w_j dy_j - x_j r^3 / C sum_k dy_k w_k x_k, in double as rms_row_dx.
template <typename T>
__global__ static void rms_dx_kernel(T *dx, const T *dy, const T *x, const T *w,
                                     const float *rstd, int64_t C) {
    __shared__ double red[32];
    int64_t off = (int64_t)blockIdx.x * C;
    double dot = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x)
        dot += (double)cu_ld(dy, off + j) * cu_ld(w, j) * cu_ld(x, off + j);
    dot = cu_block_sum_d(dot, red);
    double r = rstd[blockIdx.x];
    double c = r * r * r * dot / (double)C;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        double v = r * cu_ld(w, j) * cu_ld(dy, off + j) - c * cu_ld(x, off + j);
        cu_st(dx, off + j, __fadd_rn(cu_ld(dx, off + j), (float)v));
    }
}

// dw: rows split into S stripes; part (S, C) doubles, then summed over stripes in order.
#define RMS_STRIPES 64

template <typename T>
__global__ static void rms_dw_part_kernel(double *part, const T *dy, const T *x,
                                          const float *rstd, int64_t T_, int64_t C, int S) {
    int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int s = blockIdx.y;
    if (j >= C)
        return;
    double acc = 0;
    for (int64_t t = s; t < T_; t += S)
        acc += (double)cu_ld(dy, t * C + j) * cu_ld(x, t * C + j) * (double)rstd[t];
    part[(int64_t)s * C + j] = acc;
}

template <typename T>
__global__ static void rms_dw_sum_kernel(T *dw, const double *part, int64_t C, int S) {
    int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= C)
        return;
    double acc = 0;
    for (int s = 0; s < S; s++)
        acc += part[(int64_t)s * C + j];
    cu_st(dw, j, __fadd_rn(cu_ld(dw, j), (float)acc));
}

static int check_rms(int64_t T, int64_t C) {
    if (T > 0x7fffffff || C < 1)
        return cu_fail(__FILE__, __LINE__, "rmsnorm: %lld rows of %lld", (long long)T,
                       (long long)C);
    return 0;
}

extern "C" int molt_cuda_rmsnorm_fwd(molt_cuda_dtype dt, void *y, float *rstd, const void *x,
                                     const void *w, int64_t rows, int64_t C, double eps) {
    if (rows <= 0)
        return 0;
    CU_TRY(check_rms(rows, C));
    CU_TRY(cu_ready());
    DISPATCH(dt, (rms_fwd_kernel<T><<<(unsigned)rows, row_threads(C), 0, cu_stream()>>>(
                     (T *)y, rstd, (const T *)x, (const T *)w, C, eps)));
    CU_LAUNCHED("rms_fwd_kernel");
    return 0;
}

extern "C" size_t molt_cuda_rmsnorm_ws_bytes(int64_t rows, int64_t C) {
    int64_t S = rows < RMS_STRIPES ? (rows > 0 ? rows : 1) : RMS_STRIPES;
    return (size_t)(S * C) * sizeof(double);
}

extern "C" int molt_cuda_rmsnorm_bwd(molt_cuda_dtype dt, void *dx, void *dw, const void *dy,
                                     const void *x, const void *w, const float *rstd, int64_t rows,
                                     int64_t C, void *ws) {
    if (rows <= 0)
        return 0;
    CU_TRY(check_rms(rows, C));
    CU_TRY(cu_ready());
    cudaStream_t st = cu_stream();
    if (dx) {
        DISPATCH(dt, (rms_dx_kernel<T><<<(unsigned)rows, row_threads(C), 0, st>>>(
                         (T *)dx, (const T *)dy, (const T *)x, (const T *)w, rstd, C)));
        CU_LAUNCHED("rms_dx_kernel");
    }
    if (dw) {
        int S = rows < RMS_STRIPES ? (int)rows : RMS_STRIPES;
        dim3 grid((unsigned)((C + 255) / 256), (unsigned)S);
        double *part = (double *)ws;
        DISPATCH(dt, (rms_dw_part_kernel<T><<<grid, 256, 0, st>>>(part, (const T *)dy,
                                                                   (const T *)x, rstd, rows, C, S)));
        CU_LAUNCHED("rms_dw_part_kernel");
        DISPATCH(dt, (rms_dw_sum_kernel<T><<<(unsigned)((C + 255) / 256), 256, 0, st>>>(
                         (T *)dw, part, C, S)));
        CU_LAUNCHED("rms_dw_sum_kernel");
    }
    return 0;
}
