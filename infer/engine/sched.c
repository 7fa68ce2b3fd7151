// infer/engine/sched.c: one step of continuous batching on the engine thread. A step takes
// the new requests, then plans ONE forward: the next token of every running sequence (each
// needs room for one more token in the cache: when none is left, the newest running sequence
// is preempted, its blocks freed, and it goes back to the waiting list to be computed again
// later), then chunks of waiting prompts in arrival order within max_batch_tokens (a prompt's
// leading blocks may come from the prefix cache). It runs the forward with every sequence's
// adapter slot (mdl_forward_spans), then samples, delivers events and retires finished
// sequences. In an expert group (eng_opts.experts) the ranks' steps go in lockstep: one
// allreduce per step says whether any rank has work; a rank without any serves its experts.
// Not here: the threads and request handles (engine.c), adapters (pool.c).
#include "eng_internal.h"

#include "../../autograd/comm/comm.h"

#include <math.h>
#include <string.h>

// ---- lists --------------------------------------------------------------------------------------

// Inserts q into *list in arrival order (ids ascending).
static void list_insert(eng_req **list, eng_req *q) {
    while (*list && (*list)->id < q->id)
        list = &(*list)->next;
    q->next = *list;
    *list = q;
}

static void list_remove(eng_req **list, eng_req *q) {
    for (; *list; list = &(*list)->next)
        if (*list == q) {
            *list = q->next;
            q->next = NULL;
            return;
        }
}

static void show_state(eng_engine *e);

// Moves what was submitted since the last step to the waiting list.
static void take_incoming(eng_engine *e) {
    pthread_mutex_lock(&e->mu);
    eng_req *q = e->incoming;
    e->incoming = e->incoming_tail = NULL;
    while (q) {
        eng_req *next = q->next;
        q->state = RQ_WAITING;
        list_insert(&e->waiting, q);
        e->n_waiting++;
        q = next;
    }
    show_state(e);
    pthread_mutex_unlock(&e->mu);
}

// ---- ending requests ------------------------------------------------------------------------------

static void drop_cache(eng_engine *e, eng_req *q) {
    if (q->kv_seq >= 0)
        mdl_kv_seq_close(&e->kv, q->kv_seq);
    q->kv_seq = -1;
}

static void unlist(eng_engine *e, eng_req *q) {
    if (q->state == RQ_RUNNING) {
        list_remove(&e->running, q);
        e->n_running--;
    } else if (q->state == RQ_WAITING) {
        list_remove(&e->waiting, q);
        e->n_waiting--;
    }
    q->state = RQ_DONE;
}

// Lets go of q's adapter and shows the engine state q leaves behind.
static void release_adapter(eng_engine *e, eng_req *q) {
    pthread_mutex_lock(&e->mu);
    eng_pool_release(e, q->ad);
    show_state(e);
    pthread_mutex_unlock(&e->mu);
    q->ad = NULL;
}

// What eng_get_stats shows of the engine thread's state (called with e->mu held), so that
// a client that has seen its request end also sees its blocks and its place given back.
static void show_state(eng_engine *e) {
    e->st.kv_blocks_used = mdl_kv_blocks_used(&e->kv);
    e->st.running = e->n_running;
    e->st.waiting = e->n_waiting;
}

static void finish(eng_engine *e, eng_req *q, eng_finish why) {
    drop_cache(e, q);
    unlist(e, q);
    release_adapter(e, q);
    eng_event ev = {.kind = ENG_EV_DONE, .finish = why, .n_prompt = q->r.n_prompt,
                    .n_gen = q->n_tokens - q->r.n_prompt, .n_cached = q->n_cached,
                    .stop_token = why == ENG_FINISH_STOP ? q->stop_token : -1};
    eng_req_push(q, &ev);
    eng_req_unref(q);
}

