// tests/test_optim.c: AdamW against a double-precision re-derivation of its definition and
// against torch.optim.AdamW (fixture from tools/reference/adamw_reference.py), gradient
// clipping against its definition and torch's clip_grad_norm_, the accumulation helpers,
// and the three learning-rate schedules against transformers.
#include "harness/harness.h"
#include "train/train.h"

#include <jansson.h>
#include <math.h>
#include <string.h>

static json_t *fixture;

static void load_fixture(void) {
    const char *root = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/fixtures/train/adamw.json", root ? root : ".");
    json_error_t err;
    fixture = json_load_file(path, 0, &err);
    if (!fixture) {
        fprintf(stderr, "cannot read %s: %s\n", path, err.text);
        exit(1);
    }
}

static void fill_from_json(ag_tensor *t, json_t *arr) {
    ck_assert_int_eq((int64_t)json_array_size(arr), t->numel);
    for (int64_t i = 0; i < t->numel; i++)
        ((float *)t->data)[i] = (float)json_real_value(json_array_get(arr, (size_t)i));
}

// |got - want| <= rel * |want| + abs for every element; returns the count of exact matches.
static int64_t check_close(const ag_tensor *t, json_t *want, double rel, double abs_tol,
                           const char *what) {
    int64_t exact = 0;
    for (int64_t i = 0; i < t->numel; i++) {
        double w = json_real_value(json_array_get(want, (size_t)i)), g = ((float *)t->data)[i];
        ck_assert_msg(fabs(g - w) <= rel * fabs(w) + abs_tol, "%s[%lld]: got %.9g want %.9g",
                      what, (long long)i, g, w);
        exact += (float)w == (float)g;
    }
    return exact;
}

// ---------------------------------------------------------------------------------------
// AdamW

