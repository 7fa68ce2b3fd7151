// data/tok_encode.c: tok_encode: text -> pieces -> BPE. The text is cut into maximal valid
// UTF-8 runs; each byte outside them becomes its one-byte token. A run goes through the
// added-token passes (tokenizer.json: non-normalized then normalized added tokens, matched
// leftmost-longest; special ones stay plain text), then the regex split steps in order, then
// BPE. Every split behaviour keeps all the text except Removed, so decode(encode(x)) == x.
// Not here: the BPE merge loop (tok_bpe.c), loading (tok_tekken.c, tok_hfjson.c).
#include "tok_internal.h"

#include <string.h>

typedef struct {
    const tok_tokenizer *t;
    tok_ids *out;
    pcre2_match_data *md; // shared by all split levels: offsets are copied out before recursing
    void *scratch;        // BPE heap work space
    size_t scratch_cap;
} enc_ctx;

static molt_status split_step(enc_ctx *c, const char *s, size_t n, size_t k);

// Searches s[pos..n) for split k's pattern: 1 with [*ms, *me) on a match, 0 on none.
static molt_status re_find(enc_ctx *c, size_t k, const char *s, size_t n, size_t pos,
                           size_t *ms, size_t *me, int *found) {
    const tok_split *sp = &c->t->splits[k];
    int rc = PCRE2_ERROR_JIT_STACKLIMIT;
    if (sp->jit)
        rc = pcre2_jit_match(sp->re, (PCRE2_SPTR)s, n, pos, 0, c->md, NULL);
    // The JIT's fixed stack can run out on long runs; the interpreter keeps its frames on
    // the heap, so retry there.
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
        rc = pcre2_match(sp->re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, c->md,
                         NULL);
    if (rc == PCRE2_ERROR_NOMATCH) {
        *found = 0;
        return MOLT_OK;
    }
    if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        return molt_err(MOLT_EUNSUPPORTED,
                        "tok_encode: pre-tokenizer step %zu failed on a piece of %zu bytes: %s", k,
                        n, (const char *)msg);
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
    *ms = ov[0];
    *me = ov[1];
    *found = 1;
    return MOLT_OK;
}

static size_t utf8_len(unsigned char c) {
    return c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
}

// Emits piece s[a..b) to the next step (empty pieces vanish).
static molt_status emit(enc_ctx *c, const char *s, size_t a, size_t b, size_t k) {
    return b > a ? split_step(c, s + a, b - a, k + 1) : MOLT_OK;
}

// Cuts s[0..n) at the matches of split k and passes the pieces to step k + 1. The
// behaviours follow the Hugging Face definitions: Isolated (matches and gaps apart), Removed
// (gaps only), MergedWithPrevious (a match joins the gap just before it), MergedWithNext (a
// match joins the gap just after it), Contiguous (adjacent matches form one piece).
static molt_status split_pieces(enc_ctx *c, const char *s, size_t n, size_t k) {
    tok_split_behavior b = c->t->splits[k].behavior;
    size_t pos = 0, last = 0; // search start; end of the previous match
    size_t pend = SIZE_MAX;   // MergedWithNext: start of a match waiting for its gap;
                              // Contiguous: start of the current run of matches
    while (pos <= n) {
        size_t ms, me;
        int found;
        MOLT_TRY(re_find(c, k, s, n, pos, &ms, &me, &found));
        if (!found)
            break;
        bool gap = ms > last;
        switch (b) {
        case TOK_SPLIT_ISOLATED:
            MOLT_TRY(emit(c, s, last, ms, k));
            MOLT_TRY(emit(c, s, ms, me, k));
            break;
        case TOK_SPLIT_REMOVED:
            MOLT_TRY(emit(c, s, last, ms, k));
            break;
        case TOK_SPLIT_MERGED_PREV:
            MOLT_TRY(emit(c, s, last, me, k));
            break;
        case TOK_SPLIT_MERGED_NEXT:
            if (gap)
                MOLT_TRY(emit(c, s, pend != SIZE_MAX ? pend : last, ms, k));
            else if (pend != SIZE_MAX)
                MOLT_TRY(emit(c, s, pend, ms, k));
            pend = ms;
            break;
        case TOK_SPLIT_CONTIGUOUS:
            if (gap) {
                if (pend != SIZE_MAX)
                    MOLT_TRY(emit(c, s, pend, last, k));
                MOLT_TRY(emit(c, s, last, ms, k));
                pend = ms;
            } else if (pend == SIZE_MAX)
                pend = ms;
            break;
        }
        last = me;
        if (me > ms)
            pos = me;
        else if (ms < n)
            pos = ms + utf8_len((unsigned char)s[ms]); // an empty match: step over one char
        else
            break;
    }
    if (b == TOK_SPLIT_MERGED_NEXT && pend != SIZE_MAX)
        return emit(c, s, pend, n, k);
    if (b == TOK_SPLIT_CONTIGUOUS && pend != SIZE_MAX)
        MOLT_TRY(emit(c, s, pend, last, k));
    return emit(c, s, last, n, k);
}

