"""Crash points for the resume tests: the process kills itself (SIGKILL) at a named point.

`TENSORMERGE_CRASH_AT=point:n` makes the n-th arrival at `point` (1-based) a SIGKILL, so a
test can stop a real merge inside a global pass, between the bytes of a chunk and its manifest
record, at a shard boundary or between the renames of the finish, every time at the same
place; with `TENSORMERGE_CRASH_ONCE=PATH` only the first process to get there dies, so one
dask worker is lost and the others (and its restarted self) go on. Unset (always, outside
tests), `hit` is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "TENSORMERGE_CRASH_AT"
ONCE = "TENSORMERGE_CRASH_ONCE"  # a path: only the process that creates it dies (one dask worker)

_counts: dict[str, int] = {}
_lock = threading.Lock()


def hit(point: str) -> None:
    raw = os.environ.get(ENV)  # read at each hit: the test CLI server forks after importing this
    if not raw:
        return
    name, _, n = raw.partition(":")
    if name != point:
        return
    with _lock:
        _counts[point] = _counts.get(point, 0) + 1
        if _counts[point] != int(n or 1):
            return
        once = os.environ.get(ONCE)
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)
