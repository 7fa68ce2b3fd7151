// tests/test_ops_moe_lora.c: routed experts with LoRA on the 3D expert weights
// (ag_moe_experts_lora): forward against ag_moe_experts on weights merged here from the
// documented formula, zero B against the adapter-free op, gradients w.r.t. x, the routing
// weights and all four LoRA matrices, f32 vs f64, optimized vs reference kernels, exact error
// messages, and a fixture written by PEFT itself (tools/reference/expert_lora_reference.py).
#include "harness/harness.h"
#include "harness/moe_lora_cases.h"
#include "harness/thread_probe.h"
#include "autograd/internal.h"
#include "model/model.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- helpers -------------------------------------------------------------------------------

typedef struct {
    int r;
    double s;
} lattr;

static ag_tensor *build_lora(ag_ctx *c, ag_tensor **in, void *user) {
    const lattr *at = user;
    ag_expert_lora l = {in[IN_AGU], in[IN_BGU], in[IN_AD], in[IN_BD], at->r, at->s, NULL,
                        NULL};
    return ag_moe_experts_lora(c, in[IN_X], in[IN_W], in[IN_IDX], in[IN_GU], in[IN_D], &l);
}

// F64 inputs of a case: base weights frozen, everything else requires grad.
static void make_inputs(ag_arena *a, ag_rng *r, const lcase *d, bool repeat, ag_tensor **in) {
    moe_lora_routing(a, r, d, repeat, in);
    in[IN_GU] = gc_rand(a, r, 3, (int64_t[]){d->E, 2 * d->I, d->H}, -0.8, 0.8, false);
    in[IN_D] = gc_rand(a, r, 3, (int64_t[]){d->E, d->H, d->I}, -0.8, 0.8, false);
    moe_lora_adapters(a, r, d, in);
}

// w + s * delta with delta[e][o][i] = sum_k B[o, k*E + e] * A[e*r + k, i] (PEFT's
// get_delta_weight for a [E, out, in] parameter), computed element by element.
static ag_tensor *merge_here(ag_arena *a, const ag_tensor *w, const ag_tensor *A,
                             const ag_tensor *B, int r, double s) {
    ag_tensor *m = gc_clone(a, w, AG_F64);
    m->requires_grad = false;
    if (!A)
        return m;
    int64_t E = w->shape[0], O = w->shape[1], In = w->shape[2];
    for (int64_t e = 0; e < E; e++)
        for (int64_t o = 0; o < O; o++)
            for (int64_t i = 0; i < In; i++) {
                double delta = 0;
                for (int kk = 0; kk < r; kk++)
                    delta += ag_get(B, o * r * E + kk * E + e) * ag_get(A, (e * r + kk) * In + i);
                int64_t at = (e * O + o) * In + i;
                ag_set(m, at, ag_get(m, at) + s * delta);
            }
    return m;
}

// ---- forward ---------------------------------------------------------------------------------

START_TEST(test_forward_matches_merged_weights) {
    for (int ci = 0; ci < N_CASES; ci++) {
        const lcase *d = &moe_lora_cases[ci];
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 10 + ci);
        ag_tensor *in[N_IN];
        make_inputs(&a, &r, d, ci == 1, in);
        ag_tensor *mgu = merge_here(&a, in[IN_GU], in[IN_AGU], in[IN_BGU], d->r, d->s);
        ag_tensor *md = merge_here(&a, in[IN_D], in[IN_AD], in[IN_BD], d->r, d->s);
        for (int ref = 0; ref < 2; ref++) {
            ag_set_reference_kernels(ref);
            ag_ctx c;
            ag_ctx_init(&c);
            lattr at = {d->r, d->s};
            ag_tensor *y = build_lora(&c, in, &at);
            ck_assert_tensor(y);
            ag_tensor *want = ag_moe_experts(&c, in[IN_X], in[IN_W], in[IN_IDX], mgu, md);
            ck_assert_tensor(want);
            double rel = gc_max_rel_diff(y, want);
            ck_assert_msg(rel <= 1e-12, "case %d ref %d: rel %g", ci, ref, rel);
            ag_ctx_free(&c);
        }
        ag_set_reference_kernels(false);
        ag_arena_free(&a);
    }
}
END_TEST

