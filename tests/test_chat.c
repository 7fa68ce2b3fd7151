// tests/test_chat.c: the Mistral chat template (v13, v15): token ids against
// tests/fixtures/chat/golden.jsonl (mistral-common's golden chat ids for the text-only v13/v15
// cases, plus cases encoded by mistral-common itself; see tools/reference/README_chat.md),
// loss masks derived independently from the token structure, the mask options, the exact
// message of every bad chat record, missing control tokens, Python-style JSON and UTF-8.
#include "harness/harness.h"
#include "data/ds_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static tok_tokenizer *tekken, *hf;

static char *source_path(const char *rel) {
    const char *root = getenv("MOLT_SOURCE_DIR");
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/%s", root ? root : ".", rel);
    return buf;
}

static void load_tokenizers(void) {
    if (tok_load(source_path("configs/tokenizers/tekken.json"), &tekken) != MOLT_OK ||
        tok_load(source_path("configs/tokenizers/deepseek-v3-tokenizer.json"), &hf) != MOLT_OK) {
        fprintf(stderr, "cannot load the test tokenizers: %s\n", molt_err_msg());
        exit(1);
    }
}

static void free_tokenizers(void) {
    tok_free(tekken);
    tok_free(hf);
}

static molt_status encode_with(const tok_tokenizer *t, const char *json, const chat_opts *o,
                               ds_example *ex, ds_bad_reason *why) {
    json_error_t err;
    json_t *rec = json_loads(json, 0, &err);
    ck_assert_msg(rec, "test record is not JSON: %s: %s", err.text, json);
    chat_template *ct;
    ck_assert_ok(chat_template_new(t, o, &ct));
    ds_example_clear(ex);
    molt_status st = chat_encode(ct, rec, ex, why);
    chat_template_free(ct);
    json_decref(rec);
    return st;
}

static molt_status encode(const char *json, const chat_opts *o, ds_example *ex,
                          ds_bad_reason *why) {
    return encode_with(tekken, json, o, ex, why);
}

static int32_t id_of(const char *name) { return tok_special(tekken, name); }

// The mask the format implies, derived from the ids alone: an assistant span starts after
// [/INST] or [/TOOL_RESULTS] unless another input block follows, and runs through </s> (or
// to the end, for an open last turn). last_only keeps the last span.
static void structural_mask(const ds_example *e, bool last_only, uint8_t *want) {
    int32_t inst_end = id_of("[/INST]"), res_end = id_of("[/TOOL_RESULTS]"), eos = id_of("</s>");
    int32_t inputs[] = {id_of("[INST]"), id_of("[TOOL_RESULTS]"), id_of("[SYSTEM_PROMPT]")};
    memset(want, 0, e->n);
    for (size_t i = 0; i < e->n; i++) {
        if (e->ids[i] != inst_end && e->ids[i] != res_end)
            continue;
        if (i + 1 == e->n)
            break;
        bool input_next = false;
        for (int k = 0; k < 3; k++)
            input_next |= e->ids[i + 1] == inputs[k];
        if (input_next)
            continue;
        size_t j = i + 1;
        if (last_only)
            memset(want, 0, e->n);
        for (; j < e->n; j++) {
            want[j] = 1;
            if (e->ids[j] == eos)
                break;
        }
        i = j;
    }
}

static void assert_mask(const ds_example *e, const uint8_t *want, const char *what) {
    for (size_t i = 0; i < e->n; i++)
        ck_assert_msg(e->mask[i] == want[i], "%s: mask[%zu] = %d, expected %d (id %d)", what, i,
                      e->mask[i], want[i], e->ids[i]);
}

// ---- golden ids ---------------------------------------------------------------------------

