// infer/server/gen.c: one generation job of the completions and chat routes: its sampling
// fields, the submission of every choice (prompt x n) to the engine, and the drain of their
// event queues into text (complete UTF-8 characters, special tokens left out unless asked),
// log-probabilities, stop strings (text cut before the match, the request cancelled) and the
// usage counts and latency metrics. Not here: the shapes of the responses (routes_*.c).
#include "srv_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

// ---- request fields ---------------------------------------------------------------------

static bool parse_stops(srv_job *j, const json_t *body, srv_error *e) {
    const json_t *st = json_object_get(body, "stop");
    if (!st || json_is_null(st))
        return true;
    if (!json_is_string(st) && !json_is_array(st))
        return srv_fail(e, 400, "stop", "field 'stop' must be a string or a list of strings");
    size_t n = json_is_string(st) ? 1 : json_array_size(st);
    j->stops = molt_calloc(n ? n : 1, sizeof *j->stops);
    if (!j->stops)
        return srv_fail(e, 500, NULL, "out of memory");
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_is_string(st) ? st : json_array_get(st, i);
        if (!json_is_string(v))
            return srv_fail(e, 400, "stop", "field 'stop[%zu]' must be a string", i);
        if (!json_string_length(v))
            continue; // an empty stop string matches nothing, as in vLLM
        j->stops[j->n_stops] = molt_strdup(json_string_value(v));
        if (!j->stops[j->n_stops])
            return srv_fail(e, 500, NULL, "out of memory");
        size_t len = json_string_length(v);
        j->max_stop = len > j->max_stop ? len : j->max_stop;
        j->n_stops++;
    }
    return true;
}

static bool parse_stop_ids(srv_job *j, const json_t *body, srv_error *e) {
    const json_t *st = json_object_get(body, "stop_token_ids");
    if (!st || json_is_null(st))
        return true;
    if (!json_is_array(st))
        return srv_fail(e, 400, "stop_token_ids", "field 'stop_token_ids' must be a list of "
                        "token ids");
    size_t n = json_array_size(st);
    int32_t *ids = molt_malloc((n ? n : 1) * sizeof *ids);
    if (!ids)
        return srv_fail(e, 500, NULL, "out of memory");
    j->rq.stop_ids = ids;
    j->rq.n_stop_ids = (int)n;
    long long V = eng_vocab_size(j->s->eng);
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_array_get(st, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= V)
            return srv_fail(e, 400, "stop_token_ids", "field 'stop_token_ids[%zu]' must be a "
                            "token id in [0, %lld)", i, V);
        ids[i] = (int32_t)json_integer_value(v);
    }
    return true;
}

bool srv_job_parse(srv_job *j, const json_t *body, srv_error *e) {
    eng_request_default(&j->rq);
    inf_sample_opts *so = &j->rq.sample;
    double top_p;
    long long top_k, n, seed;
    bool ignore_eos;
    if (!srv_get_num(body, "temperature", 0, 1e6, 1.0, &so->temperature, e) ||
        !srv_get_num(body, "top_p", 0, 1, 1.0, &top_p, e) ||
        !srv_get_int(body, "top_k", -1, INT32_MAX, 0, &top_k, e) ||
        !srv_get_int(body, "n", 1, 128, 1, &n, e) ||
        !srv_get_int(body, "seed", INT64_MIN, INT64_MAX, 0, &seed, e) ||
        !srv_get_bool(body, "ignore_eos", false, &ignore_eos, e) ||
        !srv_get_bool(body, "skip_special_tokens", true, &j->skip_special, e))
        return false;
    if (top_p <= 0)
        return srv_fail(e, 400, "top_p", "field 'top_p' must be in (0, 1], got %g", top_p);
    so->top_p = top_p;
    so->top_k = top_k < 0 ? 0 : (int)top_k;
    const json_t *sj = json_object_get(body, "seed");
    if (sj && !json_is_null(sj))
        so->seed = (uint64_t)seed;
    else if (getrandom(&so->seed, sizeof so->seed, 0) != (ssize_t)sizeof so->seed)
        so->seed = (uint64_t)time(NULL) ^ (uint64_t)atomic_fetch_add(&j->s->next_id, 1);
    j->rq.ignore_eos = ignore_eos;
    j->n = (int)n;
    return parse_stops(j, body, e) && parse_stop_ids(j, body, e);
}

// ---- submission -------------------------------------------------------------------------

static bool choice_lps_init(srv_job *j, srv_choice *c) {
    const tok_ids *p = &j->prompts[c->prompt_idx];
    c->plps = molt_calloc(p->n, sizeof *c->plps);
    if (!c->plps)
        return false;
    c->n_plps = (int)p->n;
    for (size_t i = 0; i < p->n; i++) {
        c->plps[i].token = p->ids[i];
        c->plps[i].lp = NAN;
    }
    return true;
}

