// autograd/cpu/k_bi_tmpl.h: the tile kernels of the f32 batch-invariant products, written
// once over a 16-lane vector and compiled by each instruction-set file (k_bi_avx512.c,
// k_bi_avx2.c, k_bi_base.c), which defines before including this:
//   V                         16 floats, lane l = element k with k % 16 == l
//   v_zero(), v_set1(a), v_load(p), v_loadn(p, n) (lanes >= n are 0), v_store(p, v)
//   v_fma(a, b, c)            c + a * b per lane, rounded once where the copy has FMA
//   v_hsum(v)                 ((v0+v8)+(v4+v12))+... : the fixed tree of k_bi.c
//   v_bf16(p), v_i8(p, s), v_fp8(p, s)   16 weights decoded (times the row scale s)
//   NL, nl_make(code, a), v_nf4(p, lut)  NF4: 16-entry table code * a; 16 weights from the
//                                         8 bytes at p (high nibble first)
//   BI_MR, BI_NR, BI_QMR, BI_QNR_MAX, BI_QNR_OF(mr) (tile sizes), BI_TABLE (the name of the
//   bi_kernels object).
// Each weight vector is decoded to exactly kq_dequant_range's values, so every format goes
// through the same multiply-adds as the dense kernel. Not here: threads, tiling of whole
// matrices, the order's statement (k_bi.c).

#define TM_INLINE static inline __attribute__((always_inline))

#ifndef BI_KEEP
// Keeps v in a register, so that the compiler does not fold its load into every instruction
// that reads it: a vector read by several multiply-adds is loaded once (copies whose loads
// fold define it).
#define BI_KEEP(v) ((void)0)
#endif

#ifndef BI_HSUM16
// v_hsum of a[0..16) into out[0..16) (copies may do the 16 at once).
static inline void v_hsum16(const V *a, float *out) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++)
        out[i] = v_hsum(a[i]);
}
#endif

// The sums of a tile's mr x nr vectors (acc, row-major, n = mr * nr of them) into
// y[i * ldy + j] for i < mr, j < n_out.
TM_INLINE void tm_reduce(float *y, int64_t ldy, const V *acc, const int mr, const int nr,
                         int n_out) {
    float s[32];
    int n = mr * nr, g = 0;
    for (; g + 16 <= n; g += 16)
        v_hsum16(acc + g, s + g);
#ifdef BI_HSUM8
    for (; g + 8 <= n; g += 8)
        v_hsum8(acc + g, s + g);
#endif
#ifdef BI_HSUM4
    for (; g + 4 <= n; g += 4)
        v_hsum4(acc + g, s + g);
#endif
#pragma GCC unroll 16
    for (; g < n; g++)
        s[g] = v_hsum(acc[g]);
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int j = 0; j < nr; j++)
            if (j < n_out)
                y[i * ldy + j] = s[i * nr + j];
}

// ---- scalar decoding (tails, scales), as k_quant.c ---------------------------------------

// Absmax of NF4 block b: stored, or code * second-level scale, then + offset (two roundings;
// kernels build with -ffp-contract=off).
TM_INLINE float tm_absmax(const kq_weight *w, int64_t b) {
    if (!w->absmax_q)
        return w->scale[b];
    float m = w->dyn_code[w->absmax_q[b]] * w->absmax_scale[b / 256];
    return m + w->absmax_offset;
}

// First byte of flat row r.
TM_INLINE const unsigned char *tm_row(const kq_weight *w, int fmt, int64_t r) {
    const unsigned char *d = w->data;
    switch (fmt) {
    case KQ_BF16: return d + r * w->cols * 2;
    case KQ_NF4: return d + r * (w->cols / 2);
    default: return d + r * w->cols;
    }
}

// Scale of flat row r (INT8 per row; FP8 per row or per matrix).
TM_INLINE float tm_scale(const kq_weight *w, int fmt, int64_t r) {
    if (fmt == KQ_INT8 || (fmt == KQ_FP8 && w->scale_per_row))
        return w->scale[r];
    if (fmt == KQ_FP8)
        return w->scale[r / w->rows];
    return 1;
}