START_TEST(test_golden_ids_and_masks) {
    FILE *f = fopen(source_path("tests/fixtures/chat/golden.jsonl"), "r");
    ck_assert_msg(f, "no tests/fixtures/chat/golden.jsonl");
    char *line = NULL;
    size_t cap = 0;
    int n_cases = 0, n_golden = 0, n_v13 = 0;
    ds_example ex = {0};
    uint8_t *want = NULL;
    while (getline(&line, &cap, f) > 0) {
        json_t *c = json_loads(line, 0, NULL);
        ck_assert_ptr_nonnull(c);
        const char *name = json_string_value(json_object_get(c, "case"));
        chat_opts o;
        chat_opts_default(&o);
        o.version = (chat_version)json_integer_value(json_object_get(c, "version"));
        ds_bad_reason why;
        json_t *rec = json_object_get(c, "record");
        chat_template *ct;
        ck_assert_ok(chat_template_new(tekken, &o, &ct));
        ds_example_clear(&ex);
        molt_status st = chat_encode(ct, rec, &ex, &why);
        ck_assert_msg(st == MOLT_OK, "%s: %s", name, molt_err_msg());
        json_t *ids = json_object_get(c, "ids");
        ck_assert_msg(ex.n == json_array_size(ids), "%s: %zu ids, expected %zu", name, ex.n,
                      json_array_size(ids));
        for (size_t i = 0; i < ex.n; i++)
            ck_assert_msg(ex.ids[i] == json_integer_value(json_array_get(ids, i)),
                          "%s: ids[%zu] = %d, expected %lld", name, i, ex.ids[i],
                          (long long)json_integer_value(json_array_get(ids, i)));
        want = realloc(want, ex.n);
        structural_mask(&ex, false, want);
        assert_mask(&ex, want, name);
        // the same record, last assistant turn only
        chat_template_free(ct);
        o.train_last_only = true;
        ck_assert_ok(chat_template_new(tekken, &o, &ct));
        ds_example_clear(&ex);
        ck_assert_ok(chat_encode(ct, rec, &ex, &why));
        structural_mask(&ex, true, want);
        assert_mask(&ex, want, name);
        chat_template_free(ct);
        n_cases++;
        n_golden += !strcmp(json_string_value(json_object_get(c, "source")), "golden");
        n_v13 += o.version == CHAT_V13;
        json_decref(c);
    }
    free(line);
    free(want);
    fclose(f);
    ds_example_free(&ex);
    ck_assert_int_ge(n_cases, 22);
    ck_assert_int_ge(n_golden, 17);
    ck_assert_int_ge(n_v13, 7);
}
END_TEST

// ---- masks and options ---------------------------------------------------------------------

static const char conv[] =
    "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"},"
    "{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hey\"},"
    "{\"role\": \"user\", \"content\": \"Bye\"}, {\"role\": \"assistant\", \"content\": \"Ciao\"}]}";

START_TEST(test_train_on_inputs) {
    chat_opts o;
    chat_opts_default(&o);
    o.train_on_inputs = true;
    ds_example ex = {0};
    ck_assert_ok(encode(conv, &o, &ex, NULL));
    ck_assert_int_eq(ex.ids[0], id_of("<s>"));
    ck_assert_int_eq(ex.mask[0], 0);
    ck_assert_uint_eq(ds_example_trained(&ex), ex.n - 1);
    ds_example_free(&ex);
}
END_TEST

START_TEST(test_weight_zero_excludes_turn) {
    const char *rec =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"},"
        "{\"role\": \"assistant\", \"content\": \"Hey\", \"weight\": 0},"
        "{\"role\": \"user\", \"content\": \"Bye\"},"
        "{\"role\": \"assistant\", \"content\": \"Ciao\", \"weight\": 1}]}";
    ds_example ex = {0}, plain = {0};
    ck_assert_ok(encode(rec, NULL, &ex, NULL));
    ck_assert_ok(encode(conv, NULL, &plain, NULL)); // same turns with a system prompt
    uint8_t want[256];
    structural_mask(&ex, false, want);
    // the first span (Hey</s>) is excluded: keep only the last one
    uint8_t last[256];
    structural_mask(&ex, true, last);
    assert_mask(&ex, last, "weight 0");
    ck_assert_uint_lt(ds_example_trained(&ex), ds_example_trained(&plain));
    // with train_on_inputs every token but <s> and the weight-0 turn is trained
    chat_opts o;
    chat_opts_default(&o);
    o.train_on_inputs = true;
    ck_assert_ok(encode(rec, &o, &ex, NULL));
    for (size_t i = 1; i < ex.n; i++)
        ck_assert_int_eq(ex.mask[i], !(want[i] && !last[i]));
    ds_example_free(&ex);
    ds_example_free(&plain);
}
END_TEST

