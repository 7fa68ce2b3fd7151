// autograd/cuda/k_quant.cu: frozen quantized weights on the GPU, in their stored form (NF4
// packed two per byte with its absmax, plain or double-quantized; INT8 and FP8 codes with
// their scales; BF16; F32): decoding, the linear forward and input gradient, and the decode
// GEMV that reads NF4 weights directly for batch 1-8. Decoding mirrors cpu/k_quant.c's
// kq_elem bit for bit (f32 products and sums rounded as the CPU rounds them; no FMA
// contraction). Not here: encoding (autograd/quant.c), the routed experts (k_moe.cu uses
// cu_dequant below).
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

__constant__ float c_nf4[16], c_dyn[256], c_fp8[256];
static bool tables_set;

extern "C" int molt_cuda_set_quant_tables(const float *nf4, const float *dyn, const float *fp8) {
    CU_TRY(cu_ready());
    cudaStream_t st = cu_stream();
    CU_CHECK(cudaMemcpyToSymbolAsync(c_nf4, nf4, sizeof c_nf4, 0, cudaMemcpyHostToDevice, st));
    CU_CHECK(cudaMemcpyToSymbolAsync(c_dyn, dyn, sizeof c_dyn, 0, cudaMemcpyHostToDevice, st));
    CU_CHECK(cudaMemcpyToSymbolAsync(c_fp8, fp8, sizeof c_fp8, 0, cudaMemcpyHostToDevice, st));
    CU_CHECK(cudaStreamSynchronize(st)); // the host tables may go away
    tables_set = true;
    return 0;
}

// The decoding tables, copied to shared memory by each block (indices differ across a warp:
// constant memory would serialize them).
struct qtables {
    float nf4[16], dyn[256], fp8[256];
};

__device__ __forceinline__ void load_tables(qtables *t) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
        t->dyn[i] = c_dyn[i];
        t->fp8[i] = c_fp8[i];
        if (i < 16)
            t->nf4[i] = c_nf4[i];
    }
    __syncthreads();
}

// Absmax of NF4 block b: stored, or dyn[code] * second-level scale + offset (two roundings).
__device__ __forceinline__ float nf4_absmax(const molt_cuda_qw &w, const qtables *t, int64_t b) {
    if (!w.absmax_q)
        return w.scale[b];
    return __fadd_rn(__fmul_rn(t->dyn[w.absmax_q[b]], w.absmax_scale[b / 256]), w.absmax_offset);
}

__device__ __forceinline__ float row_scale(const molt_cuda_qw &w, int64_t i) {
    if (w.format == MOLT_CUDA_Q_FP8 && !w.scale_per_row)
        return w.scale[i / (w.rows * w.cols)];
    return w.scale[i / w.cols];
}

// kq_elem: flat element i.
__device__ __forceinline__ float q_elem(const molt_cuda_qw &w, const qtables *t, int64_t i) {
    switch (w.format) {
    case MOLT_CUDA_Q_F32: return ((const float *)w.data)[i];
    case MOLT_CUDA_Q_BF16: return __bfloat162float(((const bf16 *)w.data)[i]);
    case MOLT_CUDA_Q_INT8:
        return __fmul_rn((float)((const int8_t *)w.data)[i], row_scale(w, i));
    case MOLT_CUDA_Q_FP8:
        return __fmul_rn(t->fp8[((const uint8_t *)w.data)[i]], row_scale(w, i));
    default: {
        uint8_t byte = ((const uint8_t *)w.data)[i >> 1];
        int nib = (i & 1) ? byte & 15 : byte >> 4;
        return __fmul_rn(t->nf4[nib], nf4_absmax(w, t, i / 64));
    }
    }
}

template <typename T>
__global__ static void dequant_kernel(T *dst, molt_cuda_qw w, int64_t start, int64_t n) {
    __shared__ qtables tb;
    load_tables(&tb);
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (int64_t)gridDim.x * blockDim.x)
        cu_st(dst, k, q_elem(w, &tb, start + k));
}

static int check_qw(const molt_cuda_qw *w) {
    if (!tables_set)
        return cu_fail(__FILE__, __LINE__, "quantized weights: code tables not uploaded "
                       "(molt_cuda_set_quant_tables)");
    if (!w || w->format < MOLT_CUDA_Q_F32 || w->format > MOLT_CUDA_Q_NF4 || w->rows < 1 ||
        w->cols < 1 || w->n_mat < 1 || !w->data)
        return cu_fail(__FILE__, __LINE__, "quantized weights: bad view");
    return 0;
}

