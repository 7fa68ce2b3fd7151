// autograd/cuda/k_moe.cu: the MoE router and the routed experts on the GPU, forward and
// backward. The router mirrors cpu/k_moe.c (softmax with a double sum, group-limited top-k
// with the lowest index winning ties, normalization and scaling in f32, the same backward
// arithmetic). The experts follow the CPU's optimized plan (cpu/k_moe_lora.c): routing
// slots sorted stably by expert, token rows gathered, each expert's products as GEMMs
// (dense stacks: one grouped GEMM per product over all busy experts; quantized stacks: each
// busy expert decoded once into a buffer, then its GEMMs), the LoRA terms as two thin
// GEMMs per product (B repacked per expert: its columns are strided by E in PEFT's layout),
// and the rows summed back per token in a fixed order (deterministic). Backward recomputes
// the forward's intermediates instead of keeping them. Not here: operand checks
// (ops_moe*.c), the router's logits GEMM (an ordinary linear).
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

#define GRID_LOOP(i, n)                                                              \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);        \
         i += (int64_t)gridDim.x * blockDim.x)

#define MAX_EXPERTS 4096 // per-expert host arrays
#define MAX_GROUPS 64
#define MAX_TOPK 32
#define ROUTER_WARPS 4

// ---- router --------------------------------------------------------------------------------

// Better candidate for top-k: larger prob, the lower index among equal ones.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    return bi < 0 || v > bv || (!(bv > v) && i < bi);
}

