// autograd/cpu/k_attention.c: causal attention over packed sequences, flash-style: the
// forward keeps only the per-(query, head) log-sum-exp, the backward recomputes each row's
// probabilities from it (dS = P * (dP - rowsum(dO * O))). Reference loops first, then the
// optimized version: query blocks of BLOCK rows against the keys of their segments through
// BLAS, blocks and heads spread over OpenMP threads. Not here: shape checks (the builder in
// ops_attention.c) or anything of size T x T.
#include "real.h"
#include "k_attention.h"
#include "k_blas.h"

#include <omp.h>
#include <stdbool.h>

#define BLOCK 64

// scale * qtemp[t] in the kernel's precision (both kernels use this exact expression).
static inline real row_coef(double scale, const real *qtemp, int64_t t) {
    return (real)scale * (qtemp ? qtemp[t] : (real)1);
}

static inline real dot(const real *a, const real *b, int64_t n) {
    real s = 0;
    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

// ---- reference ---------------------------------------------------------------------------

void K(attention_fwd_ref)(real *o, real *lse, const real *q, const real *k, const real *v,
                          const int32_t *seg, const real *qtemp, double scale, int64_t T,
                          int64_t H, int64_t Dqk, int64_t Dv) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            const real *qt = q + (t * H + h) * Dqk;
            real *ot = o + (t * H + h) * Dv;
            real c = row_coef(scale, qtemp, t), m = -INFINITY, sum = 0;
            for (int64_t s = 0; s <= t; s++)
                if (seg[s] == seg[t]) {
                    real sc = c * dot(qt, k + (s * H + h) * Dqk, Dqk);
                    if (sc > m)
                        m = sc;
                }
            for (int64_t d = 0; d < Dv; d++)
                ot[d] = 0;
            for (int64_t s = 0; s <= t; s++)
                if (seg[s] == seg[t]) {
                    real p = R_EXP(c * dot(qt, k + (s * H + h) * Dqk, Dqk) - m);
                    sum += p;
                    const real *vs = v + (s * H + h) * Dv;
                    for (int64_t d = 0; d < Dv; d++)
                        ot[d] += p * vs[d];
                }
            for (int64_t d = 0; d < Dv; d++)
                ot[d] /= sum;
            if (lse)
                lse[t * H + h] = m + R_LOG(sum);
        }
}

void K(attention_bwd_ref)(real *dq, real *dk, real *dv, const real *dout, const real *o,
                          const real *lse, const real *q, const real *k, const real *v,
                          const int32_t *seg, const real *qtemp, double scale, int64_t T,
                          int64_t H, int64_t Dqk, int64_t Dv) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            const real *qt = q + (t * H + h) * Dqk, *gt = dout + (t * H + h) * Dv;
            real c = row_coef(scale, qtemp, t);
            real drow = dot(gt, o + (t * H + h) * Dv, Dv);
            for (int64_t s = 0; s <= t; s++) {
                if (seg[s] != seg[t])
                    continue;
                const real *ks = k + (s * H + h) * Dqk, *vs = v + (s * H + h) * Dv;
                real p = R_EXP(c * dot(qt, ks, Dqk) - lse[t * H + h]);
                real ds = p * (dot(gt, vs, Dv) - drow) * c;
                if (dq)
                    for (int64_t d = 0; d < Dqk; d++)
                        dq[(t * H + h) * Dqk + d] += ds * ks[d];
                if (dk)
                    for (int64_t d = 0; d < Dqk; d++)
                        dk[(s * H + h) * Dqk + d] += ds * qt[d];
                if (dv)
                    for (int64_t d = 0; d < Dv; d++)
                        dv[(s * H + h) * Dv + d] += p * gt[d];
            }
        }
}

// ---- optimized ---------------------------------------------------------------------------

// Threads for a problem of T queries: below about 4 Mflop a team costs more than it saves
// (and on a busy machine one descheduled member stalls the whole region).
static int team_size(int nthreads, int64_t T, int64_t H, int64_t Dqk, int64_t Dv) {
    double flops = (double)T * (double)T * (double)H * (double)(Dqk + Dv);
    return flops < 4e6 ? 1 : nthreads;
}

// Each thread owns two BLOCK x T scratch matrices (scores/probabilities and dP).
size_t K(attention_ws_bytes)(int64_t T, int nthreads) {
    return (size_t)nthreads * 2 * BLOCK * (size_t)T * sizeof(real);
}

typedef struct {
    int64_t t0, nb; // queries [t0, t0 + nb)
    int64_t lo, nk; // keys [lo, lo + nk), lo + nk = t0 + nb
} span;

