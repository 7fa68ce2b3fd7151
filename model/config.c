// model/config.c: parsing and checking config.json of Mistral Small 4 (model_type
// "mistral4", alone or as the text_config of a wrapper such as Mistral3).
//
// Absent keys take transformers' Mistral4Config defaults: saved configs (and nested ones in
// particular) may leave out every value equal to its default, so "absent" is not an error.
// Present keys must have the right JSON type and a sensible range, and the values must
// agree with each other. Not here: tensor names, weights, tokenizer settings.
#include "model.h"

#include <jansson.h>
#include <math.h>
#include <string.h>

// Where fields are read from: the object, the file label and "text_config." when wrapped.
typedef struct {
    const char *label;
    const char *prefix;
    json_t *obj;
} src;

static const char *type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

static molt_status type_err(const src *s, const char *key, const char *want, const json_t *v) {
    return molt_err(MOLT_EFORMAT, "%s: %s%s must be %s, got %s", s->label, s->prefix, key, want,
                    type_name(v));
}

// Integer field in [lo, hi]. Absent -> dflt (range-checked too: token-id defaults depend
// on vocab_size). JSON null -> null_val when null_ok.
static molt_status get_int_n(const src *s, const char *key, int64_t dflt, int64_t lo, int64_t hi,
                             bool null_ok, int64_t null_val, int64_t *out) {
    const json_t *v = json_object_get(s->obj, key);
    if (v && json_is_null(v) && null_ok) {
        *out = null_val;
        return MOLT_OK;
    }
    if (v && !json_is_integer(v))
        return type_err(s, key, "an integer", v);
    json_int_t x = v ? json_integer_value(v) : (json_int_t)dflt;
    if (x < lo || x > hi)
        return molt_err(MOLT_EFORMAT, "%s: %s%s = %lld is out of range [%lld, %lld]", s->label,
                        s->prefix, key, (long long)x, (long long)lo, (long long)hi);
    *out = (int64_t)x;
    return MOLT_OK;
}

static molt_status get_int(const src *s, const char *key, int dflt, int lo, int *out) {
    int64_t x = 0;
    MOLT_TRY(get_int_n(s, key, dflt, lo, INT32_MAX, false, 0, &x));
    *out = (int)x;
    return MOLT_OK;
}

// Finite number (integer or real) > lo (or >= lo when !strict). Absent -> dflt.
static molt_status get_num(const src *s, const char *key, double dflt, double lo, bool strict,
                           double *out) {
    const json_t *v = json_object_get(s->obj, key);
    if (!v) {
        *out = dflt;
        return MOLT_OK;
    }
    if (!json_is_number(v))
        return type_err(s, key, "a number", v);
    double x = json_number_value(v);
    if (!isfinite(x) || (strict ? x <= lo : x < lo))
        return molt_err(MOLT_EFORMAT, "%s: %s%s = %g must be %s %g", s->label, s->prefix, key, x,
                        strict ? ">" : ">=", lo);
    *out = x;
    return MOLT_OK;
}

static molt_status get_bool(const src *s, const char *key, bool dflt, bool *out) {
    const json_t *v = json_object_get(s->obj, key);
    if (!v) {
        *out = dflt;
        return MOLT_OK;
    }
    if (!json_is_boolean(v))
        return type_err(s, key, "a boolean", v);
    *out = json_is_true(v);
    return MOLT_OK;
}

