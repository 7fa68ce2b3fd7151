// model/plan.c: the bytes a model's weights take on one rank, by group, as the loaders store
// them (F32 tensors in the weights arena, qweights with their scales and absmax, a shard's
// routed experts only, a shard's NF4 stacks with plain absmax when its blocks do not line up
// with the double quantization's groups). For `molt plan`; nothing is loaded.
#include "mdl_quant.h"

static const char *const group_names[MDL_PG_COUNT] = {
    "embeddings", "norms", "attention", "router", "shared experts", "routed experts",
    "dense MLP", "lm_head"};

const char *mdl_plan_group_name(mdl_plan_group g) {
    return (unsigned)g < MDL_PG_COUNT ? group_names[g] : "?";
}

static size_t round64(size_t b) { return (b + 63) & ~(size_t)63; }

static mdl_plan_group plan_group(const w_entry *e) {
    switch (e->kind) {
    case W_EMBED: return MDL_PG_EMBED;
    case W_NORM: return MDL_PG_NORMS;
    default: break;
    }
    switch (mdl_q_group(e)) {
    case MDL_QG_ATTENTION: return MDL_PG_ATTENTION;
    case MDL_QG_ROUTER: return MDL_PG_ROUTER;
    case MDL_QG_SHARED: return MDL_PG_SHARED;
    case MDL_QG_EXPERTS: return MDL_PG_EXPERTS;
    case MDL_QG_DENSE: return MDL_PG_DENSE;
    default: return MDL_PG_LM_HEAD;
    }
}

molt_status mdl_plan_weights(const mcfg *cfg, const mdl_qspec *spec, int expert_count,
                             size_t bytes[MDL_PG_COUNT]) {
    for (int g = 0; g < MDL_PG_COUNT; g++)
        bytes[g] = 0;
    mdl_model m;
    MOLT_TRY(mdl_create_plan(&m, cfg, expert_count));
    int n = mdl_weight_list(&m, NULL, 0);
    w_entry *list = molt_malloc((size_t)n * sizeof *list);
    if (!list) {
        mdl_free(&m);
        return molt_err(MOLT_ENOMEM, "model plan: out of memory");
    }
    mdl_weight_list(&m, list, n);
    bool shard = expert_count < cfg->n_routed_experts;
    for (int i = 0; i < n; i++) {
        const ag_tensor *t = list[i].t;
        mdl_plan_group pg = plan_group(&list[i]);
        int qg = mdl_q_group(&list[i]);
        ag_qformat f = spec && qg >= 0 ? spec->format[qg] : AG_Q_F32;
        if (f == AG_Q_F32) { // a plain tensor: struct and data in the weights arena
            bytes[pg] += round64(sizeof(ag_tensor)) + round64((size_t)t->numel * sizeof(float));
            continue;
        }
        ag_qopts o = ag_qopts_default();
        o.nf4_double_quant = spec->nf4_double_quant;
        if (f == AG_Q_NF4 && o.nf4_double_quant && shard && t->ndim == 3) {
            // a shard keeps double quantization only when its blocks fill whole groups
            int64_t blocks = t->numel / AG_NF4_BLOCK;
            o.nf4_double_quant = blocks % AG_NF4_DQ_BLOCK == 0;
        }
        bytes[pg] += ag_qweight_storage_bytes(f, t->ndim, t->shape, &o) +
                     round64(sizeof(ag_tensor));
    }
    molt_free(list);
    mdl_free(&m);
    return MOLT_OK;
}
