// tests/test_eval_report.c: the results model and the report of infer/eval: a dataset's
// tables agree with the standalone statistics (ev_boot_paired, ev_boot_mean, ev_holm) on
// the same columns; categories get their own tables; the four files are written, parse,
// carry the numbers, escape system names with < & and quotes, open offline, and are the
// same bytes for the same seed; the SVG charts have one mark per system; and every bad
// input gets its precise error.
#include "harness/harness.h"
#include "infer/eval/eval.h"
#include "infer/eval/internal.h"

#include <jansson.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#define N_EX 40
static const char *const sys_names[3] = {"base", "lora <r16> & \"x\"", "it's"};

// A generate-task dataset: 3 systems, exact_match (0/1) and token_f1, two categories plus
// examples without one, a loss per example, some f1 values missing.
static void make_dataset(ev_dataset *d) {
    ev_metric_def m[2] = {{"exact_match", true, false}, {"token_f1", false, false}};
    ck_assert_ok(ev_dataset_init(d, "qa <set>", "generate", 3, sys_names, 0, 2, m));
    ag_rng r;
    ag_rng_seed(&r, 11);
    for (int i = 0; i < N_EX; i++) {
        char id[16];
        snprintf(id, sizeof id, "ex-%d", i);
        const char *cat = i % 5 == 4 ? NULL : i % 2 ? "math" : "geo & <b>";
        ck_assert_ok(ev_dataset_add(d, id, cat, "the answer"));
        for (int s = 0; s < 3; s++) {
            double p = 0.4 + 0.2 * s;
            double v[2] = {ag_rng_uniform(&r) < p, ag_rng_uniform(&r)};
            if ((i + s) % 11 == 0)
                v[1] = NAN;
            char pred[32];
            snprintf(pred, sizeof pred, "pred %d/%d \xff", i, s); // invalid UTF-8 on purpose
            ck_assert_ok(ev_dataset_set(d, i, s, pred, 2.0 - 0.1 * s + ag_rng_uniform(&r), v));
        }
    }
}

static ev_boot_opts opts(uint64_t seed) {
    ev_boot_opts o;
    ev_boot_opts_default(&o);
    o.n_resamples = 2000;
    o.seed = seed;
    return o;
}

// Column of metric j for system s over the examples of category cat (NULL: all).
static int64_t col(const ev_dataset *d, int j, int s, const char *cat, double *out) {
    int64_t n = 0;
    for (int64_t i = 0; i < d->n_examples; i++) {
        const char *c = d->ex[i].category;
        if (cat && !(c ? strcmp(c, cat) == 0 : cat[0] == 0))
            continue;
        out[n++] = d->ex[i].values[s * d->n_metrics + j];
    }
    return n;
}

