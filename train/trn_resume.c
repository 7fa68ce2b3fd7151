// train/trn_resume.c: the training checkpoints of a run: what goes into one (adapter,
// AdamW state, schedule, RNG, data cursor, resolved configuration, base model hashes),
// writing it (with the test hooks that kill the process at a chosen step), and resuming:
// finding the checkpoint, refusing one of another base, tokenizer or adapter spec, and
// restoring every piece exactly.
//
// Not here: the file format (checkpoint.c, ckpt_read.c), the loop (trainer.c).
#include "trn_internal.h"

#include <dirent.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

long trn_env_long(const char *name) {
    const char *v = getenv(name);
    return v && *v ? strtol(v, NULL, 10) : -1;
}

molt_status trn_save_ckpt(trn *t, double elapsed_run) {
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
    for (int64_t i = 0; i < numel; i++)
        if (!isfinite(ct->data[i]))
            return molt_err(MOLT_EFORMAT, "checkpoint %s: tensor '%s' holds a non-finite value "
                            "(element %lld): resume from an earlier checkpoint", file, name,
                            (long long)i);
    memcpy(dst, ct->data, (size_t)numel * sizeof *dst);
    return MOLT_OK;
}

static molt_status restore(trn *t, const ckpt_state *s, const char *file) {
    char warn[1024], name[CKPT_NAME_MAX + 16];
    const ckpt_blob *cfg = ckpt_get_blob(s, "config.resolved");
    MOLT_TRY(trn_check_resume_spec(cfg ? (const char *)cfg->data : NULL, t->cfg->adapter,
                                   file));
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

