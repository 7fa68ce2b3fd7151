// tests/test_lm_head_lora.c: a LoRA on lm_head in the fused loss (model/forward.c with
// ag_cross_entropy_linear2) on the tiny preset: the fused loss equals the cross-entropy of
// mdl_forward's logits (computed here from the logits' values), the gradients reaching the
// adapters (lm_head's and another unit's) are the same on both routes, with and without
// LoRA dropout, and a few SGD steps on lm_head's adapter alone lower the loss of a batch.
#include "adapters/adapters.h"
#include "harness/harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VOCAB 384
#define T_TOK 7

static void tiny_model(mdl_model *m) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/models/tiny.json", src ? src : ".");
    mcfg cfg;
    ck_assert_ok(mcfg_load(path, &cfg));
    cfg.vocab_size = VOCAB;
    ck_assert_ok(mdl_create(m, &cfg));
    ck_assert_ok(mdl_init_random(m, 77, 0.1));
}

static const double mask_w[T_TOK] = {1, 0, 1, 0.5, 1, 0, 2};

static mdl_batch make_batch(ag_arena *a, bool with_targets) {
    mdl_batch b = {.ids = ag_tensor_new1(a, AG_I32, T_TOK),
                   .pos = ag_tensor_new1(a, AG_I32, T_TOK),
                   .seg = ag_tensor_new1(a, AG_I32, T_TOK)};
    for (int t = 0; t < T_TOK; t++) {
        ((int32_t *)b.ids->data)[t] = (t * 131 + 3) % VOCAB;
        ((int32_t *)b.pos->data)[t] = t;
    }
    if (with_targets) {
        b.targets = ag_tensor_new1(a, AG_I32, T_TOK);
        b.mask = ag_tensor_new1(a, AG_F32, T_TOK);
        for (int t = 0; t < T_TOK; t++) {
            ((int32_t *)b.targets->data)[t] = (t * 211 + 17) % VOCAB;
            ag_set(b.mask, t, mask_w[t]);
        }
    }
    return b;
}

// Loss of the logits route: the masked mean of -log softmax(logits)[target], evaluated
// from the logits' values in double; its gradient G = d loss / d logits goes into the
// constant tensor g so that sum(logits * G) backpropagates the same gradient.
static double loss_from_logits(const ag_tensor *lg, const mdl_batch *b, ag_tensor *g) {
    int64_t V = lg->shape[lg->ndim - 1];
    double msum = 0, loss = 0;
    for (int t = 0; t < T_TOK; t++)
        msum += mask_w[t];
    for (int t = 0; t < T_TOK; t++) {
        double mx = -INFINITY, se = 0;
        for (int64_t v = 0; v < V; v++)
            mx = fmax(mx, ag_get(lg, t * V + v));
        for (int64_t v = 0; v < V; v++)
            se += exp(ag_get(lg, t * V + v) - mx);
        int32_t y = ((const int32_t *)b->targets->data)[t];
        loss -= mask_w[t] * (ag_get(lg, t * V + y) - mx - log(se)) / msum;
        for (int64_t v = 0; v < V; v++)
            ag_set(g, t * V + v,
                   (exp(ag_get(lg, t * V + v) - mx) / se - (v == y)) * mask_w[t] / msum);
    }
    return loss;
}

// Copies of every adapter gradient (A then B per unit), zeroing them for the next route.
static float *take_grads(lora_adapter *ad, int64_t *n) {
    int64_t total = 0;
    for (int i = 0; i < ad->n_units; i++)
        total += ad->units[i].a->numel + ad->units[i].b->numel;
    float *out = calloc((size_t)total, sizeof *out), *p = out;
    ck_assert_ptr_nonnull(out);
    for (int i = 0; i < ad->n_units; i++) {
        ag_tensor *ts[2] = {ad->units[i].a, ad->units[i].b};
        for (int k = 0; k < 2; k++) {
            ck_assert_msg(ts[k]->grad != NULL, "%s: no gradient", ad->units[i].path);
            memcpy(p, ts[k]->grad->data, (size_t)ts[k]->numel * sizeof *p);
            p += ts[k]->numel;
            ag_grad_zero(ts[k]);
        }
    }
    *n = total;
    return out;
}

