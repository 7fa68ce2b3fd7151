// infer/eval/run_internal.h: what the runner's files share (records.c reads and tokenizes a
// dataset for its task; run.c drives the engine). Not a public API: include eval.h.
#ifndef MOLT_INFER_EVAL_RUN_INTERNAL_H
#define MOLT_INFER_EVAL_RUN_INTERNAL_H

#include "eval.h"

#include "../../data/data.h"
#include "../infer.h"

// One example, as every system runs it.
typedef struct {
    char *id, *category;
    char *target;        // generate: the reference text; NULL otherwise
    char *where;         // FILE:LINE:1 of its record
    int32_t *ids;        // loss: the example; choice: the context; generate: the prompt
    int n;
    uint8_t *mask;       // loss: the training mask (ids[i] trained when mask[i])
    int n_choices;       // choice
    int32_t **choice_ids;
    int *choice_n;
    int *choice_chars;   // characters of each choice's text (acc_norm)
    int answer;
} ev_item;

typedef struct {
    ev_item *it;
    int64_t n, cap;
    int64_t bad; // records skipped
} ev_items;

typedef struct {
    ev_task task;
    const chat_template *ct;
    const tok_tokenizer *tok;
    int max_len;    // the model's context length (records longer are bad)
    int max_tokens; // generate: room left for the answer
    int64_t limit;  // records to keep at most (0: all)
    bool skip_bad;
} ev_read_ctx;

// Reads and tokenizes every record of path for x->task. A bad record is MOLT_EFORMAT with
// "FILE:LINE:1: what" unless x->skip_bad (then counted in out->bad). No usable record:
// MOLT_EFORMAT. On failure *out is empty (bad still counted).
molt_status ev_items_read(const ev_read_ctx *x, const char *path, ev_items *out);
void ev_items_free(ev_items *v);

#endif
