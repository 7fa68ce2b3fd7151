// infer/engine/engine.c: the engine's life cycle (model, tokenizer, KV cache, adapter bank,
// the engine and loader threads), request handles and their event queues, statistics.
// Contracts in engine.h. Not here: what one step does (sched.c), adapters (pool.c).
#include "eng_internal.h"

#include <errno.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <string.h>
#include <sys/stat.h>
#include <time.h>

void eng_opts_default(eng_opts *o) {
    memset(o, 0, sizeof *o);
    o->max_num_seqs = 64;
    o->max_batch_tokens = 512;
    o->kv_cache_mib = 512;
    o->block_tokens = MDL_KV_BLOCK_DEFAULT;
    o->max_loaded_adapters = 16;
}

void eng_request_default(eng_request *r) {
    memset(r, 0, sizeof *r);
    r->max_tokens = 16;
    r->logprobs = -1;
    inf_sample_opts_default(&r->sample);
}

// ---- creation -----------------------------------------------------------------------------------

static molt_status check_opts(const eng_opts *o) {
    if (!o->model_dir || !*o->model_dir)
        return molt_err(MOLT_EARG, "engine: no model directory");
    if (o->max_num_seqs < 1 || o->max_batch_tokens < o->max_num_seqs)
        return molt_err(MOLT_EARG, "engine: max_num_seqs %d and max_batch_tokens %d (need "
                        "1 <= max_num_seqs <= max_batch_tokens)", o->max_num_seqs,
                        o->max_batch_tokens);
    if (o->kv_cache_mib < 1 || o->block_tokens < 1 || o->block_tokens > 4096)
        return molt_err(MOLT_EARG, "engine: kv_cache_mib %d, block_tokens %d", o->kv_cache_mib,
                        o->block_tokens);
    if (o->max_loaded_adapters < 1 || o->max_loaded_adapters > 4096)
        return molt_err(MOLT_EARG, "engine: max_loaded_adapters %d, expected 1 to 4096",
                        o->max_loaded_adapters);
    if (o->kv_cache_tokens < 0)
        return molt_err(MOLT_EARG, "engine: kv_cache_tokens %d", o->kv_cache_tokens);
    if (o->max_model_len < 0)
        return molt_err(MOLT_EARG, "engine: max_model_len %d", o->max_model_len);
    return MOLT_OK;
}

// dir/name when it exists (into buf), else NULL.
static const char *beside(const char *dir, const char *name, char *buf, size_t cap) {
    struct stat sb;
    snprintf(buf, cap, "%s/%s", dir, name);
    return stat(buf, &sb) == 0 ? buf : NULL;
}

