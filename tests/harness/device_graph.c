// tests/harness/device_graph.c: see device_graph.h.
#include "device_graph.h"

#define T 6
#define C 8
#define V 11
#define F 12
#define E 4
#define I 5
#define R 2
#define R2 3

static ag_rope_table rope_tb;
static bool rope_ready;

void dg_fill(dg_inputs *g, ag_arena *a, ag_rng *r) {
    struct {
        ag_tensor **t;
        int64_t d0, d1, d2;
        bool grad;
    } spec[] = {
        {&g->table, V, C, 0, true},       {&g->norm, C, 0, 0, true},
        {&g->wg, F, C, 0, true},          {&g->wu, F, C, 0, false},
        {&g->wd, C, F, 0, true},          {&g->router, E, C, 0, true},
        {&g->gu, E, 2 * I, C, false},     {&g->down, E, C, I, false},
        {&g->agu, R * E, C, 0, true},     {&g->bgu, 2 * I, R * E, 0, true},
        {&g->ad, R * E, I, 0, true},      {&g->bd, C, R * E, 0, true},
        {&g->head, V, C, 0, false},       {&g->a2, R2, C, 0, true},
        {&g->b2, V, R2, 0, true},
    };
    for (size_t i = 0; i < sizeof spec / sizeof spec[0]; i++) {
        int64_t sh[3] = {spec[i].d0, spec[i].d1, spec[i].d2};
        int nd = spec[i].d2 ? 3 : spec[i].d1 ? 2 : 1;
        *spec[i].t = ag_tensor_new(a, AG_F32, nd, sh);
        ag_fill_uniform(*spec[i].t, r, -0.5, 0.5);
        (*spec[i].t)->requires_grad = spec[i].grad;
    }
    g->ids = ag_tensor_new1(a, AG_I32, T);
    g->pos = ag_tensor_new1(a, AG_I32, T);
    g->targets = ag_tensor_new1(a, AG_I32, T);
    g->mask = ag_tensor_new1(a, AG_F32, T);
    for (int t = 0; t < T; t++) {
        ag_set(g->ids, t, (t * 7) % V);
        ag_set(g->pos, t, t + 3);
        ag_set(g->targets, t, (t * 5 + 1) % V);
        ag_set(g->mask, t, t == 2 ? 0.0 : 1.0);
    }
}

molt_status dg_copy(dg_inputs *out, const dg_inputs *in, ag_arena *a) {
    ag_tensor *const *src = (ag_tensor *const *)in;
    ag_tensor **dst = (ag_tensor **)out;
    for (int i = 0; i < DG_N_INPUTS; i++) {
        if (!(dst[i] = ag_tensor_to(a, src[i])))
            return MOLT_EDEVICE;
        dst[i]->requires_grad = src[i]->requires_grad;
    }
    return MOLT_OK;
}

ag_tensor *dg_build(ag_ctx *c, const dg_inputs *g) {
    if (!rope_ready) {
        ag_rope_config rcfg = {.theta = 10000, .rot_dim = 4};
        if (ag_rope_table_init(&rope_tb, &rcfg) != MOLT_OK)
            return NULL;
        rope_ready = true;
    }
    ag_tensor *e = ag_embedding(c, g->table, g->ids);
    ag_tensor *h = ag_rmsnorm(c, e, g->norm, 1e-6);
    ag_tensor *m = ag_swiglu(c, ag_linear(c, h, g->wg), ag_linear(c, h, g->wu));
    ag_tensor *rs = ag_add(c, e, ag_linear(c, m, g->wd));
    ag_tensor *q = ag_rope(c, ag_reshape(c, rs, 3, (int64_t[]){T, 2, C / 2}), g->pos, &rope_tb, 0);
    ag_tensor *x = ag_reshape(c, q, 2, (int64_t[]){T, C});
    ag_router_config rc = {.top_k = 2, .n_group = 1, .topk_group = 1, .norm_topk_prob = true,
                           .scaling = 1.0};
    ag_tensor *idx = NULL, *rw = ag_moe_router(c, ag_linear(c, x, g->router), &rc, &idx);
    ag_expert_lora l = {g->agu, g->bgu, g->ad, g->bd, R, 0.5, NULL, NULL};
    ag_tensor *y = ag_moe_experts_lora(c, x, rw, idx, g->gu, g->down, &l);
    ag_tensor *z = ag_scale(c, ag_add(c, x, y), 0.5);
    ag_tensor *h2 = ag_linear(c, z, g->a2); // a LoRA on the output projection
    return ag_cross_entropy_linear2(c, z, g->head, h2, g->b2, g->targets, g->mask, 5);
}
