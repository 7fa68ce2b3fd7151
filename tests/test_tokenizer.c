// tests/test_tokenizer.c: the shipped tokenizers (configs/tokenizers: Tekken, DeepSeek-V3
// tokenizer.json) and the small trained ones in tests/fixtures/tokenizer: exact ids against
// the reference encoders on every corpus record (tools/reference/tokenizer_parity.py),
// decode(encode(x)) == x including invalid UTF-8, special tokens (never from text, lookup by
// name, decode to names), the mistral-common golden fact, BPE against a from-definition
// tiktoken merge loop, long runs, and allocation failures. The big files are loaded once,
// before Check forks the tests. Broken files and hand-built tokenizers: test_tokenizer_files.c.
#include "harness/harness.h"
#include "data/tok_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static tok_tokenizer *tekken, *hf;

typedef struct {
    char **text;
    size_t *len;
    size_t n;
} corpus;
static corpus cor;

static const char *source_path(const char *rel) {
    static char buf[4096];
    const char *root = getenv("MOLT_SOURCE_DIR");
    snprintf(buf, sizeof buf, "%s/%s", root ? root : ".", rel);
    return buf;
}

static void load_corpus(void) {
    FILE *f = fopen(source_path("tests/fixtures/tokenizer/corpus.jsonl"), "rb");
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    if (!f) {
        fprintf(stderr, "cannot open the tokenizer corpus\n");
        exit(1);
    }
    while ((n = getline(&line, &cap, f)) > 0) {
        json_error_t je;
        json_t *rec = json_loadb(line, (size_t)n, JSON_ALLOW_NUL, &je);
        json_t *t = json_object_get(rec, "text");
        if (!json_is_string(t)) {
            fprintf(stderr, "corpus line %zu: %s\n", cor.n + 1, je.text);
            exit(1);
        }
        cor.text = realloc(cor.text, (cor.n + 1) * sizeof *cor.text);
        cor.len = realloc(cor.len, (cor.n + 1) * sizeof *cor.len);
        cor.len[cor.n] = json_string_length(t);
        cor.text[cor.n] = malloc(cor.len[cor.n] + 1);
        memcpy(cor.text[cor.n], json_string_value(t), cor.len[cor.n] + 1);
        cor.n++;
        json_decref(rec);
    }
    free(line);
    fclose(f);
}

static void load_shared(void) {
    if (tok_load(source_path("configs/tokenizers/tekken.json"), &tekken) != MOLT_OK ||
        tok_load(source_path("configs/tokenizers/deepseek-v3-tokenizer.json"), &hf) != MOLT_OK) {
        fprintf(stderr, "cannot load the test tokenizers: %s\n", molt_err_msg());
        exit(1);
    }
    load_corpus();
}

static void free_shared(void) {
    tok_free(tekken);
    tok_free(hf);
    for (size_t i = 0; i < cor.n; i++)
        free(cor.text[i]);
    free(cor.text);
    free(cor.len);
}

// ---- helpers ---------------------------------------------------------------------------

static tok_ids enc(const tok_tokenizer *t, const char *s, size_t n) {
    tok_ids v = {0};
    ck_assert_ok(tok_encode(t, s, n, &v));
    return v;
}

// Asserts decode(encode(s)) == s; returns the ids' count.
static size_t check_roundtrip(const tok_tokenizer *t, const char *s, size_t n, const char *what) {
    tok_ids v = enc(t, s, n);
    char *buf = NULL;
    size_t len = 0;
    ck_assert_ok(tok_decode(t, v.ids, v.n, &buf, &len));
    ck_assert_msg(len == n && !memcmp(buf, s, n), "%s: %s: decode(encode(x)) != x (%zu vs %zu bytes)",
                  tok_kind(t), what, len, n);
    ck_assert_int_eq(buf[len], 0);
    size_t count = v.n;
    molt_free(buf);
    tok_ids_free(&v);
    return count;
}