static molt_status load_all(eng_engine *e) {
    const eng_opts *o = &e->o;
    char tbuf[4096];
    const char *tpath = o->tokenizer;
    if (!tpath && !(tpath = beside(o->model_dir, "tekken.json", tbuf, sizeof tbuf)))
        tpath = beside(o->model_dir, "tokenizer.json", tbuf, sizeof tbuf);
    if (!tpath)
        return molt_err(MOLT_EIO, "engine: %s holds neither tekken.json nor tokenizer.json (give "
                        "the tokenizer's path)", o->model_dir);
    MOLT_TRY(tok_load(tpath, &e->tok));
    mdl_qspec q;
    if (o->base_quant && *o->base_quant)
        MOLT_TRY(mdl_qspec_parse(o->base_quant, &q));
    MOLT_TRY(mdl_load_quant_ex(o->model_dir, o->base_quant && *o->base_quant ? &q : NULL,
                               o->experts, &e->model));
    MOLT_TRY(mdl_pack_head(&e->model, NULL));
    mdl_prompts_on_amx(&e->model, NULL);
    const mcfg *c = &e->model.cfg;
    if ((int64_t)tok_vocab_size(e->tok) > c->vocab_size)
        return molt_err(MOLT_EFORMAT, "engine: the tokenizer has %zu ids, the model %d",
                        tok_vocab_size(e->tok), c->vocab_size);
    int64_t max_pos = c->max_position_embeddings;
    if (o->max_model_len > max_pos)
        return molt_err(MOLT_EARG, "engine: max_model_len %d exceeds the model's %lld positions",
                        o->max_model_len, (long long)max_pos);
    e->max_model_len = o->max_model_len ? o->max_model_len
                                         : (int)(max_pos < INT32_MAX ? max_pos : INT32_MAX);
    int64_t per_token = (int64_t)c->num_hidden_layers * (c->kv_lora_rank + c->qk_rope_head_dim) *
                        (int64_t)sizeof(float);
    int64_t tokens = ((int64_t)o->kv_cache_mib << 20) / per_token;
    tokens = tokens / o->block_tokens * o->block_tokens;
    if (o->kv_cache_tokens > 0)
        tokens = ((int64_t)o->kv_cache_tokens + o->block_tokens - 1) / o->block_tokens *
                 o->block_tokens;
    if (tokens < o->block_tokens)
        return molt_err(MOLT_EARG, "engine: a KV cache of %d MiB holds less than one block of %d "
                        "tokens (%lld bytes per token)", o->kv_cache_mib, o->block_tokens,
                        (long long)per_token);
    MOLT_TRY(mdl_kv_init(&e->kv, c, o->block_tokens, (int)(tokens < INT32_MAX ? tokens
                                                                              : INT32_MAX)));
    MOLT_TRY(mdl_bank_init(&e->bank, &e->model, o->max_loaded_adapters));
    e->slots = molt_calloc((size_t)o->max_loaded_adapters, sizeof *e->slots);
    if (!e->slots)
        return molt_err(MOLT_ENOMEM, "engine: out of memory");
    MOLT_TRY(ag_ctx_init(&e->ctx));
    ag_ctx_set_grad(&e->ctx, false);
    inf_sample_opts g;
    inf_sample_opts_default(&g);
    MOLT_TRY(inf_sampler_init(&e->smp, &g));
    e->eos = tok_eos(e->tok);
    return MOLT_OK;
}

// load_all runs on a thread of its own that ends with it. OpenMP's worker threads belong to the
// thread whose parallel regions started them and stay, idle, until that thread exits: loaded on
// the caller, they would outlive the load beside the engine thread's own team, and libgomp,
// then counting more threads than cores, shortens its spin-wait at barriers to almost nothing.
// Each of a serving step's many parallel regions would put its workers to sleep and wake them.
// The load thread uses as many OpenMP threads as the caller would have.
typedef struct {
    eng_engine *e;
    int threads;
    molt_status st;
    char msg[2048];
} load_job;

static void *load_main(void *arg) {
    load_job *j = arg;
#ifdef _OPENMP
    omp_set_num_threads(j->threads);
#endif
    j->st = load_all(j->e);
    if (j->st != MOLT_OK)
        snprintf(j->msg, sizeof j->msg, "%s", molt_err_msg());
    return NULL;
}

static molt_status load_on_own_thread(eng_engine *e) {
    load_job j = {.e = e, .threads = 1};
#ifdef _OPENMP
    j.threads = omp_get_max_threads();
#endif
    pthread_t t;
    if (pthread_create(&t, NULL, load_main, &j) != 0)
        return load_all(e); // no thread to spare: the load still works, only less well after
    pthread_join(t, NULL);
    return j.st == MOLT_OK ? MOLT_OK : molt_err(j.st, "%s", j.msg);
}