START_TEST(test_adamw_matches_double_derivation) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 7);
    enum { N = 37, STEPS = 6 };
    ag_tensor *p = ag_tensor_new1(&a, AG_F32, N);
    ag_fill_normal(p, &r, 0, 1);
    ag_tensor *g = ag_grad_ensure(p);
    double pd[N], md[N] = {0}, vd[N] = {0};
    for (int i = 0; i < N; i++)
        pd[i] = ag_get(p, i);
    opt_adamw_config cfg = {.beta1 = 0.85, .beta2 = 0.99, .eps = 1e-6, .weight_decay = 0.05};
    opt_adamw o;
    ck_assert_ok(opt_adamw_init(&o, 1, &p, &cfg));
    for (int t = 1; t <= STEPS; t++) {
        double lr = 1e-2 * t;
        ag_fill_normal(g, &r, 0, 0.3);
        ck_assert_ok(opt_adamw_step(&o, lr));
        // the textbook form: decoupled decay, then bias-corrected moments
        for (int i = 0; i < N; i++) {
            double gi = ag_get(g, i);
            pd[i] -= lr * cfg.weight_decay * pd[i];
            md[i] = cfg.beta1 * md[i] + (1 - cfg.beta1) * gi;
            vd[i] = cfg.beta2 * vd[i] + (1 - cfg.beta2) * gi * gi;
            double mh = md[i] / (1 - pow(cfg.beta1, t)), vh = vd[i] / (1 - pow(cfg.beta2, t));
            pd[i] -= lr * mh / (sqrt(vh) + cfg.eps);
        }
        for (int i = 0; i < N; i++) {
            ck_assert_msg(fabs(ag_get(p, i) - pd[i]) <= 2e-6 * fmax(1, fabs(pd[i])),
                          "step %d elem %d: %.9g vs %.9g", t, i, ag_get(p, i), pd[i]);
            ck_assert_msg(fabs(o.m[0][i] - md[i]) <= 1e-6 * fmax(0.3, fabs(md[i])), "m");
            ck_assert_msg(fabs(o.v[0][i] - vd[i]) <= 1e-6 * fmax(1e-3, fabs(vd[i])), "v");
        }
    }
    ck_assert_int_eq(o.steps[0], STEPS);
    opt_adamw_free(&o);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_adamw_matches_torch) {
    json_t *cases = json_object_get(fixture, "adamw");
    ck_assert_int_ge((int)json_array_size(cases), 3);
    int64_t exact = 0, total = 0;
    for (size_t c = 0; c < json_array_size(cases); c++) {
        json_t *cs = json_array_get(cases, c), *init = json_object_get(cs, "init");
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_tensor *ps[2];
        for (int k = 0; k < 2; k++) {
            json_t *arr = json_array_get(init, (size_t)k);
            ps[k] = ag_tensor_new1(&a, AG_F32, (int64_t)json_array_size(arr));
            fill_from_json(ps[k], arr);
            ck_assert_ptr_nonnull(ag_grad_ensure(ps[k]));
        }
        opt_adamw_config cfg = {
            .beta1 = json_real_value(json_object_get(cs, "beta1")),
            .beta2 = json_real_value(json_object_get(cs, "beta2")),
            .eps = json_real_value(json_object_get(cs, "eps")),
            .weight_decay = json_real_value(json_object_get(cs, "weight_decay"))};
        opt_adamw o;
        ck_assert_ok(opt_adamw_init(&o, 2, ps, &cfg));
        json_t *steps = json_object_get(cs, "steps");
        for (size_t s = 0; s < json_array_size(steps); s++) {
            json_t *st = json_array_get(steps, s);
            for (int k = 0; k < 2; k++)
                fill_from_json(ps[k]->grad, json_array_get(json_object_get(st, "grads"), k));
            ck_assert_ok(opt_adamw_step(&o, json_real_value(json_object_get(st, "lr"))));
            for (int k = 0; k < 2; k++) {
                char what[64];
                snprintf(what, sizeof what, "case %zu step %zu param %d", c, s, k);
                exact += check_close(ps[k], json_array_get(json_object_get(st, "params"), k),
                                     1e-6, 0, what);
                total += ps[k]->numel;
            }
        }
        opt_adamw_free(&o);
        ag_arena_free(&a);
    }
    // Same float operations in the same order as PyTorch's CPU kernels: identical bits.
    ck_assert_msg(exact == total, "adamw vs torch: only %lld of %lld values bit-identical",
                  (long long)exact, (long long)total);
}
END_TEST

START_TEST(test_adamw_skips_missing_grads_and_checks_args) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_tensor *p = ag_tensor_new1(&a, AG_F32, 3), *q = ag_tensor_new1(&a, AG_F32, 2);
    ag_set(p, 0, 1.5);
    ag_set(q, 0, 2.0);
    ag_tensor *ps[2] = {p, q};
    opt_adamw_config cfg;
    opt_adamw_defaults(&cfg);
    ck_assert_double_eq(cfg.weight_decay, 0.01);
    opt_adamw o;
    ck_assert_ok(opt_adamw_init(&o, 2, ps, &cfg));
    ag_grad_ensure(q);
    ag_set(q->grad, 0, 1.0);
    ck_assert_ok(opt_adamw_step(&o, 0.1));
    ck_assert_double_eq(ag_get(p, 0), 1.5); // no grad: untouched, no step counted
    ck_assert_int_eq(o.steps[0], 0);
    ck_assert_int_eq(o.steps[1], 1);
    ck_assert(ag_get(q, 0) < 2.0);
    ck_assert_int_eq(opt_adamw_step(&o, NAN), MOLT_EARG);
    opt_adamw_free(&o);

    ag_tensor *d = ag_tensor_new1(&a, AG_F64, 2);
    ag_tensor_set_name(d, "lora_a");
    ck_assert_int_eq(opt_adamw_init(&o, 1, &d, &cfg), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(),
                     "adamw: parameter 0 'lora_a' must be f32 on the CPU, got f64");
    cfg.beta2 = 1.0;
    ck_assert_int_eq(opt_adamw_init(&o, 1, &p, &cfg), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "adamw: betas must be in [0, 1), got (0.9, 1)");
    ag_arena_free(&a);
}
END_TEST

