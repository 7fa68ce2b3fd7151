// autograd/quant.c: frozen quantized weights (ag_qweight): the formats' code tables,
// storage layout and lifecycle, encoding from F32, validation, and the kernels' view.
// Decoding lives in cpu/k_quant.c; the ops that use a qweight in ops_qlinear.c.
//
// NF4 reproduces bitsandbytes 0.50 on CPU bit for bit (quantize_4bit with nf4, blocksize 64,
// compress_statistics): per block of 64 values of the flattened weight, absmax = max |x|;
// x is scaled by the fp32 reciprocal of absmax (the last, partial block divides instead and
// stores its absmax raised to at least 1e-38), clamped to [-1, 1], and its code is the
// number of midpoints between consecutive NF4 codes that lie strictly below it (a value
// exactly on a midpoint takes the lower code). An odd count is padded with one 0.0 (code 7)
// in the low nibble of the last byte. Double quantization: offset = the fp32 mean of the
// absmax (summed in torch's order), absmax - offset quantized in blocks of 256 with the
// signed dynamic map through bitsandbytes' 65536-entry lookup table.
#include "quant_internal.h"
#include "backend.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const format_names[] = {"f32", "bf16", "int8", "fp8", "nf4"};
_Static_assert(sizeof format_names / sizeof *format_names == AG_Q_FORMAT_COUNT, "names");
_Static_assert(KQ_NF4 == (int)AG_Q_NF4 && KQ_FP8 == (int)AG_Q_FP8 && KQ_INT8 == (int)AG_Q_INT8,
               "kernel format ids follow ag_qformat");

const char *ag_qformat_name(ag_qformat f) {
    return (unsigned)f < AG_Q_FORMAT_COUNT ? format_names[f] : "?";
}

ag_qopts ag_qopts_default(void) {
    return (ag_qopts){.nf4_double_quant = true, .fp8_per_row = true};
}

// ---- code tables ---------------------------------------------------------------------------

// NF4 code values (SPECS.md section 6), increasing.
static const float nf4_code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

#define DYN_LUT_SIZE 65536

static struct {
    float nf4_mid[15];          // fp32 midpoints between consecutive NF4 codes
    float dyn[256];             // signed dynamic map
    unsigned char dyn_lut[DYN_LUT_SIZE]; // grid point of [-1, 1] -> nearest dynamic code
    float fp8[256];             // E4M3 byte -> value (NaN for 0x7f, 0xff)
} tables;
static pthread_once_t tables_once = PTHREAD_ONCE_INIT;

// torch.linspace(0.1, 1, n) in float32 as torch's CPU kernel computes it: step rounded to
// fp32, then start + i*step (first half) or end - (n-1-i)*step rounded once (the kernel is
// built with fused multiply-add; in double the product and sum are exact).
static float linspace_at(int n, int i) {
    float s = 0.1f, e = 1.0f, step = (e - s) / (float)(n - 1);
    if (i < n / 2)
        return (float)((double)s + (double)step * i);
    return (float)((double)e - (double)step * (n - 1 - i));
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

// bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for
// i = 0..6 the means of consecutive points of linspace(0.1, 1, 2^i + 1), times 10^(i-6)
// (the factor rounded to fp32 before the fp32 product), with both signs; then 0 and 1;
// sorted.
static void build_dynamic_map(float *map) {
    static const double pow10[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1};
    int m = 0;
    for (int i = 0; i < 7; i++) {
        int n = (1 << i) + 1;
        float f = (float)pow10[i];
        for (int j = 0; j + 1 < n; j++) {
            float mean = (linspace_at(n, j) + linspace_at(n, j + 1)) / 2.0f;
            map[m++] = f * mean;
            map[m++] = -(f * mean);
        }
    }
    map[m++] = 0.0f;
    map[m++] = 1.0f;
    MOLT_ASSERT(m == 256);
    qsort(map, 256, sizeof *map, cmp_float);
}

// The grid point i stands for -1 + 2i/65535; its entry is the first code whose upper
// midpoint is not below it.
static void build_dyn_lut(unsigned char *lut, const float *code) {
    float mid[255];
    for (int i = 0; i < 255; i++)
        mid[i] = 0.5f * (code[i] + code[i + 1]);
    int c = 0;
    for (int i = 0; i < DYN_LUT_SIZE; i++) {
        float v = -1.0f + (2.0f * (float)i) / (float)(DYN_LUT_SIZE - 1);
        while (c < 255 && mid[c] < v)
            c++;
        lut[i] = (unsigned char)c;
    }
}

// E4M3 (OCP FP8, "fn"): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities,
// S.1111.111 is NaN; subnormals m * 2^-9.
static float fp8_decode(unsigned b) {
    unsigned e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7)
        v = NAN;
    else if (e == 0)
        v = ldexpf((float)m, -9);
    else
        v = ldexpf((float)(8 + m), (int)e - 10);
    return (b & 0x80) ? -v : v;
}

