"""Cold page cache without root: evict files, check that they left, time a cold read.

Dropping the whole page cache needs root (``/proc/sys/vm/drop_caches``), but any user may
tell the kernel that one file's cached pages are no longer needed:
``posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`` after an ``fsync`` (dirty pages are not
dropped). Whether the pages really left is checked with ``mincore`` on a mapping of the file,
and a read right after eviction is timed against a warm one (a VM's host may still cache the
disk below us: then the cold read is fast although the guest's cache was empty).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

READ_CHUNK = 16 * 1024 * 1024
DIRECT_CHUNK = 128 * 1024 * 1024
DIRECT_THREADS = 4
GB = 1e9


def evict(paths: list[Path]) -> None:
    """Write back and drop the page-cache pages of every file (no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_start(paths: list[Path]) -> None:
    """Flush every dirty page (an earlier run's output would otherwise be written back during
    the next measurement), then evict the inputs."""
    os.sync()
    evict(paths)


_libc = None


def _mincore_fn():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return _libc


def resident_bytes(path: Path) -> int | None:
    """Bytes of the file in the page cache (mincore of a read-only mapping; maps, reads nothing).
    None where mincore is not available."""
    size = path.stat().st_size
    if size == 0:
        return 0
    try:
        libc = _mincore_fn()
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    npages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * npages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            pages = sum(v & 1 for v in bytes(vec))
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return min(pages * page, size)


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of the files' bytes in the page cache, or None where it cannot be known."""
    total = sum(p.stat().st_size for p in paths)
    parts = [resident_bytes(p) for p in paths]
    if total == 0 or any(r is None for r in parts):
        return None
    return sum(parts) / total


def read_all(paths: list[Path], buf: bytearray | None = None) -> int:
    """Read the files once, sequentially, in 16 MiB chunks into one reused buffer."""
    view = memoryview(buf if buf is not None else bytearray(READ_CHUNK))
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def timed_read(paths: list[Path]) -> dict:
    """Seconds and GB/s of one sequential read of the files."""
    t0 = time.perf_counter()
    nbytes = read_all(paths)
    s = time.perf_counter() - t0
    return {"bytes": nbytes, "s": s, "GBps": nbytes / GB / s}


def cold_read_floor(paths: list[Path]) -> dict:
    """The cold read floor: evict the inputs, then read them once, sequentially, through the
    page cache (the kernel's readahead gives the depth)."""
    cold_start(paths)
    before = resident_fraction(paths)
    result = timed_read(paths)
    result["resident_before"] = before
    return result


def direct_reader(chunk: int, threads: int):
    """A reader of files with O_DIRECT, file after file, `chunk` bytes a request, `threads`
    requests in flight (one page-aligned buffer per thread); it returns the bytes read, or None
    where the file system refuses O_DIRECT."""
    def read(paths: list[Path]) -> int | None:
        local = threading.local()
        try:
            fds = {p: os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths}
        except (OSError, AttributeError):
            return None
        jobs = [(p, off) for p in paths for off in range(0, p.stat().st_size, chunk)]

        def one(job) -> int:
            if not hasattr(local, "buf"):
                local.buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
            return os.preadv(fds[job[0]], [local.buf], job[1])
        try:
            with ThreadPoolExecutor(threads) as ex:
                return sum(ex.map(one, jobs))
        finally:
            for fd in fds.values():
                os.close(fd)
    return read


def cold_direct_floor(paths: list[Path]) -> dict | None:
    """The other way to read the disk at its own speed: evict, then one sequential O_DIRECT read
    (128 MiB requests, four in flight: the fastest of the depths tried here, 1.7-1.8 GB/s where
    64 MiB x2 gave 0.9-1.2 and 16 MiB x8 0.9-1.0; a virtual disk is faster the more is asked of
    it at once, and the engine reads 256 MiB ahead). On a small VM
    a cold buffered read can be held back by the kernel's own page-cache work (a core busy in
    it), not by the disk; the floor a merge is held to is the faster of the two. None where
    O_DIRECT is refused (tmpfs)."""
    cold_start(paths)
    before = resident_fraction(paths)
    t0 = time.perf_counter()
    nbytes = direct_reader(DIRECT_CHUNK, DIRECT_THREADS)(paths)
    if nbytes is None:
        return None
    s = time.perf_counter() - t0
    return {"bytes": nbytes, "s": s, "GBps": nbytes / GB / s, "resident_before": before}


def eviction_check(paths: list[Path]) -> dict:
    """Does eviction work here? Warm the files and time a warm read, evict, look at the resident
    share (mincore), time a cold read. A cold read near the warm rate means something below the
    guest (the host's cache) still serves the data, and cold numbers here are not a disk's."""
    read_all(paths)
    warm = timed_read(paths)
    warm["resident_before"] = resident_fraction(paths)
    cold_start(paths)
    after = resident_fraction(paths)
    cold = timed_read(paths)
    cold["resident_before"] = after
    return {"files": [str(p) for p in paths], "warm": warm, "cold": cold,
            "resident_after_evict": after, "cold_over_warm_s": cold["s"] / warm["s"]}
