// tests/test_train_parallel.c: `molt train` across MPI ranks against one process, on the
// tiny preset (8 routed experts) with LoRA on attention, the dense and shared MLP and the
// routed experts. The molt binary beside this test runs under the launcher (tests/harness/
// mpi_env.h) with 1, 2 and 4 ranks as parallel.data x parallel.expert = 2x1, 1x2, 2x2, 1x4:
//   - gradients: from one checkpoint (5 steps of one process, so every B is non-zero), one
//     more step on each layout writes the whole adapter's gradient (MOLT_TEST_GRADS); its loss
//     and every tensor agree with one process within 1e-5 (relative to the tensor's largest
//     value), also with an NF4 base, activation checkpointing and grad accumulation;
//   - 10 steps from scratch on each layout: the adapters agree within 1e-4;
//   - checkpoints do not depend on the ranks: 10 steps on 4 ranks, resumed to 20 on 2 ranks
//     and on 1, agree with 20 steps of one process;
//   - the same with LoRA dropout (each rank draws the masks its rows have in the whole batch);
//   - `molt forward` on 2 and 4 ranks (experts split over them) gives the logits of one
//     process, with an adapter, on an F32 base, NF4 quantized on load and a pre-quantized
//     NF4 checkpoint, on the tiny preset and on one whose expert stacks fill whole groups of
//     the double quantization (both ways a shard keeps the whole stack's absmax);
//     a sequence longer than the model's positions ends the job with one process's message;
//   - `molt train --eval-only` with an adapter on 4 ranks prints one process's loss;
//   - SIGTERM on one rank stops every rank after the same step, with its checkpoint, and
//     the run resumes to one process's adapter;
//   - a rank killed in the middle of step 7 ends the job with a non-zero status, the step-5
//     checkpoint is intact and resumes to the same result; a rank that hangs (SIGSTOP) makes
//     the others fail once parallel.timeout_s has passed, naming the collective and the rank.
// Skipped (77) without a launcher.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "harness/harness.h"
#include "harness/mpi_env.h"
#include "model/model.h"

static char dir[64], molt[4200];

static void sh(const char *fmt, const char *a, const char *b) {
    char cmd[8192];
    snprintf(cmd, sizeof cmd, fmt, a, b);
    if (system(cmd) != 0) {
        fprintf(stderr, "test_train_parallel: '%s' failed\n", cmd);
        abort();
    }
}

static void setup_all(void) {
    snprintf(dir, sizeof dir, "/tmp/molt-trainpar-XXXXXX");
    if (!mkdtemp(dir))
        abort();
    snprintf(molt, sizeof molt, "%s", mpi_env_self());
    char *slash = strrchr(molt, '/');
    snprintf(slash + 1, sizeof molt - (size_t)(slash + 1 - molt), "molt");
    const char *src = getenv("MOLT_SOURCE_DIR");
    src = src ? src : ".";
    char preset[4096], tok[4096], base[128];
    snprintf(preset, sizeof preset, "%s/configs/models/tiny.json", src);
    snprintf(tok, sizeof tok, "%s/configs/tokenizers/tekken.json", src);
    snprintf(base, sizeof base, "%s/base", dir);
    mdl_init_opts o = {.preset = preset, .out_dir = base, .seed = 1, .tokenizer = tok};
    if (mdl_init_model(&o) != MOLT_OK)
        abort();
    sh("head -n 60 %s/configs/data/digits-train.jsonl > %s/train.jsonl", src, dir);
    sh("head -n 8 %s/configs/data/digits-eval.jsonl > %s/eval.jsonl", src, dir);
    char path[128];
    snprintf(path, sizeof path, "%s/c.yaml", dir);
    FILE *f = fopen(path, "w");
    if (!f)
        abort();
    fprintf(f, "model:\n  path: %s/base\nadapter:\n  r: 4\n  alpha: 8\n"
               "  targets: [q_a_proj, kv_b_proj, o_proj, shared_experts.up_proj, gate_proj, "
               "experts]\n"
               "data:\n  train: %s/train.jsonl\n  eval: [%s/eval.jsonl]\n  format: alpaca\n"
               "  max_seq_len: 48\n"
               "train:\n  batch_size: 4\n  grad_accum: 2\n  steps: 10\n  seed: 3\n"
               "optim:\n  lr: 0.002\n  max_grad_norm: 0.5\n"
               "checkpoint:\n  every: 5\n  keep_last: 0\neval:\n  every: 10\n",
            dir, dir, dir);
    fclose(f);
}