__global__ static void router_fwd_kernel(float *w, int32_t *idx, float *probs,
                                         const float *logits, int64_t T, int E, int k,
                                         int n_group, int topk_group, int norm, float scaling) {
    __shared__ float gs[ROUTER_WARPS][MAX_GROUPS];
    __shared__ int chosen[ROUTER_WARPS][MAX_TOPK];
    int wid = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int64_t t = (int64_t)blockIdx.x * ROUTER_WARPS + wid;
    if (t >= T)
        return;
    const float *l = logits + t * E;
    float *p = probs + t * E;
    // softmax_row: max, exps rounded to float, their sum in double, one reciprocal
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32)
        m = fmaxf(m, l[e]);
    m = cu_warp_max(m);
    double s = 0;
    for (int e = lane; e < E; e += 32)
        s += (double)expf(__fsub_rn(l[e], m));
    s = cu_warp_sum_d(s);
    float inv = (float)(1.0 / s);
    for (int e = lane; e < E; e += 32)
        p[e] = __fmul_rn(expf(__fsub_rn(l[e], m)), inv);
    __syncwarp();
    int gsz = E / n_group;
    bool limit = topk_group < n_group;
    if (limit && lane == 0) { // keep_groups, serially as the CPU
        for (int g = 0; g < n_group; g++) {
            const float *pg = p + g * gsz;
            float top1 = pg[0], top2 = 0;
            for (int i = 1; i < gsz; i++) {
                if (pg[i] > top1) {
                    top2 = top1;
                    top1 = pg[i];
                } else if (i == 1 || pg[i] > top2) {
                    top2 = pg[i];
                }
            }
            gs[wid][g] = __fadd_rn(top1, top2);
        }
        for (int r = 0; r < topk_group; r++) {
            int best = -1;
            for (int g = 0; g < n_group; g++)
                if (gs[wid][g] != -1.0f && (best < 0 || gs[wid][g] > gs[wid][best]))
                    best = g;
            gs[wid][best] = -1.0f; // kept
        }
    }
    __syncwarp();
    for (int j = 0; j < k; j++) {
        float bv = 0;
        int bi = -1;
        for (int e = lane; e < E; e += 32) {
            if (limit && gs[wid][e / gsz] != -1.0f)
                continue;
            bool taken = false;
            for (int q = 0; q < j; q++)
                taken |= chosen[wid][q] == e;
            if (!taken && better(p[e], e, bv, bi)) {
                bv = p[e];
                bi = e;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && better(ov, oi, bv, bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if (lane == 0)
            chosen[wid][j] = bi;
        __syncwarp();
    }
    if (lane == 0) {
        float sum = 0;
        for (int j = 0; j < k; j++)
            sum = __fadd_rn(sum, p[chosen[wid][j]]);
        float div = norm ? __fadd_rn(sum, 1e-20f) : 1.0f;
        for (int j = 0; j < k; j++) {
            int e = chosen[wid][j];
            idx[t * k + j] = e;
            w[t * k + j] = __fmul_rn(__fdiv_rn(p[e], div), scaling);
        }
    }
}

__global__ static void router_bwd_kernel(float *dlogits, const float *dw, const float *probs,
                                         const int32_t *idx, int64_t T, int E, int k, int norm,
                                         float scaling) {
    int wid = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int64_t t = (int64_t)blockIdx.x * ROUTER_WARPS + wid;
    if (t >= T)
        return;
    const float *p = probs + t * E, *g = dw + t * k;
    const int32_t *ix = idx + t * k;
    float *dl = dlogits + t * E;
    // every lane forms the same scalars, in the CPU's order
    float psum = 0, gw = 0;
    for (int j = 0; j < k; j++) {
        psum = __fadd_rn(psum, p[ix[j]]);
        gw = __fadd_rn(gw, __fmul_rn(g[j], p[ix[j]]));
    }
    float div = norm ? __fadd_rn(psum, 1e-20f) : 1.0f, sub = norm ? __fdiv_rn(gw, div) : 0.0f;
    float dot = 0;
    for (int j = 0; j < k; j++)
        dot = __fadd_rn(dot, __fdiv_rn(__fmul_rn(__fmul_rn(p[ix[j]], scaling),
                                                 __fsub_rn(g[j], sub)), div));
    for (int e = lane; e < E; e += 32)
        dl[e] = __fsub_rn(dl[e], __fmul_rn(p[e], dot));
    __syncwarp();
    for (int j = lane; j < k; j += 32) { // experts of a token are distinct
        float v = __fdiv_rn(__fmul_rn(__fmul_rn(p[ix[j]], scaling), __fsub_rn(g[j], sub)), div);
        dl[ix[j]] = __fadd_rn(dl[ix[j]], v);
    }
}

static int check_router(int64_t T, int64_t E, int64_t k, int64_t n_group, int64_t topk_group) {
    if (E < 1 || E > 0x7fffffff || k < 1 || k > MAX_TOPK || k > E || n_group < 1 ||
        n_group > MAX_GROUPS || E % n_group != 0 || topk_group < 1 || topk_group > n_group ||
        (T + ROUTER_WARPS - 1) / ROUTER_WARPS > 0x7fffffff)
        return cu_fail(__FILE__, __LINE__, "router: unsupported sizes (T %lld, E %lld, k %lld, "
                       "groups %lld, keep %lld; k <= %d, groups <= %d)", (long long)T,
                       (long long)E, (long long)k, (long long)n_group, (long long)topk_group,
                       MAX_TOPK, MAX_GROUPS);
    return 0;
}

extern "C" int molt_cuda_router_fwd(float *w, int32_t *idx, float *probs, const float *logits,
                                    int64_t T, int64_t E, int64_t k, int64_t n_group,
                                    int64_t topk_group, int norm, float scaling) {
    if (T <= 0)
        return 0;
    CU_TRY(check_router(T, E, k, n_group, topk_group));
    CU_TRY(cu_ready());
    unsigned g = (unsigned)((T + ROUTER_WARPS - 1) / ROUTER_WARPS);
    router_fwd_kernel<<<g, 32 * ROUTER_WARPS, 0, cu_stream()>>>(
        w, idx, probs, logits, T, (int)E, (int)k, (int)n_group, (int)topk_group, norm, scaling);
    CU_LAUNCHED("router_fwd_kernel");
    return 0;
}

extern "C" int molt_cuda_router_bwd(float *dlogits, const float *dw, const float *probs,
                                    const int32_t *idx, int64_t T, int64_t E, int64_t k, int norm,
                                    float scaling) {
    if (T <= 0)
        return 0;
    CU_TRY(check_router(T, E, k, 1, 1));
    CU_TRY(cu_ready());
    unsigned g = (unsigned)((T + ROUTER_WARPS - 1) / ROUTER_WARPS);
    router_bwd_kernel<<<g, 32 * ROUTER_WARPS, 0, cu_stream()>>>(dlogits, dw, probs, idx, T,
                                                                (int)E, (int)k, norm, scaling);
    CU_LAUNCHED("router_bwd_kernel");
    return 0;
}

// ---- dispatch: slots sorted stably by expert -------------------------------------------------

__global__ static void count_kernel(int32_t *cnt, const int32_t *idx, int64_t n) {
    GRID_LOOP(s, n) atomicAdd(&cnt[idx[s]], 1);
}

// One block per expert e: off[e] = sum of the lower experts' counts; then the slots routed to
// e, in slot order, take positions off[e], off[e] + 1, ... (a block-wide prefix count).
__global__ static void place_kernel(int32_t *off, int32_t *perm, int32_t *inv,
                                    const int32_t *cnt, const int32_t *idx, int64_t n, int E) {
    __shared__ int32_t warp_tot[32];
    __shared__ int32_t base_sh;
    int e = blockIdx.x, lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (threadIdx.x == 0) {
        int32_t b = 0;
        for (int q = 0; q < e; q++)
            b += cnt[q];
        base_sh = b;
        off[e] = b;
        if (e == E - 1)
            off[E] = b + cnt[e];
    }
    __syncthreads();
    int32_t run = base_sh;
    for (int64_t c0 = 0; c0 < n; c0 += blockDim.x) {
        int64_t s = c0 + threadIdx.x;
        bool hit = s < n && idx[s] == e;
        unsigned bal = __ballot_sync(0xffffffffu, hit);
        if (lane == 0)
            warp_tot[wid] = __popc(bal);
        __syncthreads();
        int32_t before = 0, total = 0;
        for (int q = 0; q < nw; q++) {
            before += q < wid ? warp_tot[q] : 0;
            total += warp_tot[q];
        }
        if (hit) {
            int32_t pos = run + before + __popc(bal & ((1u << lane) - 1u));
            perm[pos] = (int32_t)s;
            inv[s] = pos;
        }
        run += total;
        __syncthreads(); // warp_tot is rewritten next round
    }
}

template <typename T>
__global__ static void gather_kernel(T *xs, const T *x, const int32_t *perm, int64_t n, int k,
                                     int64_t H) {
    GRID_LOOP(i, n * H) {
        int64_t p = i / H, h = i - p * H;
        xs[i] = x[(int64_t)(perm[p] / k) * H + h];
    }
}

// y[t] = sum_j w[t, j] O[inv[t k + j]] (f32, j in order), written (beta 0) or added (beta 1).
template <typename T>
__global__ static void combine_kernel(T *y, const T *O, const T *w, const int32_t *inv,
                                      int64_t Tn, int k, int64_t H, bool add) {
    GRID_LOOP(i, Tn * H) {
        int64_t t = i / H, h = i - t * H;
        float acc = 0;
        for (int j = 0; j < k; j++)
            acc = fmaf(cu_ld(w, t * k + j), cu_ld(O, (int64_t)inv[t * k + j] * H + h), acc);
        cu_st(y, i, add ? __fadd_rn(cu_ld(y, i), acc) : acc);
    }
}

// dx[t] += sum_j dxs[inv[t k + j]]
template <typename T>
__global__ static void sum_back_kernel(T *dx, const T *dxs, const int32_t *inv, int64_t Tn,
                                       int k, int64_t H) {
    GRID_LOOP(i, Tn * H) {
        int64_t t = i / H, h = i - t * H;
        float acc = 0;
        for (int j = 0; j < k; j++)
            acc = __fadd_rn(acc, cu_ld(dxs, (int64_t)inv[t * k + j] * H + h));
        cu_st(dx, i, __fadd_rn(cu_ld(dx, i), acc));
    }
}

// act (n, I) = silu(G[:, :I]) * G[:, I:], G (n, 2I)
template <typename T>
__global__ static void swiglu_rows_kernel(T *act, const T *G, int64_t n, int64_t I) {
    GRID_LOOP(i, n * I) {
        int64_t p = i / I, c = i - p * I;
        float g = cu_ld(G, p * 2 * I + c), u = cu_ld(G, p * 2 * I + I + c);
        float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
        cu_st(act, i, __fmul_rn(__fmul_rn(g, s), u));
    }
}

// dG[:, :I] = dact u silu'(g), dG[:, I:] = dact silu(g) (overwritten)
template <typename T>
__global__ static void swiglu_rows_bwd_kernel(T *dG, const T *dact, const T *G, int64_t n,
                                              int64_t I) {
    GRID_LOOP(i, n * I) {
        int64_t p = i / I, c = i - p * I;
        float g = cu_ld(G, p * 2 * I + c), u = cu_ld(G, p * 2 * I + I + c), d = cu_ld(dact, i);
        float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g)));
        float ds = __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, s)));
        cu_st(dG, p * 2 * I + c, __fmul_rn(__fmul_rn(__fmul_rn(d, u), s), ds));
        cu_st(dG, p * 2 * I + I + c, __fmul_rn(__fmul_rn(d, g), s));
    }
}

