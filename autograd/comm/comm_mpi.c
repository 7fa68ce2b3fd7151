// autograd/comm/comm_mpi.c: the MPI backend. Every collective is started non-blocking
// (MPI_Iallreduce, MPI_Ialltoallv, ...) and polled with a growing back-off, so that a rank
// waiting for a missing one neither hangs forever nor keeps a core busy. Around each
// collective the ranks exchange arrival notices (seq, kind) on a duplicate communicator:
// when the wait passes the timeout, the notices that have not come name the ranks that did
// not arrive, and a notice of another collective names a rank that took another path.
// Without MPI in the build every entry point answers MOLT_EUNSUPPORTED.
// Not here: argument checks and statistics (comm.c), NCCL (comm_nccl.c).
#include "comm_internal.h"

#include <string.h>

#ifndef MOLT_HAVE_MPI

static molt_status no_mpi(void) {
    return molt_err(MOLT_EUNSUPPORTED, "comm: this build has no MPI");
}
molt_status cm_mpi_world(ag_comm *c) { (void)c; return no_mpi(); }
molt_status cm_mpi_split(ag_comm *p, int color, int key, ag_comm *out) {
    (void)p, (void)color, (void)key, (void)out;
    return no_mpi();
}
void cm_mpi_free(ag_comm *c) { (void)c; }
molt_status cm_mpi_allreduce(ag_comm *c, void *b, int64_t n, ag_dtype dt, ag_comm_op op) {
    (void)c, (void)b, (void)n, (void)dt, (void)op;
    return no_mpi();
}
molt_status cm_mpi_allgather(ag_comm *c, const void *s, void *r, int64_t n, ag_dtype dt) {
    (void)c, (void)s, (void)r, (void)n, (void)dt;
    return no_mpi();
}
molt_status cm_mpi_reduce_scatter(ag_comm *c, const void *s, void *r, int64_t n, ag_dtype dt,
                                  ag_comm_op op) {
    (void)c, (void)s, (void)r, (void)n, (void)dt, (void)op;
    return no_mpi();
}
molt_status cm_mpi_broadcast(ag_comm *c, void *b, int64_t n, ag_dtype dt, int root) {
    (void)c, (void)b, (void)n, (void)dt, (void)root;
    return no_mpi();
}
molt_status cm_mpi_alltoallv(ag_comm *c, const void *s, const int64_t *sr, void *r,
                             const int64_t *rr, int64_t row, ag_dtype dt) {
    (void)c, (void)s, (void)sr, (void)r, (void)rr, (void)row, (void)dt;
    return no_mpi();
}
molt_status cm_mpi_alltoall_counts(ag_comm *c, const int64_t *s, int64_t *r) {
    (void)c, (void)s, (void)r;
    return no_mpi();
}
molt_status cm_mpi_barrier(ag_comm *c) { (void)c; return no_mpi(); }
void cm_mpi_abort(int code) { (void)code; }
molt_status cm_mpi_notice_begin(ag_comm *c, ag_comm_kind k) { (void)c, (void)k; return MOLT_OK; }
molt_status cm_mpi_notice_poll(ag_comm *c, ag_comm_kind k, bool t, double w) {
    (void)c, (void)k, (void)t, (void)w;
    return MOLT_OK;
}
molt_status cm_mpi_notice_end(ag_comm *c, ag_comm_kind k, double t0) {
    (void)c, (void)k, (void)t0;
    return MOLT_OK;
}

#else

#include <limits.h>
#include <mpi.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#define MOLT_LSAN 1
// What MPI allocates while it starts (its plugins, their strings) is its own business:
// LeakSanitizer does not count it.
#define LSAN_OFF() __lsan_disable()
#define LSAN_ON() __lsan_enable()
#else
#define LSAN_OFF() ((void)0)
#define LSAN_ON() ((void)0)
#endif

#define NOTICE_TAG 7131

typedef struct {
    MPI_Comm comm;        // the collectives
    MPI_Comm note;        // arrival notices (a duplicate: never mixed with collectives)
    int64_t out[2];       // this rank's notice (seq, kind)
    int64_t *in;          // [2 * size] notices received
    MPI_Request *rreq;    // [size]
    MPI_Request *sreq;    // [size]
    bool *arrived;        // [size]
} mpi_st;

