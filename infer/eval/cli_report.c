// infer/eval/cli_report.c: `molt report --run OUTPUT_DIR [--out FILE]`: reads the metrics
// log a training run writes (OUTPUT_DIR/metrics.jsonl, one object per step: step, loss, lr,
// grad_norm, tokens, tokens_per_s, elapsed_s, and eval_loss on evaluation steps; null for a
// non-finite number; see train/metrics.c) and draws training and eval loss, learning rate,
// gradient norm and tokens/s against step as one self-contained HTML page with inline SVG,
// plus a summary and the run's config.resolved.yaml when present.
//
// Not here: the charts themselves (svg.c), anything about `molt eval`.
#include "internal.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <string.h>

static const char usage[] =
    "usage: molt report --run OUTPUT_DIR [--out FILE]\n"
    "Draws a training run's OUTPUT_DIR/metrics.jsonl (training and eval loss, learning rate,\n"
    "gradient norm and tokens/s against step) as a self-contained HTML page (inline SVG, no\n"
    "script or network access needed) and prints its path. --out: where to write it\n"
    "(default OUTPUT_DIR/report.html).\n";

enum { F_LOSS, F_EVAL, F_LR, F_GNORM, F_TPS, F_TOKENS, F_ELAPSED, N_FIELDS };
static const char *const field_keys[N_FIELDS] = {"loss",   "eval_loss",    "lr",
                                                 "grad_norm", "tokens_per_s", "tokens",
                                                 "elapsed_s"};

typedef struct {
    int64_t n, cap;
    double *step;
    double *f[N_FIELDS]; // NaN where a line has no such value (or null)
} run_log;

static void log_free(run_log *l) {
    molt_free(l->step);
    for (int k = 0; k < N_FIELDS; k++)
        molt_free(l->f[k]);
    memset(l, 0, sizeof *l);
}

static molt_status log_grow(run_log *l) {
    int64_t cap = l->cap ? l->cap * 2 : 256;
    double **arrs[N_FIELDS + 1] = {&l->step};
    for (int k = 0; k < N_FIELDS; k++)
        arrs[k + 1] = &l->f[k];
    for (int k = 0; k <= N_FIELDS; k++) {
        double *p = molt_realloc(*arrs[k], sizeof(double) * (size_t)cap);
        if (!p)
            return molt_err(MOLT_ENOMEM, "molt report: out of memory (%lld steps)",
                            (long long)cap);
        *arrs[k] = p;
    }
    l->cap = cap;
    return MOLT_OK;
}

// One line of path (number lineno) into l.
static molt_status parse_line(run_log *l, const char *path, long lineno, const char *line) {
    json_error_t e;
    json_t *o = json_loads(line, 0, &e);
    if (!o)
        return molt_err(MOLT_EFORMAT, "%s:%ld: not JSON (column %d: %s)", path, lineno, e.column,
                        e.text);
    json_t *step = json_object_get(o, "step");
    molt_status st = MOLT_OK;
    if (!json_is_object(o) || !json_is_integer(step))
        st = molt_err(MOLT_EFORMAT, "%s:%ld: expected an object with an integer \"step\"", path,
                      lineno);
    if (st == MOLT_OK && l->n == l->cap)
        st = log_grow(l);
    for (int k = 0; st == MOLT_OK && k < N_FIELDS; k++) {
        json_t *v = json_object_get(o, field_keys[k]);
        if (v && !json_is_number(v) && !json_is_null(v))
            st = molt_err(MOLT_EFORMAT, "%s:%ld: \"%s\" must be a number or null", path, lineno,
                          field_keys[k]);
        else
            l->f[k][l->n] = v && json_is_number(v) ? json_number_value(v) : NAN;
    }
    if (st == MOLT_OK)
        l->step[l->n++] = (double)json_integer_value(step);
    json_decref(o);
    return st;
}

static molt_status read_log(run_log *l, const char *path) {
    memset(l, 0, sizeof *l);
    FILE *f = fopen(path, "rb");
    if (!f)
        return molt_err(MOLT_EIO, "cannot open %s: %s", path, strerror(errno));
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    long lineno = 0;
    molt_status st = MOLT_OK;
    while (st == MOLT_OK && (len = getline(&line, &cap, f)) > 0) {
        lineno++;
        bool last = line[len - 1] != '\n';
        st = parse_line(l, path, lineno, line);
        if (st != MOLT_OK && last) { // a run being written (or killed) mid-line
            fprintf(stderr, "molt report: %s:%ld: ignoring the unfinished last line\n", path,
                    lineno);
            st = MOLT_OK;
            molt_err_clear();
        }
    }
    if (st == MOLT_OK && ferror(f))
        st = molt_err(MOLT_EIO, "cannot read %s: %s", path, strerror(errno));
    free(line); // allocated by getline with malloc
    fclose(f);
    if (st == MOLT_OK && l->n == 0)
        st = molt_err(MOLT_EFORMAT, "%s: no metrics (the run has not finished a step)", path);
    if (st != MOLT_OK)
        log_free(l);
    return st;
}

// The whole of a small text file, or NULL when it cannot be read.
static char *slurp(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    ev_sb b;
    ev_sb_init(&b);
    char buf[4096];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, f)) > 0 && b.len < (1u << 20))
        ev_sb_put(&b, buf, k);
    fclose(f);
    if (b.oom || !b.s) {
        ev_sb_free(&b);
        return NULL;
    }
    return b.s;
}

static void summary_row(ev_sb *b, const char *what, const char *value) {
    ev_sb_puts(b, "<tr><td>");
    ev_sb_xml(b, what);
    ev_sb_puts(b, "</td><td>");
    ev_sb_xml(b, value);
    ev_sb_puts(b, "</td></tr>\n");
}

