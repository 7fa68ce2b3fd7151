// tests/test_bx_linear.c: the bf16-pair product of inference's vocabulary projection
// (cpu/k_bx.h, ag_linear_bx) and its use by a model (mdl_pack_head).
//  - the halves: hi + lo within 2^-17 of every value tried, NaN and infinities kept, no
//    overflow to infinity;
//  - packing: every element's halves where bx_packed_at finds them, zeros outside the matrix;
//  - AMX (where the processor has it; the rest runs everywhere): against the reference of the
//    same products summed in f64, within an f32 sum's rounding, on awkward sizes;
//    batch invariance: each row has the same bits for T = 1 .. 70, alone or among others,
//    for 1, 2 or 3 threads; y written in full; against F32 within 2e-5 of the largest output;
//  - the op: forward = the kernel, backward for x = finite differences, operand errors;
//  - a model: with lm_head packed, logits outside grad mode come from the packed product and
//    grad mode still uses F32.
#include "harness/harness.h"
#include "autograd/cpu/kernels.h"
#include "model/model.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

static float frand(uint32_t *s) {
    *s = *s * 1664525u + 1013904223u;
    return (float)(*s >> 8) / 16777216.0f - 0.5f;
}

static float *rand_buf(int64_t n, uint32_t seed) {
    float *p = malloc((size_t)n * sizeof *p);
    ck_assert_ptr_nonnull(p);
    for (int64_t i = 0; i < n; i++)
        p[i] = frand(&seed);
    return p;
}

// ---- halves and packing --------------------------------------------------------------------

START_TEST(test_split) {
    uint32_t s = 3;
    for (int i = 0; i < 100000; i++) {
        float v = frand(&s) * ldexpf(1.0f, (int)(frand(&s) * 200)); // about 2^-100 .. 2^100
        uint16_t h, l;
        bx_split(v, &h, &l);
        double back = (double)bx_bf16(h) + (double)bx_bf16(l);
        ck_assert_msg(fabs(back - v) <= ldexp(fabs(v), -17), "%.9g -> %.9g", (double)v, back);
        ck_assert_msg(fabs((double)bx_bf16(h) - v) <= ldexp(fabs(v), -8), "%.9g hi", (double)v);
    }
    uint16_t h, l;
    bx_split(NAN, &h, &l);
    ck_assert(isnan(bx_bf16(h)) && l == 0);
    bx_split(-INFINITY, &h, &l);
    ck_assert(bx_bf16(h) == -INFINITY && l == 0);
    bx_split(3.4e38f, &h, &l); // rounds up past the largest bf16: truncated instead
    ck_assert(isfinite(bx_bf16(h)));
    ck_assert(fabs((double)bx_bf16(h) + bx_bf16(l) - 3.4e38) <= ldexp(3.4e38, -16));
}
END_TEST

static const int64_t sizes[][2] = {{1, 1}, {16, 32}, {37, 45}, {100, 200}, {600, 96}, {1100, 130}};
#define N_SIZES 6

START_TEST(test_pack) {
    int64_t rows = sizes[_i][0], cols = sizes[_i][1];
    float *w = rand_buf(rows * cols, 7 + (uint32_t)_i);
    size_t bytes = bx_pack_bytes(rows, cols);
    int64_t rp = (rows + 15) / 16 * 16, cp = (cols + 31) / 32 * 32;
    ck_assert_uint_eq(bytes, (size_t)(rp * cp * 4));
    uint16_t *p = malloc(bytes);
    ck_assert_ptr_nonnull(p);
    memset(p, 0xff, bytes); // every element must be written
    bx_pack(p, w, rows, cols, 2);
    // every position written (bx_split never gives 0xffff for these values) ...
    for (size_t i = 0; i < bytes / 2; i++)
        ck_assert_msg(p[i] != 0xffff, "%lldx%lld: element %zu of the packed buffer unwritten",
                      (long long)rows, (long long)cols, i);
    // ... and each element's halves where bx_packed_at looks, zeros outside the matrix
    for (int64_t r = 0; r < rp; r++)
        for (int64_t k = 0; k < cp; k++) {
            uint16_t h, l;
            bx_split(r < rows && k < cols ? w[r * cols + k] : 0.0f, &h, &l);
            ck_assert_uint_eq(bx_packed_at(p, rows, cols, r, k, 0), h);
            ck_assert_uint_eq(bx_packed_at(p, rows, cols, r, k, 1), l);
        }
    free(p);
    free(w);
}
END_TEST

