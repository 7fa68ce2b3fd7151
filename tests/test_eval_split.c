// tests/test_eval_split.c: the loader's hold-out split (ds_config.holdout_*), the way
// `molt train` carves data.eval_split out of data.train: the kept and held-out sides are
// disjoint and together give every record, the held-out share is near the fraction, the
// split does not depend on shuffling, the loader seed, the epoch or the directory of the
// file, it changes with the hold-out seed, a cursor saved on a split loader resumes the same
// batches, and an empty side or a bad fraction is an error with its message.
#include "harness/harness.h"
#include "harness/data_env.h"
#include "data/ds_internal.h"

#include <archive.h>
#include <archive_entry.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static data_env env;
static tok_tokenizer *tekken;
static chat_template *ct;

static void setup(void) {
    data_env_open(&env, "split");
    tekken = env.tok;
    ct = env.ct;
}

static void teardown(void) { data_env_close(&env); }

static const char *tmp(const char *name) { return data_env_path(&env, name); }

// Records i in [from, to) of set `tag`: distinct text records of a few words each.
static void put_records(ds_buf *b, const char *tag, int from, int to) {
    char line[128];
    for (int i = from; i < to; i++) {
        snprintf(line, sizeof line, "{\"text\": \"%s %d%s\"}\n", tag, i,
                 i % 3 ? " and a few more words" : "");
        ck_assert_ok(ds_buf_puts(b, line));
    }
}

static void write_file(const char *path, const char *tag, int n) {
    ds_buf b = {0};
    put_records(&b, tag, 0, n);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(b.p, 1, b.n, f), b.n);
    fclose(f);
    ds_buf_free(&b);
}

