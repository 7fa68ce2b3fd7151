// data/pack.c: the batch loader. Inputs are interleaved by weight with counter-based draws
// (a draw depends only on seed, epoch and draw number), examples are gathered into windows of
// shuffle_window, shuffled, packed first-fit-decreasing into rows of max_seq_len (or one per
// padded row) and handed out as fixed-shape batches. Everything a window contains follows
// from the state at its start, so the cursor is that state plus the rows already returned.
// Not here: record parsing (dataset.c), cursor bytes (ds_cursor.c).
#include "ds_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    ds_source src;     // open while the input has a pass in progress
    uint64_t pass;     // current pass over the input in this epoch
    uint64_t n_passes; // ceil(weight)
    bool done;         // every pass of this epoch is over
} input;

struct ds_loader {
    ds_config cfg;
    char *paths[DS_MAX_INPUTS];
    input in[DS_MAX_INPUTS];
    uint64_t config_hash;
    int32_t pad_id;
    // position
    uint64_t epoch, window, batches, mix_step, epoch_examples;
    ds_cursor start;   // state at the start of the current window
    bool have_window;  // rows below come from window `window`
    bool exhausted;    // the inputs ran out while that window was read
    uint64_t bad_closed[DS_BAD_COUNT], trunc_closed; // counts of finished passes
    uint64_t bytes_closed;                           // bytes read by finished passes
    // the window: examples, and rows as lists of example indices
    ds_example *ex;
    size_t n_ex, cap_ex;
    size_t *order;   // (n_ex) example indices; once rows are built, the order of the rows
    size_t *aux;     // (n_ex) scratch
    size_t *items;   // (n_ex) example indices, row after row
    size_t *row_off; // (n_rows + 1) row r holds items[row_off[r] .. row_off[r + 1])
    size_t *row_fill; // (n_ex) tokens in each row while packing, then write positions
    uint64_t *keys;  // (n_ex) sort keys
    size_t n_rows, rows_done;
};

void ds_config_default(ds_config *c) {
    *c = (ds_config){.format = DS_FORMAT_AUTO, .on_bad = DS_ON_BAD_STOP, .batch_rows = 1,
                     .pack = true, .shuffle = true, .shuffle_window = 1024};
}

molt_status ds_on_bad_parse(const char *s, ds_on_bad *out) {
    static const char *const names[] = {"stop", "skip", "truncate"};
    for (int i = 0; i < 3; i++)
        if (!strcmp(s, names[i])) {
            *out = (ds_on_bad)i;
            return MOLT_OK;
        }
    return molt_err(MOLT_EARG, "unknown bad-record policy '%s' (expected stop, skip or "
                               "truncate)", s);
}

static uint64_t hash_str(uint64_t h, const char *s) {
    for (; *s; s++)
        h = ds_mix64(h, (unsigned char)*s);
    return ds_mix64(h, 0xFF);
}

// Everything that shapes the batch sequence apart from the seed.
static uint64_t config_hash(const ds_config *c) {
    const chat_opts *o = chat_template_opts(c->chat);
    const tok_tokenizer *t = chat_template_tokenizer(c->chat);
    uint64_t h = ds_mix64((uint64_t)c->n_inputs, DS_CURSOR_VERSION);
    for (int i = 0; i < c->n_inputs; i++) {
        uint64_t w;
        memcpy(&w, &c->inputs[i].weight, sizeof w);
        h = ds_mix64(hash_str(h, c->inputs[i].path), w);
    }
    uint64_t v[] = {(uint64_t)c->format, (uint64_t)c->on_bad, (uint64_t)c->max_seq_len,
                    (uint64_t)c->batch_rows, c->pack, c->shuffle, (uint64_t)c->shuffle_window,
                    c->max_line, (uint64_t)o->version, o->train_last_only, o->train_on_inputs,
                    tok_vocab_size(t)};
    for (size_t i = 0; i < sizeof v / sizeof *v; i++)
        h = ds_mix64(h, v[i]);
    h = hash_str(h, o->reasoning_default ? o->reasoning_default : "-");
    if (c->holdout_frac > 0) { // mixed in only when set: cursors taken without a split stay valid
        uint64_t f;
        memcpy(&f, &c->holdout_frac, sizeof f);
        h = ds_mix64(ds_mix64(ds_mix64(h, f), c->holdout_seed), 2 + (uint64_t)c->holdout_keep);
    }
    return hash_str(h, tok_kind(t));
}

