// model/mdl_quant.h: what the quantized-model files (quant_model.c, quant_io.c, cli_quant.c)
// share: module groups of weight-list entries, binding qweights into the model and the
// pre-quantized checkpoint reader. Not a public API (model.h has that).
#ifndef MOLT_MODEL_QUANT_H
#define MOLT_MODEL_QUANT_H

#include "mdl_internal.h"

// The module group of a weight-list entry, or -1 for embeddings and norms (never quantized).
int mdl_q_group(const w_entry *e);
// Points the mdl_lin (or the layer's expert slot) whose base tensor is t at q.
bool mdl_q_bind(mdl_model *m, const ag_tensor *t, const ag_qweight *q);
// The qweight standing for base tensor t, or NULL when t is a plain F32 tensor.
const ag_qweight *mdl_q_of(const mdl_model *m, const ag_tensor *t);
// Reads entry e of a pre-quantized checkpoint into q. *found is false when the file holds
// e as a plain F32 tensor (the caller loads it); MOLT_EFORMAT names tensor and field.
molt_status mdl_q_read(mdl_loader *ld, const w_entry *e, ag_qweight *q, bool *found);

#define MDL_QUANT_META "molt_quant" // metadata key marking a pre-quantized checkpoint

#endif
