// train/ckpt_state.c: the in-memory contents of a checkpoint (named tensors, scalars and
// byte blobs), the checksum over them, and the check that a checkpoint belongs to the
// current base model and tokenizer.
//
// Not here: the HDF5 file format, atomic writing and scanning (checkpoint.c).
#include "train.h"

#include <stddef.h>
#include <string.h>

void ckpt_state_init(ckpt_state *s) {
    memset(s, 0, sizeof *s);
}

void ckpt_state_free(ckpt_state *s) {
    for (int i = 0; i < s->n_tensors; i++)
        molt_free(s->tensors[i].data);
    for (int i = 0; i < s->n_blobs; i++)
        molt_free(s->blobs[i].data);
    molt_free(s->tensors);
    molt_free(s->ints);
    molt_free(s->floats);
    molt_free(s->blobs);
    ckpt_state_init(s);
}

static molt_status check_name(const char *what, const char *name) {
    size_t n = name ? strlen(name) : 0;
    if (n == 0 || n >= CKPT_NAME_MAX || strchr(name, '/') || strcmp(name, ".") == 0)
        return molt_err(MOLT_EARG,
                        "checkpoint: bad %s name '%s' (1-%d characters, no '/', not '.')", what,
                        name ? name : "(null)", CKPT_NAME_MAX - 1);
    return MOLT_OK;
}

// Grows *arr (of *cap elements of size sz) to hold at least need; the array is kept on
// failure.
static molt_status grow(void **arr, int *cap, int need, size_t sz) {
    if (need <= *cap)
        return MOLT_OK;
    int ncap = *cap ? *cap * 2 : 8;
    while (ncap < need)
        ncap *= 2;
    void *p = molt_realloc(*arr, (size_t)ncap * sz);
    if (!p)
        return molt_err(MOLT_ENOMEM, "checkpoint: out of memory");
    *arr = p;
    *cap = ncap;
    return MOLT_OK;
}

// Index of the entry called key in an array of n entries of size stride that start with
// their name, or -1.
static int find_named(const void *arr, size_t stride, int n, const char *key) {
    for (int i = 0; i < n; i++)
        if (strcmp((const char *)arr + (size_t)i * stride, key) == 0)
            return i;
    return -1;
}

static int find_tensor(const ckpt_state *s, const char *name) {
    return find_named(s->tensors, sizeof *s->tensors, s->n_tensors, name);
}
static int find_blob(const ckpt_state *s, const char *name) {
    return find_named(s->blobs, sizeof *s->blobs, s->n_blobs, name);
}
static int find_scalar(const ckpt_scalar *a, int n, const char *name) {
    return find_named(a, sizeof *a, n, name);
}

molt_status ckpt_set_tensor(ckpt_state *s, const char *name, int ndim, const int64_t *shape,
                            const float *data) {
    MOLT_TRY(check_name("tensor", name));
    if (ndim < 1 || ndim > AG_MAX_DIMS)
        return molt_err(MOLT_EARG, "checkpoint: tensor '%s' has %d dims (1-%d)", name, ndim,
                        AG_MAX_DIMS);
    int64_t numel = 1;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 1 || shape[d] > ((int64_t)1 << 40) / numel)
            return molt_err(MOLT_EARG, "checkpoint: tensor '%s' dim %d has bad size %lld", name,
                            d, (long long)shape[d]);
        numel *= shape[d];
    }
    float *copy = molt_malloc((size_t)numel * sizeof(float));
    if (!copy)
        return molt_err(MOLT_ENOMEM, "checkpoint: out of memory for tensor '%s'", name);
    memcpy(copy, data, (size_t)numel * sizeof(float));
    int i = find_tensor(s, name);
    if (i < 0) {
        molt_status st = grow((void **)&s->tensors, &s->cap_tensors, s->n_tensors + 1,
                              sizeof *s->tensors);
        if (st != MOLT_OK) {
            molt_free(copy);
            return st;
        }
        i = s->n_tensors++;
    } else {
        molt_free(s->tensors[i].data);
    }
    ckpt_tensor *t = &s->tensors[i];
    memset(t, 0, sizeof *t);
    strcpy(t->name, name);
    t->ndim = ndim;
    memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->numel = numel;
    t->data = copy;
    return MOLT_OK;
}