// Compares the ids of every corpus record with the reference file (one line per record
// after the '#' header); returns the number of records checked.
static size_t check_parity(const tok_tokenizer *t, const char *ids_file) {
    FILE *f = fopen(source_path(ids_file), "rb");
    ck_assert_msg(f != NULL, "cannot open %s", ids_file);
    char *line = NULL;
    size_t cap = 0, rec = 0, bad = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, f)) > 0) {
        if (line[0] == '#')
            continue;
        ck_assert_msg(rec < cor.n, "%s has more lines than the corpus", ids_file);
        tok_ids got = enc(t, cor.text[rec], cor.len[rec]);
        size_t k = 0, first_diff = SIZE_MAX;
        for (char *p = line, *end; *p && *p != '\n'; p = end, k++) {
            long want = strtol(p, &end, 10);
            ck_assert_msg(end != p, "%s: bad line %zu", ids_file, rec + 1);
            if (first_diff == SIZE_MAX && (k >= got.n || got.ids[k] != want))
                first_diff = k;
        }
        if (first_diff == SIZE_MAX && k != got.n)
            first_diff = k;
        if (first_diff != SIZE_MAX && bad++ < 5)
            fprintf(stderr, "%s: record %zu differs at id %zu (%zu ids, expected %zu)\n",
                    ids_file, rec + 1, first_diff, got.n, k);
        tok_ids_free(&got);
        rec++;
    }
    free(line);
    fclose(f);
    ck_assert_msg(bad == 0, "%s: %zu of %zu records differ", ids_file, bad, rec);
    return rec;
}

// ---- parity ----------------------------------------------------------------------------

START_TEST(test_tekken_parity) {
    ck_assert_uint_eq(check_parity(tekken, "tests/fixtures/tokenizer/tekken.ids"), cor.n);
}
END_TEST

START_TEST(test_tokenizer_json_parity) {
    ck_assert_uint_eq(check_parity(hf, "tests/fixtures/tokenizer/deepseek-v3.ids"), cor.n);
}
END_TEST

// The small trained tokenizers cover what DeepSeek-V3 does not use: ByteLevel's own regex,
// Digits, every Split behaviour, ignore_merges, merges as pairs, added tokens of each kind.
START_TEST(test_small_tokenizers_parity) {
    static const char *const names[] = {"small-bytelevel", "small-split", "small-removed"};
    for (int i = 0; i < 3; i++) {
        char json[256], ids[256];
        snprintf(json, sizeof json, "tests/fixtures/tokenizer/%s.json", names[i]);
        snprintf(ids, sizeof ids, "tests/fixtures/tokenizer/%s.ids", names[i]);
        tok_tokenizer *t;
        ck_assert_ok(tok_load(source_path(json), &t));
        ck_assert_uint_ge(check_parity(t, ids), 100);
        if (i < 2) // Removed drops text by design
            for (size_t r = 0; r < cor.n; r++)
                check_roundtrip(t, cor.text[r], cor.len[r], names[i]);
        tok_free(t);
    }
}
END_TEST

START_TEST(test_golden_reasoning_effort) {
    // mistral-common's golden v15 test, see /work/shared/tokenizers/README.md
    static const int32_t want[] = {19227, 80277, 1302, 13196, 1609, 1449, 2811, 1429, 24871, 46005};
    const char *s = "{\"reasoning_effort\": \"high\"}";
    tok_ids v = enc(tekken, s, strlen(s));
    ck_assert_uint_eq(v.n, 10);
    for (size_t i = 0; i < v.n; i++)
        ck_assert_int_eq(v.ids[i], want[i]);
    tok_ids_free(&v);
}
END_TEST

// ---- round trips -----------------------------------------------------------------------

START_TEST(test_roundtrip_corpus) {
    for (size_t r = 0; r < cor.n; r++) {
        check_roundtrip(tekken, cor.text[r], cor.len[r], "corpus");
        check_roundtrip(hf, cor.text[r], cor.len[r], "corpus");
    }
}
END_TEST

