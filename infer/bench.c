// infer/bench.c: `molt bench generate`: how long a model takes to load, how much memory the
// process holds afterwards (VmRSS / VmHWM of /proc/self/status), and CPU prefill and
// decode speed through the paged KV cache with both forms of cached attention. A preset is
// written to a temporary directory first (then removed) so the load is a real file load.
// Not here: correctness (tests/test_kvcache.c), sampling cost (greedy steps only).
#include "infer.h"

#include "../common/opt.h"

#include <errno.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char bench_usage[] =
    "usage: molt bench generate (--model DIR | --preset NAME) [--base-quant SPEC]\n"
    "                           [--prompt-tokens N] [--gen-tokens N] [--seed S]\n"
    "Loads the model (a preset such as tiny or small is first written, F32, to a temporary\n"
    "directory; --base-quant quantizes it as it loads, e.g. nf4 or nf4,lm_head=nf4), then\n"
    "runs a random prompt of N tokens (default 128) and N greedy decode steps (default 32)\n"
    "through the KV cache on the serving path (the batched forward of molt serve and molt\n"
    "generate), once with absorbed and once with expanded attention (serving prefills\n"
    "expanded and decodes absorbed). Each is timed on its second pass, after an untimed one\n"
    "in the same context and cache (a serving context's steady state). Prints one table:\n"
    "load time, resident memory (VmRSS now, VmHWM peak), prefill and decode tokens per\n"
    "second.\n";

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// VmRSS and VmHWM in MiB (0 when /proc is not there).
static void mem_mib(double *rss, double *hwm) {
    *rss = *hwm = 0;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        long kb;
        if (sscanf(line, "VmRSS: %ld kB", &kb) == 1)
            *rss = kb / 1024.0;
        else if (sscanf(line, "VmHWM: %ld kB", &kb) == 1)
            *hwm = kb / 1024.0;
    }
    fclose(f);
}

typedef struct {
    const char *model, *preset, *base_quant;
    int prompt_tokens, gen_tokens;
    uint64_t seed;
} bench_args;

static int bench_parse(int argc, char **argv, bench_args *a) {
    const char *cmd = "molt bench generate", *prompt = NULL, *gen = NULL, *seed = NULL;
    const molt_opt opts[] = {MOLT_OPT("--model", &a->model), MOLT_OPT("--preset", &a->preset),
                             MOLT_OPT("--base-quant", &a->base_quant),
                             MOLT_OPT("--prompt-tokens", &prompt),
                             MOLT_OPT("--gen-tokens", &gen), MOLT_OPT("--seed", &seed),
                             MOLT_OPT_END};
    int rc = molt_opts_parse(cmd, bench_usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc;
    int64_t p = a->prompt_tokens, g = a->gen_tokens;
    if (!molt_opt_int(cmd, "--prompt-tokens", prompt, 1, 1000000, &p) ||
        !molt_opt_int(cmd, "--gen-tokens", gen, 1, 1000000, &g) ||
        !molt_opt_uint64(cmd, "--seed", seed, &a->seed))
        return 2;
    a->prompt_tokens = (int)p;
    a->gen_tokens = (int)g;
    if (!a->model == !a->preset)
        return molt_opt_usage_error(cmd, "give exactly one of --model and --preset");
    return 0;
}

// Writes the preset to a new temporary directory (dir gets its path).
static molt_status write_preset(const bench_args *a, char *dir, size_t cap) {
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, cap, "%s/molt-bench-gen-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(dir))
        return molt_err(MOLT_EIO, "cannot create a temporary directory %s: %s", dir,
                        strerror(errno));
    mdl_init_opts o = {.preset = a->preset, .out_dir = dir, .seed = a->seed,
                       .no_tokenizer = true,
                       .save = {.layout = MDL_LAYOUT_HF, .dtype = MDL_SAVE_F32}};
    return mdl_init_model(&o);
}

static void remove_dir(const char *dir) {
    static const char *const files[] = {"config.json", "model.safetensors"};
    char path[4200];
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        unlink(path);
    }
    if (rmdir(dir) != 0)
        fprintf(stderr, "molt bench generate: could not remove %s\n", dir);
}

typedef struct {
    double prefill_tps, decode_tps;
} speed;

