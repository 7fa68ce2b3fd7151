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
// end. Across ranks each rank runs its share of the examples (and, with the experts split,
// its engine steps with its expert group's), then rank 0 gathers the results and alone
// writes the report. Not here: reading records (records.c), statistics and files (stats.c,
// report.c).
#include "run_internal.h"

#include "../../autograd/comm/comm.h"
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
    double *nll;        // loss: [item * n_systems + system] NLL of the trained tokens
    int64_t *ntok;      // and how many they are
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
        r->nll[u->item * r->sy->n + u->sys] = u->nll;
        r->ntok[u->item * r->sy->n + u->sys] = u->ntok;
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

// What a dataset's run leaves for the end of the run (the gather across ranks and the
// token-weighted losses): per example and system, the loss task's NLL and token count (as
// many examples as the dataset's results hold).
typedef struct {
    double *nll;   // [n_examples * n_systems]
    int64_t *ntok;
} part;

static void part_free(part *p) {
    molt_free(p->nll);
    molt_free(p->ntok);
    memset(p, 0, sizeof *p);
}

// Whether this rank runs example i (rank i % ranks).
static bool mine(const ev_run_summary *sum, int64_t i) {
    return i % sum->ranks == sum->rank;
}

static molt_status run_dataset(const ev_run_opts *o, const ev_data_spec *d, const systems *sy,
                               eng_engine *eng, const chat_template *ct, ev_dataset *ds,
                               ev_run_summary *sum, int di, part *pt) {
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
    int64_t owned = 0;
    for (int64_t i = 0; i < items.n; i++)
        owned += mine(sum, i);
    r.n_units = owned * sy->n;
    r.u = molt_calloc((size_t)(r.n_units > 0 ? r.n_units : 1), sizeof *r.u);
    size_t cells = (size_t)(items.n > 0 ? items.n : 1) * (size_t)sy->n;
    pt->nll = r.nll = molt_calloc(cells, sizeof *r.nll);
    pt->ntok = r.ntok = molt_calloc(cells, sizeof *r.ntok);
    if (st == MOLT_OK && (!r.u || !r.nll || !r.ntok))
        st = molt_err(MOLT_ENOMEM, "eval: out of memory");
    // this rank's examples; system-major within each: its systems run side by side
    for (int64_t i = 0, k = 0; st == MOLT_OK && i < items.n; i++)
        for (int s = 0; mine(sum, i) && s < sy->n; s++)
            r.u[k++] = (unit){.item = i, .sys = s};
    if (st == MOLT_OK)
        st = drive(&r);
    for (int k = 0; k < r.n_f; k++)
        eng_release(r.f[k].q);
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
    ev_items_free(&items);
    return st;
}

// ---- the run ------------------------------------------------------------------------------------

static molt_status make_engine(const ev_run_opts *o, ag_comm *experts, eng_engine **out) {
    eng_opts eo;
    eng_opts_default(&eo);
    eo.model_dir = o->model_dir;
    eo.base_quant = o->base_quant;
    eo.tokenizer = o->tokenizer;
    eo.experts = experts;
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
    return st;
}

// ---- across ranks ---------------------------------------------------------------------------------
// Each rank other than 0 sends rank 0 its examples' results, in dataset, example and system
// order: per (example, system) the example index (i64), the loss (f64), the NLL (f64) and
// token count (i64) of the loss task, the metric values (f64 each), the prediction's length
// (i32, -1 for none) and bytes. Rank 0 knows which examples each rank ran and checks the
// indices it reads.

typedef struct {
    uint8_t *b;
    size_t n, cap;
} buf;

static bool put(buf *w, const void *p, size_t n) {
    if (w->n + n > w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 4096;
        while (cap < w->n + n)
            cap *= 2;
        uint8_t *nb = molt_realloc(w->b, cap);
        if (!nb)
            return false;
        w->b = nb;
        w->cap = cap;
    }
    memcpy(w->b + w->n, p, n);
    w->n += n;
    return true;
}

static molt_status pack(const ev_dataset *ds, const part *pt, int n_data,
                        const ev_run_summary *sum, buf *w) {
    for (int d = 0; d < n_data; d++) {
        int nm = ds[d].n_metrics, ns = ds[d].n_systems;
        for (int64_t i = 0; i < ds[d].n_examples; i++)
            for (int s = 0; mine(sum, i) && s < ns; s++) {
                const ev_example *x = &ds[d].ex[i];
                int32_t len = x->pred[s] ? (int32_t)strlen(x->pred[s]) : -1;
                size_t c = (size_t)i * (size_t)ns + (size_t)s;
                if (!put(w, &i, sizeof i) || !put(w, &x->loss[s], sizeof(double)) ||
                    !put(w, &pt[d].nll[c], sizeof(double)) ||
                    !put(w, &pt[d].ntok[c], sizeof(int64_t)) ||
                    !put(w, &x->values[(size_t)s * (size_t)nm], (size_t)nm * sizeof(double)) ||
                    !put(w, &len, sizeof len) || (len > 0 && !put(w, x->pred[s], (size_t)len)))
                    return molt_err(MOLT_ENOMEM, "eval: out of memory packing the results");
            }
    }
    static const uint8_t zero[4] = {0};
    return put(w, zero, (4 - w->n % 4) % 4) ? MOLT_OK
                                            : molt_err(MOLT_ENOMEM, "eval: out of memory");
}

