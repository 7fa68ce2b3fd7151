// tests/test_safetensors.c: the safetensors reader and writer: a write/read roundtrip, each
// header violation with its exact message, sharded indexes, float decoding (F16, BF16,
// FP8 E4M3/E5M2) against bit-level constructions written here, and a replay of the fuzz
// seed corpus plus a few hundred random mutations of a valid file.
#include "harness/harness.h"
#include "model/model.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[64];

static void make_tmpdir(void) {
    snprintf(tmpdir, sizeof tmpdir, "/tmp/molt_st_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
}

static void rm_tmpdir(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    ck_assert_int_eq(system(cmd), 0);
}

static char *tmp_path(char *buf, size_t cap, const char *name) {
    snprintf(buf, cap, "%s/%s", tmpdir, name);
    return buf;
}

// A file image: 8-byte little-endian length of `header`, header, then dlen data bytes
// (value i & 0xff). Caller frees.
static uint8_t *raw_file(const char *header, uint64_t hlen_field, size_t dlen, size_t *len) {
    size_t hl = strlen(header);
    *len = 8 + hl + dlen;
    uint8_t *b = malloc(*len);
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(hlen_field >> (8 * i));
    memcpy(b + 8, header, hl);
    for (size_t i = 0; i < dlen; i++)
        b[8 + hl + i] = (uint8_t)i;
    return b;
}

// Opening `header` + dlen data bytes must fail with exactly `want`.
static void expect_bad(const char *header, size_t dlen, const char *want) {
    size_t len;
    uint8_t *b = raw_file(header, strlen(header), dlen, &len);
    st_reader *r = (st_reader *)1;
    molt_status st = st_open_memory(b, len, "f.st", &r);
    ck_assert_msg(st == MOLT_EFORMAT, "%s: got %s", header, molt_status_name(st));
    ck_assert_ptr_null(r);
    ck_assert_str_eq(molt_err_msg(), want);
    free(b);
}

START_TEST(test_roundtrip) {
    make_tmpdir();
    float a[6] = {1, -2, 3.5f, 0, 1e-3f, -7};
    uint16_t bf[4] = {0x3f80, 0xc000, 0x0000, 0x7f80};
    int64_t i64 = -42;
    uint8_t f8[6] = {0x38, 0xb8, 0x01, 0x7e, 0x00, 0x40};
    st_tensor ts[5] = {
        {.name = "z.weight", .dtype = ST_F32, .ndim = 2, .shape = {2, 3}, .data = a},
        {.name = "b.bf", .dtype = ST_BF16, .ndim = 1, .shape = {4}, .data = bf},
        {.name = "scalar", .dtype = ST_I64, .ndim = 0, .data = &i64},
        {.name = "empty", .dtype = ST_F32, .ndim = 2, .shape = {0, 5}, .data = NULL},
        {.name = "f8", .dtype = ST_F8_E4M3, .ndim = 3, .shape = {3, 1, 2}, .data = f8},
    };
    st_meta meta[2] = {{"format", "pt"}, {"note", "x y"}};
    char p[128];
    ck_assert_ok(st_write(tmp_path(p, sizeof p, "m.safetensors"), ts, 5, meta, 2));
    // header length is a multiple of 8 and the header ends with padding or '}'
    FILE *f = fopen(p, "rb");
    uint8_t len8[8];
    ck_assert_int_eq(fread(len8, 1, 8, f), 8);
    fclose(f);
    ck_assert_int_eq(len8[0] % 8, 0);

    st_reader *r;
    ck_assert_ok(st_open(p, &r));
    ck_assert_int_eq(st_count(r), 5);
    ck_assert_int_eq(st_shard_count(r), 1);
    for (int i = 1; i < st_count(r); i++)
        ck_assert_int_lt(strcmp(st_at(r, i - 1)->name, st_at(r, i)->name), 0);
    for (int i = 0; i < 5; i++) {
        const st_tensor *t = st_find(r, ts[i].name);
        ck_assert_ptr_nonnull(t);
        ck_assert_int_eq(t->dtype, ts[i].dtype);
        ck_assert_int_eq(t->ndim, ts[i].ndim);
        int64_t n = 1;
        for (int d = 0; d < t->ndim; d++) {
            ck_assert_int_eq(t->shape[d], ts[i].shape[d]);
            n *= ts[i].shape[d];
        }
        ck_assert_int_eq(t->numel, n);
        ck_assert_uint_eq(t->nbytes, (size_t)n * st_dtype_size(ts[i].dtype));
        if (n)
            ck_assert_int_eq(memcmp(t->data, ts[i].data, t->nbytes), 0);
    }
    ck_assert_ptr_null(st_find(r, "nope"));
    ck_assert_ptr_null(st_at(r, 5));
    ck_assert_str_eq(st_metadata(r, "format"), "pt");
    ck_assert_str_eq(st_metadata(r, "note"), "x y");
    ck_assert_ptr_null(st_metadata(r, "other"));

    ag_arena ar;
    ag_arena_init(&ar, "t", 0);
    ag_tensor *x;
    ck_assert_ok(st_to_f32(st_find(r, "z.weight"), 1.0, &ar, &x));
    ck_assert_int_eq(x->ndim, 2);
    for (int i = 0; i < 6; i++)
        ck_assert_float_eq(((float *)x->data)[i], a[i]);
    double v;
    ck_assert_int_eq(st_read_scalar(st_find(r, "scalar"), &v), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(), "tensor 'scalar': expected one float element, got 1 of I64");
    ck_assert_int_eq(st_to_f32(st_find(r, "scalar"), 1.0, &ar, &x), MOLT_EUNSUPPORTED);
    ck_assert_str_eq(molt_err_msg(), "st_to_f32: tensor 'scalar' has dtype I64, not a float type");
    ck_assert_int_eq(st_to_f32(st_find(r, "empty"), 1.0, &ar, &x), MOLT_EUNSUPPORTED);
    ck_assert_str_eq(molt_err_msg(),
                     "st_to_f32: tensor 'empty' of shape [0, 5]: need 1 to 4 dims and elements");
    ag_arena_free(&ar);
    st_close(r);

    // writer argument errors
    st_tensor dup[2] = {ts[0], ts[0]};
    ck_assert_int_eq(st_write(p, dup, 2, NULL, 0), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(),
                     "st_write: tensor name 'z.weight' is missing, reserved or repeated");
    st_tensor nodata = {.name = "n", .dtype = ST_F32, .ndim = 1, .shape = {2}};
    ck_assert_int_eq(st_write(p, &nodata, 1, NULL, 0), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "st_write: tensor 'n': bad shape, missing data or bad name");
    rm_tmpdir();
}
END_TEST

START_TEST(test_open_errors) {
    st_reader *r;
    ck_assert_int_eq(st_open("/nonexistent/x.safetensors", &r), MOLT_EIO);
    ck_assert_str_eq(molt_err_msg(),
                     "/nonexistent/x.safetensors: cannot open: No such file or directory");
    uint8_t tiny[5] = {0};
    ck_assert_int_eq(st_open_memory(tiny, 5, "f.st", &r), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(),
                     "f.st: file is 5 bytes, too short for the 8-byte header length");
    size_t len;
    uint8_t *b = raw_file("{}", 100000001, 0, &len);
    ck_assert_int_eq(st_open_memory(b, len, "f.st", &r), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(),
                     "f.st: header length 100000001 exceeds the 100000000-byte limit");
    free(b);
    b = raw_file("{}", 50, 10, &len);
    ck_assert_int_eq(st_open_memory(b, len, "f.st", &r), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(),
                     "f.st: header length 50 runs past the end of the 20-byte file");
    free(b);
    // an empty header and no data is a valid (empty) file
    b = raw_file("{}      ", 8, 0, &len);
    ck_assert_ok(st_open_memory(b, len, "f.st", &r));
    ck_assert_int_eq(st_count(r), 0);
    st_close(r);
    free(b);
}
END_TEST

START_TEST(test_header_violations) {
    expect_bad(
        "{", 0,
        "f.st: header is not valid JSON: string or '}' expected near end of file (header byte 1)");
    expect_bad("[1]", 0, "f.st: header is not a JSON object");
    const char *e4 = "{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}";
    char h[512];
    snprintf(h, sizeof h, "{\"a\":%s,\"a\":%s}", e4, e4);
    expect_bad(
        h, 4, "f.st: header is not valid JSON: duplicate object key near '\"a\"' (header byte 57)");
    expect_bad("{\"a\":1}", 0, "f.st: tensor 'a': entry is not a JSON object");
    expect_bad("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
               "f.st: tensor 'a': dtype is missing or not a string");
    expect_bad("{\"a\":{\"dtype\":\"F7\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
               "f.st: tensor 'a': unknown dtype 'F7'");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":1,\"data_offsets\":[0,4]}}", 4,
               "f.st: tensor 'a': shape is missing or not an array");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4,
               "f.st: tensor 'a': shape[0] is not a non-negative integer");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1, 1.5],\"data_offsets\":[0,4]}}", 4,
               "f.st: tensor 'a': shape[1] is not a non-negative integer");
    expect_bad("{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
               "f.st: tensor 'a': shape has 9 dims, at most 8 supported");
    expect_bad(
        "{\"a\":{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,1]}}", 1,
        "f.st: tensor 'a': shape product overflows");
    const char *offs_msg =
        "f.st: tensor 'a': data_offsets must be [begin, end] with non-negative integers";
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, offs_msg);
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, offs_msg);
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":\"0,4\"}}", 4, offs_msg);
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}", 4,
               "f.st: tensor 'a': data_offsets [4, 0] out of range for 4 data bytes");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4,
               "f.st: tensor 'a': data_offsets [0, 8] out of range for 4 data bytes");
    expect_bad(
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 12,
        "f.st: tensor 'a': data_offsets [0, 12] span 12 bytes, expected 16 for shape [2, 2] F32");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
               12, "f.st: tensor 'b': data begins at byte 8 but tensor 'a' ends at 4 (gap)");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
               8, "f.st: tensor 'b': data begins at byte 4 but tensor 'a' ends at 8 (overlap)");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8,
               "f.st: tensor 'a': data begins at byte 4, not 0 (gap)");
    expect_bad("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 8,
               "f.st: tensors end at byte 4 of a 8-byte data section");
    expect_bad("{\"__metadata__\":[1]}", 0, "f.st: __metadata__ is not a JSON object");
    expect_bad("{\"__metadata__\":{\"k\":1}}", 0,
               "f.st: __metadata__ value of 'k' is not a string");
}
END_TEST

