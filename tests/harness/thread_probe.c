// tests/harness/thread_probe.c: counts the threads the process starts. This file defines
// pthread_create, which every shared library of the test (libgomp, OpenBLAS) then calls
// instead of libc's; the count goes up and libc's does the work. Only tests that call
// harness_threads_started() link it in.
#define _GNU_SOURCE
#include "thread_probe.h"

#include <dlfcn.h>
#include <stdatomic.h>

typedef int (*create_fn)(pthread_t *, const pthread_attr_t *, void *(*)(void *), void *);

static atomic_long started;

int pthread_create(pthread_t *t, const pthread_attr_t *attr, void *(*fn)(void *), void *arg) {
    static create_fn real; // benign race: every thread finds the same function
    if (!real)
        *(void **)&real = dlsym(RTLD_NEXT, "pthread_create");
    atomic_fetch_add(&started, 1);
    return real(t, attr, fn, arg);
}

long harness_threads_started(void) { return atomic_load(&started); }
