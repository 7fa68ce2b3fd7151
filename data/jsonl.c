// data/jsonl.c: line reader over libarchive. A single file goes through libarchive's "raw"
// format with every decompression filter (plain, gzip, zstd, xz, bzip2, lz4 detected from
// the content); a .tar/.tar.gz/.tgz/.tar.zst/.tar.xz/.zip name opens an archive whose .jsonl
// members are read one after another in sorted name order. Data is streamed block by block:
// memory is bounded by the longest line (capped). Not here: JSON parsing or record formats.
#include "ds_internal.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define DEFAULT_MAX_LINE ((size_t)64 << 20)

typedef struct {
    char *name;
    size_t index; // position among all entries of the archive
} member;

struct ds_reader {
    char *path;
    size_t max_line;
    bool is_archive;
    bool empty;      // a plain file of 0 bytes (libarchive cannot open those)
    member *members; // sorted by name (archives only)
    size_t n_members; // 1 for a plain file
    struct archive *a;
    size_t a_entry;   // archive order index of the entry whose data is open; SIZE_MAX: none
    size_t cur;       // sorted index of the member being read (n_members: all done)
    bool member_done; // no data left in cur
    const char *blk;  // current data block and how much of it was consumed
    size_t blk_len, blk_off;
    ds_buf line;
    uint64_t lineno;  // lines consumed in member cur
    size_t last_member;
    uint64_t last_lineno, bytes;
};

static bool ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

static bool archive_name(const char *path) {
    static const char *const ext[] = {".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.xz",
                                      ".tar.bz2", ".zip"};
    for (size_t i = 0; i < sizeof ext / sizeof *ext; i++)
        if (ends_with(path, ext[i]))
            return true;
    return false;
}

// A member holding records: a regular file named *.jsonl, not macOS archiver debris
// ("__MACOSX/" folders, "._name" resource forks).
static bool data_member(struct archive_entry *en) {
    const char *name = archive_entry_pathname(en);
    if (!name || archive_entry_filetype(en) != AE_IFREG || !ends_with(name, ".jsonl"))
        return false;
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    return strncmp(name, "__MACOSX/", 9) && strncmp(base, "._", 2);
}

static molt_status archive_fail(ds_reader *r, struct archive *a, const char *what) {
    const char *msg = archive_error_string(a);
    if (r->is_archive && r->cur < r->n_members && r->a_entry != SIZE_MAX)
        return molt_err(MOLT_EIO, "%s:%s: %s: %s", r->path, r->members[r->cur].name, what,
                        msg ? msg : "unknown error");
    return molt_err(MOLT_EIO, "%s: %s: %s", r->path, what, msg ? msg : "unknown error");
}

static void close_archive(ds_reader *r) {
    if (r->a)
        archive_read_free(r->a);
    r->a = NULL;
    r->a_entry = SIZE_MAX;
    r->blk = NULL;
    r->blk_len = r->blk_off = 0;
}

static molt_status open_archive(ds_reader *r, struct archive **out) {
    struct archive *a = archive_read_new();
    if (!a)
        return molt_err(MOLT_ENOMEM, "%s: out of memory opening", r->path);
    archive_read_support_filter_all(a); // ARCHIVE_WARN when an external program is missing
    if (r->is_archive) {
        archive_read_support_format_tar(a);
        archive_read_support_format_zip(a);
    } else {
        archive_read_support_format_raw(a);
    }
    if (archive_read_open_filename(a, r->path, 1 << 16) != ARCHIVE_OK) {
        molt_status st = archive_errno(a) == ENOENT
                             ? molt_err(MOLT_EIO, "cannot open %s: no such file", r->path)
                             : archive_fail(r, a, "cannot open");
        archive_read_free(a);
        return st;
    }
    *out = a;
    return MOLT_OK;
}

static int cmp_member(const void *x, const void *y) {
    const member *a = x, *b = y;
    int c = strcmp(a->name, b->name);
    return c ? c : (a->index > b->index) - (a->index < b->index);
}

