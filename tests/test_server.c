// tests/test_server.c: the HTTP server (infer/server) over real HTTP on a loopback port, with
// the fake engine of tests/harness/fake_engine.c in place of the real one: routes, status
// codes, JSON shapes, streaming framing, usage, logprobs and echo, stop strings, auth, the
// body limit, runtime adapters and their confinement, client disconnects cancelling their
// requests, metrics and the access log. Expected texts come from the tokenizer and chat
// template directly, applied to the fake engine's documented rules (fake_engine.h).
#define _XOPEN_SOURCE 700 // mkdtemp, symlink
#include <check.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "harness/fake_engine.h"
#include "harness/harness.h"
#include "harness/http_client.h"
#include "infer/server/server.h"

static char tok_path[4096];

typedef struct {
    eng_engine *e;
    srv_server *s;
    int port;
    char dir[256];     // scratch directory (adapters, logs)
    FILE *log;
} fixture;

static void start(fixture *f, void (*tweak)(srv_opts *o, fixture *f)) {
    memset(f, 0, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/molt_srv_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(f->dir));
    eng_opts eo;
    eng_opts_default(&eo);
    eo.model_dir = f->dir;
    eo.tokenizer = tok_path;
    eo.max_model_len = 256;
    ck_assert_ok(eng_create(&eo, &f->e));
    ck_assert_ok(eng_start(f->e));
    srv_opts so;
    srv_opts_default(&so);
    so.port = 0;
    so.model_name = "base";
    so.model_path = "/models/base";
    so.access_log = NULL;
    if (tweak)
        tweak(&so, f);
    ck_assert_ok(srv_start(f->e, &so, &f->s));
    f->port = srv_port(f->s);
    ck_assert_int_gt(f->port, 0);
}

static void stop(fixture *f) {
    srv_drain(f->s, 5);
    eng_shutdown(f->e, 0);
    srv_free(f->s);
    eng_free(f->e);
    if (f->log)
        fclose(f->log);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", f->dir);
    ck_assert_int_eq(system(cmd), 0);
}

// POST a JSON body (or GET when body is NULL); returns the status, *out the parsed body.
static int call(fixture *f, const char *method, const char *path, const char *body,
                const char *extra, json_t **out, hc_resp *raw) {
    hc_resp r;
    ck_assert_int_eq(hc_request(f->port, method, path, extra, body, body ? strlen(body) : 0,
                                &r), 0);
    if (out)
        *out = json_loads(r.body, 0, NULL);
    int st = r.status;
    if (raw)
        *raw = r;
    else
        hc_free(&r);
    return st;
}

static json_t *post_ok(fixture *f, const char *path, const char *body) {
    json_t *j;
    hc_resp raw;
    int st = call(f, "POST", path, body, NULL, &j, &raw);
    ck_assert_msg(st == 200, "%s %s -> %d %s", path, body, st, raw.body);
    hc_free(&raw);
    ck_assert_ptr_nonnull(j);
    return j;
}

// The ids the server builds for a text prompt: <s> then the text.
static tok_ids prompt_ids(fixture *f, const char *text) {
    tok_ids ids = {0};
    const tok_tokenizer *t = eng_tokenizer(f->e);
    ck_assert_ok(tok_ids_push(&ids, tok_bos(t)));
    ck_assert_ok(tok_encode(t, text, strlen(text), &ids));
    return ids;
}

// Text of the fake engine's greedy output for prompt ids (shift per adapter), k tokens,
// special tokens left out.
static char *expected_text(fixture *f, const tok_ids *p, int k, int shift) {
    const tok_tokenizer *t = eng_tokenizer(f->e);
    char *buf = NULL;
    size_t len = 0;
    ck_assert_ok(tok_decode(t, NULL, 0, &buf, &len));
    for (int i = 0; i < k; i++) {
        int32_t id = p->ids[((int)p->n - 1 - i) % (int)p->n] + shift;
        if (!tok_is_special(t, id))
            ck_assert_ok(tok_decode(t, &id, 1, &buf, &len));
    }
    return buf;
}

static const char *ctext(const json_t *resp, int i) {
    return json_string_value(json_object_get(json_array_get(json_object_get(resp, "choices"), i),
                                             "text"));
}

static const char *cfield(const json_t *resp, int i, const char *k) {
    return json_string_value(json_object_get(json_array_get(json_object_get(resp, "choices"), i),
                                             k));
}

static long long usage(const json_t *resp, const char *k) {
    return json_integer_value(json_object_get(json_object_get(resp, "usage"), k));
}

// ---- routes -----------------------------------------------------------------------------

START_TEST(test_health_models_routes) {
    fixture f;
    start(&f, NULL);
    ck_assert_int_eq(call(&f, "GET", "/health", NULL, NULL, NULL, NULL), 200);
    json_t *j;
    ck_assert_int_eq(call(&f, "GET", "/v1/models", NULL, NULL, &j, NULL), 200);
    json_t *data = json_object_get(j, "data");
    ck_assert_int_eq(json_array_size(data), 1);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(data, 0), "id")), "base");
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(data, 0), "root")),
                     "/models/base");
    ck_assert(json_is_null(json_object_get(json_array_get(data, 0), "parent")));
    json_decref(j);
    ck_assert_int_eq(call(&f, "GET", "/nope", NULL, NULL, &j, NULL), 404);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "type")),
                     "NotFoundError");
    json_decref(j);
    ck_assert_int_eq(call(&f, "GET", "/v1/completions", NULL, NULL, NULL, NULL), 405);
    // the runtime adapter routes exist only when allowed
    ck_assert_int_eq(call(&f, "POST", "/v1/load_lora_adapter", "{}", NULL, NULL, NULL), 404);
    stop(&f);
}
END_TEST

