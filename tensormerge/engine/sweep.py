"""A sweep: many candidate merges of the same inputs from one read.

Each candidate is a complete merge of its own (its plan, `Runner`, `OUT.partial`, manifest,
patches, card and provenance: byte for byte what `run` with its parameters writes). What they
share is the reading. Every candidate's bytes are independent of the row chunking, so the
candidates of a group are cut into common chunks sized for all of them at once: each chunk
holds the inputs once, every candidate's output, the largest candidate's intermediates and
every candidate's per-block state. Each chunk of the inputs is read once per stage for the whole
group, and each candidate merges it in turn:

- Global passes run stage by stage (the i-th pass of every candidate that has one in the same
  read). Passes whose `group_key` is equal compute their partials together (`map_group`: TIES'
  histograms are computed once for every k), and a pass whose result some candidate already
  has (a manifest of an interrupted sweep, or `skip`) is not run for it.
- The merge pass reads each chunk once; candidates whose method says they can share work
  (`Method.fuse_key`, e.g. MaTS' CG for several iteration counts) are merged together by
  `Method.merge_many`, the others one by one.
- A candidate whose merge fails (an error in its values: a merged value past float16's range) is
  dropped with its `OUT.partial` removed, and the others go on.

When one chunk for all candidates does not fit `--max-memory` (blocks that cannot be split, MaTS'
CG blocks, with a factorisation each), the candidates are split into groups that do (first fit,
largest first), each group a read of its own; `plan` says how many.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tensormerge.constants import PASS_SUB_FACTOR
from tensormerge.engine import faults
from tensormerge.engine.executor import LocalExecutor, Task
from tensormerge.engine.memory import MemoryMonitor
from tensormerge.engine.plan import Block, MergePlan, _chunks
from tensormerge.engine.provenance import ContentHashes
from tensormerge.engine.run import Runner, _sub_chunks
from tensormerge.engine.safetensors_format import element_size
from tensormerge.engine.summary import run_report
from tensormerge.errors import BudgetError, InputError, TensorMergeError
from tensormerge.sizes import format_size


@dataclass
class SweepBlock:
    """One block as the candidates of a group see it together: the chunk cost of all of them."""

    name: str
    rows: int
    members: list[Block]
    shared_row: int  # the inputs' (and base's) bytes per row, read once
    own_rows: list[int]  # each candidate's own bytes per row (statistics, extra checkpoints)
    splits: bool
    max_piece_row_bytes: int
    fixed_bytes: int
    chunks: list[tuple[int, int]] = field(default_factory=list)

    @property
    def read_bytes_per_row(self) -> int:
        return self.shared_row + sum(self.own_rows)

    @property
    def out_bytes_per_row(self) -> int:
        return sum(b.out_bytes_per_row for b in self.members)

    def work_bytes(self, rows: int) -> int:
        return max(b.work_bytes(rows) for b in self.members)  # candidates compute one after another

    def chunk_bytes(self, rows: int) -> int:
        return rows * (2 * self.read_bytes_per_row + 2 * self.out_bytes_per_row) + self.work_bytes(rows) \
            + self.fixed_bytes


class _Align:
    def __init__(self, row_align: int):
        self.row_align = row_align


class _Apart(Exception):
    """Candidates that read a tensor differently (one copies what another merges: `--lora full`
    copies what no adapter targets, except under global TIES): each group reads it one way."""


def sweep_blocks(plans: list[MergePlan], max_memory: int) -> list[SweepBlock]:
    """The common chunking of `plans` (one group) under `max_memory`; BudgetError when one chunk
    for all of them cannot fit, _Apart when they do not treat every tensor alike."""
    first = plans[0]
    names = [b.name for b in first.blocks]
    for p in plans[1:]:
        if [b.name for b in p.blocks] != names:
            raise InputError("sweep: the candidates merge different sets of tensors (adapters merged in different "
                             "modes?); sweep them separately")
    align = 1
    for p in plans:
        align = math.lcm(align, p.method.row_align)
    out = []
    for i, b0 in enumerate(first.blocks):
        members = [p.blocks[i] for p in plans]
        if len({b.kind for b in members}) > 1:
            raise _Apart(b0.name)
        shared = [_shared_row(p, b) for p, b in zip(plans, members)]
        sb = SweepBlock(b0.name, b0.rows, members, max(shared),
                        [b.read_bytes_per_row - s for b, s in zip(members, shared)],
                        all(b.splits for b in members), max(b.max_piece_row_bytes for b in members),
                        sum(b.fixed_bytes for b in members))
        sb.chunks = _chunks(_Align(align), sb, max_memory)
        out.append(sb)
    return out


def _shared_row(plan: MergePlan, b: Block) -> int:
    """Bytes per row of the inputs (and base) a candidate reads for `b`: what a group reads once."""
    if b.kind == "derived":
        return 0
    row = b.numel // b.rows if b.rows else 0
    cks = plan.inputs + ([plan.base] if plan.base is not None and (plan.method.requires_base(plan.params)
                                                                   or b.kind == "copy") else [])
    return sum(row * element_size(ck.tensors[r].dtype) for ck, r in zip(cks, b.reads))


def groups(plans: list[MergePlan], max_memory: int) -> list[list[int]]:
    """Candidates (indices) in groups whose common chunks fit `max_memory`: first fit, the
    candidates needing the most memory first; each group in candidate order."""
    def need(p: MergePlan) -> int:
        return max((b.chunk_bytes(min(b.rows, 1)) for b in p.blocks), default=0)

    order = sorted(range(len(plans)), key=lambda i: -need(plans[i]))
    out: list[list[int]] = []
    for i in order:
        for g in out:
            try:
                sweep_blocks([plans[j] for j in sorted(g + [i])], max_memory)
            except (BudgetError, _Apart):
                continue
            g.append(i)
            break
        else:
            sweep_blocks([plans[i]], max_memory)  # alone it must fit: the error names the block
            out.append([i])
    return sorted((sorted(g) for g in out), key=lambda g: g[0])


@dataclass(eq=False)
class _Member:
    index: int
    runner: Runner
    state: dict = field(default_factory=dict)
    failed: BaseException | None = None


class SweepGroup:
    """The candidates of one group, driven over one read per stage."""

    def __init__(self, runners: list[Runner], max_memory: int, quiet: bool, indices: list[int] | None = None):
        self.members = [_Member(i, r) for i, r in zip(indices or range(len(runners)), runners)]
        self.blocks = sweep_blocks([r.plan for r in runners], max_memory)
        for sb in self.blocks:  # every candidate merges the common chunks (its bytes do not depend on them)
            for b in sb.members:
                b.chunks = list(sb.chunks)
        self.content = ContentHashes()  # the inputs are the same for all: digested once
        for r in runners:
            r.content = self.content
        self.lead = runners[0]
        self.executor = LocalExecutor(max_memory)
        self.quiet = quiet
        self.cluster = None  # a DaskExecutor: passes and merge run on its workers (engine.distributed)

    # ------------------------------------------------------------------ helpers
    def live(self) -> list[_Member]:
        return [m for m in self.members if m.failed is None]

    def _fail(self, m: _Member, e: BaseException) -> None:
        m.failed = e
        if not self.quiet:
            print(f"sweep: candidate {m.runner.opts.output}: {e}", file=sys.stderr, flush=True)

    def _tasks(self, needed, sample: float = 1.0, merge_only: bool = False):
        """Chunk tasks in plan order over the blocks some member still needs; key = (block index,
        r0, r1, last, first, members)."""
        for i, sb in enumerate(self.blocks):
            if merge_only and sb.members[0].kind != "merge":
                continue
            for j, (r0, r1) in enumerate(sb.chunks):
                who = needed(i, r0, r1)
                if not who:
                    continue
                if sample < 1.0:
                    r1 = r0 + max(1, math.ceil((r1 - r0) * sample))
                rows = r1 - r0
                yield Task((i, r0, r1, j == len(sb.chunks) - 1, j == 0, who), rows * sb.read_bytes_per_row,
                           sb.work_bytes(rows) + sb.fixed_bytes,
                           0 if merge_only else rows * sb.out_bytes_per_row)

    def _read(self, task: Task, inputs_too: bool = True, content: bool = False) -> dict[int, Any]:
        """The chunk's rows read once, then each member's BlockData (its statistics, its layout)."""
        i, r0, r1, last, first, who = task.key
        sb = self.blocks[i]
        lead_block = sb.members[0]
        base_too = any(m.runner.reader.reads_base(sb.members[self._pos(m)]) for m in who)
        t0 = time.perf_counter()
        inputs, base = self.lead.reader.read_rows(lead_block, r0, r1, inputs_too, self.lead.content if content else None,
                                                  base_too=base_too)
        if self.lead.device.type == "cuda":
            inputs, base = self._to_device(inputs, base)
        cache: dict = {}
        out = {}
        for m in who:
            b = sb.members[self._pos(m)]
            if m.failed is not None:
                continue
            try:
                data = m.runner.reader.block_data(b, inputs, base if m.runner.reader.reads_base(b) else None, r0, r1, first,
                                           inputs_too, cache)
                if m.runner.device.type == "cuda":
                    m.runner.reader.to_device(data)
            except TensorMergeError as e:  # this candidate's statistics; the others go on
                self._fail(m, e)
                continue
            out[m.index] = data
        self.lead.stats[lead_block.name].seconds += time.perf_counter() - t0
        return out

    def _to_device(self, inputs, base):
        data = type("Rows", (), {})()
        data.inputs, data.base, data.stats, data.base_stats, data.extra = inputs, base, {}, {}, {}
        self.lead.reader.to_device(data)
        return data.inputs, data.base

    def _pos(self, m: _Member) -> int:
        return self.members.index(m)

    def _each(self, members: list[_Member], fn) -> dict[int, Any]:
        out = {}
        for m in members:
            if m.failed is not None:
                continue
            try:
                out[m.index] = fn(m)
            except TensorMergeError as e:
                self._fail(m, e)
        return out

    def _bar(self, label: str, tasks: list[Task]):
        return self.lead.progress.bar(label, sum(t.read_bytes for t in tasks), len(self.blocks))

    # ------------------------------------------------------------------ passes
    def run_passes(self) -> None:
        """The candidates' global passes, stage by stage, one read per stage."""
        todo = [m for m in self.live() if not m.runner.finished]
        lists = {m.index: m.runner.plan.method.passes(m.runner.plan.params) for m in todo}
        for stage in range(max((len(v) for v in lists.values()), default=0)):
            active = []
            for m in todo:
                passes = lists[m.index]
                if m.failed is not None or stage >= len(passes):
                    continue
                gpass, r = passes[stage], m.runner
                saved = r.manifest.pass_state(stage, gpass.name)
                if saved is not None:
                    m.state.clear()
                    m.state.update(saved)
                    r.resumed_passes += 1
                    r.passes_report.append({"name": gpass.name, "seconds": 0.0, "bytes_read": 0, "resumed": True})
                elif gpass.skip(m.state) or gpass.skip_in_sweep():
                    gpass.finish(gpass.start(m.state), m.state)
                    r.passes_report.append({"name": gpass.name, "seconds": 0.0, "bytes_read": 0, "skipped": True})
                    r.manifest.record_pass(stage, gpass.name, m.state)
                else:
                    active.append((m, gpass))
            kinds: dict[tuple, list] = {}
            for m, gpass in active:
                kinds.setdefault((gpass.sample, gpass.needs_inputs), []).append((m, gpass))
            for (sample, needs_inputs), members in kinds.items():
                self._pass(members, sample, needs_inputs)
                for m, gpass in members:
                    if m.failed is None:
                        m.runner.manifest.record_pass(stage, gpass.name, m.state)

    def _pass(self, members: list, sample: float, needs_inputs: bool) -> None:
        t0 = time.perf_counter()
        accs = {m.index: gpass.start(m.state) for m, gpass in members}
        passes = {m.index: gpass for m, gpass in members}
        if self.cluster is not None:
            read, folded = self.cluster.sweep_pass(self, members, sample, needs_inputs)
            for i, sb in enumerate(self.blocks):
                if sb.members[0].kind != "merge":
                    continue
                for m, gpass in members:
                    part = folded.get(m.index, {}).get(sb.name)
                    if part is not None:
                        accs[m.index] = gpass.reduce(accs[m.index], part, sb.name)
                    accs[m.index] = gpass.end_block(accs[m.index], sb.name, sb.members[0].numel)
        else:
            def take(m: _Member, sb: SweepBlock, partials: list, last: bool) -> None:
                acc = accs[m.index]
                for p in partials:
                    acc = passes[m.index].reduce(acc, p, sb.name)
                if last:
                    acc = passes[m.index].end_block(acc, sb.name, sb.members[0].numel)
                accs[m.index] = acc

            read = self.map_blocks(members, sample, needs_inputs, None, take)
        seconds = time.perf_counter() - t0
        for m, gpass in members:
            if m.failed is not None:
                continue
            try:
                gpass.finish(accs[m.index], m.state)
            except TensorMergeError as e:
                self._fail(m, e)
                continue
            # each candidate's report: the shared read, attributed to every candidate that shared it
            m.runner.passes_report.append({"name": gpass.name, "seconds": seconds, "bytes_read": read,
                                           "shared_by": len(members)})

    def map_blocks(self, members: list, sample: float, needs_inputs: bool, names: set | None, take) -> int:
        """One read of the blocks (`names`, or all) for the members' passes; each chunk's partials
        handed to `take(member, block, partials, last)` in plan order. Returns the bytes read."""
        passes = {m.index: gpass for m, gpass in members}
        who = [m for m, _ in members]
        tasks = [t for t in self._tasks(lambda i, r0, r1: who, sample, merge_only=True)
                 if names is None or self.blocks[t.key[0]].name in names]
        label = members[0][1].label or members[0][1].name
        bar = self._bar(f"sweep {label}", tasks)

        def compute(task: Task, datas: dict[int, Any]):
            i = task.key[0]
            sb = self.blocks[i]
            groups_: dict[Any, list[_Member]] = {}
            for m in who:
                if m.index in datas and m.failed is None:
                    key = passes[m.index].group_key()
                    groups_.setdefault(("solo", m.index) if key is None else key, []).append(m)
            partials: dict[int, list] = {}
            for group in groups_.values():
                lead = group[0]
                gpass = passes[lead.index]
                data = datas[lead.index]
                lead.runner.reader.wait(data)
                if not gpass.needs_inputs:
                    partials.update({m.index: [passes[m.index].map(datas[m.index], m.state)] for m in group})
                    continue
                sub = sb.members[self._pos(lead)].sub_rows * PASS_SUB_FACTOR
                parts = {m.index: list(_sub_chunks(datas[m.index], sub)) for m in group}

                def one(k: int, group=group, parts=parts, gpass=gpass):
                    # a keyed pass maps through map_group even when one candidate is left (the
                    # others dropped mid-pass): its partials may differ in kind from a run's map
                    # (TIES: full histograms, not windows) and must not be mixed in one reduce
                    if gpass.group_key() is None:
                        return [gpass.map(parts[group[0].index][k], group[0].state)]
                    return gpass.map_group([parts[m.index][k] for m in group], [passes[m.index] for m in group],
                                           [m.state for m in group])

                try:
                    results = lead.runner._map(one, list(range(len(parts[lead.index]))))
                except TensorMergeError as e:
                    for m in group:
                        self._fail(m, e)
                    continue
                partials.update({m.index: [r[j] for r in results] for j, m in enumerate(group)})
            return partials

        def collect(task: Task, partials: dict[int, list]) -> None:
            i, _, _, last, _, _ = task.key
            for m in who:
                if m.index in partials and m.failed is None:
                    take(m, self.blocks[i], partials[m.index], last)
            self.lead.progress.advance(bar, task, last)
            faults.hit("pass")

        try:
            self.executor.run(tasks, lambda t: self._read(t, needs_inputs), compute, collect=collect,
                              ahead=self.lead.reader.read_ahead())
        finally:
            self.lead.progress.close(bar)
        return sum(t.read_bytes for t in tasks)

    # ------------------------------------------------------------------ merge
    def run_merge(self) -> None:
        todo = [m for m in self.live() if not m.runner.finished]
        for m in todo:
            r = m.runner
            r.extras = r.plan.method.start_extras(r.plan.params)
            r.extras = r._replay(r.extras, None)
        if self.cluster is not None:
            self.cluster.sweep_merge(self, todo)
        else:
            self.merge_blocks(todo, None)

    def merge_blocks(self, todo: list[_Member], names: set | None) -> None:
        """The merge pass over the blocks (`names`, or all) for the members in `todo`: each chunk
        read once, merged by every member that still needs it, written to each one's output."""
        pos = {m.index: k for k, m in enumerate(self.members)}

        def needed(i: int, r0: int, r1: int) -> list[_Member]:
            name = self.blocks[i].name
            if names is not None and name not in names:
                return []
            return [m for m in todo if m.failed is None and (name, r0, r1) not in m.runner.done]

        tasks = list(self._tasks(needed))
        bar = self._bar(f"sweep merge x{len(todo)}", tasks)

        def compute(task: Task, datas: dict[int, Any]):
            i, r0, r1, last, first, who = task.key
            sb = self.blocks[i]
            results: dict[int, tuple] = {}
            fusable: dict[Any, list[_Member]] = {}
            for m in who:
                if m.index not in datas or m.failed is not None:
                    continue
                b = sb.members[pos[m.index]]
                method, params = m.runner.plan.method, b.params or m.runner.plan.params
                key = method.fuse_key(params) if b.kind == "merge" and not b.fallback else None
                fusable.setdefault(("solo", m.index) if key is None else (method.name, key), []).append(m)
            for group in fusable.values():
                if len(group) == 1:
                    m = group[0]
                    b = sb.members[pos[m.index]]
                    results.update(self._each([m], lambda m: m.runner.merge_chunk(
                        b, r0, r1, first, last, datas[m.index], m.state, bar)))
                else:
                    results.update(self._fused(group, sb, pos, r0, r1, first, last, datas, bar))
            return results

        def write(task: Task, results: dict[int, tuple]) -> None:
            i, r0, r1, last, _, who = task.key
            sb = self.blocks[i]
            for m in who:
                if m.index not in results or m.failed is not None:
                    continue
                b = sb.members[pos[m.index]]
                m.runner.write_chunk(m.runner.writer, b, r0, r1, last, (r1 - r0) * b.read_bytes_per_row,
                                     *results[m.index])
            self.lead.progress.advance(bar, task, last)
            faults.hit("chunk")

        try:
            self.executor.run(tasks, lambda t: self._read(t, content=True), compute, write=write,
                              ahead=self.lead.reader.read_ahead())
        finally:
            self.lead.progress.close(bar)

    def _fused(self, group: list[_Member], sb: SweepBlock, pos: dict, r0: int, r1: int, first: bool, last: bool,
               datas: dict, bar) -> dict[int, tuple]:
        """Members whose method merges them together (Method.merge_many), sub-chunk by sub-chunk."""
        lead = group[0]
        b = sb.members[pos[lead.index]]
        method = lead.runner.plan.method
        for m in group:
            m.runner.prepare_block(sb.members[pos[m.index]], datas[m.index], first, last)
        parts = {m.index: list(_sub_chunks(datas[m.index], b.sub_rows)) for m in group}

        def one(k: int):
            return method.merge_many([parts[m.index][k] for m in group],
                                     [sb.members[pos[m.index]].params or m.runner.plan.params for m in group],
                                     [m.state for m in group])

        try:
            merged = lead.runner._map(one, list(range(len(parts[lead.index]))))
        except TensorMergeError as e:
            for m in group:
                self._fail(m, e)
            return {}
        out = {}
        for j, m in enumerate(group):
            results = [r[j] for r in merged]
            out.update(self._each([m], lambda m, results=results: m.runner.merge_chunk(
                sb.members[pos[m.index]], r0, r1, first, last, datas[m.index], m.state, bar, fused=results)))
        return out