// dw[t, j] += dy[t] . O[inv[t k + j]], one warp per slot
template <typename T>
__global__ static void dweight_kernel(T *dw, const T *dy, const T *O, const int32_t *inv,
                                      int64_t n, int k, int64_t H) {
    int lane = threadIdx.x & 31;
    int64_t warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t s = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; s < n; s += warps) {
        const T *o = O + (int64_t)inv[s] * H, *d = dy + (s / k) * H;
        float acc = 0;
        for (int64_t h = lane; h < H; h += 32)
            acc = fmaf(cu_ld(d, h), cu_ld(o, h), acc);
        acc = cu_warp_sum(acc);
        if (lane == 0)
            cu_st(dw, s, __fadd_rn(cu_ld(dw, s), acc));
    }
}

// dO[p] = w[slot] dy[token of slot], slot = perm[p]
template <typename T>
__global__ static void scale_rows_kernel(T *dO, const T *dy, const T *w, const int32_t *perm,
                                         int64_t n, int k, int64_t H) {
    GRID_LOOP(i, n * H) {
        int64_t p = i / H, h = i - p * H;
        int32_t s = perm[p];
        cu_st(dO, i, __fmul_rn(cu_ld(w, s), cu_ld(dy, (int64_t)(s / k) * H + h)));
    }
}