START_TEST(test_unequal_weights_are_separate_turns) {
    // consecutive assistant messages merge ("\n\n") only when their weights agree
    const char *same =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Q\"},"
        "{\"role\": \"assistant\", \"content\": \"A\"}, {\"role\": \"assistant\", \"content\": "
        "\"B\"}]}";
    const char *split =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Q\"},"
        "{\"role\": \"assistant\", \"content\": \"A\", \"weight\": 0},"
        "{\"role\": \"assistant\", \"content\": \"B\"}]}";
    ds_example a = {0}, b = {0};
    ck_assert_ok(encode(same, NULL, &a, NULL));
    ck_assert_ok(encode(split, NULL, &b, NULL));
    tok_ids ab = {0};
    ck_assert_ok(tok_encode(tekken, "A\n\nB", 4, &ab));
    ck_assert_int_eq(a.ids[a.n - 1], id_of("</s>"));
    ck_assert_mem_eq(a.ids + a.n - 1 - ab.n, ab.ids, ab.n * sizeof *ab.ids);
    int eos = 0;
    for (size_t i = 0; i < b.n; i++)
        eos += b.ids[i] == id_of("</s>");
    ck_assert_int_eq(eos, 2);
    // A</s> untrained, B</s> trained
    ck_assert_int_eq(b.mask[b.n - 3], 0);
    ck_assert_int_eq(b.mask[b.n - 4], 0);
    ck_assert_int_eq(b.mask[b.n - 2], 1);
    ck_assert_int_eq(b.mask[b.n - 1], 1);
    tok_ids_free(&ab);
    ds_example_free(&a);
    ds_example_free(&b);
}
END_TEST

START_TEST(test_thinking_forms_agree) {
    const char *chunks =
        "{\"reasoning_effort\": \"high\", \"messages\": [{\"role\": \"user\", \"content\": \"Q\"},"
        "{\"role\": \"assistant\", \"content\": [{\"type\": \"thinking\", \"thinking\": \"hmm\"},"
        "{\"type\": \"text\", \"text\": \"A \"}]}]}";
    const char *field =
        "{\"reasoning_effort\": \"high\", \"messages\": [{\"role\": \"user\", \"content\": \"Q\"},"
        "{\"role\": \"assistant\", \"thinking\": \"hmm\", \"content\": \"A \"}]}";
    const char *field2 =
        "{\"reasoning_effort\": \"high\", \"messages\": [{\"role\": \"user\", \"content\": \"Q\"},"
        "{\"role\": \"assistant\", \"reasoning_content\": \"hmm\", \"content\": \"A \"}]}";
    ds_example a = {0}, b = {0}, c = {0};
    ck_assert_ok(encode(chunks, NULL, &a, NULL));
    ck_assert_ok(encode(field, NULL, &b, NULL));
    ck_assert_ok(encode(field2, NULL, &c, NULL));
    ck_assert_uint_eq(a.n, b.n);
    ck_assert_uint_eq(a.n, c.n);
    ck_assert_mem_eq(a.ids, b.ids, a.n * sizeof *a.ids);
    ck_assert_mem_eq(a.ids, c.ids, a.n * sizeof *a.ids);
    // [THINK] hmm [/THINK] A-space </s>: thinking is trained, and a thinking turn keeps its
    // trailing space (only plain-text answers lose it)
    size_t k = 0;
    while (a.ids[k] != id_of("[THINK]"))
        k++;
    for (size_t i = k; i < a.n; i++)
        ck_assert_int_eq(a.mask[i], 1);
    for (size_t i = 0; i < k; i++)
        ck_assert_int_eq(a.mask[i], 0);
    char *text = NULL;
    size_t len = 0;
    ck_assert_ok(tok_decode(tekken, a.ids + k, a.n - k, &text, &len));
    ck_assert_str_eq(text, "[THINK]hmm[/THINK]A </s>");
    molt_free(text);
    ds_example_free(&a);
    ds_example_free(&b);
    ds_example_free(&c);
}
END_TEST

