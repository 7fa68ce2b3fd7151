// data/data.h: the public API of molt's data module: tokenizers, chat templates, datasets,
// packing and the resumable cursor. Depends on nothing of ours but common/.
//
// Pipeline: JSONL inputs (plain, .gz, .zst, .xz, or .tar/.tar.gz/.zip archives of shards)
// -> records (chat, alpaca, completion or raw text) -> token ids + loss mask (chat template)
// -> mixed across inputs by weight -> shuffled and packed into fixed-shape batches, with a
// cursor that resumes the exact batch sequence.
#ifndef MOLT_DATA_H
#define MOLT_DATA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/err.h"
#include "tokenizer.h"

struct json_t; // jansson's value type; callers that build records include <jansson.h>

// Command-line entry points (called from molt.c); each returns the process exit status.
int data_cmd_tokenize(int argc, char **argv);       // molt tokenize
int data_cmd_data(int argc, char **argv);           // molt data inspect|render|bench
int data_cmd_bench_tokenize(int argc, char **argv); // molt bench tokenize

// ---- examples ---------------------------------------------------------------------------
// One tokenized example: ids and a loss mask of the same length. mask[i] = 1 when ids[i] is
// a training target (the loss at position i-1 predicts it); the leading <s> never is.
typedef struct {
    int32_t *ids;  // (n)
    uint8_t *mask; // (n)
    size_t n, cap;
} ds_example;
void ds_example_clear(ds_example *e); // n = 0, keeps the buffers
void ds_example_free(ds_example *e);
size_t ds_example_trained(const ds_example *e); // number of mask = 1 tokens

// Why a record is bad. Counted per reason when bad records are skipped.
typedef enum {
    DS_BAD_JSON,           // not valid JSON
    DS_BAD_UTF8,           // not valid UTF-8
    DS_BAD_FORMAT_UNKNOWN, // no known format's fields (or not a JSON object)
    DS_BAD_FORMAT_MIXED,   // fields of several formats
    DS_BAD_FIELD_MISSING,  // a required field is absent (or null)
    DS_BAD_FIELD_EMPTY,    // a required field is empty
    DS_BAD_FIELD_INVALID,  // wrong type or value, role order, missing control token
    DS_BAD_TOO_LONG,       // more tokens than max_seq_len (or more bytes than the line cap)
    DS_BAD_COUNT
} ds_bad_reason;
const char *ds_bad_reason_name(ds_bad_reason r); // "invalid JSON", "too long", ...

// ---- chat template (chat.c) -------------------------------------------------------------
// Mistral instruct format, text only: v13 or v15 (v15 adds [MODEL_SETTINGS]).
// <s>[SYSTEM_PROMPT]S[/SYSTEM_PROMPT][AVAILABLE_TOOLS]json[/AVAILABLE_TOOLS]
// [MODEL_SETTINGS]{"reasoning_effort": "none"}[/MODEL_SETTINGS][INST]U[/INST][THINK]T[/THINK]A
// [TOOL_CALLS]name[ARGS]json</s>[TOOL_RESULTS]R[/TOOL_RESULTS]A2</s>[INST]U2[/INST]
typedef enum { CHAT_V13 = 13, CHAT_V15 = 15 } chat_version;

typedef struct {
    chat_version version;          // default CHAT_V15
    const char *reasoning_default; // v15 setting when a record has none: "none" (default)
    bool train_last_only;          // train only the last assistant turn (default: all turns)
    bool train_on_inputs;          // train every token but the leading <s> (weight-0 and,
                                   // with train_last_only, earlier assistant turns excepted)
} chat_opts;
void chat_opts_default(chat_opts *o);

typedef struct chat_template chat_template;

