// tests/test_dataset.c: reading JSONL (plain, gzip, zstd, xz, and tar/tar.gz/zip archives in
// sorted member order, written at run time with libarchive), tell/seek, the record formats
// (chat, alpaca, completion, text; detection and --format), and every bad-input case with
// its exact FILE[:MEMBER]:LINE:COL message, under the stop, skip and truncate policies.
#include "harness/harness.h"
#include "harness/data_env.h"
#include "data/ds_internal.h"

#include <archive.h>
#include <archive_entry.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static data_env env;
static tok_tokenizer *tekken;
static chat_template *ct;

static void setup(void) {
    data_env_open(&env, "dataset");
    tekken = env.tok;
    ct = env.ct;
}

static void teardown(void) { data_env_close(&env); }

static const char *tmp(const char *name) { return data_env_path(&env, name); }

static void write_file(const char *path, const char *data) {
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(data, 1, strlen(data), f), strlen(data));
    fclose(f);
}

// A single compressed stream (libarchive's raw writer with one filter).
static void write_compressed(const char *path, int filter, const char *data) {
    struct archive *a = archive_write_new();
    ck_assert_int_eq(archive_write_add_filter(a, filter), ARCHIVE_OK);
    ck_assert_int_eq(archive_write_set_format_raw(a), ARCHIVE_OK);
    ck_assert_int_eq(archive_write_open_filename(a, path), ARCHIVE_OK);
    struct archive_entry *e = archive_entry_new();
    archive_entry_set_pathname(e, "data");
    archive_entry_set_filetype(e, AE_IFREG);
    archive_entry_set_size(e, (la_int64_t)strlen(data));
    ck_assert_int_eq(archive_write_header(a, e), ARCHIVE_OK);
    ck_assert_int_eq(archive_write_data(a, data, strlen(data)), (la_ssize_t)strlen(data));
    archive_entry_free(e);
    ck_assert_int_eq(archive_write_close(a), ARCHIVE_OK);
    archive_write_free(a);
}

// An archive (format: ARCHIVE_FORMAT_*) of n members {name, data}, in the order given.
static void write_archive(const char *path, int format, int filter, const char *(*m)[2],
                          int n) {
    struct archive *a = archive_write_new();
    ck_assert_int_eq(archive_write_set_format(a, format), ARCHIVE_OK);
    ck_assert_int_eq(archive_write_add_filter(a, filter), ARCHIVE_OK);
    ck_assert_int_eq(archive_write_open_filename(a, path), ARCHIVE_OK);
    for (int i = 0; i < n; i++) {
        struct archive_entry *e = archive_entry_new();
        archive_entry_set_pathname(e, m[i][0]);
        archive_entry_set_filetype(e, AE_IFREG);
        archive_entry_set_perm(e, 0644);
        archive_entry_set_size(e, (la_int64_t)strlen(m[i][1]));
        ck_assert_int_eq(archive_write_header(a, e), ARCHIVE_OK);
        ck_assert_int_eq(archive_write_data(a, m[i][1], strlen(m[i][1])),
                         (la_ssize_t)strlen(m[i][1]));
        archive_entry_free(e);
    }
    ck_assert_int_eq(archive_write_close(a), ARCHIVE_OK);
    archive_write_free(a);
}

// All lines of path as "WHERE|text" joined by "\n".
static char *read_all(const char *path, size_t max_line) {
    ds_reader *r;
    ck_assert_ok(ds_reader_open(path, max_line, &r));
    ds_buf out = {0};
    for (;;) {
        const char *line;
        size_t len;
        bool over;
        char where[512];
        ck_assert_ok(ds_reader_next(r, &line, &len, &over));
        if (!line)
            break;
        ck_assert_ok(ds_buf_puts(&out, ds_reader_where(r, 1, where, sizeof where) +
                                           strlen(env.dir) + 1));
        ck_assert_ok(ds_buf_puts(&out, over ? "|OVER|" : "|"));
        ck_assert_ok(ds_buf_put(&out, line, over ? 4 : len));
        ck_assert_ok(ds_buf_puts(&out, "\n"));
    }
    ds_reader_close(r);
    return out.p ? out.p : molt_strdup("");
}

