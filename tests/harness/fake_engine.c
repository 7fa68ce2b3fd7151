// tests/harness/fake_engine.c: a stand-in for the serving engine (infer/engine/engine.h) for
// the HTTP server's tests: a worker thread emits one deterministic token per step for every
// live request, honouring max_tokens, stop ids, eos, cancellation, prompt log-probabilities
// and shutdown. The rules are in fake_engine.h. Not a model: nothing here computes logits.
#include "fake_engine.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "infer/engine/engine.h"

static atomic_int step_ms = 1, fail_after = -1;
static atomic_long n_cancels, n_submits;
static atomic_int n_live;

void fake_eng_set_step_ms(int ms) { atomic_store(&step_ms, ms); }
void fake_eng_set_fail_after(int k) { atomic_store(&fail_after, k); }
long fake_eng_cancels(void) { return atomic_load(&n_cancels); }
long fake_eng_submits(void) { return atomic_load(&n_submits); }
int fake_eng_live(void) { return atomic_load(&n_live); }

#define MAX_ADAPTERS 64

struct eng_req {
    eng_engine *e;
    int32_t *prompt;
    int n_prompt, gen, shift;
    eng_request rq;
    int32_t stop_ids[64];
    eng_event *q;          // queued events
    int q_head, q_n, q_cap;
    bool prompt_done, finished, cancel, released, last_popped;
};

struct eng_engine {
    tok_tokenizer *tok;
    eng_opts o;
    int max_len, vocab;
    pthread_mutex_t mu;
    pthread_cond_t cv; // events queued (all requests share it)
    pthread_t th;
    bool started, stop, accepting;
    eng_req **live;
    int n_live, cap_live;
    struct {
        char name[128], path[1024];
        int shift;
    } ad[MAX_ADAPTERS];
    int n_ad, next_shift;
    int64_t steps, gen_total, prompt_total;
};

void eng_opts_default(eng_opts *o) {
    *o = (eng_opts){.max_num_seqs = 64, .max_batch_tokens = 2048, .kv_cache_mib = 512,
                    .block_tokens = 16, .max_loaded_adapters = 16};
}

void eng_request_default(eng_request *r) {
    *r = (eng_request){.max_tokens = 16, .logprobs = -1};
    inf_sample_opts_default(&r->sample);
}

molt_status eng_create(const eng_opts *o, eng_engine **out) {
    eng_engine *e = molt_calloc(1, sizeof *e);
    if (!e)
        return molt_err(MOLT_ENOMEM, "fake engine: out of memory");
    char path[2048];
    snprintf(path, sizeof path, "%s/tekken.json", o->model_dir ? o->model_dir : ".");
    molt_status st = tok_load(o->tokenizer ? o->tokenizer : path, &e->tok);
    if (st != MOLT_OK) {
        molt_free(e);
        return st;
    }
    e->o = *o;
    e->max_len = o->max_model_len > 0 ? o->max_model_len : 1024;
    e->vocab = (int)tok_vocab_size(e->tok);
    e->accepting = true;
    e->next_shift = 1;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    *out = e;
    return MOLT_OK;
}

const tok_tokenizer *eng_tokenizer(const eng_engine *e) { return e->tok; }
int eng_max_model_len(const eng_engine *e) { return e->max_len; }
int eng_vocab_size(const eng_engine *e) { return e->vocab; }
int eng_kv_capacity_tokens(const eng_engine *e) { return e->o.kv_cache_mib * 4 * 16; }
bool eng_head_amx(const eng_engine *e) {
    (void)e;
    return false; // no model
}
bool eng_prompt_amx(const eng_engine *e) {
    (void)e;
    return false;
}
int32_t eng_eos(const eng_engine *e) { return tok_eos(e->tok); }
bool eng_is_eos(const eng_engine *e, int32_t t) { return t == tok_eos(e->tok); }
bool eng_healthy(eng_engine *e) { return e != NULL; }

// ---- events -----------------------------------------------------------------------------

static void push(eng_req *q, const eng_event *ev) {
    if (q->q_n == q->q_cap) {
        int cap = q->q_cap ? 2 * q->q_cap : 16;
        eng_event *p = molt_malloc((size_t)cap * sizeof *p);
        MOLT_ASSERT(p);
        for (int i = 0; i < q->q_n; i++)
            p[i] = q->q[(q->q_head + i) % (q->q_cap ? q->q_cap : 1)];
        molt_free(q->q);
        q->q = p;
        q->q_cap = cap;
        q->q_head = 0;
    }
    q->q[(q->q_head + q->q_n++) % q->q_cap] = *ev;
}

