// tests/test_eval_stats.c: molt's evaluation statistics (infer/eval/stats.c) against the
// fixture of tools/reference/eval_stats_reference.py: bootstrap intervals and p-values
// replayed with molt's generator in NumPy (to 1e-12) and from SciPy's own bootstrap (within
// the Monte-Carlo tolerance the fixture states), McNemar's exact test and Holm's correction
// from statsmodels; plus properties (many columns at once equal one at a time, determinism
// per seed, NaN handling) and the errors for bad input.
#include "harness/harness.h"
#include "infer/eval/eval.h"
#include "infer/eval/internal.h"

#include <jansson.h>
#include <math.h>
#include <string.h>

static json_t *fx;

static void load_fixture(void) {
    const char *root = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/fixtures/eval/stats.json", root ? root : ".");
    json_error_t err;
    fx = json_load_file(path, 0, &err);
    if (!fx) {
        fprintf(stderr, "cannot read %s: %s (line %d)\n", path, err.text, err.line);
        exit(1);
    }
}

static double num(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    ck_assert_msg(v != NULL, "fixture lacks %s", key);
    return json_is_null(v) ? NAN : json_number_value(v);
}

static double tol(const char *key) { return num(json_object_get(fx, "tolerance"), key); }

// The values of one system (null -> NaN) into a new array; *n gets the count.
static double *column(json_t *ds, const char *sys, int64_t *n) {
    json_t *a = json_object_get(json_object_get(ds, "systems"), sys);
    ck_assert(a && json_is_array(a));
    *n = (int64_t)json_array_size(a);
    double *x = malloc(sizeof(double) * (size_t)*n);
    for (int64_t i = 0; i < *n; i++) {
        json_t *v = json_array_get(a, (size_t)i);
        x[i] = json_is_null(v) ? NAN : json_number_value(v);
    }
    return x;
}

static ev_boot_opts opts_at(size_t k) {
    json_t *o = json_array_get(json_object_get(fx, "opts"), k);
    ev_boot_opts r = {.n_resamples = (int)num(o, "n_resamples"), .level = num(o, "level"),
                      .seed = (uint64_t)num(o, "seed")};
    return r;
}

static void close_abs(double got, double want, double t, const char *what, const char *ds,
                      const char *sys) {
    ck_assert_msg(fabs(got - want) <= t, "%s %s %s: got %.17g want %.17g (tol %g)", ds, sys,
                  what, got, want, t);
}

static ev_metric_def metric_of(json_t *ds) {
    ev_metric_def m = {.name = json_string_value(json_object_get(ds, "name")),
                       .binary = json_is_true(json_object_get(ds, "binary")),
                       .lower_is_better = json_is_true(json_object_get(ds, "lower_is_better"))};
    return m;
}

// ---------------------------------------------------------------------------------------

START_TEST(test_generator_indices_match_replay) {
    // the replay's reimplementation of xoshiro256** + splitmix64 and floor(u * n)
    json_t *cases = json_object_get(fx, "indices"), *c;
    size_t k;
    json_array_foreach(cases, k, c) {
        uint64_t seed = strtoull(json_string_value(json_object_get(c, "seed")), NULL, 10);
        int64_t n = (int64_t)num(c, "n");
        ag_rng r;
        ag_rng_seed(&r, seed);
        json_t *first = json_object_get(c, "first");
        for (size_t i = 0; i < json_array_size(first); i++) {
            int64_t got = (int64_t)(ag_rng_uniform(&r) * (double)n);
            ck_assert_int_eq(got, json_integer_value(json_array_get(first, i)));
        }
    }
}
END_TEST

