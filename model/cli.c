// model/cli.c: the model module's commands: `molt init-model` (a random model directory
// from a preset) and `molt forward` (logits of token sequences into a safetensors file).
// Argument parsing and messages only; the work is in init_model.c and forward.c.
// Exit status: 0 success, 1 failure, 2 bad usage.
#include "model.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Value of option argv[*i] (advancing *i), or NULL with a message when it is missing.
static const char *opt_value(int argc, char **argv, int *i, const char *cmd) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "%s: %s needs a value\n", cmd, argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

static bool parse_u64(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    if (!s || !*s || *s == '-')
        return false;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end)
        return false;
    *out = (uint64_t)v;
    return true;
}

// ---------------------------------------------------------------------------------------
// molt init-model

static const char init_usage[] =
    "usage: molt init-model --preset NAME --out DIR [--seed S] [--dtype f32|bf16|fp8]\n"
    "                       [--layout hf|per-expert|mistral] [--tokenizer FILE | --no-tokenizer]\n"
    "                       [--max-gb N]\n"
    "Writes a randomly initialized model (config.json, weights, tekken.json) in Hugging Face\n"
    "layout. NAME is a preset of configs/models (tiny, tiny-grouped, small, mistral-small-4)\n"
    "or a path to a config.json. Weights are normal(0, initializer_range), norms 1; the same\n"
    "seed gives the same file. --dtype fp8: E4M3 with a per-tensor scale (lm_head,\n"
    "embeddings, norms and router in bf16). --layout: fused experts (hf), one matrix per\n"
    "expert (per-expert), or Mistral's consolidated names (mistral).\n";

static bool parse_dtype(const char *s, mdl_save_dtype *dt) {
    static const char *const names[] = {"f32", "bf16", "fp8"};
    for (int i = 0; i < 3; i++)
        if (strcmp(s, names[i]) == 0) {
            *dt = (mdl_save_dtype)i;
            return true;
        }
    return false;
}

static bool parse_layout(const char *s, mdl_layout *l) {
    static const char *const names[] = {"hf", "per-expert", "mistral"};
    for (int i = 0; i < 3; i++)
        if (strcmp(s, names[i]) == 0) {
            *l = (mdl_layout)i;
            return true;
        }
    return false;
}

// One option of init-model; returns 0 when handled, 2 on bad usage.
static int init_option(int argc, char **argv, int *i, mdl_init_opts *o) {
    const char *a = argv[*i], *cmd = "molt init-model";
    if (strcmp(a, "--no-tokenizer") == 0) {
        o->no_tokenizer = true;
        return 0;
    }
    static const char *const with_value[] = {"--preset", "--out",    "--tokenizer", "--seed",
                                             "--dtype",  "--layout", "--max-gb"};
    bool known = false;
    for (size_t k = 0; k < sizeof with_value / sizeof *with_value; k++)
        known |= strcmp(a, with_value[k]) == 0;
    if (!known) {
        fprintf(stderr, "%s: unknown option '%s'\n%s", cmd, a, init_usage);
        return 2;
    }
    const char *v = opt_value(argc, argv, i, cmd);
    if (!v)
        return 2;
    if (strcmp(a, "--preset") == 0)
        o->preset = v;
    else if (strcmp(a, "--out") == 0)
        o->out_dir = v;
    else if (strcmp(a, "--tokenizer") == 0)
        o->tokenizer = v;
    else if (strcmp(a, "--seed") == 0) {
        if (!parse_u64(v, &o->seed)) {
            fprintf(stderr, "%s: --seed '%s' is not a non-negative integer\n", cmd, v);
            return 2;
        }
    } else if (strcmp(a, "--dtype") == 0) {
        if (!parse_dtype(v, &o->save.dtype)) {
            fprintf(stderr, "%s: --dtype '%s' is not one of f32, bf16, fp8\n", cmd, v);
            return 2;
        }
    } else if (strcmp(a, "--layout") == 0) {
        if (!parse_layout(v, &o->save.layout)) {
            fprintf(stderr, "%s: --layout '%s' is not one of hf, per-expert, mistral\n", cmd, v);
            return 2;
        }
    } else {
        char *end;
        o->max_gb = strtod(v, &end);
        if (*end || !(o->max_gb > 0)) {
            fprintf(stderr, "%s: --max-gb '%s' is not a positive number\n", cmd, v);
            return 2;
        }
    }
    return 0;
}

