// common/h5io.c: HDF5 start-up, space reservation and error reasons (see h5io.h).
#define _GNU_SOURCE // fallocate
#include "h5io.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

void molt_h5_init(void) {
    static int done;
    if (!done) {
        done = 1;
        H5dont_atexit(); // must precede every other HDF5 call of the process
    }
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

molt_status molt_h5_reserve(const char *path, uint64_t bytes) {
    struct statvfs vs;
    if (statvfs(path, &vs) == 0) {
        uint64_t free_b = (uint64_t)vs.f_bavail * vs.f_frsize;
        if (free_b < bytes)
            return molt_err(MOLT_EIO, "%s: %s: it needs about %.1f MiB, %.1f MiB are free", path,
                            strerror(ENOSPC), (double)bytes / (1 << 20),
                            (double)free_b / (1 << 20));
    }
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return molt_err(MOLT_EIO, "%s: %s", path, strerror(errno));
    int rc = fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, (off_t)bytes), e = errno;
    close(fd);
    if (rc != 0 && e != EOPNOTSUPP && e != ENOSYS && e != EINVAL)
        return molt_err(MOLT_EIO, "%s: %s: it needs about %.1f MiB", path, strerror(e),
                        (double)bytes / (1 << 20));
    return MOLT_OK;
}

void molt_h5_unreserve(const char *path) {
    struct stat sb;
    if (stat(path, &sb) == 0 && truncate(path, sb.st_size) != 0) {
        // the reservation then stays allocated until the file goes; nothing is lost
    }
}

typedef struct {
    char sys[256];   // "No space left on device" from "error message = '...'"
    char inner[256]; // the innermost description
} reason_walk;

static herr_t walk(unsigned n, const H5E_error2_t *e, void *user) {
    reason_walk *w = user;
    if (!e->desc)
        return 0;
    if (n == 0)
        snprintf(w->inner, sizeof w->inner, "%s", e->desc);
    const char *m = strstr(e->desc, "error message = '");
    if (m && !w->sys[0]) {
        m += strlen("error message = '");
        size_t len = strcspn(m, "'");
        snprintf(w->sys, sizeof w->sys, "%.*s", (int)(len < 255 ? len : 255), m);
    }
    return 0;
}

const char *molt_h5_reason(char *buf, size_t cap) {
    reason_walk w = {"", ""};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, walk, &w);
    if (w.sys[0])
        snprintf(buf, cap, ": %s", w.sys);
    else if (w.inner[0])
        snprintf(buf, cap, " (HDF5: %s)", w.inner);
    else if (cap)
        buf[0] = 0;
    return buf;
}
