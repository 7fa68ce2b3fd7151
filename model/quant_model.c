// model/quant_model.c: a model whose frozen projections are quantized weights: the per-group
// format spec (`--base-quant`), loading with quantization on the fly (one tensor at a time
// through a scratch arena, so the F32 model is never held whole), keeping FP8 checkpoints'
// E4M3 codes and per-tensor scales as loaded, and the bookkeeping that points each mdl_lin
// at its qweight. Not here: the formats and kernels (autograd/quant.c, ops_qlinear.c), the
// pre-quantized file format (quant_io.c).
#include "mdl_quant.h"

#include "../autograd/comm/comm.h"

#include <omp.h>
#include <stdio.h>
#include <string.h>

// ---------------------------------------------------------------------------------------
// Spec

static const char *const group_names[MDL_QG_COUNT] = {
    "attention", "router", "shared_experts", "experts", "dense_mlp", "lm_head"};
static const char *const format_names[AG_Q_FORMAT_COUNT] = {"f32", "bf16", "int8", "fp8",
                                                            "nf4"};

const char *mdl_qgroup_name(mdl_qgroup g) {
    return (unsigned)g < MDL_QG_COUNT ? group_names[g] : "?";
}

static int lookup(const char *const *names, int n, const char *s, size_t len) {
    for (int i = 0; i < n; i++)
        if (strlen(names[i]) == len && strncmp(names[i], s, len) == 0)
            return i;
    return -1;
}

molt_status mdl_qspec_parse(const char *text, mdl_qspec *out) {
    memset(out, 0, sizeof *out); // AG_Q_F32 everywhere
    out->nf4_double_quant = true;
    if (!text || !*text)
        return molt_err(MOLT_EARG, "quant spec: empty (expected FORMAT[,GROUP=FORMAT...])");
    const char *p = text;
    for (bool first = true; *p; first = false) {
        const char *end = strchr(p, ','), *eq;
        size_t len = end ? (size_t)(end - p) : strlen(p);
        eq = memchr(p, '=', len);
        const char *fs = eq ? eq + 1 : p;
        size_t flen = eq ? len - (size_t)(eq + 1 - p) : len;
        int f = lookup(format_names, AG_Q_FORMAT_COUNT, fs, flen);
        if (f < 0)
            return molt_err(MOLT_EARG, "quant spec '%s': unknown format '%.*s' (nf4, int8, fp8, "
                            "bf16, f32)", text, (int)flen, fs);
        if (!eq && !first)
            return molt_err(MOLT_EARG, "quant spec '%s': '%.*s' after the first item needs "
                            "GROUP=", text, (int)len, p);
        if (!eq) {
            for (int g = 0; g < MDL_QG_COUNT; g++)
                if (g != MDL_QG_ROUTER && g != MDL_QG_LM_HEAD)
                    out->format[g] = (ag_qformat)f;
        } else {
            int g = lookup(group_names, MDL_QG_COUNT, p, (size_t)(eq - p));
            if (g < 0)
                return molt_err(MOLT_EARG, "quant spec '%s': unknown group '%.*s' (attention, "
                                "router, shared_experts, experts, dense_mlp, lm_head)", text,
                                (int)(eq - p), p);
            out->format[g] = (ag_qformat)f;
        }
        p += len + (end ? 1 : 0);
        if (end && !*p)
            return molt_err(MOLT_EARG, "quant spec '%s': trailing comma", text);
    }
    return MOLT_OK;
}

const char *mdl_qspec_str(const mdl_qspec *q, char *buf, size_t cap) {
    size_t at = 0;
    buf[0] = 0;
    for (int g = 0; g < MDL_QG_COUNT && at < cap; g++)
        at += (size_t)snprintf(buf + at, cap - at, "%s%s=%s", g ? "," : "", group_names[g],
                               format_names[q->format[g]]);
    return buf;
}

// ---------------------------------------------------------------------------------------
// Groups and binding

int mdl_q_group(const w_entry *e) {
    switch (e->kind) {
    case W_ROUTER: return MDL_QG_ROUTER;
    case W_GATE_UP:
    case W_DOWN: return MDL_QG_EXPERTS;
    case W_HEAD: return MDL_QG_LM_HEAD;
    case W_LINEAR:
        if (strncmp(e->hf, "self_attn.", 10) == 0)
            return MDL_QG_ATTENTION;
        return strncmp(e->hf, "mlp.shared_experts.", 19) == 0 ? MDL_QG_SHARED : MDL_QG_DENSE;
    default: return -1;
    }
}

// Every mdl_lin of layer y, in a fixed order.
static int layer_lins(mdl_layer *y, mdl_lin **out) {
    mdl_lin *all[] = {&y->q_a,        &y->q_b,      &y->q,          &y->kv_a,
                      &y->kv_b,       &y->o,        &y->dense.gate, &y->dense.up,
                      &y->dense.down, &y->router,   &y->shared.gate, &y->shared.up,
                      &y->shared.down};
    int n = (int)(sizeof all / sizeof *all);
    memcpy(out, all, sizeof all);
    return n;
}