static void build_tables(void) {
    for (int i = 0; i < 15; i++)
        tables.nf4_mid[i] = (nf4_code[i] + nf4_code[i + 1]) / 2.0f;
    build_dynamic_map(tables.dyn);
    build_dyn_lut(tables.dyn_lut, tables.dyn);
    for (unsigned b = 0; b < 256; b++)
        tables.fp8[b] = fp8_decode(b);
}

static void tables_init(void) { pthread_once(&tables_once, build_tables); }

const float *ag_dynamic_map(void) {
    tables_init();
    return tables.dyn;
}

// ---- torch-order float32 sum ---------------------------------------------------------------
// torch sums a contiguous float32 tensor (one thread, 8-lane AVX2 vectors) as: 4 interleaved
// vector accumulators fed through a 4-level cascade, leftover vectors into the first, the
// four combined, then a scalar accumulator takes the leftover elements and the 8 lanes.
// Fewer than 8 elements take the same cascade with scalar accumulators.

static int ceil_log2(int64_t x) {
    int r = 0;
    if (x <= 2)
        return 1;
    for (uint64_t v = (uint64_t)x - 1; v; v >>= 1)
        r++;
    return r;
}

// acc0[k][l] = cascade sum over groups i < size of x[(4i + k) W + l] (W lanes, 4 rows).
static void multi_row_sum(float acc0[4][8], const float *x, int64_t size, int W) {
    float acc[4][4][8] = {{{0}}};
    int lp = ceil_log2(size) / 4 < 4 ? 4 : ceil_log2(size) / 4;
    int64_t step = (int64_t)1 << lp, mask = step - 1, i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < W; l++)
                    acc[0][k][l] += x[(i * 4 + k) * W + l];
        for (int j = 1; j < 4; j++) {
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < W; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0;
                }
            if ((i & (mask << (j * lp))) != 0)
                break;
        }
    }
    for (; i < size; i++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < W; l++)
                acc[0][k][l] += x[(i * 4 + k) * W + l];
    for (int j = 1; j < 4; j++)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < W; l++)
                acc[0][k][l] += acc[j][k][l];
    memcpy(acc0, acc[0], sizeof acc[0]);
}

float ag_torch_style_sum_f32(const float *x, int64_t n) {
    float ps[4][8];
    int W = n >= 8 ? 8 : 1;
    int64_t nv = n / W, groups = nv / 4;
    multi_row_sum(ps, x, groups, W);
    for (int64_t i = groups * 4; i < nv; i++)
        for (int l = 0; l < W; l++)
            ps[0][l] += x[i * W + l];
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < W; l++)
            ps[0][l] += ps[k][l];
    if (W == 1)
        return ps[0][0];
    float acc = 0;
    for (int64_t i = nv * W; i < n; i++)
        acc += x[i];
    for (int l = 0; l < W; l++)
        acc += ps[0][l];
    return acc;
}

// ---- layout ---------------------------------------------------------------------------------

typedef struct {
    size_t data, scale, absmax_q, absmax_scale; // bytes of each piece (0 when unused)
} q_sizes;