static void fail(eng_engine *e, eng_req *q, molt_status st, const char *msg) {
    drop_cache(e, q);
    unlist(e, q);
    release_adapter(e, q);
    eng_event ev = {.kind = ENG_EV_ERROR, .status = st};
    snprintf(ev.message, sizeof ev.message, "%s", msg);
    eng_req_push(q, &ev);
    eng_req_unref(q);
}

void eng_finish_all(eng_engine *e, eng_finish why) {
    take_incoming(e);
    while (e->running)
        finish(e, e->running, why);
    while (e->waiting)
        finish(e, e->waiting, why);
}

// ---- log-probabilities and sampling -------------------------------------------------------------

// log softmax(row)[tok] and the n most probable ids (ties: lower id first) with theirs.
static void logprobs(const float *row, int64_t V, int32_t tok, int n, eng_event *ev) {
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < V; j++)
        mx = row[j] > mx ? row[j] : mx;
    for (int64_t j = 0; j < V; j++)
        sum += exp((double)row[j] - mx);
    double lse = mx + log(sum);
    ev->logprob = (double)row[tok] - lse;
    ev->n_top = 0;
    for (int64_t j = 0; j < V && n > 0; j++) {
        int k = ev->n_top;
        if (k == n && row[j] <= row[ev->top_ids[k - 1]])
            continue;
        if (k < n)
            ev->n_top++;
        else
            k--;
        while (k > 0 && row[j] > row[ev->top_ids[k - 1]]) {
            ev->top_ids[k] = ev->top_ids[k - 1];
            k--;
        }
        ev->top_ids[k] = (int32_t)j;
    }
    for (int i = 0; i < ev->n_top; i++)
        ev->top_logprobs[i] = (double)row[ev->top_ids[i]] - lse;
}

static bool is_stop(const eng_engine *e, const eng_req *q, int32_t t) {
    for (int i = 0; i < q->r.n_stop_ids; i++)
        if (q->r.stop_ids[i] == t)
            return true;
    return !q->r.ignore_eos && eng_is_eos(e, t);
}

// Samples q's next token from its logits row (greedy: the argmax `top` found beforehand, or -1
// to find it here), delivers it, and ends q when it should stop. Returns false when q ended.
static bool next_token(eng_engine *e, eng_req *q, const float *row, int32_t top) {
    int64_t V = e->model.cfg.vocab_size;
    int n_gen = q->n_tokens - q->r.n_prompt;
    if (n_gen >= q->r.max_tokens) {
        finish(e, q, ENG_FINISH_LENGTH);
        return false;
    }
    int32_t tok = top;
    molt_status st = MOLT_OK;
    if (tok < 0) { // a sampled draw, or a NaN that inf_sample reports
        e->smp.o = q->r.sample;
        e->smp.rng = q->rng;
        st = inf_sample(&e->smp, row, V, &tok);
        q->rng = e->smp.rng;
    }
    if (st != MOLT_OK) {
        fail(e, q, st, molt_err_msg());
        return false;
    }
    eng_event ev = {.kind = ENG_EV_TOKEN, .index = n_gen, .token = tok, .logprob = NAN};
    if (q->r.logprobs >= 0)
        logprobs(row, V, tok, q->r.logprobs, &ev);
    q->tokens[q->n_tokens++] = tok;
    eng_req_push(q, &ev);
    e->acc.generated_tokens++;
    if (is_stop(e, q, tok)) {
        q->stop_token = tok;
        finish(e, q, ENG_FINISH_STOP);
    }
    else if (n_gen + 1 >= q->r.max_tokens || q->n_tokens >= e->max_model_len)
        finish(e, q, ENG_FINISH_LENGTH);
    else
        return true;
    return false;
}

// ---- planning ---------------------------------------------------------------------------------------

typedef struct {
    mdl_span *sp;
    eng_req **rq;
    int n, cap;
} plan;

