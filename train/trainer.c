// train/trainer.c: the training loop of `molt train`: loads the tokenizer and the base model
// (optionally quantized), attaches the LoRA adapter, streams packed batches, runs forward,
// backward, gradient accumulation, clipping, AdamW and the schedule, evaluates, logs metrics,
// writes checkpoints holding everything a bit-exact resume needs, and saves the adapter. Across
// ranks each rank runs this loop on its rows of every batch (its experts only, with expert
// parallelism); gradients are reduced after the micro-batches and rank 0 writes the files.
//
// Not here: configuration parsing (config.c), the command line (cli.c), the optimizer,
// schedules, checkpoint files and metrics formats (optim.c, schedule.c, checkpoint.c,
// metrics.c), the groups of ranks and the reductions (parallel.c).
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
#include "../autograd/comm/comm.h"
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
    trn_par par;                    // the ranks (one process: a world of one)
    bool quiet;                     // no progress output (--quiet, or not rank 0)
    bool *shard;                    // [n_params] a routed-expert LoRA shard (expert parallel)
    double comm_s0;                 // seconds in collectives when the loop started
    bool grads_dumped;              // MOLT_TEST_GRADS written
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
    ag_comm *experts = trn_par_experts(&t->par);
    if (!strcmp(c->quant, "none") || !*c->quant)
        return experts ? mdl_load_quant_ex(c->model, NULL, experts, &t->model)
                       : mdl_load(c->model, &t->model);
    mdl_qspec q;
    if (mdl_qspec_parse(c->quant, &q) != MOLT_OK)
        return molt_err_wrap(MOLT_EARG, "config key 'model.quant'");
    return mdl_load_quant_ex(c->model, &q, experts, &t->model);
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

