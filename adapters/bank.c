// adapters/bank.c: an adapter in a bank slot (model.h mdl_bank), for forwards that mix
// adapters in one batch: every 2-D unit on its linear, both routed-expert stacks of a layer
// as one ag_expert_lora. Not here: choosing slots or evicting adapters (infer/engine/).
#include "adapters.h"

#include <string.h>

int lora_max_rank(const lora_adapter *ad) {
    int r = 0;
    for (int i = 0; i < ad->n_units; i++)
        if (ad->units[i].r > r)
            r = ad->units[i].r;
    return r;
}

// Layer l's routed-expert units of ad as one ag_expert_lora (both NULL when none).
static molt_status experts_of(const lora_adapter *ad, int l, ag_expert_lora *el) {
    const lora_unit *gu = NULL, *dn = NULL;
    for (int i = 0; i < ad->n_units; i++) {
        const lora_unit *u = &ad->units[i];
        if (u->group == LORA_GROUP_EXPERTS && u->layer == l)
            *(strstr(u->path, "gate_up_proj") ? &gu : &dn) = u;
    }
    memset(el, 0, sizeof *el);
    if (!gu && !dn)
        return MOLT_OK;
    if (gu && dn && (gu->r != dn->r || gu->scale != dn->scale))
        return molt_err(MOLT_EUNSUPPORTED, "lora: layer %d: routed-expert LoRA needs the same "
                        "rank and scale on gate_up_proj and down_proj", l);
    const lora_unit *any = gu ? gu : dn;
    *el = (ag_expert_lora){.a_gate_up = gu ? gu->a : NULL, .b_gate_up = gu ? gu->b : NULL,
                           .a_down = dn ? dn->a : NULL, .b_down = dn ? dn->b : NULL,
                           .r = any->r, .scale = any->scale,
                           .bp_gate_up = gu ? gu->bp : NULL, .bp_down = dn ? dn->bp : NULL};
    return MOLT_OK;
}

molt_status lora_pack_experts(lora_adapter *ad) {
    for (int i = 0; i < ad->n_units; i++) {
        lora_unit *u = &ad->units[i];
        if (u->group != LORA_GROUP_EXPERTS || u->bp || !u->b || u->b->dtype != AG_F32)
            continue;
        molt_status st = ag_expert_b_per_expert(&ad->params, u->b, u->r, &u->bp);
        if (st != MOLT_OK)
            return molt_err_wrap(st, "lora: %s: re-laying B per expert", u->path);
    }
    return MOLT_OK;
}

molt_status lora_bank_put(const lora_adapter *ad, const mdl_model *m, mdl_bank *b, int s) {
    if (ad->model != m)
        return molt_err(MOLT_EARG, "lora: the adapter was loaded for another model");
    mdl_bank_clear(b, s);
    molt_status st = MOLT_OK;
    for (int i = 0; st == MOLT_OK && i < ad->n_units; i++) {
        const lora_unit *u = &ad->units[i];
        if (u->lin)
            st = mdl_bank_set_lin(b, m, s, u->lin->id, u->a, u->b, u->scale);
    }
    for (int l = 0; st == MOLT_OK && l < m->cfg.num_hidden_layers; l++) {
        ag_expert_lora el;
        st = experts_of(ad, l, &el);
        if (st == MOLT_OK && (el.a_gate_up || el.a_down))
            st = mdl_bank_set_experts(b, m, s, l, &el);
    }
    if (st != MOLT_OK)
        mdl_bank_clear(b, s);
    return st;
}
