// data/ds_internal.h: helpers shared by the dataset files of data/ (chat template, records,
// reader, loader). Not a public API: the rest of molt uses data/data.h.
#ifndef MOLT_DATA_DS_INTERNAL_H
#define MOLT_DATA_DS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "data.h"

// A growable byte buffer, kept NUL-terminated.
typedef struct {
    char *p;
    size_t n, cap;
} ds_buf;
molt_status ds_buf_put(ds_buf *b, const void *s, size_t n);
molt_status ds_buf_puts(ds_buf *b, const char *s);
void ds_buf_free(ds_buf *b);

// Appends v as Python's json.dumps(v, ensure_ascii=False) writes it: ", " and ": "
// separators, object keys in stored order, UTF-8 kept, control characters escaped, floats in
// their shortest round-trip form ("2.5", "1e-07", "100.0"). This is the JSON text the
// Mistral chat format tokenizes for tools, tool-call arguments and model settings.
molt_status ds_pyjson_dump(const json_t *v, ds_buf *out);

// Byte offset of the first byte that is not part of valid UTF-8 (no overlong forms, no
// surrogates, nothing past U+10FFFF), or len when s is valid.
size_t ds_utf8_check(const char *s, size_t len);

// Appends one id with its mask bit; n ids copied from ids.
molt_status ds_example_push(ds_example *e, int32_t id, uint8_t mask);
molt_status ds_example_append(ds_example *e, const int32_t *ids, size_t n, uint8_t mask);

// Counter-based randomness: a well-mixed 64-bit hash of (a, b), and a double in [0, 1).
uint64_t ds_mix64(uint64_t a, uint64_t b);
double ds_unit(uint64_t h);

// One input read record by record under a bad-record policy (dataset.c). Fill the
// settings, then ds_source_open; counts accumulate until ds_source_close.
typedef struct {
    // settings
    const chat_template *ct;
    ds_format format;
    ds_on_bad on_bad;
    int max_seq_len;   // 0: no length limit
    size_t max_line;   // 0: the reader's default
    double keep_frac;  // < 1: keep a line only when keep_hash(line) < keep_frac (subsampling)
    uint64_t keep_key; // seeds that choice
    double holdout_frac;   // > 0: split lines by ds_holdout_unit (see ds_config)
    uint64_t holdout_seed;
    bool holdout_keep;     // keep the held-out lines (true) or the others (false)
    // state
    ds_reader *r;
    uint64_t bad[DS_BAD_COUNT], truncated, blank;
    uint64_t examples, by_format[DS_FORMAT_COUNT];
} ds_source;
molt_status ds_source_open(ds_source *s, const char *path);
void ds_source_close(ds_source *s);
// Next example into ex (cleared first); *end at the end of the input. A bad record stops with
// MOLT_EFORMAT "FILE[:MEMBER]:LINE:COL: reason" or, under DS_ON_BAD_SKIP, is counted and
// passed over; other failures (I/O, a control token the tokenizer lacks) carry the position.
molt_status ds_source_next(ds_source *s, ds_example *ex, bool *end);

#endif
