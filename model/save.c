// model/save.c: writing a model's weights as one safetensors file in any of the three
// layouts (HF fused experts, HF per-expert, Mistral consolidated) and dtypes (F32, BF16,
// FP8 E4M3 with a per-tensor F32 scale that multiplies, as the real checkpoint stores it).
// Used by `molt init-model` and to make layout/dtype copies for tests. Not here: reading
// (weights.c), quantization for compute (autograd's qweights).
#include "mdl_internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define NAME_CAP 256
#define E4M3_MAX 448.0

// The file being assembled: tensors with owned names and data.
typedef struct {
    st_tensor *t;
    int n, cap;
} out_list;

static void out_free(out_list *o) {
    for (int i = 0; i < o->n; i++) {
        molt_free((void *)o->t[i].name);
        molt_free((void *)o->t[i].data);
    }
    molt_free(o->t);
}

// Appends a tensor; takes ownership of data (freed on failure too).
static molt_status out_add(out_list *o, const char *name, st_dtype dt, int ndim,
                           const int64_t *shape, void *data) {
    if (!data)
        return molt_err(MOLT_ENOMEM, "saving weights: out of memory");
    if (o->n == o->cap) {
        int cap = o->cap ? 2 * o->cap : 64;
        st_tensor *nt = molt_realloc(o->t, (size_t)cap * sizeof *nt);
        if (!nt) {
            molt_free(data);
            return molt_err(MOLT_ENOMEM, "saving weights: out of memory");
        }
        o->t = nt;
        o->cap = cap;
    }
    char *nm = molt_strdup(name);
    if (!nm) {
        molt_free(data);
        return molt_err(MOLT_ENOMEM, "saving weights: out of memory");
    }
    st_tensor *t = &o->t[o->n++];
    memset(t, 0, sizeof *t);
    t->name = nm;
    t->dtype = dt;
    t->ndim = ndim;
    memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->data = data;
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Encoders

// Nearest E4M3 code of x (|x| <= 448), ties to the even code, like a hardware cast.
// table[i] is the value of code i for i in 0..126 (0x7f is NaN).
static uint8_t e4m3_encode(const double *table, double x) {
    uint8_t sign = x < 0 ? 0x80 : 0;
    double a = fabs(x);
    int lo = 0, hi = 126; // largest code with table[code] <= a
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (table[mid] <= a)
            lo = mid;
        else
            hi = mid - 1;
    }
    int code = lo;
    if (code < 126) {
        double dl = a - table[code], dh = table[code + 1] - a;
        if (dh < dl || (dh == dl && (code & 1)))
            code++;
    }
    return (uint8_t)(sign | code);
}

static void *encode_bf16(const float *x, int64_t n) {
    uint16_t *y = molt_malloc((size_t)n * sizeof *y);
    for (int64_t i = 0; y && i < n; i++)
        y[i] = ag_f32_to_bf16(x[i]);
    return y;
}

static void *copy_f32(const float *x, int64_t n) {
    float *y = molt_malloc((size_t)n * sizeof *y);
    if (y)
        memcpy(y, x, (size_t)n * sizeof *y);
    return y;
}

// E4M3 codes of x[0..n) / scale with scale = absmax / 448 (1 for an all-zero matrix).
static void *encode_fp8(const float *x, int64_t n, float *scale) {
    double amax = 0;
    for (int64_t i = 0; i < n; i++)
        amax = fmax(amax, fabs(x[i]));
    *scale = amax > 0 ? (float)(amax / E4M3_MAX) : 1.0f;
    double table[127];
    for (int i = 0; i < 127; i++)
        table[i] = st_decode_f8_e4m3((uint8_t)i);
    uint8_t *y = molt_malloc((size_t)n);
    for (int64_t i = 0; y && i < n; i++) {
        double v = x[i] / (double)*scale;
        y[i] = e4m3_encode(table, fmin(fmax(v, -E4M3_MAX), E4M3_MAX));
    }
    return y;
}

// ---------------------------------------------------------------------------------------
// Tensors

typedef struct {
    const mdl_save_opts *o;
    out_list out;
} saver;

static const char *scale_name(const saver *s, const char *name, char *buf, size_t cap) {
    size_t len = strlen(name);
    if (s->o->layout == MDL_LAYOUT_MISTRAL) // "x.weight" -> "x.qscale_weight"
        snprintf(buf, cap, "%.*s%s", (int)(len - strlen("weight")), name, MDL_MISTRAL_SCALE);
    else
        snprintf(buf, cap, "%s%s", name, MDL_HF_SCALE);
    return buf;
}

