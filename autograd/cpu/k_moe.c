// autograd/cpu/k_moe.c: MoE router and routed-expert kernels, reference loops and the
// optimized (sorted by expert, BLAS) expert path, and its inference form on the
// batch-invariant products. Not here: operand checks and the choice between kernels
// (ops_moe.c), the router's logits GEMM (an ordinary linear).
#include "real.h"
#include "k_moe.h"
#include "k_nn.h"
#include "k_quant.h"
#include "k_bi.h"

#include "k_blas.h"
// OpenBLAS's cblas.h includes complex.h; its `I` would clash with the intermediate size.
#undef I
#include <string.h>

// ---- router ----------------------------------------------------------------------------

// Marks a kept group in gscore. Sums of probabilities are >= 0 (or NaN), never -1.
#define GROUP_KEPT ((real)-1)

// Score of each group = sum of its two largest probs (its only prob for groups of one);
// then the topk_group best groups are marked GROUP_KEPT. Picking by repeated scans with a
// strict '>' keeps the lowest group index among equal scores.
static void keep_groups(real *gs, const real *p, int64_t E, int64_t n_group, int64_t topk) {
    int64_t gsz = E / n_group;
    for (int64_t g = 0; g < n_group; g++) {
        const real *pg = p + g * gsz;
        real top1 = pg[0], top2 = 0;
        for (int64_t i = 1; i < gsz; i++) {
            if (pg[i] > top1) {
                top2 = top1;
                top1 = pg[i];
            } else if (i == 1 || pg[i] > top2) {
                top2 = pg[i];
            }
        }
        gs[g] = top1 + top2;
    }
    for (int64_t r = 0; r < topk; r++) {
        int64_t best = -1;
        for (int64_t g = 0; g < n_group; g++)
            if (gs[g] != GROUP_KEPT && (best < 0 || gs[g] > gs[best]))
                best = g;
        gs[best] = GROUP_KEPT; // best >= 0: fewer than n_group groups are kept so far
    }
}

static int taken(const int32_t *idx, int64_t j, int64_t e) {
    for (int64_t i = 0; i < j; i++)
        if (idx[i] == e)
            return 1;
    return 0;
}

// Top-k over eligible experts by repeated scans: descending, lowest index first on ties.
// NaN probs (from NaN logits) make the order meaningless, but every index written is still
// eligible, distinct and in range: the first candidate is taken before any comparison.
static void pick_experts(int32_t *idx, const real *p, const real *gs, int64_t E, int64_t gsz,
                         int64_t k, int limit) {
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            if ((limit && gs[e / gsz] != GROUP_KEPT) || taken(idx, j, e))
                continue;
            if (best < 0 || p[e] > p[best])
                best = e;
        }
        idx[j] = (int32_t)best; // the op checked k <= eligible experts, so best >= 0
    }
}

static void router_row(real *w, int32_t *idx, real *p, real *gs, const real *l, int64_t E,
                       int64_t k, int64_t n_group, int64_t topk_group, int norm, real scaling) {
    K(softmax_row)(p, l, E);
    int limit = topk_group < n_group;
    if (limit)
        keep_groups(gs, p, E, n_group, topk_group);
    pick_experts(idx, p, gs, E, E / n_group, k, limit);
    real s = 0;
    for (int64_t j = 0; j < k; j++)
        s += p[idx[j]];
    real div = norm ? s + (real)1e-20 : 1;
    for (int64_t j = 0; j < k; j++)
        w[j] = p[idx[j]] / div * scaling;
}

// Below this many logits a parallel region costs more than it saves (and on a busy machine
// a team waiting for a descheduled thread costs far more).
#define ROUTER_PAR_MIN 16384

void K(moe_router_fwd)(real *w, int32_t *idx, real *probs, real *gscore, const real *logits,
                       int64_t T, int64_t E, int64_t k, int64_t n_group, int64_t topk_group,
                       int norm, real scaling, int par) {
#pragma omp parallel for schedule(static) if (par && T > 1 && T * E >= ROUTER_PAR_MIN)
    for (int64_t t = 0; t < T; t++)
        router_row(w + t * k, idx + t * k, probs + t * E, gscore + t * n_group, logits + t * E,
                   E, k, n_group, topk_group, norm, scaling);
}

