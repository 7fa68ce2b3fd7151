// data/chat.c: the Mistral instruct chat format, versions 13 and 15, text only: a chat
// record (messages, tools, reasoning_effort) becomes token ids and a loss mask. The rules
// follow mistral-common's request normalizer and InstructTokenizerV13/V15 (merging of
// consecutive turns, tool results ordered as the calls, tools and settings before the first
// [INST], JSON written as Python's json.dumps writes it), checked against its golden ids in
// tests/test_chat.c. Not here: images, audio, fill-in-the-middle, the [CALL_ID] formats of
// v11 and older, and parsing model output.
#include "ds_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

enum {
    CT_BOS, CT_EOS, CT_INST, CT_INST_END, CT_TOOLS, CT_TOOLS_END, CT_RESULTS, CT_RESULTS_END,
    CT_TOOL_CALLS, CT_ARGS, CT_THINK, CT_THINK_END, CT_SYSTEM, CT_SYSTEM_END, CT_SETTINGS,
    CT_SETTINGS_END, CT_COUNT
};
static const char *const ct_name[CT_COUNT] = {
    "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[ARGS]", "[THINK]", "[/THINK]",
    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[MODEL_SETTINGS]", "[/MODEL_SETTINGS]",
};

struct chat_template {
    const tok_tokenizer *tok;
    chat_opts opts;
    char reasoning_default[32];
    int32_t id[CT_COUNT]; // -1: the tokenizer lacks it
};

void chat_opts_default(chat_opts *o) {
    *o = (chat_opts){.version = CHAT_V15, .reasoning_default = "none"};
}

molt_status chat_template_new(const tok_tokenizer *t, const chat_opts *o, chat_template **out) {
    *out = NULL;
    chat_opts def;
    if (!o) {
        chat_opts_default(&def);
        o = &def;
    }
    if (o->version != CHAT_V13 && o->version != CHAT_V15)
        return molt_err(MOLT_EARG, "chat template: unknown version %d (expected 13 or 15)",
                        (int)o->version);
    const char *rd = o->reasoning_default;
    if (rd && strcmp(rd, "none") && strcmp(rd, "high"))
        return molt_err(MOLT_EARG, "chat template: reasoning default must be \"none\" or "
                                   "\"high\", got \"%s\"", rd);
    chat_template *ct = molt_calloc(1, sizeof *ct);
    if (!ct)
        return molt_err(MOLT_ENOMEM, "chat template: out of memory");
    ct->tok = t;
    ct->opts = *o;
    if (rd) {
        snprintf(ct->reasoning_default, sizeof ct->reasoning_default, "%s", rd);
        ct->opts.reasoning_default = ct->reasoning_default;
    }
    for (int i = 0; i < CT_COUNT; i++)
        ct->id[i] = tok_special(t, ct_name[i]);
    if (tok_bos(t) >= 0) // tokenizer.json files name theirs in tokenizer_config.json
        ct->id[CT_BOS] = tok_bos(t);
    if (tok_eos(t) >= 0)
        ct->id[CT_EOS] = tok_eos(t);
    *out = ct;
    return MOLT_OK;
}

void chat_template_free(chat_template *ct) { molt_free(ct); }
const tok_tokenizer *chat_template_tokenizer(const chat_template *ct) { return ct->tok; }
const chat_opts *chat_template_opts(const chat_template *ct) { return &ct->opts; }
int32_t chat_template_bos(const chat_template *ct) { return ct->id[CT_BOS]; }
int32_t chat_template_eos(const chat_template *ct) { return ct->id[CT_EOS]; }

// ---- parsed messages --------------------------------------------------------------------

typedef enum { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL, ROLE_COUNT } role;
static const char *const role_name[ROLE_COUNT] = {"system", "user", "assistant", "tool"};

typedef struct {
    role role;
    const json_t *content;  // string, array of chunks, or NULL
    const json_t *thinking; // assistant "thinking" / "reasoning_content" string, or NULL
    const json_t *calls;    // assistant tool calls (non-empty array) or NULL
    const char *call_id;    // tool: "tool_call_id", or NULL
    int weight;             // 0 or 1 (1 when absent)
    bool prefix;            // the last turn is left open (no </s>)
} msg;

