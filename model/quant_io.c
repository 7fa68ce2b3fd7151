// model/quant_io.c: pre-quantized checkpoints. Each quantized weight is stored under its HF
// name with its state beside it, so no re-quantization happens on load:
//   NF4  `N` U8 [(numel+1)/2, 1] packed codes, `N.absmax` (F32, or U8 codes with double
//        quantization), `N.quant_map` F32 [16], `N.nested_absmax` F32, `N.nested_quant_map`
//        F32 [256] (double quantization only) and `N.quant_state.bitsandbytes__nf4`, a U8
//        tensor holding JSON (quant_type, blocksize, dtype, shape, nested_blocksize,
//        nested_dtype, nested_offset): the names and keys bitsandbytes' QuantState uses.
//   INT8 `N` I8 with the per-row scales in `<module>.SCB` (bitsandbytes' 8-bit name).
//   FP8  `N` F8_E4M3 with `N_scale_inv` F32: scalar/[E,1,1] per matrix, or [.., rows, 1].
//   BF16 `N` BF16 (kept as bf16); F32 groups, embeddings and norms plain F32.
// The metadata key molt_quant marks the file. Not here: quantizing (quant_model.c).
#include "mdl_quant.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "../autograd/quant_internal.h"

#define NAME_CAP 320
#define QS_SUFFIX ".quant_state.bitsandbytes__nf4"

// ---------------------------------------------------------------------------------------
// Writing

typedef struct {
    st_tensor *t;
    int n, cap;
    char **owned; // names and buffers to free
    int n_owned, cap_owned;
} qout;

static void *own(qout *o, void *p) {
    if (!p)
        return NULL;
    if (o->n_owned == o->cap_owned) {
        int cap = o->cap_owned ? 2 * o->cap_owned : 64;
        char **np = molt_realloc(o->owned, (size_t)cap * sizeof *np);
        if (!np) {
            molt_free(p);
            return NULL;
        }
        o->owned = np;
        o->cap_owned = cap;
    }
    o->owned[o->n_owned++] = p;
    return p;
}

static void qout_free(qout *o) {
    for (int i = 0; i < o->n_owned; i++)
        molt_free(o->owned[i]);
    molt_free(o->owned);
    molt_free(o->t);
}

// Appends tensor `name` (copied) pointing at data (not copied: must outlive the write).
static molt_status put(qout *o, const char *name, st_dtype dt, int ndim, const int64_t *shape,
                       const void *data) {
    if (o->n == o->cap) {
        int cap = o->cap ? 2 * o->cap : 64;
        st_tensor *nt = molt_realloc(o->t, (size_t)cap * sizeof *nt);
        if (!nt)
            return molt_err(MOLT_ENOMEM, "saving quantized weights: out of memory");
        o->t = nt;
        o->cap = cap;
    }
    char *nm = own(o, molt_strdup(name));
    if (!nm)
        return molt_err(MOLT_ENOMEM, "saving quantized weights: out of memory");
    st_tensor *t = &o->t[o->n++];
    memset(t, 0, sizeof *t);
    t->name = nm;
    t->dtype = dt;
    t->ndim = ndim;
    memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->data = data;
    return MOLT_OK;
}

static void scb_name(const char *n, char *buf, size_t cap) {
    size_t len = strlen(n);
    if (len > 7 && strcmp(n + len - 7, ".weight") == 0)
        snprintf(buf, cap, "%.*s.SCB", (int)(len - 7), n);
    else
        snprintf(buf, cap, "%s.SCB", n);
}

