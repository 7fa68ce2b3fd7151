// train/trainer.c: the training loop of `molt train`: loads the tokenizer and the base model
// (optionally quantized), attaches the LoRA adapter, streams packed batches, runs forward,
// backward, gradient accumulation, clipping, AdamW and the schedule, evaluates, logs metrics,
// writes checkpoints, and saves the adapter. It checks its inputs before it commits (data,
// outputs; sizes in preflight.c), stops a step whose loss or update is not finite, and acts
// on Ctrl-C / SIGTERM between layers (the step in progress is abandoned and repeated on
// resume; across ranks the step is finished, so that every rank stops after the same one).
// Across ranks each rank runs this loop on its rows of every batch (its experts only, with
// expert parallelism); gradients are reduced after the micro-batches and rank 0 writes the
// files.
//
// Not here: configuration parsing (config.c), the command line (cli.c), the optimizer,
// schedules, checkpoint files and metrics formats (optim.c, schedule.c, checkpoint.c,
// metrics.c), writing and resuming checkpoints and the adapter files (trn_state.c), the
// pre-run size and spec checks (preflight.c), the groups of ranks and the reductions
// (parallel.c).
#include "trn_internal.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../adapters/adapters.h"
#include "../autograd/comm/comm.h"
#include "../common/fsio.h"
#include "../model/model.h"

// Where a step started: what a checkpoint needs when the step is abandoned half-way.
typedef struct {
    ds_cursor cursor;
    ag_rng dropout;
    int64_t tokens, tokens_run;
} step_start;

// The first stop signal asks for a stop: the forward and backward check it between layers
// and nodes, the loop between steps, and a checkpoint is written. Across ranks only the loop
// checks it (g_abandon 0): a rank abandoning its step would leave the others waiting in the
// step's collectives, so every rank finishes the step and they agree to stop after it. A
// second signal leaves at once: the checkpoints on disk are complete files (written under a
// temporary name and renamed), so the newest one stays intact.
static volatile sig_atomic_t g_stop, g_abandon;
static void on_signal(int sig) {
    if (g_stop) {
        static const char msg[] = "\nmolt train: second stop signal: exiting now (the last "
                                  "checkpoint on disk is intact)\n";
        ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void)w;
        _exit(128 + sig);
    }
    g_stop = sig;
    if (g_abandon)
        ag_interrupt_set(sig);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static molt_status mkdir_p(const char *path) {
    char buf[TRN_PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; ; p++) {
        if (*p == '/' || !*p) {
            char c = *p;
            *p = 0;
            if (mkdir(buf, 0777) != 0 && errno != EEXIST)
                return molt_err(MOLT_EIO, "cannot create directory %s: %s", buf,
                                strerror(errno));
            *p = c;
            if (!c)
                break;
        }
    }
    return MOLT_OK;
}

static bool file_exists(const char *p) { return access(p, F_OK) == 0; }

static molt_status write_text(const char *path, const char *text) {
    return molt_write_atomic(path, text, strlen(text));
}

// ---- setup ------------------------------------------------------------------------------
static molt_status tokenizer_path(const trn_config *c, char *buf, size_t cap) {
    if (mdl_check_dir(c->model) != MOLT_OK)
        return molt_err_wrap(MOLT_EARG, "config key 'model.path'");
    if (*c->tokenizer) {
        snprintf(buf, cap, "%s", c->tokenizer);
        return MOLT_OK;
    }
    const char *names[] = {"tekken.json", "tokenizer.json"};
    for (int i = 0; i < 2; i++) {
        snprintf(buf, cap, "%s/%s", c->model, names[i]);
        if (file_exists(buf))
            return MOLT_OK;
    }
    return molt_err(MOLT_EIO, "train: no tekken.json or tokenizer.json in %s: set "
                    "model.tokenizer", c->model);
}

// Hashes of the base model's config, its weights index (or single weights file) and the
// tokenizer, tying checkpoints to them. A single weights file can be hundreds of GB, so it
// gets the sampled fingerprint (common/sha256.h: its header, size and 64 blocks) instead of
// a full SHA-256; the small index and config files are hashed whole.
static molt_status compute_hashes(const trn_config *c, const char *tok_path, ckpt_hashes *h) {
    char p[TRN_PATH_MAX + 64];
    memset(h, 0, sizeof *h);
    snprintf(p, sizeof p, "%s/config.json", c->model);
    MOLT_TRY(molt_sha256_file(p, h->model_config));
    const char *w[] = {"model.safetensors.index.json", "model.safetensors",
                       "consolidated.safetensors"};
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s/%s", c->model, w[i]);
        if (file_exists(p)) {
            MOLT_TRY(i == 0 ? molt_sha256_file(p, h->weights_index)
                            : molt_fingerprint_file(p, h->weights_index));
            break;
        }
    }
    return molt_sha256_file(tok_path, h->tokenizer);
}