// rep[e][o][kk] = b[o][kk E + e] (B (O, r E) in PEFT's layout), or with add the reverse:
// b[o][kk E + e] += rep[e][o][kk]
template <typename T>
__global__ static void repack_kernel(T *rep, T *b, int64_t E, int64_t O, int64_t r, bool back) {
    GRID_LOOP(i, E * O * r) {
        int64_t e = i / (O * r), rem = i - e * O * r, o = rem / r, kk = rem - o * r;
        int64_t bi = o * r * E + kk * E + e;
        if (back)
            cu_st(b, bi, __fadd_rn(cu_ld(b, bi), cu_ld(rep, i)));
        else
            rep[i] = b[bi];
    }
}

// ---- experts -----------------------------------------------------------------------------------

namespace {

struct bufs {
    int32_t *cnt, *off, *perm, *inv;
    void *xs, *G, *act, *O;       // (n, H), (n, 2I), (n, I), (n, H)
    void *ugu, *ud;               // (n, r) each, LoRA only
    void *bgu, *bd;               // repacked B: (E, 2I, r), (E, H, r)
    void *dec_gu, *dec_d;         // one decoded expert: (2I, H), (H, I); quantized only
    void *dO, *dact, *dG, *dxs;   // backward: (n, H), (n, I), (n, 2I), (n, H)
    void *vgu, *vd;               // backward LoRA: (n, r) each
    void *dbgu, *dbd;             // backward LoRA: repacked dB, as bgu, bd
    void **ptrs;                  // 3 E device pointers for the grouped GEMM
};

struct run {
    const molt_cuda_experts *p;
    bufs b;
    int64_t n, es;
    int32_t hoff[MAX_EXPERTS + 1]; // host copy of off
    bool lora_gu, lora_d, quant;
};

size_t layout(bufs *b, const molt_cuda_experts *p, char *base, bool bwd) {
    char *c = base;
    int64_t n = p->T * p->k, H = p->H, I = p->I, E = p->E, r = p->r;
    size_t es = cu_dtype_size(p->dt);
    bool lgu = p->a_gu != NULL, ld = p->a_d != NULL, q = p->qgu != NULL;
    b->cnt = (int32_t *)cu_take(&c, (size_t)E * 4);
    b->off = (int32_t *)cu_take(&c, (size_t)(E + 1) * 4);
    b->perm = (int32_t *)cu_take(&c, (size_t)n * 4);
    b->inv = (int32_t *)cu_take(&c, (size_t)n * 4);
    b->xs = cu_take(&c, (size_t)(n * H) * es);
    b->G = cu_take(&c, (size_t)(n * 2 * I) * es);
    b->act = cu_take(&c, (size_t)(n * I) * es);
    b->O = cu_take(&c, (size_t)(n * H) * es);
    b->ugu = lgu ? cu_take(&c, (size_t)(n * r) * es) : NULL;
    b->ud = ld ? cu_take(&c, (size_t)(n * r) * es) : NULL;
    b->bgu = lgu ? cu_take(&c, (size_t)(E * 2 * I * r) * es) : NULL;
    b->bd = ld ? cu_take(&c, (size_t)(E * H * r) * es) : NULL;
    b->dec_gu = q ? cu_take(&c, (size_t)(2 * I * H) * es) : NULL;
    b->dec_d = q ? cu_take(&c, (size_t)(H * I) * es) : NULL;
    b->ptrs = (void **)cu_take(&c, (size_t)(3 * E) * sizeof(void *));
    b->dO = b->dact = b->dG = b->dxs = b->vgu = b->vd = b->dbgu = b->dbd = NULL;
    if (bwd) {
        b->dO = cu_take(&c, (size_t)(n * H) * es);
        b->dact = cu_take(&c, (size_t)(n * I) * es);
        b->dG = cu_take(&c, (size_t)(n * 2 * I) * es);
        b->dxs = cu_take(&c, (size_t)(n * H) * es);
        b->vgu = lgu ? cu_take(&c, (size_t)(n * r) * es) : NULL;
        b->vd = ld ? cu_take(&c, (size_t)(n * r) * es) : NULL;
        b->dbgu = lgu ? cu_take(&c, (size_t)(E * 2 * I * r) * es) : NULL;
        b->dbd = ld ? cu_take(&c, (size_t)(E * H * r) * es) : NULL;
    }
    return (size_t)(c - base);
}

const char *elem(const void *base, int64_t i, int64_t es) { return (const char *)base + i * es; }
char *elem_w(void *base, int64_t i, int64_t es) { return (char *)base + i * es; }

// Per busy expert e: one problem of a product. `a`, `c` are row buffers indexed by the
// expert's first sorted row (row widths lda, ldc); `bstack` is a per-expert stack whose
// matrix e starts at e * bstride (or NULL: `bfixed` for every expert, the decoded buffer).
struct prod {
    bool ta, tb;
    int64_t N, K;      // M is the expert's row count, unless ta (then M = `M_fixed`)
    int64_t M_fixed;   // with ta: output rows (a weight-gradient product)
    const void *a;
    int64_t lda;
    const void *bstack;
    int64_t bstride, ldb;
    void *c;
    int64_t ldc, cstride; // cstride: with ta, C is a per-expert stack (stride per expert)
    float alpha, beta;
};

// Runs product pr for experts [e0, e1) (all busy ones) as one grouped GEMM.
int run_prod(run &R, const prod &pr, int64_t e0, int64_t e1) {
    static thread_local int64_t M[MAX_EXPERTS], N[MAX_EXPERTS], K[MAX_EXPERTS];
    static thread_local const void *A[MAX_EXPERTS], *Bm[MAX_EXPERTS];
    static thread_local void *C[MAX_EXPERTS];
    int g = 0;
    molt_cuda_dtype dt = R.p->dt;
    for (int64_t e = e0; e < e1; e++) {
        int64_t ne = R.hoff[e + 1] - R.hoff[e], row = R.hoff[e];
        if (ne == 0)
            continue;
        if (pr.ta) { // C (M_fixed, N) = A_e^T B_e, K = rows of the expert
            M[g] = pr.M_fixed;
            K[g] = ne;
            A[g] = elem(pr.a, row * pr.lda, R.es);
            Bm[g] = elem(pr.bstack, row * pr.ldb, R.es);
            C[g] = elem_w(pr.c, e * pr.cstride, R.es);
        } else {
            M[g] = ne;
            K[g] = pr.K;
            A[g] = elem(pr.a, row * pr.lda, R.es);
            Bm[g] = elem(pr.bstack, e * pr.bstride, R.es);
            C[g] = elem_w(pr.c, row * pr.ldc, R.es);
        }
        N[g] = pr.N;
        g++;
    }
    return cu_gemm_grouped(dt, dt, pr.ta, pr.tb, g, M, N, K, pr.alpha, A, pr.lda, Bm, pr.ldb,
                           pr.beta, C, pr.ldc, R.b.ptrs);
}

int plan(run &R) {
    const molt_cuda_experts *p = R.p;
    cudaStream_t st = cu_stream();
    CU_CHECK(cudaMemsetAsync(R.b.cnt, 0, (size_t)p->E * 4, st));
    count_kernel<<<cu_blocks(R.n, 256), 256, 0, st>>>(R.b.cnt, p->idx, R.n);
    CU_LAUNCHED("count_kernel");
    place_kernel<<<(unsigned)p->E, 256, 0, st>>>(R.b.off, R.b.perm, R.b.inv, R.b.cnt, p->idx,
                                                 R.n, (int)p->E);
    CU_LAUNCHED("place_kernel");
    CU_CHECK(cudaMemcpyAsync(R.hoff, R.b.off, (size_t)(p->E + 1) * 4, cudaMemcpyDeviceToHost,
                             st));
    CU_CHECK(cudaStreamSynchronize(st));
    return 0;
}

int decode_expert(run &R, const molt_cuda_qw *q, void *dst, int64_t e) {
    int64_t per = q->rows * q->cols;
    return cu_dequant(R.p->dt, dst, q, e * per, per);
}

// G (n, 2I) = xs W_gu,e^T (+ s (xs A_gu,e^T) B_gu,e^T), per busy expert.
int gate_up(run &R) {
    const molt_cuda_experts *p = R.p;
    int64_t H = p->H, I = p->I, r = p->r;
    prod base = {false, true, 2 * I, H, 0, R.b.xs, H, p->wgu, 2 * I * H, H, R.b.G, 2 * I, 0,
                 1.0f, 0.0f};
    if (!R.quant) {
        CU_TRY(run_prod(R, base, 0, p->E));
    } else {
        for (int64_t e = 0; e < p->E; e++) {
            if (R.hoff[e + 1] == R.hoff[e])
                continue;
            CU_TRY(decode_expert(R, p->qgu, R.b.dec_gu, e));
            prod one = base;
            one.bstack = R.b.dec_gu;
            one.bstride = 0;
            CU_TRY(run_prod(R, one, e, e + 1));
        }
    }
    if (R.lora_gu) {
        prod u = {false, true, r, H, 0, R.b.xs, H, p->a_gu, r * H, H, R.b.ugu, r, 0, 1.0f, 0.0f};
        CU_TRY(run_prod(R, u, 0, p->E));
        prod d = {false, true, 2 * I, r, 0, R.b.ugu, r, R.b.bgu, 2 * I * r, r, R.b.G, 2 * I, 0,
                  p->s, 1.0f};
        CU_TRY(run_prod(R, d, 0, p->E));
    }
    return 0;
}

// O (n, H) = act W_d,e^T (+ s (act A_d,e^T) B_d,e^T)
int down(run &R) {
    const molt_cuda_experts *p = R.p;
    int64_t H = p->H, I = p->I, r = p->r;
    prod base = {false, true, H, I, 0, R.b.act, I, p->wd, H * I, I, R.b.O, H, 0, 1.0f, 0.0f};
    if (!R.quant) {
        CU_TRY(run_prod(R, base, 0, p->E));
    } else {
        for (int64_t e = 0; e < p->E; e++) {
            if (R.hoff[e + 1] == R.hoff[e])
                continue;
            CU_TRY(decode_expert(R, p->qd, R.b.dec_d, e));
            prod one = base;
            one.bstack = R.b.dec_d;
            one.bstride = 0;
            CU_TRY(run_prod(R, one, e, e + 1));
        }
    }
    if (R.lora_d) {
        prod u = {false, true, r, I, 0, R.b.act, I, p->a_d, r * I, I, R.b.ud, r, 0, 1.0f, 0.0f};
        CU_TRY(run_prod(R, u, 0, p->E));
        prod d = {false, true, H, r, 0, R.b.ud, r, R.b.bd, H * r, r, R.b.O, H, 0, p->s, 1.0f};
        CU_TRY(run_prod(R, d, 0, p->E));
    }
    return 0;
}

int check(const molt_cuda_experts *p) {
    bool dense = p->wgu && p->wd && !p->qgu && !p->qd, quant = !p->wgu && !p->wd && p->qgu &&
                                                              p->qd;
    bool lora_ok = (!p->a_gu || (p->b_gu && p->r >= 1)) && (!p->a_d || (p->b_d && p->r >= 1));
    if (p->T < 0 || p->k < 1 || p->E < 1 || p->E > MAX_EXPERTS || p->H < 1 || p->I < 1 ||
        !(dense || quant) || !lora_ok || p->T * p->k > 0x7fffffff || p->E * 3 > 0x7fffffff)
        return cu_fail(__FILE__, __LINE__, "experts: bad operands (T %lld, k %lld, E %lld (at "
                       "most %d), H %lld, I %lld, %s stacks, r %lld)", (long long)p->T,
                       (long long)p->k, (long long)p->E, MAX_EXPERTS, (long long)p->H,
                       (long long)p->I, dense ? "dense" : quant ? "quantized" : "no valid",
                       (long long)p->r);
    if (quant && (p->qgu->n_mat != p->E || p->qgu->rows != 2 * p->I || p->qgu->cols != p->H ||
                  p->qd->n_mat != p->E || p->qd->rows != p->H || p->qd->cols != p->I))
        return cu_fail(__FILE__, __LINE__, "experts: quantized stacks do not match E %lld, "
                       "H %lld, I %lld", (long long)p->E, (long long)p->H, (long long)p->I);
    return 0;
}

// Sorting, gathering, repacking and the two products: everything up to O.
int forward_rows(run &R, void *ws, bool bwd) {
    const molt_cuda_experts *p = R.p;
    R.n = p->T * p->k;
    R.es = (int64_t)cu_dtype_size(p->dt);
    R.lora_gu = p->a_gu != NULL;
    R.lora_d = p->a_d != NULL;
    R.quant = p->qgu != NULL;
    layout(&R.b, p, (char *)ws, bwd);
    CU_TRY(plan(R));
    cudaStream_t st = cu_stream();
    int64_t H = p->H, I = p->I, n = R.n;
    DISPATCH(p->dt, (gather_kernel<T><<<cu_blocks(n * H, 256), 256, 0, st>>>(
                        (T *)R.b.xs, (const T *)p->x, R.b.perm, n, (int)p->k, H)));
    CU_LAUNCHED("gather_kernel");
    if (R.lora_gu) {
        DISPATCH(p->dt, (repack_kernel<T><<<cu_blocks(p->E * 2 * I * p->r, 256), 256, 0, st>>>(
                            (T *)R.b.bgu, (T *)p->b_gu, p->E, 2 * I, p->r, false)));
        CU_LAUNCHED("repack_kernel");
    }
    if (R.lora_d) {
        DISPATCH(p->dt, (repack_kernel<T><<<cu_blocks(p->E * H * p->r, 256), 256, 0, st>>>(
                            (T *)R.b.bd, (T *)p->b_d, p->E, H, p->r, false)));
        CU_LAUNCHED("repack_kernel");
    }
    CU_TRY(gate_up(R));
    DISPATCH(p->dt, (swiglu_rows_kernel<T><<<cu_blocks(n * I, 256), 256, 0, st>>>(
                        (T *)R.b.act, (const T *)R.b.G, n, I)));
    CU_LAUNCHED("swiglu_rows_kernel");
    return down(R);
}

} // namespace

