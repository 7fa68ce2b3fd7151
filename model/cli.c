// model/cli.c: the model module's commands: `molt init-model` (a random model directory
// from a preset) and `molt forward` (logits of token sequences into a safetensors file).
// Argument parsing and messages only; the work is in init_model.c and forward.c.
// Exit status: 0 success, 1 failure, 2 bad usage.
#include "model.h"

#include "../autograd/comm/comm.h"
#include "../common/fsio.h"
#include "../common/lineio.h"
#include "../common/opt.h"
#include "../common/sysmem.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---------------------------------------------------------------------------------------
// molt init-model

static const char init_usage[] =
    "usage: molt init-model --preset NAME --out DIR [--seed S] [--dtype f32|bf16|fp8]\n"
    "                       [--layout hf|per-expert|mistral] [--tokenizer FILE | --no-tokenizer]\n"
    "                       [--max-gb N] [--force]\n"
    "Writes a randomly initialized model (config.json, weights, tekken.json) in Hugging Face\n"
    "layout. NAME is a preset of configs/models (tiny, tiny-grouped, small, mistral-small-4)\n"
    "or a path to a config.json. Weights are normal(0, initializer_range), norms 1; the same\n"
    "seed gives the same file. --dtype fp8: E4M3 with a per-tensor scale (lm_head,\n"
    "embeddings, norms and router in bf16). --layout: fused experts (hf), one matrix per\n"
    "expert (per-expert), or Mistral's consolidated names (mistral). DIR must not exist or\n"
    "be empty; --force replaces it whole (nothing of the old directory is kept). DIR may not\n"
    "be, hold or lie inside the tokenizer file or the preset file.\n";

