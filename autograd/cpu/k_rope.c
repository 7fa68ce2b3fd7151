// autograd/cpu/k_rope.c: rotary position embedding on interleaved pairs, forward and
// backward, reference loops and an OpenMP version. Not here: the frequency table (see
// ops_attention.c) or any checking of shapes and positions (the builder does that).
//
// Angles follow transformers: in the f32 build the angle is float(pos) * float(inv_freq)
// evaluated in float and cos/sin are taken in float, then multiplied by float(attn); the f64
// build does the same in double. Large positions therefore lose angle precision in f32
// exactly as the reference implementation does.
#include "real.h"
#include "k_rope.h"

// cos and sin of pos * f, times the table's attention factor.
static inline void angle_cs(int32_t pos, double f, double attn, real *c, real *s) {
    real ang = (real)pos * (real)f;
    *c = R_COS(ang) * (real)attn;
    *s = R_SIN(ang) * (real)attn;
}

// One row: y (D), x (D); cs/sn (half). Pair i = (x[2i], x[2i+1]) -> (y[i], y[half + i]).
static inline void rotate_row(real *y, const real *x, const real *cs, const real *sn, int half,
                              int64_t D, int64_t start) {
    for (int64_t j = 0; j < start; j++)
        y[j] = x[j];
    const real *xr = x + start;
    real *yr = y + start;
    for (int i = 0; i < half; i++) {
        real xe = xr[2 * i], xo = xr[2 * i + 1];
        yr[i] = xe * cs[i] - xo * sn[i];
        yr[half + i] = xo * cs[i] + xe * sn[i];
    }
    for (int64_t j = start + 2 * half; j < D; j++)
        y[j] = x[j];
}

// Transposed rotation of one row, accumulated: dx (D) += R^T dy (D).
static inline void rotate_row_t(real *dx, const real *dy, const real *cs, const real *sn,
                                int half, int64_t D, int64_t start) {
    for (int64_t j = 0; j < start; j++)
        dx[j] += dy[j];
    const real *dr = dy + start;
    real *xr = dx + start;
    for (int i = 0; i < half; i++) {
        real a = dr[i], b = dr[half + i];
        xr[2 * i] += a * cs[i] + b * sn[i];
        xr[2 * i + 1] += b * cs[i] - a * sn[i];
    }
    for (int64_t j = start + 2 * half; j < D; j++)
        dx[j] += dy[j];
}

// Reference: the angle of every element is computed where it is used.
void K(rope_fwd_ref)(real *y, const real *x, const int32_t *pos, const double *inv_freq,
                     int half, double attn, int64_t T, int64_t rows, int64_t D, int64_t start) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < rows; r++) {
            const real *xr = x + (t * rows + r) * D;
            real *yr = y + (t * rows + r) * D;
            for (int64_t j = 0; j < D; j++)
                yr[j] = xr[j];
            for (int i = 0; i < half; i++) {
                real c, s;
                angle_cs(pos[t], inv_freq[i], attn, &c, &s);
                real xe = xr[start + 2 * i], xo = xr[start + 2 * i + 1];
                yr[start + i] = xe * c - xo * s;
                yr[start + half + i] = xo * c + xe * s;
            }
        }
}

void K(rope_bwd_ref)(real *dx, const real *dy, const int32_t *pos, const double *inv_freq,
                     int half, double attn, int64_t T, int64_t rows, int64_t D, int64_t start) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t r = 0; r < rows; r++) {
            const real *g = dy + (t * rows + r) * D;
            real *d = dx + (t * rows + r) * D;
            for (int64_t j = 0; j < D; j++)
                if (j < start || j >= start + 2 * half)
                    d[j] += g[j];
            for (int i = 0; i < half; i++) {
                real c, s;
                angle_cs(pos[t], inv_freq[i], attn, &c, &s);
                d[start + 2 * i] += g[start + i] * c + g[start + half + i] * s;
                d[start + 2 * i + 1] += g[start + half + i] * c - g[start + i] * s;
            }
        }
}

// Optimized: cos/sin once per position, shared by all rows (heads); positions in parallel.
void K(rope_fwd_fast)(real *y, const real *x, const int32_t *pos, const double *inv_freq,
                      int half, double attn, int64_t T, int64_t rows, int64_t D,
                      int64_t start) {
#pragma omp parallel for schedule(static) if (T * rows * D > 32768)
    for (int64_t t = 0; t < T; t++) {
        real cs[256], sn[256];
        for (int i = 0; i < half; i++)
            angle_cs(pos[t], inv_freq[i], attn, &cs[i], &sn[i]);
        for (int64_t r = 0; r < rows; r++)
            rotate_row(y + (t * rows + r) * D, x + (t * rows + r) * D, cs, sn, half, D, start);
    }
}

void K(rope_bwd_fast)(real *dx, const real *dy, const int32_t *pos, const double *inv_freq,
                      int half, double attn, int64_t T, int64_t rows, int64_t D,
                      int64_t start) {
#pragma omp parallel for schedule(static) if (T * rows * D > 32768)
    for (int64_t t = 0; t < T; t++) {
        real cs[256], sn[256];
        for (int i = 0; i < half; i++)
            angle_cs(pos[t], inv_freq[i], attn, &cs[i], &sn[i]);
        for (int64_t r = 0; r < rows; r++)
            rotate_row_t(dx + (t * rows + r) * D, dy + (t * rows + r) * D, cs, sn, half, D,
                         start);
    }
}
