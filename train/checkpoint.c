// train/checkpoint.c: writing checkpoint files (HDF5) atomically, keeping the last K, and
// finding the newest valid one to resume from.
//
// File layout (output_dir/checkpoints/step-<N>.h5), format version 2:
//   bytes [0, 512)   a text header in HDF5's user block: "MOLTCKPT", the format version,
//                    the file size, the user block size U, the step, the number of entries,
//                    the digest of the contents (ckpt_state_digest) and the SHA-256 of
//                    every byte from 512 to the end;
//   bytes [512, U)   the manifest, one line per entry: its kind (T tensor, I int, F float,
//                    B blob), the offset and length of its raw little-endian data in this
//                    file, its dims and its name; NUL padding after the last line;
//   bytes [U, end)   the HDF5 file proper: root attributes molt_format_version, step,
//                    checksum; /tensors/<name> f32 datasets of the tensor's shape;
//                    /ints/<name>, /floats/<name> scalar i64 / f64 datasets; /blobs/<name>
//                    1-D u8 datasets (a null dataspace when empty). Datasets are contiguous,
//                    their data where the manifest says (HDF5's own offsets, H5Dget_offset).
// molt reads checkpoints through the header and the manifest alone (ckpt_read.c), never
// through HDF5: HDF5 can crash on crafted metadata, and a checkpoint is a file a user may
// be handed. The HDF5 part keeps the file readable by h5py and other HDF5 tools.
// A full disk is found before HDF5 writes (common/h5io.h reserves the space), and any HDF5
// failure is an error carrying errno's text.
//
// Not here: reading and validation (ckpt_read.c), what the trainer stores, the in-memory
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

#include "../common/fsio.h"
#include "../common/h5io.h"


static const char *const group_names[4] = {"tensors", "ints", "floats", "blobs"};

// ---------------------------------------------------------------------------------------
// Paths and directories.

