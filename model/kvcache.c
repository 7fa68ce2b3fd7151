// model/kvcache.c: the paged MLA latent cache: a pool of fixed-size blocks (each holds
// block_tokens tokens of every layer: [L, block_tokens, RKV + DR] floats), a free list, and
// per sequence a block table. Blocks are allocated one by one and never move, so a row
// pointer stays valid while its sequence holds the block. Not here: what is written into
// the rows and how attention reads them (decode.c).
#include "model.h"

#include <string.h>

molt_status mdl_kv_init(mdl_kvcache *kv, const mcfg *cfg, int block_tokens, int max_tokens) {
    memset(kv, 0, sizeof *kv);
    if (block_tokens == 0)
        block_tokens = MDL_KV_BLOCK_DEFAULT;
    if (block_tokens < 1 || max_tokens < 0)
        return molt_err(MOLT_EARG, "kv cache: block of %d tokens, limit %d tokens",
                        block_tokens, max_tokens);
    if (cfg->num_hidden_layers < 1 || cfg->kv_lora_rank < 1 || cfg->qk_rope_head_dim < 1)
        return molt_err(MOLT_EARG, "kv cache: config has %d layers, kv_lora_rank %d, "
                        "qk_rope_head_dim %d", cfg->num_hidden_layers, cfg->kv_lora_rank,
                        cfg->qk_rope_head_dim);
    kv->n_layers = cfg->num_hidden_layers;
    kv->rkv = cfg->kv_lora_rank;
    kv->dr = cfg->qk_rope_head_dim;
    kv->width = kv->rkv + kv->dr;
    kv->block_tokens = block_tokens;
    kv->max_blocks = (int)(((int64_t)max_tokens + block_tokens - 1) / block_tokens);
    return MOLT_OK;
}

void mdl_kv_free(mdl_kvcache *kv) {
    for (int i = 0; i < kv->n_pool; i++)
        molt_free(kv->pool[i]);
    for (int i = 0; i < kv->n_seqs; i++)
        molt_free(kv->seqs[i].blocks);
    molt_free(kv->pool);
    molt_free(kv->free_ids);
    molt_free(kv->seqs);
    memset(kv, 0, sizeof *kv);
}

static mdl_kv_seq *seq_at(const mdl_kvcache *kv, int seq) {
    if (seq < 0 || seq >= kv->n_seqs || !kv->seqs[seq].live) {
        molt_err(MOLT_EARG, "kv cache: no open sequence %d", seq);
        return NULL;
    }
    return &kv->seqs[seq];
}

molt_status mdl_kv_seq_open(mdl_kvcache *kv, int *seq) {
    for (int i = 0; i < kv->n_seqs; i++)
        if (!kv->seqs[i].live) {
            kv->seqs[i].live = true;
            *seq = i;
            return MOLT_OK;
        }
    mdl_kv_seq *s = molt_realloc(kv->seqs, (size_t)(kv->n_seqs + 1) * sizeof *s);
    if (!s)
        return molt_err(MOLT_ENOMEM, "kv cache: out of memory for a sequence");
    kv->seqs = s;
    s[kv->n_seqs] = (mdl_kv_seq){.live = true};
    *seq = kv->n_seqs++;
    return MOLT_OK;
}

void mdl_kv_seq_reset(mdl_kvcache *kv, int seq) {
    mdl_kv_seq *s = seq_at(kv, seq);
    if (!s)
        return;
    // the free list was sized for every pool block when the blocks were made
    for (int i = 0; i < s->n_blocks; i++)
        kv->free_ids[kv->n_free++] = s->blocks[i];
    s->n_blocks = 0;
    s->len = 0;
}

void mdl_kv_seq_close(mdl_kvcache *kv, int seq) {
    mdl_kv_seq *s = seq_at(kv, seq);
    if (!s)
        return;
    mdl_kv_seq_reset(kv, seq);
    molt_free(s->blocks);
    *s = (mdl_kv_seq){0};
}

int mdl_kv_len(const mdl_kvcache *kv, int seq) {
    const mdl_kv_seq *s = seq_at(kv, seq);
    return s ? s->len : -1;
}

int mdl_kv_blocks_used(const mdl_kvcache *kv) { return kv->n_pool - kv->n_free; }

