// tests/test_model_forward.c: the Mistral 4 forward pass against transformers
// (tests/fixtures/model/reference.safetensors, made by tools/reference/model_parity.py).
// The fixture holds no weights: each variant is written again here by mdl_init_model with
// the fixture's seed, and its SHA-256 must equal the one the reference saw. Then: logits of
// every fixture sequence (packed segments included) within 1e-4 x max|logit| of the
// reference, for F32, BF16 and FP8 files and the grouped-routing / q_proj variant; all
// sequences packed into one batch; 20-token greedy continuations; the same logits from the
// per-expert, Mistral, wrapped-prefix and sharded copies of the F32 model; the fused loss
// against a loss computed from the logits; LoRA on one projection (the mdl_linear hook).
// Loading errors are in test_model_weights.c.
#include "harness/harness.h"
#include "harness/model_env.h"
#include "common/sha256.h"
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TOL 1e-4   // max |got - want| <= TOL * max|logit| of the row (the task's bound)
#define N_SEQ 4
#define N_GREEDY 20

// ---- checksums of the regenerated weights -----------------------------------------------

// Hex SHA-256 of a file (common/sha256.c, checked against the FIPS vectors in
// test_checkpoint.c); fails the test when the file cannot be read.
static void sha_file(const char *path, char out[65]) {
    ck_assert_ok(molt_sha256_file(path, out));
}

// ---- fixture and regenerated models -----------------------------------------------------

typedef struct {
    const char *name, *preset;
    mdl_save_dtype dtype;
    bool greedy, full;
} variant;

static const variant variants[] = {
    {"tiny", "tiny", MDL_SAVE_F32, true, true},
    {"tiny_bf16", "tiny", MDL_SAVE_BF16, false, false},
    {"tiny_fp8", "tiny", MDL_SAVE_FP8, false, false},
    {"tiny_grouped", "tiny-grouped", MDL_SAVE_F32, true, false},
};
#define N_VARIANTS 4

static model_env env; // the reference file; the variants in env.dir/<name>

static void setup_all(void) {
    model_env_model models[N_VARIANTS];
    for (int i = 0; i < N_VARIANTS; i++)
        models[i] = (model_env_model){variants[i].name, variants[i].preset, variants[i].dtype};
    model_env_open(&env, "model", models, N_VARIANTS);
}

static void teardown_all(void) { model_env_close(&env); }

static const st_tensor *fx(const char *fmt, int k) { return model_env_fixture(&env, fmt, k); }

static float fx_f32(const st_tensor *t, int64_t i) {
    float v;
    memcpy(&v, (const uint8_t *)t->data + 4 * i, 4);
    return v;
}

static int32_t fx_i32(const st_tensor *t, int64_t i) {
    int32_t v;
    memcpy(&v, (const uint8_t *)t->data + 4 * i, 4);
    return v;
}

static void load_variant(const variant *v, mdl_model *m) { model_env_load(&env, v->name, m); }

// Batch of fixture sequence k (or all sequences packed, k = -1) in the context's arena.
static mdl_batch fixture_batch(ag_ctx *c, int k) {
    int64_t T = 0;
    for (int j = 0; j < N_SEQ; j++)
        if (k < 0 || j == k)
            T += fx("input.ids.%d", j)->numel;
    mdl_batch b = {.ids = ag_tensor_new1(&c->act, AG_I32, T),
                   .pos = ag_tensor_new1(&c->act, AG_I32, T),
                   .seg = ag_tensor_new1(&c->act, AG_I32, T)};
    int64_t at = 0;
    for (int j = 0; j < N_SEQ; j++) {
        if (k >= 0 && j != k)
            continue;
        const st_tensor *ids = fx("input.ids.%d", j), *pos = fx("input.pos.%d", j);
        const st_tensor *seg = fx("input.seg.%d", j);
        for (int64_t t = 0; t < ids->numel; t++, at++) {
            ((int32_t *)b.ids->data)[at] = fx_i32(ids, t);
            ((int32_t *)b.pos->data)[at] = fx_i32(pos, t);
            ((int32_t *)b.seg->data)[at] = fx_i32(seg, t) + 10 * j; // distinct when packed
        }
    }
    return b;
}

