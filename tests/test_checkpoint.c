// tests/test_checkpoint.c: SHA-256 against the FIPS 180-2 vectors; checkpoint round trips
// (bit-exact for every kind of entry); atomic writing (a leftover .tmp is ignored);
// truncated, extended and bit-flipped files are reported by name and the next older valid
// checkpoint is used; keep-last-K; base model / tokenizer hash checks with and without
// --force; HDF5 stays silent on stderr.
#include "harness/harness.h"
#include "train/train.h"

#include <fcntl.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char *make_tmpdir(void) {
    char tmpl[] = "/tmp/molt_ckpt_XXXXXX";
    char *d = mkdtemp(tmpl);
    ck_assert_ptr_nonnull(d);
    return molt_strdup(d);
}

static void rm_rf(const char *dir) {
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

static bool exists(const char *dir, const char *name) {
    char p[512];
    snprintf(p, sizeof p, "%s/checkpoints/%s", dir, name);
    return access(p, F_OK) == 0;
}

static void ckpt_path(char *buf, size_t cap, const char *dir, int64_t step) {
    snprintf(buf, cap, "%s/checkpoints/step-%lld.h5", dir, (long long)step);
}

// A state with every kind of entry, including awkward values, distinct per seed.
static void build_state(ckpt_state *s, int64_t step, int seed) {
    ckpt_state_init(s);
    s->step = step;
    float a[6] = {1.5f + (float)seed, -0.0f, 1e-45f, INFINITY, -3.25e30f, NAN};
    int64_t sa[2] = {2, 3}, sb[3] = {3, 1, 5}, s1 = 1;
    ck_assert_ok(ckpt_set_tensor(s, "layers.0.attn.q.lora_A", 2, sa, a));
    float b[15];
    for (int i = 0; i < 15; i++)
        b[i] = (float)(i * 0.1 - seed);
    ck_assert_ok(ckpt_set_tensor(s, "adamw.m.layers.0.attn.q.lora_A", 3, sb, b));
    ck_assert_ok(ckpt_set_tensor(s, "one", 1, &s1, b + 3));
    ck_assert_ok(ckpt_set_int(s, "optimizer_step", step));
    ck_assert_ok(ckpt_set_int(s, "min", INT64_MIN));
    ck_assert_ok(ckpt_set_int(s, "max", INT64_MAX));
    ck_assert_ok(ckpt_set_float(s, "sched.lr_max", 2e-4));
    ck_assert_ok(ckpt_set_float(s, "tiny", 4.9e-324));
    uint8_t rng[40];
    for (int i = 0; i < 40; i++)
        rng[i] = (uint8_t)(i * 37 + seed); // zero bytes included
    ck_assert_ok(ckpt_set_blob(s, "rng.dropout", rng, sizeof rng));
    ck_assert_ok(ckpt_set_blob(s, "empty", "", 0));
    ck_assert_ok(ckpt_set_string(s, "config.yaml", "lora:\n  r: 16\n  alpha: 32\n"));
    ckpt_hashes h;
    memset(&h, 0, sizeof h);
    molt_sha256_hex("model", 5, h.model_config);
    molt_sha256_hex("index", 5, h.weights_index);
    molt_sha256_hex("tok", 3, h.tokenizer);
    ck_assert_ok(ckpt_set_hashes(s, &h));
}

static void assert_same_state(const ckpt_state *a, const ckpt_state *b) {
    ck_assert_int_eq(a->step, b->step);
    ck_assert_int_eq(a->n_tensors, b->n_tensors);
    ck_assert_int_eq(a->n_ints, b->n_ints);
    ck_assert_int_eq(a->n_floats, b->n_floats);
    ck_assert_int_eq(a->n_blobs, b->n_blobs);
    for (int i = 0; i < a->n_tensors; i++) {
        const ckpt_tensor *x = &a->tensors[i], *y = ckpt_get_tensor(b, x->name);
        ck_assert_msg(y != NULL, "tensor %s missing", x->name);
        ck_assert_int_eq(x->ndim, y->ndim);
        ck_assert_mem_eq(x->shape, y->shape, (size_t)x->ndim * sizeof(int64_t));
        ck_assert_mem_eq(x->data, y->data, (size_t)x->numel * sizeof(float)); // bits
    }
    for (int i = 0; i < a->n_ints; i++) {
        int64_t v;
        ck_assert_ok(ckpt_get_int(b, a->ints[i].name, &v));
        ck_assert_int_eq(v, a->ints[i].i);
    }
    for (int i = 0; i < a->n_floats; i++) {
        double v;
        ck_assert_ok(ckpt_get_float(b, a->floats[i].name, &v));
        ck_assert_mem_eq(&v, &a->floats[i].f, sizeof v);
    }
    for (int i = 0; i < a->n_blobs; i++) {
        const ckpt_blob *y = ckpt_get_blob(b, a->blobs[i].name);
        ck_assert_msg(y != NULL, "blob %s missing", a->blobs[i].name);
        ck_assert_uint_eq(y->len, a->blobs[i].len);
        ck_assert_mem_eq(y->data, a->blobs[i].data, y->len + 1); // with the trailing NUL
    }
}

START_TEST(test_sha256_vectors) {
    char hex[65];
    molt_sha256_hex("abc", 3, hex);
    ck_assert_str_eq(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    molt_sha256_hex("", 0, hex);
    ck_assert_str_eq(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    const char *m = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    molt_sha256_hex(m, strlen(m), hex);
    ck_assert_str_eq(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    // streaming in uneven pieces and hashing a file give the one-shot digest
    uint8_t data[300];
    for (int i = 0; i < 300; i++)
        data[i] = (uint8_t)(i * 7);
    char one[65], file_hex[65];
    molt_sha256_hex(data, sizeof data, one);
    molt_sha256 c;
    molt_sha256_init(&c);
    for (size_t at = 0, k = 1; at < sizeof data; at += k, k = k * 3 % 71 + 1)
        molt_sha256_update(&c, data + at, k < sizeof data - at ? k : sizeof data - at);
    uint8_t d[32];
    molt_sha256_final(&c, d);
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", d[i]);
    ck_assert_str_eq(hex, one);
    char *dir = make_tmpdir(), path[512];
    snprintf(path, sizeof path, "%s/f.bin", dir);
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, sizeof data, f);
    fclose(f);
    ck_assert_ok(molt_sha256_file(path, file_hex));
    ck_assert_str_eq(file_hex, one);
    snprintf(path, sizeof path, "%s/missing", dir);
    ck_assert_int_eq(molt_sha256_file(path, file_hex), MOLT_EIO);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), path));
    rm_rf(dir);
    molt_free(dir);
}
END_TEST

