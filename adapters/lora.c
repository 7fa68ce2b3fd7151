// adapters/lora.c: LoRA specifications (defaults, the compact text form), target matching
// with PEFT's semantics, attaching A/B matrices to a loaded model (allocation, seeded
// initialization, wiring into the model's mdl_lin fields), per-group parameter counts and
// detaching. Not here: files (peft.c), merging (merge.c), the forward pass (model/).
#include "internal.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

// Mixed into spec.seed for the dropout stream, keeping it apart from the init stream.
#define LORA_DROPOUT_SEED_MIX 0x6c6f72612d64726fULL

static const char *group_names[LORA_GROUP_COUNT] = {"attn",    "dense",  "shared",
                                                    "experts", "router", "lm_head"};

const char *lora_group_name(lora_group g) {
    return (unsigned)g < LORA_GROUP_COUNT ? group_names[g] : "?";
}

static int group_by_name(const char *s, size_t n) {
    for (int g = 0; g < LORA_GROUP_COUNT; g++)
        if (strlen(group_names[g]) == n && !strncmp(group_names[g], s, n))
            return g;
    return -1;
}

void lora_spec_default(lora_spec *s) {
    memset(s, 0, sizeof *s);
    s->r = 8;
    s->alpha = 16;
    s->init = LORA_INIT_KAIMING;
}

// ---------------------------------------------------------------------------------------
// Compact text form

static molt_status copy_name(char *dst, const char *src, size_t n, const char *what) {
    if (n == 0 || n >= LORA_NAME_MAX)
        return molt_err(MOLT_EARG, "lora spec: %s '%.*s' is empty or longer than %d characters",
                        what, (int)n, src, LORA_NAME_MAX - 1);
    memcpy(dst, src, n);
    dst[n] = 0;
    return MOLT_OK;
}

static molt_status parse_targets(const char *v, size_t n, lora_spec *s) {
    s->n_targets = 0;
    size_t i = 0;
    while (i <= n) {
        size_t j = i;
        while (j < n && v[j] != '+')
            j++;
        if (s->n_targets == LORA_MAX_TARGETS)
            return molt_err(MOLT_EARG, "lora spec: more than %d targets", LORA_MAX_TARGETS);
        MOLT_TRY(copy_name(s->targets[s->n_targets++], v + i, j - i, "target"));
        i = j + 1;
    }
    return MOLT_OK;
}

static molt_status parse_number(const char *k, size_t kn, const char *v, size_t vn, double *out) {
    char buf[64];
    if (vn == 0 || vn >= sizeof buf)
        return molt_err(MOLT_EARG, "lora spec: %.*s needs a number", (int)kn, k);
    memcpy(buf, v, vn);
    buf[vn] = 0;
    char *end;
    *out = strtod(buf, &end);
    if (*end || !isfinite(*out))
        return molt_err(MOLT_EARG, "lora spec: %.*s=%s is not a number", (int)kn, k, buf);
    return MOLT_OK;
}

static molt_status add_pattern(lora_pattern *p, int *n, const char *k, size_t kn, double v) {
    if (*n == LORA_MAX_PATTERNS)
        return molt_err(MOLT_EARG, "lora spec: more than %d patterns", LORA_MAX_PATTERNS);
    MOLT_TRY(copy_name(p[*n].key, k, kn, "pattern key"));
    p[(*n)++].value = v;
    return MOLT_OK;
}

static bool is_int(double x) { return x == floor(x) && fabs(x) < 1e9; }

