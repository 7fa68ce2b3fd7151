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
// A batched forward (mdl_forward_spans) runs several sequences' new tokens through one pass
// of the layers, projections shared, attention per sequence (each over its own cache rows; the
// absorbed queries of all sequences in one loop over (query, head)); with an adapter bank
// each sequence uses its own adapter (forward.c's route). LoRA on kv_b_proj enters the absorbed
// form in low rank: q_nope -> W_UK^T q + s A^T (B_UK^T q) and W_UV c + s B_UV (A c), never a
// merged weight.
// Not here: the cache's storage (kvcache.c), sampling and the decode loop (infer/).
#include "mdl_internal.h"

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

// The products run in the batch-invariant kernels' fixed orders (ag_bi_matmul, ag_bi_dots,
// ag_bi_wsum; the kv_b LoRA of the absorbed form too), the softmax through ag_vexp_sum.
// Every query row's result depends on that row and its sequence's cache alone
// (batch-invariant).

// sc[0..S) <- exp(sc - max) in place (the vectorized exp of ag_vexp_sum); returns the sum
// of the exponentials.
static double softmax_inplace(float *sc, int64_t S) {
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; s++)
        mx = sc[s] > mx ? sc[s] : mx;
    return ag_vexp_sum(sc, S, mx);
}

// Pointers to rows 0..S-1 of layer l of sequence seq (NULL with a message when a row is
// outside the reserved room).
static const float **cache_rows(ag_ctx *c, const mdl_kvcache *kv, int seq, int l, int64_t S) {
    const float **rows = ag_arena_alloc(&c->act, (size_t)(S > 0 ? S : 1) * sizeof *rows);
    for (int64_t s = 0; rows && s < S; s++)
        if (!(rows[s] = mdl_kv_row(kv, seq, l, (int)s)))
            return NULL;
    return rows;
}

// Score coefficient of query row i: the model's scale times its llama-4 temperature.
static double row_coef(const mdl_model *m, const ag_tensor *qtemp, int64_t i) {
    return m->attn_scale * (qtemp ? ag_get(qtemp, i) : 1.0);
}

// ---------------------------------------------------------------------------------------
// Expanded form

// Query rows attended together (one work item: a head and up to QROWS consecutive rows).
#define QROWS 8
// The expanded form shares its work out over the threads from this many elements of keys
// and values gathered per head, and from this many multiply-adds of scores and outputs.
#define XP_COPY_MIN 16384
#define XP_MADD_MIN (1 << 18)

// out [n, NH, DV] from q [n, NH, DQK], key [S, NH, DQK], value [S, NH, DV]; query i sees
// keys 0..len+i. Per head the keys are gathered into kh [S, DQK] and the values transposed
// into vt [DV, S] (ws: NH * S * (DQK + DV) floats), so that scores and outputs are
// batch-invariant products (ag_bi_matmul): a score is summed over DQK and an output element
// over the S positions in an order fixed by DQK and S, the positions a row does not see
// entering as exact zeros. A row's result therefore depends on its sequence alone, not on
// the rows grouped with it. scratch holds QROWS * (DQK + S + DV) floats per thread.
static void attend_expanded(float *out, const float *q, const float *key, const float *value,
                            const mdl_model *m, const ag_tensor *qtemp, attn_dims d,
                            int64_t n, int64_t len, float *scratch, float *ws, int64_t S) {
    float *kall = ws, *vall = ws + d.nh * S * d.dqk;
#pragma omp parallel for schedule(static) if (S * d.nh * (d.dqk + d.dv) > XP_COPY_MIN)
    for (int64_t h = 0; h < d.nh; h++) {
        float *kh = kall + h * S * d.dqk, *vt = vall + h * d.dv * S;
        for (int64_t s = 0; s < S; s++) {
            memcpy(kh + s * d.dqk, key + (s * d.nh + h) * d.dqk, (size_t)d.dqk * sizeof *kh);
            const float *vr = value + (s * d.nh + h) * d.dv;
            for (int64_t v = 0; v < d.dv; v++)
                vt[v * S + s] = vr[v];
        }
    }
    int64_t nb = (n + QROWS - 1) / QROWS, per = QROWS * (d.dqk + S + d.dv);
#pragma omp parallel for schedule(dynamic, 1) if (n * S * d.nh * (d.dqk + d.dv) > XP_MADD_MIN)
    for (int64_t k = 0; k < nb * d.nh; k++) {
        int64_t i0 = (k / d.nh) * QROWS, h = k % d.nh;
        int64_t nr = n - i0 < QROWS ? n - i0 : QROWS;
        float *qb = scratch + (int64_t)omp_get_thread_num() * per;
        float *sc = qb + QROWS * d.dqk, *ob = sc + QROWS * S;
        for (int64_t r = 0; r < nr; r++)
            memcpy(qb + r * d.dqk, q + ((i0 + r) * d.nh + h) * d.dqk,
                   (size_t)d.dqk * sizeof *qb);
        ag_bi_matmul(sc, qb, kall + h * S * d.dqk, nr, S, d.dqk);
        double sum[QROWS] = {0};
        for (int64_t r = 0; r < nr; r++) {
            float *row = sc + r * S, coef = (float)row_coef(m, qtemp, i0 + r);
            int64_t vis = len + i0 + r + 1;
            for (int64_t s = 0; s < vis; s++)
                row[s] *= coef;
            sum[r] = softmax_inplace(row, vis);
            memset(row + vis, 0, (size_t)(S - vis) * sizeof *row);
        }
        ag_bi_matmul(ob, sc, vall + h * d.dv * S, nr, d.dv, S);
        for (int64_t r = 0; r < nr; r++) {
            float inv = (float)(1.0 / sum[r]), *o = out + ((i0 + r) * d.nh + h) * d.dv;
            for (int64_t v = 0; v < d.dv; v++)
                o[v] = ob[r * d.dv + v] * inv;
        }
    }
}