static void compare_routes(const char *spec_text) {
    mdl_model m;
    tiny_model(&m);
    lora_spec s;
    ck_assert_ok(lora_spec_parse(spec_text, &s));
    lora_adapter ad;
    ck_assert_ok(lora_attach(&m, &s, true, &ad));
    lora_randomize_b(&ad, 11, 0.2); // B = 0 would hide the adapter's effect on the loss
    ck_assert_ptr_nonnull(m.lm_head.lora_a);
    ag_rng rng0 = *ad.dropout_rng; // both routes draw the same dropout masks
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_arena in;
    ag_arena_init(&in, "batch", 1 << 16);
    mdl_batch bt = make_batch(&in, true), bl = make_batch(&in, false);
    bl.targets = NULL;

    ag_tensor *loss;
    ck_assert_ok(mdl_forward(&c, &m, &bt, &loss));
    double fused = ag_get(loss, 0);
    ck_assert_ok(ag_backward(&c, loss));
    int64_t n;
    float *g_fused = take_grads(&ad, &n);
    ag_ctx_step_reset(&c);

    *ad.dropout_rng = rng0;
    ag_tensor *lg;
    ck_assert_ok(mdl_forward(&c, &m, &bl, &lg));
    ag_tensor *g = ag_tensor_new(&c.act, AG_F32, lg->ndim, lg->shape);
    double want = loss_from_logits(lg, &bt, g);
    ag_tensor *surrogate = ag_sum(&c, ag_mul(&c, lg, g));
    ck_assert_tensor(surrogate);
    ck_assert_ok(ag_backward(&c, surrogate));
    float *g_logits = take_grads(&ad, &n);

    ck_assert_double_gt(want, 1.0);
    ck_assert_msg(fabs(fused - want) <= 1e-5 * want, "%s: fused %.9g vs logits %.9g",
                  spec_text, fused, want);
    double md = 0, mw = 0;
    for (int64_t i = 0; i < n; i++) {
        md = fmax(md, fabs((double)g_fused[i] - g_logits[i]));
        mw = fmax(mw, fabs((double)g_logits[i]));
    }
    ck_assert_double_gt(mw, 0);
    ck_assert_msg(md <= 1e-4 * mw, "%s: gradients differ by %g (max %g)", spec_text, md, mw);
    free(g_fused);
    free(g_logits);
    ag_arena_free(&in);
    ag_ctx_free(&c);
    lora_detach(&ad);
    mdl_free(&m);
}

START_TEST(test_fused_equals_logits_route) {
    compare_routes("r=4,alpha=8,targets=lm_head+q_a_proj");
}
END_TEST

START_TEST(test_fused_equals_logits_route_dropout) {
    compare_routes("r=3,alpha=6,dropout=0.3,seed=5,targets=lm_head+o_proj");
}
END_TEST

// Plain SGD on lm_head's A and B alone: the fused loss of a fixed batch must fall well
// below its start (the adapter can raise each target's logit).
START_TEST(test_training_lowers_loss) {
    mdl_model m;
    tiny_model(&m);
    lora_spec s;
    ck_assert_ok(lora_spec_parse("r=8,alpha=16,targets=lm_head", &s));
    lora_adapter ad;
    ck_assert_ok(lora_attach(&m, &s, true, &ad));
    ck_assert_int_eq(ad.n_units, 1);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_arena in;
    ag_arena_init(&in, "batch", 1 << 16);
    mdl_batch b = make_batch(&in, true);
    double first = 0, last = 0;
    for (int step = 0; step < 30; step++) {
        ag_tensor *loss;
        ck_assert_ok(mdl_forward(&c, &m, &b, &loss));
        last = ag_get(loss, 0);
        if (step == 0)
            first = last;
        ck_assert_ok(ag_backward(&c, loss));
        ag_tensor *ts[2] = {ad.units[0].a, ad.units[0].b};
        for (int k = 0; k < 2; k++) {
            float *w = ts[k]->data, *gr = ts[k]->grad->data;
            for (int64_t i = 0; i < ts[k]->numel; i++)
                w[i] -= 0.05f * gr[i];
            ag_grad_zero(ts[k]);
        }
        ag_ctx_step_reset(&c);
    }
    ck_assert_double_gt(first, 5.0); // about log(384) = 5.95 with random weights
    ck_assert_msg(last < 0.5 * first, "loss %g -> %g", first, last);
    ag_arena_free(&in);
    ag_ctx_free(&c);
    lora_detach(&ad);
    mdl_free(&m);
}
END_TEST

int main(void) {
    Suite *s = suite_create("lm_head_lora");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_fused_equals_logits_route);
    tcase_add_test(tc, test_fused_equals_logits_route_dropout);
    tcase_add_test(tc, test_training_lowers_loss);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
