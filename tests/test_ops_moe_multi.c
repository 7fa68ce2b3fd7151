// tests/test_ops_moe_multi.c: routed experts over a batch of mixed adapters
// (ag_moe_experts_multi): each token against the single-adapter op run on that token alone,
// a token's bits unchanged whatever else is in the batch (and for any thread count), dense
// and quantized (NF4, INT8) stacks, gradients w.r.t. x, the routing weights and every LoRA
// matrix by finite differences, f32 vs f64, optimized vs reference, and operand errors.
#include "harness/harness.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#define T_ 11
#define E_ 4
#define K_ 2
#define H_ 6
#define I_ 3
#define N_AD 3 // adapter 0: r 2 on both stacks; 1: r 1 on gate_up only; 2: no expert LoRA

enum { X, W, IDX, SLOT, GU, D, A0GU, B0GU, A0D, B0D, A1GU, B1GU, N_INPUTS };

static const double scales[N_AD] = {1.5, -0.75, 1.0};

static void set_of(ag_tensor **in, ag_expert_lora *set) {
    set[0] = (ag_expert_lora){in[A0GU], in[B0GU], in[A0D], in[B0D], 2, scales[0], NULL, NULL};
    set[1] = (ag_expert_lora){in[A1GU], in[B1GU], NULL, NULL, 1, scales[1], NULL, NULL};
    set[2] = (ag_expert_lora){NULL, NULL, NULL, NULL, 0, scales[2], NULL, NULL};
}

static ag_tensor *build(ag_ctx *c, ag_tensor **in, void *user) {
    (void)user;
    ag_expert_lora set[N_AD];
    set_of(in, set);
    ag_expert_stacks st = {in[GU], in[D], NULL, NULL};
    return ag_moe_experts_multi(c, in[X], in[W], in[IDX], &st, in[SLOT], N_AD, set);
}

// F64 inputs; slots cycle -1, 0, 1, 2 in a scrambled order; expert E-1 is never used.
static void make_inputs(ag_arena *a, ag_rng *r, int64_t T, ag_tensor **in) {
    in[X] = gc_rand(a, r, 2, (int64_t[]){T, H_}, -1, 1, true);
    in[W] = gc_rand(a, r, 2, (int64_t[]){T, K_}, 0.2, 1.2, true);
    in[IDX] = ag_tensor_new2(a, AG_I32, T, K_);
    in[SLOT] = ag_tensor_new1(a, AG_I32, T);
    for (int64_t t = 0; t < T; t++) {
        for (int j = 0; j < K_; j++)
            ((int32_t *)in[IDX]->data)[t * K_ + j] = (int32_t)((t + 2 * j + t / 3) % (E_ - 1));
        ((int32_t *)in[SLOT]->data)[t] = (int32_t)((t * 5 + 1) % (N_AD + 1)) - 1;
    }
    in[GU] = gc_rand(a, r, 3, (int64_t[]){E_, 2 * I_, H_}, -0.8, 0.8, false);
    in[D] = gc_rand(a, r, 3, (int64_t[]){E_, H_, I_}, -0.8, 0.8, false);
    in[A0GU] = gc_rand(a, r, 2, (int64_t[]){2 * E_, H_}, -0.7, 0.7, true);
    in[B0GU] = gc_rand(a, r, 2, (int64_t[]){2 * I_, 2 * E_}, -0.7, 0.7, true);
    in[A0D] = gc_rand(a, r, 2, (int64_t[]){2 * E_, I_}, -0.7, 0.7, true);
    in[B0D] = gc_rand(a, r, 2, (int64_t[]){H_, 2 * E_}, -0.7, 0.7, true);
    in[A1GU] = gc_rand(a, r, 2, (int64_t[]){E_, H_}, -0.7, 0.7, true);
    in[B1GU] = gc_rand(a, r, 2, (int64_t[]){2 * I_, E_}, -0.7, 0.7, true);
}

static void to_f32(ag_arena *a, ag_tensor **in64, ag_tensor **in) {
    for (int i = 0; i < N_INPUTS; i++)
        in[i] = gc_clone(a, in64[i], AG_F32);
}