static molt_status check_config(const ds_config *c) {
    if (c->n_inputs < 1 || c->n_inputs > DS_MAX_INPUTS)
        return molt_err(MOLT_EARG, "data loader: %d inputs (expected 1 to %d)", c->n_inputs,
                        DS_MAX_INPUTS);
    for (int i = 0; i < c->n_inputs; i++)
        if (!c->inputs[i].path || !(c->inputs[i].weight > 0) || !isfinite(c->inputs[i].weight))
            return molt_err(MOLT_EARG, "data loader: input %d (%s) needs a path and a weight > "
                            "0", i, c->inputs[i].path ? c->inputs[i].path : "no path");
    if (!c->chat)
        return molt_err(MOLT_EARG, "data loader: no chat template");
    if (c->max_seq_len < 2 || c->batch_rows < 1 || c->shuffle_window < 1)
        return molt_err(MOLT_EARG, "data loader: max_seq_len %d, batch_rows %d, shuffle_window "
                        "%d (expected >= 2, >= 1, >= 1)", c->max_seq_len, c->batch_rows,
                        c->shuffle_window);
    if (!(c->holdout_frac >= 0 && c->holdout_frac < 1))
        return molt_err(MOLT_EARG, "data loader: hold-out fraction %g (expected 0 <= f < 1)",
                        c->holdout_frac);
    return MOLT_OK;
}

// ---- inputs and the interleave ----------------------------------------------------------

static void close_input(ds_loader *l, int i) {
    input *in = &l->in[i];
    if (!in->src.r)
        return;
    for (int k = 0; k < DS_BAD_COUNT; k++)
        l->bad_closed[k] += in->src.bad[k];
    l->trunc_closed += in->src.truncated;
    l->bytes_closed += ds_reader_bytes(in->src.r);
    ds_source_close(&in->src);
}

// Opens pass `pass` of input i at pos (or marks the input done after its last pass).
static molt_status open_pass(ds_loader *l, int i, uint64_t pass, ds_pos pos) {
    input *in = &l->in[i];
    close_input(l, i);
    in->pass = pass;
    in->done = pass >= in->n_passes;
    if (in->done)
        return MOLT_OK;
    double w = l->cfg.inputs[i].weight;
    in->src = (ds_source){.ct = l->cfg.chat, .format = l->cfg.format, .on_bad = l->cfg.on_bad,
                          .max_seq_len = l->cfg.max_seq_len, .max_line = l->cfg.max_line,
                          .keep_frac = (double)pass + 1 <= w ? 1.0 : w - floor(w),
                          .keep_key = ds_mix64(ds_mix64(l->cfg.seed, l->epoch),
                                               ds_mix64((uint64_t)i, pass)),
                          .holdout_frac = l->cfg.holdout_frac,
                          .holdout_seed = l->cfg.holdout_seed,
                          .holdout_keep = l->cfg.holdout_keep};
    MOLT_TRY(ds_source_open(&in->src, l->cfg.inputs[i].path));
    if (pos.member || pos.line)
        MOLT_TRY(ds_reader_seek(in->src.r, pos));
    return MOLT_OK;
}

// The next example of the interleave into ex; *got = false when every input is done.
static molt_status next_example(ds_loader *l, ds_example *ex, bool *got) {
    *got = false;
    for (;;) {
        double total = 0;
        for (int i = 0; i < l->cfg.n_inputs; i++)
            total += l->in[i].done ? 0 : l->cfg.inputs[i].weight;
        if (total == 0)
            return MOLT_OK;
        uint64_t h = ds_mix64(ds_mix64(l->cfg.seed ^ 0x5EEDull, l->epoch), l->mix_step++);
        double u = ds_unit(h) * total;
        int pick = -1;
        for (int i = 0; i < l->cfg.n_inputs; i++) {
            if (l->in[i].done)
                continue;
            pick = i;
            u -= l->cfg.inputs[i].weight;
            if (u < 0)
                break;
        }
        bool end;
        MOLT_TRY(ds_source_next(&l->in[pick].src, ex, &end));
        if (!end) {
            *got = true;
            return MOLT_OK;
        }
        MOLT_TRY(open_pass(l, pick, l->in[pick].pass + 1, (ds_pos){0, 0}));
    }
}

