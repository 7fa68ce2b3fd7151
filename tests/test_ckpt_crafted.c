// tests/test_ckpt_crafted.c: checkpoints changed on purpose, their header checksum
// recomputed to match (what someone handing over a crafted file would do): ckpt_read never
// crashes and either returns exactly what was written or a format error naming the
// problem. Covers every single-byte change of a small checkpoint, hand-made manifests
// (data outside the file or inside the header, sizes that disagree with dims, duplicate or
// bad names, huge counts, an old format version), and that the file stays an HDF5 file
// whose datasets hold what molt reads through the manifest (h5py users see the same data).
// The fuzzer's seeds (tests/fuzz/corpus/fuzz_checkpoint) are replayed here too.
#include "harness/harness.h"
#include "train/train.h"

#include <hdf5.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

static char dir[64];

static void build_state(ckpt_state *s) {
    ckpt_state_init(s);
    s->step = 7;
    float a[6] = {1.5f, -0.0f, 1e-45f, INFINITY, -3.25e30f, 2};
    int64_t sa[2] = {2, 3}, one = 1;
    ck_assert_ok(ckpt_set_tensor(s, "layers.0.q.lora_A", 2, sa, a));
    ck_assert_ok(ckpt_set_tensor(s, "one", 1, &one, a + 4));
    ck_assert_ok(ckpt_set_int(s, "train.step", 7));
    ck_assert_ok(ckpt_set_int(s, "min", INT64_MIN));
    ck_assert_ok(ckpt_set_float(s, "lr", 2e-4));
    ck_assert_ok(ckpt_set_blob(s, "rng", "\x01\x00\x02", 3));
    ck_assert_ok(ckpt_set_blob(s, "empty", "", 0));
    ck_assert_ok(ckpt_set_string(s, "config", "r: 4\n"));
}