static size_t elem_bytes(ag_qformat f) {
    return f == AG_Q_F32 ? 4 : f == AG_Q_BF16 ? 2 : 1;
}

static q_sizes sizes_of(const ag_qweight *q) {
    q_sizes s = {0, 0, 0, 0};
    if (q->format == AG_Q_NF4) {
        s.data = (size_t)((q->numel + 1) / 2);
        if (q->nf4_double_quant) {
            s.absmax_q = (size_t)q->n_blocks;
            s.absmax_scale = (size_t)q->n_blocks2 * sizeof(float);
        } else {
            s.scale = (size_t)q->n_blocks * sizeof(float);
        }
        return s;
    }
    s.data = (size_t)q->numel * elem_bytes(q->format);
    if (q->format == AG_Q_INT8 || (q->format == AG_Q_FP8 && q->fp8_per_row))
        s.scale = (size_t)(q->n_mat * q->rows) * sizeof(float);
    else if (q->format == AG_Q_FP8)
        s.scale = (size_t)q->n_mat * sizeof(float);
    return s;
}

static size_t round64(size_t b) { return (b + 63) & ~(size_t)63; }

#define NUMEL_MAX ((int64_t)1 << 48)

static molt_status check_shape_args(const char *op, ag_qformat format, int ndim,
                                    const int64_t *shape) {
    if ((unsigned)format >= AG_Q_FORMAT_COUNT)
        return molt_err(MOLT_EARG, "%s: unknown qweight format %d", op, (int)format);
    if (!shape || ndim < 2 || ndim > 3)
        return molt_err(MOLT_EARG, "%s: a qweight is [out, in] or [E, out, in], got %d dims",
                        op, shape ? ndim : 0);
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 1 || shape[i] > NUMEL_MAX || (n *= shape[i]) > NUMEL_MAX)
            return molt_err(MOLT_EARG, "%s: bad qweight dim %d = %lld (dims must be >= 1 and "
                            "the product at most 2^48)", op, i, (long long)shape[i]);
    }
    return MOLT_OK;
}

static void set_shape(ag_qweight *q, ag_qformat format, int ndim, const int64_t *shape,
                      const ag_qopts *o) {
    memset(q, 0, sizeof *q);
    q->format = format;
    q->ndim = ndim;
    memcpy(q->shape, shape, (size_t)ndim * sizeof *shape);
    q->n_mat = ndim == 3 ? shape[0] : 1;
    q->rows = shape[ndim - 2];
    q->cols = shape[ndim - 1];
    q->numel = q->n_mat * q->rows * q->cols;
    q->fp8_per_row = format == AG_Q_FP8 && o->fp8_per_row;
    q->nf4_double_quant = format == AG_Q_NF4 && o->nf4_double_quant;
    if (format == AG_Q_NF4) {
        q->n_blocks = (q->numel + AG_NF4_BLOCK - 1) / AG_NF4_BLOCK;
        if (q->nf4_double_quant)
            q->n_blocks2 = (q->n_blocks + AG_NF4_DQ_BLOCK - 1) / AG_NF4_DQ_BLOCK;
    }
}

molt_status ag_qweight_alloc(ag_qweight *q, ag_qformat format, int ndim, const int64_t *shape,
                             const ag_qopts *opts) {
    if (!q)
        return molt_err(MOLT_EARG, "qweight_alloc: q is NULL");
    memset(q, 0, sizeof *q);
    MOLT_TRY(check_shape_args("qweight_alloc", format, ndim, shape));
    ag_qopts o = opts ? *opts : ag_qopts_default();
    ag_qweight t;
    set_shape(&t, format, ndim, shape, &o);
    q_sizes s = sizes_of(&t);
    size_t total = round64(s.data) + round64(s.scale) + round64(s.absmax_q) + s.absmax_scale;
    unsigned char *mem = molt_calloc(1, total ? total : 1);
    if (!mem)
        return molt_err(MOLT_ENOMEM, "qweight_alloc: out of memory for %zu bytes of %s "
                        "storage", total, ag_qformat_name(format));
    t.mem = mem;
    t.data = mem;
    mem += round64(s.data);
    t.scale = s.scale ? (float *)mem : NULL;
    mem += round64(s.scale);
    t.absmax_q = s.absmax_q ? mem : NULL;
    mem += round64(s.absmax_q);
    t.absmax_scale = s.absmax_scale ? (float *)mem : NULL;
    t.bytes = s.data + s.scale + s.absmax_q + s.absmax_scale +
              (t.nf4_double_quant ? sizeof t.absmax_offset : 0);
    *q = t;
    return MOLT_OK;
}