static void fill_top(eng_event *ev, const eng_req *q, int32_t tok, double lp) {
    int n = q->rq.logprobs > 0 ? q->rq.logprobs : 0;
    ev->logprob = q->rq.logprobs >= 0 ? lp : NAN;
    ev->n_top = n;
    for (int k = 0; k < n; k++) {
        ev->top_ids[k] = (int32_t)((tok + k) % q->e->vocab);
        ev->top_logprobs[k] = lp - 0.5 * k;
    }
}

static void finish(eng_req *q, eng_finish f) {
    eng_event ev = {.kind = ENG_EV_DONE, .finish = f, .n_prompt = q->n_prompt, .n_gen = q->gen};
    push(q, &ev);
    q->finished = true;
    atomic_fetch_sub(&n_live, 1);
}

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static bool is_stop(const eng_req *q, int32_t t) {
    for (int i = 0; i < q->rq.n_stop_ids; i++)
        if (q->stop_ids[i] == t)
            return true;
    return !q->rq.ignore_eos && t == tok_eos(q->e->tok);
}

// One step of one request.
static void step(eng_req *q) {
    if (q->cancel) {
        finish(q, ENG_FINISH_CANCEL);
        return;
    }
    if (!q->prompt_done) {
        q->prompt_done = true;
        q->e->prompt_total += q->n_prompt;
        for (int j = 1; q->rq.prompt_logprobs && j < q->n_prompt; j++) {
            eng_event ev = {.kind = ENG_EV_PROMPT, .index = j, .token = q->prompt[j]};
            fill_top(&ev, q, q->prompt[j], -0.5 * (j % 3 + 1));
            push(q, &ev);
        }
    }
    int fail = atomic_load(&fail_after);
    if (fail >= 0 && q->gen >= fail) {
        eng_event ev = {.kind = ENG_EV_ERROR, .status = MOLT_EINTERNAL};
        snprintf(ev.message, sizeof ev.message, "fake engine: failed after %d tokens", fail);
        push(q, &ev);
        q->finished = true;
        atomic_fetch_sub(&n_live, 1);
        return;
    }
    if (q->gen >= q->rq.max_tokens || q->n_prompt + q->gen >= q->e->max_len) {
        finish(q, ENG_FINISH_LENGTH);
        return;
    }
    int i = q->gen, n = q->n_prompt;
    int idx = q->rq.sample.temperature > 0 ? (int)(mix(q->rq.sample.seed * 1000003u + (uint64_t)i)
                                                   % (uint64_t)n)
                                           : ((n - 1 - i) % n + n) % n;
    int32_t t = q->prompt[idx] + q->shift;
    if (t >= q->e->vocab)
        t = q->e->vocab - 1;
    eng_event ev = {.kind = ENG_EV_TOKEN, .index = i, .token = t};
    fill_top(&ev, q, t, -0.25 * (i % 4 + 1));
    push(q, &ev);
    q->gen++;
    q->e->gen_total++;
    if (is_stop(q, t))
        finish(q, ENG_FINISH_STOP);
}

static void free_req(eng_req *q) {
    molt_free(q->prompt);
    molt_free(q->q);
    molt_free(q);
}

// Removes finished requests whose handles were released.
static void reap(eng_engine *e) {
    int k = 0;
    for (int i = 0; i < e->n_live; i++) {
        eng_req *q = e->live[i];
        if (q->finished && q->released)
            free_req(q);
        else if (!q->finished || !q->released)
            e->live[k++] = q;
    }
    e->n_live = k;
}

static void *worker(void *arg) {
    eng_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    while (!e->stop) {
        for (int i = 0; i < e->n_live; i++)
            if (!e->live[i]->finished)
                step(e->live[i]);
        e->steps++;
        reap(e);
        pthread_cond_broadcast(&e->cv);
        pthread_mutex_unlock(&e->mu);
        struct timespec ts = {0, (long)atomic_load(&step_ms) * 1000000L};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&e->mu);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

molt_status eng_start(eng_engine *e) {
    if (e->started)
        return MOLT_OK;
    if (pthread_create(&e->th, NULL, worker, e))
        return molt_err(MOLT_EINTERNAL, "fake engine: cannot start its thread");
    e->started = true;
    return MOLT_OK;
}

static int live_count(eng_engine *e) {
    int n = 0;
    for (int i = 0; i < e->n_live; i++)
        n += !e->live[i]->finished;
    return n;
}

void eng_shutdown(eng_engine *e, double grace_s) {
    pthread_mutex_lock(&e->mu);
    e->accepting = false;
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (live_count(e) && e->started) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((double)(now.tv_sec - t0.tv_sec) + 1e-9 * (double)(now.tv_nsec - t0.tv_nsec) >=
            grace_s)
            break;
        pthread_mutex_unlock(&e->mu);
        struct timespec ts = {0, 5000000L};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&e->mu);
    }
    for (int i = 0; i < e->n_live; i++)
        if (!e->live[i]->finished)
            finish(e->live[i], ENG_FINISH_ABORT);
    e->stop = true;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (e->started)
        pthread_join(e->th, NULL);
    e->started = false;
}

