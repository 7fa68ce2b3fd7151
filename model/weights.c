// model/weights.c: the model's weights: allocation from a config, the list of every tensor
// with its HF and Mistral names, and loading a checkpoint into F32 tensors (any of the
// three layouts, F32/F16/BF16/FP8 data). Every tensor of the file must be consumed and
// every expected one found, so a misnamed or misshapen checkpoint fails with its name
// instead of running with zeros. Not here: writing (save.c), the forward pass (forward.c).
#include "mdl_internal.h"
#include "mdl_quant.h"

#include "../autograd/comm/comm.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

// ---------------------------------------------------------------------------------------
// Allocation

static ag_tensor *wnew(mdl_model *m, int ndim, const int64_t *shape) {
    if (!m->plan_only && (!m->shapes_only || ndim < 2))
        return ag_tensor_new(&m->arena, AG_F32, ndim, shape);
    // a quantizing loader decides later whether this matrix gets F32 data or a qweight
    ag_tensor *t = ag_arena_alloc(&m->arena, sizeof *t);
    if (!t)
        return NULL;
    memset(t, 0, sizeof *t);
    t->dtype = AG_F32;
    t->ndim = ndim;
    t->numel = 1;
    for (int d = 0; d < ndim; d++)
        t->numel *= (t->shape[d] = shape[d]);
    t->arena = &m->arena;
    return t;
}

#define W1(n) wnew(m, 1, (int64_t[]){n})
#define W2(o, i) wnew(m, 2, (int64_t[]){o, i})
#define W3(e, o, i) wnew(m, 3, (int64_t[]){e, o, i})

static bool mlp_alloc(mdl_model *m, mdl_mlp *p, int64_t inner) {
    int64_t H = m->cfg.hidden_size;
    p->gate.w = W2(inner, H);
    p->up.w = W2(inner, H);
    p->down.w = W2(H, inner);
    return p->gate.w && p->up.w && p->down.w;
}

static bool attn_alloc(mdl_model *m, mdl_layer *y) {
    const mcfg *c = &m->cfg;
    int64_t H = c->hidden_size, NH = c->num_attention_heads;
    int64_t dqk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    y->attn_norm = W1(H);
    if (c->q_lora_rank) {
        y->q_a.w = W2(c->q_lora_rank, H);
        y->q_a_norm = W1(c->q_lora_rank);
        y->q_b.w = W2(NH * dqk, c->q_lora_rank);
        if (!y->q_a.w || !y->q_a_norm || !y->q_b.w)
            return false;
    } else if (!(y->q.w = W2(NH * dqk, H)))
        return false;
    y->kv_a.w = W2(c->kv_lora_rank + c->qk_rope_head_dim, H);
    y->kv_a_norm = W1(c->kv_lora_rank);
    y->kv_b.w = W2(NH * (c->qk_nope_head_dim + c->v_head_dim), c->kv_lora_rank);
    y->o.w = W2(H, NH * c->v_head_dim);
    y->mlp_norm = W1(H);
    return y->attn_norm && y->kv_a.w && y->kv_a_norm && y->kv_b.w && y->o.w && y->mlp_norm;
}

static bool layer_alloc(mdl_model *m, int l) {
    const mcfg *c = &m->cfg;
    mdl_layer *y = &m->layers[l];
    y->moe = l >= c->first_k_dense_replace;
    if (!attn_alloc(m, y))
        return false;
    if (!y->moe)
        return mlp_alloc(m, &y->dense, c->intermediate_size);
    int64_t E = c->n_routed_experts, I = c->moe_intermediate_size, H = c->hidden_size;
    int64_t own = m->ep.count; // a shard holds its own experts' stacks only
    y->router.w = W2(E, H);
    y->gate_up = W3(own, 2 * I, H);
    y->down = W3(own, H, I);
    if (!y->router.w || !y->gate_up || !y->down)
        return false;
    return c->n_shared_experts == 0 ||
           mlp_alloc(m, &y->shared, (int64_t)I * c->n_shared_experts);
}

// Rope table, softmax scale and router settings derived from the config.
static molt_status derived_init(mdl_model *m) {
    const mcfg *c = &m->cfg;
    ag_rope_config rc;
    mcfg_rope_config(c, &rc);
    MOLT_TRY(ag_rope_table_init(&m->rope, &rc));
    double dqk = c->qk_nope_head_dim + c->qk_rope_head_dim;
    m->attn_scale = 1 / sqrt(dqk);
    // transformers multiplies by mscale^2 only for YaRN with a non-zero mscale_all_dim
    if (c->rope.yarn && c->rope.mscale_all_dim != 0) {
        double ms = ag_yarn_mscale(c->rope.factor, c->rope.mscale_all_dim);
        m->attn_scale *= ms * ms;
    }
    m->router = (ag_router_config){.top_k = c->num_experts_per_tok,
                                   .n_group = c->n_group,
                                   .topk_group = c->topk_group,
                                   .norm_topk_prob = c->norm_topk_prob,
                                   .scaling = c->routed_scaling_factor};
    return MOLT_OK;
}

