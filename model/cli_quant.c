// model/cli_quant.c: `molt quantize` (a pre-quantized checkpoint from a model directory) and
// `molt bench quant-model` (bits/param, resident weight bytes, projected full-model size,
// logit error and perplexity change against F32, quantize-on-load vs pre-quantized load
// time). Argument parsing, measurement and printing only; the work is in quant_model.c and
// quant_io.c. Exit status: 0 success, 1 failure, 2 bad usage.
#include "mdl_quant.h"

#include "../common/fsio.h"
#include "../common/opt.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// Writes dir_out with config.json (and tekken.json when present) and the quantized weights.
static molt_status quantize_dir(const mdl_model *m, const char *src, const char *dst) {
    char a[4096], b[4096];
    if (mkdir(dst, 0755) != 0) {
        struct stat sb;
        if (stat(dst, &sb) != 0 || !S_ISDIR(sb.st_mode))
            return molt_err(MOLT_EIO, "cannot create %s", dst);
    }
    snprintf(a, sizeof a, "%s/config.json", src);
    snprintf(b, sizeof b, "%s/config.json", dst);
    MOLT_TRY(molt_copy_file(a, b));
    snprintf(a, sizeof a, "%s/tekken.json", src);
    snprintf(b, sizeof b, "%s/tekken.json", dst);
    if (access(a, R_OK) == 0)
        MOLT_TRY(molt_copy_file(a, b));
    snprintf(b, sizeof b, "%s/model.safetensors", dst);
    return mdl_save_quant(m, b);
}

static const char quant_usage[] =
    "usage: molt quantize --model DIR --quant SPEC [--double-quant on|off] --out DIR2 [--force]\n"
    "Writes DIR2 (config.json, tekken.json, model.safetensors) with the projections stored\n"
    "quantized and their state beside them (bitsandbytes names), loadable without\n"
    "re-quantizing. SPEC: nf4|int8|fp8|bf16|f32, then ,GROUP=FORMAT overrides (groups\n"
    "attention router shared_experts experts dense_mlp lm_head; router and lm_head stay f32\n"
    "unless named). FP8 checkpoints keep their E4M3 codes and scales with fp8. DIR2 must not\n"
    "exist or be empty; --force replaces it whole. It may not be, hold or lie inside DIR.\n";