void eng_free(eng_engine *e) {
    if (!e)
        return;
    eng_shutdown(e, 0);
    for (int i = 0; i < e->n_live; i++)
        free_req(e->live[i]);
    molt_free(e->live);
    tok_free(e->tok);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    molt_free(e);
}

// ---- adapters ---------------------------------------------------------------------------

static int find_ad(const eng_engine *e, const char *name) {
    for (int i = 0; i < e->n_ad; i++)
        if (!strcmp(e->ad[i].name, name))
            return i;
    return -1;
}

molt_status eng_adapter_add(eng_engine *e, const char *name, const char *path) {
    struct stat sb;
    if (!name || !*name || strlen(name) >= 128)
        return molt_err(MOLT_EARG, "adapter name '%s' is empty or too long", name ? name : "");
    if (stat(path, &sb))
        return molt_err(MOLT_EIO, "adapter %s: %s", path, strerror(errno));
    if (strstr(path, "misfit"))
        return molt_err(MOLT_EFORMAT, "adapter %s: tensor 'base_model.model.model.layers.0."
                        "self_attn.q_a_proj.lora_A.weight' has shape [4, 7], the base needs "
                        "[4, 32]", path);
    pthread_mutex_lock(&e->mu);
    molt_status st = MOLT_OK;
    if (find_ad(e, name) >= 0)
        st = molt_err(MOLT_EARG, "adapter '%s' is already registered", name);
    else if (e->n_ad == MAX_ADAPTERS)
        st = molt_err(MOLT_EARG, "fake engine: too many adapters");
    else {
        snprintf(e->ad[e->n_ad].name, 128, "%s", name);
        snprintf(e->ad[e->n_ad].path, 1024, "%s", path);
        e->ad[e->n_ad++].shift = e->next_shift++;
    }
    pthread_mutex_unlock(&e->mu);
    return st;
}

molt_status eng_adapter_remove(eng_engine *e, const char *name) {
    pthread_mutex_lock(&e->mu);
    int i = find_ad(e, name);
    if (i >= 0) {
        memmove(&e->ad[i], &e->ad[i + 1], (size_t)(e->n_ad - i - 1) * sizeof e->ad[0]);
        e->n_ad--;
    }
    pthread_mutex_unlock(&e->mu);
    return i >= 0 ? MOLT_OK : molt_err(MOLT_EARG, "no adapter named '%s'", name);
}

int eng_adapter_list(eng_engine *e, eng_adapter_info *out, int cap) {
    pthread_mutex_lock(&e->mu);
    int n = e->n_ad;
    for (int i = 0; i < n && i < cap; i++) {
        memset(&out[i], 0, sizeof out[i]);
        snprintf(out[i].name, sizeof out[i].name, "%s", e->ad[i].name);
        snprintf(out[i].path, sizeof out[i].path, "%s", e->ad[i].path);
        out[i].resident = true;
        out[i].rank_max = 4;
        out[i].params = 1000;
    }
    pthread_mutex_unlock(&e->mu);
    return n;
}

bool eng_adapter_exists(eng_engine *e, const char *name) {
    pthread_mutex_lock(&e->mu);
    bool ok = find_ad(e, name) >= 0;
    pthread_mutex_unlock(&e->mu);
    return ok;
}

// ---- requests ---------------------------------------------------------------------------