// The base, quantized on load as model.quant says; a pre-quantized base (molt quantize)
// keeps its own quantization whatever model.quant says. With expert parallelism, only this
// rank's routed experts.
static molt_status load_model(trn *t) {
    const trn_config *c = t->cfg;
    mdl_qspec q;
    bool none = !strcmp(c->quant, "none") || !*c->quant;
    if (!none && mdl_qspec_parse(c->quant, &q) != MOLT_OK)
        return molt_err_wrap(MOLT_EARG, "config key 'model.quant'");
    MOLT_TRY(mdl_load_quant_ex(c->model, none ? NULL : &q, trn_par_experts(&t->par),
                               &t->model));
    if (none && t->model.n_qw > 0 && !t->quiet)
        fprintf(stderr, "molt train: %s is a pre-quantized base: training on its stored "
                "quantization (model.quant: none keeps it as it is)\n", c->model);
    return MOLT_OK;
}

// Collects A and B of every unit as the optimizer's parameter list.
static molt_status collect_params(trn *t) {
    int n = 2 * t->ad.n_units;
    t->params = molt_calloc((size_t)(n ? n : 1), sizeof *t->params);
    t->names = molt_calloc((size_t)(n ? n : 1), sizeof *t->names);
    t->shard = molt_calloc((size_t)(n ? n : 1), sizeof *t->shard);
    if (!t->params || !t->names || !t->shard)
        return molt_err(MOLT_ENOMEM, "train: parameter list");
    for (int i = 0; i < t->ad.n_units; i++) {
        lora_unit *u = &t->ad.units[i];
        t->params[2 * i] = u->a;
        t->params[2 * i + 1] = u->b;
        t->shard[2 * i] = t->shard[2 * i + 1] = lora_unit_is_shard(&t->ad, u);
        snprintf(t->names[2 * i], CKPT_NAME_MAX, "%.100s.lora_A", u->path);
        snprintf(t->names[2 * i + 1], CKPT_NAME_MAX, "%.100s.lora_B", u->path);
    }
    t->n_params = n;
    return MOLT_OK;
}

static molt_status open_loader(trn *t, bool eval, ds_loader **out) {
    const trn_config *c = t->cfg;
    ds_config d;
    ds_config_default(&d);
    // with a split, both sides read data.train and keep complementary sets of lines
    bool own_files = eval && c->eval_split == 0;
    int n = own_files ? c->n_eval : c->n_train;
    for (int i = 0; i < n; i++) {
        MOLT_TRY(ds_input_parse(own_files ? c->eval_files[i] : c->train_files[i], &d.inputs[i],
                                t->paths[eval][i], TRN_PATH_MAX));
        if (eval) // mixing weights are for training; evaluation reads every record once
            d.inputs[i].weight = 1.0;
    }
    d.holdout_frac = c->eval_split;
    d.holdout_seed = c->seed;
    d.holdout_keep = eval;
    d.n_inputs = n;
    d.chat = t->ct;
    d.format = c->format;
    d.on_bad = c->on_bad;
    d.max_seq_len = c->max_seq_len;
    d.batch_rows = c->batch_size;
    d.pack = c->packing;
    d.shuffle = eval ? false : c->shuffle;
    d.seed = c->seed;
    return ds_loader_open(&d, out);
}

// train.steps, or epochs * batches per epoch / grad_accum (one pass counts the batches).
static molt_status count_steps(trn *t) {
    const trn_config *c = t->cfg;
    if (c->steps > 0) {
        t->total_steps = c->steps;
        return MOLT_OK;
    }
    ds_loader *l;
    MOLT_TRY(open_loader(t, false, &l));
    ds_batch b = {0};
    int64_t nb = 0;
    molt_status st;
    do {
        st = ds_loader_next(l, &b);
        nb++;
    } while (st == MOLT_OK && !ds_loader_epoch_end(l));
    ds_batch_free(&b);
    ds_loader_close(l);
    MOLT_TRY(st);
    t->total_steps = (int64_t)ceil(c->epochs * (double)nb / c->grad_accum);
    if (t->total_steps < 1)
        t->total_steps = 1;
    return MOLT_OK;
}

