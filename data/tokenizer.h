// data/tokenizer.h: byte-level BPE tokenizers: Mistral's Tekken (tekken.json) and Hugging
// Face tokenizer.json (BPE model). Plain text never yields special tokens; the chat layer
// inserts those by id, looked up by name with tok_special().
//
// A loaded tokenizer is read-only except for an internal memo that tok_encode fills with
// atomic stores: one tokenizer may encode on several threads at once. Ids match the
// reference encoders (mistral-common / tiktoken for Tekken, Hugging Face tokenizers with
// add_special_tokens=False and encode_special_tokens=True for tokenizer.json) on
// tests/fixtures/tokenizer; the few deliberate differences are listed in its README.
#ifndef MOLT_DATA_TOKENIZER_H
#define MOLT_DATA_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/err.h"

typedef struct tok_tokenizer tok_tokenizer;

// A growable id list (grown with molt_realloc; free with tok_ids_free).
typedef struct {
    int32_t *ids;
    size_t n, cap;
} tok_ids;
void tok_ids_free(tok_ids *v);
molt_status tok_ids_push(tok_ids *v, int32_t id);

// Loads tekken.json or tokenizer.json (detected from the content). Errors name the file
// and the field at fault.
molt_status tok_load(const char *path, tok_tokenizer **out);
void tok_free(tok_tokenizer *t);

// Appends the ids of plain text (any bytes; each byte outside valid UTF-8 becomes its own
// one-byte token, and the valid text on either side is encoded as if it were not there).
// tokenizer.json: non-special added tokens are matched as Hugging Face does, special ones
// are text. On failure out is left as it was.
molt_status tok_encode(const tok_tokenizer *t, const char *text, size_t len, tok_ids *out);
// Appends the bytes of ids to *buf (NUL-terminated, length in *len; *buf grown with
// molt_realloc; *buf may start NULL with *len 0). Special tokens are written as their names
// ("[INST]"). An id outside the vocabulary is MOLT_EARG and leaves *buf, *len as they were.
molt_status tok_decode(const tok_tokenizer *t, const int32_t *ids, size_t n, char **buf,
                       size_t *len);
// Id of the special token with this name ("<s>", "[INST]"), or -1 when absent. For a
// tokenizer.json: any added token, special or not, by its text ("<｜User｜>").
int32_t tok_special(const tok_tokenizer *t, const char *name);
// Whether id is a special (control) token, one plain text never yields ("<s>", "[INST]");
// false for ids outside the vocabulary.
bool tok_is_special(const tok_tokenizer *t, int32_t id);
// Ids of the sequence start and end tokens ("<s>", "</s>" for Tekken; for tokenizer.json
// bos_token/eos_token of a tokenizer_config.json beside the file), or -1 when unknown.
int32_t tok_bos(const tok_tokenizer *t);
int32_t tok_eos(const tok_tokenizer *t);
// Vocabulary size (ids are in [0, size)), and which format was loaded.
size_t tok_vocab_size(const tok_tokenizer *t);
const char *tok_kind(const tok_tokenizer *t); // "tekken" or "tokenizer.json"

#endif