START_TEST(test_tables_match_standalone_statistics) {
    ev_dataset d;
    make_dataset(&d);
    ev_boot_opts o = opts(3);
    ev_dataset_stats st;
    ck_assert_ok(ev_dataset_stats_compute(&d, &o, &st));
    // all, then "geo & <b>", "math" (bytes order), then "" for the examples without one
    ck_assert_int_eq(st.n_tables, 4);
    ck_assert_ptr_null(st.tables[0].category);
    ck_assert_str_eq(st.tables[1].category, "geo & <b>");
    ck_assert_str_eq(st.tables[2].category, "math");
    ck_assert_str_eq(st.tables[3].category, "");
    ck_assert_int_eq(st.tables[0].n_examples, N_EX);
    ck_assert_int_eq(st.tables[1].n_examples + st.tables[2].n_examples + st.tables[3].n_examples,
                     N_EX);
    double x[N_EX], b[N_EX];
    for (int k = 0; k < st.n_tables; k++) {
        const ev_table *t = &st.tables[k];
        for (int j = 0; j < 2; j++) {
            double p[3];
            for (int s = 0; s < 3; s++) {
                int64_t n = col(&d, j, s, t->category, x);
                ev_mean_ci m;
                ck_assert_ok(ev_boot_mean(x, n, &o, &m));
                const ev_mean_ci *g = &t->mean[j * 3 + s];
                ck_assert(g->n == m.n && g->mean == m.mean && g->lo == m.lo && g->hi == m.hi);
                p[s] = NAN;
                if (s == 0)
                    continue;
                col(&d, j, 0, t->category, b);
                ev_paired q;
                ck_assert_ok(ev_boot_paired(x, n, b, n, &d.metrics[j], &o, &q));
                const ev_paired *c = &t->cmp[j * 3 + s];
                ck_assert(c->diff == q.diff && c->lo == q.lo && c->hi == q.hi &&
                          c->p_boot == q.p_boot && c->win == q.win && c->tie == q.tie &&
                          c->loss == q.loss && c->n01 == q.n01 && c->n10 == q.n10);
                p[s] = j == 0 ? q.p_mcnemar : q.p_boot; // McNemar for the 0/1 metric
                ck_assert(t->p[j * 3 + s] == p[s]);
            }
            double adj[3];
            ck_assert_ok(ev_holm(p, 3, adj));
            for (int s = 1; s < 3; s++)
                ck_assert(t->p_holm[j * 3 + s] == adj[s]);
            ck_assert(isnan(t->p_holm[j * 3]));
        }
    }
    // loss differences for the histograms
    ck_assert_int_eq(st.n_loss_diff[0], 0);
    ck_assert_int_eq(st.n_loss_diff[2], N_EX);
    ck_assert(st.loss_diff[2][7] == d.ex[7].loss[2] - d.ex[7].loss[0]);
    ev_dataset_stats_free(&st);
    ev_dataset_free(&d);
}
END_TEST

static char *read_all(const char *dir, const char *name) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    ck_assert(fread(s, 1, (size_t)n, f) == (size_t)n);
    s[n] = 0;
    fclose(f);
    return s;
}

static int count(const char *s, const char *what) {
    int n = 0;
    for (const char *p = s; (p = strstr(p, what)); p += strlen(what))
        n++;
    return n;
}

