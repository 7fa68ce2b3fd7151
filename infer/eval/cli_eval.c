// infer/eval/cli_eval.c: `molt eval`: options and the YAML suite file turned into an
// ev_run_opts, then ev_run. A suite lists datasets under `datasets.NAME.*` and adapters under
// `adapters.NAME`; --set KEY=VALUE overrides a key as molt train's does; command-line flags
// win over both. Not here: running (run.c).
#include "run_internal.h"

#include "../../autograd/comm/comm.h"
#include "../../common/opt.h"
#include "../../common/yamlkv.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CMD "molt eval"

static const char usage[] =
    "usage: molt eval --model DIR [--base-quant SPEC] [--tokenizer FILE] [--base]\n"
    "                 [--adapter NAME=PATH ...] (--data FILE ... | --config SUITE.yaml)\n"
    "                 [--task loss|choice|generate] [--metrics M1,M2] [--max-tokens N]\n"
    "                 [--stop TEXT ...] [--temperature T] [--baseline NAME] [--limit N]\n"
    "                 [--seed S] [--resamples N] [--on-bad-record stop|skip] [--out DIR]\n"
    "                 [--set KEY=VALUE ...] [--kv-cache-mib N] [--max-batch-tokens N] [--quiet]\n"
    "\n"
    "Scores the base model (--base, named \"base\") and every adapter (a PEFT directory, a molt\n"
    "adapter file or a training checkpoint step-N.h5) on every dataset in one run: one base in\n"
    "memory, each engine step one batched forward over requests of all systems. Compares each\n"
    "system with the baseline (default: base when given, else the first adapter): means with\n"
    "95% bootstrap intervals, the paired difference with its interval and p-value (McNemar's\n"
    "exact test for 0/1 metrics, Holm-corrected over several comparisons), win/tie/loss.\n"
    "\n"
    "Tasks (--task, default loss):\n"
    "  loss      any training record (chat, alpaca, completion, text) through the training\n"
    "            template and loss mask: per-example mean NLL of the trained tokens (\"loss\");\n"
    "            the summary adds the token-weighted loss and perplexity per system\n"
    "  choice    {\"prompt\" | \"messages\", \"choices\": [...], \"answer\": i}: acc and acc_norm\n"
    "            (lm-evaluation-harness' definitions); each context computed once per system\n"
    "  generate  a chat ending with the reference assistant turn, or alpaca/completion:\n"
    "            --metrics exact_match[:case+space+punct+articles|:squad], contains,\n"
    "            regex=PATTERN, token_f1[:squad], json_valid, json_field=PATH (default\n"
    "            exact_match); --max-tokens (64), --stop strings, --temperature (0 = greedy)\n"
    "Records may carry \"id\" and \"category\" (per-category tables).\n"
    "\n"
    "--out DIR writes report.md, report.json, samples.jsonl and report.html (charts). A suite\n"
    "file holds the same settings as keys: model, base_quant, tokenizer, base, baseline, limit,\n"
    "seed, resamples, on_bad_record, out, kv_cache_mib, max_batch_tokens, adapters.NAME: PATH,\n"
    "and per dataset datasets.NAME.{path, task, metrics, max_tokens, stop, temperature, top_k,\n"
    "top_p, seed}; --set KEY=VALUE sets one key (lists as [a, b] or a,b).\n"
    "\n"
    "Under mpirun (or srun) with N ranks, example i runs on rank i %% N and rank 0 writes the\n"
    "report (the same files as one process). parallel.expert=E (--set) splits the routed\n"
    "experts over groups of E ranks (each holds 1/E of them; the group's engines step\n"
    "together); parallel.data defaults to N / E; parallel.timeout_s (300) bounds every wait\n"
    "on another rank.\n";

// Everything the options and the suite file give, as text until checked.
typedef struct {
    const char *key;
    const char *value;
} setting;

typedef struct {
    setting *kv;
    int n, cap;
    char **owned;
    int n_owned, cap_owned;
} settings;

static char *own(settings *s, const char *v) {
    if (s->n_owned == s->cap_owned) {
        int cap = s->cap_owned ? 2 * s->cap_owned : 32;
        char **o = molt_realloc(s->owned, (size_t)cap * sizeof *o);
        if (!o)
            return NULL;
        s->owned = o;
        s->cap_owned = cap;
    }
    char *c = molt_strdup(v);
    if (c)
        s->owned[s->n_owned++] = c;
    return c;
}

