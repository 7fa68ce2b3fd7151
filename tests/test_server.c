// tests/test_server.c: the HTTP server (infer/server) over real HTTP on a loopback port, with
// the fake engine of tests/harness/fake_engine.c in place of the real one: the routes and
// their JSON shapes, completions (prompt shapes, n, echo, logprobs, stop strings and ids),
// streaming framing and usage, chat. Expected texts come from the tokenizer and chat
// template directly, applied to the fake engine's documented rules (fake_engine.h).
#include <check.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "harness/harness.h"
#include "harness/server_env.h"
#include "infer/server/srv_internal.h"

// ---- routes -----------------------------------------------------------------------------

START_TEST(test_health_models_routes) {
    srv_env f;
    srv_env_start(&f, NULL);
    ck_assert_int_eq(srv_env_call(&f, "GET", "/health", NULL, NULL, NULL, NULL), 200);
    json_t *j;
    ck_assert_int_eq(srv_env_call(&f, "GET", "/v1/models", NULL, NULL, &j, NULL), 200);
    json_t *data = json_object_get(j, "data");
    ck_assert_int_eq(json_array_size(data), 1);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(data, 0), "id")), "base");
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(data, 0), "root")),
                     "/models/base");
    ck_assert(json_is_null(json_object_get(json_array_get(data, 0), "parent")));
    json_decref(j);
    ck_assert_int_eq(srv_env_call(&f, "GET", "/nope", NULL, NULL, &j, NULL), 404);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "type")),
                     "NotFoundError");
    json_decref(j);
    ck_assert_int_eq(srv_env_call(&f, "GET", "/v1/completions", NULL, NULL, NULL, NULL), 405);
    // the runtime adapter routes exist only when allowed
    ck_assert_int_eq(srv_env_call(&f, "POST", "/v1/load_lora_adapter", "{}", NULL, NULL, NULL), 404);
    srv_env_stop(&f);
}
END_TEST

START_TEST(test_tokenizer_routes) {
    srv_env f;
    srv_env_start(&f, NULL);
    json_t *j = srv_env_post_ok(&f, "/tokenize", "{\"prompt\": \"Hello world\"}");
    tok_ids ids = srv_env_prompt_ids(&f, "Hello world");
    json_t *toks = json_object_get(j, "tokens");
    ck_assert_int_eq(json_array_size(toks), ids.n);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "count")), ids.n);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "max_model_len")), 256);
    for (size_t i = 0; i < ids.n; i++)
        ck_assert_int_eq(json_integer_value(json_array_get(toks, i)), ids.ids[i]);
    json_decref(j);
    j = srv_env_post_ok(&f, "/tokenize", "{\"prompt\": \"Hello world\", \"add_special_tokens\": false, "
                                 "\"return_token_strs\": true}");
    ck_assert_int_eq(json_array_size(json_object_get(j, "tokens")), ids.n - 1);
    ck_assert_int_eq(json_array_size(json_object_get(j, "token_strs")), ids.n - 1);
    json_decref(j);
    // detokenize gives the text back (the <s> by its name)
    char body[256];
    int k = snprintf(body, sizeof body, "{\"tokens\": [");
    for (size_t i = 1; i < ids.n; i++)
        k += snprintf(body + k, sizeof body - (size_t)k, "%s%d", i > 1 ? "," : "", ids.ids[i]);
    snprintf(body + k, sizeof body - (size_t)k, "]}");
    j = srv_env_post_ok(&f, "/detokenize", body);
    ck_assert_str_eq(json_string_value(json_object_get(j, "prompt")), "Hello world");
    json_decref(j);
    ck_assert_int_eq(srv_env_call(&f, "POST", "/detokenize", "{\"tokens\": [1, -3]}", NULL, &j, NULL),
                     400);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "param")),
                     "tokens");
    json_decref(j);
    // chat messages through the template
    j = srv_env_post_ok(&f, "/tokenize", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}");
    const tok_tokenizer *t = eng_tokenizer(f.e);
    json_t *toks2 = json_object_get(j, "tokens");
    ck_assert_int_eq(json_integer_value(json_array_get(toks2, 0)), tok_bos(t));
    ck_assert_int_eq(json_integer_value(json_array_get(toks2, json_array_size(toks2) - 1)),
                     tok_special(t, "[/INST]"));
    json_decref(j);
    ck_assert_int_eq(srv_env_call(&f, "GET", "/tokenizer_info", NULL, NULL, &j, NULL), 200);
    ck_assert_str_eq(json_string_value(json_object_get(j, "eos_token")), "</s>");
    ck_assert_str_eq(json_string_value(json_object_get(j, "bos_token")), "<s>");
    ck_assert(json_is_string(json_object_get(j, "tokenizer_class")));
    json_decref(j);
    tok_ids_free(&ids);
    srv_env_stop(&f);
}
END_TEST

