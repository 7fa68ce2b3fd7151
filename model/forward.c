// model/forward.c: the Mistral 4 forward pass assembled from autograd ops, exactly the
// order of SPECS.md sections 2 and 3 (transformers' modeling_mistral4): MLA attention with
// the low-rank query path, the shared rotary key, interleaved RoPE with YaRN frequencies,
// the llama-4 query temperature and the YaRN-scaled softmax; routed experts with the
// softmax router plus the shared expert; dense layers below first_k_dense_replace; final
// norm and the untied lm_head. The same code serves training (grad mode on) and inference.
// The steps are exported one by one so a KV cache can reuse them. Quantized base weights
// (mdl_lin.qw, the layer's expert qweights) go through ag_linear_q / ag_moe_experts_q. Not
// here: the cache, sampling, adapters' storage, the quantized formats and their loading.
#include "mdl_internal.h"

#include <math.h>
#include <string.h>

// Loss chunk over the vocabulary: bounds the [T, chunk] scratch of the fused loss.
#define MDL_CE_CHUNK 8192

// y plus the bank's adapters on this linear, one per row of x by the route's slots (y
// itself when the bank has none here; the terms go into y in place outside grad mode).
static ag_tensor *bank_terms(ag_ctx *c, ag_tensor *x, ag_tensor *y, const mdl_lin *lin,
                             const mdl_route *r) {
    const mdl_bank *b = r->bank;
    if (lin->id < 0 || lin->id >= b->n_lins || b->lin_users[lin->id] == 0)
        return y;
    int64_t out = lin->w ? lin->w->shape[0] : lin->qw->rows;
    ag_tensor *d = ag_lora_multi_rows(c, x, r->slot, b->n_slots,
                                      &b->lin[(size_t)lin->id * b->n_slots], out, r->bx, y);
    return !d || d == y ? d : ag_add(c, y, d);
}

ag_tensor *mdl_linear_r(ag_ctx *c, ag_tensor *x, const mdl_lin *lin, const mdl_route *r) {
    if (!lin || (!lin->w && !lin->qw)) {
        molt_err(MOLT_EARG, "mdl_linear: no weight");
        return NULL;
    }
    // a quantized base: the adapter below still sees the un-quantized activations x
    // a packed head multiplies on AMX (mdl_pack_head)
    ag_tensor *y = lin->qw && r && r->bx ? ag_linear_q_rows(c, x, lin->qw, r->bx)
                   : lin->qw                ? ag_linear_q(c, x, lin->qw)
                   : lin->bx                ? ag_linear_bx(c, x, lin->bx)
                                            : ag_linear(c, x, lin->w);
    if (y && r && r->bank) {
        if (lin->lora_a) {
            molt_err(MOLT_EARG, "mdl_linear: a bank of adapters on a model that carries one");
            return NULL;
        }
        return bank_terms(c, x, y, lin, r);
    }
    if (!y || !lin->lora_a)
        return y;
    if (!lin->lora_b) {
        molt_err(MOLT_EARG, "mdl_linear: lora_a without lora_b");
        return NULL;
    }
    // LoRA dropout acts on the adapter's input only, and only while training
    ag_tensor *xa = x;
    if (c->grad_mode && lin->lora_rng && lin->lora_dropout > 0)
        xa = ag_dropout(c, x, lin->lora_dropout, lin->lora_rng);
    ag_tensor *d = ag_linear(c, ag_linear(c, xa, lin->lora_a), lin->lora_b);
    return d ? ag_add(c, y, ag_scale(c, d, lin->lora_scale)) : NULL;
}

ag_tensor *mdl_linear(ag_ctx *c, ag_tensor *x, const mdl_lin *lin) {
    return mdl_linear_r(c, x, lin, NULL);
}

// ---------------------------------------------------------------------------------------
// Batch checks and per-batch inputs

static molt_status check_i32_vec(const char *what, const ag_tensor *t, int64_t T) {
    if (!t || t->dtype != AG_I32 || t->ndim != 1 || t->shape[0] != T) {
        char b[80];
        return molt_err(MOLT_EARG, "model batch: %s is %s, expected I32 [%lld]", what,
                        t ? ag_shape_str(t, b, sizeof b) : "NULL", (long long)T);
    }
    return MOLT_OK;
}

