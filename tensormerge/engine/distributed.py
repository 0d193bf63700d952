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
from tensormerge.errors import InputError, ParameterError, one_line, short

# ------------------------------------------------------------------ worker side
_OPEN: dict[str, tuple] = {}  # merge -> (stack, runner, writer): one merge per worker process at a time


_SWEEPS: dict[str, tuple] = {}  # sweep group -> (stack, SweepGroup): its candidates' runners and writers


def release() -> None:
    """Close what a worker holds for a merge (its inputs, the output shards) or a sweep group."""
    for stack, _, writer in _OPEN.values():
        writer.close()
        stack.close()
    _OPEN.clear()
    for stack, group in _SWEEPS.values():
        for m in group.members:
            m.runner.writer.close()
        stack.close()
    _SWEEPS.clear()


def _worker_runner(spec, fingerprint: str, threads: int | None):
    key = f"{fingerprint}|{spec!r}"  # the spec too: the output path and budget are not in the fingerprint
    if key in _OPEN:
        return _OPEN[key][1:]
    release()
    from tensormerge.engine.spec import open_plan, run_options
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


# ------------------------------------------------------------------ sweeps, worker side
def _worker_group(specs: list, fingerprints: list[str], indices: list[int], max_memory: int, threads: int | None):
    """The worker's copy of a sweep group: the same candidates, plans and common chunks."""
    key = repr((specs, fingerprints, indices, max_memory))
    if key in _SWEEPS:
        return _SWEEPS[key][1]
    release()
    from tensormerge.engine.spec import open_plan, run_options
    from tensormerge.engine.run import Runner, merge_fingerprint
    from tensormerge.engine.sweep import SweepGroup

    if threads:
        torch.set_num_threads(threads)
    stack = ExitStack()
    try:
        opened: dict = {}
        runners = []
        for spec, fingerprint in zip(specs, fingerprints):
            plan = open_plan(spec, stack, opened)
            runner = Runner(plan, run_options(spec, quiet=True))
            runner.writer = runner.make_writer()
            if merge_fingerprint(plan, runner.writer) != fingerprint:
                raise InputError(f"dask worker on {os.uname().nodename}: its inputs differ from the client's (same "
                                 f"paths, other files: the workers need the same storage or hub cache)")
            runner.writer.open_existing()
            stack.callback(runner.writer.close)
            runners.append(runner)
        group = SweepGroup(runners, max_memory, True, indices)
    except BaseException:
        stack.close()
        raise
    _SWEEPS[key] = (stack, group)
    return group


def _failures(group) -> dict[int, str]:
    out = {m.index: str(m.failed) for m in group.members if m.failed is not None}
    for m in group.members:
        m.failed = None  # the client decides; a cached group starts each task clean
    return out


def sweep_pass_task(ctx: tuple, members: dict[int, tuple[int, dict]], sample: float, needs_inputs: bool,
                    names: list[str]) -> tuple[dict, dict]:
    group = _worker_group(*ctx)
    chosen = []
    for m in group.members:
        if m.index in members:
            stage, state = members[m.index]
            m.state = state
            chosen.append((m, m.runner.plan.method.passes(m.runner.plan.params)[stage]))
    folded: dict[int, dict[str, Any]] = {}

    def take(m, sb, partials: list, last: bool) -> None:
        per = folded.setdefault(m.index, {})
        for p in partials:
            per[sb.name] = _fold(per.get(sb.name), p)

    group.map_blocks(chosen, sample, needs_inputs, set(names), take)
    return folded, _failures(group)


