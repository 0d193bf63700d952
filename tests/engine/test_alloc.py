"""engine/alloc: every thread allocates from the one tuned arena.

glibc gives each new thread that allocates an arena of its own, and unmaps a per-thread arena's
heap as soon as it is wholly free, whatever the trim threshold: the reader's and the workers'
chunk buffers were fresh pages nearly every time (4.3 million page faults in a TIES sweep of
1.1B, a third of its CPU time). Counted with glibc's own `malloc_stats` (one "Arena N:" block
per arena), so the test checks the setting's effect, not a timing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, sys, threading
import torch
if sys.argv[1] == "1":
    from tensormerge.engine.alloc import keep_freed_buffers
    assert keep_freed_buffers()
held, ready = [], threading.Barrier(4)
def work():
    held.append(torch.empty(1 << 20, dtype=torch.uint8))  # a buffer each, held at once
    ready.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
ctypes.CDLL("libc.so.6").malloc_stats()
"""


def _arenas(tuned: bool) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}  # glibc's own, as the user may set it
    out = subprocess.run([sys.executable, "-c", SCRIPT, "1" if tuned else "0"], capture_output=True, text=True,
                         check=True, env=env)
    return sum(line.startswith("Arena ") for line in out.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_every_thread_allocates_from_one_arena():
    untuned = _arenas(False)
    if untuned == 0:
        pytest.skip("malloc_stats printed no arenas (not glibc)")
    assert untuned > 1  # the case under test: threads get arenas of their own
    assert _arenas(True) == 1
