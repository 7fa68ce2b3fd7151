// tests/test_composite_block.c: a two-layer miniature Mistral 4 decoder built from the
// autograd ops alone (embedding, MLA attention with RoPE/YaRN and the llama-4 query
// temperature, MoE with group-limited routing plus a shared expert, final norm, masked
// cross-entropy), with LoRA matrices on q_b_proj, kv_b_proj, o_proj and the shared expert's
// up projection. Checks the gradient end to end w.r.t. the embedding table and every LoRA
// matrix, f32 against f64, optimized against reference kernels, and that frozen base
// weights never get gradient buffers. Not here: the model module's own forward (model/),
// quantized weights, KV caches.
#include "harness/harness.h"

#include <math.h>
#include <string.h>

// Miniature dimensions (SPECS.md sections 2-3 with everything shrunk).
enum {
    HID = 8,      // hidden
    NHEAD = 2,    // attention heads
    QRANK = 6,    // q_lora_rank
    KVRANK = 4,   // kv_lora_rank
    DNOPE = 2,    // qk_nope_head_dim
    DROPE = 2,    // qk_rope_head_dim
    DV = 3,       // v_head_dim
    DQK = DNOPE + DROPE,
    NEXP = 4,     // routed experts
    MI = 3,       // moe_intermediate_size (and the shared expert's, n_shared_experts = 1)
    VOCAB = 11,
    NTOK = 7,     // two packed segments: 4 + 3 tokens
    LR = 2,       // LoRA rank
    NLAYER = 2,
    NTARGET = 4,  // LoRA targets per layer: q_b, kv_b, o, shared up
    CE_CHUNK = 4, // vocabulary chunk of the loss (3 chunks over 11)
};
#define RMS_EPS 1e-6
#define LORA_SCALE 0.75
#define QTEMP_BETA 0.1
#define ORIG_MAX_POS 2 // small, so the query temperature differs between positions
#define SEED 2024

// Frozen weights of one layer, HF names shortened; the X-macro lists them once.
#define LAYER_FIELDS(X)                                                                      \
    X(in_norm) X(qa) X(qa_norm) X(qb) X(kva) X(kva_norm) X(kvb) X(o) X(post_norm) X(router)  \
    X(gate_up) X(down) X(sh_gate) X(sh_up) X(sh_down)
#define DECLARE_FIELD(f) ag_tensor *f;
typedef struct {
    LAYER_FIELDS(DECLARE_FIELD)
} layer_w;

typedef struct {
    layer_w l[NLAYER];
    ag_tensor *final_norm, *lm_head;
} base_w;

typedef struct {
    base_w w64, w32;                  // frozen base, the same values in both dtypes
    ag_rope_table rope;               // outlives every tape (ag_rope keeps a pointer)
    ag_router_config rcfg[NLAYER];
    double scale;                     // softmax scale with the YaRN mscale
    ag_tensor *logits[NLAYER];        // router logits of the last build, for margins
} model;

// Inputs of the graph: what the gradient check perturbs comes first.
enum {
    IN_TABLE = 0,                     // [VOCAB, HID] embeddings, trainable here
    IN_LORA = 1,                      // NLAYER * NTARGET packs: A [LR, in] then B [out, LR]
    IN_IDS = IN_LORA + NLAYER * NTARGET,
    IN_TARGETS,
    IN_MASK,
    IN_POS,
    IN_SEG,
    IN_QTEMP,
    IN_COUNT
};

static const int64_t lora_in[NTARGET] = {QRANK, KVRANK, NHEAD * DV, HID};
static const int64_t lora_out[NTARGET] = {NHEAD * DQK, NHEAD * (DNOPE + DV), HID, MI};

// ---- the model -------------------------------------------------------------------------------

// y = x W^T + s * (x A^T) B^T, A and B cut from one trainable pack.
static ag_tensor *lora_linear(ag_ctx *c, ag_tensor *x, ag_tensor *w, ag_tensor *pack, int t) {
    int64_t in = lora_in[t], out = lora_out[t];
    ag_tensor *part[2];
    if (ag_split(c, pack, 0, 2, (int64_t[]){LR * in, out * LR}, part) != MOLT_OK)
        return NULL;
    ag_tensor *a = ag_reshape(c, part[0], 2, (int64_t[]){LR, in});
    ag_tensor *b = ag_reshape(c, part[1], 2, (int64_t[]){out, LR});
    ag_tensor *delta = ag_scale(c, ag_linear(c, ag_linear(c, x, a), b), LORA_SCALE);
    return ag_add(c, ag_linear(c, x, w), delta);
}

