// train/export.c: `molt export --checkpoint CKPT`: the adapter held by a training
// checkpoint (train/checkpoint.c) written as a PEFT directory or a molt adapter file. The
// checkpoint's resolved configuration names the base model and the LoRA spec; the adapter
// is rebuilt on that model (or on --model) and its A/B matrices are filled from the
// checkpoint's "<unit>.lora_A" / ".lora_B" tensors. Every other form of `molt export` is
// handed to lora_cmd_export (adapters/cli.c), which cannot read checkpoints because the
// adapters module sits below train/.
//
// Not here: the checkpoint format (checkpoint.c), the adapter files (adapters/peft.c for
// PEFT directories, adapters/h5.c for molt's HDF5 file).
#include "trainer.h"

#include "../adapters/adapters.h"
#include "../common/fsio.h"
#include "../common/opt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char usage[] =
    "usage: molt export --checkpoint CKPT --out DEST [--format peft|molt] [--model DIR]\n"
    "                   [--base-name NAME] [--force]\n"
    "  CKPT is a training checkpoint (output_dir/checkpoints/step-N.h5); its resolved\n"
    "  configuration supplies the base model (unless --model) and the adapter spec.\n"
    "  --base-name (default: the model path) goes into PEFT's base_model_name_or_path.\n"
    "or, for adapter files:\n";

typedef struct {
    const char *checkpoint, *out, *format, *model, *base_name;
    bool force;
} export_opts;