START_TEST(test_roundtrip_bit_exact) {
    char *dir = make_tmpdir(), *path = NULL;
    ckpt_state s, r;
    build_state(&s, 12, 0);
    ck_assert_ok(ckpt_write(dir, &s, 3, &path));
    char want[512];
    ckpt_path(want, sizeof want, dir, 12);
    ck_assert_str_eq(path, want);
    ck_assert(!exists(dir, "step-12.h5.tmp"));
    ck_assert_ok(ckpt_read(path, &r));
    assert_same_state(&s, &r);
    ckpt_state_free(&r);
    // setting a name again replaces the entry
    float z = 0;
    int64_t one = 1;
    ck_assert_ok(ckpt_set_tensor(&s, "one", 1, &one, &z));
    ck_assert_int_eq(s.n_tensors, 3);
    ckpt_state_free(&s);
    molt_free(path);
    rm_rf(dir);
    molt_free(dir);
}
END_TEST

START_TEST(test_digest_covers_every_field) {
    ckpt_state s;
    char base[65], h[65];
    build_state(&s, 3, 0);
    ckpt_state_digest(&s, base);
    s.step = 4;
    ckpt_state_digest(&s, h);
    ck_assert_str_ne(h, base);
    s.step = 3;
    s.tensors[1].data[14] = nextafterf(s.tensors[1].data[14], 10.0f);
    ckpt_state_digest(&s, h);
    ck_assert_str_ne(h, base);
    ckpt_state_free(&s);
    build_state(&s, 3, 0);
    s.ints[0].i ^= 1;
    ckpt_state_digest(&s, h);
    ck_assert_str_ne(h, base);
    ckpt_state_free(&s);
    build_state(&s, 3, 0);
    s.blobs[0].data[5] ^= 0x10;
    ckpt_state_digest(&s, h);
    ck_assert_str_ne(h, base);
    ckpt_state_free(&s);
    build_state(&s, 3, 0);
    s.tensors[0].name[0] = 'L';
    ckpt_state_digest(&s, h);
    ck_assert_str_ne(h, base);
    ckpt_state_free(&s);
}
END_TEST

typedef struct {
    int n;
    char paths[8][512];
    char msgs[8][512];
} reports;

static void collect(void *user, const char *path, const char *msg) {
    reports *r = user;
    if (r->n < 8) {
        snprintf(r->paths[r->n], 512, "%s", path);
        snprintf(r->msgs[r->n], 512, "%s", msg);
        r->n++;
    }
}