// One key=value item.
static molt_status parse_item(const char *k, size_t kn, const char *v, size_t vn, lora_spec *s) {
#define KEY(lit) (kn == strlen(lit) && !strncmp(k, lit, kn))
    if (KEY("targets"))
        return parse_targets(v, vn, s);
    if (KEY("init")) {
        if (vn == 7 && !strncmp(v, "kaiming", 7))
            s->init = LORA_INIT_KAIMING;
        else if (vn == 8 && !strncmp(v, "gaussian", 8))
            s->init = LORA_INIT_GAUSSIAN;
        else
            return molt_err(MOLT_EARG, "lora spec: init=%.*s (expected kaiming or gaussian)",
                            (int)vn, v);
        return MOLT_OK;
    }
    double x = 0;
    MOLT_TRY(parse_number(k, kn, v, vn, &x));
    if (KEY("r") || (kn > 2 && !strncmp(k, "r.", 2)) || (kn > 5 && !strncmp(k, "rank:", 5)))
        if (!is_int(x) || x < 1)
            return molt_err(MOLT_EARG, "lora spec: %.*s=%g must be a positive integer", (int)kn,
                            k, x);
    if (KEY("r"))
        s->r = (int)x;
    else if (KEY("alpha"))
        s->alpha = x;
    else if (KEY("dropout")) {
        if (x < 0 || x >= 1)
            return molt_err(MOLT_EARG, "lora spec: dropout=%g outside [0, 1)", x);
        s->dropout = x;
    } else if (KEY("rslora"))
        s->rslora = x != 0;
    else if (KEY("seed")) {
        if (x < 0 || !is_int(x))
            return molt_err(MOLT_EARG, "lora spec: seed=%g must be a non-negative integer", x);
        s->seed = (uint64_t)x;
    } else if (kn > 5 && !strncmp(k, "rank:", 5))
        return add_pattern(s->rank_pattern, &s->n_rank_pattern, k + 5, kn - 5, x);
    else if (kn > 6 && !strncmp(k, "alpha:", 6))
        return add_pattern(s->alpha_pattern, &s->n_alpha_pattern, k + 6, kn - 6, x);
    else {
        bool rk = kn > 2 && !strncmp(k, "r.", 2), ak = kn > 6 && !strncmp(k, "alpha.", 6);
        int g = rk ? group_by_name(k + 2, kn - 2) : ak ? group_by_name(k + 6, kn - 6) : -1;
        if (g < 0)
            return molt_err(MOLT_EARG, "lora spec: unknown key '%.*s' (groups: attn, dense, "
                            "shared, experts, router, lm_head)", (int)kn, k);
        if (rk)
            s->group_r[g] = (int)x;
        else
            s->group_alpha[g] = x;
    }
    return MOLT_OK;
#undef KEY
}

molt_status lora_spec_parse(const char *text, lora_spec *s) {
    lora_spec_default(s);
    if (!text)
        return molt_err(MOLT_EARG, "lora spec: NULL");
    const char *p = text;
    while (*p) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        const char *eq = memchr(p, '=', n);
        if (!eq)
            return molt_err(MOLT_EARG, "lora spec: item '%.*s' is not key=value", (int)n, p);
        MOLT_TRY(parse_item(p, (size_t)(eq - p), eq + 1, n - (size_t)(eq - p) - 1, s));
        p += n + (e ? 1 : 0);
    }
    return MOLT_OK;
}

// Appends printf output to buf at *len; false when it does not fit.
static bool put(char *buf, size_t cap, size_t *len, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;
static bool put(char *buf, size_t cap, size_t *len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *len, *len < cap ? cap - *len : 0, fmt, ap);
    va_end(ap);
    if (n < 0 || *len + (size_t)n >= cap)
        return false;
    *len += (size_t)n;
    return true;
}

molt_status lora_spec_format(const lora_spec *s, char *buf, size_t cap) {
    size_t n = 0;
    // %.17g keeps doubles exact through strtod
    bool ok = put(buf, cap, &n, "r=%d,alpha=%.17g,dropout=%.17g,rslora=%d,init=%s,seed=%llu",
                  s->r, s->alpha, s->dropout, s->rslora ? 1 : 0,
                  s->init == LORA_INIT_GAUSSIAN ? "gaussian" : "kaiming",
                  (unsigned long long)s->seed);
    for (int i = 0; ok && i < s->n_targets; i++)
        ok = put(buf, cap, &n, "%s%s", i ? "+" : ",targets=", s->targets[i]);
    for (int g = 0; ok && g < LORA_GROUP_COUNT; g++) {
        if (ok && s->group_r[g])
            ok = put(buf, cap, &n, ",r.%s=%d", group_names[g], s->group_r[g]);
        if (ok && s->group_alpha[g] != 0)
            ok = put(buf, cap, &n, ",alpha.%s=%.17g", group_names[g], s->group_alpha[g]);
    }
    for (int i = 0; ok && i < s->n_rank_pattern; i++)
        ok = put(buf, cap, &n, ",rank:%s=%.17g", s->rank_pattern[i].key, s->rank_pattern[i].value);
    for (int i = 0; ok && i < s->n_alpha_pattern; i++)
        ok = put(buf, cap, &n, ",alpha:%s=%.17g", s->alpha_pattern[i].key,
                 s->alpha_pattern[i].value);
    return ok ? MOLT_OK : molt_err(MOLT_EARG, "lora spec: %zu bytes are too few", cap);
}