START_TEST(test_tokenizer_routes) {
    fixture f;
    start(&f, NULL);
    json_t *j = post_ok(&f, "/tokenize", "{\"prompt\": \"Hello world\"}");
    tok_ids ids = prompt_ids(&f, "Hello world");
    json_t *toks = json_object_get(j, "tokens");
    ck_assert_int_eq(json_array_size(toks), ids.n);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "count")), ids.n);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "max_model_len")), 256);
    for (size_t i = 0; i < ids.n; i++)
        ck_assert_int_eq(json_integer_value(json_array_get(toks, i)), ids.ids[i]);
    json_decref(j);
    j = post_ok(&f, "/tokenize", "{\"prompt\": \"Hello world\", \"add_special_tokens\": false, "
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
    j = post_ok(&f, "/detokenize", body);
    ck_assert_str_eq(json_string_value(json_object_get(j, "prompt")), "Hello world");
    json_decref(j);
    ck_assert_int_eq(call(&f, "POST", "/detokenize", "{\"tokens\": [1, -3]}", NULL, &j, NULL),
                     400);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "param")),
                     "tokens");
    json_decref(j);
    // chat messages through the template
    j = post_ok(&f, "/tokenize", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}");
    const tok_tokenizer *t = eng_tokenizer(f.e);
    json_t *toks2 = json_object_get(j, "tokens");
    ck_assert_int_eq(json_integer_value(json_array_get(toks2, 0)), tok_bos(t));
    ck_assert_int_eq(json_integer_value(json_array_get(toks2, json_array_size(toks2) - 1)),
                     tok_special(t, "[/INST]"));
    json_decref(j);
    ck_assert_int_eq(call(&f, "GET", "/tokenizer_info", NULL, NULL, &j, NULL), 200);
    ck_assert_str_eq(json_string_value(json_object_get(j, "eos_token")), "</s>");
    ck_assert_str_eq(json_string_value(json_object_get(j, "bos_token")), "<s>");
    ck_assert(json_is_string(json_object_get(j, "tokenizer_class")));
    json_decref(j);
    tok_ids_free(&ids);
    stop(&f);
}
END_TEST

// ---- completions ------------------------------------------------------------------------

START_TEST(test_completions_text) {
    fixture f;
    start(&f, NULL);
    json_t *j = post_ok(&f, "/v1/completions", "{\"model\": \"base\", \"prompt\": \"Hello "
                                               "there, world\", \"max_tokens\": 4, "
                                               "\"temperature\": 0, \"extra_field\": [1]}");
    tok_ids ids = prompt_ids(&f, "Hello there, world");
    char *want = expected_text(&f, &ids, 4, 0);
    ck_assert_str_eq(ctext(j, 0), want);
    ck_assert_str_eq(cfield(j, 0, "finish_reason"), "length");
    ck_assert_str_eq(json_string_value(json_object_get(j, "object")), "text_completion");
    ck_assert_str_eq(json_string_value(json_object_get(j, "model")), "base");
    ck_assert(!strncmp(json_string_value(json_object_get(j, "id")), "cmpl-", 5));
    ck_assert_int_eq(usage(j, "prompt_tokens"), ids.n);
    ck_assert_int_eq(usage(j, "completion_tokens"), 4);
    ck_assert_int_eq(usage(j, "total_tokens"), ids.n + 4);
    json_decref(j);
    free(want);
    // list of texts, n = 2: choices prompt-major, usage counts each prompt once
    j = post_ok(&f, "/v1/completions", "{\"prompt\": [\"ab cd\", \"Hello there, world\"], "
                                       "\"max_tokens\": 3, \"n\": 2, \"temperature\": 0}");
    ck_assert_int_eq(json_array_size(json_object_get(j, "choices")), 4);
    tok_ids a = prompt_ids(&f, "ab cd");
    char *wa = expected_text(&f, &a, 3, 0), *wb = expected_text(&f, &ids, 3, 0);
    ck_assert_str_eq(ctext(j, 0), wa);
    ck_assert_str_eq(ctext(j, 1), wa);
    ck_assert_str_eq(ctext(j, 2), wb);
    ck_assert_str_eq(ctext(j, 3), wb);
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(json_integer_value(json_object_get(
                             json_array_get(json_object_get(j, "choices"), i), "index")), i);
    ck_assert_int_eq(usage(j, "prompt_tokens"), a.n + ids.n);
    ck_assert_int_eq(usage(j, "completion_tokens"), 12);
    json_decref(j);
    free(wa);
    free(wb);
    // token ids and lists of them: no <s> added
    tok_ids p1 = prompt_ids(&f, "one two three"), p2 = prompt_ids(&f, "four five");
    p1.ids++, p1.n--, p2.ids++, p2.n--; // without the <s>
    char body[512];
    int k = snprintf(body, sizeof body, "{\"prompt\": [[");
    for (size_t i = 0; i < p1.n; i++)
        k += snprintf(body + k, sizeof body - (size_t)k, "%s%d", i ? "," : "", p1.ids[i]);
    k += snprintf(body + k, sizeof body - (size_t)k, "], [");
    for (size_t i = 0; i < p2.n; i++)
        k += snprintf(body + k, sizeof body - (size_t)k, "%s%d", i ? "," : "", p2.ids[i]);
    snprintf(body + k, sizeof body - (size_t)k, "]], \"max_tokens\": 2, \"temperature\": 0}");
    j = post_ok(&f, "/v1/completions", body);
    char *w1 = expected_text(&f, &p1, 2, 0), *w2 = expected_text(&f, &p2, 2, 0);
    ck_assert_str_eq(ctext(j, 0), w1);
    ck_assert_str_eq(ctext(j, 1), w2);
    ck_assert_int_eq(usage(j, "prompt_tokens"), p1.n + p2.n);
    json_decref(j);
    k = snprintf(body, sizeof body, "{\"prompt\": [");
    for (size_t i = 0; i < p1.n; i++)
        k += snprintf(body + k, sizeof body - (size_t)k, "%s%d", i ? "," : "", p1.ids[i]);
    snprintf(body + k, sizeof body - (size_t)k, "], \"max_tokens\": 2, \"temperature\": 0}");
    j = post_ok(&f, "/v1/completions", body);
    ck_assert_str_eq(ctext(j, 0), w1);
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
    json_t *x = post_ok(&f, "/v1/completions", s1), *y = post_ok(&f, "/v1/completions", s1);
    ck_assert_str_eq(ctext(x, 0), ctext(y, 0));
    json_decref(x);
    json_decref(y);
    stop(&f);
}
END_TEST