extern "C" size_t molt_cuda_experts_ws_bytes(const molt_cuda_experts *p) {
    bufs b;
    return layout(&b, p, NULL, true) + 256;
}

extern "C" int molt_cuda_experts_fwd(const molt_cuda_experts *p, void *y, void *ws) {
    CU_TRY(check(p));
    if (p->T == 0)
        return 0;
    CU_TRY(cu_blas_ready());
    static thread_local run R;
    R.p = p;
    CU_TRY(forward_rows(R, ws, false));
    DISPATCH(p->dt, (combine_kernel<T><<<cu_blocks(p->T * p->H, 256), 256, 0, cu_stream()>>>(
                        (T *)y, (const T *)R.b.O, (const T *)p->w, R.b.inv, p->T, (int)p->k, p->H,
                        false)));
    CU_LAUNCHED("combine_kernel");
    return 0;
}

// The backward products of one expert stack side, in the order the forward ran them.
static int backward_down(run &R, const molt_cuda_experts_grads *g) {
    const molt_cuda_experts *p = R.p;
    int64_t H = p->H, I = p->I, r = p->r;
    // dact = dO W_d,e (+ s (dO B_d,e) A_d,e)
    prod base = {false, false, I, H, 0, R.b.dO, H, p->wd, H * I, I, R.b.dact, I, 0, 1.0f, 0.0f};
    if (!R.quant) {
        CU_TRY(run_prod(R, base, 0, p->E));
    } else {
        for (int64_t e = 0; e < p->E; e++) {
            if (R.hoff[e + 1] == R.hoff[e])
                continue;
            CU_TRY(decode_expert(R, p->qd, R.b.dec_d, e));
            prod one = base;
            one.bstack = R.b.dec_d;
            one.bstride = 0;
            CU_TRY(run_prod(R, one, e, e + 1));
        }
    }
    if (!R.lora_d)
        return 0;
    prod v = {false, false, r, H, 0, R.b.dO, H, R.b.bd, H * r, r, R.b.vd, r, 0, 1.0f, 0.0f};
    CU_TRY(run_prod(R, v, 0, p->E));
    prod dx = {false, false, I, r, 0, R.b.vd, r, p->a_d, r * I, I, R.b.dact, I, 0, p->s, 1.0f};
    CU_TRY(run_prod(R, dx, 0, p->E));
    if (g->da_d) { // dA_d,e (r, I) += s V_e^T act_e
        prod da = {true, false, I, 0, r, R.b.vd, r, R.b.act, 0, I, g->da_d, I, r * I, p->s, 1.0f};
        CU_TRY(run_prod(R, da, 0, p->E));
    }
    if (g->db_d) { // dB_d,e (H, r) += s dO_e^T U_e, repacked, added back below
        CU_CHECK(cudaMemsetAsync(R.b.dbd, 0, (size_t)(p->E * H * r) * R.es, cu_stream()));
        prod db = {true, false, r, 0, H, R.b.dO, H, R.b.ud, 0, r, R.b.dbd, r, H * r, p->s, 1.0f};
        CU_TRY(run_prod(R, db, 0, p->E));
        DISPATCH(p->dt, (repack_kernel<T><<<cu_blocks(p->E * H * r, 256), 256, 0, cu_stream()>>>(
                            (T *)R.b.dbd, (T *)g->db_d, p->E, H, r, true)));
        CU_LAUNCHED("repack_kernel");
    }
    return 0;
}