// The next-token targets of a batch (labels that are not ignored).
static molt_status batch_targets(const ds_batch *b, int64_t *n) {
    int32_t *labels = molt_malloc((size_t)b->rows * (size_t)b->seq_len * sizeof *labels);
    if (!labels)
        return molt_err(MOLT_ENOMEM, "train: labels of a batch");
    ds_batch_labels(b, labels);
    *n = 0;
    for (int64_t i = 0; i < (int64_t)b->rows * b->seq_len; i++)
        *n += labels[i] >= 0;
    molt_free(labels);
    return MOLT_OK;
}

// Every data input a run needs is opened and checked before the run commits, so that a
// missing, empty or unreadable file is found now rather than after hours of training: the
// first batch of data.train, and the evaluation set (as much as one evaluation reads),
// each of which must hold trained tokens.
static molt_status check_data(trn *t) {
    const trn_config *c = t->cfg;
    ds_loader *l;
    ds_batch b = {0};
    int64_t n = 0;
    MOLT_TRY(open_loader(t, false, &l));
    molt_status st = ds_loader_next(l, &b);
    if (st == MOLT_OK)
        st = batch_targets(&b, &n);
    ds_loader_close(l);
    if (st == MOLT_OK && n == 0)
        st = molt_err(MOLT_EARG, "the first batch holds no trained token (every example in it "
                      "is masked out, or was cut away by data.on_bad: truncate)");
    if (st != MOLT_OK) {
        ds_batch_free(&b);
        return molt_err_wrap(st, "train: data.train");
    }
    if (!trn_config_has_eval(c)) {
        ds_batch_free(&b);
        return MOLT_OK;
    }
    int64_t total = 0;
    l = NULL;
    st = open_loader(t, true, &l);
    for (int k = 0; st == MOLT_OK; k++) {
        if (c->eval_max_batches > 0 && k >= c->eval_max_batches)
            break;
        st = ds_loader_next(l, &b);
        if (st == MOLT_OK)
            st = batch_targets(&b, &n);
        total += st == MOLT_OK ? n : 0;
        if (st == MOLT_OK && ds_loader_epoch_end(l))
            break;
    }
    if (l)
        ds_loader_close(l);
    ds_batch_free(&b);
    if (st == MOLT_OK && total == 0)
        st = molt_err(MOLT_EARG, "no trained token in the evaluation set (every record is bad, "
                      "longer than data.max_seq_len, or masked out)");
    return st == MOLT_OK ? MOLT_OK
                         : molt_err_wrap(st, "train: %s", c->n_eval ? "data.eval"
                                                                    : "data.eval_split");
}

// ---- one batch through the model --------------------------------------------------------
// Flattens rows [row0, row0 + n) of the (rows, seq_len) batch into one packed sequence of T
// tokens: segment ids are made unique per row (padding gets its own segment per row) so rows
// never attend to one another; targets are the next-token labels with weight 0 where there
// is none. A rank without rows (the end of an epoch split over ranks) gets one padding token
// that trains nothing: it still takes part in its expert group's all-to-alls.
static molt_status build_batch(ag_ctx *c, const ds_batch *b, int row0, int n, mdl_batch *mb,
                               double *weight) {
    int64_t S = b->seq_len, T = (int64_t)n * S, base = (int64_t)row0 * S;
    c->row_offset = base; // dropout masks as the whole batch has them
    if (n == 0) {
        ag_tensor *one[5] = {ag_tensor_new1(&c->act, AG_I32, 1), ag_tensor_new1(&c->act, AG_I32, 1),
                             ag_tensor_new1(&c->act, AG_I32, 1), ag_tensor_new1(&c->act, AG_I32, 1),
                             ag_tensor_new1(&c->act, AG_F32, 1)};
        for (int i = 0; i < 5; i++)
            if (!one[i])
                return molt_err(MOLT_ENOMEM, "train: batch of one token");
        *mb = (mdl_batch){.ids = one[0], .pos = one[1], .seg = one[2], .targets = one[3],
                          .mask = one[4]};
        *weight = 0;
        return MOLT_OK;
    }
    ag_tensor *ids = ag_tensor_new1(&c->act, AG_I32, T), *pos = ag_tensor_new1(&c->act, AG_I32, T);
    ag_tensor *seg = ag_tensor_new1(&c->act, AG_I32, T), *tg = ag_tensor_new1(&c->act, AG_I32, T);
    ag_tensor *mask = ag_tensor_new1(&c->act, AG_F32, T);
    int32_t *labels = molt_malloc((size_t)(b->rows * S) * sizeof *labels);
    if (!ids || !pos || !seg || !tg || !mask || !labels) {
        molt_free(labels);
        return molt_err(MOLT_ENOMEM, "train: batch of %lld tokens", (long long)T);
    }
    ds_batch_labels(b, labels);
    int32_t *pi = ids->data, *pp = pos->data, *ps = seg->data, *pt = tg->data;
    float *pm = mask->data;
    double w = 0;
    for (int64_t i = 0; i < T; i++) {
        int64_t g = base + i, row = g / S;
        pi[i] = b->ids[g];
        pp[i] = b->pos[g];
        ps[i] = (int32_t)(row * (S + 2) + (b->segment[g] ? b->segment[g] : S + 1));
        pt[i] = labels[g] >= 0 ? labels[g] : 0;
        pm[i] = labels[g] >= 0 ? 1.0f : 0.0f;
        w += pm[i];
    }
    molt_free(labels);
    *mb = (mdl_batch){.ids = ids, .pos = pos, .seg = seg, .targets = tg, .mask = mask};
    *weight = w;
    return MOLT_OK;
}