molt_status mdl_create(mdl_model *m, const mcfg *cfg) {
    return mdl_create_ex(m, cfg, false, NULL);
}

molt_status mdl_create_plan(mdl_model *m, const mcfg *cfg, int expert_count) {
    memset(m, 0, sizeof *m);
    if (expert_count < 1 || cfg->n_routed_experts % expert_count != 0)
        return molt_err(MOLT_EARG, "model plan: %d experts of %d", expert_count,
                        cfg->n_routed_experts);
    // mdl_create_ex's steps with every tensor shape-only (no weight bytes at all)
    m->cfg = *cfg;
    m->plan_only = true;
    m->ep = (mdl_experts_shard){.comm = NULL, .first = 0, .count = expert_count};
    ag_arena_init(&m->arena, "weights (plan)", 1 << 20);
    const mcfg *c = &m->cfg;
    molt_status st = derived_init(m);
    m->layers = st == MOLT_OK ? molt_calloc((size_t)c->num_hidden_layers, sizeof *m->layers)
                              : NULL;
    bool ok = m->layers && (m->embed = W2(c->vocab_size, c->hidden_size)) != NULL;
    for (int l = 0; ok && l < c->num_hidden_layers; l++)
        ok = layer_alloc(m, l);
    ok = ok && (m->norm = W1(c->hidden_size)) != NULL;
    if (ok)
        m->lm_head.w = c->tie_word_embeddings ? m->embed : W2(c->vocab_size, c->hidden_size);
    if (ok && m->lm_head.w)
        mdl_lin_number(m);
    if (!ok || !m->lm_head.w) {
        mdl_free(m);
        return st != MOLT_OK ? st : molt_err_wrap(MOLT_ENOMEM, "model plan");
    }
    return MOLT_OK;
}

molt_status mdl_experts_range(const mcfg *cfg, ag_comm *experts, mdl_experts_shard *out) {
    int E = cfg->n_routed_experts, P = ag_comm_size(experts), r = ag_comm_rank(experts);
    *out = (mdl_experts_shard){.comm = NULL, .first = 0, .count = E};
    if (!experts || P == 1)
        return MOLT_OK;
    if (E < P || E % P != 0)
        return molt_err(MOLT_EARG, "expert parallelism: %d routed experts do not split evenly "
                        "over %d ranks (parallel.expert must divide n_routed_experts)", E, P);
    *out = (mdl_experts_shard){.comm = experts, .first = r * (E / P), .count = E / P};
    return MOLT_OK;
}

molt_status mdl_create_ex(mdl_model *m, const mcfg *cfg, bool shapes_only, ag_comm *experts) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    ag_arena_init(&m->arena, "weights", 64u << 20);
    const mcfg *c = &m->cfg;
    molt_status st = mdl_experts_range(cfg, experts, &m->ep);
    if (st == MOLT_OK)
        st = derived_init(m);
    if (st != MOLT_OK) {
        mdl_free(m);
        return st;
    }
    m->layers = molt_calloc((size_t)c->num_hidden_layers, sizeof *m->layers);
    bool ok = m->layers != NULL;
    ok = ok && (m->embed = W2(c->vocab_size, c->hidden_size)) != NULL;
    m->shapes_only = shapes_only; // the embeddings always hold data
    for (int l = 0; ok && l < c->num_hidden_layers; l++)
        ok = layer_alloc(m, l);
    ok = ok && (m->norm = W1(c->hidden_size)) != NULL;
    if (ok)
        m->lm_head.w = c->tie_word_embeddings ? m->embed : W2(c->vocab_size, c->hidden_size);
    m->shapes_only = false;
    if (ok && m->lm_head.w)
        mdl_lin_number(m);
    if (!ok || !m->lm_head.w) {
        mdl_free(m);
        return molt_err_wrap(MOLT_ENOMEM, "model weights (%lld parameters)",
                             (long long)mdl_param_count(cfg));
    }
    return MOLT_OK;
}

void mdl_free(mdl_model *m) {
    if (!m)
        return;
    molt_free(m->layers);
    for (int i = 0; i < m->n_qw; i++)
        ag_qweight_free(&m->qw[i]);
    molt_free(m->qw);
    ag_arena_free(&m->arena);
    memset(m, 0, sizeof *m);
}