// Writes n_mat matrices of `per` values from x as one tensor `name` of shape[0..ndim).
// FP8 (for projections and experts only) adds one scale per matrix: a scalar for one
// matrix, [n_mat, 1, 1] for fused experts.
static molt_status put(saver *s, const char *name, bool quantizable, const float *x,
                       int ndim, const int64_t *shape, int64_t n_mat, int64_t per) {
    int64_t n = n_mat * per;
    if (s->o->dtype == MDL_SAVE_F32)
        return out_add(&s->out, name, ST_F32, ndim, shape, copy_f32(x, n));
    if (s->o->dtype == MDL_SAVE_BF16 || !quantizable)
        return out_add(&s->out, name, ST_BF16, ndim, shape, encode_bf16(x, n));
    uint8_t *q = molt_malloc((size_t)n);
    float *sc = molt_malloc((size_t)n_mat * sizeof *sc);
    for (int64_t e = 0; q && sc && e < n_mat; e++) {
        void *part = encode_fp8(x + e * per, per, &sc[e]);
        if (part)
            memcpy(q + e * per, part, (size_t)per);
        molt_free(part);
        if (!part) {
            molt_free(q);
            q = NULL;
        }
    }
    if (!q || !sc) {
        molt_free(q);
        molt_free(sc);
        return molt_err(MOLT_ENOMEM, "saving weights: out of memory");
    }
    char sn[NAME_CAP + 32];
    MOLT_TRY(out_add(&s->out, name, ST_F8_E4M3, ndim, shape, q));
    int64_t sshape[3] = {n_mat, 1, 1};
    return out_add(&s->out, scale_name(s, name, sn, sizeof sn), ST_F32, n_mat > 1 ? 3 : 0,
                   sshape, sc);
}

static molt_status put_entry(saver *s, const w_entry *e) {
    char name[NAME_CAP];
    const ag_tensor *t = e->t;
    const float *x = t->data;
    bool experts = e->kind == W_GATE_UP || e->kind == W_DOWN;
    bool quant = e->kind == W_LINEAR || experts;
    if (!experts || s->o->layout == MDL_LAYOUT_HF) {
        mdl_weight_name(e, s->o->layout, s->o->wrapped, 0, 0, name, sizeof name);
        int64_t n_mat = experts ? t->shape[0] : 1;
        return put(s, name, quant, x, t->ndim, t->shape, n_mat, t->numel / n_mat);
    }
    int64_t E = t->shape[0], R = t->shape[1], C = t->shape[2];
    int parts = e->kind == W_GATE_UP ? 2 : 1;
    int64_t rows = R / parts;
    for (int64_t ex = 0; ex < E; ex++)
        for (int p = 0; p < parts; p++) {
            mdl_weight_name(e, s->o->layout, s->o->wrapped, (int)ex, p, name, sizeof name);
            const float *src = x + (ex * R + p * rows) * C;
            MOLT_TRY(put(s, name, true, src, 2, (int64_t[]){rows, C}, 1, rows * C));
        }
    return MOLT_OK;
}

molt_status mdl_save(const mdl_model *m, const char *path, const mdl_save_opts *o) {
    if (!o || (unsigned)o->layout >= MDL_LAYOUT_COUNT || (unsigned)o->dtype > MDL_SAVE_FP8)
        return molt_err(MOLT_EARG, "mdl_save: bad options");
    int n = mdl_weight_list(m, NULL, 0);
    w_entry *list = molt_malloc((size_t)n * sizeof *list);
    if (!list)
        return molt_err(MOLT_ENOMEM, "saving weights: out of memory");
    mdl_weight_list(m, list, n);
    saver s = {.o = o};
    molt_status st = MOLT_OK;
    if (m->n_qw > 0) // shape-only tensors stand for the qweights
        st = molt_err(MOLT_EUNSUPPORTED, "mdl_save: the model has quantized weights (write it "
                      "with mdl_save_quant)");
    for (int i = 0; st == MOLT_OK && i < n; i++)
        st = put_entry(&s, &list[i]);
    const st_meta meta[] = {{"format", "pt"}};
    if (st == MOLT_OK)
        st = st_write(path, s.out.t, s.out.n, meta, 1);
    out_free(&s.out);
    molt_free(list);
    return st;
}
