// common/sha256.c: SHA-256 (FIPS 180-4): checkpoint checksums, the hashes that tie a
// checkpoint to its base model and tokenizer, and test fixtures' model checksums; and the
// sampled fingerprint that stands for a whole-file hash of a base model's weights.
//
// Not here: any other hash, HMAC, or hardware acceleration (checkpoints are hashed once per
// save, and the model files hashed or fingerprinted once per run).
#include "sha256.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const uint32_t round_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

static uint32_t rotr(uint32_t x, int n) {
    return (x >> n) | (x << (32 - n));
}

// Mixes one 64-byte block into the state h.
static void compress(uint32_t h[8], const uint8_t blk[64]) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)blk[4 * i] << 24 | (uint32_t)blk[4 * i + 1] << 16 |
               (uint32_t)blk[4 * i + 2] << 8 | (uint32_t)blk[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) +
                      round_k[i] + w[i];
        uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
}

void molt_sha256_init(molt_sha256 *c) {
    static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, h0, sizeof h0);
    c->len = 0;
    c->n_buf = 0;
}

void molt_sha256_update(molt_sha256 *c, const void *data, size_t len) {
    const uint8_t *p = data;
    c->len += len;
    while (len > 0) {
        size_t take = 64 - c->n_buf < len ? 64 - c->n_buf : len;
        if (c->n_buf == 0 && len >= 64) {
            compress(c->h, p);
            take = 64;
        } else {
            memcpy(c->buf + c->n_buf, p, take);
            c->n_buf += take;
            if (c->n_buf == 64) {
                compress(c->h, c->buf);
                c->n_buf = 0;
            }
        }
        p += take;
        len -= take;
    }
}

void molt_sha256_final(molt_sha256 *c, uint8_t out[32]) {
    uint64_t bits = c->len * 8;
    uint8_t pad[72] = {0x80};
    // pad to 56 mod 64, then the 64-bit big-endian bit length
    size_t n_pad = (c->n_buf < 56 ? 56 : 120) - c->n_buf;
    for (int i = 0; i < 8; i++)
        pad[n_pad + (size_t)i] = (uint8_t)(bits >> (56 - 8 * i));
    molt_sha256_update(c, pad, n_pad + 8);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 4; j++)
            out[4 * i + j] = (uint8_t)(c->h[i] >> (24 - 8 * j));
}

static void to_hex(const uint8_t d[32], char hex[65]) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[d[i] >> 4];
        hex[2 * i + 1] = digits[d[i] & 15];
    }
    hex[64] = '\0';
}

void molt_sha256_hex(const void *data, size_t len, char hex[65]) {
    molt_sha256 c;
    uint8_t d[32];
    molt_sha256_init(&c);
    molt_sha256_update(&c, data, len);
    molt_sha256_final(&c, d);
    to_hex(d, hex);
}

molt_status molt_sha256_file(const char *path, char hex[65]) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return molt_err(MOLT_EIO, "cannot open %s to hash it: %s", path, strerror(errno));
    molt_sha256 c;
    molt_sha256_init(&c);
    uint8_t buf[1 << 16];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0)
        molt_sha256_update(&c, buf, got);
    int bad = ferror(f);
    fclose(f);
    if (bad)
        return molt_err(MOLT_EIO, "read error while hashing %s", path);
    uint8_t d[32];
    molt_sha256_final(&c, d);
    to_hex(d, hex);
    return MOLT_OK;
}

// ---- sampled fingerprint ---------------------------------------------------------------
enum { FP_N_BLOCKS = 64 };
static const uint64_t fp_head = (uint64_t)1 << 20, fp_block = (uint64_t)1 << 16;

// Feeds len bytes of fd from offset at into c, reading in pieces of sizeof buf.
static molt_status fp_feed(molt_sha256 *c, int fd, const char *path, uint64_t at,
                           uint64_t len) {
    uint8_t buf[1 << 16];
    while (len > 0) {
        size_t want = len < sizeof buf ? (size_t)len : sizeof buf;
        ssize_t got = pread(fd, buf, want, (off_t)at);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return molt_err(MOLT_EIO, "read error at byte %llu while fingerprinting %s: %s",
                            (unsigned long long)at, path, strerror(errno));
        if (got == 0)
            return molt_err(MOLT_EIO, "%s ended at byte %llu while being fingerprinted "
                            "(did it change?)", path, (unsigned long long)at);
        molt_sha256_update(c, buf, (size_t)got);
        at += (uint64_t)got;
        len -= (uint64_t)got;
    }
    return MOLT_OK;
}

// Everything after the tag and the size: the head, then the rest or its sampled blocks.
static molt_status fp_feed_file(molt_sha256 *c, int fd, const char *path, uint64_t size) {
    uint64_t head = size < fp_head ? size : fp_head, rest = size - head;
    MOLT_TRY(fp_feed(c, fd, path, 0, head));
    if (rest <= FP_N_BLOCKS * fp_block)
        return fp_feed(c, fd, path, head, rest);
    // floor(i * span / 63) as i * q + floor(i * r / 63), which cannot overflow
    uint64_t span = rest - fp_block, q = span / (FP_N_BLOCKS - 1), r = span % (FP_N_BLOCKS - 1);
    for (uint64_t i = 0; i < FP_N_BLOCKS; i++)
        MOLT_TRY(fp_feed(c, fd, path, head + i * q + i * r / (FP_N_BLOCKS - 1), fp_block));
    return MOLT_OK;
}

molt_status molt_fingerprint_file(const char *path, char hex[65]) {
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return molt_err(MOLT_EIO, "cannot open %s to fingerprint it: %s", path,
                        strerror(errno));
    // the size read from the open file, so that it and the bytes read are the same file's
    struct stat sb;
    molt_status st = MOLT_OK;
    if (fstat(fd, &sb) != 0)
        st = molt_err(MOLT_EIO, "cannot stat %s to fingerprint it: %s", path, strerror(errno));
    else if (!S_ISREG(sb.st_mode))
        st = molt_err(MOLT_EIO, "cannot fingerprint %s: not a regular file", path);
    if (st != MOLT_OK) {
        close(fd);
        return st;
    }
    uint64_t size = (uint64_t)sb.st_size;
    molt_sha256 c;
    molt_sha256_init(&c);
    static const char tag[] = "molt-fingerprint-v1";
    molt_sha256_update(&c, tag, sizeof tag); // with its NUL
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)(size >> (8 * i));
    molt_sha256_update(&c, le, sizeof le);
    st = fp_feed_file(&c, fd, path, size);
    close(fd);
    if (st != MOLT_OK)
        return st;
    uint8_t d[32];
    molt_sha256_final(&c, d);
    to_hex(d, hex);
    return MOLT_OK;
}
