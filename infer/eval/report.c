// infer/eval/report.c: the report of a `molt eval` run from its results: the statistics of
// every dataset (ev_report_compute), and the files report.md, report.json and
// samples.jsonl plus the summary table printed at the end of a run. The cells of a table
// row are shared with report.html (html.c).
//
// Not here: the HTML page and its charts (html.c, svg.c), the statistics (stats.c,
// results.c).
#include "internal.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>

molt_status ev_report_compute(ev_report *r, const ev_dataset *const *ds, int n,
                              const ev_boot_opts *o) {
    memset(r, 0, sizeof *r);
    if (n < 1)
        return molt_err(MOLT_EARG, "report: no dataset");
    for (int i = 0; i < n; i++)
        for (int k = 0; k < i; k++)
            if (strcmp(ds[i]->name, ds[k]->name) == 0)
                return molt_err(MOLT_EARG, "report: two datasets are named '%s'", ds[i]->name);
    MOLT_TRY(ev_boot_opts_check(o));
    r->boot = *o;
    r->ds = molt_calloc((size_t)n, sizeof *r->ds);
    if (!r->ds)
        return molt_err(MOLT_ENOMEM, "report: out of memory");
    for (int i = 0; i < n; i++) {
        molt_status st = ev_dataset_stats_compute(ds[i], o, &r->ds[i]);
        r->n = i + 1;
        if (st != MOLT_OK) {
            ev_report_free(r);
            return st;
        }
    }
    return MOLT_OK;
}

void ev_report_free(ev_report *r) {
    for (int i = 0; r->ds && i < r->n; i++)
        ev_dataset_stats_free(&r->ds[i]);
    molt_free(r->ds);
    memset(r, 0, sizeof *r);
}

// ---- table cells -----------------------------------------------------------------------

void ev_report_cells(const ev_dataset *d, const ev_table *t, int j, int s, ev_cells *c) {
    int S = d->n_systems;
    const ev_mean_ci *m = &t->mean[j * S + s];
    const ev_paired *p = &t->cmp[j * S + s];
    char a[40], b[40], e[40];
    if (m->n == 0)
        snprintf(c->mean, sizeof c->mean, "-");
    else {
        ev_fmt_num(a, sizeof a, m->mean, false);
        ev_fmt_num(b, sizeof b, m->lo, false);
        ev_fmt_num(e, sizeof e, m->hi, false);
        snprintf(c->mean, sizeof c->mean, "%s [%s, %s]", a, b, e);
    }
    if (s == d->baseline || p->n == 0) {
        snprintf(c->diff, sizeof c->diff, "-");
        snprintf(c->wtl, sizeof c->wtl, "-");
    } else {
        ev_fmt_num(a, sizeof a, p->diff, true);
        ev_fmt_num(b, sizeof b, p->lo, true);
        ev_fmt_num(e, sizeof e, p->hi, true);
        snprintf(c->diff, sizeof c->diff, "%s [%s, %s]", a, b, e);
        snprintf(c->wtl, sizeof c->wtl, "%lld/%lld/%lld", (long long)p->win, (long long)p->tie,
                 (long long)p->loss);
    }
    ev_fmt_p(c->p, sizeof c->p, t->p_holm[j * S + s]);
    snprintf(c->n, sizeof c->n, "%lld", (long long)m->n);
}

void ev_report_headers(const ev_report *r, const ev_dataset *d, ev_headers *h) {
    int pct = (int)lround(r->boot.level * 100);
    snprintf(h->mean, sizeof h->mean, "mean [%d%% CI]", pct);
    snprintf(h->diff, sizeof h->diff, "vs %s [%d%% CI]", d->systems[d->baseline], pct);
    const char *v[EV_N_COLS] = {"system", "metric", h->mean, h->diff,
                                d->n_systems > 2 ? "p (Holm)" : "p", "W/T/L", "n"};
    memcpy(h->h, v, sizeof v);
}

