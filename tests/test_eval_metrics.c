// tests/test_eval_metrics.c: the text metrics of infer/eval/metrics.c: each normalization
// option on its own, SQuAD's exact match and token F1 against the fixture of
// tools/reference/eval_metrics_reference.py, contains, regex (PCRE2) with its errors (an
// invalid pattern names the pattern and the offset; invalid UTF-8 in a prediction), JSON
// validity and JSON field equality, and the spec parser's errors.
#include "harness/harness.h"
#include "infer/eval/eval.h"

#include <jansson.h>
#include <math.h>
#include <string.h>

// The value of metric spec on (pred, ref); fails the test on error.
static double val(const char *spec, const char *pred, const char *ref) {
    ev_text_metric m;
    ck_assert_ok(ev_text_metric_parse(&m, spec));
    double v = -1;
    ck_assert_ok(ev_text_metric_eval(&m, pred, ref, &v));
    ev_text_metric_free(&m);
    return v;
}

static void norm_is(const char *s, unsigned flags, const char *want) {
    char *got;
    ck_assert_ok(ev_normalize(s, flags, &got));
    ck_assert_msg(strcmp(got, want) == 0, "normalize('%s', %u) = '%s', want '%s'", s, flags, got,
                  want);
    molt_free(got);
}

// The error of parsing spec: its status and a message containing want.
static void parse_fails(const char *spec, molt_status st, const char *want) {
    ev_text_metric m;
    ck_assert_int_eq(ev_text_metric_parse(&m, spec), st);
    ck_assert_msg(strstr(molt_err_msg(), want), "'%s': message '%s' lacks '%s'", spec,
                  molt_err_msg(), want);
    ck_assert_ptr_null(m.name); // nothing left to free
}

START_TEST(test_normalization_options) {
    norm_is("  Hello,\tWORLD!  ", 0, "  Hello,\tWORLD!  ");
    norm_is("  Hello,\tWORLD!  ", EV_NORM_CASE, "  hello,\tworld!  ");
    norm_is("  Hello,\tWORLD!  ", EV_NORM_PUNCT, "  Hello\tWORLD  ");
    norm_is("  Hello,\tWORLD!  ", EV_NORM_SPACE, "Hello, WORLD!");
    norm_is("\v\f\r\n a \n\n b \t", EV_NORM_SPACE, "a b");
    // all 32 ASCII punctuation characters go, nothing else does
    norm_is("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", EV_NORM_PUNCT, "");
    norm_is("a1 B2\xc2\xbf\xe2\x80\x94\xc3\x89", EV_NORM_PUNCT | EV_NORM_CASE,
            "a1 b2\xc2\xbf\xe2\x80\x94\xc3\x89"); // inverted ?, em dash, E-acute stay
    // articles: whole words only, each replaced by one space; case matters without CASE
    norm_is("the theory of a an", EV_NORM_ARTICLES, "  theory of    ");
    norm_is("The cat", EV_NORM_ARTICLES, "The cat");
    norm_is("The cat", EV_NORM_ARTICLES | EV_NORM_CASE | EV_NORM_SPACE, "cat");
    norm_is("", EV_NORM_SQUAD, "");
}
END_TEST

START_TEST(test_squad_exact_and_f1_match_reference) {
    const char *root = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/fixtures/eval/squad.json", root ? root : ".");
    json_error_t err;
    json_t *fx = json_load_file(path, 0, &err);
    ck_assert_msg(fx != NULL, "cannot read %s: %s", path, err.text);
    json_t *cases = json_object_get(fx, "cases"), *c;
    size_t i;
    json_array_foreach(cases, i, c) {
        const char *p = json_string_value(json_object_get(c, "pred"));
        const char *r = json_string_value(json_object_get(c, "ref"));
        norm_is(p, EV_NORM_SQUAD, json_string_value(json_object_get(c, "norm_pred")));
        norm_is(r, EV_NORM_SQUAD, json_string_value(json_object_get(c, "norm_ref")));
        double em = json_number_value(json_object_get(c, "exact"));
        double f1 = json_number_value(json_object_get(c, "f1"));
        ck_assert(val("exact_match:squad", p, r) == em);
        double got = val("token_f1:squad", p, r);
        ck_assert_msg(fabs(got - f1) < 1e-15, "F1('%s', '%s') = %.17g, want %.17g", p, r, got,
                      f1);
    }
    ck_assert_int_ge((int)json_array_size(cases), 10);
    json_decref(fx);
}
END_TEST

