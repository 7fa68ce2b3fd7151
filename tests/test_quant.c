// tests/test_quant.c: the quantized weight formats (autograd/quant.c, cpu/k_quant.c):
// NF4 and its double quantization bit for bit against bitsandbytes (fixtures from
// tools/reference/nf4_parity.py), the dynamic map and torch's float32 summation order, FP8
// E4M3 encoding against torch and against a brute-force nearest-code search, INT8/FP8/BF16
// round-trip bounds derived from the formats, block-wise against element-wise decoding,
// storage bits per parameter, and the errors for bad or corrupt inputs.
#include "harness/harness.h"
#include "autograd/quant_internal.h"
#include "model/model.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static st_reader *ref;

static void open_fixture(void) {
    const char *root = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/fixtures/quant/quant_ref.safetensors",
             root ? root : ".");
    if (st_open(path, &ref) != MOLT_OK) {
        fprintf(stderr, "cannot open the quant fixture: %s\n", molt_err_msg());
        exit(1);
    }
}

static const st_tensor *fx(const char *name, const char *part, st_dtype dt) {
    char full[128];
    snprintf(full, sizeof full, "%s%s%s", name, part[0] ? "." : "", part);
    const st_tensor *t = st_find(ref, full);
    ck_assert_msg(t != NULL, "fixture tensor %s is missing", full);
    ck_assert_msg(t->dtype == dt, "fixture tensor %s is %s", full, st_dtype_name(t->dtype));
    return t;
}

static float f32_at(const st_tensor *t, int64_t i) {
    float v;
    memcpy(&v, (const char *)t->data + 4 * i, 4);
    return v;
}

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

// Fixture tensor `name`.x as an F32 ag_tensor in a.
static ag_tensor *fixture_x(ag_arena *a, const char *name) {
    const st_tensor *t = fx(name, "x", ST_F32);
    ag_tensor *x = NULL;
    ck_assert_ok(st_to_f32(t, 1.0, a, &x));
    return x;
}

static int64_t count_bytes_diff(const void *a, const void *b, size_t n, int64_t *first) {
    const unsigned char *p = a, *q = b;
    int64_t d = 0;
    *first = -1;
    for (size_t i = 0; i < n; i++)
        if (p[i] != q[i] && d++ == 0)
            *first = (int64_t)i;
    return d;
}

static void expect_bytes(const char *what, const void *got, const st_tensor *want, size_t n) {
    ck_assert_msg(want->nbytes == n, "%s: fixture has %zu bytes, molt %zu", what, want->nbytes, n);
    int64_t first;
    int64_t d = count_bytes_diff(got, want->data, n, &first);
    ck_assert_msg(d == 0, "%s: %lld of %zu bytes differ, first at %lld (molt 0x%02x, "
                  "bitsandbytes 0x%02x)", what, (long long)d, n, (long long)first,
                  first >= 0 ? ((const unsigned char *)got)[first] : 0,
                  first >= 0 ? ((const unsigned char *)want->data)[first] : 0);
}

// ---- NF4 parity -------------------------------------------------------------------------------

static const char *const cases[] = {"w64x64", "w96x200", "w33x7", "e3x5x100", "w128x512",
                                    "edge", "flat"};

