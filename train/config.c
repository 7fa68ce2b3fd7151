// train/config.c: the `molt train` configuration: a YAML file (nested mappings, scalars and
// lists of scalars, read with libyaml) flattened to dotted keys, then --set overrides, then
// typed values checked against a table of known keys; and the resolved config written back
// as YAML. Every error names the key and where its value came from (FILE:LINE or --set).
// The YAML file itself is walked by common/yamlkv.
//
// Not here: what the settings do (train/trainer.c), the command line (train/cli.c).
#include "trainer.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "../adapters/adapters.h"
#include "../common/yamlkv.h"

#include <yaml.h>

// Adapter keys are collected apart and turned into a compact lora spec at the end.
typedef struct {
    trn_config c;
    int r;
    double alpha, dropout;
    bool rslora;
    char init[32];
    uint64_t seed;
    bool seed_set;
    int n_targets;
    char targets[DS_MAX_INPUTS][TRN_PATH_MAX];
    char extra[TRN_SPEC_MAX];
    char spec[TRN_SPEC_MAX];
    int yaml_line[64]; // per key (keys[] index): the YAML line that set it, 0 when none
} cfg_all;

typedef enum {
    K_STR, K_LIST, K_INT, K_I64, K_U64, K_DBL, K_BOOL, K_FORMAT, K_ONBAD, K_SCHED, K_NONFINITE
} kkind;

typedef struct {
    const char *key;
    kkind kind;
    size_t off;  // offset in cfg_all
    size_t cap;  // K_STR: buffer size; K_LIST: offset of the count
    double lo;   // numeric lower bound (inclusive)
    const char *help;
} key_def;

#define F(field) offsetof(cfg_all, field)
static const key_def keys[] = {
    {"model.path", K_STR, F(c.model), TRN_PATH_MAX, 0, "base model directory"},
    {"model.quant", K_STR, F(c.quant), 256, 0, "none | nf4 | int8 | fp8 | spec"},
    {"model.tokenizer", K_STR, F(c.tokenizer), TRN_PATH_MAX, 0, "tokenizer file"},
    {"adapter.r", K_INT, F(r), 0, 1, "LoRA rank"},
    {"adapter.alpha", K_DBL, F(alpha), 0, 0, "LoRA alpha"},
    {"adapter.dropout", K_DBL, F(dropout), 0, 0, "LoRA dropout"},
    {"adapter.rslora", K_BOOL, F(rslora), 0, 0, "alpha / sqrt(r) scaling"},
    {"adapter.init", K_STR, F(init), 32, 0, "kaiming | gaussian"},
    {"adapter.seed", K_U64, F(seed), 0, 0, "init seed (default train.seed)"},
    {"adapter.targets", K_LIST, F(targets), F(n_targets), 0, "module patterns"},
    {"adapter.extra", K_STR, F(extra), TRN_SPEC_MAX, 0, "more lora spec items"},
    {"adapter.spec", K_STR, F(spec), TRN_SPEC_MAX, 0, "whole lora spec (replaces the above)"},
    {"data.train", K_LIST, F(c.train_files), F(c.n_train), 0,
     "training JSONL files; FILE@W mixes by weight W > 0 (passes per epoch)"},
    {"data.eval", K_LIST, F(c.eval_files), F(c.n_eval), 0, "evaluation JSONL files"},
    {"data.eval_split", K_DBL, F(c.eval_split), 0, 0,
     "fraction of data.train held out for eval, < 0.5 (by file name, line, train.seed)"},
    {"data.format", K_FORMAT, F(c.format), 0, 0, "auto | chat | alpaca | completion | text"},
    {"data.on_bad", K_ONBAD, F(c.on_bad), 0, 0, "stop | skip | truncate"},
    {"data.max_seq_len", K_INT, F(c.max_seq_len), 0, 2,
     "tokens per row (2 .. the model's max_position_embeddings)"},
    {"data.packing", K_BOOL, F(c.packing), 0, 0, "pack several examples per row"},
    {"data.shuffle", K_BOOL, F(c.shuffle), 0, 0, "shuffle training examples"},
    {"train.batch_size", K_INT, F(c.batch_size), 0, 1, "rows per micro-batch"},
    {"train.grad_accum", K_INT, F(c.grad_accum), 0, 1, "micro-batches per step"},
    {"train.steps", K_I64, F(c.steps), 0, 0, "optimizer steps (0: from epochs)"},
    {"train.epochs", K_DBL, F(c.epochs), 0, 0, "passes over the data"},
    {"train.seed", K_U64, F(c.seed), 0, 0, "seed"},
    {"train.activation_checkpointing", K_BOOL, F(c.activation_checkpointing), 0, 0,
     "recompute each layer in backward (less memory)"},
    {"train.on_nonfinite", K_NONFINITE, F(c.nonfinite_skip), 0, 0,
     "stop | skip: a NaN/inf loss, gradient norm or update stops training or skips the step"},
    {"train.log_every", K_INT, F(c.log_every), 0, 1, "steps between plain log lines"},
    {"optim.lr", K_DBL, F(c.lr), 0, 0, "peak learning rate"},
    {"optim.weight_decay", K_DBL, F(c.adamw.weight_decay), 0, 0, "decoupled weight decay"},
    {"optim.beta1", K_DBL, F(c.adamw.beta1), 0, 0, "AdamW beta1"},
    {"optim.beta2", K_DBL, F(c.adamw.beta2), 0, 0, "AdamW beta2"},
    {"optim.eps", K_DBL, F(c.adamw.eps), 0, 0, "AdamW epsilon"},
    {"optim.max_grad_norm", K_DBL, F(c.max_grad_norm), 0, -1e300, "clip (<= 0: off)"},
    {"schedule.kind", K_SCHED, F(c.schedule), 0, 0, "constant | linear | cosine"},
    {"schedule.warmup_steps", K_I64, F(c.warmup_steps), 0, 0, "linear warmup steps"},
    {"output_dir", K_STR, F(c.output_dir), TRN_PATH_MAX, 0, "run directory"},
    {"checkpoint.every", K_INT, F(c.ckpt_every), 0, 0, "steps between checkpoints"},
    {"checkpoint.keep_last", K_INT, F(c.keep_last), 0, 0, "checkpoints kept (0: all)"},
    {"eval.every", K_INT, F(c.eval_every), 0, 0, "steps between evaluations"},
    {"eval.max_batches", K_INT, F(c.eval_max_batches), 0, 0, "batches per eval (0: all)"},
    {"parallel.data", K_INT, F(c.par_data), 0, 0, "replicas (0: ranks / parallel.expert)"},
    {"parallel.expert", K_INT, F(c.par_expert), 0, 1, "ranks the routed experts split over"},
    {"parallel.timeout_s", K_DBL, F(c.par_timeout_s), 0, 0,
     "seconds a collective may wait before the job ends"},
};
#define N_KEYS ((int)(sizeof keys / sizeof *keys))
_Static_assert(N_KEYS <= 64, "cfg_all.yaml_line holds one line per key");

