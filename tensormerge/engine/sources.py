"""Checkpoints as lazy, per-tensor and per-row-range readers.

Every input form (a directory with one file or a sharded index, a single file, `.bin` files, a
PEFT adapter, a hub repo id) becomes a `Checkpoint` that knows names, shapes and dtypes from
headers alone and reads bytes only when a block asks for them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
import warnings
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from tensormerge import constants as C
from tensormerge.engine import direct
from tensormerge.engine.safetensors_format import (
    FileIdentity,
    TensorEntry,
    element_size,
    identity,
    load_json,
    quote,
    read_header_and_identity,
    read_into,
    unprintable,
)
from tensormerge.errors import InputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return self.numel // self.rows if self.rows else 0

    @property
    def nbytes(self) -> int:
        return self.numel * element_size(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class Checkpoint(ABC):
    """A model's tensors. `aliases` maps a tied name to the name whose storage it shares."""

    def __init__(self, spec: str, root: str, files: list[str]):
        self.spec = spec
        self.root = root
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}  # in file order: the output keeps it
        self.aliases: dict[str, str] = {}
        self.config_dir: str | None = None  # where config/tokenizer files lie, for a model directory
        self.hub_commit: str | None = None  # the snapshot's commit, for a hub repo id

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    @abstractmethod
    def read(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        """Rows [row_start, row_end) of tensor `name`, in its stored dtype, in a fresh buffer."""

    def fingerprint(self) -> dict:
        """The cheap identity a resumed merge matches: names, shapes, dtypes, file sizes (not
        the values: two fine-tunes of one model share it; see engine/provenance.py)."""
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}|{t.dtype}|{t.shape}|{self.aliases.get(name, '')}\n".encode())
        sizes = {os.path.basename(f): os.path.getsize(f) for f in self.files}
        h.update(json.dumps(sizes, sort_keys=True).encode())
        return {"spec": self.spec, "files": sizes, "tensors": len(self.tensors), "fingerprint": h.hexdigest()}

    def identity(self) -> str:
        """Which weights these are, independent of file layout: names, shapes and the first row
        of the first few floating-point tensors as float32. Statistics stores record it, so a
        store made for one fine-tune is refused for another of the same architecture. Computed
        once per opened checkpoint (a sweep's candidates share it)."""
        cached = self.__dict__.get("_identity")
        if cached is not None:
            return cached
        h = hashlib.sha256()
        names = sorted(n for n in self.tensors if n not in self.aliases)
        for n in names:
            h.update(f"{n}|{tuple(self.tensors[n].shape)}\n".encode())
        sampled = [n for n in names if self.tensors[n].is_float and self.tensors[n].numel][:4]
        for n in sampled:
            h.update(self.read(n, 0, 1).to(torch.float32).contiguous().numpy().tobytes())
        self.__dict__["_identity"] = h.hexdigest()
        return self.__dict__["_identity"]

    @property
    def reads_directly(self) -> bool:
        """Whether reads go past the page cache (engine/direct.py): each then waits on the disk
        alone, with no readahead behind it, so a chunk's reads of several models go out at once."""
        return False

    def check_unchanged(self) -> None:  # noqa: B027 - where files are not read by offset
        """Raise InputError if a file read was replaced or written to since it was opened."""

    def close(self) -> None:  # noqa: B027 - most checkpoints hold nothing to release
        """Release open files (those that keep any)."""


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, spec: str, root: str, files: list[str], weight_map: dict[str, str] | None = None):
        super().__init__(spec, root, files)
        self.entries: dict[str, TensorEntry] = {}
        self._file_ids: dict[str, FileIdentity] = {}  # each file as its header was read
        for path in files:
            entries, _, aliases, self._file_ids[path] = read_header_and_identity(path)
            for name, entry in entries.items():
                if name in self.entries:
                    raise InputError(f"{path}: tensor {name!r} also appears in {self.entries[name].path}")
                self.entries[name] = entry
            self.aliases.update(dict(aliases))
        if weight_map is not None:
            missing = sorted(n for n, f in weight_map.items() if n not in self.entries)
            if missing:
                raise InputError(f"{root}: index lists tensors its shards lack: {', '.join(map(quote, missing[:5]))}"
                                 + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
            for n, f in weight_map.items():
                if os.path.basename(self.entries[n].path) != os.path.basename(f):
                    raise InputError(f"{root}: index puts {quote(n)} in {quote(f)} but it is in {self.entries[n].path}")
        order = sorted(self.entries.values(), key=lambda e: (files.index(e.path), e.begin, e.name))
        self.tensors = {e.name: TensorInfo(e.name, e.dtype, e.shape) for e in order}
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, int | None] = {}
        self._direct: bool | None = None  # engine/direct.py: decided when first read
        self._refused: list[int] = []  # O_DIRECT descriptors whose reads were refused
        self._lock = threading.Lock()

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise InputError(f"{path}: cannot open ({e.strerror})") from None
                fd = self._fds[path] = self._same_file(path, fd)
            return fd

    def _same_file(self, path: str, fd: int) -> int:
        """`fd`, if it is the file whose header was read (not another renamed over it, not
        rewritten since): else closed, and an error naming the file."""
        if identity(os.fstat(fd)) != self._file_ids[path]:
            os.close(fd)
            raise InputError(f"{path}: changed since its header was read (replaced or rewritten while "
                             "the merge ran); run again")
        return fd

    def check_unchanged(self) -> None:
        """Every file still the one read, at its size and modification time: a file written to
        or replaced during the run would leave a merge of bytes nobody can name."""
        for path, ident in self._file_ids.items():
            try:
                now = identity(os.stat(path))
            except OSError as e:
                raise InputError(f"{path}: gone while the merge ran ({e.strerror})") from None
            if now != ident:
                raise InputError(f"{path}: changed while the merge ran (written to or replaced); run again")

    @property
    def reads_directly(self) -> bool:
        with self._lock:
            return self._decide_direct()

    def _decide_direct(self) -> bool:
        """Once, at the first read (or the first question): where this checkpoint's bytes are."""
        if self._direct is None:
            self._direct = direct.wanted(self.files)
        return self._direct

    def _direct_fd(self, path: str) -> int | None:
        """An O_DIRECT descriptor when this checkpoint is read past the page cache, else None."""
        with self._lock:
            if not self._decide_direct():
                return None
            if path not in self._direct_fds:
                fd = direct.open_direct(path)
                self._direct_fds[path] = None if fd is None else self._same_file(path, fd)
            return self._direct_fds[path]

    def read(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        e = self.entries[name]
        rows = e.shape[0] if e.shape else 1
        row_end = rows if row_end is None else row_end
        nbytes = (row_end - row_start) * e.row_bytes
        shape = ((row_end - row_start),) + e.shape[1:] if e.shape else ()
        fd = self._direct_fd(e.path) if nbytes else None
        if fd is not None:
            try:
                buf = direct.read(fd, e.path, e.name, e.begin + row_start * e.row_bytes, nbytes)
            except direct.Refused:
                self._read_buffered_from_now(e.path)
            else:
                if buf.storage_offset() % e.dtype.itemsize:  # a tensor at an odd offset of its file
                    buf = buf.clone()
                return buf.view(e.dtype).reshape(shape)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            read_into(self._fd(e.path), e, buf, row_start * e.row_bytes, nbytes)
        return buf.view(e.dtype).reshape(shape)

    def _read_buffered_from_now(self, path: str) -> None:
        """A file whose direct reads the file system refused: read through the page cache (its
        O_DIRECT descriptor stays open, unused, until close: another thread may be reading)."""
        with self._lock:
            fd = self._direct_fds.get(path)
            if fd is not None:
                self._refused.append(fd)
            self._direct_fds[path] = None

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._direct_fds.values(), *self._refused]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()
            self._refused.clear()