// A run of messages encoded as one turn (or, for tool results, one ordered block).
typedef struct {
    role role;
    size_t first, count;
} group;

// A piece of joined content: text, or a thinking section; its text lives in enc.pool.
typedef struct {
    bool think, closed;
    size_t off, len;
} piece;

typedef struct {
    const chat_template *ct;
    ds_example *out;
    ds_bad_reason *why;
    msg *m;
    size_t n_msg;
    group *g;
    size_t n_group;
    piece *pc;
    size_t n_pc, cap_pc;
    ds_buf pool, cur, js;
    tok_ids ids;
    const char *effort; // v15 reasoning effort, or NULL
    const char **calls; // ids of the latest tool calls (tool results are sorted by them)
    size_t n_calls, cap_calls;
} enc;

static molt_status bad(enc *e, ds_bad_reason r, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static molt_status bad(enc *e, ds_bad_reason r, const char *fmt, ...) {
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (e->why)
        *e->why = r;
    return molt_err(MOLT_EFORMAT, "%s", text);
}

static const char *type_name(const json_t *v) {
    static const char *const names[] = {"an object", "an array", "a string", "an integer",
                                        "a number", "true", "false", "null"};
    return names[json_typeof(v)];
}

// Checks one content chunk: {"type": "text", "text"} or {"type": "thinking", "thinking"}.
static molt_status check_chunk(enc *e, size_t i, size_t j, const json_t *c) {
    if (!json_is_object(c))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].content[%zu]' must be an "
                   "object, not %s", i, j, type_name(c));
    const json_t *type = json_object_get(c, "type");
    const char *t = json_string_value(type);
    if (!type)
        return bad(e, DS_BAD_FIELD_MISSING, "missing field 'messages[%zu].content[%zu].type'",
                   i, j);
    const char *key = t && !strcmp(t, "text") ? "text"
                      : t && !strcmp(t, "thinking") ? "thinking" : NULL;
    if (!key)
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].content[%zu].type' must be "
                   "\"text\" or \"thinking\"", i, j);
    const json_t *v = json_object_get(c, key);
    if (!v || json_is_null(v))
        return bad(e, DS_BAD_FIELD_MISSING, "missing field 'messages[%zu].content[%zu].%s'", i,
                   j, key);
    if (!json_is_string(v))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].content[%zu].%s' must be a "
                   "string, not %s", i, j, key, type_name(v));
    const json_t *closed = json_object_get(c, "closed");
    if (closed && !json_is_boolean(closed))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].content[%zu].closed' must "
                   "be true or false", i, j);
    role r = e->m[i].role;
    if (!strcmp(key, "thinking") && (r == ROLE_USER || r == ROLE_TOOL))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].content[%zu]': %s messages "
                   "hold no thinking", i, j, role_name[r]);
    return MOLT_OK;
}

// True when content has something to say (a non-empty text, or any thinking chunk).
static bool content_nonempty(const json_t *c) {
    if (json_is_string(c))
        return json_string_length(c) > 0;
    for (size_t j = 0; j < json_array_size(c); j++) {
        const json_t *ch = json_array_get(c, j);
        const json_t *txt = json_object_get(ch, "text");
        if (json_object_get(ch, "thinking") || json_string_length(txt) > 0)
            return true;
    }
    return false;
}

static molt_status parse_content(enc *e, size_t i, const json_t *mj) {
    msg *m = &e->m[i];
    const json_t *c = json_object_get(mj, "content");
    if (c && json_is_null(c))
        c = NULL;
    if (c && !json_is_string(c) && !json_is_array(c))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].content' must be a string "
                   "or an array, not %s", i, type_name(c));
    for (size_t j = 0; c && j < json_array_size(c); j++)
        MOLT_TRY(check_chunk(e, i, j, json_array_get(c, j)));
    m->content = c;
    bool other = m->role == ROLE_ASSISTANT && (m->calls || m->thinking);
    if (!c && !other)
        return bad(e, DS_BAD_FIELD_MISSING, "missing field 'messages[%zu].content'", i);
    if (c && !other && m->role != ROLE_TOOL && !content_nonempty(c))
        return bad(e, DS_BAD_FIELD_EMPTY, "empty field 'messages[%zu].content'", i);
    return MOLT_OK;
}

