// tests/test_peft.c: adapter files (adapters/peft.c): PEFT export -> import and molt file
// save -> load round trips bit for bit (ranks, alphas, scales, every A and B), PEFT's
// tensor names and shapes (nested base_layer for two routed-expert parameters, the router
// as a parameter target), adapter_config.json with exactly the keys of SPECS.md section 7,
// precise errors for malformed PEFT directories, and logits of the tiny model with
// molt-exported adapters against PEFT's (tests/fixtures/peft/reference.safetensors, made by
// tools/reference/peft_reference.py).
#include "adapters/adapters.h"
#include "harness/harness.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define VOCAB 1024 // the tiny preset with a short vocabulary, except for the parity test

static void tiny_model(mdl_model *m) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/models/tiny.json", src ? src : ".");
    mcfg cfg;
    ck_assert_ok(mcfg_load(path, &cfg));
    cfg.vocab_size = VOCAB;
    ck_assert_ok(mdl_create(m, &cfg));
    ck_assert_ok(mdl_init_random(m, 1234, 0.1));
}

static void attach(mdl_model *m, const char *text, bool fwd, lora_adapter *ad) {
    lora_spec s;
    ck_assert_ok(lora_spec_parse(text, &s));
    ck_assert_ok(lora_attach(m, &s, fwd, ad));
}

static void tmpdir(char *buf, size_t cap) {
    snprintf(buf, cap, "/tmp/molt_peft_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(buf));
}

static void rm_rf(const char *dir) {
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

static void same_adapter(const lora_adapter *x, const lora_adapter *y) {
    ck_assert_int_eq(x->n_units, y->n_units);
    ck_assert_int_eq(x->total_params, y->total_params);
    for (int i = 0; i < x->n_units; i++) {
        const lora_unit *u = &x->units[i], *v = &y->units[i];
        ck_assert_str_eq(u->path, v->path);
        ck_assert_int_eq(u->r, v->r);
        ck_assert_msg(u->alpha == v->alpha && u->scale == v->scale, "%s: alpha %g/%g scale "
                      "%g/%g", u->path, u->alpha, v->alpha, u->scale, v->scale);
        ck_assert(ag_same_shape(u->a, v->a) && ag_same_shape(u->b, v->b));
        ck_assert_int_eq(memcmp(u->a->data, v->a->data, (size_t)u->a->numel * 4), 0);
        ck_assert_int_eq(memcmp(u->b->data, v->b->data, (size_t)u->b->numel * 4), 0);
    }
}

START_TEST(test_roundtrip) {
    mdl_model m = {0}, m2 = {0};
    tiny_model(&m);
    tiny_model(&m2);
    lora_adapter ad, back;
    attach(&m, "r=3,alpha=6,rslora=1,seed=4,r.attn=2,alpha.router=7,r.experts=5,"
               "targets=q_a_proj+kv_b_proj+o_proj+gate_proj+up_proj+down_proj+gate+experts+"
               "lm_head", false, &ad);
    lora_randomize_b(&ad, 8, 0.5);
    char dir[64], file[128];
    tmpdir(dir, sizeof dir);
    ck_assert_ok(lora_export_peft(&ad, dir, "tiny"));
    ck_assert_ok(lora_load_any(&m2, dir, false, &back));
    same_adapter(&ad, &back);
    ck_assert_ptr_eq(m2.layers[1].o.lora_a, lora_find_unit(&back,
                     "model.layers.1.self_attn.o_proj")->a);
    lora_detach(&back);
    snprintf(file, sizeof file, "%s/adapter.safetensors", dir);
    ck_assert_ok(lora_save(&ad, file));
    ck_assert_ok(lora_load_any(&m2, file, false, &back));
    same_adapter(&ad, &back);
    ck_assert_int_eq(memcmp(&ad.spec, &back.spec, sizeof ad.spec), 0);
    lora_detach(&back);
    lora_detach(&ad);
    rm_rf(dir);
    mdl_free(&m);
    mdl_free(&m2);
}
END_TEST

static void want_tensor(const st_reader *r, const char *name, int64_t d0, int64_t d1) {
    const st_tensor *t = st_find(r, name);
    ck_assert_msg(t != NULL, "missing %s", name);
    ck_assert_int_eq(t->dtype, ST_F32);
    ck_assert_int_eq(t->ndim, 2);
    ck_assert_msg(t->shape[0] == d0 && t->shape[1] == d1, "%s: [%lld, %lld]", name,
                  (long long)t->shape[0], (long long)t->shape[1]);
}

START_TEST(test_tensor_names) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, "r=2,targets=q_a_proj+experts+gate", false, &ad);
    char dir[64], path[128];
    tmpdir(dir, sizeof dir);
    ck_assert_ok(lora_export_peft(&ad, dir, NULL));
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_reader *r;
    ck_assert_ok(st_open(path, &r));
    ck_assert_int_eq(st_count(r), 2 * (3 + 2 * 3));
    const char *p = "base_model.model.model.layers.";
    char n[256];
#define NAME(fmt) (snprintf(n, sizeof n, "%s" fmt, p), n)
    want_tensor(r, NAME("1.self_attn.q_a_proj.lora_A.weight"), 2, 32);
    want_tensor(r, NAME("1.self_attn.q_a_proj.lora_B.weight"), 24, 2);
    // gate_up_proj [8, 32, 32] is wrapped first, so it sits under base_layer
    want_tensor(r, NAME("1.mlp.experts.base_layer.lora_A.weight"), 16, 32);
    want_tensor(r, NAME("1.mlp.experts.base_layer.lora_B.weight"), 32, 16);
    want_tensor(r, NAME("2.mlp.experts.lora_A.weight"), 16, 16); // down_proj [8, 32, 16]
    want_tensor(r, NAME("2.mlp.experts.lora_B.weight"), 32, 16);
    want_tensor(r, NAME("2.mlp.gate.lora_A.weight"), 2, 32);
    want_tensor(r, NAME("2.mlp.gate.lora_B.weight"), 8, 2);
    ck_assert_str_eq(st_metadata(r, "format"), "pt");
    st_close(r);
    lora_detach(&ad);
    attach(&m, "r=2,targets=gate_up_proj", false, &ad);
    ck_assert_ok(lora_export_peft(&ad, dir, NULL));
    ck_assert_ok(st_open(path, &r));
    want_tensor(r, NAME("1.mlp.experts.lora_A.weight"), 16, 32);
    ck_assert_ptr_null(st_find(r, NAME("1.mlp.experts.base_layer.lora_A.weight")));
    st_close(r);
#undef NAME
    lora_detach(&ad);
    rm_rf(dir);
    mdl_free(&m);
}
END_TEST

