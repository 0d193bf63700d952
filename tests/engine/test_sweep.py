"""`tensormerge sweep`: every candidate byte-identical to the `run` with its parameters, for every
method, from one read of the inputs (counted), under a tight budget and with per-candidate
failures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tensormerge import grid
from tensormerge.api import MergeSpec, merge, sweep
from tensormerge.engine.sources import SafetensorsCheckpoint as Checkpoint
from tensormerge.errors import ParameterError

from tests.helpers import run_cli, shard_digests, write_family, write_store

F32 = torch.float32


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweepfam")
    base, fts, _ = write_family(root, n=3)[:3]
    return {"root": root, "base": base, "inputs": fts}


def _run(fam, out: Path, method: str, params: dict, **kw) -> dict[str, str]:
    merge(MergeSpec(method, fam["inputs"], str(out), base=fam["base"], params=params, quiet=True, **kw))
    return shard_digests(out)


def _sweep(fam, out: Path, method: str, raw: dict, list_keys=(), **kw):
    cands = grid.from_params(method, raw, set(list_keys))
    ev = kw.pop("evaluation", None)
    res = sweep(MergeSpec(method, fam["inputs"], str(out), base=fam["base"], quiet=True, **kw), cands, ev)
    return cands, res


def _count_reads(monkeypatch) -> dict:
    """Bytes read from the model files, by (file, offset): each input byte read how many times."""
    seen: dict = {}
    real = Checkpoint.read

    def read(self, name, r0=0, r1=None):
        x = real(self, name, r0, r1)
        if r1 is None or r1 - r0 > 1 or x.shape[:1] == (1,):  # not identity()'s first-row samples
            key = (self.spec, name)
            seen[key] = seen.get(key, 0) + x.numel() * x.element_size()
        return x
    monkeypatch.setattr(Checkpoint, "read", read)
    return seen


@pytest.mark.parametrize("method,raw,list_keys", [
    ("task_arithmetic", {"lambda": "0.2,0.5,1.0"}, ()),
    ("average", {"weights": "1,2,3|3,2,1"}, ("weights",)),
    ("ties", {"k": "0.1,0.3,0.8", "lambda": "1.0,0.6"}, ()),
    ("ties", {"k": "0.2,0.5", "scope": "tensor"}, ()),
    ("ties", {"k": "0.1,0.4", "sign": "normfrac"}, ()),
    ("dare", {"seed": "0,1,2", "p": "0.3"}, ()),
    ("dare_ties", {"seed": "0,1", "density": "0.5"}, ()),  # rescale norms: folded and pass
    ("model_stock", {"filter_wise": "false,true"}, ()),
])
def test_each_candidate_is_byte_identical_to_its_run(fam, tmp_path, method, raw, list_keys):
    cands, res = _sweep(fam, tmp_path / "sw", method, raw, list_keys, max_memory="200KiB")
    assert all(c["status"] == "merged" for c in res["candidates"])
    for c in cands:
        want = _run(fam, tmp_path / f"run-{c.name}", method, c.params)
        got = shard_digests(tmp_path / "sw" / c.name)
        assert got == want, c.name
        for f in ("config.json", "generation_config.json"):  # side files as run writes them
            assert (tmp_path / "sw" / c.name / f).read_bytes() == (tmp_path / f"run-{c.name}" / f).read_bytes()


def test_grid_reads_every_input_chunk_once_for_all_candidates(fam, tmp_path, monkeypatch):
    seen = _count_reads(monkeypatch)
    _sweep(fam, tmp_path / "one", "task_arithmetic", {"lambda": "0.1"}, max_memory="150KiB")
    one = dict(seen)
    seen.clear()
    _sweep(fam, tmp_path / "sw", "task_arithmetic", {"lambda": "0.1,0.2,0.3,0.4"}, max_memory="150KiB")
    assert one and seen == one  # four candidates read exactly the bytes one reads: each row once


def test_ties_k_sweep_runs_each_pass_once_for_every_k(fam, tmp_path, monkeypatch):
    from tensormerge.methods.ties import _HighPass, _SamplePass

    seen = _count_reads(monkeypatch)
    sampled = []
    real_sample = _SamplePass.map_group
    monkeypatch.setattr(_SamplePass, "map_group", lambda self, *a: sampled.append(1) or real_sample(self, *a))
    _sweep(fam, tmp_path / "sw", "ties", {"k": "0.1,0.2,0.5"}, max_memory="150KiB")
    # A run reads a 1/64 sample, the full rows for its threshold pass (each k's window of bins),
    # its vote pass and the merge. Three candidates read one pass more, not three runs: one
    # histogram pass for every k, one pass for every k's exact bins, votes, merge. The sample
    # only places windows, which the sweep's whole-bin histograms do not use: it is skipped.
    assert not sampled
    seen_sweep = dict(seen)
    seen.clear()
    _run(fam, tmp_path / "one", "ties", {"k": "0.1"}, max_memory="150KiB")
    total = lambda d: sum(d.values())  # noqa: E731
    # content digest rereads included in both; the 1/64 sample's rows are rounded up per chunk,
    # and the sweep's common chunks are not the run's: a few rows more or less
    assert total(seen_sweep) <= total(seen) * 4 / 3 * 1.01

    calls = {"map": 0, "group": 0}
    real_map, real_group = _HighPass.map, _HighPass.map_group

    def count_map(self, *a):
        calls["map"] += 1
        return real_map(self, *a)

    def count_group(self, *a):
        calls["group"] += 1
        return real_group(self, *a)
    monkeypatch.setattr(_HighPass, "map", count_map)
    monkeypatch.setattr(_HighPass, "map_group", count_group)
    _sweep(fam, tmp_path / "sw2", "ties", {"k": "0.1,0.2,0.5"}, max_memory="150KiB")
    # the mass sign: one histogram per chunk for every k
    assert calls["group"] > 0 and calls["map"] == 0
    calls.update(map=0, group=0)
    _sweep(fam, tmp_path / "sw3", "ties", {"k": "0.1,0.2,0.5", "sign": "normfrac"}, max_memory="150KiB")
    assert calls["group"] > 0 and calls["map"] == 0  # norms: one histogram with moments per chunk for every k
    assert sampled  # and the windows of each k, which the sample places
    assert _SamplePass.group_key(_SamplePass(None)) == _SamplePass(None).group_key()


def test_candidates_of_different_methods_share_the_read(fam, tmp_path, monkeypatch):
    cands = grid.from_yaml("task_arithmetic", [
        {"params": {"lambda": 0.3}},
        {"method": "ties", "params": {"k": 0.2}, "name": "ties20"},
        {"method": "average"},
    ], "c.yaml")
    assert [c.name for c in cands][1] == "ties20"
    res = sweep(MergeSpec("task_arithmetic", fam["inputs"], str(tmp_path / "sw"), base=fam["base"], quiet=True,
                          max_memory="200KiB"), cands)
    for c in cands:
        assert shard_digests(tmp_path / "sw" / c.name) == _run(fam, tmp_path / f"r-{c.name}", c.method, c.params)
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [c["name"] for c in state["candidates"]] == [c.name for c in cands]
    assert res["candidates"][0]["params"]["lambda"] == 0.3


# ----------------------------------------------------------------------------- statistics methods
def _rand(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _spd(d, seed):
    x = _rand(3 * d, d, seed=seed)
    return x.T @ x / x.shape[0]


@pytest.fixture(scope="module")
def statfam(tmp_path_factory):
    root = tmp_path_factory.mktemp("statfam")
    shapes = {"a.weight": (12, 8), "a.bias": (12,), "b.weight": (6, 12)}
    base = {k: _rand(*s, seed=j) for j, (k, s) in enumerate(shapes.items())}
    paths, stores = [], []
    for i in range(3):
        sd = {k: v + 0.1 * _rand(*v.shape, seed=100 + 10 * i + j) for j, (k, v) in enumerate(base.items())}
        d = root / f"m{i}"
        d.mkdir()
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text("{}")
        paths.append(str(d))
        st = {"fisher": {k: _rand(*s, seed=200 + 10 * i + j).abs() for j, (k, s) in enumerate(shapes.items())},
              "gram_in": {"a.weight": _spd(8, 300 + i), "b.weight": _spd(12, 310 + i)},
              "gram_out": {"a.weight": _spd(12, 320 + i), "b.weight": _spd(6, 330 + i)}}
        stores.append(write_store(root / f"s{i}.zarr", st))
    d = root / "base"
    d.mkdir()
    save_file(base, str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    return {"inputs": paths, "stats": stores, "base": str(d)}


@pytest.mark.parametrize("method,raw", [
    ("regmean", {"alpha": "0.5,0.9,1.0"}),
    ("mats", {"iterations": "1,3,10,30"}),
    ("mats", {"iterations": "2,5", "init_lambda": "0.2,0.6"}),
    ("fisher", {"floor": "1e-6,1e-3"}),
    ("ubgm", {"alpha": "0.5,1.0"}),
])
def test_statistics_methods_byte_identical(statfam, tmp_path, method, raw):
    cands = grid.from_params(method, raw, set())
    spec = MergeSpec(method, statfam["inputs"], str(tmp_path / "sw"), base=statfam["base"], stats=statfam["stats"],
                     quiet=True, max_memory="64KiB")
    res = sweep(spec, cands)
    assert all(c["status"] == "merged" for c in res["candidates"]), res["candidates"]
    for c in cands:
        out = tmp_path / f"run-{c.name}"
        merge(MergeSpec(method, statfam["inputs"], str(out), base=statfam["base"], stats=statfam["stats"],
                        params=c.params, quiet=True))
        assert shard_digests(tmp_path / "sw" / c.name) == shard_digests(out), c.name
        prov = json.loads((out / "tensormerge.json").read_text())
        got = json.loads((tmp_path / "sw" / c.name / "tensormerge.json").read_text())
        assert {n: b["crc32"] for n, b in got["blocks"].items()} == {n: b["crc32"] for n, b in prov["blocks"].items()}
        if method == "mats":  # the recorded iterate is the one a run with that count stops at
            assert {n: b.get("cg_iterations") for n, b in got["blocks"].items()} == \
                   {n: b.get("cg_iterations") for n, b in prov["blocks"].items()}


def test_mats_iterations_are_one_solve(statfam, tmp_path, monkeypatch):
    from tensormerge.kernels import linalg

    calls = []
    real = linalg.conjugate_gradient

    def cg(*a, **kw):
        calls.append(kw.get("record", ()))
        return real(*a, **kw)
    monkeypatch.setattr(linalg, "conjugate_gradient", cg)
    cands = grid.from_params("mats", {"iterations": "3,10,30,100"}, set())
    sweep(MergeSpec("mats", statfam["inputs"], str(tmp_path / "sw"), base=statfam["base"], stats=statfam["stats"],
                    quiet=True), cands)
    assert calls and all(sorted(r) == [3, 10, 30, 100] for r in calls)  # one solve per block for four counts


def test_cg_record_matches_separate_solves():
    from tensormerge.kernels.linalg import conjugate_gradient

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 30, generator=g)
    a = x.T @ x
    b = torch.randn(30, generator=g)
    x0 = torch.randn(30, generator=g)
    rec = conjugate_gradient(lambda v: a @ v, b, x0, 25, 1e-6, record=[1, 4, 9, 25])
    for k, r in rec.items():
        one = conjugate_gradient(lambda v: a @ v, b, x0, k, 1e-6)
        assert torch.equal(r.x, one.x) and r.iterations == one.iterations and r.residual == one.residual


# ----------------------------------------------------------------------------- memory groups, failures
def test_candidates_that_do_not_fit_together_are_split_into_groups(statfam, tmp_path):
    from tensormerge.api import sweep_plan

    cands = grid.from_params("mats", {"init_lambda": "0.1,0.2,0.3"}, set())
    spec = MergeSpec("mats", statfam["inputs"], str(tmp_path / "sw"), base=statfam["base"], stats=statfam["stats"],
                     quiet=True, max_memory="24KiB")
    text = sweep_plan(spec, cands)
    assert "read group(s)" in text and "group 2" in text  # three whole CG blocks do not fit at once
    res = sweep(spec, cands)
    for c in cands:
        out = tmp_path / f"r-{c.name}"
        merge(MergeSpec("mats", statfam["inputs"], str(out), base=statfam["base"], stats=statfam["stats"],
                        params=c.params, quiet=True))
        assert shard_digests(tmp_path / "sw" / c.name) == shard_digests(out)
    assert all(c["status"] == "merged" for c in res["candidates"])


def test_a_failing_candidate_is_dropped_and_the_others_finish(tmp_path):
    root = tmp_path / "f16"
    base = {"w": torch.full((4, 4), 1000.0, dtype=torch.float16)}
    paths = []
    for i, name in enumerate(["base", "a", "b"]):
        d = root / name
        d.mkdir(parents=True)
        sd = {"w": base["w"] + (0 if name == "base" else 20000.0)}
        save_file({k: v.half() for k, v in sd.items()}, str(d / "model.safetensors"))
        paths.append(str(d))
    cands = grid.from_params("task_arithmetic", {"lambda": "0.1,5"}, set())
    res = sweep(MergeSpec("task_arithmetic", paths[1:], str(tmp_path / "sw"), base=paths[0], quiet=True), cands)
    status = {c["name"]: c for c in res["candidates"]}
    assert status["lambda=0.1"]["status"] == "merged"
    assert status["lambda=5"]["status"] == "failed" and "overflows float16" in status["lambda=5"]["error"]
    assert not (tmp_path / "sw" / "lambda=5").exists() and not (tmp_path / "sw" / "lambda=5.partial").exists()
    assert (tmp_path / "sw" / "lambda=0.1" / "model.safetensors").exists()


def test_resume_skips_finished_candidates(fam, tmp_path):
    cands, _ = _sweep(fam, tmp_path / "sw", "task_arithmetic", {"lambda": "0.2,0.4"})
    before = {c.name: os.stat(tmp_path / "sw" / c.name / "model.safetensors").st_mtime_ns for c in cands}
    cands2 = grid.from_params("task_arithmetic", {"lambda": "0.2,0.4,0.6"}, set())
    sweep(MergeSpec("task_arithmetic", fam["inputs"], str(tmp_path / "sw"), base=fam["base"], quiet=True,
                    resume=True), cands2)
    for c in cands:
        assert os.stat(tmp_path / "sw" / c.name / "model.safetensors").st_mtime_ns == before[c.name]
    assert shard_digests(tmp_path / "sw" / "lambda=0.6") == _run(fam, tmp_path / "r", "task_arithmetic",
                                                                  {"lambda": "0.6"})


def test_existing_candidate_without_resume_or_overwrite_is_refused(fam, tmp_path):
    _sweep(fam, tmp_path / "sw", "task_arithmetic", {"lambda": "0.2,0.4"})
    with pytest.raises(Exception, match="exists"):
        _sweep(fam, tmp_path / "sw", "task_arithmetic", {"lambda": "0.2,0.4"})


def test_sweep_dir_holding_other_things_is_refused(fam, tmp_path):
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not a sweep"):
        _sweep(fam, tmp_path / "sw", "task_arithmetic", {"lambda": "0.2,0.4"})
    assert (tmp_path / "sw" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- grid syntax
def test_grid_syntax():
    c = grid.from_params("ties", {"k": "0.1,0.2", "lambda": "1|0.5"}, set())
    assert [x.params for x in c] == [{"k": "0.1", "lambda": "1"}, {"k": "0.1", "lambda": "0.5"},
                                     {"k": "0.2", "lambda": "1"}, {"k": "0.2", "lambda": "0.5"}]
    assert [x.name for x in c][0] == "k=0.1_lambda=1"
    lists = grid.from_params("average", {"weights": "1,2,3"}, {"weights"})
    assert len(lists) == 1 and lists[0].params["weights"] == "1,2,3"
    two = grid.from_params("average", {"weights": "1,2,3|3,2,1"}, {"weights"})
    assert [x.params["weights"] for x in two] == ["1,2,3", "3,2,1"] and two[0].name == "weights=1-2-3"
    with pytest.raises(ParameterError, match="twice"):
        grid.from_params("ties", {"k": "0.1,0.1"}, set())
    with pytest.raises(ParameterError, match="empty"):
        grid.from_params("ties", {"k": "0.1,"}, set())
    with pytest.raises(ParameterError, match="candidates"):
        grid.from_params("ties", {"k": ",".join(str(i) for i in range(1, 20)),
                                  "lambda": ",".join(str(i) for i in range(1, 20))}, set())
    with pytest.raises(ParameterError, match="name"):
        grid.from_yaml("ties", [{"name": "../x", "params": {}}], "c.yaml")


def test_cli_sweep_and_plan(fam, tmp_path):
    args = ["--method", "task_arithmetic", "--base", fam["base"], "--inputs", ",".join(fam["inputs"]),
            "-p", "lambda=0.3,0.6"]
    plan = run_cli(["plan", *args])
    assert plan.returncode == 0 and "2 candidate(s) in 1 read group(s)" in plan.stdout
    res = run_cli(["sweep", *args, "--output", str(tmp_path / "sw"), "-q"])
    assert res.returncode == 0, str(res)
    assert sorted(os.listdir(tmp_path / "sw")) == ["lambda=0.3", "lambda=0.6", "sweep.json"]
    bad = run_cli(["run", *args, "--output", str(tmp_path / "r")])
    assert bad.returncode != 0 and "sweep" in bad.stderr  # a run with several values points at `sweep`


@pytest.mark.parametrize("method,raw", [("ties", {"k": "0.1,0.5"}), ("task_arithmetic", {"lambda": "0.3,0.7"})])
def test_dask_sweep_is_byte_identical_to_run(fam, tmp_path, method, raw):
    cands, res = _sweep(fam, tmp_path / "sw", method, raw, max_memory="200KiB", workers=2)
    assert all(c["status"] == "merged" for c in res["candidates"]), res["candidates"]
    for c in cands:
        assert shard_digests(tmp_path / "sw" / c.name) == _run(fam, tmp_path / f"r-{c.name}", method, c.params)


def test_dask_sweep_statistics_methods(statfam, tmp_path):
    cands = grid.from_params("mats", {"iterations": "2,6"}, set())
    spec = MergeSpec("mats", statfam["inputs"], str(tmp_path / "sw"), base=statfam["base"], stats=statfam["stats"],
                     quiet=True, workers=2)
    res = sweep(spec, cands)
    assert all(c["status"] == "merged" for c in res["candidates"]), res["candidates"]
    for c in cands:
        out = tmp_path / f"r-{c.name}"
        merge(MergeSpec("mats", statfam["inputs"], str(out), base=statfam["base"], stats=statfam["stats"],
                        params=c.params, quiet=True))
        assert shard_digests(tmp_path / "sw" / c.name) == shard_digests(out)


# ----------------------------------------------------------------------------- the CLI with an evaluation
EVAL = """import json, sys
from safetensors.torch import load_file
out, name = sys.argv[1], sys.argv[2]
if name == "lambda=0.6":
    raise SystemExit("boom: this evaluation crashes")
