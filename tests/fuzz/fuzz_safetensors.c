// tests/fuzz/fuzz_safetensors.c: libFuzzer target for the safetensors reader. Feeds each
// input to st_open_memory and, when it opens, walks every tensor (lookup by name, bounds,
// conversion of small float tensors), so ASan sees any read outside the input.
// Built only with MOLT_FUZZ=ON (clang); tests/test_safetensors.c replays the seeds always.
#include "model/model.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

// Converting bounds the work per input: large claimed shapes are already rejected unless
// the input really holds their bytes, and libFuzzer inputs are small.
static void walk(const st_reader *r, const uint8_t *data, size_t size, ag_arena *a) {
    for (int i = 0; i < st_count(r); i++) {
        const st_tensor *t = st_at(r, i);
        const uint8_t *d = t->data;
        MOLT_ASSERT(d >= data && d + t->nbytes <= data + size);
        MOLT_ASSERT(st_find(r, t->name) == t);
        ag_tensor *x;
        if (t->nbytes <= 4096 && st_to_f32(t, 0.5, a, &x) == MOLT_OK)
            MOLT_ASSERT(x->numel == t->numel || (t->ndim == 0 && x->numel == 1));
        double v;
        (void)st_read_scalar(t, &v);
    }
    (void)st_metadata(r, "format");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    st_reader *r = NULL;
    if (st_open_memory(data, size, "fuzz", &r) != MOLT_OK) {
        MOLT_ASSERT(r == NULL && strncmp(molt_err_msg(), "fuzz: ", 6) == 0);
        return 0;
    }
    ag_arena a;
    ag_arena_init(&a, "fuzz", 0);
    walk(r, data, size, &a);
    ag_arena_free(&a);
    st_close(r);
    return 0;
}
