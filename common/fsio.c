// common/fsio.c: atomic file and directory outputs, and the input/output overlap check
// (see fsio.h).
#define _GNU_SOURCE // nftw, renameat2 through syscall
#include "fsio.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <dirent.h>

const char *molt_errno_text(int err) { return strerror(err); }

static char *dup_str(const char *s) {
    char *d = molt_strdup(s);
    if (!d)
        molt_err(MOLT_ENOMEM, "out of memory");
    return d;
}

// s + suffix in a new string.
static char *concat(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    char *p = molt_malloc(a + b + 1);
    if (p) {
        memcpy(p, s, a);
        memcpy(p + a, suffix, b + 1);
    }
    return p;
}

// The directory part of path ("." when it has none), in a new string.
static char *dir_of(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash)
        return dup_str(".");
    if (slash == path)
        return dup_str("/");
    char *d = molt_malloc((size_t)(slash - path) + 1);
    if (d) {
        memcpy(d, path, (size_t)(slash - path));
        d[slash - path] = 0;
    }
    return d;
}

// The permissions a new file or directory gets from the process's umask (mkstemp and
// mkdtemp create them private; outputs get what an ordinary open or mkdir would give).
static mode_t default_mode(bool dir) {
    static mode_t mask = (mode_t)-1;
    if (mask == (mode_t)-1) {
        mask = umask(022);
        umask(mask);
    }
    return (dir ? 0777 : 0666) & ~mask;
}

static molt_status sync_path(const char *path, bool dir) {
    int fd = open(path, O_RDONLY | (dir ? O_DIRECTORY : 0));
    if (fd < 0)
        return molt_err(MOLT_EIO, "cannot open %s to sync it: %s", path, strerror(errno));
    int rc = fsync(fd), e = errno;
    close(fd);
    // some file systems cannot sync directories; that loses nothing the rename did not
    if (rc != 0 && !(dir && (e == EINVAL || e == ENOTSUP)))
        return molt_err(MOLT_EIO, "cannot sync %s: %s", path, strerror(e));
    return MOLT_OK;
}

static molt_status sync_dir_of(const char *path) {
    char *d = dir_of(path);
    if (!d)
        return MOLT_ENOMEM;
    molt_status st = sync_path(d, true);
    molt_free(d);
    return st;
}

// ---------------------------------------------------------------------------------------
// Files

molt_status molt_tmp_path(const char *path, char **tmp) {
    *tmp = concat(path, ".tmp-XXXXXX");
    if (!*tmp)
        return molt_err(MOLT_ENOMEM, "%s: out of memory", path);
    int fd = mkstemp(*tmp);
    if (fd >= 0 && fchmod(fd, default_mode(false)) != 0) {
        close(fd);
        unlink(*tmp);
        fd = -1;
    }
    if (fd < 0) {
        molt_status st = molt_err(MOLT_EIO, "cannot create a file beside %s: %s", path,
                                  strerror(errno));
        molt_free(*tmp);
        *tmp = NULL;
        return st;
    }
    close(fd);
    return MOLT_OK;
}