static void copy_file(const char *from, const char *to, long cut, long flip) {
    FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
    ck_assert(in && out);
    long i = 0;
    for (int c; (c = fgetc(in)) != EOF && (cut < 0 || i < cut); i++)
        fputc(i == flip ? c ^ 0x04 : c, out);
    fclose(in);
    fclose(out);
}

static long file_size(const char *p) {
    struct stat st;
    ck_assert_int_eq(stat(p, &st), 0);
    return (long)st.st_size;
}

// Damages step-2 in several ways; each time the scan must reject it by name and load step-1.
START_TEST(test_damaged_latest_falls_back) {
    char *dir = make_tmpdir(), p1[512], p2[512], good[512];
    ckpt_state s1, s2, r;
    build_state(&s1, 1, 1);
    build_state(&s2, 2, 2);
    ck_assert_ok(ckpt_write(dir, &s1, 0, NULL));
    ck_assert_ok(ckpt_write(dir, &s2, 0, NULL));
    ckpt_path(p1, sizeof p1, dir, 1);
    ckpt_path(p2, sizeof p2, dir, 2);
    snprintf(good, sizeof good, "%s/good.h5", dir);
    copy_file(p2, good, -1, -1);
    long size = file_size(good);
    long cuts[] = {0, 100, 512, 600, size / 2, size - 1};
    long flips[] = {3, 40, 520, 700, size / 2, size - 20, size - 1};
    int n_cut = (int)(sizeof cuts / sizeof *cuts), n_flip = (int)(sizeof flips / sizeof *flips);
    for (int k = 0; k < n_cut + n_flip + 1; k++) {
        if (k < n_cut)
            copy_file(good, p2, cuts[k], -1);
        else if (k < n_cut + n_flip)
            copy_file(good, p2, -1, flips[k - n_cut]);
        else { // one byte appended
            copy_file(good, p2, -1, -1);
            FILE *f = fopen(p2, "ab");
            fputc(0, f);
            fclose(f);
        }
        reports rep = {0};
        char *path = NULL;
        ck_assert_ok(ckpt_find_latest_valid(dir, collect, &rep, &path, &r));
        ck_assert_msg(path && strcmp(path, p1) == 0, "case %d: picked %s", k,
                      path ? path : "(none)");
        ck_assert_int_eq(rep.n, 1);
        ck_assert_str_eq(rep.paths[0], p2);
        char prefix[600];
        snprintf(prefix, sizeof prefix, "checkpoint %s: ", p2);
        ck_assert_msg(strncmp(rep.msgs[0], prefix, strlen(prefix)) == 0, "case %d: %s", k,
                      rep.msgs[0]);
        assert_same_state(&s1, &r);
        ckpt_state_free(&r);
        molt_free(path);
    }
    // the undamaged file is picked again
    copy_file(good, p2, -1, -1);
    char *path = NULL;
    ck_assert_ok(ckpt_find_latest_valid(dir, NULL, NULL, &path, &r));
    ck_assert_str_eq(path, p2);
    assert_same_state(&s2, &r);
    ckpt_state_free(&r);
    molt_free(path);
    // truncation message says what happened
    copy_file(good, p2, size / 2, -1);
    ck_assert_int_eq(ckpt_read(p2, &r), MOLT_EFORMAT);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "truncated"));
    // nothing valid at all
    copy_file(good, p1, 700, -1);
    ck_assert_int_eq(ckpt_find_latest_valid(dir, NULL, NULL, &path, &r), MOLT_EFORMAT);
    ck_assert_ptr_null(path);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "no valid checkpoint in"));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "(2 files rejected)"));
    ckpt_state_free(&s1);
    ckpt_state_free(&s2);
    rm_rf(dir);
    molt_free(dir);
}
END_TEST

// Rewrites the SHA-256 line of path's header to match its current bytes (the documented
// layout: the last header line is the SHA-256 of everything after the 512-byte header).
static void reseal(const char *path) {
    FILE *f = fopen(path, "r+b");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    uint8_t *buf = molt_malloc((size_t)size);
    fseek(f, 0, SEEK_SET);
    ck_assert_uint_eq(fread(buf, 1, (size_t)size, f), (size_t)size);
    char hex[65];
    molt_sha256_hex(buf + 512, (size_t)size - 512, hex);
    char *line = strstr((char *)buf, "\nsha256 ");
    ck_assert_ptr_nonnull(line);
    fseek(f, line - (char *)buf + 8, SEEK_SET);
    fwrite(hex, 1, 64, f);
    fclose(f);
    molt_free(buf);
}

