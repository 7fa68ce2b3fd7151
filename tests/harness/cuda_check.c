// tests/harness/cuda_check.c: see cuda_check.h.
#include "cuda_check.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

// CUDA does not survive fork(): the device query below initializes it in this process, so
// the tests run here too (no fork per test, as Check does by default).
int cuda_test_main(Suite *s) {
    ag_device_info info;
    ag_device_query(&info);
    if (info.cuda_devices < 1) {
        printf("SKIP: no CUDA device visible (%s)\n", info.cuda_error);
        srunner_free(srunner_create(s)); // frees the suite
        return 77;
    }
    SRunner *sr = srunner_create(s);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    cu_free_all();
    return failed == 0 ? 0 : 1;
}

#ifdef MOLT_HAVE_CUDA

#define MAX_BUFS 512

static void *bufs[MAX_BUFS];
static int n_bufs;

const char *cu_error_text(void) { return molt_cuda_error(); }

void *cu_alloc(size_t bytes) {
    ck_assert_msg(n_bufs < MAX_BUFS, "too many device buffers in one test");
    void *p = NULL;
    ck_cuda(molt_cuda_malloc(&p, bytes));
    ck_cuda(molt_cuda_memset(p, 0xFF, bytes));
    bufs[n_bufs++] = p;
    return p;
}

void *cu_up(const void *host, size_t bytes) {
    void *p = cu_alloc(bytes);
    ck_cuda(molt_cuda_h2d(p, host, bytes));
    return p;
}

void cu_down(void *host, const void *dev, size_t bytes) {
    ck_cuda(molt_cuda_d2h(host, dev, bytes));
}

void cu_free_all(void) {
    for (int i = 0; i < n_bufs; i++)
        molt_cuda_free(bufs[i]);
    n_bufs = 0;
}

#else

const char *cu_error_text(void) { return "built without CUDA"; }
void *cu_alloc(size_t bytes) {
    (void)bytes;
    ck_abort_msg("CUDA test helper called in a build without CUDA");
    return NULL;
}
void *cu_up(const void *host, size_t bytes) {
    (void)host;
    return cu_alloc(bytes);
}
void cu_down(void *host, const void *dev, size_t bytes) {
    (void)host;
    (void)dev;
    cu_alloc(bytes);
}
void cu_free_all(void) {}

#endif

void fill_f(float *x, int64_t n, ag_rng *r, double lo, double hi) {
    for (int64_t i = 0; i < n; i++)
        x[i] = (float)(lo + (hi - lo) * ag_rng_uniform(r));
}

void round_bf16(float *x, uint16_t *bits, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint16_t b = ag_f32_to_bf16(x[i]);
        x[i] = ag_bf16_to_f32(b);
        if (bits)
            bits[i] = b;
    }
}

void *cu_up_as(const float *x, int64_t n, int bf16) {
    if (!bf16)
        return cu_up(x, (size_t)n * sizeof(float));
    uint16_t *b = molt_malloc((size_t)n * 2 + 2);
    ck_assert_ptr_nonnull(b);
    for (int64_t i = 0; i < n; i++)
        b[i] = ag_f32_to_bf16(x[i]);
    void *p = cu_up(b, (size_t)n * 2);
    molt_free(b);
    return p;
}

void cu_down_as(float *x, const void *dev, int64_t n, int bf16) {
    if (!bf16) {
        cu_down(x, dev, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *b = molt_malloc((size_t)n * 2 + 2);
    ck_assert_ptr_nonnull(b);
    cu_down(b, dev, (size_t)n * 2);
    for (int64_t i = 0; i < n; i++)
        x[i] = ag_bf16_to_f32(b[i]);
    molt_free(b);
}

double *to_f64(const float *x, int64_t n) {
    double *d = molt_malloc((size_t)n * sizeof(double) + 8);
    ck_assert_ptr_nonnull(d);
    for (int64_t i = 0; i < n; i++)
        d[i] = x[i];
    return d;
}

double rel_l2(const float *got, const double *ref, int64_t n) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(got[i]) || isnan(ref[i]))
            return INFINITY;
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

double rel_l2_f(const float *got, const float *ref, int64_t n) {
    double *r = to_f64(ref, n);
    double e = rel_l2(got, r, n);
    molt_free(r);
    return e;
}

void ck_close(const float *got, const double *ref, int64_t n, double tol, const char *what) {
    double e = rel_l2(got, ref, n);
    ck_assert_msg(e <= tol, "%s: relative error %.3g over %lld elements, bound %.3g", what, e,
                  (long long)n, tol);
}

void ck_close_f(const float *got, const float *ref, int64_t n, double tol, const char *what) {
    double e = rel_l2_f(got, ref, n);
    ck_assert_msg(e <= tol, "%s: relative error %.3g over %lld elements, bound %.3g", what, e,
                  (long long)n, tol);
}

void ck_same_bits(const float *got, const float *ref, int64_t n, const char *what) {
    for (int64_t i = 0; i < n; i++)
        ck_assert_msg(memcmp(&got[i], &ref[i], sizeof(float)) == 0,
                      "%s: element %lld is %.9g, expected %.9g (bit for bit)", what,
                      (long long)i, (double)got[i], (double)ref[i]);
}
