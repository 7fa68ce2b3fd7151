// adapters/h5.c: molt's own adapter file (HDF5, adapter only) both ways, and lora_load_any,
// which tells a PEFT directory from a molt file.
//
// File layout (HDF5's 1.10 file format, pinned so that the bytes do not follow the library's
// version; no user block, so the file starts with HDF5's signature, which is how
// lora_load_any recognizes it):
//   root attributes  format = "molt-lora" (string), version = 1 (i64),
//                    spec = lora_spec_format of the adapter (string)
//   /<PEFT tensor name>  one f32 [rows, cols] dataset per lora_A and lora_B of every unit
//                    (lora_peft_tensor_name), chunked with a Fletcher-32 checksum
// HDF5's newer format checksums its own metadata and the Fletcher-32 filter the tensor data,
// so damage anywhere in the file is reported instead of loaded; truncation is caught by HDF5
// comparing the file's size with the end address its superblock records. Object times are
// not recorded, so the same adapter always gives the same bytes. Other root attributes are
// ignored, other objects in the file are refused.
//
// Not here: PEFT directories (peft.c), attaching (lora.c), training checkpoints (train/).
#include "internal.h"

#include "../common/fsio.h"
#include "../common/h5io.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ADAPTER_FORMAT "molt-lora"
#define ADAPTER_VERSION 1
#define SPEC_CAP 32768                       // a formatted spec with every table full
#define TNAME_CAP (LORA_NAME_MAX + 64)       // a PEFT tensor name
#define CHUNK_MAX_FLOATS ((hsize_t)1 << 28)  // 1 GiB chunks (HDF5 refuses 4 GiB and more)

static const unsigned char h5_signature[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};

// What HDF5 found wrong in the call that just failed, as ": <system error>" or
// " (HDF5: ...)", or "" when it recorded nothing.
static const char *h5_reason(char buf[300]) { return molt_h5_reason(buf, 300); }

// ---------------------------------------------------------------------------------------
// Writing

static molt_status write_attr_str(hid_t loc, const char *file, const char *name,
                                  const char *value) {
    hid_t t = H5Tcopy(H5T_C_S1), sp = H5Screate(H5S_SCALAR);
    bool ok = t >= 0 && sp >= 0 && H5Tset_size(t, strlen(value)) >= 0 &&
              H5Tset_strpad(t, H5T_STR_NULLPAD) >= 0;
    hid_t a = ok ? H5Acreate2(loc, name, t, sp, H5P_DEFAULT, H5P_DEFAULT) : -1;
    ok = a >= 0 && H5Awrite(a, t, value) >= 0;
    if (a >= 0)
        H5Aclose(a);
    if (sp >= 0)
        H5Sclose(sp);
    if (t >= 0)
        H5Tclose(t);
    return ok ? MOLT_OK : molt_err(MOLT_EIO, "%s: cannot write attribute %s", file, name);
}

static molt_status write_attr_i64(hid_t loc, const char *file, const char *name, int64_t v) {
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = sp < 0 ? -1 : H5Acreate2(loc, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    bool ok = a >= 0 && H5Awrite(a, H5T_NATIVE_INT64, &v) >= 0;
    if (a >= 0)
        H5Aclose(a);
    if (sp >= 0)
        H5Sclose(sp);
    return ok ? MOLT_OK : molt_err(MOLT_EIO, "%s: cannot write attribute %s", file, name);
}

// One f32 dataset holding x [rows, cols]: whole rows per chunk, each chunk checksummed.
static molt_status write_tensor(hid_t f, const char *file, const char *name,
                                const ag_tensor *x) {
    hsize_t dims[2] = {(hsize_t)x->shape[0], (hsize_t)x->shape[1]};
    hsize_t rows = CHUNK_MAX_FLOATS / (dims[1] ? dims[1] : 1);
    hsize_t chunk[2] = {rows < 1 ? 1 : rows < dims[0] ? rows : dims[0], dims[1]};
    hid_t sp = H5Screate_simple(2, dims, NULL), dcpl = H5Pcreate(H5P_DATASET_CREATE);
    bool ok = sp >= 0 && dcpl >= 0 && H5Pset_chunk(dcpl, 2, chunk) >= 0 &&
              H5Pset_fletcher32(dcpl) >= 0 && H5Pset_obj_track_times(dcpl, false) >= 0;
    hid_t ds = ok ? H5Dcreate2(f, name, H5T_IEEE_F32LE, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT)
                  : -1;
    ok = ds >= 0 && H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, x->data) >= 0;
    char why[300];
    molt_status st = ok ? MOLT_OK
                        : molt_err(MOLT_EIO, "%s: cannot write dataset %s%s", file, name,
                                   h5_reason(why));
    if (ds >= 0)
        H5Dclose(ds);
    if (dcpl >= 0)
        H5Pclose(dcpl);
    if (sp >= 0)
        H5Sclose(sp);
    return st;
}