class BinCheckpoint(Checkpoint):
    """`pytorch_model.bin` shards: unpickled with weights_only=True, storages memory-mapped.

    torch's zip format gives no per-tensor offsets without unpickling, so these files are read
    through the mapping; rows are copied out at once so no view outlives the block.
    """

    def __init__(self, spec: str, root: str, files: list[str]):
        super().__init__(spec, root, files)
        self._where: dict[str, str] = {}
        self._loaded: dict[str, dict[str, torch.Tensor]] = {}
        for path in files:
            sd = self._load(path)
            seen: dict[tuple, str] = {}
            for name, t in sd.items():
                _check_bin_entry(path, name, t)
                if name in self._where:
                    raise InputError(f"{path}: tensor {name!r} also appears in {self._where[name]}")
                self._where[name] = path
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
                if t.numel() and key in seen:
                    self.aliases[name] = seen[key]
                else:
                    seen[key] = name
                self.tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape))

    def _load(self, path: str) -> dict[str, torch.Tensor]:
        if path not in self._loaded:
            try:
                # torch's zip format is memory-mapped; the legacy (pre-1.6) format cannot be, and
                # is small enough in practice to be read whole (still weights_only).
                sd = safe_load(path)
            except Exception as e:  # torch raises many types; all mean "not a safe weights file"
                raise InputError(f"{path}: cannot load with weights_only=True ({_load_failure(e)})") from None
            if not isinstance(sd, dict):
                raise InputError(f"{path}: does not hold a state dict")
            self._loaded[path] = sd
        return self._loaded[path]

    def read(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        t = self._load(self._where[name])[name]
        if t.dim() == 0:
            return t.clone()
        return t[row_start:row_end].clone(memory_format=torch.contiguous_format)


_WARNINGS_LOCK = threading.Lock()  # warnings.catch_warnings swaps process-wide filters


def safe_load(path: str):
    """torch.load with weights_only=True (torch's zip format memory-mapped; the legacy one read
    whole). torch warns about a file's pickle protocol before it refuses or reads it; that is not
    the user's concern (what it decides is), so it does not reach their terminal, --quiet or not."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def _check_bin_entry(path: str, name, t) -> None:
    """weights_only still admits values the engine cannot carry to a safetensors output: keys
    that are not names, sparse or quantized layouts, dtypes safetensors has no name for."""
    if not isinstance(name, str) or unprintable(name):
        raise InputError(f"{path}: entry {quote(name)} is not a usable tensor name")
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{path}: entry {quote(name)} is not a tensor")
    if t.layout != torch.strided or t.is_quantized:
        raise InputError(f"{path}: tensor {quote(name)} has a {t.layout} layout; only dense tensors can be merged")
    if t.dtype not in C.TORCH_TO_SAFETENSORS:
        raise InputError(f"{path}: tensor {quote(name)} has dtype {t.dtype}, which safetensors cannot store")
    if not holds(t):
        raise InputError(f"{path}: tensor {quote(name)} declares {list(t.shape)} but its storage holds "
                         f"{t.untyped_storage().nbytes()} bytes (overlapping strides)")


def holds(t: torch.Tensor) -> bool:
    """Whether a loaded tensor's storage holds all its elements: a pickled tensor may declare
    any shape over a few bytes with zero strides (149 GiB from a 4-byte storage), which every
    copy, merge and write would then materialise."""
    return t.numel() * t.element_size() <= t.untyped_storage().nbytes()


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _load_failure(e: Exception) -> str:
    """One plain line saying why torch.load refused a file: the unpickler's reason (which global
    it met) when torch gives one, else the message's first line; terminal colour codes removed."""
    text = _ANSI.sub("", str(e)).strip()
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please |\n|$)", text)
    if m:
        return m.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else e.__class__.__name__


