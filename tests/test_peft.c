// tests/test_peft.c: adapter files (adapters/peft.c, adapters/h5.c): PEFT export -> import
// and molt file save -> load round trips bit for bit (ranks, alphas, scales, every A and B),
// PEFT's tensor names and shapes (nested base_layer for two routed-expert parameters, the
// router as a parameter target), adapter_config.json with exactly the keys of SPECS.md
// section 7, precise errors for malformed PEFT directories, the molt HDF5 file read back
// with HDF5 itself (attributes, dataset names, shapes, data, the same bytes every time), its
// precise errors (not HDF5, wrong attributes, missing/misshapen/extra datasets, truncated or
// damaged files), what lora_load_any accepts, and logits of the tiny model with
// molt-exported adapters against PEFT's (tests/fixtures/peft/reference.safetensors, made by
// tools/reference/peft_reference.py).
#include "adapters/adapters.h"
#include "harness/harness.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

// The molt file tests read and edit files with HDF5 itself (CMake gives the test harness
// HDF5's include directory).
#include <hdf5.h>

#define VOCAB 1024 // the tiny preset with a short vocabulary, except for the parity test

// HDF5 1.10 leaks the object header it has just found damaged (H5O_protect after a failed
// metadata checksum), and test_molt_file_damage damages headers on purpose. LeakSanitizer
// (MOLT_SANITIZE builds) reads this hook at start-up; allocations made outside libhdf5 are
// still checked.
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) {
    return "leak:libhdf5\n";
}

static void tiny_model_vocab(mdl_model *m, int64_t vocab) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/models/tiny.json", src ? src : ".");
    mcfg cfg;
    ck_assert_ok(mcfg_load(path, &cfg));
    cfg.vocab_size = vocab;
    ck_assert_ok(mdl_create(m, &cfg));
    ck_assert_ok(mdl_init_random(m, 1234, 0.1));
}

static void tiny_model(mdl_model *m) {
    tiny_model_vocab(m, VOCAB);
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
    snprintf(file, sizeof file, "%s/adapter.h5", dir);
    ck_assert_ok(lora_save(&ad, file));
    ck_assert_ok(lora_load_any(&m2, file, false, &back));
    same_adapter(&ad, &back);
    ck_assert_int_eq(memcmp(&ad.spec, &back.spec, sizeof ad.spec), 0);
    lora_detach(&back);
    ck_assert_ok(lora_load(&m2, file, false, &back));
    same_adapter(&ad, &back);
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

// Rewrites the shape of tensor name (same element count) in dir's adapter_model.safetensors.
static void edit_shape(const char *dir, const char *name, int ndim, const int64_t *shape) {
    char path[128];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    st_reader *r;
    ck_assert_ok(st_open(path, &r));
    int n = st_count(r);
    st_tensor *t = calloc((size_t)n + 1, sizeof *t);
    for (int i = 0; i < n; i++) {
        t[i] = *st_at(r, i);
        if (!strcmp(t[i].name, name)) {
            t[i].ndim = ndim;
            memcpy(t[i].shape, shape, (size_t)ndim * sizeof *shape);
        }
    }
    ck_assert_ok(st_write(path, t, n, NULL, 0));
    st_close(r);
    free(t);
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
                 "model.layers.0.self_attn.q_a_proj.lora_A.weight has shape [2, 32], "
                 "expected [3, 32] f32");
    edit_config(dir, "r", json_integer(2));
    // the message shows every dim of a tensor with too many
    const int64_t three[3] = {1, 2, 32};
    edit_shape(dir, "base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight", 3, three);
    expect_error(&m, dir, MOLT_EFORMAT, "%s/adapter_model.safetensors: tensor base_model.model."
                 "model.layers.0.self_attn.q_a_proj.lora_A.weight has shape [1, 2, 32], "
                 "expected [2, 32] f32");
    const int64_t two[2] = {2, 32};
    edit_shape(dir, "base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight", 2, two);
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

// ---- molt's adapter file (HDF5) -------------------------------------------------------

#define SPEC_H5 "r=2,alpha=5,r.experts=3,targets=q_a_proj+o_proj+experts+lm_head"
#define PFX "base_model.model.model.layers."

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    ck_assert_int_eq(fclose(f), 0);
}