void trn_config_default(trn_config *c) {
    memset(c, 0, sizeof *c);
    snprintf(c->quant, sizeof c->quant, "none");
    c->format = DS_FORMAT_AUTO;
    c->on_bad = DS_ON_BAD_STOP;
    c->max_seq_len = 512;
    c->packing = c->shuffle = true;
    c->batch_size = c->grad_accum = 1;
    c->log_every = 10;
    opt_adamw_defaults(&c->adamw);
    c->adamw.weight_decay = 0.0;
    c->lr = 1e-4;
    c->max_grad_norm = 1.0;
    c->schedule = SCHED_LINEAR;
    c->keep_last = 3;
    c->par_expert = 1;
    c->par_timeout_s = 300;
}

static void all_default(cfg_all *a) {
    memset(a, 0, sizeof *a);
    trn_config_default(&a->c);
    a->r = 8;
    a->alpha = 16;
    snprintf(a->init, sizeof a->init, "kaiming");
}

static const key_def *find_key(const char *k) {
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(keys[i].key, k))
            return &keys[i];
    return NULL;
}

static molt_status bad_value(const key_def *k, const char *where, const char *v,
                             const char *expect) {
    return molt_err(MOLT_EARG, "config %s: key '%s': expected %s, got '%s'", where, k->key,
                    expect, v);
}

static molt_status parse_bool(const char *v, bool *out) {
    if (!strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "on") || !strcmp(v, "1"))
        *out = true;
    else if (!strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "off") || !strcmp(v, "0"))
        *out = false;
    else
        return MOLT_EARG;
    return MOLT_OK;
}

static bool parse_double(const char *v, double *out) {
    char *end;
    errno = 0;
    *out = strtod(v, &end);
    return *v && !*end && errno == 0 && isfinite(*out);
}

