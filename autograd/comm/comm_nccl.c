// autograd/comm/comm_nccl.c: the NCCL backend, for tensors that live on a GPU. The NCCL
// communicator of an ag_comm is made on its first device collective: rank 0's unique id is
// broadcast over the communicator's MPI (host) side, each process takes the GPU of its local
// rank (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID or SLURM_LOCALID, modulo the GPUs
// visible). Collectives are queued on a stream of their own and polled like the MPI ones,
// with the same arrival notices (over MPI), so a missing rank ends in a message, not a hang;
// on a timeout the NCCL communicator is aborted. All-to-all is a group of ncclSend/ncclRecv
// that skips empty pairs. Without NCCL (or MPI) in the build every call answers
// MOLT_EUNSUPPORTED. Not here: host collectives (comm_mpi.c).
#include "comm_internal.h"

#include <stdlib.h>
#include <string.h>

#if !defined(MOLT_HAVE_NCCL) || !defined(MOLT_HAVE_MPI)

static molt_status no_nccl(void) {
    return molt_err(MOLT_EUNSUPPORTED, "comm: a tensor on a GPU needs NCCL, which this build "
                    "lacks (CUDA with NCCL and MPI)");
}
molt_status cm_nccl_allreduce(ag_comm *c, void *b, int64_t n, ag_dtype dt, ag_comm_op op) {
    (void)c, (void)b, (void)n, (void)dt, (void)op;
    return no_nccl();
}
molt_status cm_nccl_allgather(ag_comm *c, const void *s, void *r, int64_t n, ag_dtype dt) {
    (void)c, (void)s, (void)r, (void)n, (void)dt;
    return no_nccl();
}
molt_status cm_nccl_reduce_scatter(ag_comm *c, const void *s, void *r, int64_t n, ag_dtype dt,
                                   ag_comm_op op) {
    (void)c, (void)s, (void)r, (void)n, (void)dt, (void)op;
    return no_nccl();
}
molt_status cm_nccl_broadcast(ag_comm *c, void *b, int64_t n, ag_dtype dt, int root) {
    (void)c, (void)b, (void)n, (void)dt, (void)root;
    return no_nccl();
}
molt_status cm_nccl_alltoallv(ag_comm *c, const void *s, const int64_t *sr, void *r,
                              const int64_t *rr, int64_t row, ag_dtype dt) {
    (void)c, (void)s, (void)sr, (void)r, (void)rr, (void)row, (void)dt;
    return no_nccl();
}
void cm_nccl_free(ag_comm *c) { (void)c; }

#else

#include <cuda_runtime_api.h>
#include <nccl.h>

typedef struct {
    ncclComm_t comm;
    cudaStream_t stream;
    int device;
    bool broken; // aborted after a timeout or an error: unusable
} nccl_st;

static int local_rank(void) {
    const char *names[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        const char *v = getenv(names[i]);
        if (v && *v)
            return atoi(v);
    }
    return 0;
}

static molt_status nccl_fail(const ag_comm *c, const char *what, ncclResult_t r) {
    return molt_err(MOLT_EDEVICE, "comm %s on '%s': NCCL: %s", what, c->name,
                    ncclGetErrorString(r));
}

static molt_status cuda_fail(const ag_comm *c, const char *what, cudaError_t e) {
    return molt_err(MOLT_EDEVICE, "comm %s on '%s': CUDA: %s", what, c->name,
                    cudaGetErrorString(e));
}

static molt_status ensure(ag_comm *c) {
    if (c->nccl) {
        if (((nccl_st *)c->nccl)->broken)
            return molt_err(MOLT_EDEVICE, "comm '%s': the NCCL communicator was aborted",
                            c->name);
        return MOLT_OK;
    }
    int ndev = 0;
    cudaError_t ce = cudaGetDeviceCount(&ndev);
    if (ce != cudaSuccess || ndev < 1)
        return molt_err(MOLT_EDEVICE, "comm '%s': no GPU visible for NCCL", c->name);
    nccl_st *s = molt_calloc(1, sizeof *s);
    if (!s)
        return molt_err(MOLT_ENOMEM, "comm: out of memory");
    s->device = local_rank() % ndev;
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    molt_status st = MOLT_OK;
    if ((ce = cudaSetDevice(s->device)) != cudaSuccess)
        st = cuda_fail(c, "set device", ce);
    ncclResult_t r = ncclSuccess;
    if (st == MOLT_OK && c->rank == 0 && (r = ncclGetUniqueId(&id)) != ncclSuccess)
        st = nccl_fail(c, "unique id", r);
    // the id travels over the host side of the communicator (MPI), as bytes
    _Static_assert(sizeof id % 4 == 0, "ncclUniqueId is a whole number of 4-byte words");
    if (st == MOLT_OK && c->size > 1)
        st = ag_comm_broadcast(c, &id, (int64_t)(sizeof id / 4), AG_I32, 0);
    if (st == MOLT_OK && (r = ncclCommInitRank(&s->comm, c->size, id, c->rank)) != ncclSuccess)
        st = nccl_fail(c, "init", r);
    if (st == MOLT_OK && (ce = cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking)) !=
                             cudaSuccess)
        st = cuda_fail(c, "stream", ce);
    if (st != MOLT_OK) {
        if (s->comm)
            ncclCommDestroy(s->comm);
        molt_free(s);
        return st;
    }
    c->nccl = s;
    return MOLT_OK;
}

