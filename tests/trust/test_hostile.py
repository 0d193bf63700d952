"""Issue 12, classes 7 and 8: a small hostile file cannot cost big memory or time, and every
error is one line.

The allocation bombs run the CLI in a child whose address space is capped a little above what
it already maps (helpers.run_cli's `setup`): a regression allocates, fails with MemoryError
(an "internal error" line, or a kill) and the test fails, instead of taking the machine down.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import struct
import sys
import time

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402

from tensormerge import api  # noqa: E402
from tensormerge.errors import ParameterError  # noqa: E402

# the child may map this much more than it has when the command starts
AS_LIMIT = """
import resource
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + {extra}, vm + {extra}))
"""


def capped(extra: int = 1 << 30) -> str:
    return AS_LIMIT.format(extra=extra)


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile12")
    base_spec, ft_specs, base, fts = H.write_family(root, n=2)
    return root, base_spec, ft_specs, base, fts


def merge_args(inputs, out, *extra, method="average") -> list[str]:
    return ["run", "--quiet", "--method", method, "--inputs", ",".join(map(str, inputs)), "--output", str(out),
            *map(str, extra)]


def safetensors_file(path: pathlib.Path, header: dict, data: bytes) -> pathlib.Path:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


# ============================================================================ class 7: bombs
def test_tied_alias_group_costs_linear_memory_and_time(tmp_path):
    """8000 names for one data range: a 0.5 MB header. Tie groups built pairwise held 8000 lists
    of 8000 names (64M references, ~0.8 GB) and compared inputs in quadratic time."""
    n = 8000
    header = {f"layers.{i}.tied": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]} for i in range(n)}
    header["other"] = {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}
    a = safetensors_file(tmp_path / "a.safetensors", header, struct.pack("<4f", 1, 2, 3, 4))
    b = safetensors_file(tmp_path / "b.safetensors", header, struct.pack("<4f", 3, 4, 5, 6))
    assert a.stat().st_size < 700_000
    out = tmp_path / "out"
    t0 = time.perf_counter()
    res = H.run_cli(["plan", "--method", "average", "--inputs", f"{a},{b}"], cwd=tmp_path,
                    setup=capped(300 << 20), timeout=120)
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res
    assert "(+7999 tied)" in res.stdout
    assert seconds < 30, f"plan took {seconds:.1f} s"
    res = H.run_cli(merge_args([a, b], out), cwd=tmp_path, setup=capped(300 << 20), timeout=120)
    assert res.returncode == 0, res


def _h5_bomb(path: pathlib.Path, how: str) -> pathlib.Path:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        if how == "unwritten":  # chunks never written: the whole dataset is its fill value
            f.create_dataset("gram", shape=(200_000, 200_000), dtype="f4", chunks=(1000, 1000), fillvalue=1.0)
        elif how == "external":  # data in another file (here: nothing there at all)
            f.create_dataset("gram", shape=(200_000, 200_000), dtype="f4", external=[(str(path) + ".raw", 0, 1 << 40)])
        else:  # one compressed chunk, repeated by the fill value everywhere else
            ds = f.create_dataset("gram", shape=(200_000, 200_000), dtype="f4", chunks=(64, 64), compression="gzip")
            ds[:64, :64] = 1.0
    return path


@pytest.mark.parametrize("how", ["unwritten", "external", "one_chunk"])
def test_hdf5_declaring_a_huge_dataset_is_refused_unread(tmp_path, how):
    f = _h5_bomb(tmp_path / "bomb.h5", how)
    assert f.stat().st_size < 64_000
    out = tmp_path / "S.zarr"
    res = H.run_cli(["stats", "import", str(f), "--kind", "gram_in", "-o", str(out)], cwd=tmp_path,
                    setup=capped(), timeout=120)
    H.assert_clean_error(res, str(f), "gram", out_dir=out)


def _stride_bomb() -> torch.Tensor:
    return torch.ones(1).as_strided((200_000, 200_000), (0, 0))  # 149 GiB declared over 4 bytes


def test_pt_statistics_declaring_more_than_their_storage(tmp_path):
    f = tmp_path / "bomb.pt"
    torch.save({"w": _stride_bomb()}, f)
    assert f.stat().st_size < 64_000
    out = tmp_path / "S.zarr"
    res = H.run_cli(["stats", "import", str(f), "--kind", "gram_in", "-o", str(out)], cwd=tmp_path,
                    setup=capped(), timeout=120)
    H.assert_clean_error(res, str(f), "'w'", out_dir=out)


def test_bin_checkpoint_declaring_more_than_its_storage(fam, tmp_path):
    """The same bomb as a model input: the plan would read (and write) 149 GiB from 4 bytes."""
    f = tmp_path / "bomb.bin"
    torch.save({"w": _stride_bomb()}, f)
    g = tmp_path / "bomb2.bin"
    torch.save({"w": _stride_bomb()}, g)
    res = H.run_cli(["plan", "--method", "average", "--inputs", f"{f},{g}"], cwd=tmp_path, setup=capped(),
                    timeout=60)
    H.assert_clean_error(res, str(f), "'w'")


# every key a known one, so the value itself reaches the error line (7 MB of it before)
BILLION_LAUGHS = """\
method: average
max_memory: [&a [lol,lol,lol,lol,lol,lol,lol,lol,lol],
  &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c],
  &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], [*f,*f,*f,*f,*f,*f,*f,*f,*f]]
