// tests/harness/ce_ref.c: see ce_ref.h.
#include "ce_ref.h"

#include <check.h>
#include <math.h>
#include <stdlib.h>

double *ce_ref_logits(const ag_tensor *h, const ag_tensor *w, const ag_tensor *h2,
                      const ag_tensor *w2) {
    int64_t T = h->shape[0], C = h->shape[1], V = w->shape[0], R = h2 ? h2->shape[1] : 0;
    double *z = calloc((size_t)(T * V), sizeof *z);
    ck_assert_ptr_nonnull(z);
    for (int64_t t = 0; t < T; t++)
        for (int64_t v = 0; v < V; v++) {
            for (int64_t c = 0; c < C; c++)
                z[t * V + v] += ag_get(h, t * C + c) * ag_get(w, v * C + c);
            for (int64_t k = 0; k < R; k++)
                z[t * V + v] += ag_get(h2, t * R + k) * ag_get(w2, v * R + k);
        }
    return z;
}

double ce_ref_loss(const double *z, int64_t T, int64_t V, const ag_tensor *targets,
                   const ag_tensor *mask, double *g) {
    double msum = 0, loss = 0;
    for (int64_t t = 0; t < T; t++)
        msum += mask ? ag_get(mask, t) : 1.0;
    for (int64_t t = 0; t < T; t++) {
        double m = mask ? ag_get(mask, t) : 1.0, mx = -INFINITY, se = 0;
        for (int64_t v = 0; v < V; v++)
            mx = fmax(mx, z[t * V + v]);
        for (int64_t v = 0; v < V; v++)
            se += exp(z[t * V + v] - mx);
        int64_t y = (int64_t)ag_get(targets, t);
        if (msum > 0)
            loss -= m * (z[t * V + y] - mx - log(se)) / msum;
        for (int64_t v = 0; g && v < V; v++)
            g[t * V + v] = msum > 0 ? (exp(z[t * V + v] - mx) / se - (v == y)) * m / msum : 0;
    }
    return loss;
}