int64_t mdl_param_count(const mcfg *c) {
    int64_t H = c->hidden_size, NH = c->num_attention_heads, V = c->vocab_size;
    int64_t dqk = c->qk_nope_head_dim + c->qk_rope_head_dim, I = c->moe_intermediate_size;
    int64_t q = c->q_lora_rank ? c->q_lora_rank * (H + 1 + NH * dqk) : NH * dqk * H;
    int64_t attn = 2 * H + q + (c->kv_lora_rank + c->qk_rope_head_dim) * H + c->kv_lora_rank +
                   NH * (c->qk_nope_head_dim + c->v_head_dim) * c->kv_lora_rank +
                   H * NH * c->v_head_dim;
    int64_t dense = 3 * H * (int64_t)c->intermediate_size;
    int64_t moe = c->n_routed_experts * (H + 3 * H * I) + 3 * H * I * c->n_shared_experts;
    int64_t k = c->first_k_dense_replace, L = c->num_hidden_layers;
    return V * H * (c->tie_word_embeddings ? 1 : 2) + H + L * attn + k * dense + (L - k) * moe;
}

// ---------------------------------------------------------------------------------------
// The weight list

typedef struct {
    w_entry *out;
    int n, cap;
} wlist;

static void add(wlist *w, ag_tensor *t, w_kind k, int layer, const char *hf, const char *mi) {
    if (!t)
        return;
    if (w->out && w->n < w->cap)
        w->out[w->n] = (w_entry){t, k, layer, hf, mi};
    w->n++;
}

static void add_mlp(wlist *w, const mdl_mlp *p, int l, bool shared) {
    if (shared) {
        add(w, p->gate.w, W_LINEAR, l, "mlp.shared_experts.gate_proj.weight",
            "shared_experts.w1.weight");
        add(w, p->up.w, W_LINEAR, l, "mlp.shared_experts.up_proj.weight",
            "shared_experts.w3.weight");
        add(w, p->down.w, W_LINEAR, l, "mlp.shared_experts.down_proj.weight",
            "shared_experts.w2.weight");
        return;
    }
    // Mistral's consolidated files of this model have no dense layers; these follow the
    // names of Mistral's dense models.
    add(w, p->gate.w, W_LINEAR, l, "mlp.gate_proj.weight", "feed_forward.w1.weight");
    add(w, p->up.w, W_LINEAR, l, "mlp.up_proj.weight", "feed_forward.w3.weight");
    add(w, p->down.w, W_LINEAR, l, "mlp.down_proj.weight", "feed_forward.w2.weight");
}

static void add_layer(wlist *w, const mdl_layer *y, int l) {
    add(w, y->attn_norm, W_NORM, l, "input_layernorm.weight", "attention_norm.weight");
    add(w, y->q_a.w, W_LINEAR, l, "self_attn.q_a_proj.weight", "attention.wq_a.weight");
    add(w, y->q_a_norm, W_NORM, l, "self_attn.q_a_layernorm.weight", "attention.q_a_norm.weight");
    add(w, y->q_b.w, W_LINEAR, l, "self_attn.q_b_proj.weight", "attention.wq_b.weight");
    add(w, y->q.w, W_LINEAR, l, "self_attn.q_proj.weight", "attention.wq.weight");
    add(w, y->kv_a.w, W_LINEAR, l, "self_attn.kv_a_proj_with_mqa.weight",
        "attention.wkv_a_with_mqa.weight");
    add(w, y->kv_a_norm, W_NORM, l, "self_attn.kv_a_layernorm.weight",
        "attention.kv_a_norm.weight");
    add(w, y->kv_b.w, W_LINEAR, l, "self_attn.kv_b_proj.weight", "attention.wkv_b.weight");
    add(w, y->o.w, W_LINEAR, l, "self_attn.o_proj.weight", "attention.wo.weight");
    add(w, y->mlp_norm, W_NORM, l, "post_attention_layernorm.weight", "ffn_norm.weight");
    if (!y->moe) {
        add_mlp(w, &y->dense, l, false);
        return;
    }
    add(w, y->router.w, W_ROUTER, l, "mlp.gate.weight", "gate.weight");
    add(w, y->gate_up, W_GATE_UP, l, "mlp.experts.gate_up_proj", "experts");
    add(w, y->down, W_DOWN, l, "mlp.experts.down_proj", "experts");
    add_mlp(w, &y->shared, l, true);
}