w = load_file(out + "/model.safetensors")["layer.0.attn.weight"]
print("log line")
print(json.dumps({"score": -float((w - 1.0).abs().mean()), "name": name}))
"""


def test_cli_sweep_eval_select_keep_and_resume(fam, tmp_path):
    script = tmp_path / "ev.py"
    script.write_text(EVAL)
    count = tmp_path / "count"
    cmd = f"echo x >> {count}; python {script} {{output}} {{candidate}}"
    args = ["sweep", "--method", "task_arithmetic", "--base", fam["base"], "--inputs", ",".join(fam["inputs"]),
            "-p", "lambda=0.2,0.6,1.0", "--output", str(tmp_path / "sw"), "--eval", cmd, "--select", "score:max",
            "--keep", "best", "-q"]
    res = run_cli(args, env={"PATH": os.path.dirname(os.sys.executable) + ":" + os.environ["PATH"]})
    assert res.returncode != 0  # one evaluation failed: said, and nothing removed
    assert "boom" in res.stderr
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    rows = {c["name"]: c for c in state["candidates"]}
    assert rows["lambda=0.6"]["eval_error"] and rows["lambda=0.2"]["metrics"]["score"] is not None
    assert sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir()) == ["lambda=0.2", "lambda=0.6",
                                                                                 "lambda=1.0"]
    # the evaluation is fixed: --resume merges nothing again and evaluates only the failed one
    script.write_text(EVAL.replace('"lambda=0.6"', '"none"'))
    res = run_cli(args + ["--resume"], env={"PATH": os.path.dirname(os.sys.executable) + ":" + os.environ["PATH"]})
    assert res.returncode == 0, str(res)
    assert len(count.read_text().split()) == 4  # three, then the one that had failed
    state = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    scores = {c["name"]: c["metrics"]["score"] for c in state["candidates"]}
    best = max(scores, key=lambda n: scores[n])
    assert [c["name"] for c in state["candidates"] if c["selected"]] == [best]
    assert sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir()) == [best]  # --keep best
    assert (tmp_path / "sw" / "sweep.png").exists() or "matplotlib" in res.stderr


@pytest.mark.parametrize("which", ["negative", "zero"])
def test_ties_k_sweep_merges_undecided_entries_exactly(tmp_path, monkeypatch, which):
    """A TIES sweep of several k on families with exact cancellations whose model-wide majority
    is −1 (decided by a tensor merged after them) or exactly 0 (at k = 0.2): the shared vote pass
    gives every candidate its exact majority before the merge, so no candidate patches anything,
    and each is byte-identical to its `run` and to the merge that guessed and patched (which did
    patch: the case under test)."""
    from tests.methods.test_ties import _without_vote_pass, majority_family, zero_majority_family

    if which == "negative":
        base, inputs = majority_family(tmp_path / "m", -1.0)
    else:
        base, inputs = zero_majority_family(tmp_path / "m")[:2]
    fam = {"base": base, "inputs": inputs}
    ks = "0.2,0.5,1.0"
    cands, res = _sweep(fam, tmp_path / "sw", "ties", {"k": ks}, max_memory="4KiB")
    assert [c["status"] for c in res["candidates"]] == ["merged"] * 3
    patched = 0
    for c in cands:
        prov = json.loads((tmp_path / "sw" / c.name / "tensormerge.json").read_text())
        assert prov["patched_entries"] == 0, c.name
        got = shard_digests(tmp_path / "sw" / c.name)
        assert got == _run(fam, tmp_path / f"run-{c.name}", "ties", c.params, max_memory="4KiB"), c.name
        with monkeypatch.context() as m:
            _without_vote_pass(m)
            out = tmp_path / f"patched-{c.name}"
            rep = merge(MergeSpec("ties", inputs, str(out), base=base, params=c.params, quiet=True,
                                  max_memory="4KiB"))
        patched += rep["patched_entries"]
        assert shard_digests(out) == got, c.name
    assert patched > 0


def test_ties_sweep_vote_pass_is_one_call_for_every_k(fam, tmp_path, monkeypatch):
    """The candidates' vote passes share each chunk: one fused call per chunk counts every k's
    votes, never one call per candidate."""
    from tensormerge.kernels import cpu
    from tensormerge.methods.ties import _VotePass

    calls = {"map": 0, "group": 0, "sets": set()}
    real_map, real_many = _VotePass.map, cpu.ties_votes_many

    def count_map(self, *a):
        calls["map"] += 1
        return real_map(self, *a)

    def count_many(inputs, base, thresholds, *a):
        calls["group"] += 1
        calls["sets"].add(len(thresholds))
        return real_many(inputs, base, thresholds, *a)
    monkeypatch.setattr(_VotePass, "map", count_map)
    monkeypatch.setattr(cpu, "ties_votes_many", count_many)
    _sweep(fam, tmp_path / "sw", "ties", {"k": "0.1,0.2,0.5"}, max_memory="150KiB")
    assert calls["map"] == 0 and calls["group"] > 0 and calls["sets"] == {3}


def test_ties_sweep_merges_every_k_in_one_fused_call(fam, tmp_path, monkeypatch):
    """The merge pass shares each sub-chunk's loads and task vectors: one fused call merges
    every k and λ (never one call per candidate), and each candidate is still its run's bytes."""
    from tensormerge.kernels import cpu

    calls = {"group": 0, "sets": set()}
    real_many = cpu.ties_merge_many

    def count_many(inputs, base, thresholds, *a):
        calls["group"] += 1
        calls["sets"].add(len(thresholds))
        return real_many(inputs, base, thresholds, *a)
    monkeypatch.setattr(cpu, "ties_merge_many", count_many)
    cands, _ = _sweep(fam, tmp_path / "sw", "ties", {"k": "0.1,0.2", "lambda": "1.0,0.5"}, max_memory="150KiB")
    assert calls["group"] > 0 and calls["sets"] == {4}
    monkeypatch.setattr(cpu, "ties_merge_many", real_many)
    for c in cands:
        assert shard_digests(tmp_path / "sw" / c.name) == _run(fam, tmp_path / f"run-{c.name}", "ties", c.params,
                                                               max_memory="150KiB"), c.name