// Writes the whole file at path (created or truncated).
static molt_status write_file(const lora_adapter *ad, const char *path, const char *spec) {
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE), fapl = H5Pcreate(H5P_FILE_ACCESS);
    hid_t f = -1;
    // HDF5 1.10's format (readable by 1.10 and later) checksums all of HDF5's metadata;
    // no object times, not even in the root group's header
    if (fcpl >= 0 && fapl >= 0 && H5Pset_obj_track_times(fcpl, false) >= 0 &&
        H5Pset_libver_bounds(fapl, H5F_LIBVER_V110, H5F_LIBVER_V110) >= 0 &&
        H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG) >= 0)
        f = H5Fcreate(path, H5F_ACC_TRUNC, fcpl, fapl);
    char why[300];
    molt_status st = f >= 0 ? MOLT_OK
                            : molt_err(MOLT_EIO, "%s: cannot create the file%s", path,
                                       h5_reason(why));
    if (fcpl >= 0)
        H5Pclose(fcpl);
    if (fapl >= 0)
        H5Pclose(fapl);
    if (st != MOLT_OK)
        return st;
    // a full disk is found before HDF5 writes: the data plus generous metadata room
    uint64_t bytes = 64 << 10;
    for (int i = 0; i < ad->n_units; i++)
        bytes += 4 * (uint64_t)(ad->units[i].a->numel + ad->units[i].b->numel) + 8192;
    st = molt_h5_reserve(path, bytes);
    if (st == MOLT_OK)
        st = write_attr_str(f, path, "format", ADAPTER_FORMAT);
    if (st == MOLT_OK)
        st = write_attr_i64(f, path, "version", ADAPTER_VERSION);
    if (st == MOLT_OK)
        st = write_attr_str(f, path, "spec", spec);
    for (int i = 0; st == MOLT_OK && i < 2 * ad->n_units; i++) {
        const lora_unit *u = &ad->units[i / 2];
        char name[TNAME_CAP];
        lora_peft_tensor_name(ad, u, i % 2, name, sizeof name);
        st = write_tensor(f, path, name, i % 2 ? u->b : u->a);
    }
    if (H5Fclose(f) < 0 && st == MOLT_OK)
        st = molt_err(MOLT_EIO, "%s: cannot close the file%s", path, h5_reason(why));
    molt_h5_unreserve(path);
    return st;
}

molt_status lora_save(const lora_adapter *ad, const char *path) {
    molt_h5_init();
    char *spec = molt_malloc(SPEC_CAP), *tmp = NULL;
    if (!spec)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", path);
    // written beside the destination and renamed over it: a reader never sees half a file
    molt_status st = lora_spec_format(&ad->spec, spec, SPEC_CAP);
    if (st == MOLT_OK)
        st = molt_tmp_path(path, &tmp);
    if (st == MOLT_OK)
        st = write_file(ad, tmp, spec);
    if (st == MOLT_OK)
        st = molt_commit_tmp(tmp, path);
    else if (tmp)
        unlink(tmp);
    molt_free(spec);
    molt_free(tmp);
    return st;
}

// ---------------------------------------------------------------------------------------
// Reading

