// tests/test_lora.c: LoRA specs and attaching (adapters/lora.c, merge.c) on the tiny preset
// (configs/models/tiny.json, random weights): target pattern semantics, trainable counts
// per group against numbers computed by hand from the preset's shapes, the no-match and
// zero-parameter errors, Kaiming/Gaussian init statistics and seed determinism, rsLoRA and
// per-group rank/alpha, logits with LoRA (routed experts included) equal to logits of the
// merged model, routed-expert merge against a direct per-expert sum, and gradients that
// reach only A and B.
#include "adapters/adapters.h"
#include "harness/harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Tiny preset: H 32, L 3 (layer 0 dense), NH 4, RQ 24, RKV 16, DN 8, DR 8, DV 12, E 8,
// I 16, one shared expert (16), IM 64; V 131072 in the preset, cut to VOCAB here. Per
// unit, in + out (times E for experts):
//   q_a [24,32] 56, q_b [64,24] 88, kv_a [24,32] 56, kv_b [80,16] 96, o [32,48] 80
//   -> attention 376 per layer, 1128 for 3 layers
//   dense gate/up [64,32] 96 each, down [32,64] 96 -> 288 (layer 0)
//   shared gate/up [16,32] 48 each, down [32,16] 48 -> 144 per MoE layer, 288
//   router [8,32] 40 per MoE layer, 80
//   experts gate_up [8,32,32] 8*64 = 512, down [8,32,16] 8*48 = 384 -> 896 per layer, 1792
//   lm_head [VOCAB,32] VOCAB + 32
#define VOCAB 1024
#define PER_R_ATTN 1128
#define PER_R_DENSE 288
#define PER_R_SHARED 288
#define PER_R_ROUTER 80
#define PER_R_EXPERTS 1792
#define PER_R_LM_HEAD (VOCAB + 32)

static void tiny_model(mdl_model *m) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/models/tiny.json", src ? src : ".");
    mcfg cfg;
    ck_assert_ok(mcfg_load(path, &cfg));
    cfg.vocab_size = VOCAB; // the preset's 131072 rows only cost time here
    ck_assert_ok(mdl_create(m, &cfg));
    ck_assert_ok(mdl_init_random(m, 1234, 0.1));
}

static void attach(mdl_model *m, const char *text, bool fwd, lora_adapter *ad) {
    lora_spec s;
    ck_assert_ok(lora_spec_parse(text, &s));
    ck_assert_ok(lora_attach(m, &s, fwd, ad));
}

START_TEST(test_pattern_match) {
    const char *p = "model.layers.0.self_attn.q_a_proj";
    ck_assert(lora_pattern_match("q_a_proj", p));
    ck_assert(lora_pattern_match("self_attn.q_a_proj", p));
    ck_assert(lora_pattern_match(p, p));
    ck_assert(!lora_pattern_match("a_proj", p));
    ck_assert(!lora_pattern_match("proj", p));
    ck_assert(lora_pattern_match("layers.0.*", p));
    ck_assert(!lora_pattern_match("layers.0.*", "model.layers.10.self_attn.q_a_proj"));
    ck_assert(lora_pattern_match("*_a_proj", p));
    ck_assert(lora_pattern_match("lm_head", "lm_head"));
    ck_assert(!lora_pattern_match("gate", "model.layers.1.mlp.shared_experts.gate_proj"));
    ck_assert(lora_pattern_match("gate", "model.layers.1.mlp.gate"));
}
END_TEST

