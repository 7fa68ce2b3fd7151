// tests/harness/server_env.h: what the server's tests (tests/test_server*.c) share: a fake
// engine (fake_engine.c) behind a server on an ephemeral loopback port, requests over the
// raw-socket client, and the expected output of the fake engine's rules computed with the
// tokenizer directly.
#ifndef MOLT_TESTS_SERVER_ENV_H
#define MOLT_TESTS_SERVER_ENV_H

#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>

#include "fake_engine.h"
#include "http_client.h"
#include "infer/server/server.h"

typedef struct {
    eng_engine *e;
    srv_server *s;
    int port;
    char dir[256]; // scratch directory (adapters, logs), removed by srv_env_stop
    FILE *log;
} srv_env;

// The Tekken tokenizer shipped in configs/ (under $MOLT_SOURCE_DIR).
const char *srv_env_tokenizer(void);
// Fake engine (max_model_len 256) and server (model "base", no log); tweak may change the
// options before the server starts.
void srv_env_start(srv_env *f, void (*tweak)(srv_opts *o, srv_env *f));
void srv_env_stop(srv_env *f);
// One request; returns the status, *out the parsed JSON body (may be NULL), *raw the response
// (may be NULL; hc_free it).
int srv_env_call(srv_env *f, const char *method, const char *path, const char *body,
                 const char *extra, json_t **out, hc_resp *raw);
json_t *srv_env_post_ok(srv_env *f, const char *path, const char *body); // asserts 200
// The ids the server builds for a text prompt: <s> then the text.
tok_ids srv_env_prompt_ids(srv_env *f, const char *text);
// Text of the fake engine's greedy output: k tokens, ids shifted by `shift` (adapter),
// special tokens left out.
char *srv_env_expected(srv_env *f, const tok_ids *p, int k, int shift);
const char *srv_env_ctext(const json_t *resp, int i);                  // choices[i].text
const char *srv_env_cfield(const json_t *resp, int i, const char *k);  // choices[i][k]
long long srv_env_usage(const json_t *resp, const char *k);           // usage[k]
void srv_env_touch(const char *path);
void srv_env_sleep_ms(long ms);
// Polls cond(arg) every 10 ms for up to seconds.
bool srv_env_wait(bool (*cond)(long), long arg, double seconds);
bool srv_env_live_zero(long unused); // the fake engine has no request left

#endif