// Test hooks of parallel runs: MOLT_TEST_KILL_RANK / MOLT_TEST_STOP_RANK = "R@S" make rank R
// die (SIGKILL) or hang (SIGSTOP) in the middle of step S, after its first forward.
static void rank_hooks(const trn *t) {
    const char *names[2] = {"MOLT_TEST_KILL_RANK", "MOLT_TEST_STOP_RANK"};
    for (int i = 0; i < 2; i++) {
        const char *v = getenv(names[i]);
        int r = -1;
        long long s = -1;
        if (v && sscanf(v, "%d@%lld", &r, &s) == 2 && r == t->par.rank && s == t->step + 1)
            raise(i == 0 ? SIGKILL : SIGSTOP);
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
// Parameter i's unit and whether it is that unit's B.
static lora_unit *unit_of(trn *t, int i) { return &t->ad.units[i / 2]; }

// Sets tensor `name` of s to parameter i's full value of `local` (a shard's whole matrix
// gathered over its expert group; s NULL: a rank that only helps gathering).
static molt_status set_full(trn *t, ckpt_state *s, int i, const char *name, const float *local) {
    lora_unit *u = unit_of(t, i);
    int64_t shape[2];
    lora_unit_full_shape(&t->ad, u, i % 2, shape);
    if (!t->shard[i])
        return s ? ckpt_set_tensor(s, name, 2, shape, local) : MOLT_OK;
    float *full = molt_malloc((size_t)(shape[0] * shape[1]) * sizeof *full);
    if (!full)
        return molt_err(MOLT_ENOMEM, "train: out of memory gathering %s", name);
    molt_status st = trn_par_gather(&t->par, &t->ad, u, i % 2, local, full);
    if (st == MOLT_OK && s)
        st = ckpt_set_tensor(s, name, 2, shape, full);
    molt_free(full);
    return st;
}

// The whole adapter and optimizer state, whatever the ranks: shards gathered (s is NULL on
// the ranks that only gather).
static molt_status fill_ckpt(trn *t, ckpt_state *s) {
    char name[CKPT_NAME_MAX + 16];
    if (s)
        s->step = t->step;
    for (int i = 0; i < t->n_params; i++) {
        ag_tensor *p = t->params[i];
        MOLT_TRY(set_full(t, s, i, t->names[i], p->data));
        snprintf(name, sizeof name, "adam_m.%s", t->names[i]);
        MOLT_TRY(set_full(t, s, i, name, t->opt.m[i]));
        snprintf(name, sizeof name, "adam_v.%s", t->names[i]);
        MOLT_TRY(set_full(t, s, i, name, t->opt.v[i]));
        snprintf(name, sizeof name, "adam_step.%s", t->names[i]);
        if (s)
            MOLT_TRY(ckpt_set_int(s, name, t->opt.steps[i]));
    }
    if (!s)
        return MOLT_OK;
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
    if (!trn_par_gathers(&t->par))
        return MOLT_OK;
    if (!trn_par_writes(&t->par))
        return fill_ckpt(t, NULL);
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
    if (!*(const bool *)user)
        fprintf(stderr, "molt train: skipping checkpoint %s: %s\n", path, message);
}

// Parameter i's `name` from the checkpoint (the whole matrix; a shard keeps its part).
static molt_status restore_tensor(trn *t, const ckpt_state *s, const char *file, int i,
                                  const char *name, float *dst) {
    const ckpt_tensor *ct = ckpt_get_tensor(s, name);
    if (!ct)
        return molt_err(MOLT_EFORMAT, "checkpoint %s: no tensor '%s' (another adapter spec?)",
                        file, name);
    int64_t shape[2];
    lora_unit_full_shape(&t->ad, unit_of(t, i), i % 2, shape);
    if (ct->numel != shape[0] * shape[1])
        return molt_err(MOLT_EFORMAT, "checkpoint %s: tensor '%s' has %lld elements, the "
                        "adapter %lld (another adapter spec?)", file, name,
                        (long long)ct->numel, (long long)(shape[0] * shape[1]));
    lora_shard_from_full(&t->ad, unit_of(t, i), i % 2, ct->data, dst);
    return MOLT_OK;
}

static molt_status restore(trn *t, const ckpt_state *s, const char *file) {
    char warn[1024], name[CKPT_NAME_MAX + 16];
    MOLT_TRY(ckpt_check_hashes(s, file, &t->hashes, t->o->force, warn, sizeof warn));
    if (*warn)
        fprintf(stderr, "molt train: warning (--force): %s\n", warn);
    for (int i = 0; i < t->n_params; i++) {
        ag_tensor *p = t->params[i];
        MOLT_TRY(restore_tensor(t, s, file, i, t->names[i], p->data));
        snprintf(name, sizeof name, "adam_m.%s", t->names[i]);
        MOLT_TRY(restore_tensor(t, s, file, i, name, t->opt.m[i]));
        snprintf(name, sizeof name, "adam_v.%s", t->names[i]);
        MOLT_TRY(restore_tensor(t, s, file, i, name, t->opt.v[i]));
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
    bool quiet = t->quiet;
    if (!strcmp(r, "auto")) {
        st = ckpt_find_latest_valid(dir, report_bad, &quiet, &path, &s);
    } else {
        path = molt_strdup(r);
        st = path ? ckpt_read(r, &s) : molt_err(MOLT_ENOMEM, "train: resume path");
    }
    if (st == MOLT_OK && path) {
        st = restore(t, &s, path);
        if (st == MOLT_OK && !t->quiet)
            fprintf(stderr, "molt train: resumed from %s (step %lld)\n", path,
                    (long long)t->step);
        *resumed = st == MOLT_OK;
    } else if (st == MOLT_OK && !t->quiet) {
        fprintf(stderr, "molt train: no checkpoint in %s/checkpoints: starting fresh\n", dir);
    }
    molt_free(path);
    ckpt_state_free(&s);
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

// Test hook: MOLT_TEST_GRADS=FILE writes the whole adapter's gradient of the first step this
// process runs (summed over ranks, averaged over micro-batches, before clipping) to FILE as
// safetensors, named like the checkpoint's tensors, so runs on any number of ranks can be
// compared.
static molt_status dump_grads(trn *t) {
    const char *path = getenv("MOLT_TEST_GRADS");
    if (!path || !*path || t->grads_dumped || !trn_par_gathers(&t->par))
        return MOLT_OK;
    t->grads_dumped = true;
    st_tensor *ts = molt_calloc((size_t)t->n_params + 1, sizeof *ts);
    float **bufs = molt_calloc((size_t)t->n_params + 1, sizeof *bufs);
    molt_status st = ts && bufs ? MOLT_OK : molt_err(MOLT_ENOMEM, "train: gradient dump");
    for (int i = 0; st == MOLT_OK && i < t->n_params; i++) {
        int64_t shape[2];
        lora_unit_full_shape(&t->ad, unit_of(t, i), i % 2, shape);
        bufs[i] = molt_malloc((size_t)(shape[0] * shape[1]) * sizeof(float));
        if (!bufs[i]) {
            st = molt_err(MOLT_ENOMEM, "train: gradient dump");
            break;
        }
        st = trn_par_gather(&t->par, &t->ad, unit_of(t, i), i % 2, t->params[i]->grad->data,
                            bufs[i]);
        ts[i] = (st_tensor){.name = t->names[i], .dtype = ST_F32, .ndim = 2,
                            .shape = {shape[0], shape[1]}, .data = bufs[i]};
    }
    if (st == MOLT_OK && trn_par_writes(&t->par))
        st = st_write(path, ts, t->n_params, NULL, 0);
    for (int i = 0; bufs && i < t->n_params; i++)
        molt_free(bufs[i]);
    molt_free(bufs);
    molt_free(ts);
    return st;
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
    MOLT_TRY(trn_par_reduce_grads(&t->par, t->params, t->shard, t->n_params));
    if (c->grad_accum > 1)
        opt_grads_scale(t->params, t->n_params, 1.0 / c->grad_accum);
    MOLT_TRY(dump_grads(t));
    if (t->par.size > 1)
        MOLT_TRY(trn_par_clip(&t->par, t->params, t->shard, t->n_params, c->max_grad_norm,
                              gnorm));
    else
        MOLT_TRY(opt_clip_grad_norm(t->params, t->n_params, c->max_grad_norm, gnorm));
    *lr = sched_lr(&t->sched);
    MOLT_TRY(opt_adamw_step(&t->opt, *lr));
    sched_advance(&t->sched);
    t->step++;
    return MOLT_OK;
}

static molt_status write_adapter(trn *t, const lora_adapter *ad);

// The adapter with whole matrices: t->ad itself, or (expert parallel) a copy of its unit list
// whose expert shards are replaced by the gathered matrices, allocated in `ar`. Collective
// over the expert group of replica 0; full->units is molt_free'd by the caller when it is not
// t->ad's.
static molt_status whole_adapter(trn *t, ag_arena *ar, lora_adapter *full) {
    *full = t->ad;
    bool any = false;
    for (int i = 0; i < t->n_params; i++)
        any = any || t->shard[i];
    if (!any)
        return MOLT_OK;
    full->units = molt_malloc((size_t)t->ad.n_units * sizeof *full->units);
    if (!full->units)
        return molt_err(MOLT_ENOMEM, "train: adapter copy");
    memcpy(full->units, t->ad.units, (size_t)t->ad.n_units * sizeof *full->units);
    for (int i = 0; i < t->n_params; i++) {
        if (!t->shard[i])
            continue;
        lora_unit *u = &full->units[i / 2];
        int64_t shape[2];
        lora_unit_full_shape(&t->ad, unit_of(t, i), i % 2, shape);
        ag_tensor *w = ag_tensor_new2(ar, AG_F32, shape[0], shape[1]);
        if (!w)
            return molt_err_wrap(MOLT_ENOMEM, "train: whole adapter");
        MOLT_TRY(trn_par_gather(&t->par, &t->ad, unit_of(t, i), i % 2, t->params[i]->data,
                                w->data));
        *(i % 2 ? &u->b : &u->a) = w;
        u->n_exp = t->model.cfg.n_routed_experts;
    }
    return MOLT_OK;
}

// Both forms of the adapter are written completely (the PEFT directory beside adapter/, the
// HDF5 file under a temporary name) before either replaces the previous one, so a failure
// leaves the two files of the same step as they were. Across ranks: the shards are gathered
// on replica 0 and rank 0 writes.
static molt_status save_adapter(trn *t) {
    if (!trn_par_gathers(&t->par))
        return MOLT_OK;
    ag_arena ar;
    ag_arena_init(&ar, "whole adapter", 1 << 20);
    lora_adapter ad;
    molt_status st = whole_adapter(t, &ar, &ad);
    if (st == MOLT_OK && trn_par_writes(&t->par))
        st = write_adapter(t, &ad);
    if (ad.units != t->ad.units)
        molt_free(ad.units);
    ag_arena_free(&ar);
    return st;
}

static molt_status write_adapter(trn *t, const lora_adapter *ad) {
    char p[TRN_PATH_MAX + 64], *h5_tmp = NULL;
    snprintf(p, sizeof p, "%s/adapter", t->cfg->output_dir);
    molt_outdir d;
    MOLT_TRY(molt_outdir_begin(&d, p, true, "adapter directory"));
    molt_status st = lora_export_peft(ad, d.tmp, t->cfg->model);
    snprintf(p, sizeof p, "%s/adapter.h5", t->cfg->output_dir);
    if (st == MOLT_OK)
        st = molt_tmp_path(p, &h5_tmp);
    if (st == MOLT_OK)
        st = lora_save(ad, h5_tmp);
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
    if (!t->quiet)
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
        bool ckpt = last || g_stop || (c->ckpt_every > 0 && t->step % c->ckpt_every == 0) ||
                    env_long("MOLT_TEST_KILL_AT_STEP") == t->step ||
                    env_long("MOLT_TEST_KILL_IN_CKPT_WRITE") == t->step;
        if (ckpt)
            MOLT_TRY(save_ckpt(t, now_s() - t0));
        if (g_stop && !last) {
            if (!t->quiet)
                fprintf(stderr, "\nmolt train: interrupted: checkpoint of step %lld written; "
                        "continue with --resume auto\n", (long long)t->step);
            *interrupted = true;
            return MOLT_OK;
        }
    }
    MOLT_TRY(save_adapter(t));
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

static molt_status setup(trn *t) {
    const trn_config *c = t->cfg;
    MOLT_TRY(trn_par_init(&t->par, t->o->world, c));
    t->quiet = t->o->quiet || t->par.rank != 0;
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
    if (!t->quiet)
        lora_print_table(&t->ad, stderr);
    MOLT_TRY(collect_params(t));
    MOLT_TRY(opt_adamw_init(&t->opt, t->n_params, t->params, &c->adamw));
    t->opt_init = true;
    MOLT_TRY(count_steps(t));
    MOLT_TRY(sched_init(&t->sched, c->schedule, c->lr, c->warmup_steps, t->total_steps));
    MOLT_TRY(open_loader(t, false, &t->loader));
    t->resolved = trn_config_yaml(c);
    if (!t->resolved)
        return molt_err(MOLT_ENOMEM, "train: resolved config");
    if (!trn_par_writes(&t->par))
        return MOLT_OK;
    MOLT_TRY(mkdir_p(c->output_dir));
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
    molt_status st = setup(t);
    if (st == MOLT_OK && o->eval_only) {
        st = eval_only(t);
    } else if (st == MOLT_OK) {
        bool resumed = false;
        st = setup_training(t);
        if (st == MOLT_OK)
            st = maybe_resume(t, &resumed);
        if (st == MOLT_OK && trn_par_writes(&t->par)) {
            st = metrics_open(&t->mlog, c->output_dir, resumed ? t->step : 0);
            t->mlog_open = st == MOLT_OK;
        }
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
