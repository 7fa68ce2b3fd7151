// tests/harness/model_env.c: shared set-up of the model tests (see model_env.h).
#include "model_env.h"
#include "harness.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

void model_env_open(model_env *e, const char *tag, const model_env_model *models, int n) {
    *e = (model_env){0};
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/fixtures/model/reference.safetensors", src ? src : ".");
    if (st_open(path, &e->fix) != MOLT_OK) {
        snprintf(e->err, sizeof e->err, "%s", molt_err_msg());
        return;
    }
    snprintf(e->dir, sizeof e->dir, "/tmp/molt-%s-test-XXXXXX", tag);
    if (!mkdtemp(e->dir)) {
        snprintf(e->err, sizeof e->err, "mkdtemp failed");
        e->dir[0] = 0;
        return;
    }
    for (int i = 0; i < n; i++) {
        mdl_init_opts o = {.preset = models[i].preset, .out_dir = model_env_path(e, models[i].name),
                           .seed = MODEL_ENV_SEED, .no_tokenizer = true,
                           .save = {.layout = MDL_LAYOUT_HF, .dtype = models[i].dtype}};
        if (mdl_init_model(&o) != MOLT_OK) {
            snprintf(e->err, sizeof e->err, "init %s: %s", models[i].name, molt_err_msg());
            return;
        }
    }
}

void model_env_close(model_env *e) {
    st_close(e->fix);
    e->fix = NULL;
    if (e->dir[0]) {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", e->dir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", e->dir);
        e->dir[0] = 0;
    }
}

void model_env_require(const model_env *e) {
    ck_assert_msg(e->err[0] == 0, "setup: %s", e->err);
}

const char *model_env_path(const model_env *e, const char *name) {
    static char buf[8][512];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", e->dir, name);
    return buf[k];
}

void model_env_load(const model_env *e, const char *name, mdl_model *m) {
    model_env_require(e);
    ck_assert_ok(mdl_load(model_env_path(e, name), m));
}

const st_tensor *model_env_fixture(const model_env *e, const char *fmt, ...) {
    model_env_require(e);
    char name[128];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const st_tensor *t = st_find(e->fix, name);
    ck_assert_msg(t != NULL, "fixture tensor %s missing", name);
    return t;
}
