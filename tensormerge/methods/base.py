"""What a merge method is to the engine: typed parameters, needs, passes, and pure arithmetic.

A method never opens a file or decides an order. It receives `BlockData` (the rows of one
tensor from every model, in their stored dtypes) and returns the merged rows. Methods that need
quantities over the whole model (TIES' global top-k) declare `GlobalPass`es, which the engine
runs as map-reduce over the same blocks before the merge pass.
"""

from __future__ import annotations

import dataclasses
import math
import types
from abc import ABC, abstractmethod
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tensormerge.constants import ROW_KINDS
from tensormerge.errors import ParameterError, short
from tensormerge.methods import rules as R

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class BlockData:
    """Rows [row_start, row_start + rows) of one tensor, from each model (and the base).

    `stats` holds each model's statistics by kind: `fisher` sliced to the same rows, the
    matrices (`gram_in`, `gram_out`, `fisher_block`) whole, and only on a block's first chunk;
    `prepared` is what `Method.prepare` made of them, shared by every chunk of the block.
    """

    name: str
    inputs: list[torch.Tensor]
    base: torch.Tensor | None
    full_shape: tuple[int, ...]
    row_start: int = 0
    stats: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    base_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    prepared: Any = None
    ops: Any = None  # the kernel module of this run (kernels.dispatch); None: the torch reference
    ready: Any = None  # CUDA event recorded after this chunk's host-to-device copies

    @property
    def flat_start(self) -> int:
        """Index of this chunk's first element in the flattened tensor: DARE keys masks on it."""
        row_numel = 1
        for s in self.full_shape[1:]:
            row_numel *= s
        return self.row_start * row_numel

    def row_slices(self, rows: int):
        """Row slices of this chunk (views, no copies) of at most `rows` rows, each a BlockData of
        its own: the engine's compute sub-chunks, and a method's per-row pieces. Statistics with
        the parameter's shape are sliced alike, whole matrices and the prepared state shared."""
        n = self.inputs[0].shape[0] if self.full_shape else 1
        if not self.full_shape or rows >= n:
            yield self
            return
        for s in range(0, n, rows):
            e = min(s + rows, n)
            stats = {k: ([x[s:e] for x in v] if k in ROW_KINDS else v) for k, v in self.stats.items()}
            base_stats = {k: (v[s:e] if k in ROW_KINDS else v) for k, v in self.base_stats.items()}
            yield BlockData(self.name, [x[s:e] for x in self.inputs], None if self.base is None else self.base[s:e],
                            self.full_shape, self.row_start + s, stats, base_stats,
                            {k: v[s:e] for k, v in self.extra.items()}, self.prepared, self.ops)