// ---------------------------------------------------------------------------------------
// Clipping and accumulation

START_TEST(test_clip_matches_definition_and_torch) {
    json_t *cases = json_object_get(fixture, "clip");
    int clipped_cases = 0;
    for (size_t c = 0; c < json_array_size(cases); c++) {
        json_t *cs = json_array_get(cases, c), *grads = json_object_get(cs, "grads");
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_tensor *ps[4];
        double ss = 0;
        for (int k = 0; k < 3; k++) {
            json_t *arr = json_array_get(grads, (size_t)k);
            ps[k] = ag_tensor_new1(&a, AG_F32, (int64_t)json_array_size(arr));
            fill_from_json(ag_grad_ensure(ps[k]), arr);
            for (int64_t i = 0; i < ps[k]->numel; i++)
                ss += pow(ag_get(ps[k]->grad, i), 2);
        }
        ps[3] = ag_tensor_new1(&a, AG_F32, 4); // no gradient: ignored
        double max_norm = json_real_value(json_object_get(cs, "max_norm")), total = -1;
        ck_assert_ok(opt_clip_grad_norm(ps, 4, max_norm, &total));
        double want = json_real_value(json_object_get(cs, "total_norm"));
        ck_assert_msg(fabs(total - sqrt(ss)) <= 1e-6 * sqrt(ss), "norm %g vs %g", total,
                      sqrt(ss));
        ck_assert_msg(fabs(total - want) <= 1e-6 * want, "norm %g vs torch %g", total, want);
        clipped_cases += max_norm < want;
        for (int k = 0; k < 3; k++)
            check_close(ps[k]->grad, json_array_get(json_object_get(cs, "clipped"), k), 1e-6,
                        0, "clipped");
        if (max_norm < want) { // the definition: grads scaled by max_norm / (total + 1e-6)
            double ss2 = 0;
            for (int k = 0; k < 3; k++)
                for (int64_t i = 0; i < ps[k]->numel; i++)
                    ss2 += pow(ag_get(ps[k]->grad, i), 2);
            double expect = max_norm * sqrt(ss) / (sqrt(ss) + 1e-6);
            ck_assert_msg(fabs(sqrt(ss2) - expect) <= 1e-6 * expect, "clipped norm %.9g vs %.9g",
                          sqrt(ss2), expect);
        }
        ag_arena_free(&a);
    }
    ck_assert_int_ge(clipped_cases, 2); // the fixture exercises both branches
    ck_assert_int_lt(clipped_cases, (int)json_array_size(cases));
}
END_TEST

START_TEST(test_clip_disabled_and_accumulation) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_tensor *p = ag_tensor_new1(&a, AG_F32, 2);
    ag_tensor *g = ag_grad_ensure(p);
    ag_set(g, 0, 3);
    ag_set(g, 1, 4);
    double total;
    ck_assert_ok(opt_clip_grad_norm(&p, 1, 0, &total)); // max_norm 0: report only
    ck_assert_double_eq(total, 5);
    ck_assert_double_eq(ag_get(g, 0), 3);
    // two micro-batches accumulated, then scaled by 1/2: the mean gradient
    ag_set(g, 0, ag_get(g, 0) + 1);
    ag_set(g, 1, ag_get(g, 1) + 2);
    opt_grads_scale(&p, 1, 0.5);
    ck_assert_double_eq(ag_get(g, 0), 2);
    ck_assert_double_eq(ag_get(g, 1), 3);
    opt_grads_zero(&p, 1);
    ck_assert_double_eq(ag_get(g, 0), 0);
    ck_assert_double_eq(ag_get(g, 1), 0);
    ag_arena_free(&a);
}
END_TEST

// ---------------------------------------------------------------------------------------
// Schedules