static void tmpdir(char *buf, size_t cap) {
    snprintf(buf, cap, "/tmp/molt_eval_report_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(buf));
}

static void rm_dir(const char *dir) {
    const char *names[] = {"report.md", "report.json", "samples.jsonl", "report.html"};
    char p[4096];
    for (int k = 0; k < 4; k++) {
        snprintf(p, sizeof p, "%s/%s", dir, names[k]);
        unlink(p);
    }
    rmdir(dir);
}

START_TEST(test_report_files) {
    ev_dataset d;
    make_dataset(&d);
    const ev_dataset *ds[1] = {&d};
    ev_boot_opts o = opts(5);
    ev_report r;
    ck_assert_ok(ev_report_compute(&r, ds, 1, &o));
    char dir[64], dir2[64], dir3[64];
    tmpdir(dir, sizeof dir);
    tmpdir(dir2, sizeof dir2);
    tmpdir(dir3, sizeof dir3);
    const char *config = "{\"adapters\": {\"r16\": \"out/r16\"}, \"limit\": 40}";
    ck_assert_ok(ev_report_write(&r, dir, config));
    ck_assert_ok(ev_report_write(&r, dir2, config));

    // report.json: parses, carries the configuration and the numbers in full precision
    json_error_t e;
    char *js = read_all(dir, "report.json");
    json_t *j = json_loads(js, 0, &e);
    ck_assert_msg(j != NULL, "report.json: %s", e.text);
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "config"), "limit")),
                     40);
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "bootstrap"),
                                                        "resamples")), 2000);
    json_t *t0 = json_array_get(json_object_get(json_array_get(json_object_get(j, "datasets"),
                                                               0), "tables"), 0);
    json_t *f1 = json_array_get(json_object_get(t0, "metrics"), 1);
    ck_assert_str_eq(json_string_value(json_object_get(f1, "metric")), "token_f1");
    json_t *s1 = json_array_get(json_object_get(f1, "systems"), 1);
    ck_assert_str_eq(json_string_value(json_object_get(s1, "system")), sys_names[1]);
    const ev_table *t = &r.ds[0].tables[0];
    ck_assert(json_real_value(json_object_get(s1, "mean")) == t->mean[1 * 3 + 1].mean);
    json_t *vs = json_object_get(s1, "vs_baseline");
    ck_assert(json_real_value(json_object_get(vs, "p_holm")) == t->p_holm[1 * 3 + 1]);
    ck_assert(json_real_value(json_array_get(json_object_get(vs, "ci"), 0)) ==
              t->cmp[1 * 3 + 1].lo);
    ck_assert(json_is_null(json_object_get(json_array_get(json_object_get(f1, "systems"), 0),
                                           "vs_baseline")));
    json_decref(j);

    // samples.jsonl: one line per example and system, valid JSON (invalid UTF-8 replaced)
    char *sm = read_all(dir, "samples.jsonl");
    ck_assert_int_eq(count(sm, "\n"), N_EX * 3);
    char *line = strtok(sm, "\n");
    json_t *l0 = json_loads(line, 0, &e);
    ck_assert_msg(l0 != NULL, "samples.jsonl line 1: %s", e.text);
    ck_assert_str_eq(json_string_value(json_object_get(l0, "id")), "ex-0");
    ck_assert_str_eq(json_string_value(json_object_get(l0, "prediction")), "pred 0/0 \xef\xbf\xbd");
    ck_assert(json_is_null(json_object_get(json_object_get(l0, "metrics"), "token_f1")));
    ck_assert(json_real_value(json_object_get(l0, "loss")) == d.ex[0].loss[0]);
    json_decref(l0);

    // report.md: a table per dataset and category, names escaped for Markdown
    char *md = read_all(dir, "report.md");
    ck_assert_int_eq(count(md, "|---|---|---|---|---|---|---|"), 4);
    ck_assert_ptr_nonnull(strstr(md, "| lora &lt;r16&gt; &amp; \"x\" | exact_match | "));
    ck_assert_ptr_nonnull(strstr(md, "p (Holm)"));
    ck_assert_ptr_nonnull(strstr(md, "category geo &amp; &lt;b&gt; ("));
    ck_assert_ptr_nonnull(strstr(md, "category (none) (8 examples)"));

    // report.html: self-contained, names escaped, one chart mark per system
    char *h = read_all(dir, "report.html");
    ck_assert_ptr_null(strstr(h, "<script"));
    ck_assert_ptr_null(strstr(h, "<link"));
    ck_assert_ptr_null(strstr(h, "url("));
    ck_assert_ptr_null(strstr(h, "src="));
    ck_assert_int_eq(count(h, "http"), count(h, "xmlns=\"http://www.w3.org/2000/svg\""));
    ck_assert_ptr_null(strstr(h, "<r16>"));
    ck_assert_ptr_null(strstr(h, "\"x\""));
    ck_assert_ptr_nonnull(strstr(h, "lora &lt;r16&gt; &amp; &quot;x&quot;"));
    ck_assert_ptr_nonnull(strstr(h, "it&#39;s"));
    ck_assert_int_eq(count(h, "<svg "), 2 * 2 + 2); // per metric: means, differences; 2 histograms
    ck_assert_int_eq(count(h, "<g class=\"point\""), 2 * (3 + 2));
    ck_assert_int_eq(count(h, "<table>"), 4);

    // the same seed: the same bytes; another seed: other intervals
    const char *names[] = {"report.md", "report.json", "samples.jsonl", "report.html"};
    for (int k = 0; k < 4; k++) {
        char *a = read_all(dir, names[k]), *b = read_all(dir2, names[k]);
        ck_assert_msg(strcmp(a, b) == 0, "%s differs between two writes", names[k]);
        free(a);
        free(b);
    }
    ev_report r2;
    ev_boot_opts o2 = opts(6);
    ck_assert_ok(ev_report_compute(&r2, ds, 1, &o2));
    ck_assert_ok(ev_report_write(&r2, dir3, NULL));
    char *js3 = read_all(dir3, "report.json");
    ck_assert(strcmp(js, js3) != 0);
    ev_report_free(&r2);

    // the summary table
    char *buf = NULL;
    size_t blen = 0;
    FILE *mf = open_memstream(&buf, &blen);
    ev_report_print(&r, mf);
    fclose(mf);
    ck_assert_ptr_nonnull(strstr(buf, "qa <set> (task generate, 40 examples)"));
    ck_assert_ptr_nonnull(strstr(buf, "base (baseline)"));
    ck_assert_int_eq(count(buf, "\n"), 2 + 2 * 3);
    free(buf);

    // bad configuration text, unwritable directory
    ck_assert_int_eq(ev_report_write(&r, dir3, "[1, 2]"), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "must be a JSON object"));
    ck_assert_int_eq(ev_report_write(&r, dir3, "{oops"), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "configuration is not JSON"));
    char file_as_dir[128];
    snprintf(file_as_dir, sizeof file_as_dir, "%s/report.md/sub", dir3);
    ck_assert_int_eq(ev_report_write(&r, file_as_dir, NULL), MOLT_EIO);

    free(js);
    free(js3);
    free(sm);
    free(md);
    free(h);
    rm_dir(dir);
    rm_dir(dir2);
    rm_dir(dir3);
    ev_report_free(&r);
    ev_dataset_free(&d);
}
END_TEST

