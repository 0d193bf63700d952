"""Research code's statistics files -> a statistics store (SPEC §3).

Why convert instead of reading those files at merge time: they come as `torch.save` dicts,
safetensors, or Matena's HDF5 of TF variables, keyed in ways a name-exact merge cannot use as
they are (bare module names, TF scopes, kernels laid out [in, out]). A Gram that does not match
its weight's name silently turns RegMean into averaging, so keys are fixed once, here, loudly
(a warning per rule applied), and checked against the model when one is given.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from tensormerge.kernels.reference import all_finite

from tensormerge.constants import STATS_KINDS
from tensormerge.engine import outdir
from tensormerge.errors import InputError, OutputError, ParameterError, short

FORMATS = {".pt": "torch", ".pth": "torch", ".bin": "torch", ".safetensors": "safetensors",
           ".h5": "hdf5", ".hdf5": "hdf5"}
UNWRAP = ("state_dict", "fisher", "gram", "grams", "statistics")
FISHER_TYPES = ("empirical", "true")
SQUARE_KINDS = ("gram_in", "gram_out", "fisher_block")
LIST_LIMIT = 8
# deflate, the strongest filter HDF5 files carry in practice, expands at most 1032:1: a
# filtered dataset cannot honestly declare more than that times the bytes it stores
MAX_FILTER_RATIO = 1032
WEIGHT_LAYOUTS = ("out_in", "in_out")  # torch Linear [out, in]; GPT-2's Conv1D [in, out]


@dataclass
class Entry:
    source: str  # the name in the input file, for messages
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    key: str = ""  # the name in the store
    transpose: bool = False  # a TF kernel's Fisher: [in, out] -> [out, in]


def _short(names: list[str], limit: int = LIST_LIMIT) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(n if len(n) <= 200 else n[:197] + "..." for n in names[:limit]) + more


# ------------------------------------------------------------------------------ readers
def _unwrap(path: str, obj) -> tuple[dict, list[str]]:
    """The {name: tensor} dict in a loaded file: the file itself, or one conventional level below."""
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    warnings = []
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k in UNWRAP if isinstance(obj.get(k), dict)]
        if len(nested) != 1:
            bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
            raise InputError(f"{path}: entry {short(bad)} is a {type(obj[bad]).__name__}, not a tensor (expected "
                             f"{{name: tensor}}, optionally under exactly one of {', '.join(UNWRAP)})")
        ignored = [str(k) for k in obj if k != nested[0]]
        if ignored:
            warnings.append(f"read the {nested[0]!r} entry of {path}; ignored {len(ignored)} other top-level "
                            f"entries ({_short(ignored, 4)})")
        obj = obj[nested[0]]
        bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise InputError(f"{path}: entry {nested[0]}[{short(bad)}] is a {type(obj[bad]).__name__}, not a tensor")
    bad = next((k for k in obj if not isinstance(k, str)), None)
    if bad is not None:
        raise InputError(f"{path}: key {short(bad)} is not a string")
    from tensormerge.engine.sources import holds

    bad = next((k for k, t in obj.items() if not holds(t)), None)
    if bad is not None:  # zero strides: a huge declared shape over a few stored bytes
        raise InputError(f"{path}: {short(bad)} declares {list(obj[bad].shape)} but its storage holds "
                         f"{obj[bad].untyped_storage().nbytes()} bytes")
    return obj, warnings


def _torch_entries(path: str, stack: contextlib.ExitStack) -> tuple[list[Entry], list[str]]:
    from tensormerge.engine.sources import _load_failure, safe_load

    try:
        obj = safe_load(path)
    except Exception as e:  # torch raises many types; all mean "not plain tensors"
        raise InputError(f"{path}: cannot load with weights_only=True ({_load_failure(e)}); "
                         f"a statistics file must hold only tensors") from None
    sd, warnings = _unwrap(path, obj)
    return [Entry(k, tuple(t.shape), lambda t=t: t) for k, t in sd.items()], warnings


def _safetensors_entries(path: str, stack: contextlib.ExitStack) -> tuple[list[Entry], list[str]]:
    from safetensors import safe_open

    try:
        f = stack.enter_context(safe_open(path, framework="pt"))
        names = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    except Exception as e:  # safetensors raises its own error types for a bad header
        why = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise InputError(f"{path}: not a readable safetensors file ({why})") from None
    return [Entry(k, shapes[k], lambda k=k: f.get_tensor(k)) for k in names], []


def tf_to_pt(name: str) -> tuple[str, bool]:
    """transformers' TF->PT name rules; True when the variable is a kernel stored [in, out]."""
    name = name.removesuffix(":0")
    name = re.sub(r"/[^/]*___([^/]*)/", r"/\1/", name)
    parts = [p for p in name.replace("_._", "/").split("/") if p]
    if len(parts) > 1:
        parts = parts[1:]  # the model wrapper scope, e.g. tf_bert_model
    kernel = parts[-1] == "kernel"
    if parts[-1] in ("kernel", "gamma", "embeddings"):
        parts[-1] = "weight"
    elif parts[-1] == "beta":
        parts[-1] = "bias"
    return ".".join(parts), kernel


