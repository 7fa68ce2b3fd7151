// model/safetensors.c: the safetensors reader (single files, buffers and sharded indexes),
// the writer, and conversion of float tensors to F32 ag_tensors.
//
// Every header entry is checked against the file (dtype, shape, offsets, contiguity, data
// size) before any tensor is handed out, so later code can trust `data`/`nbytes` blindly.
// Not here: mapping HF or Mistral tensor names to model parts, quantization.
#include "model.h"

#include "../common/fsio.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    char *path;          // for messages and st_shard_path
    const uint8_t *base; // whole file or caller buffer
    size_t len;
    bool mapped;      // munmap on close (else the caller owns base)
    json_t *meta;     // __metadata__ object or NULL
    int first, count; // its tensors in the reader's table while an index is checked
} st_shard;

struct st_reader {
    st_shard *shards;
    int n_shards;
    st_tensor *t; // [n], sorted by name once opening succeeded
    int n, cap;
};

static const struct {
    const char *name;
    size_t size;
} dtype_info[ST_DTYPE_COUNT] = {
    [ST_BOOL] = {"BOOL", 1}, [ST_U8] = {"U8", 1},           [ST_I8] = {"I8", 1},
    [ST_I16] = {"I16", 2},   [ST_U16] = {"U16", 2},         [ST_F16] = {"F16", 2},
    [ST_BF16] = {"BF16", 2}, [ST_I32] = {"I32", 4},         [ST_U32] = {"U32", 4},
    [ST_F32] = {"F32", 4},   [ST_F64] = {"F64", 8},         [ST_I64] = {"I64", 8},
    [ST_U64] = {"U64", 8},   [ST_F8_E4M3] = {"F8_E4M3", 1}, [ST_F8_E5M2] = {"F8_E5M2", 1},
};

const char *st_dtype_name(st_dtype dt) {
    return (unsigned)dt < ST_DTYPE_COUNT ? dtype_info[dt].name : "?";
}

size_t st_dtype_size(st_dtype dt) {
    return (unsigned)dt < ST_DTYPE_COUNT ? dtype_info[dt].size : 0;
}

static bool dtype_parse(const char *s, st_dtype *out) {
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (strcmp(s, dtype_info[i].name) == 0) {
            *out = (st_dtype)i;
            return true;
        }
    return false;
}

