// data/cli_data.c: the `molt data` command: `inspect` (records, tokens, trained fraction,
// length histogram, bad-record counts), `render` (one {"ids", "mask"} line per example) and
// `bench` (end-to-end pipeline throughput). Argument parsing and printing only: the work is
// done by dataset.c, pack.c and ds_bench.c.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ds_internal.h"
#include "../common/opt.h"

typedef struct {
    ds_input in[DS_MAX_INPUTS];
    char path[DS_MAX_INPUTS][1024];
    int n_in;
    const char *tokenizer;
    int max_seq_len, rows;
    long limit;
    ds_format format;
    ds_on_bad on_bad;
    chat_opts chat;
} cli_opts;

static const char usage[] =
    "usage: molt data inspect|render|bench --data FILE [--data FILE ...] --tokenizer FILE\n"
    "                 [options]\n"
    "\n"
    "  inspect   records, tokens, trained token fraction, length histogram, bad records\n"
    "  render    one JSON line per example: {\"ids\": [...], \"mask\": [...]}\n"
    "  bench     one epoch through templating and packing: examples/s and MB/s\n"
    "\n"
    "  --data FILE[@W]         .jsonl, .jsonl.gz/.zst/.xz, or .tar/.tar.gz/.zip of .jsonl\n"
    "                          shards (W: mixing weight, used by bench and training)\n"
    "  --tokenizer FILE        tekken.json or tokenizer.json\n"
    "  --max-seq-len N         longer examples are bad records (bench: row length, 4096)\n"
    "  --format F              auto (default), chat, alpaca, completion or text\n"
    "  --on-bad-record P       stop (default), skip (count by reason) or truncate\n"
    "  --chat-version V        13 or 15 (default)\n"
    "  --reasoning-default R   none (default), high, or absent (no [MODEL_SETTINGS])\n"
    "  --train-last-only       train only the last assistant turn\n"
    "  --train-on-inputs       train on every token\n"
    "  --limit N               render: at most N examples\n"
    "  --rows N                bench: rows per batch (default 8)\n";

static int bad_usage(const char *cmd, const char *fmt, const char *arg) {
    char name[32];
    snprintf(name, sizeof name, "molt data %s", cmd);
    return molt_opt_usage_error(name, fmt, arg);
}

static int add_data(void *user, const char *v) {
    cli_opts *o = user;
    if (o->n_in == DS_MAX_INPUTS)
        return molt_opt_usage_error("molt data", "too many --data (at most 32): %s", v);
    if (ds_input_parse(v, &o->in[o->n_in], o->path[o->n_in], sizeof o->path[0]) != MOLT_OK)
        return molt_opt_usage_error("molt data", "--data: %s", molt_err_msg());
    o->n_in++;
    return 0;
}

