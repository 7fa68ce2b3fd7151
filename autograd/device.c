// autograd/device.c: device discovery and the explicit moves between devices (tensor
// copies in and out of arenas), all through the backend tables' memory functions. Without
// CUDA in the build every CUDA request is a clear MOLT_EDEVICE error; nothing here aborts
// when no GPU is visible.
#include "backend.h"

#include <string.h>

#ifdef MOLT_HAVE_CUDA
#include "cuda/cuda_backend.h"
#endif

void ag_device_query(ag_device_info *info) {
    memset(info, 0, sizeof *info);
#ifdef MOLT_HAVE_CUDA
    info->cuda_compiled = 1;
    int n = 0;
    if (molt_cuda_device_count(&n) == 0)
        info->cuda_devices = n;
    else
        snprintf(info->cuda_error, sizeof info->cuda_error, "%s", molt_cuda_error());
#else
    snprintf(info->cuda_error, sizeof info->cuda_error, "built without CUDA");
#endif
}

molt_status ag_cuda_describe(int i, char *buf, size_t cap) {
#ifdef MOLT_HAVE_CUDA
    char name[256];
    int major = 0, minor = 0;
    size_t mem = 0;
    if (molt_cuda_device_props(i, name, sizeof name, &major, &minor, &mem))
        return molt_err(MOLT_EDEVICE, "cuda device %d: %s", i, molt_cuda_error());
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

// The real GPU must be visible before CUDA memory is touched (a stand-in table in tests
// needs none).
static molt_status device_ready(const char *op, ag_device dev) {
    const ag_backend *be = ag_backend_get(op, dev);
    if (!be)
        return MOLT_EDEVICE;
#ifdef MOLT_HAVE_CUDA
    if (dev == AG_CUDA && be == ag_backend_cuda_table()) {
        ag_device_info info;
        ag_device_query(&info);
        if (info.cuda_devices < 1)
            return molt_err(MOLT_EDEVICE, "%s: no CUDA device visible (%s)", op,
                            info.cuda_error[0] ? info.cuda_error : "0 devices");
    }
#endif
    return MOLT_OK;
}

// dst (on ddev) = src (on sdev), bytes of them; at least one side is the CPU or both are on
// the same device.
static molt_status copy_bytes(const char *op, void *dst, ag_device ddev, const void *src,
                              ag_device sdev, size_t bytes) {
    if (ddev == AG_CPU && sdev == AG_CPU) {
        memcpy(dst, src, bytes);
        return MOLT_OK;
    }
    if (ddev != AG_CPU && sdev != AG_CPU && ddev != sdev)
        return molt_err(MOLT_EUNSUPPORTED, "%s: copies between two accelerators go through the "
                        "host", op);
    const ag_backend *be = ag_backend_get(op, ddev != AG_CPU ? ddev : sdev);
    if (!be)
        return MOLT_EDEVICE;
    molt_status st = ddev == AG_CPU   ? be->to_host(dst, src, bytes)
                     : sdev == AG_CPU ? be->from_host(dst, src, bytes)
                                      : be->copy(dst, src, bytes);
    return st == MOLT_OK ? MOLT_OK : molt_err_wrap(st, "%s", op);
}

ag_tensor *ag_to_device(ag_tensor *t, ag_device dev) {
    if (!t) {
        molt_err(MOLT_EARG, "to_device: tensor is NULL");
        return NULL;
    }
    if ((unsigned)dev >= AG_DEVICE_COUNT) {
        molt_err(MOLT_EARG, "to_device: unknown device %d", (int)dev);
        return NULL;
    }
    if (device_ready("to_device", dev) != MOLT_OK || device_ready("to_device", t->device))
        return NULL;
    const ag_backend *be = ag_backend_get("to_device", dev);
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
    o->data = NULL;
    if (be->mem_alloc(&o->data, bytes) != MOLT_OK ||
        copy_bytes("to_device", o->data, dev, t->data, t->device, bytes) != MOLT_OK) {
        molt_status st = MOLT_EDEVICE;
        char msg[256];
        snprintf(msg, sizeof msg, "%s", molt_err_msg());
        ag_device_tensor_free(o);
        molt_err(st, "%s", msg);
        return NULL;
    }
    return o;
}

void ag_device_tensor_free(ag_tensor *t) {
    if (!t)
        return;
    const ag_backend *be = ag_backend_get("device_tensor_free", t->device);
    if (be && t->data)
        be->mem_free(t->data);
    molt_free(t);
}

ag_tensor *ag_tensor_to(ag_arena *a, const ag_tensor *t) {
    if (!a || !t) {
        molt_err(MOLT_EARG, "tensor_to: %s is NULL", a ? "tensor" : "arena");
        return NULL;
    }
    if (device_ready("tensor_to", a->device) != MOLT_OK ||
        device_ready("tensor_to", t->device) != MOLT_OK)
        return NULL;
    ag_tensor *o = ag_tensor_new(a, t->dtype, t->ndim, t->shape);
    if (!o)
        return NULL;
    memcpy(o->name, t->name, sizeof o->name);
    if (ag_tensor_copy(o, t) != MOLT_OK)
        return NULL;
    return o;
}

molt_status ag_tensor_copy(ag_tensor *dst, const ag_tensor *src) {
    if (!dst || !src)
        return molt_err(MOLT_EARG, "tensor_copy: %s is NULL", dst ? "src" : "dst");
    if (dst->dtype != src->dtype || !ag_same_shape(dst, src)) {
        char bd[80], bs[80];
        return molt_err(MOLT_EARG, "tensor_copy: dst %s and src %s differ",
                        ag_shape_str(dst, bd, sizeof bd), ag_shape_str(src, bs, sizeof bs));
    }
    return copy_bytes("tensor_copy", dst->data, dst->device, src->data, src->device,
                      (size_t)src->numel * ag_dtype_size(src->dtype));
}

molt_status ag_device_sync(ag_device dev) {
    if (dev == AG_CPU)
        return MOLT_OK;
#ifdef MOLT_HAVE_CUDA
    if (dev == AG_CUDA && ag_backend_get("sync", dev) == ag_backend_cuda_table()) {
        if (molt_cuda_sync())
            return molt_err(MOLT_EDEVICE, "sync: %s", molt_cuda_error());
        return MOLT_OK;
    }
#endif
    return ag_backend_get("sync", dev) ? MOLT_OK : MOLT_EDEVICE;
}

molt_status ag_device_add(ag_tensor *y, const ag_tensor *a, const ag_tensor *b) {
    if (!y || !a || !b)
        return molt_err(MOLT_EARG, "device_add: NULL tensor");
    if (!ag_same_shape(a, b) || !ag_same_shape(a, y))
        return molt_err(MOLT_EARG, "device_add: shapes differ");
    if (a->dtype != AG_F32 || b->dtype != AG_F32 || y->dtype != AG_F32)
        return molt_err(MOLT_EARG, "device_add: expected f32 tensors");
    ag_tensor *ts[3] = {y, (ag_tensor *)a, (ag_tensor *)b};
    static const char *const names[3] = {"y", "a", "b"};
    const ag_backend *be = ag_backend_of("device_add", 3, ts, names);
    if (!be)
        return MOLT_EARG;
    return be->add(y, a, b);
}
