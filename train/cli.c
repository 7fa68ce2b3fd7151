// train/cli.c: the `molt train` command line: reads the options, loads the configuration
// and hands over to trn_run. Exit status 0 on success, 1 on failure, 2 on bad usage, 130
// when Ctrl-C stopped training after writing a checkpoint.
//
// Not here: the configuration keys (config.c), the training loop (trainer.c).
#include "trainer.h"

#include "../autograd/comm/comm.h"
#include "../common/opt.h"

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
    "Across processes: mpirun -np N molt train ... (or srun) runs N ranks, parallel.data x\n"
    "parallel.expert = N (parallel.data defaults to N / parallel.expert). Each rank trains on\n"
    "batch_size / N rows of every batch; the routed experts are split over parallel.expert\n"
    "ranks. Rank 0 prints and writes every file; checkpoints do not depend on N. A rank that\n"
    "fails, or a collective waiting longer than parallel.timeout_s, ends the whole job.\n"
    "\n"
    "keys:\n";

typedef struct {
    char **sets;
    int n_sets;
} set_list;

static int add_set(void *user, const char *v) {
    set_list *l = user;
    l->sets[l->n_sets++] = (char *)v;
    return 0;
}

int trn_cmd_train(int argc, char **argv) {
    const char *cmd = "molt train", *config = NULL;
    trn_run_opts o = {0};
    set_list sl = {molt_calloc((size_t)argc + 1, sizeof *sl.sets), 0};
    if (!sl.sets)
        return 1;
    const molt_opt opts[] = {MOLT_OPT("--config", &config),
                             MOLT_OPT_EACH("--set", add_set),
                             MOLT_OPT("--resume", &o.resume),
                             MOLT_OPT("--adapter", &o.eval_adapter),
                             MOLT_OPT_FLAG("--force", &o.force),
                             MOLT_OPT_FLAG("--eval-only", &o.eval_only),
                             MOLT_OPT_FLAG("--quiet", &o.quiet),
                             MOLT_OPT_END};
    int rc = molt_opts_parse(cmd, usage, opts, argc, argv, 1, &sl);
    if (rc < 0) {
        trn_config_print_keys(stdout);
        molt_free(sl.sets);
        return 0;
    }
    if (rc == 0 && !config)
        rc = molt_opt_usage_error(cmd, "--config is required");
    if (rc == 0 && o.eval_adapter && !o.eval_only)
        rc = molt_opt_usage_error(cmd, "--adapter goes with --eval-only");
    trn_config *c = rc == 0 ? molt_malloc(sizeof *c) : NULL;
    if (rc == 0 && !c)
        rc = 1;
    if (rc == 0 && trn_config_load(config, sl.sets, sl.n_sets, c) != MOLT_OK) {
        fprintf(stderr, "molt train: %s\n", molt_err_msg());
        rc = 2;
    }
    ag_comm *world = NULL;
    if (rc == 0 && ag_comm_world(c->par_timeout_s, &world) != MOLT_OK) {
        fprintf(stderr, "molt train: %s\n", molt_err_msg());
        rc = 1;
    }
    o.world = world;
    bool interrupted = false;
    if (rc == 0 && trn_run(c, &o, &interrupted) != MOLT_OK) {
        if (ag_comm_size(world) > 1) { // the others would wait for this rank: end them all
            char why[2200];
            snprintf(why, sizeof why, "molt train: %s", molt_err_msg());
            ag_comm_abort(world, 1, why);
        }
        fprintf(stderr, "molt train: %s\n", molt_err_msg());
        rc = 1;
    }
    ag_comm_free(world);
    if (rc == 0 && interrupted)
        rc = 130;
    molt_free(c);
    molt_free(sl.sets);
    return rc;
}
