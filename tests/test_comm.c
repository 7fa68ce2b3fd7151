// tests/test_comm.c: the collectives (autograd/comm/comm.h). Run as one process it checks
// the local backend, argument errors and the statistics, then starts itself as 2 and as 4
// MPI ranks (tests/harness/mpi_env.h), where every rank checks each collective against
// values it computes itself from the ranks' known inputs: allreduce (sum, avg, max) on f32,
// f64, bf16 and i32, allgather, reduce_scatter, broadcast from the last rank, all-to-all with
// per-peer counts (empty pairs included), split groups, the bytes counted, and the timeout:
// a barrier that one rank enters late fails on the others within the timeout, naming the late
// rank. Exit 77 when no launcher is available is not used: the single-process cases still
// run, and the multi-rank cases are then reported as skipped in the log.
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "autograd/comm/comm.h"
#include "harness/harness.h"
#include "harness/mpi_env.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ---- one process ------------------------------------------------------------------------

START_TEST(local_world) {
    ag_comm *w;
    ck_assert_ok(ag_comm_world(0, &w));
    ck_assert_int_eq(ag_comm_size(w), 1);
    ck_assert_int_eq(ag_comm_rank(w), 0);
    ck_assert_int_eq(ag_comm_backend_of(w), AG_COMM_LOCAL);
    ck_assert(ag_comm_timeout(w) == AG_COMM_TIMEOUT_DEFAULT);
    float x[3] = {1, 2, 3}, g[3];
    ck_assert_ok(ag_comm_allreduce(w, x, 3, AG_F32, AG_COMM_AVG));
    ck_assert(x[0] == 1 && x[2] == 3);
    ck_assert_ok(ag_comm_allgather(w, x, g, 3, AG_F32));
    ck_assert(g[1] == 2);
    int64_t s = 3, r = 0;
    ck_assert_ok(ag_comm_alltoall_counts(w, &s, &r));
    ck_assert_int_eq(r, 3);
    float y[6] = {0};
    int64_t rows = 2;
    ck_assert_ok(ag_comm_alltoallv(w, g, &rows, y, &rows, 1, AG_F32));
    ck_assert(y[0] == 1 && y[1] == 2 && y[2] == 0);
    ck_assert_ok(ag_comm_barrier(w));
    ag_comm *sub;
    ck_assert_ok(ag_comm_split(w, 0, 0, "sub", &sub));
    ck_assert_int_eq(ag_comm_size(sub), 1);
    ck_assert_str_eq(ag_comm_name(sub), "sub");
    ag_comm_stat st[AG_COMM_KIND_COUNT];
    ag_comm_stats(w, st);
    ck_assert_int_eq(st[AG_COMM_ALLREDUCE].calls, 1);
    ck_assert_int_eq(st[AG_COMM_ALLREDUCE].bytes, 0); // nothing leaves a lone rank
    ag_comm_free(sub);
    ag_comm_free(w);
}
END_TEST

START_TEST(bad_arguments) {
    ag_comm *w;
    ck_assert_ok(ag_comm_local(&w));
    float x[2] = {0};
    ck_assert_int_eq(ag_comm_allreduce(w, x, -1, AG_F32, AG_COMM_SUM), MOLT_EARG);
    ck_assert_int_eq(ag_comm_allreduce(w, NULL, 2, AG_F32, AG_COMM_SUM), MOLT_EARG);
    ck_assert_int_eq(ag_comm_allreduce(w, x, 2, AG_F16, AG_COMM_SUM), MOLT_EARG);
    ck_assert(strstr(molt_err_msg(), "dtype f16"));
    ck_assert_int_eq(ag_comm_allreduce(w, x, 2, AG_I32, AG_COMM_AVG), MOLT_EARG);
    ck_assert_int_eq(ag_comm_broadcast(w, x, 2, AG_F32, 1), MOLT_EARG);
    ck_assert(strstr(molt_err_msg(), "root 1"));
    int64_t a = 1, b = 2;
    ck_assert_int_eq(ag_comm_alltoallv(w, x, &a, x, &b, 1, AG_F32), MOLT_EARG);
    int64_t neg = -1;
    ck_assert_int_eq(ag_comm_alltoallv(w, x, &neg, x, &neg, 1, AG_F32), MOLT_EARG);
    ck_assert_int_eq(ag_comm_split(w, -1, 0, "x", &(ag_comm *){NULL}), MOLT_EARG);
    ag_arena ar;
    ag_arena_init(&ar, "t", 0);
    ag_tensor *s = ag_tensor_new1(&ar, AG_F32, 3), *r = ag_tensor_new1(&ar, AG_F32, 2);
    ck_assert_int_eq(ag_comm_allgather_t(w, s, r), MOLT_EARG);
    ck_assert(strstr(molt_err_msg(), "recv holds 2 elements"));
    ag_arena_free(&ar);
    ag_comm_free(w);
}
END_TEST

