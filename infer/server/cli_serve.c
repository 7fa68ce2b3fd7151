// infer/server/cli_serve.c: the `molt serve` command: its flags, the same keys in a YAML file
// (--config, read with common/yamlkv; flags given on the command line win), MOLT_API_KEY,
// the engine's creation and the adapters named at start-up, the start-up lines, and the
// shutdown on SIGTERM / SIGINT (stop accepting, let running requests finish for a grace
// period, exit 0). Exit status: 0 after a clean shutdown, 1 on failure, 2 on bad usage.
// Not here: HTTP (http.c), the engine.
#include "srv_internal.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "../../common/yamlkv.h"

#define MAX_ADAPTERS 256

static const char usage_text[] =
    "usage: molt serve --model DIR [--base-quant SPEC] [--tokenizer FILE]\n"
    "                  [--adapter NAME=PATH ...] [--adapter-dir DIR] [--allow-runtime-adapters]\n"
    "                  [--max-loaded-adapters N] [--host ADDR] [--port N] [--api-key KEY]\n"
    "                  [--served-model-name NAME] [--max-model-len N] [--max-num-seqs N]\n"
    "                  [--max-batch-tokens N] [--kv-cache-mib N] [--block-tokens N]\n"
    "                  [--no-prefix-caching] [--max-body-bytes N] [--shutdown-grace-s S]\n"
    "                  [--access-log FILE|-|none] [--config FILE.yaml]\n"
    "Serves the base model and LoRA adapters over an OpenAI-compatible HTTP API:\n"
    "  GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,\n"
    "  POST /tokenize, POST /detokenize, GET /tokenizer_info, GET /metrics, and with\n"
    "  --allow-runtime-adapters POST /v1/load_lora_adapter and /v1/unload_lora_adapter.\n"
    "  --model DIR              base model (Hugging Face layout); its name in requests is\n"
    "                           --served-model-name (default: DIR as given)\n"
    "  --base-quant SPEC        quantize the base on load (see molt quantize --help)\n"
    "  --adapter NAME=PATH      an adapter requests select with \"model\": NAME: a PEFT\n"
    "                           directory, a molt adapter file or a checkpoint step-N.h5\n"
    "  --adapter-dir DIR        runtime adapters must resolve inside DIR (relative\n"
    "                           lora_path values are taken under it)\n"
    "  --allow-runtime-adapters enable the load/unload routes\n"
    "  --max-loaded-adapters N  adapters resident at once (default 16)\n"
    "  --host ADDR --port N     address to bind (default 127.0.0.1:8000; port 0: any free)\n"
    "  --api-key KEY            require Authorization: Bearer KEY on every route but\n"
    "                           /health (MOLT_API_KEY in the environment does the same)\n"
    "  --max-model-len N        prompt + generated tokens per sequence (default: the model's)\n"
    "  --max-num-seqs N         sequences in the batch (default 64)\n"
    "  --max-batch-tokens N     tokens per engine step (default 512)\n"
    "  --kv-cache-mib N         KV cache memory (default 512); --block-tokens N per block (16)\n"
    "  --no-prefix-caching      do not share identical leading prompt blocks\n"
    "  --max-body-bytes N       larger request bodies get 413 (default 1048576)\n"
    "  --shutdown-grace-s S     on SIGTERM/SIGINT, time running requests get (default 30)\n"
    "  --access-log FILE        one JSON line per request (default - = stderr; none: off)\n"
    "  --config FILE.yaml       the same keys without the dashes (port: 8000, adapter:\n"
    "                           [a=PATH, b=PATH], allow-runtime-adapters: true); flags on the\n"
    "                           command line win\n"
    "On a processor with AMX-BF16 an F32 lm_head is packed at load as bf16 hi + lo pairs and\n"
    "multiplied on AMX tiles (logits a few 1e-6 of the largest away from F32; an untied\n"
    "head takes no added memory). With AVX512-BF16 as well, the prompt tokens of a quantized\n"
    "base (not the generated ones) take the same bf16-pair products in every quantized\n"
    "linear and routed expert. MOLT_AMX=0 in the environment keeps both F32. molt generate\n"
    "does the same.\n";

typedef struct {
    eng_opts eng;
    srv_opts srv;
    const char *model;
    char *adapters[MAX_ADAPTERS];
    int n_adapters;
    bool adapters_from_flags;
    double grace_s;
    const char *access_log;
    char *owned[64 + MAX_ADAPTERS]; // values copied out of the config file
    int n_owned;
} serve_args;

static bool parse_int(const char *v, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || errno || x < lo || x > hi)
        return false;
    *out = x;
    return true;
}