static bool submit_error(srv_job *j, molt_status st, srv_error *e) {
    const char *msg = molt_err_msg();
    if (st == MOLT_EUNSUPPORTED)
        return srv_fail(e, 503, NULL, "%s", msg);
    if (st == MOLT_EARG && j->adapter && !eng_adapter_exists(j->s->eng, j->adapter))
        return srv_fail(e, 404, "model", "The model `%s` does not exist.", j->adapter);
    return srv_fail(e, st == MOLT_EARG ? 400 : 500, NULL, "%s", msg);
}

bool srv_job_submit(srv_job *j, srv_error *e) {
    int max_len = eng_max_model_len(j->s->eng);
    for (int p = 0; p < j->n_prompts; p++) {
        long long total = (long long)j->prompts[p].n + j->rq.max_tokens;
        if (total > max_len)
            return srv_fail(e, 400, "max_tokens", "This model's maximum context length is %d "
                            "tokens. However, you requested %lld tokens (%zu in the prompt, "
                            "%d in the completion). Please reduce the length of the prompt "
                            "or max_tokens.", max_len, total, j->prompts[p].n,
                            j->rq.max_tokens);
    }
    j->n_choices = j->n_prompts * j->n;
    j->c = molt_calloc((size_t)j->n_choices, sizeof *j->c);
    if (!j->c)
        return srv_fail(e, 500, NULL, "out of memory");
    j->t_submit = srv_now();
    uint64_t seed0 = j->rq.sample.seed;
    for (int i = 0; i < j->n_choices; i++) {
        srv_choice *c = &j->c[i];
        c->index = i;
        c->prompt_idx = i / j->n;
        if (!choice_lps_init(j, c))
            return srv_fail(e, 500, NULL, "out of memory");
        if (j->rq.max_tokens == 0 && !j->want_prompt_lps) { // echo alone: nothing to run
            c->done = true;
            c->finish = "length";
            continue;
        }
        eng_request rq = j->rq;
        rq.prompt = j->prompts[c->prompt_idx].ids;
        rq.n_prompt = (int)j->prompts[c->prompt_idx].n;
        rq.adapter = j->adapter;
        rq.prompt_logprobs = j->want_prompt_lps;
        rq.sample.seed = seed0 + (uint64_t)(i % j->n); // choices of one prompt differ
        molt_status st = eng_submit(j->s->eng, &rq, &c->q);
        if (st != MOLT_OK) {
            c->q = NULL;
            srv_job_cancel(j);
            return submit_error(j, st, e);
        }
    }
    return true;
}

// ---- events -----------------------------------------------------------------------------

static void finish(srv_choice *c, const char *reason) {
    c->done = true;
    if (!c->finish)
        c->finish = reason;
}

// Cuts the text at the earliest stop string that the last append completed.
static bool find_stop(srv_job *j, srv_choice *c, size_t old_n) {
    size_t best = SIZE_MAX;
    int which = -1;
    for (int k = 0; k < j->n_stops; k++) {
        size_t len = strlen(j->stops[k]);
        size_t from = old_n + 1 > len ? old_n + 1 - len : 0;
        for (size_t p = from; p + len <= c->text.n && p < best; p++)
            if (!memcmp(c->text.p + p, j->stops[k], len)) {
                best = p;
                which = k;
                break;
            }
    }
    if (which < 0)
        return false;
    c->text.n = best;
    c->text.p[best] = 0;
    c->text_chars = srv_utf8_chars(c->text.p, c->text.n);
    c->stop_reason = json_string(j->stops[which]);
    finish(c, "stop");
    eng_cancel(c->q);
    return true;
}

static bool push_lp(srv_choice *c, const eng_event *ev, size_t text_off) {
    if (c->n_lps == c->cap_lps) {
        size_t cap = c->cap_lps ? 2 * c->cap_lps : 32;
        srv_lp *p = molt_realloc(c->lps, cap * sizeof *p);
        if (!p)
            return false;
        c->lps = p;
        c->cap_lps = cap;
    }
    srv_lp *l = &c->lps[c->n_lps++];
    l->token = ev->token;
    l->lp = ev->logprob;
    l->n_top = ev->n_top;
    memcpy(l->top_ids, ev->top_ids, sizeof l->top_ids);
    memcpy(l->top_lps, ev->top_logprobs, sizeof l->top_lps);
    l->text_off = text_off;
    return true;
}

static bool is_stop_id(const srv_job *j, int32_t t) {
    for (int i = 0; i < j->rq.n_stop_ids; i++)
        if (j->rq.stop_ids[i] == t)
            return true;
    return false;
}