// h + o_proj(attention(query, key, v)) with MLA projections (SPECS.md section 2).
static ag_tensor *attention_block(ag_ctx *c, ag_tensor *h, const layer_w *w, ag_tensor **lora,
                                  ag_tensor **in, const model *m) {
    ag_tensor *pos = in[IN_POS], *qp[2], *ck[2], *kvp[2];
    ag_tensor *n1 = ag_rmsnorm(c, h, w->in_norm, RMS_EPS);
    ag_tensor *qa = ag_rmsnorm(c, ag_linear(c, n1, w->qa), w->qa_norm, RMS_EPS);
    ag_tensor *q = ag_reshape(c, lora_linear(c, qa, w->qb, lora[0], 0), 3,
                              (int64_t[]){NTOK, NHEAD, DQK});
    if (ag_split(c, q, 2, 2, (int64_t[]){DNOPE, DROPE}, qp) != MOLT_OK)
        return NULL;
    qp[1] = ag_rope(c, qp[1], pos, &m->rope, 0);
    ag_tensor *query = ag_concat(c, 2, qp, 2);
    ag_tensor *ckv = ag_linear(c, n1, w->kva);
    if (ag_split(c, ckv, 1, 2, (int64_t[]){KVRANK, DROPE}, ck) != MOLT_OK)
        return NULL;
    ag_tensor *cn = ag_rmsnorm(c, ck[0], w->kva_norm, RMS_EPS);
    ag_tensor *kv = ag_reshape(c, lora_linear(c, cn, w->kvb, lora[1], 1), 3,
                               (int64_t[]){NTOK, NHEAD, DNOPE + DV});
    if (ag_split(c, kv, 2, 2, (int64_t[]){DNOPE, DV}, kvp) != MOLT_OK)
        return NULL;
    // one rotary key head shared by all heads
    ag_tensor *kr = ag_rope(c, ag_reshape(c, ck[1], 3, (int64_t[]){NTOK, 1, DROPE}), pos,
                            &m->rope, 0);
    ag_tensor *kparts[2] = {kvp[0], ag_expand(c, kr, 1, NHEAD)};
    ag_tensor *key = ag_concat(c, 2, kparts, 2);
    ag_tensor *att = ag_attention(c, query, key, kvp[1], in[IN_SEG], in[IN_QTEMP], m->scale);
    ag_tensor *flat = ag_reshape(c, att, 2, (int64_t[]){NTOK, NHEAD * DV});
    return ag_add(c, h, lora_linear(c, flat, w->o, lora[2], 2));
}

// h + routed experts + shared expert, both fed the same normalized input (SPECS.md 3).
static ag_tensor *moe_block(ag_ctx *c, ag_tensor *h, const layer_w *w, ag_tensor **lora,
                            model *m, int layer) {
    ag_tensor *n2 = ag_rmsnorm(c, h, w->post_norm, RMS_EPS), *idx = NULL;
    ag_tensor *logits = ag_linear(c, n2, w->router);
    m->logits[layer] = logits;
    ag_tensor *weights = logits ? ag_moe_router(c, logits, &m->rcfg[layer], &idx) : NULL;
    if (!weights)
        return NULL;
    ag_tensor *routed = ag_moe_experts(c, n2, weights, idx, w->gate_up, w->down);
    ag_tensor *act = ag_swiglu(c, ag_linear(c, n2, w->sh_gate),
                               lora_linear(c, n2, w->sh_up, lora[3], 3));
    ag_tensor *shared = ag_linear(c, act, w->sh_down);
    return ag_add(c, ag_add(c, h, routed), shared);
}

static ag_tensor *build_model(ag_ctx *c, ag_tensor **in, void *user) {
    model *m = user;
    const base_w *w = in[IN_TABLE]->dtype == AG_F32 ? &m->w32 : &m->w64;
    ag_tensor *h = ag_embedding(c, in[IN_TABLE], in[IN_IDS]);
    for (int l = 0; l < NLAYER && h; l++) {
        ag_tensor **lora = in + IN_LORA + l * NTARGET;
        h = attention_block(c, h, &w->l[l], lora, in, m);
        h = h ? moe_block(c, h, &w->l[l], lora, m, l) : NULL;
    }
    ag_tensor *hf = ag_rmsnorm(c, h, w->final_norm, RMS_EPS);
    return ag_cross_entropy_linear(c, hf, w->lm_head, in[IN_TARGETS], in[IN_MASK], CE_CHUNK);
}