size_t ag_qweight_storage_bytes(ag_qformat format, int ndim, const int64_t *shape,
                                const ag_qopts *opts) {
    if (check_shape_args("qweight_storage_bytes", format, ndim, shape) != MOLT_OK)
        return 0;
    ag_qopts o = opts ? *opts : ag_qopts_default();
    ag_qweight t;
    set_shape(&t, format, ndim, shape, &o);
    q_sizes s = sizes_of(&t);
    return round64(s.data) + round64(s.scale) + round64(s.absmax_q) + s.absmax_scale;
}

void ag_qweight_free(ag_qweight *q) {
    if (!q)
        return;
    molt_free(q->mem);
    memset(q, 0, sizeof *q);
}

double ag_qweight_bits_per_param(const ag_qweight *q) {
    return q && q->numel > 0 ? 8.0 * (double)q->bytes / (double)q->numel : 0.0;
}

const char *ag_qweight_str(const ag_qweight *q, char *buf, size_t cap) {
    if (!q) {
        snprintf(buf, cap, "(null)");
        return buf;
    }
    const char *fmt = ag_qformat_name(q->format);
    const char *var = q->format == AG_Q_NF4 ? (q->nf4_double_quant ? "+dq" : "")
                      : q->format == AG_Q_FP8 ? (q->fp8_per_row ? "/row" : "/tensor") : "";
    if (q->ndim == 3)
        snprintf(buf, cap, "[%lld, %lld, %lld] %s%s", (long long)q->shape[0],
                 (long long)q->shape[1], (long long)q->shape[2], fmt, var);
    else
        snprintf(buf, cap, "[%lld, %lld] %s%s", (long long)q->shape[0], (long long)q->shape[1],
                 fmt, var);
    return buf;
}

// ---- validation -----------------------------------------------------------------------------

static molt_status check_finite(const char *op, const char *what, const char *name,
                                const float *v, int64_t n, bool nonneg) {
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i]) || (nonneg && v[i] < 0))
            return molt_err(MOLT_EFORMAT, "%s: %s has %s[%lld] = %g; expected a finite%s "
                            "value", op, what, name, (long long)i, (double)v[i],
                            nonneg ? ", non-negative" : "");
    return MOLT_OK;
}

static molt_status check_struct(const char *op, const char *what, const ag_qweight *q) {
    if (!q)
        return molt_err(MOLT_EARG, "%s: %s is NULL", op, what);
    MOLT_TRY(check_shape_args(op, q->format, q->ndim, q->shape));
    ag_qweight t;
    ag_qopts o = {.nf4_double_quant = q->nf4_double_quant, .fp8_per_row = q->fp8_per_row};
    set_shape(&t, q->format, q->ndim, q->shape, &o);
    char b[96];
    if (t.n_mat != q->n_mat || t.rows != q->rows || t.cols != q->cols || t.numel != q->numel ||
        t.n_blocks != q->n_blocks || t.n_blocks2 != q->n_blocks2)
        return molt_err(MOLT_EFORMAT, "%s: %s %s has size fields that do not match its shape "
                        "(n_mat %lld, rows %lld, cols %lld, numel %lld, blocks %lld/%lld)", op,
                        what, ag_qweight_str(q, b, sizeof b), (long long)q->n_mat,
                        (long long)q->rows, (long long)q->cols, (long long)q->numel,
                        (long long)q->n_blocks, (long long)q->n_blocks2);
    q_sizes s = sizes_of(q);
    if (!q->data || (s.scale && !q->scale) || (s.absmax_q && !q->absmax_q) ||
        (s.absmax_scale && !q->absmax_scale))
        return molt_err(MOLT_EFORMAT, "%s: %s %s is missing part of its storage", op, what,
                        ag_qweight_str(q, b, sizeof b));
    return MOLT_OK;
}

