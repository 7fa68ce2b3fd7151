// model/bank.c: the linears' numbering (mdl_lin ids) and adapter banks: per slot, one
// adapter's LoRA on every linear and on the routed experts of each layer, for forwards that
// mix adapters in one batch (forward.c's route, decode.c's spans). Not here: loading adapter
// files into a bank (adapters/), choosing slots (infer/engine/).
#include "mdl_internal.h"

#include <math.h>
#include <string.h>

#define LINS_PER_LAYER 13

int mdl_lin_count(const mdl_model *m) {
    return m->cfg.num_hidden_layers * LINS_PER_LAYER + 1;
}

mdl_lin *mdl_lin_at(mdl_model *m, int id) {
    if (id < 0 || id >= mdl_lin_count(m) || !m->layers)
        return NULL;
    if (id == m->cfg.num_hidden_layers * LINS_PER_LAYER)
        return &m->lm_head;
    mdl_layer *y = &m->layers[id / LINS_PER_LAYER];
    mdl_lin *lins[LINS_PER_LAYER] = {&y->q_a,         &y->q_b,        &y->q,
                                     &y->kv_a,        &y->kv_b,       &y->o,
                                     &y->dense.gate,  &y->dense.up,   &y->dense.down,
                                     &y->router,      &y->shared.gate, &y->shared.up,
                                     &y->shared.down};
    return lins[id % LINS_PER_LAYER];
}

void mdl_lin_number(mdl_model *m) {
    for (int id = 0; id < mdl_lin_count(m); id++)
        mdl_lin_at(m, id)->id = id;
}

molt_status mdl_bank_init(mdl_bank *b, const mdl_model *m, int n_slots) {
    memset(b, 0, sizeof *b);
    if (n_slots < 1)
        return molt_err(MOLT_EARG, "adapter bank: %d slots, expected at least 1", n_slots);
    b->n_slots = n_slots;
    b->n_lins = mdl_lin_count(m);
    b->n_layers = m->cfg.num_hidden_layers;
    b->lin = molt_calloc((size_t)b->n_lins * (size_t)n_slots, sizeof *b->lin);
    b->experts = molt_calloc((size_t)b->n_layers * (size_t)n_slots, sizeof *b->experts);
    b->lin_users = molt_calloc((size_t)b->n_lins, sizeof *b->lin_users);
    b->expert_users = molt_calloc((size_t)b->n_layers + 1, sizeof *b->expert_users);
    if (!b->lin || !b->experts || !b->lin_users || !b->expert_users) {
        mdl_bank_free(b);
        return molt_err(MOLT_ENOMEM, "adapter bank: out of memory for %d slots", n_slots);
    }
    return MOLT_OK;
}

void mdl_bank_free(mdl_bank *b) {
    molt_free(b->lin);
    molt_free(b->experts);
    molt_free(b->lin_users);
    molt_free(b->expert_users);
    memset(b, 0, sizeof *b);
}

static bool slot_ok(const mdl_bank *b, int s) { return s >= 0 && s < b->n_slots; }

void mdl_bank_clear(mdl_bank *b, int s) {
    if (!slot_ok(b, s))
        return;
    for (int id = 0; id < b->n_lins; id++) {
        ag_lora_ab *e = &b->lin[(size_t)id * b->n_slots + s];
        if (e->a)
            b->lin_users[id]--;
        *e = (ag_lora_ab){0};
    }
    for (int l = 0; l < b->n_layers; l++) {
        ag_expert_lora *e = &b->experts[(size_t)l * b->n_slots + s];
        if (e->a_gate_up || e->a_down)
            b->expert_users[l]--;
        *e = (ag_expert_lora){0};
    }
}

bool mdl_bank_used(const mdl_bank *b, int s) {
    if (!slot_ok(b, s))
        return false;
    for (int id = 0; id < b->n_lins; id++)
        if (b->lin[(size_t)id * b->n_slots + s].a)
            return true;
    for (int l = 0; l < b->n_layers; l++)
        if (b->experts[(size_t)l * b->n_slots + s].a_gate_up ||
            b->experts[(size_t)l * b->n_slots + s].a_down)
            return true;
    return false;
}

