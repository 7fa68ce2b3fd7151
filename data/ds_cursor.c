// data/ds_cursor.c: the data cursor as bytes, for checkpoints: the magic "MOLTDSCR", the
// version, every field as little-endian integers in declaration order, and an FNV-1a
// checksum of what precedes it. Loading checks all of it before touching the caller's
// cursor. Not here: what the fields mean (pack.c).
#include "ds_internal.h"

#include <string.h>

static const char magic[8] = {'M', 'O', 'L', 'T', 'D', 'S', 'C', 'R'};

typedef struct {
    uint8_t *p;
    size_t n;
} wr;

static void put32(wr *w, uint32_t v) {
    for (int i = 0; i < 4; i++)
        w->p[w->n++] = (uint8_t)(v >> (8 * i));
}

static void put64(wr *w, uint64_t v) {
    for (int i = 0; i < 8; i++)
        w->p[w->n++] = (uint8_t)(v >> (8 * i));
}

static uint32_t get32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}

static uint64_t get64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001B3ull;
    return h;
}

// The 64-bit fields in their saved order; get/put walk the same list.
static void fields(ds_cursor *c, uint64_t **f, size_t *n) {
    size_t k = 0;
    uint64_t *head[] = {&c->seed, &c->config_hash, &c->epoch, &c->window, &c->rows_done,
                        &c->batches, &c->mix_step};
    for (size_t i = 0; i < sizeof head / sizeof *head; i++)
        f[k++] = head[i];
    for (int i = 0; i < DS_MAX_INPUTS; i++) {
        f[k++] = &c->in_pos[i].member;
        f[k++] = &c->in_pos[i].line;
        f[k++] = &c->in_pass[i];
    }
    for (int i = 0; i < DS_BAD_COUNT; i++)
        f[k++] = &c->bad[i];
    f[k++] = &c->truncated;
    *n = k;
}

#define N_FIELDS (7 + 3 * DS_MAX_INPUTS + DS_BAD_COUNT + 1)
_Static_assert(DS_CURSOR_BYTES == 16 + 8 * N_FIELDS + 8, "DS_CURSOR_BYTES is out of date");

size_t ds_cursor_save(const ds_cursor *c, uint8_t *buf, size_t cap) {
    if (cap < DS_CURSOR_BYTES)
        return 0;
    ds_cursor copy = *c;
    uint64_t *f[N_FIELDS];
    size_t n;
    fields(&copy, f, &n);
    wr w = {buf, 0};
    memcpy(buf, magic, sizeof magic);
    w.n = sizeof magic;
    put32(&w, c->version);
    put32(&w, c->n_inputs);
    for (size_t i = 0; i < n; i++)
        put64(&w, *f[i]);
    put64(&w, fnv1a(buf, w.n));
    return w.n;
}

molt_status ds_cursor_load(ds_cursor *c, const uint8_t *buf, size_t n) {
    if (n != DS_CURSOR_BYTES)
        return molt_err(MOLT_EFORMAT, "data cursor: %zu bytes, expected %d", n,
                        DS_CURSOR_BYTES);
    if (memcmp(buf, magic, sizeof magic))
        return molt_err(MOLT_EFORMAT, "data cursor: bad magic (not a molt data cursor)");
    uint32_t version = get32(buf + 8), n_inputs = get32(buf + 12);
    if (version != DS_CURSOR_VERSION)
        return molt_err(MOLT_EFORMAT, "data cursor: version %u, this build reads version %d",
                        version, DS_CURSOR_VERSION);
    if (get64(buf + n - 8) != fnv1a(buf, n - 8))
        return molt_err(MOLT_EFORMAT, "data cursor: checksum mismatch (corrupt bytes)");
    if (n_inputs < 1 || n_inputs > DS_MAX_INPUTS)
        return molt_err(MOLT_EFORMAT, "data cursor: %u inputs (expected 1 to %d)", n_inputs,
                        DS_MAX_INPUTS);
    ds_cursor tmp = {.version = version, .n_inputs = n_inputs};
    uint64_t *f[N_FIELDS];
    size_t nf;
    fields(&tmp, f, &nf);
    for (size_t i = 0; i < nf; i++)
        *f[i] = get64(buf + 16 + 8 * i);
    for (uint32_t i = n_inputs; i < DS_MAX_INPUTS; i++)
        if (tmp.in_pos[i].member || tmp.in_pos[i].line || tmp.in_pass[i])
            return molt_err(MOLT_EFORMAT, "data cursor: position set for unused input %u", i);
    *c = tmp;
    return MOLT_OK;
}