// Test hooks of parallel runs: MOLT_TEST_KILL_RANK / MOLT_TEST_STOP_RANK /
// MOLT_TEST_TERM_RANK = "R@S" make rank R die (SIGKILL), hang (SIGSTOP) or get a stop request
// (SIGTERM) in the middle of step S, after its first forward (once: a second SIGTERM would
// end the process).
static void rank_hooks(const trn *t) {
    static int64_t done = -1;
    if (done == t->step)
        return;
    done = t->step;
    const char *names[3] = {"MOLT_TEST_KILL_RANK", "MOLT_TEST_STOP_RANK", "MOLT_TEST_TERM_RANK"};
    const int sigs[3] = {SIGKILL, SIGSTOP, SIGTERM};
    for (int i = 0; i < 3; i++) {
        const char *v = getenv(names[i]);
        int r = -1;
        long long s = -1;
        if (v && sscanf(v, "%d@%lld", &r, &s) == 2 && r == t->par.rank && s == t->step + 1)
            raise(sigs[i]);
    }
}

// Forward (and backward when train) of one batch, this rank's rows of it; *loss is the mean
// loss over the whole batch's targets, *weight their number (0: nothing to learn, no
// backward on any rank). Each rank's loss is weighted by its share of the targets before
// backward, so the gradients summed over ranks are those of the whole batch.
static molt_status run_batch(trn *t, const ds_batch *b, bool train, double *loss,
                             double *weight) {
    mdl_batch mb;
    ag_ctx_step_reset(&t->ctx);
    ag_ctx_set_grad(&t->ctx, train);
    int row0, n;
    trn_par_rows(&t->par, b->rows, b->rows_used, &row0, &n);
    double mine;
    MOLT_TRY(build_batch(&t->ctx, b, row0, n, &mb, &mine));
    *weight = mine;
    MOLT_TRY(trn_par_sum(&t->par, weight, 1));
    *loss = 0;
    if (*weight == 0)
        return MOLT_OK;
    if (t->par.size > 1) // this rank's share of the batch's mean loss
        mb.loss_norm = *weight;
    ag_tensor *out;
    MOLT_TRY(mdl_forward(&t->ctx, &t->model, &mb, &out));
    *loss = ag_get(out, 0);
    if (t->par.size > 1)
        MOLT_TRY(trn_par_sum(&t->par, loss, 1));
    if (train) {
        rank_hooks(t);
        MOLT_TRY(ag_backward(&t->ctx, out));
    }
    return MOLT_OK;
}

// Token-weighted mean loss over the eval files (one pass, or eval.max_batches batches).
static molt_status evaluate(trn *t, double *out, int64_t *n_tokens) {
    if (trn_env_long("MOLT_TEST_FAIL_EVAL_AT_STEP") == t->step) // test hook: a failing evaluation
        return molt_err(MOLT_EIO, "evaluation: test failure at step %lld", (long long)t->step);
    ds_loader *l;
    MOLT_TRY(open_loader(t, true, &l));
    ds_batch b = {0};
    double sum = 0, wsum = 0;
    molt_status st = MOLT_OK;
    for (int n = 0; st == MOLT_OK; n++) {
        if (t->cfg->eval_max_batches > 0 && n >= t->cfg->eval_max_batches)
            break;
        double loss, w;
        st = ds_loader_next(l, &b);
        if (st == MOLT_OK)
            st = run_batch(t, &b, false, &loss, &w);
        if (st == MOLT_OK) {
            sum += loss * w;
            wsum += w;
        }
        if (ds_loader_epoch_end(l))
            break;
    }
    ds_batch_free(&b);
    ds_loader_close(l);
    ag_ctx_step_reset(&t->ctx);
    *out = wsum > 0 ? sum / wsum : NAN;
    if (n_tokens)
        *n_tokens = (int64_t)wsum;
    return st;
}