// a [r, in] and b [out, r], both F32, for a base [out, in].
static bool pair_fits(const ag_tensor *a, const ag_tensor *b, int64_t out, int64_t in) {
    return a && b && a->dtype == AG_F32 && b->dtype == AG_F32 && a->ndim == 2 && b->ndim == 2 &&
           a->shape[1] == in && b->shape[0] == out && b->shape[1] == a->shape[0] &&
           a->shape[0] >= 1;
}

molt_status mdl_bank_set_lin(mdl_bank *b, const mdl_model *m, int s, int id, ag_tensor *a,
                             ag_tensor *bb, double scale) {
    if (!slot_ok(b, s) || id < 0 || id >= b->n_lins || b->n_lins != mdl_lin_count(m))
        return molt_err(MOLT_EARG, "adapter bank: slot %d / linear %d out of range (%d slots, "
                        "%d linears)", s, id, b->n_slots, b->n_lins);
    const mdl_lin *lin = mdl_lin_at((mdl_model *)m, id);
    if (!lin->w)
        return molt_err(MOLT_EARG, "adapter bank: linear %d is absent in this model", id);
    int64_t out = lin->w->shape[0], in = lin->w->shape[1];
    char ba[80], bb2[80];
    if (!pair_fits(a, bb, out, in))
        return molt_err(MOLT_EARG, "adapter bank: LoRA A %s and B %s do not fit linear %d "
                        "[%lld, %lld] (expected F32 [r, %lld] and [%lld, r])", a ?
                        ag_shape_str(a, ba, sizeof ba) : "NULL", bb ?
                        ag_shape_str(bb, bb2, sizeof bb2) : "NULL", id, (long long)out,
                        (long long)in, (long long)in, (long long)out);
    if (!isfinite(scale))
        return molt_err(MOLT_EARG, "adapter bank: scale %g is not finite", scale);
    ag_lora_ab *e = &b->lin[(size_t)id * b->n_slots + s];
    if (!e->a)
        b->lin_users[id]++;
    *e = (ag_lora_ab){a, bb, scale};
    return MOLT_OK;
}

molt_status mdl_bank_set_experts(mdl_bank *b, const mdl_model *m, int s, int l,
                                 const ag_expert_lora *el) {
    if (!slot_ok(b, s) || l < 0 || l >= b->n_layers)
        return molt_err(MOLT_EARG, "adapter bank: slot %d / layer %d out of range", s, l);
    const mdl_layer *y = &m->layers[l];
    if (!y->moe)
        return molt_err(MOLT_EARG, "adapter bank: layer %d has no routed experts", l);
    // a model holding some experts only (expert parallelism) takes their part of the LoRA
    int64_t E = m->ep.count > 0 ? m->ep.count : m->cfg.n_routed_experts,
            I = m->cfg.moe_intermediate_size, H = m->cfg.hidden_size, rE = (int64_t)el->r * E;
    bool ok = el->r >= 1 && isfinite(el->scale);
    if (el->a_gate_up)
        ok = ok && pair_fits(el->a_gate_up, el->b_gate_up, 2 * I, H) &&
             el->a_gate_up->shape[0] == rE;
    if (el->a_down)
        ok = ok && pair_fits(el->a_down, el->b_down, H, I) && el->a_down->shape[0] == rE;
    if (!ok)
        return molt_err(MOLT_EARG, "adapter bank: routed-expert LoRA of layer %d does not fit "
                        "(rank %d, %lld experts, H %lld, I %lld)", l, el->r, (long long)E,
                        (long long)H, (long long)I);
    ag_expert_lora *e = &b->experts[(size_t)l * b->n_slots + s];
    bool had = e->a_gate_up || e->a_down, has = el->a_gate_up || el->a_down;
    b->expert_users[l] += (int)has - (int)had;
    *e = *el;
    return MOLT_OK;
}