static ag_tensor *cached_expanded(ag_ctx *c, const mdl_model *m, int l, const mdl_kvcache *kv,
                                  int seq, ag_tensor *q, ag_tensor *qtemp, int64_t len,
                                  const mdl_route *r) {
    attn_dims d = dims_of(&m->cfg);
    int64_t n = q->shape[0], S = len + n;
    ag_tensor *lat = ag_tensor_new_uninit(&c->act, AG_F32, 2, (int64_t[]){S, d.rkv});
    ag_tensor *kr = ag_tensor_new_uninit(&c->act, AG_F32, 2, (int64_t[]){S, d.dr});
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
    if (mdl_attn_expand_r(c, m, l, lat, kr, r, &key, &value) != MOLT_OK)
        return NULL;
    ag_tensor *out = ag_tensor_new_uninit(&c->act, AG_F32, 3, (int64_t[]){n, d.nh, d.dv});
    size_t per = (size_t)(QROWS * (d.dqk + S + d.dv));
    float *scratch = ag_arena_alloc_uninit(&c->act, (size_t)omp_get_max_threads() * per *
                                                        sizeof *scratch);
    float *ws = ag_arena_alloc_uninit(&c->act, (size_t)(d.nh * S * (d.dqk + d.dv)) * sizeof *ws);
    if (!out || !scratch || !ws)
        return NULL;
    attend_expanded(out->data, q->data, key->data, value->data, m, qtemp, d, n, len, scratch,
                    ws, S);
    return out;
}

// ---------------------------------------------------------------------------------------
// Absorbed form

// kv_b_proj's base weight as floats (a quantized one as decoded at load, or for this step
// when the model was quantized some other way).
static const float *kv_b_base(ag_ctx *c, const mdl_layer *y) {
    const mdl_lin *lin = &y->kv_b;
    if (!lin->qw)
        return lin->w->data;
    if (y->kv_b_f32)
        return y->kv_b_f32;
    ag_tensor *d = ag_qweight_dequantize(&c->act, lin->qw);
    return d ? d->data : NULL;
}

// A LoRA on kv_b_proj in the absorbed form: a [r, RKV], b [NH*(DN+DV), r] (a NULL: none).
typedef struct {
    const float *a, *b;
    int64_t r;
    double s;
} kvb_lora;

// Per-thread scratch of the absorbed form: query in latent space followed by its rope part,
// weighted latent sum, low-rank intermediates, scores; row pointers into W_UK and W_UV.
typedef struct {
    float *ql, *ctx, *u, *sc; // [RKV + DR], [RKV], [r], [S]
    float *wt, *lv;           // with a LoRA: weights [DN + r], its W_UV-side terms [DV]
    const float **pr;         // [max(DN + r, DV)]
} absorb_scratch;

