// adapters/merge.c: folding an adapter into its base weights, W' = W + s * B A for 2-D
// targets and per expert for routed experts (A rows e*r..e*r+r-1, B columns k*E + e), in
// double precision accumulation. Not here: writing the merged model (model/save.c does,
// called from cli.c).
#include "adapters.h"

#include <string.h>

// w [out, in] += s * b_e a_e where a_e is r rows of a starting at row a0 and b_e is the r
// columns e, e + stride, e + 2 stride, ... of b.
static void add_delta(float *w, const float *a, const float *b, int64_t out, int64_t in,
                      int r, int64_t a0, int64_t b_cols, int64_t e, int64_t stride, double s) {
    for (int64_t o = 0; o < out; o++)
        for (int64_t i = 0; i < in; i++) {
            double acc = 0;
            for (int k = 0; k < r; k++)
                acc += (double)b[o * b_cols + e + k * stride] * a[(a0 + k) * in + i];
            w[o * in + i] = (float)(w[o * in + i] + s * acc);
        }
}

molt_status lora_merge_into(lora_adapter *ad) {
    for (int i = 0; i < ad->n_units; i++) {
        const lora_unit *u = &ad->units[i];
        if (u->base->dtype != AG_F32 || u->a->dtype != AG_F32 || u->b->dtype != AG_F32)
            return molt_err(MOLT_EUNSUPPORTED, "merge: %s is not F32", u->path);
    }
    for (int i = 0; i < ad->n_units; i++) {
        const lora_unit *u = &ad->units[i];
        float *w = u->base->data;
        const float *a = u->a->data, *b = u->b->data;
        int64_t cols = (int64_t)u->r * u->n_exp;
        if (u->n_exp == 1) {
            add_delta(w, a, b, u->out, u->in, u->r, 0, cols, 0, 1, u->scale);
            continue;
        }
        for (int64_t e = 0; e < u->n_exp; e++)
            add_delta(w + e * u->out * u->in, a, b, u->out, u->in, u->r, e * u->r, cols, e,
                      u->n_exp, u->scale);
    }
    lora_detach(ad);
    return MOLT_OK;
}
