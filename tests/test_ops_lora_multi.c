// tests/test_ops_lora_multi.c: several LoRA adapters in one batch (ag_lora_multi): each
// row's term against the same adapter run alone through linear -> linear -> scale, rows of
// slot -1 and of an adapter without matrices at zero, a row's bits unchanged whatever else
// is in the batch, gradients w.r.t. x and every A and B by finite differences, f32 vs f64,
// optimized vs reference kernels, and the operand errors.
#include "harness/harness.h"
#include "harness/thread_probe.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#define IN 13
#define OUT 11
#define N_AD 4 // adapter 2 has no matrices here

static const int ranks[N_AD] = {1, 3, 0, 5};
static const double scales[N_AD] = {2.0, 0.5, 1.0, -1.25};

// Inputs: x, slot, then a/b of every adapter.
enum { IN_X, IN_SLOT, IN_AB };
#define N_INPUTS (IN_AB + 2 * N_AD)

static ag_tensor *build(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    ag_lora_ab set[N_AD];
    for (int s = 0; s < N_AD; s++)
        set[s] = (ag_lora_ab){in[IN_AB + 2 * s], in[IN_AB + 2 * s + 1], scales[s]};
    return ag_lora_multi(c, in[IN_X], in[IN_SLOT], N_AD, set, OUT);
}

// F64 inputs of T rows, slots cycling through -1, 0, 1, 2, 3 in a scrambled order.
static void make_inputs(ag_arena *a, ag_rng *r, int64_t T, ag_tensor **in) {
    in[IN_X] = gc_rand(a, r, 2, (int64_t[]){T, IN}, -1, 1, true);
    in[IN_SLOT] = ag_tensor_new1(a, AG_I32, T);
    for (int64_t t = 0; t < T; t++)
        ((int32_t *)in[IN_SLOT]->data)[t] = (int32_t)((t * 7 + 3) % (N_AD + 1)) - 1;
    for (int s = 0; s < N_AD; s++) {
        in[IN_AB + 2 * s] = ranks[s] ? gc_rand(a, r, 2, (int64_t[]){ranks[s], IN}, -1, 1, true)
                                     : NULL;
        in[IN_AB + 2 * s + 1] =
            ranks[s] ? gc_rand(a, r, 2, (int64_t[]){OUT, ranks[s]}, -1, 1, true) : NULL;
    }
}

START_TEST(test_rows_match_each_adapter_alone) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 1);
    ag_tensor *in64[N_INPUTS], *in[N_INPUTS];
    int64_t T = 23;
    make_inputs(&a, &r, T, in64);
    for (int i = 0; i < N_INPUTS; i++)
        in[i] = gc_clone(&a, in64[i], AG_F32);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_tensor *y = build(&c, in, NULL);
        ck_assert_tensor(y);
        ck_assert_int_eq(y->shape[0], T);
        ck_assert_int_eq(y->shape[1], OUT);
        const int32_t *sl = in[IN_SLOT]->data;
        for (int64_t t = 0; t < T; t++) {
            int s = sl[t];
            ag_tensor *xt = ag_slice(&c, in[IN_X], 0, t, 1);
            if (s < 0 || !ranks[s]) {
                for (int o = 0; o < OUT; o++)
                    ck_assert(ag_get(y, t * OUT + o) == 0.0);
                continue;
            }
            // the adapter alone: scale * ((x A^T) B^T)
            ag_tensor *want = ag_scale(
                &c, ag_linear(&c, ag_linear(&c, xt, in[IN_AB + 2 * s]), in[IN_AB + 2 * s + 1]),
                scales[s]);
            ck_assert_tensor(want);
            for (int o = 0; o < OUT; o++) {
                double g = ag_get(y, t * OUT + o), w = ag_get(want, o);
                ck_assert_msg(fabs(g - w) <= 1e-5 * (1 + fabs(w)), "row %lld col %d: %g vs %g",
                              (long long)t, o, g, w);
            }
        }
        ag_ctx_free(&c);
    }
    ag_set_reference_kernels(false);
    ag_arena_free(&a);
}
END_TEST