START_TEST(test_tool_call_arguments_forms) {
    // arguments as an object, as JSON text in another layout, or absent/empty ({})
    const char *fmt =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"go\"}, {\"role\": \"assistant\", "
        "\"tool_calls\": [{\"id\": \"c1\", \"function\": {\"name\": \"f\", \"arguments\": %s}}]}]}";
    const char *forms[][2] = {
        {"{\"x\": [1, 2.50, \"\\u00e9\"]}", "{\"x\": [1, 2.5, \"é\"]}"},
        {"\"{\\\"x\\\":[1,2.5,\\\"é\\\"]}\"", "{\"x\": [1, 2.5, \"é\"]}"},
        {"\"\"", "{}"},
        {"null", "{}"},
        {"\"not json\"", "\"not json\""},
    };
    for (size_t k = 0; k < sizeof forms / sizeof *forms; k++) {
        char rec[512], *text = NULL;
        size_t len = 0;
        snprintf(rec, sizeof rec, fmt, forms[k][0]);
        ds_example ex = {0};
        ck_assert_ok(encode(rec, NULL, &ex, NULL));
        size_t a = 0;
        while (ex.ids[a] != id_of("[ARGS]"))
            a++;
        ck_assert_ok(tok_decode(tekken, ex.ids + a + 1, ex.n - a - 2, &text, &len));
        ck_assert_str_eq(text, forms[k][1]);
        ck_assert_int_eq(ex.ids[ex.n - 1], id_of("</s>"));
        molt_free(text);
        ds_example_free(&ex);
    }
}
END_TEST

START_TEST(test_tool_results_follow_call_order) {
    // results answer the calls in call order; a result without an id goes last
    const char *rec =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"u\"}, {\"role\": \"assistant\", "
        "\"tool_calls\": [{\"id\": \"a\", \"function\": {\"name\": \"f\"}}, {\"id\": \"b\", "
        "\"function\": {\"name\": \"g\"}}]}, {\"role\": \"tool\", \"content\": \"3\"},"
        "{\"role\": \"tool\", \"tool_call_id\": \"b\", \"content\": \"2\"},"
        "{\"role\": \"tool\", \"tool_call_id\": \"a\", \"content\": \"1\"}]}";
    ds_example ex = {0};
    chat_opts o;
    chat_opts_default(&o);
    o.reasoning_default = NULL; // no [MODEL_SETTINGS]
    ck_assert_ok(encode(rec, &o, &ex, NULL));
    char *text = NULL;
    size_t len = 0;
    ck_assert_ok(tok_decode(tekken, ex.ids, ex.n, &text, &len));
    ck_assert_str_eq(text, "<s>[INST]u[/INST][TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]g[ARGS]{}</s>"
                           "[TOOL_RESULTS]1[/TOOL_RESULTS][TOOL_RESULTS]2[/TOOL_RESULTS]"
                           "[TOOL_RESULTS]3[/TOOL_RESULTS]");
    molt_free(text);
    ds_example_free(&ex);
}
END_TEST

// ---- bad records ------------------------------------------------------------------------

typedef struct {
    const char *record;
    int version;
    ds_bad_reason why;
    const char *msg;
} bad_case;