static mdl_lin *lin_of(mdl_model *m, const ag_tensor *t) {
    if (m->lm_head.w == t)
        return &m->lm_head;
    mdl_lin *lins[16];
    for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
        int n = layer_lins(&m->layers[l], lins);
        for (int i = 0; i < n; i++)
            if (lins[i]->w == t)
                return lins[i];
    }
    return NULL;
}

bool mdl_q_bind(mdl_model *m, const ag_tensor *t, const ag_qweight *q) {
    for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
        mdl_layer *y = &m->layers[l];
        if (y->gate_up == t || y->down == t) {
            *(y->gate_up == t ? &y->gate_up_q : &y->down_q) = q;
            return true;
        }
    }
    mdl_lin *lin = lin_of(m, t);
    if (lin)
        lin->qw = q;
    return lin != NULL;
}

const ag_qweight *mdl_q_of(const mdl_model *m, const ag_tensor *t) {
    for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
        const mdl_layer *y = &m->layers[l];
        if (y->gate_up == t || y->down == t)
            return y->gate_up == t ? y->gate_up_q : y->down_q;
    }
    mdl_lin *lin = lin_of((mdl_model *)m, t);
    return lin ? lin->qw : NULL;
}

size_t mdl_weight_bytes(const mdl_model *m) {
    int n = mdl_weight_list(m, NULL, 0);
    w_entry *list = molt_malloc((size_t)n * sizeof *list);
    size_t bytes = 0;
    if (!list)
        return 0;
    mdl_weight_list(m, list, n);
    for (int i = 0; i < n; i++)
        if (list[i].t->data)
            bytes += (size_t)list[i].t->numel * sizeof(float);
    for (int i = 0; i < m->n_qw; i++)
        bytes += m->qw[i].bytes;
    molt_free(list);
    return bytes;
}

// ---------------------------------------------------------------------------------------
// Loading

typedef struct {
    mdl_model *m;
    mdl_loader *ld;
    const mdl_qspec *spec; // NULL: pre-quantized file
    ag_arena scratch;      // one tensor's F32 copy at a time
} qload;

static molt_status give_data(mdl_model *m, ag_tensor *t) {
    t->data = ag_arena_alloc(&m->arena, (size_t)t->numel * sizeof(float));
    return t->data ? MOLT_OK : molt_err_wrap(MOLT_ENOMEM, "model weights");
}

// FP8 codes as the file stores them: one scale per matrix when every row of a matrix shares
// it (the checkpoint's per-tensor scale), else per row (per-expert files: gate and up each
// have their own).
static molt_status keep_fp8(const ag_tensor *t, const uint8_t *codes, const float *row_scale,
                            ag_qweight *q) {
    int64_t n_mat = t->ndim == 3 ? t->shape[0] : 1, R = t->shape[t->ndim - 2];
    bool per_mat = true;
    for (int64_t i = 0; per_mat && i < n_mat * R; i++)
        per_mat = row_scale[i] == row_scale[(i / R) * R];
    if (per_mat) {
        float *s = molt_malloc((size_t)n_mat * sizeof *s);
        if (!s)
            return molt_err(MOLT_ENOMEM, "fp8 weights: out of memory");
        for (int64_t e = 0; e < n_mat; e++)
            s[e] = row_scale[e * R];
        molt_status st = ag_qweight_from_fp8(q, codes, t->ndim, t->shape, s);
        molt_free(s);
        return st;
    }
    ag_qopts o = ag_qopts_default();
    o.fp8_per_row = true;
    MOLT_TRY(ag_qweight_alloc(q, AG_Q_FP8, t->ndim, t->shape, &o));
    memcpy(q->data, codes, (size_t)t->numel);
    memcpy(q->scale, row_scale, (size_t)(n_mat * R) * sizeof(float));
    return ag_qweight_check(q);
}

