// tests/test_act_ckpt.c: activation checkpointing (autograd/ops_checkpoint.c and the
// per-layer wiring in model/forward.c). Gradient checks through ag_checkpoint with respect to
// its inputs and to trainable tensors it captures; bit-identical gradients with and without
// it (nested checkpoints and dropout replay included); errors; and on the tiny preset with
// LoRA (dropout on): the same loss and gradients bit for bit, with lower peaks of saved state
// and activation memory. (tests/test_checkpoint.c is about training checkpoints on disk.)
#include "adapters/adapters.h"
#include "harness/harness.h"
#include "autograd/internal.h"

#include <stdlib.h>
#include <string.h>

// ---- a small composite: y = swiglu(x W1^T, x W2^T) * scale, W1/W2 captured via user ----

typedef struct {
    ag_tensor *w1, *w2;
    ag_rng *rng;     // dropout on x when set
    double p;
    int fail_on;     // make fn fail on its n-th call (0 = never)
    int calls;
    bool return_input;
} comp_user;

static ag_tensor *composite(ag_ctx *c, ag_tensor *const *in, void *user) {
    comp_user *u = user;
    u->calls++;
    if (u->fail_on && u->calls == u->fail_on) {
        molt_err(MOLT_EARG, "composite: asked to fail");
        return NULL;
    }
    if (u->return_input)
        return in[0];
    ag_tensor *x = in[0];
    if (u->rng)
        x = ag_dropout(c, x, u->p, u->rng);
    ag_tensor *y = ag_swiglu(c, ag_linear(c, x, u->w1), ag_linear(c, x, u->w2));
    return ag_scale(c, y, 0.75);
}

// Graph under test for the harness: in = {x, w1, w2}; checkpointed or not.
typedef struct {
    bool ckpt;
    bool nested;
} build_opts;

static ag_tensor *outer_nested(ag_ctx *c, ag_tensor *const *in, void *user) {
    // an outer checkpoint whose fn checkpoints the composite again, then adds its input
    ag_tensor *y = ag_checkpoint(c, composite, user, 1, in, 0, NULL);
    if (!y)
        return NULL;
    return ag_add(c, y, ag_slice(c, in[1], 1, 0, y->shape[1]));
}

static ag_tensor *build(ag_ctx *c, ag_tensor **in, void *user) {
    const build_opts *o = user;
    // the user struct must live as long as the tape: put it in the activation arena
    comp_user *u = ag_arena_alloc(&c->act, sizeof *u);
    if (!u)
        return NULL;
    *u = (comp_user){.w1 = in[1], .w2 = in[2]};
    if (!o->ckpt)
        return composite(c, in, u);
    if (o->nested) {
        ag_tensor *pair[2] = {in[0], in[0]};
        return ag_checkpoint(c, outer_nested, u, 2, pair, 0, NULL);
    }
    return ag_checkpoint(c, composite, u, 1, in, 0, NULL);
}

static void make_inputs(ag_arena *a, int64_t T, int64_t C, int64_t O, ag_tensor **in) {
    ag_rng r;
    ag_rng_seed(&r, (uint64_t)(T * 100 + C * 10 + O));
    in[0] = gc_rand(a, &r, 2, (int64_t[]){T, C}, -1, 1, true);
    in[1] = gc_rand(a, &r, 2, (int64_t[]){O, C}, -0.5, 0.5, true);
    in[2] = gc_rand(a, &r, 2, (int64_t[]){O, C}, -0.5, 0.5, true);
}

START_TEST(test_gradcheck_through_checkpoint) {
    const int64_t shapes[][3] = {{5, 7, 6}, {3, 4, 9}, {1, 13, 5}};
    for (int nested = 0; nested < 2; nested++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            ag_arena a;
            ag_arena_init(&a, "inputs", 1 << 16);
            ag_tensor *in[3];
            // nested: the outer fn adds in[1][:, :O] to the inner output, so C >= O there
            int64_t C = nested && shapes[s][1] < shapes[s][2] ? shapes[s][2] : shapes[s][1];
            make_inputs(&a, shapes[s][0], C, shapes[s][2], in);
            build_opts o = {.ckpt = true, .nested = nested};
            gc_case g = {.n_in = 3, .in = in, .build = build, .user = &o};
            gc_result r;
            ck_assert_ok(gc_gradcheck(&g, &r));
            ck_assert_msg(r.max_rel <= 1e-6, "nested %d shape %zu: max_rel %g (input %d)",
                          nested, s, r.max_rel, r.worst_input);
            ck_assert_int_gt(r.checked, 0);
            double rel;
            ck_assert_ok(gc_f32_vs_f64(&g, &rel));
            ck_assert_msg(rel <= 1e-5, "f32 vs f64 rel %g", rel);
            ag_arena_free(&a);
        }
}
END_TEST

