// tests/harness/moe_lora_cases.c: see moe_lora_cases.h.
#include "moe_lora_cases.h"
#include "harness.h"

const lcase moe_lora_cases[N_CASES] = {
    {5, 4, 2, 5, 3, 2, 1.5, true, true},
    {6, 3, 2, 4, 2, 1, 0.75, true, true},
    {4, 5, 3, 3, 4, 3, 2.0, true, true},
    {5, 4, 2, 6, 3, 2, 1.25, true, false},
    {5, 4, 2, 5, 3, 2, 1.25, false, true},
};

int64_t moe_lora_numel(const lcase *d) {
    int64_t rE = d->r * d->E;
    return (d->gu ? rE * d->H + 2 * d->I * rE : 0) + (d->down ? rE * d->I + d->H * rE : 0);
}

void moe_lora_fill_idx(ag_tensor *idx, int64_t E, bool repeat) {
    int64_t T = idx->shape[0], k = idx->shape[1];
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < k; j++)
            ag_set(idx, t * k + j, (double)((t + 2 * j + t / 3) % (E - 1)));
    if (repeat && T > 1)
        for (int64_t j = 0; j < k; j++)
            ag_set(idx, k + j, 0.0);
}

void moe_lora_routing(ag_arena *a, ag_rng *r, const lcase *d, bool repeat, ag_tensor **in) {
    in[IN_X] = gc_rand(a, r, 2, (int64_t[]){d->T, d->H}, -1, 1, true);
    in[IN_W] = gc_rand(a, r, 2, (int64_t[]){d->T, d->k}, 0.2, 1.2, true);
    in[IN_IDX] = ag_tensor_new2(a, AG_I32, d->T, d->k);
    moe_lora_fill_idx(in[IN_IDX], d->E, repeat);
}

void moe_lora_adapters(ag_arena *a, ag_rng *r, const lcase *d, ag_tensor **in) {
    int64_t rE = d->r * d->E;
    in[IN_AGU] = d->gu ? gc_rand(a, r, 2, (int64_t[]){rE, d->H}, -0.7, 0.7, true) : NULL;
    in[IN_BGU] = d->gu ? gc_rand(a, r, 2, (int64_t[]){2 * d->I, rE}, -0.7, 0.7, true) : NULL;
    in[IN_AD] = d->down ? gc_rand(a, r, 2, (int64_t[]){rE, d->I}, -0.7, 0.7, true) : NULL;
    in[IN_BD] = d->down ? gc_rand(a, r, 2, (int64_t[]){d->H, rE}, -0.7, 0.7, true) : NULL;
}