int mdl_cmd_init_model(int argc, char **argv) {
    mdl_init_opts o = {.save = {.layout = MDL_LAYOUT_HF, .dtype = MDL_SAVE_F32}};
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(init_usage, stdout);
            return 0;
        }
        int rc = init_option(argc, argv, &i, &o);
        if (rc)
            return rc;
    }
    if (!o.preset || !o.out_dir) {
        fprintf(stderr, "molt init-model: --preset and --out are required\n%s", init_usage);
        return 2;
    }
    if (o.tokenizer && o.no_tokenizer) {
        fprintf(stderr, "molt init-model: --tokenizer and --no-tokenizer exclude each other\n");
        return 2;
    }
    if (mdl_init_model(&o) != MOLT_OK) {
        fprintf(stderr, "molt init-model: %s\n", molt_err_msg());
        return 1;
    }
    printf("wrote %s (preset %s, seed %llu)\n", o.out_dir, o.preset, (unsigned long long)o.seed);
    return 0;
}

// ---------------------------------------------------------------------------------------
// molt forward

static const char fwd_usage[] =
    "usage: molt forward --model DIR --tokens FILE --out FILE.safetensors [--adapter A]\n"
    "                    [--base-quant SPEC]\n"
    "Runs the model on each line of FILE (token ids separated by spaces or commas; blank\n"
    "lines are skipped) from position 0 and writes its F32 logits [T, V] as tensor\n"
    "logits.N, N counting the sequences from 0. --adapter: a PEFT directory or a molt\n"
    "adapter file applied to the base. --base-quant (see molt quantize --help)\n"
    "quantizes the projections on load, e.g. nf4 or nf4,attention=bf16.\n";

typedef struct {
    int32_t *ids; // all sequences back to back
    int64_t n, cap;
    int64_t *start; // [n_seq + 1] offsets into ids
    int n_seq, cap_seq;
} seqs;

static void seqs_free(seqs *s) {
    molt_free(s->ids);
    molt_free(s->start);
}

static molt_status seqs_push_id(seqs *s, int32_t id) {
    if (s->n == s->cap) {
        int64_t cap = s->cap ? 2 * s->cap : 1024;
        int32_t *p = molt_realloc(s->ids, (size_t)cap * sizeof *p);
        if (!p)
            return molt_err(MOLT_ENOMEM, "reading tokens: out of memory");
        s->ids = p;
        s->cap = cap;
    }
    s->ids[s->n++] = id;
    return MOLT_OK;
}

// Closes the current sequence (started at start[n_seq]) when it has tokens.
static molt_status seqs_end_line(seqs *s) {
    if (s->n == s->start[s->n_seq])
        return MOLT_OK;
    if (s->n_seq + 2 > s->cap_seq) {
        int cap = 2 * s->cap_seq;
        int64_t *p = molt_realloc(s->start, (size_t)cap * sizeof *p);
        if (!p)
            return molt_err(MOLT_ENOMEM, "reading tokens: out of memory");
        s->start = p;
        s->cap_seq = cap;
    }
    s->start[++s->n_seq] = s->n;
    return MOLT_OK;
}

static molt_status parse_line(seqs *s, const char *path, int lineno, char *line, int vocab) {
    char *save = NULL;
    const char *sep = " \t\r,";
    for (char *tok = strtok_r(line, sep, &save); tok; tok = strtok_r(NULL, sep, &save)) {
        char *end;
        errno = 0;
        long v = strtol(tok, &end, 10);
        if (errno || *end || end == tok)
            return molt_err(MOLT_EFORMAT, "%s:%d: '%s' is not a token id", path, lineno, tok);
        if (v < 0 || v >= vocab)
            return molt_err(MOLT_EFORMAT, "%s:%d: token %ld is outside the vocabulary [0, %d)",
                            path, lineno, v, vocab);
        MOLT_TRY(seqs_push_id(s, (int32_t)v));
    }
    return seqs_end_line(s);
}

static molt_status read_tokens(const char *path, int vocab, seqs *s) {
    memset(s, 0, sizeof *s);
    s->start = molt_calloc(16, sizeof *s->start);
    s->cap_seq = 16;
    FILE *f = fopen(path, "r");
    if (!f || !s->start) {
        if (f)
            fclose(f);
        return molt_err(f ? MOLT_ENOMEM : MOLT_EIO, "%s: cannot open", path);
    }
    char *line = NULL;
    size_t cap = 0;
    molt_status st = MOLT_OK;
    for (int lineno = 1; st == MOLT_OK && getline(&line, &cap, f) >= 0; lineno++) {
        line[strcspn(line, "\n")] = 0;
        st = parse_line(s, path, lineno, line, vocab);
    }
    free(line); // from getline
    if (st == MOLT_OK && ferror(f))
        st = molt_err(MOLT_EIO, "%s: read error", path);
    fclose(f);
    if (st == MOLT_OK && s->n_seq == 0)
        st = molt_err(MOLT_EFORMAT, "%s: no token sequences", path);
    return st;
}