// Runs build() on fresh grads and returns L = sum(y * R); grads land on in[].
static double run_once(ag_tensor **in, const build_opts *o, ag_arena *keep, ag_tensor **grads) {
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    for (int i = 0; i < 3; i++)
        in[i]->grad = NULL;
    ag_tensor *y = build(&c, in, (void *)o);
    ck_assert_tensor(y);
    ag_tensor *w = ag_tensor_new(&c.act, AG_F64, y->ndim, y->shape);
    for (int64_t i = 0; i < w->numel; i++)
        ag_set(w, i, 0.1 + 0.01 * (double)(i % 17));
    ag_tensor *loss = ag_sum(&c, ag_mul(&c, y, w));
    ck_assert_tensor(loss);
    double l = ag_get(loss, 0);
    ck_assert_ok(ag_backward(&c, loss));
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert_uint_eq(c.saved_bytes, 0);
    for (int i = 0; i < 3; i++) {
        ck_assert_ptr_nonnull(in[i]->grad);
        grads[i] = gc_clone(keep, in[i]->grad, AG_F64);
    }
    ag_ctx_free(&c);
    return l;
}

static void assert_same_bits(const ag_tensor *a, const ag_tensor *b, const char *what) {
    ck_assert_int_eq(a->numel, b->numel);
    ck_assert_msg(!memcmp(a->data, b->data, (size_t)a->numel * ag_dtype_size(a->dtype)),
                  "%s differs (max rel %g)", what, gc_max_rel_diff(a, b));
}

START_TEST(test_same_grads_with_and_without) {
    ag_arena a;
    ag_arena_init(&a, "inputs", 1 << 16);
    ag_tensor *in[3], *g0[3], *g1[3], *g2[3];
    make_inputs(&a, 6, 11, 11, in);
    build_opts plain = {0}, ck = {.ckpt = true}, nest = {.ckpt = true, .nested = true};
    double l0 = run_once(in, &plain, &a, g0);
    double l1 = run_once(in, &ck, &a, g1);
    ck_assert(l0 == l1);
    for (int i = 0; i < 3; i++)
        assert_same_bits(g1[i], g0[i], "checkpointed grad");
    // nested: y + x[:, :O] with x passed twice: d/dx gains the identity on top
    run_once(in, &nest, &a, g2);
    for (int i = 1; i < 3; i++)
        assert_same_bits(g2[i], g0[i], "nested grad of a captured weight");
    double w0 = 0.1; // R[0] of run_once's weights: dL/dx[0] gains exactly R[0]
    ck_assert_double_eq_tol(ag_get(g2[0], 0), ag_get(g0[0], 0) + w0, 1e-12);
    ck_assert_double_eq_tol(ag_get(g2[0], 1), ag_get(g0[0], 1) + 0.11, 1e-12);
    ag_arena_free(&a);
}
END_TEST

// Dropout inside the checkpoint: with the generator handed to ag_checkpoint the
// recomputation replays the forward's mask (same grads as no checkpoint, and the generator
// ends where it would have); without it a fresh mask is drawn and the grads differ.
static void dropout_run(bool ckpt, bool pass_rng, ag_tensor **in, ag_arena *keep,
                        ag_tensor **gx, ag_rng *end) {
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_rng rng;
    ag_rng_seed(&rng, 77);
    for (int i = 0; i < 3; i++)
        in[i]->grad = NULL;
    comp_user u = {.w1 = in[1], .w2 = in[2], .rng = &rng, .p = 0.3};
    ag_rng *rngs[1] = {&rng};
    ag_tensor *y = ckpt ? ag_checkpoint(&c, composite, &u, 1, in, pass_rng ? 1 : 0, rngs)
                        : composite(&c, in, &u);
    ck_assert_tensor(y);
    // draws after the checkpoint must not be disturbed by the recomputation
    ag_tensor *y2 = ag_dropout(&c, y, 0.2, &rng);
    ck_assert_ok(ag_backward(&c, ag_sum(&c, y2)));
    *gx = gc_clone(keep, in[0]->grad, AG_F64);
    *end = rng;
    ag_ctx_free(&c);
}

