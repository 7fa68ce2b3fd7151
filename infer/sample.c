// infer/sample.c: next-token sampling from logits: greedy, or temperature -> top-k ->
// top-p -> one seeded draw (the order documented in infer.h). Probabilities are computed in
// double precision; candidates are kept most probable first with ties broken by the lower
// id, so a seed fixes the result. Not here: repetition penalties, logit biases, grammars.
#include "infer.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

void inf_sample_opts_default(inf_sample_opts *o) {
    *o = (inf_sample_opts){.temperature = 0, .top_k = 0, .top_p = 1, .seed = 0};
}

molt_status inf_sample_opts_check(const inf_sample_opts *o) {
    if (!(o->temperature >= 0) || isinf(o->temperature))
        return molt_err(MOLT_EARG, "sampling: temperature %g must be a finite number >= 0",
                        o->temperature);
    if (o->top_k < 0)
        return molt_err(MOLT_EARG, "sampling: top_k %d must be >= 0 (0 = off)", o->top_k);
    if (!(o->top_p > 0 && o->top_p <= 1))
        return molt_err(MOLT_EARG, "sampling: top_p %g must be in (0, 1]", o->top_p);
    return MOLT_OK;
}

molt_status inf_sampler_init(inf_sampler *s, const inf_sample_opts *o) {
    memset(s, 0, sizeof *s);
    MOLT_TRY(inf_sample_opts_check(o));
    s->o = *o;
    ag_rng_seed(&s->rng, o->seed);
    return MOLT_OK;
}

void inf_sampler_free(inf_sampler *s) {
    molt_free(s->w);
    molt_free(s->cand);
    molt_free(s->prob);
    memset(s, 0, sizeof *s);
}

// The index of the first maximum of x[0..n) (NaN never wins) and whether x holds a NaN. The
// vocabulary is read in blocks of 64: the block's maximum and NaN test first (four groups of 4
// lanes where SSE2 is there), then the block is scanned in order only when it holds a value
// above the best so far or a NaN; so the first maximum is found as by a plain scan.
static int32_t argmax_nan(const float *x, int64_t n, bool *nan_seen) {
    int64_t best = 0, i = 1;
    float bv = x[0];
    bool bad = isnan(x[0]);
    for (; i + 64 <= n; i += 64) {
        const float *b = x + i;
        float m;
#if defined(__SSE2__)
        // four independent maxima (a single chain would wait on each max's latency)
        __m128 m0 = _mm_loadu_ps(b), m1 = _mm_loadu_ps(b + 4), m2 = _mm_loadu_ps(b + 8),
               m3 = _mm_loadu_ps(b + 12);
        __m128 n0 = _mm_or_ps(_mm_cmpunord_ps(m0, m0), _mm_cmpunord_ps(m1, m1)),
               n1 = _mm_or_ps(_mm_cmpunord_ps(m2, m2), _mm_cmpunord_ps(m3, m3));
        for (int j = 16; j < 64; j += 16) {
            __m128 v0 = _mm_loadu_ps(b + j), v1 = _mm_loadu_ps(b + j + 4),
                   v2 = _mm_loadu_ps(b + j + 8), v3 = _mm_loadu_ps(b + j + 12);
            m0 = _mm_max_ps(v0, m0); // a NaN in v leaves m; NaNs are flagged below
            m1 = _mm_max_ps(v1, m1);
            m2 = _mm_max_ps(v2, m2);
            m3 = _mm_max_ps(v3, m3);
            n0 = _mm_or_ps(n0, _mm_or_ps(_mm_cmpunord_ps(v0, v0), _mm_cmpunord_ps(v1, v1)));
            n1 = _mm_or_ps(n1, _mm_or_ps(_mm_cmpunord_ps(v2, v2), _mm_cmpunord_ps(v3, v3)));
        }
        __m128 mv = _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3));
        float lanes[4];
        _mm_storeu_ps(lanes, mv);
        bool block_nan = _mm_movemask_ps(_mm_or_ps(n0, n1)) != 0;
        bad |= block_nan;
        m = lanes[0];
        for (int j = 1; j < 4; j++)
            m = lanes[j] > m ? lanes[j] : m;
#else
        bool block_nan = false;
        m = b[0];
        for (int j = 0; j < 64; j++) {
            block_nan |= isnan(b[j]);
            m = b[j] > m ? b[j] : m;
        }
        bad |= block_nan;
#endif
        if (block_nan) // the maximum found may be a NaN: the scan below decides
            m = INFINITY;
        if (m > bv)
            for (int j = 0; j < 64; j++)
                if (b[j] > bv) {
                    bv = b[j];
                    best = i + j;
                }
    }
    for (; i < n; i++) {
        bad |= isnan(x[i]);
        if (x[i] > bv) {
            bv = x[i];
            best = i;
        }
    }
    *nan_seen = bad;
    return (int32_t)best;
}

int32_t inf_argmax(const float *x, int64_t n) {
    bool nan_seen;
    return argmax_nan(x, n, &nan_seen);
}

int32_t inf_argmax_no_nan(const float *x, int64_t n) {
    bool nan_seen;
    int32_t top = argmax_nan(x, n, &nan_seen);
    return nan_seen ? -1 : top;
}

// The first NaN of x[0..n), or -1.
static int64_t first_nan(const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (isnan(x[i]))
            return i;
    return -1;
}