// Resolves the control tokens of the format by name in t (which must outlive the template;
// o may be NULL for the defaults). A token the tokenizer lacks is an error (MOLT_EUNSUPPORTED,
// naming it) only when a record needs it, so raw text works with any tokenizer.
molt_status chat_template_new(const tok_tokenizer *t, const chat_opts *o, chat_template **out);
// Sequence start and end ids (-1 when the tokenizer has none).
int32_t chat_template_bos(const chat_template *ct);
int32_t chat_template_eos(const chat_template *ct);
void chat_template_free(chat_template *ct);
const tok_tokenizer *chat_template_tokenizer(const chat_template *ct);
const chat_opts *chat_template_opts(const chat_template *ct);

// Appends the ids and mask of a chat record {"messages": [...], "tools"?, "reasoning_effort"?}
// to out, starting with <s>. Messages: {"role": system|user|assistant|tool, "content": string
// or [{"type": "text", "text"} | {"type": "thinking", "thinking"}], assistant extras
// "thinking"/"reasoning_content" (string), "tool_calls" ([{"id"?, "function": {"name",
// "arguments": string or JSON}}]), "weight" (0 or 1), "prefix" (true: last turn left open);
// tool extra "tool_call_id"}. Consecutive user messages, and consecutive assistant messages
// of equal weight, are merged as mistral-common does; tool results are ordered as the calls.
// On a bad record returns MOLT_EFORMAT with a message (no file position) and sets *why
// (may be NULL); out then holds a partial example the caller discards.
molt_status chat_encode(const chat_template *ct, const struct json_t *record, ds_example *out,
                        ds_bad_reason *why);

// ---- records (dataset.c) ----------------------------------------------------------------
typedef enum {
    DS_FORMAT_AUTO,       // detected per record from its fields
    DS_FORMAT_CHAT,       // {"messages": [...], "tools"?, "reasoning_effort"?}
    DS_FORMAT_ALPACA,     // {"instruction", "input"?, "output", "system"?}: one chat turn
    DS_FORMAT_COMPLETION, // {"prompt", "completion"}: <s>prompt completion</s>, no template
    DS_FORMAT_TEXT,       // {"text"}: <s>text</s>, all trained
    DS_FORMAT_COUNT
} ds_format;
const char *ds_format_name(ds_format f);                // "auto", "chat", ...
molt_status ds_format_parse(const char *s, ds_format *out); // the inverse; MOLT_EARG else

// What became of one record.
typedef struct {
    ds_format format;  // detected (or forced) format
    ds_bad_reason why; // set when the record is bad
    int col;           // 1-based column of the problem: the byte for UTF-8 errors, jansson's
                       // (character) column for JSON errors, 1 for errors of fields
    bool truncated;    // cut to max_seq_len (DS_ON_BAD_TRUNCATE)
} ds_record_info;

// Turns one JSONL line (no newline) into an example appended to out. max_seq_len > 0 makes
// a longer example bad (DS_BAD_TOO_LONG), or cut to length when truncate is set.
// Bad record: MOLT_EFORMAT, a message without position, and info->why / info->col.
molt_status ds_record_encode(const chat_template *ct, ds_format format, const char *line,
                             size_t len, int max_seq_len, bool truncate, ds_example *out,
                             ds_record_info *info);

// ---- reading JSONL (jsonl.c) ------------------------------------------------------------
// A position in an input: member index (sorted archive order; 0 for a single file) and the
// number of lines of that member already consumed.
typedef struct {
    uint64_t member, line;
} ds_pos;

