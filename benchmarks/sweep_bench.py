"""Benchmark `tensormerge sweep` (issue 14): M candidates from one read, against M runs.

For one synthetic preset (synth.py) and each swept method (a 4-value lambda sweep of
task_arithmetic, a 4-value k sweep of TIES by default) this measures, in one run and on the
same files, repeated `--repeats` times:

  (a) the sweep's I/O floor: one read of every input (after a warm-up read, as run_bench.py's
      floor) plus M fsync'ed writes of one model's worth each (a merge fsyncs its shards),
  (b) `python -m tensormerge sweep ... -p PARAM=v1,...,vM` in a child,
  (c) M separate `python -m tensormerge run ... -p PARAM=vi` children, one after the other,
  (d) M `mergekit-yaml` runs with the equivalent configs, when mergekit is available,

recording wall time, CPU seconds (user + system of the child tree) and peak RSS of the child's
process tree for each. The engine's own clock (sweep.json's merge_seconds, the run's report
seconds) leaves out the interpreter's start-up, which is measured too (importing the cli and api,
which import torch and every method).
With --verify the model files of each run are compared byte for byte with the sweep's
candidate of the same parameters. Writes JSON and, with --summary-md, a Markdown table.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_bench as rb  # noqa: E402
from io_floor import write_fsynced  # noqa: E402
import synth  # noqa: E402

GB = rb.GB
PARAM = {"task_arithmetic": "lambda", "ties": "k"}
DEFAULT_VALUES = {"task_arithmetic": "0.2,0.3,0.5,0.7", "ties": "0.1,0.2,0.3,0.5"}
# The targets: the sweep within this many times its floor / under this fraction of M runs.
TARGET_X_FLOOR = {"task_arithmetic": 1.3}
TARGET_OF_RUNS = 0.5


# --------------------------------------------------------------------------
# measurements


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """run_bench.run_measured plus the CPU seconds of the child tree (rusage of waited children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = rb.run_measured(cmd, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return run


def entry(run: dict) -> dict:
    """The numbers of one child, without its output (its error's tail on failure)."""
    out = {k: run[k] for k in ("returncode", "wall_s", "cpu_s", "peak_rss_bytes", "peak_anon_bytes")}
    if run["returncode"] != 0:
        out["error"] = rb.tail(run["stderr"] or run["stdout"])
    return out


def sweep_floor(inputs: list[Path], out_bytes: int, n_out: int, scratch: Path) -> dict:
    """One read of the inputs (warm, after a warm-up read when they fit in RAM, like
    run_bench.io_floor) plus n_out fsync'ed writes of one model's bytes, all kept on disk until
    the last is written (as the sweep's outputs are)."""
    buf = bytearray(rb.READ_CHUNK)
    cpu0 = time.process_time()
    in_bytes = sum(p.stat().st_size for p in inputs)
    warm = in_bytes <= rb.WARM_RAM_FRACTION * psutil.virtual_memory().available
    result = {"input_bytes": in_bytes, "output_bytes": out_bytes, "n_outputs": n_out, "warm_cache": warm}
    if warm:
        t0 = time.perf_counter()
        rb.read_all(inputs, buf)
        result["warmup_read_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rb.read_all(inputs, buf)
    result["read_s"] = time.perf_counter() - t0
    targets = [scratch / f"sweep-floor-{i}.bin" for i in range(n_out)]
    writes = []
    try:
        for t in targets:
            t0 = time.perf_counter()
            write_fsynced(t, out_bytes, buf)
            writes.append(time.perf_counter() - t0)
    finally:
        for t in targets:
            t.unlink(missing_ok=True)
    result.update({"write_s": writes, "read_GBps": in_bytes / GB / result["read_s"],
                   "write_GBps": n_out * out_bytes / GB / sum(writes),
                   "total_s": result["read_s"] + sum(writes),
                   # CPU of this process over the floor (warm-up included): how little of it needs a core
                   "cpu_s": time.process_time() - cpu0,
                   # what one run must do at least: the read and one fsync'ed write
                   "one_run_s": result["read_s"] + sum(writes) / n_out})
    return result


def common_args(base: Path, fts: list[Path], max_memory: str) -> list[str]:
    return ["--base", str(base), "--inputs", ",".join(map(str, fts)), "--max-memory", max_memory, "--quiet"]


def run_sweep(method: str, values: list[str], base: Path, fts: list[Path], out: Path,
              max_memory: str) -> tuple[dict, dict]:
    """The sweep in a child; (its numbers, {value: candidate directory})."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tensormerge", "sweep", "--method", method, *common_args(base, fts, max_memory),
           "-p", f"{PARAM[method]}={','.join(values)}", "--output", str(out), "--no-plot"]
    run = measured(cmd, rb.tensormerge_env())
    result = entry(run)
    dirs = {}
    sweep_json = out / "sweep.json"
    if run["returncode"] == 0 and sweep_json.exists():
        state = json.loads(sweep_json.read_text())
        cands = state["candidates"]
        result["candidates"] = [{k: c.get(k) for k in ("name", "params", "merge_seconds", "status")}
                                for c in cands]
        # every candidate of a group shares one clock: the group's merge took the longest one's
        result["engine_s"] = max((c.get("merge_seconds") or 0.0) for c in cands)
        for c in cands:
            dirs[str(c["swept"][PARAM[method]])] = Path(c["output"])
        if sorted(dirs) != sorted(values) or any(c.get("status") != "merged" for c in cands):
            result["error"] = f"candidates: {[(c['name'], c.get('status')) for c in cands]}"
            result["returncode"] = result["returncode"] or 1
    return result, dirs


def same_model(a: Path, b: Path) -> bool:
    """Byte equality of the model files (shards and index); the side files hold times and paths."""
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    other = sorted(p.name for p in b.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    return bool(names) and names == other and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def run_runs(method: str, values: list[str], base: Path, fts: list[Path], out_dir: Path, max_memory: str,
             sweep_dirs: dict | None) -> dict:
    """M `tensormerge run`s, one after the other; each compared with the sweep's candidate when
    sweep_dirs is given, then deleted."""
    each = []
    for v in values:
        output = out_dir / f"run-{method}-{v}"
        report = out_dir / f"run-{method}-{v}.report.json"
        shutil.rmtree(output, ignore_errors=True)
        cmd = [sys.executable, "-m", "tensormerge", "run", "--method", method, *common_args(base, fts, max_memory),
               "-p", f"{PARAM[method]}={v}", "--output", str(output), "--report", str(report), "--overwrite"]
        run = measured(cmd, rb.tensormerge_env())
        e = {"value": v, **entry(run)}
        if report.exists():
            rep = json.loads(report.read_text())
            e["engine_s"] = rep.get("seconds")
            e["passes"] = [{k: p.get(k) for k in ("name", "seconds", "bytes_read")} for p in rep.get("passes") or []]
            report.unlink()
        if sweep_dirs is not None and run["returncode"] == 0 and v in sweep_dirs:
            e["identical_to_sweep"] = same_model(output, sweep_dirs[v])
        shutil.rmtree(output, ignore_errors=True)
        each.append(e)
    return summed(each)


def summed(each: list[dict]) -> dict:
    ok = all(e.get("returncode") == 0 for e in each)
    out = {"each": each, "returncode": 0 if ok else 1}
    if ok:
        for key in ("wall_s", "cpu_s", "engine_s"):
            if all(e.get(key) is not None for e in each):
                out[key] = sum(e[key] for e in each)
        out["peak_rss_bytes"] = max(e["peak_rss_bytes"] for e in each)
        out["peak_anon_bytes"] = max(e["peak_anon_bytes"] for e in each)
    return out


def run_mergekits(cmd: list[str] | None, method: str, values: list[str], base: Path, fts: list[Path],
                  out_dir: Path, dtype: str, n_values: int | None = None) -> dict:
    """M mergekit-yaml runs with run_bench's config of the method, the swept value in place:
    task_arithmetic's weight (lambda, no normalisation), TIES' density (k; weight 1; mergekit
    trims per tensor, not globally). With `n_values` < M only the first n_values run and the
    M runs' wall and CPU seconds are extrapolated from their mean (marked as such): a mergekit
    TIES run takes ~6 minutes here, and its time does not depend on the value."""
    if cmd is None:
        return {"skipped": "not installed"}
    each = []
    for v in values[:n_values]:
        config = rb.mergekit_config(method, base, fts, dtype)
        for m in config["models"]:
            m["parameters"] = {**m["parameters"], ("weight" if method == "task_arithmetic" else "density"): float(v)}
        cfg = out_dir / f"mergekit-{method}-{v}.yaml"
        output = out_dir / f"mergekit-{method}-{v}"
        cfg.write_text(json.dumps(config, indent=2))
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        run = measured(cmd + [str(cfg), str(output), "--lazy-unpickle", "--no-copy-tokenizer", "--quiet",
                              "--random-seed", "0"], env)
        cfg.unlink()
        shutil.rmtree(output, ignore_errors=True)
        each.append({"value": v, **entry(run)})
    out = summed(each)
    if len(each) < len(values) and out.get("returncode") == 0:
        scale = len(values) / len(each)
        out.update(measured_values=len(each), measured_wall_s=out["wall_s"], wall_s=out["wall_s"] * scale,
                   cpu_s=out["cpu_s"] * scale, extrapolated=True)
    return out


def load_average() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"load_1m": one, "load_5m": five, "load_15m": fifteen, "cores": os.cpu_count()}


# --------------------------------------------------------------------------
# reporting


def _f(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def derived(rep: dict, method: str) -> dict:
    """Ratios of one repetition of one method: against its floor (measured in the same
    repetition) and against the M runs."""
    m = rep["methods"][method]
    sw, runs, mk = m.get("sweep", {}), m.get("runs", {}), m.get("mergekit", {})  # {}: not measured yet
    floor = rep["floor"]["total_s"]
    start = rep["startup"]["wall_s"]
    d = {}
    if sw.get("returncode") == 0:
        d["sweep_x_floor"] = sw["wall_s"] / floor
        d["sweep_engine_x_floor"] = sw.get("engine_s") and sw["engine_s"] / floor
        d["sweep_minus_startup_x_floor"] = (sw["wall_s"] - start) / floor
        if runs.get("returncode") == 0:
            d["speedup_wall"] = runs["wall_s"] / sw["wall_s"]
            d["speedup_cpu"] = runs["cpu_s"] / sw["cpu_s"]
            d["sweep_of_runs"] = sw["wall_s"] / runs["wall_s"]
        if mk.get("returncode") == 0:
            d["speedup_over_mergekit"] = mk["wall_s"] / sw["wall_s"]
    return d


def summary_markdown(results: dict) -> str:
    """The README's table: one row per method and repetition, then the best of each column."""
    machine, budget = results["machine"], results["max_memory"]
    lines = [
        f"Preset `{results['preset']}`: {results['n_finetunes']} fine-tunes + base, "
        f"{rb.param_count(results['model']['params'])} params ({results['model']['dtype']}, "
        f"{results['model']['file_bytes'] / GB:.2f} GB per model); {machine['cpu_model']}, "
        f"{machine['cpu_cores']} cores, {machine['ram_total_bytes'] / 2**30:.0f} GiB RAM; "
        f"--max-memory {budget}; commit {str(machine.get('git_commit'))[:7]}; {machine['date']}.",
        "",
        "| method, values | rep | load (1 min) | floor s | sweep s | x floor | sweep CPU s | "
        f"{results['n_candidates']} runs s | sweep / runs | speed-up (CPU) | mergekit s | sweep peak RSS GB "
        "| runs peak RSS GB | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in results["swept"]:
        values = ",".join(results["values"][method])
        for i, rep in enumerate(results["repeats"]):
            m = rep["methods"].get(method)
            if m is None or "floor" not in rep:
                continue
            sw, runs, mk = m.get("sweep", {}), m.get("runs", {}), m.get("mergekit", {"skipped": "not yet"})
            d = derived(rep, method)
            ident = [e.get("identical_to_sweep") for e in runs.get("each", [])]
            mk_cell = (mk["skipped"] if "skipped" in mk else
                       f"~{mk['wall_s']:.1f} ({mk['measured_values']} of {len(results['values'][method])} run: "
                       f"{mk['measured_wall_s']:.1f})" if mk.get("extrapolated") else
                       _f(mk.get("wall_s"), ".1f") if mk.get("returncode") == 0 else "failed")
            lines.append("| " + " | ".join([
                f"{method} {PARAM[method]}={values}", str(i + 1), f"{rep['load_before']['load_1m']:.1f}",
                f"{rep['floor']['total_s']:.1f}",
                _f(sw.get("wall_s"), ".1f") if sw.get("returncode") == 0 else "failed",
                _f(d.get("sweep_x_floor"), ".2f"), _f(sw.get("cpu_s"), ".1f"),
                (runs.get("skipped") or "not run") if "returncode" not in runs else
                _f(runs.get("wall_s"), ".1f") if runs.get("returncode") == 0 else "failed",
                _f(d.get("sweep_of_runs"), ".2f"),
                (_f(d.get("speedup_wall"), ".2f") + " (" + _f(d.get("speedup_cpu"), ".2f") + ")"),
                mk_cell,
                _f(sw.get("peak_rss_bytes"), ".2f", GB), _f(runs.get("peak_rss_bytes"), ".2f", GB),
                ("yes" if ident and all(ident) else "NO" if any(x is False for x in ident) else "-"),
            ]) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=synth.PRESETS)
    ap.add_argument("--data", type=Path, help="directory holding base/ and ft1..ftN/ (generated if missing)")
    ap.add_argument("--label", help="name the data in the table (default: the preset), e.g. for a subset of it")
    ap.add_argument("--from-json", type=Path, help="run nothing: print --summary-md of an earlier run's JSON")
    ap.add_argument("--methods", default="task_arithmetic,ties")
    ap.add_argument("--lambdas", default=DEFAULT_VALUES["task_arithmetic"], help="task_arithmetic's swept lambdas")
    ap.add_argument("--ks", default=DEFAULT_VALUES["ties"], help="TIES' swept k (global, the default scope)")
    ap.add_argument("--max-memory", default="4GiB", help="given to every tensormerge child (its default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="where outputs and the floor's writes go (default DATA); e.g. /dev/shm: outputs in "
                         "memory, to see the engine where the disk's write speed is not the bound")
    ap.add_argument("--n-finetunes", type=int, default=3)
    ap.add_argument("--dtype", choices=sorted(synth.DTYPES), default="bf16")
    ap.add_argument("--json", type=Path, default=Path("sweep-results.json"))
    ap.add_argument("--summary-md", action="store_true", help="print the Markdown table")
    ap.add_argument("--verify", action="store_true",
                    help="compare each run's model files with the sweep's candidate (the first repetition)")
    ap.add_argument("--skip-runs", action="store_true", help="no M separate runs (the sweep and its floor only)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit", help="path to a mergekit-yaml executable")
    ap.add_argument("--mergekit-repeats", type=int, default=1,
                    help="repetitions that also run mergekit (the first ones; it is slow)")
    ap.add_argument("--mergekit-values", type=int, default=None,
                    help="run mergekit for the first N values only and extrapolate M runs from their mean")
    args = ap.parse_args(argv)
    if args.from_json is None and (args.preset is None or args.data is None):
        ap.error("--preset and --data are required (unless --from-json)")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(args.methods) - set(PARAM):
        ap.error(f"unknown methods: {', '.join(sorted(unknown))} (sweepable here: {', '.join(PARAM)})")
    args.values = {"task_arithmetic": [v.strip() for v in args.lambdas.split(",")],
                   "ties": [v.strip() for v in args.ks.split(",")]}
    if len({len(args.values[m]) for m in args.methods}) != 1:
        ap.error("--lambdas and --ks must have as many values (the floor writes that many outputs)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        print(summary_markdown(json.loads(args.from_json.read_text())))
        return 0
    args.data.mkdir(parents=True, exist_ok=True)
    base, fts, gen_s = rb.ensure_data(args)
    stats = rb.model_stats(base)
    out_dir = (args.out_dir or args.data) / "sweep-bench-out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    inputs = [p for d in [base, *fts] for p in rb.model_files(d)]
    n = len(args.values[args.methods[0]])
    results = {
        "preset": args.label or args.preset, "data": str(args.data), "output_dir": str(out_dir), "n_finetunes": len(fts), "max_memory": args.max_memory,
        "generation_s": gen_s, "machine": rb.machine_info(args.data), "model": stats, "swept": args.methods,
        "values": {m: args.values[m] for m in args.methods}, "n_candidates": n, "repeats": [],
    }
    if err := rb.tensormerge_import_error():
        raise SystemExit(f"tensormerge does not import: {err}")
    mk_cmd = None if args.skip_mergekit else rb.mergekit_command(args.mergekit)
    results["mergekit_command"] = mk_cmd
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    save = lambda: args.json.write_text(json.dumps(results, indent=2) + "\n")  # noqa: E731
    try:
        for r in range(args.repeats):
            rep = {"load_before": load_average(), "methods": {}}
            results["repeats"].append(rep)
            log(f"[{r + 1}/{args.repeats}] I/O floor (load {rep['load_before']['load_1m']:.1f})")
            rep["floor"] = sweep_floor(inputs, stats["file_bytes"], n, out_dir)
            rep["startup"] = entry(measured([sys.executable, "-c", "import tensormerge.cli, tensormerge.api"],
                                            rb.tensormerge_env()))
            save()
            for method in args.methods:
                values = args.values[method]
                m = rep["methods"][method] = {}
                log(f"[{r + 1}/{args.repeats}] {method}: sweep {PARAM[method]}={','.join(values)}")
                sweep_out = out_dir / f"sweep-{method}"
                m["sweep"], dirs = run_sweep(method, values, base, fts, sweep_out, args.max_memory)
                save()
                if args.skip_runs:
                    m["runs"] = {"skipped": "--skip-runs"}
                else:
                    log(f"[{r + 1}/{args.repeats}] {method}: {n} runs")
                    m["runs"] = run_runs(method, values, base, fts, out_dir, args.max_memory,
                                         dirs if args.verify and r == 0 else None)
                shutil.rmtree(sweep_out, ignore_errors=True)
                save()
                if args.skip_mergekit or r >= args.mergekit_repeats:
                    m["mergekit"] = {"skipped": "--skip-mergekit" if args.skip_mergekit else "not in this repetition"}
                else:
                    log(f"[{r + 1}/{args.repeats}] {method}: {n} mergekit runs")
                    m["mergekit"] = run_mergekits(mk_cmd, method, values, base, fts, out_dir, stats["dtype"],
                                                   args.mergekit_values)
                m["derived"] = derived(rep, method)
                save()
            rep["load_after"] = load_average()
            save()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if args.summary_md:
        print(summary_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