static molt_status parse_calls(enc *e, size_t i, const json_t *mj) {
    const json_t *calls = json_object_get(mj, "tool_calls");
    if (!calls || json_is_null(calls))
        return MOLT_OK;
    if (e->m[i].role != ROLE_ASSISTANT)
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].tool_calls' is only allowed "
                   "in assistant messages", i);
    if (!json_is_array(calls))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].tool_calls' must be an "
                   "array, not %s", i, type_name(calls));
    for (size_t j = 0; j < json_array_size(calls); j++) {
        const json_t *c = json_array_get(calls, j);
        const json_t *f = json_object_get(c, "function");
        if (!json_is_object(c))
            return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].tool_calls[%zu]' must be "
                       "an object", i, j);
        if (!f)
            return bad(e, DS_BAD_FIELD_MISSING, "missing field "
                       "'messages[%zu].tool_calls[%zu].function'", i, j);
        const json_t *name = json_object_get(f, "name"), *id = json_object_get(c, "id");
        if (!name || json_is_null(name))
            return bad(e, DS_BAD_FIELD_MISSING, "missing field "
                       "'messages[%zu].tool_calls[%zu].function.name'", i, j);
        if (!json_is_string(name))
            return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].tool_calls[%zu].function"
                       ".name' must be a string", i, j);
        if (!json_string_length(name))
            return bad(e, DS_BAD_FIELD_EMPTY, "empty field "
                       "'messages[%zu].tool_calls[%zu].function.name'", i, j);
        if (id && !json_is_null(id) && !json_is_string(id))
            return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].tool_calls[%zu].id' must "
                       "be a string", i, j);
    }
    e->m[i].calls = json_array_size(calls) ? calls : NULL;
    return MOLT_OK;
}

static molt_status parse_extras(enc *e, size_t i, const json_t *mj, size_t n) {
    msg *m = &e->m[i];
    const json_t *w = json_object_get(mj, "weight");
    m->weight = 1;
    if (w && !json_is_null(w)) {
        double v = json_number_value(w);
        if (!json_is_number(w) || (v != 0 && v != 1))
            return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].weight' must be 0 or 1",
                       i);
        m->weight = (int)v;
    }
    const json_t *p = json_object_get(mj, "prefix");
    if (p && !json_is_null(p) && !json_is_boolean(p))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].prefix' must be true or "
                   "false", i);
    m->prefix = json_is_true(p);
    if (m->prefix && (i + 1 != n || m->role != ROLE_ASSISTANT))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].prefix': only the last "
                   "message, an assistant one, may be left open", i);
    const json_t *id = json_object_get(mj, "tool_call_id");
    if (id && !json_is_null(id) && !json_is_string(id))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].tool_call_id' must be a "
                   "string", i);
    m->call_id = m->role == ROLE_TOOL ? json_string_value(id) : NULL;
    const json_t *t1 = json_object_get(mj, "thinking"), *t2 = json_object_get(mj,
                                                                          "reasoning_content");
    if (t1 && json_is_null(t1))
        t1 = NULL;
    if (t2 && json_is_null(t2))
        t2 = NULL;
    if (t1 && t2)
        return bad(e, DS_BAD_FIELD_INVALID, "messages[%zu] has both 'thinking' and "
                   "'reasoning_content'", i);
    const json_t *t = t1 ? t1 : t2;
    if (t && (!json_is_string(t) || m->role != ROLE_ASSISTANT))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].%s' must be a string in an "
                   "assistant message", i, t1 ? "thinking" : "reasoning_content");
    m->thinking = t && json_string_length(t) ? t : NULL; // an empty one means no thinking
    return MOLT_OK;
}

// mistral-common's allowed role transitions.
static bool role_may_follow(role prev, role cur) {
    switch (prev) {
    case ROLE_SYSTEM: return cur != ROLE_TOOL;
    case ROLE_USER: return cur != ROLE_TOOL;
    case ROLE_ASSISTANT: return cur != ROLE_SYSTEM;
    case ROLE_TOOL: return cur != ROLE_SYSTEM;
    default: return false;
    }
}