int mdl_cmd_init_model(int argc, char **argv) {
    const char *cmd = "molt init-model", *seed = NULL, *dtype = NULL, *layout = NULL;
    const char *max_gb = NULL;
    mdl_init_opts o = {.save = {.layout = MDL_LAYOUT_HF, .dtype = MDL_SAVE_F32}};
    const molt_opt opts[] = {MOLT_OPT("--preset", &o.preset),
                             MOLT_OPT("--out", &o.out_dir),
                             MOLT_OPT("--tokenizer", &o.tokenizer),
                             MOLT_OPT("--seed", &seed),
                             MOLT_OPT("--dtype", &dtype),
                             MOLT_OPT("--layout", &layout),
                             MOLT_OPT("--max-gb", &max_gb),
                             MOLT_OPT_FLAG("--no-tokenizer", &o.no_tokenizer),
                             MOLT_OPT_FLAG("--force", &o.force),
                             MOLT_OPT_END};
    int rc = molt_opts_parse(cmd, init_usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc < 0 ? 0 : rc;
    static const char *const dtypes[] = {"f32", "bf16", "fp8"};
    static const char *const layouts[] = {"hf", "per-expert", "mistral"};
    int dt = (int)o.save.dtype, ly = (int)o.save.layout;
    if (!molt_opt_uint64(cmd, "--seed", seed, &o.seed) ||
        !molt_opt_choice(cmd, "--dtype", dtype, dtypes, 3, &dt) ||
        !molt_opt_choice(cmd, "--layout", layout, layouts, 3, &ly) ||
        !molt_opt_double(cmd, "--max-gb", max_gb, 1e-9, 1e12, &o.max_gb))
        return 2;
    o.save.dtype = (mdl_save_dtype)dt;
    o.save.layout = (mdl_layout)ly;
    if (!o.preset || !o.out_dir)
        return molt_opt_usage_error(cmd, "--preset and --out are required");
    if (o.tokenizer && o.no_tokenizer)
        return molt_opt_usage_error(cmd, "--tokenizer and --no-tokenizer exclude each other");
    molt_status st = mdl_init_model(&o);
    if (st != MOLT_OK) {
        fprintf(stderr, "molt init-model: %s\n", molt_err_msg());
        return 1;
    }
    printf("wrote %s (preset %s, seed %llu)\n", o.out_dir, o.preset, (unsigned long long)o.seed);
    return 0;
}

// ---------------------------------------------------------------------------------------
// molt forward

static const char fwd_usage[] =
    "usage: molt forward --model DIR --tokens FILE --out FILE.safetensors [--adapter A]\n"
    "                    [--base-quant SPEC]\n"
    "Runs the model on each line of FILE (token ids separated by spaces or commas; blank\n"
    "lines are skipped) from position 0 and writes its F32 logits [T, V] as tensor\n"
    "logits.N, N counting the sequences from 0. --adapter: a PEFT directory or a molt\n"
    "adapter file applied to the base. --base-quant (see molt quantize --help)\n"
    "quantizes the projections on load, e.g. nf4 or nf4,attention=bf16.\n"
    "Under mpirun (or srun) with N ranks the routed experts are split over the ranks (each\n"
    "loads its n_routed_experts / N experts only), the sequences are shared out among the\n"
    "ranks (a rank without one serves its experts to the others) and rank 0 writes FILE.\n";

typedef struct {
    int32_t *ids; // all sequences back to back
    int64_t n, cap;
    int64_t *start; // [n_seq + 1] offsets into ids
    int n_seq, cap_seq;
} seqs;

static void seqs_free(seqs *s) {
    molt_free(s->ids);
    molt_free(s->start);
}

static molt_status seqs_push_id(seqs *s, int32_t id) {
    if (s->n == s->cap) {
        int64_t cap = s->cap ? 2 * s->cap : 1024;
        int32_t *p = molt_realloc(s->ids, (size_t)cap * sizeof *p);
        if (!p)
            return molt_err(MOLT_ENOMEM, "reading tokens: out of memory");
        s->ids = p;
        s->cap = cap;
    }
    s->ids[s->n++] = id;
    return MOLT_OK;
}

// Closes the current sequence (started at start[n_seq]) when it has tokens.
static molt_status seqs_end_line(seqs *s) {
    if (s->n == s->start[s->n_seq])
        return MOLT_OK;
    if (s->n_seq + 2 > s->cap_seq) {
        int cap = 2 * s->cap_seq;
        int64_t *p = molt_realloc(s->start, (size_t)cap * sizeof *p);
        if (!p)
            return molt_err(MOLT_ENOMEM, "reading tokens: out of memory");
        s->start = p;
        s->cap_seq = cap;
    }
    s->start[++s->n_seq] = s->n;
    return MOLT_OK;
}

static molt_status parse_line(seqs *s, const char *path, int lineno, char *line, int vocab) {
    char *save = NULL;
    const char *sep = " \t\r,";
    for (char *tok = strtok_r(line, sep, &save); tok; tok = strtok_r(NULL, sep, &save)) {
        char *end;
        errno = 0;
        long v = strtol(tok, &end, 10);
        if (errno || *end || end == tok)
            return molt_err(MOLT_EFORMAT, "%s:%d: '%s' is not a token id", path, lineno, tok);
        if (v < 0 || v >= vocab)
            return molt_err(MOLT_EFORMAT, "%s:%d: token %ld is outside the vocabulary [0, %d)",
                            path, lineno, v, vocab);
        MOLT_TRY(seqs_push_id(s, (int32_t)v));
    }
    return seqs_end_line(s);
}

static molt_status read_tokens(const char *path, int vocab, seqs *s) {
    memset(s, 0, sizeof *s);
    s->start = molt_calloc(16, sizeof *s->start);
    s->cap_seq = 16;
    if (!s->start)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", path);
    molt_lines r;
    molt_status st = molt_lines_open(&r, path, 0);
    bool eof = false;
    while (st == MOLT_OK) {
        st = molt_lines_next(&r, &eof); // a read error is an error, not the end
        if (st != MOLT_OK || eof)
            break;
        st = parse_line(s, path, (int)r.lineno, r.buf, vocab);
    }
    molt_lines_close(&r);
    if (st == MOLT_OK && s->n_seq == 0)
        st = molt_err(MOLT_EFORMAT, "%s: no token sequences", path);
    return st;
}

// Logits of one sequence [T, V] into a new buffer *out.
static molt_status run_one(ag_ctx *c, const mdl_model *m, const int32_t *ids, int64_t T,
                           float **out) {
    ag_ctx_step_reset(c);
    ag_tensor *ti = ag_tensor_new1(&c->act, AG_I32, T), *tp = ag_tensor_new1(&c->act, AG_I32, T);
    ag_tensor *ts = ag_tensor_new1(&c->act, AG_I32, T);
    if (!ti || !tp || !ts)
        return molt_err_wrap(MOLT_ENOMEM, "forward");
    memcpy(ti->data, ids, (size_t)T * sizeof *ids);
    for (int64_t t = 0; t < T; t++)
        ((int32_t *)tp->data)[t] = (int32_t)t;
    mdl_batch b = {.ids = ti, .pos = tp, .seg = ts};
    ag_tensor *lg;
    MOLT_TRY(mdl_forward(c, m, &b, &lg));
    *out = molt_malloc((size_t)lg->numel * sizeof(float));
    if (!*out)
        return molt_err(MOLT_ENOMEM, "forward: out of memory for %lld logits",
                        (long long)lg->numel);
    memcpy(*out, lg->data, (size_t)lg->numel * sizeof(float));
    return MOLT_OK;
}

// Sequence i (T tokens) fits the model's positions and, with its activations, the logits in
// the arena and their copy, the memory available: checked before anything is allocated.
static molt_status check_seq(const mdl_model *m, int i, int64_t T) {
    char what[64];
    snprintf(what, sizeof what, "sequence %d", i);
    MOLT_TRY(mcfg_check_positions(&m->cfg, T, what));
    uint64_t need = mdl_step_memory_bytes(&m->cfg, T, false, false) +
                    2 * (uint64_t)T * (uint64_t)m->cfg.vocab_size * sizeof(float);
    uint64_t have = molt_mem_available();
    if (have && need > have)
        return molt_err(MOLT_ENOMEM, "out of memory: sequence %d (%lld tokens) needs about "
                        "%.1f GiB for its activations and logits, and %.1f GiB of memory "
                        "are available", i, (long long)T, (double)need / (1 << 30),
                        (double)have / (1 << 30));
    return MOLT_OK;
}

// Refuses logits lg [T, V] of sequence i holding a non-finite value.
static molt_status check_logits(const mdl_model *m, int i, int64_t T, const float *lg) {
    for (int64_t k = 0; k < T * m->cfg.vocab_size; k++)
        if (!isfinite(lg[k]))
            return molt_err(MOLT_EARG, "sequence %d: its logits hold a non-finite value "
                            "(position %lld): the model or the adapter overflows; nothing "
                            "was written", i, (long long)(k / m->cfg.vocab_size));
    return MOLT_OK;
}

static molt_status forward_all(const mdl_model *m, const seqs *s, const char *out_path) {
    int n = s->n_seq;
    st_tensor *t = molt_calloc((size_t)n, sizeof *t);
    char (*names)[32] = molt_calloc((size_t)n, sizeof *names);
    ag_ctx c;
    molt_status st = t && names ? ag_ctx_init(&c) : molt_err(MOLT_ENOMEM, "out of memory");
    if (st != MOLT_OK) {
        molt_free(t);
        molt_free(names);
        return st;
    }
    ag_ctx_set_grad(&c, false);
    for (int i = 0; st == MOLT_OK && i < n; i++) {
        int64_t T = s->start[i + 1] - s->start[i];
        float *lg = NULL;
        st = check_seq(m, i, T);
        if (st == MOLT_OK)
            st = run_one(&c, m, s->ids + s->start[i], T, &lg);
        if (st == MOLT_OK)
            st = check_logits(m, i, T, lg);
        snprintf(names[i], sizeof names[i], "logits.%d", i);
        t[i] = (st_tensor){.name = names[i], .dtype = ST_F32, .ndim = 2,
                           .shape = {T, m->cfg.vocab_size}, .data = lg};
    }
    ag_ctx_free(&c);
    if (st == MOLT_OK)
        st = st_write(out_path, t, n, NULL, 0);
    for (int i = 0; i < n; i++)
        molt_free((void *)t[i].data);
    molt_free(t);
    molt_free(names);
    return st;
}

// Across the ranks of the expert group w: in round k rank r runs sequence k*P + r (or, past
// the last one, serves its experts), then the round's logits go to rank 0 (one all-to-all),
// which writes the file. Every rank checks every sequence's size before the first round;
// rank 0 checks the logits it receives.
static molt_status forward_ranks(const mdl_model *m, const seqs *s, const char *out_path,
                                 ag_comm *w) {
    int n = s->n_seq, P = ag_comm_size(w), me = ag_comm_rank(w);
    int64_t V = m->cfg.vocab_size;
    st_tensor *t = molt_calloc((size_t)n, sizeof *t);
    char (*names)[32] = molt_calloc((size_t)n, sizeof *names);
    int64_t *rows = molt_calloc(2 * (size_t)P, sizeof *rows);
    ag_ctx c;
    molt_status st = t && names && rows ? ag_ctx_init(&c) : molt_err(MOLT_ENOMEM, "out of memory");
    if (st != MOLT_OK) {
        molt_free(t);
        molt_free(names);
        molt_free(rows);
        return st;
    }
    ag_ctx_set_grad(&c, false);
    for (int i = 0; st == MOLT_OK && i < n; i++)
        st = check_seq(m, i, s->start[i + 1] - s->start[i]);
    for (int k = 0; st == MOLT_OK && k * P < n; k++) {
        int i = k * P + me;
        float *lg = NULL, *recv = NULL;
        int64_t T = i < n ? s->start[i + 1] - s->start[i] : 0, total = 0;
        if (i < n)
            st = run_one(&c, m, s->ids + s->start[i], T, &lg);
        else {
            ag_ctx_step_reset(&c);
            st = mdl_serve_experts(&c, m, NULL);
        }
        int64_t *send_rows = rows, *recv_rows = rows + P;
        for (int p = 0; p < P; p++) {
            int j = k * P + p;
            send_rows[p] = p == 0 ? T : 0;
            recv_rows[p] = me == 0 && j < n ? s->start[j + 1] - s->start[j] : 0;
            total += recv_rows[p];
        }
        if (st == MOLT_OK && me == 0 && !(recv = molt_malloc((size_t)(total * V) * sizeof *recv)))
            st = molt_err(MOLT_ENOMEM, "forward: out of memory for %lld logits",
                          (long long)(total * V));
        if (st == MOLT_OK)
            st = ag_comm_alltoallv(w, lg, send_rows, recv, recv_rows, V, AG_F32);
        for (int p = 0, off = 0; st == MOLT_OK && me == 0 && p < P && k * P + p < n; p++) {
            int j = k * P + p;
            float *mine = molt_malloc((size_t)(recv_rows[p] * V) * sizeof *mine);
            if (!mine) {
                st = molt_err(MOLT_ENOMEM, "forward: out of memory");
                break;
            }
            memcpy(mine, recv + off * V, (size_t)(recv_rows[p] * V) * sizeof *mine);
            st = check_logits(m, j, recv_rows[p], mine);
            off += (int)recv_rows[p];
            snprintf(names[j], sizeof names[j], "logits.%d", j);
            t[j] = (st_tensor){.name = names[j], .dtype = ST_F32, .ndim = 2,
                               .shape = {recv_rows[p], V}, .data = mine};
        }
        molt_free(lg);
        molt_free(recv);
    }
    ag_ctx_free(&c);
    if (st == MOLT_OK && me == 0)
        st = st_write(out_path, t, n, NULL, 0);
    for (int i = 0; i < n; i++)
        molt_free((void *)t[i].data);
    molt_free(t);
    molt_free(names);
    molt_free(rows);
    return st;
}

int mdl_cmd_forward(int argc, char **argv, const mdl_adapter_hook *hook) {
    const char *model = NULL, *tokens = NULL, *out = NULL, *adapter = NULL;
    const char *cmd = "molt forward";
    const char *base_quant = NULL;
    const molt_opt opts[] = {MOLT_OPT("--model", &model),     MOLT_OPT("--tokens", &tokens),
                             MOLT_OPT("--out", &out),         MOLT_OPT("--adapter", &adapter),
                             MOLT_OPT("--base-quant", &base_quant), MOLT_OPT_END};
    int rc = molt_opts_parse(cmd, fwd_usage, opts, argc, argv, 1, NULL);
    if (rc)
        return rc < 0 ? 0 : rc;
    if (!model || !tokens || !out)
        return molt_opt_usage_error(cmd, "--model, --tokens and --out are required");
    if (adapter && !hook)
        return molt_opt_usage_error(cmd, "--adapter is not available in this build");
    static const char *const in_opt[] = {"--model", "--tokens", "--adapter"};
    const char *in[] = {model, tokens, adapter};
    for (int k = 0; k < 3; k++)
        if (molt_check_overlap("--out", out, in_opt[k], in[k]) != MOLT_OK) {
            fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
            return 1;
        }
    mdl_qspec qspec;
    bool quant = base_quant != NULL;
    if (quant && mdl_qspec_parse(base_quant, &qspec) != MOLT_OK) {
        fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
        return 2;
    }
    ag_comm *w = NULL;
    if (ag_comm_world(0, &w) != MOLT_OK) {
        fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
        return 1;
    }
    bool ranks = ag_comm_size(w) > 1;
    mdl_model m;
    memset(&m, 0, sizeof m);
    void *handle = NULL;
    seqs s = {0};
    molt_status st = mdl_load_quant_ex(model, quant ? &qspec : NULL, ranks ? w : NULL, &m);
    if (st == MOLT_OK && adapter)
        st = hook->attach(&m, adapter, &handle);
    if (st == MOLT_OK)
        st = read_tokens(tokens, m.cfg.vocab_size, &s);
    if (st == MOLT_OK)
        st = ranks ? forward_ranks(&m, &s, out, w) : forward_all(&m, &s, out);
    if (st == MOLT_OK && ag_comm_rank(w) == 0)
        printf("wrote logits of %d sequence%s (%lld tokens) to %s\n", s.n_seq,
               s.n_seq == 1 ? "" : "s", (long long)s.n, out);
    else if (st != MOLT_OK && ranks) {
        char why[2200];
        snprintf(why, sizeof why, "%s: %s", cmd, molt_err_msg());
        ag_comm_abort(w, 1, why);
    } else if (st != MOLT_OK)
        fprintf(stderr, "%s: %s\n", cmd, molt_err_msg());
    seqs_free(&s);
    if (handle)
        hook->detach(handle);
    mdl_free(&m);
    ag_comm_free(w);
    return st == MOLT_OK ? 0 : 1;
}
