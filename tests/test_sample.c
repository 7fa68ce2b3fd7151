// tests/test_sample.c: next-token sampling (infer/sample.c) and the UTF-8 streaming buffer
// of the decode loop. The sampler's distribution after temperature -> top-k -> top-p is
// compared with a brute-force computation written here from the definitions (full sort,
// prefix sums), over many settings, ties and vocabulary sizes (including one large enough
// for the nucleus pre-filter to matter); temperature 0 is argmax with the first index on
// ties; a seed fixes the draws; sampled frequencies match the distribution; bad options
// and NaN logits give their messages; split UTF-8 characters are held until complete.
#include "harness/harness.h"
#include "infer/infer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void rand_logits(float *x, int64_t V, uint64_t seed, bool ties) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    for (int64_t i = 0; i < V; i++)
        x[i] = (float)(3 * ag_rng_normal(&r));
    if (ties) // equal values at several places, the maximum among them
        for (int64_t i = 3; i < V; i += 7)
            x[i] = x[1];
}

// ---- brute force ------------------------------------------------------------------------

static const double *bf_p;
static int bf_cmp(const void *a, const void *b) {
    int i = *(const int *)a, j = *(const int *)b;
    if (bf_p[i] != bf_p[j])
        return bf_p[i] > bf_p[j] ? -1 : 1;
    return i < j ? -1 : 1;
}

// Final probabilities per id (0 for dropped ids) into q[V].
static void brute_force(const float *x, int64_t V, double T, int k, double top_p, double *q) {
    double *p = malloc((size_t)V * sizeof *p);
    int *order = malloc((size_t)V * sizeof *order);
    double z = 0, mx = -INFINITY;
    for (int64_t i = 0; i < V; i++)
        mx = fmax(mx, x[i]);
    for (int64_t i = 0; i < V; i++)
        z += p[i] = exp((x[i] - mx) / T);
    for (int64_t i = 0; i < V; i++) {
        p[i] /= z;
        order[i] = (int)i;
    }
    bf_p = p;
    qsort(order, (size_t)V, sizeof *order, bf_cmp);
    int64_t keep = k > 0 && k < V ? k : V;
    double mass = 0;
    for (int64_t i = 0; i < keep; i++)
        mass += p[order[i]];
    int64_t n = 0;
    double cum = 0;
    while (n < keep && (n == 0 || cum / mass < top_p))
        cum += p[order[n++]];
    memset(q, 0, (size_t)V * sizeof *q);
    for (int64_t i = 0; i < n; i++)
        q[order[i]] = p[order[i]] / cum;
    free(p);
    free(order);
}

static void check_against_brute(const float *x, int64_t V, double T, int k, double top_p) {
    inf_sample_opts o = {.temperature = T, .top_k = k, .top_p = top_p, .seed = 1};
    inf_sampler s;
    ck_assert_ok(inf_sampler_init(&s, &o));
    int64_t n;
    const int32_t *ids;
    const double *p;
    ck_assert_ok(inf_sample_dist(&s, x, V, &n, &ids, &p));
    double *q = malloc((size_t)V * sizeof *q), sum = 0;
    brute_force(x, V, T, k, top_p, q);
    int64_t nq = 0;
    for (int64_t i = 0; i < V; i++)
        nq += q[i] > 0;
    ck_assert_msg(n == nq, "V %lld T %g k %d p %g: %lld candidates, brute force %lld",
                  (long long)V, T, k, top_p, (long long)n, (long long)nq);
    for (int64_t i = 0; i < n; i++) {
        ck_assert_msg(fabs(p[i] - q[ids[i]]) <= 1e-12, "V %lld T %g k %d p %g: id %d %.17g vs "
                      "%.17g", (long long)V, T, k, top_p, ids[i], p[i], q[ids[i]]);
        if (i > 0) // most probable first, lower id first on ties
            ck_assert(p[i - 1] > p[i] || (p[i - 1] == p[i] && ids[i - 1] < ids[i]) ||
                      ((k == 0 || k >= V) && top_p == 1)); // unfiltered: id order
        sum += p[i];
    }
    ck_assert(fabs(sum - 1) < 1e-12);
    free(q);
    inf_sampler_free(&s);
}