// ---- the loop ---------------------------------------------------------------------------
static void progress(trn *t, double loss, double lr, double run_s, int64_t steps_run) {
    if (t->quiet)
        return;
    bool tty = isatty(STDERR_FILENO);
    bool last = t->step == t->total_steps;
    if (!tty && !last && t->step % t->cfg->log_every != 0)
        return;
    metrics_progress p = {.step = t->step, .total_steps = t->total_steps, .loss = loss,
                          .lr = lr, .tokens_per_s = run_s > 0 ? t->tokens_run / run_s : 0,
                          .elapsed_s = run_s, .steps_this_run = steps_run};
    char line[256], bar[24];
    metrics_format_progress(line, sizeof line, &p);
    if (!tty) {
        fprintf(stderr, "%s\n", line);
        return;
    }
    int fill = (int)(20 * t->step / (t->total_steps ? t->total_steps : 1));
    for (int i = 0; i < 20; i++)
        bar[i] = i < fill ? '#' : '-';
    bar[20] = 0;
    fprintf(stderr, "\r\033[K[%s] %s%s", bar, line, last ? "\n" : "");
}

static void step_snapshot(const trn *t, step_start *s) {
    ds_loader_cursor(t->loader, &s->cursor);
    s->dropout = *t->ad.dropout_rng;
    s->tokens = t->tokens;
    s->tokens_run = t->tokens_run;
}

// Back to where the step started (it was abandoned before its update): the data loader,
// the dropout stream and the token counts. Parameters and optimizer state were not touched.
static molt_status step_rewind(trn *t, const step_start *s) {
    *t->ad.dropout_rng = s->dropout;
    t->tokens = s->tokens;
    t->tokens_run = s->tokens_run;
    return ds_loader_restore(t->loader, &s->cursor);
}

// Why the update of this step must not be applied (a non-finite loss, gradient norm or
// update), into why; false when it may. Across ranks every rank gets the same answer (a
// routed-expert shard is checked where it lives).
static molt_status nonfinite(const trn *t, double loss, double gnorm, double lr, char *why,
                             size_t cap, bool *bad) {
    *bad = true;
    if (!isfinite(loss)) {
        snprintf(why, cap, "the loss is %s", isnan(loss) ? "NaN" : "infinite");
        return MOLT_OK;
    }
    if (!isfinite(gnorm)) {
        snprintf(why, cap, "the gradient norm is %s", isnan(gnorm) ? "NaN" : "infinite");
        return MOLT_OK;
    }
    int i = opt_adamw_nonfinite(&t->opt, lr);
    bool mine = i >= 0;
    *bad = mine;
    MOLT_TRY(trn_par_any(&t->par, bad));
    if (mine)
        snprintf(why, cap, "the update of %s would not be finite (at lr %g)", t->names[i], lr);
    else if (*bad)
        snprintf(why, cap, "the update of a routed-expert shard on another rank would not be "
                 "finite (at lr %g)", lr);
    return MOLT_OK;
}