static bool g_we_initialized; // MPI_Init was ours: MPI_Finalize is too
static MPI_Op g_bf16_sum = MPI_OP_NULL, g_bf16_max = MPI_OP_NULL;

static molt_status mpi_fail(const ag_comm *c, const char *what, int rc) {
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(rc, s, &n) != MPI_SUCCESS)
        snprintf(s, sizeof s, "error %d", rc);
    return molt_err(MOLT_EIO, "comm %s on '%s': MPI: %s", what, c->name, s);
}

static void bf16_reduce(void *in, void *inout, int *len, MPI_Datatype *dt, bool max) {
    (void)dt;
    const uint16_t *a = in;
    uint16_t *b = inout;
    for (int i = 0; i < *len; i++) {
        float x = ag_bf16_to_f32(a[i]), y = ag_bf16_to_f32(b[i]);
        b[i] = ag_f32_to_bf16(max ? (x > y ? x : y) : x + y);
    }
}
static void bf16_sum_fn(void *in, void *inout, int *len, MPI_Datatype *dt) {
    bf16_reduce(in, inout, len, dt, false);
}
static void bf16_max_fn(void *in, void *inout, int *len, MPI_Datatype *dt) {
    bf16_reduce(in, inout, len, dt, true);
}

static MPI_Datatype mpi_type(ag_dtype dt) {
    switch (dt) {
    case AG_F32: return MPI_FLOAT;
    case AG_F64: return MPI_DOUBLE;
    case AG_I32: return MPI_INT32_T;
    default: return MPI_UINT16_T; // bf16 bits
    }
}

static MPI_Op mpi_op(ag_dtype dt, ag_comm_op op) {
    if (dt == AG_BF16)
        return op == AG_COMM_MAX ? g_bf16_max : g_bf16_sum;
    return op == AG_COMM_MAX ? MPI_MAX : MPI_SUM;
}

// Fills c's MPI state for communicator mc (taken over by c).
static molt_status state_new(ag_comm *c, MPI_Comm mc) {
    mpi_st *s = molt_calloc(1, sizeof *s);
    if (!s)
        return molt_err(MOLT_ENOMEM, "comm: out of memory");
    c->mpi = s;
    c->backend = AG_COMM_MPI;
    s->comm = mc;
    s->note = MPI_COMM_NULL;
    MPI_Comm_set_errhandler(mc, MPI_ERRORS_RETURN);
    int rank, size, rc;
    MPI_Comm_rank(mc, &rank);
    MPI_Comm_size(mc, &size);
    if ((rc = MPI_Comm_dup(mc, &s->note)) != MPI_SUCCESS)
        return mpi_fail(c, "dup", rc);
    MPI_Comm_set_errhandler(s->note, MPI_ERRORS_RETURN);
    int *wr = molt_realloc(c->world_ranks, (size_t)size * sizeof *wr);
    s->in = molt_calloc(2 * (size_t)size, sizeof *s->in);
    s->rreq = molt_calloc((size_t)size, sizeof *s->rreq);
    s->sreq = molt_calloc((size_t)size, sizeof *s->sreq);
    s->arrived = molt_calloc((size_t)size, sizeof *s->arrived);
    if (wr)
        c->world_ranks = wr;
    if (!wr || !s->in || !s->rreq || !s->sreq || !s->arrived)
        return molt_err(MOLT_ENOMEM, "comm: out of memory");
    c->rank = rank;
    c->size = size;
    MPI_Group g, gw;
    MPI_Comm_group(mc, &g);
    MPI_Comm_group(MPI_COMM_WORLD, &gw);
    int *mine = molt_malloc((size_t)size * sizeof *mine);
    if (!mine)
        return molt_err(MOLT_ENOMEM, "comm: out of memory");
    for (int r = 0; r < size; r++)
        mine[r] = r;
    MPI_Group_translate_ranks(g, size, mine, gw, c->world_ranks);
    molt_free(mine);
    MPI_Group_free(&g);
    MPI_Group_free(&gw);
    for (int r = 0; r < size; r++) {
        s->rreq[r] = s->sreq[r] = MPI_REQUEST_NULL;
    }
    return MOLT_OK;
}