#define U "{\"role\": \"user\", \"content\": \"u\"}"
#define A "{\"role\": \"assistant\", \"content\": \"a\"}"
static const bad_case bad_cases[] = {
    {"[1]", 15, DS_BAD_FORMAT_UNKNOWN, "record is not a JSON object"},
    {"{}", 15, DS_BAD_FIELD_MISSING, "missing field 'messages'"},
    {"{\"messages\": null}", 15, DS_BAD_FIELD_MISSING, "missing field 'messages'"},
    {"{\"messages\": {}}", 15, DS_BAD_FIELD_INVALID,
     "field 'messages' must be an array, not an object"},
    {"{\"messages\": []}", 15, DS_BAD_FIELD_EMPTY, "empty field 'messages'"},
    {"{\"messages\": [\"hi\"]}", 15, DS_BAD_FIELD_INVALID,
     "field 'messages[0]' must be an object, not a string"},
    {"{\"messages\": [{\"content\": \"x\"}]}", 15, DS_BAD_FIELD_MISSING,
     "missing field 'messages[0].role'"},
    {"{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}", 15, DS_BAD_FIELD_INVALID,
     "field 'messages[0].role' must be system, user, assistant or tool"},
    {"{\"messages\": [" U ", {\"role\": \"system\", \"content\": \"s\"}, " A ", "
     "{\"role\": \"system\", \"content\": \"s\"}]}", 15, DS_BAD_FIELD_INVALID,
     "messages[3]: role 'system' cannot follow role 'assistant'"},
    {"{\"messages\": [" U ", {\"role\": \"tool\", \"content\": \"r\"}]}", 15,
     DS_BAD_FIELD_INVALID, "messages[1]: role 'tool' cannot follow role 'user'"},
    {"{\"messages\": [{\"role\": \"user\"}]}", 15, DS_BAD_FIELD_MISSING,
     "missing field 'messages[0].content'"},
    {"{\"messages\": [{\"role\": \"user\", \"content\": \"\"}]}", 15, DS_BAD_FIELD_EMPTY,
     "empty field 'messages[0].content'"},
    {"{\"messages\": [" U ", {\"role\": \"assistant\", \"content\": null}]}", 15,
     DS_BAD_FIELD_MISSING, "missing field 'messages[1].content'"},
    {"{\"messages\": [" U ", {\"role\": \"assistant\", \"content\": [{\"type\": \"text\", "
     "\"text\": \"\"}]}]}", 15, DS_BAD_FIELD_EMPTY, "empty field 'messages[1].content'"},
    {"{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", 15, DS_BAD_FIELD_INVALID,
     "field 'messages[0].content' must be a string or an array, not an integer"},
    {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image\"}]}]}", 15,
     DS_BAD_FIELD_INVALID, "field 'messages[0].content[0].type' must be \"text\" or "
                           "\"thinking\""},
    {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"thinking\", "
     "\"thinking\": \"t\"}]}]}", 15, DS_BAD_FIELD_INVALID,
     "field 'messages[0].content[0]': user messages hold no thinking"},
    {"{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]}", 15,
     DS_BAD_FIELD_MISSING, "missing field 'messages[0].content[0].text'"},
    {"{\"messages\": [" U ", {\"role\": \"assistant\", \"content\": \"a\", \"weight\": 0.5}]}",
     15, DS_BAD_FIELD_INVALID, "field 'messages[1].weight' must be 0 or 1"},
    {"{\"messages\": [{\"role\": \"user\", \"content\": \"u\", \"prefix\": true}, " A "]}", 15,
     DS_BAD_FIELD_INVALID,
     "field 'messages[0].prefix': only the last message, an assistant one, may be left open"},
    {"{\"messages\": [" U ", {\"role\": \"assistant\", \"tool_calls\": [{\"id\": \"x\"}]}]}",
     15, DS_BAD_FIELD_MISSING, "missing field 'messages[1].tool_calls[0].function'"},
    {"{\"messages\": [" U ", {\"role\": \"assistant\", \"tool_calls\": [{\"function\": "
     "{\"name\": \"\"}}]}]}", 15, DS_BAD_FIELD_EMPTY,
     "empty field 'messages[1].tool_calls[0].function.name'"},
    {"{\"messages\": [" U ", {\"role\": \"user\", \"content\": \"v\", \"tool_calls\": []}]}", 15,
     DS_BAD_FIELD_INVALID, "field 'messages[1].tool_calls' is only allowed in assistant "
                           "messages"},
    {"{\"messages\": [" U ", {\"role\": \"assistant\", \"content\": \"a\", \"thinking\": 1}]}",
     15, DS_BAD_FIELD_INVALID, "field 'messages[1].thinking' must be a string in an assistant "
                               "message"},
    {"{\"messages\": [" U ", {\"role\": \"assistant\", \"content\": \"a\", \"thinking\": \"t\", "
     "\"reasoning_content\": \"r\"}]}", 15, DS_BAD_FIELD_INVALID,
     "messages[1] has both 'thinking' and 'reasoning_content'"},
    {"{\"messages\": [{\"role\": \"system\", \"content\": [{\"type\": \"thinking\", "
     "\"thinking\": \"t\"}]}, " U "]}", 15, DS_BAD_FIELD_INVALID,
     "messages[0]: chat v15 has no thinking in system messages"},
    {"{\"reasoning_effort\": \"low\", \"messages\": [" U "]}", 15, DS_BAD_FIELD_INVALID,
     "field 'reasoning_effort' must be \"none\" or \"high\""},
    {"{\"reasoning_effort\": \"high\", \"messages\": [" U "]}", 13, DS_BAD_FIELD_INVALID,
     "field 'reasoning_effort' is not supported by chat v13"},
    {"{\"tools\": {}, \"messages\": [" U "]}", 15, DS_BAD_FIELD_INVALID,
     "field 'tools' must be an array, not an object"},
    {"{\"tools\": [{\"type\": \"function\"}], \"messages\": [" U "]}", 15,
     DS_BAD_FIELD_MISSING, "missing field 'tools[0].function'"},
    {"{\"tools\": [{\"function\": {\"description\": \"d\"}}], \"messages\": [" U "]}", 15,
     DS_BAD_FIELD_MISSING, "missing field 'tools[0].function.name'"},
    {"{\"tools\": [{\"function\": {\"name\": \"f\", \"parameters\": []}}], \"messages\": [" U
     "]}", 15, DS_BAD_FIELD_INVALID, "field 'tools[0].function.parameters' must be an object"},
    {"{\"tools\": [{\"type\": \"retrieval\", \"function\": {\"name\": \"f\"}}], \"messages\": "
     "[" U "]}", 15, DS_BAD_FIELD_INVALID, "field 'tools[0].type' must be \"function\""},
};

