// infer/server/routes_completions.c: POST /v1/completions: the prompt in its four shapes
// (text, list of texts, token ids, list of token-id lists), echo, logprobs in the legacy
// shape (tokens, token_logprobs, top_logprobs, text_offset; with echo the prompt's tokens
// too, the first one null), the response and its server-sent-event stream. Not here: the
// sampling fields and the event drain (gen.c).
#include "srv_internal.h"

#include <math.h>
#include <string.h>
#include <time.h>

typedef struct {
    srv_job j;
    srv_req *r;
    char id[48];
    const char *model;
    bool echo, stream, include_usage, error_sent;
    int logprobs;           // -1 none
    char adapter[SRV_NAME_MAX];
    char **echo_text;       // [n_prompts] prompt text (special tokens left out)
    size_t *echo_len, *echo_chars;
} cmpl;

// ---- the prompt -------------------------------------------------------------------------

static bool add_prompt(cmpl *c, tok_ids *p) {
    tok_ids *g = molt_realloc(c->j.prompts, (size_t)(c->j.n_prompts + 1) * sizeof *g);
    if (!g)
        return false;
    c->j.prompts = g;
    g[c->j.n_prompts++] = *p;
    memset(p, 0, sizeof *p);
    return true;
}

static bool token_list(cmpl *c, const json_t *a, const char *field, srv_error *e) {
    tok_ids ids = {0};
    long long V = eng_vocab_size(c->j.s->eng);
    if (!json_array_size(a))
        return srv_fail(e, 400, "prompt", "field '%s' is an empty token list", field);
    for (size_t i = 0; i < json_array_size(a); i++) {
        const json_t *v = json_array_get(a, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= V) {
            tok_ids_free(&ids);
            return srv_fail(e, 400, "prompt", "field '%s[%zu]' must be a token id in [0, %lld)",
                            field, i, V);
        }
        if (tok_ids_push(&ids, (int32_t)json_integer_value(v)) != MOLT_OK) {
            tok_ids_free(&ids);
            return srv_fail(e, 500, NULL, "out of memory");
        }
    }
    if (!add_prompt(c, &ids)) {
        tok_ids_free(&ids);
        return srv_fail(e, 500, NULL, "out of memory");
    }
    return true;
}

static bool text_prompt(cmpl *c, const json_t *v, bool add_bos, srv_error *e) {
    tok_ids ids = {0};
    if (!srv_text_ids(c->j.s, json_string_value(v), json_string_length(v), add_bos, &ids, e) ||
        !add_prompt(c, &ids)) {
        tok_ids_free(&ids);
        return e->status ? false : srv_fail(e, 500, NULL, "out of memory");
    }
    return true;
}

static bool parse_prompt(cmpl *c, const json_t *body, srv_error *e) {
    const json_t *p = json_object_get(body, "prompt");
    bool add_bos;
    if (!srv_get_bool(body, "add_special_tokens", true, &add_bos, e))
        return false;
    if (json_is_string(p))
        return text_prompt(c, p, add_bos, e);
    if (!json_is_array(p) || !json_array_size(p))
        return srv_fail(e, 400, "prompt", "field 'prompt' must be a string, a list of strings, "
                        "a list of token ids or a list of token-id lists");
    const json_t *first = json_array_get(p, 0);
    if (json_is_integer(first))
        return token_list(c, p, "prompt", e);
    char field[48];
    for (size_t i = 0; i < json_array_size(p); i++) {
        const json_t *v = json_array_get(p, i);
        snprintf(field, sizeof field, "prompt[%zu]", i);
        if (json_is_string(first) && json_is_string(v)) {
            if (!text_prompt(c, v, add_bos, e))
                return false;
        } else if (json_is_array(first) && json_is_array(v)) {
            if (!token_list(c, v, field, e))
                return false;
        } else {
            return srv_fail(e, 400, "prompt", "field '%s' must be %s like prompt[0]", field,
                            json_is_string(first) ? "a string" : "a token-id list");
        }
    }
    return true;
}

// The echoed text of every prompt, and the code-point offset of each prompt token in it.
static bool echo_texts(cmpl *c) {
    srv_job *j = &c->j;
    c->echo_text = molt_calloc((size_t)j->n_prompts, sizeof *c->echo_text);
    c->echo_len = molt_calloc((size_t)j->n_prompts, sizeof *c->echo_len);
    c->echo_chars = molt_calloc((size_t)j->n_prompts, sizeof *c->echo_chars);
    if (!c->echo_text || !c->echo_len || !c->echo_chars)
        return false;
    for (int p = 0; p < j->n_prompts; p++) {
        srv_buf b = {0};
        size_t chars = 0;
        for (size_t i = 0; i < j->prompts[p].n; i++) {
            int32_t t = j->prompts[p].ids[i];
            for (int k = 0; k < j->n_choices; k++) // offsets of this prompt's choices
                if (j->c[k].prompt_idx == p && i < (size_t)j->c[k].n_plps)
                    j->c[k].plps[i].text_off = chars;
            if (j->skip_special && tok_is_special(j->s->tok, t))
                continue;
            size_t len = 0, old = b.n;
            if (j->piece)
                j->piece[0] = 0;
            if (tok_decode(j->s->tok, &t, 1, &j->piece, &len) != MOLT_OK ||
                !srv_buf_put(&b, j->piece, len)) {
                srv_buf_free(&b);
                return false;
            }
            chars += srv_utf8_chars(b.p + old, len);
        }
        c->echo_text[p] = b.p;
        c->echo_len[p] = b.n;
        c->echo_chars[p] = chars;
    }
    return true;
}