// ---- windows ----------------------------------------------------------------------------

static void snapshot(const ds_loader *l, ds_cursor *c) {
    memset(c, 0, sizeof *c);
    c->version = DS_CURSOR_VERSION;
    c->n_inputs = (uint32_t)l->cfg.n_inputs;
    c->seed = l->cfg.seed;
    c->config_hash = l->config_hash;
    c->epoch = l->epoch;
    c->window = l->window;
    c->mix_step = l->mix_step;
    for (int i = 0; i < l->cfg.n_inputs; i++) {
        const input *in = &l->in[i];
        c->in_pass[i] = in->pass;
        c->in_pos[i] = in->done ? (ds_pos){0, 0} : ds_reader_tell(in->src.r);
    }
    for (int k = 0; k < DS_BAD_COUNT; k++) {
        c->bad[k] = l->bad_closed[k];
        for (int i = 0; i < l->cfg.n_inputs; i++)
            c->bad[k] += l->in[i].src.r ? l->in[i].src.bad[k] : 0;
    }
    c->truncated = l->trunc_closed;
    for (int i = 0; i < l->cfg.n_inputs; i++)
        c->truncated += l->in[i].src.r ? l->in[i].src.truncated : 0;
}

static molt_status grow_window(ds_loader *l, size_t need) {
    if (need <= l->cap_ex)
        return MOLT_OK;
    size_t cap = l->cap_ex ? 2 * l->cap_ex : 64;
    while (cap < need)
        cap *= 2;
    ds_example *ex = molt_realloc(l->ex, cap * sizeof *ex);
    if (!ex)
        return molt_err(MOLT_ENOMEM, "data loader: out of memory for a window of %zu", cap);
    memset(ex + l->cap_ex, 0, (cap - l->cap_ex) * sizeof *ex);
    l->ex = ex;
    size_t **arr[5] = {&l->order, &l->aux, &l->items, &l->row_off, &l->row_fill};
    for (int k = 0; k < 5; k++) {
        size_t *q = molt_realloc(*arr[k], (cap + 1) * sizeof *q);
        if (!q)
            return molt_err(MOLT_ENOMEM, "data loader: out of memory for a window of %zu", cap);
        *arr[k] = q;
    }
    uint64_t *keys = molt_realloc(l->keys, cap * sizeof *keys);
    if (!keys)
        return molt_err(MOLT_ENOMEM, "data loader: out of memory for a window of %zu", cap);
    l->keys = keys;
    l->cap_ex = cap; // only now: every array holds cap entries
    return MOLT_OK;
}