static bool parse_i64(const char *v, int64_t *out) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    *out = x;
    return *v && !*end && errno == 0;
}

// Stores one scalar into a non-list key.
static molt_status set_scalar(cfg_all *a, const key_def *k, const char *v, const char *where) {
    char *p = (char *)a + k->off;
    double d;
    int64_t i;
    bool b;
    switch (k->kind) {
    case K_STR:
        if (strlen(v) >= k->cap)
            return bad_value(k, where, v, "a shorter string");
        snprintf(p, k->cap, "%s", v);
        return MOLT_OK;
    case K_INT:
    case K_I64:
    case K_U64:
        if (!parse_i64(v, &i) || (double)i < k->lo || (k->kind == K_INT && i > 1000000000))
            return bad_value(k, where, v,
                             k->lo >= 2   ? "an integer >= 2 (a row holds a token and the next "
                                            "one to predict)"
                             : k->lo >= 1 ? "a positive integer"
                                          : "a non-negative integer");
        if (k->kind == K_INT)
            *(int *)p = (int)i;
        else if (k->kind == K_I64)
            *(int64_t *)p = i;
        else
            *(uint64_t *)p = (uint64_t)i;
        if (k->off == F(seed))
            a->seed_set = true;
        return MOLT_OK;
    case K_DBL:
        if (!parse_double(v, &d) || d < k->lo)
            return bad_value(k, where, v, k->lo < 0 ? "a number" : "a non-negative number");
        *(double *)p = d;
        return MOLT_OK;
    case K_BOOL:
        if (parse_bool(v, &b) != MOLT_OK)
            return bad_value(k, where, v, "true or false");
        *(bool *)p = b;
        return MOLT_OK;
    case K_FORMAT:
        if (ds_format_parse(v, (ds_format *)p) != MOLT_OK)
            return bad_value(k, where, v, "auto, chat, alpaca, completion or text");
        return MOLT_OK;
    case K_ONBAD:
        if (ds_on_bad_parse(v, (ds_on_bad *)p) != MOLT_OK)
            return bad_value(k, where, v, "stop, skip or truncate");
        return MOLT_OK;
    case K_SCHED:
        if (sched_kind_parse(v, (sched_kind *)p) != MOLT_OK)
            return bad_value(k, where, v, "constant, linear or cosine");
        return MOLT_OK;
    case K_NONFINITE:
        if (strcmp(v, "stop") && strcmp(v, "skip"))
            return bad_value(k, where, v, "stop or skip");
        *(bool *)p = !strcmp(v, "skip");
        return MOLT_OK;
    case K_LIST:
        break;
    }
    return molt_err(MOLT_EINTERNAL, "config: key '%s' is a list", k->key);
}

// Appends one item to a list key (the caller clears the list first).
static molt_status list_add(cfg_all *a, const key_def *k, const char *v, const char *where) {
    char (*items)[TRN_PATH_MAX] = (char (*)[TRN_PATH_MAX])((char *)a + k->off);
    int *n = (int *)((char *)a + k->cap);
    if (*n >= DS_MAX_INPUTS)
        return molt_err(MOLT_EARG, "config %s: key '%s': more than %d items", where, k->key,
                        DS_MAX_INPUTS);
    if (!*v || strlen(v) >= TRN_PATH_MAX)
        return bad_value(k, where, v, "a non-empty item shorter than 1024 bytes");
    snprintf(items[(*n)++], TRN_PATH_MAX, "%s", v);
    return MOLT_OK;
}

static molt_status unknown_key(const char *key, const char *where) {
    return molt_err(MOLT_EARG, "config %s: unknown key '%s' (run 'molt train --help' for the "
                    "list)", where, key);
}

