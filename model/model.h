// model/model.h: the public API of molt's model module: reading and writing safetensors
// checkpoints (`st_`) and the Mistral Small 4 configuration (`mcfg_`).
//
// A safetensors reader memory-maps its files, validates every header entry against the
// file before any tensor is handed out, and exposes the tensors by name. The model proper
// (`mdl_`) builds on both: weights by HF or Mistral names (model/weights.c, model/save.c),
// the Mistral 4 forward pass on autograd ops (model/forward.c), random initialization
// (model/init_model.c), the `molt init-model` / `molt forward` commands (model/cli.c) and,
// at the end, the paged MLA latent KV cache with the cached forward used for decoding
// (model/kvcache.c, model/decode.c). Not here: the quantized formats themselves
// (autograd), LoRA adapters themselves, sampling.
#ifndef MOLT_MODEL_H
#define MOLT_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../autograd/autograd.h"
#include "../common/err.h"

// ---------------------------------------------------------------------------------------
// safetensors

typedef enum {
    ST_BOOL,
    ST_U8,
    ST_I8,
    ST_I16,
    ST_U16,
    ST_F16,
    ST_BF16,
    ST_I32,
    ST_U32,
    ST_F32,
    ST_F64,
    ST_I64,
    ST_U64,
    ST_F8_E4M3,
    ST_F8_E5M2,
    ST_DTYPE_COUNT
} st_dtype;

const char *st_dtype_name(st_dtype dt); // the header spelling ("BF16"); "?" when out of range
size_t st_dtype_size(st_dtype dt);      // bytes per element; 0 when out of range

#define ST_MAX_DIMS 8 // more dims than any checkpoint uses; more is a format error
#define ST_MAX_HEADER (100u * 1000u * 1000u) // header cap, as in the reference implementation

// One tensor of a checkpoint. In a reader, `data` points into the read-only mapping and
// stays valid until st_close(); for st_write() the caller fills name/dtype/ndim/shape/data.
typedef struct {
    const char *name;
    st_dtype dtype;
    int ndim;                   // 0 for a scalar
    int64_t shape[ST_MAX_DIMS]; // [ndim]
    int64_t numel;              // prod(shape); 1 for a scalar (reader fills it)
    const void *data;           // [nbytes], little-endian, row-major, maybe unaligned
    size_t nbytes;              // numel * st_dtype_size(dtype) (reader fills it)
    int shard;                  // which file of a sharded checkpoint holds it (reader)
} st_tensor;

// A validated set of tensors from one file or from all shards of an index, sorted by name.
typedef struct st_reader st_reader;

// Opens and validates one .safetensors file. On failure *out is NULL and the status is
// MOLT_EIO (cannot read) or MOLT_EFORMAT (message names the file and the tensor).
molt_status st_open(const char *path, st_reader **out);
// Same checks on a buffer the caller keeps alive until st_close(); `label` names it in
// messages. Never reads outside buf[0, len).
molt_status st_open_memory(const void *buf, size_t len, const char *label, st_reader **out);
// Opens a sharded checkpoint: `path` is model.safetensors.index.json or a directory holding
// it. Each shard is opened once; every weight_map entry must exist in its shard and every
// shard tensor must be listed, otherwise MOLT_EFORMAT naming the tensors.
molt_status st_open_index(const char *path, st_reader **out);
void st_close(st_reader *r); // NULL is fine

int st_count(const st_reader *r);
const st_tensor *st_at(const st_reader *r, int i);              // i in [0, st_count), name order
const st_tensor *st_find(const st_reader *r, const char *name); // NULL when absent
int st_shard_count(const st_reader *r);
const char *st_shard_path(const st_reader *r, int shard);
// Value of a __metadata__ key (first shard holding it), or NULL.
const char *st_metadata(const st_reader *r, const char *key);

// Decodes one element of a float dtype (F32/F64/F16/BF16/F8_E4M3/F8_E5M2) from its bytes.
double st_decode_f8_e4m3(uint8_t b); // OCP FP8 E4M3: bias 7, no infinities, 0x7f/0xff NaN
double st_decode_f8_e5m2(uint8_t b); // OCP FP8 E5M2: bias 15, IEEE-like inf/NaN
float st_decode_f16(uint16_t h);

// Converts a float tensor to a new F32 ag_tensor in arena a, multiplying every element by
// `scale` (1.0 for none; FP8 checkpoints pass their per-tensor scale). A scalar becomes
// shape [1]. MOLT_EUNSUPPORTED for integer dtypes, more than AG_MAX_DIMS dims or 0 elements.
molt_status st_to_f32(const st_tensor *t, double scale, ag_arena *a, ag_tensor **out);
// The single value of a one-element float tensor (a scale), as double.
molt_status st_read_scalar(const st_tensor *t, double *out);

typedef struct {
    const char *key, *value;
} st_meta;
// Writes a valid safetensors file holding tensors[0..n) in that order (offsets contiguous,
// header padded with spaces to a multiple of 8), through a temporary name beside path that
// is synced and renamed over it. Names must be unique. MOLT_EARG on bad tensors, MOLT_EIO
// with errno's text on write failure (path is then untouched).
molt_status st_write(const char *path, const st_tensor *tensors, int n, const st_meta *meta,
                     int n_meta);

// ---------------------------------------------------------------------------------------
// Mistral Small 4 configuration (config.json, model_type "mistral4", or a wrapper such as
// Mistral3's whose text_config has model_type "mistral4"). Absent fields take the defaults
// of transformers' Mistral4Config, because saved configs may omit values equal to them.

