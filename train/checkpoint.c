// train/checkpoint.c: checkpoint files (HDF5): writing them atomically, keeping the last K,
// reading and validating them, and finding the newest valid one to resume from.
//
// File layout (output_dir/checkpoints/step-<N>.h5):
//   bytes [0, 512)   a text header in HDF5's user block: "MOLTCKPT", the format version,
//                    the file size and the SHA-256 of every byte after the header. It is
//                    checked before HDF5 sees the file, so truncated or damaged files are
//                    rejected without trusting HDF5's handling of malformed metadata.
//   HDF5 root attributes  molt_format_version (i64), step (i64), checksum (64-char string:
//                    ckpt_state_digest of the contents, a second, format-independent check)
//   /tensors/<name>  f32 datasets of the tensor's shape
//   /ints/<name>, /floats/<name>  scalar i64 / f64 datasets
//   /blobs/<name>    1-D u8 datasets (a null dataspace when empty)
// HDF5's latest file format is requested, which also checksums HDF5's own metadata.
//
// Not here: what the trainer stores (names of tensors, RNG and cursor blobs); the in-memory
// container (ckpt_state.c).
#include "train.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEADER_BYTES 512
#define HEADER_MAGIC "MOLTCKPT"

static const char *const group_names[4] = {"tensors", "ints", "floats", "blobs"};

// HDF5 prints an error stack on stderr by default; molt reports its own messages instead.
static void hdf5_quiet(void) {
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

// ---------------------------------------------------------------------------------------
// Paths and directories.

static char *path_join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = molt_malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", a, b);
    return p;
}

// mkdir -p for dir (an existing directory is fine).
static molt_status make_dirs(const char *dir) {
    char *p = molt_strdup(dir);
    if (!p)
        return molt_err(MOLT_ENOMEM, "checkpoint: out of memory");
    for (char *s = p + 1;; s++) {
        char c = *s;
        if (c != '/' && c != '\0')
            continue;
        *s = '\0';
        if (mkdir(p, 0777) != 0 && errno != EEXIST) {
            molt_status st = molt_err(MOLT_EIO, "cannot create directory %s: %s", p,
                                      strerror(errno));
            molt_free(p);
            return st;
        }
        *s = c;
        if (c == '\0')
            break;
    }
    molt_free(p);
    return MOLT_OK;
}

static molt_status fsync_path(const char *path, bool dir) {
    int fd = open(path, dir ? O_RDONLY : O_RDWR);
    if (fd < 0)
        return molt_err(MOLT_EIO, "cannot open %s to sync it: %s", path, strerror(errno));
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    if (rc != 0)
        return molt_err(MOLT_EIO, "fsync of %s failed: %s", path, strerror(e));
    return MOLT_OK;
}

// Parses "step-<digits>.h5" exactly; -1 for any other name (including *.h5.tmp).
static int64_t step_of_name(const char *name) {
    if (strncmp(name, "step-", 5) != 0)
        return -1;
    const char *p = name + 5;
    int64_t n = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9'; p++, digits++) {
        if (n > (INT64_MAX - 9) / 10)
            return -1;
        n = n * 10 + (*p - '0');
    }
    return digits > 0 && strcmp(p, ".h5") == 0 ? n : -1;
}

typedef struct {
    int64_t step;
    char *name;
} ckpt_entry;