// Whether path is a regular file whose first bytes are HDF5's signature. MOLT_EIO when it
// cannot be opened or read.
static molt_status has_h5_signature(const char *path, bool *yes) {
    *yes = false;
    struct stat sb;
    if (stat(path, &sb) != 0)
        return molt_err(MOLT_EIO, "%s: %s", path, strerror(errno));
    if (!S_ISREG(sb.st_mode))
        return MOLT_OK;
    FILE *f = fopen(path, "rb");
    if (!f)
        return molt_err(MOLT_EIO, "%s: %s", path, strerror(errno));
    unsigned char head[sizeof h5_signature];
    size_t got = fread(head, 1, sizeof head, f);
    bool err = ferror(f);
    fclose(f);
    if (err)
        return molt_err(MOLT_EIO, "%s: read error", path);
    *yes = got == sizeof head && !memcmp(head, h5_signature, sizeof head);
    return MOLT_OK;
}

static molt_status attr_damaged(const char *file, const char *name) {
    char why[300];
    return molt_err(MOLT_EFORMAT, "%s: attribute %s cannot be read, the file is damaged%s", file,
                    name, h5_reason(why));
}

// Opens root attribute `name` after checking that it exists and is a scalar of class cls
// (`kind` in messages); the caller closes *a and *t.
static molt_status open_attr(hid_t f, const char *file, const char *name, H5T_class_t cls,
                             const char *kind, const char *expected, hid_t *a, hid_t *t) {
    *a = *t = -1;
    htri_t there = H5Aexists(f, name);
    if (there == 0)
        return molt_err(MOLT_EFORMAT, "%s: attribute %s is missing (expected %s)", file, name,
                        expected);
    *a = there > 0 ? H5Aopen(f, name, H5P_DEFAULT) : -1;
    hid_t sp = *a < 0 ? -1 : H5Aget_space(*a);
    *t = sp < 0 ? -1 : H5Aget_type(*a);
    molt_status st = *t < 0 ? attr_damaged(file, name) : MOLT_OK;
    if (st == MOLT_OK &&
        (H5Tget_class(*t) != cls || H5Sget_simple_extent_type(sp) != H5S_SCALAR))
        st = molt_err(MOLT_EFORMAT, "%s: attribute %s is not a scalar %s (expected %s)", file,
                      name, kind, expected);
    if (sp >= 0)
        H5Sclose(sp);
    if (st != MOLT_OK) {
        if (*t >= 0)
            H5Tclose(*t);
        if (*a >= 0)
            H5Aclose(*a);
        *a = *t = -1;
    }
    return st;
}

// Root attribute `name` as a string (fixed or variable length, scalar) into buf.
static molt_status read_attr_str(hid_t f, const char *file, const char *name, char *buf,
                                 size_t cap, const char *expected) {
    hid_t a, t;
    MOLT_TRY(open_attr(f, file, name, H5T_STRING, "string", expected, &a, &t));
    bool vlen = H5Tis_variable_str(t) > 0, ok = false, too_long = false;
    if (vlen) {
        hid_t mt = H5Tcopy(H5T_C_S1);
        char *s = NULL;
        ok = mt >= 0 && H5Tset_size(mt, H5T_VARIABLE) >= 0 && H5Aread(a, mt, &s) >= 0 && s;
        too_long = ok && strlen(s) >= cap;
        if (ok && !too_long)
            snprintf(buf, cap, "%s", s);
        if (s)
            H5free_memory(s);
        if (mt >= 0)
            H5Tclose(mt);
    } else {
        too_long = H5Tget_size(t) >= cap;
        memset(buf, 0, cap);
        ok = too_long || H5Aread(a, t, buf) >= 0;
    }
    molt_status st = !ok       ? attr_damaged(file, name)
                     : too_long ? molt_err(MOLT_EFORMAT, "%s: attribute %s is longer than %zu "
                                           "bytes (expected %s)", file, name, cap - 1, expected)
                                : MOLT_OK;
    H5Tclose(t);
    H5Aclose(a);
    return st;
}

static molt_status read_attr_i64(hid_t f, const char *file, const char *name, int64_t *v,
                                 const char *expected) {
    hid_t a, t;
    MOLT_TRY(open_attr(f, file, name, H5T_INTEGER, "integer", expected, &a, &t));
    molt_status st = H5Aread(a, H5T_NATIVE_INT64, v) >= 0 ? MOLT_OK : attr_damaged(file, name);
    H5Tclose(t);
    H5Aclose(a);
    return st;
}

