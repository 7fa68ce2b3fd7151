// autograd/comm/comm.c: the communicator's front: creation of the world and of local
// communicators, argument checks, statistics, the tensor forms, and the local backend (one
// rank: every collective is a copy). The MPI and NCCL calls are in comm_mpi.c and
// comm_nccl.c. Not here: polling, timeouts and arrival notices (comm_mpi.c).
#include "comm_internal.h"

#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const backend_names[AG_COMM_BACKEND_COUNT] = {"local", "mpi", "nccl"};
static const char *const kind_names[AG_COMM_KIND_COUNT] = {
    "allreduce", "allgather", "reduce_scatter", "broadcast", "alltoallv", "barrier"};

// Seconds in collectives over all communicators of the process (main thread only).
static double g_seconds_total;

const char *ag_comm_backend_name(ag_comm_backend b) {
    return (unsigned)b < AG_COMM_BACKEND_COUNT ? backend_names[b] : "?";
}

const char *ag_comm_kind_name(ag_comm_kind k) {
    return (unsigned)k < AG_COMM_KIND_COUNT ? kind_names[k] : "?";
}

bool ag_comm_have_mpi(void) {
#ifdef MOLT_HAVE_MPI
    return true;
#else
    return false;
#endif
}

bool ag_comm_have_nccl(void) {
#if defined(MOLT_HAVE_NCCL) && defined(MOLT_HAVE_MPI)
    return true;
#else
    return false;
#endif
}

static int env_int(const char *name) {
    const char *v = getenv(name);
    if (!v || !*v)
        return 0;
    char *end;
    long x = strtol(v, &end, 10);
    return *end || x < 0 || x > 1 << 24 ? 0 : (int)x;
}

int ag_comm_launched_size(void) {
    const char *names[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        int n = env_int(names[i]);
        if (n > 0)
            return n;
    }
    // srun without an MPI launcher's variables: one task per process
    if (getenv("SLURM_PROCID") && getenv("SLURM_STEP_ID")) {
        int n = env_int("SLURM_NTASKS");
        if (n > 0)
            return n;
    }
    return 1;
}

double cm_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void cm_backoff(int64_t iter) {
    if (iter < 64)
        return; // spin: a fast collective finishes within microseconds
    if (iter < 1024) {
        sched_yield();
        return;
    }
    long ns = iter < 4096 ? 20000 : iter < 16384 ? 200000 : 1000000;
    struct timespec ts = {0, ns};
    nanosleep(&ts, NULL);
}

void cm_rank_list(const ag_comm *c, const bool *arrived, char *buf, size_t cap) {
    size_t at = 0;
    int shown = 0, missing = 0;
    buf[0] = 0;
    for (int r = 0; r < c->size; r++) {
        if (arrived[r])
            continue;
        missing++;
        if (shown == 16 || at >= cap)
            continue;
        int n = snprintf(buf + at, cap - at, "%s%d", shown ? ", " : "", r);
        if (n > 0)
            at += (size_t)n;
        if (c->world_ranks && c->world_ranks[r] != r && at < cap) {
            n = snprintf(buf + at, cap - at, " (world %d)", c->world_ranks[r]);
            if (n > 0)
                at += (size_t)n;
        }
        shown++;
    }
    if (missing > shown && at < cap)
        snprintf(buf + at, cap - at, " and %d more", missing - shown);
}

const char *cm_what(const ag_comm *c, ag_comm_kind kind, char *buf, size_t cap) {
    snprintf(buf, cap, "%s #%lld on '%s'", ag_comm_kind_name(kind), (long long)c->seq, c->name);
    return buf;
}

// ---- creation --------------------------------------------------------------------------

static ag_comm *comm_new(const char *name, int rank, int size) {
    ag_comm *c = molt_calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->world_ranks = molt_calloc((size_t)size, sizeof *c->world_ranks);
    if (!c->world_ranks) {
        molt_free(c);
        return NULL;
    }
    snprintf(c->name, sizeof c->name, "%s", name);
    c->rank = rank;
    c->size = size;
    c->timeout_s = AG_COMM_TIMEOUT_DEFAULT;
    for (int r = 0; r < size; r++)
        c->world_ranks[r] = r;
    return c;
}