// ---------------------------------------------------------------------------------------
// Matching

static bool glob(const char *p, const char *s) {
    for (; *p; p++, s++) {
        if (*p == '*') {
            for (const char *t = s;; t++) {
                if (glob(p + 1, t))
                    return true;
                if (!*t)
                    return false;
            }
        }
        if (*s != *p)
            return false;
    }
    return *s == 0;
}

bool lora_pattern_match(const char *pattern, const char *path) {
    if (strchr(pattern, '*')) {
        // a glob matches the whole path or any suffix starting at a component
        if (glob(pattern, path))
            return true;
        for (const char *d = strchr(path, '.'); d; d = strchr(d + 1, '.'))
            if (glob(pattern, d + 1))
                return true;
        return false;
    }
    size_t lp = strlen(pattern), ls = strlen(path);
    if (lp == ls)
        return !strcmp(pattern, path);
    return lp < ls && path[ls - lp - 1] == '.' && !strcmp(path + ls - lp, pattern);
}

// A routed-expert parameter: the module path (...mlp.experts) selects both parameters; the
// parameter path is selected by patterns that name the experts component, so "down_proj"
// keeps meaning the shared/dense module as in PEFT's target_modules.
static bool unit_matches(const char *pattern, const lora_unit *u) {
    if (u->group != LORA_GROUP_EXPERTS)
        return lora_pattern_match(pattern, u->path);
    char module[LORA_NAME_MAX];
    const char *dot = strrchr(u->path, '.');
    snprintf(module, sizeof module, "%.*s", (int)(dot - u->path), u->path);
    if (lora_pattern_match(pattern, module))
        return true;
    bool names_experts = strchr(pattern, '.') || strchr(pattern, '*') ||
                         !strcmp(pattern, "gate_up_proj"); // no other module has that name
    return names_experts && lora_pattern_match(pattern, u->path);
}

void lora_peft_key(const lora_unit *u, char *buf, size_t cap) {
    snprintf(buf, cap, "%s%s", u->path, u->group == LORA_GROUP_ROUTER ? ".weight" : "");
}

