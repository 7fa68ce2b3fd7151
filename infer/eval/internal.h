// infer/eval/internal.h: what the files of infer/eval/ share and nothing outside uses: the
// multi-column bootstrap behind every interval (stats.c), a growable string with the
// escaping the writers need (text.c), atomic file writes, and the SVG charts (svg.c).
// Not a public API: the runner and molt.c include eval.h only.
#ifndef MOLT_INFER_EVAL_INTERNAL_H
#define MOLT_INFER_EVAL_INTERNAL_H

#include <stdarg.h>
#include <stddef.h>

#include "eval.h"

// ---- bootstrap of several columns at once (stats.c) ----------------------------------
// One column's result: present values, their mean, the percentile interval and the
// shifted-null two-sided p-value (definitions in eval.h).
typedef struct {
    int64_t n;
    double mean, lo, hi, p;
} ev_boot_col;

// Bootstraps the k columns of x (example-major: value of column c on example i at
// x[i*k + c], NaN = missing) with one resample stream (eval.h), writing col[0..k). Every
// column must have a present value and no infinite one (the callers check, with their
// names). MOLT_ENOMEM.
molt_status ev_boot_columns(const double *x, int64_t n, int k, const ev_boot_opts *o,
                            ev_boot_col *col);
// Counts of the complete pairs of sys and base (win/tie/loss, n01/n10, n, n_missing) into
// out, and McNemar's p for binary metrics. MOLT_EARG naming m->name and the example for a
// binary metric's value other than 0/1.
molt_status ev_paired_counts(const double *sys, const double *base, int64_t n,
                             const ev_metric_def *m, ev_paired *out);

// ---- strings (text.c) ----------------------------------------------------------------
// A growable NUL-terminated string. Appends never fail: an allocation failure sets oom and
// later appends do nothing; ev_sb_status reports it once at the end.
typedef struct {
    char *s;
    size_t len, cap;
    bool oom;
} ev_sb;
void ev_sb_init(ev_sb *b);
void ev_sb_free(ev_sb *b);
void ev_sb_put(ev_sb *b, const char *s, size_t n);
void ev_sb_puts(ev_sb *b, const char *s);
void ev_sb_printf(ev_sb *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
// s escaped for XML/HTML text and attribute values (& < > " '); bytes that are not valid
// UTF-8, and control characters XML forbids, become U+FFFD.
void ev_sb_xml(ev_sb *b, const char *s);
// s for a Markdown table cell: | and \ escaped, & < > as entities, newlines as spaces,
// invalid UTF-8 as U+FFFD.
void ev_sb_md(ev_sb *b, const char *s);
// MOLT_ENOMEM ("out of memory building WHAT") when an append failed.
molt_status ev_sb_status(const ev_sb *b, const char *what);
// Copy of s (molt_malloc'ed) with invalid UTF-8 sequences replaced by U+FFFD; NULL on
// allocation failure.
char *ev_utf8_clean(const char *s);
// Writes data[0..n) to path through path.tmp and rename. MOLT_EIO naming path.
molt_status ev_write_file(const char *path, const char *data, size_t n);
// Joins dir and name into a molt_malloc'ed path; NULL on allocation failure.
char *ev_path_join(const char *dir, const char *name);
// A number for tables: 4 decimals for moderate magnitudes, else 3 significant digits in
// exponent form; "nan" for NaN. sign: a leading + for positive values.
void ev_fmt_num(char *buf, size_t cap, double v, bool sign);
// A p-value for tables: "<0.0001" below 1e-4, else 4 decimals; "-" for NaN.
void ev_fmt_p(char *buf, size_t cap, double p);

// ---- report tables (report.c) and page (html.c) ------------------------------------
// The text of one table row's numeric cells (system s, metric j of table t).
enum { EV_N_COLS = 7 };
typedef struct {
    char mean[128], diff[128], p[24], wtl[72], n[24];
} ev_cells;
void ev_report_cells(const ev_dataset *d, const ev_table *t, int j, int s, ev_cells *c);
// The column headers of a table of d (raw text, escaped by the writer).
typedef struct {
    char mean[32], diff[600];
    const char *h[EV_N_COLS];
} ev_headers;
void ev_report_headers(const ev_report *r, const ev_dataset *d, ev_headers *h);
// The paragraph that says how the numbers were computed (plain text, no markup).
void ev_report_note(const ev_report *r, ev_sb *b);
// report.html at path.
molt_status ev_report_write_html(const ev_report *r, const char *path);

// ---- SVG charts (svg.c) --------------------------------------------------------------
// Each chart is a standalone <svg> element with xmlns, width and height in px, a title
// and labelled axes; labels are escaped. The caller places it in HTML or a file.
typedef struct {
    const char *label;
    double mean, lo, hi; // lo/hi NaN: no interval drawn
    bool highlight;      // drawn in the baseline colour and marked "(baseline)"
    int color;           // palette index (the system's index, so a system keeps its colour
                         // across charts); unused when highlight
} ev_svg_point;
// One row per point: a dot at the mean and a bar from lo to hi on a shared x axis; with
// zero_line, 0 is kept in range and marked (differences against a baseline).
void ev_svg_intervals(ev_sb *b, const char *title, const char *x_label, const ev_svg_point *p,
                      int n, bool zero_line);
// Histogram of x[0..n) (finite values) in `bins` equal bins, with a line at 0 when 0 is in
// range; bars in palette colour `color`.
void ev_svg_histogram(ev_sb *b, const char *title, const char *x_label, const double *x,
                      int64_t n, int bins, int color);
typedef struct {
    const char *name;
    const double *x, *y; // [n]; points with a non-finite y are gaps in the line
    int64_t n;
    bool markers;         // a dot at each point, lines across gaps (sparse series such as
                          // eval loss)
} ev_svg_series;
// Line chart of several series on shared axes, with a legend.
void ev_svg_lines(ev_sb *b, const char *title, const char *x_label, const char *y_label,
                  const ev_svg_series *s, int n);
// The size every chart of that kind gets (for tests and layout).
void ev_svg_size(int kind, int n_rows, int *w, int *h);
enum { EV_SVG_INTERVALS, EV_SVG_HISTOGRAM, EV_SVG_LINES };

// Opening of a self-contained HTML page (inline CSS, UTF-8) and its end.
void ev_html_begin(ev_sb *b, const char *title);
void ev_html_end(ev_sb *b);

#endif