// Element k of a row (not NF4).
TM_INLINE float tm_elem(const kq_weight *w, int fmt, const unsigned char *row, int64_t k,
                        float s) {
    if (fmt == KQ_BF16) {
        uint32_t u = (uint32_t)(row[2 * k] | row[2 * k + 1] << 8) << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    if (fmt == KQ_INT8)
        return (float)(int8_t)row[k] * s;
    return w->fp8_code[row[k]] * s;
}

// 16 weights from element k of a row (not NF4).
TM_INLINE V tm_decode(int fmt, const unsigned char *row, int64_t k, float s) {
    if (fmt == KQ_BF16)
        return v_bf16(row + 2 * k);
    if (fmt == KQ_INT8)
        return v_i8(row + k, s);
    return v_fp8(row + k, s);
}

// The last K % 16 weights of a row, zero-padded to a vector.
TM_INLINE V tm_tail(const kq_weight *w, int fmt, const unsigned char *row, int64_t k, float s) {
    float t[16] = {0};
    for (int64_t l = 0; k + l < w->cols; l++)
        t[l] = tm_elem(w, fmt, row, k + l, s);
    return v_load(t);
}

// ---- dense tile ----------------------------------------------------------------------------

TM_INLINE void tm_dense(float *y, int64_t ldy, const float *const *x, const float *const *w,
                        int n_out, int64_t K, int64_t pf, const char *far, const int MR) {
    V acc[BI_MR][BI_NR];
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
        for (int j = 0; j < BI_NR; j++)
            acc[i][j] = v_zero();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        if (far)
            __builtin_prefetch(far + k * 4, 0, 2);
        V xv[BI_MR];
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            xv[i] = v_load(x[i] + k);
            BI_KEEP(xv[i]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < BI_NR; j++) {
            __builtin_prefetch(w[j] + k + pf, 0, 3);
            V wv = v_load(w[j] + k);
            if (MR > 1) // one load for MR multiply-adds, not one folded into each
                BI_KEEP(wv);
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++)
                acc[i][j] = v_fma(xv[i], wv, acc[i][j]);
        }
    }
    if (k < K) {
        int n = (int)(K - k);
        V xv[BI_MR];
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++)
            xv[i] = v_loadn(x[i] + k, n);
#pragma GCC unroll 8
        for (int j = 0; j < BI_NR; j++) {
            V wv = v_loadn(w[j] + k, n);
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++)
                acc[i][j] = v_fma(xv[i], wv, acc[i][j]);
        }
    }
    tm_reduce(y, ldy, &acc[0][0], MR, BI_NR, n_out);
}

// ---- quantized tile: weights decoded in registers --------------------------------------------

TM_INLINE void tm_quant(float *y, int64_t ldy, const float *const *x, const kq_weight *w,
                        const int64_t *rows, int n_out, const int MR, const int FMT) {
    const int NR = BI_QNR_OF(MR);
    int64_t K = w->cols;
    V acc[BI_QMR][BI_QNR_MAX];
    const unsigned char *p[BI_QNR_MAX];
    float s[BI_QNR_MAX];
#pragma GCC unroll 8
    for (int j = 0; j < NR; j++) {
        p[j] = tm_row(w, FMT, rows[j]);
        s[j] = tm_scale(w, FMT, rows[j]);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++)
            acc[i][j] = v_zero();
    }
    int64_t k = 0;
    if (FMT == KQ_NF4) { // cols % 64 == 0: rows start on a block
        int64_t b0[BI_QNR_MAX];
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++)
            b0[j] = rows[j] * (K / 64);
        // the rows 2 NR further on (two tiles ahead, when the rows are consecutive), one
        // cache line at a time: weights streamed from memory arrive before their tile
        const int64_t ahead = 2 * (int64_t)NR * (K / 2);
        for (; k < K; k += 64) {
            NL lut[BI_QNR_MAX];
            if ((k & 127) == 0)
#pragma GCC unroll 8
                for (int j = 0; j < NR; j++)
                    __builtin_prefetch(p[j] + ahead + k / 2, 0, 3);
#pragma GCC unroll 8
            for (int j = 0; j < NR; j++)
                lut[j] = nl_make(w->nf4_code, tm_absmax(w, b0[j] + k / 64));
#pragma GCC unroll 4
            for (int u = 0; u < 64; u += 16) {
                V xv[BI_QMR];
#pragma GCC unroll 8
                for (int i = 0; i < MR; i++)
                    xv[i] = v_load(x[i] + k + u);
#pragma GCC unroll 8
                for (int j = 0; j < NR; j++) {
                    V wv = v_nf4(p[j] + (k + u) / 2, lut[j]);
#pragma GCC unroll 8
                    for (int i = 0; i < MR; i++)
                        acc[i][j] = v_fma(xv[i], wv, acc[i][j]);
                }
            }
        }
    } else {
        for (; k + 16 <= K; k += 16) {
            V xv[BI_QMR];
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++)
                xv[i] = v_load(x[i] + k);
#pragma GCC unroll 8
            for (int j = 0; j < NR; j++) {
                V wv = tm_decode(FMT, p[j], k, s[j]);
#pragma GCC unroll 8
                for (int i = 0; i < MR; i++)
                    acc[i][j] = v_fma(xv[i], wv, acc[i][j]);
            }
        }
        if (k < K) {
            V xv[BI_QMR];
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++)
                xv[i] = v_loadn(x[i] + k, (int)(K - k));
            for (int j = 0; j < NR; j++) {
                V wv = tm_tail(w, FMT, p[j], k, s[j]);
#pragma GCC unroll 8
                for (int i = 0; i < MR; i++)
                    acc[i][j] = v_fma(xv[i], wv, acc[i][j]);
            }
        }
    }
    V flat[BI_QMR * BI_QNR_MAX];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            flat[i * NR + j] = acc[i][j];
    tm_reduce(y, ldy, flat, MR, NR, n_out);
}

