// tests/test_cuda_optim.c: the optimizer kernels over many tensors in one launch against
// train/optim.c on the same values: AdamW (parameters and both moments equal bit for bit,
// with and without weight decay, tensor sizes around the 4096-element chunks: 1, 4095,
// 4096, 4097, 100003), the per-tensor sums of squares behind the global gradient norm
// (double sums in another order: 1e-12 relative) and the clipping scale (bit for bit).
// Exits 77 without a GPU.
#include "harness/cuda_check.h"

#include "train/train.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#ifdef MOLT_HAVE_CUDA

static const int64_t sizes[] = {1, 4095, 4096, 4097, 100003, 33};
#define NT (int)(sizeof sizes / sizeof sizes[0])

// The scalars of step t as train/optim.c forms them (train.h's formula): doubles, rounded to
// float once.
static void scalars(molt_cuda_adamw_item *it, const opt_adamw_config *c, double lr, int64_t t) {
    double bc1 = 1.0 - pow(c->beta1, (double)t), bc2 = 1.0 - pow(c->beta2, (double)t);
    it->decay = (float)(1.0 - lr * c->weight_decay);
    it->w1 = (float)(1.0 - c->beta1);
    it->b2 = (float)c->beta2;
    it->c2 = (float)(1.0 - c->beta2);
    it->neg_step = (float)(-(lr / bc1));
    it->bc2_sqrt = (float)pow(bc2, 0.5);
    it->eps = (float)c->eps;
    it->apply_decay = c->weight_decay != 0;
}

static void adamw_case(double wd, ag_rng *r) {
    ag_arena a;
    ag_arena_init(&a, "params", 0);
    ag_tensor *ps[NT];
    opt_adamw_config cfg;
    opt_adamw_defaults(&cfg);
    cfg.weight_decay = wd;
    for (int i = 0; i < NT; i++) {
        ps[i] = ag_tensor_new1(&a, AG_F32, sizes[i]);
        ag_tensor_set_name(ps[i], "p");
        fill_f(ps[i]->data, sizes[i], r, -1, 1);
        ck_assert_tensor(ag_grad_ensure(ps[i]));
        fill_f(ps[i]->grad->data, sizes[i], r, -0.1, 0.1);
    }
    opt_adamw o;
    ck_assert_ok(opt_adamw_init(&o, NT, ps, &cfg));
    molt_cuda_adamw_item items[NT];
    int64_t numel[NT];
    const double lr = 3e-3;
    for (int i = 0; i < NT; i++) { // moments as after a few steps; step 5 comes next
        fill_f(o.m[i], sizes[i], r, -0.01, 0.01);
        fill_f(o.v[i], sizes[i], r, 0, 1e-4);
        o.steps[i] = 4;
        numel[i] = sizes[i];
        items[i] = (molt_cuda_adamw_item){.p = cu_up(ps[i]->data, sizes[i] * 4),
                                          .g = cu_up(ps[i]->grad->data, sizes[i] * 4),
                                          .m = cu_up(o.m[i], sizes[i] * 4),
                                          .v = cu_up(o.v[i], sizes[i] * 4), .n = sizes[i]};
        scalars(&items[i], &cfg, lr, 5);
    }
    void *ws = cu_alloc(molt_cuda_multi_ws_bytes(NT, numel));
    ck_cuda(molt_cuda_adamw(items, NT, ws));
    ck_assert_ok(opt_adamw_step(&o, lr));
    float *got = molt_malloc(100003 * 4);
    for (int i = 0; i < NT; i++) {
        cu_down(got, items[i].p, sizes[i] * 4);
        ck_same_bits(got, ps[i]->data, sizes[i], "adamw p");
        cu_down(got, items[i].m, sizes[i] * 4);
        ck_same_bits(got, o.m[i], sizes[i], "adamw m");
        cu_down(got, items[i].v, sizes[i] * 4);
        ck_same_bits(got, o.v[i], sizes[i], "adamw v");
    }
    molt_free(got);
    opt_adamw_free(&o);
    ag_arena_free(&a);
    cu_free_all();
}

START_TEST(test_adamw_bits) {
    ag_rng r;
    ag_rng_seed(&r, 601);
    adamw_case(0.01, &r);
    adamw_case(0.0, &r);
}
END_TEST

START_TEST(test_sumsq_and_scale) {
    ag_rng r;
    ag_rng_seed(&r, 602);
    float *host[NT];
    float *dev[NT];
    int64_t numel[NT];
    for (int i = 0; i < NT; i++) {
        numel[i] = sizes[i];
        host[i] = molt_malloc(sizes[i] * 4);
        fill_f(host[i], sizes[i], &r, -2, 2);
        dev[i] = cu_up(host[i], sizes[i] * 4);
    }
    void *ws = cu_alloc(molt_cuda_multi_ws_bytes(NT, numel));
    double got[NT];
    ck_cuda(molt_cuda_sumsq((const float *const *)dev, numel, NT, got, ws));
    for (int i = 0; i < NT; i++) {
        double ss = 0;
        for (int64_t j = 0; j < sizes[i]; j++)
            ss += (double)host[i][j] * host[i][j];
        ck_assert_msg(fabs(got[i] - ss) <= 1e-12 * ss, "sumsq %d: %.17g, expected %.17g", i,
                      got[i], ss);
    }
    ck_cuda(molt_cuda_multi_scale(dev, numel, NT, 0.3125f, ws));
    float *back = molt_malloc(100003 * 4);
    for (int i = 0; i < NT; i++) {
        cu_down(back, dev[i], sizes[i] * 4);
        for (int64_t j = 0; j < sizes[i]; j++)
            host[i][j] *= 0.3125f;
        ck_same_bits(back, host[i], sizes[i], "multi_scale");
        molt_free(host[i]);
    }
    molt_free(back);
    cu_free_all();
}
END_TEST

int main(void) {
    Suite *s = suite_create("cuda_optim");
    TCase *tc = tcase_create("optim");
    tcase_add_checked_fixture(tc, NULL, cu_free_all);
    tcase_add_test(tc, test_adamw_bits);
    tcase_add_test(tc, test_sumsq_and_scale);
    suite_add_tcase(s, tc);
    return cuda_test_main(s);
}

#else

int main(void) {
    printf("SKIP: built without CUDA\n");
    return 77;
}

#endif
