// tests/harness/device_graph.h: a small training graph that touches every op with a
// kernel on the CUDA backend (embedding, RMSNorm, linear, SwiGLU, add, reshape, RoPE, the
// MoE router, routed experts with LoRA, scale, the fused loss with a low-rank term), built
// from a fixed set of inputs on whichever device they live on. The device-model tests run
// it on a stand-in device and on the GPU and compare with the CPU.
#ifndef MOLT_TEST_DEVICE_GRAPH_H
#define MOLT_TEST_DEVICE_GRAPH_H

#include "autograd/autograd.h"

// Every tensor of the graph's inputs (their order is the struct's).
typedef struct {
    ag_tensor *table, *norm, *wg, *wu, *wd, *router, *gu, *down, *agu, *bgu, *ad, *bd, *head,
        *a2, *b2, *ids, *pos, *targets, *mask;
} dg_inputs;
#define DG_N_INPUTS ((int)(sizeof(dg_inputs) / sizeof(ag_tensor *)))
#define DG_N_TRAINED 11 // inputs that require grad

// Random f32 inputs in host arena a (ids, positions, targets and the mask fixed).
void dg_fill(dg_inputs *g, ag_arena *a, ag_rng *r);
// Each input copied into arena a (its device), keeping requires_grad; MOLT_OK or the error.
molt_status dg_copy(dg_inputs *out, const dg_inputs *in, ag_arena *a);
// The loss [1] of the graph, or NULL with the error message.
ag_tensor *dg_build(ag_ctx *c, const dg_inputs *g);

#endif
