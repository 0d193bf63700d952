"""One model's statistics in a Zarr v3 store: the layout of SPEC §3, written and read by rows.

Why Zarr: statistics are as large as the model (a diagonal Fisher) or larger per layer (Grams),
so the engine must read only the rows of the block it merges; Zarr's row chunks give that, over
a local directory or any fsspec URL, with a float32-friendly codec (Blosc zstd + byte shuffle,
chosen by measurement in benchmarks/stats_codec.py).

Opening a store checks what metadata can show (format marker, keys, shapes, dtypes, the model
identity) against the model it is used with; values are checked as they are read, before the
block they feed is merged, so a NaN never reaches the output and no full extra pass is needed.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tensormerge import __version__
from tensormerge.constants import PARTIAL_SUFFIX, STATS_CHUNK_BYTES, STATS_FORMAT, STATS_KINDS
from tensormerge.errors import InputError, OutputError, short
from tensormerge.kernels.reference import all_finite


@contextlib.contextmanager
def _quiet():
    """We write and read consolidated metadata on purpose (one read opens a store of hundreds
    of arrays); zarr warns on every open that v3 has not standardised it yet."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        yield


def _is_url(path: str) -> bool:
    return "://" in path


def _codec():
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def row_chunks(shape: tuple[int, ...], target: int = STATS_CHUNK_BYTES) -> tuple[int, ...]:
    """Whole rows per chunk, about `target` bytes of float32: a row range reads few chunks."""
    if not shape:
        return ()
    row_bytes = 4 * math.prod(shape[1:])
    rows = max(1, min(shape[0], target // max(row_bytes, 1)))
    return (rows,) + tuple(shape[1:])


def is_vector(shape: tuple[int, ...]) -> bool:
    """One axis of length > 1 at most: a bias, a norm, or an IA3 vector (PEFT stores those as
    [d, 1] or [1, d]); a Fisher block of one is [numel, numel]."""
    return len(shape) >= 1 and math.prod(shape) == max(shape)


def expected_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape a statistic of `kind` has for a parameter of `shape`; None if it cannot exist."""
    if kind == "fisher":
        return tuple(shape)
    if kind == "gram_in":
        return (shape[1], shape[1]) if len(shape) == 2 else None
    if kind == "gram_out":
        return (shape[0], shape[0]) if len(shape) == 2 else None
    if kind == "fisher_block":
        return (math.prod(shape),) * 2 if is_vector(shape) else None
    raise ValueError(kind)


def bad_key(name) -> str | None:
    """Why `name` cannot be an array of a kind's group, or None. Keys are parameter names; zarr
    would take "..", "." or "zarr.json" as a path or its own metadata file (and so write outside
    the group, or fail half-way through a store)."""
    if not isinstance(name, str):
        return "not a string"
    if not name:
        return "empty"
    if name in (".", "..") or "/" in name or "\\" in name:
        return "a path, not a name"
    if name == "zarr.json" or name.startswith("__"):
        return "reserved by zarr"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "holds control characters"
    return None


# attribute: allowed types (None always allowed); a wrong one is refused when the store opens
_ROOT_ATTRS = {"model": dict, "n_examples": int, "fisher_type": str, "created_by": str}
_MODEL_ATTRS = {"identity": str, "spec": str}
_ARRAY_ATTRS = {"count": (int, float), "weight_layout": str, "source": str}


def _check_attrs(where: str, attrs: dict, types: dict) -> None:
    for key, tp in types.items():
        value = attrs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, tp)):
            want = " or ".join(t.__name__ for t in (tp if isinstance(tp, tuple) else (tp,)))
            raise InputError(f"{where} attribute {key!r} is {short(value)}, expected {want}")


@dataclass
class ArrayInfo:
    kind: str
    name: str
    shape: tuple[int, ...]
    attrs: dict[str, Any]


class StatsWriter:
    """Builds a store in PATH.partial (local paths) and renames it into place on `close`.

    With `append`, adds kinds to an existing store in place (a Fisher and Grams imported from
    separate research files end up in one store); a kind already there is refused unless
    `overwrite`, and `abort` removes only what this writer added."""

    def __init__(self, path: str, *, model: dict | None = None, n_examples: int | None = None,
                 fisher_type: str | None = None, created_by: str = "", overwrite: bool = False,
                 append: bool = False):
        import zarr

        self.path = path
        self.local = not _is_url(path)
        self.append = append and (not self.local or os.path.exists(path))
        self.overwrite = overwrite
        self.groups = {}
        self.added: list[str] = []
        self.count = 0
        if self.append:
            self.build = path
            existing = StatsStore(path)
            recorded = (existing.model or {}).get("identity")
            mine = (model or {}).get("identity")
            if recorded and mine and recorded != mine:
                raise OutputError(f"{path}: holds statistics of {existing.model.get('spec')}, not of "
                                  f"{(model or {}).get('spec')}; append to the store of the same model")
            with _quiet():
                self.root = zarr.open_group(path, mode="r+", zarr_format=3)
            updates = {k: v for k, v in {"model": model, "n_examples": n_examples, "fisher_type": fisher_type}.items()
                       if v is not None and existing.attrs.get(k) is None}
            self.root.attrs.update(updates)
            self._existing = existing
            return
        if self.local and os.path.exists(path) and not overwrite:
            raise OutputError(f"{path}: exists (pass --overwrite to replace it, or --append to add to it)")
        self.build = path + PARTIAL_SUFFIX if self.local else path
        if self.local and os.path.exists(self.build):
            shutil.rmtree(self.build)
        try:
            self.root = zarr.open_group(self.build, mode="w", zarr_format=3)
        except OSError as e:
            raise OutputError(f"{path}: cannot create the statistics store ({e})") from None
        self.root.attrs.update({
            "tensormerge_stats": STATS_FORMAT, "model": model, "n_examples": n_examples,
            "fisher_type": fisher_type, "created_by": created_by or f"tensormerge {__version__}",
        })

    def add(self, kind: str, name: str, value: torch.Tensor, count: float | int | None = None,
            **attrs: Any) -> None:
        """Write one statistic (float32), with `count`: what it was divided by."""
        if kind not in STATS_KINDS:
            raise ValueError(f"unknown statistics kind {kind!r}")
        why = bad_key(name)
        if why:
            raise InputError(f"{self.path}: {short(name)} cannot be a statistics key ({why})")
        if kind not in self.groups:
            if self.append and kind in self.root:
                if not self.overwrite and self._existing.arrays.get(kind):
                    raise OutputError(f"{self.path}: already holds {kind} statistics (pass --overwrite to replace them)")
                del self.root[kind]
            self.groups[kind] = self.root.require_group(kind)
            self.added.append(kind)
        data = value.detach().to(torch.float32).contiguous().cpu().numpy()
        arr = self.groups[kind].create_array(
            name, shape=data.shape, dtype="float32", chunks=row_chunks(data.shape),
            compressors=[_codec()], fill_value=0.0, overwrite=True,
            attributes={"count": count, **attrs})
        arr[...] = data
        self.count += 1

    def close(self) -> str:
        import zarr

        with _quiet():
            zarr.consolidate_metadata(self.build)
        if self.local and not self.append:
            from tensormerge.engine.outdir import publish

            try:
                publish(self.build, self.path, overwrite=self.overwrite, kind="stats")  # the old store goes last
            except OSError as e:
                raise OutputError(f"{self.path}: cannot put the store in place ({e.strerror or e})") from None
        return self.path

    def abort(self) -> None:
        if self.append:
            for kind in self.added:
                if kind in self.root:
                    del self.root[kind]
            return
        if self.local and os.path.exists(self.build):
            shutil.rmtree(self.build, ignore_errors=True)


class StatsStore:
    """A statistics store opened for reading: metadata in memory, values read by rows."""

    def __init__(self, path: str):
        import zarr

        self.path = path
        if not _is_url(path) and not os.path.exists(path):
            raise InputError(f"{path}: statistics store not found")
        try:
            with _quiet():
                self.root = zarr.open_group(path, mode="r", zarr_format=3)
            attrs = dict(self.root.attrs)
        except Exception as e:  # zarr raises several types for a directory that is not a store
            raise InputError(f"{path}: not a Zarr v3 statistics store ({e.__class__.__name__})") from None
        if attrs.get("tensormerge_stats") != STATS_FORMAT:
            raise InputError(f"{path}: not a tensormerge statistics store (root attribute "
                             f"'tensormerge_stats' is {attrs.get('tensormerge_stats')!r}, expected {STATS_FORMAT})")
        _check_attrs(f"{path}: root", attrs, _ROOT_ATTRS)
        _check_attrs(f"{path}: root attribute 'model':", attrs.get("model") or {}, _MODEL_ATTRS)
        self.attrs = attrs
        self.arrays: dict[str, dict[str, ArrayInfo]] = {}
        self._handles: dict[tuple[str, str], Any] = {}
        for kind in STATS_KINDS:
            self.arrays[kind] = {}
            if kind not in self.root:
                continue
            group = self.root[kind]
            for name, arr in group.arrays():
                if arr.dtype != np.float32:
                    raise InputError(f"{path}: {kind}/{short(name)} is {arr.dtype}, statistics must be float32")
                _check_attrs(f"{path}: {kind}/{short(name)}", arr.attrs, _ARRAY_ATTRS)
                self.arrays[kind][name] = ArrayInfo(kind, name, tuple(arr.shape), dict(arr.attrs))
                self._handles[(kind, name)] = arr
            others = [n for n, _ in group.groups()]
            if others:
                raise InputError(f"{path}: unexpected group {kind}/{others[0]} (keys are full parameter names)")
        unknown = [k for k in self.root.group_keys() if k not in STATS_KINDS]
        unknown += [k for k in self.root.array_keys()]
        if unknown:
            raise InputError(f"{path}: unknown entry {unknown[0]!r} (a store holds {', '.join(STATS_KINDS)})")

    def __repr__(self) -> str:
        return f"StatsStore({self.path!r})"

    def has(self, kind: str, name: str) -> bool:
        return name in self.arrays.get(kind, {})

    @property
    def model(self) -> dict | None:
        return self.attrs.get("model")

    def in_out(self, kind: str, name: str) -> bool:
        """Whether the Gram `kind/name` is of a weight stored [in, out] (GPT-2's Conv1D)."""
        info = self.arrays.get(kind, {}).get(name)
        return info is not None and kind in ("gram_in", "gram_out") and info.attrs.get("weight_layout") == "in_out"

    def validate(self, tensors: dict[str, Any], aliases: dict[str, str], identity: str | None, model: str) -> None:
        """Every key names a parameter of `model` with a matching shape, and the store was made
        for this model when it says which model it was made for."""
        recorded = (self.model or {}).get("identity")
        if recorded and identity and recorded != identity:
            made_for = (self.model or {}).get("spec", "another model")
            raise InputError(f"{self.path}: statistics were computed for {made_for} (identity {recorded[:12]}), "
                             f"not for {model} (identity {identity[:12]})")
        for kind, arrays in self.arrays.items():
            for name, info in arrays.items():
                t = tensors.get(name)
                if t is None:
                    raise InputError(f"{self.path}: {kind}/{name} names no tensor of {model}")
                shape = tuple(t.shape)
                if self.in_out(kind, name) and len(shape) == 2:
                    # GPT-2 Conv1D keeps its weight [in, out]: its Grams are [in, in] and [out, out]
                    # (the engine merges such a block as its transpose)
                    want = expected_shape(kind, shape[::-1])
                else:
                    want = expected_shape(kind, shape)
                if want is None:
                    raise InputError(f"{self.path}: {kind}/{name}: a {kind} statistic does not apply to a tensor "
                                     f"of shape {list(t.shape)}")
                if info.shape != want:
                    raise InputError(f"{self.path}: {kind}/{name} has shape {list(info.shape)}, expected {list(want)} "
                                     f"for {model}'s tensor of shape {list(t.shape)}")

    def read(self, kind: str, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """Rows [r0, r1) (all rows when None) as float32, refused if any value is not finite."""
        arr = self._handles[(kind, name)]
        try:
            data = arr[...] if r0 is None or not arr.shape else arr[r0:r1]
        except Exception as e:
            raise InputError(f"{self.path}: {kind}/{name}: cannot read ({e.__class__.__name__}: {e})") from None
        out = torch.from_numpy(np.array(data, dtype=np.float32, order="C", copy=True))
        if not all_finite(out):
            raise InputError(f"{self.path}: {kind}/{name} holds NaN or Inf values")
        return out

    def nbytes(self, kind: str, name: str) -> int:
        return 4 * math.prod(self.arrays[kind][name].shape)

    def describe(self) -> dict:
        return {"path": self.path, "attrs": self.attrs,
                "arrays": {k: len(v) for k, v in self.arrays.items() if v}}


def open_store(path: str) -> StatsStore:
    return StatsStore(path)