int mdl_weight_list(const mdl_model *m, w_entry *out, int cap) {
    wlist w = {out, 0, cap};
    add(&w, m->embed, W_EMBED, -1, "embed_tokens.weight", "tok_embeddings.weight");
    for (int l = 0; l < m->cfg.num_hidden_layers; l++)
        add_layer(&w, &m->layers[l], l);
    add(&w, m->norm, W_NORM, -1, "norm.weight", "norm.weight");
    if (m->lm_head.w != m->embed)
        add(&w, m->lm_head.w, W_HEAD, -1, "lm_head.weight", "output.weight");
    return w.n;
}

static const char *const expert_hf_part[3] = {"gate_proj", "up_proj", "down_proj"};
static const char *const expert_mistral_part[3] = {"w1", "w3", "w2"};

void mdl_weight_name(const w_entry *e, mdl_layout layout, bool wrapped, int expert, int part,
                     char *buf, size_t cap) {
    bool experts = e->kind == W_GATE_UP || e->kind == W_DOWN;
    int p = e->kind == W_DOWN ? 2 : part;
    if (layout == MDL_LAYOUT_MISTRAL) {
        if (e->layer < 0)
            snprintf(buf, cap, "%s", e->mistral);
        else if (experts)
            snprintf(buf, cap, "layers.%d.experts.%d.%s.weight", e->layer, expert,
                     expert_mistral_part[p]);
        else
            snprintf(buf, cap, "layers.%d.%s", e->layer, e->mistral);
        return;
    }
    const char *pre = wrapped ? "model.language_model." : "model.";
    if (e->kind == W_HEAD)
        snprintf(buf, cap, "%s", e->hf);
    else if (e->layer < 0)
        snprintf(buf, cap, "%s%s", pre, e->hf);
    else if (experts && layout == MDL_LAYOUT_HF_PER_EXPERT)
        snprintf(buf, cap, "%slayers.%d.mlp.experts.%d.%s.weight", pre, e->layer, expert,
                 expert_hf_part[p]);
    else
        snprintf(buf, cap, "%slayers.%d.%s", pre, e->layer, e->hf);
}

// ---------------------------------------------------------------------------------------
// Loading

#define NAME_CAP 256

struct mdl_loader {
    const st_reader *r;
    bool *used;         // [st_count(r)]
    mdl_layout layout;  // HF (fused or per-expert decided per layer) or Mistral
    bool wrapped;
    const char *label;  // file named in messages
    bool per_expert;    // some layer had one matrix per expert
    int64_t e_first;    // expert stacks: the model holds experts [e_first, e_first + count)
    int64_t e_total;    //   of e_total in the file (0: every expert, as the model's shape)
};
typedef struct mdl_loader loader;

// Index of `name` in the reader (sorted by name), or -1.
static int find(const loader *ld, const char *name) {
    int lo = 0, hi = st_count(ld->r) - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, c = strcmp(st_at(ld->r, mid)->name, name);
        if (c == 0)
            return mid;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return -1;
}

static const char *shape_text(int ndim, const int64_t *shape, char *buf, size_t cap) {
    size_t at = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && at < cap; i++)
        at += (size_t)snprintf(buf + at, cap - at, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (at < cap)
        snprintf(buf + at, cap - at, "]");
    return buf;
}

static bool dtype_ok(st_dtype dt) {
    return dt == ST_F32 || dt == ST_F16 || dt == ST_BF16 || dt == ST_F8_E4M3;
}

// Marks `name` used when present (activation scales: ignored on purpose).
static void take_optional(loader *ld, const char *name) {
    int i = find(ld, name);
    if (i >= 0)
        ld->used[i] = true;
}

