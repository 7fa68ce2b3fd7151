// tests/test_pack.c: the batch loader: packed and padded rows (segments, positions, padding,
// every example exactly once per epoch with its own ids and mask), first-fit-decreasing
// fill, seeded determinism, mixing weights, labels, and the cursor: bytes round trip,
// validation, and a save/restore anywhere (mid-window, at an epoch end, in a later epoch,
// across archive members, with skipped bad records) reproducing the remaining batches.
#include "harness/harness.h"
#include "harness/data_env.h"
#include "data/ds_internal.h"

#include <archive.h>
#include <archive_entry.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static data_env env;
static tok_tokenizer *tekken;
static chat_template *ct;

static void setup(void) {
    data_env_open(&env, "pack");
    tekken = env.tok;
    ct = env.ct;
}

static void teardown(void) { data_env_close(&env); }

static const char *tmp(const char *name) { return data_env_path(&env, name); }

// Record i of a data set tagged `tag`: a text record of 1 to 40 words, or (every 5th) a chat
// record, so masks differ between examples.
static void record(ds_buf *b, const char *tag, int i) {
    char head[64];
    int words = 1 + (i * 37) % 40;
    if (i % 5 == 4) {
        snprintf(head, sizeof head, "{\"messages\": [{\"role\": \"user\", \"content\": \"%s%d",
                 tag, i);
        ck_assert_ok(ds_buf_puts(b, head));
        ck_assert_ok(ds_buf_puts(b, "\"}, {\"role\": \"assistant\", \"content\": \""));
    } else {
        snprintf(head, sizeof head, "{\"text\": \"%s%d", tag, i);
        ck_assert_ok(ds_buf_puts(b, head));
    }
    for (int w = 0; w < words; w++)
        ck_assert_ok(ds_buf_puts(b, " word"));
    ck_assert_ok(ds_buf_puts(b, i % 5 == 4 ? "\"}]}\n" : "\"}\n"));
}

static void write_set(const char *path, const char *tag, int n, const char *extra) {
    ds_buf b = {0};
    for (int i = 0; i < n; i++) {
        record(&b, tag, i);
        if (extra && i == n / 2)
            ck_assert_ok(ds_buf_puts(&b, extra));
    }
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    fwrite(b.p, 1, b.n, f);
    fclose(f);
    ds_buf_free(&b);
}

// The set split over archive members, written out of name order.
static void write_set_tar(const char *path, const char *tag, int n) {
    struct archive *a = archive_write_new();
    archive_write_set_format_pax_restricted(a);
    archive_write_add_filter_gzip(a);
    ck_assert_int_eq(archive_write_open_filename(a, path), ARCHIVE_OK);
    const int parts = 3;
    for (int p = parts - 1; p >= 0; p--) {
        ds_buf b = {0};
        for (int i = p * n / parts; i < (p + 1) * n / parts; i++)
            record(&b, tag, i);
        char name[32];
        snprintf(name, sizeof name, "part-%d.jsonl", p);
        struct archive_entry *e = archive_entry_new();
        archive_entry_set_pathname(e, name);
        archive_entry_set_filetype(e, AE_IFREG);
        archive_entry_set_perm(e, 0644);
        archive_entry_set_size(e, (la_int64_t)b.n);
        ck_assert_int_eq(archive_write_header(a, e), ARCHIVE_OK);
        ck_assert_int_eq(archive_write_data(a, b.p, b.n), (la_ssize_t)b.n);
        archive_entry_free(e);
        ds_buf_free(&b);
    }
    archive_write_close(a);
    archive_write_free(a);
}

// The examples of a data set, encoded one by one (the expected content of an epoch).
static void expected_examples(const char *tag, int n, ds_example *out) {
    for (int i = 0; i < n; i++) {
        ds_buf b = {0};
        ds_record_info info;
        record(&b, tag, i);
        ck_assert_ok(ds_record_encode(ct, DS_FORMAT_AUTO, b.p, b.n - 1, 0, false, &out[i],
                                      &info));
        ds_buf_free(&b);
    }
}

