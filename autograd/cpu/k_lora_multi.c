// autograd/cpu/k_lora_multi.c: several LoRA adapters over one batch, each row with its own
// (contracts in k_lora_multi.h). The optimized kernels group the rows by adapter: one
// gather, two low-rank products and one scatter per adapter present, whatever the ranks;
// in the forward the adapters present are shared out over the threads.
#include "real.h"
#include "k_quant.h"
#include "k_bi.h"
#include "k_lora_multi.h"

#include "k_blas.h"
#include <stdbool.h>
#include <string.h>

static bool has(const K(lora_ab) *set, int n, int32_t s) {
    return s >= 0 && s < n && set[s].a;
}

// ---- reference ------------------------------------------------------------------------------

void K(lora_multi_fwd_ref)(real *y, const real *x, const int32_t *slot, const K(lora_ab) *set,
                           int n, int64_t T, int64_t in, int64_t out) {
    for (int64_t t = 0; t < T; t++) {
        real *yt = y + t * out;
        const real *xt = x + t * in;
        if (!has(set, n, slot[t])) {
            for (int64_t o = 0; o < out; o++)
                yt[o] = 0;
            continue;
        }
        const K(lora_ab) *l = &set[slot[t]];
        for (int64_t o = 0; o < out; o++) {
            double acc = 0;
            for (int64_t k = 0; k < l->r; k++) {
                double h = 0;
                for (int64_t i = 0; i < in; i++)
                    h += (double)xt[i] * l->a[k * in + i];
                acc += h * l->b[o * l->r + k];
            }
            yt[o] = (real)(acc * l->s);
        }
    }
}

void K(lora_multi_bwd_ref)(real *dx, real *const *da, real *const *db, const real *dy,
                           const real *x, const int32_t *slot, const K(lora_ab) *set, int n,
                           int64_t T, int64_t in, int64_t out) {
    for (int64_t t = 0; t < T; t++) {
        if (!has(set, n, slot[t]))
            continue;
        int32_t s = slot[t];
        const K(lora_ab) *l = &set[s];
        const real *xt = x + t * in, *dyt = dy + t * out;
        for (int64_t k = 0; k < l->r; k++) {
            double g = 0, h = 0; // g = s (dy B)_k, h = (x A^T)_k
            for (int64_t o = 0; o < out; o++)
                g += (double)dyt[o] * l->b[o * l->r + k];
            g *= l->s;
            for (int64_t i = 0; i < in; i++)
                h += (double)xt[i] * l->a[k * in + i];
            for (int64_t i = 0; i < in; i++) {
                if (dx)
                    dx[t * in + i] += (real)(g * l->a[k * in + i]);
                if (da && da[s])
                    da[s][k * in + i] += (real)(g * xt[i]);
            }
            if (db && db[s])
                for (int64_t o = 0; o < out; o++)
                    db[s][o * l->r + k] += (real)(l->s * dyt[o] * h);
        }
    }
}

// ---- optimized ------------------------------------------------------------------------------

static int64_t max_rank(const K(lora_ab) *set, int n) {
    int64_t r = 1;
    for (int s = 0; s < n; s++)
        if (set[s].a && set[s].r > r)
            r = set[s].r;
    return r;
}

size_t K(lora_multi_ws_bytes)(const K(lora_ab) *set, int n, int64_t T, int64_t in,
                              int64_t out) {
    int64_t r = max_rank(set, n);
    // row order, group starts and the groups present (group_rows), then the forward's
    // gathered x, h, d or the backward's gathered x and dy, g, h and dx rows
    return (size_t)(T + 2 * n + 1) * sizeof(int64_t) +
           (size_t)T * (size_t)(2 * in + 2 * out + 2 * r) * sizeof(real) + 64;
}

// Groups the rows by adapter in one pass whatever n is (a counting sort by slot): group s is
// rows[start[s] .. start[s + 1]), in increasing order; rows of no adapter (slot -1, or one
// without matrices) are in none. present[0 .. the count returned): the slots with rows.
static int group_rows(int64_t *rows, int64_t *start, int64_t *present, const int32_t *slot,
                      const K(lora_ab) *set, int n, int64_t T) {
    memset(start, 0, (size_t)(n + 1) * sizeof *start);
    for (int64_t t = 0; t < T; t++)
        if (has(set, n, slot[t]))
            start[slot[t] + 1]++;
    for (int s = 0; s < n; s++)
        start[s + 1] += start[s];
    for (int64_t t = 0; t < T; t++) // start[s] moves to the end of group s ...
        if (has(set, n, slot[t]))
            rows[start[slot[t]]++] = t;
    for (int s = n; s > 0; s--) // ... and back
        start[s] = start[s - 1];
    start[0] = 0;
    int groups = 0;
    for (int s = 0; s < n; s++)
        if (start[s + 1] > start[s])
            present[groups++] = s;
    return groups;
}