// Unaligned data (header length not a multiple of 8), tensors out of offset order.
START_TEST(test_unaligned_out_of_order) {
    const char *h = "{\"b\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[4,7]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    size_t len;
    uint8_t *buf = raw_file(h, strlen(h), 7, &len);
    float one = 1.5f;
    memcpy(buf + 8 + strlen(h), &one, 4);
    st_reader *r;
    ck_assert_ok(st_open_memory(buf, len, "f.st", &r));
    ck_assert_str_eq(st_at(r, 0)->name, "a");
    double v;
    ck_assert_ok(st_read_scalar(st_find(r, "a"), &v));
    ck_assert_double_eq(v, 1.5);
    ck_assert_int_eq(((const uint8_t *)st_find(r, "b")->data)[2], 6);
    st_close(r);
    free(buf);
}
END_TEST

// ---------------------------------------------------------------------------------------
// Sharded checkpoints

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

static void write_two_shards(void) {
    float a[2] = {1, 2}, b[3] = {3, 4, 5}, c[1] = {6};
    st_tensor s1[2] = {{.name = "a", .dtype = ST_F32, .ndim = 1, .shape = {2}, .data = a},
                       {.name = "b", .dtype = ST_F32, .ndim = 1, .shape = {3}, .data = b}};
    st_tensor s2[1] = {{.name = "c", .dtype = ST_F32, .ndim = 1, .shape = {1}, .data = c}};
    char p[128];
    ck_assert_ok(st_write(tmp_path(p, sizeof p, "m-1.safetensors"), s1, 2, NULL, 0));
    ck_assert_ok(st_write(tmp_path(p, sizeof p, "m-2.safetensors"), s2, 1, NULL, 0));
}

