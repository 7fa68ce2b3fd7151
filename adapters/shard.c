// adapters/shard.c: routed-expert units of a model that holds some experts only (expert
// parallelism, mdl_experts_shard). Such a unit keeps its experts' part of PEFT's layout:
// A [r*count, in] is rows first*r .. (first+count)*r - 1 of the full A [r*E, in]; B
// [out, r*count] has in column k*count + e the full B's column k*E + first + e. Files,
// checkpoints and initialization deal in full matrices; these functions cut and join. Not
// here: the collectives that bring the shards together (train/).
#include "internal.h"

#include <string.h>

static bool sharded(const lora_adapter *ad, const lora_unit *u) {
    return u->group == LORA_GROUP_EXPERTS && ad->model && ad->model->ep.comm &&
           ad->model->ep.count != ad->model->cfg.n_routed_experts;
}

void lora_unit_full_shape(const lora_adapter *ad, const lora_unit *u, bool b, int64_t shape[2]) {
    const ag_tensor *t = b ? u->b : u->a;
    shape[0] = t->shape[0];
    shape[1] = t->shape[1];
    if (!sharded(ad, u))
        return;
    int64_t E = ad->model->cfg.n_routed_experts;
    if (b)
        shape[1] = (int64_t)u->r * E;
    else
        shape[0] = (int64_t)u->r * E;
}

bool lora_unit_is_shard(const lora_adapter *ad, const lora_unit *u) { return sharded(ad, u); }

// Column k*count + e of the shard <-> column k*E + first + e of the full B.
static int64_t full_col(const lora_adapter *ad, const lora_unit *u, int64_t c) {
    int64_t n = ad->model->ep.count, E = ad->model->cfg.n_routed_experts;
    return (c / n) * E + ad->model->ep.first + c % n;
}

void lora_shard_from_full(const lora_adapter *ad, const lora_unit *u, bool b, const float *full,
                          float *shard) {
    const ag_tensor *t = b ? u->b : u->a;
    if (!sharded(ad, u)) {
        memcpy(shard, full, (size_t)t->numel * sizeof *shard);
        return;
    }
    int64_t rows = t->shape[0], cols = t->shape[1], E = ad->model->cfg.n_routed_experts;
    if (!b) {
        memcpy(shard, full + (int64_t)ad->model->ep.first * u->r * cols,
               (size_t)t->numel * sizeof *shard);
        return;
    }
    int64_t fcols = (int64_t)u->r * E;
    for (int64_t o = 0; o < rows; o++)
        for (int64_t c = 0; c < cols; c++)
            shard[o * cols + c] = full[o * fcols + full_col(ad, u, c)];
}

void lora_full_from_shards(const lora_adapter *ad, const lora_unit *u, bool b,
                           const float *shards, float *full) {
    const ag_tensor *t = b ? u->b : u->a;
    if (!sharded(ad, u)) {
        memcpy(full, shards, (size_t)t->numel * sizeof *full);
        return;
    }
    int64_t n = ad->model->ep.count, E = ad->model->cfg.n_routed_experts, P = E / n;
    if (!b) { // the shards in rank order are the full A's rows in order
        memcpy(full, shards, (size_t)(t->numel * P) * sizeof *full);
        return;
    }
    int64_t rows = t->shape[0], cols = t->shape[1], fcols = (int64_t)u->r * E;
    for (int64_t p = 0; p < P; p++)
        for (int64_t o = 0; o < rows; o++)
            for (int64_t c = 0; c < cols; c++)
                full[o * fcols + (c / n) * E + p * n + c % n] =
                    shards[p * t->numel + o * cols + c];
}