def confinement(directory: str) -> str:
    """The folder every file read or copied from a checkpoint directory must resolve into: the
    directory itself, or for a Hugging Face cache snapshot (`models--org--name/snapshots/<commit>`,
    whose files are links into `../../blobs`) the repo's folder `models--org--name`."""
    real = os.path.realpath(directory)
    parent = os.path.dirname(real)
    repo = os.path.dirname(parent)
    if (os.path.basename(parent) == "snapshots" and os.path.basename(repo).startswith("models--")
            and os.path.isdir(os.path.join(repo, "blobs"))):
        return repo
    return real


def confined(path: str, directory: str, what: str, hint: str = "") -> str:
    """`path` (a file in `directory`) resolved, or an InputError when a link takes it outside the
    directory's confinement: a stranger's checkpoint must not make us read, or copy into the
    output, a file elsewhere on this machine."""
    real, root = os.path.realpath(path), confinement(directory)
    if os.path.commonpath([real, root]) != root:
        where = "its Hugging Face repo folder" if root != os.path.realpath(directory) else "the checkpoint directory"
        raise InputError(f"{path}: {what} links to {quote(real)}, outside {where} {quote(root)}"
                         + (f" ({hint})" if hint else ""))
    return real


def _safe_join(root: str, rel: str, index_path: str) -> str:
    if not isinstance(rel, str) or "\0" in rel:
        # os.path functions raise ValueError on a NUL byte; a non-string is no file name at all
        raise InputError(f"{index_path}: weight_map entry {quote(rel)} is not a file name")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", rel):
        raise InputError(f"{index_path}: weight_map entry {quote(rel)} points outside the checkpoint directory")
    path = os.path.normpath(os.path.join(root, rel))  # as named: a hub snapshot's shards are links into blobs
    confined(path, root, f"shard {quote(rel)} of {os.path.basename(index_path)}")
    if not os.path.isfile(path):
        raise InputError(f"{index_path}: shard {quote(rel)} is missing")
    return path


