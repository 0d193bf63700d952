"""Smoke test of the statistics benchmarks: both scripts run with --quick and write their JSON."""

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
