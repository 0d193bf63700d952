"""The resume manifest: what an interrupted merge had finished, kept inside `OUT.partial`.

An append-only JSON-lines log. The first line is the merge's fingerprint (inputs, method,
parameters, statistics, output layout); then one line per finished global pass (its state, in
a blob beside the log) and one per written row chunk (its crc32, and the extras the method
returned for it, such as TIES' undecided entries, in a blob). A line is appended only after the
bytes it describes were written, and `--resume` re-reads and checks every chunk against its
crc32, so a torn write, a lost page or a damaged file is merged again, never trusted. A torn
last line (a crash mid-append) is ignored.

Blobs are pickles written by this process into its own output directory; each line holds its
blob's sha256 and a blob that does not match is treated as missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import threading
from dataclasses import dataclass
from typing import Any

from tensormerge.constants import RESUME_DIR
from tensormerge.engine.writer import os_error_reason
from tensormerge.errors import OutputError, short

LOG = "manifest.jsonl"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
FORMAT = 1


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
        m._append({"tensormerge_manifest": FORMAT, "fingerprint": fingerprint})
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
        """The manifest of an interrupted merge, or None when there is none to continue."""
        m = cls(partial)
        try:
            with open(m.path, "rb") as f:
                lines = f.read().split(b"\n")
        except OSError:
            return None
        for lineno, raw in enumerate(lines, 1):
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError):
                continue  # a torn last line, or an empty one
            if not isinstance(rec, dict):
                continue
            if "tensormerge_manifest" in rec:
                if rec.get("tensormerge_manifest") != FORMAT:
                    return None
                m.fingerprint = rec.get("fingerprint")
            elif "pass" in rec or "chunk" in rec:
                try:
                    m._take(rec)
                except (KeyError, TypeError, ValueError):
                    text = short(raw.decode(errors="replace"))
                    raise OutputError(f"{m.path}: line {lineno} is not a manifest record ({text}); "
                                      f"run without --resume to start over") from None
            elif rec.get("finished"):
                m.finished = True
            m._seq += 1
        if m.fingerprint is None:
            return None
        m._fd = os.open(m.path, os.O_WRONLY | os.O_APPEND)
        return m

    def _take(self, rec: dict) -> None:
        """A pass or chunk line into memory; KeyError, TypeError or ValueError if malformed."""
        if "pass" in rec:
            if not _is_int(rec["pass"]):
                raise ValueError(rec["pass"])
            self.passes[rec["pass"]] = rec
            return
        block, r0, r1 = rec["chunk"]
        fields = (r0, r1, rec["crc32"], rec["nbytes"])
        if not (isinstance(block, str) and all(map(_is_int, fields))
                and all(v is None or isinstance(v, str) for v in (rec.get("blob"), rec.get("sha256")))):
            raise TypeError(rec)
        self.chunks[(block, r0, r1)] = ChunkRecord(block, r0, r1, rec["crc32"], rec["nbytes"],
                                                   rec.get("blob"), rec.get("sha256"))

    # ------------------------------------------------------------------ writing
    def _append(self, rec: dict) -> None:
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        with self._lock, self._writing(self.path):
            os.write(self._fd, line)  # one write on an O_APPEND file: lines never interleave
            self._seq += 1

    def _blob(self, prefix: str, obj: Any) -> tuple[str, str]:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            name = f"{prefix}-{self._seq:08d}.pkl"
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
        if blob is None or os.sep in blob or blob.startswith("."):
            return None
        try:
            with open(os.path.join(self.dir, blob), "rb") as f:
                data = f.read()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha:
            return None
        return pickle.loads(data)

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