// PEFT's get_pattern_key: the first key with re.match(rf"(.*\.)?({key})$", name).
static molt_status pattern_lookup(const lora_pattern *p, int n, const char *name, int *hit) {
    *hit = -1;
    for (int i = 0; i < n && *hit < 0; i++) {
        char re[LORA_NAME_MAX + 32];
        snprintf(re, sizeof re, "(?:.*\\.)?(?:%s)$", p[i].key);
        int ec;
        PCRE2_SIZE eo;
        pcre2_code *code = pcre2_compile((PCRE2_SPTR)re, PCRE2_ZERO_TERMINATED, PCRE2_ANCHORED,
                                         &ec, &eo, NULL);
        if (!code)
            return molt_err(MOLT_EARG, "lora: pattern key '%s' is not a valid regex", p[i].key);
        pcre2_match_data *md = pcre2_match_data_create_from_pattern(code, NULL);
        int rc = md ? pcre2_match(code, (PCRE2_SPTR)name, strlen(name), 0, 0, md, NULL) : -1;
        pcre2_match_data_free(md);
        pcre2_code_free(code);
        if (rc >= 0)
            *hit = i;
    }
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Units of a model

typedef struct {
    lora_unit *u;
    int n, cap;
} unit_list;

static molt_status add_unit(unit_list *L, const char *path, lora_group g, int layer,
                            mdl_lin *lin, ag_tensor *base) {
    if (!base)
        return MOLT_OK;
    if (L->n == L->cap) {
        int cap = L->cap ? 2 * L->cap : 64;
        lora_unit *nu = molt_realloc(L->u, (size_t)cap * sizeof *nu);
        if (!nu)
            return molt_err(MOLT_ENOMEM, "lora: out of memory");
        L->u = nu;
        L->cap = cap;
    }
    lora_unit *u = &L->u[L->n++];
    memset(u, 0, sizeof *u);
    snprintf(u->path, sizeof u->path, "%s", path);
    u->group = g;
    u->layer = layer;
    u->lin = lin;
    u->base = base;
    bool three = base->ndim == 3;
    u->n_exp = three ? base->shape[0] : 1;
    u->out = base->shape[three ? 1 : 0];
    u->in = base->shape[three ? 2 : 1];
    return MOLT_OK;
}

static molt_status add_mlp(unit_list *L, const char *prefix, lora_group g, int l, mdl_mlp *p) {
    static const char *names[3] = {"gate_proj", "up_proj", "down_proj"};
    mdl_lin *lins[3] = {&p->gate, &p->up, &p->down};
    char path[LORA_NAME_MAX];
    for (int i = 0; i < 3; i++) {
        int n = snprintf(path, sizeof path, "%s.%s", prefix, names[i]);
        if (n < 0 || (size_t)n >= sizeof path)
            return molt_err(MOLT_EINTERNAL, "lora: module name %s.%s is longer than %d bytes",
                            prefix, names[i], LORA_NAME_MAX - 1);
        MOLT_TRY(add_unit(L, path, g, l, lins[i], lins[i]->w));
    }
    return MOLT_OK;
}

// Every adaptable unit of m, in the model's order (the order of init draws and files).
static molt_status list_units(mdl_model *m, unit_list *L) {
    static const char *attn[6] = {"q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa",
                                  "kv_b_proj", "o_proj"};
    char path[LORA_NAME_MAX], pre[64];
    for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
        mdl_layer *y = &m->layers[l];
        mdl_lin *lins[6] = {&y->q_a, &y->q_b, &y->q, &y->kv_a, &y->kv_b, &y->o};
        for (int i = 0; i < 6; i++) {
            snprintf(path, sizeof path, "model.layers.%d.self_attn.%s", l, attn[i]);
            MOLT_TRY(add_unit(L, path, LORA_GROUP_ATTN, l, lins[i], lins[i]->w));
        }
        snprintf(pre, sizeof pre, "model.layers.%d.mlp", l);
        if (!y->moe) {
            MOLT_TRY(add_mlp(L, pre, LORA_GROUP_DENSE, l, &y->dense));
            continue;
        }
        snprintf(path, sizeof path, "%s.gate", pre);
        MOLT_TRY(add_unit(L, path, LORA_GROUP_ROUTER, l, &y->router, y->router.w));
        snprintf(path, sizeof path, "%s.experts.gate_up_proj", pre);
        MOLT_TRY(add_unit(L, path, LORA_GROUP_EXPERTS, l, NULL, y->gate_up));
        snprintf(path, sizeof path, "%s.experts.down_proj", pre);
        MOLT_TRY(add_unit(L, path, LORA_GROUP_EXPERTS, l, NULL, y->down));
        snprintf(path, sizeof path, "%s.shared_experts", pre);
        MOLT_TRY(add_mlp(L, path, LORA_GROUP_SHARED, l, &y->shared));
    }
    // a tied lm_head shares the embedding; adapting it would adapt the input side too
    if (!m->cfg.tie_word_embeddings)
        MOLT_TRY(add_unit(L, "lm_head", LORA_GROUP_LM_HEAD, -1, &m->lm_head, m->lm_head.w));
    return MOLT_OK;
}

molt_status lora_list_units(mdl_model *m, lora_unit **units, int *n) {
    unit_list L = {0};
    molt_status st = list_units(m, &L);
    if (st != MOLT_OK) {
        molt_free(L.u);
        L.u = NULL;
        L.n = 0;
    }
    *units = L.u;
    *n = L.n;
    return st;
}

// Rank and alpha of a unit: PEFT pattern, else the group's, else the default.
static molt_status unit_rank(const lora_spec *s, lora_unit *u) {
    char key[LORA_NAME_MAX + 8];
    lora_peft_key(u, key, sizeof key);
    int hr, ha;
    MOLT_TRY(pattern_lookup(s->rank_pattern, s->n_rank_pattern, key, &hr));
    MOLT_TRY(pattern_lookup(s->alpha_pattern, s->n_alpha_pattern, key, &ha));
    double r = hr >= 0 ? s->rank_pattern[hr].value : s->group_r[u->group] ? s->group_r[u->group]
                                                                          : s->r;
    u->alpha = ha >= 0 ? s->alpha_pattern[ha].value
               : s->group_alpha[u->group] != 0 ? s->group_alpha[u->group] : s->alpha;
    u->r = r >= 1 && r < 1e9 ? (int)r : 0;
    u->scale = u->r ? (s->rslora ? u->alpha / sqrt((double)u->r) : u->alpha / u->r) : 0;
    return MOLT_OK;
}

