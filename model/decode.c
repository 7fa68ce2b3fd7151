// model/decode.c: cached (incremental) decoding of the Mistral 4 model on the paged latent
// cache of kvcache.c: the same layer as mdl_layer_forward (forward.c) with its attention
// replaced by attention of the new queries over every cached token of the sequence.
//
// The cached attention is inference-only on purpose: it runs plain loops (double
// accumulators, OpenMP over query rows and heads) outside the autograd tape, so it has no
// op, no backward rule and no gradient check; everything around it (projections through
// mdl_linear, RoPE, norms, router, experts, lm_head) is the training path's own ops with
// grad mode off. Two forms, checked equal in tests/test_kvcache.c:
//   expanded: keys/values of all cached tokens through kv_b_proj (mdl_attn_expand), then
//             softmax(scale * qtemp * q.k) v per head;
//   absorbed: SPECS.md section 2: per head W_UK (rows h*(DN+DV) .. +DN of kv_b_proj) moves
//             q_nope into the latent space, scores use the (RKV + DR)-wide cached rows
//             directly, and W_UV (the next DV rows) is applied once to the probability-
//             weighted sum of latents.
// Not here: the cache's storage (kvcache.c), sampling and the decode loop (infer/).
#include "model.h"

#include <math.h>
#include <omp.h>
#include <string.h>

// Shapes of one layer's attention, from the config.
typedef struct {
    int64_t nh, dn, dr, dv, dqk, rkv, width;
} attn_dims;

static attn_dims dims_of(const mcfg *cf) {
    attn_dims d = {.nh = cf->num_attention_heads, .dn = cf->qk_nope_head_dim,
                   .dr = cf->qk_rope_head_dim, .dv = cf->v_head_dim, .rkv = cf->kv_lora_rank};
    d.dqk = d.dn + d.dr;
    d.width = d.rkv + d.dr;
    return d;
}

// Softmax of sc[0..S) in place (max subtracted); returns the sum of the exponentials.
static double softmax_inplace(double *sc, int64_t S) {
    double mx = -INFINITY, sum = 0;
    for (int64_t s = 0; s < S; s++)
        mx = sc[s] > mx ? sc[s] : mx;
    for (int64_t s = 0; s < S; s++) {
        sc[s] = exp(sc[s] - mx);
        sum += sc[s];
    }
    return sum;
}

static double dot_fd(const float *a, const float *b, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += (double)a[i] * b[i];
    return s;
}

// Score coefficient of query row i: the model's scale times its llama-4 temperature.
static double row_coef(const mdl_model *m, const ag_tensor *qtemp, int64_t i) {
    return m->attn_scale * (qtemp ? ag_get(qtemp, i) : 1.0);
}

// ---------------------------------------------------------------------------------------
// Expanded form

// out [n, NH, DV] from q [n, NH, DQK], key [S, NH, DQK], value [S, NH, DV]; query i sees
// keys 0..len+i.
static void attend_expanded(float *out, const float *q, const float *key, const float *value,
                            const mdl_model *m, const ag_tensor *qtemp, attn_dims d,
                            int64_t n, int64_t len, double *scratch, int64_t S) {
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < n * d.nh; k++) {
        int64_t i = k / d.nh, h = k % d.nh, vis = len + i + 1;
        double *sc = scratch + (int64_t)omp_get_thread_num() * S;
        const float *qi = q + k * d.dqk;
        double coef = row_coef(m, qtemp, i);
        for (int64_t s = 0; s < vis; s++)
            sc[s] = coef * dot_fd(qi, key + (s * d.nh + h) * d.dqk, d.dqk);
        double sum = softmax_inplace(sc, vis);
        float *o = out + k * d.dv;
        for (int64_t v = 0; v < d.dv; v++) {
            double acc = 0;
            for (int64_t s = 0; s < vis; s++)
                acc += sc[s] * value[(s * d.nh + h) * d.dv + v];
            o[v] = (float)(acc / sum);
        }
    }
}