static char *slurp(const char *path, long *n) {
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    *n = ftell(f);
    rewind(f);
    char *b = malloc((size_t)*n + 1);
    ck_assert_int_eq(fread(b, 1, (size_t)*n, f), (size_t)*n);
    fclose(f);
    return b;
}

static void write_bytes(const char *path, const char *b, long n) {
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fwrite(b, 1, (size_t)n, f), (size_t)n);
    ck_assert_int_eq(fclose(f), 0);
}

static void copy_file(const char *from, const char *to) {
    long n;
    char *b = slurp(from, &n);
    write_bytes(to, b, n);
    free(b);
}

// A scalar string attribute of the root group (fixed length, as h5py writes bytes).
static void h5_set_attr_str(hid_t f, const char *name, const char *value) {
    if (H5Aexists(f, name) > 0)
        ck_assert_int_ge(H5Adelete(f, name), 0);
    hid_t t = H5Tcopy(H5T_C_S1), sp = H5Screate(H5S_SCALAR);
    H5Tset_size(t, strlen(value));
    hid_t a = H5Acreate2(f, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
    ck_assert_int_ge(a, 0);
    ck_assert_int_ge(H5Awrite(a, t, value), 0);
    H5Aclose(a), H5Sclose(sp), H5Tclose(t);
}

// The same as a variable-length string (as h5py writes str).
static void h5_set_attr_vstr(hid_t f, const char *name, const char *value) {
    if (H5Aexists(f, name) > 0)
        ck_assert_int_ge(H5Adelete(f, name), 0);
    hid_t t = H5Tcopy(H5T_C_S1), sp = H5Screate(H5S_SCALAR);
    H5Tset_size(t, H5T_VARIABLE);
    hid_t a = H5Acreate2(f, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
    ck_assert_int_ge(a, 0);
    ck_assert_int_ge(H5Awrite(a, t, &value), 0);
    H5Aclose(a), H5Sclose(sp), H5Tclose(t);
}

static void h5_set_attr_i64(hid_t f, const char *name, int64_t v) {
    if (H5Aexists(f, name) > 0)
        ck_assert_int_ge(H5Adelete(f, name), 0);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    ck_assert_int_ge(a, 0);
    ck_assert_int_ge(H5Awrite(a, H5T_NATIVE_INT64, &v), 0);
    H5Aclose(a), H5Sclose(sp);
}

// Replaces dataset `name` of file type `type` and shape dims (rank nd), zero-filled; with
// nd < 0 only deletes it.
static void h5_put_dataset(hid_t f, const char *name, hid_t type, int nd, const hsize_t *dims) {
    if (H5Lexists(f, name, H5P_DEFAULT) > 0)
        ck_assert_int_ge(H5Ldelete(f, name, H5P_DEFAULT), 0);
    if (nd < 0)
        return;
    hid_t sp = H5Screate_simple(nd, dims, NULL);
    hid_t d = H5Dcreate2(f, name, type, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    ck_assert_int_ge(d, 0);
    H5Dclose(d), H5Sclose(sp);
}

// A fresh copy of good at path, opened for writing.
static hid_t h5_edit(const char *good, const char *path) {
    copy_file(good, path);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    ck_assert_int_ge(f, 0);
    return f;
}

static void h5_read_attr_str(hid_t f, const char *name, char *buf, size_t cap) {
    hid_t a = H5Aopen(f, name, H5P_DEFAULT);
    ck_assert_int_ge(a, 0);
    hid_t t = H5Aget_type(a);
    ck_assert_int_eq(H5Tget_class(t), H5T_STRING);
    ck_assert_uint_lt(H5Tget_size(t), cap);
    memset(buf, 0, cap);
    ck_assert_int_ge(H5Aread(a, t, buf), 0);
    H5Tclose(t), H5Aclose(a);
}

// Dataset name holds exactly x (f32, x's shape), read with HDF5 itself.
static void h5_want_tensor(hid_t f, const char *name, const ag_tensor *x, int64_t d0,
                           int64_t d1) {
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    ck_assert_msg(d >= 0, "no dataset %s", name);
    hid_t t = H5Dget_type(d), sp = H5Dget_space(d);
    ck_assert(H5Tequal(t, H5T_IEEE_F32LE) > 0);
    hsize_t dims[2];
    ck_assert_int_eq(H5Sget_simple_extent_ndims(sp), 2);
    H5Sget_simple_extent_dims(sp, dims, NULL);
    ck_assert_msg(dims[0] == (hsize_t)d0 && dims[1] == (hsize_t)d1, "%s: [%llu, %llu]", name,
                  (unsigned long long)dims[0], (unsigned long long)dims[1]);
    float *buf = malloc((size_t)(d0 * d1) * sizeof *buf);
    ck_assert_int_ge(H5Dread(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf), 0);
    ck_assert_int_eq(x->numel, d0 * d1);
    ck_assert_int_eq(memcmp(buf, x->data, (size_t)(d0 * d1) * sizeof *buf), 0);
    free(buf);
    H5Sclose(sp), H5Tclose(t), H5Dclose(d);
}

START_TEST(test_molt_file_layout) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, SPEC_H5, false, &ad);
    lora_randomize_b(&ad, 3, 0.5);
    char dir[64], file[128], file2[128], tmp[160];
    tmpdir(dir, sizeof dir);
    snprintf(file, sizeof file, "%s/a.h5", dir);
    snprintf(file2, sizeof file2, "%s/b.h5", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", file);
    write_text(file, "an older file, replaced whole");
    ck_assert_ok(lora_save(&ad, file));
    ck_assert_int_ne(access(tmp, F_OK), 0);
    long n;
    char *bytes = slurp(file, &n);
    ck_assert_int_eq(memcmp(bytes, "\x89HDF\r\n\x1a\n", 8), 0);
    // HDF5 can record object times (seconds): a second later the bytes must not change
    nanosleep(&(struct timespec){.tv_sec = 1, .tv_nsec = 100 * 1000 * 1000}, NULL);
    ck_assert_ok(lora_save(&ad, file2));
    long n2;
    char *bytes2 = slurp(file2, &n2);
    ck_assert(n == n2 && !memcmp(bytes, bytes2, (size_t)n));
    free(bytes), free(bytes2);

    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(file, H5F_ACC_RDONLY, H5P_DEFAULT);
    ck_assert_int_ge(f, 0);
    char text[256];
    h5_read_attr_str(f, "format", text, sizeof text);
    ck_assert_str_eq(text, "molt-lora");
    h5_read_attr_str(f, "spec", text, sizeof text);
    lora_spec spec;
    ck_assert_ok(lora_spec_parse(text, &spec));
    ck_assert_int_eq(spec.r, 2);
    ck_assert(spec.alpha == 5);
    ck_assert_int_eq(spec.group_r[LORA_GROUP_EXPERTS], 3);
    ck_assert_int_eq(spec.n_targets, 4);
    ck_assert_str_eq(spec.targets[3], "lm_head");
    int64_t version = 0;
    hid_t a = H5Aopen(f, "version", H5P_DEFAULT);
    ck_assert_int_ge(H5Aread(a, H5T_NATIVE_INT64, &version), 0);
    H5Aclose(a);
    ck_assert_int_eq(version, 1);
    // 3 layers x (q_a_proj, o_proj) + 2 MoE layers x 2 expert stacks + lm_head, 2 each
    H5G_info_t gi;
    ck_assert_int_ge(H5Gget_info(f, &gi), 0);
    ck_assert_int_eq(gi.nlinks, 2 * (6 + 4 + 1));
    const lora_unit *u = lora_find_unit(&ad, "model.layers.0.self_attn.q_a_proj");
    h5_want_tensor(f, PFX "0.self_attn.q_a_proj.lora_A.weight", u->a, 2, 32);
    h5_want_tensor(f, PFX "0.self_attn.q_a_proj.lora_B.weight", u->b, 24, 2);
    u = lora_find_unit(&ad, "model.layers.2.self_attn.o_proj");
    h5_want_tensor(f, PFX "2.self_attn.o_proj.lora_A.weight", u->a, 2, 48);
    h5_want_tensor(f, PFX "2.self_attn.o_proj.lora_B.weight", u->b, 32, 2);
    // routed experts: r 3 x 8 experts; gate_up_proj nests under base_layer
    u = lora_find_unit(&ad, "model.layers.1.mlp.experts.gate_up_proj");
    h5_want_tensor(f, PFX "1.mlp.experts.base_layer.lora_A.weight", u->a, 24, 32);
    h5_want_tensor(f, PFX "1.mlp.experts.base_layer.lora_B.weight", u->b, 32, 24);
    u = lora_find_unit(&ad, "model.layers.2.mlp.experts.down_proj");
    h5_want_tensor(f, PFX "2.mlp.experts.lora_A.weight", u->a, 24, 16);
    h5_want_tensor(f, PFX "2.mlp.experts.lora_B.weight", u->b, 32, 24);
    u = lora_find_unit(&ad, "lm_head");
    h5_want_tensor(f, "base_model.model.lm_head.lora_A.weight", u->a, 2, 32);
    h5_want_tensor(f, "base_model.model.lm_head.lora_B.weight", u->b, VOCAB, 2);
    H5Fclose(f);
    lora_detach(&ad);
    rm_rf(dir);
    mdl_free(&m);
}
END_TEST

// lora_load of path fails with st and exactly the message fmt (its "%s" is the path), and
// leaves nothing attached.
static void expect_load_error(mdl_model *m, const char *path, molt_status st, const char *fmt) {
    char msg[1024];
    snprintf(msg, sizeof msg, fmt, path);
    lora_adapter ad;
    ck_assert_int_eq(lora_load(m, path, true, &ad), st);
    ck_assert_str_eq(molt_err_msg(), msg);
    ck_assert_ptr_null(m->layers[0].q_a.lora_a);
    ck_assert_ptr_null(m->lm_head.lora_a);
}

// lora_load of path fails with MOLT_EFORMAT, a message starting with prefix (its "%s" is
// the path) and containing part, and leaves nothing attached.
static void expect_load_error_part(mdl_model *m, const char *path, const char *prefix,
                                   const char *part) {
    char want[1024];
    snprintf(want, sizeof want, prefix, path);
    lora_adapter ad;
    ck_assert_int_eq(lora_load(m, path, true, &ad), MOLT_EFORMAT);
    const char *msg = molt_err_msg();
    ck_assert_msg(!strncmp(msg, want, strlen(want)) && strstr(msg, part), "%s", msg);
    ck_assert_ptr_null(m->layers[0].q_a.lora_a);
    ck_assert_ptr_null(m->lm_head.lora_a);
}

START_TEST(test_molt_file_errors) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, SPEC_H5, false, &ad);
    lora_randomize_b(&ad, 5, 0.5);
    char dir[64], good[128], bad[128];
    tmpdir(dir, sizeof dir);
    snprintf(good, sizeof good, "%s/good.h5", dir);
    snprintf(bad, sizeof bad, "%s/bad.h5", dir);
    ck_assert_ok(lora_save(&ad, good));
    lora_detach(&ad);
    ck_assert_ok(lora_load(&m, good, true, &ad));
    lora_detach(&ad);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);

    write_text(bad, "r=2,targets=q_a_proj\n");
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: not an HDF5 file (expected a molt adapter "
                      "file: HDF5 with the root attribute format=\"molt-lora\")");
    write_text(bad, "");
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: not an HDF5 file (expected a molt adapter "
                      "file: HDF5 with the root attribute format=\"molt-lora\")");
    char missing[160];
    snprintf(missing, sizeof missing, "%s/none.h5", dir);
    expect_load_error(&m, missing, MOLT_EIO, "%s: No such file or directory");

    // variable-length strings (what h5py writes for str) are read too
    hid_t f = h5_edit(good, bad);
    h5_set_attr_vstr(f, "format", "molt-lora");
    h5_set_attr_vstr(f, "spec", SPEC_H5);
    H5Fclose(f);
    ck_assert_ok(lora_load(&m, bad, true, &ad));
    ck_assert_int_eq(lora_find_unit(&ad, "model.layers.1.mlp.experts.down_proj")->r, 3);
    lora_detach(&ad);
    f = h5_edit(good, bad);
    h5_set_attr_vstr(f, "format", "molt-lorax");
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: attribute format is \"molt-lorax\", expected "
                      "\"molt-lora\" (not a molt adapter file)");
    f = h5_edit(good, bad);
    h5_set_attr_str(f, "format", "safetensors");
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: attribute format is \"safetensors\", expected "
                      "\"molt-lora\" (not a molt adapter file)");
    f = h5_edit(good, bad);
    ck_assert_int_ge(H5Adelete(f, "format"), 0);
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: attribute format is missing (expected the "
                      "string \"molt-lora\" of a molt adapter file)");
    f = h5_edit(good, bad);
    h5_set_attr_i64(f, "format", 1);
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: attribute format is not a scalar string "
                      "(expected the string \"molt-lora\" of a molt adapter file)");
    f = h5_edit(good, bad);
    h5_set_attr_i64(f, "version", 2);
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT,
                      "%s: attribute version is 2, this build reads version 1");
    f = h5_edit(good, bad);
    h5_set_attr_str(f, "version", "1");
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: attribute version is not a scalar integer "
                      "(expected 1)");
    f = h5_edit(good, bad);
    ck_assert_int_ge(H5Adelete(f, "spec"), 0);
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: attribute spec is missing (expected the "
                      "adapter's spec)");
    f = h5_edit(good, bad);
    h5_set_attr_str(f, "spec", "r=two,targets=q_a_proj");
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT,
                      "%s: attribute spec: lora spec: r=two is not a number");
    f = h5_edit(good, bad);
    h5_set_attr_str(f, "spec", "r=2,targets=q_proj");
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EARG, "%s: attaching the adapter's spec: lora: "
                      "target 'q_proj' matches no module of the model");

    f = h5_edit(good, bad);
    h5_put_dataset(f, PFX "2.self_attn.o_proj.lora_B.weight", 0, -1, NULL);
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: missing dataset " PFX "2.self_attn.o_proj."
                      "lora_B.weight (target model.layers.2.self_attn.o_proj)");
    f = h5_edit(good, bad);
    h5_put_dataset(f, PFX "0.self_attn.q_a_proj.lora_A.weight", H5T_IEEE_F32LE, 2,
                   (hsize_t[]){3, 32});
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: dataset " PFX "0.self_attn.q_a_proj.lora_A."
                      "weight has shape [3, 32], expected [2, 32]");
    f = h5_edit(good, bad);
    h5_put_dataset(f, PFX "1.mlp.experts.base_layer.lora_B.weight", H5T_IEEE_F32LE, 3,
                   (hsize_t[]){32, 3, 8});
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: dataset " PFX "1.mlp.experts.base_layer."
                      "lora_B.weight has shape [32, 3, 8], expected [32, 24]");
    f = h5_edit(good, bad);
    h5_put_dataset(f, "base_model.model.lm_head.lora_B.weight", H5T_IEEE_F64LE, 2,
                   (hsize_t[]){VOCAB, 2});
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: dataset base_model.model.lm_head.lora_B."
                      "weight has data type f64, expected f32");
    f = h5_edit(good, bad);
    h5_put_dataset(f, PFX "0.self_attn.q_b_proj.lora_A.weight", H5T_IEEE_F32LE, 2,
                   (hsize_t[]){2, 24});
    H5Fclose(f);
    expect_load_error(&m, bad, MOLT_EFORMAT, "%s: unexpected object " PFX "0.self_attn.q_b_proj."
                      "lora_A.weight (no adapted module of the model has a tensor of this name)");

    // an adapter made for another vocabulary: lm_head's B does not fit
    mdl_model m2 = {0};
    tiny_model_vocab(&m2, 512);
    expect_load_error(&m2, good, MOLT_EFORMAT, "%s: dataset base_model.model.lm_head.lora_B."
                      "weight has shape [1024, 2], expected [512, 2]");
    mdl_free(&m2);

    long n;
    char *bytes = slurp(good, &n);
    write_bytes(bad, bytes, n / 2);
    expect_load_error_part(&m, bad, "%s: HDF5 cannot open it, the file is truncated or "
                           "damaged (HDF5: ", "truncated file");
    // one changed byte in the middle of lm_head's B: its data checksum fails
    f = H5Fopen(good, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, "base_model.model.lm_head.lora_B.weight", H5P_DEFAULT);
    hsize_t at[2] = {0, 0}, size = 0;
    haddr_t addr = HADDR_UNDEF;
    unsigned mask;
    ck_assert_int_ge(H5Dget_chunk_info_by_coord(d, at, &mask, &addr, &size), 0);
    H5Dclose(d), H5Fclose(f);
    ck_assert(addr != HADDR_UNDEF && size >= (hsize_t)VOCAB * 2 * 4 && addr + size <= (hsize_t)n);
    bytes[addr + size / 2] ^= 0x10;
    write_bytes(bad, bytes, n);
    expect_load_error_part(&m, bad, "%s: dataset base_model.model.lm_head.lora_B.weight: its "
                           "data cannot be read, the file is damaged (HDF5: ", "Fletcher32");
    free(bytes);
    rm_rf(dir);
    mdl_free(&m);
}
END_TEST