// "[2, 3]" (or "[]" for a scalar) into buf.
static const char *shape_str(const int64_t *shape, int ndim, char *buf, size_t cap) {
    size_t at = 0;
    at += (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < ndim && at < cap; i++)
        at += (size_t)snprintf(buf + at, cap - at, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (at < cap)
        snprintf(buf + at, cap - at, "]");
    return buf;
}

// ---------------------------------------------------------------------------------------
// Reader state

static void reader_free(st_reader *r) {
    if (!r)
        return;
    for (int i = 0; i < r->n; i++)
        molt_free((char *)r->t[i].name);
    molt_free(r->t);
    for (int s = 0; s < r->n_shards; s++) {
        st_shard *sh = &r->shards[s];
        if (sh->mapped && sh->base)
            munmap((void *)sh->base, sh->len);
        json_decref(sh->meta);
        molt_free(sh->path);
    }
    molt_free(r->shards);
    molt_free(r);
}

void st_close(st_reader *r) { reader_free(r); }

static molt_status reader_push(st_reader *r, st_tensor **slot) {
    if (r->n == r->cap) {
        int cap = r->cap ? 2 * r->cap : 64;
        st_tensor *t = molt_realloc(r->t, (size_t)cap * sizeof *t);
        if (!t)
            return molt_err(MOLT_ENOMEM, "safetensors: out of memory for %d tensors", cap);
        r->t = t;
        r->cap = cap;
    }
    *slot = &r->t[r->n];
    memset(*slot, 0, sizeof **slot);
    return MOLT_OK;
}

// Adds an empty shard slot; the caller fills base/len/mapped.
static molt_status reader_add_shard(st_reader *r, const char *path, st_shard **out) {
    st_shard *s = molt_realloc(r->shards, (size_t)(r->n_shards + 1) * sizeof *s);
    if (!s)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", path);
    r->shards = s;
    st_shard *sh = &s[r->n_shards];
    memset(sh, 0, sizeof *sh);
    sh->path = molt_strdup(path);
    if (!sh->path)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", path);
    r->n_shards++;
    *out = sh;
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Header validation

static bool get_nonneg_int(const json_t *v, int64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return false;
    *out = (int64_t)json_integer_value(v);
    return true;
}

// Fills t's dtype/shape/numel/nbytes/data from one header entry, checking it against a
// data section of `dsize` bytes at `data`.
static molt_status parse_entry(const char *label, const char *name, const json_t *e,
                               const uint8_t *data, size_t dsize, st_tensor *t) {
    if (!json_is_object(e))
        return molt_err(MOLT_EFORMAT, "%s: tensor '%s': entry is not a JSON object", label, name);
    const json_t *jd = json_object_get(e, "dtype"), *js = json_object_get(e, "shape"),
                 *jo = json_object_get(e, "data_offsets");
    if (!json_is_string(jd))
        return molt_err(MOLT_EFORMAT, "%s: tensor '%s': dtype is missing or not a string", label,
                        name);
    if (!dtype_parse(json_string_value(jd), &t->dtype))
        return molt_err(MOLT_EFORMAT, "%s: tensor '%s': unknown dtype '%s'", label, name,
                        json_string_value(jd));
    if (!json_is_array(js))
        return molt_err(MOLT_EFORMAT, "%s: tensor '%s': shape is missing or not an array", label,
                        name);
    size_t nd = json_array_size(js);
    if (nd > ST_MAX_DIMS)
        return molt_err(MOLT_EFORMAT, "%s: tensor '%s': shape has %zu dims, at most %d supported",
                        label, name, nd, ST_MAX_DIMS);
    t->ndim = (int)nd;
    // Elements * dtype size must fit in int64 (and so in the file): checked per dim.
    const int64_t lim = INT64_MAX / 8;
    t->numel = 1;
    for (size_t i = 0; i < nd; i++) {
        if (!get_nonneg_int(json_array_get(js, i), &t->shape[i]))
            return molt_err(MOLT_EFORMAT,
                            "%s: tensor '%s': shape[%zu] is not a non-negative integer", label,
                            name, i);
        if (t->shape[i] != 0 && t->numel > lim / t->shape[i])
            return molt_err(MOLT_EFORMAT, "%s: tensor '%s': shape product overflows", label, name);
        t->numel *= t->shape[i];
    }
    int64_t b, en;
    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        !get_nonneg_int(json_array_get(jo, 0), &b) || !get_nonneg_int(json_array_get(jo, 1), &en))
        return molt_err(MOLT_EFORMAT,
                        "%s: tensor '%s': data_offsets must be [begin, end] with non-negative "
                        "integers",
                        label, name);
    if (b > en || (uint64_t)en > dsize)
        return molt_err(MOLT_EFORMAT,
                        "%s: tensor '%s': data_offsets [%lld, %lld] out of range for %zu data "
                        "bytes",
                        label, name, (long long)b, (long long)en, dsize);
    int64_t want = t->numel * (int64_t)st_dtype_size(t->dtype);
    if (en - b != want) {
        char sb[160];
        return molt_err(MOLT_EFORMAT,
                        "%s: tensor '%s': data_offsets [%lld, %lld] span %lld bytes, expected "
                        "%lld for shape %s %s",
                        label, name, (long long)b, (long long)en, (long long)(en - b),
                        (long long)want, shape_str(t->shape, t->ndim, sb, sizeof sb),
                        st_dtype_name(t->dtype));
    }
    t->data = data + b;
    t->nbytes = (size_t)want;
    return MOLT_OK;
}

static molt_status parse_metadata(const char *label, const json_t *m, st_shard *sh) {
    if (!json_is_object(m))
        return molt_err(MOLT_EFORMAT, "%s: __metadata__ is not a JSON object", label);
    const char *k;
    const json_t *v;
    json_object_foreach((json_t *)m, k, v) {
        if (!json_is_string(v))
            return molt_err(MOLT_EFORMAT, "%s: __metadata__ value of '%s' is not a string", label,
                            k);
    }
    sh->meta = json_incref((json_t *)m);
    return MOLT_OK;
}

static int cmp_by_offset(const void *pa, const void *pb) {
    const st_tensor *a = *(st_tensor *const *)pa, *b = *(st_tensor *const *)pb;
    if (a->data != b->data)
        return (const uint8_t *)a->data < (const uint8_t *)b->data ? -1 : 1;
    return a->nbytes < b->nbytes ? -1 : a->nbytes > b->nbytes;
}

// Offsets sorted by begin must tile [0, dsize) exactly: no gap, no overlap.
static molt_status check_contiguous(const char *label, st_tensor *t, int n, const uint8_t *data,
                                    size_t dsize) {
    st_tensor **order = molt_malloc((size_t)(n ? n : 1) * sizeof *order);
    if (!order)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", label);
    for (int i = 0; i < n; i++)
        order[i] = &t[i];
    qsort(order, (size_t)n, sizeof *order, cmp_by_offset);
    size_t at = 0;
    const char *prev = NULL;
    molt_status st = MOLT_OK;
    for (int i = 0; i < n && st == MOLT_OK; i++) {
        size_t b = (size_t)((const uint8_t *)order[i]->data - data);
        if (b != at && prev)
            st = molt_err(MOLT_EFORMAT,
                          "%s: tensor '%s': data begins at byte %zu but tensor '%s' ends at %zu "
                          "(%s)",
                          label, order[i]->name, b, prev, at, b > at ? "gap" : "overlap");
        else if (b != at)
            st = molt_err(MOLT_EFORMAT, "%s: tensor '%s': data begins at byte %zu, not 0 (gap)",
                          label, order[i]->name, b);
        at = b + order[i]->nbytes;
        prev = order[i]->name;
    }
    if (st == MOLT_OK && at != dsize)
        st = molt_err(MOLT_EFORMAT, "%s: tensors end at byte %zu of a %zu-byte data section", label,
                      at, dsize);
    molt_free(order);
    return st;
}

static int cmp_by_name(const void *pa, const void *pb) {
    return strcmp(((const st_tensor *)pa)->name, ((const st_tensor *)pb)->name);
}

// Parses the header of shard `s` of r and appends its tensors (sorted by name among
// themselves) to r->t.
static molt_status parse_shard(st_reader *r, int s) {
    st_shard *sh = &r->shards[s];
    const char *label = sh->path;
    if (sh->len < 8)
        return molt_err(MOLT_EFORMAT,
                        "%s: file is %zu bytes, too short for the 8-byte header length", label,
                        sh->len);
    uint64_t hn = 0;
    for (int i = 7; i >= 0; i--)
        hn = (hn << 8) | sh->base[i];
    if (hn > ST_MAX_HEADER)
        return molt_err(MOLT_EFORMAT, "%s: header length %llu exceeds the %u-byte limit", label,
                        (unsigned long long)hn, ST_MAX_HEADER);
    if (hn > sh->len - 8)
        return molt_err(MOLT_EFORMAT,
                        "%s: header length %llu runs past the end of the %zu-byte file", label,
                        (unsigned long long)hn, sh->len);
    json_error_t je;
    json_t *root = json_loadb((const char *)sh->base + 8, (size_t)hn, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return molt_err(MOLT_EFORMAT, "%s: header is not valid JSON: %s (header byte %d)", label,
                        je.text, je.position);
    molt_status st = MOLT_OK;
    if (!json_is_object(root))
        st = molt_err(MOLT_EFORMAT, "%s: header is not a JSON object", label);
    const uint8_t *data = sh->base + 8 + hn;
    size_t dsize = sh->len - 8 - (size_t)hn;
    int first = r->n;
    sh->first = first;
    const char *k;
    json_t *v;
    json_object_foreach(root, k, v) {
        if (st != MOLT_OK)
            break;
        if (strcmp(k, "__metadata__") == 0) {
            st = parse_metadata(label, v, sh);
            continue;
        }
        st_tensor *t = NULL;
        if ((st = reader_push(r, &t)) != MOLT_OK)
            break;
        t->shard = s;
        if (!(t->name = molt_strdup(k))) {
            st = molt_err(MOLT_ENOMEM, "%s: out of memory", label);
            break;
        }
        r->n++; // counted now so reader_free releases the name on any later failure
        st = parse_entry(label, k, v, data, dsize, t);
    }
    json_decref(root);
    st_tensor *mine = r->t ? r->t + first : NULL; // no table at all for an empty header
    if (st == MOLT_OK)
        st = check_contiguous(label, mine, r->n - first, data, dsize);
    if (st == MOLT_OK && r->n - first > 1)
        qsort(mine, (size_t)(r->n - first), sizeof *r->t, cmp_by_name);
    sh->count = r->n - first;
    return st;
}

// ---------------------------------------------------------------------------------------
// Opening

static molt_status map_file(const char *path, st_shard *sh) {
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return molt_err(MOLT_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    molt_status st = MOLT_OK;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode))
        st = molt_err(MOLT_EIO, "%s: not a regular file", path);
    else if (sb.st_size < 8)
        sh->len = (size_t)sb.st_size; // left unmapped: parse_shard rejects it by length
    else {
        void *p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED)
            st = molt_err(MOLT_EIO, "%s: cannot map: %s", path, strerror(errno));
        else {
            sh->base = p;
            sh->len = (size_t)sb.st_size;
            sh->mapped = true;
        }
    }
    close(fd);
    return st;
}