molt_status molt_commit_tmp(const char *tmp, const char *path) {
    molt_status st = sync_path(tmp, false);
    if (st == MOLT_OK && rename(tmp, path) != 0)
        st = molt_err(MOLT_EIO, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
    if (st == MOLT_OK)
        st = sync_dir_of(path);
    if (st != MOLT_OK)
        unlink(tmp);
    return st;
}

molt_status molt_wfile_open(molt_wfile *w, const char *path) {
    memset(w, 0, sizeof *w);
    w->path = dup_str(path);
    if (!w->path)
        return MOLT_ENOMEM;
    molt_status st = molt_tmp_path(path, &w->tmp);
    if (st == MOLT_OK && !(w->f = fopen(w->tmp, "wb")))
        st = molt_err(MOLT_EIO, "cannot write %s: %s", w->tmp, strerror(errno));
    if (st != MOLT_OK)
        molt_wfile_abort(w);
    return st;
}

molt_status molt_wfile_commit(molt_wfile *w) {
    molt_status st = MOLT_OK;
    if (fflush(w->f) != 0 || ferror(w->f) || fsync(fileno(w->f)) != 0)
        st = molt_err(MOLT_EIO, "cannot write %s: %s", w->path, strerror(errno));
    if (fclose(w->f) != 0 && st == MOLT_OK)
        st = molt_err(MOLT_EIO, "cannot write %s: %s", w->path, strerror(errno));
    w->f = NULL;
    if (st == MOLT_OK && rename(w->tmp, w->path) != 0)
        st = molt_err(MOLT_EIO, "cannot rename %s to %s: %s", w->tmp, w->path, strerror(errno));
    if (st == MOLT_OK) {
        molt_free(w->tmp);
        w->tmp = NULL;
        st = sync_dir_of(w->path);
    }
    molt_wfile_abort(w);
    return st;
}

void molt_wfile_abort(molt_wfile *w) {
    if (w->f)
        fclose(w->f);
    if (w->tmp)
        unlink(w->tmp);
    molt_free(w->tmp);
    molt_free(w->path);
    memset(w, 0, sizeof *w);
}

molt_status molt_write_atomic(const char *path, const void *data, size_t n) {
    molt_wfile w;
    MOLT_TRY(molt_wfile_open(&w, path));
    if (n && fwrite(data, 1, n, w.f) != n) {
        molt_status st = molt_err(MOLT_EIO, "cannot write %s: %s", path, strerror(errno));
        molt_wfile_abort(&w);
        return st;
    }
    return molt_wfile_commit(&w);
}

molt_status molt_copy_file(const char *from, const char *to) {
    FILE *in = fopen(from, "rb");
    if (!in)
        return molt_err(MOLT_EIO, "cannot open %s: %s", from, strerror(errno));
    FILE *out = fopen(to, "wb");
    if (!out) {
        molt_status st = molt_err(MOLT_EIO, "cannot create %s: %s", to, strerror(errno));
        fclose(in);
        return st;
    }
    char buf[1 << 16];
    size_t n;
    int err = 0;
    while (!err && (n = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, n, out) != n)
            err = errno ? errno : EIO;
    if (!err && ferror(in))
        err = errno ? errno : EIO;
    fclose(in);
    if (fclose(out) != 0 && !err)
        err = errno ? errno : EIO;
    return err ? molt_err(MOLT_EIO, "copying %s to %s: %s", from, to, strerror(err)) : MOLT_OK;
}

// ---------------------------------------------------------------------------------------
// Directories

bool molt_dir_nonempty(const char *path) {
    DIR *d = opendir(path);
    if (!d)
        return false;
    bool any = false;
    for (struct dirent *e; !any && (e = readdir(d));)
        any = strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    return any;
}

molt_status molt_mkdirs(const char *path) {
    char *p = dup_str(path);
    if (!p)
        return MOLT_ENOMEM;
    molt_status st = MOLT_OK;
    for (char *s = p + 1; st == MOLT_OK; s++) {
        char c = *s;
        if (c != '/' && c)
            continue;
        *s = 0;
        if (mkdir(p, 0777) != 0 && errno != EEXIST)
            st = molt_err(MOLT_EIO, "cannot create directory %s: %s", p, strerror(errno));
        *s = c;
        if (!c)
            break;
    }
    molt_free(p);
    return st;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

static void remove_tree(const char *path) { nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

static int sync_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)ftw;
    if (flag != FTW_F && flag != FTW_DP && flag != FTW_D)
        return 0;
    return sync_path(path, flag != FTW_F) == MOLT_OK ? 0 : 1;
}

molt_status molt_outdir_begin(molt_outdir *d, const char *path, bool force, const char *what) {
    memset(d, 0, sizeof *d);
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/')
        n--;
    if (n == 0)
        return molt_err(MOLT_EARG, "%s: empty path", what);
    d->path = molt_malloc(n + 1);
    if (!d->path)
        return molt_err(MOLT_ENOMEM, "out of memory");
    memcpy(d->path, path, n);
    d->path[n] = 0;
    struct stat sb;
    molt_status st = MOLT_OK;
    if (stat(d->path, &sb) == 0) {
        if (!S_ISDIR(sb.st_mode))
            st = molt_err(MOLT_EARG, "%s %s exists and is not a directory", what, d->path);
        else if (molt_dir_nonempty(d->path) && !force)
            st = molt_err(MOLT_EARG, "%s %s exists and is not empty: pass --force to replace "
                          "it (everything in it is deleted)", what, d->path);
        d->replace = true;
    } else if (errno != ENOENT) {
        st = molt_err(MOLT_EIO, "%s %s: %s", what, d->path, strerror(errno));
    } else {
        char *parent = dir_of(d->path);
        st = parent ? molt_mkdirs(parent) : MOLT_ENOMEM;
        molt_free(parent);
    }
    if (st == MOLT_OK && !(d->tmp = concat(d->path, ".tmp-XXXXXX")))
        st = molt_err(MOLT_ENOMEM, "out of memory");
    if (st == MOLT_OK && (!mkdtemp(d->tmp) || chmod(d->tmp, default_mode(true)) != 0)) {
        st = molt_err(MOLT_EIO, "cannot create a directory beside %s: %s", d->path,
                      strerror(errno));
        molt_free(d->tmp);
        d->tmp = NULL;
    }
    if (st != MOLT_OK)
        molt_outdir_abort(d);
    return st;
}

// Moves the filled temporary into place; an existing directory is exchanged with it
// atomically where the file system can (renameat2), else moved aside first.
static molt_status swap_in(molt_outdir *d) {
#ifdef SYS_renameat2
    if (d->replace &&
        syscall(SYS_renameat2, AT_FDCWD, d->tmp, AT_FDCWD, d->path, 2 /* RENAME_EXCHANGE */) == 0)
        return MOLT_OK; // d->tmp now holds the old contents
#endif
    if (!d->replace) {
        if (rename(d->tmp, d->path) != 0)
            return molt_err(MOLT_EIO, "cannot rename %s to %s: %s", d->tmp, d->path,
                            strerror(errno));
        d->tmp[0] = 0; // nothing left to remove
        return MOLT_OK;
    }
    char *old = concat(d->path, ".old-XXXXXX");
    if (!old || !mkdtemp(old)) {
        molt_free(old);
        return molt_err(MOLT_EIO, "cannot move %s aside: %s", d->path, strerror(errno));
    }
    molt_status st = MOLT_OK;
    if (rename(d->path, old) != 0)
        st = molt_err(MOLT_EIO, "cannot move %s aside: %s", d->path, strerror(errno));
    else if (rename(d->tmp, d->path) != 0) {
        st = molt_err(MOLT_EIO, "cannot rename %s to %s: %s", d->tmp, d->path, strerror(errno));
        rename(old, d->path); // put the old one back
    }
    if (st == MOLT_OK) {
        remove_tree(d->tmp); // empty by now, or the failed new contents
        memcpy(d->tmp, old, strlen(old) + 1); // same length: the old contents go below
    } else {
        rmdir(old);
    }
    molt_free(old);
    return st;
}

molt_status molt_outdir_commit(molt_outdir *d) {
    molt_status st = MOLT_OK;
    if (nftw(d->tmp, sync_entry, 16, FTW_PHYS) != 0)
        st = molt_err_wrap(MOLT_EIO, "writing %s", d->path);
    if (st == MOLT_OK)
        st = swap_in(d);
    if (st == MOLT_OK)
        st = sync_dir_of(d->path);
    molt_outdir_abort(d); // the old contents (or the failed new ones) go
    return st;
}

void molt_outdir_abort(molt_outdir *d) {
    if (d->tmp && d->tmp[0])
        remove_tree(d->tmp);
    molt_free(d->tmp);
    molt_free(d->path);
    memset(d, 0, sizeof *d);
}

// ---------------------------------------------------------------------------------------
// Overlap of inputs and outputs

// The absolute path of p with ".", ".." and the symbolic links of its existing part
// resolved, in a new string (NULL when out of memory or the current directory is unknown).
static char *resolve(const char *p) {
    char cwd[PATH_MAX], *abs = NULL;
    if (p[0] == '/') {
        abs = dup_str(p);
    } else if (getcwd(cwd, sizeof cwd - 1)) {
        strcat(cwd, "/");
        abs = concat(cwd, p);
    }
    if (!abs)
        return NULL;
    // the longest existing prefix, resolved; the rest is appended component by component
    size_t n = strlen(abs);
    char *out = NULL, *rest = NULL;
    for (size_t cut = n;; cut--) {
        if (cut != n && abs[cut] != '/')
            continue;
        char keep = abs[cut];
        abs[cut] = 0;
        char *real = realpath(cut ? abs : "/", NULL);
        abs[cut] = keep;
        if (real) {
            out = molt_malloc(strlen(real) + n + 2);
            if (out)
                strcpy(out, real);
            free(real); // from realpath
            rest = abs + cut;
            break;
        }
        if (cut == 0)
            break;
    }
    if (!out) {
        molt_free(abs);
        return NULL;
    }
    for (char *c = rest; *c;) {
        while (*c == '/')
            c++;
        size_t len = strcspn(c, "/");
        if (len == 0)
            break;
        if (len == 2 && !strncmp(c, "..", 2)) {
            char *slash = strrchr(out, '/');
            if (slash)
                *(slash == out ? slash + 1 : slash) = 0;
        } else if (!(len == 1 && c[0] == '.')) {
            size_t at = strlen(out);
            if (at > 1)
                out[at++] = '/';
            memcpy(out + at, c, len);
            out[at + len] = 0;
        }
        c += len;
    }
    molt_free(abs);
    return out;
}

// Whether path a lies strictly inside directory b.
static bool inside(const char *a, const char *b) {
    size_t n = strlen(b);
    if (n == 1 && b[0] == '/')
        return a[1] != 0;
    return !strncmp(a, b, n) && a[n] == '/';
}

static molt_status check_paths(const char *out_opt, const char *out, const char *in_opt,
                               const char *in, bool holding) {
    if (!in || !out)
        return MOLT_OK;
    char *ro = resolve(out), *ri = resolve(in);
    molt_status st = MOLT_OK;
    if (!ro || !ri)
        st = molt_err(MOLT_EIO, "cannot resolve the paths %s and %s", out, in);
    else if (!strcmp(ro, ri))
        st = molt_err(MOLT_EARG, "%s %s is the same as %s %s: refusing to write over an input",
                      out_opt, out, in_opt, in);
    else if (inside(ro, ri))
        st = molt_err(MOLT_EARG, "%s %s lies inside %s %s: refusing to write into an input",
                      out_opt, out, in_opt, in);
    else if (holding && inside(ri, ro))
        st = molt_err(MOLT_EARG, "%s %s lies inside %s %s, which the output would replace: "
                      "choose another %s", in_opt, in, out_opt, out, out_opt);
    molt_free(ro);
    molt_free(ri);
    return st;
}

molt_status molt_check_overlap(const char *out_opt, const char *out, const char *in_opt,
                               const char *in) {
    return check_paths(out_opt, out, in_opt, in, true);
}

molt_status molt_check_not_inside(const char *out_opt, const char *out, const char *in_opt,
                                  const char *in) {
    return check_paths(out_opt, out, in_opt, in, false);
}
