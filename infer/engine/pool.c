// infer/engine/pool.c: the engine's adapters: the registry (name -> path, in registration
// order), which adapters are resident in which bank slot (at most max_loaded_adapters: the
// least recently used idle one gives up its slot), and the loader thread that reads evicted
// adapters back from their paths without stalling the engine thread. Bank slots are only
// written on the engine thread, between forwards. Not here: scheduling (sched.c).
#include "eng_internal.h"

#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

eng_entry *eng_find(eng_engine *e, const char *name) {
    for (eng_entry *x = e->entries; x; x = x->next)
        if (!x->removed && !strcmp(x->name, name))
            return x;
    return NULL;
}

static void free_adapter(lora_adapter *ad) {
    if (!ad)
        return;
    lora_detach(ad);
    molt_free(ad);
}

// Reads the adapter at path for e's model, one file at a time (HDF5). *out is heap-allocated.
static molt_status load_adapter(eng_engine *e, const char *path, lora_adapter **out) {
    *out = NULL;
    lora_adapter *ad = molt_calloc(1, sizeof *ad);
    if (!ad)
        return molt_err(MOLT_ENOMEM, "adapter %s: out of memory", path);
    pthread_mutex_lock(&e->h5_mu);
    molt_status st = lora_load_any(&e->model, path, LORA_WIRE_NONE, ad);
    pthread_mutex_unlock(&e->h5_mu);
    if (st != MOLT_OK) {
        molt_free(ad);
        return st;
    }
    // routed-expert B re-laid per expert for the batched kernel (off the engine thread)
    if ((st = lora_pack_experts(ad)) != MOLT_OK) {
        free_adapter(ad);
        return st;
    }
    *out = ad;
    return MOLT_OK;
}

// Takes x out of its slot (the bank forgets it, its memory goes).
static void evict(eng_engine *e, eng_entry *x) {
    if (x->slot >= 0) {
        mdl_bank_clear(&e->bank, x->slot);
        e->slots[x->slot] = NULL;
    }
    free_adapter(x->ad);
    x->ad = NULL;
    x->slot = -1;
    if (x->state == ENT_RESIDENT)
        e->st.adapter_evictions++;
    x->state = ENT_IDLE;
}

// A slot for a new resident: a free one, else the least recently used resident adapter that
// no request uses (evicted); -1 when none.
static int free_slot(eng_engine *e) {
    int n = e->o.max_loaded_adapters;
    for (int s = 0; s < n; s++)
        if (!e->slots[s])
            return s;
    eng_entry *lru = NULL;
    for (int s = 0; s < n; s++) {
        eng_entry *x = e->slots[s];
        if (x->state == ENT_RESIDENT && x->active == 0 && (!lru || x->last_used < lru->last_used))
            lru = x;
    }
    if (!lru)
        return -1;
    int s = lru->slot;
    evict(e, lru);
    return s;
}

bool eng_pool_want(eng_engine *e, eng_entry *x) {
    if (x->state != ENT_IDLE)
        return x->state == ENT_RESIDENT;
    int s = free_slot(e);
    if (s < 0)
        return false;
    if (e->n_load == e->cap_load) {
        int cap = e->cap_load ? 2 * e->cap_load : 8;
        eng_entry **q = molt_realloc(e->load_queue, (size_t)cap * sizeof *q);
        if (!q)
            return false; // out of memory: tried again at a later step
        e->load_queue = q;
        e->cap_load = cap;
    }
    e->slots[s] = x;
    x->slot = s;
    x->state = ENT_LOADING;
    e->load_queue[e->n_load++] = x;
    pthread_cond_signal(&e->load_cv);
    return false;
}

void eng_pool_release(eng_engine *e, eng_entry *x) {
    if (!x)
        return;
    x->active--;
    x->last_used = e->step;
}

// Puts a loaded adapter into x's reserved slot (or a slot found now); false when none.
static bool install(eng_engine *e, eng_entry *x, lora_adapter *ad, char *msg, size_t cap) {
    int s = x->slot >= 0 ? x->slot : free_slot(e);
    if (s < 0)
        return false;
    e->slots[s] = x;
    x->slot = s;
    if (lora_bank_put(ad, &e->model, &e->bank, s) != MOLT_OK) {
        snprintf(msg, cap, "%s", molt_err_msg());
        e->slots[s] = NULL;
        x->slot = -1;
        return false;
    }
    x->ad = ad;
    x->state = ENT_RESIDENT;
    e->st.adapter_loads++;
    return true;
}

