// autograd/comm/comm.h: collectives across processes and GPUs, the public API of
// autograd/comm/. A communicator (ag_comm) is a group of ranks; the world holds every process
// of the job and ag_comm_split carves groups out of it (the ranks of one expert group, the
// replicas of one expert shard). Backends:
//   local  one process: every collective is a copy (what a run without a launcher gets);
//   mpi    OpenMPI or any MPI-3 library, host buffers, any number of hosts (mpirun, srun);
//   nccl   device buffers (CUDA), its unique id broadcast over MPI; compiled when NCCL is
//          found, used for tensors that live on a GPU.
// The world picks the backend itself: under a launcher (mpirun, srun) MPI for host tensors
// and NCCL for device tensors; alone, local. Collectives: allreduce (sum, avg, max),
// allgather, reduce_scatter, broadcast, all-to-all with per-peer row counts, barrier, on f32,
// bf16 (f64 and i32 too; a bf16 sum rounds each partial sum to bf16, as NCCL does).
//
// No collective waits forever: each one that has waited longer than the communicator's
// timeout returns MOLT_EIO with a message naming the collective, its sequence number, and the
// ranks that did not arrive (each rank tells the others when it enters a collective, so the
// waiting ones know who is missing; a rank that entered another collective at that point is
// named too). The command that gets such an error ends the whole job with ag_comm_abort.
//
// Every communicator counts its collectives' calls, seconds and bytes (what this rank sends)
// for MOLT_PROFILE (ag_comm_profile_print). Not here: which tensors are exchanged (the
// expert-parallel ops in autograd.h, the trainer's gradient reduction).
#ifndef MOLT_AUTOGRAD_COMM_H
#define MOLT_AUTOGRAD_COMM_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "../autograd.h"

typedef enum { AG_COMM_LOCAL, AG_COMM_MPI, AG_COMM_NCCL, AG_COMM_BACKEND_COUNT } ag_comm_backend;
typedef enum { AG_COMM_SUM, AG_COMM_AVG, AG_COMM_MAX } ag_comm_op;
// The collectives, for statistics.
typedef enum {
    AG_COMM_ALLREDUCE,
    AG_COMM_ALLGATHER,
    AG_COMM_REDUCE_SCATTER,
    AG_COMM_BROADCAST,
    AG_COMM_ALLTOALLV,
    AG_COMM_BARRIER,
    AG_COMM_KIND_COUNT
} ag_comm_kind;

#define AG_COMM_TIMEOUT_DEFAULT 300.0 // seconds (parallel.timeout_s)

typedef struct ag_comm ag_comm;

const char *ag_comm_backend_name(ag_comm_backend b); // "local", "mpi", "nccl"
const char *ag_comm_kind_name(ag_comm_kind k);       // "allreduce", ...
// Whether this build has MPI, NCCL.
bool ag_comm_have_mpi(void);
bool ag_comm_have_nccl(void);
// The number of processes a launcher started (OMPI_COMM_WORLD_SIZE, PMI_SIZE, PMIX_SIZE,
// SLURM_NTASKS under srun), 1 when none did.
int ag_comm_launched_size(void);
// The layout parallel.data x parallel.expert of a job of `ranks`: *e = expert (0: 1), *d =
// data (0: ranks / *e). MOLT_EARG when *e does not divide the ranks or *d x *e differs from
// them (the message names the keys).
molt_status ag_comm_layout(int ranks, int expert, int data, int *d, int *e);

// The world: under a launcher with more than one process, initializes MPI (once per process;
// the world is shared, freeing the last reference finalizes MPI) and returns an MPI world;
// otherwise a local world of one rank. timeout_s > 0 (else the default). MOLT_EUNSUPPORTED
// when launched with several processes by a build without MPI.
molt_status ag_comm_world(double timeout_s, ag_comm **out);
// A local communicator of one rank (tests, single-process runs).
molt_status ag_comm_local(ag_comm **out);
// Collective over parent: the ranks passing the same color form one new communicator, ranked
// by key (ties by parent rank). `name` labels it in messages ("expert", "data").
molt_status ag_comm_split(ag_comm *parent, int color, int key, const char *name, ag_comm **out);
// Frees c (not collective); NULL is fine.
void ag_comm_free(ag_comm *c);