START_TEST(test_completions_echo_logprobs) {
    fixture f;
    start(&f, NULL);
    json_t *j = post_ok(&f, "/v1/completions", "{\"prompt\": \"Hello there, world\", "
                                               "\"max_tokens\": 1, \"echo\": true, "
                                               "\"logprobs\": 2, \"temperature\": 0}");
    tok_ids ids = prompt_ids(&f, "Hello there, world");
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
    char *gen = expected_text(&f, &ids, 1, 0);
    char want[256];
    snprintf(want, sizeof want, "Hello there, world%s", gen);
    ck_assert_str_eq(ctext(j, 0), want);
    free(gen);
    json_decref(j);
    // max_tokens 0 with echo: the prompt alone (scored when logprobs are asked)
    j = post_ok(&f, "/v1/completions", "{\"prompt\": \"Hello there\", \"max_tokens\": 0, "
                                       "\"echo\": true}");
    ck_assert_str_eq(ctext(j, 0), "Hello there");
    ck_assert_int_eq(usage(j, "completion_tokens"), 0);
    json_decref(j);
    j = post_ok(&f, "/v1/completions", "{\"prompt\": \"Hello there\", \"max_tokens\": 0, "
                                       "\"echo\": true, \"logprobs\": 0}");
    c0 = json_array_get(json_object_get(j, "choices"), 0);
    tl = json_object_get(json_object_get(c0, "logprobs"), "token_logprobs");
    tok_ids h = prompt_ids(&f, "Hello there");
    ck_assert_int_eq(json_array_size(tl), h.n);
    ck_assert_double_eq_tol(json_real_value(json_array_get(tl, 1)), -1.0, 1e-12);
    json_decref(j);
    ck_assert_int_eq(call(&f, "POST", "/v1/completions", "{\"prompt\": \"x\", \"max_tokens\": 0}",
                          NULL, &j, NULL), 400);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "param")),
                     "max_tokens");
    json_decref(j);
    tok_ids_free(&h);
    tok_ids_free(&ids);
    stop(&f);
}
END_TEST

START_TEST(test_completions_stop) {
    fixture f;
    start(&f, NULL);
    // the greedy output of "a b c d e f g" runs backwards: " g f e d ..."
    tok_ids ids = prompt_ids(&f, "a b c d e f g");
    char *full = expected_text(&f, &ids, 8, 0);
    const char *cut = strstr(full, " e");
    ck_assert_ptr_nonnull(cut);
    json_t *j = post_ok(&f, "/v1/completions", "{\"prompt\": \"a b c d e f g\", \"max_tokens\": "
                                               "8, \"stop\": [\"zz\", \" e\"], \"temperature\": 0}");
    ck_assert_int_eq(strlen(ctext(j, 0)), (size_t)(cut - full));
    ck_assert(!strncmp(ctext(j, 0), full, (size_t)(cut - full)));
    ck_assert_str_eq(cfield(j, 0, "finish_reason"), "stop");
    ck_assert_str_eq(cfield(j, 0, "stop_reason"), " e");
    ck_assert_int_lt(usage(j, "completion_tokens"), 8);
    json_decref(j);
    // a stop id: the token is generated, its text is not shown
    char body[256];
    int32_t third = ids.ids[ids.n - 3];
    snprintf(body, sizeof body, "{\"prompt\": \"a b c d e f g\", \"max_tokens\": 8, "
                                "\"stop_token_ids\": [%d], \"temperature\": 0}", third);
    j = post_ok(&f, "/v1/completions", body);
    char *two = expected_text(&f, &ids, 2, 0);
    ck_assert_str_eq(ctext(j, 0), two);
    ck_assert_str_eq(cfield(j, 0, "finish_reason"), "stop");
    ck_assert_int_eq(json_integer_value(json_object_get(
                         json_array_get(json_object_get(j, "choices"), 0), "stop_reason")),
                     third);
    ck_assert_int_eq(usage(j, "completion_tokens"), 3);
    json_decref(j);
    free(two);
    free(full);
    tok_ids_free(&ids);
    stop(&f);
}
END_TEST

