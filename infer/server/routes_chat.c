// infer/server/routes_chat.c: POST /v1/chat/completions: messages (system, user, assistant
// with tool_calls, tool), tools and reasoning_effort through the Mistral v15 chat template,
// logprobs / top_logprobs in chat's shape, the response (reasoning between [THINK] and
// [/THINK] as reasoning_content, [TOOL_CALLS]name[ARGS]json as tool_calls) and the stream of
// deltas (role first). Not here: the template (data/chat.c), the event drain (gen.c).
#include "srv_internal.h"

#include <math.h>
#include <string.h>
#include <time.h>

bool srv_chat_ids(srv_server *s, const json_t *body, tok_ids *out, srv_error *e) {
    bool cont;
    if (!srv_get_bool(body, "continue_final_message", false, &cont, e))
        return false;
    json_t *rec = json_pack("{s:O*, s:O*, s:O*}", "messages", json_object_get(body, "messages"),
                            "tools", json_object_get(body, "tools"), "reasoning_effort",
                            json_object_get(body, "reasoning_effort"));
    if (!rec)
        return srv_fail(e, 500, NULL, "out of memory");
    json_t *ms = json_object_get(rec, "messages");
    if (cont && json_is_array(ms) && json_array_size(ms)) { // leave the last turn open
        json_t *copy = json_deep_copy(ms);
        json_t *last = json_array_get(copy, json_array_size(copy) - 1);
        if (json_is_object(last))
            json_object_set_new(last, "prefix", json_true());
        json_object_set_new(rec, "messages", copy);
    }
    ds_example ex = {0};
    molt_status st = chat_encode(s->chat, rec, &ex, NULL);
    json_decref(rec);
    bool ok = true;
    if (st != MOLT_OK) {
        const char *m = molt_err_msg(), *f = strstr(m, "field '");
        char param[64] = "messages";
        if (f) {
            size_t k = strcspn(f + 7, "'[.");
            snprintf(param, sizeof param, "%.*s", (int)(k < 63 ? k : 63), f + 7);
        }
        ok = srv_fail(e, 400, param, "%s", m);
    }
    for (size_t i = 0; ok && i < ex.n; i++)
        if (tok_ids_push(out, ex.ids[i]) != MOLT_OK)
            ok = srv_fail(e, 500, NULL, "out of memory");
    ds_example_free(&ex);
    return ok;
}

typedef struct {
    srv_job j;
    srv_req *r;
    char id[48], adapter[SRV_NAME_MAX];
    const char *model;
    bool stream, include_usage, error_sent, tools;
    int top_logprobs;       // -1: no logprobs
} chat;

// ---- logprobs ---------------------------------------------------------------------------

static json_t *bytes_of(srv_job *j, int32_t id) {
    json_t *a = json_array();
    size_t len = 0;
    if (j->piece)
        j->piece[0] = 0;
    if (tok_decode(j->s->tok, &id, 1, &j->piece, &len) == MOLT_OK)
        for (size_t i = 0; i < len; i++)
            json_array_append_new(a, json_integer((unsigned char)j->piece[i]));
    return a;
}

static json_t *lp_item(srv_job *j, int32_t id, double lp) {
    return json_pack("{s:o, s:o, s:o}", "token", srv_token_str(j, id), "logprob", srv_jlp(lp),
                     "bytes", bytes_of(j, id));
}

static json_t *lp_content(chat *c, const srv_lp *l, size_t n) {
    json_t *content = json_array();
    for (size_t i = 0; i < n; i++) {
        json_t *it = lp_item(&c->j, l[i].token, l[i].lp);
        json_t *top = json_array();
        for (int k = 0; k < l[i].n_top && k < c->top_logprobs; k++)
            json_array_append_new(top, lp_item(&c->j, l[i].top_ids[k], l[i].top_lps[k]));
        json_object_set_new(it, "top_logprobs", top);
        json_array_append_new(content, it);
    }
    return json_pack("{s:o}", "content", content);
}

// ---- the whole message ------------------------------------------------------------------

// Text of generated tokens [a, b), special tokens left out.
static json_t *span_text(srv_job *j, const srv_choice *ch, size_t a, size_t b) {
    srv_buf t = {0};
    for (size_t i = a; i < b; i++) {
        int32_t id = ch->lps[i].token;
        size_t len = 0;
        if (tok_is_special(j->s->tok, id))
            continue;
        if (j->piece)
            j->piece[0] = 0;
        if (tok_decode(j->s->tok, &id, 1, &j->piece, &len) == MOLT_OK)
            srv_buf_put(&t, j->piece, len);
    }
    json_t *s = srv_jstr(t.p ? t.p : "", t.n);
    srv_buf_free(&t);
    return s;
}

