// train/trainer.c: the training loop of `molt train`: loads the tokenizer and the base model
// (optionally quantized), attaches the LoRA adapter, streams packed batches, runs forward,
// backward, gradient accumulation, clipping, AdamW and the schedule, evaluates, logs metrics,
// writes checkpoints holding everything a bit-exact resume needs, and saves the adapter.
//
// Not here: configuration parsing (config.c), the command line (cli.c), the optimizer,
// schedules, checkpoint files and metrics formats (optim.c, schedule.c, checkpoint.c,
// metrics.c).
#include "trainer.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../adapters/adapters.h"
#include "../common/fsio.h"
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
} trn;

static volatile sig_atomic_t g_stop;
static void on_signal(int sig) { g_stop = sig; }

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

static molt_status load_model(trn *t) {
    const trn_config *c = t->cfg;
    if (!strcmp(c->quant, "none") || !*c->quant)
        return mdl_load(c->model, &t->model);
    mdl_qspec q;
    if (mdl_qspec_parse(c->quant, &q) != MOLT_OK)
        return molt_err_wrap(MOLT_EARG, "config key 'model.quant'");
    return mdl_load_quant(c->model, &q, &t->model);
}

// Collects A and B of every unit as the optimizer's parameter list.
static molt_status collect_params(trn *t) {
    int n = 2 * t->ad.n_units;
    t->params = molt_calloc((size_t)(n ? n : 1), sizeof *t->params);
    t->names = molt_calloc((size_t)(n ? n : 1), sizeof *t->names);
    if (!t->params || !t->names)
        return molt_err(MOLT_ENOMEM, "train: parameter list");
    for (int i = 0; i < t->ad.n_units; i++) {
        lora_unit *u = &t->ad.units[i];
        t->params[2 * i] = u->a;
        t->params[2 * i + 1] = u->b;
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
    for (int i = 0; i < n; i++)
        d.inputs[i] = (ds_input){own_files ? c->eval_files[i] : c->train_files[i], 1.0};
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

// ---- one batch through the model --------------------------------------------------------
// Flattens the (rows, seq_len) batch into one packed sequence of T tokens: segment ids are
// made unique per row (padding gets its own segment per row) so rows never attend to one
// another; targets are the next-token labels with weight 0 where there is none.
static molt_status build_batch(ag_ctx *c, const ds_batch *b, mdl_batch *mb, double *weight) {
    int64_t S = b->seq_len, T = (int64_t)b->rows_used * S;
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
        int64_t row = i / S;
        pi[i] = b->ids[i];
        pp[i] = b->pos[i];
        ps[i] = (int32_t)(row * (S + 2) + (b->segment[i] ? b->segment[i] : S + 1));
        pt[i] = labels[i] >= 0 ? labels[i] : 0;
        pm[i] = labels[i] >= 0 ? 1.0f : 0.0f;
        w += pm[i];
    }
    molt_free(labels);
    *mb = (mdl_batch){.ids = ids, .pos = pos, .seg = seg, .targets = tg, .mask = mask};
    *weight = w;
    return MOLT_OK;
}

// Forward (and backward when train) of one batch; *loss is the mean loss over its targets,
// *weight the number of targets (0: nothing to learn, no backward).
static molt_status run_batch(trn *t, const ds_batch *b, bool train, double *loss,
                             double *weight) {
    mdl_batch mb;
    ag_ctx_step_reset(&t->ctx);
    ag_ctx_set_grad(&t->ctx, train);
    MOLT_TRY(build_batch(&t->ctx, b, &mb, weight));
    *loss = 0;
    if (*weight == 0)
        return MOLT_OK;
    ag_tensor *out;
    MOLT_TRY(mdl_forward(&t->ctx, &t->model, &mb, &out));
    *loss = ag_get(out, 0);
    if (train)
        MOLT_TRY(ag_backward(&t->ctx, out));
    return MOLT_OK;
}

// Token-weighted mean loss over the eval files (one pass, or eval.max_batches batches).
static molt_status evaluate(trn *t, double *out, int64_t *n_tokens) {
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

// ---- checkpoints ------------------------------------------------------------------------
static molt_status fill_ckpt(trn *t, ckpt_state *s) {
    char name[CKPT_NAME_MAX + 16];
    s->step = t->step;
    for (int i = 0; i < t->n_params; i++) {
        ag_tensor *p = t->params[i];
        MOLT_TRY(ckpt_set_tensor(s, t->names[i], p->ndim, p->shape, p->data));
        snprintf(name, sizeof name, "adam_m.%s", t->names[i]);
        MOLT_TRY(ckpt_set_tensor(s, name, p->ndim, p->shape, t->opt.m[i]));
        snprintf(name, sizeof name, "adam_v.%s", t->names[i]);
        MOLT_TRY(ckpt_set_tensor(s, name, p->ndim, p->shape, t->opt.v[i]));
        snprintf(name, sizeof name, "adam_step.%s", t->names[i]);
        MOLT_TRY(ckpt_set_int(s, name, t->opt.steps[i]));
    }
    MOLT_TRY(ckpt_set_int(s, "train.step", t->step));
    MOLT_TRY(ckpt_set_int(s, "train.tokens", t->tokens));
    MOLT_TRY(ckpt_set_float(s, "train.elapsed_s", t->elapsed_prev));
    MOLT_TRY(ckpt_set_int(s, "sched.step", t->sched.step));
    MOLT_TRY(ckpt_set_int(s, "sched.kind", t->sched.kind));
    MOLT_TRY(ckpt_set_int(s, "sched.total_steps", t->sched.total_steps));
    MOLT_TRY(ckpt_set_int(s, "sched.warmup_steps", t->sched.warmup_steps));
    MOLT_TRY(ckpt_set_float(s, "sched.lr_max", t->sched.lr_max));
    // the adapter's LoRA-dropout stream: exact resume replays the same masks
    const ag_rng *drop = t->ad.dropout_rng;
    MOLT_TRY(ckpt_set_blob(s, "rng.dropout", drop->s, sizeof drop->s));
    ds_cursor cur;
    uint8_t buf[DS_CURSOR_BYTES];
    ds_loader_cursor(t->loader, &cur);
    size_t n = ds_cursor_save(&cur, buf, sizeof buf);
    MOLT_TRY(ckpt_set_blob(s, "data.cursor", buf, n));
    MOLT_TRY(ckpt_set_string(s, "config.resolved", t->resolved));
    return ckpt_set_hashes(s, &t->hashes);
}

// Test hook: what a crash in the middle of writing leaves behind: half of the new file
// under its temporary name, then the process dies.
static void die_in_write(trn *t, const char *path) {
    char tmp[TRN_PATH_MAX + 64];
    snprintf(tmp, sizeof tmp, "%s/checkpoints/step-%lld.h5.tmp", t->cfg->output_dir,
             (long long)t->step);
    FILE *in = fopen(path, "rb"), *out = fopen(tmp, "wb");
    if (in && out) {
        fseek(in, 0, SEEK_END);
        long n = ftell(in) / 2;
        fseek(in, 0, SEEK_SET);
        for (long i = 0; i < n; i++)
            fputc(fgetc(in), out);
        fflush(out);
    }
    remove(path);
    raise(SIGKILL);
}

static long env_long(const char *name) {
    const char *v = getenv(name);
    return v && *v ? strtol(v, NULL, 10) : -1;
}

static molt_status save_ckpt(trn *t, double elapsed_run) {
    ckpt_state s;
    ckpt_state_init(&s);
    double keep = t->elapsed_prev;
    t->elapsed_prev += elapsed_run;
    molt_status st = fill_ckpt(t, &s);
    t->elapsed_prev = keep;
    char *path = NULL;
    if (st == MOLT_OK) {
        bool kill_in_write = env_long("MOLT_TEST_KILL_IN_CKPT_WRITE") == t->step;
        // the hook writes the full file elsewhere first, so the keep-last pruning cannot
        // remove the checkpoint a resume must find
        char dir[TRN_PATH_MAX + 32];
        snprintf(dir, sizeof dir, "%s%s", t->cfg->output_dir, kill_in_write ? "/.kill" : "");
        st = ckpt_write(dir, &s, kill_in_write ? 0 : t->cfg->keep_last, &path);
        if (st == MOLT_OK && kill_in_write)
            die_in_write(t, path);
    }
    ckpt_state_free(&s);
    molt_free(path);
    if (st == MOLT_OK && env_long("MOLT_TEST_KILL_AT_STEP") == t->step)
        raise(SIGKILL);
    return st;
}

static void report_bad(void *user, const char *path, const char *message) {
    (void)user;
    fprintf(stderr, "molt train: skipping checkpoint %s: %s\n", path, message);
}

static molt_status restore_tensor(const ckpt_state *s, const char *file, const char *name,
                                  float *dst, int64_t numel) {
    const ckpt_tensor *ct = ckpt_get_tensor(s, name);
    if (!ct)
        return molt_err(MOLT_EFORMAT, "checkpoint %s: no tensor '%s' (another adapter spec?)",
                        file, name);
    if (ct->numel != numel)
        return molt_err(MOLT_EFORMAT, "checkpoint %s: tensor '%s' has %lld elements, the "
                        "adapter %lld (another adapter spec?)", file, name,
                        (long long)ct->numel, (long long)numel);
    memcpy(dst, ct->data, (size_t)numel * sizeof *dst);
    return MOLT_OK;
}

static molt_status restore(trn *t, const ckpt_state *s, const char *file) {
    char warn[1024], name[CKPT_NAME_MAX + 16];
    MOLT_TRY(ckpt_check_hashes(s, file, &t->hashes, t->o->force, warn, sizeof warn));
    if (*warn)
        fprintf(stderr, "molt train: warning (--force): %s\n", warn);
    for (int i = 0; i < t->n_params; i++) {
        ag_tensor *p = t->params[i];
        MOLT_TRY(restore_tensor(s, file, t->names[i], p->data, p->numel));
        snprintf(name, sizeof name, "adam_m.%s", t->names[i]);
        MOLT_TRY(restore_tensor(s, file, name, t->opt.m[i], p->numel));
        snprintf(name, sizeof name, "adam_v.%s", t->names[i]);
        MOLT_TRY(restore_tensor(s, file, name, t->opt.v[i], p->numel));
        snprintf(name, sizeof name, "adam_step.%s", t->names[i]);
        MOLT_TRY(ckpt_get_int(s, name, &t->opt.steps[i]));
    }
    MOLT_TRY(ckpt_get_int(s, "train.step", &t->step));
    MOLT_TRY(ckpt_get_int(s, "train.tokens", &t->tokens));
    MOLT_TRY(ckpt_get_float(s, "train.elapsed_s", &t->elapsed_prev));
    MOLT_TRY(ckpt_get_int(s, "sched.step", &t->sched.step));
    const ckpt_blob *rng = ckpt_get_blob(s, "rng.dropout");
    const ckpt_blob *cur = ckpt_get_blob(s, "data.cursor");
    ag_rng *drop = t->ad.dropout_rng;
    if (!rng || rng->len != sizeof drop->s || !cur)
        return molt_err(MOLT_EFORMAT, "checkpoint %s: missing or bad rng/cursor state", file);
    memcpy(drop->s, rng->data, sizeof drop->s);
    ds_cursor c;
    MOLT_TRY(ds_cursor_load(&c, cur->data, cur->len));
    if (ds_loader_restore(t->loader, &c) != MOLT_OK)
        return molt_err_wrap(MOLT_EFORMAT, "checkpoint %s: data cursor (other data files or "
                             "data settings?)", file);
    return MOLT_OK;
}

static bool has_checkpoints(const char *dir) {
    char p[TRN_PATH_MAX + 32];
    snprintf(p, sizeof p, "%s/checkpoints", dir);
    DIR *d = opendir(p);
    bool any = false;
    for (struct dirent *e; d && !any && (e = readdir(d));)
        any = !strncmp(e->d_name, "step-", 5) && strstr(e->d_name, ".h5") &&
              !strstr(e->d_name, ".tmp");
    if (d)
        closedir(d);
    return any;
}

// Applies --resume: nothing, the newest valid checkpoint, or a given file.
static molt_status maybe_resume(trn *t, bool *resumed) {
    const char *r = t->o->resume, *dir = t->cfg->output_dir;
    *resumed = false;
    if (!r) {
        if (has_checkpoints(dir))
            return molt_err(MOLT_EARG, "train: %s/checkpoints already holds checkpoints: pass "
                            "--resume auto (or a checkpoint path), or use another output_dir",
                            dir);
        return MOLT_OK;
    }
    ckpt_state s;
    ckpt_state_init(&s);
    char *path = NULL;
    molt_status st;
    if (!strcmp(r, "auto")) {
        st = ckpt_find_latest_valid(dir, report_bad, NULL, &path, &s);
    } else {
        path = molt_strdup(r);
        st = path ? ckpt_read(r, &s) : molt_err(MOLT_ENOMEM, "train: resume path");
    }
    if (st == MOLT_OK && path) {
        st = restore(t, &s, path);
        if (st == MOLT_OK && !t->o->quiet)
            fprintf(stderr, "molt train: resumed from %s (step %lld)\n", path,
                    (long long)t->step);
        *resumed = st == MOLT_OK;
    } else if (st == MOLT_OK && !t->o->quiet) {
        fprintf(stderr, "molt train: no checkpoint in %s/checkpoints: starting fresh\n", dir);
    }
    molt_free(path);
    ckpt_state_free(&s);
    return st;
}

// ---- the loop ---------------------------------------------------------------------------
static void progress(trn *t, double loss, double lr, double run_s, int64_t steps_run) {
    if (t->o->quiet)
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

// One optimizer step: grad_accum micro-batches, scaling, clipping, AdamW, schedule.
static molt_status train_step(trn *t, double *loss, double *gnorm, double *lr) {
    const trn_config *c = t->cfg;
    opt_grads_zero(t->params, t->n_params);
    double sum = 0;
    for (int k = 0; k < c->grad_accum; k++) {
        double l, w;
        MOLT_TRY(ds_loader_next(t->loader, &t->batch));
        MOLT_TRY(run_batch(t, &t->batch, true, &l, &w));
        sum += l;
        t->tokens += t->batch.n_tokens;
        t->tokens_run += t->batch.n_tokens;
    }
    ag_ctx_step_reset(&t->ctx);
    *loss = sum / c->grad_accum;
    if (c->grad_accum > 1)
        opt_grads_scale(t->params, t->n_params, 1.0 / c->grad_accum);
    MOLT_TRY(opt_clip_grad_norm(t->params, t->n_params, c->max_grad_norm, gnorm));
    *lr = sched_lr(&t->sched);
    MOLT_TRY(opt_adamw_step(&t->opt, *lr));
    sched_advance(&t->sched);
    t->step++;
    return MOLT_OK;
}

// Both forms of the adapter are written completely (the PEFT directory beside adapter/, the
// HDF5 file under a temporary name) before either replaces the previous one, so a failure
// leaves the two files of the same step as they were.
static molt_status save_adapter(trn *t) {
    char p[TRN_PATH_MAX + 64], *h5_tmp = NULL;
    snprintf(p, sizeof p, "%s/adapter", t->cfg->output_dir);
    molt_outdir d;
    MOLT_TRY(molt_outdir_begin(&d, p, true, "adapter directory"));
    molt_status st = lora_export_peft(&t->ad, d.tmp, t->cfg->model);
    snprintf(p, sizeof p, "%s/adapter.h5", t->cfg->output_dir);
    if (st == MOLT_OK)
        st = molt_tmp_path(p, &h5_tmp);
    if (st == MOLT_OK)
        st = lora_save(&t->ad, h5_tmp);
    if (st == MOLT_OK)
        st = molt_outdir_commit(&d);
    else
        molt_outdir_abort(&d);
    if (st == MOLT_OK)
        st = molt_commit_tmp(h5_tmp, p);
    else if (h5_tmp)
        unlink(h5_tmp);
    molt_free(h5_tmp);
    MOLT_TRY(st);
    if (!t->o->quiet)
        fprintf(stderr, "molt train: adapter saved to %s/adapter (PEFT) and %s\n",
                t->cfg->output_dir, p);
    return MOLT_OK;
}

static molt_status loop(trn *t, bool *interrupted) {
    const trn_config *c = t->cfg;
    double t0 = now_s();
    int64_t start = t->step;
    while (t->step < t->total_steps) {
        double loss, gnorm, lr;
        MOLT_TRY(train_step(t, &loss, &gnorm, &lr));
        double run_s = now_s() - t0;
        metrics_row r = {.step = t->step, .loss = loss, .lr = lr, .grad_norm = gnorm,
                         .tokens = t->tokens, .tokens_per_s = run_s > 0 ? t->tokens_run / run_s : 0,
                         .elapsed_s = t->elapsed_prev + run_s};
        bool last = t->step == t->total_steps;
        if (trn_config_has_eval(c) && (last || (c->eval_every > 0 && t->step % c->eval_every == 0))) {
            MOLT_TRY(evaluate(t, &r.eval_loss, NULL));
            r.has_eval = true;
        }
        MOLT_TRY(metrics_append(&t->mlog, &r));
        progress(t, loss, lr, run_s, t->step - start);
        if (r.has_eval && !t->o->quiet)
            fprintf(stderr, "molt train: step %lld eval_loss %.4f\n", (long long)t->step,
                    r.eval_loss);
        bool ckpt = last || g_stop || (c->ckpt_every > 0 && t->step % c->ckpt_every == 0) ||
                    env_long("MOLT_TEST_KILL_AT_STEP") == t->step ||
                    env_long("MOLT_TEST_KILL_IN_CKPT_WRITE") == t->step;
        if (ckpt)
            MOLT_TRY(save_ckpt(t, now_s() - t0));
        if (g_stop && !last) {
            fprintf(stderr, "\nmolt train: interrupted: checkpoint of step %lld written; "
                    "continue with --resume auto\n", (long long)t->step);
            *interrupted = true;
            return MOLT_OK;
        }
    }
    return save_adapter(t);
}

static molt_status setup(trn *t) {
    const trn_config *c = t->cfg;
    char tok[TRN_PATH_MAX + 32];
    MOLT_TRY(tokenizer_path(c, tok, sizeof tok));
    MOLT_TRY(tok_load(tok, &t->tok));
    MOLT_TRY(chat_template_new(t->tok, NULL, &t->ct));
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
    if (!t->o->quiet)
        lora_print_table(&t->ad, stderr);
    MOLT_TRY(collect_params(t));
    MOLT_TRY(opt_adamw_init(&t->opt, t->n_params, t->params, &c->adamw));
    t->opt_init = true;
    MOLT_TRY(count_steps(t));
    MOLT_TRY(sched_init(&t->sched, c->schedule, c->lr, c->warmup_steps, t->total_steps));
    MOLT_TRY(open_loader(t, false, &t->loader));
    MOLT_TRY(mkdir_p(c->output_dir));
    t->resolved = trn_config_yaml(c);
    if (!t->resolved)
        return molt_err(MOLT_ENOMEM, "train: resolved config");
    char p[TRN_PATH_MAX + 32];
    snprintf(p, sizeof p, "%s/config.resolved.yaml", c->output_dir);
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
    if (t->attached)
        lora_detach(&t->ad);
    mdl_free(&t->model);
    ag_ctx_free(&t->ctx);
    chat_template_free(t->ct);
    tok_free(t->tok);
    molt_free(t->resolved);
}

molt_status trn_run(const trn_config *c, const trn_run_opts *o, bool *interrupted) {
    trn *t = molt_calloc(1, sizeof *t);
    if (!t)
        return molt_err(MOLT_ENOMEM, "train: state");
    t->cfg = c;
    t->o = o;
    *interrupted = false;
    g_stop = 0;
    molt_status st = setup(t);
    if (st == MOLT_OK && o->eval_only) {
        st = eval_only(t);
    } else if (st == MOLT_OK) {
        bool resumed = false;
        st = setup_training(t);
        if (st == MOLT_OK)
            st = maybe_resume(t, &resumed);
        if (st == MOLT_OK)
            st = metrics_open(&t->mlog, c->output_dir, resumed ? t->step : 0);
        t->mlog_open = st == MOLT_OK;
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