// Reads a whole event stream; returns the concatenated "text" (or chat delta content) of
// choice 0 and the parsed events in *events.
static char *read_stream(fixture *f, const char *path, const char *body, json_t **events,
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
    fixture f;
    start(&f, NULL);
    const char *q = "{\"prompt\": \"Hello there, world\", \"max_tokens\": 6, \"stream\": true, "
                    "\"stream_options\": {\"include_usage\": true}, \"temperature\": 0}";
    json_t *ev;
    bool done;
    char *text = read_stream(&f, "/v1/completions", q, &ev, &done);
    ck_assert(done);
    json_t *once = post_ok(&f, "/v1/completions", "{\"prompt\": \"Hello there, world\", "
                                                  "\"max_tokens\": 6, \"temperature\": 0}");
    ck_assert_str_eq(text, ctext(once, 0));
    size_t n = json_array_size(ev);
    ck_assert_int_ge(n, 3);
    json_t *last = json_array_get(ev, n - 1), *before = json_array_get(ev, n - 2);
    ck_assert_int_eq(json_array_size(json_object_get(last, "choices")), 0);
    ck_assert_int_eq(usage(last, "completion_tokens"), 6);
    ck_assert_int_eq(usage(last, "prompt_tokens"), usage(once, "prompt_tokens"));
    ck_assert_str_eq(cfield(before, 0, "finish_reason"), "length");
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
    json_t *whole = post_ok(&f, "/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", "
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
    stop(&f);
}
END_TEST

START_TEST(test_chat) {
    fixture f;
    start(&f, NULL);
    const char *body = "{\"model\": \"base\", \"messages\": [{\"role\": \"system\", \"content\": "
                       "\"Be brief.\"}, {\"role\": \"user\", \"content\": \"What is two plus "
                       "two?\"}], \"max_tokens\": 4, \"logprobs\": true, \"top_logprobs\": 2, "
                       "\"reasoning_effort\": \"none\", \"temperature\": 0}";
    json_t *j = post_ok(&f, "/v1/chat/completions", body);
    // the expected prompt: the chat template applied to the same record
    chat_template *ct;
    ck_assert_ok(chat_template_new(eng_tokenizer(f.e), NULL, &ct));
    json_t *rec = json_loads(body, 0, NULL);
    ds_example ex = {0};
    ck_assert_ok(chat_encode(ct, rec, &ex, NULL));
    tok_ids ids = {.ids = ex.ids, .n = ex.n};
    char *want = expected_text(&f, &ids, 4, 0);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    json_t *msg = json_object_get(c0, "message");
    ck_assert_str_eq(json_string_value(json_object_get(msg, "role")), "assistant");
    ck_assert_str_eq(json_string_value(json_object_get(msg, "content")), want);
    ck_assert_str_eq(json_string_value(json_object_get(j, "object")), "chat.completion");
    ck_assert_int_eq(usage(j, "prompt_tokens"), ex.n);
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
    ck_assert_int_eq(call(&f, "POST", "/v1/chat/completions", "{\"messages\": [{\"role\": "
                          "\"robot\", \"content\": \"x\"}]}", NULL, &j, NULL), 400);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "param")),
                     "messages");
    json_decref(j);
    stop(&f);
}
END_TEST

// ---- bad input and security ---------------------------------------------------------------

static void small_body(srv_opts *o, fixture *f) {
    (void)f;
    o->max_body_bytes = 64;
}

START_TEST(test_bad_input) {
    fixture f;
    start(&f, small_body);
    json_t *j;
    ck_assert_int_eq(call(&f, "POST", "/v1/completions", "{\"prompt\": \"x\",, }", NULL, &j,
                          NULL), 400);
    const char *m = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    ck_assert_ptr_nonnull(strstr(m, "line 1 column"));
    json_decref(j);
    ck_assert_int_eq(call(&f, "POST", "/v1/completions", "{\"prompt\": \"x\", \"max_tokens\": "
                          "\"3\"}", NULL, &j, NULL), 400);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "param")),
                     "max_tokens");
    json_decref(j);
    ck_assert_int_eq(call(&f, "POST", "/v1/completions", "{\"prompt\": \"x\", \"top_p\": 3}",
                          NULL, &j, NULL), 400);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "param")),
                     "top_p");
    json_decref(j);
    hc_resp raw;
    ck_assert_int_eq(call(&f, "POST", "/v1/completions", "{\"model\": \"nope\", \"prompt\": "
                          "\"x\"}", NULL, NULL, &raw), 404);
    ck_assert_str_eq(raw.body, "{\"error\":{\"message\":\"The model `nope` does not exist.\","
                               "\"type\":\"NotFoundError\",\"param\":\"model\",\"code\":404}}");
    hc_free(&raw);
    ck_assert_int_eq(call(&f, "POST", "/v1/completions", "{\"prompt\": \"x\", \"max_tokens\": "
                          "300}", NULL, &j, NULL), 400);
    m = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    ck_assert_msg(strstr(m, "256") && strstr(m, "302"), "%s", m); // both numbers
    json_decref(j);
    char big[200];
    memset(big, ' ', sizeof big - 1);
    big[sizeof big - 1] = 0;
    big[0] = '{', big[sizeof big - 2] = '}';
    ck_assert_int_eq(call(&f, "POST", "/v1/completions", big, NULL, &j, NULL), 413);
    json_decref(j);
    ck_assert_int_eq(call(&f, "POST", "/v1/completions", "[1, 2]", NULL, NULL, NULL), 400);
    stop(&f);
}
END_TEST