START_TEST(test_schedules_match_transformers) {
    json_t *sc = json_object_get(fixture, "schedules");
    double lr_max = json_real_value(json_object_get(sc, "lr_max"));
    int64_t warm = json_integer_value(json_object_get(sc, "warmup_steps"));
    int64_t total = json_integer_value(json_object_get(sc, "total_steps"));
    const char *names[3] = {"constant", "linear", "cosine"};
    for (int k = 0; k < 3; k++) {
        sched_kind kind;
        ck_assert_ok(sched_kind_parse(names[k], &kind));
        ck_assert_str_eq(sched_kind_name(kind), names[k]);
        sched_state s;
        ck_assert_ok(sched_init(&s, kind, lr_max, warm, total));
        json_t *lrs = json_object_get(sc, names[k]);
        ck_assert_int_gt((int)json_array_size(lrs), (int)total);
        for (size_t i = 0; i < json_array_size(lrs); i++) {
            double want = json_real_value(json_array_get(lrs, i)), got = sched_lr(&s);
            ck_assert_msg(fabs(got - want) <= 1e-14 * fabs(want), "%s step %zu: %.17g vs %.17g",
                          names[k], i, got, want);
            sched_advance(&s);
        }
    }
}
END_TEST

START_TEST(test_schedule_definitions) {
    sched_state s;
    ck_assert_ok(sched_init(&s, SCHED_COSINE, 1.0, 4, 24));
    for (int i = 0; i < 4; i++) // linear warmup from 0
        ck_assert_double_eq_tol(sched_factor(&s, i), i / 4.0, 1e-15);
    ck_assert_double_eq_tol(sched_factor(&s, 4), 1.0, 1e-15);
    ck_assert_double_eq_tol(sched_factor(&s, 14), 0.5, 1e-15); // half way down the cosine
    ck_assert_double_eq_tol(sched_factor(&s, 24), 0.0, 1e-15);
    // past the end the half cosine rises again, as in transformers (only negatives clamp)
    double past = 0.5 * (1 + cos(3.14159265358979323846 * 26 / 20.0));
    ck_assert_double_eq_tol(sched_factor(&s, 30), past, 1e-15);
    ck_assert_ok(sched_init(&s, SCHED_LINEAR, 2.0, 0, 10));
    ck_assert_double_eq_tol(sched_factor(&s, 0), 1.0, 1e-15); // no warmup
    ck_assert_double_eq_tol(sched_factor(&s, 5), 0.5, 1e-15);
    ck_assert_double_eq(sched_factor(&s, 12), 0.0); // clamped at 0 after the end
    ck_assert_ok(sched_init(&s, SCHED_CONSTANT, 2.0, 2, 0));
    ck_assert_double_eq(sched_factor(&s, 1), 0.5);
    ck_assert_double_eq(sched_factor(&s, 1000), 1.0);
    sched_kind k;
    ck_assert_int_eq(sched_kind_parse("cosin", &k), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(),
                     "unknown lr schedule 'cosin' (expected constant, linear or cosine)");
    ck_assert_int_eq(sched_init(&s, SCHED_LINEAR, 0.0, 0, 10), MOLT_EARG);
    ck_assert_int_eq(sched_init(&s, SCHED_LINEAR, 1.0, -1, 10), MOLT_EARG);
}
END_TEST

int main(void) {
    load_fixture();
    Suite *s = suite_create("optim");
    TCase *tc = tcase_create("optim");
    tcase_add_test(tc, test_adamw_matches_double_derivation);
    tcase_add_test(tc, test_adamw_matches_torch);
    tcase_add_test(tc, test_adamw_skips_missing_grads_and_checks_args);
    tcase_add_test(tc, test_clip_matches_definition_and_torch);
    tcase_add_test(tc, test_clip_disabled_and_accumulation);
    tcase_add_test(tc, test_schedules_match_transformers);
    tcase_add_test(tc, test_schedule_definitions);
    suite_add_tcase(s, tc);
    int rc = harness_run(s);
    json_decref(fixture);
    return rc;
}