static molt_status alloc_unit(lora_adapter *ad, lora_unit *u, ag_rng *rng) {
    int64_t rr = (int64_t)u->r * u->n_exp;
    u->a = ag_tensor_new2(&ad->params, AG_F32, rr, u->in);
    u->b = ag_tensor_new2(&ad->params, AG_F32, u->out, rr);
    if (!u->a || !u->b)
        return molt_err_wrap(MOLT_ENOMEM, "lora: allocating %s", u->path);
    u->a->requires_grad = u->b->requires_grad = true;
    ag_tensor_set_name(u->a, "lora_A");
    ag_tensor_set_name(u->b, "lora_B");
    // a shard of routed experts draws the full A and keeps its rows: the same values, and
    // the same draws left for the next units, as with every expert here
    ag_arena tmp;
    ag_arena_init(&tmp, "lora init", 1 << 16);
    ag_tensor *a = u->a;
    if (lora_unit_is_shard(ad, u) && ad->spec.init != LORA_INIT_ZERO) {
        int64_t fs[2];
        lora_unit_full_shape(ad, u, false, fs);
        if (!(a = ag_tensor_new2(&tmp, AG_F32, fs[0], fs[1]))) {
            ag_arena_free(&tmp);
            return molt_err_wrap(MOLT_ENOMEM, "lora: initializing %s", u->path);
        }
    }
    if (ad->spec.init == LORA_INIT_KAIMING) {
        // kaiming_uniform_(a=sqrt(5)): gain sqrt(2/(1+5)), bound = gain*sqrt(3/fan_in)
        double bound = 1.0 / sqrt((double)u->in);
        ag_fill_uniform(a, rng, -bound, bound);
    } else if (ad->spec.init == LORA_INIT_GAUSSIAN)
        ag_fill_normal(a, rng, 0.0, 1.0 / u->r);
    if (a != u->a)
        lora_shard_from_full(ad, u, false, a->data, u->a->data);
    ag_arena_free(&tmp);
    int64_t n = (int64_t)u->r * u->n_exp * (u->in + u->out);
    ad->group_params[u->group] += n;
    ad->total_params += n;
    return MOLT_OK;
}

// The model's expert adapter for layer l: one rank and scale for both stacks.
static molt_status wire_experts(lora_adapter *ad, int l, lora_wire mode) {
    const lora_unit *gu = NULL, *dn = NULL;
    for (int i = 0; i < ad->n_units; i++)
        if (ad->units[i].group == LORA_GROUP_EXPERTS && ad->units[i].layer == l) {
            bool is_gu = strstr(ad->units[i].path, "gate_up_proj") != NULL;
            *(is_gu ? &gu : &dn) = &ad->units[i];
        }
    if (!gu && !dn)
        return MOLT_OK;
    if (gu && dn && (gu->r != dn->r || gu->scale != dn->scale)) {
        if (mode == LORA_WIRE_FILES)
            return MOLT_OK; // kept for files and merging only
        return molt_err(MOLT_EUNSUPPORTED, "lora: layer %d: routed-expert LoRA needs the same "
                        "rank and scale on gate_up_proj (r %d, scale %g) and down_proj (r %d, "
                        "scale %g)", l, gu->r, gu->scale, dn->r, dn->scale);
    }
    const lora_unit *any = gu ? gu : dn;
    if (mode == LORA_WIRE_NONE)
        return MOLT_OK;
    ad->model->layers[l].experts_lora = (ag_expert_lora){
        .a_gate_up = gu ? gu->a : NULL, .b_gate_up = gu ? gu->b : NULL,
        .a_down = dn ? dn->a : NULL, .b_down = dn ? dn->b : NULL,
        .r = any->r, .scale = any->scale};
    return MOLT_OK;
}

static molt_status wire(lora_adapter *ad, lora_wire mode) {
    for (int i = 0; mode != LORA_WIRE_NONE && i < ad->n_units; i++) {
        lora_unit *u = &ad->units[i];
        if (u->lin) {
            u->lin->lora_a = u->a;
            u->lin->lora_b = u->b;
            u->lin->lora_scale = u->scale;
            // PEFT applies lora_dropout to nn.Linear inputs only, not to parameters
            if (u->group != LORA_GROUP_ROUTER && ad->spec.dropout > 0) {
                u->lin->lora_dropout = ad->spec.dropout;
                u->lin->lora_rng = ad->dropout_rng;
            }
        }
    }
    for (int l = 0; l < ad->model->cfg.num_hidden_layers; l++)
        MOLT_TRY(wire_experts(ad, l, mode));
    return MOLT_OK;
}

