// autograd/cpu/k_bi_base.c: the baseline copy of the f32 batch-invariant tile kernels
// (k_bi_tmpl.h) for processors without AVX2 + FMA: the 16 lanes are a GCC vector that the
// compiler splits over whatever registers the target has, products and sums rounded
// separately (so its bits differ from the FMA copies'), weights decoded lane by lane. Built
// only in the f32 pass.
#include "real.h"

#if MOLT_REAL == 32

#include <string.h>

#include "k_bi_isa.h"

// Passed only between static functions of this file, so GCC's note that a 64-byte vector is
// returned differently with and without AVX-512 concerns no real interface.
#pragma GCC diagnostic ignored "-Wpsabi"

typedef float V __attribute__((vector_size(64)));

#define BI_MR 2
#define BI_NR 4
#define BI_QMR 2
#define BI_QNR_MAX 2
#define BI_QNR_OF(mr) 2
#define BI_TABLE bi_kernels_base

static inline V v_zero(void) { return (V){0}; }
static inline V v_load(const float *p) {
    V v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline V v_loadn(const float *p, int n) {
    V v = {0};
    memcpy(&v, p, (size_t)n * sizeof(float));
    return v;
}
static inline void v_store(float *p, V v) { memcpy(p, &v, sizeof v); }
static inline V v_fma(V a, V b, V c) { return c + a * b; }

static inline float v_hsum(V v) {
    float a[16];
    memcpy(a, &v, sizeof a);
    for (int w = 8; w > 0; w /= 2)
        for (int j = 0; j < w; j++)
            a[j] += a[j + w];
    return a[0];
}

static inline V v_bf16(const unsigned char *p) {
    V v;
    for (int l = 0; l < 16; l++) {
        uint32_t u = (uint32_t)(p[2 * l] | p[2 * l + 1] << 8) << 16;
        memcpy((float *)&v + l, &u, sizeof u);
    }
    return v;
}

static inline V v_i8(const unsigned char *p, float s) {
    V v;
    for (int l = 0; l < 16; l++)
        v[l] = (float)(int8_t)p[l] * s;
    return v;
}

// The arithmetic of the AVX-512F copy, lane by lane (no table at hand here).
static inline V v_fp8(const unsigned char *p, float s) {
    V v;
    for (int l = 0; l < 16; l++) {
        uint32_t mag = p[l] & 0x7fu, u = (mag << 20) + (120u << 23);
        float f;
        memcpy(&f, &u, sizeof f);
        if (mag < 8)
            f = (float)mag * 0x1p-9f;
        else if (mag == 0x7f)
            f = __builtin_nanf("");
        memcpy(&u, &f, sizeof u);
        u |= (uint32_t)(p[l] & 0x80) << 24;
        memcpy(&f, &u, sizeof f);
        v[l] = f * s;
    }
    return v;
}

typedef V NL;

static inline NL nl_make(const float *code, float a) { return v_load(code) * a; }

static inline V v_nf4(const unsigned char *p, NL lut) {
    V v;
    for (int l = 0; l < 16; l += 2) {
        v[l] = lut[p[l / 2] >> 4];
        v[l + 1] = lut[p[l / 2] & 15];
    }
    return v;
}

#include "k_bi_tmpl.h"

#endif