// ---- report.md -------------------------------------------------------------------------

void ev_report_note(const ev_report *r, ev_sb *b) {
    ev_sb_printf(b, "Intervals: %g%% percentile bootstrap over examples (%d resamples, seed "
                 "%llu). Differences are system minus baseline on the same examples (paired "
                 "bootstrap). p: McNemar's exact test for 0/1 metrics, the paired bootstrap "
                 "otherwise; Holm-adjusted across the comparisons of a metric when there are "
                 "several. W/T/L: examples where the system is better, equal, worse than the "
                 "baseline (lower is better for metrics marked so). n: examples with a value.",
                 r->boot.level * 100, r->boot.n_resamples, (unsigned long long)r->boot.seed);
}

static void md_table(const ev_report *r, const ev_dataset *d, const ev_table *t, ev_sb *b) {
    ev_headers h;
    ev_report_headers(r, d, &h);
    for (int k = 0; k < EV_N_COLS; k++) {
        ev_sb_puts(b, "| ");
        ev_sb_md(b, h.h[k]);
        ev_sb_puts(b, " ");
    }
    ev_sb_puts(b, "|\n|---|---|---|---|---|---|---|\n");
    for (int j = 0; j < d->n_metrics; j++)
        for (int s = 0; s < d->n_systems; s++) {
            ev_cells c;
            ev_report_cells(d, t, j, s, &c);
            ev_sb_puts(b, "| ");
            ev_sb_md(b, d->systems[s]);
            ev_sb_puts(b, s == d->baseline ? " (baseline) | " : " | ");
            ev_sb_md(b, d->metrics[j].name);
            ev_sb_printf(b, " | %s | %s | %s | %s | %s |\n", c.mean, c.diff, c.p, c.wtl, c.n);
        }
}

static void md_dataset(const ev_report *r, const ev_dataset_stats *st, ev_sb *b) {
    const ev_dataset *d = st->d;
    ev_sb_puts(b, "\n## ");
    ev_sb_md(b, d->name);
    ev_sb_printf(b, " (task %s, %lld examples)\n\nSystems: ", d->task, (long long)d->n_examples);
    for (int s = 0; s < d->n_systems; s++) {
        ev_sb_puts(b, s ? ", " : "");
        ev_sb_md(b, d->systems[s]);
        ev_sb_puts(b, s == d->baseline ? " (baseline)" : "");
    }
    ev_sb_puts(b, ". Metrics: ");
    for (int j = 0; j < d->n_metrics; j++) {
        ev_sb_puts(b, j ? ", " : "");
        ev_sb_md(b, d->metrics[j].name);
        ev_sb_puts(b, d->metrics[j].binary ? " (0/1)" : "");
        ev_sb_puts(b, d->metrics[j].lower_is_better ? " (lower is better)" : "");
    }
    ev_sb_puts(b, ".\n\n");
    md_table(r, d, &st->tables[0], b);
    for (int k = 1; k < st->n_tables; k++) {
        const ev_table *t = &st->tables[k];
        ev_sb_puts(b, "\n### ");
        ev_sb_md(b, d->name);
        ev_sb_puts(b, ", category ");
        ev_sb_md(b, t->category[0] ? t->category : "(none)");
        ev_sb_printf(b, " (%lld examples)\n\n", (long long)t->n_examples);
        md_table(r, d, t, b);
    }
}

static molt_status write_md(const ev_report *r, const char *path) {
    ev_sb b;
    ev_sb_init(&b);
    ev_sb_puts(&b, "# molt eval report\n\n");
    ev_report_note(r, &b);
    ev_sb_puts(&b, "\n");
    for (int i = 0; i < r->n; i++)
        md_dataset(r, &r->ds[i], &b);
    molt_status st = ev_sb_status(&b, path);
    if (st == MOLT_OK)
        st = ev_write_file(path, b.s, b.len);
    ev_sb_free(&b);
    return st;
}