static molt_status ensure_cap(inf_sampler *s, int64_t V) {
    if (V <= s->cap)
        return MOLT_OK;
    double *w = molt_realloc(s->w, (size_t)V * sizeof *w);
    if (w)
        s->w = w;
    int32_t *c = molt_realloc(s->cand, (size_t)V * sizeof *c);
    if (c)
        s->cand = c;
    double *p = molt_realloc(s->prob, (size_t)V * sizeof *p);
    if (p)
        s->prob = p;
    if (!w || !c || !p)
        return molt_err(MOLT_ENOMEM, "sampling: out of memory for %lld tokens", (long long)V);
    s->cap = V;
    return MOLT_OK;
}

// "a ranks before b": more probable, or equally probable with the lower id.
static bool before(const double *w, int32_t a, int32_t b) {
    return w[a] > w[b] || (w[a] == w[b] && a < b);
}

// Binary min-heap (by rank: the worst candidate at the root) of at most k ids.
static void heap_sift_down(int32_t *h, int64_t n, int64_t i, const double *w) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && before(w, h[m], h[l]))
            m = l;
        if (r < n && before(w, h[m], h[r]))
            m = r;
        if (m == i)
            return;
        int32_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

// The k best ids of w[0..V) into cand[0..k) (unordered).
static void select_top_k(int32_t *cand, const double *w, int64_t V, int64_t k) {
    for (int64_t i = 0; i < k; i++)
        cand[i] = (int32_t)i;
    for (int64_t i = k / 2 - 1; i >= 0; i--)
        heap_sift_down(cand, k, i, w);
    for (int64_t i = k; i < V; i++)
        if (before(w, (int32_t)i, cand[0])) {
            cand[0] = (int32_t)i;
            heap_sift_down(cand, k, 0, w);
        }
}

// qsort takes no user pointer: the weights of the sort in progress, per thread
static _Thread_local const double *tl_w;

static int cmp_rank(const void *pa, const void *pb) {
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    return before(tl_w, a, b) ? -1 : (before(tl_w, b, a) ? 1 : 0);
}

static void sort_cands(int32_t *cand, int64_t n, const double *w) {
    tl_w = w;
    qsort(cand, (size_t)n, sizeof *cand, cmp_rank);
}

// Fills s->w with exp((logit - max) / T) and returns their sum.
// top: the index of the largest logit.
static double tempered(inf_sampler *s, const float *logits, int64_t V, int32_t top) {
    float mx = logits[top];
    double sum = 0, t = s->o.temperature;
    for (int64_t i = 0; i < V; i++) {
        s->w[i] = exp(((double)logits[i] - mx) / t);
        sum += s->w[i];
    }
    return sum;
}

// Candidates after top-k and top-p, most probable first, with final probabilities.
static void filter(inf_sampler *s, int64_t V, double total) {
    int64_t k = s->o.top_k > 0 && s->o.top_k < V ? s->o.top_k : V, n = 0;
    double p = s->o.top_p;
    if (k < V) {
        select_top_k(s->cand, s->w, V, k);
        n = k;
        total = 0;
        for (int64_t i = 0; i < n; i++)
            total += s->w[s->cand[i]];
    } else {
        // A token of the nucleus has probability above (1 - p) / V: the tokens from it on
        // (at most V, none more probable) carry more than 1 - p. Smaller ones are dropped
        // before sorting; with p = 1 the bound is 0 and every token stays.
        double floor_w = p < 1 ? (1 - p) / (double)V * total : -1;
        for (int64_t i = 0; i < V; i++)
            if (s->w[i] > floor_w)
                s->cand[n++] = (int32_t)i;
    }
    if (k < V || p < 1)
        sort_cands(s->cand, n, s->w);
    if (p < 1) {
        double cum = 0;
        int64_t keep = 0;
        while (keep < n && (keep == 0 || cum < p * total))
            cum += s->w[s->cand[keep++]];
        n = keep;
        total = cum;
    }
    for (int64_t i = 0; i < n; i++)
        s->prob[i] = s->w[s->cand[i]] / total;
    s->n_cand = n;
}

molt_status inf_sample_dist(inf_sampler *s, const float *logits, int64_t V, int64_t *n,
                            const int32_t **ids, const double **probs) {
    if (V < 1 || V > INT32_MAX)
        return molt_err(MOLT_EARG, "sampling: vocabulary of %lld tokens", (long long)V);
    MOLT_TRY(ensure_cap(s, V));
    bool nan_seen;
    int32_t top = argmax_nan(logits, V, &nan_seen); // one pass: the NaN test and the maximum
    if (nan_seen)
        return molt_err(MOLT_EARG, "sampling: logit %lld is NaN",
                        (long long)first_nan(logits, V));
    if (s->o.temperature == 0) {
        s->cand[0] = top;
        s->prob[0] = 1;
        s->n_cand = 1;
    } else
        filter(s, V, tempered(s, logits, V, top));
    *n = s->n_cand;
    *ids = s->cand;
    *probs = s->prob;
    return MOLT_OK;
}

molt_status inf_sample(inf_sampler *s, const float *logits, int64_t V, int32_t *tok) {
    int64_t n;
    const int32_t *ids;
    const double *p;
    MOLT_TRY(inf_sample_dist(s, logits, V, &n, &ids, &p));
    if (s->o.temperature == 0) {
        *tok = ids[0];
        return MOLT_OK;
    }
    double u = ag_rng_uniform(&s->rng), cum = 0;
    *tok = ids[n - 1]; // rounding may leave the sum a hair below u
    for (int64_t i = 0; i < n; i++) {
        cum += p[i];
        if (u < cum) {
            *tok = ids[i];
            break;
        }
    }
    return MOLT_OK;
}