static molt_status put_nf4(qout *o, const char *n, const ag_qweight *q) {
    char nm[NAME_CAP + 64];
    kq_weight v;
    ag_qweight_view(&v, q);
    MOLT_TRY(put(o, n, ST_U8, 2, (int64_t[]){(q->numel + 1) / 2, 1}, q->data));
    snprintf(nm, sizeof nm, "%s.absmax", n);
    if (q->nf4_double_quant)
        MOLT_TRY(put(o, nm, ST_U8, 1, &q->n_blocks, q->absmax_q));
    else
        MOLT_TRY(put(o, nm, ST_F32, 1, &q->n_blocks, q->scale));
    snprintf(nm, sizeof nm, "%s.quant_map", n);
    MOLT_TRY(put(o, nm, ST_F32, 1, (int64_t[]){16}, v.nf4_code));
    char json[512], dims[96] = "";
    size_t at = 0;
    for (int d = 0; d < q->ndim; d++)
        at += (size_t)snprintf(dims + at, sizeof dims - at, "%s%lld", d ? ", " : "",
                               (long long)q->shape[d]);
    at = (size_t)snprintf(json, sizeof json, "{\"quant_type\": \"nf4\", \"blocksize\": %d, "
                          "\"dtype\": \"float32\", \"shape\": [%s]", AG_NF4_BLOCK, dims);
    if (q->nf4_double_quant) {
        snprintf(nm, sizeof nm, "%s.nested_absmax", n);
        MOLT_TRY(put(o, nm, ST_F32, 1, &q->n_blocks2, q->absmax_scale));
        snprintf(nm, sizeof nm, "%s.nested_quant_map", n);
        MOLT_TRY(put(o, nm, ST_F32, 1, (int64_t[]){256}, ag_dynamic_map()));
        // %.9g gives back the same float32
        at += (size_t)snprintf(json + at, sizeof json - at, ", \"nested_blocksize\": %d, "
                               "\"nested_dtype\": \"float32\", \"nested_offset\": %.9g",
                               AG_NF4_DQ_BLOCK, (double)q->absmax_offset);
    }
    snprintf(json + at, sizeof json - at, "}");
    char *blob = own(o, molt_strdup(json));
    if (!blob)
        return molt_err(MOLT_ENOMEM, "saving quantized weights: out of memory");
    snprintf(nm, sizeof nm, "%s%s", n, QS_SUFFIX);
    return put(o, nm, ST_U8, 1, (int64_t[]){(int64_t)strlen(blob)}, blob);
}

static molt_status put_q(qout *o, const char *n, const ag_qweight *q) {
    char nm[NAME_CAP + 64];
    int64_t sshape[3] = {q->n_mat, q->rows, 1};
    switch (q->format) {
    case AG_Q_NF4: return put_nf4(o, n, q);
    case AG_Q_BF16: return put(o, n, ST_BF16, q->ndim, q->shape, q->data);
    case AG_Q_F32: return put(o, n, ST_F32, q->ndim, q->shape, q->data);
    case AG_Q_INT8:
        MOLT_TRY(put(o, n, ST_I8, q->ndim, q->shape, q->data));
        scb_name(n, nm, sizeof nm);
        return put(o, nm, ST_F32, q->ndim - 1, q->ndim == 3 ? sshape : sshape + 1, q->scale);
    default:
        MOLT_TRY(put(o, n, ST_F8_E4M3, q->ndim, q->shape, q->data));
        snprintf(nm, sizeof nm, "%s%s", n, MDL_HF_SCALE);
        if (!q->fp8_per_row)
            sshape[1] = 1;
        int nd = q->ndim == 3 ? 3 : q->fp8_per_row ? 2 : 0;
        return put(o, nm, ST_F32, nd, q->ndim == 3 ? sshape : sshape + 1, q->scale);
    }
}

// "attention=nf4,...": the format of each group's first qweight (f32 when none).
static void spec_of(const mdl_model *m, const w_entry *list, int n, char *buf, size_t cap) {
    mdl_qspec s;
    memset(&s, 0, sizeof s);
    bool seen[MDL_QG_COUNT] = {false};
    for (int i = 0; i < n; i++) {
        int g = mdl_q_group(&list[i]);
        const ag_qweight *q = g >= 0 ? mdl_q_of(m, list[i].t) : NULL;
        if (q && !seen[g]) {
            seen[g] = true;
            s.format[g] = q->format;
        }
    }
    mdl_qspec_str(&s, buf, cap);
}

molt_status mdl_save_quant(const mdl_model *m, const char *path) {
    int n = mdl_weight_list(m, NULL, 0);
    w_entry *list = molt_malloc((size_t)n * sizeof *list);
    if (!list)
        return molt_err(MOLT_ENOMEM, "saving quantized weights: out of memory");
    mdl_weight_list(m, list, n);
    qout o = {0};
    molt_status st = MOLT_OK;
    char name[NAME_CAP], spec[256];
    for (int i = 0; st == MOLT_OK && i < n; i++) {
        const w_entry *e = &list[i];
        mdl_weight_name(e, MDL_LAYOUT_HF, m->wrapped, 0, 0, name, sizeof name);
        const ag_qweight *q = mdl_q_group(e) >= 0 ? mdl_q_of(m, e->t) : NULL;
        st = q ? put_q(&o, name, q) : put(&o, name, ST_F32, e->t->ndim, e->t->shape, e->t->data);
    }
    spec_of(m, list, n, spec, sizeof spec);
    const st_meta meta[] = {{"format", "pt"}, {MDL_QUANT_META, spec}};
    if (st == MOLT_OK)
        st = st_write(path, o.t, o.n, meta, 2);
    qout_free(&o);
    molt_free(list);
    return st;
}