START_TEST(test_bootstrap_replay_exact) {
    double t = tol("replay_abs");
    json_t *dss = json_object_get(fx, "datasets"), *ds;
    size_t di;
    int checked = 0;
    json_array_foreach(dss, di, ds) {
        const char *name = json_string_value(json_object_get(ds, "name"));
        const char *bname = json_string_value(json_object_get(ds, "baseline"));
        ev_metric_def m = metric_of(ds);
        int64_t nb;
        double *base = column(ds, bname, &nb);
        json_t *rep = json_object_get(ds, "replay"), *r;
        size_t k;
        json_array_foreach(rep, k, r) {
            ev_boot_opts o = opts_at(k);
            const char *sys;
            json_t *want;
            json_object_foreach(json_object_get(r, "mean"), sys, want) {
                int64_t n;
                double *x = column(ds, sys, &n);
                ev_mean_ci ci;
                ck_assert_ok(ev_boot_mean(x, n, &o, &ci));
                ck_assert_int_eq(ci.n, (int64_t)num(want, "n"));
                ck_assert_int_eq(ci.n_missing, (int64_t)num(want, "n_missing"));
                close_abs(ci.mean, num(want, "mean"), t, "mean", name, sys);
                close_abs(ci.lo, num(want, "lo"), t, "lo", name, sys);
                close_abs(ci.hi, num(want, "hi"), t, "hi", name, sys);
                free(x);
                checked++;
            }
            json_object_foreach(json_object_get(r, "paired"), sys, want) {
                int64_t n;
                double *x = column(ds, sys, &n);
                ev_paired p;
                ck_assert_ok(ev_boot_paired(x, n, base, nb, &m, &o, &p));
                ck_assert_int_eq(p.n, (int64_t)num(want, "n"));
                ck_assert_int_eq(p.n_missing, (int64_t)num(want, "n_missing"));
                close_abs(p.diff, num(want, "mean"), t, "diff", name, sys);
                close_abs(p.lo, num(want, "lo"), t, "diff lo", name, sys);
                close_abs(p.hi, num(want, "hi"), t, "diff hi", name, sys);
                close_abs(p.p_boot, num(want, "p"), t, "p", name, sys);
                ck_assert_int_eq(p.win, (int64_t)num(want, "win"));
                ck_assert_int_eq(p.tie, (int64_t)num(want, "tie"));
                ck_assert_int_eq(p.loss, (int64_t)num(want, "loss"));
                if (m.binary) {
                    ck_assert_int_eq(p.n01, (int64_t)num(want, "n01"));
                    ck_assert_int_eq(p.n10, (int64_t)num(want, "n10"));
                    double pm = num(want, "p_mcnemar");
                    ck_assert_msg(fabs(p.p_mcnemar - pm) <= tol("mcnemar_rel") * pm,
                                  "%s %s McNemar: %.17g vs %.17g", name, sys, p.p_mcnemar, pm);
                } else {
                    ck_assert(isnan(p.p_mcnemar));
                }
                free(x);
                checked++;
            }
        }
        free(base);
    }
    ck_assert_int_ge(checked, 20);
}
END_TEST

START_TEST(test_bootstrap_within_scipy_tolerance) {
    ev_boot_opts o = opts_at(0);
    double tsd = tol("interval_sd"), pse = tol("p_se"), pabs = tol("p_abs");
    double worst = 0; // largest |molt - scipy| / tolerance, reported
    json_t *dss = json_object_get(fx, "datasets"), *ds;
    size_t di;
    int checked = 0;
    json_array_foreach(dss, di, ds) {
        json_t *sc = json_object_get(ds, "scipy");
        if (json_is_null(sc))
            continue;
        const char *name = json_string_value(json_object_get(ds, "name"));
        ev_metric_def m = metric_of(ds);
        int64_t nb;
        double *base = column(ds, json_string_value(json_object_get(ds, "baseline")), &nb);
        double atom = m.binary ? 1.0 / (double)nb : 0; // one step of the discrete resample mean
        const char *sys;
        json_t *w;
        json_object_foreach(json_object_get(sc, "mean"), sys, w) {
            int64_t n;
            double *x = column(ds, sys, &n);
            ev_mean_ci ci;
            ck_assert_ok(ev_boot_mean(x, n, &o, &ci));
            double t = tsd * num(w, "sd") + atom;
            close_abs(ci.lo, num(w, "lo"), t, "lo vs SciPy", name, sys);
            close_abs(ci.hi, num(w, "hi"), t, "hi vs SciPy", name, sys);
            worst = fmax(worst, fmax(fabs(ci.lo - num(w, "lo")), fabs(ci.hi - num(w, "hi"))) / t);
            free(x);
            checked++;
        }
        json_object_foreach(json_object_get(sc, "paired"), sys, w) {
            int64_t n;
            double *x = column(ds, sys, &n);
            ev_paired p;
            ck_assert_ok(ev_boot_paired(x, n, base, nb, &m, &o, &p));
            double t = tsd * num(w, "sd") + atom;
            close_abs(p.lo, num(w, "lo"), t, "diff lo vs SciPy", name, sys);
            close_abs(p.hi, num(w, "hi"), t, "diff hi vs SciPy", name, sys);
            double ps = num(w, "p");
            double tp = pse * sqrt(ps * (1 - ps) / o.n_resamples) + pabs;
            close_abs(p.p_boot, ps, tp, "p vs SciPy", name, sys);
            worst = fmax(worst, fabs(p.p_boot - ps) / tp);
            free(x);
            checked++;
        }
        free(base);
    }
    ck_assert_int_ge(checked, 9);
    printf("bootstrap vs SciPy: worst difference %.2f of the tolerance (%d checks)\n", worst,
           checked);
}
END_TEST