molt_status ag_comm_local(ag_comm **out) {
    *out = comm_new("local", 0, 1);
    return *out ? MOLT_OK : molt_err(MOLT_ENOMEM, "comm: out of memory");
}

molt_status ag_comm_world(double timeout_s, ag_comm **out) {
    *out = NULL;
    int n = ag_comm_launched_size();
    if (n <= 1) {
        MOLT_TRY(ag_comm_local(out));
        snprintf((*out)->name, sizeof (*out)->name, "world");
    } else {
        if (!ag_comm_have_mpi())
            return molt_err(MOLT_EUNSUPPORTED, "comm: started as one of %d processes, but this "
                            "build has no MPI (install libopenmpi-dev and rebuild)", n);
        ag_comm *c = comm_new("world", 0, 1);
        if (!c)
            return molt_err(MOLT_ENOMEM, "comm: out of memory");
        molt_status st = cm_mpi_world(c);
        if (st != MOLT_OK) {
            ag_comm_free(c);
            return st;
        }
        *out = c;
    }
    (*out)->world = true;
    if (timeout_s > 0)
        (*out)->timeout_s = timeout_s;
    return MOLT_OK;
}

molt_status ag_comm_split(ag_comm *parent, int color, int key, const char *name, ag_comm **out) {
    *out = NULL;
    if (!parent)
        return molt_err(MOLT_EARG, "comm split: parent is NULL");
    if (color < 0)
        return molt_err(MOLT_EARG, "comm split '%s': color %d is negative", name, color);
    ag_comm *c = comm_new(name, 0, 1);
    if (!c)
        return molt_err(MOLT_ENOMEM, "comm: out of memory");
    c->timeout_s = parent->timeout_s;
    c->backend = parent->backend;
    if (parent->backend == AG_COMM_MPI) {
        molt_status st = cm_mpi_split(parent, color, key, c);
        if (st != MOLT_OK) {
            ag_comm_free(c);
            return st;
        }
    } else {
        c->world_ranks[0] = parent->world_ranks[0];
    }
    *out = c;
    return MOLT_OK;
}

void ag_comm_free(ag_comm *c) {
    if (!c)
        return;
    cm_nccl_free(c);
    if (c->backend == AG_COMM_MPI)
        cm_mpi_free(c);
    molt_free(c->world_ranks);
    molt_free(c);
}

int ag_comm_rank(const ag_comm *c) { return c ? c->rank : 0; }
int ag_comm_size(const ag_comm *c) { return c ? c->size : 1; }
int ag_comm_world_rank(const ag_comm *c, int r) {
    return c && r >= 0 && r < c->size ? c->world_ranks[r] : r;
}
const char *ag_comm_name(const ag_comm *c) { return c ? c->name : "none"; }
ag_comm_backend ag_comm_backend_of(const ag_comm *c) { return c ? c->backend : AG_COMM_LOCAL; }
double ag_comm_timeout(const ag_comm *c) { return c ? c->timeout_s : AG_COMM_TIMEOUT_DEFAULT; }
void ag_comm_set_timeout(ag_comm *c, double timeout_s) {
    if (c && timeout_s > 0)
        c->timeout_s = timeout_s;
}

// ---- checks and statistics ---------------------------------------------------------------

static molt_status check_args(const ag_comm *c, ag_comm_kind k, const void *buf, int64_t n,
                              ag_dtype dt) {
    const char *op = ag_comm_kind_name(k);
    if (!c)
        return molt_err(MOLT_EARG, "comm %s: communicator is NULL", op);
    if (n < 0)
        return molt_err(MOLT_EARG, "comm %s: %lld elements", op, (long long)n);
    if (n > 0 && !buf)
        return molt_err(MOLT_EARG, "comm %s: buffer is NULL", op);
    if (dt != AG_F32 && dt != AG_F64 && dt != AG_BF16 && dt != AG_I32)
        return molt_err(MOLT_EARG, "comm %s: dtype %s (expected f32, f64, bf16 or i32)", op,
                        ag_dtype_name(dt));
    return MOLT_OK;
}