START_TEST(test_counts_per_group) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, "r=4,targets=q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+gate_proj+"
               "up_proj+down_proj+gate+experts+lm_head", false, &ad);
    int64_t want[LORA_GROUP_COUNT] = {4 * PER_R_ATTN,    4 * PER_R_DENSE,  4 * PER_R_SHARED,
                                      4 * PER_R_EXPERTS, 4 * PER_R_ROUTER, 4 * PER_R_LM_HEAD};
    int64_t total = 0;
    for (int g = 0; g < LORA_GROUP_COUNT; g++) {
        ck_assert_msg(lora_group_params(&ad, g) == want[g], "%s: %lld != %lld",
                      lora_group_name(g), (long long)lora_group_params(&ad, g),
                      (long long)want[g]);
        total += want[g];
    }
    ck_assert_int_eq(ad.total_params, total);
    // 3*5 attention + 3 dense + 2*(3 shared + router + 2 experts) + lm_head
    ck_assert_int_eq(ad.n_units, 15 + 3 + 12 + 1);
    lora_unit *e = lora_find_unit(&ad, "model.layers.2.mlp.experts.down_proj");
    ck_assert_ptr_nonnull(e);
    ck_assert_int_eq(e->a->shape[0], 4 * 8);
    ck_assert_int_eq(e->a->shape[1], 16);
    ck_assert_int_eq(e->b->shape[0], 32);
    ck_assert_int_eq(e->b->shape[1], 4 * 8);
    char buf[4096] = {0};
    FILE *f = fmemopen(buf, sizeof buf - 1, "w");
    lora_print_table(&ad, f);
    fclose(f);
    char line[128];
    snprintf(line, sizeof line, "%14lld", (long long)total);
    ck_assert_msg(strstr(buf, "experts") && strstr(buf, line), "table:\n%s", buf);
    lora_detach(&ad);
    ck_assert_ptr_null(m.layers[0].q_a.lora_a);
    mdl_free(&m);
}
END_TEST

// "down_proj" means the dense/shared modules (PEFT target_modules); "experts" both routed
// parameters; "gate" only the router.
START_TEST(test_target_semantics) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, "r=2,targets=down_proj", false, &ad);
    ck_assert_int_eq(lora_group_params(&ad, LORA_GROUP_EXPERTS), 0);
    ck_assert_int_eq(lora_group_params(&ad, LORA_GROUP_DENSE), 2 * 96);
    ck_assert_int_eq(lora_group_params(&ad, LORA_GROUP_SHARED), 2 * 2 * 48);
    lora_detach(&ad);
    attach(&m, "r=2,targets=gate", false, &ad);
    ck_assert_int_eq(ad.total_params, 2 * PER_R_ROUTER);
    lora_detach(&ad);
    attach(&m, "r=2,targets=mlp.experts.down_proj", false, &ad);
    ck_assert_int_eq(ad.total_params, 2 * 2 * 384);
    lora_detach(&ad);
    attach(&m, "r=2,targets=layers.1.*", false, &ad);
    ck_assert_int_eq(ad.total_params, 2 * (376 + 144 + 40 + 896));
    lora_detach(&ad);
    mdl_free(&m);
}
END_TEST

START_TEST(test_errors) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    lora_spec s;
    ck_assert_ok(lora_spec_parse("r=4,targets=o_proj+q_proj", &s));
    ck_assert_int_eq(lora_attach(&m, &s, true, &ad), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "lora: target 'q_proj' matches no module of the model");
    ck_assert_ptr_null(m.layers[1].o.lora_a); // nothing stays attached

    // the expert op takes one rank and scale for both stacks of a layer
    ck_assert_ok(lora_spec_parse("r=4,targets=experts,rank:experts.down_proj=2", &s));
    ck_assert_int_eq(lora_attach(&m, &s, true, &ad), MOLT_EUNSUPPORTED);
    ck_assert_str_eq(molt_err_msg(), "lora: layer 1: routed-expert LoRA needs the same rank "
                     "and scale on gate_up_proj (r 4, scale 4) and down_proj (r 2, scale 8)");
    ck_assert_ptr_null(m.layers[1].experts_lora.a_gate_up);
    ck_assert_ok(lora_attach(&m, &s, false, &ad)); // storage only: files and merging
    ck_assert_ptr_null(m.layers[1].experts_lora.a_gate_up);
    lora_detach(&ad);
    ck_assert_ok(lora_spec_parse("r=4,targets=experts", &s));
    // a rank pattern that leaves routed experts with nothing is an error, not a warning
    s.n_rank_pattern = 1;
    snprintf(s.rank_pattern[0].key, LORA_NAME_MAX, "experts.gate_up_proj");
    s.rank_pattern[0].value = 0;
    ck_assert_int_eq(lora_attach(&m, &s, false, &ad), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "lora: routed-expert LoRA on "
                     "model.layers.1.mlp.experts.gate_up_proj ends up with rank 0 (zero "
                     "parameters)");

    ck_assert_int_eq(lora_spec_parse("r=0,targets=o_proj", &s), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "lora spec: r=0 must be a positive integer");
    ck_assert_int_eq(lora_spec_parse("r=4,rank=3", &s), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "lora spec: unknown key 'rank' (groups: attn, dense, "
                     "shared, experts, router, lm_head)");
    ck_assert_int_eq(lora_spec_parse("r=4,init=xavier", &s), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "lora spec: init=xavier (expected kaiming or gaussian)");

    attach(&m, "targets=o_proj", true, &ad);
    lora_adapter ad2;
    ck_assert_ok(lora_spec_parse("targets=q_a_proj", &s));
    ck_assert_int_eq(lora_attach(&m, &s, true, &ad2), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "lora: the model already carries an adapter");
    lora_detach(&ad);
    mdl_free(&m);
}
END_TEST