START_TEST(test_nf4_double_quant_parity) {
    const char *name = cases[_i];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_tensor *x = fixture_x(&a, name);
    ag_qweight q;
    ck_assert_ok(ag_qweight_quantize(&q, x, AG_Q_NF4, NULL));
    ck_assert(q.nf4_double_quant);
    expect_bytes("packed", q.data, fx(name, "packed", ST_U8), (size_t)(q.numel + 1) / 2);
    expect_bytes("absmax codes", q.absmax_q, fx(name, "absmax_q", ST_U8), (size_t)q.n_blocks);
    expect_bytes("second-level scales", q.absmax_scale, fx(name, "absmax2", ST_F32),
                 (size_t)q.n_blocks2 * 4);
    float off = f32_at(fx(name, "offset", ST_F32), 0);
    ck_assert_msg(bits_of(q.absmax_offset) == bits_of(off), "offset %.9g vs %.9g",
                  (double)q.absmax_offset, (double)off);
    const st_tensor *deq = strcmp(name, "w128x512") ? fx(name, "deq", ST_F32) : NULL;
    if (deq) { // bitsandbytes' dequantization: the same fp32 operations, so the same bits
        ag_tensor *d = ag_qweight_dequantize(&a, &q);
        ck_assert_tensor(d);
        expect_bytes("dequantized", d->data, deq, (size_t)q.numel * 4);
    }
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_nf4_plain_parity) {
    const char *name = cases[_i];
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_tensor *x = fixture_x(&a, name);
    ag_qopts o = ag_qopts_default();
    o.nf4_double_quant = false;
    ag_qweight q;
    ck_assert_ok(ag_qweight_quantize(&q, x, AG_Q_NF4, &o));
    ck_assert(!q.nf4_double_quant && q.absmax_q == NULL);
    expect_bytes("packed", q.data, fx(name, "packed", ST_U8), (size_t)(q.numel + 1) / 2);
    expect_bytes("absmax", q.scale, fx(name, "absmax", ST_F32), (size_t)q.n_blocks * 4);
    if (strcmp(name, "w128x512")) {
        ag_tensor *d = ag_qweight_dequantize(&a, &q);
        ck_assert_tensor(d);
        expect_bytes("dequantized", d->data, fx(name, "deq_plain", ST_F32), (size_t)q.numel * 4);
    }
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_dynamic_map_parity) {
    const st_tensor *t = fx("dynamic_map", "", ST_F32);
    ck_assert_int_eq(t->numel, 256);
    expect_bytes("dynamic map", ag_dynamic_map(), t, 256 * 4);
}
END_TEST

START_TEST(test_torch_sum_order) {
    const st_tensor *x = fx("sum", "x", ST_F32), *len = fx("sum", "len", ST_I64);
    const st_tensor *val = fx("sum", "value", ST_F32);
    float *buf = molt_malloc(x->nbytes);
    ck_assert_ptr_nonnull(buf);
    memcpy(buf, x->data, x->nbytes);
    for (int64_t i = 0; i < len->numel; i++) {
        int64_t n;
        memcpy(&n, (const char *)len->data + 8 * i, 8);
        float got = ag_torch_style_sum_f32(buf, n), want = f32_at(val, i);
        ck_assert_msg(bits_of(got) == bits_of(want), "sum of %lld: %.9g vs torch %.9g",
                      (long long)n, (double)got, (double)want);
    }
    molt_free(buf);
}
END_TEST

// ---- NF4 storage and structure ------------------------------------------------------------

START_TEST(test_nf4_bits_per_param) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 5);
    ag_tensor *w = ag_tensor_new2(&a, AG_F32, 256, 1024);
    ag_fill_normal(w, &r, 0, 0.02);
    ag_qweight q;
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_NF4, NULL));
    // packed codes + one byte per 64 values + one float per 256 blocks + the offset
    size_t expect = 256 * 1024 / 2 + 256 * 1024 / 64 + 4 * (256 * 1024 / 64 / 256) + 4;
    ck_assert_uint_eq(q.bytes, expect);
    double bits = ag_qweight_bits_per_param(&q);
    ck_assert_msg(bits <= 4.13 && bits > 4.12, "nf4+dq: %.5f bits/param", bits);
    ag_qweight_free(&q);
    ag_qopts o = {.nf4_double_quant = false, .fp8_per_row = true};
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_NF4, &o));
    ck_assert_double_eq_tol(ag_qweight_bits_per_param(&q), 4.5, 1e-12);
    ag_qweight_free(&q);
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_INT8, NULL));
    ck_assert_double_eq_tol(ag_qweight_bits_per_param(&q), 8 + 32.0 / 1024, 1e-12);
    ag_qweight_free(&q);
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_BF16, NULL));
    ck_assert_double_eq_tol(ag_qweight_bits_per_param(&q), 16, 1e-12);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// The nibble of element i, read straight from the packing rule of SPECS.md section 6.