// Deterministic Fisher-Yates from a counter-based stream keyed by key.
static void shuffle(size_t *v, size_t n, uint64_t key) {
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(ds_unit(ds_mix64(key, i)) * (double)i);
        size_t t = v[i - 1];
        v[i - 1] = v[j];
        v[j] = t;
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

// First-fit decreasing of the (shuffled) examples in order[] into rows of max_seq_len.
static void pack_rows(ds_loader *l) {
    size_t n = l->n_ex, cap = (size_t)l->cfg.max_seq_len, n_rows = 0;
    // longest first, equal lengths in shuffled order: sort keys (cap - length, shuffled rank)
    for (size_t k = 0; k < n; k++)
        l->keys[k] = (uint64_t)(cap - l->ex[l->order[k]].n) << 32 | k;
    qsort(l->keys, n, sizeof *l->keys, cmp_u64);
    for (size_t k = 0; k < n; k++)
        l->aux[k] = l->order[l->keys[k] & 0xFFFFFFFFu];
    memcpy(l->order, l->aux, n * sizeof *l->order);
    for (size_t k = 0; k < n; k++) { // aux[k]: row of the k-th longest example
        size_t len = l->ex[l->order[k]].n, r = 0;
        while (r < n_rows && l->row_fill[r] + len > cap)
            r++;
        if (r == n_rows)
            l->row_fill[n_rows++] = 0;
        l->row_fill[r] += len;
        l->aux[k] = r;
    }
    memset(l->row_off, 0, (n_rows + 1) * sizeof *l->row_off);
    for (size_t k = 0; k < n; k++)
        l->row_off[l->aux[k] + 1]++;
    for (size_t r = 0; r < n_rows; r++) {
        l->row_off[r + 1] += l->row_off[r];
        l->row_fill[r] = l->row_off[r]; // now the write position of row r
    }
    for (size_t k = 0; k < n; k++)
        l->items[l->row_fill[l->aux[k]]++] = l->order[k];
    l->n_rows = n_rows;
}

// Reads the next window (state at its start saved in l->start) and lays out its rows.
static molt_status build_window(ds_loader *l) {
    snapshot(l, &l->start);
    l->n_ex = l->n_rows = l->rows_done = 0;
    l->exhausted = false;
    while (l->n_ex < (size_t)l->cfg.shuffle_window) {
        MOLT_TRY(grow_window(l, l->n_ex + 1));
        bool got;
        MOLT_TRY(next_example(l, &l->ex[l->n_ex], &got));
        if (!got) {
            l->exhausted = true;
            break;
        }
        l->n_ex++;
    }
    l->epoch_examples += l->n_ex;
    l->have_window = true;
    uint64_t key = ds_mix64(ds_mix64(l->cfg.seed ^ 0x5A1Full, l->epoch), l->window);
    for (size_t k = 0; k < l->n_ex; k++)
        l->order[k] = k;
    if (l->cfg.shuffle)
        shuffle(l->order, l->n_ex, key);
    if (l->cfg.pack) {
        pack_rows(l);
    } else {
        for (size_t k = 0; k <= l->n_ex; k++)
            l->row_off[k] = k;
        memcpy(l->items, l->order, l->n_ex * sizeof *l->items);
        l->n_rows = l->n_ex;
    }
    for (size_t r = 0; r < l->n_rows; r++) // order[] now says in which order rows go out
        l->order[r] = r;
    if (l->cfg.shuffle && l->cfg.pack)
        shuffle(l->order, l->n_rows, ds_mix64(key, 0xB1A5));
    return MOLT_OK;
}

static molt_status start_epoch(ds_loader *l, uint64_t epoch) {
    l->epoch = epoch;
    l->window = 0;
    l->mix_step = 0;
    l->epoch_examples = 0;
    l->have_window = false;
    for (int i = 0; i < l->cfg.n_inputs; i++)
        MOLT_TRY(open_pass(l, i, 0, (ds_pos){0, 0}));
    return MOLT_OK;
}

// ---- batches ----------------------------------------------------------------------------

static molt_status batch_shape(ds_batch *b, int rows, int seq_len) {
    if (b->ids && b->rows == rows && b->seq_len == seq_len)
        return MOLT_OK;
    ds_batch_free(b);
    size_t n = (size_t)rows * (size_t)seq_len;
    b->ids = molt_malloc(n * sizeof *b->ids);
    b->mask = molt_malloc(n);
    b->segment = molt_malloc(n * sizeof *b->segment);
    b->pos = molt_malloc(n * sizeof *b->pos);
    if (!b->ids || !b->mask || !b->segment || !b->pos) {
        ds_batch_free(b);
        return molt_err(MOLT_ENOMEM, "data loader: out of memory for a %d x %d batch", rows,
                        seq_len);
    }
    b->rows = rows;
    b->seq_len = seq_len;
    return MOLT_OK;
}

void ds_batch_free(ds_batch *b) {
    molt_free(b->ids);
    molt_free(b->mask);
    molt_free(b->segment);
    molt_free(b->pos);
    *b = (ds_batch){0};
}

void ds_batch_labels(const ds_batch *b, int32_t *labels) {
    for (int r = 0; r < b->rows; r++)
        for (int t = 0; t < b->seq_len; t++) {
            size_t i = (size_t)r * (size_t)b->seq_len + (size_t)t;
            bool ok = t + 1 < b->seq_len && b->segment[i] && b->segment[i + 1] == b->segment[i] &&
                      b->mask[i + 1];
            labels[i] = ok ? b->ids[i + 1] : -1;
        }
}

// Writes row `row` of the window into batch row `out` (padding after the examples).
static void write_row(ds_loader *l, ds_batch *b, int out, size_t row) {
    size_t T = (size_t)b->seq_len, t = 0, base = (size_t)out * T;
    int seg = 0;
    for (size_t k = l->row_off[row]; k < l->row_off[row + 1]; k++) {
        const ds_example *e = &l->ex[l->items[k]];
        seg++;
        for (size_t j = 0; j < e->n; j++, t++) {
            b->ids[base + t] = e->ids[j];
            b->mask[base + t] = e->mask[j];
            b->segment[base + t] = seg;
            b->pos[base + t] = (int32_t)j;
            b->n_trained += e->mask[j] != 0;
        }
        b->n_examples++;
    }
    b->n_tokens += (int64_t)t;
    for (; t < T; t++) {
        b->ids[base + t] = l->pad_id;
        b->mask[base + t] = 0;
        b->segment[base + t] = 0;
        b->pos[base + t] = 0;
    }
}

static molt_status no_example(const ds_loader *l) {
    const ds_config *c = &l->cfg;
    // what became of the records: the bad ones skipped, by reason
    uint64_t bad[DS_BAD_COUNT], trunc, total = 0;
    ds_loader_bad_counts(l, bad, &trunc);
    char reasons[400] = "", why[512] = "";
    size_t at = 0;
    for (int k = 0; k < DS_BAD_COUNT && at < sizeof reasons; k++)
        if (bad[k]) {
            at += (size_t)snprintf(reasons + at, sizeof reasons - at, "%s%s %llu",
                                   total ? ", " : "", ds_bad_reason_name((ds_bad_reason)k),
                                   (unsigned long long)bad[k]);
            total += bad[k];
        }
    if (total)
        snprintf(why, sizeof why, " (%llu bad record%s skipped: %s)",
                 (unsigned long long)total, total == 1 ? "" : "s", reasons);
    if (c->holdout_frac > 0)
        return molt_err(MOLT_EFORMAT, "%s%s: no usable example %s the %g hold-out split%s",
                        c->inputs[0].path, c->n_inputs > 1 ? ", ..." : "",
                        c->holdout_keep ? "held out by" : "left outside", c->holdout_frac, why);
    return molt_err(MOLT_EFORMAT, "%s%s: no usable example in the data%s", c->inputs[0].path,
                    c->n_inputs > 1 ? ", ..." : "", why);
}

molt_status ds_loader_next(ds_loader *l, ds_batch *b) {
    MOLT_TRY(batch_shape(b, l->cfg.batch_rows, l->cfg.max_seq_len));
    b->rows_used = b->n_examples = 0;
    b->n_tokens = b->n_trained = 0;
    b->epoch = l->epoch;
    while (b->rows_used < b->rows) {
        if (l->have_window && l->rows_done < l->n_rows) {
            write_row(l, b, b->rows_used++, l->order[l->rows_done++]);
            continue;
        }
        if (l->have_window && l->exhausted) { // the epoch is over
            if (!l->epoch_examples)
                return no_example(l);
            if (b->rows_used)
                break; // a batch never spans two epochs
            MOLT_TRY(start_epoch(l, l->epoch + 1));
            b->epoch = l->epoch;
            continue;
        }
        if (l->have_window)
            l->window++;
        MOLT_TRY(build_window(l));
    }
    // A window used up without the inputs running out may have been the last one (the epoch
    // held a multiple of shuffle_window examples): read ahead so ds_loader_epoch_end knows.
    if (l->rows_done == l->n_rows && !l->exhausted) {
        l->window++;
        MOLT_TRY(build_window(l));
    }
    for (int r = b->rows_used; r < b->rows; r++)
        for (int t = 0; t < b->seq_len; t++) {
            size_t i = (size_t)r * (size_t)b->seq_len + (size_t)t;
            b->ids[i] = l->pad_id;
            b->mask[i] = 0;
            b->segment[i] = b->pos[i] = 0;
        }
    l->batches++;
    return MOLT_OK;
}

// ---- open, cursor, close ----------------------------------------------------------------

molt_status ds_loader_open(const ds_config *c, ds_loader **out) {
    *out = NULL;
    MOLT_TRY(check_config(c));
    ds_loader *l = molt_calloc(1, sizeof *l);
    if (!l)
        return molt_err(MOLT_ENOMEM, "data loader: out of memory");
    l->cfg = *c;
    molt_status st = MOLT_OK;
    for (int i = 0; i < c->n_inputs && st == MOLT_OK; i++) {
        l->paths[i] = molt_strdup(c->inputs[i].path);
        l->cfg.inputs[i].path = l->paths[i];
        l->in[i].n_passes = (uint64_t)ceil(c->inputs[i].weight);
        if (!l->paths[i])
            st = molt_err(MOLT_ENOMEM, "data loader: out of memory");
    }
    const tok_tokenizer *t = chat_template_tokenizer(c->chat);
    l->pad_id = tok_special(t, "<pad>");
    if (l->pad_id < 0)
        l->pad_id = tok_eos(t) >= 0 ? tok_eos(t) : 0;
    l->config_hash = config_hash(&l->cfg);
    if (st == MOLT_OK)
        st = start_epoch(l, 0);
    if (st != MOLT_OK) {
        ds_loader_close(l);
        return st;
    }
    *out = l;
    return MOLT_OK;
}

void ds_loader_close(ds_loader *l) {
    if (!l)
        return;
    for (int i = 0; i < l->cfg.n_inputs; i++) {
        close_input(l, i);
        molt_free(l->paths[i]);
    }
    for (size_t k = 0; k < l->cap_ex; k++)
        ds_example_free(&l->ex[k]);
    molt_free(l->ex);
    molt_free(l->order);
    molt_free(l->aux);
    molt_free(l->items);
    molt_free(l->row_off);
    molt_free(l->row_fill);
    molt_free(l->keys);
    molt_free(l);
}

void ds_loader_cursor(const ds_loader *l, ds_cursor *c) {
    if (l->have_window) {
        *c = l->start;
        c->rows_done = l->rows_done;
    } else { // nothing read yet in this epoch
        snapshot(l, c);
    }
    c->batches = l->batches;
}

molt_status ds_loader_restore(ds_loader *l, const ds_cursor *c) {
    if (c->version != DS_CURSOR_VERSION || c->n_inputs != (uint32_t)l->cfg.n_inputs)
        return molt_err(MOLT_EARG, "data cursor: version %u with %u inputs, loader has version "
                        "%d with %d inputs", c->version, c->n_inputs, DS_CURSOR_VERSION,
                        l->cfg.n_inputs);
    if (c->seed != l->cfg.seed || c->config_hash != l->config_hash)
        return molt_err(MOLT_EARG, "data cursor: taken with other data settings (seed %llu, "
                        "settings %016llx; now seed %llu, settings %016llx)",
                        (unsigned long long)c->seed, (unsigned long long)c->config_hash,
                        (unsigned long long)l->cfg.seed, (unsigned long long)l->config_hash);
    l->epoch = c->epoch;
    l->window = c->window;
    l->mix_step = c->mix_step;
    l->batches = c->batches;
    l->epoch_examples = c->window > 0 || c->rows_done > 0; // examples came before (else 0)
    for (int i = 0; i < l->cfg.n_inputs; i++) {
        close_input(l, i);
        MOLT_TRY(open_pass(l, i, c->in_pass[i], c->in_pos[i]));
    }
    memcpy(l->bad_closed, c->bad, sizeof l->bad_closed);
    l->trunc_closed = c->truncated;
    MOLT_TRY(build_window(l));
    if (c->rows_done > l->n_rows)
        return molt_err(MOLT_EFORMAT, "data cursor: %llu rows done but the window has %zu (the "
                        "data changed?)", (unsigned long long)c->rows_done, l->n_rows);
    l->rows_done = (size_t)c->rows_done;
    return MOLT_OK;
}

void ds_loader_bad_counts(const ds_loader *l, uint64_t bad[DS_BAD_COUNT], uint64_t *truncated) {
    ds_cursor c;
    snapshot(l, &c);
    memcpy(bad, c.bad, sizeof c.bad);
    *truncated = c.truncated;
}

bool ds_loader_epoch_end(const ds_loader *l) {
    return l->have_window && l->exhausted && l->rows_done == l->n_rows;
}

uint64_t ds_loader_bytes(const ds_loader *l) {
    uint64_t n = l->bytes_closed;
    for (int i = 0; i < l->cfg.n_inputs; i++)
        n += l->in[i].src.r ? ds_reader_bytes(l->in[i].src.r) : 0;
    return n;
}