molt_status ag_qweight_check_operand(const char *op, const char *what, const ag_qweight *q) {
    MOLT_TRY(check_struct(op, what, q));
    if (q->device != AG_CPU) // its values were checked on the host by ag_qweight_to
        return MOLT_OK;
    char b[96];
    const char *d = ag_qweight_str(q, b, sizeof b);
    switch (q->format) {
    case AG_Q_INT8:
        return check_finite(op, d, "scale", q->scale, q->n_mat * q->rows, true);
    case AG_Q_FP8:
        return check_finite(op, d, "scale", q->scale,
                            q->fp8_per_row ? q->n_mat * q->rows : q->n_mat, true);
    case AG_Q_NF4:
        if (!q->nf4_double_quant)
            return check_finite(op, d, "absmax", q->scale, q->n_blocks, true);
        MOLT_TRY(check_finite(op, d, "absmax_scale", q->absmax_scale, q->n_blocks2, true));
        return check_finite(op, d, "absmax_offset", &q->absmax_offset, 1, true);
    default:
        return MOLT_OK;
    }
}

static molt_status check_full(const char *op, const ag_qweight *q) {
    MOLT_TRY(ag_qweight_check_operand(op, "qweight", q));
    if (q->format != AG_Q_FP8)
        return MOLT_OK;
    const uint8_t *p = q->data;
    for (int64_t i = 0; i < q->numel; i++)
        if ((p[i] & 0x7f) == 0x7f) {
            char b[96];
            return molt_err(MOLT_EFORMAT, "%s: %s has the E4M3 NaN code 0x%02x at element %lld",
                            op, ag_qweight_str(q, b, sizeof b), p[i], (long long)i);
        }
    return MOLT_OK;
}

molt_status ag_qweight_check(const ag_qweight *q) {
    if (q && q->device != AG_CPU)
        return molt_err(MOLT_EARG, "qweight_check: the qweight lives on %s; check the host "
                        "copy", ag_device_name(q->device));
    return check_full("qweight_check", q);
}

// The storage lies in one block (ag_qweight_alloc's layout): the device copy keeps the
// offsets, so each pointer moves by the same amount.
molt_status ag_qweight_to(ag_qweight *dst, const ag_qweight *src, ag_arena *a) {
    const char *op = "qweight_to";
    if (!dst || !src || !a)
        return molt_err(MOLT_EARG, "%s: %s is NULL", op, !dst ? "dst" : !src ? "src" : "arena");
    memset(dst, 0, sizeof *dst);
    MOLT_TRY(ag_qweight_check(src));
    if (!src->mem)
        return molt_err(MOLT_EARG, "%s: the source has no storage block (not made by "
                        "ag_qweight_alloc)", op);
    q_sizes s = sizes_of(src);
    size_t total = round64(s.data) + round64(s.scale) + round64(s.absmax_q) + s.absmax_scale;
    unsigned char *mem = ag_arena_alloc(a, total ? total : 1);
    if (!mem)
        return molt_err_wrap(MOLT_ENOMEM, "%s", op);
    const ag_backend *be = ag_backend_get(op, a->device);
    if (!be)
        return MOLT_EDEVICE;
    molt_status st = be->from_host(mem, src->mem, total);
    if (st != MOLT_OK)
        return molt_err_wrap(st, "%s: copying %zu bytes to %s", op, total, be->name);
    *dst = *src;
    const unsigned char *base = src->mem;
    dst->mem = NULL;
    dst->device = a->device;
    dst->data = mem + ((const unsigned char *)src->data - base);
    dst->scale = src->scale ? (float *)(mem + ((const unsigned char *)src->scale - base)) : NULL;
    dst->absmax_q = src->absmax_q ? mem + (src->absmax_q - base) : NULL;
    dst->absmax_scale =
        src->absmax_scale ? (float *)(mem + ((const unsigned char *)src->absmax_scale - base))
                          : NULL;
    return MOLT_OK;
}