// Reads rank `from`'s results (b[0..n)) into the datasets.
static molt_status unpack(ev_dataset *ds, part *pt, int n_data, int ranks, int from,
                          const uint8_t *b, size_t n) {
    size_t at = 0;
#define TAKE(p, k)                                                                           \
    do {                                                                                     \
        if (at + (k) > n)                                                                    \
            return molt_err(MOLT_EIO, "eval: rank %d's results end early (%zu bytes)", from, \
                            n);                                                              \
        memcpy((p), b + at, (k));                                                            \
        at += (k);                                                                           \
    } while (0)
    double v[EV_MAX_METRICS];
    for (int d = 0; d < n_data; d++) {
        int nm = ds[d].n_metrics, ns = ds[d].n_systems;
        for (int64_t i = from; i < ds[d].n_examples; i += ranks)
            for (int s = 0; s < ns; s++) {
                int64_t item, ntok;
                double loss, nll;
                int32_t len;
                TAKE(&item, sizeof item);
                if (item != i)
                    return molt_err(MOLT_EIO, "eval: rank %d sent example %lld of %s where "
                                    "%lld was due", from, (long long)item, ds[d].name,
                                    (long long)i);
                TAKE(&loss, sizeof loss);
                TAKE(&nll, sizeof nll);
                TAKE(&ntok, sizeof ntok);
                TAKE(v, (size_t)nm * sizeof *v);
                TAKE(&len, sizeof len);
                if (len < -1 || (len >= 0 && (size_t)len > n - at))
                    return molt_err(MOLT_EIO, "eval: rank %d sent a prediction of %d bytes",
                                    from, len);
                char *pred = NULL;
                if (len >= 0) {
                    if (!(pred = molt_malloc((size_t)len + 1)))
                        return molt_err(MOLT_ENOMEM, "eval: out of memory");
                    memcpy(pred, b + at, (size_t)len);
                    pred[len] = 0;
                    at += (size_t)len;
                }
                size_t c = (size_t)i * (size_t)ns + (size_t)s;
                pt[d].nll[c] = nll;
                pt[d].ntok[c] = ntok;
                molt_status st = ev_dataset_set(&ds[d], i, s, pred, loss, v);
                molt_free(pred);
                MOLT_TRY(st);
            }
    }
#undef TAKE
    return MOLT_OK;
}

// Brings every rank's results to rank 0 (one all-to-all of bytes, as i32 rows) and sums the
// token counters over the ranks.
static molt_status gather(ag_comm *w, ev_dataset *ds, part *pt, int n_data, ev_run_summary *sum,
                          double waited_s) {
    int P = sum->ranks;
    double t = ag_comm_timeout(w);
    ag_comm_set_timeout(w, t + waited_s); // a rank with a longer share is still working
    double cnt[3 + 3 * EV_MAX_DATA] = {(double)sum->tokens_computed,
                                       (double)sum->tokens_cached, (double)sum->tokens_naive};
    for (int d = 0; d < n_data; d++) {
        cnt[3 + 3 * d] = (double)sum->data_computed[d];
        cnt[4 + 3 * d] = (double)sum->data_cached[d];
        cnt[5 + 3 * d] = (double)sum->data_naive[d];
    }
    buf wb = {0};
    int64_t *rows = molt_calloc((size_t)P * 2, sizeof *rows), *recv_rows = rows ? rows + P : NULL;
    uint8_t *recv = NULL;
    molt_status st = rows ? MOLT_OK : molt_err(MOLT_ENOMEM, "eval: out of memory");
    if (st == MOLT_OK && sum->rank != 0)
        st = pack(ds, pt, n_data, sum, &wb);
    if (st == MOLT_OK) {
        rows[0] = (int64_t)(wb.n / 4);
        st = ag_comm_alltoall_counts(w, rows, recv_rows);
    }
    int64_t total = 0;
    for (int r = 0; st == MOLT_OK && r < P; r++)
        total += recv_rows[r];
    if (st == MOLT_OK && !(recv = molt_malloc((size_t)(total > 0 ? total : 1) * 4)))
        st = molt_err(MOLT_ENOMEM, "eval: out of memory for %lld bytes of results",
                      (long long)total * 4);
    static const int32_t nothing = 0; // rank 0 sends nothing
    if (st == MOLT_OK)
        st = ag_comm_alltoallv(w, wb.b ? (const void *)wb.b : &nothing, rows, recv, recv_rows, 1,
                               AG_I32);
    for (int64_t r = 1, off = 0; st == MOLT_OK && sum->rank == 0 && r < P; r++) {
        off += recv_rows[r - 1];
        st = unpack(ds, pt, n_data, P, (int)r, recv + off * 4, (size_t)recv_rows[r] * 4);
    }
    if (st == MOLT_OK)
        st = ag_comm_allreduce(w, cnt, 3 + 3 * n_data, AG_F64, AG_COMM_SUM);
    if (st == MOLT_OK) {
        sum->tokens_computed = (int64_t)cnt[0];
        sum->tokens_cached = (int64_t)cnt[1];
        sum->tokens_naive = (int64_t)cnt[2];
        for (int d = 0; d < n_data; d++) {
            sum->data_computed[d] = (int64_t)cnt[3 + 3 * d];
            sum->data_cached[d] = (int64_t)cnt[4 + 3 * d];
            sum->data_naive[d] = (int64_t)cnt[5 + 3 * d];
        }
    }
    ag_comm_set_timeout(w, t);
    molt_free(wb.b);
    molt_free(rows);
    molt_free(recv);
    return st;
}

