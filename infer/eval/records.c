// infer/eval/records.c: an eval set's records turned into what the runner submits, read and
// tokenized once for all systems:
//   loss      any training record (chat, alpaca, completion, text) through the training
//             template: ids and the training loss mask;
//   choice    {"prompt" | "messages", "choices": [strings], "answer": index}: the context's
//             ids (a chat ending with a user turn, or <s> and the plain prompt) and each
//             choice's ids (its text encoded alone, appended to the context);
//   generate  a chat whose last turn is the assistant's, or an alpaca/completion record:
//             the ids up to where the last assistant turn starts, and its text as reference.
// Every record may carry "id" (string or integer) and "category" (string). A bad record is
// an error at FILE:LINE, or counted and skipped. Not here: running them (run.c).
#include "run_internal.h"

#include <jansson.h>
#include <string.h>

static void item_free(ev_item *it) {
    molt_free(it->id);
    molt_free(it->category);
    molt_free(it->target);
    molt_free(it->where);
    molt_free(it->ids);
    molt_free(it->mask);
    for (int c = 0; c < it->n_choices; c++)
        molt_free(it->choice_ids[c]);
    molt_free(it->choice_ids);
    molt_free(it->choice_n);
    molt_free(it->choice_chars);
    memset(it, 0, sizeof *it);
}

void ev_items_free(ev_items *v) {
    for (int64_t i = 0; i < v->n; i++)
        item_free(&v->it[i]);
    molt_free(v->it);
    memset(v, 0, sizeof *v);
}

// Code points of UTF-8 text (lm-evaluation-harness normalizes acc_norm by len(str)).
static int utf8_chars(const char *s, size_t n) {
    int c = 0;
    for (size_t i = 0; i < n; i++)
        c += ((unsigned char)s[i] & 0xC0) != 0x80;
    return c;
}

static molt_status dup_ids(const int32_t *src, size_t n, int32_t **out) {
    *out = molt_malloc((n ? n : 1) * sizeof **out);
    if (!*out)
        return molt_err(MOLT_ENOMEM, "eval: out of memory");
    if (n)
        memcpy(*out, src, n * sizeof **out);
    return MOLT_OK;
}

// The record's id (string or integer; else "LINE") and category.
static molt_status id_and_category(const json_t *rec, uint64_t line, ev_item *it) {
    char buf[32];
    const json_t *id = json_object_get(rec, "id"), *cat = json_object_get(rec, "category");
    const char *ids = NULL;
    if (json_is_string(id))
        ids = json_string_value(id);
    else if (json_is_integer(id))
        snprintf(buf, sizeof buf, "%lld", (long long)json_integer_value(id)), ids = buf;
    else if (id && !json_is_null(id))
        return molt_err(MOLT_EFORMAT, "field \"id\" must be a string or an integer");
    else
        snprintf(buf, sizeof buf, "%llu", (unsigned long long)line), ids = buf;
    if (cat && !json_is_null(cat) && !json_is_string(cat))
        return molt_err(MOLT_EFORMAT, "field \"category\" must be a string");
    it->id = molt_strdup(ids);
    it->category = json_is_string(cat) ? molt_strdup(json_string_value(cat)) : NULL;
    if (!it->id || (json_is_string(cat) && !it->category))
        return molt_err(MOLT_ENOMEM, "eval: out of memory");
    return MOLT_OK;
}

// ---- loss ---------------------------------------------------------------------------------------

static molt_status read_loss(const ev_read_ctx *x, const char *line, size_t len, ev_item *it) {
    ds_example ex = {0};
    ds_record_info info;
    molt_status st = ds_record_encode(x->ct, DS_FORMAT_AUTO, line, len, x->max_len, false, &ex,
                                      &info);
    if (st == MOLT_OK && ds_example_trained(&ex) == 0)
        st = molt_err(MOLT_EFORMAT, "the record has no trained (assistant) tokens");
    if (st == MOLT_OK && (st = dup_ids(ex.ids, ex.n, &it->ids)) == MOLT_OK) {
        it->n = (int)ex.n;
        it->mask = molt_malloc(ex.n);
        st = it->mask ? MOLT_OK : molt_err(MOLT_ENOMEM, "eval: out of memory");
        if (st == MOLT_OK)
            memcpy(it->mask, ex.mask, ex.n);
    }
    ds_example_free(&ex);
    return st;
}

// ---- choice -------------------------------------------------------------------------------------

