// infer/eval/stats.c: the statistics over examples: percentile bootstrap intervals and the
// shifted-null bootstrap p-value (many columns through one resample stream), paired counts
// (win/tie/loss, McNemar's discordant pairs), McNemar's exact test and Holm's correction.
// Definitions are in eval.h; tests/test_eval_stats.c checks them against NumPy, SciPy and
// statsmodels (tools/reference/eval_stats_reference.py).
//
// Not here: which columns make a report table (results.c), formatting (report.c).
#include "internal.h"

#include <math.h>
#include <string.h>

#include "../../autograd/autograd.h"

void ev_boot_opts_default(ev_boot_opts *o) {
    o->n_resamples = 10000;
    o->level = 0.95;
    o->seed = 0;
}

molt_status ev_boot_opts_check(const ev_boot_opts *o) {
    if (o->n_resamples < 1)
        return molt_err(MOLT_EARG, "bootstrap: resamples must be >= 1, got %d", o->n_resamples);
    if (!(o->level > 0 && o->level < 1))
        return molt_err(MOLT_EARG, "bootstrap: confidence level must be in (0, 1), got %g",
                        o->level);
    return MOLT_OK;
}

// Index in [0, n) from one uniform draw: floor(u * n). u * n < n holds in double for every
// n below 2^53 (u <= 1 - 2^-53); the clamp only guards the contract.
static int64_t draw_index(ag_rng *r, int64_t n) {
    int64_t i = (int64_t)(ag_rng_uniform(r) * (double)n);
    return i < n ? i : n - 1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// NumPy's 'linear' quantile of sorted v[0..n): virtual index h = (n-1) q, interpolated as
// numpy's _lerp does (from the upper neighbour when the fraction is >= 0.5).
static double quantile_sorted(const double *v, int64_t n, double q) {
    double h = (double)(n - 1) * q;
    double fl = floor(h);
    int64_t i = (int64_t)fl;
    if (i >= n - 1)
        return v[n - 1];
    double t = h - fl, a = v[i], b = v[i + 1], d = b - a;
    return t >= 0.5 ? b - d * (1 - t) : a + d * t;
}

molt_status ev_boot_columns(const double *x, int64_t n, int k, const ev_boot_opts *o,
                            ev_boot_col *col) {
    MOLT_TRY(ev_boot_opts_check(o));
    MOLT_ASSERT(n > 0 && k > 0);
    int64_t B = o->n_resamples;
    double *means = molt_malloc(sizeof(double) * (size_t)(B * k));
    double *sum = molt_malloc(sizeof(double) * (size_t)k);
    int64_t *cnt = molt_malloc(sizeof(int64_t) * (size_t)k);
    if (!means || !sum || !cnt) {
        molt_free(means);
        molt_free(sum);
        molt_free(cnt);
        return molt_err(MOLT_ENOMEM, "bootstrap: out of memory (%lld resamples x %d columns)",
                        (long long)B, k);
    }
    // the point estimates: mean of the present values, in example order
    for (int c = 0; c < k; c++) {
        double s = 0;
        int64_t m = 0;
        for (int64_t i = 0; i < n; i++) {
            double v = x[i * k + c];
            if (!isnan(v)) {
                s += v;
                m++;
            }
        }
        MOLT_ASSERT(m > 0);
        col[c].n = m;
        col[c].mean = s / (double)m;
    }
    ag_rng r;
    ag_rng_seed(&r, o->seed);
    for (int64_t b = 0; b < B; b++) {
        memset(sum, 0, sizeof(double) * (size_t)k);
        memset(cnt, 0, sizeof(int64_t) * (size_t)k);
        for (int64_t j = 0; j < n; j++) {
            const double *row = x + draw_index(&r, n) * k;
            for (int c = 0; c < k; c++)
                if (!isnan(row[c])) {
                    sum[c] += row[c];
                    cnt[c]++;
                }
        }
        for (int c = 0; c < k; c++)
            means[c * B + b] = cnt[c] ? sum[c] / (double)cnt[c] : NAN;
    }
    double qlo = (1 - o->level) / 2, qhi = (1 + o->level) / 2;
    for (int c = 0; c < k; c++) {
        double *m = means + c * B;
        int64_t nv = 0, extreme = 0; // resamples with a mean; |m_b - dbar| >= |dbar|
        double dbar = col[c].mean;
        for (int64_t b = 0; b < B; b++)
            if (!isnan(m[b])) {
                extreme += fabs(m[b] - dbar) >= fabs(dbar);
                m[nv++] = m[b];
            }
        if (nv == 0) { // every resample drew only missing values
            col[c].lo = col[c].hi = NAN;
            col[c].p = NAN;
            continue;
        }
        qsort(m, (size_t)nv, sizeof(double), cmp_double);
        col[c].lo = quantile_sorted(m, nv, qlo);
        col[c].hi = quantile_sorted(m, nv, qhi);
        col[c].p = (double)(1 + extreme) / (double)(nv + 1);
    }
    molt_free(means);
    molt_free(sum);
    molt_free(cnt);
    return MOLT_OK;
}

// MOLT_EARG for an infinite value of x[0..n); what names the array in the message.
static molt_status check_finite(const double *x, int64_t n, const char *what) {
    for (int64_t i = 0; i < n; i++)
        if (isinf(x[i]))
            return molt_err(MOLT_EARG, "%s: value %lld is infinite (%g); a missing value is NaN",
                            what, (long long)i, x[i]);
    return MOLT_OK;
}

molt_status ev_boot_mean(const double *x, int64_t n, const ev_boot_opts *o, ev_mean_ci *out) {
    memset(out, 0, sizeof *out);
    if (n <= 0)
        return molt_err(MOLT_EARG, "bootstrap mean: no values (n = %lld)", (long long)n);
    MOLT_TRY(check_finite(x, n, "bootstrap mean"));
    int64_t present = 0;
    for (int64_t i = 0; i < n; i++)
        present += !isnan(x[i]);
    if (present == 0)
        return molt_err(MOLT_EARG, "bootstrap mean: all %lld values are missing (NaN)",
                        (long long)n);
    ev_boot_col c;
    MOLT_TRY(ev_boot_columns(x, n, 1, o, &c));
    *out = (ev_mean_ci){.n = c.n, .n_missing = n - c.n, .mean = c.mean, .lo = c.lo, .hi = c.hi};
    return MOLT_OK;
}

molt_status ev_paired_counts(const double *sys, const double *base, int64_t n,
                             const ev_metric_def *m, ev_paired *out) {
    memset(out, 0, sizeof *out);
    out->p_mcnemar = NAN;
    for (int64_t i = 0; i < n; i++) {
        double s = sys[i], b = base[i];
        if (isnan(s) || isnan(b)) {
            out->n_missing++;
            continue;
        }
        if (m->binary && ((s != 0 && s != 1) || (b != 0 && b != 1)))
            return molt_err(MOLT_EARG, "metric %s is 0/1 but example %lld has %g (system) and "
                            "%g (baseline)", m->name, (long long)i, s, b);
        out->n++;
        if (s == b)
            out->tie++;
        else if ((s < b) == m->lower_is_better)
            out->win++;
        else
            out->loss++;
        if (m->binary) {
            out->n01 += b == 0 && s == 1;
            out->n10 += b == 1 && s == 0;
        }
    }
    if (m->binary)
        MOLT_TRY(ev_mcnemar_exact(out->n01, out->n10, &out->p_mcnemar));
    return MOLT_OK;
}

molt_status ev_boot_paired(const double *sys, int64_t n_sys, const double *base, int64_t n_base,
                           const ev_metric_def *m, const ev_boot_opts *o, ev_paired *out) {
    memset(out, 0, sizeof *out);
    out->p_mcnemar = NAN;
    if (n_sys != n_base)
        return molt_err(MOLT_EARG, "metric %s: the system has %lld values, the baseline %lld "
                        "(the same examples in the same order are needed)", m->name,
                        (long long)n_sys, (long long)n_base);
    if (n_sys <= 0)
        return molt_err(MOLT_EARG, "metric %s: no values to compare", m->name);
    MOLT_TRY(check_finite(sys, n_sys, m->name));
    MOLT_TRY(check_finite(base, n_base, m->name));
    ev_paired r;
    MOLT_TRY(ev_paired_counts(sys, base, n_sys, m, &r));
    if (r.n == 0)
        return molt_err(MOLT_EARG, "metric %s: no example has both values (%lld missing)",
                        m->name, (long long)r.n_missing);
    double *d = molt_malloc(sizeof(double) * (size_t)n_sys);
    if (!d)
        return molt_err(MOLT_ENOMEM, "metric %s: out of memory", m->name);
    for (int64_t i = 0; i < n_sys; i++)
        d[i] = sys[i] - base[i]; // NaN when either is
    ev_boot_col c;
    molt_status st = ev_boot_columns(d, n_sys, 1, o, &c);
    molt_free(d);
    MOLT_TRY(st);
    r.diff = c.mean;
    r.lo = c.lo;
    r.hi = c.hi;
    r.p_boot = c.p;
    *out = r;
    return MOLT_OK;
}

// P(X <= k) for X ~ Binomial(m, 1/2), k <= m/2. Terms t_j = C(m, j) 2^-m grow with j up to
// k, so the sum is carried in units of the current term (r_j = S_j / t_j, r_{j+1} =
// r_j t_j / t_{j+1} + 1) and t_j as a mantissa with a separate binary exponent: no
// underflow for any m, relative error about k ulps.
static double binom_half_cdf(int64_t k, int64_t m) {
    double f = 1, r = 1; // t_0 = f * 2^e with e = -m
    long e = -(long)m;
    for (int64_t j = 0; j < k; j++) {
        double ratio = (double)(m - j) / (double)(j + 1); // t_{j+1} / t_j
        f *= ratio;
        r = r / ratio + 1;
        int ex;
        f = frexp(f, &ex);
        e += ex;
    }
    return ldexp(f * r, (int)(e < -100000 ? -100000 : e));
}

molt_status ev_mcnemar_exact(int64_t n01, int64_t n10, double *p) {
    if (n01 < 0 || n10 < 0)
        return molt_err(MOLT_EARG, "McNemar: negative count (%lld, %lld)", (long long)n01,
                        (long long)n10);
    int64_t m = n01 + n10, k = n01 < n10 ? n01 : n10;
    *p = m == 0 ? 1.0 : fmin(1.0, 2 * binom_half_cdf(k, m));
    return MOLT_OK;
}

typedef struct {
    double p;
    int i;
} p_idx;

static int cmp_p_idx(const void *a, const void *b) {
    const p_idx *x = a, *y = b;
    if (x->p != y->p)
        return x->p < y->p ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

molt_status ev_holm(const double *p, int n, double *adj) {
    for (int i = 0; i < n; i++)
        if (!isnan(p[i]) && !(p[i] >= 0 && p[i] <= 1))
            return molt_err(MOLT_EARG, "Holm: p-value %d is %g, outside [0, 1]", i, p[i]);
    p_idx *s = molt_malloc(sizeof(p_idx) * (size_t)(n > 0 ? n : 1));
    if (!s)
        return molt_err(MOLT_ENOMEM, "Holm: out of memory");
    int m = 0;
    for (int i = 0; i < n; i++)
        if (!isnan(p[i]))
            s[m++] = (p_idx){p[i], i};
    qsort(s, (size_t)m, sizeof *s, cmp_p_idx);
    for (int i = 0; i < n; i++)
        if (isnan(p[i]))
            adj[i] = NAN;
    double run = 0;
    for (int j = 0; j < m; j++) {
        double v = (double)(m - j) * s[j].p;
        run = v > run ? v : run;
        adj[s[j].i] = run < 1 ? run : 1;
    }
    molt_free(s);
    return MOLT_OK;
}
