// data/ds_bench.c: end-to-end throughput of the data pipeline (JSONL in any supported
// container -> chat template -> packed batches), for `molt bench tokenize` and
// `molt data bench`. Not here: tokenizer-only figures (cli_tokenize.c).
#include "ds_internal.h"

#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

molt_status data_bench_pipeline(const char *path, const char *tokenizer, int max_seq_len,
                                int rows, ds_bench_result *out) {
    *out = (ds_bench_result){0};
    tok_tokenizer *t = NULL;
    chat_template *ct = NULL;
    ds_loader *l = NULL;
    ds_batch b = {0};
    MOLT_TRY(tok_load(tokenizer, &t));
    molt_status st = chat_template_new(t, NULL, &ct);
    ds_config c;
    ds_config_default(&c);
    c.inputs[0] = (ds_input){path, 1.0};
    c.n_inputs = 1;
    c.chat = ct;
    c.on_bad = DS_ON_BAD_SKIP;
    c.max_seq_len = max_seq_len;
    c.batch_rows = rows;
    double t0 = now_s();
    if (st == MOLT_OK)
        st = ds_loader_open(&c, &l);
    while (st == MOLT_OK) {
        st = ds_loader_next(l, &b);
        if (st != MOLT_OK)
            break;
        out->batches++;
        out->examples += (uint64_t)b.n_examples;
        out->tokens += (uint64_t)b.n_tokens;
        if (ds_loader_epoch_end(l))
            break;
    }
    if (st == MOLT_OK) {
        out->seconds = now_s() - t0;
        out->bytes = ds_loader_bytes(l);
        double s = out->seconds > 0 ? out->seconds : 1e-9;
        out->examples_per_s = (double)out->examples / s;
        out->mb_per_s = (double)out->bytes / 1e6 / s;
    }
    ds_batch_free(&b);
    ds_loader_close(l);
    chat_template_free(ct);
    tok_free(t);
    return st;
}
