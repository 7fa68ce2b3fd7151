// tests/test_model_weights.c: loading a checkpoint into the model and what goes wrong:
// missing, unexpected, misshapen, wrongly typed or non-finite tensors named in the message
// (exact text), FP8 scales (required for FP8, multiplying, one per expert when fused),
// F16 data, a wrapper's vision tower, tied embeddings; batch checks; transformers-like
// random init (deterministic, norms 1, pad row 0, std); the shipped presets. Uses a micro
// model (the tiny preset with a 300-token vocabulary) so every case is quick. The forward
// pass itself is in test_model_forward.c.
#include "harness/harness.h"
#include "model/model.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char tmp_dir[256];
static char setup_err[512];
static mcfg micro;

static void preset_path(const char *name, char *buf, size_t cap) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    snprintf(buf, cap, "%s/configs/models/%s.json", src ? src : ".", name);
}

// tmp_dir/NAME/config.json: the tiny preset with a 300-token vocabulary and `edit` applied.
static bool write_config(const char *name, const char *key, json_t *value) {
    char p[600];
    preset_path("tiny", p, sizeof p);
    json_t *root = json_load_file(p, 0, NULL);
    if (!root)
        return false;
    json_object_set_new(root, "vocab_size", json_integer(300));
    if (key)
        json_object_set_new(root, key, value);
    snprintf(p, sizeof p, "%s/%s", tmp_dir, name);
    char cmd[700];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", p);
    bool ok = system(cmd) == 0;
    snprintf(p, sizeof p, "%s/%s/config.json", tmp_dir, name);
    ok = ok && json_dump_file(root, p, JSON_INDENT(2)) == 0;
    json_decref(root);
    return ok;
}

// A micro model with seed-1 random weights saved under tmp_dir/NAME in a layout/dtype.
static molt_status save_micro(const char *name, mdl_save_opts o) {
    mdl_model m;
    MOLT_TRY(mdl_create(&m, &micro));
    molt_status st = mdl_init_random(&m, 1, 0.1);
    char p[600];
    snprintf(p, sizeof p, "%s/%s/%s", tmp_dir, name,
             o.layout == MDL_LAYOUT_MISTRAL ? "consolidated.safetensors" : "model.safetensors");
    if (st == MOLT_OK)
        st = mdl_save(&m, p, &o);
    mdl_free(&m);
    return st;
}

static void setup_all(void) {
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/molt-weights-test-XXXXXX");
    if (!mkdtemp(tmp_dir) || !write_config("base", NULL, NULL)) {
        snprintf(setup_err, sizeof setup_err, "cannot set up %s", tmp_dir);
        return;
    }
    char p[600];
    snprintf(p, sizeof p, "%s/base/config.json", tmp_dir);
    static const struct {
        const char *name;
        mdl_save_opts o;
    } saves[] = {
        {"base", {MDL_LAYOUT_HF, MDL_SAVE_F32, false}},
        {"fp8", {MDL_LAYOUT_HF, MDL_SAVE_FP8, false}},
        {"per-expert", {MDL_LAYOUT_HF_PER_EXPERT, MDL_SAVE_F32, false}},
        {"mistral", {MDL_LAYOUT_MISTRAL, MDL_SAVE_F32, false}},
        {"wrapped", {MDL_LAYOUT_HF, MDL_SAVE_F32, true}},
    };
    molt_status st = mcfg_load(p, &micro);
    for (size_t i = 0; st == MOLT_OK && i < sizeof saves / sizeof *saves; i++) {
        if (i > 0 && !write_config(saves[i].name, NULL, NULL))
            st = MOLT_EIO;
        if (st == MOLT_OK)
            st = save_micro(saves[i].name, saves[i].o);
    }
    if (st != MOLT_OK)
        snprintf(setup_err, sizeof setup_err, "%s", molt_err_msg());
}

static void teardown_all(void) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    if (tmp_dir[0] && system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmp_dir);
}

// ---- edited copies ----------------------------------------------------------------------

typedef struct {
    const char *drop;     // tensor left out (NULL: none)
    st_tensor add[6];     // tensors added (or replacing one of the same name)
    int n_add;
} edit;