static void with_key(srv_opts *o, fixture *f) {
    (void)f;
    o->api_key = "s3cret";
}

START_TEST(test_auth) {
    fixture f;
    start(&f, with_key);
    ck_assert_int_eq(call(&f, "GET", "/health", NULL, NULL, NULL, NULL), 200);
    json_t *j;
    ck_assert_int_eq(call(&f, "GET", "/v1/models", NULL, NULL, &j, NULL), 401);
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "error"), "code")),
                     401);
    json_decref(j);
    ck_assert_int_eq(call(&f, "GET", "/metrics", NULL, "Authorization: Bearer s3cre\r\n", NULL,
                          NULL), 401);
    ck_assert_int_eq(call(&f, "GET", "/v1/models", NULL, "Authorization: Bearer s3cretX\r\n",
                          NULL, NULL), 401);
    ck_assert_int_eq(call(&f, "POST", "/tokenize", "{\"prompt\": \"a\"}",
                          "Authorization: Basic s3cret\r\n", NULL, NULL), 401);
    ck_assert_int_eq(call(&f, "GET", "/v1/models", NULL, "Authorization: Bearer s3cret\r\n",
                          NULL, NULL), 200);
    stop(&f);
}
END_TEST

// ---- runtime adapters ---------------------------------------------------------------------

static void runtime(srv_opts *o, fixture *f) {
    static char dir[300];
    snprintf(dir, sizeof dir, "%s/adapters", f->dir);
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    o->adapter_dir = dir;
    o->allow_runtime_adapters = true;
}

static void touch(const char *path) {
    FILE *fp = fopen(path, "w");
    ck_assert_ptr_nonnull(fp);
    fclose(fp);
}

START_TEST(test_runtime_adapters) {
    fixture f;
    start(&f, runtime);
    char p[600], body[900], link[600];
    snprintf(p, sizeof p, "%s/adapters/a1.h5", f.dir);
    touch(p);
    snprintf(p, sizeof p, "%s/outside.h5", f.dir);
    touch(p);
    snprintf(link, sizeof link, "%s/adapters/sneaky.h5", f.dir);
    ck_assert_int_eq(symlink(p, link), 0);
    snprintf(p, sizeof p, "%s/adapters/misfit.h5", f.dir);
    touch(p);
    json_t *j;
    hc_resp raw;
    ck_assert_int_eq(call(&f, "POST", "/v1/load_lora_adapter", "{\"lora_name\": \"a1\", "
                          "\"lora_path\": \"a1.h5\"}", NULL, NULL, &raw), 200);
    ck_assert_ptr_nonnull(strstr(raw.body, "a1"));
    hc_free(&raw);
    ck_assert_int_eq(call(&f, "GET", "/v1/models", NULL, NULL, &j, NULL), 200);
    json_t *card = json_array_get(json_object_get(j, "data"), 1);
    ck_assert_str_eq(json_string_value(json_object_get(card, "id")), "a1");
    ck_assert_str_eq(json_string_value(json_object_get(card, "parent")), "base");
    ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(card, "root")), "a1.h5"));
    json_decref(j);
    // model = adapter: the first registered adapter shifts ids by 1
    j = post_ok(&f, "/v1/completions", "{\"model\": \"a1\", \"prompt\": \"Hello there, world\", "
                                       "\"max_tokens\": 3, \"temperature\": 0}");
    tok_ids ids = prompt_ids(&f, "Hello there, world");
    char *want = expected_text(&f, &ids, 3, 1);
    ck_assert_str_eq(ctext(j, 0), want);
    ck_assert_str_eq(json_string_value(json_object_get(j, "model")), "a1");
    free(want);
    tok_ids_free(&ids);
    json_decref(j);
    ck_assert_int_eq(call(&f, "POST", "/v1/load_lora_adapter", "{\"lora_name\": \"a1\", "
                          "\"lora_path\": \"a1.h5\"}", NULL, NULL, NULL), 400);
    ck_assert_int_eq(call(&f, "POST", "/v1/load_lora_adapter", "{\"lora_name\": \"base\", "
                          "\"lora_path\": \"a1.h5\"}", NULL, NULL, NULL), 400);
    snprintf(body, sizeof body, "{\"lora_name\": \"o\", \"lora_path\": \"%s/outside.h5\"}", f.dir);
    ck_assert_int_eq(call(&f, "POST", "/v1/load_lora_adapter", body, NULL, NULL, NULL), 403);
    ck_assert_int_eq(call(&f, "POST", "/v1/load_lora_adapter", "{\"lora_name\": \"o\", "
                          "\"lora_path\": \"../outside.h5\"}", NULL, NULL, NULL), 403);
    ck_assert_int_eq(call(&f, "POST", "/v1/load_lora_adapter", "{\"lora_name\": \"o\", "
                          "\"lora_path\": \"sneaky.h5\"}", NULL, NULL, NULL), 403);
    ck_assert_int_eq(call(&f, "POST", "/v1/load_lora_adapter", "{\"lora_name\": \"o\", "
                          "\"lora_path\": \"missing.h5\"}", NULL, NULL, NULL), 404);
    ck_assert_int_eq(call(&f, "POST", "/v1/load_lora_adapter", "{\"lora_name\": \"m\", "
                          "\"lora_path\": \"misfit.h5\"}", NULL, &j, NULL), 400);
    ck_assert_ptr_nonnull(strstr(json_string_value(json_object_get(json_object_get(j, "error"),
                                                                   "message")),
                                 "lora_A.weight"));
    json_decref(j);
    ck_assert_int_eq(call(&f, "POST", "/v1/load_lora_adapter", "{\"lora_name\": 5}", NULL, &j,
                          NULL), 400);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "param")),
                     "lora_name");
    json_decref(j);
    ck_assert_int_eq(call(&f, "POST", "/v1/unload_lora_adapter", "{\"lora_name\": \"a1\"}", NULL,
                          NULL, NULL), 200);
    ck_assert_int_eq(call(&f, "POST", "/v1/unload_lora_adapter", "{\"lora_name\": \"a1\"}", NULL,
                          NULL, NULL), 404);
    ck_assert_int_eq(call(&f, "POST", "/v1/completions", "{\"model\": \"a1\", \"prompt\": \"x\"}",
                          NULL, NULL, NULL), 404);
    stop(&f);
}
END_TEST

