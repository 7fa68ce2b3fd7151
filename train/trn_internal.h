// train/trn_internal.h: what the files of the training loop share: the state of one run
// (trainer.c, the loop), its checkpoints, resume and adapter files (trn_state.c) and the
// checks made before the run and at resume (preflight.c). Not a public API (trainer.h has
// that).
#ifndef MOLT_TRN_INTERNAL_H
#define MOLT_TRN_INTERNAL_H

#include "trainer.h"

#include "../adapters/adapters.h"
#include "../model/model.h"

// One run of molt train: everything the loop and the checkpoints share.
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
    int64_t last_ckpt_step;         // step of the newest checkpoint on disk (-1: none)
    int64_t skipped;                // steps skipped for a non-finite loss or update
    char paths[2][DS_MAX_INPUTS][TRN_PATH_MAX]; // the FILE of each data.train / data.eval
                                    // item (FILE@W), which the loaders point to
    trn_par par;                    // the ranks (one process: a world of one)
    bool quiet;                     // no progress output (--quiet, or not rank 0)
    bool *shard;                    // [n_params] a routed-expert LoRA shard (expert parallel)
    bool grads_dumped;              // MOLT_TEST_GRADS written
} trn;

// Writes a checkpoint of the current step (shards gathered on replica 0, rank 0 writes) and
// records it in t->last_ckpt_step; elapsed_run: seconds of this run so far. Test hooks
// MOLT_TEST_KILL_AT_STEP and MOLT_TEST_KILL_IN_CKPT_WRITE end the process around the write.
molt_status trn_save_ckpt(trn *t, double elapsed_run);
// Applies --resume (nothing, "auto" or a path): refuses checkpoints when there are some and
// no --resume, restores the newest valid one (or the one named) after checking its base
// model, tokenizer and adapter spec, each rank keeping its part. *resumed tells whether a
// checkpoint was restored.
molt_status trn_maybe_resume(trn *t, bool *resumed);
// MOLT_TEST_GRADS: the whole adapter's gradient of this run's first step, as safetensors.
molt_status trn_dump_grads(trn *t);
// The adapter as a PEFT directory and a molt adapter file (shards gathered, rank 0 writes).
molt_status trn_save_adapter(trn *t);
// The value of an integer environment variable (test hooks), -1 when unset.
long trn_env_long(const char *name);

// Before the model loads, from model.path/config.json: data.max_seq_len within the model's
// max_position_embeddings, and the estimated memory of one step (batch_size rows of
// max_seq_len tokens) within the memory available. MOLT_EARG / MOLT_ENOMEM saying which
// key to change.
molt_status trn_check_sizes(const trn_config *c);
// Refuses (MOLT_EARG) resuming from checkpoint `file`, whose resolved configuration is
// `resolved` (config.resolved.yaml text), with an adapter spec that differs from spec_now
// in anything but its initialization (init, seed): targets, ranks, alphas, patterns,
// dropout, rsLoRA. The message shows both specs.
molt_status trn_check_resume_spec(const char *resolved, const char *spec_now,
                                  const char *file);

#endif
