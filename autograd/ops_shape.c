// autograd/ops_shape.c: builders and backward rules of the shape ops (cast, reshape,
// transpose, slice, split, concat, expand) and of the small neural-network ops (dropout,
// embedding, softmax, swiglu). Arithmetic kernels live in cpu/k_nn.c; this file only moves
// elements (any dtype, as bytes) and converts between float dtypes.
//
// Decisions callers rely on:
// - Gradients have their tensor's dtype (ag_grad_ensure). A BF16/F16 tensor that requires
//   grad, a leaf or the output of a cast, accumulates its gradient in BF16/F16, rounded at
//   every addition. This keeps f32 -> bf16 -> f32 chains differentiable; trainable
//   parameters should stay F32 masters and be cast where a lower precision is wanted.
// - Shape ops accept every dtype (I32 ids included) but an I32 tensor marked requires_grad
//   is refused: integers have no gradient.
// - ag_reshape's result shares the input's data (tensors are never written after creation).
// - ag_dropout draws exactly one ag_rng_next() per call, even for p == 0, and uses it as the
//   seed of a counter-based hash over element indices; the node saves the rng state from
//   before that draw and backward redraws the same seed, so no mask is ever stored.
//
// Devices: cast, reshape, dropout, embedding, softmax and swiglu run on any device through
// its backend table (backend.h; their CPU entries ag_cpu_* are here); transpose, slice,
// split, concat and expand walk host memory and run on the CPU only.
//
// Not here: the layout-free elementwise ops (ops_elem.c) and the big fused ops.
#include "backend.h"
#include "cpu/kernels.h"

#include <math.h>
#include <string.h>

#define FLOATS "f32, f64, bf16 and f16"

// ---- checks ----------------------------------------------------------------------------

static molt_status check_cpu(const char *op, const char *what, const ag_tensor *t) {
    MOLT_TRY(ag_check_not_null(op, what, t));
    if (t->device != AG_CPU)
        return molt_err(MOLT_EUNSUPPORTED, "%s: %s lives on a CUDA device; this op runs on "
                        "the CPU only", op, what);
    return MOLT_OK;
}

// Operand of an op that only moves elements: any dtype, on the CPU.
static molt_status check_movable(const char *op, const char *what, const ag_tensor *t) {
    MOLT_TRY(check_cpu(op, what, t));
    char b[80];
    if (t->dtype == AG_I32 && t->requires_grad)
        return molt_err(MOLT_EARG, "%s: %s is %s and requires grad; integer tensors are not "
                        "differentiable", op, what, ag_shape_str(t, b, sizeof b));
    return MOLT_OK;
}

static molt_status check_dim(const char *op, const ag_tensor *t, int dim) {
    if (dim >= 0 && dim < t->ndim)
        return MOLT_OK;
    char b[80];
    return molt_err(MOLT_EARG, "%s: dim %d is out of range for %s (expected 0..%d)", op, dim,
                    ag_shape_str(t, b, sizeof b), t->ndim - 1);
}

// Records a one-input node carrying two integer attributes; false on no memory.
static bool record1(ag_ctx *c, ag_op op, ag_tensor *y, ag_tensor *a, int64_t i0, int64_t i1) {
    if (!ag_should_record(c, 1, &a))
        return true;
    ag_node *n = ag_record(c, op, y, 1, &a);
    if (!n)
        return false;
    n->i[0] = i0;
    n->i[1] = i1;
    return true;
}

// ---- strided walks: every shape op is one -----------------------------------------------
// A walk visits the 4-dim index space `shape` (tensors padded with leading 1s) and pairs a
// destination element (the op's output side) with a source element (its input side).
// Forward copies src -> dst; backward adds the dst-side gradient into the src-side one.
typedef struct {
    int64_t shape[AG_MAX_DIMS];
    int64_t ds[AG_MAX_DIMS], ss[AG_MAX_DIMS]; // destination and source strides (elements)
    int64_t doff, soff;                       // element offsets of the first pair
} walk;

static int pos4(const ag_tensor *t, int dim) { return AG_MAX_DIMS - t->ndim + dim; }

static void shape4(const ag_tensor *t, int64_t sh[AG_MAX_DIMS]) {
    for (int k = 0; k < AG_MAX_DIMS; k++)
        sh[k] = k < AG_MAX_DIMS - t->ndim ? 1 : t->shape[k - (AG_MAX_DIMS - t->ndim)];
}

static void strides4(const ag_tensor *t, int64_t st[AG_MAX_DIMS]) {
    int64_t sh[AG_MAX_DIMS], s = 1;
    shape4(t, sh);
    for (int k = AG_MAX_DIMS - 1; k >= 0; k--) {
        st[k] = s;
        s *= sh[k];
    }
}

