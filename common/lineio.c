// common/lineio.c: line-by-line reading where read errors are errors (see lineio.h).
#include "lineio.h"

#include <errno.h>
#include <string.h>
#include <sys/stat.h>

molt_status molt_lines_open(molt_lines *r, const char *path, size_t max) {
    memset(r, 0, sizeof *r);
    r->path = path;
    r->max = max ? max : MOLT_LINE_MAX_DEFAULT;
    if (!strcmp(path, "-")) {
        r->f = stdin;
        return MOLT_OK;
    }
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
        return molt_err(MOLT_EARG, "%s is a directory, not a file", path);
    r->f = fopen(path, "rb");
    if (!r->f)
        return molt_err(MOLT_EIO, "%s: cannot open: %s", path, strerror(errno));
    return MOLT_OK;
}

molt_status molt_lines_next(molt_lines *r, bool *eof) {
    *eof = false;
    r->len = 0;
    r->lineno++;
    int c;
    errno = 0;
    while ((c = getc(r->f)) != EOF && c != '\n') {
        if (r->len + 1 >= r->cap) { // room for the byte and a NUL
            if (r->len >= r->max)
                return molt_err(MOLT_EFORMAT, "%s:%llu: line longer than %zu bytes (not a text "
                                "file?)", r->path, (unsigned long long)r->lineno, r->max);
            size_t cap = r->cap ? r->cap * 2 : 4096;
            cap = cap > r->max + 1 ? r->max + 1 : cap;
            char *b = molt_realloc(r->buf, cap);
            if (!b)
                return molt_err(MOLT_ENOMEM, "%s:%llu: out of memory for a line of %zu bytes",
                                r->path, (unsigned long long)r->lineno, r->len);
            r->buf = b;
            r->cap = cap;
        }
        r->buf[r->len++] = (char)c;
    }
    if (c == EOF && ferror(r->f))
        return molt_err(MOLT_EIO, "%s: read error: %s", r->path, strerror(errno ? errno : EIO));
    if (c == EOF && r->len == 0) {
        *eof = true;
        return MOLT_OK;
    }
    if (!r->buf) { // an empty line before anything was allocated
        r->buf = molt_malloc(16);
        if (!r->buf)
            return molt_err(MOLT_ENOMEM, "%s: out of memory", r->path);
        r->cap = 16;
    }
    if (r->len > 0 && r->buf[r->len - 1] == '\r')
        r->len--;
    r->buf[r->len] = 0;
    return MOLT_OK;
}

void molt_lines_close(molt_lines *r) {
    if (r->f && r->f != stdin)
        fclose(r->f);
    molt_free(r->buf);
    memset(r, 0, sizeof *r);
}
