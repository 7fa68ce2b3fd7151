// tests/harness/thread_probe.h: how many threads the process has started so far (every
// pthread_create, libraries' included; thread_probe.c).
#ifndef MOLT_TEST_THREAD_PROBE_H
#define MOLT_TEST_THREAD_PROBE_H

#include <pthread.h>

long harness_threads_started(void);

#endif
