"""Where a run may write, one run at a time per output, and the final rename.

Shared by `run` (and a future `sweep`) and the statistics commands, so every command that
writes a directory refuses the same things before any work:

- an output that is, contains or lies inside an input, the base, a statistics store or a data
  file, or that is or contains the working directory (`--output .` would empty it);
- an output (or `OUT.partial`) that is a symbolic link or not a directory, an output inside any
  `*.partial` directory, and an `OUT.partial` tensormerge did not make (a run removes it);
- once checkpoints are resolved, an output or `--report` inside a hub input's cache folder or
  MaTS' `init` directory; a `--report` inside OUT or OUT.partial, or the lock file;
- `--overwrite` of anything but an empty directory or an output of the same command (a merge's
  `tensormerge.json`, a store's `zarr.json`), since replacing it deletes what is there; a merge
  output holding a file its `tensormerge.json` does not list as written (a user's notes);
- a `--report` naming anything but a new name, an earlier report or a link (the report lands
  by a rename, which would replace a model's weights or turn a device node into a file).

The lock is `fcntl.flock` on `OUT.partial.lock`, a file beside `OUT.partial` that holds the
holder's pid, host and start time for the error line. flock rather than an O_EXCL file:
the kernel releases it when the holder dies however it dies, so `--resume` after a SIGKILL
just takes it, pid reuse cannot fake a live holder, and NFS propagates it between hosts.
Beside rather than inside `OUT.partial`, because that directory is removed, recreated and
renamed during a run (and zarr clears a store it opens for writing). The file is unlinked
while still locked, and a locker checks that the path still names the inode it locked, so a
run never holds a lock on a file another run no longer sees. A lock file left behind (its
holder was killed) is reported when it is taken over, never silently; one left by another host,
whose process cannot be checked from here, is refused until the user removes it.

The finish moves an existing `OUT` into `OUT.partial/.tensormerge-replaced` (a name inside
this run's own directory), renames `OUT.partial` to `OUT`, and only then removes the old
output from inside the new one: no name beside `OUT` is ever created or removed, and a crash
between the renames leaves the finished merge in `OUT.partial` for `--resume` to put in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import Iterable

from tensormerge import constants as C
from tensormerge.durable import fsync_dir
from tensormerge.engine import faults
from tensormerge.errors import OutputError

LOCK_SUFFIX = C.PARTIAL_SUFFIX + ".lock"  # OUT.partial.lock
REPLACED = ".tensormerge-replaced"  # the previous OUT, inside OUT.partial (then OUT) during the finish
WRITTEN = "files"  # tensormerge.json: every file the merge wrote into its output (writer.finish_files)
OURS_SUBDIRS = {C.RESUME_DIR, REPLACED}  # the only directories a merge output ever holds
STATS_RESUME_DIR = ".resume"  # stats_compute/collect.RESUME_DIR: `stats compute`'s checkpoint, inside OUT.partial
MAX_MARKER_BYTES = 64 * 1024 * 1024  # a tensormerge.json / zarr.json larger than this is not ours


def _within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _relation(out: str, other: str) -> str | None:
    """How real path `out` relates to real path `other`: 'is', 'contains', 'is inside', or None."""
    if out == other:
        return "is"
    if _within(other, out):
        return "contains"
    if _within(out, other):
        return "is inside"
    return None


def check_paths(out: str, protected: Iterable[tuple[str, str]], option: str = "--output") -> None:
    """Refuse an output (or `OUT.partial`) that is, contains or lies inside a protected path
    (role, path), or that is or contains the working directory. Paths that do not exist locally
    (hub repo ids, URLs) are skipped; symlinks are resolved on both sides."""
    real = os.path.realpath(out)
    for candidate in (real, real + C.PARTIAL_SUFFIX):
        for role, path in protected:
            if not path or "://" in path or not os.path.lexists(path):
                continue
            rel = _relation(candidate, os.path.realpath(path))
            if rel is not None:
                what = out if candidate == real else out + C.PARTIAL_SUFFIX
                raise OutputError(f"{option} {what}: {rel} {role} {path}; refusing to write there")
        cwd = os.path.realpath(os.getcwd())
        if _within(cwd, candidate):
            rel = "is" if cwd == candidate else "contains"
            raise OutputError(f"{option} {out}: {rel} the working directory {cwd}; refusing to write there")


def checkpoint_places(cks: Iterable) -> list[tuple[str, str]]:
    """Where the resolved checkpoints live, for the checks that can only follow resolution (a hub
    id or MaTS' `init` names no local path): every file, the checkpoint's directory (unless it
    was named as one file), and for a hub cache snapshot the whole repo folder
    (`models--org--name`, which holds the blobs the snapshot links to)."""
    places: list[tuple[str, str]] = []
    for ck in cks:
        role = f"input {ck.spec}"
        places += [(role, f) for f in ck.files]
        if ck.root and not os.path.isfile(ck.spec):
            places.append((role, ck.root))
            snapshots = os.path.dirname(os.path.abspath(ck.root))
            if os.path.basename(snapshots) == "snapshots":
                places.append((f"the hub cache folder of input {ck.spec}", os.path.dirname(snapshots)))
    return places


def write_report(report: str, data: dict) -> None:
    """Atomically: a temporary file beside it, then os.replace (which replaces a symbolic link
    rather than writing through it into whatever it points at)."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(report)), f".{os.path.basename(report)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, report)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def what_is_there(path: str, kind: str) -> str | None:
    """None when --overwrite may replace the directory `path`: it is empty, or an output of the
    same kind ('merge': its tensormerge.json names a method and the version that wrote it, and
    it holds no directory tensormerge does not make; 'stats': its zarr.json is a statistics
    store's). Otherwise what is there, in words, for the error line."""
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        return f"cannot be listed ({e.strerror})"
    if not entries:
        return None
    example = f"holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, e.g. {entries[0]!r}"
    marker = C.PROVENANCE if kind == "merge" else "zarr.json"
    doc = _read_json(os.path.join(path, marker))
    if kind == "merge":
        ours = isinstance(doc, dict) and "tensormerge" in doc and "method" in doc
        if ours:
            dirs = [e for e in entries if e not in OURS_SUBDIRS and os.path.isdir(os.path.join(path, e))]
            if dirs:
                return f"is a tensormerge output but also holds the directory {dirs[0]!r}, which tensormerge never writes"
            written = doc.get(WRITTEN)  # absent in outputs of versions before it was recorded
            if isinstance(written, list):
                added = [e for e in entries if e not in written and e not in OURS_SUBDIRS]
                if added:
                    return (f"is a tensormerge output but also holds {added[0]!r}, which that merge did not write "
                            f"(move it away first)")
            return None
        return f"is not a tensormerge output ({example}; no {marker} of a merge)"
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if isinstance(attrs, dict) and "tensormerge_stats" in attrs:
        return None
    return f"is not a statistics store ({example}; no {marker} of a tensormerge store)"


def _read_json(path: str):
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_MARKER_BYTES:
            return None
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError, RecursionError):
        return None


