// autograd/cpu/k_bi_base.c: the baseline copy of the f32 batch-invariant tile kernels
// (k_bi_tmpl.h) for processors without AVX2 + FMA: the 16 lanes are an array that the
// compiler vectorizes for whatever the target has, products and sums rounded separately (so
// its bits differ from the FMA copies'), weights decoded lane by lane. Built only in the
// f32 pass.
#include "real.h"

#if MOLT_REAL == 32

#include <string.h>

#include "k_bi_isa.h"

typedef struct {
    float l[16];
} V;

#define BI_MR 2
#define BI_NR 4
#define BI_QMR 2
#define BI_QNR_MAX 2
#define BI_QNR_OF(mr) 2
#define BI_TABLE bi_kernels_base

static inline V v_zero(void) { return (V){{0}}; }
static inline V v_load(const float *p) {
    V v;
    memcpy(v.l, p, sizeof v.l);
    return v;
}
static inline V v_loadn(const float *p, int n) {
    V v = {{0}};
    memcpy(v.l, p, (size_t)n * sizeof(float));
    return v;
}
static inline void v_store(float *p, V v) { memcpy(p, v.l, sizeof v.l); }
static inline V v_set1(float a) {
    V v;
    for (int l = 0; l < 16; l++)
        v.l[l] = a;
    return v;
}
static inline V v_fma(V a, V b, V c) {
    for (int l = 0; l < 16; l++)
        c.l[l] += a.l[l] * b.l[l];
    return c;
}

static inline float v_hsum(V v) {
    for (int w = 8; w > 0; w /= 2)
        for (int j = 0; j < w; j++)
            v.l[j] += v.l[j + w];
    return v.l[0];
}

static inline V v_bf16(const unsigned char *p) {
    V v;
    for (int l = 0; l < 16; l++) {
        uint32_t u = (uint32_t)(p[2 * l] | p[2 * l + 1] << 8) << 16;
        memcpy(&v.l[l], &u, sizeof u);
    }
    return v;
}

static inline V v_i8(const unsigned char *p, float s) {
    V v;
    for (int l = 0; l < 16; l++)
        v.l[l] = (float)(int8_t)p[l] * s;
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
        v.l[l] = f * s;
    }
    return v;
}

typedef V NL;

static inline NL nl_make(const float *code, float a) {
    NL t;
    for (int j = 0; j < 16; j++)
        t.l[j] = code[j] * a;
    return t;
}

static inline V v_nf4(const unsigned char *p, NL lut) {
    V v;
    for (int l = 0; l < 16; l += 2) {
        v.l[l] = lut.l[p[l / 2] >> 4];
        v.l[l + 1] = lut.l[p[l / 2] & 15];
    }
    return v;
}

#include "k_bi_tmpl.h"

#endif
