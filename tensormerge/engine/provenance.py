"""What identifies each input in `tensormerge.json`: its content, and its hub commit and blobs.

A checkpoint's `fingerprint` (names, shapes, dtypes, file sizes) is cheap and is what a resumed
merge matches, but two fine-tunes of one model share it. The `content` digest tells them apart
without a byte read twice: the merge pass checksums (crc32) every row range it reads, on the
reader thread before the bytes go anywhere; the row ranges of each stored tensor combine, in row
order, into the crc32 of the tensor's bytes (`crc32_combine`), whatever the chunking, thread
count or executor; and the digest is a sha256 over every stored tensor's name, dtype, shape and
crc32 (and the tied names). Rows this run did not read (chunks an interrupted run finished,
a base the method does not read) are read for it after the merge, so the digest always covers
every byte of every tensor. crc32 detects any accidental difference (always one value, one
burst of up to 32 bits); it is no defence against a forgery: the hub's sha256s are.

For a Hugging Face cache snapshot (`models--org--name/snapshots/<commit>`, however named), the
commit and each file's blob id come from the cache's layout: a blob's name is the sha256 of an
LFS file's content, the git blob sha1 of a small file; they are recorded as such, not re-hashed.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from typing import TYPE_CHECKING, Callable

import torch

from tensormerge.engine.crc import crc32, crc32_combine
from tensormerge.engine.sources import Checkpoint

if TYPE_CHECKING:
    from tensormerge.engine.run import Runner

ALGORITHM = "sha256 over sorted lines 'name dtype shape crc32' (crc32: of the tensor's stored bytes) and 'name -> tied'"
FILL_BYTES = 64 << 20  # rows read after the merge, at most this many bytes at a time
_HEX = re.compile(r"^[0-9a-f]+$")


class ContentHashes:
    """crc32s of the row ranges read from each checkpoint (by its index in `plan.checkpoints`)."""

    def __init__(self) -> None:
        self.ranges: dict[int, dict[str, dict[tuple[int, int], tuple[int, int]]]] = {}
        self._lock = threading.Lock()

    def add(self, which: int, name: str, r0: int, r1: int, x: torch.Tensor) -> None:
        """Rows [r0, r1) of tensor `name` as read (contiguous, its stored dtype, on the host)."""
        raw = x.reshape(-1).view(torch.uint8).numpy()
        entry = (crc32(raw), raw.nbytes)
        with self._lock:
            self.ranges.setdefault(which, {}).setdefault(name, {})[(r0, r1)] = entry

    def update(self, other: dict) -> None:
        """Fold in a dask worker's `ranges`."""
        with self._lock:
            for which, names in other.items():
                for name, rows in names.items():
                    self.ranges.setdefault(which, {}).setdefault(name, {}).update(rows)

    def tensor_crc32(self, ck: Checkpoint, which: int, name: str, piece_bytes: int) -> tuple[int, int, int]:
        """(crc32, bytes, bytes read now) of a whole stored tensor: its recorded row ranges
        chained from row 0, and the rows no range covers read now, in pieces."""
        info = ck.tensors[name]
        rows = info.shape[0] if info.shape else 1
        row_bytes = info.nbytes // rows if rows else 0
        have = self.ranges.get(which, {}).get(name, {})
        starts: dict[int, tuple[int, int, int]] = {}
        for (r0, r1), (crc, n) in have.items():
            if r1 > starts.get(r0, (r0, 0, 0))[0]:
                starts[r0] = (r1, crc, n)  # the longest range from each row
        crc = total = reread = pos = 0
        while pos < rows:
            if pos in starts:
                r1, c, n = starts[pos]
            else:
                r1 = min([s for s in starts if s > pos] + [rows])
                r1 = min(r1, pos + max(1, piece_bytes // max(row_bytes, 1)))
                x = ck.read(name, pos, r1)
                raw = x.reshape(-1).view(torch.uint8).numpy()
                c, n = crc32(raw), raw.nbytes
                reread += n
                del x, raw
            crc = crc32_combine(crc, c, n)
            total += n
            pos = r1
        return crc, total, reread

    def digest(self, ck: Checkpoint, which: int, piece_bytes: int = FILL_BYTES) -> tuple[dict, int]:
        """(`content` record, bytes read to complete it)."""
        h = hashlib.sha256()
        total = reread = 0
        names = sorted(n for n in ck.tensors if n not in ck.aliases)
        for name in names:
            t = ck.tensors[name]
            crc, n, r = self.tensor_crc32(ck, which, name, piece_bytes)
            total, reread = total + n, reread + r
            h.update(f"{name}\t{str(t.dtype).removeprefix('torch.')}\t{list(t.shape)}\t{crc:08x}\n".encode())
        for name in sorted(ck.aliases):
            h.update(f"{name}\t-> {ck.aliases[name]}\n".encode())
        return {"digest": h.hexdigest(), "algorithm": ALGORITHM, "tensors": len(names), "bytes": total}, reread


def hub_snapshot(ck: Checkpoint) -> dict | None:
    """{"repo", "revision", "hub_files"} when the checkpoint lies in a Hugging Face cache
    snapshot folder, else None. `hub_files` maps each file of the snapshot (a link into the
    repo's blobs) to its blob id: {"sha256": ...} (LFS) or {"git_sha1": ...} (a git blob)."""
    snap = ck.config_dir or ck.root
    snap = os.path.abspath(snap)
    parent, commit = os.path.split(snap)
    repo_dir, snapshots = os.path.split(parent)
    folder = os.path.basename(repo_dir)
    blobs = os.path.realpath(os.path.join(repo_dir, "blobs"))
    if snapshots != "snapshots" or not folder.startswith("models--") or not os.path.isdir(blobs):
        return None
    files: dict[str, dict[str, str]] = {}
    for here, dirs, names in os.walk(snap):
        dirs.sort()
        for fname in sorted(names):
            path = os.path.join(here, fname)
            real = os.path.realpath(path)
            blob = os.path.basename(real)
            if os.path.dirname(real) != blobs or not _HEX.match(blob):
                continue  # not a cache link (a file put there by hand): no published id to record
            kind = {64: "sha256", 40: "git_sha1"}.get(len(blob))
            if kind:
                files[os.path.relpath(path, snap).replace(os.sep, "/")] = {kind: blob}
    return {"repo": folder[len("models--"):].replace("--", "/"), "revision": commit, "hub_files": files}


def describe(ck: Checkpoint, content: dict) -> dict:
    """An input's record in `tensormerge.json`: spec, file sizes, tensor count, `fingerprint`,
    `content`, and for a hub snapshot `repo`, `revision` and `hub_files`."""
    return {**ck.fingerprint(), "content": content, **(hub_snapshot(ck) or {})}


def describe_inputs(plan, content_of: Callable[[int, Checkpoint], dict]) -> dict:
    """The inputs and base as the user named them: for adapters (engine.lora) the adapter and
    base files, not the virtual checkpoints the engine reads. `content_of(which, ck)` digests a
    checkpoint (`which`: its index among the plan's checkpoints, or negative for one the merge
    did not read itself, which is then digested whole)."""
    inputs, base = (plan.inputs, plan.base) if plan.lora is None else plan.lora.user_checkpoints(plan)

    def which(k: int, ck) -> int:
        return next((j for j, c in enumerate(plan.checkpoints) if c is ck), -1 - k)
    return {"inputs": [describe(ck, content_of(which(k, ck), ck)) for k, ck in enumerate(inputs)],
            "base": describe(base, content_of(which(len(inputs), base), base)) if base is not None else None}


def record(runner: Runner, inputs: dict, seconds: float, patched: int, notes: dict[str, dict],
           fingerprint: str) -> dict:
    """`tensormerge.json`: what was merged from what, how, and each block's checksum; written
    into the output before it is renamed into place, so an output never lacks it."""
    import safetensors

    from tensormerge import __version__

    plan, stats = runner.plan, runner.stats
    return {
        "tensormerge": __version__,
        "versions": {"torch": torch.__version__, "safetensors": safetensors.__version__},
        "method": plan.method.name,
        "params": plan.params.as_dict(),
        "fingerprint": fingerprint,
        **inputs,
        "statistics": plan.stats.describe() if plan.stats is not None else None,
        "fallback_blocks": plan.fallback_blocks,
        "base_stats_missing": plan.base_stats_missing,
        "settings": runner.opts.settings,
        **({"lora": plan.lora.report()} if plan.lora is not None else {}),
        "seconds": round(seconds, 3),
        "patched_entries": patched,
        "blocks": {b.name: {"crc32": f"{stats[b.name].crc32:08x}", "chunks": len(b.chunks),
                            "seconds": round(stats[b.name].seconds, 4), **notes.get(b.name, {})}
                   for b in plan.blocks},
    }