typedef struct {
    bool yarn;         // rope_type "yarn" (else "default")
    double rope_theta; // base
    double factor;     // YaRN context scaling factor
    double original_max_position_embeddings;
    double beta_fast, beta_slow;   // YaRN ramp bounds (rotations)
    double mscale, mscale_all_dim; // YaRN attention-factor terms (0 = not given)
    double llama_4_scaling_beta;   // position-dependent query scaling (0 = off)
} mcfg_rope;

#define MCFG_MAX_EOS 8

typedef struct {
    bool wrapped;              // read from a wrapper's text_config
    int hidden_size;           // H
    int num_hidden_layers;     // L
    int num_attention_heads;   // NH
    int num_key_value_heads;   // NKV (MLA: equals NH)
    int vocab_size;            // V
    int q_lora_rank;           // RQ; 0 when null (q_proj [NH*(DN+DR), H] instead)
    int kv_lora_rank;          // RKV
    int qk_nope_head_dim;      // DN
    int qk_rope_head_dim;      // DR (even)
    int v_head_dim;            // DV
    int n_routed_experts;      // E
    int n_shared_experts;      // shared experts (0 = none)
    int num_experts_per_tok;   // K, top-k
    int moe_intermediate_size; // I, per expert
    int intermediate_size;     // dense MLP width (layers < first_k_dense_replace)
    int first_k_dense_replace; // dense layers before the MoE layers
    int n_group, topk_group;   // grouped routing
    bool norm_topk_prob;       // renormalize the top-k weights
    double routed_scaling_factor;
    double rms_norm_eps;
    int64_t max_position_embeddings;
    bool rope_interleave; // rotary pairs are (2i, 2i+1)
    bool tie_word_embeddings;
    int pad_token_id, bos_token_id; // -1 when null
    int n_eos;                      // eos_token_id may be an int or a list
    int eos_token_ids[MCFG_MAX_EOS];
    mcfg_rope rope;
} mcfg;

// Parses config.json at `path`. MOLT_EIO when unreadable, MOLT_EFORMAT for bad JSON,
// unknown model_type, wrong JSON types, missing required fields or inconsistent values,
// MOLT_EUNSUPPORTED for valid settings molt cannot run; the message names path and field.
molt_status mcfg_load(const char *path, mcfg *cfg);
// Same from text in memory; `label` names it in messages.
molt_status mcfg_parse(const char *text, size_t len, const char *label, mcfg *cfg);
// The rotary-embedding settings of the attention layers.
void mcfg_rope_config(const mcfg *cfg, ag_rope_config *out);

// ---------------------------------------------------------------------------------------
// The Mistral 4 model (`mdl_`). Dimension names follow mcfg: H hidden, L layers, NH heads,
// RQ q_lora_rank, RKV kv_lora_rank, DN qk_nope_head_dim, DR qk_rope_head_dim,
// DQK = DN + DR, DV v_head_dim, E routed experts, I moe_intermediate_size,
// IS = I * n_shared_experts, IM intermediate_size (dense layers), V vocab.
// Every weight is a frozen F32 ag_tensor in the model's weights arena, whatever the file
// held (F32, F16, BF16, or F8_E4M3 times its per-tensor scale), except in a model loaded by
// mdl_load_quant: there a quantized projection keeps a shape-only tensor (data NULL) and
// its mdl_lin.qw (or the layer's gate_up_q/down_q) holds the weight.

// One linear map y = x W^T (+ LoRA). Every projection of the model goes through
// mdl_linear() with one of these, so adapters and quantized weights plug in at one place.
typedef struct {
    ag_tensor *w;      // [out, in] frozen base weight; NULL when the module is absent
    ag_tensor *lora_a; // [r, in] or NULL (no adapter)
    ag_tensor *lora_b; // [out, r] or NULL
    double lora_scale; // alpha / r (or alpha / sqrt(r) with rsLoRA)
    const ag_qweight *qw; // quantized base weight (model/quant_model.c) or NULL; when set,
                          // w is a shape-only tensor (data NULL) and qw is used instead
    double lora_dropout;  // dropout probability on the LoRA input x; used only in grad
                          // mode (training) and only when lora_rng is set, never at inference
    ag_rng *lora_rng;     // the adapter's dropout stream (owned by the adapter) or NULL
    int id;               // index of this linear in the model (mdl_lin_at), for adapter banks
    const ag_bxweight *bx; // w packed for AMX (mdl_pack_head) or NULL; when set, the base
                           // product is ag_linear_bx (w may then be shape-only)
} mdl_lin;

// SwiGLU MLP: down(silu(gate(x)) * up(x)). Dense layers (IM) and the shared expert (IS).
typedef struct {
    mdl_lin gate; // [IM or IS, H]
    mdl_lin up;   // [IM or IS, H]
    mdl_lin down; // [H, IM or IS]
} mdl_mlp;