molt_status cm_mpi_world(ag_comm *c) {
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (fin)
        return molt_err(MOLT_EUNSUPPORTED, "comm: MPI was already finalized");
    if (!init) {
        int provided = 0;
        LSAN_OFF();
        int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided);
        LSAN_ON();
        if (rc != MPI_SUCCESS)
            return molt_err(MOLT_EIO, "comm: MPI_Init_thread failed");
        g_we_initialized = true;
    }
    if (g_bf16_sum == MPI_OP_NULL) {
        MPI_Op_create(bf16_sum_fn, 1, &g_bf16_sum);
        MPI_Op_create(bf16_max_fn, 1, &g_bf16_max);
    }
    MPI_Comm w;
    int rc = MPI_Comm_dup(MPI_COMM_WORLD, &w);
    if (rc != MPI_SUCCESS)
        return mpi_fail(c, "dup of the world", rc);
    return state_new(c, w);
}

molt_status cm_mpi_split(ag_comm *parent, int color, int key, ag_comm *out) {
    mpi_st *p = parent->mpi;
    MPI_Comm mc;
    // the split is a collective of the parent: count it there
    parent->seq++;
    int rc = MPI_Comm_split(p->comm, color, key, &mc);
    if (rc != MPI_SUCCESS)
        return mpi_fail(parent, "split", rc);
    return state_new(out, mc);
}

static void cancel_pending(mpi_st *s, int size) {
    for (int r = 0; r < size; r++) {
        if (s->rreq[r] != MPI_REQUEST_NULL) {
            MPI_Cancel(&s->rreq[r]);
            MPI_Request_free(&s->rreq[r]);
        }
        if (s->sreq[r] != MPI_REQUEST_NULL)
            MPI_Request_free(&s->sreq[r]);
    }
}

void cm_mpi_free(ag_comm *c) {
    mpi_st *s = c->mpi;
    if (!s)
        return;
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) {
        if (s->rreq)
            cancel_pending(s, c->size);
        if (s->note != MPI_COMM_NULL)
            MPI_Comm_free(&s->note);
        if (s->comm != MPI_COMM_NULL)
            MPI_Comm_free(&s->comm);
    }
    molt_free(s->in);
    molt_free(s->rreq);
    molt_free(s->sreq);
    molt_free(s->arrived);
    molt_free(s);
    c->mpi = NULL;
    if (c->world && g_we_initialized && !fin) {
        if (g_bf16_sum != MPI_OP_NULL) {
            MPI_Op_free(&g_bf16_sum);
            MPI_Op_free(&g_bf16_max);
        }
#ifdef MOLT_LSAN
        // LeakSanitizer looks now, while what MPI keeps until exit is still reachable (its
        // plugins are unloaded by MPI_Finalize and their blocks could not be told apart)
        __lsan_do_leak_check();
#endif
        MPI_Finalize();
        g_we_initialized = false;
    }
}

void cm_mpi_abort(int code) {
    int init = 0, fin = 0;
    MPI_Initialized(&init);
    MPI_Finalized(&fin);
    if (init && !fin)
        MPI_Abort(MPI_COMM_WORLD, code);
}

// ---- arrival notices ----------------------------------------------------------------------

molt_status cm_mpi_notice_begin(ag_comm *c, ag_comm_kind kind) {
    mpi_st *s = c->mpi;
    if (!s || c->size == 1)
        return MOLT_OK;
    s->out[0] = c->seq;
    s->out[1] = kind;
    for (int r = 0; r < c->size; r++) {
        s->arrived[r] = r == c->rank;
        if (r == c->rank)
            continue;
        int rc = MPI_Irecv(&s->in[2 * r], 2, MPI_INT64_T, r, NOTICE_TAG, s->note, &s->rreq[r]);
        if (rc == MPI_SUCCESS)
            rc = MPI_Isend(s->out, 2, MPI_INT64_T, r, NOTICE_TAG, s->note, &s->sreq[r]);
        if (rc != MPI_SUCCESS)
            return mpi_fail(c, "arrival notice", rc);
    }
    return MOLT_OK;
}

