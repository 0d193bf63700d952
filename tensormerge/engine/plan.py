"""The merge plan: which blocks, in what order, cut into which row chunks, at what memory cost.

Everything here is decided from headers alone, before any tensor byte is read, so `plan`
prints exactly what `run` will do and a bad input is refused before work starts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tensormerge.constants import PASS_SUB_FACTOR, PIECE_BYTES, SUB_CHUNK_ELEMENTS
from tensormerge.engine.safetensors_format import element_size
from tensormerge.engine.sources import Checkpoint, TensorInfo
from tensormerge.engine.writer import side_files
from tensormerge.constants import ROW_KINDS
from tensormerge.errors import BudgetError, InputError, short
from tensormerge.methods.base import Method, Params
from tensormerge.sizes import format_size
from tensormerge.stats.bind import StatsBinding


@dataclass
class Block:
    """One output tensor: merged (floating point) or copied (integer buffers), maybe aliased."""

    name: str
    out_names: list[str]
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    kind: str  # "merge" | "copy"
    reads: list[str]  # name to read in each checkpoint: inputs..., then base
    read_bytes_per_row: int
    work_bytes_per_row: int
    chunks: list[tuple[int, int]] = field(default_factory=list)
    sub_rows: int = 1  # rows per compute sub-chunk (intermediates are this size, not the chunk's)
    max_piece_row_bytes: int = 0  # bytes per row of the largest single read or output buffer
    stats: dict[str, list[str]] = field(default_factory=dict)  # kind -> key in each model's store
    base_stats: dict[str, str] = field(default_factory=dict)  # kind -> key in the base's store
    fallback: str | None = None  # why the block is merged with the method's fallback
    base_missing: str | None = None  # which --base-stats kind the base's store lacks (taken as zero)
    fixed_bytes: int = 0  # whole-block statistics and their factorisations, held across chunks
    extra_reads: dict[str, str] = field(default_factory=dict)  # extra checkpoint role -> name
    splits: bool = True
    transposed: bool = False  # merged whole, as its transpose: a Conv1D weight [in, out] with Grams of [out, in]
    produce: Any = None  # kind "derived": rows (r0, r1) -> tensor, computed by the planner's module (engine.lora)
    params: Params | None = None  # this block's own values when a parameter varies per tensor (methods.rules)

    @property
    def merge_shape(self) -> tuple[int, ...]:
        """The shape the method sees (the transpose of a Conv1D weight)."""
        return self.shape[::-1] if self.transposed else self.shape

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_bytes_per_row(self) -> int:
        return (self.numel // self.rows if self.rows else 0) * element_size(self.out_dtype)

    def chunk_bytes(self, rows: int) -> int:
        """Bytes held for a chunk of `rows` rows: reads double-buffered, output written behind,
        and the intermediates of one compute sub-chunk."""
        return rows * (2 * self.read_bytes_per_row + 2 * self.out_bytes_per_row) + self.work_bytes(rows) + self.fixed_bytes

    def work_bytes(self, rows: int) -> int:
        """Intermediates of the largest compute sub-chunk (passes use the larger ones)."""
        return min(rows, self.sub_rows * PASS_SUB_FACTOR) * self.work_bytes_per_row


@dataclass
class MergePlan:
    method: Method
    params: Params
    inputs: list[Checkpoint]
    base: Checkpoint | None
    blocks: list[Block]
    max_memory: int
    passes: list[str]
    stats: StatsBinding | None = None
    extras: dict[str, Checkpoint] = field(default_factory=dict)
    weights_name: str | None = None  # one weights file of this name (a PEFT adapter's), else model*.safetensors
    json_files: dict[str, dict] = field(default_factory=dict)  # side files written, not copied (adapter_config.json)
    side_dir: str | None = None  # where side files are copied from, when not the reference's directory
    lora: Any = None  # engine.lora.LoraPlan of a merge of adapters

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    @property
    def ref(self) -> Checkpoint:
        """The checkpoint whose names, order, dtypes and side files the output follows."""
        return self.base if self.base is not None else self.inputs[0]

    @property
    def checkpoints(self) -> list[Checkpoint]:
        return self.inputs + ([self.base] if self.base is not None else [])

    @property
    def merge_blocks(self) -> list[Block]:
        return [b for b in self.blocks if b.kind == "merge"]

    def pass_blocks(self, gpass) -> list[Block]:
        """The blocks a global pass maps: every merged block, less (for a pass whose results the
        merge folds in, GlobalPass.folds) those merged in one chunk."""
        return [b for b in self.merge_blocks if not gpass.folds or len(b.chunks) > 1]

    @property
    def bytes_read_merge(self) -> int:
        return sum(b.read_bytes_per_row * b.rows for b in self.blocks)

    @property
    def bytes_read_pass(self) -> int:
        return sum(b.read_bytes_per_row * b.rows for b in self.merge_blocks)

    @property
    def bytes_written(self) -> int:
        return sum(b.out_bytes_per_row * b.rows * len(b.out_names) for b in self.blocks)

    @property
    def peak_estimate(self) -> int:
        return max((b.chunk_bytes(r1 - r0) for b in self.blocks for r0, r1 in b.chunks), default=0)

    def summary(self) -> str:
        """The plan's header lines: what `run` prints before any tensor byte is read."""
        return "\n".join(self._header())

    def table(self, limit: int = 40) -> str:
        return "\n".join(self._header() + self._rows(limit))

    def _header(self) -> list[str]:
        return [
            f"method {self.method.name}  params {self.params.as_dict()}",
            f"inputs {len(self.inputs)}" + (" + base" if self.base is not None else "")
            + f"  blocks {len(self.blocks)} ({len(self.merge_blocks)} merged)"
            + f"  passes {' -> '.join(self.passes + ['merge'])}",
            f"max memory {format_size(self.max_memory)}  estimated peak tensor memory {format_size(self.peak_estimate)}",
            f"read {format_size(self.bytes_read_merge + len(self.passes) * self.bytes_read_pass)}"
            f"  write {format_size(self.bytes_written)}",
        ] + self._stats_lines()

    def _stats_lines(self) -> list[str]:
        if self.stats is None:
            return []
        used = [b for b in self.merge_blocks if b.stats]
        kinds = sorted({k for b in used for k in b.stats})
        fallback, label = self.fallback_blocks, self.method.fallback_label
        line = (f"statistics {len(self.stats.stores)} store(s)" + (" + base" if self.stats.base else "")
                + f"  {len(used)} blocks merged with {', '.join(kinds) or 'none'}"
                + f"  {len(fallback)} {label} for lack of statistics")
        lines = [line]
        for path in self.stats.unverified():
            lines.append(f"  unverified {path}: a version-1 store records no chunk checksums")
        for name, why in list(fallback.items())[:5]:
            lines.append(f"  {label} {name}: {why}")
        if len(fallback) > 5:
            lines.append(f"  ... {len(fallback) - 5} more (`run --report FILE` lists all)")
        missing = self.base_stats_missing
        if missing:
            lines.append(f"  {len(missing)} without base statistics, taken as zero")
            lines += [f"  base statistics {name}: {why}" for name, why in list(missing.items())[:5]]
            if len(missing) > 5:
                lines.append(f"  ... {len(missing) - 5} more (`run --report FILE` lists all)")
        return lines

    @property
    def base_stats_missing(self) -> dict[str, str]:
        return {b.name: b.base_missing for b in self.blocks if b.base_missing}

    @property
    def fallback_blocks(self) -> dict[str, str]:
        return {b.name: b.fallback for b in self.blocks if b.fallback}

    def _rows(self, limit: int) -> list[str]:
        varying = list(getattr(self.params, "rules", {}))
        lines = ["", f"{'block':<60} {'shape':<18} {'dtype':<9} {'kind':<6} {'chunks':>6} {'chunk MiB':>9}"
                 + ("  " + " ".join(varying) if varying else "")]
        for b in self.blocks[:limit]:
            big = max(r1 - r0 for r0, r1 in b.chunks)
            name = b.name + (f" (+{len(b.out_names) - 1} tied)" if len(b.out_names) > 1 else "")
            values = b.params.as_dict() if b.params is not None else {}
            shown = "  " + " ".join(f"{k}={_show(values[k])}" for k in varying) if values else ""
            lines.append(f"{name[:60]:<60} {str(list(b.shape)):<18} {str(b.out_dtype).replace('torch.', ''):<9} "
                         f"{b.kind:<6} {len(b.chunks):>6} {b.chunk_bytes(big) / 2**20:>9.1f}{shown}")
        if len(self.blocks) > limit:
            lines.append(f"... {len(self.blocks) - limit} more blocks")
        return lines


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def per_tensor(method: Method, params: Params, ref: Checkpoint, n_inputs: int) -> tuple[Params, dict[str, Params]]:
    """Each merged tensor's parameters when some vary (methods.rules), resolved and validated
    before any work; and the plan's own: the first tensor's values, which the method's
    model-wide hooks see, recording the rules (`as_dict`) for the fingerprint, recipe and card."""
    varying = params.varying()
    params.check_varying(method.name, varying)
    names = [n for n, info in ref.tensors.items() if ref.canonical(n) == n and info.is_float and info.numel]
    where = _rules_positions(ref)
    resolved = {n: params.at(method.name, n_inputs, n, where[n]) for n in names}
    first = resolved[names[0]] if names else params.at(method.name, n_inputs, "", 0.0)
    shown = copy.copy(first)  # with what validate set beside the fields
    shown.rules = {k: v for k, v in params.as_dict().items() if k in varying}
    shown.per_block = resolved
    return shown, resolved