def is_our_partial(partial: str) -> bool:
    """Whether `OUT.partial` is tensormerge's, so a run may remove or resume it: empty (a run
    killed before writing anything), or holding what a run writes there first: a merge's resume
    manifest (Manifest.create), a statistics store's zarr.json (StatsWriter) or a checkpoint in
    `stats compute`'s resume directory."""
    try:
        entries = os.listdir(partial)
    except OSError:
        return False
    return (not entries or os.path.isfile(os.path.join(partial, "zarr.json")) or _holds_manifest(partial)
            or bool(_listing(os.path.join(partial, STATS_RESUME_DIR))))


def _holds_manifest(partial: str) -> bool:
    """A merge's resume directory with its manifest in it: an empty `.tensormerge-resume`
    beside someone's files is no sign that a run made them (they would be deleted)."""
    from tensormerge.engine.manifest import HEAD, LOG

    path = os.path.join(partial, C.RESUME_DIR, LOG)
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(len(HEAD))
    except OSError:
        return False
    return HEAD.startswith(head)  # empty: killed between creating it and its first line


def _listing(path: str) -> list[str]:
    try:
        return os.listdir(path) if os.path.isdir(path) and not os.path.islink(path) else []
    except OSError:
        return []


def check_output(out: str, *, overwrite: bool, keep_existing: bool = False, kind: str = "merge",
                 protected: Iterable[tuple[str, str]] = (), option: str = "--output",
                 flag: str = "--overwrite") -> None:
    """Everything about OUT that can be known before any work (see the module docstring).
    `keep_existing`: an existing OUT is fine without --overwrite (--resume finds it complete).
    `flag`: the option that lets an existing OUT be written (`--append` adds to a store)."""
    protected = list(protected)
    check_paths(out, protected, option)
    partial = out + C.PARTIAL_SUFFIX
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{option} {out}: its parent {parent} is not a directory")
    inside = [d for d in os.path.abspath(out).split(os.sep)[:-1] if d.endswith(C.PARTIAL_SUFFIX)]
    if inside:
        raise OutputError(f"{option} {out}: lies inside {inside[-1]!r}, a name tensormerge uses for an output "
                          f"being built (and removes); choose another place")
    for path in (out, partial):
        if os.path.islink(path):
            raise OutputError(f"{option} {path}: is a symbolic link (to {os.readlink(path)}); "
                              f"give the directory itself")
        if os.path.lexists(path) and not os.path.isdir(path):
            what = "a file" if os.path.isfile(path) else "not a directory"
            raise OutputError(f"{option} {path}: is {what}; refusing to write there")
    if os.path.isdir(partial) and not is_our_partial(partial):
        raise OutputError(f"{option} {out}: {partial} exists and was not made by tensormerge (it would be "
                          f"removed); move it away or choose another output")
    if os.path.lexists(out) and not keep_existing:
        if not overwrite:
            raise OutputError(f"{out}: exists (pass --overwrite to replace it)")
        problem = what_is_there(out, kind)
        if problem:
            raise OutputError(f"{out}: {problem}; refusing {flag}")