// ---- decoding whole rows ----------------------------------------------------------------------

TM_INLINE void tm_decode_rows(float *dst, const kq_weight *w, int64_t row0, int64_t n,
                              const int FMT) {
    int64_t K = w->cols;
    for (int64_t r = 0; r < n; r++) {
        const unsigned char *p = tm_row(w, FMT, row0 + r);
        float s = tm_scale(w, FMT, row0 + r), *d = dst + r * K;
        int64_t k = 0;
        if (FMT == KQ_NF4) {
            for (; k < K; k += 64) {
                NL lut = nl_make(w->nf4_code, tm_absmax(w, (row0 + r) * (K / 64) + k / 64));
#pragma GCC unroll 4
                for (int u = 0; u < 64; u += 16)
                    v_store(d + k + u, v_nf4(p + (k + u) / 2, lut));
            }
            continue;
        }
        for (; k + 16 <= K; k += 16)
            v_store(d + k, tm_decode(FMT, p, k, s));
        for (; k < K; k++)
            d[k] = tm_elem(w, FMT, p, k, s);
    }
}

// ---- rows of at most one vector ---------------------------------------------------------------

// y[j] = dot(x, w + j * K) for j < n (n <= 16, K <= 16): each row's one product vector (lanes
// past K zero, as tm_dense's last step from a zero sum), the 16 sums through v_hsum16 (rows
// past n repeat the last one and are dropped).
static void tm_shortk(float *y, const float *x, const float *w, int n, int64_t K) {
    V xv = v_loadn(x, (int)K), acc[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++)
        acc[j] = v_fma(xv, v_loadn(w + (j < n ? j : n - 1) * K, (int)K), v_zero());
    float s[16];
    v_hsum16(acc, s);
    memcpy(y, s, (size_t)n * sizeof *s);
}

// ---- weighted sum of rows --------------------------------------------------------------------

#ifndef BI_WS_V
#define BI_WS_V 4
#endif

// y[k] = sum over s < n, in increasing s, of p[s] * rows[s][k] (k < K), each term one v_fma
// onto the running sum from 0: BI_WS_V vectors of y stay in registers while every row goes
// by, then the next BI_WS_V; the last K % 16 elements as a vector with zeros past the end.
static void tm_wsum(float *y, const float *p, const float *const *rows, int64_t n, int64_t K) {
    int64_t k = 0;
    for (; k + 16 * BI_WS_V <= K; k += 16 * BI_WS_V) {
        V acc[BI_WS_V];
#pragma GCC unroll 8
        for (int v = 0; v < BI_WS_V; v++)
            acc[v] = v_zero();
        for (int64_t s = 0; s < n; s++) {
            V ps = v_set1(p[s]);
            const float *r = rows[s] + k;
#pragma GCC unroll 8
            for (int v = 0; v < BI_WS_V; v++)
                acc[v] = v_fma(ps, v_load(r + 16 * v), acc[v]);
        }
#pragma GCC unroll 8
        for (int v = 0; v < BI_WS_V; v++)
            v_store(y + k + 16 * v, acc[v]);
    }
    for (; k < K; k += 16) {
        int m = K - k < 16 ? (int)(K - k) : 16;
        V acc = v_zero();
        for (int64_t s = 0; s < n; s++)
            acc = v_fma(v_set1(p[s]), v_loadn(rows[s] + k, m), acc);
        float t[16];
        v_store(t, acc);
        memcpy(y + k, t, (size_t)m * sizeof *t);
    }
}

// ---- plain read (the benchmarks' bandwidth yardstick) -----------------------------------------

static float tm_read(const float *p, int64_t n) {
    V a = v_zero(), b = v_zero(), c = v_zero(), d = v_zero();
    int64_t k = 0;
    for (; k + 64 <= n; k += 64) {
        a = v_fma(v_load(p + k), v_load(p + k), a);
        b = v_fma(v_load(p + k + 16), v_load(p + k + 16), b);
        c = v_fma(v_load(p + k + 32), v_load(p + k + 32), c);
        d = v_fma(v_load(p + k + 48), v_load(p + k + 48), d);
    }
    float s = v_hsum(a) + v_hsum(b) + v_hsum(c) + v_hsum(d);
    for (; k < n; k++)
        s += p[k] * p[k];
    return s;
}

// ---- instances and the table ------------------------------------------------------------------

