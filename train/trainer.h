// train/trainer.h: the `molt train` pipeline: its YAML configuration (trn_config, parsed
// in train/config.c with --set overrides), the training loop with checkpoints, exact resume,
// evaluation and adapter export (train/trainer.c), and the command line (train/cli.c).
//
// Not here: the optimizer, schedules, checkpoint files and metrics log themselves (train.h),
// the model, the adapters and the data pipeline (their modules).
#ifndef MOLT_TRAINER_H
#define MOLT_TRAINER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/err.h"
#include "../adapters/adapters.h"
#include "../data/data.h"
#include "train.h"

#define TRN_PATH_MAX 1024
#define TRN_SPEC_MAX 2048

// Every setting of a run, after defaults, the YAML file and --set overrides.
typedef struct {
    char model[TRN_PATH_MAX];     // model.path: base model directory (required)
    char quant[256];              // model.quant: "none" or an mdl_qspec ("nf4", ...)
    char tokenizer[TRN_PATH_MAX]; // model.tokenizer: "" = tekken.json/tokenizer.json in model
    char adapter[TRN_SPEC_MAX];   // compact lora spec built from the adapter.* keys
    int n_train, n_eval;
    char train_files[DS_MAX_INPUTS][TRN_PATH_MAX]; // data.train
    char eval_files[DS_MAX_INPUTS][TRN_PATH_MAX];  // data.eval
    double eval_split;            // data.eval_split: fraction of the training records held
                                  // out for evaluation, in [0, 0.5) (0: off; see ds_config)
    ds_format format;             // data.format
    ds_on_bad on_bad;             // data.on_bad
    int max_seq_len;              // data.max_seq_len
    bool packing, shuffle;        // data.packing, data.shuffle
    int batch_size, grad_accum;   // train.batch_size (rows), train.grad_accum
    int64_t steps;                // train.steps (0: from train.epochs)
    double epochs;                // train.epochs
    uint64_t seed;                // train.seed (data order and adapter init)
    bool activation_checkpointing; // train.activation_checkpointing: recompute each layer
    bool nonfinite_skip;          // train.on_nonfinite: skip (true) or stop (false) a step
                                  // whose loss, gradient norm or update is not finite
    int log_every;                // train.log_every: plain progress lines
    opt_adamw_config adamw;       // optim.beta1/beta2/eps/weight_decay
    double lr, max_grad_norm;     // optim.lr, optim.max_grad_norm (<= 0: no clipping)
    sched_kind schedule;          // schedule.kind
    int64_t warmup_steps;         // schedule.warmup_steps
    char output_dir[TRN_PATH_MAX];
    int ckpt_every, keep_last;    // checkpoint.every (0: at the end only), keep_last
    int eval_every, eval_max_batches; // eval.every (0: at the end only), eval.max_batches
    int par_data;                 // parallel.data: replicas (0: ranks / parallel.expert)
    int par_expert;               // parallel.expert: ranks the routed experts are split over
    double par_timeout_s;         // parallel.timeout_s: a collective waiting longer fails
} trn_config;

// Fills c with the defaults (the required paths empty).
void trn_config_default(trn_config *c);
// Reads the YAML file `path`, then applies each "key=value" of sets (n_sets of them; the
// value is a YAML scalar, lists as comma-separated items). Errors are MOLT_EARG naming the
// key and where it came from ("FILE:LINE" or "--set"): unknown keys, bad values, wrong YAML
// structure, missing required keys.
molt_status trn_config_load(const char *path, char *const *sets, int n_sets, trn_config *c);
// True when c evaluates: data.eval files or a data.eval_split.
bool trn_config_has_eval(const trn_config *c);
// The canonical YAML text of c (every key, nested by section) into a new string (molt_free).
char *trn_config_yaml(const trn_config *c);

// Options of one run that are not part of the configuration.
typedef struct {
    const char *resume;  // NULL: fresh (refused when checkpoints exist); "auto"; or a path
    bool force;          // resume across a different base model or tokenizer
    bool eval_only;      // evaluate (base, or base + eval_adapter) and exit
    const char *eval_adapter; // adapter file or PEFT directory for eval_only (may be NULL)
    bool quiet;          // no progress output
    ag_comm *world;      // every rank of the job (autograd/comm/comm.h); NULL: one process
} trn_run_opts;

// Runs training (or evaluation) as configured. Writes output_dir/{config.resolved.yaml,
// metrics.jsonl, checkpoints/, adapter/ (PEFT), adapter.h5 (molt, HDF5)}. Returns
// MOLT_OK, or an error with its message; *interrupted is set when Ctrl-C stopped it after
// a checkpoint.
molt_status trn_run(const trn_config *c, const trn_run_opts *o, bool *interrupted);

// The known keys with a line of help each, for --help.
void trn_config_print_keys(FILE *f);