// ---- report.json and samples.jsonl -----------------------------------------------------

static json_t *jnum(double v) { return isnan(v) ? json_null() : json_real(v); }

// A JSON string of s with invalid UTF-8 replaced (jansson takes only valid UTF-8).
static json_t *jstr(const char *s) {
    if (!s)
        return json_null();
    char *c = ev_utf8_clean(s);
    json_t *j = c ? json_string(c) : NULL;
    molt_free(c);
    return j;
}

static json_t *jpair(double a, double b) { return json_pack("[oo]", jnum(a), jnum(b)); }

// Appends v to arr (taking it); clears *ok when either is missing (out of memory).
static void push(json_t *arr, json_t *v, bool *ok) {
    if (json_array_append_new(arr, v) != 0)
        *ok = false;
}

// obj when every step succeeded, else NULL (obj released).
static json_t *done(json_t *obj, bool ok) {
    if (ok && obj)
        return obj;
    json_decref(obj);
    return NULL;
}

static json_t *json_comparison(const ev_dataset *d, const ev_table *t, int j, int s) {
    int S = d->n_systems;
    const ev_paired *p = &t->cmp[j * S + s];
    json_t *v = json_pack("{s:Is:Isosos:os:os:os:os:Is:Is:I}", "n", p->n, "n_missing",
                          p->n_missing, "diff", jnum(p->diff), "ci", jpair(p->lo, p->hi),
                          "p_bootstrap", jnum(p->p_boot), "p_mcnemar", jnum(p->p_mcnemar), "p",
                          jnum(t->p[j * S + s]), "p_holm", jnum(t->p_holm[j * S + s]), "win",
                          p->win, "tie", p->tie, "loss", p->loss);
    bool ok = true;
    if (v && d->metrics[j].binary)
        ok = json_object_set_new(v, "discordant", json_pack("{s:Is:I}", "base0_sys1", p->n01,
                                                            "base1_sys0", p->n10)) == 0;
    return done(v, ok);
}

static json_t *json_table(const ev_dataset *d, const ev_table *t) {
    int S = d->n_systems;
    bool ok = true;
    json_t *metrics = json_array();
    for (int j = 0; j < d->n_metrics; j++) {
        json_t *systems = json_array();
        for (int s = 0; s < S; s++) {
            const ev_mean_ci *m = &t->mean[j * S + s];
            push(systems, json_pack("{sos:Is:Isososo}", "system", jstr(d->systems[s]), "n", m->n,
                                    "n_missing", m->n_missing, "mean", jnum(m->mean), "ci",
                                    jpair(m->lo, m->hi), "vs_baseline",
                                    s == d->baseline ? json_null()
                                                     : json_comparison(d, t, j, s)),
                 &ok);
        }
        push(metrics, json_pack("{soso}", "metric", jstr(d->metrics[j].name), "systems",
                                done(systems, ok)), &ok);
    }
    return json_pack("{sos:Iso}", "category", t->category ? jstr(t->category) : json_null(),
                     "n_examples", t->n_examples, "metrics", done(metrics, ok));
}

static json_t *json_dataset(const ev_dataset_stats *st) {
    const ev_dataset *d = st->d;
    bool ok = true;
    json_t *systems = json_array(), *metrics = json_array(), *tables = json_array();
    for (int s = 0; s < d->n_systems; s++)
        push(systems, jstr(d->systems[s]), &ok);
    for (int j = 0; j < d->n_metrics; j++)
        push(metrics, json_pack("{sosbsb}", "name", jstr(d->metrics[j].name), "binary",
                                d->metrics[j].binary, "lower_is_better",
                                d->metrics[j].lower_is_better), &ok);
    for (int k = 0; k < st->n_tables; k++)
        push(tables, json_table(d, &st->tables[k]), &ok);
    if (!ok) {
        json_decref(systems);
        json_decref(metrics);
        json_decref(tables);
        return NULL;
    }
    return json_pack("{sosos:Isosososo}", "name", jstr(d->name), "task", jstr(d->task),
                     "n_examples", d->n_examples, "baseline", jstr(d->systems[d->baseline]),
                     "systems", systems, "metrics", metrics, "tables", tables);
}