// Invalid UTF-8: every byte outside a valid sequence is its own one-byte token, and the
// valid text around it is encoded as if the bad byte were a boundary.
START_TEST(test_invalid_utf8_bytes) {
    static const char *const bad[] = {
        "\xff", "\x80", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xf5\x80",
        "\xe2\x82", "abc\xe2", "caf\xe9 cr\xe8me", "\xc3(", "ok \xf0\x9f\x98 emoji",
        "[INST]\xff[/INST]", " \xfe\xfe  \xff\n",
    };
    const tok_tokenizer *ts[2] = {tekken, hf};
    for (int k = 0; k < 2; k++) {
        const tok_tokenizer *t = ts[k];
        for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
            check_roundtrip(t, bad[i], strlen(bad[i]), bad[i]);
        // one invalid byte -> exactly one token, which decodes to that byte
        for (int b = 0x80; b < 0x100; b++) {
            char c = (char)b, *buf = NULL;
            size_t len = 0;
            tok_ids v = enc(t, &c, 1);
            ck_assert_uint_eq(v.n, 1);
            ck_assert_ok(tok_decode(t, v.ids, 1, &buf, &len));
            ck_assert(len == 1 && buf[0] == c);
            molt_free(buf);
            tok_ids_free(&v);
        }
        // "left\xffright" = encode("left") + [byte 0xff] + encode("right")
        const char *s = "Hello there\xff world";
        tok_ids whole = enc(t, s, strlen(s)), l = enc(t, "Hello there", 11), r = enc(t, " world", 6),
                b = enc(t, "\xff", 1);
        ck_assert_uint_eq(whole.n, l.n + 1 + r.n);
        ck_assert(!memcmp(whole.ids, l.ids, l.n * sizeof(int32_t)));
        ck_assert_int_eq(whole.ids[l.n], b.ids[0]);
        ck_assert(!memcmp(whole.ids + l.n + 1, r.ids, r.n * sizeof(int32_t)));
        tok_ids_free(&whole);
        tok_ids_free(&l);
        tok_ids_free(&r);
        tok_ids_free(&b);
    }
    // Tekken's byte tokens are the first 256 ranks, after the 1000 special ids.
    tok_ids v = enc(tekken, "\xfe", 1);
    ck_assert_int_eq(v.ids[0], 1000 + 0xfe);
    tok_ids_free(&v);
}
END_TEST

// Reference UTF-8 check written from the definition: decode the code point, then reject
// overlong forms, surrogates and values above U+10FFFF.
static size_t ref_seq_len(const unsigned char *s, size_t n) {
    unsigned c = s[0], len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (!len || len > n)
        return 0;
    uint32_t cp = len == 1 ? c : c & (0x7F >> len);
    for (unsigned k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80)
            return 0;
        cp = cp << 6 | (s[k] & 0x3F);
    }
    static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min_cp[len] || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
        return 0;
    return len;
}

START_TEST(test_utf8_validation_matches_definition) {
    static const unsigned char tails[] = {0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF};
    const size_t nt = sizeof tails;
    for (unsigned a = 0; a < 256; a++)
        for (unsigned b = 0; b < 256; b++)
            for (size_t c = 0; c < nt; c++)
                for (size_t d = 0; d < nt; d++) {
                    unsigned char s[4] = {(unsigned char)a, (unsigned char)b, tails[c], tails[d]};
                    size_t want = 0;
                    for (size_t l; want < 4 && (l = ref_seq_len(s + want, 4 - want)) > 0;)
                        want += l;
                    size_t got = tok_utf8_valid_prefix((const char *)s, 4);
                    if (got != want)
                        ck_abort_msg("%02x %02x %02x %02x: valid prefix %zu, expected %zu", s[0],
                                     s[1], s[2], s[3], got, want);
                }
}
END_TEST

// ---- special tokens --------------------------------------------------------------------

