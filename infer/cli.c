// infer/cli.c: the inference commands: `molt generate` (streamed text from a prompt) and
// `molt bench generate` (load time, resident memory, prefill and decode speed with the KV
// cache). Argument parsing, timing and printing only; the work is in generate.c and the
// model's cached forward. Exit status: 0 success, 1 failure, 2 bad usage.
#include "infer.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PATH_CAP 4096

static const char gen_usage[] =
    "usage: molt generate --model DIR (--prompt TEXT | --prompt-file FILE) [--chat]\n"
    "                     [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]\n"
    "                     [--seed S] [--attn absorbed|expanded] [--tokenizer FILE]\n"
    "                     [--base-quant SPEC] [--adapter A]\n"
    "Generates text after the prompt and writes it to stdout as it is produced; a summary\n"
    "goes to stderr. Greedy unless --temperature > 0; then temperature -> top-k -> top-p ->\n"
    "one draw from a generator seeded by --seed (same seed, same text). Stops at an end of\n"
    "sequence token or after --max-tokens (default 128). --chat wraps the prompt as one user\n"
    "turn of the model's chat template; otherwise it is <s> followed by the plain text.\n"
    "--attn: how decode steps attend over the cache (default absorbed weights). The\n"
    "tokenizer is DIR/tekken.json or DIR/tokenizer.json unless --tokenizer names one.\n"
    "--base-quant quantizes the projections on load (see molt quantize --help).\n"
    "--adapter applies a LoRA adapter: a PEFT directory, a molt adapter file (.h5) or a\n"
    "training checkpoint (step-N.h5).\n";

static bool parse_int(const char *s, int lo, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!*s || *end || errno || v < lo || v > INT32_MAX)
        return false;
    *out = (int)v;
    return true;
}

static bool parse_num(const char *s, double *out) {
    char *end;
    errno = 0;
    *out = strtod(s, &end);
    return *s && !*end && !errno && isfinite(*out);
}

static bool parse_seed(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    if (!*s || *s == '-')
        return false;
    unsigned long long v = strtoull(s, &end, 10);
    *out = v;
    return !*end && !errno;
}

static bool parse_attn(const char *s, mdl_attn_mode *m) {
    if (strcmp(s, "absorbed") == 0)
        *m = MDL_ATTN_ABSORBED;
    else if (strcmp(s, "expanded") == 0)
        *m = MDL_ATTN_EXPANDED;
    else
        return false;
    return true;
}

// Whole file into a NUL-terminated buffer (molt_malloc'ed).
static molt_status read_file(const char *path, char **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return molt_err(MOLT_EIO, "cannot open prompt file %s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0, k;
    char *b = molt_malloc(cap);
    while (b && (k = fread(b + n, 1, cap - n - 1, f)) > 0) {
        n += k;
        if (cap - n - 1 == 0) {
            char *g = molt_realloc(b, cap * 2);
            if (!g) {
                molt_free(b);
                b = NULL;
                break;
            }
            b = g;
            cap *= 2;
        }
    }
    bool bad = ferror(f);
    fclose(f);
    if (!b)
        return molt_err(MOLT_ENOMEM, "out of memory reading %s", path);
    if (bad) {
        molt_free(b);
        return molt_err(MOLT_EIO, "cannot read prompt file %s", path);
    }
    b[n] = 0;
    *out = b;
    *len = n;
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// molt generate

typedef struct {
    const char *model, *prompt, *prompt_file, *tokenizer;
    const char *base_quant; // --base-quant spec or NULL
    const char *adapter;    // --adapter path or NULL
    bool chat;
    inf_gen_opts g;
} gen_args;

// One option; returns 0 when handled, 2 on bad usage (message printed).
static int gen_option(int argc, char **argv, int *i, gen_args *a) {
    const char *o = argv[*i], *cmd = "molt generate";
    if (strcmp(o, "--chat") == 0) {
        a->chat = true;
        return 0;
    }
    static const char *const with_value[] = {
        "--model", "--prompt", "--prompt-file", "--tokenizer", "--max-tokens", "--temperature",
        "--top-p", "--top-k",  "--seed",        "--attn",        "--base-quant", "--adapter"};
    bool known = false;
    for (size_t k = 0; k < sizeof with_value / sizeof *with_value; k++)
        known |= strcmp(o, with_value[k]) == 0;
    if (!known) {
        fprintf(stderr, "%s: unknown option '%s'\n%s", cmd, o, gen_usage);
        return 2;
    }
    if (*i + 1 >= argc) {
        fprintf(stderr, "%s: %s needs a value\n", cmd, o);
        return 2;
    }
    const char *v = argv[++*i];
    bool ok = true;
    inf_sample_opts *s = &a->g.sample;
    if (strcmp(o, "--model") == 0)
        a->model = v;
    else if (strcmp(o, "--prompt") == 0)
        a->prompt = v;
    else if (strcmp(o, "--prompt-file") == 0)
        a->prompt_file = v;
    else if (strcmp(o, "--tokenizer") == 0)
        a->tokenizer = v;
    else if (strcmp(o, "--max-tokens") == 0)
        ok = parse_int(v, 0, &a->g.max_tokens);
    else if (strcmp(o, "--temperature") == 0)
        ok = parse_num(v, &s->temperature) && s->temperature >= 0;
    else if (strcmp(o, "--top-p") == 0)
        ok = parse_num(v, &s->top_p) && s->top_p > 0 && s->top_p <= 1;
    else if (strcmp(o, "--top-k") == 0)
        ok = parse_int(v, 0, &s->top_k);
    else if (strcmp(o, "--seed") == 0)
        ok = parse_seed(v, &s->seed);
    else if (strcmp(o, "--base-quant") == 0)
        a->base_quant = v; // checked when the model loads
    else if (strcmp(o, "--adapter") == 0)
        a->adapter = v; // loaded after the model
    else
        ok = parse_attn(v, &a->g.decode_mode);
    if (!ok) {
        static const char *const want[][2] = {
            {"--max-tokens", "an integer >= 0"}, {"--temperature", "a number >= 0"},
            {"--top-p", "a number in (0, 1]"},   {"--top-k", "an integer >= 0 (0 = off)"},
            {"--seed", "a non-negative integer"}, {"--attn", "absorbed or expanded"}};
        for (size_t k = 0; k < sizeof want / sizeof *want; k++)
            if (strcmp(o, want[k][0]) == 0)
                fprintf(stderr, "%s: %s '%s' is not %s\n", cmd, o, v, want[k][1]);
        return 2;
    }
    return 0;
}

static int gen_parse(int argc, char **argv, gen_args *a) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(gen_usage, stdout);
            return -1;
        }
        int rc = gen_option(argc, argv, &i, a);
        if (rc)
            return rc;
    }
    if (!a->model) {
        fprintf(stderr, "molt generate: --model is required\n%s", gen_usage);
        return 2;
    }
    if (!a->prompt == !a->prompt_file) {
        fprintf(stderr, "molt generate: give exactly one of --prompt and --prompt-file\n%s",
                gen_usage);
        return 2;
    }
    return 0;
}