// ---- reading ----------------------------------------------------------------------------

static const char plain[] = "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\r\nlast";

START_TEST(test_single_streams) {
    struct {
        const char *name;
        int filter;
    } kinds[] = {{"p.jsonl.gz", ARCHIVE_FILTER_GZIP}, {"p.jsonl.zst", ARCHIVE_FILTER_ZSTD},
                 {"p.jsonl.xz", ARCHIVE_FILTER_XZ}, {"p.jsonl.bz2", ARCHIVE_FILTER_BZIP2}};
    write_file(tmp("p.jsonl"), plain);
    char *want = read_all(tmp("p.jsonl"), 0);
    ck_assert_str_eq(want, "p.jsonl:1:1|{\"text\": \"a\"}\np.jsonl:2:1|\n"
                           "p.jsonl:3:1|{\"text\": \"b\"}\np.jsonl:4:1|last\n");
    for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++) {
        write_compressed(tmp(kinds[k].name), kinds[k].filter, plain);
        char *got = read_all(tmp(kinds[k].name), 0);
        // same lines, named after the compressed file
        char expect[512];
        snprintf(expect, sizeof expect, "%s:1:1|{\"text\": \"a\"}\n%s:2:1|\n%s:3:1|{\"text\": "
                 "\"b\"}\n%s:4:1|last\n", kinds[k].name, kinds[k].name, kinds[k].name,
                 kinds[k].name);
        ck_assert_str_eq(got, expect);
        molt_free(got);
    }
    molt_free(want);
    write_file(tmp("empty.jsonl"), "");
    char *none = read_all(tmp("empty.jsonl"), 0);
    ck_assert_str_eq(none, "");
    molt_free(none);
}
END_TEST

static const char *members[][2] = {
    {"b.jsonl", "b1\nb2\n"},          {"README.md", "not data\n"},
    {"a.jsonl", "a1"},                {"sub/c.jsonl", "c1\n\xEF\xBB\xBF" "c2\n"},
    {"__MACOSX/._a.jsonl", "junk\n"}, {"._b.jsonl", "junk\n"},
};

START_TEST(test_archives_sorted_members) {
    const char *want_fmt = "%s:a.jsonl:1:1|a1\n%s:b.jsonl:1:1|b1\n%s:b.jsonl:2:1|b2\n"
                           "%s:sub/c.jsonl:1:1|c1\n%s:sub/c.jsonl:2:1|\xEF\xBB\xBF" "c2\n";
    struct {
        const char *name;
        int format, filter;
    } kinds[] = {{"m.tar", ARCHIVE_FORMAT_TAR_PAX_RESTRICTED, ARCHIVE_FILTER_NONE},
                 {"m.tar.gz", ARCHIVE_FORMAT_TAR_USTAR, ARCHIVE_FILTER_GZIP},
                 {"m.tar.zst", ARCHIVE_FORMAT_TAR_PAX_RESTRICTED, ARCHIVE_FILTER_ZSTD},
                 {"m.zip", ARCHIVE_FORMAT_ZIP, ARCHIVE_FILTER_NONE}};
    for (size_t k = 0; k < sizeof kinds / sizeof *kinds; k++) {
        write_archive(tmp(kinds[k].name), kinds[k].format, kinds[k].filter, members, 6);
        char *got = read_all(tmp(kinds[k].name), 0), want[1024];
        const char *n = kinds[k].name;
        snprintf(want, sizeof want, want_fmt, n, n, n, n, n);
        // a byte order mark is dropped only at the start of a member
        ck_assert_str_eq(got, want);
        molt_free(got);
    }
    const char *docs[][2] = {{"README.md", "x\n"}};
    write_archive(tmp("none.tar"), ARCHIVE_FORMAT_TAR_USTAR, ARCHIVE_FILTER_NONE, docs, 1);
    ds_reader *r;
    ck_assert_int_eq(ds_reader_open(tmp("none.tar"), 0, &r), MOLT_EFORMAT);
    char want[256];
    snprintf(want, sizeof want, "%s: the archive holds no .jsonl member", tmp("none.tar"));
    ck_assert_str_eq(molt_err_msg(), want);
}
END_TEST