// Set `tag` as a .tar.gz of two members (line numbers restart in each).
static void write_tar(const char *path, const char *tag, int n) {
    struct archive *a = archive_write_new();
    archive_write_set_format_pax_restricted(a);
    archive_write_add_filter_gzip(a);
    ck_assert_int_eq(archive_write_open_filename(a, path), ARCHIVE_OK);
    for (int p = 0; p < 2; p++) {
        ds_buf b = {0};
        put_records(&b, tag, p * n / 2, (p + 1) * n / 2);
        struct archive_entry *e = archive_entry_new();
        archive_entry_set_pathname(e, p ? "shard-a.jsonl" : "shard-b.jsonl");
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

static void config(ds_config *c, double frac, bool keep) {
    ds_config_default(c);
    c->chat = ct;
    c->max_seq_len = 64;
    c->batch_rows = 3;
    c->shuffle_window = 50;
    c->seed = 7;
    c->holdout_frac = frac;
    c->holdout_seed = 99;
    c->holdout_keep = keep;
}

static uint64_t hash_ids(const int32_t *ids, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint32_t)ids[i]) * 1099511628211ull;
    return h;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

// Hashes of the examples of epoch `epoch` (0 or 1) of c, sorted, into out (cap entries).
static size_t collect(const ds_config *c, int epoch, uint64_t *out, size_t cap) {
    ds_loader *l;
    ck_assert_ok(ds_loader_open(c, &l));
    ds_batch b = {0};
    size_t n = 0;
    for (int e = 0; e <= epoch; e++)
        do {
            ck_assert_ok(ds_loader_next(l, &b));
            ck_assert_int_eq((int)b.epoch, e);
            for (int r = 0; r < b.rows_used && e == epoch; r++) {
                size_t base = (size_t)r * (size_t)b.seq_len;
                for (int t = 0; t < b.seq_len && b.segment[base + t];) {
                    int start = t, seg = b.segment[base + t];
                    while (t < b.seq_len && b.segment[base + t] == seg)
                        t++;
                    ck_assert_uint_lt(n, cap);
                    out[n++] = hash_ids(b.ids + base + start, (size_t)(t - start));
                }
            }
        } while (!ds_loader_epoch_end(l));
    ds_batch_free(&b);
    ds_loader_close(l);
    qsort(out, n, sizeof *out, cmp_u64);
    return n;
}

static bool same_set(const uint64_t *a, size_t na, const uint64_t *b, size_t nb) {
    return na == nb && !memcmp(a, b, na * sizeof *a);
}

#define CAP 1500

START_TEST(test_partition) {
    // a plain file and an archive of two members, packed and shuffled
    static uint64_t all[CAP], tr[CAP], ev[CAP], merged[CAP];
    write_file(tmp("set.jsonl"), "p", 1000);
    write_tar(tmp("shards.tar.gz"), "q", 300);
    ds_config c;
    config(&c, 0, false);
    c.inputs[c.n_inputs++] = (ds_input){tmp("set.jsonl"), 1.0};
    c.inputs[c.n_inputs++] = (ds_input){tmp("shards.tar.gz"), 1.0};
    size_t n_all = collect(&c, 0, all, CAP);
    ck_assert_uint_eq(n_all, 1300);
    for (size_t i = 1; i < n_all; i++) // records are distinct, so hashes identify them
        ck_assert_uint_ne(all[i - 1], all[i]);
    const double fracs[] = {0.05, 0.2, 0.45};
    for (int k = 0; k < 3; k++) {
        double f = fracs[k];
        c.holdout_frac = f;
        c.holdout_keep = false;
        size_t n_tr = collect(&c, 0, tr, CAP);
        c.holdout_keep = true;
        size_t n_ev = collect(&c, 0, ev, CAP);
        ck_assert_uint_eq(n_tr + n_ev, n_all);
        // disjoint and covering: the merge of the two sorted sides is the whole set
        size_t i = 0, j = 0, m = 0;
        while (i < n_tr || j < n_ev) {
            if (i < n_tr && j < n_ev)
                ck_assert_uint_ne(tr[i], ev[j]);
            merged[m++] = j == n_ev || (i < n_tr && tr[i] < ev[j]) ? tr[i++] : ev[j++];
        }
        ck_assert_msg(same_set(merged, m, all, n_all), "split %g: sides do not cover the set",
                      f);
        // binomial: standard deviation of the share <= sqrt(0.25 / 1300) = 0.014
        double share = (double)n_ev / (double)n_all;
        ck_assert_msg(share > f - 0.045 && share < f + 0.045, "split %g holds out %g", f, share);
    }
}
END_TEST

START_TEST(test_split_is_stable) {
    static uint64_t ref[CAP], got[CAP];
    write_file(tmp("data.jsonl"), "s", 600);
    ck_assert_int_eq(mkdir(tmp("elsewhere"), 0755), 0);
    write_file(tmp("elsewhere/data.jsonl"), "s", 600); // the same file in another directory
    ds_config c;
    config(&c, 0.25, true);
    c.inputs[c.n_inputs++] = (ds_input){tmp("data.jsonl"), 1.0};
    size_t n_ref = collect(&c, 0, ref, CAP);
    ck_assert_uint_gt(n_ref, 0);
    ck_assert_msg(same_set(ref, n_ref, got, collect(&c, 0, got, CAP)), "read again");
    ck_assert_msg(same_set(ref, n_ref, got, collect(&c, 1, got, CAP)), "second epoch");
    c.shuffle = false;
    ck_assert_msg(same_set(ref, n_ref, got, collect(&c, 0, got, CAP)), "without shuffling");
    c.shuffle = true;
    c.seed = 12345; // another data order: the split keys on holdout_seed only
    c.pack = false;
    ck_assert_msg(same_set(ref, n_ref, got, collect(&c, 0, got, CAP)), "other order");
    c.inputs[0].path = tmp("elsewhere/data.jsonl");
    ck_assert_msg(same_set(ref, n_ref, got, collect(&c, 0, got, CAP)), "other directory");
    c.holdout_seed = 100;
    ck_assert_msg(!same_set(ref, n_ref, got, collect(&c, 0, got, CAP)),
                  "another hold-out seed held out the same records");
}
END_TEST

// Reads `n` batches of l into out (ids, mask and segments as bytes).
static void take(ds_loader *l, int n, ds_buf *out) {
    ds_batch b = {0};
    for (int i = 0; i < n; i++) {
        ck_assert_ok(ds_loader_next(l, &b));
        size_t m = (size_t)b.rows * (size_t)b.seq_len;
        ck_assert_ok(ds_buf_put(out, b.ids, m * sizeof *b.ids));
        ck_assert_ok(ds_buf_put(out, b.mask, m));
        ck_assert_ok(ds_buf_put(out, b.segment, m * sizeof *b.segment));
    }
    ds_batch_free(&b);
}

START_TEST(test_cursor_on_split) {
    write_file(tmp("c.jsonl"), "c", 300);
    write_tar(tmp("c.tar.gz"), "d", 120);
    for (int keep = 0; keep < 2; keep++) {
        ds_config c;
        config(&c, 0.3, keep);
        c.shuffle_window = 16;
        c.inputs[c.n_inputs++] = (ds_input){tmp("c.jsonl"), 1.0};
        c.inputs[c.n_inputs++] = (ds_input){tmp("c.tar.gz"), 1.5};
        const int at[] = {1, 7, 40};
        for (int k = 0; k < 3; k++) { // mid-window, later window, a later epoch
            ds_loader *a, *b;
            ck_assert_ok(ds_loader_open(&c, &a));
            ds_buf skip = {0}, want = {0}, got = {0};
            take(a, at[k], &skip);
            ds_cursor cur, back;
            ds_loader_cursor(a, &cur);
            uint8_t bytes[DS_CURSOR_BYTES];
            ck_assert_uint_eq(ds_cursor_save(&cur, bytes, sizeof bytes), DS_CURSOR_BYTES);
            take(a, 30, &want);
            ck_assert_ok(ds_cursor_load(&back, bytes, sizeof bytes));
            ck_assert_ok(ds_loader_open(&c, &b));
            ck_assert_ok(ds_loader_restore(b, &back));
            take(b, 30, &got);
            ck_assert_msg(want.n == got.n && !memcmp(want.p, got.p, want.n),
                          "side %d: resuming after %d batches changed the batches", keep, at[k]);
            ds_loader_close(b);
            // the other side, or no split, is another data setting: refused
            ds_config o = c;
            o.holdout_keep = !keep;
            ck_assert_ok(ds_loader_open(&o, &b));
            ck_assert_int_eq(ds_loader_restore(b, &back), MOLT_EARG);
            ds_loader_close(b);
            o.holdout_frac = 0;
            ck_assert_ok(ds_loader_open(&o, &b));
            ck_assert_int_eq(ds_loader_restore(b, &back), MOLT_EARG);
            ds_loader_close(b);
            ds_loader_close(a);
            ds_buf_free(&skip);
            ds_buf_free(&want);
            ds_buf_free(&got);
        }
    }
}
END_TEST

START_TEST(test_empty_side_and_bad_fraction) {
    const char *path = tmp("one.jsonl");
    write_file(path, "o", 1);
    ds_config c;
    config(&c, 0.3, false);
    c.inputs[c.n_inputs++] = (ds_input){path, 1.0};
    // the one record lands on exactly one side; which one, ds_holdout_unit says
    bool held = ds_holdout_unit(path, NULL, 1, c.holdout_seed) < 0.3;
    for (int keep = 0; keep < 2; keep++) {
        c.holdout_keep = keep;
        ds_loader *l;
        ck_assert_ok(ds_loader_open(&c, &l));
        ds_batch b = {0};
        molt_status st = ds_loader_next(l, &b);
        if (keep == held) {
            ck_assert_ok(st);
            ck_assert_int_eq(b.n_examples, 1);
        } else {
            ck_assert_int_eq(st, MOLT_EFORMAT);
            char want[512];
            snprintf(want, sizeof want, "%s: no usable example %s the 0.3 hold-out split", path,
                     keep ? "held out by" : "left outside");
            ck_assert_str_eq(molt_err_msg(), want);
        }
        ds_batch_free(&b);
        ds_loader_close(l);
    }
    ds_loader *l = NULL;
    c.holdout_frac = 1.0;
    ck_assert_int_eq(ds_loader_open(&c, &l), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), "data loader: hold-out fraction 1 (expected 0 <= f < 1)");
    ck_assert_ptr_null(l);
}
END_TEST