static void teardown_all(void) { sh("rm -rf %s%s", dir, ""); }

// Runs `molt train --config c.yaml --set output_dir=DIR/out ARGS...` on np ranks (np 1: one
// process, still through the launcher); extra "NAME=VALUE" environment in env. Returns the
// exit status; the output goes to DIR/out.log.
static int train(int np, const char *out, const char *const *args, char *const *env) {
    char cfg[128], od[160], log[160];
    snprintf(cfg, sizeof cfg, "%s/c.yaml", dir);
    snprintf(od, sizeof od, "output_dir=%s/%s", dir, out);
    snprintf(log, sizeof log, "%s/%s.log", dir, out);
    char *argv[32] = {molt, "train", "--config", cfg, "--set", od};
    int n = 6;
    for (int i = 0; args && args[i]; i++)
        argv[n++] = (char *)args[i];
    argv[n] = NULL;
    return mpi_env_launch(np, argv, env, log);
}

static void train_ok(int np, const char *out, const char *const *args, char *const *env) {
    int rc = train(np, out, args, env);
    if (rc == 77)
        return;
    char log[160];
    snprintf(log, sizeof log, "%s/%s.log", dir, out);
    if (rc != 0)
        sh("tail -n 30 %s 1>&2%s", log, "");
    ck_assert_msg(rc == 0, "%d ranks, %s: exit %d (log %s)", np, out, rc, log);
}

// Largest |a - b| / max|a| over every tensor of two safetensors files (same names).
static double max_rel(const char *a_path, const char *b_path, char *worst, size_t cap) {
    st_reader *a, *b;
    ck_assert_ok(st_open(a_path, &a));
    ck_assert_ok(st_open(b_path, &b));
    ck_assert_int_eq(st_count(a), st_count(b));
    double w = 0;
    for (int i = 0; i < st_count(a); i++) {
        const st_tensor *x = st_at(a, i), *y = st_find(b, x->name);
        ck_assert_msg(y && y->numel == x->numel, "%s: %s missing or reshaped", b_path, x->name);
        const float *px = x->data, *py = y->data;
        double md = 0, mx = 0;
        for (int64_t k = 0; k < x->numel; k++) {
            md = fmax(md, fabs((double)px[k] - py[k]));
            mx = fmax(mx, fabs((double)px[k]));
        }
        double r = mx > 0 ? md / mx : md;
        if (isnan(r) || r > w) {
            w = isnan(r) ? INFINITY : r;
            snprintf(worst, cap, "%s", x->name);
        }
    }
    st_close(a);
    st_close(b);
    return w;
}

static double adapter_rel(const char *ref, const char *run, char *worst, size_t cap) {
    char a[256], b[256];
    snprintf(a, sizeof a, "%s/%s/adapter/adapter_model.safetensors", dir, ref);
    snprintf(b, sizeof b, "%s/%s/adapter/adapter_model.safetensors", dir, run);
    return max_rel(a, b, worst, cap);
}

// The loss of metrics line `step` of run `out`.
static double loss_at(const char *out, int step) {
    char path[160], line[2048];
    snprintf(path, sizeof path, "%s/%s/metrics.jsonl", dir, out);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "no %s", path);
    double v = NAN;
    char want[32];
    snprintf(want, sizeof want, "{\"step\":%d,", step);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, want, strlen(want))) {
            const char *l = strstr(line, "\"loss\":");
            v = l ? strtod(l + 7, NULL) : NAN;
        }
    fclose(f);
    return v;
}

static const struct {
    int np;
    const char *expert; // parallel.expert
} layouts[] = {{2, "1"}, {2, "2"}, {4, "2"}, {4, "4"}};
#define N_LAYOUTS 4