START_TEST(test_svg_marks_and_escaping) {
    ev_sb b;
    ev_sb_init(&b);
    ev_svg_point p[3] = {{"a<b", 0.5, 0.4, 0.6, true, 0}, {"c&d", 0.7, 0.6, 0.8, false, 1},
                         {"\"q\"", 0.2, NAN, NAN, false, 2}};
    ev_svg_intervals(&b, "t <1>", "x & y", p, 3, false);
    ck_assert_ok(ev_sb_status(&b, "svg"));
    ck_assert_int_eq(count(b.s, "<circle"), 3);
    ck_assert_int_eq(count(b.s, "stroke-width=\"2\""), 2); // no interval bar for NaN bounds
    ck_assert_ptr_nonnull(strstr(b.s, "a&lt;b (baseline)"));
    ck_assert_ptr_nonnull(strstr(b.s, "c&amp;d"));
    ck_assert_ptr_nonnull(strstr(b.s, "&quot;q&quot;"));
    ck_assert_ptr_nonnull(strstr(b.s, "<title>t &lt;1&gt;</title>"));
    int w, h;
    ev_svg_size(EV_SVG_INTERVALS, 3, &w, &h);
    char want[64];
    snprintf(want, sizeof want, "width=\"%d\" height=\"%d\"", w, h);
    ck_assert_ptr_nonnull(strstr(b.s, want));
    ev_sb_free(&b);

    double x[7] = {-1, -0.5, 0, 0, 0.25, 3, NAN};
    ev_sb_init(&b);
    ev_svg_histogram(&b, "h", "d", x, 7, 4, 1);
    ck_assert_int_lt(count(b.s, "class=\"bar\""), 5);
    ck_assert_int_ge(count(b.s, "class=\"bar\""), 3);
    ck_assert_ptr_nonnull(strstr(b.s, "stroke-dasharray")); // the line at 0
    ev_sb_free(&b);

    double xs[4] = {1, 2, 3, 4}, y1[4] = {3, 2, NAN, 1}, y2[4] = {NAN, 2.5, NAN, 1.5};
    ev_svg_series s[2] = {{"train", xs, y1, 4, false}, {"eval <x>", xs, y2, 4, true}};
    ev_sb_init(&b);
    ev_svg_lines(&b, "loss", "step", "loss", s, 2);
    ck_assert_int_eq(count(b.s, "<polyline"), 3); // the gap splits train; eval joins its points
    ck_assert_int_eq(count(b.s, "<circle"), 2);
    ck_assert_ptr_nonnull(strstr(b.s, "eval &lt;x&gt;"));
    ev_sb_free(&b);
    // degenerate input draws an empty frame, no NaN coordinates
    ev_sb_init(&b);
    ev_svg_histogram(&b, "empty", "d", x, 0, 10, 0);
    ev_svg_lines(&b, "flat", "step", "v", s, 0);
    ev_svg_intervals(&b, "none", "x", p, 0, true);
    ck_assert_ptr_null(strstr(b.s, "nan"));
    ck_assert_ptr_null(strstr(b.s, "inf"));
    ev_sb_free(&b);
}
END_TEST

