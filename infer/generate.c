// infer/generate.c: the decode loop of one sequence on the paged latent cache: prefill the
// prompt, then sample and feed back one token at a time, streaming the text as complete
// UTF-8 characters; and the prompt's ids (plain text or one chat turn). Not here: the
// sampler (sample.c), argument parsing (cli.c), batching several requests.
#include "infer.h"

#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ---------------------------------------------------------------------------------------
// UTF-8 streaming

// Length of the character a lead byte starts (0 for a continuation or invalid byte).
static size_t utf8_len(unsigned char b) {
    if (b < 0x80)
        return 1;
    if (b >= 0xC2 && b <= 0xDF)
        return 2;
    if (b >= 0xE0 && b <= 0xEF)
        return 3;
    if (b >= 0xF0 && b <= 0xF4)
        return 4;
    return 0;
}

molt_status inf_utf8_push(inf_utf8 *u, const char *bytes, size_t n, size_t *ready) {
    if (u->n + n + 1 > u->cap) {
        size_t cap = (u->n + n + 1) * 2;
        char *b = molt_realloc(u->buf, cap);
        if (!b)
            return molt_err(MOLT_ENOMEM, "generate: out of memory for output text");
        u->buf = b;
        u->cap = cap;
    }
    memcpy(u->buf + u->n, bytes, n);
    u->n += n;
    *ready = u->n;
    // Hold back a lead byte among the last three whose character is not complete yet;
    // anything else (complete characters, stray bytes) goes out as it is.
    for (size_t k = 1; k <= 3 && k <= u->n; k++) {
        unsigned char b = (unsigned char)u->buf[u->n - k];
        if ((b & 0xC0) == 0x80)
            continue;
        size_t want = utf8_len(b);
        if (want > k)
            *ready = u->n - k;
        break;
    }
    return MOLT_OK;
}

void inf_utf8_consume(inf_utf8 *u, size_t n) {
    memmove(u->buf, u->buf + n, u->n - n);
    u->n -= n;
}

void inf_utf8_free(inf_utf8 *u) {
    molt_free(u->buf);
    memset(u, 0, sizeof *u);
}

// ---------------------------------------------------------------------------------------
// Prompt

molt_status inf_prompt_ids(const tok_tokenizer *t, const char *text, size_t len, bool chat,
                           tok_ids *out) {
    if (!chat) {
        int32_t bos = tok_bos(t);
        if (bos >= 0)
            MOLT_TRY(tok_ids_push(out, bos));
        return tok_encode(t, text, len, out);
    }
    chat_template *ct;
    MOLT_TRY(chat_template_new(t, NULL, &ct));
    json_t *rec = json_pack("{s:[{s:s, s:s%}]}", "messages", "role", "user", "content", text,
                            len);
    ds_example ex = {0};
    molt_status st = rec ? chat_encode(ct, rec, &ex, NULL)
                         : molt_err(MOLT_EARG, "generate: the prompt is not valid UTF-8");
    for (size_t i = 0; st == MOLT_OK && i < ex.n; i++)
        st = tok_ids_push(out, ex.ids[i]);
    ds_example_free(&ex);
    json_decref(rec);
    chat_template_free(ct);
    return st;
}

// ---------------------------------------------------------------------------------------
// Decode loop

void inf_gen_opts_default(inf_gen_opts *o) {
    *o = (inf_gen_opts){.max_tokens = 128, .prefill_mode = MDL_ATTN_EXPANDED,
                        .decode_mode = MDL_ATTN_ABSORBED, .stop_at_eos = true, .eos = -1,
                        .slot = -1};
    inf_sample_opts_default(&o->sample);
}

static bool is_stop(const mdl_model *m, const inf_gen_opts *o, int32_t t) {
    if (!o->stop_at_eos)
        return false;
    for (int i = 0; i < m->cfg.n_eos; i++)
        if (m->cfg.eos_token_ids[i] == t)
            return true;
    return o->eos >= 0 && t == o->eos;
}

// Everything one generation holds.
typedef struct {
    ag_ctx c;
    mdl_kvcache kv;
    mdl_bank own;          // the empty bank used when the caller gives none
    const mdl_bank *bank;
    inf_sampler smp;
    inf_utf8 text;
    char *piece; // the text of one token (grown by tok_decode)
    int seq;
} gen_state;

