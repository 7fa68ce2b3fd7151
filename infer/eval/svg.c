// infer/eval/svg.c: the charts of the reports, drawn as standalone SVG elements: means (or
// differences) with their intervals, one row per system; a histogram; a line chart of
// several series against a shared x axis. Also the head and tail of the self-contained HTML
// page the charts go into. Every label goes through ev_sb_xml; nothing refers to a URL but
// the SVG namespace.
//
// Not here: which charts a report has (html.c, cli_report.c).
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define W 720
#define FONT "font-family=\"sans-serif\""

static const char *const palette[] = {"#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
                                      "#edc948", "#b07aa1", "#ff9da7", "#9c755f"};
#define N_PALETTE (int)(sizeof palette / sizeof *palette)
#define BASE_COLOR "#555555"

void ev_svg_size(int kind, int n_rows, int *w, int *h) {
    *w = W;
    *h = kind == EV_SVG_INTERVALS ? 40 + 26 * (n_rows > 0 ? n_rows : 1) + 50
                                  : kind == EV_SVG_HISTOGRAM ? 300 : 320;
}

// A linear axis with "nice" ticks (1, 2 or 5 times a power of ten) covering [lo, hi].
typedef struct {
    double lo, hi, step; // domain, extended to whole steps
    int decimals;        // for tick labels; -1: exponent form
} axis;

// target: about how many steps the axis should have.
static axis make_axis(double lo, double hi, int target) {
    if (!isfinite(lo) || !isfinite(hi)) {
        lo = 0;
        hi = 1;
    }
    if (hi < lo) {
        double t = lo;
        lo = hi;
        hi = t;
    }
    if (hi - lo <= 1e-12 * fmax(fabs(lo), fabs(hi)) || hi == lo) {
        double pad = lo == 0 ? 1 : fabs(lo) * 0.1;
        lo -= pad;
        hi += pad;
    }
    double raw = (hi - lo) / target, mag = pow(10, floor(log10(raw))), f = raw / mag;
    double step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
    axis a = {.lo = floor(lo / step) * step, .hi = ceil(hi / step) * step, .step = step};
    double big = fmax(fabs(a.lo), fabs(a.hi));
    a.decimals = (step < 1e-3 || big >= 1e6) ? -1 : (int)fmax(0, -floor(log10(step) + 1e-9));
    return a;
}

// Number of steps between the first and the last tick (at most 50).
static int ticks(const axis *a) {
    double k = round((a->hi - a->lo) / a->step);
    return k < 1 ? 1 : k > 50 ? 50 : (int)k;
}

static double map(const axis *a, double v, double p0, double p1) {
    return p0 + (v - a->lo) / (a->hi - a->lo) * (p1 - p0);
}

static void tick_label(char *buf, size_t cap, const axis *a, double v) {
    if (fabs(v) < a->step * 1e-9)
        v = 0; // no "-0.00"
    if (a->decimals < 0)
        snprintf(buf, cap, "%.3g", v);
    else
        snprintf(buf, cap, "%.*f", a->decimals, v);
}

// The label shortened to at most max bytes on a UTF-8 boundary, with "..." when cut.
static void clip_label(char *out, size_t cap, const char *s, size_t max) {
    size_t n = strlen(s);
    if (n <= max) {
        snprintf(out, cap, "%s", s);
        return;
    }
    while (max > 0 && ((unsigned char)s[max] & 0xC0) == 0x80)
        max--;
    snprintf(out, cap, "%.*s...", (int)max, s);
}

static void svg_open(ev_sb *b, int w, int h, const char *title) {
    ev_sb_printf(b, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
                 "viewBox=\"0 0 %d %d\" role=\"img\">\n<title>", w, h, w, h);
    ev_sb_xml(b, title);
    ev_sb_printf(b, "</title>\n<rect width=\"%d\" height=\"%d\" fill=\"#ffffff\"/>\n"
                 "<text x=\"%d\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" "
                 "font-weight=\"bold\" " FONT ">", w, h, w / 2);
    char shown[128]; // the whole title is in <title>; the heading fits the width
    clip_label(shown, sizeof shown, title, 72);
    ev_sb_xml(b, shown);
    ev_sb_puts(b, "</text>\n");
}