// From a copy of `from`'s step-5 checkpoint, one more step on each layout: loss and gradient.
static void gradients_agree(const char *tag, const char *const *extra) {
    if (!mpi_env_available())
        return;
    char from[64], ref[64];
    snprintf(from, sizeof from, "%s-warm", tag);
    snprintf(ref, sizeof ref, "%s-1", tag);
    const char *warm[16] = {"--set", "train.steps=5"};
    int n = 2;
    for (int i = 0; extra && extra[i]; i++)
        warm[n++] = extra[i];
    warm[n] = NULL;
    train_ok(1, from, warm, NULL);
    for (int k = -1; k < N_LAYOUTS; k++) {
        char out[64], env[256], par[64];
        if (k < 0)
            snprintf(out, sizeof out, "%s", ref);
        else
            snprintf(out, sizeof out, "%s-%dx%s", tag, layouts[k].np, layouts[k].expert);
        char cmd[512];
        snprintf(cmd, sizeof cmd, "mkdir -p %s/%s/checkpoints && cp %s/%s/checkpoints/step-5.h5 "
                 "%s/%s/checkpoints/", dir, out, dir, from, dir, out);
        sh("%s%s", cmd, "");
        snprintf(env, sizeof env, "MOLT_TEST_GRADS=%s/%s.grads", dir, out);
        snprintf(par, sizeof par, "parallel.expert=%s", k < 0 ? "1" : layouts[k].expert);
        const char *args[16] = {"--resume", "auto", "--set", "train.steps=6", "--set", par};
        int m = 6;
        for (int i = 0; extra && extra[i]; i++)
            args[m++] = extra[i];
        args[m] = NULL;
        char *envp[] = {env, NULL};
        train_ok(k < 0 ? 1 : layouts[k].np, out, args, envp);
        if (k < 0)
            continue;
        char a[160], b[160], worst[256] = "";
        snprintf(a, sizeof a, "%s/%s.grads", dir, ref);
        snprintf(b, sizeof b, "%s/%s.grads", dir, out);
        double r = max_rel(a, b, worst, sizeof worst);
        double l1 = loss_at(ref, 6), l2 = loss_at(out, 6);
        fprintf(stderr, "%s: gradient max rel %.3g (%s), loss %.9g vs %.9g\n", out, r, worst, l2,
                l1);
        ck_assert_msg(r <= 1e-5, "%s: gradient %s differs by %g relative", out, worst, r);
        ck_assert_msg(fabs(l1 - l2) <= 1e-5 * fabs(l1), "%s: loss %.9g vs %.9g", out, l2, l1);
    }
}

START_TEST(gradients_f32) { gradients_agree("g", NULL); }
END_TEST

START_TEST(gradients_dropout) {
    const char *extra[] = {"--set", "adapter.dropout=0.1", NULL};
    gradients_agree("d", extra);
}
END_TEST

START_TEST(gradients_nf4_checkpointing_accum) {
    const char *extra[] = {"--set", "model.quant=nf4", "--set",
                           "train.activation_checkpointing=true", "--set", "train.grad_accum=3",
                           NULL};
    gradients_agree("q", extra);
}
END_TEST

START_TEST(ten_steps) {
    if (!mpi_env_available())
        return;
    train_ok(1, "t-1", NULL, NULL);
    for (int k = 0; k < N_LAYOUTS; k++) {
        char out[64], par[64], worst[256] = "";
        snprintf(out, sizeof out, "t-%dx%s", layouts[k].np, layouts[k].expert);
        snprintf(par, sizeof par, "parallel.expert=%s", layouts[k].expert);
        const char *args[] = {"--set", par, NULL};
        train_ok(layouts[k].np, out, args, NULL);
        double r = adapter_rel("t-1", out, worst, sizeof worst);
        fprintf(stderr, "%s: adapter after 10 steps, max rel %.3g (%s)\n", out, r, worst);
        ck_assert_msg(r <= 1e-4, "%s: adapter %s differs by %g relative", out, worst, r);
    }
}
END_TEST