// First and last finite value of x, and the smallest with its step.
static void span(const run_log *l, const double *x, double *first, double *last, double *min,
                 double *min_step) {
    *first = *last = *min = *min_step = NAN;
    for (int64_t i = 0; i < l->n; i++) {
        if (!isfinite(x[i]))
            continue;
        if (isnan(*first))
            *first = x[i];
        *last = x[i];
        if (isnan(*min) || x[i] < *min) {
            *min = x[i];
            *min_step = l->step[i];
        }
    }
}

static void summary(const run_log *l, ev_sb *b) {
    char v[200], a[40], c[40];
    double first, last, min, min_step;
    ev_sb_puts(b, "<table>\n");
    snprintf(v, sizeof v, "%lld logged, %.0f to %.0f", (long long)l->n, l->step[0],
             l->step[l->n - 1]);
    summary_row(b, "steps", v);
    span(l, l->f[F_LOSS], &first, &last, &min, &min_step);
    ev_fmt_num(a, sizeof a, first, false);
    ev_fmt_num(c, sizeof c, last, false);
    snprintf(v, sizeof v, "first %s, last %s", a, c);
    summary_row(b, "training loss", v);
    span(l, l->f[F_EVAL], &first, &last, &min, &min_step);
    if (!isnan(last)) {
        ev_fmt_num(a, sizeof a, last, false);
        ev_fmt_num(c, sizeof c, min, false);
        snprintf(v, sizeof v, "last %s, lowest %s (step %.0f)", a, c, min_step);
        summary_row(b, "eval loss", v);
    }
    span(l, l->f[F_TOKENS], &first, &last, &min, &min_step);
    if (!isnan(last)) {
        snprintf(v, sizeof v, "%.0f", last);
        summary_row(b, "tokens trained", v);
    }
    span(l, l->f[F_ELAPSED], &first, &last, &min, &min_step);
    if (!isnan(last)) {
        snprintf(v, sizeof v, "%.1f s", last);
        summary_row(b, "elapsed", v);
    }
    ev_sb_puts(b, "</table>\n");
}

static bool any_finite(const run_log *l, int k) {
    for (int64_t i = 0; i < l->n; i++)
        if (isfinite(l->f[k][i]))
            return true;
    return false;
}

static molt_status write_page(const run_log *l, const char *run, const char *out) {
    ev_sb b;
    ev_sb_init(&b);
    ev_html_begin(&b, "molt training report");
    ev_sb_puts(&b, "<h1>molt training report</h1>\n<p>run ");
    ev_sb_xml(&b, run);
    ev_sb_puts(&b, "</p>\n");
    summary(l, &b);
    ev_svg_series loss[2] = {{"training loss", l->step, l->f[F_LOSS], l->n, false},
                             {"eval loss", l->step, l->f[F_EVAL], l->n, true}};
    ev_svg_lines(&b, "loss", "step", "loss", loss, any_finite(l, F_EVAL) ? 2 : 1);
    static const struct {
        int field;
        const char *title, *y;
    } one[] = {{F_LR, "learning rate", "lr"},
               {F_GNORM, "gradient norm (before clipping)", "grad norm"},
               {F_TPS, "throughput", "tokens/s"}};
    for (size_t k = 0; k < sizeof one / sizeof *one; k++) {
        ev_svg_series s = {one[k].y, l->step, l->f[one[k].field], l->n, false};
        ev_svg_lines(&b, one[k].title, "step", one[k].y, &s, 1);
    }
    char *cfg_path = ev_path_join(run, "config.resolved.yaml");
    char *cfg = cfg_path ? slurp(cfg_path) : NULL;
    if (cfg) {
        ev_sb_puts(&b, "<h2>config.resolved.yaml</h2>\n<pre>");
        ev_sb_xml(&b, cfg);
        ev_sb_puts(&b, "</pre>\n");
    }
    molt_free(cfg);
    molt_free(cfg_path);
    ev_html_end(&b);
    molt_status st = ev_sb_status(&b, out);
    if (st == MOLT_OK)
        st = ev_write_file(out, b.s, b.len);
    ev_sb_free(&b);
    return st;
}

int ev_cmd_report(int argc, char **argv) {
    const char *run = NULL, *out = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage, stdout);
            return 0;
        }
        const char **dst = !strcmp(argv[i], "--run") ? &run : !strcmp(argv[i], "--out") ? &out
                                                                                       : NULL;
        if (!dst) {
            fprintf(stderr, "molt report: unknown option '%s'\n%s", argv[i], usage);
            return 2;
        }
        if (i + 1 >= argc || !argv[i + 1][0]) {
            fprintf(stderr, "molt report: %s needs a value\n%s", argv[i], usage);
            return 2;
        }
        *dst = argv[++i];
    }
    if (!run) {
        fprintf(stderr, "molt report: --run OUTPUT_DIR is required\n%s", usage);
        return 2;
    }
    char *log_path = ev_path_join(run, "metrics.jsonl");
    char *def_out = out ? NULL : ev_path_join(run, "report.html");
    if (!log_path || (!out && !def_out)) {
        fprintf(stderr, "molt report: out of memory\n");
        molt_free(log_path);
        molt_free(def_out);
        return 1;
    }
    run_log l;
    molt_status st = read_log(&l, log_path);
    if (st == MOLT_OK) {
        st = write_page(&l, run, out ? out : def_out);
        log_free(&l);
    }
    if (st == MOLT_OK)
        printf("%s\n", out ? out : def_out);
    else
        fprintf(stderr, "molt report: %s\n", molt_err_msg());
    molt_free(log_path);
    molt_free(def_out);
    return st == MOLT_OK ? 0 : 1;
}