typedef struct {
    bool moe;               // layer >= first_k_dense_replace: routed experts, else dense MLP
    ag_tensor *attn_norm;   // input_layernorm [H]
    mdl_lin q_a;            // q_a_proj [RQ, H] (w NULL when q_lora_rank is null)
    ag_tensor *q_a_norm;    // q_a_layernorm [RQ] (NULL when q_lora_rank is null)
    mdl_lin q_b;            // q_b_proj [NH*DQK, RQ] (w NULL when q_lora_rank is null)
    mdl_lin q;              // q_proj [NH*DQK, H] (w NULL unless q_lora_rank is null)
    mdl_lin kv_a;           // kv_a_proj_with_mqa [RKV + DR, H]
    ag_tensor *kv_a_norm;   // kv_a_layernorm [RKV]
    mdl_lin kv_b;           // kv_b_proj [NH*(DN+DV), RKV]; per head DN k_nope rows, DV v rows
    mdl_lin o;              // o_proj [H, NH*DV]
    ag_tensor *mlp_norm;    // post_attention_layernorm [H]
    mdl_mlp dense;          // dense layers only (w NULL in MoE layers)
    mdl_lin router;         // mlp.gate [E, H] (MoE layers)
    ag_tensor *gate_up;     // experts [E, 2I, H], gate rows first then up (MoE layers)
    ag_tensor *down;        // experts [E, H, I] (MoE layers)
    ag_expert_lora experts_lora; // LoRA on the routed experts (a_* NULL for none)
    mdl_mlp shared;         // shared expert (w NULL when n_shared_experts is 0 or dense)
    const ag_qweight *gate_up_q, *down_q; // quantized experts or NULL (then gate_up/down
                                          // are shape-only tensors)
    const float *kv_b_f32;  // a quantized kv_b_proj decoded once at load [NH*(DN+DV), RKV],
                            // for the absorbed decode form (NULL when kv_b is F32)
} mdl_layer;

// How tensors are named and laid out in a checkpoint.
typedef enum {
    MDL_LAYOUT_HF,            // HF names, fused experts gate_up_proj [E,2I,H] / down_proj
    MDL_LAYOUT_HF_PER_EXPERT, // HF names, mlp.experts.N.{gate,up,down}_proj.weight
    MDL_LAYOUT_MISTRAL,       // Mistral consolidated names (layers.N.attention.wq_a, ...)
    MDL_LAYOUT_COUNT
} mdl_layout;

// Expert parallelism: the routed experts of every MoE layer split in contiguous blocks over
// the ranks of a communicator (autograd/comm/comm.h). A sharded model holds its block's base
// weights only (read from the checkpoint's byte ranges of those experts, never the whole
// stack): gate_up [count, 2I, H], down [count, H, I]; its MoE layers send each token's rows to
// the experts' owners (ag_ep_dispatch) and take the results back (ag_ep_combine).
// Everything else is replicated.
typedef struct {
    ag_comm *comm; // the expert group; NULL: every expert is here (then first 0, count E)
    int first;     // this rank's experts are [first, first + count) of n_routed_experts
    int count;
} mdl_experts_shard;

typedef struct {
    mcfg cfg;
    mdl_experts_shard ep;   // which routed experts this model holds
    ag_arena arena;         // holds every weight below
    ag_tensor *embed;       // embed_tokens [V, H]
    mdl_layer *layers;      // [L]
    ag_tensor *norm;        // final norm [H]
    mdl_lin lm_head;        // [V, H] (w is embed when tie_word_embeddings)
    ag_rope_table rope;     // YaRN frequencies of the DR rotary dims (outlives every tape)
    ag_router_config router;
    double attn_scale;      // DQK^-0.5 times the YaRN mscale(factor, mscale_all_dim)^2
    mdl_layout layout;      // what the checkpoint used (loaded models)
    bool wrapped;           // HF names had the model.language_model. prefix
    ag_qweight *qw;         // [n_qw] storage of every quantized weight (owned), or NULL
    int n_qw;
    ag_bxweight head_bx;    // lm_head packed for AMX by mdl_pack_head (data NULL otherwise)
    bool prompt_bx;         // mdl_forward_spans runs prompt rows' quantized products as bf16
                            // pairs (mdl_prompts_on_amx)
    bool shapes_only;       // while creating: projections/experts get no data (quant load)
    bool plan_only;         // made by mdl_create_plan: no tensor holds data
    bool checkpoint_layers; // grad mode: wrap each decoder layer in ag_checkpoint (its
                            // activations are recomputed in backward; same results)
} mdl_model;

// Token batch: one or more packed sequences of T tokens in all.
typedef struct {
    ag_tensor *ids;     // I32 [T] token ids in [0, V)
    ag_tensor *pos;     // I32 [T] absolute positions (restart at 0 for each packed sequence)
    ag_tensor *seg;     // I32 [T] segment ids: token t attends to s <= t with seg[s] == seg[t]
    ag_tensor *targets; // I32 [T] next-token ids for the loss; NULL: logits are wanted
    ag_tensor *mask;    // F32 [T] loss weight per token (NULL = all ones); loss only
    double loss_norm;   // the summed loss is divided by this (0: by the mask's sum): a rank's
                        // rows of a batch split over ranks give their share of its mean
} mdl_batch;

// Per-batch attention inputs shared by all layers (see mdl_attn_inputs).
typedef struct {
    ag_tensor *pos;   // I32 [T]
    ag_tensor *seg;   // I32 [T]
    ag_tensor *qtemp; // F32 [T] llama-4 query temperature, or NULL when its beta is 0
} mdl_attn_in;

