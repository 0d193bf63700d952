"""The safetensors file format, parsed and laid out by hand.

We read headers ourselves (rather than through `safe_open`) for two reasons: a header is data
from a stranger and is validated before any offset in it is trusted, and the engine reads
tensors and row ranges with positioned reads into buffers it owns, so resident memory follows
the budget instead of a memory map's touched pages.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass

import torch

from tensormerge.constants import MAX_HEADER_BYTES, SAFETENSORS_DTYPES, TORCH_TO_SAFETENSORS
from tensormerge.errors import InputError


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie in one file."""

    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first data byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_bytes(self) -> int:
        rows = self.shape[0] if self.shape else 1
        return self.nbytes // rows if rows else 0


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# torch indexes with signed 64-bit integers: a dimension or element count beyond this cannot be
# a tensor, whatever the file claims, and would overflow (or be silently truncated) later.
_INT64_MAX = (1 << 63) - 1
# Error lines quote values taken from the file; a hostile file can make those megabytes long.
_QUOTE_CHARS = 200


def _cut(text: str) -> str:
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


def quote(value) -> str:
    """repr of a value from a header, cut short so an error stays one readable line (repr also
    escapes newlines and terminal control codes a hostile name might carry)."""
    return _cut(repr(value))


class _DuplicateKey(ValueError):
    """A JSON object that names a key twice (json keeps the last silently)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a duplicated key is refused, because readers disagree on which copy
    wins (Python keeps the last), so the same file would mean different tensors to each."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def load_json(path: str, raw: bytes, what: str):
    """JSON from a stranger's file, or an InputError naming the file: json.loads alone lets
    RecursionError (deep nesting) and a bare ValueError (an integer past Python's digit limit)
    escape, and silently keeps the last of two equal keys."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise InputError(f"{path}: corrupted {what} (key {quote(e.args[0])} appears twice)") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: corrupted {what} (not UTF-8: {e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path}: corrupted {what} ({e.__class__.__name__}: {_cut(str(e))})") from None


def unprintable(s: str) -> bool:
    """Names end up in terminal output, JSON we write and error lines: a control character could
    rewrite the user's terminal, a lone surrogate cannot be encoded at all."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in s)


def _is_int(x) -> bool:
    # JSON true/false arrive as bool, which Python counts as int; a shape of [true] is corruption.
    return isinstance(x, int) and not isinstance(x, bool)


FileIdentity = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def identity(st: os.stat_result) -> FileIdentity:
    """Which file, at which size and modification: what the data reads are checked against, so
    bytes are never read through a header that another file (renamed over it) or a later write
    made wrong."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str], list[tuple[str, str]]]:
    """Parse and validate a safetensors header (see read_header_and_identity)."""
    return read_header_and_identity(path)[:3]


def read_header_and_identity(path: str) -> tuple[dict[str, TensorEntry], dict[str, str], list[tuple[str, str]],
                                                 FileIdentity]:
    """Parse and validate a safetensors header; also the identity of the file it was read from.

    Returns (entries, metadata, aliases) where aliases lists (alias, canonical) pairs for names
    whose data range is identical to an earlier name's (a tied tensor written twice by offset).
    Every failure, whatever the bytes, is an InputError naming the file: the header comes from a
    stranger, and the caller must be able to refuse it in one line.
    """
    try:
        # O_NONBLOCK so a FIFO or device named *.safetensors cannot block the open; it is refused
        # below as not a regular file before anything is read from it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{path}: not a regular file")
            size = st.st_size
            ident = identity(st)
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise InputError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > MAX_HEADER_BYTES:
                raise InputError(f"{path}: safetensors header length {hlen} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + hlen > size:
                raise InputError(f"{path}: safetensors header length {hlen} runs past the end of the file ({size} bytes)")
            raw = f.read(hlen)
            if len(raw) < hlen:
                raise InputError(f"{path}: file ended inside the safetensors header (changed while being read?)")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    header = load_json(path, raw, "safetensors header")
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupted safetensors header (not a JSON object)")
    data_start = 8 + hlen
    data_len = size - data_start
    metadata = _metadata(path, header.pop("__metadata__", None))
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, data_start, data_len)
    aliases = _check_overlaps(path, entries, data_start, data_len)
    return entries, metadata, aliases, ident


