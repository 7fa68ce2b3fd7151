// data/ds_util.c: small pieces shared by the dataset files: growable buffers and examples,
// UTF-8 validation, Python-compatible JSON text, counter-based hashing, reason and format
// names. Not here: anything that reads files or knows a record format.
#include "ds_internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

// ---- buffers and examples ---------------------------------------------------------------

molt_status ds_buf_put(ds_buf *b, const void *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = molt_realloc(b->p, cap);
        if (!p)
            return molt_err(MOLT_ENOMEM, "out of memory growing a %zu-byte text buffer", cap);
        b->p = p;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return MOLT_OK;
}

molt_status ds_buf_puts(ds_buf *b, const char *s) { return ds_buf_put(b, s, strlen(s)); }

void ds_buf_free(ds_buf *b) {
    molt_free(b->p);
    *b = (ds_buf){0};
}

static molt_status example_reserve(ds_example *e, size_t n) {
    if (n <= e->cap)
        return MOLT_OK;
    size_t cap = e->cap ? e->cap : 256;
    while (cap < n)
        cap *= 2;
    int32_t *ids = molt_realloc(e->ids, cap * sizeof *ids);
    if (!ids)
        return molt_err(MOLT_ENOMEM, "out of memory growing an example to %zu tokens", cap);
    e->ids = ids;
    uint8_t *mask = molt_realloc(e->mask, cap);
    if (!mask)
        return molt_err(MOLT_ENOMEM, "out of memory growing an example to %zu tokens", cap);
    e->mask = mask;
    e->cap = cap;
    return MOLT_OK;
}

molt_status ds_example_push(ds_example *e, int32_t id, uint8_t mask) {
    MOLT_TRY(example_reserve(e, e->n + 1));
    e->ids[e->n] = id;
    e->mask[e->n++] = mask;
    return MOLT_OK;
}

molt_status ds_example_append(ds_example *e, const int32_t *ids, size_t n, uint8_t mask) {
    MOLT_TRY(example_reserve(e, e->n + n));
    memcpy(e->ids + e->n, ids, n * sizeof *ids);
    memset(e->mask + e->n, mask, n);
    e->n += n;
    return MOLT_OK;
}

void ds_example_clear(ds_example *e) { e->n = 0; }

void ds_example_free(ds_example *e) {
    molt_free(e->ids);
    molt_free(e->mask);
    *e = (ds_example){0};
}

size_t ds_example_trained(const ds_example *e) {
    size_t k = 0;
    for (size_t i = 0; i < e->n; i++)
        k += e->mask[i] != 0;
    return k;
}

// ---- UTF-8 ------------------------------------------------------------------------------

size_t ds_utf8_check(const char *s, size_t len) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        unsigned c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        unsigned lo = 0x80, hi = 0xBF; // allowed range of the first continuation byte
        if (c >= 0xC2 && c <= 0xDF)
            need = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0)
                lo = 0xA0; // no overlong 3-byte forms
            if (c == 0xED)
                hi = 0x9F; // no UTF-16 surrogates
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0)
                lo = 0x90; // no overlong 4-byte forms
            if (c == 0xF4)
                hi = 0x8F; // nothing past U+10FFFF
        } else
            return i;
        if (i + need >= len)
            return i; // sequence cut short by the end of the text
        if (p[i + 1] < lo || p[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= need; k++)
            if ((p[i + k] & 0xC0) != 0x80)
                return i;
        i += need + 1;
    }
    return len;
}

// ---- Python-compatible JSON -------------------------------------------------------------

static molt_status put_pystring(ds_buf *b, const char *s, size_t n) {
    MOLT_TRY(ds_buf_put(b, "\"", 1));
    size_t run = 0; // bytes copied verbatim in one go
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char u[8];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default:
            if (c < 0x20) {
                snprintf(u, sizeof u, "\\u%04x", c);
                esc = u;
            }
        }
        if (!esc)
            continue;
        MOLT_TRY(ds_buf_put(b, s + run, i - run));
        MOLT_TRY(ds_buf_puts(b, esc));
        run = i + 1;
    }
    MOLT_TRY(ds_buf_put(b, s + run, n - run));
    return ds_buf_put(b, "\"", 1);
}