static molt_status finish_single(st_reader *r, st_reader **out) {
    molt_status st = parse_shard(r, 0);
    if (st != MOLT_OK) {
        reader_free(r);
        return st;
    }
    *out = r;
    return MOLT_OK;
}

static molt_status reader_new(st_reader **r) {
    *r = molt_calloc(1, sizeof **r);
    return *r ? MOLT_OK : molt_err(MOLT_ENOMEM, "safetensors: out of memory");
}

molt_status st_open(const char *path, st_reader **out) {
    *out = NULL;
    st_reader *r;
    MOLT_TRY(reader_new(&r));
    st_shard *sh;
    molt_status st = reader_add_shard(r, path, &sh);
    if (st == MOLT_OK)
        st = map_file(path, sh);
    if (st != MOLT_OK) {
        reader_free(r);
        return st;
    }
    return finish_single(r, out);
}

molt_status st_open_memory(const void *buf, size_t len, const char *label, st_reader **out) {
    *out = NULL;
    if (!buf && len)
        return molt_err(MOLT_EARG, "st_open_memory: NULL buffer of %zu bytes", len);
    st_reader *r;
    MOLT_TRY(reader_new(&r));
    st_shard *sh;
    molt_status st = reader_add_shard(r, label ? label : "<memory>", &sh);
    if (st != MOLT_OK) {
        reader_free(r);
        return st;
    }
    sh->base = buf;
    sh->len = len;
    return finish_single(r, out);
}