// Walk over `iter`'s shape with the contiguous strides of dst and src.
static void walk_init(walk *w, const ag_tensor *iter, const ag_tensor *dst, const ag_tensor *src) {
    memset(w, 0, sizeof *w);
    shape4(iter, w->shape);
    strides4(dst, w->ds);
    strides4(src, w->ss);
}

// n elements of es bytes at strides dst/sst. Constant-size memcpy is aliasing-safe and
// compiles to plain moves.
#define COPY_ELEMS(ES)                                                                   \
    for (int64_t j = 0; j < n; j++)                                                      \
        memcpy(d + (size_t)(j * dst) * (ES), s + (size_t)(j * sst) * (ES), (ES))
static void copy_elems(char *d, int64_t dst, const char *s, int64_t sst, int64_t n, size_t es) {
    if (es == 2)
        COPY_ELEMS(2);
    else if (es == 4)
        COPY_ELEMS(4);
    else
        COPY_ELEMS(8);
}
#undef COPY_ELEMS

static void walk_copy(const walk *w, ag_tensor *dst, const ag_tensor *src) {
    size_t es = ag_dtype_size(src->dtype);
    const int64_t *sh = w->shape, *ds = w->ds, *ss = w->ss;
    for (int64_t i0 = 0; i0 < sh[0]; i0++)
        for (int64_t i1 = 0; i1 < sh[1]; i1++)
            for (int64_t i2 = 0; i2 < sh[2]; i2++) {
                int64_t di = w->doff + i0 * ds[0] + i1 * ds[1] + i2 * ds[2];
                int64_t si = w->soff + i0 * ss[0] + i1 * ss[1] + i2 * ss[2];
                char *d = (char *)dst->data + (size_t)di * es;
                const char *s = (const char *)src->data + (size_t)si * es;
                if (ds[3] == 1 && ss[3] == 1)
                    memcpy(d, s, (size_t)sh[3] * es);
                else
                    copy_elems(d, ds[3], s, ss[3], sh[3], es);
            }
}

// g (source side) += dy (destination side) along the walk.
static void walk_acc(const walk *w, ag_tensor *g, const ag_tensor *dy) {
    if (g->dtype == AG_F32) {
        strided_acc_f32((float *)g->data + w->soff, w->ss,
                        (const float *)dy->data + w->doff, w->ds, w->shape);
    } else if (g->dtype == AG_F64) {
        strided_acc_f64((double *)g->data + w->soff, w->ss,
                        (const double *)dy->data + w->doff, w->ds, w->shape);
    } else { // bf16/f16: rounded at each addition, see the top of the file
        const int64_t *sh = w->shape;
        for (int64_t i0 = 0; i0 < sh[0]; i0++)
            for (int64_t i1 = 0; i1 < sh[1]; i1++)
                for (int64_t i2 = 0; i2 < sh[2]; i2++)
                    for (int64_t i3 = 0; i3 < sh[3]; i3++) {
                        int64_t gi = w->soff + i0 * w->ss[0] + i1 * w->ss[1] +
                                     i2 * w->ss[2] + i3 * w->ss[3];
                        int64_t di = w->doff + i0 * w->ds[0] + i1 * w->ds[1] +
                                     i2 * w->ds[2] + i3 * w->ds[3];
                        ag_set(g, gi, ag_get(g, gi) + ag_get(dy, di));
                    }
    }
}

// g += dy elementwise over the flat buffers; dtypes may differ (cast backward).
molt_status ag_cpu_acc_cast(ag_tensor *g, const ag_tensor *dy) {
    if (g->dtype == AG_F32 && dy->dtype == AG_F32) {
        acc_f32(g->data, dy->data, g->numel);
    } else if (g->dtype == AG_F64 && dy->dtype == AG_F64) {
        acc_f64(g->data, dy->data, g->numel);
    } else if (g->dtype == AG_F32 && dy->dtype == AG_F64) {
        float *gp = g->data;
        const double *d = dy->data;
        for (int64_t i = 0; i < g->numel; i++)
            gp[i] = (float)(gp[i] + d[i]);
    } else {
        for (int64_t i = 0; i < g->numel; i++)
            ag_set(g, i, ag_get(g, i) + ag_get(dy, i));
    }
    return MOLT_OK;
}

// Backward shared by the one-input walk ops: rebuild the forward walk, add along it.
static molt_status backward_walk(ag_node *n, const walk *w) {
    molt_status st = MOLT_OK;
    ag_tensor *g = ag_grad_of(n->in[0], &st);
    if (g)
        walk_acc(w, g, n->out->grad);
    return st;
}

// ---- cast ------------------------------------------------------------------------------

static bool is_float(ag_dtype dt) {
    return dt == AG_F32 || dt == AG_F64 || dt == AG_BF16 || dt == AG_F16;
}