static void text(ev_sb *b, double x, double y, const char *anchor, int size, const char *s) {
    ev_sb_printf(b, "<text x=\"%.2f\" y=\"%.2f\" text-anchor=\"%s\" font-size=\"%d\" " FONT ">",
                 x, y, anchor, size);
    ev_sb_xml(b, s);
    ev_sb_puts(b, "</text>\n");
}

// Horizontal axis at y between x0 and x1: tick marks, labels, light grid lines up to y_top.
static void x_axis(ev_sb *b, const axis *a, double x0, double x1, double y, double y_top,
                   const char *label) {
    ev_sb_printf(b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#333\"/>\n",
                 x0, y, x1, y);
    for (int i = 0, k = ticks(a); i <= k; i++) {
        double v = a->lo + a->step * i, x = map(a, v, x0, x1);
        char l[48];
        tick_label(l, sizeof l, a, v);
        ev_sb_printf(b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#e4e4e4\"/>"
                     "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#333\"/>\n",
                     x, y_top, x, y, x, y, x, y + 5);
        text(b, x, y + 18, "middle", 11, l);
    }
    text(b, (x0 + x1) / 2, y + 36, "middle", 12, label);
}

// Vertical axis at x between y0 (bottom) and y1 (top), with grid lines to x_right.
static void y_axis(ev_sb *b, const axis *a, double x, double x_right, double y0, double y1,
                   const char *label) {
    ev_sb_printf(b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#333\"/>\n",
                 x, y0, x, y1);
    for (int i = 0, k = ticks(a); i <= k; i++) {
        double v = a->lo + a->step * i, y = map(a, v, y0, y1);
        char l[48];
        tick_label(l, sizeof l, a, v);
        ev_sb_printf(b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#e4e4e4\"/>"
                     "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#333\"/>\n",
                     x, y, x_right, y, x - 5, y, x, y);
        text(b, x - 8, y + 4, "end", 11, l);
    }
    ev_sb_printf(b, "<text transform=\"translate(%.2f %.2f) rotate(-90)\" text-anchor=\"middle\" "
                 "font-size=\"12\" " FONT ">", x - 52, (y0 + y1) / 2);
    ev_sb_xml(b, label);
    ev_sb_puts(b, "</text>\n");
}

void ev_svg_intervals(ev_sb *b, const char *title, const char *x_label, const ev_svg_point *p,
                      int n, bool zero_line) {
    int w, h;
    ev_svg_size(EV_SVG_INTERVALS, n, &w, &h);
    double lo = zero_line ? 0 : INFINITY, hi = zero_line ? 0 : -INFINITY;
    size_t longest = 0;
    for (int i = 0; i < n; i++) {
        double vals[3] = {p[i].mean, p[i].lo, p[i].hi};
        for (int k = 0; k < 3; k++)
            if (isfinite(vals[k])) {
                lo = fmin(lo, vals[k]);
                hi = fmax(hi, vals[k]);
            }
        size_t len = strlen(p[i].label) + (p[i].highlight ? 11 : 0);
        longest = len > longest ? len : longest;
    }
    axis a = make_axis(lo, hi, 8);
    double left = fmin(fmax(7.0 * (double)(longest > 40 ? 43 : longest) + 24, 90), 330);
    double x0 = left, x1 = w - 70, top = 40, bottom = top + 26.0 * (n > 0 ? n : 1);
    svg_open(b, w, h, title);
    x_axis(b, &a, x0, x1, bottom, top, x_label);
    if (zero_line && a.lo < 0 && a.hi > 0) {
        double z = map(&a, 0, x0, x1);
        ev_sb_printf(b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#c00\" "
                     "stroke-dasharray=\"4 3\"/>\n", z, top, z, bottom);
    }
    for (int i = 0; i < n; i++) {
        double y = top + 26.0 * i + 13;
        const char *col = p[i].highlight ? BASE_COLOR : palette[abs(p[i].color) % N_PALETTE];
        char l[200], full[240];
        clip_label(l, sizeof l, p[i].label, 40);
        snprintf(full, sizeof full, "%s%s", l, p[i].highlight ? " (baseline)" : "");
        text(b, x0 - 10, y + 4, "end", 12, full);
        ev_sb_printf(b, "<g class=\"point\" fill=\"%s\" stroke=\"%s\">", col, col);
        char m[40], l0[40], h0[40];
        ev_fmt_num(m, sizeof m, p[i].mean, zero_line);
        ev_fmt_num(l0, sizeof l0, p[i].lo, zero_line);
        ev_fmt_num(h0, sizeof h0, p[i].hi, zero_line);
        ev_sb_puts(b, "<title>");
        ev_sb_xml(b, p[i].label);
        ev_sb_printf(b, ": %s [%s, %s]</title>", m, l0, h0);
        if (isfinite(p[i].lo) && isfinite(p[i].hi)) {
            double xl = map(&a, p[i].lo, x0, x1), xh = map(&a, p[i].hi, x0, x1);
            ev_sb_printf(b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" "
                         "stroke-width=\"2\"/>", xl, y, xh, y);
            ev_sb_printf(b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\"/>"
                         "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\"/>",
                         xl, y - 5, xl, y + 5, xh, y - 5, xh, y + 5);
        }
        if (isfinite(p[i].mean))
            ev_sb_printf(b, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"4.5\"/>",
                         map(&a, p[i].mean, x0, x1), y);
        ev_sb_puts(b, "</g>\n");
        text(b, x1 + 8, y + 4, "start", 11, m);
    }
    ev_sb_puts(b, "</svg>\n");
}

