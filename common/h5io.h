// common/h5io.h: what molt's two HDF5 writers (adapters/h5.c, train/checkpoint.c) share so
// that an HDF5 failure is an error with errno's text and never a crash:
//   - HDF5 is kept from closing files at process exit (H5dont_atexit): after a failed
//     H5Fclose (a full disk) HDF5 1.10 crashes when it retries the close at exit;
//   - the space a file will take is checked and reserved (fallocate, keeping the size)
//     before HDF5 writes into it, so a full disk is found before HDF5 writes anything;
//   - the reason of a failed call is read from HDF5's error stack: the system's error text
//     when a read or write failed ("No space left on device"), else HDF5's description.
//
// Not here: the file layouts (the writers).
#ifndef MOLT_COMMON_H5IO_H
#define MOLT_COMMON_H5IO_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

// Call before any other HDF5 function: turns off HDF5's printing of its error stack and
// its close-at-exit. Cheap; every HDF5 entry point of molt calls it.
void molt_h5_init(void);
// Reserves `bytes` for the file at path (created by HDF5, still empty): MOLT_EIO with "No
// space left on device" and the sizes when the file system has less free space. File
// systems without fallocate are only checked, not reserved.
molt_status molt_h5_reserve(const char *path, uint64_t bytes);
// Gives back what a reservation left past the end of the finished file.
void molt_h5_unreserve(const char *path);
// ": <reason>" for the HDF5 call that just failed (the system's error text when HDF5
// recorded one, else the innermost description), or "" when HDF5 recorded nothing.
const char *molt_h5_reason(char *buf, size_t cap);

#endif