static int cmp_entry_desc(const void *a, const void *b) {
    int64_t x = ((const ckpt_entry *)a)->step, y = ((const ckpt_entry *)b)->step;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void free_entries(ckpt_entry *e, int n) {
    for (int i = 0; i < n; i++)
        molt_free(e[i].name);
    molt_free(e);
}

// The step-<N>.h5 files of dir, newest (largest N) first. A missing dir gives none.
static molt_status list_checkpoints(const char *dir, ckpt_entry **out, int *n_out) {
    *out = NULL;
    *n_out = 0;
    DIR *d = opendir(dir);
    if (!d)
        return errno == ENOENT ? MOLT_OK
                               : molt_err(MOLT_EIO, "cannot list %s: %s", dir, strerror(errno));
    ckpt_entry *e = NULL;
    int n = 0, cap = 0;
    molt_status st = MOLT_OK;
    for (struct dirent *de; (de = readdir(d)) != NULL;) {
        int64_t step = step_of_name(de->d_name);
        if (step < 0)
            continue;
        if (n == cap) {
            int ncap = cap ? 2 * cap : 16;
            ckpt_entry *ne = molt_realloc(e, (size_t)ncap * sizeof *e);
            if (!ne) {
                st = molt_err(MOLT_ENOMEM, "checkpoint: out of memory listing %s", dir);
                break;
            }
            e = ne;
            cap = ncap;
        }
        e[n].step = step;
        e[n].name = path_join(dir, de->d_name);
        if (!e[n].name) {
            st = molt_err(MOLT_ENOMEM, "checkpoint: out of memory listing %s", dir);
            break;
        }
        n++;
    }
    closedir(d);
    if (st != MOLT_OK) {
        free_entries(e, n);
        return st;
    }
    if (n > 1)
        qsort(e, (size_t)n, sizeof *e, cmp_entry_desc);
    *out = e;
    *n_out = n;
    return MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Writing.

static molt_status write_attr_i64(hid_t loc, const char *name, int64_t v) {
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(loc, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = a < 0 ? -1 : H5Awrite(a, H5T_NATIVE_INT64, &v);
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(sp);
    return rc < 0 ? molt_err(MOLT_EIO, "HDF5: cannot write attribute %s", name) : MOLT_OK;
}

static molt_status write_attr_hex(hid_t loc, const char *name, const char hex[65]) {
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, 64);
    H5Tset_strpad(t, H5T_STR_NULLPAD);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(loc, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = a < 0 ? -1 : H5Awrite(a, t, hex);
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(sp);
    H5Tclose(t);
    return rc < 0 ? molt_err(MOLT_EIO, "HDF5: cannot write attribute %s", name) : MOLT_OK;
}

// One dataset of file type ft holding n_dims dims (0 = scalar, -1 = null dataspace).
static molt_status write_dataset(hid_t grp, const char *name, hid_t ft, hid_t mt, int n_dims,
                                 const int64_t *dims, const void *data) {
    hsize_t hd[AG_MAX_DIMS];
    for (int i = 0; i < n_dims; i++)
        hd[i] = (hsize_t)dims[i];
    hid_t sp = n_dims < 0    ? H5Screate(H5S_NULL)
               : n_dims == 0 ? H5Screate(H5S_SCALAR)
                             : H5Screate_simple(n_dims, hd, NULL);
    hid_t ds = sp < 0 ? -1
                      : H5Dcreate2(grp, name, ft, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = ds < 0       ? -1
                : n_dims < 0 ? 0 // a null dataspace holds no data
                             : H5Dwrite(ds, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    if (ds >= 0)
        H5Dclose(ds);
    if (sp >= 0)
        H5Sclose(sp);
    return rc < 0 ? molt_err(MOLT_EIO, "HDF5: cannot write dataset %s", name) : MOLT_OK;
}

static molt_status write_groups(hid_t f, const ckpt_state *s) {
    hid_t g[4];
    for (int k = 0; k < 4; k++)
        g[k] = H5Gcreate2(f, group_names[k], H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    molt_status st = MOLT_OK;
    if (g[0] < 0 || g[1] < 0 || g[2] < 0 || g[3] < 0)
        st = molt_err(MOLT_EIO, "HDF5: cannot create the checkpoint groups");
    for (int i = 0; st == MOLT_OK && i < s->n_tensors; i++) {
        const ckpt_tensor *t = &s->tensors[i];
        st = write_dataset(g[0], t->name, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, t->ndim, t->shape,
                           t->data);
    }
    for (int i = 0; st == MOLT_OK && i < s->n_ints; i++)
        st = write_dataset(g[1], s->ints[i].name, H5T_STD_I64LE, H5T_NATIVE_INT64, 0, NULL,
                           &s->ints[i].i);
    for (int i = 0; st == MOLT_OK && i < s->n_floats; i++)
        st = write_dataset(g[2], s->floats[i].name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, 0, NULL,
                           &s->floats[i].f);
    for (int i = 0; st == MOLT_OK && i < s->n_blobs; i++) {
        const ckpt_blob *b = &s->blobs[i];
        int64_t len = (int64_t)b->len;
        st = write_dataset(g[3], b->name, H5T_STD_U8LE, H5T_NATIVE_UINT8, b->len ? 1 : -1, &len,
                           b->data);
    }
    for (int k = 0; k < 4; k++)
        if (g[k] >= 0)
            H5Gclose(g[k]);
    return st;
}

// Writes the HDF5 part of the file at path (with an empty user block for the header).
static molt_status write_hdf5(const char *path, const ckpt_state *s) {
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE), fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_userblock(fcpl, HEADER_BYTES);
    H5Pset_libver_bounds(fapl, H5F_LIBVER_LATEST, H5F_LIBVER_LATEST);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, fcpl, fapl);
    H5Pclose(fcpl);
    H5Pclose(fapl);
    if (f < 0)
        return molt_err(MOLT_EIO, "HDF5: cannot create %s", path);
    char hex[65];
    ckpt_state_digest(s, hex);
    molt_status st = write_attr_i64(f, "molt_format_version", CKPT_FORMAT_VERSION);
    if (st == MOLT_OK)
        st = write_attr_i64(f, "step", s->step);
    if (st == MOLT_OK)
        st = write_attr_hex(f, "checksum", hex);
    if (st == MOLT_OK)
        st = write_groups(f, s);
    if (H5Fclose(f) < 0 && st == MOLT_OK)
        st = molt_err(MOLT_EIO, "HDF5: cannot close %s", path);
    return st;
}

// SHA-256 of the bytes of f from offset `from` to the end; the byte count in *n.
static molt_status hash_tail(FILE *f, long from, char hex[65], int64_t *n) {
    if (fseek(f, from, SEEK_SET) != 0)
        return molt_err(MOLT_EIO, "seek failed");
    molt_sha256 c;
    molt_sha256_init(&c);
    uint8_t buf[1 << 15], d[32];
    size_t got;
    *n = 0;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) {
        molt_sha256_update(&c, buf, got);
        *n += (int64_t)got;
    }
    if (ferror(f))
        return molt_err(MOLT_EIO, "read error");
    molt_sha256_final(&c, d);
    for (int i = 0; i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", d[i]);
    return MOLT_OK;
}

// Fills the user block with the header describing the rest of the file, and fsyncs it.
static molt_status write_header(const char *path) {
    FILE *f = fopen(path, "r+b");
    if (!f)
        return molt_err(MOLT_EIO, "cannot reopen %s: %s", path, strerror(errno));
    char hex[65], hdr[HEADER_BYTES];
    int64_t n = 0;
    molt_status st = hash_tail(f, HEADER_BYTES, hex, &n);
    if (st == MOLT_OK) {
        memset(hdr, 0, sizeof hdr);
        snprintf(hdr, sizeof hdr, "%s\nversion %d\nsize %" PRId64 "\nsha256 %s\n", HEADER_MAGIC,
                 CKPT_FORMAT_VERSION, n + HEADER_BYTES, hex);
        if (fseek(f, 0, SEEK_SET) != 0 || fwrite(hdr, 1, sizeof hdr, f) != sizeof hdr ||
            fflush(f) != 0 || fsync(fileno(f)) != 0)
            st = molt_err(MOLT_EIO, "cannot write the header of %s: %s", path, strerror(errno));
    }
    if (fclose(f) != 0 && st == MOLT_OK)
        st = molt_err(MOLT_EIO, "cannot close %s: %s", path, strerror(errno));
    return st;
}

// Deletes all but the newest keep step-*.h5 files of dir, never the one just written.
static molt_status prune(const char *dir, int keep, const char *written) {
    ckpt_entry *e;
    int n;
    MOLT_TRY(list_checkpoints(dir, &e, &n));
    molt_status st = MOLT_OK;
    for (int i = keep; i < n; i++)
        if (strcmp(e[i].name, written) != 0 && unlink(e[i].name) != 0 && st == MOLT_OK)
            st = molt_err(MOLT_EIO, "cannot delete old checkpoint %s: %s", e[i].name,
                          strerror(errno));
    free_entries(e, n);
    return st;
}

molt_status ckpt_write(const char *output_dir, const ckpt_state *s, int keep_last,
                       char **path_out) {
    hdf5_quiet();
    if (path_out)
        *path_out = NULL;
    if (s->step < 0)
        return molt_err(MOLT_EARG, "checkpoint: negative step %lld", (long long)s->step);
    char *dir = path_join(output_dir, "checkpoints");
    char name[64], tmp_name[64];
    snprintf(name, sizeof name, "step-%lld.h5", (long long)s->step);
    snprintf(tmp_name, sizeof tmp_name, "step-%lld.h5.tmp", (long long)s->step);
    char *path = dir ? path_join(dir, name) : NULL, *tmp = dir ? path_join(dir, tmp_name) : NULL;
    molt_status st = dir && path && tmp ? MOLT_OK
                                        : molt_err(MOLT_ENOMEM, "checkpoint: out of memory");
    if (st == MOLT_OK)
        st = make_dirs(dir);
    if (st == MOLT_OK)
        st = write_hdf5(tmp, s);
    if (st == MOLT_OK)
        st = write_header(tmp);
    if (st == MOLT_OK && rename(tmp, path) != 0)
        st = molt_err(MOLT_EIO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (st == MOLT_OK)
        st = fsync_path(dir, true);
    if (st != MOLT_OK && tmp)
        unlink(tmp); // a partial temporary file is never picked up, but do not leave it
    if (st == MOLT_OK && keep_last > 0)
        st = prune(dir, keep_last, path);
    if (st == MOLT_OK && path_out) {
        *path_out = path;
        path = NULL;
    }
    if (st != MOLT_OK)
        molt_err_wrap(st, "writing checkpoint step %lld in %s", (long long)s->step,
                      output_dir);
    molt_free(dir);
    molt_free(path);
    molt_free(tmp);
    return st;
}

// ---------------------------------------------------------------------------------------
// Reading and validation.

// Checks the header: magic, version, that the file has the recorded size, and the hash of
// everything after the header.
static molt_status check_header(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return molt_err(MOLT_EIO, "cannot open: %s", strerror(errno));
    char hdr[HEADER_BYTES + 1] = {0}, want[65] = {0}, have[65];
    int version = 0;
    int64_t size = -1, tail = 0;
    molt_status st = MOLT_OK;
    size_t got = fread(hdr, 1, HEADER_BYTES, f);
    if (got < HEADER_BYTES || strncmp(hdr, HEADER_MAGIC "\n", sizeof HEADER_MAGIC) != 0)
        st = molt_err(MOLT_EFORMAT, "not a molt checkpoint (no %s header)", HEADER_MAGIC);
    else if (sscanf(hdr + sizeof HEADER_MAGIC, "version %d\nsize %" SCNd64 "\nsha256 %64s",
                    &version, &size, want) != 3 ||
             strlen(want) != 64)
        st = molt_err(MOLT_EFORMAT, "damaged checkpoint header");
    else if (version != CKPT_FORMAT_VERSION)
        st = molt_err(MOLT_EFORMAT, "checkpoint format version %d (this build reads %d)",
                      version, CKPT_FORMAT_VERSION);
    if (st == MOLT_OK)
        st = hash_tail(f, HEADER_BYTES, have, &tail);
    if (st == MOLT_OK && tail + HEADER_BYTES != size)
        st = molt_err(MOLT_EFORMAT, "truncated or extended: %lld bytes, expected %lld",
                      (long long)(tail + HEADER_BYTES), (long long)size);
    else if (st == MOLT_OK && strcmp(have, want) != 0)
        st = molt_err(MOLT_EFORMAT, "corrupt: file checksum mismatch");
    fclose(f);
    return st;
}

static molt_status read_attr_i64(hid_t loc, const char *name, int64_t *v) {
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT);
    hid_t sp = a < 0 ? -1 : H5Aget_space(a);
    bool ok = sp >= 0 && H5Sget_simple_extent_type(sp) == H5S_SCALAR &&
              H5Aread(a, H5T_NATIVE_INT64, v) >= 0;
    if (sp >= 0)
        H5Sclose(sp);
    if (a >= 0)
        H5Aclose(a);
    return ok ? MOLT_OK : molt_err(MOLT_EFORMAT, "missing or bad attribute %s", name);
}

static molt_status read_attr_hex(hid_t loc, const char *name, char hex[65]) {
    hid_t a = H5Aopen(loc, name, H5P_DEFAULT);
    hid_t t = a < 0 ? -1 : H5Aget_type(a);
    bool ok = t >= 0 && H5Tget_class(t) == H5T_STRING && H5Tget_size(t) == 64 &&
              !H5Tis_variable_str(t) && H5Aread(a, t, hex) >= 0;
    hex[64] = '\0';
    if (t >= 0)
        H5Tclose(t);
    if (a >= 0)
        H5Aclose(a);
    return ok ? MOLT_OK : molt_err(MOLT_EFORMAT, "missing or bad attribute %s", name);
}

// Opens grp/name, checks its file type equals ft and returns its rank (-1 for a null
// dataspace) and dims. The caller closes *ds.
static molt_status open_dataset(hid_t grp, const char *kind, const char *name, hid_t ft,
                                hid_t *ds, int *rank, hsize_t dims[AG_MAX_DIMS]) {
    *ds = H5Dopen2(grp, name, H5P_DEFAULT);
    if (*ds < 0)
        return molt_err(MOLT_EFORMAT, "%s/%s is not a readable dataset", kind, name);
    hid_t t = H5Dget_type(*ds), sp = H5Dget_space(*ds);
    bool type_ok = t >= 0 && H5Tequal(t, ft) > 0;
    H5S_class_t cls = sp >= 0 ? H5Sget_simple_extent_type(sp) : H5S_NO_CLASS;
    *rank = cls == H5S_NULL ? -1 : sp >= 0 ? H5Sget_simple_extent_ndims(sp) : -2;
    bool rank_ok = *rank >= -1 && *rank <= AG_MAX_DIMS;
    if (rank_ok && *rank > 0)
        H5Sget_simple_extent_dims(sp, dims, NULL);
    if (t >= 0)
        H5Tclose(t);
    if (sp >= 0)
        H5Sclose(sp);
    if (!type_ok || !rank_ok) {
        H5Dclose(*ds);
        *ds = -1;
        return molt_err(MOLT_EFORMAT, "%s/%s has the wrong %s", kind, name,
                        type_ok ? "rank" : "data type");
    }
    return MOLT_OK;
}

static molt_status read_tensor(hid_t grp, const char *name, ckpt_state *s) {
    hid_t ds;
    int rank;
    hsize_t dims[AG_MAX_DIMS];
    MOLT_TRY(open_dataset(grp, "tensors", name, H5T_IEEE_F32LE, &ds, &rank, dims));
    int64_t shape[AG_MAX_DIMS], numel = 1;
    bool ok = rank >= 1;
    for (int d = 0; ok && d < rank; d++) {
        shape[d] = (int64_t)dims[d];
        ok = shape[d] >= 1 && shape[d] <= ((int64_t)1 << 40) / numel;
        numel *= ok ? shape[d] : 1;
    }
    float *buf = ok ? molt_malloc((size_t)numel * sizeof(float)) : NULL;
    ok = ok && buf && H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) >= 0;
    H5Dclose(ds);
    molt_status st = ok ? ckpt_set_tensor(s, name, rank, shape, buf)
                        : molt_err(MOLT_EFORMAT, "tensors/%s: bad shape or unreadable data", name);
    molt_free(buf);
    return st;
}

static molt_status read_scalar(hid_t grp, const char *kind, const char *name, ckpt_state *s) {
    bool is_int = strcmp(kind, "ints") == 0;
    hid_t ds;
    int rank;
    hsize_t dims[AG_MAX_DIMS];
    MOLT_TRY(open_dataset(grp, kind, name, is_int ? H5T_STD_I64LE : H5T_IEEE_F64LE, &ds, &rank,
                          dims));
    int64_t iv = 0;
    double fv = 0;
    bool ok = rank == 0 && H5Dread(ds, is_int ? H5T_NATIVE_INT64 : H5T_NATIVE_DOUBLE, H5S_ALL,
                                   H5S_ALL, H5P_DEFAULT, is_int ? (void *)&iv : (void *)&fv) >= 0;
    H5Dclose(ds);
    if (!ok)
        return molt_err(MOLT_EFORMAT, "%s/%s is not a readable scalar", kind, name);
    return is_int ? ckpt_set_int(s, name, iv) : ckpt_set_float(s, name, fv);
}

static molt_status read_blob(hid_t grp, const char *name, ckpt_state *s) {
    hid_t ds;
    int rank;
    hsize_t dims[AG_MAX_DIMS];
    MOLT_TRY(open_dataset(grp, "blobs", name, H5T_STD_U8LE, &ds, &rank, dims));
    if (rank == -1) {
        H5Dclose(ds);
        return ckpt_set_blob(s, name, "", 0);
    }
    bool ok = rank == 1 && dims[0] <= ((hsize_t)1 << 40);
    uint8_t *buf = ok ? molt_malloc((size_t)dims[0]) : NULL;
    ok = ok && buf && H5Dread(ds, H5T_NATIVE_UINT8, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) >= 0;
    H5Dclose(ds);
    molt_status st = ok ? ckpt_set_blob(s, name, buf, (size_t)dims[0])
                        : molt_err(MOLT_EFORMAT, "blobs/%s: bad shape or unreadable data", name);
    molt_free(buf);
    return st;
}

typedef struct {
    int kind;
    ckpt_state *s;
    molt_status st;
} read_walk;

static herr_t read_member(hid_t grp, const char *name, const H5L_info_t *info, void *user) {
    read_walk *w = user;
    if (info->type != H5L_TYPE_HARD) {
        w->st = molt_err(MOLT_EFORMAT, "%s/%s is a link", group_names[w->kind], name);
        return -1;
    }
    if (w->kind == 0)
        w->st = read_tensor(grp, name, w->s);
    else if (w->kind == 3)
        w->st = read_blob(grp, name, w->s);
    else
        w->st = read_scalar(grp, group_names[w->kind], name, w->s);
    return w->st == MOLT_OK ? 0 : -1;
}

static molt_status read_contents(hid_t f, ckpt_state *s) {
    int64_t version = 0;
    char want[65], have[65];
    MOLT_TRY(read_attr_i64(f, "molt_format_version", &version));
    if (version != CKPT_FORMAT_VERSION)
        return molt_err(MOLT_EFORMAT, "format version %lld (this build reads %d)",
                        (long long)version, CKPT_FORMAT_VERSION);
    MOLT_TRY(read_attr_i64(f, "step", &s->step));
    MOLT_TRY(read_attr_hex(f, "checksum", want));
    for (int k = 0; k < 4; k++) {
        hid_t g = H5Gopen2(f, group_names[k], H5P_DEFAULT);
        if (g < 0)
            return molt_err(MOLT_EFORMAT, "missing group /%s", group_names[k]);
        read_walk w = {k, s, MOLT_OK};
        herr_t rc = H5Literate(g, H5_INDEX_NAME, H5_ITER_INC, NULL, read_member, &w);
        H5Gclose(g);
        if (w.st != MOLT_OK)
            return w.st;
        if (rc < 0)
            return molt_err(MOLT_EFORMAT, "cannot list group /%s", group_names[k]);
    }
    ckpt_state_digest(s, have);
    if (strcmp(have, want) != 0)
        return molt_err(MOLT_EFORMAT, "corrupt: contents checksum mismatch");
    return MOLT_OK;
}

molt_status ckpt_read(const char *path, ckpt_state *s) {
    hdf5_quiet();
    ckpt_state_init(s);
    molt_status st = check_header(path);
    if (st == MOLT_OK) {
        hid_t f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        if (f < 0) {
            st = molt_err(MOLT_EFORMAT, "HDF5 cannot open it");
        } else {
            st = read_contents(f, s);
            H5Fclose(f);
        }
    }
    if (st != MOLT_OK) {
        ckpt_state_free(s);
        molt_err_wrap(st, "checkpoint %s", path);
    }
    return st;
}

molt_status ckpt_find_latest_valid(const char *output_dir, ckpt_report_fn report, void *user,
                                   char **path_out, ckpt_state *s) {
    *path_out = NULL;
    ckpt_state_init(s);
    char *dir = path_join(output_dir, "checkpoints");
    if (!dir)
        return molt_err(MOLT_ENOMEM, "checkpoint: out of memory");
    ckpt_entry *e;
    int n;
    molt_status st = list_checkpoints(dir, &e, &n);
    if (st != MOLT_OK) {
        molt_free(dir);
        return st;
    }
    int i = 0;
    for (; i < n; i++) {
        if (ckpt_read(e[i].name, s) == MOLT_OK)
            break;
        if (report)
            report(user, e[i].name, molt_err_msg());
    }
    if (i < n) {
        *path_out = e[i].name;
        e[i].name = NULL;
    } else if (n > 0) {
        st = molt_err(MOLT_EFORMAT, "no valid checkpoint in %s (%d file%s rejected)", dir, n,
                      n == 1 ? "" : "s");
    }
    free_entries(e, n);
    molt_free(dir);
    return st;
}