START_TEST(test_special_tokens_by_name) {
    static const struct {
        const char *name;
        int32_t id;
    } tekken_ids[] = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"[INST]", 3}, {"[/INST]", 4},
                      {"[AVAILABLE_TOOLS]", 5}, {"[/AVAILABLE_TOOLS]", 6}, {"[TOOL_RESULTS]", 7},
                      {"[/TOOL_RESULTS]", 8}, {"[TOOL_CALLS]", 9}, {"<pad>", 11},
                      {"[SYSTEM_PROMPT]", 17}, {"[/SYSTEM_PROMPT]", 18}, {"[ARGS]", 32},
                      {"[THINK]", 34}, {"[/THINK]", 35}, {"[MODEL_SETTINGS]", 36},
                      {"[/MODEL_SETTINGS]", 37}}; // SPECS.md section 5
    for (size_t i = 0; i < sizeof tekken_ids / sizeof *tekken_ids; i++)
        ck_assert_int_eq(tok_special(tekken, tekken_ids[i].name), tekken_ids[i].id);
    ck_assert_int_eq(tok_special(tekken, "[NOPE]"), -1);
    ck_assert_int_eq(tok_special(tekken, ""), -1);
    ck_assert_int_eq(tok_special(tekken, "hello"), -1); // an ordinary token is not special
    ck_assert_int_eq(tok_bos(tekken), 1);
    ck_assert_int_eq(tok_eos(tekken), 2);
    ck_assert_uint_eq(tok_vocab_size(tekken), 131072);
    ck_assert_str_eq(tok_kind(tekken), "tekken");
    // special ids decode to their names, next to ordinary text
    tok_ids v = {0};
    ck_assert_ok(tok_ids_push(&v, 1));
    ck_assert_ok(tok_ids_push(&v, 3));
    ck_assert_ok(tok_encode(tekken, " hi", 3, &v));
    ck_assert_ok(tok_ids_push(&v, 4));
    char *buf = molt_strdup(">");
    size_t len = 1;
    ck_assert_ok(tok_decode(tekken, v.ids, v.n, &buf, &len)); // appends
    ck_assert_str_eq(buf, "><s>[INST] hi[/INST]");
    ck_assert_uint_eq(len, strlen(buf));
    molt_free(buf);
    tok_ids_free(&v);

    // tokenizer.json: added tokens by text; bos/eos from tokenizer_config.json beside it
    ck_assert_int_eq(tok_special(hf, "<｜begin▁of▁sentence｜>"), 0);
    ck_assert_int_eq(tok_special(hf, "<｜end▁of▁sentence｜>"), 1);
    ck_assert_int_eq(tok_special(hf, "<｜User｜>"), 128803);
    ck_assert_int_eq(tok_special(hf, "[INST]"), -1);
    ck_assert_int_eq(tok_bos(hf), 0);
    ck_assert_int_eq(tok_eos(hf), 1);
    ck_assert_uint_eq(tok_vocab_size(hf), 128815);
    ck_assert_str_eq(tok_kind(hf), "tokenizer.json");
}
END_TEST

// "[INST]" in text is text: no special id comes out, and it decodes back unchanged.
START_TEST(test_control_tokens_in_text_are_text) {
    static const char *const texts[] = {"[INST]", "[INST] hi [/INST]", "<s>", "</s>x<unk>",
                                        "[TOOL_CALLS][ARGS]{}", "<SPECIAL_20>"};
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        tok_ids v = enc(tekken, texts[i], strlen(texts[i]));
        ck_assert_uint_ge(v.n, 2);
        for (size_t k = 0; k < v.n; k++)
            ck_assert_msg(v.ids[k] >= 1000, "%s gave special id %d", texts[i], v.ids[k]);
        check_roundtrip(tekken, texts[i], strlen(texts[i]), texts[i]);
        tok_ids_free(&v);
    }
    // tokenizer.json: special added tokens are text, non-special ones match (as in HF)
    const char *s = "<｜begin▁of▁sentence｜>x<｜User｜>";
    tok_ids v = enc(hf, s, strlen(s));
    ck_assert_uint_ge(v.n, 3);
    for (size_t k = 0; k + 1 < v.n; k++)
        ck_assert_msg(v.ids[k] >= 2 && v.ids[k] < 128000, "id %d at %zu", v.ids[k], k);
    ck_assert_int_eq(v.ids[v.n - 1], 128803);
    check_roundtrip(hf, s, strlen(s), s);
    tok_ids_free(&v);
}
END_TEST