molt_status cm_mpi_notice_poll(ag_comm *c, ag_comm_kind kind, bool timed_out, double waited) {
    mpi_st *s = c->mpi;
    if (!s || c->size == 1)
        return timed_out ? molt_err(MOLT_EIO, "comm %s on '%s' waited %.1f s",
                                    ag_comm_kind_name(kind), c->name, waited) : MOLT_OK;
    char what[96];
    for (int r = 0; r < c->size; r++) {
        if (s->arrived[r])
            continue;
        int done = 0;
        MPI_Test(&s->rreq[r], &done, MPI_STATUS_IGNORE);
        if (!done)
            continue;
        s->arrived[r] = true;
        if (s->in[2 * r] != c->seq || s->in[2 * r + 1] != kind)
            return molt_err(MOLT_EIO, "comm %s: rank %d (world %d) entered %s #%lld instead: "
                            "the ranks took different paths", cm_what(c, kind, what, sizeof what),
                            r, c->world_ranks[r],
                            ag_comm_kind_name((ag_comm_kind)s->in[2 * r + 1]),
                            (long long)s->in[2 * r]);
    }
    if (!timed_out)
        return MOLT_OK;
    char list[512];
    cm_rank_list(c, s->arrived, list, sizeof list);
    return molt_err(MOLT_EIO, "comm %s waited %.1f s (parallel.timeout_s %g); ranks that did "
                    "not arrive: %s", cm_what(c, kind, what, sizeof what), waited, c->timeout_s,
                    *list ? list : "none (every rank arrived, the transport stalled)");
}

molt_status cm_mpi_notice_end(ag_comm *c, ag_comm_kind kind, double t0) {
    mpi_st *s = c->mpi;
    if (!s || c->size == 1)
        return MOLT_OK;
    for (int64_t it = 0;; it++) {
        double waited = cm_now() - t0;
        MOLT_TRY(cm_mpi_notice_poll(c, kind, waited > c->timeout_s, waited));
        bool all = true;
        for (int r = 0; all && r < c->size; r++)
            all = s->arrived[r];
        int sent = 0;
        if (all && MPI_Testall(c->size, s->sreq, &sent, MPI_STATUSES_IGNORE) == MPI_SUCCESS &&
            sent)
            return MOLT_OK;
        cm_backoff(it);
    }
}

// Polls req to completion (or the timeout) between the notices.
static molt_status run(ag_comm *c, ag_comm_kind kind, MPI_Request *req, int start_rc) {
    if (start_rc != MPI_SUCCESS)
        return mpi_fail(c, ag_comm_kind_name(kind), start_rc);
    double t0 = cm_now();
    MOLT_TRY(cm_mpi_notice_begin(c, kind));
    for (int64_t it = 0;; it++) {
        int done = 0, rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS)
            return mpi_fail(c, ag_comm_kind_name(kind), rc);
        if (done)
            break;
        // the notices are looked at now and then: each look is one MPI_Test per peer
        if ((it & 63) == 63) {
            double waited = cm_now() - t0;
            MOLT_TRY(cm_mpi_notice_poll(c, kind, waited > c->timeout_s, waited));
        }
        cm_backoff(it);
    }
    return cm_mpi_notice_end(c, kind, t0);
}

static void scale_avg(void *buf, int64_t n, ag_dtype dt, int size) {
    double k = 1.0 / size;
    if (dt == AG_F32)
        for (int64_t i = 0; i < n; i++)
            ((float *)buf)[i] = (float)(((float *)buf)[i] * k);
    else if (dt == AG_F64)
        for (int64_t i = 0; i < n; i++)
            ((double *)buf)[i] *= k;
    else if (dt == AG_BF16)
        for (int64_t i = 0; i < n; i++) {
            uint16_t *b = buf;
            b[i] = ag_f32_to_bf16((float)(ag_bf16_to_f32(b[i]) * k));
        }
}

static molt_status check_int(const ag_comm *c, const char *what, int64_t n) {
    if (n > INT_MAX)
        return molt_err(MOLT_EUNSUPPORTED, "comm %s on '%s': %lld elements in one call (at "
                        "most %d)", what, c->name, (long long)n, INT_MAX);
    return MOLT_OK;
}

molt_status cm_mpi_allreduce(ag_comm *c, void *buf, int64_t n, ag_dtype dt, ag_comm_op op) {
    MOLT_TRY(check_int(c, "allreduce", n));
    mpi_st *s = c->mpi;
    MPI_Request req;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, mpi_type(dt), mpi_op(dt, op), s->comm,
                            &req);
    MOLT_TRY(run(c, AG_COMM_ALLREDUCE, &req, rc));
    if (op == AG_COMM_AVG)
        scale_avg(buf, n, dt, c->size);
    return MOLT_OK;
}