START_TEST(test_tell_seek) {
    write_archive(tmp("s.tar"), ARCHIVE_FORMAT_TAR_USTAR, ARCHIVE_FILTER_NONE, members, 6);
    ds_reader *r;
    ck_assert_ok(ds_reader_open(tmp("s.tar"), 0, &r));
    ds_pos pos[8];
    char text[8][16];
    int n = 0;
    for (;; n++) {
        const char *line;
        size_t len;
        bool over;
        pos[n] = ds_reader_tell(r);
        ck_assert_ok(ds_reader_next(r, &line, &len, &over));
        if (!line)
            break;
        snprintf(text[n], sizeof text[n], "%.*s", (int)len, line);
    }
    ck_assert_int_eq(n, 5);
    for (int k = n - 1; k >= 0; k--) { // backwards: every seek reopens
        const char *line;
        size_t len;
        bool over;
        ck_assert_ok(ds_reader_seek(r, pos[k]));
        ck_assert_ok(ds_reader_next(r, &line, &len, &over));
        ck_assert_ptr_nonnull(line);
        ck_assert_int_eq((int)len, (int)strlen(text[k]));
        ck_assert_mem_eq(line, text[k], len);
    }
    ck_assert_ok(ds_reader_seek(r, pos[n])); // the end
    const char *line;
    size_t len;
    bool over;
    ck_assert_ok(ds_reader_next(r, &line, &len, &over));
    ck_assert_ptr_null(line);
    ck_assert_int_eq(ds_reader_seek(r, (ds_pos){1, 9}), MOLT_EFORMAT);
    ds_reader_close(r);
}
END_TEST

START_TEST(test_reader_errors) {
    ds_reader *r;
    ck_assert_int_eq(ds_reader_open(tmp("missing.jsonl"), 0, &r), MOLT_EIO);
    char want[256];
    snprintf(want, sizeof want, "cannot open %s: no such file", tmp("missing.jsonl"));
    ck_assert_str_eq(molt_err_msg(), want);
    // a gzip stream cut short fails with libarchive's reason, never a silent short read
    char big[20000];
    for (size_t i = 0; i < sizeof big - 1; i++)
        big[i] = (i % 61 == 60) ? '\n' : (char)('a' + (i * 7919) % 26);
    big[sizeof big - 1] = 0;
    write_compressed(tmp("cut.jsonl.gz"), ARCHIVE_FILTER_GZIP, big);
    FILE *f = fopen(tmp("cut.jsonl.gz"), "r+b");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    ck_assert_int_eq(truncate(tmp("cut.jsonl.gz"), size / 2), 0);
    molt_status st = ds_reader_open(tmp("cut.jsonl.gz"), 0, &r);
    while (st == MOLT_OK) {
        const char *line;
        size_t len;
        bool over;
        st = ds_reader_next(r, &line, &len, &over);
        if (st == MOLT_OK && !line)
            ck_abort_msg("a truncated gzip stream read to the end without an error");
    }
    ck_assert_int_eq(st, MOLT_EIO);
    ck_assert_msg(strstr(molt_err_msg(), "truncated gzip input"), "%s", molt_err_msg());
    ds_reader_close(r);
    // lines over the cap are flagged with their full length
    write_file(tmp("long.jsonl"), "0123456789abcdef\nshort\n");
    char *got = read_all(tmp("long.jsonl"), 8);
    ck_assert_str_eq(got, "long.jsonl:1:1|OVER|0123\nlong.jsonl:2:1|short\n");
    molt_free(got);
}
END_TEST

