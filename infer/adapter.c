// infer/adapter.c: applying an adapter (PEFT directory or molt adapter file) to a loaded
// base for inference, and `molt forward` with --adapter. The model module runs the forward
// command; the adapter loading it cannot see (adapters sit above model/) comes from here.
#include "infer.h"

#include "../adapters/adapters.h"

molt_status inf_adapter_attach(mdl_model *m, const char *path, void **handle) {
    lora_adapter *ad = molt_calloc(1, sizeof *ad);
    if (!ad)
        return molt_err(MOLT_ENOMEM, "adapter %s: out of memory", path);
    molt_status st = lora_load_any(m, path, LORA_WIRE_FORWARD, ad);
    if (st != MOLT_OK) {
        molt_free(ad);
        return st; // the message already names the adapter path
    }
    *handle = ad;
    return MOLT_OK;
}

molt_status inf_adapter_bank(mdl_model *m, const char *path, mdl_bank *b, int s,
                             void **handle) {
    lora_adapter *ad = molt_calloc(1, sizeof *ad);
    if (!ad)
        return molt_err(MOLT_ENOMEM, "adapter %s: out of memory", path);
    molt_status st = lora_load_any(m, path, LORA_WIRE_NONE, ad);
    if (st == MOLT_OK && (st = lora_bank_put(ad, m, b, s)) != MOLT_OK)
        lora_detach(ad);
    if (st != MOLT_OK) {
        molt_free(ad);
        return st;
    }
    *handle = ad;
    return MOLT_OK;
}

void inf_adapter_detach(void *handle) {
    if (!handle)
        return;
    lora_detach(handle);
    molt_free(handle);
}

int inf_cmd_forward(int argc, char **argv) {
    static const mdl_adapter_hook hook = {inf_adapter_attach, inf_adapter_detach};
    return mdl_cmd_forward(argc, argv, &hook);
}
