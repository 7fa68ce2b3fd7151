// tests/test_kvcache.c: the paged MLA latent cache and cached decoding. Paging: rows of
// several sequences written across block boundaries read back intact, blocks are reused
// after a reset, the pool limit is enforced without side effects, bad rows and commits are
// refused. Cached forward: prefill of P tokens then one-token decode steps give the logits
// of the full-sequence forward (mdl_forward) within 1e-5 relative (max |diff| / max |logit|
// per row) for the tiny and tiny-grouped presets, several P (one token, inside a block,
// exactly a block, crossing blocks), blocks of 16 and 5 tokens, both attention forms;
// absorbed and expanded agree, also with a LoRA on kv_b_proj; positions continue from the
// cache length; a failed call leaves the sequence intact; two interleaved sequences do not
// disturb each other; greedy decoding through the cache (and inf_generate) reproduces the
// 20-token continuations of tests/fixtures/model/reference.safetensors.
#include "harness/harness.h"
#include "harness/model_env.h"
#include "infer/infer.h"
#include "model/model.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOL 1e-5
#define N_GREEDY 20
#define T_FULL 24

// The two presets in F32, each named as the fixture names its tensors.
static const model_env_model models[2] = {{"tiny", "tiny", MDL_SAVE_F32},
                                          {"tiny_grouped", "tiny-grouped", MDL_SAVE_F32}};
static model_env env;

static void setup_all(void) { model_env_open(&env, "kvcache", models, 2); }

static void teardown_all(void) { model_env_close(&env); }

static void load_preset(int k, mdl_model *m) { model_env_load(&env, models[k].name, m); }

// Deterministic token ids in [1000, V).
static void some_ids(int32_t *ids, int n, uint64_t seed, int V) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    for (int i = 0; i < n; i++)
        ids[i] = 1000 + (int32_t)(ag_rng_next(&r) % (uint64_t)(V - 1000));
}

// Logits [T, V] of the full forward (positions 0..T-1, one segment), copied to the heap.
static float *full_logits(const mdl_model *m, const int32_t *ids, int T) {
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    mdl_batch b = {.ids = ag_tensor_new1(&c.act, AG_I32, T),
                   .pos = ag_tensor_new1(&c.act, AG_I32, T),
                   .seg = ag_tensor_new1(&c.act, AG_I32, T)};
    for (int t = 0; t < T; t++) {
        ((int32_t *)b.ids->data)[t] = ids[t];
        ((int32_t *)b.pos->data)[t] = t;
    }
    ag_tensor *lg;
    ck_assert_ok(mdl_forward(&c, m, &b, &lg));
    size_t bytes = (size_t)lg->numel * sizeof(float);
    float *out = malloc(bytes);
    memcpy(out, lg->data, bytes);
    ag_ctx_free(&c);
    return out;
}

// max |got - want| / max |want| of one row of V logits.
static double row_rel(const float *got, const float *want, int64_t V) {
    double d = 0, w = 0;
    for (int64_t j = 0; j < V; j++) {
        d = fmax(d, fabs((double)got[j] - want[j]));
        w = fmax(w, fabs((double)want[j]));
    }
    return d / fmax(w, 1e-30);
}

// ---- paging -----------------------------------------------------------------------------

// A value that names its place (sequence, layer, token, column), exact in float.
static float cell(int seq, int l, int t, int j) {
    return (float)(seq * 100000 + l * 10000 + t * 10 + j % 10) + 0.25f * (float)(j / 10);
}

static void write_tokens(mdl_kvcache *kv, int seq, int n) {
    int len = mdl_kv_len(kv, seq);
    ck_assert_ok(mdl_kv_reserve(kv, seq, n));
    for (int l = 0; l < kv->n_layers; l++)
        for (int t = len; t < len + n; t++) {
            float *row = mdl_kv_row(kv, seq, l, t);
            ck_assert_tensor(row);
            for (int j = 0; j < kv->width; j++)
                row[j] = cell(seq, l, t, j);
        }
    ck_assert_ok(mdl_kv_commit(kv, seq, n));
}