def _from_index(spec: str, index_path: str) -> Checkpoint:
    root = os.path.dirname(os.path.abspath(index_path))
    try:
        # an index is a few hundred KB for the largest models; a huge one is refused unread
        if os.path.getsize(index_path) > C.MAX_HEADER_BYTES:
            raise InputError(f"{index_path}: index larger than {C.MAX_HEADER_BYTES} bytes")
        with open(index_path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError(f"{index_path}: cannot read ({e.strerror or e})") from None
    index = load_json(index_path, raw, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{index_path}: not a valid index (needs a 'weight_map' object)")
    if not weight_map:
        # would open as a model without tensors, and merge into a complete-looking empty one
        raise InputError(f"{index_path}: not a valid index (its weight_map lists no tensors)")
    files = sorted({_safe_join(root, f, index_path) for f in weight_map.values()})
    if index_path.endswith(".bin.index.json"):
        ck: Checkpoint = BinCheckpoint(spec, root, files)
    else:
        ck = SafetensorsCheckpoint(spec, root, files, weight_map)
    ck.config_dir = root
    return ck


_DIR_CANDIDATES = (C.SAFE_INDEX, C.SAFE_SINGLE, C.ADAPTER_SAFE, C.BIN_INDEX, C.BIN_SINGLE, C.ADAPTER_BIN)


def _from_path(spec: str, path: str) -> Checkpoint:
    if os.path.isdir(path):
        _refuse_ambiguous(path)
        for cand in _DIR_CANDIDATES:
            p = os.path.join(path, cand)
            if os.path.isfile(p):
                confined(p, path, cand, "name the file itself to read it where it is")
                ck = _from_path(spec, p)
                ck.config_dir = os.path.abspath(path)
                return ck
        raise InputError(f"{path}: no weights found (looked for {', '.join(_DIR_CANDIDATES)})")
    if not os.path.isfile(path):
        # a FIFO or device would block the first read (or never end); nothing but a file is a checkpoint
        raise InputError(f"{path}: not a regular file")
    root = os.path.dirname(os.path.abspath(path))
    if path.endswith(".index.json"):
        return _from_index(spec, path)
    if path.endswith(".safetensors"):
        return SafetensorsCheckpoint(spec, root, [os.path.abspath(path)])
    if path.endswith((".bin", ".pt", ".pth")):
        return BinCheckpoint(spec, root, [os.path.abspath(path)])
    raise InputError(f"{path}: not a checkpoint (expected a directory, .safetensors, .bin or .index.json)")


def _refuse_ambiguous(path: str) -> None:
    """A directory holding a single weights file and an index of other shards holds two models:
    transformers loads the single file, a reader of the index another. Which one the user meant
    cannot be known, so the user names the file (an index listing only the single file is fine)."""
    for single, index in ((C.SAFE_SINGLE, C.SAFE_INDEX), (C.BIN_SINGLE, C.BIN_INDEX)):
        s, i = os.path.join(path, single), os.path.join(path, index)
        if not (os.path.isfile(s) and os.path.isfile(i)):
            continue
        confined(i, path, index)
        shards = None  # unreadable, too large or malformed: ambiguous all the same
        try:
            if os.path.getsize(i) <= C.MAX_HEADER_BYTES:
                with open(i, "rb") as f:
                    weight_map = load_json(i, f.read(), "index").get("weight_map")
                shards = set(weight_map.values()) if isinstance(weight_map, dict) else None
        except (OSError, InputError, AttributeError, TypeError):
            pass
        if shards != {single}:
            raise InputError(f"{path}: ambiguous: holds both {single} and {index} naming other shards; name the "
                             f"one to merge ({os.path.join(path, single)}, which transformers loads, or "
                             f"{os.path.join(path, index)})")


def _from_hub(spec: str) -> Checkpoint:
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, _, revision = spec.partition("@")
    try:
        local = huggingface_hub.snapshot_download(repo_id, revision=revision or None, allow_patterns=C.HUB_ALLOW_PATTERNS)
        if not any(os.path.isfile(os.path.join(local, c)) for c in _DIR_CANDIDATES):
            local = huggingface_hub.snapshot_download(
                repo_id, revision=revision or None, allow_patterns=C.HUB_ALLOW_PATTERNS + C.HUB_BIN_PATTERNS)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise InputError(f"{spec}: not a local path, and the hub could not resolve it ({first})") from None
    ck = _from_path(spec, local)
    ck.hub_commit = os.path.basename(os.path.normpath(local))  # snapshots/<commit>: what was read
    return ck


def open_checkpoint(spec: str) -> Checkpoint:
    """Resolve what a user typed: an existing path first, else a hub id `org/name[@rev]`."""
    spec = spec.strip()
    if os.path.exists(spec):
        return _from_path(spec, spec)
    if HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return _from_hub(spec)
    raise InputError(f"{spec}: no such file or directory")