// One (query i, head h) of the absorbed form into o [DV]; w_uk/w_uv are head h's rows of the
// base kv_b, lo its LoRA (rows of head h start at h * (DN + DV) in lo->b); rows[0..vis) the
// sequence's cache rows of this layer.
static void absorb_one(float *o, const float *qi, const float *w_uk, const float *w_uv,
                       const kvb_lora *lo, int64_t h, const float *const *rows, float coef,
                       int64_t vis, attn_dims d, absorb_scratch t) {
    const float *bh = lo->a ? lo->b + h * (d.dn + d.dv) * lo->r : NULL;
    int64_t nw = d.dn;
    const float *wq = qi;
    if (lo->a) { // + s A^T u with u = B_UK^T q_nope: A's rows join the weighted sum
        for (int64_t j = 0; j < d.dn; j++)
            t.pr[j] = bh + j * lo->r;
        ag_bi_wsum(t.u, qi, t.pr, d.dn, lo->r);
        memcpy(t.wt, qi, (size_t)d.dn * sizeof *t.wt);
        for (int64_t k = 0; k < lo->r; k++) {
            t.wt[d.dn + k] = (float)lo->s * t.u[k];
            t.pr[d.dn + k] = lo->a + k * d.rkv;
        }
        wq = t.wt;
        nw += lo->r;
    }
    for (int64_t j = 0; j < d.dn; j++) // ql = W_UK^T q_nope: W_UK's rows weighted by q_nope
        t.pr[j] = w_uk + j * d.rkv;
    ag_bi_wsum(t.ql, wq, t.pr, nw, d.rkv);
    // scores: [ql | q_rope] against whole cache rows [latent | rope key]
    memcpy(t.ql + d.rkv, qi + d.dn, (size_t)d.dr * sizeof *t.ql);
    ag_bi_dots(t.sc, t.ql, rows, vis, d.rkv + d.dr);
    for (int64_t s = 0; s < vis; s++)
        t.sc[s] *= coef;
    double sum = softmax_inplace(t.sc, vis);
    ag_bi_wsum(t.ctx, t.sc, rows, vis, d.rkv); // sum_s p_s c_s
    float inv = (float)(1.0 / sum);
    // out = W_UV (sum_s p_s c_s) (+ s B_UV A ctx)
    for (int64_t v = 0; v < d.dv; v++)
        t.pr[v] = w_uv + v * d.rkv;
    ag_bi_dots(o, t.ctx, t.pr, d.dv, d.rkv);
    if (lo->a) {
        for (int64_t k = 0; k < lo->r; k++) // u = A ctx
            t.pr[k] = lo->a + k * d.rkv;
        ag_bi_dots(t.u, t.ctx, t.pr, lo->r, d.rkv);
        for (int64_t v = 0; v < d.dv; v++)
            t.pr[v] = bh + (d.dn + v) * lo->r;
        ag_bi_dots(t.lv, t.u, t.pr, d.dv, lo->r);
        for (int64_t v = 0; v < d.dv; v++)
            o[v] += (float)lo->s * t.lv[v];
    }
    for (int64_t v = 0; v < d.dv; v++)
        o[v] *= inv;
}

// A sequence of the absorbed form: its cache rows of the layer and its kv_b LoRA.
typedef struct {
    const float *const *rows;
    kvb_lora lo;
} absorb_seq;

// A query of the absorbed form: its row of q [NH, DQK] and of the output [NH, DV], its
// sequence (an index into the absorb_seq array), the cache rows it sees, its score
// coefficient.
typedef struct {
    const float *q;
    float *o;
    int seq;
    int64_t vis;
    float coef;
} absorb_query;

// Every (query, head) of qs[0..nq) through absorb_one, in one loop shared out over the
// threads: a decode step runs this once per layer for all its sequences. Each item reads
// its own sequence's rows and LoRA alone, so the bits do not depend on the other queries.
static molt_status absorb_queries(ag_ctx *c, const mdl_model *m, int l, const absorb_seq *sq,
                                  int nseq, const absorb_query *qs, int64_t nq) {
    attn_dims d = dims_of(&m->cfg);
    int64_t smax = 0, rmax = 0, work = 0;
    for (int64_t i = 0; i < nq; i++) {
        smax = qs[i].vis > smax ? qs[i].vis : smax;
        work += qs[i].vis;
    }
    for (int s = 0; s < nseq; s++)
        rmax = sq[s].lo.a && sq[s].lo.r > rmax ? sq[s].lo.r : rmax;
    // per thread: ql [RKV + DR], ctx [RKV], u [r], scores [S], then with a LoRA wt [DN + r]
    // and lv [DV] (r and S at their largest over the queries)
    int64_t per = 2 * d.rkv + d.dr + rmax + smax + (rmax > 0 ? d.dn + rmax + d.dv : 0);
    int64_t nptr = d.dn + rmax > d.dv ? d.dn + rmax : d.dv, nt = omp_get_max_threads();
    const float *w = kv_b_base(c, &m->layers[l]);
    float *scratch = ag_arena_alloc_uninit(&c->act, (size_t)(nt * per) * sizeof *scratch);
    const float **ptrs = ag_arena_alloc_uninit(&c->act, (size_t)(nt * nptr) * sizeof *ptrs);
    if (!w || !scratch || !ptrs)
        return molt_err_wrap(MOLT_ENOMEM, "cached attention (absorbed)");
    // each (query, head) costs about (DN + 2 S + DV) * RKV multiply-adds: a few heads are enough
    // to share out
#pragma omp parallel for schedule(dynamic, 1) if (nq * d.nh > 1 && work * d.nh * d.rkv > 32768)
    for (int64_t k = 0; k < nq * d.nh; k++) {
        const absorb_query *a = &qs[k / d.nh];
        const absorb_seq *as = &sq[a->seq];
        int64_t h = k % d.nh;
        int th = omp_get_thread_num();
        float *base = scratch + (int64_t)th * per;
        float *sc = base + 2 * d.rkv + d.dr + rmax, *wt = sc + smax;
        absorb_scratch t = {base, base + d.rkv + d.dr, base + 2 * d.rkv + d.dr, sc,
                            wt, wt + d.dn + rmax, ptrs + (int64_t)th * nptr};
        const float *w_uk = w + h * (d.dn + d.dv) * d.rkv, *w_uv = w_uk + d.dn * d.rkv;
        absorb_one(a->o + h * d.dv, a->q + h * d.dqk, w_uk, w_uv, &as->lo, h, as->rows, a->coef,
                   a->vis, d, t);
    }
    return MOLT_OK;
}