// Worst error / (TOL * absmax) over rows [0, T) of logits (starting at row `row0` of lg)
// against variant v's sequence k; also checks the reference's top-8 and the argmax.
static double compare_seq(const variant *v, int k, const ag_tensor *lg, int64_t row0) {
    const st_tensor *cols = fx("input.cols", 0), *amax, *sub, *tid, *tval;
    char nm[96];
    snprintf(nm, sizeof nm, "%s.absmax.%%d", v->name);
    amax = fx(nm, k);
    snprintf(nm, sizeof nm, "%s.sub.%%d", v->name);
    sub = fx(nm, k);
    snprintf(nm, sizeof nm, "%s.top_ids.%%d", v->name);
    tid = fx(nm, k);
    snprintf(nm, sizeof nm, "%s.top_vals.%%d", v->name);
    tval = fx(nm, k);
    int64_t V = lg->shape[1], NC = cols->numel, T = amax->numel, K = tid->shape[1];
    const float *g = lg->data;
    double worst = 0;
    for (int64_t t = 0; t < T; t++) {
        const float *row = g + (row0 + t) * V;
        double tol = TOL * fx_f32(amax, t);
        for (int64_t j = 0; j < NC; j++)
            worst = fmax(worst, fabs(row[fx_i32(cols, j)] - fx_f32(sub, t * NC + j)) / tol);
        for (int64_t j = 0; j < K; j++)
            worst = fmax(worst, fabs(row[fx_i32(tid, t * K + j)] - fx_f32(tval, t * K + j)) / tol);
        int64_t best = 0;
        for (int64_t j = 1; j < V; j++)
            best = row[j] > row[best] ? j : best;
        bool clear = fx_f32(tval, t * K) - fx_f32(tval, t * K + 1) > 2 * tol;
        ck_assert_msg(!clear || best == fx_i32(tid, t * K),
                      "%s seq %d row %lld: argmax %lld, reference %d", v->name, k, (long long)t,
                      (long long)best, fx_i32(tid, t * K));
    }
    return worst;
}

static ag_tensor *run_logits(ag_ctx *c, const mdl_model *m, int k) {
    mdl_batch b = fixture_batch(c, k);
    ag_tensor *lg;
    ck_assert_ok(mdl_forward(c, m, &b, &lg));
    ck_assert_int_eq(lg->shape[0], b.ids->numel);
    ck_assert_int_eq(lg->shape[1], m->cfg.vocab_size);
    return lg;
}

START_TEST(test_checksums) {
    model_env_require(&env);
    for (int i = 0; i < N_VARIANTS; i++) {
        char path[600], meta[64], hex[65];
        snprintf(path, sizeof path, "%s/model.safetensors", model_env_path(&env, variants[i].name));
        snprintf(meta, sizeof meta, "%s.sha256", variants[i].name);
        const char *want = st_metadata(env.fix, meta);
        ck_assert_msg(want != NULL, "fixture has no %s", meta);
        sha_file(path, hex);
        ck_assert_msg(strcmp(hex, want) == 0,
                      "%s: regenerated weights differ from the reference's (%s vs %s): "
                      "init-model changed; rerun tools/reference/model_parity.py",
                      variants[i].name, hex, want);
    }
}
END_TEST

// Every fixture sequence run on its own (seq 2 is two packed segments).
START_TEST(test_parity) {
    const variant *v = &variants[_i];
    mdl_model m;
    load_variant(v, &m);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    double worst = 0;
    for (int k = 0; k < N_SEQ; k++) {
        ag_ctx_step_reset(&c);
        ag_tensor *lg = run_logits(&c, &m, k);
        worst = fmax(worst, compare_seq(v, k, lg, 0));
        if (v->full && k == 0) { // the whole vocabulary of the last row
            const st_tensor *full = fx("tiny.full", 0), *amax = fx("tiny.absmax.%d", 0);
            int64_t V = m.cfg.vocab_size, T = lg->shape[0];
            double tol = TOL * fx_f32(amax, T - 1);
            for (int64_t j = 0; j < V; j++)
                worst = fmax(worst, fabs(((float *)lg->data)[(T - 1) * V + j] -
                                         fx_f32(full, j)) / tol);
        }
    }
    printf("%s: worst logit error %.3g of the tolerance\n", v->name, worst);
    ck_assert_msg(worst <= 1, "%s: logits off by %.3g x the tolerance", v->name, worst);
    ag_ctx_free(&c);
    mdl_free(&m);
}
END_TEST