static void settings_free(settings *s) {
    for (int i = 0; i < s->n_owned; i++)
        molt_free(s->owned[i]);
    molt_free(s->owned);
    molt_free(s->kv);
}

// Sets key (replacing an earlier value unless `append`: lists keep every value).
static molt_status set(settings *s, const char *key, const char *value, bool append) {
    const char *k = own(s, key), *v = own(s, value);
    if (!k || !v)
        return molt_err(MOLT_ENOMEM, "eval: out of memory");
    for (int i = 0; !append && i < s->n; i++)
        if (!strcmp(s->kv[i].key, key)) {
            s->kv[i].value = v;
            return MOLT_OK;
        }
    if (s->n == s->cap) {
        int cap = s->cap ? 2 * s->cap : 32;
        setting *n = molt_realloc(s->kv, (size_t)cap * sizeof *n);
        if (!n)
            return molt_err(MOLT_ENOMEM, "eval: out of memory");
        s->kv = n;
        s->cap = cap;
    }
    s->kv[s->n++] = (setting){k, v};
    return MOLT_OK;
}

static const char *get(const settings *s, const char *key) {
    const char *v = NULL;
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->kv[i].key, key))
            v = s->kv[i].value;
    return v;
}

// Keys a list may hold several values of.
static bool is_list_key(const char *key) {
    size_t n = strlen(key);
    return (n > 8 && !strcmp(key + n - 8, ".metrics")) || (n > 5 && !strcmp(key + n - 5, ".stop"));
}

// Whether a suite key exists (datasets.NAME.FIELD with a known field).
static bool known_key(const char *key) {
    static const char *const top[] = {"model", "base_quant", "tokenizer", "base", "baseline",
                                      "limit", "seed", "resamples", "on_bad_record", "out",
                                      "kv_cache_mib", "max_batch_tokens", "parallel.data",
                                      "parallel.expert", "parallel.timeout_s"};
    static const char *const field[] = {"path", "task", "metrics", "max_tokens", "stop",
                                        "temperature", "top_k", "top_p", "seed"};
    if (!strncmp(key, "adapters.", 9))
        return key[9] != 0;
    if (!strncmp(key, "datasets.", 9)) {
        const char *dot = strchr(key + 9, '.');
        for (size_t i = 0; dot && dot > key + 9 && i < sizeof field / sizeof *field; i++)
            if (!strcmp(dot + 1, field[i]))
                return true;
        return false;
    }
    for (size_t i = 0; i < sizeof top / sizeof *top; i++)
        if (!strcmp(key, top[i]))
            return true;
    return false;
}

static molt_status yaml_leaf(void *user, ykv_event ev, const char *key, const char *value,
                             const char *where) {
    settings *s = user;
    if (!known_key(key))
        return molt_err(MOLT_EARG, "config %s: unknown key '%s' (run 'molt eval --help')", where,
                        key);
    if (ev == YKV_LIST_BEGIN) {
        if (!is_list_key(key))
            return molt_err(MOLT_EARG, "config %s: key '%s' takes one value", where, key);
        return MOLT_OK;
    }
    return set(s, key, value, ev == YKV_LIST_ITEM);
}

// ---- options --------------------------------------------------------------------------------------

typedef struct {
    settings *s;
    int n_data;
} cli;

static int add_adapter(void *user, const char *v) {
    cli *c = user;
    const char *eq = strchr(v, '=');
    if (!eq || eq == v || !eq[1]) {
        fprintf(stderr, CMD ": --adapter '%s' is not NAME=PATH\n", v);
        return 2;
    }
    char key[300];
    snprintf(key, sizeof key, "adapters.%.*s", (int)(eq - v), v);
    return set(c->s, key, eq + 1, false) == MOLT_OK ? 0 : 2;
}

static int add_data(void *user, const char *v) {
    cli *c = user;
    char key[64];
    snprintf(key, sizeof key, "datasets.cli%02d.path", c->n_data++);
    return set(c->s, key, v, false) == MOLT_OK ? 0 : 2;
}

static int add_stop(void *user, const char *v) {
    cli *c = user;
    return set(c->s, "cli.stop", v, true) == MOLT_OK ? 0 : 2;
}

