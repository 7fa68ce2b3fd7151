// infer/eval/results.c: the results model the runner fills (ev_dataset: systems, metrics,
// examples with per-system predictions, losses and metric values) and the statistics of
// one dataset: per table (all examples, then each category), metric and system the mean
// with its interval, the paired comparison with the baseline, the reported p-value and its
// Holm adjustment, plus the per-example loss differences the histograms draw.
//
// Not here: the statistics themselves (stats.c), writing files (report.c, html.c).
#include "internal.h"

#include <math.h>
#include <string.h>

// ---- the model -------------------------------------------------------------------------

static void free_example(const ev_dataset *d, ev_example *e) {
    molt_free(e->id);
    molt_free(e->category);
    molt_free(e->target);
    if (e->pred)
        for (int s = 0; s < d->n_systems; s++)
            molt_free(e->pred[s]);
    molt_free(e->pred);
    molt_free(e->loss);
    molt_free(e->values);
    molt_free(e->set);
}

void ev_dataset_free(ev_dataset *d) {
    for (int64_t i = 0; i < d->n_examples; i++)
        free_example(d, &d->ex[i]);
    molt_free(d->ex);
    for (int s = 0; d->systems && s < d->n_systems; s++)
        molt_free(d->systems[s]);
    molt_free(d->systems);
    for (int j = 0; d->metrics && j < d->n_metrics; j++)
        molt_free((char *)d->metrics[j].name);
    molt_free(d->metrics);
    molt_free(d->name);
    molt_free(d->task);
    memset(d, 0, sizeof *d);
}

static molt_status check_names(const char *ds, const char *what, const char *const *names,
                               int n) {
    for (int i = 0; i < n; i++) {
        if (!names[i] || !names[i][0])
            return molt_err(MOLT_EARG, "dataset %s: %s %d has no name", ds, what, i);
        for (int k = 0; k < i; k++)
            if (strcmp(names[i], names[k]) == 0)
                return molt_err(MOLT_EARG, "dataset %s: two %ss are named '%s'", ds, what,
                                names[i]);
    }
    return MOLT_OK;
}

static molt_status init(ev_dataset *d, const char *name, const char *task, int n_systems,
                        const char *const *systems, int baseline, int n_metrics,
                        const ev_metric_def *metrics) {
    if (n_systems < 1)
        return molt_err(MOLT_EARG, "dataset %s: no system to evaluate", name);
    if (n_metrics < 1)
        return molt_err(MOLT_EARG, "dataset %s: no metric", name);
    if (baseline < 0 || baseline >= n_systems)
        return molt_err(MOLT_EARG, "dataset %s: baseline %d out of range (%d systems)", name,
                        baseline, n_systems);
    MOLT_TRY(check_names(name, "system", systems, n_systems));
    const char *mn[256];
    if (n_metrics > 256)
        return molt_err(MOLT_EARG, "dataset %s: %d metrics, at most 256", name, n_metrics);
    for (int j = 0; j < n_metrics; j++)
        mn[j] = metrics[j].name;
    MOLT_TRY(check_names(name, "metric", mn, n_metrics));
    d->name = molt_strdup(name);
    d->task = molt_strdup(task ? task : "");
    d->systems = molt_calloc((size_t)n_systems, sizeof(char *));
    d->metrics = molt_calloc((size_t)n_metrics, sizeof(ev_metric_def));
    if (!d->name || !d->task || !d->systems || !d->metrics)
        return molt_err(MOLT_ENOMEM, "dataset %s: out of memory", name);
    d->n_systems = n_systems;
    d->n_metrics = n_metrics;
    d->baseline = baseline;
    for (int s = 0; s < n_systems; s++)
        if (!(d->systems[s] = molt_strdup(systems[s])))
            return molt_err(MOLT_ENOMEM, "dataset %s: out of memory", name);
    for (int j = 0; j < n_metrics; j++) {
        d->metrics[j] = metrics[j];
        if (!(d->metrics[j].name = molt_strdup(metrics[j].name)))
            return molt_err(MOLT_ENOMEM, "dataset %s: out of memory", name);
    }
    return MOLT_OK;
}