def check_report(report: str | None, out: str, protected: Iterable[tuple[str, str]] = ()) -> None:
    """`--report` must be writable before the merge starts, not found unwritable after it: a
    file is created and removed beside it, as the report's own temporary file will be; an
    existing path must be an earlier report (or a link, which the rename replaces). A
    report inside OUT (or OUT.partial) is refused: the output's file names are known only once
    the plan is built, and the report must never replace one of them."""
    if not report:
        return
    for role, path in protected:
        if path and "://" not in path and os.path.lexists(path) \
                and _relation(os.path.realpath(report), os.path.realpath(path)) in ("is", "is inside"):
            raise OutputError(f"--report {report}: is inside {role} {path}; refusing to write there")
    real, real_out = os.path.realpath(report), os.path.realpath(out)
    for own in (real_out, real_out + C.PARTIAL_SUFFIX):
        if _within(real, own):
            raise OutputError(f"--report {report}: is inside the output {own}, whose files it could replace; "
                              f"write it beside the output")
    if real == real_out + LOCK_SUFFIX:
        raise OutputError(f"--report {report}: is the output's lock file; give another name")
    try:
        if os.path.isdir(report):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        refusal = _report_refusal(report)
        if refusal:
            raise OutputError(f"--report {report}: {refusal}")
        # what write_report needs: a file created beside it (then renamed over it), never opened through it
        probe = os.path.join(os.path.dirname(os.path.abspath(report)), f".{os.path.basename(report)}.{os.getpid()}.probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"--report {report}: cannot write ({e.strerror or e})") from None


def _report_refusal(report: str) -> str | None:
    """Why an existing `--report` path may not be replaced, or None: the report is written by a
    rename over it, which would turn a device node into a file (and a FIFO would block the check
    forever), and replace any file at all. Only an earlier report (a JSON object as `run` or
    `sweep` write them) or a symbolic link (the rename replaces the link, not its target) is."""
    try:
        st = os.lstat(report)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a device, FIFO or socket); give a file name"
    doc = _read_json(report)
    if isinstance(doc, dict) and ({"output", "method"} <= doc.keys() or "candidates" in doc):
        return None
    return "exists and is not a tensormerge report; remove it or give another name"


