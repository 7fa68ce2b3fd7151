// tests/fuzz/fuzz_checkpoint.c: libFuzzer target for the checkpoint reader (ckpt_read, here
// through ckpt_read_memory). Before each input is read, the SHA-256 in its header is
// recomputed over the rest of the input, as someone crafting a checkpoint would, so that
// mutations reach the manifest and the data instead of stopping at the checksum. A read
// that succeeds must hold a consistent state (names, shapes, sizes, lookups by name).
//
// Seeds (tests/fuzz/corpus/fuzz_checkpoint/) are real checkpoints written by ckpt_write;
// running this binary with MOLT_FUZZ_WRITE_SEEDS=DIR writes them again into DIR and exits.
// Built only with MOLT_FUZZ=ON (clang); tests/test_ckpt_crafted.c replays the seeds always.
#define _GNU_SOURCE // memmem
#include "common/sha256.h"
#include "train/train.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

// Three small states: every kind of entry, empty and odd values, a wider tensor.
static void seed_state(ckpt_state *s, int k) {
    ckpt_state_init(s);
    s->step = 3 + k;
    float a[8] = {1.5f, -0.0f, 1e-45f, INFINITY, NAN, -3.25e30f, (float)k, 0.25f};
    int64_t sh[3] = {2, 2, 2}, one = 1;
    ckpt_set_tensor(s, "layers.0.self_attn.q_a_proj.lora_A", k + 1, sh, a);
    ckpt_set_tensor(s, "adam_m.layers.0.self_attn.q_a_proj.lora_A", 1, &one, a + 5);
    ckpt_set_int(s, "train.step", s->step);
    ckpt_set_int(s, "adam_step.x", INT64_MIN + k);
    ckpt_set_float(s, "sched.lr_max", 1e-4 * (k + 1));
    uint8_t rng[32];
    for (int i = 0; i < 32; i++)
        rng[i] = (uint8_t)(i * 37 + k);
    ckpt_set_blob(s, "rng.dropout", rng, k == 1 ? 0 : sizeof rng);
    ckpt_set_string(s, "config.resolved", "model:\n  path: \"/m\"\nadapter:\n  spec: \"r=4\"\n");
}

static void write_seeds(const char *out) {
    char tmp[] = "/tmp/molt-fuzz-seeds-XXXXXX";
    if (!mkdtemp(tmp))
        exit(1);
    for (int k = 0; k < 3; k++) {
        ckpt_state s;
        seed_state(&s, k);
        char *path = NULL, dst[4096], cmd[8400];
        if (ckpt_write(tmp, &s, 0, &path) != MOLT_OK) {
            fprintf(stderr, "%s\n", molt_err_msg());
            exit(1);
        }
        snprintf(dst, sizeof dst, "%s/seed-%d.h5", out, k);
        snprintf(cmd, sizeof cmd, "cp '%s' '%s'", path, dst);
        if (system(cmd) != 0)
            exit(1);
        molt_free(path);
        ckpt_state_free(&s);
    }
    char cmd[200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
    exit(system(cmd) == 0 ? 0 : 1);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *out = getenv("MOLT_FUZZ_WRITE_SEEDS");
    if (out && *out)
        write_seeds(out);
    return 0;
}

static void check_state(const ckpt_state *s) {
    for (int i = 0; i < s->n_tensors; i++) {
        const ckpt_tensor *t = &s->tensors[i];
        int64_t n = 1;
        for (int d = 0; d < t->ndim; d++)
            n *= t->shape[d];
        MOLT_ASSERT(t->ndim >= 1 && t->ndim <= AG_MAX_DIMS && n == t->numel);
        MOLT_ASSERT(strlen(t->name) > 0 && !strchr(t->name, '/'));
        MOLT_ASSERT(ckpt_get_tensor(s, t->name) == t);
        float sum = 0; // touches every element: ASan checks the allocation's extent
        for (int64_t j = 0; j < t->numel; j++)
            sum += t->data[j];
        MOLT_ASSERT(sum == sum || isnan(sum));
    }
    for (int i = 0; i < s->n_blobs; i++) {
        MOLT_ASSERT(s->blobs[i].data[s->blobs[i].len] == 0);
        MOLT_ASSERT(ckpt_get_blob(s, s->blobs[i].name) == &s->blobs[i]);
    }
    for (int i = 0; i < s->n_ints; i++) {
        int64_t v;
        MOLT_ASSERT(ckpt_get_int(s, s->ints[i].name, &v) == MOLT_OK);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *b = malloc(size ? size : 1);
    if (!b)
        return 0;
    memcpy(b, data, size);
    // reseal: the header's sha256 line made to match the bytes after the header
    if (size >= CKPT_HEADER_BYTES) {
        char hex[65];
        molt_sha256_hex(b + CKPT_HEADER_BYTES, size - CKPT_HEADER_BYTES, hex);
        uint8_t *at = memmem(b, CKPT_HEADER_BYTES, "\nsha256 ", 8);
        if (at && at + 8 + 64 <= b + CKPT_HEADER_BYTES)
            memcpy(at + 8, hex, 64);
    }
    ckpt_state s;
    molt_status st = ckpt_read_memory(b, size, "fuzz", &s);
    if (st == MOLT_OK)
        check_state(&s);
    else
        MOLT_ASSERT(strncmp(molt_err_msg(), "checkpoint fuzz: ", 17) == 0 &&
                    s.n_tensors == 0 && s.n_blobs == 0);
    ckpt_state_free(&s);
    free(b);
    return 0;
}
