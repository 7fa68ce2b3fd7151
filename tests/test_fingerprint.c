// tests/test_fingerprint.c: the sampled file fingerprint (common/sha256.h) against values
// from a second implementation (tools/reference/fingerprint_reference.py, hashlib) at every
// boundary of its definition (0, 1, 1 MiB - 1, 1 MiB, 1 MiB + 1, 5 MiB, 5 MiB + 1 bytes) and
// on a sparse 5 GiB file; which changes it sees (head, sampled blocks, size) and which it
// does not (a gap between blocks); its reads stay within 5 MiB; errors name the file.
#include "harness/harness.h"
#include "common/sha256.h"

#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MIB ((uint64_t)1 << 20)

// Printed by tools/reference/fingerprint_reference.py: dense files of pattern() bytes.
static const struct {
    uint64_t size;
    const char *hex;
} dense_want[] = {
    {0, "08e5a24e78bf82114032cf573bf910052626301dc55ef16c26761ae2c3daaef0"},
    {1, "7a4164bbf699cd2c484dbfee8318b6da4d1dfaf38f24dc94eca95890fe126f38"},
    {1048575, "1568c1ae62d1cf2665a33bf80be56bf02197bc3483952e3de76a65d9890a188a"},
    {1048576, "9d9d4625c834554468d26b9e94d729820383746188f9e299bfa852ef42bdec5a"},
    {1048577, "ce39fc9fade0dc9110bb7111d71171af270b371cb9942db6d645b4a3d838dfcf"},
    {5242880, "d2153d530bbaf230e0d54fe25428c66a5c70de0f6008c96efdf1515c3ec467b1"},
    {5242881, "192eac3e83b140aa8eca2756c0be1051e49a077f43e7f98d873383ca854eda67"},
    {7352377, "a2da0c36fe50b37037e843870c9b72b0c7175fd13ae0bbf2f556399a29a851c4"},
};
// The same script's sparse file (make_sparse below).
static const char sparse_want[] =
    "e4ff5d72d72eb4ea34a41f91232fb1c16f2acbb0a4c304fa69f9cc20276e1d77";

// The sparse file: 5 GiB + 12345 bytes of holes but for 64 pattern() bytes at each marker.
// Blocks 10 and 37 of its sample start at 853049743 and 3153452894; the marker at
// 2 GiB + 99 lies in the gap between blocks 25 and 26 (the script checks these offsets).
static const uint64_t sparse_size = ((uint64_t)5 << 30) + 12345;
static const uint64_t sparse_marks[] = {0,
                                        777777,
                                        (1 << 20) - 32,
                                        853049743 - 32,
                                        853049743 + 65536 - 32,
                                        3153452894u + 1000,
                                        ((uint64_t)2 << 30) + 99,
                                        ((uint64_t)5 << 30) + 12345 - 64};
static const uint64_t block37 = 3153452894u, gap_at = ((uint64_t)2 << 30) + 99;

// Byte k of the pattern: depends on every byte of k, so blocks read at a wrong offset differ.
static uint8_t pattern(uint64_t k) {
    return (uint8_t)((k ^ (k >> 8) ^ (k >> 16) ^ (k >> 24) ^ (k >> 32)) * 167);
}

static void make_tmpdir(char *dir, size_t cap) {
    snprintf(dir, cap, "/tmp/molt_fp_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
}

static void make_dense(const char *path, uint64_t size) {
    uint8_t *buf = malloc(size ? size : 1);
    ck_assert_ptr_nonnull(buf);
    for (uint64_t k = 0; k < size; k++)
        buf[k] = pattern(k);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(buf, 1, size, f), size);
    ck_assert_int_eq(fclose(f), 0);
    free(buf);
}

// Writes n bytes at offset at; the file grows (with a hole) when at is past its end.
static void put(const char *path, uint64_t at, const uint8_t *b, size_t n) {
    int fd = open(path, O_WRONLY);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pwrite(fd, b, n, (off_t)at), (ssize_t)n);
    ck_assert_int_eq(close(fd), 0);
}

static void make_sparse(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(ftruncate(fd, (off_t)sparse_size), 0);
    ck_assert_int_eq(close(fd), 0);
    for (size_t i = 0; i < sizeof sparse_marks / sizeof *sparse_marks; i++) {
        uint8_t b[64];
        for (int j = 0; j < 64; j++)
            b[j] = pattern(sparse_marks[i] + (uint64_t)j);
        put(path, sparse_marks[i], b, sizeof b);
    }
}

static void fingerprint(const char *path, char hex[65]) {
    ck_assert_ok(molt_fingerprint_file(path, hex));
    ck_assert_uint_eq(strlen(hex), 64);
}

// Flips byte at of path, fingerprints it, and flips it back.
static void fingerprint_flipped(const char *path, uint64_t at, char hex[65]) {
    int fd = open(path, O_RDWR);
    ck_assert_int_ge(fd, 0);
    uint8_t b;
    ck_assert_int_eq(pread(fd, &b, 1, (off_t)at), 1);
    b ^= 0x5a;
    ck_assert_int_eq(pwrite(fd, &b, 1, (off_t)at), 1);
    fingerprint(path, hex);
    b ^= 0x5a;
    ck_assert_int_eq(pwrite(fd, &b, 1, (off_t)at), 1);
    ck_assert_int_eq(close(fd), 0);
}