// ---- the AMX kernel -------------------------------------------------------------------------

static int64_t t_list[] = {1, 2, 15, 16, 17, 31, 32, 33, 64, 70};
#define N_T 10

START_TEST(test_amx) {
    if (!bx_amx()) {
        printf("test_amx: no AMX-BF16 on this processor, the kernel is not run here\n");
        return;
    }
    int64_t rows = sizes[_i][0], cols = sizes[_i][1], T_MAX = 70;
    float *w = rand_buf(rows * cols, 11 + (uint32_t)_i);
    float *x = rand_buf(T_MAX * cols, 23 + (uint32_t)_i);
    uint16_t *p = malloc(bx_pack_bytes(rows, cols));
    float *y = malloc((size_t)(T_MAX * rows) * sizeof *y);
    float *alone = malloc((size_t)(T_MAX * rows) * sizeof *alone);
    float *ref = malloc((size_t)(T_MAX * rows) * sizeof *ref);
    void *ws = aligned_alloc(64, (bx_ws_bytes(T_MAX, cols, 3) + 63) / 64 * 64);
    ck_assert(p && y && alone && ref && ws);
    bx_pack(p, w, rows, cols, 1);
    // each row alone, one thread
    for (int64_t t = 0; t < T_MAX; t++)
        bx_linear(alone + t * rows, x + t * cols, p, 1, rows, cols, 1, ws);
    // against the f64 sum of the same products: within an f32 sum's rounding
    bx_linear_ref(ref, x, p, T_MAX, rows, cols);
    for (int64_t t = 0; t < T_MAX; t++)
        for (int64_t o = 0; o < rows; o++) {
            double mag = 0; // sum of |x w| bounds the rounding of the f32 sum
            for (int64_t k = 0; k < cols; k++)
                mag += fabs((double)x[t * cols + k] * w[o * cols + k]);
            double d = fabs((double)alone[t * rows + o] - ref[t * rows + o]);
            ck_assert_msg(d <= 1e-6 * mag + 1e-30, "%lldx%lld t %lld o %lld: %.9g vs ref %.9g",
                          (long long)rows, (long long)cols, (long long)t, (long long)o,
                          (double)alone[t * rows + o], (double)ref[t * rows + o]);
        }
    // batch invariance: every T, 1-3 threads, y starting as NaN; rows taken from an offset
    for (int ti = 0; ti < N_T; ti++)
        for (int nt = 1; nt <= 3; nt++) {
            int64_t T = t_list[ti], off = (T_MAX - T) / 2;
            for (int64_t i = 0; i < T * rows; i++)
                y[i] = NAN;
            bx_linear(y, x + off * cols, p, T, rows, cols, nt, ws);
            ck_assert_msg(!memcmp(y, alone + off * rows, (size_t)(T * rows) * sizeof *y),
                          "%lldx%lld: T=%lld with %d threads differs from rows alone",
                          (long long)rows, (long long)cols, (long long)T, nt);
        }
    // against F32: within 2e-5 of the largest output
    double md = 0, my = 0;
    for (int64_t t = 0; t < T_MAX; t++)
        for (int64_t o = 0; o < rows; o++) {
            double f = 0;
            for (int64_t k = 0; k < cols; k++)
                f += (double)x[t * cols + k] * w[o * cols + k];
            md = fmax(md, fabs(f - alone[t * rows + o]));
            my = fmax(my, fabs(f));
        }
    ck_assert_msg(md <= 2e-5 * my, "%lldx%lld: %.3g from f32 (max %.3g)", (long long)rows,
                  (long long)cols, md, my);
    free(ws);
    free(ref);
    free(alone);
    free(y);
    free(p);
    free(x);
    free(w);
}
END_TEST

// ---- the op ---------------------------------------------------------------------------------

typedef struct {
    ag_arena a;
    ag_tensor *w;
    ag_bxweight bw;
} op_case;

static void op_init(op_case *o, int64_t rows, int64_t cols) {
    ag_arena_init(&o->a, "bx", 0);
    o->w = ag_tensor_new2(&o->a, AG_F32, rows, cols);
    ck_assert_tensor(o->w);
    uint32_t s = 5;
    for (int64_t i = 0; i < rows * cols; i++)
        ((float *)o->w->data)[i] = frand(&s);
    ck_assert_ok(ag_bx_pack(&o->a, o->w, 2, &o->bw));
}