static json_t *export_config(mdl_model *m, const char *spec, char *dir, size_t cap) {
    lora_adapter ad;
    attach(m, spec, false, &ad);
    tmpdir(dir, cap);
    ck_assert_ok(lora_export_peft(&ad, dir, NULL));
    lora_detach(&ad);
    char path[128];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    json_error_t je;
    json_t *c = json_load_file(path, 0, &je);
    ck_assert_msg(c != NULL, "%s", je.text);
    return c;
}

static void want_list(json_t *arr, int n, const char *const *items) {
    ck_assert_int_eq(json_array_size(arr), n);
    for (int i = 0; i < n; i++)
        ck_assert_str_eq(json_string_value(json_array_get(arr, i)), items[i]);
}

START_TEST(test_config_keys) {
    static const char *keys[] = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout",
                                 "target_modules", "target_parameters", "use_rslora",
                                 "use_dora", "bias", "base_model_name_or_path",
                                 "fan_in_fan_out", "modules_to_save", "rank_pattern",
                                 "alpha_pattern"};
    int nk = sizeof keys / sizeof *keys;
    mdl_model m = {0};
    tiny_model(&m);
    char dir[64];
    json_t *c = export_config(&m, "r=4,alpha=12,dropout=0.1,targets=q_a_proj+experts+gate", dir,
                              sizeof dir);
    ck_assert_int_eq((int)json_object_size(c), nk);
    for (int i = 0; i < nk; i++)
        ck_assert_msg(json_object_get(c, keys[i]) != NULL, "no key %s", keys[i]);
    ck_assert_str_eq(json_string_value(json_object_get(c, "peft_type")), "LORA");
    ck_assert_str_eq(json_string_value(json_object_get(c, "task_type")), "CAUSAL_LM");
    ck_assert_str_eq(json_string_value(json_object_get(c, "bias")), "none");
    ck_assert_int_eq(json_integer_value(json_object_get(c, "r")), 4);
    ck_assert(json_number_value(json_object_get(c, "lora_alpha")) == 12);
    // PEFT refuses dropout on parameter targets
    ck_assert(json_number_value(json_object_get(c, "lora_dropout")) == 0);
    ck_assert(json_is_false(json_object_get(c, "use_dora")));
    ck_assert(json_is_null(json_object_get(c, "modules_to_save")));
    want_list(json_object_get(c, "target_modules"), 1, (const char *[]){"q_a_proj"});
    want_list(json_object_get(c, "target_parameters"), 3,
              (const char *[]){"mlp.gate.weight", "mlp.experts.gate_up_proj",
                               "mlp.experts.down_proj"});
    json_decref(c);
    rm_rf(dir);
    c = export_config(&m, "r=4,dropout=0.1,r.attn=2,alpha.shared=3,"
                      "targets=q_a_proj+o_proj+shared_experts.up_proj", dir, sizeof dir);
    ck_assert(fabs(json_number_value(json_object_get(c, "lora_dropout")) - 0.1) < 1e-12);
    want_list(json_object_get(c, "target_modules"), 3,
              (const char *[]){"q_a_proj", "o_proj", "shared_experts.up_proj"});
    json_t *rp = json_object_get(c, "rank_pattern"), *ap = json_object_get(c, "alpha_pattern");
    ck_assert_int_eq(json_object_size(rp), 2);
    ck_assert_int_eq(json_integer_value(json_object_get(rp, "q_a_proj")), 2);
    ck_assert_int_eq(json_integer_value(json_object_get(rp, "o_proj")), 2);
    ck_assert_int_eq(json_object_size(ap), 1);
    // plain "up_proj" would also select the dense layer's mlp.up_proj
    ck_assert(json_number_value(json_object_get(ap, "shared_experts.up_proj")) == 3);
    json_decref(c);
    rm_rf(dir);
    c = export_config(&m, "r=4,targets=layers.1.self_attn.o_proj", dir, sizeof dir);
    want_list(json_object_get(c, "target_modules"), 1, (const char *[]){"1.self_attn.o_proj"});
    json_decref(c);
    rm_rf(dir);
    mdl_free(&m);
}
END_TEST