static molt_status split_step(enc_ctx *c, const char *s, size_t n, size_t k) {
    if (k == c->t->n_splits)
        return tok_bpe_piece(c->t, s, n, c->out, &c->scratch, &c->scratch_cap);
    return split_pieces(c, s, n, k);
}

// Added-token pass p over s[0..n): matched non-special tokens are emitted by id, the text
// between them goes to pass p + 1. A special token found here is skipped over as plain text
// (its span is not searched again for other added tokens), as Hugging Face does when it
// encodes special tokens as text.
static molt_status added_pass(enc_ctx *c, const char *s, size_t n, int p) {
    const tok_tokenizer *t = c->t;
    if (p == 2)
        return n ? split_step(c, s, n, 0) : MOLT_OK;
    const tok_added_pass *a = &t->added[p];
    if (a->n == 0)
        return added_pass(c, s, n, p + 1);
    size_t gap = 0, i = 0;
    while (i < n) {
        unsigned char ch = (unsigned char)s[i];
        uint32_t hit = TOK_NONE;
        size_t hit_len = 0;
        for (uint32_t j = a->first[ch]; j < a->first[ch + 1]; j++) {
            size_t len;
            const char *name = tok_strtab_get(&t->names, a->ids[j], &len);
            if (len <= n - i && !memcmp(name, s + i, len)) {
                hit = a->ids[j];
                hit_len = len;
                break;
            }
        }
        if (hit == TOK_NONE) {
            i++;
            continue;
        }
        if (!(t->flags[hit] & TOK_F_SPECIAL)) {
            MOLT_TRY(added_pass(c, s + gap, i - gap, p + 1));
            MOLT_TRY(tok_ids_push(c->out, (int32_t)hit));
            gap = i + hit_len;
        }
        i += hit_len;
    }
    return added_pass(c, s + gap, n - gap, p + 1);
}

static molt_status encode_all(enc_ctx *c, const char *text, size_t len) {
    size_t p = 0;
    while (p < len) {
        size_t v = tok_utf8_valid_prefix(text + p, len - p);
        if (v)
            MOLT_TRY(added_pass(c, text + p, v, 0));
        p += v;
        if (p < len) // a byte that starts no valid UTF-8 sequence
            MOLT_TRY(tok_ids_push(c->out, (int32_t)c->t->byte_id[(unsigned char)text[p++]]));
    }
    return MOLT_OK;
}

molt_status tok_encode(const tok_tokenizer *t, const char *text, size_t len, tok_ids *out) {
    enc_ctx c = {t, out, NULL, NULL, 0};
    if (t->n_splits) {
        c.md = pcre2_match_data_create(1, NULL);
        if (!c.md)
            return molt_err(MOLT_ENOMEM, "tok_encode: out of memory for regex match data");
    }
    size_t n0 = out->n;
    molt_status st = encode_all(&c, text, len);
    if (st != MOLT_OK)
        out->n = n0; // leave the list as it was
    pcre2_match_data_free(c.md);
    molt_free(c.scratch);
    return st;
}
