// autograd/cuda/k_rope.cu: rotary position embedding on interleaved pairs (the YaRN
// frequencies and attention factor come precomputed from an ag_rope_table), forward and
// backward, f32 and bf16 activations. Mirrors cpu/k_rope.c's f32 path: the angle is
// float(pos) * float(inv_freq) in float, cos and sin in float times float(attn), each
// product rounded before the sum. One thread per output element. Not here: the tables.
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

__device__ __forceinline__ void angle_cs(int32_t pos, float f, float attn, float *c, float *s) {
    float ang = __fmul_rn((float)pos, f);
    *c = __fmul_rn(cosf(ang), attn);
    *s = __fmul_rn(sinf(ang), attn);
}

// y (T, rows, D): element j of a row is a copy outside [start, start + 2 half); inside,
// j = start + i takes xe c - xo s and j = start + half + i takes xo c + xe s for pair i.
template <typename T>
__global__ static void rope_fwd_kernel(T *y, const T *x, const int32_t *pos, molt_cuda_rope r,
                                       int64_t n, int64_t rows, int64_t D, int64_t start) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t j = e % D, row = e / D, t = row / rows;
        int64_t rel = j - start;
        if (rel < 0 || rel >= 2 * r.half) {
            y[e] = x[e];
            continue;
        }
        int i = (int)(rel < r.half ? rel : rel - r.half);
        float c, s;
        angle_cs(pos[t], r.inv_freq[i], r.attn, &c, &s);
        const T *xr = x + row * D + start;
        float xe = cu_ld(xr, 2 * i), xo = cu_ld(xr, 2 * i + 1);
        float v = rel < r.half ? __fsub_rn(__fmul_rn(xe, c), __fmul_rn(xo, s))
                               : __fadd_rn(__fmul_rn(xo, c), __fmul_rn(xe, s));
        cu_st(y, e, v);
    }
}

// dx += R^T dy: dx[start + 2i] += a c + b s, dx[start + 2i + 1] += b c - a s with
// a = dy[start + i], b = dy[start + half + i]; outside the slice dx += dy.
template <typename T>
__global__ static void rope_bwd_kernel(T *dx, const T *dy, const int32_t *pos, molt_cuda_rope r,
                                       int64_t n, int64_t rows, int64_t D, int64_t start) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (int64_t)gridDim.x * blockDim.x) {
        int64_t j = e % D, row = e / D, t = row / rows;
        int64_t rel = j - start;
        float g;
        if (rel < 0 || rel >= 2 * r.half) {
            g = cu_ld(dy, e);
        } else {
            int i = (int)(rel / 2);
            float c, s;
            angle_cs(pos[t], r.inv_freq[i], r.attn, &c, &s);
            const T *gr = dy + row * D + start;
            float a = cu_ld(gr, i), b = cu_ld(gr, r.half + i);
            g = (rel & 1) ? __fsub_rn(__fmul_rn(b, c), __fmul_rn(a, s))
                          : __fadd_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        }
        cu_st(dx, e, __fadd_rn(cu_ld(dx, e), g));
    }
}

static int check(const molt_cuda_rope *r, int64_t rows, int64_t D, int64_t start) {
    if (!r || r->half < 1 || r->half > MOLT_CUDA_ROPE_MAX_HALF || rows < 1 || start < 0 ||
        start + 2 * (int64_t)r->half > D)
        return cu_fail(__FILE__, __LINE__, "rope: bad table or slice (half %d, start %lld, D "
                       "%lld)", r ? r->half : -1, (long long)start, (long long)D);
    return 0;
}

extern "C" int molt_cuda_rope_fwd(molt_cuda_dtype dt, void *y, const void *x, const int32_t *pos,
                                  const molt_cuda_rope *r, int64_t T_, int64_t rows, int64_t D,
                                  int64_t start) {
    int64_t n = T_ * rows * D;
    if (n <= 0)
        return 0;
    CU_TRY(check(r, rows, D, start));
    CU_TRY(cu_ready());
    DISPATCH(dt, (rope_fwd_kernel<T><<<cu_blocks(n, 256), 256, 0, cu_stream()>>>(
                     (T *)y, (const T *)x, pos, *r, n, rows, D, start)));
    CU_LAUNCHED("rope_fwd_kernel");
    return 0;
}

extern "C" int molt_cuda_rope_bwd(molt_cuda_dtype dt, void *dx, const void *dy,
                                  const int32_t *pos, const molt_cuda_rope *r, int64_t T_,
                                  int64_t rows, int64_t D, int64_t start) {
    int64_t n = T_ * rows * D;
    if (n <= 0)
        return 0;
    CU_TRY(check(r, rows, D, start));
    CU_TRY(cu_ready());
    DISPATCH(dt, (rope_bwd_kernel<T><<<cu_blocks(n, 256), 256, 0, cu_stream()>>>(
                     (T *)dx, (const T *)dy, pos, *r, n, rows, D, start)));
    CU_LAUNCHED("rope_bwd_kernel");
    return 0;
}