// The job's layout: ranks, this rank, and the expert group (NULL when every rank holds
// every expert).
static molt_status layout(const ev_run_opts *o, ev_run_summary *sum, ag_comm **experts) {
    *experts = NULL;
    sum->ranks = o->world ? ag_comm_size(o->world) : 1;
    sum->rank = o->world ? ag_comm_rank(o->world) : 0;
    int D, E;
    if (ag_comm_layout(sum->ranks, o->par_expert, o->par_data, &D, &E) != MOLT_OK)
        return molt_err_wrap(MOLT_EARG, "eval");
    if (E == 1)
        return MOLT_OK;
    // consecutive ranks form an expert group, as in molt train
    return ag_comm_split(o->world, sum->rank / E, sum->rank % E, "expert", experts);
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
    ag_comm *experts = NULL;
    MOLT_TRY(layout(o, sum, &experts));
    ev_run_opts mine_o = *o;
    mine_o.progress = o->progress && sum->rank == 0; // rank 0 shows its own share
    eng_engine *eng;
    molt_status st = make_engine(&mine_o, experts, &eng);
    if (st != MOLT_OK) {
        ag_comm_free(experts);
        return st;
    }
    chat_template *ct = NULL;
    st = chat_template_new(eng_tokenizer(eng), NULL, &ct);
    ev_dataset *ds = molt_calloc((size_t)o->n_data, sizeof *ds);
    part *pt = molt_calloc((size_t)o->n_data, sizeof *pt);
    if (st == MOLT_OK && (!ds || !pt))
        st = molt_err(MOLT_ENOMEM, "eval: out of memory");
    eng_stats before, after;
    eng_get_stats(eng, &before);
    int done = 0;
    for (int i = 0; st == MOLT_OK && i < o->n_data; i++) {
        st = run_dataset(&mine_o, &o->data[i], &sy, eng, ct, &ds[i], sum, i, &pt[i]);
        if (st == MOLT_OK)
            done = i + 1;
        else
            ev_dataset_free(&ds[i]);
    }
    eng_get_stats(eng, &after);
    sum->tokens_computed = after.prompt_tokens - before.prompt_tokens;
    sum->tokens_cached = after.prefix_hit_tokens - before.prefix_hit_tokens;
    eng_free(eng); // in an expert group: once every rank is done (the engines stop together)
    ag_comm_free(experts);
    chat_template_free(ct);
    if (st == MOLT_OK && sum->ranks > 1)
        st = gather(o->world, ds, pt, done, sum, now_s() - t0);
    // token-weighted losses, summed in example order (the same sums for any rank count)
    for (int d = 0; st == MOLT_OK && sum->rank == 0 && d < done; d++) {
        if (o->data[d].task != EV_TASK_LOSS)
            continue;
        for (int s = 0; s < sy.n; s++) {
            double nll = 0;
            int64_t tok = 0;
            for (int64_t i = 0; i < ds[d].n_examples; i++) {
                nll += pt[d].nll[i * sy.n + s];
                tok += pt[d].ntok[i * sy.n + s];
            }
            sum->token_loss[d * sy.n + s] = tok ? nll / (double)tok : NAN;
        }
    }
    ev_report rep = {0};
    const ev_dataset *dp[EV_MAX_DATA];
    for (int i = 0; i < done; i++)
        dp[i] = &ds[i];
    bool computed = false;
    if (st == MOLT_OK && sum->rank == 0) {
        if ((st = ev_report_compute(&rep, dp, done, &o->boot)) == MOLT_OK)
            computed = true;
        if (st == MOLT_OK && o->out_dir)
            st = ev_report_write(&rep, o->out_dir, o->config_json);
        if (st == MOLT_OK)
            ev_report_print(&rep, stdout);
    }
    if (computed)
        ev_report_free(&rep);
    for (int i = 0; i < done; i++)
        ev_dataset_free(&ds[i]);
    for (int i = 0; pt && i < o->n_data; i++)
        part_free(&pt[i]);
    molt_free(pt);
    molt_free(ds);
    sum->seconds = now_s() - t0;
    return st;
}