START_TEST(two_ranks) { mpi_env_run_self("test_comm", 2); }
END_TEST
START_TEST(four_ranks) { mpi_env_run_self("test_comm", 4); }
END_TEST

// ---- as one of several ranks ---------------------------------------------------------------

static ag_comm *g_world;

START_TEST(mpi_allreduce) {
    ag_comm *w = g_world;
    int P = ag_comm_size(w), me = ag_comm_rank(w);
    ck_assert_int_eq(ag_comm_backend_of(w), AG_COMM_MPI);
    ck_assert_int_gt(P, 1);
    enum { N = 1000 };
    float f[N];
    double d[N];
    int32_t i[N];
    uint16_t b[N];
    for (int k = 0; k < N; k++) {
        f[k] = (float)(me + 1) * (float)k;
        d[k] = (me + 1) * 0.5 + k;
        i[k] = me * 1000 + k;
        b[k] = ag_f32_to_bf16((float)(me + 1));
    }
    ck_assert_ok(ag_comm_allreduce(w, f, N, AG_F32, AG_COMM_SUM));
    ck_assert_ok(ag_comm_allreduce(w, d, N, AG_F64, AG_COMM_AVG));
    ck_assert_ok(ag_comm_allreduce(w, i, N, AG_I32, AG_COMM_MAX));
    ck_assert_ok(ag_comm_allreduce(w, b, N, AG_BF16, AG_COMM_SUM));
    double tri = P * (P + 1) / 2.0;
    for (int k = 0; k < N; k++) {
        ck_assert_msg(f[k] == (float)(tri * k), "f32 sum [%d] = %g", k, (double)f[k]);
        ck_assert_msg(fabs(d[k] - ((P + 1) * 0.25 + k)) < 1e-12, "f64 avg [%d] = %g", k, d[k]);
        ck_assert_int_eq(i[k], (P - 1) * 1000 + k);
        ck_assert(ag_bf16_to_f32(b[k]) == (float)tri); // small integers are exact in bf16
    }
    ag_comm_stat st[AG_COMM_KIND_COUNT];
    ag_comm_stats(w, st);
    ck_assert_int_ge(st[AG_COMM_ALLREDUCE].calls, 4);
    ck_assert_int_ge(st[AG_COMM_ALLREDUCE].bytes, N * (4 + 8 + 4 + 2));
}
END_TEST

START_TEST(mpi_gather_scatter_broadcast) {
    ag_comm *w = g_world;
    int P = ag_comm_size(w), me = ag_comm_rank(w);
    float mine[3] = {me, me + 0.5f, -me}, all[3 * 8];
    ck_assert_ok(ag_comm_allgather(w, mine, all, 3, AG_F32));
    for (int r = 0; r < P; r++)
        ck_assert(all[3 * r] == r && all[3 * r + 1] == r + 0.5f && all[3 * r + 2] == -r);
    // reduce_scatter: block b of every rank is (rank + b); rank b gets the sum over ranks
    float send[2 * 8], recv[2];
    for (int blk = 0; blk < P; blk++)
        send[2 * blk] = send[2 * blk + 1] = (float)(me + blk);
    ck_assert_ok(ag_comm_reduce_scatter(w, send, recv, 2, AG_F32, AG_COMM_SUM));
    float want = (float)(P * (P - 1) / 2 + P * me);
    ck_assert(recv[0] == want && recv[1] == want);
    double v[4] = {me, me, me, me};
    ck_assert_ok(ag_comm_broadcast(w, v, 4, AG_F64, P - 1));
    ck_assert(v[0] == P - 1 && v[3] == P - 1);
    ck_assert_ok(ag_comm_barrier(w));
}
END_TEST