static int parse_opts(int argc, char **argv, const char *cmd, cli_opts *o) {
    memset(o, 0, sizeof *o);
    o->rows = 8;
    o->limit = -1;
    chat_opts_default(&o->chat);
    const char *max_seq = NULL, *rows = NULL, *limit = NULL, *format = NULL, *on_bad = NULL;
    const char *version = NULL, *reasoning = NULL;
    char name[32];
    snprintf(name, sizeof name, "molt data %s", cmd);
    const molt_opt opts[] = {MOLT_OPT_EACH("--data", add_data),
                             MOLT_OPT("--tokenizer", &o->tokenizer),
                             MOLT_OPT("--max-seq-len", &max_seq),
                             MOLT_OPT("--rows", &rows),
                             MOLT_OPT("--limit", &limit),
                             MOLT_OPT("--format", &format),
                             MOLT_OPT("--on-bad-record", &on_bad),
                             MOLT_OPT("--chat-version", &version),
                             MOLT_OPT("--reasoning-default", &reasoning),
                             MOLT_OPT_FLAG("--train-last-only", &o->chat.train_last_only),
                             MOLT_OPT_FLAG("--train-on-inputs", &o->chat.train_on_inputs),
                             MOLT_OPT_END};
    int rc = molt_opts_parse(name, usage, opts, argc, argv, 2, o);
    if (rc)
        return rc < 0 ? -1 : rc;
    int64_t n;
    if (max_seq) {
        if (!molt_opt_int(name, "--max-seq-len", max_seq, 1, 1 << 24, &n))
            return 2;
        o->max_seq_len = (int)n;
    }
    if (rows) {
        if (!molt_opt_int(name, "--rows", rows, 1, 1 << 16, &n))
            return 2;
        o->rows = (int)n;
    }
    if (limit) {
        if (!molt_opt_int(name, "--limit", limit, 0, INT64_MAX, &n))
            return 2;
        o->limit = (long)n;
    }
    if (format && ds_format_parse(format, &o->format) != MOLT_OK)
        return bad_usage(cmd, "%s", molt_err_msg());
    if (on_bad && ds_on_bad_parse(on_bad, &o->on_bad) != MOLT_OK)
        return bad_usage(cmd, "%s", molt_err_msg());
    static const char *const versions[] = {"13", "15"};
    static const char *const reasonings[] = {"none", "high", "absent"};
    int vi = o->chat.version == 13 ? 0 : 1, ri = 0;
    if (!molt_opt_choice(name, "--chat-version", version, versions, 2, &vi) ||
        !molt_opt_choice(name, "--reasoning-default", reasoning, reasonings, 3, &ri))
        return 2;
    o->chat.version = (chat_version)(vi ? 15 : 13);
    if (reasoning)
        o->chat.reasoning_default = ri == 2 ? NULL : reasonings[ri];
    if (!o->n_in)
        return bad_usage(cmd, "%s", "no --data given");
    if (!o->tokenizer)
        return bad_usage(cmd, "%s", "no --tokenizer given");
    return 0;
}

static int fail(const char *cmd) {
    fprintf(stderr, "molt data %s: %s\n", cmd, molt_err_msg());
    return 1;
}

// ---- inspect and render: every record of every input, in file order --------------------

typedef struct {
    uint64_t examples, tokens, trained, bad[DS_BAD_COUNT], truncated, blank;
    uint64_t by_format[DS_FORMAT_COUNT], hist[40];
    size_t min_len, max_len;
} stats;

static void add_example(stats *s, const ds_example *e) {
    s->examples++;
    s->tokens += e->n;
    s->trained += ds_example_trained(e);
    if (!s->min_len || e->n < s->min_len)
        s->min_len = e->n;
    if (e->n > s->max_len)
        s->max_len = e->n;
    int b = 0;
    while (b < 39 && ((size_t)2 << b) <= e->n) // bucket b holds [2^b, 2^(b+1))
        b++;
    s->hist[b]++;
}

static void print_row(const ds_example *e) {
    fputs("{\"ids\": [", stdout);
    for (size_t i = 0; i < e->n; i++)
        printf(i ? ", %d" : "%d", e->ids[i]);
    fputs("], \"mask\": [", stdout);
    for (size_t i = 0; i < e->n; i++)
        printf(i ? ", %d" : "%d", e->mask[i]);
    fputs("]}\n", stdout);
}

static void print_stats(const stats *s) {
    printf("records: %llu", (unsigned long long)s->examples);
    const char *sep = " (";
    for (int f = DS_FORMAT_CHAT; f < DS_FORMAT_COUNT; f++)
        if (s->by_format[f]) {
            printf("%s%s %llu", sep, ds_format_name((ds_format)f),
                   (unsigned long long)s->by_format[f]);
            sep = ", ";
        }
    printf("%s\n", *sep == ',' ? ")" : "");
    uint64_t nbad = 0;
    for (int k = 0; k < DS_BAD_COUNT; k++)
        nbad += s->bad[k];
    printf("bad records skipped: %llu", (unsigned long long)nbad);
    sep = " (";
    for (int k = 0; k < DS_BAD_COUNT; k++)
        if (s->bad[k]) {
            printf("%s%s %llu", sep, ds_bad_reason_name((ds_bad_reason)k),
                   (unsigned long long)s->bad[k]);
            sep = ", ";
        }
    printf("%s\n", *sep == ',' ? ")" : "");
    printf("truncated: %llu\nblank lines: %llu\n", (unsigned long long)s->truncated,
           (unsigned long long)s->blank);
    double mean = s->examples ? (double)s->tokens / (double)s->examples : 0;
    printf("tokens: %llu (per example: mean %.1f, min %zu, max %zu)\n",
           (unsigned long long)s->tokens, mean, s->min_len, s->max_len);
    printf("trained tokens: %llu (%.2f%%)\n", (unsigned long long)s->trained,
           s->tokens ? 100.0 * (double)s->trained / (double)s->tokens : 0.0);
    printf("length histogram (tokens per example):\n");
    uint64_t top = 1;
    for (int b = 0; b < 40; b++)
        top = s->hist[b] > top ? s->hist[b] : top;
    for (int b = 0; b < 40; b++) {
        if (!s->hist[b])
            continue;
        int bar = (int)((40 * s->hist[b] + top - 1) / top);
        printf("  %8llu-%-8llu %8llu %.*s\n", 1ull << b, (2ull << b) - 1,
               (unsigned long long)s->hist[b], bar,
               "########################################");
    }
}