// ---- completions ------------------------------------------------------------------------

START_TEST(test_completions_text) {
    srv_env f;
    srv_env_start(&f, NULL);
    json_t *j = srv_env_post_ok(&f, "/v1/completions", "{\"model\": \"base\", \"prompt\": \"Hello "
                                               "there, world\", \"max_tokens\": 4, "
                                               "\"temperature\": 0, \"extra_field\": [1]}");
    tok_ids ids = srv_env_prompt_ids(&f, "Hello there, world");
    char *want = srv_env_expected(&f, &ids, 4, 0);
    ck_assert_str_eq(srv_env_ctext(j, 0), want);
    ck_assert_str_eq(srv_env_cfield(j, 0, "finish_reason"), "length");
    ck_assert_str_eq(json_string_value(json_object_get(j, "object")), "text_completion");
    ck_assert_str_eq(json_string_value(json_object_get(j, "model")), "base");
    ck_assert(!strncmp(json_string_value(json_object_get(j, "id")), "cmpl-", 5));
    ck_assert_int_eq(srv_env_usage(j, "prompt_tokens"), ids.n);
    ck_assert_int_eq(srv_env_usage(j, "completion_tokens"), 4);
    ck_assert_int_eq(srv_env_usage(j, "total_tokens"), ids.n + 4);
    json_decref(j);
    free(want);
    // list of texts, n = 2: choices prompt-major, usage counts each prompt once
    j = srv_env_post_ok(&f, "/v1/completions", "{\"prompt\": [\"ab cd\", \"Hello there, world\"], "
                                       "\"max_tokens\": 3, \"n\": 2, \"temperature\": 0}");
    ck_assert_int_eq(json_array_size(json_object_get(j, "choices")), 4);
    tok_ids a = srv_env_prompt_ids(&f, "ab cd");
    char *wa = srv_env_expected(&f, &a, 3, 0), *wb = srv_env_expected(&f, &ids, 3, 0);
    ck_assert_str_eq(srv_env_ctext(j, 0), wa);
    ck_assert_str_eq(srv_env_ctext(j, 1), wa);
    ck_assert_str_eq(srv_env_ctext(j, 2), wb);
    ck_assert_str_eq(srv_env_ctext(j, 3), wb);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(json_integer_value(json_object_get(
                             json_array_get(json_object_get(j, "choices"), i), "index")), i);
    ck_assert_int_eq(srv_env_usage(j, "prompt_tokens"), a.n + ids.n);
    ck_assert_int_eq(srv_env_usage(j, "completion_tokens"), 12);
    json_decref(j);
    free(wa);
    free(wb);
    // token ids and lists of them: no <s> added
    tok_ids p1 = srv_env_prompt_ids(&f, "one two three"), p2 = srv_env_prompt_ids(&f, "four five");
    p1.ids++, p1.n--, p2.ids++, p2.n--; // without the <s>
    char body[512];
    int k = snprintf(body, sizeof body, "{\"prompt\": [[");
    for (size_t i = 0; i < p1.n; i++)
        k += snprintf(body + k, sizeof body - (size_t)k, "%s%d", i ? "," : "", p1.ids[i]);
    k += snprintf(body + k, sizeof body - (size_t)k, "], [");
    for (size_t i = 0; i < p2.n; i++)
        k += snprintf(body + k, sizeof body - (size_t)k, "%s%d", i ? "," : "", p2.ids[i]);
    snprintf(body + k, sizeof body - (size_t)k, "]], \"max_tokens\": 2, \"temperature\": 0}");
    j = srv_env_post_ok(&f, "/v1/completions", body);
    char *w1 = srv_env_expected(&f, &p1, 2, 0), *w2 = srv_env_expected(&f, &p2, 2, 0);
    ck_assert_str_eq(srv_env_ctext(j, 0), w1);
    ck_assert_str_eq(srv_env_ctext(j, 1), w2);
    ck_assert_int_eq(srv_env_usage(j, "prompt_tokens"), p1.n + p2.n);
    json_decref(j);
    k = snprintf(body, sizeof body, "{\"prompt\": [");
    for (size_t i = 0; i < p1.n; i++)
        k += snprintf(body + k, sizeof body - (size_t)k, "%s%d", i ? "," : "", p1.ids[i]);
    snprintf(body + k, sizeof body - (size_t)k, "], \"max_tokens\": 2, \"temperature\": 0}");
    j = srv_env_post_ok(&f, "/v1/completions", body);
    ck_assert_str_eq(srv_env_ctext(j, 0), w1);
    json_decref(j);
    free(w1);
    free(w2);
    p1.ids--, p2.ids--;
    tok_ids_free(&p1);
    tok_ids_free(&p2);
    tok_ids_free(&a);
    tok_ids_free(&ids);
    // seeded sampling is reproducible and the seed matters
    const char *s1 = "{\"prompt\": \"one two three four five six\", \"max_tokens\": 6, "
                     "\"temperature\": 1, \"seed\": 11}";
    json_t *x = srv_env_post_ok(&f, "/v1/completions", s1), *y = srv_env_post_ok(&f, "/v1/completions", s1);
    ck_assert_str_eq(srv_env_ctext(x, 0), srv_env_ctext(y, 0));
    json_decref(x);
    json_decref(y);
    srv_env_stop(&f);
}
END_TEST