// ---- setup ----------------------------------------------------------------------------------

// A frozen F64 weight with values exactly representable in f32 (so the f32 copy is the same
// model), in [lo, hi).
static ag_tensor *frozen(ag_arena *a, ag_rng *r, int ndim, const int64_t *shape, double lo,
                         double hi) {
    ag_tensor *t = gc_rand(a, r, ndim, shape, lo, hi, false);
    for (int64_t i = 0; i < t->numel; i++)
        ag_set(t, i, (double)(float)ag_get(t, i));
    return t;
}

#define W2(o, i) frozen(a, r, 2, (int64_t[]){o, i}, -0.5, 0.5)
#define NORM(n) frozen(a, r, 1, (int64_t[]){n}, 0.8, 1.2)

static void init_layer(layer_w *w, ag_arena *a, ag_rng *r) {
    w->in_norm = NORM(HID);
    w->qa = W2(QRANK, HID);
    w->qa_norm = NORM(QRANK);
    w->qb = W2(NHEAD * DQK, QRANK);
    w->kva = W2(KVRANK + DROPE, HID);
    w->kva_norm = NORM(KVRANK);
    w->kvb = W2(NHEAD * (DNOPE + DV), KVRANK);
    w->o = W2(HID, NHEAD * DV);
    w->post_norm = NORM(HID);
    w->router = frozen(a, r, 2, (int64_t[]){NEXP, HID}, -1, 1);
    w->gate_up = frozen(a, r, 3, (int64_t[]){NEXP, 2 * MI, HID}, -0.5, 0.5);
    w->down = frozen(a, r, 3, (int64_t[]){NEXP, HID, MI}, -0.5, 0.5);
    w->sh_gate = W2(MI, HID);
    w->sh_up = W2(MI, HID);
    w->sh_down = W2(HID, MI);
}

static void clone_base(base_w *dst, const base_w *src, ag_arena *a, ag_dtype dt) {
    for (int l = 0; l < NLAYER; l++) {
#define CLONE_FIELD(f) dst->l[l].f = gc_clone(a, src->l[l].f, dt);
        LAYER_FIELDS(CLONE_FIELD)
#undef CLONE_FIELD
    }
    dst->final_norm = gc_clone(a, src->final_norm, dt);
    dst->lm_head = gc_clone(a, src->lm_head, dt);
}

static void init_model(model *m, ag_arena *a, ag_rng *r) {
    memset(m, 0, sizeof *m);
    for (int l = 0; l < NLAYER; l++)
        init_layer(&m->w64.l[l], a, r);
    m->w64.final_norm = NORM(HID);
    m->w64.lm_head = W2(VOCAB, HID);
    clone_base(&m->w32, &m->w64, a, AG_F32);
    ag_rope_config rc = {.theta = 10000, .rot_dim = DROPE, .yarn = true, .factor = 4,
                         .original_max_pos = ORIG_MAX_POS, .beta_fast = 32, .beta_slow = 1,
                         .mscale = 1, .mscale_all_dim = 1};
    ck_assert_ok(ag_rope_table_init(&m->rope, &rc));
    double ms = ag_yarn_mscale(rc.factor, rc.mscale_all_dim);
    m->scale = ms * ms / sqrt((double)DQK);
    // layer 0 routes within one of two groups of two experts, layer 1 over all four
    m->rcfg[0] = (ag_router_config){.top_k = 2, .n_group = 2, .topk_group = 1,
                                    .norm_topk_prob = true, .scaling = 1.0};
    m->rcfg[1] = (ag_router_config){.top_k = 2, .n_group = 1, .topk_group = 1,
                                    .norm_topk_prob = true, .scaling = 1.0};
}