void ev_svg_histogram(ev_sb *b, const char *title, const char *x_label, const double *x,
                      int64_t n, int bins, int color) {
    int w, h;
    ev_svg_size(EV_SVG_HISTOGRAM, 0, &w, &h);
    if (bins < 1)
        bins = 1;
    if (bins > 200)
        bins = 200;
    double lo = INFINITY, hi = -INFINITY;
    for (int64_t i = 0; i < n; i++)
        if (isfinite(x[i])) {
            lo = fmin(lo, x[i]);
            hi = fmax(hi, x[i]);
        }
    axis a = make_axis(lo, hi, 8);
    int64_t count[200] = {0}, most = 0;
    double width = (a.hi - a.lo) / bins;
    for (int64_t i = 0; i < n; i++)
        if (isfinite(x[i])) {
            int k = (int)((x[i] - a.lo) / width);
            k = k < 0 ? 0 : k >= bins ? bins - 1 : k;
            count[k]++;
        }
    for (int k = 0; k < bins; k++)
        most = count[k] > most ? count[k] : most;
    axis ya = make_axis(0, most > 0 ? (double)most : 1, 5);
    if (ya.step < 1) { // counts: whole-number ticks
        ya.step = 1;
        ya.hi = ceil(ya.hi);
        ya.decimals = 0;
    }
    ya.lo = 0;
    double x0 = 70, x1 = w - 30, y0 = h - 55, y1 = 40;
    svg_open(b, w, h, title);
    y_axis(b, &ya, x0, x1, y0, y1, "examples");
    x_axis(b, &a, x0, x1, y0, y0, x_label);
    for (int k = 0; k < bins; k++) {
        if (!count[k])
            continue;
        double bl = map(&a, a.lo + width * k, x0, x1), br = map(&a, a.lo + width * (k + 1), x0, x1);
        double top = map(&ya, (double)count[k], y0, y1);
        ev_sb_printf(b, "<rect class=\"bar\" x=\"%.2f\" y=\"%.2f\" width=\"%.2f\" "
                     "height=\"%.2f\" fill=\"%s\" stroke=\"#ffffff\"><title>%lld</title></rect>\n",
                     bl, top, br - bl, y0 - top, palette[abs(color) % N_PALETTE],
                     (long long)count[k]);
    }
    if (a.lo < 0 && a.hi > 0) {
        double z = map(&a, 0, x0, x1);
        ev_sb_printf(b, "<line x1=\"%.2f\" y1=\"%.2f\" x2=\"%.2f\" y2=\"%.2f\" stroke=\"#c00\" "
                     "stroke-dasharray=\"4 3\"/>\n", z, y1, z, y0);
    }
    ev_sb_puts(b, "</svg>\n");
}

