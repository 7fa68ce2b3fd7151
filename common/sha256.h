// common/sha256.h: SHA-256 (FIPS 180-4) of memory and of files. Depends on nothing of ours
// but common/err.h.
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

#endif
