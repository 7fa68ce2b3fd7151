// tests/test_ops_moe_lora_q.c: LoRA on quantized routed experts (ag_moe_experts_lora_q,
// QLoRA on an MoE). The ground truth is ag_moe_experts_lora (tested against PEFT in
// test_ops_moe_lora.c) on the stacks ag_qweight_dequantize gives: forward and every gradient
// must match it bit for bit (the same decoded values through the same kernels), for F32,
// INT8 and NF4 (with and without double quantization) stacks; a zero B must give
// ag_moe_experts_q. Also finite-difference gradients, f32 vs f64, optimized vs reference
// kernels (experts spread over a team, an expert with no tokens), the tape, exact error
// messages, and the tiny model with a routed-expert adapter on an NF4 base against the same
// adapter on the dequantized F32 base.
#include "harness/harness.h"
#include "harness/moe_lora_cases.h"
#include "harness/model_env.h"
#include "autograd/internal.h"
#include "adapters/adapters.h"
#include "model/mdl_quant.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- helpers -------------------------------------------------------------------------------

// Inputs of the op under test: the slots of harness/moe_lora_cases.h, the two weight slots
// left NULL (the qweights are in qcase).

// A case's quantized stacks and the dense F64 stacks they decode to.
typedef struct {
    ag_qweight gu, down;
    ag_tensor *dgu, *dd; // ag_qweight_dequantize, widened to F64 (frozen)
    int r;
    double s;
} qcase;

typedef struct {
    ag_qformat f;
    bool dq; // NF4 double quantization
    const char *name;
} qfmt;

static const qfmt fmts[] = {
    {AG_Q_F32, false, "f32"},
    {AG_Q_INT8, false, "int8"},
    {AG_Q_NF4, true, "nf4+dq"},
    {AG_Q_NF4, false, "nf4"},
};
#define N_FMTS (int)(sizeof fmts / sizeof fmts[0])

static ag_tensor *build_q(ag_ctx *c, ag_tensor **in, void *user) {
    const qcase *q = user;
    ag_expert_lora l = {in[IN_AGU], in[IN_BGU], in[IN_AD], in[IN_BD], q->r, q->s, NULL, NULL};
    return ag_moe_experts_lora_q(c, in[IN_X], in[IN_W], in[IN_IDX], &q->gu, &q->down, &l);
}

// The dense op on the decoded stacks (in[IN_GU], in[IN_D] must hold them).
static ag_tensor *build_dense(ag_ctx *c, ag_tensor **in, void *user) {
    const qcase *q = user;
    ag_expert_lora l = {in[IN_AGU], in[IN_BGU], in[IN_AD], in[IN_BD], q->r, q->s, NULL, NULL};
    return ag_moe_experts_lora(c, in[IN_X], in[IN_W], in[IN_IDX], in[IN_GU], in[IN_D], &l);
}

// Quantizes a random F32 stack [E, O, In] to f; *dense gets the decoded values in F64.
static void make_stack(ag_arena *a, ag_rng *r, const qfmt *f, int64_t E, int64_t O, int64_t In,
                       ag_qweight *q, ag_tensor **dense) {
    ag_tensor *w = gc_rand(a, r, 3, (int64_t[]){E, O, In}, -0.8, 0.8, false);
    ag_tensor *w32 = gc_clone(a, w, AG_F32);
    ag_qopts o = ag_qopts_default();
    o.nf4_double_quant = f->dq;
    ck_assert_ok(ag_qweight_quantize(q, w32, f->f, &o));
    ck_assert_int_eq(q->nf4_double_quant, f->f == AG_Q_NF4 && f->dq);
    ag_tensor *d = ag_qweight_dequantize(a, q);
    ck_assert_tensor(d);
    *dense = gc_clone(a, d, AG_F64);
    (*dense)->requires_grad = false;
}

