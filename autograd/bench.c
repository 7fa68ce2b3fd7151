// autograd/bench.c: `molt bench ops`: forward and backward throughput of ag_linear,
// ag_attention and the fused loss ag_cross_entropy_linear (optimized CPU kernels, f32) next
// to plain ag_blas_sgemm measured in the same run, printed as a table; then the tables of the
// batch-invariant inference products (bench_bi.c). Not here: end-to-end model benchmarks or
// the CUDA kernels.
#include "bench_util.h"
#include "internal.h"

#include "cpu/k_blas.h"
#include <math.h>
#include <stdio.h>

#define CMD "molt bench ops"

typedef struct {
    const char *op, *pass;
    char shape[48];
    double seconds, flops, sgemm_gflops;
} bench_row;

typedef struct {
    int64_t T, in, out;
} linear_size;

typedef struct {
    int64_t T, H, Dqk, Dv;
} attn_size;

typedef struct {
    int64_t T, C, V;
} ce_size;

static const linear_size linear_full[] = {{512, 1024, 1024}, {512, 2048, 512}, {2048, 4096, 1024}};
static const linear_size linear_quick[] = {{64, 128, 96}, {48, 64, 160}};
static const attn_size attn_full[] = {{512, 8, 192, 128}, {1024, 8, 192, 128}};
static const attn_size attn_quick[] = {{64, 2, 24, 16}, {96, 3, 12, 8}};
// the loss over the 131072-token vocabulary at the hidden sizes of the small and tiny presets
static const ce_size ce_full[] = {{512, 512, 131072}, {512, 32, 131072}};
static const ce_size ce_quick[] = {{16, 8, 300}};
// vocabulary columns per chunk, as the model uses
#define BENCH_CE_CHUNK 8192

static void usage(FILE *f) {
    fprintf(f, "usage: " CMD " [--device cpu|cuda] [--threads N] [--repeat R] [--quick]\n\n"
               "--device cuda: the GPU's tables instead (linear through cuBLASLt against\n"
               "cublasGemmEx, the NF4 linear against cuBLAS bf16 on the decoded matrix, the NF4\n"
               "decode GEMV in GB/s against a device-to-device copy).\n\n"
               "Times ag_linear, ag_attention and ag_cross_entropy_linear (f32, optimized CPU\n"
               "kernels), forward and backward, and ag_blas_sgemm on matching shapes in the\n"
               "same run. Then the batch-invariant inference products (F32 and NF4 weights):\n"
               "decode (T = 1, 8, 32) in GB/s of weight bytes against a plain read of as many\n"
               "bytes, prefill (T = 128, 512) in GFLOP/s against ag_blas_sgemm.\n\n");
    ag_bench_usage_opts(f);
}

static void fill_f32(float *p, int64_t n, ag_rng *r, double amp) {
    for (int64_t i = 0; i < n; i++)
        p[i] = (float)(amp * (2 * ag_rng_uniform(r) - 1));
}

static ag_tensor *rand_tensor(ag_arena *a, ag_rng *r, int ndim, const int64_t *shape,
                              double amp) {
    ag_tensor *t = ag_tensor_new(a, AG_F32, ndim, shape);
    if (t) {
        fill_f32(t->data, t->numel, r, amp);
        t->requires_grad = true;
    }
    return t;
}

// C = A B^T on random f32 data, A (M, K), B (N, K): the baseline of a row.
typedef struct {
    int64_t M, N, K;
    float *a, *b, *c;
} sgemm_job;

static molt_status sgemm_job_init(sgemm_job *j, int64_t M, int64_t N, int64_t K) {
    *j = (sgemm_job){M, N, K, NULL, NULL, NULL};
    j->a = molt_malloc((size_t)(M * K + N * K + M * N) * sizeof(float));
    if (!j->a)
        return molt_err(MOLT_ENOMEM, "bench: out of memory for a %lldx%lldx%lld sgemm",
                        (long long)M, (long long)N, (long long)K);
    j->b = j->a + M * K;
    j->c = j->b + N * K;
    ag_rng r;
    ag_rng_seed(&r, 3);
    fill_f32(j->a, M * K + N * K, &r, 1);
    return MOLT_OK;
}