// ---------------------------------------------------------------------------------------
// Lookup and iteration

int st_count(const st_reader *r) { return r->n; }

const st_tensor *st_at(const st_reader *r, int i) { return i >= 0 && i < r->n ? &r->t[i] : NULL; }

static const st_tensor *find_in(const st_tensor *t, int n, const char *name) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(t[mid].name, name);
        if (c == 0)
            return &t[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

const st_tensor *st_find(const st_reader *r, const char *name) { return find_in(r->t, r->n, name); }

int st_shard_count(const st_reader *r) { return r->n_shards; }

const char *st_shard_path(const st_reader *r, int shard) {
    return shard >= 0 && shard < r->n_shards ? r->shards[shard].path : NULL;
}

const char *st_metadata(const st_reader *r, const char *key) {
    for (int s = 0; s < r->n_shards; s++) {
        const json_t *v = r->shards[s].meta ? json_object_get(r->shards[s].meta, key) : NULL;
        if (v)
            return json_string_value(v);
    }
    return NULL;
}

// ---------------------------------------------------------------------------------------
// Sharded checkpoints

// Shard names are relative to the index's folder; names that climb out of it are refused
// so an index cannot point the reader at arbitrary files.
static bool shard_name_ok(const char *f) { return f[0] && f[0] != '/' && !strstr(f, ".."); }

static char *join_path(const char *dir, const char *file) {
    size_t n = strlen(dir) + strlen(file) + 2;
    char *p = molt_malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, file);
    return p;
}