// Every single-byte change of a file either gives an error naming the file (nothing left
// attached) or loads exactly the saved adapter: never a crash, never different numbers.
START_TEST(test_molt_file_damage) {
    mdl_model m = {0}, m2 = {0};
    tiny_model(&m);
    tiny_model(&m2);
    lora_adapter ad, back;
    attach(&m, "r=2,targets=q_a_proj+experts", false, &ad);
    lora_randomize_b(&ad, 9, 0.5);
    char dir[64], good[128], bad[128];
    tmpdir(dir, sizeof dir);
    snprintf(good, sizeof good, "%s/good.h5", dir);
    snprintf(bad, sizeof bad, "%s/bad.h5", dir);
    ck_assert_ok(lora_save(&ad, good));
    long n;
    char *bytes = slurp(good, &n);
    int refused = 0, tried = 0;
    for (long off = 0; off < n; off += off < 4096 ? 7 : 61, tried++) {
        bytes[off] ^= 0xa5;
        write_bytes(bad, bytes, n);
        bytes[off] ^= 0xa5;
        molt_status st = lora_load(&m2, bad, false, &back);
        if (st == MOLT_OK) {
            same_adapter(&ad, &back);
            lora_detach(&back);
            continue;
        }
        refused++;
        ck_assert_msg(!strncmp(molt_err_msg(), bad, strlen(bad)), "offset %ld: %s", off,
                      molt_err_msg());
        ck_assert_ptr_null(m2.layers[0].q_a.lora_a);
    }
    // nearly every byte is metadata under a checksum or checksummed tensor data
    ck_assert_msg(refused > tried * 3 / 4, "only %d of %d damaged files refused", refused,
                  tried);
    free(bytes);
    lora_detach(&ad);
    rm_rf(dir);
    mdl_free(&m);
    mdl_free(&m2);
}
END_TEST

START_TEST(test_load_any) {
    mdl_model m = {0};
    tiny_model(&m);
    lora_adapter ad;
    attach(&m, "r=2,targets=q_a_proj", false, &ad);
    char dir[64], path[160], msg[512];
    tmpdir(dir, sizeof dir);
    ck_assert_ok(lora_export_peft(&ad, dir, NULL));
    lora_detach(&ad);
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    ck_assert_int_eq(unlink(path), 0);
    ck_assert_int_eq(lora_load_any(&m, dir, true, &ad), MOLT_EFORMAT);
    snprintf(msg, sizeof msg, "adapter %s: a directory without adapter_config.json (expected a "
             "PEFT directory holding adapter_config.json, a molt adapter file (HDF5) or a "
             "training checkpoint)", dir);
    ck_assert_str_eq(molt_err_msg(), msg);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    ck_assert_int_eq(lora_load_any(&m, path, true, &ad), MOLT_EFORMAT);
    snprintf(msg, sizeof msg, "adapter %s: not an HDF5 file (expected a PEFT directory holding "
             "adapter_config.json, a molt adapter file (HDF5) or a training checkpoint; for a "
             "PEFT adapter, give its directory)", path);
    ck_assert_str_eq(molt_err_msg(), msg);
    snprintf(path, sizeof path, "%s/notes.txt", dir);
    write_text(path, "\x89HDF but not quite\n");
    ck_assert_int_eq(lora_load_any(&m, path, true, &ad), MOLT_EFORMAT);
    snprintf(msg, sizeof msg, "adapter %s: not an HDF5 file (expected a PEFT directory holding "
             "adapter_config.json, a molt adapter file (HDF5) or a training checkpoint)", path);
    ck_assert_str_eq(molt_err_msg(), msg);
    ck_assert_ptr_null(m.layers[0].q_a.lora_a);
    rm_rf(dir);
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
    tcase_add_test(tc, test_molt_file_layout);
    tcase_add_test(tc, test_molt_file_errors);
    tcase_add_test(tc, test_molt_file_damage);
    tcase_add_test(tc, test_load_any);
    tcase_add_test(tc, test_peft_parity);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
