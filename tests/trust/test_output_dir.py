"""The output directory never takes what is not a merge, and two runs never share one (issue 12,
classes 1 and 2): `--overwrite` replaces only a previous output or an empty directory; an output
that is, contains or lies inside an input, the base, a store or the working directory is refused
for `run` and `stats` alike; symlinks, files and an unwritable `--report` are refused before any
work; no name beside OUT (a user's `OUT.old`) is touched; `OUT.partial.lock` makes a second run
fail at once naming the first, and a dead run's lock is reported when taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensormerge import api
from tensormerge.engine.faults import ENV
from tensormerge.engine.outdir import LOCK_SUFFIX, OutputLock
from tensormerge.errors import OutputError
from tests import helpers as H

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("outdir")
    base_spec, ft_specs, base, fts = H.write_family(root / "models", n=2)
    return {"root": root, "base": base_spec, "inputs": ft_specs, "fts": fts, "base_sd": base}


def args(fam, out, *extra, method="average"):
    a = ["run", "-q", "--method", method, "--inputs", ",".join(fam["inputs"]), "--output", str(out)]
    if method != "average":
        a += ["--base", fam["base"]]
    return a + [str(x) for x in extra]


def assert_average(out, fam):
    merged = H.load_dir(out)
    for n, e in H.expected_average(fam["fts"]).items():
        H.assert_close(merged[n], e, fam["fts"][0][n].dtype, n)


def nothing_beside(out: Path, *allowed: str) -> None:
    """No OUT.partial, no lock file, no other name the run made beside OUT."""
    names = {p.name for p in out.parent.iterdir()}
    assert names <= {out.name, *allowed}, sorted(names)


# ---------------------------------------------------------------------------------- names beside OUT
def test_a_sibling_old_directory_is_never_touched(fam, tmp_path):
    """`mv merged merged.old` before a rerun: the old merge must survive the new one (it was
    removed by every finish)."""
    out = tmp_path / "merged"
    old = tmp_path / "merged.old"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"the user's previous merge")
    for extra in ((), ("--overwrite",)):  # a fresh OUT, then replacing a previous output
        res = H.run_cli(args(fam, out, *extra))
        assert res.returncode == 0, res
        assert (old / "model.safetensors").read_bytes() == b"the user's previous merge"
    assert_average(out, fam)
    nothing_beside(out, "merged.old")


# ---------------------------------------------------------------------------------- --overwrite
def test_overwrite_refuses_a_directory_that_is_not_a_merge(fam, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("three years")
    (out / "data").mkdir()
    res = H.run_cli(args(fam, out, "--overwrite"))
    line = H.assert_clean_error(res, str(out), "not a tensormerge output", "2 entries", "--overwrite")
    assert "data" in line
    assert (out / "thesis.tex").read_text() == "three years" and (out / "data").is_dir()
    nothing_beside(out)


def test_overwrite_refuses_a_merge_output_holding_a_foreign_directory(fam, tmp_path):
    out = tmp_path / "out"
    assert H.run_cli(args(fam, out)).returncode == 0
    (out / "evaluations").mkdir()
    (out / "evaluations" / "scores.json").write_text("{}")
    res = H.run_cli(args(fam, out, "--overwrite"))
    H.assert_clean_error(res, str(out), "evaluations")
    assert (out / "evaluations" / "scores.json").exists()


def test_overwrite_replaces_an_empty_directory_and_a_previous_merge(fam, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert H.run_cli(args(fam, out, "--overwrite")).returncode == 0
    first = H.shard_digests(out)
    res = H.run_cli(args(fam, out, "--overwrite", method="task_arithmetic"))
    assert res.returncode == 0, res
    assert json.loads((out / "tensormerge.json").read_text())["method"] == "task_arithmetic"
    assert H.shard_digests(out) != first
    expected = H.expected_task_arithmetic(fam["base_sd"], fam["fts"])
    merged = H.load_dir(out)
    for n, e in expected.items():
        H.assert_close(merged[n], e, fam["fts"][0][n].dtype, n)
    nothing_beside(out)


def test_output_dot_with_overwrite_leaves_the_working_directory_alone(fam, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    res = H.run_cli(args(fam, ".", "--overwrite"), cwd=work)
    H.assert_clean_error(res, "working directory")
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    res = H.run_cli(args(fam, "..", "--overwrite"), cwd=work)  # a parent of it, too
    H.assert_clean_error(res, "contains the working directory")
    assert (work / "notes.txt").read_text() == "mine"


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): H.sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["parent_of_input", "is_input", "inside_input", "is_base", "inside_base",
                                  "partial_is_input"])
def test_output_related_to_an_input_is_refused(fam, tmp_path, case):
    """Containment both ways, with --overwrite (which used to replace a parent of the inputs,
    inputs and all) and without (which used to write inside an input)."""
    models = tmp_path / "models"
    base_spec, ft_specs, _, fts = H.write_family(models, n=2)
    before = _tree(models)
    if case == "partial_is_input":  # an input named OUT.partial: a fresh run would remove it
        moved = models / "m.partial"
        Path(ft_specs[0]).rename(moved)
        ft_specs = [str(moved), ft_specs[1]]
        before = _tree(models)
    out = {"parent_of_input": models, "is_input": Path(ft_specs[0]), "inside_input": Path(ft_specs[1]) / "merged",
           "is_base": Path(base_spec), "inside_base": Path(base_spec) / "sub" / "merged",
           "partial_is_input": models / "m"}[case]
    res = H.run_cli(["run", "-q", "--method", "task_arithmetic", "--inputs", ",".join(ft_specs), "--base",
                     base_spec, "--output", str(out), "--overwrite"])
    H.assert_clean_error(res, "refusing to write there")
    assert _tree(models) == before


def test_output_with_a_symlinked_input_inside_is_refused(fam, tmp_path):
    """Paths are compared resolved: an input reached through a symlink is still inside OUT."""
    real = tmp_path / "store" / "ft"
    H.save_safetensors_dir(real, fam["fts"][0])
    link = tmp_path / "ft-link"
    link.symlink_to(real)
    before = _tree(tmp_path / "store")
    (tmp_path / "store" / "tensormerge.json").write_text(json.dumps({"tensormerge": "0", "method": "x"}))
    res = H.run_cli(["run", "-q", "--method", "average", "--inputs", f"{link},{fam['inputs'][1]}",
                     "--output", str(tmp_path / "store"), "--overwrite"])
    H.assert_clean_error(res, str(link), "contains input")
    assert {k: v for k, v in _tree(tmp_path / "store").items() if k != "tensormerge.json"} == before


def test_output_that_is_a_statistics_store_is_refused(tmp_path):
    base, fts = H.make_base(0), [H.make_finetune(H.make_base(0), s) for s in (1, 2)]
    specs = [str(H.save_safetensors_dir(tmp_path / f"ft{i}", sd)) for i, sd in enumerate(fts)]
    names = [n for n, t in base.items() if t.dim() == 2 and t.is_floating_point()]
    stores = [H.write_store(tmp_path / f"s{i}.zarr", {"fisher": {n: torch.ones_like(sd[n].float()) for n in names}})
              for i, sd in enumerate(fts)]
    before = _tree(Path(stores[0]))
    with pytest.raises(OutputError, match="is statistics store"):
        api.merge(api.MergeSpec("fisher", specs, stores[0], stats=stores, overwrite=True, quiet=True))
    assert _tree(Path(stores[0])) == before


# ---------------------------------------------------------------------------------- links, files, report
def test_output_that_is_a_symlink_is_refused_before_any_work(fam, tmp_path):
    target = tmp_path / "real"
    assert H.run_cli(args(fam, target)).returncode == 0  # a previous merge, reached through a link
    digests = H.shard_digests(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    res = H.run_cli(args(fam, link, "--overwrite", method="task_arithmetic"))
    H.assert_clean_error(res, str(link), "symbolic link")
    assert link.is_symlink() and H.shard_digests(target) == digests
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_output_that_is_a_regular_file_is_refused_before_any_work(fam, tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    res = H.run_cli(args(fam, out, "--overwrite"))
    H.assert_clean_error(res, str(out), "is a file")
    assert out.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["missing_dir", "a_directory", "an_input", "the_output"])
def test_unwritable_report_fails_before_the_merge(fam, tmp_path, where):
    out = tmp_path / "out"
    victim = Path(fam["inputs"][0]) / "config.json"
    before = victim.read_bytes()
    report = {"missing_dir": tmp_path / "no" / "such" / "r.json", "a_directory": tmp_path,
              "an_input": victim, "the_output": out}[where]
    res = H.run_cli(args(fam, out, "--report", report))
    H.assert_clean_error(res, "--report", str(report), out_dir=out)
    assert victim.read_bytes() == before
    assert not Path(str(out) + LOCK_SUFFIX).exists()


@pytest.mark.parametrize("name", ["report.json", "config.json", "README.md", "tokenizer.json",
                                  "model-00001-of-00007.safetensors", "tensormerge-recipe.yaml"])
def test_report_inside_the_output_is_refused(fam, tmp_path, name):
    out = tmp_path / "out"
    res = H.run_cli(args(fam, out, "--shard-size", "2KB", "--report", out / name))
    H.assert_clean_error(res, "--report", "inside the output", out_dir=out)


@pytest.mark.parametrize("where", ["partial", "lock"])
def test_report_in_out_partial_or_the_lock_file_is_refused(fam, tmp_path, where):
    out = tmp_path / "out"
    report = tmp_path / "out.partial" / "r.json" if where == "partial" else tmp_path / ("out" + LOCK_SUFFIX)
    res = H.run_cli(args(fam, out, "--report", report))
    H.assert_clean_error(res, "--report", out_dir=out)
    assert list(tmp_path.iterdir()) == []


def test_plan_takes_no_lock_and_creates_nothing(fam, tmp_path):
    out = tmp_path / "out"
    with OutputLock(str(out)):  # even while a run holds OUT
        res = H.run_cli(["plan", *args(fam, out)[1:]])
    assert res.returncode == 0, res
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- the lock
_PAUSE = """
import os, time
import tensormerge.engine.faults as faults
_hit = faults.hit
def hit(point):
    if point == "chunk" and not os.path.exists({go!r}):
        open({ready!r}, "w").close()
        while not os.path.exists({go!r}):
            time.sleep(0.02)
    _hit(point)
