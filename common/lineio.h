// common/lineio.h: reading a text input line by line, where a failure to read is an error
// and never taken for the end of the input: a directory is refused by name, a read error
// carries errno's text, and a line longer than a cap (a binary file, /dev/zero) is refused
// before it is held in memory. "-" reads standard input.
// Not here: datasets (data/jsonl.c reads compressed files and archives with its own cap).
#ifndef MOLT_COMMON_LINEIO_H
#define MOLT_COMMON_LINEIO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "err.h"

#define MOLT_LINE_MAX_DEFAULT ((size_t)64 << 20) // 64 MiB

typedef struct {
    FILE *f;
    const char *path; // for messages (not owned)
    char *buf;        // the current line, NUL-terminated, without its newline
    size_t len, cap, max;
    uint64_t lineno;  // 1-based number of the current line
} molt_lines;

// Opens path ("-": standard input) with lines of at most max bytes (0: 64 MiB). MOLT_EIO
// naming the path and errno; MOLT_EARG for a directory.
molt_status molt_lines_open(molt_lines *r, const char *path, size_t max);
// The next line into r->buf / r->len (its newline, and a "\r" before it, removed); *eof at
// the end. MOLT_EIO "PATH: read error: ..." or MOLT_EFORMAT "PATH:LINE: line longer than
// N bytes".
molt_status molt_lines_next(molt_lines *r, bool *eof);
void molt_lines_close(molt_lines *r);

#endif
