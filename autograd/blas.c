// autograd/blas.c: OpenBLAS, loaded when the first computation needs it rather than when
// the process starts. OpenBLAS's start-up (a library constructor) reserves one 128 MiB
// buffer per thread and, when the address space is too small (ulimit -v), retries the
// reservation forever at 100% CPU; linked normally it does so before main, even for
// `molt --version`. Loaded here, the thread count is first chosen to fit the address space
// that is left (probed with a reservation of the same size, given back at once), and when
// not even one thread fits the caller gets a clear out-of-memory error instead of a hang.
//
// The library is the one CMake found (MOLT_OPENBLAS_PATH, the OpenMP build when present),
// else the soname libopenblas.so.0; MOLT_BLAS_LIBRARY names another file. The kernels call
// the ag_blas_* functions below (cpu/k_blas.h), which load on first use as a last resort;
// commands load through ag_blas_init (ag_ctx_init calls it) and so see the error.
//
// Not here: which kernels use BLAS and how they share threads with OpenMP (cpu/k_blas.h).
#define _DEFAULT_SOURCE // MAP_ANONYMOUS, MAP_NORESERVE
#include "internal.h"

#include <dlfcn.h>
#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>

#ifndef MOLT_OPENBLAS_PATH
#define MOLT_OPENBLAS_PATH "libopenblas.so.0"
#endif

// OpenBLAS keeps a pool of BUFFER_SIZE (128 MiB on x86-64) buffers that it never returns:
// one per thread of its own, taken at start-up, and one per caller in flight (the kernels call
// it from every thread of their OpenMP teams). When the pool must grow and the address space
// is full it retries forever, so here the pool is filled at load time, after checking that
// the address space holds it with room for the library's code.
#define BLAS_BUFFER_BYTES (((size_t)128 << 20) + 2 * 4096)
#define BLAS_CODE_BYTES ((size_t)64 << 20)

typedef void (*gemm_s_fn)(int, int, int, int, int, int, float, const float *, int,
                          const float *, int, float, float *, int);
typedef void (*gemm_d_fn)(int, int, int, int, int, int, double, const double *, int,
                          const double *, int, double, double *, int);
typedef void (*axpy_s_fn)(int, float, const float *, int, float *, int);
typedef void (*axpy_d_fn)(int, double, const double *, int, double *, int);
typedef float (*dot_s_fn)(int, const float *, int, const float *, int);
typedef double (*dot_d_fn)(int, const double *, int, const double *, int);

static struct {
    gemm_s_fn sgemm;
    gemm_d_fn dgemm;
    axpy_s_fn saxpy;
    axpy_d_fn daxpy;
    dot_s_fn sdot;
    dot_d_fn ddot;
    void (*set_threads)(int);
    int (*get_threads)(void);
    char *(*get_config)(void);
    void *(*memory_alloc)(int); // OpenBLAS's buffer pool, when exported
    void (*memory_free)(void *);
} fn;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile int loaded; // 1 once fn is filled; read without the lock on the fast path
static molt_status load_status = MOLT_OK;
static char load_error[1024];
static int load_threads;
static bool omp_reduced; // OpenMP was held at one thread to fit the pool

// Whether `bytes` of address space can be reserved now (the reservation is given back).
static bool address_space_for(size_t bytes) {
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS |
                   MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return false;
    munmap(p, bytes);
    return true;
}

// The thread count OpenBLAS would want: OPENBLAS_NUM_THREADS, else OpenMP's.
static int wanted_threads(void) {
    const char *e = getenv("OPENBLAS_NUM_THREADS");
    int n = e && *e ? atoi(e) : 0;
    if (n < 1)
        n = omp_get_max_threads();
    return n < 1 ? 1 : n;
}

static molt_status fail(molt_status st, const char *fmt, const char *a, const char *b) {
    snprintf(load_error, sizeof load_error, fmt, a, b);
    load_status = st;
    return st;
}