// The model's tensors as shapes only (no data anywhere), holding expert_count of the routed
// experts per MoE layer (a shard's stacks): for memory plans and parameter counts, never for
// a forward. MOLT_EARG when expert_count does not divide n_routed_experts.
molt_status mdl_create_plan(mdl_model *m, const mcfg *cfg, int expert_count);
// This rank's block of cfg's routed experts over the ranks of `experts` (NULL or one rank:
// all of them). MOLT_EARG when the experts do not split evenly over the ranks.
molt_status mdl_experts_range(const mcfg *cfg, ag_comm *experts, mdl_experts_shard *out);
// Allocates zeroed weights for cfg in m->arena and sets up the rope table, attention
// scale and router settings. mdl_load and mdl_init_random start here. On failure m is
// freed (safe to mdl_free again).
molt_status mdl_create(mdl_model *m, const mcfg *cfg);
// Reads dir/config.json and the weights: dir/model.safetensors.index.json (sharded),
// dir/model.safetensors, or dir/consolidated.safetensors (Mistral names). The layout is
// detected from the names (HF "model." or "model.language_model." prefix; fused or
// per-expert experts, per layer; Mistral consolidated). F32/F16/BF16/F8_E4M3 tensors are
// converted to F32; an FP8 tensor needs its per-tensor scale (`weight_scale_inv`,
// `qscale_weight`; [E,1,1] for fused experts), which multiplies. Activation scales and the
// vision tower of a wrapper are ignored. MOLT_EFORMAT names a missing tensor, an unexpected
// one, or a shape mismatch (expected vs got); MOLT_EUNSUPPORTED an unsupported dtype.
// A pre-quantized checkpoint (molt quantize) is MOLT_EUNSUPPORTED saying so: it loads
// through mdl_load_quant. A missing dir is MOLT_EIO saying the directory is missing.
molt_status mdl_load(const char *dir, mdl_model *m);
// MOLT_OK when dir is an existing directory, else an error naming it as the model directory.
molt_status mdl_check_dir(const char *dir);
// Loads the weights of an already created model from an open reader (same rules).
molt_status mdl_load_weights(mdl_model *m, const st_reader *r);
void mdl_free(mdl_model *m); // zeroes m; a zeroed model is fine

typedef enum { MDL_SAVE_F32, MDL_SAVE_BF16, MDL_SAVE_FP8 } mdl_save_dtype;
typedef struct {
    mdl_layout layout;
    mdl_save_dtype dtype; // FP8: E4M3 with one F32 scale per tensor (per expert when
                          // fused); lm_head, embeddings, norms and router stay BF16
    bool wrapped;         // HF names under model.language_model.
} mdl_save_opts;
// Writes the weights to one safetensors file at `path` (metadata format=pt). Deterministic.
molt_status mdl_save(const mdl_model *m, const char *path, const mdl_save_opts *o);
// Fills the weights like transformers' _init_weights: every matrix (embeddings, linears,
// router, experts) normal(0, std), norms 1, the pad_token_id row of embed_tokens 0. Seeded
// and deterministic (one ag_rng stream in a fixed tensor order).
molt_status mdl_init_random(mdl_model *m, uint64_t seed, double std);
// Total number of parameters (lm_head not counted again when tied).
int64_t mdl_param_count(const mcfg *cfg);

// ---- forward ------------------------------------------------------------------------
// All builders run eagerly on the context (autograd.h): with grad mode on and adapter
// tensors requiring grad, the graph is recorded for backward; base weights never get
// gradients. They return NULL (or a status) with the autograd error message on failure.
//
// Whole batches: mdl_forward (logits or loss), or mdl_hidden + mdl_logits on chosen rows.
// Step by step (what mdl_hidden does): a = mdl_attn_inputs; h = mdl_embed; for each layer
// h = mdl_layer_forward(h, a); then RMSNorm with m->norm. A layer is
//   x = rmsnorm(h, attn_norm); h += mdl_attention(x) ; h += mdl_ffn(rmsnorm(h, mlp_norm))
// and mdl_attention is mdl_attn_query + mdl_attn_latent + mdl_attn_expand + ag_attention
// (qtemp, m->attn_scale) + mdl_attn_out. Cached decoding keeps the outputs of
// mdl_attn_latent (RKV + DR numbers per token and layer), expands the cached rows with
// mdl_attn_expand and attends the new queries to them.

// y = x W^T + lora_scale * (x A^T) B^T; x [..., in] -> [..., out].
ag_tensor *mdl_linear(ag_ctx *c, ag_tensor *x, const mdl_lin *lin);
// Checks the batch (shapes, dtypes, id and position ranges) and builds the per-batch
// attention inputs (the query temperature from the positions).
molt_status mdl_attn_inputs(ag_ctx *c, const mdl_model *m, const mdl_batch *b,
                            mdl_attn_in *out);
ag_tensor *mdl_embed(ag_ctx *c, const mdl_model *m, ag_tensor *ids); // -> [T, H]

// Attention sub-steps of layer l (x is the normalized input [T, H]), for a KV cache:
// query [T, NH, DQK] with RoPE applied to its last DR dims (temperature not applied:
// ag_attention takes qtemp).
ag_tensor *mdl_attn_query(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, ag_tensor *pos);
// The cached latent: *latent = kv_a_layernorm(ckv[:, :RKV]) [T, RKV] and *k_rot = rotated
// ckv[:, RKV:] [T, DR] (one head shared by all heads).
molt_status mdl_attn_latent(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x, ag_tensor *pos,
                            ag_tensor **latent, ag_tensor **k_rot);
// Expands S cached latents to keys [S, NH, DQK] = cat(k_nope, k_rot) and values [S, NH, DV].
molt_status mdl_attn_expand(ag_ctx *c, const mdl_model *m, int l, ag_tensor *latent,
                            ag_tensor *k_rot, ag_tensor **key, ag_tensor **value);