START_TEST(test_exact_contains_f1) {
    ck_assert(val("exact_match", "Paris", "Paris") == 1);
    ck_assert(val("exact_match", "Paris ", "Paris") == 0);
    ck_assert(val("exact_match:space", " Paris\n", "Paris") == 1);
    ck_assert(val("exact_match:case", "PARIS", "paris") == 1);
    ck_assert(val("exact_match:case+space+punct", " Paris!", "paris") == 1);
    ck_assert(val("exact_match:none", "a", "a") == 1);
    ck_assert(val("contains", "The answer is 42.", "42") == 1);
    ck_assert(val("contains", "The answer is 4 2.", "42") == 0);
    ck_assert(val("contains:case", "The ANSWER", "answer") == 1);
    ck_assert(val("contains", "anything", "") == 1); // an empty reference is contained
    ck_assert(val("contains", "", "x") == 0);
    // token F1 without normalization: exact tokens, multiset counts
    ck_assert(fabs(val("token_f1", "a a b", "a b b") - 2.0 / 3.0) < 1e-15);
    ck_assert(val("token_f1", "Cat", "cat") == 0);
    ck_assert(val("token_f1", "  ", "") == 1);
    ck_assert(val("token_f1", "x", " ") == 0);
}
END_TEST

START_TEST(test_regex) {
    ck_assert(val("regex=^[0-9]+$", "12345", "") == 1);
    ck_assert(val("regex=^[0-9]+$", "123a", "") == 0);
    ck_assert(val("regex=answer: (yes|no)", "so the answer: no, sorry", "") == 1);
    ck_assert(val("regex=(?i)YES", "yes", "") == 1);
    ck_assert(val("regex=^.$", "\xc3\xa9", "") == 1); // UTF mode: one character
    ck_assert(val("regex=a:b=c", "xa:b=cx", "") == 1); // the pattern is verbatim after '='
    // an invalid pattern names the pattern, PCRE2's reason and the offset
    parse_fails("regex=ab(c", MOLT_EARG, "invalid regex 'ab(c'");
    parse_fails("regex=ab(c", MOLT_EARG, "at offset 4");
    parse_fails("regex=x{2,1}", MOLT_EARG, "numbers out of order");
    parse_fails("regex=", MOLT_EARG, "regex needs a pattern");
    parse_fails("regex", MOLT_EARG, "regex needs a pattern");
    // a prediction that is not UTF-8: a precise error, no crash
    ev_text_metric m;
    ck_assert_ok(ev_text_metric_parse(&m, "regex=abc"));
    double v;
    ck_assert_int_eq(ev_text_metric_eval(&m, "ok \xff\xfe", "", &v), MOLT_EFORMAT);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "not valid UTF-8 at byte 3"));
    ev_metric_def d = ev_text_metric_def(&m);
    ck_assert(d.binary && !d.lower_is_better && strcmp(d.name, "regex=abc") == 0);
    ev_text_metric_free(&m);
}
END_TEST

