// train/bench.c: `molt bench ckpt`: the size of a training checkpoint and the time to write
// and read it, for a LoRA on a preset model (attention, shared experts and routed experts).
// The model is built in memory with its vocabulary cut to BENCH_VOCAB rows: the embedding and
// lm_head are not adapted, so the checkpoint is the one a full-vocabulary run would write.
// The checkpoint holds what the trainer stores: every A and B, their AdamW moments and step
// counts, the schedule scalars, an rng state, a data cursor and a configuration text.
// Times are the best of --reps runs of ckpt_write (fsync and rename included) and ckpt_read
// (checksum verification included), in a temporary directory removed afterwards.
//
// Not here: the checkpoint format (checkpoint.c, ckpt_state.c), the training loop.
#include "trainer.h"

#include "../adapters/adapters.h"
#include "../common/opt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BENCH_VOCAB 1024

static const char usage[] =
    "usage: molt bench ckpt [--preset NAME] [--r N] [--reps N] [--quick]\n"
    "Builds the preset (default small) in memory, attaches a LoRA of rank N (default 16) to\n"
    "the attention projections, the shared experts and the routed experts, fills it and its\n"
    "AdamW state with random values, then times writing and reading the training checkpoint\n"
    "(best of --reps, default 3). Prints the file size in MiB and the seconds. --quick: the\n"
    "tiny preset, rank 4, one repetition.\n";

