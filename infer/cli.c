// infer/cli.c: the inference commands: `molt generate` (streamed text from a prompt) and
// `molt bench generate` (load time, resident memory, prefill and decode speed with the KV
// cache). Argument parsing, timing and printing only; the work is in generate.c and the
// model's cached forward. Exit status: 0 success, 1 failure, 2 bad usage.
#include "infer.h"

#include "../common/opt.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PATH_CAP 4096
#define PROMPT_MAX (256 << 20) // bytes of a --prompt-file

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

// Whole file into a NUL-terminated buffer (molt_malloc'ed).
static molt_status read_file(const char *path, char **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return molt_err(MOLT_EIO, "cannot open prompt file %s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0, k;
    char *b = molt_malloc(cap);
    while (b && (k = fread(b + n, 1, cap - n - 1, f)) > 0) {
        n += k;
        if (n > PROMPT_MAX) { // /dev/zero or a wrong file: refused before it fills memory
            molt_free(b);
            fclose(f);
            return molt_err(MOLT_EARG, "prompt file %s is longer than %d MiB", path,
                            PROMPT_MAX >> 20);
        }
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

// --top-p: a number in (0, 1].
static bool top_p_ok(const char *cmd, const char *v, double *out) {
    double p = *out;
    if (!molt_opt_double(cmd, "--top-p", v, 0, 1, &p))
        return false;
    if (v && p == 0) {
        fprintf(stderr, "%s: --top-p '%s' is not a number in (0, 1]\n", cmd, v);
        return false;
    }
    *out = p;
    return true;
}

static int gen_parse(int argc, char **argv, gen_args *a) {
    const char *cmd = "molt generate", *max_tokens = NULL, *temperature = NULL, *top_p = NULL;
    const char *top_k = NULL, *seed = NULL, *attn = NULL;
    const molt_opt opts[] = {MOLT_OPT("--model", &a->model),
                             MOLT_OPT("--prompt", &a->prompt),
                             MOLT_OPT("--prompt-file", &a->prompt_file),
                             MOLT_OPT("--tokenizer", &a->tokenizer),
                             MOLT_OPT("--max-tokens", &max_tokens),
                             MOLT_OPT("--temperature", &temperature),
                             MOLT_OPT("--top-p", &top_p),
                             MOLT_OPT("--top-k", &top_k),
                             MOLT_OPT("--seed", &seed),
                             MOLT_OPT("--attn", &attn),
                             MOLT_OPT("--base-quant", &a->base_quant),
                             MOLT_OPT("--adapter", &a->adapter),
                             MOLT_OPT_FLAG("--chat", &a->chat),
                             MOLT_OPT_END};
    int rc = molt_opts_parse(cmd, gen_usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc;
    inf_sample_opts *s = &a->g.sample;
    int64_t mt = a->g.max_tokens, tk = s->top_k;
    static const char *const modes[] = {"absorbed", "expanded"};
    int mode = a->g.decode_mode == MDL_ATTN_EXPANDED;
    if (!molt_opt_int(cmd, "--max-tokens", max_tokens, 0, INT32_MAX - 1, &mt) ||
        !molt_opt_double(cmd, "--temperature", temperature, 0, 1e300, &s->temperature) ||
        !top_p_ok(cmd, top_p, &s->top_p) ||
        !molt_opt_int(cmd, "--top-k", top_k, 0, INT32_MAX, &tk) ||
        !molt_opt_uint64(cmd, "--seed", seed, &s->seed) ||
        !molt_opt_choice(cmd, "--attn", attn, modes, 2, &mode))
        return 2;
    a->g.max_tokens = (int)mt;
    s->top_k = (int)tk;
    a->g.decode_mode = mode ? MDL_ATTN_EXPANDED : MDL_ATTN_ABSORBED;
    if (!a->model)
        return molt_opt_usage_error(cmd, "--model is required");
    if (!a->prompt == !a->prompt_file)
        return molt_opt_usage_error(cmd, "give exactly one of --prompt and --prompt-file");
    return 0;
}

// Loads the tokenizer named by --tokenizer, else the one in the model directory.
static molt_status load_tokenizer(const gen_args *a, tok_tokenizer **t) {
    MOLT_TRY(mdl_check_dir(a->model)); // a missing model says so, not "no tokenizer"
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
    if (st == MOLT_OK) // serving's vocabulary projection, so that both give the same tokens
        st = mdl_pack_head(&m, NULL);
    if (st == MOLT_OK) // and its prompt products
        mdl_prompts_on_amx(&m, NULL);
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
