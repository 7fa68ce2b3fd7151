// autograd/cpu/k_blas.h: what kernels that call BLAS from inside their own OpenMP team share.
// OpenBLAS built on pthreads would start its own threads inside the team's, oversubscribe
// the cores and stall (measured: 20-30x slower), so it is held at one thread for the
// duration of the team's region and restored afterwards (the OpenMP build runs single-
// threaded inside a parallel region by itself, and the calls change nothing there).
#ifndef MOLT_CPU_K_BLAS_H
#define MOLT_CPU_K_BLAS_H

#include <cblas.h>

// Before a region run by `team` threads: returns OpenBLAS's thread count to restore.
static inline int blas_single_begin(int team) {
    int n = openblas_get_num_threads();
    if (team > 1 && n > 1)
        openblas_set_num_threads(1);
    return n;
}

// After the region: n is what blas_single_begin(team) returned.
static inline void blas_single_end(int team, int n) {
    if (team > 1 && n > 1)
        openblas_set_num_threads(n);
}

#endif
