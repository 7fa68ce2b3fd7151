// tests/test_profile.c: MOLT_PROFILE: off by default; when set, every recorded node counts one
// forward call and every backward rule run one backward call of its op, the table lists the
// ops that ran with those counts, activation checkpointing folds its inner ops (forward and
// recomputation) into the same profile, and a context that recorded nothing prints nothing.
#include "harness/harness.h"
#include "autograd/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// The whole table ag_profile_print writes for c (malloc'ed, "" when it writes nothing).
static char *table_of(const ag_ctx *c) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ck_assert_ptr_nonnull(f);
    ag_profile_print(c, f);
    fclose(f);
    return buf;
}

// The "calls bwd" columns of op's row, or -1 -1 when the table has no such row.
static void counts_of(const char *table, const char *op, long *fwd, long *bwd) {
    *fwd = *bwd = -1;
    char name[64];
    double fs, bs;
    long nf, nb;
    for (const char *line = table; line && *line; line = strchr(line, '\n')) {
        if (*line == '\n')
            line++;
        if (sscanf(line, "profile: %63s %lf %lf %ld %ld", name, &fs, &bs, &nf, &nb) == 5 &&
            strcmp(name, op) == 0) {
            ck_assert(fs >= 0 && bs >= 0);
            *fwd = nf;
            *bwd = nb;
            return;
        }
    }
}

static ag_tensor *two_linears(ag_ctx *c, ag_tensor *const *in, void *user) {
    (void)user;
    return ag_linear(c, ag_linear(c, in[0], in[1]), in[1]);
}

START_TEST(test_profile_off_by_default) {
    unsetenv("MOLT_PROFILE");
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ck_assert_ptr_null(c.prof);
    char *t = table_of(&c);
    ck_assert_str_eq(t, "");
    free(t);
    ag_ctx_free(&c);
    setenv("MOLT_PROFILE", "0", 1);
    ck_assert_ok(ag_ctx_init(&c));
    ck_assert_ptr_null(c.prof);
    ag_ctx_free(&c);
    unsetenv("MOLT_PROFILE");
}
END_TEST

START_TEST(test_profile_counts_ops) {
    setenv("MOLT_PROFILE", "1", 1);
    ag_arena a;
    ag_arena_init(&a, "t", 0);
    ag_rng r;
    ag_rng_seed(&r, 1);
    ag_tensor *x = gc_rand(&a, &r, 2, (int64_t[]){3, 4}, -1, 1, true);
    ag_tensor *w = gc_rand(&a, &r, 2, (int64_t[]){4, 4}, -1, 1, false);
    ag_ctx c;
    ck_assert_ok(ag_ctx_init(&c));
    ck_assert_ptr_nonnull(c.prof);
    char *t = table_of(&c); // nothing recorded yet
    ck_assert_str_eq(t, "");
    free(t);
    // two linears and a sum directly, then two more linears inside a checkpoint
    ag_tensor *h = two_linears(&c, (ag_tensor *[]){x, w}, NULL);
    ag_tensor *in2[2] = {h, w};
    ag_tensor *y = ag_checkpoint(&c, two_linears, NULL, 2, in2, 0, NULL);
    ck_assert_tensor(y);
    ck_assert_ok(ag_backward(&c, ag_sum(&c, y)));
    t = table_of(&c);
    long f, b;
    // 2 direct + 2 inside the checkpoint's forward + 2 recomputed during its backward
    counts_of(t, "linear", &f, &b);
    ck_assert_msg(f == 6 && b == 4, "linear %ld/%ld in:\n%s", f, b, t);
    counts_of(t, "checkpoint", &f, &b);
    ck_assert_msg(f == 1 && b == 1, "checkpoint %ld/%ld in:\n%s", f, b, t);
    counts_of(t, "sum", &f, &b);
    ck_assert_msg(f == 1 && b == 1, "sum %ld/%ld in:\n%s", f, b, t);
    counts_of(t, "attention", &f, &b);
    ck_assert_int_eq(f, -1); // ops that never ran have no row
    ck_assert_ptr_nonnull(strstr(t, "profile: op "));
    ck_assert_ptr_nonnull(strstr(t, "profile: total "));
    free(t);
    unsetenv("MOLT_PROFILE");
    ag_ctx_free(&c);
    ag_arena_free(&a);
}
END_TEST

int main(void) {
    Suite *s = suite_create("profile");
    TCase *tc = tcase_create("profile");
    tcase_add_test(tc, test_profile_off_by_default);
    tcase_add_test(tc, test_profile_counts_ops);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