static char *path_join(const char *a, const char *b) {
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = molt_malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", a, b);
    return p;
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

// One entry of the manifest: what it is and where HDF5 put its data.
typedef struct {
    char kind;          // 'T', 'I', 'F', 'B'
    const char *name;
    int ndim;           // T: 1..4; I, F: 0; B: 1
    const int64_t *shape; // T only
    uint64_t len;       // B: its length
    uint64_t offset, bytes;
} man_entry;

static molt_status write_attr_i64(hid_t loc, const char *path, const char *name, int64_t v) {
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(loc, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = a < 0 ? -1 : H5Awrite(a, H5T_NATIVE_INT64, &v);
    char why[300];
    molt_status st = rc < 0 ? molt_err(MOLT_EIO, "%s: cannot write attribute %s%s", path, name,
                                       molt_h5_reason(why, sizeof why))
                            : MOLT_OK;
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(sp);
    return st;
}

static molt_status write_attr_hex(hid_t loc, const char *path, const char *name,
                                  const char hex[65]) {
    hid_t t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, 64);
    H5Tset_strpad(t, H5T_STR_NULLPAD);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(loc, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
    herr_t rc = a < 0 ? -1 : H5Awrite(a, t, hex);
    char why[300];
    molt_status st = rc < 0 ? molt_err(MOLT_EIO, "%s: cannot write attribute %s%s", path, name,
                                       molt_h5_reason(why, sizeof why))
                            : MOLT_OK;
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(sp);
    H5Tclose(t);
    return st;
}

// One contiguous dataset of file type ft for e (n_dims dims, 0 = scalar, -1 = null
// dataspace); e->offset gets where HDF5 placed its data.
static molt_status write_dataset(hid_t grp, const char *path, man_entry *e, hid_t ft, hid_t mt,
                                 int n_dims, const int64_t *dims, const void *data) {
    hsize_t hd[AG_MAX_DIMS];
    for (int i = 0; i < n_dims; i++)
        hd[i] = (hsize_t)dims[i];
    hid_t sp = n_dims < 0    ? H5Screate(H5S_NULL)
               : n_dims == 0 ? H5Screate(H5S_SCALAR)
                             : H5Screate_simple(n_dims, hd, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    // contiguous, its space allocated at creation and not filled (the data follow at once)
    bool ok = sp >= 0 && dcpl >= 0 && H5Pset_layout(dcpl, H5D_CONTIGUOUS) >= 0 &&
              H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY) >= 0 &&
              H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER) >= 0;
    hid_t ds = ok ? H5Dcreate2(grp, e->name, ft, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT) : -1;
    ok = ds >= 0 && (n_dims < 0 || // a null dataspace holds no data
                     H5Dwrite(ds, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) >= 0);
    e->offset = 0;
    if (ok && e->bytes > 0) {
        haddr_t at = H5Dget_offset(ds);
        ok = at != HADDR_UNDEF;
        e->offset = (uint64_t)at;
    }
    char why[300];
    molt_status st = ok ? MOLT_OK
                        : molt_err(MOLT_EIO, "%s: cannot write dataset %s%s", path, e->name,
                                   molt_h5_reason(why, sizeof why));
    if (ds >= 0)
        H5Dclose(ds);
    if (dcpl >= 0)
        H5Pclose(dcpl);
    if (sp >= 0)
        H5Sclose(sp);
    return st;
}

// The manifest entries of s, in the order the groups are written.
static man_entry *list_entries(const ckpt_state *s, int *n_out) {
    int n = s->n_tensors + s->n_ints + s->n_floats + s->n_blobs, k = 0;
    man_entry *e = molt_calloc((size_t)(n ? n : 1), sizeof *e);
    if (!e)
        return NULL;
    for (int i = 0; i < s->n_tensors; i++, k++) {
        const ckpt_tensor *t = &s->tensors[i];
        e[k] = (man_entry){'T', t->name, t->ndim, t->shape, 0, 0, (uint64_t)t->numel * 4};
    }
    for (int i = 0; i < s->n_ints; i++, k++)
        e[k] = (man_entry){'I', s->ints[i].name, 0, NULL, 0, 0, 8};
    for (int i = 0; i < s->n_floats; i++, k++)
        e[k] = (man_entry){'F', s->floats[i].name, 0, NULL, 0, 0, 8};
    for (int i = 0; i < s->n_blobs; i++, k++)
        e[k] = (man_entry){'B', s->blobs[i].name, 1, NULL, s->blobs[i].len, 0, s->blobs[i].len};
    *n_out = n;
    return e;
}

// Longest manifest line of e: kind, offset, bytes, ndim, dims (20 digits each), name.
static size_t line_bound(const man_entry *e) { return 2 + 21 + 21 + 2 + 21 * 4 + strlen(e->name) + 1; }

static molt_status write_groups(hid_t f, const char *path, const ckpt_state *s, man_entry *e) {
    hid_t g[4];
    for (int k = 0; k < 4; k++)
        g[k] = H5Gcreate2(f, group_names[k], H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    char why[300];
    molt_status st = MOLT_OK;
    if (g[0] < 0 || g[1] < 0 || g[2] < 0 || g[3] < 0)
        st = molt_err(MOLT_EIO, "%s: cannot create the checkpoint groups%s", path,
                      molt_h5_reason(why, sizeof why));
    int k = 0;
    for (int i = 0; st == MOLT_OK && i < s->n_tensors; i++, k++) {
        const ckpt_tensor *t = &s->tensors[i];
        st = write_dataset(g[0], path, &e[k], H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, t->ndim,
                           t->shape, t->data);
    }
    for (int i = 0; st == MOLT_OK && i < s->n_ints; i++, k++)
        st = write_dataset(g[1], path, &e[k], H5T_STD_I64LE, H5T_NATIVE_INT64, 0, NULL,
                           &s->ints[i].i);
    for (int i = 0; st == MOLT_OK && i < s->n_floats; i++, k++)
        st = write_dataset(g[2], path, &e[k], H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, 0, NULL,
                           &s->floats[i].f);
    for (int i = 0; st == MOLT_OK && i < s->n_blobs; i++, k++) {
        const ckpt_blob *b = &s->blobs[i];
        int64_t len = (int64_t)b->len;
        st = write_dataset(g[3], path, &e[k], H5T_STD_U8LE, H5T_NATIVE_UINT8, b->len ? 1 : -1,
                           &len, b->data);
    }
    for (int j = 0; j < 4; j++)
        if (g[j] >= 0)
            H5Gclose(g[j]);
    return st;
}

// Writes the HDF5 part of the file at path with an empty user block of *ub bytes, sized
// for the manifest of e; the offsets of the data go into e.
static molt_status write_hdf5(const char *path, const ckpt_state *s, const char hex[65],
                              man_entry *e, int n, uint64_t *ub) {
    uint64_t need = CKPT_HEADER_BYTES, data = 0;
    for (int i = 0; i < n; i++) {
        need += line_bound(&e[i]);
        data += e[i].bytes;
    }
    *ub = CKPT_HEADER_BYTES;
    while (*ub < need)
        *ub *= 2;
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE), fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_userblock(fcpl, (hsize_t)*ub);
    H5Pset_libver_bounds(fapl, H5F_LIBVER_LATEST, H5F_LIBVER_LATEST);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, fcpl, fapl);
    char why[300];
    molt_h5_reason(why, sizeof why); // before the next calls clear HDF5's error stack
    H5Pclose(fcpl);
    H5Pclose(fapl);
    if (f < 0)
        return molt_err(MOLT_EIO, "%s: cannot create the file%s", path, why);
    // a full disk is found here, before HDF5 writes: the data, HDF5's metadata (well below
    // 4 KiB per object) and the user block
    molt_status st = molt_h5_reserve(path, *ub + data + 4096 * (uint64_t)(n + 8) + (64 << 10));
    if (st == MOLT_OK)
        st = write_attr_i64(f, path, "molt_format_version", CKPT_FORMAT_VERSION);
    if (st == MOLT_OK)
        st = write_attr_i64(f, path, "step", s->step);
    if (st == MOLT_OK)
        st = write_attr_hex(f, path, "checksum", hex);
    if (st == MOLT_OK)
        st = write_groups(f, path, s, e);
    if (H5Fclose(f) < 0 && st == MOLT_OK)
        st = molt_err(MOLT_EIO, "%s: cannot close the file%s", path,
                      molt_h5_reason(why, sizeof why));
    molt_h5_unreserve(path);
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

// Fills the user block: the manifest, then the header describing the rest of the file
// (hashed after the manifest is in place); syncs the file.
static molt_status write_header(const char *path, const ckpt_state *s, const char digest[65],
                                const man_entry *e, int n, uint64_t ub) {
    FILE *f = fopen(path, "r+b");
    if (!f)
        return molt_err(MOLT_EIO, "cannot reopen %s: %s", path, strerror(errno));
    char *man = molt_calloc(1, (size_t)(ub - CKPT_HEADER_BYTES));
    molt_status st = man ? MOLT_OK : molt_err(MOLT_ENOMEM, "checkpoint: out of memory");
    size_t at = 0, cap = (size_t)(ub - CKPT_HEADER_BYTES);
    for (int i = 0; st == MOLT_OK && i < n; i++) {
        at += (size_t)snprintf(man + at, cap - at, "%c %" PRIu64 " %" PRIu64 " %d", e[i].kind,
                               e[i].offset, e[i].bytes, e[i].ndim);
        for (int d = 0; d < e[i].ndim; d++)
            at += (size_t)snprintf(man + at, cap - at, " %" PRIu64,
                                   e[i].kind == 'B' ? e[i].len : (uint64_t)e[i].shape[d]);
        at += (size_t)snprintf(man + at, cap - at, " %s\n", e[i].name);
        if (at >= cap)
            st = molt_err(MOLT_EINTERNAL, "checkpoint: manifest larger than its bound");
    }
    if (st == MOLT_OK && (fseek(f, CKPT_HEADER_BYTES, SEEK_SET) != 0 ||
                          fwrite(man, 1, cap, f) != cap || fflush(f) != 0))
        st = molt_err(MOLT_EIO, "cannot write the manifest of %s: %s", path, strerror(errno));
    char hex[65], hdr[CKPT_HEADER_BYTES];
    int64_t tail = 0;
    if (st == MOLT_OK)
        st = hash_tail(f, CKPT_HEADER_BYTES, hex, &tail);
    if (st == MOLT_OK) {
        memset(hdr, 0, sizeof hdr);
        snprintf(hdr, sizeof hdr,
                 "%s\nversion %d\nsize %" PRId64 "\nuserblock %" PRIu64 "\nstep %" PRId64
                 "\nentries %d\ndigest %s\nsha256 %s\n",
                 CKPT_MAGIC, CKPT_FORMAT_VERSION, tail + CKPT_HEADER_BYTES, ub, s->step, n,
                 digest, hex);
        if (fseek(f, 0, SEEK_SET) != 0 || fwrite(hdr, 1, sizeof hdr, f) != sizeof hdr ||
            fflush(f) != 0 || fsync(fileno(f)) != 0)
            st = molt_err(MOLT_EIO, "cannot write the header of %s: %s", path, strerror(errno));
    }
    molt_free(man);
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
    molt_h5_init();
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
        st = molt_mkdirs(dir);
    int n = 0;
    uint64_t ub = 0;
    man_entry *e = st == MOLT_OK ? list_entries(s, &n) : NULL;
    if (st == MOLT_OK && !e)
        st = molt_err(MOLT_ENOMEM, "checkpoint: out of memory");
    char digest[65]; // of the contents: in the HDF5 attributes and in the header
    ckpt_state_digest(s, digest);
    if (st == MOLT_OK)
        st = write_hdf5(tmp, s, digest, e, n, &ub);
    if (st == MOLT_OK)
        st = write_header(tmp, s, digest, e, n, ub);
    molt_free(e);
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
// Resuming.

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
