// model/kvcache.h: the paged MLA latent cache and cached (incremental) decoding of the
// Mistral 4 model: kvcache.c holds the pages, decode.c the cached forward. Part of the
// model module's public API beside model.h (kept in its own header so the cache can grow
// without touching the training-side declarations).
//
// Per layer and token the cache keeps what MLA attention needs and nothing else: the
// normalized compressed kv (RKV numbers, kv_a_layernorm applied) and the rotated shared
// key (DR numbers): RKV + DR floats. Tokens live in fixed-size blocks taken from a pool;
// each sequence has a block table, so sequences of any length share one pool without
// moving memory, and a reset sequence hands its blocks back for reuse.
//
// Not here: sampling and the decode loop (infer/), batching several sequences in one
// forward (the cache holds many sequences, the forward serves one at a time for now).
#ifndef MOLT_MODEL_KVCACHE_H
#define MOLT_MODEL_KVCACHE_H

#include "model.h"

#define MDL_KV_BLOCK_DEFAULT 16 // tokens per block

typedef struct {
    int32_t *blocks; // [n_blocks] block ids in token order: token t is in blocks[t / bt]
    int n_blocks, cap_blocks;
    int len;         // committed tokens (positions 0..len-1)
    bool live;       // slot in use
} mdl_kv_seq;

typedef struct {
    int n_layers;     // L
    int rkv, dr;      // kv_lora_rank, qk_rope_head_dim
    int width;        // rkv + dr floats per token and layer
    int block_tokens; // tokens per block
    int max_blocks;   // pool limit (0 = grow without limit)
    float **pool;     // [n_pool] blocks, each [L, block_tokens, width]
    int n_pool, cap_pool;
    int32_t *free_ids; // [n_free] pool blocks not owned by any sequence
    int n_free;
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
// Blocks in use by all sequences / held by the pool.
int mdl_kv_blocks_used(const mdl_kvcache *kv);

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

#endif