// o_proj of the attention output [T, NH, DV] -> [T, H].
ag_tensor *mdl_attn_out(ag_ctx *c, const mdl_model *m, int l, ag_tensor *att);
// Whole attention of layer l without a cache (x normalized) -> [T, H].
ag_tensor *mdl_attention(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x,
                         const mdl_attn_in *a);
// Feed-forward of layer l (x normalized): dense MLP, or routed experts + shared expert.
ag_tensor *mdl_ffn(ag_ctx *c, const mdl_model *m, int l, ag_tensor *x);
// For a rank of a sharded model that has no tokens of its own while the other ranks of its
// expert group run mdl_forward (or mdl_hidden): for every MoE layer in order, this rank's
// experts run on the rows the others send (the collectives their forward makes). Inference
// only (grad mode is off for the call). bank: the adapter bank the others' forward uses
// (mdl_forward_spans), or NULL: each received row then runs under the adapter slot it
// carries, as it would on its sender.
struct mdl_bank;
molt_status mdl_serve_experts(ag_ctx *c, const mdl_model *m, const struct mdl_bank *bank);
// One decoder layer: h + attn(norm(h)), then + ffn(norm(.)). h [T, H] -> [T, H].
ag_tensor *mdl_layer_forward(ag_ctx *c, const mdl_model *m, int l, ag_tensor *h,
                             const mdl_attn_in *a);
// Embedding, all layers and the final norm: *hidden = [T, H] ready for the lm_head.
molt_status mdl_hidden(ag_ctx *c, const mdl_model *m, const mdl_batch *b, ag_tensor **hidden);
ag_tensor *mdl_logits(ag_ctx *c, const mdl_model *m, ag_tensor *hidden); // [T, H] -> [T, V]
// Whole model: *out = logits [T, V] when b->targets is NULL, else the mean masked
// cross-entropy [1] (fused with the lm_head, vocabulary in chunks: logits never held).
molt_status mdl_forward(ag_ctx *c, const mdl_model *m, const mdl_batch *b, ag_tensor **out);
// Greedy decoding by full recomputation (the reference for cached decoding): appends n
// argmax tokens to prompt[0..n_prompt) (positions from 0, one segment) into out[0..n).
// Stops early after an eos token when stop_at_eos; returns the count in *n_out. Resets the
// context's activations (ag_ctx_step_reset) at every step.
molt_status mdl_greedy(ag_ctx *c, const mdl_model *m, const int32_t *prompt, int n_prompt,
                       int n, bool stop_at_eos, int32_t *out, int *n_out);

// ---- several adapters in one batch (model/bank.c) -------------------------------------
// Serving and evaluation run many adapters through one forward: a bank holds, for n_slots
// adapters, each adapter's LoRA on every linear of the model and on the routed experts,
// without touching the mdl_lin LoRA fields that training wires. A batch then says per token
// which slot applies (-1: the base alone): every projection runs once over all tokens and
// ag_lora_multi adds each token's low-rank term; routed experts go through
// ag_moe_experts_multi. With a bank, every token's result is batch-invariant: it does not
// depend on what else is in the batch (inference only).

// Number of linears of m (every mdl_lin has an id in [0, count), absent modules included):
// per layer q_a, q_b, q, kv_a, kv_b, o, dense gate/up/down, router, shared gate/up/down, then
// lm_head.
int mdl_lin_count(const mdl_model *m);
mdl_lin *mdl_lin_at(mdl_model *m, int id); // NULL when out of range

typedef struct mdl_bank {
    int n_slots;              // adapters the bank can hold
    int n_lins, n_layers;     // of the model it was made for
    ag_lora_ab *lin;          // [n_lins * n_slots]: slot s on linear id at [id * n_slots + s]
    ag_expert_lora *experts;  // [n_layers * n_slots]: slot s on layer l's routed experts
    int *lin_users;           // [n_lins] slots with a LoRA on each linear (0: nothing to add)
    int *expert_users;        // [n_layers]
} mdl_bank;

// An empty bank of n_slots slots for m's shapes.
molt_status mdl_bank_init(mdl_bank *b, const mdl_model *m, int n_slots);
void mdl_bank_free(mdl_bank *b); // zeroes b; a zeroed bank is fine
// Empties slot s (the tensors are not freed: they belong to whoever set them).
void mdl_bank_clear(mdl_bank *b, int s);
// Slot s's LoRA on linear `id` (a [r, in], bb [out, r] F32, shapes checked against the
// model's linear) and on layer l's routed experts (as ag_expert_lora; NULL pairs allowed).
// MOLT_EARG naming the linear or layer on a shape mismatch.
molt_status mdl_bank_set_lin(mdl_bank *b, const mdl_model *m, int s, int id, ag_tensor *a,
                             ag_tensor *bb, double scale);
molt_status mdl_bank_set_experts(mdl_bank *b, const mdl_model *m, int s, int l,
                                 const ag_expert_lora *el);
// Whether slot s holds anything.
bool mdl_bank_used(const mdl_bank *b, int s);