// Writes tmp_dir/DST from tmp_dir/SRC's weights with edit e; returns the weights path.
static void write_edited(const char *src, const char *dst, const edit *e, char *path,
                         size_t cap) {
    ck_assert_msg(setup_err[0] == 0, "setup: %s", setup_err);
    char p[600], cmd[1400];
    bool mistral = strcmp(src, "mistral") == 0;
    const char *file = mistral ? "consolidated.safetensors" : "model.safetensors";
    snprintf(p, sizeof p, "%s/%s/%s", tmp_dir, src, file);
    st_reader *r;
    ck_assert_ok(st_open(p, &r));
    int n = st_count(r), k = 0;
    st_tensor *ts = malloc((size_t)(n + e->n_add) * sizeof *ts);
    for (int i = 0; i < n; i++) {
        const st_tensor *t = st_at(r, i);
        bool replaced = false;
        for (int j = 0; j < e->n_add; j++)
            replaced |= strcmp(e->add[j].name, t->name) == 0;
        if (!replaced && !(e->drop && strcmp(e->drop, t->name) == 0))
            ts[k++] = *t;
    }
    for (int j = 0; j < e->n_add; j++)
        ts[k++] = e->add[j];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s/%s' && cp '%s/%s/config.json' '%s/%s/'", tmp_dir,
             dst, tmp_dir, src, tmp_dir, dst);
    ck_assert_int_eq(system(cmd), 0);
    snprintf(path, cap, "%s/%s/%s", tmp_dir, dst, file);
    ck_assert_ok(st_write(path, ts, k, NULL, 0));
    free(ts);
    st_close(r);
}

// Loading tmp_dir/DST fails with status st and message "<weights path>: <msg>".
static void expect_load_error(const char *dst, const char *path, molt_status st,
                              const char *msg) {
    char dir[600], want[1200];
    snprintf(dir, sizeof dir, "%s/%s", tmp_dir, dst);
    mdl_model m;
    molt_status got = mdl_load(dir, &m);
    ck_assert_msg(got == st, "%s: status %s, expected %s (%s)", dst, molt_status_name(got),
                  molt_status_name(st), molt_err_msg());
    snprintf(want, sizeof want, "%s: %s", path, msg);
    ck_assert_str_eq(molt_err_msg(), want);
    ck_assert_ptr_null(m.layers); // a failed load leaves nothing allocated
}

static float f32_buf[64];

static st_tensor f32_tensor(const char *name, int ndim, const int64_t *shape, float v) {
    st_tensor t = {.name = name, .dtype = ST_F32, .ndim = ndim, .data = f32_buf};
    int64_t n = 1;
    for (int d = 0; d < ndim; d++)
        n *= (t.shape[d] = shape[d]);
    for (int64_t i = 0; i < n && i < 64; i++)
        f32_buf[i] = v;
    return t;
}

START_TEST(test_missing) {
    char path[700];
    edit e = {.drop = "model.layers.1.self_attn.kv_b_proj.weight"};
    write_edited("base", "missing", &e, path, sizeof path);
    expect_load_error("missing", path, MOLT_EFORMAT,
                      "missing tensor 'model.layers.1.self_attn.kv_b_proj.weight' (expected "
                      "shape [80, 16])");
    e.drop = "model.layers.1.mlp.experts.gate_up_proj";
    write_edited("base", "no-experts", &e, path, sizeof path);
    expect_load_error("no-experts", path, MOLT_EFORMAT,
                      "missing tensor 'model.layers.1.mlp.experts.gate_up_proj' (nor per-expert "
                      "'model.layers.1.mlp.experts.0.gate_proj.weight', ...)");
    e.drop = "model.layers.2.mlp.experts.3.up_proj.weight";
    write_edited("per-expert", "missing-expert", &e, path, sizeof path);
    expect_load_error("missing-expert", path, MOLT_EFORMAT,
                      "missing tensor 'model.layers.2.mlp.experts.3.up_proj.weight' (expected "
                      "shape [16, 32])");
    e.drop = "layers.0.attention.wq_a.weight";
    write_edited("mistral", "missing-mistral", &e, path, sizeof path);
    expect_load_error("missing-mistral", path, MOLT_EFORMAT,
                      "missing tensor 'layers.0.attention.wq_a.weight' (expected shape [24, 32])");
}
END_TEST