// Loads the tokenizer named by --tokenizer, else the one in the model directory.
static molt_status load_tokenizer(const gen_args *a, tok_tokenizer **t) {
    if (a->tokenizer)
        return tok_load(a->tokenizer, t);
    static const char *const names[] = {"tekken.json", "tokenizer.json"};
    char path[PATH_CAP];
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", a->model, names[i]);
        if (access(path, R_OK) == 0)
            return tok_load(path, t);
    }
    return molt_err(MOLT_EIO, "no tokenizer in %s (tekken.json or tokenizer.json); pass "
                    "--tokenizer FILE", a->model);
}

static void print_text(void *user, const char *text, size_t n) {
    (void)user;
    fwrite(text, 1, n, stdout);
    fflush(stdout);
}

static molt_status run_generate(gen_args *a) {
    char *text = NULL;
    size_t len = 0;
    if (a->prompt_file)
        MOLT_TRY(read_file(a->prompt_file, &text, &len));
    tok_tokenizer *tok = NULL;
    tok_ids ids = {0};
    mdl_model m = {0};
    int32_t *out = NULL;
    molt_status st = load_tokenizer(a, &tok);
    if (st == MOLT_OK)
        st = inf_prompt_ids(tok, text ? text : a->prompt, text ? len : strlen(a->prompt),
                            a->chat, &ids);
    if (st == MOLT_OK && ids.n == 0)
        st = molt_err(MOLT_EARG, "the prompt has no tokens");
    mdl_qspec qs;
    if (st == MOLT_OK && a->base_quant)
        st = mdl_qspec_parse(a->base_quant, &qs);
    if (st == MOLT_OK)
        st = mdl_load_quant(a->model, a->base_quant ? &qs : NULL, &m);
    void *adapter = NULL;
    mdl_bank bank = {0};
    if (st == MOLT_OK)
        st = mdl_bank_init(&bank, &m, 1);
    if (st == MOLT_OK && a->adapter)
        st = inf_adapter_bank(&m, a->adapter, &bank, 0, &adapter);
    a->g.bank = &bank;
    a->g.slot = a->adapter ? 0 : -1;
    if (st == MOLT_OK && (out = molt_malloc((size_t)(a->g.max_tokens + 1) * sizeof *out)) == NULL)
        st = molt_err(MOLT_ENOMEM, "out of memory");
    inf_gen_stats gs;
    int n = 0;
    if (st == MOLT_OK) {
        a->g.tok = tok;
        a->g.on_text = print_text;
        a->g.eos = tok_eos(tok);
        st = inf_generate(&m, ids.ids, (int)ids.n, &a->g, out, &n, &gs);
    }
    if (st == MOLT_OK) {
        printf("\n");
        fflush(stdout); // the text ends before the summary on a shared terminal
        fprintf(stderr, "molt generate: %d prompt tokens, generated %d tokens (%s), prefill "
                "%.1f tok/s, decode %.1f tok/s\n", gs.n_prompt, gs.n_gen,
                gs.stopped_at_eos ? "end of sequence" : "token limit",
                gs.prefill_s > 0 ? gs.n_prompt / gs.prefill_s : 0,
                gs.decode_s > 0 ? gs.n_gen / gs.decode_s : 0);
    }
    molt_free(out);
    mdl_bank_free(&bank);
    inf_adapter_detach(adapter);
    mdl_free(&m);
    tok_ids_free(&ids);
    tok_free(tok);
    molt_free(text);
    return st;
}

int inf_cmd_generate(int argc, char **argv) {
    gen_args a = {0};
    inf_gen_opts_default(&a.g);
    int rc = gen_parse(argc, argv, &a);
    if (rc)
        return rc < 0 ? 0 : rc;
    if (run_generate(&a) != MOLT_OK) {
        fprintf(stderr, "molt generate: %s\n", molt_err_msg());
        return 1;
    }
    return 0;
}