static double sgemm_job_run(const sgemm_job *j) {
    double t0 = ag_bench_now();
    ag_blas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)j->M, (int)j->N, (int)j->K, 1,
                j->a, (int)j->K, j->b, (int)j->K, 0, j->c, (int)j->N);
    return ag_bench_now() - t0;
}

typedef ag_tensor *(*bench_build_fn)(ag_ctx *c, ag_tensor **in);
typedef molt_status (*bench_bwd_fn)(ag_ctx *c, ag_node *n);

// The parts of one timed run (run_op), in the order they run.
enum { PART_FWD, PART_BWD, PART_SGEMM, N_PARTS };

typedef struct {
    ag_ctx c;
    ag_rng r; // the output gradients
    ag_tensor **in;
    bench_build_fn build;
    bench_bwd_fn bwd;
    const sgemm_job *job;
} bench_op;

// One run: build() with grad mode on, the op's own backward rule on a random output
// gradient (no loss op in between), then the baseline sgemm, so that all three see the same
// machine conditions.
static molt_status run_op(void *user, double *t) {
    bench_op *b = user;
    ag_ctx *c = &b->c;
    ag_ctx_step_reset(c);
    double t0 = ag_bench_now();
    ag_tensor *y = b->build(c, b->in);
    double t1 = ag_bench_now();
    if (!y)
        return MOLT_EARG;
    ag_tensor *g = c->n_tape > 0 && c->tape[c->n_tape - 1]->out == y ? ag_grad_ensure(y) : NULL;
    if (!g)
        return molt_err(MOLT_EINTERNAL, "bench: the op recorded no node");
    fill_f32(g->data, g->numel, &b->r, 1);
    double t2 = ag_bench_now();
    MOLT_TRY(b->bwd(c, c->tape[c->n_tape - 1]));
    double t3 = ag_bench_now();
    t[PART_FWD] = t1 - t0;
    t[PART_BWD] = t3 - t2;
    t[PART_SGEMM] = sgemm_job_run(b->job);
    return MOLT_OK;
}

// The best seconds of each part over o->repeat runs after one warm-up, in bt[N_PARTS].
static molt_status time_op(const ag_bench_opts *o, ag_tensor **in, bench_build_fn build,
                           bench_bwd_fn bwd, const sgemm_job *job, double *bt) {
    bench_op b = {.in = in, .build = build, .bwd = bwd, .job = job};
    ag_ctx_init(&b.c);
    ag_rng_seed(&b.r, 11);
    molt_status st = ag_bench_best_of(o, run_op, &b, N_PARTS, bt);
    ag_ctx_free(&b.c);
    return st;
}

static ag_tensor *build_linear(ag_ctx *c, ag_tensor **in) { return ag_linear(c, in[0], in[1]); }

static ag_tensor *build_attention(ag_ctx *c, ag_tensor **in) {
    double scale = 1 / sqrt((double)in[0]->shape[2]);
    return ag_attention(c, in[0], in[1], in[2], in[3], NULL, scale);
}

static ag_tensor *build_ce(ag_ctx *c, ag_tensor **in) {
    return ag_cross_entropy_linear(c, in[0], in[1], in[2], NULL, BENCH_CE_CHUNK);
}

