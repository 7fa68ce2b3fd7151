// autograd/cuda/cuda_backend.cu: the CUDA runtime side of molt: device query, the one
// compute stream, the per-thread error message, memory and copies (all ordered on the
// compute stream), and library versions (cuDNN and NCCL are only opened to read theirs:
// nothing uses them yet). Kernels live in the k_*.cu files, matrix products in blas.cu.
#include "cu_internal.cuh"

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static thread_local char err_buf[512];

int cu_fail(const char *file, int line, const char *fmt, ...) {
    const char *base = strrchr(file, '/');
    int n = snprintf(err_buf, sizeof err_buf, "%s:%d: ", base ? base + 1 : file, line);
    if (n < 0 || (size_t)n >= sizeof err_buf)
        n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_buf + n, sizeof err_buf - (size_t)n, fmt, ap);
    va_end(ap);
    return 1;
}

extern "C" const char *molt_cuda_error(void) { return err_buf; }

static struct {
    int state; // 0 not tried, 1 ready, -1 failed
    char why[256];
    cudaStream_t stream;
    bool sync_each; // MOLT_CUDA_SYNC=1: synchronize after every launch
} R;
static pthread_mutex_t init_mu = PTHREAD_MUTEX_INITIALIZER;

// The runtime says "driver version is insufficient" also when there is no driver at all
// (a machine without a GPU): both cases are named.
static const char *no_device_hint(cudaError_t e) {
    return e == cudaErrorInsufficientDriver
               ? " (no NVIDIA driver, or one too old)"
               : "";
}

static int runtime_open(void) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaSuccess && n < 1)
        e = cudaErrorNoDevice;
    if (e == cudaSuccess)
        e = cudaSetDevice(0);
    if (e == cudaSuccess)
        e = cudaStreamCreateWithFlags(&R.stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        snprintf(R.why, sizeof R.why, "%s%s", cudaGetErrorString(e), no_device_hint(e));
        return 1;
    }
    const char *s = getenv("MOLT_CUDA_SYNC");
    R.sync_each = s && *s && strcmp(s, "0") != 0;
    return 0;
}

int cu_ready(void) {
    pthread_mutex_lock(&init_mu);
    if (R.state == 0)
        R.state = runtime_open() ? -1 : 1;
    int st = R.state;
    pthread_mutex_unlock(&init_mu);
    if (st < 0)
        return cu_fail(__FILE__, __LINE__, "no usable CUDA device: %s", R.why);
    return 0;
}

extern "C" int molt_cuda_init(void) { return cu_ready(); }

cudaStream_t cu_stream(void) { return R.stream; }

int cu_after_launch(const char *file, int line, const char *kernel) {
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess && R.sync_each)
        e = cudaStreamSynchronize(R.stream);
    if (e != cudaSuccess)
        return cu_fail(file, line, "kernel %s: %s (%s)", kernel, cudaGetErrorString(e),
                       cudaGetErrorName(e));
    return 0;
}

extern "C" int molt_cuda_device_count(int *n) {
    *n = 0;
    cudaError_t e = cudaGetDeviceCount(n);
    if (e != cudaSuccess) {
        *n = 0;
        return cu_fail(__FILE__, __LINE__, "%s%s", cudaGetErrorString(e), no_device_hint(e));
    }
    return 0;
}

extern "C" int molt_cuda_device_props(int dev, char *name, size_t name_cap, int *sm_major,
                                      int *sm_minor, size_t *total_mem) {
    cudaDeviceProp p;
    CU_CHECK(cudaGetDeviceProperties(&p, dev));
    snprintf(name, name_cap, "%s", p.name);
    *sm_major = p.major;
    *sm_minor = p.minor;
    *total_mem = p.totalGlobalMem;
    return 0;
}

extern "C" int molt_cuda_mem_info(size_t *free_bytes, size_t *total_bytes) {
    CU_TRY(cu_ready());
    CU_CHECK(cudaMemGetInfo(free_bytes, total_bytes));
    return 0;
}

extern "C" int molt_cuda_runtime_version(int *v) { return (int)cudaRuntimeGetVersion(v); }

