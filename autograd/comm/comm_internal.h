// autograd/comm/comm_internal.h: what the communicator's front (comm.c) shares with its
// backends (comm_mpi.c, comm_nccl.c): the struct, the backend calls and the arrival notices
// behind the timeout messages. Not part of the public API (comm.h).
#ifndef MOLT_AUTOGRAD_COMM_INTERNAL_H
#define MOLT_AUTOGRAD_COMM_INTERNAL_H

#include "comm.h"

struct ag_comm {
    ag_comm_backend backend; // of host buffers: local or mpi
    char name[32];
    int rank, size;
    int *world_ranks;        // [size] world rank of each rank
    double timeout_s;
    int64_t seq;             // collectives entered so far (the number in messages)
    ag_comm_stat stat[AG_COMM_KIND_COUNT];
    void *mpi;               // comm_mpi.c's state (NULL for local)
    void *nccl;              // comm_nccl.c's state, made on first use of a device tensor
    bool world;              // the process's world (freed last; finalizes MPI)
};

// ---- MPI backend (comm_mpi.c; stubs answering MOLT_EUNSUPPORTED without MPI) ----------
// Initializes MPI when needed and fills c as the MPI world.
molt_status cm_mpi_world(ag_comm *c);
molt_status cm_mpi_split(ag_comm *parent, int color, int key, ag_comm *out);
void cm_mpi_free(ag_comm *c);
// Each waits for completion through cm_mpi_wait's polling (timeout, arrival notices).
molt_status cm_mpi_allreduce(ag_comm *c, void *buf, int64_t n, ag_dtype dt, ag_comm_op op);
molt_status cm_mpi_allgather(ag_comm *c, const void *send, void *recv, int64_t n, ag_dtype dt);
molt_status cm_mpi_reduce_scatter(ag_comm *c, const void *send, void *recv, int64_t n,
                                  ag_dtype dt, ag_comm_op op);
molt_status cm_mpi_broadcast(ag_comm *c, void *buf, int64_t n, ag_dtype dt, int root);
molt_status cm_mpi_alltoallv(ag_comm *c, const void *send, const int64_t *send_rows, void *recv,
                             const int64_t *recv_rows, int64_t row, ag_dtype dt);
molt_status cm_mpi_alltoall_counts(ag_comm *c, const int64_t *send_rows, int64_t *recv_rows);
molt_status cm_mpi_barrier(ag_comm *c);
void cm_mpi_abort(int code);
// Arrival notices around a collective whose completion the caller polls itself (NCCL):
// cm_mpi_notice_begin tells every peer that this rank entered collective (seq, kind);
// cm_mpi_notice_poll reports MOLT_EIO naming a peer that entered another collective, and
// with timed_out set, the peers whose notice has not come (the timeout message);
// cm_mpi_notice_end waits for every notice (bounded by the timeout).
molt_status cm_mpi_notice_begin(ag_comm *c, ag_comm_kind kind);
molt_status cm_mpi_notice_poll(ag_comm *c, ag_comm_kind kind, bool timed_out, double waited);
molt_status cm_mpi_notice_end(ag_comm *c, ag_comm_kind kind, double t0);

// ---- NCCL backend (comm_nccl.c; stubs without NCCL) -----------------------------------
molt_status cm_nccl_allreduce(ag_comm *c, void *buf, int64_t n, ag_dtype dt, ag_comm_op op);
molt_status cm_nccl_allgather(ag_comm *c, const void *send, void *recv, int64_t n, ag_dtype dt);
molt_status cm_nccl_reduce_scatter(ag_comm *c, const void *send, void *recv, int64_t n,
                                   ag_dtype dt, ag_comm_op op);
molt_status cm_nccl_broadcast(ag_comm *c, void *buf, int64_t n, ag_dtype dt, int root);
molt_status cm_nccl_alltoallv(ag_comm *c, const void *send, const int64_t *send_rows,
                              void *recv, const int64_t *recv_rows, int64_t row, ag_dtype dt);
void cm_nccl_free(ag_comm *c);

// Shared by the backends.
double cm_now(void);
// Sleeps a little longer the longer a wait has lasted (spins, then yields, then up to 1 ms):
// oversubscribed ranks must leave the cores to the ranks they wait for.
void cm_backoff(int64_t iter);
// "ranks 2 (world 6), 3 (world 7)" of the ranks whose flag is false.
void cm_rank_list(const ag_comm *c, const bool *arrived, char *buf, size_t cap);
// "allreduce #57 on 'expert'" into buf.
const char *cm_what(const ag_comm *c, ag_comm_kind kind, char *buf, size_t cap);

#endif
