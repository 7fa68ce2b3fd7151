// autograd/device.c: device discovery and the CPU<->CUDA plumbing (tensor copies and the
// first elementwise kernel). Without CUDA in the build every CUDA request is a clear
// MOLT_EDEVICE error; nothing here aborts when no GPU is visible.
#include "autograd.h"

#include <string.h>

#ifdef MOLT_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

void ag_device_query(ag_device_info *info) {
    memset(info, 0, sizeof *info);
#ifdef MOLT_HAVE_CUDA
    info->cuda_compiled = 1;
    int n = 0;
    if (molt_cuda_device_count(&n, info->cuda_error, sizeof info->cuda_error) == 0)
        info->cuda_devices = n;
#else
    snprintf(info->cuda_error, sizeof info->cuda_error, "built without CUDA");
#endif
}

molt_status ag_cuda_describe(int i, char *buf, size_t cap) {
#ifdef MOLT_HAVE_CUDA
    char name[256], err[128] = "";
    int major = 0, minor = 0;
    size_t mem = 0;
    if (molt_cuda_device_props(i, name, sizeof name, &major, &minor, &mem, err, sizeof err))
        return molt_err(MOLT_EDEVICE, "cuda device %d: %s", i, err);
    snprintf(buf, cap, "%s, sm_%d%d, %.1f GiB", name, major, minor,
             (double)mem / (1024.0 * 1024.0 * 1024.0));
    return MOLT_OK;
#else
    (void)i;
    (void)buf;
    (void)cap;
    return molt_err(MOLT_EDEVICE, "cuda device query: this build has no CUDA");
#endif
}

#ifdef MOLT_HAVE_CUDA
static molt_status cuda_ready(const char *what) {
    ag_device_info info;
    ag_device_query(&info);
    if (info.cuda_devices < 1)
        return molt_err(MOLT_EDEVICE, "%s: no CUDA device visible (%s)", what,
                        info.cuda_error[0] ? info.cuda_error : "0 devices");
    return MOLT_OK;
}
#endif

ag_tensor *ag_to_device(ag_tensor *t, ag_device dev) {
    if (!t) {
        molt_err(MOLT_EARG, "to_device: tensor is NULL");
        return NULL;
    }
    if ((unsigned)dev >= AG_DEVICE_COUNT) {
        molt_err(MOLT_EARG, "to_device: unknown device %d", (int)dev);
        return NULL;
    }
#ifdef MOLT_HAVE_CUDA
    if ((dev == AG_CUDA || t->device == AG_CUDA) && cuda_ready("to_device") != MOLT_OK)
        return NULL;
    size_t bytes = (size_t)t->numel * ag_dtype_size(t->dtype);
    ag_tensor *o = molt_calloc(1, sizeof *o);
    if (!o) {
        molt_err(MOLT_ENOMEM, "to_device: out of memory");
        return NULL;
    }
    *o = *t;
    o->grad = NULL;
    o->arena = NULL;
    o->requires_grad = false;
    o->device = dev;
    char err[128] = "";
    int rc = 0;
    if (dev == AG_CUDA) {
        rc = molt_cuda_malloc(&o->data, bytes, err, sizeof err);
        if (!rc)
            rc = t->device == AG_CPU ? molt_cuda_h2d(o->data, t->data, bytes, err, sizeof err)
                                     : molt_cuda_d2d(o->data, t->data, bytes, err, sizeof err);
    } else {
        o->data = molt_malloc(bytes);
        if (!o->data) {
            molt_free(o);
            molt_err(MOLT_ENOMEM, "to_device: out of memory for %zu bytes", bytes);
            return NULL;
        }
        rc = t->device == AG_CUDA ? molt_cuda_d2h(o->data, t->data, bytes, err, sizeof err)
                                  : (memcpy(o->data, t->data, bytes), 0);
    }
    if (rc) {
        ag_device_tensor_free(o);
        molt_err(MOLT_EDEVICE, "to_device: %s", err);
        return NULL;
    }
    return o;
#else
    if (dev == AG_CUDA || t->device == AG_CUDA) {
        molt_err(MOLT_EDEVICE, "to_device: this build has no CUDA");
        return NULL;
    }
    size_t bytes = (size_t)t->numel * ag_dtype_size(t->dtype);
    ag_tensor *o = molt_calloc(1, sizeof *o);
    if (!o || !(*o = *t, o->data = molt_malloc(bytes))) {
        molt_free(o);
        molt_err(MOLT_ENOMEM, "to_device: out of memory for %zu bytes", bytes);
        return NULL;
    }
    memcpy(o->data, t->data, bytes);
    o->grad = NULL;
    o->arena = NULL;
    o->requires_grad = false;
    return o;
#endif
}

void ag_device_tensor_free(ag_tensor *t) {
    if (!t)
        return;
#ifdef MOLT_HAVE_CUDA
    if (t->device == AG_CUDA) {
        if (t->data)
            molt_cuda_free(t->data);
    } else
#endif
        molt_free(t->data);
    molt_free(t);
}

molt_status ag_device_add(ag_tensor *y, const ag_tensor *a, const ag_tensor *b) {
    if (!y || !a || !b)
        return molt_err(MOLT_EARG, "device_add: NULL tensor");
    if (!ag_same_shape(a, b) || !ag_same_shape(a, y))
        return molt_err(MOLT_EARG, "device_add: shapes differ");
    if (a->dtype != AG_F32 || b->dtype != AG_F32 || y->dtype != AG_F32)
        return molt_err(MOLT_EARG, "device_add: expected f32 tensors");
    if (a->device != b->device || a->device != y->device)
        return molt_err(MOLT_EARG, "device_add: tensors on different devices");
    if (a->device == AG_CPU) {
        float *py = y->data;
        const float *pa = a->data, *pb = b->data;
        for (int64_t i = 0; i < a->numel; i++)
            py[i] = pa[i] + pb[i];
        return MOLT_OK;
    }
#ifdef MOLT_HAVE_CUDA
    char err[128] = "";
    if (molt_cuda_add_f32(y->data, a->data, b->data, (size_t)a->numel, err, sizeof err))
        return molt_err(MOLT_EDEVICE, "device_add: %s", err);
    return MOLT_OK;
#else
    return molt_err(MOLT_EDEVICE, "device_add: this build has no CUDA");
#endif
}
