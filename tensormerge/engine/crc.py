"""crc32 of a tensor from the crc32s of its row chunks, as zlib's crc32_combine computes it,
and the crc32 every checksum in the project uses.

Every byte a merge reads or writes is checksummed once (input content hashes, output chunks),
so on a warm cache zlib's crc32 at ~2 GB/s was a fifth of a task-arithmetic merge's CPU time.

A block's checksum in `tensormerge.json` is the crc32 of all its bytes. Chunks are checksummed
one by one (each chunk's own crc32 is what the resume manifest records and verifies), and
combining them in row order gives the block's crc32 without reading any byte twice, whether
the chunks were merged in this run, an earlier one, or on another worker.
"""

from __future__ import annotations

try:  # ISA-L's crc32: zlib's CRC-32 (same values), ~3.5x faster here; the GIL is released as in zlib
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency where it has wheels
    from zlib import crc32

__all__ = ["crc32", "crc32_combine"]

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


def _powers() -> list[list[int]]:
    """The operators that append 2**k zero bytes to a crc, k = 0..63, computed once: each
    combine then costs one operator application per set bit of the length, not ~log2(len)
    squarings (tens of milliseconds in Python, per chunk)."""
    one_bit = [_POLY] + [1 << n for n in range(31)]
    op = _square(_square(_square(one_bit)))  # eight zero bits: one zero byte
    out = []
    for _ in range(64):
        out.append(op)
        op = _square(op)
    return out


_POWERS: list[list[int]] | None = None


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32(a + b) from crc32(a), crc32(b) and len(b): crc1 moved past len(b) zero bytes
    (zlib's GF(2) operators), then crc2 added."""
    global _POWERS
    if len2 <= 0:
        return crc1
    if _POWERS is None:
        _POWERS = _powers()
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _times(_POWERS[k], crc1)
        len2 >>= 1
        k += 1
    return crc1 ^ crc2
