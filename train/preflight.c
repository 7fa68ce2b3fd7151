// train/preflight.c: the checks `molt train` makes before it commits to a run: sizes that
// the model or the machine cannot take (positions past max_position_embeddings, a step whose
// activations exceed the memory available), and a resume whose adapter spec differs from
// the checkpoint's. Each is found before anything is loaded, written or overwritten.
//
// Not here: the data checks (they need the tokenizer; trainer.c), the training loop.
#include "trn_internal.h"

#include <stdio.h>
#include <string.h>

#include "../adapters/adapters.h"
#include "../common/sysmem.h"
#include "../model/model.h"

molt_status trn_check_sizes(const trn_config *c) {
    char path[TRN_PATH_MAX + 32];
    MOLT_TRY(mdl_check_dir(c->model));
    snprintf(path, sizeof path, "%s/config.json", c->model);
    mcfg cfg;
    MOLT_TRY(mcfg_load(path, &cfg));
    if (mcfg_check_positions(&cfg, c->max_seq_len, "data.max_seq_len") != MOLT_OK)
        return molt_err_wrap(MOLT_EARG, "config key 'data.max_seq_len' is too large for %s",
                             c->model);
    int64_t tokens = (int64_t)c->batch_size * c->max_seq_len;
    uint64_t need = mdl_step_memory_bytes(&cfg, tokens, true, c->activation_checkpointing);
    uint64_t have = molt_mem_available();
    if (have > 0 && need > have)
        return molt_err(MOLT_ENOMEM, "out of memory: a step of %d x %d tokens needs about "
                        "%.1f GiB of activations, and %.1f GiB of memory are available: lower "
                        "data.max_seq_len or train.batch_size%s", c->batch_size,
                        c->max_seq_len, (double)need / (1 << 30), (double)have / (1 << 30),
                        c->activation_checkpointing ? ""
                                                    : ", or set train.activation_checkpointing");
    return MOLT_OK;
}

// The value of `  spec: "..."` in a resolved configuration (trn_config_yaml's quoting:
// backslash escapes '"' and '\'), into buf.
static bool resolved_spec(const char *yaml, char *buf, size_t cap) {
    const char *p = strstr(yaml, "\n  spec: \"");
    if (!p)
        return false;
    p += strlen("\n  spec: \"");
    size_t n = 0;
    for (; *p && *p != '"' && n + 1 < cap; p++) {
        if (*p == '\\' && p[1])
            p++;
        buf[n++] = *p;
    }
    buf[n] = 0;
    return *p == '"';
}

// The spec's canonical text without what only initialization uses.
static molt_status training_form(const char *text, char *buf, size_t cap) {
    lora_spec s;
    MOLT_TRY(lora_spec_parse(text, &s));
    lora_spec d;
    lora_spec_default(&d);
    s.init = d.init;
    s.seed = d.seed;
    return lora_spec_format(&s, buf, cap);
}

molt_status trn_check_resume_spec(const char *resolved, const char *spec_now,
                                  const char *file) {
    char was[TRN_SPEC_MAX], a[4 * TRN_SPEC_MAX], b[4 * TRN_SPEC_MAX];
    if (!resolved || !resolved_spec(resolved, was, sizeof was))
        return molt_err(MOLT_EFORMAT, "checkpoint %s: its resolved configuration names no "
                        "adapter spec", file);
    if (training_form(was, a, sizeof a) != MOLT_OK)
        return molt_err_wrap(MOLT_EFORMAT, "checkpoint %s: adapter spec", file);
    MOLT_TRY(training_form(spec_now, b, sizeof b));
    if (!strcmp(a, b))
        return MOLT_OK;
    return molt_err(MOLT_EARG, "resume: checkpoint %s was trained with another adapter: "
                    "checkpoint %s; this run %s. Resume with the checkpoint's adapter settings, "
                    "or train into another output_dir", file, a, b);
}