static ag_tensor *cached_expanded(ag_ctx *c, const mdl_model *m, int l, const mdl_kvcache *kv,
                                  int seq, ag_tensor *q, ag_tensor *qtemp, int64_t len) {
    attn_dims d = dims_of(&m->cfg);
    int64_t n = q->shape[0], S = len + n;
    ag_tensor *lat = ag_tensor_new2(&c->act, AG_F32, S, d.rkv);
    ag_tensor *kr = ag_tensor_new2(&c->act, AG_F32, S, d.dr);
    if (!lat || !kr)
        return NULL;
    for (int64_t s = 0; s < S; s++) {
        const float *row = mdl_kv_row(kv, seq, l, (int)s);
        if (!row)
            return NULL;
        memcpy((float *)lat->data + s * d.rkv, row, (size_t)d.rkv * sizeof(float));
        memcpy((float *)kr->data + s * d.dr, row + d.rkv, (size_t)d.dr * sizeof(float));
    }
    ag_tensor *key, *value;
    if (mdl_attn_expand(c, m, l, lat, kr, &key, &value) != MOLT_OK)
        return NULL;
    ag_tensor *out = ag_tensor_new(&c->act, AG_F32, 3, (int64_t[]){n, d.nh, d.dv});
    double *scratch = ag_arena_alloc(&c->act, (size_t)omp_get_max_threads() * S * sizeof *scratch);
    if (!out || !scratch)
        return NULL;
    attend_expanded(out->data, q->data, key->data, value->data, m, qtemp, d, n, len, scratch,
                    S);
    return out;
}

// ---------------------------------------------------------------------------------------
// Absorbed form

// kv_b_proj's weight with its LoRA merged in (W + s B A) when it has one, so the absorbed
// form sees the same map as mdl_linear; the base weight itself otherwise.
static const float *kv_b_weight(ag_ctx *c, const mdl_lin *lin) {
    const float *base = lin->w->data;
    if (lin->qw) { // quantized base (w has no data): dequantized for this step
        ag_tensor *d = ag_qweight_dequantize(&c->act, lin->qw);
        if (!d)
            return NULL;
        base = d->data;
    }
    if (!lin->lora_a)
        return base;
    const ag_tensor *a = lin->lora_a, *b = lin->lora_b;
    if (!b || a->dtype != AG_F32 || b->dtype != AG_F32) {
        molt_err(MOLT_EARG, "cached attention: kv_b_proj LoRA must be an F32 lora_a/lora_b pair");
        return NULL;
    }
    int64_t out = lin->w->shape[0], in = lin->w->shape[1], r = a->shape[0];
    float *w = ag_arena_alloc(&c->act, (size_t)(out * in) * sizeof *w);
    if (!w)
        return NULL;
    const float *w0 = base, *pa = a->data, *pb = b->data;
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; o++)
        for (int64_t k = 0; k < in; k++) {
            double acc = 0;
            for (int64_t j = 0; j < r; j++)
                acc += (double)pb[o * r + j] * pa[j * in + k];
            w[o * in + k] = (float)(w0[o * in + k] + lin->lora_scale * acc);
        }
    return w;
}

// Per-thread scratch of the absorbed form: query in latent space, weighted latent sum,
// scores.
typedef struct {
    double *ql, *ctx, *sc; // [RKV], [RKV], [S]
} absorb_scratch;

// One (query i, head h) of the absorbed form into o [DV].
static void absorb_one(float *o, const float *qi, const float *w_uk, const float *w_uv,
                       const mdl_kvcache *kv, int seq, int l, double coef, int64_t vis,
                       attn_dims d, absorb_scratch t) {
    for (int64_t r = 0; r < d.rkv; r++)
        t.ql[r] = 0;
    for (int64_t j = 0; j < d.dn; j++) // ql = W_UK^T q_nope
        for (int64_t r = 0; r < d.rkv; r++)
            t.ql[r] += (double)qi[j] * w_uk[j * d.rkv + r];
    const float *qr = qi + d.dn;
    for (int64_t s = 0; s < vis; s++) {
        const float *row = mdl_kv_row(kv, seq, l, (int)s);
        double acc = 0;
        for (int64_t r = 0; r < d.rkv; r++)
            acc += t.ql[r] * row[r];
        t.sc[s] = coef * (acc + dot_fd(qr, row + d.rkv, d.dr));
    }
    double sum = softmax_inplace(t.sc, vis);
    for (int64_t r = 0; r < d.rkv; r++)
        t.ctx[r] = 0;
    for (int64_t s = 0; s < vis; s++) {
        const float *row = mdl_kv_row(kv, seq, l, (int)s);
        for (int64_t r = 0; r < d.rkv; r++)
            t.ctx[r] += t.sc[s] * row[r];
    }
    for (int64_t v = 0; v < d.dv; v++) { // out = W_UV (sum_s p_s c_s)
        double acc = 0;
        for (int64_t r = 0; r < d.rkv; r++)
            acc += (double)w_uv[v * d.rkv + r] * t.ctx[r];
        o[v] = (float)(acc / sum);
    }
}

