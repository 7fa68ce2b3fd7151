// data/cli_tokenize.c: the `molt tokenize` and `molt bench tokenize` commands: argument
// parsing, JSONL records in, ids out, and the single-thread encode throughput figure.
// Not here: tokenization itself (tok_*.c) or the comparison with Python encoders
// (tools/bench/bench_tokenize.py runs this command beside them).
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "data.h"
#include "../common/datadir.h"
#include "../common/lineio.h"
#include "../common/opt.h"

// ---- shared ----------------------------------------------------------------------------

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// One JSONL record's "text"; *ok = false (message printed) when the line is not one.
static json_t *record_text(const char *line, size_t len, const char *file, size_t lineno,
                           const char *cmd, bool *ok) {
    json_error_t je;
    json_t *rec = json_loadb(line, len, JSON_ALLOW_NUL, &je);
    *ok = false;
    if (!rec) {
        fprintf(stderr, "%s: %s:%zu: column %d: %s\n", cmd, file, lineno, je.column, je.text);
        return NULL;
    }
    json_t *text = json_object_get(rec, "text");
    if (!json_is_string(text)) {
        fprintf(stderr, "%s: %s:%zu: expected an object with a string \"text\"\n", cmd, file,
                lineno);
        json_decref(rec);
        return NULL;
    }
    *ok = true;
    return rec;
}

static bool blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\r' && s[i] != '\n')
            return false;
    return true;
}

// ---- molt tokenize ---------------------------------------------------------------------

static const char tokenize_usage[] =
    "usage: molt tokenize --tokenizer FILE (--text TEXT | --jsonl FILE) [--bos] [--eos]\n"
    "\n"
    "Encodes plain text and prints the token ids, space-separated: one line for --text,\n"
    "one line per record {\"text\": ...} for --jsonl (FILE may be - for standard input;\n"
    "blank lines are skipped). Text never produces special tokens: \"[INST]\" is encoded\n"
    "as ordinary text.\n"
    "\n"
    "  --tokenizer FILE  tekken.json or a Hugging Face tokenizer.json (byte-level BPE)\n"
    "  --text TEXT       the text to encode\n"
    "  --jsonl FILE      JSON lines, each an object with a string \"text\"\n"
    "  --bos, --eos      put the sequence start / end token around each text\n";

typedef struct {
    const tok_tokenizer *t;
    bool bos, eos;
    tok_ids ids;
} tok_job;

// Encodes one text and prints its line of ids.
static int print_ids(tok_job *j, const char *text, size_t len) {
    j->ids.n = 0;
    molt_status st = MOLT_OK;
    if (j->bos)
        st = tok_ids_push(&j->ids, tok_bos(j->t));
    if (st == MOLT_OK)
        st = tok_encode(j->t, text, len, &j->ids);
    if (st == MOLT_OK && j->eos)
        st = tok_ids_push(&j->ids, tok_eos(j->t));
    if (st != MOLT_OK) {
        fprintf(stderr, "molt tokenize: %s\n", molt_err_msg());
        return 1;
    }
    for (size_t i = 0; i < j->ids.n; i++)
        printf(i ? " %d" : "%d", (int)j->ids.ids[i]);
    putchar('\n');
    return 0;
}

static int tokenize_jsonl(tok_job *j, const char *path) {
    molt_lines r;
    if (molt_lines_open(&r, path, 0) != MOLT_OK) {
        fprintf(stderr, "molt tokenize: %s\n", molt_err_msg());
        return 1;
    }
    int rc = 0;
    bool eof = false;
    while (rc == 0) {
        if (molt_lines_next(&r, &eof) != MOLT_OK) { // a read error is not the end
            fprintf(stderr, "molt tokenize: %s\n", molt_err_msg());
            rc = 1;
            break;
        }
        if (eof)
            break;
        if (blank(r.buf, r.len))
            continue;
        bool ok;
        json_t *rec = record_text(r.buf, r.len, path, (size_t)r.lineno, "molt tokenize", &ok);
        if (!ok) {
            rc = 1;
            break;
        }
        json_t *text = json_object_get(rec, "text");
        rc = print_ids(j, json_string_value(text), json_string_length(text));
        json_decref(rec);
    }
    molt_lines_close(&r);
    return rc;
}

