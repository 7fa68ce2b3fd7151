// adapters/cli.c: `molt export` (an adapter file or PEFT directory to a PEFT directory or a
// molt adapter file) and `molt merge` (an adapter folded into its base model, written in
// Hugging Face layout). Exit status: 0 success, 1 failure, 2 bad usage. Not here: the
// adapter logic itself (lora.c, peft.c, h5.c, merge.c).
#include "adapters.h"

#include "../common/fsio.h"
#include "../common/opt.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PATH_CAP 4096

static const char export_usage[] =
    "usage: molt export --model DIR (--adapter SRC | --spec SPEC [--b-std X] [--b-seed N])\n"
    "                   --out DEST [--format peft|molt] [--base-name NAME] [--force]\n"
    "  SRC is a PEFT directory or a molt adapter file; the model supplies the shapes.\n"
    "  --spec starts from a freshly initialized adapter (compact LoRA spec, e.g.\n"
    "  r=8,alpha=16,targets=q_a_proj+o_proj); --b-std fills B with N(0, X) (default 0).\n"
    "  peft (default) writes DEST/adapter_config.json and adapter_model.safetensors;\n"
    "  molt writes DEST as one molt adapter file (HDF5). A PEFT DEST must not exist or be\n"
    "  empty; --force replaces it whole. DEST may not be, hold or lie inside DIR or SRC.\n";

static const char merge_usage[] =
    "usage: molt merge --model DIR --adapter A --out DIR2 [--dtype bf16|f32] [--force]\n"
    "  A is a PEFT directory or a molt adapter file. DIR2 gets config.json and\n"
    "  model.safetensors (Hugging Face layout) and a copy of DIR's tokenizer files.\n"
    "  DIR2 must not exist or be empty; --force replaces it whole. It may not be, hold or\n"
    "  lie inside DIR or A.\n";

typedef struct {
    const char *model, *adapter, *out, *format, *base_name, *dtype;
    const char *spec, *b_std, *b_seed;
    bool force;
} cli_opts;

static int fail(const char *cmd) {
    fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
    return 1;
}

// The adapter to export: loaded from --adapter, or made from --spec (B from --b-std/--b-seed).
static molt_status fresh_or_load(mdl_model *m, const cli_opts *o, lora_adapter *ad) {
    if (o->adapter)
        return lora_load_any(m, o->adapter, false, ad);
    lora_spec spec;
    MOLT_TRY(lora_spec_parse(o->spec, &spec));
    char *end = NULL;
    double std = o->b_std ? strtod(o->b_std, &end) : 0;
    unsigned long long seed = o->b_seed ? strtoull(o->b_seed, &end, 10) : spec.seed + 1;
    if (end && *end)
        return molt_err(MOLT_EARG, "--b-std / --b-seed: bad number '%s'", end);
    MOLT_TRY(lora_attach(m, &spec, false, ad));
    if (std != 0)
        lora_randomize_b(ad, seed, std);
    return MOLT_OK;
}

// Refuses an --out that is, holds or lies inside --model or --adapter.
static molt_status check_outputs(const cli_opts *o) {
    MOLT_TRY(molt_check_overlap("--out", o->out, "--model", o->model));
    return molt_check_overlap("--out", o->out, "--adapter", o->adapter);
}

// A PEFT directory, built beside --out and swapped in whole (a non-empty --out only with
// --force).
static molt_status export_dir(const lora_adapter *ad, const cli_opts *o) {
    molt_outdir d;
    MOLT_TRY(molt_outdir_begin(&d, o->out, o->force, "--out"));
    molt_status st = lora_export_peft(ad, d.tmp, o->base_name);
    if (st == MOLT_OK)
        return molt_outdir_commit(&d);
    molt_outdir_abort(&d);
    return st;
}