// A row's result has the same bits whatever the other rows are: the batch shrunk to that row,
// reversed, and mixed with rows of other adapters. Thread counts 1 and 2.
START_TEST(test_row_results_do_not_depend_on_the_batch) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 2);
    ag_tensor *in64[N_INPUTS], *in[N_INPUTS];
    int64_t T = 37;
    make_inputs(&a, &r, T, in64);
    for (int i = 0; i < N_INPUTS; i++)
        in[i] = gc_clone(&a, in64[i], AG_F32);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *full = build(&c, in, NULL);
    ck_assert_tensor(full);
    ag_tensor *rev[N_INPUTS];
    memcpy(rev, in, sizeof rev);
    rev[IN_X] = ag_tensor_new2(&a, AG_F32, T, IN);
    rev[IN_SLOT] = ag_tensor_new1(&a, AG_I32, T);
    for (int64_t t = 0; t < T; t++) {
        memcpy((float *)rev[IN_X]->data + (T - 1 - t) * IN, (float *)in[IN_X]->data + t * IN,
               IN * sizeof(float));
        ((int32_t *)rev[IN_SLOT]->data)[T - 1 - t] = ((int32_t *)in[IN_SLOT]->data)[t];
    }
    for (int threads = 1; threads <= 2; threads++) {
        omp_set_num_threads(threads);
        ag_tensor *yr = build(&c, rev, NULL);
        ck_assert_tensor(yr);
        for (int64_t t = 0; t < T; t++)
            ck_assert(!memcmp((float *)yr->data + (T - 1 - t) * OUT,
                              (float *)full->data + t * OUT, OUT * sizeof(float)));
        for (int64_t t = 0; t < T; t += 5) { // each row alone
            ag_tensor *one[N_INPUTS];
            memcpy(one, in, sizeof one);
            one[IN_X] = ag_slice(&c, in[IN_X], 0, t, 1);
            one[IN_SLOT] = ag_slice(&c, in[IN_SLOT], 0, t, 1);
            ck_assert_tensor(one[IN_SLOT]);
            ag_tensor *y1 = build(&c, one, NULL);
            ck_assert_tensor(y1);
            ck_assert_msg(!memcmp(y1->data, (float *)full->data + t * OUT, OUT * sizeof(float)),
                          "row %lld differs alone", (long long)t);
        }
    }
    omp_set_num_threads(2);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

// Rows of one adapter (a lone group): its two products use the threads, called outside any
// parallel region. From inside one, even one that runs on a single thread, their own regions
// would be nested ones, which OpenMP runs on threads it starts for that region alone (a
// thread per product per call). Sizes big enough for the products to take a team.
START_TEST(test_one_group_starts_no_threads) {
    omp_set_num_threads(2);
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 3);
    int64_t T = 64, in = 512, rank = 16, out = 512; // 64 * 16 * 512 multiply-adds per product
    ag_tensor *x = ag_tensor_new2(&a, AG_F32, T, in), *slot = ag_tensor_new1(&a, AG_I32, T);
    ag_tensor *A = ag_tensor_new2(&a, AG_F32, rank, in), *B = ag_tensor_new2(&a, AG_F32, out, rank);
    ck_assert(x && slot && A && B);
    ag_fill_uniform(x, &r, -1, 1);
    ag_fill_uniform(A, &r, -1, 1);
    ag_fill_uniform(B, &r, -1, 1);
    for (int64_t t = 0; t < T; t++)
        ((int32_t *)slot->data)[t] = t % 3 ? 0 : -1; // adapter 0, and some base rows
    ag_lora_ab set[1] = {{A, B, 0.5}};
    ag_ctx c;
    ag_ctx_init(&c);
    ag_ctx_set_grad(&c, false);
    long before = 0;
    for (int i = 0; i < 12; i++) {
        if (i == 2)
            before = harness_threads_started();
        ag_ctx_step_reset(&c);
        ck_assert_tensor(ag_lora_multi(&c, x, slot, 1, set, out));
    }
    ck_assert_int_eq(harness_threads_started(), before);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_gradients) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 3);
    ag_tensor *in[N_INPUTS];
    make_inputs(&a, &r, 17, in);
    gc_case g = {.n_in = N_INPUTS, .in = in, .build = build};
    gc_result res;
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ck_assert_ok(gc_gradcheck(&g, &res));
        ck_assert_msg(res.max_rel < 1e-6, "%s kernels: max rel %g at input %d elem %lld (%g vs %g)",
                      ref ? "reference" : "optimized", res.max_rel, res.worst_input,
                      (long long)res.worst_elem, res.analytic, res.numeric);
        ck_assert_int_gt(res.checked, 17 * IN);
    }
    ag_set_reference_kernels(false);
    double rel;
    ck_assert_ok(gc_f32_vs_f64(&g, &rel));
    ck_assert_msg(rel < 1e-5, "f32 vs f64 %g", rel);
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_msg(rel < 1e-5, "fast vs ref %g", rel);
    ag_arena_free(&a);
}
END_TEST

