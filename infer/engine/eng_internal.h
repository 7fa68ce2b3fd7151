// infer/engine/eng_internal.h: what the engine's files share (engine.c: life cycle, requests
// and the thread; sched.c: one step of continuous batching; pool.c: the adapter registry,
// its bank slots and the loader thread). Not a public API: include engine.h from outside.
#ifndef MOLT_INFER_ENGINE_INTERNAL_H
#define MOLT_INFER_ENGINE_INTERNAL_H

#include "engine.h"

#include <pthread.h>
#include <stdatomic.h>

#include "../../adapters/adapters.h"
#include "../../model/model.h"

// ---- adapters ---------------------------------------------------------------------------
typedef enum {
    ENT_IDLE,    // registered, not in memory
    ENT_LOADING, // the loader thread is reading it into a reserved slot
    ENT_RESIDENT // in memory and in its bank slot
} ent_state;

typedef struct eng_entry {
    char name[128];
    char path[1024];
    uint64_t uid;           // unique per registration (prefix-cache tag); never 0
    ent_state state;
    lora_adapter *ad;       // when resident
    int slot;               // bank slot when resident or loading, else -1
    int active;             // requests using it (submitted and not finished)
    int64_t last_used;      // engine step of its last use (LRU)
    bool removed;           // unregistered: freed once `active` falls to 0
    char load_error[512];   // the loader's message when reloading failed
    int rank_max;
    int64_t params;
    struct eng_entry *next; // registration order
} eng_entry;

// A loaded adapter handed from the loader thread to the engine thread.
typedef struct eng_loaded {
    eng_entry *e;
    lora_adapter *ad;       // NULL when loading failed (message in msg)
    molt_status st;
    char msg[512];
    struct eng_loaded *next;
} eng_loaded;

// ---- requests -------------------------------------------------------------------------------
typedef enum { RQ_WAITING, RQ_RUNNING, RQ_DONE } rq_state;

struct eng_req {
    // client side
    pthread_mutex_t mu;
    pthread_cond_t cv;
    eng_event *ev;          // queued events [head, n)
    int ev_head, ev_n, ev_cap;
    bool ended;             // DONE or ERROR queued
    int refs;               // client + engine
    atomic_bool cancel;
    // engine side (engine thread only, once submitted)
    eng_engine *eng;
    uint64_t id;            // arrival order
    eng_request r;          // copy (prompt and stop ids point into tokens/stops below)
    int32_t *tokens;        // [n_prompt + max_tokens] prompt, then generated
    int32_t *stops;
    int n_tokens;           // known tokens: prompt + generated
    int n_computed;         // tokens whose latents are in the cache
    int n_cached;           // prompt tokens served by the prefix cache
    int next_prompt_lp;     // next prompt index whose log-probability is due (>= 1)
    int32_t stop_token;     // the id that ended it, -1 while none
    int kv_seq;             // cache sequence, -1 when none
    bool published;         // prompt blocks offered to the prefix cache
    eng_entry *ad;          // adapter, NULL for the base
    ag_rng rng;             // sampling stream
    rq_state state;
    struct eng_req *next;   // waiting or running list
};

// ---- the engine -------------------------------------------------------------------------------
struct eng_engine {
    eng_opts o;
    mdl_model model;
    tok_tokenizer *tok;
    int32_t eos;
    int max_model_len;
    mdl_kvcache kv;
    mdl_bank bank;
    eng_entry **slots;      // [max_loaded_adapters] who holds each bank slot (NULL: free)
    ag_ctx ctx;
    inf_sampler smp;        // shared scratch; each request brings its own rng and options

    pthread_mutex_t mu;     // everything below, the registry and the submission list
    pthread_cond_t cv;      // work for the engine thread
    pthread_cond_t idle_cv; // the engine thread went idle or stopped
    pthread_t thread;
    bool started, stop, accepting, abort_all;
    bool group_stop;        // expert group: every rank asked to stop (engine thread only)
    bool group_broken;      // expert group: a collective failed; no more collectives
    eng_req *incoming, *incoming_tail; // submitted, not yet taken by the engine thread
    int n_incoming;
    eng_req *waiting;       // engine thread only: not running (new or preempted), FIFO
    eng_req *running;       // engine thread only: decoding
    int n_waiting, n_running;
    uint64_t next_id, next_uid;
    int64_t step;
    eng_entry *entries;     // registry, registration order
    eng_loaded *loaded;     // the loader's results for the engine thread
    eng_stats st;
    eng_stats acc;          // engine thread only: counters of the step, added to st

    pthread_t loader;       // adapter loader thread
    bool loader_started;
    pthread_cond_t load_cv;
    eng_entry **load_queue; // entries to load (state LOADING)
    int n_load, cap_load;
    pthread_mutex_t h5_mu;  // one adapter file read at a time (HDF5 is not thread-safe)
};

// pool.c (called with e->mu held unless said otherwise)
eng_entry *eng_find(eng_engine *e, const char *name); // live (not removed) entries only
// Makes sure entry x is resident or loading: a free slot or the least recently used idle
// adapter's slot is taken (that adapter evicted) and the load queued. False when every slot
// is in use by running requests (try again later).
bool eng_pool_want(eng_engine *e, eng_entry *x);
// Engine thread: installs what the loader finished (bank slots), frees removed entries
// nobody uses.
void eng_pool_sync(eng_engine *e);
void eng_pool_release(eng_engine *e, eng_entry *x); // a request stopped using x
molt_status eng_loader_start(eng_engine *e);
void eng_loader_stop(eng_engine *e);                 // without e->mu held
void eng_pool_free(eng_engine *e);                   // at the end, no threads left

// sched.c (engine thread, e->mu NOT held except where said)
// One step: takes new requests, plans the batch, runs it, delivers events. Returns false
// when there was nothing to run (the caller then waits for work).
bool eng_step(eng_engine *e);
// Finishes every request (waiting and running) with `finish` (engine thread).
void eng_finish_all(eng_engine *e, eng_finish finish);

// engine.c
void eng_req_push(eng_req *q, const eng_event *ev); // appends an event, wakes the client
void eng_req_unref(eng_req *q);                      // frees at the last reference

#endif