static span block_span(int64_t b, int64_t T, const int64_t *kv_lo) {
    span sp = {.t0 = b * BLOCK};
    sp.nb = T - sp.t0 < BLOCK ? T - sp.t0 : BLOCK;
    sp.lo = sp.t0;
    for (int64_t t = sp.t0; t < sp.t0 + sp.nb; t++)
        if (kv_lo[t] < sp.lo)
            sp.lo = kv_lo[t];
    sp.nk = sp.t0 + sp.nb - sp.lo;
    return sp;
}

// S (nb, nk) = Q_block K_keys^T for head h (rows of q and k are H * Dqk apart).
static void block_scores(real *S, const real *q, const real *k, span sp, int64_t h, int64_t H,
                         int64_t Dqk) {
    R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)sp.nb, (int)sp.nk, (int)Dqk, 1,
           q + (sp.t0 * H + h) * Dqk, (int)(H * Dqk), k + (sp.lo * H + h) * Dqk, (int)(H * Dqk),
           0, S, (int)sp.nk);
}

// Which keys a query may see. Every key of query t lies in [kv_lo[t], t]; when each segment
// id occupies one contiguous run (`runs`, the packed-batch layout) all of them do, and the
// per-key segment test is skipped.
typedef struct {
    const int32_t *seg;
    const int64_t *kv_lo;
    bool runs;
} key_set;

static key_set key_set_of(const int32_t *seg, const int64_t *kv_lo, int64_t T) {
    key_set ks = {seg, kv_lo, true};
    for (int64_t t = 1; t < T && ks.runs; t++)
        ks.runs = seg[t] == seg[t - 1] || kv_lo[t] == t;
    return ks;
}

static inline bool key_ok(const key_set *ks, int64_t s, int64_t t) {
    return ks->runs || ks->seg[s] == ks->seg[t];
}

// Row r of S (raw dot products) -> exp(score - max), zero where masked; *inv_sum gets the
// normalizer (applied to the output row instead of the nk probabilities). Returns the
// log-sum-exp.
static real softmax_row(real *row, span sp, int64_t r, const key_set *ks, real c,
                        real *inv_sum) {
    int64_t t = sp.t0 + r, a = ks->kv_lo[t] - sp.lo, b = t - sp.lo; // keys a..b
    real m = -INFINITY, sum = 0;
    for (int64_t j = a; j <= b; j++)
        if (key_ok(ks, sp.lo + j, t)) {
            row[j] *= c;
            m = row[j] > m ? row[j] : m;
        }
    for (int64_t j = 0; j < a; j++)
        row[j] = 0;
    for (int64_t j = a; j <= b; j++) {
        row[j] = key_ok(ks, sp.lo + j, t) ? R_EXP(row[j] - m) : 0;
        sum += row[j];
    }
    for (int64_t j = b + 1; j < sp.nk; j++)
        row[j] = 0;
    *inv_sum = 1 / sum;
    return m + R_LOG(sum);
}

void K(attention_fwd_fast)(real *o, real *lse, const real *q, const real *k, const real *v,
                           const int32_t *seg, const int64_t *kv_lo, const real *qtemp,
                           double scale, int64_t T, int64_t H, int64_t Dqk, int64_t Dv,
                           void *ws, int nthreads) {
    int64_t nblk = (T + BLOCK - 1) / BLOCK, ntask = nblk * H;
    key_set ks = key_set_of(seg, kv_lo, T);
    int team = team_size(nthreads, T, H, Dqk, Dv);
    int blas_threads = blas_single_begin(team);
    // the last blocks see the most keys: hand them out first
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
    for (int64_t task = 0; task < ntask; task++) {
        int64_t b = nblk - 1 - task / H, h = task % H;
        real *S = (real *)ws + (size_t)omp_get_thread_num() * 2 * BLOCK * (size_t)T;
        real inv[BLOCK];
        span sp = block_span(b, T, kv_lo);
        block_scores(S, q, k, sp, h, H, Dqk);
        for (int64_t r = 0; r < sp.nb; r++) {
            real l = softmax_row(S + r * sp.nk, sp, r, &ks, row_coef(scale, qtemp, sp.t0 + r),
                                 &inv[r]);
            if (lse)
                lse[(sp.t0 + r) * H + h] = l;
        }
        real *ob = o + (sp.t0 * H + h) * Dv;
        R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)sp.nb, (int)Dv, (int)sp.nk, 1, S,
               (int)sp.nk, v + (sp.lo * H + h) * Dv, (int)(H * Dv), 0, ob, (int)(H * Dv));
        for (int64_t r = 0; r < sp.nb; r++)
            for (int64_t d = 0; d < Dv; d++)
                ob[r * H * Dv + d] *= inv[r];
    }
    blas_single_end(team, blas_threads);
}

