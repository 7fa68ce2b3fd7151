// train/plan.c: the memory of one rank of a `molt train` run, computed, for `molt plan`.
// Weights come from model/plan.c (what the loaders store), the adapter's units from
// lora_plan_units (what lora_attach would allocate), and the activations from a shadow of the
// forward pass (model/forward.c): the same calls in the same order, each tensor reduced to
// its width per token and whether it requires a gradient, so that the bytes the activation
// arena hands out (outputs, then one gradient per tensor that requires one), what the nodes
// save for backward and the kernels' scratch come out as molt allocates them. With
// activation checkpointing a layer's activations live only while it is recomputed.
//
// Not here: the command and its printing (plan_cli.c). When forward.c changes what it
// allocates, the shadow below changes with it (tests/test_plan.c compares the two).
#include "trainer.h"

#include <math.h>
#include <string.h>

#include "../model/model.h"

// ---- the shadow forward ---------------------------------------------------------------------

typedef struct {
    double w;  // elements per token
    bool rg;   // requires grad
} tv;

typedef struct {
    int64_t T;
    double fwd, grad, saved; // bytes: outputs, their gradients, node-saved state
    double scratch;          // the largest kernel workspace of the layers (also in backward)
    double loss_scratch;     // the loss's workspace, at the end of the forward
} shadow;

static double round64(double b) { return ceil(b / 64.0) * 64.0; }
#define STRUCT_BYTES 192.0 // an ag_tensor as the arena hands it out (64-byte pieces)

static double data_bytes(const shadow *s, double w, double es) { return round64(s->T * w * es); }

// A new f32 tensor of width w (elements per token).
static tv out(shadow *s, double w, bool rg) {
    s->fwd += STRUCT_BYTES + data_bytes(s, w, 4);
    if (rg)
        s->grad += STRUCT_BYTES + data_bytes(s, w, 4);
    return (tv){w, rg};
}

// A reshape: a new struct over the same data, a gradient of its own.
static tv view(shadow *s, tv x) {
    s->fwd += STRUCT_BYTES;
    if (x.rg)
        s->grad += STRUCT_BYTES + data_bytes(s, x.w, 4);
    return x;
}

static void save(shadow *s, bool recorded, double bytes_per_token) {
    if (recorded)
        s->saved += s->T * bytes_per_token;
}

static void scratch(shadow *s, double bytes) {
    if (bytes > s->scratch)
        s->scratch = bytes;
}

typedef struct {
    const mcfg *cf;
    const int *lin_r;     // [mdl_lin_count] LoRA rank of each linear (0: none)
    const int *expert_r;  // [L] rank of the routed experts' LoRA (0: none)
    double dropout;       // LoRA dropout of 2-D units other than the router
    int expert_par;       // ranks the experts are split over
    bool router_lora;
} net;

// mdl_linear_r: the base projection, then with LoRA (dropout) -> xA -> (xA)B -> scale -> add.
static tv linear(shadow *s, const net *n, tv x, double outw, int id, bool is_router) {
    tv y = out(s, outw, x.rg);
    int r = id >= 0 ? n->lin_r[id] : 0;
    if (!r)
        return y;
    if (n->dropout > 0 && !is_router) {
        tv d = out(s, x.w, x.rg);
        save(s, d.rg, 0); // the generator state only
    }
    out(s, r, true);
    out(s, outw, true);
    out(s, outw, true);
    return out(s, outw, true);
}

static tv rmsnorm(shadow *s, tv x) {
    tv y = out(s, x.w, x.rg);
    save(s, y.rg, 4);
    return y;
}

static tv add(shadow *s, tv a, tv b) { return out(s, a.w, a.rg || b.rg); }

// Per-layer linear ids, in mdl_lin_at order: q_a, q_b, q, kv_a, kv_b, o, dense g/u/d, router,
// shared g/u/d; then lm_head.
enum { L_QA, L_QB, L_Q, L_KVA, L_KVB, L_O, L_DG, L_DU, L_DD, L_ROUTER, L_SG, L_SU, L_SD, L_N };