static molt_status parse_messages(enc *e, const json_t *record) {
    const json_t *ms = json_object_get(record, "messages");
    if (!ms || json_is_null(ms))
        return bad(e, DS_BAD_FIELD_MISSING, "missing field 'messages'");
    if (!json_is_array(ms))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'messages' must be an array, not %s",
                   type_name(ms));
    size_t n = json_array_size(ms);
    if (!n)
        return bad(e, DS_BAD_FIELD_EMPTY, "empty field 'messages'");
    e->m = molt_calloc(n, sizeof *e->m);
    e->g = molt_calloc(n, sizeof *e->g);
    if (!e->m || !e->g)
        return molt_err(MOLT_ENOMEM, "chat: out of memory for %zu messages", n);
    e->n_msg = n;
    for (size_t i = 0; i < n; i++) {
        const json_t *mj = json_array_get(ms, i);
        if (!json_is_object(mj))
            return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu]' must be an object, not "
                       "%s", i, type_name(mj));
        const json_t *r = json_object_get(mj, "role");
        if (!r || json_is_null(r))
            return bad(e, DS_BAD_FIELD_MISSING, "missing field 'messages[%zu].role'", i);
        const char *rs = json_string_value(r);
        int k = 0;
        while (rs && k < ROLE_COUNT && strcmp(rs, role_name[k]))
            k++;
        if (!rs || k == ROLE_COUNT)
            return bad(e, DS_BAD_FIELD_INVALID, "field 'messages[%zu].role' must be system, "
                       "user, assistant or tool", i);
        e->m[i].role = (role)k;
        if (i && !role_may_follow(e->m[i - 1].role, e->m[i].role))
            return bad(e, DS_BAD_FIELD_INVALID, "messages[%zu]: role '%s' cannot follow role "
                       "'%s'", i, role_name[k], role_name[e->m[i - 1].role]);
        MOLT_TRY(parse_calls(e, i, mj));
        MOLT_TRY(parse_extras(e, i, mj, n));
        MOLT_TRY(parse_content(e, i, mj));
    }
    return MOLT_OK;
}

// Consecutive user messages form one turn, so do consecutive assistant messages of equal
// weight; consecutive tool results form one block; system messages stand alone.
static void make_groups(enc *e) {
    e->n_group = 0;
    for (size_t i = 0; i < e->n_msg; i++) {
        group *last = e->n_group ? &e->g[e->n_group - 1] : NULL;
        const msg *m = &e->m[i];
        bool join = last && last->role == m->role && m->role != ROLE_SYSTEM &&
                    (m->role != ROLE_ASSISTANT || e->m[last->first].weight == m->weight);
        if (join)
            last->count++;
        else
            e->g[e->n_group++] = (group){m->role, i, 1};
    }
}

// ---- emitting tokens --------------------------------------------------------------------

static molt_status emit_special(enc *e, int which, uint8_t mask) {
    int32_t id = e->ct->id[which];
    if (id < 0)
        return molt_err(MOLT_EUNSUPPORTED, "chat template v%d needs the control token '%s', "
                        "which the %s tokenizer lacks", (int)e->ct->opts.version,
                        ct_name[which], tok_kind(e->ct->tok));
    return ds_example_push(e->out, id, mask);
}

static molt_status emit_text(enc *e, const char *s, size_t n, uint8_t mask) {
    if (!n)
        return MOLT_OK;
    e->ids.n = 0;
    MOLT_TRY(tok_encode(e->ct->tok, s, n, &e->ids));
    return ds_example_append(e->out, e->ids.ids, e->ids.n, mask);
}

static molt_status add_piece(enc *e, bool think, bool closed, const char *s, size_t n) {
    if (e->n_pc == e->cap_pc) {
        size_t cap = e->cap_pc ? 2 * e->cap_pc : 8;
        piece *p = molt_realloc(e->pc, cap * sizeof *p);
        if (!p)
            return molt_err(MOLT_ENOMEM, "chat: out of memory");
        e->pc = p;
        e->cap_pc = cap;
    }
    e->pc[e->n_pc++] = (piece){think, closed, e->pool.n, n};
    return ds_buf_put(&e->pool, s, n);
}

