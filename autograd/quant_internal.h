// autograd/quant_internal.h: what quant.c shares with the quantized ops (ops_qlinear.c) and
// their benchmark (bench_quant.c) inside autograd/. Not part of the public API.
#ifndef MOLT_AUTOGRAD_QUANT_INTERNAL_H
#define MOLT_AUTOGRAD_QUANT_INTERNAL_H

#include "internal.h"
#include "cpu/kernels.h"

// Fills the kernels' view of q (tables included). q must have passed a check.
void ag_qweight_view(kq_weight *v, const ag_qweight *q);
// The checks every op runs on a qweight operand, cheap next to the op itself: format, shape
// fields, storage pointers and finite scales (not the FP8 codes: ag_qweight_check scans
// those once). Messages start with "<op>: <what> ...".
molt_status ag_qweight_check_operand(const char *op, const char *what, const ag_qweight *q);
// Routed-expert stacks for x [T, H]: gate_up [E, 2I, H] and down [E, H, I] qweights; the
// message names op and both shapes.
molt_status ag_check_expert_qweights(const char *op, const ag_tensor *x, const ag_qweight *gu,
                                     const ag_qweight *down);
// "[E, out, in] nf4+dq" style description for messages; returns buf.
const char *ag_qweight_str(const ag_qweight *q, char *buf, size_t cap);

// The float32 sum of x in the order torch's CPU reduction kernel adds a contiguous float32
// tensor on one thread with 8-lane vectors (exposed for tests).
float ag_torch_style_sum_f32(const float *x, int64_t n);
// bitsandbytes' signed 8-bit dynamic map (256 increasing values, exposed for tests).
const float *ag_dynamic_map(void);

#endif
