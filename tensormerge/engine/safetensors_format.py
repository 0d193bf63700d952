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


def read_header(path: str) -> tuple[dict[str, TensorEntry], dict[str, str], list[tuple[str, str]]]:
    """Parse and validate a safetensors header.

    Returns (entries, metadata, aliases) where aliases lists (alias, canonical) pairs for names
    whose data range is identical to an earlier name's (a tied tensor written twice by offset).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise InputError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (hlen,) = struct.unpack("<Q", raw_len)
            if hlen > MAX_HEADER_BYTES:
                raise InputError(f"{path}: safetensors header length {hlen} exceeds the {MAX_HEADER_BYTES}-byte limit")
            if 8 + hlen > size:
                raise InputError(f"{path}: safetensors header length {hlen} runs past the end of the file ({size} bytes)")
            raw = f.read(hlen)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupted safetensors header ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupted safetensors header (not a JSON object)")
    data_start = 8 + hlen
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise InputError(f"{path}: corrupted safetensors header (__metadata__ is not an object)")
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        entries[name] = _entry(path, name, info, data_start, data_len)
    aliases = _check_overlaps(path, entries)
    return entries, metadata, aliases


def _entry(path: str, name: str, info, data_start: int, data_len: int) -> TensorEntry:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise InputError(f"{path}: tensor {name!r}: header entry lacks dtype/shape/data_offsets")
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise InputError(f"{path}: tensor {name!r}: unknown dtype {info['dtype']!r}")
    shape, offs = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise InputError(f"{path}: tensor {name!r}: invalid shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
        raise InputError(f"{path}: tensor {name!r}: invalid data_offsets {offs!r}")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise InputError(
            f"{path}: tensor {name!r}: data_offsets {offs} lie outside the data section ({data_len} bytes; truncated file?)"
        )
    expected = math.prod(shape) * element_size(dtype)
    if end - begin != expected:
        raise InputError(
            f"{path}: tensor {name!r}: data_offsets span {end - begin} bytes but {info['dtype']}{shape} needs {expected}"
        )
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_overlaps(path: str, entries: dict[str, TensorEntry]) -> list[tuple[str, str]]:
    aliases = []
    prev: TensorEntry | None = None
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end, e.name)):
        if e.nbytes == 0:
            continue
        if prev is not None and e.begin < prev.end:
            if (e.begin, e.end, e.dtype, e.shape) == (prev.begin, prev.end, prev.dtype, prev.shape):
                aliases.append((e.name, prev.name))
                continue
            raise InputError(f"{path}: tensors {prev.name!r} and {e.name!r} have overlapping data offsets")
        prev = e
    return aliases


def read_into(fd: int, entry: TensorEntry, buf: torch.Tensor, offset: int, nbytes: int) -> None:
    """Positioned read of `nbytes` from entry's data at `offset` into the uint8 tensor `buf`."""
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    pos = entry.begin + offset
    while done < nbytes:
        n = os.preadv(fd, [view[done:nbytes]], pos + done)
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