static void config(ds_config *c, int max_seq_len, int rows) {
    ds_config_default(c);
    c->chat = ct;
    c->max_seq_len = max_seq_len;
    c->batch_rows = rows;
    c->shuffle_window = 32;
    c->seed = 1234;
}

static void add_input(ds_config *c, const char *path, double w) {
    c->inputs[c->n_inputs++] = (ds_input){path, w};
}

// Index of the expected example whose ids and mask equal ids/mask[0..n), or -1.
static int find_example(const ds_example *ex, int n_ex, const int32_t *ids, const uint8_t *mask,
                        size_t n) {
    for (int i = 0; i < n_ex; i++)
        if (ex[i].n == n && !memcmp(ex[i].ids, ids, n * sizeof *ids) && !memcmp(ex[i].mask, mask,
                                                                             n))
            return i;
    return -1;
}

// Checks the row layout of b and counts which expected examples it holds.
static void check_batch(const ds_batch *b, const ds_example *ex, int n_ex, int *seen,
                        int32_t pad) {
    for (int r = 0; r < b->rows; r++) {
        const int32_t *ids = b->ids + (size_t)r * b->seq_len, *seg = b->segment +
                                                                     (size_t)r * b->seq_len;
        const int32_t *pos = b->pos + (size_t)r * b->seq_len;
        const uint8_t *mask = b->mask + (size_t)r * b->seq_len;
        int t = 0, s = 0;
        ck_assert_msg(r < b->rows_used || seg[0] == 0, "row %d past rows_used has data", r);
        while (t < b->seq_len && seg[t]) {
            ck_assert_int_eq(seg[t], ++s); // segments 1, 2, ... in order
            int start = t;
            while (t < b->seq_len && seg[t] == s) {
                ck_assert_int_eq(pos[t], t - start);
                t++;
            }
            int k = find_example(ex, n_ex, ids + start, mask + start, (size_t)(t - start));
            ck_assert_msg(k >= 0, "row %d segment %d is no expected example", r, s);
            seen[k]++;
        }
        for (; t < b->seq_len; t++) { // padding only at the end
            ck_assert_int_eq(seg[t], 0);
            ck_assert_int_eq(ids[t], pad);
            ck_assert_int_eq(mask[t], 0);
            ck_assert_int_eq(pos[t], 0);
        }
    }
}

START_TEST(test_packed_epoch) {
    const int n = 200;
    write_set(tmp("set.jsonl"), "r", n, NULL);
    ds_example *ex = calloc(n, sizeof *ex);
    expected_examples("r", n, ex);
    ds_config c;
    config(&c, 64, 4);
    add_input(&c, tmp("set.jsonl"), 1);
    ds_loader *l;
    ck_assert_ok(ds_loader_open(&c, &l));
    ds_batch b = {0};
    int seen[200] = {0}, batches = 0;
    int64_t tokens = 0, rows = 0;
    for (;;) {
        ck_assert_ok(ds_loader_next(l, &b));
        ck_assert_int_eq(b.epoch, 0);
        check_batch(&b, ex, n, seen, tok_special(tekken, "<pad>"));
        tokens += b.n_tokens;
        rows += b.rows_used;
        batches++;
        if (ds_loader_epoch_end(l))
            break;
        ck_assert_int_eq(b.rows_used, b.rows);
    }
    int64_t want_tokens = 0;
    for (int i = 0; i < n; i++) {
        ck_assert_msg(seen[i] == 1, "example %d seen %d times in an epoch", i, seen[i]);
        want_tokens += (int64_t)ex[i].n;
    }
    ck_assert_int_eq(tokens, want_tokens);
    // first-fit decreasing over windows of 32 wastes little: within 10% of the bound, plus one
    // partly filled row per window
    int64_t lower = (want_tokens + 63) / 64;
    ck_assert_int_le(rows, (int64_t)ceil(1.1 * (double)lower) + (n + 31) / 32);
    ck_assert_int_lt(rows, n / 2);
    ck_assert_ok(ds_loader_next(l, &b)); // the next epoch
    ck_assert_int_eq(b.epoch, 1);
    ds_batch_free(&b);
    ds_loader_close(l);
    for (int i = 0; i < n; i++)
        ds_example_free(&ex[i]);
    free(ex);
}
END_TEST