START_TEST(test_bad_chat_records) {
    ds_example ex = {0};
    for (size_t k = 0; k < sizeof bad_cases / sizeof *bad_cases; k++) {
        const bad_case *c = &bad_cases[k];
        chat_opts o;
        chat_opts_default(&o);
        o.version = (chat_version)c->version;
        ds_bad_reason why = DS_BAD_COUNT;
        molt_status st = encode(c->record, &o, &ex, &why);
        ck_assert_msg(st == MOLT_EFORMAT, "case %zu: status %s (%s)", k, molt_status_name(st),
                      molt_err_msg());
        ck_assert_msg(!strcmp(molt_err_msg(), c->msg), "case %zu: message \"%s\", expected "
                      "\"%s\"", k, molt_err_msg(), c->msg);
        ck_assert_msg(why == c->why, "case %zu: reason %s, expected %s", k,
                      ds_bad_reason_name(why), ds_bad_reason_name(c->why));
    }
    ds_example_free(&ex);
}
END_TEST

START_TEST(test_missing_control_tokens) {
    // the tokenizer.json model has none of the Mistral control tokens: raw text is fine,
    // chat names the first token it needs
    chat_opts o;
    chat_opts_default(&o);
    ds_example ex = {0};
    ds_bad_reason why;
    molt_status st = encode_with(hf, "{\"messages\": [" U "]}", &o, &ex, &why);
    ck_assert_int_eq(st, MOLT_EUNSUPPORTED);
    ck_assert_str_eq(molt_err_msg(), "chat template v15 needs the control token "
                                     "'[MODEL_SETTINGS]', which the tokenizer.json tokenizer "
                                     "lacks");
    o.version = CHAT_V13;
    st = encode_with(hf, "{\"messages\": [" U "]}", &o, &ex, &why);
    ck_assert_int_eq(st, MOLT_EUNSUPPORTED);
    ck_assert_str_eq(molt_err_msg(), "chat template v13 needs the control token '[INST]', "
                                     "which the tokenizer.json tokenizer lacks");
    ds_example_free(&ex);
}
END_TEST

START_TEST(test_allocation_failures) {
    // every allocation of an encode may fail: a clean ENOMEM (or success), no leak, no crash
    chat_template *ct;
    ck_assert_ok(chat_template_new(tekken, NULL, &ct));
    json_t *rec = json_loads(conv, 0, NULL);
    ds_example ex = {0};
    int failed = 0;
    for (long k = 0; k < 400; k++) {
        ds_example_free(&ex);
        molt_alloc_fail_after(k);
        molt_status st = chat_encode(ct, rec, &ex, NULL);
        molt_alloc_fail_after(-1);
        ck_assert_msg(st == MOLT_OK || st == MOLT_ENOMEM, "k=%ld: %s", k, molt_err_msg());
        failed += st == MOLT_ENOMEM;
        if (st == MOLT_OK)
            break;
    }
    ck_assert_int_gt(failed, 3);
    ds_example_free(&ex);
    json_decref(rec);
    chat_template_free(ct);
}
END_TEST