static molt_status check_batch(const mdl_model *m, const mdl_batch *b) {
    if (!b || !b->ids)
        return molt_err(MOLT_EARG, "model batch: ids is NULL");
    int64_t T = b->ids->numel;
    if (T < 1)
        return molt_err(MOLT_EARG, "model batch: no tokens");
    MOLT_TRY(check_i32_vec("ids", b->ids, T));
    MOLT_TRY(check_i32_vec("pos", b->pos, T));
    MOLT_TRY(check_i32_vec("seg", b->seg, T));
    const int32_t *id = b->ids->data, *p = b->pos->data;
    for (int64_t t = 0; t < T; t++) {
        if (id[t] < 0 || id[t] >= m->cfg.vocab_size)
            return molt_err(MOLT_EARG, "model batch: ids[%lld] = %d is outside the vocabulary "
                            "[0, %d)", (long long)t, (int)id[t], m->cfg.vocab_size);
        if (p[t] < 0)
            return molt_err(MOLT_EARG, "model batch: pos[%lld] = %d is negative", (long long)t,
                            (int)p[t]);
    }
    if (b->targets)
        MOLT_TRY(check_i32_vec("targets", b->targets, T));
    if (b->mask && (b->mask->dtype != AG_F32 || b->mask->ndim != 1 || b->mask->shape[0] != T))
        return molt_err(MOLT_EARG, "model batch: mask must be F32 [%lld]", (long long)T);
    return MOLT_OK;
}

molt_status mdl_attn_inputs(ag_ctx *c, const mdl_model *m, const mdl_batch *b,
                            mdl_attn_in *out) {
    MOLT_TRY(check_batch(m, b));
    *out = (mdl_attn_in){.pos = b->pos, .seg = b->seg};
    double beta = m->cfg.rope.llama_4_scaling_beta;
    double orig = m->cfg.rope.original_max_position_embeddings;
    if (beta == 0 || !(orig > 0))
        return MOLT_OK;
    int64_t T = b->pos->numel;
    ag_tensor *qt = ag_tensor_new1(&c->act, AG_F32, T);
    if (!qt)
        return molt_err_wrap(MOLT_ENOMEM, "query temperature");
    const int32_t *p = b->pos->data;
    float *q = qt->data;
    // 1 + beta ln(1 + floor(pos / orig)), in f32 like the reference
    for (int64_t t = 0; t < T; t++) {
        float f = floorf((float)p[t] / (float)orig);
        q[t] = 1.0f + (float)beta * logf(1.0f + f);
    }
    out->qtemp = qt;
    return MOLT_OK;
}

ag_tensor *mdl_embed(ag_ctx *c, const mdl_model *m, ag_tensor *ids) {
    return ag_embedding(c, m->embed, ids);
}

// ---------------------------------------------------------------------------------------
// Attention

static const mdl_layer *layer_at(const mdl_model *m, int l) {
    if (l < 0 || l >= m->cfg.num_hidden_layers) {
        molt_err(MOLT_EARG, "model: layer %d out of range [0, %d)", l, m->cfg.num_hidden_layers);
        return NULL;
    }
    return &m->layers[l];
}

ag_tensor *mdl_attn_query_r(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, ag_tensor *pos,
                            const mdl_route *r) {
    const mdl_layer *y = layer_at(m, l);
    if (!y || !x)
        return NULL;
    const mcfg *cf = &m->cfg;
    ag_tensor *q;
    if (y->q_a.w) {
        ag_tensor *qa = ag_rmsnorm(c, mdl_linear_r(c, x, &y->q_a, r), y->q_a_norm,
                                   cf->rms_norm_eps);
        q = mdl_linear_r(c, qa, &y->q_b, r);
    } else
        q = mdl_linear_r(c, x, &y->q, r);
    if (!q)
        return NULL;
    int64_t dqk = cf->qk_nope_head_dim + cf->qk_rope_head_dim;
    q = ag_reshape(c, q, 3, (int64_t[]){x->shape[0], cf->num_attention_heads, dqk});
    // the rotary part is the last DR dims of each head: rotated in place in the copy
    return q ? ag_rope(c, q, pos, &m->rope, cf->qk_nope_head_dim) : NULL;
}

ag_tensor *mdl_attn_query(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, ag_tensor *pos) {
    return mdl_attn_query_r(c, m, l, x, pos, NULL);
}