static ag_tensor *cached_absorbed(ag_ctx *c, const mdl_model *m, int l, const mdl_kvcache *kv,
                                  int seq, ag_tensor *q, ag_tensor *qtemp, int64_t len) {
    attn_dims d = dims_of(&m->cfg);
    int64_t n = q->shape[0], S = len + n;
    const float *w = kv_b_weight(c, &m->layers[l].kv_b);
    ag_tensor *out = ag_tensor_new(&c->act, AG_F32, 3, (int64_t[]){n, d.nh, d.dv});
    int64_t per = 2 * d.rkv + S;
    double *scratch = ag_arena_alloc(&c->act,
                                     (size_t)(omp_get_max_threads() * per) * sizeof *scratch);
    if (!w || !out || !scratch)
        return NULL;
    const float *qd = q->data;
    float *od = out->data;
#pragma omp parallel for schedule(static)
    for (int64_t k = 0; k < n * d.nh; k++) {
        int64_t i = k / d.nh, h = k % d.nh;
        double *base = scratch + (int64_t)omp_get_thread_num() * per;
        absorb_scratch t = {base, base + d.rkv, base + 2 * d.rkv};
        const float *w_uk = w + h * (d.dn + d.dv) * d.rkv, *w_uv = w_uk + d.dn * d.rkv;
        absorb_one(od + k * d.dv, qd + k * d.dqk, w_uk, w_uv, kv, seq, l,
                   row_coef(m, qtemp, i), len + i + 1, d, t);
    }
    return out;
}

// ---------------------------------------------------------------------------------------
// Entry points

ag_tensor *mdl_attn_cached(ag_ctx *c, const mdl_model *m, int l, const mdl_kvcache *kv,
                           int seq, ag_tensor *q, ag_tensor *qtemp, mdl_attn_mode mode) {
    attn_dims d = dims_of(&m->cfg);
    int len = mdl_kv_len(kv, seq);
    if (len < 0 || !q)
        return NULL;
    if (l < 0 || l >= m->cfg.num_hidden_layers || l >= kv->n_layers || kv->rkv != d.rkv ||
        kv->dr != d.dr) {
        molt_err(MOLT_EARG, "cached attention: layer %d, cache of %d layers x (%d + %d) does "
                 "not fit the model", l, kv->n_layers, kv->rkv, kv->dr);
        return NULL;
    }
    if (q->dtype != AG_F32 || q->ndim != 3 || q->shape[1] != d.nh || q->shape[2] != d.dqk ||
        (qtemp && (qtemp->numel != q->shape[0]))) {
        char b[80];
        molt_err(MOLT_EARG, "cached attention: query is %s, expected F32 [n, %lld, %lld]",
                 ag_shape_str(q, b, sizeof b), (long long)d.nh, (long long)d.dqk);
        return NULL;
    }
    // every row the queries will read must have been written (reserved room)
    if (!mdl_kv_row(kv, seq, l, len + (int)q->shape[0] - 1))
        return NULL;
    return mode == MDL_ATTN_ABSORBED ? cached_absorbed(c, m, l, kv, seq, q, qtemp, len)
                                     : cached_expanded(c, m, l, kv, seq, q, qtemp, len);
}

// Writes the n new tokens' latents of layer l at positions len..len+n-1.
static molt_status store_latents(mdl_kvcache *kv, int seq, int l, int len,
                                 const ag_tensor *lat, const ag_tensor *kr) {
    int64_t n = lat->shape[0];
    for (int64_t i = 0; i < n; i++) {
        float *row = mdl_kv_row(kv, seq, l, len + (int)i);
        if (!row)
            return MOLT_EARG;
        memcpy(row, (const float *)lat->data + i * kv->rkv, (size_t)kv->rkv * sizeof(float));
        memcpy(row + kv->rkv, (const float *)kr->data + i * kv->dr,
               (size_t)kv->dr * sizeof(float));
    }
    return MOLT_OK;
}

