"""One model's statistics in a Zarr v3 store: the layout of SPEC §3, written and read by rows.

Why Zarr: statistics are as large as the model (a diagonal Fisher) or larger per layer (Grams),
so the engine must read only the rows of the block it merges; Zarr's row chunks give that, over
a local directory or any fsspec URL, with a float32-friendly codec (Blosc zstd + byte shuffle,
chosen by measurement in benchmarks/stats_codec.py).

Opening a store checks what metadata can show (format marker, keys, shapes, dtypes, the model
identity) against the model it is used with; values are checked as they are read, before the
block they feed is merged, so a NaN never reaches the output and no full extra pass is needed.

A store is read completely or not at all (format 2). Zarr fills a chunk it cannot find with the
array's fill value, so an incomplete copy (a lost chunk file, an array the consolidated metadata
lists but the directory lacks, a fill value edited in a metadata file) would merge silently
different numbers. So each array records what a complete copy holds (its chunk count and the
crc32 of every chunk's decoded float32 bytes), every chunk file is written (even all-zero ones,
so a missing file is never a legitimate fill), a local store is listed at open (a missing chunk
or array directory, or anything that is not a regular file, is refused before any read could
block), and every read decodes whole chunks and checks each against its crc32. crc32 catches
damage and incomplete copies, not a deliberate forgery: whoever can rewrite a chunk can rewrite
its checksum. Version-1 stores (no checksums) still open, marked unverified.

An input Gram that several weights share (q/k/v, T5's wi_0/wi_1, the cross-attention k/v of
every decoder layer: they read the same tensor) is stored once (format 3), under the first
weight's name, and the root attribute 'aliases' maps each other weight to it:
{kind: {weight: {"target": stored key, "shape": [d, d]}}}. Readers see an alias as an array
of its own (has, read, nbytes, validate resolve it), so no method knows about sharing. An alias
must point at a stored array of its kind (never at another alias: no chains, so no cycles) of
the recorded shape; anything else is refused at open, naming the store and the key. Version-2
stores (a Gram per weight) still open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tensormerge import __version__
from tensormerge.engine.crc import crc32
from tensormerge.constants import PARTIAL_SUFFIX, STATS_CHUNK_BYTES, STATS_FORMAT, STATS_FORMATS_READ, STATS_KINDS
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


# The array attribute (format 2) that says what a complete array holds:
# {"rows": rows per chunk (absent for a 0-d array), "count": chunks, "crc32": [one per chunk]}.
CHUNKS_ATTR = "tensormerge_chunks"


def chunk_count(shape: tuple[int, ...], rows: int | None) -> int:
    if any(n == 0 for n in shape):
        return 0
    return 1 if not shape else -(-shape[0] // rows)


def chunk_record(data: np.ndarray, chunks: tuple[int, ...]) -> dict:
    """The CHUNKS_ATTR of `data` written with row chunks `chunks`: crc32 of each chunk's
    little-endian float32 bytes, as decoded (so independent of the codec)."""
    if not data.shape:
        return {"count": 1, "crc32": [crc32(np.ascontiguousarray(data, dtype="<f4"))]}
    data = np.ascontiguousarray(data, dtype="<f4")
    rows = chunks[0]
    n = chunk_count(data.shape, rows)
    return {"rows": rows, "count": n, "crc32": [crc32(data[c * rows:(c + 1) * rows]) for c in range(n)]}


def chunk_key(c: int, ndim: int) -> str:
    """Zarr v3's default key ('/' separator) of row chunk `c`, relative to the array."""
    return "c" if ndim == 0 else "c/" + "/".join([str(c)] + ["0"] * (ndim - 1))


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
    attrs: dict[str, Any]  # the statistic's own attributes (count, source, ...)
    chunks: dict | None = None  # CHUNKS_ATTR, checked against the array; None: unverified (format 1)
    target: str | None = None  # an alias (format 3): the stored array of the same kind it reads


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
        self.shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        self.aliases: dict[str, dict[str, dict]] = {}  # written into the root attrs at close
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
            self.aliases = {k: dict(v) for k, v in (existing.attrs.get("aliases") or {}).items()}
            self.shapes = {(k, n): i.shape for k, g in existing.arrays.items() for n, i in g.items()
                           if i.target is None}
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
                self.aliases.pop(kind, None)
                self.shapes = {kn: v for kn, v in self.shapes.items() if kn[0] != kind}
            self.groups[kind] = self.root.require_group(kind)
            self.added.append(kind)
        data = value.detach().to(torch.float32).contiguous().cpu().numpy()
        chunks = row_chunks(data.shape)
        # every chunk written, all-zero ones too: a chunk file missing is then always an incomplete copy
        arr = self.groups[kind].create_array(
            name, shape=data.shape, dtype="float32", chunks=chunks,
            compressors=[_codec()], fill_value=0.0, overwrite=True, config={"write_empty_chunks": True},
            attributes={"count": count, **attrs, CHUNKS_ATTR: chunk_record(data, chunks)})
        arr[...] = data
        self.count += 1
        self.shapes[(kind, name)] = tuple(data.shape)

    def alias(self, kind: str, name: str, target: str) -> None:
        """Record that `kind/name` is the array `kind/target` (written by `add`, here or before)."""
        if kind not in STATS_KINDS:
            raise ValueError(f"unknown statistics kind {kind!r}")
        for key in (name, target):
            why = bad_key(key)
            if why:
                raise InputError(f"{self.path}: {short(key)} cannot be a statistics key ({why})")
        shape = self.shapes.get((kind, target))
        if shape is None or (kind, name) in self.shapes:
            raise ValueError(f"{kind}/{name}: alias to {kind}/{target}, which is not a stored array here")
        self.aliases.setdefault(kind, {})[name] = {"target": target, "shape": list(shape)}

    def close(self) -> str:
        import zarr

        if self.aliases:
            if (self.root.attrs.get("tensormerge_stats") or 0) < 3:
                raise OutputError(f"{self.path}: a version-{self.root.attrs.get('tensormerge_stats')} store cannot "
                                  f"hold aliases (version 3 can); write a new store")
            self.root.attrs.update({"aliases": {k: dict(sorted(v.items())) for k, v in sorted(self.aliases.items())}})
        elif self.append and "aliases" in self.root.attrs:
            self.root.attrs.update({"aliases": None})
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
                if self.local:  # the root's view is its consolidated metadata, which never listed it
                    shutil.rmtree(os.path.join(_local_path(self.path), kind), ignore_errors=True)
            return
        if self.local and os.path.exists(self.build):
            shutil.rmtree(self.build, ignore_errors=True)


