// tests/fuzz/fuzz_model_config.c: libFuzzer target for config.json parsing (mcfg_parse).
// A parse either fails with a message naming the input or yields a config whose values
// passed the consistency checks. Built only with MOLT_FUZZ=ON (clang).
#include "model/model.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    mcfg c;
    if (mcfg_parse((const char *)data, size, "fuzz", &c) != MOLT_OK) {
        MOLT_ASSERT(strncmp(molt_err_msg(), "fuzz: ", 6) == 0);
        return 0;
    }
    MOLT_ASSERT(c.num_experts_per_tok <= c.n_routed_experts);
    MOLT_ASSERT(c.n_routed_experts % c.n_group == 0);
    MOLT_ASSERT(c.qk_rope_head_dim % 2 == 0);
    ag_rope_config rc;
    mcfg_rope_config(&c, &rc);
    return 0;
}