// Rank s sends (s + p) % 3 rows to rank p (0 rows for some pairs); a row holds (s, p, j).
START_TEST(mpi_alltoallv) {
    ag_comm *w = g_world;
    int P = ag_comm_size(w), me = ag_comm_rank(w);
    int64_t sr[8], rr[8], rr2[8], ns = 0, nr = 0;
    for (int p = 0; p < P; p++) {
        sr[p] = (me + p) % 3;
        rr[p] = (p + me) % 3;
        ns += sr[p];
        nr += rr[p];
    }
    ck_assert_ok(ag_comm_alltoall_counts(w, sr, rr2));
    for (int p = 0; p < P; p++)
        ck_assert_int_eq(rr2[p], rr[p]);
    ag_arena ar;
    ag_arena_init(&ar, "t", 0);
    ag_tensor *s = ag_tensor_new2(&ar, AG_F32, ns ? ns : 1, 3);
    ag_tensor *r = ag_tensor_new2(&ar, AG_F32, nr ? nr : 1, 3);
    float *ps = s->data;
    for (int p = 0, k = 0; p < P; p++)
        for (int j = 0; j < sr[p]; j++, k++) {
            ps[3 * k] = (float)me;
            ps[3 * k + 1] = (float)p;
            ps[3 * k + 2] = (float)j;
        }
    s->shape[0] = ns;
    s->numel = 3 * ns;
    r->shape[0] = nr;
    r->numel = 3 * nr;
    ck_assert_ok(ag_comm_alltoallv_t(w, s, sr, r, rr));
    const float *pr = r->data;
    for (int p = 0, k = 0; p < P; p++)
        for (int j = 0; j < rr[p]; j++, k++)
            ck_assert_msg(pr[3 * k] == p && pr[3 * k + 1] == me && pr[3 * k + 2] == j,
                          "row %d from rank %d: (%g, %g, %g)", k, p, (double)pr[3 * k],
                          (double)pr[3 * k + 1], (double)pr[3 * k + 2]);
    ag_arena_free(&ar);
}
END_TEST

// Groups of ranks with the same parity; sums inside each group only.
START_TEST(mpi_split) {
    ag_comm *w = g_world, *g;
    int P = ag_comm_size(w), me = ag_comm_rank(w);
    ck_assert_ok(ag_comm_split(w, me % 2, me, "parity", &g));
    int n = (P + 1 - me % 2) / 2;
    ck_assert_int_eq(ag_comm_size(g), n);
    ck_assert_int_eq(ag_comm_rank(g), me / 2);
    ck_assert_int_eq(ag_comm_world_rank(g, ag_comm_rank(g)), me);
    int32_t x = me;
    ck_assert_ok(ag_comm_allreduce(g, &x, 1, AG_I32, AG_COMM_SUM));
    int want = 0;
    for (int r = me % 2; r < P; r += 2)
        want += r;
    ck_assert_int_eq(x, want);
    ag_comm_free(g);
}
END_TEST

// The last rank enters a barrier 3 s late; the others wait at most 1 s and must fail naming
// it. The barrier runs on a communicator of its own, freed once the late rank has arrived
// (the timed-out requests complete then).
START_TEST(mpi_timeout_names_the_late_rank) {
    ag_comm *w = g_world, *g;
    int P = ag_comm_size(w), me = ag_comm_rank(w);
    ck_assert_ok(ag_comm_split(w, 0, me, "late", &g));
    ag_comm_set_timeout(g, 1.0);
    double t0 = now_s();
    if (me == P - 1) {
        sleep(3);
        ag_comm_set_timeout(g, 30.0);
        ck_assert_ok(ag_comm_barrier(g)); // the others' barrier requests are still posted
    } else {
        molt_status st = ag_comm_barrier(g);
        double waited = now_s() - t0;
        ck_assert_int_eq(st, MOLT_EIO);
        char want[64];
        snprintf(want, sizeof want, "ranks that did not arrive: %d", P - 1);
        ck_assert_msg(strstr(molt_err_msg(), want), "message: %s", molt_err_msg());
        ck_assert_msg(strstr(molt_err_msg(), "barrier #1 on 'late'"), "message: %s",
                      molt_err_msg());
        ck_assert_msg(waited >= 1.0 && waited < 2.9, "waited %.2f s", waited);
    }
    ck_assert_ok(ag_comm_barrier(w));
    sleep(1); // the late notices and barrier requests of 'late' complete
    ag_comm_free(g);
}
END_TEST

int main(void) {
    if (mpi_env_is_rank()) {
        if (ag_comm_world(60, &g_world) != MOLT_OK) {
            fprintf(stderr, "test_comm: %s\n", molt_err_msg());
            return 1;
        }
        Suite *s = suite_create("comm (ranks)");
        TCase *tc = tcase_create("mpi");
        tcase_set_timeout(tc, 120);
        tcase_add_test(tc, mpi_allreduce);
        tcase_add_test(tc, mpi_gather_scatter_broadcast);
        tcase_add_test(tc, mpi_alltoallv);
        tcase_add_test(tc, mpi_split);
        tcase_add_test(tc, mpi_timeout_names_the_late_rank);
        suite_add_tcase(s, tc);
        int rc = harness_run(s);
        ag_comm_free(g_world);
        return rc;
    }
    Suite *s = suite_create("comm");
    TCase *tc = tcase_create("local");
    tcase_add_test(tc, local_world);
    tcase_add_test(tc, bad_arguments);
    suite_add_tcase(s, tc);
    TCase *tm = tcase_create("launch");
    tcase_set_timeout(tm, 300);
    tcase_add_test(tm, two_ranks);
    tcase_add_test(tm, four_ranks);
    suite_add_tcase(s, tm);
    return harness_run(s);
}
