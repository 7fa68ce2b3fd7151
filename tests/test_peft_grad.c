// tests/test_peft_grad.c: training parity with transformers + PEFT. The tiny model (F32)
// with a LoRA adapter on attention, the dense MLP, the shared experts and the routed
// experts takes one fixed batch of two packed sequences with masked tokens; the mean
// cross-entropy and the gradient of every lora_A / lora_B must match PEFT's within 1e-4
// relative (per tensor: max |molt - PEFT| / max |PEFT|). The reference is
// tests/fixtures/peft_grad/reference.safetensors, written by
// tools/reference/peft_grad_reference.py; this test rebuilds the same model and adapter
// from the seeds and spec in its metadata and sends the adapter through molt's PEFT export
// and import, so it trains exactly what PEFT loaded. Not here: logits parity and the PEFT
// file format itself (test_peft.c), optimizer steps (test_trainer.c).
#include "adapters/adapters.h"
#include "harness/harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define TOL 1e-4

typedef struct {
    st_reader *ref;
    char tmp[64];
    mdl_model m;
} fixture;

static void rm_rf(const char *dir) {
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

static const char *meta(const st_reader *r, const char *key) {
    const char *s = st_metadata(r, key);
    ck_assert_msg(s != NULL, "fixture metadata %s missing", key);
    return s;
}

static const st_tensor *ref_tensor(const st_reader *r, const char *name, st_dtype dt,
                                   int64_t numel) {
    const st_tensor *t = st_find(r, name);
    ck_assert_msg(t != NULL, "fixture has no tensor %s", name);
    ck_assert_msg(t->dtype == dt && t->numel == numel, "fixture tensor %s: %s, %lld elements",
                  name, st_dtype_name(t->dtype), (long long)t->numel);
    return t;
}

// The reference, and the model it was made with (molt init-model --preset tiny --seed N).
static void fixture_open(fixture *f) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[4096], mdir[128];
    snprintf(path, sizeof path, "%s/tests/fixtures/peft_grad/reference.safetensors",
             src ? src : ".");
    ck_assert_ok(st_open(path, &f->ref));
    snprintf(f->tmp, sizeof f->tmp, "/tmp/molt_peft_grad_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(f->tmp));
    snprintf(mdir, sizeof mdir, "%s/model", f->tmp);
    mdl_init_opts o = {.preset = "tiny", .out_dir = mdir, .no_tokenizer = true,
                       .seed = strtoull(meta(f->ref, "seed"), NULL, 10)};
    ck_assert_ok(mdl_init_model(&o));
    memset(&f->m, 0, sizeof f->m);
    ck_assert_ok(mdl_load(mdir, &f->m));
}

static void fixture_close(fixture *f) {
    mdl_free(&f->m);
    st_close(f->ref);
    rm_rf(f->tmp);
}

// The adapter PEFT loaded: made from the spec, B randomized, exported and imported back.
static void adapter_from_fixture(fixture *f, lora_adapter *ad) {
    lora_spec spec;
    ck_assert_ok(lora_spec_parse(meta(f->ref, "spec"), &spec));
    ck_assert_ok(lora_attach(&f->m, &spec, true, ad));
    lora_randomize_b(ad, strtoull(meta(f->ref, "b_seed"), NULL, 10),
                     strtod(meta(f->ref, "b_std"), NULL));
    char dir[128];
    snprintf(dir, sizeof dir, "%s/adapter", f->tmp);
    ck_assert_ok(lora_export_peft(ad, dir, NULL));
    lora_detach(ad);
    ck_assert_ok(lora_import_peft(&f->m, dir, true, ad));
}

static ag_tensor *batch_vec(ag_ctx *c, const st_reader *r, const char *name, ag_dtype dt,
                            int64_t T) {
    const st_tensor *t = ref_tensor(r, name, dt == AG_I32 ? ST_I32 : ST_F32, T);
    ag_tensor *v = ag_tensor_new1(&c->act, dt, T);
    ck_assert_ptr_nonnull(v);
    memcpy(v->data, t->data, (size_t)T * 4);
    return v;
}

// Loss of the fixture's packed batch with gradients of every A and B (fresh, not
// accumulated: the adapter was just imported or its grads zeroed).
static double loss_and_grads(ag_ctx *c, const fixture *f) {
    const st_tensor *ids = st_find(f->ref, "input.ids");
    ck_assert_msg(ids && ids->numel > 0, "fixture has no input.ids");
    int64_t T = ids->numel;
    mdl_batch b = {.ids = batch_vec(c, f->ref, "input.ids", AG_I32, T),
                   .pos = batch_vec(c, f->ref, "input.pos", AG_I32, T),
                   .seg = batch_vec(c, f->ref, "input.seg", AG_I32, T),
                   .targets = batch_vec(c, f->ref, "input.targets", AG_I32, T),
                   .mask = batch_vec(c, f->ref, "input.mask", AG_F32, T)};
    ag_ctx_set_grad(c, true);
    ag_tensor *loss;
    ck_assert_ok(mdl_forward(c, &f->m, &b, &loss));
    ck_assert_ok(ag_backward(c, loss));
    return ag_get(loss, 0);
}

// max |got - want| / max |want| over one gradient tensor.
static double grad_rel(const ag_tensor *got, const st_tensor *want) {
    const float *w = want->data;
    double diff = 0, scale = 0;
    for (int64_t i = 0; i < want->numel; i++) {
        diff = fmax(diff, fabs(ag_get(got, i) - (double)w[i]));
        scale = fmax(scale, fabs((double)w[i]));
    }
    ck_assert_msg(scale > 0, "%s: the reference gradient is zero", want->name);
    return diff / scale;
}

static int count_grads(const st_reader *r) {
    int n = 0;
    for (int i = 0; i < st_count(r); i++)
        n += !strncmp(st_at(r, i)->name, "grad.", 5);
    return n;
}

// Worst relative gradient error over every A and B of ad; each must have a reference.
static double worst_grad(const lora_adapter *ad, const st_reader *ref, bool verbose) {
    double worst = 0;
    for (int i = 0; i < ad->n_units; i++)
        for (int isb = 0; isb < 2; isb++) {
            const lora_unit *u = &ad->units[i];
            const ag_tensor *p = isb ? u->b : u->a;
            char name[256] = "grad.";
            lora_peft_tensor_name(ad, u, isb, name + 5, sizeof name - 5);
            ck_assert_msg(p->grad != NULL, "%s got no gradient", name);
            double rel = grad_rel(p->grad, ref_tensor(ref, name, ST_F32, p->numel));
            if (verbose && rel > TOL)
                fprintf(stderr, "%s: max |molt - PEFT| / max |PEFT| = %.3g\n", name, rel);
            worst = fmax(worst, rel);
        }
    return worst;
}

static void check_parity(bool reference_kernels) {
    fixture f;
    fixture_open(&f);
    lora_adapter ad;
    adapter_from_fixture(&f, &ad);
    // every reference gradient belongs to exactly one A or B of the adapter
    ck_assert_int_eq(count_grads(f.ref), 2 * ad.n_units);
    ag_set_reference_kernels(reference_kernels);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    double loss = loss_and_grads(&c, &f);
    double want = ((const float *)ref_tensor(f.ref, "loss", ST_F32, 1)->data)[0];
    ck_assert_msg(fabs(loss - want) <= TOL * fabs(want), "loss: molt %.8g, PEFT %.8g", loss,
                  want);
    double worst = worst_grad(&ad, f.ref, true);
    fprintf(stderr, "%s kernels: loss %.8g (PEFT %.8g), worst gradient error %.3g\n",
            reference_kernels ? "reference" : "optimized", loss, want, worst);
    ck_assert_msg(worst <= TOL, "%s kernels: worst gradient error %.3g > %g",
                  reference_kernels ? "reference" : "optimized", worst, TOL);
    ag_set_reference_kernels(false);
    ag_ctx_free(&c);
    lora_detach(&ad);
    fixture_close(&f);
}

START_TEST(test_grad_parity_optimized) {
    check_parity(false);
}
END_TEST

START_TEST(test_grad_parity_reference) {
    check_parity(true);
}
END_TEST

// The comparison has teeth: the same batch with every B scaled by 1.01 (which scales the
// gradients of A by about as much) must miss the tolerance by far.
START_TEST(test_tolerance_discriminates) {
    fixture f;
    fixture_open(&f);
    lora_adapter ad;
    adapter_from_fixture(&f, &ad);
    for (int i = 0; i < ad.n_units; i++) {
        ag_tensor *b = ad.units[i].b;
        for (int64_t k = 0; k < b->numel; k++)
            ag_set(b, k, ag_get(b, k) * 1.01);
    }
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    loss_and_grads(&c, &f);
    double worst = worst_grad(&ad, f.ref, false);
    ck_assert_msg(worst > 10 * TOL, "B scaled by 1.01 still within %.3g", worst);
    ag_ctx_free(&c);
    lora_detach(&ad);
    fixture_close(&f);
}
END_TEST

int main(void) {
    Suite *s = suite_create("peft_grad");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_grad_parity_optimized);
    tcase_add_test(tc, test_grad_parity_reference);
    tcase_add_test(tc, test_tolerance_discriminates);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
