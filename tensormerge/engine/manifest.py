"""The resume manifest: what an interrupted merge had finished, kept inside `OUT.partial`.

An append-only JSON-lines log. The first line is the merge's fingerprint (inputs, method,
parameters, statistics, output layout); then one line per finished global pass (its state, in
a blob beside the log) and one per written row chunk (its crc32, and the extras the method
returned for it, such as TIES' undecided entries, in a blob). A line is appended only after the
bytes it describes were written, and `--resume` re-reads and checks every chunk against its
crc32, so a torn write, a lost page or a damaged file is merged again, never trusted. A torn
last line (a crash mid-append) is cut off before anything is appended; any other line that is
not one of ours is an error.

Blobs are data, never code: a safetensors file whose metadata holds the state as tagged JSON
(dicts, lists, tuples, numbers, strings, fractions) and whose tensors are the state's tensors.
Nothing is unpickled, so a manifest planted in `OUT.partial` can at worst make the merge redo
work. Each line holds its blob's sha256; a blob that does not match, or does not decode, is
treated as missing (its pass or chunk runs again). Manifests of format 1 held pickles and are
refused unread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import shutil
import stat
import struct
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from tensormerge.constants import RESUME_DIR
from tensormerge.engine.writer import os_error_reason
from tensormerge.errors import OutputError

LOG = "manifest.jsonl"
FORMAT = 2
KEY = "tensormerge_manifest"  # the first line's key: {KEY: FORMAT, "fingerprint": ...}
# How that line begins on disk (`_append` writes compact JSON): what tells a run's own partial
# output from a user's directory that happens to hold a `.tensormerge-resume/` (engine/outdir.py).
HEAD = f'{{"{KEY}":'.encode()
STATE_KEY = "tensormerge_state"  # the blob's safetensors metadata entry holding the tagged JSON


class BadBlob(ValueError):
    """A blob that is not state this module wrote: it is treated as missing."""


def encode_state(obj: Any) -> bytes:
    """`obj` (dicts, lists, tuples, str, int, float, bool, None, Fraction, tensors) as a
    safetensors file: tensors as tensors, the rest as tagged JSON in its metadata."""
    import safetensors.torch

    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous().clone()  # clone: no two may share storage
            return {"tensor": key}
        if isinstance(x, Fraction):
            return {"fraction": [x.numerator, x.denominator]}
        if isinstance(x, numbers.Integral):
            return int(x)
        if isinstance(x, numbers.Real):
            f = float(x)
            return f if math.isfinite(f) else {"float": repr(f)}
        if isinstance(x, tuple):
            return {"tuple": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, dict):
            return {"dict": [[enc(k), enc(v)] for k, v in x.items()]}
        raise TypeError(f"resume manifest: cannot record a {type(x).__name__} (not state data)")

    meta = json.dumps(enc(obj), separators=(",", ":"), allow_nan=False)
    return safetensors.torch.save(tensors, metadata={STATE_KEY: meta})


def decode_state(data: bytes) -> Any:
    """The inverse of `encode_state`; anything else raises BadBlob."""
    import safetensors.torch

    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        meta = json.loads(header["__metadata__"][STATE_KEY])
        tensors = safetensors.torch.load(data)
    except Exception as e:  # not a safetensors file of ours, whatever the reason
        raise BadBlob(str(e)) from None

    def dec(x: Any) -> Any:
        if x is None or isinstance(x, (bool, str, int, float)):
            return x
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict) and len(x) == 1:
            (tag, v), = x.items()
            if tag == "tensor" and isinstance(v, str) and v in tensors:
                return tensors[v]
            if tag == "fraction" and isinstance(v, list) and len(v) == 2 and all(type(i) is int for i in v) and v[1]:
                return Fraction(v[0], v[1])
            if tag == "float" and v in ("nan", "inf", "-inf"):
                return float(v)
            if tag == "tuple" and isinstance(v, list):
                return tuple(dec(i) for i in v)
            if tag == "dict" and isinstance(v, list) and all(isinstance(i, list) and len(i) == 2 for i in v):
                out = {}
                for k, val in v:
                    k = dec(k)
                    if not isinstance(k, (str, int, float, bool, tuple, type(None))):
                        raise BadBlob("unhashable key")
                    out[k] = dec(val)
                return out
        raise BadBlob(f"unexpected value {str(x)[:40]}")

    try:
        return dec(meta)
    except RecursionError:
        raise BadBlob("nested too deep") from None


@dataclass
class ChunkRecord:
    block: str
    r0: int
    r1: int
    crc32: int
    nbytes: int
    blob: str | None = None
    sha256: str | None = None


class Manifest:
    def __init__(self, partial: str):
        self.dir = os.path.join(partial, RESUME_DIR)
        self.path = os.path.join(self.dir, LOG)
        self.fingerprint: str | None = None
        self.passes: dict[int, dict] = {}
        self.chunks: dict[tuple[str, int, int], ChunkRecord] = {}
        self.finished = False
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._seq = 0  # numbers blob names; past every line read, so a resumed run never reuses one

    @classmethod
    def create(cls, partial: str, fingerprint: str) -> Manifest:
        m = cls(partial)
        m.fingerprint = fingerprint
        with m._writing(m.path):
            os.makedirs(m.dir, exist_ok=True)
            m._fd = os.open(m.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        m._append({KEY: FORMAT, "fingerprint": fingerprint})
        return m

    @contextlib.contextmanager
    def _writing(self, path: str):
        """A full disk or a lost permission while recording is the output's error, in words."""
        try:
            yield
        except OSError as e:
            raise OutputError(f"{path}: cannot write ({os_error_reason(e)})") from None

    @classmethod
    def load(cls, partial: str) -> Manifest | None:
        """The manifest of an interrupted merge, or None when there is none to continue. A line
        that is not one this module writes is an error naming the line; a torn last line (no
        newline: the crash came mid-append) is cut off, so the next append starts a line."""
        m = cls(partial)
        try:
            st = os.stat(m.path)
            if not stat.S_ISREG(st.st_mode):
                raise OutputError(f"{m.path}: not a regular file; remove {partial} or run without --resume")
            with open(m.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise OutputError(f"{m.path}: cannot read ({os_error_reason(e)})") from None
        end = data.rfind(b"\n") + 1
        lines = data[:end].split(b"\n")[:-1]
        for number, raw in enumerate(lines, 1):
            m._parse(number, raw)
            m._seq += 1
        if m.fingerprint is None:
            return None
        with m._writing(m.path):
            if end < len(data):
                os.truncate(m.path, end)
            m._fd = os.open(m.path, os.O_WRONLY | os.O_APPEND)
        return m

    def _parse(self, number: int, raw: bytes) -> None:
        where = f"{self.path}: line {number}"
        fix = f"remove {os.path.dirname(self.dir)} or run without --resume"
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if number == 1:
            if isinstance(rec, dict) and rec.get(KEY) != FORMAT and type(rec.get(KEY)) is int:
                raise OutputError(f"{where}: a manifest of format {rec[KEY]} (an earlier "
                                  f"tensormerge; its state is not read); {fix}")
            if not _fits(rec, {KEY: int, "fingerprint": str}):
                raise OutputError(f"{where}: not a tensormerge resume manifest; {fix}")
            self.fingerprint = rec["fingerprint"]
        elif _fits(rec, {"pass": int, "name": str, "blob": str, "sha256": str}):
            self.passes[rec["pass"]] = rec
        elif (_fits(rec, {"chunk": list, "crc32": int, "nbytes": int}, {"blob": str, "sha256": str})
              and len(rec["chunk"]) == 3 and isinstance(rec["chunk"][0], str)
              and all(type(r) is int for r in rec["chunk"][1:])):
            block, r0, r1 = rec["chunk"]
            self.chunks[(block, r0, r1)] = ChunkRecord(block, r0, r1, rec["crc32"], rec["nbytes"],
                                                       rec.get("blob"), rec.get("sha256"))
        elif rec == {"finished": True}:
            self.finished = True
        else:
            raise OutputError(f"{where}: not a line this version of tensormerge writes; {fix}")

    # ------------------------------------------------------------------ writing
    def _append(self, rec: dict) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        with self._lock, self._writing(self.path):
            os.write(self._fd, line)  # one write on an O_APPEND file: lines never interleave
            self._seq += 1

    def _blob(self, prefix: str, obj: Any) -> tuple[str, str]:
        data = encode_state(obj)
        with self._lock:
            name = f"{prefix}-{self._seq:08d}.safetensors"
            self._seq += 1
        tmp = os.path.join(self.dir, name + ".tmp")
        with self._writing(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(self.dir, name))
        return name, hashlib.sha256(data).hexdigest()

    def record_pass(self, index: int, name: str, state: dict) -> None:
        blob, sha = self._blob("pass", state)
        self._append({"pass": index, "name": name, "blob": blob, "sha256": sha})

    def record_chunk(self, block: str, r0: int, r1: int, crc32: int, nbytes: int, extras: list) -> None:
        rec: dict[str, Any] = {"chunk": [block, r0, r1], "crc32": crc32, "nbytes": nbytes}
        if extras:
            rec["blob"], rec["sha256"] = self._blob("chunk", extras)
        self._append(rec)

    def record_finished(self) -> None:
        self._append({"finished": True})
        with self._writing(self.path):
            os.fsync(self._fd)

    # ------------------------------------------------------------------ reading
    def _read_blob(self, blob: str | None, sha: str | None) -> Any:
        if blob is None or os.sep in blob or "/" in blob or blob.startswith("."):
            return None
        path = os.path.join(self.dir, blob)
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read
                return None
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha:
            return None
        try:
            return decode_state(data)
        except BadBlob:
            return None

    def pass_state(self, index: int, name: str) -> dict | None:
        rec = self.passes.get(index)
        if rec is None or rec.get("name") != name:
            return None
        state = self._read_blob(rec.get("blob"), rec.get("sha256"))
        return state if isinstance(state, dict) else None

    def chunk_extras(self, rec: ChunkRecord) -> list | None:
        """The chunk's extras ([] when it had none), or None when its blob is lost or damaged."""
        if rec.blob is None:
            return []
        extras = self._read_blob(rec.blob, rec.sha256)
        return extras if isinstance(extras, list) else None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def remove(directory: str) -> None:
        shutil.rmtree(os.path.join(directory, RESUME_DIR), ignore_errors=True)


def _fits(rec: Any, required: dict[str, type], optional: dict[str, type] | None = None) -> bool:
    """A JSON object with exactly these keys and types (bools are not ints here)."""
    if not isinstance(rec, dict):
        return False
    optional = optional or {}
    if not set(required) <= set(rec) <= set(required) | set(optional):
        return False
    return all(isinstance(rec[k], t) and not (t is int and isinstance(rec[k], bool))
               for k, t in {**required, **optional}.items() if k in rec)
