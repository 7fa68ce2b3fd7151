// autograd/cpu/k_bi_avx512.h: the body of the AVX-512F copies of the f32 batch-invariant tile
// kernels (k_bi_tmpl.h), included by k_bi_avx512.c (AVX-512F) and k_bi_avx512vbmi.c (the
// same with AVX-512 VBMI's vpmultishiftqb cutting NF4 nibbles), which set the target and
// BI_VBMI first. One zmm holds the 16 lanes. NF4 codes become table indices in registers
// (the 8 bytes of 16 weights broadcast and shifted per lane) and values through one vpermps
// over the block's 16-entry table; FP8 E4M3 is decoded arithmetically (exponent rebias,
// subnormals m * 2^-9, the NaN code kept) to the values of the format's table. Both copies
// give the same values, so the same bits. The includer has <immintrin.h> and <string.h>.
#include "k_bi_isa.h"

typedef __m512 V;

// A weight vector read by up to 4 multiply-adds stays in a register: folded into each (as the
// compiler did for 3 rows of x) it took a load per multiply-add, and the 3-row tile, bound by
// its loads, ran slower than the 4-row one.
#define BI_KEEP(v) __asm__("" : "+v"(v))

#define BI_MR 4
#define BI_NR 6
// up to 4 rows of x against 4 weight rows, 5 to 8 rows against 2 (each decoded vector
// serves up to 8 rows)
#define BI_QMR 8
#define BI_QNR_MAX 4
#define BI_QNR_OF(mr) ((mr) <= 4 ? 4 : 2)
// vectors of output a weighted sum keeps in registers
#define BI_WS_V 8

static inline V v_zero(void) { return _mm512_setzero_ps(); }
static inline V v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline V v_loadn(const float *p, int n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
static inline void v_store(float *p, V v) { _mm512_storeu_ps(p, v); }
static inline V v_fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
static inline V v_set1(float a) { return _mm512_set1_ps(a); }

// Lanes l and l+8, then l and l+4, l and l+2, l and l+1.
static inline float v_hsum(V v) {
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)));
}

// v_hsum of a[0..16) into out[0..16), four levels of the tree on 16 sums at once: at each
// level pairs of vectors are regrouped by 128-bit quarters (then by lane pairs) so that one
// add does that level for several sums. Each sum sees the additions of v_hsum.
#define BI_HSUM16 1
static inline void v_hsum16(const V *a, float *out) {
    V r1[8], r2[4], r3[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) // l + (l+8): [a0 level 1 | a1 level 1]
        r1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xee));
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) // l + (l+4): quarters of 4 sums
        r2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r1[2 * i], r1[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(r1[2 * i], r1[2 * i + 1], 0xdd));
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++) // l + (l+2) within each quarter
        r3[i] = _mm512_add_ps(_mm512_shuffle_ps(r2[2 * i], r2[2 * i + 1], 0x44),
                              _mm512_shuffle_ps(r2[2 * i], r2[2 * i + 1], 0xee));
    V r4 = _mm512_add_ps(_mm512_shuffle_ps(r3[0], r3[1], 0x88),
                         _mm512_shuffle_ps(r3[0], r3[1], 0xdd)); // l + (l+1)
    float t[16];
    _mm512_storeu_ps(t, r4);
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) // lane 4q + r holds sum 4r + q
#pragma GCC unroll 4
        for (int r = 0; r < 4; r++)
            out[4 * r + q] = t[4 * q + r];
}

// v_hsum of a[0..8) into out[0..8), the same four levels on 8 sums (two per vector after the
// first level, four after the second, eight after the third).
#define BI_HSUM8 1
static inline void v_hsum8(const V *a, float *out) {
    V r1[4], r2[2];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) // l + (l+8)
        r1[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                              _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xee));
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++) // l + (l+4): quarter q of r2[i] is sum 4i + q
        r2[i] = _mm512_add_ps(_mm512_shuffle_f32x4(r1[2 * i], r1[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(r1[2 * i], r1[2 * i + 1], 0xdd));
    V r3 = _mm512_add_ps(_mm512_shuffle_ps(r2[0], r2[1], 0x44), // l + (l+2)
                         _mm512_shuffle_ps(r2[0], r2[1], 0xee));
    V r4 = _mm512_add_ps(r3, _mm512_movehdup_ps(r3)); // l + (l+1)
    float t[16];
    _mm512_storeu_ps(t, r4);
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) { // lane 4q holds sum q, lane 4q + 2 sum 4 + q
        out[q] = t[4 * q];
        out[4 + q] = t[4 * q + 2];
    }
}