void ag_qweight_view(kq_weight *v, const ag_qweight *q) {
    tables_init();
    *v = (kq_weight){
        .format = (int)q->format, .n_mat = q->n_mat, .rows = q->rows, .cols = q->cols,
        .data = q->data, .scale = q->scale, .scale_per_row = q->fp8_per_row,
        .absmax_q = q->nf4_double_quant ? q->absmax_q : NULL,
        .absmax_scale = q->absmax_scale, .absmax_offset = q->absmax_offset,
        .nf4_code = nf4_code, .dyn_code = tables.dyn, .fp8_code = tables.fp8,
    };
}

// ---- encoding -----------------------------------------------------------------------------

// NF4 code of a scaled value: the count of midpoints strictly below it.
static unsigned nf4_encode(float s) {
    unsigned c = 0;
    while (c < 15 && tables.nf4_mid[c] < s)
        c++;
    return c;
}

static void nf4_put(uint8_t *p, int64_t i, unsigned c) {
    if (i & 1)
        p[i >> 1] |= (uint8_t)c;
    else
        p[i >> 1] = (uint8_t)(c << 4);
}

static float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

// Block b of x (numel values): absmax into *am, codes into the packed bytes.
static void nf4_encode_block(uint8_t *p, float *am, const float *x, int64_t numel, int64_t b) {
    int64_t i0 = b * AG_NF4_BLOCK, i1 = i0 + AG_NF4_BLOCK < numel ? i0 + AG_NF4_BLOCK : numel;
    float a = 0;
    for (int64_t i = i0; i < i1; i++)
        a = fabsf(x[i]) > a ? fabsf(x[i]) : a;
    bool partial = i1 - i0 < AG_NF4_BLOCK;
    float ac = a < 1e-38f ? 1e-38f : a, inv = 1.0f / ac;
    *am = partial ? ac : a;
    for (int64_t i = i0; i < i1; i++) {
        float s = partial ? x[i] / ac : x[i] * inv;
        nf4_put(p, i, nf4_encode(clampf(s, -1.0f, 1.0f)));
    }
    if (i1 == numel && (numel & 1))
        nf4_put(p, numel, nf4_encode(0.0f)); // the pad value
}

// Codes of (a - offset) per group of 256 through the dynamic map's lookup table, as
// bitsandbytes' CPU quantize_blockwise does: scale by the fp32 reciprocal of the group's
// absmax, clamp, map to the grid index truncate((v + 1) * 0.5 * 65535 + 0.5). A group whose
// absmax is 0 gets code 0 (and scale 0, so it decodes to the offset).
static void dq_encode_group(uint8_t *qa, float *s2, const float *a2, int64_t n, int64_t g) {
    int64_t i0 = g * AG_NF4_DQ_BLOCK, i1 = i0 + AG_NF4_DQ_BLOCK < n ? i0 + AG_NF4_DQ_BLOCK : n;
    float m = 0;
    for (int64_t i = i0; i < i1; i++)
        m = fabsf(a2[i]) > m ? fabsf(a2[i]) : m;
    s2[g] = m;
    float inv = 1.0f / m;
    for (int64_t i = i0; i < i1; i++) {
        if (m == 0) {
            qa[i] = 0;
            continue;
        }
        float v = clampf(a2[i] * inv, -1.0f, 1.0f);
        float t = (v + 1.0f) * 0.5f;
        t = t * (float)(DYN_LUT_SIZE - 1);
        t = t + 0.5f;
        qa[i] = tables.dyn_lut[(int)t];
    }
}