// Checks format and version and parses the spec.
static molt_status read_header(hid_t f, const char *file, lora_spec *spec) {
    char fmt[64];
    const char *want_fmt = "the string \"" ADAPTER_FORMAT "\" of a molt adapter file";
    MOLT_TRY(read_attr_str(f, file, "format", fmt, sizeof fmt, want_fmt));
    if (strcmp(fmt, ADAPTER_FORMAT))
        return molt_err(MOLT_EFORMAT, "%s: attribute format is \"%s\", expected \"%s\" (not a "
                        "molt adapter file)", file, fmt, ADAPTER_FORMAT);
    int64_t version;
    MOLT_TRY(read_attr_i64(f, file, "version", &version, "1"));
    if (version != ADAPTER_VERSION)
        return molt_err(MOLT_EFORMAT, "%s: attribute version is %lld, this build reads version "
                        "%d", file, (long long)version, ADAPTER_VERSION);
    char *text = molt_malloc(SPEC_CAP);
    if (!text)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", file);
    molt_status st = read_attr_str(f, file, "spec", text, SPEC_CAP, "the adapter's spec");
    if (st == MOLT_OK && lora_spec_parse(text, spec) != MOLT_OK)
        st = molt_err_wrap(MOLT_EFORMAT, "%s: attribute spec", file);
    molt_free(text);
    return st;
}

// "f32", "i64", "string", ... for an error message.
static void type_str(hid_t t, char *buf, size_t cap) {
    H5T_class_t c = H5Tget_class(t);
    size_t bits = H5Tget_size(t) * 8;
    if (c == H5T_FLOAT)
        snprintf(buf, cap, "f%zu", bits);
    else if (c == H5T_INTEGER)
        snprintf(buf, cap, "%c%zu", H5Tget_sign(t) == H5T_SGN_NONE ? 'u' : 'i', bits);
    else if (c == H5T_STRING)
        snprintf(buf, cap, "string");
    else
        snprintf(buf, cap, "HDF5 type class %d", (int)c);
}

// "[a, b, ...]" for a simple dataspace, "scalar" or "null" otherwise.
static void space_str(hid_t sp, char *buf, size_t cap) {
    H5S_class_t c = H5Sget_simple_extent_type(sp);
    int nd = c == H5S_SIMPLE ? H5Sget_simple_extent_ndims(sp) : -1;
    hsize_t dims[H5S_MAX_RANK];
    if (nd < 0 || nd > H5S_MAX_RANK || H5Sget_simple_extent_dims(sp, dims, NULL) < 0) {
        snprintf(buf, cap, "%s", c == H5S_SCALAR ? "scalar" : c == H5S_NULL ? "null" : "?");
        return;
    }
    size_t len = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < nd && len < cap; d++)
        len += (size_t)snprintf(buf + len, cap - len, "%s%llu", d ? ", " : "",
                                (unsigned long long)dims[d]);
    if (len < cap)
        snprintf(buf + len, cap - len, "]");
}

