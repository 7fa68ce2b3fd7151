// autograd/cuda/k_optim.cu: the optimizer's kernels over many f32 tensors in one launch
// each: AdamW (per element the same float operations as train/optim.c, in the same order,
// every rounding explicit so nvcc contracts nothing: equal bits), the sums of squares
// behind the global gradient norm (double, per tensor, in a fixed order) and the scaling
// that clipping applies. Tensors are cut into chunks of CHUNK elements; block b finds its
// tensor by binary search over the chunk offsets. Not here: the scalars of each step
// (bias corrections, learning rate: formed on the host as train/optim.c forms them).
#include "cu_internal.cuh"

#define CHUNK 4096
#define THREADS 256
#define MAX_ITEMS 4096 // tensors per launch; longer lists go in several launches

// first[i] = first chunk of tensor i, first[n] = chunks in all
static thread_local int64_t first_host[MAX_ITEMS + 1];

static int64_t build_first(const int64_t *numel, int n) {
    first_host[0] = 0;
    for (int i = 0; i < n; i++)
        first_host[i + 1] = first_host[i] + (numel[i] + CHUNK - 1) / CHUNK;
    return first_host[n];
}

__device__ __forceinline__ int find_item(const int64_t *first, int n, int64_t b) {
    int lo = 0, hi = n - 1; // the last i with first[i] <= b
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (first[mid] <= b)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

extern "C" size_t molt_cuda_multi_ws_bytes(int n, const int64_t *numel) {
    int m = n < MAX_ITEMS ? n : MAX_ITEMS;
    int64_t chunks = 0;
    for (int i = 0; i < n; i++) // a bound for any batch of at most MAX_ITEMS tensors
        chunks += (numel[i] + CHUNK - 1) / CHUNK;
    return cu_align((size_t)m * sizeof(molt_cuda_adamw_item)) +
           cu_align((size_t)(m + 1) * sizeof(int64_t)) + cu_align((size_t)m * sizeof(void *)) +
           cu_align((size_t)m * 8) + (size_t)(chunks + m) * 8; // see ws_split
}

// ---- AdamW ---------------------------------------------------------------------------------

__device__ __forceinline__ float lerp_f(float m, float g, float w) {
    float d = __fsub_rn(g, m);
    return fabsf(w) < 0.5f ? __fmaf_rn(w, d, m) : __fmaf_rn(__fsub_rn(w, 1.0f), d, g);
}

__global__ static void adamw_kernel(const molt_cuda_adamw_item *items, const int64_t *first,
                                    int n) {
    int i = find_item(first, n, blockIdx.x);
    molt_cuda_adamw_item it = items[i];
    int64_t lo = ((int64_t)blockIdx.x - first[i]) * CHUNK;
    int64_t hi = lo + CHUNK < it.n ? lo + CHUNK : it.n;
    for (int64_t k = lo + threadIdx.x; k < hi; k += blockDim.x) {
        float g = it.g[k];
        float pi = it.apply_decay ? __fmul_rn(it.p[k], it.decay) : it.p[k];
        float m = lerp_f(it.m[k], g, it.w1);
        float v = __fmul_rn(it.v[k], it.b2);
        v = __fadd_rn(v, __fmul_rn(__fmul_rn(it.c2, g), g));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), it.bc2_sqrt), it.eps);
        it.m[k] = m;
        it.v[k] = v;
        it.p[k] = __fadd_rn(pi, __fdiv_rn(__fmul_rn(it.neg_step, m), denom));
    }
}

static void ws_split(void *ws, int m, molt_cuda_adamw_item **items, int64_t **first,
                     double **part, void ***ptrs, int64_t **numel) {
    char *c = (char *)ws;
    *items = (molt_cuda_adamw_item *)cu_take(&c, (size_t)m * sizeof(molt_cuda_adamw_item));
    *first = (int64_t *)cu_take(&c, (size_t)(m + 1) * sizeof(int64_t));
    *ptrs = (void **)cu_take(&c, (size_t)m * sizeof(void *));
    *numel = (int64_t *)cu_take(&c, (size_t)m * 8);
    *part = (double *)c; // chunks of the batch
}

extern "C" int molt_cuda_adamw(const molt_cuda_adamw_item *items, int n, void *ws) {
    if (n <= 0)
        return 0;
    CU_TRY(cu_ready());
    cudaStream_t st = cu_stream();
    for (int b0 = 0; b0 < n; b0 += MAX_ITEMS) {
        int m = n - b0 < MAX_ITEMS ? n - b0 : MAX_ITEMS;
        int64_t numel[MAX_ITEMS];
        for (int i = 0; i < m; i++)
            numel[i] = items[b0 + i].n;
        int64_t chunks = build_first(numel, m);
        if (chunks == 0)
            continue;
        if (chunks > 0x7fffffff)
            return cu_fail(__FILE__, __LINE__, "adamw: %lld chunks", (long long)chunks);
        molt_cuda_adamw_item *d_items;
        int64_t *d_first, *d_numel;
        double *part;
        void **ptrs;
        ws_split(ws, m, &d_items, &d_first, &part, &ptrs, &d_numel);
        CU_CHECK(cudaMemcpyAsync(d_items, items + b0, (size_t)m * sizeof *items,
                                 cudaMemcpyHostToDevice, st));
        CU_CHECK(cudaMemcpyAsync(d_first, first_host, (size_t)(m + 1) * sizeof(int64_t),
                                 cudaMemcpyHostToDevice, st));
        adamw_kernel<<<(unsigned)chunks, THREADS, 0, st>>>(d_items, d_first, m);
        CU_LAUNCHED("adamw_kernel");
    }
    return 0;
}

