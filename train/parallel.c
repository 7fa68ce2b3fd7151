// train/parallel.c: what `molt train` does across ranks (parallel.data x parallel.expert =
// the ranks of the world): the two groups every rank belongs to, which rows of a global
// batch a rank takes, the reduction of gradients (replicated adapter parameters over every
// rank, a shard of routed-expert LoRA over the replicas of that shard only), the gradient
// norm over all of them, and gathering shards into full tensors for checkpoints and files.
//
// Ranks are numbered d * expert + e: replica d (of parallel.data) holds expert block e (of
// parallel.expert). Every rank trains on its own rows of each batch, so the gradients of
// replicated parameters are summed over the world, and those of an expert shard over the
// ranks holding that shard (its owners in every replica: rows from every rank of a replica
// already reached the owner through the all-to-all). The loss of each rank is weighted by
// its share of the batch's target tokens, so these sums are the gradient of one process.
// Only trainable parameters travel. Not here: the loop (trainer.c), the collectives (comm/).
#include "trainer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../autograd/comm/comm.h"

#define BUCKET_FLOATS ((int64_t)1 << 22) // 16 MiB per reduction call

molt_status trn_par_init(trn_par *p, ag_comm *world, const trn_config *c) {
    memset(p, 0, sizeof *p);
    p->world = world;
    p->size = ag_comm_size(world);
    p->rank = ag_comm_rank(world);
    if (ag_comm_layout(p->size, c->par_expert, c->par_data, &p->data, &p->expert) != MOLT_OK)
        return molt_err_wrap(MOLT_EARG, "parallel");
    if (c->batch_size % p->size != 0)
        return molt_err(MOLT_EARG, "parallel: train.batch_size = %d rows do not split evenly "
                        "over %d ranks (each rank trains on batch_size / ranks rows)",
                        c->batch_size, p->size);
    p->d = p->rank / p->expert;
    p->e = p->rank % p->expert;
    ag_comm_set_timeout(world, c->par_timeout_s);
    if (p->size == 1)
        return MOLT_OK;
    // both splits are collectives of the world, in this order on every rank
    MOLT_TRY(ag_comm_split(world, p->d, p->e, "expert", &p->ep));
    return ag_comm_split(world, p->e, p->d, "data", &p->dp);
}

void trn_par_free(trn_par *p) {
    ag_comm_free(p->dp);
    ag_comm_free(p->ep);
    memset(p, 0, sizeof *p);
}

ag_comm *trn_par_experts(const trn_par *p) { return p->expert > 1 ? p->ep : NULL; }

void trn_par_rows(const trn_par *p, int rows, int rows_used, int *row0, int *n) {
    int per = rows / p->size, first = p->rank * per, last = first + per;
    if (last > rows_used)
        last = rows_used;
    *row0 = first;
    *n = last > first ? last - first : 0;
}

molt_status trn_par_sum(const trn_par *p, double *v, int n) {
    if (p->size == 1)
        return MOLT_OK;
    return ag_comm_allreduce(p->world, v, n, AG_F64, AG_COMM_SUM);
}

molt_status trn_par_any(const trn_par *p, bool *flag) {
    if (p->size == 1)
        return MOLT_OK;
    int32_t v = *flag;
    MOLT_TRY(ag_comm_allreduce(p->world, &v, 1, AG_I32, AG_COMM_MAX));
    *flag = v != 0;
    return MOLT_OK;
}

// Copies the window [off, off + len) of the concatenated gradients of the parameters with
// shard[k] == want into buf (in) or back out of it.
static void window(ag_tensor *const *params, const bool *shard, int n, bool want, int64_t off,
                   int64_t len, float *buf, bool in) {
    int64_t at = 0;
    for (int k = 0; k < n; k++) {
        if (shard[k] != want)
            continue;
        int64_t m = params[k]->numel, lo = off - at, hi = lo + len;
        if (hi > 0 && lo < m) {
            int64_t a = lo > 0 ? lo : 0, b = hi < m ? hi : m;
            float *g = (float *)params[k]->grad->data + a, *w = buf + (at + a - off);
            memcpy(in ? w : g, in ? g : w, (size_t)(b - a) * sizeof *buf);
        }
        at += m;
    }
}