START_TEST(test_sharded_index) {
    make_tmpdir();
    write_two_shards();
    char idx[128], p[128], want[512];
    tmp_path(idx, sizeof idx, "model.safetensors.index.json");
    write_text(idx, "{\"metadata\":{\"total_size\":24},\"weight_map\":{\"a\":\"m-1.safetensors\","
                    "\"c\":\"m-2.safetensors\",\"b\":\"m-1.safetensors\"}}");
    st_reader *r;
    for (int pass = 0; pass < 2; pass++) {
        ck_assert_ok(st_open_index(pass ? idx : tmpdir, &r));
        ck_assert_int_eq(st_count(r), 3);
        ck_assert_int_eq(st_shard_count(r), 2);
        ck_assert_str_eq(st_at(r, 0)->name, "a");
        ck_assert_str_eq(st_at(r, 2)->name, "c");
        const st_tensor *c = st_find(r, "c");
        ck_assert_str_eq(st_shard_path(r, c->shard), tmp_path(p, sizeof p, "m-2.safetensors"));
        float v;
        memcpy(&v, c->data, 4);
        ck_assert_float_eq(v, 6);
        ck_assert_int_eq(st_find(r, "b")->shard, st_find(r, "a")->shard);
        st_close(r);
    }
    // "d" is mapped but absent; "b" is in shard 1 but not mapped
    write_text(idx, "{\"weight_map\":{\"a\":\"m-1.safetensors\",\"c\":\"m-2.safetensors\","
                    "\"d\":\"m-2.safetensors\"}}");
    ck_assert_int_eq(st_open_index(tmpdir, &r), MOLT_EFORMAT);
    ck_assert_ptr_null(r);
    snprintf(want, sizeof want,
             "%s: 1 mapped tensor(s) missing from their shard: 'd' (m-2.safetensors); 1 shard "
             "tensor(s) not in weight_map: 'b' (%s/m-1.safetensors)",
             idx, tmpdir);
    ck_assert_str_eq(molt_err_msg(), want);
    // "c" mapped to the wrong shard: missing there and unexpected where it is
    write_text(idx, "{\"weight_map\":{\"a\":\"m-1.safetensors\",\"b\":\"m-1.safetensors\","
                    "\"c\":\"m-1.safetensors\"}}");
    ck_assert_int_eq(st_open_index(idx, &r), MOLT_EFORMAT);
    ck_assert_ptr_nonnull(
        strstr(molt_err_msg(), "missing from their shard: 'c' (m-1.safetensors)"));
    write_text(idx, "{\"weight_map\":{\"a\":\"../m-1.safetensors\"}}");
    ck_assert_int_eq(st_open_index(idx, &r), MOLT_EFORMAT);
    snprintf(want, sizeof want,
             "%s: weight_map['a'] names shard '../m-1.safetensors' outside the checkpoint folder",
             idx);
    ck_assert_str_eq(molt_err_msg(), want);
    write_text(idx, "{\"weight_map\":{\"a\":\"m-3.safetensors\"}}");
    ck_assert_int_eq(st_open_index(idx, &r), MOLT_EIO);
    write_text(idx,
               "{\"metadata\":{\"total_size\":\"x\"},\"weight_map\":{\"a\":\"m-1.safetensors\"}}");
    ck_assert_int_eq(st_open_index(idx, &r), MOLT_EFORMAT);
    snprintf(want, sizeof want, "%s: metadata.total_size is not a non-negative integer", idx);
    ck_assert_str_eq(molt_err_msg(), want);
    write_text(idx, "{\"weight_map\":{}}");
    ck_assert_int_eq(st_open_index(idx, &r), MOLT_EFORMAT);
    snprintf(want, sizeof want, "%s: weight_map is missing, empty or not an object", idx);
    ck_assert_str_eq(molt_err_msg(), want);
    rm_tmpdir();
}
END_TEST

