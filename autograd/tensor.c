// autograd/tensor.c: tensor creation, element access, bf16 conversion, shape strings.
// Tensors of a device arena get their data on that device (their struct stays on the
// host); element access to them goes through the device's backend, one element at a time.
#include "backend.h"

#include <math.h>
#include <string.h>

static const char *const dtype_names[] = {"f32", "f64", "bf16", "f16", "i32"};
static const size_t dtype_sizes[] = {4, 8, 2, 2, 4};
_Static_assert(sizeof(dtype_names) / sizeof(dtype_names[0]) == AG_DTYPE_COUNT,
               "dtype_names must cover ag_dtype");
_Static_assert(sizeof(dtype_sizes) / sizeof(dtype_sizes[0]) == AG_DTYPE_COUNT,
               "dtype_sizes must cover ag_dtype");

const char *ag_dtype_name(ag_dtype dt) {
    return (unsigned)dt < AG_DTYPE_COUNT ? dtype_names[dt] : "?";
}
size_t ag_dtype_size(ag_dtype dt) { return (unsigned)dt < AG_DTYPE_COUNT ? dtype_sizes[dt] : 0; }

static ag_tensor *tensor_new(ag_arena *a, ag_dtype dt, int ndim, const int64_t *shape,
                             bool zero) {
    if ((unsigned)dt >= AG_DTYPE_COUNT) {
        molt_err(MOLT_EARG, "tensor: unknown dtype %d", (int)dt);
        return NULL;
    }
    if (ndim < 1 || ndim > AG_MAX_DIMS) {
        molt_err(MOLT_EARG, "tensor: %d dims requested, expected 1..%d", ndim, AG_MAX_DIMS);
        return NULL;
    }
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 1) {
            molt_err(MOLT_EARG, "tensor: dim %d has size %lld, expected >= 1", i,
                     (long long)shape[i]);
            return NULL;
        }
        if (numel > INT64_MAX / shape[i] / 8) {
            molt_err(MOLT_EARG, "tensor: shape too large");
            return NULL;
        }
        numel *= shape[i];
    }
    ag_tensor *t = ag_arena_alloc_meta(a, sizeof *t);
    if (!t)
        return NULL;
    size_t bytes = (size_t)numel * dtype_sizes[dt];
    t->data = zero ? ag_arena_alloc(a, bytes) : ag_arena_alloc_uninit(a, bytes);
    if (!t->data)
        return NULL;
    t->dtype = dt;
    t->device = a->device;
    t->ndim = ndim;
    for (int i = 0; i < AG_MAX_DIMS; i++)
        t->shape[i] = i < ndim ? shape[i] : 1;
    t->numel = numel;
    t->arena = a;
    return t;
}

ag_tensor *ag_tensor_new(ag_arena *a, ag_dtype dt, int ndim, const int64_t *shape) {
    return tensor_new(a, dt, ndim, shape, true);
}

ag_tensor *ag_tensor_new_uninit(ag_arena *a, ag_dtype dt, int ndim, const int64_t *shape) {
    return tensor_new(a, dt, ndim, shape, false);
}

ag_tensor *ag_tensor_new2(ag_arena *a, ag_dtype dt, int64_t d0, int64_t d1) {
    int64_t s[2] = {d0, d1};
    return ag_tensor_new(a, dt, 2, s);
}

ag_tensor *ag_tensor_new1(ag_arena *a, ag_dtype dt, int64_t d0) {
    return ag_tensor_new(a, dt, 1, &d0);
}

void ag_tensor_set_name(ag_tensor *t, const char *name) {
    snprintf(t->name, sizeof t->name, "%s", name);
}

const char *ag_shape_str(const ag_tensor *t, char *buf, size_t cap) {
    if (!t) {
        snprintf(buf, cap, "(null)");
        return buf;
    }
    size_t n = 0;
    n += (size_t)snprintf(buf + n, cap - n, "[");
    for (int i = 0; i < t->ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (n < cap)
        snprintf(buf + n, cap - n, "] %s", ag_dtype_name(t->dtype));
    return buf;
}

bool ag_same_shape(const ag_tensor *a, const ag_tensor *b) {
    if (a->ndim != b->ndim)
        return false;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i])
            return false;
    return true;
}