typedef struct {
    const char *preset;
    int r, reps;
} bench_opts;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int parse(int argc, char **argv, bench_opts *o) {
    const char *cmd = "molt bench ckpt", *r = NULL, *reps = NULL, *preset = NULL;
    bool quick = false;
    const molt_opt opts[] = {MOLT_OPT("--preset", &preset),
                             MOLT_OPT("--r", &r),
                             MOLT_OPT("--reps", &reps),
                             MOLT_OPT_FLAG("--quick", &quick),
                             MOLT_OPT_END};
    int rc = molt_opts_parse(cmd, usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc;
    *o = quick ? (bench_opts){.preset = "tiny", .r = 4, .reps = 1}
               : (bench_opts){.preset = "small", .r = 16, .reps = 3};
    int64_t rv = o->r, repsv = o->reps;
    if (!molt_opt_int(cmd, "--r", r, 1, 4096, &rv) ||
        !molt_opt_int(cmd, "--reps", reps, 1, 4096, &repsv))
        return 2;
    o->r = (int)rv;
    o->reps = (int)repsv;
    if (preset)
        o->preset = preset;
    return 0;
}

// Random values in every A/B and AdamW moment (second moments positive), as after training.
static molt_status fill_state(const lora_adapter *ad, ckpt_state *s) {
    ag_rng rng;
    ag_rng_seed(&rng, 12345);
    char name[CKPT_NAME_MAX + 16];
    for (int i = 0; i < 2 * ad->n_units; i++) {
        const lora_unit *u = &ad->units[i / 2];
        ag_tensor *p = i % 2 ? u->b : u->a;
        float *buf = molt_malloc((size_t)p->numel * sizeof *buf);
        if (!buf)
            return molt_err(MOLT_ENOMEM, "bench ckpt: out of memory");
        static const char *kinds[3] = {"", "adam_m.", "adam_v."};
        molt_status st = MOLT_OK;
        for (int k = 0; k < 3 && st == MOLT_OK; k++) {
            for (int64_t j = 0; j < p->numel; j++)
                buf[j] = (float)(k == 2 ? 1e-6 * ag_rng_uniform(&rng)
                                        : 0.02 * ag_rng_normal(&rng));
            snprintf(name, sizeof name, "%s%.100s.lora_%c", kinds[k], u->path, i % 2 ? 'B' : 'A');
            st = ckpt_set_tensor(s, name, p->ndim, p->shape, buf);
        }
        molt_free(buf);
        MOLT_TRY(st);
        snprintf(name, sizeof name, "adam_step.%.100s.lora_%c", u->path, i % 2 ? 'B' : 'A');
        MOLT_TRY(ckpt_set_int(s, name, 1000));
    }
    s->step = 1000;
    MOLT_TRY(ckpt_set_int(s, "train.step", 1000));
    MOLT_TRY(ckpt_set_int(s, "sched.step", 1000));
    MOLT_TRY(ckpt_set_float(s, "sched.lr_max", 2e-4));
    MOLT_TRY(ckpt_set_blob(s, "rng.dropout", rng.s, sizeof rng.s));
    uint8_t cursor[64] = {0};
    MOLT_TRY(ckpt_set_blob(s, "data.cursor", cursor, sizeof cursor));
    return ckpt_set_string(s, "config.resolved", "model:\n  path: bench\n");
}

// Attaches the benchmarked LoRA to the preset built in memory.
static molt_status build(const bench_opts *o, mdl_model *m, lora_adapter *ad) {
    char path[4096];
    MOLT_TRY(mdl_preset_find(o->preset, path, sizeof path));
    mcfg cfg;
    MOLT_TRY(mcfg_load(path, &cfg));
    cfg.vocab_size = BENCH_VOCAB;
    MOLT_TRY(mdl_create(m, &cfg));
    lora_spec spec;
    char text[256];
    snprintf(text, sizeof text, "r=%d,alpha=%d,targets=self_attn.*+shared_experts.*+experts",
             o->r, 2 * o->r);
    MOLT_TRY(lora_spec_parse(text, &spec));
    return lora_attach(m, &spec, false, ad);
}

// Writes and reads the checkpoint reps times in dir; best times, size and a content check.
static molt_status time_io(const ckpt_state *s, const char *dir, int reps, double *t_write,
                           double *t_read, double *mib) {
    *t_write = *t_read = 1e30;
    char want[65], got[65];
    ckpt_state_digest(s, want);
    molt_status st = MOLT_OK;
    for (int k = 0; k < reps && st == MOLT_OK; k++) {
        char *path = NULL;
        double t0 = now_s();
        st = ckpt_write(dir, s, 1, &path);
        double t1 = now_s();
        ckpt_state back;
        ckpt_state_init(&back);
        if (st == MOLT_OK)
            st = ckpt_read(path, &back);
        double t2 = now_s();
        struct stat sb;
        if (st == MOLT_OK && stat(path, &sb) == 0)
            *mib = (double)sb.st_size / (1024.0 * 1024.0);
        if (st == MOLT_OK) {
            ckpt_state_digest(&back, got);
            if (strcmp(got, want))
                st = molt_err(MOLT_EFORMAT, "bench ckpt: %s reads back different contents",
                              path);
        }
        *t_write = t1 - t0 < *t_write ? t1 - t0 : *t_write;
        *t_read = t2 - t1 < *t_read ? t2 - t1 : *t_read;
        ckpt_state_free(&back);
        if (path)
            remove(path);
        molt_free(path);
    }
    return st;
}

static molt_status run_bench(const bench_opts *o, mdl_model *m, lora_adapter *ad,
                             ckpt_state *s) {
    MOLT_TRY(build(o, m, ad));
    MOLT_TRY(fill_state(ad, s));
    const char *tmpdir = getenv("TMPDIR");
    char dir[1024], sub[1100];
    snprintf(dir, sizeof dir, "%s/molt-bench-ckpt-XXXXXX", tmpdir && *tmpdir ? tmpdir : "/tmp");
    if (!mkdtemp(dir))
        return molt_err(MOLT_EIO, "bench ckpt: cannot create a temporary directory");
    double tw, tr, mib = 0;
    molt_status st = time_io(s, dir, o->reps, &tw, &tr, &mib);
    snprintf(sub, sizeof sub, "%s/checkpoints", dir);
    rmdir(sub);
    rmdir(dir);
    MOLT_TRY(st);
    printf("preset %s, LoRA r %d on attention + shared experts + routed experts\n", o->preset,
           o->r);
    printf("%-24s %14s %14s %10s %10s\n", "", "adapter params", "tensors", "write s", "read s");
    printf("%-24s %14lld %14d %10.4f %10.4f\n", "checkpoint", (long long)ad->total_params,
           s->n_tensors, tw, tr);
    printf("checkpoint size %.2f MiB (best of %d)\n", mib, o->reps);
    return MOLT_OK;
}

int trn_cmd_bench_ckpt(int argc, char **argv) {
    bench_opts o;
    int rc = parse(argc, argv, &o);
    if (rc)
        return rc < 0 ? 0 : rc;
    mdl_model m = {0};
    lora_adapter ad = {0};
    ckpt_state s;
    ckpt_state_init(&s);
    molt_status st = run_bench(&o, &m, &ad, &s);
    if (st != MOLT_OK)
        fprintf(stderr, "molt bench ckpt: %s\n", molt_err_msg());
    ckpt_state_free(&s);
    lora_detach(&ad);
    mdl_free(&m);
    return st == MOLT_OK ? 0 : 1;
}
