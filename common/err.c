// common/err.c: the per-thread error message and the allocation hook behind molt_malloc.
#include "err.h"

#include <stdatomic.h>
#if defined(__GLIBC__)
#include <malloc.h>
#define MOLT_HAVE_USABLE_SIZE 1
#endif

#include <stdarg.h>
#include <string.h>

#define ERR_MSG_CAP 2048

static _Thread_local char err_msg[ERR_MSG_CAP];
static _Thread_local long alloc_fail_countdown = -1;
static _Thread_local unsigned long alloc_count;

static const char *const status_names[] = {
    "ok", "bad argument", "out of memory", "i/o error", "format error",
    "device error", "unsupported", "internal error", "interrupted",
};
_Static_assert(sizeof(status_names) / sizeof(status_names[0]) == MOLT_STATUS_COUNT,
               "status_names must name every molt_status");

molt_status molt_err(molt_status st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    return st;
}

molt_status molt_err_wrap(molt_status st, const char *fmt, ...) {
    char old[ERR_MSG_CAP];
    memcpy(old, err_msg, sizeof old);
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(err_msg, sizeof err_msg, fmt, ap);
    va_end(ap);
    // append ": <old message>", truncated to fit
    size_t at = n < 0 ? 0 : (size_t)n;
    for (size_t i = 0; old[0] && i < 2 && at + 1 < sizeof err_msg; i++)
        err_msg[at++] = ": "[i];
    for (size_t i = 0; old[0] && old[i] && at + 1 < sizeof err_msg; i++)
        err_msg[at++] = old[i];
    if (at < sizeof err_msg)
        err_msg[at] = 0;
    return st;
}

const char *molt_err_msg(void) { return err_msg; }
void molt_err_clear(void) { err_msg[0] = 0; }

const char *molt_status_name(molt_status st) {
    if ((int)st < 0 || st >= MOLT_STATUS_COUNT)
        return "unknown status";
    return status_names[st];
}

// Returns 1 when an injected failure is due for this allocation.
static int alloc_should_fail(void) {
    if (alloc_fail_countdown < 0)
        return 0;
    if (alloc_fail_countdown == 0) {
        alloc_fail_countdown = -1;
        return 1;
    }
    alloc_fail_countdown--;
    return 0;
}

// ---- accounting -----------------------------------------------------------------------

static _Atomic long long mem_in_use, mem_peak;

static size_t block_size(void *p) {
#ifdef MOLT_HAVE_USABLE_SIZE
    return p ? malloc_usable_size(p) : 0;
#else
    (void)p;
    return 0;
#endif
}

void molt_mem_adjust(long long delta) {
    long long now = atomic_fetch_add_explicit(&mem_in_use, delta, memory_order_relaxed) + delta;
    long long peak = atomic_load_explicit(&mem_peak, memory_order_relaxed);
    while (now > peak &&
           !atomic_compare_exchange_weak_explicit(&mem_peak, &peak, now, memory_order_relaxed,
                                                  memory_order_relaxed))
        ;
}

size_t molt_mem_in_use(void) {
    long long v = atomic_load_explicit(&mem_in_use, memory_order_relaxed);
    return v > 0 ? (size_t)v : 0;
}

size_t molt_mem_peak(void) {
    long long v = atomic_load_explicit(&mem_peak, memory_order_relaxed);
    return v > 0 ? (size_t)v : 0;
}

void molt_mem_peak_reset(void) {
    atomic_store_explicit(&mem_peak, atomic_load_explicit(&mem_in_use, memory_order_relaxed),
                          memory_order_relaxed);
}

void *molt_malloc(size_t n) {
    if (alloc_should_fail())
        return NULL;
    void *p = malloc(n ? n : 1);
    if (p) {
        alloc_count++;
        molt_mem_adjust((long long)block_size(p));
    }
    return p;
}

void *molt_calloc(size_t count, size_t size) {
    if (alloc_should_fail())
        return NULL;
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (p) {
        alloc_count++;
        molt_mem_adjust((long long)block_size(p));
    }
    return p;
}

void *molt_realloc(void *p, size_t n) {
    if (alloc_should_fail())
        return NULL;
    size_t old = block_size(p);
    void *q = realloc(p, n ? n : 1);
    if (q) {
        alloc_count++;
        molt_mem_adjust((long long)block_size(q) - (long long)old);
    }
    return q;
}

void molt_free(void *p) {
    if (p)
        molt_mem_adjust(-(long long)block_size(p));
    free(p);
}

void *molt_malloc_uncounted(size_t n) {
    if (alloc_should_fail())
        return NULL;
    void *p = malloc(n ? n : 1);
    if (p)
        alloc_count++;
    return p;
}

void molt_free_uncounted(void *p) { free(p); }

char *molt_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = molt_malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

void molt_alloc_fail_after(long n) { alloc_fail_countdown = n; }
unsigned long molt_alloc_count(void) { return alloc_count; }