// Every allocation failure on the way to an open index is reported as MOLT_ENOMEM and
// leaks nothing (ASan checks); then the open succeeds.
START_TEST(test_alloc_failures) {
    make_tmpdir();
    write_two_shards();
    char idx[128];
    write_text(tmp_path(idx, sizeof idx, "model.safetensors.index.json"),
               "{\"weight_map\":{\"a\":\"m-1.safetensors\",\"b\":\"m-1.safetensors\","
               "\"c\":\"m-2.safetensors\"}}");
    int failures = 0;
    for (long k = 0;; k++) {
        st_reader *r = NULL;
        molt_alloc_fail_after(k);
        molt_status st = st_open_index(idx, &r);
        molt_alloc_fail_after(-1);
        if (st == MOLT_OK) {
            ck_assert_int_eq(st_count(r), 3);
            st_close(r);
            break;
        }
        ck_assert_msg(st == MOLT_ENOMEM, "k=%ld: %s", k, molt_err_msg());
        ck_assert_ptr_null(r);
        failures++;
    }
    ck_assert_int_ge(failures, 5);
    rm_tmpdir();
}
END_TEST

// A file shorter than the length field.
START_TEST(test_short_file) {
    make_tmpdir();
    char p[128], want[256];
    write_text(tmp_path(p, sizeof p, "short.safetensors"), "abc");
    st_reader *r;
    ck_assert_int_eq(st_open(p, &r), MOLT_EFORMAT);
    snprintf(want, sizeof want, "%s: file is 3 bytes, too short for the 8-byte header length", p);
    ck_assert_str_eq(molt_err_msg(), want);
    ck_assert_int_eq(st_open(tmpdir, &r), MOLT_EIO);
    rm_tmpdir();
}
END_TEST

