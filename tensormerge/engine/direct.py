"""Reads past the page cache (O_DIRECT) for inputs that are not in it.

A cold read through the page cache makes the kernel allocate, fill and copy every page: on a
2-core VM that kept 0.4-0.95 of a core busy for 8.8 GB (`benchmarks/read_paths.py`), the core a
merge needs for its own arithmetic; read directly into the merge's buffers the same bytes cost
0.4 CPU-seconds in all. A warm cache is still read through (memory is faster than any disk), so
the choice is made per checkpoint from how much of its files is resident (mincore), once, when
it is first read. `TENSORMERGE_IO=buffered|direct|auto` (default auto) overrides it; a file
system without O_DIRECT (tmpfs) is read buffered.

Direct reads must start, end and land on block boundaries: each read covers the aligned span
around the rows asked for, in a page-aligned buffer, and returns a view of the rows; a span over
PART is read in parts at once on a small pool, so the disk has several requests in flight without
the kernel's readahead. The bytes are the file's either way.

The buffers are anonymous mappings of their own (`Slabs`), not malloc's: reads run on several
threads at once (the executor's read-ahead), and buffers of many sizes allocated and freed
across threads fragmented malloc's one arena (engine/alloc.py keeps freed memory in the process)
until mT5-XL DARE held 2.3-3.6 GB under --max-memory 1GiB. A mapping is returned whole: to a
short free list for the next buffer of its size class while that list holds under KEEP bytes,
else to the kernel, so what reads hold is what is in flight (within the budget) plus KEEP.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading
import weakref
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tensormerge.errors import InputError, ParameterError

ALIGN = 4096  # the largest logical block size of common disks; a multiple of the others
PART = 8 * 1024 * 1024  # one request of a direct read; parts of one read are in flight together
THREADS = 16  # parts in flight, over every read at once (a chunk's models, READ_AHEAD chunks)
SIZE_CLASS = 1024 * 1024
KEEP = 256 * 1024 * 1024  # free buffers kept for reuse (fresh pages cost a fault and a zeroing each)
RESIDENT = 0.5  # auto: below this share of a checkpoint's bytes in the page cache, read it directly
ENV = "TENSORMERGE_IO"
POLICIES = ("auto", "buffered", "direct")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class Refused(Exception):
    """A file system that opened a file with O_DIRECT but refuses its reads (EINVAL: alignment it
    does not take): the caller reads that file through the page cache instead."""


def policy() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in POLICIES:
        raise ParameterError(f"{ENV}={value!r}: expected one of {', '.join(POLICIES)}")
    return value


def wanted(paths: list[str]) -> bool:
    """Whether to read these files directly: by policy, or (auto) when less than RESIDENT of
    their bytes are in the page cache. Where residency cannot be known, they are read buffered."""
    chosen = policy()
    if chosen != "auto":
        return chosen == "direct"
    if not hasattr(os, "O_DIRECT"):
        return False
    share = resident_fraction(paths)
    return share is not None and share < RESIDENT


def open_direct(path: str) -> int | None:
    """An O_DIRECT descriptor, or None where the file system refuses one (tmpfs, some FUSE)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return None