static molt_status check_op(const char *what, ag_dtype dt, ag_comm_op op) {
    if ((unsigned)op > AG_COMM_MAX)
        return molt_err(MOLT_EARG, "comm %s: unknown reduction %d", what, (int)op);
    if (dt == AG_I32 && op == AG_COMM_AVG)
        return molt_err(MOLT_EARG, "comm %s: no average of i32", what);
    return MOLT_OK;
}

static void stat_add(ag_comm *c, ag_comm_kind k, double t0, int64_t bytes) {
    double dt = cm_now() - t0;
    c->stat[k].calls++;
    c->stat[k].seconds += dt;
    c->stat[k].bytes += bytes;
    g_seconds_total += dt;
}

void ag_comm_stats(const ag_comm *c, ag_comm_stat out[AG_COMM_KIND_COUNT]) {
    for (int k = 0; k < AG_COMM_KIND_COUNT; k++)
        out[k] = c ? c->stat[k] : (ag_comm_stat){0};
}

void ag_comm_stats_reset(ag_comm *c) {
    if (c)
        memset(c->stat, 0, sizeof c->stat);
}

double ag_comm_seconds_total(void) { return g_seconds_total; }

void ag_comm_profile_print(const ag_comm *c, FILE *f) {
    if (!c)
        return;
    for (int k = 0; k < AG_COMM_KIND_COUNT; k++) {
        const ag_comm_stat *s = &c->stat[k];
        if (s->calls == 0)
            continue;
        fprintf(f, "comm: %-8s %-15s %8lld calls %10.3f s %12.3f MiB sent\n", c->name,
                kind_names[k], (long long)s->calls, s->seconds,
                (double)s->bytes / (1024.0 * 1024.0));
    }
}

// ---- local backend ------------------------------------------------------------------------

// One rank: an average or a maximum of one value is that value.
static void local_copy(void *dst, const void *src, size_t bytes) {
    if (dst != src && bytes)
        memmove(dst, src, bytes);
}

// ---- the collectives -----------------------------------------------------------------------

molt_status ag_comm_allreduce(ag_comm *c, void *buf, int64_t n, ag_dtype dt, ag_comm_op op) {
    MOLT_TRY(check_args(c, AG_COMM_ALLREDUCE, buf, n, dt));
    MOLT_TRY(check_op("allreduce", dt, op));
    double t0 = cm_now();
    c->seq++;
    if (c->backend == AG_COMM_MPI)
        MOLT_TRY(cm_mpi_allreduce(c, buf, n, dt, op));
    stat_add(c, AG_COMM_ALLREDUCE, t0, c->size > 1 ? n * (int64_t)ag_dtype_size(dt) : 0);
    return MOLT_OK;
}

molt_status ag_comm_allgather(ag_comm *c, const void *send, void *recv, int64_t n, ag_dtype dt) {
    MOLT_TRY(check_args(c, AG_COMM_ALLGATHER, send, n, dt));
    if (n > 0 && !recv)
        return molt_err(MOLT_EARG, "comm allgather: recv is NULL");
    double t0 = cm_now();
    c->seq++;
    size_t es = ag_dtype_size(dt);
    if (c->backend == AG_COMM_MPI)
        MOLT_TRY(cm_mpi_allgather(c, send, recv, n, dt));
    else
        local_copy(recv, send, (size_t)n * es);
    stat_add(c, AG_COMM_ALLGATHER, t0, c->size > 1 ? n * (int64_t)es : 0);
    return MOLT_OK;
}

molt_status ag_comm_reduce_scatter(ag_comm *c, const void *send, void *recv, int64_t n,
                                   ag_dtype dt, ag_comm_op op) {
    MOLT_TRY(check_args(c, AG_COMM_REDUCE_SCATTER, send, n, dt));
    MOLT_TRY(check_op("reduce_scatter", dt, op));
    if (n > 0 && !recv)
        return molt_err(MOLT_EARG, "comm reduce_scatter: recv is NULL");
    double t0 = cm_now();
    c->seq++;
    size_t es = ag_dtype_size(dt);
    if (c->backend == AG_COMM_MPI)
        MOLT_TRY(cm_mpi_reduce_scatter(c, send, recv, n, dt, op));
    else
        local_copy(recv, send, (size_t)n * es);
    stat_add(c, AG_COMM_REDUCE_SCATTER, t0, (int64_t)(c->size - 1) * n * (int64_t)es);
    return MOLT_OK;
}

