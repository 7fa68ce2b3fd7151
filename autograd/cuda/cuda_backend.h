// autograd/cuda/cuda_backend.h: the C-callable surface of the CUDA code (compiled by nvcc
// only when the build has CUDA). Every function returns 0 on success or a CUDA error code,
// and fills `err` (when given) with the CUDA error string.
#ifndef MOLT_CUDA_BACKEND_H
#define MOLT_CUDA_BACKEND_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

int molt_cuda_device_count(int *n, char *err, size_t cap);
int molt_cuda_device_props(int dev, char *name, size_t name_cap, int *sm_major,
                           int *sm_minor, size_t *total_mem, char *err, size_t cap);
int molt_cuda_runtime_version(int *v);
// cuBLAS version as major*10000 + minor*100 + patch; non-zero when it cannot be loaded.
int molt_cuda_cublas_version(int *v);
int molt_cuda_malloc(void **p, size_t bytes, char *err, size_t cap);
int molt_cuda_free(void *p);
int molt_cuda_h2d(void *dst, const void *src, size_t bytes, char *err, size_t cap);
int molt_cuda_d2h(void *dst, const void *src, size_t bytes, char *err, size_t cap);
int molt_cuda_d2d(void *dst, const void *src, size_t bytes, char *err, size_t cap);
// y = a + b over n floats on the current device; synchronizes before returning.
int molt_cuda_add_f32(float *y, const float *a, const float *b, size_t n, char *err, size_t cap);
// Versions of cuDNN and NCCL linked in (0 when not linked).
int molt_cuda_cudnn_version(void);
int molt_cuda_nccl_version(void);

#ifdef __cplusplus
}
#endif
#endif