molt_status mdl_attn_latent_r(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x,
                              ag_tensor *pos, const mdl_route *r, ag_tensor **latent,
                              ag_tensor **k_rot) {
    const mdl_layer *y = layer_at(m, l);
    if (!y)
        return MOLT_EARG;
    const mcfg *cf = &m->cfg;
    ag_tensor *ckv = mdl_linear_r(c, x, &y->kv_a, r), *parts[2];
    // rotating the whole row's tail first is the same as splitting first
    ckv = ckv ? ag_rope(c, ckv, pos, &m->rope, cf->kv_lora_rank) : NULL;
    if (!ckv)
        return MOLT_EARG;
    int64_t sizes[2] = {cf->kv_lora_rank, cf->qk_rope_head_dim};
    MOLT_TRY(ag_split(c, ckv, 1, 2, sizes, parts));
    *latent = ag_rmsnorm(c, parts[0], y->kv_a_norm, cf->rms_norm_eps);
    *k_rot = parts[1];
    return *latent ? MOLT_OK : MOLT_EARG;
}

molt_status mdl_attn_latent(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, ag_tensor *pos,
                            ag_tensor **latent, ag_tensor **k_rot) {
    return mdl_attn_latent_r(c, m, l, x, pos, NULL, latent, k_rot);
}

molt_status mdl_attn_expand_r(ag_ctx *c, const mdl_model *m, int l, ag_tensor *latent,
                              ag_tensor *k_rot, const mdl_route *r, ag_tensor **key,
                              ag_tensor **value) {
    const mdl_layer *y = layer_at(m, l);
    if (!y || !latent || !k_rot)
        return MOLT_EARG;
    const mcfg *cf = &m->cfg;
    int64_t S = latent->shape[0], NH = cf->num_attention_heads, DN = cf->qk_nope_head_dim;
    ag_tensor *kv = mdl_linear_r(c, latent, &y->kv_b, r), *kvp[2];
    kv = kv ? ag_reshape(c, kv, 3, (int64_t[]){S, NH, DN + cf->v_head_dim}) : NULL;
    if (!kv)
        return MOLT_EARG;
    // per head: DN rows of k_nope, then DV rows of the value
    MOLT_TRY(ag_split(c, kv, 2, 2, (int64_t[]){DN, cf->v_head_dim}, kvp));
    ag_tensor *kr = ag_reshape(c, k_rot, 3, (int64_t[]){S, 1, cf->qk_rope_head_dim});
    ag_tensor *kparts[2] = {kvp[0], kr ? ag_expand(c, kr, 1, NH) : NULL};
    *key = kparts[1] ? ag_concat(c, 2, kparts, 2) : NULL;
    *value = kvp[1];
    return *key ? MOLT_OK : MOLT_EARG;
}

molt_status mdl_attn_expand(ag_ctx *c, const mdl_model *m, int l, ag_tensor *latent,
                            ag_tensor *k_rot, ag_tensor **key, ag_tensor **value) {
    return mdl_attn_expand_r(c, m, l, latent, k_rot, NULL, key, value);
}

ag_tensor *mdl_attn_out_r(ag_ctx *c, const mdl_model *m, int l, ag_tensor *att,
                          const mdl_route *r) {
    const mdl_layer *y = layer_at(m, l);
    if (!y || !att)
        return NULL;
    int64_t hv = (int64_t)m->cfg.num_attention_heads * m->cfg.v_head_dim;
    ag_tensor *flat = ag_reshape(c, att, 2, (int64_t[]){att->shape[0], hv});
    return flat ? mdl_linear_r(c, flat, &y->o, r) : NULL;
}

ag_tensor *mdl_attn_out(ag_ctx *c, const mdl_model *m, int l, ag_tensor *att) {
    return mdl_attn_out_r(c, m, l, att, NULL);
}

ag_tensor *mdl_attention(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x,
                         const mdl_attn_in *a) {
    ag_tensor *query = mdl_attn_query(c, m, l, x, a->pos), *latent, *k_rot, *key, *value;
    if (!query || mdl_attn_latent(c, m, l, x, a->pos, &latent, &k_rot) != MOLT_OK ||
        mdl_attn_expand(c, m, l, latent, k_rot, &key, &value) != MOLT_OK)
        return NULL;
    ag_tensor *att = ag_attention(c, query, key, value, a->seg, a->qtemp, m->attn_scale);
    return mdl_attn_out(c, m, l, att);
}