static bool plan_add(plan *p, eng_req *q, mdl_span s) {
    if (p->n == p->cap) {
        int cap = p->cap ? 2 * p->cap : 64;
        mdl_span *sp = molt_realloc(p->sp, (size_t)cap * sizeof *sp);
        if (!sp)
            return false;
        p->sp = sp;
        eng_req **rq = molt_realloc(p->rq, (size_t)cap * sizeof *rq);
        if (!rq)
            return false;
        p->rq = rq;
        p->cap = cap;
    }
    p->sp[p->n] = s;
    p->rq[p->n++] = q;
    return true;
}

static int slot_of(const eng_req *q) { return q->ad ? q->ad->slot : -1; }

// Sends q back to the waiting list with nothing in the cache (it is computed again later).
static void preempt(eng_engine *e, eng_req *q) {
    drop_cache(e, q);
    q->n_computed = 0;
    q->published = false;
    list_remove(&e->running, q);
    e->n_running--;
    q->state = RQ_WAITING;
    list_insert(&e->waiting, q);
    e->n_waiting++;
    e->acc.preemptions++;
}

// Gives up a waiting sequence's partial prefill (its blocks go back to the pool).
static void unprefill(eng_engine *e, eng_req *q) {
    drop_cache(e, q);
    q->n_computed = 0;
    q->published = false;
}

// The newest sequence holding cache blocks that may give them up for q: waiting ones with a
// partial prefill, and (when running_too) running ones newer than q, which are not planned
// yet. NULL when none is newer than q.
static eng_req *victim_for(eng_engine *e, const eng_req *q, bool running_too) {
    eng_req *v = NULL;
    for (eng_req *x = e->waiting; x; x = x->next)
        if (x != q && x->kv_seq >= 0 && (!v || x->id > v->id))
            v = x;
    if (running_too)
        for (eng_req *x = e->running; x; x = x->next)
            if (x->id > q->id && (!v || x->id > v->id))
                v = x;
    return v;
}

// Room for n more tokens of q's sequence, taken from newer sequences when the cache is full.
static bool make_room(eng_engine *e, eng_req *q, int n, bool running_too) {
    while (mdl_kv_reserve(&e->kv, q->kv_seq, n) != MOLT_OK) {
        eng_req *v = victim_for(e, q, running_too);
        if (!v || (!running_too && v->id < q->id))
            return false;
        if (v->state == RQ_RUNNING)
            preempt(e, v);
        else
            unprefill(e, v);
    }
    return true;
}

// The next token of every running sequence, oldest first; when the cache is full, newer
// sequences give up their blocks, and a sequence with nothing newer to take from is
// preempted itself (with everything after it, which is newer still).
static int plan_decode(eng_engine *e, plan *p) {
    int n = 0;
    for (eng_req *q = e->running; q;) {
        if (!make_room(e, q, 1, true)) {
            while (q) { // q and the rest (newer) go back to waiting
                eng_req *next = q->next;
                preempt(e, q);
                q = next;
            }
            break;
        }
        mdl_span s = {q->kv_seq, &q->tokens[q->n_computed], 1, 0, slot_of(q), 1};
        if (!plan_add(p, q, s))
            break;
        n++;
        q = q->next;
    }
    return n;
}

// Opens q's cache sequence, taking its leading prompt blocks from the prefix cache.
static molt_status open_sequence(eng_engine *e, eng_req *q) {
    MOLT_TRY(mdl_kv_seq_open(&e->kv, &q->kv_seq));
    q->n_computed = 0;
    // prompt log-probabilities need the logits of the rows before the tokens they score
    int limit = q->r.n_prompt - 1;
    if (q->r.prompt_logprobs && q->next_prompt_lp - 1 < limit)
        limit = q->next_prompt_lp - 1;
    if (!e->o.no_prefix_caching) {
        uint64_t tag = q->ad ? q->ad->uid : 0;
        int n = mdl_kv_prefix_match(&e->kv, q->kv_seq, tag, q->tokens, limit);
        q->n_computed = n;
        if (q->n_cached == 0)
            q->n_cached = n;
        e->acc.prefix_hit_tokens += n;
        e->acc.prefix_query_tokens += q->r.n_prompt;
    }
    return MOLT_OK;
}

