// tests/harness/model_env.h: the set-up the model tests share: the reference file
// tests/fixtures/model/reference.safetensors (made by tools/reference/model_parity.py) and
// tiny models written again by mdl_init_model with its seed into a fresh temporary
// directory, so that their weights are the ones the reference saw.
//
// model_env_open runs in a Check unchecked fixture, once for all the tests of a case: rather
// than fail there, it records what went wrong in err, and each test that needs the set-up
// (model_env_require, model_env_load, model_env_fixture) fails with that message.
#ifndef MOLT_TEST_MODEL_ENV_H
#define MOLT_TEST_MODEL_ENV_H

#include "model/model.h"

#define MODEL_ENV_SEED 1234 // the reference's seed (its models are not in the fixture)

// One model to write: dir/<name>/ holds config.json and model.safetensors (no tokenizer).
typedef struct {
    const char *name;     // directory name; the fixture names that model's tensors after it
    const char *preset;   // preset name, as mdl_init_model takes it
    mdl_save_dtype dtype; // weights as saved (Hugging Face layout)
} model_env_model;

typedef struct {
    st_reader *fix; // the reference file, NULL when it could not be opened
    char dir[256];  // /tmp/molt-TAG-test-XXXXXX, removed by model_env_close
    char err[512];  // what went wrong in model_env_open; empty when nothing did
} model_env;

// Opens the reference file (under MOLT_SOURCE_DIR, or .), makes the directory and writes
// models[0..n-1] into it, in that order, stopping at the first failure.
void model_env_open(model_env *e, const char *tag, const model_env_model *models, int n);
// Closes the reference file and removes the directory (whatever open got to).
void model_env_close(model_env *e);

// Fails the running test when model_env_open did not complete.
void model_env_require(const model_env *e);
// "dir/name" in one of 8 rotating buffers (valid for the next 7 calls).
const char *model_env_path(const model_env *e, const char *name);
// Loads model `name` with mdl_load; fails the running test on any error (or when
// model_env_open did not complete).
void model_env_load(const model_env *e, const char *name, mdl_model *m);

// The reference tensor named by fmt and its arguments; fails the test when it is missing
// (or when model_env_open did not complete).
const st_tensor *model_env_fixture(const model_env *e, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#endif