"""


@pytest.mark.parametrize("recipe", ["laughs", "one_alias"])
def test_yaml_aliases_in_a_recipe_are_refused(fam, tmp_path, recipe):
    text = BILLION_LAUGHS if recipe == "laughs" else "method: &m average\noutput: *m\n"
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(text)
    assert len(text) < 600
    res = H.run_cli(["run", "--config", str(cfg), "--inputs", ",".join(map(str, fam[2])), "-o", str(tmp_path / "o")],
                    cwd=tmp_path, setup=capped(), timeout=60)
    line = H.assert_clean_error(res, str(cfg), "alias", out_dir=tmp_path / "o")
    assert len(line) < 400, len(line)


LONG = "x" * 100_000


@pytest.mark.parametrize("args", [["--method", LONG], ["-p", f"{LONG}=1"], ["-p", f"weights={LONG}"],
                                  ["--device", LONG], ["--max-memory", LONG], ["--scheduler", LONG],
                                  ["--lora", LONG], ["config:method", LONG], ["config:dtype", LONG],
                                  ["config:lora", LONG], ["config:unknown", LONG]])
def test_echoed_values_are_cut_short(fam, tmp_path, args):
    out = tmp_path / "o"
    if args[0].startswith("config:"):
        key = args[0].split(":")[1]
        cfg = tmp_path / "r.yaml"
        cfg.write_text(json.dumps({key if key != "unknown" else LONG: args[1], **({} if key == "method" else {"method": "average"})}))
        argv = ["run", "--config", str(cfg), "--inputs", ",".join(map(str, fam[2])), "-o", str(out)]
    else:
        argv = merge_args(fam[2], out, *args)
        if args[0] == "--method":
            argv[argv.index("average")] = LONG
            argv = argv[:-2]
    res = H.run_cli(argv, cwd=tmp_path, timeout=60)
    line = H.assert_clean_error(res, out_dir=out)
    assert len(line) < 800, f"{len(line)} characters: {line[:300]}..."


# ============================================================================ class 8: one line
@pytest.mark.parametrize("device", ["foo", "cuda:x", "cpu:-1", "cuda:-1", "gpu"])
def test_malformed_device(fam, tmp_path, device):
    out = tmp_path / "o"
    res = H.run_cli(merge_args(fam[2], out, "--device", device), cwd=tmp_path, timeout=60)
    H.assert_clean_error(res, "--device", out_dir=out)
    assert res.returncode == ParameterError.exit_code


@pytest.mark.parametrize("scheduler", ["nonsense", "tcp://[::1", "tcp://localhost:99999", "tcp://:8786",
                                       "tcp://host name:8786"])
def test_malformed_scheduler_is_refused_before_any_work(fam, tmp_path, scheduler):
    out = tmp_path / "o"
    t0 = time.perf_counter()
    res = H.run_cli(merge_args(fam[2], out, "--scheduler", scheduler), cwd=tmp_path, timeout=60)
    H.assert_clean_error(res, "--scheduler", out_dir=out)
    assert time.perf_counter() - t0 < 8  # not a connection timeout
    assert res.returncode == ParameterError.exit_code


@pytest.mark.parametrize("option,value", [("--max-memory", "1e400"), ("--shard-size", "1e400"),
                                          ("--max-memory", "1e400GiB"), ("--max-memory", "99999e99999")])
def test_size_past_float_range(fam, tmp_path, option, value):
    out = tmp_path / "o"
    res = H.run_cli(merge_args(fam[2], out, option, value), cwd=tmp_path, timeout=60)
    H.assert_clean_error(res, option, out_dir=out)


@pytest.mark.parametrize("entry", ["inputs: 5", "inputs: [1, 2]", "inputs: [{a: 1}]", "params: [1]",
                                   "params: {lambda: {a: 1}}", "params: {lambda: [[1]]}", "method: [average]",
                                   "max_memory: [1]", "max_memory: true", "output: {a: 1}", "device: 5",
                                   "dtype: [auto]", "kernels: 3", "stats: 7", "base: [a, b]", "shard_size: {}"])
def test_recipe_values_of_the_wrong_type(fam, tmp_path, entry):
    key = entry.split(":")[0]
    cfg = tmp_path / "r.yaml"
    body = entry + "\n"
    if key != "method":
        body += "method: task_arithmetic\n"
    if key != "inputs":
        body += "inputs: [" + ", ".join(map(str, fam[2])) + "]\n"
    if key != "base":
        body += f"base: {fam[1]}\n"
    if key != "output":
        body += f"output: {tmp_path / 'o'}\n"
    cfg.write_text(body)
    res = H.run_cli(["run", "--quiet", "--config", str(cfg)], cwd=tmp_path, timeout=60)
    H.assert_clean_error(res, str(cfg), key, out_dir=tmp_path / "o")


def _store(tmp_path, fam, name="S.zarr") -> pathlib.Path:
    ft = fam[4][0]
    stats = {"fisher": {n: torch.rand_like(t.float()) + 0.1 for n, t in ft.items() if t.is_floating_point()}}
    return pathlib.Path(H.write_store(tmp_path / name, stats))


def _set_attr(store: pathlib.Path, path: str, key: str, value) -> None:
    meta = store / path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc.setdefault("attributes", {})[key] = value
    meta.write_text(json.dumps(doc))
    root = json.loads((store / "zarr.json").read_text())  # consolidated metadata repeats it
    cons = root.get("consolidated_metadata", {}).get("metadata", {})
    if path in cons:
        cons[path].setdefault("attributes", {})[key] = value
    elif path == "." :
        root["attributes"][key] = value
    (store / "zarr.json").write_text(json.dumps(root))


@pytest.mark.parametrize("where,key,value", [(".", "model", "a string"), (".", "model", {"identity": 5}),
                                             (".", "model", {"identity": "x", "spec": [1]}),
                                             (".", "n_examples", "many"), (".", "fisher_type", 3),
                                             ("array", "count", "many"), ("array", "weight_layout", ["in_out"])])
def test_store_attributes_of_the_wrong_type(fam, tmp_path, where, key, value):
    s1, s2 = _store(tmp_path, fam, "S1.zarr"), _store(tmp_path, fam, "S2.zarr")
    path = "."
    if where == "array":
        path = "fisher/" + next(iter(sorted(p.name for p in (s1 / "fisher").iterdir() if p.is_dir())))
    _set_attr(s1, path, key, value)
    out = tmp_path / "o"
    res = H.run_cli(merge_args(fam[2], out, "--stats", f"{s1},{s2}", method="fisher"), cwd=tmp_path, timeout=60)
    H.assert_clean_error(res, str(s1), key, out_dir=out)
    res = H.run_cli(["inspect", str(s1)], cwd=tmp_path, timeout=60)
    H.assert_clean_error(res, str(s1), key)


@pytest.mark.parametrize("key", ["..", ".", "zarr.json", "a/../b", ""])
def test_statistics_keys_that_are_no_array_names(tmp_path, key):
    f = tmp_path / "s.pt"
    torch.save({key: torch.ones(3)}, f)
    out = tmp_path / "S.zarr"
    res = H.run_cli(["stats", "import", str(f), "--kind", "fisher", "-o", str(out)], cwd=tmp_path, timeout=60)
    H.assert_clean_error(res, str(f), repr(key), out_dir=out)
    assert not (tmp_path / "S.zarr.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pt"]


@pytest.mark.parametrize("line", ['{"chunk": "x"}', '{"chunk": [1, 2]}', '{"pass": "one"}', '{"chunk": ["w", 0, 1]}',
                                  '{"pass": [1]}', '{"chunk": [["w"], 0, 1], "crc32": 1, "nbytes": 1}'])
def test_malformed_manifest_line(fam, tmp_path, line):
    from tensormerge.constants import RESUME_DIR
    from tensormerge.engine.faults import ENV

    out = tmp_path / "o"
    args = merge_args(fam[2], out, "--base", fam[1], "--max-memory", "4KiB", method="ties")
    res = H.run_cli(args, cwd=tmp_path, env={ENV: "chunk:2"}, timeout=60)
    assert res.returncode == -signal.SIGKILL, res
    log = pathlib.Path(str(out) + ".partial") / RESUME_DIR / "manifest.jsonl"
    lines = log.read_text().splitlines()
    lines.insert(1, line)
    log.write_text("\n".join(lines) + "\n")
    res = H.run_cli([*args, "--resume"], cwd=tmp_path, timeout=60)
    H.assert_clean_error(res, "manifest", "line 2")
    assert pathlib.Path(str(out) + ".partial").exists()  # refused, not destroyed


# ---------------------------------------------------------------------------- kernel cache
def _ties_call(cpu):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(257, generator=g) for _ in range(3)]
    b = torch.randn(257, generator=g)
    return cpu.ties_merge(xs, b, [0.1, 0.2, 0.3], "mass", None, "dis-mean", 0.7, 1.0)


DAMAGE = {"py_garbage": ("*.py", b"def (:\n"), "py_empty": ("*.py", b""),
          "py_other": ("*.py", b"def kernel(*a):\n    return 12345\n"),
          "nbi": ("__pycache__/*.nbi", b"garbage"), "nbc": ("__pycache__/*.nbc", b"\x80\x04garbage"),
          "nbc_truncated": ("__pycache__/*.nbc", None)}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_kernel_cache_is_recompiled(tmp_path, monkeypatch, damage):
    pytest.importorskip("numba")
    from tensormerge.kernels import cpu

    cache = tmp_path / "kernels"
    monkeypatch.setattr(cpu, "KERNEL_CACHE", str(cache))
    monkeypatch.setattr(cpu, "_kernels", {})
    want = _ties_call(cpu)
    pattern, content = DAMAGE[damage]
    files = sorted(cache.glob(pattern))
    assert files, sorted(cache.rglob("*"))
    for f in files:
        f.write_bytes(f.read_bytes()[:40] if content is None else content)
    for attempt in range(2):  # the damaged cache, then what the recovery left for the next process
        monkeypatch.setattr(cpu, "_kernels", {})
        got = _ties_call(cpu)
        assert torch.equal(got[0], want[0]) and got[1] == want[1] and torch.equal(got[2], want[2]), attempt
    assert sorted(cache.glob("*.py")) and sorted(cache.glob("__pycache__/*.nbi")), "the cache was not rewritten"


def test_damaged_kernel_cache_does_not_break_the_cli(fam, tmp_path):
    pytest.importorskip("numba")
    cache = tmp_path / "kernels"
    setup = f"import tensormerge.kernels.cpu as c; c.KERNEL_CACHE = {str(cache)!r}"
    args = merge_args(fam[2], tmp_path / "o1", "--base", fam[1], method="ties")
    assert H.run_cli(args, cwd=tmp_path, setup=setup).returncode == 0
    for f in cache.glob("__pycache__/*.nb*"):
        f.write_bytes(b"garbage")
    res = H.run_cli(merge_args(fam[2], tmp_path / "o2", "--base", fam[1], method="ties"), cwd=tmp_path, setup=setup)
    assert res.returncode == 0, res
    assert (tmp_path / "o1/model.safetensors").read_bytes() == (tmp_path / "o2/model.safetensors").read_bytes()


# ---------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("method,param", [("task_arithmetic", "lambda=nan"), ("task_arithmetic", "lambda=inf"),
                                          ("task_arithmetic", "lambda=-inf"), ("task_arithmetic", "lambdas=1,nan"),
                                          ("ties", "lambda=nan"), ("ties", "k=nan"), ("dare", "p=nan"),
                                          ("average", "weights=nan,1"), ("task_arithmetic", "lambda=1e400")])
def test_non_finite_method_parameters(fam, tmp_path, method, param):
    out = tmp_path / "o"
    res = H.run_cli(merge_args(fam[2], out, "--base", fam[1], "-p", param, method=method), cwd=tmp_path, timeout=60)
    line = H.assert_clean_error(res, repr(param.split("=")[0]), "finite", out_dir=out)
    assert res.returncode == ParameterError.exit_code, line


def test_non_finite_parameter_through_the_api(fam, tmp_path):
    spec = api.MergeSpec("task_arithmetic", [str(p) for p in fam[2]], str(tmp_path / "o"), base=str(fam[1]),
                         params={"lambda": float("nan")})
    with pytest.raises(ParameterError, match="'lambda'.*finite"):
        api.merge(spec)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- API types, commas
def test_api_accepts_pathlike_and_a_single_path(fam, tmp_path):
    ins = [pathlib.Path(p) for p in fam[2]]
    ref = api.merge(api.MergeSpec("task_arithmetic", [str(p) for p in ins], str(tmp_path / "ref"), base=str(fam[1]),
                                  quiet=True))
    got = api.merge(api.MergeSpec("task_arithmetic", ins, tmp_path / "got", base=pathlib.Path(fam[1]),
                                  report=tmp_path / "r.json", quiet=True))
    assert (tmp_path / "got/model.safetensors").read_bytes() == (tmp_path / "ref/model.safetensors").read_bytes()
    assert got["output"] == ref["output"].replace("ref", "got") and (tmp_path / "r.json").is_file()
    # one path where a list is wanted: one input (never split on commas)
    one = tmp_path / "a,b"
    os.symlink(ins[0], one)
    api.merge(api.MergeSpec("average", str(one), str(tmp_path / "one"), quiet=True))
    api.merge(api.MergeSpec("average", one, str(tmp_path / "one_p"), quiet=True))
    direct = api.merge(api.MergeSpec("average", [str(ins[0])], str(tmp_path / "direct"), quiet=True))
    assert direct
    for d in ("one", "one_p"):
        assert (tmp_path / d / "model.safetensors").read_bytes() == (tmp_path / "direct/model.safetensors").read_bytes()


@pytest.mark.parametrize("field,value", [("inputs", 5), ("inputs", [1, 2]), ("inputs", [b"a"]), ("inputs", {"a": 1}),
                                         ("method", 3), ("params", "lambda=1"), ("params", {1: 2}),
                                         ("output", 5), ("base", ["a"]), ("stats", 3), ("max_memory", [1]),
                                         ("max_memory", True), ("shard_size", {}), ("device", 0), ("dtype", None),
                                         ("kernels", 1), ("workers", "2"), ("scheduler", 5), ("overwrite", "yes"),
                                         ("report", 1), ("quiet", 1), ("lora", 3), ("lora", ["full"]),
                                         ("lora", "svd:0"), ("lora", "dense")])
def test_api_spec_of_the_wrong_type_is_refused_before_any_work(fam, tmp_path, field, value):
    spec = api.MergeSpec("average", [str(p) for p in fam[2]], str(tmp_path / "o"), quiet=True)
    setattr(spec, field, value)
    with pytest.raises(ParameterError) as ei:
        api.merge(spec)
    msg = str(ei.value)
    assert "\n" not in msg and len(msg) < 400
    assert field.replace("_", "") in msg.replace("_", "").replace("-", ""), msg
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_inputs_containing_a_comma(fam, tmp_path):
    a, b = tmp_path / "ft,1", tmp_path / "ft,2"
    os.symlink(fam[2][0], a)
    os.symlink(fam[2][1], b)
    ref = tmp_path / "ref"
    assert H.run_cli(merge_args(fam[2], ref), cwd=tmp_path).returncode == 0
    # repeated --inputs, each naming an existing path whole
    out = tmp_path / "o1"
    res = H.run_cli(["run", "-q", "-m", "average", "--inputs", str(a), "--inputs", str(b), "-o", str(out)], cwd=tmp_path)
    assert res.returncode == 0, res
    # a recipe list
    cfg = tmp_path / "r.yaml"
    cfg.write_text(json.dumps({"method": "average", "inputs": [str(a), str(b)], "output": str(tmp_path / "o2")}))
    res = H.run_cli(["run", "-q", "--config", str(cfg)], cwd=tmp_path)
    assert res.returncode == 0, res
    for d in ("o1", "o2"):
        assert (tmp_path / d / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    # the comma-separated form still splits names that do not exist whole
    res = H.run_cli(merge_args([fam[2][0], fam[2][1]], tmp_path / "o3"), cwd=tmp_path)
    assert res.returncode == 0, res


def test_max_memory_stays_bounded_for_huge_finite_values(fam, tmp_path):
    """1e30 bytes is a finite size: accepted (the budget is only an upper bound)."""
    out = tmp_path / "o"
    res = H.run_cli(merge_args(fam[2], out, "--max-memory", "1e30"), cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res


def test_stats_import_accepts_pathlike(tmp_path):
    from tensormerge.stats.importers import import_stats
    from tensormerge.stats.store import StatsStore

    f = tmp_path / "s.pt"
    torch.save({"w.weight": torch.full((2, 3), 0.5)}, f)
    summary = import_stats(f, "fisher", tmp_path / "S.zarr")
    assert summary["arrays"] == 1
    assert torch.equal(StatsStore(str(tmp_path / "S.zarr")).read("fisher", "w.weight"), torch.full((2, 3), 0.5))


def test_malformed_device_of_stats_compute(fam, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
    out = tmp_path / "S.zarr"
    res = H.run_cli(["stats", "compute", "--model", str(fam[2][0]), "--data", str(tmp_path / "d.jsonl"), "--kind",
                     "fisher", "-o", str(out), "--device", "cuda:x"], cwd=tmp_path, timeout=60)
    H.assert_clean_error(res, "--device", "'cuda:x'", out_dir=out)
