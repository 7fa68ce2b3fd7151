// autograd/cpu/k_vexp.c: exp over arrays, the hot loop of the softmax in the fused loss.
// The f64 build calls libm's exp element by element. The f32 build evaluates exp eight
// lanes at a time: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (Taylor
// coefficients: relative error below 2e-7 on that interval, about the rounding of a float),
// and 2^n put into the exponent field. The same lane code is compiled twice, once for AVX2
// with FMA and once for the baseline instruction set, and the AVX2 copy is chosen at run
// time when the processor has it. Inputs below -87.3 give 2^-126 * e^(x + 87.3 - ...)
// flushed to at most ~1e-38 (as good as 0 beside the row's largest term, which is 1); NaN
// stays NaN; inputs above 88.7 are clamped there (the callers pass x <= 0).
#include "real.h"
#include "k_vexp.h"

#include <string.h>

#if MOLT_REAL == 32

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#define LANES 8
// Sums are carried in float lanes for this many vectors, then moved to a double.
#define FLUSH 16

// Lane-wise select: m ? a : b, m being a comparison result (all ones or all zeros).
#define SEL(m, a, b) ((v8f)(((m) & (v8i)(a)) | (~(m) & (v8i)(b))))
#define SPLAT(c) ((v8f){0, 0, 0, 0, 0, 0, 0, 0} + (c))

// out = e^x for 8 lanes (see the file comment).
#define VEXP_BODY(x, out)                                                                          \
    do {                                                                                           \
        v8f ve_xc = SEL((v8i)((x) < -87.3f), SPLAT(-87.3f), (x));                                  \
        ve_xc = SEL((v8i)(ve_xc > 88.7f), SPLAT(88.7f), ve_xc);                                    \
        v8f ve_t = ve_xc * 1.44269504088896341f + 12582912.0f; /* 1.5 * 2^23: rounds to integer */ \
        v8f ve_nf = ve_t - 12582912.0f;                                                            \
        v8i ve_ni = (v8i)ve_t - (v8i)SPLAT(12582912.0f);                                           \
        v8f ve_r = ve_xc - ve_nf * 0.693145751953125f; /* ln 2 in two parts */                     \
        ve_r = ve_r - ve_nf * 1.428606765330187e-06f;                                              \
        v8f ve_p = ve_r * (1.0f / 720) + 1.0f / 120;                                               \
        ve_p = ve_p * ve_r + 1.0f / 24;                                                            \
        ve_p = ve_p * ve_r + 1.0f / 6;                                                             \
        ve_p = ve_p * ve_r + 0.5f;                                                                 \
        ve_p = ve_p * ve_r + 1.0f;                                                                 \
        ve_p = ve_p * ve_r + 1.0f;                                                                 \
        v8f ve_e = (v8f)((v8i)ve_p + (ve_ni << 23));                                               \
        out = SEL((v8i)((x) != (x)), (x), ve_e);                                                   \
    } while (0)

// z[i] = e^(z[i] - sub) for i < n, returning the sum of the results. Unaligned loads and
// stores go through memcpy (folded into plain vector moves).
#define VEXP_SUM_FN(name, attr)                                                                    \
    attr static double name(float *z, int64_t n, float sub) {                                      \
        double total = 0;                                                                          \
        v8f acc = {0, 0, 0, 0, 0, 0, 0, 0};                                                        \
        int64_t i = 0, since = 0;                                                                  \
        for (; i + LANES <= n; i += LANES) {                                                       \
            v8f x, e = SPLAT(0.0f);                                                                \
            memcpy(&x, z + i, sizeof x);                                                           \
            x = x - sub;                                                                           \
            VEXP_BODY(x, e);                                                                       \
            memcpy(z + i, &e, sizeof e);                                                           \
            acc += e;                                                                              \
            if (++since == FLUSH) {                                                                \
                for (int l = 0; l < LANES; l++)                                                    \
                    total += acc[l];                                                               \
                acc = (v8f){0, 0, 0, 0, 0, 0, 0, 0};                                               \
                since = 0;                                                                         \
            }                                                                                      \
        }                                                                                          \
        for (int l = 0; l < LANES; l++)                                                            \
            total += acc[l];                                                                       \
        if (i < n) { /* the tail through one padded vector */                                      \
            float buf[LANES] = {0};                                                                \
            memcpy(buf, z + i, (size_t)(n - i) * sizeof *buf);                                     \
            v8f x, e = SPLAT(0.0f);                                                                \
            memcpy(&x, buf, sizeof x);                                                             \
            x = x - sub;                                                                           \
            VEXP_BODY(x, e);                                                                       \
            memcpy(buf, &e, sizeof e);                                                             \
            memcpy(z + i, buf, (size_t)(n - i) * sizeof *buf);                                     \
            for (int64_t l = 0; l < n - i; l++)                                                    \
                total += buf[l];                                                                   \
        }                                                                                          \
        return total;                                                                              \
    }

VEXP_SUM_FN(vexp_sum_avx2, __attribute__((target("avx2,fma"))))
VEXP_SUM_FN(vexp_sum_base, )

static int have_avx2(void) {
    static int cached = -1; // benign race: every thread computes the same value
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached;
}

double K(vexp_sum)(real *z, int64_t n, real sub) {
    return have_avx2() ? vexp_sum_avx2(z, n, sub) : vexp_sum_base(z, n, sub);
}

double K(vexp_sum_generic)(real *z, int64_t n, real sub) { return vexp_sum_base(z, n, sub); }

#else // f64: libm

double K(vexp_sum)(real *z, int64_t n, real sub) {
    double total = 0;
    for (int64_t i = 0; i < n; i++) {
        z[i] = exp(z[i] - sub);
        total += z[i];
    }
    return total;
}

double K(vexp_sum_generic)(real *z, int64_t n, real sub) { return K(vexp_sum)(z, n, sub); }

#endif