START_TEST(test_unexpected) {
    char path[700];
    edit e = {.n_add = 1};
    e.add[0] = f32_tensor("model.layers.0.mlp.extra.weight", 2, (int64_t[]){2, 2}, 0);
    write_edited("base", "extra", &e, path, sizeof path);
    expect_load_error("extra", path, MOLT_EFORMAT,
                      "1 unexpected tensor: 'model.layers.0.mlp.extra.weight'");
    static const char *const names[5] = {"a.weight", "b.weight", "c.weight", "d.weight",
                                         "e.weight"};
    e.n_add = 5;
    for (int i = 0; i < 5; i++)
        e.add[i] = f32_tensor(names[i], 1, (int64_t[]){3}, 0);
    write_edited("base", "extra5", &e, path, sizeof path);
    expect_load_error("extra5", path, MOLT_EFORMAT,
                      "5 unexpected tensors: 'a.weight', 'b.weight', 'c.weight', 'd.weight', ...");
    // a vision tower is ignored under a wrapper's prefix only
    e.n_add = 1;
    e.add[0] = f32_tensor("model.vision_tower.patch_conv.weight", 1, (int64_t[]){4}, 0);
    write_edited("wrapped", "wrapped-vision", &e, path, sizeof path);
    char dir[600];
    snprintf(dir, sizeof dir, "%s/wrapped-vision", tmp_dir);
    mdl_model m;
    ck_assert_ok(mdl_load(dir, &m));
    ck_assert(m.wrapped);
    mdl_free(&m);
    write_edited("base", "plain-vision", &e, path, sizeof path);
    expect_load_error("plain-vision", path, MOLT_EFORMAT,
                      "1 unexpected tensor: 'model.vision_tower.patch_conv.weight'");
}
END_TEST

START_TEST(test_shape_dtype) {
    char path[700];
    edit e = {.n_add = 1};
    e.add[0] = f32_tensor("model.norm.weight", 1, (int64_t[]){31}, 1);
    write_edited("base", "shape", &e, path, sizeof path);
    expect_load_error("shape", path, MOLT_EFORMAT,
                      "tensor 'model.norm.weight' has shape [31], expected [32]");
    static float big[8 * 16 * 32];
    e.add[0] = (st_tensor){.name = "model.layers.1.mlp.experts.gate_up_proj", .dtype = ST_F32,
                           .ndim = 3, .shape = {8, 16, 32}, .data = big};
    write_edited("base", "shape3", &e, path, sizeof path);
    expect_load_error("shape3", path, MOLT_EFORMAT,
                      "tensor 'model.layers.1.mlp.experts.gate_up_proj' has shape [8, 16, 32], "
                      "expected [8, 32, 32]");
    e.add[0] = f32_tensor("model.norm.weight", 1, (int64_t[]){32}, 1);
    e.add[0].dtype = ST_I32;
    write_edited("base", "dtype", &e, path, sizeof path);
    expect_load_error("dtype", path, MOLT_EUNSUPPORTED,
                      "tensor 'model.norm.weight' has dtype I32; supported: F32, F16, BF16, "
                      "F8_E4M3");
    e.add[0] = f32_tensor("model.norm.weight", 1, (int64_t[]){32}, 1);
    f32_buf[3] = NAN;
    write_edited("base", "nan", &e, path, sizeof path);
    expect_load_error("nan", path, MOLT_EFORMAT,
                      "tensor 'model.norm.weight' has a non-finite value at element 3");
}
END_TEST