START_TEST(test_known_answers) {
    char dir[64], path[128], hex[65];
    make_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/dense", dir);
    for (size_t i = 0; i < sizeof dense_want / sizeof *dense_want; i++) {
        make_dense(path, dense_want[i].size);
        fingerprint(path, hex);
        ck_assert_msg(!strcmp(hex, dense_want[i].hex), "size %llu: got %s, want %s",
                      (unsigned long long)dense_want[i].size, hex, dense_want[i].hex);
    }
    // up to 5 MiB every byte is read: the fingerprint is still not the plain SHA-256
    char plain[65];
    ck_assert_ok(molt_sha256_file(path, plain));
    ck_assert_str_ne(hex, plain);
    snprintf(path, sizeof path, "%s/sparse", dir);
    make_sparse(path);
    fingerprint(path, hex);
    ck_assert_str_eq(hex, sparse_want);
    ck_assert_int_eq(unlink(path), 0);
    snprintf(path, sizeof path, "%s/dense", dir);
    ck_assert_int_eq(unlink(path), 0);
    ck_assert_int_eq(rmdir(dir), 0);
}
END_TEST

// One byte changed in the head or in a sampled block, or a change of size, changes the
// fingerprint; one changed in a gap between blocks does not (the documented limit).
START_TEST(test_what_it_detects) {
    char dir[64], path[128], base[65], hex[65];
    make_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/sparse", dir);
    make_sparse(path);
    fingerprint(path, base);
    const uint64_t seen[] = {0, 500000, MIB - 1, MIB, block37 + 5, sparse_size - 1};
    for (size_t i = 0; i < sizeof seen / sizeof *seen; i++) {
        fingerprint_flipped(path, seen[i], hex);
        ck_assert_msg(strcmp(hex, base) != 0, "a change at byte %llu went unseen",
                      (unsigned long long)seen[i]);
    }
    fingerprint_flipped(path, gap_at + 10, hex);
    ck_assert_str_eq(hex, base);
    fingerprint(path, hex); // every flip was undone
    ck_assert_str_eq(hex, base);
    // one byte more moves every block; the size alone would tell anyway
    ck_assert_int_eq(truncate(path, (off_t)sparse_size + 1), 0);
    fingerprint(path, hex);
    ck_assert_str_ne(hex, base);
    ck_assert_int_eq(unlink(path), 0);

    // small files: every byte counts, including the last of exactly 1 MiB + 1
    snprintf(path, sizeof path, "%s/dense", dir);
    make_dense(path, MIB + 1);
    fingerprint(path, base);
    fingerprint_flipped(path, MIB, hex);
    ck_assert_str_ne(hex, base);
    fingerprint_flipped(path, 12345, hex);
    ck_assert_str_ne(hex, base);
    ck_assert_int_eq(unlink(path), 0);
    ck_assert_int_eq(rmdir(dir), 0);
}
END_TEST

// Bytes this process has read (rchar of /proc/self/io), or -1 where Linux does not say.
static long long bytes_read(void) {
    FILE *f = fopen("/proc/self/io", "r");
    if (!f)
        return -1;
    long long n = -1;
    char line[128];
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "rchar: %lld", &n) == 1)
            break;
    fclose(f);
    return n;
}

START_TEST(test_reads_are_bounded) {
    char dir[64], path[128], hex[65];
    make_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/sparse", dir);
    make_sparse(path);
    long long before = bytes_read();
    fingerprint(path, hex);
    long long after = bytes_read();
    ck_assert_int_eq(unlink(path), 0);
    ck_assert_int_eq(rmdir(dir), 0);
    if (before < 0 || after < 0)
        return; // no /proc/self/io: the sparse file's known answer still ran above
    // 1 MiB of head and 64 blocks of 64 KiB, plus the few hundred bytes of /proc/self/io
    long long budget = 5LL << 20;
    ck_assert_msg(after - before >= budget && after - before <= budget + 4096,
                  "read %lld bytes of a %llu-byte file", after - before,
                  (unsigned long long)sparse_size);
}
END_TEST

START_TEST(test_errors_name_the_file) {
    char dir[64], path[128], hex[65];
    make_tmpdir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/missing.safetensors", dir);
    ck_assert_int_eq(molt_fingerprint_file(path, hex), MOLT_EIO);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), path));
    molt_err_clear();
    ck_assert_int_eq(molt_fingerprint_file(dir, hex), MOLT_EIO); // a directory
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), dir));
    ck_assert_int_eq(rmdir(dir), 0);
}
END_TEST

int main(void) {
    Suite *s = suite_create("fingerprint");
    TCase *tc = tcase_create("fingerprint");
    tcase_add_test(tc, test_known_answers);
    tcase_add_test(tc, test_what_it_detects);
    tcase_add_test(tc, test_reads_are_bounded);
    tcase_add_test(tc, test_errors_name_the_file);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