// 10 steps of a 20-step run on 4 ranks (stopped by a kill once the step-10 checkpoint is
// written), then on to 20 on 2 ranks and on 1, from the same checkpoint.
START_TEST(checkpoints_move_between_rank_counts) {
    if (!mpi_env_available())
        return;
    const char *twenty[] = {"--set", "train.steps=20", NULL};
    train_ok(1, "c-1", twenty, NULL);
    const char *ten[] = {"--set", "train.steps=20", "--set", "parallel.expert=4", NULL};
    char *stop[] = {"MOLT_TEST_KILL_AT_STEP=10", NULL};
    ck_assert_int_ne(train(4, "c-4", ten, stop), 0);
    const char *to2[] = {"--set", "train.steps=20", "--set", "parallel.expert=2", "--resume",
                         "auto", NULL};
    const char *to1[] = {"--set", "train.steps=20", "--resume", "auto", NULL};
    const char *outs[2] = {"c-4to2", "c-4to1"};
    for (int i = 0; i < 2; i++) {
        char cmd[512], worst[256] = "";
        snprintf(cmd, sizeof cmd, "mkdir -p %s/%s/checkpoints && cp %s/c-4/checkpoints/step-10.h5 "
                 "%s/%s/checkpoints/", dir, outs[i], dir, dir, outs[i]);
        sh("%s%s", cmd, "");
        train_ok(i == 0 ? 2 : 1, outs[i], i == 0 ? to2 : to1, NULL);
        double r = adapter_rel("c-1", outs[i], worst, sizeof worst);
        fprintf(stderr, "%s: adapter after 20 steps, max rel %.3g (%s)\n", outs[i], r, worst);
        ck_assert_msg(r <= 1e-4, "%s: adapter %s differs by %g relative", outs[i], worst, r);
    }
}
END_TEST

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Whether run out's log holds `what` (a fixed string without single quotes).
static bool log_has(const char *out, const char *what) {
    char path[160], cmd[512];
    snprintf(path, sizeof path, "%s/%s.log", dir, out);
    snprintf(cmd, sizeof cmd, "grep -qF -- '%s' %s", what, path);
    return system(cmd) == 0;
}

// The wait a timeout message of run out's log reports ("waited W s (parallel.timeout_s T);
// ranks that did not arrive: ..."), or -1 when the log has none for timeout T.
static double log_timeout_wait(const char *out, const char *t) {
    char path[160], line[1024], tail[96];
    snprintf(path, sizeof path, "%s/%s.log", dir, out);
    snprintf(tail, sizeof tail, " s (parallel.timeout_s %s); ranks that did not arrive:", t);
    FILE *f = fopen(path, "r");
    double w = -1;
    while (f && w < 0 && fgets(line, sizeof line, f)) {
        char *at = strstr(line, tail), *num;
        if (!at)
            continue;
        *at = '\0';
        num = strrchr(line, ' '); // "... waited W"
        if (num && num - line >= 6 && !strncmp(num - 6, "waited", 6))
            w = strtod(num + 1, NULL);
    }
    if (f)
        fclose(f);
    return w;
}

START_TEST(killed_rank) {
    if (!mpi_env_available())
        return;
    const char *args[] = {"--set", "train.steps=20", "--set", "parallel.expert=2", "--set",
                          "parallel.timeout_s=30", NULL};
    char *env[] = {"MOLT_TEST_KILL_RANK=1@7", NULL};
    double t0 = now_s();
    int rc = train(4, "k-4", args, env);
    double took = now_s() - t0;
    ck_assert_msg(rc != 0, "the job of a killed rank exited 0");
    ck_assert_msg(took < 60, "the others took %.1f s to end", took);
    ck_assert_msg(log_has("k-4", "signal 9") || log_has("k-4", "did not arrive"),
                  "no message about the killed rank");
    char p[160];
    snprintf(p, sizeof p, "%s/k-4/checkpoints/step-5.h5", dir);
    struct stat sb;
    ck_assert_msg(stat(p, &sb) == 0, "step-5 checkpoint missing");
    snprintf(p, sizeof p, "%s/k-4/checkpoints/step-10.h5", dir);
    ck_assert_msg(stat(p, &sb) != 0, "a checkpoint after the kill");
    // the run goes on from step 5 (on 2 ranks) to the same adapter as one process
    const char *resume[] = {"--set", "train.steps=20", "--resume", "auto", NULL};
    train_ok(2, "k-4", resume, NULL);
    ck_assert(log_has("k-4", "step-5.h5 (step 5)"));
    const char *twenty[] = {"--set", "train.steps=20", NULL};
    train_ok(1, "k-1", twenty, NULL);
    char worst[256] = "";
    double r = adapter_rel("k-1", "k-4", worst, sizeof worst);
    fprintf(stderr, "k-4: killed at step 7, resumed from step 5 on 2 ranks to 20: adapter max "
            "rel %.3g (%s)\n", r, worst);
    ck_assert_msg(r <= 1e-4, "resumed after the kill: %s differs by %g relative", worst, r);
}
END_TEST