// F64 inputs of a case in f's format: stacks in q (dense copies in in[IN_GU], in[IN_D]),
// everything else requires grad.
static void make_inputs(ag_arena *a, ag_rng *r, const lcase *d, const qfmt *f, bool repeat,
                        ag_tensor **in, qcase *q) {
    moe_lora_routing(a, r, d, repeat, in);
    make_stack(a, r, f, d->E, 2 * d->I, d->H, &q->gu, &q->dgu);
    make_stack(a, r, f, d->E, d->H, d->I, &q->down, &q->dd);
    in[IN_GU] = q->dgu;
    in[IN_D] = q->dd;
    moe_lora_adapters(a, r, d, in);
    q->r = d->r;
    q->s = d->s;
}

// The op's inputs: the same tensors with the weight slots empty.
static void q_inputs(ag_tensor **in, ag_tensor **qin) {
    memcpy(qin, in, N_IN * sizeof *in);
    qin[IN_GU] = qin[IN_D] = NULL;
}

static void free_case(qcase *q) {
    ag_qweight_free(&q->gu);
    ag_qweight_free(&q->down);
}

static void expect_same(const ag_tensor *a, const ag_tensor *b, const char *what, int ci,
                        const char *fmt, int ref) {
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(a->numel, b->numel);
    ck_assert_msg(memcmp(a->data, b->data, (size_t)a->numel * ag_dtype_size(a->dtype)) == 0,
                  "%s differs: case %d %s ref %d (rel %g)", what, ci, fmt, ref,
                  gc_max_rel_diff(a, b));
}

// ---- against the dense op on the decoded stacks ---------------------------------------------

// y, dx, dweights and the LoRA gradients of the _q op and of ag_moe_experts_lora on the
// decoded stacks, in dtype dt, with both kernel families: identical.
static void compare_with_dense(const lcase *d, int ci, const qfmt *f, ag_dtype dt,
                               uint64_t seed) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, seed);
    ag_tensor *m[N_IN], *in[N_IN], *qin[N_IN];
    qcase q;
    make_inputs(&a, &r, d, f, ci == 1, m, &q);
    for (int ref = 0; ref < 2; ref++) {
        ag_set_reference_kernels(ref);
        for (int i = 0; i < N_IN; i++) // fresh copies: gradients accumulate
            in[i] = m[i] ? gc_clone(&a, m[i], m[i]->dtype == AG_I32 ? AG_I32 : dt) : NULL;
        ag_tensor *din[N_IN];
        for (int i = 0; i < N_IN; i++)
            din[i] = in[i] ? gc_clone(&a, in[i], in[i]->dtype) : NULL;
        q_inputs(in, qin);
        ag_ctx c;
        ag_ctx_init(&c);
        ag_tensor *y = build_q(&c, qin, &q), *yd = build_dense(&c, din, &q);
        ck_assert_tensor(y);
        ck_assert_tensor(yd);
        expect_same(y, yd, "y", ci, f->name, ref);
        // L = sum(y * R) + the same for the dense op, with one fixed R
        ag_tensor *R = gc_rand(&a, &r, 2, y->shape, -1, 1, false);
        ag_tensor *Rd = gc_clone(&a, R, dt);
        ck_assert_ok(ag_backward(&c, ag_add(&c, ag_sum(&c, ag_mul(&c, y, Rd)),
                                            ag_sum(&c, ag_mul(&c, yd, Rd)))));
        static const char *names[N_IN] = {"dx", "dweights", "", "", "", "da_gate_up",
                                          "db_gate_up", "da_down", "db_down"};
        for (int i = 0; i < N_IN; i++)
            if (in[i] && in[i]->requires_grad)
                expect_same(in[i]->grad, din[i]->grad, names[i], ci, f->name, ref);
        ag_ctx_free(&c);
    }
    ag_set_reference_kernels(false);
    free_case(&q);
    ag_arena_free(&a);
}