// y = a converted to y's dtype (round to nearest even; f64 -> bf16/f16 rounds via f32).
molt_status ag_cpu_cast(ag_tensor *y, const ag_tensor *a) {
    if (y->dtype == a->dtype) {
        memcpy(y->data, a->data, (size_t)a->numel * ag_dtype_size(a->dtype));
    } else if (y->dtype == AG_F32 && a->dtype == AG_F64) {
        float *yp = y->data;
        const double *ap = a->data;
        for (int64_t i = 0; i < a->numel; i++)
            yp[i] = (float)ap[i];
    } else {
        for (int64_t i = 0; i < a->numel; i++)
            ag_set(y, i, ag_get(a, i));
    }
    return MOLT_OK;
}

// a converted to `to` (f32, f64, bf16, f16; i32 either way is refused). Backward adds dy,
// converted, into a's gradient, which has a's dtype.
ag_tensor *ag_cast(ag_ctx *c, ag_tensor *a, ag_dtype to) {
    char b[80];
    if (ag_check_not_null("cast", "a", a) != MOLT_OK)
        return NULL;
    if (!is_float(a->dtype)) {
        molt_err(MOLT_EARG, "cast: a is %s; cast converts between " FLOATS,
                 ag_shape_str(a, b, sizeof b));
        return NULL;
    }
    if ((unsigned)to >= AG_DTYPE_COUNT) {
        molt_err(MOLT_EARG, "cast: unknown target dtype %d", (int)to);
        return NULL;
    }
    if (!is_float(to)) {
        molt_err(MOLT_EARG, "cast: target dtype %s is not supported; cast converts between "
                 FLOATS, ag_dtype_name(to));
        return NULL;
    }
    const ag_backend *be = ag_backend_get("cast", a->device);
    if (!be)
        return NULL;
    ag_tensor *y = ag_out_new_on(c, a->device, to, a->ndim, a->shape);
    if (!y || AG_BE_CALL(be, cast, "cast", y, a) != MOLT_OK)
        return NULL;
    return record1(c, AG_OP_CAST, y, a, 0, 0) ? y : NULL;
}

molt_status ag_backward_cast(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *g = ag_grad_of(n->in[0], &st);
    if (g)
        st = AG_BE_CALL(ag_backend_node(n), acc_cast, "cast backward", g, n->out->grad);
    return st;
}

// ---- reshape ---------------------------------------------------------------------------

// Same elements in row-major order under a new shape with the same count; the result shares
// a's data (on a's device). No -1 wildcard: every dim is given.
ag_tensor *ag_reshape(ag_ctx *c, ag_tensor *a, int ndim, const int64_t *shape) {
    if (ag_check_not_null("reshape", "a", a) != MOLT_OK)
        return NULL;
    if (a->dtype == AG_I32 && a->requires_grad) {
        char b[80];
        molt_err(MOLT_EARG, "reshape: a is %s and requires grad; integer tensors are not "
                 "differentiable", ag_shape_str(a, b, sizeof b));
        return NULL;
    }
    if (!shape) {
        molt_err(MOLT_EARG, "reshape: shape is NULL");
        return NULL;
    }
    if (ndim < 1 || ndim > AG_MAX_DIMS) {
        molt_err(MOLT_EARG, "reshape: %d dims requested, expected 1..%d", ndim, AG_MAX_DIMS);
        return NULL;
    }
    int64_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 1 || shape[i] > a->numel) {
            molt_err(MOLT_EARG, "reshape: new dim %d has size %lld, expected 1..%lld", i,
                     (long long)shape[i], (long long)a->numel);
            return NULL;
        }
        // saturate just above a->numel instead of overflowing
        numel = numel <= a->numel / shape[i] ? numel * shape[i] : a->numel + 1;
    }
    if (numel != a->numel) {
        char ba[80], bs[80];
        size_t k = (size_t)snprintf(bs, sizeof bs, "[");
        for (int i = 0; i < ndim && k < sizeof bs; i++)
            k += (size_t)snprintf(bs + k, sizeof bs - k, i ? ", %lld" : "%lld",
                                  (long long)shape[i]);
        if (k < sizeof bs)
            snprintf(bs + k, sizeof bs - k, "]");
        molt_err(MOLT_EARG, "reshape: cannot view %s (%lld elements) as %s",
                 ag_shape_str(a, ba, sizeof ba), (long long)a->numel, bs);
        return NULL;
    }
    // a new header over the same data: tensors are never written after creation
    ag_arena *ar = ag_ctx_arena(c, a->device);
    ag_tensor *y = ar ? ag_arena_alloc_meta(ar, sizeof *y) : NULL;
    if (!y)
        return NULL;
    y->dtype = a->dtype;
    y->device = a->device;
    y->ndim = ndim;
    for (int i = 0; i < AG_MAX_DIMS; i++)
        y->shape[i] = i < ndim ? shape[i] : 1;
    y->numel = a->numel;
    y->data = a->data;
    y->arena = ar;
    return record1(c, AG_OP_RESHAPE, y, a, 0, 0) ? y : NULL;
}