// One sequence's part of a batched cached forward (mdl_forward_spans).
typedef struct {
    int seq;            // cache sequence: the tokens take positions len..len+n-1
    const int32_t *ids; // [n] token ids
    int n;              // >= 1
    int n_expanded;     // the first n_expanded tokens attend in the expanded form, the rest in
                        // the absorbed one (prompt tokens expanded, generated ones absorbed:
                        // a sequence recomputed later, after preemption, gets the same bits)
    int slot;           // adapter slot of the bank, -1 for the base alone
    int n_logits;       // logits of the last n_logits tokens (0..n)
} mdl_span;
// Estimated bytes of activations (and, when train, their gradients) of one forward over T
// tokens of a model with config c, with or without activation checkpointing: an upper
// bound for the presets (tests/test_mem_estimate.c), for refusing sizes that cannot fit.
uint64_t mdl_step_memory_bytes(const mcfg *c, int64_t T, bool train, bool checkpointing);
// MOLT_EARG when n positions exceed c's max_position_embeddings: "WHAT: N positions, more
// than the model's max_position_embeddings M".
molt_status mcfg_check_positions(const mcfg *c, int64_t n, const char *what);

// ---- presets and commands -----------------------------------------------------------
// Finds models/NAME.json in molt's data roots (common/datadir.h: the installation prefix,
// $MOLT_DATA_DIR, beside the build tree); NAME may also be a path to a .json file. path
// gets the file; MOLT_EIO lists the places.
molt_status mdl_preset_find(const char *name, char *path, size_t cap);
typedef struct {
    const char *preset;    // preset name or .json path
    const char *out_dir;   // created when missing; a non-empty one is refused unless force
    uint64_t seed;
    mdl_save_opts save;    // dtype and layout of the written weights
    const char *tokenizer; // tokenizer file to copy; NULL = tekken.json found beside presets
    bool no_tokenizer;     // write no tokenizer
    bool force;            // replace a non-empty out_dir whole
    double max_gb;         // refuse models whose F32 weights exceed this (0 = 16)
} mdl_init_opts;
// Writes out_dir/config.json (the preset, with dtype set), the weights
// (model.safetensors, or consolidated.safetensors for the Mistral layout) and tekken.json.
molt_status mdl_init_model(const mdl_init_opts *o);

// ---- quantized base weights (model/quant_model.c, model/quant_io.c) -----------------
// Every frozen projection can be held as a qweight (autograd.h), chosen per module group.
// Embeddings and norms always stay F32. A group in AG_Q_F32 keeps a plain F32 tensor.
typedef enum {
    MDL_QG_ATTENTION, // q_a/q_b/q, kv_a, kv_b, o projections
    MDL_QG_ROUTER,    // mlp.gate (default f32: routing decisions are sensitive)
    MDL_QG_SHARED,    // shared expert gate/up/down
    MDL_QG_EXPERTS,   // routed experts, one quantized matrix per expert
    MDL_QG_DENSE,     // dense-layer MLP
    MDL_QG_LM_HEAD,   // untied lm_head (default f32; a quantized one is inference only)
    MDL_QG_COUNT
} mdl_qgroup;
typedef struct {
    ag_qformat format[MDL_QG_COUNT];
    bool nf4_double_quant; // default true
} mdl_qspec;
const char *mdl_qgroup_name(mdl_qgroup g); // "attention", "router", ...
// Parses "FORMAT[,GROUP=FORMAT...]" (formats nf4 int8 fp8 bf16 f32; groups attention router
// shared_experts experts dense_mlp lm_head). FORMAT sets every group but router and lm_head,
// which stay f32 unless named. MOLT_EARG names the bad word.
molt_status mdl_qspec_parse(const char *text, mdl_qspec *out);
// The canonical text of a spec ("attention=nf4,router=f32,...") into buf; returns buf.
const char *mdl_qspec_str(const mdl_qspec *q, char *buf, size_t cap);
// Loads dir like mdl_load, quantizing tensor by tensor as it reads (F32 copies never held
// all at once; an FP8 source with format fp8 is kept as loaded). A pre-quantized checkpoint
// (written by mdl_save_quant) loads its stored state as is and `spec` is ignored; spec NULL
// with a plain checkpoint loads it unquantized. MOLT_EFORMAT names a corrupt tensor/field.
molt_status mdl_load_quant(const char *dir, const mdl_qspec *spec, mdl_model *m);
// mdl_load_quant holding only this rank's routed experts of the expert group `experts`
// (NULL: all; see mdl_experts_shard). Collective over `experts` when NF4 with double
// quantization is asked for the experts: the offset of the stack's absmax is the mean over
// every expert, so the ranks exchange their absmax (1/64 of the stack's values) and each
// stores exactly what quantizing the whole stack gives for its experts.
molt_status mdl_load_quant_ex(const char *dir, const mdl_qspec *spec, ag_comm *experts,
                              mdl_model *m);
