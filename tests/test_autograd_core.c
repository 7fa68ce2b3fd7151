// tests/test_autograd_core.c: arenas, tensors, the tape, grad mode, backward accumulation,
// and the elementwise ops add/mul/scale/sum with their gradient checks.
#include "harness/harness.h"
#include "autograd/internal.h"

#include <stddef.h>

#include <math.h>
#include <string.h>

START_TEST(test_arena_alignment_and_reset) {
    ag_arena a;
    ag_arena_init(&a, "t", 256);
    void *p = ag_arena_alloc(&a, 10), *q = ag_arena_alloc(&a, 1000);
    ck_assert_ptr_nonnull(p);
    ck_assert_ptr_nonnull(q);
    ck_assert_uint_eq((uintptr_t)p % 64, 0);
    ck_assert_uint_eq((uintptr_t)q % 64, 0);
    ck_assert_uint_ge(a.peak, 1000);
    ag_arena_reset(&a);
    ck_assert_uint_eq(a.used, 0);
    // after a reset the kept chunk serves a whole step of the same size without new chunks
    unsigned long before = molt_alloc_count();
    ck_assert_ptr_nonnull(ag_arena_alloc(&a, 1000));
    ck_assert_uint_eq(molt_alloc_count(), before);
    ag_arena_free(&a);
}
END_TEST

// A step that spills over several chunks leaves, after its reset, one chunk that holds the
// whole step: the same step again takes no new chunk, and the chunk is kept over resets.
// Without memory for that chunk the reset keeps the largest one, as before.
static void arena_step(ag_arena *a) {
    for (int i = 0; i < 10; i++) {
        unsigned char *p = ag_arena_alloc(a, 200);
        ck_assert_ptr_nonnull(p);
        p[199] = 1;
    }
}

START_TEST(test_arena_spilled_step_gets_one_chunk) {
    ag_arena a;
    ag_arena_init(&a, "t", 256);
    arena_step(&a);
    ck_assert_uint_eq(a.peak, 10 * 256);
    ck_assert_uint_eq(a.reserved, 10 * 256);
    ag_arena_reset(&a);
    ck_assert_uint_eq(a.used, 0);
    ck_assert_uint_eq(a.reserved, 10 * 256); // one chunk of the step's high-water mark
    for (int k = 0; k < 2; k++) {
        unsigned long before = molt_alloc_count();
        arena_step(&a);
        ck_assert_uint_eq(molt_alloc_count(), before);
        ag_arena_reset(&a);
        ck_assert_uint_eq(a.reserved, 10 * 256);
    }
    ag_arena_free(&a);

    ag_arena_init(&a, "t", 256);
    arena_step(&a);
    molt_alloc_fail_after(0);
    ag_arena_reset(&a); // no memory for the merged chunk: the largest (one of 256) is kept
    molt_alloc_fail_after(-1);
    ck_assert_uint_eq(a.reserved, 256);
    ck_assert_uint_eq(a.used, 0);
    arena_step(&a);
    ag_arena_reset(&a);
    ck_assert_uint_eq(a.reserved, 10 * 256);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_arena_alloc_failure_keeps_state) {
    ag_arena a;
    ag_arena_init(&a, "t", 64);
    ck_assert_ptr_nonnull(ag_arena_alloc(&a, 64));
    size_t used = a.used;
    molt_alloc_fail_after(0);
    ck_assert_ptr_null(ag_arena_alloc(&a, 4096));
    ck_assert_int_eq(a.used, used);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "out of memory"));
    ck_assert_ptr_nonnull(ag_arena_alloc(&a, 4096));
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_tensor_shapes_and_errors) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    int64_t s5[5] = {1, 2, 3, 4, 5}, bad[2] = {3, 0};
    ck_assert_ptr_null(ag_tensor_new(&a, AG_F32, 5, s5));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "5 dims"));
    ck_assert_ptr_null(ag_tensor_new(&a, AG_F32, 2, bad));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "dim 1 has size 0"));
    ag_tensor *t = ag_tensor_new(&a, AG_BF16, 4, s5);
    ck_assert_tensor(t);
    ck_assert_int_eq(t->numel, 24);
    char b[64];
    ck_assert_str_eq(ag_shape_str(t, b, sizeof b), "[1, 2, 3, 4] bf16");
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_bf16_f16_roundtrip) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_tensor *h = ag_tensor_new1(&a, AG_F16, 4), *b = ag_tensor_new1(&a, AG_BF16, 4);
    double vals[4] = {1.0, -2.5, 65504.0, 5.960464477539063e-08};
    for (int i = 0; i < 4; i++) {
        ag_set(h, i, vals[i]);
        ck_assert_double_eq(ag_get(h, i), vals[i]); // all exactly representable in f16
    }
    ag_set(b, 0, 1.0 + 1.0 / 256); // halfway between two bf16 values: ties to even -> 1.0
    ck_assert_double_eq(ag_get(b, 0), 1.0);
    ag_set(b, 1, 1.0 + 3.0 / 256); // halfway, rounds up to the even mantissa 1 + 4/256
    ck_assert_double_eq(ag_get(b, 1), 1.0 + 4.0 / 256);
    ck_assert(isnan(ag_bf16_to_f32(ag_f32_to_bf16(NAN))));
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_rng_reproducible) {
    ag_rng r1, r2;
    ag_rng_seed(&r1, 42);
    ag_rng_seed(&r2, 42);
    for (int i = 0; i < 100; i++)
        ck_assert_uint_eq(ag_rng_next(&r1), ag_rng_next(&r2));
    ag_rng_seed(&r2, 43);
    ck_assert_uint_ne(ag_rng_next(&r1), ag_rng_next(&r2));
    double m = 0, v = 0;
    ag_rng_seed(&r1, 7);
    for (int i = 0; i < 20000; i++) {
        double x = ag_rng_normal(&r1);
        m += x;
        v += x * x;
    }
    m /= 20000;
    v = v / 20000 - m * m;
    ck_assert_double_lt(fabs(m), 0.03);
    ck_assert_double_lt(fabs(v - 1), 0.05);
}
END_TEST