def read(fd: int, path: str, name: str, pos: int, nbytes: int) -> torch.Tensor:
    """`nbytes` bytes of the file at `pos`, as a uint8 view into a Slabs buffer holding the aligned
    span around them (rounded to its size class). Refused where the file system refuses
    the read itself (EINVAL), an InputError naming the file and tensor for any other error."""
    a0 = pos - pos % ALIGN
    span = -(-(pos + nbytes - a0) // ALIGN) * ALIGN
    raw = slabs().take(span)
    view = memoryview(raw.numpy()).cast("B")
    parts = [(s, min(s + PART, span)) for s in range(0, span, PART)]

    def one(part: tuple[int, int]) -> int:
        s, e = part
        done = 0
        while s + done < e:
            n = os.preadv(fd, [view[s + done:e]], a0 + s + done)
            if n <= 0:
                break  # the end of the file: the aligned span may reach past it
            done += n
        return done

    try:
        got = [one(parts[0])] if len(parts) == 1 else list(_threads().map(one, parts))
    except OSError as e:
        if e.errno == errno.EINVAL:  # opened with O_DIRECT, but its reads refused: read it buffered
            raise Refused(path) from None
        raise InputError(f"{path}: tensor {name!r}: cannot read ({e.strerror or e})") from None
    need = pos + nbytes - a0
    if any(s + n < min(e, need) for (s, e), n in zip(parts, got) if s < need):
        raise InputError(f"{path}: tensor {name!r}: file ended early (truncated shard)")
    start = pos - a0
    return raw[start:start + nbytes]


def _size_class(n: int) -> int:
    """Buffers rounded up to whole pages, and past SIZE_CLASS to a multiple of it: a direct read's
    span depends on where its rows lie against block boundaries, and rounded, the next chunk's
    reads (a few sizes per model) fit the buffers the last one freed."""
    if n <= SIZE_CLASS:
        return max(mmap.PAGESIZE, -(-n // mmap.PAGESIZE) * mmap.PAGESIZE)
    return -(-n // SIZE_CLASS) * SIZE_CLASS


class Slabs:
    """Page-aligned buffers, each its own anonymous mapping, reused by size class.

    `take(n)` gives a uint8 tensor of n bytes; when the last view of it is gone its mapping comes
    back here (a finalizer on the numpy array the tensor's storage keeps alive) and waits, up to
    `keep` bytes in all, oldest dropped first, for a take of its size class."""

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self.free: OrderedDict[int, list[mmap.mmap]] = OrderedDict()
        self.free_bytes = 0
        self.mapped = 0  # bytes of mappings alive: in use or free
        self.peak = 0
        self._lock = threading.Lock()
        # mappings handed back, not yet filed: a finalizer runs on any thread, even inside a
        # collection that an allocation under the lock started, so it only appends here
        self._returned: deque[tuple[mmap.mmap, int]] = deque()

    def take(self, n: int) -> torch.Tensor:
        size = _size_class(n)
        with self._lock:
            self._drain()
            kept = self.free.get(size)
            if kept:
                m = kept.pop()
                self.free_bytes -= size
                if not kept:
                    del self.free[size]
            else:
                m = None
        if m is None:
            m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            with self._lock:
                self.mapped += size
                self.peak = max(self.peak, self.mapped)
        arr = np.frombuffer(m, dtype=np.uint8)
        fin = weakref.finalize(arr, self._give, m, size)
        fin.atexit = False
        return torch.from_numpy(arr)[:n]

    def _give(self, m: mmap.mmap, size: int) -> None:
        self._returned.append((m, size))
        while self._returned and self._lock.acquire(blocking=False):  # else its holder files it
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        """Under the lock: the mappings handed back, filed by size class, the oldest unmapped past
        `keep` (its last reference dropped: unmapped once the array that held it is gone)."""
        while self._returned:
            m, size = self._returned.popleft()
            self.free.setdefault(size, []).append(m)
            self.free.move_to_end(size)
            self.free_bytes += size
            while self.free_bytes > self.keep:
                oldest, kept = next(iter(self.free.items()))
                kept.pop(0)
                self.free_bytes -= oldest
                self.mapped -= oldest
                if not kept:
                    del self.free[oldest]


_slabs: Slabs | None = None


def slabs() -> Slabs:
    global _slabs
    with _pool_lock:
        if _slabs is None:
            _slabs = Slabs()
        return _slabs


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="tensormerge-direct")
        return _pool


# ------------------------------------------------------------------ residency
_libc = None


def _mincore():
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
        _libc = libc
    return _libc


def resident_fraction(paths: list[str]) -> float | None:
    """The share of the files' bytes in the page cache (mincore on a mapping: maps, reads
    nothing), or None where it cannot be known."""
    try:
        libc = _mincore()
    except (OSError, AttributeError):
        return None
    page = mmap.PAGESIZE
    total = resident = 0
    for path in paths:
        try:
            size = os.path.getsize(path)
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            if size == 0:
                continue
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = -(-size // page)
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum()) * page
                total += pages * page
            finally:
                libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else 1.0
