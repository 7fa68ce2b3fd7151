// tests/test_device_cpu.c: device plumbing that must work on every machine: the query
// never fails, CPU copies are exact, and CUDA requests without a GPU are clean errors.
#include "harness/harness.h"

#include <string.h>

START_TEST(test_query_and_cpu_copy) {
    ag_device_info info;
    ag_device_query(&info);
    ck_assert_int_ge(info.cuda_devices, 0);
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_tensor *x = ag_tensor_new2(&a, AG_F32, 3, 5);
    for (int i = 0; i < 15; i++)
        ag_set(x, i, i * 0.5);
    ag_tensor *y = ag_to_device(x, AG_CPU), *z = ag_to_device(x, AG_CPU);
    ck_assert_tensor(y);
    ck_assert(ag_same_shape(x, y));
    ck_assert_ptr_ne(x->data, y->data);
    ck_assert_ok(ag_device_add(z, x, y));
    for (int i = 0; i < 15; i++)
        ck_assert_double_eq(ag_get(z, i), i * 1.0);
    ag_device_tensor_free(y);
    ag_device_tensor_free(z);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_cuda_without_gpu_is_an_error) {
    ag_device_info info;
    ag_device_query(&info);
    if (info.cuda_devices > 0)
        return; // covered by test_cuda on machines with a GPU
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_tensor *x = ag_tensor_new1(&a, AG_F32, 4);
    ck_assert_ptr_null(ag_to_device(x, AG_CUDA));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "to_device: "));
    char buf[64];
    ck_assert_int_eq(ag_cuda_describe(0, buf, sizeof buf), MOLT_EDEVICE);
    ag_arena_free(&a);
}
END_TEST

int main(void) {
    Suite *s = suite_create("device_cpu");
    TCase *tc = tcase_create("device");
    tcase_add_test(tc, test_query_and_cpu_copy);
    tcase_add_test(tc, test_cuda_without_gpu_is_an_error);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
