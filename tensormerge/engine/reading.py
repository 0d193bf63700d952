"""A chunk's rows as a method sees them: the inputs' rows, the statistics, the extra
checkpoints, a Conv1D weight turned to the layout its Grams describe, on the device.

What to read and in what order is the engine's (`Runner`, `sweep`); this is how one chunk is
read, for a run's own chunks and, shared, for every candidate of a sweep.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from tensormerge.constants import ROW_KINDS
from tensormerge.engine import direct
from tensormerge.engine.plan import Block, MergePlan
from tensormerge.engine.provenance import ContentHashes
from tensormerge.errors import InputError
from tensormerge.methods.base import BlockData
from tensormerge.stats.bind import check_gram


# Bytes the executor reads ahead on threads of its own when the inputs are read directly (its
# `ahead`); 0 turns it off. On this VM's disk a direct read ran at 0.9 GB/s with 32-128 MiB in
# flight and 1.4-1.8 GB/s with 256-512 MiB. Every chunk read ahead is reserved from the budget
# first, and its buffers are mappings of their own (engine/direct.py's Slabs): allocated by malloc
# on several threads at once they fragmented its arena to 2.3-3.6 GB under --max-memory 1GiB.
READ_AHEAD = 256 * 1024 * 1024
READERS = 8  # models of one chunk read directly at once: more requests in flight, same bytes


class ChunkReader:
    def __init__(self, plan: MergePlan, ops, device: torch.device):
        self.plan = plan
        self.ops = ops  # the kernels the chunk's BlockData carries to the method
        self.device = device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # what direct reads read ahead and keep for reuse, beside the budget, is a share of it
        self.ahead = min(READ_AHEAD, plan.max_memory // 4)
        direct.slabs().keep = min(direct.KEEP, plan.max_memory // 4)

    def read_ahead(self) -> int:
        """Bytes the executor reads ahead at once: none beyond a chunk through the page cache (the
        kernel reads ahead), READ_AHEAD (at most a quarter of the budget) where the inputs are
        read directly: then the reads themselves must keep the disk busy."""
        return self.ahead if any(ck.reads_directly for ck in self.plan.checkpoints) else 0

    def reads_base(self, b: Block) -> bool:
        plan = self.plan
        return plan.base is not None and (plan.method.requires_base(plan.params) or b.kind == "copy")

    def read_rows(self, b: Block, r0: int, r1: int, inputs_too: bool = True, content: ContentHashes | None = None,
                  base_too: bool | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The rows of every input (and of the base, when the method reads it) as stored; their
        crc32s into `content` (the provenance's content digests) when given."""
        plan = self.plan
        if not inputs_too or b.kind == "derived":  # derived: computed by b.produce, from its own reads
            return [], None
        n = len(plan.inputs)
        jobs = [(plan.checkpoints[i], b.reads[i]) for i in range(n)]
        if self.reads_base(b) if base_too is None else base_too:
            jobs.append((plan.base, b.reads[n]))
        if len(jobs) > 1 and all(ck.reads_directly for ck, _ in jobs):
            # every read waited for, even past a failed one: none outlives the run's open files
            reads = [_readers().submit(ck.read, name, r0, r1) for ck, name in jobs]
            wait(reads)
            rows = [f.result() for f in reads]
        else:
            rows = [ck.read(name, r0, r1) for ck, name in jobs]
        inputs, base = rows[:n], (rows[n] if len(rows) > n else None)
        if content is not None:  # before the bytes are transposed or sent to a device
            for i, x in enumerate(inputs + ([] if base is None else [base])):
                content.add(i, b.reads[i], r0, r1, x)
        return inputs, base

    def block_data(self, b: Block, inputs: list[torch.Tensor], base: torch.Tensor | None, r0: int, r1: int,
                   first: bool, inputs_too: bool = True, cache: dict | None = None) -> BlockData:
        """A chunk's BlockData from its rows: statistics (from `cache` when another candidate of a
        sweep read them), the extra checkpoints' rows, a Conv1D weight's transpose."""
        plan = self.plan
        data = BlockData(b.name, list(inputs), base, b.shape, r0, ops=self.ops)
        if plan.stats is not None:
            self._read_stats(b, data, r0, r1, first, cache)
        if inputs_too and b.kind != "derived":
            data.extra = {role: plan.extras[role].read(name, r0, r1) for role, name in b.extra_reads.items()}
        if b.transposed:
            _transpose(data)
        return data

    def to_device(self, data: BlockData) -> None:
        """On the reader thread: pinned copies sent on a side stream, so host-to-device copies
        of the next chunk overlap the kernels of this one; compute waits on the chunk's event."""
        compute_stream = torch.cuda.current_stream(self.device)

        def move(x: torch.Tensor) -> torch.Tensor:
            if x.device == self.device:  # a sweep's rows, moved once for every candidate
                return x
            y = x.pin_memory().to(self.device, non_blocking=True)
            y.record_stream(compute_stream)  # freed after compute used it, not after the copy
            return y

        with torch.cuda.stream(self.copy_stream):
            data.inputs = [move(x) for x in data.inputs]
            data.base = None if data.base is None else move(data.base)
            data.stats = {k: [move(x) for x in v] for k, v in data.stats.items()}
            data.base_stats = {k: move(v) for k, v in data.base_stats.items()}
            data.extra = {k: move(v) for k, v in data.extra.items()}
            data.ready = torch.cuda.Event()
            data.ready.record(self.copy_stream)

    def wait(self, data: BlockData) -> None:
        """On the compute thread: the chunk's host-to-device copies done (CUDA; else nothing)."""
        if data.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(data.ready)

    def _read_stats(self, b: Block, data: BlockData, r0: int, r1: int, first: bool, cache: dict | None = None) -> None:
        """Row statistics with every chunk; matrices once, with the block's first chunk."""
        binding = self.plan.stats

        def read(store, kind, key, rows=None):
            if cache is None:
                return _read_checked(store, kind, key, rows)
            at = (store.path, kind, key, rows)
            if at not in cache:
                cache[at] = _read_checked(store, kind, key, rows)
            return cache[at]

        for kind, keys in b.stats.items():
            if kind in ROW_KINDS:
                data.stats[kind] = [read(s, kind, k, (r0, r1)) for s, k in zip(binding.stores, keys)]
            elif first:
                data.stats[kind] = [read(s, kind, k) for s, k in zip(binding.stores, keys)]
        for kind, key in b.base_stats.items():  # checked as the models' are (UBGM's H₀ is a Fisher)
            if kind in ROW_KINDS:
                data.base_stats[kind] = read(binding.base, kind, key, (r0, r1))
            elif first:
                data.base_stats[kind] = read(binding.base, kind, key)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _readers() -> ThreadPoolExecutor:
    """Threads that wait on direct reads, a chunk's models at once (their parts go to
    engine/direct.py's own pool, so a waiting read never holds a thread its parts need)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(READERS, thread_name_prefix="tensormerge-models")
        return _pool


def _transpose(data: BlockData) -> None:
    """A whole Conv1D weight [in, out] (and its per-element statistics) as [out, in], the layout
    its Grams describe, so the methods merge it as they merge a Linear weight."""
    def t(x):
        return None if x is None else x.t().contiguous()

    data.inputs = [t(x) for x in data.inputs]
    data.base = t(data.base)
    data.full_shape = data.full_shape[::-1]
    data.stats = {k: ([t(x) for x in v] if k in ROW_KINDS else v) for k, v in data.stats.items()}
    data.base_stats = {k: (t(v) if k in ROW_KINDS else v) for k, v in data.base_stats.items()}
    data.extra = {k: t(v) for k, v in data.extra.items()}


def _read_checked(store, kind: str, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
    """A statistic as read, checked: Fishers non-negative, matrices symmetric with a non-negative
    diagonal (the read itself verifies the chunks' crc32s)."""
    if rows is not None:
        f = store.read(kind, key, *rows)
        if f.numel() and float(f.min()) < 0:
            raise InputError(f"{store.path}: {kind}/{key} has negative values (a Fisher is >= 0)")
        return f
    g = store.read(kind, key)
    check_gram(store, kind, key, g)
    return g