// ---------------------------------------------------------------------------------------
// Feed-forward

static ag_tensor *mlp(ag_ctx *c, const mdl_mlp *p, ag_tensor *x, const mdl_route *r) {
    ag_tensor *act = ag_swiglu(c, mdl_linear_r(c, x, &p->gate, r), mdl_linear_r(c, x, &p->up, r));
    return act ? mdl_linear_r(c, act, &p->down, r) : NULL;
}

// Routed experts under a bank: every token's adapter through ag_moe_experts_multi (also when
// no adapter has expert LoRA here: its products are batch-invariant); without a bank, the
// base's quantized experts with prompt rows marked for the bf16 pairs.
static ag_tensor *experts_banked(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x,
                                 ag_tensor *w, ag_tensor *idx, const mdl_route *r) {
    const mdl_layer *y = &m->layers[l];
    if (y->experts_lora.a_gate_up || y->experts_lora.a_down) {
        molt_err(MOLT_EARG, "model layer %d: a bank of adapters on a model that carries one", l);
        return NULL;
    }
    ag_expert_stacks st = y->gate_up_q ? (ag_expert_stacks){NULL, NULL, y->gate_up_q, y->down_q}
                                       : (ag_expert_stacks){y->gate_up, y->down, NULL, NULL};
    const mdl_bank *b = r->bank;
    if (!b) // prompt rows on the bf16 pairs, no adapters
        return ag_moe_experts_multi_rows(c, x, w, idx, &st, r->slot, 0, NULL, r->bx);
    return ag_moe_experts_multi_rows(c, x, w, idx, &st, r->slot, b->n_slots,
                                     &b->experts[(size_t)l * b->n_slots], r->bx);
}

// The model's own routed experts on rows x with weights w and expert indices idx (into the
// experts this model holds).
static ag_tensor *experts_here(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, ag_tensor *w,
                               ag_tensor *idx, const mdl_route *r) {
    const mdl_layer *y = &m->layers[l];
    const ag_expert_lora *el = &y->experts_lora;
    bool elora = el->a_gate_up || el->a_down;
    if (r && (r->bank || (r->bx && y->gate_up_q && !elora)))
        return experts_banked(c, m, l, x, w, idx, r);
    if (elora && y->gate_up_q) // QLoRA: adapters over the frozen quantized experts
        return ag_moe_experts_lora_q(c, x, w, idx, y->gate_up_q, y->down_q, el);
    if (elora)
        return ag_moe_experts_lora(c, x, w, idx, y->gate_up, y->down, el);
    if (y->gate_up_q)
        return ag_moe_experts_q(c, x, w, idx, y->gate_up_q, y->down_q);
    return ag_moe_experts(c, x, w, idx, y->gate_up, y->down);
}

static bool needs_grad(const ag_tensor *t) { return t && t->requires_grad; }

// Routed experts spread over the expert group (expert parallelism): the rows go to the
// experts' owners, this rank runs its experts on the rows it receives (unweighted; with a
// bank, each row under its token's adapter slot, carried as the row's tag), the results come
// back weighted. x NULL: this rank has no tokens and only serves its experts (its dtype and
// width from `like`).
ag_tensor *mdl_experts_parallel(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, ag_tensor *w,
                                ag_tensor *idx, const mdl_route *r, ag_tensor *like) {
    const mdl_layer *y = &m->layers[l];
    ag_ep_route *rt = ag_ep_route_new(c, m->ep.comm, x ? idx : NULL,
                                      x && r && r->bank ? r->slot : NULL,
                                      m->cfg.n_routed_experts);
    ag_tensor *xr = rt ? ag_ep_dispatch(c, rt, x ? x : like) : NULL;
    if (!xr)
        return NULL;
    int64_t n = ag_ep_route_rows(rt);
    ag_tensor *out;
    if (n > 0) {
        ag_tensor *ones = ag_tensor_new2(&c->act, xr->dtype, n, 1);
        if (!ones)
            return NULL;
        for (int64_t i = 0; i < n; i++)
            ag_set(ones, i, 1.0);
        mdl_route here = {.bank = r ? r->bank : NULL, .slot = ag_ep_route_tags(rt)};
        out = experts_here(c, m, l, xr, ones, ag_ep_route_local_idx(rt), r ? &here : NULL);
    } else {
        // nothing routed here: a placeholder marked as the experts' output would be, so that
        // every rank records the combine alike
        out = ag_tensor_new2(&c->act, xr->dtype, 1, xr->shape[1]);
        const ag_expert_lora *el = &y->experts_lora;
        if (out && c->grad_mode)
            out->requires_grad = needs_grad(xr) || needs_grad(el->a_gate_up) ||
                                 needs_grad(el->b_gate_up) || needs_grad(el->a_down) ||
                                 needs_grad(el->b_down);
    }
    return out ? ag_ep_combine(c, rt, out, x ? w : NULL) : NULL;
}

