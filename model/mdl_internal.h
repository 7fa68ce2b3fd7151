// model/mdl_internal.h: what the model's source files share and nobody else sees: the one
// list of every weight with its HF and Mistral names, used by the loader (weights.c), the
// writer (save.c) and random initialization (init_model.c), so all three agree on names,
// shapes and order. Not a public API: include model.h from outside model/.
#ifndef MOLT_MODEL_INTERNAL_H
#define MOLT_MODEL_INTERNAL_H

#include "model.h"

typedef enum {
    W_EMBED,   // embed_tokens [V, H]
    W_HEAD,    // lm_head [V, H] (HF name without the model prefix)
    W_NORM,    // RMSNorm weights [n]
    W_LINEAR,  // projection [out, in]
    W_ROUTER,  // mlp.gate [E, H]
    W_GATE_UP, // experts [E, 2I, H]
    W_DOWN,    // experts [E, H, I]
} w_kind;

typedef struct {
    ag_tensor *t;        // the model's tensor (shape is the expected shape)
    w_kind kind;
    int layer;           // -1 for embed_tokens, norm, lm_head
    const char *hf;      // HF name after "<prefix>layers.N." or "<prefix>"
    const char *mistral; // Mistral consolidated name after "layers.N." (or whole)
} w_entry;

// Every weight of m in a fixed order (embeddings, layers 0..L-1 field by field, final
// norm, lm_head; absent modules skipped; a tied lm_head skipped). Returns the count; writes
// at most cap entries (out may be NULL to count).
int mdl_weight_list(const mdl_model *m, w_entry *out, int cap);

// Full tensor name of entry e in a layout. For experts in the per-expert layouts, `expert`
// and `part` (0 gate/w1, 1 up/w3 for W_GATE_UP; 0 for W_DOWN) select one matrix; otherwise
// they are ignored. `wrapped` selects the model.language_model. prefix (HF layouts).
void mdl_weight_name(const w_entry *e, mdl_layout layout, bool wrapped, int expert, int part,
                     char *buf, size_t cap);

// Loading tensor by tensor (weights.c), for loaders that place some weights themselves
// (quantized ones): an open checkpoint, the layout detected from its names and the record
// of which file tensors were consumed.
typedef struct mdl_loader mdl_loader;
molt_status mdl_loader_new(const st_reader *r, mdl_loader **out);
void mdl_loader_free(mdl_loader *ld);
// Loads entry e (F32 data at e->t->data) by the mdl_load rules, marking its tensors used.
molt_status mdl_loader_entry(mdl_loader *ld, const w_entry *e);
// The file tensor `name`, marked used; NULL when absent.
const st_tensor *mdl_loader_take(mdl_loader *ld, const char *name);
// After mdl_loader_entry(e): when e's file tensors are F8_E4M3, copies their codes into
// codes[numel] and each row's scale into row_scale[n_mat * out] and sets *is_fp8.
molt_status mdl_loader_fp8(mdl_loader *ld, const w_entry *e, uint8_t *codes, float *row_scale,
                           bool *is_fp8);
// Tied lm_head copy, the unused-tensor check, m->layout and m->wrapped.
molt_status mdl_loader_finish(mdl_loader *ld, mdl_model *m);
const char *mdl_loader_label(const mdl_loader *ld);
mdl_layout mdl_loader_layout(const mdl_loader *ld);
bool mdl_loader_wrapped(const mdl_loader *ld);
// Opens dir's weights (sharded index, model.safetensors or consolidated.safetensors).
molt_status mdl_open_weights(const char *dir, st_reader **r);
// mdl_create with shapes_only: projections, router, experts and an untied lm_head get
// shape-only tensors (data NULL) for the caller to fill or replace by qweights. experts: the
// expert group to shard the routed experts over (NULL: every expert; see mdl_experts_range).
molt_status mdl_create_ex(mdl_model *m, const mcfg *cfg, bool shapes_only, ag_comm *experts);
// The loader reads only the shard's experts of each stack (sh NULL or unsharded: all).
void mdl_loader_experts(mdl_loader *ld, const mdl_experts_shard *sh, int64_t n_experts);
// For a stack of `held` experts: how many the file holds and the first one the model holds.
void mdl_loader_expert_span(const mdl_loader *ld, int64_t held, int64_t *n_file,
                            int64_t *first);

// Sets every mdl_lin's id (mdl_lin_at order); mdl_create_ex calls it.
void mdl_lin_number(mdl_model *m);

// The model's steps with a route: which adapter slot of a bank each row of the activations
// uses (bank NULL or route NULL: the single-adapter path, the mdl_lin LoRA fields). forward.c's
// public functions are these with a NULL route; decode.c's batched forward passes one.
typedef struct {
    const mdl_bank *bank;
    ag_tensor *slot;   // I32 [rows] slot per row, -1 = base alone
    const uint8_t *bx; // [rows] or NULL: rows whose quantized products are the bf16 pairs
                       // (ag_linear_q_rows; the batched forward's prompt rows)
} mdl_route;
ag_tensor *mdl_linear_r(ag_ctx *c, ag_tensor *x, const mdl_lin *lin, const mdl_route *r);
ag_tensor *mdl_attn_query_r(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, ag_tensor *pos,
                            const mdl_route *r);
molt_status mdl_attn_latent_r(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x,
                              ag_tensor *pos, const mdl_route *r, ag_tensor **latent,
                              ag_tensor **k_rot);
molt_status mdl_attn_expand_r(ag_ctx *c, const mdl_model *m, int l, ag_tensor *latent,
                              ag_tensor *k_rot, const mdl_route *r, ag_tensor **key,
                              ag_tensor **value);
ag_tensor *mdl_attn_out_r(ag_ctx *c, const mdl_model *m, int l, ag_tensor *att,
                          const mdl_route *r);
ag_tensor *mdl_ffn_r(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, const mdl_route *r);
// Layer l's routed experts over the expert group m->ep.comm: x [T, H] with router weights
// w [T, k] and global expert ids idx [T, k] -> [T, H]. x NULL: this rank has no tokens and
// only serves its experts to the others (like [1, H] gives the dtype and width; returns a
// placeholder). Collective over the expert group.
ag_tensor *mdl_experts_parallel(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, ag_tensor *w,
                                ag_tensor *idx, const mdl_route *r, ag_tensor *like);

// The HF per-tensor FP8 scale suffix and the Mistral one.
#define MDL_HF_SCALE "_scale_inv"    // appended to "<...>.weight" and fused expert names
#define MDL_MISTRAL_SCALE "qscale_weight"

#endif