static void init_inputs(ag_tensor **in, ag_arena *a, ag_rng *r) {
    in[IN_TABLE] = gc_rand(a, r, 2, (int64_t[]){VOCAB, HID}, -1, 1, true);
    for (int l = 0; l < NLAYER; l++)
        for (int t = 0; t < NTARGET; t++) {
            int64_t n = LR * lora_in[t] + lora_out[t] * LR;
            in[IN_LORA + l * NTARGET + t] = gc_rand(a, r, 1, &n, -0.5, 0.5, true);
        }
    const int pos[NTOK] = {0, 1, 2, 3, 0, 1, 2}, seg[NTOK] = {0, 0, 0, 0, 1, 1, 1};
    const double mask[NTOK] = {0, 1, 1, 1, 0, 1, 1}; // segment starts carry no loss
    in[IN_IDS] = ag_tensor_new1(a, AG_I32, NTOK);
    in[IN_TARGETS] = ag_tensor_new1(a, AG_I32, NTOK);
    in[IN_MASK] = ag_tensor_new1(a, AG_F64, NTOK);
    in[IN_POS] = ag_tensor_new1(a, AG_I32, NTOK);
    in[IN_SEG] = ag_tensor_new1(a, AG_I32, NTOK);
    in[IN_QTEMP] = ag_tensor_new1(a, AG_F64, NTOK);
    for (int t = 0; t < NTOK; t++) {
        ag_set(in[IN_IDS], t, (double)(ag_rng_next(r) % VOCAB));
        ag_set(in[IN_TARGETS], t, (double)(ag_rng_next(r) % VOCAB));
        ag_set(in[IN_MASK], t, mask[t]);
        ag_set(in[IN_POS], t, pos[t]);
        ag_set(in[IN_SEG], t, seg[t]);
        // llama-4 temperature 1 + beta ln(1 + floor(pos / original_max_pos)), rounded to f32
        double qt = 1 + QTEMP_BETA * log(1 + floor((double)pos[t] / ORIG_MAX_POS));
        ag_set(in[IN_QTEMP], t, (double)(float)qt);
    }
}

typedef struct {
    ag_arena arena;
    model m;
    ag_tensor *in[IN_COUNT];
    gc_case g;
} fixture;

static void fixture_init(fixture *f, uint64_t seed) {
    ag_arena_init(&f->arena, "composite", 0);
    ag_rng r;
    ag_rng_seed(&r, seed);
    init_model(&f->m, &f->arena, &r);
    init_inputs(f->in, &f->arena, &r);
    // a step of 1e-5 rather than 1e-6: the loss sums many terms, and the larger step keeps
    // its rounding noise well below the gradients of the smallest LoRA entries
    f->g = (gc_case){.n_in = IN_COUNT, .in = f->in, .build = build_model, .user = &f->m,
                     .eps = 1e-5};
}

// Gap between the last kept and the first dropped value of xs[0..n-1] when the best `keep`
// are kept (INFINITY when all are kept).
static double keep_margin(const double *xs, int n, int keep) {
    if (keep >= n)
        return INFINITY;
    double v[NEXP];
    memcpy(v, xs, (size_t)n * sizeof *v);
    for (int i = 0; i < n; i++) // selection sort, descending
        for (int j = i + 1; j < n; j++)
            if (v[j] > v[i]) {
                double tmp = v[i];
                v[i] = v[j];
                v[j] = tmp;
            }
    return v[keep - 1] - v[keep];
}

// Smallest gap, over tokens and layers, between what the router kept and what it left out:
// group scores (sum of the top-2 probs) and the probs of the eligible experts.
static double routing_margin(const model *m) {
    double worst = INFINITY;
    for (int l = 0; l < NLAYER; l++) {
        const ag_router_config *rc = &m->rcfg[l];
        int gsz = NEXP / rc->n_group;
        for (int t = 0; t < NTOK; t++) {
            double p[NEXP], mx = -INFINITY, s = 0, gs[NEXP], el[NEXP];
            for (int e = 0; e < NEXP; e++)
                mx = fmax(mx, ag_get(m->logits[l], t * NEXP + e));
            for (int e = 0; e < NEXP; e++)
                s += (p[e] = exp(ag_get(m->logits[l], t * NEXP + e) - mx));
            for (int e = 0; e < NEXP; e++)
                p[e] /= s;
            for (int g = 0; g < rc->n_group; g++) {
                double pair = -1, *pg = p + g * gsz;
                for (int i = 0; i < gsz; i++)
                    for (int j = i + 1; j < gsz; j++)
                        pair = fmax(pair, pg[i] + pg[j]);
                gs[g] = pair;
            }
            worst = fmin(worst, keep_margin(gs, rc->n_group, rc->topk_group));
            double cut = -INFINITY; // groups scoring at least this are kept
            for (int g = 0; g < rc->n_group && rc->topk_group < rc->n_group; g++) {
                int above = 0;
                for (int h = 0; h < rc->n_group; h++)
                    above += gs[h] > gs[g];
                if (above == rc->topk_group - 1) // the topk_group-th largest score
                    cut = gs[g];
            }
            int n_elig = 0;
            for (int e = 0; e < NEXP; e++)
                if (gs[e / gsz] >= cut)
                    el[n_elig++] = p[e];
            worst = fmin(worst, keep_margin(el, n_elig, rc->top_k));
        }
    }
    return worst;
}

