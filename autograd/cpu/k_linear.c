// autograd/cpu/k_linear.c: linear and RMSNorm kernels, compiled once per element type.
// The reference kernels are plain loops accumulating in double (the ground truth); the fast
// ones hand the products to BLAS (row-major GEMM) or spread rows over OpenMP threads. Shape
// and dtype checks live in ops_linear.c; nothing here allocates or fails.
#include "real.h"
#include "k_linear.h"

#include "k_blas.h"

// ---- linear ---------------------------------------------------------------------------

void K(linear_fwd_ref)(real *y, const real *x, const real *w, int64_t T, int64_t in,
                       int64_t out) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t o = 0; o < out; o++) {
            double acc = 0;
            for (int64_t i = 0; i < in; i++)
                acc += (double)x[t * in + i] * w[o * in + i];
            y[t * out + o] = (real)acc;
        }
}

// Dims fit BLAS's int: ops_linear.c rejects larger operands.
void K(linear_fwd)(real *y, const real *x, const real *w, int64_t T, int64_t in, int64_t out) {
    R_GEMM(CblasRowMajor, CblasNoTrans, CblasTrans, (int)T, (int)out, (int)in, 1, x, (int)in,
           w, (int)in, 0, y, (int)out);
}

void K(linear_bwd_x_ref)(real *dx, const real *dy, const real *w, int64_t T, int64_t in,
                         int64_t out) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < in; i++) {
            double acc = 0;
            for (int64_t o = 0; o < out; o++)
                acc += (double)dy[t * out + o] * w[o * in + i];
            dx[t * in + i] += (real)acc;
        }
}

void K(linear_bwd_x)(real *dx, const real *dy, const real *w, int64_t T, int64_t in,
                     int64_t out) {
    R_GEMM(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)T, (int)in, (int)out, 1, dy,
           (int)out, w, (int)in, 1, dx, (int)in);
}

void K(linear_bwd_w_ref)(real *dw, const real *dy, const real *x, int64_t T, int64_t in,
                         int64_t out) {
    for (int64_t o = 0; o < out; o++)
        for (int64_t i = 0; i < in; i++) {
            double acc = 0;
            for (int64_t t = 0; t < T; t++)
                acc += (double)dy[t * out + o] * x[t * in + i];
            dw[o * in + i] += (real)acc;
        }
}

void K(linear_bwd_w)(real *dw, const real *dy, const real *x, int64_t T, int64_t in,
                     int64_t out) {
    R_GEMM(CblasRowMajor, CblasTrans, CblasNoTrans, (int)out, (int)in, (int)T, 1, dy,
           (int)out, x, (int)in, 1, dw, (int)in);
}

// ---- RMSNorm ----------------------------------------------------------------------------
// The statistic is accumulated in double even for f32 data: at least as accurate as the
// fp32 computation of the reference model, and the f32 and f64 paths then differ only by
// the rounding of inputs and outputs.

// Fewer elements than this run on one thread: forking a team costs more than the work, and
// far more when the cores are busy with other processes.
#define RMS_PAR_MIN 16384

static real rms_rstd(const real *x, int64_t C, double eps) {
    double ss = 0;
    for (int64_t j = 0; j < C; j++)
        ss += (double)x[j] * x[j];
    return (real)(1.0 / sqrt(ss / (double)C + eps));
}

// Same statistic with eight independent partial sums, which the compiler can vectorize
// (a single running sum is a serial dependency chain without fast-math).
static real rms_rstd_lanes(const real *x, int64_t C, double eps) {
    double lane[8] = {0};
    int64_t j = 0;
    for (; j + 8 <= C; j += 8)
        for (int l = 0; l < 8; l++)
            lane[l] += (double)x[j + l] * x[j + l];
    double ss = 0;
    for (; j < C; j++)
        ss += (double)x[j] * x[j];
    for (int l = 0; l < 8; l++)
        ss += lane[l];
    return (real)(1.0 / sqrt(ss / (double)C + eps));
}

