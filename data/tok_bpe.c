// data/tok_bpe.c: byte-level BPE on one pre-tokenized piece. Starting from one symbol per
// byte, the adjacent pair with the lowest merge priority is merged, leftmost first on ties,
// until no pair merges. Tekken's priority is the rank of the merged token (tiktoken's rule);
// tokenizer.json's is the index of the pair in `merges`. Both come from t->merges.
// Short pieces use a plain scan (quadratic, but tiny and cache-friendly); long ones (runs
// of spaces, repeated characters) a binary heap with lazily dropped stale entries, so that
// no input goes quadratic. Not here: splitting text into pieces (tok_encode.c).
#include "tok_internal.h"

#include <string.h>

// Pieces up to this many bytes take the scan path.
#define SCAN_MAX 48

static void merge_scan(const tok_tokenizer *t, uint32_t *sym, size_t *np) {
    size_t n = *np;
    uint32_t pr[SCAN_MAX], res[SCAN_MAX]; // pair i = (sym[i], sym[i + 1])
    for (size_t i = 0; i + 1 < n; i++)
        pr[i] = tok_pairmap_get(&t->merges, sym[i], sym[i + 1], &res[i]);
    while (n > 1) {
        uint32_t best = TOK_NONE;
        size_t b = 0;
        for (size_t i = 0; i + 1 < n; i++)
            if (pr[i] < best) {
                best = pr[i];
                b = i;
            }
        if (best == TOK_NONE)
            break;
        sym[b] = res[b];
        size_t tail = n - b - 2; // symbols after b + 1
        memmove(sym + b + 1, sym + b + 2, tail * sizeof *sym);
        if (tail > 0) {
            memmove(pr + b + 1, pr + b + 2, (tail - 1) * sizeof *pr);
            memmove(res + b + 1, res + b + 2, (tail - 1) * sizeof *res);
        }
        n--;
        if (b > 0)
            pr[b - 1] = tok_pairmap_get(&t->merges, sym[b - 1], sym[b], &res[b - 1]);
        if (b + 1 < n)
            pr[b] = tok_pairmap_get(&t->merges, sym[b], sym[b + 1], &res[b]);
    }
    *np = n;
}

// ---- heap path -------------------------------------------------------------------------

typedef struct {
    uint64_t key;                 // (priority << 32) | position of the left symbol
    uint32_t left, right, result; // the pair when pushed; stale once either symbol changed
} heap_ent;

typedef struct {
    uint32_t *id;          // (n) symbol ids, TOK_NONE once merged away
    int32_t *prev, *next;  // (n) linked list of live symbols, -1 at the ends
    heap_ent *heap;        // (3n) min-heap on key
    size_t len;
} merge_state;

static void heap_push(merge_state *m, heap_ent e) {
    size_t i = m->len++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (m->heap[p].key <= e.key)
            break;
        m->heap[i] = m->heap[p];
        i = p;
    }
    m->heap[i] = e;
}

static heap_ent heap_pop(merge_state *m) {
    heap_ent top = m->heap[0], last = m->heap[--m->len];
    size_t i = 0, n = m->len;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && m->heap[c + 1].key < m->heap[c].key)
            c++;
        if (last.key <= m->heap[c].key)
            break;
        m->heap[i] = m->heap[c];
        i = c;
    }
    if (n > 0)
        m->heap[i] = last;
    return top;
}

static void push_pair(const tok_tokenizer *t, merge_state *m, int32_t a, int32_t b) {
    heap_ent e = {0, m->id[a], m->id[b], 0};
    uint32_t prio = tok_pairmap_get(&t->merges, e.left, e.right, &e.result);
    if (prio == TOK_NONE)
        return;
    e.key = ((uint64_t)prio << 32) | (uint32_t)a;
    heap_push(m, e);
}