molt_status cm_mpi_allgather(ag_comm *c, const void *send, void *recv, int64_t n, ag_dtype dt) {
    MOLT_TRY(check_int(c, "allgather", n));
    mpi_st *s = c->mpi;
    MPI_Request req;
    int rc = MPI_Iallgather(send, (int)n, mpi_type(dt), recv, (int)n, mpi_type(dt), s->comm, &req);
    return run(c, AG_COMM_ALLGATHER, &req, rc);
}

molt_status cm_mpi_reduce_scatter(ag_comm *c, const void *send, void *recv, int64_t n,
                                  ag_dtype dt, ag_comm_op op) {
    MOLT_TRY(check_int(c, "reduce_scatter", n));
    mpi_st *s = c->mpi;
    MPI_Request req;
    int rc = MPI_Ireduce_scatter_block(send, recv, (int)n, mpi_type(dt), mpi_op(dt, op), s->comm,
                                       &req);
    MOLT_TRY(run(c, AG_COMM_REDUCE_SCATTER, &req, rc));
    if (op == AG_COMM_AVG)
        scale_avg(recv, n, dt, c->size);
    return MOLT_OK;
}

molt_status cm_mpi_broadcast(ag_comm *c, void *buf, int64_t n, ag_dtype dt, int root) {
    MOLT_TRY(check_int(c, "broadcast", n));
    mpi_st *s = c->mpi;
    MPI_Request req;
    int rc = MPI_Ibcast(buf, (int)n, mpi_type(dt), root, s->comm, &req);
    return run(c, AG_COMM_BROADCAST, &req, rc);
}

molt_status cm_mpi_alltoallv(ag_comm *c, const void *send, const int64_t *send_rows, void *recv,
                             const int64_t *recv_rows, int64_t row, ag_dtype dt) {
    mpi_st *s = c->mpi;
    int P = c->size;
    int *cnt = molt_malloc(4 * (size_t)P * sizeof *cnt);
    if (!cnt)
        return molt_err(MOLT_ENOMEM, "comm alltoallv: out of memory");
    int *sc = cnt, *sd = cnt + P, *rcn = cnt + 2 * P, *rd = cnt + 3 * P;
    int64_t so = 0, ro = 0;
    molt_status st = check_int(c, "alltoallv (row)", row);
    for (int p = 0; st == MOLT_OK && p < P; p++) {
        sc[p] = (int)send_rows[p];
        rcn[p] = (int)recv_rows[p];
        sd[p] = (int)so;
        rd[p] = (int)ro;
        so += send_rows[p];
        ro += recv_rows[p];
        if (so > INT_MAX || ro > INT_MAX)
            st = check_int(c, "alltoallv (rows)", so > ro ? so : ro);
    }
    // counts in rows of a contiguous type: the element counts may pass INT_MAX
    MPI_Datatype rt = MPI_DATATYPE_NULL;
    if (st == MOLT_OK) {
        int rc = MPI_Type_contiguous((int)row, mpi_type(dt), &rt);
        if (rc == MPI_SUCCESS)
            rc = MPI_Type_commit(&rt);
        MPI_Request req;
        if (rc == MPI_SUCCESS)
            rc = MPI_Ialltoallv(send, sc, sd, rt, recv, rcn, rd, rt, s->comm, &req);
        st = run(c, AG_COMM_ALLTOALLV, &req, rc);
    }
    if (rt != MPI_DATATYPE_NULL)
        MPI_Type_free(&rt);
    molt_free(cnt);
    return st;
}

molt_status cm_mpi_alltoall_counts(ag_comm *c, const int64_t *send_rows, int64_t *recv_rows) {
    mpi_st *s = c->mpi;
    MPI_Request req;
    int rc = MPI_Ialltoall(send_rows, 1, MPI_INT64_T, recv_rows, 1, MPI_INT64_T, s->comm, &req);
    return run(c, AG_COMM_ALLTOALLV, &req, rc);
}

molt_status cm_mpi_barrier(ag_comm *c) {
    mpi_st *s = c->mpi;
    MPI_Request req;
    int rc = MPI_Ibarrier(s->comm, &req);
    return run(c, AG_COMM_BARRIER, &req, rc);
}

#endif
