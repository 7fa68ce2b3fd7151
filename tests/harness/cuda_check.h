// tests/harness/cuda_check.h: helpers of the CUDA kernel tests (tests/test_cuda_*.c):
// skipping without a GPU, device buffers freed at the end of each test, bf16 rounding of
// host data, and the comparisons every test makes against the CPU reference kernels.
//
// Tolerances. f32 kernels are compared by norm-wise relative error |got - ref|_2 / |ref|_2
// against a double-precision computation on the same inputs (1e-5: f32 arithmetic lands far
// below it; TF32 would land near 3e-4 and fail). bf16 kernels get bf16-rounded inputs on
// both sides, so the error comes only from rounding the results (and intermediates) to
// bf16, 2^-9 = 1.95e-3 relative each: each test states its bound and why.
// Compiled in every build; without CUDA every test skips before calling anything here.
#ifndef MOLT_TEST_CUDA_CHECK_H
#define MOLT_TEST_CUDA_CHECK_H

#include "harness.h"

#include <stddef.h>
#include <stdint.h>

#ifdef MOLT_HAVE_CUDA
#include "autograd/cuda/cuda_backend.h"
#endif

// Runs the suite when a GPU is visible, in this process (CUDA does not survive fork, so a
// failing check ends its test but not the run); otherwise prints why and returns 77.
// Each TCase should have cu_free_all as its teardown (tcase_add_checked_fixture), so that
// a test that fails half-way gives its buffers back.
int cuda_test_main(Suite *s);

// Device memory for one test (all freed by cu_free_all, which each test calls at its end).
// cu_alloc poisons: every byte 0xFF (NaN as f32 and as bf16, -1 as int32), so an element
// that a kernel should have written and did not shows up in the comparison (never zeros:
// they hide unwritten outputs). Buffers a kernel accumulates into come from cu_up.
void *cu_alloc(size_t bytes);
void *cu_up(const void *host, size_t bytes);         // a device copy of host
void cu_down(void *host, const void *dev, size_t bytes);
void cu_free_all(void);
// Fails the test with the CUDA message when rc != 0.
#define ck_cuda(expr)                                                                      \
    do {                                                                                   \
        int rc_ = (expr);                                                                  \
        ck_assert_msg(rc_ == 0, "%s failed: %s", #expr, cu_error_text());                  \
    } while (0)
const char *cu_error_text(void);

// Uniform values in [lo, hi) from r.
void fill_f(float *x, int64_t n, ag_rng *r, double lo, double hi);
// x rounded in place to the nearest bf16 value; bits (may be NULL) gets the bf16 codes.
void round_bf16(float *x, uint16_t *bits, int64_t n);
// Device copy of x as `bf16` (x must already be bf16 values) or f32.
void *cu_up_as(const float *x, int64_t n, int bf16);
// Host f32 values of a device buffer of n f32 or bf16 elements.
void cu_down_as(float *x, const void *dev, int64_t n, int bf16);
double *to_f64(const float *x, int64_t n); // molt_malloc'ed copy (free with molt_free)

// |got - ref|_2 / |ref|_2 (ref all zero: |got|_2); NaN anywhere gives +inf.
double rel_l2(const float *got, const double *ref, int64_t n);
double rel_l2_f(const float *got, const float *ref, int64_t n);
// Fails with the measured error, the bound and `what` when rel_l2 > tol.
void ck_close(const float *got, const double *ref, int64_t n, double tol, const char *what);
void ck_close_f(const float *got, const float *ref, int64_t n, double tol, const char *what);
// Bitwise equality of two float arrays (reports the first difference).
void ck_same_bits(const float *got, const float *ref, int64_t n, const char *what);

#endif