static size_t find_id(const srv_choice *ch, size_t from, int32_t id) {
    for (size_t i = from; i < ch->n_lps; i++)
        if (ch->lps[i].token == id)
            return i;
    return ch->n_lps;
}

json_t *srv_chat_message(srv_job *j, const srv_choice *ch, bool tools, const char **finish) {
    const tok_tokenizer *t = j->s->tok;
    int32_t think = tok_special(t, "[THINK]"), think_end = tok_special(t, "[/THINK]");
    int32_t calls = tok_special(t, "[TOOL_CALLS]"), args = tok_special(t, "[ARGS]");
    json_t *msg = json_pack("{s:s}", "role", "assistant");
    size_t start = 0, end = ch->n_lps;
    size_t th = think >= 0 ? find_id(ch, 0, think) : end;
    size_t te = think_end >= 0 && th < end ? find_id(ch, th + 1, think_end) : end;
    if (th == 0 && te < end) {
        json_object_set_new(msg, "reasoning_content", span_text(j, ch, th + 1, te));
        start = te + 1;
    }
    size_t tc = tools && calls >= 0 && args >= 0 ? find_id(ch, start, calls) : end;
    if (tc == end || ch->finish == NULL || strcmp(ch->finish, "stop") || ch->stop_reason) {
        // plain text: the choice's text, with any reasoning taken out
        json_object_set_new(msg, "content", start ? span_text(j, ch, start, end)
                                                  : srv_jstr(ch->text.p ? ch->text.p : "",
                                                             ch->text.n));
        json_object_set_new(msg, "tool_calls", json_array());
        return msg;
    }
    json_t *tcs = json_array();
    json_object_set_new(msg, "content", tc > start ? span_text(j, ch, start, tc) : json_null());
    for (size_t k = tc; k < end;) {
        size_t a = find_id(ch, k + 1, args), next = find_id(ch, k + 1, calls);
        if (a >= next)
            break;
        char cid[16];
        snprintf(cid, sizeof cid, "%09zu", (size_t)json_array_size(tcs) + 1000u * (size_t)ch->index);
        json_array_append_new(tcs, json_pack("{s:s, s:s, s:{s:o, s:o}}", "id", cid, "type",
                                             "function", "function", "name",
                                             span_text(j, ch, k + 1, a), "arguments",
                                             span_text(j, ch, a + 1, next)));
        k = next;
    }
    json_object_set_new(msg, "tool_calls", tcs);
    if (json_array_size(tcs))
        *finish = "tool_calls";
    return msg;
}

static json_t *envelope(chat *c, const char *object, json_t *choices) {
    return json_pack("{s:s, s:s, s:I, s:s, s:o}", "id", c->id, "object", object, "created",
                     (json_int_t)time(NULL), "model", c->model, "choices", choices);
}

static json_t *full_response(chat *c) {
    json_t *choices = json_array();
    for (int i = 0; i < c->j.n_choices; i++) {
        srv_choice *ch = &c->j.c[i];
        const char *finish = ch->finish;
        json_t *msg = srv_chat_message(&c->j, ch, c->tools, &finish);
        json_array_append_new(
            choices, json_pack("{s:i, s:o, s:o, s:s?, s:O}", "index", ch->index, "message", msg,
                               "logprobs",
                               c->top_logprobs >= 0 ? lp_content(c, ch->lps, ch->n_lps)
                                                    : json_null(),
                               "finish_reason", finish, "stop_reason",
                               ch->stop_reason ? ch->stop_reason : json_null()));
    }
    json_t *out = envelope(c, "chat.completion", choices);
    json_object_set_new(out, "usage", srv_job_usage(&c->j));
    return out;
}

// ---- the stream -------------------------------------------------------------------------


static bool chunk(chat *c, srv_choice *ch, srv_buf *out) {
    srv_job *j = &c->j;
    size_t ready = srv_choice_ready(j, ch);
    bool final = ch->done && ready == ch->text.n && !ch->finish_sent && !ch->err.status;
    bool first = !ch->first_sent;
    if (!first && ready == ch->sent && ch->lps_sent == ch->n_lps && !final)
        return false;
    json_t *delta = json_object();
    if (first)
        json_object_set_new(delta, "role", json_string("assistant"));
    if (first || ready > ch->sent)
        json_object_set_new(delta, "content", srv_jstr(ch->text.p ? ch->text.p + ch->sent : "",
                                                       ready - ch->sent));
    json_t *lp = c->top_logprobs >= 0 && ch->n_lps > ch->lps_sent
                     ? lp_content(c, ch->lps + ch->lps_sent, ch->n_lps - ch->lps_sent)
                     : json_null();
    ch->sent = ready;
    ch->lps_sent = ch->n_lps;
    ch->first_sent = true;
    ch->finish_sent = final;
    json_t *choice = json_pack("{s:i, s:o, s:o, s:o, s:O}", "index", ch->index, "delta", delta,
                               "logprobs", lp, "finish_reason",
                               final && ch->finish ? json_string(ch->finish) : json_null(),
                               "stop_reason",
                               final && ch->stop_reason ? ch->stop_reason : json_null());
    return srv_put_event(out, envelope(c, "chat.completion.chunk", json_pack("[o]", choice)));
}