START_TEST(test_padded_rows_in_order) {
    const int n = 50;
    write_set(tmp("pad.jsonl"), "p", n, NULL);
    ds_example *ex = calloc(n, sizeof *ex);
    expected_examples("p", n, ex);
    ds_config c;
    config(&c, 64, 3);
    c.pack = false;
    c.shuffle = false;
    add_input(&c, tmp("pad.jsonl"), 1);
    ds_loader *l;
    ck_assert_ok(ds_loader_open(&c, &l));
    ds_batch b = {0};
    int next = 0, seen[50] = {0};
    while (next < n) {
        ck_assert_ok(ds_loader_next(l, &b));
        check_batch(&b, ex, n, seen, tok_special(tekken, "<pad>"));
        for (int r = 0; r < b.rows_used; r++, next++) { // one example per row, in file order
            const int32_t *seg = b.segment + (size_t)r * b.seq_len;
            ck_assert_int_eq(seg[ex[next].n - 1], 1);
            ck_assert_int_eq(ex[next].n == 64 ? 0 : seg[ex[next].n], 0);
            ck_assert_mem_eq(b.ids + (size_t)r * b.seq_len, ex[next].ids,
                             ex[next].n * sizeof *ex[next].ids);
        }
    }
    ck_assert(ds_loader_epoch_end(l));
    ck_assert_int_eq(b.rows_used, n % 3); // the last batch of the epoch is short
    ds_batch_free(&b);
    ds_loader_close(l);
    for (int i = 0; i < n; i++)
        ds_example_free(&ex[i]);
    free(ex);
}
END_TEST

// Batches of a loader, flattened: ids then mask then epoch of each batch.
static void take(ds_loader *l, int k, ds_buf *out) {
    ds_batch b = {0};
    for (int i = 0; i < k; i++) {
        ck_assert_ok(ds_loader_next(l, &b));
        size_t n = (size_t)b.rows * b.seq_len;
        ck_assert_ok(ds_buf_put(out, b.ids, n * sizeof *b.ids));
        ck_assert_ok(ds_buf_put(out, b.mask, n));
        ck_assert_ok(ds_buf_put(out, b.segment, n * sizeof *b.segment));
        ck_assert_ok(ds_buf_put(out, &b.epoch, sizeof b.epoch));
        ck_assert_ok(ds_buf_put(out, &b.rows_used, sizeof b.rows_used));
    }
    ds_batch_free(&b);
}

START_TEST(test_seeded_determinism) {
    write_set(tmp("det.jsonl"), "d", 120, NULL);
    ds_config c;
    config(&c, 64, 2);
    add_input(&c, tmp("det.jsonl"), 1);
    ds_buf runs[3] = {{0}};
    for (int k = 0; k < 3; k++) {
        if (k == 2)
            c.seed = 99;
        ds_loader *l;
        ck_assert_ok(ds_loader_open(&c, &l));
        take(l, 60, &runs[k]); // past the first epoch
        ds_loader_close(l);
    }
    ck_assert_uint_eq(runs[0].n, runs[1].n);
    ck_assert(!memcmp(runs[0].p, runs[1].p, runs[0].n));
    ck_assert(runs[0].n != runs[2].n || memcmp(runs[0].p, runs[2].p, runs[0].n));
    for (int k = 0; k < 3; k++)
        ds_buf_free(&runs[k]);
}
END_TEST

