#!/usr/bin/env python3
"""Expected values for molt's sampled file fingerprint (tests/test_fingerprint.c).

A second implementation of the fingerprint that common/sha256.h specifies, written from that
specification with Python's hashlib: SHA-256 of the tag b"molt-fingerprint-v1\\0", the file
size as 8 little-endian bytes, the first min(size, 1 MiB) bytes, then either the whole rest
(rest <= 4 MiB) or 64 blocks of 64 KiB, block i at head + i * (rest - 64 KiB) // 63.

It builds the test's files (the same generator as make_case in the C test) in a temporary
directory, fingerprints them and prints the C table that tests/test_fingerprint.c holds.
The large case is a sparse file, so the script needs a file system with holes and a few
seconds. Run from the repository root:
  python3 tools/reference/fingerprint_reference.py
"""
import hashlib
import os
import tempfile

MIB = 1 << 20
HEAD = MIB
BLOCK = 64 << 10
N_BLOCKS = 64
TAG = b"molt-fingerprint-v1\0"


def fingerprint(path):
    size = os.path.getsize(path)
    h = hashlib.sha256()
    h.update(TAG)
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        head = min(size, HEAD)
        h.update(f.read(head))
        rest = size - head
        if rest <= N_BLOCKS * BLOCK:
            h.update(f.read(rest))
        else:
            for i in range(N_BLOCKS):
                f.seek(head + i * (rest - BLOCK) // (N_BLOCKS - 1))
                block = f.read(BLOCK)
                assert len(block) == BLOCK
                h.update(block)
    return h.hexdigest()


def pattern(start, n):
    """Bytes start..start+n-1 of the dense pattern (byte k depends on every byte of k)."""
    out = bytearray(n)
    for j in range(n):
        k = start + j
        out[j] = ((k ^ (k >> 8) ^ (k >> 16) ^ (k >> 24) ^ (k >> 32)) * 167) & 0xFF
    return bytes(out)


# Dense files: every byte from pattern(). Sizes at each boundary of the specification.
DENSE = [0, 1, MIB - 1, MIB, MIB + 1, 5 * MIB, 5 * MIB + 1, 7 * MIB + 12345]
# The sparse file: holes (zero bytes) except 64 bytes of pattern() at each marker offset:
# in the head, across the head's end, across both ends of block 10 (at 853049743), inside
# block 37 (at 3153452894), in the gap after block 25, and at the end of the file.
SPARSE_SIZE = 5 * (1 << 30) + 12345
SPARSE_MARKS = [0, 777777, MIB - 32, 853049743 - 32, 853049743 + BLOCK - 32, 3153452894 + 1000,
                2 * (1 << 30) + 99, SPARSE_SIZE - 64]


def make_dense(path, size):
    with open(path, "wb") as f:
        f.write(pattern(0, size))


def make_sparse(path):
    with open(path, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for at in SPARSE_MARKS:
            f.seek(at)
            f.write(pattern(at, 64))


def block_offset(size, i):
    return HEAD + i * (size - HEAD - BLOCK) // (N_BLOCKS - 1)


def main():
    # the offsets the markers are placed against (written out as numbers in the C test)
    assert block_offset(SPARSE_SIZE, 10) == 853049743
    assert block_offset(SPARSE_SIZE, 37) == 3153452894
    gap = 2 * (1 << 30) + 99
    assert block_offset(SPARSE_SIZE, 25) + BLOCK <= gap
    assert gap + 64 <= block_offset(SPARSE_SIZE, 26)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for size in DENSE:
            p = os.path.join(d, "dense")
            make_dense(p, size)
            rows.append(f'    {{{size}, "{fingerprint(p)}"}},')
        p = os.path.join(d, "sparse")
        make_sparse(p)
        sparse = fingerprint(p)
    print("\n".join(rows))
    print(f'static const char sparse_want[] = "{sparse}";')


if __name__ == "__main__":
    main()