static ag_tensor *cached_absorbed(ag_ctx *c, const mdl_model *m, int l, const mdl_kvcache *kv,
                                  int seq, ag_tensor *q, ag_tensor *qtemp, int64_t len,
                                  const kvb_lora *lo) {
    attn_dims d = dims_of(&m->cfg);
    int64_t n = q->shape[0];
    absorb_seq sq = {cache_rows(c, kv, seq, l, len + n), *lo};
    ag_tensor *out = ag_tensor_new_uninit(&c->act, AG_F32, 3, (int64_t[]){n, d.nh, d.dv});
    absorb_query *qs = ag_arena_alloc_uninit(&c->act, (size_t)n * sizeof *qs);
    if (!sq.rows || !out || !qs)
        return NULL;
    for (int64_t i = 0; i < n; i++)
        qs[i] = (absorb_query){(const float *)q->data + i * d.nh * d.dqk,
                               (float *)out->data + i * d.nh * d.dv, 0, len + i + 1,
                               (float)row_coef(m, qtemp, i)};
    return absorb_queries(c, m, l, &sq, 1, qs, n) == MOLT_OK ? out : NULL;
}

// The kv_b LoRA the absorbed form of a sequence uses: the slot's in the bank, else the one
// wired into the model (training's single adapter), else none.
static molt_status kvb_lora_of(const mdl_model *m, int l, const mdl_bank *bank, int slot,
                               kvb_lora *lo) {
    const mdl_lin *lin = &m->layers[l].kv_b;
    *lo = (kvb_lora){0};
    const ag_tensor *a = NULL, *b = NULL;
    double s = 0;
    if (bank && slot >= 0) {
        const ag_lora_ab *e = &bank->lin[(size_t)lin->id * bank->n_slots + slot];
        a = e->a;
        b = e->b;
        s = e->scale;
    } else if (!bank && lin->lora_a) {
        a = lin->lora_a;
        b = lin->lora_b;
        s = lin->lora_scale;
    }
    if (!a)
        return MOLT_OK;
    if (!b || a->dtype != AG_F32 || b->dtype != AG_F32)
        return molt_err(MOLT_EARG, "cached attention: kv_b_proj LoRA must be an F32 "
                        "lora_a/lora_b pair");
    *lo = (kvb_lora){a->data, b->data, a->shape[0], s};
    return MOLT_OK;
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
    if (mode == MDL_ATTN_EXPANDED)
        return cached_expanded(c, m, l, kv, seq, q, qtemp, len, NULL);
    kvb_lora lo;
    return kvb_lora_of(m, l, NULL, -1, &lo) == MOLT_OK
               ? cached_absorbed(c, m, l, kv, seq, q, qtemp, len, &lo)
               : NULL;
}


// ---------------------------------------------------------------------------------------
// Batched forward over spans

// Writes rows [r0, r0 + n) of lat/kr (the span's tokens) at positions len..len+n-1 of layer l.
static molt_status store_latents(mdl_kvcache *kv, int seq, int l, int len, const ag_tensor *lat,
                                 const ag_tensor *kr, int64_t r0, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float *row = mdl_kv_row(kv, seq, l, len + (int)i);
        if (!row)
            return MOLT_EARG;
        memcpy(row, (const float *)lat->data + (r0 + i) * kv->rkv,
               (size_t)kv->rkv * sizeof(float));
        memcpy(row + kv->rkv, (const float *)kr->data + (r0 + i) * kv->dr,
               (size_t)kv->dr * sizeof(float));
    }
    return MOLT_OK;
}

