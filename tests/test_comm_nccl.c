// tests/test_comm_nccl.c: the NCCL backend of the collectives (autograd/comm/comm.h) on
// tensors that live on a GPU: allreduce (sum, avg, max on f32, sum on bf16), allgather,
// reduce_scatter, broadcast and all-to-all with per-peer counts on one rank's communicator
// (one GPU holds one rank: NCCL refuses two ranks on one device), each result copied back and
// compared with the same collective on host tensors (the local backend); statistics counted;
// a host tensor and a device tensor in one call refused. Exit 77 (skipped) when the build has
// no NCCL or no GPU is visible.
#include <stdlib.h>
#include <string.h>

#include "autograd/comm/comm.h"
#include "harness/harness.h"

static ag_comm *g_comm;
static ag_arena g_ar;

static ag_tensor *host(ag_dtype dt, int64_t n, double base) {
    ag_tensor *t = ag_tensor_new1(&g_ar, dt, n);
    for (int64_t i = 0; i < n; i++)
        ag_set(t, i, base + (double)(i % 7) - 3);
    return t;
}

static ag_tensor *dev(const ag_tensor *t) {
    ag_tensor *d = ag_to_device((ag_tensor *)t, AG_CUDA);
    ck_assert_tensor(d);
    return d;
}

// d (on the GPU) equals h (host) element for element.
static void same(ag_tensor *d, const ag_tensor *h, const char *what) {
    ag_tensor *back = ag_to_device(d, AG_CPU);
    ck_assert_tensor(back);
    ck_assert_int_eq(back->numel, h->numel);
    for (int64_t i = 0; i < h->numel; i++)
        ck_assert_msg(ag_get(back, i) == ag_get(h, i), "%s [%lld]: %g vs %g", what, (long long)i,
                      ag_get(back, i), ag_get(h, i));
    ag_device_tensor_free(back);
}

START_TEST(allreduce) {
    ag_dtype dts[2] = {AG_F32, AG_BF16};
    ag_comm_op ops[3] = {AG_COMM_SUM, AG_COMM_AVG, AG_COMM_MAX};
    for (int a = 0; a < 2; a++)
        for (int o = 0; o < 3; o++) {
            if (dts[a] == AG_BF16 && ops[o] != AG_COMM_SUM)
                continue;
            ag_tensor *h = host(dts[a], 1000, 0.5), *d = dev(h);
            ck_assert_ok(ag_comm_allreduce_t(g_comm, d, ops[o]));
            ck_assert_ok(ag_comm_allreduce_t(g_comm, h, ops[o]));
            same(d, h, "allreduce");
            ag_device_tensor_free(d);
        }
}
END_TEST

START_TEST(gather_scatter_broadcast) {
    ag_tensor *s = host(AG_F32, 300, 1), *r = ag_tensor_new1(&g_ar, AG_F32, 300);
    ag_tensor *ds = dev(s), *dr = dev(r);
    ck_assert_ok(ag_comm_allgather_t(g_comm, ds, dr));
    same(dr, s, "allgather");
    ck_assert_ok(ag_comm_reduce_scatter_t(g_comm, ds, dr, AG_COMM_SUM));
    same(dr, s, "reduce_scatter");
    ck_assert_ok(ag_comm_broadcast_t(g_comm, ds, 0));
    same(ds, s, "broadcast");
    // mixed devices are refused
    ck_assert_int_eq(ag_comm_allgather_t(g_comm, s, dr), MOLT_EARG);
    ag_device_tensor_free(ds);
    ag_device_tensor_free(dr);
}
END_TEST

START_TEST(alltoallv) {
    ag_tensor *s = ag_tensor_new2(&g_ar, AG_F32, 5, 4);
    for (int64_t i = 0; i < s->numel; i++)
        ag_set(s, i, (double)i);
    ag_tensor *r = ag_tensor_new2(&g_ar, AG_F32, 5, 4);
    ag_tensor *ds = dev(s), *dr = dev(r);
    int64_t rows = 5;
    ck_assert_ok(ag_comm_alltoallv_t(g_comm, ds, &rows, dr, &rows));
    same(dr, s, "alltoallv");
    ag_comm_stat st[AG_COMM_KIND_COUNT];
    ag_comm_stats(g_comm, st);
    ck_assert_int_ge(st[AG_COMM_ALLTOALLV].calls, 1);
    ag_device_tensor_free(ds);
    ag_device_tensor_free(dr);
}
END_TEST

int main(void) {
    ag_device_info info;
    ag_device_query(&info);
    if (!ag_comm_have_nccl() || info.cuda_devices < 1) {
        fprintf(stderr, "test_comm_nccl: %s: skipped\n",
                ag_comm_have_nccl() ? "no GPU visible" : "this build has no NCCL");
        return 77;
    }
    // CUDA is already initialized here: tests run in this process, not in forked children
    setenv("CK_FORK", "no", 1);
    if (ag_comm_local(&g_comm) != MOLT_OK)
        return 1;
    ag_arena_init(&g_ar, "nccl test", 0);
    Suite *s = suite_create("comm_nccl");
    TCase *tc = tcase_create("nccl");
    tcase_add_test(tc, allreduce);
    tcase_add_test(tc, gather_scatter_broadcast);
    tcase_add_test(tc, alltoallv);
    suite_add_tcase(s, tc);
    int rc = harness_run(s);
    ag_arena_free(&g_ar);
    ag_comm_free(g_comm);
    return rc;
}
