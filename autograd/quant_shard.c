// autograd/quant_shard.c: NF4 weights of a shard of an expert stack. Double quantization
// works on the absmax of the whole stack (their mean is the offset, groups of 256 blocks
// share a scale), so a rank holding some experts must store what the whole stack's
// quantization stores for its blocks, or its weights would differ from one process's. Not
// here: the quantization itself (quant.c), which rank holds which experts (model/).
#include "quant_internal.h"

#include <string.h>

molt_status ag_qweight_nf4_restate(ag_qweight *q, const ag_nf4_dq_state *st,
                                   int64_t first_block) {
    const char *op = "qweight_nf4_restate";
    if (!q || !st || !st->codes || !st->scales)
        return molt_err(MOLT_EARG, "%s: NULL argument", op);
    if (q->format != AG_Q_NF4 || q->nf4_double_quant)
        return molt_err(MOLT_EARG, "%s: q must be NF4 with plain absmax", op);
    if (first_block < 0 || first_block + q->n_blocks > st->n_blocks)
        return molt_err(MOLT_EARG, "%s: blocks [%lld, %lld) outside the stack's %lld", op,
                        (long long)first_block, (long long)(first_block + q->n_blocks),
                        (long long)st->n_blocks);
    int64_t g0 = first_block / AG_NF4_DQ_BLOCK;
    bool aligned = first_block % AG_NF4_DQ_BLOCK == 0 &&
                   (q->n_blocks % AG_NF4_DQ_BLOCK == 0 ||
                    first_block + q->n_blocks == st->n_blocks);
    if (!aligned) {
        // the values the stack's state decodes to, kept plain (as the kernels decode them)
        const float *dyn = ag_dynamic_map();
        for (int64_t b = 0; b < q->n_blocks; b++) {
            int64_t s = first_block + b;
            float m = dyn[st->codes[s]] * st->scales[s / AG_NF4_DQ_BLOCK];
            q->scale[b] = m + st->offset;
        }
        return MOLT_OK;
    }
    ag_qopts o = ag_qopts_default();
    o.nf4_double_quant = true;
    ag_qweight d;
    MOLT_TRY(ag_qweight_alloc(&d, AG_Q_NF4, q->ndim, q->shape, &o));
    memcpy(d.data, q->data, (size_t)(q->numel + 1) / 2);
    memcpy(d.absmax_q, st->codes + first_block, (size_t)q->n_blocks);
    memcpy(d.absmax_scale, st->scales + g0, (size_t)d.n_blocks2 * sizeof(float));
    d.absmax_offset = st->offset;
    ag_qweight_free(q);
    *q = d;
    return MOLT_OK;
}