START_TEST(test_xml_escape_cleans_bytes) {
    ev_sb b;
    ev_sb_init(&b);
    ev_sb_xml(&b, "ok \x01 \xc3\xa9 \xed\xa0\x80 \xc0\xaf \xf4\x90\x80\x80 \xe2\x82");
    ck_assert_str_eq(b.s, "ok \xef\xbf\xbd \xc3\xa9 \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd "
                          "\xef\xbf\xbd\xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"
                          "\xef\xbf\xbd \xef\xbf\xbd\xef\xbf\xbd");
    ev_sb_free(&b);
    ev_sb_init(&b);
    ev_sb_md(&b, "a|b\\c\nd<e>&");
    ck_assert_str_eq(b.s, "a\\|b\\\\c d&lt;e&gt;&amp;");
    ev_sb_free(&b);
}
END_TEST

START_TEST(test_bad_results_errors) {
    ev_metric_def m[2] = {{"em", true, false}, {"em", false, false}};
    const char *two[2] = {"a", "a"}, *ok2[2] = {"a", "b"};
    ev_dataset d;
    ck_assert_int_eq(ev_dataset_init(&d, "ds", "t", 2, two, 0, 1, m), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "dataset ds: two systems are named 'a'"));
    ck_assert_int_eq(ev_dataset_init(&d, "ds", "t", 2, ok2, 0, 2, m), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "two metrics are named 'em'"));
    ck_assert_int_eq(ev_dataset_init(&d, "ds", "t", 2, ok2, 2, 1, m), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "baseline 2 out of range"));
    ck_assert_int_eq(ev_dataset_init(&d, "ds", "t", 0, ok2, 0, 1, m), MOLT_EARG);
    ck_assert_int_eq(ev_dataset_init(&d, "ds", "t", 2, ok2, 0, 0, m), MOLT_EARG);

    ck_assert_ok(ev_dataset_init(&d, "ds", "t", 2, ok2, 1, 1, m));
    ck_assert_int_eq(ev_dataset_system(&d, "b"), 1);
    ck_assert_int_eq(ev_dataset_system(&d, "c"), -1);
    ev_boot_opts o = opts(1);
    ev_dataset_stats st;
    ck_assert_int_eq(ev_dataset_stats_compute(&d, &o, &st), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "dataset ds: no examples (empty eval set)"));
    double one = 1, zero = 0, half = 0.5, nan = NAN, inf = INFINITY;
    ck_assert_ok(ev_dataset_add(&d, "e0", NULL, "t"));
    ck_assert_ok(ev_dataset_add(&d, "e1", "c", NULL));
    ck_assert_int_eq(ev_dataset_add(&d, NULL, NULL, NULL), MOLT_EARG);
    ck_assert_ok(ev_dataset_set(&d, 0, 0, "p", NAN, &one));
    ck_assert_int_eq(ev_dataset_set(&d, 0, 0, "p", NAN, &one), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "example e0 already has a result for system a"));
    ck_assert_int_eq(ev_dataset_set(&d, 2, 0, "p", NAN, &one), MOLT_EARG);
    ck_assert_int_eq(ev_dataset_set(&d, 0, 2, "p", NAN, &one), MOLT_EARG);
    ck_assert_int_eq(ev_dataset_stats_compute(&d, &o, &st), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "example e0 (index 0) has no result for system b"));
    ck_assert_ok(ev_dataset_set(&d, 0, 1, NULL, NAN, &half));
    ck_assert_ok(ev_dataset_set(&d, 1, 0, NULL, NAN, &zero));
    ck_assert_ok(ev_dataset_set(&d, 1, 1, NULL, NAN, &nan));
    ck_assert_int_eq(ev_dataset_stats_compute(&d, &o, &st), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "example e0, system b: metric em is 0.5 "
                                                 "(expected 0 or 1"));
    d.ex[0].values[1] = inf;
    ck_assert_int_eq(ev_dataset_stats_compute(&d, &o, &st), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "metric em is inf"));
    d.ex[0].values[1] = nan; // b now has no value at all
    ck_assert_int_eq(ev_dataset_stats_compute(&d, &o, &st), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "metric em: system b has no values (all 2 "
                                                 "missing)"));
    d.ex[1].values[1] = 1; // b has a value, but never beside a value of a
    d.ex[1].values[0] = nan;
    ck_assert_int_eq(ev_dataset_stats_compute(&d, &o, &st), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "no example has values for both a and the "
                                                 "baseline b"));
    d.ex[0].values[1] = 1; // now complete; the category table of "c" has no pair: NaN, no error
    ck_assert_ok(ev_dataset_stats_compute(&d, &o, &st));
    ck_assert_int_eq(st.n_tables, 3);
    ck_assert_int_eq(st.tables[1].cmp[0].n, 0);
    ck_assert(isnan(st.tables[1].p[0]));
    ev_dataset_stats_free(&st);

    const ev_dataset *ds[2] = {&d, &d};
    ev_report r;
    ck_assert_int_eq(ev_report_compute(&r, ds, 2, &o), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "two datasets are named 'ds'"));
    ck_assert_int_eq(ev_report_compute(&r, ds, 0, &o), MOLT_EARG);
    ev_dataset_free(&d);
}
END_TEST