START_TEST(test_json_metrics) {
    ck_assert(val("json_valid", "{\"a\": [1, 2]}", "") == 1);
    ck_assert(val("json_valid", "  [1, 2]\n", "") == 1);
    ck_assert(val("json_valid", "42", "") == 1);
    ck_assert(val("json_valid", "{\"a\": 1", "") == 0);
    ck_assert(val("json_valid", "{\"a\": 1} trailing", "") == 0);
    ck_assert(val("json_valid", "", "") == 0);
    ck_assert(val("json_valid", "\"\xff\"", "") == 0); // not UTF-8
    const char *ref = "{\"answer\": {\"value\": 42, \"items\": [{\"name\": \"x\"}, {\"b\": 1}]},"
                      " \"note\": \"n\"}";
    ck_assert(val("json_field=answer.value", "{\"answer\": {\"value\": 42}}", ref) == 1);
    ck_assert(val("json_field=answer.value", "{\"answer\": {\"value\": 43}}", ref) == 0);
    ck_assert(val("json_field=answer.value", "{\"answer\": {\"value\": 42.0}}", ref) == 0);
    ck_assert(val("json_field=answer.value", "{\"answer\": {\"value\": \"42\"}}", ref) == 0);
    ck_assert(val("json_field=answer.value", "not json", ref) == 0);
    ck_assert(val("json_field=answer.value", "{\"answer\": 1}", ref) == 0);
    ck_assert(val("json_field=answer.items.0.name", "{\"answer\":{\"items\":[{\"name\":\"x\"}]}}",
                  ref) == 1);
    // whole objects compare as JSON values: key order does not matter
    ck_assert(val("json_field=answer.items.1", "{\"answer\":{\"items\":[0, {\"b\": 1}]}}", ref) ==
              1);
    ck_assert(val("json_field=answer", "{\"answer\":{\"items\":[{\"name\":\"x\"},{\"b\":1}],"
                  "\"value\":42}}", ref) == 1);
    // a reference without the field, or not JSON: the data is wrong, an error
    ev_text_metric m;
    ck_assert_ok(ev_text_metric_parse(&m, "json_field=answer.missing"));
    double v;
    ck_assert_int_eq(ev_text_metric_eval(&m, "{}", ref, &v), MOLT_EFORMAT);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "the reference has no field answer.missing"));
    ck_assert_int_eq(ev_text_metric_eval(&m, "{}", "{oops", &v), MOLT_EFORMAT);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "the reference is not JSON"));
    ev_text_metric_free(&m);
    parse_fails("json_field=a..b", MOLT_EARG, "the JSON path 'a..b' has an empty part");
    parse_fails("json_field=.a", MOLT_EARG, "empty part");
    parse_fails("json_field", MOLT_EARG, "json_field needs a field path");
}
END_TEST

START_TEST(test_spec_errors_and_defs) {
    parse_fails("exact", MOLT_EARG, "unknown metric 'exact'");
    parse_fails("exact_match:upper", MOLT_EARG, "unknown option 'upper'");
    parse_fails("exact_match:case+", MOLT_EARG, "unknown option ''");
    parse_fails("json_valid:case", MOLT_EARG, "json_valid takes no normalization options");
    parse_fails("token_f1=3", MOLT_EARG, "token_f1 takes no '=' argument");
    parse_fails("", MOLT_EARG, "unknown metric ''");
    ev_text_metric m;
    ck_assert_ok(ev_text_metric_parse(&m, "token_f1:squad"));
    ck_assert_int_eq((int)m.norm, EV_NORM_SQUAD);
    ev_metric_def d = ev_text_metric_def(&m);
    ck_assert(!d.binary && strcmp(d.name, "token_f1:squad") == 0);
    ev_text_metric_free(&m);
    ev_text_metric_free(&m); // freeing twice is harmless
    molt_alloc_fail_after(0);
    ck_assert_int_eq(ev_text_metric_parse(&m, "exact_match"), MOLT_ENOMEM);
    molt_alloc_fail_after(-1);
}
END_TEST

int main(void) {
    Suite *s = suite_create("eval_metrics");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_normalization_options);
    tcase_add_test(tc, test_squad_exact_and_f1_match_reference);
    tcase_add_test(tc, test_exact_contains_f1);
    tcase_add_test(tc, test_regex);
    tcase_add_test(tc, test_json_metrics);
    tcase_add_test(tc, test_spec_errors_and_defs);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