START_TEST(test_scales) {
    char path[700], dir[600];
    edit e = {.drop = "model.layers.0.self_attn.o_proj.weight_scale_inv"};
    write_edited("fp8", "fp8-noscale", &e, path, sizeof path);
    expect_load_error("fp8-noscale", path, MOLT_EFORMAT,
                      "tensor 'model.layers.0.self_attn.o_proj.weight' is F8_E4M3 but its scale "
                      "'model.layers.0.self_attn.o_proj.weight_scale_inv' is missing");
    e = (edit){.n_add = 1};
    e.add[0] = f32_tensor("model.layers.1.mlp.experts.gate_up_proj_scale_inv", 1,
                          (int64_t[]){3}, 1);
    write_edited("fp8", "fp8-badscale", &e, path, sizeof path);
    expect_load_error("fp8-badscale", path, MOLT_EFORMAT,
                      "scale 'model.layers.1.mlp.experts.gate_up_proj_scale_inv' has shape [3], "
                      "expected 8 values (one per expert)");
    // a scale multiplies whatever the dtype; activation scales are accepted and ignored
    e = (edit){.n_add = 2};
    e.add[0] = f32_tensor("model.norm.weight_scale_inv", 0, NULL, 2.5f);
    static float act = 7;
    e.add[1] = (st_tensor){.name = "model.layers.0.self_attn.o_proj.activation_scale",
                           .dtype = ST_F32, .ndim = 0, .data = &act};
    write_edited("base", "scaled", &e, path, sizeof path);
    mdl_model a, b;
    snprintf(dir, sizeof dir, "%s/base", tmp_dir);
    ck_assert_ok(mdl_load(dir, &a));
    snprintf(dir, sizeof dir, "%s/scaled", tmp_dir);
    ck_assert_ok(mdl_load(dir, &b));
    for (int i = 0; i < 32; i++)
        ck_assert_float_eq(((float *)b.norm->data)[i], 2.5f * ((float *)a.norm->data)[i]);
    mdl_free(&a);
    mdl_free(&b);
}
END_TEST

// F16 data converts exactly; the Mistral and per-expert layouts load the same numbers.
START_TEST(test_f16_and_layouts) {
    char path[700], dir[600];
    static uint16_t half[32];
    for (int i = 0; i < 32; i++)
        half[i] = (uint16_t)(0x3c00 + 0x100 * (i % 4)); // 1, 1.25, 1.5, 1.75
    edit e = {.n_add = 1};
    e.add[0] = (st_tensor){.name = "model.norm.weight", .dtype = ST_F16, .ndim = 1,
                           .shape = {32}, .data = half};
    write_edited("base", "f16", &e, path, sizeof path);
    mdl_model m;
    snprintf(dir, sizeof dir, "%s/f16", tmp_dir);
    ck_assert_ok(mdl_load(dir, &m));
    for (int i = 0; i < 32; i++)
        ck_assert_float_eq(((float *)m.norm->data)[i], 1.0f + 0.25f * (float)(i % 4));
    mdl_free(&m);
    mdl_model a;
    snprintf(dir, sizeof dir, "%s/base", tmp_dir);
    ck_assert_ok(mdl_load(dir, &a));
    static const char *const others[] = {"per-expert", "mistral", "wrapped"};
    static const mdl_layout want[] = {MDL_LAYOUT_HF_PER_EXPERT, MDL_LAYOUT_MISTRAL,
                                      MDL_LAYOUT_HF};
    for (int k = 0; k < 3; k++) {
        snprintf(dir, sizeof dir, "%s/%s", tmp_dir, others[k]);
        ck_assert_ok(mdl_load(dir, &m));
        ck_assert_int_eq(m.layout, want[k]);
        const ag_tensor *pairs[][2] = {{a.layers[1].gate_up, m.layers[1].gate_up},
                                       {a.layers[2].down, m.layers[2].down},
                                       {a.layers[0].q_a.w, m.layers[0].q_a.w},
                                       {a.lm_head.w, m.lm_head.w}};
        for (int p = 0; p < 4; p++)
            ck_assert(memcmp(pairs[p][0]->data, pairs[p][1]->data,
                             (size_t)pairs[p][0]->numel * 4) == 0);
        mdl_free(&m);
    }
    mdl_free(&a);
}
END_TEST

START_TEST(test_missing_files) {
    mdl_model m;
    char dir[600], want[700];
    snprintf(dir, sizeof dir, "%s/nothing-here", tmp_dir);
    ck_assert_int_eq(mdl_load(dir, &m), MOLT_EIO);
    snprintf(want, sizeof want, "model directory %s: No such file or directory", dir);
    ck_assert_str_eq(molt_err_msg(), want);
    ck_assert(write_config("no-weights", NULL, NULL));
    snprintf(dir, sizeof dir, "%s/no-weights", tmp_dir);
    ck_assert_int_eq(mdl_load(dir, &m), MOLT_EIO);
    snprintf(want, sizeof want, "%s: no model.safetensors, model.safetensors.index.json or "
             "consolidated.safetensors", dir);
    ck_assert_str_eq(molt_err_msg(), want);
}
END_TEST

