// common/datadir.c: the roots of molt's shipped files and finding one in them (see
// datadir.h).
#include "datadir.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef MOLT_SOURCE_TREE
#define MOLT_SOURCE_TREE ""
#endif

static void add(char roots[][MOLT_DATA_PATH_MAX], int *n, int max, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void add(char roots[][MOLT_DATA_PATH_MAX], int *n, int max, const char *fmt, ...) {
    if (*n >= max)
        return;
    va_list ap;
    va_start(ap, fmt);
    int len = vsnprintf(roots[*n], MOLT_DATA_PATH_MAX, fmt, ap);
    va_end(ap);
    if (len > 0 && len < MOLT_DATA_PATH_MAX) // a path that does not fit is not a candidate
        (*n)++;
}

int molt_data_roots(char roots[][MOLT_DATA_PATH_MAX], int max) {
    char exe[MOLT_DATA_PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[len > 0 ? len : 0] = 0;
    char *slash = strrchr(exe, '/');
    if (slash)
        *slash = 0;
    else
        exe[0] = 0;
    const char *data = getenv("MOLT_DATA_DIR"), *preset = getenv("MOLT_PRESET_DIR");
    const char *src = getenv("MOLT_SOURCE_DIR");
    int n = 0;
    if (exe[0])
        add(roots, &n, max, "%s/../share/molt", exe);
    if (data && *data)
        add(roots, &n, max, "%s", data);
    if (preset && *preset) // names the models folder: its parent is a root
        add(roots, &n, max, "%s/..", preset);
    if (src && *src)
        add(roots, &n, max, "%s/configs", src);
    if (MOLT_SOURCE_TREE[0])
        add(roots, &n, max, "%s/configs", MOLT_SOURCE_TREE);
    if (exe[0]) {
        add(roots, &n, max, "%s/configs", exe);
        add(roots, &n, max, "%s/../configs", exe);
        add(roots, &n, max, "%s/../../configs", exe);
    }
    add(roots, &n, max, "configs");
    return n;
}

static int is_file(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

molt_status molt_data_find(const char *rel, char *out, size_t cap) {
    char (*roots)[MOLT_DATA_PATH_MAX] = molt_malloc(MOLT_DATA_ROOTS_MAX * sizeof *roots);
    if (!roots)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", rel);
    char p[MOLT_DATA_PATH_MAX + 256];
    int n = molt_data_roots(roots, MOLT_DATA_ROOTS_MAX);
    char tried[1024] = "";
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        if (snprintf(p, sizeof p, "%.*s/%.200s", MOLT_DATA_PATH_MAX - 1, roots[i], rel) >=
            (int)sizeof p)
            continue;
        if (is_file(p)) {
            molt_free(roots);
            if (strlen(p) >= cap)
                return molt_err(MOLT_EARG, "%s: path too long", p);
            snprintf(out, cap, "%s", p);
            return MOLT_OK;
        }
        if (at < sizeof tried)
            at += (size_t)snprintf(tried + at, sizeof tried - at, "%s%s", i ? ", " : "", p);
    }
    molt_free(roots);
    return molt_err(MOLT_EIO, "%s not found (looked in %s; set MOLT_DATA_DIR to a folder "
                    "holding models/ and tokenizers/)", rel, tried);
}