static bool model_has_lora(const mdl_model *m) {
    unit_list all = {0};
    bool has = false;
    if (list_units((mdl_model *)m, &all) == MOLT_OK)
        for (int i = 0; i < all.n; i++)
            has = has || (all.u[i].lin && all.u[i].lin->lora_a);
    for (int l = 0; l < m->cfg.num_hidden_layers; l++)
        has = has || m->layers[l].experts_lora.a_gate_up || m->layers[l].experts_lora.a_down;
    molt_free(all.u);
    return has;
}

// Keeps the units some target selects; checks each target selects something.
static molt_status select_units(const lora_spec *s, unit_list *all, lora_adapter *ad) {
    bool *keep = molt_calloc((size_t)all->n + 1, sizeof *keep);
    if (!keep)
        return molt_err(MOLT_ENOMEM, "lora: out of memory");
    for (int t = 0; t < s->n_targets; t++) {
        bool any = false;
        for (int i = 0; i < all->n; i++)
            if (unit_matches(s->targets[t], &all->u[i]))
                keep[i] = any = true;
        if (!any) {
            molt_free(keep);
            return molt_err(MOLT_EARG, "lora: target '%s' matches no module of the model",
                            s->targets[t]);
        }
    }
    int n = 0;
    for (int i = 0; i < all->n; i++)
        if (keep[i])
            all->u[n++] = all->u[i];
    all->n = n;
    molt_free(keep);
    ad->units = all->u;
    ad->n_units = all->n;
    return MOLT_OK;
}

molt_status lora_attach(mdl_model *m, const lora_spec *spec, lora_wire mode,
                        lora_adapter *out) {
    memset(out, 0, sizeof *out);
    if (spec->r < 1)
        return molt_err(MOLT_EARG, "lora: r = %d must be positive", spec->r);
    if (spec->n_targets < 1)
        return molt_err(MOLT_EARG, "lora: no target modules");
    if (!(spec->dropout >= 0 && spec->dropout < 1))
        return molt_err(MOLT_EARG, "lora: dropout = %g is outside [0, 1)", spec->dropout);
    if (mode != LORA_WIRE_NONE && model_has_lora(m))
        return molt_err(MOLT_EARG, "lora: the model already carries an adapter");
    unit_list all = {0};
    molt_status st = list_units(m, &all);
    if (st != MOLT_OK) {
        molt_free(all.u);
        return st;
    }
    out->spec = *spec;
    out->model = m;
    ag_arena_init(&out->params, "lora params", 1 << 20);
    if ((st = select_units(spec, &all, out)) != MOLT_OK) {
        molt_free(all.u);
        lora_detach(out);
        return st;
    }
    out->dropout_rng = molt_malloc(sizeof *out->dropout_rng);
    if (!out->dropout_rng) {
        lora_detach(out);
        return molt_err(MOLT_ENOMEM, "lora: out of memory");
    }
    // a stream of its own, so dropout draws never shift the init draws below
    ag_rng_seed(out->dropout_rng, spec->seed ^ LORA_DROPOUT_SEED_MIX);
    ag_rng rng;
    ag_rng_seed(&rng, spec->seed);
    for (int i = 0; st == MOLT_OK && i < out->n_units; i++) {
        lora_unit *u = &out->units[i];
        st = unit_rank(spec, u);
        if (st == MOLT_OK && u->r == 0)
            st = molt_err(MOLT_EARG, "lora: %s%s ends up with rank 0 (zero parameters)",
                          u->group == LORA_GROUP_EXPERTS ? "routed-expert LoRA on " : "",
                          u->path);
        if (st == MOLT_OK)
            st = alloc_unit(out, u, &rng);
    }
    if (st == MOLT_OK)
        st = wire(out, mode);
    if (st != MOLT_OK)
        lora_detach(out);
    return st;
}