static int add_set(void *user, const char *v) {
    cli *c = user;
    const char *eq = strchr(v, '=');
    if (!eq || eq == v) {
        fprintf(stderr, CMD ": --set '%s' is not KEY=VALUE\n", v);
        return 2;
    }
    char key[300];
    snprintf(key, sizeof key, "%.*s", (int)(eq - v), v);
    if (!known_key(key)) {
        fprintf(stderr, CMD ": --set: unknown key '%s' (run 'molt eval --help')\n", key);
        return 2;
    }
    const char *val = eq + 1;
    if (!is_list_key(key))
        return set(c->s, key, val, false) == MOLT_OK ? 0 : 2;
    // a list: [a, b] or a,b
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", val);
    char *p = buf;
    size_t n = strlen(p);
    if (n >= 2 && p[0] == '[' && p[n - 1] == ']') {
        p[n - 1] = 0;
        p++;
    }
    for (int i = 0; i < c->s->n; i++) // the new list replaces the old one
        if (!strcmp(c->s->kv[i].key, key))
            c->s->kv[i].key = "";
    for (char *tok = strtok(p, ","); tok; tok = strtok(NULL, ",")) {
        while (*tok == ' ')
            tok++;
        char *end = tok + strlen(tok);
        while (end > tok && end[-1] == ' ')
            *--end = 0;
        if (*tok && set(c->s, key, tok, true) != MOLT_OK)
            return 2;
    }
    return 0;
}

// ---- from settings to run options ---------------------------------------------------------------

static int bad(const char *fmt, const char *a, const char *b) {
    fprintf(stderr, CMD ": ");
    fprintf(stderr, fmt, a, b);
    fputc('\n', stderr);
    return 2;
}

// The distinct dataset names of keys datasets.NAME.*, in first-seen order.
static int dataset_names(const settings *s, char names[][128], int cap) {
    int n = 0;
    for (int i = 0; i < s->n; i++) {
        const char *k = s->kv[i].key;
        if (strncmp(k, "datasets.", 9))
            continue;
        const char *dot = strchr(k + 9, '.');
        if (!dot)
            continue;
        char name[128];
        snprintf(name, sizeof name, "%.*s", (int)(dot - (k + 9)), k + 9);
        bool seen = false;
        for (int j = 0; j < n && !seen; j++)
            seen = !strcmp(names[j], name);
        if (!seen && n < cap)
            snprintf(names[n++], 128, "%s", name);
    }
    return n;
}

static const char *dget(const settings *s, const char *ds, const char *field, const char *dflt) {
    char key[300];
    snprintf(key, sizeof key, "datasets.%s.%s", ds, field);
    const char *v = get(s, key);
    return v ? v : dflt;
}

// Every value of a list key.
static int dlist(const settings *s, const char *ds, const char *field, const char **out,
                 int cap) {
    char key[300];
    snprintf(key, sizeof key, "datasets.%s.%s", ds, field);
    int n = 0;
    for (int i = 0; i < s->n && n < cap; i++)
        if (!strcmp(s->kv[i].key, key))
            out[n++] = s->kv[i].value;
    return n;
}

static int fill_dataset(const settings *s, const char *name, const settings *cli_defaults,
                        ev_data_spec *d) {
    (void)cli_defaults;
    memset(d, 0, sizeof *d);
    bool from_cli = !strncmp(name, "cli", 3);
    d->path = dget(s, name, "path", NULL);
    if (!d->path)
        return bad("dataset '%s' has no path%s", name, "");
    d->name = from_cli ? d->path : name;
    const char *task = dget(s, name, "task", get(s, "task"));
    if (ev_task_parse(task ? task : "loss", &d->task) != MOLT_OK)
        return bad("%s (dataset %s)", molt_err_msg(), name);
    d->n_metrics = dlist(s, name, "metrics", d->metrics, EV_MAX_METRICS);
    if (d->n_metrics == 0) {
        for (int i = 0; i < s->n && d->n_metrics < EV_MAX_METRICS; i++)
            if (!strcmp(s->kv[i].key, "cli.metrics"))
                d->metrics[d->n_metrics++] = s->kv[i].value;
    }
    d->n_stop = dlist(s, name, "stop", d->stop, EV_MAX_STOP);
    if (d->n_stop == 0)
        for (int i = 0; i < s->n && d->n_stop < EV_MAX_STOP; i++)
            if (!strcmp(s->kv[i].key, "cli.stop"))
                d->stop[d->n_stop++] = s->kv[i].value;
    int64_t mt = 64, tk = 0;
    double temp = 0, tp = 1;
    uint64_t seed = 0;
    if (!molt_opt_int(CMD, "max_tokens", dget(s, name, "max_tokens", get(s, "max_tokens")), 1,
                      1 << 20, &mt) ||
        !molt_opt_double(CMD, "temperature", dget(s, name, "temperature", get(s, "temperature")),
                         0, 100, &temp) ||
        !molt_opt_int(CMD, "top_k", dget(s, name, "top_k", NULL), 0, 1 << 30, &tk) ||
        !molt_opt_double(CMD, "top_p", dget(s, name, "top_p", NULL), 1e-9, 1, &tp) ||
        !molt_opt_uint64(CMD, "seed", dget(s, name, "seed", get(s, "seed")), &seed))
        return 2;
    d->max_tokens = (int)mt;
    d->temperature = temp;
    d->top_k = (int)tk;
    d->top_p = tp;
    d->seed = seed;
    if (d->task != EV_TASK_GENERATE && (d->n_stop || dget(s, name, "max_tokens", NULL)))
        return bad("dataset %s: stop and max_tokens are for the generate task%s", name, "");
    if (d->task != EV_TASK_GENERATE && d->n_metrics && !from_cli)
        return bad("dataset %s: metrics are chosen for the generate task only (loss and choice "
                   "have fixed metrics)%s", name, "");
    if (d->task != EV_TASK_GENERATE)
        d->n_metrics = 0;
    return 0;
}