static tv attention(shadow *s, const net *n, int l, tv x) {
    const mcfg *c = n->cf;
    double NH = c->num_attention_heads, DQK = c->qk_nope_head_dim + c->qk_rope_head_dim;
    double DN = c->qk_nope_head_dim, DR = c->qk_rope_head_dim, DV = c->v_head_dim;
    double RKV = c->kv_lora_rank;
    int b = l * L_N;
    tv q;
    if (c->q_lora_rank) {
        tv qa = rmsnorm(s, linear(s, n, x, c->q_lora_rank, b + L_QA, false));
        q = linear(s, n, qa, NH * DQK, b + L_QB, false);
    } else
        q = linear(s, n, x, NH * DQK, b + L_Q, false);
    q = out(s, q.w, view(s, q).rg); // reshape, rope
    tv ckv = linear(s, n, x, RKV + DR, b + L_KVA, false);
    ckv = out(s, ckv.w, ckv.rg); // rope
    tv lat = out(s, RKV, ckv.rg), kr = out(s, DR, ckv.rg); // split
    lat = rmsnorm(s, lat);
    tv kv = linear(s, n, lat, NH * (DN + DV), b + L_KVB, false);
    view(s, kv);
    tv kn = out(s, NH * DN, kv.rg), v = out(s, NH * DV, kv.rg); // split
    view(s, kr);
    tv ke = out(s, NH * DR, kr.rg);                              // expand
    tv key = out(s, NH * DQK, kn.rg || ke.rg);                   // concat
    tv att = out(s, NH * DV, q.rg || key.rg || v.rg);
    save(s, att.rg, NH * 4);
    scratch(s, 2 * 64 * (double)s->T * 4); // a block of scores per thread (one thread)
    return linear(s, n, view(s, att), c->hidden_size, b + L_O, false);
}

static tv mlp(shadow *s, const net *n, tv x, double inner, int g, int u, int d) {
    tv a = linear(s, n, x, inner, g, false), bb = linear(s, n, x, inner, u, false);
    tv act = out(s, inner, a.rg || bb.rg); // swiglu
    return linear(s, n, act, n->cf->hidden_size, d, false);
}

static tv experts(shadow *s, const net *n, int l, tv x, tv w) {
    const mcfg *c = n->cf;
    double H = c->hidden_size, k = c->num_experts_per_tok, I = c->moe_intermediate_size;
    double E = (double)c->n_routed_experts / n->expert_par;
    int r = n->expert_r[l];
    bool lora_rg = r > 0;
    // the kernel's scratch: the slots' rows, per-expert packed B, a thread's buffers
    scratch(s, (double)s->T * k * (H * 4 + 8) + (r ? E * r * (2 * I + H) * 4 : 0) +
                   (2 * I + H + 2.0 * r) * 4 * 64);
    if (n->expert_par == 1)
        return out(s, H, x.rg || w.rg || lora_rg);
    // expert parallel: route (slot positions, received rows' expert and tag), dispatch,
    // this rank's experts on about T*k rows, combine (saves the returned rows)
    double R = k; // rows received per token of this rank, on average
    s->fwd += STRUCT_BYTES * 2 + round64(s->T * k * 4) + round64(s->T * R * 4) * 2 +
              round64(s->T * k * 8);
    tv xr = out(s, H, x.rg);
    out(s, R / R, false); // the unit routing weights [R, 1]
    tv y = out(s, H, xr.rg || lora_rg);
    tv o = out(s, H, y.rg || w.rg);
    save(s, o.rg, k * H * 4);
    scratch(s, (double)s->T * k * H * 4 * 2); // send and receive buffers
    return o;
}

static tv ffn(shadow *s, const net *n, int l, tv x) {
    const mcfg *c = n->cf;
    int b = l * L_N;
    if (l < c->first_k_dense_replace)
        return mlp(s, n, x, c->intermediate_size, b + L_DG, b + L_DU, b + L_DD);
    double E = c->n_routed_experts, k = c->num_experts_per_tok;
    tv logits = linear(s, n, x, E, b + L_ROUTER, true);
    tv w = out(s, k, logits.rg);
    s->fwd += STRUCT_BYTES + data_bytes(s, k, 4); // idx (i32)
    save(s, w.rg, E * 4);
    tv routed = experts(s, n, l, x, w);
    if (!c->n_shared_experts)
        return routed;
    tv sh = mlp(s, n, x, (double)c->moe_intermediate_size * c->n_shared_experts, b + L_SG,
                b + L_SU, b + L_SD);
    return add(s, routed, sh);
}

