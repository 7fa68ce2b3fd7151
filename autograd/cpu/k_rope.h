// autograd/cpu/k_rope.h: rotary-embedding kernels (prototypes; no include guard on purpose).
// x and y are (T, rows, D): T positions, `rows` = the product of the dims between T and D
// (heads), D the last dim. The rotary slice is [start, start + 2*half) of the last dim;
// inv_freq (half) and attn (the cos/sin factor) come from an ag_rope_table. pos (T) >= 0.
// Forward reads interleaved pairs and writes them de-interleaved; backward applies the
// transposed rotation and ACCUMULATES into dx (dims outside the slice: dx += dy).
void K(rope_fwd_ref)(real *y, const real *x, const int32_t *pos, const double *inv_freq,
                     int half, double attn, int64_t T, int64_t rows, int64_t D, int64_t start);
void K(rope_fwd_fast)(real *y, const real *x, const int32_t *pos, const double *inv_freq,
                      int half, double attn, int64_t T, int64_t rows, int64_t D, int64_t start);
void K(rope_bwd_ref)(real *dx, const real *dy, const int32_t *pos, const double *inv_freq,
                     int half, double attn, int64_t T, int64_t rows, int64_t D, int64_t start);
void K(rope_bwd_fast)(real *dx, const real *dy, const int32_t *pos, const double *inv_freq,
                      int half, double attn, int64_t T, int64_t rows, int64_t D,
                      int64_t start);