START_TEST(test_mixing_weights) {
    write_set(tmp("a.jsonl"), "A", 30, NULL);
    write_set(tmp("b.jsonl"), "B", 40, NULL);
    write_set(tmp("c.jsonl"), "C", 10, NULL);
    ds_example ea[30] = {{0}}, eb[40] = {{0}}, ec[10] = {{0}};
    expected_examples("A", 30, ea);
    expected_examples("B", 40, eb);
    expected_examples("C", 10, ec);
    ds_config c;
    config(&c, 64, 1);
    c.pack = false;
    add_input(&c, tmp("a.jsonl"), 2);
    add_input(&c, tmp("b.jsonl"), 0.5);
    add_input(&c, tmp("c.jsonl"), 1);
    int first_b_pass[2] = {0};
    for (int run = 0; run < 2; run++) {
        ds_loader *l;
        ck_assert_ok(ds_loader_open(&c, &l));
        ds_batch b = {0};
        int na[30] = {0}, nb[40] = {0}, nc[10] = {0}, first_b = -1, count = 0;
        do {
            ck_assert_ok(ds_loader_next(l, &b));
            if (!b.rows_used)
                break;
            size_t n = 0;
            while (n < (size_t)b.seq_len && b.segment[n])
                n++;
            int k;
            if ((k = find_example(ea, 30, b.ids, b.mask, n)) >= 0)
                na[k]++;
            else if ((k = find_example(eb, 40, b.ids, b.mask, n)) >= 0) {
                nb[k]++;
                if (first_b < 0)
                    first_b = count;
            } else if ((k = find_example(ec, 10, b.ids, b.mask, n)) >= 0)
                nc[k]++;
            else
                ck_abort_msg("batch %d holds an unknown example", count);
            count++;
        } while (!ds_loader_epoch_end(l));
        int sum_b = 0;
        for (int i = 0; i < 30; i++)
            ck_assert_int_eq(na[i], 2); // weight 2: two passes
        for (int i = 0; i < 10; i++)
            ck_assert_int_eq(nc[i], 1);
        for (int i = 0; i < 40; i++) {
            ck_assert_int_le(nb[i], 1);
            sum_b += nb[i];
        }
        ck_assert_int_ge(sum_b, 10); // weight 0.5: about half of the 40
        ck_assert_int_le(sum_b, 30);
        ck_assert_int_eq(count, 60 + sum_b + 10);
        ck_assert_int_lt(first_b, 32); // interleaved from the first window, not appended
        first_b_pass[run] = sum_b * 1000 + first_b;
        ds_batch_free(&b);
        ds_loader_close(l);
    }
    ck_assert_int_eq(first_b_pass[0], first_b_pass[1]);
    for (int i = 0; i < 40; i++)
        ds_example_free(&eb[i]);
    for (int i = 0; i < 30; i++)
        ds_example_free(&ea[i]);
    for (int i = 0; i < 10; i++)
        ds_example_free(&ec[i]);
}
END_TEST

// Saves the cursor after `at` batches, continues for `more`, then replays them from the bytes
// in a fresh loader.
static void resume_case(const ds_config *c, int at, int more) {
    ds_loader *a, *b;
    ck_assert_ok(ds_loader_open(c, &a));
    ds_buf skip = {0}, want = {0}, got = {0};
    take(a, at, &skip);
    ds_cursor cur, back;
    ds_loader_cursor(a, &cur);
    uint8_t bytes[DS_CURSOR_BYTES];
    ck_assert_uint_eq(ds_cursor_save(&cur, bytes, sizeof bytes), DS_CURSOR_BYTES);
    uint64_t bad_a[DS_BAD_COUNT], trunc_a;
    take(a, more, &want);
    ds_loader_bad_counts(a, bad_a, &trunc_a);
    ck_assert_ok(ds_cursor_load(&back, bytes, sizeof bytes));
    ck_assert_ok(ds_loader_open(c, &b));
    ck_assert_ok(ds_loader_restore(b, &back));
    take(b, more, &got);
    ck_assert_msg(want.n == got.n && !memcmp(want.p, got.p, want.n),
                  "resuming after %d batches changed the next %d", at, more);
    uint64_t bad_b[DS_BAD_COUNT], trunc_b;
    ds_loader_bad_counts(b, bad_b, &trunc_b);
    ck_assert_mem_eq(bad_a, bad_b, sizeof bad_a);
    ds_cursor ca, cb;
    ds_loader_cursor(a, &ca);
    ds_loader_cursor(b, &cb);
    ck_assert_mem_eq(&ca, &cb, sizeof ca);
    ds_buf_free(&skip);
    ds_buf_free(&want);
    ds_buf_free(&got);
    ds_loader_close(a);
    ds_loader_close(b);
}

