// tests/harness/data_env.h: the set-up the data-module tests share: the project's Tekken
// tokenizer, a default chat template and a fresh temporary directory.
#ifndef MOLT_TEST_DATA_ENV_H
#define MOLT_TEST_DATA_ENV_H

#include "data/data.h"

typedef struct {
    tok_tokenizer *tok; // configs/tokenizers/tekken.json under MOLT_SOURCE_DIR (or .)
    chat_template *ct;  // chat_template_new(tok, NULL)
    char dir[64];       // /tmp/molt-test-TAG-XXXXXX, removed by data_env_close
} data_env;

// Loads the tokenizer and template and makes the directory; exits the test program with a
// message when any of them fails (nothing can be tested without them).
void data_env_open(data_env *e, const char *tag);
void data_env_close(data_env *e);
// "dir/name" in one of 8 rotating buffers (valid for the next 7 calls).
const char *data_env_path(const data_env *e, const char *name);

#endif