START_TEST(test_op_forward) {
    op_case o;
    op_init(&o, 300, 80);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_tensor *x = ag_tensor_new(&c.act, AG_F32, 3, (int64_t[]){2, 7, 80});
    ck_assert_tensor(x);
    uint32_t s = 9;
    for (int64_t i = 0; i < x->numel; i++)
        ((float *)x->data)[i] = frand(&s);
    ag_tensor *y = ag_linear_bx(&c, x, &o.bw);
    ck_assert_tensor(y);
    ck_assert_int_eq(y->ndim, 3);
    ck_assert_int_eq(y->shape[2], 300);
    float *ref = malloc((size_t)(14 * 300) * sizeof *ref);
    ck_assert_ptr_nonnull(ref);
    bx_linear_ref(ref, x->data, o.bw.data, 14, 300, 80);
    for (int64_t i = 0; i < 14 * 300; i++)
        ck_assert_msg(fabs((double)((float *)y->data)[i] - ref[i]) <= 1e-5,
                      "element %lld: %.9g vs %.9g", (long long)i, (double)((float *)y->data)[i],
                      (double)ref[i]);
    // with the reference kernels forced the op gives the reference's values exactly
    ag_set_reference_kernels(true);
    ag_tensor *yr = ag_linear_bx(&c, x, &o.bw);
    ag_set_reference_kernels(false);
    ck_assert_tensor(yr);
    ck_assert(!memcmp(yr->data, ref, (size_t)(14 * 300) * sizeof *ref));
    // operand errors
    ag_tensor *bad = ag_tensor_new2(&c.act, AG_F32, 3, 81);
    ck_assert_ptr_null(ag_linear_bx(&c, bad, &o.bw));
    ck_assert(strstr(molt_err_msg(), "in features") != NULL);
    ag_tensor *f64 = ag_tensor_new2(&c.act, AG_F64, 3, 80);
    ck_assert_ptr_null(ag_linear_bx(&c, f64, &o.bw));
    ck_assert(strstr(molt_err_msg(), "F32") != NULL);
    ag_bxweight none = {0};
    ck_assert_ptr_null(ag_linear_bx(&c, x, &none));
    ag_bxweight dummy;
    ck_assert_int_eq(ag_bx_pack(&o.a, f64, 1, &dummy), MOLT_EARG);
    free(ref);
    ag_ctx_free(&c);
    ag_arena_free(&o.a);
}
END_TEST

// L = sum(y * R) for fixed R, accumulated in double.
static double loss_of(const float *y, const float *R, int64_t n) {
    double s = 0;
    for (int64_t i = 0; i < n; i++)
        s += (double)y[i] * R[i];
    return s;
}

START_TEST(test_op_backward) {
    int64_t T = 3, rows = 40, cols = 70;
    op_case o;
    op_init(&o, rows, cols);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c)); // grad mode on
    ag_tensor *x = ag_tensor_new2(&c.act, AG_F32, T, cols);
    ck_assert_tensor(x);
    x->requires_grad = true;
    float *R = rand_buf(T * rows, 77);
    uint32_t s = 13;
    for (int64_t i = 0; i < x->numel; i++)
        ((float *)x->data)[i] = frand(&s);
    ag_tensor *y = ag_linear_bx(&c, x, &o.bw);
    ck_assert_tensor(y);
    ag_tensor *r = ag_tensor_new2(&c.act, AG_F32, T, rows);
    ck_assert_tensor(r);
    memcpy(r->data, R, (size_t)(T * rows) * sizeof *R);
    ag_tensor *l = ag_sum(&c, ag_mul(&c, y, r));
    ck_assert_tensor(l);
    ck_assert_ok(ag_backward(&c, l));
    ck_assert_ptr_nonnull(x->grad);
    float *g = malloc((size_t)(T * rows) * sizeof *g);
    ck_assert_ptr_nonnull(g);
    // the product is linear in x: a large step only shrinks the rounding noise's share
    double eps = 0.25, worst = 0;
    for (int64_t i = 0; i < T * cols; i++) {
        float keep = ((float *)x->data)[i];
        ((float *)x->data)[i] = keep + (float)eps;
        bx_linear_ref(g, x->data, o.bw.data, T, rows, cols);
        double lp = loss_of(g, R, T * rows);
        ((float *)x->data)[i] = keep - (float)eps;
        bx_linear_ref(g, x->data, o.bw.data, T, rows, cols);
        double lm = loss_of(g, R, T * rows);
        ((float *)x->data)[i] = keep;
        double num = (lp - lm) / (2 * eps), ana = ((float *)x->grad->data)[i];
        worst = fmax(worst, fabs(num - ana) / fmax(fabs(num), 1e-2));
    }
    ck_assert_msg(worst < 1e-3, "dx against finite differences: %.3g", worst);
    free(g);
    free(R);
    ag_ctx_free(&c);
    ag_arena_free(&o.a);
}
END_TEST

