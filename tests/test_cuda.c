// tests/test_cuda.c: the CUDA plumbing: device query, host<->device copies, the
// elementwise add kernel against the CPU, and the one-device rule of the ops with the real
// CUDA table. Exits 77 (skipped) when no GPU is visible.
#include "harness/cuda_check.h"

#include <stdlib.h>

START_TEST(test_cuda_roundtrip_and_add) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 3);
    int64_t n = 100003; // not a multiple of the block size
    ag_tensor *x = ag_tensor_new1(&a, AG_F32, n), *y = ag_tensor_new1(&a, AG_F32, n);
    ag_fill_uniform(x, &r, -1, 1);
    ag_fill_uniform(y, &r, -1, 1);
    ag_tensor *dx = ag_to_device(x, AG_CUDA), *dy = ag_to_device(y, AG_CUDA);
    ck_assert_tensor(dx);
    ck_assert_tensor(dy);
    ck_assert_int_eq(dx->device, AG_CUDA);
    ag_tensor *dz = ag_to_device(x, AG_CUDA);
    ck_assert_tensor(dz);
    ck_assert_ok(ag_device_add(dz, dx, dy));
    ag_tensor *z = ag_to_device(dz, AG_CPU), *back = ag_to_device(dx, AG_CPU);
    ck_assert_tensor(z);
    for (int64_t i = 0; i < n; i++) {
        ck_assert_float_eq(((float *)back->data)[i], ((float *)x->data)[i]);
        ck_assert_float_eq(((float *)z->data)[i], ((float *)x->data)[i] + ((float *)y->data)[i]);
    }
    // an op given tensors on two devices names both instead of reading device memory
    ag_ctx c;
    ag_ctx_init(&c);
    ck_assert_ptr_null(ag_add(&c, dx, y));
    ck_assert_str_eq(molt_err_msg(), "add: a is on cuda, b is on cpu: an op's operands must be "
                                     "on one device (copy with ag_tensor_to)");
    ag_ctx_free(&c);
    ag_device_tensor_free(dx);
    ag_device_tensor_free(dy);
    ag_device_tensor_free(dz);
    ag_device_tensor_free(z);
    ag_device_tensor_free(back);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_cuda_describe) {
    char buf[256];
    ck_assert_ok(ag_cuda_describe(0, buf, sizeof buf));
    ck_assert_ptr_nonnull(strstr(buf, "sm_"));
}
END_TEST

int main(void) {
    Suite *s = suite_create("cuda");
    TCase *tc = tcase_create("plumbing");
    tcase_add_test(tc, test_cuda_roundtrip_and_add);
    tcase_add_test(tc, test_cuda_describe);
    suite_add_tcase(s, tc);
    return cuda_test_main(s);
}
