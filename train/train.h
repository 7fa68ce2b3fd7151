// train/train.h: the trainer's building blocks: the AdamW optimizer with gradient clipping
// and accumulation helpers (opt_), learning-rate schedules (sched_), HDF5 checkpoints with
// integrity checks and SHA-256 hashing (ckpt_), and the metrics log and progress line
// (metrics_).
//
// Not here: the training loop itself, the model, adapters and data (this header is included
// only by molt.c and the tests; the loop that ties these pieces together builds on them).
#ifndef MOLT_TRAIN_H
#define MOLT_TRAIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "../autograd/autograd.h"
#include "../common/err.h"
#include "../common/sha256.h"

// ---------------------------------------------------------------------------------------
// AdamW, the semantics of torch.optim.AdamW (decoupled weight decay, bias correction, fp32
// moments), per parameter tensor:
//   t += 1;  p *= 1 - lr*wd;  m = lerp(m, g, 1 - b1);  v = v*b2 + (1 - b2)*g*g;
//   p += -(lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// Scalars are formed in double as Python does and rounded to float once; the tensor
// arithmetic is float in the same order as PyTorch's CPU kernels (see optim.c).
typedef struct {
    double beta1, beta2; // 0.9, 0.999
    double eps;          // 1e-8
    double weight_decay; // 0.01
} opt_adamw_config;

typedef struct {
    int n;               // number of parameters
    ag_tensor **params;  // [n] F32 CPU tensors, not owned; gradients in params[i]->grad
    float **m, **v;      // [n][numel] first and second moments (owned)
    int64_t *steps;      // [n] updates applied to each parameter (torch's state["step"])
    opt_adamw_config cfg;
} opt_adamw;

// Fills cfg with torch.optim.AdamW's defaults (b1 0.9, b2 0.999, eps 1e-8, wd 0.01).
void opt_adamw_defaults(opt_adamw_config *cfg);
// Takes n F32 CPU parameters (not owned; they must outlive o) and zeroed moments. Errors:
// MOLT_EARG naming the parameter for a non-F32 or non-CPU tensor, or a bad config value.
molt_status opt_adamw_init(opt_adamw *o, int n, ag_tensor *const *params,
                           const opt_adamw_config *cfg);
void opt_adamw_free(opt_adamw *o);
// One update at learning rate lr. A parameter whose grad is NULL is skipped entirely (its
// step count and moments stay), as torch skips parameters whose .grad is None.
molt_status opt_adamw_step(opt_adamw *o, double lr);
// The index of the first parameter whose next update at lr would make it (or its moments)
// non-finite (overflow, 0/0 with eps 0, a non-finite gradient), or -1 when every update
// stays finite. Changes nothing; costs about one update.
int opt_adamw_nonfinite(const opt_adamw *o, double lr);

// Global L2 gradient clipping as torch.nn.utils.clip_grad_norm_: the total norm over all
// gradients (NULL grads ignored), coef = max_norm / (total + 1e-6) clamped to 1, every
// gradient scaled by coef when it is below 1. The squares are summed in double and the
// norm rounded to float (torch reduces in float; the results agree to float rounding).
// Returns the total norm before clipping in *total_norm (may be NULL). max_norm <= 0
// disables clipping but still reports the norm. Non-finite norms are reported, not clipped.
molt_status opt_clip_grad_norm(ag_tensor *const *params, int n, double max_norm,
                               double *total_norm);
// The parts of opt_clip_grad_norm, for a norm over gradients spread across processes: the
// sum of the squared float norms of params' f32 gradients (NULL grads ignored), and the
// clipping of every gradient for a given total norm.
double opt_grad_sumsq(ag_tensor *const *params, int n);
void opt_clip_to(ag_tensor *const *params, int n, double max_norm, float total);
// Multiplies every gradient by s (1/accum after accumulating micro-batches); NULL grads
// are skipped.
void opt_grads_scale(ag_tensor *const *params, int n, double s);
// Zeroes every gradient that exists.
void opt_grads_zero(ag_tensor *const *params, int n);

// ---------------------------------------------------------------------------------------
// Learning-rate schedules: the lambdas of transformers' get_constant_schedule_with_warmup,
// get_linear_schedule_with_warmup and get_cosine_schedule_with_warmup (num_cycles 0.5,
// minimum 0), applied as torch's LambdaLR does: lr(step) = lr_max * factor(step), where
// step counts scheduler steps taken (0 for the first optimizer update).
typedef enum { SCHED_CONSTANT, SCHED_LINEAR, SCHED_COSINE, SCHED_KIND_COUNT } sched_kind;

