// data/tok_hfjson.c: loads a Hugging Face tokenizer.json whose model is byte-level BPE: the
// vocabulary (keys in GPT-2's byte-to-unicode spelling), merges (priority = index, "a b" or
// ["a", "b"]), ignore_merges, and added_tokens. Components that would change the ids and
// that molt does not implement are refused with an error naming them; the post-processor,
// truncation and padding are ignored, because molt never adds or drops tokens implicitly.
// Not here: normalizer / pre-tokenizer / decoder checks (tok_hfpipe.c), encoding.
#include "tok_internal.h"

#include <stdio.h>
#include <string.h>

// GPT-2's byte-to-unicode map: bytes that are printable and not space keep their code point,
// the other 68 take U+0100.. in byte order. cp_byte[cp] is the byte of code point cp, or -1.
static void byte_level_table(int16_t cp_byte[0x144]) {
    for (int cp = 0; cp < 0x144; cp++)
        cp_byte[cp] = -1;
    int next = 0x100;
    for (int b = 0; b < 256; b++) {
        bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        cp_byte[keep ? b : next++] = (int16_t)b;
    }
}

// Decodes a byte-level spelled string to bytes in out (room for len bytes). Returns the byte
// count, or -1 when a character is outside the map (or the string is not UTF-8).
static long byte_level_decode(const int16_t *cp_byte, const char *s, size_t len,
                              unsigned char *out) {
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        unsigned char c = (unsigned char)s[i];
        uint32_t cp;
        if (c < 0x80) {
            cp = c;
            i++;
        } else if ((c & 0xE0) == 0xC0 && i + 1 < len) {
            cp = (uint32_t)(c & 0x1F) << 6 | ((unsigned char)s[i + 1] & 0x3F);
            i += 2;
        } else
            return -1; // every mapped code point is below U+0800
        if (cp >= 0x144 || cp_byte[cp] < 0)
            return -1;
        out[n++] = (unsigned char)cp_byte[cp];
    }
    return (long)n;
}

typedef struct {
    const char *s; // vocabulary key or added-token text (owned by the JSON tree)
    size_t len;
    json_t *added; // the added_tokens entry of this id, or NULL
} id_slot;

// Records vocab ids in *slots, allocated with *n = highest id + 1 entries.
static molt_status read_vocab_ids(const char *path, json_t *vocab, id_slot **slots, size_t *n) {
    const char *key;
    json_t *v;
    json_int_t max = -1;
    json_object_foreach(vocab, key, v) {
        json_int_t id = json_is_integer(v) ? json_integer_value(v) : -1;
        if (id < 0 || id >= INT32_MAX)
            return tok_ferr(path, "model.vocab", "\"%s\": expected a non-negative integer id",
                            key);
        max = id > max ? id : max;
    }
    *n = (size_t)(max + 1);
    *slots = molt_calloc(*n ? *n : 1, sizeof **slots);
    if (!*slots)
        return molt_err(MOLT_ENOMEM, "tok_load: out of memory");
    json_object_foreach(vocab, key, v) {
        json_int_t id = json_integer_value(v);
        if ((*slots)[id].s)
            return tok_ferr(path, "model.vocab", "\"%s\" and \"%s\" have the same id %lld",
                            (*slots)[id].s, key, (long long)id);
        (*slots)[id].s = key;
        (*slots)[id].len = strlen(key);
    }
    return MOLT_OK;
}