// P (nb, nk) from raw scores and the saved log-sum-exp; masked entries are exactly 0.
static void block_probs(real *S, span sp, int64_t h, int64_t H, const key_set *ks,
                        const real *lse, const real *qtemp, double scale) {
    for (int64_t r = 0; r < sp.nb; r++) {
        int64_t t = sp.t0 + r, a = ks->kv_lo[t] - sp.lo, b = t - sp.lo;
        real c = row_coef(scale, qtemp, t), l = lse[t * H + h], *row = S + r * sp.nk;
        for (int64_t j = 0; j < a; j++)
            row[j] = 0;
        for (int64_t j = a; j <= b; j++)
            row[j] = key_ok(ks, sp.lo + j, t) ? R_EXP(c * row[j] - l) : 0;
        for (int64_t j = b + 1; j < sp.nk; j++)
            row[j] = 0;
    }
}

// One query block of one head: recompute P, then dQ, dK, dV += their block products.
static void bwd_block(real *dq, real *dk, real *dv, const real *dout, const real *o,
                      const real *lse, const real *q, const real *k, const real *v,
                      const key_set *ks, const real *qtemp, double scale, span sp, int64_t h,
                      int64_t H, int64_t Dqk, int64_t Dv, real *S, real *dP) {
    const int ldq = (int)(H * Dqk), ldv = (int)(H * Dv), nb = (int)sp.nb, nk = (int)sp.nk;
    const real *qb = q + (sp.t0 * H + h) * Dqk, *kb = k + (sp.lo * H + h) * Dqk;
    const real *gb = dout + (sp.t0 * H + h) * Dv;
    block_scores(S, q, k, sp, h, H, Dqk);
    block_probs(S, sp, h, H, ks, lse, qtemp, scale);
    if (dv)
        R_GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, nk, (int)Dv, nb, 1, S, nk, gb, ldv, 1,
               dv + (sp.lo * H + h) * Dv, ldv);
    if (!dq && !dk)
        return;
    R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, nb, nk, (int)Dv, 1, gb, ldv,
           v + (sp.lo * H + h) * Dv, ldv, 0, dP, nk);
    for (int64_t r = 0; r < sp.nb; r++) {
        int64_t t = sp.t0 + r;
        real c = row_coef(scale, qtemp, t), drow = dot(gb + r * ldv, o + (t * H + h) * Dv, Dv);
        real *pr = S + r * sp.nk, *gr = dP + r * sp.nk;
        for (int64_t j = 0; j < sp.nk; j++)
            gr[j] = pr[j] * (gr[j] - drow) * c;
    }
    if (dq)
        R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, nb, (int)Dqk, nk, 1, dP, nk, kb, ldq, 1,
               dq + (sp.t0 * H + h) * Dqk, ldq);
    if (dk)
        R_GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, nk, (int)Dqk, nb, 1, dP, nk, qb, ldq, 1,
               dk + (sp.lo * H + h) * Dqk, ldq);
}

// Heads in parallel: the blocks of one head all add into the same dK/dV rows.
void K(attention_bwd_fast)(real *dq, real *dk, real *dv, const real *dout, const real *o,
                           const real *lse, const real *q, const real *k, const real *v,
                           const int32_t *seg, const int64_t *kv_lo, const real *qtemp,
                           double scale, int64_t T, int64_t H, int64_t Dqk, int64_t Dv,
                           void *ws, int nthreads) {
    int64_t nblk = (T + BLOCK - 1) / BLOCK;
    key_set ks = key_set_of(seg, kv_lo, T);
    int team = team_size(nthreads, T, H, Dqk, Dv);
    int blas_threads = blas_single_begin(team);
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
    for (int64_t h = 0; h < H; h++) {
        real *S = (real *)ws + (size_t)omp_get_thread_num() * 2 * BLOCK * (size_t)T;
        real *dP = S + (size_t)BLOCK * (size_t)T;
        for (int64_t b = 0; b < nblk; b++)
            bwd_block(dq, dk, dv, dout, o, lse, q, k, v, &ks, qtemp, scale,
                      block_span(b, T, kv_lo), h, H, Dqk, Dv, S, dP);
    }
    blas_single_end(team, blas_threads);
}