// ---------------------------------------------------------------------------------------
// Reading

typedef struct {
    mdl_loader *ld;
    const char *file, *name; // for messages
    int64_t n_file, first;   // expert stacks: the file's experts, the model's first one
    int64_t shape[3];        // the shape in the file ([n_file, ...] for a shard's stack)
} qin;

// Bytes of one expert matrix's share of a stored array of `total` bytes (n_file matrices),
// and the offset of the model's first expert there.
static size_t shard_off(const qin *in, size_t total) {
    return in->n_file > 0 ? total / (size_t)in->n_file * (size_t)in->first : 0;
}

// The piece `name``suffix` (or `full` when not NULL) with the given dtype and element count
// (count < 0: any).
static molt_status piece_named(qin *in, const char *suffix, const char *full, st_dtype dt,
                               int64_t count, const st_tensor **out) {
    char nm[NAME_CAP + 64];
    snprintf(nm, sizeof nm, "%s%s", full ? full : in->name, full ? "" : suffix);
    const st_tensor *t = mdl_loader_take(in->ld, nm);
    if (!t)
        return molt_err(MOLT_EFORMAT, "%s: quantized weight '%s': missing tensor '%s'",
                        in->file, in->name, nm);
    if (t->dtype != dt)
        return molt_err(MOLT_EFORMAT, "%s: quantized weight '%s': '%s' has dtype %s, expected "
                        "%s", in->file, in->name, nm, st_dtype_name(t->dtype), st_dtype_name(dt));
    if (count >= 0 && t->numel != count)
        return molt_err(MOLT_EFORMAT, "%s: quantized weight '%s': '%s' has %lld values, "
                        "expected %lld", in->file, in->name, nm, (long long)t->numel,
                        (long long)count);
    *out = t;
    return MOLT_OK;
}

static molt_status piece(qin *in, const char *suffix, st_dtype dt, int64_t count,
                         const st_tensor **out) {
    return piece_named(in, suffix, NULL, dt, count, out);
}

static molt_status bad_state(qin *in, const char *what) {
    return molt_err(MOLT_EFORMAT, "%s: quantized weight '%s': quant_state %s", in->file,
                    in->name, what);
}

// Checks the quant_state JSON against the expected shape; *dq and *offset from it.
static molt_status parse_state(qin *in, const ag_tensor *w, const st_tensor *blob, bool *dq,
                               float *offset) {
    json_error_t jerr;
    json_t *j = json_loadb(blob->data, blob->nbytes, 0, &jerr);
    if (!j || !json_is_object(j)) {
        json_decref(j);
        return bad_state(in, "is not a JSON object");
    }
    molt_status st = MOLT_OK;
    json_t *qt = json_object_get(j, "quant_type"), *bs = json_object_get(j, "blocksize");
    json_t *sh = json_object_get(j, "shape"), *off = json_object_get(j, "nested_offset");
    if (!json_is_string(qt) || strcmp(json_string_value(qt), "nf4") != 0)
        st = bad_state(in, "quant_type is not \"nf4\"");
    else if (!json_is_integer(bs) || json_integer_value(bs) != AG_NF4_BLOCK)
        st = bad_state(in, "blocksize is not 64");
    else if (!json_is_array(sh) || (int)json_array_size(sh) != w->ndim)
        st = bad_state(in, "shape does not match the model");
    for (int d = 0; st == MOLT_OK && d < w->ndim; d++) {
        json_t *v = json_array_get(sh, (size_t)d);
        if (!json_is_integer(v) || json_integer_value(v) != in->shape[d])
            st = bad_state(in, "shape does not match the model");
    }
    *dq = off != NULL;
    if (st == MOLT_OK && off) {
        json_t *nb = json_object_get(j, "nested_blocksize");
        if (!json_is_number(off) || !isfinite(json_number_value(off)))
            st = bad_state(in, "nested_offset is not a finite number");
        else if (!json_is_integer(nb) || json_integer_value(nb) != AG_NF4_DQ_BLOCK)
            st = bad_state(in, "nested_blocksize is not 256");
        else
            *offset = (float)json_number_value(off);
    }
    json_decref(j);
    return st;
}