static void check_tokens(const mdl_kvcache *kv, int seq) {
    for (int l = 0; l < kv->n_layers; l++)
        for (int t = 0; t < mdl_kv_len(kv, seq); t++) {
            const float *row = mdl_kv_row(kv, seq, l, t);
            for (int j = 0; j < kv->width; j++)
                ck_assert_msg(row[j] == cell(seq, l, t, j), "seq %d layer %d token %d col %d", seq,
                              l, t, j);
        }
}

START_TEST(test_paging) {
    char path[4096];
    mcfg cfg;
    ck_assert_ok(mdl_preset_find("tiny", path, sizeof path));
    ck_assert_ok(mcfg_load(path, &cfg));
    mdl_kvcache kv;
    ck_assert_ok(mdl_kv_init(&kv, &cfg, 4, 0));
    ck_assert_int_eq(kv.width, cfg.kv_lora_rank + cfg.qk_rope_head_dim);
    int s[3];
    for (int i = 0; i < 3; i++)
        ck_assert_ok(mdl_kv_seq_open(&kv, &s[i]));
    ck_assert(s[0] != s[1] && s[1] != s[2]);
    // interleaved appends of odd sizes: every sequence crosses several block boundaries
    static const int steps[] = {1, 3, 5, 1, 1, 2, 9, 4};
    for (size_t k = 0; k < sizeof steps / sizeof *steps; k++)
        for (int i = 0; i < 3; i++)
            write_tokens(&kv, s[i], steps[k] + i);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(mdl_kv_len(&kv, s[i]), 26 + 8 * i);
        check_tokens(&kv, s[i]);
    }
    int used = mdl_kv_blocks_used(&kv), pool = kv.n_pool;
    ck_assert_int_eq(used, 7 + 9 + 11); // ceil(26/4), ceil(34/4), ceil(42/4)
    // a reset hands the blocks back; new tokens reuse them without growing the pool
    mdl_kv_seq_reset(&kv, s[1]);
    ck_assert_int_eq(mdl_kv_len(&kv, s[1]), 0);
    ck_assert_int_eq(mdl_kv_blocks_used(&kv), used - 9);
    write_tokens(&kv, s[1], 30);
    ck_assert_int_eq(kv.n_pool, pool);
    for (int i = 0; i < 3; i++)
        check_tokens(&kv, s[i]);
    // closed ids are refused, then handed out again
    mdl_kv_seq_close(&kv, s[2]);
    ck_assert_int_eq(mdl_kv_len(&kv, s[2]), -1);
    ck_assert_str_eq(molt_err_msg(), "kv cache: no open sequence 2");
    int again;
    ck_assert_ok(mdl_kv_seq_open(&kv, &again));
    ck_assert_int_eq(again, s[2]);
    ck_assert_int_eq(mdl_kv_len(&kv, again), 0);
    // rows outside the reserved room and commits past it are refused
    ck_assert_ptr_null(mdl_kv_row(&kv, s[0], 0, 28));
    ck_assert_str_eq(molt_err_msg(), "kv cache: row (layer 0, token 28) outside the 3 layers "
                     "and 28 reserved tokens of sequence 0");
    ck_assert_ptr_null(mdl_kv_row(&kv, s[0], 3, 0));
    ck_assert_int_eq(mdl_kv_commit(&kv, s[0], 3), MOLT_EARG);
    ck_assert_int_eq(mdl_kv_len(&kv, s[0]), 26);
    mdl_kv_free(&kv);

    // pool limit: 10 tokens = 3 blocks of 4; a failing reserve takes nothing
    ck_assert_ok(mdl_kv_init(&kv, &cfg, 4, 10));
    ck_assert_ok(mdl_kv_seq_open(&kv, &s[0]));
    ck_assert_ok(mdl_kv_seq_open(&kv, &s[1]));
    write_tokens(&kv, s[0], 5);
    ck_assert_int_eq(mdl_kv_reserve(&kv, s[1], 5), MOLT_ENOMEM);
    ck_assert_str_eq(molt_err_msg(), "kv cache: all 3 blocks (12 tokens) are in use");
    ck_assert_int_eq(mdl_kv_blocks_used(&kv), 2);
    write_tokens(&kv, s[1], 4);
    check_tokens(&kv, s[0]);
    check_tokens(&kv, s[1]);
    mdl_kv_free(&kv);
    ck_assert_int_eq(mdl_kv_init(&kv, &cfg, -1, 0), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "kv cache: block of -1 tokens, limit 0 tokens");
    mdl_kv_free(&kv);
}
END_TEST

// Prefix caching: shared blocks are counted once and read the same rows; published blocks
// outlive their sequence and are matched by tag and content (whole blocks only, never past
// n); the least recently used cached block is given up when the pool is full, and a block
// reused for other content no longer continues the chains it ended.
START_TEST(test_prefix_blocks) {
    char path[4096];
    mcfg cfg;
    ck_assert_ok(mdl_preset_find("tiny", path, sizeof path));
    ck_assert_ok(mcfg_load(path, &cfg));
    mdl_kvcache kv;
    ck_assert_ok(mdl_kv_init(&kv, &cfg, 4, 6 * 4));
    int32_t p[10] = {10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
    int a, b, c, d;
    ck_assert_ok(mdl_kv_seq_open(&kv, &a));
    write_tokens(&kv, a, 10);
    ck_assert_ok(mdl_kv_prefix_publish(&kv, a, 7, p, 10));
    ck_assert_int_eq(mdl_kv_blocks_used(&kv), 3);
    ck_assert_ok(mdl_kv_seq_open(&kv, &b));
    ck_assert_int_eq(mdl_kv_prefix_match(&kv, b, 7, p, 9), 8); // two whole blocks of 9
    ck_assert_int_eq(mdl_kv_len(&kv, b), 8);
    ck_assert_int_eq(mdl_kv_blocks_used(&kv), 3);            // shared, counted once
    for (int l = 0; l < kv.n_layers; l++)
        for (int t = 0; t < 8; t++)
            ck_assert_ptr_eq(mdl_kv_row(&kv, b, l, t), mdl_kv_row(&kv, a, l, t));
    ck_assert_ok(mdl_kv_reserve(&kv, b, 1));                  // b writes past them: its own
    ck_assert_ptr_ne(mdl_kv_row(&kv, b, 0, 8), mdl_kv_row(&kv, a, 0, 8));
    ck_assert_int_eq(mdl_kv_prefix_match(&kv, b, 7, p, 9), 0); // b is not empty any more
    mdl_kv_seq_close(&kv, a);
    ck_assert_int_eq(mdl_kv_blocks_used(&kv), 3);             // b holds two, plus its own
    mdl_kv_seq_close(&kv, b);
    ck_assert_int_eq(mdl_kv_blocks_used(&kv), 0);
    ck_assert_int_eq(mdl_kv_blocks_cached(&kv), 2);
    ck_assert_ok(mdl_kv_seq_open(&kv, &c));
    ck_assert_int_eq(mdl_kv_prefix_match(&kv, c, 8, p, 10), 0); // another tag
    ck_assert_int_eq(mdl_kv_prefix_match(&kv, c, 7, p, 7), 4);  // n caps it at one block
    ck_assert_int_eq(mdl_kv_blocks_cached(&kv), 1);
    mdl_kv_seq_close(&kv, c);
    int32_t q[10] = {10, 11, 12, 13, 99, 15, 16, 17, 18, 19}; // same first block only
    ck_assert_ok(mdl_kv_seq_open(&kv, &d));
    ck_assert_int_eq(mdl_kv_prefix_match(&kv, d, 7, q, 10), 4);
    mdl_kv_seq_close(&kv, d);
    // a full pool gives up cached blocks, least recently used first: the second block of p
    // (used before the first one was matched again) goes first
    ck_assert_ok(mdl_kv_seq_open(&kv, &a));
    write_tokens(&kv, a, 4 * 5);
    ck_assert_int_eq(mdl_kv_blocks_cached(&kv), 1);
    ck_assert_int_eq(mdl_kv_blocks_used(&kv), 5);
    ck_assert_ok(mdl_kv_seq_open(&kv, &b));
    ck_assert_int_eq(mdl_kv_prefix_match(&kv, b, 7, p, 10), 4);
    mdl_kv_seq_close(&kv, b);
    write_tokens(&kv, a, 4);
    ck_assert_int_eq(mdl_kv_blocks_cached(&kv), 0);
    ck_assert_int_eq(mdl_kv_reserve(&kv, a, 1), MOLT_ENOMEM);
    ck_assert_ok(mdl_kv_seq_open(&kv, &b));
    ck_assert_int_eq(mdl_kv_prefix_match(&kv, b, 7, p, 10), 0);
    mdl_kv_seq_close(&kv, b);
    mdl_kv_seq_close(&kv, a);
    ck_assert_int_eq(mdl_kv_blocks_used(&kv), 0);
    ck_assert_int_eq(mdl_kv_blocks_cached(&kv), 0);
    mdl_kv_free(&kv);
}
END_TEST

// ---- cached forward against the full forward ----------------------------------------------

// Prefill P tokens (all logits), then decode the rest one by one; worst row error.
static double prefill_decode(const mdl_model *m, const int32_t *ids, int T, const float *want,
                             int P, int block, mdl_attn_mode mode) {
    int64_t V = m->cfg.vocab_size;
    ag_ctx c;
    mdl_kvcache kv;
    int seq;
    ck_assert_ok(ag_ctx_init(&c));
    ck_assert_ok(mdl_kv_init(&kv, &m->cfg, block, 0));
    ck_assert_ok(mdl_kv_seq_open(&kv, &seq));
    ag_tensor *lg;
    ck_assert_ok(mdl_forward_cached(&c, m, &kv, seq, ids, P, mode, true, &lg));
    ck_assert_int_eq(lg->shape[0], P);
    ck_assert_int_eq(lg->shape[1], V);
    ck_assert_int_eq(mdl_kv_len(&kv, seq), P);
    double worst = 0;
    for (int t = 0; t < P; t++)
        worst = fmax(worst, row_rel((float *)lg->data + t * V, want + t * V, V));
    for (int t = P; t < T; t++) {
        ag_ctx_step_reset(&c);
        ck_assert_ok(mdl_forward_cached(&c, m, &kv, seq, &ids[t], 1, mode, false, &lg));
        ck_assert_int_eq(mdl_kv_len(&kv, seq), t + 1);
        worst = fmax(worst, row_rel(lg->data, want + t * V, V));
    }
    ck_assert_int_eq(c.n_tape, 0); // nothing recorded for backward
    mdl_kv_free(&kv);
    ag_ctx_free(&c);
    return worst;
}

START_TEST(test_cached_vs_full) {
    int preset = _i / 2;
    mdl_attn_mode mode = _i % 2 ? MDL_ATTN_EXPANDED : MDL_ATTN_ABSORBED;
    mdl_model m;
    load_preset(preset, &m);
    int32_t ids[T_FULL];
    some_ids(ids, T_FULL, 7, m.cfg.vocab_size);
    float *want = full_logits(&m, ids, T_FULL);
    // {prompt tokens, block size}: one token, a whole block, one past a block, and small
    // blocks crossed by both the prompt and the decode steps
    static const int cases[][2] = {{1, 16}, {16, 16}, {17, 16}, {7, 5}};
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        double worst = prefill_decode(&m, ids, T_FULL, want, cases[k][0], cases[k][1], mode);
        ck_assert_msg(worst <= TOL, "%s %s prompt %d block %d: relative error %.3g",
                      models[preset].preset, mode == MDL_ATTN_ABSORBED ? "absorbed" : "expanded",
                      cases[k][0], cases[k][1], worst);
    }
    free(want);
    mdl_free(&m);
}
END_TEST

// A random rank-`rank` LoRA (scale 0.7) on kv_b_proj, its matrices in pa.
static void add_kvb_lora(mdl_lin *kvb, ag_arena *pa, ag_rng *r, int64_t rank) {
    kvb->lora_a = ag_tensor_new2(pa, AG_F32, rank, kvb->w->shape[1]);
    kvb->lora_b = ag_tensor_new2(pa, AG_F32, kvb->w->shape[0], rank);
    ag_fill_normal(kvb->lora_a, r, 0, 0.3);
    ag_fill_normal(kvb->lora_b, r, 0, 0.3);
    kvb->lora_scale = 0.7;
}

// n random hidden rows at positions p0 .. p0+n-1 of layer l: their latents written into the
// cache rows there (reserved), their queries returned.
static ag_tensor *new_queries(ag_ctx *c, const mdl_model *m, int l, mdl_kvcache *kv, int seq,
                              int p0, int n, ag_rng *r) {
    ag_tensor *x = ag_tensor_new2(&c->act, AG_F32, n, m->cfg.hidden_size);
    ag_fill_normal(x, r, 0, 1);
    ag_tensor *pos = ag_tensor_new1(&c->act, AG_I32, n), *lat, *kr;
    for (int i = 0; i < n; i++)
        ((int32_t *)pos->data)[i] = p0 + i;
    ag_tensor *q = mdl_attn_query(c, m, l, x, pos);
    ck_assert_ok(mdl_attn_latent(c, m, l, x, pos, &lat, &kr));
    for (int i = 0; i < n; i++) {
        float *row = mdl_kv_row(kv, seq, l, p0 + i);
        memcpy(row, (float *)lat->data + i * kv->rkv, (size_t)kv->rkv * sizeof(float));
        memcpy(row + kv->rkv, (float *)kr->data + i * kv->dr, (size_t)kv->dr * sizeof(float));
    }
    return q;
}

// Absorbed against expanded attention on the same cache, layer by layer, with and
// without a LoRA on kv_b_proj (the absorbed form must see the merged weight); and the
// LoRA model's cached logits against its full forward.
START_TEST(test_absorbed_vs_expanded) {
    mdl_model m;
    load_preset(0, &m);
    ag_arena pa;
    ag_arena_init(&pa, "lora", 0);
    ag_rng r;
    ag_rng_seed(&r, 5);
    for (int with_lora = 0; with_lora < 2; with_lora++) {
        if (with_lora)
            add_kvb_lora(&m.layers[1].kv_b, &pa, &r, 3);
        int32_t ids[21];
        some_ids(ids, 21, 11, m.cfg.vocab_size);
        ag_ctx c;
        mdl_kvcache kv;
        int seq;
        ck_assert_ok(ag_ctx_init(&c));
        ck_assert_ok(mdl_kv_init(&kv, &m.cfg, 8, 0));
        ck_assert_ok(mdl_kv_seq_open(&kv, &seq));
        ag_tensor *lg;
        ck_assert_ok(mdl_forward_cached(&c, &m, &kv, seq, ids, 20, MDL_ATTN_EXPANDED, false, &lg));
        // the attention of one more token (queries at position 20) both ways, per layer
        ck_assert_ok(mdl_kv_reserve(&kv, seq, 1));
        for (int l = 0; l < m.cfg.num_hidden_layers; l++) {
            ag_tensor *q = new_queries(&c, &m, l, &kv, seq, 20, 1, &r);
            ag_tensor *a = mdl_attn_cached(&c, &m, l, &kv, seq, q, NULL, MDL_ATTN_ABSORBED);
            ag_tensor *e = mdl_attn_cached(&c, &m, l, &kv, seq, q, NULL, MDL_ATTN_EXPANDED);
            ck_assert_tensor(a);
            ck_assert_tensor(e);
            double rel = gc_max_rel_diff(a, e);
            ck_assert_msg(rel <= 1e-6, "layer %d lora %d: absorbed vs expanded %.3g", l,
                          with_lora, rel);
        }
        mdl_kv_free(&kv);
        // whole model with the LoRA: cached (both forms) against the full forward
        float *want = full_logits(&m, ids, 21);
        for (int mode = 0; mode < 2; mode++) {
            double worst = prefill_decode(&m, ids, 21, want, 9, 4, (mdl_attn_mode)mode);
            ck_assert_msg(worst <= TOL, "lora %d mode %d: %.3g", with_lora, mode, worst);
        }
        free(want);
        ag_ctx_free(&c);
    }
    m.layers[1].kv_b.lora_a = m.layers[1].kv_b.lora_b = NULL;
    ag_arena_free(&pa);
    mdl_free(&m);
}
END_TEST

// Absorbed against expanded with a kv_b LoRA for 24 queries at once on 2 threads: enough
// (query, head) pairs that the absorbed form shares them out, each thread in its own
// scratch (the tiny preset has DV < 2 DN, where the LoRA's row pointers once ran past a
// thread's share).
START_TEST(test_absorbed_many_queries_lora) {
    mdl_model m;
    load_preset(0, &m);
    ag_arena pa;
    ag_arena_init(&pa, "lora", 0);
    ag_rng r;
    ag_rng_seed(&r, 9);
    mdl_lin *kvb = &m.layers[0].kv_b;
    add_kvb_lora(kvb, &pa, &r, 4);
    int32_t ids[20];
    some_ids(ids, 20, 3, m.cfg.vocab_size);
    ag_ctx c;
    mdl_kvcache kv;
    int seq, n = 24;
    ck_assert_ok(ag_ctx_init(&c));
    ck_assert_ok(mdl_kv_init(&kv, &m.cfg, 8, 0));
    ck_assert_ok(mdl_kv_seq_open(&kv, &seq));
    ag_tensor *lg;
    ck_assert_ok(mdl_forward_cached(&c, &m, &kv, seq, ids, 20, MDL_ATTN_EXPANDED, false, &lg));
    ck_assert_ok(mdl_kv_reserve(&kv, seq, n));
    ag_tensor *q = new_queries(&c, &m, 0, &kv, seq, 20, n, &r);
    omp_set_num_threads(2);
    for (int rep = 0; rep < 200; rep++) {
        ag_tensor *a = mdl_attn_cached(&c, &m, 0, &kv, seq, q, NULL, MDL_ATTN_ABSORBED);
        ag_tensor *e = mdl_attn_cached(&c, &m, 0, &kv, seq, q, NULL, MDL_ATTN_EXPANDED);
        ck_assert_tensor(a);
        ck_assert_tensor(e);
        double rel = gc_max_rel_diff(a, e);
        ck_assert_msg(rel <= 1e-6, "pass %d: absorbed vs expanded %.3g", rep, rel);
    }
    mdl_kv_free(&kv);
    ag_ctx_free(&c);
    kvb->lora_a = kvb->lora_b = NULL;
    ag_arena_free(&pa);
    mdl_free(&m);
}
END_TEST

// Positions continue from the cache length; a failed step changes nothing; sequences
// decoded in turn in one cache match their own full forwards.
START_TEST(test_positions_and_sequences) {
    mdl_model m;
    load_preset(0, &m);
    int64_t V = m.cfg.vocab_size;
    int32_t ids[2][12];
    some_ids(ids[0], 12, 21, (int)V);
    some_ids(ids[1], 12, 22, (int)V);
    float *want[2] = {full_logits(&m, ids[0], 12), full_logits(&m, ids[1], 12)};
    ag_ctx c;
    mdl_kvcache kv;
    int seq[2];
    ck_assert_ok(ag_ctx_init(&c));
    ck_assert_ok(mdl_kv_init(&kv, &m.cfg, 4, 0));
    ck_assert_ok(mdl_kv_seq_open(&kv, &seq[0]));
    ck_assert_ok(mdl_kv_seq_open(&kv, &seq[1]));
    ag_tensor *lg;
    ck_assert_ok(mdl_forward_cached(&c, &m, &kv, seq[0], ids[0], 5, MDL_ATTN_ABSORBED, false, &lg));
    ck_assert_int_eq(lg->shape[0], 1);
    ck_assert(row_rel(lg->data, want[0] + 4 * V, V) <= TOL);
    ck_assert_ok(mdl_forward_cached(&c, &m, &kv, seq[1], ids[1], 3, MDL_ATTN_EXPANDED, false, &lg));
    // a bad id fails and leaves the length; the next step still sits at position 5
    int32_t bad = (int32_t)V;
    ck_assert_int_eq(mdl_forward_cached(&c, &m, &kv, seq[0], &bad, 1, MDL_ATTN_ABSORBED, false,
                                        &lg), MOLT_EARG);
    ck_assert_ptr_null(lg);
    ck_assert_int_eq(mdl_kv_len(&kv, seq[0]), 5);
    ck_assert_int_eq(mdl_forward_cached(&c, &m, &kv, seq[0], ids[0], 0, MDL_ATTN_ABSORBED, false,
                                        &lg), MOLT_EARG);
    int next[2] = {5, 3};
    for (int step = 0; step < 14; step++) {
        int k = step % 2;
        if (next[k] >= 12)
            continue;
        ag_ctx_step_reset(&c);
        ck_assert_ok(mdl_forward_cached(&c, &m, &kv, seq[k], &ids[k][next[k]], 1,
                                        step % 3 ? MDL_ATTN_ABSORBED : MDL_ATTN_EXPANDED, false,
                                        &lg));
        double rel = row_rel(lg->data, want[k] + next[k] * V, V);
        ck_assert_msg(rel <= TOL, "seq %d position %d: %.3g", k, next[k], rel);
        ck_assert_int_eq(mdl_kv_len(&kv, seq[k]), ++next[k]);
    }
    // a cache made for another shape is refused
    mcfg other = m.cfg;
    other.kv_lora_rank += 1;
    mdl_kvcache kv2;
    int s2;
    ck_assert_ok(mdl_kv_init(&kv2, &other, 4, 0));
    ck_assert_ok(mdl_kv_seq_open(&kv2, &s2));
    ck_assert_int_eq(mdl_forward_cached(&c, &m, &kv2, s2, ids[0], 2, MDL_ATTN_ABSORBED, false, &lg),
                     MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "batched forward: cache of 3 layers x (17 + 8) for a model of "
                     "3 layers x (16 + 8)");
    mdl_kv_free(&kv2);
    mdl_kv_free(&kv);
    ag_ctx_free(&c);
    free(want[0]);
    free(want[1]);
    mdl_free(&m);
}
END_TEST

// ---- greedy continuations of the fixture --------------------------------------------------

static int32_t fx_i32(const st_tensor *t, int64_t i) {
    int32_t v;
    memcpy(&v, (const uint8_t *)t->data + 4 * i, 4);
    return v;
}

static const st_tensor *fx(const char *variant, const char *what, int j) {
    return model_env_fixture(&env, "%s.greedy.%s.%d", variant, what, j);
}

START_TEST(test_greedy_fixture) {
    int k = _i;
    mdl_model m;
    load_preset(k, &m);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    for (int j = 0; j < 2; j++) {
        const st_tensor *pr = fx(models[k].name, "prompt", j), *want = fx(models[k].name, "out", j);
        int32_t prompt[64], out[N_GREEDY];
        int np = (int)pr->numel;
        ck_assert_int_le(np, 64);
        for (int t = 0; t < np; t++)
            prompt[t] = fx_i32(pr, t);
        for (int mode = 0; mode < 2; mode++) {
            mdl_kvcache kv;
            int seq;
            ck_assert_ok(mdl_kv_init(&kv, &m.cfg, 0, 0));
            ck_assert_ok(mdl_kv_seq_open(&kv, &seq));
            ag_tensor *lg;
            ag_ctx_step_reset(&c);
            ck_assert_ok(mdl_forward_cached(&c, &m, &kv, seq, prompt, np, (mdl_attn_mode)mode,
                                            false, &lg));
            for (int i = 0; i < N_GREEDY; i++) {
                out[i] = inf_argmax(lg->data, m.cfg.vocab_size);
                ck_assert_msg(out[i] == fx_i32(want, i), "%s prompt %d mode %d step %d: %d, "
                              "reference %d", models[k].name, j, mode, i, out[i], fx_i32(want, i));
                ag_ctx_step_reset(&c);
                ck_assert_ok(mdl_forward_cached(&c, &m, &kv, seq, &out[i], 1,
                                                (mdl_attn_mode)mode, false, &lg));
            }
            mdl_kv_free(&kv);
        }
        // the decode loop of infer/ with its defaults (greedy, expanded prefill, absorbed
        // decode steps), small cache blocks
        inf_gen_opts o;
        inf_gen_opts_default(&o);
        o.max_tokens = N_GREEDY;
        o.stop_at_eos = false;
        o.block_tokens = 3;
        int n = 0;
        ck_assert_ok(inf_generate(&m, prompt, np, &o, out, &n, NULL));
        ck_assert_int_eq(n, N_GREEDY);
        for (int i = 0; i < N_GREEDY; i++)
            ck_assert_int_eq(out[i], fx_i32(want, i));
    }
    ag_ctx_free(&c);
    mdl_free(&m);
}
END_TEST

static Suite *suite(void) {
    Suite *s = suite_create("kvcache");
    TCase *tc = tcase_create("kvcache");
    tcase_add_unchecked_fixture(tc, setup_all, teardown_all);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_paging);
    tcase_add_test(tc, test_prefix_blocks);
    tcase_add_loop_test(tc, test_cached_vs_full, 0, 4);
    tcase_add_test(tc, test_absorbed_vs_expanded);
    tcase_add_test(tc, test_absorbed_many_queries_lora);
    tcase_add_test(tc, test_positions_and_sequences);
    tcase_add_loop_test(tc, test_greedy_fixture, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}

int main(void) {
    return harness_run(suite());
}