// One optimizer step: grad_accum micro-batches, gradients reduced over the ranks, scaling,
// clipping, AdamW, schedule. A step whose batches hold no target, or whose loss, gradient
// norm or update is not finite, is an error naming the step (train.on_nonfinite: skip skips
// the update of the latter instead and sets *skipped). MOLT_EINTERRUPTED when a stop request
// came before the update.
static molt_status train_step(trn *t, double *loss, double *gnorm, double *lr, bool *skipped) {
    const trn_config *c = t->cfg;
    int64_t step = t->step + 1;
    *skipped = false;
    opt_grads_zero(t->params, t->n_params);
    double sum = 0, targets = 0;
    for (int k = 0; k < c->grad_accum; k++) {
        double l, w;
        MOLT_TRY(ds_loader_next(t->loader, &t->batch));
        MOLT_TRY(run_batch(t, &t->batch, true, &l, &w));
        sum += l;
        targets += w; // the whole batch's, the same on every rank
        t->tokens += t->batch.n_tokens;
        t->tokens_run += t->batch.n_tokens;
    }
    ag_ctx_step_reset(&t->ctx);
    if (targets == 0)
        return molt_err(MOLT_EARG, "train: step %lld: its batches hold no trained token (loss "
                        "and gradient would be 0): check data.train and data.on_bad",
                        (long long)step);
    *loss = sum / c->grad_accum;
    MOLT_TRY(trn_par_reduce_grads(&t->par, t->params, t->shard, t->n_params));
    if (c->grad_accum > 1)
        opt_grads_scale(t->params, t->n_params, 1.0 / c->grad_accum);
    MOLT_TRY(trn_dump_grads(t));
    if (t->par.size > 1)
        MOLT_TRY(trn_par_clip(&t->par, t->params, t->shard, t->n_params, c->max_grad_norm,
                              gnorm));
    else
        MOLT_TRY(opt_clip_grad_norm(t->params, t->n_params, c->max_grad_norm, gnorm));
    *lr = sched_lr(&t->sched);
    if (ag_interrupt_pending())
        return molt_err(MOLT_EINTERRUPTED, "train: step %lld interrupted", (long long)step);
    char why[300];
    bool bad;
    MOLT_TRY(nonfinite(t, *loss, *gnorm, *lr, why, sizeof why, &bad));
    if (bad) {
        if (!c->nonfinite_skip)
            return molt_err(MOLT_EARG, "train: step %lld: %s: training stopped before this "
                            "update (the last checkpoint and adapter are as they were). Lower "
                            "optim.lr, set optim.max_grad_norm > 0, raise optim.eps, or set "
                            "train.on_nonfinite: skip", (long long)step, why);
        *skipped = true;
        t->skipped++;
        if (t->par.rank == 0) // a warning even under --quiet
            fprintf(stderr, "%smolt train: step %lld: %s: update skipped (train.on_nonfinite: "
                    "skip)\n", t->o->quiet ? "" : "\n", (long long)step, why);
    } else {
        MOLT_TRY(opt_adamw_step(&t->opt, *lr));
    }
    sched_advance(&t->sched);
    t->step++;
    return MOLT_OK;
}

static const char *signal_name(int sig) {
    return sig == SIGINT ? "Ctrl-C (SIGINT)" : sig == SIGTERM ? "SIGTERM" : "a stop signal";
}

// The run stops on a stop request after step t->step, whose checkpoint is on disk. Across
// ranks rank 0 says so (a rank that got no signal stops because another did).
static molt_status report_stop(trn *t, const char *during, bool *interrupted) {
    if (t->par.rank == 0)
        fprintf(stderr, "\nmolt train: interrupted by %s%s: checkpoint of step %lld written; "
                "continue with --resume auto\n", signal_name((int)g_stop), during,
                (long long)t->step);
    *interrupted = true;
    return MOLT_OK;
}