static molt_status write_json(const ev_report *r, const char *path, json_t *config) {
    json_t *ds = json_array();
    bool ok = true;
    for (int i = 0; i < r->n; i++)
        push(ds, json_dataset(&r->ds[i]), &ok);
    ds = done(ds, ok);
    char seed[24];
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)r->boot.seed);
    json_t *jseed = r->boot.seed <= (uint64_t)INT64_MAX ? json_integer((json_int_t)r->boot.seed)
                                                         : json_string(seed);
    json_t *root = json_pack(
        "{sss{sisfsoss}sOso}", "molt_version", MOLT_VERSION, "bootstrap", "resamples",
        r->boot.n_resamples, "level", r->boot.level, "seed", jseed, "interval", "percentile",
        "config", config, "datasets", ds);
    char *text = root ? json_dumps(root, JSON_INDENT(1) | JSON_REAL_PRECISION(17)) : NULL;
    json_decref(root);
    molt_status st = text ? MOLT_OK : molt_err(MOLT_ENOMEM, "out of memory building %s", path);
    if (st == MOLT_OK) {
        st = ev_write_file(path, text, strlen(text));
        free(text); // jansson allocates with malloc
    }
    return st;
}

// One line per example and system, written to path.tmp then renamed.
static molt_status write_samples(const ev_report *r, const char *path) {
    size_t n = strlen(path) + sizeof ".tmp";
    char *tmp = molt_malloc(n);
    if (!tmp)
        return molt_err(MOLT_ENOMEM, "out of memory writing %s", path);
    snprintf(tmp, n, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    molt_status st = f ? MOLT_OK : molt_err(MOLT_EIO, "cannot create %s: %s", tmp, strerror(errno));
    for (int k = 0; st == MOLT_OK && k < r->n; k++) {
        const ev_dataset *d = r->ds[k].d;
        for (int64_t i = 0; st == MOLT_OK && i < d->n_examples; i++) {
            const ev_example *e = &d->ex[i];
            for (int s = 0; st == MOLT_OK && s < d->n_systems; s++) {
                json_t *m = json_object();
                for (int j = 0; j < d->n_metrics; j++)
                    json_object_set_new(m, d->metrics[j].name,
                                        jnum(e->values[s * d->n_metrics + j]));
                json_t *o = json_pack("{sosososososososo}", "dataset", jstr(d->name), "id",
                                      jstr(e->id), "category", jstr(e->category), "target",
                                      jstr(e->target), "system", jstr(d->systems[s]),
                                      "prediction", jstr(e->pred[s]), "metrics", m, "loss",
                                      jnum(e->loss[s]));
                char *line = o ? json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(17)) : NULL;
                json_decref(o);
                if (!line)
                    st = molt_err(MOLT_ENOMEM, "out of memory writing %s", path);
                else if (fputs(line, f) == EOF || fputc('\n', f) == EOF)
                    st = molt_err(MOLT_EIO, "cannot write %s: %s", tmp, strerror(errno));
                free(line);
            }
        }
    }
    if (f && fclose(f) != 0 && st == MOLT_OK)
        st = molt_err(MOLT_EIO, "cannot write %s: %s", tmp, strerror(errno));
    if (st == MOLT_OK && rename(tmp, path) != 0)
        st = molt_err(MOLT_EIO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (st != MOLT_OK && f)
        remove(tmp);
    molt_free(tmp);
    return st;
}

// mkdir -p dir.
static molt_status make_dir(const char *dir) {
    char *p = molt_strdup(dir);
    if (!p)
        return molt_err(MOLT_ENOMEM, "out of memory");
    molt_status st = MOLT_OK;
    for (char *c = p + 1;; c++) {
        if (*c != '/' && *c)
            continue;
        char keep = *c;
        *c = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST)
            st = molt_err(MOLT_EIO, "cannot create directory %s: %s", p, strerror(errno));
        *c = keep;
        if (!keep || st != MOLT_OK)
            break;
    }
    molt_free(p);
    struct stat sb;
    if (st == MOLT_OK && (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)))
        st = molt_err(MOLT_EIO, "%s is not a directory", dir);
    return st;
}