def param(default: Any, help: str, *, key: str | None = None, choices: tuple | None = None) -> Any:
    """A method parameter: its default, help text and (optionally) its CLI key and choices."""
    meta = {"help": help, "key": key, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Params:
    """Base of every method's parameters; subclasses are dataclasses built with `param`."""

    @classmethod
    def spec(cls) -> list[tuple[str, dataclasses.Field, Any]]:
        hints = typing.get_type_hints(cls)
        return [(f.metadata.get("key") or f.name, f, hints[f.name]) for f in dataclasses.fields(cls)]

    @classmethod
    def from_strings(cls, method: str, raw: dict[str, Any], n_models: int) -> "Params":
        names = {key: f.name for key, f, _ in cls.spec()}
        params = cls(**{names[key]: value for key, value in cls.typed(method, raw).items()})
        if not params.varying():  # per-tensor values are validated per block, as the plan resolves them
            params.validate(method, n_models)
        return params

    def varying(self) -> list[str]:
        """Keys whose value is a rule list or gradient (methods.rules): resolved per tensor."""
        return [key for key, f, _ in self.spec() if R.varies(getattr(self, f.name))]

    def check_varying(self, method: str, keys: list[str]) -> None:
        """Refuse per-tensor values of parameters the method needs model-wide (subclasses)."""

    def for_block(self, name: str) -> "Params":
        """A plan's per-tensor values of block `name` (itself when none vary): for passes and
        patches, which the engine hands the plan's parameters."""
        return getattr(self, "per_block", {}).get(name, self)

    def at(self, method: str, n_models: int, name: str, t: float) -> "Params":
        """This tensor's parameters, every value a plain one, validated."""
        values = {}
        for key, f, tp in self.spec():
            value = getattr(self, f.name)
            if R.varies(value):
                try:
                    value = R.resolve(value, name, t)
                except R.NoMatch:
                    raise ParameterError(f"{method}: parameter {key!r}: no rule matches tensor {short(name)} "
                                         "(end the rules with a default {value: ...})") from None
                value = _convert(method, key, value, tp, f.metadata.get("choices"))
            values[f.name] = value
        out = dataclasses.replace(self, **values)
        out.validate(method, n_models)
        return out

    @classmethod
    def typed(cls, method: str, raw: dict[str, Any]) -> dict[str, Any]:
        """The given values read as their parameters' types, by key: `-p` text and YAML values
        go through this one reader, so both are recorded alike (numbers, booleans, lists)."""
        fields = {key: (f, tp) for key, f, tp in cls.spec()}
        values = {}
        for key, text in raw.items():
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise ParameterError(f"method {method!r} has no parameter {short(key)} (its parameters: {known})")
            f, tp = fields[key]
            values[key] = _convert(method, key, text, tp, f.metadata.get("choices"))
        return values

    def validate(self, method: str, n_models: int) -> None:
        """Range checks; subclasses extend (after this). Per-model lists must have one value per
        model; no float parameter may be NaN or infinite (a NaN λ would merge without complaint
        and blame the inputs' values once a check sees the output)."""
        for key, f, _ in self.spec():
            value = getattr(self, f.name)
            for x in value if isinstance(value, list) else [value]:
                if isinstance(x, float) and not math.isfinite(x):
                    raise ParameterError(f"{method}: parameter {key!r} is {x}, must be a finite number")
                if isinstance(x, float) and abs(x) > FLOAT32_MAX:  # the kernels take their parameters as float32
                    raise ParameterError(f"{method}: parameter {key!r} is {x:g}, beyond float32's largest "
                                         f"({FLOAT32_MAX:g})")
            if isinstance(value, list) and len(value) != n_models:
                raise ParameterError(f"{method}: parameter {key!r} has {len(value)} values for {n_models} models")

    def as_dict(self) -> dict[str, Any]:
        """Values by key; per-tensor ones in their YAML form (a plan's params hold them in `rules`)."""
        out = {key: R.plain(getattr(self, f.name)) for key, f, _ in self.spec()}
        out.update(getattr(self, "rules", {}))
        return out


def _convert(method: str, key: str, text: Any, tp: Any, choices: tuple | None) -> Any:
    where = f"{method}: parameter {key!r}"
    if R.is_form(text):
        return R.parse(text, lambda v: _convert(method, key, v, tp, choices), where)
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if isinstance(text, str) and text.lower() in ("none", "null", ""):
            return None
    try:
        if typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp)
            items = text if isinstance(text, (list, tuple)) else str(text).split(",")
            return [R.parse(x, lambda v: _scalar(item, v), where) if R.is_form(x) else _scalar(item, x)
                    for x in items]
        value = _scalar(tp, text)
    except (TypeError, ValueError):
        listed = typing.get_origin(tp) is list
        what = f"a list of {typing.get_args(tp)[0].__name__}" if listed else getattr(tp, "__name__", tp)
        hint = ""
        if isinstance(text, str) and text.strip().startswith("["):
            hint = f" (a list is its values separated by commas, without brackets: {key}=1,2)"
        elif isinstance(text, str) and ("|" in text or ("," in text and not listed)):
            hint = " (several values to try: `tensormerge sweep`)"
        raise ParameterError(f"{where}: cannot read {short(text)} as {what}{hint}") from None
    if choices and value not in choices:
        raise ParameterError(f"{where}: {short(value)} is not one of {', '.join(map(str, choices))}")
    return value


def _scalar(tp: Any, text: Any) -> Any:
    if tp is bool:
        if isinstance(text, bool):
            return text
        low = str(text).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if tp in (float, int) and isinstance(text, bool):  # YAML's `true` is no number (float(True) would be 1.0)
        raise ValueError(text)
    if tp is float:
        return float(text)
    if tp is int:
        return int(text)
    return str(text).strip()