// Splits `path` (an index file or a folder holding model.safetensors.index.json) into the
// index file path and its folder.
static molt_status index_paths(const char *path, char **index, char **dir) {
    struct stat sb;
    if (stat(path, &sb) != 0)
        return molt_err(MOLT_EIO, "%s: cannot open: %s", path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) {
        *dir = molt_strdup(path);
        *index = join_path(path, "model.safetensors.index.json");
    } else {
        const char *slash = strrchr(path, '/');
        *index = molt_strdup(path);
        *dir = molt_strdup(slash ? path : ".");
        if (*dir && slash)
            (*dir)[slash - path > 0 ? slash - path : 1] = 0; // keep "/" for files in the root
    }
    return *index && *dir ? MOLT_OK : molt_err(MOLT_ENOMEM, "%s: out of memory", path);
}

// Collects "'name' (file)" items for a message, as many as fit.
typedef struct {
    char buf[1200];
    size_t at;
    int count;
} name_list;

static void list_add(name_list *l, const char *name, const char *file) {
    if (l->at + 1 < sizeof l->buf) {
        int k = snprintf(l->buf + l->at, sizeof l->buf - l->at, "%s'%s' (%s)", l->count ? ", " : "",
                         name, file);
        l->at = k < 0 ? l->at : l->at + (size_t)k;
        if (l->at >= sizeof l->buf)
            l->at = sizeof l->buf - 1;
    }
    l->count++;
}

// Opens every shard named by the weight_map once (json object `files`: name -> index).
static molt_status open_shards(st_reader *r, const char *label, const char *dir, json_t *wm,
                               json_t *files) {
    const char *name;
    json_t *v;
    json_object_foreach(wm, name, v) {
        if (!json_is_string(v))
            return molt_err(MOLT_EFORMAT, "%s: weight_map['%s'] is not a string", label, name);
        const char *f = json_string_value(v);
        if (!shard_name_ok(f))
            return molt_err(MOLT_EFORMAT,
                            "%s: weight_map['%s'] names shard '%s' outside the "
                            "checkpoint folder",
                            label, name, f);
        if (json_object_get(files, f))
            continue;
        char *p = join_path(dir, f);
        st_shard *sh;
        molt_status st =
            p ? reader_add_shard(r, p, &sh) : molt_err(MOLT_ENOMEM, "%s: out of memory", label);
        molt_free(p);
        MOLT_TRY(st);
        if (json_object_set_new(files, f, json_integer(r->n_shards - 1)) != 0)
            return molt_err(MOLT_ENOMEM, "%s: out of memory", label);
        MOLT_TRY(map_file(sh->path, sh));
        MOLT_TRY(parse_shard(r, r->n_shards - 1));
    }
    return MOLT_OK;
}