void K(moe_router_bwd)(real *dlogits, const real *dw, const real *probs, const int32_t *idx,
                       int64_t T, int64_t E, int64_t k, int norm, real scaling) {
    for (int64_t t = 0; t < T; t++) {
        const real *p = probs + t * E, *g = dw + t * k;
        const int32_t *ix = idx + t * k;
        real *dl = dlogits + t * E;
        // w_j = s p_j / D with D = sum_i p_i + 1e-20 (or 1): dL/dp_j = s/D (g_j - sum_i g_i w_i/s)
        real psum = 0, gw = 0;
        for (int64_t j = 0; j < k; j++) {
            psum += p[ix[j]];
            gw += g[j] * p[ix[j]];
        }
        real div = norm ? psum + (real)1e-20 : 1, sub = norm ? gw / div : 0;
        // softmax backward: dl_e = p_e (dp_e - sum_e' p_e' dp_e'), dp nonzero only where chosen
        real dot = 0;
        for (int64_t j = 0; j < k; j++)
            dot += p[ix[j]] * scaling * (g[j] - sub) / div;
        for (int64_t e = 0; e < E; e++)
            dl[e] -= p[e] * dot;
        for (int64_t j = 0; j < k; j++)
            dl[ix[j]] += p[ix[j]] * scaling * (g[j] - sub) / div;
    }
}

// ---- experts, reference ------------------------------------------------------------------

static real sigmoid(real v) { return 1 / (1 + R_EXP(-v)); }