// A fresh arena a with make_inputs' F64 inputs for T tokens (rng seed `seed`) and their F32
// copies.
static void inputs_f32(ag_arena *a, uint64_t seed, int64_t T, ag_tensor **in64, ag_tensor **in) {
    ag_arena_init(a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, seed);
    make_inputs(a, &r, T, in64);
    to_f32(a, in64, in);
}

// Row t of every per-token input, as a batch of one token.
static void one_row(ag_ctx *c, ag_tensor **in, int64_t t, ag_tensor **out) {
    memcpy(out, in, N_INPUTS * sizeof *out);
    int rowwise[4] = {X, W, IDX, SLOT};
    for (int i = 0; i < 4; i++)
        out[rowwise[i]] = ag_slice(c, in[rowwise[i]], 0, t, 1);
}

// Each token against the single-adapter op (or the frozen experts) on that token alone.
START_TEST(test_tokens_match_their_adapter_alone) {
    ag_arena a;
    ag_tensor *in64[N_INPUTS], *in[N_INPUTS];
    inputs_f32(&a, 1, T_, in64, in);
    ag_expert_lora set[N_AD];
    set_of(in, set);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_tensor *y = build(&c, in, NULL);
        ck_assert_tensor(y);
        for (int64_t t = 0; t < T_; t++) {
            ag_tensor *o[N_INPUTS];
            one_row(&c, in, t, o);
            int s = ((int32_t *)in[SLOT]->data)[t];
            ag_tensor *want = s >= 0 && s < 2
                                  ? ag_moe_experts_lora(&c, o[X], o[W], o[IDX], in[GU], in[D],
                                                        &set[s])
                                  : ag_moe_experts(&c, o[X], o[W], o[IDX], in[GU], in[D]);
            ck_assert_tensor(want);
            for (int h = 0; h < H_; h++) {
                double g = ag_get(y, t * H_ + h), w = ag_get(want, h);
                ck_assert_msg(fabs(g - w) <= 1e-5 * (1 + fabs(w)), "token %lld h %d: %g vs %g",
                              (long long)t, h, g, w);
            }
        }
        ag_ctx_free(&c);
    }
    ag_set_reference_kernels(false);
    ag_arena_free(&a);
}
END_TEST

// Optimized kernel, f32: a token's output has the same bits alone, in the full batch, in a
// batch with the rows reversed, on 1 or 2 threads; dense and quantized stacks.
static void check_invariance(ag_tensor **in, const ag_expert_stacks *st) {
    ag_expert_lora set[N_AD];
    set_of(in, set);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *full = ag_moe_experts_multi(&c, in[X], in[W], in[IDX], st, in[SLOT], N_AD, set);
    ck_assert_tensor(full);
    int64_t T = in[X]->shape[0];
    ag_tensor *rev[N_INPUTS];
    memcpy(rev, in, sizeof rev);
    int rowwise[4] = {X, W, IDX, SLOT};
    for (int i = 0; i < 4; i++) {
        ag_tensor *src = in[rowwise[i]];
        ag_tensor *d = ag_tensor_new2(&c.act, src->dtype, T, src->shape[1 % src->ndim]);
        if (src->ndim == 1)
            d = ag_tensor_new1(&c.act, src->dtype, T);
        size_t w = (size_t)(src->numel / T) * ag_dtype_size(src->dtype);
        for (int64_t t = 0; t < T; t++)
            memcpy((char *)d->data + (T - 1 - t) * w, (char *)src->data + t * w, w);
        rev[rowwise[i]] = d;
    }
    for (int threads = 1; threads <= 2; threads++) {
        omp_set_num_threads(threads);
        ag_tensor *yr = ag_moe_experts_multi(&c, rev[X], rev[W], rev[IDX], st, rev[SLOT], N_AD,
                                             set);
        ck_assert_tensor(yr);
        for (int64_t t = 0; t < T; t++)
            ck_assert_msg(!memcmp((float *)yr->data + (T - 1 - t) * H_,
                                  (float *)full->data + t * H_, H_ * sizeof(float)),
                          "token %lld differs in the reversed batch", (long long)t);
        for (int64_t t = 0; t < T; t++) {
            ag_tensor *o[N_INPUTS];
            one_row(&c, in, t, o);
            ag_tensor *y1 = ag_moe_experts_multi(&c, o[X], o[W], o[IDX], st, o[SLOT], N_AD, set);
            ck_assert_tensor(y1);
            ck_assert_msg(!memcmp(y1->data, (float *)full->data + t * H_, H_ * sizeof(float)),
                          "token %lld differs alone", (long long)t);
        }
    }
    omp_set_num_threads(2);
    ag_ctx_free(&c);
}

