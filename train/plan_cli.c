// train/plan_cli.c: `molt plan`: the memory one rank of a training run needs, by part, and
// whether it fits. The numbers come from train/plan.c; this file reads the options, finds the
// model's configuration and tokenizer (whose footprint is measured by loading it) and prints.
// Exit status: 0 when it fits (or no capacity applies), 1 when it does not or on an error,
// 2 on bad usage.
#include "trainer.h"

#include "../common/datadir.h"
#include "../common/opt.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char usage[] =
    "usage: molt plan --model DIR|PRESET|FILE.json --ranks N [--parallel data=D,expert=E]\n"
    "                 [--quant SPEC] --adapter SPEC --seq-len L --batch B [--act-ckpt]\n"
    "                 [--gpu-mib M] [--reserve-mib R] [--tokenizer FILE]\n"
    "\n"
    "Prints the memory of each rank of `molt train` with N ranks (parallel.data x\n"
    "parallel.expert = N; data defaults to N / expert, expert to 1): the base weights by\n"
    "group as they are stored (SPEC as molt train's model.quant: nf4, int8, fp8, bf16, f32 or\n"
    "per group; f32 when not given; a rank holds n_routed_experts / E of the routed experts),\n"
    "the LoRA adapter (SPEC as molt train's adapter.spec, e.g.\n"
    "r=16,alpha=32,targets=q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+experts),\n"
    "its gradients and AdamW state, the activations of one micro-batch of B / N rows of L\n"
    "tokens with and without activation checkpointing (--act-ckpt picks the one counted),\n"
    "the communication buffers, the host side (tokenizer, batches), the checkpoint rank 0\n"
    "stages, and the KV cache of B / N sequences of L tokens (generation and evaluation, not\n"
    "training). Activations are f32, as molt computes them. --gpu-mib: the memory of one\n"
    "device; the plan fits when the total plus --reserve-mib (default 2048: CUDA context,\n"
    "library workspaces, allocator slack) stays within it. Without --gpu-mib, this machine's\n"
    "memory divided by N. DIR holds config.json (and the tokenizer); a PRESET name or\n"
    ".json file is a config.json as configs/models holds them.\n";

static molt_status parse_parallel(const char *v, int *data, int *expert) {
    char buf[128];
    snprintf(buf, sizeof buf, "%s", v);
    for (char *save = NULL, *it = strtok_r(buf, ",", &save); it; it = strtok_r(NULL, ",", &save)) {
        int *dst = !strncmp(it, "data=", 5) ? data : !strncmp(it, "expert=", 7) ? expert : NULL;
        char *eq = strchr(it, '='), *end;
        long x = eq ? strtol(eq + 1, &end, 10) : 0;
        if (!dst || !eq || *end || x < 1 || x > 1 << 20)
            return molt_err(MOLT_EARG, "--parallel '%s': expected data=D,expert=E with "
                            "positive integers", v);
        *dst = (int)x;
    }
    return MOLT_OK;
}