class StatsStore:
    """A statistics store opened for reading: metadata in memory, values read by rows."""

    def __init__(self, path: str):
        import zarr

        self.path = path
        self.local = _local_path(path)
        self._files: set[str] | None = None  # every file of a local store, relative to it
        if self.local is not None:
            if not os.path.exists(self.local):
                raise InputError(f"{path}: statistics store not found")
            if os.path.isdir(self.local):
                self._files = _scan(self.local)  # before zarr reads a byte: a FIFO would block it
            elif not os.path.isfile(self.local):
                raise InputError(f"{path}: not a regular file or directory (a statistics store is a directory)")
        try:
            with _quiet():
                self.root = zarr.open_group(path, mode="r", zarr_format=3)
            attrs = dict(self.root.attrs)
        except Exception as e:  # zarr raises several types for a directory that is not a store
            raise InputError(f"{path}: not a Zarr v3 statistics store ({e.__class__.__name__})") from None
        fmt = attrs.get("tensormerge_stats")
        if type(fmt) is not int or fmt not in STATS_FORMATS_READ:
            raise InputError(f"{path}: not a tensormerge statistics store (root attribute "
                             f"'tensormerge_stats' is {short(fmt)}, expected one of {list(STATS_FORMATS_READ)})")
        self.format = fmt
        _check_attrs(f"{path}: root", attrs, _ROOT_ATTRS)
        _check_attrs(f"{path}: root attribute 'model':", attrs.get("model") or {}, _MODEL_ATTRS)
        self.attrs = attrs
        self.arrays: dict[str, dict[str, ArrayInfo]] = {}
        self._handles: dict[tuple[str, str], Any] = {}
        self._kept: tuple[str, str, int, np.ndarray] | None = None  # see _read_verified
        for kind in STATS_KINDS:
            self.arrays[kind] = {}
            if kind not in self.root:
                continue
            group = self.root[kind]
            for name, arr in group.arrays():
                if arr.dtype != np.float32:
                    raise InputError(f"{path}: {kind}/{short(name)} is {arr.dtype}, statistics must be float32")
                own = dict(arr.attrs)
                _check_attrs(f"{path}: {kind}/{short(name)}", own, _ARRAY_ATTRS)
                chunks = self._chunks(kind, name, arr, own.pop(CHUNKS_ATTR, None))
                self.arrays[kind][name] = ArrayInfo(kind, name, tuple(arr.shape), own, chunks)
                self._handles[(kind, name)] = arr
            others = [n for n, _ in group.groups()]
            if others:
                raise InputError(f"{path}: unexpected group {kind}/{others[0]} (keys are full parameter names)")
        unknown = [k for k in self.root.group_keys() if k not in STATS_KINDS]
        unknown += [k for k in self.root.array_keys()]
        if unknown:
            raise InputError(f"{path}: unknown entry {unknown[0]!r} (a store holds {', '.join(STATS_KINDS)})")
        if self._files is not None:
            # an array on disk that the consolidated metadata does not list would be read as absent
            # (its tensor averaged): metadata older than the arrays, or edited
            for rel in sorted(self._files):
                parts = rel.split("/")
                if len(parts) == 3 and parts[2] == "zarr.json" and parts[0] in STATS_KINDS \
                        and parts[1] not in self.arrays[parts[0]]:
                    raise InputError(f"{path}: {parts[0]}/{parts[1]} is on disk but the store's metadata does not "
                                     f"list it (metadata written before the array, or edited?)")
        self._open_aliases(attrs.get("aliases"))

    def _open_aliases(self, aliases: Any) -> None:
        """Each alias as an entry of `arrays` that reads its target; see the module docstring."""
        if aliases is None:
            return
        if self.format < 3:
            raise InputError(f"{self.path}: root attribute 'aliases' in a version-{self.format} store (aliases came "
                             f"with version 3)")
        if not isinstance(aliases, dict) or not all(k in STATS_KINDS and isinstance(v, dict)
                                                    for k, v in aliases.items()):
            raise InputError(f"{self.path}: root attribute 'aliases' is {short(aliases)}, expected "
                             f"{{kind: {{weight: {{'target': key, 'shape': [..]}}}}}} with kinds "
                             f"{', '.join(STATS_KINDS)}")
        for kind, group in aliases.items():
            arrays = self.arrays[kind]
            for name, rec in group.items():  # each record, before any target is looked at
                where = f"{self.path}: alias {kind}/{short(name)}"
                why = bad_key(name)
                if why:
                    raise InputError(f"{where}: not a valid key ({why})")
                where = f"{self.path}: alias {kind}/{name}"
                target = rec.get("target") if isinstance(rec, dict) else None
                shape = rec.get("shape") if isinstance(rec, dict) else None
                if (not isinstance(target, str) or bad_key(target) or not isinstance(shape, list)
                        or not all(type(n) is int and n >= 0 for n in shape)):
                    raise InputError(f"{where}: record {short(rec)} is malformed (expected {{'target': key, "
                                     f"'shape': [..]}})")
                if name in arrays:
                    raise InputError(f"{where}: is both a stored array and an alias")
            for name, rec in group.items():
                where, target, shape = f"{self.path}: alias {kind}/{name}", rec["target"], rec["shape"]
                if target in group:
                    raise InputError(f"{where}: points at {kind}/{target}, itself an alias (chains and "
                                     f"cycles are refused)")
                info = arrays.get(target)
                if info is None:
                    raise InputError(f"{where}: points at {kind}/{target}, which the store lacks")
                if tuple(shape) != info.shape:
                    raise InputError(f"{where}: records shape {shape}, but its target {kind}/{target} has "
                                     f"shape {list(info.shape)}")
            for name, rec in group.items():
                info = arrays[rec["target"]]
                arrays[name] = ArrayInfo(kind, name, info.shape, info.attrs, info.chunks, target=rec["target"])

    def resolve(self, kind: str, name: str) -> str:
        """The stored key that `kind/name` reads (itself unless an alias)."""
        return self.arrays[kind][name].target or name

    @property
    def aliases(self) -> dict[str, dict[str, str]]:
        return {k: {n: i.target for n, i in g.items() if i.target is not None}
                for k, g in self.arrays.items() if any(i.target is not None for i in g.values())}

    def __repr__(self) -> str:
        return f"StatsStore({self.path!r})"

    def _chunks(self, kind: str, name: str, arr: Any, rec: Any) -> dict | None:
        """The array's record of its chunks, checked against its metadata and, for a local
        store, against the files there: an incomplete copy is refused here, before any work."""
        where = f"{self.path}: {kind}/{name}"
        if self._files is not None and f"{kind}/{name}/zarr.json" not in self._files:
            raise InputError(f"{where} is listed in the store's metadata but its directory is missing "
                             f"(an incomplete copy of the store?)")
        if rec is None:
            if self.format >= 2:
                raise InputError(f"{where} records no chunk checksums ('{CHUNKS_ATTR}'), which every array of a "
                                 f"version-{self.format} store has: its metadata was changed")
            return None
        shape = tuple(arr.shape)
        rows = rec.get("rows") if isinstance(rec, dict) else None
        crcs = rec.get("crc32") if isinstance(rec, dict) else None
        want_rows = arr.chunks[0] if shape else None
        if (not isinstance(rec, dict) or rows != want_rows or type(rec.get("count")) is not int
                or not isinstance(crcs, list) or not all(type(c) is int and 0 <= c < 1 << 32 for c in crcs)):
            raise InputError(f"{where}: attribute '{CHUNKS_ATTR}' is malformed or does not match the array's "
                             f"chunks {list(arr.chunks)}")
        n = chunk_count(shape, rows)
        if shape and tuple(arr.chunks[1:]) != shape[1:] or rec["count"] != n or len(crcs) != n:
            raise InputError(f"{where}: the array has {n} chunk(s) of {list(arr.chunks)}, its record says "
                             f"{rec['count']} ({len(crcs)} checksums): its metadata was changed")
        if self._files is not None:
            for c in range(n):
                if f"{kind}/{name}/{chunk_key(c, len(shape))}" not in self._files:
                    raise InputError(f"{where}: chunk {c} of {n}{_rows(shape, rows, c)} is missing "
                                     f"(an incomplete copy of the store?)")
        return rec

    @property
    def verified(self) -> bool:
        """Whether every array carries chunk checksums (format 2), so reads are verified."""
        return all(info.chunks is not None for group in self.arrays.values() for info in group.values())

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
        name = self.resolve(kind, name)
        arr = self._handles[(kind, name)]
        rec = self.arrays[kind][name].chunks
        try:
            if rec is not None:
                data = self._read_verified(kind, name, arr, rec, r0, r1)  # a fresh array already
            else:
                data = arr[...] if r0 is None or not arr.shape else arr[r0:r1]
                data = np.array(data, dtype=np.float32, order="C", copy=True)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"{self.path}: {kind}/{name}: cannot read ({e.__class__.__name__}: {e})") from None
        out = torch.from_numpy(data)
        if not all_finite(out):
            raise InputError(f"{self.path}: {kind}/{name} holds NaN or Inf values")
        return out

    def _read_verified(self, kind: str, name: str, arr: Any, rec: dict, r0: int | None, r1: int | None) -> np.ndarray:
        """Rows [r0, r1) from the whole chunks that hold them, each checked against its crc32
        (zarr decodes whole chunks anyway, so this reads no more from disk). The engine reads a
        block's rows in order, often fewer than a chunk at a time: the verified chunk a read ends
        inside is kept (one per store, <= STATS_CHUNK_BYTES) for the next read to start from, so
        no chunk is decoded or checked twice."""
        shape = self.arrays[kind][name].shape
        if not shape:
            data = np.array(arr[...], dtype=np.float32)
            self._check_chunk(kind, name, 0, data, shape, None, rec)
            return data
        lo = 0 if r0 is None else max(0, r0)
        hi = shape[0] if r0 is None or r1 is None else min(shape[0], r1)
        out = np.empty((max(hi - lo, 0),) + shape[1:], dtype=np.float32)
        if hi <= lo or rec["count"] == 0:
            return out
        rows = rec["rows"]
        c0, c1 = lo // rows, -(-hi // rows)
        pos, first = lo, c0
        kept = self._kept
        if kept is not None and kept[:3] == (kind, name, c0):
            pos = min(hi, (c0 + 1) * rows)
            out[:pos - lo] = kept[3][lo - c0 * rows:pos - c0 * rows]
            first = c0 + 1
        if pos < hi:
            start, end = first * rows, min(c1 * rows, shape[0])
            data = np.ascontiguousarray(arr[start:end], dtype=np.float32)
            for c in range(first, c1):
                self._check_chunk(kind, name, c, data[(c - first) * rows:(c - first + 1) * rows], shape, rows, rec)
            out[pos - lo:] = data[pos - start:hi - start]
            if hi < end:  # the next read of this block starts inside the last chunk
                self._kept = (kind, name, c1 - 1, data[(c1 - 1 - first) * rows:].copy())
        return out

    def _check_chunk(self, kind: str, name: str, c: int, data: np.ndarray, shape, rows, rec: dict) -> None:
        if crc32(np.ascontiguousarray(data, dtype="<f4")) == rec["crc32"][c]:
            return
        where = f"{self.path}: {kind}/{name}: chunk {c} of {rec['count']}{_rows(shape, rows, c)}"
        if self.local is not None and not os.path.exists(os.path.join(self.local, kind, name,
                                                                      *chunk_key(c, len(shape)).split("/"))):
            raise InputError(f"{where} is missing (an incomplete copy of the store?)")
        raise InputError(f"{where} does not match its recorded crc32 (damaged, or changed after it was written)")

    def nbytes(self, kind: str, name: str) -> int:
        return 4 * math.prod(self.arrays[kind][name].shape)

    @property
    def digest(self) -> str:
        """sha256 of the store's metadata, every array's chunk checksums included: a format-2
        store whose values changed has another digest (a format-1 store: names, shapes, attrs)."""
        what = {"attrs": self.attrs,  # the aliases are a root attribute
                "arrays": {f"{k}/{n}": [list(i.shape), i.attrs, i.chunks] for k, g in self.arrays.items()
                           for n, i in sorted(g.items()) if i.target is None}}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    def describe(self) -> dict:
        out = {"path": self.path, "attrs": self.attrs, "format": self.format, "verified": self.verified,
               "digest": self.digest,
               "arrays": {k: n for k, v in self.arrays.items() if (n := sum(i.target is None for i in v.values()))}}
        if any(i.target is not None for v in self.arrays.values() for i in v.values()):
            out["aliases"] = {k: len(v) for k, v in self.aliases.items()}
        return out

    def fingerprint(self) -> dict:
        """What --resume compares: `describe()` (the digest covers every chunk's crc32), plus,
        for the unverified arrays of a local format-1 store, each chunk file's size and mtime."""
        out = self.describe()
        if self._files is not None and not self.verified:
            stats = {}
            for rel in sorted(self._files):
                st = os.stat(os.path.join(self.local, rel))
                stats[rel] = (st.st_size, st.st_mtime_ns)
            out["files"] = stats
        return out


