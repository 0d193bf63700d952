"""Spec -> plan -> global passes -> merge pass -> patches -> atomic finish -> report."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from tensormerge import __version__
from tensormerge.constants import PASS_SUB_FACTOR, PROVENANCE
from tensormerge.engine import card, faults
from tensormerge.engine.alloc import keep_freed_buffers
from tensormerge.engine.cast import store_checked
from tensormerge.engine.crc import crc32, crc32_combine
from tensormerge.engine.executor import LocalExecutor, Task
from tensormerge.engine.manifest import Manifest
from tensormerge.engine.memory import MemoryMonitor
from tensormerge.engine.outdir import remove_replaced
from tensormerge.engine.plan import Block, MergePlan
from tensormerge.engine.progress import Overall, Progress
from tensormerge.engine.reading import ChunkReader
from tensormerge.engine.provenance import FILL_BYTES, ContentHashes, describe_inputs
from tensormerge.engine.provenance import record as provenance_record
from tensormerge.engine.summary import run_report
from tensormerge.engine.writer import ShardedWriter
from tensormerge.errors import InputError, OutputError
from tensormerge.kernels import dispatch
from tensormerge.methods.base import BlockData


def _sub_chunks(data: BlockData, rows: int):
    """The compute sub-chunks of a chunk (BlockData.row_slices)."""
    return data.row_slices(rows)


@dataclass
class BlockStats:
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    chunks: int = 0
    resumed_chunks: int = 0
    crcs: dict[int, tuple[int, int]] = field(default_factory=dict)  # first row -> (crc32, bytes) per chunk
    patched_crc32: int | None = None  # after patches rewrote some of its entries

    @property
    def crc32(self) -> int:
        """crc32 of the block's bytes, from its chunks' in row order (or as re-read after patches)."""
        if self.patched_crc32 is not None:
            return self.patched_crc32
        crc = 0
        for r0 in sorted(self.crcs):
            c, n = self.crcs[r0]
            crc = crc32_combine(crc, c, n)
        return crc


def merge_fingerprint(plan: MergePlan, writer: ShardedWriter) -> str:
    """What a resumed merge must share with the interrupted one: every input (names, shapes,
    dtypes, file sizes and modification times, sampled values), method and parameters,
    statistics (metadata and every chunk's crc32), and the output layout. Chunking may differ:
    chunks are matched by row range."""

    def ck(c):
        if c is None:
            return None
        return {"fingerprint": c.fingerprint()["fingerprint"], "identity": c.identity(),
                "mtimes": {os.path.basename(f): os.stat(f).st_mtime_ns for f in c.files}}

    what = {
        "tensormerge": __version__,
        "method": plan.method.name,
        "params": plan.params.as_dict(),
        "inputs": [ck(c) for c in plan.inputs],
        "base": ck(plan.base),
        "extras": {role: ck(c) for role, c in sorted(plan.extras.items())},
        "statistics": plan.stats.fingerprint() if plan.stats is not None else None,
        "layout": [(n, str(d), list(sh)) for n, d, sh in writer.tensors],
        "files": writer.files,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class RunOptions:
    output: str
    shard_size: int
    device: str = "cpu"
    overwrite: bool = False
    quiet: bool = False
    kernels: str = "auto"
    resume: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # recorded in provenance


class Runner:
    def __init__(self, plan: MergePlan, opts: RunOptions):
        self.plan = plan
        self.opts = opts
        self.device = torch.device(opts.device)
        self.ops = dispatch.select(opts.kernels, self.device)
        self.reader = ChunkReader(plan, self.ops, self.device)
        keep_freed_buffers()
        # On CPU, sub-chunks run on a pool of single-threaded workers: torch's intra-op threads
        # gain little on cache-sized element-wise ops, and single-threaded ops such as bincount
        # then use every core. Results are consumed in order, so the bytes do not change.
        self.workers = max(1, torch.get_num_threads()) if self.device.type == "cpu" else 1
        self.pool: ThreadPoolExecutor | None = None
        self.executor = LocalExecutor(plan.max_memory)
        self.stats: dict[str, BlockStats] = {b.name: BlockStats() for b in plan.blocks}
        self.passes_report: list[dict] = []
        self.prepared: dict[str, object] = {}  # per-block state shared by a block's chunks
        self.manifest: Manifest | None = None
        self.done: dict[tuple[str, int, int], list] = {}  # chunks verified on resume -> their extras
        self.resumed_passes = 0
        self.cluster = None  # a DaskExecutor when the merge runs on a dask cluster
        self.fingerprint = ""
        self.progress = Progress(plan.method.passes(plan.params), opts.quiet)
        self.content = ContentHashes()  # crc32s of the input rows the merge pass reads
        self.content_reread = 0  # bytes read after the merge to complete them
        self.extras: Any = None  # the method's extras, folded in plan order as chunks are merged
        self.writer: ShardedWriter | None = None
        self.finished = self.complete = False
        self.merge_seconds = self.finish_seconds = 0.0
        self.t_patch = self.t_finish = time.perf_counter()
        self.patched = 0
        self.block_notes: dict = {}

    # ------------------------------------------------------------------ stages
    def _tasks(self, blocks: list[Block], with_output: bool, sample: float = 1.0, skip=()):
        """Chunk tasks in plan order; `first`/`last` mark a block's first and last chunk run
        here (chunks in `skip`, finished by an interrupted run, are not run again)."""
        for b in blocks:
            chunks = [(r0, r1) for r0, r1 in b.chunks if (b.name, r0, r1) not in skip]
            for i, (r0, r1) in enumerate(chunks):
                if sample < 1.0:
                    r1 = r0 + max(1, math.ceil((r1 - r0) * sample))
                rows = r1 - r0
                yield Task((b, r0, r1, i == len(chunks) - 1, i == 0), rows * b.read_bytes_per_row,
                           b.work_bytes(rows) + b.fixed_bytes, rows * b.out_bytes_per_row if with_output else 0)

    def _read(self, task: Task, inputs_too: bool = True, content: bool = False) -> BlockData:
        b, r0, r1, _, first = task.key
        t0 = time.perf_counter()
        inputs, base = self.reader.read_rows(b, r0, r1, inputs_too, self.content if content else None)
        data = self.reader.block_data(b, inputs, base, r0, r1, first, inputs_too)
        self.stats[b.name].seconds += time.perf_counter() - t0
        if self.device.type == "cuda":
            self.reader.to_device(data)
        return data

    def _copy(self, b: Block, data: BlockData) -> torch.Tensor:
        ref = data.base if data.base is not None else data.inputs[0]
        for i, x in enumerate(data.inputs):
            if not torch.equal(x, ref):
                raise InputError(f"tensor {b.name!r}: {b.out_dtype} tensor differs between the base and "
                                 f"{self.plan.inputs[i].spec} (non-floating-point tensors are copied, not merged)")
        return ref

    def _map(self, fn, parts: list) -> list:
        if self.pool is None or len(parts) == 1:
            return [fn(p) for p in parts]
        return list(self.pool.map(fn, parts))

    # ------------------------------------------------------------------ passes
    def run_pass(self, gpass, state: dict) -> None:
        acc = gpass.start(state)
        t0 = time.perf_counter()

        def reduce(b: Block, partials: list, last: bool) -> None:
            nonlocal acc
            for partial in partials:
                acc = gpass.reduce(acc, partial, b.name)
            if last:
                acc = gpass.end_block(acc, b.name, b.numel)

        read = self.pass_blocks(gpass, state, self.plan.pass_blocks(gpass), reduce)
        gpass.finish(acc, state)
        self.passes_report.append({"name": gpass.name, "seconds": time.perf_counter() - t0, "bytes_read": read})

    def pass_blocks(self, gpass, state: dict, blocks: list[Block], take) -> int:
        """A global pass's map over `blocks`, handing each chunk's partials to `take` in plan
        order (here reduced; on a dask worker folded per block for the client to reduce)."""
        tasks = list(self._tasks(blocks, False, gpass.sample))
        bar = self.progress.bar(self.progress.stage(gpass.name, gpass.label), sum(t.read_bytes for t in tasks),
                                len(blocks))

        def compute(task: Task, data: BlockData):
            self.reader.wait(data)
            if not gpass.needs_inputs:
                return [gpass.map(data, state)]
            parts = list(_sub_chunks(data, task.key[0].sub_rows * PASS_SUB_FACTOR))
            return self._map(lambda part: gpass.map(part, state), parts)

        def collect(task: Task, partials) -> None:
            b, _, _, last, _ = task.key
            take(b, partials, last)
            self.progress.advance(bar, task, last)
            faults.hit("pass")

        try:
            self.executor.run(tasks, lambda t: self._read(t, gpass.needs_inputs), compute, collect=collect,
                              ahead=self.reader.read_ahead())
        finally:
            self.progress.close(bar)
        return sum(t.read_bytes for t in tasks)

    def record(self, b: Block, r0: int, r1: int, crc: int, nbytes: int, chunk_extras: list) -> None:
        """A written chunk, into the manifest (a dask worker hands it to the client instead)."""
        if self.manifest is not None:
            self.manifest.record_chunk(b.name, r0, r1, crc, nbytes, chunk_extras)

    def run_merge(self, writer: ShardedWriter, state: dict, blocks: list[Block] | None = None) -> Any:
        """Merge and write `blocks` (all, by default, less what --resume verified)."""
        self.extras = self.plan.method.start_extras(self.plan.params)
        whole = blocks is None
        blocks = self.plan.blocks if whole else blocks
        bar = self.progress.bar(self.progress.stage("merge", "merge"),
                                sum(b.read_bytes_per_row * b.rows for b in blocks), len(blocks))
        if whole:
            self.extras = self._replay(self.extras, bar)

        def compute(task: Task, data: BlockData) -> tuple[torch.Tensor, list]:
            b, r0, r1, last, first = task.key
            return self.merge_chunk(b, r0, r1, first, last, data, state, bar)

        def write(task: Task, result: tuple[torch.Tensor, list]) -> None:
            b, r0, r1, last, _ = task.key
            self.write_chunk(writer, b, r0, r1, last, task.read_bytes, *result)
            self.progress.advance(bar, task, last)
            faults.hit("chunk")
            if last and r1 == b.rows and writer.last_in_file(b.out_names[-1]):
                faults.hit("shard")

        try:
            self.executor.run(self._tasks(blocks, True, skip=self.done), lambda t: self._read(t, content=True),
                              compute, write=write, ahead=self.reader.read_ahead())
        finally:
            self.progress.close(bar)
        return self.extras

    def merge_chunk(self, b: Block, r0: int, r1: int, first: bool, last: bool, data: BlockData, state: dict,
                    bar=None, fused=None) -> tuple[torch.Tensor, list]:
        """One chunk's merged rows in the output dtype (checked after the cast), and the extras the
        method returned for it (folded into `self.extras` in plan order). `fused`: a sweep's
        results for this candidate, computed with others (Method.merge_many), sub-chunk by sub-chunk."""
        method = self.plan.method
        t0 = time.perf_counter()
        self.reader.wait(data)
        shape = b.merge_shape if b.transposed else (r1 - r0,) + b.shape[1:] if b.shape else ()
        chunk_extras: list = []
        if b.kind == "copy":
            out = self._copy(b, data).reshape(shape).to(b.out_dtype).contiguous().cpu()
        elif b.kind == "derived":
            out = torch.empty(shape, dtype=b.out_dtype)
            store_checked(b.name, b.produce(r0, r1), out)
        else:
            out = torch.empty(shape, dtype=b.out_dtype)
            if fused is None:
                self.prepare_block(b, data, first, last)
                parts = list(_sub_chunks(data, b.sub_rows))
                starts = [p.row_start - data.row_start for p in parts]
            else:  # a sweep's results, computed with other candidates: their rows follow one another
                sizes = [(r[0] if isinstance(r, tuple) else r).shape[0] if shape else 0 for r in fused]
                starts = [sum(sizes[:i]) for i in range(len(fused))]

            def place(i: int):
                """A sub-chunk merged (or taken from `fused`), cast and checked into its rows of
                `out` on the compute pool (disjoint rows: any order, the same bytes)."""
                result = fused[i] if fused is not None else self.merge_part(b, parts[i], state)
                with_extra = isinstance(result, tuple)
                extra = None
                if with_extra:
                    result, extra = result
                s0 = starts[i]
                store_checked(b.name, result, out[s0:s0 + result.shape[0]] if shape else out)
                return (extra,) if with_extra else None

            for got in self._map(place, list(range(len(starts)))):
                if got is None:
                    continue
                extra = got[0]
                self.extras = method.add_extra(self.extras, extra)
                chunk_extras.append(extra)
                note = method.progress(extra)
                if note and bar is not None:
                    bar.note = note
        if b.transposed:
            out = out.t().contiguous()
        self.stats[b.name].seconds += time.perf_counter() - t0
        return out, chunk_extras

    def prepare_block(self, b: Block, data: BlockData, first: bool, last: bool) -> None:
        """Per-block state (RegMean's factorisation) made on the block's first chunk, shared by its
        chunks and dropped with the last."""
        if b.kind != "merge" or b.fallback:
            return
        params = b.params or self.plan.params
        if first and (b.stats or self.plan.method.prepares(params)):
            self.prepared[b.name] = self.plan.method.prepare(data, params)
        data.prepared = self.prepared.pop(b.name, None) if last else self.prepared.get(b.name)

    def merge_part(self, b: Block, part: BlockData, state: dict):
        """A sub-chunk through the method (or its fallback, for a block without statistics)."""
        params = b.params or self.plan.params  # per-tensor values (methods.rules), resolved by the plan
        if b.fallback:
            return self.plan.method.fallback(part, params)
        return self.plan.method.merge(part, params, state)

    def write_chunk(self, writer: ShardedWriter, b: Block, r0: int, r1: int, last: bool, read_bytes: int,
                    out: torch.Tensor, chunk_extras: list) -> None:
        """A merged chunk written under each of the block's names and recorded (crc32, extras)."""
        t0 = time.perf_counter()
        st = self.stats[b.name]
        raw = out.reshape(-1).view(torch.uint8).numpy()
        for name in b.out_names:
            writer.write(name, r0 * b.out_bytes_per_row, out)
        faults.hit("chunk-bytes")  # written, not yet recorded: resume must merge it again
        crc = crc32(raw)
        st.crcs[r0] = (crc, raw.nbytes)
        self.record(b, r0, r1, crc, raw.nbytes, chunk_extras)
        st.bytes_read += read_bytes
        st.bytes_written += raw.nbytes * len(b.out_names)
        st.chunks += 1
        st.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ resume
    def _verify(self, writer: ShardedWriter, manifest: Manifest) -> None:
        """Chunks an interrupted run recorded whose bytes still match their crc32 (in every
        name the block is written under) and whose extras are intact; the rest run again."""
        planned = {(b.name, r0, r1): b for b in self.plan.blocks for r0, r1 in b.chunks}
        for key, rec in manifest.chunks.items():
            b = planned.get(key)
            if b is None or rec.nbytes != (rec.r1 - rec.r0) * b.out_bytes_per_row:
                continue
            if any(writer.crc32(n, rec.r0 * b.out_bytes_per_row, rec.nbytes) != rec.crc32 for n in b.out_names):
                continue
            extras = manifest.chunk_extras(rec)
            if extras is not None:
                self.done[key] = extras
                self.stats[b.name].crcs[rec.r0] = (rec.crc32, rec.nbytes)
                self.stats[b.name].resumed_chunks += 1

    def _replay(self, extras: Any, bar) -> Any:
        """Fold in the extras of chunks an interrupted run finished, in plan order."""
        method = self.plan.method
        for b in self.plan.blocks:
            skipped = [(r0, r1) for r0, r1 in b.chunks if (b.name, r0, r1) in self.done]
            for i, (r0, r1) in enumerate(skipped):
                for extra in self.done[(b.name, r0, r1)]:
                    extras = method.add_extra(extras, extra)
                whole = i == len(skipped) - 1 and len(skipped) == len(b.chunks)
                self.progress.skip(bar, (r1 - r0) * b.read_bytes_per_row, whole)
        return extras

    def _open_output(self, writer: ShardedWriter, fingerprint: str) -> bool:
        """Continue `OUT.partial` (--resume, same fingerprint) or start it afresh; True when an
        interrupted run had already finished everything but the rename."""
        if self.opts.resume:
            manifest = Manifest.load(writer.partial)
            if manifest is not None:
                if manifest.fingerprint != fingerprint:
                    raise OutputError(f"{writer.partial}: --resume: it was made by a different merge (inputs, "
                                      f"method, parameters, statistics or layout differ); remove it or run "
                                      f"without --resume")
                writer.open_existing()
                self.manifest = manifest
                if manifest.finished:
                    return True
                self._verify(writer, manifest)
                return False
            if not self.opts.quiet:
                print(f"--resume: no interrupted merge at {writer.partial}; starting from the beginning",
                      file=sys.stderr)
        elif os.path.exists(writer.partial) and not self.opts.quiet:
            print(f"note: removing {writer.partial} left by an interrupted merge (--resume continues one)",
                  file=sys.stderr)
        writer.create()
        try:
            self.manifest = Manifest.create(writer.partial, fingerprint)
        except BaseException:
            writer.abort()
            raise
        return False

    def _pass_bytes(self, gpass) -> int:
        return sum(t.read_bytes for t in self._tasks(self.plan.pass_blocks(gpass), False, gpass.sample))

    def _passes(self, state: dict) -> None:
        passes = self.plan.method.passes(self.plan.params)
        self.progress.overall = Overall(sum(map(self._pass_bytes, passes)) + self.plan.bytes_read_merge)
        for i, gpass in enumerate(passes):
            saved = self.manifest.pass_state(i, gpass.name)
            if saved is not None or gpass.skip(state):
                self.progress.overall.total -= self._pass_bytes(gpass)  # read by no bar
            if saved is not None:
                state.clear()
                state.update(saved)
                self.resumed_passes += 1
                self.passes_report.append({"name": gpass.name, "seconds": 0.0, "bytes_read": 0, "resumed": True})
                continue
            if gpass.skip(state):
                gpass.finish(gpass.start(state), state)
                self.passes_report.append({"name": gpass.name, "seconds": 0.0, "bytes_read": 0, "skipped": True})
            elif self.cluster is not None:
                self.cluster.run_pass(self, i, gpass, state)
            else:
                self.run_pass(gpass, state)
            self.manifest.record_pass(i, gpass.name, state)

    # ------------------------------------------------------------------ whole run
    def make_writer(self) -> ShardedWriter:
        """The output layout: every name the base has, in its order, sharded by --shard-size."""
        names = [(n, b.out_dtype, b.shape) for b in self.plan.blocks for n in b.out_names]
        order = {n: i for i, n in enumerate(self.plan.ref.tensors)}
        names.sort(key=lambda t: order.get(t[0], len(order)))  # produced blocks (engine.lora) are in order
        return ShardedWriter(self.opts.output, names, self.opts.shard_size, self.plan.weights_name,
                             self.plan.json_files)

    def execute(self) -> dict:
        t_start = time.perf_counter()
        early = self.begin()
        if early is not None:
            return early
        self.announce()
        with self.compute_threads(), MemoryMonitor() as mem, self.guard():
            if not self.finished:
                state: dict = {}
                self._passes(state)
                t_merge = time.perf_counter()
                extras = self.cluster.run_merge(self, state) if self.cluster is not None else self.run_merge(
                    self.writer, state)
                self.merge_seconds = time.perf_counter() - t_merge
                self.finish(state, extras, t_start)
            self.publish()
        return run_report(self, mem, t_start)

    def begin(self) -> dict | None:
        """The writer and fingerprint; the output opened (afresh, or continued by --resume). A
        report when `OUT` already is this merge, finished (a run killed after its last rename)."""
        plan, opts = self.plan, self.opts
        self.writer = writer = self.make_writer()
        self.t_start = time.perf_counter()
        self.fingerprint = merge_fingerprint(plan, writer)
        if opts.resume and not os.path.exists(writer.partial) and os.path.exists(writer.out_dir):
            if _complete(writer.out_dir, self.fingerprint):
                return {"output": writer.out_dir, "method": plan.method.name, "already_complete": True,
                        "seconds": time.perf_counter() - self.t_start, "shards": writer.files}
            if not opts.overwrite:
                raise OutputError(f"{writer.out_dir}: exists and is not this merge (pass --overwrite to replace it)")
        self.finished = self._open_output(writer, self.fingerprint)
        self.complete = self.finished  # from here on a failure keeps OUT.partial: it holds the whole merge
        return None

    def announce(self) -> None:
        if not self.opts.quiet:
            print(self.plan.summary(), file=sys.stderr, flush=True)
            disagree = card.auto_dtype_disagreements(self.plan, self.opts.settings.get("dtype"))
            if disagree:
                card.warn(disagree)

    @contextlib.contextmanager
    def compute_threads(self):
        """On CPU, sub-chunks run on a pool of single-threaded workers (see __init__)."""
        threads = torch.get_num_threads()
        if self.workers > 1:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tensormerge-compute")
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if self.pool is not None:
                self.pool.shutdown()
                self.pool = None
                torch.set_num_threads(threads)

    @contextlib.contextmanager
    def guard(self):
        """What a failure leaves: an interruption keeps OUT.partial for --resume; an error removes
        it, unless the merge was complete (only the rename failed: --resume puts it in place)."""
        try:
            yield
        except KeyboardInterrupt:
            self.writer.close()
            raise
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.complete:
            self.writer.close()
        else:
            self.writer.abort()  # a failed merge leaves nothing behind; only an interrupted one stays

    def finish(self, state: dict, extras: Any, t_start: float) -> None:
        """After the merge pass: patches, the output's side files (provenance, card), recorded as
        finished in the manifest."""
        plan, opts, writer = self.plan, self.opts, self.writer
        for ck in [*plan.checkpoints, *plan.extras.values()]:
            ck.check_unchanged()  # before anything records what was read
        self.block_notes = plan.method.block_report(extras)
        self.t_patch = time.perf_counter()
        self.patched = self._apply_patches(writer, state, extras)
        self.t_finish = time.perf_counter()
        provenance = provenance_record(self, describe_inputs(self.plan, self._content), self.t_finish - t_start,
                                       self.patched, self.block_notes, self.fingerprint)
        writer.finish_files(plan.side_dir or plan.ref.config_dir, provenance, functools.partial(
            card.generated_files, plan, opts.settings, writer.out_dir, warn_fn=None if opts.quiet else card.warn))
        self.manifest.record_finished()
        self.complete = True

    def publish(self) -> None:
        """The finished OUT.partial renamed into place (replacing an old output it may)."""
        faults.hit("finished")
        self.manifest.close()
        self.writer.rename_into_place(self.opts.overwrite)
        Manifest.remove(self.writer.out_dir)
        self.finish_seconds = time.perf_counter() - self.t_finish

    def _apply_patches(self, writer: ShardedWriter, state: dict, extras: Any) -> int:
        grouped: dict[str, list] = {}
        for p in self.plan.method.patches(self.plan.params, state, extras):
            grouped.setdefault(p.name, []).append(p)
        by_block = {n: b for b in self.plan.blocks for n in b.out_names}
        count = 0
        for name, group in grouped.items():
            index = torch.cat([p.index for p in group])
            values = torch.cat([p.values for p in group])
            cast = torch.empty(values.shape, dtype=by_block[name].out_dtype)
            store_checked(name, values, cast)
            values = cast
            for out_name in by_block[name].out_names:
                writer.patch(out_name, index, values)
            count += index.numel()
        for name in grouped:
            self.stats[name].patched_crc32 = writer.crc32(name)
        return count

    def _content(self, which: int, ck=None) -> dict:
        """The content digest of `plan.checkpoints[which]` (or of `ck`, recorded as `which`); rows
        the merge did not read are read now."""
        piece = max(1, min(self.plan.max_memory // 4, FILL_BYTES))
        ck = self.plan.checkpoints[which] if ck is None else ck
        content, reread = self.content.digest(ck, which, piece)
        self.content_reread += reread
        return content


def _complete(out_dir: str, fingerprint: str) -> bool:
    """Whether `OUT` is this merge, finished (a run killed just after its final rename)."""
    try:
        with open(os.path.join(out_dir, PROVENANCE)) as f:
            done = json.load(f).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        return False
    if done:  # a crash between the rename and these removals leaves them
        Manifest.remove(out_dir)
        remove_replaced(out_dir)
    return done