START_TEST(test_matches_dense_on_decoded) {
    for (int fi = 0; fi < N_FMTS; fi++)
        for (int ci = 0; ci < N_CASES; ci++) {
            compare_with_dense(&moe_lora_cases[ci], ci, &fmts[fi], AG_F64, 10 + (uint64_t)ci);
            compare_with_dense(&moe_lora_cases[ci], ci, &fmts[fi], AG_F32, 20 + (uint64_t)ci);
        }
    // more rows of one expert than a block (256), and a team of experts
    const lcase big = {700, 9, 2, 40, 24, 3, 1.1, true, true};
    int saved = omp_get_max_threads();
    omp_set_num_threads(3);
    compare_with_dense(&big, 99, &fmts[2], AG_F32, 30);
    compare_with_dense(&big, 99, &fmts[0], AG_F32, 31);
    omp_set_num_threads(saved);
}
END_TEST

// B = 0: the frozen quantized experts alone (ag_moe_experts_q, its own kernels).
START_TEST(test_zero_b_equals_experts_q) {
    const lcase d = {7, 4, 2, 5, 3, 2, 1.5, true, true};
    for (int fi = 1; fi < N_FMTS; fi++)
        for (int ref = 0; ref < 2; ref++) {
            ag_set_reference_kernels(ref);
            ag_arena a;
            ag_arena_init(&a, "t", 0);
            ag_rng r;
            ag_rng_seed(&r, 77);
            ag_tensor *in[N_IN], *qin[N_IN];
            qcase q;
            make_inputs(&a, &r, &d, &fmts[fi], false, in, &q);
            memset(in[IN_BGU]->data, 0, (size_t)in[IN_BGU]->numel * sizeof(double));
            memset(in[IN_BD]->data, 0, (size_t)in[IN_BD]->numel * sizeof(double));
            q_inputs(in, qin);
            ag_tensor *x2 = gc_clone(&a, in[IN_X], AG_F64), *w2 = gc_clone(&a, in[IN_W], AG_F64);
            ag_ctx c;
            ag_ctx_init(&c);
            ag_tensor *y = build_q(&c, qin, &q);
            ag_tensor *yb = ag_moe_experts_q(&c, x2, w2, in[IN_IDX], &q.gu, &q.down);
            ck_assert_tensor(y);
            ck_assert_tensor(yb);
            double rel = gc_max_rel_diff(y, yb);
            ck_assert_msg(rel <= 1e-13, "%s ref %d: y rel %g", fmts[fi].name, ref, rel);
            ck_assert_ok(ag_backward(&c, ag_sum(&c, ag_add(&c, y, yb))));
            rel = gc_max_rel_diff(in[IN_X]->grad, x2->grad);
            ck_assert_msg(rel <= 1e-13, "%s ref %d: dx rel %g", fmts[fi].name, ref, rel);
            rel = gc_max_rel_diff(in[IN_W]->grad, w2->grad);
            ck_assert_msg(rel <= 1e-13, "%s ref %d: dw rel %g", fmts[fi].name, ref, rel);
            for (int i = IN_AGU; i <= IN_BD; i += 2) // dA = s B^T dW_eff = 0
                for (int64_t e = 0; e < in[i]->numel; e++)
                    ck_assert(ag_get(in[i]->grad, e) == 0.0);
            ag_ctx_free(&c);
            free_case(&q);
            ag_arena_free(&a);
        }
    ag_set_reference_kernels(false);
}
END_TEST

// ---- gradients ------------------------------------------------------------------------------

static void expect_grads(const gc_case *g, int64_t n_checked, const char *what, int ci,
                         const char *fmt) {
    gc_result res;
    ck_assert_ok(gc_gradcheck(g, &res));
    ck_assert_int_eq(res.checked, n_checked);
    ck_assert_msg(res.max_rel <= 1e-6, "%s %s case %d: max rel %g at input %d elem %lld "
                  "(%g vs %g)", what, fmt, ci, res.max_rel, res.worst_input,
                  (long long)res.worst_elem, res.analytic, res.numeric);
}