molt_status eng_create(const eng_opts *o, eng_engine **out) {
    *out = NULL;
    MOLT_TRY(check_opts(o));
    eng_engine *e = molt_calloc(1, sizeof *e);
    if (!e)
        return molt_err(MOLT_ENOMEM, "engine: out of memory");
    e->o = *o;
    pthread_mutex_init(&e->mu, NULL);
    pthread_mutex_init(&e->h5_mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    pthread_cond_init(&e->idle_cv, NULL);
    pthread_cond_init(&e->load_cv, NULL);
    e->accepting = true;
    e->next_uid = 0;
    molt_status st = load_on_own_thread(e);
    if (st != MOLT_OK) {
        eng_free(e);
        return st;
    }
    *out = e;
    return MOLT_OK;
}

// ---- the engine thread ----------------------------------------------------------------------------

static void *engine_main(void *arg) {
    eng_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    // alone: until asked to stop; in an expert group: until every rank has asked
    while (e->o.experts && !e->group_broken ? !e->group_stop : !e->stop) {
        pthread_mutex_unlock(&e->mu);
        bool did = eng_step(e);
        pthread_mutex_lock(&e->mu);
        if (!did && (!e->stop || e->o.experts)) {
            pthread_cond_broadcast(&e->idle_cv);
            // sleep until something arrives (submission, cancel, loaded adapter, shutdown);
            // a bounded wait, so that a missed signal costs at most a few milliseconds
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 20 * 1000 * 1000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            if (!e->incoming && !e->loaded)
                pthread_cond_timedwait(&e->cv, &e->mu, &ts);
        }
    }
    pthread_mutex_unlock(&e->mu);
    eng_finish_all(e, ENG_FINISH_ABORT);
    pthread_mutex_lock(&e->mu);
    pthread_cond_broadcast(&e->idle_cv);
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

molt_status eng_start(eng_engine *e) {
    if (e->started)
        return MOLT_OK;
    MOLT_TRY(eng_loader_start(e));
    if (pthread_create(&e->thread, NULL, engine_main, e) != 0) {
        eng_loader_stop(e);
        return molt_err(MOLT_EINTERNAL, "engine: cannot start the engine thread");
    }
    e->started = true;
    return MOLT_OK;
}

static bool all_idle(const eng_engine *e) {
    return !e->incoming && e->st.waiting == 0 && e->st.running == 0;
}

void eng_shutdown(eng_engine *e, double grace_s) {
    pthread_mutex_lock(&e->mu);
    e->accepting = false;
    if (e->started && grace_s > 0) {
        struct timespec end;
        clock_gettime(CLOCK_REALTIME, &end);
        end.tv_sec += (time_t)grace_s;
        end.tv_nsec += (long)((grace_s - (double)(time_t)grace_s) * 1e9);
        if (end.tv_nsec >= 1000000000) {
            end.tv_sec++;
            end.tv_nsec -= 1000000000;
        }
        while (!all_idle(e))
            if (pthread_cond_timedwait(&e->idle_cv, &e->mu, &end) == ETIMEDOUT)
                break;
    }
    bool started = e->started;
    e->stop = true;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (started) {
        pthread_join(e->thread, NULL);
        e->started = false;
    }
    eng_loader_stop(e);
}

void eng_free(eng_engine *e) {
    if (!e)
        return;
    eng_shutdown(e, 0);
    eng_finish_all(e, ENG_FINISH_ABORT); // requests submitted to an engine never started
    eng_pool_free(e);
    inf_sampler_free(&e->smp);
    ag_ctx_free(&e->ctx);
    molt_free(e->slots);
    mdl_bank_free(&e->bank);
    mdl_kv_free(&e->kv);
    mdl_free(&e->model);
    tok_free(e->tok);
    pthread_mutex_destroy(&e->mu);
    pthread_mutex_destroy(&e->h5_mu);
    pthread_cond_destroy(&e->cv);
    pthread_cond_destroy(&e->idle_cv);
    pthread_cond_destroy(&e->load_cv);
    molt_free(e);
}

const tok_tokenizer *eng_tokenizer(const eng_engine *e) { return e->tok; }
int eng_max_model_len(const eng_engine *e) { return e->max_model_len; }
int eng_vocab_size(const eng_engine *e) { return e->model.cfg.vocab_size; }
int eng_kv_capacity_tokens(const eng_engine *e) { return e->kv.max_blocks * e->kv.block_tokens; }
int32_t eng_eos(const eng_engine *e) { return e->eos; }
bool eng_head_amx(const eng_engine *e) { return e->model.lm_head.bx != NULL; }
bool eng_prompt_amx(const eng_engine *e) { return e->model.prompt_bx; }

bool eng_is_eos(const eng_engine *e, int32_t t) {
    const mcfg *c = &e->model.cfg;
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_token_ids[i] == t)
            return true;
    return e->eos >= 0 && t == e->eos;
}

bool eng_healthy(eng_engine *e) {
    pthread_mutex_lock(&e->mu);
    bool ok = e->started && !e->stop && e->accepting;
    pthread_mutex_unlock(&e->mu);
    return ok;
}

void eng_get_stats(eng_engine *e, eng_stats *s) {
    pthread_mutex_lock(&e->mu);
    *s = e->st;
    for (eng_req *q = e->incoming; q; q = q->next)
        s->waiting++;
    s->kv_blocks_total = e->kv.max_blocks;
    s->block_tokens = e->kv.block_tokens;
    s->adapters_registered = s->adapters_resident = 0;
    for (eng_entry *x = e->entries; x; x = x->next) {
        s->adapters_registered += !x->removed;
        s->adapters_resident += x->state == ENT_RESIDENT;
    }
    pthread_mutex_unlock(&e->mu);
}

// ---- requests -----------------------------------------------------------------------------------

static molt_status check_request(const eng_engine *e, const eng_request *r) {
    if (!r->prompt || r->n_prompt < 1)
        return molt_err(MOLT_EARG, "prompt: at least one token is needed");
    int V = e->model.cfg.vocab_size;
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= V)
            return molt_err(MOLT_EARG, "prompt: token id %d at position %d is outside the "
                            "vocabulary [0, %d)", (int)r->prompt[i], i, V);
    if (r->max_tokens < 0)
        return molt_err(MOLT_EARG, "max_tokens: %d is negative", r->max_tokens);
    if (r->logprobs < -1 || r->logprobs > ENG_MAX_LOGPROBS)
        return molt_err(MOLT_EARG, "logprobs: %d is outside [0, %d]", r->logprobs,
                        ENG_MAX_LOGPROBS);
    if (r->prompt_logprobs_from < 0)
        return molt_err(MOLT_EARG, "prompt_logprobs_from: %d is negative",
                        r->prompt_logprobs_from);
    if (r->n_stop_ids < 0 || (r->n_stop_ids > 0 && !r->stop_ids))
        return molt_err(MOLT_EARG, "stop_token_ids: bad list");
    for (int i = 0; i < r->n_stop_ids; i++)
        if (r->stop_ids[i] < 0 || r->stop_ids[i] >= V)
            return molt_err(MOLT_EARG, "stop_token_ids: %d is outside the vocabulary [0, %d)",
                            (int)r->stop_ids[i], V);
    MOLT_TRY(inf_sample_opts_check(&r->sample));
    int64_t need = (int64_t)r->n_prompt + r->max_tokens;
    if (need > e->max_model_len)
        return molt_err(MOLT_EARG, "This model's maximum context length is %d tokens. However, "
                        "you requested %lld tokens (%d in the prompt, %d for the completion).",
                        e->max_model_len, (long long)need, r->n_prompt, r->max_tokens);
    int cap = eng_kv_capacity_tokens(e);
    if (need > cap)
        return molt_err(MOLT_EARG, "the request needs %lld tokens of KV cache (%d in the prompt, "
                        "%d for the completion); the cache holds %d", (long long)need,
                        r->n_prompt, r->max_tokens, cap);
    return MOLT_OK;
}

