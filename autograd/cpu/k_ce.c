// autograd/cpu/k_ce.c: fused linear + cross-entropy kernels, compiled once per element
// type. The reference kernels walk token by token and column by column with an online
// logsumexp (dot products and the running sum in double). The optimized ones work on tiles
// of counted tokens and chunks of vocabulary columns: one GEMM (two with the low-rank term
// of d->lr) yields a tile x chunk block of logits, OpenMP threads fold it into per-token
// running max/sum, and backward turns the recomputed block into softmax - onehot for two more
// GEMMs; with w frozen and no low-rank term, ce_fwd_grad forms the gradient to h in the
// forward instead (see there). Not here: operand checks, the loss itself and the choice of
// tile (ops_linear.c).
#include "real.h"
#include "k_ce.h"
#include "k_vexp.h"

#include "k_blas.h"
#include "../autograd.h"
#include <stdbool.h>
#include <string.h>

// Logit blocks smaller than this are processed on one thread: forking a team costs more
// than the work, and far more when the cores are busy with other processes.
#define CE_PAR_MIN 16384

static double dot_ref(const real *a, const real *b, int64_t n) {
    double acc = 0;
    for (int64_t i = 0; i < n; i++)
        acc += (double)a[i] * b[i];
    return acc;
}

// Logit z[t, v] in double, with the low-rank term when there is one.
static double logit_ref(const real *h, const real *w, const ce_dims *d, int64_t t, int64_t v) {
    double z = dot_ref(h + t * d->C, w + v * d->C, d->C);
    if (d->lr) {
        const real *h2 = d->lr->h2, *w2 = d->lr->w2;
        z += dot_ref(h2 + t * d->lr->R, w2 + v * d->lr->R, d->lr->R);
    }
    return z;
}

// Low-rank part of the reference backward for logit gradient g at (t, v).
static void lowrank_bwd_ref(const ce_dims *d, int64_t t, int64_t v, double g) {
    int64_t R = d->lr->R;
    const real *h2 = d->lr->h2, *w2 = d->lr->w2;
    real *dh2 = d->lr->dh2, *dw2 = d->lr->dw2;
    if (dh2)
        for (int64_t k = 0; k < R; k++)
            dh2[t * R + k] += (real)(g * w2[v * R + k]);
    if (dw2)
        for (int64_t k = 0; k < R; k++)
            dw2[v * R + k] += (real)(g * h2[t * R + k]);
}

void K(ce_fwd_ref)(double *lse, double *zt, const real *h, const real *w,
                   const int32_t *targets, const ce_dims *d) {
    for (int64_t t = 0; t < d->T; t++) {
        double m = -INFINITY, s = 0;
        for (int64_t v = 0; v < d->V; v++) {
            double z = logit_ref(h, w, d, t, v);
            if (v == targets[t])
                zt[t] = z;
            // running max: rescale the sum whenever the max moves
            if (z > m) {
                s = s * exp(m - z) + 1;
                m = z;
            } else {
                s += exp(z - m);
            }
        }
        lse[t] = m + log(s);
    }
}

void K(ce_bwd_ref)(real *dh, real *dw, const real *h, const real *w, const int32_t *targets,
                   const real *mask, double scale, const double *lse, const ce_dims *d) {
    int64_t C = d->C;
    for (int64_t t = 0; t < d->T; t++) {
        double coef = scale * (mask ? (double)mask[t] : 1.0);
        if (coef == 0)
            continue;
        for (int64_t v = 0; v < d->V; v++) {
            double z = logit_ref(h, w, d, t, v);
            double g = coef * (exp(z - lse[t]) - (v == targets[t] ? 1.0 : 0.0));
            if (d->lr)
                lowrank_bwd_ref(d, t, v, g);
            if (dh)
                for (int64_t c = 0; c < C; c++)
                    dh[t * C + c] += (real)(g * w[v * C + c]);
            if (dw)
                for (int64_t c = 0; c < C; c++)
                    dw[v * C + c] += (real)(g * h[t * C + c]);
        }
    }
}

// ---- optimized --------------------------------------------------------------------------
// Workspace layout: running max and sum (tile doubles each), then the gathered rows of h
// (tile x C), a tile of dh (tile x C), a block of logits (tile x chunk) and, with the
// low-rank term, gathered rows of h2 and a tile of dh2 (tile x R each).
typedef struct {
    double *m, *s;
    real *hbuf, *dhbuf, *zbuf, *h2buf, *dh2buf;
} ce_work;

