// molt.c: the molt binary: subcommand dispatch only. Each command lives in the module
// that owns it and returns the process exit status.
#include <stdio.h>
#include <string.h>

#include "autograd/autograd.h"
#include "data/data.h"
#include "adapters/adapters.h"
#include "infer/eval/eval.h"
#include "infer/infer.h"
#include "infer/server/server.h"
#include "model/model.h"
#include "train/trainer.h"

typedef int (*cmd_fn)(int argc, char **argv);
typedef struct {
    const char *name;
    cmd_fn fn;
    const char *help;
} command;

static int cmd_bench(int argc, char **argv);

static const command commands[] = {
    {"info", ag_cmd_info, "version, build features and visible devices"},
    {"tokenize", data_cmd_tokenize, "encode text or JSONL records to token ids"},
    {"data", data_cmd_data, "inspect or render an instruction dataset"},
    {"init-model", mdl_cmd_init_model, "write a random model from a preset (HF layout)"},
    {"forward", inf_cmd_forward, "logits of token sequences into a safetensors file"},
    {"quantize", mdl_cmd_quantize, "write a pre-quantized checkpoint (nf4, int8, fp8, bf16)"},
    {"generate", inf_cmd_generate, "generate text from a prompt (KV cache, sampling)"},
    {"export", trn_cmd_export, "adapter (file, PEFT dir or checkpoint) to PEFT or molt"},
    {"merge", lora_cmd_merge, "adapter merged into the base weights (HF layout)"},
    {"train", trn_cmd_train, "train a LoRA adapter from a YAML config (resumable)"},
    {"report", ev_cmd_report, "charts of a training run's metrics.jsonl as one HTML page"},
#ifdef MOLT_HAVE_ENGINE
    {"serve", srv_cmd_serve, "OpenAI-compatible HTTP server: base + LoRA adapters"},
#endif
    {"bench", cmd_bench, "benchmarks: ops, tokenize"},
};

static const command bench_commands[] = {
    {"ops", ag_cmd_bench_ops, "linear and attention forward+backward vs OpenBLAS sgemm"},
    {"quant", ag_cmd_bench_quant, "quantized weights: bits/param, fused NF4/INT8 linear vs sgemm"},
    {"quant-model", mdl_cmd_bench_quant_model, "quantized model: size, logit error, load time"},
    {"tokenize", data_cmd_bench_tokenize, "tokenizer and data pipeline throughput"},
    {"generate", inf_cmd_bench_generate, "load time, memory, prefill/decode tok/s (KV cache)"},
    {"ckpt", trn_cmd_bench_ckpt, "training checkpoint size and write/read time"},
};

static void usage(FILE *f, const char *prog, const command *cmds, size_t n) {
    fprintf(f, "usage: %s <command> [options]\n\ncommands:\n", prog);
    for (size_t i = 0; i < n; i++)
        fprintf(f, "  %-10s %s\n", cmds[i].name, cmds[i].help);
    fprintf(f, "\n'%s <command> --help' describes a command's options.\n", prog);
}

static int dispatch(int argc, char **argv, const command *cmds, size_t n, const char *prog) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout, prog, cmds, n);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("molt %s\n", MOLT_VERSION);
        return 0;
    }
    for (size_t i = 0; i < n; i++)
        if (!strcmp(argv[1], cmds[i].name))
            return cmds[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "%s: unknown command '%s'\n\n", prog, argv[1]);
    usage(stderr, prog, cmds, n);
    return 2;
}

static int cmd_bench(int argc, char **argv) {
    return dispatch(argc, argv, bench_commands, sizeof bench_commands / sizeof *bench_commands,
                    "molt bench");
}

int main(int argc, char **argv) {
    lora_set_checkpoint_loader(trn_checkpoint_adapter); // serving and eval read step-N.h5
    return dispatch(argc, argv, commands, sizeof commands / sizeof *commands, "molt");
}