static int to_opts(const settings *s, ev_run_opts *o, char names[][128]) {
    ev_run_opts_default(o);
    o->model_dir = get(s, "model");
    if (!o->model_dir)
        return molt_opt_usage_error(CMD, "--model DIR (or the suite key model) is required");
    o->base_quant = get(s, "base_quant");
    o->tokenizer = get(s, "tokenizer");
    const char *base = get(s, "base");
    o->base = base && (!strcmp(base, "true") || !strcmp(base, "1") || !strcmp(base, "yes"));
    if (base && !o->base && strcmp(base, "false") && strcmp(base, "0") && strcmp(base, "no"))
        return bad("base '%s' is not true or false%s", base, "");
    for (int i = 0; i < s->n; i++) {
        if (strncmp(s->kv[i].key, "adapters.", 9) || !*s->kv[i].key)
            continue;
        const char *name = s->kv[i].key + 9;
        int at = -1;
        for (int j = 0; j < o->n_adapters; j++)
            if (!strcmp(o->adapter_name[j], name))
                at = j;
        if (at < 0) {
            if (o->n_adapters == EV_MAX_SYSTEMS)
                return bad("more than %s adapters%s", "64", "");
            at = o->n_adapters++;
        }
        o->adapter_name[at] = name;
        o->adapter_path[at] = s->kv[i].value;
    }
    o->baseline = get(s, "baseline");
    int64_t limit = 0, res = o->boot.n_resamples, kv = 0, mbt = 0, pd = 0, pe = 1;
    if (!molt_opt_int(CMD, "parallel.data", get(s, "parallel.data"), 1, 1 << 20, &pd) ||
        !molt_opt_int(CMD, "parallel.expert", get(s, "parallel.expert"), 1, 1 << 20, &pe) ||
        !molt_opt_double(CMD, "parallel.timeout_s", get(s, "parallel.timeout_s"), 1e-3, 1e9,
                         &o->par_timeout_s) ||
        !molt_opt_int(CMD, "limit", get(s, "limit"), 0, INT64_MAX / 2, &limit) ||
        !molt_opt_int(CMD, "resamples", get(s, "resamples"), 1, 10000000, &res) ||
        !molt_opt_uint64(CMD, "seed", get(s, "seed"), &o->boot.seed) ||
        !molt_opt_int(CMD, "kv_cache_mib", get(s, "kv_cache_mib"), 1, 1 << 20, &kv) ||
        !molt_opt_int(CMD, "max_batch_tokens", get(s, "max_batch_tokens"), 1, 1 << 20, &mbt))
        return 2;
    o->par_data = (int)pd;
    o->par_expert = (int)pe;
    o->limit = limit;
    o->boot.n_resamples = (int)res;
    o->kv_cache_mib = (int)kv;
    o->max_batch_tokens = (int)mbt;
    const char *onbad = get(s, "on_bad_record");
    static const char *const choices[] = {"stop", "skip"};
    int which = 0;
    if (!molt_opt_choice(CMD, "on_bad_record", onbad, choices, 2, &which))
        return 2;
    o->skip_bad = which == 1;
    o->out_dir = get(s, "out");
    o->n_data = dataset_names(s, names, EV_MAX_DATA);
    if (o->n_data == 0)
        return molt_opt_usage_error(CMD, "no dataset: give --data FILE or a suite with "
                                         "datasets.NAME.path");
    for (int i = 0; i < o->n_data; i++) {
        int rc = fill_dataset(s, names[i], NULL, &o->data[i]);
        if (rc)
            return rc;
    }
    return 0;
}