// String field or NULL when absent.
static molt_status get_str(const src *s, const char *key, const char **out) {
    const json_t *v = json_object_get(s->obj, key);
    *out = NULL;
    if (v && !json_is_string(v))
        return type_err(s, key, "a string", v);
    if (v)
        *out = json_string_value(v);
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Fields

static molt_status read_dims(const src *s, mcfg *c) {
    MOLT_TRY(get_int(s, "hidden_size", 4096, 1, &c->hidden_size));
    MOLT_TRY(get_int(s, "num_hidden_layers", 36, 1, &c->num_hidden_layers));
    MOLT_TRY(get_int(s, "num_attention_heads", 32, 1, &c->num_attention_heads));
    int64_t kv = 0;
    MOLT_TRY(get_int_n(s, "num_key_value_heads", c->num_attention_heads, 1, INT32_MAX, true,
                       c->num_attention_heads, &kv));
    c->num_key_value_heads = (int)kv;
    MOLT_TRY(get_int(s, "vocab_size", 131072, 1, &c->vocab_size));
    int64_t q = 0;
    MOLT_TRY(get_int_n(s, "q_lora_rank", 1024, 1, INT32_MAX, true, 0, &q));
    c->q_lora_rank = (int)q;
    MOLT_TRY(get_int(s, "kv_lora_rank", 256, 1, &c->kv_lora_rank));
    MOLT_TRY(get_int(s, "qk_nope_head_dim", 64, 1, &c->qk_nope_head_dim));
    MOLT_TRY(get_int(s, "qk_rope_head_dim", 64, 1, &c->qk_rope_head_dim));
    MOLT_TRY(get_int(s, "v_head_dim", 128, 1, &c->v_head_dim));
    MOLT_TRY(get_int(s, "n_routed_experts", 128, 1, &c->n_routed_experts));
    MOLT_TRY(get_int(s, "n_shared_experts", 1, 0, &c->n_shared_experts));
    MOLT_TRY(get_int(s, "num_experts_per_tok", 4, 1, &c->num_experts_per_tok));
    MOLT_TRY(get_int(s, "moe_intermediate_size", 2048, 1, &c->moe_intermediate_size));
    MOLT_TRY(get_int(s, "intermediate_size", 12288, 1, &c->intermediate_size));
    MOLT_TRY(get_int(s, "first_k_dense_replace", 0, 0, &c->first_k_dense_replace));
    MOLT_TRY(get_int(s, "n_group", 1, 1, &c->n_group));
    MOLT_TRY(get_int(s, "topk_group", 1, 1, &c->topk_group));
    MOLT_TRY(get_int_n(s, "max_position_embeddings", 1048576, 1, INT64_MAX, false, 0,
                       &c->max_position_embeddings));
    return MOLT_OK;
}

static molt_status read_flags(const src *s, mcfg *c) {
    MOLT_TRY(get_bool(s, "norm_topk_prob", true, &c->norm_topk_prob));
    MOLT_TRY(get_num(s, "routed_scaling_factor", 1.0, 0, true, &c->routed_scaling_factor));
    MOLT_TRY(get_num(s, "rms_norm_eps", 1e-6, 0, true, &c->rms_norm_eps));
    MOLT_TRY(get_bool(s, "rope_interleave", true, &c->rope_interleave));
    MOLT_TRY(get_bool(s, "tie_word_embeddings", false, &c->tie_word_embeddings));
    const char *act = NULL;
    MOLT_TRY(get_str(s, "hidden_act", &act));
    if (act && strcmp(act, "silu") != 0)
        return molt_err(MOLT_EUNSUPPORTED, "%s: %shidden_act '%s' is not supported (silu)",
                        s->label, s->prefix, act);
    bool bias = false;
    MOLT_TRY(get_bool(s, "attention_bias", false, &bias));
    if (bias)
        return molt_err(MOLT_EUNSUPPORTED, "%s: %sattention_bias true is not supported", s->label,
                        s->prefix);
    return MOLT_OK;
}

static molt_status read_tokens(const src *s, mcfg *c) {
    int64_t lim = (int64_t)c->vocab_size - 1, x = 0;
    MOLT_TRY(get_int_n(s, "pad_token_id", 11, 0, lim, true, -1, &x));
    c->pad_token_id = (int)x;
    MOLT_TRY(get_int_n(s, "bos_token_id", 1, 0, lim, true, -1, &x));
    c->bos_token_id = (int)x;
    const json_t *e = json_object_get(s->obj, "eos_token_id");
    if (!json_is_array(e)) {
        MOLT_TRY(get_int_n(s, "eos_token_id", 2, 0, lim, true, -1, &x));
        c->n_eos = x >= 0;
        c->eos_token_ids[0] = (int)x;
        return MOLT_OK;
    }
    size_t n = json_array_size(e);
    if (n > MCFG_MAX_EOS)
        return molt_err(MOLT_EUNSUPPORTED, "%s: %seos_token_id lists %zu ids, at most %d supported",
                        s->label, s->prefix, n, MCFG_MAX_EOS);
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_array_get(e, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > lim)
            return molt_err(MOLT_EFORMAT, "%s: %seos_token_id[%zu] must be a token id in [0, %lld]",
                            s->label, s->prefix, i, (long long)lim);
        c->eos_token_ids[i] = (int)json_integer_value(v);
    }
    c->n_eos = (int)n;
    return MOLT_OK;
}

// The defaults Mistral4Config fills in when rope_parameters is absent.
static void rope_defaults(mcfg_rope *r) {
    *r = (mcfg_rope){.yarn = true,
                     .rope_theta = 10000,
                     .factor = 128,
                     .original_max_position_embeddings = 8192,
                     .beta_fast = 32,
                     .beta_slow = 1,
                     .mscale = 1,
                     .mscale_all_dim = 1,
                     .llama_4_scaling_beta = 0.1};
}