// Past the file-level check, the contents checksum still catches changed data.
START_TEST(test_contents_checksum) {
    char *dir = make_tmpdir(), p[512];
    ckpt_state s, r;
    build_state(&s, 4, 0);
    ck_assert_ok(ckpt_write(dir, &s, 0, NULL));
    ckpt_path(p, sizeof p, dir, 4);
    reseal(p); // a faithful reseal keeps the file valid
    ck_assert_ok(ckpt_read(p, &r));
    ckpt_state_free(&r);
    // change one stored float (-3.25e30f, a value found once in the file) and reseal
    FILE *f = fopen(p, "r+b");
    fseek(f, 0, SEEK_END);
    long size = ftell(f), at = -1;
    uint8_t *buf = molt_malloc((size_t)size);
    fseek(f, 0, SEEK_SET);
    ck_assert_uint_eq(fread(buf, 1, (size_t)size, f), (size_t)size);
    float v = -3.25e30f;
    for (long i = 512; i + 4 <= size; i++)
        if (memcmp(buf + i, &v, 4) == 0)
            at = i;
    ck_assert_int_ge(at, 0);
    buf[at] ^= 1;
    fseek(f, at, SEEK_SET);
    fputc(buf[at], f);
    fclose(f);
    molt_free(buf);
    reseal(p);
    ck_assert_int_eq(ckpt_read(p, &r), MOLT_EFORMAT);
    char want[600];
    snprintf(want, sizeof want, "checkpoint %s: corrupt: contents checksum mismatch", p);
    ck_assert_str_eq(molt_err_msg(), want);
    ck_assert_int_eq(r.n_tensors, 0); // left empty on failure
    ckpt_state_free(&s);
    rm_rf(dir);
    molt_free(dir);
}
END_TEST

START_TEST(test_leftover_tmp_and_empty_dir) {
    char *dir = make_tmpdir(), p[512], tmp[512];
    ckpt_state s, r;
    char *path = (char *)"x";
    ck_assert_ok(ckpt_find_latest_valid(dir, NULL, NULL, &path, &r)); // no checkpoints/ yet
    ck_assert_ptr_null(path);
    build_state(&s, 5, 0);
    ck_assert_ok(ckpt_write(dir, &s, 0, NULL));
    ckpt_path(p, sizeof p, dir, 5);
    // a write of step 9 killed before its rename leaves step-9.h5.tmp (here even complete)
    snprintf(tmp, sizeof tmp, "%s/checkpoints/step-9.h5.tmp", dir);
    copy_file(p, tmp, -1, -1);
    reports rep = {0};
    ck_assert_ok(ckpt_find_latest_valid(dir, collect, &rep, &path, &r));
    ck_assert_str_eq(path, p);
    ck_assert_int_eq(rep.n, 0);
    ckpt_state_free(&r);
    molt_free(path);
    // writing step 9 for real replaces the leftover
    s.step = 9;
    ck_assert_ok(ckpt_write(dir, &s, 0, NULL));
    ck_assert(!exists(dir, "step-9.h5.tmp"));
    ck_assert(exists(dir, "step-9.h5"));
    ckpt_state_free(&s);
    rm_rf(dir);
    molt_free(dir);
}
END_TEST

START_TEST(test_keep_last_k) {
    char *dir = make_tmpdir();
    ckpt_state s;
    build_state(&s, 0, 0);
    for (int step = 1; step <= 12; step += (step < 9 ? 1 : 3)) {
        s.step = step;
        ck_assert_ok(ckpt_write(dir, &s, 2, NULL));
    }
    // written: 1..9, 12 -> newest two by step number (not by name order)
    ck_assert(exists(dir, "step-12.h5"));
    ck_assert(exists(dir, "step-9.h5"));
    for (int step = 1; step <= 8; step++) {
        char n[32];
        snprintf(n, sizeof n, "step-%d.h5", step);
        ck_assert_msg(!exists(dir, n), "%s kept", n);
    }
    s.step = 13;
    ck_assert_ok(ckpt_write(dir, &s, 0, NULL)); // 0 keeps everything
    ck_assert(exists(dir, "step-9.h5"));
    ckpt_state_free(&s);
    rm_rf(dir);
    molt_free(dir);
}
END_TEST