START_TEST(test_gradcheck) {
    for (int fi = 1; fi < N_FMTS - 1; fi++) // INT8, NF4 with double quantization
        for (int ci = 0; ci < N_CASES; ci++) {
            const lcase *d = &moe_lora_cases[ci];
            ag_arena a;
            ag_arena_init(&a, "t", 0);
            ag_rng r;
            ag_rng_seed(&r, 100 + (uint64_t)ci);
            ag_tensor *m[N_IN], *in[N_IN];
            qcase q;
            make_inputs(&a, &r, d, &fmts[fi], ci == 0 || ci == 2, m, &q);
            q_inputs(m, in);
            gc_case g = {.n_in = N_IN, .in = in, .build = build_q, .user = &q};
            int64_t all = d->T * d->H + d->T * d->k + moe_lora_numel(d);
            for (int ref = 0; ref < 2; ref++) {
                ag_set_reference_kernels(ref);
                expect_grads(&g, all, ref ? "reference" : "optimized", ci, fmts[fi].name);
            }
            ag_set_reference_kernels(false);
            // the training case: only the adapters are trainable
            in[IN_X]->requires_grad = in[IN_W]->requires_grad = false;
            expect_grads(&g, moe_lora_numel(d), "lora only", ci, fmts[fi].name);
            in[IN_X]->requires_grad = in[IN_W]->requires_grad = true;
            double rel;
            ck_assert_ok(gc_f32_vs_f64(&g, &rel));
            ck_assert_msg(rel <= 1e-5, "%s case %d: f32 vs f64 %g", fmts[fi].name, ci, rel);
            free_case(&q);
            ag_arena_free(&a);
        }
}
END_TEST

static void fast_vs_ref(const lcase *d, const qfmt *f, uint64_t seed, bool repeat,
                        const char *what) {
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, seed);
    ag_tensor *m[N_IN], *in[N_IN];
    qcase q;
    make_inputs(&a, &r, d, f, repeat, m, &q);
    q_inputs(m, in);
    gc_case g = {.n_in = N_IN, .in = in, .build = build_q, .user = &q};
    double rel;
    ck_assert_ok(gc_fast_vs_ref(&g, &rel));
    ck_assert_msg(rel <= 1e-5, "%s %s: fast vs ref %g", what, f->name, rel);
    free_case(&q);
    ag_arena_free(&a);
}

START_TEST(test_fast_vs_ref) {
    // more slots of one expert than a row block of the optimized kernel (256), odd sizes
    const lcase big[] = {
        {300, 3, 2, 5, 3, 2, 1.5, true, true},
        {37, 9, 3, 7, 5, 4, 0.5, true, true},
        {40, 6, 2, 6, 4, 3, 2.0, false, true},
    };
    for (int fi = 1; fi < 3; fi++)
        for (int ci = 0; ci < 3; ci++)
            fast_vs_ref(&big[ci], &fmts[fi], 200 + (uint64_t)ci, ci == 1, "small");
}
END_TEST

// Big enough for the optimized kernels to spread the experts over an OpenMP team (three
// threads asked for, whatever the machine has), with an expert of more than one row block
// (256) and one of no rows (fill_idx never picks expert E-1); then a team of one.
START_TEST(test_fast_vs_ref_expert_team) {
    const lcase d = {1100, 9, 2, 48, 24, 3, 1.1, true, true};
    int saved = omp_get_max_threads();
    for (int threads = 3; threads >= 1; threads -= 2) {
        omp_set_num_threads(threads);
        for (int fi = 1; fi < 3; fi++)
            fast_vs_ref(&d, &fmts[fi], 300, true, threads == 3 ? "team of 3" : "team of 1");
    }
    omp_set_num_threads(saved);
}
END_TEST