// Every weight_map entry must be in its shard, and every shard tensor in the weight_map.
static molt_status check_index(st_reader *r, const char *label, json_t *wm, json_t *files) {
    name_list *miss = molt_calloc(2, sizeof *miss), *extra = miss ? miss + 1 : NULL;
    if (!miss)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", label);
    const char *name;
    json_t *v;
    json_object_foreach(wm, name, v) {
        const char *f = json_string_value(v);
        const st_shard *sh = &r->shards[json_integer_value(json_object_get(files, f))];
        if (!sh->count || !find_in(r->t + sh->first, sh->count, name))
            list_add(miss, name, f);
    }
    for (int i = 0; i < r->n; i++) {
        const json_t *m = json_object_get(wm, r->t[i].name);
        const json_t *idx = m ? json_object_get(files, json_string_value(m)) : NULL;
        if (!idx || json_integer_value(idx) != r->t[i].shard)
            list_add(extra, r->t[i].name, r->shards[r->t[i].shard].path);
    }
    molt_status st = MOLT_OK;
    if (miss->count || extra->count)
        st = molt_err(MOLT_EFORMAT,
                      "%s: %d mapped tensor(s) missing from their shard%s%s; %d shard tensor(s) "
                      "not in weight_map%s%s",
                      label, miss->count, miss->count ? ": " : "", miss->buf, extra->count,
                      extra->count ? ": " : "", extra->buf);
    molt_free(miss);
    return st;
}

static molt_status read_index(st_reader *r, const char *index, const char *dir) {
    json_error_t je;
    json_t *root = json_load_file(index, JSON_REJECT_DUPLICATES, &je), *files = json_object();
    molt_status st = MOLT_OK;
    json_t *wm = root ? json_object_get(root, "weight_map") : NULL;
    json_t *meta = root ? json_object_get(root, "metadata") : NULL;
    json_t *total = json_is_object(meta) ? json_object_get(meta, "total_size") : NULL;
    int64_t tmp;
    if (!files)
        st = molt_err(MOLT_ENOMEM, "%s: out of memory", index);
    else if (!root)
        st = molt_err(MOLT_EFORMAT, "%s: not valid JSON: %s (line %d)", index, je.text, je.line);
    else if (!json_is_object(wm) || json_object_size(wm) == 0)
        st = molt_err(MOLT_EFORMAT, "%s: weight_map is missing, empty or not an object", index);
    else if (meta && (!json_is_object(meta) || (total && !get_nonneg_int(total, &tmp))))
        st = molt_err(MOLT_EFORMAT, "%s: metadata.total_size is not a non-negative integer", index);
    // total_size itself is not compared with the shards: exporters disagree on what it counts.
    if (st == MOLT_OK)
        st = open_shards(r, index, dir, wm, files);
    if (st == MOLT_OK)
        st = check_index(r, index, wm, files);
    if (st == MOLT_OK && r->n > 1)
        qsort(r->t, (size_t)r->n, sizeof *r->t, cmp_by_name);
    json_decref(files);
    json_decref(root);
    return st;
}