// The per-tensor (or per-expert) scale of tensor `name`: *n scales into s[0..n). FP8 data
// must have one; others may (it multiplies all the same).
static molt_status read_scales(loader *ld, const char *name, const st_tensor *t, double *s,
                               int64_t n) {
    char sn[NAME_CAP + 32], an[NAME_CAP + 32];
    size_t len = strlen(name);
    bool dot_weight = len > 7 && strcmp(name + len - 7, ".weight") == 0;
    if (ld->layout == MDL_LAYOUT_MISTRAL) {
        snprintf(sn, sizeof sn, "%.*s.%s", (int)(len - 7), name, MDL_MISTRAL_SCALE);
        snprintf(an, sizeof an, "%.*s.qscale_act", (int)(len - 7), name);
    } else {
        snprintf(sn, sizeof sn, "%s%s", name, MDL_HF_SCALE);
        if (dot_weight)
            snprintf(an, sizeof an, "%.*s.activation_scale", (int)(len - 7), name);
        else
            snprintf(an, sizeof an, "%s_activation_scale", name);
    }
    take_optional(ld, an);
    for (int64_t i = 0; i < n; i++)
        s[i] = 1;
    int i = find(ld, sn);
    if (i < 0) {
        if (t->dtype == ST_F8_E4M3)
            return molt_err(MOLT_EFORMAT, "%s: tensor '%s' is F8_E4M3 but its scale '%s' is "
                            "missing", ld->label, name, sn);
        return MOLT_OK;
    }
    ld->used[i] = true;
    const st_tensor *sc = st_at(ld->r, i);
    if (sc->numel != n && sc->numel != 1) {
        char b[80];
        return molt_err(MOLT_EFORMAT, "%s: scale '%s' has shape %s, expected %lld value%s",
                        ld->label, sn, shape_text(sc->ndim, sc->shape, b, sizeof b),
                        (long long)n, n == 1 ? "" : "s (one per expert)");
    }
    for (int64_t k = 0; k < n; k++) {
        st_tensor one = *sc;
        one.ndim = 0;
        one.numel = 1;
        one.nbytes = st_dtype_size(sc->dtype);
        one.data = (const uint8_t *)sc->data + (sc->numel == 1 ? 0 : k) * one.nbytes;
        molt_status st = st_read_scalar(&one, &s[k]);
        if (st != MOLT_OK)
            return molt_err_wrap(st, "%s: scale '%s'", ld->label, sn);
        if (!isfinite(s[k]))
            return molt_err(MOLT_EFORMAT, "%s: scale '%s' is not finite", ld->label, sn);
    }
    return MOLT_OK;
}