// The fused loss with w frozen (an adapter's case): the forward also computes the gradient
// to h (two GEMMs per chunk), the backward only scales it.
static molt_status bench_ce(const ag_bench_opts *o, ce_size s, bench_row *rows) {
    ag_arena p;
    ag_arena_init(&p, "bench", 0);
    ag_rng r;
    ag_rng_seed(&r, 4);
    int64_t sh[2] = {s.T, s.C}, sw[2] = {s.V, s.C};
    ag_tensor *in[3] = {rand_tensor(&p, &r, 2, sh, 1), rand_tensor(&p, &r, 2, sw, 0.05),
                        ag_tensor_new1(&p, AG_I32, s.T)};
    sgemm_job job = {0};
    double bt[N_PARTS];
    molt_status st = in[0] && in[1] && in[2] ? MOLT_OK : MOLT_ENOMEM;
    if (st == MOLT_OK) {
        in[1]->requires_grad = false;
        int32_t *tg = in[2]->data;
        for (int64_t t = 0; t < s.T; t++)
            tg[t] = (int32_t)(ag_rng_next(&r) % (uint64_t)s.V);
        st = sgemm_job_init(&job, s.T, s.V, s.C);
    }
    if (st == MOLT_OK)
        st = time_op(o, in, build_ce, ag_backward_ce_linear, &job, bt);
    double f = 2.0 * (double)s.T * (double)s.C * (double)s.V;
    for (int i = 0; st == MOLT_OK && i < 2; i++) {
        rows[i] = (bench_row){.op = "ce_linear", .pass = i ? "bwd" : "fwd",
                              .seconds = bt[i ? PART_BWD : PART_FWD], .flops = i ? 0 : 2 * f,
                              .sgemm_gflops = ag_bench_gflops(f, bt[PART_SGEMM])};
        snprintf(rows[i].shape, sizeof rows[i].shape, "T=%lld,C=%lld,V=%lld", (long long)s.T,
                 (long long)s.C, (long long)s.V);
    }
    molt_free(job.a);
    ag_arena_free(&p);
    return st;
}

static molt_status bench_linear(const ag_bench_opts *o, linear_size s, bench_row *rows) {
    ag_arena p;
    ag_arena_init(&p, "bench", 0);
    ag_rng r;
    ag_rng_seed(&r, 1);
    int64_t sx[2] = {s.T, s.in}, sw[2] = {s.out, s.in};
    ag_tensor *in[2] = {rand_tensor(&p, &r, 2, sx, 1), rand_tensor(&p, &r, 2, sw, 0.05)};
    sgemm_job job = {0};
    double bt[N_PARTS];
    molt_status st = in[0] && in[1] ? MOLT_OK : MOLT_ENOMEM;
    if (st == MOLT_OK)
        st = sgemm_job_init(&job, s.T, s.out, s.in);
    if (st == MOLT_OK)
        st = time_op(o, in, build_linear, ag_backward_linear, &job, bt);
    double f = 2.0 * (double)s.T * (double)s.in * (double)s.out;
    for (int i = 0; st == MOLT_OK && i < 2; i++) {
        rows[i] = (bench_row){.op = "linear", .pass = i ? "bwd" : "fwd",
                              .seconds = bt[i ? PART_BWD : PART_FWD], .flops = i ? 2 * f : f,
                              .sgemm_gflops = ag_bench_gflops(f, bt[PART_SGEMM])};
        snprintf(rows[i].shape, sizeof rows[i].shape, "T=%lld,%lld->%lld", (long long)s.T,
                 (long long)s.in, (long long)s.out);
    }
    molt_free(job.a);
    ag_arena_free(&p);
    return st;
}

static molt_status bench_attention(const ag_bench_opts *o, attn_size s, bench_row *rows) {
    ag_arena p;
    ag_arena_init(&p, "bench", 0);
    ag_rng r;
    ag_rng_seed(&r, 2);
    int64_t sq[3] = {s.T, s.H, s.Dqk}, sv[3] = {s.T, s.H, s.Dv};
    // one sequence: all segment ids 0
    ag_tensor *in[4] = {rand_tensor(&p, &r, 3, sq, 1), rand_tensor(&p, &r, 3, sq, 1),
                        rand_tensor(&p, &r, 3, sv, 1), ag_tensor_new1(&p, AG_I32, s.T)};
    // the baseline GEMM [T x K] x [K x T] has the causal forward's flops
    int64_t K = (s.H * (s.Dqk + s.Dv) + 1) / 2;
    sgemm_job job = {0};
    double bt[N_PARTS];
    molt_status st = in[0] && in[1] && in[2] && in[3] ? MOLT_OK : MOLT_ENOMEM;
    if (st == MOLT_OK)
        st = sgemm_job_init(&job, s.T, s.T, K);
    if (st == MOLT_OK)
        st = time_op(o, in, build_attention, ag_backward_attention, &job, bt);
    double pairs = (double)s.T * (double)(s.T + 1) / 2;
    double ff = 2 * pairs * (double)(s.H * (s.Dqk + s.Dv));
    double fb = 2 * pairs * (double)(s.H * (3 * s.Dqk + 2 * s.Dv));
    for (int i = 0; st == MOLT_OK && i < 2; i++) {
        rows[i] = (bench_row){.op = "attention", .pass = i ? "bwd" : "fwd",
                              .seconds = bt[i ? PART_BWD : PART_FWD], .flops = i ? fb : ff,
                              .sgemm_gflops = ag_bench_gflops(2.0 * (double)(s.T * s.T * K),
                                                             bt[PART_SGEMM])};
        snprintf(rows[i].shape, sizeof rows[i].shape, "T=%lld,H=%lld,Dqk=%lld,Dv=%lld",
                 (long long)s.T, (long long)s.H, (long long)s.Dqk, (long long)s.Dv);
    }
    molt_free(job.a);
    ag_arena_free(&p);
    return st;
}

