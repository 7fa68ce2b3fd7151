// tests/test_lora_dropout.c: LoRA dropout (mdl_lin.lora_dropout / lora_rng in
// model/forward.c, wired by adapters/lora.c): a gradient check of one LoRA linear with
// dropout at a fixed rng state, the linear against the same sum spelled out with ag_dropout,
// inference (grad mode off) ignoring dropout and leaving the stream alone, and on the tiny
// preset: which units get dropout (2-D ones, not the router or routed experts), a training
// loss that differs from p = 0 yet repeats exactly with the same seed, and an inference loss
// equal to p = 0's. Not here: the trainer's checkpointing of the stream (cli_resume_dropout.sh).
#include "adapters/adapters.h"
#include "harness/harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define VOCAB 512

// ---- one linear ------------------------------------------------------------------------

typedef struct {
    double p, scale;
    uint64_t seed;
} lin_case;

// in[0] x [..., in], in[1] W [out, in] (frozen), in[2] A [r, in], in[3] B [out, r]. The
// stream is re-seeded on every build, so each evaluation draws the same mask. The harness
// evaluates finite differences with grad mode off, where mdl_linear skips dropout by design;
// grad mode is forced on around the call so both sides compute the training function.
static ag_tensor *build_lin(ag_ctx *c, ag_tensor **in, void *user) {
    const lin_case *k = user;
    ag_rng rng;
    ag_rng_seed(&rng, k->seed);
    mdl_lin lin = {.w = in[1], .lora_a = in[2], .lora_b = in[3], .lora_scale = k->scale,
                   .lora_dropout = k->p, .lora_rng = &rng};
    bool g = c->grad_mode;
    ag_ctx_set_grad(c, true);
    ag_tensor *y = mdl_linear(c, in[0], &lin);
    ag_ctx_set_grad(c, g);
    return y;
}

static void lin_inputs(ag_arena *a, ag_rng *r, int nd, const int64_t *xs, int64_t out, int rank,
                       ag_tensor **in) {
    int64_t ws[2] = {out, xs[nd - 1]}, as[2] = {rank, xs[nd - 1]}, bs[2] = {out, rank};
    in[0] = gc_rand(a, r, nd, xs, -1, 1, true);
    in[1] = gc_rand(a, r, 2, ws, -1, 1, false);
    in[2] = gc_rand(a, r, 2, as, -1, 1, true);
    in[3] = gc_rand(a, r, 2, bs, -1, 1, true);
}

START_TEST(test_gradcheck_with_dropout) {
    static const int64_t shapes[3][4] = {{2, 5, 7, 0}, {3, 2, 3, 9}, {2, 11, 6, 0}};
    static const int nds[3] = {2, 3, 2};
    static const int64_t outs[3] = {5, 4, 13};
    static const int ranks[3] = {3, 2, 5};
    static const double ps[3] = {0.3, 0.5, 0.1};
    for (int s = 0; s < 3; s++) {
        ag_arena a;
        ag_arena_init(&a, "in", 0);
        ag_rng r;
        ag_rng_seed(&r, 100 + (uint64_t)s);
        ag_tensor *in[4];
        lin_inputs(&a, &r, nds[s], &shapes[s][1], outs[s], ranks[s], in);
        lin_case k = {.p = ps[s], .scale = 1.75, .seed = 7 + (uint64_t)s};
        gc_case g = {.n_in = 4, .in = in, .build = build_lin, .user = &k};
        gc_result res;
        ck_assert_ok(gc_gradcheck(&g, &res));
        ck_assert_msg(res.max_rel <= 1e-6, "shape %d: max_rel %g (input %d elem %lld)", s,
                      res.max_rel, res.worst_input, (long long)res.worst_elem);
        ck_assert(res.checked > 0);
        ag_arena_free(&a);
    }
}
END_TEST