static bool parse_bool(const char *v, bool *out) {
    if (!strcmp(v, "true") || !strcmp(v, "yes") || !strcmp(v, "on") || !strcmp(v, "1"))
        *out = true;
    else if (!strcmp(v, "false") || !strcmp(v, "no") || !strcmp(v, "off") || !strcmp(v, "0"))
        *out = false;
    else
        return false;
    return true;
}

typedef enum { O_STR, O_INT, O_SIZE, O_NUM, O_BOOL, O_ADAPTER } okind;
typedef struct {
    const char *name; // flag without "--", also the config key
    okind kind;
    size_t off;
    long long lo, hi;
} opt_def;

#define A(f) offsetof(serve_args, f)
static const opt_def opts[] = {
    {"model", O_STR, A(model), 0, 0},
    {"base-quant", O_STR, A(eng.base_quant), 0, 0},
    {"tokenizer", O_STR, A(eng.tokenizer), 0, 0},
    {"adapter", O_ADAPTER, 0, 0, 0},
    {"adapter-dir", O_STR, A(srv.adapter_dir), 0, 0},
    {"allow-runtime-adapters", O_BOOL, A(srv.allow_runtime_adapters), 0, 0},
    {"max-loaded-adapters", O_INT, A(eng.max_loaded_adapters), 1, 1 << 20},
    {"host", O_STR, A(srv.host), 0, 0},
    {"port", O_INT, A(srv.port), 0, 65535},
    {"api-key", O_STR, A(srv.api_key), 0, 0},
    {"served-model-name", O_STR, A(srv.model_name), 0, 0},
    {"max-model-len", O_INT, A(eng.max_model_len), 1, 1 << 30},
    {"max-num-seqs", O_INT, A(eng.max_num_seqs), 1, 1 << 20},
    {"max-batch-tokens", O_INT, A(eng.max_batch_tokens), 1, 1 << 30},
    {"kv-cache-mib", O_INT, A(eng.kv_cache_mib), 1, 1 << 30},
    {"block-tokens", O_INT, A(eng.block_tokens), 1, 1 << 16},
    {"no-prefix-caching", O_BOOL, A(eng.no_prefix_caching), 0, 0},
    {"max-body-bytes", O_SIZE, A(srv.max_body_bytes), 1, 1LL << 40},
    {"shutdown-grace-s", O_NUM, A(grace_s), 0, 0},
    {"access-log", O_STR, A(access_log), 0, 0},
};
#define N_OPTS ((int)(sizeof opts / sizeof *opts))

static const opt_def *find_opt(const char *name) {
    char k[64];
    snprintf(k, sizeof k, "%s", name);
    for (char *p = k; *p; p++) // config keys may spell dashes as underscores
        if (*p == '_')
            *p = '-';
    for (int i = 0; i < N_OPTS; i++)
        if (!strcmp(opts[i].name, k))
            return &opts[i];
    return NULL;
}

// Stores one value; `where` names its origin for messages ("--port", "FILE:LINE").
static molt_status set_opt(serve_args *a, const opt_def *d, const char *v, const char *where) {
    char *p = (char *)a + d->off;
    long long x;
    double num;
    char *end;
    switch (d->kind) {
    case O_STR:
        *(const char **)p = v;
        return MOLT_OK;
    case O_INT:
    case O_SIZE:
        if (!parse_int(v, d->lo, d->hi, &x))
            return molt_err(MOLT_EARG, "serve: %s: expected an integer in [%lld, %lld], got "
                            "'%s'", where, d->lo, d->hi, v);
        if (d->kind == O_INT)
            *(int *)p = (int)x;
        else
            *(size_t *)p = (size_t)x;
        return MOLT_OK;
    case O_NUM:
        errno = 0;
        num = strtod(v, &end);
        if (!*v || *end || errno || !isfinite(num) || num < 0)
            return molt_err(MOLT_EARG, "serve: %s: expected a number >= 0, got '%s'", where, v);
        *(double *)p = num;
        return MOLT_OK;
    case O_BOOL:
        if (!parse_bool(v, (bool *)p))
            return molt_err(MOLT_EARG, "serve: %s: expected true or false, got '%s'", where, v);
        return MOLT_OK;
    case O_ADAPTER:
        if (!strchr(v, '=') || *v == '=' || !strchr(v, '=')[1])
            return molt_err(MOLT_EARG, "serve: %s: expected NAME=PATH, got '%s'", where, v);
        if (a->n_adapters == MAX_ADAPTERS)
            return molt_err(MOLT_EARG, "serve: %s: more than %d adapters", where, MAX_ADAPTERS);
        a->adapters[a->n_adapters++] = (char *)v;
        return MOLT_OK;
    }
    return molt_err(MOLT_EINTERNAL, "serve: option kind");
}