static int nibble(const ag_qweight *q, int64_t i) {
    uint8_t b = ((const uint8_t *)q->data)[i / 2];
    return i % 2 == 0 ? b >> 4 : b & 15;
}

// Without double quantization every code is the nearest NF4 value to x/absmax, and the pad
// nibble of an odd count is code 7 (0.0).
START_TEST(test_nf4_nearest_and_padding) {
    static const double code[16] = {
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 6);
    ag_tensor *w = ag_tensor_new2(&a, AG_F32, 13, 11); // 143 values: odd, partial block
    ag_fill_normal(w, &r, 0, 1);
    ag_qopts o = {.nf4_double_quant = false, .fp8_per_row = true};
    ag_qweight q;
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_NF4, &o));
    const float *x = w->data;
    for (int64_t i = 0; i < q.numel; i++) {
        double s = (double)x[i] / q.scale[i / 64], best = INFINITY;
        for (int c = 0; c < 16; c++)
            best = fmin(best, fabs(s - code[c]));
        double d = fabs(s - code[nibble(&q, i)]);
        ck_assert_msg(d <= best + 1e-6, "element %lld: code %d at distance %g, best %g",
                      (long long)i, nibble(&q, i), d, best);
    }
    ck_assert_int_eq(nibble(&q, 143), 7);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// ---- FP8 ---------------------------------------------------------------------------------

START_TEST(test_fp8_encode_matches_torch) {
    const st_tensor *xs = fx("fp8", "x", ST_F32), *codes = fx("fp8", "code", ST_U8);
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_tensor *x = NULL;
    ck_assert_ok(st_to_f32(xs, 1.0, &a, &x));
    int64_t shape[2] = {1, x->numel};
    ag_tensor *w = ag_tensor_new(&a, AG_F32, 2, shape);
    memcpy(w->data, x->data, (size_t)x->numel * 4);
    ag_qopts o = {.nf4_double_quant = true, .fp8_per_row = false};
    ag_qweight q;
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_FP8, &o));
    ck_assert_msg(q.scale[0] == 1.0f, "absmax 448 gives scale 1, got %g", (double)q.scale[0]);
    expect_bytes("fp8 codes", q.data, codes, (size_t)x->numel);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// Brute force: the nearest finite E4M3 value (ties: even code), independent of the encoder.
static uint8_t fp8_nearest(float v) {
    int best = -1;
    double bd = INFINITY;
    for (int b = 0; b < 256; b++) {
        double c = st_decode_f8_e4m3((uint8_t)b);
        bool same_sign = !signbit(c) == !signbit(v);
        if (isnan(c) || (!same_sign && c != 0))
            continue;
        double d = fabs((double)v - c);
        if (d < bd || (d == bd && b % 2 == 0 && same_sign)) {
            bd = d;
            best = b;
        }
    }
    return (uint8_t)best;
}

START_TEST(test_fp8_codes_round_trip) {
    kq_weight v;
    ag_qweight q;
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    // every finite code decodes like the model module's independent decoder
    int64_t shape[2] = {1, 256};
    uint8_t bytes[256];
    for (int b = 0; b < 256; b++)
        bytes[b] = (b & 0x7f) == 0x7f ? 0 : (uint8_t)b;
    float one = 1.0f;
    ck_assert_ok(ag_qweight_from_fp8(&q, bytes, 2, shape, &one));
    ag_qweight_view(&v, &q);
    for (int b = 0; b < 256; b++)
        ck_assert_double_eq((double)kq_elem_f32(&v, b), st_decode_f8_e4m3(bytes[b]));
    ag_qweight_free(&q);
    // random values: the encoder picks the brute-force nearest
    ag_rng r;
    ag_rng_seed(&r, 7);
    ag_tensor *w = ag_tensor_new2(&a, AG_F32, 1, 2001);
    float *x = w->data;
    for (int i = 0; i < 2000; i++)
        x[i] = (float)((ag_rng_uniform(&r) < 0.5 ? -1 : 1) * exp2(ag_rng_uniform(&r) * 19.5 - 11));
    x[2000] = 448.0f; // scale 1
    ag_qopts o = {.nf4_double_quant = true, .fp8_per_row = false};
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_FP8, &o));
    for (int i = 0; i < 2001; i++) {
        uint8_t got = ((const uint8_t *)q.data)[i], want = fp8_nearest(x[i]);
        ck_assert_msg(got == want, "fp8(%.9g) = 0x%02x, nearest is 0x%02x", (double)x[i], got,
                      want);
    }
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// Half the E4M3 spacing at |v| (in scaled units), the worst rounding error.
static double fp8_half_ulp(double v) {
    double av = fabs(v);
    if (av < ldexp(1, -6))
        return ldexp(1, -10);
    int e = (int)floor(log2(av));
    return ldexp(1, e - 4);
}

