"""Benchmark tensormerge against the I/O floor, a naive merge and mergekit.

For one synthetic preset (see synth.py) and a list of merge methods this
measures, in one run and on the same files:

  (a) the I/O floor: read every input byte once and write one model's worth,
  (b) a naive load-everything merge in a child process (naive_merge.py),
  (c) ``python -m tensormerge run`` in a child process,
  (d) ``mergekit-yaml`` on the equivalent config, when mergekit is available,

recording wall time and peak RSS / peak anonymous memory of every child, and
writes a JSON file, a PNG plot and optionally a Markdown summary table.

``--cold`` measures tensormerge alone with the inputs evicted from the page cache
before every run (cold.py), next to the cold read floor measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cold  # noqa: E402
from io_floor import fsync_file, write_bytes, write_fsynced  # noqa: E402
import synth  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
NAIVE_SCRIPT = Path(__file__).resolve().parent / "naive_merge.py"
READ_CHUNK = 16 * 1024 * 1024
POLL_S = 0.05
# Fraction of RAM a naive run may be expected to need before it is skipped.
NAIVE_RAM_FRACTION = 0.8
# Python + torch + safetensors imported, before any tensor is loaded.
CHILD_BASELINE_BYTES = 400 * 10**6
# Fraction of available RAM the inputs may take for a warm-cache comparison.
WARM_RAM_FRACTION = 0.8
GB = 1e9
ST_DTYPE_NAMES = {st: name for _, st, name in synth.DTYPES.values()}

# mergekit equivalents of each method; parameters mirror tensormerge's
# defaults and the naive baseline (lambda 0.3 / k 0.2 / p 0.5, lambda 1).
MERGEKIT_METHODS = {
    "average": ("linear", {"weight": 1.0}, {"normalize": True}),
    "task_arithmetic": ("task_arithmetic", {"weight": 0.3}, {"normalize": False}),
    "ties": ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True}),
    "dare": ("dare_linear", {"weight": 1.0, "density": 0.5}, {"normalize": False}),
}


# --------------------------------------------------------------------------
# data and machine


def model_files(model_dir: Path) -> list[Path]:
    """Shard files of one checkpoint, in index order."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return [model_dir / f for f in sorted(set(index["weight_map"].values()))]


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (cheap: no tensor data is read)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


def model_stats(model_dir: Path) -> dict:
    """Parameter count, bytes, dtype and largest tensor of a checkpoint."""
    params, data_bytes, largest, dtypes = 0, 0, 0, set()
    for path in model_files(model_dir):
        for name, info in read_header(path).items():
            if name == "__metadata__":
                continue
            dtypes.add(ST_DTYPE_NAMES.get(info["dtype"], info["dtype"]))
            numel = int(np.prod(info["shape"], dtype=np.int64))
            begin, end = info["data_offsets"]
            params += numel
            data_bytes += end - begin
            largest = max(largest, numel)
    return {"params": params, "data_bytes": data_bytes, "file_bytes": sum(
        p.stat().st_size for p in model_files(model_dir)), "largest_tensor_numel": largest,
        "dtype": "/".join(sorted(dtypes))}