// ---- across ranks (train/parallel.c) ----------------------------------------------------
// World rank r = d * expert + e: replica d of parallel.data holds expert block e of
// parallel.expert. Each rank trains on batch_size / ranks rows of every batch.
typedef struct {
    ag_comm *world;        // not owned
    ag_comm *ep;           // the ranks of replica d (expert group; NULL with one rank)
    ag_comm *dp;           // the ranks holding expert block e (NULL with one rank)
    int rank, size, data, expert, d, e;
} trn_par;
// Checks data x expert = ranks and batch_size % ranks == 0 (MOLT_EARG naming the keys), sets
// the world's timeout and splits the groups (collective).
molt_status trn_par_init(trn_par *p, ag_comm *world, const trn_config *c);
void trn_par_free(trn_par *p);
// The expert group to shard the model over (NULL when parallel.expert is 1).
ag_comm *trn_par_experts(const trn_par *p);
// This rank's rows [*row0, *row0 + *n) of a batch of `rows` rows, rows_used of them real
// (*n may be 0 in the last batch of an epoch).
void trn_par_rows(const trn_par *p, int rows, int rows_used, int *row0, int *n);
// v[0..n) summed over the world; *flag true on every rank when it is true on one.
molt_status trn_par_sum(const trn_par *p, double *v, int n);
molt_status trn_par_any(const trn_par *p, bool *flag);
// Gradients summed: params with shard[i] false over the world, shard[i] true (routed-expert
// LoRA of a sharded model) over the replicas of the shard. Afterwards every parameter has a
// gradient, the same on every rank that holds it.
molt_status trn_par_reduce_grads(const trn_par *p, ag_tensor *const *params, const bool *shard,
                                 int n);
// opt_clip_grad_norm over the whole adapter: the shards' squares summed over the expert group.
molt_status trn_par_clip(const trn_par *p, ag_tensor *const *params, const bool *shard, int n,
                         double max_norm, double *total_norm);
// Rank 0 writes files; the ranks of replica 0 take part in gathering shards.
bool trn_par_writes(const trn_par *p);
bool trn_par_gathers(const trn_par *p);
// Prints (rank 0, f not NULL) each rank's memory peak (molt's data, common/err.h, and the
// process's VmHWM) and, across ranks, its seconds in collectives against loop_s. Collective.
molt_status trn_par_report(const trn_par *p, FILE *f, double loop_s, int64_t steps);
// full = unit u's whole A (b false) or B from every rank's `local` (collective over the
// expert group for a shard; a copy otherwise). Only ranks where trn_par_gathers is true call
// it.
molt_status trn_par_gather(const trn_par *p, const lora_adapter *ad, const lora_unit *u, bool b,
                           const float *local, float *full);

int trn_cmd_train(int argc, char **argv); // molt train
// molt export: --checkpoint CKPT here (train/export.c), every other form is lora_cmd_export.
int trn_cmd_export(int argc, char **argv);
// The adapter of a training checkpoint (step-N.h5) attached to m as lora_attach does with
// `wire`: the run's adapter spec from the checkpoint's configuration, every A and B from its
// tensors. For adapters.h lora_set_checkpoint_loader. Errors name the file and tensor.
molt_status trn_checkpoint_adapter(mdl_model *m, const char *path, lora_wire wire,
                                   lora_adapter *out);
int trn_cmd_bench_ckpt(int argc, char **argv); // molt bench ckpt (train/bench.c)

// ---- memory plans (train/plan.c; the command in train/plan_cli.c) ------------------------
typedef struct {
    mcfg cfg;               // the model
    int ranks, data, expert; // data 0: ranks / expert; expert 0: 1
    mdl_qspec quant;        // the base's formats when quant_set (else f32)
    bool quant_set;
    lora_spec adapter;
    int seq_len, batch;     // the global batch: batch rows of seq_len tokens
    bool act_ckpt;          // count the activations with checkpointing
    double tokenizer_bytes; // what loading the tokenizer takes (measured by the caller)
} trn_plan_opts;
// Bytes per rank (doubles: counts of bytes), parameters per rank.
typedef struct {
    int data, expert, rows;          // the layout, rows per rank
    int64_t tokens;                  // tokens per rank and micro-batch
    size_t weights[MDL_PG_COUNT];    // base weights by group
    double weights_total;
    double params_replicated, params_shard, params_full; // LoRA parameters
    double adapter, grads, optimizer;
    double act_plain, act_ckpt;      // activation peak without / with checkpointing
    double activations;              // the one counted
    double workspace;                // the largest kernel scratch (inside the activations)
    double comm;                     // the gradient-reduction bucket
    double kv_cache;                 // the latent cache of rows x seq_len tokens
    double host;                     // host side: tokenizer and batches
    double ckpt_staging;             // host side of rank 0 while it writes a checkpoint
    double total;                    // the training peak of a rank's device (or CPU) side
    double total_cpu;                // device and host side in one memory (a CPU run)
    double total_cpu_rank0;          // the same with a checkpoint staged on rank 0
    double total_infer;              // weights, adapter, KV cache
} trn_plan;
// The plan of one rank. MOLT_EARG when the layout does not fit the model or the batch.
molt_status trn_plan_compute(const trn_plan_opts *o, trn_plan *p);
int trn_cmd_plan(int argc, char **argv); // molt plan

#endif
