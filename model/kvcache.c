// model/kvcache.c: the paged MLA latent cache: a pool of fixed-size blocks (each holds
// block_tokens tokens of every layer: [L, block_tokens, RKV + DR] floats), per sequence a
// block table, a reference count per block (sequences sharing a prompt prefix hold the same
// blocks), and the prefix index: full prompt blocks findable by content, kept after their
// sequences end in a least-recently-used list until their room is needed. Blocks are
// allocated one by one and never move, so a row pointer stays valid while its sequence holds
// the block. Not here: what is written into the rows and how attention reads them (decode.c).
#include "model.h"

#include <string.h>

#define NIL (-1)
#define DELETED (-2)

molt_status mdl_kv_init(mdl_kvcache *kv, const mcfg *cfg, int block_tokens, int max_tokens) {
    memset(kv, 0, sizeof *kv);
    kv->lru_head = kv->lru_tail = NIL;
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
    for (int i = 0; i < kv->n_pool; i++) {
        molt_free(kv->pool[i]);
        molt_free(kv->pb[i].tokens);
    }
    for (int i = 0; i < kv->n_seqs; i++)
        molt_free(kv->seqs[i].blocks);
    molt_free(kv->pool);
    molt_free(kv->free_ids);
    molt_free(kv->ref);
    molt_free(kv->pb);
    molt_free(kv->pmap);
    molt_free(kv->seqs);
    memset(kv, 0, sizeof *kv);
    kv->lru_head = kv->lru_tail = NIL;
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

// ---- the evictable list ---------------------------------------------------------------------

static void lru_unlink(mdl_kvcache *kv, int32_t b) {
    mdl_kv_pblock *p = &kv->pb[b];
    if (p->lru_prev != NIL)
        kv->pb[p->lru_prev].lru_next = p->lru_next;
    else
        kv->lru_head = p->lru_next;
    if (p->lru_next != NIL)
        kv->pb[p->lru_next].lru_prev = p->lru_prev;
    else
        kv->lru_tail = p->lru_prev;
    p->lru_prev = p->lru_next = NIL;
    kv->n_cached--;
}

static void lru_push(mdl_kvcache *kv, int32_t b) {
    mdl_kv_pblock *p = &kv->pb[b];
    p->lru_prev = kv->lru_tail;
    p->lru_next = NIL;
    if (kv->lru_tail != NIL)
        kv->pb[kv->lru_tail].lru_next = b;
    else
        kv->lru_head = b;
    kv->lru_tail = b;
    kv->n_cached++;
}

// Drops one sequence's hold on block b: unheld, it becomes evictable (indexed) or free.
static void block_release(mdl_kvcache *kv, int32_t b) {
    if (--kv->ref[b] > 0)
        return;
    kv->n_used--;
    if (kv->pb[b].indexed)
        lru_push(kv, b);
    else
        kv->free_ids[kv->n_free++] = b;
}

// A sequence takes hold of block b (a cached one leaves the evictable list).
static void block_hold(mdl_kvcache *kv, int32_t b) {
    if (kv->ref[b]++ > 0)
        return;
    kv->n_used++;
    if (kv->pb[b].indexed)
        lru_unlink(kv, b);
}

void mdl_kv_seq_reset(mdl_kvcache *kv, int seq) {
    mdl_kv_seq *s = seq_at(kv, seq);
    if (!s)
        return;
    // the free list was sized for every pool block when the blocks were made
    for (int i = s->n_blocks - 1; i >= 0; i--)
        block_release(kv, s->blocks[i]);
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

int mdl_kv_blocks_used(const mdl_kvcache *kv) { return kv->n_used; }

int mdl_kv_blocks_cached(const mdl_kvcache *kv) { return kv->n_cached; }

// ---- the content index ------------------------------------------------------------------------

static uint64_t mix(uint64_t h, uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h * 0xff51afd7ed558ccdull;
}

static uint64_t block_key(const mdl_kvcache *kv, uint64_t tag, int32_t parent,
                          uint32_t parent_gen, const int32_t *ids) {
    uint64_t h = mix(mix(mix(0x6d6f6c74ull, tag), (uint64_t)(uint32_t)parent), parent_gen);
    for (int i = 0; i < kv->block_tokens; i++)
        h = mix(h, (uint64_t)(uint32_t)ids[i]);
    return h;
}

// Whether indexed block b holds exactly this content.
static bool block_is(const mdl_kvcache *kv, int32_t b, uint64_t h, uint64_t tag, int32_t parent,
                     uint32_t parent_gen, const int32_t *ids) {
    const mdl_kv_pblock *p = &kv->pb[b];
    return p->indexed && p->hash == h && p->tag == tag && p->parent == parent &&
           p->parent_gen == parent_gen &&
           !memcmp(p->tokens, ids, (size_t)kv->block_tokens * sizeof *ids);
}

static int32_t index_find(const mdl_kvcache *kv, uint64_t h, uint64_t tag, int32_t parent,
                          uint32_t parent_gen, const int32_t *ids) {
    if (kv->pmap_cap == 0)
        return NIL;
    uint32_t mask = (uint32_t)kv->pmap_cap - 1;
    for (uint32_t i = (uint32_t)h & mask;; i = (i + 1) & mask) {
        int32_t b = kv->pmap[i];
        if (b == NIL)
            return NIL;
        if (b >= 0 && block_is(kv, b, h, tag, parent, parent_gen, ids))
            return b;
    }
}

// Rebuilds the table with room for twice the indexed blocks (deleted marks dropped).
static molt_status index_grow(mdl_kvcache *kv) {
    int cap = kv->pmap_cap ? kv->pmap_cap : 64;
    while (cap < 4 * (kv->n_pool + 1))
        cap *= 2;
    int32_t *map = molt_malloc((size_t)cap * sizeof *map);
    if (!map)
        return molt_err(MOLT_ENOMEM, "kv cache: out of memory for the prefix index");
    for (int i = 0; i < cap; i++)
        map[i] = NIL;
    int fill = 0;
    for (int32_t b = 0; b < kv->n_pool; b++) {
        if (!kv->pb[b].indexed)
            continue;
        uint32_t i = (uint32_t)kv->pb[b].hash & (uint32_t)(cap - 1);
        while (map[i] != NIL)
            i = (i + 1) & (uint32_t)(cap - 1);
        map[i] = b;
        fill++;
    }
    molt_free(kv->pmap);
    kv->pmap = map;
    kv->pmap_cap = cap;
    kv->pmap_fill = fill;
    return MOLT_OK;
}

// Makes block b (its record filled, not yet indexed) findable.
static molt_status index_insert(mdl_kvcache *kv, int32_t b) {
    if (2 * (kv->pmap_fill + 1) > kv->pmap_cap)
        MOLT_TRY(index_grow(kv));
    uint32_t mask = (uint32_t)kv->pmap_cap - 1;
    uint32_t i = (uint32_t)kv->pb[b].hash & mask;
    while (kv->pmap[i] >= 0)
        i = (i + 1) & mask;
    if (kv->pmap[i] == NIL)
        kv->pmap_fill++;
    kv->pmap[i] = b;
    kv->pb[b].indexed = true;
    return MOLT_OK;
}

static void index_remove(mdl_kvcache *kv, int32_t b) {
    uint32_t mask = (uint32_t)kv->pmap_cap - 1;
    for (uint32_t i = (uint32_t)kv->pb[b].hash & mask;; i = (i + 1) & mask) {
        if (kv->pmap[i] == b) {
            kv->pmap[i] = DELETED;
            break;
        }
        if (kv->pmap[i] == NIL)
            break;
    }
    kv->pb[b].indexed = false;
    kv->pb[b].gen++; // blocks indexed under the old content no longer follow this one
}

// ---- allocation -------------------------------------------------------------------------------

// Adds one new block to the pool (and its place in the free list).
static molt_status pool_grow(mdl_kvcache *kv) {
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
        int32_t *r = molt_realloc(kv->ref, (size_t)cap * sizeof *r);
        if (!r)
            return molt_err(MOLT_ENOMEM, "kv cache: out of memory for the block table");
        kv->ref = r;
        mdl_kv_pblock *pb = molt_realloc(kv->pb, (size_t)cap * sizeof *pb);
        if (!pb)
            return molt_err(MOLT_ENOMEM, "kv cache: out of memory for the block table");
        kv->pb = pb;
        kv->cap_pool = cap;
    }
    size_t floats = (size_t)kv->n_layers * kv->block_tokens * kv->width;
    float *b = molt_malloc(floats * sizeof *b);
    if (!b)
        return molt_err(MOLT_ENOMEM, "kv cache: out of memory for a block of %zu bytes",
                        floats * sizeof *b);
    kv->pool[kv->n_pool] = b;
    kv->ref[kv->n_pool] = 0;
    kv->pb[kv->n_pool] = (mdl_kv_pblock){.parent = NIL, .lru_prev = NIL, .lru_next = NIL};
    kv->free_ids[kv->n_free++] = kv->n_pool++;
    return MOLT_OK;
}

// A block for new tokens: a free one, a new one while the pool may grow, else the least
// recently used cached one (given up: it leaves the index).
static molt_status block_take(mdl_kvcache *kv, int32_t *out) {
    if (kv->n_free == 0 && (kv->max_blocks == 0 || kv->n_pool < kv->max_blocks))
        MOLT_TRY(pool_grow(kv));
    if (kv->n_free > 0) {
        *out = kv->free_ids[--kv->n_free];
    } else if (kv->lru_head != NIL) {
        *out = kv->lru_head;
        lru_unlink(kv, *out);
        index_remove(kv, *out);
    } else {
        return molt_err(MOLT_ENOMEM, "kv cache: all %d blocks (%d tokens) are in use",
                        kv->max_blocks, kv->max_blocks * kv->block_tokens);
    }
    kv->ref[*out] = 1;
    kv->n_used++;
    return MOLT_OK;
}

static molt_status table_room(mdl_kv_seq *s) {
    if (s->n_blocks < s->cap_blocks)
        return MOLT_OK;
    int cap = s->cap_blocks ? 2 * s->cap_blocks : 8;
    int32_t *b = molt_realloc(s->blocks, (size_t)cap * sizeof *b);
    if (!b)
        return molt_err(MOLT_ENOMEM, "kv cache: out of memory for a block table");
    s->blocks = b;
    s->cap_blocks = cap;
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
        int32_t b = NIL;
        molt_status st = table_room(s);
        if (st == MOLT_OK)
            st = block_take(kv, &b);
        if (st != MOLT_OK) { // give back what this call took
            while (s->n_blocks > before)
                block_release(kv, s->blocks[--s->n_blocks]);
            return st;
        }
        s->blocks[s->n_blocks++] = b;
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

// ---- prefix caching ---------------------------------------------------------------------------

int mdl_kv_prefix_match(mdl_kvcache *kv, int seq, uint64_t tag, const int32_t *ids, int n) {
    mdl_kv_seq *s = seq_at(kv, seq);
    if (!s || s->len != 0 || s->n_blocks != 0 || !ids)
        return 0;
    int bt = kv->block_tokens, matched = 0;
    int32_t parent = NIL;
    uint32_t parent_gen = 0;
    for (int k = 0; (k + 1) * bt <= n; k++) {
        const int32_t *blk = ids + (int64_t)k * bt;
        uint64_t h = block_key(kv, tag, parent, parent_gen, blk);
        int32_t b = index_find(kv, h, tag, parent, parent_gen, blk);
        if (b == NIL || table_room(s) != MOLT_OK)
            break;
        block_hold(kv, b);
        s->blocks[s->n_blocks++] = b;
        matched += bt;
        parent = b;
        parent_gen = kv->pb[b].gen;
    }
    s->len = matched;
    return matched;
}

molt_status mdl_kv_prefix_publish(mdl_kvcache *kv, int seq, uint64_t tag, const int32_t *ids,
                                  int n) {
    mdl_kv_seq *s = seq_at(kv, seq);
    if (!s)
        return MOLT_EARG;
    int bt = kv->block_tokens, full = (n < s->len ? n : s->len) / bt;
    int32_t parent = NIL;
    uint32_t parent_gen = 0;
    for (int k = 0; k < full; k++) {
        int32_t b = s->blocks[k];
        mdl_kv_pblock *p = &kv->pb[b];
        const int32_t *blk = ids + (int64_t)k * bt;
        uint64_t h = block_key(kv, tag, parent, parent_gen, blk);
        if (!p->indexed) {
            if (index_find(kv, h, tag, parent, parent_gen, blk) != NIL)
                break; // another block holds this prefix: the rest of the chain is private
            if (!p->tokens && !(p->tokens = molt_malloc((size_t)bt * sizeof *p->tokens)))
                return molt_err(MOLT_ENOMEM, "kv cache: out of memory for the prefix index");
            memcpy(p->tokens, blk, (size_t)bt * sizeof *blk);
            p->tag = tag;
            p->hash = h;
            p->parent = parent;
            p->parent_gen = parent_gen;
            MOLT_TRY(index_insert(kv, b));
        } else if (!block_is(kv, b, h, tag, parent, parent_gen, blk)) {
            break; // indexed under other content (cannot happen for a matched chain)
        }
        parent = b;
        parent_gen = p->gen;
    }
    return MOLT_OK;
}