START_TEST(test_zero_b_equals_base_op) {
    const lcase d = {7, 4, 2, 5, 3, 2, 1.5, true, true};
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 77);
        ag_tensor *in[N_IN], *base_in[N_IN];
        make_inputs(&a, &r, &d, false, in);
        memset(in[IN_BGU]->data, 0, (size_t)in[IN_BGU]->numel * sizeof(double));
        memset(in[IN_BD]->data, 0, (size_t)in[IN_BD]->numel * sizeof(double));
        for (int i = 0; i < IN_AGU; i++)
            base_in[i] = gc_clone(&a, in[i], AG_F64);
        ag_ctx c;
        ag_ctx_init(&c);
        lattr at = {d.r, d.s};
        ag_tensor *y = build_lora(&c, in, &at);
        ag_tensor *yb = ag_moe_experts(&c, base_in[IN_X], base_in[IN_W], base_in[IN_IDX],
                                       base_in[IN_GU], base_in[IN_D]);
        ck_assert_tensor(y);
        ck_assert_tensor(yb);
        ck_assert_int_eq(memcmp(y->data, yb->data, (size_t)y->numel * sizeof(double)), 0);
        ck_assert_ok(ag_backward(&c, ag_sum(&c, ag_add(&c, y, yb))));
        ck_assert_int_eq(memcmp(in[IN_X]->grad->data, base_in[IN_X]->grad->data,
                                (size_t)in[IN_X]->numel * sizeof(double)), 0);
        ck_assert_int_eq(memcmp(in[IN_W]->grad->data, base_in[IN_W]->grad->data,
                                (size_t)in[IN_W]->numel * sizeof(double)), 0);
        // dA = s B^T dW_eff is exactly zero with B = 0; dB is not
        for (int i = IN_AGU; i <= IN_BD; i += 2)
            for (int64_t e = 0; e < in[i]->numel; e++)
                ck_assert(ag_get(in[i]->grad, e) == 0.0);
        double bmax = 0;
        for (int64_t e = 0; e < in[IN_BGU]->numel; e++)
            bmax = fmax(bmax, fabs(ag_get(in[IN_BGU]->grad, e)));
        ck_assert(bmax > 1e-3);
        ag_ctx_free(&c);
        ag_arena_free(&a);
    }
    ag_set_reference_kernels(false);
}
END_TEST

// ---- gradients ---------------------------------------------------------------------------------

static void expect_grads(const gc_case *g, int64_t n_checked, const char *what, int ci) {
    gc_result res;
    ck_assert_ok(gc_gradcheck(g, &res));
    ck_assert_int_eq(res.checked, n_checked);
    ck_assert_msg(res.max_rel <= 1e-6, "%s case %d: max rel %g at input %d elem %lld (%g vs %g)",
                  what, ci, res.max_rel, res.worst_input, (long long)res.worst_elem,
                  res.analytic, res.numeric);
}

START_TEST(test_gradcheck) {
    for (int ci = 0; ci < N_CASES; ci++) {
        const lcase *d = &moe_lora_cases[ci];
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 100 + ci);
        ag_tensor *in[N_IN];
        make_inputs(&a, &r, d, ci == 0 || ci == 2, in);
        lattr at = {d->r, d->s};
        gc_case g = {.n_in = N_IN, .in = in, .build = build_lora, .user = &at};
        int64_t all = d->T * d->H + d->T * d->k + moe_lora_numel(d);
        for (int ref = 0; ref < 2; ref++) {
            ag_set_reference_kernels(ref);
            expect_grads(&g, all, ref ? "reference" : "optimized", ci);
        }
        ag_set_reference_kernels(false);
        // the training case: only the adapters are trainable
        in[IN_X]->requires_grad = in[IN_W]->requires_grad = false;
        expect_grads(&g, moe_lora_numel(d), "lora only", ci);
        in[IN_X]->requires_grad = in[IN_W]->requires_grad = true;
        double rel;
        ck_assert_ok(gc_f32_vs_f64(&g, &rel));
        ck_assert_msg(rel <= 1e-5, "case %d: f32 vs f64 %g", ci, rel);
        ag_arena_free(&a);
    }
}
END_TEST

