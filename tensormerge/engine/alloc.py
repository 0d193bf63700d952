"""Keep freed tensor buffers in the process for reuse instead of returning them to the kernel.

Every chunk allocates read and output buffers of the same few sizes. glibc returns large freed
blocks to the kernel (mmap threshold, heap trimming), so each new buffer is page-faulted and
zeroed again: on a 2-core VM that made reads from the page cache run at 0.7 GB/s instead of 4.
Raising the mmap threshold to its 32 MiB ceiling and the trim threshold keeps buffers below
`PIECE_BYTES` on the heap, where they are reused warm. Peak memory is still bounded by the
budget; only the release of memory to the OS is deferred to process exit.

That holds for the main arena only. The reader, compute and writer threads allocate from
per-thread arenas, whose 64 MiB heaps glibc (2.36) unmaps as soon as one is wholly free, whatever
the trim threshold: a 24 MiB buffer there was fresh pages nearly every time (4.3 million page
faults, a third of a TIES sweep's CPU time on 1.1B). One arena for every thread keeps them warm;
the threads allocate a few large buffers per chunk, so they hardly contend for its lock.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_done = False


def keep_freed_buffers() -> bool:
    """Tune glibc malloc once per process; a no-op elsewhere. Returns whether it applied."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok
        ok = libc.mallopt(_M_ARENA_MAX, 1) == 1 and ok  # before the engine's threads first allocate
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok
