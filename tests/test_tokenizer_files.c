// tests/test_tokenizer_files.c: tokenizer files built by hand in a temporary directory.
// Small tekken.json and tokenizer.json files whose ids follow from the definitions by hand
// (tiktoken's concatenation rank vs Hugging Face's merge-list priority, ignore_merges, the
// vocabulary cut at default_vocab_size, Split behaviours, Digits, added-token matching),
// then the exact "FILE: field: what" message for each kind of broken or unsupported file,
// and allocation failures while loading. The shipped tokenizers: test_tokenizer.c.
#include "harness/harness.h"
#include "data/tok_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char dir[64];

static void make_dir(void) {
    strcpy(dir, "/tmp/molt-tok-XXXXXX");
    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        exit(1);
    }
}

static void remove_dir(void) {
    static const char *const names[] = {"t.json", "x-tokenizer.json", "x-tokenizer_config.json"};
    char p[128];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        unlink(p);
    }
    rmdir(dir);
}

static const char *path_of(const char *name) {
    static char p[128];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return p;
}

// Writes root (stolen) to name and loads it: status and, on success, *out.
static molt_status load_json(json_t *root, const char *name, tok_tokenizer **out) {
    ck_assert_int_eq(json_dump_file(root, path_of(name), JSON_COMPACT), 0);
    json_decref(root);
    return tok_load(path_of(name), out);
}

static tok_tokenizer *load_ok(json_t *root) {
    tok_tokenizer *t = NULL;
    ck_assert_ok(load_json(root, "t.json", &t));
    return t;
}

// Loading root must fail with st and exactly "<path>: <msg>".
static void expect_error(json_t *root, molt_status st, const char *msg) {
    tok_tokenizer *t = (tok_tokenizer *)1;
    molt_status got = load_json(root, "t.json", &t);
    char want[512];
    snprintf(want, sizeof want, "%s: %s", path_of("t.json"), msg);
    ck_assert_msg(got == st, "status %s, expected %s (%s)", molt_status_name(got),
                  molt_status_name(st), molt_err_msg());
    ck_assert_str_eq(molt_err_msg(), want);
    ck_assert_ptr_null(t);
}

// Ids of text must be want[0..n).
static void expect_ids(const tok_tokenizer *t, const char *text, const int32_t *want, size_t n) {
    tok_ids v = {0};
    ck_assert_ok(tok_encode(t, text, strlen(text), &v));
    int same = v.n == n && !memcmp(v.ids, want, n * sizeof *want);
    if (!same) {
        fprintf(stderr, "\"%s\" ->", text);
        for (size_t i = 0; i < v.n; i++)
            fprintf(stderr, " %d", v.ids[i]);
        fprintf(stderr, "\n");
    }
    ck_assert_msg(same, "\"%s\": %zu ids, expected %zu (see above)", text, v.n, n);
    tok_ids_free(&v);
}
#define EXPECT_IDS(t, text, ...)                                                           \
    do {                                                                                   \
        static const int32_t w_[] = {__VA_ARGS__};                                         \
        expect_ids(t, text, w_, sizeof w_ / sizeof *w_);                                   \
    } while (0)

// ---- tekken.json builder ---------------------------------------------------------------

static void b64(const unsigned char *s, size_t n, char *out) {
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t k = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t w = (uint32_t)s[i] << 16 | (i + 1 < n ? (uint32_t)s[i + 1] << 8 : 0) |
                     (i + 2 < n ? s[i + 2] : 0);
        out[k++] = a[w >> 18 & 63];
        out[k++] = a[w >> 12 & 63];
        out[k++] = i + 1 < n ? a[w >> 6 & 63] : '=';
        out[k++] = i + 2 < n ? a[w & 63] : '=';
    }
    out[k] = 0;
}

static json_t *tekken_entry(size_t rank, const char *bytes, size_t n) {
    char enc[64];
    b64((const unsigned char *)bytes, n, enc);
    return json_pack("{s:i, s:s, s:n}", "rank", (json_int_t)rank, "token_bytes", enc, "token_str");
}