START_TEST(test_tape) {
    const lcase d = {4, 3, 2, 4, 3, 2, 1.0, true, true};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 5);
    ag_tensor *m[N_IN], *in[N_IN];
    qcase q;
    make_inputs(&a, &r, &d, &fmts[2], false, m, &q);
    q_inputs(m, in);
    ag_ctx c;
    ag_ctx_init(&c);
    ag_tensor *y = build_q(&c, in, &q);
    ck_assert_tensor(y);
    ck_assert_int_eq(c.n_tape, 1);
    ck_assert_str_eq(ag_op_name(c.tape[0]->op), "moe_experts_lora_q");
    ck_assert_uint_eq(c.saved_bytes, 2 * sizeof(void *)); // the two qweight pointers only
    ck_assert_ok(ag_backward(&c, ag_sum(&c, y)));
    for (int i = IN_AGU; i <= IN_BD; i++)
        ck_assert_ptr_nonnull(in[i]->grad);
    ck_assert_ptr_nonnull(in[IN_X]->grad);
    // grad mode off: nothing recorded
    ag_ctx_set_grad(&c, false);
    ck_assert_tensor(build_q(&c, in, &q));
    ck_assert_int_eq(c.n_tape, 0);
    ag_ctx_free(&c);
    free_case(&q);
    ag_arena_free(&a);
}
END_TEST

// ---- errors ---------------------------------------------------------------------------------

static void expect_error(ag_tensor **in, const qcase *q, const char *msg) {
    ag_ctx c;
    ag_ctx_init(&c);
    ck_assert_ptr_null(build_q(&c, in, (void *)q));
    ck_assert_str_eq(molt_err_msg(), msg);
    ag_ctx_free(&c);
}

START_TEST(test_errors) {
    const lcase d = {5, 4, 2, 6, 3, 2, 1.5, true, true};
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 3);
    ag_tensor *m[N_IN], *in[N_IN];
    qcase q, other;
    make_inputs(&a, &r, &d, &fmts[2], false, m, &q);
    q_inputs(m, in);
    ag_tensor *keep;

    keep = in[IN_AGU]; // one expert's rows short
    in[IN_AGU] = ag_tensor_new2(&a, AG_F64, 7, 6);
    expect_error(in, &q, "moe_experts_lora_q: a_gate_up is [7, 6] f64, expected [8, 6] "
                         "(r*E, H)");
    in[IN_AGU] = keep;
    keep = in[IN_BD];
    in[IN_BD] = ag_tensor_new2(&a, AG_F32, 6, 8);
    expect_error(in, &q, "moe_experts_lora_q: x [5, 6] f64 and b_down [6, 8] f32 differ in "
                         "dtype");
    in[IN_BD] = NULL;
    expect_error(in, &q, "moe_experts_lora_q: a_down is given without b_down (set both or "
                         "neither)");
    in[IN_BD] = keep;
    q.r = 0;
    expect_error(in, &q, "moe_experts_lora_q: rank r = 0, expected >= 1");
    q.r = 2;

    // stacks: down from a case with another I, then gate_up's transposed shape
    const lcase d2 = {5, 4, 2, 6, 4, 2, 1.5, true, true};
    ag_tensor *m2[N_IN];
    make_inputs(&a, &r, &d2, &fmts[1], false, m2, &other);
    ag_qweight keep_q = q.down;
    q.down = other.down;
    expect_error(in, &q, "moe_experts_lora_q: down is [4, 6, 4] int8, expected [4, 6, 3] "
                         "(E, H, I from gate_up and x)");
    q.down = keep_q;
    keep_q = q.gu;
    q.gu = other.down; // [4, 6, 4]: 4 columns where x has H = 6
    expect_error(in, &q, "moe_experts_lora_q: gate_up is [4, 6, 4] int8, expected [E, 2I, 6] "
                         "for x [5, 6] f64");
    q.gu = keep_q;

    ag_set(in[IN_IDX], 3, 4.0);
    expect_error(in, &q, "moe_experts_lora_q: idx[t=1, j=1] = 4 is out of range [0, 4)");
    ag_set(in[IN_IDX], 3, 1.0);

    ag_ctx c;
    ag_ctx_init(&c);
    ck_assert_ptr_null(ag_moe_experts_lora_q(&c, in[IN_X], in[IN_W], in[IN_IDX], &q.gu, &q.down,
                                             NULL));
    ck_assert_str_eq(molt_err_msg(), "moe_experts_lora_q: lora is NULL (use ag_moe_experts_q "
                                     "without adapters)");
    // the untouched inputs still work
    ck_assert_tensor(build_q(&c, in, &q));
    ag_ctx_free(&c);
    free_case(&q);
    free_case(&other);
    ag_arena_free(&a);
}
END_TEST

