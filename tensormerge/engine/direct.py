"""Reads past the page cache (O_DIRECT) for inputs that are not in it.

A cold read through the page cache makes the kernel allocate, fill and copy every page: on a
2-core VM that kept 0.4-0.95 of a core busy for 8.8 GB (`benchmarks/read_paths.py`), the core a
merge needs for its own arithmetic; read directly into the merge's buffers the same bytes cost
0.4 CPU-seconds in all. A warm cache is still read through (memory is faster than any disk), so
the choice is made per checkpoint from how much of its files is resident (mincore), once, when
it is first read. `TENSORMERGE_IO=buffered|direct|auto` (default auto) overrides it; a file
system without O_DIRECT (tmpfs) is read buffered.

Direct reads must start, end and land on block boundaries: each read covers the aligned span
around the rows asked for, in a buffer aligned to ALIGN, and returns a view of the rows; a span
over PART is read in parts at once on a small pool, so the disk has several requests in flight
without the kernel's readahead. The bytes are the file's either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from tensormerge.errors import InputError, ParameterError

ALIGN = 4096  # the largest logical block size of common disks; a multiple of the others
PART = 8 * 1024 * 1024  # one request of a direct read; parts of one read are in flight together
THREADS = 16  # parts in flight, over every read at once (a chunk's models, READ_AHEAD chunks)
SIZE_CLASS = 1024 * 1024
RESIDENT = 0.5  # auto: below this share of a checkpoint's bytes in the page cache, read it directly
ENV = "TENSORMERGE_IO"
POLICIES = ("auto", "buffered", "direct")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


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
    """`nbytes` bytes of the file at `pos`, as a uint8 view into an aligned buffer (at most
    2 * ALIGN larger than asked)."""
    a0 = pos - pos % ALIGN
    span = -(-(pos + nbytes - a0) // ALIGN) * ALIGN
    raw = torch.empty(_size_class(span + ALIGN), dtype=torch.uint8)
    shift = -raw.data_ptr() % ALIGN
    view = memoryview(raw[shift:shift + span].numpy()).cast("B")
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

    got = [one(parts[0])] if len(parts) == 1 else list(_threads().map(one, parts))
    need = pos + nbytes - a0
    if any(s + n < min(e, need) for (s, e), n in zip(parts, got) if s < need):
        raise InputError(f"{path}: tensor {name!r}: file ended early (truncated shard)")
    start = shift + pos - a0
    return raw[start:start + nbytes]


def _size_class(n: int) -> int:
    """Buffers rounded up to a multiple of SIZE_CLASS: a direct read's span depends on where its
    rows lie against block boundaries, and a heap kept for reuse (engine/alloc.py) holding buffers
    of many nearby sizes fits few of them again; rounded, a chunk's buffers are reused."""
    return n if n <= SIZE_CLASS else -(-n // SIZE_CLASS) * SIZE_CLASS


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
