"""The statistics methods at mT5-XL shapes, end to end: checkpoints, `stats compute`, merges.

Builds an mT5-XL-shaped family with two encoder and two decoder layers (every width and the
full 250112 vocabulary: d_model 2048, d_ff 5120, 32 heads x 64; base and three fine-tunes, bf16
checkpoints from synth.py, config.json from transformers' MT5Config), computes each
fine-tune's statistics with ``tensormerge stats compute`` (K-FAC Grams, and the diagonal Fisher
from mini-batch gradients: the merge's cost does not depend on how the Fisher was estimated,
and per-example gradients of 1.25B parameters would dominate the run) on a few synthetic examples, then merges with mats (objective kfac, exactly
10 CG iterations: tol 0), regmean and fisher under ``--max-memory 4GiB``, each in a child
whose peak RSS is polled. Per block it reports seconds and GFLOP/s against this machine's
float32 matrix-product rate on the CG's own shapes, measured in the same run, and
extrapolates to the full 24+24 layers. Everything it wrote is deleted at the end (--keep
keeps it).

    python benchmarks/mt5xl_stats.py [--device cuda] [--out results/mt5xl-stats.json]
    python benchmarks/mt5xl_stats.py --quick     # miniature widths: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_bench  # noqa: E402
import synth  # noqa: E402

FULL_LAYERS = 24
XL = dict(d_model=2048, d_ff=5120, heads=32, d_kv=64, vocab=250112)
QUICK = dict(d_model=64, d_ff=160, heads=4, d_kv=16, vocab=1000)
GB = 1e9


# ------------------------------------------------------------------------------ the family
def write_family(root: Path, layers: int, dims: dict, examples: int, seq: int, log) -> dict:
    """base + ft1..ft3 (bf16) with an MT5Config config.json each, and a JSONL of token ids."""
    from transformers import MT5Config

    preset = synth.mt5_preset(layers, dims["d_model"], dims["d_ff"], dims["heads"], dims["d_kv"], dims["vocab"])
    t0 = time.perf_counter()
    synth.generate(preset, root, 3, "bf16", log=log)
    cfg = MT5Config(vocab_size=dims["vocab"], d_model=dims["d_model"], d_ff=dims["d_ff"], d_kv=dims["d_kv"],
                    num_heads=dims["heads"], num_layers=layers, num_decoder_layers=layers,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False).to_dict()
    cfg.update(architectures=["MT5ForConditionalGeneration"], torch_dtype="bfloat16")
    for d in ("base", "ft1", "ft2", "ft3"):
        (root / d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:  # ids 2.. (0 pad, 1 eos), eos-terminated like T5's tokenizer
        for _ in range(examples):
            f.write(json.dumps({"input_ids": [rng.randrange(2, dims["vocab"]) for _ in range(seq - 1)] + [1],
                                "labels": [rng.randrange(2, dims["vocab"]) for _ in range(seq // 2 - 1)] + [1]})
                    + "\n")
    return {"seconds": time.perf_counter() - t0, "params": sum(s.numel for s in preset.specs),
            "bytes_per_model": 2 * sum(s.numel for s in preset.specs)}


def disk_needed(dims: dict, layers: int) -> int:
    """Bytes this run holds at its peak: 4 bf16 checkpoints, 3 stores (float32 Grams; the Fisher
    of every weight, the embedding's mostly-zero rows compressed away), one merged output."""
    preset = synth.mt5_preset(layers, dims["d_model"], dims["d_ff"], dims["heads"], dims["d_kv"], dims["vocab"])
    params = sum(s.numel for s in preset.specs)
    grams = 0
    for s in preset.specs:
        if len(s.shape) == 2 and "relative_attention_bias" not in s.name and s.name not in ("shared.weight",):
            out, inp = s.shape
            grams += 4 * (inp * inp + (out * out if s.name != "lm_head.weight" else 0))
    fisher = 4 * (params - dims["vocab"] * dims["d_model"])  # the shared embedding's rows: ~all zero
    return 5 * 2 * params + 3 * (grams + fisher)


# ------------------------------------------------------------------------------ the floor
def matmul_rates(shapes: list[tuple[int, int]], device: str, repeats: int) -> list[dict]:
    """float32 rate of the two products of one K-FAC matvec on each [out, in] block shape
    (G_out[out,out] @ X[out,in] and X @ G_in[in,in]), best of `repeats`, with torch's threads and
    with one thread. The CG's products run on every core (kernels/linalg.py: a thread per model
    and row block), so the all-threads rate is the one a block is held against."""
    rows = []
    threads = torch.get_num_threads()
    configs = [("default", threads), ("1 thread", 1)] if device == "cpu" else [("device", threads)]
    for label, n in configs:
        torch.set_num_threads(n)
        for out, inp in shapes:
            g = torch.Generator().manual_seed(0)
            a = torch.randn(out, out, generator=g).to(device)
            x = torch.randn(out, inp, generator=g).to(device)
            b = torch.randn(inp, inp, generator=g).to(device)
            flops = 2 * out * out * inp + 2 * out * inp * inp
            best = float("inf")
            for _ in range(repeats + 1):  # the first is a warm-up
                _sync(device)
                t0 = time.perf_counter()
                (a @ x) @ b
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            rows.append({"shape": [out, inp], "threads": label, "n_threads": n, "s": best,
                         "gflops": flops / best / 1e9})
    torch.set_num_threads(threads)
    return rows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------ flops per block
def block_class(name: str, shape: list[int]) -> str:
    """q (every 2048x2048 projection), wi (5120x2048), wo (2048x5120), or the rest."""
    if name in ("shared.weight", "lm_head.weight"):
        return name.split(".")[0]
    if len(shape) != 2 or "relative_attention_bias" in name:
        return "other"
    if ".layer." in name and shape[0] == shape[1]:
        return "attn"
    if "wi_" in name:
        return "wi"
    if name.endswith("wo.weight"):
        return "wo"
    return "other"


def block_flops(method: str, shape: list[int], n: int, matvecs: int) -> float | None:
    """Useful float operations of one block (as stats_bench.py counts them)."""
    if len(shape) != 2:
        return None
    out, inp = shape
    if method == "mats":
        return matvecs * n * (2 * out * out * inp + 2 * out * inp * inp)
    if method == "regmean":
        return n * out * inp * inp * 2 + inp ** 3 / 3 + 2 * out * inp * inp
    return None


# ------------------------------------------------------------------------------ runs
def tm_env() -> dict:
    return run_bench.tensormerge_env()


KIND = {"mats": "kfac", "regmean": "gram", "fisher": "fisher"}


def stats_kind(methods: list[str]) -> str:
    """The one --kind the methods need, or all (K-FAC's Grams include RegMean's)."""
    kinds = {KIND[m] for m in methods}
    if kinds <= {"kfac", "gram"}:
        return "kfac" if "kfac" in kinds else "gram"
    return kinds.pop() if len(kinds) == 1 else "all"


def stats_compute(model: Path, data: Path, store: Path, device: str, max_memory: str, kind: str) -> dict:
    cmd = [sys.executable, "-m", "tensormerge", "stats", "compute", "--model", str(model), "--data", str(data),
           "--kind", kind, "--fisher-mode", "squared-batch", "--batch-size", "8", "-o", str(store), "--device", device, "--max-memory", max_memory, "--quiet",
           "--overwrite"]
    run = run_bench.run_measured(cmd, tm_env())
    res = {k: run[k] for k in ("returncode", "wall_s", "peak_rss_bytes", "peak_anon_bytes")}
    if run["returncode"] != 0:
        res["error"] = run_bench.tail(run["stderr"] or run["stdout"])
    res["store_bytes"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) if store.exists() else 0
    return res


def merge(method: str, root: Path, stores: list[Path], device: str, max_memory: str, iterations: int) -> dict:
    out, report = root / f"out-{method}", root / f"out-{method}.report.json"
    fts = ",".join(str(root / f"ft{i}") for i in (1, 2, 3))
    cmd = [sys.executable, "-m", "tensormerge", "run", "-m", method, "-i", fts, "-b", str(root / "base"),
           "--stats", ",".join(map(str, stores)), "--max-memory", max_memory, "--device", device,
           "-o", str(out), "--report", str(report), "--quiet", "--overwrite"]
    if method == "mats":
        cmd += ["-p", "objective=kfac", "-p", f"iterations={iterations}", "-p", "tol=0"]
    run = run_bench.run_measured(cmd, tm_env())
    res = {k: run[k] for k in ("returncode", "wall_s", "peak_rss_bytes", "peak_anon_bytes")}
    if run["returncode"] != 0:
        res["error"] = run_bench.tail(run["stderr"] or run["stdout"])
    if report.exists():
        res["report"] = json.loads(report.read_text())
        report.unlink()
    shutil.rmtree(out, ignore_errors=True)
    return res


def per_block(method: str, rep: dict, iterations: int, rate_1t: dict) -> dict:
    """Seconds and GFLOP/s per block class (median over the blocks of that class)."""
    matvecs = iterations + 2  # initial residual, the iterations, the recomputed final residual
    classes: dict[str, list[dict]] = {}
    for b in rep["blocks"]:
        classes.setdefault(block_class(b["name"], b["shape"]), []).append(b)
    rows = {}
    for cls, blocks in classes.items():
        secs = [b["seconds"] for b in blocks]
        flops = [block_flops(method, b["shape"], 3, matvecs) for b in blocks]
        row = {"blocks": len(blocks), "shape": blocks[0]["shape"], "median_s": statistics.median(secs),
               "sum_s": sum(secs), "cg_iterations": sorted({b.get("cg_iterations") for b in blocks} - {None})}
        if cls in ("attn", "wi", "wo") and all(f is not None for f in flops):
            g = [f / s / 1e9 for f, s in zip(flops, secs) if s > 0]
            row["median_gflops"] = statistics.median(g)
            ref = rate_1t.get(tuple(blocks[0]["shape"]))
            if ref:
                row["matmul_gflops"] = ref
                row["fraction_of_matmul"] = row["median_gflops"] / ref
        rows[cls] = row
    return rows


def extrapolate(rep: dict, layers: int) -> dict:
    """The full 24+24-layer merge: layer blocks scale with the layer count, the rest (embeddings,
    lm_head, final norms, the first layers' relative-attention biases) stays; the wall time
    scales like the block-seconds it is made of (the engine overlaps blocks the same way)."""
    layer_s = sum(b["seconds"] for b in rep["blocks"] if ".block." in b["name"]
                  and "relative_attention_bias" not in b["name"])
    total_s = sum(b["seconds"] for b in rep["blocks"]) or 1.0
    frac = layer_s / total_s
    factor = 1 + (FULL_LAYERS / layers - 1) * frac
    return {"layer_block_fraction": frac, "factor": factor, "seconds": rep["seconds"] * factor,
            "measured_seconds": rep["seconds"]}


# ------------------------------------------------------------------------------ report
def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"mT5-XL-shaped family, {res['layers']}+{res['layers']} layers ({res['family']['params'] / 1e9:.2f}B "
             f"params per model, bf16), {res['examples']} examples x {res['seq_len']} tokens; --device "
             f"{res['device']}, --max-memory {res['max_memory']}; {m['cpu_model']}, {m['cpu_cores']} cores, torch "
             f"{m['torch']} ({m['torch_threads']} threads); load average before {res['loadavg_before']}, after "
             f"{res['loadavg_after']}.", "",
             "float32 matrix products of a K-FAC matvec, (G_out @ X) @ G_in, in the same run:", "",
             "| block [out,in] | threads | s | GFLOP/s |", "|---|---|---|---|"]
    for r in res["matmul"]:
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['threads']} | {r['s']:.3f} | {r['gflops']:.1f} |")
    lines += ["", "| step | seconds | peak RSS GB | notes |", "|---|---|---|---|"]
    for i, s in enumerate(res["stats"], 1):
        lines.append(f"| stats compute ft{i} (--kind {res['stats_kind']}) | {s['wall_s']:.1f} | {s['peak_rss_bytes'] / GB:.2f} | "
                     f"store {s['store_bytes'] / GB:.2f} GB{'; FAILED' if s['returncode'] else ''} |")
    for method, r in res["merges"].items():
        rep = r.get("report") or {}
        ext = r.get("extrapolated") or {}
        lines.append(f"| {method} merge | {rep.get('seconds', r['wall_s']):.1f} | "
                     f"{(rep.get('peak_rss_bytes') or r['peak_rss_bytes']) / GB:.2f} | "
                     + (f"24+24 layers: ~{ext['seconds'] / 60:.1f} min" if ext else "FAILED") + " |")
    lines += ["", "| method | block class | blocks | shape | median s | median GFLOP/s | matmul GFLOP/s (all threads) "
              "| fraction |", "|---|---|---|---|---|---|---|---|"]
    for method, r in res["merges"].items():
        for cls, row in (r.get("blocks") or {}).items():
            if cls == "other":
                continue
            fmt = lambda key, spec: "-" if row.get(key) is None else format(row[key], spec)  # noqa: E731
            lines.append(f"| {method} | {cls} | {row['blocks']} | {row['shape'][0]}x{row['shape'][1]} | "
                         f"{row['median_s']:.2f} | {fmt('median_gflops', '.1f')} | {fmt('matmul_gflops', '.1f')} | "
                         f"{fmt('fraction_of_matmul', '.2f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "tensormerge-mt5xl-stats",
                    help="working directory (created; deleted at the end unless --keep)")
    ap.add_argument("--layers", type=int, default=2, help="encoder layers, and as many decoder layers")
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=32, help="input tokens per example (labels: half)")
    ap.add_argument("--iterations", type=int, default=10, help="mats CG iterations (tol 0: exactly these)")
    ap.add_argument("--methods", default="mats,regmean,fisher")
    ap.add_argument("--max-memory", default="4GiB")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="matmul timings: best of this many")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mt5xl-stats.json")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and stores")
    ap.add_argument("--quick", action="store_true", help="miniature widths (smoke test)")
    ap.add_argument("--reuse", action="store_true",
                    help="merge again from the family and stores an earlier --keep run left in --data (its "
                         "stats compute results are taken from --out)")
    args = ap.parse_args(argv)
    dims = QUICK if args.quick else XL
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - set(KIND):
        ap.error(f"--methods: choose from {', '.join(KIND)}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    root = args.data
    earlier = None
    if args.reuse:
        if not all((root / d).is_dir() for d in ("base", "ft1", "ft2", "ft3", "ft1.zarr", "ft2.zarr", "ft3.zarr")):
            ap.error(f"--reuse: {root} does not hold the family and stores of a --keep run")
        earlier = json.loads(args.out.read_text())
    elif root.exists() and any(root.iterdir()):
        ap.error(f"--data {root} exists and is not empty (this script deletes what it writes there)")
    root.mkdir(parents=True, exist_ok=True)
    need, free = disk_needed(dims, args.layers), shutil.disk_usage(root).free
    if not args.reuse and need > 0.9 * free:
        ap.error(f"needs ~{need / GB:.1f} GB of disk under {root}, {free / GB:.1f} GB free")
    res = {"quick": args.quick, "layers": args.layers, "examples": args.examples, "seq_len": args.seq_len,
           "iterations": args.iterations, "device": args.device, "max_memory": args.max_memory,
           "dims": dims, "disk_needed_bytes": need, "stats_kind": stats_kind(methods), "machine": run_bench.machine_info(root),
           "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    save = lambda: (args.out.parent.mkdir(parents=True, exist_ok=True),  # noqa: E731
                    args.out.write_text(json.dumps(res, indent=2) + "\n"))
    try:
        if earlier is not None:
            res["family"], res["reused_from"] = earlier["family"], str(args.out)
            res["stats_kind"] = earlier["stats_kind"]
        else:
            log("writing the family")
            res["family"] = write_family(root, args.layers, dims, args.examples, args.seq_len, log)
        shapes = [(dims["d_model"], dims["heads"] * dims["d_kv"]), (dims["d_ff"], dims["d_model"]),
                  (dims["d_model"], dims["d_ff"])]
        log("matrix products")
        res["matmul"] = matmul_rates(shapes, args.device, args.repeats)
        rate_1t = {tuple(r["shape"]): r["gflops"] for r in res["matmul"]
                   if r["threads"] in ("default", "device")}
        save()
        res["stats"], stores = [], []
        for i in (1, 2, 3):
            store = root / f"ft{i}.zarr"
            if earlier is not None:
                res["stats"].append(earlier["stats"][i - 1])
                stores.append(store)
                continue
            log(f"stats compute ft{i}")
            res["stats"].append(stats_compute(root / f"ft{i}", root / "data.jsonl", store, args.device,
                                              args.max_memory, res["stats_kind"]))
            stores.append(store)
            save()
            if res["stats"][-1]["returncode"] != 0:
                raise RuntimeError(f"stats compute ft{i} failed: {res['stats'][-1]['error']}")
        res["merges"] = {}
        for method in methods:
            log(f"merge {method}")
            r = merge(method, root, stores, args.device, args.max_memory, args.iterations)
            if r.get("report"):
                rep = r["report"]
                r["blocks"] = per_block(method, rep, args.iterations, rate_1t)
                r["extrapolated"] = extrapolate(rep, args.layers)
                r["report"] = {k: rep.get(k) for k in ("seconds", "merge_seconds", "peak_rss_bytes",
                                                       "peak_anon_bytes", "bytes_read", "bytes_written",
                                                       "kernels", "summary")}
            res["merges"][method] = r
            save()
        res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        res["markdown"] = markdown(res)
        save()
        print(res["markdown"])
        failed = [m for m, r in res["merges"].items() if r["returncode"] != 0]
        if failed:
            log(f"failed: {', '.join(failed)}")
            return 1
        return 0
    finally:
        if not args.keep and not args.reuse:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