static int backward_gate_up(run &R, const molt_cuda_experts_grads *g) {
    const molt_cuda_experts *p = R.p;
    int64_t H = p->H, I = p->I, r = p->r;
    // dxs = dG W_gu,e (+ s (dG B_gu,e) A_gu,e)
    prod base = {false, false, H, 2 * I, 0, R.b.dG, 2 * I, p->wgu, 2 * I * H, H, R.b.dxs, H, 0,
                 1.0f, 0.0f};
    if (!R.quant) {
        CU_TRY(run_prod(R, base, 0, p->E));
    } else {
        for (int64_t e = 0; e < p->E; e++) {
            if (R.hoff[e + 1] == R.hoff[e])
                continue;
            CU_TRY(decode_expert(R, p->qgu, R.b.dec_gu, e));
            prod one = base;
            one.bstack = R.b.dec_gu;
            one.bstride = 0;
            CU_TRY(run_prod(R, one, e, e + 1));
        }
    }
    if (!R.lora_gu)
        return 0;
    prod v = {false, false, r, 2 * I, 0, R.b.dG, 2 * I, R.b.bgu, 2 * I * r, r, R.b.vgu, r, 0,
              1.0f, 0.0f};
    CU_TRY(run_prod(R, v, 0, p->E));
    prod dx = {false, false, H, r, 0, R.b.vgu, r, p->a_gu, r * H, H, R.b.dxs, H, 0, p->s, 1.0f};
    CU_TRY(run_prod(R, dx, 0, p->E));
    if (g->da_gu) { // dA_gu,e (r, H) += s V_e^T xs_e
        prod da = {true, false, H, 0, r, R.b.vgu, r, R.b.xs, 0, H, g->da_gu, H, r * H, p->s, 1.0f};
        CU_TRY(run_prod(R, da, 0, p->E));
    }
    if (g->db_gu) { // dB_gu,e (2I, r) += s dG_e^T U_e
        CU_CHECK(cudaMemsetAsync(R.b.dbgu, 0, (size_t)(p->E * 2 * I * r) * R.es, cu_stream()));
        prod db = {true, false, r, 0, 2 * I, R.b.dG, 2 * I, R.b.ugu, 0, r, R.b.dbgu, r,
                   2 * I * r, p->s, 1.0f};
        CU_TRY(run_prod(R, db, 0, p->E));
        DISPATCH(p->dt, (repack_kernel<T><<<cu_blocks(p->E * 2 * I * r, 256), 256, 0,
                                            cu_stream()>>>((T *)R.b.dbgu, (T *)g->db_gu, p->E,
                                                           2 * I, r, true)));
        CU_LAUNCHED("repack_kernel");
    }
    return 0;
}