molt_status ag_comm_broadcast(ag_comm *c, void *buf, int64_t n, ag_dtype dt, int root) {
    MOLT_TRY(check_args(c, AG_COMM_BROADCAST, buf, n, dt));
    if (root < 0 || root >= c->size)
        return molt_err(MOLT_EARG, "comm broadcast: root %d outside [0, %d)", root, c->size);
    double t0 = cm_now();
    c->seq++;
    if (c->backend == AG_COMM_MPI)
        MOLT_TRY(cm_mpi_broadcast(c, buf, n, dt, root));
    int64_t bytes = c->rank == root ? (int64_t)(c->size - 1) * n * (int64_t)ag_dtype_size(dt) : 0;
    stat_add(c, AG_COMM_BROADCAST, t0, bytes);
    return MOLT_OK;
}

static molt_status check_rows(const ag_comm *c, const char *what, const int64_t *rows) {
    if (!rows)
        return molt_err(MOLT_EARG, "comm alltoallv: %s is NULL", what);
    for (int p = 0; p < c->size; p++)
        if (rows[p] < 0)
            return molt_err(MOLT_EARG, "comm alltoallv: %s[%d] = %lld", what, p,
                            (long long)rows[p]);
    return MOLT_OK;
}

molt_status ag_comm_alltoallv(ag_comm *c, const void *send, const int64_t *send_rows,
                              void *recv, const int64_t *recv_rows, int64_t row, ag_dtype dt) {
    MOLT_TRY(check_args(c, AG_COMM_ALLTOALLV, NULL, 0, dt)); // the communicator, the dtype
    if (row < 1)
        return molt_err(MOLT_EARG, "comm alltoallv: rows of %lld elements", (long long)row);
    MOLT_TRY(check_rows(c, "send_rows", send_rows));
    MOLT_TRY(check_rows(c, "recv_rows", recv_rows));
    int64_t ns = 0, nr = 0, off = 0;
    for (int p = 0; p < c->size; p++) {
        ns += send_rows[p];
        nr += recv_rows[p];
        if (p != c->rank)
            off += send_rows[p];
    }
    if ((ns > 0 && !send) || (nr > 0 && !recv))
        return molt_err(MOLT_EARG, "comm alltoallv: %s is NULL", ns > 0 && !send ? "send" : "recv");
    double t0 = cm_now();
    c->seq++;
    size_t es = ag_dtype_size(dt);
    if (c->backend == AG_COMM_MPI) {
        MOLT_TRY(cm_mpi_alltoallv(c, send, send_rows, recv, recv_rows, row, dt));
    } else {
        if (send_rows[0] != recv_rows[0])
            return molt_err(MOLT_EARG, "comm alltoallv: one rank sends itself %lld rows but "
                            "expects %lld", (long long)send_rows[0], (long long)recv_rows[0]);
        local_copy(recv, send, (size_t)(send_rows[0] * row) * es);
    }
    stat_add(c, AG_COMM_ALLTOALLV, t0, off * row * (int64_t)es);
    return MOLT_OK;
}

molt_status ag_comm_alltoall_counts(ag_comm *c, const int64_t *send_rows, int64_t *recv_rows) {
    if (!c || !send_rows || !recv_rows)
        return molt_err(MOLT_EARG, "comm alltoall counts: NULL argument");
    double t0 = cm_now();
    c->seq++;
    if (c->backend == AG_COMM_MPI)
        MOLT_TRY(cm_mpi_alltoall_counts(c, send_rows, recv_rows));
    else
        recv_rows[0] = send_rows[0];
    stat_add(c, AG_COMM_ALLTOALLV, t0, (int64_t)(c->size - 1) * (int64_t)sizeof(int64_t));
    return MOLT_OK;
}

