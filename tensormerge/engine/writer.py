"""Sharded safetensors output, laid out before the first data byte and finished atomically.

Every output name, shape and dtype is known from the plan, so each shard file and its header
is created up front at its final size; a block or row chunk is then written at its offset, in
any order, by any thread or worker. The directory is built as `OUT.partial` and renamed to
`OUT` only when complete: an interrupted merge never leaves a complete-looking `OUT`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass

import torch

from tensormerge import constants as C
from tensormerge.engine.crc import crc32
from tensormerge.engine import faults
from tensormerge.durable import fsync_dir
from tensormerge.engine.outdir import WRITTEN, publish
from tensormerge.engine.safetensors_format import build_header, element_size
from tensormerge.engine.sources import confined
from tensormerge.errors import OutputError

PATCH_WINDOW_ELEMENTS = 1 << 22


@dataclass
class Slot:
    """Where one output tensor's data lies."""

    file: str
    begin: int  # absolute file offset
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def shard_layout(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int) -> list[list[int]]:
    """Greedy grouping in output order, as transformers does: a new shard when the next tensor
    would push the current one past shard_size (a tensor larger than shard_size gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dtype, shape) in enumerate(tensors):
        n = math.prod(shape) * element_size(dtype)
        if shards[-1] and size + n > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


class ShardedWriter:
    def __init__(self, out_dir: str, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int,
                 weights_name: str | None = None, json_files: dict[str, dict] | None = None):
        self.out_dir = os.path.abspath(out_dir)
        self.partial = self.out_dir + C.PARTIAL_SUFFIX
        self.tensors = tensors
        self.json_files = json_files or {}  # side files written (adapter_config.json), never copied
        # a PEFT adapter loads from one file of its own name: never sharded
        groups = [list(range(len(tensors)))] if weights_name else shard_layout(tensors, shard_size)
        n = len(groups)
        self.files = ([weights_name] if weights_name else [C.SAFE_SINGLE] if n == 1
                      else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.headers: list[bytes] = []
        self.slots: dict[str, Slot] = {}
        for fname, group in zip(self.files, groups):
            header, offsets = build_header([tensors[i] for i in group], {"format": "pt"})
            self.headers.append(header)
            for i, (b, e) in zip(group, offsets):
                name, dtype, shape = tensors[i]
                self.slots[name] = Slot(fname, len(header) + b, e - b, dtype, shape)
        self.total_size = sum(s.nbytes for s in self.slots.values())
        self._fds: dict[str, int] = {}
        self._finishing = self.partial

    def create(self) -> None:
        """Fresh `OUT.partial` with every shard at its final size and its header in place.

        A failure here (no permission, a full disk, a file-size limit) removes what was made:
        the caller's cleanup only covers what follows a successful create."""
        path = self.partial
        try:
            if os.path.exists(self.partial):
                shutil.rmtree(self.partial)
            os.makedirs(self.partial)
            for fname, header in zip(self.files, self.headers):
                path = os.path.join(self.partial, fname)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds[fname] = fd
                data = sum(s.nbytes for s in self.slots.values() if s.file == fname)
                os.ftruncate(fd, len(header) + data)
                self._pwrite(fd, header, 0, path)
        except OSError as e:
            self.abort()
            raise OutputError(f"{self.out_dir}: cannot create {path} ({os_error_reason(e)})") from None
        except BaseException:
            self.abort()
            raise

    def open_existing(self) -> None:
        """Reopen the shards of an interrupted merge's `OUT.partial` for `--resume`: each must
        have the size and header this layout gives, or it was made by another merge."""
        for fname, header in zip(self.files, self.headers):
            path = os.path.join(self.partial, fname)
            expected = len(header) + sum(s.nbytes for s in self.slots.values() if s.file == fname)
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as e:
                self.close()
                raise OutputError(f"{path}: cannot resume: {os_error_reason(e)}") from None
            self._fds[fname] = fd
            if os.fstat(fd).st_size != expected or os.pread(fd, len(header), 0) != header:
                self.close()
                raise OutputError(f"{path}: cannot resume: the shard does not have this merge's layout "
                                  f"(remove {self.partial} or run without --resume)")

    def _pwrite(self, fd: int, data, offset: int, path: str) -> None:
        view = memoryview(data).cast("B")
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise OutputError(f"{self.out_dir}: cannot write {path} ({os_error_reason(e)})") from None

    def write(self, name: str, byte_offset: int, data: torch.Tensor) -> None:
        """Write a contiguous CPU tensor's bytes at `byte_offset` inside tensor `name`, and start
        their writeback to disk now (see `start_writeback`)."""
        slot = self.slots[name]
        raw = data.reshape(-1).view(torch.uint8).numpy()
        assert byte_offset + raw.nbytes <= slot.nbytes, f"write past the end of {name}"
        fd = self._fds[slot.file]
        self._pwrite(fd, raw, slot.begin + byte_offset, os.path.join(self.partial, slot.file))
        start_writeback(fd, slot.begin + byte_offset, raw.nbytes)

    def crc32(self, name: str, byte_offset: int = 0, nbytes: int | None = None) -> int:
        """crc32 of written bytes of `name`, read back in bounded windows."""
        slot = self.slots[name]
        nbytes = slot.nbytes - byte_offset if nbytes is None else nbytes
        buf = bytearray(min(nbytes, PATCH_WINDOW_ELEMENTS * 4))
        crc, done = 0, 0
        while done < nbytes:
            n = min(len(buf), nbytes - done)
            view = memoryview(buf)[:n]
            got = os.preadv(self._fds[slot.file], [view], slot.begin + byte_offset + done)
            if got != n:
                return -1
            crc = crc32(view, crc)
            done += n
        return crc

    def sync(self) -> None:
        """fsync every shard written through this writer (another process's writer finishes)."""
        for fname, fd in self._fds.items():
            try:
                os.fsync(fd)
            except OSError as e:
                raise OutputError(f"{self.out_dir}: cannot write {fname} ({os_error_reason(e)})") from None

    def last_in_file(self, name: str) -> bool:
        """Whether `name` is the last tensor of its shard (a shard boundary follows its data)."""
        slot = self.slots[name]
        return not any(s.file == slot.file and s.begin > slot.begin for s in self.slots.values())

    def patch(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite elements (flat indices) of a written tensor: read-modify-write of the
        windows that hold them, so millions of scattered entries cost a few sequential passes."""
        slot = self.slots[name]
        size = element_size(slot.dtype)
        order = torch.argsort(index)
        index, values = index[order], values[order].to(slot.dtype)
        fd, path = self._fds[slot.file], os.path.join(self.partial, slot.file)
        start = 0
        while start < index.numel():
            lo = int(index[start])
            end = int(torch.searchsorted(index, lo + PATCH_WINDOW_ELEMENTS))
            hi = int(index[end - 1]) + 1
            buf = torch.empty((hi - lo) * size, dtype=torch.uint8)
            os.preadv(fd, [memoryview(buf.numpy()).cast("B")], slot.begin + lo * size)
            buf.view(slot.dtype)[index[start:end] - lo] = values[start:end]
            self._pwrite(fd, buf.numpy(), slot.begin + lo * size, path)
            start = end

    def finish(self, copy_from: str | None, provenance: dict, overwrite: bool) -> None:
        """Index, copied config files, provenance, fsync, then rename `OUT.partial` -> `OUT`."""
        self.finish_files(copy_from, provenance)
        self.rename_into_place(overwrite)

    def finish_files(self, copy_from: str | None, provenance: dict, generate=None) -> None:
        """Everything but the rename: index, side files, provenance, all fsynced. `generate`,
        given `OUT.partial` once the side files are in, returns files to add or replace there
        (the card, the recipe, config.json with the written dtype: engine/card.py)."""
        self._finishing = self.partial  # the file or directory at fault, for the error line
        try:
            if len(self.files) > 1:
                index = {"metadata": {"total_size": self.total_size},
                         "weight_map": {n: s.file for n, s in self.slots.items()}}
                self._write_json(C.SAFE_INDEX, index)
            if copy_from:
                for fname, src in side_files(copy_from):
                    if fname not in self.json_files:
                        self._finishing = os.path.join(self.partial, fname)
                        shutil.copyfile(src, self._finishing)
            for fname, obj in self.json_files.items():
                self._write_json(fname, obj)
            for fname, data in (generate(self.partial) if generate else {}).items():
                self._write_bytes(fname, data)
            names = {f for f in os.listdir(self.partial) if os.path.isfile(os.path.join(self.partial, f))}
            self._write_json(C.PROVENANCE, {**provenance, WRITTEN: sorted(names | {C.PROVENANCE})})
            for fname, fd in list(self._fds.items()):
                # a network or thin-provisioned disk may report a full disk only here
                self._finishing = os.path.join(self.partial, fname)
                os.fsync(fd)
                os.close(fd)
                del self._fds[fname]
            self._finishing = self.partial
            fsync_dir(self.partial)
        except OSError as e:
            raise OutputError(f"{self.out_dir}: cannot finish output: {self._finishing} ({os_error_reason(e)})") from None

    def rename_into_place(self, overwrite: bool) -> None:
        """`OUT.partial` -> `OUT`; an existing `OUT` (a previous output, checked again now) is
        removed only once the new one is in place, and no other name is touched (engine/outdir)."""
        self._finishing = self.out_dir
        try:
            publish(self.partial, self.out_dir, overwrite=overwrite, kind="merge")
            faults.hit("renamed")
        except OSError as e:
            raise OutputError(f"{self.out_dir}: cannot finish output: {self._finishing} ({os_error_reason(e)}); "
                              f"the finished merge is kept in {self.partial} (--resume puts it in place)") from None

    def _write_bytes(self, fname: str, data: bytes) -> None:
        """A whole file, replacing any copy of that name (a temporary file renamed over it, so
        the copy is never seen half-rewritten; like the copies, it lands with the final rename)."""
        path = self._finishing = os.path.join(self.partial, fname)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def _write_json(self, fname: str, obj: dict) -> None:
        path = self._finishing = os.path.join(self.partial, fname)
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    def close(self) -> None:
        """Close the shard files, keeping `OUT.partial` (an interrupted merge, for --resume)."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        """Close files and remove `OUT.partial`, so a failed merge leaves nothing behind."""
        self.close()
        shutil.rmtree(self.partial, ignore_errors=True)


def _is_side_file(fname: str) -> bool:
    """Config, generation config, tokenizer and the like: anything that is not weights."""
    if fname.startswith(".") or fname == C.PROVENANCE or fname.lower() == "readme.md":
        return False  # the base's card describes the base: the output gets its own
    if fname in C.WEIGHT_INDEX_NAMES or fname.endswith(".index.json"):
        return False
    return not fname.endswith(C.WEIGHT_SUFFIXES)


def side_files(copy_from: str) -> list[tuple[str, str]]:
    """(name, resolved path) of each file copied beside the merged weights, confined as the
    weights are: a link out of the checkpoint (or out of its hub repo folder) is an InputError,
    which the plan raises before any work."""
    out = []
    for fname in sorted(os.listdir(copy_from)):
        src = os.path.join(copy_from, fname)
        if _is_side_file(fname) and os.path.isfile(src):
            out.append((fname, confined(src, copy_from, "side file", "copy the file in, or remove the link")))
    return out


def os_error_reason(e: OSError) -> str:
    """The reason in words a user acts on: a full disk, a quota, or a file-size limit (which
    `ulimit -f` sets, and which CPython turns from SIGXFSZ into EFBIG by ignoring the signal)."""
    if e.errno == errno.ENOSPC:
        return "disk full: no space left on device"
    if e.errno == errno.EDQUOT:
        return "disk full: quota exceeded"
    if e.errno == errno.EFBIG:
        return "file too large: the file-size limit (ulimit -f) or the filesystem's maximum"
    return e.strerror or str(e)


def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without waiting (Linux's
    sync_file_range WRITE; elsewhere nothing). A merge fsyncs its shards before publishing:
    left to the kernel's dirty-page timers, a model's worth of output (or a sweep's several)
    was still in memory then and the fsync wrote it all while nothing else ran, which was a
    third of a task-arithmetic merge's time. Started chunk by chunk, the disk writes while the
    merge reads and computes, and the final fsync finds little left. Only a hint: errors are
    ignored (fsync reports what matters)."""
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