extern "C" int molt_cuda_malloc(void **p, size_t bytes) {
    *p = NULL;
    CU_TRY(cu_ready());
    cudaError_t e = cudaMalloc(p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        *p = NULL;
        return cu_fail(__FILE__, __LINE__, "cudaMalloc of %zu bytes: %s", bytes,
                       cudaGetErrorString(e));
    }
    return 0;
}

extern "C" int molt_cuda_free(void *p) {
    if (!p)
        return 0;
    // frees wait for the stream's work that may still read the memory
    CU_CHECK(cudaStreamSynchronize(R.stream));
    CU_CHECK(cudaFree(p));
    return 0;
}

extern "C" int molt_cuda_memset(void *p, int v, size_t bytes) {
    if (bytes == 0)
        return 0;
    CU_TRY(cu_ready());
    CU_CHECK(cudaMemsetAsync(p, v, bytes, R.stream));
    return 0;
}

// From pageable host memory the copy returns once the source has been read (the DMA may
// still be in flight, ordered on the stream), so the caller may reuse src at once.
extern "C" int molt_cuda_h2d(void *dst, const void *src, size_t bytes) {
    if (bytes == 0)
        return 0;
    CU_TRY(cu_ready());
    CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, R.stream));
    return 0;
}

extern "C" int molt_cuda_d2h(void *dst, const void *src, size_t bytes) {
    if (bytes == 0)
        return 0;
    CU_TRY(cu_ready());
    CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, R.stream));
    CU_CHECK(cudaStreamSynchronize(R.stream));
    return 0;
}

extern "C" int molt_cuda_d2d(void *dst, const void *src, size_t bytes) {
    if (bytes == 0)
        return 0;
    CU_TRY(cu_ready());
    CU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, R.stream));
    return 0;
}

extern "C" int molt_cuda_sync(void) {
    CU_TRY(cu_ready());
    CU_CHECK(cudaStreamSynchronize(R.stream));
    return 0;
}

// ---- events, for benchmarks -------------------------------------------------------------

extern "C" int molt_cuda_timer_start(void **ev) {
    CU_TRY(cu_ready());
    cudaEvent_t e[2];
    CU_CHECK(cudaEventCreate(&e[0]));
    CU_CHECK(cudaEventCreate(&e[1]));
    CU_CHECK(cudaEventRecord(e[0], R.stream));
    ev[0] = e[0];
    ev[1] = e[1];
    return 0;
}

extern "C" int molt_cuda_timer_stop(void **ev, double *seconds) {
    cudaEvent_t e0 = (cudaEvent_t)ev[0], e1 = (cudaEvent_t)ev[1];
    CU_CHECK(cudaEventRecord(e1, R.stream));
    CU_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    CU_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    CU_CHECK(cudaEventDestroy(e0));
    CU_CHECK(cudaEventDestroy(e1));
    *seconds = ms * 1e-3;
    return 0;
}

// ---- libraries opened at run time ------------------------------------------------------

void *cu_dlopen(const char *soname, char *why, size_t why_cap) {
    void *h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
    if (h)
        return h;
    const char *e = dlerror();
    if (why)
        snprintf(why, why_cap, "cannot open %s: %s", soname, e ? e : "?");
#ifdef MOLT_CUDA_LIBDIR
    char path[1024];
    int n = snprintf(path, sizeof path, "%s/%s", MOLT_CUDA_LIBDIR, soname);
    if (n > 0 && (size_t)n < sizeof path)
        h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
#endif
    return h;
}

// cudnnGetVersion (size_t (void)): major*10000 + minor*100 + patch since cuDNN 9.
extern "C" int molt_cuda_cudnn_version(void) {
    void *h = cu_dlopen("libcudnn.so.9", NULL, 0);
    if (!h)
        return 0;
    typedef size_t (*get_fn)(void);
    get_fn get = (get_fn)dlsym(h, "cudnnGetVersion");
    int v = get ? (int)get() : 0;
    dlclose(h);
    return v;
}

// ncclGetVersion (ncclResult_t (int *)), 0 = ncclSuccess.
extern "C" int molt_cuda_nccl_version(void) {
    void *h = cu_dlopen("libnccl.so.2", NULL, 0);
    if (!h)
        return 0;
    typedef int (*get_fn)(int *);
    get_fn get = (get_fn)dlsym(h, "ncclGetVersion");
    int v = 0;
    if (!get || get(&v) != 0)
        v = 0;
    dlclose(h);
    return v;
}
