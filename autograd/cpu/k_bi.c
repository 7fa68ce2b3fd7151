// autograd/cpu/k_bi.c: batch-invariant matrix products for inference (contracts in k_bi.h).
// Each dot product runs over `cols` in a fixed order: BI_LANES interleaved partial sums
// (element k goes to lane k % BI_LANES), then the lanes are added pairwise in a fixed tree.
// Threads split the output columns (weight rows), never a dot product, so neither the thread
// count nor the row count changes any element's arithmetic. Quantized rows are decoded into a
// per-thread buffer (the same values as kq_dequant_range) and then go through the same dot.
#include "real.h"
#include "k_quant.h"
#include "k_bi.h"

#include <omp.h>

#define BI_LANES 8
// Weight rows decoded per tile of the quantized kernel (per thread).
#define BI_TILE_ROWS 16

static inline real dot_fixed(const real *a, const real *b, int64_t n) {
    real acc[BI_LANES] = {0};
    int64_t k = 0;
    for (; k + BI_LANES <= n; k += BI_LANES)
        for (int j = 0; j < BI_LANES; j++)
            acc[j] += a[k + j] * b[k + j];
    for (int j = 0; k < n; k++, j++)
        acc[j] += a[k] * b[k];
    for (int w = BI_LANES / 2; w > 0; w /= 2)
        for (int j = 0; j < w; j++)
            acc[j] += acc[j + w];
    return acc[0];
}

// Work below this many multiply-adds runs on one thread.
#define BI_PAR_MIN 65536

void K(bi_linear)(real *y, const real *x, const real *w, int64_t T, int64_t rows, int64_t cols,
                  int nthreads) {
    int nt = (T * rows * cols < BI_PAR_MIN || nthreads < 1) ? 1 : nthreads;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t o = 0; o < rows; o++)
        for (int64_t t = 0; t < T; t++)
            y[t * rows + o] = dot_fixed(x + t * cols, w + o * cols, cols);
}

size_t K(bi_linear_q_ws_bytes)(const kq_weight *w, int64_t T, int nthreads) {
    (void)T;
    int nt = nthreads < 1 ? 1 : nthreads;
    return (size_t)nt * BI_TILE_ROWS * (size_t)w->cols * sizeof(real);
}

void K(bi_linear_q)(real *y, const real *x, const kq_weight *w, int64_t e, int64_t T,
                    int nthreads, void *ws) {
    int64_t rows = w->rows, cols = w->cols;
    int64_t n_tiles = (rows + BI_TILE_ROWS - 1) / BI_TILE_ROWS;
    int nt = (T * rows * cols < BI_PAR_MIN || nthreads < 1) ? 1 : nthreads;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t tile = 0; tile < n_tiles; tile++) {
        real *buf = (real *)ws + (size_t)omp_get_thread_num() * BI_TILE_ROWS * cols;
        int64_t r0 = tile * BI_TILE_ROWS;
        int64_t nr = rows - r0 < BI_TILE_ROWS ? rows - r0 : BI_TILE_ROWS;
        K(kq_dequant_range)(buf, w, (e * rows + r0) * cols, nr * cols);
        for (int64_t r = 0; r < nr; r++)
            for (int64_t t = 0; t < T; t++)
                y[t * rows + r0 + r] = dot_fixed(x + t * cols, buf + r * cols, cols);
    }
}