typedef struct {
    sched_kind kind;
    double lr_max;        // the optimizer's base learning rate
    int64_t warmup_steps; // linear ramp from 0 over these steps
    int64_t total_steps;  // num_training_steps (unused by constant)
    double num_cycles;    // cosine only: 0.5 = one half cosine down to 0
    int64_t step;         // scheduler steps taken so far (checkpointed)
} sched_state;

// MOLT_EARG for negative step counts or a non-positive/non-finite lr_max.
molt_status sched_init(sched_state *s, sched_kind kind, double lr_max, int64_t warmup_steps,
                       int64_t total_steps);
// "constant", "linear", "cosine" -> kind; MOLT_EARG listing the choices otherwise.
molt_status sched_kind_parse(const char *name, sched_kind *kind);
const char *sched_kind_name(sched_kind kind);
double sched_factor(const sched_state *s, int64_t step); // the lambda at `step`
double sched_lr(const sched_state *s);                   // lr_max * factor(s->step)
void sched_advance(sched_state *s);                      // s->step += 1

// ---------------------------------------------------------------------------------------
// SHA-256 (common/sha256.h) hashes the checkpoint contents and ties a checkpoint to its
// base model's config, weights index and tokenizer.

// ---------------------------------------------------------------------------------------
// Checkpoint contents: named float tensors (adapter parameters, AdamW moments), int64 and
// double scalars (steps, scheduler state), and byte blobs (RNG states, data cursor,
// resolved config YAML, hashes). Names are unique per kind, 1-127 characters, no '/'.
#define CKPT_NAME_MAX 128
#define CKPT_FORMAT_VERSION 2
#define CKPT_MAGIC "MOLTCKPT"    // first line of the file
#define CKPT_HEADER_BYTES 512    // the text header; the manifest follows, up to the user block
#define CKPT_MAX_ENTRIES 1000000 // more entries than any real run writes

typedef struct {
    char name[CKPT_NAME_MAX];
    int ndim;
    int64_t shape[AG_MAX_DIMS];
    int64_t numel;
    float *data; // [numel] owned
} ckpt_tensor;

typedef struct {
    char name[CKPT_NAME_MAX];
    int64_t i;   // for int scalars
    double f;    // for double scalars
} ckpt_scalar;

typedef struct {
    char name[CKPT_NAME_MAX];
    uint8_t *data; // [len + 1] owned; a NUL follows the bytes so text blobs read as strings
    size_t len;
} ckpt_blob;

typedef struct {
    int64_t step; // training step the checkpoint was taken after
    ckpt_tensor *tensors;
    int n_tensors, cap_tensors;
    ckpt_scalar *ints, *floats;
    int n_ints, cap_ints, n_floats, cap_floats;
    ckpt_blob *blobs;
    int n_blobs, cap_blobs;
} ckpt_state;

void ckpt_state_init(ckpt_state *s);
void ckpt_state_free(ckpt_state *s);
// Setters copy their inputs and replace an entry of the same name. MOLT_EARG for a bad
// name or shape, MOLT_ENOMEM with the state unchanged.
molt_status ckpt_set_tensor(ckpt_state *s, const char *name, int ndim, const int64_t *shape,
                            const float *data);
molt_status ckpt_set_int(ckpt_state *s, const char *name, int64_t v);
molt_status ckpt_set_float(ckpt_state *s, const char *name, double v);
molt_status ckpt_set_blob(ckpt_state *s, const char *name, const void *data, size_t len);
molt_status ckpt_set_string(ckpt_state *s, const char *name, const char *text);
// Lookups: NULL / MOLT_EFORMAT naming the missing entry.
const ckpt_tensor *ckpt_get_tensor(const ckpt_state *s, const char *name);
const ckpt_blob *ckpt_get_blob(const ckpt_state *s, const char *name);
molt_status ckpt_get_int(const ckpt_state *s, const char *name, int64_t *v);
molt_status ckpt_get_float(const ckpt_state *s, const char *name, double *v);
// SHA-256 over every entry (sorted by name within each kind) and the step: the checksum
// stored in the file.
void ckpt_state_digest(const ckpt_state *s, char hex[65]);

// Hashes that tie a checkpoint to its base model and tokenizer (hex, or ""): SHA-256 of the
// config, the tokenizer and a sharded model's index; a single weights file's sampled
// fingerprint (molt_fingerprint_file).
typedef struct {
    char model_config[65];
    char weights_index[65];
    char tokenizer[65];
} ckpt_hashes;
// Stores the three hashes as blobs "hash.model_config", "hash.weights_index",
// "hash.tokenizer".
molt_status ckpt_set_hashes(ckpt_state *s, const ckpt_hashes *h);
// Compares the checkpoint's hashes with the current ones. On a difference: MOLT_EARG with a
// message naming each differing hash and both values, unless force, in which case MOLT_OK
// and the same text in warn (when warn is not NULL; "" when all agree).
molt_status ckpt_check_hashes(const ckpt_state *s, const char *path, const ckpt_hashes *cur,
                              bool force, char *warn, size_t warn_cap);

// Writes output_dir/checkpoints/step-<step>.h5 atomically: the file is written as
// step-<step>.h5.tmp, fsynced, renamed, and the directory fsynced, so a crash leaves either
// the old set of checkpoints or the new one. Then deletes all but the newest keep_last
// step-*.h5 files (keep_last <= 0 keeps all). Creates the directories as needed. The path
// written goes to path_out (owned by the caller, molt_free) when not NULL.
molt_status ckpt_write(const char *output_dir, const ckpt_state *s, int keep_last,
                       char **path_out);
// Reads and validates a checkpoint file: the header (format version, size, SHA-256 of the
// rest), the manifest (kinds, dims, data ranges inside the file, names: 1-127 characters,
// no '/', no control characters, no duplicates), and the digest of the contents. The data
// are read where the manifest says; HDF5 is not used, so a crafted file cannot reach its
// parser. MOLT_EFORMAT / MOLT_EIO with a message naming the file. On success s holds the
// contents (call ckpt_state_free); on failure s is left empty.
molt_status ckpt_read(const char *path, ckpt_state *s);
// The same from a buffer of len bytes (label names it in messages).
molt_status ckpt_read_memory(const void *buf, size_t len, const char *label, ckpt_state *s);

// Called for each checkpoint file that fails validation while scanning.
typedef void (*ckpt_report_fn)(void *user, const char *path, const char *message);
// Scans output_dir/checkpoints/step-<N>.h5 newest first (by N; *.tmp files are ignored),
// reports each invalid file through report (may be NULL) and loads the first valid one into
// s, its path into *path_out (molt_free). With no checkpoint files at all: MOLT_OK and
// *path_out = NULL. With files but none valid: MOLT_EFORMAT saying how many were rejected.
molt_status ckpt_find_latest_valid(const char *output_dir, ckpt_report_fn report, void *user,
                                   char **path_out, ckpt_state *s);

// ---------------------------------------------------------------------------------------
// Metrics: output_dir/metrics.jsonl, one JSON object per line, numbers with %.17g so a
// resumed run can be compared exactly with an uninterrupted one.
typedef struct {
    int64_t step;
    double loss, lr, grad_norm;
    int64_t tokens;        // tokens trained on so far
    double tokens_per_s;
    double elapsed_s;
    bool has_eval;
    double eval_loss;      // written only when has_eval
} metrics_row;

typedef struct {
    FILE *f;
    char *path;
} metrics_log;

// The JSON line for r, with a trailing newline, into buf; returns the length it needs
// (snprintf-style). Non-finite numbers are written as null (JSON has no NaN).
int metrics_format_json(char *buf, size_t cap, const metrics_row *r);
// Opens output_dir/metrics.jsonl for appending (creating it). When keep_through_step >= 0,
// lines of an earlier run with "step" > keep_through_step are dropped first, so a resumed
// run continues the log without duplicates.
molt_status metrics_open(metrics_log *m, const char *output_dir, int64_t keep_through_step);
// Appends one line and flushes it.
molt_status metrics_append(metrics_log *m, const metrics_row *r);
void metrics_close(metrics_log *m);

// Inputs of the terminal progress line.
typedef struct {
    int64_t step, total_steps;
    double loss, lr, tokens_per_s;
    double elapsed_s;      // wall time of this run (since start or resume)
    int64_t steps_this_run; // steps done in elapsed_s (for the ETA)
} metrics_progress;
// "step 12/100 | loss 2.3456 | lr 1.000e-04 | 1234 tok/s | elapsed 0:00:10 | ETA 0:01:13"
// into buf (ETA "?" before the first step of a run); returns snprintf's length.
int metrics_format_progress(char *buf, size_t cap, const metrics_progress *p);

#endif