// Reads dataset `name` (u's full A, or B when k is 1) into the unit after checking its type
// (f32) and shape; a shard of routed experts keeps its part.
static molt_status read_tensor(hid_t f, const char *file, const char *name,
                               const lora_adapter *ad, const lora_unit *u, int k) {
    ag_tensor *dst = k ? u->b : u->a;
    int64_t full[2];
    lora_unit_full_shape(ad, u, k, full);
    bool shard = lora_unit_is_shard(ad, u);
    float *buf = NULL;
    char why[300];
    htri_t there = H5Lexists(f, name, H5P_DEFAULT);
    if (there == 0)
        return molt_err(MOLT_EFORMAT, "%s: missing dataset %s (target %s)", file, name,
                        u->path);
    hid_t ds = there > 0 ? H5Dopen2(f, name, H5P_DEFAULT) : -1;
    if (ds < 0)
        return molt_err(MOLT_EFORMAT, "%s: %s is not a readable dataset%s", file, name,
                        h5_reason(why));
    hid_t t = H5Dget_type(ds), sp = H5Dget_space(ds);
    hsize_t dims[2] = {0, 0};
    bool type_ok = t >= 0 && (H5Tequal(t, H5T_IEEE_F32LE) > 0 || H5Tequal(t, H5T_IEEE_F32BE) > 0);
    bool shape_ok = sp >= 0 && H5Sget_simple_extent_type(sp) == H5S_SIMPLE &&
                    H5Sget_simple_extent_ndims(sp) == 2 &&
                    H5Sget_simple_extent_dims(sp, dims, NULL) == 2 &&
                    dims[0] == (hsize_t)full[0] && dims[1] == (hsize_t)full[1];
    char have[96] = "?";
    molt_status st = MOLT_OK;
    if (!type_ok) {
        if (t >= 0)
            type_str(t, have, sizeof have);
        st = molt_err(MOLT_EFORMAT, "%s: dataset %s has data type %s, expected f32", file, name,
                      have);
    } else if (!shape_ok) {
        if (sp >= 0)
            space_str(sp, have, sizeof have);
        st = molt_err(MOLT_EFORMAT, "%s: dataset %s has shape %s, expected [%lld, %lld]", file,
                      name, have, (long long)full[0], (long long)full[1]);
    } else if (!(buf = shard ? molt_malloc((size_t)(full[0] * full[1]) * sizeof *buf)
                             : dst->data)) {
        st = molt_err(MOLT_ENOMEM, "%s: out of memory reading %s", file, name);
    } else if (H5Dread(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf) < 0) {
        st = molt_err(MOLT_EFORMAT, "%s: dataset %s: its data cannot be read, the file is "
                      "damaged%s", file, name, h5_reason(why));
    } else if (shard) {
        lora_shard_from_full(ad, u, k, buf, dst->data);
    }
    if (shard)
        molt_free(buf); // (NULL when it was never allocated)
    if (sp >= 0)
        H5Sclose(sp);
    if (t >= 0)
        H5Tclose(t);
    H5Dclose(ds);
    return st;
}

typedef struct {
    const lora_adapter *ad;
    char unknown[TNAME_CAP + 64]; // the first object that is no tensor of the adapter
} extra_walk;

static herr_t find_extra(hid_t g, const char *name, const H5L_info_t *info, void *user) {
    extra_walk *w = user;
    for (int i = 0; i < 2 * w->ad->n_units; i++) {
        char want[TNAME_CAP];
        lora_peft_tensor_name(w->ad, &w->ad->units[i / 2], i % 2, want, sizeof want);
        if (!strcmp(want, name))
            return 0;
    }
    snprintf(w->unknown, sizeof w->unknown, "%s", name);
    return 1;
}

// Fills every A and B of the attached (zero) adapter; refuses objects no unit names.
static molt_status read_tensors(hid_t f, const char *file, lora_adapter *ad) {
    for (int i = 0; i < 2 * ad->n_units; i++) {
        lora_unit *u = &ad->units[i / 2];
        char name[TNAME_CAP];
        lora_peft_tensor_name(ad, u, i % 2, name, sizeof name);
        MOLT_TRY(read_tensor(f, file, name, ad, u, i % 2));
    }
    // every expected name is there, so any more links are unexpected objects
    H5G_info_t gi;
    char why[300];
    if (H5Gget_info(f, &gi) < 0)
        return molt_err(MOLT_EFORMAT, "%s: cannot list the root group%s", file, h5_reason(why));
    if (gi.nlinks == (hsize_t)2 * (hsize_t)ad->n_units)
        return MOLT_OK;
    extra_walk w = {ad, ""};
    H5Literate(f, H5_INDEX_NAME, H5_ITER_INC, NULL, find_extra, &w);
    if (w.unknown[0])
        return molt_err(MOLT_EFORMAT, "%s: unexpected object %s (no adapted module of the model "
                        "has a tensor of this name)", file, w.unknown);
    return molt_err(MOLT_EFORMAT, "%s: the root group holds %llu objects, expected %d%s", file,
                    (unsigned long long)gi.nlinks, 2 * ad->n_units, h5_reason(why));
}

// Attaches a zero adapter with spec, then fills it from f; keeps spec's init setting.
static molt_status attach_and_read(mdl_model *m, const lora_spec *spec, hid_t f,
                                   const char *file, lora_wire wire, lora_adapter *out) {
    lora_spec zs = *spec;
    zs.init = LORA_INIT_ZERO;
    molt_status st = lora_attach(m, &zs, wire, out);
    if (st != MOLT_OK)
        return molt_err_wrap(st, "%s: attaching the adapter's spec", file);
    out->spec.init = spec->init;
    st = read_tensors(f, file, out);
    if (st == MOLT_OK)
        st = lora_check_finite(out, file);
    if (st != MOLT_OK)
        lora_detach(out);
    return st;
}