// ---- BPE -------------------------------------------------------------------------------

// tiktoken's merge loop from its definition, on byte strings: repeatedly merge the leftmost
// adjacent pair whose concatenation has the lowest rank. Knows nothing of the pair table.
static size_t naive_tiktoken(const tok_tokenizer *t, const char *s, size_t n, uint32_t *out) {
    size_t start[512], len[512], m = n;
    for (size_t i = 0; i < n; i++)
        start[i] = i, len[i] = 1;
    for (;;) {
        uint32_t best = TOK_NONE;
        size_t at = 0;
        for (size_t i = 0; i + 1 < m; i++) {
            uint32_t id = tok_strmap_get(&t->by_bytes, &t->model, s + start[i], len[i] + len[i + 1]);
            if (id < best)
                best = id, at = i;
        }
        if (best == TOK_NONE)
            break;
        len[at] += len[at + 1];
        memmove(start + at + 1, start + at + 2, (m - at - 2) * sizeof *start);
        memmove(len + at + 1, len + at + 2, (m - at - 2) * sizeof *len);
        m--;
    }
    for (size_t i = 0; i < m; i++)
        out[i] = tok_strmap_get(&t->by_bytes, &t->model, s + start[i], len[i]);
    return m;
}

static void random_piece(unsigned *seed, char *s, size_t n) {
    static const char *const frags[] = {"the", "ing", " ", "  ", "é", "中", "文", "🙂", "a", "b", "ab",
                                        "1", "22", "\n", "er", "th", "he", "in", "на", "ы"};
    size_t k = 0;
    while (k < n) {
        *seed = *seed * 1103515245u + 12345u;
        unsigned r = *seed >> 16;
        if (r % 7 == 0) { // a random byte now and then
            s[k++] = (char)(r >> 3);
            continue;
        }
        const char *f = frags[(r >> 3) % (sizeof frags / sizeof *frags)];
        for (size_t j = 0; f[j] && k < n; j++)
            s[k++] = f[j];
    }
}

START_TEST(test_bpe_matches_tiktoken_definition) {
    unsigned seed = 12345;
    char s[300];
    uint32_t scan[300], heap[300], want[300];
    void *scratch = NULL;
    size_t scratch_cap = 0;
    for (int iter = 0; iter < 600; iter++) {
        size_t n = 2 + (size_t)(iter % 97) * 3; // 2 .. 290 bytes: both paths below 48
        random_piece(&seed, s, n);
        size_t nw = naive_tiktoken(tekken, s, n, want), ns = n, nh = n;
        for (size_t i = 0; i < n; i++)
            scan[i] = heap[i] = tekken->byte_id[(unsigned char)s[i]];
        ck_assert_ok(tok_bpe_merge(tekken, scan, &ns, false, &scratch, &scratch_cap));
        ck_assert_ok(tok_bpe_merge(tekken, heap, &nh, true, &scratch, &scratch_cap));
        ck_assert_uint_eq(nh, nw);
        ck_assert(!memcmp(heap, want, nw * sizeof *want));
        ck_assert_uint_eq(ns, nw);
        ck_assert(!memcmp(scan, want, nw * sizeof *want));
        // tokenizer.json's merge list: the two paths agree
        for (size_t i = 0; i < n; i++)
            scan[i] = heap[i] = hf->byte_id[(unsigned char)s[i]];
        ns = nh = n;
        ck_assert_ok(tok_bpe_merge(hf, scan, &ns, false, &scratch, &scratch_cap));
        ck_assert_ok(tok_bpe_merge(hf, heap, &nh, true, &scratch, &scratch_cap));
        ck_assert_uint_eq(ns, nh);
        ck_assert(!memcmp(scan, heap, ns * sizeof *scan));
    }
    molt_free(scratch);
}
END_TEST