int cu_dequant(molt_cuda_dtype dt, void *dst, const molt_cuda_qw *w, int64_t start, int64_t n) {
    if (n <= 0)
        return 0;
    CU_TRY(check_qw(w));
    DISPATCH(dt, (dequant_kernel<T><<<cu_blocks(n, 256), 256, 0, cu_stream()>>>((T *)dst, *w,
                                                                              start, n)));
    CU_LAUNCHED("dequant_kernel");
    return 0;
}

extern "C" int molt_cuda_dequant(molt_cuda_dtype dt, void *dst, const molt_cuda_qw *w,
                                 int64_t start, int64_t n) {
    CU_TRY(cu_ready());
    return cu_dequant(dt, dst, w, start, n);
}

// ---- linear through decoded tiles ------------------------------------------------------------

// Decoded rows per tile: the whole matrix when it takes at most TILE_BYTES, else as many
// rows as fit.
#define TILE_BYTES ((size_t)64 << 20)

static int64_t tile_rows(molt_cuda_dtype dt, const molt_cuda_qw *w) {
    int64_t per_row = w->cols * (int64_t)cu_dtype_size(dt);
    int64_t r = (int64_t)TILE_BYTES / per_row;
    if (r < 1)
        r = 1;
    return r < w->rows ? r : w->rows;
}

extern "C" size_t molt_cuda_qlinear_ws_bytes(molt_cuda_dtype dt, const molt_cuda_qw *w,
                                             int64_t T) {
    (void)T;
    return (size_t)(tile_rows(dt, w) * w->cols) * cu_dtype_size(dt);
}

static int check_e(const molt_cuda_qw *w, int64_t e) {
    CU_TRY(check_qw(w));
    if (e < 0 || e >= w->n_mat)
        return cu_fail(__FILE__, __LINE__, "quantized linear: matrix %lld of %lld",
                       (long long)e, (long long)w->n_mat);
    return 0;
}

extern "C" int molt_cuda_qlinear_fwd(molt_cuda_dtype dt, void *y, const void *x,
                                     const molt_cuda_qw *w, int64_t e, int64_t T, void *ws) {
    if (T <= 0)
        return 0;
    CU_TRY(cu_ready());
    CU_TRY(check_e(w, e));
    if (w->format == MOLT_CUDA_Q_NF4 && T <= MOLT_CUDA_GEMV_MAX_T)
        return molt_cuda_nf4_gemv(dt, y, x, w, e, T);
    int64_t R = tile_rows(dt, w), es = (int64_t)cu_dtype_size(dt);
    for (int64_t r0 = 0; r0 < w->rows; r0 += R) {
        int64_t nr = r0 + R <= w->rows ? R : w->rows - r0;
        CU_TRY(cu_dequant(dt, ws, w, (e * w->rows + r0) * w->cols, nr * w->cols));
        CU_TRY(cu_gemm(dt, dt, false, true, T, nr, w->cols, 1.0f, x, w->cols, ws, w->cols, 0.0f,
                       (char *)y + r0 * es, w->rows));
    }
    return 0;
}

extern "C" int molt_cuda_qlinear_bwd_x(molt_cuda_dtype dt, void *dx, const void *dy,
                                       const molt_cuda_qw *w, int64_t e, int64_t T, void *ws) {
    if (T <= 0)
        return 0;
    CU_TRY(cu_ready());
    CU_TRY(check_e(w, e));
    int64_t R = tile_rows(dt, w), es = (int64_t)cu_dtype_size(dt);
    for (int64_t r0 = 0; r0 < w->rows; r0 += R) {
        int64_t nr = r0 + R <= w->rows ? R : w->rows - r0;
        CU_TRY(cu_dequant(dt, ws, w, (e * w->rows + r0) * w->cols, nr * w->cols));
        CU_TRY(cu_gemm(dt, dt, false, false, T, w->cols, nr, 1.0f, (const char *)dy + r0 * es,
                       w->rows, ws, w->cols, 1.0f, dx, w->cols));
    }
    return 0;
}

// ---- NF4 GEMV for decode --------------------------------------------------------------------
// One warp per output row; T (1..8) token rows of x share each decoded weight. When the row
// starts at a multiple of 32 elements (and cols is a multiple of 32), lane l reads 16 packed
// bytes (32 weights, all in one 64-value block: one absmax) per step, consecutive lanes
// consecutive bytes; otherwise each lane decodes single elements. Each weight is decoded as
// q_elem does (code * absmax, one rounding); the dot products accumulate in f32 with FMA.

#define GEMV_WARPS 8