ag_tensor *mdl_ffn_r(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, const mdl_route *r) {
    const mdl_layer *y = layer_at(m, l);
    if (!y || !x)
        return NULL;
    if (!y->moe)
        return mlp(c, &y->dense, x, r);
    ag_tensor *idx = NULL, *logits = mdl_linear_r(c, x, &y->router, r);
    ag_tensor *w = logits ? ag_moe_router(c, logits, &m->router, &idx) : NULL;
    ag_tensor *routed;
    if (!w)
        routed = NULL;
    else if (m->ep.comm)
        routed = mdl_experts_parallel(c, m, l, x, w, idx, r, NULL);
    else
        routed = experts_here(c, m, l, x, w, idx, r);
    if (!routed || !y->shared.gate.w)
        return routed;
    ag_tensor *shared = mlp(c, &y->shared, x, r);
    return shared ? ag_add(c, routed, shared) : NULL;
}

molt_status mdl_serve_experts(ag_ctx *c, const mdl_model *m, const mdl_bank *bank) {
    if (!m->ep.comm)
        return molt_err(MOLT_EARG, "serve experts: the model holds every expert (no expert "
                        "group)");
    bool grad = c->grad_mode;
    ag_ctx_set_grad(c, false);
    ag_tensor *like = ag_tensor_new2(&c->act, AG_F32, 1, m->cfg.hidden_size);
    mdl_route served = {.bank = bank, .slot = NULL}; // the rows' slots come with them
    molt_status st = like ? MOLT_OK : molt_err_wrap(MOLT_ENOMEM, "serve experts");
    for (int l = 0; st == MOLT_OK && l < m->cfg.num_hidden_layers; l++)
        if (m->layers[l].moe && !mdl_experts_parallel(c, m, l, NULL, NULL, NULL,
                                                      bank ? &served : NULL, like))
            st = molt_err_wrap(MOLT_EIO, "serve experts of layer %d", l);
    ag_ctx_set_grad(c, grad);
    return st;
}

ag_tensor *mdl_ffn(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x) {
    return mdl_ffn_r(c, m, l, x, NULL);
}

ag_tensor *mdl_layer_forward(ag_ctx *c, const mdl_model *m, int l, ag_tensor *h,
                             const mdl_attn_in *a) {
    const mdl_layer *y = layer_at(m, l);
    if (!y || !h)
        return NULL;
    double eps = m->cfg.rms_norm_eps;
    ag_tensor *att = mdl_attention(c, m, l, ag_rmsnorm(c, h, y->attn_norm, eps), a);
    h = att ? ag_add(c, h, att) : NULL;
    ag_tensor *f = h ? mdl_ffn(c, m, l, ag_rmsnorm(c, h, y->mlp_norm, eps)) : NULL;
    return f ? ag_add(c, h, f) : NULL;
}

// ---------------------------------------------------------------------------------------
// Whole model

// What a checkpointed layer needs to run again in backward; lives in the activation arena,
// so it outlives the tape.
typedef struct {
    const mdl_model *m;
    int l;
    mdl_attn_in a;
} layer_job;

static ag_tensor *layer_job_run(ag_ctx *c, ag_tensor *const *in, void *user) {
    const layer_job *j = user;
    return mdl_layer_forward(c, j->m, j->l, in[0], &j->a);
}

// Adds lin's dropout stream to rngs[0..*n) unless already there; false when full.
static bool add_rng(const mdl_lin *lin, ag_rng **rngs, int *n) {
    if (!lin->lora_rng)
        return true;
    for (int i = 0; i < *n; i++)
        if (rngs[i] == lin->lora_rng)
            return true;
    if (*n == AG_CKPT_MAX_RNG)
        return false;
    rngs[(*n)++] = lin->lora_rng;
    return true;
}