def ensure_data(args) -> tuple[Path, list[Path], float | None]:
    """Return (base, fine-tunes, generation seconds or None if already there)."""
    base, fts = synth.model_dirs(args.data, args.n_finetunes)
    if all((d / "model.safetensors.index.json").exists() for d in [base, *fts]):
        return base, fts, None
    print(f"generating {args.preset} into {args.data}", file=sys.stderr)
    t0 = time.perf_counter()
    synth.generate(args.preset, args.data, args.n_finetunes, args.dtype,
                   log=lambda msg: print(msg, file=sys.stderr), layers=getattr(args, "layers", None))
    return base, fts, time.perf_counter() - t0


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to platform info)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """Commit of the repo under test, so results can be tied to engine code."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(data_dir: Path) -> dict:
    """Everything needed to tell whether two result files are comparable."""
    vm = psutil.virtual_memory()
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_total_bytes": vm.total,
        "ram_available_bytes": vm.available,
        "disk_free_bytes": shutil.disk_usage(data_dir).free,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }


# --------------------------------------------------------------------------
# (a) I/O floor


def read_all(paths: list[Path], buf: bytearray) -> int:
    """Sequentially read files into one reusable buffer; returns bytes read."""
    view = memoryview(buf)
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def io_floor(inputs: list[Path], out_bytes: int, scratch_dir: Path) -> dict:
    """Time the minimum I/O any merge must do: read all inputs, write one model.

    Page cache cannot be dropped without root, so when the inputs fit in RAM a
    warm-up pass makes every measurement (floor and merges) warm; otherwise
    reads partly hit disk and the result says so.
    """
    buf = bytearray(READ_CHUNK)
    in_bytes = sum(p.stat().st_size for p in inputs)
    available = psutil.virtual_memory().available
    warm = in_bytes <= WARM_RAM_FRACTION * available
    result = {"input_bytes": in_bytes, "output_bytes": out_bytes, "warm_cache": warm}
    if warm:
        t0 = time.perf_counter()
        read_all(inputs, buf)
        result["warmup_read_s"] = time.perf_counter() - t0
        result["note"] = "inputs fit in RAM: measured after a warm-up read (page cache warm)"
    else:
        result["note"] = (f"inputs ({in_bytes / GB:.1f} GB) exceed "
                          f"{WARM_RAM_FRACTION:.0%} of available RAM "
                          f"({available / GB:.1f} GB): reads are mostly cold, from disk")
    t0 = time.perf_counter()
    read_all(inputs, buf)
    read_s = time.perf_counter() - t0
    target = scratch_dir / "io-floor-write.bin"
    t0 = time.perf_counter()
    write_bytes(target, out_bytes, buf)
    cached_s = time.perf_counter() - t0
    fsync_file(target)  # a merge fsyncs its shards before it publishes them: so does the floor
    write_s = time.perf_counter() - t0
    target.unlink()
    result.update({
        "read_s": read_s, "read_GBps": in_bytes / GB / read_s,
        "write_s": write_s, "write_GBps": out_bytes / GB / write_s, "write_unsynced_s": cached_s,
        "total_s": read_s + write_s,
    })
    return result


# --------------------------------------------------------------------------
# child processes with memory polling


def proc_memory(pid: int) -> tuple[int, int]:
    """(RSS, anonymous RSS) in bytes of one process, from /proc/PID/status."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                key, value = line.split(":")
                fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("RssAnon", 0)


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """Summed (RSS, anon) of a process and its descendants (mergekit may fork)."""
    rss = anon = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            r, a = proc_memory(p.pid)
        except (OSError, psutil.Error):
            continue
        rss += r
        anon += a
    return rss, anon


def tail(text: str, lines: int = 15) -> str:
    """Last lines of a child's output, enough to diagnose a failure."""
    return "\n".join(text.strip().splitlines()[-lines:])


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd, polling the RSS of its process tree every 50 ms.

    Output goes to temporary files rather than pipes so a chatty child can
    never block on a full pipe while we are polling.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO_ROOT)
        proc = psutil.Process(child.pid)
        peak_rss = peak_anon = 0
        while child.poll() is None:
            rss, anon = tree_memory(proc)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return {"returncode": child.returncode, "wall_s": wall, "peak_rss_bytes": peak_rss,
            "peak_anon_bytes": peak_anon, "stdout": stdout, "stderr": stderr}


def finish(run: dict, output: Path, keep: bool) -> dict:
    """Turn a raw run into a result entry and remove the merged output."""
    result = {k: run[k] for k in ("returncode", "wall_s", "peak_rss_bytes", "peak_anon_bytes")}
    if run["returncode"] != 0:
        result["error"] = tail(run["stderr"] or run["stdout"])
    if output.exists() and not keep:
        shutil.rmtree(output) if output.is_dir() else output.unlink()
    return result


# --------------------------------------------------------------------------
# (b) naive baseline


def naive_bytes_needed(method: str, n_ft: int, stats: dict) -> int:
    """Estimated peak bytes of naive_merge.py.

    All models stay loaded, the merged dict is built in storage dtype, and
    per tensor up to n_ft+3 fp32 temporaries of the largest tensor live at
    once. TIES also materialises one model's flattened fp32 |tau| and
    torch.kthvalue copies it and allocates int64 indices (4+4+8 bytes/param).
    """
    need = (CHILD_BASELINE_BYTES + (n_ft + 2) * stats["data_bytes"]
            + (n_ft + 3) * 4 * stats["largest_tensor_numel"])
    if method == "ties":
        need += 16 * stats["params"]
    return need