START_TEST(test_fast_vs_ref) {
    // more slots of one expert than a row block of the optimized kernel (256), odd sizes
    const lcase big[] = {
        {300, 3, 2, 5, 3, 2, 1.5, true, true},
        {37, 9, 3, 7, 5, 4, 0.5, true, true},
        {40, 6, 2, 6, 4, 3, 2.0, false, true},
    };
    for (int ci = 0; ci < 3; ci++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 200 + ci);
        ag_tensor *in[N_IN];
        make_inputs(&a, &r, &big[ci], ci == 1, in);
        lattr at = {big[ci].r, big[ci].s};
        gc_case g = {.n_in = N_IN, .in = in, .build = build_lora, .user = &at};
        double rel;
        ck_assert_ok(gc_fast_vs_ref(&g, &rel));
        ck_assert_msg(rel <= 1e-5, "case %d: fast vs ref %g", ci, rel);
        ag_arena_free(&a);
    }
}
END_TEST

// Big enough for the optimized kernels to spread the experts over an OpenMP team (three
// threads asked for, whatever the machine has), with an expert of more than one row block
// (256) and one of no rows; then the same inputs with a team of one (experts in order).
START_TEST(test_fast_vs_ref_expert_team) {
    const lcase d = {1100, 9, 2, 48, 24, 3, 1.1, true, true};
    int saved = omp_get_max_threads();
    for (int threads = 3; threads >= 1; threads -= 2) {
        omp_set_num_threads(threads);
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 300);
        ag_tensor *in[N_IN];
        make_inputs(&a, &r, &d, true, in);
        lattr at = {d.r, d.s};
        gc_case g = {.n_in = N_IN, .in = in, .build = build_lora, .user = &at};
        double rel;
        ck_assert_ok(gc_fast_vs_ref(&g, &rel));
        ck_assert_msg(rel <= 1e-5, "%d threads: fast vs ref %g", threads, rel);
        ag_arena_free(&a);
    }
    omp_set_num_threads(saved);
}
END_TEST

// Tokens routed to two experts only: too few busy experts for a team, so the experts run one
// after another on this thread, and their GEMMs (big enough for OpenBLAS to thread) are
// called outside any parallel region. Inside one, even one that runs on a single thread,
// OpenBLAS's own region would be a nested one, which OpenMP runs on threads it starts for
// that region alone. Forward and backward, after a warm-up.
START_TEST(test_few_busy_experts_start_no_threads) {
    const lcase d = {1024, 9, 2, 64, 48, 4, 1.0, true, true};
    omp_set_num_threads(2);
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 400);
    ag_tensor *in64[N_IN], *in[N_IN];
    make_inputs(&a, &r, &d, true, in64);
    for (int64_t i = 0; i < d.T * d.k; i++)
        ((int32_t *)in64[IN_IDX]->data)[i] = (int32_t)(i % 2); // experts 0 and 1
    for (int i = 0; i < N_IN; i++)
        in[i] = in64[i]->dtype == AG_F64 ? gc_clone(&a, in64[i], AG_F32) : in64[i];
    lattr at = {d.r, d.s};
    long before = 0;
    for (int i = 0; i < 8; i++) {
        if (i == 2)
            before = harness_threads_started();
        ag_ctx c;
        ag_ctx_init(&c);
        ag_tensor *y = build_lora(&c, in, &at);
        ck_assert_tensor(y);
        ck_assert_ok(ag_backward(&c, ag_sum(&c, y)));
        ag_ctx_free(&c);
    }
    ck_assert_int_eq(harness_threads_started(), before);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_tape_and_frozen_base) {
    const lcase d = {4, 3, 2, 4, 3, 2, 1.0, true, true};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 5);
    ag_tensor *in[N_IN];
    make_inputs(&a, &r, &d, false, in);
    ag_ctx c;
    ag_ctx_init(&c);
    lattr at = {d.r, d.s};
    ag_tensor *y = build_lora(&c, in, &at);
    ck_assert_tensor(y);
    ck_assert_int_eq(c.n_tape, 1);
    ck_assert_str_eq(ag_op_name(c.tape[0]->op), "moe_experts_lora");
    ck_assert_uint_eq(c.saved_bytes, 0); // activations are recomputed, not saved
    ck_assert_ok(ag_backward(&c, ag_sum(&c, y)));
    ck_assert_ptr_null(in[IN_GU]->grad);
    ck_assert_ptr_null(in[IN_D]->grad);
    for (int i = IN_AGU; i <= IN_BD; i++)
        ck_assert_ptr_nonnull(in[i]->grad);
    // grad mode off: nothing recorded
    ag_ctx_set_grad(&c, false);
    ck_assert_tensor(build_lora(&c, in, &at));
    ck_assert_int_eq(c.n_tape, 0);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