static bool same_floats(const st_tensor *t, const float *want, int n) {
    return t->numel == n && memcmp(t->data, want, (size_t)n * sizeof *want) == 0;
}

static molt_status read_nf4(qin *in, const ag_tensor *w, const st_tensor *packed,
                            ag_qweight *q) {
    const st_tensor *blob, *absmax, *map, *nab = NULL, *nmap = NULL;
    bool dq = false, shard = in->n_file != w->shape[0] && w->ndim == 3;
    float offset = 0;
    MOLT_TRY(piece(in, QS_SUFFIX, ST_U8, -1, &blob));
    MOLT_TRY(parse_state(in, w, blob, &dq, &offset));
    int64_t per = w->ndim == 3 ? w->shape[1] * w->shape[2] : 0;
    if (shard && per % AG_NF4_BLOCK != 0)
        return molt_err(MOLT_EUNSUPPORTED, "%s: quantized weight '%s': expert matrices of %lld "
                        "values are not whole 64-value blocks: cannot hold some experts only",
                        in->file, in->name, (long long)per);
    ag_qopts o = ag_qopts_default();
    o.nf4_double_quant = dq && !shard; // a shard's absmax are restated below
    MOLT_TRY(ag_qweight_alloc(q, AG_Q_NF4, w->ndim, w->shape, &o));
    kq_weight v;
    ag_qweight_view(&v, q);
    int64_t numel_file = shard ? in->n_file * per : q->numel;
    int64_t nb_file = (numel_file + AG_NF4_BLOCK - 1) / AG_NF4_BLOCK;
    int64_t b0 = shard ? in->first * per / AG_NF4_BLOCK : 0;
    if (packed->numel != (numel_file + 1) / 2)
        return molt_err(MOLT_EFORMAT, "%s: quantized weight '%s' has %lld packed bytes, "
                        "expected %lld", in->file, in->name, (long long)packed->numel,
                        (long long)((numel_file + 1) / 2));
    MOLT_TRY(piece(in, ".absmax", dq ? ST_U8 : ST_F32, nb_file, &absmax));
    MOLT_TRY(piece(in, ".quant_map", ST_F32, 16, &map));
    if (!same_floats(map, v.nf4_code, 16))
        return molt_err(MOLT_EFORMAT, "%s: quantized weight '%s': quant_map is not the NF4 "
                        "code", in->file, in->name);
    if (dq) {
        MOLT_TRY(piece(in, ".nested_absmax", ST_F32,
                       (nb_file + AG_NF4_DQ_BLOCK - 1) / AG_NF4_DQ_BLOCK, &nab));
        MOLT_TRY(piece(in, ".nested_quant_map", ST_F32, 256, &nmap));
        if (!same_floats(nmap, ag_dynamic_map(), 256))
            return molt_err(MOLT_EFORMAT, "%s: quantized weight '%s': nested_quant_map is not "
                            "the signed dynamic map", in->file, in->name);
    }
    if (shard) { // the model's experts' byte ranges, their blocks' absmax
        memcpy(q->data, (const uint8_t *)packed->data + b0 * AG_NF4_BLOCK / 2,
               (size_t)(q->numel + 1) / 2);
        if (!dq) {
            memcpy(q->scale, (const float *)absmax->data + b0, (size_t)q->n_blocks * 4);
            return MOLT_OK;
        }
        ag_nf4_dq_state st = {.codes = absmax->data, .scales = nab->data, .offset = offset,
                              .n_blocks = nb_file};
        return ag_qweight_nf4_restate(q, &st, b0);
    }
    memcpy(q->data, packed->data, packed->nbytes);
    if (dq) {
        memcpy(q->absmax_q, absmax->data, absmax->nbytes);
        memcpy(q->absmax_scale, nab->data, nab->nbytes);
        q->absmax_offset = offset;
    } else
        memcpy(q->scale, absmax->data, absmax->nbytes);
    return MOLT_OK;
}