static float decode_one(const st_tensor *t, int64_t i) {
    const uint8_t *p = (const uint8_t *)t->data;
    switch (t->dtype) {
    case ST_F32: {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    case ST_F16: {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return st_decode_f16(h);
    }
    case ST_BF16: {
        uint16_t h;
        memcpy(&h, p + 2 * i, 2);
        return ag_bf16_to_f32(h);
    }
    default: return (float)st_decode_f8_e4m3(p[i]);
    }
}

// dst[0..n) = elements [first, first + n) of t times scale (one rounding to f32).
static molt_status decode(loader *ld, const char *name, const st_tensor *t, int64_t first,
                          int64_t n, double scale, float *dst) {
    for (int64_t i = 0; i < n; i++) {
        double v = (double)decode_one(t, first + i) * scale;
        if (!isfinite(v))
            return molt_err(MOLT_EFORMAT, "%s: tensor '%s' has a non-finite value at element "
                            "%lld", ld->label, name, (long long)(first + i));
        dst[i] = (float)v;
    }
    return MOLT_OK;
}

// Finds a required tensor and checks its dtype and shape.
static molt_status take(loader *ld, const char *name, int ndim, const int64_t *shape,
                        const st_tensor **out) {
    char bw[96], bg[96];
    int i = find(ld, name);
    if (i < 0)
        return molt_err(MOLT_EFORMAT, "%s: missing tensor '%s' (expected shape %s)", ld->label,
                        name, shape_text(ndim, shape, bw, sizeof bw));
    const st_tensor *t = st_at(ld->r, i);
    ld->used[i] = true;
    if (!dtype_ok(t->dtype))
        return molt_err(MOLT_EUNSUPPORTED, "%s: tensor '%s' has dtype %s; supported: F32, F16, "
                        "BF16, F8_E4M3", ld->label, name, st_dtype_name(t->dtype));
    bool same = t->ndim == ndim;
    for (int d = 0; same && d < ndim; d++)
        same = t->shape[d] == shape[d];
    if (!same)
        return molt_err(MOLT_EFORMAT, "%s: tensor '%s' has shape %s, expected %s", ld->label,
                        name, shape_text(t->ndim, t->shape, bg, sizeof bg),
                        shape_text(ndim, shape, bw, sizeof bw));
    *out = t;
    return MOLT_OK;
}

void mdl_loader_expert_span(const mdl_loader *ld, int64_t held, int64_t *n_file,
                            int64_t *first) {
    *n_file = ld->e_total > 0 ? ld->e_total : held;
    *first = ld->e_total > 0 ? ld->e_first : 0;
}

// One whole tensor (2-D weights, norms; fused experts with one scale per expert). Of a
// fused stack only the model's experts are read (their byte range of the file).
static molt_status load_whole(loader *ld, const char *name, ag_tensor *dst) {
    const st_tensor *t;
    int64_t shape[3] = {dst->shape[0], dst->shape[1], dst->shape[2]}, n_file = 1, first = 0;
    if (dst->ndim == 3)
        mdl_loader_expert_span(ld, dst->shape[0], &n_file, &first);
    shape[0] = dst->ndim == 3 ? n_file : shape[0];
    MOLT_TRY(take(ld, name, dst->ndim, shape, &t));
    int64_t n_mat = dst->ndim == 3 ? dst->shape[0] : 1, per = dst->numel / n_mat;
    double *s = molt_malloc((size_t)n_file * sizeof *s);
    if (!s)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", name);
    molt_status st = read_scales(ld, name, t, s, n_file);
    for (int64_t e = 0; st == MOLT_OK && e < n_mat; e++)
        st = decode(ld, name, t, (first + e) * per, per, s[first + e],
                    (float *)dst->data + e * per);
    molt_free(s);
    return st;
}

// One expert matrix [rows, cols] of a per-expert layout into dst at `offset` elements;
// offset < 0: another rank's expert, checked and marked used but not read.
static molt_status load_expert_part(loader *ld, const w_entry *e, int expert, int part,
                                    int64_t rows, int64_t cols, int64_t offset) {
    char name[NAME_CAP];
    mdl_weight_name(e, ld->layout, ld->wrapped, expert, part, name, sizeof name);
    const st_tensor *t;
    MOLT_TRY(take(ld, name, 2, (int64_t[]){rows, cols}, &t));
    double s;
    MOLT_TRY(read_scales(ld, name, t, &s, 1));
    if (offset < 0)
        return MOLT_OK;
    return decode(ld, name, t, 0, rows * cols, s, (float *)e->t->data + offset);
}

static molt_status load_experts_split(loader *ld, const w_entry *e) {
    int64_t held = e->t->shape[0], R = e->t->shape[1], C = e->t->shape[2], E, first;
    mdl_loader_expert_span(ld, held, &E, &first);
    for (int x = 0; x < E; x++) {
        int64_t own = x - first; // index among the model's experts
        bool mine = own >= 0 && own < held;
        if (e->kind == W_DOWN) {
            MOLT_TRY(load_expert_part(ld, e, x, 0, R, C, mine ? own * R * C : -1));
            continue;
        }
        for (int part = 0; part < 2; part++) // gate rows first, then up
            MOLT_TRY(load_expert_part(ld, e, x, part, R / 2, C,
                                      mine ? (own * R + part * R / 2) * C : -1));
    }
    return MOLT_OK;
}

static molt_status load_entry(loader *ld, const w_entry *e, bool *per_expert) {
    char name[NAME_CAP];
    bool experts = e->kind == W_GATE_UP || e->kind == W_DOWN;
    if (experts && ld->layout != MDL_LAYOUT_MISTRAL) {
        // fused when the fused name is present, else one matrix per expert
        mdl_weight_name(e, MDL_LAYOUT_HF, ld->wrapped, 0, 0, name, sizeof name);
        if (find(ld, name) < 0) {
            loader per = *ld;
            per.layout = MDL_LAYOUT_HF_PER_EXPERT;
            char alt[NAME_CAP];
            mdl_weight_name(e, per.layout, ld->wrapped, 0, 0, alt, sizeof alt);
            if (find(ld, alt) < 0)
                return molt_err(MOLT_EFORMAT, "%s: missing tensor '%s' (nor per-expert '%s', "
                                "...)", ld->label, name, alt);
            *per_expert = true;
            return load_experts_split(&per, e);
        }
        return load_whole(ld, name, e->t);
    }
    if (experts)
        return load_experts_split(ld, e);
    mdl_weight_name(e, ld->layout, ld->wrapped, 0, 0, name, sizeof name);
    return load_whole(ld, name, e->t);
}

static const char *const vision_prefixes[] = {
    "model.vision_tower.", "model.multi_modal_projector.", "vision_encoder.",
    "vision_language_adapter.", "patch_merger.", "pre_mm_projector_norm."};

// Every tensor of the file must have been consumed (a wrapper's vision tower excepted).
static molt_status check_unused(const loader *ld) {
    int n = st_count(ld->r), bad = 0, shown = 0;
    char list[600] = "";
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        const char *nm = st_at(ld->r, i)->name;
        bool vision = false;
        for (size_t k = 0; k < sizeof vision_prefixes / sizeof *vision_prefixes; k++)
            vision |= strncmp(nm, vision_prefixes[k], strlen(vision_prefixes[k])) == 0;
        if (ld->used[i] || (vision && (ld->wrapped || ld->layout == MDL_LAYOUT_MISTRAL)))
            continue;
        if (shown < 4 && at < sizeof list - 1) {
            at += (size_t)snprintf(list + at, sizeof list - at, "%s'%s'", shown ? ", " : "", nm);
            shown++;
        }
        bad++;
    }
    if (bad == 0)
        return MOLT_OK;
    return molt_err(MOLT_EFORMAT, "%s: %d unexpected tensor%s: %s%s", ld->label, bad,
                    bad == 1 ? "" : "s", list, bad > shown ? ", ..." : "");
}

