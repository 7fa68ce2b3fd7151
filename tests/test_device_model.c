// tests/test_device_model.c: the device model on any machine. A stand-in table serves
// AG_CUDA with host memory and the CPU kernels (ag_backend_override), so everything above
// the kernels runs here: device arenas (one block, no growth, mark/rewind), tensors and
// qweights moved in their stored form, the one-device rule and its message, ops dispatched
// through the table (results and gradients on the device, saved state in the device arena),
// a missing kernel reported as such, and a small training graph giving bit for bit the CPU
// results. The real CUDA table is exercised by tests/test_cuda_*.c on a GPU.
#include "harness/harness.h"

#include "autograd/backend.h"
#include "harness/device_graph.h"

#include <string.h>

// ---- the stand-in device -------------------------------------------------------------------

static int n_alloc, n_free, n_linear;

static molt_status fake_alloc(void **p, size_t bytes) {
    n_alloc++;
    return ag_backend_cpu.mem_alloc(p, bytes);
}
static void fake_free(void *p) {
    n_free++;
    ag_backend_cpu.mem_free(p);
}
static molt_status fake_linear_fwd(ag_ctx *c, ag_tensor *y, const ag_tensor *x,
                                   const ag_tensor *w, bool rec) {
    n_linear++;
    ck_assert_int_eq(y->device, AG_CUDA);
    ck_assert_int_eq(x->device, AG_CUDA);
    return ag_cpu_linear_fwd(c, y, x, w, rec);
}

static ag_backend fake;

static void fake_setup(void) {
    fake = ag_backend_cpu;
    fake.name = "cuda";
    fake.device = AG_CUDA;
    fake.ce_fuses = false; // the non-fused loss, as CUDA runs it
    fake.mem_alloc = fake_alloc;
    fake.mem_free = fake_free;
    fake.linear_fwd = fake_linear_fwd;
    fake.softmax_fwd = NULL; // an op without a kernel on this device
    n_alloc = n_free = n_linear = 0;
    ag_backend_override(AG_CUDA, &fake);
}

static void fake_teardown(void) { ag_backend_override(AG_CUDA, NULL); }

// ---- arenas --------------------------------------------------------------------------------

START_TEST(test_device_arena_one_block) {
    ag_arena a;
    ck_assert_ok(ag_arena_init_device(&a, "dev", AG_CUDA, 4096));
    ck_assert_int_eq(n_alloc, 1);
    ck_assert_int_eq(a.device, AG_CUDA);
    ag_tensor *t = ag_tensor_new2(&a, AG_F32, 10, 10); // 400 bytes -> 512 with alignment
    ck_assert_tensor(t);
    ck_assert_int_eq(t->device, AG_CUDA);
    ck_assert_ptr_eq(t->arena, &a);
    ck_assert_int_eq(n_alloc, 1); // the tensor is carved from the block
    ck_assert_uint_eq(a.used, 512);
    size_t m = ag_arena_mark(&a);
    ck_assert_ptr_nonnull(ag_arena_alloc(&a, 1000));
    ck_assert_uint_eq(a.used, 512 + 1024);
    ag_arena_rewind(&a, m);
    ck_assert_uint_eq(a.used, 512);
    // a request that does not fit is an error naming the arena, never a new allocation
    ck_assert_ptr_null(ag_arena_alloc(&a, 8192));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "arena dev (cuda): 8192 bytes requested"));
    ck_assert_int_eq(n_alloc, 1);
    ag_arena_reset(&a);
    ck_assert_uint_eq(a.used, 0);
    ck_assert_uint_eq(a.peak, 1536);
    ag_arena_free(&a);
    ck_assert_int_eq(n_free, 1);
}
END_TEST

START_TEST(test_tensor_moves_keep_bits) {
    ag_arena host, dev, back;
    ag_arena_init(&host, "host", 0);
    ag_arena_init(&back, "back", 0);
    ck_assert_ok(ag_arena_init_device(&dev, "dev", AG_CUDA, 1 << 16));
    ag_rng r;
    ag_rng_seed(&r, 5);
    ag_tensor *x = ag_tensor_new2(&host, AG_F32, 7, 3);
    ag_fill_uniform(x, &r, -2, 2);
    ag_tensor *d = ag_tensor_to(&dev, x);
    ck_assert_tensor(d);
    ck_assert_int_eq(d->device, AG_CUDA);
    ck_assert(!d->requires_grad);
    ag_tensor *h = ag_tensor_to(&back, d);
    ck_assert_tensor(h);
    ck_assert_int_eq(h->device, AG_CPU);
    ck_assert_int_eq(memcmp(h->data, x->data, 21 * sizeof(float)), 0);
    // element access goes through the device's copies
    ck_assert_double_eq(ag_get(d, 4), ag_get(x, 4));
    ag_set(d, 4, 1.5);
    ck_assert_double_eq(ag_get(d, 4), 1.5);
    // shapes must agree
    ag_tensor *wrong = ag_tensor_new2(&host, AG_F32, 3, 7);
    ck_assert_int_eq(ag_tensor_copy(wrong, d), MOLT_EARG);
    ag_arena_free(&dev);
    ag_arena_free(&back);
    ag_arena_free(&host);
}
END_TEST