// For inference: on a processor with AMX-BF16 (ag_bx_available), packs an F32 lm_head as
// bf16 hi + lo planes and points lm_head.bx at it; from then on every lm_head product goes
// through ag_linear_bx (1.7x faster at 31 rows on a 131072 x 512 head; a few 1e-6 of the
// largest logit away from F32; x still gets its gradient). An untied head with rows a
// multiple of 16 and columns of 32 is packed over its own bytes and lm_head.w keeps only
// its shape (data NULL: no memory added; the fused training loss then refuses the model);
// otherwise the packed copy goes into m's arena. Sets *packed (may be NULL) to whether it
// packed; a quantized, absent or already packed head, or no AMX, is left as it is (MOLT_OK).
molt_status mdl_pack_head(mdl_model *m, bool *packed);
// Inference on AMX for the prompt: from now on mdl_forward_spans gives the expanded (prompt)
// rows of its spans the bf16-pair products (ag_linear_q_rows, ag_moe_experts_multi_rows) on
// every quantized linear and routed expert; generated rows keep the F32 products. Prompt
// tokens are recomputed as prompt tokens (n_expanded), so a sequence's bits stay the same
// whatever its batch. Only where ag_bxq_available(), on a model with quantized weights and no
// expert group; *on (may be NULL) says whether it was switched on.
void mdl_prompts_on_amx(mdl_model *m, bool *on);
// Turns every quantized weight of m back into an F32 tensor (the quantized values, not the
// original ones) and frees the quantized storage: for merging an adapter into a
// pre-quantized base. MOLT_ENOMEM leaves the weights done so far in F32.
molt_status mdl_dequantize(mdl_model *m);
// Writes a pre-quantized checkpoint (HF names; NF4 state stored beside each weight in
// bitsandbytes' quant_state convention, INT8 with .SCB, FP8 with _scale_inv) to path.
molt_status mdl_save_quant(const mdl_model *m, const char *path);
// Bytes held by the weights: F32 tensors with data plus every qweight's storage.
size_t mdl_weight_bytes(const mdl_model *m);
// The weights of one rank by group, as the loaders store them (model/plan.c): spec NULL for
// F32; expert_count of the routed experts per MoE layer (a shard holds n_routed / expert).
typedef enum {
    MDL_PG_EMBED,
    MDL_PG_NORMS,
    MDL_PG_ATTENTION,
    MDL_PG_ROUTER,
    MDL_PG_SHARED,
    MDL_PG_EXPERTS,
    MDL_PG_DENSE,
    MDL_PG_LM_HEAD,
    MDL_PG_COUNT
} mdl_plan_group;
const char *mdl_plan_group_name(mdl_plan_group g);
molt_status mdl_plan_weights(const mcfg *cfg, const mdl_qspec *spec, int expert_count,
                             size_t bytes[MDL_PG_COUNT]);
int mdl_cmd_quantize(int argc, char **argv);         // molt quantize
int mdl_cmd_bench_quant_model(int argc, char **argv); // molt bench quant-model

int mdl_cmd_init_model(int argc, char **argv); // molt init-model
// How `molt forward --adapter` attaches an adapter: provided by a module above model/ (the
// adapters are not model's business), so model/ never depends on it. attach loads the
// adapter at `path` onto m for inference and returns an opaque handle for detach.
typedef struct {
    molt_status (*attach)(mdl_model *m, const char *path, void **handle);
    void (*detach)(void *handle);
} mdl_adapter_hook;
// molt forward; with hook NULL, --adapter is refused.
int mdl_cmd_forward(int argc, char **argv, const mdl_adapter_hook *hook);

// ---- KV cache and cached decoding (model/kvcache.c: the pages; model/decode.c: the cached
// forward) ---------------------------------------------------------------------------------
// Per layer and token the cache keeps what MLA attention needs and nothing else: the
// normalized compressed kv (RKV numbers, kv_a_layernorm applied) and the rotated shared
// key (DR numbers): RKV + DR floats. Tokens live in fixed-size blocks taken from a pool;
// each sequence has a block table, so sequences of any length share one pool without
// moving memory, and a reset sequence hands its blocks back for reuse.
//
// Not here: sampling and the decode loop (infer/), batching several sequences in one
// forward (the cache holds many sequences, the forward serves one at a time for now).

#define MDL_KV_BLOCK_DEFAULT 16 // tokens per block

typedef struct {
    int32_t *blocks; // [n_blocks] block ids in token order: token t is in blocks[t / bt]
    int n_blocks, cap_blocks;
    int len;         // committed tokens (positions 0..len-1)
    bool live;       // slot in use
} mdl_kv_seq;

// Per-block record of the prefix cache (kvcache.c).
typedef struct {
    uint64_t tag;      // what computed the block besides its tokens (the adapter), 0 = base
    uint64_t hash;     // of (tag, parent, parent_gen, tokens)
    int32_t parent;    // the block before it in its prompt, -1 for the first
    uint32_t parent_gen, gen; // gen changes whenever the block is reused for other content
    int32_t *tokens;   // [block_tokens] the prompt tokens it holds (NULL until indexed once)
    bool indexed;      // findable by its content
    int32_t lru_prev, lru_next; // evictable list (indexed, no sequence holds it)
} mdl_kv_pblock;

typedef struct {
    int n_layers;     // L
    int rkv, dr;      // kv_lora_rank, qk_rope_head_dim
    int width;        // rkv + dr floats per token and layer
    int block_tokens; // tokens per block
    int max_blocks;   // pool limit (0 = grow without limit)
    float **pool;     // [n_pool] blocks, each [L, block_tokens, width]
    int n_pool, cap_pool;
    int32_t *free_ids; // [n_free] pool blocks holding nothing anyone may want
    int n_free;
    int32_t *ref;      // [cap_pool] sequences holding each block
    int n_used;        // blocks with ref > 0
    mdl_kv_pblock *pb; // [cap_pool] prefix-cache records
    int32_t *pmap;     // [pmap_cap] hash table of indexed blocks (-1 empty, -2 deleted)
    int pmap_cap, pmap_fill; // slots, slots not empty
    int32_t lru_head, lru_tail; // evictable cached blocks, least recently used first
    int n_cached;      // blocks in that list
    mdl_kv_seq *seqs; // [n_seqs] sequence slots
    int n_seqs;
} mdl_kvcache;