START_TEST(test_completions_echo_logprobs) {
    srv_env f;
    srv_env_start(&f, NULL);
    json_t *j = srv_env_post_ok(&f, "/v1/completions", "{\"prompt\": \"Hello there, world\", "
                                               "\"max_tokens\": 1, \"echo\": true, "
                                               "\"logprobs\": 2, \"temperature\": 0}");
    tok_ids ids = srv_env_prompt_ids(&f, "Hello there, world");
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    json_t *lp = json_object_get(c0, "logprobs");
    json_t *tl = json_object_get(lp, "token_logprobs"), *top = json_object_get(lp, "top_logprobs");
    json_t *toks = json_object_get(lp, "tokens"), *offs = json_object_get(lp, "text_offset");
    size_t n = ids.n + 1;
    ck_assert_int_eq(json_array_size(tl), n);
    ck_assert_int_eq(json_array_size(top), n);
    ck_assert_int_eq(json_array_size(toks), n);
    ck_assert_int_eq(json_array_size(offs), n);
    ck_assert(json_is_null(json_array_get(tl, 0)));
    ck_assert(json_is_null(json_array_get(top, 0)));
    for (size_t i = 1; i < ids.n; i++) {
        double want = -0.5 * (double)(i % 3 + 1);
        ck_assert_double_eq_tol(json_real_value(json_array_get(tl, i)), want, 1e-12);
        json_t *d = json_array_get(top, i);
        // the sampled token is in the dict with its log-probability
        json_t *v = json_object_get(d, json_string_value(json_array_get(toks, i)));
        ck_assert_ptr_nonnull(v);
        ck_assert_double_eq_tol(json_real_value(v), want, 1e-12);
        ck_assert_int_le(json_object_size(d), 3);
        ck_assert_int_ge(json_integer_value(json_array_get(offs, i)),
                         json_integer_value(json_array_get(offs, i - 1)));
    }
    ck_assert_double_eq_tol(json_real_value(json_array_get(tl, ids.n)), -0.25, 1e-12);
    // the text is the prompt followed by the generated token
    char *gen = srv_env_expected(&f, &ids, 1, 0);
    char want[256];
    snprintf(want, sizeof want, "Hello there, world%s", gen);
    ck_assert_str_eq(srv_env_ctext(j, 0), want);
    free(gen);
    json_decref(j);
    // max_tokens 0 with echo: the prompt alone (scored when logprobs are asked)
    j = srv_env_post_ok(&f, "/v1/completions", "{\"prompt\": \"Hello there\", \"max_tokens\": 0, "
                                       "\"echo\": true}");
    ck_assert_str_eq(srv_env_ctext(j, 0), "Hello there");
    ck_assert_int_eq(srv_env_usage(j, "completion_tokens"), 0);
    json_decref(j);
    j = srv_env_post_ok(&f, "/v1/completions", "{\"prompt\": \"Hello there\", \"max_tokens\": 0, "
                                       "\"echo\": true, \"logprobs\": 0}");
    c0 = json_array_get(json_object_get(j, "choices"), 0);
    tl = json_object_get(json_object_get(c0, "logprobs"), "token_logprobs");
    tok_ids h = srv_env_prompt_ids(&f, "Hello there");
    ck_assert_int_eq(json_array_size(tl), h.n);
    ck_assert_double_eq_tol(json_real_value(json_array_get(tl, 1)), -1.0, 1e-12);
    json_decref(j);
    ck_assert_int_eq(srv_env_call(&f, "POST", "/v1/completions", "{\"prompt\": \"x\", \"max_tokens\": 0}",
                          NULL, &j, NULL), 400);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "param")),
                     "max_tokens");
    json_decref(j);
    tok_ids_free(&h);
    tok_ids_free(&ids);
    srv_env_stop(&f);
}
END_TEST