// ---- malformed directories ------------------------------------------------------------

static void edit_config(const char *dir, const char *key, json_t *value) {
    char path[128];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    json_t *c = json_load_file(path, 0, NULL);
    ck_assert_ptr_nonnull(c);
    json_object_set_new(c, key, value);
    ck_assert_int_eq(json_dump_file(c, path, 0), 0);
    json_decref(c);
}

// Rewrites adapter_model.safetensors without tensor `drop` (may be NULL) and with `extra`.
static void edit_tensors(const char *dir, const char *drop, const char *extra) {
    char path[128];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_reader *r;
    ck_assert_ok(st_open(path, &r));
    int n = st_count(r), k = 0;
    st_tensor *t = calloc((size_t)n + 1, sizeof *t);
    for (int i = 0; i < n; i++)
        if (!drop || strcmp(st_at(r, i)->name, drop))
            t[k++] = *st_at(r, i);
    if (extra) {
        t[k] = *st_at(r, 0);
        t[k++].name = extra;
    }
    char tmp[160];
    snprintf(tmp, sizeof tmp, "%s.new", path);
    ck_assert_ok(st_write(tmp, t, k, NULL, 0));
    st_close(r);
    free(t);
    ck_assert_int_eq(rename(tmp, path), 0);
}

static void expect_error(mdl_model *m, const char *dir, molt_status want, const char *fmt) {
    lora_adapter ad;
    char msg[1024];
    snprintf(msg, sizeof msg, fmt, dir);
    ck_assert_int_eq(lora_import_peft(m, dir, true, &ad), want);
    ck_assert_str_eq(molt_err_msg(), msg);
    ck_assert_ptr_null(m->layers[0].q_a.lora_a);
    ck_assert_ptr_null(m->layers[0].o.lora_a);
}