static void gather(real *dst, const real *src, const int64_t *rows, int64_t m, int64_t w) {
    for (int64_t i = 0; i < m; i++)
        memcpy(dst + i * w, src + rows[i] * w, (size_t)w * sizeof(real));
}

// Group s's rows (rows[start[s] .. start[s + 1])) of y: gathered, through A and B on
// `threads` threads, scaled and put back.
static void group_fwd(real *y, const real *x, const int64_t *rows, const int64_t *start,
                      const K(lora_ab) *set, int s, int64_t r, int64_t in, int64_t out,
                      real *xg, real *h, real *d, int threads) {
    int64_t g0 = start[s], m = start[s + 1] - g0;
    if (m == 0)
        return;
    const K(lora_ab) *l = &set[s];
    const int64_t *gr = rows + g0;
    real *xs = xg + g0 * in, *hs = h + g0 * r, *ds = d + g0 * out;
    gather(xs, x, gr, m, in);
    K(bi_linear)(hs, xs, l->a, m, l->r, in, threads);
    K(bi_linear)(ds, hs, l->b, m, out, l->r, threads);
    for (int64_t i = 0; i < m; i++) {
        real *yt = y + gr[i] * out;
        const real *dt = ds + i * out;
        for (int64_t o = 0; o < out; o++)
            yt[o] = dt[o] * l->s;
    }
}

void K(lora_multi_fwd)(real *y, const real *x, const int32_t *slot, const K(lora_ab) *set,
                       int n, int64_t T, int64_t in, int64_t out, int nthreads, void *ws) {
    int64_t r = max_rank(set, n);
    int64_t *rows = ws, *start = rows + T, *present = start + n + 1; // see group_rows
    real *xg = (real *)(present + n), *h = xg + T * in, *d = h + T * r;
    memset(y, 0, (size_t)(T * out) * sizeof(real));
    int groups = group_rows(rows, start, present, slot, set, n, T);
    // Several groups go to the threads whole, each product on one thread; a lone group's
    // products use the threads. Either way a row's bits are the same (k_bi.h). The lone
    // group's products are not called from inside a parallel region, even an inactive one:
    // their own regions would then be nested ones, which OpenMP runs on threads it starts
    // for each region instead of its pool's.
    if (groups > 1 && nthreads > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (int g = 0; g < groups; g++)
            group_fwd(y, x, rows, start, set, (int)present[g], r, in, out, xg, h, d, 1);
    } else {
        for (int g = 0; g < groups; g++)
            group_fwd(y, x, rows, start, set, (int)present[g], r, in, out, xg, h, d, nthreads);
    }
}

void K(lora_multi_bwd)(real *dx, real *const *da, real *const *db, const real *dy,
                       const real *x, const int32_t *slot, const K(lora_ab) *set, int n,
                       int64_t T, int64_t in, int64_t out, void *ws) {
    int64_t r = max_rank(set, n);
    int64_t *all = ws, *start = all + T, *present = start + n + 1; // see group_rows
    real *xg = (real *)(present + n), *dyg = xg + T * in, *g = dyg + T * out, *h = g + T * r,
         *dxg = h + T * r;
    int groups = group_rows(all, start, present, slot, set, n, T);
    for (int gi = 0; gi < groups; gi++) {
        int s = (int)present[gi];
        const int64_t *rows = all + start[s];
        int64_t m = start[s + 1] - start[s];
        const K(lora_ab) *l = &set[s];
        int M = (int)m, R = (int)l->r, IN = (int)in, OUT = (int)out;
        gather(xg, x, rows, m, in);
        gather(dyg, dy, rows, m, out);
        // g (m, r) = s * dy B
        R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, R, OUT, l->s, dyg, OUT, l->b, R, 0,
               g, R);
        if (dx) { // dx rows += g A
            R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, IN, R, 1, g, R, l->a, IN, 0,
                   dxg, IN);
            for (int64_t i = 0; i < m; i++) {
                real *d = dx + rows[i] * in;
                const real *src = dxg + i * in;
                for (int64_t j = 0; j < in; j++)
                    d[j] += src[j];
            }
        }
        if (da && da[s]) // da += g^T x
            R_GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, R, IN, M, 1, g, R, xg, IN, 1, da[s],
                   IN);
        if (db && db[s]) { // db += s * dy^T (x A^T)
            R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, M, R, IN, 1, xg, IN, l->a, IN, 0, h,
                   R);
            R_GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, OUT, R, M, l->s, dyg, OUT, h, R, 1,
                   db[s], R);
        }
    }
}