// Whether q's adapter is in its bank slot (asking for it when not); fails q when its
// adapter could not be read.
static bool adapter_ready(eng_engine *e, eng_req *q) {
    if (!q->ad)
        return true;
    pthread_mutex_lock(&e->mu);
    bool ready = eng_pool_want(e, q->ad);
    char msg[600] = "";
    if (!ready && q->ad->state == ENT_IDLE && q->ad->load_error[0])
        snprintf(msg, sizeof msg, "adapter `%.100s`: %.480s", q->ad->name, q->ad->load_error);
    if (ready)
        q->ad->last_used = e->step;
    pthread_mutex_unlock(&e->mu);
    if (msg[0])
        fail(e, q, MOLT_EIO, msg);
    return ready;
}

// Chunks of waiting sequences (arrival order) within the token budget; at most max_num_seqs
// sequences hold cache blocks.
static void plan_prefill(eng_engine *e, plan *p, int budget) {
    int active = e->n_running;
    for (eng_req *q = e->waiting; q; q = q->next)
        active += q->kv_seq >= 0;
    for (eng_req *q = e->waiting; q && budget > 0;) {
        eng_req *next = q->next;
        if (q->kv_seq < 0 && active >= e->o.max_num_seqs)
            break;
        if (q->r.max_tokens == 0 && !q->r.prompt_logprobs && !q->r.compute_prompt) {
            // nothing to compute
            finish(e, q, ENG_FINISH_LENGTH);
            q = next;
            continue;
        }
        if (!adapter_ready(e, q)) {
            q = next;
            continue;
        }
        if (q->kv_seq < 0) {
            if (open_sequence(e, q) != MOLT_OK) {
                fail(e, q, MOLT_ENOMEM, molt_err_msg());
                q = next;
                continue;
            }
            active++;
        }
        int todo = q->n_tokens - q->n_computed;
        int chunk = todo < budget ? todo : budget;
        if (!make_room(e, q, chunk, false))
            break; // the cache is full: the running sequences go first
        int start = q->n_computed, end = start + chunk, np = q->r.n_prompt;
        int expanded = (end < np ? end : np) - start;
        // rows whose logits are needed: those predicting a prompt token due for its
        // log-probability (a suffix of the chunk), and the last known token's to sample
        int n_logits = 0;
        if (q->r.prompt_logprobs && q->next_prompt_lp < np && q->next_prompt_lp - 1 < end) {
            int from = q->next_prompt_lp - 1 > start ? q->next_prompt_lp - 1 : start;
            n_logits = end - from;
        }
        if (end == q->n_tokens && q->n_tokens - q->r.n_prompt < q->r.max_tokens &&
            n_logits == 0)
            n_logits = 1;
        mdl_span s = {q->kv_seq, &q->tokens[start], chunk, expanded > 0 ? expanded : 0,
                      slot_of(q), n_logits};
        if (!plan_add(p, q, s))
            break;
        budget -= chunk;
        q = next;
    }
}

// ---- after the forward ------------------------------------------------------------------------------

// Prompt log-probabilities due in the rows of span s (rows predict the token after theirs).
static void prompt_logprobs(eng_engine *e, eng_req *q, const mdl_span *s, const float *rows) {
    int64_t V = e->model.cfg.vocab_size;
    int first = q->n_computed - s->n_logits; // token index of the first row (already counted)
    for (int i = 0; i < s->n_logits; i++) {
        int target = first + i + 1;
        if (target < q->next_prompt_lp || target >= q->r.n_prompt)
            continue;
        eng_event ev = {.kind = ENG_EV_PROMPT, .index = target, .token = q->tokens[target]};
        logprobs(rows + (int64_t)i * V, V, q->tokens[target],
                 q->r.logprobs > 0 ? q->r.logprobs : 0, &ev);
        eng_req_push(q, &ev);
        q->next_prompt_lp = target + 1;
    }
}