def _hdf5_entries(path: str, stack: contextlib.ExitStack) -> tuple[list[Entry], list[str]]:
    """Matena's hdf5_util keeps variables in a `__list__` group as datasets "0", "1", ... with the
    TF name in attribute `name`; other files name datasets by path. Both are walked."""
    try:
        import h5py
    except ImportError:
        raise InputError(f"{path}: reading HDF5 needs h5py; install tensormerge[hdf5]") from None
    try:
        f = stack.enter_context(h5py.File(path, "r"))
    except OSError as e:
        raise InputError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0]})") from None
    datasets = []
    f.visititems(lambda n, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
    entries = []
    for ds in datasets:
        tf_name = ds.attrs.get("name", ds.name.lstrip("/"))
        tf_name = tf_name.decode() if isinstance(tf_name, bytes) else str(tf_name)
        if ds.dtype.kind not in "fiub":
            raise InputError(f"{path}: dataset {short(ds.name)} ({short(tf_name)}) is {ds.dtype}, not numbers")
        _check_hdf5_storage(path, ds, tf_name)
        pt_name, kernel = tf_to_pt(tf_name)
        load = lambda ds=ds: torch.from_numpy(np.ascontiguousarray(ds[()], dtype=np.float32))
        entries.append(Entry(tf_name, tuple(ds.shape), load, key=pt_name, transpose=kernel and len(ds.shape) == 2))
    return entries, []


def _check_hdf5_storage(path: str, ds, tf_name: str) -> None:
    """A dataset's declared shape is bounded by the bytes the file stores for it, before anything
    is read: a 3 KB file can declare a 200000² dataset that is all fill value (chunks never
    written), lives in another file (external, virtual), or is one compressed chunk."""
    where = f"{path}: dataset {short(ds.name)} ({short(tf_name)})"
    if ds.is_virtual or ds.external:
        raise InputError(f"{where} keeps its data in other files (external or virtual storage); "
                         f"copy it into the file")
    declared = ds.size * ds.dtype.itemsize
    stored = ds.id.get_storage_size()
    filtered = ds.id.get_create_plist().get_nfilters() > 0
    if declared > stored * (MAX_FILTER_RATIO if filtered else 1):
        raise InputError(f"{where} declares {list(ds.shape)} {ds.dtype} ({declared} bytes) but the file stores "
                         f"{stored} bytes of it (unwritten chunks or a compression bomb)")


READERS = {"torch": _torch_entries, "safetensors": _safetensors_entries, "hdf5": _hdf5_entries}


# ------------------------------------------------------------------------------ keys
def _param_like(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf == "weight" or leaf.endswith("_weight")


def _name_keys(entries: list[Entry], kind: str, fmt: str, tensors: dict | None, model: str | None) -> list[str]:
    """Set each entry's store key; returns one warning per renaming rule that fired."""
    bare, mha, prefixed = [], [], []
    for e in entries:
        key = e.key or e.source
        if fmt == "hdf5":
            if e.transpose and kind == "fisher":
                e.shape = e.shape[::-1]
            e.transpose = e.transpose and kind == "fisher"
            head, _, rest = key.partition(".")
            if tensors is not None and key not in tensors and rest in tensors:
                prefixed.append(head)
                key = rest
        elif kind in ("gram_in", "gram_out") and not (tensors is not None and key in tensors):
            # keys that already name a parameter of the model are kept; others may be module names
            if not _param_like(key) or (tensors is not None and key + ".weight" in tensors):
                bare.append(key)
                key += ".weight"
            elif tensors is not None and key[: -len(".weight")] + ".in_proj_weight" in tensors:
                mha.append(key)
                key = key[: -len(".weight")] + ".in_proj_weight"
        e.key = key
    warnings = []
    if bare:
        warnings.append(f"renamed {len(bare)} bare module name(s) to <module>.weight "
                        f"(e.g. {bare[0]} -> {bare[0]}.weight)")
    if mha:
        warnings.append(f"renamed {len(mha)} attention Gram(s) <module>.weight to <module>.in_proj_weight "
                        f"to match {model} (e.g. {mha[0]})")
    if prefixed:
        warnings.append(f"dropped the leading scope ({_short(sorted(set(prefixed)), 3)}) from {len(prefixed)} "
                        f"name(s) to match {model}")
    return warnings


def _check_keys(path: str, entries: list[Entry], kind: str) -> None:
    from tensormerge.stats.store import bad_key

    seen: dict[str, str] = {}
    for e in entries:
        why = bad_key(e.key)
        if why:
            src = f" (from {short(e.source)})" if e.source != e.key else ""
            raise InputError(f"{path}: {short(e.key)}{src} cannot be a statistics key ({why})")
        if e.key in seen:
            raise InputError(f"{path}: {short(e.source)} and {short(seen[e.key])} both map to {short(e.key)}")
        seen[e.key] = e.source
        if kind in SQUARE_KINDS and (len(e.shape) != 2 or e.shape[0] != e.shape[1]):
            raise InputError(f"{path}: {kind} {short(e.source)} has shape {list(e.shape)}, a {kind} must be square")


def _check_model(path: str, entries: list[Entry], kind: str, ck, model: str, in_out: bool) -> None:
    from tensormerge.stats.store import expected_shape

    bad = []
    for e in entries:
        t = ck.tensors.get(e.key) or ck.tensors.get(ck.aliases.get(e.key, ""))
        if t is None:
            bad.append(f"{e.key} (no such tensor)")
            continue
        shape = tuple(t.shape)
        want = expected_shape(kind, shape[::-1] if in_out and len(shape) == 2 else shape)
        if want is None:
            bad.append(f"{e.key} (no {kind} for a tensor of shape {list(t.shape)})")
        elif tuple(e.shape) != want:
            bad.append(f"{e.key} {list(e.shape)} (expected {list(want)})")
    if bad:
        raise InputError(f"{path}: {len(bad)} of {len(entries)} {kind} keys do not match {model}: {_short(bad)}")


# ------------------------------------------------------------------------------ import
def _value(path: str, e: Entry) -> torch.Tensor:
    t = e.load()
    if t.is_complex():
        raise InputError(f"{path}: {short(e.source)} is complex ({t.dtype})")
    t = t.to(torch.float32)
    if e.transpose:
        t = t.t()
    if not all_finite(t):
        raise InputError(f"{path}: {short(e.source)} holds NaN or Inf values (as float32)")
    return t


def import_stats(path: str, kind: str, output: str, *, model: str | None = None, count: int | None = None,
                 fisher_type: str | None = None, overwrite: bool = False, append: bool = False,
                 weight_layout: str = "out_in") -> dict:
    """Write the statistics in `path` to a store at `output`; nothing is left there on failure.

    weight_layout in_out marks Grams of weights stored [in, out] (GPT-2's Conv1D), as `stats
    compute` marks them: a square Gram fits either layout, so only this mark keeps the merge
    from solving with it on the wrong side."""
    from tensormerge.stats.store import StatsWriter

    path, output = os.fspath(path), os.fspath(output)
    model = None if model is None else os.fspath(model)
    if kind not in STATS_KINDS:
        raise ParameterError(f"--kind {kind!r}: expected one of {', '.join(STATS_KINDS)}")
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ParameterError(f"--weight-layout {weight_layout!r}: expected one of {', '.join(WEIGHT_LAYOUTS)}")
    in_out = weight_layout == "in_out"
    if in_out and kind not in ("gram_in", "gram_out"):
        raise ParameterError(f"--weight-layout in_out applies to Grams (gram_in, gram_out), not to {kind}")
    if fisher_type not in (None, *FISHER_TYPES):
        raise ParameterError(f"--fisher-type {fisher_type!r}: expected one of {', '.join(FISHER_TYPES)}")
    if count is not None and count <= 0:
        raise ParameterError(f"--count {count}: must be a positive number of examples or tokens")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise InputError(f"{path}: unknown statistics format (expected {', '.join(FORMATS)})")
    if "://" not in output and os.path.exists(output) and not (overwrite or append):
        raise OutputError(f"{output}: exists (pass --overwrite to replace it, or --append to add to it)")

    with contextlib.ExitStack() as stack:
        if "://" not in output:
            output = os.path.normpath(output)
            outdir.check_output(output, overwrite=overwrite or append, kind="stats",
                                protected=[("the imported file", path), ("the model", model)],
                                flag="--overwrite" if overwrite else "--append")
            lock = stack.enter_context(outdir.OutputLock(output, "stats import", quiet=True))
        ck = None
        if model is not None:
            from tensormerge.engine.sources import open_checkpoint

            ck = open_checkpoint(model)
            stack.callback(ck.close)
        entries, warnings = READERS[fmt](path, stack)
        if "://" not in output and lock.stale:
            warnings.append(lock.stale)
        if not entries:
            raise InputError(f"{path}: holds no tensors")
        tensors = None if ck is None else {**ck.tensors, **dict.fromkeys(ck.aliases)}
        warnings += _name_keys(entries, kind, fmt, tensors, model)
        _check_keys(path, entries, kind)
        if ck is not None:
            _check_model(path, entries, kind, ck, model, in_out)
        writer = StatsWriter(
            output, model=None if ck is None else {"spec": model, "identity": ck.identity()},
            n_examples=count if kind in ("fisher", "fisher_block") else None, fisher_type=fisher_type,
            created_by=f"tensormerge stats import {os.path.basename(path)}", overwrite=overwrite, append=append)
        try:
            for e in entries:
                extra = {"source": e.source} if e.source != e.key else {}
                if in_out:
                    extra["weight_layout"] = "in_out"
                writer.add(kind, e.key, _value(path, e), count=count, **extra)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    return {"output": output, "kind": kind, "arrays": len(entries),
            "renamed": {e.source: e.key for e in entries if e.source != e.key}, "warnings": warnings}