static void req_free(eng_req *q) {
    pthread_mutex_destroy(&q->mu);
    pthread_cond_destroy(&q->cv);
    molt_free(q->ev);
    molt_free(q->tokens);
    molt_free(q->stops);
    molt_free(q);
}

static eng_req *req_new(const eng_request *r) {
    eng_req *q = molt_calloc(1, sizeof *q);
    if (!q)
        return NULL;
    pthread_mutex_init(&q->mu, NULL);
    pthread_cond_init(&q->cv, NULL);
    q->r = *r;
    q->tokens = molt_malloc((size_t)(r->n_prompt + r->max_tokens + 1) * sizeof *q->tokens);
    q->stops = molt_malloc((size_t)(r->n_stop_ids + 1) * sizeof *q->stops);
    if (!q->tokens || !q->stops) {
        req_free(q);
        return NULL;
    }
    memcpy(q->tokens, r->prompt, (size_t)r->n_prompt * sizeof *q->tokens);
    if (r->n_stop_ids)
        memcpy(q->stops, r->stop_ids, (size_t)r->n_stop_ids * sizeof *q->stops);
    q->r.prompt = q->tokens;
    q->r.stop_ids = q->stops;
    q->r.adapter = NULL;
    q->n_tokens = r->n_prompt;
    q->next_prompt_lp = r->prompt_logprobs_from > 1 ? r->prompt_logprobs_from : 1;
    q->stop_token = -1;
    q->kv_seq = -1;
    q->refs = 2;
    ag_rng_seed(&q->rng, r->sample.seed);
    return q;
}

