"""The local executor's pipeline: chunks computed and written in order however far it reads
ahead, the byte budget and the read-ahead cap never passed, several chunks read at once where
asked (direct reads), and an error in any stage raised, with no read still running after the
run returns."""

from __future__ import annotations

import threading
import time

import pytest

from tensormerge.engine import executor
from tensormerge.engine.executor import LocalExecutor, Task


def _readers() -> list[threading.Thread]:
    """The executor's reader thread and its read-ahead pool, if any is still alive."""
    return [t for t in threading.enumerate() if t.name == "tensormerge-read" or t.name.startswith("tensormerge-read_")]


def _tasks(n: int, nbytes: int = 10):
    return [Task(i, nbytes, 0, nbytes) for i in range(n)]


class _Reads:
    """A read that sleeps a little (as a disk would), counting how many run at once."""

    def __init__(self, fail_at: int | None = None):
        self.lock = threading.Lock()
        self.now = self.most = 0
        self.running_after: list[int] = []
        self.fail_at = fail_at

    def __call__(self, task: Task):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.01 * (1 + task.key % 3))  # later chunks may finish first
            if task.key == self.fail_at:
                raise OSError(f"chunk {task.key}: read failed")
            return task.key * 2
        finally:
            with self.lock:
                self.now -= 1


@pytest.mark.parametrize("ahead", [0, 35, 1000])
def test_chunks_are_computed_and_written_in_order_at_any_depth(ahead):
    reads, computed, written = _Reads(), [], []
    ex = LocalExecutor(max_memory=1000)
    ex.run(_tasks(30), reads, lambda t, d: (computed.append((t.key, d)), d + 1)[1],
           write=lambda t, r: written.append((t.key, r)), ahead=ahead)
    assert computed == [(i, 2 * i) for i in range(30)]
    assert written == [(i, 2 * i + 1) for i in range(30)]
    assert ex.budget.used == 0
    assert reads.most == {0: 1, 35: 3, 1000: executor.AHEAD_THREADS}[ahead]  # 35 bytes: three 10-byte reads


def test_reads_at_depth_stay_within_the_budget():
    """Each chunk reserves its bytes before its read starts: with room for two chunks, never
    more than two are held, however deep the read-ahead."""
    reads = _Reads()
    ex = LocalExecutor(max_memory=45)  # a chunk holds 20 (read 10 + out 10)
    ex.run(_tasks(20), reads, lambda t, d: d, write=lambda t, r: time.sleep(0.005), ahead=1000)
    assert ex.budget.peak <= 45 and ex.budget.used == 0
    assert reads.most <= 2


@pytest.mark.parametrize("ahead", [0, 30])
def test_a_failed_read_is_raised_and_no_read_outlives_the_run(ahead):
    reads, computed = _Reads(fail_at=7), []
    ex = LocalExecutor(max_memory=1000)
    with pytest.raises(OSError, match="chunk 7: read failed"):
        ex.run(_tasks(40), reads, lambda t, d: computed.append(t.key), ahead=ahead)
    assert computed == list(range(7))  # in order, up to the failed chunk
    assert reads.now == 0  # every read had finished (or never started) when run returned
    assert not _readers()


def test_a_failed_compute_stops_the_reads():
    reads = _Reads()

    def compute(task, data):
        if task.key == 5:
            raise ValueError("chunk 5: bad values")
        return data

    with pytest.raises(ValueError, match="chunk 5"):
        LocalExecutor(max_memory=1000).run(_tasks(200), reads, compute, ahead=30)
    assert reads.now == 0
    assert not _readers()


class _Buf:
    """A chunk's data or output, weakly referenced by the test."""


@pytest.mark.parametrize("ahead", [0, 30])
def test_a_chunk_is_not_held_past_its_compute(ahead):
    """The budget releases a chunk's bytes once it is computed, and the reader then reserves
    and allocates the next: nothing in the pipeline may keep the computed chunk alive while
    the next is awaited (a Future keeps its result; a loop variable keeps the last item), or
    memory passes the budget. Each read checks, by weak reference, that the last computed
    chunk's data is gone."""
    import weakref

    datas: dict[int, weakref.ref] = {}
    finished: list[int] = []
    held: list[int] = []

    def read(task):
        if finished:
            c = finished[-1]
            deadline = time.monotonic() + 0.2  # the main thread drops it right after compute returns
            while datas[c]() is not None and time.monotonic() < deadline:
                time.sleep(0.001)
            if datas[c]() is not None:
                held.append(c)
        time.sleep(0.005)
        b = _Buf()
        datas[task.key] = weakref.ref(b)
        return b

    def compute(task, data):
        finished.append(task.key)
        return _Buf()

    # room for two chunks: the reader waits for a compute to release one, then reads at once
    LocalExecutor(max_memory=40).run(_tasks(25), read, compute, write=lambda t, r: None, ahead=ahead)
    assert len(finished) == 25 and not held, f"computed chunks {held} still held while the next was read"