// tie_word_embeddings: no lm_head tensor, the head is the embedding table.
START_TEST(test_tied) {
    ck_assert(write_config("tied", "tie_word_embeddings", json_true()));
    mcfg c;
    char p[600];
    snprintf(p, sizeof p, "%s/tied/config.json", tmp_dir);
    ck_assert_ok(mcfg_load(p, &c));
    mdl_model m;
    ck_assert_ok(mdl_create(&m, &c));
    ck_assert_ptr_eq(m.lm_head.w, m.embed);
    ck_assert_ok(mdl_init_random(&m, 3, 0.1));
    snprintf(p, sizeof p, "%s/tied/model.safetensors", tmp_dir);
    ck_assert_ok(mdl_save(&m, p, &(mdl_save_opts){MDL_LAYOUT_HF, MDL_SAVE_F32, false}));
    mdl_free(&m);
    st_reader *r;
    ck_assert_ok(st_open(p, &r));
    ck_assert_ptr_null(st_find(r, "lm_head.weight"));
    st_close(r);
    snprintf(p, sizeof p, "%s/tied", tmp_dir);
    ck_assert_ok(mdl_load(p, &m));
    ck_assert_ptr_eq(m.lm_head.w, m.embed);
    mdl_free(&m);
}
END_TEST

// ---- batches, init, presets --------------------------------------------------------------

START_TEST(test_batch_errors) {
    ck_assert_msg(setup_err[0] == 0, "setup: %s", setup_err);
    mdl_model m;
    ck_assert_ok(mdl_create(&m, &micro));
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    mdl_batch b = {.ids = ag_tensor_new1(&c.act, AG_I32, 3),
                   .pos = ag_tensor_new1(&c.act, AG_I32, 3),
                   .seg = ag_tensor_new1(&c.act, AG_I32, 3)};
    ag_tensor *out;
    ((int32_t *)b.ids->data)[1] = 300;
    ck_assert_int_eq(mdl_forward(&c, &m, &b, &out), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "model batch: ids[1] = 300 is outside the vocabulary [0, 300)");
    ((int32_t *)b.ids->data)[1] = 5;
    ((int32_t *)b.pos->data)[2] = -1;
    ck_assert_int_eq(mdl_forward(&c, &m, &b, &out), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "model batch: pos[2] = -1 is negative");
    ((int32_t *)b.pos->data)[2] = 2;
    b.seg = ag_tensor_new1(&c.act, AG_I32, 2);
    ck_assert_int_eq(mdl_forward(&c, &m, &b, &out), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "model batch: seg is [2] i32, expected I32 [3]");
    b.seg = ag_tensor_new1(&c.act, AG_I32, 3);
    b.targets = ag_tensor_new1(&c.act, AG_F32, 3);
    ck_assert_int_eq(mdl_forward(&c, &m, &b, &out), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "model batch: targets is [3] f32, expected I32 [3]");
    b.targets = NULL;
    ck_assert_ok(mdl_forward(&c, &m, &b, &out)); // all-zero weights still run
    ck_assert_int_eq(out->shape[1], 300);
    ag_ctx_free(&c);
    mdl_free(&m);
}
END_TEST