// The resolved configuration as a JSON object (for report.json).
static char *config_json(const ev_run_opts *o) {
    json_t *j = json_object(), *ads = json_object(), *dss = json_array();
    for (int i = 0; i < o->n_adapters; i++)
        json_object_set_new(ads, o->adapter_name[i], json_string(o->adapter_path[i]));
    for (int i = 0; i < o->n_data; i++) {
        const ev_data_spec *d = &o->data[i];
        json_t *m = json_array(), *st = json_array();
        for (int k = 0; k < d->n_metrics; k++)
            json_array_append_new(m, json_string(d->metrics[k]));
        for (int k = 0; k < d->n_stop; k++)
            json_array_append_new(st, json_string(d->stop[k]));
        json_array_append_new(dss, json_pack("{s:s, s:s, s:s, s:o, s:i, s:o, s:f, s:I}", "name",
                                             d->name, "path", d->path, "task",
                                             ev_task_name(d->task), "metrics", m, "max_tokens",
                                             d->max_tokens, "stop", st, "temperature",
                                             d->temperature, "seed", (json_int_t)d->seed));
    }
    json_object_set_new(j, "model", json_string(o->model_dir));
    json_object_set_new(j, "base_quant", o->base_quant ? json_string(o->base_quant) : json_null());
    json_object_set_new(j, "base", json_boolean(o->base));
    json_object_set_new(j, "adapters", ads);
    json_object_set_new(j, "baseline", o->baseline ? json_string(o->baseline) : json_null());
    json_object_set_new(j, "limit", json_integer(o->limit));
    json_object_set_new(j, "seed", json_integer((json_int_t)o->boot.seed));
    json_object_set_new(j, "resamples", json_integer(o->boot.n_resamples));
    json_object_set_new(j, "on_bad_record", json_string(o->skip_bad ? "skip" : "stop"));
    json_object_set_new(j, "datasets", dss);
    char *text = json_dumps(j, JSON_SORT_KEYS | JSON_COMPACT);
    json_decref(j);
    return text;
}

static void print_summary(const ev_run_opts *o, const ev_run_summary *sum) {
    for (int d = 0; d < o->n_data; d++) {
        if (o->data[d].task != EV_TASK_LOSS)
            continue;
        int si = 0;
        if (o->base)
            printf("%s: base token loss %.6f (perplexity %.4f)\n", o->data[d].name,
                   sum->token_loss[d * sum->n_systems], exp(sum->token_loss[d * sum->n_systems])),
                si = 1;
        for (int a = 0; a < o->n_adapters; a++, si++) {
            double l = sum->token_loss[d * sum->n_systems + si];
            printf("%s: %s token loss %.6f (perplexity %.4f)\n", o->data[d].name,
                   o->adapter_name[a], l, exp(l));
        }
    }
    for (int d = 0; d < o->n_data; d++)
        printf("%s: prompt tokens computed %lld (%lld from the prefix cache; one request per "
               "example and choice would compute %lld)\n", o->data[d].name,
               (long long)sum->data_computed[d], (long long)sum->data_cached[d],
               (long long)sum->data_naive[d]);
    printf("molt eval: %lld examples x %d systems in %.1f s; prompt tokens computed %lld "
           "(%lld from the prefix cache; one request per example and choice would compute "
           "%lld)%s%lld bad records skipped\n",
           (long long)sum->examples, sum->n_systems, sum->seconds,
           (long long)sum->tokens_computed, (long long)sum->tokens_cached,
           (long long)sum->tokens_naive, "; ", (long long)sum->bad);
    if (o->out_dir)
        printf("molt eval: report in %s/report.md and %s/report.html\n", o->out_dir, o->out_dir);
}

