// model/model.h: the public API of molt's model module: reading and writing safetensors
// checkpoints (`st_`) and the Mistral Small 4 configuration (`mcfg_`).
//
// A safetensors reader memory-maps its files, validates every header entry against the
// file before any tensor is handed out, and exposes the tensors by name. Nothing here
// builds layers, quantizes weights or knows HF-vs-Mistral tensor names: those build on it.
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
// header padded with spaces to a multiple of 8). Names must be unique. MOLT_EARG on bad
// tensors, MOLT_EIO on write failure (the partial file is removed).
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

#endif