// Where each span's tokens sit in the batch, and its committed length.
typedef struct {
    const mdl_span *sp;
    int n_spans;
    int64_t *row0; // [n_spans] first batch row of each span
    int *len;      // [n_spans] committed tokens before this forward
    int64_t T;
    const mdl_bank *bank; // the step's bank (step_bank)
    const int *slot;      // [n_spans] each span's slot in it
} span_plan;

// An I32 [n] tensor filled with v.
static ag_tensor *filled_i32(ag_ctx *c, int64_t n, int32_t v) {
    ag_tensor *t = ag_tensor_new1(&c->act, AG_I32, n);
    for (int64_t i = 0; t && i < n; i++)
        ((int32_t *)t->data)[i] = v;
    return t;
}

// The expanded queries of span s (its first n_expanded rows of q/qtemp) over its sequence's
// cache, into their rows of att [T, NH, DV].
static molt_status span_expanded(ag_ctx *c, const mdl_model *m, int l, const mdl_kvcache *kv,
                                 const span_plan *p, int s, ag_tensor *q, ag_tensor *qtemp,
                                 ag_tensor *att) {
    const mdl_span *sp = &p->sp[s];
    int64_t r0 = p->row0[s], ne = sp->n_expanded;
    attn_dims d = dims_of(&m->cfg);
    ag_tensor *qe = ag_slice(c, q, 0, r0, ne), *te = qtemp ? ag_slice(c, qtemp, 0, r0, ne) : NULL;
    int64_t S = p->len[s] + ne;
    mdl_route rt = {p->bank, p->bank ? filled_i32(c, S, p->slot[s]) : NULL, NULL};
    if (!qe || (qtemp && !te) || (p->bank && !rt.slot))
        return molt_err_wrap(MOLT_ENOMEM, "cached attention (expanded)");
    ag_tensor *o = cached_expanded(c, m, l, kv, sp->seq, qe, te, p->len[s], p->bank ? &rt : NULL);
    if (!o)
        return molt_err_wrap(MOLT_EARG, "cached attention (expanded)");
    memcpy((float *)att->data + r0 * d.nh * d.dv, o->data, (size_t)o->numel * sizeof(float));
    return MOLT_OK;
}

// The absorbed queries of every span (each span's rows after its n_expanded ones) over their
// sequences' caches, into their rows of att [T, NH, DV], in one absorb_queries.
static molt_status spans_absorbed(ag_ctx *c, const mdl_model *m, int l, const mdl_kvcache *kv,
                                  const span_plan *p, const ag_tensor *q, const ag_tensor *qtemp,
                                  ag_tensor *att) {
    attn_dims d = dims_of(&m->cfg);
    int64_t nq = 0;
    for (int s = 0; s < p->n_spans; s++)
        nq += p->sp[s].n - p->sp[s].n_expanded;
    if (nq == 0)
        return MOLT_OK;
    absorb_seq *sq = ag_arena_alloc_uninit(&c->act, (size_t)p->n_spans * sizeof *sq);
    absorb_query *qs = ag_arena_alloc_uninit(&c->act, (size_t)nq * sizeof *qs);
    if (!sq || !qs)
        return molt_err_wrap(MOLT_ENOMEM, "cached attention (absorbed)");
    int64_t k = 0;
    for (int s = 0; s < p->n_spans; s++) {
        const mdl_span *sp = &p->sp[s];
        int64_t ne = sp->n_expanded;
        sq[s] = (absorb_seq){0};
        if (ne == sp->n)
            continue;
        MOLT_TRY(kvb_lora_of(m, l, p->bank, p->slot[s], &sq[s].lo));
        if (!(sq[s].rows = cache_rows(c, kv, sp->seq, l, p->len[s] + sp->n)))
            return molt_err_wrap(MOLT_EARG, "cached attention (absorbed)");
        for (int64_t i = ne; i < sp->n; i++, k++) {
            int64_t row = p->row0[s] + i;
            qs[k] = (absorb_query){(const float *)q->data + row * d.nh * d.dqk,
                                   (float *)att->data + row * d.nh * d.dv, s, p->len[s] + i + 1,
                                   (float)row_coef(m, qtemp, row)};
        }
    }
    return absorb_queries(c, m, l, sq, p->n_spans, qs, nq);
}