START_TEST(test_hash_mismatch_and_force) {
    ckpt_state s;
    build_state(&s, 1, 0);
    ckpt_hashes cur;
    memset(&cur, 0, sizeof cur);
    molt_sha256_hex("model", 5, cur.model_config);
    molt_sha256_hex("index", 5, cur.weights_index);
    molt_sha256_hex("tok", 3, cur.tokenizer);
    char warn[1024];
    ck_assert_ok(ckpt_check_hashes(&s, "c.h5", &cur, false, warn, sizeof warn));
    ck_assert_str_eq(warn, "");
    char old_tok[65];
    memcpy(old_tok, cur.tokenizer, 65);
    molt_sha256_hex("other tok", 9, cur.tokenizer);
    char want[1024];
    snprintf(want, sizeof want,
             "checkpoint c.h5 was made for another base model or tokenizer: tokenizer hash "
             "differs (checkpoint %s, now %s); pass --force to resume from it anyway",
             old_tok, cur.tokenizer);
    ck_assert_int_eq(ckpt_check_hashes(&s, "c.h5", &cur, false, NULL, 0), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(), want);
    molt_sha256_hex("other model", 11, cur.model_config);
    ck_assert_int_eq(ckpt_check_hashes(&s, "c.h5", &cur, false, NULL, 0), MOLT_EARG);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "base model config hash differs"));
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "; tokenizer hash differs"));
    ck_assert_ptr_null(strstr(molt_err_msg(), "weights index"));
    // --force: accepted, with the same facts as a warning
    ck_assert_ok(ckpt_check_hashes(&s, "c.h5", &cur, true, warn, sizeof warn));
    ck_assert_ptr_nonnull(strstr(warn, "base model config hash differs"));
    ck_assert_ptr_nonnull(strstr(warn, "resuming anyway (--force)"));
    ckpt_state_free(&s);
}
END_TEST

START_TEST(test_bad_names_and_silent_hdf5) {
    ckpt_state s;
    ckpt_state_init(&s);
    ck_assert_int_eq(ckpt_set_int(&s, "a/b", 1), MOLT_EARG);
    ck_assert_str_eq(molt_err_msg(),
                     "checkpoint: bad scalar name 'a/b' (1-127 characters, no '/', not '.')");
    int64_t bad = 0;
    float x = 0;
    ck_assert_int_eq(ckpt_set_tensor(&s, "t", 1, &bad, &x), MOLT_EARG);
    // allocation failures leave the state as it was
    int64_t one = 1;
    ck_assert_ok(ckpt_set_tensor(&s, "t", 1, &one, &x));
    molt_alloc_fail_after(0);
    ck_assert_int_eq(ckpt_set_tensor(&s, "u", 1, &one, &x), MOLT_ENOMEM);
    molt_alloc_fail_after(0);
    ck_assert_int_eq(ckpt_set_blob(&s, "b", "xy", 2), MOLT_ENOMEM);
    molt_alloc_fail_after(-1);
    ck_assert_int_eq(s.n_tensors, 1);
    ck_assert_int_eq(s.n_blobs, 0);
    ckpt_state_free(&s);
    ck_assert_int_eq(ckpt_get_int(&s, "step", &bad), MOLT_EFORMAT);
    ck_assert_str_eq(molt_err_msg(), "checkpoint has no integer 'step'");
    // a file HDF5 cannot parse: a molt message, and nothing on stderr
    char *dir = make_tmpdir(), p[512], errp[512];
    snprintf(p, sizeof p, "%s/junk.h5", dir);
    snprintf(errp, sizeof errp, "%s/stderr.txt", dir);
    FILE *f = fopen(p, "wb");
    for (int i = 0; i < 2000; i++)
        fputc(i % 251, f);
    fclose(f);
    fflush(stderr);
    int saved = dup(2), fd = open(errp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    dup2(fd, 2);
    close(fd);
    molt_status st = ckpt_read(p, &s);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    ck_assert_int_eq(st, MOLT_EFORMAT);
    ck_assert_ptr_nonnull(strstr(molt_err_msg(), "not a molt checkpoint"));
    ck_assert_int_eq(file_size(errp), 0);
    rm_rf(dir);
    molt_free(dir);
}
END_TEST

int main(void) {
    Suite *s = suite_create("checkpoint");
    TCase *tc = tcase_create("checkpoint");
    tcase_add_test(tc, test_sha256_vectors);
    tcase_add_test(tc, test_roundtrip_bit_exact);
    tcase_add_test(tc, test_digest_covers_every_field);
    tcase_add_test(tc, test_damaged_latest_falls_back);
    tcase_add_test(tc, test_contents_checksum);
    tcase_add_test(tc, test_leftover_tmp_and_empty_dir);
    tcase_add_test(tc, test_keep_last_k);
    tcase_add_test(tc, test_hash_mismatch_and_force);
    tcase_add_test(tc, test_bad_names_and_silent_hdf5);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
