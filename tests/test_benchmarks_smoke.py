"""Smoke tests of the benchmarks: the statistics scripts with --quick, the sweep benchmark on the
tiny preset; each writes its JSON."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, out: pathlib.Path, tmp_path: pathlib.Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(out), *extra],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists()
    return json.loads(out.read_text())


def test_stats_codec_quick(tmp_path):
    res = _run("stats_codec.py", tmp_path / "codec.json", tmp_path, "--workdir", str(tmp_path))
    assert res["quick"] is True
    for key in ("machine", "arrays", "candidates", "results", "summary", "current", "markdown"):
        assert key in res
    assert set(res["arrays"]) == {"fisher_embed", "fisher_dense", "gram_in"}
    assert res["current"] in res["summary"] and "none" in res["summary"]
    assert len(res["results"]) == len(res["arrays"]) * len(res["candidates"])
    for row in res["results"]:
        for key in ("array", "codec", "ratio", "write_MBps", "read_MBps", "range_MBps", "stored_bytes"):
            assert key in row
        assert row["ratio"] > 0 and row["read_MBps"] > 0
    assert res["summary"]["none"]["ratio"] == pytest.approx(1.0, rel=1e-3)
    assert not any(pathlib.Path(tmp_path).glob("stats-codec-*"))  # the zarr arrays were removed


def test_stats_bench_quick(tmp_path):
    res = _run("stats_bench.py", tmp_path / "bench.json", tmp_path)
    assert res["quick"] is True
    for key in ("machine", "matmul", "regmean", "kfac", "extrapolation", "assumptions", "markdown"):
        assert key in res
    assert set(res["regmean"]) == set(res["kfac"]) == {"q", "wi", "wo"}
    for r in res["regmean"].values():
        for cfg in ("engine", "default"):
            for key in ("prepare_s", "rows_s", "total_s", "gflops"):
                assert r[cfg][key] > 0
    for k in res["kfac"].values():
        assert k["cg_iterations"] == 10 and k["matvecs"] == 12
        assert k["per_iteration_s"] > 0 and k["gflops"] > 0
    ex = res["extrapolation"]
    for key in ("regmean_engine_s", "regmean_default_s", "kfac_10_s", "kfac_100_s"):
        assert ex[key]["total"] > 0
    assert ex["kfac_100_s"]["total"] > ex["kfac_10_s"]["total"]
    assert {m["dtype"] for m in res["matmul"]} == {"float32", "float64"}


def test_sweep_bench_tiny(tmp_path):
    """sweep_bench.py on the tiny preset, one repetition of a two-value TIES sweep (the method whose
    passes the candidates share): the floor, the sweep, the runs (each byte-identical to its
    candidate) and the table come out. Four tensormerge processes: ~15 s on a quiet machine."""
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(BENCH / "sweep_bench.py"), "--preset", "tiny", "--data",
                           str(tmp_path / "data"), "--repeats", "1", "--methods", "ties", "--ks", "0.1,0.2",
                           "--verify", "--skip-mergekit", "--json", str(out), "--summary-md"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["n_candidates"] == 2 and res["swept"] == ["ties"]
    (rep,) = res["repeats"]
    floor = rep["floor"]
    assert floor["n_outputs"] == 2 and len(floor["write_s"]) == 2
    assert floor["total_s"] == pytest.approx(floor["read_s"] + sum(floor["write_s"]))
    for method in ("ties",):
        m = rep["methods"][method]
        assert m["sweep"]["returncode"] == 0 and m["runs"]["returncode"] == 0
        assert [c["status"] for c in m["sweep"]["candidates"]] == ["merged", "merged"]
        assert len(m["runs"]["each"]) == 2
        assert all(e["identical_to_sweep"] is True for e in m["runs"]["each"])
        assert m["runs"]["wall_s"] == pytest.approx(sum(e["wall_s"] for e in m["runs"]["each"]))
        assert m["sweep"]["peak_rss_bytes"] > 0 and m["sweep"]["cpu_s"] > 0
        assert m["derived"]["speedup_wall"] == pytest.approx(m["runs"]["wall_s"] / m["sweep"]["wall_s"])
        assert m["mergekit"] == {"skipped": "--skip-mergekit"}
    assert not (tmp_path / "data" / "sweep-bench-out").exists()  # outputs removed
    table = proc.stdout
    assert "ties k=0.1,0.2" in table and "| yes |" in table
    again = subprocess.run([sys.executable, str(BENCH / "sweep_bench.py"), "--from-json", str(out)],
                           capture_output=True, text=True, timeout=60, check=True)
    assert again.stdout.strip() == table.strip()


def test_mergekit_bench_tiny(tmp_path):
    """mergekit_bench.py on the tiny preset: both tools merge the same recipe files, the table
    and the agreement check are written, and the merged outputs are removed."""
    pytest.importorskip("mergekit", reason="mergekit is not installed (benchmarks/mergekit_parity.sh)")
    out = tmp_path / "mk.json"
    proc = subprocess.run([sys.executable, str(BENCH / "mergekit_bench.py"), "--data", str(tmp_path / "data"),
                           "--generate", "tiny", "--out", str(out), "--recipes", "task_arithmetic,slerp"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["floor"]["total_s"] > 0 and res["floor"]["input_bytes"] > res["floor_slerp"]["input_bytes"]
    for recipe in ("task_arithmetic", "slerp"):
        row = res["results"][recipe]
        for tool in ("mergekit", "tensormerge"):
            assert row[tool]["returncode"] == 0, row[tool].get("error")
            assert row[tool]["wall_s"] > 0 and row[tool]["peak_rss_bytes"] > 0
        agree = row["agreement"]
        assert agree["same_names"] and agree["tensors"]
        for t in agree["tensors"].values():
            assert t["shape_equal"] and t["dtype_a"] == t["dtype_b"] == "torch.bfloat16"
            # mergekit sums in bf16 (the recipe's dtype), tensormerge in float32: a few entries
            # differ by more than one bf16 ulp, never many
            assert t["frac_over_1ulp"] < 0.05
    assert "| slerp |" in res["markdown"] and "| task_arithmetic |" in res["markdown"]
    assert not (tmp_path / "mergekit-bench-work").exists()  # recipes and merged outputs removed
