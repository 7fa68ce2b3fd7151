// infer/server/json_util.c: the server's small helpers: a byte buffer, OpenAI-style error
// bodies, request-body parsing with the position of a syntax error, typed optional fields
// that name themselves in a 400, and JSON strings of arbitrary bytes. Not here: any route.
#include "srv_internal.h"

#include <math.h>
#include <stdarg.h>
#include <string.h>

bool srv_buf_put(srv_buf *b, const void *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1)
            cap *= 2;
        char *p = molt_realloc(b->p, cap);
        if (!p)
            return false;
        b->p = p;
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return true;
}

bool srv_buf_puts(srv_buf *b, const char *s) { return srv_buf_put(b, s, strlen(s)); }

void srv_buf_free(srv_buf *b) {
    molt_free(b->p);
    memset(b, 0, sizeof *b);
}

bool srv_fail(srv_error *e, int status, const char *param, const char *fmt, ...) {
    e->status = status;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    return false;
}

const char *srv_status_type(int status) {
    switch (status) {
    case 400: return "BadRequestError";
    case 401: return "AuthenticationError";
    case 403: return "PermissionDeniedError";
    case 404: return "NotFoundError";
    case 405: return "MethodNotAllowedError";
    case 413: return "RequestTooLargeError";
    case 503: return "ServiceUnavailableError";
    default: return status >= 500 ? "InternalServerError" : "BadRequestError";
    }
}

json_t *srv_error_json(const srv_error *e) {
    json_t *msg = srv_jstr(e->msg, strlen(e->msg));
    return json_pack("{s:{s:o, s:s, s:o, s:i}}", "error", "message", msg ? msg : json_null(),
                     "type", srv_status_type(e->status), "param",
                     *e->param ? json_string(e->param) : json_null(), "code", e->status);
}

bool srv_json_parse(const char *p, size_t n, json_t **out, srv_error *e) {
    json_error_t je;
    *out = json_loadb(p ? p : "", n, JSON_REJECT_DUPLICATES, &je);
    if (*out)
        return true;
    return srv_fail(e, 400, NULL, "invalid JSON at line %d column %d (byte %d): %s", je.line,
                    je.column, je.position, je.text);
}

static bool absent(const json_t *v) { return !v || json_is_null(v); }

bool srv_get_bool(const json_t *o, const char *key, bool def, bool *out, srv_error *e) {
    const json_t *v = json_object_get(o, key);
    *out = def;
    if (absent(v))
        return true;
    if (!json_is_boolean(v))
        return srv_fail(e, 400, key, "field '%s' must be true or false", key);
    *out = json_is_true(v);
    return true;
}

bool srv_get_int(const json_t *o, const char *key, long long lo, long long hi, long long def,
                 long long *out, srv_error *e) {
    const json_t *v = json_object_get(o, key);
    *out = def;
    if (absent(v))
        return true;
    if (!json_is_integer(v))
        return srv_fail(e, 400, key, "field '%s' must be an integer", key);
    long long x = json_integer_value(v);
    if (x < lo || x > hi)
        return srv_fail(e, 400, key, "field '%s' must be in [%lld, %lld], got %lld", key, lo,
                        hi, x);
    *out = x;
    return true;
}

bool srv_get_num(const json_t *o, const char *key, double lo, double hi, double def,
                 double *out, srv_error *e) {
    const json_t *v = json_object_get(o, key);
    *out = def;
    if (absent(v))
        return true;
    if (!json_is_number(v))
        return srv_fail(e, 400, key, "field '%s' must be a number", key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return srv_fail(e, 400, key, "field '%s' must be in [%g, %g], got %g", key, lo, hi, x);
    *out = x;
    return true;
}

bool srv_get_str(const json_t *o, const char *key, const char **out, srv_error *e) {
    const json_t *v = json_object_get(o, key);
    *out = NULL;
    if (absent(v))
        return true;
    if (!json_is_string(v))
        return srv_fail(e, 400, key, "field '%s' must be a string", key);
    *out = json_string_value(v);
    return true;
}

// Length of the valid UTF-8 character at s[0..n) (strict), or 0.
static size_t utf8_char(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2, min = 0x80;
    else if (c >= 0xE0 && c <= 0xEF)
        len = 3, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4)
        len = 4, min = 0x10000;
    else
        return 0;
    if (len > n)
        return 0;
    unsigned cp = c & (0x7F >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return len;
}

json_t *srv_jstr(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t k = utf8_char(u + i, n - i);
        if (!k || !u[i])
            break;
        i += k;
    }
    if (i == n)
        return json_stringn(s, n);
    srv_buf b = {0};
    bool ok = srv_buf_put(&b, s, i);
    while (ok && i < n) {
        size_t k = u[i] ? utf8_char(u + i, n - i) : 1;
        if (!k || !u[i]) { // U+FFFD for an invalid byte; NUL kept as NUL
            ok = u[i] ? srv_buf_put(&b, "\xEF\xBF\xBD", 3) : srv_buf_put(&b, "", 1);
            i++;
        } else {
            ok = srv_buf_put(&b, s + i, k);
            i += k;
        }
    }
    json_t *j = ok ? json_stringn(b.p, b.n) : NULL;
    srv_buf_free(&b);
    return j;
}

size_t srv_utf8_chars(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t chars = 0;
    for (size_t i = 0; i < n; chars++) {
        size_t k = utf8_char(u + i, n - i);
        i += k ? k : 1;
    }
    return chars;
}

json_t *srv_jlp(double lp) {
    if (isnan(lp))
        return json_null();
    return json_real(lp < -9999.0 ? -9999.0 : lp);
}