static void print_header(const ag_bench_opts *o) {
    ag_bench_print_title(CMD, "f32, optimized CPU kernels", o);
    printf("flops: linear fwd 2*T*in*out, bwd 4*T*in*out (dx and dW); attention over the causal\n"
           "pairs P = T(T+1)/2: fwd 2*P*H*(Dqk+Dv), bwd 2*P*H*(3*Dqk+2*Dv) (scores recomputed).\n"
           "vs_sgemm = the row's GFLOP/s / ag_blas_sgemm's GFLOP/s in this run: for linear on the\n"
           "same GEMM shape [T x in] x [in x out]; for attention on [T x K] x [K x T] with\n"
           "K = H*(Dqk+Dv)/2, a GEMM with the flops of the causal forward. ce_linear: the\n"
           "fused loss with w frozen, fwd 4*T*C*V (logits and the gradient to h, made by the\n"
           "forward), bwd scales that gradient (no flops counted); sgemm on\n"
           "[T x C] x [C x V].\n\n");
    printf("%-10s %-28s %-4s %10s %9s %13s %9s\n", "op", "shape", "pass", "ms", "GFLOP/s",
           "sgemm_GFLOP/s", "vs_sgemm");
}

static void print_row(const bench_row *r) {
    double gf = ag_bench_gflops(r->flops, r->seconds);
    if (r->flops == 0) // a pass with no GEMM: its time only
        printf("%-10s %-28s %-4s %10.3f %9s %13.2f %9s\n", r->op, r->shape, r->pass,
               r->seconds * 1e3, "-", r->sgemm_gflops, "-");
    else
        printf("%-10s %-28s %-4s %10.3f %9.2f %13.2f %9.3f\n", r->op, r->shape, r->pass,
               r->seconds * 1e3, gf, r->sgemm_gflops, gf / r->sgemm_gflops);
    fflush(stdout);
}

int ag_cmd_bench_ops(int argc, char **argv) {
    ag_bench_opts o;
    int rc = ag_bench_parse_opts(CMD, usage, true, argc, argv, &o);
    if (rc >= 0)
        return rc;
    if (o.cuda)
        return ag_bench_cuda(&o);
    ag_bench_setup(&o);
    print_header(&o);
    const linear_size *ls = o.quick ? linear_quick : linear_full;
    const attn_size *as = o.quick ? attn_quick : attn_full;
    size_t nl = o.quick ? sizeof linear_quick / sizeof *ls : sizeof linear_full / sizeof *ls;
    size_t na = o.quick ? sizeof attn_quick / sizeof *as : sizeof attn_full / sizeof *as;
    const ce_size *cs = o.quick ? ce_quick : ce_full;
    size_t nc = o.quick ? sizeof ce_quick / sizeof *cs : sizeof ce_full / sizeof *cs;
    bench_row rows[2];
    for (size_t i = 0; i < nl + na + nc; i++) {
        molt_status st = i < nl        ? bench_linear(&o, ls[i], rows)
                         : i < nl + na ? bench_attention(&o, as[i - nl], rows)
                                       : bench_ce(&o, cs[i - nl - na], rows);
        if (st != MOLT_OK) {
            fprintf(stderr, CMD ": %s\n", molt_err_msg());
            return 1;
        }
        print_row(&rows[0]);
        print_row(&rows[1]);
    }
    return ag_bench_bi(&o);
}