static molt_status set_scalar(ckpt_scalar **arr, int *n, int *cap, const char *name,
                              int64_t iv, double fv) {
    MOLT_TRY(check_name("scalar", name));
    int i = find_scalar(*arr, *n, name);
    if (i < 0) {
        MOLT_TRY(grow((void **)arr, cap, *n + 1, sizeof **arr));
        i = (*n)++;
    }
    ckpt_scalar *e = &(*arr)[i];
    memset(e, 0, sizeof *e);
    strcpy(e->name, name);
    e->i = iv;
    e->f = fv;
    return MOLT_OK;
}

molt_status ckpt_set_int(ckpt_state *s, const char *name, int64_t v) {
    return set_scalar(&s->ints, &s->n_ints, &s->cap_ints, name, v, 0);
}

molt_status ckpt_set_float(ckpt_state *s, const char *name, double v) {
    return set_scalar(&s->floats, &s->n_floats, &s->cap_floats, name, 0, v);
}

molt_status ckpt_set_blob(ckpt_state *s, const char *name, const void *data, size_t len) {
    MOLT_TRY(check_name("blob", name));
    uint8_t *copy = molt_malloc(len + 1);
    if (!copy)
        return molt_err(MOLT_ENOMEM, "checkpoint: out of memory for blob '%s'", name);
    if (len)
        memcpy(copy, data, len);
    copy[len] = 0;
    int i = find_blob(s, name);
    if (i < 0) {
        molt_status st =
            grow((void **)&s->blobs, &s->cap_blobs, s->n_blobs + 1, sizeof *s->blobs);
        if (st != MOLT_OK) {
            molt_free(copy);
            return st;
        }
        i = s->n_blobs++;
    } else {
        molt_free(s->blobs[i].data);
    }
    ckpt_blob *b = &s->blobs[i];
    memset(b, 0, sizeof *b);
    strcpy(b->name, name);
    b->data = copy;
    b->len = len;
    return MOLT_OK;
}

molt_status ckpt_set_string(ckpt_state *s, const char *name, const char *text) {
    return ckpt_set_blob(s, name, text, strlen(text));
}

const ckpt_tensor *ckpt_get_tensor(const ckpt_state *s, const char *name) {
    int i = find_tensor(s, name);
    return i < 0 ? NULL : &s->tensors[i];
}

const ckpt_blob *ckpt_get_blob(const ckpt_state *s, const char *name) {
    int i = find_blob(s, name);
    return i < 0 ? NULL : &s->blobs[i];
}

molt_status ckpt_get_int(const ckpt_state *s, const char *name, int64_t *v) {
    int i = find_scalar(s->ints, s->n_ints, name);
    if (i < 0)
        return molt_err(MOLT_EFORMAT, "checkpoint has no integer '%s'", name);
    *v = s->ints[i].i;
    return MOLT_OK;
}