molt_status ag_backward_reshape(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *g = ag_grad_of(n->in[0], &st);
    if (g)
        st = AG_BE_CALL(ag_backend_node(n), acc_cast, "reshape backward", g, n->out->grad);
    return st;
}

// ---- transpose -------------------------------------------------------------------------

static void transpose_walk(walk *w, const ag_tensor *a, const ag_tensor *y, int d0, int d1) {
    walk_init(w, y, y, a);
    int p0 = pos4(a, d0), p1 = pos4(a, d1);
    int64_t t = w->ss[p0];
    w->ss[p0] = w->ss[p1];
    w->ss[p1] = t;
}

// Copy of a with dims d0 and d1 swapped (d0 == d1 gives a plain copy).
ag_tensor *ag_transpose(ag_ctx *c, ag_tensor *a, int d0, int d1) {
    if (check_movable("transpose", "a", a) != MOLT_OK ||
        check_dim("transpose", a, d0) != MOLT_OK || check_dim("transpose", a, d1) != MOLT_OK)
        return NULL;
    int64_t shape[AG_MAX_DIMS];
    memcpy(shape, a->shape, sizeof shape);
    shape[d0] = a->shape[d1];
    shape[d1] = a->shape[d0];
    ag_tensor *y = ag_out_new(c, a->dtype, a->ndim, shape);
    if (!y)
        return NULL;
    walk w;
    transpose_walk(&w, a, y, d0, d1);
    walk_copy(&w, y, a);
    return record1(c, AG_OP_TRANSPOSE, y, a, d0, d1) ? y : NULL;
}

molt_status ag_backward_transpose(ag_ctx *c, ag_node *n) {
    (void)c;
    walk w;
    transpose_walk(&w, n->in[0], n->out, (int)n->i[0], (int)n->i[1]);
    return backward_walk(n, &w);
}

// ---- slice and split -------------------------------------------------------------------

static void slice_walk(walk *w, const ag_tensor *a, const ag_tensor *y, int dim, int64_t start) {
    walk_init(w, y, y, a);
    w->soff = start * w->ss[pos4(a, dim)];
}

// The slice itself, operands already checked.
static ag_tensor *slice_checked(ag_ctx *c, ag_tensor *a, int dim, int64_t start, int64_t len) {
    int64_t shape[AG_MAX_DIMS];
    memcpy(shape, a->shape, sizeof shape);
    shape[dim] = len;
    ag_tensor *y = ag_out_new(c, a->dtype, a->ndim, shape);
    if (!y)
        return NULL;
    walk w;
    slice_walk(&w, a, y, dim, start);
    walk_copy(&w, y, a);
    return record1(c, AG_OP_SLICE, y, a, dim, start) ? y : NULL;
}

// Copy of a[..., start:start+len, ...] along dim; the range must be non-empty and inside.
ag_tensor *ag_slice(ag_ctx *c, ag_tensor *a, int dim, int64_t start, int64_t len) {
    if (check_movable("slice", "a", a) != MOLT_OK || check_dim("slice", a, dim) != MOLT_OK)
        return NULL;
    int64_t size = a->shape[dim];
    if (start < 0 || len < 1 || start > size - len) {
        char b[80];
        molt_err(MOLT_EARG, "slice: range [%lld, %lld + %lld) is empty or outside dim %d "
                 "(size %lld) of %s", (long long)start, (long long)start, (long long)len,
                 dim, (long long)size, ag_shape_str(a, b, sizeof b));
        return NULL;
    }
    return slice_checked(c, a, dim, start, len);
}

molt_status ag_backward_slice(ag_ctx *c, ag_node *n) {
    (void)c;
    walk w;
    slice_walk(&w, n->in[0], n->out, (int)n->i[0], n->i[1]);
    return backward_walk(n, &w);
}

static molt_status check_split(ag_tensor *a, int dim, int n, const int64_t *sizes,
                               ag_tensor **outs) {
    MOLT_TRY(check_movable("split", "a", a));
    MOLT_TRY(check_dim("split", a, dim));
    if (n < 1)
        return molt_err(MOLT_EARG, "split: n = %d, expected >= 1", n);
    if (!sizes || !outs)
        return molt_err(MOLT_EARG, "split: sizes or outs is NULL");
    int64_t sum = 0;
    for (int i = 0; i < n; i++) {
        if (sizes[i] < 1 || sizes[i] > a->shape[dim])
            return molt_err(MOLT_EARG, "split: sizes[%d] = %lld, expected 1..%lld", i,
                            (long long)sizes[i], (long long)a->shape[dim]);
        sum += sizes[i]; // no overflow: n <= INT_MAX terms, each <= the dim size
    }
    char b[80];
    if (sum != a->shape[dim])
        return molt_err(MOLT_EARG, "split: sizes sum to %lld but dim %d of %s has size %lld",
                        (long long)sum, dim, ag_shape_str(a, b, sizeof b),
                        (long long)a->shape[dim]);
    return MOLT_OK;
}