def _rules_positions(ref: Checkpoint) -> dict[str, float]:
    from tensormerge.methods.rules import layer_positions

    return layer_positions(ref.tensors)


def _tie_groups(ref: Checkpoint) -> dict[str, list[str]]:
    """For each canonical name of the reference, every name sharing its storage (the canonical
    first). One list per storage: a list per name would hold a group of k tied names k times
    (a 0.5 MB header naming one range 8000 times: 64M references, ~0.8 GB)."""
    by_canon: dict[str, list[str]] = {}
    for n in ref.tensors:
        canon = ref.canonical(n)
        group = by_canon.setdefault(canon, [canon])
        if n != canon:
            group.append(n)
    return by_canon


def _resolve_name(ckpt: Checkpoint, group: list[str]) -> str | None:
    """The name to read in `ckpt` for a reference tensor: tied names may be stored under another."""
    for n in group:
        if n in ckpt.tensors:
            return ckpt.canonical(n)
    return None


def check_compatible(ref: Checkpoint, others: list[Checkpoint]) -> None:
    """All inputs hold the same tensors with the same shapes; every difference is listed (the
    first few of each kind). Linear in the names: each tie group is resolved once per input."""
    problems: list[str] = []
    ref_names = set(ref.tensors)
    groups = _tie_groups(ref)
    for ck in others:
        resolved = {canon: _resolve_name(ck, group) for canon, group in groups.items()}
        found = {n: ck.canonical(n) if n in ck.tensors else resolved[ref.canonical(n)] for n in ref.tensors}
        missing = [n for n, other in found.items() if other is None]
        tied: dict[str, bool] = {}  # per storage of ck: does any of its names appear in ref?
        for m in ck.tensors:
            c = ck.canonical(m)
            tied[c] = tied.get(c, False) or m in ref_names
        extra = [n for n in ck.tensors if not tied[ck.canonical(n)]]
        if missing:
            problems.append(f"{ck.spec} lacks {_few(missing)}")
        if extra:
            problems.append(f"{ck.spec} has extra {_few(extra)}")
        shapes = []
        for n, t in ref.tensors.items():
            other = found[n]
            if other is not None and ck.tensors[other].shape != t.shape:
                shapes.append(f"{short(n)} is {list(t.shape)} in {ref.spec} but {list(ck.tensors[other].shape)} "
                              f"in {ck.spec}")
            if other is not None and dtype_kind(ck.tensors[other].dtype) != dtype_kind(t.dtype):
                shapes.append(f"{short(n)} is {dtype_kind(t.dtype)} ({_dt(t.dtype)}) in {ref.spec} but "
                              f"{dtype_kind(ck.tensors[other].dtype)} ({_dt(ck.tensors[other].dtype)}) in {ck.spec}")
        problems += shapes[:_FEW] + ([f"(+{len(shapes) - _FEW} more tensors differ)"] if len(shapes) > _FEW else [])
    problems += _untied(ref, others, groups)
    if problems:
        raise InputError("inputs differ: " + "; ".join(problems))