// mdl_layer_forward with cached attention.
static ag_tensor *layer_cached(ag_ctx *c, const mdl_model *m, int l, mdl_kvcache *kv, int seq,
                               ag_tensor *h, const mdl_attn_in *a, mdl_attn_mode mode) {
    const mdl_layer *y = &m->layers[l];
    double eps = m->cfg.rms_norm_eps;
    ag_tensor *x = ag_rmsnorm(c, h, y->attn_norm, eps), *lat, *kr;
    ag_tensor *q = mdl_attn_query(c, m, l, x, a->pos);
    if (!q || mdl_attn_latent(c, m, l, x, a->pos, &lat, &kr) != MOLT_OK ||
        store_latents(kv, seq, l, mdl_kv_len(kv, seq), lat, kr) != MOLT_OK)
        return NULL;
    ag_tensor *att = mdl_attn_out(c, m, l, mdl_attn_cached(c, m, l, kv, seq, q, a->qtemp, mode));
    h = att ? ag_add(c, h, att) : NULL;
    ag_tensor *f = h ? mdl_ffn(c, m, l, ag_rmsnorm(c, h, y->mlp_norm, eps)) : NULL;
    return f ? ag_add(c, h, f) : NULL;
}

// The whole model over the reserved rows; *logits as mdl_forward_cached describes.
static molt_status run_cached(ag_ctx *c, const mdl_model *m, mdl_kvcache *kv, int seq,
                              const int32_t *ids, int n, mdl_attn_mode mode, bool all_logits,
                              ag_tensor **logits) {
    int len = mdl_kv_len(kv, seq);
    mdl_batch b = {.ids = ag_tensor_new1(&c->act, AG_I32, n),
                   .pos = ag_tensor_new1(&c->act, AG_I32, n),
                   .seg = ag_tensor_new1(&c->act, AG_I32, n)};
    if (!b.ids || !b.pos || !b.seg)
        return molt_err_wrap(MOLT_ENOMEM, "cached forward");
    memcpy(b.ids->data, ids, (size_t)n * sizeof *ids);
    for (int i = 0; i < n; i++)
        ((int32_t *)b.pos->data)[i] = len + i;
    mdl_attn_in a;
    MOLT_TRY(mdl_attn_inputs(c, m, &b, &a));
    ag_tensor *h = mdl_embed(c, m, b.ids);
    for (int l = 0; h && l < m->cfg.num_hidden_layers; l++)
        h = layer_cached(c, m, l, kv, seq, h, &a, mode);
    h = h ? ag_rmsnorm(c, h, m->norm, m->cfg.rms_norm_eps) : NULL;
    if (h && !all_logits)
        h = ag_slice(c, h, 0, n - 1, 1);
    *logits = h ? mdl_logits(c, m, h) : NULL;
    if (!*logits)
        return molt_err_wrap(MOLT_EARG, "cached forward (layer stack)");
    return mdl_kv_commit(kv, seq, n);
}

molt_status mdl_forward_cached(ag_ctx *c, const mdl_model *m, mdl_kvcache *kv, int seq,
                               const int32_t *ids, int n, mdl_attn_mode mode, bool all_logits,
                               ag_tensor **logits) {
    *logits = NULL;
    if (!ids || n < 1)
        return molt_err(MOLT_EARG, "cached forward: %d tokens", n);
    if (mode != MDL_ATTN_ABSORBED && mode != MDL_ATTN_EXPANDED)
        return molt_err(MOLT_EARG, "cached forward: unknown attention mode %d", (int)mode);
    if (kv->n_layers != m->cfg.num_hidden_layers || kv->rkv != m->cfg.kv_lora_rank ||
        kv->dr != m->cfg.qk_rope_head_dim)
        return molt_err(MOLT_EARG, "cached forward: cache of %d layers x (%d + %d) for a model "
                        "of %d layers x (%d + %d)", kv->n_layers, kv->rkv, kv->dr,
                        m->cfg.num_hidden_layers, m->cfg.kv_lora_rank,
                        m->cfg.qk_rope_head_dim);
    MOLT_TRY(mdl_kv_reserve(kv, seq, n));
    bool grad = c->grad_mode;
    ag_ctx_set_grad(c, false);
    molt_status st = run_cached(c, m, kv, seq, ids, n, mode, all_logits, logits);
    ag_ctx_set_grad(c, grad);
    if (st != MOLT_OK)
        *logits = NULL;
    return st;
}