// A shard's NF4 expert stack q (plain absmax) given the double quantization the whole stack
// gets: the ranks of the expert group exchange their absmax (experts in rank order are the
// stack in order) and each keeps its blocks of the stack's state.
static molt_status nf4_shard_dq(qload *s, const ag_tensor *t, ag_qweight *q) {
    const mdl_experts_shard *sh = &s->m->ep;
    int64_t per = t->shape[1] * t->shape[2];
    if (per % AG_NF4_BLOCK != 0)
        return molt_err(MOLT_EUNSUPPORTED, "expert parallelism with nf4: an expert matrix of "
                        "%lld values is not a whole number of 64-value blocks", (long long)per);
    int P = ag_comm_size(sh->comm);
    int64_t nb = q->n_blocks, all_n = nb * P;
    float *all = ag_arena_alloc(&s->scratch, (size_t)all_n * sizeof *all);
    uint8_t *codes = ag_arena_alloc(&s->scratch, (size_t)all_n);
    float *scales = ag_arena_alloc(&s->scratch, (size_t)(all_n / AG_NF4_DQ_BLOCK + 1) *
                                                 sizeof *scales);
    if (!all || !codes || !scales)
        return molt_err_wrap(MOLT_ENOMEM, "quantizing");
    MOLT_TRY(ag_comm_allgather(sh->comm, q->scale, all, nb, AG_F32));
    ag_nf4_dq_state st = {.codes = codes, .scales = scales, .n_blocks = all_n};
    ag_nf4_dq_encode(all, all_n, codes, scales, &st.offset);
    return ag_qweight_nf4_restate(q, &st, (int64_t)sh->first * per / AG_NF4_BLOCK);
}

// Quantizes entry e from the file: F32 copy in the scratch arena, then the qweight.
static molt_status quantize_entry(qload *s, const w_entry *e, ag_qformat f, ag_qweight *q) {
    ag_tensor *tmp = ag_tensor_new(&s->scratch, AG_F32, e->t->ndim, e->t->shape);
    if (!tmp)
        return molt_err_wrap(MOLT_ENOMEM, "quantizing");
    w_entry copy = *e;
    copy.t = tmp;
    molt_status st = mdl_loader_entry(s->ld, &copy);
    bool is_fp8 = false;
    if (st == MOLT_OK && f == AG_Q_FP8) {
        int64_t rows = e->t->numel / e->t->shape[e->t->ndim - 1];
        uint8_t *codes = ag_arena_alloc(&s->scratch, (size_t)e->t->numel);
        float *rs = ag_arena_alloc(&s->scratch, (size_t)rows * sizeof *rs);
        st = codes && rs ? mdl_loader_fp8(s->ld, e, codes, rs, &is_fp8)
                         : molt_err_wrap(MOLT_ENOMEM, "quantizing");
        if (st == MOLT_OK && is_fp8)
            st = keep_fp8(e->t, codes, rs, q);
    }
    bool shard_dq = f == AG_Q_NF4 && s->spec->nf4_double_quant && e->t->ndim == 3 &&
                    s->m->ep.comm != NULL;
    if (st == MOLT_OK && !is_fp8) {
        ag_qopts o = ag_qopts_default();
        o.nf4_double_quant = s->spec->nf4_double_quant && !shard_dq;
        st = ag_qweight_quantize(q, tmp, f, &o);
    }
    if (st == MOLT_OK && !is_fp8 && shard_dq)
        st = nf4_shard_dq(s, e->t, q);
    ag_arena_reset(&s->scratch);
    return st;
}

static molt_status load_one(qload *s, const w_entry *e, int *k) {
    int g = mdl_q_group(e);
    if (e->t->data || g < 0) // embeddings, norms
        return mdl_loader_entry(s->ld, e);
    ag_qweight *q = &s->m->qw[*k];
    bool quant = true;
    s->m->n_qw = *k + 1; // mdl_free releases a half-filled one too (a zeroed one is fine)
    if (!s->spec)
        MOLT_TRY(mdl_q_read(s->ld, e, q, &quant));
    else if (s->spec->format[g] == AG_Q_F32)
        quant = false;
    else
        MOLT_TRY(quantize_entry(s, e, s->spec->format[g], q));
    if (!quant) {
        MOLT_TRY(give_data(s->m, e->t));
        return mdl_loader_entry(s->ld, e);
    }
    (*k)++;
    if (!mdl_q_bind(s->m, e->t, q))
        return molt_err(MOLT_EFORMAT, "quantized load: no module for tensor %d", *k);
    return MOLT_OK;
}

static molt_status load_all(qload *s, const st_reader *r) {
    mdl_model *m = s->m;
    int n = mdl_weight_list(m, NULL, 0);
    w_entry *list = molt_malloc((size_t)n * sizeof *list);
    m->qw = molt_calloc((size_t)n + 1, sizeof *m->qw);
    if (!list || !m->qw) {
        molt_free(list);
        return molt_err(MOLT_ENOMEM, "quantized load: out of memory");
    }
    mdl_weight_list(m, list, n);
    molt_status st = mdl_loader_new(r, &s->ld);
    if (st == MOLT_OK)
        mdl_loader_experts(s->ld, &m->ep, m->cfg.n_routed_experts);
    int k = 0;
    for (int i = 0; st == MOLT_OK && i < n; i++)
        st = load_one(s, &list[i], &k);
    if (st == MOLT_OK) {
        m->n_qw = k; // drops the unused zeroed slot after the last quantized weight
        st = mdl_loader_finish(s->ld, m);
    }
    mdl_loader_free(s->ld);
    molt_free(list);
    return st;
}