// One leaf of the YAML file (common/yamlkv.h) into its key.
static molt_status yaml_leaf(void *user, ykv_event ev, const char *key, const char *v,
                             const char *where) {
    cfg_all *a = user;
    const key_def *k = find_key(key);
    if (!k)
        return unknown_key(key, where);
    if (ev != YKV_LIST_ITEM) { // the same key written two ways ("train.steps", train: {steps})
        const char *colon = strrchr(where, ':');
        int line = colon ? atoi(colon + 1) : 1, *first = &a->yaml_line[k - keys];
        if (*first)
            return molt_err(MOLT_EARG, "config %s: key '%s' is set twice (first at line %d)",
                            where, key, *first);
        *first = line > 0 ? line : 1;
    }
    switch (ev) {
    case YKV_SCALAR:
        if (k->kind != K_LIST)
            return set_scalar(a, k, v, where);
        *(int *)((char *)a + k->cap) = 0;
        return list_add(a, k, v, where);
    case YKV_LIST_BEGIN:
        if (k->kind != K_LIST)
            return molt_err(MOLT_EARG, "config %s: key '%s' takes a single value", where, key);
        *(int *)((char *)a + k->cap) = 0;
        return MOLT_OK;
    case YKV_LIST_ITEM:
        return list_add(a, k, v, where);
    }
    return molt_err(MOLT_EINTERNAL, "config %s: key '%s': unknown YAML event", where, key);
}

static molt_status load_yaml(cfg_all *a, const char *path) { return ykv_load(path, yaml_leaf, a); }

