// common/sha256.h: SHA-256 (FIPS 180-4) of memory and of files, and a sampled fingerprint of
// large files. Depends on nothing of ours but common/err.h.
#ifndef MOLT_COMMON_SHA256_H
#define MOLT_COMMON_SHA256_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

typedef struct {
    uint32_t h[8];
    uint64_t len;      // bytes fed so far
    uint8_t buf[64];
    size_t n_buf;
} molt_sha256;
void molt_sha256_init(molt_sha256 *c);
void molt_sha256_update(molt_sha256 *c, const void *data, size_t len);
void molt_sha256_final(molt_sha256 *c, uint8_t out[32]);
// Lowercase hex of the digest of data: 64 characters and a NUL.
void molt_sha256_hex(const void *data, size_t len, char hex[65]);
// Hex SHA-256 of a file's bytes; MOLT_EIO naming the file when it cannot be read.
molt_status molt_sha256_file(const char *path, char hex[65]);

// Lowercase hex fingerprint of a file that reads at most 5 MiB of it, however large: the
// SHA-256 of
//   the tag "molt-fingerprint-v1" and its NUL (20 bytes, so that a fingerprint is never the
//   plain SHA-256 of the same file),
//   the file's size as 8 little-endian bytes,
//   its first head = min(size, 1 MiB) bytes,
//   and, with rest = size - head: when rest <= 4 MiB the whole rest; otherwise 64 blocks of
//   64 KiB in order, block i (0..63) at offset head + floor(i * (rest - 64 KiB) / 63), so the
//   first starts right after the head, the last ends at the end of the file, and none overlap.
// Detects: any change of size; any change in the first MiB, which holds a safetensors file's
// header (every tensor's name, dtype, shape and offsets; a longer header still starts there,
// with its length), hence any change of architecture, tensor set or layout; any change
// inside a sampled block, which two models trained or initialised apart always show (their
// weights differ in every block).
// Does not detect: two files of the same size whose bytes differ only outside the head and
// the sampled blocks (a few weights edited in place, a corruption in a gap). That is fine for
// its use, telling whether a checkpoint was made for another base model (a user's mistake,
// not an attack); use molt_sha256_file where every byte matters. MOLT_EIO naming the file
// when it cannot be opened or read, or is shorter than its size said (changed meanwhile).
molt_status molt_fingerprint_file(const char *path, char hex[65]);

#endif
