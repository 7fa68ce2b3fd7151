// tests/test_plan.c: `molt plan`'s numbers (trn_plan_compute) against what molt allocates.
//   - the weights of the tiny preset, F32 and NF4 (+ double quantization), equal
//     mdl_weight_bytes of the loaded model (the plan counts the same storage);
//   - layouts that cannot work are refused with a message (ranks not a multiple of expert,
//     experts not splitting, a batch not splitting);
//   - measured: `molt train` on the tiny and small presets with 1, 2 and 4 ranks (the experts
//     split over every rank), with MOLT_PROFILE=1 so that each rank prints the peak of molt's
//     data (common/err.h's accounting: live heap blocks, arena pieces handed out); each rank's
//     peak is within 10% of the plan's total for a CPU run (rank 0: while it writes a
//     checkpoint). The small preset also with activation checkpointing. The multi-rank runs
//     need a launcher (they are left out without one).
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "harness/harness.h"
#include "harness/mpi_env.h"
#include "train/trainer.h"

static char dir[64], molt[4200], src[4096];

static void sh(const char *cmd) {
    if (system(cmd) != 0) {
        fprintf(stderr, "test_plan: '%s' failed\n", cmd);
        abort();
    }
}

static void write_model(const char *preset, const char *name) {
    char p[4200], tok[4200], out[256];
    snprintf(p, sizeof p, "%s/configs/models/%s.json", src, preset);
    snprintf(tok, sizeof tok, "%s/configs/tokenizers/tekken.json", src);
    snprintf(out, sizeof out, "%s/%s", dir, name);
    mdl_init_opts o = {.preset = p, .out_dir = out, .seed = 2, .tokenizer = tok};
    if (mdl_init_model(&o) != MOLT_OK) {
        fprintf(stderr, "test_plan: %s\n", molt_err_msg());
        abort();
    }
}

static void setup_all(void) {
    snprintf(dir, sizeof dir, "/tmp/molt-plan-XXXXXX");
    if (!mkdtemp(dir))
        abort();
    const char *s = getenv("MOLT_SOURCE_DIR");
    snprintf(src, sizeof src, "%s", s ? s : ".");
    snprintf(molt, sizeof molt, "%s", mpi_env_self());
    char *slash = strrchr(molt, '/');
    snprintf(slash + 1, sizeof molt - (size_t)(slash + 1 - molt), "molt");
    write_model("tiny", "tiny");
    char cmd[8400];
    snprintf(cmd, sizeof cmd, "head -n 200 %s/configs/data/digits-train.jsonl > %s/train.jsonl",
             src, dir);
    sh(cmd);
}

static void teardown_all(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    sh(cmd);
}

static void opts_for(trn_plan_opts *o, const char *model, int ranks, int expert,
                     const char *quant, const char *adapter, int seq, int batch, bool ckpt) {
    memset(o, 0, sizeof *o);
    char p[256];
    snprintf(p, sizeof p, "%s/%s/config.json", dir, model);
    ck_assert_ok(mcfg_load(p, &o->cfg));
    o->ranks = ranks;
    o->expert = expert;
    if (quant) {
        ck_assert_ok(mdl_qspec_parse(quant, &o->quant));
        o->quant_set = true;
    }
    ck_assert_ok(lora_spec_parse(adapter, &o->adapter));
    o->seq_len = seq;
    o->batch = batch;
    o->act_ckpt = ckpt;
}

#define ADAPTER "r=8,alpha=16,targets=q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+" \
                "shared_experts.up_proj+experts"

START_TEST(weights_as_loaded) {
    const char *quants[] = {NULL, "nf4", "int8", "fp8,experts=bf16"};
    for (int i = 0; i < 4; i++) {
        trn_plan_opts o;
        opts_for(&o, "tiny", 1, 1, quants[i], ADAPTER, 16, 1, false);
        trn_plan p;
        ck_assert_ok(trn_plan_compute(&o, &p));
        mdl_model m;
        char p_dir[128];
        snprintf(p_dir, sizeof p_dir, "%s/tiny", dir);
        ck_assert_ok(mdl_load_quant(p_dir, quants[i] ? &o.quant : NULL, &m));
        // the plan also counts each tensor's struct: at most 192 bytes per tensor more
        double got = p.weights_total, want = (double)mdl_weight_bytes(&m);
        ck_assert_msg(got >= want && got - want < 192.0 * 200, "%s: plan %.0f, loaded %.0f bytes",
                      quants[i] ? quants[i] : "f32", got, want);
        mdl_free(&m);
    }
}
END_TEST

START_TEST(bad_layouts) {
    trn_plan_opts o;
    trn_plan p;
    opts_for(&o, "tiny", 3, 2, NULL, ADAPTER, 16, 6, false);
    ck_assert_int_eq(trn_plan_compute(&o, &p), MOLT_EARG);
    opts_for(&o, "tiny", 3, 3, NULL, ADAPTER, 16, 6, false);
    ck_assert_int_eq(trn_plan_compute(&o, &p), MOLT_EARG);
    ck_assert_msg(strstr(molt_err_msg(), "8 routed experts"), "%s", molt_err_msg());
    opts_for(&o, "tiny", 4, 2, NULL, ADAPTER, 16, 6, false);
    ck_assert_int_eq(trn_plan_compute(&o, &p), MOLT_EARG);
    ck_assert_msg(strstr(molt_err_msg(), "batch of 6 rows"), "%s", molt_err_msg());
    opts_for(&o, "tiny", 2, 1, NULL, "r=4,targets=nothing_like_this", 16, 2, false);
    ck_assert_int_eq(trn_plan_compute(&o, &p), MOLT_EARG);
}
END_TEST

