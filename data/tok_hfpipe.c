// data/tok_hfpipe.c: the parts of a tokenizer.json around the BPE model. The normalizer
// must do nothing (null or an empty Sequence); the pre-tokenizer must be ByteLevel or a
// Sequence of Split / Digits steps ending with ByteLevel, which become regex split steps;
// the decoder must be ByteLevel. Anything else is refused by name, since it would change
// the ids. Also reads bos/eos from a tokenizer_config.json beside the file.
// Not here: the model and added tokens (tok_hfjson.c).
#include "tok_internal.h"

#include <stdio.h>
#include <string.h>

// GPT-2's pre-tokenization, which ByteLevel applies when use_regex is true.
static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static molt_status check_normalizer(const char *path, json_t *nz, const char *field) {
    if (!nz || json_is_null(nz))
        return MOLT_OK;
    char f[96];
    json_t *type, *list;
    if (!json_is_object(nz))
        return tok_ferr(path, field, "expected an object or null");
    snprintf(f, sizeof f, "%s.type", field);
    MOLT_TRY(tok_json_get(path, nz, "type", f, JSON_STRING, true, &type));
    if (strcmp(json_string_value(type), "Sequence"))
        return tok_ferr(path, f, "\"%s\" is not supported (molt applies no normalization: "
                                 "expected null or an empty Sequence)",
                        json_string_value(type));
    snprintf(f, sizeof f, "%s.normalizers", field);
    MOLT_TRY(tok_json_get(path, nz, "normalizers", f, JSON_ARRAY, true, &list));
    for (size_t i = 0; i < json_array_size(list); i++) {
        snprintf(f, sizeof f, "%s.normalizers[%zu]", field, i);
        MOLT_TRY(check_normalizer(path, json_array_get(list, i), f));
    }
    return MOLT_OK;
}

static molt_status split_behavior(const char *path, const char *field, const char *name,
                                  tok_split_behavior *b) {
    static const struct {
        const char *name;
        tok_split_behavior b;
    } names[] = {{"Isolated", TOK_SPLIT_ISOLATED},
                 {"Removed", TOK_SPLIT_REMOVED},
                 {"MergedWithPrevious", TOK_SPLIT_MERGED_PREV},
                 {"MergedWithNext", TOK_SPLIT_MERGED_NEXT},
                 {"Contiguous", TOK_SPLIT_CONTIGUOUS}};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (!strcmp(name, names[i].name)) {
            *b = names[i].b;
            return MOLT_OK;
        }
    return tok_ferr(path, field,
                    "\"%s\" is not supported (expected Isolated, Removed, MergedWithPrevious, "
                    "MergedWithNext or Contiguous)",
                    name);
}

static molt_status parse_split(const char *path, json_t *st, const char *field, tok_split *out) {
    char f[128];
    json_t *pat, *beh, *inv, *re, *lit;
    snprintf(f, sizeof f, "%s.pattern", field);
    MOLT_TRY(tok_json_get(path, st, "pattern", f, JSON_OBJECT, true, &pat));
    re = json_object_get(pat, "Regex");
    lit = json_object_get(pat, "String");
    json_t *p = re ? re : lit;
    if (!json_is_string(p))
        return tok_ferr(path, f, "expected {\"Regex\": \"...\"} or {\"String\": \"...\"}");
    snprintf(f, sizeof f, "%s.invert", field);
    MOLT_TRY(tok_json_get(path, st, "invert", f, JSON_TRUE, false, &inv));
    if (inv && json_is_true(inv))
        return tok_ferr(path, f, "true is not supported (expected false)");
    tok_split_behavior b = TOK_SPLIT_ISOLATED;
    snprintf(f, sizeof f, "%s.behavior", field);
    MOLT_TRY(tok_json_get(path, st, "behavior", f, JSON_STRING, true, &beh));
    MOLT_TRY(split_behavior(path, f, json_string_value(beh), &b));
    snprintf(f, sizeof f, "%s.pattern", field);
    return tok_split_compile(path, f, json_string_value(p), json_string_length(p), !re, b, out);
}

// One pre-tokenizer step (not ByteLevel): appends its split to t->splits.
static molt_status parse_step(const char *path, json_t *st, const char *field, const char *type,
                              tok_tokenizer *t) {
    tok_split *out = &t->splits[t->n_splits];
    char f[128];
    if (!strcmp(type, "Split")) {
        MOLT_TRY(parse_split(path, st, field, out));
    } else if (!strcmp(type, "Digits")) {
        json_t *ind;
        snprintf(f, sizeof f, "%s.individual_digits", field);
        MOLT_TRY(tok_json_get(path, st, "individual_digits", f, JSON_TRUE, false, &ind));
        // Digits splits on Rust's char::is_numeric, the Unicode N categories.
        const char *pat = ind && json_is_true(ind) ? "\\p{N}" : "\\p{N}+";
        MOLT_TRY(tok_split_compile(path, f, pat, strlen(pat), false, TOK_SPLIT_ISOLATED, out));
    } else {
        snprintf(f, sizeof f, "%s.type", field);
        return tok_ferr(path, f, "\"%s\" is not supported (expected Split, Digits or ByteLevel)",
                        type);
    }
    t->n_splits++;
    return MOLT_OK;
}

static molt_status parse_byte_level(const char *path, json_t *st, const char *field,
                                    tok_tokenizer *t) {
    char f[128];
    json_t *aps, *ur;
    snprintf(f, sizeof f, "%s.add_prefix_space", field);
    MOLT_TRY(tok_json_get(path, st, "add_prefix_space", f, JSON_TRUE, false, &aps));
    if (!aps || json_is_true(aps)) // Hugging Face's default is true
        return tok_ferr(path, f, "true is not supported (expected false)");
    snprintf(f, sizeof f, "%s.use_regex", field);
    MOLT_TRY(tok_json_get(path, st, "use_regex", f, JSON_TRUE, false, &ur));
    if (ur && !json_is_true(ur))
        return MOLT_OK;
    MOLT_TRY(tok_split_compile(path, field, gpt2_pattern, strlen(gpt2_pattern), false,
                               TOK_SPLIT_ISOLATED, &t->splits[t->n_splits]));
    t->n_splits++;
    return MOLT_OK;
}

static molt_status parse_pre_tokenizer(const char *path, json_t *pre, tok_tokenizer *t) {
    static const char need[] = "expected ByteLevel, or a Sequence of Split/Digits steps ending "
                               "with ByteLevel (byte-level BPE)";
    if (!pre || json_is_null(pre))
        return tok_ferr(path, "pre_tokenizer", "missing (%s)", need);
    json_t *type, *steps = NULL;
    if (!json_is_object(pre))
        return tok_ferr(path, "pre_tokenizer", "expected an object");
    MOLT_TRY(tok_json_get(path, pre, "type", "pre_tokenizer.type", JSON_STRING, true, &type));
    bool seq = !strcmp(json_string_value(type), "Sequence");
    if (seq)
        MOLT_TRY(tok_json_get(path, pre, "pretokenizers", "pre_tokenizer.pretokenizers",
                              JSON_ARRAY, true, &steps));
    size_t n = seq ? json_array_size(steps) : 1;
    t->splits = molt_calloc(n + 1, sizeof *t->splits);
    if (!t->splits)
        return molt_err(MOLT_ENOMEM, "tok_load: out of memory");
    for (size_t i = 0; i < n; i++) {
        char field[96];
        json_t *st = seq ? json_array_get(steps, i) : pre, *ty;
        if (seq)
            snprintf(field, sizeof field, "pre_tokenizer.pretokenizers[%zu]", i);
        else
            snprintf(field, sizeof field, "pre_tokenizer");
        char tf[128];
        snprintf(tf, sizeof tf, "%s.type", field);
        if (!json_is_object(st))
            return tok_ferr(path, field, "expected an object");
        MOLT_TRY(tok_json_get(path, st, "type", tf, JSON_STRING, true, &ty));
        if (strcmp(json_string_value(ty), "ByteLevel")) {
            MOLT_TRY(parse_step(path, st, field, json_string_value(ty), t));
            continue;
        }
        if (i + 1 != n) // later steps would see the byte-level spelling
            return tok_ferr(path, field, "ByteLevel must be the last step");
        return parse_byte_level(path, st, field, t);
    }
    return tok_ferr(path, "pre_tokenizer", "no ByteLevel step (%s)", need);
}

molt_status tok_hf_pipeline(const char *path, json_t *root, tok_tokenizer *t) {
    MOLT_TRY(check_normalizer(path, json_object_get(root, "normalizer"), "normalizer"));
    MOLT_TRY(parse_pre_tokenizer(path, json_object_get(root, "pre_tokenizer"), t));
    json_t *dec, *type;
    MOLT_TRY(tok_json_get(path, root, "decoder", "decoder", JSON_OBJECT, true, &dec));
    MOLT_TRY(tok_json_get(path, dec, "type", "decoder.type", JSON_STRING, true, &type));
    if (strcmp(json_string_value(type), "ByteLevel"))
        return tok_ferr(path, "decoder.type", "\"%s\" is not supported (expected ByteLevel)",
                        json_string_value(type));
    return MOLT_OK;
}

// bos_token / eos_token: a string or {"content": string}; -1 when absent or not a token.
static int32_t config_token(const tok_tokenizer *t, json_t *cfg, const char *key) {
    json_t *v = json_object_get(cfg, key);
    if (json_is_object(v))
        v = json_object_get(v, "content");
    return json_is_string(v) ? tok_special(t, json_string_value(v)) : -1;
}

molt_status tok_hf_read_config(const char *path, tok_tokenizer *t) {
    static const char suffix[] = "tokenizer.json";
    size_t len = strlen(path), sl = sizeof suffix - 1;
    if (len < sl || strcmp(path + len - sl, suffix))
        return MOLT_OK;
    char *cfg = molt_malloc(len + 8);
    if (!cfg)
        return molt_err(MOLT_ENOMEM, "tok_load: out of memory");
    snprintf(cfg, len + 8, "%.*s_config.json", (int)(len - 5), path); // drop ".json"
    molt_status st = MOLT_OK;
    FILE *f = fopen(cfg, "rb");
    if (f) {
        fclose(f);
        json_error_t je;
        json_t *root = json_load_file(cfg, 0, &je);
        if (!root)
            st = molt_err(MOLT_EFORMAT, "%s: line %d column %d: %s", cfg, je.line, je.column,
                          je.text);
        else {
            t->bos = config_token(t, root, "bos_token");
            t->eos = config_token(t, root, "eos_token");
            json_decref(root);
        }
    }
    molt_free(cfg);
    return st;
}