// The largest reservation that succeeds now, in MiB (to 1 MiB, up to 1 TiB).
static size_t free_address_space_mib(void) {
    size_t lo = 0, hi = (size_t)1 << 20;
    while (lo < hi) {
        size_t mid = (lo + hi + 1) / 2;
        if (address_space_for(mid << 20))
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// Whether the code and a pool of `buffers` buffers fit in the free address space.
static bool pool_fits(int buffers) {
    return address_space_for(BLAS_CODE_BYTES + (size_t)buffers * BLAS_BUFFER_BYTES);
}

// Takes `callers` caller buffers at once and gives them back: the pool then holds them, and
// later calls from up to that many threads at a time reuse them instead of growing it.
static void fill_pool(int callers) {
    if (!fn.memory_alloc || !fn.memory_free || callers < 1)
        return;
    void *held[1024];
    int n = callers < 1024 ? callers : 1024;
    for (int i = 0; i < n; i++)
        held[i] = fn.memory_alloc(0);
    for (int i = 0; i < n; i++)
        fn.memory_free(held[i]);
}

// Puts an environment variable back as it was (old: a strdup copy or NULL, freed here).
static void restore_env(const char *name, char *old) {
    if (old)
        setenv(name, old, 1);
    else
        unsetenv(name);
    free(old); // from strdup
}

static molt_status load_locked(void) {
    // OpenBLAS (OpenMP build) takes one buffer per OpenMP thread at start-up (n) and never
    // grows its own threads past that; every thread of a kernel's team may hold one more
    // while it calls BLAS (callers)
    int callers = omp_get_max_threads(), n = wanted_threads();
    if (n > callers)
        n = callers;
    if (!pool_fits(n + callers))
        n = 1;
    if (!pool_fits(n + callers) && pool_fits(n + 1)) {
        callers = 1; // one caller at a time
        omp_reduced = true;
    }
    if (!pool_fits(n + callers)) {
        char need[64], left[160];
        snprintf(need, sizeof need, "%zu MiB",
                 (BLAS_CODE_BYTES + 2 * BLAS_BUFFER_BYTES) >> 20);
        struct rlimit rl;
        size_t free_mib = free_address_space_mib();
        if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
            snprintf(left, sizeof left, "%zu MiB are left under the address-space limit of "
                     "%llu MiB (ulimit -v)", free_mib,
                     (unsigned long long)(rl.rlim_cur >> 20));
        else
            snprintf(left, sizeof left, "%zu MiB are left", free_mib);
        return fail(MOLT_ENOMEM, "out of memory: the BLAS library (OpenBLAS) needs %s of free "
                    "address space for one thread, and %s", need, left);
    }
    // OpenBLAS's constructor sizes its threads and buffers from these two variables; they
    // are set for the load only (OpenMP itself read its own long before)
    char num[16], *old_blas = getenv("OPENBLAS_NUM_THREADS"), *old_omp = getenv("OMP_NUM_THREADS");
    old_blas = old_blas ? strdup(old_blas) : NULL;
    old_omp = old_omp ? strdup(old_omp) : NULL;
    snprintf(num, sizeof num, "%d", n);
    setenv("OPENBLAS_NUM_THREADS", num, 1);
    setenv("OMP_NUM_THREADS", num, 1);
    const char *path = getenv("MOLT_BLAS_LIBRARY");
    if (!path || !*path)
        path = MOLT_OPENBLAS_PATH;
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h && strcmp(path, "libopenblas.so.0"))
        h = dlopen("libopenblas.so.0", RTLD_NOW | RTLD_LOCAL);
    restore_env("OPENBLAS_NUM_THREADS", old_blas);
    restore_env("OMP_NUM_THREADS", old_omp);
    if (omp_reduced)
        omp_set_num_threads(1);
    if (!h)
        return fail(MOLT_EUNSUPPORTED, "cannot load the BLAS library %s: %s", path, dlerror());
    // dlsym returns void *; POSIX guarantees the conversion to function pointers works
#define SYM(field, name)                                                                   \
    do {                                                                                   \
        *(void **)&fn.field = dlsym(h, name);                                              \
        if (!fn.field)                                                                     \
            return fail(MOLT_EUNSUPPORTED, "the BLAS library %s has no %s", path, name);   \
    } while (0)
    SYM(sgemm, "cblas_sgemm");
    SYM(dgemm, "cblas_dgemm");
    SYM(saxpy, "cblas_saxpy");
    SYM(daxpy, "cblas_daxpy");
    SYM(sdot, "cblas_sdot");
    SYM(ddot, "cblas_ddot");
    SYM(set_threads, "openblas_set_num_threads");
    SYM(get_threads, "openblas_get_num_threads");
    SYM(get_config, "openblas_get_config");
#undef SYM
    *(void **)&fn.memory_alloc = dlsym(h, "blas_memory_alloc");
    *(void **)&fn.memory_free = dlsym(h, "blas_memory_free");
    fill_pool(callers);
    load_threads = n;
    return MOLT_OK;
}

molt_status ag_blas_init(void) {
    if (loaded)
        return MOLT_OK;
    pthread_mutex_lock(&lock);
    if (!loaded && load_status == MOLT_OK) {
        molt_status st = load_locked();
        if (st == MOLT_OK)
            __atomic_store_n(&loaded, 1, __ATOMIC_RELEASE);
    }
    molt_status st = loaded ? MOLT_OK : load_status;
    pthread_mutex_unlock(&lock);
    if (st != MOLT_OK)
        return molt_err(st, "%s", load_error);
    return MOLT_OK;
}

// Kernels reach BLAS only after a context (ag_ctx_init) loaded it; a call before that loads
// here, and a failure at this point cannot be returned through a void kernel.
static void need(void) {
    if (__atomic_load_n(&loaded, __ATOMIC_ACQUIRE))
        return;
    if (ag_blas_init() != MOLT_OK) {
        fprintf(stderr, "molt: %s\n", molt_err_msg());
        MOLT_ASSERT(!"BLAS used before ag_blas_init succeeded");
    }
}

const char *ag_blas_describe(void) {
    static char text[512];
    if (ag_blas_init() != MOLT_OK)
        return load_error;
    snprintf(text, sizeof text, "%s, %d thread%s%s", fn.get_config(), load_threads,
             load_threads == 1 ? "" : "s",
             omp_reduced ? " (OpenMP held at 1 thread: the address space is limited)" : "");
    return text;
}

int ag_blas_threads(void) {
    need();
    return fn.get_threads();
}

void ag_blas_set_threads(int n) {
    need();
    // more threads than the start-up fitted make OpenBLAS take more buffers, which hangs
    // when the address space cannot hold them: grow only when it can (and fill the pool for
    // the callers OpenMP may now run), else keep to what was checked
    pthread_mutex_lock(&lock);
    int callers = omp_get_max_threads();
    if (n > load_threads && pool_fits(n - load_threads + callers)) {
        fn.set_threads(n);
        load_threads = n;
        fill_pool(callers);
    } else {
        fn.set_threads(n > load_threads ? load_threads : n);
    }
    pthread_mutex_unlock(&lock);
}

void ag_blas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha,
                   const float *a, int lda, const float *b, int ldb, float beta, float *c,
                   int ldc) {
    need();
    fn.sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void ag_blas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha,
                   const double *a, int lda, const double *b, int ldb, double beta, double *c,
                   int ldc) {
    need();
    fn.dgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void ag_blas_saxpy(int n, float alpha, const float *x, int incx, float *y, int incy) {
    need();
    fn.saxpy(n, alpha, x, incx, y, incy);
}

void ag_blas_daxpy(int n, double alpha, const double *x, int incx, double *y, int incy) {
    need();
    fn.daxpy(n, alpha, x, incx, y, incy);
}

float ag_blas_sdot(int n, const float *x, int incx, const float *y, int incy) {
    need();
    return fn.sdot(n, x, incx, y, incy);
}

double ag_blas_ddot(int n, const double *x, int incx, const double *y, int incy) {
    need();
    return fn.ddot(n, x, incx, y, incy);
}