// ---- tests ------------------------------------------------------------------------------------

START_TEST(test_block_forward_backward) {
    fixture f;
    fixture_init(&f, SEED);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *loss = build_model(&c, f.in, &f.m);
    ck_assert_tensor(loss);
    double l0 = ag_get(loss, 0);
    ck_assert(isfinite(l0) && l0 > 0);
    // finite differences of 1e-6 must not flip a routing decision
    double margin = routing_margin(&f.m);
    ck_assert_msg(margin > 1e-4, "routing margin %g too small for the gradient check", margin);
    ck_assert_ok(ag_backward(&c, loss));
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert_uint_eq(c.saved_bytes, 0);
    for (int i = IN_TABLE; i < IN_IDS; i++) {
        ck_assert_ptr_nonnull(f.in[i]->grad);
        double mx = 0;
        for (int64_t j = 0; j < f.in[i]->numel; j++)
            mx = fmax(mx, fabs(ag_get(f.in[i]->grad, j)));
        ck_assert_msg(mx > 1e-6, "input %d got an all-zero gradient", i);
    }
    for (int l = 0; l < NLAYER; l++) {
#define CHECK_FROZEN(field)                                                                  \
    ck_assert(!f.m.w64.l[l].field->requires_grad);                                           \
    ck_assert_msg(f.m.w64.l[l].field->grad == NULL, "layer %d %s got a gradient", l, #field);
        LAYER_FIELDS(CHECK_FROZEN)
#undef CHECK_FROZEN
    }
    ck_assert_ptr_null(f.m.w64.final_norm->grad);
    ck_assert_ptr_null(f.m.w64.lm_head->grad);
    ck_assert_ptr_null(f.in[IN_MASK]->grad);
    ck_assert_ptr_null(f.in[IN_QTEMP]->grad);
    ag_ctx_free(&c);
    ag_arena_free(&f.arena);
}
END_TEST

// Same seed as test_block_forward_backward, whose routing-margin check guarantees the
// finite-difference steps never change which experts are chosen.
START_TEST(test_block_gradcheck) {
    fixture f;
    fixture_init(&f, SEED);
    int64_t n = VOCAB * HID;
    for (int l = 0; l < NLAYER; l++)
        for (int t = 0; t < NTARGET; t++)
            n += LR * lora_in[t] + lora_out[t] * LR;
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        gc_result res;
        ck_assert_ok(gc_gradcheck(&f.g, &res));
        ck_assert_int_eq(res.checked, n);
        ck_assert_msg(res.max_rel <= 1e-6, "ref %d: max rel %g at input %d elem %lld (%g vs %g)",
                      ref, res.max_rel, res.worst_input, (long long)res.worst_elem,
                      res.analytic, res.numeric);
    }
    ag_arena_free(&f.arena);
}
END_TEST

START_TEST(test_block_f32_vs_f64_and_fast_vs_ref) {
    fixture f;
    fixture_init(&f, SEED);
    double rel;
    ck_assert_ok(gc_f32_vs_f64(&f.g, &rel));
    ck_assert_double_le(rel, 1e-5);
    ck_assert_ok(gc_fast_vs_ref(&f.g, &rel));
    ck_assert_double_le(rel, 1e-5);
    ag_arena_free(&f.arena);
}
END_TEST

int main(void) {
    Suite *s = suite_create("composite_block");
    TCase *tc = tcase_create("block");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_block_forward_backward);
    tcase_add_test(tc, test_block_gradcheck);
    tcase_add_test(tc, test_block_f32_vs_f64_and_fast_vs_ref);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