START_TEST(test_dist_vs_brute_force) {
    static const double temps[] = {0.5, 1, 2.5};
    static const int ks[] = {0, 1, 5, 36, 37, 50};
    static const double ps[] = {1, 0.95, 0.5, 0.05};
    float x[37];
    for (int ties = 0; ties < 2; ties++) {
        rand_logits(x, 37, 3 + (uint64_t)ties, ties);
        for (int a = 0; a < 3; a++)
            for (int b = 0; b < 6; b++)
                for (int c = 0; c < 4; c++)
                    check_against_brute(x, 37, temps[a], ks[b], ps[c]);
    }
    // a vocabulary where most tokens fall below the nucleus pre-filter
    int64_t V = 20000;
    float *big = malloc((size_t)V * sizeof *big);
    rand_logits(big, V, 9, false);
    for (int c = 0; c < 4; c++) {
        check_against_brute(big, V, 1, 0, ps[c]);
        check_against_brute(big, V, 0.7, 100, ps[c]);
    }
    free(big);
}
END_TEST

START_TEST(test_greedy) {
    float x[9] = {0.5f, 2, -1, 3, 3, 1, 3, -4, 0};
    ck_assert_int_eq(inf_argmax(x, 9), 3);
    inf_sample_opts o;
    inf_sample_opts_default(&o);
    ck_assert(o.temperature == 0 && o.top_k == 0 && o.top_p == 1);
    o.top_k = 2; // ignored when greedy
    o.top_p = 0.1;
    inf_sampler s;
    ck_assert_ok(inf_sampler_init(&s, &o));
    for (int i = 0; i < 5; i++) {
        int32_t t;
        ck_assert_ok(inf_sample(&s, x, 9, &t));
        ck_assert_int_eq(t, 3);
    }
    int64_t n;
    const int32_t *ids;
    const double *p;
    ck_assert_ok(inf_sample_dist(&s, x, 9, &n, &ids, &p));
    ck_assert_int_eq(n, 1);
    ck_assert_int_eq(ids[0], 3);
    ck_assert(p[0] == 1);
    // top-k 1 at any temperature is greedy too
    inf_sampler_free(&s);
    o = (inf_sample_opts){.temperature = 5, .top_k = 1, .top_p = 1, .seed = 4};
    ck_assert_ok(inf_sampler_init(&s, &o));
    for (int i = 0; i < 5; i++) {
        int32_t t;
        ck_assert_ok(inf_sample(&s, x, 9, &t));
        ck_assert_int_eq(t, 3);
    }
    inf_sampler_free(&s);
}
END_TEST

static void draw(uint64_t seed, const float *x, int64_t V, int n, int32_t *out) {
    inf_sample_opts o = {.temperature = 1.3, .top_k = 20, .top_p = 0.9, .seed = seed};
    inf_sampler s;
    ck_assert_ok(inf_sampler_init(&s, &o));
    for (int i = 0; i < n; i++)
        ck_assert_ok(inf_sample(&s, x, V, &out[i]));
    inf_sampler_free(&s);
}

START_TEST(test_seed_determinism) {
    float x[100];
    for (int i = 0; i < 100; i++)
        x[i] = (float)(0.01 * i);
    int32_t a[64], b[64], d[64];
    draw(77, x, 100, 64, a);
    draw(77, x, 100, 64, b);
    draw(78, x, 100, 64, d);
    ck_assert(memcmp(a, b, sizeof a) == 0);
    ck_assert(memcmp(a, d, sizeof a) != 0);
}
END_TEST