// ---- disconnects, metrics, access log -----------------------------------------------------

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static bool wait_for(bool (*cond)(long), long arg, double seconds) {
    for (int i = 0; i < (int)(seconds * 100); i++) {
        if (cond(arg))
            return true;
        sleep_ms(10);
    }
    return cond(arg);
}
static bool cancels_above(long n) { return fake_eng_cancels() > n && fake_eng_live() == 0; }

START_TEST(test_disconnect_cancels) {
    fixture f;
    start(&f, NULL);
    fake_eng_set_step_ms(20);
    const char *q = "{\"prompt\": \"Hello there, world\", \"max_tokens\": 200, \"stream\": true, "
                    "\"ignore_eos\": true}";
    long before = fake_eng_cancels();
    hc_stream s;
    ck_assert_int_eq(hc_stream_open(f.port, "POST", "/v1/completions", NULL, q, strlen(q), &s),
                     0);
    ck_assert_int_eq(s.status, 200);
    char buf[4096];
    ck_assert_int_gt(hc_stream_read(&s, buf, sizeof buf), 0); // the stream has started
    hc_stream_close(&s);
    ck_assert_msg(wait_for(cancels_above, before, 10), "no cancel after the client left");
    // the same for a request that is not streamed: the client sends it and leaves
    before = fake_eng_cancels();
    const char *q2 = "{\"prompt\": \"Hello there\", \"max_tokens\": 200, \"ignore_eos\": true}";
    int fd = hc_send(f.port, "POST", "/v1/completions", NULL, q2, strlen(q2));
    ck_assert_int_ge(fd, 0);
    sleep_ms(100);
    close(fd);
    ck_assert_msg(wait_for(cancels_above, before, 10), "no cancel after the client left");
    fake_eng_set_step_ms(1);
    stop(&f);
}
END_TEST

static bool live_zero(long unused) {
    (void)unused;
    return fake_eng_live() == 0;
}

static void to_log(srv_opts *o, fixture *f) {
    char path[300];
    snprintf(path, sizeof path, "%s/access.log", f->dir);
    f->log = fopen(path, "w");
    ck_assert_ptr_nonnull(f->log);
    o->access_log = f->log;
}

// The value of a metric line "NAME VALUE" (exact name with labels), or -1.
static double metric(const char *text, const char *name) {
    size_t n = strlen(name);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
        if (!strncmp(p, name, n) && p[n] == ' ')
            return atof(p + n + 1);
    return -1;
}

START_TEST(test_metrics_and_log) {
    fixture f;
    start(&f, to_log);
    for (int i = 0; i < 3; i++)
        json_decref(post_ok(&f, "/v1/completions", "{\"prompt\": \"Hello there\", "
                                                   "\"max_tokens\": 3}"));
    ck_assert_int_eq(call(&f, "GET", "/nope", NULL, NULL, NULL, NULL), 404);
    ck_assert(wait_for(live_zero, 0, 5));
    hc_resp r;
    ck_assert_int_eq(call(&f, "GET", "/metrics", NULL, NULL, NULL, &r), 200);
    ck_assert_double_eq(metric(r.body, "molt_requests_total{status=\"200\"}"), 3);
    ck_assert_double_eq(metric(r.body, "molt_requests_total{status=\"404\"}"), 1);
    ck_assert_double_eq(metric(r.body, "molt_generation_tokens_total"), 9);
    ck_assert_double_eq(metric(r.body, "molt_time_to_first_token_seconds_count"), 3);
    ck_assert_double_eq(metric(r.body, "molt_inter_token_latency_seconds_count"), 6);
    ck_assert_double_eq(metric(r.body, "molt_time_to_first_token_seconds_bucket{le=\"+Inf\"}"),
                        3);
    ck_assert_double_eq(metric(r.body, "molt_kv_blocks_used"), 0);
    ck_assert_double_gt(metric(r.body, "molt_kv_blocks_total"), 0);
    ck_assert_double_eq(metric(r.body, "molt_num_requests_running"), 0);
    ck_assert_double_eq(metric(r.body, "molt_adapters_loaded"), 0);
    ck_assert_ptr_nonnull(strstr(r.body, "# TYPE molt_time_to_first_token_seconds histogram"));
    hc_free(&r);
    // one JSON line per request answered so far (the /metrics one may still be in flight)
    fflush(f.log);
    char path[300], line[2048];
    snprintf(path, sizeof path, "%s/access.log", f.dir);
    FILE *lf = fopen(path, "r");
    ck_assert_ptr_nonnull(lf);
    int n = 0, n200 = 0;
    while (fgets(line, sizeof line, lf)) {
        json_t *j = json_loads(line, 0, NULL);
        ck_assert_msg(j != NULL, "not JSON: %s", line);
        ck_assert(json_is_string(json_object_get(j, "path")));
        ck_assert(json_is_number(json_object_get(j, "duration_s")));
        if (json_integer_value(json_object_get(j, "status")) == 200 &&
            !strcmp(json_string_value(json_object_get(j, "path")), "/v1/completions")) {
            n200++;
            ck_assert_int_eq(json_integer_value(json_object_get(j, "completion_tokens")), 3);
            ck_assert_str_eq(json_string_value(json_object_get(j, "model")), "base");
        }
        n++;
        json_decref(j);
    }
    fclose(lf);
    ck_assert_int_ge(n, 4);
    ck_assert_int_eq(n200, 3);
    stop(&f);
}
END_TEST