static molt_status nf4_quantize(ag_qweight *q, const float *x) {
    float *am = q->nf4_double_quant ? molt_malloc((size_t)q->n_blocks * sizeof *am) : q->scale;
    if (!am)
        return molt_err(MOLT_ENOMEM, "qweight_quantize: out of memory for %lld absmax values",
                        (long long)q->n_blocks);
    uint8_t *p = q->data;
    int64_t nb = q->n_blocks, numel = q->numel;
#pragma omp parallel for schedule(static) if (nb >= 4096)
    for (int64_t b = 0; b < nb; b++)
        nf4_encode_block(p, am + b, x, numel, b);
    if (!q->nf4_double_quant)
        return MOLT_OK;
    ag_nf4_dq_encode(am, nb, q->absmax_q, q->absmax_scale, &q->absmax_offset);
    molt_free(am);
    return MOLT_OK;
}

void ag_nf4_dq_encode(float *absmax, int64_t nb, uint8_t *codes, float *scales, float *offset) {
    tables_init();
    *offset = ag_torch_style_sum_f32(absmax, nb) / (float)nb;
    for (int64_t b = 0; b < nb; b++)
        absmax[b] -= *offset;
    int64_t ng = (nb + AG_NF4_DQ_BLOCK - 1) / AG_NF4_DQ_BLOCK;
    for (int64_t g = 0; g < ng; g++)
        dq_encode_group(codes, scales, absmax, nb, g);
}

// INT8: per row absmax a, scale a / 127, code round-half-even(x * (127 / a)).
static void int8_quantize(ag_qweight *q, const float *x) {
    int8_t *d = q->data;
    int64_t R = q->n_mat * q->rows, C = q->cols;
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * C;
        float a = 0;
        for (int64_t i = 0; i < C; i++)
            a = fabsf(xr[i]) > a ? fabsf(xr[i]) : a;
        q->scale[r] = a / 127.0f;
        float k = a > 0 ? 127.0f / a : 0.0f;
        for (int64_t i = 0; i < C; i++)
            d[r * C + i] = (int8_t)clampf(nearbyintf(xr[i] * k), -127.0f, 127.0f);
    }
}

// E4M3 byte of v rounded to nearest (ties to even), saturating at +-448.
static uint8_t fp8_encode(float v) {
    uint8_t sign = signbit(v) ? 0x80 : 0;
    float a = fabsf(v);
    if (a >= 448.0f)
        return sign | 0x7e;
    int e;
    frexpf(a, &e); // a = f 2^e, f in [0.5, 1): a in [2^(e-1), 2^e)
    int q_exp = e - 1 < -6 ? -9 : e - 1 - 3; // quantum 2^(e-1-3), subnormals 2^-9
    float n = nearbyintf(ldexpf(a, -q_exp));  // exact scaling, then ties-to-even
    float r = ldexpf(n, q_exp);
    if (r >= 448.0f)
        return sign | 0x7e;
    if (r < ldexpf(1.0f, -6))
        return sign | (uint8_t)n; // subnormal (0..7) or the smallest normal (8 = 0x08)
    int re;
    float fr = frexpf(r, &re); // r = fr 2^re, fr in [0.5, 1)
    unsigned mant = (unsigned)(fr * 16.0f) - 8u;
    return sign | (uint8_t)((unsigned)(re - 1 + 7) << 3) | (uint8_t)mant;
}

// FP8 from F32: scale = absmax / 448 per row (or per matrix), byte = E4M3(x / scale).
static void fp8_quantize(ag_qweight *q, const float *x) {
    uint8_t *d = q->data;
    int64_t span = q->fp8_per_row ? q->cols : q->rows * q->cols, groups = q->numel / span;
    for (int64_t g = 0; g < groups; g++) {
        const float *xg = x + g * span;
        float a = 0;
        for (int64_t i = 0; i < span; i++)
            a = fabsf(xg[i]) > a ? fabsf(xg[i]) : a;
        float s = a / 448.0f;
        q->scale[g] = s;
        for (int64_t i = 0; i < span; i++)
            d[g * span + i] = s > 0 ? fp8_encode(xg[i] / s) : 0;
    }
}

