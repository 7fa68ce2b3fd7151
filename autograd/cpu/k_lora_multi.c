// autograd/cpu/k_lora_multi.c: several LoRA adapters over one batch, each row with its own
// (contracts in k_lora_multi.h). The optimized kernels group the rows by adapter: one
// gather, two low-rank products and one scatter per adapter present, whatever the ranks;
// in the forward the adapters present are shared out over the threads.
#include "real.h"
#include "k_quant.h"
#include "k_bi.h"
#include "k_lora_multi.h"
#if MOLT_REAL == 32
#include "k_bx.h"
#endif

#include "k_blas.h"
#include <stdbool.h>
#include <omp.h>
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
    // row order, group starts, the groups present and where each group's marked rows start
    // (group_rows), then the forward's gathered x, h, d or the backward's gathered x and dy,
    // g, h and dx rows
    return (size_t)(T + 3 * n + 2) * sizeof(int64_t) +
           (size_t)T * (size_t)(2 * in + 2 * out + 2 * r) * sizeof(real) + 64;
}

// bxq_linear's scratch per thread for the marked rows of one group (B's product: r columns).
static size_t bx_thread_bytes(int64_t r, int64_t T) {
#if MOLT_REAL == 32
    kq_weight v = {.format = KQ_F32, .n_mat = 1, .rows = 1, .cols = r};
    return (bxq_ws_bytes(&v, T, 1) + 63) / 64 * 64;
#else
    (void)r, (void)T;
    return 0;
#endif
}

size_t K(lora_multi_bx_ws_bytes)(const K(lora_ab) *set, int n, int64_t T, int nthreads) {
    return (size_t)(nthreads > 0 ? nthreads : 1) * bx_thread_bytes(max_rank(set, n), T) +
           64;
}

// Groups the rows by adapter in one pass whatever n is (a counting sort by slot): group s is
// rows[start[s] .. start[s + 1]), in increasing order; rows of no adapter (slot -1, or one
// without matrices) are in none. present[0 .. the count returned): the slots with rows.
// With bx (T, or NULL: none marked), a group's unmarked rows come first and its marked ones
// from mark[s] on (mark may be NULL then).
static int group_rows(int64_t *rows, int64_t *start, int64_t *present, int64_t *mark,
                      const int32_t *slot, const uint8_t *bx, const K(lora_ab) *set, int n,
                      int64_t T) {
    memset(start, 0, (size_t)(n + 1) * sizeof *start);
    for (int64_t t = 0; t < T; t++)
        if (has(set, n, slot[t]))
            start[slot[t] + 1]++;
    for (int s = 0; s < n; s++)
        start[s + 1] += start[s];
    for (int pass = 0; pass < (bx ? 2 : 1); pass++) { // start[s] moves on through group s
        for (int64_t t = 0; t < T; t++)
            if (has(set, n, slot[t]) && (!bx || (bx[t] != 0) == (pass == 1)))
                rows[start[slot[t]]++] = t;
        if (pass == 0 && mark)
            memcpy(mark, start, (size_t)n * sizeof *mark);
    }
    for (int s = n; s > 0; s--) // ... and back
        start[s] = start[s - 1];
    start[0] = 0;
    if (mark && !bx)
        memcpy(mark, start + 1, (size_t)n * sizeof *mark);
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

// One row of terms d * s into yt: added to it with acc (as an add after the op would give),
// else written.
static void put_row(real *yt, const real *dt, real s, int64_t out, bool acc) {
    if (acc)
        for (int64_t o = 0; o < out; o++) {
            real v = dt[o] * s;
            yt[o] = yt[o] + v;
        }
    else
        for (int64_t o = 0; o < out; o++)
            yt[o] = dt[o] * s;
}

// Group s's rows (rows[start[s] .. start[s + 1])) of y: gathered (unless consecutive),
// through A and B on `threads` threads, scaled and put back (put_row). The marked rows
// [k, m) take h B^T through bxq_linear_any (f32; bws its scratch).
static void group_fwd(real *y, const real *x, const int64_t *rows, const int64_t *start,
                      const int64_t *mark, const K(lora_ab) *set, int s, int64_t r, int64_t in,
                      int64_t out, real *xg, real *h, real *d, int threads, void *bws, bool acc) {
    int64_t g0 = start[s], m = start[s + 1] - g0, k = mark[s] - g0;
    if (m == 0)
        return;
    const K(lora_ab) *l = &set[s];
    const int64_t *gr = rows + g0;
    real *xs = xg + g0 * in, *hs = h + g0 * r, *ds = d + g0 * out;
    int64_t run = 1; // consecutive rows in order (one adapter's prompt, or one row): in place
    while (run < m && gr[run] == gr[0] + run)
        run++;
    if (run == m)
        xs = (real *)(uintptr_t)(x + gr[0] * in);
    else
        gather(xs, x, gr, m, in);
    // x A^T in F32 for every row (at a prompt's row counts the F32 kernel is as fast as
    // splitting x would be); h B^T of the marked rows as bf16 pairs
    K(bi_linear)(hs, xs, l->a, m, l->r, in, threads);
    if (k > 0)
        K(bi_linear)(ds, hs, l->b, k, out, l->r, threads);
#if MOLT_REAL == 32
    if (k < m) {
        kq_weight vb = {.format = KQ_F32, .n_mat = 1, .rows = out, .cols = l->r, .data = l->b};
        bxq_linear_any(ds + k * out, hs + k * l->r, &vb, 0, m - k, 1, bws);
    }
#else
    (void)bws;
#endif
    // the rows back, on the threads when this group has them (a lone group; a group on one
    // thread of the groups' region opens no region of its own)
    if (threads > 1 && m * out >= 65536) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < m; i++)
            put_row(y + gr[i] * out, ds + i * out, l->s, out, acc);
    } else {
        for (int64_t i = 0; i < m; i++)
            put_row(y + gr[i] * out, ds + i * out, l->s, out, acc);
    }
}