// Appends bytes that became whole characters to the text.
static bool add_text(srv_job *j, srv_choice *c, const char *b, size_t n, bool flush) {
    size_t ready;
    if (inf_utf8_push(&c->u, b, n, &ready) != MOLT_OK)
        return false;
    if (flush)
        ready = c->u.n;
    size_t old = c->text.n;
    if (!srv_buf_put(&c->text, c->u.buf, ready))
        return false;
    inf_utf8_consume(&c->u, ready);
    c->text_chars += srv_utf8_chars(c->text.p + old, ready);
    if (j->n_stops && ready)
        find_stop(j, c, old);
    return true;
}

static void on_token(srv_job *j, srv_choice *c, const eng_event *ev) {
    double now = srv_now();
    if (c->n_gen == 0)
        srv_metrics_ttft(&j->s->m, now - j->t_submit);
    else
        srv_metrics_itl(&j->s->m, now - c->t_last);
    c->t_last = now;
    c->n_gen++;
    if (!push_lp(c, ev, c->text_chars + srv_utf8_chars(c->u.buf, c->u.n)))
        goto oom;
    int32_t t = ev->token;
    if ((eng_is_eos(j->s->eng, t) && !j->rq.ignore_eos) || is_stop_id(j, t)) {
        if (is_stop_id(j, t))
            c->stop_reason = json_integer(t);
        return; // the token that ends the sequence adds no text
    }
    if (j->skip_special && tok_is_special(j->s->tok, t))
        return;
    size_t len = 0;
    if (j->piece)
        j->piece[0] = 0;
    if (tok_decode(j->s->tok, &t, 1, &j->piece, &len) != MOLT_OK) {
        srv_fail(&c->err, 500, NULL, "cannot decode token %d: %s", t, molt_err_msg());
        finish(c, NULL);
        eng_cancel(c->q);
        return;
    }
    if (add_text(j, c, j->piece, len, false))
        return;
oom:
    srv_fail(&c->err, 500, NULL, "out of memory");
    finish(c, NULL);
    eng_cancel(c->q);
}

static void on_done(srv_job *j, srv_choice *c, const eng_event *ev) {
    c->n_cached = ev->n_cached;
    if (c->done) // a stop string ended it; the engine's word comes after
        return;
    if (c->u.n && !add_text(j, c, "", 0, true))
        srv_fail(&c->err, 500, NULL, "out of memory");
    if (c->done)
        return;
    switch (ev->finish) {
    case ENG_FINISH_STOP: finish(c, "stop"); break;
    case ENG_FINISH_LENGTH: finish(c, "length"); break;
    default:
        srv_fail(&c->err, 503, NULL, "the request was aborted: the server is shutting down");
        finish(c, NULL);
    }
}

static void on_event(srv_job *j, srv_choice *c, const eng_event *ev) {
    switch (ev->kind) {
    case ENG_EV_PROMPT:
        if (ev->index >= 0 && ev->index < c->n_plps) {
            srv_lp *l = &c->plps[ev->index];
            l->lp = ev->logprob;
            l->n_top = ev->n_top;
            memcpy(l->top_ids, ev->top_ids, sizeof l->top_ids);
            memcpy(l->top_lps, ev->top_logprobs, sizeof l->top_lps);
            c->plps_recv++;
        }
        break;
    case ENG_EV_TOKEN:
        if (!c->done)
            on_token(j, c, ev);
        break;
    case ENG_EV_DONE:
        on_done(j, c, ev);
        eng_release(c->q);
        c->q = NULL;
        break;
    case ENG_EV_ERROR:
        if (!c->done) {
            srv_fail(&c->err, ev->status == MOLT_EARG ? 400 : 500, NULL, "%s", ev->message);
            finish(c, NULL);
        }
        eng_release(c->q);
        c->q = NULL;
        break;
    }
}

int srv_job_pump(srv_job *j, int wait_ms) {
    int got = 0;
    eng_event ev;
    for (int i = 0; i < j->n_choices; i++)
        while (j->c[i].q && eng_next(j->c[i].q, &ev, 0) == 1) {
            on_event(j, &j->c[i], &ev);
            got++;
        }
    if (got || wait_ms <= 0)
        return got;
    for (int i = 0; i < j->n_choices; i++)
        if (j->c[i].q) { // wait on the first one still open, then take what else is ready
            if (eng_next(j->c[i].q, &ev, wait_ms) == 1) {
                on_event(j, &j->c[i], &ev);
                return 1 + srv_job_pump(j, 0);
            }
            break;
        }
    return 0;
}

bool srv_job_done(const srv_job *j) {
    for (int i = 0; i < j->n_choices; i++)
        if (!j->c[i].done)
            return false;
    return true;
}