// n consecutive slices (one node each). Everything is checked before the first slice; on
// failure every outs[i] is NULL (or untouched when the arguments were refused).
molt_status ag_split(ag_ctx *c, ag_tensor *a, int dim, int n, const int64_t *sizes,
                     ag_tensor **outs) {
    MOLT_TRY(check_split(a, dim, n, sizes, outs));
    int64_t start = 0;
    for (int i = 0; i < n; i++) {
        outs[i] = slice_checked(c, a, dim, start, sizes[i]);
        if (!outs[i]) {
            for (int j = 0; j < n; j++)
                outs[j] = NULL;
            return MOLT_ENOMEM; // the only way a checked slice fails
        }
        start += sizes[i];
    }
    return MOLT_OK;
}

// ---- concat ----------------------------------------------------------------------------

static molt_status check_concat(int n, ag_tensor *const *xs, int dim) {
    if (n < 1)
        return molt_err(MOLT_EARG, "concat: n = %d, expected >= 1", n);
    if (!xs)
        return molt_err(MOLT_EARG, "concat: xs is NULL");
    char w0[16] = "xs[0]", wi[16], b0[80], bi[80];
    MOLT_TRY(check_movable("concat", w0, xs[0]));
    MOLT_TRY(check_dim("concat", xs[0], dim));
    for (int i = 1; i < n; i++) {
        snprintf(wi, sizeof wi, "xs[%d]", i);
        MOLT_TRY(check_movable("concat", wi, xs[i]));
        MOLT_TRY(ag_check_same_dtype("concat", w0, xs[0], wi, xs[i]));
        bool same = xs[i]->ndim == xs[0]->ndim;
        for (int d = 0; same && d < xs[0]->ndim; d++)
            same = d == dim || xs[i]->shape[d] == xs[0]->shape[d];
        if (!same)
            return molt_err(MOLT_EARG, "concat: %s %s and %s %s differ outside dim %d", w0,
                            ag_shape_str(xs[0], b0, sizeof b0), wi,
                            ag_shape_str(xs[i], bi, sizeof bi), dim);
    }
    return MOLT_OK;
}

// Input i lands at `off` along dim of y.
static void concat_walk(walk *w, const ag_tensor *x, const ag_tensor *y, int dim, int64_t off) {
    walk_init(w, x, y, x);
    w->doff = off * w->ds[pos4(y, dim)];
}

// xs[0..n-1] joined along dim: same ndim and dtype, equal sizes in every other dim. One node
// with n inputs; inputs that do not require grad get none.
ag_tensor *ag_concat(ag_ctx *c, int n, ag_tensor *const *xs, int dim) {
    if (check_concat(n, xs, dim) != MOLT_OK)
        return NULL;
    int64_t shape[AG_MAX_DIMS];
    memcpy(shape, xs[0]->shape, sizeof shape);
    shape[dim] = 0;
    for (int i = 0; i < n; i++)
        shape[dim] += xs[i]->shape[dim];
    ag_tensor *y = ag_out_new(c, xs[0]->dtype, xs[0]->ndim, shape);
    if (!y)
        return NULL;
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        walk w;
        concat_walk(&w, xs[i], y, dim, off);
        walk_copy(&w, y, xs[i]);
        off += xs[i]->shape[dim];
    }
    if (ag_should_record(c, n, xs)) {
        ag_node *nd = ag_record(c, AG_OP_CONCAT, y, n, xs);
        if (!nd)
            return NULL;
        nd->i[0] = dim;
    }
    return y;
}

molt_status ag_backward_concat(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    int dim = (int)n->i[0];
    int64_t off = 0;
    for (int i = 0; i < n->n_in; i++) {
        ag_tensor *g = ag_grad_of(n->in[i], &st);
        if (st != MOLT_OK)
            return st;
        if (g) {
            walk w;
            concat_walk(&w, n->in[i], n->out, dim, off);
            walk_acc(&w, g, n->out->grad);
        }
        off += n->in[i]->shape[dim];
    }
    return MOLT_OK;
}

// ---- expand ----------------------------------------------------------------------------

// The source stride 0 along dim reads the single entry n times (and backward sums them).
static void expand_walk(walk *w, const ag_tensor *a, const ag_tensor *y, int dim) {
    walk_init(w, y, y, a);
    w->ss[pos4(a, dim)] = 0;
}

