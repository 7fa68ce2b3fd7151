// autograd/cpu/k_linear.h: linear (y = x W^T) and RMSNorm kernels (prototypes; no include
// guard on purpose: read once per element type). `_ref` kernels are plain loops, the ground
// truth; the others use BLAS GEMM (linear) or OpenMP over rows (RMSNorm) and are tested
// against them. Backward kernels accumulate (+=) into their outputs.
// Sizes: T rows, in / out features, C channels.

// y (T, out) = x (T, in) . w (out, in)^T
void K(linear_fwd_ref)(real *y, const real *x, const real *w, int64_t T, int64_t in,
                       int64_t out);
void K(linear_fwd)(real *y, const real *x, const real *w, int64_t T, int64_t in, int64_t out);
// dx (T, in) += dy (T, out) . w (out, in)
void K(linear_bwd_x_ref)(real *dx, const real *dy, const real *w, int64_t T, int64_t in,
                         int64_t out);
void K(linear_bwd_x)(real *dx, const real *dy, const real *w, int64_t T, int64_t in,
                     int64_t out);
// dw (out, in) += dy (T, out)^T . x (T, in)
void K(linear_bwd_w_ref)(real *dw, const real *dy, const real *x, int64_t T, int64_t in,
                         int64_t out);
void K(linear_bwd_w)(real *dw, const real *dy, const real *x, int64_t T, int64_t in,
                     int64_t out);

// y (T, C) = x (T, C) * rstd (T) * w (C), rstd = 1 / sqrt(mean(x^2) + eps) per row, the mean
// of squares accumulated in double for both element types. rstd may be NULL (not kept).
void K(rmsnorm_fwd_ref)(real *y, real *rstd, const real *x, const real *w, int64_t T,
                        int64_t C, double eps);
void K(rmsnorm_fwd)(real *y, real *rstd, const real *x, const real *w, int64_t T, int64_t C,
                    double eps);
// dx (T, C) += d/dx, dw (C) += d/dw for upstream dy (T, C); either output may be NULL.
// rstd (T) is what the forward kept.
void K(rmsnorm_bwd_ref)(real *dx, real *dw, const real *dy, const real *x, const real *w,
                        const real *rstd, int64_t T, int64_t C);
void K(rmsnorm_bwd)(real *dx, real *dw, const real *dy, const real *x, const real *w,
                    const real *rstd, int64_t T, int64_t C);