template <typename T, int NT>
__global__ static void nf4_gemv_kernel(T *y, const T *x, molt_cuda_qw w, int64_t base,
                                       int64_t rows, int64_t cols) {
    __shared__ qtables tb;
    load_tables(&tb);
    int lane = threadIdx.x & 31;
    int64_t o = (int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (o >= rows)
        return;
    float acc[NT];
#pragma unroll
    for (int t = 0; t < NT; t++)
        acc[t] = 0;
    int64_t row0 = base + o * cols; // flat index of the row's first weight
    const uint8_t *packed = (const uint8_t *)w.data;
    if (row0 % 32 == 0 && cols % 32 == 0) {
        for (int64_t c = lane; c < cols / 32; c += 32) {
            int64_t f0 = row0 + 32 * c;
            uint4 q = *(const uint4 *)(packed + f0 / 2);
            float am = nf4_absmax(w, &tb, f0 / 64);
            const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int b = 0; b < 16; b++) {
                uint32_t byte = (words[b / 4] >> (8 * (b % 4))) & 0xffu;
                float w0 = __fmul_rn(tb.nf4[byte >> 4], am), w1 = __fmul_rn(tb.nf4[byte & 15], am);
                int64_t i = 32 * c + 2 * b;
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    acc[t] = fmaf(cu_ld(x, t * cols + i), w0, acc[t]);
                    acc[t] = fmaf(cu_ld(x, t * cols + i + 1), w1, acc[t]);
                }
            }
        }
    } else {
        for (int64_t i = lane; i < cols; i += 32) {
            float wv = q_elem(w, &tb, row0 + i);
#pragma unroll
            for (int t = 0; t < NT; t++)
                acc[t] = fmaf(cu_ld(x, t * cols + i), wv, acc[t]);
        }
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float s = cu_warp_sum(acc[t]);
        if (lane == 0)
            cu_st(y, t * rows + o, s);
    }
}

template <typename T>
static void gemv_launch(int64_t nt, T *y, const T *x, const molt_cuda_qw &w, int64_t base,
                        int64_t rows, int64_t cols) {
    unsigned g = (unsigned)((rows + GEMV_WARPS - 1) / GEMV_WARPS);
    cudaStream_t st = cu_stream();
    switch (nt) {
    case 1: nf4_gemv_kernel<T, 1><<<g, 32 * GEMV_WARPS, 0, st>>>(y, x, w, base, rows, cols); break;
    case 2: nf4_gemv_kernel<T, 2><<<g, 32 * GEMV_WARPS, 0, st>>>(y, x, w, base, rows, cols); break;
    case 3: nf4_gemv_kernel<T, 3><<<g, 32 * GEMV_WARPS, 0, st>>>(y, x, w, base, rows, cols); break;
    case 4: nf4_gemv_kernel<T, 4><<<g, 32 * GEMV_WARPS, 0, st>>>(y, x, w, base, rows, cols); break;
    case 5: nf4_gemv_kernel<T, 5><<<g, 32 * GEMV_WARPS, 0, st>>>(y, x, w, base, rows, cols); break;
    case 6: nf4_gemv_kernel<T, 6><<<g, 32 * GEMV_WARPS, 0, st>>>(y, x, w, base, rows, cols); break;
    case 7: nf4_gemv_kernel<T, 7><<<g, 32 * GEMV_WARPS, 0, st>>>(y, x, w, base, rows, cols); break;
    default: nf4_gemv_kernel<T, 8><<<g, 32 * GEMV_WARPS, 0, st>>>(y, x, w, base, rows, cols); break;
    }
}

extern "C" int molt_cuda_nf4_gemv(molt_cuda_dtype dt, void *y, const void *x,
                                  const molt_cuda_qw *w, int64_t e, int64_t T) {
    CU_TRY(cu_ready());
    CU_TRY(check_e(w, e));
    if (w->format != MOLT_CUDA_Q_NF4 || T < 1 || T > MOLT_CUDA_GEMV_MAX_T)
        return cu_fail(__FILE__, __LINE__, "nf4_gemv: needs NF4 weights and 1..%d rows, got "
                       "format %d and %lld rows", MOLT_CUDA_GEMV_MAX_T, w->format, (long long)T);
    if ((w->rows + GEMV_WARPS - 1) / GEMV_WARPS > 0x7fffffff)
        return cu_fail(__FILE__, __LINE__, "nf4_gemv: %lld rows", (long long)w->rows);
    int64_t base = e * w->rows * w->cols;
    if (dt == MOLT_CUDA_BF16)
        gemv_launch(T, (bf16 *)y, (const bf16 *)x, *w, base, w->rows, w->cols);
    else
        gemv_launch(T, (float *)y, (const float *)x, *w, base, w->rows, w->cols);
    CU_LAUNCHED("nf4_gemv_kernel");
    return 0;
}
