// data/tok_common.c: the format-independent half of data/tokenizer.h: loading (format
// detection, JSON field helpers with "FILE: field: what" errors, the shared tables), decode,
// special-token lookup and id lists. Not here: the two file formats (tok_tekken.c,
// tok_hfjson.c), text splitting (tok_encode.c) and BPE (tok_bpe.c).
#include "tok_internal.h"

#include <errno.h>
#include <stdarg.h>
#include <string.h>

// ---- id lists --------------------------------------------------------------------------

void tok_ids_free(tok_ids *v) {
    molt_free(v->ids);
    v->ids = NULL;
    v->n = v->cap = 0;
}

molt_status tok_ids_push(tok_ids *v, int32_t id) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        int32_t *p = molt_realloc(v->ids, cap * sizeof *p);
        if (!p)
            return molt_err(MOLT_ENOMEM, "tok_ids_push: out of memory for %zu ids", cap);
        v->ids = p;
        v->cap = cap;
    }
    v->ids[v->n++] = id;
    return MOLT_OK;
}

// ---- loader helpers --------------------------------------------------------------------

molt_status tok_ferr(const char *path, const char *field, const char *fmt, ...) {
    char what[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (field && field[0])
        return molt_err(MOLT_EFORMAT, "%s: %s: %s", path, field, what);
    return molt_err(MOLT_EFORMAT, "%s: %s", path, what);
}

static const char *json_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

molt_status tok_json_get(const char *path, const json_t *obj, const char *key,
                         const char *field, int type, bool required, json_t **out) {
    json_t *v = json_object_get(obj, key);
    *out = NULL;
    if (!v || json_is_null(v)) {
        if (required)
            return tok_ferr(path, field, "missing (expected %s)",
                            type == JSON_OBJECT    ? "an object"
                            : type == JSON_ARRAY   ? "an array"
                            : type == JSON_STRING  ? "a string"
                            : type == JSON_INTEGER ? "an integer"
                                                   : "a boolean");
        return MOLT_OK;
    }
    bool ok = type == JSON_TRUE ? json_is_boolean(v) : (int)json_typeof(v) == type;
    if (!ok) {
        const char *want = type == JSON_OBJECT    ? "an object"
                           : type == JSON_ARRAY   ? "an array"
                           : type == JSON_STRING  ? "a string"
                           : type == JSON_INTEGER ? "an integer"
                                                  : "a boolean";
        return tok_ferr(path, field, "expected %s, got %s", want, json_type_name(v));
    }
    *out = v;
    return MOLT_OK;
}

molt_status tok_alloc_tables(tok_tokenizer *t, size_t n_ids) {
    t->n_ids = n_ids;
    t->flags = molt_calloc(n_ids, 1);
    t->whole = molt_calloc(n_ids, sizeof *t->whole);
    if (!t->flags || !t->whole)
        return molt_err(MOLT_ENOMEM, "tok_load: out of memory for %zu token flags", n_ids);
    MOLT_TRY(tok_strtab_init(&t->model, n_ids, n_ids * 8));
    MOLT_TRY(tok_strtab_init(&t->names, n_ids, 64));
    return MOLT_OK;
}

// Copies pattern with \s and \S spelled as the Unicode White_Space property. The encoders
// the ids must match (Rust's regex for tiktoken, Oniguruma for tokenizers) define \s that
// way; PCRE2's \s also takes U+180E. Returns a molt_malloc'd string, or NULL.
static char *white_space_pattern(const char *p, size_t len, size_t *out_len) {
    char *o = molt_malloc(len * 8 + 1), *w = o; // "\s" (2) -> "\p{White_Space}" (15)
    if (!o)
        return NULL;
    bool quoted = false; // inside \Q...\E every character is literal
    for (size_t i = 0; i < len; i++) {
        if (p[i] != '\\' || i + 1 == len) {
            *w++ = p[i];
            continue;
        }
        char c = p[++i];
        if (quoted || (c != 's' && c != 'S')) {
            quoted = quoted ? c != 'E' : c == 'Q';
            *w++ = '\\';
            *w++ = c;
            continue;
        }
        memcpy(w, c == 's' ? "\\p{White_Space}" : "\\P{White_Space}", 15);
        w += 15;
    }
    *w = 0;
    *out_len = (size_t)(w - o);
    return o;
}

molt_status tok_split_compile(const char *path, const char *field, const char *pattern,
                              size_t len, bool literal, tok_split_behavior b, tok_split *out) {
    int err;
    PCRE2_SIZE at;
    size_t n = len;
    char *p = literal ? NULL : white_space_pattern(pattern, len, &n);
    if (!literal && !p)
        return molt_err(MOLT_ENOMEM, "tok_load: out of memory");
    // PCRE2_LITERAL admits no PCRE2_UCP (nothing to classify in a literal).
    uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    out->behavior = b;
    out->re = pcre2_compile((PCRE2_SPTR)(p ? p : pattern), n, opts, &err, &at, NULL);
    molt_free(p);
    if (!out->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(err, msg, sizeof msg);
        return tok_ferr(path, field, "invalid regular expression: %s", (const char *)msg);
    }
    // Without JIT (unsupported CPU or build) the interpreter gives the same matches.
    out->jit = pcre2_jit_compile(out->re, PCRE2_JIT_COMPLETE) == 0;
    return MOLT_OK;
}

molt_status tok_build_maps(tok_tokenizer *t, const char *path, const char *field) {
    size_t n_bpe = 0, n_named = 0;
    for (size_t i = 0; i < t->n_ids; i++) {
        n_bpe += (t->flags[i] & TOK_F_BPE) != 0;
        n_named += (t->flags[i] & TOK_F_ADDED) != 0;
    }
    MOLT_TRY(tok_strmap_init(&t->by_bytes, n_bpe));
    MOLT_TRY(tok_strmap_init(&t->by_name, n_named));
    for (uint32_t i = 0; i < t->n_ids; i++) {
        uint32_t dup;
        if (t->flags[i] & TOK_F_BPE) {
            MOLT_TRY(tok_strmap_put(&t->by_bytes, &t->model, i, &dup));
            if (dup != TOK_NONE)
                return tok_ferr(path, field, "tokens %u and %u have the same bytes", dup, i);
        }
        if (t->flags[i] & TOK_F_ADDED) {
            MOLT_TRY(tok_strmap_put(&t->by_name, &t->names, i, &dup));
            if (dup != TOK_NONE) {
                size_t len;
                const char *s = tok_strtab_get(&t->names, i, &len);
                return tok_ferr(path, "", "tokens %u and %u are both named \"%.*s\"", dup, i,
                                (int)len, s);
            }
        }
    }
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        t->byte_id[b] = tok_strmap_get(&t->by_bytes, &t->model, &c, 1);
        if (t->byte_id[b] == TOK_NONE)
            return tok_ferr(path, field, "no token for the byte 0x%02x (byte-level BPE needs all 256)",
                            b);
    }
    return MOLT_OK;
}