#define TM_DENSE(MR)                                                                          \
    static void tm_dense_##MR(float *y, int64_t ldy, const float *const *x,                   \
                              const float *const *w, int n_out, int64_t K, int64_t pf,        \
                              const char *far) {                                              \
        tm_dense(y, ldy, x, w, n_out, K, pf, far, MR);                                        \
    }
#define TM_QUANT(MR)                                                                          \
    static void tm_quant_##MR(float *y, int64_t ldy, const float *const *x,                   \
                              const kq_weight *w, const int64_t *rows, int n_out) {           \
        switch (w->format) {                                                                  \
        case KQ_BF16: tm_quant(y, ldy, x, w, rows, n_out, MR, KQ_BF16); break;                \
        case KQ_INT8: tm_quant(y, ldy, x, w, rows, n_out, MR, KQ_INT8); break;                \
        case KQ_FP8: tm_quant(y, ldy, x, w, rows, n_out, MR, KQ_FP8); break;                  \
        default: tm_quant(y, ldy, x, w, rows, n_out, MR, KQ_NF4); break;                      \
        }                                                                                     \
    }

TM_DENSE(1)
#if BI_MR >= 2
TM_DENSE(2)
#endif
#if BI_MR >= 3
TM_DENSE(3)
#endif
#if BI_MR >= 4
TM_DENSE(4)
#endif
TM_QUANT(1)
#if BI_QMR >= 2
TM_QUANT(2)
#endif
#if BI_QMR >= 3
TM_QUANT(3)
#endif
#if BI_QMR >= 4
TM_QUANT(4)
#endif
#if BI_QMR >= 5
TM_QUANT(5)
#endif
#if BI_QMR >= 6
TM_QUANT(6)
#endif
#if BI_QMR >= 7
TM_QUANT(7)
#endif
#if BI_QMR >= 8
TM_QUANT(8)
#endif

static void tm_dense_any(float *y, int64_t ldy, const float *const *x, int mr,
                         const float *const *w, int n_out, int64_t K, int64_t pf,
                         const char *far) {
    switch (mr) {
#if BI_MR >= 4
    case 4: tm_dense_4(y, ldy, x, w, n_out, K, pf, far); break;
#endif
#if BI_MR >= 3
    case 3: tm_dense_3(y, ldy, x, w, n_out, K, pf, far); break;
#endif
#if BI_MR >= 2
    case 2: tm_dense_2(y, ldy, x, w, n_out, K, pf, far); break;
#endif
    default: tm_dense_1(y, ldy, x, w, n_out, K, pf, far); break;
    }
}

static void tm_quant_any(float *y, int64_t ldy, const float *const *x, int mr,
                         const kq_weight *w, const int64_t *rows, int n_out) {
    switch (mr) {
#if BI_QMR >= 8
    case 8: tm_quant_8(y, ldy, x, w, rows, n_out); break;
#endif
#if BI_QMR >= 7
    case 7: tm_quant_7(y, ldy, x, w, rows, n_out); break;
#endif
#if BI_QMR >= 6
    case 6: tm_quant_6(y, ldy, x, w, rows, n_out); break;
#endif
#if BI_QMR >= 5
    case 5: tm_quant_5(y, ldy, x, w, rows, n_out); break;
#endif
#if BI_QMR >= 4
    case 4: tm_quant_4(y, ldy, x, w, rows, n_out); break;
#endif
#if BI_QMR >= 3
    case 3: tm_quant_3(y, ldy, x, w, rows, n_out); break;
#endif
#if BI_QMR >= 2
    case 2: tm_quant_2(y, ldy, x, w, rows, n_out); break;
#endif
    default: tm_quant_1(y, ldy, x, w, rows, n_out); break;
    }
}

static void tm_decode_any(float *dst, const kq_weight *w, int64_t row0, int64_t n) {
    switch (w->format) {
    case KQ_BF16: tm_decode_rows(dst, w, row0, n, KQ_BF16); break;
    case KQ_INT8: tm_decode_rows(dst, w, row0, n, KQ_INT8); break;
    case KQ_FP8: tm_decode_rows(dst, w, row0, n, KQ_FP8); break;
    default: tm_decode_rows(dst, w, row0, n, KQ_NF4); break;
    }
}

const bi_kernels BI_TABLE = {
    .mr = BI_MR, .nr = BI_NR, .qmr = BI_QMR,
    .qnr = {0, BI_QNR_OF(1), BI_QNR_OF(2), BI_QNR_OF(3), BI_QNR_OF(4), BI_QNR_OF(5),
            BI_QNR_OF(6), BI_QNR_OF(7), BI_QNR_OF(8)},
    .dense = tm_dense_any, .quant = tm_quant_any, .decode = tm_decode_any,
    .shortk = tm_shortk, .wsum = tm_wsum,
    .read = tm_read};