// ---- molt serve: flags, config file, start-up lines, SIGTERM drain ------------------------

// Runs srv_cmd_serve in a child whose stdout comes back through *out_fd.
static pid_t serve_child(char **argv, int argc, int *out_fd, const char *errpath) {
    int p[2];
    ck_assert_int_eq(pipe(p), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        dup2(p[1], 1);
        close(p[0]);
        close(p[1]);
        if (errpath && !freopen(errpath, "w", stderr))
            _exit(99);
        int rc = srv_cmd_serve(argc, argv);
        fflush(NULL);
        _exit(rc);
    }
    close(p[1]);
    *out_fd = p[0];
    return pid;
}

// Reads the child's stdout until the "listening on" line; returns everything read.
static char *read_startup(int fd, int *port) {
    char *buf = calloc(1, 8192);
    size_t n = 0;
    char *at = NULL;
    while (!at || !strchr(at, '\n')) {
        ssize_t k = read(fd, buf + n, 8191 - n);
        ck_assert_msg(k > 0, "the server exited before listening: %s", buf);
        n += (size_t)k;
        at = strstr(buf, "listening on http://127.0.0.1:");
    }
    *port = atoi(at + strlen("listening on http://127.0.0.1:"));
    return buf;
}

static int exit_status(pid_t pid) {
    int st;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert(WIFEXITED(st));
    return WEXITSTATUS(st);
}

START_TEST(test_serve_command_drain) {
    char dir[] = "/tmp/molt_serve_XXXXXX", cfg[300], ad[300], errp[300];
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(ad, sizeof ad, "%s/ad1.h5", dir);
    touch(ad);
    snprintf(cfg, sizeof cfg, "%s/serve.yaml", dir);
    FILE *c = fopen(cfg, "w");
    fprintf(c, "served-model-name: mymodel\napi_key: k1\nshutdown-grace-s: 20\n"
               "adapter:\n  - ad1=%s\nport: 9\nmax-model-len: 200\n", ad);
    fclose(c);
    snprintf(errp, sizeof errp, "%s/stderr", dir);
    char *argv[] = {"serve", "--model", dir, "--tokenizer", tok_path, "--config", cfg,
                    "--port", "0", "--access-log", "none", NULL};
    fake_eng_set_step_ms(20);
    int out, port;
    pid_t pid = serve_child(argv, 11, &out, errp);
    char *startup = read_startup(out, &port);
    ck_assert_ptr_nonnull(strstr(startup, "served as \"mymodel\""));
    ck_assert_ptr_nonnull(strstr(startup, "1 adapter:"));
    ck_assert_ptr_nonnull(strstr(startup, "ad1 = "));
    ck_assert_ptr_nonnull(strstr(startup, "KV cache 32768 tokens"));
    ck_assert_ptr_nonnull(strstr(startup, "max model len 200"));
    free(startup);
    hc_resp r;
    ck_assert_int_eq(hc_request(port, "GET", "/v1/models", "Authorization: Bearer k1\r\n", NULL,
                                0, &r), 0);
    ck_assert_int_eq(r.status, 200);
    ck_assert_ptr_nonnull(strstr(r.body, "\"mymodel\""));
    hc_free(&r);
    // a stream in flight when SIGTERM comes runs to its end
    const char *q = "{\"model\": \"ad1\", \"prompt\": \"Hello there\", \"max_tokens\": 30, "
                    "\"stream\": true, \"ignore_eos\": true}";
    hc_stream s;
    ck_assert_int_eq(hc_stream_open(port, "POST", "/v1/completions",
                                    "Authorization: Bearer k1\r\n", q, strlen(q), &s), 0);
    ck_assert_int_eq(s.status, 200);
    char buf[65536];
    size_t n = 0;
    ssize_t k = hc_stream_read(&s, buf, sizeof buf - 1);
    ck_assert_int_gt(k, 0);
    n = (size_t)k;
    kill(pid, SIGTERM);
    sleep_ms(200);
    hc_resp r2; // no new connections
    ck_assert_int_eq(hc_request(port, "GET", "/health", NULL, NULL, 0, &r2), -1);
    while ((k = hc_stream_read(&s, buf + n, sizeof buf - 1 - n)) > 0)
        n += (size_t)k;
    buf[n] = 0;
    hc_stream_close(&s);
    ck_assert_ptr_nonnull(strstr(buf, "\"finish_reason\":\"length\""));
    ck_assert_ptr_nonnull(strstr(buf, "data: [DONE]\n\n"));
    ck_assert_int_eq(exit_status(pid), 0);
    close(out);
    fake_eng_set_step_ms(1);
    // --help, a bad flag, a bad config key
    char *help[] = {"serve", "--help", NULL};
    pid = serve_child(help, 2, &out, NULL);
    ck_assert_int_eq(exit_status(pid), 0);
    close(out);
    char *badf[] = {"serve", "--model", dir, "--bogus", "1", NULL};
    pid = serve_child(badf, 5, &out, errp);
    ck_assert_int_eq(exit_status(pid), 2);
    close(out);
    c = fopen(cfg, "w");
    fprintf(c, "port: 8000\nbogus-key: 1\n");
    fclose(c);
    char *badc[] = {"serve", "--model", dir, "--config", cfg, NULL};
    pid = serve_child(badc, 5, &out, errp);
    ck_assert_int_eq(exit_status(pid), 2);
    close(out);
    FILE *ef = fopen(errp, "r");
    char line[1024] = "";
    ck_assert_ptr_nonnull(fgets(line, sizeof line, ef));
    fclose(ef);
    ck_assert_msg(strstr(line, "serve.yaml:2") && strstr(line, "bogus-key"), "%s", line);
    snprintf(line, sizeof line, "rm -rf %s", dir);
    ck_assert_int_eq(system(line), 0);
}
END_TEST

