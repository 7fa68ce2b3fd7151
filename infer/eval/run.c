// infer/eval/run.c: `molt eval`'s runner: one serving engine (infer/engine/) holds the base
// model and every adapter; each dataset is read once (records.c) and every (example, system)
// pair becomes one unit of work whose requests go to the engine, many at once, so that each
// engine step batches requests of all systems through one forward (base weights read once
// per step, each token with its adapter). A unit is
//   loss      one request scoring the example's tokens (prompt log-probabilities from the
//             first trained token; nothing generated);
//   choice    a request computing the context into the cache, then one request per choice
//             (context + choice, scored from the choice's first token; the context's full
//             cache blocks come from the prefix cache);
//   generate  one request generating the answer (stop strings end it).
// Results fill the results model (results.c); the report is computed and written at the
// end. Not here: reading records (records.c), statistics and files (stats.c, report.c).
#include "run_internal.h"

#include "../engine/engine.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *const task_names[EV_TASK_COUNT] = {"loss", "choice", "generate"};

const char *ev_task_name(ev_task t) {
    return (unsigned)t < EV_TASK_COUNT ? task_names[t] : "?";
}

molt_status ev_task_parse(const char *s, ev_task *t) {
    for (int i = 0; i < EV_TASK_COUNT; i++)
        if (s && !strcmp(s, task_names[i])) {
            *t = (ev_task)i;
            return MOLT_OK;
        }
    return molt_err(MOLT_EARG, "task '%s': expected loss, choice or generate", s ? s : "");
}

