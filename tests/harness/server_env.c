// tests/harness/server_env.c: the shared set-up of the server's tests (server_env.h).
#define _XOPEN_SOURCE 700 // mkdtemp
#include "server_env.h"

#include <check.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "harness.h"

static char tok_path[4096];

const char *srv_env_tokenizer(void) {
    if (!*tok_path) {
        const char *src = getenv("MOLT_SOURCE_DIR");
        snprintf(tok_path, sizeof tok_path, "%s/configs/tokenizers/tekken.json", src ? src : ".");
    }
    return tok_path;
}


void srv_env_start(srv_env *f, void (*tweak)(srv_opts *o, srv_env *f)) {
    memset(f, 0, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/molt_srv_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(f->dir));
    eng_opts eo;
    eng_opts_default(&eo);
    eo.model_dir = f->dir;
    eo.tokenizer = srv_env_tokenizer();
    eo.max_model_len = 256;
    ck_assert_ok(eng_create(&eo, &f->e));
    ck_assert_ok(eng_start(f->e));
    srv_opts so;
    srv_opts_default(&so);
    so.port = 0;
    so.model_name = "base";
    so.model_path = "/models/base";
    so.access_log = NULL;
    if (tweak)
        tweak(&so, f);
    ck_assert_ok(srv_start(f->e, &so, &f->s));
    f->port = srv_port(f->s);
    ck_assert_int_gt(f->port, 0);
}

void srv_env_stop(srv_env *f) {
    srv_drain(f->s, 5);
    eng_shutdown(f->e, 0);
    srv_free(f->s);
    eng_free(f->e);
    if (f->log)
        fclose(f->log);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", f->dir);
    ck_assert_int_eq(system(cmd), 0);
}

// POST a JSON body (or GET when body is NULL); returns the status, *out the parsed body.
int srv_env_call(srv_env *f, const char *method, const char *path, const char *body,
                const char *extra, json_t **out, hc_resp *raw) {
    hc_resp r;
    ck_assert_int_eq(hc_request(f->port, method, path, extra, body, body ? strlen(body) : 0,
                                &r), 0);
    if (out)
        *out = json_loads(r.body, 0, NULL);
    int st = r.status;
    if (raw)
        *raw = r;
    else
        hc_free(&r);
    return st;
}

json_t *srv_env_post_ok(srv_env *f, const char *path, const char *body) {
    json_t *j;
    hc_resp raw;
    int st = srv_env_call(f, "POST", path, body, NULL, &j, &raw);
    ck_assert_msg(st == 200, "%s %s -> %d %s", path, body, st, raw.body);
    hc_free(&raw);
    ck_assert_ptr_nonnull(j);
    return j;
}

// The ids the server builds for a text prompt: <s> then the text.
tok_ids srv_env_prompt_ids(srv_env *f, const char *text) {
    tok_ids ids = {0};
    const tok_tokenizer *t = eng_tokenizer(f->e);
    ck_assert_ok(tok_ids_push(&ids, tok_bos(t)));
    ck_assert_ok(tok_encode(t, text, strlen(text), &ids));
    return ids;
}

// Text of the fake engine's greedy output for prompt ids (shift per adapter), k tokens,
// special tokens left out.
char *srv_env_expected(srv_env *f, const tok_ids *p, int k, int shift) {
    const tok_tokenizer *t = eng_tokenizer(f->e);
    char *buf = NULL;
    size_t len = 0;
    ck_assert_ok(tok_decode(t, NULL, 0, &buf, &len));
    for (int i = 0; i < k; i++) {
        int32_t id = p->ids[((int)p->n - 1 - i) % (int)p->n] + shift;
        if (!tok_is_special(t, id))
            ck_assert_ok(tok_decode(t, &id, 1, &buf, &len));
    }
    return buf;
}

const char *srv_env_ctext(const json_t *resp, int i) {
    return json_string_value(json_object_get(json_array_get(json_object_get(resp, "choices"), i),
                                             "text"));
}

const char *srv_env_cfield(const json_t *resp, int i, const char *k) {
    return json_string_value(json_object_get(json_array_get(json_object_get(resp, "choices"), i),
                                             k));
}

long long srv_env_usage(const json_t *resp, const char *k) {
    return json_integer_value(json_object_get(json_object_get(resp, "usage"), k));
}

void srv_env_touch(const char *path) {
    FILE *fp = fopen(path, "w");
    ck_assert_ptr_nonnull(fp);
    fclose(fp);
}

void srv_env_sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

bool srv_env_wait(bool (*cond)(long), long arg, double seconds) {
    for (int i = 0; i < (int)(seconds * 100); i++) {
        if (cond(arg))
            return true;
        srv_env_sleep_ms(10);
    }
    return cond(arg);
}
bool srv_env_live_zero(long unused) {
    (void)unused;
    return fake_eng_live() == 0;
}