void ev_svg_lines(ev_sb *b, const char *title, const char *x_label, const char *y_label,
                  const ev_svg_series *s, int n) {
    int w, h;
    ev_svg_size(EV_SVG_LINES, 0, &w, &h);
    double xl = INFINITY, xh = -INFINITY, yl = INFINITY, yh = -INFINITY;
    for (int k = 0; k < n; k++)
        for (int64_t i = 0; i < s[k].n; i++)
            if (isfinite(s[k].x[i]) && isfinite(s[k].y[i])) {
                xl = fmin(xl, s[k].x[i]);
                xh = fmax(xh, s[k].x[i]);
                yl = fmin(yl, s[k].y[i]);
                yh = fmax(yh, s[k].y[i]);
            }
    axis xa = make_axis(xl, xh, 8), ya = make_axis(yl, yh, 5);
    double x0 = 80, x1 = w - 30, y0 = h - 55, y1 = 58;
    svg_open(b, w, h, title);
    y_axis(b, &ya, x0, x1, y0, y1, y_label);
    x_axis(b, &xa, x0, x1, y0, y0, x_label);
    double lx = x0 + 10;
    for (int k = 0; n > 1 && k < n; k++) { // legend under the title
        const char *col = palette[k % N_PALETTE];
        ev_sb_printf(b, "<line x1=\"%.2f\" y1=\"40\" x2=\"%.2f\" y2=\"40\" stroke=\"%s\" "
                     "stroke-width=\"2.5\"/>\n", lx, lx + 22, col);
        text(b, lx + 28, 44, "start", 12, s[k].name);
        lx += 28 + 7.0 * (double)strlen(s[k].name) + 24;
    }
    for (int k = 0; k < n; k++) {
        const char *col = palette[k % N_PALETTE];
        ev_sb_printf(b, "<g class=\"series\" fill=\"none\" stroke=\"%s\" stroke-width=\"1.8\">"
                     "<title>", col);
        ev_sb_xml(b, s[k].name);
        ev_sb_puts(b, "</title>");
        bool open = false;
        int64_t pts = 0;
        for (int64_t i = 0; i < s[k].n; i++) {
            if (!isfinite(s[k].x[i]) || !isfinite(s[k].y[i])) {
                if (s[k].markers)
                    continue; // a sparse series joins its points across the gaps
                if (open)
                    ev_sb_puts(b, "\"/>");
                open = false;
                continue;
            }
            pts++;
            ev_sb_printf(b, "%s%.2f,%.2f", open ? " " : "<polyline points=\"",
                         map(&xa, s[k].x[i], x0, x1), map(&ya, s[k].y[i], y0, y1));
            open = true;
        }
        if (open)
            ev_sb_puts(b, "\"/>");
        if (s[k].markers || pts == 1)
            for (int64_t i = 0; i < s[k].n; i++)
                if (isfinite(s[k].x[i]) && isfinite(s[k].y[i]))
                    ev_sb_printf(b, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"3.5\" fill=\"%s\"/>",
                                 map(&xa, s[k].x[i], x0, x1), map(&ya, s[k].y[i], y0, y1), col);
        ev_sb_puts(b, "</g>\n");
    }
    ev_sb_puts(b, "</svg>\n");
}

void ev_html_begin(ev_sb *b, const char *title) {
    ev_sb_puts(b, "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
               "<title>");
    ev_sb_xml(b, title);
    ev_sb_puts(b, "</title>\n<style>\n"
               "body { font-family: sans-serif; margin: 2em; color: #222; }\n"
               "table { border-collapse: collapse; margin: 0.5em 0 1.5em; }\n"
               "th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }\n"
               "th { background: #f2f2f2; }\n"
               "td:first-child, td:nth-child(2), th:first-child { text-align: left; }\n"
               "svg { display: block; margin: 0.5em 0 1.5em; }\n"
               "p.note { color: #555; max-width: 60em; }\n"
               "</style>\n</head>\n<body>\n");
}

void ev_html_end(ev_sb *b) { ev_sb_puts(b, "</body>\n</html>\n"); }