molt_status lora_plan_units(mdl_model *m, const lora_spec *spec, lora_unit **units, int *n) {
    *units = NULL;
    *n = 0;
    if (spec->r < 1 || spec->n_targets < 1)
        return molt_err(MOLT_EARG, "lora: r = %d and %d targets (both must be positive)",
                        spec->r, spec->n_targets);
    unit_list all = {0};
    lora_adapter tmp;
    memset(&tmp, 0, sizeof tmp);
    molt_status st = list_units(m, &all);
    if (st == MOLT_OK)
        st = select_units(spec, &all, &tmp); // tmp.units is all.u, kept ones first
    if (st != MOLT_OK && !tmp.units)
        molt_free(all.u);
    for (int i = 0; st == MOLT_OK && i < tmp.n_units; i++) {
        lora_unit *u = &tmp.units[i];
        st = unit_rank(spec, u);
        if (st == MOLT_OK && u->r == 0)
            st = molt_err(MOLT_EARG, "lora: %s ends up with rank 0 (zero parameters)", u->path);
    }
    if (st != MOLT_OK) {
        molt_free(tmp.units);
        return st;
    }
    *units = tmp.units;
    *n = tmp.n_units;
    return MOLT_OK;
}

void lora_detach(lora_adapter *ad) {
    if (!ad)
        return;
    for (int i = 0; i < ad->n_units; i++) {
        mdl_lin *lin = ad->units[i].lin;
        if (lin && lin->lora_a == ad->units[i].a) {
            lin->lora_a = lin->lora_b = NULL;
            lin->lora_scale = lin->lora_dropout = 0;
            lin->lora_rng = NULL;
        }
        int l = ad->units[i].layer;
        ag_expert_lora *el = l >= 0 && ad->model ? &ad->model->layers[l].experts_lora : NULL;
        if (el && ad->units[i].group == LORA_GROUP_EXPERTS &&
            (el->a_gate_up == ad->units[i].a || el->a_down == ad->units[i].a))
            memset(el, 0, sizeof *el);
    }
    molt_free(ad->units);
    molt_free(ad->dropout_rng);
    ag_arena_free(&ad->params);
    memset(ad, 0, sizeof *ad);
}

void lora_randomize_b(lora_adapter *ad, uint64_t seed, double std) {
    ag_rng rng;
    ag_rng_seed(&rng, seed);
    for (int i = 0; i < ad->n_units; i++) {
        lora_unit *u = &ad->units[i];
        if (!lora_unit_is_shard(ad, u)) {
            ag_fill_normal(u->b, &rng, 0.0, std);
            continue;
        }
        int64_t fs[2];
        lora_unit_full_shape(ad, u, true, fs);
        ag_arena tmp;
        ag_arena_init(&tmp, "lora b", 1 << 16);
        ag_tensor *full = ag_tensor_new2(&tmp, AG_F32, fs[0], fs[1]);
        if (full) { // (without memory B stays as it was: a test helper)
            ag_fill_normal(full, &rng, 0.0, std);
            lora_shard_from_full(ad, u, true, full->data, u->b->data);
        }
        ag_arena_free(&tmp);
    }
}

int64_t lora_group_params(const lora_adapter *ad, lora_group g) {
    return (unsigned)g < LORA_GROUP_COUNT ? ad->group_params[g] : 0;
}

lora_unit *lora_find_unit(lora_adapter *ad, const char *path) {
    for (int i = 0; i < ad->n_units; i++)
        if (!strcmp(ad->units[i].path, path))
            return &ad->units[i];
    return NULL;
}

void lora_print_table(const lora_adapter *ad, FILE *f) {
    fprintf(f, "%-8s %6s %10s %14s\n", "group", "units", "ranks", "trainable");
    for (int g = 0; g < LORA_GROUP_COUNT; g++) {
        int n = 0, rmin = 0, rmax = 0;
        for (int i = 0; i < ad->n_units; i++) {
            const lora_unit *u = &ad->units[i];
            if ((int)u->group != g)
                continue;
            rmin = n == 0 || u->r < rmin ? u->r : rmin;
            rmax = u->r > rmax ? u->r : rmax;
            n++;
        }
        char ranks[32] = "-";
        if (n)
            snprintf(ranks, sizeof ranks, rmin == rmax ? "%d" : "%d-%d", rmin, rmax);
        fprintf(f, "%-8s %6d %10s %14lld\n", group_names[g], n, ranks,
                (long long)ad->group_params[g]);
    }
    fprintf(f, "%-8s %6d %10s %14lld\n", "total", ad->n_units, "", (long long)ad->total_params);
}