int ev_cmd_eval(int argc, char **argv) {
    settings s = {0};
    cli c = {.s = &s};
    const char *model = NULL, *bq = NULL, *tokz = NULL, *task = NULL, *metrics = NULL,
               *mt = NULL, *temp = NULL, *baseline = NULL, *limit = NULL, *seed = NULL,
               *res = NULL, *onbad = NULL, *out = NULL, *config = NULL, *kv = NULL, *mbt = NULL;
    bool base = false, quiet = false;
    // the suite file first: --set and the flags go over it
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], "--config"))
            config = argv[i + 1];
        else if (!strncmp(argv[i], "--config=", 9))
            config = argv[i] + 9;
    if (config && ykv_load(config, yaml_leaf, &s) != MOLT_OK) {
        fprintf(stderr, CMD ": %s\n", molt_err_msg());
        settings_free(&s);
        return 2;
    }
    const molt_opt opts[] = {
        MOLT_OPT("--model", &model),        MOLT_OPT("--base-quant", &bq),
        MOLT_OPT("--tokenizer", &tokz),     MOLT_OPT_FLAG("--base", &base),
        MOLT_OPT_EACH("--adapter", add_adapter), MOLT_OPT_EACH("--data", add_data),
        MOLT_OPT("--task", &task),          MOLT_OPT("--metrics", &metrics),
        MOLT_OPT("--max-tokens", &mt),      MOLT_OPT_EACH("--stop", add_stop),
        MOLT_OPT("--temperature", &temp),   MOLT_OPT("--baseline", &baseline),
        MOLT_OPT("--limit", &limit),        MOLT_OPT("--seed", &seed),
        MOLT_OPT("--resamples", &res),      MOLT_OPT("--on-bad-record", &onbad),
        MOLT_OPT("--out", &out),            MOLT_OPT("--config", &config),
        MOLT_OPT_EACH("--set", add_set),    MOLT_OPT("--kv-cache-mib", &kv),
        MOLT_OPT("--max-batch-tokens", &mbt), MOLT_OPT_FLAG("--quiet", &quiet),
        MOLT_OPT_END};
    int rc = molt_opts_parse(CMD, usage, opts, argc, argv, 1, &c);
    struct {
        const char *key, *v;
    } flags[] = {{"model", model},         {"base_quant", bq},     {"tokenizer", tokz},
                 {"task", task},           {"max_tokens", mt},     {"temperature", temp},
                 {"baseline", baseline},   {"limit", limit},       {"seed", seed},
                 {"resamples", res},       {"on_bad_record", onbad}, {"out", out},
                 {"kv_cache_mib", kv},     {"max_batch_tokens", mbt}};
    for (size_t i = 0; rc == 0 && i < sizeof flags / sizeof *flags; i++)
        if (flags[i].v && set(&s, flags[i].key, flags[i].v, false) != MOLT_OK)
            rc = 2;
    if (rc == 0 && base && set(&s, "base", "true", false) != MOLT_OK)
        rc = 2;
    if (rc == 0 && metrics) {
        char buf[4096];
        snprintf(buf, sizeof buf, "%s", metrics);
        for (char *t = strtok(buf, ","); t && rc == 0; t = strtok(NULL, ","))
            if (set(&s, "cli.metrics", t, true) != MOLT_OK)
                rc = 2;
    }
    ev_run_opts *o = rc == 0 ? molt_calloc(1, sizeof *o) : NULL;
    char (*names)[128] = rc == 0 ? molt_calloc(EV_MAX_DATA, sizeof *names) : NULL;
    if (rc == 0 && (!o || !names))
        rc = 1;
    if (rc == 0)
        rc = to_opts(&s, o, names);
    char *cfg = NULL;
    ag_comm *world = NULL;
    if (rc == 0 && ag_comm_world(o->par_timeout_s, &world) != MOLT_OK) {
        fprintf(stderr, CMD ": %s\n", molt_err_msg());
        rc = 1;
    }
    if (rc == 0) {
        o->progress = !quiet;
        o->world = world;
        cfg = config_json(o);
        o->config_json = cfg;
        ev_run_summary sum;
        if (ev_run(o, &sum) != MOLT_OK) {
            char why[1024];
            snprintf(why, sizeof why, CMD ": %s", molt_err_msg());
            if (ag_comm_size(world) > 1) // the other ranks would wait for this one
                ag_comm_abort(world, 1, why);
            fprintf(stderr, "%s\n", why);
            rc = 1;
        } else if (sum.rank == 0) {
            print_summary(o, &sum);
        }
    }
    ag_comm_free(world);
    free(cfg);
    molt_free(o);
    molt_free(names);
    settings_free(&s);
    return rc < 0 ? 0 : rc;
}
