// autograd/ops_ep.c: expert parallelism's two ops and the routing they share. Each rank of a
// communicator owns a contiguous block of E / size routed experts. After the router, every
// routing slot (token t, choice j) becomes one row sent to the owner of expert idx[t, j]
// (ag_ep_dispatch: one all-to-all); the owner runs its experts on the rows it received,
// unweighted, and ag_ep_combine sends the results back (the second all-to-all) and adds them
// up per token with the routing weights. Backward mirrors both: the gradients of the
// received rows go back to their tokens, the gradients of the experts' outputs go to the
// owners, and the routing weights get theirs where the tokens live.
//
// Both ops are collectives: every rank must build, and differentiate, the same sequence of
// them. So they are recorded by the same rule on every rank (their inputs require grad
// alike), their outputs always get a gradient buffer (a rank whose rows no loss depends on
// still takes part in backward's all-to-all), and a rank that receives no rows (or has no
// tokens) works with one-row placeholders that nothing reads.
//
// The route (ag_ep_route) is built once per layer call with two small all-to-alls (the row
// counts, then each row's expert and tag) and lives in the context's activation arena, so it
// outlives the tape. Not here: the collectives themselves (comm/), the experts (ops_moe*.c).
#include "internal.h"
#include "comm/comm.h"
#include "cpu/kernels.h"

#include <string.h>

#define ROUTE "ep_route"
#define DISPATCH "ep_dispatch"
#define COMBINE "ep_combine"

struct ag_ep_route {
    ag_comm *comm;
    int P, me;
    int64_t T, k, E, n_local;
    int64_t *send_rows, *recv_rows; // [P] rows to and from each rank
    int32_t *pos;                   // [T*k] row of slot (t, j) in the send buffer
    int64_t S, R;                   // rows sent (T*k), rows received
    ag_tensor *local_idx;           // I32 [R, 1] expert among this rank's (NULL when R = 0)
    ag_tensor *tags;                // I32 [R] the tokens' tags (NULL when R = 0)
};

int64_t ag_ep_route_rows(const ag_ep_route *r) { return r ? r->R : 0; }
ag_tensor *ag_ep_route_local_idx(const ag_ep_route *r) { return r ? r->local_idx : NULL; }
ag_tensor *ag_ep_route_tags(const ag_ep_route *r) { return r ? r->tags : NULL; }

static void *arena_array(ag_ctx *c, int64_t n, size_t size) {
    return ag_arena_alloc(&c->act, (size_t)(n > 0 ? n : 1) * size);
}

static molt_status route_check(ag_comm *comm, ag_tensor *idx, ag_tensor *tag, int64_t E) {
    if (!comm)
        return molt_err(MOLT_EARG, ROUTE ": communicator is NULL");
    int P = ag_comm_size(comm);
    if (E < 1 || E % P != 0)
        return molt_err(MOLT_EARG, ROUTE ": %lld experts do not split evenly over %d ranks",
                        (long long)E, P);
    if (!idx)
        return tag ? molt_err(MOLT_EARG, ROUTE ": tags without idx") : MOLT_OK;
    MOLT_TRY(ag_check_i32(ROUTE, "idx", idx));
    MOLT_TRY(ag_check_ndim(ROUTE, "idx", idx, 2, 2));
    MOLT_TRY(ag_check_expert_idx(ROUTE, idx, E));
    if (tag) {
        MOLT_TRY(ag_check_i32(ROUTE, "tag", tag));
        if (tag->numel != idx->shape[0]) {
            char b[80], bi[80];
            return molt_err(MOLT_EARG, ROUTE ": tag is %s, expected [%lld] for idx %s",
                            ag_shape_str(tag, b, sizeof b), (long long)idx->shape[0],
                            ag_shape_str(idx, bi, sizeof bi));
        }
    }
    return MOLT_OK;
}

