// infer/engine/engine.h: the public API of molt's serving engine (`eng_`): one model, its
// paged latent KV cache and a pool of LoRA adapters owned by one engine thread that runs
// continuous batching: every step is ONE forward over the next token of every running
// sequence plus chunks of waiting prompts, tokens of different adapters mixed in the batch.
// Requests are submitted from any thread and their results come back as events on a
// per-request queue, which the submitting thread drains (blocking with a timeout).
//
// Not here: HTTP, JSON, text (the server turns text into ids and ids back into text; stop
// strings are matched there and end a request with eng_cancel), the chat template.
#ifndef MOLT_INFER_ENGINE_H
#define MOLT_INFER_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../../common/err.h"
#include "../../data/tokenizer.h"
#include "../infer.h"

typedef struct eng_engine eng_engine;
typedef struct eng_req eng_req;

// ---- creation ---------------------------------------------------------------------------
typedef struct {
    const char *model_dir;   // Hugging Face layout directory (config.json, weights, tokenizer)
    const char *base_quant;  // quantization SPEC of the base (model.h mdl_qspec_parse), NULL = as stored
    int max_model_len;       // prompt + generated tokens per sequence; 0 = the model's
                             // max_position_embeddings
    int max_num_seqs;        // running sequences at most (default 64)
    int max_batch_tokens;    // tokens in one engine step at most (default 2048; at least
                             // max_num_seqs)
    int kv_cache_mib;        // memory of the KV cache pool (default 512)
    int kv_cache_tokens;     // > 0: the pool holds this many tokens instead (rounded up to
                             // whole blocks), whatever kv_cache_mib says
    int block_tokens;        // tokens per cache block (default 16)
    int max_loaded_adapters; // adapters resident at once (default 16)
    bool no_prefix_caching;  // turn off the sharing of identical leading prompt blocks
    const char *tokenizer;   // tokenizer file; NULL = model_dir/tekken.json, else
                             // model_dir/tokenizer.json
    struct ag_comm *experts; // expert group (autograd/comm/comm.h) or NULL: the routed
                             // experts split over its ranks (mdl_load_quant_ex). Every rank
                             // of the group runs its own engine on its own requests; their
                             // steps go in lockstep (one small allreduce per step), a rank
                             // with nothing to run serves its experts to the others, and the
                             // threads stop together once every rank has asked to stop
                             // (eng_shutdown on each). Only the engine thread then uses the
                             // communicator, from eng_start until eng_shutdown returns.
                             // Rows reach their experts' owners with their adapter slot, so
                             // every rank registers the same adapters in the same order before
                             // eng_start, all resident (at most max_loaded_adapters); adding
                             // one after eng_start is refused.
} eng_opts;
void eng_opts_default(eng_opts *o);

// Loads the model, the tokenizer and sizes the KV cache; does not start the engine thread.
// Errors name the file and what was wrong (as mdl_load_quant / tok_load do).
molt_status eng_create(const eng_opts *o, eng_engine **out);
// Starts the engine thread (once).
molt_status eng_start(eng_engine *e);
// Stops accepting requests (eng_submit then fails with MOLT_EUNSUPPORTED "shutting down"),
// waits up to grace_s seconds for running and waiting requests to finish, cancels what is
// left (their queues get ENG_EV_DONE with ENG_FINISH_ABORT), and stops the thread.
void eng_shutdown(eng_engine *e, double grace_s);
// Frees everything (calls eng_shutdown(e, 0) first when needed). Every eng_req must have
// been released before.
void eng_free(eng_engine *e);

const tok_tokenizer *eng_tokenizer(const eng_engine *e); // lives as long as the engine
int eng_max_model_len(const eng_engine *e);
int eng_vocab_size(const eng_engine *e);
int eng_kv_capacity_tokens(const eng_engine *e);         // blocks in the pool x block_tokens
bool eng_head_amx(const eng_engine *e); // the vocabulary projection runs on AMX (mdl_pack_head)
bool eng_prompt_amx(const eng_engine *e); // prompt rows' quantized products too (mdl_prompts_on_amx)
int32_t eng_eos(const eng_engine *e);                    // the tokenizer's </s>, or -1
// Whether t ends a sequence by itself: the tokenizer's </s> or an eos id of the model's
// config (what stops a request unless ignore_eos).
bool eng_is_eos(const eng_engine *e, int32_t t);
// Whether the engine thread is running and taking requests (false before eng_start, after
// eng_shutdown, and once it has stopped).
bool eng_healthy(eng_engine *e);

// ---- adapters -----------------------------------------------------------------------------
// An adapter is registered under a unique name with the path it loads from: a PEFT directory,
// a molt adapter file (.h5), or a training checkpoint (step-N.h5). Registration loads and
// validates it on the calling thread (never the engine thread): MOLT_EARG for a name already
// registered (or empty, or equal to the base's name is the server's business), MOLT_EIO for a
// missing path, MOLT_EFORMAT naming the file and tensor for an adapter that does not fit the
// base. At most max_loaded_adapters are resident; when a new one needs room, the least
// recently used adapter that no running request uses is evicted (it stays registered and is
// reloaded from its path by the engine's loader thread when a request names it again; that
// request waits, running sequences never do). With every resident adapter in use, loading
// waits for one to become idle.
molt_status eng_adapter_add(eng_engine *e, const char *name, const char *path);
// Unregisters: new requests naming it fail with MOLT_EARG ("unknown model"); requests already
// submitted finish with it, and its memory goes when the last one ends. MOLT_EARG when no
// such name is registered.
molt_status eng_adapter_remove(eng_engine *e, const char *name);