// A config leaf: values are copied (the YAML document goes away).
static molt_status config_leaf(void *user, ykv_event ev, const char *key, const char *v,
                               const char *where) {
    serve_args *a = user;
    const opt_def *d = find_opt(key);
    if (!d)
        return molt_err(MOLT_EARG, "config %s: unknown key '%s' (run 'molt serve --help' for "
                        "the list)", where, key);
    if (ev == YKV_LIST_BEGIN) {
        if (d->kind != O_ADAPTER)
            return molt_err(MOLT_EARG, "config %s: key '%s' takes a single value", where, key);
        return MOLT_OK;
    }
    if (d->kind == O_ADAPTER && a->adapters_from_flags) // the command line's list wins
        return MOLT_OK;
    if (a->n_owned == (int)(sizeof a->owned / sizeof *a->owned))
        return molt_err(MOLT_EARG, "config %s: too many keys", where);
    char *copy = molt_strdup(v);
    if (!copy)
        return molt_err(MOLT_ENOMEM, "config: out of memory");
    a->owned[a->n_owned++] = copy;
    return set_opt(a, d, copy, where);
}

// Flags; the config file is read first and the flags applied over it.
static int parse_args(int argc, char **argv, serve_args *a) {
    const char *config = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(usage_text, stdout);
            return -1;
        }
        if (!strcmp(argv[i], "--config")) {
            if (i + 1 >= argc || !strncmp(argv[i + 1], "--", 2)) {
                fprintf(stderr, "molt serve: --config needs a value\n");
                return 2;
            }
            config = argv[++i];
        } else if (!strncmp(argv[i], "--config=", 9)) {
            config = argv[i] + 9;
        }
        if (!strcmp(argv[i], "--adapter") || !strncmp(argv[i], "--adapter=", 10))
            a->adapters_from_flags = true;
    }
    if (config && ykv_load(config, config_leaf, a) != MOLT_OK) {
        fprintf(stderr, "molt serve: %s\n", molt_err_msg());
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i];
        if (strncmp(o, "--", 2)) {
            fprintf(stderr, "molt serve: unexpected argument '%s'\n(run 'molt serve --help' for "
                    "the options)\n", o);
            return 2;
        }
        // --name VALUE or --name=VALUE (the common/opt.h conventions)
        char name[64];
        const char *eq = strchr(o, '='), *v = NULL;
        snprintf(name, sizeof name, "%.*s", eq ? (int)(eq - o) : (int)strlen(o), o);
        if (!strcmp(name, "--config")) {
            i += eq ? 0 : 1;
            continue;
        }
        const opt_def *d = find_opt(name + 2);
        if (!d || strchr(name + 2, '_')) {
            fprintf(stderr, "molt serve: unknown option '%s'\n(run 'molt serve --help' for the "
                    "options)\n", name);
            return 2;
        }
        if (d->kind == O_BOOL) {
            if (eq) {
                fprintf(stderr, "molt serve: %s takes no value\n", name);
                return 2;
            }
            v = "true";
        } else if (eq) {
            v = eq + 1;
        } else if (i + 1 < argc && strncmp(argv[i + 1], "--", 2)) {
            v = argv[++i];
        } else {
            fprintf(stderr, "molt serve: %s needs a value\n", name);
            return 2;
        }
        if (set_opt(a, d, v, name) != MOLT_OK) {
            fprintf(stderr, "molt serve: %s\n", molt_err_msg());
            return 2;
        }
    }
    if (!a->model) {
        fprintf(stderr, "molt serve: --model DIR is required\n%s", usage_text);
        return 2;
    }
    return 0;
}

static void print_startup(const serve_args *a, eng_engine *e, srv_server *s) {
    eng_stats st;
    eng_get_stats(e, &st);
    printf("molt serve: model %s (served as \"%s\"), max model len %d, vocabulary %d\n",
           a->model, a->srv.model_name, eng_max_model_len(e), eng_vocab_size(e));
    int n = eng_adapter_list(e, NULL, 0);
    eng_adapter_info *list = molt_calloc((size_t)(n > 0 ? n : 1), sizeof *list);
    n = list ? eng_adapter_list(e, list, n) : 0;
    printf("molt serve: %d adapter%s%s\n", n, n == 1 ? "" : "s", n ? ":" : "");
    for (int i = 0; i < n; i++)
        printf("  %s = %s (rank %d, %lld parameters)\n", list[i].name, list[i].path,
               list[i].rank_max, (long long)list[i].params);
    molt_free(list);
    printf("molt serve: KV cache %d tokens (%d blocks of %d)\n", eng_kv_capacity_tokens(e),
           st.kv_blocks_total, st.block_tokens);
    printf("molt serve: vocabulary projection %s\n",
           eng_head_amx(e) ? "on AMX (bf16 hi + lo products)" : "F32");
    printf("molt serve: prompt tokens' quantized products %s\n",
           eng_prompt_amx(e) ? "on AMX (bf16 hi + lo products)" : "F32");
    printf("molt serve: runtime adapters %s%s%s\n",
           a->srv.allow_runtime_adapters ? "allowed under " : "off",
           a->srv.allow_runtime_adapters && a->srv.adapter_dir ? a->srv.adapter_dir : "",
           a->srv.allow_runtime_adapters && !a->srv.adapter_dir ? "(no --adapter-dir: none)"
                                                                : "");
    printf("molt serve: API key %s\n", a->srv.api_key ? "required" : "not required");
    const char *h = a->srv.host;
    printf("molt serve: listening on http://%s%s%s:%d\n", strchr(h, ':') ? "[" : "", h,
           strchr(h, ':') ? "]" : "", srv_port(s));
    fflush(stdout);
}

