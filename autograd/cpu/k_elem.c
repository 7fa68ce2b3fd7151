// autograd/cpu/k_elem.c: elementwise kernels, reference loops (fast enough as they are:
// memory bound, vectorized by the compiler).
#include "real.h"
#include "k_elem.h"

void K(add_fwd)(real *y, const real *a, const real *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        y[i] = a[i] + b[i];
}

void K(mul_fwd)(real *y, const real *a, const real *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        y[i] = a[i] * b[i];
}

void K(scale_fwd)(real *y, const real *a, real s, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        y[i] = a[i] * s;
}

void K(acc)(real *g, const real *dy, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        g[i] += dy[i];
}

void K(acc_mul)(real *g, const real *dy, const real *b, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        g[i] += dy[i] * b[i];
}

void K(acc_scale)(real *g, const real *dy, real s, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        g[i] += s * dy[i];
}

// Pairwise-free but accumulated in double for both types: sums feed losses and checks.
real K(sum_fwd)(const real *a, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += a[i];
    return (real)s;
}