static molt_status merge_heap(const tok_tokenizer *t, uint32_t *sym, size_t *np, void **scratch,
                              size_t *scratch_cap) {
    size_t n = *np;
    if (n > INT32_MAX)
        return molt_err(MOLT_EARG, "tok_encode: a piece of %zu bytes is too long", n);
    size_t need = n * (3 * sizeof(uint32_t) + 3 * sizeof(heap_ent));
    if (*scratch_cap < need) {
        void *p = molt_realloc(*scratch, need);
        if (!p)
            return molt_err(MOLT_ENOMEM, "tok_encode: out of memory (%zu bytes)", need);
        *scratch = p;
        *scratch_cap = need;
    }
    merge_state m = {0};
    m.heap = *scratch; // heap_ent first: keeps its 8-byte alignment
    m.id = (uint32_t *)(m.heap + 3 * n);
    m.prev = (int32_t *)(m.id + n);
    m.next = m.prev + n;
    for (size_t i = 0; i < n; i++) {
        m.id[i] = sym[i];
        m.prev[i] = (int32_t)i - 1;
        m.next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++)
        push_pair(t, &m, (int32_t)i, (int32_t)i + 1);
    while (m.len > 0) {
        heap_ent e = heap_pop(&m);
        int32_t a = (int32_t)(e.key & 0xFFFFFFFFu), b = m.next[a];
        if (b < 0 || m.id[a] != e.left || m.id[b] != e.right)
            continue; // stale: one of the two symbols has merged since
        m.id[a] = e.result;
        m.id[b] = TOK_NONE;
        m.next[a] = m.next[b];
        if (m.next[b] >= 0)
            m.prev[m.next[b]] = a;
        if (m.prev[a] >= 0)
            push_pair(t, &m, m.prev[a], a);
        if (m.next[a] >= 0)
            push_pair(t, &m, a, m.next[a]);
    }
    size_t k = 0;
    for (int32_t i = 0; i >= 0; i = m.next[i])
        sym[k++] = m.id[i];
    *np = k;
    return MOLT_OK;
}

molt_status tok_bpe_merge(const tok_tokenizer *t, uint32_t *sym, size_t *n, bool use_heap,
                          void **scratch, size_t *scratch_cap) {
    if (*n < 2)
        return MOLT_OK;
    if (!use_heap && *n <= SCAN_MAX) {
        merge_scan(t, sym, n);
        return MOLT_OK;
    }
    return merge_heap(t, sym, n, scratch, scratch_cap);
}

// Makes room for extra more ids.
static molt_status ids_reserve(tok_ids *v, size_t extra) {
    if (v->n + extra <= v->cap)
        return MOLT_OK;
    size_t cap = v->cap ? v->cap * 2 : 256;
    while (cap < v->n + extra)
        cap *= 2;
    int32_t *p = molt_realloc(v->ids, cap * sizeof *p);
    if (!p)
        return molt_err(MOLT_ENOMEM, "tok_encode: out of memory for %zu ids", cap);
    v->ids = p;
    v->cap = cap;
    return MOLT_OK;
}

molt_status tok_bpe_piece(const tok_tokenizer *t, const char *s, size_t len, tok_ids *out,
                          void **scratch, size_t *scratch_cap) {
    if (len == 0)
        return MOLT_OK;
    MOLT_TRY(ids_reserve(out, len));
    if (len == 1) {
        out->ids[out->n++] = (int32_t)t->byte_id[(unsigned char)s[0]];
        return MOLT_OK;
    }
    // A piece that is a token: tiktoken and ignore_merges emit it as it is; otherwise BPE
    // decides, and its verdict for that token is remembered (most pieces are common words).
    uint32_t id = tok_strmap_get(&t->by_bytes, &t->model, s, len);
    if (id != TOK_NONE && (t->flags[id] & TOK_F_SPECIAL))
        id = TOK_NONE; // never emitted for text
    int known = 0;
    if (id != TOK_NONE) {
        known = t->ignore_merges ? 1 : atomic_load_explicit(&t->whole[id], memory_order_relaxed);
        if (known == 1) {
            out->ids[out->n++] = (int32_t)id;
            return MOLT_OK;
        }
    }
    // The symbols are built in the output buffer itself: it already has room for len ids.
    uint32_t *sym = (uint32_t *)(out->ids + out->n);
    for (size_t i = 0; i < len; i++)
        sym[i] = t->byte_id[(unsigned char)s[i]];
    size_t n = len;
    MOLT_TRY(tok_bpe_merge(t, sym, &n, false, scratch, scratch_cap));
    if (id != TOK_NONE && known == 0)
        atomic_store_explicit(&t->whole[id], n == 1 && sym[0] == id ? 1 : 2,
                              memory_order_relaxed);
    out->n += n;
    return MOLT_OK;
}
