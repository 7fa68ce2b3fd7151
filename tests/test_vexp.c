// tests/test_vexp.c: the array exp of the fused loss (vexp_sum): both f32 copies (AVX2 where
// the processor has it, and the baseline lanes) against exp in double, element by element
// and for the returned sum, over a dense grid of the softmax range, random inputs, every
// tail length, the extremes and NaN; the f64 kernel against libm.
#include "harness/harness.h"
#include "autograd/cpu/kernels.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

typedef double (*vexp_fn)(float *, int64_t, float);
static const vexp_fn fns[2] = {vexp_sum_f32, vexp_sum_generic_f32};
static const char *const names[2] = {"dispatched", "generic"};

// Runs fn on x[0..n) - sub and checks every element and (with_sum) the sum against double
// exp. The sum is only promised for arguments <= 0, the softmax's (partials are floats).
static void check_sum(vexp_fn fn, const char *name, const float *x, int64_t n, float sub,
                      double tol, bool with_sum) {
    float *z = malloc((size_t)(n ? n : 1) * sizeof *z);
    ck_assert_ptr_nonnull(z);
    for (int64_t i = 0; i < n; i++)
        z[i] = x[i];
    double sum = fn(z, n, sub), want_sum = 0;
    for (int64_t i = 0; i < n; i++) {
        double arg = (double)(float)(x[i] - sub); // the lanes see the float difference
        double want = exp(arg);
        want_sum += want;
        if (arg < -87.3) { // flushed: tiny, never negative
            ck_assert_msg(z[i] >= 0 && z[i] <= 1.3e-38f, "%s: exp(%g) = %g", name, arg,
                          (double)z[i]);
            continue;
        }
        ck_assert_msg(fabs(z[i] - want) <= tol * want, "%s: exp(%.9g) = %.9g, want %.9g",
                      name, arg, (double)z[i], want);
    }
    ck_assert_msg(!with_sum || fabs(sum - want_sum) <= tol * want_sum + 1e-30,
                  "%s: sum %.12g, want %.12g", name, sum, want_sum);
    free(z);
}

// Every 1/1024 step of [-100, 0] (the range the softmax sees) and [0, 88].
START_TEST(test_vexp_grid) {
    int64_t n = 100 * 1024 + 1;
    float *x = malloc((size_t)n * sizeof *x);
    ck_assert_ptr_nonnull(x);
    for (int64_t i = 0; i < n; i++)
        x[i] = -100.0f + (float)i / 1024;
    for (int f = 0; f < 2; f++)
        check_sum(fns[f], names[f], x, n, 0, 4e-7, true);
    for (int64_t i = 0; i < 88 * 1024; i++)
        x[i] = (float)i / 1024;
    for (int f = 0; f < 2; f++)
        check_sum(fns[f], names[f], x, 88 * 1024, 0, 4e-7, false);
    free(x);
}
END_TEST

// Random logits with a subtracted maximum, for lengths 0..67: every tail of the 8 lanes and
// the flush of the float partial sums (16 vectors).
START_TEST(test_vexp_random_lengths) {
    ag_rng r;
    ag_rng_seed(&r, 7);
    float x[200];
    for (int64_t n = 0; n <= 67; n++) {
        float mx = -INFINITY;
        for (int64_t i = 0; i < n; i++) {
            x[i] = (float)(ag_rng_uniform(&r) * 40 - 20);
            mx = fmaxf(mx, x[i]);
        }
        for (int f = 0; f < 2; f++)
            check_sum(fns[f], names[f], x, n, n ? mx : 0, 4e-7, true);
    }
    for (int i = 0; i < 200; i++)
        x[i] = (float)(ag_rng_uniform(&r) * 10 - 10);
    for (int f = 0; f < 2; f++)
        check_sum(fns[f], names[f], x, 200, 0, 4e-7, true);
}
END_TEST

// Extremes: far below the float range flushes to (almost) 0, the top of the range stays
// finite, NaN stays NaN (and makes the sum NaN); elements beyond n are left alone.
START_TEST(test_vexp_extremes) {
    for (int f = 0; f < 2; f++) {
        float z[10] = {-1e30f, -200, -87.0f, 0, 88.0f, NAN, 1, 2, 3, 4};
        double sum = fns[f](z, 6, 0);
        ck_assert_msg(z[0] >= 0 && z[0] < 1.3e-38f, "%s: %g", names[f], (double)z[0]);
        ck_assert(z[1] >= 0 && z[1] < 1.3e-38f);
        ck_assert_double_eq_tol(z[2], exp(-87.0), 4e-7 * exp(-87.0));
        ck_assert_float_eq(z[3], 1.0f);
        ck_assert(isfinite(z[4]));
        ck_assert_double_eq_tol(z[4], exp(88.0), 4e-7 * exp(88.0));
        ck_assert(isnan(z[5]));
        ck_assert(isnan(sum));
        ck_assert_float_eq(z[6], 1);
        ck_assert_float_eq(z[9], 4);
    }
}
END_TEST

START_TEST(test_vexp_f64_is_libm) {
    double z[5] = {-3, -0.5, 0, 1.25, -700}, want = 0, x[5];
    for (int i = 0; i < 5; i++) {
        x[i] = z[i];
        want += exp(z[i] - 0.25);
    }
    double sum = vexp_sum_f64(z, 5, 0.25);
    for (int i = 0; i < 5; i++)
        ck_assert_double_eq(z[i], exp(x[i] - 0.25));
    ck_assert_double_eq_tol(sum, want, 1e-15 * want);
}
END_TEST

int main(void) {
    Suite *s = suite_create("vexp");
    TCase *tc = tcase_create("vexp");
    tcase_add_test(tc, test_vexp_grid);
    tcase_add_test(tc, test_vexp_random_lengths);
    tcase_add_test(tc, test_vexp_extremes);
    tcase_add_test(tc, test_vexp_f64_is_libm);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