// Python's repr(float): the shortest digit string that reads back to x, written in fixed
// notation when the decimal exponent is in [-4, 16), else as d.ddde+XX.
static molt_status put_pyfloat(ds_buf *b, double x) {
    char tmp[40], digits[24], out[64];
    if (x == 0)
        return ds_buf_puts(b, signbit(x) ? "-0.0" : "0.0");
    int p = 1;
    for (; p < 17; p++) {
        snprintf(tmp, sizeof tmp, "%.*e", p - 1, x);
        if (strtod(tmp, NULL) == x)
            break;
    }
    snprintf(tmp, sizeof tmp, "%.*e", p - 1, x);
    // tmp is [-]d[.ddd]e[+-]XX
    const char *q = tmp;
    int neg = *q == '-';
    q += neg;
    int nd = 0;
    for (; *q && *q != 'e'; q++)
        if (*q != '.')
            digits[nd++] = *q;
    while (nd > 1 && digits[nd - 1] == '0')
        nd--;
    digits[nd] = 0;
    int decpt = atoi(q + 1) + 1; // value = 0.<digits> * 10^decpt
    size_t k = 0;
    if (neg)
        out[k++] = '-';
    if (decpt <= -4 || decpt > 16) {
        out[k++] = digits[0];
        if (nd > 1) {
            out[k++] = '.';
            memcpy(out + k, digits + 1, (size_t)nd - 1);
            k += (size_t)nd - 1;
        }
        int e = decpt - 1;
        k += (size_t)snprintf(out + k, sizeof out - k, "e%c%02d", e < 0 ? '-' : '+', abs(e));
    } else if (decpt <= 0) {
        out[k++] = '0';
        out[k++] = '.';
        for (int i = 0; i < -decpt; i++)
            out[k++] = '0';
        memcpy(out + k, digits, (size_t)nd);
        k += (size_t)nd;
    } else if (decpt < nd) {
        memcpy(out + k, digits, (size_t)decpt);
        k += (size_t)decpt;
        out[k++] = '.';
        memcpy(out + k, digits + decpt, (size_t)(nd - decpt));
        k += (size_t)(nd - decpt);
    } else {
        memcpy(out + k, digits, (size_t)nd);
        k += (size_t)nd;
        for (int i = nd; i < decpt; i++)
            out[k++] = '0';
        out[k++] = '.';
        out[k++] = '0';
    }
    return ds_buf_put(b, out, k);
}

molt_status ds_pyjson_dump(const json_t *v, ds_buf *out) {
    char num[32];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        MOLT_TRY(ds_buf_put(out, "{", 1));
        const char *key;
        json_t *val;
        int first = 1;
        json_object_foreach((json_t *)v, key, val) {
            if (!first)
                MOLT_TRY(ds_buf_put(out, ", ", 2));
            first = 0;
            MOLT_TRY(put_pystring(out, key, strlen(key)));
            MOLT_TRY(ds_buf_put(out, ": ", 2));
            MOLT_TRY(ds_pyjson_dump(val, out));
        }
        return ds_buf_put(out, "}", 1);
    }
    case JSON_ARRAY: {
        MOLT_TRY(ds_buf_put(out, "[", 1));
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i)
                MOLT_TRY(ds_buf_put(out, ", ", 2));
            MOLT_TRY(ds_pyjson_dump(json_array_get(v, i), out));
        }
        return ds_buf_put(out, "]", 1);
    }
    case JSON_STRING:
        return put_pystring(out, json_string_value(v), json_string_length(v));
    case JSON_INTEGER:
        snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return ds_buf_puts(out, num);
    case JSON_REAL:
        return put_pyfloat(out, json_real_value(v));
    case JSON_TRUE:
        return ds_buf_puts(out, "true");
    case JSON_FALSE:
        return ds_buf_puts(out, "false");
    case JSON_NULL:
        return ds_buf_puts(out, "null");
    }
    return molt_err(MOLT_EINTERNAL, "pyjson: unknown JSON type %d", (int)json_typeof(v));
}

// ---- hashing ----------------------------------------------------------------------------

uint64_t ds_mix64(uint64_t a, uint64_t b) {
    // splitmix64 finalizer over a combination of both words
    uint64_t z = a * 0x9E3779B97F4A7C15ull ^ (b + 0xD1B54A32D192ED03ull + (a << 6) + (a >> 2));
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

double ds_unit(uint64_t h) { return (double)(h >> 11) * (1.0 / 9007199254740992.0); }

// ---- names ------------------------------------------------------------------------------

static const char *const bad_names[DS_BAD_COUNT] = {
    "invalid JSON",  "invalid UTF-8", "unknown format", "mixed format",
    "missing field", "empty field",   "invalid field",  "too long",
};

const char *ds_bad_reason_name(ds_bad_reason r) {
    return (unsigned)r < DS_BAD_COUNT ? bad_names[r] : "unknown reason";
}

static const char *const format_names[DS_FORMAT_COUNT] = {"auto", "chat", "alpaca",
                                                          "completion", "text"};

const char *ds_format_name(ds_format f) {
    return (unsigned)f < DS_FORMAT_COUNT ? format_names[f] : "unknown";
}

molt_status ds_format_parse(const char *s, ds_format *out) {
    for (int f = 0; f < DS_FORMAT_COUNT; f++)
        if (!strcmp(s, format_names[f])) {
            *out = (ds_format)f;
            return MOLT_OK;
        }
    return molt_err(MOLT_EARG, "unknown data format '%s' (expected auto, chat, alpaca, "
                               "completion or text)", s);
}

molt_status ds_input_parse(const char *arg, ds_input *in, char *buf, size_t cap) {
    const char *at = strrchr(arg, '@');
    size_t n = strlen(arg);
    in->weight = 1.0;
    struct stat sb;
    if (at && at != arg && stat(arg, &sb) != 0) {
        char *end;
        errno = 0;
        double w = strtod(at + 1, &end);
        bool number = at[1] && !*end && end != at + 1;
        if (number && !(isfinite(w) && w > 0 && errno == 0))
            return molt_err(MOLT_EARG, "data input '%s': mixing weight '%s' is not a number > 0",
                            arg, at + 1);
        if (number) {
            n = (size_t)(at - arg);
            in->weight = w;
        }
    }
    if (n == 0 || n >= cap)
        return molt_err(MOLT_EARG, "data input '%s': the path is empty or longer than %zu bytes",
                        arg, cap - 1);
    memcpy(buf, arg, n);
    buf[n] = 0;
    in->path = buf;
    return MOLT_OK;
}