// ---- INT8 / FP8 / BF16 bounds --------------------------------------------------------------

START_TEST(test_round_trip_bounds) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 8);
    int64_t shape[3] = {2, 7, 45};
    ag_tensor *w = ag_tensor_new(&a, AG_F32, 3, shape);
    ag_fill_normal(w, &r, 0, 0.3);
    float *x = w->data;
    for (int64_t i = 0; i < 45; i++)
        x[3 * 45 + i] = 0; // an all-zero row
    ag_qweight q;
    // INT8: |w - q s| <= s/2 per element, plus the fp32 roundings of the scale and product
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_INT8, NULL));
    ag_tensor *d = ag_qweight_dequantize(&a, &q);
    ck_assert_tensor(d);
    for (int64_t i = 0; i < w->numel; i++) {
        double s = q.scale[i / 45], amax = 127 * s;
        double err = fabs((double)x[i] - ((float *)d->data)[i]);
        ck_assert_msg(err <= s / 2 + 8 * FLT_EPSILON * amax, "int8 elem %lld: err %g, s %g",
                      (long long)i, err, s);
    }
    ck_assert(q.scale[3] == 0);
    ag_qweight_free(&q);
    // FP8 per row: |w - fp8 s| <= s * half spacing at w/s (plus fp32 rounding of w/s)
    for (int per_row = 0; per_row < 2; per_row++) {
        ag_qopts o = {.nf4_double_quant = true, .fp8_per_row = per_row};
        ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_FP8, &o));
        d = ag_qweight_dequantize(&a, &q);
        ck_assert_tensor(d);
        for (int64_t i = 0; i < w->numel; i++) {
            double s = q.scale[per_row ? i / 45 : i / (7 * 45)];
            double err = fabs((double)x[i] - ((float *)d->data)[i]);
            double bound = s * fp8_half_ulp(s > 0 ? x[i] / s : 0) * (1 + 1e-6) +
                           4 * FLT_EPSILON * fabs(x[i]);
            ck_assert_msg(err <= bound, "fp8 (per_row %d) elem %lld: err %g > %g", per_row,
                          (long long)i, err, bound);
        }
        ag_qweight_free(&q);
    }
    // BF16 and F32: exactly the conversions
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_BF16, NULL));
    d = ag_qweight_dequantize(&a, &q);
    for (int64_t i = 0; i < w->numel; i++)
        ck_assert(((float *)d->data)[i] == ag_bf16_to_f32(ag_f32_to_bf16(x[i])));
    ag_qweight_free(&q);
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_F32, NULL));
    d = ag_qweight_dequantize(&a, &q);
    ck_assert_int_eq(memcmp(d->data, x, (size_t)w->numel * 4), 0);
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// ---- block-wise against element-wise decoding -------------------------------------------------