static int walk(int argc, char **argv, bool render) {
    const char *cmd = render ? "render" : "inspect";
    cli_opts o;
    int rc = parse_opts(argc, argv, cmd, &o);
    if (rc)
        return rc < 0 ? 0 : rc;
    tok_tokenizer *t;
    chat_template *ct = NULL;
    if (tok_load(o.tokenizer, &t) != MOLT_OK)
        return fail(cmd);
    stats s = {0};
    ds_example ex = {0};
    molt_status st = chat_template_new(t, &o.chat, &ct);
    for (int i = 0; i < o.n_in && st == MOLT_OK; i++) {
        ds_source src = {.ct = ct, .format = o.format, .on_bad = o.on_bad,
                         .max_seq_len = o.max_seq_len, .keep_frac = 1};
        st = ds_source_open(&src, o.in[i].path);
        bool end = false;
        while (st == MOLT_OK && !end && (!render || o.limit < 0 || (long)s.examples < o.limit)) {
            st = ds_source_next(&src, &ex, &end);
            if (st == MOLT_OK && !end) {
                add_example(&s, &ex);
                if (render)
                    print_row(&ex);
            }
        }
        for (int k = 0; src.r && k < DS_BAD_COUNT; k++)
            s.bad[k] += src.bad[k];
        for (int f = 0; src.r && f < DS_FORMAT_COUNT; f++)
            s.by_format[f] += src.by_format[f];
        s.truncated += src.r ? src.truncated : 0;
        s.blank += src.r ? src.blank : 0;
        if (src.r)
            ds_source_close(&src);
    }
    if (st == MOLT_OK && !render)
        print_stats(&s);
    ds_example_free(&ex);
    chat_template_free(ct);
    tok_free(t);
    return st == MOLT_OK ? 0 : fail(cmd);
}

static int bench(int argc, char **argv) {
    cli_opts o;
    int rc = parse_opts(argc, argv, "bench", &o);
    if (rc)
        return rc < 0 ? 0 : rc;
    if (o.n_in != 1)
        return bad_usage("bench", "%s", "give exactly one --data");
    ds_bench_result r;
    if (data_bench_pipeline(o.in[0].path, o.tokenizer, o.max_seq_len ? o.max_seq_len : 4096,
                            o.rows, &r) != MOLT_OK)
        return fail("bench");
    printf("data pipeline: %s -> packed %d x %d batches\n", o.in[0].path, o.rows,
           o.max_seq_len ? o.max_seq_len : 4096);
    printf("  %llu examples, %llu batches, %llu tokens, %.2f MB of JSONL in %.3f s\n",
           (unsigned long long)r.examples, (unsigned long long)r.batches,
           (unsigned long long)r.tokens, (double)r.bytes / 1e6, r.seconds);
    printf("  %.0f examples/s, %.2f MB/s\n", r.examples_per_s, r.mb_per_s);
    return 0;
}

int data_cmd_data(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "inspect"))
        return walk(argc, argv, false);
    if (!strcmp(argv[1], "render"))
        return walk(argc, argv, true);
    if (!strcmp(argv[1], "bench"))
        return bench(argc, argv);
    fprintf(stderr, "molt data: unknown subcommand '%s'\n\n%s", argv[1], usage);
    return 2;
}