molt_status st_open_index(const char *path, st_reader **out) {
    *out = NULL;
    char *index = NULL, *dir = NULL;
    st_reader *r = NULL;
    molt_status st = index_paths(path, &index, &dir);
    if (st == MOLT_OK)
        st = reader_new(&r);
    if (st == MOLT_OK)
        st = read_index(r, index, dir);
    molt_free(index);
    molt_free(dir);
    if (st != MOLT_OK) {
        reader_free(r);
        return st;
    }
    *out = r;
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Decoding and conversion

float st_decode_f16(uint16_t h) {
    int e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : ldexp(1024 + m, e - 25);
    return (float)((h >> 15) ? -v : v);
}

double st_decode_f8_e4m3(uint8_t b) {
    int e = (b >> 3) & 15, m = b & 7;
    double v = e == 15 && m == 7 ? NAN : e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
    return (b >> 7) ? -v : v;
}

double st_decode_f8_e5m2(uint8_t b) {
    int e = (b >> 2) & 31, m = b & 3;
    double v = e == 0 ? ldexp(m, -16) : e == 31 ? (m ? NAN : INFINITY) : ldexp(4 + m, e - 17);
    return (b >> 7) ? -v : v;
}

static uint64_t load_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static bool is_float(st_dtype dt) {
    return dt == ST_F32 || dt == ST_F64 || dt == ST_F16 || dt == ST_BF16 || dt == ST_F8_E4M3 ||
           dt == ST_F8_E5M2;
}

// Element i of a float tensor (bytes read one by one: data may be unaligned).
static double decode_at(st_dtype dt, const uint8_t *p, int64_t i) {
    switch (dt) {
    case ST_F32: {
        uint32_t u = (uint32_t)load_le(p + 4 * i, 4);
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    case ST_F64: {
        uint64_t u = load_le(p + 8 * i, 8);
        double d;
        memcpy(&d, &u, 8);
        return d;
    }
    case ST_F16: return st_decode_f16((uint16_t)load_le(p + 2 * i, 2));
    case ST_BF16: return ag_bf16_to_f32((uint16_t)load_le(p + 2 * i, 2));
    case ST_F8_E4M3: return st_decode_f8_e4m3(p[i]);
    case ST_F8_E5M2: return st_decode_f8_e5m2(p[i]);
    default: return NAN; // callers check is_float first
    }
}

molt_status st_to_f32(const st_tensor *t, double scale, ag_arena *a, ag_tensor **out) {
    *out = NULL;
    if (!is_float(t->dtype))
        return molt_err(MOLT_EUNSUPPORTED, "st_to_f32: tensor '%s' has dtype %s, not a float type",
                        t->name, st_dtype_name(t->dtype));
    if (t->ndim > AG_MAX_DIMS || t->numel == 0) {
        char sb[160];
        return molt_err(MOLT_EUNSUPPORTED,
                        "st_to_f32: tensor '%s' of shape %s: need 1 to %d dims and elements",
                        t->name, shape_str(t->shape, t->ndim, sb, sizeof sb), AG_MAX_DIMS);
    }
    int64_t one = 1;
    ag_tensor *o = ag_tensor_new(a, AG_F32, t->ndim ? t->ndim : 1, t->ndim ? t->shape : &one);
    if (!o)
        return molt_err_wrap(MOLT_ENOMEM, "st_to_f32: tensor '%s'", t->name);
    float *y = o->data;
    const uint8_t *p = t->data;
    for (int64_t i = 0; i < t->numel; i++)
        y[i] = (float)(decode_at(t->dtype, p, i) * scale);
    *out = o;
    return MOLT_OK;
}

molt_status st_read_scalar(const st_tensor *t, double *out) {
    if (!is_float(t->dtype) || t->numel != 1)
        return molt_err(MOLT_EFORMAT, "tensor '%s': expected one float element, got %lld of %s",
                        t->name, (long long)t->numel, st_dtype_name(t->dtype));
    *out = decode_at(t->dtype, t->data, 0);
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Writing

// Adds one tensor's header entry at data offset *at; checks what the caller filled in.
static molt_status write_entry(json_t *root, const st_tensor *t, size_t *at, size_t *nbytes) {
    const char *nm = t->name ? t->name : "(null)";
    if (!t->name || strcmp(t->name, "__metadata__") == 0 || json_object_get(root, t->name))
        return molt_err(MOLT_EARG, "st_write: tensor name '%s' is missing, reserved or repeated",
                        nm);
    if ((unsigned)t->dtype >= ST_DTYPE_COUNT || t->ndim < 0 || t->ndim > ST_MAX_DIMS)
        return molt_err(MOLT_EARG, "st_write: tensor '%s': bad dtype or %d dims", nm, t->ndim);
    json_t *shape = json_array(), *e = json_object();
    uint64_t n = st_dtype_size(t->dtype);
    bool ok = shape && e;
    for (int i = 0; ok && i < t->ndim; i++) {
        ok = t->shape[i] >= 0 &&
             (t->shape[i] == 0 || n <= (uint64_t)INT64_MAX / (uint64_t)t->shape[i]);
        n *= ok ? (uint64_t)t->shape[i] : 1;
        ok = ok && json_array_append_new(shape, json_integer(t->shape[i])) == 0;
    }
    ok = ok && (n == 0 || t->data);
    if (ok)
        ok = json_object_set_new(e, "dtype", json_string(st_dtype_name(t->dtype))) == 0 &&
             json_object_set(e, "shape", shape) == 0 &&
             json_object_set_new(e, "data_offsets",
                                 json_pack("[I,I]", (json_int_t)*at, (json_int_t)(*at + n))) == 0 &&
             json_object_set(root, t->name, e) == 0;
    json_decref(shape);
    json_decref(e);
    if (!ok)
        return molt_err(MOLT_EARG, "st_write: tensor '%s': bad shape, missing data or bad name",
                        nm);
    *nbytes = (size_t)n;
    *at += (size_t)n;
    return MOLT_OK;
}

static molt_status build_header(const st_tensor *ts, int n, const st_meta *meta, int n_meta,
                                size_t *sizes, json_t *root) {
    if (n_meta > 0) {
        json_t *m = json_object();
        if (!m || json_object_set_new(root, "__metadata__", m) != 0)
            return molt_err(MOLT_ENOMEM, "st_write: out of memory");
        for (int i = 0; i < n_meta; i++)
            if (!meta[i].key || !meta[i].value ||
                json_object_set_new(m, meta[i].key, json_string(meta[i].value)) != 0)
                return molt_err(MOLT_EARG, "st_write: metadata entry %d is not a UTF-8 string pair",
                                i);
    }
    size_t at = 0;
    for (int i = 0; i < n; i++)
        MOLT_TRY(write_entry(root, &ts[i], &at, &sizes[i]));
    return MOLT_OK;
}

// Written to a temporary name beside path, synced and renamed (common/fsio.h).
static molt_status write_file(const char *path, const char *hdr, const st_tensor *ts, int n,
                              const size_t *sizes) {
    size_t hl = strlen(hdr), padded = (hl + 7) / 8 * 8;
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    molt_wfile w;
    MOLT_TRY(molt_wfile_open(&w, path));
    FILE *f = w.f;
    bool ok = fwrite(len8, 1, 8, f) == 8 && fwrite(hdr, 1, hl, f) == hl;
    for (size_t i = hl; ok && i < padded; i++)
        ok = fputc(' ', f) != EOF;
    for (int i = 0; ok && i < n; i++)
        ok = sizes[i] == 0 || fwrite(ts[i].data, 1, sizes[i], f) == sizes[i];
    if (!ok) {
        molt_status st = molt_err(MOLT_EIO, "%s: write failed: %s", path, strerror(errno));
        molt_wfile_abort(&w);
        return st;
    }
    return molt_wfile_commit(&w);
}

molt_status st_write(const char *path, const st_tensor *tensors, int n, const st_meta *meta,
                     int n_meta) {
    if (n < 0 || (n > 0 && !tensors) || (n_meta > 0 && !meta))
        return molt_err(MOLT_EARG, "st_write: %s: bad tensor or metadata list", path);
    json_t *root = json_object();
    size_t *sizes = molt_calloc((size_t)n + 1, sizeof *sizes);
    molt_status st = root && sizes ? build_header(tensors, n, meta, n_meta, sizes, root)
                                   : molt_err(MOLT_ENOMEM, "st_write: out of memory");
    char *hdr = st == MOLT_OK ? json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    if (st == MOLT_OK && !hdr)
        st = molt_err(MOLT_ENOMEM, "st_write: out of memory");
    if (st == MOLT_OK)
        st = write_file(path, hdr, tensors, n, sizes);
    free(hdr); // allocated by jansson
    json_decref(root);
    molt_free(sizes);
    return st;
}