START_TEST(test_init_random) {
    ck_assert_msg(setup_err[0] == 0, "setup: %s", setup_err);
    mdl_model a, b, d;
    ck_assert_ok(mdl_create(&a, &micro));
    ck_assert_ok(mdl_create(&b, &micro));
    ck_assert_ok(mdl_create(&d, &micro));
    ck_assert_ok(mdl_init_random(&a, 42, 0.05));
    ck_assert_ok(mdl_init_random(&b, 42, 0.05));
    ck_assert_ok(mdl_init_random(&d, 43, 0.05));
    const ag_tensor *ta = a.layers[1].gate_up, *tb = b.layers[1].gate_up, *td = d.layers[1].gate_up;
    ck_assert(memcmp(ta->data, tb->data, (size_t)ta->numel * 4) == 0);
    ck_assert(memcmp(ta->data, td->data, (size_t)ta->numel * 4) != 0);
    // std of the embeddings (9600 values, pad row excluded) near 0.05; norms 1; pad row 0
    double s = 0, s2 = 0;
    int64_t H = micro.hidden_size, n = 0;
    for (int64_t i = 0; i < a.embed->numel; i++) {
        if (i / H == micro.pad_token_id) {
            ck_assert_float_eq(((float *)a.embed->data)[i], 0.0f);
            continue;
        }
        double x = ((float *)a.embed->data)[i];
        s += x;
        s2 += x * x;
        n++;
    }
    double sd = sqrt(s2 / (double)n - (s / (double)n) * (s / (double)n));
    ck_assert_msg(fabs(sd - 0.05) < 0.0025, "std %g", sd);
    ck_assert_float_eq(((float *)a.layers[0].kv_a_norm->data)[5], 1.0f);
    ck_assert_float_eq(((float *)a.norm->data)[0], 1.0f);
    int64_t params = 0;
    int n_w = 0;
    for (int l = 0; l < micro.num_hidden_layers; l++)
        n_w += a.layers[l].moe ? 1 : 0;
    ck_assert_int_eq(n_w, micro.num_hidden_layers - micro.first_k_dense_replace);
    params = (int64_t)(a.arena.used / sizeof(float)); // upper bound incl. tensor headers
    ck_assert(mdl_param_count(&micro) <= params);
    ck_assert(mdl_param_count(&micro) > params * 9 / 10);
    mdl_free(&a);
    mdl_free(&b);
    mdl_free(&d);
}
END_TEST

START_TEST(test_presets) {
    static const struct {
        const char *name;
        double lo, hi; // parameter count range
    } want[] = {{"tiny", 8e6, 9e6}, {"tiny-grouped", 8e6, 9e6}, {"small", 100e6, 300e6},
                {"mistral-small-4", 118e9, 121e9}};
    for (int i = 0; i < 4; i++) {
        char p[600];
        ck_assert_ok(mdl_preset_find(want[i].name, p, sizeof p));
        mcfg c;
        ck_assert_ok(mcfg_load(p, &c));
        double n = (double)mdl_param_count(&c);
        ck_assert_msg(n >= want[i].lo && n <= want[i].hi, "%s: %g parameters", want[i].name, n);
        ck_assert_int_eq(c.vocab_size, 131072);
    }
    char p[600];
    mcfg c;
    ck_assert_ok(mdl_preset_find("tiny-grouped", p, sizeof p));
    ck_assert_ok(mcfg_load(p, &c));
    ck_assert_int_eq(c.n_group, 2);
    ck_assert_int_eq(c.topk_group, 1);
    ck_assert_int_eq(c.q_lora_rank, 0);
    ck_assert_ok(mdl_preset_find("tiny", p, sizeof p));
    ck_assert_ok(mcfg_load(p, &c));
    ck_assert(c.first_k_dense_replace >= 1 && c.q_lora_rank > 0 && c.n_shared_experts == 1);
    ck_assert_int_eq(mdl_preset_find("no-such-preset", p, sizeof p), MOLT_EIO);
    ck_assert_msg(strstr(molt_err_msg(), "preset 'no-such-preset' not found") != NULL, "%s",
                  molt_err_msg());
    mdl_init_opts o = {.preset = "mistral-small-4", .out_dir = tmp_dir, .no_tokenizer = true};
    ck_assert_int_eq(mdl_init_model(&o), MOLT_EARG);
    ck_assert_msg(strstr(molt_err_msg(), "raise --max-gb") != NULL, "%s", molt_err_msg());
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("model_weights");
    TCase *tc = tcase_create("weights");
    tcase_add_unchecked_fixture(tc, setup_all, teardown_all);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_missing);
    tcase_add_test(tc, test_unexpected);
    tcase_add_test(tc, test_shape_dtype);
    tcase_add_test(tc, test_scales);
    tcase_add_test(tc, test_f16_and_layouts);
    tcase_add_test(tc, test_missing_files);
    tcase_add_test(tc, test_tied);
    tcase_add_test(tc, test_batch_errors);
    tcase_add_test(tc, test_init_random);
    tcase_add_test(tc, test_presets);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return harness_run(suite());
}