int lora_cmd_export(int argc, char **argv) {
    const char *cmd = "molt export";
    cli_opts o = {0};
    const molt_opt opts[] = {MOLT_OPT("--model", &o.model),   MOLT_OPT("--adapter", &o.adapter),
                             MOLT_OPT("--out", &o.out),       MOLT_OPT("--format", &o.format),
                             MOLT_OPT("--base-name", &o.base_name), MOLT_OPT("--spec", &o.spec),
                             MOLT_OPT("--b-std", &o.b_std),   MOLT_OPT("--b-seed", &o.b_seed),
                             MOLT_OPT_FLAG("--force", &o.force), MOLT_OPT_END};
    int rc = molt_opts_parse(cmd, export_usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc < 0 ? 0 : rc;
    static const char *const formats[] = {"peft", "molt"};
    int fmt_i = 0;
    if (!molt_opt_choice(cmd, "--format", o.format, formats, 2, &fmt_i))
        return 2;
    const char *fmt = formats[fmt_i];
    if (!o.model || !o.out || !o.adapter == !o.spec)
        return molt_opt_usage_error(cmd, "--model, --out and one of --adapter, --spec are "
                                    "required");
    if (check_outputs(&o) != MOLT_OK)
        return fail(cmd);
    mdl_model m = {0};
    lora_adapter ad;
    // the model supplies shapes only: a pre-quantized base does as well
    if (mdl_load_quant(o.model, NULL, &m) != MOLT_OK)
        return fail(cmd);
    if (fresh_or_load(&m, &o, &ad) != MOLT_OK) {
        mdl_free(&m);
        return fail(cmd);
    }
    lora_print_table(&ad, stdout);
    molt_status st = !strcmp(fmt, "peft") ? export_dir(&ad, &o) : lora_save(&ad, o.out);
    lora_detach(&ad);
    mdl_free(&m);
    if (st != MOLT_OK)
        return fail(cmd);
    printf("wrote %s (%s)\n", o.out, fmt);
    return 0;
}

// Copies an optional file of the model directory.
static molt_status copy_optional(const char *from, const char *to) {
    return access(from, F_OK) == 0 ? molt_copy_file(from, to) : MOLT_OK;
}

// config.json of the merged model: the base's, with its dtype set to the written one.
static molt_status write_config(const char *model_dir, const char *out_dir, bool bf16) {
    char from[PATH_CAP], to[PATH_CAP];
    snprintf(from, sizeof from, "%s/config.json", model_dir);
    snprintf(to, sizeof to, "%s/config.json", out_dir);
    json_error_t je;
    json_t *c = json_load_file(from, 0, &je);
    if (!c)
        return molt_err(MOLT_EFORMAT, "%s: %s", from, je.text);
    json_t *tc = json_object_get(c, "text_config");
    const char *dt = bf16 ? "bfloat16" : "float32";
    json_object_set_new(c, "dtype", json_string(dt));
    if (json_is_object(tc))
        json_object_set_new(tc, "dtype", json_string(dt));
    char *text = json_dumps(c, JSON_INDENT(2));
    json_decref(c);
    if (!text)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", to);
    molt_status st = molt_write_atomic(to, text, strlen(text));
    free(text); // from jansson
    return st;
}

// Writes the merged model into dir (the output directory's temporary).
static molt_status write_merged(const mdl_model *m, const cli_opts *o, const char *dir,
                                bool bf16) {
    MOLT_TRY(write_config(o->model, dir, bf16));
    static const char *tok[] = {"tekken.json", "tokenizer.json", "tokenizer_config.json",
                                "generation_config.json"};
    char from[PATH_CAP], to[PATH_CAP];
    for (size_t i = 0; i < sizeof tok / sizeof *tok; i++) {
        snprintf(from, sizeof from, "%s/%s", o->model, tok[i]);
        snprintf(to, sizeof to, "%s/%s", dir, tok[i]);
        MOLT_TRY(copy_optional(from, to));
    }
    mdl_save_opts so = {.layout = MDL_LAYOUT_HF, .dtype = bf16 ? MDL_SAVE_BF16 : MDL_SAVE_F32,
                        .wrapped = m->wrapped};
    snprintf(to, sizeof to, "%s/model.safetensors", dir);
    return mdl_save(m, to, &so);
}

// The base to merge into, in F32: a pre-quantized base (molt quantize) is dequantized, and
// the merged weights then carry its quantization error.
static molt_status load_base(const char *dir, mdl_model *m) {
    MOLT_TRY(mdl_load_quant(dir, NULL, m));
    if (m->n_qw == 0)
        return MOLT_OK;
    fprintf(stderr, "molt merge: %s is a pre-quantized base: its weights are dequantized to F32 "
            "for the merge (the result keeps their quantization error)\n", dir);
    return mdl_dequantize(m);
}

// Refuses merged weights that overflowed (an adapter of huge values).
static molt_status check_merged(const lora_adapter *ad) {
    for (int i = 0; i < ad->n_units; i++) {
        const lora_unit *u = &ad->units[i];
        const float *w = u->base ? u->base->data : NULL;
        for (int64_t k = 0; w && k < u->base->numel; k++)
            if (!isfinite(w[k]))
                return molt_err(MOLT_EARG, "merge: %s overflows (a non-finite weight at element "
                                "%lld): the adapter's values are too large; nothing was written",
                                u->path, (long long)k);
    }
    return MOLT_OK;
}

int lora_cmd_merge(int argc, char **argv) {
    const char *cmd = "molt merge";
    cli_opts o = {0};
    const molt_opt opts[] = {MOLT_OPT("--model", &o.model), MOLT_OPT("--adapter", &o.adapter),
                             MOLT_OPT("--out", &o.out),     MOLT_OPT("--dtype", &o.dtype),
                             MOLT_OPT_FLAG("--force", &o.force), MOLT_OPT_END};
    int rc = molt_opts_parse(cmd, merge_usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc < 0 ? 0 : rc;
    static const char *const dtypes[] = {"f32", "bf16"};
    int dt_i = 0;
    if (!molt_opt_choice(cmd, "--dtype", o.dtype, dtypes, 2, &dt_i))
        return 2;
    const char *dt = dtypes[dt_i];
    if (!o.model || !o.adapter || !o.out)
        return molt_opt_usage_error(cmd, "--model, --adapter and --out are required");
    if (check_outputs(&o) != MOLT_OK)
        return fail(cmd);
    mdl_model m = {0};
    lora_adapter ad;
    molt_outdir d = {0};
    // the output directory is checked before the (long) load and merge
    molt_status st = molt_outdir_begin(&d, o.out, o.force, "--out");
    if (st == MOLT_OK)
        st = load_base(o.model, &m);
    if (st == MOLT_OK)
        st = lora_load_any(&m, o.adapter, false, &ad);
    if (st == MOLT_OK) {
        lora_print_table(&ad, stdout);
        st = lora_merge_into(&ad);
    }
    if (st == MOLT_OK)
        st = check_merged(&ad);
    if (st == MOLT_OK)
        st = write_merged(&m, &o, d.tmp, !strcmp(dt, "bf16"));
    if (st == MOLT_OK)
        st = molt_outdir_commit(&d);
    else
        molt_outdir_abort(&d);
    mdl_free(&m);
    if (st != MOLT_OK)
        return fail(cmd);
    printf("wrote %s/model.safetensors (%s)\n", o.out, dt);
    return 0;
}