START_TEST(hung_rank_times_out) {
    if (!mpi_env_available())
        return;
    const char *args[] = {"--set", "train.steps=20", "--set", "parallel.expert=2", "--set",
                          "parallel.timeout_s=3", NULL};
    char *env[] = {"MOLT_TEST_STOP_RANK=2@3", NULL};
    double t0 = now_s();
    int rc = train(4, "h-4", args, env);
    double took = now_s() - t0;
    ck_assert_msg(rc != 0, "a hung rank's job exited 0");
    ck_assert_msg(took < 60, "the job took %.1f s to end", took);
    // the wait is polled between backoffs, so a loaded machine may report 3.1 s or more
    double waited = log_timeout_wait("h-4", "3");
    ck_assert_msg(waited >= 3.0 && waited < 60, "no timeout message, or a wait of %g s", waited);
    ck_assert_msg(log_has("h-4", "(world 2)") || log_has("h-4", "arrive: 2"),
                  "the message does not name world rank 2");
}
END_TEST

// SIGTERM on rank 1 in the middle of step 4 of a 2-rank run: both ranks finish that step and
// stop after it (exit 130, the step-4 checkpoint, no later one), and the run resumes on 2
// ranks to one process's adapter.
START_TEST(signal_on_one_rank) {
    if (!mpi_env_available())
        return;
    const char *args[] = {"--set", "parallel.expert=2", "--set", "checkpoint.every=3", NULL};
    char *env[] = {"MOLT_TEST_TERM_RANK=1@4", NULL};
    int rc = train(2, "s-2", args, env);
    ck_assert_msg(rc == 130, "a stop request on one rank: exit %d, expected 130", rc);
    ck_assert_msg(log_has("s-2", "interrupted by SIGTERM: checkpoint of step 4 written"),
                  "no message about the stop after step 4");
    char p[160];
    struct stat sb;
    snprintf(p, sizeof p, "%s/s-2/checkpoints/step-4.h5", dir);
    ck_assert_msg(stat(p, &sb) == 0, "no checkpoint of the step the ranks stopped after");
    snprintf(p, sizeof p, "%s/s-2/checkpoints/step-5.h5", dir);
    ck_assert_msg(stat(p, &sb) != 0, "a rank went on after the stop request");
    ck_assert_msg(!isnan(loss_at("s-2", 4)) && isnan(loss_at("s-2", 5)),
                  "metrics do not end at step 4");
    const char *resume[] = {"--set", "parallel.expert=2", "--resume", "auto", NULL};
    train_ok(2, "s-2", resume, NULL);
    train_ok(1, "s-1", NULL, NULL);
    char worst[256] = "";
    double r = adapter_rel("s-1", "s-2", worst, sizeof worst);
    fprintf(stderr, "s-2: stopped after step 4 on 2 ranks, resumed to 10: adapter max rel %.3g "
            "(%s)\n", r, worst);
    ck_assert_msg(r <= 1e-4, "resumed after the stop: %s differs by %g relative", worst, r);
}
END_TEST

// A preset like tiny with wider experts: gate_up of one expert is 256 NF4 blocks (whole groups
// of the double quantization), down 128 (half a group).
static void write_wide(void) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "sed -e 's/\"hidden_size\": 32/\"hidden_size\": 64/' -e "
             "'s/\"moe_intermediate_size\": 16/\"moe_intermediate_size\": 128/' "
             "%s/configs/models/tiny.json > %s/wide.json", getenv("MOLT_SOURCE_DIR"), dir);
    sh("%s%s", cmd, "");
    char preset[128], tok[4096], out[128];
    snprintf(preset, sizeof preset, "%s/wide.json", dir);
    snprintf(tok, sizeof tok, "%s/configs/tokenizers/tekken.json", getenv("MOLT_SOURCE_DIR"));
    snprintf(out, sizeof out, "%s/wide", dir);
    mdl_init_opts o = {.preset = preset, .out_dir = out, .seed = 4, .tokenizer = tok};
    ck_assert_ok(mdl_init_model(&o));
}