// ---------------------------------------------------------------------------------------
// Float decoding, checked against floats assembled from their IEEE f32 bit fields

static float f32_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Value of a (sign, exponent, mantissa) format with `mb` mantissa bits and bias `bias`,
// built as f32 bits for normals and as m / 2^(mb + bias - 1) for subnormals.
static double expect_minifloat(unsigned s, unsigned e, unsigned m, int mb, int bias) {
    double v = e == 0 ? (double)m / ldexp(1.0, mb + bias - 1)
                      : f32_bits(((e - (unsigned)bias + 127u) << 23) | (m << (23 - mb)));
    return s ? -v : v;
}

START_TEST(test_decode_f16_all) {
    for (unsigned h = 0; h < 65536; h++) {
        unsigned s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
        float got = st_decode_f16((uint16_t)h);
        if (e == 31)
            ck_assert(m ? isnan(got) : (isinf(got) && (got < 0) == (s == 1)));
        else
            ck_assert_msg(got == (float)expect_minifloat(s, e, m, 10, 15), "f16 %04x", h);
    }
    ck_assert_float_eq(st_decode_f16(0x3c00), 1.0f);
    ck_assert_float_eq(st_decode_f16(0x7bff), 65504.0f);
    ck_assert_float_eq(st_decode_f16(0xc000), -2.0f);
}
END_TEST

START_TEST(test_decode_fp8_all) {
    double prev = -1;
    for (unsigned b = 0; b < 256; b++) {
        unsigned s = b >> 7;
        double got = st_decode_f8_e4m3((uint8_t)b);
        if ((b & 0x7f) == 0x7f) {
            ck_assert(isnan(got)); // S.1111.111 is the only NaN, there is no infinity
            continue;
        }
        ck_assert_msg(got == expect_minifloat(s, (b >> 3) & 15, b & 7, 3, 7), "e4m3 %02x", b);
        if (!s) { // positive codes increase strictly up to 448
            ck_assert(got > prev || b == 0);
            prev = got;
        }
        // E5M2 is the top byte of an F16
        double g5 = st_decode_f8_e5m2((uint8_t)b), h = st_decode_f16((uint16_t)(b << 8));
        ck_assert(isnan(g5) ? isnan(h) : g5 == h);
    }
    ck_assert_double_eq(st_decode_f8_e4m3(0x7e), 448.0);
    ck_assert_double_eq(st_decode_f8_e4m3(0x38), 1.0);
    ck_assert_double_eq(st_decode_f8_e4m3(0xbc), -1.5);
    ck_assert_double_eq(st_decode_f8_e4m3(0x01), 1.0 / 512);
    ck_assert(isnan(st_decode_f8_e4m3(0xff)));
    ck_assert(isinf(st_decode_f8_e5m2(0x7c)));
}
END_TEST