// a with its size-1 dim repeated n times (a copy); backward sums the n copies.
ag_tensor *ag_expand(ag_ctx *c, ag_tensor *a, int dim, int64_t n) {
    if (check_movable("expand", "a", a) != MOLT_OK || check_dim("expand", a, dim) != MOLT_OK)
        return NULL;
    char b[80];
    if (a->shape[dim] != 1) {
        molt_err(MOLT_EARG, "expand: dim %d of %s has size %lld, expected 1", dim,
                 ag_shape_str(a, b, sizeof b), (long long)a->shape[dim]);
        return NULL;
    }
    if (n < 1) {
        molt_err(MOLT_EARG, "expand: n = %lld, expected >= 1", (long long)n);
        return NULL;
    }
    int64_t shape[AG_MAX_DIMS];
    memcpy(shape, a->shape, sizeof shape);
    shape[dim] = n;
    ag_tensor *y = ag_out_new(c, a->dtype, a->ndim, shape);
    if (!y)
        return NULL;
    walk w;
    expand_walk(&w, a, y, dim);
    walk_copy(&w, y, a);
    return record1(c, AG_OP_EXPAND, y, a, dim, 0) ? y : NULL;
}

molt_status ag_backward_expand(ag_ctx *c, ag_node *n) {
    (void)c;
    walk w;
    expand_walk(&w, n->in[0], n->out, (int)n->i[0]);
    return backward_walk(n, &w);
}

// ---- dropout ---------------------------------------------------------------------------

// Inverted dropout, p in [0, 1). Applied whenever called, grad mode or not: inference
// passes p = 0, which returns an exact copy. Takes one draw from rng (see the top of the
// file); a failed call leaves rng as it was. Every device draws the same mask from the seed.
ag_tensor *ag_dropout(ag_ctx *c, ag_tensor *a, double p, ag_rng *rng) {
    if (ag_check_float("dropout", "a", a) != MOLT_OK)
        return NULL;
    if (!rng) {
        molt_err(MOLT_EARG, "dropout: rng is NULL");
        return NULL;
    }
    if (!(p >= 0 && p < 1)) { // also refuses NaN
        molt_err(MOLT_EARG, "dropout: p = %g is outside [0, 1)", p);
        return NULL;
    }
    const ag_backend *be = ag_backend_get("dropout", a->device);
    ag_tensor *y = be ? ag_out_new_on(c, a->device, a->dtype, a->ndim, a->shape) : NULL;
    if (!y)
        return NULL;
    ag_rng before = *rng;
    uint64_t seed = ag_rng_next(rng);
    // a rank holding rows row_offset.. of a batch draws the masks those rows have in the
    // whole batch (data parallelism: the same masks for any split)
    int64_t first = c->row_offset * (a->numel / a->shape[0]);
    if (AG_BE_CALL(be, dropout_fwd, "dropout", y, a, seed, p, first) != MOLT_OK) {
        *rng = before;
        return NULL;
    }
    if (!ag_should_record(c, 1, &a))
        return y;
    ag_node *n = ag_record(c, AG_OP_DROPOUT, y, 1, &a);
    ag_rng *saved = n ? ag_node_save(c, n, sizeof *saved) : NULL;
    if (!saved) {
        *rng = before; // a failed call leaves the caller's stream where it was
        return NULL;
    }
    *saved = before;
    n->f[0] = p;
    n->i[0] = first;
    return y;
}

molt_status ag_cpu_dropout_fwd(ag_tensor *y, const ag_tensor *a, uint64_t seed, double p,
                               int64_t first) {
    if (a->dtype == AG_F32) dropout_fwd_f32(y->data, a->data, seed, p, first, a->numel);
    else dropout_fwd_f64(y->data, a->data, seed, p, first, a->numel);
    return MOLT_OK;
}

molt_status ag_cpu_dropout_bwd(ag_tensor *dx, const ag_tensor *dy, uint64_t seed, double p,
                               int64_t first) {
    if (dx->dtype == AG_F32) dropout_bwd_f32(dx->data, dy->data, seed, p, first, dx->numel);
    else dropout_bwd_f64(dx->data, dy->data, seed, p, first, dx->numel);
    return MOLT_OK;
}

molt_status ag_backward_dropout(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *g = ag_grad_of(n->in[0], &st), *dy = n->out->grad;
    if (!g)
        return st;
    ag_rng r = *(const ag_rng *)n->saved;
    uint64_t seed = ag_rng_next(&r); // the same draw the forward made
    return AG_BE_CALL(ag_backend_node(n), dropout_bwd, "dropout backward", g, dy, seed, n->f[0],
                      n->i[0]);
}

// ---- embedding -------------------------------------------------------------------------

