"""scripts/gpu-check without a GPU: it refuses clearly and touches nothing; --dry-run lists every
step; --cpu-smoke runs the steps' plumbing at miniature sizes on CPU."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-check"


def _gpu_present() -> bool:
    if shutil.which("nvidia-smi"):
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        return any(line.startswith("GPU ") for line in res.stdout.splitlines())
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _env(tmp_path: Path) -> dict:
    # a venv path that does not exist: a run that set one up would create it
    return {**os.environ, "TENSORMERGE_VENV": str(tmp_path / "venv"), "TMPDIR": str(tmp_path / "tmp")}


@pytest.mark.skipif(_gpu_present(), reason="a GPU is present: gpu-check would run for real")
def test_no_gpu_refuses_and_runs_nothing(tmp_path):
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "res.json"
    res = subprocess.run([str(SCRIPT), "--out", str(out)], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no NVIDIA GPU present" in res.stderr and "nothing was run" in res.stderr
    assert res.stdout == ""
    assert not (tmp_path / "venv").exists()  # no environment set up
    assert not out.exists()  # no results file
    assert list((tmp_path / "tmp").iterdir()) == []  # no scratch data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "res.json"
    res = subprocess.run([str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    gpu = "an NVIDIA GPU is present" if _gpu_present() else "no NVIDIA GPU present"
    assert gpu in text
    assert "scripts/env.sh test,bench" in text and str(tmp_path / "venv") in text
    steps = [line for line in text.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["0", "1", "2", "3", "4", "5", "6"]
    for needle in ("tests/engine/test_gpu.py", "tests/kernels/test_triton_gpu.py", "benchmarks/kernels_bench.py",
                   "--preset llama-1.1b", "--methods task_arithmetic,ties", "benchmarks/mt5xl_stats.py",
                   "--methods mats"):
        assert needle in text, needle
    commands = [line for line in text.splitlines() if line.startswith("        ")]
    assert sum("--device cuda" in c for c in commands) == 2  # both benchmarks run on the device
    assert "budget 480 s" in text
    limits = [int(s.split("(limit ")[1].split()[0]) for s in steps[1:]]
    assert all(0 < x <= 480 for x in limits)
    assert not (tmp_path / "venv").exists() and not out.exists()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_cpu_smoke_runs_every_step(tmp_path):
    """The steps' commands are real: on CPU at miniature sizes each one passes, and the results
    file holds every step, the benchmarks' JSON and the summary."""
    out = tmp_path / "res.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
                          "--work", str(tmp_path / "work"), "--budget", "2400"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=2500, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["passed"] is True and r["cpu_smoke"] is True
    assert len(r["steps"]) == 6
    for step in r["steps"]:
        assert step["status"] == "passed", (step["name"], step.get("output_tail"))
    env, tests, triton, kernels, llama, mt5 = r["steps"]
    assert env["environment"]["torch"] and "cuda_available" in env["environment"]
    assert tests["pytest"]["collected"] >= 1 and triton["pytest"]["collected"] >= 1
    assert kernels["result"]["rows"]
    assert set(llama["result"]["methods"]) == {"task_arithmetic", "ties"}
    assert all(m["tensormerge"]["returncode"] == 0 for m in llama["result"]["methods"].values())
    assert mt5["result"]["merges"]["mats"]["returncode"] == 0
    assert r["summary"][0].startswith("gpu-check") and "PASSED" in r["summary"][0]
    assert len(r["summary"]) == 7 and "results:" in res.stdout
    assert not (tmp_path / "work" / "llama").exists() and not (tmp_path / "work" / "mt5").exists()