// Logits of one sequence [T, V] into a new buffer *out.
static molt_status run_one(ag_ctx *c, const mdl_model *m, const int32_t *ids, int64_t T,
                           float **out) {
    ag_ctx_step_reset(c);
    ag_tensor *ti = ag_tensor_new1(&c->act, AG_I32, T), *tp = ag_tensor_new1(&c->act, AG_I32, T);
    ag_tensor *ts = ag_tensor_new1(&c->act, AG_I32, T);
    if (!ti || !tp || !ts)
        return molt_err_wrap(MOLT_ENOMEM, "forward");
    memcpy(ti->data, ids, (size_t)T * sizeof *ids);
    for (int64_t t = 0; t < T; t++)
        ((int32_t *)tp->data)[t] = (int32_t)t;
    mdl_batch b = {.ids = ti, .pos = tp, .seg = ts};
    ag_tensor *lg;
    MOLT_TRY(mdl_forward(c, m, &b, &lg));
    *out = molt_malloc((size_t)lg->numel * sizeof(float));
    if (!*out)
        return molt_err(MOLT_ENOMEM, "forward: out of memory for %lld logits",
                        (long long)lg->numel);
    memcpy(*out, lg->data, (size_t)lg->numel * sizeof(float));
    return MOLT_OK;
}

static molt_status forward_all(const mdl_model *m, const seqs *s, const char *out_path) {
    int n = s->n_seq;
    st_tensor *t = molt_calloc((size_t)n, sizeof *t);
    char (*names)[32] = molt_calloc((size_t)n, sizeof *names);
    ag_ctx c;
    molt_status st = t && names ? ag_ctx_init(&c) : molt_err(MOLT_ENOMEM, "out of memory");
    if (st != MOLT_OK) {
        molt_free(t);
        molt_free(names);
        return st;
    }
    ag_ctx_set_grad(&c, false);
    for (int i = 0; st == MOLT_OK && i < n; i++) {
        int64_t T = s->start[i + 1] - s->start[i];
        float *lg = NULL;
        st = run_one(&c, m, s->ids + s->start[i], T, &lg);
        snprintf(names[i], sizeof names[i], "logits.%d", i);
        t[i] = (st_tensor){.name = names[i], .dtype = ST_F32, .ndim = 2,
                           .shape = {T, m->cfg.vocab_size}, .data = lg};
    }
    ag_ctx_free(&c);
    if (st == MOLT_OK)
        st = st_write(out_path, t, n, NULL, 0);
    for (int i = 0; i < n; i++)
        molt_free((void *)t[i].data);
    molt_free(t);
    molt_free(names);
    return st;
}

int mdl_cmd_forward(int argc, char **argv, const mdl_adapter_hook *hook) {
    const char *model = NULL, *tokens = NULL, *out = NULL, *adapter = NULL;
    const char *cmd = "molt forward";
    mdl_qspec qspec;
    bool quant = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(fwd_usage, stdout);
            return 0;
        }
        bool known = !strcmp(a, "--model") || !strcmp(a, "--tokens") || !strcmp(a, "--out") ||
                     !strcmp(a, "--adapter") || !strcmp(a, "--base-quant");
        if (!known) {
            fprintf(stderr, "%s: unknown option '%s'\n%s", cmd, a, fwd_usage);
            return 2;
        }
        if (!(v = opt_value(argc, argv, &i, cmd)))
            return 2;
        if (strcmp(a, "--adapter") == 0) {
            if (!hook) {
                fprintf(stderr, "%s: --adapter is not available in this build\n", cmd);
                return 2;
            }
            adapter = v;
            continue;
        }
        if (strcmp(a, "--base-quant") == 0) {
            if (mdl_qspec_parse(v, &qspec) != MOLT_OK) {
                fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
                return 2;
            }
            quant = true;
            continue;
        }
        *(strcmp(a, "--model") == 0 ? &model : strcmp(a, "--tokens") == 0 ? &tokens : &out) = v;
    }
    if (!model || !tokens || !out) {
        fprintf(stderr, "%s: --model, --tokens and --out are required\n%s", cmd, fwd_usage);
        return 2;
    }
    mdl_model m;
    if (mdl_load_quant(model, quant ? &qspec : NULL, &m) != MOLT_OK) {
        fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
        return 1;
    }
    void *handle = NULL;
    if (adapter && hook->attach(&m, adapter, &handle) != MOLT_OK) {
        fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
        mdl_free(&m);
        return 1;
    }
    seqs s;
    molt_status st = read_tokens(tokens, m.cfg.vocab_size, &s);
    if (st == MOLT_OK)
        st = forward_all(&m, &s, out);
    if (st == MOLT_OK)
        printf("wrote logits of %d sequence%s (%lld tokens) to %s\n", s.n_seq,
               s.n_seq == 1 ? "" : "s", (long long)s.n, out);
    else
        fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
    seqs_free(&s);
    if (handle)
        hook->detach(handle);
    mdl_free(&m);
    return st == MOLT_OK ? 0 : 1;
}
