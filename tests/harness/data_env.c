// tests/harness/data_env.c: shared set-up of the data-module tests (see data_env.h).
#include "data_env.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

void data_env_open(data_env *e, const char *tag) {
    const char *root = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/tokenizers/tekken.json", root ? root : ".");
    if (tok_load(path, &e->tok) != MOLT_OK || chat_template_new(e->tok, NULL, &e->ct) != MOLT_OK) {
        fprintf(stderr, "cannot load %s: %s\n", path, molt_err_msg());
        exit(1);
    }
    snprintf(e->dir, sizeof e->dir, "/tmp/molt-test-%s-XXXXXX", tag);
    if (!mkdtemp(e->dir)) {
        perror("mkdtemp");
        exit(1);
    }
}

void data_env_close(data_env *e) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", e->dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", e->dir);
    chat_template_free(e->ct);
    tok_free(e->tok);
}

const char *data_env_path(const data_env *e, const char *name) {
    static char buf[8][256];
    static int k;
    k = (k + 1) % 8;
    snprintf(buf[k], sizeof buf[k], "%s/%s", e->dir, name);
    return buf[k];
}