def run_naive(method: str, base: Path, fts: list[Path], out_dir: Path, stats: dict,
              keep: bool) -> dict:
    """Naive baseline in a child, unless its estimated memory would not fit."""
    need = naive_bytes_needed(method, len(fts), stats)
    ram = psutil.virtual_memory().total
    if need > NAIVE_RAM_FRACTION * ram:
        return {"skipped": f"needs ~{need / GB:.1f} GB, machine has {ram / GB:.1f} GB",
                "estimated_bytes": need}
    output = out_dir / f"naive-{method}.safetensors"
    run = run_measured([sys.executable, str(NAIVE_SCRIPT), method, str(base),
                        ",".join(map(str, fts)), str(output)])
    result = finish(run, output, keep)
    result["estimated_bytes"] = need
    if run["returncode"] == 0:
        result.update(json.loads(run["stdout"].strip().splitlines()[-1]))
    return result


# --------------------------------------------------------------------------
# (c) tensormerge


def percentiles(values: list[float]) -> dict:
    """Median / p10 / p90, the spread that matters for per-block throughput."""
    if not values:
        return {}
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"p10": float(p10), "median": float(p50), "p90": float(p90)}


def block_numel(block: dict) -> int | None:
    """Elements in a report block, from an explicit count or its shape."""
    if isinstance(block.get("numel"), int):
        return block["numel"]
    shape = block.get("shape")
    return int(np.prod(shape, dtype=np.int64)) if isinstance(shape, list) else None


def summarize_report(report: dict, stats: dict) -> dict:
    """Throughput numbers from tensormerge's report; every field is optional."""
    seconds = report.get("seconds")
    read, written = report.get("bytes_read") or 0, report.get("bytes_written") or 0
    summary = {k: report.get(k) for k in ("seconds", "merge_seconds", "peak_rss_bytes",
                                          "peak_anon_bytes", "bytes_read", "bytes_written")}
    summary["method_params"] = report.get("params")  # the merge's parameters, not a count
    if seconds:
        summary["MBps"] = (read + written) / 1e6 / seconds
        summary["read_MBps"] = read / 1e6 / seconds
        summary["params_per_s"] = stats["params"] / seconds
    blocks = [b for b in report.get("blocks") or [] if b.get("seconds")]
    summary["n_blocks"] = len(blocks)
    summary["block_MBps"] = percentiles([b.get("bytes", 0) / 1e6 / b["seconds"] for b in blocks])
    summary["block_params_per_s"] = percentiles(
        [block_numel(b) / b["seconds"] for b in blocks if block_numel(b)])
    return summary