int data_cmd_tokenize(int argc, char **argv) {
    const char *tok_path = NULL, *text = NULL, *jsonl = NULL, *cmd = "molt tokenize";
    tok_job j = {0};
    const molt_opt opts[] = {MOLT_OPT("--tokenizer", &tok_path), MOLT_OPT("--text", &text),
                             MOLT_OPT("--jsonl", &jsonl),        MOLT_OPT_FLAG("--bos", &j.bos),
                             MOLT_OPT_FLAG("--eos", &j.eos),  MOLT_OPT_END};
    int rc0 = molt_opts_parse(cmd, tokenize_usage, opts, argc, argv, 1, NULL);
    if (rc0)
        return rc0 < 0 ? 0 : rc0;
    if (!tok_path || !text == !jsonl)
        return molt_opt_usage_error(cmd, "need --tokenizer and one of --text, --jsonl");
    tok_tokenizer *t;
    if (tok_load(tok_path, &t) != MOLT_OK) {
        fprintf(stderr, "molt tokenize: %s\n", molt_err_msg());
        return 1;
    }
    j.t = t;
    int rc = 0;
    if ((j.bos && tok_bos(t) < 0) || (j.eos && tok_eos(t) < 0)) {
        fprintf(stderr, "molt tokenize: %s: no %s token is known for this tokenizer\n", tok_path,
                j.bos && tok_bos(t) < 0 ? "start (--bos)" : "end (--eos)");
        rc = 1;
    } else if (text)
        rc = print_ids(&j, text, strlen(text));
    else
        rc = tokenize_jsonl(&j, jsonl);
    if (fflush(stdout) != 0 && rc == 0) {
        fprintf(stderr, "molt tokenize: error writing the output\n");
        rc = 1;
    }
    tok_ids_free(&j.ids);
    tok_free(t);
    return rc;
}

// ---- molt bench tokenize ---------------------------------------------------------------

static const char bench_usage[] =
    "usage: molt bench tokenize [--tokenizer FILE]... [--text FILE | --jsonl FILE]\n"
    "                           [--seconds S] [--tsv] [--data FILE]\n"
    "\n"
    "Encode throughput on one thread. The input is cut into lines (--text) or records\n"
    "(--jsonl), each encoded with tok_encode; passes repeat for at least S seconds\n"
    "(default 2) and the fastest pass is reported in MB/s (10^6 bytes per second).\n"
    "Defaults: tokenizers/tekken.json and tokenizers/deepseek-v3-tokenizer.json of molt's data\n"
    "directory (see molt info),\n"
    "--jsonl tests/fixtures/tokenizer/corpus.jsonl (paths from the current directory).\n"
    "  --tsv   one tab-separated line per tokenizer: file kind load_s bytes tokens mb_per_s\n"
    "  --data  instead: one epoch of a dataset file (.jsonl, .jsonl.zst, archive) through\n"
    "          chat template, tokenizer (the first --tokenizer) and packing, timed\n";

// The benchmark input: texts back to back in one buffer.
typedef struct {
    char *buf;
    size_t *off; // (n + 1) text i is buf[off[i] .. off[i + 1])
    size_t n, bytes;
} bench_input;

static int input_add(bench_input *in, const char *s, size_t len, size_t *cap, size_t *ncap) {
    if (in->bytes + len > *cap) {
        size_t c = (*cap + len) * 2;
        char *b = molt_realloc(in->buf, c);
        if (!b)
            goto oom;
        in->buf = b;
        *cap = c;
    }
    if (in->n + 2 > *ncap) {
        size_t c = *ncap * 2 + 64;
        size_t *o = molt_realloc(in->off, c * sizeof *o);
        if (!o)
            goto oom;
        in->off = o;
        *ncap = c;
    }
    memcpy(in->buf + in->bytes, s, len);
    in->off[in->n] = in->bytes;
    in->bytes += len;
    in->n++;
    in->off[in->n] = in->bytes;
    return 0;
oom:
    fprintf(stderr, "molt bench tokenize: out of memory for the input text\n");
    return 1;
}

