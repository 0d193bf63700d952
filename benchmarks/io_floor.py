"""The write half of the benchmarks' I/O floors: a merge fsyncs each shard before it publishes
it, so a floor that leaves the write in the page cache would flatter the merges it is held
against. One copy, for run_bench.py, sweep_bench.py and mergekit_bench.py (run_bench.py also
times the unsynced write alone)."""

from __future__ import annotations

import os
from pathlib import Path


def write_bytes(path: Path, nbytes: int, buf: bytearray) -> None:
    """Write nbytes to path from the reusable buffer, without fsync."""
    view = memoryview(buf)
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left:
            left -= f.write(view[:min(left, len(view))])


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_fsynced(path: Path, nbytes: int, buf: bytearray) -> None:
    """Write nbytes from the reusable buffer and fsync, as a merge's writer does per shard."""
    write_bytes(path, nbytes, buf)
    fsync_file(path)