// Packing over the matrix gives bx_pack's bytes; shapes that do not fit, or no memory for
// a panel's copy, leave the matrix as it was.
START_TEST(test_pack_in_place) {
    static const int64_t ok_sizes[][2] = {{16, 32}, {528, 64}, {1024, 96}, {48, 160}};
    for (int i = 0; i < 4; i++) {
        int64_t rows = ok_sizes[i][0], cols = ok_sizes[i][1];
        ck_assert(bx_pack_in_place_ok(rows, cols));
        ck_assert_uint_eq(bx_pack_bytes(rows, cols), (size_t)(rows * cols) * sizeof(float));
        float *w = rand_buf(rows * cols, 40 + (uint32_t)i);
        uint16_t *want = malloc(bx_pack_bytes(rows, cols));
        ck_assert_ptr_nonnull(want);
        bx_pack(want, w, rows, cols, 1);
        ck_assert(bx_pack_in_place(w, rows, cols, 1 + i % 3));
        ck_assert_msg(!memcmp(w, want, bx_pack_bytes(rows, cols)), "%lldx%lld",
                      (long long)rows, (long long)cols);
        free(want);
        free(w);
    }
    float *w = rand_buf(48 * 64, 50), *keep = malloc(48 * 64 * sizeof *keep);
    ck_assert_ptr_nonnull(keep);
    memcpy(keep, w, 48 * 64 * sizeof *keep);
    ck_assert(!bx_pack_in_place_ok(40, 64) && !bx_pack_in_place_ok(48, 40));
    ck_assert(!bx_pack_in_place(w, 40, 64, 1)); // 40 rows: not whole blocks
    molt_alloc_fail_after(0); // the one copy a single thread asks for
    ck_assert(!bx_pack_in_place(w, 48, 64, 1));
    molt_alloc_fail_after(-1);
    ck_assert(!memcmp(w, keep, 48 * 64 * sizeof *keep));
    // two threads' copies fail: it falls back to one thread's
    uint16_t *want = malloc(bx_pack_bytes(48, 64));
    ck_assert_ptr_nonnull(want);
    bx_pack(want, w, 48, 64, 1);
    molt_alloc_fail_after(0);
    ck_assert(bx_pack_in_place(w, 48, 64, 2));
    molt_alloc_fail_after(-1);
    ck_assert(!memcmp(w, want, bx_pack_bytes(48, 64)));
    free(want);
    free(keep);
    free(w);
}
END_TEST

// ---- a model --------------------------------------------------------------------------------