// Reads lines (kept with their newline) or JSONL records' texts.
static int bench_read(const char *path, bool jsonl, bench_input *in) {
    molt_lines r;
    if (molt_lines_open(&r, path, 0) != MOLT_OK) {
        fprintf(stderr, "molt bench tokenize: %s\n", molt_err_msg());
        return 1;
    }
    size_t bcap = 0, ncap = 0;
    int rc = 0;
    bool eof = false;
    while (rc == 0) {
        if (molt_lines_next(&r, &eof) != MOLT_OK) {
            fprintf(stderr, "molt bench tokenize: %s\n", molt_err_msg());
            rc = 1;
            break;
        }
        if (eof)
            break;
        if (!jsonl) { // the line with its newline, as the text passes read it
            r.buf[r.len] = '\n';
            rc = input_add(in, r.buf, r.len + 1, &bcap, &ncap);
            r.buf[r.len] = 0;
            continue;
        }
        if (blank(r.buf, r.len))
            continue;
        bool ok;
        json_t *rec = record_text(r.buf, r.len, path, (size_t)r.lineno, "molt bench tokenize",
                                  &ok);
        if (!ok) {
            rc = 1;
            break;
        }
        json_t *t = json_object_get(rec, "text");
        rc = input_add(in, json_string_value(t), json_string_length(t), &bcap, &ncap);
        json_decref(rec);
    }
    molt_lines_close(&r);
    if (rc == 0 && in->n == 0) {
        fprintf(stderr, "molt bench tokenize: %s: no text\n", path);
        rc = 1;
    }
    return rc;
}

// Encodes every text once; returns seconds, or -1 on error. *tokens gets the id count.
static double bench_pass(const tok_tokenizer *t, const bench_input *in, tok_ids *ids,
                         size_t *tokens) {
    double t0 = now_s();
    *tokens = 0;
    for (size_t i = 0; i < in->n; i++) {
        ids->n = 0;
        if (tok_encode(t, in->buf + in->off[i], in->off[i + 1] - in->off[i], ids) != MOLT_OK)
            return -1;
        *tokens += ids->n;
    }
    return now_s() - t0;
}

static int bench_one(const char *path, const bench_input *in, double seconds, bool tsv) {
    double t0 = now_s();
    tok_tokenizer *t;
    if (tok_load(path, &t) != MOLT_OK) {
        fprintf(stderr, "molt bench tokenize: %s\n", molt_err_msg());
        return 1;
    }
    double load = now_s() - t0, best = -1, spent = 0;
    tok_ids ids = {0};
    size_t tokens = 0;
    int passes = 0;
    do {
        double s = bench_pass(t, in, &ids, &tokens);
        if (s < 0) {
            fprintf(stderr, "molt bench tokenize: %s\n", molt_err_msg());
            tok_ids_free(&ids);
            tok_free(t);
            return 1;
        }
        best = best < 0 || s < best ? s : best;
        spent += s;
        passes++;
    } while (spent < seconds || passes < 2);
    double mbps = best > 0 ? (double)in->bytes / best / 1e6 : 0;
    if (tsv)
        printf("%s\t%s\t%.3f\t%zu\t%zu\t%.2f\n", path, tok_kind(t), load, in->bytes, tokens, mbps);
    else
        printf("%-48s %-15s %7.3f %10zu %9.2f\n", path, tok_kind(t), load, tokens, mbps);
    tok_ids_free(&ids);
    tok_free(t);
    return 0;
}