// v_hsum of a[0..4) into out[0..4), the same four levels on 4 sums.
#define BI_HSUM4 1
static inline void v_hsum4(const V *a, float *out) {
    V r1a = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), // l + (l+8)
                          _mm512_shuffle_f32x4(a[0], a[1], 0xee));
    V r1b = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44),
                          _mm512_shuffle_f32x4(a[2], a[3], 0xee));
    V r2 = _mm512_add_ps(_mm512_shuffle_f32x4(r1a, r1b, 0x88), // l + (l+4): quarter q is sum q
                         _mm512_shuffle_f32x4(r1a, r1b, 0xdd));
    V r3 = _mm512_add_ps(r2, _mm512_shuffle_ps(r2, r2, 0xee)); // l + (l+2) in lanes 0, 1
    V r4 = _mm512_add_ps(r3, _mm512_movehdup_ps(r3));           // l + (l+1) in lane 0
    float t[16];
    _mm512_storeu_ps(t, r4);
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++)
        out[q] = t[4 * q];
}

static inline V v_bf16(const unsigned char *p) {
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

static inline V v_i8(const unsigned char *p, float s) {
    __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(s));
}

// E4M3: |b| = e.mmm; e > 0: 2^(e-7) (1 + m/8), i.e. the bits shifted under a float exponent
// rebiased by 120; e = 0: m * 2^-9; 0x7f: NaN; then the sign bit.
static inline V v_fp8(const unsigned char *p, float s) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
    __m512i nrm = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23));
    V sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(0x1p-9f));
    V v = _mm512_mask_blend_ps(_mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8)),
                               _mm512_castsi512_ps(nrm), sub);
    v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f)),
                           _mm512_set1_ps(__builtin_nanf("")));
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
    v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
    return _mm512_mul_ps(v, _mm512_set1_ps(s));
}

typedef __m512 NL;

static inline NL nl_make(const float *code, float a) {
    return _mm512_mul_ps(_mm512_loadu_ps(code), _mm512_set1_ps(a));
}

#if BI_VBMI
// Weight 2i is the high nibble of byte i, weight 2i+1 the low one. With the 8 bytes in every
// qword lane, vpmultishiftqb puts the byte starting at bit 8m+4 (weight 2m) in dword 2m and
// the byte starting at bit 8m (weight 2m+1) in dword 2m+1 of lane m; vpermps reads only the
// low 4 bits of each index.
static inline V v_nf4(const unsigned char *p, NL lut) {
    int64_t q;
    memcpy(&q, p, 8);
    const __m512i ctl = _mm512_set_epi64(0x380000003cLL, 0x3000000034LL, 0x280000002cLL,
                                         0x2000000024LL, 0x180000001cLL, 0x1000000014LL,
                                         0x080000000cLL, 0x0000000004LL);
    return _mm512_permutexvar_ps(_mm512_multishift_epi64_epi8(ctl, _mm512_set1_epi64(q)), lut);
}
#else
// Weights 0-7 come from bytes 0-3 and 8-15 from bytes 4-7; weight 2i is the high nibble of
// its byte. vpermps reads only the low 4 bits of each index.
static inline V v_nf4(const unsigned char *p, NL lut) {
    int32_t lo, hi;
    memcpy(&lo, p, 4);
    memcpy(&hi, p + 4, 4);
    __m512i d = _mm512_mask_set1_epi32(_mm512_set1_epi32(lo), 0xff00, hi);
    const __m512i sh = _mm512_set_epi32(24, 28, 16, 20, 8, 12, 0, 4, 24, 28, 16, 20, 8, 12, 0, 4);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(d, sh), lut);
}
#endif

#include "k_bi_tmpl.h"