// molt forward on np ranks (np 1: one process) of `model` into FILE.
static void forward(int np, const char *model, const char *out, const char *quant,
                    const char *adapter) {
    char m[128], t[128], o[128], log[160];
    snprintf(m, sizeof m, "%s/%s", dir, model);
    snprintf(t, sizeof t, "%s/tok.txt", dir);
    snprintf(o, sizeof o, "%s/%s", dir, out);
    snprintf(log, sizeof log, "%s/%s.log", dir, out);
    char *argv[16] = {molt, "forward", "--model", m, "--tokens", t, "--out", o};
    int n = 8;
    if (quant) {
        argv[n++] = "--base-quant";
        argv[n++] = (char *)quant;
    }
    if (adapter) {
        argv[n++] = "--adapter";
        argv[n++] = (char *)adapter;
    }
    argv[n] = NULL;
    int rc = mpi_env_launch(np, argv, NULL, log);
    ck_assert_msg(rc == 0, "forward %s on %d ranks: exit %d (log %s)", out, np, rc, log);
}

START_TEST(forward_ranks) {
    if (!mpi_env_available())
        return;
    char p[160];
    snprintf(p, sizeof p, "%s/tok.txt", dir);
    FILE *f = fopen(p, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "1 22 33 44 55\n1 100 200\n7 8 9 10 11 12 13\n1 5\n3 3 3 3 3 3 3 3 3\n");
    fclose(f);
    write_wide();
    char cmd[4800];
    snprintf(cmd, sizeof cmd, "%s quantize --model %s/wide --quant nf4 --out %s/wide-nf4 > "
             "/dev/null", molt, dir, dir);
    sh("%s%s", cmd, "");
    // an adapter for the tiny model: the one the 10-step test trained (or train one here)
    char ad[160];
    snprintf(ad, sizeof ad, "%s/fw-ad/adapter.h5", dir);
    const char *args[] = {"--set", "train.steps=2", NULL};
    train_ok(1, "fw-ad", args, NULL);
    struct {
        const char *model, *quant, *adapter, *tag;
    } cases[] = {{"base", NULL, ad, "f32"},
                 {"base", "nf4", ad, "nf4"},
                 {"wide", "nf4", NULL, "wide-nf4"},
                 {"wide-nf4", NULL, NULL, "wide-prequant"}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        char one[64];
        snprintf(one, sizeof one, "fw-%s-1.st", cases[c].tag);
        forward(1, cases[c].model, one, cases[c].quant, cases[c].adapter);
        for (int np = 2; np <= 4; np += 2) {
            char many[64], a[160], b[160], worst[256] = "";
            snprintf(many, sizeof many, "fw-%s-%d.st", cases[c].tag, np);
            forward(np, cases[c].model, many, cases[c].quant, cases[c].adapter);
            snprintf(a, sizeof a, "%s/%s", dir, one);
            snprintf(b, sizeof b, "%s/%s", dir, many);
            double r = max_rel(a, b, worst, sizeof worst);
            fprintf(stderr, "forward %s on %d ranks: logits max rel %.3g\n", cases[c].tag, np, r);
            ck_assert_msg(r <= 1e-5, "forward %s on %d ranks: %s differs by %g", cases[c].tag,
                          np, worst, r);
        }
    }
}
END_TEST

// molt forward on 2 ranks with a sequence past max_position_embeddings (513 tokens, the third
// of three, which rank 0 would run in the second round): the job fails at once with the
// message of one process, and no logits file is written.
START_TEST(forward_ranks_refuses_long_sequence) {
    if (!mpi_env_available())
        return;
    char p[160], o[160], log[160], m[160];
    snprintf(p, sizeof p, "%s/long.txt", dir);
    FILE *f = fopen(p, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "1 2 3\n4 5 6\n");
    for (int i = 0; i < 513; i++)
        fprintf(f, "%s%d", i ? " " : "", 7 + i % 100);
    fprintf(f, "\n");
    fclose(f);
    snprintf(m, sizeof m, "%s/base", dir);
    snprintf(o, sizeof o, "%s/long.st", dir);
    snprintf(log, sizeof log, "%s/long.st.log", dir);
    char *argv[] = {molt, "forward", "--model", m, "--tokens", p, "--out", o, NULL};
    int rc = mpi_env_launch(2, argv, NULL, log);
    ck_assert_msg(rc != 0, "a 513-token sequence on 2 ranks: exit 0");
    ck_assert_msg(log_has("long.st", "sequence 2: 513 positions, more than the model"),
                  "no message in %s", log);
    ck_assert_msg(log_has("long.st", "max_position_embeddings 512"), "no limit in %s", log);
    struct stat sb;
    ck_assert_msg(stat(o, &sb) != 0, "logits written despite the error");
}
END_TEST