# ---------------------------------------------------------------------------------- the lock
def _holder(text: str) -> dict | None:
    try:
        d = json.loads(text)
    except ValueError:
        return None
    return d if isinstance(d, dict) and isinstance(d.get("pid"), int) and isinstance(d.get("host"), str) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Exclusive right to write OUT (and OUT.partial) for one run; see the module docstring.

    `with OutputLock(out, "run"):` fails at once with one line naming the holder when another
    live run holds it. A lock file left by a dead run is taken over with a warning on stderr
    (unless `quiet`), also kept in `stale` for the caller's report."""

    def __init__(self, out: str, command: str = "run", quiet: bool = False):
        self.out = out
        self.path = out + LOCK_SUFFIX
        self.command = command
        self.quiet = quiet
        self.stale: str | None = None
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        host = socket.gethostname()
        while True:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)  # as OUT.partial's would be
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OutputError(f"{self.out}: cannot create the lock file {self.path} ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                text = _read_fd(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.out}: cannot lock {self.path} ({e.strerror})") from None
                h = _holder(text)
                who = (f"pid {h['pid']} on host {h['host']} ({h.get('command', '?')}, since {h.get('started', '?')})"
                       if h else "a run that is starting")
                raise OutputError(f"{self.out}: another tensormerge run is writing it: {who}; wait for it to "
                                  f"finish or stop it (lock {self.path})") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder unlinked it as we opened it: lock the file that is there now
        left = _holder(_read_fd(fd))
        if left is not None and (left["pid"], left["host"]) != (os.getpid(), host):
            if left["host"] != host:
                os.close(fd)
                raise OutputError(f"{self.out}: locked by pid {left['pid']} on host {left['host']}, whose process "
                                  f"cannot be checked from {host}; if no tensormerge run is writing it there, "
                                  f"remove {self.path}")
            state = "which is no longer running" if not _alive(left["pid"]) else "which no longer holds it"
            self.stale = (f"{self.path}: left by pid {left['pid']} ({left.get('command', '?')}, since "
                          f"{left.get('started', '?')}), {state}; taking it over")
            if not self.quiet:
                print(f"warning: {self.stale}", file=sys.stderr, flush=True)
        me = json.dumps({"pid": os.getpid(), "host": host, "command": self.command,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
        except OSError as e:
            os.close(fd)
            raise OutputError(f"{self.out}: cannot write the lock file {self.path} ({e.strerror})") from None
        self.fd = fd

    def release(self) -> None:
        """Unlink the lock file while still holding it, then let go."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if os.fstat(self.fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino:
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None


def _read_fd(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------- the finish
def publish(partial: str, out: str, *, overwrite: bool, kind: str = "merge") -> None:
    """Rename the finished `partial` to `out`. An existing `out` is checked again (it may have
    appeared during the run), moved into `partial` under REPLACED, and removed only once the
    new output is in place. On failure `partial` is left whole (--resume finishes it)."""
    if os.path.lexists(out):
        if not overwrite:
            raise OutputError(f"{out}: appeared during the run (pass --overwrite to replace it); the finished "
                              f"output is kept in {partial}")
        problem = "is a symbolic link" if os.path.islink(out) else (
            "is not a directory" if not os.path.isdir(out) else what_is_there(out, kind))
        if problem:
            raise OutputError(f"{out}: {problem}; refusing --overwrite (the finished output is kept in {partial})")
        aside = os.path.join(partial, REPLACED)
        if os.path.lexists(aside):
            shutil.rmtree(aside)
        os.rename(out, aside)
        faults.hit("rename")
        try:
            os.rename(partial, out)
        except OSError:
            with contextlib.suppress(OSError):
                os.rename(aside, out)
            raise
    else:
        os.rename(partial, out)
    fsync_dir(os.path.dirname(os.path.abspath(out)))
    remove_replaced(out)


def remove_replaced(out: str) -> None:
    """Remove the previous output a finish moved into `out` (left there by a crash just after
    the rename): a name only tensormerge creates, inside a directory it wrote."""
    aside = os.path.join(out, REPLACED)
    if os.path.isdir(aside) and not os.path.islink(aside):
        shutil.rmtree(aside, ignore_errors=True)
