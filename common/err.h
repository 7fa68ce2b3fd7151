// common/err.h: status codes, the per-thread error message, and the one allocation hook.
// Every module of molt reports failure by returning a molt_status and leaving a message
// (file, line, field, what was expected) readable with molt_err_msg(). Library code never
// exits. This is the only code all modules share; it depends on nothing of ours.
#ifndef MOLT_COMMON_ERR_H
#define MOLT_COMMON_ERR_H

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

typedef enum {
    MOLT_OK = 0,
    MOLT_EARG,         // bad argument: shape, dtype, range, flag value
    MOLT_ENOMEM,       // allocation failed
    MOLT_EIO,          // read/write/open failure
    MOLT_EFORMAT,      // malformed input file or record
    MOLT_EDEVICE,      // accelerator missing or failing
    MOLT_EUNSUPPORTED, // valid request this build or op cannot serve
    MOLT_EINTERNAL,    // invariant broken inside molt (a bug)
    MOLT_EINTERRUPTED, // a stop was requested (Ctrl-C, SIGTERM) and the work was abandoned
    MOLT_STATUS_COUNT
} molt_status;

// Sets the thread's error message (printf-style) and returns st, so callers can write
// `return molt_err(MOLT_EARG, "linear: x has %d dims", n);`.
molt_status molt_err(molt_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
// Prefixes the current message with more context ("while loading X: <old message>").
molt_status molt_err_wrap(molt_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
const char *molt_err_msg(void);       // "" when no error was set
void molt_err_clear(void);
const char *molt_status_name(molt_status st);

// Programmer errors only (never user input): always on, reports file/line/expression.
#define MOLT_ASSERT(cond)                                                              \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: assertion failed: %s\n", __FILE__, __LINE__, #cond); \
            abort();                                                                   \
        }                                                                              \
    } while (0)

// Propagate a non-OK status.
#define MOLT_TRY(expr)                       \
    do {                                     \
        molt_status molt_try_st_ = (expr);   \
        if (molt_try_st_ != MOLT_OK)         \
            return molt_try_st_;             \
    } while (0)

// All heap allocation goes through these, so tests can inject failures.
void *molt_malloc(size_t n);
void *molt_calloc(size_t count, size_t size);
void *molt_realloc(void *p, size_t n); // on failure returns NULL and leaves p intact
void molt_free(void *p);
char *molt_strdup(const char *s);
// Make the n-th allocation from now (0 = the next one) fail; -1 turns injection off.
void molt_alloc_fail_after(long n);
// Number of successful allocations so far (for "allocates nothing" checks).
unsigned long molt_alloc_count(void);

// Memory accounting: bytes of live molt_malloc/calloc/realloc blocks (as the C library sizes
// them), with arenas counting the bytes they hand out rather than the chunks they hold (see
// molt_mem_adjust), over all threads; and the largest value it has had. Without glibc's
// malloc_usable_size both stay 0.
size_t molt_mem_in_use(void);
size_t molt_mem_peak(void);
void molt_mem_peak_reset(void); // the peak starts again from the current use
// Adds delta to the count: arenas add each piece they hand out and take them back at reset.
void molt_mem_adjust(long long delta);
// molt_malloc and molt_free without the accounting (failure injection still applies): the
// chunks of arenas, which count the pieces they hand out instead.
void *molt_malloc_uncounted(size_t n);
void molt_free_uncounted(void *p);

#endif