// The bytes of a freshly written checkpoint of build_state.
static uint8_t *written(size_t *len) {
    snprintf(dir, sizeof dir, "/tmp/molt-crafted-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    ckpt_state s;
    build_state(&s);
    char *path = NULL;
    ck_assert_ok(ckpt_write(dir, &s, 0, &path));
    ckpt_state_free(&s);
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = molt_malloc(*len);
    ck_assert_uint_eq(fread(b, 1, *len, f), *len);
    fclose(f);
    molt_free(path);
    return b;
}

static void remove_dir(void) {
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}

// Rewrites the header's sha256 line to match bytes [512, len).
static void reseal(uint8_t *b, size_t len) {
    char hex[65];
    molt_sha256_hex(b + 512, len - 512, hex);
    char *line = strstr((char *)b, "\nsha256 ");
    ck_assert_ptr_nonnull(line);
    memcpy(line + 8, hex, 64);
}

static bool same_as_written(const ckpt_state *r) {
    ckpt_state s;
    build_state(&s);
    char a[65], b[65];
    ckpt_state_digest(&s, a);
    ckpt_state_digest(r, b);
    ckpt_state_free(&s);
    return !strcmp(a, b) && r->step == 7;
}

START_TEST(test_every_byte_changed) {
    size_t len;
    uint8_t *orig = written(&len), *b = molt_malloc(len);
    int ok = 0, refused = 0;
    // every byte after the header (manifest and HDF5 part), two changes each
    for (size_t i = 512; i < len; i++) {
        for (int k = 0; k < 2; k++) {
            memcpy(b, orig, len);
            b[i] = k ? (uint8_t)(b[i] ^ 0x80) : (uint8_t)(b[i] + 1);
            reseal(b, len);
            ckpt_state r;
            molt_status st = ckpt_read_memory(b, len, "crafted", &r);
            if (st == MOLT_OK) {
                ck_assert_msg(same_as_written(&r), "byte %zu: read different contents", i);
                ok++;
            } else {
                ck_assert_int_eq(st, MOLT_EFORMAT);
                ck_assert_ptr_nonnull(strstr(molt_err_msg(), "checkpoint crafted: "));
                refused++;
            }
            ckpt_state_free(&r);
        }
    }
    // changes to HDF5's own metadata leave molt's contents intact; changes to the manifest
    // or the data are refused
    ck_assert_int_gt(ok, 0);
    ck_assert_int_gt(refused, 0);
    molt_free(b);
    molt_free(orig);
    remove_dir();
}
END_TEST

// Replaces the first occurrence of from in the manifest with to (same length or shorter,
// padded with NULs at the manifest's end), reseals, and expects a refusal mentioning want.
static void crafted(const uint8_t *orig, size_t len, const char *from, const char *to,
                    const char *want) {
    uint8_t *b = molt_malloc(len);
    memcpy(b, orig, len);
    char *at = strstr((char *)b + 512, from);
    ck_assert_msg(at != NULL, "no '%s' in the manifest", from);
    size_t nf = strlen(from), nt = strlen(to), tail = strlen(at + nf);
    ck_assert_uint_le(nt, nf);
    memmove(at + nt, at + nf, tail + 1);
    memcpy(at, to, nt);
    memset(at + nt + tail, 0, nf - nt);
    reseal(b, len);
    ckpt_state r;
    ck_assert_int_eq(ckpt_read_memory(b, len, "crafted", &r), MOLT_EFORMAT);
    ck_assert_msg(strstr(molt_err_msg(), want), "'%s' -> '%s': %s", from, to, molt_err_msg());
    molt_free(b);
}

// The manifest line of the entry named name (kind and numbers), into line.
static void line_of(const uint8_t *b, const char *name, char *line, size_t cap) {
    char key[64];
    snprintf(key, sizeof key, " %s\n", name);
    const char *end = strstr((const char *)b + 512, key);
    ck_assert_ptr_nonnull(end);
    const char *start = end;
    while (start[-1] != '\n' && start - 1 >= (const char *)b + 512 && start[-1])
        start--;
    snprintf(line, cap, "%.*s", (int)(end - start + strlen(key)), start);
}

START_TEST(test_crafted_manifests) {
    size_t len;
    uint8_t *orig = written(&len);
    char t[256], i[256], bl[256], want[300];
    line_of(orig, "layers.0.q.lora_A", t, sizeof t); // "T off 24 2 2 3 layers.0.q.lora_A\n"
    line_of(orig, "min", i, sizeof i);               // "I off 8 0 min\n"
    line_of(orig, "rng", bl, sizeof bl);             // "B off 3 1 3 rng\n"
    unsigned long long off;
    ck_assert_int_eq(sscanf(t, "T %llu", &off), 1);
    // data past the end of the file, inside the header, or wrapping around
    snprintf(want, sizeof want, "T %zu 24 2 2 3 x\n", len - 8);
    crafted(orig, len, t, want, "outside the HDF5 part");
    crafted(orig, len, t, "T 8 24 2 2 3 layers.0.q.lora_A\n", "outside the HDF5 part");
    crafted(orig, len, t, "T 18446744073709551615 24 2 2 3 x\n", "damaged");
    // sizes that disagree with the kind or the dims
    snprintf(want, sizeof want, "T %llu 28 2 2 3 layers.0.q.lora_A\n", off);
    crafted(orig, len, t, want, "does not match");
    snprintf(want, sizeof want, "T %llu 24 2 3 3 layers.0.q.lora_A\n", off);
    crafted(orig, len, t, want, "does not match");
    snprintf(want, sizeof want, "T %llu 24 5 1 1 1 2 3 x\n", off);
    crafted(orig, len, t, want, "damaged");
    snprintf(want, sizeof want, "T %llu 0 1 0 layers.0.q.lora_A\n", off);
    crafted(orig, len, t, want, "does not match");
    snprintf(want, sizeof want, "T %llu 24 1 4294967296 x\n", off);
    crafted(orig, len, t, want, "damaged");
    crafted(orig, len, i, "I 1024 4 0 min\n", "does not match");
    crafted(orig, len, bl, "B 0 3 1 3 rng\n", "outside the HDF5 part");
    // numbers written oddly, unknown kinds, bad names, duplicates
    crafted(orig, len, t, "T 0100 24 2 2 3 layers.0.q.lora_A\n", "damaged");
    crafted(orig, len, t, "X 1024 24 2 2 3 layers.0.q.lora_A\n", "unknown kind");
    snprintf(want, sizeof want, "T %llu 24 2 2 3 a/b\n", off);
    crafted(orig, len, t, want, "bad character");
    snprintf(want, sizeof want, "T %llu 24 2 2 3 a\tb\n", off);
    crafted(orig, len, t, want, "bad character");
    snprintf(want, sizeof want, "T %llu 24 2 2 3 one\n", off);
    crafted(orig, len, t, want, "appears twice");
    // header numbers
    uint8_t *b = molt_malloc(len);
    const struct {
        const char *from, *to, *want;
    } hdr[] = {{"version 2", "version 1", "format version 1"},
               {"version 2", "version 9", "format version 9"},
               {"entries 8", "entries 9", "manifest line 9"},
               {"entries 8", "entries 7", "more lines than"},
               {"entries 8", "entries 999999999", "damaged checkpoint header"},
               {"MOLTCKPT", "MOLTCKPX", "not a molt checkpoint"}};
    for (size_t k = 0; k < sizeof hdr / sizeof *hdr; k++) {
        memcpy(b, orig, len);
        char *at = strstr((char *)b, hdr[k].from);
        ck_assert_msg(at && at < (char *)b + 512, "no '%s' in the header", hdr[k].from);
        size_t nf = strlen(hdr[k].from), nt = strlen(hdr[k].to);
        memmove(at + nt, at + nf, 512 - (size_t)(at - (char *)b) - (nt > nf ? nt : nf));
        memcpy(at, hdr[k].to, nt);
        ckpt_state r;
        ck_assert_int_eq(ckpt_read_memory(b, len, "crafted", &r), MOLT_EFORMAT);
        ck_assert_msg(strstr(molt_err_msg(), hdr[k].want), "%s -> %s: %s", hdr[k].from,
                      hdr[k].to, molt_err_msg());
    }
    molt_free(b);
    molt_free(orig);
    remove_dir();
}
END_TEST

// The file is still an HDF5 file; its datasets hold exactly what molt reads.
START_TEST(test_hdf5_view_agrees) {
    size_t len;
    uint8_t *orig = written(&len);
    char path[128];
    snprintf(path, sizeof path, "%s/checkpoints/step-7.h5", dir);
    ckpt_state r;
    ck_assert_ok(ckpt_read(path, &r));
    ck_assert(same_as_written(&r));
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    ck_assert_int_ge(f, 0);
    char name[200];
    for (int k = 0; k < r.n_tensors; k++) {
        snprintf(name, sizeof name, "/tensors/%s", r.tensors[k].name);
        float buf[16];
        hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
        ck_assert_int_ge(ds, 0);
        ck_assert_int_ge(H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf), 0);
        ck_assert_mem_eq(buf, r.tensors[k].data, (size_t)r.tensors[k].numel * 4);
        H5Dclose(ds);
    }
    for (int k = 0; k < r.n_ints; k++) {
        snprintf(name, sizeof name, "/ints/%s", r.ints[k].name);
        int64_t v;
        hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
        ck_assert_int_ge(H5Dread(ds, H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, &v), 0);
        ck_assert_int_eq(v, r.ints[k].i);
        H5Dclose(ds);
    }
    for (int k = 0; k < r.n_blobs; k++) {
        if (!r.blobs[k].len)
            continue;
        snprintf(name, sizeof name, "/blobs/%s", r.blobs[k].name);
        uint8_t buf[64];
        hid_t ds = H5Dopen2(f, name, H5P_DEFAULT);
        ck_assert_int_ge(H5Dread(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf), 0);
        ck_assert_mem_eq(buf, r.blobs[k].data, r.blobs[k].len);
        H5Dclose(ds);
    }
    int64_t version;
    hid_t a = H5Aopen(f, "molt_format_version", H5P_DEFAULT);
    ck_assert_int_ge(H5Aread(a, H5T_NATIVE_INT64, &version), 0);
    ck_assert_int_eq(version, CKPT_FORMAT_VERSION);
    H5Aclose(a);
    H5Fclose(f);
    ckpt_state_free(&r);
    molt_free(orig);
    remove_dir();
}
END_TEST

