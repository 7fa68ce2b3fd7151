// autograd/cuda/k_nn.cu: elementwise kernels (add, mul, scale and their backward
// accumulations, casts, fill), softmax, SwiGLU, embedding and dropout, for f32 and bf16
// activations, forward and backward. Each mirrors its CPU reference (cpu/k_elem.c,
// cpu/k_nn.c) operation by operation in f32 (double where the CPU sums in double); only the
// libm functions (expf) differ by an ulp or two. Not here: matrix products (blas.cu,
// k_linear.cu), rotary embedding (k_rope.cu).
#include "cu_internal.cuh"

typedef __nv_bfloat16 bf16;

#define EW_THREADS 256

// Runs `call` with T the element type of dt.
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

#define GRID_LOOP(i, n)                                                              \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);        \
         i += (int64_t)gridDim.x * blockDim.x)

// ---- elementwise -------------------------------------------------------------------------

enum { EW_ADD, EW_MUL, EW_SCALE, EW_ACC, EW_ACC_MUL, EW_ACC_SCALE };

// The CPU's expressions (cpu/k_elem.c): y = a + b, a * b, a * s; g += dy, dy * b, s * dy.
// __fmul_rn / __fadd_rn keep nvcc from contracting the accumulations into FMAs.
template <typename T, int OP>
__global__ static void ew_kernel(T *y, const T *a, const T *b, float s, int64_t n) {
    GRID_LOOP(i, n) {
        float v;
        switch (OP) {
        case EW_ADD: v = __fadd_rn(cu_ld(a, i), cu_ld(b, i)); break;
        case EW_MUL: v = __fmul_rn(cu_ld(a, i), cu_ld(b, i)); break;
        case EW_SCALE: v = __fmul_rn(cu_ld(a, i), s); break;
        case EW_ACC: v = __fadd_rn(cu_ld(y, i), cu_ld(a, i)); break;
        case EW_ACC_MUL: v = __fadd_rn(cu_ld(y, i), __fmul_rn(cu_ld(a, i), cu_ld(b, i))); break;
        default: v = __fadd_rn(cu_ld(y, i), __fmul_rn(s, cu_ld(a, i))); break;
        }
        cu_st(y, i, v);
    }
}

template <int OP>
static int ew(molt_cuda_dtype dt, void *y, const void *a, const void *b, float s, int64_t n) {
    if (n <= 0)
        return 0;
    CU_TRY(cu_ready());
    DISPATCH(dt, (ew_kernel<T, OP><<<cu_blocks(n, EW_THREADS), EW_THREADS, 0, cu_stream()>>>(
                     (T *)y, (const T *)a, (const T *)b, s, n)));
    CU_LAUNCHED("ew_kernel");
    return 0;
}

extern "C" int molt_cuda_add(molt_cuda_dtype dt, void *y, const void *a, const void *b,
                             int64_t n) {
    return ew<EW_ADD>(dt, y, a, b, 0, n);
}
extern "C" int molt_cuda_mul(molt_cuda_dtype dt, void *y, const void *a, const void *b,
                             int64_t n) {
    return ew<EW_MUL>(dt, y, a, b, 0, n);
}
extern "C" int molt_cuda_scale(molt_cuda_dtype dt, void *y, const void *a, float s, int64_t n) {
    return ew<EW_SCALE>(dt, y, a, NULL, s, n);
}
extern "C" int molt_cuda_acc(molt_cuda_dtype dt, void *g, const void *dy, int64_t n) {
    return ew<EW_ACC>(dt, g, dy, NULL, 0, n);
}
extern "C" int molt_cuda_acc_mul(molt_cuda_dtype dt, void *g, const void *dy, const void *o,
                                 int64_t n) {
    return ew<EW_ACC_MUL>(dt, g, dy, o, 0, n);
}
extern "C" int molt_cuda_acc_scale(molt_cuda_dtype dt, void *g, const void *dy, float s,
                                   int64_t n) {
    return ew<EW_ACC_SCALE>(dt, g, dy, NULL, s, n);
}

template <typename D, typename S>
__global__ static void cast_kernel(D *dst, const S *src, int64_t n) {
    GRID_LOOP(i, n) cu_st(dst, i, cu_ld(src, i));
}