// 3 special tokens (ids 0-2), the 256 bytes (ids 3-258), then extra[] from rank 256.
static json_t *tekken_json(const char *const *extra, size_t n_extra, json_int_t vocab_size) {
    json_t *vocab = json_array();
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        json_array_append_new(vocab, tekken_entry((size_t)b, &c, 1));
    }
    for (size_t i = 0; i < n_extra; i++)
        json_array_append_new(vocab, tekken_entry(256 + i, extra[i], strlen(extra[i])));
    return json_pack("{s:{s:s, s:i, s:I, s:i, s:s}, s:o, s:[{s:i, s:s, s:b}, {s:i, s:s, s:b}, "
                     "{s:i, s:s, s:b}]}",
                     "config", "pattern", "[a-z]+|[^a-z]+", "num_vocab_tokens",
                     (int)(256 + n_extra), "default_vocab_size", vocab_size,
                     "default_num_special_tokens", 3, "version", "test", "vocab", vocab,
                     "special_tokens", "rank", 0, "token_str", "<unk>", "is_control", 1, "rank",
                     1, "token_str", "<s>", "is_control", 1, "rank", 2, "token_str", "</s>",
                     "is_control", 1);
}

static const char *const tk_extra[] = {"ab", "bc", "abc", "xyz", "cd"};
#define TK(rank) (3 + (rank)) // id of a rank

START_TEST(test_tekken_semantics) {
    tok_tokenizer *t = load_ok(tekken_json(tk_extra, 5, 1000));
    ck_assert_uint_eq(tok_vocab_size(t), 3 + 261); // 261 ranks < 1000 - 3
    ck_assert_int_eq(tok_bos(t), 1);
    // a-b has rank 256 < b-c 257: ab first, then ab+c = abc (258)
    EXPECT_IDS(t, "abc", TK(258));
    // abcd: abc, then abc+d is not a token; cd (260) loses to ab (256) at the start
    EXPECT_IDS(t, "abcd", TK(258), TK('d'));
    // bcd: bc (257) before cd (260)
    EXPECT_IDS(t, "bcd", TK(257), TK('d'));
    // xyz is a token no merge reaches: tiktoken emits a whole-token piece directly
    EXPECT_IDS(t, "xyz", TK(259));
    // the pattern splits letters from the rest: "ab" and "cd" stay apart
    EXPECT_IDS(t, "ab-cd", TK(256), TK('-'), TK(260));
    tok_free(t);
    // default_vocab_size 3 + 258 keeps ranks 0..257: abc is out of the vocabulary
    t = load_ok(tekken_json(tk_extra, 5, 3 + 258));
    ck_assert_uint_eq(tok_vocab_size(t), 261);
    EXPECT_IDS(t, "abc", TK(256), TK('c'));
    EXPECT_IDS(t, "xyz", TK('x'), TK('y'), TK('z'));
    tok_free(t);
}
END_TEST

START_TEST(test_tekken_unnamed_special_slots) {
    json_t *j = tekken_json(tk_extra, 5, 1000);
    json_object_set_new(json_object_get(j, "config"), "default_num_special_tokens",
                        json_integer(10));
    tok_tokenizer *t = load_ok(j);
    ck_assert_int_eq(tok_special(t, "</s>"), 2);
    ck_assert_int_eq(tok_special(t, "<SPECIAL_3>"), 3);
    ck_assert_int_eq(tok_special(t, "<SPECIAL_9>"), 9);
    ck_assert_int_eq(tok_special(t, "<SPECIAL_10>"), -1);
    for (int32_t id = 0; id < 10; id++) // the special slots, named or not
        ck_assert(tok_is_special(t, id));
    ck_assert(!tok_is_special(t, 10));      // the first byte token
    ck_assert(!tok_is_special(t, 10 + 256)); // a merged token
    ck_assert(!tok_is_special(t, -1));
    ck_assert(!tok_is_special(t, 1 << 30));
    EXPECT_IDS(t, "ab", 10 + 256);
    tok_free(t);
}
END_TEST

// ---- tokenizer.json builder ------------------------------------------------------------

// GPT-2's spelling of byte b, from its definition: printable non-space bytes (0x21-0x7E,
// 0xA1-0xAC, 0xAE-0xFF) are themselves, the others are U+0100 + their index among them.
static void spell(const char *bytes, char *out) {
    size_t k = 0;
    for (const unsigned char *p = (const unsigned char *)bytes; *p; p++) {
        unsigned b = *p, cp = b;
        if (!((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE)) {
            cp = 0x100;
            for (unsigned c = 0; c < b; c++)
                cp += !((c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || c >= 0xAE);
        }
        if (cp < 0x80)
            out[k++] = (char)cp;
        else {
            out[k++] = (char)(0xC0 | cp >> 6);
            out[k++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    out[k] = 0;
}

static void vocab_add(json_t *vocab, const char *bytes, json_int_t id) {
    char key[64];
    spell(bytes, key);
    json_object_set_new(vocab, key, json_integer(id));
}

static json_t *byte_level(bool use_regex) {
    return json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel", "add_prefix_space", 0,
                     "trim_offsets", 1, "use_regex", use_regex);
}

// Bytes are ids 0-255 (byte value = id), then ab 256, bc 257, abc 258, xyz 259, aa 260,
// -a 266, a- 267, -- 268, 12 269; merges given as "left right" with spaces spelled Ġ.
static json_t *hf_json(const char *const *merges, size_t n_merges) {
    json_t *vocab = json_object(), *m = json_array();
    for (int b = 1; b < 256; b++) {
        char s[2] = {(char)b, 0};
        vocab_add(vocab, s, b);
    }
    json_object_set_new(vocab, "\xc4\x80", json_integer(0)); // byte 0 is U+0100
    static const struct {
        const char *s;
        int id;
    } extra[] = {{"ab", 256}, {"bc", 257}, {"abc", 258}, {"xyz", 259}, {"aa", 260},
                 {"-a", 266}, {"a-", 267}, {"--", 268}, {"12", 269}};
    for (size_t i = 0; i < sizeof extra / sizeof *extra; i++)
        vocab_add(vocab, extra[i].s, extra[i].id);
    for (size_t i = 0; i < n_merges; i++)
        json_array_append_new(m, json_string(merges[i]));
    return json_pack("{s:s, s:[], s:n, s:o, s:{s:s}, s:{s:s, s:o, s:o, s:b}}", "version", "1.0",
                     "added_tokens", "normalizer", "pre_tokenizer", byte_level(false), "decoder",
                     "type", "ByteLevel", "model", "type", "BPE", "vocab", vocab, "merges", m,
                     "ignore_merges", 0);
}

static void add_token(json_t *j, int id, const char *content, bool special, bool normalized) {
    json_array_append_new(json_object_get(j, "added_tokens"),
                          json_pack("{s:i, s:s, s:b, s:b, s:b, s:b, s:b}", "id", id, "content",
                                    content, "single_word", 0, "lstrip", 0, "rstrip", 0,
                                    "normalized", normalized, "special", special));
}

static void set_pre(json_t *j, json_t *steps) {
    json_array_append_new(steps, byte_level(false));
    json_object_set_new(j, "pre_tokenizer", json_pack("{s:s, s:o}", "type", "Sequence",
                                                      "pretokenizers", steps));
}

static json_t *split(const char *kind, const char *pattern, const char *behavior) {
    return json_pack("{s:s, s:{s:s}, s:s, s:b}", "type", "Split", "pattern", kind, pattern,
                     "behavior", behavior, "invert", 0);
}

START_TEST(test_merge_list_priority) {
    // b-c is merged first (index 0), then a+bc (index 2): abc
    static const char *const m1[] = {"b c", "a b", "a bc"};
    tok_tokenizer *t = load_ok(hf_json(m1, 3));
    EXPECT_IDS(t, "abc", 258);
    EXPECT_IDS(t, "ab", 256);
    EXPECT_IDS(t, "ababab", 256, 256, 256);
    tok_free(t);
    // Only a-b and b-c listed: ab wins, and ab+c is not a listed merge (tiktoken's rule would
    // merge it, since abc is a token)
    static const char *const m2[] = {"a b", "b c"};
    t = load_ok(hf_json(m2, 2));
    EXPECT_IDS(t, "abc", 256, 'c');
    tok_free(t);
    static const char *const m3[] = {"b c", "a b"};
    t = load_ok(hf_json(m3, 2));
    EXPECT_IDS(t, "abc", 'a', 257);
    tok_free(t);
    // ties go to the leftmost pair
    static const char *const m4[] = {"a a"};
    t = load_ok(hf_json(m4, 1));
    EXPECT_IDS(t, "aaa", 260, 'a');
    EXPECT_IDS(t, "aaaa", 260, 260);
    tok_free(t);
}
END_TEST

START_TEST(test_ignore_merges) {
    static const char *const m[] = {"a b"};
    json_t *j = hf_json(m, 1);
    tok_tokenizer *t = load_ok(json_incref(j));
    EXPECT_IDS(t, "xyz", 'x', 'y', 'z');
    tok_free(t);
    json_object_set_new(json_object_get(j, "model"), "ignore_merges", json_true());
    t = load_ok(j);
    EXPECT_IDS(t, "xyz", 259);
    EXPECT_IDS(t, "xyzx", 'x', 'y', 'z', 'x');
    tok_free(t);
}
END_TEST

START_TEST(test_split_behaviors) {
    static const char *const m[] = {"- a", "a -", "- -", "1 2"};
    static const struct {
        const char *behavior, *text;
        int32_t want[4];
        size_t n;
    } cases[] = {
        {"Isolated", "a-a", {'a', '-', 'a'}, 3},
        {"MergedWithNext", "a-a", {'a', 266}, 2},     // "a" "-a"
        {"MergedWithPrevious", "a-a", {267, 'a'}, 2}, // "a-" "a"
        {"Removed", "a-a", {'a', 'a'}, 2},
        {"Isolated", "a--a", {'a', '-', '-', 'a'}, 4},
        {"Contiguous", "a--a", {'a', 268, 'a'}, 3}, // "a" "--" "a"
        {"MergedWithNext", "--a", {'-', 266}, 2},   // "-" "-a"
        {"MergedWithPrevious", "a--", {267, '-'}, 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        json_t *j = hf_json(m, 4);
        set_pre(j, json_pack("[o]", split("String", "-", cases[i].behavior)));
        tok_tokenizer *t = load_ok(j);
        expect_ids(t, cases[i].text, cases[i].want, cases[i].n);
        tok_free(t);
    }
    // Digits: one by one, or runs
    json_t *j = hf_json(m, 4);
    set_pre(j, json_pack("[{s:s, s:b}]", "type", "Digits", "individual_digits", 1));
    tok_tokenizer *t = load_ok(j);
    EXPECT_IDS(t, "a123", 'a', '1', '2', '3');
    tok_free(t);
    j = hf_json(m, 4);
    set_pre(j, json_pack("[{s:s, s:b}]", "type", "Digits", "individual_digits", 0));
    t = load_ok(j);
    EXPECT_IDS(t, "a123", 'a', 269, '3');
    tok_free(t);
}
END_TEST

// An alternation repeated 50000 times outgrows the JIT's fixed stack; the interpreter
// (heap frames) takes over with the same matches.
START_TEST(test_regex_jit_stack_fallback) {
    static const char *const m[] = {"a b"};
    json_t *j = hf_json(m, 1);
    set_pre(j, json_pack("[o]", split("Regex", "(?:a|b)+", "Isolated")));
    tok_tokenizer *t = load_ok(j);
    size_t n = 100002;
    char *s = malloc(n + 1);
    s[0] = 'x';
    for (size_t i = 1; i + 1 < n; i++)
        s[i] = i % 2 ? 'a' : 'b';
    s[n - 1] = 'y';
    s[n] = 0;
    tok_ids v = {0};
    ck_assert_ok(tok_encode(t, s, n, &v));
    ck_assert_uint_eq(v.n, 2 + 50000); // x, 50000 x "ab", y
    ck_assert_int_eq(v.ids[0], 'x');
    ck_assert_int_eq(v.ids[v.n - 1], 'y');
    for (size_t i = 1; i + 1 < v.n; i++)
        ck_assert_int_eq(v.ids[i], 256);
    tok_ids_free(&v);
    free(s);
    tok_free(t);
}
END_TEST

START_TEST(test_added_tokens) {
    static const char *const m[] = {"a b"};
    json_t *j = hf_json(m, 1);
    add_token(j, 270, "<t>", false, false);
    add_token(j, 271, "<t>x", false, false);
    add_token(j, 272, "<t>!", true, false);
    add_token(j, 273, "@s@", false, true);
    add_token(j, 256, "ab", true, false); // a special token that a merge would produce
    add_token(j, 300, "[X]", true, false);
    tok_tokenizer *t = load_ok(j);
    ck_assert_uint_eq(tok_vocab_size(t), 301);
    // leftmost-longest; the special <t>! stays text and hides the <t> inside it
    EXPECT_IDS(t, "a<t>!b<t>x<t>", 'a', '<', 't', '>', '!', 'b', 271, 270);
    // normalized tokens are matched in the text between the others
    EXPECT_IDS(t, "<t>@s@c", 270, 273, 'c');
    // no special id from text, not even through a merge
    EXPECT_IDS(t, "ab[X]", 'a', 'b', '[', 'X', ']');
    ck_assert_int_eq(tok_special(t, "<t>"), 270);
    ck_assert_int_eq(tok_special(t, "[X]"), 300);
    int32_t ids[3] = {300, 256, 273};
    char *buf = NULL;
    size_t len = 0;
    ck_assert_ok(tok_decode(t, ids, 3, &buf, &len));
    ck_assert_str_eq(buf, "[X]ab@s@");
    // 280 lies between the vocabulary and the added tokens: no token
    ids[1] = 280;
    ck_assert_int_eq(tok_decode(t, ids, 3, &buf, &len), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "tok_decode: id 280 at position 1 has no token");
    ck_assert_str_eq(buf, "[X]ab@s@"); // unchanged
    molt_free(buf);
    tok_free(t);
}
END_TEST

// A vocabulary key outside the byte-level alphabet decodes to its own UTF-8 text (as the
// ByteLevel decoder does) and is never produced by BPE.
START_TEST(test_non_byte_level_key) {
    json_t *j = hf_json(NULL, 0);
    json_object_set_new(json_object_get(json_object_get(j, "model"), "vocab"), "<｜x｜>",
                        json_integer(274));
    tok_tokenizer *t = load_ok(j);
    int32_t id = 274;
    char *buf = NULL;
    size_t len = 0;
    ck_assert_ok(tok_decode(t, &id, 1, &buf, &len));
    ck_assert_str_eq(buf, "<｜x｜>");
    molt_free(buf);
    tok_ids v = {0};
    ck_assert_ok(tok_encode(t, "<｜x｜>", strlen("<｜x｜>"), &v));
    ck_assert_uint_eq(v.n, strlen("<｜x｜>"));
    tok_ids_free(&v);
    tok_free(t);
}
END_TEST

START_TEST(test_bos_eos_from_config) {
    json_t *j = hf_json(NULL, 0);
    add_token(j, 275, "<B>", true, false);
    add_token(j, 276, "<E>", true, false);
    FILE *f = fopen(path_of("x-tokenizer_config.json"), "w");
    fputs("{\"bos_token\": \"<B>\", \"eos_token\": {\"content\": \"<E>\"}}", f);
    fclose(f);
    tok_tokenizer *t;
    ck_assert_ok(load_json(json_incref(j), "x-tokenizer.json", &t));
    ck_assert_int_eq(tok_bos(t), 275);
    ck_assert_int_eq(tok_eos(t), 276);
    tok_free(t);
    t = load_ok(j); // no config beside t.json
    ck_assert_int_eq(tok_bos(t), -1);
    tok_free(t);
    f = fopen(path_of("x-tokenizer_config.json"), "w");
    fputs("{\"bos_token\": ", f);
    fclose(f);
    ck_assert_int_eq(load_json(hf_json(NULL, 0), "x-tokenizer.json", &t), MOLT_EFORMAT);
    char want[256];
    snprintf(want, sizeof want, "%s: line 1 column ", path_of("x-tokenizer_config.json"));
    ck_assert_msg(!strncmp(molt_err_msg(), want, strlen(want)), "%s", molt_err_msg());
}
END_TEST

// ---- broken files ----------------------------------------------------------------------

START_TEST(test_file_errors) {
    tok_tokenizer *t = (tok_tokenizer *)1;
    char want[256];
    ck_assert_int_eq(tok_load(path_of("missing.json"), &t), MOLT_EIO);
    snprintf(want, sizeof want, "%s: cannot open: No such file or directory", path_of("missing.json"));
    ck_assert_str_eq(molt_err_msg(), want);
    ck_assert_ptr_null(t);
    FILE *f = fopen(path_of("t.json"), "w");
    fputs("{\"model\": ", f);
    fclose(f);
    ck_assert_int_eq(tok_load(path_of("t.json"), &t), MOLT_EFORMAT);
    snprintf(want, sizeof want, "%s: line 1 column ", path_of("t.json"));
    ck_assert_msg(!strncmp(molt_err_msg(), want, strlen(want)), "%s", molt_err_msg());
    expect_error(json_pack("[i]", 1), MOLT_EFORMAT, "expected a JSON object, got an array");
    expect_error(json_pack("{s:i}", "vocab", 1), MOLT_EFORMAT,
                 "neither a tekken.json (config, vocab) nor a tokenizer.json (model)");
}
END_TEST

// Edits a fresh tekken.json with fn, then expects msg.
typedef void (*edit_fn)(json_t *j);
static void e_no_pattern(json_t *j) { json_object_del(json_object_get(j, "config"), "pattern"); }
static void e_pattern_int(json_t *j) {
    json_object_set_new(json_object_get(j, "config"), "pattern", json_integer(5));
}
static void e_bad_regex(json_t *j) {
    json_object_set_new(json_object_get(j, "config"), "pattern", json_string("(a"));
}
static void e_rank(json_t *j) {
    json_object_set_new(json_array_get(json_object_get(j, "vocab"), 3), "rank", json_integer(7));
}
static void e_b64(json_t *j) {
    json_object_set_new(json_array_get(json_object_get(j, "vocab"), 256), "token_bytes",
                        json_string("a*b="));
}
static void e_no_bytes(json_t *j) {
    json_object_del(json_array_get(json_object_get(j, "vocab"), 5), "token_bytes");
}
static void e_size(json_t *j) {
    json_object_set_new(json_object_get(j, "config"), "default_vocab_size", json_integer(2));
}
static void e_short(json_t *j) {
    while (json_array_size(json_object_get(j, "vocab")) > 10)
        json_array_remove(json_object_get(j, "vocab"), 10);
}
static void e_dup(json_t *j) {
    json_array_set_new(json_object_get(j, "vocab"), 257, tekken_entry(257, "ab", 2));
}
static void e_missing_byte(json_t *j) {
    json_array_set_new(json_object_get(j, "vocab"), 65, tekken_entry(65, "\x01\x02", 2));
}
static void e_many_specials(json_t *j) {
    json_array_append_new(json_object_get(j, "special_tokens"),
                          json_pack("{s:i, s:s}", "rank", 3, "token_str", "<x>"));
}
static void e_special_name(json_t *j) {
    json_object_set_new(json_array_get(json_object_get(j, "special_tokens"), 1), "token_str",
                        json_integer(1));
}

static const struct {
    edit_fn fn;
    const char *msg;
} tekken_errors[] = {
    {e_no_pattern, "config.pattern: missing (expected a string)"},
    {e_pattern_int, "config.pattern: expected a string, got an integer"},
    {e_bad_regex, "config.pattern: invalid regular expression: missing closing parenthesis"},
    {e_rank, "vocab[3].rank: expected 3 (rank == index), got 7"},
    {e_b64, "vocab[256].token_bytes: expected a non-empty base64 byte string of at most 750 bytes"},
    {e_no_bytes, "vocab[5].token_bytes: missing (expected a string)"},
    {e_size, "config.default_vocab_size: expected an integer in (3, 2147483647], got 2"},
    {e_short, "vocab: expected at least 256 entries (the single bytes), got 10"},
    {e_dup, "vocab: tokens 259 and 260 have the same bytes"},
    {e_missing_byte, "vocab: no token for the byte 0x41 (byte-level BPE needs all 256)"},
    {e_many_specials, "special_tokens: 4 entries, more than config.default_num_special_tokens (3)"},
    {e_special_name, "special_tokens[1].token_str: expected a string, got an integer"},
};

START_TEST(test_tekken_errors) {
    json_t *j = tekken_json(tk_extra, 5, 1000);
    tekken_errors[_i].fn(j);
    expect_error(j, MOLT_EFORMAT, tekken_errors[_i].msg);
}
END_TEST

static json_t *model_of(json_t *j) { return json_object_get(j, "model"); }
static void h_type(json_t *j) { json_object_set_new(model_of(j), "type", json_string("WordPiece")); }
static void h_no_type(json_t *j) { json_object_del(model_of(j), "type"); }
static void h_nfc(json_t *j) { json_object_set_new(j, "normalizer", json_pack("{s:s}", "type", "NFC")); }
static void h_seq_lower(json_t *j) {
    json_object_set_new(j, "normalizer", json_pack("{s:s, s:[{s:s}]}", "type", "Sequence",
                                                   "normalizers", "type", "Lowercase"));
}
static void h_metaspace(json_t *j) {
    json_object_set_new(j, "pre_tokenizer", json_pack("{s:s}", "type", "Metaspace"));
}
static void h_no_pre(json_t *j) { json_object_set_new(j, "pre_tokenizer", json_null()); }
static void h_bl_first(json_t *j) {
    json_object_set_new(j, "pre_tokenizer",
                        json_pack("{s:s, s:[o, {s:s}]}", "type", "Sequence", "pretokenizers",
                                  byte_level(false), "type", "Digits"));
}
static void h_no_bl(json_t *j) {
    json_object_set_new(j, "pre_tokenizer", json_pack("{s:s, s:[{s:s}]}", "type", "Sequence",
                                                      "pretokenizers", "type", "Digits"));
}
static void h_behavior(json_t *j) { set_pre(j, json_pack("[o]", split("Regex", "x", "Sideways"))); }
static void h_invert(json_t *j) {
    json_t *s = split("Regex", "x", "Isolated");
    json_object_set_new(s, "invert", json_true());
    set_pre(j, json_pack("[o]", s));
}
static void h_regex(json_t *j) { set_pre(j, json_pack("[o]", split("Regex", "[x", "Isolated"))); }
static void h_prefix(json_t *j) {
    json_t *bl = byte_level(true);
    json_object_set_new(bl, "add_prefix_space", json_true());
    json_object_set_new(j, "pre_tokenizer", bl);
}
static void h_decoder(json_t *j) {
    json_object_set_new(j, "decoder", json_pack("{s:s}", "type", "WordPiece"));
}
static void h_no_decoder(json_t *j) { json_object_del(j, "decoder"); }
static void h_vocab_id(json_t *j) {
    json_object_set_new(json_object_get(model_of(j), "vocab"), "a", json_string("x"));
}
static void h_merge_shape(json_t *j) {
    json_array_append_new(json_object_get(model_of(j), "merges"), json_string("ab"));
}
static void h_merge_unknown(json_t *j) {
    json_array_append_new(json_object_get(model_of(j), "merges"), json_pack("[s, s]", "q", "z"));
}
static void h_lstrip(json_t *j) {
    add_token(j, 280, "<t>", false, false);
    json_object_set_new(json_array_get(json_object_get(j, "added_tokens"), 0), "lstrip",
                        json_true());
}
static void h_empty_added(json_t *j) { add_token(j, 280, "", true, false); }
static void h_dropout(json_t *j) { json_object_set_new(model_of(j), "dropout", json_real(0.1)); }
static void h_byte_fallback(json_t *j) {
    json_object_set_new(model_of(j), "byte_fallback", json_true());
}
static void h_no_byte0(json_t *j) { json_object_del(json_object_get(model_of(j), "vocab"), "\xc4\x80"); }

static const struct {
    edit_fn fn;
    const char *msg;
} hf_errors[] = {
    {h_type, "model.type: \"WordPiece\" is not supported (expected \"BPE\")"},
    {h_no_type, "model.type: missing (expected a string)"},
    {h_nfc, "normalizer.type: \"NFC\" is not supported (molt applies no normalization: "
            "expected null or an empty Sequence)"},
    {h_seq_lower, "normalizer.normalizers[0].type: \"Lowercase\" is not supported (molt applies "
                  "no normalization: expected null or an empty Sequence)"},
    {h_metaspace, "pre_tokenizer.type: \"Metaspace\" is not supported (expected Split, Digits or "
                  "ByteLevel)"},
    {h_no_pre, "pre_tokenizer: missing (expected ByteLevel, or a Sequence of Split/Digits steps "
               "ending with ByteLevel (byte-level BPE))"},
    {h_bl_first, "pre_tokenizer.pretokenizers[0]: ByteLevel must be the last step"},
    {h_no_bl, "pre_tokenizer: no ByteLevel step (expected ByteLevel, or a Sequence of "
              "Split/Digits steps ending with ByteLevel (byte-level BPE))"},
    {h_behavior, "pre_tokenizer.pretokenizers[0].behavior: \"Sideways\" is not supported "
                 "(expected Isolated, Removed, MergedWithPrevious, MergedWithNext or Contiguous)"},
    {h_invert, "pre_tokenizer.pretokenizers[0].invert: true is not supported (expected false)"},
    {h_regex, "pre_tokenizer.pretokenizers[0].pattern: invalid regular expression: missing "
              "terminating ] for character class"},
    {h_prefix, "pre_tokenizer.add_prefix_space: true is not supported (expected false)"},
    {h_decoder, "decoder.type: \"WordPiece\" is not supported (expected ByteLevel)"},
    {h_no_decoder, "decoder: missing (expected an object)"},
    {h_vocab_id, "model.vocab: \"a\": expected a non-negative integer id"},
    {h_merge_shape, "model.merges[0]: expected \"left right\" or [\"left\", \"right\"]"},
    {h_merge_unknown, "model.merges[0]: \"q\" + \"z\" is not a byte-level token of model.vocab"},
    {h_lstrip, "added_tokens[0].lstrip: true is not supported on a non-special token "
               "(expected false)"},
    {h_empty_added, "added_tokens[0].content: expected a non-empty string without NUL"},
    {h_dropout, "model.dropout: BPE dropout is not supported (expected null)"},
    {h_byte_fallback, "model.byte_fallback: true is not supported (expected false)"},
    {h_no_byte0, "model.vocab: no token for the byte 0x00 (byte-level BPE needs all 256)"},
};

START_TEST(test_tokenizer_json_errors) {
    json_t *j = hf_json(NULL, 0);
    hf_errors[_i].fn(j);
    expect_error(j, MOLT_EFORMAT, hf_errors[_i].msg);
}
END_TEST

START_TEST(test_load_allocation_failures) {
    static const char *const m[] = {"a b", "b c"};
    json_t *docs[2] = {tekken_json(tk_extra, 5, 1000), hf_json(m, 2)};
    add_token(docs[1], 270, "<t>", false, false);
    for (int d = 0; d < 2; d++) {
        ck_assert_int_eq(json_dump_file(docs[d], path_of("t.json"), JSON_COMPACT), 0);
        json_decref(docs[d]);
        int failures = 0;
        for (long f = 0;; f++) {
            tok_tokenizer *t = NULL;
            molt_alloc_fail_after(f);
            molt_status st = tok_load(path_of("t.json"), &t);
            molt_alloc_fail_after(-1);
            if (st == MOLT_OK) {
                tok_free(t);
                break;
            }
            ck_assert_msg(st == MOLT_ENOMEM, "failure %ld: %s", f, molt_err_msg());
            ck_assert_ptr_null(t);
            failures++;
        }
        ck_assert_int_ge(failures, 5);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("tokenizer_files");
    TCase *tc = tcase_create("tokenizer_files");
    tcase_add_unchecked_fixture(tc, make_dir, remove_dir);
    tcase_add_test(tc, test_tekken_semantics);
    tcase_add_test(tc, test_tekken_unnamed_special_slots);
    tcase_add_test(tc, test_merge_list_priority);
    tcase_add_test(tc, test_ignore_merges);
    tcase_add_test(tc, test_split_behaviors);
    tcase_add_test(tc, test_regex_jit_stack_fallback);
    tcase_add_test(tc, test_added_tokens);
    tcase_add_test(tc, test_non_byte_level_key);
    tcase_add_test(tc, test_bos_eos_from_config);
    tcase_add_test(tc, test_file_errors);
    tcase_add_loop_test(tc, test_tekken_errors, 0,
                        (int)(sizeof tekken_errors / sizeof *tekken_errors));
    tcase_add_loop_test(tc, test_tokenizer_json_errors, 0,
                        (int)(sizeof hf_errors / sizeof *hf_errors));
    tcase_add_test(tc, test_load_allocation_failures);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