// All four sequences in one packed batch give the logits of the separate runs.
START_TEST(test_packed_batch) {
    const variant *v = &variants[0];
    mdl_model m;
    load_variant(v, &m);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_tensor *all = run_logits(&c, &m, -1);
    int64_t row = 0;
    for (int k = 0; k < N_SEQ; k++) {
        double worst = compare_seq(v, k, all, row);
        ck_assert_msg(worst <= 1, "packed seq %d: %.3g x the tolerance", k, worst);
        row += fx("input.ids.%d", k)->numel;
    }
    ck_assert_int_eq(row, all->shape[0]);
    ag_ctx_free(&c);
    mdl_free(&m);
}
END_TEST

START_TEST(test_greedy) {
    const variant *v = &variants[_i == 0 ? 0 : 3];
    mdl_model m;
    load_variant(v, &m);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    for (int j = 0; j < 2; j++) {
        char nm[96];
        snprintf(nm, sizeof nm, "%s.greedy.prompt.%%d", v->name);
        const st_tensor *pr = fx(nm, j);
        snprintf(nm, sizeof nm, "%s.greedy.out.%%d", v->name);
        const st_tensor *want = fx(nm, j);
        snprintf(nm, sizeof nm, "%s.greedy.gap.%%d", v->name);
        const st_tensor *gap = fx(nm, j);
        int32_t prompt[64], out[N_GREEDY];
        for (int64_t t = 0; t < pr->numel; t++)
            prompt[t] = fx_i32(pr, t);
        int n = 0;
        ck_assert_ok(mdl_greedy(&c, &m, prompt, (int)pr->numel, N_GREEDY, false, out, &n));
        ck_assert_int_eq(n, N_GREEDY);
        for (int i = 0; i < N_GREEDY; i++)
            ck_assert_msg(out[i] == fx_i32(want, i),
                          "%s prompt %d step %d: %d, reference %d (reference top-2 gap %g)",
                          v->name, j, i, out[i], fx_i32(want, i), fx_f32(gap, i));
    }
    ag_ctx_free(&c);
    mdl_free(&m);
}
END_TEST

// ---- layouts: the same weights under other names give the same logits -----------------

static void write_copy(const mdl_model *m, const char *name, const mdl_save_opts *o, char *dir,
                       size_t cap) {
    snprintf(dir, cap, "%s/copy-%s", env.dir, name);
    char cmd[2048], path[600];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s' && cp '%s/tiny/config.json' '%s/'", dir, env.dir,
             dir);
    ck_assert_int_eq(system(cmd), 0);
    snprintf(path, sizeof path, "%s/%s", dir,
             o->layout == MDL_LAYOUT_MISTRAL ? "consolidated.safetensors" : "model.safetensors");
    ck_assert_ok(mdl_save(m, path, o));
}

// Splits dir/model.safetensors into two shards and an index (then removes the single file).
static void shard_copy(const char *dir) {
    char path[700], s1[700], s2[700];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    st_reader *r;
    ck_assert_ok(st_open(path, &r));
    int n = st_count(r), half = n / 2;
    st_tensor *ts = malloc((size_t)n * sizeof *ts);
    for (int i = 0; i < n; i++)
        ts[i] = *st_at(r, i);
    snprintf(s1, sizeof s1, "%s/model-00001-of-00002.safetensors", dir);
    snprintf(s2, sizeof s2, "%s/model-00002-of-00002.safetensors", dir);
    ck_assert_ok(st_write(s1, ts, half, NULL, 0));
    ck_assert_ok(st_write(s2, ts + half, n - half, NULL, 0));
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {");
    for (int i = 0; i < n; i++)
        fprintf(f, "%s\"%s\": \"model-0000%d-of-00002.safetensors\"", i ? ", " : "", ts[i].name,
                i < half ? 1 : 2);
    fprintf(f, "}}\n");
    fclose(f);
    free(ts);
    st_close(r);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    ck_assert_int_eq(unlink(path), 0);
}

START_TEST(test_layouts) {
    mdl_model base;
    load_variant(&variants[0], &base);
    ck_assert_int_eq(base.layout, MDL_LAYOUT_HF);
    ck_assert(!base.wrapped);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_tensor *want = run_logits(&c, &base, 1);
    static const struct {
        const char *name;
        mdl_save_opts o;
        bool shard;
    } copies[] = {
        {"per-expert", {MDL_LAYOUT_HF_PER_EXPERT, MDL_SAVE_F32, false}, false},
        {"mistral", {MDL_LAYOUT_MISTRAL, MDL_SAVE_F32, false}, false},
        {"wrapped", {MDL_LAYOUT_HF, MDL_SAVE_F32, true}, false},
        {"sharded", {MDL_LAYOUT_HF, MDL_SAVE_F32, false}, true},
    };
    for (size_t i = 0; i < sizeof copies / sizeof *copies; i++) {
        char dir[512];
        write_copy(&base, copies[i].name, &copies[i].o, dir, sizeof dir);
        if (copies[i].shard)
            shard_copy(dir);
        mdl_model m;
        ck_assert_ok(mdl_load(dir, &m));
        ck_assert_int_eq(m.layout, copies[i].o.layout);
        ck_assert_int_eq(m.wrapped, copies[i].o.wrapped);
        ag_tensor *got = run_logits(&c, &m, 1);
        ck_assert_msg(memcmp(got->data, want->data, (size_t)want->numel * sizeof(float)) == 0,
                      "%s copy: logits differ from the fused F32 model", copies[i].name);
        mdl_free(&m);
    }
    ag_ctx_free(&c);
    mdl_free(&base);
}
END_TEST

// The FP8 file: lm_head, embeddings, norms and router BF16; projections and experts E4M3
// with an F32 scale that multiplies; decoded weights within E4M3 rounding of the F32 ones.
START_TEST(test_fp8_file) {
    model_env_require(&env);
    char path[600];
    snprintf(path, sizeof path, "%s/tiny_fp8/model.safetensors", env.dir);
    st_reader *r;
    ck_assert_ok(st_open(path, &r));
    static const struct {
        const char *name;
        st_dtype dt;
    } want[] = {
        {"lm_head.weight", ST_BF16},
        {"model.embed_tokens.weight", ST_BF16},
        {"model.norm.weight", ST_BF16},
        {"model.layers.1.mlp.gate.weight", ST_BF16},
        {"model.layers.0.self_attn.q_a_layernorm.weight", ST_BF16},
        {"model.layers.0.self_attn.q_b_proj.weight", ST_F8_E4M3},
        {"model.layers.0.self_attn.q_b_proj.weight_scale_inv", ST_F32},
        {"model.layers.0.mlp.down_proj.weight", ST_F8_E4M3},
        {"model.layers.2.mlp.experts.gate_up_proj", ST_F8_E4M3},
        {"model.layers.2.mlp.experts.gate_up_proj_scale_inv", ST_F32},
        {"model.layers.2.mlp.shared_experts.up_proj.weight", ST_F8_E4M3},
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        const st_tensor *t = st_find(r, want[i].name);
        ck_assert_msg(t != NULL, "%s missing", want[i].name);
        ck_assert_msg(t->dtype == want[i].dt, "%s is %s", want[i].name, st_dtype_name(t->dtype));
    }
    ck_assert_int_eq(st_find(r, "model.layers.2.mlp.experts.gate_up_proj_scale_inv")->numel, 8);
    st_close(r);
    mdl_model a, b;
    load_variant(&variants[0], &a);
    load_variant(&variants[2], &b);
    // |fp8 - f32| <= 2^-4 |w| (3 mantissa bits, round to nearest) + half the subnormal step
    const ag_tensor *wa = a.layers[0].q_b.w, *wb = b.layers[0].q_b.w;
    double amax = 0;
    for (int64_t i = 0; i < wa->numel; i++)
        amax = fmax(amax, fabs(((float *)wa->data)[i]));
    double step = amax / 448 * ldexp(1, -9);
    for (int64_t i = 0; i < wa->numel; i++) {
        double x = ((float *)wa->data)[i], y = ((float *)wb->data)[i];
        // (1 + 1e-6): the final rounding of code * scale to f32
        ck_assert_msg(fabs(x - y) <= (ldexp(fabs(x), -4) + step * 0.5) * (1 + 1e-6),
                      "element %lld: %g vs %g", (long long)i, x, y);
    }
    mdl_free(&a);
    mdl_free(&b);
}
END_TEST

// ---- loss, LoRA -------------------------------------------------------------------------

// The fused loss equals the masked mean of logsumexp - logit[target] from the logits.
START_TEST(test_loss) {
    mdl_model m;
    load_variant(&variants[0], &m);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    mdl_batch b = fixture_batch(&c, 2);
    int64_t T = b.ids->numel, V = m.cfg.vocab_size;
    ag_tensor *lg;
    ck_assert_ok(mdl_forward(&c, &m, &b, &lg));
    b.targets = ag_tensor_new1(&c.act, AG_I32, T);
    b.mask = ag_tensor_new1(&c.act, AG_F32, T);
    double num = 0, den = 0;
    for (int64_t t = 0; t < T; t++) {
        int32_t tg = (int32_t)((t * 7919 + 13) % V);
        float w = t % 4 == 0 ? 0.0f : (t % 3 == 0 ? 2.0f : 1.0f);
        ((int32_t *)b.targets->data)[t] = tg;
        ((float *)b.mask->data)[t] = w;
        const float *row = (const float *)lg->data + t * V;
        double mx = -INFINITY, s = 0;
        for (int64_t j = 0; j < V; j++)
            mx = fmax(mx, row[j]);
        for (int64_t j = 0; j < V; j++)
            s += exp(row[j] - mx);
        num += w * (mx + log(s) - row[tg]);
        den += w;
    }
    ag_tensor *loss;
    ck_assert_ok(mdl_forward(&c, &m, &b, &loss));
    ck_assert_int_eq(loss->numel, 1);
    double got = ((float *)loss->data)[0], want = num / den;
    ck_assert_msg(fabs(got - want) <= 1e-5 * fabs(want), "loss %.9g, expected %.9g", got, want);
    ag_ctx_free(&c);
    mdl_free(&m);
}
END_TEST

// A LoRA on kv_b_proj of layer 1: forward equals the base with W + s B A, and backward
// reaches A and B while no base weight gets a gradient.
START_TEST(test_lora_hook) {
    mdl_model m;
    load_variant(&variants[0], &m);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_arena pa;
    ag_arena_init(&pa, "lora", 0);
    ag_rng r;
    ag_rng_seed(&r, 99);
    mdl_lin *kvb = &m.layers[1].kv_b;
    int64_t out = kvb->w->shape[0], in = kvb->w->shape[1], rank = 3;
    ag_tensor *a = ag_tensor_new2(&pa, AG_F32, rank, in), *bm = ag_tensor_new2(&pa, AG_F32, out, rank);
    ag_fill_normal(a, &r, 0, 0.3);
    ag_fill_normal(bm, &r, 0, 0.3);
    a->requires_grad = bm->requires_grad = true;
    // reference: the same model with the merged weight W + s B A
    double s = 0.5;
    ag_tensor *w0 = kvb->w, *merged = ag_tensor_new2(&pa, AG_F32, out, in);
    for (int64_t o = 0; o < out; o++)
        for (int64_t i = 0; i < in; i++) {
            double d = 0;
            for (int64_t k = 0; k < rank; k++)
                d += ag_get(bm, o * rank + k) * ag_get(a, k * in + i);
            ag_set(merged, o * in + i, ag_get(w0, o * in + i) + s * d);
        }
    ag_ctx_set_grad(&c, false);
    kvb->w = merged;
    ag_tensor *want = run_logits(&c, &m, 0);
    kvb->w = w0;
    kvb->lora_a = a;
    kvb->lora_b = bm;
    kvb->lora_scale = s;
    ag_tensor *got = run_logits(&c, &m, 0);
    double rel = gc_max_rel_diff(got, want);
    ck_assert_msg(rel < 1e-5, "LoRA forward vs merged weight: %g", rel);
    ag_ctx_set_grad(&c, true);
    mdl_batch b = fixture_batch(&c, 0);
    b.targets = b.ids; // any targets
    ag_tensor *loss;
    ck_assert_ok(mdl_forward(&c, &m, &b, &loss));
    ck_assert_ok(ag_backward(&c, loss));
    ck_assert_ptr_nonnull(a->grad);
    ck_assert_ptr_nonnull(bm->grad);
    double ga = 0;
    for (int64_t i = 0; i < a->numel; i++)
        ga += fabs(ag_get(a->grad, i));
    ck_assert(ga > 0);
    ck_assert_ptr_null(w0->grad);
    ck_assert_ptr_null(m.embed->grad);
    ck_assert_ptr_null(m.layers[2].gate_up->grad);
    ag_ctx_free(&c);
    ag_arena_free(&pa);
    mdl_free(&m);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("model_forward");
    TCase *tc = tcase_create("forward");
    tcase_add_unchecked_fixture(tc, setup_all, teardown_all);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_checksums);
    tcase_add_loop_test(tc, test_parity, 0, N_VARIANTS);
    tcase_add_test(tc, test_packed_batch);
    tcase_add_loop_test(tc, test_greedy, 0, 2);
    tcase_add_test(tc, test_layouts);
    tcase_add_test(tc, test_fp8_file);
    tcase_add_test(tc, test_loss);
    tcase_add_test(tc, test_lora_hook);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return harness_run(suite());
}