START_TEST(test_completions_stop) {
    srv_env f;
    srv_env_start(&f, NULL);
    // the greedy output of "a b c d e f g" runs backwards: " g f e d ..."
    tok_ids ids = srv_env_prompt_ids(&f, "a b c d e f g");
    char *full = srv_env_expected(&f, &ids, 8, 0);
    const char *cut = strstr(full, " e");
    ck_assert_ptr_nonnull(cut);
    json_t *j = srv_env_post_ok(&f, "/v1/completions", "{\"prompt\": \"a b c d e f g\", \"max_tokens\": "
                                               "8, \"stop\": [\"zz\", \" e\"], \"temperature\": 0}");
    ck_assert_int_eq(strlen(srv_env_ctext(j, 0)), (size_t)(cut - full));
    ck_assert(!strncmp(srv_env_ctext(j, 0), full, (size_t)(cut - full)));
    ck_assert_str_eq(srv_env_cfield(j, 0, "finish_reason"), "stop");
    ck_assert_str_eq(srv_env_cfield(j, 0, "stop_reason"), " e");
    ck_assert_int_lt(srv_env_usage(j, "completion_tokens"), 8);
    json_decref(j);
    // a stop id: the token is generated, its text is not shown
    char body[256];
    int32_t third = ids.ids[ids.n - 3];
    snprintf(body, sizeof body, "{\"prompt\": \"a b c d e f g\", \"max_tokens\": 8, "
                                "\"stop_token_ids\": [%d], \"temperature\": 0}", third);
    j = srv_env_post_ok(&f, "/v1/completions", body);
    char *two = srv_env_expected(&f, &ids, 2, 0);
    ck_assert_str_eq(srv_env_ctext(j, 0), two);
    ck_assert_str_eq(srv_env_cfield(j, 0, "finish_reason"), "stop");
    ck_assert_int_eq(json_integer_value(json_object_get(
                         json_array_get(json_object_get(j, "choices"), 0), "stop_reason")),
                     third);
    ck_assert_int_eq(srv_env_usage(j, "completion_tokens"), 3);
    json_decref(j);
    free(two);
    free(full);
    tok_ids_free(&ids);
    srv_env_stop(&f);
}
END_TEST