// st_to_f32 of F16 / BF16 / E4M3 tensors with a scale, from a written file.
START_TEST(test_convert_tensors) {
    make_tmpdir();
    uint16_t h[4] = {0x3c00, 0xb555, 0x0001, 0x7bff};
    uint16_t bf[4] = {0x3f80, 0xc0a0, 0x0001, 0x4049};
    uint8_t f8[6] = {0x38, 0xbc, 0x01, 0x7e, 0x80, 0x52};
    st_tensor ts[3] = {{.name = "h", .dtype = ST_F16, .ndim = 2, .shape = {2, 2}, .data = h},
                       {.name = "bf", .dtype = ST_BF16, .ndim = 1, .shape = {4}, .data = bf},
                       {.name = "f8", .dtype = ST_F8_E4M3, .ndim = 2, .shape = {2, 3}, .data = f8}};
    char p[128];
    ck_assert_ok(st_write(tmp_path(p, sizeof p, "c.safetensors"), ts, 3, NULL, 0));
    st_reader *r;
    ck_assert_ok(st_open(p, &r));
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_tensor *x;
    ck_assert_ok(st_to_f32(st_find(r, "h"), 2.0, &a, &x));
    for (int i = 0; i < 4; i++) {
        unsigned e = (h[i] >> 10) & 31, m = h[i] & 1023;
        ck_assert_float_eq(((float *)x->data)[i],
                           (float)(2.0 * expect_minifloat(h[i] >> 15, e, m, 10, 15)));
    }
    ck_assert_ok(st_to_f32(st_find(r, "bf"), 1.0, &a, &x));
    for (int i = 0; i < 4; i++)
        ck_assert_float_eq(((float *)x->data)[i], f32_bits((uint32_t)bf[i] << 16));
    const double s = 0.0123;
    ck_assert_ok(st_to_f32(st_find(r, "f8"), s, &a, &x));
    ck_assert_int_eq(x->shape[0], 2);
    ck_assert_int_eq(x->shape[1], 3);
    // 0x52 = 0.1010.010: (1 + 2/8) * 2^(10-7) = 10
    const double want[6] = {1, -1.5, 1.0 / 512, 448, -0.0, 10};
    for (int i = 0; i < 6; i++)
        ck_assert_float_eq(((float *)x->data)[i], (float)(want[i] * s));
    ag_arena_free(&a);
    st_close(r);
    rm_tmpdir();
}
END_TEST

// ---------------------------------------------------------------------------------------
// Robustness: the fuzz seed corpus and random mutations of a valid file

// Opens buf (copied to an exact-size allocation so any overread is caught by ASan) and
// checks either a clean failure or a reader whose tensors all lie inside the buffer.
static bool open_checked(const uint8_t *buf, size_t len) {
    uint8_t *copy = malloc(len ? len : 1);
    memcpy(copy, buf, len);
    st_reader *r = NULL;
    molt_status st = st_open_memory(copy, len, "m", &r);
    if (st != MOLT_OK) {
        ck_assert_int_eq(st, MOLT_EFORMAT);
        ck_assert_ptr_null(r);
        ck_assert_int_eq(strncmp(molt_err_msg(), "m: ", 3), 0);
    } else {
        for (int i = 0; i < st_count(r); i++) {
            const st_tensor *t = st_at(r, i);
            const uint8_t *d = t->data;
            ck_assert(d >= copy + 8 && d + t->nbytes <= copy + len);
            ck_assert_uint_eq(t->nbytes, (size_t)t->numel * st_dtype_size(t->dtype));
            ck_assert_ptr_eq(st_find(r, t->name), t);
        }
        st_close(r);
    }
    free(copy);
    return st == MOLT_OK;
}