// ---- logprobs ---------------------------------------------------------------------------

static void add_entries(cmpl *c, json_t *lp, const srv_lp *l, size_t n, size_t off0) {
    json_t *tokens = json_object_get(lp, "tokens"), *tlp = json_object_get(lp, "token_logprobs");
    json_t *top = json_object_get(lp, "top_logprobs"), *offs = json_object_get(lp, "text_offset");
    for (size_t i = 0; i < n; i++) {
        json_t *ts = srv_token_str(&c->j, l[i].token);
        json_array_append(tokens, ts);
        json_array_append_new(tlp, srv_jlp(l[i].lp));
        json_array_append_new(offs, json_integer((json_int_t)(off0 + l[i].text_off)));
        if (isnan(l[i].lp)) {
            json_array_append_new(top, json_null());
        } else {
            json_t *d = json_object();
            json_object_set_new(d, json_string_value(ts), srv_jlp(l[i].lp));
            for (int k = 0; k < l[i].n_top && k < c->logprobs; k++) {
                json_t *as = srv_token_str(&c->j, l[i].top_ids[k]);
                if (!json_object_get(d, json_string_value(as)))
                    json_object_set_new(d, json_string_value(as), srv_jlp(l[i].top_lps[k]));
                json_decref(as);
            }
            json_array_append_new(top, d);
        }
        json_decref(ts);
    }
}

static json_t *new_lp(void) {
    return json_pack("{s:[], s:[], s:[], s:[]}", "text_offset", "token_logprobs", "tokens",
                     "top_logprobs");
}

// ---- responses --------------------------------------------------------------------------

static json_t *choice_json(cmpl *c, const srv_choice *ch, json_t *text, json_t *lp,
                           bool final) {
    return json_pack("{s:i, s:o, s:o, s:o, s:O}", "index", ch->index, "text", text, "logprobs",
                     lp ? lp : json_null(), "finish_reason",
                     final && ch->finish ? json_string(ch->finish) : json_null(), "stop_reason",
                     final && ch->stop_reason ? ch->stop_reason : json_null());
}

static json_t *envelope(cmpl *c, json_t *choices) {
    return json_pack("{s:s, s:s, s:I, s:s, s:o}", "id", c->id, "object", "text_completion",
                     "created", (json_int_t)time(NULL), "model", c->model, "choices", choices);
}

static json_t *full_response(cmpl *c) {
    srv_job *j = &c->j;
    json_t *choices = json_array();
    for (int i = 0; i < j->n_choices; i++) {
        srv_choice *ch = &j->c[i];
        srv_buf t = {0};
        size_t off0 = 0;
        if (c->echo) {
            srv_buf_put(&t, c->echo_text[ch->prompt_idx], c->echo_len[ch->prompt_idx]);
            off0 = c->echo_chars[ch->prompt_idx];
        }
        srv_buf_put(&t, ch->text.p, ch->text.n);
        json_t *lp = NULL;
        if (c->logprobs >= 0) {
            lp = new_lp();
            if (c->echo)
                add_entries(c, lp, ch->plps, (size_t)ch->n_plps, 0);
            add_entries(c, lp, ch->lps, ch->n_lps, off0);
        }
        json_array_append_new(choices, choice_json(c, ch, srv_jstr(t.p ? t.p : "", t.n), lp,
                                                   true));
        srv_buf_free(&t);
    }
    json_t *out = envelope(c, choices);
    json_object_set_new(out, "usage", srv_job_usage(j));
    return out;
}


// One chunk of choice ch when it has something new; true when one was written.
static bool chunk(cmpl *c, srv_choice *ch, srv_buf *out) {
    srv_job *j = &c->j;
    bool echo_now = c->echo && !ch->first_sent &&
                    (!j->want_prompt_lps || ch->plps_recv >= ch->n_plps - 1 || ch->done);
    if (c->echo && !ch->first_sent && !echo_now)
        return false;
    size_t ready = srv_choice_ready(j, ch);
    bool final = ch->done && ready == ch->text.n && !ch->finish_sent && !ch->err.status;
    if (!echo_now && ready == ch->sent && ch->lps_sent == ch->n_lps && !final)
        return false;
    srv_buf t = {0};
    json_t *lp = c->logprobs >= 0 ? new_lp() : NULL;
    size_t off0 = c->echo ? c->echo_chars[ch->prompt_idx] : 0;
    if (echo_now) {
        srv_buf_put(&t, c->echo_text[ch->prompt_idx], c->echo_len[ch->prompt_idx]);
        if (lp)
            add_entries(c, lp, ch->plps, (size_t)ch->n_plps, 0);
        ch->first_sent = true;
    }
    srv_buf_put(&t, ch->text.p + ch->sent, ready - ch->sent);
    if (lp)
        add_entries(c, lp, ch->lps + ch->lps_sent, ch->n_lps - ch->lps_sent, off0);
    ch->sent = ready;
    ch->lps_sent = ch->n_lps;
    ch->finish_sent = final;
    srv_put_event(out, envelope(c, json_pack("[o]", choice_json(c, ch, srv_jstr(t.p ? t.p : "", t.n),
                                                           lp, final))));
    srv_buf_free(&t);
    return true;
}

