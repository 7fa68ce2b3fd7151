// molt.c: the molt binary: subcommand dispatch only. Each command lives in the module
// that owns it and returns the process exit status. `molt help CMD [SUB]` is the same as
// `molt CMD [SUB] --help`; the options of every command follow common/opt.h.
#include <stdio.h>
#include <string.h>

#include "autograd/autograd.h"
#include "common/version.h"
#include "data/data.h"
#include "adapters/adapters.h"
#include "infer/eval/eval.h"
#include "infer/infer.h"
#include "infer/server/server.h"
#include "model/model.h"
#include "train/trainer.h"

typedef int (*cmd_fn)(int argc, char **argv);
typedef struct command {
    const char *name;
    cmd_fn fn;
    const char *help;
    const struct command *subs; // a command made of subcommands (bench), NULL-name ended
} command;

static const command bench_commands[] = {
    {"ops", ag_cmd_bench_ops, "linear and attention forward+backward vs OpenBLAS sgemm", NULL},
    {"quant", ag_cmd_bench_quant, "quantized weights: bits/param, fused NF4/INT8 linear vs sgemm",
     NULL},
    {"quant-model", mdl_cmd_bench_quant_model, "quantized model: size, logit error, load time",
     NULL},
    {"tokenize", data_cmd_bench_tokenize, "tokenizer and data pipeline throughput", NULL},
    {"generate", inf_cmd_bench_generate, "load time, memory, prefill/decode tok/s (KV cache)",
     NULL},
    {"ckpt", trn_cmd_bench_ckpt, "training checkpoint size and write/read time", NULL},
    {NULL, NULL, NULL, NULL},
};

static const command commands[] = {
    {"info", ag_cmd_info, "version, build features and visible devices", NULL},
    {"tokenize", data_cmd_tokenize, "encode text or JSONL records to token ids", NULL},
    {"data", data_cmd_data, "inspect or render an instruction dataset", NULL},
    {"init-model", mdl_cmd_init_model, "write a random model from a preset (HF layout)", NULL},
    {"forward", inf_cmd_forward, "logits of token sequences into a safetensors file", NULL},
    {"quantize", mdl_cmd_quantize, "write a pre-quantized checkpoint (nf4, int8, fp8, bf16)",
     NULL},
    {"generate", inf_cmd_generate, "generate text from a prompt (KV cache, sampling)", NULL},
    {"export", trn_cmd_export, "adapter (file, PEFT dir or checkpoint) to PEFT or molt", NULL},
    {"merge", lora_cmd_merge, "adapter merged into the base weights (HF layout)", NULL},
    {"train", trn_cmd_train, "train a LoRA adapter from a YAML config (resumable)", NULL},
    {"plan", trn_cmd_plan, "memory per rank of a training run (weights, adapter, activations)",
     NULL},
    {"eval", ev_cmd_eval, "compare the base and adapters on eval sets (paired statistics)",
     NULL},
    {"report", ev_cmd_report, "charts of a training run's metrics.jsonl as one HTML page", NULL},
    {"serve", srv_cmd_serve, "OpenAI-compatible HTTP server: base + LoRA adapters", NULL},
    {"bench", NULL, "benchmarks", bench_commands},
    {NULL, NULL, NULL, NULL},
};

static void usage(FILE *f, const char *prog, const command *cmds) {
    fprintf(f, "usage: %s <command> [options]\n\ncommands:\n", prog);
    for (const command *c = cmds; c->name; c++) {
        if (!c->subs) {
            fprintf(f, "  %-18s %s\n", c->name, c->help);
            continue;
        }
        for (const command *s = c->subs; s->name; s++) {
            char both[64];
            snprintf(both, sizeof both, "%s %s", c->name, s->name);
            fprintf(f, "  %-18s %s\n", both, s->help);
        }
    }
    fprintf(f, "\n'%s <command> --help' or '%s help <command>' describes a command's options;\n"
               "'%s --version' prints the version and the commit it was built from.\n",
            prog, prog, prog);
}

static const command *find(const command *cmds, const char *name) {
    for (const command *c = cmds; c->name; c++)
        if (!strcmp(name, c->name))
            return c;
    return NULL;
}

static int unknown(const char *prog, const char *name, const command *cmds) {
    fprintf(stderr, "%s: unknown command '%s'\n\n", prog, name);
    usage(stderr, prog, cmds);
    return 2;
}

static int dispatch(int argc, char **argv, const command *cmds, const char *prog) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout, prog, cmds);
        return argc < 2 ? 2 : 0;
    }
    const command *c = find(cmds, argv[1]);
    if (!c)
        return unknown(prog, argv[1], cmds);
    if (!c->subs)
        return c->fn(argc - 1, argv + 1);
    char sub_prog[64];
    snprintf(sub_prog, sizeof sub_prog, "%s %s", prog, c->name);
    return dispatch(argc - 1, argv + 1, c->subs, sub_prog);
}

// molt help [CMD [SUB]]: runs CMD [SUB] --help.
static int help(int argc, char **argv) {
    if (argc < 3) {
        usage(stdout, "molt", commands);
        return 0;
    }
    const command *c = find(commands, argv[2]);
    if (!c)
        return unknown("molt", argv[2], commands);
    char help_flag[] = "--help";
    char *args[3] = {argv[2], help_flag, NULL};
    if (!c->subs)
        return c->fn(2, args);
    if (argc < 4) {
        char *bench_args[3] = {argv[0], argv[2], help_flag};
        return dispatch(3, bench_args, commands, "molt");
    }
    const command *s = find(c->subs, argv[3]);
    if (!s) {
        char prog[64];
        snprintf(prog, sizeof prog, "molt %s", c->name);
        return unknown(prog, argv[3], c->subs);
    }
    args[0] = argv[3];
    return s->fn(2, args);
}

int main(int argc, char **argv) {
    lora_set_checkpoint_loader(trn_checkpoint_adapter); // serving and eval read step-N.h5
    if (argc >= 2 && !strcmp(argv[1], "--version")) {
        printf("molt %s\n", molt_version_string());
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "help"))
        return help(argc, argv);
    return dispatch(argc, argv, commands, "molt");
}