// ---- sums of squares and scaling -------------------------------------------------------------

__global__ static void sumsq_part_kernel(double *part, void *const *x, const int64_t *numel,
                                         const int64_t *first, int n) {
    __shared__ double red[32];
    int i = find_item(first, n, blockIdx.x);
    const float *p = (const float *)x[i];
    int64_t lo = ((int64_t)blockIdx.x - first[i]) * CHUNK;
    int64_t hi = lo + CHUNK < numel[i] ? lo + CHUNK : numel[i];
    double acc = 0;
    for (int64_t k = lo + threadIdx.x; k < hi; k += blockDim.x)
        acc += (double)p[k] * (double)p[k];
    acc = cu_block_sum_d(acc, red);
    if (threadIdx.x == 0)
        part[blockIdx.x] = acc;
}

__global__ static void sumsq_total_kernel(double *out, const double *part, const int64_t *first,
                                          int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    double s = 0;
    for (int64_t b = first[i]; b < first[i + 1]; b++)
        s += part[b];
    out[i] = s;
}

__global__ static void scale_kernel(void *const *x, const int64_t *numel, const int64_t *first,
                                    int n, float s) {
    int i = find_item(first, n, blockIdx.x);
    float *p = (float *)x[i];
    int64_t lo = ((int64_t)blockIdx.x - first[i]) * CHUNK;
    int64_t hi = lo + CHUNK < numel[i] ? lo + CHUNK : numel[i];
    for (int64_t k = lo + threadIdx.x; k < hi; k += blockDim.x)
        p[k] = __fmul_rn(p[k], s);
}

// Uploads pointers, sizes and chunk offsets of tensors [b0, b0 + m); returns the chunk count.
static int upload(void *ws, const void *const *x, const int64_t *numel, int b0, int m,
                  void ***ptrs, int64_t **d_numel, int64_t **d_first, double **part,
                  int64_t *chunks) {
    molt_cuda_adamw_item *unused;
    ws_split(ws, m, &unused, d_first, part, ptrs, d_numel);
    *chunks = build_first(numel + b0, m);
    if (*chunks > 0x7fffffff)
        return cu_fail(__FILE__, __LINE__, "multi-tensor op: %lld chunks", (long long)*chunks);
    cudaStream_t st = cu_stream();
    CU_CHECK(cudaMemcpyAsync(*ptrs, x + b0, (size_t)m * sizeof(void *), cudaMemcpyHostToDevice,
                             st));
    CU_CHECK(cudaMemcpyAsync(*d_numel, numel + b0, (size_t)m * 8, cudaMemcpyHostToDevice, st));
    CU_CHECK(cudaMemcpyAsync(*d_first, first_host, (size_t)(m + 1) * 8, cudaMemcpyHostToDevice,
                             st));
    return 0;
}

extern "C" int molt_cuda_sumsq(const float *const *x, const int64_t *numel, int n, double *sumsq,
                               void *ws) {
    if (n <= 0)
        return 0;
    CU_TRY(cu_ready());
    cudaStream_t st = cu_stream();
    for (int b0 = 0; b0 < n; b0 += MAX_ITEMS) {
        int m = n - b0 < MAX_ITEMS ? n - b0 : MAX_ITEMS;
        void **ptrs;
        int64_t *d_numel, *d_first, chunks;
        double *part;
        CU_TRY(upload(ws, (const void *const *)x, numel, b0, m, &ptrs, &d_numel, &d_first, &part,
                      &chunks));
        // totals go after the partial sums
        double *out = part + chunks;
        if (chunks > 0) {
            sumsq_part_kernel<<<(unsigned)chunks, THREADS, 0, st>>>(part, ptrs, d_numel, d_first,
                                                                    m);
            CU_LAUNCHED("sumsq_part_kernel");
        }
        sumsq_total_kernel<<<(unsigned)((m + 255) / 256), 256, 0, st>>>(out, part, d_first, m);
        CU_LAUNCHED("sumsq_total_kernel");
        CU_CHECK(cudaMemcpyAsync(sumsq + b0, out, (size_t)m * 8, cudaMemcpyDeviceToHost, st));
        CU_CHECK(cudaStreamSynchronize(st));
    }
    return 0;
}

extern "C" int molt_cuda_multi_scale(float *const *x, const int64_t *numel, int n, float s,
                                     void *ws) {
    if (n <= 0)
        return 0;
    CU_TRY(cu_ready());
    for (int b0 = 0; b0 < n; b0 += MAX_ITEMS) {
        int m = n - b0 < MAX_ITEMS ? n - b0 : MAX_ITEMS;
        void **ptrs;
        int64_t *d_numel, *d_first, chunks;
        double *part;
        CU_TRY(upload(ws, (const void *const *)x, numel, b0, m, &ptrs, &d_numel, &d_first, &part,
                      &chunks));
        if (chunks == 0)
            continue;
        scale_kernel<<<(unsigned)chunks, THREADS, 0, cu_stream()>>>(ptrs, d_numel, d_first, m, s);
        CU_LAUNCHED("scale_kernel");
    }
    return 0;
}