molt_status eng_submit(eng_engine *e, const eng_request *r, eng_req **out) {
    if (!r->prompt || r->n_prompt < 1)
        return molt_err(MOLT_EARG, "prompt: empty");
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= e->vocab)
            return molt_err(MOLT_EARG, "prompt[%d]: id %d outside the vocabulary", i,
                            r->prompt[i]);
    if (r->max_tokens < 0 || r->logprobs < -1 || r->logprobs > ENG_MAX_LOGPROBS ||
        r->n_stop_ids > 64)
        return molt_err(MOLT_EARG, "max_tokens, logprobs or stop ids out of range");
    if (r->n_prompt + r->max_tokens > e->max_len)
        return molt_err(MOLT_EARG, "%d prompt + %d new tokens exceed %d", r->n_prompt,
                        r->max_tokens, e->max_len);
    eng_req *q = molt_calloc(1, sizeof *q);
    int32_t *p = molt_malloc((size_t)r->n_prompt * sizeof *p);
    if (!q || !p) {
        molt_free(q);
        molt_free(p);
        return molt_err(MOLT_ENOMEM, "fake engine: out of memory");
    }
    memcpy(p, r->prompt, (size_t)r->n_prompt * sizeof *p);
    *q = (eng_req){.e = e, .prompt = p, .n_prompt = r->n_prompt, .rq = *r};
    if (r->n_stop_ids)
        memcpy(q->stop_ids, r->stop_ids, (size_t)r->n_stop_ids * sizeof *q->stop_ids);
    pthread_mutex_lock(&e->mu);
    molt_status st = MOLT_OK;
    int ad = r->adapter && *r->adapter ? find_ad(e, r->adapter) : -2;
    if (!e->accepting)
        st = molt_err(MOLT_EUNSUPPORTED, "shutting down");
    else if (ad == -1)
        st = molt_err(MOLT_EARG, "The model `%s` does not exist.", r->adapter);
    else if (e->n_live == e->cap_live) {
        int cap = e->cap_live ? 2 * e->cap_live : 16;
        eng_req **l = molt_realloc(e->live, (size_t)cap * sizeof *l);
        if (!l)
            st = molt_err(MOLT_ENOMEM, "fake engine: out of memory");
        else {
            e->live = l;
            e->cap_live = cap;
        }
    }
    if (st == MOLT_OK) {
        q->shift = ad >= 0 ? e->ad[ad].shift : 0;
        q->rq.adapter = NULL;
        q->rq.prompt = q->prompt;
        q->rq.stop_ids = q->stop_ids;
        e->live[e->n_live++] = q;
        atomic_fetch_add(&n_live, 1);
        atomic_fetch_add(&n_submits, 1);
    }
    pthread_mutex_unlock(&e->mu);
    if (st != MOLT_OK) {
        free_req(q);
        return st;
    }
    *out = q;
    return MOLT_OK;
}

int eng_next(eng_req *q, eng_event *ev, int timeout_ms) {
    eng_engine *e = q->e;
    pthread_mutex_lock(&e->mu);
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    long ms = timeout_ms < 0 ? 0 : timeout_ms;
    dl.tv_sec += ms / 1000;
    dl.tv_nsec += (ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    while (!q->q_n && !q->last_popped && timeout_ms != 0) {
        int rc = timeout_ms < 0 ? pthread_cond_wait(&e->cv, &e->mu)
                                : pthread_cond_timedwait(&e->cv, &e->mu, &dl);
        if (rc == ETIMEDOUT)
            break;
    }
    int got = 0;
    if (q->q_n && !q->last_popped) {
        *ev = q->q[q->q_head];
        q->q_head = (q->q_head + 1) % q->q_cap;
        q->q_n--;
        got = 1;
        q->last_popped = ev->kind == ENG_EV_DONE || ev->kind == ENG_EV_ERROR;
    }
    pthread_mutex_unlock(&e->mu);
    return got;
}

void eng_cancel(eng_req *q) {
    pthread_mutex_lock(&q->e->mu);
    if (!q->finished && !q->cancel) {
        q->cancel = true;
        atomic_fetch_add(&n_cancels, 1);
    }
    pthread_mutex_unlock(&q->e->mu);
}

void eng_release(eng_req *q) {
    eng_engine *e = q->e;
    pthread_mutex_lock(&e->mu);
    if (!q->finished && !q->cancel) {
        q->cancel = true;
        atomic_fetch_add(&n_cancels, 1);
    }
    q->released = true;
    if (!e->started && !q->finished) // no worker to finish it
        finish(q, ENG_FINISH_CANCEL);
    reap(e);
    pthread_mutex_unlock(&e->mu);
}

void eng_get_stats(eng_engine *e, eng_stats *s) {
    pthread_mutex_lock(&e->mu);
    memset(s, 0, sizeof *s);
    s->block_tokens = 16;
    s->kv_blocks_total = e->o.kv_cache_mib * 4;
    for (int i = 0; i < e->n_live; i++) {
        eng_req *q = e->live[i];
        if (q->finished)
            continue;
        if (q->prompt_done)
            s->running++;
        else
            s->waiting++;
        s->kv_blocks_used += (q->n_prompt + q->gen + 15) / 16;
    }
    s->adapters_registered = s->adapters_resident = e->n_ad;
    s->prompt_tokens = e->prompt_total;
    s->generated_tokens = e->gen_total;
    s->steps = e->steps;
    pthread_mutex_unlock(&e->mu);
}
