// autograd/cpu/k_blas.h: the BLAS functions the kernels call (ag_blas_*, the cblas routines of
// the same names, loaded at run time by autograd/blas.c), and what kernels that call BLAS from
// inside their own OpenMP team share. OpenBLAS built on pthreads would start its own threads
// inside the team's, oversubscribe the cores and stall (measured: 20-30x slower), so it is
// held at one thread for the duration of the team's region and restored afterwards (the
// OpenMP build runs single-threaded inside a parallel region by itself, and the calls change
// nothing there).
#ifndef MOLT_CPU_K_BLAS_H
#define MOLT_CPU_K_BLAS_H

#include <cblas.h> // the CBLAS enums (CblasRowMajor, ...); the calls go through ag_blas_*
#include <omp.h>
#include <stdint.h>

// cblas_sgemm and friends with the CBLAS enums as ints; they load OpenBLAS on first use.
void ag_blas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha,
                   const float *a, int lda, const float *b, int ldb, float beta, float *c,
                   int ldc);
void ag_blas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha,
                   const double *a, int lda, const double *b, int ldb, double beta, double *c,
                   int ldc);
void ag_blas_saxpy(int n, float alpha, const float *x, int incx, float *y, int incy);
void ag_blas_daxpy(int n, double alpha, const double *x, int incx, double *y, int incy);
float ag_blas_sdot(int n, const float *x, int incx, const float *y, int incy);
double ag_blas_ddot(int n, const double *x, int incx, const double *y, int incy);
// OpenBLAS's thread count, and setting it (capped at the count its start-up fitted).
int ag_blas_threads(void);
void ag_blas_set_threads(int n);

// Before a region run by `team` threads: returns OpenBLAS's thread count to restore.
static inline int blas_single_begin(int team) {
    int n = ag_blas_threads();
    if (team > 1 && n > 1)
        ag_blas_set_threads(1);
    return n;
}

// After the region: n is what blas_single_begin(team) returned.
static inline void blas_single_end(int team, int n) {
    if (team > 1 && n > 1)
        ag_blas_set_threads(n);
}

// body(ctx, i, tid) for i in [0, n), iterations that call BLAS: over `team` threads, one
// iteration at a time (dynamic), OpenBLAS held at one thread meanwhile; a team of one runs
// them in order, tid 0, outside any parallel region. Not in a region that an `if` leaves to
// one thread: a GEMM called there may open a team of its own (OpenBLAS's OpenMP build does),
// and OpenMP runs such nested teams on threads it starts for each region, not its pool's.
static inline void blas_team_loop(int team, int64_t n, void (*body)(void *ctx, int64_t i, int tid),
                                  void *ctx) {
    if (team <= 1) {
        for (int64_t i = 0; i < n; i++)
            body(ctx, i, 0);
        return;
    }
    int nb = blas_single_begin(team);
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
    for (int64_t i = 0; i < n; i++)
        body(ctx, i, omp_get_thread_num());
    blas_single_end(team, nb);
}

#endif