static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

START_TEST(test_mutations) {
    make_tmpdir();
    float a[6] = {1, 2, 3, 4, 5, 6};
    uint16_t b[3] = {1, 2, 3};
    st_tensor ts[2] = {{.name = "a", .dtype = ST_F32, .ndim = 2, .shape = {2, 3}, .data = a},
                       {.name = "b", .dtype = ST_BF16, .ndim = 1, .shape = {3}, .data = b}};
    st_meta m = {"format", "pt"};
    char p[128];
    ck_assert_ok(st_write(tmp_path(p, sizeof p, "v.safetensors"), ts, 2, &m, 1));
    FILE *f = fopen(p, "rb");
    uint8_t valid[512];
    size_t n = fread(valid, 1, sizeof valid, f);
    fclose(f);
    rm_tmpdir();
    ck_assert(valid[0] > 0 && valid[1] == 0); // the mutations below assume a short header
    ck_assert(open_checked(valid, n));
    int opened = 0;
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    uint8_t buf[512];
    const char junk[] = "{}[]\",:0123456789-e. \\u\x00\xff";
    for (int it = 0; it < 600; it++) {
        memcpy(buf, valid, n);
        size_t len = n;
        uint64_t k = rng_next(&seed) % 4, r = rng_next(&seed);
        if (k == 0) // flip 1 to 4 bits
            for (uint64_t j = 0; j <= r % 4; j++)
                buf[rng_next(&seed) % len] ^= (uint8_t)(1u << (rng_next(&seed) % 8));
        else if (k == 1) // truncate
            len = (size_t)(r % len);
        else if (k == 2) { // lie about the header length
            uint64_t hl = valid[0] + (r % 64) - 32;
            if (r & 64)
                hl = r >> (r % 64);
            for (int i = 0; i < 8; i++)
                buf[i] = (uint8_t)(hl >> (8 * i));
        } else // overwrite header bytes with JSON punctuation
            for (uint64_t j = 0; j <= r % 3; j++)
                buf[8 + rng_next(&seed) % valid[0]] =
                    (uint8_t)junk[rng_next(&seed) % (sizeof junk - 1)];
        opened += open_checked(buf, len);
    }
    // both outcomes occur: flips in the data section keep the file valid
    ck_assert_int_gt(opened, 10);
    ck_assert_int_lt(opened, 500);
}
END_TEST

START_TEST(test_seed_corpus) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char dir[512];
    snprintf(dir, sizeof dir, "%s/tests/fuzz/corpus/fuzz_safetensors", src ? src : ".");
    DIR *d = opendir(dir);
    ck_assert_msg(d != NULL, "cannot open %s", dir);
    int files = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        FILE *f = fopen(p, "rb");
        ck_assert_ptr_nonnull(f);
        uint8_t buf[4096];
        size_t n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        open_checked(buf, n);
        files++;
    }
    closedir(d);
    ck_assert_int_ge(files, 4);
}
END_TEST

int main(void) {
    Suite *s = suite_create("safetensors");
    TCase *tc = tcase_create("st");
    tcase_add_test(tc, test_roundtrip);
    tcase_add_test(tc, test_open_errors);
    tcase_add_test(tc, test_header_violations);
    tcase_add_test(tc, test_unaligned_out_of_order);
    tcase_add_test(tc, test_sharded_index);
    tcase_add_test(tc, test_alloc_failures);
    tcase_add_test(tc, test_short_file);
    tcase_add_test(tc, test_decode_f16_all);
    tcase_add_test(tc, test_decode_fp8_all);
    tcase_add_test(tc, test_convert_tensors);
    tcase_add_test(tc, test_mutations);
    tcase_add_test(tc, test_seed_corpus);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
