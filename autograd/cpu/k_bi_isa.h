// autograd/cpu/k_bi_isa.h: what each instruction-set copy of the f32 batch-invariant kernels
// (k_bi_avx512vbmi.c, k_bi_avx512.c, k_bi_avx2.c, k_bi_base.c, all built from k_bi_tmpl.h)
// gives the driver in
// k_bi.c: tile sizes and three tile kernels. Internal to autograd/cpu; the contracts of the
// public kernels are in k_bi.h, the summation order in k_bi.c.
#ifndef MOLT_CPU_K_BI_ISA_H
#define MOLT_CPU_K_BI_ISA_H

#include <stdint.h>

#include "k_quant.h"

// Largest tile any copy uses (rows of x, weight rows).
#define BI_MR_CAP 8
#define BI_NR_CAP 8

typedef struct {
    int mr, nr; // dense tile: up to mr rows of x against exactly nr weight rows
    int qmr;    // quantized tile (weights decoded in registers): up to qmr rows of x against
    int qnr[BI_MR_CAP + 1]; // exactly qnr[m] weight rows for m rows of x (1 <= m <= qmr)
    // y[i * ldy + j] = dot(x[i], w[j]) over k < K for i < mr, j < n_out (n_out <= nr); all
    // nr pointers of w are read (the driver repeats a row to pad a short tile). While at
    // element k of row j it prefetches w[j] + k + pf (the next tile's rows: pf = nr * K for
    // rows stored one after another) into L1; unless far is NULL, it also brings the K * 4
    // bytes from far into L2, one cache line per 16 elements of K.
    void (*dense)(float *y, int64_t ldy, const float *const *x, int mr, const float *const *w,
                  int n_out, int64_t K, int64_t pf, const char *far);
    // The same with weight rows rows[0..qnr[mr]) (flat row indices over all matrices) of a
    // quantized view decoded in registers; not for F32 views, nor NF4 with cols % 64 != 0.
    void (*quant)(float *y, int64_t ldy, const float *const *x, int mr, const kq_weight *w,
                  const int64_t *rows, int n_out);
    // dst (n, cols) = flat rows row0 .. row0 + n - 1 decoded (kq_dequant_range's values);
    // same restrictions as quant.
    void (*decode)(float *dst, const kq_weight *w, int64_t row0, int64_t n);
    // y[j] = dot(x, w + j * K) for j < n, with n <= 16 and K <= 16 (weight rows one after
    // another): dense's bits, the 16 sums reduced together.
    void (*shortk)(float *y, const float *x, const float *w, int n, int64_t K);
    // y[k] = sum over s < n of p[s] * rows[s][k] for k < K, s increasing, one fused
    // multiply-add per term (multiply, then add, in the baseline copy) from 0.
    void (*wsum)(float *y, const float *p, const float *const *rows, int64_t n, int64_t K);
    // A sum over p[0..n) that loads every element once with the copy's vector loads.
    float (*read)(const float *p, int64_t n);
} bi_kernels;

// Defined only where the f32 kernels are built (MOLT_REAL == 32).
extern const bi_kernels bi_kernels_avx512vbmi, bi_kernels_avx512, bi_kernels_avx2,
    bi_kernels_base;

#endif