molt_status eng_submit(eng_engine *e, const eng_request *r, eng_req **out) {
    *out = NULL;
    MOLT_TRY(check_request(e, r));
    eng_req *q = req_new(r);
    if (!q)
        return molt_err(MOLT_ENOMEM, "engine: out of memory for a request");
    q->eng = e;
    pthread_mutex_lock(&e->mu);
    molt_status st = MOLT_OK;
    if (!e->accepting)
        st = molt_err(MOLT_EUNSUPPORTED, "the server is shutting down");
    else if (r->adapter && *r->adapter && !(q->ad = eng_find(e, r->adapter)))
        st = molt_err(MOLT_EARG, "The model `%s` does not exist.", r->adapter);
    if (st == MOLT_OK) {
        if (q->ad)
            q->ad->active++;
        q->id = ++e->next_id;
        if (e->incoming_tail)
            e->incoming_tail->next = q;
        else
            e->incoming = q;
        e->incoming_tail = q;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    if (st != MOLT_OK) {
        req_free(q);
        return st;
    }
    *out = q;
    return MOLT_OK;
}

void eng_req_push(eng_req *q, const eng_event *ev) {
    pthread_mutex_lock(&q->mu);
    if (q->ev_n == q->ev_cap && q->ev_head > 0) { // reuse the room of consumed events
        memmove(q->ev, q->ev + q->ev_head, (size_t)(q->ev_n - q->ev_head) * sizeof *q->ev);
        q->ev_n -= q->ev_head;
        q->ev_head = 0;
    }
    if (q->ev_n == q->ev_cap) {
        int cap = q->ev_cap ? 2 * q->ev_cap : 16;
        eng_event *v = molt_realloc(q->ev, (size_t)cap * sizeof *v);
        if (!v) { // the client learns of it as an error, the last event it gets
            q->ended = true;
            pthread_cond_broadcast(&q->cv);
            pthread_mutex_unlock(&q->mu);
            return;
        }
        q->ev = v;
        q->ev_cap = cap;
    }
    q->ev[q->ev_n++] = *ev;
    if (ev->kind == ENG_EV_DONE || ev->kind == ENG_EV_ERROR)
        q->ended = true;
    pthread_cond_broadcast(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

int eng_next(eng_req *q, eng_event *ev, int timeout_ms) {
    pthread_mutex_lock(&q->mu);
    struct timespec end;
    if (timeout_ms >= 0) {
        clock_gettime(CLOCK_REALTIME, &end);
        end.tv_sec += timeout_ms / 1000;
        end.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
        if (end.tv_nsec >= 1000000000) {
            end.tv_sec++;
            end.tv_nsec -= 1000000000;
        }
    }
    while (q->ev_head == q->ev_n && !q->ended) {
        if (timeout_ms < 0)
            pthread_cond_wait(&q->cv, &q->mu);
        else if (pthread_cond_timedwait(&q->cv, &q->mu, &end) == ETIMEDOUT)
            break;
    }
    int got = q->ev_head < q->ev_n;
    if (got)
        *ev = q->ev[q->ev_head++];
    pthread_mutex_unlock(&q->mu);
    return got;
}

void eng_cancel(eng_req *q) {
    if (!q)
        return;
    atomic_store(&q->cancel, true);
    eng_engine *e = q->eng;
    pthread_mutex_lock(&e->mu);
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void eng_req_unref(eng_req *q) {
    pthread_mutex_lock(&q->mu);
    bool last = --q->refs == 0;
    pthread_mutex_unlock(&q->mu);
    if (last)
        req_free(q);
}

void eng_release(eng_req *q) {
    if (!q)
        return;
    eng_cancel(q);
    eng_req_unref(q);
}