START_TEST(test_dropout_replayed) {
    ag_arena a;
    ag_arena_init(&a, "inputs", 1 << 16);
    ag_tensor *in[3], *g_plain, *g_ck, *g_norng;
    ag_rng e_plain, e_ck, e_norng;
    make_inputs(&a, 8, 9, 7, in);
    dropout_run(false, false, in, &a, &g_plain, &e_plain);
    dropout_run(true, true, in, &a, &g_ck, &e_ck);
    dropout_run(true, false, in, &a, &g_norng, &e_norng);
    assert_same_bits(g_ck, g_plain, "dropout grad with the rng replayed");
    ck_assert(!memcmp(&e_ck, &e_plain, sizeof e_ck));
    ck_assert_msg(gc_max_rel_diff(g_norng, g_plain) > 1e-3,
                  "a fresh mask on recompute should change the grads");
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_grad_off_and_nothing_trainable) {
    ag_arena a;
    ag_arena_init(&a, "inputs", 1 << 16);
    ag_tensor *in[3];
    make_inputs(&a, 4, 5, 3, in);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    comp_user u = {.w1 = in[1], .w2 = in[2]};
    ag_ctx_set_grad(&c, false);
    ag_tensor *y = ag_checkpoint(&c, composite, &u, 1, in, 0, NULL);
    ck_assert_tensor(y);
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert_int_eq(u.calls, 1);
    ag_tensor *ref = composite(&c, in, &u);
    assert_same_bits(y, ref, "grad-off output");
    // grad on, but nothing inside requires grad: no node, a constant result
    ag_ctx_set_grad(&c, true);
    for (int i = 0; i < 3; i++)
        in[i]->requires_grad = false;
    y = ag_checkpoint(&c, composite, &u, 1, in, 0, NULL);
    ck_assert_tensor(y);
    ck_assert(!y->requires_grad);
    ck_assert_int_eq(c.n_tape, 0);
    // a captured weight alone is enough to record (x frozen, as after a frozen embedding)
    in[1]->requires_grad = true;
    y = ag_checkpoint(&c, composite, &u, 1, in, 0, NULL);
    ck_assert_tensor(y);
    ck_assert_int_eq(c.n_tape, 1);
    ck_assert_str_eq(ag_op_name(AG_OP_CHECKPOINT), "checkpoint");
    ck_assert_ok(ag_backward(&c, ag_sum(&c, y)));
    ck_assert_ptr_nonnull(in[1]->grad);
    ck_assert_ptr_null(in[0]->grad);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_errors) {
    ag_arena a;
    ag_arena_init(&a, "inputs", 1 << 16);
    ag_tensor *in[3];
    make_inputs(&a, 4, 5, 3, in);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    comp_user u = {.w1 = in[1], .w2 = in[2]};
    ck_assert_ptr_null(ag_checkpoint(&c, NULL, &u, 1, in, 0, NULL));
    ck_assert_str_eq(molt_err_msg(), "checkpoint: fn is NULL");
    ck_assert_ptr_null(ag_checkpoint(&c, composite, &u, -1, in, 0, NULL));
    ck_assert_str_eq(molt_err_msg(), "checkpoint: n_in is -1, expected 0..64");
    ck_assert_ptr_null(ag_checkpoint(&c, composite, &u, 1, NULL, 0, NULL));
    ck_assert_str_eq(molt_err_msg(), "checkpoint: inputs is NULL with n_in 1");
    ck_assert_ptr_null(ag_checkpoint(&c, composite, &u, 1, in, 9, NULL));
    ck_assert_str_eq(molt_err_msg(), "checkpoint: n_rng is 9, expected 0..8");
    ag_rng *none[1] = {NULL};
    ck_assert_ptr_null(ag_checkpoint(&c, composite, &u, 1, in, 1, none));
    ck_assert_str_eq(molt_err_msg(), "checkpoint: rng 0 is NULL");
    // fn failing in the forward: NULL, nothing recorded, the inner message kept
    u.fail_on = 1;
    ck_assert_ptr_null(ag_checkpoint(&c, composite, &u, 1, in, 0, NULL));
    ck_assert_str_eq(molt_err_msg(),
                     "checkpoint: fn failed during the forward: composite: asked to fail");
    ck_assert_int_eq(c.n_tape, 0);
    // fn returning its input instead of a new tensor
    u = (comp_user){.w1 = in[1], .w2 = in[2], .return_input = true};
    ck_assert_ptr_null(ag_checkpoint(&c, composite, &u, 1, in, 0, NULL));
    ck_assert_str_eq(molt_err_msg(), "checkpoint: fn returned a tensor it did not create (one "
                     "of its inputs or a captured tensor) during the forward; return a new "
                     "result");
    // fn failing in the recomputation: ag_backward reports it, the tape is still droppable
    u = (comp_user){.w1 = in[1], .w2 = in[2], .fail_on = 2};
    ag_tensor *y = ag_checkpoint(&c, composite, &u, 1, in, 0, NULL);
    ck_assert_tensor(y);
    ck_assert_int_eq(ag_backward(&c, ag_sum(&c, y)), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "backward of checkpoint: checkpoint: fn failed during the "
                     "recomputation: composite: asked to fail");
    ag_ctx_step_reset(&c);
    ck_assert_uint_eq(c.saved_bytes, 0);
    // an allocation failing anywhere in forward or backward: an error, no crash, no leak
    int failed = 0;
    for (long k = 0; k < 60; k++) {
        u = (comp_user){.w1 = in[1], .w2 = in[2]};
        for (int i = 0; i < 3; i++)
            in[i]->grad = NULL;
        molt_alloc_fail_after(k);
        y = ag_checkpoint(&c, composite, &u, 1, in, 0, NULL);
        ag_tensor *l = y ? ag_sum(&c, y) : NULL;
        molt_status st = l ? ag_backward(&c, l) : MOLT_ENOMEM;
        molt_alloc_fail_after(-1);
        failed += st != MOLT_OK;
        ag_ctx_step_reset(&c);
        ck_assert_uint_eq(c.saved_bytes, 0);
    }
    ck_assert_int_gt(failed, 5);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

// ---- the model: tiny preset with LoRA on every 2-D target plus the experts ----

#define VOCAB 512

static void tiny_model(mdl_model *m, int layers) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/models/tiny.json", src ? src : ".");
    mcfg cfg;
    ck_assert_ok(mcfg_load(path, &cfg));
    cfg.vocab_size = VOCAB;
    if (layers)
        cfg.num_hidden_layers = layers;
    ck_assert_ok(mdl_create(m, &cfg));
    ck_assert_ok(mdl_init_random(m, 4321, 0.1));
}