// Reads the added_tokens entry i: id and text; flags in *special, *normalized.
static molt_status read_added(const char *path, json_t *e, size_t i, json_int_t *id,
                              json_t **content, bool *special, bool *normalized) {
    char field[96];
    json_t *jid, *js, *jn;
    snprintf(field, sizeof field, "added_tokens[%zu]", i);
    if (!json_is_object(e))
        return tok_ferr(path, field, "expected an object");
    snprintf(field, sizeof field, "added_tokens[%zu].id", i);
    MOLT_TRY(tok_json_get(path, e, "id", field, JSON_INTEGER, true, &jid));
    *id = json_integer_value(jid);
    if (*id < 0 || *id >= INT32_MAX)
        return tok_ferr(path, field, "expected a non-negative id, got %lld", (long long)*id);
    snprintf(field, sizeof field, "added_tokens[%zu].content", i);
    MOLT_TRY(tok_json_get(path, e, "content", field, JSON_STRING, true, content));
    if (json_string_length(*content) == 0 ||
        strlen(json_string_value(*content)) != json_string_length(*content))
        return tok_ferr(path, field, "expected a non-empty string without NUL");
    snprintf(field, sizeof field, "added_tokens[%zu].special", i);
    MOLT_TRY(tok_json_get(path, e, "special", field, JSON_TRUE, false, &js));
    *special = js && json_is_true(js);
    snprintf(field, sizeof field, "added_tokens[%zu].normalized", i);
    MOLT_TRY(tok_json_get(path, e, "normalized", field, JSON_TRUE, false, &jn));
    *normalized = jn ? json_is_true(jn) : !*special; // Hugging Face's default
    static const char *const unsupported[] = {"lstrip", "rstrip", "single_word"};
    for (int k = 0; k < 3 && !*special; k++) {
        json_t *f;
        snprintf(field, sizeof field, "added_tokens[%zu].%s", i, unsupported[k]);
        MOLT_TRY(tok_json_get(path, e, unsupported[k], field, JSON_TRUE, false, &f));
        if (f && json_is_true(f))
            return tok_ferr(path, field, "true is not supported on a non-special token "
                                         "(expected false)");
    }
    return MOLT_OK;
}

// Puts the added tokens into slots, flags them, and builds the two matching passes.
static molt_status read_added_tokens(const char *path, json_t *root, id_slot **slots, size_t *n,
                                     uint8_t **pass_of) {
    json_t *arr;
    MOLT_TRY(tok_json_get(path, root, "added_tokens", "added_tokens", JSON_ARRAY, false, &arr));
    size_t na = arr ? json_array_size(arr) : 0;
    for (size_t i = 0; i < na; i++) {
        json_int_t id = 0;
        json_t *content = NULL;
        bool special = false, normalized = false;
        json_t *e = json_array_get(arr, i);
        MOLT_TRY(read_added(path, e, i, &id, &content, &special, &normalized));
        if ((size_t)id >= *n) {
            size_t nn = (size_t)id + 1;
            id_slot *p = molt_realloc(*slots, nn * sizeof *p);
            uint8_t *q = molt_realloc(*pass_of, nn);
            if (p)
                *slots = p;
            if (q)
                *pass_of = q;
            if (!p || !q)
                return molt_err(MOLT_ENOMEM, "tok_load: out of memory");
            memset(p + *n, 0, (nn - *n) * sizeof *p);
            memset(q + *n, 0, nn - *n);
            *n = nn;
        }
        if ((*slots)[id].added) {
            char field[64];
            snprintf(field, sizeof field, "added_tokens[%zu].id", i);
            return tok_ferr(path, field, "id %lld is used by an earlier added token",
                            (long long)id);
        }
        (*slots)[id].added = e;
        (*pass_of)[id] = (uint8_t)((normalized ? 2 : 1) | (special ? 4 : 0));
    }
    return MOLT_OK;
}

// Sorts pass p's ids by (first byte, length descending) and indexes them by first byte.
static molt_status build_pass(tok_tokenizer *t, const uint8_t *pass_of, int p) {
    tok_added_pass *a = &t->added[p];
    size_t n = 0;
    for (size_t i = 0; i < t->n_ids; i++)
        n += (pass_of[i] & 3) == p + 1;
    a->ids = molt_malloc((n ? n : 1) * sizeof *a->ids);
    if (!a->ids)
        return molt_err(MOLT_ENOMEM, "tok_load: out of memory");
    // Counting sort by first byte, then insertion sort by length within each bucket.
    uint32_t count[257] = {0};
    for (uint32_t i = 0; i < t->n_ids; i++)
        if ((pass_of[i] & 3) == p + 1)
            count[(unsigned char)t->names.pool[t->names.off[i]] + 1]++;
    for (int c = 0; c < 256; c++)
        count[c + 1] += count[c];
    memcpy(a->first, count, sizeof a->first);
    for (uint32_t i = 0; i < t->n_ids; i++) {
        if ((pass_of[i] & 3) != p + 1)
            continue;
        size_t len, l2;
        tok_strtab_get(&t->names, i, &len);
        unsigned char c = (unsigned char)t->names.pool[t->names.off[i]];
        uint32_t j = count[c]++;
        while (j > a->first[c] && (tok_strtab_get(&t->names, a->ids[j - 1], &l2), l2 < len)) {
            a->ids[j] = a->ids[j - 1];
            j--;
        }
        a->ids[j] = i;
    }
    a->n = n;
    return MOLT_OK;
}