static int64_t rank_of(const ce_dims *d) { return d->lr ? d->lr->R : 0; }

static ce_work work_split(void *work, const ce_dims *d) {
    ce_work k;
    k.m = work;
    k.s = k.m + d->tile;
    k.hbuf = (real *)(k.s + d->tile);
    k.dhbuf = k.hbuf + d->tile * d->C;
    k.zbuf = k.dhbuf + d->tile * d->C;
    k.h2buf = k.zbuf + d->tile * d->chunk;
    k.dh2buf = k.h2buf + d->tile * rank_of(d);
    return k;
}

size_t K(ce_work_bytes)(const ce_dims *d) {
    size_t per_row = (size_t)(2 * d->C + d->chunk + 2 * rank_of(d)) * sizeof(real);
    return (size_t)d->tile * (2 * sizeof(double) + per_row);
}

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Rows are ascending and distinct, so first..last spans n tokens exactly when they are
// consecutive; then the tile is used in place instead of copied.
static bool rows_consecutive(const int64_t *rows, int64_t n) {
    return rows[n - 1] - rows[0] == n - 1;
}

// The (n, C) matrix of rows `rows` of h: in place when consecutive, else gathered into buf.
static const real *gather_rows(real *buf, const real *h, const int64_t *rows, int64_t n,
                               int64_t C) {
    if (rows_consecutive(rows, n))
        return h + rows[0] * C;
    for (int64_t i = 0; i < n; i++)
        memcpy(buf + i * C, h + rows[i] * C, (size_t)C * sizeof(real));
    return buf;
}

// Folds n logits into a running (max m, sum s of exp(z - m)); z is overwritten.
static void fold_chunk(double *m, double *s, real *z, int64_t n) {
    real mx = z[0];
    for (int64_t j = 1; j < n; j++)
        if (z[j] > mx)
            mx = z[j];
    if (mx > *m) {
        *s *= exp(*m - mx);
        *m = mx;
    }
    // exact: m is always one of the logits (or -inf); z is not needed after this
    *s += K(vexp_sum)(z, n, (real)*m);
}

// Logits block z (nt, nv) = hb (nt, C) . w[v0 : v0 + nv] (nv, C)^T, plus
// h2b (nt, R) . w2[v0 : v0 + nv] (nv, R)^T when d has the low-rank term.
static void logits_block(real *z, const real *hb, const real *w, const real *h2b,
                         const ce_dims *d, int64_t nt, int64_t v0, int64_t nv) {
    int C = (int)d->C;
    R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nt, (int)nv, C, 1, hb, C,
           w + v0 * d->C, C, 0, z, (int)nv);
    if (!d->lr)
        return;
    const real *w2 = d->lr->w2;
    int R = (int)d->lr->R;
    R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nt, (int)nv, R, 1, h2b, R,
           w2 + v0 * R, R, 1, z, (int)nv);
}

// Rows of h2 for the tile (NULL without the low-rank term).
static const real *gather_h2(const ce_work *k, const ce_dims *d, const int64_t *rows,
                             int64_t nt) {
    return d->lr ? gather_rows(k->h2buf, d->lr->h2, rows, nt, d->lr->R) : NULL;
}

void K(ce_fwd)(double *lse, double *zt, void *work, const real *h, const real *w,
               const int32_t *targets, const ce_dims *d) {
    ce_work k = work_split(work, d);
    for (int64_t i0 = 0; i0 < d->n_rows; i0 += d->tile) {
        int64_t nt = min64(d->tile, d->n_rows - i0);
        const int64_t *rows = d->rows + i0;
        const real *hb = gather_rows(k.hbuf, h, rows, nt, d->C);
        const real *h2b = gather_h2(&k, d, rows, nt);
        for (int64_t i = 0; i < nt; i++) {
            k.m[i] = -INFINITY;
            k.s[i] = 0;
        }
        for (int64_t v0 = 0; v0 < d->V; v0 += d->chunk) {
            if (ag_interrupt_pending()) // a stop request: the caller discards the results
                return;
            int64_t nv = min64(d->chunk, d->V - v0);
            logits_block(k.zbuf, hb, w, h2b, d, nt, v0, nv);
#pragma omp parallel for schedule(static) if (nt * nv >= CE_PAR_MIN)
            for (int64_t i = 0; i < nt; i++) {
                real *z = k.zbuf + i * nv;
                int64_t tg = targets[rows[i]] - v0;
                if (tg >= 0 && tg < nv)
                    zt[rows[i]] = z[tg];
                fold_chunk(&k.m[i], &k.s[i], z, nv);
            }
        }
        for (int64_t i = 0; i < nt; i++)
            lse[rows[i]] = k.m[i] + log(k.s[i]);
    }
}