// ---- errors ---------------------------------------------------------------------------------

static void expect_error(ag_tensor **in, const lattr *at, const char *msg) {
    ag_ctx c;
    ag_ctx_init(&c);
    ck_assert_ptr_null(build_lora(&c, in, (void *)at));
    ck_assert_str_eq(molt_err_msg(), msg);
    ag_ctx_free(&c);
}

START_TEST(test_errors) {
    const lcase d = {5, 4, 2, 6, 3, 2, 1.5, true, true};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 3);
    ag_tensor *in[N_IN];
    make_inputs(&a, &r, &d, false, in);
    lattr at = {2, 1.5};
    ag_tensor *keep;

    keep = in[IN_AGU]; // one expert's rows short
    in[IN_AGU] = ag_tensor_new2(&a, AG_F64, 7, 6);
    expect_error(in, &at, "moe_experts_lora: a_gate_up is [7, 6] f64, expected [8, 6] "
                          "(r*E, H)");
    in[IN_AGU] = ag_tensor_new2(&a, AG_F64, 6, 8); // transposed
    expect_error(in, &at, "moe_experts_lora: a_gate_up is [6, 8] f64, expected [8, 6] "
                          "(r*E, H)");
    in[IN_AGU] = keep;
    keep = in[IN_BGU];
    in[IN_BGU] = ag_tensor_new2(&a, AG_F64, 8, 6);
    expect_error(in, &at, "moe_experts_lora: b_gate_up is [8, 6] f64, expected [6, 8] "
                          "(2I, r*E)");
    in[IN_BGU] = keep;
    keep = in[IN_AD];
    in[IN_AD] = ag_tensor_new(&a, AG_F64, 3, (int64_t[]){4, 2, 3});
    expect_error(in, &at, "moe_experts_lora: a_down is [4, 2, 3] f64, expected [8, 3] "
                          "(r*E, I)");
    in[IN_AD] = keep;
    keep = in[IN_BD];
    in[IN_BD] = ag_tensor_new2(&a, AG_F64, 6, 6);
    expect_error(in, &at, "moe_experts_lora: b_down is [6, 6] f64, expected [6, 8] (H, r*E)");
    in[IN_BD] = ag_tensor_new2(&a, AG_F32, 6, 8);
    expect_error(in, &at, "moe_experts_lora: x [5, 6] f64 and b_down [6, 8] f32 differ in "
                          "dtype");
    in[IN_BD] = NULL;
    expect_error(in, &at, "moe_experts_lora: a_down is given without b_down (set both or "
                          "neither)");
    in[IN_BD] = keep;

    lattr bad_r = {0, 1.0}, r3 = {3, 1.0};
    expect_error(in, &bad_r, "moe_experts_lora: rank r = 0, expected >= 1");
    expect_error(in, &r3, "moe_experts_lora: a_gate_up is [8, 6] f64, expected [12, 6] "
                          "(r*E, H)");
    in[IN_GU]->requires_grad = true;
    expect_error(in, &at, "moe_experts_lora: w_gate_up requires grad, but expert weights are "
                          "frozen (train the LoRA matrices instead)");
    in[IN_GU]->requires_grad = false;
    ag_set(in[IN_IDX], 3, 4.0);
    expect_error(in, &at, "moe_experts_lora: idx[t=1, j=1] = 4 is out of range [0, 4)");
    ag_set(in[IN_IDX], 3, 1.0);

    ag_ctx c;
    ag_ctx_init(&c);
    ck_assert_ptr_null(ag_moe_experts_lora(&c, in[IN_X], in[IN_W], in[IN_IDX], in[IN_GU],
                                           in[IN_D], NULL));
    ck_assert_str_eq(molt_err_msg(), "moe_experts_lora: lora is NULL (use ag_moe_experts "
                                     "without adapters)");
    // the untouched inputs still work
    ck_assert_tensor(build_lora(&c, in, &at));
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

// ---- PEFT fixture -----------------------------------------------------------------------------