// Errors: slot out of range, slot shape, a without b, mismatched shapes, dtype.
START_TEST(test_errors) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 4);
    ag_tensor *in[N_INPUTS];
    make_inputs(&a, &r, 5, in);
    for (int i = 0; i < N_INPUTS; i++)
        in[i] = gc_clone(&a, in[i], AG_F32);
    ag_ctx c;
    ag_ctx_init(&c);
    ((int32_t *)in[IN_SLOT]->data)[3] = N_AD;
    ck_assert_ptr_null(build(&c, in, NULL));
    ck_assert_str_eq(molt_err_msg(), "lora_multi: slot[3] = 4 is outside [-1, 4)");
    ((int32_t *)in[IN_SLOT]->data)[3] = -2;
    ck_assert_ptr_null(build(&c, in, NULL));
    ((int32_t *)in[IN_SLOT]->data)[3] = 0;
    ag_lora_ab set[2] = {{in[IN_AB], NULL, 1.0}, {NULL, NULL, 1.0}};
    ck_assert_ptr_null(ag_lora_multi(&c, in[IN_X], in[IN_SLOT], 2, set, OUT));
    ck_assert_str_eq(molt_err_msg(), "lora_multi: adapter 0 has a without b (set both or "
                                     "neither)");
    set[0] = (ag_lora_ab){in[IN_AB + 2], in[IN_AB + 1], 1.0}; // rank 3 a with a rank 1 b
    ck_assert_ptr_null(ag_lora_multi(&c, in[IN_X], in[IN_SLOT], 2, set, OUT));
    ck_assert_str_eq(molt_err_msg(), "lora_multi: adapter 0: b is [11, 1] f32, expected "
                                     "[11, 3] for a [3, 13] f32");
    set[0] = (ag_lora_ab){in[IN_AB], in[IN_AB + 1], NAN};
    ck_assert_ptr_null(ag_lora_multi(&c, in[IN_X], in[IN_SLOT], 2, set, OUT));
    set[0].scale = 1;
    ag_tensor *short_slot = ag_tensor_new1(&a, AG_I32, 4);
    ck_assert_ptr_null(ag_lora_multi(&c, in[IN_X], short_slot, 2, set, OUT));
    ck_assert_str_eq(molt_err_msg(), "lora_multi: slot is [4] i32, expected I32 [5] (one per "
                                     "row of x [5, 13] f32)");
    ag_tensor *x64 = gc_clone(&a, in[IN_X], AG_F64);
    ck_assert_ptr_null(ag_lora_multi(&c, x64, in[IN_SLOT], 2, set, OUT));
    ag_tensor *none = ag_tensor_new1(&a, AG_I32, 5); // no adapters: every row -1, all zero
    for (int t = 0; t < 5; t++)
        ((int32_t *)none->data)[t] = -1;
    ag_tensor *y0 = ag_lora_multi(&c, in[IN_X], none, 0, NULL, OUT);
    ck_assert_tensor(y0);
    for (int64_t i = 0; i < y0->numel; i++)
        ck_assert(ag_get(y0, i) == 0.0);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_lora_multi");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_rows_match_each_adapter_alone);
    tcase_add_test(tc, test_row_results_do_not_depend_on_the_batch);
    tcase_add_test(tc, test_one_group_starts_no_threads);
    tcase_add_test(tc, test_gradients);
    tcase_add_test(tc, test_errors);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