START_TEST(test_cursor_resume) {
    // two inputs (one an archive of shards), weights, bad records skipped, small windows
    write_set(tmp("r1.jsonl"), "x", 70, "{\"text\": 7}\n\n");
    write_set_tar(tmp("r2.tar.gz"), "y", 45);
    ds_config c;
    config(&c, 64, 3);
    c.shuffle_window = 16;
    c.on_bad = DS_ON_BAD_SKIP;
    add_input(&c, tmp("r1.jsonl"), 1);
    add_input(&c, tmp("r2.tar.gz"), 1.5);
    // find the epoch length in batches
    ds_loader *l;
    ck_assert_ok(ds_loader_open(&c, &l));
    ds_batch b = {0};
    int per_epoch = 0;
    do {
        ck_assert_ok(ds_loader_next(l, &b));
        per_epoch++;
    } while (!ds_loader_epoch_end(l));
    uint64_t bad[DS_BAD_COUNT], trunc;
    ds_loader_bad_counts(l, bad, &trunc);
    ck_assert_int_eq(bad[DS_BAD_FIELD_INVALID], 1);
    ds_batch_free(&b);
    ds_loader_close(l);
    ck_assert_int_gt(per_epoch, 8);
    int at[] = {0, 1, 3, per_epoch / 2, per_epoch - 1, per_epoch, per_epoch + 2};
    for (size_t k = 0; k < sizeof at / sizeof *at; k++)
        resume_case(&c, at[k], per_epoch + 3);
    c.pack = false; // padded rows too
    resume_case(&c, 5, per_epoch);
}
END_TEST

START_TEST(test_cursor_bytes) {
    write_set(tmp("cb.jsonl"), "z", 40, NULL);
    ds_config c;
    config(&c, 64, 2);
    add_input(&c, tmp("cb.jsonl"), 1);
    ds_loader *l;
    ck_assert_ok(ds_loader_open(&c, &l));
    ds_buf skip = {0};
    take(l, 3, &skip);
    ds_buf_free(&skip);
    ds_cursor cur, back;
    ds_loader_cursor(l, &cur);
    ck_assert_int_eq(cur.version, DS_CURSOR_VERSION);
    ck_assert_int_eq(cur.batches, 3);
    uint8_t bytes[DS_CURSOR_BYTES + 8];
    ck_assert_uint_eq(ds_cursor_save(&cur, bytes, DS_CURSOR_BYTES - 1), 0);
    ck_assert_uint_eq(ds_cursor_save(&cur, bytes, sizeof bytes), DS_CURSOR_BYTES);
    ck_assert_ok(ds_cursor_load(&back, bytes, DS_CURSOR_BYTES));
    ck_assert_mem_eq(&cur, &back, sizeof cur);
    ck_assert_int_eq(ds_cursor_load(&back, bytes, DS_CURSOR_BYTES - 1), MOLT_EFORMAT);
    char want[128];
    snprintf(want, sizeof want, "data cursor: %d bytes, expected %d", DS_CURSOR_BYTES - 1,
             DS_CURSOR_BYTES);
    ck_assert_str_eq(molt_err_msg(), want);
    for (size_t i = 0; i < DS_CURSOR_BYTES; i += 37) { // any flipped bit is caught
        bytes[i] ^= 4;
        ck_assert_int_eq(ds_cursor_load(&back, bytes, DS_CURSOR_BYTES), MOLT_EFORMAT);
        bytes[i] ^= 4;
    }
    bytes[20] ^= 1;
    ds_cursor_load(&back, bytes, DS_CURSOR_BYTES);
    ck_assert_str_eq(molt_err_msg(), "data cursor: checksum mismatch (corrupt bytes)");
    bytes[20] ^= 1;
    bytes[0] = 'X';
    ds_cursor_load(&back, bytes, DS_CURSOR_BYTES);
    ck_assert_str_eq(molt_err_msg(), "data cursor: bad magic (not a molt data cursor)");
    bytes[0] = 'M';
    // a cursor of other settings is refused
    ds_config c2 = c;
    c2.max_seq_len = 80;
    ds_loader *l2;
    ck_assert_ok(ds_loader_open(&c2, &l2));
    ck_assert_int_eq(ds_loader_restore(l2, &cur), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "data cursor: taken with other data settings"));
    ds_loader_close(l2);
    c2 = c;
    c2.seed = 7;
    ck_assert_ok(ds_loader_open(&c2, &l2));
    ck_assert_int_eq(ds_loader_restore(l2, &cur), MOLT_EARG);
    ds_loader_close(l2);
    ds_loader_close(l);
}
END_TEST