// An empty cache for models of cfg: blocks of block_tokens tokens (0 = the default),
// at most max_tokens tokens over all sequences (rounded up to whole blocks; 0 = no limit).
molt_status mdl_kv_init(mdl_kvcache *kv, const mcfg *cfg, int block_tokens, int max_tokens);
void mdl_kv_free(mdl_kvcache *kv); // zeroes kv; a zeroed cache is fine

// Opens a new empty sequence; *seq gets its id (released ids are reused).
molt_status mdl_kv_seq_open(mdl_kvcache *kv, int *seq);
// Empties a sequence (its blocks go back to the pool); the id stays open.
void mdl_kv_seq_reset(mdl_kvcache *kv, int seq);
// Empties and closes a sequence; its id may be handed out again.
void mdl_kv_seq_close(mdl_kvcache *kv, int seq);
int mdl_kv_len(const mdl_kvcache *kv, int seq); // committed tokens; -1 for a bad id

// Makes room for n more tokens after the committed ones (all blocks or none: on failure
// the sequence is unchanged). MOLT_ENOMEM when the pool limit or memory runs out.
molt_status mdl_kv_reserve(mdl_kvcache *kv, int seq, int n);
// The row of token t of layer l: [width] floats, latent first then the rotated key.
// t must be below len + the reserved room; NULL (with a message) otherwise.
float *mdl_kv_row(const mdl_kvcache *kv, int seq, int l, int t);
// Marks n reserved tokens as written: len += n.
molt_status mdl_kv_commit(mdl_kvcache *kv, int seq, int n);
// Blocks held by at least one sequence (a block shared by several counts once).
int mdl_kv_blocks_used(const mdl_kvcache *kv);

// Prefix caching: full blocks of prompt tokens are indexed by their content (the tag of
// whatever else decides the values, e.g. the adapter, and every token from position 0 to the
// block's end) and outlive their sequences while the pool has room: a later sequence with the
// same leading blocks shares them instead of computing them again. Shared blocks are only
// read (a sequence writes past them into blocks of its own). When a block is needed and none
// is free (and the pool cannot grow), the least recently used cached block is given up.
//
// Shares, into the empty sequence seq, the longest chain of indexed blocks whose tag and
// tokens equal ids[0..k*block_tokens) with k*block_tokens <= n; returns the tokens matched
// (its committed length), 0 when none. Callers pass n = prompt length - 1 so that at least
// the last prompt token is computed.
int mdl_kv_prefix_match(mdl_kvcache *kv, int seq, uint64_t tag, const int32_t *ids, int n);
// Indexes seq's first min(n, len) / block_tokens blocks as holding ids (its prompt) under tag.
// Blocks already indexed stay as they are; a block whose content another block already holds
// stays private. MOLT_ENOMEM leaves the index as it was.
molt_status mdl_kv_prefix_publish(mdl_kvcache *kv, int seq, uint64_t tag, const int32_t *ids,
                                  int n);
// Evictable cached blocks (indexed, held by no sequence).
int mdl_kv_blocks_cached(const mdl_kvcache *kv);

// ---- cached forward (decode.c) ------------------------------------------------------
// How cached attention runs (both inference-only, with plain loops outside the tape):
typedef enum {
    MDL_ATTN_ABSORBED, // per head q_nope -> W_UK^T q_nope in latent space, scores over the
                       // (RKV + DR)-wide cached rows, W_UV after summing latents (default)
    MDL_ATTN_EXPANDED, // cached latents expanded through kv_b_proj (mdl_attn_expand) to
                       // full keys and values, then ordinary attention
} mdl_attn_mode;

// Runs ids[0..n) of sequence `seq` through the model at positions len..len+n-1 of the
// cache (prefill for n > 1, one decode step for n == 1), appends their latents to the
// cache and sets *logits to [n, V] (all_logits) or [1, V] (the last token) in the
// context's activation arena. Same weights, mdl_linear hook, router and experts as the
// training path; grad mode is switched off for the call. Inference only: nothing is
// recorded for backward. On failure the sequence's committed length is unchanged.
molt_status mdl_forward_cached(ag_ctx *c, const mdl_model *m, mdl_kvcache *kv, int seq,
                               const int32_t *ids, int n, mdl_attn_mode mode, bool all_logits,
                               ag_tensor **logits);

// Cached attention of layer l for n new queries q [n, NH, DQK] (RoPE applied) whose
// latents are already written at positions len..len+n-1 of the cache (reserved, not yet
// committed): query i attends to cached tokens 0..len+i. qtemp [n] or NULL.
// -> [n, NH, DV]. Exposed for tests comparing the two modes layer by layer.
ag_tensor *mdl_attn_cached(ag_ctx *c, const mdl_model *m, int l, const mdl_kvcache *kv,
                           int seq, ag_tensor *q, ag_tensor *qtemp, mdl_attn_mode mode);

// One forward over several sequences' new tokens at once: every projection, norm, router
// and expert runs once over all of them (adapters per span through the bank, which may be
// NULL when every slot is -1), attention runs per sequence over its cache. Reserves room
// in the cache as needed, writes the new tokens' latents and commits them. *logits =
// [sum n_logits, V] in span order (NULL when no span asks for any). Inference only: grad
// mode is switched off for the call. With a bank, a token's logits and cache rows have the
// same bits whatever the other spans are. On failure no sequence's length changes.
molt_status mdl_forward_spans(ag_ctx *c, const mdl_model *m, mdl_kvcache *kv,
                              const mdl_bank *bank, const mdl_span *spans, int n_spans,
                              ag_tensor **logits);

#endif
