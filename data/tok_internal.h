// data/tok_internal.h: the inside of a tok_tokenizer, shared by the tok_*.c files and the
// tokenizer tests. Not a public API: the rest of molt uses data/tokenizer.h only.
//
// Both formats are reduced to one machine: an optional added-token pass (tokenizer.json),
// a list of regex split steps (pre-tokenization), and byte-level BPE driven by a pair table
// (left id, right id) -> (priority, merged id). Ids everywhere are the public token ids.
#ifndef MOLT_DATA_TOK_INTERNAL_H
#define MOLT_DATA_TOK_INTERNAL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>

#include "tokenizer.h"

#define TOK_NONE UINT32_MAX

// ---- string table and maps (tok_map.c) -------------------------------------------------

// Byte strings indexed by id, stored back to back.
typedef struct {
    char *pool;    // (size) string i is pool[off[i] .. off[i + 1])
    uint32_t *off; // (n_cap) n + 1 used
    size_t n, size, cap, n_cap;
} tok_strtab;

// Byte string -> id of a tok_strtab (the table holds the key bytes), open addressing.
typedef struct {
    uint64_t *slots; // (cap) (hash high 32 bits << 32) | (id + 1); 0 = empty
    size_t cap, n;
} tok_strmap;

// (left id, right id) -> (priority, merged id), open addressing.
typedef struct {
    uint64_t key; // ((uint64_t)left << 32) | right; UINT64_MAX = empty
    uint32_t prio, result;
} tok_pair_slot;
typedef struct {
    tok_pair_slot *slots; // (cap)
    size_t cap, n;
} tok_pairmap;

molt_status tok_strtab_init(tok_strtab *t, size_t n_hint, size_t bytes_hint);
// Appends string n (the next id).
molt_status tok_strtab_add(tok_strtab *t, const void *s, size_t len);
void tok_strtab_free(tok_strtab *t);
static inline const char *tok_strtab_get(const tok_strtab *t, uint32_t id, size_t *len) {
    *len = t->off[id + 1] - t->off[id];
    return t->pool + t->off[id];
}

uint64_t tok_hash_bytes(const void *s, size_t len);
molt_status tok_strmap_init(tok_strmap *m, size_t n_keys);
// Adds key bytes keys[id] -> id. When an equal key is already present, stores nothing and
// sets *dup to the id that holds it (otherwise *dup = TOK_NONE).
molt_status tok_strmap_put(tok_strmap *m, const tok_strtab *keys, uint32_t id, uint32_t *dup);
uint32_t tok_strmap_get(const tok_strmap *m, const tok_strtab *keys, const void *s, size_t len);
void tok_strmap_free(tok_strmap *m);

molt_status tok_pairmap_init(tok_pairmap *m, size_t n_keys);
// Inserts or overwrites (a, b).
molt_status tok_pairmap_put(tok_pairmap *m, uint32_t a, uint32_t b, uint32_t prio,
                            uint32_t result);
void tok_pairmap_free(tok_pairmap *m);
// Priority of merging (a, b) (TOK_NONE when they do not merge); the merged id in *result.
static inline uint32_t tok_pairmap_get(const tok_pairmap *m, uint32_t a, uint32_t b,
                                       uint32_t *result) {
    uint64_t key = ((uint64_t)a << 32) | b, mask = m->cap - 1;
    uint64_t i = (key * 0x9E3779B97F4A7C15ull) >> 32 & mask;
    for (;; i = (i + 1) & mask) {
        const tok_pair_slot *s = &m->slots[i];
        if (s->key == key) {
            *result = s->result;
            return s->prio;
        }
        if (s->key == UINT64_MAX)
            return TOK_NONE;
    }
}

// ---- the tokenizer ---------------------------------------------------------------------

enum { TOK_KIND_TEKKEN, TOK_KIND_HF };

enum {
    TOK_F_MODEL = 1,   // model[id] holds the token's bytes
    TOK_F_BPE = 2,     // ...and BPE can produce it (it is in by_bytes)
    TOK_F_ADDED = 4,   // names[id] holds an added/special token's text
    TOK_F_SPECIAL = 8, // a special token: never produced from plain text
};

typedef enum {
    TOK_SPLIT_ISOLATED,
    TOK_SPLIT_REMOVED,
    TOK_SPLIT_MERGED_PREV,
    TOK_SPLIT_MERGED_NEXT,
    TOK_SPLIT_CONTIGUOUS,
} tok_split_behavior;

