// autograd/cuda/k_ce.cu: cross-entropy fused with the output projection, in vocabulary
// chunks: per chunk one cuBLASLt GEMM (two with the low-rank term of a LoRA on the output
// projection) yields a (T, chunk) block of f32 logits, a kernel folds it into each row's
// running max and sum (double, as cpu/k_ce.c's reference), and backward turns the
// recomputed block into coef (softmax - onehot) for two (four) more GEMMs. Nothing of size
// (T, V) exists at any time. Not here: the loss value and the mask sum (the op), operand
// checks.
#include "cu_internal.cuh"

typedef __nv_bfloat16 bf16;

// Running state of row t after a block of logits z (T, nc): m, s (double) and the target's
// logit when it falls in this chunk. One block per row.
__global__ static void ce_fold_kernel(double *m, double *s, double *zt, const float *z,
                                      const int32_t *targets, int64_t v0, int64_t nc) {
    __shared__ double red[32];
    __shared__ float redf[32];
    int64_t t = blockIdx.x;
    const float *zr = z + t * nc;
    float mc = -INFINITY;
    for (int64_t j = threadIdx.x; j < nc; j += blockDim.x)
        mc = fmaxf(mc, zr[j]);
    mc = cu_block_max(mc, redf);
    double sc = 0;
    for (int64_t j = threadIdx.x; j < nc; j += blockDim.x)
        sc += exp((double)zr[j] - (double)mc);
    sc = cu_block_sum_d(sc, red);
    if (threadIdx.x == 0) {
        double mo = m[t], so = s[t];
        if ((double)mc > mo) {
            s[t] = so * exp(mo - (double)mc) + sc;
            m[t] = mc;
        } else {
            s[t] = so + sc * exp((double)mc - mo);
        }
        int64_t tg = targets[t];
        if (tg >= v0 && tg < v0 + nc)
            zt[t] = zr[tg - v0];
    }
}

__global__ static void ce_init_kernel(double *m, double *s, int64_t T) {
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < T;
         t += (int64_t)gridDim.x * blockDim.x) {
        m[t] = -INFINITY;
        s[t] = 0;
    }
}

__global__ static void ce_lse_kernel(double *lse, const double *m, const double *s, int64_t T) {
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < T;
         t += (int64_t)gridDim.x * blockDim.x)
        lse[t] = m[t] + log(s[t]);
}

// g[t, j] = coef_t (exp(z - lse_t) - [v0 + j == target_t]), coef_t = scale * mask[t]
template <typename M, typename G>
__global__ static void ce_grad_kernel(G *g, const float *z, const double *lse,
                                      const int32_t *targets, const M *mask, double scale,
                                      int64_t T, int64_t v0, int64_t nc) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < T * nc;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / nc, j = i - t * nc;
        double coef = scale * (mask ? (double)cu_ld(mask, t) : 1.0);
        double v = coef == 0 ? 0.0
                             : coef * (exp((double)z[i] - lse[t]) - (v0 + j == targets[t] ? 1.0
                                                                                          : 0.0));
        cu_st(g, i, (float)v);
    }
}

namespace {

struct ce_bufs {
    float *z;  // (T, chunk)
    void *g;   // (T, chunk) of dt (aliases z for f32)
    double *m, *s;
};

size_t layout(ce_bufs *b, const molt_cuda_ce *p, char *base) {
    char *c = base;
    b->z = (float *)cu_take(&c, (size_t)(p->T * p->chunk) * 4);
    b->g = p->dt == MOLT_CUDA_BF16 ? cu_take(&c, (size_t)(p->T * p->chunk) * 2) : (void *)b->z;
    b->m = (double *)cu_take(&c, (size_t)p->T * 8);
    b->s = (double *)cu_take(&c, (size_t)p->T * 8);
    return (size_t)(c - base);
}

int check(const molt_cuda_ce *p) {
    if (p->T < 0 || p->C < 1 || p->V < 1 || p->chunk < 1 || p->chunk > p->V || p->R < 0 ||
        (p->R > 0 && (!p->h2 || !p->w2)) || p->T > 0x7fffffff)
        return cu_fail(__FILE__, __LINE__, "cross_entropy: bad sizes (T %lld, C %lld, V %lld, "
                       "chunk %lld, R %lld)", (long long)p->T, (long long)p->C, (long long)p->V,
                       (long long)p->chunk, (long long)p->R);
    return 0;
}

// z (T, nc) = h w[v0:v0+nc]^T (+ h2 w2[v0:v0+nc]^T), f32
int logits(const molt_cuda_ce *p, float *z, int64_t v0, int64_t nc) {
    size_t es = cu_dtype_size(p->dt);
    CU_TRY(cu_gemm(p->dt, MOLT_CUDA_F32, false, true, p->T, nc, p->C, 1.0f, p->h, p->C,
                   (const char *)p->w + (size_t)(v0 * p->C) * es, p->C, 0.0f, z, nc));
    if (p->R > 0)
        CU_TRY(cu_gemm(p->dt, MOLT_CUDA_F32, false, true, p->T, nc, p->R, 1.0f, p->h2, p->R,
                       (const char *)p->w2 + (size_t)(v0 * p->R) * es, p->R, 1.0f, z, nc));
    return 0;
}

int row_threads(int64_t cols) {
    int64_t t = (cols + 31) / 32 * 32;
    return t > 256 ? 256 : (int)t;
}

} // namespace