// b [out, r*E] re-laid per expert [E, out, r] (element [e, o, q] = b[o, q*E + e]).
static ag_tensor *per_expert(ag_arena *a, const ag_tensor *b, int64_t r) {
    int64_t out = b->shape[0], E = b->shape[1] / r;
    ag_tensor *p = ag_tensor_new(a, AG_F32, 3, (int64_t[]){E, out, r});
    ck_assert_tensor(p);
    for (int64_t e = 0; e < E; e++)
        for (int64_t o = 0; o < out; o++)
            for (int64_t q = 0; q < r; q++)
                ((float *)p->data)[(e * out + o) * r + q] =
                    ((const float *)b->data)[o * r * E + q * E + e];
    return p;
}

// With every B also given re-laid per expert (bp_*, what serving hands the kernel, made by
// ag_expert_b_per_expert) the output has the same bits as with B gathered per call.
START_TEST(test_per_expert_b_same_bits) {
    ag_arena a;
    ag_tensor *in64[N_INPUTS], *in[N_INPUTS];
    inputs_f32(&a, 3, T_, in64, in);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_expert_lora set[N_AD];
    set_of(in, set);
    ag_expert_stacks st = {in[GU], in[D], NULL, NULL};
    ag_tensor *y = ag_moe_experts_multi(&c, in[X], in[W], in[IDX], &st, in[SLOT], N_AD, set);
    ck_assert_tensor(y);
    // ag_expert_b_per_expert (what serving's adapter loader calls) lays B out as stated
    const struct {
        int in, r;
        ag_tensor **bp;
    } re[3] = {{B0GU, 2, &set[0].bp_gate_up}, {B0D, 2, &set[0].bp_down},
               {B1GU, 1, &set[1].bp_gate_up}};
    for (int i = 0; i < 3; i++) {
        ck_assert_ok(ag_expert_b_per_expert(&a, in[re[i].in], re[i].r, re[i].bp));
        ag_tensor *want = per_expert(&a, in[re[i].in], re[i].r);
        ck_assert(memcmp((*re[i].bp)->data, want->data, (size_t)want->numel * sizeof(float)) == 0);
    }
    ag_tensor *none;
    ck_assert_int_eq(ag_expert_b_per_expert(&a, in[B0GU], 3, &none), MOLT_EARG); // 8 % 3
    ck_assert_ptr_null(none);
    ag_tensor *yp = ag_moe_experts_multi(&c, in[X], in[W], in[IDX], &st, in[SLOT], N_AD, set);
    ck_assert_tensor(yp);
    ck_assert(memcmp(y->data, yp->data, (size_t)y->numel * sizeof(float)) == 0);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_tokens_do_not_depend_on_the_batch) {
    ag_arena a;
    ag_tensor *in64[N_INPUTS], *in[N_INPUTS];
    inputs_f32(&a, 2, 40, in64, in);
    ag_expert_stacks dense = {in[GU], in[D], NULL, NULL};
    check_invariance(in, &dense);
    ag_qformat fmts[2] = {AG_Q_NF4, AG_Q_INT8};
    for (int f = 0; f < 2; f++) {
        ag_qweight qg, qd;
        ck_assert_ok(ag_qweight_quantize(&qg, in[GU], fmts[f], NULL));
        ck_assert_ok(ag_qweight_quantize(&qd, in[D], fmts[f], NULL));
        ag_expert_stacks q = {NULL, NULL, &qg, &qd};
        check_invariance(in, &q);
        ag_qweight_free(&qg);
        ag_qweight_free(&qd);
    }
    ag_arena_free(&a);
}
END_TEST