// Lists the data members of an archive, sorted by name.
static molt_status list_members(ds_reader *r) {
    struct archive *a;
    MOLT_TRY(open_archive(r, &a));
    struct archive_entry *en;
    size_t index = 0, cap = 0;
    molt_status st = MOLT_OK;
    int rc;
    while ((rc = archive_read_next_header(a, &en)) == ARCHIVE_OK || rc == ARCHIVE_WARN) {
        if (data_member(en)) {
            if (r->n_members == cap) {
                cap = cap ? 2 * cap : 16;
                member *m = molt_realloc(r->members, cap * sizeof *m);
                if (!m) {
                    st = molt_err(MOLT_ENOMEM, "%s: out of memory listing members", r->path);
                    break;
                }
                r->members = m;
            }
            r->members[r->n_members].name = molt_strdup(archive_entry_pathname(en));
            r->members[r->n_members].index = index;
            if (!r->members[r->n_members++].name) {
                st = molt_err(MOLT_ENOMEM, "%s: out of memory listing members", r->path);
                break;
            }
        }
        index++;
    }
    if (st == MOLT_OK && rc != ARCHIVE_EOF && rc != ARCHIVE_OK && rc != ARCHIVE_WARN)
        st = archive_fail(r, a, "cannot list the archive");
    archive_read_free(a);
    MOLT_TRY(st);
    if (!r->n_members)
        return molt_err(MOLT_EFORMAT, "%s: the archive holds no .jsonl member", r->path);
    qsort(r->members, r->n_members, sizeof *r->members, cmp_member);
    return MOLT_OK;
}

// Opens the data of sorted member k (reopening the archive when it lies behind).
static molt_status goto_member(ds_reader *r, size_t k) {
    r->cur = k;
    r->lineno = 0;
    r->line.n = 0;
    r->blk = NULL;
    r->blk_len = r->blk_off = 0;
    r->member_done = false;
    if (k >= r->n_members) {
        close_archive(r);
        r->member_done = true;
        return MOLT_OK;
    }
    if (r->empty) {
        r->member_done = true;
        return MOLT_OK;
    }
    size_t target = r->is_archive ? r->members[k].index : 0;
    if (r->a && r->a_entry != SIZE_MAX && r->a_entry >= target)
        close_archive(r);
    if (!r->a) {
        MOLT_TRY(open_archive(r, &r->a));
        r->a_entry = SIZE_MAX;
    }
    while (r->a_entry == SIZE_MAX || r->a_entry < target) {
        struct archive_entry *en;
        int rc = archive_read_next_header(r->a, &en);
        if (rc == ARCHIVE_EOF && !r->is_archive) { // an empty plain file
            r->member_done = true;
            return MOLT_OK;
        }
        if (rc != ARCHIVE_OK && rc != ARCHIVE_WARN)
            return archive_fail(r, r->a, rc == ARCHIVE_EOF ? "archive ended early"
                                                           : "cannot read");
        r->a_entry = r->a_entry == SIZE_MAX ? 0 : r->a_entry + 1;
    }
    return MOLT_OK;
}

molt_status ds_reader_open(const char *path, size_t max_line, ds_reader **out) {
    *out = NULL;
    ds_reader *r = molt_calloc(1, sizeof *r);
    if (!r || !(r->path = molt_strdup(path))) {
        molt_free(r);
        return molt_err(MOLT_ENOMEM, "%s: out of memory opening", path);
    }
    r->max_line = max_line ? max_line : DEFAULT_MAX_LINE;
    r->is_archive = archive_name(path);
    r->a_entry = SIZE_MAX;
    r->n_members = 1;
    molt_status st = MOLT_OK;
    struct stat sb;
    r->empty = !r->is_archive && !stat(path, &sb) && S_ISREG(sb.st_mode) && sb.st_size == 0;
    if (r->is_archive) {
        r->n_members = 0;
        st = list_members(r);
    }
    if (st == MOLT_OK)
        st = goto_member(r, 0);
    if (st != MOLT_OK) {
        ds_reader_close(r);
        return st;
    }
    *out = r;
    return MOLT_OK;
}

void ds_reader_close(ds_reader *r) {
    if (!r)
        return;
    close_archive(r);
    for (size_t i = 0; r->is_archive && i < r->n_members; i++)
        molt_free(r->members[i].name);
    molt_free(r->members);
    ds_buf_free(&r->line);
    molt_free(r->path);
    molt_free(r);
}

// Makes the next data block current; *eof when the member has no more.
static molt_status next_block(ds_reader *r, bool *eof) {
    const void *buf;
    size_t size;
    la_int64_t offset;
    for (;;) {
        int rc = archive_read_data_block(r->a, &buf, &size, &offset);
        if (rc == ARCHIVE_EOF) {
            *eof = true;
            return MOLT_OK;
        }
        if (rc != ARCHIVE_OK && rc != ARCHIVE_WARN)
            return archive_fail(r, r->a, "cannot read");
        if (size) {
            r->blk = buf;
            r->blk_len = size;
            r->blk_off = 0;
            r->bytes += size;
            *eof = false;
            return MOLT_OK;
        }
    }
}