// Each sent row's (expert among its owner's, tag) travels to the owner.
static molt_status route_meta(ag_ctx *c, ag_ep_route *r, const int32_t *id, const int32_t *tg) {
    int32_t *send = molt_malloc((size_t)(2 * (r->S > 0 ? r->S : 1)) * sizeof *send);
    int32_t *recv = molt_malloc((size_t)(2 * (r->R > 0 ? r->R : 1)) * sizeof *recv);
    molt_status st = MOLT_OK;
    if (!send || !recv)
        st = molt_err(MOLT_ENOMEM, ROUTE ": out of memory for %lld rows",
                      (long long)(r->S + r->R));
    for (int64_t s = 0; st == MOLT_OK && s < r->S; s++) {
        int64_t p = r->pos[s];
        send[2 * p] = (int32_t)(id[s] % r->n_local);
        send[2 * p + 1] = tg ? tg[s / r->k] : -1;
    }
    if (st == MOLT_OK)
        st = ag_comm_alltoallv(r->comm, send, r->send_rows, recv, r->recv_rows, 2, AG_I32);
    if (st == MOLT_OK && r->R > 0) {
        r->local_idx = ag_tensor_new2(&c->act, AG_I32, r->R, 1);
        r->tags = ag_tensor_new1(&c->act, AG_I32, r->R);
        if (!r->local_idx || !r->tags)
            st = molt_err_wrap(MOLT_ENOMEM, ROUTE);
        for (int64_t i = 0; st == MOLT_OK && i < r->R; i++) {
            ((int32_t *)r->local_idx->data)[i] = recv[2 * i];
            ((int32_t *)r->tags->data)[i] = recv[2 * i + 1];
        }
    }
    molt_free(send);
    molt_free(recv);
    return st;
}

ag_ep_route *ag_ep_route_new(ag_ctx *c, ag_comm *comm, ag_tensor *idx, ag_tensor *tag,
                             int64_t n_experts) {
    if (route_check(comm, idx, tag, n_experts) != MOLT_OK)
        return NULL;
    ag_ep_route *r = ag_arena_alloc(&c->act, sizeof *r);
    if (!r)
        return NULL;
    r->comm = comm;
    r->P = ag_comm_size(comm);
    r->me = ag_comm_rank(comm);
    r->T = idx ? idx->shape[0] : 0;
    r->k = idx ? idx->shape[1] : 1;
    r->E = n_experts;
    r->n_local = n_experts / r->P;
    r->S = r->T * r->k;
    r->send_rows = arena_array(c, r->P, sizeof *r->send_rows);
    r->recv_rows = arena_array(c, r->P, sizeof *r->recv_rows);
    r->pos = arena_array(c, r->S, sizeof *r->pos);
    int64_t *off = molt_calloc((size_t)r->P + 1, sizeof *off);
    if (!r->send_rows || !r->recv_rows || !r->pos || !off) {
        molt_free(off);
        molt_err(MOLT_ENOMEM, ROUTE ": out of memory for %lld slots", (long long)r->S);
        return NULL;
    }
    const int32_t *id = idx ? idx->data : NULL;
    for (int64_t s = 0; s < r->S; s++)
        r->send_rows[id[s] / r->n_local]++;
    for (int p = 0; p < r->P; p++)
        off[p + 1] = off[p] + r->send_rows[p];
    for (int64_t s = 0; s < r->S; s++) // slots in (t, j) order within each destination
        r->pos[s] = (int32_t)off[id[s] / r->n_local]++;
    molt_free(off);
    if (ag_comm_alltoall_counts(comm, r->send_rows, r->recv_rows) != MOLT_OK)
        return NULL;
    r->R = 0;
    for (int p = 0; p < r->P; p++)
        r->R += r->recv_rows[p];
    if (route_meta(c, r, id, tag ? tag->data : NULL) != MOLT_OK)
        return NULL;
    return r;
}

// ---- dispatch ------------------------------------------------------------------------------