typedef struct {
    char name[128];
    char path[1024];
    bool resident; // loaded in memory now
    int active;    // requests using it now
    int rank_max;  // largest LoRA rank of its units
    int64_t params;
} eng_adapter_info;
// Number of registered adapters; fills out[0..min(n, cap)) in registration order.
int eng_adapter_list(eng_engine *e, eng_adapter_info *out, int cap);
// Whether `name` is registered.
bool eng_adapter_exists(eng_engine *e, const char *name);

// ---- requests -----------------------------------------------------------------------------
#define ENG_MAX_LOGPROBS 20

typedef struct {
    const int32_t *prompt;   // [n_prompt] token ids (copied by eng_submit)
    int n_prompt;            // >= 1
    const char *adapter;     // registered adapter name; NULL or "" = the base
    int max_tokens;          // tokens to generate at most (>= 0; 0 with prompt_logprobs only
                             // scores the prompt)
    inf_sample_opts sample;  // temperature, top_k, top_p, seed (infer.h); greedy by default
    const int32_t *stop_ids; // [n_stop_ids] ids that end generation (the id is delivered,
    int n_stop_ids;          // with finish ENG_FINISH_STOP)
    bool ignore_eos;         // do not stop at the model's eos ids
    int logprobs;            // alternatives per generated token: -1 none, 0 only the chosen
                             // token's log-probability, 1..ENG_MAX_LOGPROBS the top-n too
    bool prompt_logprobs;    // deliver the log-probability of every prompt token after the
                             // first (with `logprobs` alternatives each when >= 0)
    int prompt_logprobs_from; // with prompt_logprobs: only for prompt indices >= this (>= 1;
                             // 0 = 1); the rows before it are not projected to the vocabulary
    bool compute_prompt;     // with max_tokens 0 and no prompt log-probabilities: compute the
                             // prompt into the cache anyway (its blocks then serve later
                             // requests with the same leading tokens through the prefix cache)
} eng_request;
void eng_request_default(eng_request *r); // greedy, max_tokens 16, logprobs -1

typedef enum {
    ENG_EV_PROMPT, // a prompt token's log-probability (index >= 1)
    ENG_EV_TOKEN,  // a generated token
    ENG_EV_DONE,   // finished: no more events follow
    ENG_EV_ERROR,  // failed: no more events follow
} eng_event_kind;

typedef enum {
    ENG_FINISH_STOP,   // an eos id (unless ignore_eos) or a stop id was generated
    ENG_FINISH_LENGTH, // max_tokens reached, or the sequence reached max_model_len
    ENG_FINISH_CANCEL, // eng_cancel
    ENG_FINISH_ABORT,  // the engine shut down first
} eng_finish;

typedef struct {
    eng_event_kind kind;
    // PROMPT / TOKEN
    int index;       // position of the token (prompt index, or generated count - 1)
    int32_t token;
    double logprob;  // log-probability of `token` under the (temperature-free) softmax of the
                     // logits; NAN when logprobs were not asked for
    int n_top;       // alternatives, most probable first (ties: lower id first)
    int32_t top_ids[ENG_MAX_LOGPROBS];
    double top_logprobs[ENG_MAX_LOGPROBS];
    // DONE
    eng_finish finish;
    int n_prompt, n_gen;     // usage
    int n_cached;            // prompt tokens served from the prefix cache
    int32_t stop_token;      // ENG_FINISH_STOP: the id that ended it (eos or stop id), else -1
    // ERROR
    molt_status status;
    char message[512];
} eng_event;

// Validates and queues a request; *out is the handle its events come through. Errors
// (nothing queued): MOLT_EARG naming the field (empty prompt, id outside the vocabulary,
// max_tokens < 0, logprobs out of range, bad sampling options), prompt plus max_tokens over
// max_model_len (the message gives both numbers), an unknown adapter ("The model `X` does not
// exist."); MOLT_EUNSUPPORTED when shutting down.
molt_status eng_submit(eng_engine *e, const eng_request *r, eng_req **out);
// Waits up to timeout_ms (< 0: forever) for the next event. Returns 1 and fills *ev, or 0 on
// timeout. After ENG_EV_DONE or ENG_EV_ERROR it returns 0 at once.
int eng_next(eng_req *q, eng_event *ev, int timeout_ms);
// Ends the request early (client gone, stop string found): its blocks are freed at the next
// engine step and a DONE event with ENG_FINISH_CANCEL follows (unless it had finished).
void eng_cancel(eng_req *q);
// Frees the handle (cancels first when still running). Safe from any thread, once.
void eng_release(eng_req *q);

// ---- statistics ---------------------------------------------------------------------------
typedef struct {
    int running, waiting;       // sequences in the batch / queued (incl. preempted)
    int kv_blocks_used, kv_blocks_total, block_tokens;
    int adapters_registered, adapters_resident;
    int64_t prefix_hit_tokens;  // prompt tokens served from the prefix cache (cumulative)
    int64_t prefix_query_tokens;// prompt tokens looked up in it (cumulative)
    int64_t preemptions;        // sequences preempted for lack of blocks (cumulative)
    int64_t prompt_tokens, generated_tokens; // computed by the engine (cumulative)
    int64_t steps;              // engine steps run
    int64_t adapter_loads, adapter_evictions;
} eng_stats;
void eng_get_stats(eng_engine *e, eng_stats *s);

#endif