// Layout from the names of the embeddings (or the first layer's norm).
static void detect_layout(loader *ld) {
    ld->layout = MDL_LAYOUT_HF;
    ld->wrapped = false;
    if (find(ld, "tok_embeddings.weight") >= 0 || find(ld, "layers.0.attention_norm.weight") >= 0)
        ld->layout = MDL_LAYOUT_MISTRAL;
    else if (find(ld, "model.language_model.embed_tokens.weight") >= 0 ||
             find(ld, "model.language_model.layers.0.input_layernorm.weight") >= 0)
        ld->wrapped = true;
}

molt_status mdl_loader_new(const st_reader *r, mdl_loader **out) {
    *out = NULL;
    loader *ld = molt_calloc(1, sizeof *ld);
    if (ld)
        ld->used = molt_calloc((size_t)st_count(r) + 1, sizeof(bool));
    if (!ld || !ld->used) {
        molt_free(ld);
        return molt_err(MOLT_ENOMEM, "loading weights: out of memory");
    }
    ld->r = r;
    ld->label = st_shard_count(r) > 0 ? st_shard_path(r, 0) : "checkpoint";
    detect_layout(ld);
    *out = ld;
    return MOLT_OK;
}

void mdl_loader_experts(mdl_loader *ld, const mdl_experts_shard *sh, int64_t n_experts) {
    ld->e_first = sh && sh->comm ? sh->first : 0;
    ld->e_total = sh && sh->comm ? n_experts : 0;
}

void mdl_loader_free(mdl_loader *ld) {
    if (ld)
        molt_free(ld->used);
    molt_free(ld);
}

molt_status mdl_loader_entry(mdl_loader *ld, const w_entry *e) {
    return load_entry(ld, e, &ld->per_expert);
}

const char *mdl_loader_label(const mdl_loader *ld) { return ld->label; }
mdl_layout mdl_loader_layout(const mdl_loader *ld) { return ld->layout; }
bool mdl_loader_wrapped(const mdl_loader *ld) { return ld->wrapped; }

const st_tensor *mdl_loader_take(mdl_loader *ld, const char *name) {
    int i = find(ld, name);
    if (i < 0)
        return NULL;
    ld->used[i] = true;
    return st_at(ld->r, i);
}

// Raw E4M3 codes of one file tensor (already validated by load_entry) into dst, and its
// per-tensor scale into one scale per row of its `rows` rows.
static molt_status fp8_part(loader *ld, const char *name, int64_t rows, int64_t per_row,
                            uint8_t *dst, float *row_scale, bool *is_fp8) {
    int i = find(ld, name);
    const st_tensor *t = i >= 0 ? st_at(ld->r, i) : NULL;
    if (!t || t->dtype != ST_F8_E4M3) {
        *is_fp8 = false;
        return MOLT_OK;
    }
    double s;
    MOLT_TRY(read_scales(ld, name, t, &s, 1));
    memcpy(dst, t->data, (size_t)(rows * per_row));
    for (int64_t r = 0; r < rows; r++)
        row_scale[r] = (float)s;
    return MOLT_OK;
}

molt_status mdl_loader_fp8(mdl_loader *ld, const w_entry *e, uint8_t *codes, float *row_scale,
                           bool *is_fp8) {
    char name[NAME_CAP];
    const ag_tensor *w = e->t;
    bool experts = e->kind == W_GATE_UP || e->kind == W_DOWN;
    int64_t n_mat = experts ? w->shape[0] : 1, R = w->shape[w->ndim - 2];
    int64_t C = w->shape[w->ndim - 1], n_file = n_mat, first = 0;
    if (experts)
        mdl_loader_expert_span(ld, n_mat, &n_file, &first);
    *is_fp8 = true;
    mdl_weight_name(e, ld->layout == MDL_LAYOUT_MISTRAL ? ld->layout : MDL_LAYOUT_HF,
                    ld->wrapped, 0, 0, name, sizeof name);
    int i = find(ld, name);
    if (!experts || (ld->layout != MDL_LAYOUT_MISTRAL && i >= 0)) {
        const st_tensor *t = i >= 0 ? st_at(ld->r, i) : NULL;
        if (!t || t->dtype != ST_F8_E4M3) {
            *is_fp8 = false;
            return MOLT_OK;
        }
        double *s = molt_malloc((size_t)n_file * sizeof *s);
        if (!s)
            return molt_err(MOLT_ENOMEM, "%s: out of memory", name);
        molt_status st = read_scales(ld, name, t, s, n_file);
        for (int64_t m = 0; st == MOLT_OK && m < n_mat; m++)
            for (int64_t r = 0; r < R; r++)
                row_scale[m * R + r] = (float)s[first + m];
        molt_free(s);
        if (st == MOLT_OK) // a shard's experts: their byte range of the stack
            memcpy(codes, (const uint8_t *)t->data + first * R * C, (size_t)w->numel);
        return st;
    }
    mdl_layout lay = ld->layout == MDL_LAYOUT_MISTRAL ? ld->layout : MDL_LAYOUT_HF_PER_EXPERT;
    int parts = e->kind == W_GATE_UP ? 2 : 1;
    int64_t rows = R / parts;
    for (int64_t x = 0; *is_fp8 && x < n_mat; x++)
        for (int p = 0; *is_fp8 && p < parts; p++) {
            mdl_weight_name(e, lay, ld->wrapped, (int)(first + x), p, name, sizeof name);
            int64_t r0 = x * R + p * rows;
            MOLT_TRY(fp8_part(ld, name, rows, C, codes + r0 * C, row_scale + r0, is_fp8));
        }
    return MOLT_OK;
}