// Sums the gradients of the parameters with shard[i] == want over comm, a bucket at a time;
// a missing gradient counts as zeros and is allocated (every rank ends with the same
// tensors, as one process would have them).
static molt_status reduce_set(ag_comm *comm, ag_tensor *const *params, const bool *shard,
                              int n, bool want) {
    int64_t total = 0;
    for (int k = 0; k < n; k++) {
        if (shard[k] != want)
            continue;
        if (!ag_grad_ensure(params[k]))
            return molt_err(MOLT_ENOMEM, "parallel: gradient of %s", params[k]->name);
        total += params[k]->numel;
    }
    float *buf = molt_malloc((size_t)(total < BUCKET_FLOATS ? (total ? total : 1)
                                                            : BUCKET_FLOATS) * sizeof *buf);
    if (!buf)
        return molt_err(MOLT_ENOMEM, "parallel: out of memory for the gradient buffer");
    molt_status st = MOLT_OK;
    for (int64_t off = 0; st == MOLT_OK && off < total; off += BUCKET_FLOATS) {
        int64_t len = total - off < BUCKET_FLOATS ? total - off : BUCKET_FLOATS;
        window(params, shard, n, want, off, len, buf, true);
        st = ag_comm_allreduce(comm, buf, len, AG_F32, AG_COMM_SUM);
        if (st == MOLT_OK)
            window(params, shard, n, want, off, len, buf, false);
    }
    molt_free(buf);
    return st;
}

molt_status trn_par_reduce_grads(const trn_par *p, ag_tensor *const *params, const bool *shard,
                                 int n) {
    if (p->size == 1)
        return MOLT_OK;
    MOLT_TRY(reduce_set(p->world, params, shard, n, false));
    // a shard's owners across replicas; with one replica the shard is already whole
    if (p->data > 1 || p->expert == 1)
        return reduce_set(p->expert > 1 ? p->dp : p->world, params, shard, n, true);
    for (int i = 0; i < n; i++) // (allocated alike, as reduce_set does)
        if (shard[i] && !ag_grad_ensure(params[i]))
            return molt_err(MOLT_ENOMEM, "parallel: gradient of %s", params[i]->name);
    return MOLT_OK;
}

molt_status trn_par_clip(const trn_par *p, ag_tensor *const *params, const bool *shard, int n,
                         double max_norm, double *total_norm) {
    double ss[2] = {0, 0}; // replicated, this rank's shards
    for (int i = 0; i < n; i++)
        if (params[i]->grad)
            ss[shard[i]] += opt_grad_sumsq(&params[i], 1);
    // the shards' squares over the expert group (each shard once)
    if (p->expert > 1)
        MOLT_TRY(ag_comm_allreduce(p->ep, &ss[1], 1, AG_F64, AG_COMM_SUM));
    float total = (float)sqrt(ss[0] + ss[1]);
    *total_norm = total;
    opt_clip_to(params, n, max_norm, total);
    return MOLT_OK;
}

bool trn_par_writes(const trn_par *p) { return p->rank == 0; }
bool trn_par_gathers(const trn_par *p) { return p->d == 0; }

molt_status trn_par_gather(const trn_par *p, const lora_adapter *ad, const lora_unit *u, bool b,
                           const float *local, float *full) {
    const ag_tensor *t = b ? u->b : u->a;
    if (!lora_unit_is_shard(ad, u)) {
        memcpy(full, local, (size_t)t->numel * sizeof *full);
        return MOLT_OK;
    }
    float *all = molt_malloc((size_t)(t->numel * p->expert) * sizeof *all);
    if (!all)
        return molt_err(MOLT_ENOMEM, "parallel: out of memory gathering %s", u->path);
    molt_status st = ag_comm_allgather(p->ep, local, all, t->numel, AG_F32);
    if (st == MOLT_OK)
        lora_full_from_shards(ad, u, b, all, full);
    molt_free(all);
    return st;
}

// VmHWM of this process in MiB (0 when /proc is not there).
static double vm_hwm_mib(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmHWM:", 6))
            kb = strtod(line + 6, NULL);
    if (f)
        fclose(f);
    return kb / 1024.0;
}

molt_status trn_par_report(const trn_par *p, FILE *f, double loop_s, int64_t steps) {
    enum { K = 4 };
    double mine[K] = {(double)molt_mem_peak() / (1024.0 * 1024.0), vm_hwm_mib(),
                      ag_comm_seconds_total(), loop_s};
    double *all = molt_calloc((size_t)K * (size_t)p->size, sizeof *all);
    if (!all)
        return molt_err(MOLT_ENOMEM, "train: report");
    molt_status st = p->size > 1 ? ag_comm_allgather(p->world, mine, all, K, AG_F64) : MOLT_OK;
    if (p->size == 1)
        memcpy(all, mine, sizeof mine);
    if (st == MOLT_OK && f) {
        fprintf(f, "molt train: memory per rank (MiB): molt's data at its peak / VmHWM:");
        for (int r = 0; r < p->size; r++)
            fprintf(f, " %d: %.1f / %.1f", r, all[K * r], all[K * r + 1]);
        fprintf(f, "\n");
        if (p->size > 1) {
            fprintf(f, "molt train: time in collectives per rank (of %.2f s for %lld steps):",
                    loop_s, (long long)steps);
            for (int r = 0; r < p->size; r++)
                fprintf(f, " %d: %.2f s (%.0f%%)", r, all[K * r + 2],
                        all[K * r + 3] > 0 ? 100 * all[K * r + 2] / all[K * r + 3] : 0.0);
            fprintf(f, "\n");
        }
    }
    molt_free(all);
    return st;
}