// Frequencies of many draws against the distribution: within 5 standard deviations, and
// nothing outside the candidates.
START_TEST(test_frequencies) {
    float x[8] = {1, 0.2f, 2, -1, 1.5f, 0, 0.7f, -3};
    static const struct {
        double T, p;
        int k;
    } cfg[] = {{1, 1, 0}, {0.8, 0.8, 0}, {2, 1, 3}};
    for (int c = 0; c < 3; c++) {
        inf_sample_opts o = {.temperature = cfg[c].T, .top_k = cfg[c].k, .top_p = cfg[c].p,
                             .seed = 11};
        double q[8];
        brute_force(x, 8, cfg[c].T, cfg[c].k, cfg[c].p, q);
        inf_sampler s;
        ck_assert_ok(inf_sampler_init(&s, &o));
        int count[8] = {0}, N = 40000;
        for (int i = 0; i < N; i++) {
            int32_t t;
            ck_assert_ok(inf_sample(&s, x, 8, &t));
            ck_assert(t >= 0 && t < 8);
            count[t]++;
        }
        for (int j = 0; j < 8; j++) {
            double sd = sqrt(N * q[j] * (1 - q[j]));
            ck_assert_msg(fabs(count[j] - N * q[j]) <= 5 * sd + (q[j] == 0 ? 0 : 1),
                          "config %d token %d: %d draws, expected %.1f", c, j, count[j], N * q[j]);
        }
        inf_sampler_free(&s);
    }
}
END_TEST

START_TEST(test_errors) {
    inf_sampler s;
    inf_sample_opts o = {.temperature = -1, .top_p = 1};
    ck_assert_int_eq(inf_sampler_init(&s, &o), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "sampling: temperature -1 must be a finite number >= 0");
    o = (inf_sample_opts){.temperature = NAN, .top_p = 1};
    ck_assert_int_eq(inf_sampler_init(&s, &o), MOLT_EARG);
    o = (inf_sample_opts){.temperature = 1, .top_k = -2, .top_p = 1};
    ck_assert_int_eq(inf_sampler_init(&s, &o), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "sampling: top_k -2 must be >= 0 (0 = off)");
    o = (inf_sample_opts){.temperature = 1, .top_p = 0};
    ck_assert_int_eq(inf_sampler_init(&s, &o), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "sampling: top_p 0 must be in (0, 1]");
    o = (inf_sample_opts){.temperature = 1, .top_p = 1.5};
    ck_assert_int_eq(inf_sampler_init(&s, &o), MOLT_EARG);
    o = (inf_sample_opts){.temperature = 1, .top_p = 1};
    ck_assert_ok(inf_sampler_init(&s, &o));
    float x[3] = {0, NAN, 1};
    int32_t t;
    ck_assert_int_eq(inf_sample(&s, x, 3, &t), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "sampling: logit 1 is NaN");
    ck_assert_int_eq(inf_sample(&s, x, 0, &t), MOLT_EARG);
    inf_sampler_free(&s);
}
END_TEST

// The blocked argmax against a plain first-maximum scan, on vocabularies whose length is not
// a multiple of the block, with repeated maxima across blocks, -inf, and NaNs (a NaN never
// wins; greedy sampling names the first one).
static int32_t plain_argmax(const float *x, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return (int32_t)best;
}