extern "C" int molt_cuda_cast(molt_cuda_dtype dst_dt, void *dst, molt_cuda_dtype src_dt,
                              const void *src, int64_t n) {
    if (n <= 0)
        return 0;
    CU_TRY(cu_ready());
    unsigned g = cu_blocks(n, EW_THREADS);
    cudaStream_t st = cu_stream();
    if (dst_dt == MOLT_CUDA_BF16 && src_dt == MOLT_CUDA_F32)
        cast_kernel<<<g, EW_THREADS, 0, st>>>((bf16 *)dst, (const float *)src, n);
    else if (dst_dt == MOLT_CUDA_F32 && src_dt == MOLT_CUDA_BF16)
        cast_kernel<<<g, EW_THREADS, 0, st>>>((float *)dst, (const bf16 *)src, n);
    else
        CU_CHECK(cudaMemcpyAsync(dst, src, (size_t)n * cu_dtype_size(dst_dt),
                                 cudaMemcpyDeviceToDevice, st));
    CU_LAUNCHED("cast_kernel");
    return 0;
}

template <typename G, typename D>
__global__ static void acc_cast_kernel(G *g, const D *dy, int64_t n) {
    GRID_LOOP(i, n) cu_st(g, i, __fadd_rn(cu_ld(g, i), cu_ld(dy, i)));
}

extern "C" int molt_cuda_acc_cast(molt_cuda_dtype g_dt, void *g, molt_cuda_dtype dy_dt,
                                  const void *dy, int64_t n) {
    if (n <= 0)
        return 0;
    CU_TRY(cu_ready());
    unsigned b = cu_blocks(n, EW_THREADS);
    cudaStream_t st = cu_stream();
    if (g_dt == MOLT_CUDA_F32 && dy_dt == MOLT_CUDA_F32)
        acc_cast_kernel<<<b, EW_THREADS, 0, st>>>((float *)g, (const float *)dy, n);
    else if (g_dt == MOLT_CUDA_F32)
        acc_cast_kernel<<<b, EW_THREADS, 0, st>>>((float *)g, (const bf16 *)dy, n);
    else if (dy_dt == MOLT_CUDA_F32)
        acc_cast_kernel<<<b, EW_THREADS, 0, st>>>((bf16 *)g, (const float *)dy, n);
    else
        acc_cast_kernel<<<b, EW_THREADS, 0, st>>>((bf16 *)g, (const bf16 *)dy, n);
    CU_LAUNCHED("acc_cast_kernel");
    return 0;
}

template <typename T>
__global__ static void fill_kernel(T *y, float v, int64_t n) {
    GRID_LOOP(i, n) cu_st(y, i, v);
}

extern "C" int molt_cuda_fill(molt_cuda_dtype dt, void *y, float v, int64_t n) {
    if (n <= 0)
        return 0;
    CU_TRY(cu_ready());
    DISPATCH(dt, (fill_kernel<T><<<cu_blocks(n, EW_THREADS), EW_THREADS, 0, cu_stream()>>>(
                     (T *)y, v, n)));
    CU_LAUNCHED("fill_kernel");
    return 0;
}

// ---- softmax -------------------------------------------------------------------------------
// One block per row. As softmax_row: max, exps rounded to float summed in double, one float
// reciprocal, products.

static int row_threads(int64_t cols) {
    int64_t t = (cols + 31) / 32 * 32;
    return t > 256 ? 256 : (int)t;
}

template <typename T>
__global__ static void softmax_fwd_kernel(T *y, const T *x, int64_t cols) {
    __shared__ double red[32];
    __shared__ float redf[32];
    const T *xr = x + (int64_t)blockIdx.x * cols;
    T *yr = y + (int64_t)blockIdx.x * cols;
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
        m = fmaxf(m, cu_ld(xr, j));
    m = cu_block_max(m, redf);
    double s = 0;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
        s += (double)expf(__fsub_rn(cu_ld(xr, j), m));
    s = cu_block_sum_d(s, red);
    float inv = (float)(1.0 / s);
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
        cu_st(yr, j, __fmul_rn(expf(__fsub_rn(cu_ld(xr, j), m)), inv));
}

template <typename T>
__global__ static void softmax_bwd_kernel(T *dx, const T *y, const T *dy, int64_t cols) {
    __shared__ double red[32];
    int64_t off = (int64_t)blockIdx.x * cols;
    double dot = 0;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x)
        dot += (double)cu_ld(dy, off + j) * cu_ld(y, off + j);
    float d = (float)cu_block_sum_d(dot, red);
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
        float yj = cu_ld(y, off + j);
        cu_st(dx, off + j,
              __fadd_rn(cu_ld(dx, off + j), __fmul_rn(yj, __fsub_rn(cu_ld(dy, off + j), d))));
    }
}