int mdl_cmd_quantize(int argc, char **argv) {
    const char *model = NULL, *spec_s = NULL, *out = NULL, *dq = "on", *cmd = "molt quantize";
    bool force = false;
    const molt_opt opts[] = {MOLT_OPT("--model", &model),
                             MOLT_OPT("--quant", &spec_s),
                             MOLT_OPT("--out", &out),
                             MOLT_OPT("--double-quant", &dq),
                             MOLT_OPT_FLAG("--force", &force),
                             MOLT_OPT_END};
    int rc = molt_opts_parse(cmd, quant_usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc < 0 ? 0 : rc;
    static const char *const on_off[] = {"off", "on"};
    int dq_on = 1;
    if (!molt_opt_choice(cmd, "--double-quant", dq, on_off, 2, &dq_on))
        return 2;
    if (!model || !spec_s || !out)
        return molt_opt_usage_error(cmd, "--model, --quant and --out are required");
    mdl_qspec spec;
    if (mdl_qspec_parse(spec_s, &spec) != MOLT_OK) {
        fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
        return 2;
    }
    spec.nf4_double_quant = dq_on == 1;
    if (molt_check_overlap("--out", out, "--model", model) != MOLT_OK) {
        fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
        return 1;
    }
    mdl_model m = {0};
    molt_outdir d = {0};
    double t0 = now_s();
    molt_status st = molt_outdir_begin(&d, out, force, "--out");
    if (st == MOLT_OK)
        st = mdl_load_quant(model, &spec, &m);
    if (st == MOLT_OK)
        st = quantize_dir(&m, model, d.tmp);
    if (st == MOLT_OK)
        st = molt_outdir_commit(&d);
    if (st != MOLT_OK) {
        molt_outdir_abort(&d);
        fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
        mdl_free(&m);
        return 1;
    }
    char text[256];
    printf("wrote %s/model.safetensors (%s): %d quantized matrices, %.1f MiB of weights, "
           "%.2f s\n", out, mdl_qspec_str(&spec, text, sizeof text), m.n_qw,
           (double)mdl_weight_bytes(&m) / (1 << 20), now_s() - t0);
    mdl_free(&m);
    return 0;
}

// ---------------------------------------------------------------------------------------
// molt bench quant-model

#define BENCH_T 48

// Logits [T, V] of a seeded token sequence into a new buffer (NULL on failure).
static float *bench_logits(const mdl_model *m, const int32_t *ids, int T) {
    ag_ctx c;
    if (ag_ctx_init(&c) != MOLT_OK)
        return NULL;
    ag_ctx_set_grad(&c, false);
    mdl_batch b = {.ids = ag_tensor_new1(&c.act, AG_I32, T),
                   .pos = ag_tensor_new1(&c.act, AG_I32, T),
                   .seg = ag_tensor_new1(&c.act, AG_I32, T)};
    float *out = NULL;
    ag_tensor *lg = NULL;
    if (b.ids && b.pos && b.seg) {
        for (int t = 0; t < T; t++) {
            ((int32_t *)b.ids->data)[t] = ids[t];
            ((int32_t *)b.pos->data)[t] = t;
        }
        if (mdl_forward(&c, m, &b, &lg) == MOLT_OK &&
            (out = molt_malloc((size_t)lg->numel * sizeof *out)))
            memcpy(out, lg->data, (size_t)lg->numel * sizeof *out);
    }
    ag_ctx_free(&c);
    return out;
}

// Perplexity of ids[1..T) under logits rows [0, T-1).
static double perplexity(const float *lg, const int32_t *ids, int T, int64_t V) {
    double nll = 0;
    for (int t = 0; t + 1 < T; t++) {
        const float *row = lg + (int64_t)t * V;
        double mx = row[0], s = 0;
        for (int64_t j = 1; j < V; j++)
            mx = fmax(mx, row[j]);
        for (int64_t j = 0; j < V; j++)
            s += exp(row[j] - mx);
        nll += mx + log(s) - row[ids[t + 1]];
    }
    return exp(nll / (T - 1));
}

// Params of the quantizable groups (attention, shared, experts, dense) of a config: what a
// --base-quant FORMAT changes; the rest (embeddings, norms, router, lm_head) stays bf16.
static void param_split(const mcfg *c, double *quant, double *rest) {
    double total = (double)mdl_param_count(c);
    double H = c->hidden_size, V = c->vocab_size, L = c->num_hidden_layers;
    double k = c->first_k_dense_replace, E = c->n_routed_experts;
    double rest_n = V * H * (c->tie_word_embeddings ? 1 : 2) + H + (L - k) * E * H;
    rest_n += L * (2 * H + c->kv_lora_rank + (c->q_lora_rank ? c->q_lora_rank : 0));
    *rest = rest_n;
    *quant = total - rest_n;
}

static int bench_model(const char *dir, const char *full_preset) {
    static const char *const fmts[] = {"f32", "bf16", "int8", "fp8", "nf4"};
    mdl_model ref;
    if (mdl_load(dir, &ref) != MOLT_OK) {
        fprintf(stderr, "molt bench quant-model: %s\n", molt_err_msg());
        return 1;
    }
    int32_t ids[BENCH_T];
    ag_rng rng;
    ag_rng_seed(&rng, 1234);
    for (int t = 0; t < BENCH_T; t++)
        ids[t] = (int32_t)(ag_rng_next(&rng) % (uint64_t)ref.cfg.vocab_size);
    int64_t V = ref.cfg.vocab_size;
    float *lref = bench_logits(&ref, ids, BENCH_T);
    double ppl_ref = lref ? perplexity(lref, ids, BENCH_T, V) : 0;
    mcfg full;
    char path[4096];
    bool have_full = mdl_preset_find(full_preset, path, sizeof path) == MOLT_OK &&
                     mcfg_load(path, &full) == MOLT_OK;
    double fq = 0, fr = 0;
    if (have_full)
        param_split(&full, &fq, &fr);
    printf("model %s: %lld params; seeded sequence of %d tokens; F32 perplexity %.4f\n", dir,
           (long long)mdl_param_count(&ref.cfg), BENCH_T, ppl_ref);
    printf("%-5s %10s %11s %12s %13s %13s %11s %14s\n", "base", "bits/param", "weights MiB",
           "mean|dlogit|", "ppl change %", "quant-load s", "prequant s", "full model GiB");
    char tmp[] = "/tmp/molt-bench-quant-XXXXXX";
    int rc = lref && mkdtemp(tmp) ? 0 : 1;
    for (int f = 0; rc == 0 && f < 5; f++) {
        mdl_qspec spec;
        mdl_model m, pre;
        mdl_qspec_parse(fmts[f], &spec);
        double t0 = now_s();
        if (mdl_load_quant(dir, &spec, &m) != MOLT_OK) {
            rc = 1;
            break;
        }
        double t_q = now_s() - t0;
        double qbits = 0, qn = 0;
        for (int i = 0; i < m.n_qw; i++) {
            qbits += 8.0 * (double)m.qw[i].bytes;
            qn += (double)m.qw[i].numel;
        }
        double bpp = qn > 0 ? qbits / qn : 32;
        float *lq = bench_logits(&m, ids, BENCH_T);
        double err = 0;
        for (int64_t i = 0; lq && i < (int64_t)BENCH_T * V; i++)
            err += fabs((double)lq[i] - lref[i]);
        double ppl = lq ? perplexity(lq, ids, BENCH_T, V) : 0;
        char sub[4200];
        snprintf(sub, sizeof sub, "%s/%s", tmp, fmts[f]);
        double t_pre = -1;
        if (quantize_dir(&m, dir, sub) == MOLT_OK) {
            t0 = now_s();
            if (mdl_load_quant(sub, NULL, &pre) == MOLT_OK)
                t_pre = now_s() - t0;
            mdl_free(&pre);
        }
        // full model: quantized groups at this format, the rest in bf16
        double gib = (fq * bpp + fr * 16) / 8 / (1 << 30);
        printf("%-5s %10.3f %11.2f %12.3e %13.4f %13.3f %11.3f %14.1f\n", fmts[f], bpp,
               (double)mdl_weight_bytes(&m) / (1 << 20), err / ((double)BENCH_T * V),
               100 * (ppl / ppl_ref - 1), t_q, t_pre, have_full ? gib : 0);
        molt_free(lq);
        mdl_free(&m);
    }
    if (have_full)
        printf("full model (%s): %.3g params in quantized groups, %.3g kept bf16 (embeddings, "
               "norms, router, lm_head)\n", full_preset, fq, fr);
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmp);
    molt_free(lref);
    mdl_free(&ref);
    return rc;
}