// One pre-tokenization step: cut every piece at the matches of re.
typedef struct {
    pcre2_code *re;
    bool jit; // re was JIT-compiled
    tok_split_behavior behavior;
} tok_split;

// Added tokens of one matching pass (tokenizer.json), bucketed by first byte, longest first
// within a bucket so the first hit at a position is the leftmost-longest match.
typedef struct {
    uint32_t *ids;       // (n) sorted by (first byte, length descending)
    uint32_t first[257]; // ids[first[c] .. first[c + 1]) start with byte c
    size_t n;
} tok_added_pass;

struct tok_tokenizer {
    int kind;
    size_t n_ids;     // ids are in [0, n_ids)
    uint8_t *flags;   // (n_ids) TOK_F_*
    tok_strtab model; // (n_ids) byte-level token bytes ("" where absent)
    tok_strtab names; // (n_ids) added/special token text ("" where absent)
    tok_strmap by_bytes; // token bytes -> id, over model, for ids with TOK_F_BPE
    tok_strmap by_name;  // text -> id, over names, for ids with TOK_F_ADDED
    tok_pairmap merges;
    uint32_t byte_id[256]; // id of the one-byte token of each byte value
    bool ignore_merges;    // a piece that is itself a token is emitted whole
    // (n_ids) memo filled by tok_encode: does BPE of a token's own bytes give that token?
    // 0 unknown, 1 yes, 2 no. Relaxed atomics: threads that race store the same value.
    atomic_uchar *whole;
    tok_split *splits;     // (n_splits) applied in order
    size_t n_splits;
    tok_added_pass added[2]; // non-normalized, then normalized added tokens
    int32_t bos, eos;        // -1 when unknown
};

// ---- loading helpers (tok_common.c) ----------------------------------------------------

// Every loader error: MOLT_EFORMAT "FILE: field: what" (field may be "" for the whole file).
molt_status tok_ferr(const char *path, const char *field, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
// Member key of obj with the given JSON type (JSON_OBJECT, JSON_STRING, ...; JSON_INTEGER
// for integers, JSON_TRUE for booleans). Missing or null: *out = NULL, and an error only
// when required. field names the member in messages ("config.pattern").
molt_status tok_json_get(const char *path, const json_t *obj, const char *key,
                         const char *field, int type, bool required, json_t **out);
// Allocates t with n_ids ids, empty tables, flags zeroed.
molt_status tok_alloc_tables(tok_tokenizer *t, size_t n_ids);
// Compiles a UTF + UCP pattern (literal when literal) with JIT when available.
molt_status tok_split_compile(const char *path, const char *field, const char *pattern,
                              size_t len, bool literal, tok_split_behavior b, tok_split *out);
// Builds by_bytes (ids flagged TOK_F_BPE), by_name (TOK_F_ADDED) and byte_id; field names
// the vocabulary in messages.
molt_status tok_build_maps(tok_tokenizer *t, const char *path, const char *field);

molt_status tok_tekken_load(const char *path, json_t *root, tok_tokenizer *t);
molt_status tok_hf_load(const char *path, json_t *root, tok_tokenizer *t);
// tokenizer.json's normalizer / pre_tokenizer / decoder: checks them and sets t->splits.
molt_status tok_hf_pipeline(const char *path, json_t *root, tok_tokenizer *t);
// bos/eos from a tokenizer_config.json beside path (".../x-tokenizer.json" ->
// ".../x-tokenizer_config.json"), when there is one.
molt_status tok_hf_read_config(const char *path, tok_tokenizer *t);

// ---- encoding (tok_bpe.c, tok_encode.c) ------------------------------------------------

// Merges the symbols sym[0..n) in place (leftmost lowest-priority pair first) and returns the
// new count. use_heap picks the O(n log n) path that long pieces take; both give the same
// result. scratch holds the heap path's work space (grown as needed, molt_free it).
molt_status tok_bpe_merge(const tok_tokenizer *t, uint32_t *sym, size_t *n, bool use_heap,
                          void **scratch, size_t *scratch_cap);
// Appends the ids of one pre-tokenized piece.
molt_status tok_bpe_piece(const tok_tokenizer *t, const char *s, size_t len, tok_ids *out,
                          void **scratch, size_t *scratch_cap);

// Length of the valid UTF-8 prefix of s[0..len) (strict: no overlongs, surrogates or code
// points above U+10FFFF).
size_t tok_utf8_valid_prefix(const char *s, size_t len);

#endif