void K(lora_multi_fwd)(real *y, const real *x, const int32_t *slot, const uint8_t *bx,
                       const K(lora_ab) *set, int n, int64_t T, int64_t in, int64_t out,
                       int nthreads, void *ws, void *bx_ws, bool acc) {
    int64_t r = max_rank(set, n);
    int64_t *rows = ws, *start = rows + T, *present = start + n + 1; // see group_rows
    int64_t *mark = present + n;
    real *xg = (real *)(mark + n + 1), *h = xg + T * in, *d = h + T * r;
    if (!acc)
        memset(y, 0, (size_t)(T * out) * sizeof(real));
#if MOLT_REAL != 32
    bx = NULL; // the bf16 pairs are f32 only
#endif
    int groups = group_rows(rows, start, present, mark, slot, bx, set, n, T);
    size_t per = bx ? bx_thread_bytes(r, T) : 0;
    char *bws = bx_ws ? (char *)(((uintptr_t)bx_ws + 63) & ~(uintptr_t)63) : NULL;
    // Several groups go to the threads whole, each product on one thread; a lone group's
    // products use the threads. Either way a row's bits are the same (k_bi.h). The lone
    // group's products are not called from inside a parallel region, even an inactive one:
    // their own regions would then be nested ones, which OpenMP runs on threads it starts
    // for each region instead of its pool's.
    if (groups > 1 && nthreads > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (int g = 0; g < groups; g++)
            group_fwd(y, x, rows, start, mark, set, (int)present[g], r, in, out, xg, h, d, 1,
                      bws ? bws + (size_t)omp_get_thread_num() * per : NULL, acc);
    } else {
        for (int g = 0; g < groups; g++)
            group_fwd(y, x, rows, start, mark, set, (int)present[g], r, in, out, xg, h, d,
                      nthreads, bws, acc);
    }
}

void K(lora_multi_bwd)(real *dx, real *const *da, real *const *db, const real *dy,
                       const real *x, const int32_t *slot, const K(lora_ab) *set, int n,
                       int64_t T, int64_t in, int64_t out, void *ws) {
    int64_t r = max_rank(set, n);
    int64_t *all = ws, *start = all + T, *present = start + n + 1; // see group_rows
    real *xg = (real *)(present + n), *dyg = xg + T * in, *g = dyg + T * out, *h = g + T * r,
         *dxg = h + T * r;
    int groups = group_rows(all, start, present, NULL, slot, NULL, set, n, T);
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
