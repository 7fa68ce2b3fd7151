// tests/test_mem.c: the memory accounting of common/err.h (what `molt train` reports as the
// peak of molt's data and `molt plan` predicts): heap blocks counted while they live, realloc
// counted by the change, arenas counting the pieces they hand out (not their chunks), the
// peak and its reset. Skipped (77) where the C library cannot size a block.
#include <stdlib.h>

#include "harness/harness.h"

static bool counting(void) {
    size_t before = molt_mem_in_use();
    void *p = molt_malloc(1000);
    bool yes = molt_mem_in_use() > before;
    molt_free(p);
    return yes;
}

START_TEST(heap_blocks) {
    size_t base = molt_mem_in_use();
    void *p = molt_malloc(100000);
    size_t one = molt_mem_in_use() - base;
    ck_assert_msg(one >= 100000 && one < 100000 + 4096, "a 100000-byte block counts %zu", one);
    p = molt_realloc(p, 300000);
    size_t grown = molt_mem_in_use() - base;
    ck_assert_msg(grown >= 300000 && grown < 300000 + 4096, "grown to %zu", grown);
    void *q = molt_calloc(10, 1000);
    ck_assert_uint_ge(molt_mem_in_use() - base, grown + 10000);
    molt_free(q);
    molt_free(p);
    ck_assert_uint_eq(molt_mem_in_use(), base);
    molt_free(NULL);
    ck_assert_uint_eq(molt_mem_in_use(), base);
    void *u = molt_malloc_uncounted(50000);
    ck_assert_uint_eq(molt_mem_in_use(), base);
    molt_free_uncounted(u);
}
END_TEST

START_TEST(arenas_count_pieces) {
    size_t base = molt_mem_in_use();
    ag_arena a;
    ag_arena_init(&a, "t", 1 << 20); // a 1 MiB chunk: not counted by itself
    void *x = ag_arena_alloc(&a, 100);
    ck_assert_ptr_nonnull(x);
    ck_assert_uint_eq(molt_mem_in_use() - base, 128); // 64-byte pieces
    ag_arena_alloc(&a, 64);
    ck_assert_uint_eq(molt_mem_in_use() - base, 192);
    ag_arena_reset(&a);
    ck_assert_uint_eq(molt_mem_in_use(), base);
    ag_arena_alloc(&a, 1000);
    ag_arena_free(&a);
    ck_assert_uint_eq(molt_mem_in_use(), base);
}
END_TEST

START_TEST(peak) {
    molt_mem_peak_reset();
    size_t base = molt_mem_in_use();
    ck_assert_uint_eq(molt_mem_peak(), base);
    void *p = molt_malloc(1 << 20);
    molt_free(p);
    ck_assert_uint_ge(molt_mem_peak(), base + (1 << 20));
    ck_assert_uint_eq(molt_mem_in_use(), base);
    molt_mem_peak_reset();
    ck_assert_uint_eq(molt_mem_peak(), base);
}
END_TEST

int main(void) {
    if (!counting()) {
        fprintf(stderr, "test_mem: the C library cannot size blocks here: skipped\n");
        return 77;
    }
    Suite *s = suite_create("mem");
    TCase *tc = tcase_create("accounting");
    tcase_add_test(tc, heap_blocks);
    tcase_add_test(tc, arenas_count_pieces);
    tcase_add_test(tc, peak);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