static molt_status join_text(enc *e, const char *s, size_t n, bool *needs_sep) {
    if (!n)
        return MOLT_OK;
    const char *sep = e->ct->opts.version == CHAT_V15 ? "" : "\n\n"; // within one message
    if (e->cur.n)
        MOLT_TRY(ds_buf_puts(&e->cur, *needs_sep ? "\n\n" : sep));
    *needs_sep = false;
    return ds_buf_put(&e->cur, s, n);
}

static molt_status flush_text(enc *e) {
    if (!e->cur.n)
        return MOLT_OK;
    MOLT_TRY(add_piece(e, false, true, e->cur.p, e->cur.n));
    e->cur.n = 0;
    return MOLT_OK;
}

// Joins the content of messages [first, first + count) into pieces as mistral-common's
// normalizer does: texts of different messages joined by "\n\n", adjacent text chunks of one
// message by "" (v15) or "\n\n" (v13), empty texts dropped, thinking sections kept in place.
// *is_list: some thinking came up (else there is exactly one text piece, maybe empty).
static molt_status aggregate(enc *e, size_t first, size_t count, bool *is_list) {
    e->n_pc = 0;
    e->pool.n = 0;
    e->cur.n = 0;
    *is_list = false;
    for (size_t i = first; i < first + count; i++) {
        const msg *m = &e->m[i];
        bool needs_sep = e->cur.n > 0;
        if (m->thinking) {
            MOLT_TRY(flush_text(e));
            MOLT_TRY(add_piece(e, true, true, json_string_value(m->thinking),
                               json_string_length(m->thinking)));
            *is_list = true;
        }
        if (json_is_string(m->content))
            MOLT_TRY(join_text(e, json_string_value(m->content),
                               json_string_length(m->content), &needs_sep));
        for (size_t j = 0; j < json_array_size(m->content); j++) {
            const json_t *ch = json_array_get(m->content, j);
            const json_t *txt = json_object_get(ch, "text");
            if (txt) {
                MOLT_TRY(join_text(e, json_string_value(txt), json_string_length(txt),
                                   &needs_sep));
                continue;
            }
            const json_t *th = json_object_get(ch, "thinking");
            MOLT_TRY(flush_text(e));
            MOLT_TRY(add_piece(e, true, !json_is_false(json_object_get(ch, "closed")),
                               json_string_value(th), json_string_length(th)));
            *is_list = true;
        }
    }
    if (!*is_list)
        return add_piece(e, false, true, e->cur.p ? e->cur.p : "", e->cur.n);
    return flush_text(e);
}

static molt_status emit_pieces(enc *e, uint8_t mask) {
    for (size_t k = 0; k < e->n_pc; k++) {
        const piece *p = &e->pc[k];
        if (p->think)
            MOLT_TRY(emit_special(e, CT_THINK, mask));
        MOLT_TRY(emit_text(e, e->pool.p + p->off, p->len, mask));
        if (p->think && p->closed)
            MOLT_TRY(emit_special(e, CT_THINK_END, mask));
    }
    return MOLT_OK;
}

static bool has_think(const enc *e) {
    for (size_t k = 0; k < e->n_pc; k++)
        if (e->pc[k].think)
            return true;
    return false;
}