size_t srv_choice_ready(const srv_job *j, const srv_choice *c) {
    if (c->done || j->max_stop <= 1)
        return c->text.n;
    size_t hold = j->max_stop - 1;
    size_t n = c->text.n > hold ? c->text.n - hold : 0;
    while (n > c->sent && n < c->text.n && ((unsigned char)c->text.p[n] & 0xC0) == 0x80)
        n--; // never split a character
    return n < c->sent ? c->sent : n;
}

json_t *srv_token_str(srv_job *j, int32_t id) {
    size_t len = 0;
    if (j->piece)
        j->piece[0] = 0;
    if (tok_decode(j->s->tok, &id, 1, &j->piece, &len) != MOLT_OK)
        return json_string("");
    return srv_jstr(j->piece, len);
}

json_t *srv_job_usage(const srv_job *j) {
    long long prompt = 0, gen = 0, cached = 0;
    for (int p = 0; p < j->n_prompts; p++)
        prompt += (long long)j->prompts[p].n;
    for (int i = 0; i < j->n_choices; i++) {
        gen += j->c[i].n_gen;
        cached += j->c[i].n_cached;
    }
    return json_pack("{s:I, s:I, s:I, s:{s:I}}", "prompt_tokens", prompt, "total_tokens",
                     prompt + gen, "completion_tokens", gen, "prompt_tokens_details",
                     "cached_tokens", cached);
}

bool srv_job_ok(const srv_job *j, srv_error *e) {
    for (int i = 0; i < j->n_choices; i++)
        if (j->c[i].err.status) {
            *e = j->c[i].err;
            return false;
        }
    return true;
}

// How long to block on one queue: one choice blocks long (the client check is all that
// waits); several choices poll in short slices, since an event of another choice waits
// until the slice ends (the engine API has no wait over several queues).
static int wait_slice(const srv_job *j) { return j->n_choices > 1 ? 2 : 50; }

bool srv_job_wait(srv_job *j, srv_req *r) {
    while (!srv_job_done(j)) {
        srv_job_pump(j, wait_slice(j));
        if (srv_client_gone(r)) {
            srv_job_cancel(j);
            return false;
        }
    }
    return true;
}

bool srv_put_event(srv_buf *out, json_t *j) {
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    bool ok = s && srv_buf_puts(out, "data: ") && srv_buf_puts(out, s) &&
              srv_buf_puts(out, "\n\n");
    free(s);
    return ok;
}

int srv_stream_pump(srv_job *j, srv_req *r, const srv_stream_fmt *f, void *ctx,
                    bool *error_sent, srv_buf *out) {
    for (;;) {
        srv_error e = {0};
        if (!srv_job_ok(j, &e)) { // an error after the stream started: an error event
            if (*error_sent)
                return 0;
            srv_job_cancel(j);
            srv_put_event(out, srv_error_json(&e));
            srv_buf_puts(out, "data: [DONE]\n\n");
            *error_sent = true;
            return 1;
        }
        bool wrote = false, all = true;
        for (int i = 0; i < j->n_choices; i++) {
            wrote |= f->chunk(ctx, &j->c[i], out);
            all &= j->c[i].finish_sent;
        }
        if (wrote)
            return 1;
        if (all) {
            if (f->include_usage) {
                json_t *u = f->envelope(ctx, json_array());
                if (u)
                    json_object_set_new(u, "usage", srv_job_usage(j));
                srv_put_event(out, u);
            }
            srv_buf_puts(out, "data: [DONE]\n\n");
            return 0;
        }
        srv_job_pump(j, wait_slice(j));
        if (srv_client_gone(r)) {
            srv_job_cancel(j);
            return -1;
        }
    }
}

void srv_job_cancel(srv_job *j) {
    for (int i = 0; i < j->n_choices; i++)
        if (j->c[i].q) {
            eng_release(j->c[i].q); // cancels first when still running
            j->c[i].q = NULL;
            j->c[i].done = true;
        }
}

void srv_job_free(srv_job *j) {
    srv_job_cancel(j);
    for (int i = 0; i < j->n_choices; i++) {
        srv_choice *c = &j->c[i];
        srv_buf_free(&c->text);
        inf_utf8_free(&c->u);
        molt_free(c->lps);
        molt_free(c->plps);
        json_decref(c->stop_reason);
    }
    molt_free(j->c);
    for (int p = 0; p < j->n_prompts; p++)
        tok_ids_free(&j->prompts[p]);
    molt_free(j->prompts);
    for (int k = 0; k < j->n_stops; k++)
        molt_free(j->stops[k]);
    molt_free(j->stops);
    molt_free((void *)j->rq.stop_ids);
    molt_free(j->piece);
    memset(j, 0, sizeof *j);
}