START_TEST(test_dequant_range_matches_elementwise) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 9 + (uint64_t)_i);
    int64_t shape[3] = {3, 9, 77}; // 2079 values: odd, blocks straddle rows and matrices
    ag_tensor *w = ag_tensor_new(&a, AG_F32, 3, shape);
    ag_fill_normal(w, &r, 0, 0.1);
    ag_qopts o = {.nf4_double_quant = _i != 5, .fp8_per_row = _i != 6};
    ag_qformat f = _i < 5 ? (ag_qformat)_i : _i == 5 ? AG_Q_NF4 : AG_Q_FP8;
    ag_qweight q;
    ck_assert_ok(ag_qweight_quantize(&q, w, f, &o));
    kq_weight v;
    ag_qweight_view(&v, &q);
    float buf[2100];
    double dbuf[2100];
    for (int trial = 0; trial < 200; trial++) {
        int64_t s = (int64_t)(ag_rng_uniform(&r) * (double)q.numel);
        int64_t n = 1 + (int64_t)(ag_rng_uniform(&r) * (double)(q.numel - s));
        kq_dequant_range_f32(buf, &v, s, n);
        kq_dequant_range_f64(dbuf, &v, s, n);
        for (int64_t i = 0; i < n; i++) {
            float e = kq_elem_f32(&v, s + i);
            ck_assert_msg(bits_of(buf[i]) == bits_of(e), "%s: range [%lld, +%lld) elem %lld: "
                          "%.9g vs %.9g", ag_qformat_name(f), (long long)s, (long long)n,
                          (long long)i, (double)buf[i], (double)e);
            ck_assert(dbuf[i] == (double)e && kq_elem_f64(&v, s + i) == (double)e);
        }
    }
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

// ---- errors ---------------------------------------------------------------------------------