// Sends the text of token t (complete characters only) to the callback.
static molt_status emit_token(gen_state *g, const inf_gen_opts *o, int32_t t) {
    if (!o->tok || !o->on_text)
        return MOLT_OK;
    size_t len = 0, ready;
    if (g->piece)
        g->piece[0] = 0;
    MOLT_TRY(tok_decode(o->tok, &t, 1, &g->piece, &len));
    MOLT_TRY(inf_utf8_push(&g->text, g->piece, len, &ready));
    if (ready > 0) {
        o->on_text(o->user, g->text.buf, ready);
        inf_utf8_consume(&g->text, ready);
    }
    return MOLT_OK;
}

static molt_status decode_loop(gen_state *g, const mdl_model *m, const int32_t *prompt,
                               int n_prompt, const inf_gen_opts *o, int32_t *out, int *n_out,
                               inf_gen_stats *st) {
    int64_t V = m->cfg.vocab_size;
    ag_tensor *lg;
    double t0 = now_s();
    int ne = o->prefill_mode == MDL_ATTN_EXPANDED ? n_prompt : 0;
    mdl_span sp = {g->seq, prompt, n_prompt, ne, o->slot, 1};
    MOLT_TRY(mdl_forward_spans(&g->c, m, &g->kv, g->bank, &sp, 1, &lg));
    st->prefill_s = now_s() - t0;
    t0 = now_s();
    for (int i = 0; i < o->max_tokens; i++) {
        int32_t tok;
        MOLT_TRY(inf_sample(&g->smp, lg->data, V, &tok));
        out[i] = tok;
        *n_out = st->n_gen = i + 1;
        if (is_stop(m, o, tok)) {
            st->stopped_at_eos = true;
            break;
        }
        MOLT_TRY(emit_token(g, o, tok));
        if (i + 1 == o->max_tokens)
            break;
        ag_ctx_step_reset(&g->c);
        mdl_span d = {g->seq, &tok, 1, o->decode_mode == MDL_ATTN_EXPANDED, o->slot, 1};
        MOLT_TRY(mdl_forward_spans(&g->c, m, &g->kv, g->bank, &d, 1, &lg));
    }
    st->decode_s = now_s() - t0;
    if (g->text.n > 0 && o->on_text) // an unfinished character at the very end
        o->on_text(o->user, g->text.buf, g->text.n);
    return MOLT_OK;
}

molt_status inf_generate(const mdl_model *m, const int32_t *prompt, int n_prompt,
                         const inf_gen_opts *o, int32_t *out, int *n_out, inf_gen_stats *st) {
    inf_gen_stats local;
    st = st ? st : &local;
    *st = (inf_gen_stats){.n_prompt = n_prompt};
    *n_out = 0;
    if (!prompt || n_prompt < 1 || o->max_tokens < 0)
        return molt_err(MOLT_EARG, "generate: %d prompt tokens, %d to generate", n_prompt,
                        o->max_tokens);
    char what[96];
    snprintf(what, sizeof what, "generate: %d prompt + %d new tokens", n_prompt, o->max_tokens);
    MOLT_TRY(mcfg_check_positions(&m->cfg, (int64_t)n_prompt + o->max_tokens, what));
    gen_state g = {0};
    molt_status s = MOLT_OK;
    if (o->bank) {
        g.bank = o->bank;
    } else if (o->slot >= 0) {
        return molt_err(MOLT_EARG, "generate: adapter slot %d without a bank", o->slot);
    } else { // an empty bank: the same kernels as a server's base requests
        s = mdl_bank_init(&g.own, m, 1);
        g.bank = &g.own;
    }
    if (s == MOLT_OK)
        s = inf_sampler_init(&g.smp, &o->sample);
    if (s == MOLT_OK)
        s = ag_ctx_init(&g.c);
    if (s == MOLT_OK)
        s = mdl_kv_init(&g.kv, &m->cfg, o->block_tokens, n_prompt + o->max_tokens);
    if (s == MOLT_OK)
        s = mdl_kv_seq_open(&g.kv, &g.seq);
    if (s == MOLT_OK)
        s = decode_loop(&g, m, prompt, n_prompt, o, out, n_out, st);
    molt_free(g.piece);
    inf_utf8_free(&g.text);
    mdl_kv_free(&g.kv);
    ag_ctx_free(&g.c);
    inf_sampler_free(&g.smp);
    mdl_bank_free(&g.own);
    return s;
}