START_TEST(test_import_errors) {
    mdl_model m = {0};
    tiny_model(&m);
    char dir[64], json[128];
    json_decref(export_config(&m, "r=2,targets=q_a_proj+o_proj", dir, sizeof dir));
    snprintf(json, sizeof json, "%s/adapter_config.json", dir);
    lora_adapter ok;
    ck_assert_ok(lora_import_peft(&m, dir, true, &ok));
    lora_detach(&ok);

    edit_config(dir, "use_dora", json_true());
    expect_error(&m, dir, MOLT_EUNSUPPORTED,
                 "%s/adapter_config.json: key \"use_dora\" true (DoRA) is not supported");
    edit_config(dir, "use_dora", json_false());
    edit_config(dir, "bias", json_string("all"));
    expect_error(&m, dir, MOLT_EUNSUPPORTED,
                 "%s/adapter_config.json: key \"bias\" other than \"none\" is not supported");
    edit_config(dir, "bias", json_string("none"));
    edit_config(dir, "modules_to_save", json_pack("[s]", "lm_head"));
    expect_error(&m, dir, MOLT_EUNSUPPORTED, "%s/adapter_config.json: key \"modules_to_save\" "
                 "(fully trained modules) is not supported");
    edit_config(dir, "modules_to_save", json_null());
    edit_config(dir, "r", json_string("two"));
    expect_error(&m, dir, MOLT_EFORMAT,
                 "%s/adapter_config.json: key \"r\" must be a positive integer");
    edit_config(dir, "r", json_integer(3));
    expect_error(&m, dir, MOLT_EFORMAT, "%s/adapter_model.safetensors: tensor base_model.model."
                 "model.layers.0.self_attn.q_a_proj.lora_A.weight has 2 dims [2, 32], "
                 "expected [3, 32] f32");
    edit_config(dir, "r", json_integer(2));
    edit_config(dir, "target_modules", json_pack("[s, s]", "q_a_proj", "q_proj"));
    expect_error(&m, dir, MOLT_EARG, "lora: target 'q_proj' matches no module of the model");
    edit_config(dir, "target_modules", json_pack("[s, s]", "q_a_proj", "o_proj"));

    edit_tensors(dir, "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight", NULL);
    expect_error(&m, dir, MOLT_EFORMAT, "%s/adapter_model.safetensors: missing tensor "
                 "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight (target "
                 "model.layers.0.self_attn.o_proj)");
    rm_rf(dir);
    json_decref(export_config(&m, "r=2,targets=q_a_proj+o_proj", dir, sizeof dir));
    snprintf(json, sizeof json, "%s/adapter_config.json", dir);
    edit_tensors(dir, NULL, "base_model.model.model.layers.0.self_attn.q_b_proj.lora_A.weight");
    expect_error(&m, dir, MOLT_EFORMAT, "%s/adapter_model.safetensors: unknown tensor "
                 "base_model.model.model.layers.0.self_attn.q_b_proj.lora_A.weight (no adapted "
                 "module of the model has this name)");

    FILE *f = fopen(json, "w");
    fputs("{\"peft_type\": \"LORA\", ", f);
    fclose(f);
    lora_adapter ad;
    ck_assert_int_eq(lora_import_peft(&m, dir, true, &ad), MOLT_EFORMAT);
    ck_assert_msg(!strncmp(molt_err_msg(), json, strlen(json)), "%s", molt_err_msg());
    rm_rf(dir);
    ck_assert_int_eq(lora_load_any(&m, dir, true, &ad), MOLT_EIO);
    mdl_free(&m);
}
END_TEST

// ---- PEFT parity ----------------------------------------------------------------------

