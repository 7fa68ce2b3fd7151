// data/dataset.c: records to examples. One JSONL line is checked (UTF-8, JSON, object),
// its format detected from its fields (or forced), and encoded: chat and alpaca through the
// chat template, completion and raw text as plain token runs. ds_source reads one input
// record by record under the bad-record policy and reports problems as
// FILE[:MEMBER]:LINE:COL: reason. Not here: mixing inputs, shuffling, packing (pack.c).
#include "ds_internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

// Fields that announce each format, for detection.
static const char *const format_keys[DS_FORMAT_COUNT][2] = {
    [DS_FORMAT_CHAT] = {"messages", NULL},
    [DS_FORMAT_ALPACA] = {"instruction", "output"},
    [DS_FORMAT_COMPLETION] = {"prompt", "completion"},
    [DS_FORMAT_TEXT] = {"text", NULL},
};

static molt_status bad(ds_record_info *info, ds_bad_reason why, int col, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;
static molt_status bad(ds_record_info *info, ds_bad_reason why, int col, const char *fmt, ...) {
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    info->why = why;
    info->col = col;
    return molt_err(MOLT_EFORMAT, "%s", text);
}

static const char *type_name(const json_t *v) {
    static const char *const names[] = {"an object", "an array", "a string", "an integer",
                                        "a number", "true", "false", "null"};
    return names[json_typeof(v)];
}

// The field of a key in the record's format: a string, non-empty unless may_be_empty.
// Absent or null: missing, unless optional (then *out = NULL).
static molt_status string_field(const json_t *rec, const char *key, bool optional,
                                bool may_be_empty, ds_record_info *info, const json_t **out) {
    const json_t *v = json_object_get(rec, key);
    *out = NULL;
    if (!v || json_is_null(v))
        return optional ? MOLT_OK
                        : bad(info, DS_BAD_FIELD_MISSING, 1, "missing field '%s'", key);
    if (!json_is_string(v))
        return bad(info, DS_BAD_FIELD_INVALID, 1, "field '%s' must be a string, not %s", key,
                   type_name(v));
    if (!may_be_empty && !json_string_length(v))
        return bad(info, DS_BAD_FIELD_EMPTY, 1, "empty field '%s'", key);
    *out = v;
    return MOLT_OK;
}

static molt_status detect(const json_t *rec, ds_format *f, ds_record_info *info) {
    ds_format found[DS_FORMAT_COUNT];
    const char *key[DS_FORMAT_COUNT];
    int n = 0;
    for (int k = DS_FORMAT_CHAT; k < DS_FORMAT_COUNT; k++)
        for (int j = 0; j < 2 && format_keys[k][j]; j++)
            if (json_object_get(rec, format_keys[k][j])) {
                found[n] = (ds_format)k;
                key[n++] = format_keys[k][j];
                break;
            }
    if (n == 0)
        return bad(info, DS_BAD_FORMAT_UNKNOWN, 1, "unknown record format: no 'messages', "
                   "'instruction'/'output', 'prompt'/'completion' or 'text' field");
    if (n > 1)
        return bad(info, DS_BAD_FORMAT_MIXED, 1, "mixed record format: fields of %s ('%s') "
                   "and %s ('%s'); pick one with --format", ds_format_name(found[0]), key[0],
                   ds_format_name(found[1]), key[1]);
    *f = found[0];
    return MOLT_OK;
}

static molt_status push_message(json_t *msgs, const char *role, const json_t *content) {
    json_t *m = json_pack("{s:s, s:O}", "role", role, "content", (json_t *)content);
    if (!m || json_array_append_new(msgs, m))
        return molt_err(MOLT_ENOMEM, "out of memory building a chat record");
    return MOLT_OK;
}

// {"instruction", "input"?, "output", "system"?} as one chat exchange: the user turn is the
// instruction, followed by "\n\n" and the input when there is one.
static molt_status encode_alpaca(const chat_template *ct, const json_t *rec, ds_example *out,
                                 ds_record_info *info) {
    const json_t *ins, *input, *output, *sys;
    MOLT_TRY(string_field(rec, "instruction", false, false, info, &ins));
    MOLT_TRY(string_field(rec, "input", true, true, info, &input));
    MOLT_TRY(string_field(rec, "output", false, false, info, &output));
    MOLT_TRY(string_field(rec, "system", true, false, info, &sys));
    json_t *chat = json_object(), *msgs = json_array(), *user = NULL;
    ds_buf u = {0};
    molt_status st = chat && msgs && !json_object_set(chat, "messages", msgs)
                         ? MOLT_OK
                         : molt_err(MOLT_ENOMEM, "out of memory building a chat record");
    if (st == MOLT_OK)
        st = ds_buf_put(&u, json_string_value(ins), json_string_length(ins));
    if (st == MOLT_OK && json_string_length(input)) {
        st = ds_buf_puts(&u, "\n\n");
        if (st == MOLT_OK)
            st = ds_buf_put(&u, json_string_value(input), json_string_length(input));
    }
    if (st == MOLT_OK && !(user = json_stringn(u.p, u.n)))
        st = molt_err(MOLT_ENOMEM, "out of memory building a chat record");
    if (st == MOLT_OK && sys)
        st = push_message(msgs, "system", sys);
    if (st == MOLT_OK)
        st = push_message(msgs, "user", user);
    if (st == MOLT_OK)
        st = push_message(msgs, "assistant", output);
    if (st == MOLT_OK)
        st = chat_encode(ct, chat, out, &info->why);
    json_decref(user);
    json_decref(msgs);
    json_decref(chat);
    ds_buf_free(&u);
    return st;
}

static molt_status encode_plain(const chat_template *ct, const json_t *text, uint8_t mask,
                                ds_example *out) {
    tok_ids ids = {0};
    molt_status st = tok_encode(chat_template_tokenizer(ct), json_string_value(text),
                                json_string_length(text), &ids);
    if (st == MOLT_OK)
        st = ds_example_append(out, ids.ids, ids.n, mask);
    tok_ids_free(&ids);
    return st;
}

// {"prompt", "completion"}: <s>prompt completion</s> with no template; {"text"}: <s>text</s>.
static molt_status encode_raw(const chat_template *ct, ds_format f, const json_t *rec,
                              ds_example *out, ds_record_info *info) {
    const json_t *a, *b = NULL;
    if (f == DS_FORMAT_COMPLETION) {
        MOLT_TRY(string_field(rec, "prompt", false, false, info, &a));
        MOLT_TRY(string_field(rec, "completion", false, false, info, &b));
    } else {
        MOLT_TRY(string_field(rec, "text", false, false, info, &a));
    }
    uint8_t in_mask = f == DS_FORMAT_TEXT || chat_template_opts(ct)->train_on_inputs;
    int32_t bos = chat_template_bos(ct), eos = chat_template_eos(ct);
    if (bos >= 0) // a tokenizer without sequence markers gets the bare text
        MOLT_TRY(ds_example_push(out, bos, 0));
    MOLT_TRY(encode_plain(ct, a, in_mask, out));
    if (b)
        MOLT_TRY(encode_plain(ct, b, 1, out));
    return eos >= 0 ? ds_example_push(out, eos, 1) : MOLT_OK;
}

molt_status ds_record_encode(const chat_template *ct, ds_format format, const char *line,
                             size_t len, int max_seq_len, bool truncate, ds_example *out,
                             ds_record_info *info) {
    *info = (ds_record_info){.format = format, .col = 1};
    size_t at = ds_utf8_check(line, len);
    if (at < len)
        return bad(info, DS_BAD_UTF8, (int)at + 1, "invalid UTF-8 (byte 0x%02x)",
                   (unsigned char)line[at]);
    json_error_t err;
    json_t *rec = json_loadb(line, len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &err);
    if (!rec)
        return bad(info, DS_BAD_JSON, err.column > 0 ? err.column : 1, "invalid JSON: %s",
                   err.text);
    molt_status st = MOLT_OK;
    if (!json_is_object(rec))
        st = bad(info, DS_BAD_FORMAT_UNKNOWN, 1, "record is not a JSON object but %s",
                 type_name(rec));
    if (st == MOLT_OK && format == DS_FORMAT_AUTO)
        st = detect(rec, &info->format, info);
    if (st == MOLT_OK) {
        size_t start = out->n;
        switch (info->format) {
        case DS_FORMAT_CHAT: st = chat_encode(ct, rec, out, &info->why); break;
        case DS_FORMAT_ALPACA: st = encode_alpaca(ct, rec, out, info); break;
        default: st = encode_raw(ct, info->format, rec, out, info);
        }
        size_t n = out->n - start;
        if (st == MOLT_OK && max_seq_len > 0 && n > (size_t)max_seq_len) {
            // a trained token needs the token before it in the same example
            bool trained = false;
            for (size_t i = start + 1; truncate && i < start + (size_t)max_seq_len; i++)
                trained |= out->mask[i] != 0;
            if (truncate && trained) {
                out->n = start + (size_t)max_seq_len;
                info->truncated = true;
            } else if (truncate) {
                st = bad(info, DS_BAD_TOO_LONG, 1, "example has %zu tokens, more than "
                         "max_seq_len %d, and cut there it keeps no trained token", n,
                         max_seq_len);
            } else {
                st = bad(info, DS_BAD_TOO_LONG, 1, "example has %zu tokens, more than "
                         "max_seq_len %d", n, max_seq_len);
            }
        }
    }
    json_decref(rec);
    return st;
}

// ---- one input under the bad-record policy ----------------------------------------------

molt_status ds_source_open(ds_source *s, const char *path) {
    memset(s->bad, 0, sizeof s->bad);
    memset(s->by_format, 0, sizeof s->by_format);
    s->truncated = s->blank = s->examples = 0;
    return ds_reader_open(path, s->max_line, &s->r);
}

void ds_source_close(ds_source *s) {
    ds_reader_close(s->r);
    s->r = NULL;
}

static bool blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r')
            return false;
    return true;
}