// ---- the model: an NF4 base with a routed-expert adapter -------------------------------------

static model_env env;

static void setup_all(void) {
    static const model_env_model models[] = {{"tiny", "tiny", MDL_SAVE_F32}};
    model_env_open(&env, "qlora", models, 1);
}

static void teardown_all(void) { model_env_close(&env); }

// The F32 tiny model with every quantized weight of q replaced by its dequantized values
// (qweights and F32 tensors follow the same weight-list order).
static void dequant_model(const mdl_model *q, mdl_model *ref) {
    model_env_load(&env, "tiny", ref);
    int n = mdl_weight_list(q, NULL, 0);
    ck_assert_int_eq(n, mdl_weight_list(ref, NULL, 0));
    w_entry *lq = malloc((size_t)n * sizeof *lq), *lr = malloc((size_t)n * sizeof *lr);
    mdl_weight_list(q, lq, n);
    mdl_weight_list(ref, lr, n);
    ag_arena a;
    ag_arena_init(&a, "dequant", 1 << 20);
    int n_experts = 0;
    for (int i = 0; i < n; i++) {
        const ag_qweight *qw = mdl_q_group(&lq[i]) >= 0 ? mdl_q_of(q, lq[i].t) : NULL;
        if (!qw)
            continue;
        n_experts += mdl_q_group(&lq[i]) == MDL_QG_EXPERTS;
        ag_tensor *d = ag_qweight_dequantize(&a, qw);
        ck_assert_tensor(d);
        ck_assert_int_eq(d->numel, lr[i].t->numel);
        memcpy(lr[i].t->data, d->data, (size_t)d->numel * sizeof(float));
        ag_arena_reset(&a);
    }
    ck_assert_int_gt(n_experts, 0); // the experts were quantized
    ag_arena_free(&a);
    free(lq);
    free(lr);
}

// Loss of a fixed packed batch (two sequences) with backward run.
static double loss_step(mdl_model *m) {
    enum { T = 24 };
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    mdl_batch b = {.ids = ag_tensor_new1(&c.act, AG_I32, T),
                   .pos = ag_tensor_new1(&c.act, AG_I32, T),
                   .seg = ag_tensor_new1(&c.act, AG_I32, T),
                   .targets = ag_tensor_new1(&c.act, AG_I32, T)};
    int64_t V = m->cfg.vocab_size;
    for (int t = 0; t < T; t++) {
        ((int32_t *)b.ids->data)[t] = (int32_t)((7 * t + 3) % V);
        ((int32_t *)b.pos->data)[t] = t < 10 ? t : t - 10;
        ((int32_t *)b.seg->data)[t] = t < 10 ? 0 : 1;
        ((int32_t *)b.targets->data)[t] = (int32_t)((7 * t + 10) % V);
    }
    ag_tensor *loss;
    ck_assert_ok(mdl_forward(&c, m, &b, &loss));
    ck_assert_ok(ag_backward(&c, loss));
    double lv = ((float *)loss->data)[0];
    ag_ctx_free(&c);
    return lv;
}

