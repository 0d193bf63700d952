"""A few threads for the pieces of one large block that would otherwise run on one core.

The engine merges a chunk's sub-chunks on its own pool; a block that must be taken whole (a
magnitude top-k over the whole tensor, a per-tensor reduction folded into the merge) is one
piece there, so its independent parts (per model, per row range) are spread here. Every part's
result is placed by its index, so the bytes never depend on the number of threads."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_local = threading.local()


def workers() -> int:
    return max(1, os.cpu_count() or 1)


def pmap(fn, items: list) -> list:
    """[fn(x) for x in items], on the pool when there are several items and more than one core;
    in order. Called from one of the pool's own threads it runs inline (no nested waits)."""
    global _pool
    if len(items) <= 1 or workers() == 1 or getattr(_local, "inside", False):
        return [fn(x) for x in items]
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(workers(), thread_name_prefix="tensormerge-block",
                                       initializer=lambda: setattr(_local, "inside", True))
    return list(_pool.map(fn, items))


def ranges(n: int, least: int) -> list[tuple[int, int]]:
    """[0, n) in up to workers() ranges of at least `least` items each."""
    parts = max(1, min(workers(), n // max(least, 1)))
    step = -(-n // parts)
    return [(s, min(s + step, n)) for s in range(0, n, step)] or [(0, 0)]