// rope_parameters (or the older rope_scaling with a top-level rope_theta).
static molt_status read_rope(const src *s, mcfg_rope *r) {
    const char *key = "rope_parameters";
    json_t *rp = json_object_get(s->obj, key);
    if (!rp || json_is_null(rp))
        rp = json_object_get(s->obj, key = "rope_scaling");
    double theta = 0;
    bool has_theta = json_object_get(s->obj, "rope_theta") != NULL;
    MOLT_TRY(get_num(s, "rope_theta", 10000, 0, true, &theta));
    rope_defaults(r);
    if (!rp || json_is_null(rp)) {
        r->rope_theta = theta;
        return MOLT_OK;
    }
    if (!json_is_object(rp))
        return type_err(s, key, "an object", rp);
    char pre[64];
    snprintf(pre, sizeof pre, "%s%s.", s->prefix, key);
    src q = {s->label, pre, rp};
    const char *type, *type2;
    MOLT_TRY(get_str(&q, "rope_type", &type));
    MOLT_TRY(get_str(&q, "type", &type2));
    if (!type && !(type = type2))
        return molt_err(MOLT_EFORMAT, "%s: %srope_type is missing", s->label, pre);
    if (strcmp(type, "yarn") != 0 && strcmp(type, "default") != 0)
        return molt_err(MOLT_EUNSUPPORTED, "%s: %srope_type '%s' is not supported (yarn, default)",
                        s->label, pre, type);
    *r = (mcfg_rope){.yarn = strcmp(type, "yarn") == 0, .factor = 1};
    MOLT_TRY(get_num(&q, "rope_theta", has_theta ? theta : 10000, 0, true, &r->rope_theta));
    if (!r->yarn)
        return MOLT_OK;
    // YaRN needs its factor and original context; the rest take transformers' yarn defaults
    // (mscale terms 0 = "not given", see ag_rope_config).
    if (!json_object_get(rp, "factor") || !json_object_get(rp, "original_max_position_embeddings"))
        return molt_err(MOLT_EFORMAT,
                        "%s: %sfactor and original_max_position_embeddings are "
                        "required for rope_type yarn",
                        s->label, pre);
    MOLT_TRY(get_num(&q, "factor", 1, 1, false, &r->factor));
    MOLT_TRY(get_num(&q, "original_max_position_embeddings", 0, 0, true,
                     &r->original_max_position_embeddings));
    MOLT_TRY(get_num(&q, "beta_fast", 32, 0, true, &r->beta_fast));
    MOLT_TRY(get_num(&q, "beta_slow", 1, 0, true, &r->beta_slow));
    MOLT_TRY(get_num(&q, "mscale", 0, 0, false, &r->mscale));
    MOLT_TRY(get_num(&q, "mscale_all_dim", 0, 0, false, &r->mscale_all_dim));
    const json_t *beta = json_object_get(rp, "llama_4_scaling_beta");
    if (json_is_null(beta))
        return MOLT_OK;
    return get_num(&q, "llama_4_scaling_beta", 0, 0, false, &r->llama_4_scaling_beta);
}

// Values that are each fine but do not fit together.
static molt_status check_consistent(const src *s, const mcfg *c) {
    const char *L = s->label, *P = s->prefix;
    if (c->num_experts_per_tok > c->n_routed_experts)
        return molt_err(MOLT_EFORMAT, "%s: %snum_experts_per_tok %d > n_routed_experts %d", L, P,
                        c->num_experts_per_tok, c->n_routed_experts);
    if (c->n_routed_experts % c->n_group)
        return molt_err(MOLT_EFORMAT, "%s: %sn_routed_experts %d is not divisible by n_group %d", L,
                        P, c->n_routed_experts, c->n_group);
    if (c->topk_group > c->n_group)
        return molt_err(MOLT_EFORMAT, "%s: %stopk_group %d > n_group %d", L, P, c->topk_group,
                        c->n_group);
    if (c->qk_rope_head_dim % 2 || c->qk_rope_head_dim > 512)
        return molt_err(MOLT_EFORMAT, "%s: %sqk_rope_head_dim %d must be even and <= 512", L, P,
                        c->qk_rope_head_dim);
    if (c->num_attention_heads % c->num_key_value_heads)
        return molt_err(MOLT_EFORMAT,
                        "%s: %snum_attention_heads %d is not divisible by num_key_value_heads %d",
                        L, P, c->num_attention_heads, c->num_key_value_heads);
    if (c->first_k_dense_replace > c->num_hidden_layers)
        return molt_err(MOLT_EFORMAT, "%s: %sfirst_k_dense_replace %d > num_hidden_layers %d", L, P,
                        c->first_k_dense_replace, c->num_hidden_layers);
    if (c->rope.yarn && c->rope.beta_fast <= c->rope.beta_slow)
        return molt_err(MOLT_EFORMAT, "%s: %srope beta_fast %g must exceed beta_slow %g", L, P,
                        c->rope.beta_fast, c->rope.beta_slow);
    return MOLT_OK;
}