// The fuzzer's seeds are real checkpoints: each reads, with the state they were made from
// (fuzz_checkpoint.c's seed_state: step 3 + k, the first tensor of k + 1 dims).
START_TEST(test_seed_corpus) {
    const char *src = getenv("MOLT_SOURCE_DIR");
    char path[4096];
    for (int k = 0; k < 3; k++) {
        snprintf(path, sizeof path, "%s/tests/fuzz/corpus/fuzz_checkpoint/seed-%d.h5",
                 src ? src : ".", k);
        ckpt_state r;
        ck_assert_ok(ckpt_read(path, &r));
        ck_assert_int_eq(r.step, 3 + k);
        const ckpt_tensor *t = ckpt_get_tensor(&r, "layers.0.self_attn.q_a_proj.lora_A");
        ck_assert_ptr_nonnull(t);
        ck_assert_int_eq(t->ndim, k + 1);
        ckpt_state_free(&r);
    }
}
END_TEST

int main(void) {
    Suite *s = suite_create("ckpt_crafted");
    TCase *tc = tcase_create("ckpt_crafted");
    tcase_set_timeout(tc, 600);
    tcase_add_test(tc, test_every_byte_changed);
    tcase_add_test(tc, test_crafted_manifests);
    tcase_add_test(tc, test_hdf5_view_agrees);
    tcase_add_test(tc, test_seed_corpus);
    suite_add_tcase(s, tc);
    return harness_run(s);
}