// Checks tools[i] and finds its function: the OpenAI form {"type": "function", "function":
// {...}} or the flat form {"name", "description", "parameters"}.
static molt_status check_tool(enc *e, size_t i, const json_t *t, const json_t **fn) {
    if (!json_is_object(t))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'tools[%zu]' must be an object", i);
    const json_t *type = json_object_get(t, "type");
    const char *ts = json_string_value(type);
    if (type && !json_is_null(type) && (!ts || strcmp(ts, "function")))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'tools[%zu].type' must be \"function\"", i);
    const json_t *f = json_object_get(t, "function");
    if (!f && json_object_get(t, "name"))
        f = t;
    if (!f)
        return bad(e, DS_BAD_FIELD_MISSING, "missing field 'tools[%zu].function'", i);
    if (!json_is_object(f))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'tools[%zu].function' must be an object", i);
    const json_t *name = json_object_get(f, "name"), *desc = json_object_get(f, "description");
    const json_t *params = json_object_get(f, "parameters");
    if (!name || json_is_null(name))
        return bad(e, DS_BAD_FIELD_MISSING, "missing field 'tools[%zu].function.name'", i);
    if (!json_is_string(name))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'tools[%zu].function.name' must be a string",
                   i);
    if (!json_string_length(name))
        return bad(e, DS_BAD_FIELD_EMPTY, "empty field 'tools[%zu].function.name'", i);
    if (desc && !json_is_null(desc) && !json_is_string(desc))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'tools[%zu].function.description' must be a "
                   "string", i);
    if (params && !json_is_null(params) && !json_is_object(params))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'tools[%zu].function.parameters' must be an "
                   "object", i);
    *fn = f;
    return MOLT_OK;
}

// Appends the tool as the format writes it: {"type": "function", "function": {"name",
// "description", "parameters"}}, description defaulting to "" and parameters to {}.
static molt_status add_tool(json_t *list, const json_t *f) {
    const json_t *desc = json_object_get(f, "description");
    const json_t *params = json_object_get(f, "parameters");
    json_t *fn = json_pack("{s:O, s:o, s:o}", "name", json_object_get(f, "name"), "description",
                           json_is_string(desc) ? json_copy((json_t *)desc) : json_string(""),
                           "parameters", json_is_object(params) ? json_deep_copy(params)
                                                                : json_object());
    json_t *tool = fn ? json_pack("{s:s, s:o}", "type", "function", "function", fn) : NULL;
    if (!tool || json_array_append_new(list, tool))
        return molt_err(MOLT_ENOMEM, "chat: out of memory building the tools list");
    return MOLT_OK;
}

static molt_status tools_json(enc *e, const json_t *tools, json_t *list) {
    for (size_t i = 0; i < json_array_size(tools); i++) {
        const json_t *f = NULL;
        MOLT_TRY(check_tool(e, i, json_array_get(tools, i), &f));
        MOLT_TRY(add_tool(list, f));
    }
    return MOLT_OK;
}

// [AVAILABLE_TOOLS]...[/AVAILABLE_TOOLS] and, for v15, [MODEL_SETTINGS]...[/MODEL_SETTINGS]:
// written once, just before the first [INST].
static molt_status emit_tools_settings(enc *e, const json_t *record, uint8_t mask) {
    const json_t *tools = json_object_get(record, "tools");
    if (tools && !json_is_null(tools) && !json_is_array(tools))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'tools' must be an array, not %s",
                   type_name(tools));
    if (json_array_size(tools)) {
        json_t *list = json_array();
        if (!list)
            return molt_err(MOLT_ENOMEM, "chat: out of memory");
        e->js.n = 0;
        molt_status st = tools_json(e, tools, list);
        if (st == MOLT_OK)
            st = ds_pyjson_dump(list, &e->js);
        json_decref(list);
        MOLT_TRY(st);
        MOLT_TRY(emit_special(e, CT_TOOLS, mask));
        MOLT_TRY(emit_text(e, e->js.p, e->js.n, mask));
        MOLT_TRY(emit_special(e, CT_TOOLS_END, mask));
    }
    if (!e->effort)
        return MOLT_OK;
    char settings[64];
    int n = snprintf(settings, sizeof settings, "{\"reasoning_effort\": \"%s\"}", e->effort);
    MOLT_TRY(emit_special(e, CT_SETTINGS, mask));
    MOLT_TRY(emit_text(e, settings, (size_t)n, mask));
    return emit_special(e, CT_SETTINGS_END, mask);
}

// Arguments as the format writes them: JSON text re-written Python-style; text that is not
// JSON becomes a JSON string; absent or empty arguments are {}.
static molt_status call_args(enc *e, const json_t *args) {
    e->js.n = 0;
    if (!args || json_is_null(args) || (json_is_string(args) && !json_string_length(args)))
        return ds_buf_puts(&e->js, "{}");
    if (!json_is_string(args))
        return ds_pyjson_dump(args, &e->js);
    json_t *v = json_loadb(json_string_value(args), json_string_length(args),
                           JSON_DECODE_ANY | JSON_ALLOW_NUL, NULL);
    molt_status st = ds_pyjson_dump(v ? v : args, &e->js);
    json_decref(v);
    return st;
}