// Subsampling decision for the current line (same answer whenever the line is read again).
static bool keep_line(const ds_source *s) {
    ds_pos p = ds_reader_tell(s->r);
    uint64_t h = ds_mix64(ds_mix64(s->keep_key, p.member), p.line);
    return ds_unit(h) < s->keep_frac;
}

static uint64_t mix_str(uint64_t h, const char *s) {
    for (; *s; s++)
        h = ds_mix64(h, (unsigned char)*s);
    return ds_mix64(h, 0x100); // end mark: no byte value, so "ab"+"c" differs from "a"+"bc"
}

double ds_holdout_unit(const char *path, const char *member, uint64_t line, uint64_t seed) {
    const char *base = strrchr(path, '/');
    uint64_t h = mix_str(ds_mix64(seed, 0x401D0A7u), base ? base + 1 : path);
    h = member ? mix_str(ds_mix64(h, 1), member) : ds_mix64(h, 0);
    return ds_unit(ds_mix64(h, line));
}

// Split decision for the last line read: true when it belongs to the side this source keeps.
static bool holdout_side(const ds_source *s) {
    double u = ds_holdout_unit(ds_reader_path(s->r), ds_reader_member(s->r),
                               ds_reader_lineno(s->r), s->holdout_seed);
    return (u < s->holdout_frac) == s->holdout_keep;
}