static bool is_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static bool is_file(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

// The config and the tokenizer file for --model (a directory, a preset or a config file).
static molt_status find_model(const char *model, const char *tok_opt, mcfg *cfg, char *tok,
                              size_t cap) {
    char path[4200];
    tok[0] = 0;
    if (is_dir(model)) {
        snprintf(path, sizeof path, "%s/config.json", model);
        MOLT_TRY(mcfg_load(path, cfg));
        const char *names[] = {"tekken.json", "tokenizer.json"};
        for (int i = 0; i < 2 && !tok[0]; i++) {
            snprintf(path, sizeof path, "%s/%s", model, names[i]);
            if (is_file(path))
                snprintf(tok, cap, "%s", path);
        }
    } else {
        MOLT_TRY(mdl_preset_find(model, path, sizeof path));
        MOLT_TRY(mcfg_load(path, cfg));
        // the tokenizer beside the presets (configs/tokenizers/tekken.json)
        char *slash = strrchr(path, '/');
        if (slash) {
            snprintf(slash, sizeof path - (size_t)(slash - path), "/../tokenizers/tekken.json");
            if (is_file(path))
                snprintf(tok, cap, "%s", path);
        }
        if (!tok[0] && molt_data_find("tokenizers/tekken.json", path, sizeof path) == MOLT_OK)
            snprintf(tok, cap, "%s", path); // else in the data directory (molt info)
    }
    if (tok_opt)
        snprintf(tok, cap, "%s", tok_opt);
    return MOLT_OK;
}

// What loading the tokenizer (and its chat template) takes, measured.
static molt_status tokenizer_bytes(const char *path, double *bytes) {
    *bytes = 0;
    if (!*path)
        return MOLT_OK;
    size_t before = molt_mem_in_use();
    tok_tokenizer *t = NULL;
    chat_template *ct = NULL;
    MOLT_TRY(tok_load(path, &t));
    molt_status st = chat_template_new(t, NULL, &ct);
    *bytes = (double)(molt_mem_in_use() - before);
    chat_template_free(ct);
    tok_free(t);
    return st;
}

static double host_mib(void) {
    long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && size > 0 ? (double)pages * (double)size / (1024.0 * 1024.0) : 0;
}

static double mib(double b) { return b / (1024.0 * 1024.0); }

static void row(const char *what, double bytes, const char *note) {
    printf("  %-34s %12.1f MiB%s%s\n", what, mib(bytes), note && *note ? "  " : "",
           note ? note : "");
}

static void print_plan(const trn_plan_opts *o, const trn_plan *p, const char *model,
                       const char *quant, const char *tok, double cap_mib, bool cap_given,
                       double reserve_mib) {
    const mcfg *c = &o->cfg;
    printf("molt plan: %s, %d rank%s (data %d x expert %d), base %s, %d row%s x %d tokens "
           "per batch: %d row%s (%lld tokens) per rank\n", model, o->ranks,
           o->ranks == 1 ? "" : "s", p->data, p->expert, quant, o->batch,
           o->batch == 1 ? "" : "s", o->seq_len, p->rows, p->rows == 1 ? "" : "s",
           (long long)p->tokens);
    printf("per rank, device side (a GPU, or the CPU's memory):\n");
    row("base weights", p->weights_total, "");
    char note[128];
    for (int g = 0; g < MDL_PG_COUNT; g++) {
        if (!p->weights[g])
            continue;
        note[0] = 0;
        if (g == MDL_PG_EXPERTS)
            snprintf(note, sizeof note, "(%d of %d experts per layer)",
                     c->n_routed_experts / p->expert, c->n_routed_experts);
        char what[64];
        snprintf(what, sizeof what, "  %s", mdl_plan_group_name((mdl_plan_group)g));
        row(what, (double)p->weights[g], note);
    }
    snprintf(note, sizeof note, "(%.0f replicated + %.0f expert-shard parameters)",
             p->params_replicated, p->params_shard);
    row("adapter (LoRA A, B)", p->adapter, note);
    row("gradients", p->grads, "");
    row("optimizer state (AdamW m, v)", p->optimizer, "");
    row("activations, no checkpointing", p->act_plain, o->act_ckpt ? "" : "(counted)");
    row("activations, checkpointing", p->act_ckpt, o->act_ckpt ? "(counted)" : "");
    row("  of which kernel workspace", p->workspace, "");
    row("communication buffers", p->comm, o->ranks > 1 ? "(gradient reduction bucket)" : "");
    row("total (training, device)", p->total, "");
    snprintf(note, sizeof note, "(%d x %d tokens, f32 latents: generation, evaluation)",
             p->rows, o->seq_len);
    row("KV cache", p->kv_cache, note);
    row("total (inference, device)", p->total_infer, "(weights, adapter, KV cache)");
    printf("host side:\n");
    snprintf(note, sizeof note, "(%s)", *tok ? tok : "no tokenizer found");
    row("tokenizer and batches", p->host, note);
    row("checkpoint staging (rank 0)", p->ckpt_staging, "(the whole adapter, m, v)");
    row("total of a CPU run", p->total_cpu, "(device and host side in one memory)");
    row("total of a CPU run, rank 0", p->total_cpu_rank0, "(while writing a checkpoint)");
    double need = cap_given ? mib(p->total) + reserve_mib : mib(p->total_cpu_rank0);
    if (cap_given)
        printf("fits: %s: %.1f MiB with the %.0f MiB reserve, of %.1f MiB per device\n",
               need <= cap_mib ? "yes" : "no", need, reserve_mib, cap_mib);
    else
        printf("fits: %s: %.1f MiB of %.1f MiB per rank (this machine's memory / ranks)\n",
               need <= cap_mib ? "yes" : "no", need, cap_mib);
}

int trn_cmd_plan(int argc, char **argv) {
    const char *cmd = "molt plan", *model = NULL, *ranks = NULL, *par = NULL, *quant = NULL;
    const char *adapter = NULL, *seq = NULL, *batch = NULL, *gpu = NULL, *reserve = NULL;
    const char *tok_opt = NULL;
    trn_plan_opts o;
    memset(&o, 0, sizeof o);
    const molt_opt opts[] = {MOLT_OPT("--model", &model),       MOLT_OPT("--ranks", &ranks),
                             MOLT_OPT("--parallel", &par),      MOLT_OPT("--quant", &quant),
                             MOLT_OPT("--adapter", &adapter),   MOLT_OPT("--seq-len", &seq),
                             MOLT_OPT("--batch", &batch),       MOLT_OPT("--gpu-mib", &gpu),
                             MOLT_OPT("--reserve-mib", &reserve),
                             MOLT_OPT("--tokenizer", &tok_opt),
                             MOLT_OPT_FLAG("--act-ckpt", &o.act_ckpt), MOLT_OPT_END};
    int rc = molt_opts_parse(cmd, usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc < 0 ? 0 : rc;
    if (!model || !ranks || !adapter || !seq || !batch)
        return molt_opt_usage_error(cmd, "--model, --ranks, --adapter, --seq-len and --batch "
                                         "are required");
    int64_t n = 1, l = 1, b = 1;
    double cap = 0, res = 2048;
    if (!molt_opt_int(cmd, "--ranks", ranks, 1, 1 << 20, &n) ||
        !molt_opt_int(cmd, "--seq-len", seq, 1, 1 << 30, &l) ||
        !molt_opt_int(cmd, "--batch", batch, 1, 1 << 30, &b) ||
        !molt_opt_double(cmd, "--gpu-mib", gpu, 1, 1e12, &cap) ||
        !molt_opt_double(cmd, "--reserve-mib", reserve, 0, 1e12, &res))
        return 2;
    o.ranks = (int)n;
    o.seq_len = (int)l;
    o.batch = (int)b;
    if (par && parse_parallel(par, &o.data, &o.expert) != MOLT_OK)
        return molt_opt_usage_error(cmd, "%s", molt_err_msg());
    if (quant) {
        if (mdl_qspec_parse(quant, &o.quant) != MOLT_OK)
            return molt_opt_usage_error(cmd, "--quant: %s", molt_err_msg());
        o.quant_set = true;
    }
    if (lora_spec_parse(adapter, &o.adapter) != MOLT_OK)
        return molt_opt_usage_error(cmd, "--adapter: %s", molt_err_msg());
    char tok[4200];
    trn_plan p;
    molt_status st = find_model(model, tok_opt, &o.cfg, tok, sizeof tok);
    if (st == MOLT_OK)
        st = tokenizer_bytes(tok, &o.tokenizer_bytes);
    if (st == MOLT_OK)
        st = trn_plan_compute(&o, &p);
    if (st != MOLT_OK) {
        fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
        return 1;
    }
    bool cap_given = gpu != NULL;
    if (!cap_given)
        cap = host_mib() / o.ranks;
    print_plan(&o, &p, model, quant ? quant : "f32", tok, cap, cap_given, res);
    double need = cap_given ? mib(p.total) + res : mib(p.total_cpu_rank0);
    return need <= cap ? 0 : 1;
}