static bool chunk_cb(void *ctx, srv_choice *ch, srv_buf *out) { return chunk(ctx, ch, out); }
static json_t *envelope_cb(void *ctx, json_t *choices) { return envelope(ctx, choices); }

static int pump(void *ctx, srv_buf *out) {
    cmpl *c = ctx;
    srv_stream_fmt f = {chunk_cb, envelope_cb, c->include_usage};
    return srv_stream_pump(&c->j, c->r, &f, c, &c->error_sent, out);
}

static void cmpl_free(cmpl *c) {
    srv_req *r = c->r;
    long prompt = 0, gen = 0;
    for (int p = 0; p < c->j.n_prompts; p++)
        prompt += (long)c->j.prompts[p].n;
    for (int i = 0; i < c->j.n_choices; i++)
        gen += c->j.c[i].n_gen;
    r->prompt_tokens = prompt;
    r->completion_tokens = gen;
    srv_metrics_tokens(&r->s->m, prompt, gen);
    for (int p = 0; c->echo_text && p < c->j.n_prompts; p++)
        molt_free(c->echo_text[p]);
    molt_free(c->echo_text);
    molt_free(c->echo_len);
    molt_free(c->echo_chars);
    srv_job_free(&c->j);
    molt_free(c);
}

static void stream_done(void *ctx) { cmpl_free(ctx); }

static bool parse(cmpl *c, const json_t *body, srv_error *e) {
    long long max_tokens, logprobs;
    bool stream;
    const json_t *so = json_object_get(body, "stream_options");
    if (!srv_resolve_model(c->j.s, body, &c->j.adapter, &c->model, e) ||
        !srv_job_parse(&c->j, body, e) ||
        !srv_get_bool(body, "echo", false, &c->echo, e) ||
        !srv_get_bool(body, "stream", false, &stream, e) ||
        !srv_get_int(body, "max_tokens", 0, INT32_MAX, 16, &max_tokens, e) ||
        !srv_get_int(body, "logprobs", 0, ENG_MAX_LOGPROBS, -1, &logprobs, e) ||
        (so && !json_is_null(so) && !json_is_object(so) &&
         !srv_fail(e, 400, "stream_options", "field 'stream_options' must be an object")) ||
        !srv_get_bool(so, "include_usage", false, &c->include_usage, e))
        return false;
    if (max_tokens == 0 && !c->echo)
        return srv_fail(e, 400, "max_tokens", "field 'max_tokens' must be at least 1 (0 only "
                        "with echo)");
    c->stream = stream;
    c->logprobs = (int)logprobs;
    c->j.rq.max_tokens = (int)max_tokens;
    c->j.rq.logprobs = (int)logprobs;
    c->j.want_prompt_lps = c->echo && logprobs >= 0;
    return parse_prompt(c, body, e);
}

enum MHD_Result srv_route_completions(srv_req *r, json_t *body) {
    srv_error e = {0};
    cmpl *c = molt_calloc(1, sizeof *c);
    if (!c) {
        srv_fail(&e, 500, NULL, "out of memory");
        return srv_reply_error(r, &e);
    }
    c->r = r;
    c->j.s = r->s;
    srv_new_id(r->s, "cmpl", c->id, sizeof c->id);
    snprintf(r->id, sizeof r->id, "%s", c->id);
    bool ok = parse(c, body, &e);
    if (c->model)
        snprintf(r->model, sizeof r->model, "%s", c->model);
    c->model = r->model;
    if (ok && c->j.adapter) { // the body goes away before a stream ends
        snprintf(c->adapter, sizeof c->adapter, "%s", c->j.adapter);
        c->j.adapter = c->adapter;
    }
    if (ok)
        ok = srv_job_submit(&c->j, &e);
    if (ok && c->echo && !echo_texts(c))
        ok = srv_fail(&e, 500, NULL, "out of memory");
    if (!ok) {
        cmpl_free(c);
        return srv_reply_error(r, &e);
    }
    if (c->stream)
        return srv_reply_stream(r, pump, stream_done, c);
    if (!srv_job_wait(&c->j, r)) {
        cmpl_free(c);
        return MHD_NO; // the client left: close the connection
    }
    enum MHD_Result ret = srv_job_ok(&c->j, &e) ? srv_reply_json(r, 200, full_response(c))
                                                : srv_reply_error(r, &e);
    cmpl_free(c);
    return ret;
}