static ncclDataType_t nccl_type(ag_dtype dt) {
    switch (dt) {
    case AG_F32: return ncclFloat32;
    case AG_F64: return ncclFloat64;
    case AG_I32: return ncclInt32;
    default: return ncclBfloat16;
    }
}

static ncclRedOp_t nccl_op(ag_comm_op op) {
    return op == AG_COMM_MAX ? ncclMax : op == AG_COMM_AVG ? ncclAvg : ncclSum;
}

// Polls the stream to completion between the arrival notices; aborts the NCCL communicator
// on a timeout or an asynchronous error.
static molt_status wait_stream(ag_comm *c, ag_comm_kind kind, ncclResult_t launched) {
    nccl_st *s = c->nccl;
    if (launched != ncclSuccess)
        return nccl_fail(c, ag_comm_kind_name(kind), launched);
    double t0 = cm_now();
    MOLT_TRY(cm_mpi_notice_begin(c, kind));
    for (int64_t it = 0;; it++) {
        cudaError_t e = cudaStreamQuery(s->stream);
        if (e == cudaSuccess)
            break;
        molt_status st = MOLT_OK;
        ncclResult_t ae = ncclSuccess;
        if (e != cudaErrorNotReady)
            st = cuda_fail(c, ag_comm_kind_name(kind), e);
        else if (ncclCommGetAsyncError(s->comm, &ae) == ncclSuccess && ae != ncclSuccess &&
                 ae != ncclInProgress)
            st = nccl_fail(c, ag_comm_kind_name(kind), ae);
        else if ((it & 63) == 63) {
            double waited = cm_now() - t0;
            st = cm_mpi_notice_poll(c, kind, waited > c->timeout_s, waited);
        }
        if (st != MOLT_OK) {
            ncclCommAbort(s->comm);
            s->comm = NULL;
            s->broken = true;
            return st;
        }
        cm_backoff(it);
    }
    return cm_mpi_notice_end(c, kind, t0);
}

molt_status cm_nccl_allreduce(ag_comm *c, void *buf, int64_t n, ag_dtype dt, ag_comm_op op) {
    MOLT_TRY(ensure(c));
    nccl_st *s = c->nccl;
    return wait_stream(c, AG_COMM_ALLREDUCE, ncclAllReduce(buf, buf, (size_t)n, nccl_type(dt),
                                                           nccl_op(op), s->comm, s->stream));
}

molt_status cm_nccl_allgather(ag_comm *c, const void *send, void *recv, int64_t n, ag_dtype dt) {
    MOLT_TRY(ensure(c));
    nccl_st *s = c->nccl;
    return wait_stream(c, AG_COMM_ALLGATHER, ncclAllGather(send, recv, (size_t)n, nccl_type(dt),
                                                           s->comm, s->stream));
}

molt_status cm_nccl_reduce_scatter(ag_comm *c, const void *send, void *recv, int64_t n,
                                   ag_dtype dt, ag_comm_op op) {
    MOLT_TRY(ensure(c));
    nccl_st *s = c->nccl;
    return wait_stream(c, AG_COMM_REDUCE_SCATTER,
                       ncclReduceScatter(send, recv, (size_t)n, nccl_type(dt), nccl_op(op),
                                         s->comm, s->stream));
}

molt_status cm_nccl_broadcast(ag_comm *c, void *buf, int64_t n, ag_dtype dt, int root) {
    MOLT_TRY(ensure(c));
    nccl_st *s = c->nccl;
    return wait_stream(c, AG_COMM_BROADCAST, ncclBroadcast(buf, buf, (size_t)n, nccl_type(dt),
                                                           root, s->comm, s->stream));
}

molt_status cm_nccl_alltoallv(ag_comm *c, const void *send, const int64_t *send_rows,
                              void *recv, const int64_t *recv_rows, int64_t row, ag_dtype dt) {
    MOLT_TRY(ensure(c));
    nccl_st *s = c->nccl;
    size_t es = ag_dtype_size(dt);
    ncclResult_t r = ncclGroupStart();
    int64_t so = 0, ro = 0;
    for (int p = 0; r == ncclSuccess && p < c->size; p++) {
        if (send_rows[p] > 0)
            r = ncclSend((const char *)send + (size_t)(so * row) * es, (size_t)(send_rows[p] * row),
                         nccl_type(dt), p, s->comm, s->stream);
        if (r == ncclSuccess && recv_rows[p] > 0)
            r = ncclRecv((char *)recv + (size_t)(ro * row) * es, (size_t)(recv_rows[p] * row),
                         nccl_type(dt), p, s->comm, s->stream);
        so += send_rows[p];
        ro += recv_rows[p];
    }
    ncclResult_t e = ncclGroupEnd();
    return wait_stream(c, AG_COMM_ALLTOALLV, r != ncclSuccess ? r : e);
}

void cm_nccl_free(ag_comm *c) {
    nccl_st *s = c->nccl;
    if (!s)
        return;
    if (s->stream)
        cudaStreamDestroy(s->stream);
    if (s->comm)
        ncclCommDestroy(s->comm);
    molt_free(s);
    c->nccl = NULL;
}

#endif