// Reads a whole event stream; returns the concatenated "text" (or chat delta content) of
// choice 0 and the parsed events in *events.
static char *read_stream(srv_env *f, const char *path, const char *body, json_t **events,
                         bool *done_last) {
    hc_resp r;
    ck_assert_int_eq(hc_request(f->port, "POST", path, NULL, body, strlen(body), &r), 0);
    ck_assert_int_eq(r.status, 200);
    char ct[128];
    ck_assert(hc_header(&r, "Content-Type", ct, sizeof ct));
    ck_assert_str_eq(ct, "text/event-stream");
    *events = json_array();
    char *text = calloc(1, 65536);
    *done_last = false;
    for (char *p = r.body; *p;) {
        ck_assert_msg(!strncmp(p, "data: ", 6), "bad framing at '%.40s'", p);
        char *end = strstr(p, "\n\n");
        ck_assert_ptr_nonnull(end);
        *end = 0;
        ck_assert(!*done_last); // nothing after [DONE]
        if (!strcmp(p + 6, "[DONE]")) {
            *done_last = true;
        } else {
            json_t *ev = json_loads(p + 6, 0, NULL);
            ck_assert_ptr_nonnull(ev);
            json_t *c0 = json_array_get(json_object_get(ev, "choices"), 0);
            const char *t = json_string_value(json_object_get(c0, "text"));
            if (!t)
                t = json_string_value(json_object_get(json_object_get(c0, "delta"), "content"));
            if (t && json_integer_value(json_object_get(c0, "index")) == 0)
                strcat(text, t);
            json_array_append_new(*events, ev);
        }
        p = end + 2;
    }
    hc_free(&r);
    return text;
}

START_TEST(test_streaming) {
    srv_env f;
    srv_env_start(&f, NULL);
    const char *q = "{\"prompt\": \"Hello there, world\", \"max_tokens\": 6, \"stream\": true, "
                    "\"stream_options\": {\"include_usage\": true}, \"temperature\": 0}";
    json_t *ev;
    bool done;
    char *text = read_stream(&f, "/v1/completions", q, &ev, &done);
    ck_assert(done);
    json_t *once = srv_env_post_ok(&f, "/v1/completions", "{\"prompt\": \"Hello there, world\", "
                                                  "\"max_tokens\": 6, \"temperature\": 0}");
    ck_assert_str_eq(text, srv_env_ctext(once, 0));
    size_t n = json_array_size(ev);
    ck_assert_int_ge(n, 3);
    json_t *last = json_array_get(ev, n - 1), *before = json_array_get(ev, n - 2);
    ck_assert_int_eq(json_array_size(json_object_get(last, "choices")), 0);
    ck_assert_int_eq(srv_env_usage(last, "completion_tokens"), 6);
    ck_assert_int_eq(srv_env_usage(last, "prompt_tokens"), srv_env_usage(once, "prompt_tokens"));
    ck_assert_str_eq(srv_env_cfield(before, 0, "finish_reason"), "length");
    for (size_t i = 0; i + 2 < n; i++) // only the last choice chunk carries a finish reason
        ck_assert(json_is_null(json_object_get(
            json_array_get(json_object_get(json_array_get(ev, i), "choices"), 0),
            "finish_reason")));
    json_decref(ev);
    json_decref(once);
    free(text);
    // chat: the role comes first, then content deltas; no usage unless asked for
    const char *cq = "{\"messages\": [{\"role\": \"user\", \"content\": \"Say hi there\"}], "
                     "\"max_tokens\": 5, \"stream\": true, \"temperature\": 0}";
    text = read_stream(&f, "/v1/chat/completions", cq, &ev, &done);
    ck_assert(done);
    json_t *first = json_array_get(ev, 0);
    ck_assert_str_eq(json_string_value(json_object_get(first, "object")),
                     "chat.completion.chunk");
    json_t *d0 = json_object_get(json_array_get(json_object_get(first, "choices"), 0), "delta");
    ck_assert_str_eq(json_string_value(json_object_get(d0, "role")), "assistant");
    json_t *whole = srv_env_post_ok(&f, "/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", "
                                                        "\"content\": \"Say hi there\"}], "
                                                        "\"max_tokens\": 5, \"temperature\": 0}");
    json_t *msg = json_object_get(json_array_get(json_object_get(whole, "choices"), 0),
                                  "message");
    ck_assert_str_eq(text, json_string_value(json_object_get(msg, "content")));
    for (size_t i = 0; i < json_array_size(ev); i++)
        ck_assert_ptr_null(json_object_get(json_array_get(ev, i), "usage"));
    json_decref(ev);
    json_decref(whole);
    free(text);
    srv_env_stop(&f);
}
END_TEST