static molt_status check_embedding(ag_tensor *table, ag_tensor *ids, const ag_backend **be) {
    static const char *const names[2] = {"table", "ids"};
    MOLT_TRY(ag_check_float("embedding", "table", table));
    MOLT_TRY(ag_check_ndim("embedding", "table", table, 2, 2));
    MOLT_TRY(ag_check_int32("embedding", "ids", ids));
    MOLT_TRY(ag_check_ndim("embedding", "ids", ids, 1, AG_MAX_DIMS - 1));
    ag_tensor *ts[2] = {table, ids};
    MOLT_TRY(ag_backend_pick("embedding", 2, ts, names, be));
    const void *idv;
    void *copy;
    MOLT_TRY(ag_host_view("embedding", ids, &idv, &copy));
    const int32_t *id = idv;
    int64_t v = table->shape[0];
    molt_status st = MOLT_OK;
    for (int64_t t = 0; t < ids->numel && st == MOLT_OK; t++) {
        if (id[t] < 0 || id[t] >= v) {
            char bt[80], bi[80];
            st = molt_err(MOLT_EARG, "embedding: id %d at position %lld of ids %s is out "
                          "of range for table %s (valid ids 0..%lld)", (int)id[t],
                          (long long)t, ag_shape_str(ids, bi, sizeof bi),
                          ag_shape_str(table, bt, sizeof bt), (long long)(v - 1));
        }
    }
    molt_free(copy);
    return st;
}

molt_status ag_cpu_embedding_fwd(ag_tensor *y, const ag_tensor *table, const ag_tensor *ids) {
    bool ref = ag_reference_kernels();
    int64_t ch = table->shape[1];
    if (table->dtype == AG_F32)
        (ref ? embedding_fwd_ref_f32 : embedding_fwd_f32)(y->data, table->data, ids->data,
                                                          ids->numel, ch);
    else
        (ref ? embedding_fwd_ref_f64 : embedding_fwd_f64)(y->data, table->data, ids->data,
                                                          ids->numel, ch);
    return MOLT_OK;
}

molt_status ag_cpu_embedding_bwd(ag_tensor *dtable, const ag_tensor *dy, const ag_tensor *ids) {
    bool ref = ag_reference_kernels();
    int64_t ch = dtable->shape[1];
    if (dtable->dtype == AG_F32)
        (ref ? embedding_bwd_ref_f32 : embedding_bwd_f32)(dtable->data, dy->data, ids->data,
                                                          ids->numel, ch);
    else
        (ref ? embedding_bwd_ref_f64 : embedding_bwd_f64)(dtable->data, dy->data, ids->data,
                                                          ids->numel, ch);
    return MOLT_OK;
}

// Rows of table [V, C] picked by ids (I32, 1..3 dims) -> ids.shape + [C]. Every id is
// checked first (ids on a device are read back for that). Only the table can receive a
// gradient (scatter-added, repeats sum).
ag_tensor *ag_embedding(ag_ctx *c, ag_tensor *table, ag_tensor *ids) {
    const ag_backend *be;
    if (check_embedding(table, ids, &be) != MOLT_OK)
        return NULL;
    int64_t shape[AG_MAX_DIMS], ch = table->shape[1];
    memcpy(shape, ids->shape, sizeof shape);
    shape[ids->ndim] = ch;
    ag_tensor *y = ag_out_new_on(c, table->device, table->dtype, ids->ndim + 1, shape);
    if (!y || AG_BE_CALL(be, embedding_fwd, "embedding", y, table, ids) != MOLT_OK)
        return NULL;
    // ids ride along for backward but never decide whether to record
    ag_tensor *ins[2] = {table, ids};
    if (ag_should_record(c, 1, ins) && !ag_record(c, AG_OP_EMBEDDING, y, 2, ins))
        return NULL;
    return y;
}

molt_status ag_backward_embedding(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *g = ag_grad_of(n->in[0], &st), *ids = n->in[1], *dy = n->out->grad;
    if (!g)
        return st;
    return AG_BE_CALL(ag_backend_node(n), embedding_bwd, "embedding backward", g, dy, ids);
}

// ---- softmax ---------------------------------------------------------------------------

molt_status ag_cpu_softmax_fwd(ag_tensor *y, const ag_tensor *x) {
    bool ref = ag_reference_kernels();
    int64_t rows = ag_rows(x), cols = ag_cols(x);
    if (x->dtype == AG_F32)
        (ref ? softmax_fwd_ref_f32 : softmax_fwd_f32)(y->data, x->data, rows, cols);
    else
        (ref ? softmax_fwd_ref_f64 : softmax_fwd_f64)(y->data, x->data, rows, cols);
    return MOLT_OK;
}

