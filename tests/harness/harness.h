// tests/harness/harness.h: shared test helpers: gradient checks by central finite
// differences, f32-vs-f64 and optimized-vs-reference comparisons, and Check glue.
#ifndef MOLT_TEST_HARNESS_H
#define MOLT_TEST_HARNESS_H

#include <check.h>

#include "autograd/autograd.h"

// Fails the test with the molt error message when expr is not MOLT_OK.
#define ck_assert_ok(expr)                                                                 \
    do {                                                                                   \
        molt_status st_ = (expr);                                                          \
        ck_assert_msg(st_ == MOLT_OK, "%s -> %s: %s", #expr, molt_status_name(st_),        \
                      molt_err_msg());                                                     \
    } while (0)
// Fails the test when t is NULL, showing the error message.
#define ck_assert_tensor(t) ck_assert_msg((t) != NULL, "%s is NULL: %s", #t, molt_err_msg())

// Builds the graph under test from inputs in[0..n-1] (all the same float dtype, plus any
// I32 operands) and returns its output, or NULL on error.
typedef ag_tensor *(*gc_build_fn)(ag_ctx *c, ag_tensor **in, void *user);

typedef struct {
    int n_in;
    ag_tensor **in;     // inputs; float ones are F64 masters, requires_grad marks what to check
    gc_build_fn build;
    void *user;
    double eps;         // finite-difference step (default 1e-6)
} gc_case;

typedef struct {
    double max_rel;     // worst relative error over all checked elements
    int worst_input;    // which input, which element, and the two values
    int64_t worst_elem;
    double analytic, numeric;
    int64_t checked;    // elements checked
} gc_result;

// Central finite differences on L = sum(out * R) (R fixed random) against backward.
// Relative error per element: |a - n| / max(|a|, |n|, 1e-3 * max|n| of that input, 1e-8).
// Returns MOLT_OK or the error of a failing build/backward.
molt_status gc_gradcheck(const gc_case *g, gc_result *r);

// Forward in f32 (inputs rounded from the f64 masters) against f64 on the same rounded
// values: returns max |y32 - y64| / max|y64| in *rel.
molt_status gc_f32_vs_f64(const gc_case *g, double *rel);

// Optimized kernels against reference kernels in f32: forward outputs and every input
// gradient; *rel gets the worst max|d| / max|ref| over all of them.
molt_status gc_fast_vs_ref(const gc_case *g, double *rel);

// Copy of t in dtype dt (float <-> float; I32 copied as is), same requires_grad.
ag_tensor *gc_clone(ag_arena *a, const ag_tensor *t, ag_dtype dt);
// New F64 tensor with uniform values in [lo, hi), requires_grad as given.
ag_tensor *gc_rand(ag_arena *a, ag_rng *r, int ndim, const int64_t *shape, double lo,
                   double hi, bool requires_grad);
// max |a - b| / max(max|b|, 1e-30) over two same-sized tensors (any float dtypes).
double gc_max_rel_diff(const ag_tensor *a, const ag_tensor *b);

// Runs a suite and returns the process exit status (0 when all passed).
int harness_run(Suite *s);

#endif