faults.hit = hit
"""


def test_two_concurrent_merges_to_one_output(fam, tmp_path):
    """A merge paused after its first chunk holds OUT; a second merge to the same OUT (with or
    without --resume, another method) fails at once naming the first's pid and host; the first
    then finishes with its own bytes and its own provenance. Before the lock, the second removed
    the first's OUT.partial and both could publish."""
    out = tmp_path / "out"
    ready, go = tmp_path / "ready", tmp_path / "go"
    driver = (_PAUSE.format(ready=str(ready), go=str(go))
              + "import runpy, sys\nsys.argv = ['tensormerge'] + " + repr(args(fam, out))
              + "\nrunpy.run_module('tensormerge', run_name='__main__', alter_sys=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop(ENV, None)
    first = subprocess.Popen([sys.executable, "-c", driver], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first merge never started writing"
            time.sleep(0.05)
        for extra in ((), ("--resume",), ("--overwrite",)):
            t0 = time.monotonic()
            res = H.run_cli(args(fam, out, *extra, method="task_arithmetic"))
            line = H.assert_clean_error(res, str(out), f"pid {first.pid}", f"host {socket.gethostname()}")
            assert "another tensormerge run" in line
            assert time.monotonic() - t0 < 30  # at once: no merge work was done
        assert not out.exists()
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_average(out, fam)
    assert json.loads((out / "tensormerge.json").read_text())["method"] == "average"
    nothing_beside(out, "ready", "go")


def test_stats_import_and_compute_to_a_locked_output_fail_at_once(tmp_path):
    src, out = tmp_path / "f.safetensors", tmp_path / "S.zarr"
    save_file({"a.weight": torch.rand(4, 3)}, str(src))
    (tmp_path / "data.jsonl").write_text('{"text": "a b"}\n')
    host = socket.gethostname()
    with OutputLock(str(out), "test"):  # held by this process, live
        res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", out])
        H.assert_clean_error(res, str(out), f"pid {os.getpid()}", f"host {host}", out_dir=out)
        res = H.run_cli(["stats", "compute", "--model", tmp_path / "no-model", "--data", tmp_path / "data.jsonl",
                         "--kind", "fisher", "-o", out, "-q"])
        H.assert_clean_error(res, str(out), f"pid {os.getpid()}", out_dir=out)
    res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", out])
    assert res.returncode == 0, res
    nothing_beside(out, "f.safetensors", "data.jsonl")


def test_a_dead_runs_lock_is_reported_when_taken_over(fam, tmp_path):
    out = tmp_path / "out"
    res = H.run_cli(args(fam, out), env={ENV: "chunk:2"})
    assert res.returncode == -signal.SIGKILL, res
    lock = Path(str(out) + LOCK_SUFFIX)
    holder = json.loads(lock.read_text())
    assert holder["host"] == socket.gethostname() and holder["command"] == "run"
    report = tmp_path / "report.json"
    res = H.run_cli([a for a in args(fam, out, "--resume", "--report", report) if a != "-q"])
    assert res.returncode == 0, res
    warning = f"left by pid {holder['pid']} (run, since {holder['started']}), which is no longer running"
    assert warning in res.stderr
    assert warning in json.loads(report.read_text())["stale_lock"]  # what --quiet runs read
    assert_average(out, fam)
    nothing_beside(out, "report.json")


def test_a_lock_left_by_another_host_is_refused_until_removed(fam, tmp_path):
    out = tmp_path / "out"
    lock = Path(str(out) + LOCK_SUFFIX)
    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere.example", "command": "run", "started": "x"}))
    res = H.run_cli(args(fam, out))
    H.assert_clean_error(res, "pid 4242", "elsewhere.example", str(lock), out_dir=out)
    lock.unlink()
    assert H.run_cli(args(fam, out)).returncode == 0


# ---------------------------------------------------------------------------------- stats outputs
def test_stats_import_over_a_model_is_refused(tmp_path):
    model = tmp_path / "model"
    H.save_safetensors_dir(model, {"a.weight": torch.rand(4, 3)})
    before = _tree(model)
    src = tmp_path / "f.safetensors"
    save_file({"a.weight": torch.rand(4, 3)}, str(src))
    res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", model, "--overwrite"])
    H.assert_clean_error(res, str(model), "not a statistics store")
    res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", model, "--overwrite", "--model", model])
    H.assert_clean_error(res, str(model), "is the model")
    res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", model, "--append"])
    H.assert_clean_error(res, str(model), "not a statistics store", "--append")
    assert _tree(model) == before
    nothing_beside(model, "f.safetensors")


def test_stats_compute_over_its_model_or_data_is_refused(tmp_path):
    model = tmp_path / "model"
    H.save_safetensors_dir(model, {"a.weight": torch.rand(4, 3)})
    before = _tree(model)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "a b"}\n')
    for out, needle in ((model, "is the model"), (tmp_path, "contains the model"), (data / "train.jsonl", "is the data")):
        res = H.run_cli(["stats", "compute", "--model", model, "--data", data / "train.jsonl", "--kind", "fisher",
                         "-o", out, "--overwrite", "-q"])
        H.assert_clean_error(res, needle)
    assert _tree(model) == before and (data / "train.jsonl").read_text() == '{"text": "a b"}\n'


def test_stats_overwrite_keeps_a_sibling_old_and_replaces_the_store(tmp_path):
    src, out = tmp_path / "f.safetensors", tmp_path / "S.zarr"
    old = tmp_path / "S.zarr.old"
    old.mkdir()
    (old / "keep").write_text("mine")
    for value in (1.0, 2.0):
        save_file({"a.weight": torch.full((4, 3), value)}, str(src))
        res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", out, "--overwrite"])
        assert res.returncode == 0, res
    from tensormerge.stats.store import StatsStore

    assert torch.equal(StatsStore(str(out)).read("fisher", "a.weight"), torch.full((4, 3), 2.0))
    assert (old / "keep").read_text() == "mine"
    nothing_beside(out, "S.zarr.old", "f.safetensors")


_APPEAR = """
import os
import tensormerge.engine.faults as faults
_hit = faults.hit
def hit(point):
    if point == "finished":
        os.makedirs({out!r})
        with open(os.path.join({out!r}, "theirs.txt"), "w") as f:
            f.write("made by someone else during the merge")
    _hit(point)
faults.hit = hit
"""


def test_a_directory_appearing_at_out_during_the_merge_is_kept_and_so_is_the_merge(fam, tmp_path):
    """Checked again at the rename: something that is not a merge, made at OUT while the merge
    ran, is neither moved nor removed, and the finished merge stays in OUT.partial, which
    --resume then puts in place (it used to be moved aside and deleted)."""
    out = tmp_path / "out"
    res = H.run_cli(args(fam, out, "--overwrite"), setup=_APPEAR.format(out=str(out)))
    line = H.assert_clean_error(res, str(out), "not a tensormerge output", "kept in")
    assert res.returncode == 3, line
    assert (out / "theirs.txt").read_text() == "made by someone else during the merge"
    assert (Path(str(out) + ".partial") / "tensormerge.json").exists()
    (out / "theirs.txt").unlink()  # now an empty directory, which --overwrite may replace
    res = H.run_cli(args(fam, out, "--overwrite", "--resume"))
    assert res.returncode == 0, res
    assert_average(out, fam)
    nothing_beside(out)


def test_an_output_in_directories_yet_to_be_made(fam, tmp_path):
    out = tmp_path / "runs" / "today" / "merged"
    res = H.run_cli(args(fam, out))
    assert res.returncode == 0, res
    assert_average(out, fam)
    nothing_beside(out)
    src = tmp_path / "f.safetensors"
    save_file({"a.weight": torch.rand(4, 3)}, str(src))
    res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", f"{tmp_path}/new/S.zarr/"])
    assert res.returncode == 0, res
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["S.zarr"]


# ---------------------------------------------------------------------------------- red-team fixes
@pytest.mark.parametrize("resume", [False, True])
def test_a_user_directory_named_out_partial_is_refused_and_kept(fam, tmp_path, resume):
    out, mine = tmp_path / "mine", tmp_path / "mine.partial"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    res = H.run_cli(args(fam, out, *(["--resume"] if resume else [])))
    H.assert_clean_error(res, str(mine), "not made by tensormerge")
    assert (mine / "notes.txt").read_text() == "precious" and (mine / "sub").is_dir()
    assert not out.exists()


def test_an_empty_out_partial_is_taken(fam, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "out.partial").mkdir()
    res = H.run_cli(args(fam, out))
    assert res.returncode == 0, res
    assert_average(out, fam)


def test_stats_import_refuses_a_user_out_partial(tmp_path):
    _, _, base, _ = H.write_family(tmp_path / "m", n=1)
    src = tmp_path / "f.pt"
    torch.save({n: torch.ones_like(t).float() for n, t in base.items()}, src)
    keep = tmp_path / "st2.partial" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("precious")
    res = H.run_cli(["stats", "import", str(src), "--kind", "fisher", "--output", str(tmp_path / "st2"),
                     "--model", str(tmp_path / "m" / "base"), "--count", "10"], cwd=tmp_path)
    H.assert_clean_error(res, "st2.partial", "not made by tensormerge")
    assert keep.read_text() == "precious"


def test_an_output_inside_a_partial_directory_is_refused(fam, tmp_path):
    res = H.run_cli(args(fam, tmp_path / "o1.partial" / "x"))
    H.assert_clean_error(res, "o1.partial")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def hub(fam, tmp_path):
    commit = H.make_hub_cache(tmp_path / "hub", "org/m1", fam["fts"][0])
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    repo = tmp_path / "hub" / "models--org--m1"
    return env, repo, repo / "snapshots" / commit


def _hub_args(fam, out, *extra):
    return ["run", "-q", "--method", "average", "--inputs", "org/m1," + fam["inputs"][1], "--output", str(out),
            *[str(x) for x in extra]]


def test_report_onto_a_hub_input_blob_is_refused(fam, tmp_path, hub):
    env, repo, snap = hub
    before = _tree(repo)
    res = H.run_cli(_hub_args(fam, tmp_path / "o", "--report", snap / "model.safetensors"), env=env)
    H.assert_clean_error(res, "--report", "org/m1")
    assert _tree(repo) == before


@pytest.mark.parametrize("where", ["snapshot", "repo", "blobs"])
def test_output_inside_a_hub_input_cache_folder_is_refused(fam, tmp_path, hub, where):
    env, repo, snap = hub
    before = _tree(repo)
    inside = {"snapshot": snap / "o", "repo": repo / "o", "blobs": repo / "blobs" / "o"}[where]
    res = H.run_cli(_hub_args(fam, inside), env=env)
    H.assert_clean_error(res, "--output", "org/m1")
    assert _tree(repo) == before and not inside.exists()


def _mats_case(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(4, 3, generator=g)}
    paths = [str(H.save_safetensors_dir(tmp_path / f"m{i}", {"w": base["w"] + 0.1 * i})) for i in range(2)]
    bpath = str(H.save_safetensors_dir(tmp_path / "base", base))
    stores = [H.write_store(tmp_path / f"s{i}.zarr", {"fisher": {"w": torch.rand(4, 3, generator=g) + 0.1}})
              for i in range(2)]
    init = H.save_safetensors_dir(tmp_path / "o6", base)
    (init / "tokenizer.json").write_text("{}")
    return ["run", "-q", "-m", "mats", "-i", ",".join(paths), "-b", bpath, "--stats", ",".join(stores),
            "-p", "objective=fisher", "-p", f"init={init}"], init


@pytest.mark.parametrize("what", ["output", "report"])
def test_inside_a_mats_init_directory_is_refused(tmp_path, what):
    a, init = _mats_case(tmp_path)
    before = _tree(init)
    extra = ["-o", str(init / "sub")] if what == "output" else ["-o", str(tmp_path / "o"), "--report",
                                                                 str(init / "tokenizer.json")]
    res = H.run_cli(a + extra, cwd=tmp_path)
    H.assert_clean_error(res, f"--{what}", str(init))
    assert _tree(init) == before


def test_report_through_a_symlink_replaces_the_link_not_its_target(fam, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    link = tmp_path / "r.json"
    link.symlink_to(target)
    res = H.run_cli(args(fam, tmp_path / "out", "--report", link))
    assert res.returncode == 0, res
    assert target.read_text() == "precious" and not link.is_symlink()
    assert json.loads(link.read_text())["method"] == "average"


def test_a_newline_in_a_path_keeps_the_error_on_one_line(fam, tmp_path):
    res = H.run_cli(["run", "-q", "--method", "average", "--inputs", "fam/ft1\nerror: fake," + fam["inputs"][1],
                     "--output", str(tmp_path / "o")], cwd=tmp_path)
    line = H.assert_clean_error(res, "\\n")
    assert "fake" in line


def test_an_output_under_a_regular_file_says_so(fam, tmp_path):
    (tmp_path / "afile").write_text("x")
    H.assert_clean_error(H.run_cli(args(fam, tmp_path / "afile" / "x")), "afile", "not a directory")


# ------------------------------------------------- a careless user's seventh-session red team
@pytest.mark.parametrize("kind", ["fifo", "device", "another_models_weights", "a_text_file"])
def test_report_never_replaces_what_is_not_a_report(fam, tmp_path, kind):
    """The report lands by a rename over its path: a device node would become a file, any file
    would be lost, and a FIFO blocked the writability check forever. Each is refused first."""
    out = tmp_path / "out"
    report = tmp_path / "victim"
    if kind == "fifo":
        os.mkfifo(report)
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(report, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
    elif kind == "another_models_weights":
        other = tmp_path / "other"
        assert H.run_cli(args(fam, other)).returncode == 0
        report = other / "model.safetensors"
    else:
        report.write_text("my notes\n")
    before = os.lstat(report)
    content = report.read_bytes() if kind in ("another_models_weights", "a_text_file") else None
    res = H.run_cli(args(fam, out, "--report", report), timeout=60)
    H.assert_clean_error(res, "--report", str(report), out_dir=out)
    after = os.lstat(report)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    if content is not None:
        assert report.read_bytes() == content


def test_an_earlier_report_or_a_link_is_replaced(fam, tmp_path):
    out, report = tmp_path / "out", tmp_path / "report.json"
    assert H.run_cli(args(fam, out, "--report", report)).returncode == 0
    first = json.loads(report.read_text())
    res = H.run_cli(args(fam, out, "--overwrite", "--report", report))
    assert res.returncode == 0, res
    assert json.loads(report.read_text())["output"] == first["output"]
    target = tmp_path / "kept.txt"
    target.write_text("kept")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert H.run_cli(args(fam, out, "--overwrite", "--report", link)).returncode == 0
    assert target.read_text() == "kept" and not link.is_symlink() and "output" in json.loads(link.read_text())


def test_overwrite_keeps_a_file_the_user_added_to_an_output(fam, tmp_path):
    """--overwrite replaces a previous merge, not the notes a user put beside its weights: the
    merge records what it wrote (tensormerge.json `files`), and anything else refuses it."""
    out = tmp_path / "out"
    assert H.run_cli(args(fam, out)).returncode == 0
    written = json.loads((out / "tensormerge.json").read_text())["files"]
    assert sorted(p.name for p in out.iterdir()) == written
    (out / "eval_results.txt").write_text("my eval notes\n")
    res = H.run_cli(args(fam, out, "--overwrite", method="task_arithmetic"))
    H.assert_clean_error(res, str(out), "eval_results.txt", "--overwrite")
    assert (out / "eval_results.txt").read_text() == "my eval notes\n"
    assert_average(out, fam)  # the previous merge, untouched
    (out / "eval_results.txt").unlink()
    assert H.run_cli(args(fam, out, "--overwrite", method="task_arithmetic")).returncode == 0


def test_overwrite_of_an_output_from_before_the_record_is_still_allowed(fam, tmp_path):
    out = tmp_path / "out"
    assert H.run_cli(args(fam, out)).returncode == 0
    prov = out / "tensormerge.json"
    doc = json.loads(prov.read_text())
    del doc["files"]
    prov.write_text(json.dumps(doc))
    (out / "notes.txt").write_text("x")  # unknowable: an older merge may have copied a side file of that name
    assert H.run_cli(args(fam, out, "--overwrite")).returncode == 0
    assert not (out / "notes.txt").exists()


@pytest.mark.parametrize("log", [None, b"", b"not a manifest\n"])
def test_an_empty_resume_folder_does_not_make_a_partial_ours(fam, tmp_path, log):
    """`OUT.partial` with a `.tensormerge-resume` folder but no manifest of a run in it, and a
    user's file beside: refused (the run would delete it), unless the manifest is merely empty
    (a run killed between creating it and writing its first line)."""
    from tensormerge.constants import RESUME_DIR
    from tensormerge.engine.manifest import LOG

    out = tmp_path / "out"
    partial = Path(str(out) + ".partial")
    (partial / RESUME_DIR).mkdir(parents=True)
    if log is not None:
        (partial / RESUME_DIR / LOG).write_bytes(log)
    (partial / "important.txt").write_text("mine")
    res = H.run_cli(args(fam, out))
    if log == b"":
        assert res.returncode == 0, res
        assert_average(out, fam)
        return
    H.assert_clean_error(res, str(partial), "not made by tensormerge")
    assert (partial / "important.txt").read_text() == "mine"


def test_a_new_manifest_begins_as_the_partial_check_expects(tmp_path):
    """What `outdir` looks for at the head of a manifest is what `Manifest.create` writes: a
    drift between the two would make every killed run's partial output look like a stranger's."""
    from tensormerge.constants import RESUME_DIR
    from tensormerge.engine.manifest import HEAD, LOG, Manifest
    from tensormerge.engine.outdir import _holds_manifest

    partial = tmp_path / "out.partial"
    partial.mkdir()
    Manifest.create(str(partial), "f" * 64).close()
    first = (partial / RESUME_DIR / LOG).read_bytes().splitlines()[0]
    assert first.startswith(b'{"tensormerge_manifest":') and first.startswith(HEAD)
    assert _holds_manifest(str(partial))


@pytest.mark.parametrize("inputs", ["{0},,{1}", "{0},{1},", ",{0},{1}", "{0}, ,{1}"])
def test_an_empty_item_in_a_list_is_refused_not_dropped(fam, tmp_path, inputs):
    out = tmp_path / "out"
    a = args(fam, out)
    a[a.index("--inputs") + 1] = inputs.format(*fam["inputs"])
    H.assert_clean_error(H.run_cli(a), "--inputs", "is empty", out_dir=out)


def test_a_parameter_past_float32_is_refused_naming_it(fam, tmp_path):
    out = tmp_path / "out"
    res = H.run_cli(args(fam, out, "-p", "lambda=1e39", method="task_arithmetic"))
    line = H.assert_clean_error(res, "lambda", "float32", out_dir=out)
    assert "RuntimeWarning" not in res.stderr and "NaN" not in line
