// data/tok_tekken.c: loads Mistral's tekken.json (SPECS.md section 4). Ids below
// num_special are the special tokens (by name; plain text never produces them); id
// num_special + rank is the vocabulary token of that rank, for the first
// default_vocab_size - num_special ranks only. Pre-tokenization is config.pattern; BPE
// follows tiktoken: a piece that is a token is emitted whole, otherwise the adjacent pair
// whose concatenation has the lowest rank merges first. That rule is turned into a pair
// table here, so encoding shares the tokenizer.json machinery.
// Not here: encoding itself (tok_encode.c, tok_bpe.c).
#include "tok_internal.h"

#include <stdio.h>
#include <string.h>

static int b64_value(unsigned char c) {
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

// Decodes standard padded base64 into out (room for len * 3 / 4 bytes); -1 when malformed.
static long b64_decode(const char *s, size_t len, unsigned char *out) {
    if (len == 0 || len % 4)
        return -1;
    size_t pad = (s[len - 1] == '=') + (len > 1 && s[len - 2] == '=');
    size_t n = 0;
    for (size_t i = 0; i < len; i += 4) {
        int v[4];
        for (int k = 0; k < 4; k++) {
            bool is_pad = i + (size_t)k >= len - pad;
            v[k] = is_pad ? 0 : b64_value((unsigned char)s[i + k]);
            if (v[k] < 0 || (is_pad && s[i + k] != '='))
                return -1;
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 |
                     (uint32_t)v[3];
        out[n++] = (unsigned char)(w >> 16);
        out[n++] = (unsigned char)(w >> 8);
        out[n++] = (unsigned char)w;
    }
    return (long)(n - pad);
}

// config.* sizes: *ns special ids, *n_ranks ranks used out of the vocab array.
static molt_status read_config(const char *path, json_t *root, json_t **pattern, size_t *ns,
                               size_t *n_ranks, json_t **vocab, json_t **specials) {
    json_t *config, *jvs, *jns;
    MOLT_TRY(tok_json_get(path, root, "config", "config", JSON_OBJECT, true, &config));
    MOLT_TRY(tok_json_get(path, config, "pattern", "config.pattern", JSON_STRING, true, pattern));
    MOLT_TRY(tok_json_get(path, config, "default_vocab_size", "config.default_vocab_size",
                          JSON_INTEGER, true, &jvs));
    MOLT_TRY(tok_json_get(path, config, "default_num_special_tokens",
                          "config.default_num_special_tokens", JSON_INTEGER, true, &jns));
    MOLT_TRY(tok_json_get(path, root, "vocab", "vocab", JSON_ARRAY, true, vocab));
    MOLT_TRY(tok_json_get(path, root, "special_tokens", "special_tokens", JSON_ARRAY, true,
                          specials));
    json_int_t vs = json_integer_value(jvs), nsp = json_integer_value(jns);
    if (nsp < 0 || nsp > 1000000)
        return tok_ferr(path, "config.default_num_special_tokens",
                        "expected an integer in [0, 1000000], got %lld", (long long)nsp);
    if (vs <= nsp || vs > INT32_MAX)
        return tok_ferr(path, "config.default_vocab_size",
                        "expected an integer in (%lld, %d], got %lld", (long long)nsp, INT32_MAX,
                        (long long)vs);
    *ns = (size_t)nsp;
    *n_ranks = json_array_size(*vocab);
    if (*n_ranks > (size_t)(vs - nsp))
        *n_ranks = (size_t)(vs - nsp); // the rest of the array is not part of this vocabulary
    if (*n_ranks < 256)
        return tok_ferr(path, "vocab", "expected at least 256 entries (the single bytes), got %zu",
                        *n_ranks);
    if (json_array_size(*specials) > *ns)
        return tok_ferr(path, "special_tokens",
                        "%zu entries, more than config.default_num_special_tokens (%zu)",
                        json_array_size(*specials), *ns);
    return MOLT_OK;
}

// Entry i of array arr: an object whose "rank" equals i. Fields are only formatted on error:
// this runs for every one of the 130k entries.
static molt_status check_entry(const char *path, const char *arr, size_t i, json_t *e) {
    char field[64];
    json_t *r = json_is_object(e) ? json_object_get(e, "rank") : NULL;
    if (json_is_integer(r) && json_integer_value(r) == (json_int_t)i)
        return MOLT_OK;
    snprintf(field, sizeof field, "%s[%zu]", arr, i);
    if (!json_is_object(e))
        return tok_ferr(path, field, "expected an object");
    snprintf(field, sizeof field, "%s[%zu].rank", arr, i);
    MOLT_TRY(tok_json_get(path, e, "rank", field, JSON_INTEGER, true, &r));
    return tok_ferr(path, field, "expected %zu (rank == index), got %lld", i,
                    (long long)json_integer_value(r));
}

// The string member key of entry i of arr.
static molt_status entry_string(const char *path, const char *arr, size_t i, json_t *e,
                                const char *key, json_t **out) {
    *out = json_object_get(e, key);
    if (json_is_string(*out))
        return MOLT_OK;
    char field[64];
    snprintf(field, sizeof field, "%s[%zu].%s", arr, i, key);
    return tok_json_get(path, e, key, field, JSON_STRING, true, out);
}

static molt_status read_specials(const char *path, json_t *specials, tok_tokenizer *t, size_t ns) {
    for (size_t i = 0; i < ns; i++) {
        t->flags[i] = TOK_F_ADDED | TOK_F_SPECIAL;
        MOLT_TRY(tok_strtab_add(&t->model, "", 0));
        if (i >= json_array_size(specials)) { // unnamed slots, named as mistral-common does
            char name[32];
            int len = snprintf(name, sizeof name, "<SPECIAL_%zu>", i);
            MOLT_TRY(tok_strtab_add(&t->names, name, (size_t)len));
            continue;
        }
        json_t *e = json_array_get(specials, i), *s;
        MOLT_TRY(check_entry(path, "special_tokens", i, e));
        MOLT_TRY(entry_string(path, "special_tokens", i, e, "token_str", &s));
        if (json_string_length(s) == 0) {
            char field[64];
            snprintf(field, sizeof field, "special_tokens[%zu].token_str", i);
            return tok_ferr(path, field, "expected a non-empty name");
        }
        MOLT_TRY(tok_strtab_add(&t->names, json_string_value(s), json_string_length(s)));
    }
    return MOLT_OK;
}

static molt_status read_vocab(const char *path, json_t *vocab, tok_tokenizer *t, size_t ns,
                              size_t n_ranks) {
    unsigned char buf[768];
    for (size_t r = 0; r < n_ranks; r++) {
        json_t *e = json_array_get(vocab, r), *b;
        MOLT_TRY(check_entry(path, "vocab", r, e));
        MOLT_TRY(entry_string(path, "vocab", r, e, "token_bytes", &b));
        size_t blen = json_string_length(b);
        long n = blen <= 1000 ? b64_decode(json_string_value(b), blen, buf) : -1;
        if (n <= 0) {
            char field[64];
            snprintf(field, sizeof field, "vocab[%zu].token_bytes", r);
            return tok_ferr(path, field, "expected a non-empty base64 byte string of at most "
                                         "750 bytes");
        }
        MOLT_TRY(tok_strtab_add(&t->model, buf, (size_t)n));
        MOLT_TRY(tok_strtab_add(&t->names, "", 0));
        t->flags[ns + r] = TOK_F_MODEL | TOK_F_BPE;
    }
    return MOLT_OK;
}

// tiktoken merges any adjacent pair whose concatenation is a token, with the token's rank as
// priority. Every such pair is a split of some token into two tokens: list them all.
static molt_status build_pairs(tok_tokenizer *t, size_t ns) {
    // Tekken has about two such pairs per token (the map grows if a vocabulary has more).
    MOLT_TRY(tok_pairmap_init(&t->merges, (t->n_ids - ns) * 3));
    for (uint32_t id = (uint32_t)ns; id < t->n_ids; id++) {
        size_t len;
        const char *s = tok_strtab_get(&t->model, id, &len);
        for (size_t k = 1; k < len; k++) {
            uint32_t a = tok_strmap_get(&t->by_bytes, &t->model, s, k);
            if (a == TOK_NONE)
                continue;
            uint32_t b = tok_strmap_get(&t->by_bytes, &t->model, s + k, len - k);
            if (b != TOK_NONE)
                MOLT_TRY(tok_pairmap_put(&t->merges, a, b, id, id));
        }
    }
    return MOLT_OK;
}

molt_status tok_tekken_load(const char *path, json_t *root, tok_tokenizer *t) {
    json_t *pattern, *vocab, *specials;
    size_t ns = 0, n_ranks = 0;
    t->kind = TOK_KIND_TEKKEN;
    MOLT_TRY(read_config(path, root, &pattern, &ns, &n_ranks, &vocab, &specials));
    MOLT_TRY(tok_alloc_tables(t, ns + n_ranks));
    MOLT_TRY(read_specials(path, specials, t, ns));
    MOLT_TRY(read_vocab(path, vocab, t, ns, n_ranks));
    MOLT_TRY(tok_build_maps(t, path, "vocab"));
    MOLT_TRY(build_pairs(t, ns));
    t->ignore_merges = true; // tiktoken looks the whole piece up first
    t->splits = molt_calloc(1, sizeof *t->splits);
    if (!t->splits)
        return molt_err(MOLT_ENOMEM, "tok_load: out of memory");
    MOLT_TRY(tok_split_compile(path, "config.pattern", json_string_value(pattern),
                               json_string_length(pattern), false, TOK_SPLIT_ISOLATED,
                               &t->splits[0]));
    t->n_splits = 1;
    t->bos = tok_special(t, "<s>");
    t->eos = tok_special(t, "</s>");
    return MOLT_OK;
}