START_TEST(test_model_head) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/configs/models/tiny.json", src ? src : ".");
    mcfg cfg;
    ck_assert_ok(mcfg_load(path, &cfg));
    mdl_model m = {0};
    ck_assert_ok(mdl_create(&m, &cfg));
    ck_assert_ok(mdl_init_random(&m, 7, 0.1));
    bool packed = true;
    if (!ag_bx_available()) {
        ck_assert_ok(mdl_pack_head(&m, &packed));
        ck_assert(!packed && m.lm_head.bx == NULL && m.lm_head.w->data != NULL);
        printf("test_model_head: no AMX-BF16 on this processor, the head stays F32\n");
        mdl_free(&m);
        return;
    }
    int64_t H = cfg.hidden_size, V = cfg.vocab_size, T = 5;
    ck_assert(!cfg.tie_word_embeddings && V % 16 == 0 && H % 32 == 0); // packed in place
    float *wf = malloc((size_t)(V * H) * sizeof *wf);
    ck_assert_ptr_nonnull(wf);
    memcpy(wf, m.lm_head.w->data, (size_t)(V * H) * sizeof *wf);
    void *bytes = m.lm_head.w->data;
    ck_assert_ok(mdl_pack_head(&m, &packed));
    ck_assert(packed && m.lm_head.bx == &m.head_bx);
    ck_assert(m.lm_head.w->data == NULL && (void *)m.head_bx.data == bytes); // no new memory
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ag_ctx_set_grad(&c, false);
    ag_tensor *h = ag_tensor_new2(&c.act, AG_F32, T, H);
    ck_assert_tensor(h);
    uint32_t s = 21;
    for (int64_t i = 0; i < T * H; i++)
        ((float *)h->data)[i] = frand(&s);
    ag_tensor *y = mdl_linear(&c, h, &m.lm_head);
    ck_assert_tensor(y);
    ag_tensor *yb = ag_linear_bx(&c, h, m.lm_head.bx);
    ck_assert_tensor(yb);
    ck_assert(!memcmp(y->data, yb->data, (size_t)(T * V) * sizeof(float)));
    // against the F32 matrix it replaced
    double md = 0, my = 0;
    for (int64_t t = 0; t < T; t++)
        for (int64_t o = 0; o < V; o++) {
            double f = 0;
            for (int64_t k = 0; k < H; k++)
                f += (double)((float *)h->data)[t * H + k] * wf[o * H + k];
            md = fmax(md, fabs(f - ((float *)y->data)[t * V + o]));
            my = fmax(my, fabs(f));
        }
    ck_assert_msg(md <= 2e-5 * my && md > 0, "%.3g from f32 (max %.3g)", md, my);
    // grad mode: the same product, recorded; the hidden states get dy (hi + lo)
    ag_ctx_set_grad(&c, true);
    h->requires_grad = true;
    ag_tensor *yg = mdl_linear(&c, h, &m.lm_head);
    ck_assert_tensor(yg);
    ck_assert(!memcmp(yg->data, y->data, (size_t)(T * V) * sizeof(float)));
    ck_assert_ok(ag_backward(&c, ag_sum(&c, yg)));
    ck_assert_ptr_nonnull(h->grad);
    for (int64_t k = 0; k < H; k++) { // d sum(y) / d h[0, k] = sum over o of W[o, k]
        double col = 0;
        for (int64_t o = 0; o < V; o++)
            col += wf[o * H + k];
        ck_assert_msg(fabs(((float *)h->grad->data)[k] - col) <= 1e-3 + 1e-4 * fabs(col),
                      "dh[%lld] = %.6g, sum of column %.6g", (long long)k,
                      (double)((float *)h->grad->data)[k], col);
    }
    // the fused loss needs the F32 matrix, which is gone
    ag_ctx_step_reset(&c);
    int32_t ids[4] = {1, 2, 3, 4}, pos[4] = {0, 1, 2, 3}, seg[4] = {0};
    ag_tensor *ti = ag_tensor_new1(&c.act, AG_I32, 4), *tp = ag_tensor_new1(&c.act, AG_I32, 4);
    ag_tensor *tg = ag_tensor_new1(&c.act, AG_I32, 4), *tt = ag_tensor_new1(&c.act, AG_I32, 4);
    ck_assert(ti && tp && tg && tt);
    memcpy(ti->data, ids, sizeof ids);
    memcpy(tp->data, pos, sizeof pos);
    memcpy(tg->data, seg, sizeof seg);
    memcpy(tt->data, ids, sizeof ids);
    mdl_batch b = {.ids = ti, .pos = tp, .seg = tg, .targets = tt};
    ag_tensor *loss;
    ck_assert_int_eq(mdl_forward(&c, &m, &b, &loss), MOLT_EUNSUPPORTED);
    ck_assert(strstr(molt_err_msg(), "mdl_pack_head") != NULL);
    free(wf);
    ag_ctx_free(&c);
    mdl_free(&m);
}
END_TEST

int main(void) {
    Suite *s = suite_create("bx_linear");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_split);
    tcase_add_loop_test(tc, test_pack, 0, N_SIZES);
    tcase_add_loop_test(tc, test_amx, 0, N_SIZES);
    tcase_add_test(tc, test_op_forward);
    tcase_add_test(tc, test_op_backward);
    tcase_add_test(tc, test_pack_in_place);
    tcase_add_test(tc, test_model_head);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