molt_status ds_source_next(ds_source *s, ds_example *ex, bool *end) {
    char where[1024];
    *end = false;
    for (;;) {
        const char *line;
        size_t len;
        bool oversize;
        ds_example_clear(ex);
        MOLT_TRY(ds_reader_next(s->r, &line, &len, &oversize));
        if (!line) {
            *end = true;
            return MOLT_OK;
        }
        if (s->keep_frac < 1 && !keep_line(s))
            continue;
        if (s->holdout_frac > 0 && !holdout_side(s))
            continue;
        if (blank(line, len)) {
            s->blank++;
            continue;
        }
        ds_record_info info = {.col = 1};
        molt_status st;
        if (oversize)
            st = bad(&info, DS_BAD_TOO_LONG, 1, "record of %zu bytes, more than the %zu-byte "
                     "line limit", len, s->max_line ? s->max_line : (size_t)64 << 20);
        else
            st = ds_record_encode(s->ct, s->format, line, len, s->max_seq_len,
                                  s->on_bad == DS_ON_BAD_TRUNCATE, ex, &info);
        if (st == MOLT_OK) {
            s->truncated += info.truncated;
            s->examples++;
            s->by_format[info.format]++;
            return MOLT_OK;
        }
        ds_reader_where(s->r, info.col, where, sizeof where);
        if (st != MOLT_EFORMAT)
            return molt_err_wrap(st, "%s", where);
        if (s->on_bad == DS_ON_BAD_SKIP) {
            s->bad[info.why]++;
            continue;
        }
        return molt_err_wrap(st, "%s", where);
    }
}