static int check_rows(int64_t rows, int64_t cols) {
    if (rows > 0x7fffffff)
        return cu_fail(__FILE__, __LINE__, "softmax: %lld rows, more than one grid holds",
                       (long long)rows);
    return cols < 1 ? cu_fail(__FILE__, __LINE__, "softmax: %lld columns", (long long)cols) : 0;
}

extern "C" int molt_cuda_softmax_fwd(molt_cuda_dtype dt, void *y, const void *x, int64_t rows,
                                     int64_t cols) {
    if (rows <= 0)
        return 0;
    CU_TRY(check_rows(rows, cols));
    CU_TRY(cu_ready());
    DISPATCH(dt, (softmax_fwd_kernel<T><<<(unsigned)rows, row_threads(cols), 0, cu_stream()>>>(
                     (T *)y, (const T *)x, cols)));
    CU_LAUNCHED("softmax_fwd_kernel");
    return 0;
}

extern "C" int molt_cuda_softmax_bwd(molt_cuda_dtype dt, void *dx, const void *y, const void *dy,
                                     int64_t rows, int64_t cols) {
    if (rows <= 0)
        return 0;
    CU_TRY(check_rows(rows, cols));
    CU_TRY(cu_ready());
    DISPATCH(dt, (softmax_bwd_kernel<T><<<(unsigned)rows, row_threads(cols), 0, cu_stream()>>>(
                     (T *)dx, (const T *)y, (const T *)dy, cols)));
    CU_LAUNCHED("softmax_bwd_kernel");
    return 0;
}

// ---- SwiGLU --------------------------------------------------------------------------------

__device__ __forceinline__ float sigmoid_f(float g) {
    return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
}

template <typename T>
__global__ static void swiglu_fwd_kernel(T *y, const T *g, const T *u, int64_t n) {
    GRID_LOOP(i, n) {
        float gi = cu_ld(g, i);
        cu_st(y, i, __fmul_rn(__fmul_rn(gi, sigmoid_f(gi)), cu_ld(u, i)));
    }
}

// silu'(g) = s (1 + g (1 - s)); the CPU's order: dy * u * s * (1 + g (1 - s)), dy * g * s.
template <typename T>
__global__ static void swiglu_bwd_kernel(T *dg, T *du, const T *g, const T *u, const T *dy,
                                         int64_t n) {
    GRID_LOOP(i, n) {
        float gi = cu_ld(g, i), ui = cu_ld(u, i), d = cu_ld(dy, i), s = sigmoid_f(gi);
        if (dg) {
            float ds = __fadd_rn(1.0f, __fmul_rn(gi, __fsub_rn(1.0f, s)));
            cu_st(dg, i, __fadd_rn(cu_ld(dg, i), __fmul_rn(__fmul_rn(__fmul_rn(d, ui), s), ds)));
        }
        if (du)
            cu_st(du, i, __fadd_rn(cu_ld(du, i), __fmul_rn(__fmul_rn(d, gi), s)));
    }
}

extern "C" int molt_cuda_swiglu_fwd(molt_cuda_dtype dt, void *y, const void *g, const void *u,
                                    int64_t n) {
    if (n <= 0)
        return 0;
    CU_TRY(cu_ready());
    DISPATCH(dt, (swiglu_fwd_kernel<T><<<cu_blocks(n, EW_THREADS), EW_THREADS, 0,
                                         cu_stream()>>>((T *)y, (const T *)g, (const T *)u, n)));
    CU_LAUNCHED("swiglu_fwd_kernel");
    return 0;
}

extern "C" int molt_cuda_swiglu_bwd(molt_cuda_dtype dt, void *dg, void *du, const void *g,
                                    const void *u, const void *dy, int64_t n) {
    if (n <= 0 || (!dg && !du))
        return 0;
    CU_TRY(cu_ready());
    DISPATCH(dt, (swiglu_bwd_kernel<T><<<cu_blocks(n, EW_THREADS), EW_THREADS, 0,
                                         cu_stream()>>>((T *)dg, (T *)du, (const T *)g,
                                                        (const T *)u, (const T *)dy, n)));
    CU_LAUNCHED("swiglu_bwd_kernel");
    return 0;
}

// ---- embedding -----------------------------------------------------------------------------