molt_status lora_load(mdl_model *m, const char *path, lora_wire wire, lora_adapter *out) {
    memset(out, 0, sizeof *out);
    molt_h5_init();
    bool h5;
    MOLT_TRY(has_h5_signature(path, &h5));
    if (!h5)
        return molt_err(MOLT_EFORMAT, "%s: not an HDF5 file (expected a molt adapter file: HDF5 "
                        "with the root attribute format=\"%s\")", path, ADAPTER_FORMAT);
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS), f = -1;
    if (fapl >= 0 && H5Pset_fclose_degree(fapl, H5F_CLOSE_STRONG) >= 0)
        f = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    char why[300];
    h5_reason(why);
    if (fapl >= 0)
        H5Pclose(fapl);
    if (f < 0)
        return molt_err(MOLT_EFORMAT, "%s: HDF5 cannot open it, the file is truncated or "
                        "damaged%s", path, why);
    lora_spec spec;
    molt_status st = read_header(f, path, &spec);
    if (st == MOLT_OK)
        st = attach_and_read(m, &spec, f, path, wire, out);
    H5Fclose(f);
    return st;
}

static lora_checkpoint_loader ckpt_loader;

void lora_set_checkpoint_loader(lora_checkpoint_loader fn) { ckpt_loader = fn; }

// Whether path starts with a training checkpoint's header ("MOLTCKPT" in HDF5's user block).
static molt_status is_checkpoint(const char *path, bool *yes) {
    *yes = false;
    FILE *f = fopen(path, "rb");
    if (!f)
        return molt_err(MOLT_EIO, "%s: %s", path, strerror(errno));
    char head[8];
    size_t got = fread(head, 1, sizeof head, f);
    bool err = ferror(f);
    fclose(f);
    if (err)
        return molt_err(MOLT_EIO, "%s: read error", path);
    *yes = got == sizeof head && !memcmp(head, "MOLTCKPT", sizeof head);
    return MOLT_OK;
}

molt_status lora_load_any(mdl_model *m, const char *path, lora_wire wire, lora_adapter *out) {
    memset(out, 0, sizeof *out);
    struct stat sb;
    if (stat(path, &sb) != 0)
        return errno == ENOENT
                   ? molt_err(MOLT_EIO, "adapter %s: no such file or directory", path)
                   : molt_err(MOLT_EIO, "adapter %s: %s", path, strerror(errno));
    const char *expected = "expected a PEFT directory holding adapter_config.json, a molt "
                           "adapter file (HDF5) or a training checkpoint";
    if (S_ISDIR(sb.st_mode)) {
        size_t n = strlen(path) + sizeof "/adapter_config.json";
        char *cfg = molt_malloc(n);
        if (!cfg)
            return molt_err(MOLT_ENOMEM, "adapter %s: out of memory", path);
        snprintf(cfg, n, "%s/adapter_config.json", path);
        bool peft = stat(cfg, &sb) == 0;
        molt_free(cfg);
        return peft ? lora_import_peft(m, path, wire, out)
                    : molt_err(MOLT_EFORMAT, "adapter %s: a directory without "
                               "adapter_config.json (%s)", path, expected);
    }
    bool h5, ckpt;
    MOLT_TRY(has_h5_signature(path, &h5));
    if (h5)
        return lora_load(m, path, wire, out);
    MOLT_TRY(is_checkpoint(path, &ckpt));
    if (ckpt && !ckpt_loader)
        return molt_err(MOLT_EUNSUPPORTED, "adapter %s: a training checkpoint, which this "
                        "program cannot read (use molt export --checkpoint)", path);
    if (ckpt)
        return ckpt_loader(m, path, wire, out);
    size_t n = strlen(path);
    bool st_file = n > 12 && !strcmp(path + n - 12, ".safetensors");
    return molt_err(MOLT_EFORMAT, "adapter %s: not an HDF5 file (%s%s)", path, expected,
                    st_file ? "; for a PEFT adapter, give its directory" : "");
}