static tv layer(shadow *s, const net *n, int l, tv h) {
    tv att = attention(s, n, l, rmsnorm(s, h));
    h = add(s, h, att);
    tv f = ffn(s, n, l, rmsnorm(s, h));
    return add(s, h, f);
}

// The head: final norm and the fused loss over the vocabulary (with lm_head's LoRA term).
static void head(shadow *s, const net *n, tv h, int lm_id) {
    const mcfg *c = n->cf;
    double H = c->hidden_size, V = c->vocab_size, chunk = V < 8192 ? V : 8192;
    tv x = rmsnorm(s, h);
    int r = lm_id >= 0 ? n->lin_r[lm_id] : 0;
    bool fused = !r && x.rg;
    if (r) {
        if (n->dropout > 0)
            out(s, H, x.rg);
        out(s, r, true);
        out(s, r, true);
    }
    s->fwd += STRUCT_BYTES + 64; // the loss [1]
    save(s, true, 8 + (fused ? H * 4 : 0));
    // the loss's scratch: its per-token state and a tile of rows x (2C + chunk)
    // (every token counted: with fewer target tokens the tile is smaller)
    double tile = floor((double)(1 << 24) / (2 * H + 2 * r + chunk));
    tile = tile < 1 ? 1 : tile > s->T ? s->T : tile;
    s->loss_scratch = s->T * (8.0 + 8 + 8 + (fused ? H * 4 : 0)) +
                      tile * (16 + (2 * H + chunk + 2 * r) * 4);
}

// The batch and the per-batch attention inputs.
static void inputs(shadow *s, const mcfg *c) {
    s->fwd += 5 * (STRUCT_BYTES + data_bytes(s, 1, 4));
    if (c->rope.llama_4_scaling_beta != 0)
        s->fwd += STRUCT_BYTES + data_bytes(s, 1, 4);
    out(s, c->hidden_size, false); // the embeddings
}

// Activation bytes of one step on T tokens: without checkpointing (everything kept until
// backward) and with it (layer outputs kept, one layer's activations at a time).
static void activations(const net *n, int64_t T, int lm_id, double *plain, double *ckpt,
                        double *ws) {
    const mcfg *c = n->cf;
    int L = c->num_hidden_layers;
    shadow all = {.T = T};
    inputs(&all, c);
    tv h = {c->hidden_size, false};
    for (int l = 0; l < L; l++)
        h = layer(&all, n, l, h);
    head(&all, n, h, lm_id);
    // the loss's workspace comes at the end of the forward (everything saved, no gradient
    // yet); the layers' in backward, when the gradients are there
    double at_fwd_end = all.fwd + all.saved + all.loss_scratch;
    double at_bwd_end = all.fwd + all.grad + all.scratch;
    *plain = at_fwd_end > at_bwd_end ? at_fwd_end : at_bwd_end;
    *ws = all.scratch > all.loss_scratch ? all.scratch : all.loss_scratch;
    // checkpointed: the parent keeps the inputs, each layer's output and the head; a layer's
    // own activations (and gradients) exist while it is recomputed in backward
    shadow top = {.T = T};
    inputs(&top, c);
    double worst_layer = 0;
    tv x = {c->hidden_size, false};
    for (int l = 0; l < L; l++) {
        shadow one = {.T = T};
        tv y = layer(&one, n, l, x);
        double here = one.fwd + one.grad + one.saved + one.scratch;
        worst_layer = here > worst_layer ? here : worst_layer;
        x = out(&top, c->hidden_size, y.rg || x.rg);
    }
    head(&top, n, x, lm_id);
    double parent = top.fwd + top.grad;
    double head_peak = top.fwd + top.saved + top.loss_scratch;
    *ckpt = parent + worst_layer > head_peak ? parent + worst_layer : head_peak;
}