// ---- records ----------------------------------------------------------------------------

static void encode_text(const char *s, tok_ids *out) {
    out->n = 0;
    ck_assert_ok(tok_encode(tekken, s, strlen(s), out));
}

static molt_status rec(const char *line, ds_format f, int max_len, bool trunc, ds_example *ex,
                       ds_record_info *info) {
    ds_example_clear(ex);
    return ds_record_encode(ct, f, line, strlen(line), max_len, trunc, ex, info);
}

START_TEST(test_record_formats) {
    ds_example ex = {0}, ref = {0};
    ds_record_info info;
    tok_ids a = {0}, b = {0};
    // text: <s> text </s>, everything after <s> trained
    ck_assert_ok(rec("{\"text\": \"Hello world\"}", DS_FORMAT_AUTO, 0, false, &ex, &info));
    ck_assert_int_eq(info.format, DS_FORMAT_TEXT);
    encode_text("Hello world", &a);
    ck_assert_uint_eq(ex.n, a.n + 2);
    ck_assert_int_eq(ex.ids[0], 1);
    ck_assert_mem_eq(ex.ids + 1, a.ids, a.n * sizeof *a.ids);
    ck_assert_int_eq(ex.ids[ex.n - 1], 2);
    ck_assert_uint_eq(ds_example_trained(&ex), ex.n - 1);
    // completion: <s> prompt completion </s>, completion and </s> trained
    ck_assert_ok(rec("{\"prompt\": \"The sky is\", \"completion\": \" blue.\"}", DS_FORMAT_AUTO,
                     0, false, &ex, &info));
    ck_assert_int_eq(info.format, DS_FORMAT_COMPLETION);
    encode_text("The sky is", &a);
    encode_text(" blue.", &b);
    ck_assert_uint_eq(ex.n, a.n + b.n + 2);
    ck_assert_mem_eq(ex.ids + 1, a.ids, a.n * sizeof *a.ids);
    ck_assert_mem_eq(ex.ids + 1 + a.n, b.ids, b.n * sizeof *b.ids);
    for (size_t i = 0; i < ex.n; i++)
        ck_assert_int_eq(ex.mask[i], i > a.n);
    // alpaca: the same as the chat record it stands for
    ck_assert_ok(rec("{\"instruction\": \"Add\", \"input\": \"2+2\", \"output\": \"4\", "
                     "\"system\": \"Be exact.\"}", DS_FORMAT_AUTO, 0, false, &ex, &info));
    ck_assert_int_eq(info.format, DS_FORMAT_ALPACA);
    ck_assert_ok(rec("{\"messages\": [{\"role\": \"system\", \"content\": \"Be exact.\"}, "
                     "{\"role\": \"user\", \"content\": \"Add\\n\\n2+2\"}, {\"role\": "
                     "\"assistant\", \"content\": \"4\"}]}", DS_FORMAT_AUTO, 0, false, &ref,
                     &info));
    ck_assert_int_eq(info.format, DS_FORMAT_CHAT);
    ck_assert_uint_eq(ex.n, ref.n);
    ck_assert_mem_eq(ex.ids, ref.ids, ex.n * sizeof *ex.ids);
    ck_assert_mem_eq(ex.mask, ref.mask, ex.n);
    // an empty input adds nothing
    ck_assert_ok(rec("{\"instruction\": \"Add\", \"input\": \"\", \"output\": \"4\"}",
                     DS_FORMAT_AUTO, 0, false, &ex, &info));
    ck_assert_ok(rec("{\"messages\": [{\"role\": \"user\", \"content\": \"Add\"}, {\"role\": "
                     "\"assistant\", \"content\": \"4\"}]}", DS_FORMAT_AUTO, 0, false, &ref,
                     &info));
    ck_assert_mem_eq(ex.ids, ref.ids, ex.n * sizeof *ex.ids);
    // --format picks one format of a record that has several
    const char *both = "{\"text\": \"x\", \"prompt\": \"p\", \"completion\": \"c\"}";
    ck_assert_int_eq(rec(both, DS_FORMAT_AUTO, 0, false, &ex, &info), MOLT_EFORMAT);
    ck_assert_ok(rec(both, DS_FORMAT_TEXT, 0, false, &ex, &info));
    ck_assert_uint_eq(ex.n, 3);
    ck_assert_ok(rec(both, DS_FORMAT_COMPLETION, 0, false, &ex, &info));
    ck_assert_int_eq(info.format, DS_FORMAT_COMPLETION);
    // truncation keeps the first max_seq_len tokens
    ck_assert_ok(rec("{\"text\": \"one two three four five six seven\"}", DS_FORMAT_AUTO, 4,
                     true, &ex, &info));
    ck_assert(info.truncated);
    ck_assert_uint_eq(ex.n, 4);
    tok_ids_free(&a);
    tok_ids_free(&b);
    ds_example_free(&ex);
    ds_example_free(&ref);
}
END_TEST