extern "C" size_t molt_cuda_ce_ws_bytes(const molt_cuda_ce *p) {
    ce_bufs b;
    return layout(&b, p, NULL);
}

extern "C" int molt_cuda_ce_fwd(const molt_cuda_ce *p, double *lse, double *zt, void *ws) {
    CU_TRY(check(p));
    if (p->T == 0)
        return 0;
    CU_TRY(cu_blas_ready());
    ce_bufs b;
    layout(&b, p, (char *)ws);
    cudaStream_t st = cu_stream();
    ce_init_kernel<<<cu_blocks(p->T, 256), 256, 0, st>>>(b.m, b.s, p->T);
    CU_LAUNCHED("ce_init_kernel");
    for (int64_t v0 = 0; v0 < p->V; v0 += p->chunk) {
        int64_t nc = v0 + p->chunk <= p->V ? p->chunk : p->V - v0;
        CU_TRY(logits(p, b.z, v0, nc));
        ce_fold_kernel<<<(unsigned)p->T, row_threads(nc), 0, st>>>(b.m, b.s, zt, b.z, p->targets,
                                                                   v0, nc);
        CU_LAUNCHED("ce_fold_kernel");
    }
    ce_lse_kernel<<<cu_blocks(p->T, 256), 256, 0, st>>>(lse, b.m, b.s, p->T);
    CU_LAUNCHED("ce_lse_kernel");
    return 0;
}

extern "C" int molt_cuda_ce_bwd(const molt_cuda_ce *p, const void *mask, double scale,
                                const double *lse, void *dh, void *dw, void *dh2, void *dw2,
                                void *ws) {
    CU_TRY(check(p));
    if (p->T == 0 || (!dh && !dw && !dh2 && !dw2))
        return 0;
    CU_TRY(cu_blas_ready());
    ce_bufs b;
    layout(&b, p, (char *)ws);
    cudaStream_t st = cu_stream();
    molt_cuda_dtype dt = p->dt;
    size_t es = cu_dtype_size(dt);
    int64_t T = p->T, C = p->C, R = p->R;
    for (int64_t v0 = 0; v0 < p->V; v0 += p->chunk) {
        int64_t nc = v0 + p->chunk <= p->V ? p->chunk : p->V - v0;
        CU_TRY(logits(p, b.z, v0, nc));
        unsigned grid = cu_blocks(T * nc, 256);
        if (dt == MOLT_CUDA_BF16)
            ce_grad_kernel<<<grid, 256, 0, st>>>((bf16 *)b.g, b.z, lse, p->targets,
                                                 (const bf16 *)mask, scale, T, v0, nc);
        else
            ce_grad_kernel<<<grid, 256, 0, st>>>((float *)b.g, b.z, lse, p->targets,
                                                 (const float *)mask, scale, T, v0, nc);
        CU_LAUNCHED("ce_grad_kernel");
        const char *wc = (const char *)p->w + (size_t)(v0 * C) * es;
        if (dh)
            CU_TRY(cu_gemm(dt, dt, false, false, T, C, nc, 1.0f, b.g, nc, wc, C, 1.0f, dh, C));
        if (dw)
            CU_TRY(cu_gemm(dt, dt, true, false, nc, C, T, 1.0f, b.g, nc, p->h, C, 1.0f,
                           (char *)dw + (size_t)(v0 * C) * es, C));
        if (R > 0 && dh2)
            CU_TRY(cu_gemm(dt, dt, false, false, T, R, nc, 1.0f, b.g, nc,
                           (const char *)p->w2 + (size_t)(v0 * R) * es, R, 1.0f, dh2, R));
        if (R > 0 && dw2)
            CU_TRY(cu_gemm(dt, dt, true, false, nc, R, T, 1.0f, b.g, nc, p->h2, R, 1.0f,
                           (char *)dw2 + (size_t)(v0 * R) * es, R));
    }
    return 0;
}