static const char bench_usage[] =
    "usage: molt bench quant-model (--model DIR | --preset NAME) [--full PRESET]\n"
    "Per base format (f32 bf16 int8 fp8 nf4, router and lm_head f32): bits/param of the\n"
    "quantized matrices, resident weight MiB, mean |logit - F32 logit| and perplexity change\n"
    "on a seeded token sequence, quantize-on-load time, pre-quantized load time, and the\n"
    "projected size of PRESET (default mistral-small-4) with the rest in bf16.\n";

int mdl_cmd_bench_quant_model(int argc, char **argv) {
    const char *model = NULL, *preset = NULL, *full = "mistral-small-4";
    const molt_opt opts[] = {MOLT_OPT("--model", &model),
                             MOLT_OPT("--preset", &preset),
                             MOLT_OPT("--full", &full),
                             MOLT_OPT_END};
    int rc = molt_opts_parse("molt bench quant-model", bench_usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc < 0 ? 0 : rc;
    if (!model == !preset)
        return molt_opt_usage_error("molt bench quant-model", "give --model or --preset");
    if (model)
        return bench_model(model, full);
    char dir[] = "/tmp/molt-bench-model-XXXXXX";
    if (!mkdtemp(dir))
        return 1;
    mdl_init_opts o = {.preset = preset, .out_dir = dir, .seed = 1, .no_tokenizer = true};
    rc = 1;
    if (mdl_init_model(&o) == MOLT_OK)
        rc = bench_model(dir, full);
    else
        fprintf(stderr, "molt bench quant-model: %s\n", molt_err_msg());
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", dir);
    return rc;
}
