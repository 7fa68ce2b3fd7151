// train/ckpt_read.c: reading and validating a checkpoint file (format in checkpoint.c)
// through its header and manifest alone. HDF5 is never asked to parse it: a checkpoint may
// come from anywhere, and HDF5 1.10 crashes on some crafted metadata. Every number of the
// header and the manifest is range-checked before use: data ranges lie inside the file,
// past the user block; sizes agree with dims; names are 1-127 printable bytes without '/'
// and unique per kind; memory is bounded by the file's size. The SHA-256 of the header
// catches accidental damage, the digest of the contents a file whose header was rewritten
// to match damaged contents.
//
// Not here: writing (checkpoint.c), the container (ckpt_state.c).
#include "train.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

// Where the bytes come from: a file descriptor or a buffer.
typedef struct {
    int fd;
    const uint8_t *buf;
    uint64_t size;
} source;

static molt_status src_read(const source *s, uint64_t off, void *dst, uint64_t n) {
    if (off > s->size || n > s->size - off)
        return molt_err(MOLT_EFORMAT, "a data range [%" PRIu64 ", +%" PRIu64 ") runs past the "
                        "end of the file (%" PRIu64 " bytes)", off, n, s->size);
    if (s->buf) {
        memcpy(dst, s->buf + off, (size_t)n);
        return MOLT_OK;
    }
    for (uint64_t done = 0; done < n;) {
        size_t chunk = n - done > ((size_t)1 << 30) ? (size_t)1 << 30 : (size_t)(n - done);
        ssize_t got = pread(s->fd, (uint8_t *)dst + done, chunk, (off_t)(off + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return molt_err(MOLT_EIO, "read error: %s", got < 0 ? strerror(errno) : "short read");
        done += (uint64_t)got;
    }
    return MOLT_OK;
}

// SHA-256 of bytes [from, size) as hex.
static molt_status hash_range(const source *s, uint64_t from, char hex[65]) {
    molt_sha256 c;
    molt_sha256_init(&c);
    uint8_t buf[1 << 16], d[32];
    for (uint64_t at = from; at < s->size;) {
        uint64_t n = s->size - at < sizeof buf ? s->size - at : sizeof buf;
        MOLT_TRY(src_read(s, at, buf, n));
        molt_sha256_update(&c, buf, (size_t)n);
        at += n;
    }
    molt_sha256_final(&c, d);
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", d[i]);
    return MOLT_OK;
}

// ---- a strict line reader over NUL-terminated text --------------------------------------

// Reads an unsigned decimal of at most 20 digits (no sign, no leading '+'), up to max.
static bool read_u64(const char **p, uint64_t max, uint64_t *out) {
    const char *s = *p;
    uint64_t v = 0;
    int digits = 0;
    for (; *s >= '0' && *s <= '9'; s++, digits++) {
        uint64_t d = (uint64_t)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    if (digits == 0 || digits > 20 || v > max || (digits > 1 && **p == '0'))
        return false;
    *p = s;
    *out = v;
    return true;
}

static bool expect(const char **p, const char *word) {
    size_t n = strlen(word);
    if (strncmp(*p, word, n))
        return false;
    *p += n;
    return true;
}

// "<key> <u64>\n"
static bool key_u64(const char **p, const char *key, uint64_t max, uint64_t *out) {
    return expect(p, key) && expect(p, " ") && read_u64(p, max, out) && expect(p, "\n");
}

// "<key> <64 lowercase hex digits>\n"
static bool key_hex(const char **p, const char *key, char hex[65]) {
    if (!expect(p, key) || !expect(p, " "))
        return false;
    for (int i = 0; i < 64; i++) {
        char c = (*p)[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return false;
        hex[i] = c;
    }
    hex[64] = 0;
    *p += 64;
    return expect(p, "\n");
}

// ---- header ------------------------------------------------------------------------------
typedef struct {
    uint64_t size, ub, step, entries;
    char digest[65], sha[65];
} header;

static molt_status read_header(const source *s, header *h) {
    char text[CKPT_HEADER_BYTES + 1] = {0};
    if (s->size < CKPT_HEADER_BYTES)
        return molt_err(MOLT_EFORMAT, "not a molt checkpoint (%" PRIu64 " bytes, shorter than "
                        "its header)", s->size);
    MOLT_TRY(src_read(s, 0, text, CKPT_HEADER_BYTES));
    const char *p = text;
    uint64_t version;
    if (!expect(&p, CKPT_MAGIC "\n"))
        return molt_err(MOLT_EFORMAT, "not a molt checkpoint (no %s header)", CKPT_MAGIC);
    if (!key_u64(&p, "version", 1000000, &version))
        return molt_err(MOLT_EFORMAT, "damaged checkpoint header (version)");
    if (version != CKPT_FORMAT_VERSION)
        return molt_err(MOLT_EFORMAT, "checkpoint format version %" PRIu64 " (this build reads "
                        "version %d%s)", version, CKPT_FORMAT_VERSION,
                        version < CKPT_FORMAT_VERSION ? "; version 1 was written by earlier molt "
                                                        "builds, which can still read it" : "");
    if (!key_u64(&p, "size", UINT64_MAX, &h->size) ||
        !key_u64(&p, "userblock", (uint64_t)1 << 40, &h->ub) ||
        !key_u64(&p, "step", INT64_MAX, &h->step) ||
        !key_u64(&p, "entries", CKPT_MAX_ENTRIES, &h->entries) ||
        !key_hex(&p, "digest", h->digest) || !key_hex(&p, "sha256", h->sha))
        return molt_err(MOLT_EFORMAT, "damaged checkpoint header (near byte %d)",
                        (int)(p - text));
    for (; p < text + CKPT_HEADER_BYTES; p++)
        if (*p)
            return molt_err(MOLT_EFORMAT, "damaged checkpoint header (stray byte %d)",
                            (int)(p - text));
    if (h->size != s->size)
        return molt_err(MOLT_EFORMAT, "truncated or extended: %" PRIu64 " bytes, expected %"
                        PRIu64, s->size, h->size);
    if (h->ub < CKPT_HEADER_BYTES || (h->ub & (h->ub - 1)) || h->ub > h->size)
        return molt_err(MOLT_EFORMAT, "damaged checkpoint header (user block %" PRIu64 ")",
                        h->ub);
    char have[65];
    MOLT_TRY(hash_range(s, CKPT_HEADER_BYTES, have));
    if (strcmp(have, h->sha) != 0)
        return molt_err(MOLT_EFORMAT, "corrupt: file checksum mismatch");
    return MOLT_OK;
}

// ---- manifest ----------------------------------------------------------------------------
typedef struct {
    char kind;
    int ndim;
    int64_t shape[AG_MAX_DIMS];
    uint64_t offset, bytes;
    char name[CKPT_NAME_MAX];
} entry;

// One line "<K> <offset> <bytes> <ndim> <dims...> <name>\n" into e, checked against the file.
static molt_status parse_line(const char **pp, const header *h, int lineno, entry *e) {
    const char *p = *pp;
    uint64_t ndim, d;
    e->kind = *p;
    if (!strchr("TIFB", e->kind) || !e->kind)
        return molt_err(MOLT_EFORMAT, "manifest line %d: unknown kind", lineno);
    p++;
    if (!expect(&p, " ") || !read_u64(&p, h->size, &e->offset) || !expect(&p, " ") ||
        !read_u64(&p, h->size, &e->bytes) || !expect(&p, " ") ||
        !read_u64(&p, AG_MAX_DIMS, &ndim))
        return molt_err(MOLT_EFORMAT, "manifest line %d: damaged", lineno);
    e->ndim = (int)ndim;
    uint64_t numel = 1;
    for (int i = 0; i < e->ndim; i++) {
        if (!expect(&p, " ") || !read_u64(&p, h->size, &d))
            return molt_err(MOLT_EFORMAT, "manifest line %d: damaged dims", lineno);
        e->shape[i] = (int64_t)d;
        numel = d && numel <= h->size / d ? numel * d : (d ? h->size + 1 : 0);
    }
    if (!expect(&p, " "))
        return molt_err(MOLT_EFORMAT, "manifest line %d: damaged", lineno);
    size_t len = strcspn(p, "\n");
    if (p[len] != '\n' || len == 0 || len >= CKPT_NAME_MAX)
        return molt_err(MOLT_EFORMAT, "manifest line %d: bad name (1-%d characters)", lineno,
                        CKPT_NAME_MAX - 1);
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)p[i] < 0x20 || p[i] == 0x7f || p[i] == '/')
            return molt_err(MOLT_EFORMAT, "manifest line %d: bad character in a name", lineno);
    memcpy(e->name, p, len);
    e->name[len] = 0;
    *pp = p + len + 1;
    bool ok;
    switch (e->kind) {
    case 'T':
        ok = e->ndim >= 1 && numel >= 1 && numel <= h->size / 4 && e->bytes == numel * 4;
        break;
    case 'B':
        ok = e->ndim == 1 && e->bytes == (uint64_t)e->shape[0] && (e->bytes || !e->offset);
        break;
    default: // I, F
        ok = e->ndim == 0 && e->bytes == 8;
    }
    if (!ok)
        return molt_err(MOLT_EFORMAT, "manifest: entry '%s': its size does not match its kind "
                        "and dims", e->name);
    if (e->bytes && (e->offset < h->ub || e->offset > h->size - e->bytes))
        return molt_err(MOLT_EFORMAT, "manifest: entry '%s': its data lie outside the HDF5 "
                        "part of the file", e->name);
    return MOLT_OK;
}

static int cmp_entry(const void *a, const void *b) {
    const entry *x = a, *y = b;
    return x->kind != y->kind ? x->kind - y->kind : strcmp(x->name, y->name);
}

static molt_status read_manifest(const source *s, const header *h, entry **out) {
    uint64_t cap = h->ub - CKPT_HEADER_BYTES;
    if (h->entries > cap / 8)
        return molt_err(MOLT_EFORMAT, "manifest: %" PRIu64 " entries cannot fit in %" PRIu64
                        " bytes", h->entries, cap);
    char *text = molt_malloc((size_t)cap + 1);
    entry *e = molt_calloc((size_t)(h->entries ? h->entries : 1), sizeof *e);
    molt_status st = text && e ? src_read(s, CKPT_HEADER_BYTES, text, cap)
                               : molt_err(MOLT_ENOMEM, "checkpoint: out of memory");
    if (st == MOLT_OK) {
        text[cap] = 0;
        const char *p = text;
        for (uint64_t i = 0; st == MOLT_OK && i < h->entries; i++)
            st = parse_line(&p, h, (int)i + 1, &e[i]);
        for (; st == MOLT_OK && p < text + cap; p++)
            if (*p)
                st = molt_err(MOLT_EFORMAT, "manifest: more lines than its %" PRIu64
                              " entries", h->entries);
    }
    if (st == MOLT_OK && h->entries > 1) {
        qsort(e, (size_t)h->entries, sizeof *e, cmp_entry);
        for (uint64_t i = 1; st == MOLT_OK && i < h->entries; i++)
            if (!cmp_entry(&e[i - 1], &e[i]))
                st = molt_err(MOLT_EFORMAT, "manifest: entry '%s' appears twice", e[i].name);
    }
    molt_free(text);
    if (st != MOLT_OK) {
        molt_free(e);
        return st;
    }
    *out = e;
    return MOLT_OK;
}

// ---- contents ----------------------------------------------------------------------------
static uint64_t le64(const uint8_t *b) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | b[i];
    return v;
}

// Reserves arrays of exactly the counts of each kind in s (entries are sorted by kind).
static molt_status alloc_state(ckpt_state *s, const entry *e, uint64_t n) {
    int count[4] = {0}; // B, F, I, T
    for (uint64_t i = 0; i < n; i++)
        count[e[i].kind == 'B' ? 0 : e[i].kind == 'F' ? 1 : e[i].kind == 'I' ? 2 : 3]++;
    s->blobs = molt_calloc((size_t)count[0] + 1, sizeof *s->blobs);
    s->floats = molt_calloc((size_t)count[1] + 1, sizeof *s->floats);
    s->ints = molt_calloc((size_t)count[2] + 1, sizeof *s->ints);
    s->tensors = molt_calloc((size_t)count[3] + 1, sizeof *s->tensors);
    s->cap_blobs = count[0] + 1;
    s->cap_floats = count[1] + 1;
    s->cap_ints = count[2] + 1;
    s->cap_tensors = count[3] + 1;
    if (!s->blobs || !s->floats || !s->ints || !s->tensors)
        return molt_err(MOLT_ENOMEM, "checkpoint: out of memory");
    return MOLT_OK;
}

static molt_status read_entry(const source *src, const entry *e, ckpt_state *s) {
    uint8_t *raw = molt_malloc((size_t)e->bytes + 1);
    if (!raw)
        return molt_err(MOLT_ENOMEM, "checkpoint: out of memory for '%s' (%" PRIu64 " bytes)",
                        e->name, e->bytes);
    molt_status st = src_read(src, e->offset, raw, e->bytes);
    if (st != MOLT_OK) {
        molt_free(raw);
        return st;
    }
    if (e->kind == 'B') {
        raw[e->bytes] = 0;
        ckpt_blob *b = &s->blobs[s->n_blobs++];
        snprintf(b->name, sizeof b->name, "%s", e->name);
        b->data = raw;
        b->len = (size_t)e->bytes;
        return MOLT_OK;
    }
    if (e->kind == 'T') {
        float *x = (float *)(void *)raw; // molt_malloc memory is suitably aligned
        for (uint64_t i = 0; i < e->bytes / 4; i++) {
            const uint8_t *b = raw + 4 * i;
            uint32_t u = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
                         (uint32_t)b[3] << 24;
            memcpy(&x[i], &u, 4);
        }
        ckpt_tensor *t = &s->tensors[s->n_tensors++];
        snprintf(t->name, sizeof t->name, "%s", e->name);
        t->ndim = e->ndim;
        memcpy(t->shape, e->shape, sizeof t->shape);
        t->numel = (int64_t)(e->bytes / 4);
        t->data = x;
        return MOLT_OK;
    }
    uint64_t v = le64(raw);
    molt_free(raw);
    ckpt_scalar *c = e->kind == 'I' ? &s->ints[s->n_ints++] : &s->floats[s->n_floats++];
    snprintf(c->name, sizeof c->name, "%s", e->name);
    if (e->kind == 'I')
        c->i = (int64_t)v;
    else
        memcpy(&c->f, &v, 8);
    return MOLT_OK;
}

static molt_status read_source(const source *src, ckpt_state *s) {
    header h;
    MOLT_TRY(read_header(src, &h));
    entry *e = NULL;
    MOLT_TRY(read_manifest(src, &h, &e));
    molt_status st = alloc_state(s, e, h.entries);
    for (uint64_t i = 0; st == MOLT_OK && i < h.entries; i++)
        st = read_entry(src, &e[i], s);
    molt_free(e);
    s->step = (int64_t)h.step;
    char have[65];
    if (st == MOLT_OK) {
        ckpt_state_digest(s, have);
        if (strcmp(have, h.digest) != 0)
            st = molt_err(MOLT_EFORMAT, "corrupt: contents checksum mismatch");
    }
    return st;
}

static molt_status finish(molt_status st, const char *label, ckpt_state *s) {
    if (st != MOLT_OK) {
        ckpt_state_free(s);
        molt_err_wrap(st, "checkpoint %s", label);
    }
    return st;
}

molt_status ckpt_read(const char *path, ckpt_state *s) {
    ckpt_state_init(s);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return finish(molt_err(MOLT_EIO, "cannot open: %s", strerror(errno)), path, s);
    struct stat sb;
    molt_status st = MOLT_OK;
    if (fstat(fd, &sb) != 0)
        st = molt_err(MOLT_EIO, "cannot stat: %s", strerror(errno));
    else if (!S_ISREG(sb.st_mode))
        st = molt_err(MOLT_EFORMAT, "not a regular file");
    source src = {fd, NULL, (uint64_t)sb.st_size};
    if (st == MOLT_OK)
        st = read_source(&src, s);
    close(fd);
    return finish(st, path, s);
}

molt_status ckpt_read_memory(const void *buf, size_t len, const char *label, ckpt_state *s) {
    ckpt_state_init(s);
    source src = {-1, buf, len};
    return finish(read_source(&src, s), label, s);
}