START_TEST(test_qweight_moves_in_stored_form) {
    ag_arena host, dev;
    ag_arena_init(&host, "host", 0);
    ck_assert_ok(ag_arena_init_device(&dev, "weights", AG_CUDA, 1 << 20));
    ag_rng r;
    ag_rng_seed(&r, 9);
    ag_tensor *w = ag_tensor_new2(&host, AG_F32, 24, 130); // odd width: blocks cross rows
    ag_fill_uniform(w, &r, -1, 1);
    ag_qformat fmts[3] = {AG_Q_NF4, AG_Q_INT8, AG_Q_FP8};
    for (int f = 0; f < 3; f++) {
        ag_qweight q, qd;
        ck_assert_ok(ag_qweight_quantize(&q, w, fmts[f], NULL));
        ck_assert_ok(ag_qweight_to(&qd, &q, &dev));
        ck_assert_int_eq(qd.device, AG_CUDA);
        ck_assert_ptr_null(qd.mem);
        ck_assert_uint_eq(qd.bytes, q.bytes);
        // the same stored bytes, piece by piece
        size_t data = fmts[f] == AG_Q_NF4 ? (size_t)(q.numel + 1) / 2 : (size_t)q.numel;
        ck_assert_int_eq(memcmp(qd.data, q.data, data), 0);
        if (q.absmax_q) {
            ck_assert_int_eq(memcmp(qd.absmax_q, q.absmax_q, (size_t)q.n_blocks), 0);
            ck_assert_int_eq(memcmp(qd.absmax_scale, q.absmax_scale,
                                    (size_t)q.n_blocks2 * sizeof(float)), 0);
            ck_assert_float_eq(qd.absmax_offset, q.absmax_offset);
        } else {
            size_t ns = fmts[f] == AG_Q_NF4 ? (size_t)q.n_blocks : (size_t)(q.n_mat * q.rows);
            ck_assert_int_eq(memcmp(qd.scale, q.scale, ns * sizeof(float)), 0);
        }
        // the linear op on the device copy gives the host result
        ag_ctx c;
        ag_ctx_init(&c);
        ck_assert_ok(ag_ctx_use_device(&c, AG_CUDA, 1 << 20));
        ag_tensor *x = ag_tensor_new2(&host, AG_F32, 3, 130);
        ag_fill_uniform(x, &r, -1, 1);
        ag_tensor *xd = ag_tensor_to(&dev, x);
        ag_tensor *yh = ag_linear_q(&c, x, &q), *yd = ag_linear_q(&c, xd, &qd);
        ck_assert_tensor(yh);
        ck_assert_tensor(yd);
        ck_assert_int_eq(yd->device, AG_CUDA);
        ck_assert_int_eq(memcmp(yh->data, yd->data, (size_t)yh->numel * sizeof(float)), 0);
        // a host qweight with a device x is refused, naming both
        ck_assert_ptr_null(ag_linear_q(&c, xd, &q));
        ck_assert_str_eq(molt_err_msg(), "linear_q: x is on cuda, w is on cpu: an op's operands "
                                         "must be on one device (copy the qweight with "
                                         "ag_qweight_to)");
        ag_ctx_free(&c);
        ag_qweight_free(&qd); // owns nothing: the arena holds the storage
        ag_qweight_free(&q);
    }
    ag_arena_free(&dev);
    ag_arena_free(&host);
}
END_TEST

// ---- dispatch -------------------------------------------------------------------------------

START_TEST(test_one_device_rule) {
    ag_arena host, dev;
    ag_arena_init(&host, "host", 0);
    ck_assert_ok(ag_arena_init_device(&dev, "dev", AG_CUDA, 1 << 16));
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new2(&host, AG_F32, 2, 3), *w = ag_tensor_new2(&host, AG_F32, 4, 3);
    ag_tensor *xd = ag_tensor_to(&dev, x);
    ck_assert_ptr_null(ag_linear(&c, xd, w));
    ck_assert_str_eq(molt_err_msg(), "linear: x is on cuda, w is on cpu: an op's operands must "
                                     "be on one device (copy with ag_tensor_to)");
    ck_assert_ptr_null(ag_add(&c, x, xd));
    ck_assert_str_eq(molt_err_msg(), "add: a is on cpu, b is on cuda: an op's operands must be "
                                     "on one device (copy with ag_tensor_to)");
    // a kernel the device lacks is named
    ck_assert_ptr_null(ag_softmax(&c, xd));
    ck_assert_str_eq(molt_err_msg(), "softmax has no kernel on cuda yet");
    // ops that walk host memory refuse device tensors
    ck_assert_ptr_null(ag_transpose(&c, xd, 0, 1));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "this op runs on the CPU only"));
    ag_ctx_free(&c);
    ag_arena_free(&dev);
    ag_arena_free(&host);
}
END_TEST