// Fills model/names/flags from the slots.
static molt_status fill_tables(tok_tokenizer *t, const id_slot *slots, const uint8_t *pass_of,
                               const int16_t *cp_byte) {
    unsigned char *buf = NULL;
    size_t cap = 0;
    molt_status st = MOLT_OK;
    for (size_t i = 0; i < t->n_ids && st == MOLT_OK; i++) {
        const id_slot *s = &slots[i];
        if (s->s && s->len > cap) {
            cap = s->len * 2;
            unsigned char *p = molt_realloc(buf, cap);
            if (!p) {
                st = molt_err(MOLT_ENOMEM, "tok_load: out of memory");
                break;
            }
            buf = p;
        }
        long n = s->s ? byte_level_decode(cp_byte, s->s, s->len, buf) : -1;
        if (n > 0) {
            t->flags[i] |= TOK_F_MODEL | TOK_F_BPE;
            st = tok_strtab_add(&t->model, buf, (size_t)n);
        } else if (s->s) { // decodes to its own UTF-8 text, as the ByteLevel decoder does
            t->flags[i] |= TOK_F_MODEL;
            st = tok_strtab_add(&t->model, s->s, s->len);
        } else
            st = tok_strtab_add(&t->model, "", 0);
        if (st == MOLT_OK && s->added) {
            json_t *c = json_object_get(s->added, "content");
            t->flags[i] |= TOK_F_ADDED | ((pass_of[i] & 4) ? TOK_F_SPECIAL : 0);
            st = tok_strtab_add(&t->names, json_string_value(c), json_string_length(c));
        } else if (st == MOLT_OK)
            st = tok_strtab_add(&t->names, "", 0);
    }
    molt_free(buf);
    return st;
}

// One merge rule: its two parts as written (byte-level spelling).
static molt_status merge_parts(const char *path, json_t *e, size_t i, const char **a,
                               size_t *alen, const char **b, size_t *blen) {
    if (json_is_string(e)) {
        const char *s = json_string_value(e), *sp = strchr(s, ' ');
        if (sp && sp > s && sp[1] && !strchr(sp + 1, ' ')) {
            *a = s;
            *alen = (size_t)(sp - s);
            *b = sp + 1;
            *blen = strlen(sp + 1);
            return MOLT_OK;
        }
    } else if (json_is_array(e) && json_array_size(e) == 2 &&
               json_is_string(json_array_get(e, 0)) && json_is_string(json_array_get(e, 1))) {
        *a = json_string_value(json_array_get(e, 0));
        *alen = json_string_length(json_array_get(e, 0));
        *b = json_string_value(json_array_get(e, 1));
        *blen = json_string_length(json_array_get(e, 1));
        if (*alen && *blen)
            return MOLT_OK;
    }
    char field[64];
    snprintf(field, sizeof field, "model.merges[%zu]", i);
    return tok_ferr(path, field, "expected \"left right\" or [\"left\", \"right\"]");
}

// Id of the byte-level token spelled s[0..len), decoded into buf + off; TOK_NONE if none.
static uint32_t lookup_spelled(const tok_tokenizer *t, const int16_t *cp_byte, const char *s,
                               size_t len, unsigned char *buf, long *n) {
    *n = byte_level_decode(cp_byte, s, len, buf);
    return *n > 0 ? tok_strmap_get(&t->by_bytes, &t->model, buf, (size_t)*n) : TOK_NONE;
}

static molt_status read_merges(const char *path, json_t *merges, tok_tokenizer *t,
                               const int16_t *cp_byte) {
    size_t n = json_array_size(merges), cap = 0;
    unsigned char *buf = NULL;
    molt_status st = tok_pairmap_init(&t->merges, n);
    for (size_t i = 0; i < n && st == MOLT_OK; i++) {
        const char *a = NULL, *b = NULL;
        size_t alen = 0, blen = 0;
        st = merge_parts(path, json_array_get(merges, i), i, &a, &alen, &b, &blen);
        if (st != MOLT_OK)
            break;
        if (alen + blen > cap) {
            cap = 2 * (alen + blen);
            unsigned char *p = molt_realloc(buf, cap);
            if (!p) {
                st = molt_err(MOLT_ENOMEM, "tok_load: out of memory");
                break;
            }
            buf = p;
        }
        long na, nb;
        uint32_t ia = lookup_spelled(t, cp_byte, a, alen, buf, &na);
        uint32_t ib = lookup_spelled(t, cp_byte, b, blen, buf + (na > 0 ? na : 0), &nb);
        uint32_t ir = na > 0 && nb > 0
                          ? tok_strmap_get(&t->by_bytes, &t->model, buf, (size_t)(na + nb))
                          : TOK_NONE;
        if (ia == TOK_NONE || ib == TOK_NONE || ir == TOK_NONE) {
            char field[64];
            snprintf(field, sizeof field, "model.merges[%zu]", i);
            if (ia == TOK_NONE || ib == TOK_NONE)
                st = tok_ferr(path, field, "\"%.*s\" is not a byte-level token of model.vocab",
                              ia == TOK_NONE ? (int)alen : (int)blen, ia == TOK_NONE ? a : b);
            else
                st = tok_ferr(path, field,
                              "\"%.*s\" + \"%.*s\" is not a byte-level token of model.vocab",
                              (int)alen, a, (int)blen, b);
            break;
        }
        // A merge into a special token would let plain text produce it: left out.
        if (!(t->flags[ir] & TOK_F_SPECIAL))
            st = tok_pairmap_put(&t->merges, ia, ib, (uint32_t)i, ir);
    }
    molt_free(buf);
    return st;
}