START_TEST(test_argmax_blocks) {
    int64_t V = 131072 + 37;
    float *x = malloc((size_t)V * sizeof *x);
    ck_assert_ptr_nonnull(x);
    for (int round = 0; round < 12; round++) {
        uint64_t st = 0x9e3779b97f4a7c15ull * (uint64_t)(round + 1);
        for (int64_t i = 0; i < V; i++) {
            st = st * 6364136223846793005ull + 1442695040888963407ull;
            x[i] = (float)((st >> 40) % 1000) / 100.0f - 5.0f; // many equal values
        }
        if (round % 3 == 1)
            x[round * 1000 + 5] = INFINITY;
        if (round % 3 == 2)
            for (int64_t i = 0; i < V; i++)
                x[i] = -INFINITY;
        if (round == 5)
            x[0] = 100; // the first element wins
        if (round == 8)
            x[V - 1] = 100; // the tail wins
        ck_assert_int_eq(inf_argmax(x, V), plain_argmax(x, V));
        for (int64_t n = 1; n < 200; n += 13)
            ck_assert_int_eq(inf_argmax(x, n), plain_argmax(x, n));
    }
    // NaN: never the answer of the blocked scan; greedy sampling refuses it with its index
    for (int64_t i = 0; i < V; i++)
        x[i] = (float)(i % 977);
    x[70000] = NAN;
    ck_assert_int_eq(inf_argmax(x, V), plain_argmax(x, V));
    inf_sample_opts o;
    inf_sample_opts_default(&o);
    inf_sampler s;
    ck_assert_ok(inf_sampler_init(&s, &o));
    int32_t t;
    ck_assert_int_eq(inf_sample(&s, x, V, &t), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "sampling: logit 70000 is NaN");
    x[70000] = 1;
    x[64 * 3 + 1] = NAN; // in a block
    x[V - 2] = NAN;      // in the tail
    ck_assert_int_eq(inf_sample(&s, x, V, &t), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "sampling: logit 193 is NaN");
    x[64 * 3 + 1] = 0;
    ck_assert_int_eq(inf_sample(&s, x, V, &t), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "sampling: logit 131107 is NaN");
    x[V - 2] = 0;
    ck_assert_ok(inf_sample(&s, x, V, &t));
    ck_assert_int_eq(t, plain_argmax(x, V));
    ck_assert_int_eq(inf_argmax_no_nan(x, V), plain_argmax(x, V));
    // a NaN in the block that holds the maximum, in the same lane, after the values so far
    // have reached the block's others: the block is still read
    int64_t b = 1 + 64 * 1000; // blocks start at index 1
    x[b] = NAN;
    x[b + 16] = 5000;
    ck_assert_int_eq(inf_argmax(x, V), b + 16);
    ck_assert_int_eq(inf_argmax(x, V), plain_argmax(x, V));
    ck_assert_int_eq(inf_argmax_no_nan(x, V), -1);
    inf_sampler_free(&s);
    free(x);
}
END_TEST

// ---- UTF-8 streaming ---------------------------------------------------------------------

// Pushes one piece and returns the bytes ready now (as a string, consumed).
static void push(inf_utf8 *u, const char *piece, const char *want) {
    size_t ready;
    ck_assert_ok(inf_utf8_push(u, piece, strlen(piece), &ready));
    ck_assert_int_eq(ready, strlen(want));
    ck_assert(memcmp(u->buf, want, ready) == 0);
    inf_utf8_consume(u, ready);
}

START_TEST(test_utf8_stream) {
    inf_utf8 u = {0};
    push(&u, "h", "h");
    push(&u, "\xC3", "");             // first byte of e-acute
    push(&u, "\xA9!", "\xC3\xA9!");   // completed
    push(&u, "a\xF0\x9F", "a");       // emoji split 2 + 1 + 1
    push(&u, "\x98", "");
    push(&u, "\x80 ", "\xF0\x9F\x98\x80 ");
    push(&u, "\xE2\x82\xAC", "\xE2\x82\xAC"); // whole euro sign at once
    push(&u, "\x80x", "\x80x");       // a stray continuation byte is not held
    push(&u, "\xFF", "\xFF");         // nor an invalid byte
    push(&u, "\xE2", "");
    ck_assert_int_eq(u.n, 1); // what a caller flushes at the end
    inf_utf8_free(&u);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("sample");
    TCase *tc = tcase_create("sample");
    tcase_add_test(tc, test_dist_vs_brute_force);
    tcase_add_test(tc, test_greedy);
    tcase_add_test(tc, test_argmax_blocks);
    tcase_add_test(tc, test_seed_determinism);
    tcase_add_test(tc, test_frequencies);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_utf8_stream);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return harness_run(suite());
}
