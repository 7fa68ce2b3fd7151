// autograd/cuda/cuda_backend.cu: device query, memory copies and the first elementwise
// kernel. Kernels for the ops come later, each tested against its CPU reference kernel.
#include "cuda_backend.h"

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdio.h>
#ifdef MOLT_HAVE_CUDNN
#include <cudnn.h>
#endif
#ifdef MOLT_HAVE_NCCL
#include <nccl.h>
#endif

static int report(cudaError_t e, char *err, size_t cap) {
    if (e != cudaSuccess && err && cap)
        snprintf(err, cap, "%s", cudaGetErrorString(e));
    return (int)e;
}

extern "C" int molt_cuda_device_count(int *n, char *err, size_t cap) {
    *n = 0;
    cudaError_t e = cudaGetDeviceCount(n);
    if (e != cudaSuccess)
        *n = 0;
    return report(e, err, cap);
}

extern "C" int molt_cuda_device_props(int dev, char *name, size_t name_cap, int *sm_major,
                                      int *sm_minor, size_t *total_mem, char *err, size_t cap) {
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, dev);
    if (e != cudaSuccess)
        return report(e, err, cap);
    snprintf(name, name_cap, "%s", p.name);
    *sm_major = p.major;
    *sm_minor = p.minor;
    *total_mem = p.totalGlobalMem;
    return 0;
}

extern "C" int molt_cuda_runtime_version(int *v) { return (int)cudaRuntimeGetVersion(v); }

// cuBLAS is opened on first use rather than linked: linking it maps cuBLASLt and costs
// about 150 MB of resident memory in every molt process, GPU or not.
static void *cublas_handle(void) {
    static void *h;
    if (!h)
        h = dlopen("libcublas.so." CUBLAS_SONAME_MAJOR, RTLD_NOW | RTLD_LOCAL);
    return h;
}

extern "C" int molt_cuda_cublas_version(int *v) {
    *v = 0;
    void *h = cublas_handle();
    if (!h)
        return 1;
    typedef int (*get_property_fn)(int, int *); // cublasGetProperty(libraryPropertyType, int*)
    get_property_fn get = (get_property_fn)dlsym(h, "cublasGetProperty");
    int major = 0, minor = 0, patch = 0;
    if (!get || get(0, &major) || get(1, &minor) || get(2, &patch))
        return 1;
    *v = major * 10000 + minor * 100 + patch;
    return 0;
}

extern "C" int molt_cuda_malloc(void **p, size_t bytes, char *err, size_t cap) {
    return report(cudaMalloc(p, bytes), err, cap);
}

extern "C" int molt_cuda_free(void *p) { return (int)cudaFree(p); }

extern "C" int molt_cuda_h2d(void *dst, const void *src, size_t bytes, char *err, size_t cap) {
    return report(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), err, cap);
}

extern "C" int molt_cuda_d2h(void *dst, const void *src, size_t bytes, char *err, size_t cap) {
    return report(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), err, cap);
}

extern "C" int molt_cuda_d2d(void *dst, const void *src, size_t bytes, char *err, size_t cap) {
    return report(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice), err, cap);
}

__global__ static void add_f32_kernel(float *y, const float *a, const float *b, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (; i < n; i += stride)
        y[i] = a[i] + b[i];
}

extern "C" int molt_cuda_add_f32(float *y, const float *a, const float *b, size_t n, char *err,
                                 size_t cap) {
    if (n == 0)
        return 0;
    size_t blocks = (n + 255) / 256;
    if (blocks > 65535)
        blocks = 65535;
    add_f32_kernel<<<(unsigned)blocks, 256>>>(y, a, b, n);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess)
        e = cudaDeviceSynchronize();
    return report(e, err, cap);
}

extern "C" int molt_cuda_cudnn_version(void) {
#ifdef MOLT_HAVE_CUDNN
    return (int)cudnnGetVersion();
#else
    return 0;
#endif
}

extern "C" int molt_cuda_nccl_version(void) {
#ifdef MOLT_HAVE_NCCL
    int v = 0;
    ncclGetVersion(&v);
    return v;
#else
    return 0;
#endif
}