START_TEST(test_spec_roundtrip) {
    lora_spec s, t;
    const char *text = "r=4,alpha=8.5,dropout=0.125,rslora=1,init=gaussian,seed=77,"
                       "targets=q_a_proj+layers.0.*,r.attn=2,alpha.shared=3,"
                       "rank:layers.1.self_attn.o_proj=6,alpha:lm_head=0.5";
    ck_assert_ok(lora_spec_parse(text, &s));
    ck_assert_int_eq(s.r, 4);
    ck_assert(s.alpha == 8.5 && s.dropout == 0.125 && s.rslora && s.seed == 77);
    ck_assert_int_eq(s.init, LORA_INIT_GAUSSIAN);
    ck_assert_int_eq(s.n_targets, 2);
    ck_assert_str_eq(s.targets[1], "layers.0.*");
    ck_assert_int_eq(s.group_r[LORA_GROUP_ATTN], 2);
    ck_assert(s.group_alpha[LORA_GROUP_SHARED] == 3);
    ck_assert_str_eq(s.rank_pattern[0].key, "layers.1.self_attn.o_proj");
    char a[2048], b[2048];
    ck_assert_ok(lora_spec_format(&s, a, sizeof a));
    ck_assert_ok(lora_spec_parse(a, &t));
    ck_assert_ok(lora_spec_format(&t, b, sizeof b));
    ck_assert_str_eq(a, b);
    ck_assert_int_eq(memcmp(&s, &t, sizeof s), 0);
}
END_TEST

static void stats(const ag_tensor *t, double *mean, double *var, double *absmax) {
    double s = 0, s2 = 0, mx = 0;
    const float *x = t->data;
    for (int64_t i = 0; i < t->numel; i++) {
        s += x[i];
        s2 += (double)x[i] * x[i];
        mx = fabs(x[i]) > mx ? fabs(x[i]) : mx;
    }
    *mean = s / t->numel;
    *var = s2 / t->numel - *mean * *mean;
    *absmax = mx;
}

START_TEST(test_init_statistics) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    // q_b_proj: in 24, 3 layers of A [16, 24]; down_proj in 64 (dense) and 16 (shared)
    attach(&m, "r=16,seed=3,targets=q_b_proj", false, &ad);
    double bound = 1 / sqrt(24.0);
    for (int i = 0; i < ad.n_units; i++) {
        double mean, var, mx;
        stats(ad.units[i].a, &mean, &var, &mx);
        ck_assert_msg(mx <= bound && mx > 0.95 * bound, "max %g, bound %g", mx, bound);
        ck_assert_msg(fabs(mean) < 0.15 * bound, "mean %g", mean);
        // U(-b, b) has variance b^2 / 3; 384 samples: relative sd of the estimate ~ 5%
        ck_assert_msg(fabs(var / (bound * bound / 3) - 1) < 0.2, "var %g", var);
        stats(ad.units[i].b, &mean, &var, &mx);
        ck_assert(mx == 0);
    }
    lora_detach(&ad);
    attach(&m, "r=4,init=gaussian,seed=3,targets=q_a_proj+kv_a_proj_with_mqa+o_proj", false, &ad);
    double s2 = 0;
    int64_t n = 0;
    for (int i = 0; i < ad.n_units; i++) {
        double mean, var, mx;
        stats(ad.units[i].a, &mean, &var, &mx);
        s2 += (var + mean * mean) * ad.units[i].a->numel;
        n += ad.units[i].a->numel;
    }
    ck_assert_msg(fabs(sqrt(s2 / n) / 0.25 - 1) < 0.1, "std %g, want 1/r", sqrt(s2 / n));
    lora_detach(&ad);
    mdl_free(&m);
}
END_TEST

