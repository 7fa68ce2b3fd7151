// train/trn_internal.h: what the training loop (trainer.c) shares with its checkpoint and
// adapter files (trn_state.c): the state of one run. Not a public API (trainer.h has that).
#ifndef MOLT_TRN_INTERNAL_H
#define MOLT_TRN_INTERNAL_H

#include "trainer.h"

#include "../model/model.h"

typedef struct {
    const trn_config *cfg;
    const trn_run_opts *o;
    tok_tokenizer *tok;
    chat_template *ct;
    mdl_model model;
    lora_adapter ad;
    bool attached;
    int n_params;
    ag_tensor **params;             // [n_params] A and B of every unit, in unit order
    char (*names)[CKPT_NAME_MAX];   // [n_params] "<unit path>.lora_A" / ".lora_B"
    opt_adamw opt;
    bool opt_init;
    sched_state sched;
    ds_loader *loader;
    ds_batch batch;
    ag_ctx ctx;
    int64_t step, total_steps, tokens, tokens_run;
    double elapsed_prev;            // seconds trained before this run (resumed)
    ckpt_hashes hashes;
    char *resolved;                 // config.resolved.yaml text
    metrics_log mlog;
    bool mlog_open;
    trn_par par;                    // the ranks (one process: a world of one)
    bool quiet;                     // no progress output (--quiet, or not rank 0)
    bool *shard;                    // [n_params] a routed-expert LoRA shard (expert parallel)
    double comm_s0;                 // seconds in collectives when the loop started
    bool grads_dumped;              // MOLT_TEST_GRADS written
} trn;

// Writes a checkpoint of the current step (shards gathered on replica 0, rank 0 writes);
// elapsed_run: seconds of this run so far. Test hooks MOLT_TEST_KILL_AT_STEP and
// MOLT_TEST_KILL_IN_CKPT_WRITE end the process around the write.
molt_status trn_save_ckpt(trn *t, double elapsed_run);
// Applies --resume: nothing (refused when checkpoints exist), the newest valid checkpoint, or
// a given file; *resumed tells whether state was restored.
molt_status trn_maybe_resume(trn *t, bool *resumed);
// MOLT_TEST_GRADS: the whole adapter's gradient of this run's first step, as safetensors.
molt_status trn_dump_grads(trn *t);
// The adapter as a PEFT directory and a molt adapter file (shards gathered, rank 0 writes).
molt_status trn_save_adapter(trn *t);
// A test hook's number from the environment, -1 when unset.
long trn_env_long(const char *name);

#endif