// Registers the adapters of the command line or config file.
static int add_adapters(serve_args *a, eng_engine *e) {
    for (int i = 0; i < a->n_adapters; i++) {
        char *eq = strchr(a->adapters[i], '=');
        char name[SRV_NAME_MAX];
        snprintf(name, sizeof name, "%.*s", (int)(eq - a->adapters[i]), a->adapters[i]);
        if (!strcmp(name, a->srv.model_name)) {
            fprintf(stderr, "molt serve: adapter '%s' has the served model's name\n", name);
            return 1;
        }
        if (eng_adapter_add(e, name, eq + 1) != MOLT_OK) {
            fprintf(stderr, "molt serve: adapter %s: %s\n", name, molt_err_msg());
            return 1;
        }
    }
    return 0;
}

static int serve(serve_args *a, const sigset_t *sigs) {
    eng_engine *e = NULL;
    srv_server *s = NULL;
    a->eng.model_dir = a->model;
    if (!a->srv.model_name)
        a->srv.model_name = a->model;
    a->srv.model_path = a->model;
    if (eng_create(&a->eng, &e) != MOLT_OK) {
        fprintf(stderr, "molt serve: %s\n", molt_err_msg());
        return 1;
    }
    int rc = add_adapters(a, e);
    if (!rc && eng_start(e) != MOLT_OK) {
        fprintf(stderr, "molt serve: %s\n", molt_err_msg());
        rc = 1;
    }
    if (!rc && srv_start(e, &a->srv, &s) != MOLT_OK) {
        fprintf(stderr, "molt serve: %s\n", molt_err_msg());
        rc = 1;
    }
    if (!rc) {
        print_startup(a, e, s);
        int sig = 0;
        sigwait(sigs, &sig);
        fprintf(stderr, "molt serve: %s: no new connections; running requests get %g s\n",
                sig == SIGINT ? "SIGINT" : "SIGTERM", a->grace_s);
        double t0 = srv_now();
        int left = srv_drain(s, a->grace_s);
        double rest = a->grace_s - (srv_now() - t0);
        eng_shutdown(e, rest > 0 ? rest : 0);
        if (left)
            fprintf(stderr, "molt serve: %d request%s cut off at the end of the grace period\n",
                    left, left == 1 ? "" : "s");
    }
    srv_free(s);
    eng_free(e);
    if (!rc)
        fprintf(stderr, "molt serve: stopped\n");
    return rc;
}

int srv_cmd_serve(int argc, char **argv) {
    serve_args a = {.grace_s = 30, .access_log = "-"};
    eng_opts_default(&a.eng);
    srv_opts_default(&a.srv);
    const char *env_key = getenv("MOLT_API_KEY");
    if (env_key && *env_key)
        a.srv.api_key = env_key;
    int rc = parse_args(argc, argv, &a);
    FILE *log = NULL;
    if (!rc) {
        if (!strcmp(a.access_log, "none")) {
            a.srv.access_log = NULL;
        } else if (strcmp(a.access_log, "-")) {
            log = fopen(a.access_log, "a");
            if (!log) {
                fprintf(stderr, "molt serve: --access-log %s: %s\n", a.access_log,
                        strerror(errno));
                rc = 1;
            }
            a.srv.access_log = log;
        }
    }
    if (!rc) {
        // Every thread started from here on (engine, HTTP) leaves these signals to sigwait.
        sigset_t sigs;
        sigemptyset(&sigs);
        sigaddset(&sigs, SIGTERM);
        sigaddset(&sigs, SIGINT);
        pthread_sigmask(SIG_BLOCK, &sigs, NULL);
        signal(SIGPIPE, SIG_IGN);
        rc = serve(&a, &sigs);
        pthread_sigmask(SIG_UNBLOCK, &sigs, NULL);
    }
    if (log)
        fclose(log);
    for (int i = 0; i < a.n_owned; i++)
        molt_free(a.owned[i]);
    return rc < 0 ? 0 : rc;
}