START_TEST(test_seed_determinism) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, "r=4,seed=11,targets=o_proj+up_proj", false, &ad);
    int64_t n = ad.units[0].a->numel;
    float *first = malloc((size_t)n * sizeof *first);
    memcpy(first, ad.units[0].a->data, (size_t)n * sizeof *first);
    lora_detach(&ad);
    attach(&m, "r=4,seed=11,targets=o_proj+up_proj", false, &ad);
    ck_assert_int_eq(memcmp(first, ad.units[0].a->data, (size_t)n * sizeof *first), 0);
    lora_detach(&ad);
    attach(&m, "r=4,seed=12,targets=o_proj+up_proj", false, &ad);
    ck_assert_int_ne(memcmp(first, ad.units[0].a->data, (size_t)n * sizeof *first), 0);
    lora_detach(&ad);
    free(first);
    mdl_free(&m);
}
END_TEST

START_TEST(test_scales_and_groups) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, "r=4,alpha=16,rslora=1,targets=o_proj", true, &ad);
    ck_assert_double_eq_tol(m.layers[2].o.lora_scale, 16 / 2.0, 1e-15);
    lora_detach(&ad);
    attach(&m, "r=4,alpha=16,targets=o_proj", true, &ad);
    ck_assert_double_eq_tol(m.layers[2].o.lora_scale, 16 / 4.0, 1e-15);
    lora_detach(&ad);
    attach(&m, "r=4,alpha=8,r.attn=2,alpha.shared=3,rank:layers.1.self_attn.q_a_proj=6,"
               "targets=q_a_proj+up_proj", true, &ad);
    ck_assert_int_eq(m.layers[0].q_a.lora_a->shape[0], 2);
    ck_assert_double_eq_tol(m.layers[0].q_a.lora_scale, 8 / 2.0, 1e-15);
    ck_assert_int_eq(m.layers[1].q_a.lora_a->shape[0], 6); // the pattern wins
    ck_assert_double_eq_tol(m.layers[1].q_a.lora_scale, 8 / 6.0, 1e-15);
    ck_assert_int_eq(m.layers[1].shared.up.lora_b->shape[1], 4);
    ck_assert_double_eq_tol(m.layers[1].shared.up.lora_scale, 3 / 4.0, 1e-15);
    ck_assert_double_eq_tol(m.layers[0].dense.up.lora_scale, 8 / 4.0, 1e-15);
    ck_assert_int_eq(lora_group_params(&ad, LORA_GROUP_ATTN), 2 * 56 * 2 + 6 * 56);
    lora_detach(&ad);
    mdl_free(&m);
}
END_TEST

static mdl_batch make_batch(ag_arena *a, int T, bool with_targets) {
    mdl_batch b = {.ids = ag_tensor_new1(a, AG_I32, T), .pos = ag_tensor_new1(a, AG_I32, T),
                   .seg = ag_tensor_new1(a, AG_I32, T)};
    for (int t = 0; t < T; t++) {
        ((int32_t *)b.ids->data)[t] = (t * 7919 + 13) % VOCAB;
        ((int32_t *)b.pos->data)[t] = t;
    }
    if (with_targets) {
        b.targets = ag_tensor_new1(a, AG_I32, T);
        for (int t = 0; t < T; t++)
            ((int32_t *)b.targets->data)[t] = (t * 104729 + 5) % VOCAB;
    }
    return b;
}

START_TEST(test_forward_equals_merged) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, "r=4,alpha=8,targets=q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+"
               "gate_proj+up_proj+down_proj+gate+experts+lm_head", true, &ad);
    ck_assert_ptr_eq(m.layers[2].experts_lora.a_down,
                     lora_find_unit(&ad, "model.layers.2.mlp.experts.down_proj")->a);
    lora_randomize_b(&ad, 5, 0.2);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_arena in;
    ag_arena_init(&in, "batch", 1 << 16);
    mdl_batch b = make_batch(&in, 6, false);
    ag_tensor *with, *base, *merged;
    ck_assert_ok(mdl_forward(&c, &m, &b, &with));
    // the adapter must change the logits, or the comparison below proves nothing
    ag_tensor *keep = ag_tensor_new2(&in, AG_F32, with->shape[0], with->shape[1]);
    memcpy(keep->data, with->data, (size_t)with->numel * sizeof(float));
    ck_assert_ok(lora_merge_into(&ad));
    ck_assert_ptr_null(m.layers[1].o.lora_a);
    ck_assert_ptr_null(m.layers[1].experts_lora.a_gate_up);
    ck_assert_ok(mdl_forward(&c, &m, &b, &merged));
    double rel = gc_max_rel_diff(merged, keep);
    ck_assert_msg(rel <= 1e-5, "merged vs LoRA logits: rel %g", rel);
    mdl_free(&m);
    tiny_model(&m);
    ck_assert_ok(mdl_forward(&c, &m, &b, &base));
    double moved = gc_max_rel_diff(base, keep);
    ck_assert_msg(moved > 1e-3, "the adapter barely moved the logits (%g)", moved);
    ag_arena_free(&in);
    ag_ctx_free(&c);
    mdl_free(&m);
}
END_TEST

