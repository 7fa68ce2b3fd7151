// data/tok_map.c: the tokenizer's containers: a table of byte strings indexed by id, a hash
// map from byte strings to ids over such a table, and a hash map from id pairs to merges.
// Open addressing with linear probing, power-of-two capacities, at most half full. Not a
// general-purpose library: keys are never removed and tables are built once at load time.
#include "tok_internal.h"

#include <string.h>

// ---- string table ----------------------------------------------------------------------

molt_status tok_strtab_init(tok_strtab *t, size_t n_hint, size_t bytes_hint) {
    memset(t, 0, sizeof *t);
    t->off = molt_malloc((n_hint + 1) * sizeof *t->off);
    t->cap = bytes_hint ? bytes_hint : 64;
    t->pool = molt_malloc(t->cap);
    if (!t->off || !t->pool) {
        tok_strtab_free(t);
        return molt_err(MOLT_ENOMEM, "tokenizer: out of memory for a string table");
    }
    t->off[0] = 0;
    t->n_cap = n_hint + 1;
    return MOLT_OK;
}

molt_status tok_strtab_add(tok_strtab *t, const void *s, size_t len) {
    if (t->size + len > UINT32_MAX)
        return molt_err(MOLT_EFORMAT, "tokenizer: token strings exceed 4 GiB");
    if (t->n + 2 > t->n_cap) {
        size_t na = t->n_cap * 2 + 16;
        uint32_t *o = molt_realloc(t->off, na * sizeof *o);
        if (!o)
            return molt_err(MOLT_ENOMEM, "tokenizer: out of memory for a string table");
        t->off = o;
        t->n_cap = na;
    }
    if (t->size + len > t->cap) {
        size_t nc = t->cap * 2 > t->size + len ? t->cap * 2 : t->size + len;
        char *p = molt_realloc(t->pool, nc);
        if (!p)
            return molt_err(MOLT_ENOMEM, "tokenizer: out of memory for a string table");
        t->pool = p;
        t->cap = nc;
    }
    if (len)
        memcpy(t->pool + t->size, s, len);
    t->size += len;
    t->n++;
    t->off[t->n] = (uint32_t)t->size;
    return MOLT_OK;
}

void tok_strtab_free(tok_strtab *t) {
    molt_free(t->pool);
    molt_free(t->off);
    memset(t, 0, sizeof *t);
}

// ---- hashing ---------------------------------------------------------------------------

static inline uint64_t mix64(uint64_t h) {
    h ^= h >> 32;
    h *= 0xD6E8FEB86659FD93ull;
    h ^= h >> 32;
    return h;
}

// Reads up to 8 bytes little-endian without reading past the end.
static inline uint64_t load_tail(const unsigned char *p, size_t n) {
    uint64_t w = 0;
    for (size_t i = 0; i < n; i++)
        w |= (uint64_t)p[i] << (8 * i);
    return w;
}

uint64_t tok_hash_bytes(const void *s, size_t len) {
    const unsigned char *p = s;
    uint64_t h = 0x243F6A8885A308D3ull ^ (len * 0x9E3779B97F4A7C15ull);
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
        p += 8;
        len -= 8;
    }
    h = (h ^ load_tail(p, len)) * 0x94D049BB133111EBull;
    return mix64(h);
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n)
        c *= 2;
    return c;
}

// ---- string map ------------------------------------------------------------------------

molt_status tok_strmap_init(tok_strmap *m, size_t n_keys) {
    m->n = 0;
    m->cap = pow2_at_least(n_keys * 2);
    m->slots = molt_calloc(m->cap, sizeof *m->slots);
    if (!m->slots)
        return molt_err(MOLT_ENOMEM, "tokenizer: out of memory for a hash map");
    return MOLT_OK;
}

// Slot index where key s is, or the empty slot where it would go.
static size_t strmap_find(const tok_strmap *m, const tok_strtab *keys, const void *s,
                          size_t len, uint64_t h) {
    size_t mask = m->cap - 1, i = (size_t)h & mask;
    uint64_t tag = h >> 32 << 32;
    for (;; i = (i + 1) & mask) {
        uint64_t v = m->slots[i];
        if (!v)
            return i;
        if ((v & 0xFFFFFFFF00000000ull) == tag) {
            size_t klen;
            const char *k = tok_strtab_get(keys, (uint32_t)(v & 0xFFFFFFFFu) - 1, &klen);
            if (klen == len && !memcmp(k, s, len))
                return i;
        }
    }
}

