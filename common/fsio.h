// common/fsio.h: how molt writes its outputs, so that a failure (a full disk, a crash, a
// kill) never leaves a half-written file under the final name and never damages an input:
//   - a file is written to a temporary name beside it, synced, then renamed over the final
//     name, and its directory synced (molt_wfile_*, molt_write_atomic, or molt_tmp_path +
//     molt_commit_tmp for writers that need a path, such as HDF5);
//   - a directory (a model, a PEFT adapter) is built in a temporary sibling and swapped in
//     whole (molt_outdir_*): an existing non-empty directory is replaced only when the
//     caller says so (--force), and then nothing of the old one is kept;
//   - an output equal to, inside, or holding an input is refused before anything is written
//     (molt_check_overlap).
// Errors carry errno's text ("No space left on device").
//
// Not here: the file formats themselves (their modules).
#ifndef MOLT_COMMON_FSIO_H
#define MOLT_COMMON_FSIO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "err.h"

// ---- files -----------------------------------------------------------------------------
typedef struct {
    char *path; // final name
    char *tmp;  // temporary name beside it (path.tmp-XXXXXX)
    FILE *f;    // open for writing on tmp
} molt_wfile;

// Creates the temporary file for path and opens it (w->f). MOLT_EIO naming path and errno.
molt_status molt_wfile_open(molt_wfile *w, const char *path);
// Flushes, syncs and closes the temporary, renames it over the final name and syncs the
// directory. On failure the temporary is removed and the final name is untouched. Always
// releases w.
molt_status molt_wfile_commit(molt_wfile *w);
// Closes and removes the temporary (a failed write); safe on a zeroed or committed w.
void molt_wfile_abort(molt_wfile *w);
// path := the n bytes of data, through molt_wfile.
molt_status molt_write_atomic(const char *path, const void *data, size_t n);

// A fresh temporary name beside path (created empty, closed), into *tmp (molt_free), for
// writers that open files themselves. molt_commit_tmp then syncs it and renames it over
// path (removing it on failure).
molt_status molt_tmp_path(const char *path, char **tmp);
molt_status molt_commit_tmp(const char *tmp, const char *path);

// Copies the file from to the new file to (plain write, for files inside an outdir's
// temporary). MOLT_EIO naming the file and errno.
molt_status molt_copy_file(const char *from, const char *to);

// errno's text for the last failed call, for messages ("No space left on device").
const char *molt_errno_text(int err);

// ---- directories -----------------------------------------------------------------------
typedef struct {
    char *path; // final directory
    char *tmp;  // temporary sibling being filled (path.tmp-XXXXXX)
    bool replace; // path existed (and is replaced at commit)
} molt_outdir;

// Prepares to write the directory path: MOLT_EARG when it exists and is not an empty
// directory, unless force (then it is replaced whole at commit); MOLT_EARG when it exists
// and is not a directory. Creates the temporary sibling d->tmp, where the caller writes.
// `what` names the option in messages ("--out").
molt_status molt_outdir_begin(molt_outdir *d, const char *path, bool force, const char *what);
// Syncs every file under d->tmp, then moves it to d->path (atomically exchanging it with an
// existing directory), syncs the parent and deletes the old contents. Always releases d;
// on failure the temporary is removed and d->path is as it was.
molt_status molt_outdir_commit(molt_outdir *d);
// Removes the temporary directory (a failed write); safe on a zeroed or committed d.
void molt_outdir_abort(molt_outdir *d);

// Whether path is an existing directory with entries (false when it does not exist).
bool molt_dir_nonempty(const char *path);
// mkdir -p. MOLT_EIO naming the component and errno.
molt_status molt_mkdirs(const char *path);

// ---- inputs and outputs ----------------------------------------------------------------
// Refuses (MOLT_EARG) an output out that is the input in, lies inside it, or holds it
// (replacing out would delete the input), after resolving ".", ".." and symbolic links of
// the parts that exist. out_opt / in_opt name the options in the message ("--out",
// "--model"). A NULL in is fine.
molt_status molt_check_overlap(const char *out_opt, const char *out, const char *in_opt,
                               const char *in);
// The same for an output that is written into but never replaced whole: only an out equal
// to or inside in is refused.
molt_status molt_check_not_inside(const char *out_opt, const char *out, const char *in_opt,
                                  const char *in);

#endif