def test_candidate_dropped_mid_pass_leaves_the_others_exact(fam, tmp_path, monkeypatch):
    """A TIES candidate that fails part-way through the threshold pass is dropped; the one left
    keeps the sweep's kind of partials (full histograms through map_group, not a run's windows
    through map), so its thresholds, and bytes, are its run's."""
    from tensormerge.engine.reading import ChunkReader
    from tensormerge.errors import InputError
    from tensormerge.methods import ties

    seen = {"grouped": 0, "failed": False}
    real_group, real_data = ties._HighPass.map_group, ChunkReader.block_data

    def group(self, *a):
        seen["grouped"] += 1
        return real_group(self, *a)

    def block_data(self, b, *a, **kw):
        if seen["grouped"] and not seen["failed"] and self.plan.params.k == 0.5:
            seen["failed"] = True
            raise InputError("simulated: this candidate's input failed")
        return real_data(self, b, *a, **kw)
    monkeypatch.setattr(ties._HighPass, "map_group", group)
    monkeypatch.setattr(ChunkReader, "block_data", block_data)
    cands, res = _sweep(fam, tmp_path / "sw", "ties", {"k": "0.2,0.5"}, max_memory="150KiB")
    assert seen["failed"] and [c["status"] for c in res["candidates"]][0] == "merged"
    assert res["candidates"][1]["status"] != "merged"
    monkeypatch.undo()
    assert shard_digests(tmp_path / "sw" / cands[0].name) == _run(fam, tmp_path / "run", "ties", cands[0].params,
                                                                  max_memory="150KiB")

