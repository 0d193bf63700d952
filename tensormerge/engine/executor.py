"""Runs a sequence of chunk tasks as a three-stage pipeline: read ahead, compute, write behind.

Reads (positioned reads, GIL released) and writes (pwrite) overlap with compute (torch's
intra-op threads). Memory is counted in bytes: before reading a chunk the reader reserves
everything the chunk will hold (its reads, intermediates and output) and waits while that plus
what the other stages hold would pass the budget, so the budget bounds what is in flight. The
compute and write stages never wait on the budget, so the pipeline cannot deadlock: when the
reader waits, the others are draining.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

_DONE = object()


AHEAD_THREADS = 8  # chunks read at once at most, however small (`ahead`)


class ByteBudget:
    def __init__(self, cap: int):
        self.cap = cap
        self.used = 0
        self.peak = 0
        self._cv = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> None:
        with self._cv:
            while self.used > 0 and self.used + n > self.cap and not stop.is_set():
                self._cv.wait(0.1)
            self.used += n
            self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


@dataclass
class Task:
    """One chunk: what to read, and the bytes each stage holds for it."""

    key: Any
    read_bytes: int
    work_bytes: int
    out_bytes: int


class LocalExecutor:
    """One reader thread ahead, compute on the calling thread, one writer thread behind."""

    def __init__(self, max_memory: int):
        self.budget = ByteBudget(max_memory)

    def run(self, tasks: Iterable[Task], read: Callable[[Task], Any], compute: Callable[[Task, Any], Any],
            write: Callable[[Task, Any], None] | None = None,
            collect: Callable[[Task, Any], None] | None = None, ahead: int = 0) -> None:
        """read -> compute -> (write on the writer thread | collect on this thread), in task order.
        `ahead` > 0: chunks read at once on threads of their own, as long as the reads not yet
        computed hold less than `ahead` bytes (reads that wait on a disk alone, with no kernel
        readahead behind them, need that many bytes in flight); each chunk is reserved from the
        budget before its read starts, and computed in order. 0: one chunk read at a time."""
        stop = threading.Event()
        errors: list[BaseException] = []
        inbox: queue.Queue = queue.Queue(maxsize=1 if not ahead else 0)  # ahead: bounded by bytes
        outbox: queue.Queue = queue.Queue(maxsize=1)
        pending = ByteBudget(ahead)  # bytes read ahead, not yet computed (one chunk always may)

        def reader() -> None:
            pool = ThreadPoolExecutor(AHEAD_THREADS, thread_name_prefix="tensormerge-read") if ahead else None
            try:
                for task in tasks:
                    if stop.is_set():
                        return
                    self.budget.acquire(task.read_bytes + task.work_bytes + task.out_bytes, stop)
                    if pool is None:
                        data = read(task)
                    else:
                        pending.acquire(task.read_bytes, stop)
                        data = pool.submit(read, task)
                    _put(inbox, (task, data), stop)
                    del data  # (a Future keeps its result) the next chunk may wait on the budget
            except BaseException as e:  # handed to the main thread, re-raised there
                errors.append(e)
                stop.set()
            finally:
                if pool is not None:  # no read outlives the run (its files are closed after)
                    pool.shutdown(wait=True, cancel_futures=stop.is_set())
                _put(inbox, _DONE, stop, force=True)

        def writer() -> None:
            try:
                while True:
                    item = outbox.get()
                    if item is _DONE:
                        return
                    task, result = item
                    del item
                    if not stop.is_set():
                        write(task, result)
                    del result  # released below: not held while the next chunk is awaited
                    self.budget.release(task.out_bytes)
            except BaseException as e:
                errors.append(e)
                stop.set()
                while outbox.get() is not _DONE:  # drain so the main thread never blocks
                    pass

        threads = [threading.Thread(target=reader, daemon=True, name="tensormerge-read")]
        if write is not None:
            threads.append(threading.Thread(target=writer, daemon=True, name="tensormerge-write"))
        for t in threads:
            t.start()
        try:
            while True:
                item = inbox.get()
                if item is _DONE or stop.is_set():
                    break
                task, data = item
                del item  # a Future keeps its result: the chunk's buffers, past their compute
                if isinstance(data, Future):
                    try:
                        data = data.result()
                    finally:
                        pending.release(task.read_bytes)
                result = compute(task, data)
                del data
                self.budget.release(task.read_bytes + task.work_bytes)
                if write is not None:
                    outbox.put((task, result))
                else:
                    self.budget.release(task.out_bytes)
                    if collect is not None:
                        collect(task, result)
                del result  # the writer's now: not held here while the next chunk is awaited
        except BaseException:
            stop.set()
            raise
        finally:
            if write is not None:
                outbox.put(_DONE)
            while threads[0].is_alive():
                try:
                    inbox.get(timeout=0.05)
                except queue.Empty:
                    pass
            for t in threads:
                t.join()
        if errors:
            raise errors[0]


def _put(q: queue.Queue, item: Any, stop: threading.Event, force: bool = False) -> None:
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set() and not force:
                return