// top[i]: the argmax of the last logits row of greedy span i, -1 for the others (and for a row
// holding a NaN). A step has a row to sample per running sequence, each a full vocabulary to
// scan: the threads share them.
static void greedy_tops(const eng_engine *e, const plan *p, const ag_tensor *logits,
                        int32_t *top) {
    int64_t V = e->model.cfg.vocab_size, row = 0;
    int n_greedy = 0;
    for (int i = 0; i < p->n; i++) {
        row += p->sp[i].n_logits;
        bool greedy = p->sp[i].n_logits > 0 && p->rq[i]->r.sample.temperature == 0;
        top[i] = greedy ? (int32_t)(row - 1) : -1; // the row for now, the token below
        n_greedy += greedy;
    }
    const float *x = (const float *)logits->data;
#pragma omp parallel for schedule(static) if (n_greedy > 1)
    for (int i = 0; i < p->n; i++)
        if (top[i] >= 0)
            top[i] = inf_argmax_no_nan(x + (int64_t)top[i] * V, V);
}

static void deliver(eng_engine *e, plan *p, const ag_tensor *logits) {
    int64_t V = e->model.cfg.vocab_size, row = 0;
    int32_t *top = logits ? molt_malloc((size_t)p->n * sizeof *top) : NULL;
    if (top)
        greedy_tops(e, p, logits, top);
    for (int i = 0; i < p->n; i++) {
        eng_req *q = p->rq[i];
        const mdl_span *s = &p->sp[i];
        const float *rows = logits ? (const float *)logits->data + row * V : NULL;
        row += s->n_logits;
        bool was_prompt = q->n_computed < q->r.n_prompt;
        q->n_computed += s->n;
        if (was_prompt)
            e->acc.prompt_tokens += s->n_expanded;
        if (q->r.prompt_logprobs && rows)
            prompt_logprobs(e, q, s, rows);
        if (!e->o.no_prefix_caching && !q->published && q->n_computed >= q->r.n_prompt) {
            uint64_t tag = q->ad ? q->ad->uid : 0;
            mdl_kv_prefix_publish(&e->kv, q->kv_seq, tag, q->tokens, q->r.n_prompt);
            q->published = true;
        }
        if (q->n_computed < q->n_tokens)
            continue; // more of the prompt to come
        if (q->n_tokens - q->r.n_prompt >= q->r.max_tokens) { // e.g. max_tokens 0
            finish(e, q, ENG_FINISH_LENGTH);
            continue;
        }
        if (!next_token(e, q, rows + (int64_t)(s->n_logits - 1) * V, top ? top[i] : -1))
            continue;
        if (q->state == RQ_WAITING) { // prompt done: it decodes from now on
            list_remove(&e->waiting, q);
            e->n_waiting--;
            q->state = RQ_RUNNING;
            list_insert(&e->running, q);
            e->n_running++;
        }
    }
    molt_free(top);
}

// ---- the step ---------------------------------------------------------------------------------------

static void cancel_requested(eng_engine *e) {
    eng_req *lists[2] = {e->running, e->waiting};
    for (int k = 0; k < 2; k++)
        for (eng_req *q = lists[k]; q;) {
            eng_req *next = q->next;
            if (atomic_load(&q->cancel))
                finish(e, q, ENG_FINISH_CANCEL);
            q = next;
        }
}