// ---- load / free -----------------------------------------------------------------------

// Reads a whole file into a molt_malloc'd buffer.
static molt_status read_file(const char *path, char **buf, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return molt_err(MOLT_EIO, "%s: cannot open: %s", path, strerror(errno));
    size_t cap = 1 << 20, n = 0;
    char *b = molt_malloc(cap);
    while (b) {
        n += fread(b + n, 1, cap - n, f);
        if (n < cap)
            break;
        char *nb = molt_realloc(b, cap * 2);
        if (!nb)
            molt_free(b);
        b = nb;
        cap *= 2;
    }
    int err = ferror(f);
    fclose(f);
    if (!b)
        return molt_err(MOLT_ENOMEM, "%s: out of memory reading the file", path);
    if (err) {
        molt_free(b);
        return molt_err(MOLT_EIO, "%s: read error", path);
    }
    *buf = b;
    *len = n;
    return MOLT_OK;
}

molt_status tok_load(const char *path, tok_tokenizer **out) {
    *out = NULL;
    char *text = NULL;
    size_t len = 0;
    MOLT_TRY(read_file(path, &text, &len));
    json_error_t je;
    // tekken.json spells the byte 0 as "\u0000": allow NUL inside strings.
    json_t *root = json_loadb(text, len, JSON_ALLOW_NUL, &je);
    molt_free(text);
    if (!root)
        return molt_err(MOLT_EFORMAT, "%s: line %d column %d: %s", path, je.line, je.column,
                        je.text);
    molt_status st;
    tok_tokenizer *t = molt_calloc(1, sizeof *t);
    if (!t) {
        json_decref(root);
        return molt_err(MOLT_ENOMEM, "tok_load: out of memory");
    }
    t->bos = t->eos = -1;
    if (!json_is_object(root))
        st = tok_ferr(path, "", "expected a JSON object, got %s", json_type_name(root));
    else if (json_object_get(root, "model"))
        st = tok_hf_load(path, root, t);
    else if (json_object_get(root, "vocab") && json_object_get(root, "config"))
        st = tok_tekken_load(path, root, t);
    else
        st = tok_ferr(path, "",
                      "neither a tekken.json (config, vocab) nor a tokenizer.json (model)");
    json_decref(root);
    if (st != MOLT_OK) {
        tok_free(t);
        return st;
    }
    *out = t;
    return MOLT_OK;
}