// mdl_linear with dropout in grad mode equals x W^T + s * (dropout(x) A^T) B^T computed
// here element by element from ag_dropout's output on the same stream state; and the mask
// really drops something.
START_TEST(test_linear_matches_spelled_out) {
    ag_arena a;
    ag_arena_init(&a, "in", 0);
    ag_rng r;
    ag_rng_seed(&r, 5);
    int64_t xs[2] = {6, 8};
    ag_tensor *in[4];
    lin_inputs(&a, &r, 2, xs, 5, 3, in);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, true);
    ag_rng s1, s2;
    ag_rng_seed(&s1, 42);
    s2 = s1;
    mdl_lin lin = {.w = in[1], .lora_a = in[2], .lora_b = in[3], .lora_scale = 0.5,
                   .lora_dropout = 0.4, .lora_rng = &s1};
    ag_tensor *y = mdl_linear(&c, in[0], &lin);
    ag_tensor *xd = ag_dropout(&c, in[0], 0.4, &s2);
    ck_assert_tensor(y);
    ck_assert_tensor(xd);
    ck_assert(memcmp(s1.s, s2.s, sizeof s1.s) == 0); // one draw each
    const double *x = in[0]->data, *w = in[1]->data, *A = in[2]->data, *B = in[3]->data;
    const double *d = xd->data, *yy = y->data;
    int dropped = 0;
    for (int i = 0; i < 48; i++)
        dropped += d[i] == 0 && x[i] != 0;
    ck_assert_int_gt(dropped, 0);
    ck_assert_int_lt(dropped, 48);
    for (int t = 0; t < 6; t++)
        for (int o = 0; o < 5; o++) {
            double base = 0, lo = 0;
            for (int i = 0; i < 8; i++)
                base += x[t * 8 + i] * w[o * 8 + i];
            for (int k = 0; k < 3; k++) {
                double h = 0;
                for (int i = 0; i < 8; i++)
                    h += d[t * 8 + i] * A[k * 8 + i];
                lo += B[o * 3 + k] * h;
            }
            ck_assert_double_eq_tol(yy[t * 5 + o], base + 0.5 * lo, 1e-12);
        }
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

// Grad mode off: the same linear gives exactly the p = 0 output and draws nothing.
START_TEST(test_inference_ignores_dropout) {
    ag_arena a;
    ag_arena_init(&a, "in", 0);
    ag_rng r;
    ag_rng_seed(&r, 6);
    int64_t xs[2] = {4, 7};
    ag_tensor *in[4];
    lin_inputs(&a, &r, 2, xs, 3, 2, in);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_rng s;
    ag_rng_seed(&s, 9);
    ag_rng before = s;
    mdl_lin with = {.w = in[1], .lora_a = in[2], .lora_b = in[3], .lora_scale = 2,
                    .lora_dropout = 0.9, .lora_rng = &s};
    mdl_lin without = with;
    without.lora_dropout = 0;
    without.lora_rng = NULL;
    ag_tensor *y1 = mdl_linear(&c, in[0], &with), *y0 = mdl_linear(&c, in[0], &without);
    ck_assert_tensor(y1);
    ck_assert_tensor(y0);
    ck_assert(memcmp(y1->data, y0->data, (size_t)y0->numel * sizeof(double)) == 0);
    ck_assert(memcmp(s.s, before.s, sizeof s.s) == 0);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

// ---- the tiny preset -------------------------------------------------------------------

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

static void attach(mdl_model *m, const char *text, lora_adapter *ad) {
    lora_spec s;
    ck_assert_ok(lora_spec_parse(text, &s));
    ck_assert_ok(lora_attach(m, &s, true, ad));
    lora_randomize_b(ad, 3, 0.2); // B = 0 would hide any effect of the mask
}

static mdl_batch make_batch(ag_arena *a, int T) {
    mdl_batch b = {.ids = ag_tensor_new1(a, AG_I32, T), .pos = ag_tensor_new1(a, AG_I32, T),
                   .seg = ag_tensor_new1(a, AG_I32, T), .targets = ag_tensor_new1(a, AG_I32, T)};
    for (int t = 0; t < T; t++) {
        ((int32_t *)b.ids->data)[t] = (t * 131 + 3) % VOCAB;
        ((int32_t *)b.pos->data)[t] = t;
        ((int32_t *)b.seg->data)[t] = 0;
        ((int32_t *)b.targets->data)[t] = (t * 977 + 11) % VOCAB;
    }
    return b;
}

#define TARGETS "targets=q_a_proj+kv_b_proj+o_proj+shared_experts.up_proj+gate+experts+gate_proj"

// Loss of the model with the adapter `text` in grad mode `train`.
static double loss_with(mdl_model *m, const char *text, bool train) {
    lora_adapter ad;
    attach(m, text, &ad);
    ag_arena a;
    ag_arena_init(&a, "batch", 1 << 16);
    mdl_batch b = make_batch(&a, 7);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, train);
    ag_tensor *l = NULL;
    ck_assert_ok(mdl_forward(&c, m, &b, &l));
    double v = ag_get(l, 0);
    ag_ctx_free(&c);
    ag_arena_free(&a);
    lora_detach(&ad);
    return v;
}

