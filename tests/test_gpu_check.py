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


def test_dry_run_with_the_machines_own_python_and_offline_wheels(tmp_path):
    """A GPU machine without the registries (this workplace's): its own python3 as it is, and the
    wheels scripts/gpu-wheels fetched, installed offline before the steps."""
    (tmp_path / "tmp").mkdir()
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "zarr-3.1.6-py3-none-any.whl").write_bytes(b"")
    env = {**_env(tmp_path), "TENSORMERGE_PYTHON": "python3", "TENSORMERGE_WHEELS": str(wheels)}
    res = subprocess.run([str(SCRIPT), "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert "the interpreter python3 as it is" in res.stdout and "env.sh" not in res.stdout
    assert f"--no-index --no-deps --target {tmp_path / 'tmp'}/tensormerge-gpu-site {wheels}/*.whl" in res.stdout
    commands = [line.split()[0] for line in res.stdout.splitlines() if line.startswith("        python")]
    assert commands and set(commands) == {"python3"}  # every step on that interpreter


def test_a_wheel_directory_without_wheels_is_refused_before_anything(tmp_path):
    (tmp_path / "tmp").mkdir()
    env = {**_env(tmp_path), "TENSORMERGE_PYTHON": "python3", "TENSORMERGE_WHEELS": str(tmp_path / "none")}
    res = subprocess.run([str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 2 and res.stdout == ""
    assert "TENSORMERGE_WHEELS" in res.stderr and "holds no wheels" in res.stderr and "nothing was run" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"] and not list((tmp_path / "tmp").iterdir())


def test_a_module_that_does_not_import_fails_the_first_step_by_name(tmp_path):
    """The probe imports what the steps need, through the caller's PYTHONPATH (where the offline
    wheels are): a missing one fails the environment step by name and nothing else runs."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "zarr.py").write_text("raise ImportError('no zarr on this machine')\n")
    out = tmp_path / "res.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
                          "--work", str(tmp_path / "work")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, check=False, env={**os.environ, "PYTHONPATH": str(shim)})
    assert res.returncode == 1, res.stdout + res.stderr
    r = json.loads(out.read_text())
    first, *rest = r["steps"]
    assert first["status"].startswith("failed: cannot import zarr (ImportError: no zarr on this machine)")
    assert "scripts/gpu-wheels" in first["status"]
    assert all(s["status"].startswith("not run") for s in rest) and len(rest) == 5