START_TEST(test_model_nf4_experts_adapter) {
    model_env_require(&env);
    mdl_model q, deq;
    mdl_qspec spec;
    ck_assert_ok(mdl_qspec_parse("nf4", &spec));
    ck_assert_ok(mdl_load_quant(model_env_path(&env, "tiny"), &spec, &q));
    dequant_model(&q, &deq);
    lora_spec ls;
    ck_assert_ok(lora_spec_parse("r=3,alpha=6,seed=11,targets=experts+o_proj", &ls));
    lora_adapter aq, af;
    ck_assert_ok(lora_attach(&q, &ls, true, &aq));
    ck_assert_ok(lora_attach(&deq, &ls, true, &af));
    ck_assert_int_gt(aq.group_params[LORA_GROUP_EXPERTS], 0);
    ck_assert_int_eq(aq.group_params[LORA_GROUP_EXPERTS], af.group_params[LORA_GROUP_EXPERTS]);
    lora_randomize_b(&aq, 5, 0.05); // non-zero B: the adapter changes the experts' output
    lora_randomize_b(&af, 5, 0.05);
    int moe = 0;
    for (int l = 0; l < q.cfg.num_hidden_layers; l++)
        if (q.layers[l].moe) {
            ck_assert_ptr_nonnull(q.layers[l].gate_up_q);
            ck_assert_ptr_nonnull(q.layers[l].experts_lora.a_gate_up);
            moe++;
        }
    ck_assert_int_gt(moe, 0);
    double lq = loss_step(&q), lf = loss_step(&deq);
    ck_assert_msg(isfinite(lq) && fabs(lq - lf) <= 1e-5 * fabs(lf), "loss %.9g vs %.9g", lq,
                  lf);
    ck_assert_int_eq(aq.n_units, af.n_units);
    int n_exp = 0;
    for (int i = 0; i < aq.n_units; i++) {
        ck_assert_str_eq(aq.units[i].path, af.units[i].path);
        for (int k = 0; k < 2; k++) {
            ag_tensor *gq = (k ? aq.units[i].b : aq.units[i].a)->grad;
            ag_tensor *gf = (k ? af.units[i].b : af.units[i].a)->grad;
            ck_assert_ptr_nonnull(gq);
            ck_assert_ptr_nonnull(gf);
            double mx = 0, d = 0;
            for (int64_t e = 0; e < gf->numel; e++) {
                mx = fmax(mx, fabs(ag_get(gf, e)));
                d = fmax(d, fabs(ag_get(gq, e) - ag_get(gf, e)));
            }
            ck_assert_msg(mx > 0 && d <= 1e-4 * mx, "%s %s: grads differ by %g (max %g)",
                          aq.units[i].path, k ? "B" : "A", d, mx);
        }
        n_exp += aq.units[i].group == LORA_GROUP_EXPERTS;
    }
    ck_assert_int_eq(n_exp, 2 * moe);
    lora_detach(&aq);
    lora_detach(&af);
    mdl_free(&q);
    mdl_free(&deq);
}
END_TEST

int main(void) {
    Suite *s = suite_create("ops_moe_lora_q");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_matches_dense_on_decoded);
    tcase_add_test(tc, test_zero_b_equals_experts_q);
    tcase_add_test(tc, test_gradcheck);
    tcase_add_test(tc, test_fast_vs_ref);
    tcase_add_test(tc, test_fast_vs_ref_expert_team);
    tcase_add_test(tc, test_tape);
    tcase_add_test(tc, test_errors);
    suite_add_tcase(s, tc);
    TCase *tm = tcase_create("model");
    tcase_set_timeout(tm, 300);
    tcase_add_unchecked_fixture(tm, setup_all, teardown_all);
    tcase_add_test(tm, test_model_nf4_experts_adapter);
    suite_add_tcase(s, tm);
    return harness_run(s);
}