// One decoder layer over the whole batch with per-span cached attention.
static ag_tensor *layer_spans(ag_ctx *c, const mdl_model *m, int l, mdl_kvcache *kv,
                              const span_plan *p, ag_tensor *h, const mdl_attn_in *a,
                              const mdl_route *r) {
    const mdl_layer *y = &m->layers[l];
    double eps = m->cfg.rms_norm_eps;
    attn_dims d = dims_of(&m->cfg);
    ag_tensor *x = ag_rmsnorm(c, h, y->attn_norm, eps), *lat, *kr;
    ag_tensor *q = mdl_attn_query_r(c, m, l, x, a->pos, r);
    if (!q || mdl_attn_latent_r(c, m, l, x, a->pos, r, &lat, &kr) != MOLT_OK)
        return NULL;
    for (int s = 0; s < p->n_spans; s++)
        if (store_latents(kv, p->sp[s].seq, l, p->len[s], lat, kr, p->row0[s], p->sp[s].n) !=
            MOLT_OK)
            return NULL;
    ag_tensor *att = ag_tensor_new_uninit(&c->act, AG_F32, 3, (int64_t[]){p->T, d.nh, d.dv});
    if (!att)
        return NULL;
    for (int s = 0; s < p->n_spans; s++)
        if (p->sp[s].n_expanded > 0 &&
            span_expanded(c, m, l, kv, p, s, q, a->qtemp, att) != MOLT_OK)
            return NULL;
    if (spans_absorbed(c, m, l, kv, p, q, a->qtemp, att) != MOLT_OK)
        return NULL;
    ag_tensor *ao = mdl_attn_out_r(c, m, l, att, r);
    h = ao ? ag_add(c, h, ao) : NULL;
    ag_tensor *f = h ? mdl_ffn_r(c, m, l, ag_rmsnorm(c, h, y->mlp_norm, eps), r) : NULL;
    return f ? ag_add(c, h, f) : NULL;
}

// The rows that want logits, through the final norm and lm_head.
static molt_status spans_logits(ag_ctx *c, const mdl_model *m, const span_plan *p,
                                ag_tensor *h, const ag_tensor *slot, ag_tensor **logits) {
    int64_t R = 0, H = m->cfg.hidden_size;
    for (int s = 0; s < p->n_spans; s++)
        R += p->sp[s].n_logits;
    if (R == 0)
        return MOLT_OK;
    ag_tensor *rows = ag_tensor_new2(&c->act, AG_F32, R, H);
    ag_tensor *rslot = ag_tensor_new1(&c->act, AG_I32, R);
    if (!rows || !rslot)
        return molt_err_wrap(MOLT_ENOMEM, "batched forward");
    int64_t at = 0;
    for (int s = 0; s < p->n_spans; s++) {
        int64_t first = p->row0[s] + p->sp[s].n - p->sp[s].n_logits;
        for (int64_t i = 0; i < p->sp[s].n_logits; i++, at++) {
            memcpy((float *)rows->data + at * H, (const float *)h->data + (first + i) * H,
                   (size_t)H * sizeof(float));
            ((int32_t *)rslot->data)[at] = ((const int32_t *)slot->data)[first + i];
        }
    }
    ag_tensor *hn = ag_rmsnorm(c, rows, m->norm, m->cfg.rms_norm_eps);
    mdl_route r = {p->bank, rslot, NULL};
    *logits = hn ? mdl_linear_r(c, hn, &m->lm_head, p->bank ? &r : NULL) : NULL;
    return *logits ? MOLT_OK : molt_err_wrap(MOLT_EARG, "batched forward (lm_head)");
}