// Prefill of prompt then n greedy decode steps in one cache, attention form `mode`, on the
// serving path (batched forward with an empty adapter bank). The same run goes through once
// untimed first, in the same context and cache (its sequence then closed): what is timed is
// the steady state of a long-lived serving context, whose activation memory and cache
// blocks are already mapped (llama-bench likewise times repetitions after a warm-up).
static molt_status run_mode(const mdl_model *m, const int32_t *prompt, int np, int ng,
                            mdl_attn_mode mode, speed *sp) {
    ag_ctx c;
    mdl_kvcache kv;
    mdl_bank bank = {0};
    MOLT_TRY(ag_ctx_init(&c));
    molt_status st = mdl_kv_init(&kv, &m->cfg, 0, np + ng);
    if (st == MOLT_OK)
        st = mdl_bank_init(&bank, m, 1);
    bool exp = mode == MDL_ATTN_EXPANDED;
    for (int pass = 0; st == MOLT_OK && pass < 2; pass++) {
        int seq;
        ag_tensor *lg;
        st = mdl_kv_seq_open(&kv, &seq);
        ag_ctx_step_reset(&c);
        double t0 = now_s();
        if (st == MOLT_OK)
            st = mdl_forward_spans(&c, m, &kv, &bank,
                                   &(mdl_span){seq, prompt, np, exp ? np : 0, -1, 1}, 1, &lg);
        double t1 = now_s();
        for (int i = 0; st == MOLT_OK && i < ng; i++) {
            int32_t tok = inf_argmax(lg->data, m->cfg.vocab_size);
            ag_ctx_step_reset(&c);
            st = mdl_forward_spans(&c, m, &kv, &bank, &(mdl_span){seq, &tok, 1, exp, -1, 1}, 1,
                                   &lg);
        }
        double t2 = now_s();
        sp->prefill_tps = np / (t1 - t0);
        sp->decode_tps = ng / (t2 - t1);
        if (st == MOLT_OK)
            mdl_kv_seq_close(&kv, seq);
    }
    mdl_kv_free(&kv);
    mdl_bank_free(&bank);
    ag_ctx_free(&c);
    return st;
}

static molt_status run_bench(const bench_args *a) {
    char dir[4096] = {0};
    const char *path = a->model;
    double t0 = now_s();
    if (a->preset) {
        MOLT_TRY(write_preset(a, dir, sizeof dir));
        path = dir;
    }
    double t_write = now_s() - t0;
    mdl_model m = {0};
    mdl_qspec qs;
    molt_status st = a->base_quant ? mdl_qspec_parse(a->base_quant, &qs) : MOLT_OK;
    t0 = now_s();
    if (st == MOLT_OK)
        st = mdl_load_quant(path, a->base_quant ? &qs : NULL, &m);
    if (st == MOLT_OK) // as molt serve and molt generate run it
        st = mdl_pack_head(&m, NULL);
    if (st == MOLT_OK)
        mdl_prompts_on_amx(&m, NULL);
    double t_load = now_s() - t0, rss, hwm;
    if (dir[0])
        remove_dir(dir);
    if (st != MOLT_OK)
        return st;
    mem_mib(&rss, &hwm);
    int32_t *prompt = molt_malloc((size_t)a->prompt_tokens * sizeof *prompt);
    if (!prompt) {
        mdl_free(&m);
        return molt_err(MOLT_ENOMEM, "out of memory");
    }
    ag_rng r;
    ag_rng_seed(&r, a->seed + 1);
    for (int i = 0; i < a->prompt_tokens; i++) // ordinary (non-special) ids
        prompt[i] = 1000 + (int32_t)(ag_rng_next(&r) % (uint64_t)(m.cfg.vocab_size - 1000));
    speed sp[2];
    static const char *const names[2] = {"absorbed", "expanded"};
    // a short warm-up so thread start-up is not timed
    st = run_mode(&m, prompt, 4 < a->prompt_tokens ? 4 : a->prompt_tokens, 2,
                  MDL_ATTN_ABSORBED, &sp[0]);
    for (int k = 0; st == MOLT_OK && k < 2; k++)
        st = run_mode(&m, prompt, a->prompt_tokens, a->gen_tokens,
                      k == 0 ? MDL_ATTN_ABSORBED : MDL_ATTN_EXPANDED, &sp[k]);
    double rss_end, hwm_end;
    mem_mib(&rss_end, &hwm_end);
    if (st == MOLT_OK) {
        char qb[256];
        printf("model %s: %lld parameters, %s weights (%.1f MiB); %d threads",
               a->preset ? a->preset : path, (long long)mdl_param_count(&m.cfg),
               a->base_quant ? mdl_qspec_str(&qs, qb, sizeof qb) : "F32",
               mdl_weight_bytes(&m) / 1048576.0, omp_get_max_threads());
        if (a->preset)
            printf("; preset written in %.2f s", t_write);
        printf("; vocabulary projection %s", m.lm_head.bx ? "on AMX (bf16 hi + lo)" : "F32");
        printf("; prompt products %s", m.prompt_bx ? "on AMX (bf16 hi + lo)" : "F32");
        printf("\n| model | load s | VmRSS MiB (loaded / end) | VmHWM MiB | attention | "
               "prompt tokens | prefill tok/s | decode tokens | decode tok/s |\n"
               "|---|---|---|---|---|---|---|---|---|\n");
        for (int k = 0; k < 2; k++)
            printf("| %s | %.3f | %.0f / %.0f | %.0f | %s | %d | %.1f | %d | %.1f |\n",
                   a->preset ? a->preset : path, t_load, rss, rss_end, hwm_end, names[k],
                   a->prompt_tokens, sp[k].prefill_tps, a->gen_tokens, sp[k].decode_tps);
    }
    molt_free(prompt);
    mdl_free(&m);
    return st;
}

int inf_cmd_bench_generate(int argc, char **argv) {
    bench_args a = {.prompt_tokens = 128, .gen_tokens = 32, .seed = 0};
    int rc = bench_parse(argc, argv, &a);
    if (rc)
        return rc < 0 ? 0 : rc;
    if (run_bench(&a) != MOLT_OK) {
        fprintf(stderr, "molt bench generate: %s\n", molt_err_msg());
        return 1;
    }
    return 0;
}
