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

// The UTF-8 character at s[0..n): its length with *ok set, or, for an ill-formed sequence,
// the length of its maximal subpart (the longest prefix of a well-formed sequence, at least
// one byte; Unicode's "best practice" for U+FFFD substitution, which Python's
// decode(errors="replace") follows).
static size_t utf8_scan(const unsigned char *s, size_t n, bool *ok) {
    unsigned c = s[0];
    *ok = true;
    if (c < 0x80)
        return 1;
    size_t len;
    unsigned lo = 0x80, hi = 0xBF; // range of the second byte
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF)
        len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4)
        len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else {
        *ok = false;
        return 1;
    }
    for (size_t i = 1; i < len; i++) {
        unsigned b = i < n ? s[i] : 0;
        if (i >= n || b < (i == 1 ? lo : 0x80) || b > (i == 1 ? hi : 0xBF)) {
            *ok = false;
            return i;
        }
    }
    return len;
}

json_t *srv_jstr(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    bool ok = true;
    while (i < n && ok && u[i]) {
        size_t k = utf8_scan(u + i, n - i, &ok);
        if (ok)
            i += k;
    }
    if (i == n)
        return json_stringn(s, n);
    srv_buf b = {0};
    bool good = srv_buf_put(&b, s, i);
    while (good && i < n) {
        size_t k = u[i] ? utf8_scan(u + i, n - i, &ok) : 1;
        if (!u[i]) // NUL stays NUL
            good = srv_buf_put(&b, "", 1);
        else
            good = ok ? srv_buf_put(&b, s + i, k) : srv_buf_put(&b, "\xEF\xBF\xBD", 3);
        i += k;
    }
    json_t *j = good ? json_stringn(b.p, b.n) : NULL;
    srv_buf_free(&b);
    return j;
}

size_t srv_utf8_chars(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    size_t chars = 0;
    bool ok;
    for (size_t i = 0; i < n; chars++)
        i += utf8_scan(u + i, n - i, &ok);
    return chars;
}

json_t *srv_jlp(double lp) {
    if (isnan(lp))
        return json_null();
    return json_real(lp < -9999.0 ? -9999.0 : lp);
}