static double meta_num(const st_reader *r, const char *v, const char *key) {
    char k[64];
    snprintf(k, sizeof k, "%s.%s", v, key);
    const char *s = st_metadata(r, k);
    ck_assert_msg(s != NULL, "fixture metadata %s missing", k);
    return strtod(s, NULL);
}

static const float *fixture(const st_reader *r, const char *name, int64_t numel) {
    const st_tensor *t = st_find(r, name);
    ck_assert_msg(t && t->numel == numel, "fixture tensor %s", name);
    return t->data;
}

static void check_variant(mdl_model *m, const st_reader *ref, const char *v, const char *tmp) {
    char key[64];
    snprintf(key, sizeof key, "%s.spec", v);
    lora_spec spec;
    ck_assert_ok(lora_spec_parse(st_metadata(ref, key), &spec));
    lora_adapter ad;
    ck_assert_ok(lora_attach(m, &spec, true, &ad));
    lora_randomize_b(&ad, (uint64_t)meta_num(ref, v, "b_seed"), meta_num(ref, v, "b_std"));
    char dir[256];
    snprintf(dir, sizeof dir, "%s/%s", tmp, v);
    ck_assert_ok(lora_export_peft(&ad, dir, NULL));
    lora_detach(&ad);
    ck_assert_ok(lora_import_peft(m, dir, true, &ad)); // what PEFT loaded
    const st_tensor *ids = st_find(ref, "input.ids"), *cols = st_find(ref, "input.cols");
    ck_assert(ids && cols);
    int64_t T = ids->numel, NC = cols->numel;
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    mdl_batch b = {.ids = ag_tensor_new1(&c.act, AG_I32, T), .pos = ag_tensor_new1(&c.act, AG_I32,
                   T), .seg = ag_tensor_new1(&c.act, AG_I32, T)};
    memcpy(b.ids->data, ids->data, (size_t)T * 4);
    for (int t = 0; t < T; t++)
        ((int32_t *)b.pos->data)[t] = t;
    ag_tensor *lg;
    ck_assert_ok(mdl_forward(&c, m, &b, &lg));
    snprintf(key, sizeof key, "%s.sub", v);
    const float *want = fixture(ref, key, T * NC);
    snprintf(key, sizeof key, "%s.absmax", v);
    const float *absmax = fixture(ref, key, T);
    snprintf(key, sizeof key, "%s.base_gap", v);
    ck_assert_msg(fixture(ref, key, 1)[0] > 0.1, "%s: the adapter barely moves the logits", v);
    const int32_t *col = cols->data;
    const float *got = lg->data;
    int64_t V = lg->shape[1];
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < NC; j++) {
            double d = fabs(got[t * V + col[j]] - want[t * NC + j]);
            ck_assert_msg(d <= 1e-4 * absmax[t], "%s: token %lld col %d: molt %.7g, PEFT %.7g",
                          v, (long long)t, col[j], got[t * V + col[j]], want[t * NC + j]);
        }
    ag_ctx_free(&c);
    lora_detach(&ad);
}

START_TEST(test_peft_parity) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[4096], tmp[64], mdir[128];
    snprintf(path, sizeof path, "%s/tests/fixtures/peft/reference.safetensors", src ? src : ".");
    st_reader *ref;
    ck_assert_ok(st_open(path, &ref));
    tmpdir(tmp, sizeof tmp);
    snprintf(mdir, sizeof mdir, "%s/model", tmp);
    mdl_init_opts o = {.preset = "tiny", .out_dir = mdir, .seed = 1234, .no_tokenizer = true};
    ck_assert_ok(mdl_init_model(&o));
    mdl_model m = {0};
    ck_assert_ok(mdl_load(mdir, &m));
    check_variant(&m, ref, "attn_mlp", tmp);
    check_variant(&m, ref, "rslora", tmp);
    check_variant(&m, ref, "experts", tmp);
    mdl_free(&m);
    st_close(ref);
    rm_rf(tmp);
}
END_TEST

int main(void) {
    Suite *s = suite_create("peft");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_roundtrip);
    tcase_add_test(tc, test_tensor_names);
    tcase_add_test(tc, test_config_keys);
    tcase_add_test(tc, test_import_errors);
    tcase_add_test(tc, test_peft_parity);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