molt_status trn_plan_compute(const trn_plan_opts *o, trn_plan *p) {
    memset(p, 0, sizeof *p);
    const mcfg *c = &o->cfg;
    int N = o->ranks, E = o->expert > 0 ? o->expert : 1;
    if (N < 1 || N % E != 0)
        return molt_err(MOLT_EARG, "plan: %d ranks with expert parallelism %d", N, E);
    int D = o->data > 0 ? o->data : N / E;
    if (D * E != N)
        return molt_err(MOLT_EARG, "plan: data %d x expert %d is not %d ranks", D, E, N);
    if (c->n_routed_experts % E != 0)
        return molt_err(MOLT_EARG, "plan: %d routed experts do not split over %d ranks",
                        c->n_routed_experts, E);
    if (o->batch < N || o->batch % N != 0)
        return molt_err(MOLT_EARG, "plan: a batch of %d rows does not split evenly over %d "
                        "ranks", o->batch, N);
    p->data = D;
    p->expert = E;
    p->rows = o->batch / N;
    p->tokens = (int64_t)p->rows * o->seq_len;
    int count = c->n_routed_experts / E;
    MOLT_TRY(mdl_plan_weights(c, o->quant_set ? &o->quant : NULL, count, p->weights));
    for (int g = 0; g < MDL_PG_COUNT; g++)
        p->weights_total += (double)p->weights[g];
    // the adapter: what lora_attach allocates on a model holding `count` experts
    mdl_model m;
    MOLT_TRY(mdl_create_plan(&m, c, count));
    lora_unit *units = NULL;
    int nu = 0;
    molt_status st = lora_plan_units(&m, &o->adapter, &units, &nu);
    int n_lin = mdl_lin_count(&m), L = c->num_hidden_layers;
    int *lin_r = molt_calloc((size_t)n_lin + 1, sizeof *lin_r);
    int *expert_r = molt_calloc((size_t)L + 1, sizeof *expert_r);
    if (st == MOLT_OK && (!lin_r || !expert_r))
        st = molt_err(MOLT_ENOMEM, "plan: out of memory");
    int lm_id = m.lm_head.id;
    for (int i = 0; st == MOLT_OK && i < nu; i++) {
        const lora_unit *u = &units[i];
        double n_params = (double)u->r * (double)u->n_exp * (double)(u->in + u->out);
        // A and B: struct and data each, their gradients the same, AdamW's m and v
        double ab = 2 * STRUCT_BYTES + round64(4.0 * u->r * u->n_exp * u->in) +
                    round64(4.0 * u->r * u->n_exp * u->out);
        p->adapter += ab;
        p->grads += ab;
        p->optimizer += 2 * 4 * n_params + 16;
        if (u->group == LORA_GROUP_EXPERTS) {
            p->params_shard += n_params;
            p->params_full += n_params * E;
            expert_r[u->layer] = u->r;
        } else {
            p->params_replicated += n_params;
            p->params_full += n_params;
            if (u->lin)
                lin_r[u->lin->id] = u->r;
        }
    }
    if (st == MOLT_OK) {
        net n = {.cf = c, .lin_r = lin_r, .expert_r = expert_r, .dropout = o->adapter.dropout,
                 .expert_par = E};
        activations(&n, p->tokens, lm_id, &p->act_plain, &p->act_ckpt, &p->workspace);
        p->activations = o->act_ckpt ? p->act_ckpt : p->act_plain;
        // gradient reduction in buckets of 16 MiB (never more than the adapter)
        double g = 4.0 * (p->params_replicated + p->params_shard);
        p->comm = N > 1 ? (g < 16.0 * 1024 * 1024 ? g : 16.0 * 1024 * 1024) : 0;
        // the MLA latent cache of batch x seq tokens (f32) for generation and evaluation
        p->kv_cache = (double)o->batch / N * o->seq_len * L *
                      (c->kv_lora_rank + c->qk_rope_head_dim) * 4.0;
        // rank 0 stages a checkpoint: the whole adapter, m and v
        p->ckpt_staging = 3 * 4.0 * p->params_full;
        // the host side: the tokenizer, the batches (every rank reads the global batch)
        p->host = o->tokenizer_bytes + 13.0 * o->batch * o->seq_len;
        double persistent = p->weights_total + p->adapter + p->grads + p->optimizer;
        double step = persistent + p->activations;
        double end = persistent + p->comm;
        p->total = step > end ? step : end;
        // a CPU run holds both sides in one memory; rank 0 stages checkpoints there too
        p->total_cpu = p->total + p->host;
        double stage = persistent + p->host + p->ckpt_staging;
        p->total_cpu_rank0 = p->total_cpu > stage ? p->total_cpu : stage;
        p->total_infer = p->weights_total + p->adapter + p->kv_cache;
    }
    molt_free(units);
    molt_free(lin_r);
    molt_free(expert_r);
    mdl_free(&m);
    return st;
}