// z (nt, nv) becomes coef_t * (softmax - onehot) for the chunk starting at v0.
static void dlogits_block(real *z, const int64_t *rows, int64_t nt, int64_t v0, int64_t nv,
                          const int32_t *targets, const real *mask, double scale,
                          const double *lse) {
#pragma omp parallel for schedule(static) if (nt * nv >= CE_PAR_MIN)
    for (int64_t i = 0; i < nt; i++) {
        int64_t t = rows[i];
        real coef = (real)(scale * (mask ? (double)mask[t] : 1.0));
        real *zr = z + i * nv;
        for (int64_t j = 0; j < nv; j++)
            zr[j] = coef * R_EXP((real)((double)zr[j] - lse[t]));
        int64_t tg = targets[t] - v0;
        if (tg >= 0 && tg < nv)
            zr[tg] -= coef;
    }
}

// Where a tile's gradient rows (n, width) accumulate: in place in g when the tile's tokens
// are consecutive, else in the zeroed buffer buf (scattered back by scatter_rows).
static real *grad_tile(real *g, real *buf, const int64_t *rows, int64_t n, int64_t width) {
    if (rows_consecutive(rows, n))
        return g + rows[0] * width;
    memset(buf, 0, (size_t)(n * width) * sizeof(real));
    return buf;
}

static void scatter_rows(real *g, const real *buf, const int64_t *rows, int64_t n,
                         int64_t width) {
    if (rows_consecutive(rows, n))
        return; // accumulated in place
    for (int64_t i = 0; i < n; i++)
        for (int64_t c = 0; c < width; c++)
            g[rows[i] * width + c] += buf[i * width + c];
}

// dz (nt, nv) into the tile's dh (nt, C) and the chunk's dw (nv, C) (either may be NULL).
static void grad_gemms(real *dhb, real *dw_chunk, const real *dz, const real *hb,
                       const real *w_chunk, int64_t nt, int64_t nv, int64_t width) {
    int C = (int)width;
    if (dhb) // dhb (nt, C) += dz (nt, nv) . w_chunk (nv, C)
        R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nt, C, (int)nv, 1, dz, (int)nv,
               w_chunk, C, 1, dhb, C);
    if (dw_chunk) // dw_chunk (nv, C) += dz^T (nv, nt) . hb (nt, C)
        R_GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (int)nv, C, (int)nt, 1, dz, (int)nv,
               hb, C, 1, dw_chunk, C);
}

void K(ce_bwd)(real *dh, real *dw, void *work, const real *h, const real *w,
               const int32_t *targets, const real *mask, double scale, const double *lse,
               const ce_dims *d) {
    ce_work k = work_split(work, d);
    int64_t C = d->C, R = rank_of(d);
    real *dh2 = d->lr ? d->lr->dh2 : NULL, *dw2 = d->lr ? d->lr->dw2 : NULL;
    const real *w2 = d->lr ? d->lr->w2 : NULL;
    for (int64_t i0 = 0; i0 < d->n_rows; i0 += d->tile) {
        int64_t nt = min64(d->tile, d->n_rows - i0);
        const int64_t *rows = d->rows + i0;
        const real *hb = gather_rows(k.hbuf, h, rows, nt, C);
        const real *h2b = gather_h2(&k, d, rows, nt);
        real *dhb = dh ? grad_tile(dh, k.dhbuf, rows, nt, C) : NULL;
        real *dh2b = dh2 ? grad_tile(dh2, k.dh2buf, rows, nt, R) : NULL;
        for (int64_t v0 = 0; v0 < d->V; v0 += d->chunk) {
            if (ag_interrupt_pending()) // a stop request: the caller discards the results
                return;
            int64_t nv = min64(d->chunk, d->V - v0);
            logits_block(k.zbuf, hb, w, h2b, d, nt, v0, nv);
            dlogits_block(k.zbuf, rows, nt, v0, nv, targets, mask, scale, lse);
            grad_gemms(dhb, dw ? dw + v0 * C : NULL, k.zbuf, hb, w + v0 * C, nt, nv, C);
            if (d->lr)
                grad_gemms(dh2b, dw2 ? dw2 + v0 * R : NULL, k.zbuf, h2b, w2 + v0 * R, nt, nv,
                           R);
        }
        if (dh)
            scatter_rows(dh, dhb, rows, nt, C);
        if (dh2)
            scatter_rows(dh2, dh2b, rows, nt, R);
    }
}