static molt_status strmap_grow(tok_strmap *m, const tok_strtab *keys) {
    tok_strmap g;
    MOLT_TRY(tok_strmap_init(&g, m->cap));
    for (size_t i = 0; i < m->cap; i++) {
        uint64_t v = m->slots[i];
        if (!v)
            continue;
        size_t len;
        const char *k = tok_strtab_get(keys, (uint32_t)(v & 0xFFFFFFFFu) - 1, &len);
        g.slots[strmap_find(&g, keys, k, len, tok_hash_bytes(k, len))] = v;
    }
    g.n = m->n;
    molt_free(m->slots);
    *m = g;
    return MOLT_OK;
}

molt_status tok_strmap_put(tok_strmap *m, const tok_strtab *keys, uint32_t id, uint32_t *dup) {
    *dup = TOK_NONE;
    if ((m->n + 1) * 2 > m->cap)
        MOLT_TRY(strmap_grow(m, keys));
    size_t len;
    const char *k = tok_strtab_get(keys, id, &len);
    uint64_t h = tok_hash_bytes(k, len);
    size_t i = strmap_find(m, keys, k, len, h);
    if (m->slots[i]) {
        *dup = (uint32_t)(m->slots[i] & 0xFFFFFFFFu) - 1;
        return MOLT_OK;
    }
    m->slots[i] = (h >> 32 << 32) | ((uint64_t)id + 1);
    m->n++;
    return MOLT_OK;
}

uint32_t tok_strmap_get(const tok_strmap *m, const tok_strtab *keys, const void *s, size_t len) {
    if (!m->slots)
        return TOK_NONE;
    uint64_t v = m->slots[strmap_find(m, keys, s, len, tok_hash_bytes(s, len))];
    return v ? (uint32_t)(v & 0xFFFFFFFFu) - 1 : TOK_NONE;
}

void tok_strmap_free(tok_strmap *m) {
    molt_free(m->slots);
    m->slots = NULL;
    m->cap = m->n = 0;
}

// ---- pair map --------------------------------------------------------------------------

molt_status tok_pairmap_init(tok_pairmap *m, size_t n_keys) {
    m->n = 0;
    m->cap = pow2_at_least(n_keys * 2);
    m->slots = molt_malloc(m->cap * sizeof *m->slots);
    if (!m->slots)
        return molt_err(MOLT_ENOMEM, "tokenizer: out of memory for the merge table");
    for (size_t i = 0; i < m->cap; i++)
        m->slots[i].key = UINT64_MAX;
    return MOLT_OK;
}

static tok_pair_slot *pairmap_slot(tok_pairmap *m, uint64_t key) {
    uint64_t mask = m->cap - 1;
    uint64_t i = (key * 0x9E3779B97F4A7C15ull) >> 32 & mask;
    while (m->slots[i].key != key && m->slots[i].key != UINT64_MAX)
        i = (i + 1) & mask;
    return &m->slots[i];
}

molt_status tok_pairmap_put(tok_pairmap *m, uint32_t a, uint32_t b, uint32_t prio,
                            uint32_t result) {
    if ((m->n + 1) * 2 > m->cap) {
        tok_pairmap g;
        MOLT_TRY(tok_pairmap_init(&g, m->cap));
        for (size_t i = 0; i < m->cap; i++)
            if (m->slots[i].key != UINT64_MAX)
                *pairmap_slot(&g, m->slots[i].key) = m->slots[i];
        g.n = m->n;
        molt_free(m->slots);
        *m = g;
    }
    uint64_t key = ((uint64_t)a << 32) | b;
    tok_pair_slot *s = pairmap_slot(m, key);
    if (s->key == UINT64_MAX)
        m->n++;
    s->key = key;
    s->prio = prio;
    s->result = result;
    return MOLT_OK;
}

void tok_pairmap_free(tok_pairmap *m) {
    molt_free(m->slots);
    m->slots = NULL;
    m->cap = m->n = 0;
}