static void rms_row_out(real *y, const real *x, const real *w, real r, int64_t C) {
    for (int64_t j = 0; j < C; j++)
        y[j] = (x[j] * r) * w[j];
}

void K(rmsnorm_fwd_ref)(real *y, real *rstd, const real *x, const real *w, int64_t T,
                        int64_t C, double eps) {
    for (int64_t t = 0; t < T; t++) {
        real r = rms_rstd(x + t * C, C, eps);
        if (rstd)
            rstd[t] = r;
        rms_row_out(y + t * C, x + t * C, w, r, C);
    }
}

void K(rmsnorm_fwd)(real *y, real *rstd, const real *x, const real *w, int64_t T, int64_t C,
                    double eps) {
#pragma omp parallel for schedule(static) if (T * C >= RMS_PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        real r = rms_rstd_lanes(x + t * C, C, eps);
        if (rstd)
            rstd[t] = r;
        rms_row_out(y + t * C, x + t * C, w, r, C);
    }
}

// y_j = x_j r w_j with r = (mean(x^2) + eps)^-1/2, dr/dx_j = -r^3 x_j / C, so
// dx_j = r w_j dy_j - x_j r^3 / C * sum_k dy_k w_k x_k.
static void rms_row_dx(real *dx, const real *dy, const real *x, const real *w, real r,
                       int64_t C) {
    double dot = 0;
    for (int64_t k = 0; k < C; k++)
        dot += (double)dy[k] * w[k] * x[k];
    double c = (double)r * r * r * dot / (double)C;
    for (int64_t j = 0; j < C; j++)
        dx[j] += (real)((double)r * w[j] * dy[j] - c * x[j]);
}

void K(rmsnorm_bwd_ref)(real *dx, real *dw, const real *dy, const real *x, const real *w,
                        const real *rstd, int64_t T, int64_t C) {
    if (dx)
        for (int64_t t = 0; t < T; t++)
            rms_row_dx(dx + t * C, dy + t * C, x + t * C, w, rstd[t], C);
    if (dw)
        for (int64_t j = 0; j < C; j++) {
            double acc = 0;
            for (int64_t t = 0; t < T; t++)
                acc += (double)dy[t * C + j] * x[t * C + j] * rstd[t];
            dw[j] += (real)acc;
        }
}

// dw sums over rows; threads take blocks of columns so that no two write the same element
// and each column is summed in row order (deterministic).
#define RMS_DW_BLOCK 64

void K(rmsnorm_bwd)(real *dx, real *dw, const real *dy, const real *x, const real *w,
                    const real *rstd, int64_t T, int64_t C) {
    if (dx) {
#pragma omp parallel for schedule(static) if (T * C >= RMS_PAR_MIN)
        for (int64_t t = 0; t < T; t++)
            rms_row_dx(dx + t * C, dy + t * C, x + t * C, w, rstd[t], C);
    }
    if (dw) {
        int64_t nb = (C + RMS_DW_BLOCK - 1) / RMS_DW_BLOCK;
#pragma omp parallel for schedule(static) if (T * C >= RMS_PAR_MIN)
        for (int64_t b = 0; b < nb; b++) {
            int64_t j0 = b * RMS_DW_BLOCK, n = C - j0 < RMS_DW_BLOCK ? C - j0 : RMS_DW_BLOCK;
            double acc[RMS_DW_BLOCK] = {0};
            for (int64_t t = 0; t < T; t++) {
                const real *dyr = dy + t * C + j0, *xr = x + t * C + j0;
                double r = rstd[t];
                for (int64_t j = 0; j < n; j++)
                    acc[j] += (double)dyr[j] * xr[j] * r;
            }
            for (int64_t j = 0; j < n; j++)
                dw[j0 + j] += (real)acc[j];
        }
    }
}