START_TEST(test_quantize_errors) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_qweight q;
    ag_tensor *w1 = ag_tensor_new1(&a, AG_F32, 8);
    ck_assert_int_eq(ag_qweight_quantize(&q, w1, AG_Q_NF4, NULL), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(),
                     "qweight_quantize: w is [8] f32, expected [out, in] or [E, out, in]");
    ag_tensor *w64 = ag_tensor_new2(&a, AG_F64, 2, 3);
    ck_assert_int_eq(ag_qweight_quantize(&q, w64, AG_Q_NF4, NULL), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "qweight_quantize: w is [2, 3] f64, expected f32 on the CPU");
    ag_tensor *w = ag_tensor_new2(&a, AG_F32, 2, 3);
    ((float *)w->data)[4] = NAN;
    ck_assert_int_eq(ag_qweight_quantize(&q, w, AG_Q_INT8, NULL), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "qweight_quantize: w [2, 3] f32 has a non-finite value "
                                     "(nan) at element 4");
    ck_assert_ptr_null(q.mem);
    ((float *)w->data)[4] = 1;
    ck_assert_int_eq(ag_qweight_quantize(&q, w, (ag_qformat)9, NULL), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "qweight_alloc: unknown qweight format 9");
    ck_assert_int_eq(ag_qweight_quantize(&q, NULL, AG_Q_NF4, NULL), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "qweight_quantize: w is NULL");
    int64_t bad[2] = {4, 0};
    ck_assert_int_eq(ag_qweight_alloc(&q, AG_Q_NF4, 2, bad, NULL), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "qweight_alloc: bad qweight dim 1 = 0 (dims must be >= 1 "
                                     "and the product at most 2^48)");
    // allocation failure leaves nothing behind
    molt_alloc_fail_after(0);
    ck_assert_int_eq(ag_qweight_quantize(&q, w, AG_Q_NF4, NULL), MOLT_ENOMEM);
    molt_alloc_fail_after(-1);
    ck_assert_ptr_null(q.mem);
    ag_qweight_free(&q); // safe on the emptied struct
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_corrupt_qweights) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 10);
    ag_tensor *w = ag_tensor_new2(&a, AG_F32, 4, 130);
    ag_fill_normal(w, &r, 0, 1);
    ag_qweight q;
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_INT8, NULL));
    ck_assert_ok(ag_qweight_check(&q));
    q.scale[2] = NAN;
    ck_assert_int_eq(ag_qweight_check(&q), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(), "qweight_check: [4, 130] int8 has scale[2] = nan; expected "
                                     "a finite, non-negative value");
    ck_assert_ptr_null(ag_qweight_dequantize(&a, &q));
    ag_qweight_free(&q);
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_NF4, NULL));
    q.absmax_offset = INFINITY;
    ck_assert_int_eq(ag_qweight_check(&q), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(), "qweight_check: [4, 130] nf4+dq has absmax_offset[0] = inf; "
                                     "expected a finite, non-negative value");
    q.absmax_offset = 0;
    q.rows = 5;
    ck_assert_int_eq(ag_qweight_check(&q), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(), "qweight_check: qweight [4, 130] nf4+dq has size fields that "
                                     "do not match its shape (n_mat 1, rows 5, cols 130, numel "
                                     "520, blocks 9/1)");
    q.rows = 4;
    void *keep = q.absmax_scale;
    q.absmax_scale = NULL;
    ck_assert_int_eq(ag_qweight_check(&q), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(), "qweight_check: qweight [4, 130] nf4+dq is missing part of "
                                     "its storage");
    q.absmax_scale = keep;
    ck_assert_ok(ag_qweight_check(&q));
    ag_qweight_free(&q);
    ck_assert_int_eq(ag_qweight_check(NULL), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "qweight_check: qweight is NULL");
    // FP8 as loaded: NaN codes and NaN scales are refused
    int64_t shape[3] = {2, 2, 3};
    uint8_t bytes[12] = {0x38, 0x40, 0, 0x80, 1, 2, 3, 4, 5, 0xff, 7, 8};
    float scales[2] = {0.5f, 2.0f};
    ck_assert_int_eq(ag_qweight_from_fp8(&q, bytes, 3, shape, scales), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(), "qweight_from_fp8: [2, 2, 3] fp8/tensor has "
                                     "the E4M3 NaN code 0xff at element 9");
    ck_assert_ptr_null(q.mem);
    bytes[9] = 6;
    scales[1] = NAN;
    ck_assert_int_eq(ag_qweight_from_fp8(&q, bytes, 3, shape, scales), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(), "qweight_from_fp8: [2, 2, 3] fp8/tensor has "
                                     "scale[1] = nan; expected a finite, non-negative value");
    scales[1] = 2.0f;
    ck_assert_ok(ag_qweight_from_fp8(&q, bytes, 3, shape, scales));
    ck_assert_uint_eq(q.bytes, 12 + 8);
    ag_tensor *d = ag_qweight_dequantize(&a, &q);
    ck_assert_tensor(d);
    ck_assert_double_eq(ag_get(d, 0), 0.5);       // 0x38 = 1.0, times 0.5
    ck_assert_double_eq(ag_get(d, 1), 1.0);       // 0x40 = 2.0
    ck_assert_double_eq(ag_get(d, 6), 3 * 0.00390625); // 0x03 = 3 * 2^-9, scale 2
    ag_qweight_free(&q);
    ag_arena_free(&a);
}
END_TEST

int main(void) {
    open_fixture();
    Suite *s = suite_create("quant");
    TCase *tp = tcase_create("parity");
    int nc = (int)(sizeof cases / sizeof *cases);
    tcase_add_loop_test(tp, test_nf4_double_quant_parity, 0, nc);
    tcase_add_loop_test(tp, test_nf4_plain_parity, 0, nc);
    tcase_add_test(tp, test_dynamic_map_parity);
    tcase_add_test(tp, test_torch_sum_order);
    tcase_add_test(tp, test_fp8_encode_matches_torch);
    suite_add_tcase(s, tp);
    TCase *tf = tcase_create("formats");
    tcase_add_test(tf, test_nf4_bits_per_param);
    tcase_add_test(tf, test_nf4_nearest_and_padding);
    tcase_add_test(tf, test_fp8_codes_round_trip);
    tcase_add_test(tf, test_round_trip_bounds);
    tcase_add_loop_test(tf, test_dequant_range_matches_elementwise, 0, 7);
    tcase_add_test(tf, test_quantize_errors);
    tcase_add_test(tf, test_corrupt_qweights);
    suite_add_tcase(s, tf);
    int rc = harness_run(s);
    st_close(ref);
    return rc;
}
