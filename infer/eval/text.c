// infer/eval/text.c: the growable string the report writers build their files in, the
// escaping for XML/HTML and Markdown (with invalid UTF-8 replaced, since model output may
// hold any bytes), number formatting for tables, and atomic file writes.
//
// Not here: what goes into the files (report.c, html.c, svg.c).
#include "internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

void ev_sb_init(ev_sb *b) { memset(b, 0, sizeof *b); }

void ev_sb_free(ev_sb *b) {
    molt_free(b->s);
    memset(b, 0, sizeof *b);
}

// Room for n more bytes and the NUL; false (oom set) when it cannot be had.
static bool sb_reserve(ev_sb *b, size_t n) {
    if (b->oom)
        return false;
    if (b->len + n + 1 <= b->cap)
        return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n + 1)
        cap *= 2;
    char *s = molt_realloc(b->s, cap);
    if (!s) {
        b->oom = true;
        return false;
    }
    b->s = s;
    b->cap = cap;
    return true;
}

void ev_sb_put(ev_sb *b, const char *s, size_t n) {
    if (!sb_reserve(b, n))
        return;
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = 0;
}

void ev_sb_puts(ev_sb *b, const char *s) { ev_sb_put(b, s, strlen(s)); }

void ev_sb_printf(ev_sb *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !sb_reserve(b, (size_t)n))
        return;
    va_start(ap, fmt);
    vsnprintf(b->s + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

molt_status ev_sb_status(const ev_sb *b, const char *what) {
    return b->oom ? molt_err(MOLT_ENOMEM, "out of memory building %s", what) : MOLT_OK;
}

// Length of the valid UTF-8 sequence at s (1..4), or 0 when the bytes there are not one
// (overlong forms, surrogates and code points above U+10FFFF are invalid). *cp gets the
// code point.
static int utf8_seq(const unsigned char *s, unsigned *cp) {
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    int n = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
    if (n == 0 || c > 0xF4)
        return 0;
    unsigned v = c & (0x7F >> n);
    for (int i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        v = v << 6 | (s[i] & 0x3F);
    }
    static const unsigned min[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (v < min[n] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        return 0;
    *cp = v;
    return n;
}

static const char replacement[] = "\xEF\xBF\xBD"; // U+FFFD

void ev_sb_xml(ev_sb *b, const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned cp;
        int n = utf8_seq(p, &cp);
        const char *rep = NULL;
        if (n == 0 || (cp < 0x20 && cp != '\t' && cp != '\n' && cp != '\r') ||
            cp == 0xFFFE || cp == 0xFFFF) {
            rep = replacement;
            n = n ? n : 1;
        } else if (cp == '&')
            rep = "&amp;";
        else if (cp == '<')
            rep = "&lt;";
        else if (cp == '>')
            rep = "&gt;";
        else if (cp == '"')
            rep = "&quot;";
        else if (cp == '\'')
            rep = "&#39;";
        if (rep)
            ev_sb_puts(b, rep);
        else
            ev_sb_put(b, (const char *)p, (size_t)n);
        p += n;
    }
}

void ev_sb_md(ev_sb *b, const char *s) {
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned cp;
        int n = utf8_seq(p, &cp);
        const char *rep = NULL;
        if (n == 0) {
            rep = replacement;
            n = 1;
        } else if (cp == '|')
            rep = "\\|";
        else if (cp == '\\')
            rep = "\\\\";
        else if (cp == '&')
            rep = "&amp;";
        else if (cp == '<')
            rep = "&lt;";
        else if (cp == '>')
            rep = "&gt;";
        else if (cp == '\n' || cp == '\r' || cp == '\t')
            rep = " ";
        if (rep)
            ev_sb_puts(b, rep);
        else
            ev_sb_put(b, (const char *)p, (size_t)n);
        p += n;
    }
}

char *ev_utf8_clean(const char *s) {
    ev_sb b;
    ev_sb_init(&b);
    const unsigned char *p = (const unsigned char *)s;
    ev_sb_put(&b, "", 0);
    while (*p) {
        unsigned cp;
        int n = utf8_seq(p, &cp);
        if (n == 0) {
            ev_sb_puts(&b, replacement);
            p++;
        } else {
            ev_sb_put(&b, (const char *)p, (size_t)n);
            p += n;
        }
    }
    if (b.oom) {
        ev_sb_free(&b);
        return NULL;
    }
    return b.s;
}

char *ev_path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = molt_malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

molt_status ev_write_file(const char *path, const char *data, size_t n) {
    size_t len = strlen(path) + sizeof ".tmp";
    char *tmp = molt_malloc(len);
    if (!tmp)
        return molt_err(MOLT_ENOMEM, "out of memory writing %s", path);
    snprintf(tmp, len, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    molt_status st = MOLT_OK;
    if (!f)
        st = molt_err(MOLT_EIO, "cannot create %s: %s", tmp, strerror(errno));
    else {
        bool ok = fwrite(data, 1, n, f) == n;
        ok = (fclose(f) == 0) && ok;
        if (!ok)
            st = molt_err(MOLT_EIO, "cannot write %s: %s", tmp, strerror(errno));
        else if (rename(tmp, path) != 0)
            st = molt_err(MOLT_EIO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        if (st != MOLT_OK)
            remove(tmp);
    }
    molt_free(tmp);
    return st;
}

void ev_fmt_num(char *buf, size_t cap, double v, bool sign) {
    if (isnan(v)) {
        snprintf(buf, cap, "nan");
        return;
    }
    double a = fabs(v);
    if (a == 0 || (a >= 1e-3 && a < 1e6))
        snprintf(buf, cap, sign ? "%+.4f" : "%.4f", v);
    else
        snprintf(buf, cap, sign ? "%+.3e" : "%.3e", v);
}

void ev_fmt_p(char *buf, size_t cap, double p) {
    if (isnan(p))
        snprintf(buf, cap, "-");
    else if (p < 1e-4)
        snprintf(buf, cap, "<0.0001");
    else
        snprintf(buf, cap, "%.4f", p);
}
