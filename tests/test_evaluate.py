"""Scoring, selecting and keeping a sweep's candidates (tensormerge.evaluate), on fake candidate
outputs (a tensormerge.json with a fingerprint) and tiny evaluation commands."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tensormerge import evaluate as ev
from tensormerge.errors import InputError, OutputError, ParameterError
from tensormerge.evaluate import Candidate

PY = shlex.quote(sys.executable)

# An evaluation script: reads the candidate's tensormerge.json (as a real one would read the
# model), appends the candidate's name to calls.txt beside it (so a test counts evaluations),
# and prints a line of noise then the metrics. acc peaks at lambda = 0.3: 1 - (lambda - 0.3)^2.
SCORE = r'''
import json, os, sys
out, name = sys.argv[1], sys.argv[2]
doc = json.load(open(os.path.join(out, "tensormerge.json")))
lam = doc["params"]["lambda"]
with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as f:
    f.write(name + "\n")
print("loading", out)
print(json.dumps({"acc": 1 - (lam - 0.3) ** 2, "loss": lam, "note": "text"}))
'''


def make_output(sweep_dir: Path, name: str, params: dict, *, fingerprint: str | None = None,
                method: str = "task_arithmetic", status: str = "merged", swept: dict | None = None) -> Candidate:
    """A candidate whose output is a directory holding what a tensormerge output's
    tensormerge.json holds that matters here: version, method, params, fingerprint, blocks."""
    out = sweep_dir / name
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"\0" * 16)
    (out / "tensormerge.json").write_text(json.dumps({
        "tensormerge": "0.1.0", "method": method, "params": params,
        "fingerprint": fingerprint or f"fp-{name}", "seconds": 1.0,
        "blocks": {"w": {"crc32": "0000abcd", "seconds": 0.1}}}))
    return Candidate(name=name, method=method, params=dict(params), swept=dict(swept if swept is not None else params),
                     output=str(out), merge_seconds=1.5, status=status)


@pytest.fixture
def sweep(tmp_path):
    d = tmp_path / "sweep"
    d.mkdir()
    (tmp_path / "score.py").write_text(SCORE)
    cands = [make_output(d, f"lambda={lam}", {"lambda": lam}) for lam in (0.1, 0.3, 0.5)]
    cmd = f"{PY} {shlex.quote(str(tmp_path / 'score.py'))} {{output}} {{candidate}}"
    return d, cands, cmd


def calls(tmp_path: Path) -> list[str]:
    p = tmp_path / "calls.txt"
    return p.read_text().split() if p.exists() else []


def strict_json(path: Path):
    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c}")
    return json.loads(path.read_text(), parse_constant=refuse)


def quiet_log():
    lines = []
    return lines, lines.append


# ---------------------------------------------------------------- --eval CMD

def test_command_scores_every_candidate_and_records_it(sweep, tmp_path):
    d, cands, cmd = sweep
    lines, log = quiet_log()
    ev.evaluate(cands, str(d), command=cmd, log=log)
    for c in cands:
        lam = c.params["lambda"]
        assert c.eval_error is None
        assert c.metrics == {"acc": 1 - (lam - 0.3) ** 2, "loss": lam, "note": "text"}
        assert c.eval_seconds is not None and c.eval_seconds >= 0
    assert sorted(calls(tmp_path)) == sorted(c.name for c in cands)
    state = strict_json(d / "sweep.json")
    assert state["tensormerge_sweep"] == 1
    assert list(state["evaluations"]) == [c.name for c in cands]
    for c in cands:
        rec = state["evaluations"][c.name]
        assert rec["metrics"] == c.metrics and rec["error"] is None
        assert rec["identity"] == ev.output_identity(c.output) and rec["identity"]
        assert rec["evaluator"] == f"command: {cmd}"
    assert any("eval lambda=0.1: acc=" in ln for ln in lines)
    assert not [p for p in os.listdir(d) if p.endswith(".tmp")]


def test_placeholders_are_shell_quoted_and_in_the_environment(tmp_path):
    d = tmp_path / "my sweep $HOME 'quoted' ; echo"
    d.mkdir()
    c = make_output(d, "k=0.1", {"k": 0.1})
    script = tmp_path / "argv.py"
    script.write_text("import json, os, sys\nprint(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(),"
                      " 'env': [os.environ['TENSORMERGE_OUTPUT'], os.environ['TENSORMERGE_CANDIDATE']], 'n': 1}))\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        cmd = f"{PY} {shlex.quote(str(script))} {{output}} {{candidate}} '{{x}}'"
        ev.evaluate([c], str(d), command=cmd, log=lambda s: None)
    finally:
        os.chdir(old)
    assert c.eval_error is None, c.eval_error
    assert c.metrics["argv"] == [c.output, "k=0.1", "{x}"]  # only the two placeholders are replaced
    assert c.metrics["env"] == [c.output, "k=0.1"]
    assert c.metrics["cwd"] == str(cwd)


# Behaves by candidate name: what a user's evaluation can do wrong.
BAD = r'''
import json, os, signal, sys, time
name = sys.argv[1]
if name == "crash":
    print("partial output")
    print("Traceback (most recent call last):\n  ...\nZeroDivisionError: division by zero\x1b[31m", file=sys.stderr)
    sys.exit(3)
if name == "nojson":
    print("accuracy 0.9")
if name == "array":
    print("[1, 2]")
if name == "silent":
    pass
if name == "signal":
    os.kill(os.getpid(), signal.SIGKILL)
if name == "good":
    print(json.dumps({"acc": 0.5}))
if name == "blanks":
    print(json.dumps({"acc": 0.25, "nan": float("nan"), "inf": float("inf"), "big": 10 ** 400, "t": True}))
    print("")
    print("   ")
if name == "exit_after_json":
    print(json.dumps({"acc": 0.75}))
    sys.exit(1)
'''


def test_a_failing_evaluation_is_its_candidates_error_and_the_others_go_on(tmp_path):
    d = tmp_path / "sweep"
    names = ["crash", "nojson", "array", "silent", "signal", "good", "blanks", "exit_after_json"]
    cands = [make_output(d, n, {"lambda": i / 10}) for i, n in enumerate(names)]
    (tmp_path / "bad.py").write_text(BAD)
    lines, log = quiet_log()
    ev.evaluate(cands, str(d), command=f"{PY} {tmp_path / 'bad.py'} {{candidate}}", workers=3, log=log)
    by = {c.name: c for c in cands}
    for c in cands:
        if c.eval_error is not None:
            assert "\n" not in c.eval_error and "\x1b" not in c.eval_error and len(c.eval_error) <= ev.ERROR_CHARS
            assert c.metrics is None
    assert by["crash"].eval_error.startswith("exit status 3: ")
    assert "ZeroDivisionError: division by zero" in by["crash"].eval_error
    assert "not JSON: accuracy 0.9" in by["nojson"].eval_error
    assert "not an object" in by["array"].eval_error
    assert "printed nothing on stdout" in by["silent"].eval_error
    assert by["signal"].eval_error.startswith("exit status 137 (SIGKILL)")  # as the shell reports it
    assert by["exit_after_json"].eval_error.startswith("exit status 1")  # a non-zero exit fails whatever it printed
    assert by["good"].eval_error is None and by["good"].metrics == {"acc": 0.5}
    # Trailing blank lines are skipped; non-finite numbers are kept as strings (not selectable),
    # so sweep.json stays strict JSON; an integer is kept exactly.
    assert by["blanks"].eval_error is None
    assert by["blanks"].metrics == {"acc": 0.25, "nan": "nan", "inf": "inf", "big": 10 ** 400, "t": True}
    state = strict_json(d / "sweep.json")
    assert state["evaluations"]["crash"]["error"] == by["crash"].eval_error
    assert state["evaluations"]["blanks"]["metrics"]["nan"] == "nan"
    assert list(state["evaluations"]) == names
    failed = [ln for ln in lines if " failed: " in ln]
    assert len(failed) == 6


def test_an_interrupted_evaluation_stops_what_runs_and_keeps_what_finished(tmp_path):
    d = tmp_path / "sweep"
    quick, slow = make_output(d, "quick", {"lambda": 0.1}), make_output(d, "slow", {"lambda": 0.2})
    pidfile = tmp_path / "slow.pid"
    script = tmp_path / "s.py"
    script.write_text(
        "import json, os, sys, time\n"
        "if sys.argv[1] == 'slow':\n"
        f"    open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "print(json.dumps({'acc': 1}))\n")

    def log(line):  # Ctrl-C arrives as the quick one's result is reported
        if line.startswith("eval quick"):
            for _ in range(200):
                if pidfile.exists() and pidfile.read_text():
                    break
                time.sleep(0.05)
            raise KeyboardInterrupt
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate([slow, quick], str(d), command=f"{PY} {script} {{candidate}}", workers=2, log=log)
    assert time.perf_counter() - t0 < 30
    pid = int(pidfile.read_text())
    for _ in range(100):
        if not _alive(pid):
            break
        time.sleep(0.05)
    assert not _alive(pid), "the running evaluation survived the interruption"
    state = strict_json(d / "sweep.json")
    assert list(state["evaluations"]) == ["quick"] and state["evaluations"]["quick"]["metrics"] == {"acc": 1}


def test_a_shell_killed_by_a_signal(tmp_path):
    c = make_output(tmp_path / "sweep", "a", {"lambda": 0.1})
    ev.evaluate([c], str(tmp_path / "sweep"), command="echo doomed >&2; kill -9 $$", log=lambda s: None)
    assert c.eval_error == "killed by SIGKILL: doomed"


def test_a_timed_out_evaluation_is_stopped_with_its_children(tmp_path):
    d = tmp_path / "sweep"
    slow, fast = make_output(d, "slow", {"lambda": 0.1}), make_output(d, "fast", {"lambda": 0.2})
    pidfile = tmp_path / "child.pid"
    # The shell starts a grandchild that ignores SIGTERM; the timeout must end it too.
    script = tmp_path / "slow.py"
    script.write_text(
        "import json, os, signal, subprocess, sys, time\n"
        "if sys.argv[1] == 'slow':\n"
        "    p = subprocess.Popen([sys.executable, '-c', 'import signal, time; '\n"
        "                          'signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        f"    open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "    print('working', flush=True)\n"
        "    time.sleep(60)\n"
        "print(json.dumps({'acc': 1}))\n")
    t0 = time.perf_counter()
    ev.evaluate([slow, fast], str(d), command=f"{PY} {script} {{candidate}}; true", timeout=2,
                log=lambda s: None)
    took = time.perf_counter() - t0
    assert slow.eval_error is not None and slow.eval_error.startswith("timed out after 2 s")
    assert fast.eval_error is None and fast.metrics == {"acc": 1}
    assert took < 2 + ev.KILL_GRACE + 20
    child = int(pidfile.read_text())
    for _ in range(100):
        if not _alive(child):
            break
        time.sleep(0.05)
    assert not _alive(child), "the evaluation's grandchild survived its timeout"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_workers_run_evaluations_at_once_and_results_keep_candidate_order(tmp_path):
    d = tmp_path / "sweep"
    cands = [make_output(d, f"c{i}", {"lambda": i}) for i in range(4)]
    stamps = tmp_path / "stamps"
    stamps.mkdir()
    # Later candidates finish first: the record and the results still follow candidate order.
    script = tmp_path / "sleepy.py"
    script.write_text(
        "import json, sys, time, os\n"
        "name, i = sys.argv[1], int(sys.argv[1][1:])\n"
        "t0 = time.time()\n"
        "time.sleep(1.5 + 0.3 * (3 - i))\n"
        f"open(os.path.join({str(stamps)!r}, name), 'w').write(f'{{t0}} {{time.time()}}')\n"
        "print(json.dumps({'acc': i / 10, 'name': name}))\n")
    ev.evaluate(cands, str(d), command=f"{PY} {script} {{candidate}}", workers=4, log=lambda s: None)
    spans = [tuple(map(float, (stamps / c.name).read_text().split())) for c in cands]
    assert max(s for s, _ in spans) < min(e for _, e in spans), f"evaluations did not overlap: {spans}"
    assert [c.metrics for c in cands] == [{"acc": i / 10, "name": f"c{i}"} for i in range(4)]
    assert list(strict_json(d / "sweep.json")["evaluations"]) == [c.name for c in cands]


def test_each_result_is_recorded_as_soon_as_it_finishes(tmp_path):
    d = tmp_path / "sweep"
    a, b = make_output(d, "a", {"lambda": 0.1}), make_output(d, "b", {"lambda": 0.2})
    script = tmp_path / "peek.py"
    script.write_text(
        "import json, os, sys\n"
        f"p = os.path.join({str(d)!r}, 'sweep.json')\n"
        "seen = json.load(open(p))['evaluations'] if os.path.exists(p) else {}\n"
        "print(json.dumps({'saw_a': int('a' in seen and seen['a']['metrics'] is not None)}))\n")
    ev.evaluate([a, b], str(d), command=f"{PY} {script}", workers=1, log=lambda s: None)
    assert a.metrics == {"saw_a": 0} and b.metrics == {"saw_a": 1}


def test_large_output_costs_bounded_memory_and_the_last_line_counts(tmp_path):
    d = tmp_path / "sweep"
    ok, long = make_output(d, "ok", {"lambda": 0.1}), make_output(d, "long", {"lambda": 0.2})
    script = tmp_path / "loud.py"
    script.write_text(
        "import json, sys\n"
        "for _ in range(200):\n"
        "    sys.stdout.write('x' * 100000 + '\\n')\n"
        "    sys.stderr.write('e' * 100000 + '\\n')\n"
        "if sys.argv[1] == 'long':\n"
        "    sys.stdout.write('{\"acc\": 1, \"pad\": \"' + 'y' * (2 << 20) + '\"}\\n')\n"
        "else:\n"
        "    print(json.dumps({'acc': 0.5}))\n")
    ev.evaluate([ok, long], str(d), command=f"{PY} {script} {{candidate}}", log=lambda s: None)
    assert ok.metrics == {"acc": 0.5}
    assert long.metrics is None and "longer than" in long.eval_error


def test_candidates_not_merged_are_not_evaluated(sweep, tmp_path):
    d, cands, cmd = sweep
    cands[1].status = "failed"
    cands[1].error = "merge failed"
    cands[2].status = "pending"
    ev.evaluate(cands, str(d), command=cmd, log=lambda s: None)
    assert calls(tmp_path) == [cands[0].name]
    assert cands[1].metrics is None and cands[2].metrics is None


def test_evaluation_options_are_checked(sweep):
    d, cands, cmd = sweep
    with pytest.raises(ParameterError, match="give one"):
        ev.evaluate(cands, str(d), command=cmd, python="m:f")
    with pytest.raises(ParameterError, match="--eval-workers"):
        ev.evaluate(cands, str(d), command=cmd, workers=0)
    with pytest.raises(ParameterError, match="--eval-timeout"):
        ev.evaluate(cands, str(d), command=cmd, timeout=-1)
    ev.evaluate(cands, str(d))  # no evaluation asked: nothing happens
    assert not (d / "sweep.json").exists() and all(c.metrics is None for c in cands)


# ---------------------------------------------------------------- resuming

def test_a_rerun_reuses_finished_evaluations(sweep, tmp_path):
    d, cands, cmd = sweep
    ev.evaluate(cands, str(d), command=cmd, log=lambda s: None)
    first = [c.metrics for c in cands]
    assert len(calls(tmp_path)) == 3
    again = [Candidate(c.name, c.method, c.params, c.swept, c.output, status="merged") for c in cands]
    lines, log = quiet_log()
    ev.evaluate(again, str(d), command=cmd, log=log)
    assert len(calls(tmp_path)) == 3, "a finished evaluation ran again"
    assert [c.metrics for c in again] == first
    assert [c.eval_seconds for c in again] == [c.eval_seconds for c in cands]
    assert "3 already scored" in lines[0]


def test_a_rerun_redoes_an_evaluation_whose_output_changed(sweep, tmp_path):
    d, cands, cmd = sweep
    ev.evaluate(cands, str(d), command=cmd, log=lambda s: None)
    # Candidate 1 merged again with other inputs (new fingerprint); candidate 2's bytes changed (block crc32).
    p1 = Path(cands[1].output) / "tensormerge.json"
    doc = json.loads(p1.read_text())
    doc["fingerprint"] = "another"
    p1.write_text(json.dumps(doc))
    p2 = Path(cands[2].output) / "tensormerge.json"
    doc = json.loads(p2.read_text())
    doc["blocks"]["w"]["crc32"] = "ffffffff"
    doc["seconds"] = 99.0
    p2.write_text(json.dumps(doc))
    # Candidate 0: only the timings differ (the same merge done again): reused.
    p0 = Path(cands[0].output) / "tensormerge.json"
    doc = json.loads(p0.read_text())
    doc["seconds"] = 42.0
    p0.write_text(json.dumps(doc))
    ev.evaluate(cands, str(d), command=cmd, log=lambda s: None)
    assert calls(tmp_path) == [c.name for c in cands] + [cands[1].name, cands[2].name]


def test_a_rerun_with_another_evaluation_redoes_all(sweep, tmp_path):
    d, cands, cmd = sweep
    ev.evaluate(cands, str(d), command=cmd, log=lambda s: None)
    ev.evaluate(cands, str(d), command=cmd + " --other", log=lambda s: None)
    assert len(calls(tmp_path)) == 6


def test_a_failed_evaluation_is_retried_on_a_rerun(tmp_path):
    d = tmp_path / "sweep"
    a, b = make_output(d, "a", {"lambda": 0.1}), make_output(d, "b", {"lambda": 0.2})
    script = tmp_path / "flaky.py"
    script.write_text(
        "import json, os, sys\n"
        "name = sys.argv[1]\n"
        f"open(os.path.join({str(tmp_path)!r}, 'calls.txt'), 'a').write(name + '\\n')\n"
        f"mark = os.path.join({str(tmp_path)!r}, 'flaked')\n"
        "if name == 'b' and not os.path.exists(mark):\n"
        "    open(mark, 'w').close()\n"
        "    sys.exit('first try fails')\n"
        "print(json.dumps({'acc': 1}))\n")
    cmd = f"{PY} {script} {{candidate}}"
    ev.evaluate([a, b], str(d), command=cmd, log=lambda s: None)
    assert b.eval_error == "exit status 1: first try fails"
    a2, b2 = (Candidate(c.name, c.method, c.params, c.swept, c.output, status="merged") for c in (a, b))
    ev.evaluate([a2, b2], str(d), command=cmd, log=lambda s: None)
    assert calls(tmp_path) == ["a", "b", "b"]
    assert b2.eval_error is None and b2.metrics == {"acc": 1} and a2.metrics == {"acc": 1}
    assert strict_json(d / "sweep.json")["evaluations"]["b"]["error"] is None


def test_an_output_without_a_fingerprint_is_evaluated_every_time(sweep, tmp_path):
    d, cands, cmd = sweep
    (Path(cands[0].output) / "tensormerge.json").write_text(json.dumps({"params": {"lambda": 0.1}}))
    ev.evaluate(cands[:1], str(d), command=cmd, log=lambda s: None)
    ev.evaluate(cands[:1], str(d), command=cmd, log=lambda s: None)
    assert calls(tmp_path) == [cands[0].name] * 2


# ---------------------------------------------------------------- --eval-python

EVAL_MODULE = '''
import json, os
CALLS = []

def score(output, candidate=None):
    CALLS.append(candidate)
    print("scoring", candidate)
    lam = json.load(open(os.path.join(output, "tensormerge.json")))["params"]["lambda"]
    if lam > 0.4:
        raise ValueError("model would not load\\nsecond line")
    return {"acc": 1 - (lam - 0.3) ** 2}

def plain(output):
    return {"path_len": len(output)}

def scalars(output):
    import numpy, torch
    return {"np": numpy.float64(0.5), "np_int": numpy.int64(3), "t": torch.tensor(0.25), "nan": float("nan")}

def not_a_dict(output):
    return [1, 2]

def exits(output):
    raise SystemExit(2)
'''


def test_python_evaluation(sweep, tmp_path, monkeypatch, capsys):
    d, cands, _ = sweep
    (tmp_path / "tm_eval_mod_a.py").write_text(EVAL_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "tm_eval_mod_a", raising=False)
    lines, log = quiet_log()
    ev.evaluate(cands, str(d), python="tm_eval_mod_a:score", workers=4, log=log)
    out, err = capsys.readouterr()
    assert "scoring" not in out and f"scoring {cands[0].name}" in err  # stdout stays the table's
    mod = sys.modules["tm_eval_mod_a"]
    assert mod.CALLS == [c.name for c in cands]  # one at a time, in candidate order, with candidate=
    assert cands[0].metrics == {"acc": 1 - (0.1 - 0.3) ** 2} and cands[1].metrics == {"acc": 1.0}
    assert cands[2].metrics is None
    assert cands[2].eval_error == "tm_eval_mod_a:score raised ValueError: model would not load second line"
    assert any("one at a time" in ln for ln in lines)
    state = strict_json(d / "sweep.json")
    assert state["evaluations"][cands[0].name]["evaluator"] == "python: tm_eval_mod_a:score"
    # rerun: the two scored are reused, the failure is retried
    ev.evaluate(cands, str(d), python="tm_eval_mod_a:score", log=lambda s: None)
    assert mod.CALLS == [c.name for c in cands] + [cands[2].name]


def test_python_evaluation_results_and_failures(sweep, tmp_path, monkeypatch):
    d, cands, _ = sweep
    path = tmp_path / "elsewhere" / "my_eval.py"
    path.parent.mkdir()
    path.write_text(EVAL_MODULE)
    spec = f"{path}:"
    ev.evaluate(cands[:1], str(d), python=spec + "plain", log=lambda s: None)  # a file path; no candidate keyword
    assert cands[0].metrics == {"path_len": len(cands[0].output)}
    ev.evaluate(cands[:1], str(d), python=spec + "scalars", log=lambda s: None)
    assert cands[0].metrics == {"np": 0.5, "np_int": 3, "t": 0.25, "nan": "nan"}
    assert isinstance(cands[0].metrics["np_int"], int)
    ev.evaluate(cands[:1], str(d), python=spec + "not_a_dict", log=lambda s: None)
    assert cands[0].eval_error.endswith("returned list, not a dict of metrics")
    ev.evaluate(cands[:1], str(d), python=spec + "exits", log=lambda s: None)
    assert "raised SystemExit: 2" in cands[0].eval_error


def test_python_evaluation_spec_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tm_eval_broken.py").write_text("import nonexistent_module_xyz\n")
    (tmp_path / "tm_eval_ok.py").write_text("x = 1\n")
    monkeypatch.delitem(sys.modules, "tm_eval_broken", raising=False)
    monkeypatch.delitem(sys.modules, "tm_eval_ok", raising=False)
    for spec, needle in [("noseparator", "expected module:function"), (":f", "expected module:function"),
                         ("mod:", "expected module:function"), ("tm_eval_missing_zz:f", "cannot import"),
                         ("tm_eval_broken:f", "ModuleNotFoundError"), ("tm_eval_ok:f", "has no function 'f'"),
                         ("tm_eval_ok:x", "has no function 'x'"), (f"{tmp_path}/nofile.py:f", "is not a file")]:
        with pytest.raises(ParameterError, match=needle) as e:
            ev.resolve_python(spec)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- --select

def scored(metrics_list, errors=None):
    out = []
    for i, m in enumerate(metrics_list):
        c = Candidate(f"c{i}", "ties", {"k": i}, {"k": i}, f"/nowhere/c{i}", status="merged", metrics=m)
        if errors and errors[i]:
            c.eval_error, c.metrics = errors[i], None
        out.append(c)
    return out


def test_select_ties_go_to_the_first_candidate():
    cands = scored([{"acc": 0.5}, {"acc": 0.9}, {"acc": 0.9}, {"acc": 0.1}])
    assert ev.select(cands, "acc").name == "c1"
    assert [c.selected for c in cands] == [False, True, False, False]
    assert ev.select(cands, "acc:max").name == "c1"
    cands = scored([{"loss": 2}, {"loss": 1.0}, {"loss": 1}, {"loss": 3}])
    assert ev.select(cands, "loss:min").name == "c1"
    assert [c.selected for c in cands] == [False, True, False, False]


def test_select_skips_what_is_not_a_finite_number():
    cands = scored([{"acc": float("nan")}, {"acc": "nan"}, {"acc": float("inf")}, {"acc": True}, {"acc": "0.99"},
                    {"other": 5}, None, {"acc": [1]}, {"acc": 10 ** 400}, {"acc": -1.0}, {"acc": -2}])
    assert ev.select(cands, "acc").name == "c9"  # -1.0 beats -2; 10**400 is not a finite float
    assert ev.select(cands, "acc:min").name == "c10"
    cands = scored([{"acc": 0.9}, {"acc": 0.8}], errors=[None, "exit status 1"])
    cands[1].metrics = {"acc": 1.0}  # a failed evaluation's metrics never count
    assert ev.select(cands, "acc").name == "c0"
    cands[0].status = "failed"
    assert ev.select(cands, "acc") is None


def test_select_nothing_scored_says_why():
    cands = scored([{"loss": 1}, None, {"loss": 2}], errors=[None, "timed out", None])
    assert ev.select(cands, "acc") is None
    assert not any(c.selected for c in cands)
    msg = ev.no_selection(cands, "acc:max")
    assert msg == "no candidate has a finite number for 'acc' (metrics seen: loss; 1 evaluation failed)"


def test_select_spec_parsing():
    assert ev.parse_select("acc") == ("acc", "max")
    assert ev.parse_select("acc:min") == ("acc", "min")
    assert ev.parse_select("acc:MAX") == ("acc", "max")
    assert ev.parse_select("eval:acc") == ("eval:acc", "max")
    assert ev.parse_select("eval:acc:min") == ("eval:acc", "min")
    for bad in ("", ":min", "  "):
        with pytest.raises(ParameterError, match="--select"):
            ev.parse_select(bad)


# ---------------------------------------------------------------- --keep

def scored_sweep(sweep, tmp_path):
    d, cands, cmd = sweep
    ev.evaluate(cands, str(d), command=cmd, log=lambda s: None)
    return d, cands, cmd


def test_keep_best_removes_the_other_candidates_only(sweep, tmp_path, monkeypatch):
    d, cands, _ = scored_sweep(sweep, tmp_path)
    (d / "notes").mkdir()
    (d / "notes" / "mine.txt").write_text("keep me")
    (d / "results.csv").write_text("1,2")
    best = ev.select(cands, "acc")
    assert best is cands[1]
    # At the moment the first output is renamed away, sweep.json already names the best.
    seen = []
    real_rename = os.rename

    def rename(src, dst):
        seen.append(strict_json(d / "sweep.json")["selection"]["best"])
        return real_rename(src, dst)
    monkeypatch.setattr(ev.os, "rename", rename)
    removed = ev.keep(cands, best, "best", str(d), select_spec="acc", log=lambda s: None)
    assert seen == [best.name, best.name]
    assert removed == [cands[0].output, cands[2].output]
    assert sorted(os.listdir(d)) == sorted([best.name, "notes", "results.csv", "sweep.json"])
    assert (d / best.name / "model.safetensors").exists()
    assert (d / "notes" / "mine.txt").read_text() == "keep me"
    state = strict_json(d / "sweep.json")
    assert state["selection"] == {"spec": "acc", "metric": "acc", "mode": "max", "best": best.name}
    assert state["keep"]["removed"] == removed and state["keep"]["removing"] == [] and state["keep"]["mode"] == "best"
    assert [r["name"] for r in state["candidates"]] == [c.name for c in cands]
    assert [r.get("removed", False) for r in state["candidates"]] == [True, False, True]
    assert [r["selected"] for r in state["candidates"]] == [False, True, False]


@pytest.mark.parametrize("what", ["eval_failed", "merge_failed", "pending", "no_best", "unscored", "best_changed",
                                  "best_missing"])
def test_keep_best_removes_nothing_unless_all_went_well(sweep, tmp_path, what):
    d, cands, _ = scored_sweep(sweep, tmp_path)
    best = ev.select(cands, "acc")
    if what == "eval_failed":
        cands[2].eval_error, cands[2].metrics = "exit status 1: boom", None
    elif what == "merge_failed":
        cands[2].status, cands[2].error = "failed", "out of memory"
    elif what == "pending":
        cands[2].status = "pending"
    elif what == "no_best":
        best = ev.select(cands, "missing")
    elif what == "unscored":
        cands[2].metrics = None
    elif what == "best_changed":  # merged again after it was scored: the choice is stale
        p = Path(best.output) / "tensormerge.json"
        p.write_text(p.read_text().replace(f"fp-{best.name}", "re-merged"))
    else:
        os.rename(best.output, str(d / "moved"))
        os.mkdir(best.output)
    lines, log = quiet_log()
    assert ev.keep(cands, best, "best", str(d), select_spec="acc", log=log) == []
    assert all(os.path.isdir(c.output) for c in cands)
    state = strict_json(d / "sweep.json")
    assert state["keep"]["removed"] == [] and "nothing removed" in state["keep"]["note"]
    assert any("nothing removed" in ln for ln in lines)


def test_keep_best_keeps_what_is_not_the_scored_output(sweep, tmp_path):
    d, cands, cmd = sweep
    extra = make_output(d, "lambda=0.7", {"lambda": 0.7})
    elsewhere = make_output(tmp_path / "other", "lambda=0.9", {"lambda": 0.9})
    more = [make_output(d, n, {"lambda": 0.2}) for n in ("changed", "linked", "unmarked")]
    cands = cands + [extra, elsewhere] + more
    ev.evaluate(cands, str(d), command=cmd, log=lambda s: None)
    best = ev.select(cands, "acc")
    assert best is cands[1]
    # After scoring: one output re-merged, one replaced by a link to the best, one lost its marker.
    (d / "changed" / "tensormerge.json").write_text(
        json.dumps({"tensormerge": "0.1.0", "method": "x", "fingerprint": "new"}))
    import shutil
    shutil.rmtree(d / "linked")
    os.symlink(best.output, d / "linked")
    (d / "unmarked" / "tensormerge.json").unlink()
    lines, log = quiet_log()
    removed = ev.keep(cands, best, "best", str(d), log=log)
    assert removed == [cands[0].output, cands[2].output, extra.output]
    assert os.path.isdir(elsewhere.output)  # not DIR/<name>
    for n in ("changed", "linked", "unmarked"):
        assert os.path.lexists(d / n)
    assert (d / best.name / "tensormerge.json").exists()
    assert sum("--keep best keeps" in ln for ln in lines) == 4


def test_keep_best_never_removes_the_chosen_output_even_under_another_name(sweep, tmp_path):
    d, cands, _ = scored_sweep(sweep, tmp_path)
    best = ev.select(cands, "acc")
    # A candidate whose directory is a link to the chosen output: kept (a link is never removed).
    os.symlink(best.output, d / "alias")
    twin = Candidate("alias", best.method, best.params, best.swept, str(d / "alias"), status="merged",
                     metrics=dict(best.metrics))
    # The chosen one given as an equal copy, not the object in the list: still never removed.
    copy = Candidate(**{f: getattr(best, f) for f in best.__dataclass_fields__})
    removed = ev.keep(cands + [twin], copy, "best", str(d), log=lambda s: None)
    assert removed == [cands[0].output, cands[2].output]
    assert (d / best.name / "tensormerge.json").exists() and os.path.islink(d / "alias")


def test_keep_all_removes_nothing_and_records_the_results(sweep, tmp_path):
    d, cands, _ = scored_sweep(sweep, tmp_path)
    best = ev.select(cands, "loss:min")
    assert ev.keep(cands, best, "all", str(d), select_spec="loss:min", log=lambda s: None) == []
    assert all(os.path.isdir(c.output) for c in cands)
    state = strict_json(d / "sweep.json")
    assert state["selection"]["best"] == cands[0].name and state["keep"]["mode"] == "all"
    assert state["candidates"][0]["metrics"] == cands[0].metrics
    with pytest.raises(ParameterError, match="--keep"):
        ev.keep(cands, best, "some", str(d))


def test_keep_finishes_a_removal_a_crash_interrupted(sweep, tmp_path):
    d, cands, _ = scored_sweep(sweep, tmp_path)
    best = ev.select(cands, "acc")
    # A keep killed after renaming candidate 0 away: its record says it was being removed.
    os.rename(cands[0].output, d / (ev.TRASH_PREFIX + cands[0].name))
    state = ev.load_state(str(d))
    state["keep"] = {"mode": "best", "best": best.name, "removing": [cands[0].name, cands[2].name], "removed": [],
                     "note": None}
    ev.save_state(str(d), state)
    (d / (ev.TRASH_PREFIX + "someone-else")).mkdir()  # not in the record: left alone
    removed = ev.keep(cands, best, "best", str(d), log=lambda s: None)
    assert removed == [cands[2].output]
    assert sorted(os.listdir(d)) == sorted([best.name, "sweep.json", ev.TRASH_PREFIX + "someone-else"])


def test_keep_reports_a_removal_that_fails(sweep, tmp_path, monkeypatch):
    d, cands, _ = scored_sweep(sweep, tmp_path)
    best = ev.select(cands, "acc")

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(ev.os, "rename", refuse)
    with pytest.raises(OutputError, match="cannot be removed") as e:
        ev.keep(cands, best, "best", str(d), log=lambda s: None)
    assert "\n" not in str(e.value)
    assert all(os.path.isdir(c.output) for c in cands)
    assert strict_json(d / "sweep.json")["keep"]["removing"] == [cands[2].name]


# ---------------------------------------------------------------- table

def test_table_rows_columns_and_marks():
    cands = [
        Candidate("lambda=0.1,k=0.2", "ties", {"lambda": 0.1, "k": 0.2}, {"lambda": 0.1, "k": 0.2}, "/o/a",
                  merge_seconds=1.234, status="merged", metrics={"loss": 0.5, "acc": 0.875}, eval_seconds=2.0),
        Candidate("lambda=0.3,k=0.2", "ties", {"lambda": 0.3, "k": 0.2}, {"lambda": 0.3, "k": 0.2}, "/o/b",
                  merge_seconds=1.0, status="merged", metrics={"loss": 0.25, "acc": 0.9375}, eval_seconds=2.5),
        Candidate("lambda=0.5,k=0.2", "ties", {"lambda": 0.5, "k": 0.2}, {"lambda": 0.5, "k": 0.2}, "/o/c",
                  merge_seconds=1.1, status="merged", eval_seconds=0.25,
                  eval_error="exit status 1: Traceback (most recent call last) | ZeroDivisionError: division by zero"),
        Candidate("lambda=0.7,k=0.2", "ties", {"lambda": 0.7, "k": 0.2}, {"lambda": 0.7, "k": 0.2}, "/o/d",
                  status="failed", error="out of memory"),
    ]
    assert ev.select(cands, "acc") is cands[1]
    text = ev.table(cands, "acc")
    lines = text.splitlines()
    assert lines[0].split() == ["candidate", "lambda", "k", "acc", "loss", "merge", "s", "eval", "s", "note"]
    assert lines[1].split() == ["lambda=0.1,k=0.2", "0.1", "0.2", "0.875", "0.5", "1.2", "2.0"]
    assert lines[2].split() == ["*", "lambda=0.3,k=0.2", "0.3", "0.2", "0.9375", "0.25", "1.0", "2.5"]
    assert lines[3].split()[:8] == ["lambda=0.5,k=0.2", "0.5", "0.2", "-", "-", "1.1", "0.2", "eval"]
    assert "eval failed: exit status 1: Traceback" in lines[3] and lines[3].endswith("...")
    assert len(lines[3].split("eval failed")[1]) <= 60
    assert lines[4].split() == ["lambda=0.7,k=0.2", "0.7", "0.2", "-", "-", "-", "-", "merge", "failed:", "out", "of",
                                "memory"]
    assert lines[5] == "* chosen by acc (max): lambda=0.3,k=0.2"
    assert lines[2].startswith("*") and not lines[1].startswith("*")
    # numeric columns right-aligned: the metric values end at the same column
    col = [lines[1].index("0.875") + len("0.875"), lines[2].index("0.9375") + len("0.9375")]
    assert col[0] == col[1]


def test_table_without_selection_and_with_several_methods():
    cands = [Candidate("a", "ties", {}, {"k": 0.1}, "/o/a", status="merged", metrics={"acc": 1}),
             Candidate("b", "dare", {}, {"p": 0.5}, "/o/b", status="merged", metrics={"acc": 0.5, "tag": "x y"})]
    lines = ev.table(cands).splitlines()
    assert lines[0].split() == ["candidate", "method", "k", "p", "acc", "tag", "merge", "s", "eval", "s", "note"]
    assert lines[1].split() == ["a", "ties", "0.1", "1", "-", "-", "-"]
    assert lines[2].split() == ["b", "dare", "0.5", "0.5", "x", "y", "-", "-"]
    assert len(lines) == 3
    ev.select(cands, "f1")
    assert ev.table(cands, "f1").splitlines()[-1] == (
        "no candidate chosen: no candidate has a finite number for 'f1' (metrics seen: acc, tag)")


# ---------------------------------------------------------------- plot

def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    cands = []
    for lam in (0.1, 0.3, 0.5):
        for k in (0.1, 0.2):
            cands.append(Candidate(f"l{lam}k{k}", "ties", {"lambda": lam, "k": k}, {"lambda": lam, "k": k}, "/o",
                                   status="merged", metrics={"acc": 1 - (lam - 0.3) ** 2 - k}))
    cands.append(Candidate("broken", "ties", {}, {"lambda": 0.9, "k": 0.1}, "/o", status="merged", eval_error="x"))
    ev.select(cands, "acc")
    out = tmp_path / "sweep.png"
    assert ev.plot(cands, "acc:max", str(out), log=lambda s: None) == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image  # matplotlib depends on pillow
    with Image.open(out) as im:
        assert im.size == (960, 360)  # two panels, one per swept numeric parameter
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    # no numeric swept parameter: one panel, by candidate
    lists = [Candidate(f"w{i}", "average", {}, {"weights": [i, 1 - i]}, "/o", status="merged", metrics={"acc": i})
             for i in (0, 1)]
    assert ev.plot(lists, "acc", str(tmp_path / "w.png"), log=lambda s: None)
    with Image.open(tmp_path / "w.png") as im:
        assert im.size == (480, 360)


def test_plot_notes_what_it_cannot_do(tmp_path, monkeypatch):
    cands = [Candidate("a", "ties", {}, {"k": 0.1}, "/o", status="merged", metrics={"loss": 1})]
    lines, log = quiet_log()
    if "matplotlib" in sys.modules or _has("matplotlib"):
        assert ev.plot(cands, "acc", str(tmp_path / "p.png"), log=log) is None
        assert lines == ["note: no plot: no candidate has a finite number for 'acc'"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    lines.clear()
    assert ev.plot(cands, "loss", str(tmp_path / "p.png"), log=log) is None
    assert lines == ["note: matplotlib is not installed, so no plot was written (pip install matplotlib)"]
    assert not (tmp_path / "p.png").exists()


def _has(mod: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(mod) is not None


# ---------------------------------------------------------------- sweep.json

def test_state_round_trip_and_refusals(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    assert ev.load_state(str(d)) == {"tensormerge_sweep": 1}
    ev.save_state(str(d), {"evaluations": {"a": {"metrics": {"x": math.nan}}}, "engine": [1, 2]})
    assert strict_json(d / "sweep.json") == {"evaluations": {"a": {"metrics": {"x": "nan"}}}, "engine": [1, 2],
                                             "tensormerge_sweep": 1}
    assert ev.load_state(str(d))["engine"] == [1, 2]
    assert os.listdir(d) == ["sweep.json"]
    for content, needle in [("{not json", "not a readable sweep record"),
                            ('{"a": 1}', "not a tensormerge sweep record"),
                            ("[1]", "not a tensormerge sweep record"),
                            ('{"tensormerge_sweep": 1, "evaluations": []}', "'evaluations' is not a JSON object")]:
        (d / "sweep.json").write_text(content)
        with pytest.raises(InputError, match=needle) as e:
            ev.load_state(str(d))
        assert str(d / "sweep.json") in str(e.value) and "\n" not in str(e.value)
    (d / "sweep.json").unlink()
    (d / "sweep.json").mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        ev.load_state(str(d))
    with pytest.raises(OutputError, match="cannot be written"):
        ev.save_state(str(tmp_path / "missing"), {})


def test_identity_is_the_fingerprint_and_block_crcs(tmp_path):
    c = make_output(tmp_path, "a", {"lambda": 0.1})
    i0 = ev.output_identity(c.output)
    p = Path(c.output) / "tensormerge.json"
    doc = json.loads(p.read_text())
    doc["seconds"] = 7.0
    doc["blocks"]["w"]["seconds"] = 3.0
    p.write_text(json.dumps(doc))
    assert ev.output_identity(c.output) == i0
    doc["blocks"]["w"]["crc32"] = "00000001"
    p.write_text(json.dumps(doc))
    assert ev.output_identity(c.output) not in (None, i0)
    p.write_text("[]")
    assert ev.output_identity(c.output) is None
    assert ev.output_identity(str(tmp_path / "nothing")) is None


def test_provenance_name_matches_the_engine():
    from tensormerge import constants
    assert ev.PROVENANCE == constants.PROVENANCE


def test_the_module_imports_neither_torch_nor_matplotlib():
    code = "import sys, tensormerge.evaluate; print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "[]"


def test_python_metrics_too_large_or_too_deep_fail_their_candidate_not_the_sweep(sweep, tmp_path):
    """A function's result is unbounded where a command's stdout is not: 20 MB of metrics made an
    84 MB sweep.json the next run refused to read, after --keep had removed candidates."""
    d, cands, _ = sweep
    path = tmp_path / "big_eval.py"
    path.write_text("def huge(out):\n    return {'acc': 1.0, 'blob': 'x' * (20 << 20)}\n"
                    "def deep(out):\n    d = c = {}\n    for _ in range(100000):\n        c['a'] = {}\n        c = c['a']\n"
                    "    return {'acc': 1.0, 'd': d}\n")
    for fn, needle in [("huge", f"at most {ev.STDOUT_TAIL} are recorded"), ("deep", "RecursionError")]:
        ev.evaluate(cands[:2], str(d), python=f"{path}:{fn}", log=lambda s: None)
        assert all(c.metrics is None and needle in c.eval_error for c in cands[:2]), [c.eval_error for c in cands[:2]]
        assert (d / "sweep.json").stat().st_size < 64 << 10
        ev.load_state(str(d))  # still readable: a rerun can go on
