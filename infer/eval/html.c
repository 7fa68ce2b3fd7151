// infer/eval/html.c: report.html of a `molt eval` run: per dataset the table of report.md
// as HTML, then the charts (inline SVG, svg.c): per metric each system's mean with its
// interval and each system's difference from the baseline with its interval, and per system
// a histogram of per-example loss differences against the baseline; then the per-category
// tables. The page needs nothing but itself: no script, no font, no URL.
//
// Not here: the numbers (results.c), the other report files (report.c).
#include "internal.h"

#include <math.h>
#include <string.h>

static void html_table(const ev_report *r, const ev_dataset *d, const ev_table *t, ev_sb *b) {
    ev_headers h;
    ev_report_headers(r, d, &h);
    ev_sb_puts(b, "<table>\n<tr>");
    for (int k = 0; k < EV_N_COLS; k++) {
        ev_sb_puts(b, "<th>");
        ev_sb_xml(b, h.h[k]);
        ev_sb_puts(b, "</th>");
    }
    ev_sb_puts(b, "</tr>\n");
    for (int j = 0; j < d->n_metrics; j++)
        for (int s = 0; s < d->n_systems; s++) {
            ev_cells c;
            ev_report_cells(d, t, j, s, &c);
            ev_sb_puts(b, "<tr><td>");
            ev_sb_xml(b, d->systems[s]);
            ev_sb_puts(b, s == d->baseline ? " (baseline)</td><td>" : "</td><td>");
            ev_sb_xml(b, d->metrics[j].name);
            ev_sb_puts(b, "</td>");
            const char *v[5] = {c.mean, c.diff, c.p, c.wtl, c.n};
            for (int k = 0; k < 5; k++) {
                ev_sb_puts(b, "<td>");
                ev_sb_xml(b, v[k]);
                ev_sb_puts(b, "</td>");
            }
            ev_sb_puts(b, "</tr>\n");
        }
    ev_sb_puts(b, "</table>\n");
}

// The two interval charts of metric j: means, then differences from the baseline.
static molt_status metric_charts(const ev_report *r, const ev_dataset *d, const ev_table *t,
                                 int j, ev_sb *b) {
    int S = d->n_systems;
    ev_svg_point *pt = molt_malloc(sizeof *pt * (size_t)S);
    if (!pt)
        return molt_err(MOLT_ENOMEM, "report.html: out of memory");
    for (int s = 0; s < S; s++) {
        const ev_mean_ci *m = &t->mean[j * S + s];
        pt[s] = (ev_svg_point){d->systems[s], m->mean, m->lo, m->hi, s == d->baseline, s};
    }
    char title[400], axis[400];
    int pct = (int)lround(r->boot.level * 100);
    snprintf(title, sizeof title, "%s: mean and %d%% interval", d->metrics[j].name, pct);
    snprintf(axis, sizeof axis, "%s%s", d->metrics[j].name,
             d->metrics[j].lower_is_better ? " (lower is better)" : "");
    ev_svg_intervals(b, title, axis, pt, S, false);
    int n = 0;
    for (int s = 0; s < S; s++) {
        if (s == d->baseline)
            continue;
        const ev_paired *p = &t->cmp[j * S + s];
        pt[n++] = (ev_svg_point){d->systems[s], p->diff, p->lo, p->hi, false, s};
    }
    if (n > 0) {
        snprintf(title, sizeof title, "%s: difference from %s, %d%% paired interval",
                 d->metrics[j].name, d->systems[d->baseline], pct);
        snprintf(axis, sizeof axis, "%s - %s (%s)", d->metrics[j].name,
                 d->systems[d->baseline], d->metrics[j].lower_is_better ? "below 0 is better"
                                                                         : "above 0 is better");
        ev_svg_intervals(b, title, axis, pt, n, true);
    }
    molt_free(pt);
    return MOLT_OK;
}

static molt_status dataset_section(const ev_report *r, const ev_dataset_stats *st, ev_sb *b) {
    const ev_dataset *d = st->d;
    ev_sb_puts(b, "<h2>");
    ev_sb_xml(b, d->name);
    ev_sb_printf(b, "</h2>\n<p>task ");
    ev_sb_xml(b, d->task);
    ev_sb_printf(b, ", %lld examples, baseline ", (long long)d->n_examples);
    ev_sb_xml(b, d->systems[d->baseline]);
    ev_sb_puts(b, "</p>\n");
    html_table(r, d, &st->tables[0], b);
    for (int j = 0; j < d->n_metrics; j++)
        MOLT_TRY(metric_charts(r, d, &st->tables[0], j, b));
    for (int s = 0; s < d->n_systems; s++) {
        int64_t n = st->n_loss_diff[s];
        if (s == d->baseline || n == 0)
            continue;
        char title[600];
        snprintf(title, sizeof title, "per-example loss: %s - %s (%lld examples)", d->systems[s],
                 d->systems[d->baseline], (long long)n);
        int bins = (int)ceil(sqrt((double)n));
        bins = bins < 5 ? 5 : bins > 40 ? 40 : bins;
        ev_svg_histogram(b, title, "loss difference (below 0: lower loss than the baseline)",
                         st->loss_diff[s], n, bins, s);
    }
    for (int k = 1; k < st->n_tables; k++) {
        const ev_table *t = &st->tables[k];
        ev_sb_puts(b, "<h3>");
        ev_sb_xml(b, d->name);
        ev_sb_puts(b, ", category ");
        ev_sb_xml(b, t->category[0] ? t->category : "(none)");
        ev_sb_printf(b, " (%lld examples)</h3>\n", (long long)t->n_examples);
        html_table(r, d, t, b);
    }
    return MOLT_OK;
}

molt_status ev_report_write_html(const ev_report *r, const char *path) {
    ev_sb b;
    ev_sb_init(&b);
    ev_html_begin(&b, "molt eval report");
    ev_sb_puts(&b, "<h1>molt eval report</h1>\n<p class=\"note\">");
    ev_report_note(r, &b);
    ev_sb_puts(&b, "</p>\n");
    molt_status st = MOLT_OK;
    for (int i = 0; st == MOLT_OK && i < r->n; i++)
        st = dataset_section(r, &r->ds[i], &b);
    ev_html_end(&b);
    if (st == MOLT_OK)
        st = ev_sb_status(&b, path);
    if (st == MOLT_OK)
        st = ev_write_file(path, b.s, b.len);
    ev_sb_free(&b);
    return st;
}
