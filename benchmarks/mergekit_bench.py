"""mergekit's own recipes, side by side: mergekit vs ``tensormerge run --config``.

For one synthetic family (base + 3 fine-tunes, see synth.py) this writes four recipes in the
style of mergekit's examples/ (task_arithmetic, ties, dare_ties, slerp; dtype bfloat16,
base_model, per-model weight/density, the examples' gradients and filters), then, in one run:

  - the I/O floor: one warm read of every input the recipes read + one fsync'ed write of one
    model's worth of bytes,
  - each recipe merged by mergekit-yaml (the shard setting given by --mergekit-args),
  - the same recipe file merged by ``python -m tensormerge run --config``,

recording wall time and peak RSS of each child's process tree (run_bench.run_measured), and
checks that the two outputs agree within bf16 rounding on a few tensors. Writes JSON and
prints a Markdown table.

  python benchmarks/mergekit_bench.py --data /tmp/i14-bench-data/llama-1.1b --out res.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_bench as rb  # noqa: E402
from io_floor import write_fsynced  # noqa: E402
import synth  # noqa: E402

RECIPES = ("task_arithmetic", "ties", "dare_ties", "slerp")
# Default mergekit flags: its default --out-shard-size (5B parameters: one output shard for a
# 1.1B model, the fewest files), no tokenizer (the synthetic family has none), no model card.
MERGEKIT_ARGS = "--no-copy-tokenizer --no-write-model-card --quiet --random-seed 0"


def recipes(base: Path, fts: list[Path], layers: int) -> dict[str, dict]:
    """The four recipes, shaped like mergekit's examples/ (ties.yml, gradient-slerp.yml, the
    README's dare_ties) with this family's paths and layer count."""
    b, (f1, f2, f3) = str(base), [str(f) for f in fts[:3]]
    return {
        "task_arithmetic": {
            "models": [{"model": f, "parameters": {"weight": w}} for f, w in ((f1, 0.3), (f2, 0.3), (f3, 0.3))],
            "merge_method": "task_arithmetic", "base_model": b, "dtype": "bfloat16"},
        "ties": {  # examples/ties.yml: a density gradient, a weight gradient, a filtered weight
            "models": [
                {"model": f1, "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                {"model": f2, "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                {"model": f3, "parameters": {"density": 0.33,
                                             "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
            ],
            "merge_method": "ties", "base_model": b,
            "parameters": {"normalize": True, "int8_mask": True}, "dtype": "bfloat16"},
        "dare_ties": {  # mergekit README's dare_ties example
            "models": [{"model": b}] + [
                {"model": f, "parameters": {"density": 0.53, "weight": w}}
                for f, w in ((f1, 0.4), (f2, 0.3), (f3, 0.3))],
            "merge_method": "dare_ties", "base_model": b,
            "parameters": {"int8_mask": True}, "dtype": "bfloat16"},
        "slerp": {  # examples/gradient-slerp.yml
            "slices": [{"sources": [{"model": b, "layer_range": [0, layers]},
                                    {"model": f1, "layer_range": [0, layers]}]}],
            "merge_method": "slerp", "base_model": b,
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                 {"value": 0.5}]},
            "dtype": "bfloat16"},
    }


def io_floor(inputs: list[Path], out_bytes: int, scratch: Path) -> dict:
    """One warm read of the inputs (after a warm-up read) + one fsync'ed write of out_bytes."""
    buf = bytearray(rb.READ_CHUNK)
    t0 = time.perf_counter()
    rb.read_all(inputs, buf)
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = rb.read_all(inputs, buf)
    read_s = time.perf_counter() - t0
    target = scratch / "io-floor-write.bin"
    t0 = time.perf_counter()
    write_fsynced(target, out_bytes, buf)
    write_s = time.perf_counter() - t0
    target.unlink()
    return {"input_bytes": n, "output_bytes": out_bytes, "warmup_read_s": warmup, "read_s": read_s,
            "write_s": write_s, "total_s": read_s + write_s}


