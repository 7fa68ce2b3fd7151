// tests/harness/moe_lora_cases.h: what the tests of the routed-expert LoRA ops share
// (test_ops_moe_lora.c: dense stacks; test_ops_moe_lora_q.c: quantized ones): the operand
// slots, the case sizes, the routing pattern and the random routing and adapter inputs.
// Each test makes its own expert stacks between the two input helpers, so the random
// draws keep their order.
#ifndef MOLT_TEST_MOE_LORA_CASES_H
#define MOLT_TEST_MOE_LORA_CASES_H

#include "autograd/autograd.h"

#include <stdbool.h>

// Operand slots: x, routing weights, idx, the two expert stacks, then A/B of gate_up and of
// down.
enum { IN_X, IN_W, IN_IDX, IN_GU, IN_D, IN_AGU, IN_BGU, IN_AD, IN_BD, N_IN };

typedef struct {
    int64_t T, E, k, H, I;
    int r;
    double s;
    bool gu, down; // which stacks carry an adapter
} lcase;

// The small cases every test loops over (a single expert choice, k = 3, each stack alone).
extern const lcase moe_lora_cases[];
#define N_CASES 5

// Elements of the LoRA matrices of a case.
int64_t moe_lora_numel(const lcase *d);
// Expert e of slot (t, j): a spread pattern that never uses expert E-1 (an expert with no
// tokens); when `repeat`, row 1 picks the same expert for all its k choices.
void moe_lora_fill_idx(ag_tensor *idx, int64_t E, bool repeat);
// F64 x [T, H] and routing weights [T, k] requiring grad, and idx by moe_lora_fill_idx.
void moe_lora_routing(ag_arena *a, ag_rng *r, const lcase *d, bool repeat, ag_tensor **in);
// F64 LoRA matrices requiring grad (NULL for a stack without an adapter).
void moe_lora_adapters(ag_arena *a, ag_rng *r, const lcase *d, ag_tensor **in);

#endif