// ---- helpers: Python-style JSON, UTF-8 ----------------------------------------------------

START_TEST(test_pyjson_matches_python) {
    // expected strings are Python 3's json.dumps(json.loads(input), ensure_ascii=False)
    static const char *const cases[][2] = {
        {"1.0", "1.0"}, {"2.5", "2.5"}, {"1e-07", "1e-07"}, {"1e16", "1e+16"},
        {"1e15", "1000000000000000.0"}, {"123456789012345678.0", "1.2345678901234568e+17"},
        {"0.1", "0.1"}, {"-0.0", "-0.0"}, {"1e-4", "0.0001"}, {"1e-5", "1e-05"},
        {"1.5e300", "1.5e+300"}, {"5e-324", "5e-324"}, {"100.0", "100.0"},
        {"0.30000000000000004", "0.30000000000000004"}, {"-2.0e-10", "-2e-10"},
        {"12345.678", "12345.678"}, {"-7", "-7"}, {"[]", "[]"}, {"{}", "{}"},
        {"{\"a\":[1,2,{\"b\":null,\"c\":true,\"d\":false}],\"e\":\"x\\\"y\\\\z\\n\\t\\u0001\\u007f"
         "\\u00e9\xe6\x97\xa5\"}",
         "{\"a\": [1, 2, {\"b\": null, \"c\": true, \"d\": false}], \"e\": \"x\\\"y\\\\z\\n\\t"
         "\\u0001\x7f\xc3\xa9\xe6\x97\xa5\"}"},
        {"{\"k\":1,\"k\":2,\"j\":3}", "{\"k\": 2, \"j\": 3}"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        json_t *v = json_loads(cases[k][0], JSON_DECODE_ANY, NULL);
        ck_assert_ptr_nonnull(v);
        ds_buf b = {0};
        ck_assert_ok(ds_pyjson_dump(v, &b));
        ck_assert_str_eq(b.p, cases[k][1]);
        ds_buf_free(&b);
        json_decref(v);
    }
}
END_TEST

START_TEST(test_utf8_check) {
    static const struct {
        const char *s;
        size_t bad; // offset of the first bad byte, or SIZE_MAX when valid
    } cases[] = {
        {"plain", SIZE_MAX}, {"caf\xc3\xa9 \xe6\x97\xa5 \xf0\x9f\x99\x82", SIZE_MAX},
        {"a\xff", 1}, {"ab\xc3", 2}, {"\xc0\xaf", 0}, {"x\xe0\x80\xaf", 1},
        {"\xed\xa0\x80", 0}, {"\xf4\x90\x80\x80", 0}, {"ok\xe6\x97", 2}, {"\x80", 0},
        {"\xf0\x9f\x99", 0}, {"\xef\xbf\xbf", SIZE_MAX}, {"\xf4\x8f\xbf\xbf", SIZE_MAX},
    };
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        size_t n = strlen(cases[k].s), got = ds_utf8_check(cases[k].s, n);
        size_t want = cases[k].bad == SIZE_MAX ? n : cases[k].bad;
        ck_assert_msg(got == want, "case %zu: %zu, expected %zu", k, got, want);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("chat");
    TCase *tc = tcase_create("chat");
    tcase_add_unchecked_fixture(tc, load_tokenizers, free_tokenizers);
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_golden_ids_and_masks);
    tcase_add_test(tc, test_train_on_inputs);
    tcase_add_test(tc, test_weight_zero_excludes_turn);
    tcase_add_test(tc, test_unequal_weights_are_separate_turns);
    tcase_add_test(tc, test_thinking_forms_agree);
    tcase_add_test(tc, test_tool_call_arguments_forms);
    tcase_add_test(tc, test_tool_results_follow_call_order);
    tcase_add_test(tc, test_bad_chat_records);
    tcase_add_test(tc, test_missing_control_tokens);
    tcase_add_test(tc, test_allocation_failures);
    tcase_add_test(tc, test_pyjson_matches_python);
    tcase_add_test(tc, test_utf8_check);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