def _metadata(path: str, metadata) -> dict[str, str]:
    # The format defines it as an optional map of strings to strings (the reference reader refuses
    # anything else). Values may hold newlines (configs are stored there); they are never printed.
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: corrupted safetensors header (__metadata__ is {quote(metadata)}, not an object)")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise InputError(f"{path}: corrupted safetensors header (__metadata__ entry {quote(k)} is {quote(v)}, "
                             "not a string)")
    return metadata


def _entry(path: str, name: str, info, data_start: int, data_len: int) -> TensorEntry:
    if unprintable(name):
        raise InputError(f"{path}: tensor name {quote(name)} holds control or unencodable characters")
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise InputError(f"{path}: tensor {quote(name)}: header entry lacks dtype/shape/data_offsets")
    dtype_name = info["dtype"]
    dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise InputError(f"{path}: tensor {quote(name)}: unknown dtype {quote(dtype_name)}")
    shape, offs = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(_is_int(s) and 0 <= s <= _INT64_MAX for s in shape)
            and math.prod(s for s in shape if s) <= _INT64_MAX):
        raise InputError(f"{path}: tensor {quote(name)}: invalid shape {quote(shape)}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
        raise InputError(f"{path}: tensor {quote(name)}: invalid data_offsets {quote(offs)}")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise InputError(
            f"{path}: tensor {quote(name)}: data_offsets {quote(offs)} lie outside the data section ({data_len} bytes; truncated file?)"
        )
    expected = math.prod(shape) * element_size(dtype)
    if end - begin != expected:
        raise InputError(
            f"{path}: tensor {quote(name)}: data_offsets span {end - begin} bytes but {dtype_name}{quote(shape)} needs {expected}"
        )
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_overlaps(path: str, entries: dict[str, TensorEntry], data_start: int, data_len: int) -> list[tuple[str, str]]:
    """Tensors must tile the data section exactly, as the safetensors library requires (a hole
    between tensors, bytes before the first or after the last, or an empty tensor placed inside
    another are refused there, so `transformers` could not load the file either). One extension:
    a tensor written twice at identical offsets is a tied alias of the first."""
    aliases = []
    prev: TensorEntry | None = None
    pos = data_start
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end, e.name)):
        if prev is not None and e.nbytes and (e.begin, e.end) == (prev.begin, prev.end):
            if (e.dtype, e.shape) != (prev.dtype, prev.shape):
                raise InputError(f"{path}: tensors {quote(prev.name)} and {quote(e.name)} have overlapping data offsets")
            aliases.append((e.name, prev.name))
            continue
        if e.begin < pos and e.nbytes and prev is not None:
            raise InputError(f"{path}: tensors {quote(prev.name)} and {quote(e.name)} have overlapping data offsets")
        if e.begin != pos:
            raise InputError(f"{path}: tensor {quote(e.name)} starts at data offset {e.begin - data_start} where "
                             f"{pos - data_start} was expected (a hole between tensors, bytes before the first, or "
                             "an empty tensor inside another: the safetensors library refuses such a file)")
        pos = e.end
        if e.nbytes:
            prev = e
    if pos != data_start + data_len:
        raise InputError(f"{path}: {data_start + data_len - pos} bytes after the last tensor's data (the "
                         "safetensors library refuses such a file)")
    return aliases


def read_into(fd: int, entry: TensorEntry, buf: torch.Tensor, offset: int, nbytes: int) -> None:
    """Positioned read of `nbytes` from entry's data at `offset` into the uint8 tensor `buf`."""
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    pos = entry.begin + offset
    while done < nbytes:
        try:
            n = os.preadv(fd, [view[done:nbytes]], pos + done)
        except OSError as e:
            raise InputError(f"{entry.path}: tensor {entry.name!r}: cannot read ({e.strerror or e})") from None
        if n <= 0:
            raise InputError(f"{entry.path}: tensor {entry.name!r}: file ended early (truncated shard)")
        done += n


def build_header(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (length prefix included, padded to 8 bytes) and each tensor's data offsets."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offsets = []
    pos = 0
    for name, dtype, shape in tensors:
        n = math.prod(shape) * element_size(dtype)
        header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append((pos, pos + n))
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets
