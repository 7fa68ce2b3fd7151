// model/init_model.c: random models for tests and demos: transformers-like initialization,
// the preset lookup (configs/models/NAME.json), and writing a complete model directory in
// Hugging Face layout (config.json, weights, tekken.json) that transformers can load.
// Deterministic for a seed. Not here: argument parsing (cli.c), the file formats
// (safetensors.c, save.c).
#include "mdl_internal.h"

#include "../common/datadir.h"
#include "../common/fsio.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PATH_CAP 4096

// snprintf that reports truncation (paths longer than the buffer are refused, not cut).
static bool fmt_path(char *buf, size_t cap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool fmt_path(char *buf, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    return n >= 0 && (size_t)n < cap;
}

molt_status mdl_init_random(mdl_model *m, uint64_t seed, double std) {
    int n = mdl_weight_list(m, NULL, 0);
    w_entry *list = molt_malloc((size_t)n * sizeof *list);
    if (!list)
        return molt_err(MOLT_ENOMEM, "init weights: out of memory");
    mdl_weight_list(m, list, n);
    ag_rng r;
    ag_rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        ag_tensor *t = list[i].t;
        if (list[i].kind != W_NORM) {
            ag_fill_normal(t, &r, 0.0, std);
            continue;
        }
        float *x = t->data;
        for (int64_t j = 0; j < t->numel; j++)
            x[j] = 1.0f;
    }
    molt_free(list);
    int pad = m->cfg.pad_token_id;
    if (pad >= 0 && pad < m->cfg.vocab_size) // nn.Embedding(padding_idx) zeroes that row
        memset((float *)m->embed->data + (int64_t)pad * m->cfg.hidden_size, 0,
               (size_t)m->cfg.hidden_size * sizeof(float));
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Finding presets and the tokenizer

static bool is_file(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

molt_status mdl_preset_find(const char *name, char *path, size_t cap) {
    if (!name || !*name)
        return molt_err(MOLT_EARG, "preset: empty name");
    size_t len = strlen(name);
    if (len >= PATH_CAP / 2 || len >= cap)
        return molt_err(MOLT_EARG, "preset: name too long");
    if (strchr(name, '/') || (len > 5 && strcmp(name + len - 5, ".json") == 0)) {
        if (!is_file(name))
            return molt_err(MOLT_EIO, "preset file '%s' not found", name);
        fmt_path(path, cap, "%s", name);
        return MOLT_OK;
    }
    char rel[PATH_CAP];
    fmt_path(rel, sizeof rel, "models/%s.json", name);
    if (molt_data_find(rel, path, cap) != MOLT_OK)
        return molt_err_wrap(MOLT_EIO, "preset '%s' not found (pass a .json path, or see "
                             "'molt info' for the data directory)", name);
    return MOLT_OK;
}

// tekken.json beside the preset's folder (../tokenizers), else in the data roots.
static molt_status tokenizer_find(const char *preset_path, char *out, size_t cap) {
    char dir[PATH_CAP];
    fmt_path(dir, sizeof dir, "%s", preset_path);
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = 0;
    else
        fmt_path(dir, sizeof dir, ".");
    char p[PATH_CAP + 64];
    fmt_path(p, sizeof p, "%s/../tokenizers/tekken.json", dir);
    if (is_file(p)) {
        fmt_path(out, cap, "%s", p);
        return MOLT_OK;
    }
    if (molt_data_find("tokenizers/tekken.json", out, cap) != MOLT_OK)
        return molt_err_wrap(MOLT_EIO, "tokenizer tekken.json (pass --tokenizer FILE, or "
                             "--no-tokenizer)");
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Writing the directory

// config.json: the preset with the dtype of the written weights.
static molt_status write_config(json_t *cfg, const mdl_save_opts *so, const char *path) {
    const char *dt = so->dtype == MDL_SAVE_F32 ? "float32" : "bfloat16";
    if (json_object_set_new(cfg, "dtype", json_string(dt)) != 0)
        return molt_err(MOLT_ENOMEM, "config.json: out of memory");
    char *text = json_dumps(cfg, JSON_INDENT(2));
    if (!text)
        return molt_err(MOLT_ENOMEM, "config.json: out of memory");
    molt_status st = molt_write_atomic(path, text, strlen(text));
    free(text); // from jansson
    return st;
}

// The preset's JSON, validated as a config, and its initializer_range.
static molt_status read_preset(const char *path, mcfg *cfg, json_t **root, double *std) {
    MOLT_TRY(mcfg_load(path, cfg));
    json_error_t je;
    *root = json_load_file(path, 0, &je);
    if (!*root)
        return molt_err(MOLT_EFORMAT, "%s: %s", path, je.text);
    json_t *ir = json_object_get(*root, "initializer_range");
    *std = json_is_number(ir) ? json_number_value(ir) : 0.02;
    if (!(*std > 0 && *std < 10)) {
        json_decref(*root);
        return molt_err(MOLT_EFORMAT, "%s: initializer_range %g is out of range (0, 10)", path,
                        *std);
    }
    return MOLT_OK;
}

static molt_status check_size(const char *preset, const mcfg *cfg, double max_gb) {
    double gb = (double)mdl_param_count(cfg) * 4 / 1e9, lim = max_gb > 0 ? max_gb : 16;
    if (gb <= lim)
        return MOLT_OK;
    return molt_err(MOLT_EARG, "preset '%s' has %.3g parameters (%.1f GB as F32), more than "
                    "the %.1f GB init-model writes (raise --max-gb)", preset,
                    (double)mdl_param_count(cfg), gb, lim);
}

static molt_status write_model(const mdl_init_opts *o, const char *dir, const mcfg *cfg,
                               json_t *root, double std) {
    char p[PATH_CAP + 64];
    fmt_path(p, sizeof p, "%s/config.json", dir);
    MOLT_TRY(write_config(root, &o->save, p));
    mdl_model m;
    MOLT_TRY(mdl_create(&m, cfg));
    molt_status st = mdl_init_random(&m, o->seed, std);
    fmt_path(p, sizeof p, "%s/%s", dir,
             o->save.layout == MDL_LAYOUT_MISTRAL ? "consolidated.safetensors"
                                                  : "model.safetensors");
    if (st == MOLT_OK)
        st = mdl_save(&m, p, &o->save);
    mdl_free(&m);
    return st;
}

molt_status mdl_init_model(const mdl_init_opts *o) {
    char preset[PATH_CAP], tok[PATH_CAP], p[PATH_CAP + 64];
    // every path built below fits once these do
    if (!o->out_dir || strlen(o->out_dir) >= PATH_CAP / 2 ||
        (o->tokenizer && strlen(o->tokenizer) >= PATH_CAP / 2))
        return molt_err(MOLT_EARG, "init-model: output or tokenizer path missing or too long");
    MOLT_TRY(mdl_preset_find(o->preset, preset, sizeof preset));
    if (!o->no_tokenizer) {
        if (o->tokenizer)
            fmt_path(tok, sizeof tok, "%s", o->tokenizer);
        else
            MOLT_TRY(tokenizer_find(preset, tok, sizeof tok));
    }
    // the inputs must survive the output: nothing is written over or into them
    MOLT_TRY(molt_check_overlap("--out", o->out_dir, "--preset", preset));
    if (!o->no_tokenizer)
        MOLT_TRY(molt_check_overlap("--out", o->out_dir, "--tokenizer", tok));
    mcfg cfg;
    json_t *root;
    double std = 0.02;
    MOLT_TRY(read_preset(preset, &cfg, &root, &std));
    molt_status st = check_size(o->preset, &cfg, o->max_gb);
    molt_outdir d = {0};
    if (st == MOLT_OK)
        st = molt_outdir_begin(&d, o->out_dir, o->force, "--out");
    if (st == MOLT_OK)
        st = write_model(o, d.tmp, &cfg, root, std);
    json_decref(root);
    if (st == MOLT_OK && !o->no_tokenizer) {
        fmt_path(p, sizeof p, "%s/tekken.json", d.tmp);
        st = molt_copy_file(tok, p);
    }
    if (st == MOLT_OK)
        return molt_outdir_commit(&d);
    molt_outdir_abort(&d);
    return st;
}
