"""Per-tensor reductions (slerp's norms and dot product, the L1 norms of gta's rescale,
model_stock's cosines), read in a pass only where they must be.

Each is a set of float64 sums over a tensor's rows (`row_sums`: each row reduced in fixed
pieces), added exactly (fsum), so any grouping of rows gives the same totals and the same bytes.
A tensor merged in one chunk (most, under the default memory budget) has every row in that
chunk: the method computes its totals there (`Method.prepare` -> `fold`) and the engine's pass
skips it (`GlobalPass.folds`), so its inputs are read once, not twice. Tensors cut into several
chunks get the pass's map-reduce as before; the same rows, the same sums, the same result.
"""

from __future__ import annotations

from abc import abstractmethod

from typing import Any

import torch

from tensormerge.constants import PASS_SUB_FACTOR, SUB_CHUNK_ELEMENTS
from tensormerge.kernels import reference as K
from tensormerge.kernels.threads import pmap
from tensormerge.methods.base import BlockData, GlobalPass


def is_whole(data: BlockData) -> bool:
    """Whether `data` holds every row of its tensor."""
    if not data.full_shape:
        return True
    ref = data.inputs[0] if data.inputs else data.base
    return data.row_start == 0 and ref.shape[0] == data.full_shape[0]


class PerTensorPass(GlobalPass):
    """A pass of per-row float64 sums, `width` of them per row, made into one result per tensor.

    Subclasses give `row_partials` (the [width, rows] sums of one chunk's rows) and `result`
    (the tensor's result from the exact totals). Partials are placed in a vector over the
    tensor's rows (zero elsewhere), so adding them in any grouping is exact."""

    folds = True

    @abstractmethod
    def row_partials(self, data: BlockData) -> torch.Tensor:
        """The [width, rows] float64 sums of this chunk's rows."""

    @abstractmethod
    def result(self, totals: list[float], block: str, numel: int) -> Any:
        """The tensor's result from its `width` exact totals."""

    def wanted(self, data: BlockData) -> bool:
        """Whether this tensor needs the reduction at all (gta: only with a drop to rescale)."""
        return True

    def start(self, state: dict) -> dict:
        return {"sums": {}, "result": {}}

    def map(self, data: BlockData, state: dict) -> torch.Tensor | None:
        if not self.wanted(data):
            return None
        part = self.row_partials(data)
        rows = part.shape[1]
        total = data.full_shape[0] if data.full_shape else 1
        out = torch.zeros(part.shape[0], total, dtype=torch.float64)
        out[:, data.row_start:data.row_start + rows] = part
        return out

    def reduce(self, acc: dict, partial: torch.Tensor | None, block: str) -> dict:
        if partial is None:
            return acc
        if block in acc["sums"]:
            acc["sums"][block] += partial
        else:
            acc["sums"][block] = partial.clone()
        return acc

    def end_block(self, acc: dict, block: str, numel: int) -> dict:
        sums = acc["sums"].pop(block, None)
        if sums is not None:
            acc["result"][block] = self._finish(sums, block, numel)
        return acc

    def _finish(self, sums: torch.Tensor, block: str, numel: int) -> Any:
        try:
            totals = [K.exact_total(s) for s in sums]
        except OverflowError:
            totals = [float("inf")] * sums.shape[0]
        return self.result(totals, block, numel)

    def finish(self, acc: dict, state: dict) -> None:
        state[self.name] = acc["result"]

    def fold(self, data: BlockData) -> Any:
        """The tensor's result from a chunk holding all of its rows (None when it does not, or
        the tensor does not need it): the pass's row sums, from the same row pieces."""
        if not is_whole(data) or not self.wanted(data):
            return None
        row_numel = data.inputs[0][0].numel() if data.full_shape and data.inputs[0].shape[0] else 1
        rows = max(1, SUB_CHUNK_ELEMENTS // max(row_numel, 1)) * PASS_SUB_FACTOR
        # row pieces on a few threads (the engine has this chunk as one piece): placed in order
        sums = torch.cat(pmap(self.row_partials, list(data.row_slices(rows))), dim=1)
        numel = 1
        for s in data.full_shape:
            numel *= s
        return self._finish(sums, data.name, numel)

    def lookup(self, data: BlockData, state: dict) -> Any:
        """This tensor's result: folded in the chunk (data.prepared) or from the pass."""
        if data.prepared is not None:
            return data.prepared
        return state.get(self.name, {}).get(data.name)