static molt_status check_source(const ag_tensor *w) {
    const char *op = "qweight_quantize";
    if (!w)
        return molt_err(MOLT_EARG, "%s: w is NULL", op);
    char b[80];
    if (w->dtype != AG_F32 || w->device != AG_CPU)
        return molt_err(MOLT_EARG, "%s: w is %s, expected f32 on the CPU", op,
                        ag_shape_str(w, b, sizeof b));
    if (w->ndim < 2 || w->ndim > 3)
        return molt_err(MOLT_EARG, "%s: w is %s, expected [out, in] or [E, out, in]", op,
                        ag_shape_str(w, b, sizeof b));
    const float *x = w->data;
    for (int64_t i = 0; i < w->numel; i++)
        if (!isfinite(x[i]))
            return molt_err(MOLT_EARG, "%s: w %s has a non-finite value (%g) at element %lld",
                            op, ag_shape_str(w, b, sizeof b), (double)x[i], (long long)i);
    return MOLT_OK;
}

molt_status ag_qweight_quantize(ag_qweight *q, const ag_tensor *w, ag_qformat format,
                                const ag_qopts *opts) {
    if (!q)
        return molt_err(MOLT_EARG, "qweight_quantize: q is NULL");
    memset(q, 0, sizeof *q);
    MOLT_TRY(check_source(w));
    MOLT_TRY(ag_qweight_alloc(q, format, w->ndim, w->shape, opts));
    tables_init();
    const float *x = w->data;
    molt_status st = MOLT_OK;
    switch (format) {
    case AG_Q_F32: memcpy(q->data, x, (size_t)q->numel * sizeof *x); break;
    case AG_Q_BF16:
        for (int64_t i = 0; i < q->numel; i++)
            ((uint16_t *)q->data)[i] = ag_f32_to_bf16(x[i]);
        break;
    case AG_Q_INT8: int8_quantize(q, x); break;
    case AG_Q_FP8: fp8_quantize(q, x); break;
    case AG_Q_NF4: st = nf4_quantize(q, x); break;
    default: st = molt_err(MOLT_EINTERNAL, "qweight_quantize: unhandled format");
    }
    if (st != MOLT_OK)
        ag_qweight_free(q);
    return st;
}

molt_status ag_qweight_from_fp8(ag_qweight *q, const uint8_t *e4m3, int ndim,
                                const int64_t *shape, const float *scales) {
    const char *op = "qweight_from_fp8";
    if (!q)
        return molt_err(MOLT_EARG, "%s: q is NULL", op);
    memset(q, 0, sizeof *q);
    if (!e4m3 || !scales)
        return molt_err(MOLT_EARG, "%s: %s is NULL", op, e4m3 ? "scales" : "e4m3");
    ag_qopts o = {.nf4_double_quant = false, .fp8_per_row = false};
    MOLT_TRY(ag_qweight_alloc(q, AG_Q_FP8, ndim, shape, &o));
    memcpy(q->data, e4m3, (size_t)q->numel);
    memcpy(q->scale, scales, (size_t)q->n_mat * sizeof *scales);
    molt_status st = check_full(op, q);
    if (st != MOLT_OK)
        ag_qweight_free(q);
    return st;
}

ag_tensor *ag_qweight_dequantize(ag_arena *a, const ag_qweight *q) {
    if (ag_qweight_check_operand("qweight_dequantize", "q", q) != MOLT_OK)
        return NULL;
    if (q->device != AG_CPU || a->device != AG_CPU) {
        molt_err(MOLT_EUNSUPPORTED, "qweight_dequantize: host qweights and arenas only");
        return NULL;
    }
    ag_tensor *t = ag_tensor_new(a, AG_F32, q->ndim, q->shape);
    if (!t)
        return NULL;
    kq_weight v;
    ag_qweight_view(&v, q);
    const int64_t chunk = (int64_t)1 << 16;
    int64_t n = q->numel, nc = (n + chunk - 1) / chunk;
    float *d = t->data;
#pragma omp parallel for schedule(static) if (nc >= 8)
    for (int64_t c = 0; c < nc; c++) {
        int64_t s = c * chunk, len = s + chunk < n ? chunk : n - s;
        kq_dequant_range_f32(d + s, &v, s, len);
    }
    return t;
}