static molt_status run_spans(ag_ctx *c, const mdl_model *m, mdl_kvcache *kv,
                             const span_plan *p, ag_tensor **logits) {
    int64_t T = p->T;
    mdl_batch b = {.ids = ag_tensor_new1(&c->act, AG_I32, T),
                   .pos = ag_tensor_new1(&c->act, AG_I32, T),
                   .seg = ag_tensor_new1(&c->act, AG_I32, T)};
    ag_tensor *slot = ag_tensor_new1(&c->act, AG_I32, T);
    if (!b.ids || !b.pos || !b.seg || !slot)
        return molt_err_wrap(MOLT_ENOMEM, "batched forward");
    for (int s = 0; s < p->n_spans; s++) {
        const mdl_span *sp = &p->sp[s];
        for (int i = 0; i < sp->n; i++) {
            int64_t t = p->row0[s] + i;
            ((int32_t *)b.ids->data)[t] = sp->ids[i];
            ((int32_t *)b.pos->data)[t] = p->len[s] + i;
            ((int32_t *)b.seg->data)[t] = s;
            ((int32_t *)slot->data)[t] = p->slot[s];
        }
    }
    // prompt rows (each span's first n_expanded) for the bf16-pair products, when any
    uint8_t *bx = NULL;
    if (m->prompt_bx) {
        int64_t marked = 0;
        for (int s = 0; s < p->n_spans; s++)
            marked += p->sp[s].n_expanded;
        if (marked > 0 && !(bx = ag_arena_alloc(&c->act, (size_t)T)))
            return molt_err_wrap(MOLT_ENOMEM, "batched forward");
        for (int s = 0; bx && s < p->n_spans; s++)
            memset(bx + p->row0[s], 1, (size_t)p->sp[s].n_expanded);
    }
    mdl_attn_in a;
    MOLT_TRY(mdl_attn_inputs(c, m, &b, &a));
    mdl_route r = {p->bank, slot, bx};
    ag_tensor *h = mdl_embed(c, m, b.ids);
    for (int l = 0; h && l < m->cfg.num_hidden_layers; l++)
        h = layer_spans(c, m, l, kv, p, h, &a, p->bank || bx ? &r : NULL);
    if (!h)
        return molt_err_wrap(MOLT_EARG, "batched forward (layer stack)");
    return spans_logits(c, m, p, h, slot, logits);
}

static molt_status check_spans(const mdl_model *m, const mdl_kvcache *kv, const mdl_bank *bank,
                               const mdl_span *sp, int n_spans) {
    if (!sp || n_spans < 1)
        return molt_err(MOLT_EARG, "batched forward: %d spans", n_spans);
    if (kv->n_layers != m->cfg.num_hidden_layers || kv->rkv != m->cfg.kv_lora_rank ||
        kv->dr != m->cfg.qk_rope_head_dim)
        return molt_err(MOLT_EARG, "batched forward: cache of %d layers x (%d + %d) for a model "
                        "of %d layers x (%d + %d)", kv->n_layers, kv->rkv, kv->dr,
                        m->cfg.num_hidden_layers, m->cfg.kv_lora_rank,
                        m->cfg.qk_rope_head_dim);
    if (bank && (bank->n_lins != mdl_lin_count(m) || bank->n_layers != m->cfg.num_hidden_layers))
        return molt_err(MOLT_EARG, "batched forward: the adapter bank was made for another "
                        "model");
    for (int s = 0; s < n_spans; s++) {
        const mdl_span *x = &sp[s];
        if (mdl_kv_len(kv, x->seq) < 0)
            return molt_err_wrap(MOLT_EARG, "batched forward: span %d", s);
        if (!x->ids || x->n < 1 || x->n_expanded < 0 || x->n_expanded > x->n ||
            x->n_logits < 0 || x->n_logits > x->n)
            return molt_err(MOLT_EARG, "batched forward: span %d has %d tokens, %d expanded, %d "
                            "logits", s, x->n, x->n_expanded, x->n_logits);
        if (x->slot < -1 || x->slot >= (bank ? bank->n_slots : 0))
            return molt_err(MOLT_EARG, "batched forward: span %d: adapter slot %d outside "
                            "[-1, %d)", s, x->slot, bank ? bank->n_slots : 0);
        for (int t = 0; t < s; t++)
            if (sp[t].seq == x->seq)
                return molt_err(MOLT_EARG, "batched forward: spans %d and %d are both sequence "
                                "%d", t, s, x->seq);
    }
    return MOLT_OK;
}