static mdl_batch make_batch(ag_arena *a, int T) {
    mdl_batch b = {.ids = ag_tensor_new1(a, AG_I32, T), .pos = ag_tensor_new1(a, AG_I32, T),
                   .seg = ag_tensor_new1(a, AG_I32, T), .targets = ag_tensor_new1(a, AG_I32, T)};
    for (int t = 0; t < T; t++) {
        ((int32_t *)b.ids->data)[t] = (t * 7919 + 13) % VOCAB;
        ((int32_t *)b.pos->data)[t] = t < T / 2 ? t : t - T / 2; // two packed sequences
        ((int32_t *)b.seg->data)[t] = t < T / 2 ? 0 : 1;
        ((int32_t *)b.targets->data)[t] = (t * 104729 + 5) % VOCAB;
    }
    return b;
}

typedef struct {
    float loss;
    size_t saved_peak, act_peak;
} model_run;

// One forward + backward from the same dropout state; grads copied into g[2 * n_units].
static model_run model_step(mdl_model *m, lora_adapter *ad, const mdl_batch *b, bool ckpt,
                            const ag_rng *rng0, ag_arena *keep, ag_tensor **g) {
    m->checkpoint_layers = ckpt;
    *ad->dropout_rng = *rng0;
    for (int i = 0; i < ad->n_units; i++) {
        ad->units[i].a->grad = NULL;
        ad->units[i].b->grad = NULL;
    }
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_tensor *loss;
    ck_assert_ok(mdl_forward(&c, m, b, &loss));
    model_run r = {.loss = ((float *)loss->data)[0]};
    ck_assert_ok(ag_backward(&c, loss));
    r.saved_peak = c.saved_peak;
    r.act_peak = c.act.peak;
    for (int i = 0; i < ad->n_units; i++) {
        ck_assert_ptr_nonnull(ad->units[i].a->grad);
        ck_assert_ptr_nonnull(ad->units[i].b->grad);
        g[2 * i] = gc_clone(keep, ad->units[i].a->grad, AG_F32);
        g[2 * i + 1] = gc_clone(keep, ad->units[i].b->grad, AG_F32);
    }
    ag_ctx_free(&c);
    return r;
}