// Long runs take the heap path and the regex fallback; quadratic work would time out.
START_TEST(test_long_runs) {
    size_t n = 120000;
    char *s = malloc(n);
    static const char *const units[] = {" ", "a", "\n", "1", "ab", " \t", "🙂", "é", "=", "中"};
    for (size_t u = 0; u < sizeof units / sizeof *units; u++) {
        size_t ul = strlen(units[u]), m = n / ul * ul;
        for (size_t i = 0; i < m; i++)
            s[i] = units[u][i % ul];
        ck_assert_uint_ge(check_roundtrip(tekken, s, m, units[u]), 1);
        ck_assert_uint_ge(check_roundtrip(hf, s, m, units[u]), 1);
    }
    free(s);
}
END_TEST

// ---- failures --------------------------------------------------------------------------

START_TEST(test_encode_allocation_failures) {
    const char *s = "Allocation failures leave the list as it was. 中文 🙂 " "xxxxxxxxxxxxxxxxxxxxxxxxxx"
                    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    const tok_tokenizer *ts[2] = {tekken, hf};
    for (int k = 0; k < 2; k++) {
        tok_ids v = {0};
        ck_assert_ok(tok_ids_push(&v, 7));
        int failures = 0;
        for (long f = 0; f < 64; f++) {
            molt_alloc_fail_after(f);
            molt_status st = tok_encode(ts[k], s, strlen(s), &v);
            molt_alloc_fail_after(-1);
            if (st == MOLT_OK)
                break;
            failures++;
            ck_assert_int_eq(st, MOLT_ENOMEM);
            ck_assert_uint_eq(v.n, 1);
            ck_assert_int_eq(v.ids[0], 7);
        }
        ck_assert_int_ge(failures, 1);
        tok_ids_free(&v);
    }
}
END_TEST

START_TEST(test_decode_bad_ids) {
    int32_t ids[3] = {1000, -1, 5};
    char *buf = NULL;
    size_t len = 0;
    ck_assert_int_eq(tok_decode(tekken, ids, 3, &buf, &len), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "tok_decode: id -1 at position 1 is outside [0, 131072)");
    ids[1] = 131072;
    ck_assert_int_eq(tok_decode(tekken, ids, 3, &buf, &len), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "tok_decode: id 131072 at position 1 is outside [0, 131072)");
    ck_assert_ptr_null(buf);
    ck_assert_uint_eq(len, 0);
}
END_TEST

int main(void) {
    Suite *s = suite_create("tokenizer");
    TCase *tc = tcase_create("tokenizer");
    tcase_add_unchecked_fixture(tc, load_shared, free_shared);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_tekken_parity);
    tcase_add_test(tc, test_tokenizer_json_parity);
    tcase_add_test(tc, test_small_tokenizers_parity);
    tcase_add_test(tc, test_golden_reasoning_effort);
    tcase_add_test(tc, test_roundtrip_corpus);
    tcase_add_test(tc, test_invalid_utf8_bytes);
    tcase_add_test(tc, test_utf8_validation_matches_definition);
    tcase_add_test(tc, test_special_tokens_by_name);
    tcase_add_test(tc, test_control_tokens_in_text_are_text);
    tcase_add_test(tc, test_bpe_matches_tiktoken_definition);
    tcase_add_test(tc, test_long_runs);
    tcase_add_test(tc, test_encode_allocation_failures);
    tcase_add_test(tc, test_decode_bad_ids);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