molt_status ag_comm_barrier(ag_comm *c) {
    if (!c)
        return molt_err(MOLT_EARG, "comm barrier: communicator is NULL");
    double t0 = cm_now();
    c->seq++;
    if (c->backend == AG_COMM_MPI)
        MOLT_TRY(cm_mpi_barrier(c));
    stat_add(c, AG_COMM_BARRIER, t0, 0);
    return MOLT_OK;
}

molt_status ag_comm_layout(int ranks, int expert, int data, int *d, int *e) {
    *e = expert > 0 ? expert : 1;
    if (ranks % *e != 0)
        return molt_err(MOLT_EARG, "parallel.expert = %d does not divide the %d ranks", *e,
                        ranks);
    *d = data > 0 ? data : ranks / *e;
    if (*d * *e != ranks)
        return molt_err(MOLT_EARG, "parallel.data x parallel.expert = %d x %d = %d, but the "
                        "job has %d ranks", *d, *e, *d * *e, ranks);
    return MOLT_OK;
}

void ag_comm_abort(ag_comm *c, int code, const char *why) {
    int wr = c ? ag_comm_world_rank(c, c->rank) : 0;
    fprintf(stderr, "molt: rank %d: %s: ending the job\n", wr, why && *why ? why : "error");
    fflush(stderr);
    if (c && c->backend == AG_COMM_MPI && c->size > 1)
        cm_mpi_abort(code ? code : 1);
    exit(code ? code : 1);
}

// ---- tensors -------------------------------------------------------------------------------

static molt_status on_device(const ag_tensor *t, const char *what, bool *dev) {
    if (!t)
        return molt_err(MOLT_EARG, "comm %s: tensor is NULL", what);
    *dev = t->device == AG_CUDA;
    return MOLT_OK;
}

static molt_status same_device(const ag_tensor *a, const ag_tensor *b, const char *what) {
    if (!a || !b)
        return molt_err(MOLT_EARG, "comm %s: tensor is NULL", what);
    if (a->device != b->device || a->dtype != b->dtype)
        return molt_err(MOLT_EARG, "comm %s: send and recv differ in device or dtype", what);
    return MOLT_OK;
}

static molt_status timed_nccl(ag_comm *c, ag_comm_kind k, double t0, int64_t bytes,
                              molt_status st) {
    if (st == MOLT_OK)
        stat_add(c, k, t0, bytes);
    return st;
}

molt_status ag_comm_allreduce_t(ag_comm *c, ag_tensor *t, ag_comm_op op) {
    bool dev = false;
    MOLT_TRY(on_device(t, "allreduce", &dev));
    if (!dev)
        return ag_comm_allreduce(c, t->data, t->numel, t->dtype, op);
    MOLT_TRY(check_args(c, AG_COMM_ALLREDUCE, t->data, t->numel, t->dtype));
    MOLT_TRY(check_op("allreduce", t->dtype, op));
    double t0 = cm_now();
    c->seq++;
    return timed_nccl(c, AG_COMM_ALLREDUCE, t0, t->numel * (int64_t)ag_dtype_size(t->dtype),
                      cm_nccl_allreduce(c, t->data, t->numel, t->dtype, op));
}

molt_status ag_comm_allgather_t(ag_comm *c, const ag_tensor *send, ag_tensor *recv) {
    MOLT_TRY(same_device(send, recv, "allgather"));
    if (!c || recv->numel != send->numel * c->size)
        return molt_err(MOLT_EARG, "comm allgather: recv holds %lld elements, expected %d x "
                        "%lld", (long long)recv->numel, ag_comm_size(c), (long long)send->numel);
    if (send->device != AG_CUDA)
        return ag_comm_allgather(c, send->data, recv->data, send->numel, send->dtype);
    MOLT_TRY(check_args(c, AG_COMM_ALLGATHER, send->data, send->numel, send->dtype));
    double t0 = cm_now();
    c->seq++;
    return timed_nccl(c, AG_COMM_ALLGATHER, t0, send->numel * (int64_t)ag_dtype_size(send->dtype),
                      cm_nccl_allgather(c, send->data, recv->data, send->numel, send->dtype));
}

