// tests/test_eval_svg.c: every chart infer/eval draws renders with an independent SVG
// renderer: rsvg-convert (librsvg, Debian package librsvg2-bin, installed by
// tools/setup.sh) converts each one, standalone and as cut out of a written report.html, to
// PNG without an error, and the PNG has the width and height the chart declares. Skipped
// (exit 77) when rsvg-convert is not installed.
#include "harness/harness.h"
#include "infer/eval/eval.h"
#include "infer/eval/internal.h"

#include <math.h>
#include <string.h>
#include <unistd.h>

static char dir[64];

// Writes svg[0..n) to DIR/name.svg, converts it, and checks the PNG's size.
static void render(const char *name, const char *svg, size_t n, int w, int h) {
    char in[256], out[256], cmd[800];
    snprintf(in, sizeof in, "%s/%s.svg", dir, name);
    snprintf(out, sizeof out, "%s/%s.png", dir, name);
    FILE *f = fopen(in, "wb");
    ck_assert(f && fwrite(svg, 1, n, f) == n && fclose(f) == 0);
    snprintf(cmd, sizeof cmd, "rsvg-convert -o '%s' '%s' 2>'%s.err'", out, in, out);
    int rc = system(cmd);
    ck_assert_msg(rc == 0, "rsvg-convert failed on %s (status %d; see %s.err)", in, rc, out);
    unsigned char hdr[24];
    f = fopen(out, "rb");
    ck_assert_msg(f && fread(hdr, 1, 24, f) == 24, "no PNG from %s", in);
    fclose(f);
    ck_assert_msg(memcmp(hdr, "\x89PNG\r\n\x1a\n", 8) == 0 && memcmp(hdr + 12, "IHDR", 4) == 0,
                  "%s is not a PNG", out);
    int pw = hdr[16] << 24 | hdr[17] << 16 | hdr[18] << 8 | hdr[19];
    int ph = hdr[20] << 24 | hdr[21] << 16 | hdr[22] << 8 | hdr[23];
    ck_assert_msg(pw == w && ph == h, "%s: %d x %d, expected %d x %d", name, pw, ph, w, h);
    printf("rendered %s: %d x %d\n", name, pw, ph);
}

START_TEST(test_charts_render) {
    ev_sb b;
    int w, h;
    ev_svg_point p[4] = {{"base", 0.41, 0.37, 0.46, true, 0},
                         {"lora <r16> & \"x\" 'y'", 0.52, 0.48, 0.56, false, 1},
                         {"a very long adapter name that goes on and on beyond forty bytes",
                          0.2, 0.1, 0.3, false, 2},
                         {"caf\xc3\xa9 \xff", 0.3, NAN, NAN, false, 3}};
    ev_sb_init(&b);
    ev_svg_intervals(&b, "exact_match: mean and 95% interval", "exact_match", p, 4, false);
    ck_assert_ok(ev_sb_status(&b, "svg"));
    ev_svg_size(EV_SVG_INTERVALS, 4, &w, &h);
    render("intervals", b.s, b.len, w, h);
    ev_sb_free(&b);

    double x[200];
    ag_rng r;
    ag_rng_seed(&r, 3);
    for (int i = 0; i < 200; i++)
        x[i] = ag_rng_normal(&r) * 0.3 - 0.1;
    ev_sb_init(&b);
    ev_svg_histogram(&b, "loss: a - base", "loss difference", x, 200, 15, 1);
    ev_svg_size(EV_SVG_HISTOGRAM, 0, &w, &h);
    render("histogram", b.s, b.len, w, h);
    ev_sb_free(&b);

    double st[50], loss[50], ev[50];
    for (int i = 0; i < 50; i++) {
        st[i] = i + 1;
        loss[i] = 10 * exp(-i / 10.0) + 2;
        ev[i] = i % 10 == 9 ? loss[i] + 0.3 : NAN;
    }
    ev_svg_series s[2] = {{"training loss", st, loss, 50, false}, {"eval loss", st, ev, 50, true}};
    ev_sb_init(&b);
    ev_svg_lines(&b, "loss", "step", "loss", s, 2);
    ev_svg_size(EV_SVG_LINES, 0, &w, &h);
    render("lines", b.s, b.len, w, h);
    ev_sb_free(&b);
}
END_TEST

START_TEST(test_report_html_charts_render) {
    const char *sys[3] = {"base", "r8 <a&b>", "r16"};
    ev_metric_def m[2] = {{"acc", true, false}, {"loss", false, true}};
    ev_dataset d;
    ck_assert_ok(ev_dataset_init(&d, "set", "choice", 3, sys, 0, 2, m));
    ag_rng r;
    ag_rng_seed(&r, 9);
    for (int i = 0; i < 60; i++) {
        char id[16];
        snprintf(id, sizeof id, "%d", i);
        ck_assert_ok(ev_dataset_add(&d, id, NULL, ""));
        for (int s = 0; s < 3; s++) {
            double loss = 2 - 0.2 * s + ag_rng_normal(&r) * 0.3;
            double v[2] = {ag_rng_uniform(&r) < 0.5 + 0.1 * s, loss};
            ck_assert_ok(ev_dataset_set(&d, i, s, NULL, loss, v));
        }
    }
    const ev_dataset *ds[1] = {&d};
    ev_boot_opts o;
    ev_boot_opts_default(&o);
    o.n_resamples = 1000;
    ev_report rep;
    ck_assert_ok(ev_report_compute(&rep, ds, 1, &o));
    ck_assert_ok(ev_report_write(&rep, dir, NULL));
    char path[256];
    snprintf(path, sizeof path, "%s/report.html", dir);
    FILE *f = fopen(path, "rb");
    ck_assert(f != NULL);
    static char html[1 << 20];
    size_t n = fread(html, 1, sizeof html - 1, f);
    fclose(f);
    html[n] = 0;
    int k = 0;
    for (char *a = strstr(html, "<svg "); a; a = strstr(a + 1, "<svg ")) {
        char *e = strstr(a, "</svg>");
        ck_assert(e != NULL);
        int w, h;
        ck_assert(sscanf(strstr(a, "width="), "width=\"%d\" height=\"%d\"", &w, &h) == 2);
        char name[32];
        snprintf(name, sizeof name, "report-%d", k++);
        render(name, a, (size_t)(e + 6 - a), w, h);
    }
    ck_assert_int_eq(k, 2 * 2 + 2); // means and differences per metric, 2 loss histograms
    ev_report_free(&rep);
    ev_dataset_free(&d);
}
END_TEST

int main(void) {
    if (system("rsvg-convert --version >/dev/null 2>&1") != 0) {
        fprintf(stderr, "rsvg-convert not found (Debian: librsvg2-bin, see tools/setup.sh): "
                        "skipped\n");
        return 77;
    }
    snprintf(dir, sizeof dir, "/tmp/molt_eval_svg_XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    Suite *s = suite_create("eval_svg");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_charts_render);
    tcase_add_test(tc, test_report_html_charts_render);
    suite_add_tcase(s, tc);
    int rc = harness_run(s);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    return rc;
}