// Unlinks and frees removed entries that nothing uses any more.
static void collect_removed(eng_engine *e) {
    for (eng_entry **p = &e->entries; *p;) {
        eng_entry *x = *p;
        if (x->removed && x->active == 0 && x->state != ENT_LOADING) {
            evict(e, x);
            *p = x->next;
            molt_free(x);
        } else {
            p = &x->next;
        }
    }
}

void eng_pool_sync(eng_engine *e) {
    while (e->loaded) {
        eng_loaded *l = e->loaded;
        e->loaded = l->next;
        eng_entry *x = l->e;
        bool ok = l->ad && !x->removed;
        if (ok)
            ok = install(e, x, l->ad, l->msg, sizeof l->msg);
        if (!ok) {
            free_adapter(l->ad);
            if (x->slot >= 0 && e->slots[x->slot] == x)
                e->slots[x->slot] = NULL;
            x->slot = -1;
            x->state = ENT_IDLE;
            if (l->st != MOLT_OK || l->msg[0])
                snprintf(x->load_error, sizeof x->load_error, "%s", l->msg);
        } else {
            x->load_error[0] = 0;
        }
        molt_free(l);
    }
    collect_removed(e);
}

// ---- the loader thread ------------------------------------------------------------------------

static void *loader_main(void *arg) {
    eng_engine *e = arg;
#ifdef _OPENMP
    // one thread: a team of this thread's would stay beside the engine's (see load_main in
    // engine.c), and loading is not worth taking a core from the running sequences
    omp_set_num_threads(1);
#endif
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->stop && e->n_load == 0)
            pthread_cond_wait(&e->load_cv, &e->mu);
        if (e->stop)
            break;
        eng_entry *x = e->load_queue[0];
        memmove(e->load_queue, e->load_queue + 1, (size_t)(--e->n_load) * sizeof *e->load_queue);
        char path[sizeof x->path];
        snprintf(path, sizeof path, "%s", x->path);
        pthread_mutex_unlock(&e->mu);
        eng_loaded *l = molt_calloc(1, sizeof *l);
        lora_adapter *ad = NULL;
        molt_status st = load_adapter(e, path, &ad);
        pthread_mutex_lock(&e->mu);
        if (!l) { // no memory even for the note: the entry goes back to idle
            free_adapter(ad);
            x->state = ENT_IDLE;
            if (x->slot >= 0)
                e->slots[x->slot] = NULL;
            x->slot = -1;
            continue;
        }
        *l = (eng_loaded){.e = x, .ad = ad, .st = st};
        if (st != MOLT_OK)
            snprintf(l->msg, sizeof l->msg, "%s", molt_err_msg());
        l->next = e->loaded;
        e->loaded = l;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

molt_status eng_loader_start(eng_engine *e) {
    if (pthread_create(&e->loader, NULL, loader_main, e) != 0)
        return molt_err(MOLT_EINTERNAL, "engine: cannot start the adapter loader thread");
    e->loader_started = true;
    return MOLT_OK;
}

void eng_loader_stop(eng_engine *e) {
    if (!e->loader_started)
        return;
    pthread_mutex_lock(&e->mu);
    e->stop = true;
    pthread_cond_broadcast(&e->load_cv);
    pthread_mutex_unlock(&e->mu);
    pthread_join(e->loader, NULL);
    e->loader_started = false;
}

void eng_pool_free(eng_engine *e) {
    while (e->loaded) {
        eng_loaded *l = e->loaded;
        e->loaded = l->next;
        free_adapter(l->ad);
        molt_free(l);
    }
    while (e->entries) {
        eng_entry *x = e->entries;
        e->entries = x->next;
        free_adapter(x->ad);
        molt_free(x);
    }
    molt_free(e->load_queue);
    e->load_queue = NULL;
}

// ---- public: registration ---------------------------------------------------------------------