static void assert_same(const ag_tensor *h, const ag_tensor *d, const char *what) {
    ck_assert_msg(h && d, "%s: missing", what);
    ck_assert_int_eq(d->device, AG_CUDA);
    for (int64_t i = 0; i < h->numel; i++)
        ck_assert_msg(ag_get(h, i) == ag_get(d, i), "%s[%lld]: host %.9g device %.9g", what,
                      (long long)i, ag_get(h, i), ag_get(d, i));
}

// The graph of harness/device_graph.c on the host and on the stand-in device from the same
// values: everything must agree bit for bit (the same CPU kernels run in both).
START_TEST(test_training_graph_on_the_device) {
    ag_arena host, dev;
    ag_arena_init(&host, "host", 0);
    ck_assert_ok(ag_arena_init_device(&dev, "params", AG_CUDA, 1 << 20));
    ag_rng r;
    ag_rng_seed(&r, 21);
    dg_inputs gh, gd;
    dg_fill(&gh, &host, &r);
    ck_assert_ok(dg_copy(&gd, &gh, &dev));
    ag_ctx ch, cd;
    ag_ctx_init(&ch);
    ag_ctx_init(&cd);
    ck_assert_ok(ag_ctx_use_device(&cd, AG_CUDA, 1 << 20));
    int allocs = n_alloc;
    ag_tensor *lh = dg_build(&ch, &gh), *ld = dg_build(&cd, &gd);
    ck_assert_tensor(lh);
    ck_assert_tensor(ld);
    ck_assert_int_gt(n_linear, 0);
    ck_assert_int_eq(n_alloc, allocs); // ops allocate nothing on the device
    assert_same(lh, ld, "loss");
    ck_assert_ok(ag_backward(&ch, lh));
    ck_assert_ok(ag_backward(&cd, ld));
    ck_assert_int_eq(n_alloc, allocs);
    ag_tensor *const *ph = (ag_tensor *const *)&gh, *const *pd = (ag_tensor *const *)&gd;
    int checked = 0;
    for (int i = 0; i < DG_N_INPUTS; i++) {
        if (!ph[i]->requires_grad)
            continue;
        ck_assert_msg(ph[i]->grad && pd[i]->grad, "input %d has no gradient", i);
        assert_same(ph[i]->grad, pd[i]->grad, "gradient");
        checked++;
    }
    ck_assert_int_eq(checked, DG_N_TRAINED);
    ck_assert(cd.dev_act.used > 0);
    ag_ctx_step_reset(&cd);
    ck_assert_uint_eq(cd.dev_act.used, 0);
    ag_ctx_free(&ch);
    ag_ctx_free(&cd);
    ag_arena_free(&dev);
    ag_arena_free(&host);
}
END_TEST

START_TEST(test_device_arena_full_is_an_error) {
    ag_arena host;
    ag_arena_init(&host, "host", 0);
    ag_ctx c;
    ag_ctx_init(&c);
    ck_assert_ok(ag_ctx_use_device(&c, AG_CUDA, 1024));
    ag_arena dev;
    ck_assert_ok(ag_arena_init_device(&dev, "params", AG_CUDA, 1 << 16));
    ag_tensor *x = ag_tensor_to(&dev, ag_tensor_new2(&host, AG_F32, 40, 40));
    ck_assert_ptr_null(ag_scale(&c, x, 2.0));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "arena device activations (cuda)"));
    ag_ctx_free(&c);
    ag_arena_free(&dev);
    ag_arena_free(&host);
}
END_TEST

START_TEST(test_no_cuda_table_without_cuda) {
    fake_teardown();
#ifndef MOLT_HAVE_CUDA
    ag_arena a;
    ck_assert_int_eq(ag_arena_init_device(&a, "dev", AG_CUDA, 64), MOLT_EDEVICE);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "this build has no CUDA"));
#else
    ck_assert_ptr_nonnull(ag_backend_cuda_table());
#endif
}
END_TEST

int main(void) {
    Suite *s = suite_create("device_model");
    TCase *tc = tcase_create("stand-in device");
    tcase_add_checked_fixture(tc, fake_setup, fake_teardown);
    tcase_add_test(tc, test_device_arena_one_block);
    tcase_add_test(tc, test_tensor_moves_keep_bits);
    tcase_add_test(tc, test_qweight_moves_in_stored_form);
    tcase_add_test(tc, test_one_device_rule);
    tcase_add_test(tc, test_training_graph_on_the_device);
    tcase_add_test(tc, test_device_arena_full_is_an_error);
    tcase_add_test(tc, test_no_cuda_table_without_cuda);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