START_TEST(test_chat) {
    srv_env f;
    srv_env_start(&f, NULL);
    const char *body = "{\"model\": \"base\", \"messages\": [{\"role\": \"system\", \"content\": "
                       "\"Be brief.\"}, {\"role\": \"user\", \"content\": \"What is two plus "
                       "two?\"}], \"max_tokens\": 4, \"logprobs\": true, \"top_logprobs\": 2, "
                       "\"reasoning_effort\": \"none\", \"temperature\": 0}";
    json_t *j = srv_env_post_ok(&f, "/v1/chat/completions", body);
    // the expected prompt: the chat template applied to the same record
    chat_template *ct;
    ck_assert_ok(chat_template_new(eng_tokenizer(f.e), NULL, &ct));
    json_t *rec = json_loads(body, 0, NULL);
    ds_example ex = {0};
    ck_assert_ok(chat_encode(ct, rec, &ex, NULL));
    tok_ids ids = {.ids = ex.ids, .n = ex.n};
    char *want = srv_env_expected(&f, &ids, 4, 0);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    json_t *msg = json_object_get(c0, "message");
    ck_assert_str_eq(json_string_value(json_object_get(msg, "role")), "assistant");
    ck_assert_str_eq(json_string_value(json_object_get(msg, "content")), want);
    ck_assert_str_eq(json_string_value(json_object_get(j, "object")), "chat.completion");
    ck_assert_int_eq(srv_env_usage(j, "prompt_tokens"), ex.n);
    json_t *content = json_object_get(json_object_get(c0, "logprobs"), "content");
    ck_assert_int_eq(json_array_size(content), 4);
    json_t *e0 = json_array_get(content, 0);
    ck_assert_double_eq_tol(json_real_value(json_object_get(e0, "logprob")), -0.25, 1e-12);
    ck_assert_int_eq(json_array_size(json_object_get(e0, "top_logprobs")), 2);
    ck_assert(json_is_array(json_object_get(e0, "bytes")));
    free(want);
    json_decref(j);
    json_decref(rec);
    ds_example_free(&ex);
    chat_template_free(ct);
    // a bad message is a 400 naming the field
    ck_assert_int_eq(srv_env_call(&f, "POST", "/v1/chat/completions", "{\"messages\": [{\"role\": "
                          "\"robot\", \"content\": \"x\"}]}", NULL, &j, NULL), 400);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "param")),
                     "messages");
    json_decref(j);
    srv_env_stop(&f);
}
END_TEST

