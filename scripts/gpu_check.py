"""The steps of scripts/gpu-check, run one after another within one time budget.

Standard library only at the top: --dry-run runs under any python3, before a virtual
environment exists. Each step is a child process with its own time limit, cut to what is left
of the budget (8 minutes by default); a step that no longer fits is recorded as not run. The
results file is JSON: the machine, every step (command, exit status, seconds, what it found,
the tail of its output) and a short text summary, which is printed too. Exit status 0 only when
every step passed.

--cpu-smoke runs the same steps on CPU at miniature sizes (pytest only collects): it checks the
plumbing on a machine without a GPU, which is all a test can check there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRITON_TESTS = "tests/kernels/test_triton_gpu.py"

# What the steps import (the package, its tests and benchmarks); a machine's own Python may lack
# some (scripts/gpu-wheels fetches them for one that cannot reach the registries).
MODULES = ("safetensors", "huggingface_hub", "zarr", "numcodecs", "dask", "distributed", "click", "tqdm", "numpy",
           "yaml", "numba", "triton", "transformers", "pytest", "hypothesis", "psutil", "scipy")

# Run first: is CUDA usable from this environment's torch, and does everything else import?
# Prints one JSON line.
PROBE = r"""
import importlib, json, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "missing": []}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        info["missing"].append(f"{name} ({type(exc).__name__}: {exc})"[:200])
try:
    import triton
    info["triton"] = triton.__version__
except Exception as exc:
    info["triton"] = f"not importable: {exc}"
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                devices=torch.cuda.device_count())
    x = torch.randn(1024, 1024, device="cuda")
    info["matmul_ok"] = bool(torch.allclose((x @ x).cpu(), x.cpu() @ x.cpu(), rtol=1e-3, atol=1e-3))
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
except Exception as exc:
    info["nvidia_smi"] = f"not run: {exc}"