// ---- bad inputs -------------------------------------------------------------------------

typedef struct {
    const char *line;
    ds_bad_reason why;
    const char *msg; // after "FILE:LINE:COL: "
    int col;
} bad_input;

static const bad_input bad_inputs[] = {
    {"{\"text\": \"a\",}", DS_BAD_JSON, "invalid JSON: string or '}' expected near '}'", 14},
    {"{\"text\": \"a\"} x", DS_BAD_JSON, "invalid JSON: end of file expected near 'x'", 15},
    {"{\"text\": \"caf\xff\"}", DS_BAD_UTF8, "invalid UTF-8 (byte 0xff)", 14},
    {"{\"text\": \"\xe6\x97\"}", DS_BAD_UTF8, "invalid UTF-8 (byte 0xe6)", 11},
    {"{\"foo\": 1}", DS_BAD_FORMAT_UNKNOWN, "unknown record format: no 'messages', "
     "'instruction'/'output', 'prompt'/'completion' or 'text' field", 1},
    {"[1, 2]", DS_BAD_FORMAT_UNKNOWN, "record is not a JSON object but an array", 1},
    {"{\"text\": \"a\", \"messages\": []}", DS_BAD_FORMAT_MIXED, "mixed record format: fields "
     "of chat ('messages') and text ('text'); pick one with --format", 1},
    {"{\"instruction\": \"do\"}", DS_BAD_FIELD_MISSING, "missing field 'output'", 1},
    {"{\"prompt\": \"p\", \"completion\": null}", DS_BAD_FIELD_MISSING,
     "missing field 'completion'", 1},
    {"{\"messages\": [{\"role\": \"user\"}]}", DS_BAD_FIELD_MISSING,
     "missing field 'messages[0].content'", 1},
    {"{\"text\": \"\"}", DS_BAD_FIELD_EMPTY, "empty field 'text'", 1},
    {"{\"instruction\": \"\", \"output\": \"o\"}", DS_BAD_FIELD_EMPTY,
     "empty field 'instruction'", 1},
    {"{\"text\": 5}", DS_BAD_FIELD_INVALID, "field 'text' must be a string, not an integer", 1},
    {"{\"text\": \"one two three four five six seven eight nine ten\"}", DS_BAD_TOO_LONG,
     "example has 12 tokens, more than max_seq_len 8", 1},
};

// One file "bad.jsonl": two good records, then the bad one on line 3.
static void write_bad(const char *name, const char *line) {
    ds_buf b = {0};
    ck_assert_ok(ds_buf_puts(&b, "{\"text\": \"ok\"}\n\n"));
    ck_assert_ok(ds_buf_puts(&b, line));
    ck_assert_ok(ds_buf_puts(&b, "\n{\"text\": \"after\"}\n"));
    write_file(tmp(name), b.p);
    ds_buf_free(&b);
}