int ag_comm_rank(const ag_comm *c);
int ag_comm_size(const ag_comm *c);
// World rank of rank r of c (for messages).
int ag_comm_world_rank(const ag_comm *c, int r);
const char *ag_comm_name(const ag_comm *c);
ag_comm_backend ag_comm_backend_of(const ag_comm *c);
double ag_comm_timeout(const ag_comm *c);
void ag_comm_set_timeout(ag_comm *c, double timeout_s);

// Host buffers (dtype F32, F64, BF16 or I32; BF16 and I32 allreduce: sum and max only for
// I32). n elements; every rank passes the same n and dtype.
// buf[0..n) = op over ranks of buf, in place.
molt_status ag_comm_allreduce(ag_comm *c, void *buf, int64_t n, ag_dtype dt, ag_comm_op op);
// recv[r*n .. r*n+n) = rank r's send[0..n); recv holds size*n.
molt_status ag_comm_allgather(ag_comm *c, const void *send, void *recv, int64_t n, ag_dtype dt);
// recv[0..n) = op over ranks of their send[rank*n .. rank*n+n); send holds size*n.
molt_status ag_comm_reduce_scatter(ag_comm *c, const void *send, void *recv, int64_t n,
                                   ag_dtype dt, ag_comm_op op);
// buf[0..n) = root's buf.
molt_status ag_comm_broadcast(ag_comm *c, void *buf, int64_t n, ag_dtype dt, int root);
// All-to-all in rows of `row` elements: this rank sends send_rows[p] rows to rank p (taken in
// rank order from send) and receives recv_rows[p] rows from rank p (stored in rank order in
// recv); recv_rows[p] must equal what p sends here (ag_comm_alltoall_counts tells). Empty
// pairs move nothing.
molt_status ag_comm_alltoallv(ag_comm *c, const void *send, const int64_t *send_rows,
                              void *recv, const int64_t *recv_rows, int64_t row, ag_dtype dt);
// recv_rows[p] = the send_rows[rank] of rank p (one small all-to-all).
molt_status ag_comm_alltoall_counts(ag_comm *c, const int64_t *send_rows, int64_t *recv_rows);
molt_status ag_comm_barrier(ag_comm *c);

// The same on tensors: host tensors go through the communicator's backend, device tensors
// through NCCL (MOLT_EUNSUPPORTED in a build without it). Shapes: allreduce and broadcast in
// place; allgather recv numel = size * send numel; reduce_scatter send numel = size * recv
// numel; alltoallv over rows (the first dimension).
molt_status ag_comm_allreduce_t(ag_comm *c, ag_tensor *t, ag_comm_op op);
molt_status ag_comm_allgather_t(ag_comm *c, const ag_tensor *send, ag_tensor *recv);
molt_status ag_comm_reduce_scatter_t(ag_comm *c, const ag_tensor *send, ag_tensor *recv,
                                     ag_comm_op op);
molt_status ag_comm_broadcast_t(ag_comm *c, ag_tensor *t, int root);
molt_status ag_comm_alltoallv_t(ag_comm *c, const ag_tensor *send, const int64_t *send_rows,
                                ag_tensor *recv, const int64_t *recv_rows);

// Statistics of c since its creation (or the last reset): per collective.
typedef struct {
    int64_t calls;
    double seconds; // wall time inside the collective (waiting included)
    int64_t bytes;  // bytes this rank sent to other ranks (the payload; copies to itself not
                    // counted)
} ag_comm_stat;
void ag_comm_stats(const ag_comm *c, ag_comm_stat out[AG_COMM_KIND_COUNT]);
void ag_comm_stats_reset(ag_comm *c);
// Seconds spent in collectives over every communicator of this process (for the split of a
// step's time into compute and communication).
double ag_comm_seconds_total(void);
// One line per collective used: "comm: <name> <op> calls seconds MiB".
void ag_comm_profile_print(const ag_comm *c, FILE *f);

// Ends the whole job (MPI_Abort on an MPI world; exit(code) otherwise) after printing
// `why` to stderr with this rank's number. For commands, after an error a rank cannot
// recover from: the other ranks would otherwise wait in their next collective.
void ag_comm_abort(ag_comm *c, int code, const char *why);

#endif