START_TEST(test_allocation_failures_are_reported) {
    ev_dataset d;
    make_dataset(&d);
    const ev_dataset *ds[1] = {&d};
    ev_boot_opts o = opts(2);
    o.n_resamples = 50;
    // every allocation of the computation failing in turn: an error, never a crash or leak
    int failures = 0;
    for (long k = 0; k < 400; k++) {
        ev_report r;
        molt_alloc_fail_after(k);
        molt_status st = ev_report_compute(&r, ds, 1, &o);
        molt_alloc_fail_after(-1);
        if (st == MOLT_OK) {
            ev_report_free(&r);
            break;
        }
        ck_assert_int_eq(st, MOLT_ENOMEM);
        failures++;
    }
    ck_assert_int_gt(failures, 10);
    // and while writing the files
    ev_report r;
    ck_assert_ok(ev_report_compute(&r, ds, 1, &o));
    char dir[64];
    tmpdir(dir, sizeof dir);
    failures = 0;
    for (long k = 0; k < 400; k++) {
        molt_alloc_fail_after(k);
        molt_status st = ev_report_write(&r, dir, NULL);
        molt_alloc_fail_after(-1);
        if (st == MOLT_OK)
            break;
        ck_assert_int_eq(st, MOLT_ENOMEM);
        failures++;
    }
    ck_assert_int_gt(failures, 5);
    rm_dir(dir);
    ev_report_free(&r);
    ev_dataset_free(&d);
}
END_TEST

int main(void) {
    Suite *s = suite_create("eval_report");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_tables_match_standalone_statistics);
    tcase_add_test(tc, test_report_files);
    tcase_add_test(tc, test_svg_marks_and_escaping);
    tcase_add_test(tc, test_xml_escape_cleans_bytes);
    tcase_add_test(tc, test_bad_results_errors);
    tcase_add_test(tc, test_allocation_failures_are_reported);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
