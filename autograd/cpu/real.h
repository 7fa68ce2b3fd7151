// autograd/cpu/real.h: the element type of a CPU kernel file. Every cpu/k_*.c file is
// compiled twice, with MOLT_REAL=32 (float, names ending _f32) and MOLT_REAL=64 (double,
// _f64), so one source serves training (f32) and gradient checks (f64).
#ifndef MOLT_CPU_REAL_H
#define MOLT_CPU_REAL_H

#include <math.h>
#include <stdint.h>

#if MOLT_REAL == 32
typedef float real;
#define K(name) name##_f32
#define R_EXP expf
#define R_LOG logf
#define R_SQRT sqrtf
#define R_COS cosf
#define R_SIN sinf
#define R_FABS fabsf
#define R_GEMM ag_blas_sgemm
#define R_AXPY ag_blas_saxpy
#define R_DOT ag_blas_sdot
#elif MOLT_REAL == 64
typedef double real;
#define K(name) name##_f64
#define R_EXP exp
#define R_LOG log
#define R_SQRT sqrt
#define R_COS cos
#define R_SIN sin
#define R_FABS fabs
#define R_GEMM ag_blas_dgemm
#define R_AXPY ag_blas_daxpy
#define R_DOT ag_blas_ddot
#else
#error "compile cpu kernels with MOLT_REAL=32 or MOLT_REAL=64"
#endif

#endif