static molt_status context_ids(const ev_read_ctx *x, const json_t *rec, tok_ids *ctx) {
    const json_t *prompt = json_object_get(rec, "prompt"), *msgs = json_object_get(rec, "messages");
    if (!prompt == !msgs)
        return molt_err(MOLT_EFORMAT, "a choice record needs exactly one of \"prompt\" (text) "
                        "and \"messages\" (a chat ending with a user turn)");
    if (prompt) {
        if (!json_is_string(prompt))
            return molt_err(MOLT_EFORMAT, "field \"prompt\" must be a string");
        return inf_prompt_ids(x->tok, json_string_value(prompt), json_string_length(prompt),
                              false, ctx);
    }
    json_t *chat = json_pack("{s:O}", "messages", (json_t *)msgs);
    if (!chat)
        return molt_err(MOLT_ENOMEM, "eval: out of memory");
    ds_example ex = {0};
    molt_status st = chat_encode(x->ct, chat, &ex, NULL);
    for (size_t i = 0; st == MOLT_OK && i < ex.n; i++)
        st = tok_ids_push(ctx, ex.ids[i]);
    ds_example_free(&ex);
    json_decref(chat);
    return st;
}

static molt_status read_choice(const ev_read_ctx *x, const json_t *rec, ev_item *it) {
    const json_t *choices = json_object_get(rec, "choices"), *ans = json_object_get(rec, "answer");
    if (!json_is_array(choices) || json_array_size(choices) == 0)
        return molt_err(MOLT_EFORMAT, "field \"choices\" must be a non-empty array of strings");
    size_t nc = json_array_size(choices);
    if (nc > EV_MAX_CHOICES)
        return molt_err(MOLT_EFORMAT, "field \"choices\" has %zu entries, at most %d", nc,
                        EV_MAX_CHOICES);
    if (!json_is_integer(ans) || json_integer_value(ans) < 0 ||
        json_integer_value(ans) >= (json_int_t)nc)
        return molt_err(MOLT_EFORMAT, "field \"answer\" must be an integer index into the %zu "
                        "choices", nc);
    tok_ids ctx = {0};
    molt_status st = context_ids(x, rec, &ctx);
    if (st == MOLT_OK && ctx.n == 0)
        st = molt_err(MOLT_EFORMAT, "the context has no tokens");
    if (st == MOLT_OK && (st = dup_ids(ctx.ids, ctx.n, &it->ids)) == MOLT_OK)
        it->n = (int)ctx.n;
    it->answer = (int)json_integer_value(ans);
    it->choice_ids = molt_calloc(nc, sizeof *it->choice_ids);
    it->choice_n = molt_calloc(nc, sizeof *it->choice_n);
    it->choice_chars = molt_calloc(nc, sizeof *it->choice_chars);
    if (st == MOLT_OK && (!it->choice_ids || !it->choice_n || !it->choice_chars))
        st = molt_err(MOLT_ENOMEM, "eval: out of memory");
    for (size_t c = 0; st == MOLT_OK && c < nc; c++) {
        const json_t *ch = json_array_get(choices, c);
        if (!json_is_string(ch) || json_string_length(ch) == 0) {
            st = molt_err(MOLT_EFORMAT, "choices[%zu] must be a non-empty string", c);
            break;
        }
        tok_ids ci = {0};
        st = tok_encode(x->tok, json_string_value(ch), json_string_length(ch), &ci);
        if (st == MOLT_OK && ci.n == 0)
            st = molt_err(MOLT_EFORMAT, "choices[%zu] has no tokens", c);
        if (st == MOLT_OK && (st = dup_ids(ci.ids, ci.n, &it->choice_ids[c])) == MOLT_OK) {
            it->choice_n[c] = (int)ci.n;
            it->choice_chars[c] = utf8_chars(json_string_value(ch), json_string_length(ch));
            it->n_choices = (int)c + 1;
        }
        if (st == MOLT_OK && x->max_len > 0 && it->n + it->choice_n[c] > x->max_len)
            st = molt_err(MOLT_EFORMAT, "context and choices[%zu] are %d tokens, more than the "
                          "model's %d", c, it->n + it->choice_n[c], x->max_len);
        tok_ids_free(&ci);
    }
    tok_ids_free(&ctx);
    return st;
}

// ---- generate -----------------------------------------------------------------------------------

// The reference: alpaca's output, completion's completion, or the last message's content
// when it is the assistant's (a string or text parts).
static molt_status reference_of(const json_t *rec, char **out) {
    const json_t *ref = json_object_get(rec, "output");
    if (!ref)
        ref = json_object_get(rec, "completion");
    const json_t *msgs = json_object_get(rec, "messages");
    if (!ref && json_is_array(msgs) && json_array_size(msgs) > 0) {
        const json_t *last = json_array_get(msgs, json_array_size(msgs) - 1);
        const char *role = json_string_value(json_object_get(last, "role"));
        if (!role || strcmp(role, "assistant"))
            return molt_err(MOLT_EFORMAT, "a generate record's last message must be the "
                            "assistant's (the reference answer)");
        ref = json_object_get(last, "content");
        if (json_is_array(ref)) { // text parts
            size_t n = 0;
            for (size_t i = 0; i < json_array_size(ref); i++)
                n += json_string_length(json_object_get(json_array_get(ref, i), "text"));
            char *s = molt_malloc(n + 1);
            if (!s)
                return molt_err(MOLT_ENOMEM, "eval: out of memory");
            s[0] = 0;
            for (size_t i = 0; i < json_array_size(ref); i++) {
                const char *t = json_string_value(json_object_get(json_array_get(ref, i), "text"));
                if (t)
                    strcat(s, t);
            }
            *out = s;
            return MOLT_OK;
        }
    }
    if (!json_is_string(ref))
        return molt_err(MOLT_EFORMAT, "a generate record needs a reference: \"output\" "
                        "(alpaca), \"completion\", or a last assistant message with text");
    *out = molt_strdup(json_string_value(ref));
    return *out ? MOLT_OK : molt_err(MOLT_ENOMEM, "eval: out of memory");
}