def run_sweep(runners: list[Runner], max_memory: int, quiet: bool, log=None,
              cluster=None) -> list[dict | BaseException]:
    """Every candidate merged (groups of them per read) and published; per candidate its report,
    or the error that dropped it. `cluster`: a DaskExecutor whose workers read and merge."""
    plans = [r.plan for r in runners]
    results: list[dict | BaseException | None] = [None] * len(runners)
    for r in runners:
        early = r.begin()
        if early is not None:
            results[runners.index(r)] = early
    open_ = [i for i, r in enumerate(runners) if results[i] is None]
    parts = groups([plans[i] for i in open_], max_memory) if open_ else []
    for g in parts:
        idx = [open_[j] for j in g]
        group_runners = [runners[i] for i in idx]
        if log is not None:
            log(f"sweep: reading the inputs once for {len(idx)} candidate(s)"
                + (f" (group {parts.index(g) + 1} of {len(parts)})" if len(parts) > 1 else ""))
        group = SweepGroup(group_runners, max_memory, quiet, idx)
        group.cluster = cluster
        lead = group.lead
        with lead.compute_threads(), MemoryMonitor() as mem:
            for m in group.members:  # every candidate uses the group's compute pool
                m.runner.pool = lead.pool
            try:
                t0 = time.perf_counter()
                group.run_passes()
                t_merge = time.perf_counter()
                group.run_merge()
                merge_s = time.perf_counter() - t_merge
                for m in group.members:
                    r = m.runner
                    if m.failed is not None:
                        r.abort()
                        continue
                    try:
                        with r.guard():
                            if not r.finished:
                                r.merge_seconds = merge_s
                                r.finish(m.state, r.extras, t0)
                            r.publish()
                    except TensorMergeError as e:
                        m.failed = e
            except KeyboardInterrupt:
                for m in group.members:
                    m.runner.writer.close()  # every OUT.partial stays, for --resume
                raise
            except BaseException:
                for m in group.members:
                    if m.failed is None:
                        m.runner.abort()
                raise
            finally:
                for m in group.members:
                    m.runner.pool = None
        for m in group.members:
            results[m.index] = m.failed if m.failed is not None else run_report(m.runner, mem, t0)
    return results  # type: ignore[return-value]


def describe_groups(plans: list[MergePlan], names: list[str], max_memory: int) -> list[str]:
    """What `plan` says of a sweep: the groups, their reads and their peak."""
    parts = groups(plans, max_memory)
    lines = [f"sweep: {len(plans)} candidate(s) in {len(parts)} read group(s) under --max-memory "
             f"{format_size(max_memory)}" + ("" if len(parts) == 1 else
                                            " (one chunk for all of them does not fit: the groups read in turn)")]
    for k, g in enumerate(parts, 1):
        blocks = sweep_blocks([plans[i] for i in g], max_memory)
        peak = max((sb.chunk_bytes(r1 - r0) for sb in blocks for r0, r1 in sb.chunks), default=0)
        stages = max(len(plans[i].passes) for i in g)
        read = sum(sb.read_bytes_per_row * sb.rows for sb in blocks)
        lines.append(f"  group {k}: {', '.join(names[i] for i in g)}")
        lines.append(f"    {stages} pass stage(s) + merge, read about {format_size(read)} per stage, "
                     f"estimated peak tensor memory {format_size(peak)}")
    return lines