class GlobalPass(ABC):
    """A map-reduce over every floating-point block before the merge pass.

    `map` runs on the compute thread per chunk and returns a small partial; `reduce` folds it
    into the accumulator in plan order; `end_block` is told when a block's last chunk is in
    (so per-tensor state can be compacted); `finish` turns the accumulator into method state.
    """

    name: str = "pass"
    label: str = ""  # what the pass does, in the progress bar's words (the name when empty)
    sample: float = 1.0  # fraction of each chunk's rows the engine reads for this pass
    needs_inputs: bool = True  # False: the pass reads statistics only (Fisher norms)
    # True: per-tensor results that a block merged in one chunk computes from that chunk itself
    # (Method.prepare, methods/per_tensor.py), so the engine maps only blocks of several chunks
    folds: bool = False

    def start(self, state: dict) -> Any:
        return {}

    def skip(self, state: dict) -> bool:
        """True when earlier passes already know the result: the engine then reads nothing and
        calls `finish(start(state), state)`."""
        return False

    def skip_in_sweep(self) -> bool:
        """True when a sweep's shared maps of the later passes (`map_group`) never use this
        pass's result: a sweep then skips it as it would for `skip`."""
        return False

    @abstractmethod
    def map(self, data: BlockData, state: dict) -> Any:
        """A small partial from one chunk (histograms, sums), computed off the main thread."""

    @abstractmethod
    def reduce(self, acc: Any, partial: Any, block: str) -> Any:
        """Fold one partial into the accumulator; called in plan order, so sums are stable."""

    def end_block(self, acc: Any, block: str, numel: int) -> Any:
        return acc

    def group_key(self) -> Any:
        """Passes of a sweep's candidates with equal keys (not None) map each chunk together
        through `map_group`, so work that does not depend on what differs between them is done
        once (TIES' histograms for several k)."""
        return None

    def map_group(self, datas: list[BlockData], passes: list["GlobalPass"], states: list[dict]) -> list[Any]:
        """The partials of several candidates' passes (this one first) for the same rows."""
        return [p.map(d, s) for p, d, s in zip(passes, datas, states)]

    def finish(self, acc: Any, state: dict) -> None:
        state[self.name] = acc


@dataclass
class Patch:
    """Elements of a written tensor to overwrite after the merge pass (flat indices, values)."""

    name: str
    index: torch.Tensor
    values: torch.Tensor


