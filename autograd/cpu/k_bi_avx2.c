// autograd/cpu/k_bi_avx2.c: the AVX2 + FMA copy of the f32 batch-invariant tile kernels
// (k_bi_tmpl.h): the 16 lanes are two ymm (lanes 0-7, 8-15), so the multiply-adds and the
// reduction tree are those of the AVX-512F copy and the results have the same bits. NF4
// indices are one dword broadcast and shifted per lane; the 16-entry table is two ymm, read
// by two vpermps and a blend on index bit 3. Built only in the f32 pass; chosen at run time
// by k_bi.c.
#include "real.h"

#if MOLT_REAL == 32

#include <immintrin.h>
#include <string.h>

// Every function below is compiled for AVX2 + FMA (GCC and clang spell it differently).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif

#include "k_bi_isa.h"

typedef struct {
    __m256 lo, hi; // lanes 0-7, 8-15
} V;

// A weight vector stays in registers for the rows of x that read it (k_bi_tmpl.h).
#define BI_KEEP(v) __asm__("" : "+x"((v).lo), "+x"((v).hi))

#define BI_MR 2
#define BI_NR 2
#define BI_QMR 2
#define BI_QNR_MAX 2
#define BI_QNR_OF(mr) 2
#define BI_TABLE bi_kernels_avx2

static inline V v_zero(void) { return (V){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V v_load(const float *p) { return (V){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline V v_loadn(const float *p, int n) {
    float t[16] = {0};
    memcpy(t, p, (size_t)n * sizeof *t);
    return v_load(t);
}
static inline void v_store(float *p, V v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
}
static inline V v_fma(V a, V b, V c) {
    return (V){_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
static inline V v_set1(float a) { return (V){_mm256_set1_ps(a), _mm256_set1_ps(a)}; }

static inline float v_hsum(V v) {
    __m256 a = _mm256_add_ps(v.lo, v.hi);
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

static inline __m256 bf16_8(const unsigned char *p) {
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
static inline V v_bf16(const unsigned char *p) { return (V){bf16_8(p), bf16_8(p + 16)}; }

static inline __m256 i8_8(const unsigned char *p, __m256 s) {
    __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(q), s);
}
static inline V v_i8(const unsigned char *p, float s) {
    __m256 sv = _mm256_set1_ps(s);
    return (V){i8_8(p, sv), i8_8(p + 8, sv)};
}

// As the AVX-512F copy (see there), 8 lanes.
static inline __m256 fp8_8(const unsigned char *p, __m256 s) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    __m256i mag = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
    __m256i nrm = _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23));
    __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(0x1p-9f));
    __m256 is_sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag));
    __m256 v = _mm256_blendv_ps(_mm256_castsi256_ps(nrm), sub, is_sub);
    __m256 is_nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f)));
    v = _mm256_blendv_ps(v, _mm256_set1_ps(__builtin_nanf("")), is_nan);
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
    v = _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(v), sign));
    return _mm256_mul_ps(v, s);
}
static inline V v_fp8(const unsigned char *p, float s) {
    __m256 sv = _mm256_set1_ps(s);
    return (V){fp8_8(p, sv), fp8_8(p + 8, sv)};
}

typedef struct {
    __m256 lo, hi; // entries 0-7, 8-15
} NL;

static inline NL nl_make(const float *code, float a) {
    __m256 av = _mm256_set1_ps(a);
    return (NL){_mm256_mul_ps(_mm256_loadu_ps(code), av),
                _mm256_mul_ps(_mm256_loadu_ps(code + 8), av)};
}

// 8 weights from the 4 bytes at p, weight 2i the high nibble of byte i.
static inline __m256 nf4_8(const unsigned char *p, NL lut) {
    int32_t d;
    memcpy(&d, p, 4);
    const __m256i sh = _mm256_set_epi32(24, 28, 16, 20, 8, 12, 0, 4);
    __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(d), sh);
    __m256 a = _mm256_permutevar8x32_ps(lut.lo, idx), b = _mm256_permutevar8x32_ps(lut.hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
static inline V v_nf4(const unsigned char *p, NL lut) { return (V){nf4_8(p, lut), nf4_8(p + 4, lut)}; }

#include "k_bi_tmpl.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif
