// tests/test_forward_spans.c: the batched cached forward with an adapter bank
// (mdl_forward_spans): each sequence's logits equal the full forward of the model with that
// adapter wired alone (attention, MLP, shared and routed experts, router and lm_head
// adapted; adapters of different ranks side by side), a sequence's logits and cache rows
// have the same bits whatever else is in the batch and however its prompt is chunked (F32
// and NF4 bases), the adapters' slots in the bank do not matter, and bad spans are refused
// without changing any sequence.
#include "harness/harness.h"
#include "adapters/adapters.h"
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_AD 2
static const char *specs[N_AD] = {
    "r=4,alpha=8,seed=11,targets=q_a_proj+q_b_proj+kv_a_proj_with_mqa+kv_b_proj+o_proj+"
    "gate_proj+up_proj+down_proj+experts.gate_up_proj+experts.down_proj+mlp.gate+lm_head",
    "r=2,alpha=3,seed=12,targets=kv_b_proj+o_proj+experts.gate_up_proj+experts.down_proj"};

static void tiny(mdl_model *m) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/models/tiny.json", src ? src : ".");
    mcfg cfg;
    ck_assert_ok(mcfg_load(path, &cfg));
    ck_assert_ok(mdl_create(m, &cfg));
    ck_assert_ok(mdl_init_random(m, 7, 0.1));
}

// Adapter i for m, B filled so that it changes the outputs.
static void adapter(mdl_model *m, int i, lora_wire wire, lora_adapter *ad) {
    lora_spec s;
    ck_assert_ok(lora_spec_parse(specs[i], &s));
    ck_assert_ok(lora_attach(m, &s, wire, ad));
    lora_randomize_b(ad, 100 + i, 0.3);
}

static void some_ids(int32_t *ids, int n, uint64_t seed, int V) {
    ag_rng r;
    ag_rng_seed(&r, seed);
    for (int i = 0; i < n; i++)
        ids[i] = 1000 + (int32_t)(ag_rng_next(&r) % (uint64_t)(V - 1000));
}

// Logits [T, V] of the full forward of m as it is (adapter wired or not), on the heap.
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
    float *out = malloc((size_t)lg->numel * sizeof(float));
    memcpy(out, lg->data, (size_t)lg->numel * sizeof(float));
    ag_ctx_free(&c);
    return out;
}

static double row_rel(const float *a, const float *b, int64_t n) {
    double md = 0, mb = 0;
    for (int64_t i = 0; i < n; i++) {
        md = fmax(md, fabs((double)a[i] - b[i]));
        mb = fmax(mb, fabs((double)b[i]));
    }
    return md / fmax(mb, 1e-30);
}

// Three sequences in one batch, each with its own adapter (slot 0, slot 1, base), prompts
// prefilled together in chunks, then decoded together: every logits row matches the full
// forward of the model with that adapter wired alone.
START_TEST(test_matches_each_adapter_alone) {
    mdl_model m = {0};
    tiny(&m);
    int64_t V = m.cfg.vocab_size;
    enum { P = 9, G = 4, N = P + G };
    int32_t ids[3][N];
    float *want[3];
    for (int k = 0; k < 3; k++)
        some_ids(ids[k], N, 30 + k, (int)V);
    for (int k = 0; k < 3; k++) {
        lora_adapter w;
        if (k < N_AD)
            adapter(&m, k, LORA_WIRE_FORWARD, &w);
        want[k] = full_logits(&m, ids[k], N);
        if (k < N_AD)
            lora_detach(&w);
    }
    lora_adapter ad[N_AD];
    mdl_bank bank;
    ck_assert_ok(mdl_bank_init(&bank, &m, 3));
    for (int i = 0; i < N_AD; i++) {
        adapter(&m, i, LORA_WIRE_NONE, &ad[i]);
        ck_assert_ok(lora_bank_put(&ad[i], &m, &bank, i));
    }
    ck_assert(!mdl_bank_used(&bank, 2));
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    mdl_kvcache kv;
    ck_assert_ok(mdl_kv_init(&kv, &m.cfg, 4, 0));
    int seq[3], slot[3] = {0, 1, -1};
    for (int k = 0; k < 3; k++)
        ck_assert_ok(mdl_kv_seq_open(&kv, &seq[k]));
    // prefill: chunks of 5 then 4 (all logits of each chunk)
    int at = 0;
    for (int chunk = 5; at < P; at += chunk, chunk = P - at) {
        mdl_span sp[3];
        for (int k = 0; k < 3; k++)
            sp[k] = (mdl_span){seq[k], &ids[k][at], chunk, chunk, slot[k], chunk};
        ag_ctx_step_reset(&c);
        ag_tensor *lg;
        ck_assert_ok(mdl_forward_spans(&c, &m, &kv, &bank, sp, 3, &lg));
        ck_assert_int_eq(lg->shape[0], 3 * chunk);
        for (int k = 0; k < 3; k++)
            for (int i = 0; i < chunk; i++) {
                double rel = row_rel((float *)lg->data + (k * chunk + i) * V,
                                     want[k] + (at + i) * V, V);
                ck_assert_msg(rel < 1e-4, "seq %d prompt token %d: %g", k, at + i, rel);
            }
    }
    for (int g = 0; g < G; g++) { // decode: one token each, absorbed attention
        mdl_span sp[3];
        for (int k = 0; k < 3; k++)
            sp[k] = (mdl_span){seq[k], &ids[k][P + g], 1, 0, slot[k], 1};
        ag_ctx_step_reset(&c);
        ag_tensor *lg;
        ck_assert_ok(mdl_forward_spans(&c, &m, &kv, &bank, sp, 3, &lg));
        for (int k = 0; k < 3; k++) {
            double rel = row_rel((float *)lg->data + k * V, want[k] + (P + g) * V, V);
            ck_assert_msg(rel < 1e-4, "seq %d decode %d: %g", k, g, rel);
        }
    }
    for (int k = 0; k < 3; k++)
        free(want[k]);
    mdl_kv_free(&kv);
    ag_ctx_free(&c);
    mdl_bank_free(&bank);
    for (int i = 0; i < N_AD; i++)
        lora_detach(&ad[i]);
    mdl_free(&m);
}
END_TEST

// The N_AD adapters attached to m unwired, at slots 0.. of a new bank of N_AD.
static void adapters_in_bank(mdl_model *m, lora_adapter *ad, mdl_bank *bank) {
    ck_assert_ok(mdl_bank_init(bank, m, N_AD));
    for (int i = 0; i < N_AD; i++) {
        adapter(m, i, LORA_WIRE_NONE, &ad[i]);
        ck_assert_ok(lora_bank_put(&ad[i], m, bank, i));
    }
}

static void adapters_free(lora_adapter *ad, mdl_bank *bank) {
    mdl_bank_free(bank);
    for (int i = 0; i < N_AD; i++)
        lora_detach(&ad[i]);
}

// Sequences a and b hold the same bits in cache rows 0..n-1 of every layer.
static void same_cache_rows(const mdl_kvcache *kv, int a, int b, int n, int layers) {
    for (int l = 0; l < layers; l++)
        for (int t = 0; t < n; t++)
            ck_assert_msg(!memcmp(mdl_kv_row(kv, a, l, t), mdl_kv_row(kv, b, l, t),
                                  (size_t)kv->width * sizeof(float)),
                          "cache row %d of layer %d differs", t, l);
}

// Sequence X (adapter slot 1): 7 prompt tokens and 3 generated ones. Run alone (prompt in one
// span) and in a crowd (prompt in chunks of 3 and 4 next to other sequences' prefill chunks
// and decode steps of other adapters): its logits and its cache rows have the same bits.
static void check_invariance(mdl_model *m) {
    int64_t V = m->cfg.vocab_size;
    enum { P = 7, G = 3, N = P + G, NY = 60 };
    int32_t x[N], y[NY], z[N];
    some_ids(x, N, 51, (int)V);
    some_ids(y, NY, 52, (int)V);
    some_ids(z, N, 53, (int)V);
    lora_adapter ad[N_AD];
    mdl_bank bank;
    adapters_in_bank(m, ad, &bank);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    mdl_kvcache kv;
    ck_assert_ok(mdl_kv_init(&kv, &m->cfg, 4, 0));
    int sx, sy, sz, sx2;
    ck_assert_ok(mdl_kv_seq_open(&kv, &sx));
    ck_assert_ok(mdl_kv_seq_open(&kv, &sy));
    ck_assert_ok(mdl_kv_seq_open(&kv, &sz));
    ck_assert_ok(mdl_kv_seq_open(&kv, &sx2));
    float *alone = malloc((size_t)(G + 1) * V * sizeof(float));
    ag_tensor *lg;
    mdl_span s1 = {sx, x, P, P, 1, 1};
    ck_assert_ok(mdl_forward_spans(&c, m, &kv, &bank, &s1, 1, &lg));
    memcpy(alone, lg->data, (size_t)V * sizeof(float));
    for (int g = 0; g < G; g++) {
        ag_ctx_step_reset(&c);
        mdl_span d = {sx, &x[P + g], 1, 0, 1, 1};
        ck_assert_ok(mdl_forward_spans(&c, m, &kv, &bank, &d, 1, &lg));
        memcpy(alone + (g + 1) * V, lg->data, (size_t)V * sizeof(float));
    }
    // the crowd: z gets a head start so that it decodes while x prefills; y's long prompt
    // makes the batches large (BLAS products change with the row count past a few dozen)
    mdl_span zs = {sz, z, 5, 5, 0, 1};
    ck_assert_ok(mdl_forward_spans(&c, m, &kv, &bank, &zs, 1, &lg));
    mdl_span st1[3] = {{sz, &z[5], 1, 0, 0, 1}, {sx2, x, 3, 3, 1, 0}, {sy, y, 50, 50, -1, 2}};
    ag_ctx_step_reset(&c);
    ck_assert_ok(mdl_forward_spans(&c, m, &kv, &bank, st1, 3, &lg));
    mdl_span st2[3] = {{sy, &y[50], 1, 1, -1, 1}, {sx2, &x[3], 4, 4, 1, 1}, {sz, &z[6], 1, 0, 0, 1}};
    ag_ctx_step_reset(&c);
    ck_assert_ok(mdl_forward_spans(&c, m, &kv, &bank, st2, 3, &lg));
    ck_assert_msg(!memcmp((float *)lg->data + V, alone, (size_t)V * sizeof(float)),
                  "last prompt token's logits differ in the crowd");
    for (int g = 0; g < G; g++) {
        mdl_span st3[3] = {{sz, &z[7 + g], 1, 0, 0, 1}, {sx2, &x[P + g], 1, 0, 1, 1},
                           {sy, &y[51 + g], 1, 0, -1, 1}};
        ag_ctx_step_reset(&c);
        ck_assert_ok(mdl_forward_spans(&c, m, &kv, &bank, st3, 3, &lg));
        ck_assert_msg(!memcmp((float *)lg->data + V, alone + (g + 1) * V,
                              (size_t)V * sizeof(float)),
                      "decode step %d differs in the crowd", g);
    }
    same_cache_rows(&kv, sx, sx2, N, m->cfg.num_hidden_layers);
    free(alone);
    mdl_kv_free(&kv);
    ag_ctx_free(&c);
    adapters_free(ad, &bank);
}

// _i = 1: with the vocabulary projection packed for AMX (where the processor has it).
START_TEST(test_sequences_do_not_depend_on_the_batch) {
    mdl_model m = {0};
    tiny(&m);
    bool packed = false;
    if (_i)
        ck_assert_ok(mdl_pack_head(&m, &packed));
    ck_assert(packed == (_i && ag_bx_available()));
    check_invariance(&m);
    mdl_free(&m);
}
END_TEST

// The tiny preset written to dir and loaded with an NF4 base; prompts: its prompt rows on
// the bf16 pairs where the processor has them (mdl_prompts_on_amx).
static void nf4_tiny(mdl_model *m, char *dir, bool prompts) {
    ck_assert_ptr_nonnull(mkdtemp(dir));
    const char *src = getenv("MOLT_SOURCE_DIR");
    char preset[4096];
    snprintf(preset, sizeof preset, "%s/configs/models/tiny.json", src ? src : ".");
    mdl_init_opts o = {.preset = preset, .out_dir = dir, .seed = 3, .no_tokenizer = true};
    ck_assert_ok(mdl_init_model(&o));
    mdl_qspec q;
    ck_assert_ok(mdl_qspec_parse("nf4", &q));
    ck_assert_ok(mdl_load_quant(dir, &q, m));
    ck_assert_ptr_nonnull(m->layers[1].gate_up_q);
    bool on = false;
    if (prompts)
        mdl_prompts_on_amx(m, &on);
    ck_assert(on == (prompts && ag_bxq_available()));
    if (prompts && !on)
        printf("nf4_tiny: no AMX-BF16 here: the prompt rows stay F32\n");
}

static void rm_dir(const char *dir) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ck_assert_int_eq(system(cmd), 0);
}

// The same on an NF4 base (quantized projections and experts), its head packed for AMX where
// the processor has it (what molt serve runs); _i = 1: its prompt rows' products too.
START_TEST(test_invariance_on_a_quantized_base) {
    char dir[] = "/tmp/molt-spans-XXXXXX";
    mdl_model m = {0};
    nf4_tiny(&m, dir, _i == 1);
    ck_assert_ok(mdl_pack_head(&m, NULL));
    check_invariance(&m);
    mdl_free(&m);
    rm_dir(dir);
}
END_TEST

// A span whose first tokens are expanded and the rest absorbed (a preempted sequence computed
// again: prompt tokens expanded, its generated ones absorbed) gives the bits of the same
// tokens in two steps, the expanded ones first and then the others absorbed: logits of every
// absorbed row and cache rows. Both runs have other sequences beside them (a decode on
// another adapter, a prefill on the base); the decode's absorbed row comes before the span's
// in the one-step run and after it in the two-step run.
static void check_part_expanded(mdl_model *m) {
    int64_t V = m->cfg.vocab_size;
    enum { N = 7, NE = 3, NY = 9 };
    int32_t x[N], y[NY], z[4];
    some_ids(x, N, 81, (int)V);
    some_ids(y, NY, 82, (int)V);
    some_ids(z, 4, 83, (int)V);
    lora_adapter ad[N_AD];
    mdl_bank bank;
    adapters_in_bank(m, ad, &bank);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    mdl_kvcache kv;
    ck_assert_ok(mdl_kv_init(&kv, &m->cfg, 6, 0));
    int sx1, sx2, sz1, sz2, sy1, sy2;
    ck_assert_ok(mdl_kv_seq_open(&kv, &sx1));
    ck_assert_ok(mdl_kv_seq_open(&kv, &sx2));
    ck_assert_ok(mdl_kv_seq_open(&kv, &sz1));
    ck_assert_ok(mdl_kv_seq_open(&kv, &sz2));
    ck_assert_ok(mdl_kv_seq_open(&kv, &sy1));
    ck_assert_ok(mdl_kv_seq_open(&kv, &sy2));
    ag_tensor *lg;
    // z (adapter 1) has 3 tokens in the cache in both runs, then decodes beside x
    mdl_span zp[2] = {{sz1, z, 3, 3, 1, 0}, {sz2, z, 3, 3, 1, 0}};
    ck_assert_ok(mdl_forward_spans(&c, m, &kv, &bank, zp, 2, &lg));
    // one step: z decodes, x (adapter 0) has NE tokens expanded and N - NE absorbed, y prefills
    mdl_span one[3] = {{sz1, &z[3], 1, 0, 1, 1}, {sx1, x, N, NE, 0, N - NE},
                       {sy1, y, NY, NY, -1, 1}};
    ag_ctx_step_reset(&c);
    ck_assert_ok(mdl_forward_spans(&c, m, &kv, &bank, one, 3, &lg));
    float *want = malloc((size_t)(N - NE + 1) * (size_t)V * sizeof(float));
    memcpy(want, lg->data, (size_t)(N - NE + 1) * (size_t)V * sizeof(float)); // z, then x
    // two steps: x's expanded tokens beside y's prefill, then its absorbed ones beside z
    mdl_span first[2] = {{sy2, y, NY, NY, -1, 1}, {sx2, x, NE, NE, 0, 0}};
    ag_ctx_step_reset(&c);
    ck_assert_ok(mdl_forward_spans(&c, m, &kv, &bank, first, 2, &lg));
    mdl_span second[2] = {{sx2, &x[NE], N - NE, 0, 0, N - NE}, {sz2, &z[3], 1, 0, 1, 1}};
    ag_ctx_step_reset(&c);
    ck_assert_ok(mdl_forward_spans(&c, m, &kv, &bank, second, 2, &lg));
    for (int i = 0; i < N - NE; i++)
        ck_assert_msg(!memcmp((float *)lg->data + (int64_t)i * V, want + (int64_t)(i + 1) * V,
                              (size_t)V * sizeof(float)),
                      "absorbed row %d of the part-expanded span differs from its own step", i);
    ck_assert_msg(!memcmp((float *)lg->data + (int64_t)(N - NE) * V, want,
                          (size_t)V * sizeof(float)),
                  "the decode beside it differs");
    same_cache_rows(&kv, sx1, sx2, N, m->cfg.num_hidden_layers);
    free(want);
    mdl_kv_free(&kv);
    ag_ctx_free(&c);
    adapters_free(ad, &bank);
}

// _i = 1: on an NF4 base whose prompt rows take the bf16 pairs (the recomputed span's
// expanded rows must take them again, its absorbed rows must not).
START_TEST(test_span_part_expanded) {
    mdl_model m = {0};
    char dir[] = "/tmp/molt-spans-XXXXXX";
    if (_i)
        nf4_tiny(&m, dir, true);
    else
        tiny(&m);
    check_part_expanded(&m);
    mdl_free(&m);
    if (_i)
        rm_dir(dir);
}
END_TEST

// Three sequences (adapter 0, adapter 1, base), a prompt step and two decode steps, on `bank`
// with the adapters at slots sa and sb: all their logits, on the heap.
static float *three_seqs(mdl_model *m, const mdl_bank *bank, int sa, int sb) {
    int64_t V = m->cfg.vocab_size;
    enum { P = 6, G = 2 };
    int32_t ids[3][P + G];
    for (int k = 0; k < 3; k++)
        some_ids(ids[k], P + G, 70 + k, (int)V);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    mdl_kvcache kv;
    ck_assert_ok(mdl_kv_init(&kv, &m->cfg, 4, 0));
    int seq[3], slot[3] = {sa, sb, -1};
    for (int k = 0; k < 3; k++)
        ck_assert_ok(mdl_kv_seq_open(&kv, &seq[k]));
    float *out = malloc((size_t)(3 * (P + G)) * (size_t)V * sizeof(float)), *at = out;
    for (int step = 0; step <= G; step++) {
        int n = step == 0 ? P : 1, from = step == 0 ? 0 : P + step - 1;
        mdl_span sp[3];
        for (int k = 0; k < 3; k++)
            sp[k] = (mdl_span){seq[k], &ids[k][from], n, step == 0 ? n : 0, slot[k], n};
        ag_ctx_step_reset(&c);
        ag_tensor *lg;
        ck_assert_ok(mdl_forward_spans(&c, m, &kv, bank, sp, 3, &lg));
        memcpy(at, lg->data, (size_t)lg->numel * sizeof(float));
        at += lg->numel;
    }
    mdl_kv_free(&kv);
    ag_ctx_free(&c);
    return out;
}

// A step runs on the slots its spans use, renumbered (the bank's other adapters are not
// walked): adapters at slots 5 and 2 of a bank of 6 whose other slots hold adapters too give
// the same bits as the same adapters at slots 0 and 1 of a bank of 2.
START_TEST(test_slots_of_a_large_bank) {
    mdl_model m = {0};
    tiny(&m);
    lora_adapter ad[N_AD];
    for (int i = 0; i < N_AD; i++)
        adapter(&m, i, LORA_WIRE_NONE, &ad[i]);
    mdl_bank small, large;
    ck_assert_ok(mdl_bank_init(&small, &m, 2));
    ck_assert_ok(mdl_bank_init(&large, &m, 6));
    ck_assert_ok(lora_bank_put(&ad[0], &m, &small, 0));
    ck_assert_ok(lora_bank_put(&ad[1], &m, &small, 1));
    int put[4][2] = {{0, 1}, {2, 1}, {3, 0}, {5, 0}}; // slot, adapter
    for (int i = 0; i < 4; i++)
        ck_assert_ok(lora_bank_put(&ad[put[i][1]], &m, &large, put[i][0]));
    float *want = three_seqs(&m, &small, 0, 1), *got = three_seqs(&m, &large, 5, 2);
    size_t n = (size_t)(3 * 8) * (size_t)m.cfg.vocab_size;
    ck_assert_msg(!memcmp(want, got, n * sizeof(float)), "slots 5 and 2 of 6 differ from 0 and 1");
    float *swapped = three_seqs(&m, &large, 3, 0); // the same adapters at other slots
    ck_assert(!memcmp(want, swapped, n * sizeof(float)));
    free(want);
    free(got);
    free(swapped);
    mdl_bank_free(&small);
    mdl_bank_free(&large);
    for (int i = 0; i < N_AD; i++)
        lora_detach(&ad[i]);
    mdl_free(&m);
}
END_TEST

START_TEST(test_bad_spans) {
    mdl_model m = {0};
    tiny(&m);
    mdl_bank bank;
    ck_assert_ok(mdl_bank_init(&bank, &m, 2));
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    mdl_kvcache kv;
    ck_assert_ok(mdl_kv_init(&kv, &m.cfg, 4, 0));
    int a, b;
    ck_assert_ok(mdl_kv_seq_open(&kv, &a));
    ck_assert_ok(mdl_kv_seq_open(&kv, &b));
    int32_t ids[3] = {5, 6, 7}, bad = (int32_t)m.cfg.vocab_size;
    ag_tensor *lg;
    mdl_span twice[2] = {{a, ids, 3, 3, -1, 1}, {a, ids, 1, 0, -1, 1}};
    ck_assert_int_eq(mdl_forward_spans(&c, &m, &kv, &bank, twice, 2, &lg), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "batched forward: spans 0 and 1 are both sequence 0");
    mdl_span far = {a, ids, 3, 3, 2, 1};
    ck_assert_int_eq(mdl_forward_spans(&c, &m, &kv, &bank, &far, 1, &lg), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "batched forward: span 0: adapter slot 2 outside [-1, 2)");
    ck_assert_int_eq(mdl_forward_spans(&c, &m, &kv, NULL, &(mdl_span){a, ids, 3, 3, 0, 1}, 1,
                                       &lg), MOLT_EARG);
    mdl_span ok_and_bad[2] = {{a, ids, 3, 3, -1, 1}, {b, &bad, 1, 0, -1, 1}};
    ck_assert_int_eq(mdl_forward_spans(&c, &m, &kv, &bank, ok_and_bad, 2, &lg), MOLT_EARG);
    ck_assert_ptr_null(lg);
    ck_assert_int_eq(mdl_kv_len(&kv, a), 0);
    ck_assert_int_eq(mdl_kv_len(&kv, b), 0);
    mdl_span none = {a, ids, 3, 3, -1, 0}; // no logits wanted: the cache still fills
    ck_assert_ok(mdl_forward_spans(&c, &m, &kv, &bank, &none, 1, &lg));
    ck_assert_ptr_null(lg);
    ck_assert_int_eq(mdl_kv_len(&kv, a), 3);
    mdl_kv_free(&kv);
    ag_ctx_free(&c);
    mdl_bank_free(&bank);
    mdl_free(&m);
}
END_TEST

int main(void) {
    Suite *s = suite_create("forward_spans");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_matches_each_adapter_alone);
    tcase_add_loop_test(tc, test_sequences_do_not_depend_on_the_batch, 0, 2);
    tcase_add_loop_test(tc, test_invariance_on_a_quantized_base, 0, 2);
    tcase_add_test(tc, test_slots_of_a_large_bank);
    tcase_add_loop_test(tc, test_span_part_expanded, 0, 2);
    tcase_add_test(tc, test_bad_spans);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