// The distinct LoRA-dropout generators a layer draws from, for the recomputation to replay
// (-1 when there are more than a checkpoint can hold).
static int layer_rngs(const mdl_layer *y, ag_rng **rngs) {
    const mdl_lin *lins[] = {&y->q_a, &y->q_b, &y->q, &y->kv_a, &y->kv_b, &y->o,
                             &y->dense.gate, &y->dense.up, &y->dense.down, &y->router,
                             &y->shared.gate, &y->shared.up, &y->shared.down};
    int n = 0;
    for (size_t i = 0; i < sizeof lins / sizeof lins[0]; i++)
        if (!add_rng(lins[i], rngs, &n))
            return -1;
    return n;
}

// mdl_layer_forward under ag_checkpoint: only the layer's output is kept for backward.
static ag_tensor *layer_checkpointed(ag_ctx *c, const mdl_model *m, int l, ag_tensor *h,
                                     const mdl_attn_in *a) {
    const mdl_layer *y = layer_at(m, l);
    layer_job *j = y ? ag_arena_alloc(&c->act, sizeof *j) : NULL;
    if (!j)
        return NULL;
    *j = (layer_job){.m = m, .l = l, .a = *a};
    ag_rng *rngs[AG_CKPT_MAX_RNG];
    int n_rng = layer_rngs(y, rngs);
    if (n_rng < 0) {
        molt_err(MOLT_EUNSUPPORTED, "model layer %d: more than %d LoRA-dropout generators to "
                 "replay under activation checkpointing", l, AG_CKPT_MAX_RNG);
        return NULL;
    }
    return ag_checkpoint(c, layer_job_run, j, 1, &h, n_rng, rngs);
}

molt_status mdl_hidden(ag_ctx *c, const mdl_model *m, const mdl_batch *b, ag_tensor **hidden) {
    mdl_attn_in a;
    MOLT_TRY(mdl_attn_inputs(c, m, b, &a));
    ag_tensor *h = mdl_embed(c, m, b->ids);
    bool ckpt = m->checkpoint_layers && c->grad_mode;
    for (int l = 0; h && l < m->cfg.num_hidden_layers; l++) {
        if (ag_interrupt_pending()) // a stop request is acted on between layers
            return molt_err(MOLT_EINTERRUPTED, "model forward: interrupted before layer %d", l);
        h = ckpt ? layer_checkpointed(c, m, l, h, &a) : mdl_layer_forward(c, m, l, h, &a);
    }
    *hidden = h ? ag_rmsnorm(c, h, m->norm, m->cfg.rms_norm_eps) : NULL;
    if (!*hidden) // an op that gave up on a stop request says interrupted
        return molt_err_wrap(ag_interrupt_pending() ? MOLT_EINTERRUPTED : MOLT_EARG,
                             "model forward");
    return MOLT_OK;
}

ag_tensor *mdl_logits(ag_ctx *c, const mdl_model *m, ag_tensor *hidden) {
    return mdl_linear(c, hidden, &m->lm_head);
}

// The chunked loss over lm_head's logits; with a LoRA on lm_head its low-rank term
// h2 = scale * dropout(h) A^T [T, r] against B [V, r] joins inside the chunks (the same
// adapter arithmetic as mdl_linear, without [T, V] logits or a merged weight).
static ag_tensor *fused_loss(ag_ctx *c, const mdl_lin *lin, ag_tensor *h, const mdl_batch *b) {
    if (!lin->lora_a)
        return ag_cross_entropy_linear_norm(c, h, lin->w, NULL, NULL, b->targets, b->mask,
                                            MDL_CE_CHUNK, b->loss_norm);
    if (!lin->lora_b) {
        molt_err(MOLT_EARG, "mdl_linear: lora_a without lora_b");
        return NULL;
    }
    ag_tensor *xa = h;
    if (c->grad_mode && lin->lora_rng && lin->lora_dropout > 0)
        xa = ag_dropout(c, h, lin->lora_dropout, lin->lora_rng);
    ag_tensor *xr = xa ? ag_linear(c, xa, lin->lora_a) : NULL;
    ag_tensor *h2 = xr ? ag_scale(c, xr, lin->lora_scale) : NULL;
    return h2 ? ag_cross_entropy_linear_norm(c, h, lin->w, h2, lin->lora_b, b->targets, b->mask,
                                             MDL_CE_CHUNK, b->loss_norm)
              : NULL;
}