START_TEST(test_tape_records_only_when_needed) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_arena p;
    ag_arena_init(&p, "params", 0);
    ag_tensor *a = ag_tensor_new1(&p, AG_F32, 8), *b = ag_tensor_new1(&p, AG_F32, 8);
    // no input requires grad: nothing recorded
    ag_tensor *y = ag_add(&c, a, b);
    ck_assert_tensor(y);
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert(!y->requires_grad);
    // grad mode off: nothing recorded, no allocation for backward (only the result)
    a->requires_grad = true;
    ag_ctx_set_grad(&c, false);
    unsigned long n0 = molt_alloc_count();
    size_t used0 = c.act.used;
    y = ag_mul(&c, a, b);
    ck_assert_tensor(y);
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert_uint_eq(c.saved_bytes, 0);
    ck_assert_uint_eq(molt_alloc_count(), n0);
    ck_assert_uint_eq(c.act.used - used0, (sizeof(ag_tensor) + 63) / 64 * 64 + 64); // struct + 32 data bytes, aligned
    // grad mode on and a requires grad: one node
    ag_ctx_set_grad(&c, true);
    y = ag_mul(&c, a, b);
    ck_assert_int_eq(c.n_tape, 1);
    ck_assert(y->requires_grad);
    ag_ctx_free(&c);
    ag_arena_free(&p);
}
END_TEST

START_TEST(test_backward_accumulates_and_frees) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_arena p;
    ag_arena_init(&p, "params", 0);
    ag_tensor *x = ag_tensor_new1(&p, AG_F64, 3);
    x->requires_grad = true;
    for (int i = 0; i < 3; i++)
        ag_set(x, i, i + 1.0);
    // L = sum(x*x + 3x): dL/dx = 2x + 3, x used twice so grads must accumulate
    ag_tensor *l = ag_sum(&c, ag_add(&c, ag_mul(&c, x, x), ag_scale(&c, x, 3.0)));
    ck_assert_tensor(l);
    ck_assert_double_eq(ag_get(l, 0), (1 + 4 + 9) + 3 * 6);
    ck_assert_ok(ag_backward(&c, l));
    for (int i = 0; i < 3; i++)
        ck_assert_double_eq(ag_get(x->grad, i), 2 * (i + 1.0) + 3);
    ck_assert_int_eq(c.n_tape, 0);
    ck_assert_uint_eq(c.saved_bytes, 0);
    // a second step accumulates on top unless zeroed
    ag_ctx_step_reset(&c);
    l = ag_sum(&c, ag_scale(&c, x, 2.0));
    ck_assert_ok(ag_backward(&c, l));
    ck_assert_double_eq(ag_get(x->grad, 0), 5 + 2);
    ag_grad_zero(x);
    ck_assert_double_eq(ag_get(x->grad, 0), 0);
    ag_ctx_free(&c);
    ag_arena_free(&p);
}
END_TEST