molt_status ckpt_get_float(const ckpt_state *s, const char *name, double *v) {
    int i = find_scalar(s->floats, s->n_floats, name);
    if (i < 0)
        return molt_err(MOLT_EFORMAT, "checkpoint has no float '%s'", name);
    *v = s->floats[i].f;
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Checksum: entries are hashed in name order so the digest does not depend on the order
// they were set in or listed by HDF5. Numbers are hashed as little-endian bytes.

static void feed_u64(molt_sha256 *c, uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(v >> (8 * i));
    molt_sha256_update(c, b, 8);
}

static void feed_name(molt_sha256 *c, char tag, const char *name) {
    molt_sha256_update(c, &tag, 1);
    molt_sha256_update(c, name, strlen(name) + 1);
}

// Index of the entry that follows `prev` in strcmp order (prev NULL = the first), or -1.
// Entries start with their name; checkpoints hold few entries, so a scan per step is fine.
static int next_by_name(const char *base, size_t stride, int n, const char *prev) {
    int best = -1;
    for (int i = 0; i < n; i++) {
        const char *nm = base + (size_t)i * stride;
        if (prev && strcmp(nm, prev) <= 0)
            continue;
        if (best < 0 || strcmp(nm, base + (size_t)best * stride) < 0)
            best = i;
    }
    return best;
}

typedef void (*feed_fn)(molt_sha256 *c, const void *entry);

// Feeds the n entries of an array (element size stride) in name order.
static void feed_sorted(molt_sha256 *c, const void *arr, size_t stride, int n, feed_fn feed) {
    const char *base = arr, *prev = NULL;
    for (int i; (i = next_by_name(base, stride, n, prev)) >= 0;) {
        prev = base + (size_t)i * stride;
        feed(c, prev);
    }
}

static void feed_tensor(molt_sha256 *c, const void *entry) {
    const ckpt_tensor *t = entry;
    feed_name(c, 'T', t->name);
    feed_u64(c, (uint64_t)t->ndim);
    for (int d = 0; d < t->ndim; d++)
        feed_u64(c, (uint64_t)t->shape[d]);
    for (int64_t i = 0; i < t->numel; i++) {
        uint32_t u;
        memcpy(&u, &t->data[i], 4);
        uint8_t b[4] = {(uint8_t)u, (uint8_t)(u >> 8), (uint8_t)(u >> 16), (uint8_t)(u >> 24)};
        molt_sha256_update(c, b, 4);
    }
}

static void feed_int(molt_sha256 *c, const void *entry) {
    const ckpt_scalar *e = entry;
    feed_name(c, 'I', e->name);
    feed_u64(c, (uint64_t)e->i);
}

static void feed_float(molt_sha256 *c, const void *entry) {
    const ckpt_scalar *e = entry;
    uint64_t u;
    memcpy(&u, &e->f, 8);
    feed_name(c, 'F', e->name);
    feed_u64(c, u);
}

static void feed_blob(molt_sha256 *c, const void *entry) {
    const ckpt_blob *b = entry;
    feed_name(c, 'B', b->name);
    feed_u64(c, b->len);
    molt_sha256_update(c, b->data, b->len);
}

void ckpt_state_digest(const ckpt_state *s, char hex[65]) {
    molt_sha256 c;
    molt_sha256_init(&c);
    feed_u64(&c, CKPT_FORMAT_VERSION);
    feed_u64(&c, (uint64_t)s->step);
    feed_sorted(&c, s->tensors, sizeof *s->tensors, s->n_tensors, feed_tensor);
    feed_sorted(&c, s->ints, sizeof *s->ints, s->n_ints, feed_int);
    feed_sorted(&c, s->floats, sizeof *s->floats, s->n_floats, feed_float);
    feed_sorted(&c, s->blobs, sizeof *s->blobs, s->n_blobs, feed_blob);
    uint8_t d[32];
    molt_sha256_final(&c, d);
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[d[i] >> 4];
        hex[2 * i + 1] = digits[d[i] & 15];
    }
    hex[64] = '\0';
}

// ---------------------------------------------------------------------------------------
// Base model and tokenizer hashes.

static const struct {
    const char *blob, *what;
    size_t offset;
} hash_fields[3] = {
    {"hash.model_config", "base model config", offsetof(ckpt_hashes, model_config)},
    {"hash.weights_index", "base model weights index", offsetof(ckpt_hashes, weights_index)},
    {"hash.tokenizer", "tokenizer", offsetof(ckpt_hashes, tokenizer)},
};

molt_status ckpt_set_hashes(ckpt_state *s, const ckpt_hashes *h) {
    for (int i = 0; i < 3; i++)
        MOLT_TRY(ckpt_set_string(s, hash_fields[i].blob,
                                 (const char *)h + hash_fields[i].offset));
    return MOLT_OK;
}

molt_status ckpt_check_hashes(const ckpt_state *s, const char *path, const ckpt_hashes *cur,
                              bool force, char *warn, size_t warn_cap) {
    char msg[1024];
    size_t len = 0;
    msg[0] = '\0';
    for (int i = 0; i < 3; i++) {
        const ckpt_blob *b = ckpt_get_blob(s, hash_fields[i].blob);
        const char *want = (const char *)cur + hash_fields[i].offset;
        const char *have = b ? (const char *)b->data : "(none)";
        if (strcmp(have, want) == 0)
            continue;
        int w = snprintf(msg + len, sizeof msg - len, "%s%s hash differs (checkpoint %s, now %s)",
                         len ? "; " : "", hash_fields[i].what, have, want);
        if (w > 0)
            len = (size_t)w + len < sizeof msg ? len + (size_t)w : sizeof msg - 1;
    }
    if (warn && warn_cap)
        warn[0] = '\0';
    if (len == 0)
        return MOLT_OK;
    if (force) {
        if (warn && warn_cap)
            snprintf(warn, warn_cap, "checkpoint %s was made for another base model or "
                     "tokenizer: %s; resuming anyway (--force)", path, msg);
        return MOLT_OK;
    }
    return molt_err(MOLT_EARG,
                    "checkpoint %s was made for another base model or tokenizer: %s; "
                    "pass --force to resume from it anyway",
                    path, msg);
}
