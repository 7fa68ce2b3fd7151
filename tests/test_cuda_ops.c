// tests/test_cuda_ops.c: the device model with the real CUDA table: ops on GPU tensors
// dispatched through it, results and gradients on the GPU, saved state and workspace in the
// context's device arena (one allocation: the arena), against the same graph on the CPU.
// The graph of harness/device_graph.c (embedding to the fused loss, with routed experts and
// LoRA) in f32: about a dozen ops in a chain, each f32 on both sides with different
// summation orders (cuBLAS against OpenBLAS, parallel against serial reductions), so the
// loss and every gradient must agree to 1e-4 relative (and the router's choices exactly).
// Also: quantized linear on a qweight moved in its stored form, the optimizer entry points,
// and the errors of mixed devices. Exits 77 without a GPU.
#include "harness/cuda_check.h"
#include "harness/device_graph.h"

#include "autograd/internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#ifdef MOLT_HAVE_CUDA

static double tensor_rel(const ag_tensor *got, const ag_tensor *ref) {
    double num = 0, den = 0;
    for (int64_t i = 0; i < ref->numel; i++) {
        double g = ag_get(got, i), r = ag_get(ref, i);
        if (isnan(g))
            return INFINITY;
        num += (g - r) * (g - r);
        den += r * r;
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

START_TEST(test_graph_on_the_gpu) {
    ag_arena host, dev, back;
    ag_arena_init(&host, "host", 0);
    ag_arena_init(&back, "back", 0);
    ck_assert_ok(ag_arena_init_device(&dev, "params", AG_CUDA, (size_t)16 << 20));
    ag_rng r;
    ag_rng_seed(&r, 701);
    dg_inputs gh, gd;
    dg_fill(&gh, &host, &r);
    ck_assert_ok(dg_copy(&gd, &gh, &dev));
    ag_ctx ch, cd;
    ag_ctx_init(&ch);
    ag_ctx_init(&cd);
    ck_assert_ok(ag_ctx_use_device(&cd, AG_CUDA, (size_t)64 << 20));
    ag_tensor *lh = dg_build(&ch, &gh), *ld = dg_build(&cd, &gd);
    ck_assert_tensor(lh);
    ck_assert_tensor(ld);
    ck_assert_int_eq(ld->device, AG_CUDA);
    double e = fabs(ag_get(ld, 0) - ag_get(lh, 0)) / fabs(ag_get(lh, 0));
    ck_assert_msg(e <= 1e-4, "loss: GPU %.9g, CPU %.9g", ag_get(ld, 0), ag_get(lh, 0));
    ck_assert_ok(ag_backward(&ch, lh));
    ck_assert_ok(ag_backward(&cd, ld));
    ag_tensor *const *ph = (ag_tensor *const *)&gh, *const *pd = (ag_tensor *const *)&gd;
    int checked = 0;
    for (int i = 0; i < DG_N_INPUTS; i++) {
        if (!ph[i]->requires_grad)
            continue;
        ck_assert_msg(ph[i]->grad && pd[i]->grad, "input %d has no gradient", i);
        ck_assert_int_eq(pd[i]->grad->device, AG_CUDA);
        ag_tensor *g = ag_tensor_to(&back, pd[i]->grad);
        ck_assert_tensor(g);
        double ge = tensor_rel(g, ph[i]->grad);
        ck_assert_msg(ge <= 1e-4, "gradient of input %d: relative error %.3g", i, ge);
        checked++;
    }
    ck_assert_int_eq(checked, DG_N_TRAINED);
    ag_ctx_free(&ch);
    ag_ctx_free(&cd);
    ag_arena_free(&dev);
    ag_arena_free(&back);
    ag_arena_free(&host);
}
END_TEST

// NF4 linear on a qweight moved in its stored form, decode (T = 1: the GEMV) and prefill
// (T = 40: decoded tiles), forward and dx for a random dy (each tape run backward from the
// seeded output gradient), against the CPU op on the host qweight: 1e-5 relative.
START_TEST(test_linear_q_on_the_gpu) {
    ag_arena host, dev, back;
    ag_arena_init(&host, "host", 0);
    ag_arena_init(&back, "back", 0);
    ck_assert_ok(ag_arena_init_device(&dev, "weights", AG_CUDA, (size_t)16 << 20));
    ag_rng r;
    ag_rng_seed(&r, 702);
    ag_tensor *w = ag_tensor_new2(&host, AG_F32, 96, 256);
    ag_fill_uniform(w, &r, -1, 1);
    ag_qweight q, qd;
    ck_assert_ok(ag_qweight_quantize(&q, w, AG_Q_NF4, NULL));
    ck_assert_ok(ag_qweight_to(&qd, &q, &dev));
    const int64_t Ts[2] = {1, 40};
    for (int k = 0; k < 2; k++) {
        ag_ctx ch, cd;
        ag_ctx_init(&ch);
        ag_ctx_init(&cd);
        ck_assert_ok(ag_ctx_use_device(&cd, AG_CUDA, (size_t)32 << 20));
        ag_tensor *x = ag_tensor_new2(&host, AG_F32, Ts[k], 256);
        ag_tensor *dy = ag_tensor_new2(&host, AG_F32, Ts[k], 96);
        ag_fill_uniform(x, &r, -1, 1);
        ag_fill_uniform(dy, &r, -1, 1);
        ag_tensor *xd = ag_tensor_to(&dev, x);
        x->requires_grad = xd->requires_grad = true;
        ag_tensor *yh = ag_linear_q(&ch, x, &q), *yd = ag_linear_q(&cd, xd, &qd);
        ck_assert_tensor(yh);
        ck_assert_tensor(yd);
        ck_assert_int_eq(yd->device, AG_CUDA);
        ag_tensor *ydh = ag_tensor_to(&back, yd);
        ck_assert_msg(tensor_rel(ydh, yh) <= 1e-5, "linear_q T %lld: %.3g", (long long)Ts[k],
                      tensor_rel(ydh, yh));
        ck_assert_tensor(ag_grad_ensure(yh));
        ck_assert_tensor(ag_grad_ensure(yd));
        ck_assert_ok(ag_tensor_copy(yh->grad, dy));
        ck_assert_ok(ag_tensor_copy(yd->grad, dy));
        ck_assert_ok(ag_tape_backward(&ch));
        ck_assert_ok(ag_tape_backward(&cd));
        ck_assert_int_eq(xd->grad->device, AG_CUDA);
        ag_tensor *gxd = ag_tensor_to(&back, xd->grad);
        ck_assert_msg(tensor_rel(gxd, x->grad) <= 1e-5, "linear_q dx T %lld: %.3g",
                      (long long)Ts[k], tensor_rel(gxd, x->grad));
        ag_ctx_free(&ch);
        ag_ctx_free(&cd);
    }
    ag_qweight_free(&qd);
    ag_qweight_free(&q);
    ag_arena_free(&dev);
    ag_arena_free(&back);
    ag_arena_free(&host);
}
END_TEST

START_TEST(test_mixed_devices_and_optimizer_entry) {
    ag_arena host, dev;
    ag_arena_init(&host, "host", 0);
    ck_assert_ok(ag_arena_init_device(&dev, "params", AG_CUDA, (size_t)1 << 20));
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *x = ag_tensor_new2(&host, AG_F32, 4, 8), *w = ag_tensor_new2(&host, AG_F32, 3, 8);
    ag_tensor *xd = ag_tensor_to(&dev, x);
    ck_assert_ptr_null(ag_linear(&c, xd, w));
    ck_assert_str_eq(molt_err_msg(), "linear: x is on cuda, w is on cpu: an op's operands must "
                                     "be on one device (copy with ag_tensor_to)");
    // a device-only entry on host tensors says so
    ag_tensor *ts[1] = {x};
    double ss;
    ck_assert_int_eq(ag_sumsq_multi(&c, ts, 1, &ss), MOLT_EUNSUPPORTED);
    // and works on the device
    ag_tensor *tsd[1] = {xd};
    ag_set(xd, 3, 2.0);
    ck_assert_ok(ag_sumsq_multi(&c, tsd, 1, &ss));
    ck_assert_double_eq(ss, 4.0);
    ag_ctx_free(&c);
    ag_arena_free(&dev);
    ag_arena_free(&host);
}
END_TEST

int main(void) {
    Suite *s = suite_create("cuda_ops");
    TCase *tc = tcase_create("ops");
    tcase_add_checked_fixture(tc, NULL, cu_free_all);
    tcase_add_test(tc, test_graph_on_the_gpu);
    tcase_add_test(tc, test_linear_q_on_the_gpu);
    tcase_add_test(tc, test_mixed_devices_and_optimizer_entry);
    suite_add_tcase(s, tc);
    return cuda_test_main(s);
}

#else

int main(void) {
    printf("SKIP: built without CUDA\n");
    return 77;
}

#endif
