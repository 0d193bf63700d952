"""A sweep's second half: score each candidate output with the user's own evaluation, choose one,
keep or remove the others, and say what happened (a table, a plot, `DIR/sweep.json`).

Nothing here knows of tensors: a candidate is a directory `DIR/<name>` holding a complete
tensormerge output, and its identity is what its `tensormerge.json` says it is (the merge's
`fingerprint`, which covers inputs, method, parameters and layout, plus each block's crc32, which
covers the bytes written). An evaluation is recorded under the candidate's name with that
identity and the evaluator that produced it, so a rerun reuses it only while both still hold; a
failed evaluation is never reused (a rerun tries it again).

`sweep.json` (written atomically: a temporary file, fsync, rename, fsync of DIR) holds, besides
what the engine records, the keys this module owns:

    evaluations  {name: {identity, evaluator, metrics, seconds, error}}, in candidate order
    candidates   one row per candidate (Candidate's fields): the table, as data
    selection    {spec, metric, mode, best}
    keep         {mode, best, removing, removed, note}

Metrics are stored as JSON: a non-finite float becomes the string "nan", "inf" or "-inf" (the
file stays strict JSON); only finite numbers can be selected, so nothing changes meaning.
Module-level imports stay light (no torch, no matplotlib): `tensormerge sweep --help` and a
sweep whose evaluation runs elsewhere pay for neither.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from tensormerge.durable import fsync_dir
from tensormerge.errors import InputError, OutputError, ParameterError, one_line

SWEEP_JSON = "sweep.json"
STATE_FORMAT = 1
PROVENANCE = "tensormerge.json"  # == constants.PROVENANCE (constants imports torch)
MAX_JSON_BYTES = 64 * 1024 * 1024  # a sweep.json / tensormerge.json larger than this is not ours
STDOUT_TAIL = 1 << 20  # bytes of an evaluation's stdout kept: its last line must fit
STDERR_TAIL = 16 << 10  # bytes of its stderr kept, for the error line
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of a timed-out evaluation
ERROR_CHARS = 300
TRASH_PREFIX = ".tensormerge-removing-"  # a removed candidate, renamed before it is deleted


@dataclass
class Candidate:
    name: str                 # directory name under DIR, safe characters only
    method: str
    params: dict              # the candidate's typed parameter values (what tensormerge.json records)
    swept: dict               # only the swept parameters and their values, for the table/plot
    output: str               # absolute path DIR/<name>
    merge_seconds: float | None = None
    status: str = "pending"   # "merged" | "failed" (merge error) | "pending"
    error: str | None = None  # one line
    metrics: dict | None = None
    eval_seconds: float | None = None
    eval_error: str | None = None
    selected: bool = False


def rows(cands: list[Candidate]) -> list[dict]:
    """The candidates as sweep.json records them (the table, as data)."""
    return [_jsonable(dataclasses.asdict(c)) for c in cands]


# ---------------------------------------------------------------- sweep.json

def load_state(sweep_dir: str) -> dict:
    """DIR/sweep.json, or a fresh record when there is none. Anything else there is refused
    rather than overwritten: it is not ours to replace."""
    path = os.path.join(sweep_dir, SWEEP_JSON)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return {"tensormerge_sweep": STATE_FORMAT}
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{path}: is not a regular file, so not a sweep record; move it away")
    if st.st_size > MAX_JSON_BYTES:
        raise InputError(f"{path}: {st.st_size} bytes is too large for a sweep record; move it away")
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: is not a readable sweep record ({one_line(str(e), 120)}); "
                         f"move it away to start the record afresh") from None
    if not isinstance(doc, dict) or "tensormerge_sweep" not in doc:
        raise InputError(f"{path}: is not a tensormerge sweep record (no 'tensormerge_sweep' key); move it away")
    for key, kind in (("evaluations", dict), ("candidates", list), ("selection", dict), ("keep", dict)):
        if key in doc and not isinstance(doc[key], kind):
            what = "object" if kind is dict else "array"
            raise InputError(f"{path}: '{key}' is not a JSON {what}; move the file away")
    return doc


def save_state(sweep_dir: str, state: dict) -> None:
    """Atomically: a temporary file beside it, fsync, rename over sweep.json, fsync of DIR. A
    crash leaves the previous record or the new one, never half of one."""
    state.setdefault("tensormerge_sweep", STATE_FORMAT)
    text = json.dumps(_jsonable(state), indent=2, allow_nan=False) + "\n"
    path = os.path.join(sweep_dir, SWEEP_JSON)
    tmp = os.path.join(sweep_dir, f".{SWEEP_JSON}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(sweep_dir)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(f"{path}: cannot be written ({e.strerror or e})") from None


def output_identity(output: str) -> str | None:
    """What an evaluation was of: the output's merge fingerprint and each block's crc32 from its
    tensormerge.json (not its timings: the same merge done again is the same output). None when
    there is no readable tensormerge.json with a fingerprint: such a result is never reused."""
    doc = _read_json(os.path.join(output, PROVENANCE))
    if not isinstance(doc, dict) or not isinstance(doc.get("fingerprint"), str):
        return None
    blocks = doc.get("blocks")
    crcs = {k: v.get("crc32") for k, v in blocks.items() if isinstance(v, dict)} if isinstance(blocks, dict) else None
    import hashlib

    return hashlib.sha256(json.dumps({"fingerprint": doc["fingerprint"], "crc32": crcs},
                                     sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- evaluation

def evaluate(cands: list[Candidate], sweep_dir: str, *, command: str | None = None, python: str | None = None,
             workers: int = 1, timeout: float | None = None, quiet: bool = False,
             log: Callable[[str], None] = print) -> None:
    """Score every "merged" candidate that has no recorded result yet, and record each result in
    sweep.json the moment it is known (so an interrupted sweep loses only the evaluations still
    running). A recorded result is reused when the candidate's output and the evaluator are the
    ones it was made with; a recorded failure is retried. A failing evaluation is that
    candidate's `eval_error`; the others go on.

    `command`: a shell command, run in the current directory once per output with `{output}`
    and `{candidate}` replaced by the shell-quoted output path and candidate name (also in the
    environment as TENSORMERGE_OUTPUT / TENSORMERGE_CANDIDATE), stdin empty; the last non-blank
    line of its stdout must be a JSON object of metrics. `workers` of them run at once;
    `timeout` (seconds) ends one that runs longer (its process group: SIGTERM, then SIGKILL).
    `python`: "module:function" (or "path/to/file.py:function"), called in this process as
    function(output) (plus candidate=name when it takes that keyword; what it prints goes to
    stderr) and returning a dict of metrics; these run one at a time whatever `workers` says (a model-loading function is
    rarely thread-safe, and it would share this process's memory and threads anyway), with no
    timeout (a thread cannot be stopped)."""
    if command and python:
        raise ParameterError("--eval and --eval-python: give one evaluation, not both")
    if not command and not python:
        return
    if not isinstance(workers, int) or workers < 1:
        raise ParameterError(f"--eval-workers {workers!r}: must be a whole number of at least 1")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
        raise ParameterError(f"--eval-timeout {timeout!r}: must be a positive number of seconds")
    fn = resolve_python(python) if python else None
    evaluator = f"command: {command}" if command else f"python: {python}"

    state = load_state(sweep_dir)
    records = state.setdefault("evaluations", {})
    todo: list[tuple[Candidate, str | None]] = []
    reused = 0
    for c in cands:
        if c.status != "merged":
            continue
        ident = output_identity(c.output)
        rec = records.get(c.name)
        if (ident is not None and isinstance(rec, dict) and rec.get("identity") == ident
                and rec.get("evaluator") == evaluator and rec.get("error") is None
                and isinstance(rec.get("metrics"), dict)):
            c.metrics = _metrics(rec["metrics"])
            c.eval_seconds = rec.get("seconds") if isinstance(rec.get("seconds"), (int, float)) else None
            c.eval_error = None
            reused += 1
        else:
            c.metrics = c.eval_error = c.eval_seconds = None
            todo.append((c, ident))
    if not quiet:
        at_once = 1 if fn is not None else min(workers, max(1, len(todo)))
        log(f"evaluating {len(todo)} candidate{'s' if len(todo) != 1 else ''}"
            + (f" ({reused} already scored in {SWEEP_JSON}, reused)" if reused else "")
            + (f", {at_once} at a time" if len(todo) > 1 else ""))
    if fn is not None and workers > 1 and len(todo) > 1 and not quiet:
        log("note: --eval-python evaluations run one at a time in this process (--eval-workers applies to --eval)")

    def record(c: Candidate, ident: str | None, metrics: dict | None, error: str | None, seconds: float) -> None:
        c.metrics, c.eval_error, c.eval_seconds = metrics, error, round(seconds, 3)
        records[c.name] = {"identity": ident, "evaluator": evaluator, "metrics": metrics,
                           "seconds": c.eval_seconds, "error": error}
        state["evaluations"] = _in_order(records, cands)
        save_state(sweep_dir, state)
        if error is not None:
            log(f"eval {c.name} failed: {error} ({seconds:.1f} s)")
        elif not quiet:
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(metrics.items())[:6])
            log(f"eval {c.name}: {shown or 'no metrics'} ({seconds:.1f} s)")

    if fn is not None:
        for c, ident in todo:
            t0 = time.perf_counter()
            metrics, error = _call_python(fn, python, c)
            record(c, ident, metrics, error, time.perf_counter() - t0)
        return
    running = _Running()
    pool = ThreadPoolExecutor(max_workers=min(workers, max(1, len(todo))), thread_name_prefix="tensormerge-eval")
    try:
        futures = {pool.submit(_run_command, command, c, timeout, running): (c, ident) for c, ident in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: cands.index(futures[f][0])):
                c, ident = futures[fut]
                metrics, error, seconds = fut.result()
                record(c, ident, metrics, error, seconds)
    except BaseException:
        # Ctrl-C, or sweep.json could not be written: stop what is running, start nothing more
        # (what finished is recorded; a rerun redoes the rest).
        running.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        running.stop()
        raise
    pool.shutdown(wait=True)


def resolve_python(spec: str) -> Callable:
    """The function named by --eval-python "module:function" or "path/to/file.py:function"; a
    module is looked up from the current directory first (as `python -m` would). The CLI calls
    it before any merge, so that a typo costs nothing."""
    module, sep, name = (spec or "").rpartition(":")
    if not sep or not module or not name.isidentifier():
        raise ParameterError(f"--eval-python {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if module.endswith(".py") or os.sep in module:
            path = os.path.abspath(module)
            if not os.path.isfile(path):
                raise ParameterError(f"--eval-python {spec!r}: {path} is not a file")
            mod_name = "tensormerge_eval_" + "".join(ch if ch.isalnum() else "_" for ch in
                                                      os.path.splitext(os.path.basename(path))[0])
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            mod = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = mod
            loader_spec.loader.exec_module(mod)
        else:
            cwd = os.getcwd()
            added = cwd not in sys.path and "" not in sys.path
            if added:
                sys.path.insert(0, cwd)
            try:
                mod = importlib.import_module(module)
            finally:
                if added:
                    with contextlib.suppress(ValueError):
                        sys.path.remove(cwd)
    except ParameterError:
        raise
    except Exception as e:  # the user's module failed to import: say how, in one line
        raise ParameterError(f"--eval-python {spec!r}: cannot import {module!r}: "
                             f"{one_line(f'{type(e).__name__}: {e}', ERROR_CHARS)}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise ParameterError(f"--eval-python {spec!r}: {module!r} has no function {name!r}")
    return fn


def _call_python(fn: Callable, spec: str, c: Candidate) -> tuple[dict | None, str | None]:
    try:
        kwargs = {"candidate": c.name} if _takes_candidate(fn) else {}
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the sweep's table, kept clean
            result = fn(c.output, **kwargs)
    except (Exception, SystemExit) as e:
        return None, one_line(f"{spec} raised {type(e).__name__}: {e}", ERROR_CHARS)
    if not isinstance(result, dict):
        return None, f"{spec} returned {type(result).__name__}, not a dict of metrics"
    bad = next((k for k in result if not isinstance(k, str)), None)
    if bad is not None:
        return None, one_line(f"{spec} returned a metric named {bad!r}, not a string", ERROR_CHARS)
    try:  # what sweep.json can hold and read back: a command's metrics are bounded by STDOUT_TAIL too
        metrics = _metrics(result)
        size = len(json.dumps(metrics))
    except (RecursionError, ValueError) as e:
        return None, f"{spec} returned metrics that cannot be recorded ({type(e).__name__}: nested too deep?)"
    if size > STDOUT_TAIL:
        return None, f"{spec} returned {size} bytes of metrics; at most {STDOUT_TAIL} are recorded"
    return metrics, None


def _takes_candidate(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind is p.VAR_KEYWORD or (p.name == "candidate" and p.kind in keyword) for p in params)


class _Running:
    """The evaluation processes now running, so that an interrupted sweep can stop them."""

    def __init__(self) -> None:
        self.procs: set[subprocess.Popen] = set()
        self.stopped = False
        self.lock = threading.Lock()

    def add(self, p: subprocess.Popen) -> bool:
        with self.lock:
            if self.stopped:
                return False
            self.procs.add(p)
            return True

    def discard(self, p: subprocess.Popen) -> None:
        with self.lock:
            self.procs.discard(p)

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            procs = list(self.procs)
        for p in procs:
            _kill_group(p, signal.SIGKILL)


class _Tail:
    """The last `limit` bytes of a pipe, read on a thread (an evaluation that prints gigabytes
    costs no memory), plus whether anything was dropped."""

    def __init__(self, stream, limit: int) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.limit = limit
        self.dropped = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        with contextlib.suppress(OSError, ValueError):
            while True:
                chunk = stream.read1(1 << 16)
                if not chunk:
                    break
                with self.lock:
                    self.chunks.append(chunk)
                    self.size += len(chunk)
                    while self.size - len(self.chunks[0]) >= self.limit:
                        self.size -= len(self.chunks.popleft())
                        self.dropped = True
        with contextlib.suppress(OSError):
            stream.close()

    def text(self) -> str:
        self.thread.join(timeout=KILL_GRACE)  # a leftover child may hold the pipe: take what came
        with self.lock:
            data = b"".join(self.chunks)
            if len(data) > self.limit:
                data, self.dropped = data[-self.limit:], True
        return data.decode("utf-8", errors="replace")


def _run_command(template: str, c: Candidate, timeout: float | None,
                 running: _Running) -> tuple[dict | None, str | None, float]:
    """(metrics, error, seconds) of one evaluation command."""
    t0 = time.perf_counter()
    if not os.path.isdir(c.output):
        return None, f"output {c.output} is missing", 0.0
    cmd = template.replace("{output}", shlex.quote(c.output)).replace("{candidate}", shlex.quote(c.name))
    env = {**os.environ, "TENSORMERGE_OUTPUT": c.output, "TENSORMERGE_CANDIDATE": c.name}
    try:
        p = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as e:
        return None, one_line(f"cannot start the evaluation: {e}", ERROR_CHARS), time.perf_counter() - t0
    if not running.add(p):
        _kill_group(p, signal.SIGKILL)
    out, err = _Tail(p.stdout, STDOUT_TAIL), _Tail(p.stderr, STDERR_TAIL)
    timed_out = False
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_group(p)
    finally:
        running.discard(p)
    seconds = time.perf_counter() - t0
    stdout, stderr = out.text(), err.text()
    tail = _stderr_tail(stderr)
    if timed_out:
        return None, one_line(f"timed out after {timeout:g} s" + (f": {tail}" if tail else ""), ERROR_CHARS), seconds
    if p.returncode != 0:
        if p.returncode < 0:
            try:
                why = f"killed by {signal.Signals(-p.returncode).name}"
            except ValueError:
                why = f"killed by signal {-p.returncode}"
        else:
            why = f"exit status {p.returncode}"
            with contextlib.suppress(ValueError):  # the shell's report of a command killed by a signal
                if p.returncode > 128:
                    why += f" ({signal.Signals(p.returncode - 128).name})"
        return None, one_line(why + (f": {tail}" if tail else ""), ERROR_CHARS), seconds
    metrics, error = _parse_metrics(stdout, out.dropped)
    if error is not None and tail:
        error = f"{error}; stderr: {tail}"
    return metrics, (one_line(error, ERROR_CHARS) if error else None), seconds


def _parse_metrics(stdout: str, dropped: bool) -> tuple[dict | None, str | None]:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        return None, "printed nothing on stdout (its last line must be a JSON object of metrics)"
    last = lines[-1].strip()
    if dropped and len(lines) == 1:
        return None, f"its last line of stdout is longer than {STDOUT_TAIL} bytes"
    try:
        doc = json.loads(last)
    except ValueError:
        return None, f"its last line of stdout is not JSON: {one_line(last, 80)}"
    if not isinstance(doc, dict):
        return None, f"its last line of stdout is JSON but not an object: {one_line(last, 80)}"
    return _metrics(doc), None


def _stop_group(p: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, up to KILL_GRACE seconds for the shell to end,
    then SIGKILL to what is left of the group. The shell is reaped only after that: until then
    its pid, and so the group id, cannot be reused by an unrelated process."""
    _kill_group(p, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                break
        except ChildProcessError:
            break
        time.sleep(0.02)
    _kill_group(p, signal.SIGKILL)
    p.wait()


def _kill_group(p: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(p.pid, sig)  # start_new_session: the group id is the shell's pid


def _stderr_tail(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return " | ".join(lines[-3:])


# ---------------------------------------------------------------- selection

def parse_select(spec: str) -> tuple[str, str]:
    """"metric", "metric:max" or "metric:min" -> (metric, "max"|"min"); max by default. A metric
    whose own name has a colon is fine ("acc:val" is maximised; "acc:val:min" minimised)."""
    text = (spec or "").strip()
    head, sep, tail = text.rpartition(":")
    metric, mode = (head, tail.lower()) if sep and tail.lower() in ("max", "min") else (text, "max")
    if not metric:
        raise ParameterError(f"--select {spec!r}: name a metric (metric, metric:max or metric:min)")
    return metric, mode


def score(c: Candidate, metric: str) -> float | None:
    """The candidate's value of `metric` when it can be compared: a finite number (not a bool)
    from an evaluation that succeeded; None otherwise."""
    if c.status != "merged" or c.eval_error is not None or not isinstance(c.metrics, dict):
        return None
    v = c.metrics.get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v) if math.isfinite(float(v)) else None
    except OverflowError:
        return None


def select(cands: list[Candidate], spec: str) -> Candidate | None:
    """The best candidate by `spec` among those with a finite value of the metric; ties go to the
    first in candidate order. Marks it `selected` (and every other one not); None when no
    candidate has the metric (see `no_selection`)."""
    metric, mode = parse_select(spec)
    best, best_v = None, None
    for c in cands:
        v = score(c, metric)
        if v is not None and (best is None or (v > best_v if mode == "max" else v < best_v)):
            best, best_v = c, v
    for c in cands:
        c.selected = c is best
    return best


def no_selection(cands: list[Candidate], spec: str) -> str:
    """Why `select` chose nothing, in one line."""
    metric, _ = parse_select(spec)
    seen = sorted({k for c in cands if isinstance(c.metrics, dict) for k in c.metrics})
    failed = sum(1 for c in cands if c.status == "merged" and c.eval_error is not None)
    unmerged = sum(1 for c in cands if c.status != "merged")
    parts = [f"no candidate has a finite number for {metric!r}"]
    if seen:
        parts.append("metrics seen: " + ", ".join(seen[:12]) + (", ..." if len(seen) > 12 else ""))
    if failed:
        parts.append(f"{failed} evaluation{'s' if failed != 1 else ''} failed")
    if unmerged:
        parts.append(f"{unmerged} candidate{'s' if unmerged != 1 else ''} not merged")
    return parts[0] + (f" ({'; '.join(parts[1:])})" if len(parts) > 1 else "")


# ---------------------------------------------------------------- keeping

def keep(cands: list[Candidate], best: Candidate | None, mode: str, sweep_dir: str, *,
         select_spec: str | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Record the results (rows, selection) in sweep.json, then with mode "best" remove the
    other candidates' outputs. Returns the removed paths.

    Removal happens only after the record naming the best is on disk, and only when every
    candidate merged and was scored without error and a best was chosen; otherwise nothing is
    removed (the failures are for the user to look at, and a rerun of the sweep may retry them).
    Only `DIR/<name>` of this sweep's candidates is removed, and only while it is still the
    output that was scored (a real directory, not a link, whose tensormerge.json has the identity
    recorded with its evaluation); never the chosen one. Each is first renamed to
    `DIR/.tensormerge-removing-<name>`, then deleted, so a crash leaves either the whole output
    or a name the next `keep` finishes removing."""
    if mode not in ("all", "best"):
        raise ParameterError(f"--keep {mode!r}: expected 'best' or 'all'")
    state = load_state(sweep_dir)
    state["candidates"] = rows(cands)
    metric, how = parse_select(select_spec) if select_spec else (None, None)
    state["selection"] = {"spec": select_spec, "metric": metric, "mode": how, "best": best.name if best else None}
    previous = state.get("keep") if isinstance(state.get("keep"), dict) else {}
    for name in previous.get("removing", []) or []:  # a removal a crash interrupted
        trash = os.path.join(sweep_dir, TRASH_PREFIX + str(name))
        if isinstance(name, str) and _safe_name(name) and os.path.isdir(trash) and not os.path.islink(trash):
            shutil.rmtree(trash, ignore_errors=True)
    removed_before = [p for p in previous.get("removed", []) or [] if isinstance(p, str)]
    record = {"mode": mode, "best": best.name if best else None, "removing": [], "removed": removed_before,
              "note": None}
    state["keep"] = record
    victims: list[Candidate] = []
    if mode == "best":
        not_done = [c.name for c in cands if c.status != "merged" or c.eval_error is not None or c.metrics is None]
        if best is None:
            record["note"] = "no candidate was chosen: nothing removed"
        elif best not in cands:
            record["note"] = "the chosen output is not a candidate of this sweep: nothing removed"
        elif not_done:
            record["note"] = (f"{len(not_done)} candidate{'s' if len(not_done) != 1 else ''} did not merge or "
                              f"were not scored (e.g. {not_done[0]}): nothing removed")
        elif not _is_scored_output(best, state.get("evaluations")):
            record["note"] = (f"the chosen output {best.output} is missing or changed since it was scored: "
                              "nothing removed")
        else:
            for c in cands:
                if c is best:
                    continue
                why = _not_removable(c, best, sweep_dir, state.get("evaluations", {}))
                if why is None:
                    victims.append(c)
                else:
                    log(f"note: --keep best keeps {c.output}: {why}")
        if record["note"]:
            log(f"note: --keep best: {record['note']}")
        record["removing"] = [c.name for c in victims]
    save_state(sweep_dir, state)  # the best is on disk before anything goes
    removed: list[str] = []
    for c in victims:
        path = os.path.join(sweep_dir, c.name)
        trash = os.path.join(sweep_dir, TRASH_PREFIX + c.name)
        try:
            if os.path.lexists(trash):
                shutil.rmtree(trash)
            os.rename(path, trash)
            fsync_dir(sweep_dir)
            shutil.rmtree(trash)
        except OSError as e:
            if not os.path.lexists(trash):  # not renamed: nothing for the next keep to finish
                record["removing"] = [n for n in record["removing"] if n != c.name]
            save_state(sweep_dir, state)
            raise OutputError(f"{path}: cannot be removed ({e.strerror or e}); "
                              f"{len(removed)} other output{'s' if len(removed) != 1 else ''} removed") from None
        removed.append(path)
        record["removed"] = removed_before + removed
        record["removing"] = [n for n in record["removing"] if n != c.name]
        for row in state["candidates"]:
            if row.get("name") == c.name:
                row["removed"] = True
        save_state(sweep_dir, state)
    return removed


def _not_removable(c: Candidate, best: Candidate, sweep_dir: str, evaluations: dict) -> str | None:
    """None when `DIR/<name>` may be removed, else why not."""
    if not _safe_name(c.name):
        return f"{c.name!r} is not a plain directory name"
    path = os.path.join(sweep_dir, c.name)
    if os.path.abspath(c.output) != os.path.abspath(path):
        return f"it is not {path}"
    if os.path.islink(path) or not os.path.isdir(path):
        return "not a directory (or a symbolic link)"
    with contextlib.suppress(OSError):
        if os.path.exists(best.output) and os.path.samefile(path, best.output):
            return "it is the chosen output"
    doc = _read_json(os.path.join(path, PROVENANCE))
    if not (isinstance(doc, dict) and "tensormerge" in doc and "method" in doc):
        return f"it holds no {PROVENANCE} of a tensormerge output"
    if not _is_scored_output(c, evaluations):
        return "it is not the output that was scored (changed since, or never scored)"
    return None


def _is_scored_output(c: Candidate, evaluations) -> bool:
    """Whether `c.output` is a real directory whose identity is the one its evaluation recorded."""
    if os.path.islink(c.output) or not os.path.isdir(c.output):
        return False
    rec = evaluations.get(c.name) if isinstance(evaluations, dict) else None
    ident = output_identity(c.output)
    return ident is not None and isinstance(rec, dict) and rec.get("identity") == ident


def _safe_name(name: str) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and (os.altsep is None or os.altsep not in name) and not name.startswith(TRASH_PREFIX))


# ---------------------------------------------------------------- what a person reads

def table(cands: list[Candidate], select_spec: str | None = None) -> str:
    """One row per candidate in candidate order: the chosen one marked `*`, each swept parameter,
    each metric (the selected one first), merge and evaluation seconds, and a short note for a
    candidate that failed. A last line says what was chosen, or why nothing was."""
    params = _union(c.swept for c in cands)
    metric = parse_select(select_spec)[0] if select_spec else None
    metrics = _union(c.metrics for c in cands if isinstance(c.metrics, dict))
    if metric is not None:
        metrics = [metric] + [m for m in metrics if m != metric]
    methods = len({c.method for c in cands}) > 1
    head = ["", "candidate"] + (["method"] if methods else []) + params + metrics + ["merge s", "eval s", "note"]
    body = []
    for c in cands:
        if c.status == "failed":
            note = "merge failed: " + (c.error or "")
        elif c.status != "merged":
            note = c.status
        elif c.eval_error is not None:
            note = "eval failed: " + c.eval_error
        else:
            note = ""
        cells = ["*" if c.selected else "", c.name] + ([c.method] if methods else [])
        cells += [_fmt(c.swept[p]) if p in c.swept else "" for p in params]
        cells += [_fmt(c.metrics[m]) if isinstance(c.metrics, dict) and m in c.metrics else "-" for m in metrics]
        cells += [_secs(c.merge_seconds), _secs(c.eval_seconds), one_line(note, 60) if note else ""]
        body.append(cells)
    numeric = [bool(vals) and all(_is_num_text(v) for v in vals)
               for vals in ([r[i] for r in body if r[i] not in ("", "-")] for i in range(len(head)))]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def line(cells):
        out = [str(x).rjust(w) if numeric[i] and i > 1 else str(x).ljust(w)
               for i, (x, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()
    lines = [line(head)] + [line(r) for r in body]
    if select_spec:
        best = next((c for c in cands if c.selected), None)
        m, how = parse_select(select_spec)
        lines.append(f"* chosen by {m} ({how}): {best.name}" if best
                     else f"no candidate chosen: {no_selection(cands, select_spec)}")
    return "\n".join(lines)


def plot(cands: list[Candidate], metric: str, path: str, *, log: Callable[[str], None] = print) -> str | None:
    """A PNG of `metric` (a name, or a --select spec) against each swept numeric parameter, one
    panel per parameter, one line per combination of the other swept values (and method), the
    chosen candidate starred; with no numeric swept parameter, one panel by candidate. Written
    atomically; None, with a note, when matplotlib is missing or no candidate has the metric."""
    metric, _mode = parse_select(metric)
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log("note: matplotlib is not installed, so no plot was written (pip install matplotlib)")
        return None
    scored = [(c, score(c, metric)) for c in cands]
    scored = [(c, v) for c, v in scored if v is not None]
    if not scored:
        log(f"note: no plot: no candidate has a finite number for {metric!r}")
        return None
    params = _union(c.swept for c, _ in scored)
    numeric = [p for p in params
               if all(_is_number(c.swept[p]) for c, _ in scored if p in c.swept)]
    methods = len({c.method for c, _ in scored}) > 1
    panels = numeric or [None]
    ncols = min(3, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig = Figure(figsize=(4.8 * ncols, 3.6 * nrows), dpi=100)
    for k, p in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        if p is None:
            xs = list(range(len(scored)))
            ax.plot(xs, [v for _, v in scored], "o-")
            ax.set_xticks(xs)
            ax.set_xticklabels([c.name for c, _ in scored], rotation=45, ha="right", fontsize=7)
            for x, (c, v) in zip(xs, scored):
                if c.selected:
                    ax.plot([x], [v], "*", color="red", markersize=14, zorder=5)
            ax.set_xlabel("candidate")
        else:
            series: dict[str, list[tuple[float, float, bool]]] = {}
            for c, v in scored:
                if p not in c.swept:
                    continue
                label = ", ".join(([c.method] if methods else [])
                                  + [f"{q}={_fmt(c.swept[q])}" for q in params if q != p and q in c.swept])
                series.setdefault(label, []).append((float(c.swept[p]), v, c.selected))
            for label, pts in series.items():
                pts.sort(key=lambda t: t[0])
                ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", label=label or None)
                for x, y, chosen in pts:
                    if chosen:
                        ax.plot([x], [y], "*", color="red", markersize=14, zorder=5)
            xs = [float(c.swept[p]) for c, _ in scored if p in c.swept]
            if min(xs) > 0 and max(xs) / min(xs) >= 50:
                ax.set_xscale("log")
            ax.set_xlabel(p)
            if any(series):  # labels: the other swept values
                ax.legend(fontsize=7)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{metric} ({_mode}) per candidate: {len(scored)} scored, red star = chosen")
    fig.tight_layout()
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise OutputError(f"{path}: cannot be written ({e.strerror or e})") from None
    return path


# ---------------------------------------------------------------- small things

def _read_json(path: str):
    """A small JSON file's content, or None (missing, not a regular file, too large, not JSON)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_JSON_BYTES:
            return None
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError, RecursionError):
        return None


def _jsonable(x):
    """JSON-safe: non-finite floats as strings, tuples as lists, anything else unknown as str."""
    if isinstance(x, float):
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else ("inf" if x > 0 else "-inf"))
    if isinstance(x, (str, int, type(None))):
        return x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return str(x)


def _metrics(d: dict) -> dict:
    """An evaluation's metrics as sweep.json stores them: numbers (numpy / torch scalars become
    floats or ints), other JSON values kept, non-finite floats as strings."""
    out = {}
    for k, v in d.items():
        if not isinstance(v, (bool, int, float, str, list, dict, type(None))):
            item = getattr(v, "item", None)
            with contextlib.suppress(Exception):
                v = item() if callable(item) else float(v)
        out[str(k)] = _jsonable(v)
    return out


def _in_order(records: dict, cands: list[Candidate]) -> dict:
    """sweep.json's evaluations in candidate order (whatever order they finished in), then any
    others it held, by name."""
    names = [c.name for c in cands if c.name in records]
    rest = sorted(k for k in records if k not in set(names))
    return {k: records[k] for k in names + rest}


def _union(dicts) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        for k in d or {}:
            seen.setdefault(k, None)
    return list(seen)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _is_num_text(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):  # as typed when short (1.0, 0.9375), else 6 significant digits
        return repr(v) if len(repr(v)) <= 8 else f"{v:.6g}"
    if isinstance(v, str):
        return one_line(v, 24)
    return one_line(json.dumps(v, separators=(",", ":"), default=str), 24)


def _secs(v) -> str:
    return f"{v:.1f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"
