"""crc32 of a tensor from the crc32s of its row chunks, as zlib's crc32_combine computes it.

A block's checksum in `tensormerge.json` is the crc32 of all its bytes. Chunks are checksummed
one by one (each chunk's own crc32 is what the resume manifest records and verifies), and
combining them in row order gives the block's crc32 without reading any byte twice, whether
the chunks were merged in this run, an earlier one, or on another worker.
"""

from __future__ import annotations

_POLY = 0xEDB88320


def _times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _square(mat: list[int]) -> list[int]:
    return [_times(mat, mat[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32(a + b) from crc32(a), crc32(b) and len(b): zlib's GF(2) operator squaring."""
    if len2 <= 0:
        return crc1
    odd = [_POLY] + [1 << n for n in range(31)]  # the operator for one zero bit
    even = _square(odd)  # two zero bits
    odd = _square(even)  # four zero bits
    while True:
        even = _square(odd)  # apply len2's bits, starting with one zero byte
        if len2 & 1:
            crc1 = _times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _square(even)
        if len2 & 1:
            crc1 = _times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2