START_TEST(test_wiring) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, "r=2,dropout=0.25,seed=4," TARGETS, &ad);
    ck_assert_ptr_nonnull(ad.dropout_rng);
    const mdl_layer *y = &m.layers[1];
    const mdl_lin *with[4] = {&y->q_a, &y->o, &y->shared.up, &m.layers[0].dense.gate};
    for (int i = 0; i < 4; i++) {
        ck_assert(with[i]->lora_dropout == 0.25);
        ck_assert_ptr_eq(with[i]->lora_rng, ad.dropout_rng);
    }
    ck_assert_ptr_nonnull(y->router.lora_a); // adapted, but as a parameter: no dropout
    ck_assert(y->router.lora_dropout == 0);
    ck_assert_ptr_null(y->router.lora_rng);
    ck_assert(y->q_b.lora_dropout == 0); // not a target
    lora_detach(&ad);
    ck_assert(y->q_a.lora_dropout == 0);
    ck_assert_ptr_null(y->q_a.lora_rng);

    lora_spec s;
    ck_assert_ok(lora_spec_parse("r=2,targets=o_proj", &s));
    s.dropout = 1;
    ck_assert_int_eq(lora_attach(&m, &s, true, &ad), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "lora: dropout = 1 is outside [0, 1)");
    mdl_free(&m);
}
END_TEST

START_TEST(test_model_loss) {
    mdl_model m = {0};
    tiny_model(&m);
    double l0 = loss_with(&m, "r=2,dropout=0,seed=4," TARGETS, true);
    double l1 = loss_with(&m, "r=2,dropout=0.3,seed=4," TARGETS, true);
    double l1b = loss_with(&m, "r=2,dropout=0.3,seed=4," TARGETS, true);
    double l2 = loss_with(&m, "r=2,dropout=0.3,seed=5," TARGETS, true);
    double i1 = loss_with(&m, "r=2,dropout=0.3,seed=4," TARGETS, false);
    double i0 = loss_with(&m, "r=2,dropout=0,seed=4," TARGETS, false);
    ck_assert(isfinite(l0) && isfinite(l1));
    ck_assert_msg(l1 != l0, "dropout left the training loss at %.17g", l0);
    ck_assert_msg(l1 == l1b, "same seed: %.17g vs %.17g", l1, l1b);
    ck_assert_msg(l2 != l1, "another seed gave the same loss %.17g", l1);
    ck_assert_msg(i1 == i0, "inference: %.17g with dropout vs %.17g without", i1, i0);
    // inference runs the batch-invariant products, training BLAS: same value up to rounding
    ck_assert_msg(fabs(i0 - l0) <= 1e-6 * fabs(l0), "p = 0: train %.17g vs inference %.17g",
                  l0, i0);
    mdl_free(&m);
}
END_TEST

int main(void) {
    Suite *s = suite_create("lora_dropout");
    TCase *t = tcase_create("core");
    tcase_set_timeout(t, 120);
    tcase_add_test(t, test_gradcheck_with_dropout);
    tcase_add_test(t, test_linear_matches_spelled_out);
    tcase_add_test(t, test_inference_ignores_dropout);
    tcase_add_test(t, test_wiring);
    tcase_add_test(t, test_model_loss);
    suite_add_tcase(s, t);
    return harness_run(s);
}