// Parses the --checkpoint form; returns 0, -1 after --help, or 2 after printing the problem.
static int parse(int argc, char **argv, export_opts *o) {
    const char *cmd = "molt export";
    const molt_opt opts[] = {MOLT_OPT("--checkpoint", &o->checkpoint),
                             MOLT_OPT("--out", &o->out),
                             MOLT_OPT("--format", &o->format),
                             MOLT_OPT("--model", &o->model),
                             MOLT_OPT("--base-name", &o->base_name),
                             MOLT_OPT_FLAG("--force", &o->force),
                             MOLT_OPT_END};
    static const char *const other_form[] = {"--adapter", "--spec", "--b-std", "--b-seed"};
    for (int i = 1; i < argc; i++)
        for (size_t k = 0; k < sizeof other_form / sizeof *other_form; k++) {
            size_t n = strlen(other_form[k]);
            if (!strncmp(argv[i], other_form[k], n) && (!argv[i][n] || argv[i][n] == '='))
                return molt_opt_usage_error(cmd, "option '%s' does not go with --checkpoint",
                                            other_form[k]);
        }
    int rc = molt_opts_parse(cmd, usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc;
    static const char *const formats[] = {"peft", "molt"};
    int f = 0;
    if (!molt_opt_choice(cmd, "--format", o->format, formats, 2, &f))
        return 2;
    o->format = formats[f];
    if (!o->out)
        return molt_opt_usage_error(cmd, "--checkpoint needs --out");
    return 0;
}

// The run's configuration from the checkpoint's "config.resolved" text, through a temporary
// file because the configuration reader takes a path; model_override replaces model.path.
static molt_status config_of(const ckpt_state *s, const char *file, const char *model_override,
                             trn_config *c) {
    const ckpt_blob *b = ckpt_get_blob(s, "config.resolved");
    if (!b)
        return molt_err(MOLT_EFORMAT, "checkpoint %s: no resolved configuration", file);
    const char *dir = getenv("TMPDIR");
    char tmp[TRN_PATH_MAX + 32];
    snprintf(tmp, sizeof tmp, "%s/molt-export-XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(tmp);
    if (fd < 0)
        return molt_err(MOLT_EIO, "export: cannot create a temporary file in %s",
                        dir && *dir ? dir : "/tmp");
    FILE *f = fdopen(fd, "wb");
    bool ok = f && fwrite(b->data, 1, b->len, f) == b->len;
    ok = f && fclose(f) == 0 && ok;
    if (!f)
        close(fd);
    molt_status st = ok ? MOLT_OK : molt_err(MOLT_EIO, "export: cannot write %s", tmp);
    char set[TRN_PATH_MAX + 16];
    char *sets[1] = {set};
    if (model_override)
        snprintf(set, sizeof set, "model.path=%s", model_override);
    if (st == MOLT_OK && trn_config_load(tmp, sets, model_override ? 1 : 0, c) != MOLT_OK)
        st = molt_err_wrap(MOLT_EFORMAT, "checkpoint %s: resolved configuration", file);
    remove(tmp);
    return st;
}

// Copies the checkpoint's tensor `name` into t (same element count, F32).
static molt_status fill(const ckpt_state *s, const char *file, const char *name, ag_tensor *t) {
    const ckpt_tensor *ct = ckpt_get_tensor(s, name);
    if (!ct)
        return molt_err(MOLT_EFORMAT, "checkpoint %s: no tensor '%s' (another adapter spec?)",
                        file, name);
    if (ct->numel != t->numel || t->dtype != AG_F32)
        return molt_err(MOLT_EFORMAT, "checkpoint %s: tensor '%s' has %lld elements, the "
                        "adapter %lld", file, name, (long long)ct->numel, (long long)t->numel);
    memcpy(t->data, ct->data, (size_t)t->numel * sizeof(float));
    return MOLT_OK;
}

// The adapter of checkpoint state s (read from `file`, configuration c), attached to m.
static molt_status adapter_of(const ckpt_state *s, const char *file, const trn_config *c,
                              mdl_model *m, lora_wire wire, lora_adapter *ad) {
    lora_spec spec;
    MOLT_TRY(lora_spec_parse(c->adapter, &spec));
    spec.init = LORA_INIT_ZERO; // every value comes from the checkpoint
    MOLT_TRY(lora_attach(m, &spec, wire, ad));
    char name[CKPT_NAME_MAX];
    molt_status st = MOLT_OK;
    for (int i = 0; st == MOLT_OK && i < ad->n_units; i++) {
        lora_unit *u = &ad->units[i];
        snprintf(name, sizeof name, "%.100s.lora_A", u->path);
        st = fill(s, file, name, u->a);
        snprintf(name, sizeof name, "%.100s.lora_B", u->path);
        if (st == MOLT_OK)
            st = fill(s, file, name, u->b);
    }
    if (st != MOLT_OK)
        lora_detach(ad);
    return st;
}

molt_status trn_checkpoint_adapter(mdl_model *m, const char *path, lora_wire wire,
                                   lora_adapter *out) {
    memset(out, 0, sizeof *out);
    trn_config *c = molt_malloc(sizeof *c);
    if (!c)
        return molt_err(MOLT_ENOMEM, "checkpoint %s: out of memory", path);
    ckpt_state s;
    ckpt_state_init(&s);
    molt_status st = ckpt_read(path, &s);
    if (st == MOLT_OK)
        st = config_of(&s, path, NULL, c);
    if (st == MOLT_OK)
        st = adapter_of(&s, path, c, m, wire, out);
    ckpt_state_free(&s);
    molt_free(c);
    return st;
}

// A PEFT directory, built beside --out and swapped in whole (a non-empty --out only with
// --force).
static molt_status export_dir(const lora_adapter *ad, const export_opts *o, const char *base) {
    molt_outdir d;
    MOLT_TRY(molt_outdir_begin(&d, o->out, o->force, "--out"));
    molt_status st = lora_export_peft(ad, d.tmp, base);
    if (st == MOLT_OK)
        return molt_outdir_commit(&d);
    molt_outdir_abort(&d);
    return st;
}

static int export_checkpoint(const export_opts *o) {
    trn_config *c = molt_malloc(sizeof *c);
    if (!c) {
        fprintf(stderr, "molt export: out of memory\n");
        return 1;
    }
    ckpt_state s;
    ckpt_state_init(&s);
    mdl_model m = {0};
    lora_adapter ad;
    bool attached = false;
    molt_status st = molt_check_overlap("--out", o->out, "--checkpoint", o->checkpoint);
    if (st == MOLT_OK)
        st = ckpt_read(o->checkpoint, &s);
    if (st == MOLT_OK)
        st = config_of(&s, o->checkpoint, o->model, c);
    if (st == MOLT_OK)
        st = mdl_load_quant(c->model, NULL, &m); // a pre-quantized base loads as stored
    if (st == MOLT_OK)
        attached = (st = adapter_of(&s, o->checkpoint, c, &m, LORA_WIRE_FILES, &ad)) == MOLT_OK;
    if (st == MOLT_OK)
        st = molt_check_overlap("--out", o->out, "--model", c->model);
    if (st == MOLT_OK) {
        const char *base = o->base_name ? o->base_name : c->model;
        st = !strcmp(o->format, "peft") ? export_dir(&ad, o, base) : lora_save(&ad, o->out);
    }
    if (st == MOLT_OK)
        printf("wrote %s (%s) from %s (step %lld)\n", o->out, o->format, o->checkpoint,
               (long long)s.step);
    else
        fprintf(stderr, "molt export: %s\n", molt_err_msg());
    if (attached)
        lora_detach(&ad);
    mdl_free(&m);
    ckpt_state_free(&s);
    molt_free(c);
    return st == MOLT_OK ? 0 : 1;
}

int trn_cmd_export(int argc, char **argv) {
    bool from_ckpt = false, help = false;
    for (int i = 1; i < argc; i++) {
        from_ckpt = from_ckpt || !strcmp(argv[i], "--checkpoint") ||
                    !strncmp(argv[i], "--checkpoint=", 13);
        help = help || !strcmp(argv[i], "--help") || !strcmp(argv[i], "-h");
    }
    if (help) {
        fputs(usage, stdout);
        return lora_cmd_export(argc, argv);
    }
    if (!from_ckpt)
        return lora_cmd_export(argc, argv);
    export_opts o = {0};
    int rc = parse(argc, argv, &o);
    return rc ? (rc < 0 ? 0 : rc) : export_checkpoint(&o);
}