// ---- concurrency ----------------------------------------------------------------------------

typedef struct {
    int port, i;
    char text[4096];
    int status;
} conc_arg;

static void *conc_run(void *p) {
    conc_arg *a = p;
    char body[256];
    const char *models[] = {"base", "c1", "c2"};
    snprintf(body, sizeof body, "{\"model\": \"%s\", \"prompt\": \"request %d: the quick "
             "brown fox\", \"max_tokens\": %d, \"temperature\": 0, \"stream\": %s}",
             models[a->i % 3], a->i, 4 + a->i % 5, a->i % 2 ? "true" : "false");
    hc_resp r;
    if (hc_request(a->port, "POST", "/v1/completions", NULL, body, strlen(body), &r))
        return NULL;
    a->status = r.status;
    snprintf(a->text, sizeof a->text, "%s", r.body);
    hc_free(&r);
    return NULL;
}

static void two_adapters(srv_opts *o, fixture *f) {
    (void)o;
    char p[300];
    snprintf(p, sizeof p, "%s/c.h5", f->dir);
    touch(p);
    ck_assert_ok(eng_adapter_add(f->e, "c1", p));
    ck_assert_ok(eng_adapter_add(f->e, "c2", p));
}

START_TEST(test_concurrent_requests) {
    fixture f;
    start(&f, two_adapters);
    enum { N = 24 };
    conc_arg a[N];
    pthread_t th[N];
    for (int i = 0; i < N; i++) {
        a[i] = (conc_arg){.port = f.port, .i = i};
        ck_assert_int_eq(pthread_create(&th[i], NULL, conc_run, &a[i]), 0);
    }
    for (int i = 0; i < N; i++)
        pthread_join(th[i], NULL);
    const tok_tokenizer *t = eng_tokenizer(f.e);
    (void)t;
    for (int i = 0; i < N; i++) {
        ck_assert_int_eq(a[i].status, 200);
        char prompt[64];
        snprintf(prompt, sizeof prompt, "request %d: the quick brown fox", i);
        tok_ids ids = prompt_ids(&f, prompt);
        char *want = expected_text(&f, &ids, 4 + i % 5, i % 3);
        if (i % 2) { // streamed: concatenate the text of the events
            char got[4096] = "";
            for (char *p = strstr(a[i].text, "data: {"); p; p = strstr(p + 1, "data: {")) {
                char *end = strstr(p, "\n\n");
                *end = 0;
                json_t *ev = json_loads(p + 6, 0, NULL);
                *end = '\n';
                const char *tx = ev ? ctext(ev, 0) : NULL;
                if (tx)
                    strcat(got, tx);
                json_decref(ev);
            }
            ck_assert_str_eq(got, want);
        } else {
            json_t *j = json_loads(a[i].text, 0, NULL);
            ck_assert_str_eq(ctext(j, 0), want);
            json_decref(j);
        }
        free(want);
        tok_ids_free(&ids);
    }
    ck_assert(wait_for(live_zero, 0, 5));
    stop(&f);
}
END_TEST

int main(void) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    snprintf(tok_path, sizeof tok_path, "%s/configs/tokenizers/tekken.json", src ? src : ".");
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
    tcase_add_test(tc, test_bad_input);
    tcase_add_test(tc, test_auth);
    tcase_add_test(tc, test_runtime_adapters);
    tcase_add_test(tc, test_disconnect_cancels);
    tcase_add_test(tc, test_metrics_and_log);
    tcase_add_test(tc, test_serve_command_drain);
    tcase_add_test(tc, test_concurrent_requests);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