// Ill-formed UTF-8 in generated text becomes U+FFFD per maximal subpart: the example of
// the Unicode Standard (chapter 3, "U+FFFD Substitution of Maximal Subparts", table 3-8).
START_TEST(test_text_replacement) {
    const char in[] = "a\xF1\x80\x80\xE1\x80\xC2" "b\x80" "c\x80\xBF" "d";
    json_t *j = srv_jstr(in, sizeof in - 1);
    ck_assert_str_eq(json_string_value(j), "a\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"
                                           "b\xEF\xBF\xBD" "c\xEF\xBF\xBD\xEF\xBF\xBD" "d");
    json_decref(j);
    ck_assert_int_eq(srv_utf8_chars(in, sizeof in - 1), 10);
    j = srv_jstr("caf\xC3\xA9 \xED\xA0\x80", 9); // a surrogate is ill-formed: 3 replacements
    ck_assert_str_eq(json_string_value(j), "caf\xC3\xA9 \xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
    json_decref(j);
}
END_TEST

// Appends the ids of text, or of one control token when text is "[...]".
static void put_ids(const tok_tokenizer *t, srv_choice *ch, const char *text) {
    tok_ids ids = {0};
    if (text[0] == '[' || text[0] == '<') {
        ck_assert_int_ge(tok_special(t, text), 0);
        tok_ids_push(&ids, tok_special(t, text));
    } else {
        ck_assert_ok(tok_encode(t, text, strlen(text), &ids));
    }
    for (size_t i = 0; i < ids.n; i++) {
        ch->lps = realloc(ch->lps, (ch->n_lps + 1) * sizeof *ch->lps);
        ch->lps[ch->n_lps++] = (srv_lp){.token = ids.ids[i]};
    }
    tok_ids_free(&ids);
}

START_TEST(test_chat_tool_calls_and_reasoning) {
    tok_tokenizer *t;
    ck_assert_ok(tok_load(srv_env_tokenizer(), &t));
    srv_server s = {.tok = t};
    srv_job j = {.s = &s};
    srv_choice ch = {.finish = "stop"};
    put_ids(t, &ch, "[TOOL_CALLS]");
    put_ids(t, &ch, "get_weather");
    put_ids(t, &ch, "[ARGS]");
    put_ids(t, &ch, "{\"city\": \"Paris\"}");
    put_ids(t, &ch, "[TOOL_CALLS]");
    put_ids(t, &ch, "now");
    put_ids(t, &ch, "[ARGS]");
    put_ids(t, &ch, "{}");
    put_ids(t, &ch, "</s>");
    const char *finish = ch.finish;
    json_t *m = srv_chat_message(&j, &ch, true, &finish);
    json_t *calls = json_object_get(m, "tool_calls");
    ck_assert_int_eq(json_array_size(calls), 2);
    json_t *f0 = json_object_get(json_array_get(calls, 0), "function");
    ck_assert_str_eq(json_string_value(json_object_get(f0, "name")), "get_weather");
    ck_assert_str_eq(json_string_value(json_object_get(f0, "arguments")), "{\"city\": \"Paris\"}");
    ck_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(json_array_get(calls, 1), "function"), "name")), "now");
    ck_assert(json_is_null(json_object_get(m, "content")));
    ck_assert_str_eq(finish, "tool_calls");
    json_decref(m);
    // without tools in the request the same tokens are plain content
    finish = ch.finish;
    m = srv_chat_message(&j, &ch, false, &finish);
    ck_assert_int_eq(json_array_size(json_object_get(m, "tool_calls")), 0);
    ck_assert_str_eq(finish, "stop");
    json_decref(m);
    free(ch.lps);
    // reasoning first, then the answer
    if (tok_special(t, "[THINK]") >= 0 && tok_special(t, "[/THINK]") >= 0) {
        srv_choice r = {.finish = "stop"};
        put_ids(t, &r, "[THINK]");
        put_ids(t, &r, "Two and two make four.");
        put_ids(t, &r, "[/THINK]");
        put_ids(t, &r, "Four.");
        put_ids(t, &r, "</s>");
        finish = r.finish;
        m = srv_chat_message(&j, &r, false, &finish);
        ck_assert_str_eq(json_string_value(json_object_get(m, "reasoning_content")),
                         "Two and two make four.");
        ck_assert_str_eq(json_string_value(json_object_get(m, "content")), "Four.");
        json_decref(m);
        free(r.lps);
    }
    molt_free(j.piece);
    tok_free(t);
}
END_TEST

int main(void) {
    Suite *s = suite_create("server");
    TCase *tc = tcase_create("http");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_health_models_routes);
    tcase_add_test(tc, test_tokenizer_routes);
    tcase_add_test(tc, test_completions_text);
    tcase_add_test(tc, test_completions_echo_logprobs);
    tcase_add_test(tc, test_completions_stop);
    tcase_add_test(tc, test_streaming);
    tcase_add_test(tc, test_chat);
    tcase_add_test(tc, test_text_replacement);
    tcase_add_test(tc, test_chat_tool_calls_and_reasoning);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