// The peaks "r: data / hwm" each rank printed, in rank order.
static int read_peaks(const char *log, double *peaks, int cap) {
    FILE *f = fopen(log, "r");
    ck_assert_msg(f != NULL, "no %s", log);
    char line[4096];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        const char *at = strstr(line, "VmHWM:");
        if (!strstr(line, "memory per rank") || !at)
            continue;
        at += 6;
        int r;
        double a, b;
        int used;
        while (n < cap && sscanf(at, " %d: %lf / %lf%n", &r, &a, &b, &used) == 3) {
            peaks[n++] = a;
            at += used;
        }
    }
    fclose(f);
    return n;
}

// molt train on `model` with n ranks (the experts split over all of them) against the plan.
static void measured(const char *model, int n, int seq, int batch, const char *quant,
                     bool ckpt) {
    if (n > 1 && !mpi_env_available())
        return;
    char cfg[256], out[256], log[300];
    snprintf(cfg, sizeof cfg, "%s/%s-%d-%d-%s.yaml", dir, model, n, ckpt, quant ? quant : "f32");
    snprintf(out, sizeof out, "%s/run-%s-%d-%d-%s", dir, model, n, ckpt, quant ? quant : "f32");
    snprintf(log, sizeof log, "%s.log", out);
    FILE *f = fopen(cfg, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "model:\n  path: %s/%s\n  quant: %s\nadapter:\n  spec: \"%s\"\n"
               "data:\n  train: %s/train.jsonl\n  format: alpaca\n  max_seq_len: %d\n"
               "train:\n  batch_size: %d\n  steps: 2\n  activation_checkpointing: %s\n"
               "optim:\n  lr: 0.001\nparallel:\n  expert: %d\noutput_dir: %s\n",
            dir, model, quant ? quant : "none", ADAPTER, dir, seq, batch, ckpt ? "true" : "false",
            n, out);
    fclose(f);
    char *argv[] = {molt, "train", "--config", cfg, NULL};
    char *env[] = {"MOLT_PROFILE=1", NULL};
    int rc = n > 1 ? mpi_env_launch(n, argv, env, log) : -2;
    if (n == 1) { // one process, without a launcher
        char cmd[8800];
        snprintf(cmd, sizeof cmd, "MOLT_PROFILE=1 OMP_NUM_THREADS=1 %s train --config %s > %s 2>&1",
                 molt, cfg, log);
        rc = system(cmd) == 0 ? 0 : 1;
    }
    ck_assert_msg(rc == 0, "%s on %d ranks: exit %d (log %s)", model, n, rc, log);
    double peaks[8];
    int got = read_peaks(log, peaks, 8);
    ck_assert_msg(got == n, "%s: %d peaks for %d ranks", log, got, n);
    trn_plan_opts o;
    opts_for(&o, model, n, n, quant, ADAPTER, seq, batch, ckpt);
    char tok[256];
    snprintf(tok, sizeof tok, "%s/%s/tekken.json", dir, model);
    size_t before = molt_mem_in_use();
    tok_tokenizer *t;
    chat_template *ct;
    ck_assert_ok(tok_load(tok, &t));
    ck_assert_ok(chat_template_new(t, NULL, &ct));
    o.tokenizer_bytes = (double)(molt_mem_in_use() - before);
    chat_template_free(ct);
    tok_free(t);
    trn_plan p;
    ck_assert_ok(trn_plan_compute(&o, &p));
    for (int r = 0; r < n; r++) {
        double plan = (r == 0 ? p.total_cpu_rank0 : p.total_cpu) / (1024.0 * 1024.0);
        double rel = (peaks[r] - plan) / plan;
        fprintf(stderr, "plan %s %s %d rank%s%s: rank %d measured %.1f MiB, plan %.1f MiB "
                "(%+.1f%%)\n", model, quant ? quant : "f32", n, n == 1 ? "" : "s",
                ckpt ? " (checkpointing)" : "", r, peaks[r], plan, 100 * rel);
        ck_assert_msg(fabs(rel) <= 0.10, "%s, %d ranks, rank %d: measured %.1f MiB, plan %.1f",
                      model, n, r, peaks[r], plan);
    }
}

START_TEST(tiny_measured) {
    for (int n = 1; n <= 4; n *= 2)
        measured("tiny", n, 64, 4, NULL, false);
    measured("tiny", 2, 64, 4, "nf4", true);
}
END_TEST

START_TEST(small_measured) {
    if (getenv("MOLT_SANITIZED")) // minutes under the sanitizers; the tiny preset covers it
        return;
    write_model("small", "small");
    for (int n = 1; n <= 4; n *= 2)
        measured("small", n, 64, 4, NULL, false);
    measured("small", 1, 64, 4, NULL, true);
    measured("small", 2, 64, 4, "nf4", false);
}
END_TEST

int main(void) {
    Suite *s = suite_create("plan");
    TCase *tc = tcase_create("plan");
    tcase_add_unchecked_fixture(tc, setup_all, teardown_all);
    tcase_set_timeout(tc, 1200);
    tcase_add_test(tc, weights_as_loaded);
    tcase_add_test(tc, bad_layouts);
    tcase_add_test(tc, tiny_measured);
    tcase_add_test(tc, small_measured);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