typedef struct ds_reader ds_reader;
// Opens a .jsonl file (optionally .gz/.zst/.xz/.bz2/.lz4 compressed) or a .tar, .tar.gz,
// .tgz, .tar.zst, .tar.xz or .zip archive, whose .jsonl members are read in sorted name
// order (other members are ignored; an archive without any is an error). Streams in
// constant memory; lines longer than max_line bytes (0: 64 MiB) are reported, not kept.
molt_status ds_reader_open(const char *path, size_t max_line, ds_reader **out);
void ds_reader_close(ds_reader *r);
// Next line without its "\n" (and "\r"): *line stays valid until the next call; *line is
// NULL at the end. *oversize is set (and *len is the full length, the text cut to the cap)
// for a line over the cap.
molt_status ds_reader_next(ds_reader *r, const char **line, size_t *len, bool *oversize);
// Where the next line will come from; ds_reader_seek goes there (reopening if needed).
ds_pos ds_reader_tell(const ds_reader *r);
molt_status ds_reader_seek(ds_reader *r, ds_pos pos);
const char *ds_reader_path(const ds_reader *r);
const char *ds_reader_member(const ds_reader *r); // member of the last line; NULL: plain file
uint64_t ds_reader_lineno(const ds_reader *r);    // 1-based line number of the last line
uint64_t ds_reader_bytes(const ds_reader *r);     // uncompressed bytes returned so far
// "FILE:LINE:COL" or "FILE:MEMBER:LINE:COL" for the last line, into buf.
const char *ds_reader_where(const ds_reader *r, int col, char *buf, size_t cap);

// ---- batches (pack.c) -------------------------------------------------------------------
typedef enum {
    DS_ON_BAD_STOP,     // stop at the first bad record: FILE[:MEMBER]:LINE:COL: reason
    DS_ON_BAD_SKIP,     // skip bad records, counted by reason
    DS_ON_BAD_TRUNCATE, // cut over-long examples to max_seq_len (counted); others stop
} ds_on_bad;
molt_status ds_on_bad_parse(const char *s, ds_on_bad *out); // "stop" | "skip" | "truncate"

#define DS_MAX_INPUTS 32

typedef struct {
    const char *path;
    double weight; // > 0: passes over this input per epoch (2.5: twice, then half of it);
                   // also its share of the interleave while it has records left
} ds_input;
// Reads "FILE" or "FILE@W" (W: the mixing weight, a number > 0) into in, the path copied
// into buf[cap]. The text after the last '@' is a weight when it reads as a number and the
// whole argument is not an existing file; a weight that is not a finite number > 0 (@0,
// @-1, @inf) is MOLT_EARG naming it, as is a path that does not fit.
molt_status ds_input_parse(const char *arg, ds_input *in, char *buf, size_t cap);

typedef struct {
    ds_input inputs[DS_MAX_INPUTS];
    int n_inputs;
    const chat_template *chat; // tokenizer + chat options (not owned)
    ds_format format;          // DS_FORMAT_AUTO
    ds_on_bad on_bad;          // DS_ON_BAD_STOP
    int max_seq_len;           // tokens per row (required, > 0)
    int batch_rows;            // rows per batch (1)
    bool pack;                 // true: several examples per row; false: one, padded
    bool shuffle;              // true
    uint64_t seed;             // 0
    int shuffle_window;        // examples shuffled and packed together (1024)
    size_t max_line;           // byte cap on one JSONL line (0: 64 MiB)
    // Hold-out split (an eval set carved from the same files): with holdout_frac in (0, 1)
    // a line is held out when ds_holdout_unit of (basename of its file, its archive member
    // if any, its 1-based line number, holdout_seed) is below holdout_frac; holdout_keep
    // true keeps only held-out lines (eval), false only the rest (train). 0: no split.
    double holdout_frac;       // 0
    uint64_t holdout_seed;     // 0
    bool holdout_keep;         // false
} ds_config;
void ds_config_default(ds_config *c);
// The hold-out draw of one line, in [0, 1): a hash of the basename of path (so the same file
// under another directory splits the same way), member (NULL: a plain file), line (1-based)
// and seed. A line is held out when this is below the split fraction.
double ds_holdout_unit(const char *path, const char *member, uint64_t line, uint64_t seed);