START_TEST(test_backward_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new1(&c.act, AG_F32, 3);
    ck_assert_int_eq(ag_backward(&c, x), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "one element"));
    ag_tensor *s = ag_sum(&c, x);
    ck_assert_int_eq(ag_backward(&c, s), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "requires grad"));
    ag_ctx_free(&c);
}
END_TEST

START_TEST(test_binary_op_errors) {
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *a = ag_tensor_new2(&c.act, AG_F32, 2, 3), *b = ag_tensor_new2(&c.act, AG_F32, 3, 2);
    ag_tensor *d = ag_tensor_new2(&c.act, AG_F64, 2, 3), *i = ag_tensor_new2(&c.act, AG_I32, 2, 3);
    ck_assert_ptr_null(ag_add(&c, a, b));
    ck_assert_str_eq(molt_err_msg(), "add: shapes differ: a [2, 3] f32, b [3, 2] f32");
    ck_assert_ptr_null(ag_mul(&c, a, d));
    ck_assert_str_eq(molt_err_msg(), "mul: a [2, 3] f32 and b [2, 3] f64 differ in dtype");
    ck_assert_ptr_null(ag_scale(&c, i, 2));
    ck_assert_str_eq(molt_err_msg(),
                     "scale: a is [2, 3] i32, expected f32 or f64 (cast bf16/f16 first)");
    ck_assert_ptr_null(ag_add(&c, NULL, a));
    ck_assert_str_eq(molt_err_msg(), "add: a is NULL");
    ag_ctx_free(&c);
}
END_TEST

static ag_tensor *build_elem(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    // (a + b) * a * 0.7, then summed with itself: covers all four ops
    ag_tensor *y = ag_scale(c, ag_mul(c, ag_add(c, in[0], in[1]), in[0]), 0.7);
    return ag_add(c, y, y);
}

START_TEST(test_gradcheck_elem) {
    int64_t shapes[3][2] = {{1, 1}, {3, 5}, {7, 13}};
    for (int s = 0; s < 3; s++) {
        ag_arena a;
        ag_arena_init(&a, "t", 0);
        ag_rng r;
        ag_rng_seed(&r, 100 + s);
        ag_tensor *in[2] = {gc_rand(&a, &r, 2, shapes[s], -1, 1, true),
                            gc_rand(&a, &r, 2, shapes[s], -1, 1, true)};
        gc_case g = {.n_in = 2, .in = in, .build = build_elem};
        gc_result res;
        ck_assert_ok(gc_gradcheck(&g, &res));
        ck_assert_int_eq(res.checked, 2 * shapes[s][0] * shapes[s][1]);
        ck_assert_msg(res.max_rel <= 1e-6, "max rel %g at input %d elem %lld (%g vs %g)",
                      res.max_rel, res.worst_input, (long long)res.worst_elem, res.analytic,
                      res.numeric);
        double rel;
        ck_assert_ok(gc_f32_vs_f64(&g, &rel));
        ck_assert_double_le(rel, 1e-5);
        ag_arena_free(&a);
    }
}
END_TEST

// A wrong backward must be caught: scale's rule with the factor doubled.
static ag_tensor *build_scale_wrong(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    ag_tensor *y = ag_scale(c, in[0], 2.0);
    if (y && c->n_tape > 0)
        ((double *)((char *)c->tape[c->n_tape - 1] + offsetof(struct ag_node, f)))[0] = 4.0;
    return y;
}

START_TEST(test_gradcheck_detects_wrong_rule) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 5);
    int64_t s[1] = {4};
    ag_tensor *in[1] = {gc_rand(&a, &r, 1, s, -1, 1, true)};
    gc_case g = {.n_in = 1, .in = in, .build = build_scale_wrong};
    gc_result res;
    ck_assert_ok(gc_gradcheck(&g, &res));
    ck_assert_double_gt(res.max_rel, 0.4);
    ag_arena_free(&a);
}
END_TEST

int main(void) {
    Suite *s = suite_create("autograd_core");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_arena_alignment_and_reset);
    tcase_add_test(tc, test_arena_alloc_failure_keeps_state);
    tcase_add_test(tc, test_arena_spilled_step_gets_one_chunk);
    tcase_add_test(tc, test_tensor_shapes_and_errors);
    tcase_add_test(tc, test_bf16_f16_roundtrip);
    tcase_add_test(tc, test_rng_reproducible);
    tcase_add_test(tc, test_tape_records_only_when_needed);
    tcase_add_test(tc, test_backward_accumulates_and_frees);
    tcase_add_test(tc, test_backward_errors);
    tcase_add_test(tc, test_binary_op_errors);
    tcase_add_test(tc, test_gradcheck_elem);
    tcase_add_test(tc, test_gradcheck_detects_wrong_rule);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