molt_status mdl_pack_head(mdl_model *m, bool *packed) {
    if (packed)
        *packed = false;
    const ag_tensor *w = m->lm_head.w;
    if (m->lm_head.bx || m->lm_head.qw || !w || !w->data || w->dtype != AG_F32 ||
        !ag_bx_available())
        return MOLT_OK;
    // over the F32 matrix when its bytes are the head's alone (the embeddings keep theirs)
    int nt = omp_get_max_threads();
    if (w != m->embed && ag_bx_packs_in_place(w))
        MOLT_TRY(ag_bx_pack_in_place(m->lm_head.w, nt, &m->head_bx));
    else
        MOLT_TRY(ag_bx_pack(&m->arena, w, nt, &m->head_bx));
    m->lm_head.bx = &m->head_bx;
    if (packed)
        *packed = true;
    return MOLT_OK;
}

void mdl_prompts_on_amx(mdl_model *m, bool *on) {
    bool host = m->n_qw > 0;
    for (int i = 0; i < m->n_qw; i++)
        host = host && m->qw[i].device == AG_CPU;
    m->prompt_bx = host && !m->ep.comm && ag_bxq_available();
    if (on)
        *on = m->prompt_bx;
}

molt_status mdl_load_quant(const char *dir, const mdl_qspec *spec, mdl_model *m) {
    return mdl_load_quant_ex(dir, spec, NULL, m);
}

molt_status mdl_load_quant_ex(const char *dir, const mdl_qspec *spec, ag_comm *experts,
                              mdl_model *m) {
    char path[4096];
    mcfg cfg;
    memset(m, 0, sizeof *m);
    MOLT_TRY(mdl_check_dir(dir));
    snprintf(path, sizeof path, "%s/config.json", dir);
    MOLT_TRY(mcfg_load(path, &cfg));
    st_reader *r = NULL;
    MOLT_TRY(mdl_open_weights(dir, &r));
    bool pre = st_metadata(r, MDL_QUANT_META) != NULL;
    molt_status st;
    if (!pre && !spec) {
        st = mdl_create_ex(m, &cfg, false, experts);
        if (st == MOLT_OK)
            st = mdl_load_weights(m, r);
    } else {
        st = mdl_create_ex(m, &cfg, true, experts);
        qload s = {.m = m, .spec = pre ? NULL : spec};
        ag_arena_init(&s.scratch, "quantization scratch", 16u << 20);
        if (st == MOLT_OK)
            st = load_all(&s, r);
        ag_arena_free(&s.scratch);
    }
    st_close(r);
    // the absorbed decode form reads kv_b_proj whole at every step: decode a quantized one
    // once here (NH*(DN+DV) x RKV floats per layer) instead of at every step
    for (int l = 0; st == MOLT_OK && l < m->cfg.num_hidden_layers; l++) {
        const ag_qweight *q = m->layers[l].kv_b.qw;
        ag_tensor *d = q ? ag_qweight_dequantize(&m->arena, q) : NULL;
        if (q && !d)
            st = molt_err_wrap(MOLT_ENOMEM, "decoding kv_b_proj of layer %d", l);
        m->layers[l].kv_b_f32 = d ? d->data : NULL;
    }
    if (st != MOLT_OK)
        mdl_free(m);
    return st;
}

molt_status mdl_dequantize(mdl_model *m) {
    if (m->n_qw == 0)
        return MOLT_OK;
    int n = mdl_weight_list(m, NULL, 0);
    w_entry *list = molt_malloc((size_t)n * sizeof *list);
    if (!list)
        return molt_err(MOLT_ENOMEM, "dequantizing the model: out of memory");
    mdl_weight_list(m, list, n);
    ag_arena scratch;
    ag_arena_init(&scratch, "dequantization scratch", 16u << 20);
    molt_status st = MOLT_OK;
    for (int i = 0; st == MOLT_OK && i < n; i++) {
        ag_tensor *t = list[i].t;
        const ag_qweight *q = t->data ? NULL : mdl_q_of(m, t);
        if (!q)
            continue;
        ag_tensor *d = ag_qweight_dequantize(&scratch, q);
        st = d ? give_data(m, t) : molt_err_wrap(MOLT_ENOMEM, "dequantizing the model");
        if (st == MOLT_OK)
            memcpy(t->data, d->data, (size_t)t->numel * sizeof(float));
        mdl_q_bind(m, t, NULL);
        ag_arena_reset(&scratch);
    }
    ag_arena_free(&scratch);
    molt_free(list);
    if (st != MOLT_OK)
        return st;
    for (int i = 0; i < m->n_qw; i++)
        ag_qweight_free(&m->qw[i]);
    molt_free(m->qw);
    m->qw = NULL;
    m->n_qw = 0;
    return MOLT_OK;
}
