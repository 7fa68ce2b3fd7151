// common/opt.c: the shared command-line parser and typed option readers (see opt.h).
#include "opt.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void hint(const char *cmd) { fprintf(stderr, "(run '%s --help' for the options)\n", cmd); }

int molt_opt_usage_error(const char *cmd, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "%s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    hint(cmd);
    return 2;
}

// The option named by arg ("--name" or "--name=value"; *eq gets the '=' or NULL).
static const molt_opt *find(const molt_opt *opts, const char *arg, const char **eq) {
    *eq = strchr(arg, '=');
    size_t n = *eq ? (size_t)(*eq - arg) : strlen(arg);
    for (const molt_opt *o = opts; o->name; o++)
        if (strlen(o->name) == n && !strncmp(o->name, arg, n))
            return o;
    return NULL;
}

static bool is_help(const char *a) { return !strcmp(a, "--help") || !strcmp(a, "-h"); }

// Whether --help or -h stands where an option may stand (not as the value of one).
static bool wants_help(const molt_opt *opts, int argc, char **argv, int first) {
    for (int i = first; i < argc; i++) {
        if (is_help(argv[i]))
            return true;
        const char *eq;
        const molt_opt *o = find(opts, argv[i], &eq);
        if (o && !o->flag && !eq && i + 1 < argc && strncmp(argv[i + 1], "--", 2))
            i++; // skip the value
    }
    return false;
}

int molt_opts_parse(const char *cmd, const char *usage, const molt_opt *opts, int argc,
                    char **argv, int first, void *user) {
    if (wants_help(opts, argc, argv, first)) {
        fputs(usage, stdout);
        return -1;
    }
    for (int i = first; i < argc; i++) {
        const char *a = argv[i], *eq;
        if (strncmp(a, "-", 1) || !strcmp(a, "-"))
            return molt_opt_usage_error(cmd, "unexpected argument '%s'", a);
        const molt_opt *o = find(opts, a, &eq);
        if (!o)
            return molt_opt_usage_error(cmd, "unknown option '%.*s'",
                                        (int)(eq ? (size_t)(eq - a) : strlen(a)), a);
        if (o->flag) {
            if (eq)
                return molt_opt_usage_error(cmd, "%s takes no value (got '%s')", o->name, a);
            *o->flag = true;
            continue;
        }
        const char *v = eq ? eq + 1 : i + 1 < argc ? argv[i + 1] : NULL;
        if (!eq && v && !strncmp(v, "--", 2))
            return molt_opt_usage_error(cmd, "%s needs a value (got the option '%s'; write "
                                        "%s=VALUE for a value that starts with --)", o->name, v,
                                        o->name);
        if (!v || (eq && !*v))
            return molt_opt_usage_error(cmd, "%s needs a value", o->name);
        if (!eq)
            i++;
        if (o->value)
            *o->value = v;
        else if (o->each(user, v))
            return 2;
    }
    return 0;
}

static bool refuse(const char *cmd, const char *name, const char *value, const char *want) {
    fprintf(stderr, "%s: %s '%s' is not %s\n", cmd, name, value, want);
    return false;
}

bool molt_opt_int(const char *cmd, const char *name, const char *value, int64_t lo, int64_t hi,
                  int64_t *out) {
    if (!value)
        return true;
    char *end, want[96];
    errno = 0;
    long long v = strtoll(value, &end, 10);
    if (!*value || *end || errno || v < lo || v > hi) {
        if (hi >= INT32_MAX - 1)
            snprintf(want, sizeof want, "an integer >= %lld", (long long)lo);
        else
            snprintf(want, sizeof want, "an integer in [%lld, %lld]", (long long)lo,
                     (long long)hi);
        return refuse(cmd, name, value, want);
    }
    *out = v;
    return true;
}

bool molt_opt_uint64(const char *cmd, const char *name, const char *value, uint64_t *out) {
    if (!value)
        return true;
    char *end;
    errno = 0;
    unsigned long long v = value[0] == '-' ? 0 : strtoull(value, &end, 10);
    if (!*value || value[0] == '-' || *end || errno)
        return refuse(cmd, name, value, "a non-negative integer");
    *out = v;
    return true;
}

bool molt_opt_double(const char *cmd, const char *name, const char *value, double lo, double hi,
                     double *out) {
    if (!value)
        return true;
    char *end, want[96];
    errno = 0;
    double v = strtod(value, &end);
    if (!*value || *end || errno || !isfinite(v) || v < lo || v > hi) {
        if (hi >= 1e300)
            snprintf(want, sizeof want, "a number >= %g", lo);
        else
            snprintf(want, sizeof want, "a number in [%g, %g]", lo, hi);
        return refuse(cmd, name, value, want);
    }
    *out = v;
    return true;
}

bool molt_opt_choice(const char *cmd, const char *name, const char *value,
                     const char *const *choices, int n, int *out) {
    if (!value)
        return true;
    for (int i = 0; i < n; i++)
        if (!strcmp(value, choices[i])) {
            *out = i;
            return true;
        }
    char want[256] = "one of";
    size_t at = strlen(want);
    for (int i = 0; i < n && at < sizeof want; i++)
        at += (size_t)snprintf(want + at, sizeof want - at, "%s %s", i ? "," : "", choices[i]);
    return refuse(cmd, name, value, want);
}