// The bank of this step: the slots its spans use, in slot order, holding the same tensors
// as `bank`, and each span's slot in it (slot[s], -1 for the base). Every op of the step then
// checks and walks only these, not every adapter the bank holds (with 128 adapters loaded a
// step of base rows ran 10% slower than with none). A row's result does not depend on the
// other adapters of its batch, so the renumbering changes no bit. Not under expert
// parallelism: there the rows' slots travel to the experts' owners, whose banks number the
// slots as `bank` does. The arrays are in the step's arena.
static molt_status step_bank(ag_ctx *c, const mdl_model *m, const mdl_bank *bank,
                             const mdl_span *sp, int n_spans, mdl_bank *out, int *slot) {
    for (int s = 0; s < n_spans; s++)
        slot[s] = sp[s].slot;
    *out = *bank;
    if (m->ep.comm)
        return MOLT_OK;
    int *at = ag_arena_alloc(&c->act, (size_t)bank->n_slots * sizeof *at);
    if (!at)
        return molt_err_wrap(MOLT_ENOMEM, "batched forward");
    for (int q = 0; q < bank->n_slots; q++)
        at[q] = -1;
    for (int s = 0; s < n_spans; s++)
        if (sp[s].slot >= 0)
            at[sp[s].slot] = 0;
    int n = 0;
    for (int q = 0; q < bank->n_slots; q++)
        if (at[q] == 0)
            at[q] = n++;
    size_t nl = (size_t)bank->n_lins, ny = (size_t)bank->n_layers, w = n > 0 ? (size_t)n : 1;
    out->n_slots = n;
    out->lin = ag_arena_alloc(&c->act, nl * w * sizeof *out->lin);
    out->experts = ag_arena_alloc(&c->act, ny * w * sizeof *out->experts);
    out->lin_users = ag_arena_alloc(&c->act, (nl + 1) * sizeof *out->lin_users);
    out->expert_users = ag_arena_alloc(&c->act, (ny + 1) * sizeof *out->expert_users);
    if (!out->lin || !out->experts || !out->lin_users || !out->expert_users)
        return molt_err_wrap(MOLT_ENOMEM, "batched forward");
    memset(out->lin_users, 0, nl * sizeof *out->lin_users);
    memset(out->expert_users, 0, ny * sizeof *out->expert_users);
    for (int q = 0; q < bank->n_slots; q++) {
        if (at[q] < 0)
            continue;
        for (size_t id = 0; id < nl; id++) {
            ag_lora_ab e = bank->lin[id * (size_t)bank->n_slots + (size_t)q];
            out->lin[id * (size_t)n + (size_t)at[q]] = e;
            out->lin_users[id] += e.a != NULL;
        }
        for (size_t l = 0; l < ny; l++) {
            ag_expert_lora e = bank->experts[l * (size_t)bank->n_slots + (size_t)q];
            out->experts[l * (size_t)n + (size_t)at[q]] = e;
            out->expert_users[l] += e.a_gate_up || e.a_down;
        }
    }
    for (int s = 0; s < n_spans; s++)
        slot[s] = sp[s].slot >= 0 ? at[sp[s].slot] : -1;
    return MOLT_OK;
}

molt_status mdl_forward_spans(ag_ctx *c, const mdl_model *m, mdl_kvcache *kv,
                              const mdl_bank *bank, const mdl_span *spans, int n_spans,
                              ag_tensor **logits) {
    *logits = NULL;
    MOLT_TRY(check_spans(m, kv, bank, spans, n_spans));
    span_plan p = {.sp = spans, .n_spans = n_spans};
    p.row0 = ag_arena_alloc(&c->act, (size_t)n_spans * sizeof *p.row0);
    p.len = ag_arena_alloc(&c->act, (size_t)n_spans * sizeof *p.len);
    int *slot = ag_arena_alloc(&c->act, (size_t)n_spans * sizeof *slot);
    if (!p.row0 || !p.len || !slot)
        return molt_err_wrap(MOLT_ENOMEM, "batched forward");
    mdl_bank sb;
    if (bank) {
        MOLT_TRY(step_bank(c, m, bank, spans, n_spans, &sb, slot));
        p.bank = &sb;
    } else {
        for (int s = 0; s < n_spans; s++)
            slot[s] = spans[s].slot;
    }
    p.slot = slot;
    for (int s = 0; s < n_spans; s++) {
        p.row0[s] = p.T;
        p.T += spans[s].n;
        p.len[s] = mdl_kv_len(kv, spans[s].seq);
        MOLT_TRY(mdl_kv_reserve(kv, spans[s].seq, spans[s].n));
    }
    bool grad = c->grad_mode;
    ag_ctx_set_grad(c, false);
    molt_status st = run_spans(c, m, kv, &p, logits);
    ag_ctx_set_grad(c, grad);
    for (int s = 0; st == MOLT_OK && s < n_spans; s++)
        st = mdl_kv_commit(kv, spans[s].seq, spans[s].n);
    if (st != MOLT_OK)
        *logits = NULL;
    return st;
}

molt_status mdl_forward_cached(ag_ctx *c, const mdl_model *m, mdl_kvcache *kv, int seq,
                               const int32_t *ids, int n, mdl_attn_mode mode, bool all_logits,
                               ag_tensor **logits) {
    *logits = NULL;
    if (!ids || n < 1)
        return molt_err(MOLT_EARG, "cached forward: %d tokens", n);
    if (mode != MDL_ATTN_ABSORBED && mode != MDL_ATTN_EXPANDED)
        return molt_err(MOLT_EARG, "cached forward: unknown attention mode %d", (int)mode);
    mdl_span sp = {.seq = seq, .ids = ids, .n = n,
                   .n_expanded = mode == MDL_ATTN_EXPANDED ? n : 0, .slot = -1,
                   .n_logits = all_logits ? n : 1};
    return mdl_forward_spans(c, m, kv, NULL, &sp, 1, logits);
}