// F64 (or I32) tensor `name` of the fixture, copied into arena a; NULL when absent.
static ag_tensor *load(ag_arena *a, const st_reader *rd, const char *name, bool grad) {
    const st_tensor *t = st_find(rd, name);
    ck_assert_msg(t != NULL, "fixture lacks %s", name);
    ck_assert(t->dtype == ST_F64 || t->dtype == ST_I32);
    ck_assert(t->ndim >= 1 && t->ndim <= AG_MAX_DIMS);
    ag_tensor *x = ag_tensor_new(a, t->dtype == ST_F64 ? AG_F64 : AG_I32, t->ndim, t->shape);
    ck_assert_tensor(x);
    memcpy(x->data, t->data, t->nbytes); // little-endian both sides
    x->requires_grad = grad;
    return x;
}

static const char *meta(const st_reader *rd, const char *key) {
    const char *v = st_metadata(rd, key);
    ck_assert_msg(v != NULL, "fixture metadata lacks %s", key);
    return v;
}

// Elementwise |got - want| <= 1e-5 |want| + 1e-12 max|want|.
static void expect_close(const ag_tensor *got, const ag_tensor *want, const char *what) {
    ck_assert_int_eq(got->numel, want->numel);
    double mx = 0;
    for (int64_t i = 0; i < want->numel; i++)
        mx = fmax(mx, fabs(ag_get(want, i)));
    for (int64_t i = 0; i < want->numel; i++) {
        double g = ag_get(got, i), w = ag_get(want, i);
        ck_assert_msg(fabs(g - w) <= 1e-5 * fabs(w) + 1e-12 * mx, "%s[%lld]: %.17g vs PEFT %.17g",
                      what, (long long)i, g, w);
    }
}

START_TEST(test_peft_fixture) {
    const char *root = getenv("MOLT_SOURCE_DIR");
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/fixtures/expert_lora/expert_lora_ref.safetensors",
             root ? root : ".");
    st_reader *rd = NULL;
    ck_assert_ok(st_open(path, &rd));
    static const char *lora_keys[4] = {"name.gate_up.lora_A", "name.gate_up.lora_B",
                                       "name.down.lora_A", "name.down.lora_B"};
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_tensor *in[N_IN];
        in[IN_X] = load(&a, rd, "x", true);
        in[IN_W] = load(&a, rd, "routing.weights", true);
        in[IN_IDX] = load(&a, rd, "routing.idx", false);
        in[IN_GU] = load(&a, rd, "gate_up_proj", false);
        in[IN_D] = load(&a, rd, "down_proj", false);
        for (int i = 0; i < 4; i++)
            in[IN_AGU + i] = load(&a, rd, meta(rd, lora_keys[i]), true);
        lattr at = {atoi(meta(rd, "r")), strtod(meta(rd, "scaling"), NULL)};
        ck_assert_int_eq(at.r, 2);
        ck_assert_double_eq(at.s, atof(meta(rd, "lora_alpha")) / at.r);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_tensor *y = build_lora(&c, in, &at);
        ck_assert_tensor(y);
        expect_close(y, load(&a, rd, "y", false), "y");
        // L = sum(y * dy) gives y's cotangent dy, as the script's y.backward(dy)
        ag_tensor *dy = load(&a, rd, "dy", false);
        ck_assert_ok(ag_backward(&c, ag_sum(&c, ag_mul(&c, y, dy))));
        expect_close(in[IN_X]->grad, load(&a, rd, "grad.x", false), "grad.x");
        expect_close(in[IN_W]->grad, load(&a, rd, "grad.weights", false), "grad.weights");
        for (int i = 0; i < 4; i++) {
            char gname[256];
            snprintf(gname, sizeof gname, "grad.%s", meta(rd, lora_keys[i]));
            expect_close(in[IN_AGU + i]->grad, load(&a, rd, gname, false), gname);
        }
        ag_ctx_free(&c);
        ag_arena_free(&a);
    }
    ag_set_reference_kernels(false);
    st_close(rd);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_moe_lora");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_forward_matches_merged_weights);
    tcase_add_test(tc, test_zero_b_equals_base_op);
    tcase_add_test(tc, test_gradcheck);
    tcase_add_test(tc, test_fast_vs_ref);
    tcase_add_test(tc, test_fast_vs_ref_expert_team);
    tcase_add_test(tc, test_few_busy_experts_start_no_threads);
    tcase_add_test(tc, test_tape_and_frozen_base);
    tcase_add_test(tc, test_errors);
    tcase_add_test(tc, test_peft_fixture);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