START_TEST(test_holdout_unit_keys) {
    // the directory does not matter; the name, member, line and seed do
    double u = ds_holdout_unit("/a/b/x.jsonl", NULL, 5, 3);
    ck_assert(u >= 0 && u < 1);
    ck_assert(u == ds_holdout_unit("x.jsonl", NULL, 5, 3));
    ck_assert(u == ds_holdout_unit("/elsewhere/x.jsonl", NULL, 5, 3));
    ck_assert(u != ds_holdout_unit("/a/b/y.jsonl", NULL, 5, 3));
    ck_assert(u != ds_holdout_unit("/a/b/x.jsonl", "x.jsonl", 5, 3));
    ck_assert(u != ds_holdout_unit("/a/b/x.jsonl", NULL, 6, 3));
    ck_assert(u != ds_holdout_unit("/a/b/x.jsonl", NULL, 5, 4));
    ck_assert(ds_holdout_unit("t.tar", "ab", 1, 0) != ds_holdout_unit("t.ta", "rab", 1, 0));
}
END_TEST

int main(void) {
    Suite *s = suite_create("eval_split");
    TCase *tc = tcase_create("holdout");
    tcase_add_unchecked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_partition);
    tcase_add_test(tc, test_split_is_stable);
    tcase_add_test(tc, test_cursor_on_split);
    tcase_add_test(tc, test_empty_side_and_bad_fraction);
    tcase_add_test(tc, test_holdout_unit_keys);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