molt_status ev_dataset_init(ev_dataset *d, const char *name, const char *task, int n_systems,
                            const char *const *systems, int baseline, int n_metrics,
                            const ev_metric_def *metrics) {
    memset(d, 0, sizeof *d);
    if (!name || !name[0])
        return molt_err(MOLT_EARG, "dataset: no name");
    molt_status st = init(d, name, task, n_systems, systems, baseline, n_metrics, metrics);
    if (st != MOLT_OK)
        ev_dataset_free(d);
    return st;
}

molt_status ev_dataset_add(ev_dataset *d, const char *id, const char *category,
                           const char *target) {
    if (!id)
        return molt_err(MOLT_EARG, "dataset %s: example %lld has no id", d->name,
                        (long long)d->n_examples);
    if (d->n_examples == d->cap) {
        int64_t cap = d->cap ? d->cap * 2 : 64;
        ev_example *ex = molt_realloc(d->ex, sizeof *ex * (size_t)cap);
        if (!ex)
            return molt_err(MOLT_ENOMEM, "dataset %s: out of memory (%lld examples)", d->name,
                            (long long)cap);
        d->ex = ex;
        d->cap = cap;
    }
    ev_example *e = &d->ex[d->n_examples];
    memset(e, 0, sizeof *e);
    size_t S = (size_t)d->n_systems, V = S * (size_t)d->n_metrics;
    e->id = molt_strdup(id);
    e->category = category ? molt_strdup(category) : NULL;
    e->target = molt_strdup(target ? target : "");
    e->pred = molt_calloc(S, sizeof(char *));
    e->loss = molt_malloc(sizeof(double) * S);
    e->values = molt_malloc(sizeof(double) * V);
    e->set = molt_calloc(S, sizeof(bool));
    if (!e->id || (category && !e->category) || !e->target || !e->pred || !e->loss ||
        !e->values || !e->set) {
        free_example(d, e);
        return molt_err(MOLT_ENOMEM, "dataset %s: out of memory adding example %s", d->name, id);
    }
    for (size_t s = 0; s < S; s++)
        e->loss[s] = NAN;
    for (size_t k = 0; k < V; k++)
        e->values[k] = NAN;
    d->n_examples++;
    return MOLT_OK;
}

molt_status ev_dataset_set(ev_dataset *d, int64_t i, int s, const char *prediction,
                           double loss, const double *values) {
    if (i < 0 || i >= d->n_examples)
        return molt_err(MOLT_EARG, "dataset %s: example index %lld out of range (%lld examples)",
                        d->name, (long long)i, (long long)d->n_examples);
    if (s < 0 || s >= d->n_systems)
        return molt_err(MOLT_EARG, "dataset %s: system index %d out of range (%d systems)",
                        d->name, s, d->n_systems);
    ev_example *e = &d->ex[i];
    if (e->set[s])
        return molt_err(MOLT_EARG, "dataset %s: example %s already has a result for system %s",
                        d->name, e->id, d->systems[s]);
    char *p = NULL;
    if (prediction && !(p = molt_strdup(prediction)))
        return molt_err(MOLT_ENOMEM, "dataset %s: out of memory", d->name);
    e->pred[s] = p;
    e->loss[s] = loss;
    memcpy(e->values + (size_t)s * (size_t)d->n_metrics, values,
           sizeof(double) * (size_t)d->n_metrics);
    e->set[s] = true;
    return MOLT_OK;
}

int ev_dataset_system(const ev_dataset *d, const char *name) {
    for (int s = 0; s < d->n_systems; s++)
        if (strcmp(d->systems[s], name) == 0)
            return s;
    return -1;
}

// ---- statistics ------------------------------------------------------------------------