// ---- end-to-end data pipeline figure (--data FILE) -------------------------------------
// Reading, chat templating, tokenizing and packing one epoch of a dataset file, timed by
// the data module (data_bench_pipeline, the same figure as `molt data bench`): rows of
// 4096 tokens, 8 rows per batch. Uses the first --tokenizer.
static int bench_data_pipeline(const char *tok_path, const char *data_path) {
    ds_bench_result r;
    if (data_bench_pipeline(data_path, tok_path, 4096, 8, &r) != MOLT_OK) {
        fprintf(stderr, "molt bench tokenize: %s\n", molt_err_msg());
        return 1;
    }
    printf("molt bench tokenize: %s with %s, one epoch end to end (template, tokenize, pack)\n"
           "%.3f s, %llu examples (%.1f/s), %llu tokens, %llu batches, %.2f MB/s of JSONL\n",
           data_path, tok_path, r.seconds, (unsigned long long)r.examples, r.examples_per_s,
           (unsigned long long)r.tokens, (unsigned long long)r.batches, r.mb_per_s);
    return 0;
}

typedef struct {
    const char *paths[16];
    int n;
} tok_list;

static int add_tokenizer(void *user, const char *v) {
    tok_list *l = user;
    if (l->n == 16)
        return molt_opt_usage_error("molt bench tokenize", "at most 16 --tokenizer");
    l->paths[l->n++] = v;
    return 0;
}

int data_cmd_bench_tokenize(int argc, char **argv) {
    const char *cmd = "molt bench tokenize", *text = NULL, *jsonl_in = NULL, *data = NULL;
    const char *secs = NULL, *input = NULL;
    tok_list tl = {.n = 0};
    bool tsv = false, jsonl = true;
    double seconds = 2;
    const molt_opt opts[] = {MOLT_OPT_EACH("--tokenizer", add_tokenizer),
                             MOLT_OPT("--text", &text),
                             MOLT_OPT("--jsonl", &jsonl_in),
                             MOLT_OPT("--data", &data),
                             MOLT_OPT("--seconds", &secs),
                             MOLT_OPT_FLAG("--tsv", &tsv),
                             MOLT_OPT_END};
    int rc0 = molt_opts_parse(cmd, bench_usage, opts, argc, argv, 1, &tl);
    if (rc0)
        return rc0 < 0 ? 0 : rc0;
    if (!molt_opt_double(cmd, "--seconds", secs, 0, 1e6, &seconds))
        return 2;
    if (text && jsonl_in)
        return molt_opt_usage_error(cmd, "--text and --jsonl exclude each other");
    if (text || jsonl_in) {
        input = text ? text : jsonl_in;
        jsonl = !text;
    }
    const char **toks = tl.paths;
    int n_toks = tl.n;
    static char found[2][MOLT_DATA_PATH_MAX];
    if (n_toks == 0) {
        static const char *const rel[] = {"tokenizers/tekken.json",
                                           "tokenizers/deepseek-v3-tokenizer.json"};
        for (int k = 0; k < 2; k++) {
            if (molt_data_find(rel[k], found[k], sizeof found[k]) != MOLT_OK) {
                fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
                return 1;
            }
            toks[n_toks++] = found[k];
        }
    }
    if (data)
        return bench_data_pipeline(toks[0], data);
    if (!input)
        input = "tests/fixtures/tokenizer/corpus.jsonl";
    bench_input in = {0};
    int rc = bench_read(input, jsonl, &in);
    if (rc == 0 && !tsv)
        printf("molt bench tokenize: %s (%zu bytes in %zu %s), one thread, fastest pass\n"
               "%-48s %-15s %7s %10s %9s\n",
               input, in.bytes, in.n, jsonl ? "records" : "lines", "tokenizer", "kind", "load_s",
               "tokens", "MB/s");
    for (int k = 0; rc == 0 && k < n_toks; k++)
        rc = bench_one(toks[k], &in, seconds, tsv);
    molt_free(in.buf);
    molt_free(in.off);
    return rc;
}