def sweep_merge_task(ctx: tuple, states: dict[int, dict], skips: dict[int, set], names: list[str]):
    from tensormerge.engine.provenance import ContentHashes
    from tensormerge.engine.run import BlockStats

    group = _worker_group(*ctx)
    records: dict[int, list] = {}
    group.content = ContentHashes()  # this task's input rows, for the client's content digests
    todo = []
    for m in group.members:
        if m.index not in states:
            continue
        r = m.runner
        m.state = states[m.index]
        r.done = skips[m.index]
        r.stats = {b.name: BlockStats() for b in r.plan.blocks}
        r.prepared = {}
        r.content = group.content
        r.extras = r.plan.method.start_extras(r.plan.params)
        r.record = lambda b, r0, r1, crc, nbytes, extras, i=m.index: records.setdefault(i, []).append(
            (b.name, r0, r1, crc, nbytes, extras))
        todo.append(m)
    group.merge_blocks(todo, set(names))
    stats = {}
    for m in todo:
        m.runner.writer.sync()  # on shared storage, durable before the client records it
        stats[m.index] = {n: (s.seconds, s.bytes_read, s.bytes_written, s.chunks)
                          for n, s in m.runner.stats.items() if s.chunks}
    return records, stats, group.content.ranges, _failures(group)


# ------------------------------------------------------------------ client side
def connect(workers: int | None, scheduler: str | None, gpu: bool, memory_limit: int | str = "auto"):
    """(client, local cluster or None): a local cluster of `workers` processes, or the cluster at
    `scheduler`; `merge --workers` and `stats compute --workers` alike. What answers at the
    address is a stranger: anything but a dask scheduler fails in one line, whatever dask raised
    (a web server's reply read as a frame length asked for exabytes)."""
    if workers is not None and scheduler:
        raise ParameterError("--workers and --scheduler: give one (a local cluster, or an existing one)")
    if workers is not None and workers < 1:
        raise ParameterError(f"--workers: {workers} is not a positive number of worker processes")
    cores = os.cpu_count() or 1
    most = max(8, 4 * cores)  # each process holds a torch and up to --max-memory: 1000 of them sank a 2-core VM
    if workers is not None and workers > most:
        raise ParameterError(f"--workers: {workers} worker processes on this machine's {cores} cores; at most "
                             f"{most} (for more, start a cluster and give --scheduler)")
    from distributed import Client, LocalCluster

    if not scheduler:
        # CRITICAL: a task's error is tensormerge's one line, raised again here from the task;
        # dask's worker logged it first with its traceback at ERROR
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               scheduler_kwargs={"dashboard": False}, memory_limit=memory_limit,
                               resources={"GPU": 1} if gpu else None, silence_logs=logging.CRITICAL)
        try:
            return _quiet(Client(cluster)), cluster
        except BaseException:
            cluster.close()
            raise
    try:
        return _quiet(Client(scheduler, timeout=DASK_CONNECT_TIMEOUT)), None
    except (Exception, MemoryError) as e:  # noqa: BLE001 - see the docstring
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else str(e)
        raise ParameterError(f"--scheduler {short(scheduler)}: cannot connect to a dask scheduler there "
                             f"({one_line(reason, 160)})") from None


def _quiet(client):
    """The client, its event loop no longer printing "Task exception was never retrieved" for
    the waits a gather leaves behind when Ctrl-C or a failed task stops it (dask's AllExit,
    its internal signal to stop waiting): the user gets tensormerge's one line."""
    from distributed.client import AllExit

    def handler(loop, context):
        if not isinstance(context.get("exception"), AllExit):
            loop.default_exception_handler(context)

    with contextlib.suppress(AttributeError):  # the loop's attribute is dask's, not a promise
        client.loop.asyncio_loop.set_exception_handler(handler)
    return client