// Every example has every system's result, with finite-or-NaN values, 0/1 where binary.
static molt_status check_complete(const ev_dataset *d) {
    if (d->n_examples == 0)
        return molt_err(MOLT_EARG, "dataset %s: no examples (empty eval set)", d->name);
    for (int64_t i = 0; i < d->n_examples; i++) {
        const ev_example *e = &d->ex[i];
        for (int s = 0; s < d->n_systems; s++) {
            if (!e->set[s])
                return molt_err(MOLT_EARG, "dataset %s: example %s (index %lld) has no result "
                                "for system %s", d->name, e->id, (long long)i, d->systems[s]);
            if (isinf(e->loss[s]))
                return molt_err(MOLT_EARG, "dataset %s: example %s, system %s: the loss is "
                                "infinite", d->name, e->id, d->systems[s]);
            for (int j = 0; j < d->n_metrics; j++) {
                double v = e->values[s * d->n_metrics + j];
                if (isinf(v) || (d->metrics[j].binary && !isnan(v) && v != 0 && v != 1))
                    return molt_err(MOLT_EARG, "dataset %s: example %s, system %s: metric %s "
                                    "is %g (expected %s, or NaN when missing)", d->name, e->id,
                                    d->systems[s], d->metrics[j].name, v,
                                    d->metrics[j].binary ? "0 or 1" : "a finite number");
            }
        }
    }
    return MOLT_OK;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

// The sorted distinct categories (pointers into d), "" last when some example has none.
// *n == 0 when no example has a category.
static molt_status categories(const ev_dataset *d, const char ***out, int *n) {
    *out = NULL;
    *n = 0;
    const char **c = molt_malloc(sizeof(char *) * (size_t)d->n_examples);
    if (!c)
        return molt_err(MOLT_ENOMEM, "dataset %s: out of memory", d->name);
    int64_t k = 0;
    bool none = false;
    for (int64_t i = 0; i < d->n_examples; i++) {
        if (d->ex[i].category)
            c[k++] = d->ex[i].category;
        else
            none = true;
    }
    if (k == 0) {
        molt_free(c);
        return MOLT_OK;
    }
    qsort(c, (size_t)k, sizeof *c, cmp_str);
    int64_t u = 0;
    for (int64_t i = 0; i < k; i++)
        if (u == 0 || strcmp(c[u - 1], c[i]) != 0)
            c[u++] = c[i];
    if (none)
        c[u++] = "";
    if (u > 100000) {
        molt_free(c);
        return molt_err(MOLT_EARG, "dataset %s: %lld categories, at most 100000", d->name,
                        (long long)u);
    }
    *out = c;
    *n = (int)u;
    return MOLT_OK;
}

static bool in_table(const ev_example *e, const char *cat) {
    if (!cat)
        return true;
    return e->category ? strcmp(e->category, cat) == 0 : cat[0] == 0;
}

// One metric of one table: columns 0..S-1 the systems, then the differences of the
// non-baseline systems; columns without a present value are left out of the bootstrap and
// come out as n = 0 with NaN statistics.
static molt_status table_metric(const ev_dataset *d, const int64_t *idx, int64_t nt, int j,
                                const ev_boot_opts *o, ev_table *t, double *x, double *colv,
                                ev_boot_col *col) {
    int S = d->n_systems, M = d->n_metrics, b = d->baseline, K = 2 * S - 1;
    for (int64_t r = 0; r < nt; r++) {
        const ev_example *e = &d->ex[idx[r]];
        double vb = e->values[b * M + j];
        for (int s = 0, c = S; s < S; s++) {
            double v = e->values[s * M + j];
            x[r * K + s] = v;
            if (s != b)
                x[r * K + c++] = v - vb;
        }
    }
    // keep the columns with a present value (compacted in place, example-major)
    int keep[2 * 256], nk = 0;
    for (int c = 0; c < K; c++) {
        bool any = false;
        for (int64_t r = 0; r < nt && !any; r++)
            any = !isnan(x[r * K + c]);
        if (any)
            keep[nk++] = c;
    }
    for (int64_t r = 0; r < nt; r++)
        for (int k = 0; k < nk; k++)
            colv[r * nk + k] = x[r * K + keep[k]];
    ev_boot_col res[2 * 256];
    for (int c = 0; c < K; c++)
        res[c] = (ev_boot_col){.n = 0, .mean = NAN, .lo = NAN, .hi = NAN, .p = NAN};
    if (nk > 0) {
        MOLT_TRY(ev_boot_columns(colv, nt, nk, o, col));
        for (int k = 0; k < nk; k++)
            res[keep[k]] = col[k];
    }
    double *sys = colv, *base = colv + nt; // reuse: two columns of nt values
    for (int64_t r = 0; r < nt; r++)
        base[r] = x[r * K + b];
    for (int s = 0, c = S; s < S; s++) {
        ev_mean_ci *m = &t->mean[j * S + s];
        *m = (ev_mean_ci){.n = res[s].n, .n_missing = nt - res[s].n, .mean = res[s].mean,
                          .lo = res[s].lo, .hi = res[s].hi};
        ev_paired *p = &t->cmp[j * S + s];
        memset(p, 0, sizeof *p);
        p->p_mcnemar = NAN;
        t->p[j * S + s] = NAN;
        if (s == b)
            continue;
        for (int64_t r = 0; r < nt; r++)
            sys[r] = x[r * K + s];
        MOLT_TRY(ev_paired_counts(sys, base, nt, &d->metrics[j], p));
        p->diff = res[c].mean;
        p->lo = res[c].lo;
        p->hi = res[c].hi;
        p->p_boot = res[c].p;
        t->p[j * S + s] = d->metrics[j].binary ? p->p_mcnemar : p->p_boot;
        if (p->n == 0)
            t->p[j * S + s] = NAN;
        c++;
    }
    return ev_holm(t->p + j * S, S, t->p_holm + j * S);
}

// Requires every system to have values on the whole dataset (table 0).
static molt_status check_table0(const ev_dataset *d, const ev_table *t) {
    int S = d->n_systems;
    for (int j = 0; j < d->n_metrics; j++)
        for (int s = 0; s < S; s++)
            if (t->mean[j * S + s].n == 0)
                return molt_err(MOLT_EARG, "dataset %s, metric %s: system %s has no values "
                                "(all %lld missing)", d->name, d->metrics[j].name, d->systems[s],
                                (long long)t->n_examples);
    for (int j = 0; j < d->n_metrics; j++)
        for (int s = 0; s < S; s++) {
            if (s != d->baseline && t->cmp[j * S + s].n == 0)
                return molt_err(MOLT_EARG, "dataset %s, metric %s: no example has values for "
                                "both %s and the baseline %s", d->name, d->metrics[j].name,
                                d->systems[s], d->systems[d->baseline]);
        }
    return MOLT_OK;
}

static molt_status table(const ev_dataset *d, const char *cat, const ev_boot_opts *o,
                         ev_table *t, int64_t *idx, double *x, double *colv, ev_boot_col *col) {
    size_t MS = (size_t)d->n_metrics * (size_t)d->n_systems;
    t->category = cat ? molt_strdup(cat) : NULL;
    t->mean = molt_calloc(MS, sizeof *t->mean);
    t->cmp = molt_calloc(MS, sizeof *t->cmp);
    t->p = molt_calloc(MS, sizeof *t->p);
    t->p_holm = molt_calloc(MS, sizeof *t->p_holm);
    if ((cat && !t->category) || !t->mean || !t->cmp || !t->p || !t->p_holm)
        return molt_err(MOLT_ENOMEM, "dataset %s: out of memory", d->name);
    int64_t nt = 0;
    for (int64_t i = 0; i < d->n_examples; i++)
        if (in_table(&d->ex[i], cat))
            idx[nt++] = i;
    t->n_examples = nt;
    for (int j = 0; j < d->n_metrics; j++)
        MOLT_TRY(table_metric(d, idx, nt, j, o, t, x, colv, col));
    return MOLT_OK;
}

static molt_status loss_diffs(const ev_dataset *d, ev_dataset_stats *out) {
    int S = d->n_systems, b = d->baseline;
    out->loss_diff = molt_calloc((size_t)S, sizeof(double *));
    out->n_loss_diff = molt_calloc((size_t)S, sizeof(int64_t));
    if (!out->loss_diff || !out->n_loss_diff)
        return molt_err(MOLT_ENOMEM, "dataset %s: out of memory", d->name);
    for (int s = 0; s < S; s++) {
        if (s == b)
            continue;
        if (!(out->loss_diff[s] = molt_malloc(sizeof(double) * (size_t)d->n_examples)))
            return molt_err(MOLT_ENOMEM, "dataset %s: out of memory", d->name);
        int64_t k = 0;
        for (int64_t i = 0; i < d->n_examples; i++) {
            double a = d->ex[i].loss[s], c = d->ex[i].loss[b];
            if (!isnan(a) && !isnan(c))
                out->loss_diff[s][k++] = a - c;
        }
        out->n_loss_diff[s] = k;
    }
    return MOLT_OK;
}

static molt_status compute(const ev_dataset *d, const ev_boot_opts *o, ev_dataset_stats *out) {
    MOLT_TRY(ev_boot_opts_check(o));
    MOLT_TRY(check_complete(d));
    if (d->n_systems > 256)
        return molt_err(MOLT_EARG, "dataset %s: %d systems, at most 256", d->name, d->n_systems);
    const char **cats;
    int nc;
    MOLT_TRY(categories(d, &cats, &nc));
    size_t n = (size_t)d->n_examples, K = 2 * (size_t)d->n_systems - 1;
    int64_t *idx = molt_malloc(sizeof(int64_t) * n);
    // colv also holds two plain columns (system, baseline) of n values: at least 2n
    double *x = molt_malloc(sizeof(double) * n * K);
    double *colv = molt_malloc(sizeof(double) * n * (K < 2 ? 2 : K));
    ev_boot_col *col = molt_malloc(sizeof(ev_boot_col) * K);
    out->tables = molt_calloc((size_t)nc + 1, sizeof(ev_table));
    molt_status st = MOLT_OK;
    if (!idx || !x || !colv || !col || !out->tables)
        st = molt_err(MOLT_ENOMEM, "dataset %s: out of memory", d->name);
    for (int k = 0; st == MOLT_OK && k <= nc; k++) {
        out->n_tables = k + 1;
        st = table(d, k == 0 ? NULL : cats[k - 1], o, &out->tables[k], idx, x, colv, col);
        if (st == MOLT_OK && k == 0)
            st = check_table0(d, &out->tables[0]);
    }
    if (st == MOLT_OK)
        st = loss_diffs(d, out);
    molt_free(cats);
    molt_free(idx);
    molt_free(x);
    molt_free(colv);
    molt_free(col);
    return st;
}

molt_status ev_dataset_stats_compute(const ev_dataset *d, const ev_boot_opts *o,
                                     ev_dataset_stats *out) {
    memset(out, 0, sizeof *out);
    out->d = d;
    molt_status st = compute(d, o, out);
    if (st != MOLT_OK)
        ev_dataset_stats_free(out);
    return st;
}

void ev_dataset_stats_free(ev_dataset_stats *s) {
    for (int k = 0; s->tables && k < s->n_tables; k++) {
        ev_table *t = &s->tables[k];
        molt_free(t->category);
        molt_free(t->mean);
        molt_free(t->cmp);
        molt_free(t->p);
        molt_free(t->p_holm);
    }
    molt_free(s->tables);
    for (int i = 0; s->loss_diff && s->d && i < s->d->n_systems; i++)
        molt_free(s->loss_diff[i]);
    molt_free(s->loss_diff);
    molt_free(s->n_loss_diff);
    memset(s, 0, sizeof *s);
}