static real dot(const real *a, const real *b, int64_t n) {
    real s = 0;
    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

void K(moe_experts_fwd_ref)(real *y, const real *x, const real *w, const int32_t *idx,
                            const real *wgu, const real *wd, int64_t T, int64_t k, int64_t H,
                            int64_t I) {
    memset(y, 0, (size_t)(T * H) * sizeof(real));
    for (int64_t t = 0; t < T; t++) {
        const real *xt = x + t * H;
        real *yt = y + t * H;
        for (int64_t j = 0; j < k; j++) {
            int64_t e = idx[t * k + j];
            const real *gate = wgu + e * 2 * I * H, *up = gate + I * H, *down = wd + e * H * I;
            for (int64_t i = 0; i < I; i++) {
                real g = dot(gate + i * H, xt, H), u = dot(up + i * H, xt, H);
                real a = g * sigmoid(g) * u * w[t * k + j];
                for (int64_t h = 0; h < H; h++)
                    yt[h] += down[h * I + i] * a;
            }
        }
    }
}

void K(moe_experts_bwd_ref)(real *dx, real *dw, const real *dy, const real *x, const real *w,
                            const int32_t *idx, const real *wgu, const real *wd, int64_t T,
                            int64_t k, int64_t H, int64_t I) {
    for (int64_t t = 0; t < T; t++) {
        const real *xt = x + t * H, *dyt = dy + t * H;
        for (int64_t j = 0; j < k; j++) {
            int64_t e = idx[t * k + j];
            const real *gate = wgu + e * 2 * I * H, *up = gate + I * H, *down = wd + e * H * I;
            real wt = w[t * k + j], dws = 0;
            for (int64_t i = 0; i < I; i++) {
                real g = dot(gate + i * H, xt, H), u = dot(up + i * H, xt, H);
                real sg = sigmoid(g), act = g * sg;
                real q = 0; // (down^T dy)_i
                for (int64_t h = 0; h < H; h++)
                    q += dyt[h] * down[h * I + i];
                dws += q * act * u;
                if (!dx)
                    continue;
                real da = wt * q, dg = da * u * sg * (1 + g * (1 - sg)), du = da * act;
                for (int64_t h = 0; h < H; h++)
                    dx[t * H + h] += dg * gate[i * H + h] + du * up[i * H + h];
            }
            if (dw)
                dw[t * k + j] += dws;
        }
    }
}

// ---- experts, optimized --------------------------------------------------------------------
// The T*k (token, choice) slots are counting-sorted by expert and each expert's rows cut into
// blocks of up to ROWS. Blocks run one after another and BLAS threads each GEMM. Blocks are
// not spread over OpenMP threads, nor the cheap gather/SwiGLU/scatter loops between the
// GEMMs: with the pthread build of OpenBLAS, OpenMP teams spinning between or around BLAS
// calls fight BLAS's own threads for the cores (measured several times slower on 2 cores).
// Being serial, a block adds its result rows straight into the tokens' rows: no per-slot
// [T*k, H] buffer, no races, and a fixed summation order (by expert, then token).

#define ROWS 256

typedef struct {
    int64_t *off;  // (E + 1) first sorted position of each expert
    int64_t *cur;  // (E) fill cursor while sorting
    int32_t *perm; // (T*k) slot t*k + j at each sorted position
    real *buf;     // (ROWS * (3H + 3I)) block buffers
} moe_ws;

static size_t round64(size_t b) { return (b + 63) & ~(size_t)63; }

static size_t buf_reals(int64_t H, int64_t I) { return (size_t)(ROWS * (3 * H + 3 * I)); }

// Takes the next piece of the workspace (in the order ws_bytes counts them).
static void *carve(unsigned char **p, size_t bytes) {
    void *r = *p;
    *p += round64(bytes);
    return r;
}

static moe_ws ws_layout(void *base, int64_t T, int64_t k, int64_t E, int64_t H, int64_t I) {
    unsigned char *p = base;
    moe_ws w;
    w.off = carve(&p, (size_t)(E + 1) * sizeof(int64_t));
    w.cur = carve(&p, (size_t)E * sizeof(int64_t));
    w.perm = carve(&p, (size_t)(T * k) * sizeof(int32_t));
    w.buf = carve(&p, buf_reals(H, I) * sizeof(real));
    return w;
}

size_t K(moe_experts_ws_bytes)(int64_t T, int64_t k, int64_t E, int64_t H, int64_t I) {
    return round64((size_t)(E + 1) * sizeof(int64_t)) + round64((size_t)E * sizeof(int64_t)) +
           round64((size_t)(T * k) * sizeof(int32_t)) + round64(buf_reals(H, I) * sizeof(real));
}

static void dispatch(moe_ws *w, const int32_t *idx, int64_t n, int64_t E) {
    K(moe_dispatch)(w->off, w->cur, w->perm, idx, n, E);
}

void K(moe_dispatch)(int64_t *off, int64_t *cur, int32_t *perm, const int32_t *idx, int64_t n,
                     int64_t E) {
    memset(off, 0, (size_t)(E + 1) * sizeof(int64_t));
    for (int64_t s = 0; s < n; s++)
        off[idx[s] + 1]++;
    for (int64_t e = 0; e < E; e++) {
        off[e + 1] += off[e];
        cur[e] = off[e];
    }
    for (int64_t s = 0; s < n; s++) {
        int64_t p = cur[idx[s]]++;
        perm[p] = (int32_t)s;
    }
}

void K(moe_gather)(real *dst, const real *src, const int32_t *perm, int64_t nb, int64_t k,
                   int64_t H) {
    for (int64_t r = 0; r < nb; r++)
        memcpy(dst + r * H, src + (perm[r] / k) * H, (size_t)H * sizeof(real));
}

// Adds row r of src (nb, H) to the row of dst (T, H) of the token of slot perm[r].
void K(moe_scatter_add)(real *dst, const real *src, const int32_t *perm, int64_t nb, int64_t k,
                        int64_t H) {
    for (int64_t r = 0; r < nb; r++) {
        real *d = dst + (perm[r] / k) * H;
        for (int64_t h = 0; h < H; h++)
            d[h] += src[r * H + h];
    }
}

// Gate half of G (nb, 2I) <- weight * silu(gate) * up, the routing weight folded in before
// the down GEMM (which is linear).
static void swiglu_rows(real *G, const real *w, const int32_t *perm, int64_t nb, int64_t I) {
    int64_t I2 = 2 * I;
    for (int64_t r = 0; r < nb; r++) {
        real wt = w[perm[r]];
        for (int64_t i = 0; i < I; i++) {
            real g = G[r * I2 + i];
            G[r * I2 + i] = wt * g * sigmoid(g) * G[r * I2 + I + i];
        }
    }
}

void K(moe_experts_fwd)(real *y, const real *x, const real *w, const int32_t *idx,
                        const real *wgu, const real *wd, int64_t T, int64_t k, int64_t E,
                        int64_t H, int64_t I, void *ws) {
    moe_ws m = ws_layout(ws, T, k, E, H, I);
    dispatch(&m, idx, T * k, E);
    int64_t I2 = 2 * I;
    real *X = m.buf, *G = X + ROWS * H, *O = G + ROWS * I2;
    memset(y, 0, (size_t)(T * H) * sizeof(real));
    for (int64_t e = 0; e < E; e++)
        for (int64_t r0 = m.off[e]; r0 < m.off[e + 1]; r0 += ROWS) {
            int64_t nb = m.off[e + 1] - r0 < ROWS ? m.off[e + 1] - r0 : ROWS;
            K(moe_gather)(X, x, m.perm + r0, nb, k, H);
            R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nb, (int)I2, (int)H, 1, X,
                   (int)H, wgu + e * I2 * H, (int)H, 0, G, (int)I2);
            swiglu_rows(G, w, m.perm + r0, nb, I);
            R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nb, (int)H, (int)I, 1, G,
                   (int)I2, wd + e * H * I, (int)I, 0, O, (int)H);
            K(moe_scatter_add)(y, O, m.perm + r0, nb, k, H);
        }
}