static molt_status check_rows(const char *op, const char *what, const ag_tensor *t, int64_t rows,
                              int64_t H) {
    MOLT_TRY(ag_check_cpu_float(op, what, t));
    MOLT_TRY(ag_check_ndim(op, what, t, 2, 2));
    if (rows > 0 && (t->shape[0] != rows || (H > 0 && t->shape[1] != H))) {
        char b[80];
        return molt_err(MOLT_EARG, "%s: %s is %s, expected [%lld, %lld]", op, what,
                        ag_shape_str(t, b, sizeof b), (long long)rows,
                        (long long)(H > 0 ? H : t->shape[1]));
    }
    return MOLT_OK;
}

// Sends the rows of buf [n_from, H] back or forth: forward (send_rows -> recv_rows) or the
// reverse direction; the result [n_to, H] in a new molt_malloc buffer (*out).
static molt_status move_rows(const ag_ep_route *r, bool forward, const void *buf, int64_t H,
                             ag_dtype dt, void **out) {
    int64_t n_to = forward ? r->R : r->S;
    *out = molt_malloc((size_t)((n_to > 0 ? n_to : 1) * H) * ag_dtype_size(dt));
    if (!*out)
        return molt_err(MOLT_ENOMEM, "ep: out of memory for %lld rows of %lld", (long long)n_to,
                        (long long)H);
    molt_status st = forward ? ag_comm_alltoallv(r->comm, buf, r->send_rows, *out, r->recv_rows,
                                                 H, dt)
                             : ag_comm_alltoallv(r->comm, buf, r->recv_rows, *out, r->send_rows,
                                                 H, dt);
    if (st != MOLT_OK) {
        molt_free(*out);
        *out = NULL;
    }
    return st;
}

// A tensor [rows, H] (one placeholder row when rows is 0) holding data[0..rows*H).
static ag_tensor *rows_tensor(ag_ctx *c, ag_dtype dt, int64_t rows, int64_t H, const void *data) {
    ag_tensor *t = ag_out_new(c, dt, 2, (int64_t[]){rows > 0 ? rows : 1, H});
    if (t && rows > 0)
        memcpy(t->data, data, (size_t)(rows * H) * ag_dtype_size(dt));
    return t;
}

ag_tensor *ag_ep_dispatch(ag_ctx *c, const ag_ep_route *r, ag_tensor *x) {
    if (!r) {
        molt_err(MOLT_EARG, DISPATCH ": route is NULL");
        return NULL;
    }
    if (check_rows(DISPATCH, "x", x, r->T, 0) != MOLT_OK)
        return NULL;
    int64_t H = x->shape[1];
    size_t es = ag_dtype_size(x->dtype);
    void *send = molt_malloc((size_t)((r->S > 0 ? r->S : 1) * H) * es), *recv = NULL;
    if (!send) {
        molt_err(MOLT_ENOMEM, DISPATCH ": out of memory for %lld rows", (long long)r->S);
        return NULL;
    }
    if (r->S > 0) {
        if (x->dtype == AG_F32) ep_pack_f32(send, x->data, r->pos, r->T, r->k, H);
        else ep_pack_f64(send, x->data, r->pos, r->T, r->k, H);
    }
    molt_status st = move_rows(r, true, send, H, x->dtype, &recv);
    molt_free(send);
    ag_tensor *y = st == MOLT_OK ? rows_tensor(c, x->dtype, r->R, H, recv) : NULL;
    molt_free(recv);
    if (!y || !ag_should_record(c, 1, &x))
        return y;
    ag_node *n = ag_record(c, AG_OP_EP_DISPATCH, y, 1, &x);
    if (!n || !ag_grad_ensure(y))
        return NULL;
    n->ptr = r;
    return y;
}

molt_status ag_backward_ep_dispatch(ag_ctx *c, ag_node *n) {
    (void)c;
    const ag_ep_route *r = n->ptr;
    ag_tensor *x = n->in[0], *g = n->out->grad;
    int64_t H = x->shape[1];
    molt_status st = MOLT_OK;
    ag_tensor *dx = ag_grad_of(x, &st);
    if (st != MOLT_OK)
        return st;
    void *back = NULL;
    MOLT_TRY(move_rows(r, false, g->data, H, g->dtype, &back));
    if (dx && r->S > 0) {
        if (dx->dtype == AG_F32) ep_unpack_add_f32(dx->data, back, r->pos, r->T, r->k, H);
        else ep_unpack_add_f64(dx->data, back, r->pos, r->T, r->k, H);
    }
    molt_free(back);
    return MOLT_OK;
}

