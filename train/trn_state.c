// train/trn_state.c: the state of a `molt train` run on disk: checkpoints (everything a
// bit-exact resume needs, the whole adapter and optimizer state whatever the ranks), resuming
// from them, the adapter files at the end, and the gradient dump of the tests. Across ranks the
// shards of routed-expert LoRA are gathered on replica 0 and rank 0 writes; every rank reads a
// checkpoint and keeps its part; a checkpoint of another adapter spec, or holding a non-finite
// value, is refused. Not here: the loop (trainer.c), the file formats (checkpoint.c,
// adapters/), the spec comparison (preflight.c).
#include "trn_internal.h"

#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../common/fsio.h"

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

long trn_env_long(const char *name) {
    const char *v = getenv(name);
    return v && *v ? strtol(v, NULL, 10) : -1;
}

molt_status trn_save_ckpt(trn *t, double elapsed_run) {
    if (!trn_par_gathers(&t->par)) {
        t->last_ckpt_step = t->step;
        return MOLT_OK;
    }
    if (!trn_par_writes(&t->par)) {
        MOLT_TRY(fill_ckpt(t, NULL));
        t->last_ckpt_step = t->step;
        return MOLT_OK;
    }
    ckpt_state s;
    ckpt_state_init(&s);
    double keep = t->elapsed_prev;
    t->elapsed_prev += elapsed_run;
    molt_status st = fill_ckpt(t, &s);
    t->elapsed_prev = keep;
    char *path = NULL;
    if (st == MOLT_OK) {
        bool kill_in_write = trn_env_long("MOLT_TEST_KILL_IN_CKPT_WRITE") == t->step;
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
    if (st == MOLT_OK)
        t->last_ckpt_step = t->step;
    if (st == MOLT_OK && trn_env_long("MOLT_TEST_KILL_AT_STEP") == t->step)
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
    for (int64_t k = 0; k < ct->numel; k++)
        if (!isfinite(ct->data[k]))
            return molt_err(MOLT_EFORMAT, "checkpoint %s: tensor '%s' holds a non-finite value "
                            "(element %lld): resume from an earlier checkpoint", file, name,
                            (long long)k);
    lora_shard_from_full(&t->ad, unit_of(t, i), i % 2, ct->data, dst);
    return MOLT_OK;
}

static molt_status restore(trn *t, const ckpt_state *s, const char *file) {
    char warn[1024], name[CKPT_NAME_MAX + 16];
    const ckpt_blob *cfg = ckpt_get_blob(s, "config.resolved");
    MOLT_TRY(trn_check_resume_spec(cfg ? (const char *)cfg->data : NULL, t->cfg->adapter,
                                   file));
    MOLT_TRY(ckpt_check_hashes(s, file, &t->hashes, t->o->force, warn, sizeof warn));
    if (*warn && t->par.rank == 0)
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

// Contract in trn_internal.h.
molt_status trn_maybe_resume(trn *t, bool *resumed) {
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

// Test hook: MOLT_TEST_GRADS=FILE writes the whole adapter's gradient of the first step this
// process runs (summed over ranks, averaged over micro-batches, before clipping) to FILE as
// safetensors, named like the checkpoint's tensors, so runs on any number of ranks can be
// compared.
molt_status trn_dump_grads(trn *t) {
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
molt_status trn_save_adapter(trn *t) {
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