molt_status ag_cpu_softmax_bwd(ag_tensor *dx, const ag_tensor *y, const ag_tensor *dy) {
    bool ref = ag_reference_kernels();
    int64_t rows = ag_rows(y), cols = ag_cols(y);
    if (dx->dtype == AG_F32)
        (ref ? softmax_bwd_ref_f32 : softmax_bwd_f32)(dx->data, y->data, dy->data, rows, cols);
    else
        (ref ? softmax_bwd_ref_f64 : softmax_bwd_f64)(dx->data, y->data, dy->data, rows, cols);
    return MOLT_OK;
}

double ag_vexp_sum(float *z, int64_t n, float sub) { return vexp_sum_f32(z, n, sub); }

// Softmax over the last dim, max-subtracted so large inputs do not overflow.
ag_tensor *ag_softmax(ag_ctx *c, ag_tensor *x) {
    if (ag_check_float("softmax", "x", x) != MOLT_OK)
        return NULL;
    const ag_backend *be = ag_backend_get("softmax", x->device);
    ag_tensor *y = be ? ag_out_new_on(c, x->device, x->dtype, x->ndim, x->shape) : NULL;
    if (!y || AG_BE_CALL(be, softmax_fwd, "softmax", y, x) != MOLT_OK)
        return NULL;
    return record1(c, AG_OP_SOFTMAX, y, x, 0, 0) ? y : NULL;
}

// Needs only the output, which lives in the activation arena until the step ends.
molt_status ag_backward_softmax(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *g = ag_grad_of(n->in[0], &st), *y = n->out, *dy = n->out->grad;
    if (!g)
        return st;
    return AG_BE_CALL(ag_backend_node(n), softmax_bwd, "softmax backward", g, y, dy);
}

// ---- swiglu ----------------------------------------------------------------------------

molt_status ag_cpu_swiglu_fwd(ag_tensor *y, const ag_tensor *g, const ag_tensor *u) {
    bool ref = ag_reference_kernels();
    if (g->dtype == AG_F32)
        (ref ? swiglu_fwd_ref_f32 : swiglu_fwd_f32)(y->data, g->data, u->data, y->numel);
    else
        (ref ? swiglu_fwd_ref_f64 : swiglu_fwd_f64)(y->data, g->data, u->data, y->numel);
    return MOLT_OK;
}

molt_status ag_cpu_swiglu_bwd(ag_tensor *dg, ag_tensor *du, const ag_tensor *g,
                              const ag_tensor *u, const ag_tensor *dy) {
    bool ref = ag_reference_kernels();
    if (g->dtype == AG_F32)
        (ref ? swiglu_bwd_ref_f32 : swiglu_bwd_f32)(dg ? dg->data : NULL, du ? du->data : NULL,
                                                    g->data, u->data, dy->data, g->numel);
    else
        (ref ? swiglu_bwd_ref_f64 : swiglu_bwd_f64)(dg ? dg->data : NULL, du ? du->data : NULL,
                                                    g->data, u->data, dy->data, g->numel);
    return MOLT_OK;
}

// silu(gate) * up elementwise (same shape and dtype); gradients reach both.
ag_tensor *ag_swiglu(ag_ctx *c, ag_tensor *gate, ag_tensor *up) {
    static const char *const names[2] = {"gate", "up"};
    const ag_backend *be;
    ag_tensor *ins[2] = {gate, up};
    if (ag_check_float("swiglu", "gate", gate) != MOLT_OK ||
        ag_check_float("swiglu", "up", up) != MOLT_OK ||
        ag_backend_pick("swiglu", 2, ins, names, &be) != MOLT_OK ||
        ag_check_same_dtype("swiglu", "gate", gate, "up", up) != MOLT_OK)
        return NULL;
    if (!ag_same_shape(gate, up)) {
        char bg[80], bu[80];
        molt_err(MOLT_EARG, "swiglu: shapes differ: gate %s, up %s",
                 ag_shape_str(gate, bg, sizeof bg), ag_shape_str(up, bu, sizeof bu));
        return NULL;
    }
    ag_tensor *y = ag_out_new_on(c, gate->device, gate->dtype, gate->ndim, gate->shape);
    if (!y || AG_BE_CALL(be, swiglu_fwd, "swiglu", y, gate, up) != MOLT_OK)
        return NULL;
    if (ag_should_record(c, 2, ins) && !ag_record(c, AG_OP_SWIGLU, y, 2, ins))
        return NULL;
    return y;
}

molt_status ag_backward_swiglu(ag_ctx *c, ag_node *n) {
    (void)c;
    molt_status st = MOLT_OK;
    ag_tensor *dg = ag_grad_of(n->in[0], &st);
    ag_tensor *du = st == MOLT_OK ? ag_grad_of(n->in[1], &st) : NULL;
    if (st != MOLT_OK)
        return st;
    return AG_BE_CALL(ag_backend_node(n), swiglu_bwd, "swiglu backward", dg, du, n->in[0],
                      n->in[1], n->out->grad);
}