static molt_status remember_call(enc *e, const char *id) {
    if (e->n_calls == e->cap_calls) {
        size_t cap = e->cap_calls ? 2 * e->cap_calls : 8;
        const char **p = molt_realloc(e->calls, cap * sizeof *p);
        if (!p)
            return molt_err(MOLT_ENOMEM, "chat: out of memory");
        e->calls = p;
        e->cap_calls = cap;
    }
    e->calls[e->n_calls++] = id;
    return MOLT_OK;
}

static molt_status emit_assistant(enc *e, const group *g, uint8_t mask) {
    bool is_list;
    MOLT_TRY(aggregate(e, g->first, g->count, &is_list));
    if (!is_list) // plain-text answers lose their trailing spaces, as in mistral-common
        while (e->pc[0].len && e->pool.p[e->pc[0].off + e->pc[0].len - 1] == ' ')
            e->pc[0].len--;
    MOLT_TRY(emit_pieces(e, mask));
    bool prefix = false;
    for (size_t i = g->first; i < g->first + g->count; i++) {
        prefix |= e->m[i].prefix;
        for (size_t j = 0; j < json_array_size(e->m[i].calls); j++) {
            const json_t *c = json_array_get(e->m[i].calls, j);
            const json_t *f = json_object_get(c, "function");
            const json_t *name = json_object_get(f, "name");
            MOLT_TRY(emit_special(e, CT_TOOL_CALLS, mask));
            MOLT_TRY(emit_text(e, json_string_value(name), json_string_length(name), mask));
            MOLT_TRY(emit_special(e, CT_ARGS, mask));
            MOLT_TRY(call_args(e, json_object_get(f, "arguments")));
            MOLT_TRY(emit_text(e, e->js.p, e->js.n, mask));
            MOLT_TRY(remember_call(e, json_string_value(json_object_get(c, "id"))));
        }
    }
    return prefix ? MOLT_OK : emit_special(e, CT_EOS, mask);
}

static bool same_id(const char *a, const char *b) { return a == b || (a && b && !strcmp(a, b)); }

// Sort key of a tool result: index of its call among the latest calls (last match, as a
// dictionary built in order keeps), else after all of them; then its place among results.
static void result_key(const enc *e, const group *g, size_t i, size_t *k1, size_t *k2) {
    const char *id = e->m[i].call_id;
    *k1 = SIZE_MAX;
    for (size_t c = 0; c < e->n_calls; c++)
        if (same_id(e->calls[c], id) || (!id && same_id(e->calls[c], "null")))
            *k1 = c;
    *k2 = 0;
    for (size_t j = g->first; j < g->first + g->count; j++)
        if (same_id(e->m[j].call_id, id))
            *k2 = j;
}

static molt_status emit_tool_results(enc *e, const group *g, uint8_t mask) {
    size_t *order = molt_malloc(g->count * sizeof *order);
    if (!order)
        return molt_err(MOLT_ENOMEM, "chat: out of memory");
    for (size_t a = 0; a < g->count; a++) { // stable insertion sort by (k1, k2)
        size_t i = g->first + a, k1, k2, b = a;
        result_key(e, g, i, &k1, &k2);
        while (b > 0) {
            size_t p1, p2;
            result_key(e, g, order[b - 1], &p1, &p2);
            if (p1 < k1 || (p1 == k1 && p2 <= k2))
                break;
            order[b] = order[b - 1];
            b--;
        }
        order[b] = i;
    }
    molt_status st = MOLT_OK;
    for (size_t a = 0; a < g->count && st == MOLT_OK; a++) {
        bool is_list;
        st = aggregate(e, order[a], 1, &is_list);
        if (st == MOLT_OK)
            st = emit_special(e, CT_RESULTS, mask);
        if (st == MOLT_OK)
            st = emit_pieces(e, mask);
        if (st == MOLT_OK)
            st = emit_special(e, CT_RESULTS_END, mask);
    }
    molt_free(order);
    e->n_calls = 0; // results answer only the calls since the previous results
    return st;
}