// Stops at the bad record with its exact message; skipped, it is counted by its reason.
static void check_bad_input(const bad_input *c) {
    if (c->why == DS_BAD_TOO_LONG) { // the count in the message is the real one
        tok_ids ids = {0};
        encode_text("one two three four five six seven eight nine ten", &ids);
        ck_assert_uint_eq(ids.n + 2, 12);
        tok_ids_free(&ids);
    }
    write_bad("bad.jsonl", c->line);
    ds_source src = {.ct = ct, .max_seq_len = 8, .keep_frac = 1};
    ck_assert_ok(ds_source_open(&src, tmp("bad.jsonl")));
    ds_example ex = {0};
    bool end;
    ck_assert_ok(ds_source_next(&src, &ex, &end));
    ck_assert(!end);
    molt_status st = ds_source_next(&src, &ex, &end);
    ck_assert_int_eq(st, MOLT_EFORMAT);
    char want[512];
    snprintf(want, sizeof want, "%s:3:%d: %s", tmp("bad.jsonl"), c->col, c->msg);
    ck_assert_str_eq(molt_err_msg(), want);
    ds_source_close(&src);
    // skipped: the records around it come through and the reason is counted
    src = (ds_source){.ct = ct, .max_seq_len = 8, .keep_frac = 1, .on_bad = DS_ON_BAD_SKIP};
    ck_assert_ok(ds_source_open(&src, tmp("bad.jsonl")));
    int n = 0;
    for (;;) {
        ck_assert_ok(ds_source_next(&src, &ex, &end));
        if (end)
            break;
        n++;
    }
    ck_assert_int_eq(n, 2);
    ck_assert_int_eq(src.blank, 1);
    for (int k = 0; k < DS_BAD_COUNT; k++)
        ck_assert_int_eq(src.bad[k], k == (int)c->why);
    ds_source_close(&src);
    ds_example_free(&ex);
}

START_TEST(test_bad_inputs) {
    for (size_t k = 0; k < sizeof bad_inputs / sizeof *bad_inputs; k++)
        check_bad_input(&bad_inputs[k]);
}
END_TEST

START_TEST(test_bad_input_in_archive_member) {
    const char *m[][2] = {{"z.jsonl", "{\"text\": \"z\"}\n"},
                          {"a.jsonl", "{\"text\": \"a\"}\n{\"text\": \"\"}\n"}};
    write_archive(tmp("bad.tar.gz"), ARCHIVE_FORMAT_TAR_USTAR, ARCHIVE_FILTER_GZIP, m, 2);
    ds_source src = {.ct = ct, .keep_frac = 1};
    ck_assert_ok(ds_source_open(&src, tmp("bad.tar.gz")));
    ds_example ex = {0};
    bool end;
    ck_assert_ok(ds_source_next(&src, &ex, &end));
    ck_assert_int_eq(ds_source_next(&src, &ex, &end), MOLT_EFORMAT);
    char want[256];
    snprintf(want, sizeof want, "%s:a.jsonl:2:1: empty field 'text'", tmp("bad.tar.gz"));
    ck_assert_str_eq(molt_err_msg(), want);
    ds_source_close(&src);
    ds_example_free(&ex);
}
END_TEST