START_TEST(test_labels) {
    int32_t ids[2 * 5] = {1, 10, 11, 1, 20, /**/ 1, 30, 31, 0, 0};
    uint8_t mask[2 * 5] = {0, 0, 1, 0, 1, /**/ 0, 1, 1, 0, 0};
    int32_t seg[2 * 5] = {1, 1, 1, 2, 2, /**/ 1, 1, 1, 0, 0};
    int32_t pos[2 * 5] = {0};
    ds_batch b = {.rows = 2, .seq_len = 5, .rows_used = 2, .ids = ids, .mask = mask,
                  .segment = seg, .pos = pos};
    int32_t labels[10], want[10] = {-1, 11, -1, 20, -1, /**/ 30, 31, -1, -1, -1};
    ds_batch_labels(&b, labels);
    ck_assert_mem_eq(labels, want, sizeof want);
}
END_TEST

START_TEST(test_loader_errors) {
    write_set(tmp("stop.jsonl"), "s", 20, "{\"text\": \"\"}\n");
    ds_config c;
    config(&c, 64, 2);
    add_input(&c, tmp("stop.jsonl"), 1);
    ds_loader *l;
    ck_assert_ok(ds_loader_open(&c, &l));
    ds_batch b = {0};
    molt_status st = ds_loader_next(l, &b);
    ck_assert_int_eq(st, MOLT_EFORMAT);
    char want[256];
    snprintf(want, sizeof want, "%s:12:1: empty field 'text'", tmp("stop.jsonl"));
    ck_assert_str_eq(molt_err_msg(), want);
    ds_loader_close(l);
    // nothing usable at all
    FILE *f = fopen(tmp("allbad.jsonl"), "w");
    fputs("{\"x\": 1}\nnot json\n", f);
    fclose(f);
    config(&c, 64, 2);
    c.on_bad = DS_ON_BAD_SKIP;
    add_input(&c, tmp("allbad.jsonl"), 1);
    ck_assert_ok(ds_loader_open(&c, &l));
    ck_assert_int_eq(ds_loader_next(l, &b), MOLT_EFORMAT);
    snprintf(want, sizeof want, "%s: no usable example in the data (2 bad records skipped: "
             "invalid JSON 1, unknown format 1)", tmp("allbad.jsonl"));
    ck_assert_str_eq(molt_err_msg(), want);
    ds_loader_close(l);
    ds_batch_free(&b);
    config(&c, 1, 2);
    add_input(&c, tmp("allbad.jsonl"), 1);
    ck_assert_int_eq(ds_loader_open(&c, &l), MOLT_EARG);
    config(&c, 64, 2);
    add_input(&c, tmp("allbad.jsonl"), 0);
    ck_assert_int_eq(ds_loader_open(&c, &l), MOLT_EARG);
}
END_TEST

int main(void) {
    Suite *s = suite_create("pack");
    TCase *tc = tcase_create("pack");
    tcase_add_unchecked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_packed_epoch);
    tcase_add_test(tc, test_padded_rows_in_order);
    tcase_add_test(tc, test_seeded_determinism);
    tcase_add_test(tc, test_mixing_weights);
    tcase_add_test(tc, test_cursor_resume);
    tcase_add_test(tc, test_cursor_bytes);
    tcase_add_test(tc, test_labels);
    tcase_add_test(tc, test_loader_errors);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