molt_status eng_adapter_add(eng_engine *e, const char *name, const char *path) {
    if (!name || !*name || strlen(name) >= sizeof e->entries->name)
        return molt_err(MOLT_EARG, "adapter name must be 1 to %zu bytes",
                        sizeof e->entries->name - 1);
    if (!path || !*path || strlen(path) >= sizeof e->entries->path)
        return molt_err(MOLT_EARG, "adapter path must be 1 to %zu bytes",
                        sizeof e->entries->path - 1);
    pthread_mutex_lock(&e->mu);
    bool taken = eng_find(e, name) != NULL, late = e->o.experts && e->started;
    int n = 0;
    for (eng_entry *x = e->entries; x; x = x->next)
        n += !x->removed;
    pthread_mutex_unlock(&e->mu);
    if (taken)
        return molt_err(MOLT_EARG, "an adapter named `%s` is already loaded", name);
    // an expert group's ranks must agree on every adapter's bank slot (engine.h)
    if (late)
        return molt_err(MOLT_EUNSUPPORTED, "adapter %s: an engine whose experts are split over "
                        "ranks takes its adapters before it starts", name);
    if (e->o.experts && n >= e->o.max_loaded_adapters)
        return molt_err(MOLT_EARG, "adapter %s: an engine whose experts are split over ranks "
                        "keeps every adapter resident; max_loaded_adapters is %d", name,
                        e->o.max_loaded_adapters);
    lora_adapter *ad;
    MOLT_TRY(load_adapter(e, path, &ad));
    eng_entry *x = molt_calloc(1, sizeof *x);
    eng_loaded *l = molt_calloc(1, sizeof *l);
    if (!x || !l) {
        molt_free(x);
        molt_free(l);
        free_adapter(ad);
        return molt_err(MOLT_ENOMEM, "adapter %s: out of memory", name);
    }
    snprintf(x->name, sizeof x->name, "%s", name);
    snprintf(x->path, sizeof x->path, "%s", path);
    x->slot = -1;
    x->rank_max = lora_max_rank(ad);
    x->params = ad->total_params;
    pthread_mutex_lock(&e->mu);
    if (eng_find(e, name)) { // registered meanwhile by another caller
        pthread_mutex_unlock(&e->mu);
        molt_free(x);
        molt_free(l);
        free_adapter(ad);
        return molt_err(MOLT_EARG, "an adapter named `%s` is already loaded", name);
    }
    x->uid = ++e->next_uid;
    x->state = ENT_LOADING; // installed (or let go) by the engine thread
    eng_entry **tail = &e->entries;
    while (*tail)
        tail = &(*tail)->next;
    *tail = x;
    *l = (eng_loaded){.e = x, .ad = ad, .st = MOLT_OK};
    l->next = e->loaded;
    e->loaded = l;
    if (!e->started) // no engine thread yet: install now (nothing reads the bank)
        eng_pool_sync(e);
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return MOLT_OK;
}

molt_status eng_adapter_remove(eng_engine *e, const char *name) {
    pthread_mutex_lock(&e->mu);
    eng_entry *x = name ? eng_find(e, name) : NULL;
    if (x) {
        x->removed = true;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    return x ? MOLT_OK : molt_err(MOLT_EARG, "no adapter named `%s` is loaded", name ? name : "");
}

int eng_adapter_list(eng_engine *e, eng_adapter_info *out, int cap) {
    int n = 0;
    pthread_mutex_lock(&e->mu);
    for (eng_entry *x = e->entries; x; x = x->next) {
        if (x->removed)
            continue;
        if (n < cap) {
            eng_adapter_info *i = &out[n];
            snprintf(i->name, sizeof i->name, "%s", x->name);
            snprintf(i->path, sizeof i->path, "%s", x->path);
            i->resident = x->state == ENT_RESIDENT;
            i->active = x->active;
            i->rank_max = x->rank_max;
            i->params = x->params;
        }
        n++;
    }
    pthread_mutex_unlock(&e->mu);
    return n;
}

bool eng_adapter_exists(eng_engine *e, const char *name) {
    pthread_mutex_lock(&e->mu);
    bool yes = name && eng_find(e, name) != NULL;
    pthread_mutex_unlock(&e->mu);
    return yes;
}