def _local_path(path: str) -> str | None:
    if path.startswith("file://"):
        return path[len("file://"):]
    return None if _is_url(path) else path


def _rows(shape: tuple[int, ...], rows: int | None, c: int) -> str:
    return f" (rows {c * rows}-{min((c + 1) * rows, shape[0]) - 1})" if shape else ""


def _scan(root: str) -> set[str]:
    """Every file under a local store (relative, '/'-separated). Anything that is not a regular
    file or a directory (a FIFO, socket, device or broken link) is refused naming its path: zarr
    would block on a FIFO's first read, or read a device forever. Links are followed."""
    files: set[str] = set()
    seen: set[tuple[int, int]] = set()
    todo = [""]
    while todo:
        rel = todo.pop()
        here = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(here)
            if (st.st_dev, st.st_ino) in seen:
                raise InputError(f"{here}: reached twice while listing the statistics store (a directory link loop?)")
            seen.add((st.st_dev, st.st_ino))
            entries = list(os.scandir(here))
        except OSError as e:
            raise InputError(f"{here}: cannot list ({e.strerror})") from None
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            if e.is_dir():
                todo.append(r)
            elif e.is_file():
                files.add(r)
            else:
                raise InputError(f"{e.path}: not a regular file (a FIFO, socket, device or broken link inside a "
                                 f"statistics store is refused, not read)")
    return files


def open_store(path: str) -> StatsStore:
    return StatsStore(path)