// The items of a YAML flow sequence ("[a, b]") given on the command line into list key k.
static molt_status set_flow_list(cfg_all *a, const key_def *k, const char *v,
                                 const char *where) {
    yaml_parser_t parser;
    yaml_document_t doc;
    yaml_parser_initialize(&parser);
    yaml_parser_set_input_string(&parser, (const unsigned char *)v, strlen(v));
    if (!yaml_parser_load(&parser, &doc)) {
        molt_status st = molt_err(MOLT_EARG, "config %s: key '%s': not a YAML list: %s", where,
                                  k->key, parser.problem ? parser.problem : "syntax error");
        yaml_parser_delete(&parser);
        return st;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    molt_status st = MOLT_OK;
    if (!root || root->type != YAML_SEQUENCE_NODE)
        st = molt_err(MOLT_EARG, "config %s: key '%s': expected a list such as [a, b]", where,
                      k->key);
    for (yaml_node_item_t *it = root && st == MOLT_OK ? root->data.sequence.items.start : NULL;
         it && it < root->data.sequence.items.top && st == MOLT_OK; it++) {
        yaml_node_t *in = yaml_document_get_node(&doc, *it);
        st = in->type == YAML_SCALAR_NODE
                 ? list_add(a, k, (const char *)in->data.scalar.value, where)
                 : molt_err(MOLT_EARG, "config %s: key '%s': list items must be scalars", where,
                            k->key);
    }
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    return st;
}

static molt_status apply_set(cfg_all *a, const char *kv) {
    const char *eq = strchr(kv, '=');
    char key[256], where[300];
    if (!eq || eq == kv || (size_t)(eq - kv) >= sizeof key)
        return molt_err(MOLT_EARG, "config --set '%s': expected key=value", kv);
    memcpy(key, kv, (size_t)(eq - kv));
    key[eq - kv] = 0;
    snprintf(where, sizeof where, "--set %s", kv);
    const key_def *k = find_key(key);
    if (!k)
        return unknown_key(key, where);
    const char *v = eq + 1;
    if (k->kind != K_LIST) {
        if (v[0] == '[')
            return molt_err(MOLT_EARG, "config %s: key '%s' takes a single value, not a list",
                            where, key);
        return set_scalar(a, k, v, where);
    }
    *(int *)((char *)a + k->cap) = 0;
    if (v[0] == '[') // a YAML flow list: [a, b]
        return set_flow_list(a, k, v, where);
    char item[TRN_PATH_MAX];
    while (*v) { // a comma list: a,b
        const char *c = strchr(v, ',');
        size_t n = c ? (size_t)(c - v) : strlen(v);
        snprintf(item, sizeof item, "%.*s", (int)(n < sizeof item ? n : sizeof item - 1), v);
        MOLT_TRY(list_add(a, k, item, where));
        v += n + (c ? 1 : 0);
    }
    return MOLT_OK;
}

// Builds the compact lora spec from the adapter.* keys and checks it parses.
static molt_status build_spec(cfg_all *a, const char *path) {
    trn_config *c = &a->c;
    lora_spec s;
    if (*a->spec) {
        snprintf(c->adapter, sizeof c->adapter, "%s", a->spec);
        if (lora_spec_parse(c->adapter, &s) != MOLT_OK)
            return molt_err_wrap(MOLT_EARG, "config %s: key 'adapter.spec'", path);
        return MOLT_OK;
    }
    char targets[TRN_SPEC_MAX] = "";
    size_t at = 0;
    for (int i = 0; i < a->n_targets; i++)
        at += (size_t)snprintf(targets + at, at < sizeof targets ? sizeof targets - at : 0,
                               "%s%s", i ? "+" : "", a->targets[i]);
    if (at >= sizeof targets)
        return molt_err(MOLT_EARG, "config %s: key 'adapter.targets': too long", path);
    if (!a->n_targets)
        return molt_err(MOLT_EARG, "config %s: key 'adapter.targets' is required (module "
                        "patterns such as q_a_proj, o_proj, shared_experts.up_proj)", path);
    int n = snprintf(c->adapter, sizeof c->adapter,
                     "r=%d,alpha=%.17g,dropout=%.17g,rslora=%d,init=%s,seed=%llu,targets=%s%s%s",
                     a->r, a->alpha, a->dropout, a->rslora ? 1 : 0, a->init,
                     (unsigned long long)(a->seed_set ? a->seed : c->seed), targets,
                     *a->extra ? "," : "", a->extra);
    if (n < 0 || (size_t)n >= sizeof c->adapter)
        return molt_err(MOLT_EARG, "config %s: the adapter settings are too long", path);
    if (lora_spec_parse(c->adapter, &s) != MOLT_OK)
        return molt_err_wrap(MOLT_EARG, "config %s: adapter", path);
    return MOLT_OK;
}

static molt_status check_required(const cfg_all *a, const char *path) {
    const trn_config *c = &a->c;
    if (!*c->model)
        return molt_err(MOLT_EARG, "config %s: key 'model.path' is required", path);
    if (!c->n_train)
        return molt_err(MOLT_EARG, "config %s: key 'data.train' is required", path);
    if (!*c->output_dir)
        return molt_err(MOLT_EARG, "config %s: key 'output_dir' is required", path);
    if (c->steps <= 0 && c->epochs <= 0)
        return molt_err(MOLT_EARG, "config %s: set 'train.steps' or 'train.epochs'", path);
    if (c->lr <= 0)
        return molt_err(MOLT_EARG, "config %s: key 'optim.lr' must be > 0", path);
    if (c->eval_split >= 0.5)
        return molt_err(MOLT_EARG, "config %s: key 'data.eval_split' must be below 0.5, got "
                        "%g", path, c->eval_split);
    if (!(c->par_timeout_s > 0))
        return molt_err(MOLT_EARG, "config %s: key 'parallel.timeout_s' must be > 0", path);
    if (c->eval_split > 0 && c->n_eval)
        return molt_err(MOLT_EARG, "config %s: keys 'data.eval' and 'data.eval_split' "
                        "exclude each other (set 'data.eval=' to clear the files)", path);
    char buf[TRN_PATH_MAX];
    for (int i = 0; i < c->n_train; i++) {
        ds_input in;
        if (ds_input_parse(c->train_files[i], &in, buf, sizeof buf) != MOLT_OK)
            return molt_err_wrap(MOLT_EARG, "config %s: key 'data.train'", path);
    }
    for (int i = 0; i < c->n_eval; i++) {
        ds_input in;
        if (ds_input_parse(c->eval_files[i], &in, buf, sizeof buf) != MOLT_OK)
            return molt_err_wrap(MOLT_EARG, "config %s: key 'data.eval'", path);
        if (in.weight != 1.0)
            return molt_err(MOLT_EARG, "config %s: key 'data.eval': '%s': evaluation files "
                            "take no mixing weight", path, c->eval_files[i]);
    }
    return MOLT_OK;
}

bool trn_config_has_eval(const trn_config *c) { return c->n_eval > 0 || c->eval_split > 0; }

molt_status trn_config_load(const char *path, char *const *sets, int n_sets, trn_config *c) {
    cfg_all *a = molt_malloc(sizeof *a);
    if (!a)
        return molt_err(MOLT_ENOMEM, "config %s: out of memory", path);
    all_default(a);
    molt_status st = load_yaml(a, path);
    for (int i = 0; i < n_sets && st == MOLT_OK; i++)
        st = apply_set(a, sets[i]);
    if (st == MOLT_OK)
        st = check_required(a, path);
    if (st == MOLT_OK)
        st = build_spec(a, path);
    if (st == MOLT_OK)
        *c = a->c;
    molt_free(a);
    return st;
}

// ---- resolved YAML ----------------------------------------------------------------------
typedef struct {
    char *buf;
    size_t len, cap;
    bool oom;
} sbuf;

static void put(sbuf *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(sbuf *s, const char *fmt, ...) {
    va_list ap;
    for (int tries = 0; tries < 2 && !s->oom; tries++) {
        va_start(ap, fmt);
        int n = vsnprintf(s->buf + s->len, s->cap - s->len, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if ((size_t)n < s->cap - s->len) {
            s->len += (size_t)n;
            return;
        }
        size_t cap = s->cap * 2 + (size_t)n + 1;
        char *nb = molt_realloc(s->buf, cap);
        if (!nb)
            s->oom = true;
        else
            s->buf = nb, s->cap = cap;
    }
}

// A YAML double-quoted string (paths may hold ':' or '#').
static void put_str(sbuf *s, const char *v) {
    put(s, "\"");
    for (const char *p = v; *p; p++) {
        if (*p == '"' || *p == '\\')
            put(s, "\\");
        put(s, "%c", *p);
    }
    put(s, "\"\n");
}

static void put_q(sbuf *s, const char *key, const char *v) {
    put(s, "  %s: ", key);
    put_str(s, v);
}

static void put_list(sbuf *s, const char *key, char (*items)[TRN_PATH_MAX], int n) {
    put(s, "  %s:%s\n", key, n ? "" : " []");
    for (int i = 0; i < n; i++) {
        put(s, "    - ");
        put_str(s, items[i]);
    }
}

char *trn_config_yaml(const trn_config *c) {
    sbuf s = {molt_malloc(4096), 0, 4096, false};
    if (!s.buf)
        return NULL;
    s.buf[0] = 0;
    put(&s, "model:\n");
    put_q(&s, "path", c->model);
    put_q(&s, "quant", c->quant);
    put_q(&s, "tokenizer", c->tokenizer);
    put(&s, "adapter:\n");
    put_q(&s, "spec", c->adapter);
    put(&s, "data:\n");
    put_list(&s, "train", (char (*)[TRN_PATH_MAX])c->train_files, c->n_train);
    put_list(&s, "eval", (char (*)[TRN_PATH_MAX])c->eval_files, c->n_eval);
    put(&s, "  eval_split: %.17g\n", c->eval_split);
    put(&s, "  format: %s\n  on_bad: %s\n  max_seq_len: %d\n  packing: %s\n  shuffle: %s\n",
        ds_format_name(c->format),
        c->on_bad == DS_ON_BAD_STOP ? "stop" : c->on_bad == DS_ON_BAD_SKIP ? "skip" : "truncate",
        c->max_seq_len, c->packing ? "true" : "false", c->shuffle ? "true" : "false");
    put(&s, "train:\n  batch_size: %d\n  grad_accum: %d\n  steps: %lld\n  epochs: %.17g\n"
            "  seed: %llu\n  activation_checkpointing: %s\n  log_every: %d\n"
            "  on_nonfinite: %s\n",
        c->batch_size, c->grad_accum, (long long)c->steps, c->epochs,
        (unsigned long long)c->seed, c->activation_checkpointing ? "true" : "false",
        c->log_every, c->nonfinite_skip ? "skip" : "stop");
    put(&s, "optim:\n  lr: %.17g\n  weight_decay: %.17g\n  beta1: %.17g\n  beta2: %.17g\n"
            "  eps: %.17g\n  max_grad_norm: %.17g\n",
        c->lr, c->adamw.weight_decay, c->adamw.beta1, c->adamw.beta2, c->adamw.eps,
        c->max_grad_norm);
    put(&s, "schedule:\n  kind: %s\n  warmup_steps: %lld\n", sched_kind_name(c->schedule),
        (long long)c->warmup_steps);
    put(&s, "output_dir: ");
    put_str(&s, c->output_dir);
    put(&s, "checkpoint:\n  every: %d\n  keep_last: %d\n", c->ckpt_every, c->keep_last);
    put(&s, "eval:\n  every: %d\n  max_batches: %d\n", c->eval_every, c->eval_max_batches);
    put(&s, "parallel:\n  data: %d\n  expert: %d\n  timeout_s: %.17g\n", c->par_data,
        c->par_expert, c->par_timeout_s);
    if (s.oom) {
        molt_free(s.buf);
        return NULL;
    }
    return s.buf;
}

void trn_config_print_keys(FILE *f) {
    for (int i = 0; i < N_KEYS; i++)
        fprintf(f, "  %-32s %s\n", keys[i].key, keys[i].help);
}