static molt_status loop(trn *t, bool *interrupted) {
    const trn_config *c = t->cfg;
    double t0 = now_s();
    int64_t start = t->step;
    while (t->step < t->total_steps) {
        double loss = 0, gnorm = 0, lr = 0;
        bool skipped;
        step_start snap;
        step_snapshot(t, &snap);
        molt_status st = train_step(t, &loss, &gnorm, &lr, &skipped);
        if (st != MOLT_OK && ag_interrupt_pending()) // an op gave up on the stop request
            st = MOLT_EINTERRUPTED;
        if (st == MOLT_EINTERRUPTED) {
            // abandoned before its update (one process only): back to where the step
            // started, so that a resume runs it again exactly
            ag_ctx_step_reset(&t->ctx);
            MOLT_TRY(step_rewind(t, &snap));
            if (t->step > t->last_ckpt_step)
                MOLT_TRY(trn_save_ckpt(t, now_s() - t0));
            return report_stop(t, " during the next step (abandoned)", interrupted);
        }
        MOLT_TRY(st);
        double run_s = now_s() - t0;
        metrics_row r = {.step = t->step, .loss = loss, .lr = lr, .grad_norm = gnorm,
                         .tokens = t->tokens,
                         .tokens_per_s = run_s > 0 ? t->tokens_run / run_s : 0,
                         .elapsed_s = t->elapsed_prev + run_s};
        bool last = t->step == t->total_steps;
        molt_status eval_st = MOLT_OK;
        char eval_err[1024] = "";
        if (trn_config_has_eval(c) &&
            (last || (c->eval_every > 0 && t->step % c->eval_every == 0))) {
            eval_st = evaluate(t, &r.eval_loss, NULL);
            if (eval_st != MOLT_OK && ag_interrupt_pending())
                eval_st = MOLT_EINTERRUPTED;
            r.has_eval = eval_st == MOLT_OK;
            snprintf(eval_err, sizeof eval_err, "%s", eval_st ? molt_err_msg() : "");
        }
        if (t->mlog_open)
            MOLT_TRY(metrics_append(&t->mlog, &r));
        progress(t, loss, lr, run_s, t->step - start);
        if (r.has_eval && !t->quiet)
            fprintf(stderr, "molt train: step %lld eval_loss %.4f\n", (long long)t->step,
                    r.eval_loss);
        // a signal seen by one rank stops every rank after the same step
        bool stop = g_stop != 0;
        MOLT_TRY(trn_par_any(&t->par, &stop));
        if (stop && !g_stop)
            g_stop = SIGTERM;
        // a failed evaluation still gets the checkpoint of its step before the run stops
        bool ckpt = last || stop || eval_st != MOLT_OK ||
                    (c->ckpt_every > 0 && t->step % c->ckpt_every == 0) ||
                    trn_env_long("MOLT_TEST_KILL_AT_STEP") == t->step ||
                    trn_env_long("MOLT_TEST_KILL_IN_CKPT_WRITE") == t->step;
        if (ckpt)
            MOLT_TRY(trn_save_ckpt(t, now_s() - t0));
        if (eval_st != MOLT_OK && eval_st != MOLT_EINTERRUPTED)
            return molt_err(eval_st, "train: evaluation after step %lld failed (the "
                            "checkpoint of step %lld was written first): %s",
                            (long long)t->step, (long long)t->step, eval_err);
        if (stop && !last)
            return report_stop(t, eval_st ? " during evaluation" : "", interrupted);
    }
    if (t->skipped && t->par.rank == 0)
        fprintf(stderr, "molt train: %lld step%s skipped for a non-finite loss or update\n",
                (long long)t->skipped, t->skipped == 1 ? "" : "s");
    MOLT_TRY(trn_save_adapter(t));
    const char *prof = getenv("MOLT_PROFILE");
    bool show = t->par.size > 1 || (prof && *prof && strcmp(prof, "0") != 0);
    if (!show)
        return MOLT_OK;
    if (t->par.size > 1 && prof && *prof && strcmp(prof, "0") != 0) {
        ag_comm_profile_print(t->par.world, stderr); // every rank: its own bytes and seconds
        ag_comm_profile_print(t->par.ep, stderr);
        ag_comm_profile_print(t->par.dp, stderr);
    }
    return trn_par_report(&t->par, t->quiet ? NULL : stderr, now_s() - t0, t->step - start);
}

// The files a run writes may not be, hold or lie inside what it reads, and output_dir may
// not be or lie inside the model directory.
static molt_status check_outputs(const trn_config *c, const char *tok) {
    static const char *const outs[] = {"adapter", "adapter.h5", "metrics.jsonl",
                                       "config.resolved.yaml", "checkpoints"};
    char out[TRN_PATH_MAX + 32], what[64];
    MOLT_TRY(molt_check_not_inside("output_dir", c->output_dir, "model.path", c->model));
    for (size_t k = 0; k < sizeof outs / sizeof *outs; k++) {
        snprintf(out, sizeof out, "%s/%s", c->output_dir, outs[k]);
        snprintf(what, sizeof what, "output_dir's %s", outs[k]);
        MOLT_TRY(molt_check_overlap(what, out, "model.path", c->model));
        MOLT_TRY(molt_check_overlap(what, out, "the tokenizer", tok));
        for (int i = 0; i < c->n_train; i++) {
            char file[TRN_PATH_MAX];
            ds_input in;
            MOLT_TRY(ds_input_parse(c->train_files[i], &in, file, sizeof file));
            MOLT_TRY(molt_check_overlap(what, out, "data.train", file));
        }
        for (int i = 0; i < c->n_eval; i++)
            MOLT_TRY(molt_check_overlap(what, out, "data.eval", c->eval_files[i]));
    }
    return MOLT_OK;
}

// Everything a run needs, checked before the (long) model load: the model directory and
// the sizes it takes, the data inputs, the output paths, then the tokenizer and the model.
static molt_status setup(trn *t) {
    const trn_config *c = t->cfg;
    MOLT_TRY(trn_par_init(&t->par, t->o->world, c));
    t->quiet = t->o->quiet || t->par.rank != 0;
    char tok[TRN_PATH_MAX + 32];
    MOLT_TRY(tokenizer_path(c, tok, sizeof tok));
    MOLT_TRY(trn_check_sizes(c));
    if (!t->o->eval_only)
        MOLT_TRY(check_outputs(c, tok));
    MOLT_TRY(tok_load(tok, &t->tok));
    MOLT_TRY(chat_template_new(t->tok, NULL, &t->ct));
    if (!t->o->eval_only) {
        MOLT_TRY(check_data(t));
        MOLT_TRY(count_steps(t));
    }
    MOLT_TRY(compute_hashes(c, tok, &t->hashes));
    MOLT_TRY(load_model(t));
    t->model.checkpoint_layers = c->activation_checkpointing;
    MOLT_TRY(ag_ctx_init(&t->ctx));
    return MOLT_OK;
}