static molt_status check_model(const char *path, json_t *model) {
    json_t *v = json_object_get(model, "dropout");
    if (v && !json_is_null(v))
        return tok_ferr(path, "model.dropout", "BPE dropout is not supported (expected null)");
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int k = 0; k < 2; k++) {
        v = json_object_get(model, affixes[k]);
        if (v && !json_is_null(v) && !(json_is_string(v) && json_string_length(v) == 0)) {
            char field[64];
            snprintf(field, sizeof field, "model.%s", affixes[k]);
            return tok_ferr(path, field, "not supported (expected null)");
        }
    }
    v = json_object_get(model, "byte_fallback");
    if (v && json_is_true(v))
        return tok_ferr(path, "model.byte_fallback", "true is not supported (expected false)");
    return MOLT_OK;
}

// The vocabulary, added tokens and merges; slots/pass_of are the caller's to free.
static molt_status load_tables(const char *path, json_t *root, json_t *model, tok_tokenizer *t,
                               id_slot **slots, uint8_t **pass_of) {
    json_t *vocab, *merges;
    int16_t cp_byte[0x144];
    size_t n = 0;
    byte_level_table(cp_byte);
    MOLT_TRY(tok_json_get(path, model, "vocab", "model.vocab", JSON_OBJECT, true, &vocab));
    MOLT_TRY(tok_json_get(path, model, "merges", "model.merges", JSON_ARRAY, true, &merges));
    MOLT_TRY(read_vocab_ids(path, vocab, slots, &n));
    *pass_of = molt_calloc(n ? n : 1, 1);
    if (!*pass_of)
        return molt_err(MOLT_ENOMEM, "tok_load: out of memory");
    MOLT_TRY(read_added_tokens(path, root, slots, &n, pass_of));
    MOLT_TRY(tok_alloc_tables(t, n));
    MOLT_TRY(fill_tables(t, *slots, *pass_of, cp_byte));
    MOLT_TRY(tok_build_maps(t, path, "model.vocab"));
    MOLT_TRY(read_merges(path, merges, t, cp_byte));
    MOLT_TRY(build_pass(t, *pass_of, 0));
    return build_pass(t, *pass_of, 1);
}

molt_status tok_hf_load(const char *path, json_t *root, tok_tokenizer *t) {
    json_t *model, *type, *im;
    t->kind = TOK_KIND_HF;
    MOLT_TRY(tok_json_get(path, root, "model", "model", JSON_OBJECT, true, &model));
    MOLT_TRY(tok_json_get(path, model, "type", "model.type", JSON_STRING, true, &type));
    if (strcmp(json_string_value(type), "BPE"))
        return tok_ferr(path, "model.type", "\"%s\" is not supported (expected \"BPE\")",
                        json_string_value(type));
    MOLT_TRY(check_model(path, model));
    MOLT_TRY(tok_json_get(path, model, "ignore_merges", "model.ignore_merges", JSON_TRUE, false,
                          &im));
    t->ignore_merges = im && json_is_true(im);
    MOLT_TRY(tok_hf_pipeline(path, root, t));
    id_slot *slots = NULL;
    uint8_t *pass_of = NULL;
    molt_status st = load_tables(path, root, model, t, &slots, &pass_of);
    molt_free(slots);
    molt_free(pass_of);
    MOLT_TRY(st);
    return tok_hf_read_config(path, t);
}