// Finds the mistral4 object: the root, or a wrapper's text_config.
static molt_status find_text_config(const char *label, json_t *root, src *s, bool *wrapped) {
    *s = (src){label, "", root};
    const char *mt;
    MOLT_TRY(get_str(s, "model_type", &mt));
    *wrapped = false;
    if (mt && strcmp(mt, "mistral4") == 0)
        return MOLT_OK;
    json_t *tc = json_object_get(root, "text_config");
    if (json_is_object(tc)) {
        src t = {label, "text_config.", tc};
        const char *tmt;
        MOLT_TRY(get_str(&t, "model_type", &tmt));
        if (tmt && strcmp(tmt, "mistral4") == 0) {
            *s = t;
            *wrapped = true;
            return MOLT_OK;
        }
    }
    if (!mt)
        return molt_err(MOLT_EFORMAT, "%s: model_type is missing", label);
    return molt_err(MOLT_EFORMAT,
                    "%s: model_type '%s' is not supported (mistral4, or a wrapper whose "
                    "text_config has model_type mistral4)",
                    label, mt);
}

molt_status mcfg_parse(const char *text, size_t len, const char *label, mcfg *cfg) {
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return molt_err(MOLT_EFORMAT, "%s: not valid JSON: %s (line %d, column %d)", label, je.text,
                        je.line, je.column);
    mcfg c;
    memset(&c, 0, sizeof c);
    src s;
    molt_status st = json_is_object(root) ? find_text_config(label, root, &s, &c.wrapped)
                                          : molt_err(MOLT_EFORMAT, "%s: not a JSON object", label);
    if (st == MOLT_OK)
        st = read_dims(&s, &c);
    if (st == MOLT_OK)
        st = read_flags(&s, &c);
    if (st == MOLT_OK)
        st = read_tokens(&s, &c);
    if (st == MOLT_OK)
        st = read_rope(&s, &c.rope);
    if (st == MOLT_OK)
        st = check_consistent(&s, &c);
    json_decref(root);
    if (st == MOLT_OK)
        *cfg = c; // a failed parse leaves *cfg untouched
    return st;
}

molt_status mcfg_load(const char *path, mcfg *cfg) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return molt_err(MOLT_EIO, "%s: cannot open", path);
    size_t cap = 1 << 16, n = 0;
    char *buf = molt_malloc(cap);
    molt_status st = buf ? MOLT_OK : molt_err(MOLT_ENOMEM, "%s: out of memory", path);
    while (st == MOLT_OK) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap)
            break;
        char *nb = cap < (64u << 20) ? molt_realloc(buf, 2 * cap) : NULL;
        if (!nb)
            st = molt_err(MOLT_EFORMAT, "%s: larger than 64 MB or out of memory", path);
        else {
            buf = nb;
            cap *= 2;
        }
    }
    if (st == MOLT_OK && ferror(f))
        st = molt_err(MOLT_EIO, "%s: read error", path);
    fclose(f);
    if (st == MOLT_OK)
        st = mcfg_parse(buf, n, path, cfg);
    molt_free(buf);
    return st;
}

void mcfg_rope_config(const mcfg *cfg, ag_rope_config *out) {
    const mcfg_rope *r = &cfg->rope;
    *out = (ag_rope_config){.theta = r->rope_theta,
                            .rot_dim = cfg->qk_rope_head_dim,
                            .yarn = r->yarn,
                            .factor = r->factor,
                            .original_max_pos = r->original_max_position_embeddings,
                            .beta_fast = r->beta_fast,
                            .beta_slow = r->beta_slow,
                            .mscale = r->mscale,
                            .mscale_all_dim = r->mscale_all_dim};
}

molt_status mcfg_check_positions(const mcfg *c, int64_t n, const char *what) {
    if (n <= c->max_position_embeddings)
        return MOLT_OK;
    return molt_err(MOLT_EARG, "%s: %lld positions, more than the model's "
                    "max_position_embeddings %lld", what, (long long)n,
                    (long long)c->max_position_embeddings);
}
