// tests/test_metrics.c: the metrics.jsonl line format (valid JSON, every number
// round-tripping exactly, null for non-finite values), appending and truncating the log for a
// resumed run, and the progress line.
#include "harness/harness.h"
#include "train/train.h"

#include <jansson.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

static metrics_row sample_row(int64_t step) {
    metrics_row r = {.step = step, .loss = 2.0 / 3.0 + (double)step, .lr = 1e-4 / 3.0,
                     .grad_norm = 0.1, .tokens = 4096 * step, .tokens_per_s = 12345.678901234,
                     .elapsed_s = 1.0 / 7.0, .has_eval = false, .eval_loss = 0};
    return r;
}

static double num_of(json_t *o, const char *key) {
    json_t *v = json_object_get(o, key);
    ck_assert_msg(v != NULL, "no %s", key);
    return json_number_value(v);
}

START_TEST(test_json_line_roundtrips) {
    metrics_row r = sample_row(7);
    r.grad_norm = ldexp(1.0, -1074); // the smallest subnormal
    r.has_eval = true;
    r.eval_loss = 1.0 / 3.0;
    char buf[512];
    int n = metrics_format_json(buf, sizeof buf, &r);
    ck_assert_int_eq(n, (int)strlen(buf));
    ck_assert_int_eq(buf[n - 1], '\n');
    json_error_t err;
    json_t *o = json_loads(buf, 0, &err);
    ck_assert_msg(o != NULL, "not JSON: %s (%s)", buf, err.text);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "step")), 7);
    ck_assert_int_eq(json_integer_value(json_object_get(o, "tokens")), 4096 * 7);
    // exact equality: %.17g must round-trip every double
    ck_assert(num_of(o, "loss") == r.loss);
    ck_assert(num_of(o, "lr") == r.lr);
    ck_assert(num_of(o, "grad_norm") == r.grad_norm);
    ck_assert(num_of(o, "tokens_per_s") == r.tokens_per_s);
    ck_assert(num_of(o, "elapsed_s") == r.elapsed_s);
    ck_assert(num_of(o, "eval_loss") == r.eval_loss);
    ck_assert_int_eq((int)json_object_size(o), 8);
    json_decref(o);
    // the exact text for simple values, key order fixed
    metrics_row s = {.step = 3, .loss = 0.5, .lr = 0.25, .grad_norm = 1, .tokens = 10,
                     .tokens_per_s = 2, .elapsed_s = 5};
    metrics_format_json(buf, sizeof buf, &s);
    ck_assert_str_eq(buf, "{\"step\":3,\"loss\":0.5,\"lr\":0.25,\"grad_norm\":1,\"tokens\":10,"
                          "\"tokens_per_s\":2,\"elapsed_s\":5}\n");
    // non-finite numbers become null; a short buffer reports the length it needs
    s.loss = NAN;
    s.grad_norm = INFINITY;
    int need = metrics_format_json(buf, sizeof buf, &s);
    ck_assert_str_eq(buf, "{\"step\":3,\"loss\":null,\"lr\":0.25,\"grad_norm\":null,"
                          "\"tokens\":10,\"tokens_per_s\":2,\"elapsed_s\":5}\n");
    char tiny[10];
    ck_assert_int_eq(metrics_format_json(tiny, sizeof tiny, &s), need);
    ck_assert_str_eq(tiny, "{\"step\":3");
}
END_TEST

static int count_lines(const char *path, int64_t *last_step) {
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    char line[1024];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        json_t *o = json_loads(line, 0, NULL);
        ck_assert_msg(o != NULL, "bad line %s", line);
        *last_step = json_integer_value(json_object_get(o, "step"));
        ck_assert_int_eq(*last_step, n + 1); // steps in order, no duplicates
        json_decref(o);
        n++;
    }
    fclose(f);
    return n;
}

START_TEST(test_log_append_and_resume) {
    char tmpl[] = "/tmp/molt_metrics_XXXXXX", path[512];
    char *dir = mkdtemp(tmpl);
    ck_assert_ptr_nonnull(dir);
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    metrics_log m;
    ck_assert_ok(metrics_open(&m, dir, -1));
    for (int s = 1; s <= 5; s++) {
        metrics_row r = sample_row(s);
        ck_assert_ok(metrics_append(&m, &r));
    }
    metrics_close(&m);
    // a killed run left half a line
    FILE *f = fopen(path, "a");
    fputs("{\"step\":6,\"lo", f);
    fclose(f);
    int64_t last = 0;
    // resume from the checkpoint of step 3: later lines go, then the run continues
    ck_assert_ok(metrics_open(&m, dir, 3));
    ck_assert_int_eq(count_lines(path, &last), 3);
    ck_assert_int_eq(last, 3);
    metrics_row r = sample_row(4);
    ck_assert_ok(metrics_append(&m, &r));
    metrics_close(&m);
    ck_assert_int_eq(count_lines(path, &last), 4);
    // the line for step 4 is the same text an uninterrupted run writes
    char want[512], got[512];
    metrics_format_json(want, sizeof want, &r);
    f = fopen(path, "r");
    for (int i = 0; i < 4; i++)
        ck_assert_ptr_nonnull(fgets(got, sizeof got, f));
    fclose(f);
    ck_assert_str_eq(got, want);
    unlink(path);
    ck_assert_int_eq(metrics_open(&m, "/nonexistent/dir", -1), MOLT_EIO);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "/nonexistent/dir/metrics.jsonl"));
    rmdir(dir);
}
END_TEST

START_TEST(test_progress_line) {
    metrics_progress p = {.step = 12, .total_steps = 100, .loss = 2.34567, .lr = 1e-4,
                          .tokens_per_s = 1234.4, .elapsed_s = 10, .steps_this_run = 2};
    char buf[256];
    metrics_format_progress(buf, sizeof buf, &p);
    // 10 s for 2 steps, 88 steps left: 440 s
    ck_assert_str_eq(buf, "step 12/100 | loss 2.3457 | lr 1.000e-04 | 1234 tok/s | "
                          "elapsed 0:00:10 | ETA 0:07:20");
    p.steps_this_run = 0;
    p.elapsed_s = 3725;
    metrics_format_progress(buf, sizeof buf, &p);
    ck_assert_ptr_nonnull(strstr(buf, "elapsed 1:02:05 | ETA ?"));
}
END_TEST

int main(void) {
    Suite *s = suite_create("metrics");
    TCase *tc = tcase_create("metrics");
    tcase_add_test(tc, test_json_line_roundtrips);
    tcase_add_test(tc, test_log_append_and_resume);
    tcase_add_test(tc, test_progress_line);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