static int group_weight(const enc *e, const group *g) {
    int w = 1;
    for (size_t i = g->first; i < g->first + g->count; i++)
        w = e->m[i].weight < w ? e->m[i].weight : w;
    return w;
}

static molt_status emit_groups(enc *e, const json_t *record) {
    const chat_opts *o = &e->ct->opts;
    size_t last_assistant = SIZE_MAX;
    for (size_t k = 0; k < e->n_group; k++)
        if (e->g[k].role == ROLE_ASSISTANT)
            last_assistant = k;
    MOLT_TRY(emit_special(e, CT_BOS, 0));
    bool seen_user = false;
    for (size_t k = 0; k < e->n_group; k++) {
        const group *g = &e->g[k];
        int w = group_weight(e, g);
        uint8_t in_mask = o->train_on_inputs && w != 0;
        bool is_list;
        switch (g->role) {
        case ROLE_SYSTEM:
            MOLT_TRY(aggregate(e, g->first, 1, &is_list));
            if (o->version == CHAT_V15 && has_think(e))
                return bad(e, DS_BAD_FIELD_INVALID, "messages[%zu]: chat v15 has no thinking in "
                           "system messages", g->first);
            MOLT_TRY(emit_special(e, CT_SYSTEM, in_mask));
            MOLT_TRY(emit_pieces(e, in_mask));
            MOLT_TRY(emit_special(e, CT_SYSTEM_END, in_mask));
            break;
        case ROLE_USER:
            if (!seen_user)
                MOLT_TRY(emit_tools_settings(e, record, o->train_on_inputs));
            seen_user = true;
            MOLT_TRY(aggregate(e, g->first, g->count, &is_list));
            MOLT_TRY(emit_special(e, CT_INST, in_mask));
            MOLT_TRY(emit_pieces(e, in_mask));
            MOLT_TRY(emit_special(e, CT_INST_END, in_mask));
            break;
        case ROLE_ASSISTANT:
            MOLT_TRY(emit_assistant(
                e, g, w != 0 && (!o->train_last_only || k == last_assistant)));
            break;
        default:
            MOLT_TRY(emit_tool_results(e, g, in_mask));
        }
    }
    return MOLT_OK;
}

// The v15 reasoning effort of a record (NULL: no [MODEL_SETTINGS], always so for v13).
static molt_status check_effort(enc *e, const json_t *record) {
    const json_t *re = json_object_get(record, "reasoning_effort");
    e->effort = e->ct->opts.version == CHAT_V15 ? e->ct->opts.reasoning_default : NULL;
    if (!re || json_is_null(re))
        return MOLT_OK;
    if (e->ct->opts.version == CHAT_V13)
        return bad(e, DS_BAD_FIELD_INVALID, "field 'reasoning_effort' is not supported by chat "
                   "v13");
    e->effort = json_string_value(re);
    if (!e->effort || (strcmp(e->effort, "none") && strcmp(e->effort, "high")))
        return bad(e, DS_BAD_FIELD_INVALID, "field 'reasoning_effort' must be \"none\" or "
                   "\"high\"");
    return MOLT_OK;
}

molt_status chat_encode(const chat_template *ct, const json_t *record, ds_example *out,
                        ds_bad_reason *why) {
    enc e = {.ct = ct, .out = out, .why = why};
    molt_status st;
    if (!json_is_object(record)) {
        st = bad(&e, DS_BAD_FORMAT_UNKNOWN, "record is not a JSON object");
    } else {
        st = parse_messages(&e, record);
        if (st == MOLT_OK)
            st = check_effort(&e, record);
        if (st == MOLT_OK) {
            make_groups(&e);
            st = emit_groups(&e, record);
        }
    }
    molt_free(e.m);
    molt_free(e.g);
    molt_free(e.pc);
    molt_free(e.calls);
    ds_buf_free(&e.pool);
    ds_buf_free(&e.cur);
    ds_buf_free(&e.js);
    tok_ids_free(&e.ids);
    return st;
}