def dtype_kind(dtype: torch.dtype) -> str:
    """What a tensor's values mean: floating-point weights are merged, integer ids and boolean
    masks are copied; a tensor of one kind in a model and another in the next is no merge at all."""
    if dtype.is_floating_point:
        return "floating point"
    return "bool" if dtype == torch.bool else "integer"


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _untied(ref: Checkpoint, others: list[Checkpoint], groups: dict[str, list[str]]) -> list[str]:
    """Names the reference ties (one storage, e.g. lm_head and the embedding) that another model
    stores apart. Merging name by name would read one of its tensors and drop the other, and a
    tied output cannot hold two merged tensors; so it is refused (an untied reference is fine: a
    tied model's lm_head is its embedding, and is read as such)."""
    out = []
    for n, group in groups.items():
        if n != ref.canonical(n) or len(group) < 2:
            continue
        apart = [ck.spec for ck in others if len({ck.canonical(m) for m in group if m in ck.tensors}) > 1]
        if apart:
            out.append(f"{ref.spec} ties {_few(group)} (one tensor) but {', '.join(apart)} store(s) them apart "
                       "(untie the reference: save it with tie_word_embeddings=false)")
    return out


_FEW = 8


def _few(names: list[str], n: int = _FEW) -> str:
    shown = ", ".join(short(x) for x in names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")


def build_plan(method: Method, params: Params, inputs: list[Checkpoint], base: Checkpoint | None,
               max_memory: int, dtype: torch.dtype | None, stats: StatsBinding | None = None,
               extras: dict[str, Checkpoint] | None = None) -> MergePlan:
    extras = extras or {}
    ref = base if base is not None else inputs[0]
    by_tensor: dict[str, Params] = {}
    if params.varying():  # first: the method's hooks below see validated values
        params, by_tensor = per_tensor(method, params, ref, len(inputs))
    method.check_inputs(params, len(inputs), base is not None)
    if method.requires_base(params) and base is None:
        raise InputError(f"method {method.name!r} needs --base" + _why_base(method, params))
    everyone = inputs + ([base] if base is not None else [])
    check_compatible(ref, [c for c in everyone if c is not ref] + list(extras.values()))
    if ref.config_dir:
        side_files(ref.config_dir)  # a side file linked out of the checkpoint is refused now, not after the merge
    passes = [p.name for p in method.passes(params)]

    groups = _tie_groups(ref)
    blocks: list[Block] = []
    by_canonical: dict[str, Block] = {}
    for name, info in ref.tensors.items():
        canon = ref.canonical(name)
        if canon in by_canonical:
            by_canonical[canon].out_names.append(name)
            continue
        info = ref.tensors[canon]
        block = _make_block(method, params, canon, info, everyone, groups[canon], base is not None, dtype, len(inputs))
        if block.kind == "merge":
            block.params = by_tensor.get(canon)
            _bind_block(method, params, block, groups[canon], stats, len(inputs))
            for role, ck in extras.items():
                block.extra_reads[role] = _resolve_name(ck, groups[canon])
                block.read_bytes_per_row += info.row_numel * element_size(ck.tensors[block.extra_reads[role]].dtype)
        by_canonical[canon] = block
        blocks.append(block)
    for b in blocks:
        row_numel = b.numel // b.rows if b.rows else 1
        b.splits = b.kind == "copy" or (not b.transposed and method.splits(params, b.shape, bool(b.stats)))
        # rows of zero elements ([n, 0] tensors): one sub-chunk, however many rows are claimed
        sub = max(1, SUB_CHUNK_ELEMENTS // row_numel) if row_numel else max(b.rows, 1)
        b.sub_rows = -(-sub // method.row_align) * method.row_align if b.splits else max(b.shape, default=1)
        b.chunks = _chunks(method, b, max_memory)
    return MergePlan(method, params, inputs, base, blocks, max_memory, passes, stats, extras)


def _why_base(method: Method, params: Params) -> str:
    init = getattr(params, "init", None)
    return f" (init={init})" if init else ""


def _bind_block(method: Method, params: Params, block: Block, names: list[str], stats: StatsBinding | None,
                n_inputs: int) -> None:
    """Which statistics the block is merged with, what they cost to read and hold, or why the
    block falls back."""
    wanted = method.block_stats(params, block.shape)
    if not wanted or stats is None:
        return
    if len(block.shape) == 2 and any(k in ("gram_in", "gram_out") for k in wanted) and stats.transposed(names):
        block.transposed = True
        wanted = method.block_stats(params, block.merge_shape)
        block.fixed_bytes += 2 * block.read_bytes_per_row * block.rows  # transposed copies of the reads
    per_row = block.numel // block.rows if block.rows else 1
    for kind in wanted:
        keys, missing = stats.lookup(kind, names)
        if keys is None:
            who = ", ".join(stats.stores[i].path for i in missing)
            block.read_bytes_per_row -= sum(4 * per_row * n_inputs for k in block.stats if k in ROW_KINDS)
            block.fallback = f"no {kind} in {who}"
            block.stats = {}
            block.fixed_bytes = 0
            block.transposed = False
            return
        block.stats[kind] = keys
        if kind in ROW_KINDS:
            block.read_bytes_per_row += 4 * per_row * n_inputs
        else:
            block.fixed_bytes += sum(stats.stores[i].nbytes(kind, k) for i, k in enumerate(keys))
    for kind in method.base_block_stats(params, block.shape):
        key = stats.lookup_base(kind, names)
        if key is not None:
            block.base_stats[kind] = key
            block.read_bytes_per_row += 4 * per_row if kind in ROW_KINDS else 0
        elif stats.base is not None:  # a store was given and lacks it: say so, as for the models'
            block.base_missing = f"no {kind} in {stats.base.path} (taken as zero)"
    block.fixed_bytes += method.fixed_bytes(params, block.merge_shape, n_inputs)


def _make_block(method: Method, params: Params, name: str, info: TensorInfo, everyone: list[Checkpoint],
                group: list[str], has_base: bool, dtype: torch.dtype | None, n_inputs: int) -> Block:
    reads = [_resolve_name(ck, group) for ck in everyone]
    row_numel = info.row_numel
    if info.is_float and info.numel:
        kind = "merge"
        out_dtype = dtype or info.dtype
        readers = everyone if (method.requires_base(params) or not has_base) else everyone[:n_inputs]
        work = method.work_bytes_per_element(n_inputs, params) * row_numel
    else:
        # integer and bool tensors are copied (all must agree); an empty tensor ([0, n]) has no
        # element to merge: copied too, in the output dtype, and skipped by global passes
        kind = "copy"
        out_dtype = (dtype or info.dtype) if info.is_float else info.dtype
        readers = everyone
        work = 0
    sizes = [element_size(ck.tensors[r].dtype) for ck, r in zip(everyone, reads) if ck in readers]
    block = Block(name, [name], info.shape, out_dtype, kind, reads, row_numel * sum(sizes), work)
    block.max_piece_row_bytes = row_numel * max(sizes + [element_size(out_dtype)])
    return block


def _chunks(method: Method, b: Block, max_memory: int) -> list[tuple[int, int]]:
    whole = b.chunk_bytes(b.rows)
    fits_piece = b.rows * b.max_piece_row_bytes <= PIECE_BYTES or not b.splits
    if (whole <= max_memory and fits_piece) or b.rows <= 1:
        if whole > max_memory:
            raise BudgetError(f"block {b.name!r} needs {format_size(whole)} but --max-memory is {format_size(max_memory)}")
        return [(0, b.rows)]
    if not b.splits:
        raise BudgetError(f"block {b.name!r} cannot be split and needs {format_size(whole)}; "
                          f"--max-memory is {format_size(max_memory)}")
    align = min(method.row_align, b.rows)
    least = b.chunk_bytes(align)
    if least > max_memory:
        what = "one row" if align == 1 else f"{align} rows (the method's row tile)"
        raise BudgetError(f"block {b.name!r}: {what} need(s) {format_size(least)} but --max-memory is "
                          f"{format_size(max_memory)}")
    per = max(1, b.chunk_bytes(1) - b.fixed_bytes)
    rows = max(1, min((max_memory - b.fixed_bytes) // per, PIECE_BYTES // max(b.max_piece_row_bytes, 1)))
    rows = max(align, rows // align * align)
    return [(r, min(r + rows, b.rows)) for r in range(0, b.rows, rows)]
