// infer/infer.h: the public API of molt's inference module: sampling (`inf_sample*`), the
// decode loop with streaming text output (`inf_generate`), and the `molt generate` /
// `molt bench generate` commands. Builds on the model's cached forward (model/model.h)
// and the tokenizer and chat template (data/). Not here: the serving engine and continuous
// batching (infer/engine/), the HTTP server (infer/server/), evaluation (infer/eval/).
#ifndef MOLT_INFER_H
#define MOLT_INFER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../autograd/autograd.h"
#include "../common/err.h"
#include "../data/data.h"
#include "../model/model.h"

// ---- sampling (sample.c) ------------------------------------------------------------
// Order of the steps: temperature -> top-k -> top-p -> sample.
//   temperature 0: greedy (argmax, first index on ties); the other fields are ignored.
//   temperature T > 0: p = softmax(logits / T) in double precision.
//   top_k K > 0: keep the K most probable tokens (ties: lower id first), renormalize.
//   top_p P < 1: keep the smallest most-probable-first prefix whose probability (after
//   top-k) reaches P, renormalize.
//   sample: one uniform draw u from the seeded ag_rng; the first candidate (most probable
//   first) whose cumulative probability exceeds u.
// The same seed and logits give the same tokens.
typedef struct {
    double temperature; // >= 0; 0 = greedy
    int top_k;          // >= 0; 0 = off
    double top_p;       // in (0, 1]; 1 = off
    uint64_t seed;
} inf_sample_opts;
void inf_sample_opts_default(inf_sample_opts *o); // greedy, top_k 0, top_p 1, seed 0
// MOLT_EARG naming the field when a value is out of range.
molt_status inf_sample_opts_check(const inf_sample_opts *o);

typedef struct {
    inf_sample_opts o;
    ag_rng rng;
    int64_t cap;   // capacity of the scratch below
    double *w;     // [cap] unnormalized probabilities per token id
    int32_t *cand; // [cap] candidate ids, most probable first after filtering
    double *prob;  // [cap] their final probabilities (sum 1)
    int64_t n_cand;
} inf_sampler;

molt_status inf_sampler_init(inf_sampler *s, const inf_sample_opts *o);
void inf_sampler_free(inf_sampler *s);
// The distribution the next draw would use: *n candidates, ids (*ids)[0..n) most probable
// first (for temperature 0: the argmax alone) with probabilities (*probs)[0..n) summing to
// 1. The arrays live in the sampler until its next call. MOLT_EARG for V < 1 or a NaN logit.
molt_status inf_sample_dist(inf_sampler *s, const float *logits, int64_t V, int64_t *n,
                            const int32_t **ids, const double **probs);
// Draws the next token from logits [V] (advances the generator unless greedy).
molt_status inf_sample(inf_sampler *s, const float *logits, int64_t V, int32_t *tok);
// Index of the largest value (first on ties), as torch.argmax.
int32_t inf_argmax(const float *x, int64_t n);
// The same index (the greedy draw), or -1 when x holds a NaN. Thread-safe.
int32_t inf_argmax_no_nan(const float *x, int64_t n);

// ---- generation (generate.c) --------------------------------------------------------
typedef void (*inf_text_fn)(void *user, const char *text, size_t n);

typedef struct {
    int max_tokens;              // tokens to generate at most
    inf_sample_opts sample;
    mdl_attn_mode prefill_mode;  // attention of the prompt (default expanded: many queries)
    mdl_attn_mode decode_mode;   // attention of each new token (default absorbed)
    bool stop_at_eos;            // stop after any eos id of the config or `eos` (default on)
    int32_t eos;                 // one more stop id (the tokenizer's </s>), -1 for none
    const tok_tokenizer *tok;    // decodes tokens for on_text (NULL: no text)
    inf_text_fn on_text;         // receives complete UTF-8 pieces as they are produced
    void *user;
    int block_tokens;            // cache block size (0 = default)
    const mdl_bank *bank;        // adapters (NULL: an empty bank of one slot is made)
    int slot;                    // the bank slot to use, -1 for the base (default)
} inf_gen_opts;
void inf_gen_opts_default(inf_gen_opts *o);

typedef struct {
    int n_prompt, n_gen;
    bool stopped_at_eos;
    double prefill_s, decode_s; // wall time of the prompt and of the decode steps
} inf_gen_stats;

// Generates up to o->max_tokens tokens after prompt[0..n_prompt) into out (room for
// max_tokens), *n_out the count (an eos that stopped it is included in out but not in the
// text). It runs the batched forward of the server (mdl_forward_spans with a bank; the
// prompt in the prefill form, each new token in the decode form), so a request served by
// `molt serve` gives the same tokens as this for the same prompt, adapter and sampling. Streams text through o->on_text, holding back bytes of a UTF-8 character split
// across tokens until it is complete (the rest is flushed at the end).
molt_status inf_generate(const mdl_model *m, const int32_t *prompt, int n_prompt,
                         const inf_gen_opts *o, int32_t *out, int *n_out, inf_gen_stats *st);

// The prompt's ids: with chat, one user turn through the chat template (v15, reasoning
// none: <s>[MODEL_SETTINGS]...[/MODEL_SETTINGS][INST]text[/INST]); else the tokenizer's
// <s> (when it has one) and the plain text. Appends to out.
molt_status inf_prompt_ids(const tok_tokenizer *t, const char *text, size_t len, bool chat,
                           tok_ids *out);

// Incremental UTF-8 output: bytes in, complete characters out.
typedef struct {
    char *buf;
    size_t n, cap;
} inf_utf8;
// Appends bytes and returns how many leading bytes of the buffer are ready to emit
// (everything except an unfinished multi-byte character at the end).
molt_status inf_utf8_push(inf_utf8 *u, const char *bytes, size_t n, size_t *ready);
void inf_utf8_consume(inf_utf8 *u, size_t n); // drops the first n bytes
void inf_utf8_free(inf_utf8 *u);

// ---- commands (cli.c) ---------------------------------------------------------------
int inf_cmd_generate(int argc, char **argv);       // molt generate
int inf_cmd_bench_generate(int argc, char **argv); // molt bench generate

// Loads an adapter (PEFT directory or molt adapter file) onto m for inference; the handle
// goes to inf_adapter_detach, which takes it off again.
molt_status inf_adapter_attach(mdl_model *m, const char *path, void **handle);
void inf_adapter_detach(void *handle);
// Loads an adapter (PEFT directory, molt adapter file or training checkpoint) into slot s of
// bank b without touching m; inf_adapter_detach frees it (clear the slot first).
molt_status inf_adapter_bank(mdl_model *m, const char *path, mdl_bank *b, int s, void **handle);
int inf_cmd_forward(int argc, char **argv); // molt forward (with --adapter)

#endif