class DaskExecutor:
    def __init__(self, spec, workers: int | None, scheduler: str | None, max_memory: int, device: str):
        self.spec = spec
        self.gpu = device.startswith("cuda")
        self.threads = None if scheduler else max(1, (os.cpu_count() or 1) // max(1, workers or 1))
        self.client, self.cluster = connect(workers, scheduler, self.gpu, max_memory + DASK_WORKER_OVERHEAD)
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
        blocks = runner.plan.pass_blocks(gpass)
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
        # the rows the workers' chunks read, counted as the local executor counts them (a sample
        # rounds each chunk up; a folding pass skips the blocks merged in one chunk)
        runner.passes_report.append({"name": gpass.name, "seconds": time.perf_counter() - t0,
                                     "bytes_read": runner._pass_bytes(gpass)})

    # ------------------------------------------------------------------ sweeps
    def _sweep_ctx(self, group) -> tuple:
        specs = [self.sweep_specs[m.index] for m in group.members]
        return (specs, [m.runner.fingerprint for m in group.members], [m.index for m in group.members],
                group.executor.budget.cap, self.threads)

    def sweep_pass(self, group, members: list, sample: float, needs_inputs: bool) -> tuple[int, dict]:
        """The members' passes on the workers, runs of whole blocks each; their partials folded
        per block (exact integer sums), reduced by the client in plan order."""
        ctx = self._sweep_ctx(group)
        stages = {}
        for m, gpass in members:
            names = [p.name for p in m.runner.plan.method.passes(m.runner.plan.params)]
            stages[m.index] = (names.index(gpass.name), m.state)
        blocks = [sb.members[0] for sb in group.blocks if sb.members[0].kind == "merge"]
        futures = [self._submit(sweep_pass_task, ctx, stages, sample, needs_inputs, names)
                   for names in self.groups(blocks)]
        folded: dict[int, dict] = {}
        for part, failed in self.client.gather(futures):
            for idx, per in part.items():
                folded.setdefault(idx, {}).update(per)
            self._sweep_failures(group, failed)
        who = [m for m, _ in members]  # the chunks sweep.map_blocks would read here, counted as it counts them
        return sum(t.read_bytes for t in group._tasks(lambda i, r0, r1: who, sample, merge_only=True)), folded

    def sweep_merge(self, group, todo: list) -> None:
        from distributed import as_completed

        ctx = self._sweep_ctx(group)
        by_index = {m.index: m for m in todo}
        states = {m.index: m.state for m in todo}
        skips = {m.index: set(m.runner.done) for m in todo}
        lead = todo[0].runner.plan if todo else None
        if lead is None:
            return
        blocks = [b for b in lead.blocks]
        futures = [self._submit(sweep_merge_task, ctx, states, skips, names) for names in self.groups(blocks)]
        new: dict[int, dict] = {}
        for fut in as_completed(futures):
            records, stats, content, failed = fut.result()
            group.content.update(content)
            self._sweep_failures(group, failed)
            for idx, recs in records.items():
                r = by_index[idx].runner
                for name, r0, r1, crc, nbytes, extras in recs:
                    r.manifest.record_chunk(name, r0, r1, crc, nbytes, extras)
                    r.stats[name].crcs[r0] = (crc, nbytes)
                    new.setdefault(idx, {})[(name, r0, r1)] = extras
            for idx, per in stats.items():
                for name, (seconds, read, written, chunks) in per.items():
                    st = by_index[idx].runner.stats[name]
                    st.seconds, st.bytes_read, st.bytes_written, st.chunks = seconds, read, written, chunks
        for m in todo:  # extras in plan order, as the local executor folds them
            r = m.runner
            extras = r.plan.method.start_extras(r.plan.params)
            for b in r.plan.blocks:
                for r0, r1 in b.chunks:
                    chunk = r.done.get((b.name, r0, r1))
                    for extra in new.get(m.index, {}).get((b.name, r0, r1), []) if chunk is None else chunk:
                        extras = r.plan.method.add_extra(extras, extra)
            r.extras = extras

    @staticmethod
    def _sweep_failures(group, failed: dict[int, str]) -> None:
        from tensormerge.errors import InputError as Failed

        for m in group.members:
            if m.index in failed and m.failed is None:
                group._fail(m, Failed(failed[m.index]))

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


def run_sweep_on_cluster(spec, specs: list, runners: list, max_memory: int, stack: ExitStack, log) -> list:
    """A sweep whose groups read and merge on a dask cluster (--workers / --scheduler)."""
    from tensormerge.engine.sweep import run_sweep

    ex = DaskExecutor(spec, spec.workers, spec.scheduler, max_memory, spec.device or "cpu")
    stack.callback(ex.close)
    ex.sweep_specs = specs
    return run_sweep(runners, max_memory, spec.quiet, log, cluster=ex)
