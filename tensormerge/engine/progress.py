"""The progress bars of a run and of a sweep: one per pass, with the whole run's time left.

A bar counts the bytes its pass reads (what the time goes on) and the blocks it has finished;
`Overall` carries the run's total across its bars, so each bar can say how long the whole run
has left, not only its own pass. With `--quiet` there are no bars: every call takes `None`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tensormerge.engine.executor import Task


@dataclass
class Overall:
    """Bytes the run's bars will read in all, and read so far: the whole run's time left,
    estimated from its pace so far (a method's passes read about as fast as its merge)."""

    total: int
    done: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def left(self) -> str:
        if self.done <= 0 or self.done >= self.total:
            return ""
        seconds = int((time.perf_counter() - self.t0) * (self.total - self.done) / self.done)
        return f", run ~{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} left"


class Progress:
    def __init__(self, passes, quiet: bool):
        self.passes = passes  # the method's global passes, in order; the merge pass follows them
        self.quiet = quiet
        self.overall: Overall | None = None

    def stage(self, name: str, label: str) -> str:
        """A bar's description: what the pass does and where it stands among the run's passes
        (a pass found not needed is skipped without a bar, so the count may jump)."""
        names = [p.name for p in self.passes] + ["merge"]
        wide = max([len(p.label or p.name) for p in self.passes] + [len("merge")])
        return f"{names.index(name) + 1}/{len(names)} {label or name:<{wide}}"

    def bar(self, desc: str, total: int, blocks: int):
        if self.quiet:
            return None
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"{desc:<10}", unit="B", unit_scale=True, unit_divisor=1024, leave=True,
                   dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                   "[{elapsed}, {rate_fmt}{postfix}]")
        bar.blocks_total = blocks
        bar.blocks_done = 0
        bar.note = ""
        bar.overall = self.overall
        bar.set_postfix_str(f"blocks 0/{blocks}")
        return bar

    @staticmethod
    def advance(bar, task: Task, last: bool) -> None:
        if bar is None:
            return
        if bar.overall is not None:
            bar.overall.done += task.read_bytes
        if last:
            bar.blocks_done += 1
            note = f", {bar.note}" if bar.note else ""
            left = bar.overall.left() if bar.overall is not None else ""
            bar.set_postfix_str(f"blocks {bar.blocks_done}/{bar.blocks_total}{note}{left}", refresh=False)
        bar.update(task.read_bytes)

    @staticmethod
    def skip(bar, nbytes: int, block_done: bool) -> None:
        """Bytes an interrupted run already merged (--resume): on the bar, not in the time left."""
        if bar is None:
            return
        bar.update(nbytes)
        if bar.overall is not None:
            bar.overall.total -= nbytes
        if block_done:
            bar.blocks_done += 1

    @staticmethod
    def close(bar) -> None:
        if bar is not None:
            bar.close()
