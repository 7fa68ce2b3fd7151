// infer/server/routes_tokens.c: vLLM's tokenizer routes, in its request and response shapes
// (lm-evaluation-harness uses them as a remote tokenizer): POST /tokenize (a prompt, or chat
// messages through the template), POST /detokenize, GET /tokenizer_info. Not here: the
// tokenizer itself (data/).
#include "srv_internal.h"

#include <string.h>

bool srv_text_ids(srv_server *s, const char *text, size_t n, bool add_bos, tok_ids *out,
                  srv_error *e) {
    int32_t bos = tok_bos(s->tok);
    if (add_bos && bos >= 0 && tok_ids_push(out, bos) != MOLT_OK)
        return srv_fail(e, 500, NULL, "out of memory");
    if (tok_encode(s->tok, text, n, out) != MOLT_OK)
        return srv_fail(e, 400, "prompt", "%s", molt_err_msg());
    return true;
}

static bool model_ok(srv_req *r, const json_t *body, srv_error *e) {
    const char *adapter, *name;
    if (!srv_resolve_model(r->s, body, &adapter, &name, e))
        return false;
    snprintf(r->model, sizeof r->model, "%s", name);
    return true;
}

enum MHD_Result srv_route_tokenize(srv_req *r, json_t *body) {
    srv_server *s = r->s;
    srv_error e = {0};
    tok_ids ids = {0};
    bool strs, add_special;
    const char *prompt = NULL;
    bool chat = json_object_get(body, "messages") != NULL;
    bool ok = model_ok(r, body, &e) &&
              srv_get_bool(body, "return_token_strs", false, &strs, &e) &&
              srv_get_bool(body, "add_special_tokens", !chat, &add_special, &e);
    if (ok && chat) {
        ok = srv_chat_ids(s, body, &ids, &e);
    } else if (ok) {
        ok = srv_get_str(body, "prompt", &prompt, &e);
        if (ok && !prompt)
            ok = srv_fail(&e, 400, "prompt", "field 'prompt' (a string) or 'messages' is "
                          "required");
        if (ok)
            ok = srv_text_ids(s, prompt, json_string_length(json_object_get(body, "prompt")),
                              add_special, &ids, &e);
    }
    if (!ok) {
        tok_ids_free(&ids);
        return srv_reply_error(r, &e);
    }
    json_t *toks = json_array(), *tstrs = strs ? json_array() : json_null();
    srv_job scratch = {.s = s};
    for (size_t i = 0; i < ids.n; i++) {
        json_array_append_new(toks, json_integer(ids.ids[i]));
        if (strs)
            json_array_append_new(tstrs, srv_token_str(&scratch, ids.ids[i]));
    }
    molt_free(scratch.piece);
    json_t *out = json_pack("{s:I, s:i, s:o, s:o}", "count", (json_int_t)ids.n, "max_model_len",
                            eng_max_model_len(s->eng), "tokens", toks, "token_strs", tstrs);
    tok_ids_free(&ids);
    return srv_reply_json(r, 200, out);
}

enum MHD_Result srv_route_detokenize(srv_req *r, json_t *body) {
    srv_server *s = r->s;
    srv_error e = {0};
    if (!model_ok(r, body, &e))
        return srv_reply_error(r, &e);
    const json_t *t = json_object_get(body, "tokens");
    if (!json_is_array(t)) {
        srv_fail(&e, 400, "tokens", "field 'tokens' must be a list of token ids");
        return srv_reply_error(r, &e);
    }
    size_t n = json_array_size(t);
    int32_t *ids = molt_malloc((n ? n : 1) * sizeof *ids);
    long long V = (long long)tok_vocab_size(s->tok);
    for (size_t i = 0; ids && i < n; i++) {
        const json_t *v = json_array_get(t, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= V) {
            molt_free(ids);
            srv_fail(&e, 400, "tokens", "field 'tokens[%zu]' must be a token id in [0, %lld)",
                     i, V);
            return srv_reply_error(r, &e);
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    char *text = NULL;
    size_t len = 0;
    if (!ids || tok_decode(s->tok, ids, n, &text, &len) != MOLT_OK) {
        molt_free(ids);
        molt_free(text);
        srv_fail(&e, 500, NULL, "cannot decode: %s", molt_err_msg());
        return srv_reply_error(r, &e);
    }
    molt_free(ids);
    json_t *out = json_pack("{s:o}", "prompt", srv_jstr(text ? text : "", len));
    molt_free(text);
    return srv_reply_json(r, 200, out);
}

// The name of special token id (NULL when there is none).
static json_t *special_name(srv_server *s, int32_t id) {
    if (id < 0)
        return json_null();
    char *text = NULL;
    size_t len = 0;
    json_t *j = tok_decode(s->tok, &id, 1, &text, &len) == MOLT_OK ? srv_jstr(text, len)
                                                                  : json_null();
    molt_free(text);
    return j;
}

enum MHD_Result srv_route_tokenizer_info(srv_req *r, json_t *body) {
    (void)body;
    srv_server *s = r->s;
    bool tekken = !strcmp(tok_kind(s->tok), "tekken");
    int32_t pad = tok_special(s->tok, "<pad>"), unk = tok_special(s->tok, "<unk>");
    json_t *out = json_pack("{s:s, s:o, s:o, s:o, s:o, s:i, s:I, s:b, s:b}", "tokenizer_class",
                            tekken ? "TekkenTokenizer" : "PreTrainedTokenizerFast", "bos_token",
                            special_name(s, tok_bos(s->tok)), "eos_token",
                            special_name(s, tok_eos(s->tok)), "pad_token", special_name(s, pad),
                            "unk_token", special_name(s, unk), "model_max_length",
                            eng_max_model_len(s->eng), "vocab_size",
                            (json_int_t)tok_vocab_size(s->tok), "add_bos_token",
                            tok_bos(s->tok) >= 0, "add_eos_token", 0);
    return srv_reply_json(r, 200, out);
}
