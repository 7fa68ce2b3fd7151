// train/metrics.c: the metrics log (output_dir/metrics.jsonl) and the terminal progress
// line. Numbers are printed with %.17g, which round-trips every double, so the logs of an
// interrupted-and-resumed run and of an uninterrupted one can be compared byte for byte.
//
// Not here: timing, terminal control (the caller decides where and how often to print).
#include "train.h"

#include "../common/fsio.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <string.h>

// Appends ,"key":value (or null for a non-finite value) to buf at *at.
static void put_num(char *buf, size_t cap, size_t *at, const char *key, double v) {
    char num[40];
    if (isfinite(v))
        snprintf(num, sizeof num, "%.17g", v);
    else
        snprintf(num, sizeof num, "null");
    int n = snprintf(*at < cap ? buf + *at : NULL, *at < cap ? cap - *at : 0, ",\"%s\":%s",
                     key, num);
    *at += n > 0 ? (size_t)n : 0;
}

int metrics_format_json(char *buf, size_t cap, const metrics_row *r) {
    size_t at = 0;
    int n = snprintf(buf, cap, "{\"step\":%" PRId64, r->step);
    at = n > 0 ? (size_t)n : 0;
    put_num(buf, cap, &at, "loss", r->loss);
    put_num(buf, cap, &at, "lr", r->lr);
    put_num(buf, cap, &at, "grad_norm", r->grad_norm);
    n = snprintf(at < cap ? buf + at : NULL, at < cap ? cap - at : 0, ",\"tokens\":%" PRId64,
                 r->tokens);
    at += n > 0 ? (size_t)n : 0;
    put_num(buf, cap, &at, "tokens_per_s", r->tokens_per_s);
    put_num(buf, cap, &at, "elapsed_s", r->elapsed_s);
    if (r->has_eval)
        put_num(buf, cap, &at, "eval_loss", r->eval_loss);
    n = snprintf(at < cap ? buf + at : NULL, at < cap ? cap - at : 0, "}\n");
    at += n > 0 ? (size_t)n : 0;
    return (int)at;
}

// The "step" of a line this module wrote, or -1 when the line does not start that way.
static int64_t line_step(const char *line) {
    int64_t step;
    return sscanf(line, "{\"step\":%" SCNd64, &step) == 1 ? step : -1;
}

// Rewrites path keeping the lines with step <= keep (and any line it cannot parse).
static molt_status truncate_log(const char *path, int64_t keep) {
    FILE *in = fopen(path, "rb");
    if (!in)
        return errno == ENOENT ? MOLT_OK
                               : molt_err(MOLT_EIO, "cannot open %s: %s", path, strerror(errno));
    molt_wfile w;
    molt_status st = molt_wfile_open(&w, path);
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    while (st == MOLT_OK && (len = getline(&line, &cap, in)) > 0) {
        if (line[len - 1] != '\n')
            break; // a half-written last line from a killed run
        if (line_step(line) <= keep && fwrite(line, 1, (size_t)len, w.f) != (size_t)len)
            st = molt_err(MOLT_EIO, "cannot rewrite %s: %s", path, strerror(errno));
    }
    free(line); // allocated by getline with malloc
    if (st == MOLT_OK && ferror(in))
        st = molt_err(MOLT_EIO, "cannot read %s", path);
    fclose(in);
    if (st == MOLT_OK)
        return molt_wfile_commit(&w);
    if (w.f)
        molt_wfile_abort(&w);
    return st;
}

molt_status metrics_open(metrics_log *m, const char *output_dir, int64_t keep_through_step) {
    memset(m, 0, sizeof *m);
    size_t n = strlen(output_dir) + sizeof "/metrics.jsonl";
    m->path = molt_malloc(n);
    if (!m->path)
        return molt_err(MOLT_ENOMEM, "metrics: out of memory");
    snprintf(m->path, n, "%s/metrics.jsonl", output_dir);
    molt_status st = keep_through_step >= 0 ? truncate_log(m->path, keep_through_step) : MOLT_OK;
    if (st == MOLT_OK) {
        m->f = fopen(m->path, "ab");
        if (!m->f)
            st = molt_err(MOLT_EIO, "cannot open %s: %s", m->path, strerror(errno));
    }
    if (st != MOLT_OK)
        metrics_close(m);
    return st;
}

molt_status metrics_append(metrics_log *m, const metrics_row *r) {
    char buf[512];
    int n = metrics_format_json(buf, sizeof buf, r);
    if (n <= 0 || (size_t)n >= sizeof buf)
        return molt_err(MOLT_EINTERNAL, "metrics: line too long");
    if (fwrite(buf, 1, (size_t)n, m->f) != (size_t)n || fflush(m->f) != 0)
        return molt_err(MOLT_EIO, "cannot write %s: %s", m->path, strerror(errno));
    return MOLT_OK;
}

void metrics_close(metrics_log *m) {
    if (m->f)
        fclose(m->f);
    molt_free(m->path);
    memset(m, 0, sizeof *m);
}

// h:mm:ss of a non-negative number of seconds.
static void fmt_duration(char *buf, size_t cap, double s) {
    long long t = (long long)(s + 0.5);
    snprintf(buf, cap, "%lld:%02lld:%02lld", t / 3600, t / 60 % 60, t % 60);
}

int metrics_format_progress(char *buf, size_t cap, const metrics_progress *p) {
    char el[32], eta[32] = "?";
    fmt_duration(el, sizeof el, p->elapsed_s > 0 ? p->elapsed_s : 0);
    int64_t left = p->total_steps - p->step;
    if (p->steps_this_run > 0 && left >= 0 && p->elapsed_s >= 0)
        fmt_duration(eta, sizeof eta, p->elapsed_s / (double)p->steps_this_run * (double)left);
    return snprintf(buf, cap,
                    "step %" PRId64 "/%" PRId64 " | loss %.4f | lr %.3e | %.0f tok/s | "
                    "elapsed %s | ETA %s",
                    p->step, p->total_steps, p->loss, p->lr, p->tokens_per_s, el, eta);
}
