"""DaskExecutor: the same merge on a dask.distributed cluster.

Tasks carry the merge spec (paths and parameters), the names of the blocks to do and the small
state of the global passes, never tensors. Each worker process opens the inputs and statistics
itself (once per merge, cached), checks that it sees the same files as the client (the merge
fingerprint), and writes its blocks at their offsets in the client's pre-laid-out
`OUT.partial`. Global passes are map-reduce: a worker folds each block's partials (histograms
and counts, integer sums, so folding is exact) and the client reduces the blocks in plan order,
as the local executor does. The client records each returned chunk in the resume manifest,
folds extras in plan order and finishes. A task is a run of whole blocks, so per-block state
(RegMean's factorisation, a CG solve) never crosses workers, and a task lost with its worker
is rerun elsewhere by dask: its writes land at the same offsets with the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from contextlib import ExitStack
from typing import Any

import torch

from tensormerge.constants import (
    DASK_CONNECT_TIMEOUT,
    DASK_TASK_BYTES,
    DASK_WORKER_OVERHEAD,
)
from tensormerge.engine.plan import Block
from tensormerge.errors import InputError, ParameterError

# ------------------------------------------------------------------ worker side
_OPEN: dict[str, tuple] = {}  # merge -> (stack, runner, writer): one merge per worker process at a time


def release() -> None:
    """Close what a worker holds for a merge (its inputs, the output shards)."""
    for stack, _, writer in _OPEN.values():
        writer.close()
        stack.close()
    _OPEN.clear()


def _worker_runner(spec, fingerprint: str, threads: int | None):
    key = f"{fingerprint}|{spec!r}"  # the spec too: the output path and budget are not in the fingerprint
    if key in _OPEN:
        return _OPEN[key][1:]
    release()
    from tensormerge.api import open_plan, run_options
    from tensormerge.engine.run import Runner, merge_fingerprint

    if threads:
        torch.set_num_threads(threads)
    stack = ExitStack()
    try:
        plan = open_plan(spec, stack)
        runner = Runner(plan, run_options(spec, quiet=True))
        writer = runner.make_writer()
        if merge_fingerprint(plan, writer) != fingerprint:
            raise InputError(f"dask worker on {os.uname().nodename}: its inputs differ from the client's (same paths, "
                             f"other files: the workers need the same storage or hub cache)")
        writer.open_existing()
    except BaseException:
        stack.close()
        raise
    _OPEN[key] = (stack, runner, writer)
    return runner, writer


def _fold(a: Any, b: Any) -> Any:
    """Sum of two partials of one block, leaf by leaf (tensors, ints; None stays None)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):
        return tuple(_fold(x, y) for x, y in zip(a, b))
    return a + b


def pass_task(spec, fingerprint: str, index: int, names: list[str], state: dict, threads: int | None) -> dict:
    runner, _ = _worker_runner(spec, fingerprint, threads)
    gpass = runner.plan.method.passes(runner.plan.params)[index]
    folded: dict[str, Any] = {}

    def take(b: Block, partials: list, last: bool) -> None:
        for p in partials:
            folded[b.name] = _fold(folded.get(b.name), p)

    runner.pass_blocks(gpass, state, [runner.plan.block(n) for n in names], take)
    return folded


def merge_task(spec, fingerprint: str, names: list[str], state: dict, skip: set, threads: int | None):
    from tensormerge.engine.provenance import ContentHashes
    from tensormerge.engine.run import BlockStats

    runner, writer = _worker_runner(spec, fingerprint, threads)
    blocks = [runner.plan.block(n) for n in names]
    records: list[tuple] = []
    runner.record = lambda b, r0, r1, crc, nbytes, extras: records.append((b.name, r0, r1, crc, nbytes, extras))
    runner.done = skip
    runner.stats = {b.name: BlockStats() for b in blocks}
    runner.prepared = {}
    runner.content = ContentHashes()  # this task's input rows, for the client's content digests
    runner.run_merge(writer, state, blocks)
    writer.sync()  # on shared storage, durable before the client records it
    return (records, {n: (s.seconds, s.bytes_read, s.bytes_written, s.chunks) for n, s in runner.stats.items()},
            runner.content.ranges)


# ------------------------------------------------------------------ client side
class DaskExecutor:
    def __init__(self, spec, workers: int | None, scheduler: str | None, max_memory: int, device: str):
        if workers is not None and scheduler:
            raise ParameterError("--workers and --scheduler: give one (a local cluster, or an existing one)")
        if workers is not None and workers < 1:
            raise ParameterError(f"--workers: {workers} is not a positive number of worker processes")
        from distributed import Client, LocalCluster

        self.spec = spec
        self.cluster = None
        self.gpu = device.startswith("cuda")
        self.threads = None
        try:
            if scheduler:
                self.client = Client(scheduler, timeout=DASK_CONNECT_TIMEOUT)
            else:
                self.threads = max(1, (os.cpu_count() or 1) // workers)
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            dashboard_address=":0", scheduler_kwargs={"dashboard": False},
                                            memory_limit=max_memory + DASK_WORKER_OVERHEAD,
                                            resources={"GPU": 1} if self.gpu else None,
                                            silence_logs=logging.ERROR)
                self.client = Client(self.cluster)
        except OSError as e:
            self.close()
            raise ParameterError(f"--scheduler {scheduler}: cannot connect ({e})") from None
        self.resources = {"GPU": 1} if self.gpu else None

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None and self.cluster is None:
            with contextlib.suppress(Exception):  # workers of a shared cluster let go of this merge's files
                client.run(release)
        for x in (client, self.cluster):
            if x is not None:
                x.close()

    @staticmethod
    def groups(blocks: list[Block]) -> list[list[str]]:
        """Runs of whole blocks of about DASK_TASK_BYTES of reads each, in plan order."""
        out: list[list[str]] = []
        size = DASK_TASK_BYTES
        for b in blocks:
            if size >= DASK_TASK_BYTES:
                out.append([])
                size = 0
            out[-1].append(b.name)
            size += b.read_bytes_per_row * b.rows
        return out

    def _submit(self, fn, *args) -> Any:
        return self.client.submit(fn, *args, pure=False, resources=self.resources)

    def run_pass(self, runner, index: int, gpass, state: dict) -> None:
        t0 = time.perf_counter()
        blocks = runner.plan.merge_blocks
        futures = [self._submit(pass_task, self.spec, runner.fingerprint, index, names, state, self.threads)
                   for names in self.groups(blocks)]
        folded: dict[str, Any] = {}
        for part in self.client.gather(futures):
            folded.update(part)
        acc = gpass.start(state)
        for b in blocks:
            if b.name in folded:
                acc = gpass.reduce(acc, folded[b.name], b.name)
            acc = gpass.end_block(acc, b.name, b.numel)
        gpass.finish(acc, state)
        runner.passes_report.append({"name": gpass.name, "seconds": time.perf_counter() - t0,
                                     "bytes_read": int(gpass.sample * runner.plan.bytes_read_pass)})

    def run_merge(self, runner, state: dict) -> Any:
        from distributed import as_completed

        plan = runner.plan
        todo = [b for b in plan.blocks if any((b.name, r0, r1) not in runner.done for r0, r1 in b.chunks)]
        skip = set(runner.done)
        futures = [self._submit(merge_task, self.spec, runner.fingerprint, names, state, skip, self.threads)
                   for names in self.groups(todo)]
        new: dict[tuple[str, int, int], list] = {}
        for fut in as_completed(futures):
            records, stats, content = fut.result()
            runner.content.update(content)
            for name, r0, r1, crc, nbytes, extras in records:
                runner.manifest.record_chunk(name, r0, r1, crc, nbytes, extras)
                runner.stats[name].crcs[r0] = (crc, nbytes)
                new[(name, r0, r1)] = extras
            for name, (seconds, read, written, chunks) in stats.items():
                st = runner.stats[name]
                st.seconds, st.bytes_read, st.bytes_written, st.chunks = seconds, read, written, chunks
        extras = plan.method.start_extras(plan.params)
        for b in plan.blocks:  # plan order, as the local executor folds them
            for r0, r1 in b.chunks:
                chunk = runner.done.get((b.name, r0, r1))
                for extra in new.get((b.name, r0, r1), []) if chunk is None else chunk:
                    extras = plan.method.add_extra(extras, extra)
        return extras