def tensormerge_env() -> dict:
    """Environment that lets ``-m tensormerge`` import from the repo uninstalled."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def tensormerge_import_error() -> str | None:
    """None if tensormerge imports in this interpreter, else the error text."""
    probe = subprocess.run([sys.executable, "-c", "import tensormerge"], env=tensormerge_env(),
                           cwd=REPO_ROOT, capture_output=True, text=True)
    return None if probe.returncode == 0 else tail(probe.stderr, 5)


def run_tensormerge(method: str, base: Path, fts: list[Path], out_dir: Path, stats: dict,
                    max_memory: str, keep: bool, device: str = "cpu",
                    evict: list[Path] | None = None) -> dict:
    """One ``tensormerge run`` in a child, plus the metrics from its report; ``evict``: files
    to drop from the page cache first (a cold run)."""
    output = out_dir / f"tensormerge-{method}"
    report_path = out_dir / f"tensormerge-{method}.report.json"
    cmd = [sys.executable, "-m", "tensormerge", "run", "--method", method,
           "--inputs", ",".join(map(str, fts)), "--base", str(base), "--output", str(output),
           "--max-memory", max_memory, "--report", str(report_path), "--quiet", "--overwrite"]
    if device != "cpu":
        cmd += ["--device", device]
    resident = None
    if evict:
        cold.cold_start(evict)
        resident = cold.resident_fraction(evict)
    result = finish(run_measured(cmd, tensormerge_env()), output, keep)
    if report_path.exists():
        try:
            result["report"] = summarize_report(json.loads(report_path.read_text()), stats)
        except (ValueError, TypeError, AttributeError) as exc:
            result["report_error"] = repr(exc)
        if not keep:
            report_path.unlink()
    if evict:
        result["inputs_resident_before"] = resident
    return result


# --------------------------------------------------------------------------
# (d) mergekit


def mergekit_command(explicit: str | None) -> list[str] | None:
    """How to invoke mergekit-yaml: --mergekit, PATH, or this interpreter."""
    if explicit:
        return [explicit]
    if found := shutil.which("mergekit-yaml"):
        return [found]
    try:
        import mergekit  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-c", "import sys; from mergekit.scripts.run_yaml import main; "
            "sys.argv[0] = 'mergekit-yaml'; main()"]


def mergekit_config(method: str, base: Path, fts: list[Path], dtype: str) -> dict:
    """mergekit YAML (as a dict; JSON is valid YAML) equivalent to the method.

    Computation is float32 like the naive baseline; the output keeps the
    input dtype. Note mergekit's TIES trims per tensor, not globally.
    """
    merge_method, params, global_params = MERGEKIT_METHODS[method]
    config = {
        "merge_method": merge_method,
        "models": [{"model": str(ft), "parameters": params} for ft in fts],
        "parameters": global_params,
        "dtype": "float32",
        "out_dtype": dtype,
    }
    if merge_method != "linear":
        config["base_model"] = str(base)
    return config


def run_mergekit(cmd: list[str] | None, method: str, base: Path, fts: list[Path],
                 out_dir: Path, dtype: str, keep: bool) -> dict:
    """One mergekit-yaml run in a child, or why there is none."""
    if cmd is None:
        return {"skipped": "not installed"}
    output = out_dir / f"mergekit-{method}"
    cfg = out_dir / f"mergekit-{method}.yaml"
    cfg.write_text(json.dumps(mergekit_config(method, base, fts, dtype), indent=2))
    run = run_measured(cmd + [str(cfg), str(output), "--lazy-unpickle", "--no-copy-tokenizer",
                              "--quiet", "--random-seed", "0"])
    if not keep:
        cfg.unlink()
    return finish(run, output, keep)


# --------------------------------------------------------------------------
# reporting


def param_count(n: int) -> str:
    """1.10B / 4.9M: readable for both real presets and the tiny one."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def cell(run: dict, value, spec: str, scale: float = 1.0) -> str:
    """One table cell: the number, or why there is none."""
    if "skipped" in run:
        return "skipped" if run["skipped"].startswith("needs") else run["skipped"]
    if run.get("returncode") != 0:
        return "failed"
    return "-" if value is None else format(value / scale, spec)


def summary_markdown(results: dict) -> str:
    """Markdown table for benchmarks/README.md."""
    floor = results["io_floor"]
    machine = results["machine"]
    lines = [
        f"Preset `{results['preset']}`: {results['n_finetunes']} fine-tunes + base, "
        f"{param_count(results['model']['params'])} params ({results['model']['dtype']}); "
        f"{machine['cpu_model']}, {machine['cpu_cores']} cores, "
        f"{machine['ram_total_bytes'] / 2**30:.0f} GiB RAM; tensormerge --max-memory "
        f"{results['max_memory']}. I/O floor {floor['total_s']:.1f} s (read "
        f"{floor['read_GBps']:.2f} GB/s, write {floor['write_GBps']:.2f} GB/s, "
        f"{'warm' if floor['warm_cache'] else 'cold'} cache).",
        "",
        "| method | tensormerge s | x floor | wall s (process) | wall x floor | MB/s | peak RSS GB | peak anon GB "
        "| naive s | naive peak RSS GB | mergekit s | mergekit peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results["methods"].items():
        tm, naive, mk = r["tensormerge"], r["naive"], r["mergekit"]
        rep = tm.get("report", {})
        seconds = rep.get("seconds") or tm.get("wall_s")
        lines.append("| " + " | ".join([
            method,
            cell(tm, seconds, ".1f"),
            cell(tm, seconds and seconds / floor["total_s"], ".2f"),
            cell(tm, tm.get("wall_s"), ".1f"),  # the interpreter's start-up (torch) included
            cell(tm, tm.get("wall_s") and tm["wall_s"] / floor["total_s"], ".2f"),
            cell(tm, rep.get("MBps"), ".0f"),
            cell(tm, rep.get("peak_rss_bytes") or tm.get("peak_rss_bytes"), ".2f", GB),
            cell(tm, rep.get("peak_anon_bytes") or tm.get("peak_anon_bytes"), ".2f", GB),
            cell(naive, naive.get("wall_s"), ".1f"),
            cell(naive, naive.get("peak_rss_bytes"), ".2f", GB),
            cell(mk, mk.get("wall_s"), ".1f"),
            cell(mk, mk.get("peak_rss_bytes"), ".2f", GB),
        ]) + " |")
    return "\n".join(lines)


def cold_summary_markdown(results: dict) -> str:
    """Markdown table of a --cold run: best and range over the repeats, as ratios to the cold
    read floor of the same run."""
    c = results["cold"]
    # the disk's own speed in each repeat: its fastest sequential read of every input, buffered
    # (the floor itself, and the read of the read + write floor) or with O_DIRECT
    buffered = [min(f["s"], rw["read_s"]) for f, rw in zip(c["floors"], c.get("read_write_floors") or [{}] * 99)
                ] if c.get("read_write_floors") else [f["s"] for f in c["floors"]]
    direct = [f["s"] if f else None for f in c.get("direct_floors") or []]
    floors = [min(b, d) if d else b for b, d in zip(buffered, direct + [None] * len(buffered))]
    best_floor = min(floors)
    ev = c["eviction_check"]
    machine = results["machine"]
    lines = [
        f"Preset `{results['preset']}`: {results['n_finetunes']} fine-tunes + base, "
        f"{param_count(results['model']['params'])} params ({results['model']['dtype']}), "
        f"{c['input_bytes'] / GB:.1f} GB of inputs; {machine['cpu_model']}, {machine['cpu_cores']} cores; "
        f"--max-memory {results['max_memory']}, --device {results.get('device', 'cpu')}; "
        f"{len(floors)} repeat(s), load average before {c['loadavg_before']}, after {c.get('loadavg_after', '(interrupted)')}.",
        "",
        f"Eviction check on {len(ev['files'])} file(s) ({ev['warm']['bytes'] / GB:.1f} GB): warm read "
        f"{ev['warm']['GBps']:.2f} GB/s, after eviction {_pct(ev['resident_after_evict'])} resident and a "
        f"read at {ev['cold']['GBps']:.2f} GB/s ({ev['cold_over_warm_s']:.1f}x the warm read's time).",
        "",
        f"Cold read floor (evict, one sequential read of every input; each repeat's fastest of a buffered "
        f"read, the read + write floor's read and an O_DIRECT read): best {best_floor:.1f} s ({c['input_bytes'] / GB / best_floor:.2f} GB/s), "
        f"range {min(floors):.1f}-{max(floors):.1f} s; buffered {min(buffered):.1f}-{max(buffered):.1f} s"
        + (f", O_DIRECT {min(d for d in direct if d):.1f}-{max(d for d in direct if d):.1f} s."
           if any(direct) else "."),
    ]
    rw = [f["s"] for f in c.get("read_write_floors") or []]
    if rw:
        lines += ["", f"Outputs written to `{c['output_dir']}` ("
                  f"{'the inputs’ disk' if c['output_on_input_disk'] else 'another device than the inputs'}); "
                  f"cold read + fsync'ed write of one model there: best {min(rw):.1f} s, range "
                  f"{min(rw):.1f}-{max(rw):.1f} s (write {min(f['write_s'] for f in c['read_write_floors']):.1f}-"
                  f"{max(f['write_s'] for f in c['read_write_floors']):.1f} s)."]
    lines += [
        "",
        "| method | best s | x cold read floor (best) | x floor, range over repeats | x read+write floor (best) "
        "| MB/s read | inputs resident before | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, runs in c["methods"].items():
        ok = [(r, f) for r, f in zip(runs, floors) if r.get("returncode") == 0 and r.get("report", {}).get("seconds")]
        if not ok:
            lines.append(f"| {method} | failed | | | | | | |")
            continue
        secs = [r["report"]["seconds"] for r, _ in ok]
        ratios = [r["report"]["seconds"] / f for r, f in ok]
        best = min(ok, key=lambda rf: rf[0]["report"]["seconds"])[0]
        res = [r.get("inputs_resident_before") for r, _ in ok]
        lines.append("| " + " | ".join([
            method, f"{min(secs):.1f}", f"{min(secs) / best_floor:.2f}",
            f"{min(ratios):.2f}-{max(ratios):.2f}",
            f"{min(secs) / min(rw):.2f}" if rw else "-",
            f"{(best['report'].get('read_MBps') or 0):.0f}",
            "/".join(_pct(x) for x in res),
            f"{(best['report'].get('peak_rss_bytes') or best.get('peak_rss_bytes') or 0) / GB:.2f}",
        ]) + " |")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def cold_read_write_floor(inputs: list[Path], out_bytes: int, out_dir: Path) -> dict:
    """The cold read floor followed by one fsync'ed write of a model to the output directory:
    the least any merge writing there does (the warm floor's write, after a cold read)."""
    f = cold.cold_read_floor(inputs)
    target = out_dir / "io-floor-write.bin"
    t0 = time.perf_counter()
    write_fsynced(target, out_bytes, bytearray(READ_CHUNK))
    write_s = time.perf_counter() - t0
    target.unlink()
    return {"read_s": f["s"], "write_s": write_s, "s": f["s"] + write_s, "resident_before": f["resident_before"]}


def run_cold(args, base: Path, fts: list[Path], stats: dict, inputs: list[Path], out_dir: Path,
             results: dict, save, log) -> None:
    """Each repeat: the cold read floor, then every method, the inputs evicted before each."""
    c = results["cold"] = {"input_bytes": sum(p.stat().st_size for p in inputs),
                           "loadavg_before": [round(x, 2) for x in os.getloadavg()],
                           "floors": [], "methods": {m: [] for m in args.methods}}
    c["output_dir"] = str(out_dir)
    c["output_on_input_disk"] = os.stat(out_dir).st_dev == os.stat(inputs[0]).st_dev
    c["read_write_floors"] = []
    c["direct_floors"] = []
    log("cold: eviction check on the base model's files")
    c["eviction_check"] = cold.eviction_check(model_files(base))
    save()
    for r in range(args.repeats):
        log(f"cold: repeat {r + 1}/{args.repeats}: read floor")
        c["floors"].append(cold.cold_read_floor(inputs))
        log(f"cold: repeat {r + 1}/{args.repeats}: direct read floor")
        c["direct_floors"].append(cold.cold_direct_floor(inputs))
        log(f"cold: repeat {r + 1}/{args.repeats}: read + write floor")
        c["read_write_floors"].append(cold_read_write_floor(inputs, stats["file_bytes"], out_dir))
        for method in args.methods:
            log(f"cold: repeat {r + 1}/{args.repeats}: {method}")
            c["methods"][method].append(
                run_tensormerge(method, base, fts, out_dir, stats, args.max_memory, args.keep_outputs,
                                args.device, evict=inputs))
            save()
    c["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    save()


def plot(results: dict, path: Path) -> None:
    """Two panels: seconds per method and tool, and peak RSS per method and tool. A tool that
    ran for no method (skipped or failed everywhere) gets no bars and no legend entry; the
    title names it instead."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results["methods"])

    def value(method: str, tool: str, key: str) -> float:
        run = results["methods"][method][tool]
        return run.get(key, 0.0) if run.get("returncode") == 0 else 0.0

    every = ["tensormerge", "naive", "mergekit"]
    tools = [t for t in every if any(results["methods"][m][t].get("returncode") == 0 for m in methods)]
    absent = [t for t in every if t not in tools]

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(methods))
    width = 0.2
    floor = results["io_floor"]["total_s"]
    colors = {"tensormerge": "C0", "naive": "C1", "mergekit": "C2"}
    left = x - len(tools) / 2 * width  # the floor, then each tool, centred on the tick
    ax_t.bar(left, [floor] * len(methods), width, label="I/O floor", color="gray")
    for i, tool in enumerate(tools):
        ax_t.bar(left + (i + 1) * width, [value(m, tool, "wall_s") for m in methods], width,
                 label=tool, color=colors[tool])
        ax_m.bar(x + (i - (len(tools) - 1) / 2) * width,
                 [value(m, tool, "peak_rss_bytes") / GB for m in methods], width, label=tool,
                 color=colors[tool])
    ram = results["machine"]["ram_total_bytes"] / GB
    for ax, ylabel in ((ax_t, "wall seconds"), (ax_m, f"peak RSS (GB; machine has {ram:.0f})")):
        ax.set_xticks(x, methods)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"{results['preset']}: {param_count(results['model']['params'])} params x "
                 f"{results['n_finetunes'] + 1} models (missing bar = skipped or failed"
                 + (f"; not run: {', '.join(absent)}" if absent else "") + ")")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=synth.PRESETS)
    ap.add_argument("--data", type=Path,
                    help="directory holding base/ and ft1..ftN/ (generated if missing)")
    ap.add_argument("--from-json", type=Path,
                    help="run nothing: make --plot and --summary-md from an earlier run's JSON")
    ap.add_argument("--methods", default="average,task_arithmetic,ties,dare")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--n-finetunes", type=int, default=3)
    ap.add_argument("--dtype", choices=sorted(synth.DTYPES), default="bf16",
                    help="dtype used if the data has to be generated")
    ap.add_argument("--json", type=Path, default=Path("results.json"))
    ap.add_argument("--plot", type=Path, help="write a PNG bar plot here")
    ap.add_argument("--summary-md", action="store_true", help="print a Markdown table")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit", help="path to a mergekit-yaml executable")
    ap.add_argument("--keep-outputs", action="store_true",
                    help="keep merged models (default: delete each after measuring)")
    ap.add_argument("--layers", type=int, default=None,
                    help="generate the preset with this many layers (per stack for mt5-xl) instead of its own")
    ap.add_argument("--device", default="cpu", help="tensormerge's --device (cpu, cuda, cuda:N)")
    ap.add_argument("--cold", action="store_true",
                    help="tensormerge only, inputs evicted from the page cache before every run, next to "
                         "the cold read floor")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where the merged outputs and the floor's write go (default DATA/bench-out); "
                         "another device than the inputs' (e.g. /dev/shm) isolates the reads")
    ap.add_argument("--repeats", type=int, default=None,
                    help="--cold: floor + every method this many times (default 2)")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or 2
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.from_json is None and (args.preset is None or args.data is None):
        ap.error("--preset and --data are required (unless --from-json)")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(MERGEKIT_METHODS)
    if unknown:
        ap.error(f"unknown methods: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        if args.plot:
            plot(results, args.plot)
        if args.summary_md:
            print(cold_summary_markdown(results) if "cold" in results else summary_markdown(results))
        return 0
    args.data.mkdir(parents=True, exist_ok=True)
    base, fts, gen_s = ensure_data(args)
    stats = model_stats(base)
    out_dir = args.out_dir / "bench-out" if args.out_dir else args.data / "bench-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = [p for d in [base, *fts] for p in model_files(d)]

    results = {
        "preset": args.preset, "data": str(args.data), "n_finetunes": len(fts),
        "max_memory": args.max_memory, "generation_s": gen_s, "device": args.device,
        "machine": machine_info(args.data), "model": stats,
    }
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    save = lambda: args.json.write_text(json.dumps(results, indent=2) + "\n")  # noqa: E731
    if args.cold:
        results["tensormerge_import_error"] = tensormerge_import_error()
        if results["tensormerge_import_error"]:
            save()
            print(f"tensormerge does not import: {results['tensormerge_import_error']}", file=sys.stderr)
            return 1
        run_cold(args, base, fts, stats, inputs, out_dir, results, save, log)
        if not args.keep_outputs:
            shutil.rmtree(out_dir, ignore_errors=True)
        if args.summary_md:
            print(cold_summary_markdown(results))
        return 0
    log("measuring I/O floor")
    results["io_floor"] = io_floor(inputs, stats["file_bytes"], out_dir)
    save()
    results["tensormerge_import_error"] = tensormerge_import_error()
    mk_cmd = None if args.skip_mergekit else mergekit_command(args.mergekit)
    results["mergekit_command"] = mk_cmd

    results["methods"] = {}
    for method in args.methods:
        entry = results["methods"][method] = {}
        log(f"{method}: tensormerge")
        entry["tensormerge"] = (
            {"error": results["tensormerge_import_error"]}
            if results["tensormerge_import_error"] else
            run_tensormerge(method, base, fts, out_dir, stats, args.max_memory,
                            args.keep_outputs, args.device))
        log(f"{method}: naive")
        entry["naive"] = ({"skipped": "--skip-naive"} if args.skip_naive else
                          run_naive(method, base, fts, out_dir, stats, args.keep_outputs))
        log(f"{method}: mergekit")
        entry["mergekit"] = ({"skipped": "--skip-mergekit"} if args.skip_mergekit else
                             run_mergekit(mk_cmd, method, base, fts, out_dir, stats["dtype"],
                                          args.keep_outputs))
        save()  # partial results survive an interrupted run

    if not args.keep_outputs:
        shutil.rmtree(out_dir, ignore_errors=True)
    if args.plot:
        plot(results, args.plot)
    if args.summary_md:
        print(summary_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