// Appends up to the cap; the full length is counted in *total. A line more than four times
// the cap is no record to skip but input that is not JSON lines (/dev/zero, a binary file):
// an error, whatever the bad-record policy, rather than a scan without end.
static molt_status keep(ds_reader *r, const char *s, size_t n, size_t *total) {
    size_t room = r->max_line > r->line.n ? r->max_line - r->line.n : 0;
    *total += n;
    if (*total / 4 > r->max_line)
        return molt_err(MOLT_EFORMAT, "%s: line %llu is longer than %zu bytes: not a JSON "
                        "lines file?", r->path, (unsigned long long)r->lineno + 1,
                        4 * r->max_line);
    return ds_buf_put(&r->line, s, n < room ? n : room);
}

static void finish_line(ds_reader *r, const char **line, size_t *len, size_t total,
                        bool *oversize) {
    *oversize = total > r->max_line;
    if (!*oversize && total && (*line)[total - 1] == '\r')
        total--;
    if (r->lineno == 0 && total >= 3 && !memcmp(*line, "\xEF\xBB\xBF", 3)) { // byte order mark
        *line += 3;
        total -= 3;
    }
    *len = total;
    r->lineno++;
    r->last_member = r->cur;
    r->last_lineno = r->lineno;
}

molt_status ds_reader_next(ds_reader *r, const char **line, size_t *len, bool *oversize) {
    *line = NULL;
    *len = 0;
    *oversize = false;
    r->line.n = 0;
    size_t total = 0;
    bool partial = false; // some bytes of the line were seen
    while (r->cur < r->n_members) {
        if (r->member_done) {
            MOLT_TRY(goto_member(r, r->cur + 1));
            continue;
        }
        if (r->blk_off == r->blk_len) {
            bool eof;
            MOLT_TRY(next_block(r, &eof));
            if (eof) {
                r->member_done = true;
                if (partial) { // last line without a newline
                    *line = r->line.p;
                    finish_line(r, line, len, total, oversize);
                    return MOLT_OK;
                }
                continue;
            }
        }
        const char *s = r->blk + r->blk_off;
        size_t avail = r->blk_len - r->blk_off;
        const char *nl = memchr(s, '\n', avail);
        size_t n = nl ? (size_t)(nl - s) : avail;
        r->blk_off += nl ? n + 1 : n;
        if (nl && !partial && n <= r->max_line) { // the whole line is in the block
            *line = s;
            finish_line(r, line, len, n, oversize);
            return MOLT_OK;
        }
        MOLT_TRY(keep(r, s, n, &total));
        partial = true;
        if (nl) {
            *line = r->line.p;
            finish_line(r, line, len, total, oversize);
            return MOLT_OK;
        }
    }
    return MOLT_OK;
}

ds_pos ds_reader_tell(const ds_reader *r) {
    if (r->cur >= r->n_members)
        return (ds_pos){r->n_members, 0};
    return (ds_pos){r->cur, r->lineno};
}

molt_status ds_reader_seek(ds_reader *r, ds_pos pos) {
    if (pos.member > r->n_members || (pos.member == r->n_members && pos.line))
        return molt_err(MOLT_EARG, "%s: cannot seek to member %llu line %llu (it has %zu "
                        "members)", r->path, (unsigned long long)pos.member,
                        (unsigned long long)pos.line, r->n_members);
    MOLT_TRY(goto_member(r, (size_t)pos.member));
    while (r->lineno < pos.line) {
        const char *line;
        size_t len;
        bool over;
        MOLT_TRY(ds_reader_next(r, &line, &len, &over));
        if (!line || r->cur != pos.member)
            return molt_err(MOLT_EFORMAT, "%s: cannot seek to line %llu: the input is shorter "
                            "(it changed since the position was taken)", r->path,
                            (unsigned long long)pos.line);
    }
    return MOLT_OK;
}

const char *ds_reader_path(const ds_reader *r) { return r->path; }

const char *ds_reader_member(const ds_reader *r) {
    return r->is_archive && r->last_member < r->n_members ? r->members[r->last_member].name
                                                           : NULL;
}

uint64_t ds_reader_lineno(const ds_reader *r) { return r->last_lineno; }
uint64_t ds_reader_bytes(const ds_reader *r) { return r->bytes; }

const char *ds_reader_where(const ds_reader *r, int col, char *buf, size_t cap) {
    const char *m = ds_reader_member(r);
    if (m)
        snprintf(buf, cap, "%s:%s:%llu:%d", r->path, m, (unsigned long long)r->last_lineno, col);
    else
        snprintf(buf, cap, "%s:%llu:%d", r->path, (unsigned long long)r->last_lineno, col);
    return buf;
}