// ---- combine -------------------------------------------------------------------------------

ag_tensor *ag_ep_combine(ag_ctx *c, const ag_ep_route *r, ag_tensor *y, ag_tensor *w) {
    if (!r) {
        molt_err(MOLT_EARG, COMBINE ": route is NULL");
        return NULL;
    }
    if (check_rows(COMBINE, "y", y, r->R, 0) != MOLT_OK)
        return NULL;
    if (r->T > 0 && (check_rows(COMBINE, "w", w, r->T, r->k) != MOLT_OK ||
                     ag_check_same_dtype(COMBINE, "y", y, "w", w) != MOLT_OK))
        return NULL;
    int64_t H = y->shape[1];
    void *ret = NULL;
    if (move_rows(r, false, y->data, H, y->dtype, &ret) != MOLT_OK)
        return NULL;
    ag_tensor *out = ag_out_new(c, y->dtype, 2, (int64_t[]){r->T > 0 ? r->T : 1, H});
    if (out && r->T > 0) {
        if (y->dtype == AG_F32) ep_combine_fwd_f32(out->data, ret, w->data, r->pos, r->T, r->k, H);
        else ep_combine_fwd_f64(out->data, ret, w->data, r->pos, r->T, r->k, H);
    }
    ag_tensor *ins[2] = {y, r->T > 0 ? w : NULL};
    if (!out || !ag_should_record(c, 2, ins)) {
        molt_free(ret);
        return out;
    }
    ag_node *n = ag_record(c, AG_OP_EP_COMBINE, out, 2, ins);
    size_t bytes = (size_t)((r->S > 0 ? r->S : 1) * H) * ag_dtype_size(y->dtype);
    void *saved = n && ag_grad_ensure(out) ? ag_node_save(c, n, bytes) : NULL;
    if (saved) {
        memcpy(saved, ret, bytes);
        n->ptr = r;
    }
    molt_free(ret);
    return saved ? out : NULL;
}

molt_status ag_backward_ep_combine(ag_ctx *c, ag_node *n) {
    (void)c;
    const ag_ep_route *r = n->ptr;
    ag_tensor *y = n->in[0], *w = n->in[1], *dout = n->out->grad;
    int64_t H = y->shape[1];
    molt_status st = MOLT_OK;
    ag_tensor *dy = ag_grad_of(y, &st);
    ag_tensor *dw = st == MOLT_OK ? ag_grad_of(w, &st) : NULL;
    if (st != MOLT_OK)
        return st;
    size_t es = ag_dtype_size(y->dtype);
    void *dret = molt_calloc((size_t)((r->S > 0 ? r->S : 1) * H), es), *back = NULL;
    if (!dret)
        return molt_err(MOLT_ENOMEM, COMBINE ": out of memory for %lld rows", (long long)r->S);
    if (r->T > 0) {
        if (y->dtype == AG_F32)
            ep_combine_bwd_f32(dret, dw ? dw->data : NULL, dout->data, n->saved, w->data, r->pos,
                               r->T, r->k, H);
        else
            ep_combine_bwd_f64(dret, dw ? dw->data : NULL, dout->data, n->saved, w->data, r->pos,
                               r->T, r->k, H);
    }
    // every rank takes part, whether or not its own rows need the gradient
    st = move_rows(r, true, dret, H, y->dtype, &back);
    molt_free(dret);
    if (st == MOLT_OK && dy && r->R > 0) {
        if (dy->dtype == AG_F32) acc_f32(dy->data, back, r->R * H);
        else acc_f64(dy->data, back, r->R * H);
    }
    molt_free(back);
    return st;
}