START_TEST(test_mcnemar_matches_statsmodels) {
    json_t *cases = json_object_get(fx, "mcnemar"), *c;
    size_t k;
    json_array_foreach(cases, k, c) {
        double p, want = num(c, "p");
        ck_assert_ok(ev_mcnemar_exact((int64_t)num(c, "n01"), (int64_t)num(c, "n10"), &p));
        ck_assert_msg(fabs(p - want) <= tol("mcnemar_rel") * want, "McNemar(%g, %g): %.17g vs "
                      "%.17g", num(c, "n01"), num(c, "n10"), p, want);
    }
    double p;
    ck_assert_int_eq(ev_mcnemar_exact(-1, 3, &p), MOLT_EARG);
    // far in the tail the probability underflows to 0, never NaN
    ck_assert_ok(ev_mcnemar_exact(0, 5000, &p));
    ck_assert(p == 0);
}
END_TEST

START_TEST(test_holm_matches_statsmodels) {
    json_t *cases = json_object_get(fx, "holm"), *c;
    size_t k;
    json_array_foreach(cases, k, c) {
        json_t *pa = json_object_get(c, "p"), *aa = json_object_get(c, "adj");
        int n = (int)json_array_size(pa);
        double p[8], adj[8];
        for (int i = 0; i < n; i++)
            p[i] = json_number_value(json_array_get(pa, (size_t)i));
        ck_assert_ok(ev_holm(p, n, adj));
        for (int i = 0; i < n; i++)
            close_abs(adj[i], json_number_value(json_array_get(aa, (size_t)i)), tol("holm_abs"),
                      "Holm", "case", "");
        ck_assert_ok(ev_holm(p, n, p)); // in place
        for (int i = 0; i < n; i++)
            ck_assert(p[i] == adj[i]);
    }
    // NaN entries pass through and do not count toward m
    double p[4] = {0.01, NAN, 0.04, NAN}, adj[4];
    ck_assert_ok(ev_holm(p, 4, adj));
    ck_assert(fabs(adj[0] - 0.02) < 1e-15 && fabs(adj[2] - 0.04) < 1e-15);
    ck_assert(isnan(adj[1]) && isnan(adj[3]));
    p[0] = 1.5;
    ck_assert_int_eq(ev_holm(p, 4, adj), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "p-value 0 is 1.5"));
}
END_TEST

START_TEST(test_columns_share_one_stream) {
    // k columns at once give what each column gives alone (the same resamples)
    enum { N = 23, K = 3 };
    double x[N * K], col[N];
    ag_rng r;
    ag_rng_seed(&r, 5);
    for (int i = 0; i < N * K; i++)
        x[i] = ag_rng_uniform(&r) < 0.1 ? NAN : ag_rng_normal(&r);
    ev_boot_opts o;
    ev_boot_opts_default(&o);
    o.n_resamples = 3000;
    o.seed = 99;
    ev_boot_col all[K], one;
    ck_assert_ok(ev_boot_columns(x, N, K, &o, all));
    for (int c = 0; c < K; c++) {
        for (int i = 0; i < N; i++)
            col[i] = x[i * K + c];
        ck_assert_ok(ev_boot_columns(col, N, 1, &o, &one));
        ck_assert(one.n == all[c].n && one.mean == all[c].mean && one.lo == all[c].lo &&
                  one.hi == all[c].hi && one.p == all[c].p);
    }
    // the same seed gives the same numbers; another seed other ones
    ev_boot_col again, other;
    ck_assert_ok(ev_boot_columns(col, N, 1, &o, &again));
    o.seed = 100;
    ck_assert_ok(ev_boot_columns(col, N, 1, &o, &other));
    ck_assert(again.lo == one.lo && again.hi == one.hi);
    ck_assert(other.lo != one.lo || other.hi != one.hi);
    ck_assert(other.mean == one.mean);
}
END_TEST