print(json.dumps(info))
"""


@dataclass
class Step:
    name: str
    cmd: list[str]
    limit_s: int
    junit: Path | None = None  # pytest's XML report, read for the counts
    result_json: Path | None = None  # a benchmark's JSON, kept in the results
    cleanup: list[Path] = field(default_factory=list)  # data the step wrote, removed after it
    required: bool = False  # the run stops when a required step fails


def gpu_test_files() -> list[str]:
    """Every test module that skips without CUDA (so new GPU tests are picked up), but the
    Triton one, which is a step of its own."""
    found = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        text = path.read_text(errors="replace")
        rel = path.relative_to(ROOT).as_posix()
        if "cuda.is_available()" in text and rel != TRITON_TESTS:
            found.append(rel)
    return found


def plan(py: str, work: Path, smoke: bool) -> list[Step]:
    device = "cpu" if smoke else "cuda"
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"] + (["--collect-only"] if smoke else [])
    steps = [
        Step("environment: torch sees the GPU", [py, "-c", PROBE, *MODULES], 90, required=True),
        Step("GPU tests (" + ", ".join(gpu_test_files()) + ")",
             pytest + [f"--junitxml={work / 'junit-gpu.xml'}", *gpu_test_files()], 150, junit=work / "junit-gpu.xml"),
        Step("Triton kernels against the reference on the device (compiled, bitwise)",
             pytest + [f"--junitxml={work / 'junit-triton.xml'}", TRITON_TESTS], 150,
             junit=work / "junit-triton.xml"),
        Step("per-kernel throughput (torch and Triton on the device)",
             [py, "benchmarks/kernels_bench.py", "--out", str(work / "kernels.json")]
             + (["--elements", "4096", "--quick"] if smoke else []), 45, result_json=work / "kernels.json"),
        Step(f"llama-1.1b: task_arithmetic and ties --device {device}, next to the I/O floor",
             [py, "benchmarks/run_bench.py", "--preset", "tiny" if smoke else "llama-1.1b",
              "--data", str(work / "llama"), "--methods", "task_arithmetic,ties", "--device", device,
              "--skip-naive", "--skip-mergekit", "--json", str(work / "llama.json"), "--summary-md"], 150,
             result_json=work / "llama.json", cleanup=[work / "llama"]),
        Step(f"mT5-XL-shaped mats (kfac, 10 CG iterations) --device {device}, 1+1 layers",
             [py, "benchmarks/mt5xl_stats.py", "--device", device, "--methods", "mats", "--layers", "1",
              "--examples", "4", "--data", str(work / "mt5"), "--out", str(work / "mt5.json")]
             + (["--quick", "--examples", "2"] if smoke else []), 200, result_json=work / "mt5.json", cleanup=[work / "mt5"]),
    ]
    return steps


def junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    reasons: dict[str, int] = {}
    for case in root.iter("testcase"):
        for sk in case.findall("skipped"):
            msg = (sk.get("message") or "").strip()[:120]
            reasons[msg] = reasons.get(msg, 0) + 1
    counts["skip_reasons"] = reasons
    return counts


def step_env() -> dict:
    """The repository first on the path, before what the caller put there (the scratch site
    of TENSORMERGE_WHEELS), so the steps import this checkout without installing it."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def run_step(step: Step, limit: float, smoke: bool) -> dict:
    res: dict = {"name": step.name, "cmd": step.cmd, "limit_s": round(limit)}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        try:
            proc = subprocess.run(step.cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                  timeout=limit, env=step_env())
            res["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            res["returncode"] = None
            res["timed_out"] = True
        out.seek(0)
        text = out.read()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["output_tail"] = "\n".join(text.strip().splitlines()[-25:])
    status = "passed" if res["returncode"] == 0 else ("timed out" if res.get("timed_out") else "failed")
    if step.junit is not None and step.junit.exists():
        counts = res["pytest"] = junit_counts(step.junit)
        if "--collect-only" in step.cmd:  # the XML lists no test cases then; pytest's last line counts them
            m = re.search(r"(\d+) tests? collected", text)
            counts["collected"] = int(m.group(1)) if m else 0
        # on a GPU machine nothing may skip for want of CUDA: that would be a pass that tested nothing
        no_cuda = sum(n for msg, n in counts["skip_reasons"].items() if "cuda" in msg.lower())
        if status == "passed" and no_cuda and not smoke:
            status = f"failed: {no_cuda} test(s) skipped for want of CUDA"
    if step.result_json is not None and step.result_json.exists():
        try:
            res["result"] = json.loads(step.result_json.read_text())
        except ValueError as exc:
            res["result_error"] = repr(exc)
    if res["returncode"] == 0 and step.name.startswith("environment"):
        try:
            res["environment"] = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            status = "failed: the probe printed no JSON"
        else:
            if res["environment"].get("missing"):
                status = ("failed: cannot import " + "; ".join(res["environment"]["missing"]) + " (a Python of "
                          "the machine's own: fetch them with scripts/gpu-wheels, give TENSORMERGE_WHEELS)")
            elif not smoke and not res["environment"].get("cuda_available"):
                env = res["environment"]
                status = (f"failed: torch {env.get('torch')} (CUDA build: {env.get('torch_cuda')}) cannot use the "
                          f"GPU; a CPU build of torch is installed in this environment, or the driver is too old")
    for path in step.cleanup:
        shutil.rmtree(path, ignore_errors=True)
    res["status"] = status
    return res


def one_line(res: dict) -> str:
    extra = ""
    if "pytest" in res:
        c = res["pytest"]
        extra = (f"; {c['tests']} tests, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
                 + (f", {c['collected']} collected" if "collected" in c else ""))
    r = res.get("result") or {}
    if "methods" in r and "io_floor" in r:
        floor = r["io_floor"]["total_s"]
        parts = []
        for m, e in r["methods"].items():
            s = (e.get("tensormerge", {}).get("report") or {}).get("seconds")
            parts.append(f"{m} {s:.1f} s = {s / floor:.2f}x floor" if s else f"{m} failed")
        extra = f"; floor {floor:.1f} s; " + ", ".join(parts)
    if "merges" in r:
        parts = []
        for m, e in r["merges"].items():
            s = (e.get("report") or {}).get("seconds")
            ext = (e.get("extrapolated") or {}).get("seconds")
            parts.append(f"{m} {s:.1f} s (24+24 layers ~{ext / 60:.1f} min)" if s and ext else f"{m} failed")
        extra = "; " + ", ".join(parts)
    env = res.get("environment")
    if env:
        extra = f"; {env.get('device')} (torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, triton {env.get('triton')})"
    return f"[{res['status']}] {res['name']} ({res.get('seconds', 0)} s){extra}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="tensormerge on a CUDA machine: tests, Triton kernels, benchmark")
    ap.add_argument("--out", type=Path, default=None,
                    help="results file (default gpu-check-DATE.json in the current directory)")
    ap.add_argument("--budget", type=float, default=480, help="seconds for all steps together (default 480)")
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch directory for data (default: a new one under $TMPDIR, removed at the end)")
    ap.add_argument("--dry-run", action="store_true", help="print the steps, run nothing")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="the same steps on CPU at miniature sizes, pytest only collecting (tests the plumbing)")
    ap.add_argument("--python", default=None, help="interpreter for the steps (default: this one)")
    args = ap.parse_args(argv)
    venv = os.environ.get("TENSORMERGE_VENV", str(ROOT / ".venv-gpu"))
    py = args.python or (f"{venv}/bin/python" if args.dry_run else sys.executable)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path.cwd() / f"gpu-check-{stamp}.json"
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / f"tensormerge-gpu-check-{stamp}"
    steps = plan(py, work, args.cpu_smoke)
    if args.dry_run:
        total = 0
        for i, s in enumerate(steps, 1):
            total += s.limit_s
            print(f"step {i} {s.name} (limit {s.limit_s} s{', required' if s.required else ''})")
            print("        " + " ".join(s.cmd if s.cmd[1] != "-c" else s.cmd[:2] + ["<probe>", *s.cmd[3:]]))
        print(f"budget {args.budget:.0f} s for all steps (limits add up to {total} s; each is cut to what is left)")
        print(f"results -> {out}; scratch data -> {work} (removed)")
        return 0
    own_work = args.work is None
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    results = {"date": stamp, "budget_s": args.budget, "cpu_smoke": args.cpu_smoke, "python": py,
               "loadavg_before": [round(x, 2) for x in os.getloadavg()], "steps": []}
    try:  # a copy of the tree without .git, or a machine without git, records none
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        results["git_commit"] = git.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        results["git_commit"] = None
    stop = None
    try:
        for s in steps:
            left = deadline - time.monotonic()
            if stop or left < 10:
                results["steps"].append({"name": s.name, "cmd": s.cmd, "status": f"not run: {stop or 'budget spent'}"})
                continue
            # --cpu-smoke checks plumbing, not speed: only the whole budget bounds its steps
            limit = left if args.cpu_smoke else min(s.limit_s, left)
            print(f"gpu-check: {s.name} (up to {limit:.0f} s)", file=sys.stderr, flush=True)
            res = run_step(s, limit, args.cpu_smoke)
            results["steps"].append(res)
            if s.required and res["status"] != "passed":
                stop = f"'{s.name}' failed"
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    ok = all(r["status"] == "passed" for r in results["steps"])
    results["passed"] = ok
    summary = [f"gpu-check {stamp}: {'PASSED' if ok else 'FAILED'} "
               f"({sum(r.get('seconds', 0) for r in results['steps']):.0f} s of a {args.budget:.0f} s budget)"]
    summary += [one_line(r) if "seconds" in r else f"[{r['status']}] {r['name']}" for r in results["steps"]]
    results["summary"] = summary
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out)
    print("\n".join(summary))
    print(f"results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
