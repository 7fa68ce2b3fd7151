// autograd/cpu/k_nn.c: kernels of the shape and neural-network ops: the strided accumulate
// behind every shape op's backward, softmax, swiglu, embedding and dropout. Each has a plain
// reference loop (the ground truth); softmax, swiglu and embedding also have an OpenMP
// variant that splits the same arithmetic over rows (or columns), so both give identical
// results. Not here: element moves without arithmetic and dtype conversion (ops_shape.c).
#include "real.h"
#include "k_nn.h"

#include <string.h>

// A parallel region costs a few microseconds: below this many elements one thread wins.
#define PAR_MIN 32768

void K(strided_acc)(real *g, const int64_t *gs, const real *dy, const int64_t *ds,
                    const int64_t *shape) {
    for (int64_t i0 = 0; i0 < shape[0]; i0++)
        for (int64_t i1 = 0; i1 < shape[1]; i1++)
            for (int64_t i2 = 0; i2 < shape[2]; i2++) {
                real *gp = g + i0 * gs[0] + i1 * gs[1] + i2 * gs[2];
                const real *dp = dy + i0 * ds[0] + i1 * ds[1] + i2 * ds[2];
                if (gs[3] == 1 && ds[3] == 1) // the common contiguous case vectorizes
                    for (int64_t j = 0; j < shape[3]; j++)
                        gp[j] += dp[j];
                else
                    for (int64_t j = 0; j < shape[3]; j++)
                        gp[j * gs[3]] += dp[j * ds[3]];
            }
}

// ---- softmax ---------------------------------------------------------------------------

// The sums run in double for both element types: a row may be a whole vocabulary.
void K(softmax_row)(real *y, const real *x, int64_t n) {
    real m = x[0];
    for (int64_t j = 1; j < n; j++)
        if (x[j] > m)
            m = x[j];
    double s = 0;
    for (int64_t j = 0; j < n; j++) {
        y[j] = R_EXP(x[j] - m);
        s += y[j];
    }
    real inv = (real)(1.0 / s);
    for (int64_t j = 0; j < n; j++)
        y[j] *= inv;
}

static void softmax_bwd_row(real *dx, const real *y, const real *dy, int64_t n) {
    double dot = 0;
    for (int64_t j = 0; j < n; j++)
        dot += (double)dy[j] * y[j];
    real d = (real)dot;
    for (int64_t j = 0; j < n; j++)
        dx[j] += y[j] * (dy[j] - d);
}

void K(softmax_fwd_ref)(real *y, const real *x, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; r++)
        K(softmax_row)(y + r * cols, x + r * cols, cols);
}

void K(softmax_fwd)(real *y, const real *x, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * cols >= PAR_MIN)
    for (int64_t r = 0; r < rows; r++)
        K(softmax_row)(y + r * cols, x + r * cols, cols);
}

void K(softmax_bwd_ref)(real *dx, const real *y, const real *dy, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; r++)
        softmax_bwd_row(dx + r * cols, y + r * cols, dy + r * cols, cols);
}

void K(softmax_bwd)(real *dx, const real *y, const real *dy, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows > 1 && rows * cols >= PAR_MIN)
    for (int64_t r = 0; r < rows; r++)
        softmax_bwd_row(dx + r * cols, y + r * cols, dy + r * cols, cols);
}

// ---- swiglu ----------------------------------------------------------------------------

static inline real sigmoid(real g) { return 1 / (1 + R_EXP(-g)); }

// Block size of the parallel elementwise loops (whole cache lines per thread).
#define EW_BLOCK 4096

static inline int64_t block_end(int64_t b, int64_t n) {
    return (b + 1) * EW_BLOCK < n ? (b + 1) * EW_BLOCK : n;
}

static void swiglu_fwd_span(real *y, const real *g, const real *u, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++)
        y[i] = g[i] * sigmoid(g[i]) * u[i];
}

// silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
static void swiglu_bwd_span(real *dg, real *du, const real *g, const real *u, const real *dy,
                            int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++) {
        real s = sigmoid(g[i]);
        if (dg)
            dg[i] += dy[i] * u[i] * s * (1 + g[i] * (1 - s));
        if (du)
            du[i] += dy[i] * g[i] * s;
    }
}