static molt_status setup_training(trn *t) {
    const trn_config *c = t->cfg;
    lora_spec spec;
    MOLT_TRY(lora_spec_parse(c->adapter, &spec));
    MOLT_TRY(lora_attach(&t->model, &spec, true, &t->ad));
    t->attached = true;
    if (!t->quiet)
        lora_print_table(&t->ad, stderr);
    MOLT_TRY(collect_params(t));
    MOLT_TRY(opt_adamw_init(&t->opt, t->n_params, t->params, &c->adamw));
    t->opt_init = true;
    MOLT_TRY(sched_init(&t->sched, c->schedule, c->lr, c->warmup_steps, t->total_steps));
    MOLT_TRY(open_loader(t, false, &t->loader));
    t->resolved = trn_config_yaml(c);
    if (!t->resolved)
        return molt_err(MOLT_ENOMEM, "train: resolved config");
    return MOLT_OK;
}

// Once every check passed and any resume took: output_dir and its resolved configuration
// (a refused run leaves both as they were). Rank 0 writes them.
static molt_status start_outputs(trn *t) {
    if (!trn_par_writes(&t->par))
        return MOLT_OK;
    char p[TRN_PATH_MAX + 32];
    MOLT_TRY(mkdir_p(t->cfg->output_dir));
    snprintf(p, sizeof p, "%s/config.resolved.yaml", t->cfg->output_dir);
    return write_text(p, t->resolved);
}

static molt_status eval_only(trn *t) {
    if (!trn_config_has_eval(t->cfg))
        return molt_err(MOLT_EARG, "train --eval-only: the config has no 'data.eval' files "
                        "or 'data.eval_split'");
    if (t->o->eval_adapter) {
        MOLT_TRY(lora_load_any(&t->model, t->o->eval_adapter, true, &t->ad));
        t->attached = true;
    }
    double loss;
    int64_t n;
    MOLT_TRY(evaluate(t, &loss, &n));
    if (trn_par_writes(&t->par))
        printf("eval_loss %.6f (%lld target tokens, %s)\n", loss, (long long)n,
               t->o->eval_adapter ? t->o->eval_adapter : "base model");
    return MOLT_OK;
}

static void trn_free(trn *t) {
    if (t->mlog_open)
        metrics_close(&t->mlog);
    ds_batch_free(&t->batch);
    ds_loader_close(t->loader);
    if (t->opt_init)
        opt_adamw_free(&t->opt);
    molt_free(t->params);
    molt_free(t->names);
    molt_free(t->shard);
    if (t->attached)
        lora_detach(&t->ad);
    mdl_free(&t->model);
    ag_ctx_free(&t->ctx);
    chat_template_free(t->ct);
    tok_free(t->tok);
    molt_free(t->resolved);
    trn_par_free(&t->par);
}

molt_status trn_run(const trn_config *c, const trn_run_opts *o, bool *interrupted) {
    trn *t = molt_calloc(1, sizeof *t);
    if (!t)
        return molt_err(MOLT_ENOMEM, "train: state");
    t->cfg = c;
    t->o = o;
    *interrupted = false;
    g_stop = 0;
    ag_interrupt_clear();
    molt_status st = setup(t);
    if (st == MOLT_OK && o->eval_only) {
        st = eval_only(t);
    } else if (st == MOLT_OK) {
        bool resumed = false;
        st = setup_training(t);
        if (st == MOLT_OK)
            st = trn_maybe_resume(t, &resumed);
        t->last_ckpt_step = resumed ? t->step : -1;
        if (st == MOLT_OK)
            st = start_outputs(t);
        if (st == MOLT_OK && trn_par_writes(&t->par)) {
            st = metrics_open(&t->mlog, c->output_dir, resumed ? t->step : 0);
            t->mlog_open = st == MOLT_OK;
        }
        g_abandon = t->par.size == 1;
        struct sigaction sa = {.sa_handler = on_signal}, old_int, old_term;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, &old_int);
        sigaction(SIGTERM, &sa, &old_term);
        if (st == MOLT_OK)
            st = loop(t, interrupted);
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
    }
    trn_free(t);
    molt_free(t);
    return st;
}