// The prompt is what the training template puts before the last assistant turn: the ids up
// to the start of the last run of trained tokens.
static molt_status read_generate(const ev_read_ctx *x, const json_t *rec, const char *line,
                                 size_t len, ev_item *it) {
    MOLT_TRY(reference_of(rec, &it->target));
    ds_example ex = {0};
    ds_record_info info;
    molt_status st = ds_record_encode(x->ct, DS_FORMAT_AUTO, line, len, 0, false, &ex, &info);
    size_t end = ex.n;
    while (st == MOLT_OK && end > 0 && !ex.mask[end - 1])
        end--;
    while (st == MOLT_OK && end > 0 && ex.mask[end - 1])
        end--;
    if (st == MOLT_OK && (end == 0 || ds_example_trained(&ex) == 0))
        st = molt_err(MOLT_EFORMAT, "the record has no prompt before its answer");
    if (st == MOLT_OK && (st = dup_ids(ex.ids, end, &it->ids)) == MOLT_OK)
        it->n = (int)end;
    if (st == MOLT_OK && x->max_len > 0 && it->n + x->max_tokens > x->max_len)
        st = molt_err(MOLT_EFORMAT, "the prompt (%d tokens) and max_tokens (%d) exceed the "
                      "model's %d", it->n, x->max_tokens, x->max_len);
    ds_example_free(&ex);
    return st;
}

// ---- reading ------------------------------------------------------------------------------------

static molt_status read_one(const ev_read_ctx *x, const char *line, size_t len, uint64_t lineno,
                            ev_item *it) {
    json_error_t je;
    json_t *rec = json_loadb(line, len, 0, &je);
    if (!rec || !json_is_object(rec)) {
        json_decref(rec);
        return rec ? molt_err(MOLT_EFORMAT, "a record must be a JSON object")
                   : molt_err(MOLT_EFORMAT, "invalid JSON at column %d: %s", je.column, je.text);
    }
    molt_status st = id_and_category(rec, lineno, it);
    if (st == MOLT_OK) {
        if (x->task == EV_TASK_LOSS)
            st = read_loss(x, line, len, it);
        else if (x->task == EV_TASK_CHOICE)
            st = read_choice(x, rec, it);
        else
            st = read_generate(x, rec, line, len, it);
    }
    json_decref(rec);
    return st;
}

molt_status ev_items_read(const ev_read_ctx *x, const char *path, ev_items *out) {
    memset(out, 0, sizeof *out);
    ds_reader *r;
    MOLT_TRY(ds_reader_open(path, 0, &r));
    molt_status st = MOLT_OK;
    for (;;) {
        const char *line;
        size_t len;
        bool oversize;
        if ((st = ds_reader_next(r, &line, &len, &oversize)) != MOLT_OK || !line)
            break;
        if (len == 0 || (len == 1 && line[0] == ' '))
            continue; // blank lines are not records
        if (x->limit > 0 && out->n >= x->limit)
            break;
        if (out->n == out->cap) {
            int64_t cap = out->cap ? 2 * out->cap : 64;
            ev_item *v = molt_realloc(out->it, (size_t)cap * sizeof *v);
            if (!v) {
                st = molt_err(MOLT_ENOMEM, "eval: out of memory reading %s", path);
                break;
            }
            out->it = v;
            out->cap = cap;
        }
        ev_item *it = &out->it[out->n];
        memset(it, 0, sizeof *it);
        char where[1200];
        ds_reader_where(r, 1, where, sizeof where);
        st = oversize ? molt_err(MOLT_EFORMAT, "the line is longer than the reader's cap")
                      : read_one(x, line, len, ds_reader_lineno(r), it);
        if (st == MOLT_OK && !(it->where = molt_strdup(where)))
            st = molt_err(MOLT_ENOMEM, "eval: out of memory");
        if (st == MOLT_OK) {
            out->n++;
            continue;
        }
        item_free(it); // what the bad record got
        if (st == MOLT_ENOMEM || !x->skip_bad) {
            st = molt_err_wrap(st, "%s", where);
            break;
        }
        out->bad++;
        st = MOLT_OK;
    }
    ds_reader_close(r);
    if (st == MOLT_OK && out->n == 0)
        st = molt_err(MOLT_EFORMAT, "%s: no usable record (%lld bad)", path, (long long)out->bad);
    if (st != MOLT_OK) {
        int64_t bad = out->bad;
        ev_items_free(out);
        out->bad = bad;
    }
    return st;
}