// ---- forward with the gradient to h -------------------------------------------------------
// When w takes no gradient and there is no low-rank term, the gradient to h needs only the
// softmax weights the forward already computes: dh_t = coef_t (sum_v p_tv w_v - w_target).
// As in flash-style attention, each chunk's exp(z - m) (m the running max) multiplies the
// chunk of w into an unnormalized accumulator whose rows are rescaled when their max moves;
// the final division by the sum normalizes. Two GEMMs per chunk and one exp per logit,
// against three GEMMs and two exps for forward plus backward.

// Row i of a chunk: its max joins m, the accumulator row is rescaled when m moves, z
// becomes exp(z - m) in place and its sum joins s. zt gets the target logit (raw).
static void fold_exp_row(double *m, double *s, real *acc, int64_t C, real *z, int64_t n,
                         int64_t tg, double *zt) {
    if (tg >= 0 && tg < n)
        *zt = z[tg];
    real mx = z[0];
    for (int64_t j = 1; j < n; j++)
        if (z[j] > mx)
            mx = z[j];
    if (mx > *m) {
        double alpha = exp(*m - mx); // 0 on the first chunk (m = -inf, acc = 0)
        *s *= alpha;
        for (int64_t c = 0; c < C; c++)
            acc[c] = (real)(acc[c] * alpha);
        *m = mx;
    }
    *s += K(vexp_sum)(z, n, (real)*m);
}

void K(ce_fwd_grad)(double *lse, double *zt, real *dh, void *work, const real *h,
                    const real *w, const int32_t *targets, const real *mask, double scale,
                    const ce_dims *d) {
    ce_work k = work_split(work, d);
    int64_t C = d->C;
    for (int64_t i0 = 0; i0 < d->n_rows; i0 += d->tile) {
        int64_t nt = min64(d->tile, d->n_rows - i0);
        const int64_t *rows = d->rows + i0;
        const real *hb = gather_rows(k.hbuf, h, rows, nt, C);
        real *acc = k.dhbuf;
        memset(acc, 0, (size_t)(nt * C) * sizeof(real));
        for (int64_t i = 0; i < nt; i++) {
            k.m[i] = -INFINITY;
            k.s[i] = 0;
        }
        for (int64_t v0 = 0; v0 < d->V; v0 += d->chunk) {
            if (ag_interrupt_pending()) // a stop request: the caller discards the results
                return;
            int64_t nv = min64(d->chunk, d->V - v0);
            logits_block(k.zbuf, hb, w, NULL, d, nt, v0, nv);
#pragma omp parallel for schedule(static) if (nt * nv >= CE_PAR_MIN)
            for (int64_t i = 0; i < nt; i++)
                fold_exp_row(&k.m[i], &k.s[i], acc + i * C, C, k.zbuf + i * nv, nv,
                             targets[rows[i]] - v0, &zt[rows[i]]);
            // acc (nt, C) += exp block (nt, nv) . w chunk (nv, C)
            R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nt, (int)C, (int)nv, 1,
                   k.zbuf, (int)nv, w + v0 * C, (int)C, 1, acc, (int)C);
        }
        for (int64_t i = 0; i < nt; i++) {
            int64_t t = rows[i];
            lse[t] = k.m[i] + log(k.s[i]);
            double coef = scale * (mask ? (double)mask[t] : 1.0);
            double a = coef / k.s[i];
            const real *wt = w + (int64_t)targets[t] * C;
            for (int64_t c = 0; c < C; c++)
                dh[t * C + c] = (real)(a * acc[i * C + c] - coef * wt[c]);
        }
    }
}