void ev_run_opts_default(ev_run_opts *o) {
    memset(o, 0, sizeof *o);
    ev_boot_opts_default(&o->boot);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ---- systems ------------------------------------------------------------------------------------

typedef struct {
    int n;
    const char *name[EV_MAX_SYSTEMS + 1];
    const char *adapter[EV_MAX_SYSTEMS + 1]; // engine adapter name, NULL for the base
    int baseline;
} systems;

static molt_status systems_of(const ev_run_opts *o, systems *sy) {
    memset(sy, 0, sizeof *sy);
    if (o->base)
        sy->name[sy->n++] = "base";
    if (o->n_adapters < 0 || o->n_adapters > EV_MAX_SYSTEMS)
        return molt_err(MOLT_EARG, "eval: %d adapters (at most %d)", o->n_adapters,
                        EV_MAX_SYSTEMS);
    for (int i = 0; i < o->n_adapters; i++) {
        sy->name[sy->n] = o->adapter_name[i];
        sy->adapter[sy->n++] = o->adapter_name[i];
    }
    if (sy->n == 0)
        return molt_err(MOLT_EARG, "eval: no system to evaluate (give --base and/or "
                        "--adapter NAME=PATH)");
    for (int i = 0; i < sy->n; i++) {
        if (!sy->name[i] || !*sy->name[i])
            return molt_err(MOLT_EARG, "eval: an adapter has an empty name");
        for (int j = 0; j < i; j++)
            if (!strcmp(sy->name[i], sy->name[j]))
                return molt_err(MOLT_EARG, "eval: two systems are named '%s'", sy->name[i]);
    }
    sy->baseline = 0;
    if (o->baseline) {
        sy->baseline = -1;
        for (int i = 0; i < sy->n; i++)
            if (!strcmp(sy->name[i], o->baseline))
                sy->baseline = i;
        if (sy->baseline < 0)
            return molt_err(MOLT_EARG, "eval: the baseline '%s' is not one of the systems",
                            o->baseline);
    }
    return MOLT_OK;
}

// ---- work units ---------------------------------------------------------------------------------

typedef struct {
    int64_t item;
    int sys;
    int stage;      // choice: 0 = context being computed, 1 = choices being scored
    int pending;    // its requests in flight
    int to_submit;  // its requests not submitted yet in the current stage
    double nll;     // loss: negative log-likelihood of the trained tokens
    int64_t ntok;   // loss: trained tokens scored
    double sum[EV_MAX_CHOICES];
    char *text;     // generate: the answer so far
    size_t len;
    bool stopped;   // generate: a stop string ended it
    bool done;
} unit;

typedef struct {
    eng_req *q;
    int64_t unit;
    int choice; // choice task, stage 1: which choice; else -1
} flight;

typedef struct {
    const ev_run_opts *o;
    const ev_data_spec *d;
    const systems *sy;
    eng_engine *eng;
    const ev_items *items;
    ev_dataset *ds;
    ev_text_metric *tm; // generate: [n_metrics]
    int n_tm;
    unit *u;
    int64_t n_units, next_unit, units_done;
    flight *f;
    int n_f, cap_f;
    double *sys_nll;    // [n_systems] token-weighted loss numerator
    int64_t *sys_tok;
    int64_t naive;      // tokens a context-per-choice evaluation computes
    double t0, last_print;
} runner;

static molt_status submit(runner *r, int64_t ui, int choice) {
    unit *u = &r->u[ui];
    const ev_item *it = &r->items->it[u->item];
    eng_request q;
    eng_request_default(&q);
    q.adapter = r->sy->adapter[u->sys];
    int32_t *joined = NULL;
    switch (r->d->task) {
    case EV_TASK_LOSS: {
        int first = 1;
        while (first < it->n && !it->mask[first])
            first++;
        q.prompt = it->ids;
        q.n_prompt = it->n;
        q.max_tokens = 0;
        q.prompt_logprobs = true;
        q.prompt_logprobs_from = first;
        r->naive += it->n;
        break;
    }
    case EV_TASK_CHOICE:
        if (choice < 0) { // the shared context, into the cache
            q.prompt = it->ids;
            q.n_prompt = it->n;
            q.max_tokens = 0;
            q.compute_prompt = true;
        } else {
            int nc = it->choice_n[choice];
            joined = molt_malloc((size_t)(it->n + nc) * sizeof *joined);
            if (!joined)
                return molt_err(MOLT_ENOMEM, "eval: out of memory");
            memcpy(joined, it->ids, (size_t)it->n * sizeof *joined);
            memcpy(joined + it->n, it->choice_ids[choice], (size_t)nc * sizeof *joined);
            q.prompt = joined;
            q.n_prompt = it->n + nc;
            q.max_tokens = 0;
            q.prompt_logprobs = true;
            q.prompt_logprobs_from = it->n;
            r->naive += it->n + nc;
        }
        break;
    case EV_TASK_GENERATE:
        q.prompt = it->ids;
        q.n_prompt = it->n;
        q.max_tokens = r->d->max_tokens > 0 ? r->d->max_tokens : 64;
        q.sample.temperature = r->d->temperature;
        q.sample.top_k = r->d->top_k;
        q.sample.top_p = r->d->top_p > 0 ? r->d->top_p : 1;
        q.sample.seed = r->d->seed + (uint64_t)u->item;
        r->naive += it->n;
        break;
    default:
        return molt_err(MOLT_EINTERNAL, "eval: unknown task");
    }
    if (r->n_f == r->cap_f) {
        int cap = r->cap_f ? 2 * r->cap_f : 64;
        flight *f = molt_realloc(r->f, (size_t)cap * sizeof *f);
        if (!f) {
            molt_free(joined);
            return molt_err(MOLT_ENOMEM, "eval: out of memory");
        }
        r->f = f;
        r->cap_f = cap;
    }
    eng_req *h;
    molt_status st = eng_submit(r->eng, &q, &h);
    molt_free(joined);
    if (st != MOLT_OK)
        return molt_err_wrap(st, "%s (system %s)", it->where, r->sy->name[u->sys]);
    r->f[r->n_f++] = (flight){h, ui, choice};
    u->pending++;
    u->to_submit--;
    return MOLT_OK;
}

// Starts a unit: its first stage's requests are queued for submission.
static void start_unit(runner *r, int64_t ui) {
    unit *u = &r->u[ui];
    u->to_submit = 1; // loss, generate: one request; choice: the context first
}

// ---- results ------------------------------------------------------------------------------------

static molt_status finish_unit(runner *r, unit *u) {
    const ev_item *it = &r->items->it[u->item];
    double v[EV_MAX_METRICS];
    double loss = NAN;
    const char *pred = NULL;
    switch (r->d->task) {
    case EV_TASK_LOSS:
        loss = u->ntok ? u->nll / (double)u->ntok : NAN;
        v[0] = loss;
        r->sys_nll[u->sys] += u->nll;
        r->sys_tok[u->sys] += u->ntok;
        break;
    case EV_TASK_CHOICE: {
        int best = 0, best_norm = 0;
        for (int c = 1; c < it->n_choices; c++) { // first maximum on ties, as numpy's argmax
            if (u->sum[c] > u->sum[best])
                best = c;
            if (u->sum[c] / it->choice_chars[c] > u->sum[best_norm] / it->choice_chars[best_norm])
                best_norm = c;
        }
        v[0] = best == it->answer;
        v[1] = best_norm == it->answer;
        loss = -u->sum[it->answer] / it->choice_n[it->answer];
        break;
    }
    case EV_TASK_GENERATE:
        pred = u->text ? u->text : "";
        for (int m = 0; m < r->n_tm; m++) {
            molt_status st = ev_text_metric_eval(&r->tm[m], pred, it->target, &v[m]);
            if (st != MOLT_OK)
                return molt_err_wrap(st, "%s", it->where);
        }
        break;
    default:
        break;
    }
    u->done = true;
    r->units_done++;
    return ev_dataset_set(r->ds, u->item, u->sys, pred, loss, v);
}

// The answer's text so far gets token t; a stop string found in it ends the answer there.
static molt_status on_token(runner *r, flight *f, int32_t t) {
    unit *u = &r->u[f->unit];
    const tok_tokenizer *tok = eng_tokenizer(r->eng);
    if (u->stopped || eng_is_eos(r->eng, t) || tok_is_special(tok, t))
        return MOLT_OK;
    size_t before = u->len;
    MOLT_TRY(tok_decode(tok, &t, 1, &u->text, &u->len));
    for (int i = 0; i < r->d->n_stop; i++) {
        size_t sl = strlen(r->d->stop[i]);
        size_t from = before >= sl ? before - sl + 1 : 0;
        char *hit = sl ? strstr(u->text + from, r->d->stop[i]) : NULL;
        if (hit) {
            u->len = (size_t)(hit - u->text);
            u->text[u->len] = 0;
            u->stopped = true;
            eng_cancel(f->q);
            break;
        }
    }
    return MOLT_OK;
}

// One event of flight f. *gone when the request ended.
static molt_status on_event(runner *r, flight *f, const eng_event *ev, bool *gone) {
    unit *u = &r->u[f->unit];
    const ev_item *it = &r->items->it[u->item];
    *gone = false;
    switch (ev->kind) {
    case ENG_EV_PROMPT:
        if (r->d->task == EV_TASK_LOSS && it->mask[ev->index]) {
            u->nll -= ev->logprob;
            u->ntok++;
        } else if (r->d->task == EV_TASK_CHOICE && f->choice >= 0) {
            u->sum[f->choice] += ev->logprob;
        }
        return MOLT_OK;
    case ENG_EV_TOKEN:
        return r->d->task == EV_TASK_GENERATE ? on_token(r, f, ev->token) : MOLT_OK;
    case ENG_EV_ERROR:
        *gone = true;
        return molt_err(ev->status, "%s (system %s): %s", it->where, r->sy->name[u->sys],
                        ev->message);
    case ENG_EV_DONE:
        *gone = true;
        if (ev->finish == ENG_FINISH_ABORT)
            return molt_err(MOLT_EINTERNAL, "eval: the engine stopped");
        u->pending--;
        if (r->d->task == EV_TASK_CHOICE && u->stage == 0) {
            u->stage = 1; // the context is in the cache: score every choice now
            u->to_submit = it->n_choices;
            return MOLT_OK;
        }
        if (u->pending == 0 && u->to_submit == 0)
            return finish_unit(r, u);
        return MOLT_OK;
    }
    return MOLT_OK;
}

// ---- progress -----------------------------------------------------------------------------------

static void progress(runner *r, bool last) {
    if (!r->o->progress)
        return;
    double t = now_s(), el = t - r->t0;
    bool tty = isatty(2);
    if (!last && t - r->last_print < (tty ? 0.2 : 10.0))
        return;
    r->last_print = t;
    double rate = el > 0 ? (double)r->units_done / el : 0;
    double eta = rate > 0 ? (double)(r->n_units - r->units_done) / rate : 0;
    const char *name = r->d->name ? r->d->name : r->d->path;
    if (tty) {
        int w = 30, fill = r->n_units ? (int)(w * r->units_done / r->n_units) : w;
        fprintf(stderr, "\r%s [%.*s%*s] %lld/%lld %.1f/s ETA %d:%02d ", name, fill,
                "##############################", w - fill, "", (long long)r->units_done,
                (long long)r->n_units, rate, (int)eta / 60, (int)eta % 60);
        if (last)
            fputc('\n', stderr);
    } else {
        fprintf(stderr, "molt eval: %s: %lld/%lld example-systems, %.1f/s, ETA %d:%02d\n", name,
                (long long)r->units_done, (long long)r->n_units, rate, (int)eta / 60,
                (int)eta % 60);
    }
}

// ---- one dataset --------------------------------------------------------------------------------

static molt_status drive(runner *r) {
    int window = 64; // requests in flight: enough to fill the engine's batches
    eng_stats es;
    eng_get_stats(r->eng, &es);
    while (r->units_done < r->n_units) {
        molt_status st = MOLT_OK;
        // units with requests to submit, oldest first, then new units
        for (int64_t i = 0; st == MOLT_OK && i < r->next_unit && r->n_f < window; i++)
            while (st == MOLT_OK && r->u[i].to_submit > 0 && r->n_f < window)
                st = submit(r, i, r->u[i].stage == 1
                                      ? r->items->it[r->u[i].item].n_choices - r->u[i].to_submit
                                      : -1);
        while (st == MOLT_OK && r->next_unit < r->n_units && r->n_f < window) {
            start_unit(r, r->next_unit);
            st = submit(r, r->next_unit++, -1);
        }
        int got = 0;
        for (int k = 0; st == MOLT_OK && k < r->n_f;) {
            eng_event ev;
            bool gone = false;
            while (st == MOLT_OK && !gone && eng_next(r->f[k].q, &ev, 0) == 1) {
                got++;
                st = on_event(r, &r->f[k], &ev, &gone);
            }
            if (gone) {
                eng_release(r->f[k].q);
                r->f[k] = r->f[--r->n_f];
            } else {
                k++;
            }
        }
        if (st != MOLT_OK)
            return st;
        progress(r, false);
        if (!got && r->n_f > 0) { // wait on one queue a little rather than spin
            eng_event ev;
            bool gone = false;
            if (eng_next(r->f[0].q, &ev, 50) == 1) {
                st = on_event(r, &r->f[0], &ev, &gone);
                if (gone) {
                    eng_release(r->f[0].q);
                    r->f[0] = r->f[--r->n_f];
                }
                if (st != MOLT_OK)
                    return st;
            }
        }
    }
    progress(r, true);
    return MOLT_OK;
}

static molt_status metric_defs(const ev_data_spec *d, runner *r, ev_metric_def *defs, int *n) {
    switch (d->task) {
    case EV_TASK_LOSS:
        defs[0] = (ev_metric_def){"loss", false, true};
        *n = 1;
        return MOLT_OK;
    case EV_TASK_CHOICE:
        defs[0] = (ev_metric_def){"acc", true, false};
        defs[1] = (ev_metric_def){"acc_norm", true, false};
        *n = 2;
        return MOLT_OK;
    default:
        break;
    }
    int nm = d->n_metrics ? d->n_metrics : 1;
    if (nm > EV_MAX_METRICS)
        return molt_err(MOLT_EARG, "eval: %d metrics (at most %d)", nm, EV_MAX_METRICS);
    r->tm = molt_calloc((size_t)nm, sizeof *r->tm);
    if (!r->tm)
        return molt_err(MOLT_ENOMEM, "eval: out of memory");
    for (int m = 0; m < nm; m++) {
        MOLT_TRY(ev_text_metric_parse(&r->tm[m], d->n_metrics ? d->metrics[m] : "exact_match"));
        r->n_tm = m + 1;
        defs[m] = ev_text_metric_def(&r->tm[m]);
    }
    *n = nm;
    return MOLT_OK;
}

static molt_status run_dataset(const ev_run_opts *o, const ev_data_spec *d, const systems *sy,
                               eng_engine *eng, const chat_template *ct, ev_dataset *ds,
                               ev_run_summary *sum, int di) {
    ev_read_ctx x = {.task = d->task, .ct = ct, .tok = eng_tokenizer(eng),
                     .max_len = eng_max_model_len(eng),
                     .max_tokens = d->max_tokens > 0 ? d->max_tokens : 64, .limit = o->limit,
                     .skip_bad = o->skip_bad};
    ev_items items;
    eng_stats before, after;
    eng_get_stats(eng, &before);
    molt_status st = ev_items_read(&x, d->path, &items);
    sum->bad += items.bad;
    if (st != MOLT_OK)
        return st;
    runner r = {.o = o, .d = d, .sy = sy, .eng = eng, .items = &items, .ds = ds,
                .t0 = now_s()};
    ev_metric_def defs[EV_MAX_METRICS];
    int nm = 0;
    st = metric_defs(d, &r, defs, &nm);
    if (st == MOLT_OK)
        st = ev_dataset_init(ds, d->name ? d->name : d->path, ev_task_name(d->task), sy->n,
                             sy->name, sy->baseline, nm, defs);
    for (int64_t i = 0; st == MOLT_OK && i < items.n; i++)
        st = ev_dataset_add(ds, items.it[i].id, items.it[i].category, items.it[i].target);
    r.n_units = items.n * sy->n;
    r.u = molt_calloc((size_t)(r.n_units > 0 ? r.n_units : 1), sizeof *r.u);
    r.sys_nll = molt_calloc((size_t)sy->n, sizeof *r.sys_nll);
    r.sys_tok = molt_calloc((size_t)sy->n, sizeof *r.sys_tok);
    if (st == MOLT_OK && (!r.u || !r.sys_nll || !r.sys_tok))
        st = molt_err(MOLT_ENOMEM, "eval: out of memory");
    // system-major within each example: the systems of one example run side by side
    for (int64_t i = 0; st == MOLT_OK && i < r.n_units; i++)
        r.u[i] = (unit){.item = i / sy->n, .sys = (int)(i % sy->n)};
    if (st == MOLT_OK)
        st = drive(&r);
    for (int k = 0; k < r.n_f; k++)
        eng_release(r.f[k].q);
    for (int s = 0; st == MOLT_OK && d->task == EV_TASK_LOSS && s < sy->n; s++)
        sum->token_loss[di * sy->n + s] = r.sys_tok[s] ? r.sys_nll[s] / (double)r.sys_tok[s]
                                                       : NAN;
    sum->tokens_naive += r.naive;
    sum->examples += items.n;
    eng_get_stats(eng, &after);
    sum->data_computed[di] = after.prompt_tokens - before.prompt_tokens;
    sum->data_cached[di] = after.prefix_hit_tokens - before.prefix_hit_tokens;
    sum->data_naive[di] = r.naive;
    for (int64_t i = 0; i < r.n_units; i++)
        molt_free(r.u[i].text);
    for (int m = 0; m < r.n_tm; m++)
        ev_text_metric_free(&r.tm[m]);
    molt_free(r.tm);
    molt_free(r.u);
    molt_free(r.f);
    molt_free(r.sys_nll);
    molt_free(r.sys_tok);
    ev_items_free(&items);
    return st;
}

// ---- the run ------------------------------------------------------------------------------------

static molt_status make_engine(const ev_run_opts *o, const systems *sy, eng_engine **out) {
    eng_opts eo;
    eng_opts_default(&eo);
    eo.model_dir = o->model_dir;
    eo.base_quant = o->base_quant;
    eo.tokenizer = o->tokenizer;
    eo.block_tokens = 8; // small blocks: a choice recomputes at most 7 context tokens
    if (o->kv_cache_mib > 0)
        eo.kv_cache_mib = o->kv_cache_mib;
    if (o->max_batch_tokens > 0)
        eo.max_batch_tokens = o->max_batch_tokens;
    if (o->max_num_seqs > 0)
        eo.max_num_seqs = o->max_num_seqs;
    if (eo.max_num_seqs > eo.max_batch_tokens)
        eo.max_num_seqs = eo.max_batch_tokens;
    eo.max_loaded_adapters = o->n_adapters > 0 ? o->n_adapters : 1;
    MOLT_TRY(eng_create(&eo, out));
    molt_status st = MOLT_OK;
    for (int i = 0; st == MOLT_OK && i < o->n_adapters; i++)
        if ((st = eng_adapter_add(*out, o->adapter_name[i], o->adapter_path[i])) != MOLT_OK)
            st = molt_err_wrap(st, "adapter %s (%s)", o->adapter_name[i], o->adapter_path[i]);
    if (st == MOLT_OK)
        st = eng_start(*out);
    if (st != MOLT_OK) {
        eng_free(*out);
        *out = NULL;
    }
    (void)sy;
    return st;
}

molt_status ev_run(const ev_run_opts *o, ev_run_summary *sum) {
    memset(sum, 0, sizeof *sum);
    double t0 = now_s();
    systems sy;
    MOLT_TRY(systems_of(o, &sy));
    MOLT_TRY(ev_boot_opts_check(&o->boot));
    if (o->n_data < 1 || o->n_data > EV_MAX_DATA)
        return molt_err(MOLT_EARG, "eval: %d datasets (1 to %d)", o->n_data, EV_MAX_DATA);
    sum->n_systems = sy.n;
    sum->n_data = o->n_data;
    eng_engine *eng;
    MOLT_TRY(make_engine(o, &sy, &eng));
    chat_template *ct = NULL;
    molt_status st = chat_template_new(eng_tokenizer(eng), NULL, &ct);
    ev_dataset *ds = molt_calloc((size_t)o->n_data, sizeof *ds);
    if (st == MOLT_OK && !ds)
        st = molt_err(MOLT_ENOMEM, "eval: out of memory");
    eng_stats before, after;
    eng_get_stats(eng, &before);
    int done = 0;
    for (int i = 0; st == MOLT_OK && i < o->n_data; i++) {
        st = run_dataset(o, &o->data[i], &sy, eng, ct, &ds[i], sum, i);
        if (st == MOLT_OK)
            done = i + 1;
        else
            ev_dataset_free(&ds[i]);
    }
    eng_get_stats(eng, &after);
    sum->tokens_computed = after.prompt_tokens - before.prompt_tokens;
    sum->tokens_cached = after.prefix_hit_tokens - before.prefix_hit_tokens;
    eng_free(eng);
    chat_template_free(ct);
    ev_report rep = {0};
    const ev_dataset *dp[EV_MAX_DATA];
    for (int i = 0; i < done; i++)
        dp[i] = &ds[i];
    bool computed = false;
    if (st == MOLT_OK && (st = ev_report_compute(&rep, dp, done, &o->boot)) == MOLT_OK)
        computed = true;
    if (st == MOLT_OK && o->out_dir)
        st = ev_report_write(&rep, o->out_dir, o->config_json);
    if (st == MOLT_OK)
        ev_report_print(&rep, stdout);
    if (computed)
        ev_report_free(&rep);
    for (int i = 0; i < done; i++)
        ev_dataset_free(&ds[i]);
    molt_free(ds);
    sum->seconds = now_s() - t0;
    return st;
}
