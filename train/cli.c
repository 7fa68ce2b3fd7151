// train/cli.c: the `molt train` command line: reads the options, loads the configuration
// and hands over to trn_run. Exit status 0 on success, 1 on failure, 2 on bad usage, 130
// when Ctrl-C stopped training after writing a checkpoint.
//
// Not here: the configuration keys (config.c), the training loop (trainer.c).
#include "trainer.h"

#include <string.h>

static const char usage[] =
    "usage: molt train --config FILE.yaml [--set key=value ...] [--resume auto|PATH]\n"
    "                  [--force] [--eval-only [--adapter PATH]] [--quiet]\n"
    "\n"
    "Trains a LoRA adapter on a base model as FILE.yaml says. --set overrides one key\n"
    "(repeatable; lists as comma-separated items). Writes output_dir/config.resolved.yaml,\n"
    "metrics.jsonl, checkpoints/step-N.h5 and, at the end, the adapter as output_dir/adapter/\n"
    "(PEFT) and output_dir/adapter.h5 (molt, HDF5). --resume auto continues from the\n"
    "newest valid checkpoint (a corrupt one is skipped for the next older); a checkpoint of\n"
    "another base model or tokenizer is refused unless --force. Ctrl-C writes a checkpoint\n"
    "and exits. --eval-only prints the loss on data.eval of the base model, or of the base\n"
    "model with --adapter (a PEFT directory or molt adapter file), and trains nothing.\n"
    "\n"
    "keys:\n";

static int bad_usage(const char *fmt, const char *arg) {
    fprintf(stderr, "molt train: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n(see molt train --help)\n");
    return 2;
}

int trn_cmd_train(int argc, char **argv) {
    const char *config = NULL;
    trn_run_opts o = {0};
    char **sets = molt_calloc((size_t)argc + 1, sizeof *sets);
    int n_sets = 0, rc = 0;
    if (!sets)
        return 1;
    for (int i = 1; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(usage, stdout);
            trn_config_print_keys(stdout);
            molt_free(sets);
            return 0;
        } else if (!strcmp(a, "--config") && has_val) {
            config = argv[++i];
        } else if (!strcmp(a, "--set") && has_val) {
            sets[n_sets++] = argv[++i];
        } else if (!strcmp(a, "--resume") && has_val) {
            o.resume = argv[++i];
        } else if (!strcmp(a, "--adapter") && has_val) {
            o.eval_adapter = argv[++i];
        } else if (!strcmp(a, "--force")) {
            o.force = true;
        } else if (!strcmp(a, "--eval-only")) {
            o.eval_only = true;
        } else if (!strcmp(a, "--quiet")) {
            o.quiet = true;
        } else {
            bool valued = !strcmp(a, "--config") || !strcmp(a, "--set") ||
                          !strcmp(a, "--resume") || !strcmp(a, "--adapter");
            rc = bad_usage(valued ? "'%s' needs a value" : "unknown option '%s'", a);
        }
    }
    if (rc == 0 && !config)
        rc = bad_usage("%s", "--config is required");
    if (rc == 0 && o.eval_adapter && !o.eval_only)
        rc = bad_usage("%s", "--adapter goes with --eval-only");
    trn_config *c = rc == 0 ? molt_malloc(sizeof *c) : NULL;
    if (rc == 0 && !c)
        rc = 1;
    if (rc == 0 && trn_config_load(config, sets, n_sets, c) != MOLT_OK) {
        fprintf(stderr, "molt train: %s\n", molt_err_msg());
        rc = 2;
    }
    bool interrupted = false;
    if (rc == 0 && trn_run(c, &o, &interrupted) != MOLT_OK) {
        fprintf(stderr, "molt train: %s\n", molt_err_msg());
        rc = 1;
    }
    if (rc == 0 && interrupted)
        rc = 130;
    molt_free(c);
    molt_free(sets);
    return rc;
}