static bool chunk_cb(void *ctx, srv_choice *ch, srv_buf *out) { return chunk(ctx, ch, out); }
static json_t *envelope_cb(void *ctx, json_t *choices) {
    return envelope(ctx, "chat.completion.chunk", choices);
}

static int pump(void *ctx, srv_buf *out) {
    chat *c = ctx;
    srv_stream_fmt f = {chunk_cb, envelope_cb, c->include_usage};
    return srv_stream_pump(&c->j, c->r, &f, c, &c->error_sent, out);
}

static void chat_free(chat *c) {
    srv_req *r = c->r;
    long prompt = c->j.n_prompts ? (long)c->j.prompts[0].n : 0, gen = 0;
    for (int i = 0; i < c->j.n_choices; i++)
        gen += c->j.c[i].n_gen;
    r->prompt_tokens = prompt;
    r->completion_tokens = gen;
    srv_metrics_tokens(&r->s->m, prompt, gen);
    srv_job_free(&c->j);
    molt_free(c);
}

static void stream_done(void *ctx) { chat_free(ctx); }

static bool parse(chat *c, const json_t *body, srv_error *e) {
    long long max_tokens, mct, top;
    bool logprobs;
    const json_t *so = json_object_get(body, "stream_options");
    if (!srv_resolve_model(c->j.s, body, &c->j.adapter, &c->model, e) ||
        !srv_job_parse(&c->j, body, e) || !srv_get_bool(body, "stream", false, &c->stream, e) ||
        !srv_get_int(body, "max_tokens", 1, INT32_MAX, -1, &max_tokens, e) ||
        !srv_get_int(body, "max_completion_tokens", 1, INT32_MAX, -1, &mct, e) ||
        !srv_get_bool(body, "logprobs", false, &logprobs, e) ||
        !srv_get_int(body, "top_logprobs", 0, ENG_MAX_LOGPROBS, 0, &top, e) ||
        (so && !json_is_null(so) && !json_is_object(so) &&
         !srv_fail(e, 400, "stream_options", "field 'stream_options' must be an object")) ||
        !srv_get_bool(so, "include_usage", false, &c->include_usage, e))
        return false;
    const json_t *tools = json_object_get(body, "tools");
    c->tools = json_array_size(tools) > 0;
    c->top_logprobs = logprobs ? (int)top : -1;
    c->j.rq.logprobs = logprobs ? (int)top : -1;
    c->j.prompts = molt_calloc(1, sizeof *c->j.prompts);
    if (!c->j.prompts)
        return srv_fail(e, 500, NULL, "out of memory");
    c->j.n_prompts = 1;
    if (!srv_chat_ids(c->j.s, body, &c->j.prompts[0], e))
        return false;
    long long room = (long long)eng_max_model_len(c->j.s->eng) - (long long)c->j.prompts[0].n;
    long long want = mct > 0 ? mct : max_tokens;
    if (want < 0) // as vLLM: what the context leaves
        want = room > 0 ? room : 1;
    c->j.rq.max_tokens = (int)want;
    return true;
}

enum MHD_Result srv_route_chat(srv_req *r, json_t *body) {
    srv_error e = {0};
    chat *c = molt_calloc(1, sizeof *c);
    if (!c) {
        srv_fail(&e, 500, NULL, "out of memory");
        return srv_reply_error(r, &e);
    }
    c->r = r;
    c->j.s = r->s;
    srv_new_id(r->s, "chatcmpl", c->id, sizeof c->id);
    snprintf(r->id, sizeof r->id, "%s", c->id);
    bool ok = parse(c, body, &e);
    if (c->model)
        snprintf(r->model, sizeof r->model, "%s", c->model);
    c->model = r->model;
    if (ok && c->j.adapter) {
        snprintf(c->adapter, sizeof c->adapter, "%s", c->j.adapter);
        c->j.adapter = c->adapter;
    }
    if (ok)
        ok = srv_job_submit(&c->j, &e);
    if (!ok) {
        chat_free(c);
        return srv_reply_error(r, &e);
    }
    if (c->stream)
        return srv_reply_stream(r, pump, stream_done, c);
    if (!srv_job_wait(&c->j, r)) {
        chat_free(c);
        return MHD_NO;
    }
    enum MHD_Result ret = srv_job_ok(&c->j, &e) ? srv_reply_json(r, 200, full_response(c))
                                                : srv_reply_error(r, &e);
    chat_free(c);
    return ret;
}