def tensors(d: Path) -> dict[str, Path]:
    """Tensor name -> shard file of one checkpoint folder."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})
    return out


def load(index: dict[str, Path], name: str) -> torch.Tensor:
    with safe_open(str(index[name]), "pt") as h:
        return h.get_tensor(name)


def compare(a_dir: Path, b_dir: Path, base_dir: Path, names: list[str], random_drop: bool) -> dict:
    """Agreement of two outputs on a few tensors.

    Deterministic recipes: the fraction of entries more than one bf16 ulp (of the larger
    magnitude) apart. dare_ties draws different random masks in the two tools, so there the
    check is statistical: the fraction of entries each output leaves equal to the base, and the
    relative difference of the outputs' mean |out - base|.
    """
    ia, ib, ibase = tensors(a_dir), tensors(b_dir), tensors(base_dir)
    result = {"same_names": sorted(ia) == sorted(ib), "tensors": {}}
    for name in names:
        a, b = load(ia, name), load(ib, name)
        row = {"dtype_a": str(a.dtype), "dtype_b": str(b.dtype), "shape_equal": a.shape == b.shape}
        a32, b32 = a.float(), b.float()
        if random_drop:
            base = load(ibase, name).float()
            da, db = (a32 - base).abs(), (b32 - base).abs()
            row["at_base_a"] = float((da == 0).double().mean())
            row["at_base_b"] = float((db == 0).double().mean())
            row["mean_abs_delta_rel_diff"] = float(abs(da.double().mean() - db.double().mean())
                                                   / max(float(db.double().mean()), 1e-30))
        else:
            mag = torch.maximum(a32.abs(), b32.abs())
            ulp = torch.ldexp(torch.ones_like(mag), torch.frexp(mag).exponent - 8)  # bf16: 8 bits
            ulp = torch.where(mag > 0, ulp, torch.full_like(mag, 1e-30))
            off = (a32 - b32).abs() > ulp
            row["frac_over_1ulp"] = float(off.double().mean())
            row["max_abs_diff"] = float((a32 - b32).abs().max())
        result["tensors"][name] = row
    return result


def run_one(tool: str, recipe: str, cfg: Path, out: Path, mk_cmd: list[str], mk_args: list[str]) -> dict:
    if tool == "mergekit":
        cmd = mk_cmd + [str(cfg), str(out), *mk_args]
        env = None
    else:
        cmd = [sys.executable, "-m", "tensormerge", "run", "--config", str(cfg), "--output", str(out),
               "--quiet", "--overwrite", "--report", str(out) + ".report.json"]
        env = rb.tensormerge_env()
    run = rb.run_measured(cmd, env)
    res = {k: run[k] for k in ("returncode", "wall_s", "peak_rss_bytes", "peak_anon_bytes")}
    if run["returncode"] != 0:
        res["error"] = rb.tail(run["stderr"] or run["stdout"])
    rep = Path(str(out) + ".report.json")
    if rep.exists():
        try:
            report = json.loads(rep.read_text())
            res["report"] = {k: v for k, v in report.items() if not isinstance(v, list)}
        except ValueError:
            pass
    return res


def markdown(res: dict) -> str:
    fl = res["floor"]["total_s"]
    lines = [f"I/O floor {fl:.1f} s (warm read {res['floor']['read_s']:.1f} s of "
             f"{res['floor']['input_bytes'] / 1e9:.1f} GB + fsync'ed write {res['floor']['write_s']:.1f} s of "
             f"{res['floor']['output_bytes'] / 1e9:.1f} GB; slerp reads 2 of the 4 models, its floor "
             f"{res['floor_slerp']['total_s']:.1f} s)", "",
             "| recipe | mergekit s | x floor | mergekit peak RSS GB | tensormerge s | x floor | tensormerge peak RSS GB | speed-up | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["recipes"]:
        row = res["results"].get(r, {})
        mk, tm = row.get("mergekit", {}), row.get("tensormerge", {})
        floor = res["floor_slerp" if r == "slerp" else "floor"]["total_s"]
        target = 5.0 if r in ("ties", "dare_ties") else 2.0

        def cells(x):
            if not x or x.get("returncode") != 0:
                return ["failed" if x else "-"] * 3
            return [f"{min(x['wall_s_all']):.1f}", f"{min(x['wall_s_all']) / floor:.1f}",
                    f"{x['peak_rss_bytes'] / 1e9:.2f}"]
        mc, tc = cells(mk), cells(tm)
        if mk.get("returncode") == 0 and tm.get("returncode") == 0:
            sp = min(mk["wall_s_all"]) / min(tm["wall_s_all"])
            spc, met = f"{sp:.1f}x", "yes" if sp >= target else "**no**"
        else:
            spc, met = "-", "-"
        lines.append(f"| {r} | {' | '.join(mc)} | {' | '.join(tc)} | {spc} | {target:g}x | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with base/ ft1/ ft2/ ft3/ (synth.py)")
    ap.add_argument("--out", type=Path, required=True, help="JSON result file")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch for recipes and outputs")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool and recipe; the best is reported")
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml executable (default: PATH or import)")
    ap.add_argument("--mergekit-args", default=MERGEKIT_ARGS)
    ap.add_argument("--compare", type=int, default=4, help="tensors compared per recipe")
    ap.add_argument("--generate", choices=synth.PRESETS, default=None,
                    help="generate this preset into --data first if it is missing")
    args = ap.parse_args(argv)

    base, fts = synth.model_dirs(args.data, 3)
    if args.generate and not (base / "model.safetensors.index.json").exists():
        synth.generate(args.generate, args.data, 3, "bf16")
    mk_cmd = rb.mergekit_command(args.mergekit)
    if mk_cmd is None:
        print("mergekit is not importable", file=sys.stderr)
        return 2
    work = args.workdir or args.out.parent / "mergekit-bench-work"
    work.mkdir(parents=True, exist_ok=True)
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    chosen = [r for r in args.recipes.split(",") if r]
    all_recipes = recipes(base, fts, layers)
    files = {d: rb.model_files(d) for d in [base, *fts]}
    out_bytes = sum(p.stat().st_size for p in files[base])
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": rb.machine_info(args.data), "uptime_before": subprocess.run(
               ["uptime"], capture_output=True, text=True).stdout.strip(),
           "git_commit": rb.git_commit(), "data": str(args.data), "recipes": chosen,
           "repeats": args.repeats, "mergekit_cmd": mk_cmd, "mergekit_args": args.mergekit_args,
           "recipe_configs": {r: all_recipes[r] for r in chosen}, "results": {}}
    res["floor"] = io_floor([p for d in [base, *fts] for p in files[d]], out_bytes, work)
    res["floor_slerp"] = io_floor([p for d in [base, fts[0]] for p in files[d]], out_bytes, work)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    names = None
    for recipe in chosen:
        cfg = work / f"{recipe}.yaml"
        cfg.write_text(json.dumps(all_recipes[recipe], indent=2))  # JSON is YAML
        row = res["results"][recipe] = {}
        outs = {}
        for tool in ("mergekit", "tensormerge"):
            walls = []
            for rep in range(args.repeats):
                out = work / f"{tool}-{recipe}"
                if out.exists():
                    shutil.rmtree(out)
                r = run_one(tool, recipe, cfg, out, mk_cmd, args.mergekit_args.split())
                print(f"{recipe} {tool} run {rep + 1}: rc={r['returncode']} {r['wall_s']:.1f} s "
                      f"{r['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
                walls.append(r["wall_s"])
                if r["returncode"] != 0 or rep == 0 or r["wall_s"] <= min(walls):
                    peak = max(r["peak_rss_bytes"], row.get(tool, {}).get("peak_rss_bytes", 0))
                    r["peak_rss_bytes"] = peak
                    row[tool] = r
                if r["returncode"] != 0:
                    break
            row[tool]["wall_s_all"] = walls
            outs[tool] = work / f"{tool}-{recipe}"
            args.out.write_text(json.dumps(res, indent=2, default=str))
        if all(row[t]["returncode"] == 0 for t in outs):
            if names is None:
                idx = sorted(tensors(outs["mergekit"]))
                picks = [n for n in idx if "layers.0." in n and "q_proj" in n]
                picks += [n for n in idx if f"layers.{layers // 2}." in n and "down_proj" in n]
                picks += [n for n in idx if "norm" in n and "layers" not in n]
                picks += [n for n in idx if "embed" in n]
                names = picks[:args.compare]
            row["agreement"] = compare(outs["mergekit"], outs["tensormerge"], base, names,
                                       random_drop=recipe == "dare_ties")
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
            Path(str(o) + ".report.json").unlink(missing_ok=True)
        cfg.unlink(missing_ok=True)
        args.out.write_text(json.dumps(res, indent=2, default=str))
    res["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    res["markdown"] = markdown(res)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(res["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
