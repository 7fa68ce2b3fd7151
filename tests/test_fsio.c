// tests/test_fsio.c: common/fsio.h: an output that is, lies inside or holds an input is
// refused (through "..", "." and symbolic links, for paths that do not exist yet too);
// files are replaced only at commit and a failed write leaves the old file and no
// temporary; output directories are refused when non-empty unless forced, replaced whole
// at commit, and left as they were by an abort.
#include "harness/harness.h"
#include "common/fsio.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char root[64];

static void make_root(void) {
    snprintf(root, sizeof root, "/tmp/molt-fsio-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(root));
}

static void cleanup(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    ck_assert_int_eq(system(cmd), 0);
}

static const char *at(const char *rel) {
    static char buf[4][256];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", root, rel);
    return buf[k];
}

static void put(const char *rel, const char *text) {
    FILE *f = fopen(at(rel), "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

static void expect_text(const char *rel, const char *want) {
    char got[256] = "";
    FILE *f = fopen(at(rel), "r");
    ck_assert_msg(f != NULL, "%s missing", rel);
    size_t n = fread(got, 1, sizeof got - 1, f);
    got[n] = 0;
    fclose(f);
    ck_assert_str_eq(got, want);
}

// Entries of root whose names contain what.
static int count_named(const char *what) {
    DIR *d = opendir(root);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += strstr(e->d_name, what) != NULL;
    closedir(d);
    return n;
}

START_TEST(test_overlap) {
    make_root();
    mkdir(at("model"), 0777);
    put("model/w", "x");
    ck_assert_ok(molt_check_overlap("--out", at("other"), "--model", at("model")));
    ck_assert_ok(molt_check_overlap("--out", at("model2"), "--model", at("model")));
    ck_assert_ok(molt_check_overlap("--out", at("x"), "--adapter", NULL));
    ck_assert_int_eq(molt_check_overlap("--out", at("model"), "--model", at("model")),
                     MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "is the same as --model"));
    ck_assert_int_eq(molt_check_overlap("--out", at("model/new/deeper"), "--model",
                                        at("model")), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "lies inside --model"));
    ck_assert_int_eq(molt_check_overlap("--out", root, "--model", at("model/w")), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "which the output would replace"));
    // "..", "." and a symbolic link all name the same directory
    ck_assert_int_eq(molt_check_overlap("--out", at("model/../model/."), "--model",
                                        at("model")), MOLT_EARG);
    ck_assert_int_eq(symlink(at("model"), at("link")), 0);
    ck_assert_int_eq(molt_check_overlap("--out", at("link"), "--model", at("model")),
                     MOLT_EARG);
    ck_assert_int_eq(molt_check_overlap("--out", at("link/sub"), "--model", at("model")),
                     MOLT_EARG);
    // a missing path with ".." in its missing part
    ck_assert_int_eq(molt_check_overlap("--out", at("gone/../model"), "--model", at("model")),
                     MOLT_EARG);
    // relative to the working directory
    ck_assert_int_eq(chdir(root), 0);
    ck_assert_int_eq(molt_check_overlap("--out", "model", "--model", at("model")), MOLT_EARG);
    ck_assert_ok(molt_check_overlap("--out", "modelx", "--model", at("model")));
    cleanup();
}
END_TEST

START_TEST(test_files) {
    make_root();
    put("f", "old");
    ck_assert_ok(molt_write_atomic(at("f"), "new", 3));
    expect_text("f", "new");
    molt_wfile w;
    ck_assert_ok(molt_wfile_open(&w, at("f")));
    fputs("half", w.f);
    expect_text("f", "new"); // nothing replaced before the commit
    molt_wfile_abort(&w);
    expect_text("f", "new");
    ck_assert_int_eq(count_named(".tmp-"), 0);
    ck_assert_int_eq(molt_write_atomic(at("nodir/f"), "x", 1), MOLT_EIO);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "No such file or directory"));
    char *tmp;
    ck_assert_ok(molt_tmp_path(at("g"), &tmp));
    FILE *f = fopen(tmp, "w");
    fputs("via a path", f);
    fclose(f);
    ck_assert_ok(molt_commit_tmp(tmp, at("g")));
    molt_free(tmp);
    expect_text("g", "via a path");
    ck_assert_int_eq(count_named(".tmp-"), 0);
    cleanup();
}
END_TEST

START_TEST(test_outdirs) {
    make_root();
    molt_outdir d;
    // a new directory, its parents created
    ck_assert_ok(molt_outdir_begin(&d, at("a/b/out"), false, "--out"));
    ck_assert_int_eq(access(at("a/b/out"), F_OK), -1);
    FILE *f = fopen(strcat(strcpy((char[256]){0}, d.tmp), "/x"), "w");
    fputs("one", f);
    fclose(f);
    ck_assert_ok(molt_outdir_commit(&d));
    expect_text("a/b/out/x", "one");
    // non-empty: refused unless forced
    ck_assert_int_eq(molt_outdir_begin(&d, at("a/b/out"), false, "--out"), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "--out"));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "--force"));
    // forced: replaced whole at commit, the old entries gone
    ck_assert_ok(molt_outdir_begin(&d, at("a/b/out/"), true, "--out"));
    f = fopen(strcat(strcpy((char[256]){0}, d.tmp), "/y"), "w");
    fputs("two", f);
    fclose(f);
    expect_text("a/b/out/x", "one"); // still the old one until the commit
    ck_assert_ok(molt_outdir_commit(&d));
    expect_text("a/b/out/y", "two");
    ck_assert_int_eq(access(at("a/b/out/x"), F_OK), -1);
    // an abort leaves it as it was, and no temporary
    ck_assert_ok(molt_outdir_begin(&d, at("a/b/out"), true, "--out"));
    ck_assert_int_eq(access(d.tmp, F_OK), 0);
    molt_outdir_abort(&d);
    expect_text("a/b/out/y", "two");
    DIR *dir = opendir(at("a/b"));
    int n = 0;
    for (struct dirent *e; (e = readdir(dir));)
        n += e->d_name[0] != '.';
    closedir(dir);
    ck_assert_int_eq(n, 1);
    // a file in the way is refused even when forced
    put("file", "f");
    ck_assert_int_eq(molt_outdir_begin(&d, at("file"), true, "--out"), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "not a directory"));
    // an empty directory is fine without force
    mkdir(at("empty"), 0777);
    ck_assert_ok(molt_outdir_begin(&d, at("empty"), false, "--out"));
    ck_assert_ok(molt_outdir_commit(&d));
    ck_assert(!molt_dir_nonempty(at("empty")));
    cleanup();
}
END_TEST

int main(void) {
    Suite *s = suite_create("fsio");
    TCase *tc = tcase_create("fsio");
    tcase_add_test(tc, test_overlap);
    tcase_add_test(tc, test_files);
    tcase_add_test(tc, test_outdirs);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
