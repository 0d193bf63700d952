"""crc32_combine against zlib on the bytes joined."""

from __future__ import annotations

import random
import zlib

import pytest

from tensormerge.engine.crc import crc32_combine


@pytest.mark.parametrize("n1,n2", [(0, 0), (0, 5), (5, 0), (1, 1), (100, 37), (4096, 12345), (7, 1 << 20)])
def test_combine_equals_crc_of_the_joined_bytes(n1, n2):
    rng = random.Random(n1 * 31 + n2)
    a, b = rng.randbytes(n1), rng.randbytes(n2)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_combine_of_many_chunks_in_order():
    rng = random.Random(3)
    parts = [rng.randbytes(rng.randint(0, 3000)) for _ in range(20)]
    crc = 0
    for p in parts:
        crc = crc32_combine(crc, zlib.crc32(p), len(p))
    assert crc == zlib.crc32(b"".join(parts))


@pytest.mark.parametrize("n", [0, 1, 15, 4096, 1 << 20])
def test_crc32_is_zlibs(n):
    """Whichever implementation is installed (ISA-L or zlib), the values are zlib's: manifests
    and provenance written by one install are verified by another."""
    from tensormerge.engine.crc import crc32

    data = random.Random(n).randbytes(n)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(memoryview(data)[: n // 2], 12345) == zlib.crc32(data[: n // 2], 12345)