// A (nb, I) = weight * silu(gate) * up from G (nb, 2I): swiglu_rows' values, packed.
static void swiglu_pack(real *A, const real *G, const real *w, const int32_t *perm, int64_t nb,
                        int64_t I) {
    for (int64_t r = 0; r < nb; r++) {
        real wt = w[perm[r]];
        const real *g = G + r * 2 * I;
        for (int64_t i = 0; i < I; i++)
            A[r * I + i] = wt * g[i] * sigmoid(g[i]) * g[I + i];
    }
}

void K(moe_experts_fwd_bi)(real *y, const real *x, const real *w, const int32_t *idx,
                           const real *wgu, const real *wd, int64_t T, int64_t k, int64_t E,
                           int64_t H, int64_t I, int nthreads, void *ws) {
    moe_ws m = ws_layout(ws, T, k, E, H, I);
    dispatch(&m, idx, T * k, E);
    int64_t I2 = 2 * I;
    real *X = m.buf, *G = X + ROWS * H, *O = G + ROWS * I2, *A = O + ROWS * H;
    memset(y, 0, (size_t)(T * H) * sizeof(real));
    for (int64_t e = 0; e < E; e++)
        for (int64_t r0 = m.off[e]; r0 < m.off[e + 1]; r0 += ROWS) {
            int64_t nb = m.off[e + 1] - r0 < ROWS ? m.off[e + 1] - r0 : ROWS;
            K(moe_gather)(X, x, m.perm + r0, nb, k, H);
            K(bi_linear)(G, X, wgu + e * I2 * H, nb, I2, H, nthreads);
            swiglu_pack(A, G, w, m.perm + r0, nb, I);
            K(bi_linear)(O, A, wd + e * H * I, nb, H, I, nthreads);
            K(moe_scatter_add)(y, O, m.perm + r0, nb, k, H);
        }
}

// Turns the gate/up block G into (dgate, dup) in place, given Q = dY down (rows: slots), and
// adds each slot's routing-weight gradient q . act to dw.
static void swiglu_back_rows(real *G, const real *Q, real *dw, const real *w,
                             const int32_t *perm, int64_t nb, int64_t I) {
    int64_t I2 = 2 * I;
    for (int64_t r = 0; r < nb; r++) {
        real wt = w[perm[r]], dws = 0;
        for (int64_t i = 0; i < I; i++) {
            real g = G[r * I2 + i], u = G[r * I2 + I + i], q = Q[r * I + i];
            real sg = sigmoid(g), act = g * sg;
            dws += q * act * u;
            G[r * I2 + i] = wt * q * u * sg * (1 + g * (1 - sg));
            G[r * I2 + I + i] = wt * q * act;
        }
        if (dw)
            dw[perm[r]] += dws;
    }
}

void K(moe_experts_bwd)(real *dx, real *dw, const real *dy, const real *x, const real *w,
                        const int32_t *idx, const real *wgu, const real *wd, int64_t T,
                        int64_t k, int64_t E, int64_t H, int64_t I, void *ws) {
    moe_ws m = ws_layout(ws, T, k, E, H, I);
    dispatch(&m, idx, T * k, E);
    int64_t I2 = 2 * I;
    real *X = m.buf, *DY = X + ROWS * H, *G = DY + ROWS * H, *Q = G + ROWS * I2;
    real *DX = Q + ROWS * I;
    for (int64_t e = 0; e < E; e++)
        for (int64_t r0 = m.off[e]; r0 < m.off[e + 1]; r0 += ROWS) {
            int64_t nb = m.off[e + 1] - r0 < ROWS ? m.off[e + 1] - r0 : ROWS;
            const real *gu = wgu + e * I2 * H, *down = wd + e * H * I;
            K(moe_gather)(X, x, m.perm + r0, nb, k, H);
            K(moe_gather)(DY, dy, m.perm + r0, nb, k, H);
            // the gate/up activations are recomputed rather than saved by the forward
            R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nb, (int)I2, (int)H, 1, X,
                   (int)H, gu, (int)H, 0, G, (int)I2);
            R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nb, (int)I, (int)H, 1, DY,
                   (int)H, down, (int)I, 0, Q, (int)I);
            swiglu_back_rows(G, Q, dw, w, m.perm + r0, nb, I);
            if (!dx)
                continue;
            R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nb, (int)H, (int)I2, 1, G,
                   (int)I2, gu, (int)H, 0, DX, (int)H);
            K(moe_scatter_add)(dx, DX, m.perm + r0, nb, k, H);
        }
}