molt_status mdl_forward(ag_ctx *c, const mdl_model *m, const mdl_batch *b, ag_tensor **out) {
    ag_tensor *h;
    *out = NULL;
    MOLT_TRY(mdl_hidden(c, m, b, &h));
    if (!b->targets)
        *out = mdl_logits(c, m, h);
    else if (m->lm_head.qw)
        return molt_err(MOLT_EUNSUPPORTED, "model forward: the fused loss needs an unquantized "
                        "lm_head (quantize it only for inference)");
    else if (!m->lm_head.w->data)
        return molt_err(MOLT_EUNSUPPORTED, "model forward: the fused loss needs the F32 lm_head, "
                        "which mdl_pack_head packed for inference");
    else
        *out = fused_loss(c, &m->lm_head, h, b);
    return *out ? MOLT_OK
                : molt_err_wrap(ag_interrupt_pending() ? MOLT_EINTERRUPTED : MOLT_EARG,
                                "model forward");
}

// Argmax of the last row of the logits of prompt + generated tokens.
static molt_status next_token(ag_ctx *c, const mdl_model *m, const int32_t *ids, int T,
                              int32_t *tok) {
    ag_tensor *ti = ag_tensor_new1(&c->act, AG_I32, T), *tp = ag_tensor_new1(&c->act, AG_I32, T);
    ag_tensor *ts = ag_tensor_new1(&c->act, AG_I32, T);
    if (!ti || !tp || !ts)
        return molt_err_wrap(MOLT_ENOMEM, "greedy decoding");
    memcpy(ti->data, ids, (size_t)T * sizeof *ids);
    for (int t = 0; t < T; t++)
        ((int32_t *)tp->data)[t] = t;
    mdl_batch b = {.ids = ti, .pos = tp, .seg = ts};
    ag_tensor *h;
    MOLT_TRY(mdl_hidden(c, m, &b, &h));
    ag_tensor *last = ag_slice(c, h, 0, T - 1, 1);
    ag_tensor *lg = last ? mdl_logits(c, m, last) : NULL;
    if (!lg)
        return molt_err_wrap(MOLT_EARG, "greedy decoding");
    const float *v = lg->data;
    int32_t best = 0;
    for (int64_t j = 1; j < lg->numel; j++)
        if (v[j] > v[best]) // first maximum on ties, like torch.argmax
            best = (int32_t)j;
    *tok = best;
    return MOLT_OK;
}

static bool is_eos(const mcfg *cf, int32_t t) {
    for (int i = 0; i < cf->n_eos; i++)
        if (cf->eos_token_ids[i] == t)
            return true;
    return false;
}

molt_status mdl_greedy(ag_ctx *c, const mdl_model *m, const int32_t *prompt, int n_prompt,
                       int n, bool stop_at_eos, int32_t *out, int *n_out) {
    *n_out = 0;
    if (n_prompt < 1 || n < 0)
        return molt_err(MOLT_EARG, "greedy decoding: %d prompt tokens, %d to generate", n_prompt,
                        n);
    int32_t *ids = molt_malloc((size_t)(n_prompt + n + 1) * sizeof *ids);
    if (!ids)
        return molt_err(MOLT_ENOMEM, "greedy decoding: out of memory");
    memcpy(ids, prompt, (size_t)n_prompt * sizeof *ids);
    molt_status st = MOLT_OK;
    bool grad = c->grad_mode;
    ag_ctx_set_grad(c, false);
    for (int i = 0; st == MOLT_OK && i < n; i++) {
        ag_ctx_step_reset(c);
        st = next_token(c, m, ids, n_prompt + i, &ids[n_prompt + i]);
        if (st != MOLT_OK)
            break;
        out[i] = ids[n_prompt + i];
        *n_out = i + 1;
        if (stop_at_eos && is_eos(&m->cfg, out[i]))
            break;
    }
    ag_ctx_step_reset(c);
    ag_ctx_set_grad(c, grad);
    molt_free(ids);
    return st;
}