class Method(ABC):
    """A merge method: subclasses set the class attributes and implement `merge`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    citation: ClassVar[str] = ""  # the paper, one line: the output's model card and `methods NAME` show it
    Params: ClassVar[type[Params]]
    needs_base: ClassVar[bool] = False
    row_split: ClassVar[bool] = True
    uses_stats: ClassVar[bool] = False  # takes --stats (one store per input)
    uses_base_stats: ClassVar[bool] = False  # takes --base-stats
    row_align: ClassVar[int] = 1  # chunks start at multiples of this many rows (fixed-shape products)
    fallback_label: ClassVar[str] = "averaged"  # what `fallback` does, in the plan's and report's words

    def requires_base(self, params: Params) -> bool:
        return self.needs_base

    def check_inputs(self, params: Params, n_inputs: int, has_base: bool) -> None:
        """Refuse (InputError) a combination of inputs and --base the method cannot merge (slerp's
        two endpoints), at plan time, before anything is read."""

    def requires_stats(self, params: Params) -> bool:
        return self.uses_stats

    def extra_checkpoints(self, params: Params) -> dict[str, str]:
        """Further checkpoints read block by block beside the inputs (MaTS' init model)."""
        return {}

    def block_stats(self, params: Params, shape: tuple[int, ...]) -> tuple[str, ...]:
        """Statistics kinds a block of this shape is merged with; when any model's store lacks
        one of them the block falls back to `fallback` and the report lists it."""
        return ()

    def base_block_stats(self, params: Params, shape: tuple[int, ...]) -> tuple[str, ...]:
        """Kinds read from --base-stats when present; a key the given store lacks is not passed
        (the method takes it as zero) and the report lists it."""
        return ()

    def splits(self, params: Params, shape: tuple[int, ...], with_stats: bool) -> bool:
        """Whether a block may be merged in row chunks (CG blocks may not; their averages may)."""
        return self.row_split

    def fixed_bytes(self, params: Params, shape: tuple[int, ...], n_models: int) -> int:
        """Bytes held for a whole block besides its chunks (factorisations of its statistics)."""
        return 0

    def prepare(self, data: BlockData, params: Params) -> Any:
        """Per-block state from the block's whole statistics, made once on its first chunk (and,
        where `prepares`, from the first chunk's rows: a folded pass's result)."""
        return None

    def prepares(self, params: Params) -> bool:
        """Whether `prepare` runs for blocks without statistics (a folding pass's method)."""
        return False

    def fallback(self, data: BlockData, params: Params) -> torch.Tensor:
        """Blocks whose statistics are missing: the uniform average, as the research code does."""
        from tensormerge.kernels.dispatch import ops

        n = len(data.inputs)
        return ops(data).weighted_sum(data.inputs, [1.0 / n] * n)

    def progress(self, extra: Any) -> str | None:
        """A short note for the progress bar from a block's extra (CG iterations, residual)."""
        return None

    def block_report(self, extras: Any) -> dict[str, dict]:
        """Per-block entries for the report from the accumulated extras."""
        return {}

    def run_summary(self, params: Params, notes: dict[str, dict]) -> list[str]:
        """Lines `run` prints after the merge from the per-block entries (MaTS' CG outcome)."""
        return []

    def run_warnings(self, params: Params, notes: dict[str, dict]) -> list[str]:
        """What likely is not what the user meant, said after the run (weights that do not sum to
        1, CG blocks short of tol); from the parameters and the per-block entries."""
        return []

    def work_bytes_per_element(self, n_models: int, params: Params) -> int:
        """Bytes of float32 intermediates per output element, for chunk sizing."""
        return 4 * (n_models + 3)

    def passes(self, params: Params) -> list[GlobalPass]:
        return []

    def counts_unchanged_tensors(self, params: Params) -> bool:
        """True when a tensor's merge depends on tensors that no model changed (TIES' global
        top-k counts their zero task vectors): `--lora full` then merges the tensors no adapter
        targets instead of copying the base's."""
        return False

    @abstractmethod
    def merge(self, data: BlockData, params: Params, state: dict) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Merged rows (float32 or wider), optionally with an extra for `patches`."""

    def fuse_key(self, params: Params) -> Any:
        """Sweep candidates of this method with equal keys (not None) are merged together by
        `merge_many`, which may share work between them (MaTS: one CG solve for several
        iteration counts). None: merged one by one."""
        return None

    def merge_many(self, datas: list[BlockData], params: list[Params], states: list[dict]) -> list[Any]:
        """What `merge` returns for each candidate, for the same rows; byte for byte the same."""
        return [self.merge(d, p, s) for d, p, s in zip(datas, params, states)]

    def start_extras(self, params: Params) -> Any:
        """Accumulator for the extras `merge` returns, folded in as each chunk is merged."""
        return []

    def add_extra(self, acc: Any, extra: Any) -> Any:
        acc.append(extra)
        return acc

    def patches(self, params: Params, state: dict, extras: Any) -> list[Patch]:
        """Fix-ups known only after every block was merged (TIES' global majority sign)."""
        return []

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "summary": self.summary,
            "citation": self.citation,
            "needs_base": self.requires_base(self.Params()),
            "row_split": self.row_split,
            "statistics": self.describe_stats(),
            "parameters": [
                {"key": key, "default": f.default if f.default is not dataclasses.MISSING else f.default_factory(),
                 "type": getattr(tp, "__name__", str(tp)), "help": f.metadata.get("help", ""),
                 "choices": f.metadata.get("choices")}
                for key, f, tp in self.Params.spec()
            ],
        }


    def describe_stats(self) -> str:
        return ""


REGISTRY: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    from tensormerge import methods  # noqa: F401  (imports register every built-in method)

    try:
        return REGISTRY[name]
    except KeyError:
        raise ParameterError(f"unknown method {short(name)} (available: {', '.join(sorted(REGISTRY))})") from None