uint16_t ag_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) // NaN: keep it a quiet NaN
        return (uint16_t)((u >> 16) | 0x40);
    uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)((u + rounding) >> 16);
}

float ag_bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// IEEE half <-> float, enough for loading F16 checkpoints (subnormals handled).
static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    uint32_t u = exp == 31 ? (sign | 0x7f800000u | (man << 13))
                           : (sign | ((exp + 112) << 23) | (man << 13));
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    float a = fabsf(f);
    if (isnan(f))
        return sign | 0x7e00;
    if (a >= 65520.0f)
        return sign | 0x7c00;
    if (a < 6.103515625e-05f) // subnormal half: round to a multiple of 2^-24
        return sign | (uint16_t)lrintf(a * 16777216.0f);
    int e;
    float m = frexpf(a, &e);                    // a = m 2^e, m in [0.5, 1)
    long mant = lrintf(m * 2048.0f);            // 11 significant bits, ties to even
    if (mant == 2048) {
        mant = 1024;
        e++;
    }
    return sign | (uint16_t)(((e + 14) << 10) | (mant - 1024));
}

static double get_host(const void *data, ag_dtype dt, int64_t i) {
    switch (dt) {
    case AG_F32: return ((const float *)data)[i];
    case AG_F64: return ((const double *)data)[i];
    case AG_BF16: return ag_bf16_to_f32(((const uint16_t *)data)[i]);
    case AG_F16: return f16_to_f32(((const uint16_t *)data)[i]);
    case AG_I32: return ((const int32_t *)data)[i];
    default: return NAN;
    }
}

static void set_host(void *data, ag_dtype dt, int64_t i, double v) {
    switch (dt) {
    case AG_F32: ((float *)data)[i] = (float)v; break;
    case AG_F64: ((double *)data)[i] = v; break;
    case AG_BF16: ((uint16_t *)data)[i] = ag_f32_to_bf16((float)v); break;
    case AG_F16: ((uint16_t *)data)[i] = f32_to_f16((float)v); break;
    case AG_I32: ((int32_t *)data)[i] = (int32_t)v; break;
    default: break;
    }
}

// A device element goes through the backend; a failed copy reads as NaN (for ag_get) or
// leaves the element (ag_set), with the error message set.
double ag_get(const ag_tensor *t, int64_t i) {
    if (t->device == AG_CPU)
        return get_host(t->data, t->dtype, i);
    const ag_backend *be = ag_backend_get("get", t->device);
    size_t es = dtype_sizes[t->dtype];
    unsigned char buf[8];
    if (!be || be->to_host(buf, (const unsigned char *)t->data + (size_t)i * es, es) != MOLT_OK)
        return NAN;
    return get_host(buf, t->dtype, 0);
}

void ag_set(ag_tensor *t, int64_t i, double v) {
    if (t->device == AG_CPU) {
        set_host(t->data, t->dtype, i, v);
        return;
    }
    const ag_backend *be = ag_backend_get("set", t->device);
    size_t es = dtype_sizes[t->dtype];
    unsigned char buf[8];
    set_host(buf, t->dtype, 0, v);
    if (be)
        be->from_host((unsigned char *)t->data + (size_t)i * es, buf, es);
}

ag_tensor *ag_grad_ensure(ag_tensor *t) {
    if (t->grad)
        return t->grad;
    if (!t->arena) {
        char b[80];
        molt_err(MOLT_EARG, "gradient of %s: the tensor has no arena (made by ag_to_device?); "
                 "copy it into one with ag_tensor_to", ag_shape_str(t, b, sizeof b));
        return NULL;
    }
    t->grad = ag_tensor_new(t->arena, t->dtype, t->ndim, t->shape);
    return t->grad;
}

void ag_grad_zero(ag_tensor *t) {
    if (!t->grad)
        return;
    size_t bytes = (size_t)t->grad->numel * ag_dtype_size(t->grad->dtype);
    if (t->grad->device == AG_CPU) {
        memset(t->grad->data, 0, bytes);
        return;
    }
    const ag_backend *be = ag_backend_get("grad_zero", t->grad->device);
    if (be)
        be->mem_zero(t->grad->data, bytes);
}