// The eval_loss line of a --eval-only log.
static double eval_loss_of(const char *out) {
    char path[160], line[512];
    snprintf(path, sizeof path, "%s/%s.log", dir, out);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "no %s", path);
    double v = NAN;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "eval_loss ", 10))
            v = strtod(line + 10, NULL);
    fclose(f);
    return v;
}

// molt train --eval-only with an adapter on 1 and 4 ranks (experts over 2 of them).
START_TEST(eval_only_ranks) {
    if (!mpi_env_available())
        return;
    const char *warm[] = {"--set", "train.steps=2", NULL};
    train_ok(1, "ev-ad", warm, NULL);
    char ad[160];
    snprintf(ad, sizeof ad, "%s/ev-ad/adapter.h5", dir);
    const char *one[] = {"--eval-only", "--adapter", ad, NULL};
    const char *four[] = {"--eval-only", "--adapter", ad, "--set", "parallel.expert=2", NULL};
    train_ok(1, "ev-1", one, NULL);
    train_ok(4, "ev-4", four, NULL);
    double a = eval_loss_of("ev-1"), b = eval_loss_of("ev-4");
    fprintf(stderr, "eval-only: %.6f on one process, %.6f on 4 ranks\n", a, b);
    ck_assert_msg(isfinite(a) && fabs(a - b) <= 1e-5 * fabs(a), "eval_loss %.6f vs %.6f", b, a);
}
END_TEST

// Layouts that cannot work end every rank with a message naming the keys.
START_TEST(bad_layouts) {
    if (!mpi_env_available())
        return;
    struct {
        int np;
        const char *a, *b, *want;
    } cases[] = {
        {4, "parallel.expert=3", "train.steps=1", "parallel.expert = 3 does not divide the 4"},
        {2, "train.batch_size=3", "train.steps=1", "train.batch_size = 3 rows do not split"},
        {2, "parallel.data=1", "parallel.expert=1", "1 x 1 = 1, but the job has 2 ranks"},
        {3, "parallel.expert=3", "train.batch_size=3", "8 routed experts do not split evenly "
                                                       "over 3 ranks"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char out[32];
        snprintf(out, sizeof out, "bad-%zu", i);
        const char *args[] = {"--set", cases[i].a, "--set", cases[i].b, NULL};
        int rc = train(cases[i].np, out, args, NULL);
        ck_assert_msg(rc != 0, "%s: exit 0", cases[i].a);
        ck_assert_msg(log_has(out, cases[i].want), "%s: no '%s' in %s/%s.log", cases[i].a,
                      cases[i].want, dir, out);
    }
}
END_TEST

int main(void) {
    if (!mpi_env_available()) {
        fprintf(stderr, "test_train_parallel: no MPI launcher (MOLT_MPIEXEC): skipped\n");
        return 77;
    }
    Suite *s = suite_create("train_parallel");
    TCase *tc = tcase_create("ranks");
    tcase_add_unchecked_fixture(tc, setup_all, teardown_all);
    tcase_set_timeout(tc, 900);
    // under the sanitizers (several times slower) the runs that repeat code paths the others
    // take are left out: the numbers are checked by the plain build
    bool full = getenv("MOLT_SANITIZED") == NULL;
    if (full) {
        tcase_add_test(tc, gradients_f32);
        tcase_add_test(tc, gradients_dropout);
    }
    tcase_add_test(tc, gradients_nf4_checkpointing_accum);
    if (full)
        tcase_add_test(tc, ten_steps);
    tcase_add_test(tc, forward_ranks);
    tcase_add_test(tc, forward_ranks_refuses_long_sequence);
    tcase_add_test(tc, eval_only_ranks);
    if (full)
        tcase_add_test(tc, checkpoints_move_between_rank_counts);
    tcase_add_test(tc, killed_rank);
    tcase_add_test(tc, signal_on_one_rank);
    tcase_add_test(tc, hung_rank_times_out);
    tcase_add_test(tc, bad_layouts);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