// Hands the step's counters to eng_get_stats.
static void publish_stats(eng_engine *e) {
    pthread_mutex_lock(&e->mu);
    show_state(e);
    e->st.prompt_tokens += e->acc.prompt_tokens;
    e->st.generated_tokens += e->acc.generated_tokens;
    e->st.prefix_hit_tokens += e->acc.prefix_hit_tokens;
    e->st.prefix_query_tokens += e->acc.prefix_query_tokens;
    e->st.preemptions += e->acc.preemptions;
    memset(&e->acc, 0, sizeof e->acc);
    pthread_mutex_unlock(&e->mu);
}

// Expert group: a collective or a forward of the group failed; no more collectives here.
static void group_break(eng_engine *e) {
    pthread_mutex_lock(&e->mu);
    e->group_broken = true;
    pthread_mutex_unlock(&e->mu);
}

// Expert group: whether any rank has work this step (*any) and whether every rank has asked
// to stop (then e->group_stop). A failed collective ends the group's work here for good: the
// requests fail with its message and the thread no longer takes part.
static molt_status group_sync(eng_engine *e, bool have_work, bool *any) {
    pthread_mutex_lock(&e->mu);
    int32_t f[2] = {have_work, !e->stop}; // max over ranks: someone works, someone goes on
    pthread_mutex_unlock(&e->mu);
    molt_status st = ag_comm_allreduce(e->o.experts, f, 2, AG_I32, AG_COMM_MAX);
    if (st != MOLT_OK)
        group_break(e);
    else if (!f[1]) {
        pthread_mutex_lock(&e->mu);
        e->group_stop = true;
        pthread_mutex_unlock(&e->mu);
    }
    *any = st == MOLT_OK && f[0];
    return st;
}

bool eng_step(eng_engine *e) {
    take_incoming(e);
    pthread_mutex_lock(&e->mu);
    e->step++;
    eng_pool_sync(e);
    // a broken expert group cannot run a forward any more: what comes is aborted
    bool group = e->o.experts && !e->group_broken;
    bool abort_all = e->abort_all || (e->o.experts && e->group_broken);
    pthread_mutex_unlock(&e->mu);
    if (abort_all) {
        eng_finish_all(e, ENG_FINISH_ABORT);
        publish_stats(e);
        if (!group)
            return false;
    }
    cancel_requested(e);
    plan p = {0};
    int n_decode = plan_decode(e, &p);
    plan_prefill(e, &p, e->o.max_batch_tokens - n_decode);
    bool any = p.n > 0;
    molt_status st = MOLT_OK;
    if (group && (st = group_sync(e, p.n > 0, &any)) != MOLT_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "engine step (expert group): %s", molt_err_msg());
        for (int i = 0; i < p.n; i++)
            fail(e, p.rq[i], st, msg);
        eng_finish_all(e, ENG_FINISH_ABORT);
        p.n = 0;
        any = false;
    }
    if (p.n == 0) {
        molt_free(p.sp);
        molt_free(p.rq);
        if (any) { // the others run a forward: this rank's experts take part in it
            ag_ctx_step_reset(&e->ctx);
            if (mdl_serve_experts(&e->ctx, &e->model, &e->bank) != MOLT_OK)
                group_break(e);
        }
        publish_stats(e);
        return any;
    }
    ag_ctx_step_reset(&e->ctx);
    ag_tensor *logits = NULL;
    st = mdl_forward_spans(&e->ctx, &e->model, &e->kv, &e->bank, p.sp, p.n, &logits);
    if (st != MOLT_OK) {
        char msg[512];
        snprintf(msg, sizeof msg, "engine step: %s", molt_err_msg());
        for (int i = 0; i < p.n; i++)
            fail(e, p.rq[i], st, msg);
        if (group) // a rank failed inside the group's forward: the others cannot go on
            group_break(e);
    } else {
        deliver(e, &p, logits);
    }
    molt_free(p.sp);
    molt_free(p.rq);
    pthread_mutex_lock(&e->mu);
    e->st.steps++;
    pthread_mutex_unlock(&e->mu);
    publish_stats(e);
    return true;
}