extern "C" int molt_cuda_experts_bwd(const molt_cuda_experts *p, const void *dy,
                                     const molt_cuda_experts_grads *g, void *ws) {
    CU_TRY(check(p));
    if (p->T == 0)
        return 0;
    CU_TRY(cu_blas_ready());
    static thread_local run R;
    R.p = p;
    CU_TRY(forward_rows(R, ws, true));
    cudaStream_t st = cu_stream();
    int64_t n = R.n, H = p->H, I = p->I;
    if (g->dw) {
        DISPATCH(p->dt, (dweight_kernel<T><<<cu_blocks(n * 32, 256), 256, 0, st>>>(
                            (T *)g->dw, (const T *)dy, (const T *)R.b.O, R.b.inv, n, (int)p->k,
                            H)));
        CU_LAUNCHED("dweight_kernel");
    }
    bool gu_side = g->dx || (R.lora_gu && (g->da_gu || g->db_gu));
    bool d_side = gu_side || (R.lora_d && (g->da_d || g->db_d));
    if (!d_side)
        return 0;
    DISPATCH(p->dt, (scale_rows_kernel<T><<<cu_blocks(n * H, 256), 256, 0, st>>>(
                        (T *)R.b.dO, (const T *)dy, (const T *)p->w, R.b.perm, n, (int)p->k, H)));
    CU_LAUNCHED("scale_rows_kernel");
    CU_TRY(backward_down(R, g));
    if (!gu_side)
        return 0;
    DISPATCH(p->dt, (swiglu_rows_bwd_kernel<T><<<cu_blocks(n * I, 256), 256, 0, st>>>(
                        (T *)R.b.dG, (const T *)R.b.dact, (const T *)R.b.G, n, I)));
    CU_LAUNCHED("swiglu_rows_bwd_kernel");
    CU_TRY(backward_gate_up(R, g));
    if (g->dx) {
        DISPATCH(p->dt, (sum_back_kernel<T><<<cu_blocks(p->T * H, 256), 256, 0, st>>>(
                            (T *)g->dx, (const T *)R.b.dxs, R.b.inv, p->T, (int)p->k, H)));
        CU_LAUNCHED("sum_back_kernel");
    }
    return 0;
}