START_TEST(test_merge_experts) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, "r=3,alpha=6,targets=experts", false, &ad);
    lora_randomize_b(&ad, 9, 0.3);
    const lora_unit *u = lora_find_unit(&ad, "model.layers.2.mlp.experts.down_proj");
    int E = 8, r = 3, out = 32, in = 16;
    // W'[e][o][i] = W + (alpha/r) sum_k B[o][k*E+e] A[e*r+k][i] at a few elements
    int pick[4][3] = {{0, 0, 0}, {3, 17, 5}, {7, 31, 15}, {5, 2, 9}};
    double want[4];
    const float *A = u->a->data, *B = u->b->data, *W = m.layers[2].down->data;
    for (int j = 0; j < 4; j++) {
        int e = pick[j][0], o = pick[j][1], i = pick[j][2];
        double d = 0;
        for (int k = 0; k < r; k++)
            d += (double)B[o * r * E + k * E + e] * A[(e * r + k) * in + i];
        want[j] = W[(e * out + o) * in + i] + 2.0 * d;
    }
    ck_assert_ok(lora_merge_into(&ad));
    for (int j = 0; j < 4; j++) {
        int e = pick[j][0], o = pick[j][1], i = pick[j][2];
        ck_assert_double_eq_tol(W[(e * out + o) * in + i], want[j], 1e-6);
    }
    mdl_free(&m);
}
END_TEST

static bool any_nonzero(const ag_tensor *t) {
    for (int64_t i = 0; t && i < t->numel; i++)
        if (((const float *)t->data)[i] != 0)
            return true;
    return false;
}

START_TEST(test_grad_only_adapter) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, "r=2,targets=q_a_proj+kv_b_proj+up_proj+gate+experts", true, &ad);
    lora_randomize_b(&ad, 3, 0.1);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, true);
    ag_arena in;
    ag_arena_init(&in, "batch", 1 << 16);
    mdl_batch b = make_batch(&in, 5, true);
    ag_tensor *loss;
    ck_assert_ok(mdl_forward(&c, &m, &b, &loss));
    ck_assert_ok(ag_backward(&c, loss));
    for (int i = 0; i < ad.n_units; i++) {
        ck_assert_msg(any_nonzero(ad.units[i].a->grad), "%s: no grad on A", ad.units[i].path);
        ck_assert_msg(any_nonzero(ad.units[i].b->grad), "%s: no grad on B", ad.units[i].path);
        ck_assert_ptr_null(ad.units[i].base->grad);
    }
    ck_assert_ptr_null(m.embed->grad);
    ck_assert_ptr_null(m.lm_head.w->grad);
    for (int l = 0; l < 3; l++) {
        ck_assert_ptr_null(m.layers[l].o.w->grad);
        ck_assert_ptr_null(m.layers[l].attn_norm->grad);
        ck_assert(!m.layers[l].q_b.w->requires_grad);
    }
    ck_assert_ptr_null(m.layers[1].gate_up->grad);
    ag_arena_free(&in);
    ag_ctx_free(&c);
    lora_detach(&ad);
    mdl_free(&m);
}
END_TEST

int main(void) {
    Suite *s = suite_create("lora");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_pattern_match);
    tcase_add_test(tc, test_counts_per_group);
    tcase_add_test(tc, test_target_semantics);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_spec_roundtrip);
    tcase_add_test(tc, test_init_statistics);
    tcase_add_test(tc, test_seed_determinism);
    tcase_add_test(tc, test_scales_and_groups);
    tcase_add_test(tc, test_forward_equals_merged);
    tcase_add_test(tc, test_merge_experts);
    tcase_add_test(tc, test_grad_only_adapter);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