START_TEST(test_interval_properties) {
    // constant data: a zero-width interval at the value; a difference of exactly 0: p = 1
    double c[5] = {0.5, 0.5, 0.5, 0.5, 0.5}, z[5] = {1, 2, 3, 4, 5};
    ev_boot_opts o;
    ev_boot_opts_default(&o);
    ev_mean_ci ci;
    ck_assert_ok(ev_boot_mean(c, 5, &o, &ci));
    ck_assert(ci.mean == 0.5 && ci.lo == 0.5 && ci.hi == 0.5);
    ev_metric_def m = {.name = "score"};
    ev_paired p;
    ck_assert_ok(ev_boot_paired(z, 5, z, 5, &m, &o, &p));
    ck_assert(p.diff == 0 && p.p_boot == 1 && p.tie == 5 && p.win == 0 && p.loss == 0);
    // the interval holds the mean; a higher level gives a wider interval
    ck_assert_ok(ev_boot_mean(z, 5, &o, &ci));
    ck_assert(ci.lo < ci.mean && ci.mean < ci.hi);
    ev_mean_ci wide;
    o.level = 0.99;
    ck_assert_ok(ev_boot_mean(z, 5, &o, &wide));
    ck_assert(wide.lo <= ci.lo && wide.hi >= ci.hi && wide.hi - wide.lo > ci.hi - ci.lo);
    // lower is better flips wins and losses
    double s[3] = {1, 2, 3}, b[3] = {2, 2, 2};
    m.lower_is_better = true;
    ck_assert_ok(ev_boot_paired(s, 3, b, 3, &m, &o, &p));
    ck_assert(p.win == 1 && p.tie == 1 && p.loss == 1);
}
END_TEST

START_TEST(test_bad_input_errors) {
    ev_boot_opts o;
    ev_boot_opts_default(&o);
    ev_mean_ci ci;
    ev_paired p;
    double x[3] = {1, 2, 3}, nan3[3] = {NAN, NAN, NAN}, inf3[3] = {1, INFINITY, 0};
    ev_metric_def m = {.name = "exact_match", .binary = true};
    ck_assert_int_eq(ev_boot_mean(x, 0, &o, &ci), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "no values"));
    ck_assert_int_eq(ev_boot_mean(nan3, 3, &o, &ci), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "all 3 values are missing"));
    ck_assert_int_eq(ev_boot_mean(inf3, 3, &o, &ci), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "value 1 is infinite"));
    ck_assert_int_eq(ev_boot_paired(x, 3, x, 2, &m, &o, &p), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "exact_match: the system has 3 values, the "
                                                 "baseline 2"));
    ck_assert_int_eq(ev_boot_paired(x, 3, nan3, 3, &m, &o, &p), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "no example has both values"));
    ck_assert_int_eq(ev_boot_paired(x, 3, x, 3, &m, &o, &p), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "exact_match is 0/1 but example 1 has 2"));
    o.n_resamples = 0;
    ck_assert_int_eq(ev_boot_mean(x, 3, &o, &ci), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "resamples must be >= 1"));
    o.n_resamples = 10;
    o.level = 1;
    ck_assert_int_eq(ev_boot_mean(x, 3, &o, &ci), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "confidence level"));
    // allocation failure: an error, not a crash
    o.level = 0.95;
    molt_alloc_fail_after(0);
    ck_assert_int_eq(ev_boot_mean(x, 3, &o, &ci), MOLT_ENOMEM);
    molt_alloc_fail_after(-1);
}
END_TEST

int main(void) {
    load_fixture();
    Suite *s = suite_create("eval_stats");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_generator_indices_match_replay);
    tcase_add_test(tc, test_bootstrap_replay_exact);
    tcase_add_test(tc, test_bootstrap_within_scipy_tolerance);
    tcase_add_test(tc, test_mcnemar_matches_statsmodels);
    tcase_add_test(tc, test_holm_matches_statsmodels);
    tcase_add_test(tc, test_columns_share_one_stream);
    tcase_add_test(tc, test_interval_properties);
    tcase_add_test(tc, test_bad_input_errors);
    suite_add_tcase(s, tc);
    int rc = harness_run(s);
    json_decref(fx);
    return rc;
}