static molt_status read_scaled(qin *in, const ag_tensor *w, const st_tensor *t,
                               ag_qweight *q) {
    int64_t n_mat = w->ndim == 3 ? in->n_file : 1, rows = w->shape[w->ndim - 2];
    const st_tensor *s;
    ag_qopts o = ag_qopts_default();
    if (t->dtype == ST_I8) {
        char nm[NAME_CAP + 64];
        scb_name(in->name, nm, sizeof nm);
        MOLT_TRY(piece_named(in, NULL, nm, ST_F32, n_mat * rows, &s));
        MOLT_TRY(ag_qweight_alloc(q, AG_Q_INT8, w->ndim, w->shape, &o));
    } else {
        MOLT_TRY(piece(in, MDL_HF_SCALE, ST_F32, -1, &s));
        if (s->numel != n_mat && s->numel != n_mat * rows)
            return molt_err(MOLT_EFORMAT, "%s: quantized weight '%s': '%s%s' has %lld values, "
                            "expected %lld or %lld", in->file, in->name, in->name, MDL_HF_SCALE,
                            (long long)s->numel, (long long)n_mat, (long long)(n_mat * rows));
        o.fp8_per_row = s->numel == n_mat * rows && rows > 1;
        MOLT_TRY(ag_qweight_alloc(q, AG_Q_FP8, w->ndim, w->shape, &o));
    }
    // a shard takes its experts' byte ranges (all of it otherwise: offsets 0)
    memcpy(q->data, (const uint8_t *)t->data + shard_off(in, t->nbytes), (size_t)q->numel);
    memcpy(q->scale, (const uint8_t *)s->data + shard_off(in, s->nbytes),
           s->nbytes / (size_t)(w->ndim == 3 ? in->n_file : 1) *
               (size_t)(w->ndim == 3 ? w->shape[0] : 1));
    return MOLT_OK;
}

static molt_status read_any(qin *in, const ag_tensor *w, const st_tensor *t, ag_qweight *q,
                            bool *found) {
    bool same = t->ndim == w->ndim;
    for (int d = 0; same && d < w->ndim; d++)
        same = t->shape[d] == in->shape[d];
    if (t->dtype == ST_U8)
        return read_nf4(in, w, t, q);
    if (!same)
        return molt_err(MOLT_EFORMAT, "%s: quantized weight '%s' has the wrong shape", in->file,
                        in->name);
    switch (t->dtype) {
    case ST_F32: *found = false; return MOLT_OK;
    case ST_BF16:
        MOLT_TRY(ag_qweight_alloc(q, AG_Q_BF16, w->ndim, w->shape, NULL));
        memcpy(q->data, (const uint8_t *)t->data + shard_off(in, t->nbytes),
               (size_t)q->numel * 2);
        return MOLT_OK;
    case ST_I8:
    case ST_F8_E4M3: return read_scaled(in, w, t, q);
    default:
        return molt_err(MOLT_EFORMAT, "%s: quantized weight '%s' has dtype %s (expected U8, "
                        "I8, F8_E4M3, BF16 or F32)", in->file, in->name, st_dtype_name(t->dtype));
    }
}

molt_status mdl_q_read(mdl_loader *ld, const w_entry *e, ag_qweight *q, bool *found) {
    char name[NAME_CAP];
    mdl_weight_name(e, MDL_LAYOUT_HF, mdl_loader_wrapped(ld), 0, 0, name, sizeof name);
    qin in = {ld, mdl_loader_label(ld), name, 0, 0, {0}};
    for (int d = 0; d < e->t->ndim; d++)
        in.shape[d] = e->t->shape[d];
    if (e->t->ndim == 3) {
        mdl_loader_expert_span(ld, e->t->shape[0], &in.n_file, &in.first);
        in.shape[0] = in.n_file;
    }
    *found = true;
    const st_tensor *t = mdl_loader_take(ld, name);
    if (!t)
        return molt_err(MOLT_EFORMAT, "%s: missing tensor '%s'", in.file, name);
    molt_status st = read_any(&in, e->t, t, q, found);
    if (st == MOLT_OK && *found) {
        st = ag_qweight_check(q);
        if (st != MOLT_OK)
            st = molt_err_wrap(st, "%s: quantized weight '%s'", in.file, name);
    }
    if (st != MOLT_OK || !*found)
        ag_qweight_free(q);
    return st;
}