// Quantized stacks: optimized against reference (which runs each group through
// ag_moe_experts_lora_q / ag_moe_experts_q).
START_TEST(test_quantized_fast_matches_reference) {
    ag_arena a;
    ag_tensor *in64[N_INPUTS], *in[N_INPUTS];
    inputs_f32(&a, 3, T_, in64, in);
    ag_expert_lora set[N_AD];
    set_of(in, set);
    ag_qformat fmts[3] = {AG_Q_NF4, AG_Q_INT8, AG_Q_BF16};
    for (int f = 0; f < 3; f++) {
        ag_qweight qg, qd;
        ck_assert_ok(ag_qweight_quantize(&qg, in[GU], fmts[f], NULL));
        ck_assert_ok(ag_qweight_quantize(&qd, in[D], fmts[f], NULL));
        ag_expert_stacks q = {NULL, NULL, &qg, &qd};
        ag_ctx c;
        ag_ctx_init(&c);
        ag_set_reference_kernels(false);
        ag_tensor *yf = ag_moe_experts_multi(&c, in[X], in[W], in[IDX], &q, in[SLOT], N_AD, set);
        ag_set_reference_kernels(true);
        ag_tensor *yr = ag_moe_experts_multi(&c, in[X], in[W], in[IDX], &q, in[SLOT], N_AD, set);
        ag_set_reference_kernels(false);
        ck_assert_tensor(yf);
        ck_assert_tensor(yr);
        double rel = gc_max_rel_diff(yf, yr);
        ck_assert_msg(rel < 1e-5, "%s: fast vs ref %g", ag_qformat_name(fmts[f]), rel);
        ag_ctx_free(&c);
        ag_qweight_free(&qg);
        ag_qweight_free(&qd);
    }
    ag_arena_free(&a);
}
END_TEST

START_TEST(test_gradients) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 4);
    ag_tensor *in[N_INPUTS];
    make_inputs(&a, &r, T_, in);
    gc_case g = {.n_in = N_INPUTS, .in = in, .build = build};
    gc_result res;
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        ck_assert_ok(gc_gradcheck(&g, &res));
        ck_assert_msg(res.max_rel < 1e-6, "%s: max rel %g at input %d elem %lld (%g vs %g)",
                      ref ? "reference" : "optimized", res.max_rel, res.worst_input,
                      (long long)res.worst_elem, res.analytic, res.numeric);
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

START_TEST(test_errors) {
    ag_arena a;
    ag_tensor *in64[N_INPUTS], *in[N_INPUTS];
    inputs_f32(&a, 5, 4, in64, in);
    ag_ctx c;
    ag_ctx_init(&c);
    ((int32_t *)in[SLOT]->data)[2] = N_AD;
    ck_assert_ptr_null(build(&c, in, NULL));
    ck_assert_str_eq(molt_err_msg(), "moe_experts_multi: slot[2] = 3 is outside [-1, 3)");
    ((int32_t *)in[SLOT]->data)[2] = 0;
    ag_expert_lora set[N_AD];
    set_of(in, set);
    set[1].b_gate_up = in[B0GU]; // rank 2 B for a rank 1 adapter
    ag_expert_stacks st = {in[GU], in[D], NULL, NULL};
    ck_assert_ptr_null(ag_moe_experts_multi(&c, in[X], in[W], in[IDX], &st, in[SLOT], N_AD, set));
    ck_assert_msg(strstr(molt_err_msg(), "adapter 1") && strstr(molt_err_msg(), "b_gate_up"),
                  "%s", molt_err_msg());
    set_of(in, set);
    ag_qweight qg;
    ck_assert_ok(ag_qweight_quantize(&qg, in[GU], AG_Q_INT8, NULL));
    ag_expert_stacks both = {in[GU], in[D], &qg, NULL};
    ck_assert_ptr_null(ag_moe_experts_multi(&c, in[X], in[W], in[IDX], &both, in[SLOT], N_AD,
                                            set));
    ck_assert_str_eq(molt_err_msg(), "moe_experts_multi: give either the dense stacks or the "
                                     "quantized ones");
    ag_qweight_free(&qg);
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_moe_multi");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_tokens_match_their_adapter_alone);
    tcase_add_test(tc, test_tokens_do_not_depend_on_the_batch);
    tcase_add_test(tc, test_per_expert_b_same_bits);
    tcase_add_test(tc, test_quantized_fast_matches_reference);
    tcase_add_test(tc, test_gradients);
    tcase_add_test(tc, test_errors);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