molt_status ev_report_write(const ev_report *r, const char *dir, const char *config_json) {
    json_error_t e;
    json_t *config = config_json ? json_loads(config_json, 0, &e) : json_object();
    if (!config)
        return molt_err(MOLT_EARG, "report: the configuration is not JSON (line %d, column %d: "
                        "%s)", e.line, e.column, e.text);
    if (!json_is_object(config)) {
        json_decref(config);
        return molt_err(MOLT_EARG, "report: the configuration must be a JSON object");
    }
    molt_status st = make_dir(dir);
    static const char *const names[] = {"report.md", "report.json", "samples.jsonl",
                                        "report.html"};
    for (int k = 0; st == MOLT_OK && k < 4; k++) {
        char *path = ev_path_join(dir, names[k]);
        if (!path)
            st = molt_err(MOLT_ENOMEM, "out of memory");
        else if (k == 0)
            st = write_md(r, path);
        else if (k == 1)
            st = write_json(r, path, config);
        else if (k == 2)
            st = write_samples(r, path);
        else
            st = ev_report_write_html(r, path);
        molt_free(path);
    }
    json_decref(config);
    return st;
}

// ---- the summary on a terminal ---------------------------------------------------------

void ev_report_print(const ev_report *r, FILE *f) {
    for (int i = 0; i < r->n; i++) {
        const ev_dataset *d = r->ds[i].d;
        const ev_table *t = &r->ds[i].tables[0];
        ev_headers hd;
        ev_report_headers(r, d, &hd);
        const char *const *h = hd.h;
        int w[EV_N_COLS];
        for (int k = 0; k < EV_N_COLS; k++)
            w[k] = (int)strlen(h[k]);
        int rows = d->n_metrics * d->n_systems;
        for (int q = 0; q < rows; q++) {
            int j = q / d->n_systems, s = q % d->n_systems;
            ev_cells c;
            ev_report_cells(d, t, j, s, &c);
            const char *v[EV_N_COLS] = {d->systems[s], d->metrics[j].name, c.mean, c.diff, c.p,
                                        c.wtl, c.n};
            for (int k = 0; k < EV_N_COLS; k++) {
                int len = (int)strlen(v[k]) + (k == 0 && s == d->baseline ? 11 : 0);
                w[k] = len > w[k] ? len : w[k];
            }
        }
        fprintf(f, "%s%s (task %s, %lld examples)\n", i ? "\n" : "", d->name, d->task,
                (long long)d->n_examples);
        for (int k = 0; k < EV_N_COLS; k++)
            fprintf(f, k < 2 ? "%-*s  " : k + 1 < EV_N_COLS ? "%*s  " : "%*s\n", w[k], h[k]);
        for (int q = 0; q < rows; q++) {
            int j = q / d->n_systems, s = q % d->n_systems;
            ev_cells c;
            ev_report_cells(d, t, j, s, &c);
            char sys[512];
            snprintf(sys, sizeof sys, "%s%s", d->systems[s], s == d->baseline ? " (baseline)" : "");
            fprintf(f, "%-*s  %-*s  %*s  %*s  %*s  %*s  %*s\n", w[0], sys, w[1],
                    d->metrics[j].name, w[2], c.mean, w[3], c.diff, w[4], c.p, w[5], c.wtl,
                    w[6], c.n);
        }
    }
}