static void attach_all(mdl_model *m, lora_adapter *ad) {
    lora_spec s;
    ck_assert_ok(lora_spec_parse("r=4,alpha=8,dropout=0.25,seed=3,targets=q_a_proj+q_b_proj+"
                                 "kv_a_proj_with_mqa+kv_b_proj+o_proj+gate_proj+up_proj+"
                                 "down_proj+experts", &s));
    ck_assert_ok(lora_attach(m, &s, true, ad));
    lora_randomize_b(ad, 11, 0.2);
}

START_TEST(test_model_same_loss_and_grads) {
    mdl_model m = {0};
    tiny_model(&m, 0);
    lora_adapter ad;
    attach_all(&m, &ad);
    ag_arena keep;
    ag_arena_init(&keep, "keep", 1 << 20);
    mdl_batch b = make_batch(&keep, 12);
    ag_rng rng0 = *ad.dropout_rng;
    int n = 2 * ad.n_units;
    ag_tensor **g0 = calloc((size_t)n, sizeof *g0), **g1 = calloc((size_t)n, sizeof *g1);
    model_run r0 = model_step(&m, &ad, &b, false, &rng0, &keep, g0);
    ag_rng end0 = *ad.dropout_rng;
    model_run r1 = model_step(&m, &ad, &b, true, &rng0, &keep, g1);
    ck_assert_msg(r0.loss == r1.loss, "loss %.9g vs %.9g", r0.loss, r1.loss);
    ck_assert(!memcmp(&end0, ad.dropout_rng, sizeof end0));
    for (int i = 0; i < n; i++)
        assert_same_bits(g1[i], g0[i], ad.units[i / 2].path);
    // dropout really acted: another mask changes the loss
    ag_rng other;
    ag_rng_seed(&other, 999);
    model_run r2 = model_step(&m, &ad, &b, true, &other, &keep, g1);
    ck_assert(r2.loss != r0.loss);
    free(g0);
    free(g1);
    ag_arena_free(&keep);
    lora_detach(&ad);
    mdl_free(&m);
}
END_TEST

START_TEST(test_model_peaks_drop) {
    mdl_model m = {0};
    tiny_model(&m, 6);
    lora_adapter ad;
    attach_all(&m, &ad);
    ag_arena keep;
    ag_arena_init(&keep, "keep", 1 << 20);
    mdl_batch b = make_batch(&keep, 16);
    ag_rng rng0 = *ad.dropout_rng;
    int n = 2 * ad.n_units;
    ag_tensor **g = calloc((size_t)n, sizeof *g);
    model_run r0 = model_step(&m, &ad, &b, false, &rng0, &keep, g);
    model_run r1 = model_step(&m, &ad, &b, true, &rng0, &keep, g);
    ck_assert(r0.loss == r1.loss);
    ck_assert_msg(r1.saved_peak * 2 < r0.saved_peak, "saved peak %zu with, %zu without",
                  r1.saved_peak, r0.saved_peak);
    ck_assert_msg(r1.act_peak < r0.act_peak, "activation peak %zu with, %zu without",
                  r1.act_peak, r0.act_peak);
    free(g);
    ag_arena_free(&keep);
    lora_detach(&ad);
    mdl_free(&m);
}
END_TEST

int main(void) {
    Suite *s = suite_create("act_ckpt");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_gradcheck_through_checkpoint);
    tcase_add_test(tc, test_same_grads_with_and_without);
    tcase_add_test(tc, test_dropout_replayed);
    tcase_add_test(tc, test_grad_off_and_nothing_trainable);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_model_same_loss_and_grads);
    tcase_add_test(tc, test_model_peaks_drop);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