void K(swiglu_fwd_ref)(real *y, const real *g, const real *u, int64_t n) {
    swiglu_fwd_span(y, g, u, 0, n);
}

void K(swiglu_fwd)(real *y, const real *g, const real *u, int64_t n) {
    int64_t nb = (n + EW_BLOCK - 1) / EW_BLOCK;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (int64_t b = 0; b < nb; b++)
        swiglu_fwd_span(y, g, u, b * EW_BLOCK, block_end(b, n));
}

void K(swiglu_bwd_ref)(real *dg, real *du, const real *g, const real *u, const real *dy,
                       int64_t n) {
    swiglu_bwd_span(dg, du, g, u, dy, 0, n);
}

void K(swiglu_bwd)(real *dg, real *du, const real *g, const real *u, const real *dy,
                   int64_t n) {
    int64_t nb = (n + EW_BLOCK - 1) / EW_BLOCK;
#pragma omp parallel for schedule(static) if (n >= PAR_MIN)
    for (int64_t b = 0; b < nb; b++)
        swiglu_bwd_span(dg, du, g, u, dy, b * EW_BLOCK, block_end(b, n));
}

// ---- embedding -------------------------------------------------------------------------

void K(embedding_fwd_ref)(real *y, const real *table, const int32_t *ids, int64_t n,
                          int64_t c) {
    for (int64_t t = 0; t < n; t++)
        for (int64_t j = 0; j < c; j++)
            y[t * c + j] = table[(int64_t)ids[t] * c + j];
}

void K(embedding_fwd)(real *y, const real *table, const int32_t *ids, int64_t n, int64_t c) {
#pragma omp parallel for schedule(static) if (n > 1 && n * c >= PAR_MIN)
    for (int64_t t = 0; t < n; t++)
        memcpy(y + t * c, table + (int64_t)ids[t] * c, (size_t)c * sizeof(real));
}

void K(embedding_bwd_ref)(real *dtable, const real *dy, const int32_t *ids, int64_t n,
                          int64_t c) {
    for (int64_t t = 0; t < n; t++)
        for (int64_t j = 0; j < c; j++)
            dtable[(int64_t)ids[t] * c + j] += dy[t * c + j];
}

// Threads own column blocks and walk all tokens in order: repeated ids never race and every
// element sums in the same order as the reference.
#define EMB_COLS 256

void K(embedding_bwd)(real *dtable, const real *dy, const int32_t *ids, int64_t n, int64_t c) {
    int64_t nb = (c + EMB_COLS - 1) / EMB_COLS;
#pragma omp parallel for schedule(static) if (nb > 1 && n * c >= PAR_MIN)
    for (int64_t b = 0; b < nb; b++) {
        int64_t lo = b * EMB_COLS, hi = lo + EMB_COLS < c ? lo + EMB_COLS : c;
        for (int64_t t = 0; t < n; t++) {
            real *g = dtable + (int64_t)ids[t] * c;
            const real *d = dy + t * c;
            for (int64_t j = lo; j < hi; j++)
                g[j] += d[j];
        }
    }
}

// ---- dropout ---------------------------------------------------------------------------

// splitmix64's finalizer over (seed, index): a counter-based draw, so any element's keep
// decision can be recomputed on its own, in any order.
static inline int dropout_keep(uint64_t seed, int64_t i, double p) {
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53 >= p;
}

void K(dropout_fwd)(real *y, const real *x, uint64_t seed, double p, int64_t first, int64_t n) {
    real s = (real)(1.0 / (1.0 - p));
    for (int64_t i = 0; i < n; i++)
        y[i] = dropout_keep(seed, first + i, p) ? x[i] * s : 0;
}

void K(dropout_bwd)(real *dx, const real *dy, uint64_t seed, double p, int64_t first,
                    int64_t n) {
    real s = (real)(1.0 / (1.0 - p));
    for (int64_t i = 0; i < n; i++)
        if (dropout_keep(seed, first + i, p))
            dx[i] += dy[i] * s;
}