molt_status ag_comm_reduce_scatter_t(ag_comm *c, const ag_tensor *send, ag_tensor *recv,
                                     ag_comm_op op) {
    MOLT_TRY(same_device(send, recv, "reduce_scatter"));
    if (!c || send->numel != recv->numel * c->size)
        return molt_err(MOLT_EARG, "comm reduce_scatter: send holds %lld elements, expected "
                        "%d x %lld", (long long)send->numel, ag_comm_size(c),
                        (long long)recv->numel);
    if (send->device != AG_CUDA)
        return ag_comm_reduce_scatter(c, send->data, recv->data, recv->numel, recv->dtype, op);
    MOLT_TRY(check_args(c, AG_COMM_REDUCE_SCATTER, send->data, recv->numel, recv->dtype));
    MOLT_TRY(check_op("reduce_scatter", recv->dtype, op));
    double t0 = cm_now();
    c->seq++;
    int64_t bytes = (int64_t)(c->size - 1) * recv->numel * (int64_t)ag_dtype_size(recv->dtype);
    return timed_nccl(c, AG_COMM_REDUCE_SCATTER, t0, bytes,
                      cm_nccl_reduce_scatter(c, send->data, recv->data, recv->numel, recv->dtype,
                                             op));
}

molt_status ag_comm_broadcast_t(ag_comm *c, ag_tensor *t, int root) {
    bool dev = false;
    MOLT_TRY(on_device(t, "broadcast", &dev));
    if (!dev)
        return ag_comm_broadcast(c, t->data, t->numel, t->dtype, root);
    MOLT_TRY(check_args(c, AG_COMM_BROADCAST, t->data, t->numel, t->dtype));
    if (root < 0 || root >= c->size)
        return molt_err(MOLT_EARG, "comm broadcast: root %d outside [0, %d)", root, c->size);
    double t0 = cm_now();
    c->seq++;
    int64_t bytes = c->rank == root ? (int64_t)(c->size - 1) * t->numel *
                                          (int64_t)ag_dtype_size(t->dtype) : 0;
    return timed_nccl(c, AG_COMM_BROADCAST, t0, bytes,
                      cm_nccl_broadcast(c, t->data, t->numel, t->dtype, root));
}

molt_status ag_comm_alltoallv_t(ag_comm *c, const ag_tensor *send, const int64_t *send_rows,
                                ag_tensor *recv, const int64_t *recv_rows) {
    MOLT_TRY(same_device(send, recv, "alltoallv"));
    if (!c)
        return molt_err(MOLT_EARG, "comm alltoallv: communicator is NULL");
    int64_t row = send->ndim > 0 && send->shape[0] > 0 ? send->numel / send->shape[0]
                  : recv->ndim > 0 && recv->shape[0] > 0 ? recv->numel / recv->shape[0] : 1;
    MOLT_TRY(check_rows(c, "send_rows", send_rows));
    MOLT_TRY(check_rows(c, "recv_rows", recv_rows));
    int64_t ns = 0, nr = 0, off = 0;
    for (int p = 0; p < c->size; p++) {
        ns += send_rows[p];
        nr += recv_rows[p];
        off += p == c->rank ? 0 : send_rows[p];
    }
    if (ns * row != send->numel || nr * row != recv->numel)
        return molt_err(MOLT_EARG, "comm alltoallv: %lld rows to send and %lld to receive of "
                        "%lld elements do not fill send (%lld) and recv (%lld)", (long long)ns,
                        (long long)nr, (long long)row, (long long)send->numel,
                        (long long)recv->numel);
    if (send->device != AG_CUDA)
        return ag_comm_alltoallv(c, send->data, send_rows, recv->data, recv_rows, row,
                                 send->dtype);
    MOLT_TRY(check_args(c, AG_COMM_ALLTOALLV, NULL, 0, send->dtype));
    double t0 = cm_now();
    c->seq++;
    return timed_nccl(c, AG_COMM_ALLTOALLV, t0, off * row * (int64_t)ag_dtype_size(send->dtype),
                      cm_nccl_alltoallv(c, send->data, send_rows, recv->data, recv_rows, row,
                                        send->dtype));
}