// One batch: every array is (rows, seq_len), row-major. Rows past rows_used (only in the
// last batch of an epoch) are all padding.
typedef struct {
    int rows, seq_len, rows_used;
    int32_t *ids;     // (rows, seq_len) padding: <pad> (or 0 when the tokenizer has none)
    uint8_t *mask;    // (rows, seq_len) 1 = target token
    int32_t *segment; // (rows, seq_len) 1, 2, ... per example in the row; 0 = padding
                      // (attention stays within a segment)
    int32_t *pos;     // (rows, seq_len) position inside its example, from 0
    uint64_t epoch;   // epoch these rows belong to (0-based)
    int n_examples;   // examples in the batch
    int64_t n_tokens, n_trained; // non-padding tokens, mask = 1 tokens
} ds_batch;
void ds_batch_free(ds_batch *b);
// Next-token labels for row-major (rows, seq_len): labels[t] = ids[t + 1] when that token is
// a target of the same example, else -1 (ignored).
void ds_batch_labels(const ds_batch *b, int32_t *labels);

// The resumable position of a loader: a plain struct, saved as bytes with ds_cursor_save
// (versioned, checksummed) for checkpoints.
#define DS_CURSOR_VERSION 1
typedef struct {
    uint32_t version, n_inputs;
    uint64_t seed, config_hash; // must match the loader it is restored into
    uint64_t epoch, window;     // epoch, and index of the current window in it
    uint64_t rows_done;         // rows of that window already returned
    uint64_t batches;           // batches returned so far
    uint64_t mix_step;          // interleave draws made before the window
    ds_pos in_pos[DS_MAX_INPUTS];    // input positions at the window start
    uint64_t in_pass[DS_MAX_INPUTS]; // pass over each input at the window start
    uint64_t bad[DS_BAD_COUNT];      // bad records skipped before the window
    uint64_t truncated;              // examples cut before the window
} ds_cursor;
// magic + version + n_inputs, the 64-bit fields, a 64-bit checksum
#define DS_CURSOR_BYTES (16 + 8 * (7 + 3 * DS_MAX_INPUTS + DS_BAD_COUNT + 1) + 8)
// Writes the cursor as DS_CURSOR_BYTES little-endian bytes; returns bytes written (0 when
// cap is too small).
size_t ds_cursor_save(const ds_cursor *c, uint8_t *buf, size_t cap);
// Reads and validates (magic, version, size, ranges, checksum) bytes from ds_cursor_save.
molt_status ds_cursor_load(ds_cursor *c, const uint8_t *buf, size_t n);

typedef struct ds_loader ds_loader;
molt_status ds_loader_open(const ds_config *c, ds_loader **out);
void ds_loader_close(ds_loader *l);
// Fills b (buffers owned by b, reused across calls) with the next batch. Epochs follow one
// another without end; MOLT_EFORMAT on a bad record under DS_ON_BAD_STOP, or when an epoch
// holds no example at all.
molt_status ds_loader_next(ds_loader *l, ds_batch *b);
// The position after the last batch returned, and back to it (same inputs and settings).
void ds_loader_cursor(const ds_loader *l, ds_cursor *c);
molt_status ds_loader_restore(ds_loader *l, const ds_cursor *c);
// Bad records skipped and examples truncated so far (counts by ds_bad_reason).
void ds_loader_bad_counts(const ds_loader *l, uint64_t bad[DS_BAD_COUNT], uint64_t *truncated);
// True when every batch of the current epoch has been returned (the next starts a new one).
bool ds_loader_epoch_end(const ds_loader *l);
// Uncompressed JSONL bytes read so far (a resumed loader counts from its restore point).
uint64_t ds_loader_bytes(const ds_loader *l);

// ---- throughput (molt bench tokenize, molt data bench) ----------------------------------
typedef struct {
    double seconds;
    uint64_t examples, batches, tokens, bytes; // bytes: uncompressed JSONL read
    double examples_per_s, mb_per_s;           // MB = 1e6 bytes of uncompressed JSONL
} ds_bench_result;
// End to end: one epoch of path (any input kind above) through the chat template into packed
// batches of rows x max_seq_len with tokenizer file `tokenizer`, timed. Bad records skipped.
molt_status data_bench_pipeline(const char *path, const char *tokenizer, int max_seq_len,
                                int rows, ds_bench_result *out);

#endif