// Adds one new block to the pool (and its place in the free list).
static molt_status pool_grow(mdl_kvcache *kv) {
    if (kv->max_blocks > 0 && kv->n_pool >= kv->max_blocks)
        return molt_err(MOLT_ENOMEM, "kv cache: all %d blocks (%d tokens) are in use",
                        kv->max_blocks, kv->max_blocks * kv->block_tokens);
    if (kv->n_pool == kv->cap_pool) {
        int cap = kv->cap_pool ? 2 * kv->cap_pool : 16;
        float **p = molt_realloc(kv->pool, (size_t)cap * sizeof *p);
        if (!p)
            return molt_err(MOLT_ENOMEM, "kv cache: out of memory for the block table");
        kv->pool = p;
        int32_t *f = molt_realloc(kv->free_ids, (size_t)cap * sizeof *f);
        if (!f)
            return molt_err(MOLT_ENOMEM, "kv cache: out of memory for the block table");
        kv->free_ids = f;
        kv->cap_pool = cap;
    }
    size_t floats = (size_t)kv->n_layers * kv->block_tokens * kv->width;
    float *b = molt_malloc(floats * sizeof *b);
    if (!b)
        return molt_err(MOLT_ENOMEM, "kv cache: out of memory for a block of %zu bytes",
                        floats * sizeof *b);
    kv->pool[kv->n_pool] = b;
    kv->free_ids[kv->n_free++] = kv->n_pool++;
    return MOLT_OK;
}

// Takes a free block (growing the pool when none is free) into s's table.
static molt_status take_block(mdl_kvcache *kv, mdl_kv_seq *s) {
    if (s->n_blocks == s->cap_blocks) {
        int cap = s->cap_blocks ? 2 * s->cap_blocks : 8;
        int32_t *b = molt_realloc(s->blocks, (size_t)cap * sizeof *b);
        if (!b)
            return molt_err(MOLT_ENOMEM, "kv cache: out of memory for a block table");
        s->blocks = b;
        s->cap_blocks = cap;
    }
    if (kv->n_free == 0)
        MOLT_TRY(pool_grow(kv));
    s->blocks[s->n_blocks++] = kv->free_ids[--kv->n_free];
    return MOLT_OK;
}

molt_status mdl_kv_reserve(mdl_kvcache *kv, int seq, int n) {
    mdl_kv_seq *s = seq_at(kv, seq);
    if (!s)
        return MOLT_EARG;
    if (n < 0 || s->len > INT32_MAX - n)
        return molt_err(MOLT_EARG, "kv cache: cannot reserve %d tokens after %d", n, s->len);
    int64_t need = ((int64_t)s->len + n + kv->block_tokens - 1) / kv->block_tokens;
    int before = s->n_blocks;
    while (s->n_blocks < need) {
        molt_status st = take_block(kv, s);
        if (st != MOLT_OK) { // give back what this call took
            while (s->n_blocks > before)
                kv->free_ids[kv->n_free++] = s->blocks[--s->n_blocks];
            return st;
        }
    }
    return MOLT_OK;
}

float *mdl_kv_row(const mdl_kvcache *kv, int seq, int l, int t) {
    const mdl_kv_seq *s = seq_at(kv, seq);
    if (!s)
        return NULL;
    if (l < 0 || l >= kv->n_layers || t < 0 || t >= s->n_blocks * kv->block_tokens) {
        molt_err(MOLT_EARG, "kv cache: row (layer %d, token %d) outside the %d layers and %d "
                 "reserved tokens of sequence %d", l, t, kv->n_layers,
                 s->n_blocks * kv->block_tokens, seq);
        return NULL;
    }
    float *b = kv->pool[s->blocks[t / kv->block_tokens]];
    return b + ((size_t)l * kv->block_tokens + t % kv->block_tokens) * kv->width;
}

molt_status mdl_kv_commit(mdl_kvcache *kv, int seq, int n) {
    mdl_kv_seq *s = seq_at(kv, seq);
    if (!s)
        return MOLT_EARG;
    if (n < 0 || (int64_t)s->len + n > (int64_t)s->n_blocks * kv->block_tokens)
        return molt_err(MOLT_EARG, "kv cache: commit of %d tokens after %d exceeds the %d "
                        "reserved", n, s->len, s->n_blocks * kv->block_tokens);
    s->len += n;
    return MOLT_OK;
}
