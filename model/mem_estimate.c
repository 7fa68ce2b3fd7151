// model/mem_estimate.c: how much memory one forward (and backward) over T tokens takes,
// estimated from the configuration before anything is allocated, so that a run asking for
// more than the machine has is refused with "out of memory" instead of being killed by the
// kernel half-way. The activation arena keeps every op's output until the step ends and
// backward adds a gradient of about the same size, so the estimate sums the outputs of one
// decoder layer per token (attention, MoE or dense MLP), with room for LoRA terms, times the
// layers (or, with activation checkpointing, one layer plus every layer's input), plus the
// chunked loss. tests/test_mem_estimate.c checks it against the arena's measured peak.
//
// Not here: the weights (their size is known from the files), the data pipeline.
#include "model.h"

// Floats per token of the outputs of one decoder layer's forward.
static double layer_floats(const mcfg *c, bool moe) {
    double H = c->hidden_size, NH = c->num_attention_heads, DN = c->qk_nope_head_dim;
    double DR = c->qk_rope_head_dim, DV = c->v_head_dim, RQ = c->q_lora_rank;
    double RKV = c->kv_lora_rank, E = c->n_routed_experts, K = c->num_experts_per_tok;
    double I = c->moe_intermediate_size, IS = I * c->n_shared_experts;
    double IM = c->intermediate_size;
    double attn = 3 * H + 2 * RQ + 3 * (RKV + DR) + 6 * NH * (DN + DR) + 3 * NH * (DN + DV) +
                  2 * NH * DV;
    double mlp = moe ? 5 * H + 2 * E + K * (3 * H + 3 * I) + 3 * IS : 3 * H + 3 * IM;
    return attn + mlp;
}

uint64_t mdl_step_memory_bytes(const mcfg *c, int64_t T, bool train, bool checkpointing) {
    double per_layer_max = 0, all_layers = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        double f = layer_floats(c, l >= c->first_k_dense_replace);
        all_layers += f;
        per_layer_max = f > per_layer_max ? f : per_layer_max;
    }
    // LoRA terms on adapted projections (their rank-sized inputs and out-sized sums)
    const double lora = 1.5;
    double per_token;
    if (!train)
        per_token = lora * all_layers;
    else if (checkpointing) // layer inputs kept, one layer recomputed with its gradients
        per_token = c->num_hidden_layers * 2.0 * c->hidden_size + 2 * lora * per_layer_max;
    else // outputs and their gradients
        per_token = 2 * lora * all_layers;
    // embedding, final norm, the loss's saved gradient to the hidden states, and gradients
    per_token += 6.0 * c->hidden_size;
    double bytes = 4.0 * per_token * (double)T;
    return bytes > 1.8e19 ? UINT64_MAX : (uint64_t)bytes;
}