template <typename T>
__global__ static void embedding_fwd_kernel(T *y, const T *table, const int32_t *ids, int64_t n,
                                            int64_t c) {
    GRID_LOOP(i, n * c) {
        int64_t t = i / c, j = i - t * c;
        y[i] = table[(int64_t)ids[t] * c + j];
    }
}

__device__ __forceinline__ void atomic_add_el(float *p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add_el(bf16 *p, float v) {
    atomicAdd(p, __float2bfloat16_rn(v));
}

template <typename T>
__global__ static void embedding_bwd_kernel(T *dtable, const T *dy, const int32_t *ids,
                                            int64_t n, int64_t c) {
    GRID_LOOP(i, n * c) {
        int64_t t = i / c, j = i - t * c;
        atomic_add_el(dtable + (int64_t)ids[t] * c + j, cu_ld(dy, i));
    }
}

extern "C" int molt_cuda_embedding_fwd(molt_cuda_dtype dt, void *y, const void *table,
                                       const int32_t *ids, int64_t n, int64_t c) {
    if (n <= 0 || c <= 0)
        return 0;
    CU_TRY(cu_ready());
    DISPATCH(dt, (embedding_fwd_kernel<T><<<cu_blocks(n * c, EW_THREADS), EW_THREADS, 0,
                                            cu_stream()>>>((T *)y, (const T *)table, ids, n, c)));
    CU_LAUNCHED("embedding_fwd_kernel");
    return 0;
}

extern "C" int molt_cuda_embedding_bwd(molt_cuda_dtype dt, void *dtable, const void *dy,
                                       const int32_t *ids, int64_t n, int64_t c) {
    if (n <= 0 || c <= 0)
        return 0;
    CU_TRY(cu_ready());
    DISPATCH(dt, (embedding_bwd_kernel<T><<<cu_blocks(n * c, EW_THREADS), EW_THREADS, 0,
                                            cu_stream()>>>((T *)dtable, (const T *)dy, ids, n,
                                                           c)));
    CU_LAUNCHED("embedding_bwd_kernel");
    return 0;
}

// ---- dropout -------------------------------------------------------------------------------

// cpu/k_nn.c's dropout_keep: splitmix64's finalizer over (seed, index), the same draw here.
__device__ __forceinline__ bool dropout_keep(uint64_t seed, int64_t i, double p) {
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53 >= p;
}

template <typename T>
__global__ static void dropout_fwd_kernel(T *y, const T *x, uint64_t seed, double p, float s,
                                          int64_t first, int64_t n) {
    GRID_LOOP(i, n) {
        cu_st(y, i, dropout_keep(seed, first + i, p) ? __fmul_rn(cu_ld(x, i), s) : 0.0f);
    }
}

template <typename T>
__global__ static void dropout_bwd_kernel(T *dx, const T *dy, uint64_t seed, double p, float s,
                                          int64_t first, int64_t n) {
    GRID_LOOP(i, n) {
        if (dropout_keep(seed, first + i, p))
            cu_st(dx, i, __fadd_rn(cu_ld(dx, i), __fmul_rn(cu_ld(dy, i), s)));
    }
}

extern "C" int molt_cuda_dropout_fwd(molt_cuda_dtype dt, void *y, const void *x, uint64_t seed,
                                     double p, int64_t first, int64_t n) {
    if (n <= 0)
        return 0;
    CU_TRY(cu_ready());
    float s = (float)(1.0 / (1.0 - p));
    DISPATCH(dt, (dropout_fwd_kernel<T><<<cu_blocks(n, EW_THREADS), EW_THREADS, 0,
                                          cu_stream()>>>((T *)y, (const T *)x, seed, p, s, first, n)));
    CU_LAUNCHED("dropout_fwd_kernel");
    return 0;
}

extern "C" int molt_cuda_dropout_bwd(molt_cuda_dtype dt, void *dx, const void *dy,
                                     uint64_t seed, double p, int64_t first, int64_t n) {
    if (n <= 0)
        return 0;
    CU_TRY(cu_ready());
    float s = (float)(1.0 / (1.0 - p));
    DISPATCH(dt, (dropout_bwd_kernel<T><<<cu_blocks(n, EW_THREADS), EW_THREADS, 0,
                                          cu_stream()>>>((T *)dx, (const T *)dy, seed, p, s, first, n)));
    CU_LAUNCHED("dropout_bwd_kernel");
    return 0;
}