START_TEST(test_policies) {
    // one record per reason, plus good ones; an over-long line (byte cap 200)
    ds_buf b = {0};
    ck_assert_ok(ds_buf_puts(&b, "{\"text\": \"good\"}\n"));
    for (size_t k = 0; k < sizeof bad_inputs / sizeof *bad_inputs; k++) {
        ck_assert_ok(ds_buf_puts(&b, bad_inputs[k].line));
        ck_assert_ok(ds_buf_puts(&b, "\n{\"text\": \"good\"}\n"));
    }
    char longline[300];
    memset(longline, 'x', sizeof longline);
    memcpy(longline, "{\"text\": \"", 10);
    memcpy(longline + sizeof longline - 3, "\"}\n", 3);
    ck_assert_ok(ds_buf_put(&b, longline, sizeof longline));
    write_file(tmp("mixed.jsonl"), b.p);
    ds_buf_free(&b);
    uint64_t want[DS_BAD_COUNT] = {0};
    for (size_t k = 0; k < sizeof bad_inputs / sizeof *bad_inputs; k++)
        want[bad_inputs[k].why]++;
    want[DS_BAD_TOO_LONG]++; // the over-long line
    ds_source src = {.ct = ct, .max_seq_len = 8, .keep_frac = 1, .on_bad = DS_ON_BAD_SKIP,
                     .max_line = 200};
    ck_assert_ok(ds_source_open(&src, tmp("mixed.jsonl")));
    ds_example ex = {0};
    bool end;
    int n = 0;
    for (;; n++) {
        ck_assert_ok(ds_source_next(&src, &ex, &end));
        if (end)
            break;
    }
    ck_assert_int_eq(n, (int)(sizeof bad_inputs / sizeof *bad_inputs) + 1);
    for (int k = 0; k < DS_BAD_COUNT; k++)
        ck_assert_msg(src.bad[k] == want[k], "%s: %llu skipped, expected %llu",
                      ds_bad_reason_name((ds_bad_reason)k), (unsigned long long)src.bad[k],
                      (unsigned long long)want[k]);
    ck_assert_int_eq(src.truncated, 0);
    ds_source_close(&src);
    // truncate: the over-long example is cut and counted; the next bad record still stops
    src = (ds_source){.ct = ct, .max_seq_len = 8, .keep_frac = 1,
                      .on_bad = DS_ON_BAD_TRUNCATE};
    write_file(tmp("long.jsonl"), "{\"text\": \"one two three four five six seven eight nine "
                                  "ten\"}\n{\"text\": 1}\n");
    ck_assert_ok(ds_source_open(&src, tmp("long.jsonl")));
    ck_assert_ok(ds_source_next(&src, &ex, &end));
    ck_assert_uint_eq(ex.n, 8);
    ck_assert_int_eq(src.truncated, 1);
    ck_assert_int_eq(ds_source_next(&src, &ex, &end), MOLT_EFORMAT);
    char msg[256];
    snprintf(msg, sizeof msg, "%s:2:1: field 'text' must be a string, not an integer",
             tmp("long.jsonl"));
    ck_assert_str_eq(molt_err_msg(), msg);
    ds_source_close(&src);
    ds_example_free(&ex);
}
END_TEST

START_TEST(test_oversize_line_message) {
    char line[300];
    memset(line, 'x', sizeof line);
    line[sizeof line - 1] = 0;
    write_file(tmp("huge.jsonl"), line);
    ds_source src = {.ct = ct, .keep_frac = 1, .max_line = 200};
    ck_assert_ok(ds_source_open(&src, tmp("huge.jsonl")));
    ds_example ex = {0};
    bool end;
    ck_assert_int_eq(ds_source_next(&src, &ex, &end), MOLT_EFORMAT);
    char want[256];
    snprintf(want, sizeof want, "%s:1:1: record of 299 bytes, more than the 200-byte line "
             "limit", tmp("huge.jsonl"));
    ck_assert_str_eq(molt_err_msg(), want);
    ds_source_close(&src);
    ds_example_free(&ex);
}
END_TEST

int main(void) {
    Suite *s = suite_create("dataset");
    TCase *tc = tcase_create("dataset");
    tcase_add_unchecked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_single_streams);
    tcase_add_test(tc, test_archives_sorted_members);
    tcase_add_test(tc, test_tell_seek);
    tcase_add_test(tc, test_reader_errors);
    tcase_add_test(tc, test_record_formats);
    tcase_add_test(tc, test_bad_inputs);
    tcase_add_test(tc, test_bad_input_in_archive_member);
    tcase_add_test(tc, test_policies);
    tcase_add_test(tc, test_oversize_line_message);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