molt_status mdl_loader_finish(mdl_loader *ld, mdl_model *m) {
    if (m->lm_head.w == m->embed) // tied: a saved copy is allowed
        take_optional(ld, ld->layout == MDL_LAYOUT_MISTRAL ? "output.weight" : "lm_head.weight");
    MOLT_TRY(check_unused(ld));
    m->layout = ld->layout == MDL_LAYOUT_HF && ld->per_expert ? MDL_LAYOUT_HF_PER_EXPERT
                                                              : ld->layout;
    m->wrapped = ld->wrapped;
    return MOLT_OK;
}

molt_status mdl_load_weights(mdl_model *m, const st_reader *r) {
    int n = mdl_weight_list(m, NULL, 0);
    w_entry *list = molt_malloc((size_t)n * sizeof *list);
    mdl_loader *ld = NULL;
    molt_status st = list ? mdl_loader_new(r, &ld)
                          : molt_err(MOLT_ENOMEM, "loading weights: out of memory");
    if (st == MOLT_OK) {
        mdl_weight_list(m, list, n);
        mdl_loader_experts(ld, &m->ep, m->cfg.n_routed_experts);
    }
    for (int i = 0; st == MOLT_OK && i < n; i++)
        st = mdl_loader_entry(ld, &list[i]);
    if (st == MOLT_OK)
        st = mdl_loader_finish(ld, m);
    mdl_loader_free(ld);
    molt_free(list);
    return st;
}

static bool file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

// Opens the weights of dir: sharded index, single HF file, or Mistral's consolidated file.
molt_status mdl_open_weights(const char *dir, st_reader **r) {
    static const char *const names[] = {"model.safetensors.index.json", "model.safetensors",
                                        "consolidated.safetensors.index.json",
                                        "consolidated.safetensors"};
    char path[4096];
    for (int i = 0; i < 4; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (file_exists(path))
            return i % 2 == 0 ? st_open_index(path, r) : st_open(path, r);
    }
    return molt_err(MOLT_EIO, "%s: no model.safetensors, model.safetensors.index.json or "
                    "consolidated.safetensors", dir);
}

molt_status mdl_check_dir(const char *dir) {
    struct stat sb;
    if (stat(dir, &sb) != 0)
        return molt_err(MOLT_EIO, "model directory %s: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return molt_err(MOLT_EARG, "model directory %s is not a directory (give the directory "
                        "holding config.json and the weights)", dir);
    return MOLT_OK;
}

molt_status mdl_load(const char *dir, mdl_model *m) {
    char path[4096];
    mcfg cfg;
    memset(m, 0, sizeof *m);
    MOLT_TRY(mdl_check_dir(dir));
    snprintf(path, sizeof path, "%s/config.json", dir);
    MOLT_TRY(mcfg_load(path, &cfg));
    st_reader *r = NULL;
    MOLT_TRY(mdl_open_weights(dir, &r));
    if (st_metadata(r, MDL_QUANT_META)) {
        st_close(r);
        return molt_err(MOLT_EUNSUPPORTED, "%s holds a pre-quantized checkpoint (written by molt "
                        "quantize, %s): load it with mdl_load_quant, which keeps its "
                        "quantization, then mdl_dequantize for F32 weights", dir, MDL_QUANT_META);
    }
    molt_status st = mdl_create(m, &cfg);
    if (st == MOLT_OK)
        st = mdl_load_weights(m, r);
    st_close(r);
    if (st != MOLT_OK)
        mdl_free(m);
    return st;
}