void tok_free(tok_tokenizer *t) {
    if (!t)
        return;
    for (size_t i = 0; i < t->n_splits; i++)
        pcre2_code_free(t->splits[i].re);
    molt_free(t->splits);
    for (int p = 0; p < 2; p++)
        molt_free(t->added[p].ids);
    tok_strmap_free(&t->by_bytes);
    tok_strmap_free(&t->by_name);
    tok_pairmap_free(&t->merges);
    tok_strtab_free(&t->model);
    tok_strtab_free(&t->names);
    molt_free(t->flags);
    molt_free((void *)t->whole);
    molt_free(t);
}

// ---- queries ---------------------------------------------------------------------------

// Bytes that id decodes to, or NULL when id has none.
static const char *id_bytes(const tok_tokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || (size_t)id >= t->n_ids)
        return NULL;
    if (t->flags[id] & TOK_F_ADDED)
        return tok_strtab_get(&t->names, (uint32_t)id, len);
    if (t->flags[id] & TOK_F_MODEL)
        return tok_strtab_get(&t->model, (uint32_t)id, len);
    return NULL;
}

molt_status tok_decode(const tok_tokenizer *t, const int32_t *ids, size_t n, char **buf,
                       size_t *len) {
    size_t add = 0, l;
    for (size_t i = 0; i < n; i++) {
        if (!id_bytes(t, ids[i], &l)) {
            if (ids[i] < 0 || (size_t)ids[i] >= t->n_ids)
                return molt_err(MOLT_EARG, "tok_decode: id %d at position %zu is outside [0, %zu)",
                                ids[i], i, t->n_ids);
            return molt_err(MOLT_EARG, "tok_decode: id %d at position %zu has no token", ids[i],
                            i);
        }
        add += l;
    }
    char *p = molt_realloc(*buf, *len + add + 1);
    if (!p)
        return molt_err(MOLT_ENOMEM, "tok_decode: out of memory for %zu bytes", *len + add + 1);
    *buf = p;
    for (size_t i = 0; i < n; i++) {
        const char *s = id_bytes(t, ids[i], &l);
        memcpy(p + *len, s, l);
        *len += l;
    }
    p[*len] = 0;
    return MOLT_OK;
}

int32_t tok_special(const tok_tokenizer *t, const char *name) {
    uint32_t id = tok_strmap_get(&t->by_name, &t->names, name, strlen(name));
    return id == TOK_NONE ? -1 : (int32_t)id;
}

bool tok_is_special(const tok_tokenizer *t, int32_t id) {
    return id >= 0 && (size_t)id < t->n_ids && (t->flags[id] & TOK_F_SPECIAL);
}

size_t tok_vocab_size(const tok_tokenizer *t) { return t->n_ids; }

const char *tok_kind(const tok_tokenizer *t) {
    return t->kind == TOK_KIND_TEKKEN ? "tekken" : "tokenizer.json";
}

int32_t tok_bos(const tok_tokenizer *t) { return t->bos; }
int32_t tok_eos(const tok_tokenizer *t) { return t->eos; }

// ---- UTF-8 -----------------------------------------------------------------------------

size_t tok_utf8_valid_prefix(const char *str, size_t len) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        unsigned c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        unsigned lo = 0x80, hi = 0xBF; // allowed range of the second byte
        if (c >= 0xC2 && c <= 0xDF)
            n = 2;
        else if (c >= 0xE0 && c <= 0xEF) {
            n = 3;
            if (c == 0xE0)
                lo = 0xA0; // overlong
            if (c == 0xED)
                hi = 0x9F; // surrogates
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 4;
            if (c == 0xF0)
                lo = 0x90; // overlong
            if (c == 0xF4)
                hi = 0x8F; // above U+10FFFF
        } else
            return i;
        if (i + n > len || s[i + 1] < lo || s[i + 1] > hi)
            return i;
        for (size_t k = 2; k < n; k++)
            if ((s[i + k] & 0xC0) != 0x80)
                return i;
        i += n;
    }
    return i;
}
