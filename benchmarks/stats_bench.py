"""Per-block compute cost of the statistics methods (RegMean, MaTS K-FAC) on mT5-XL-shaped layers.

Synthetic statistics for N=3 models: input Grams A_i = X^T X / n of correlated activations
(n=2048 tokens: shared low-rank factors + noise, per-feature scales) plus a ridge of 1e-3 x the
mean diagonal so they are SPD (Cholesky path of the solver); output Grams B_i built the same
way; float32 weights W_i = base + small task vector, torch layout [out, in].

Measured with the kernels the engine calls (tensormerge.kernels.linalg):

- RegMean: `regmean_prepare` (once per weight: scaled Grams in float64, Cholesky of their sum)
  and `regmean_rows` over all rows with the engine's tile (plus a sweep of the tile on the q block), (a) as the engine runs it: torch.set_num_threads(1)
  and a pool of 2 worker threads, prepare on one worker, the rows split in two halves, and
  (b) in one thread with torch's default thread count.
  Flops: products N*out*in*in*2, factorisation in^3/3, triangular solves 2*out*in*in.
- MaTS K-FAC: `kfac_rhs` then `conjugate_gradient` with `kfac_apply` for exactly 10
  iterations (tol=0; 12 matvecs: initial residual, 10 iterations, recomputed final residual),
  torch's default thread count. Flops per matvec N*(2*out*out*in + 2*out*in*in).

Also measured in the same run: plain torch.matmul GFLOP/s (float32 and float64, default threads
and 1 thread). From the per-block medians it extrapolates a whole mT5-XL merge (assumptions in
the JSON and README). Every time is the median of --repeats runs.

    .venv/bin/python benchmarks/stats_bench.py [--quick] [--out results/stats-bench.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from run_bench import cpu_model, git_commit

from tensormerge.kernels.linalg import (
    conjugate_gradient,
    kfac_apply,
    kfac_rhs,
    regmean_prepare,
    regmean_rows,
    scale_offdiag,
)

RESULTS = Path(__file__).resolve().parent / "results"
N_MODELS = 3
ALPHA = 0.9
from tensormerge.methods.regmean import ROW_TILE as TILE  # the tile the engine uses
TOKENS = 2048
RIDGE = 1e-3
CG_ITERS = 10
WORKERS = 2

# mT5-XL: d_model 2048, d_ff 5120 (gated-gelu), 24 encoder + 24 decoder layers, vocab 250112.
D_MODEL, D_FF, VOCAB, LAYERS = 2048, 5120, 250112, 24
QUICK_SCALE = 16


def shapes(quick: bool) -> dict[str, tuple[int, int]]:
    d, f = (D_MODEL // QUICK_SCALE, D_FF // QUICK_SCALE) if quick else (D_MODEL, D_FF)
    return {"q": (d, d), "wi": (f, d), "wo": (d, f)}  # [out, in]


# encoder: self q,k,v,o + wi_0, wi_1, wo; decoder: self q,k,v,o + cross q,k,v,o + wi_0, wi_1, wo
BLOCK_COUNTS = {"q": LAYERS * 4 + LAYERS * 8, "wi": LAYERS * 2 + LAYERS * 2, "wo": LAYERS + LAYERS}

ASSUMPTIONS = [
    ("mT5-XL linear weights: 24 encoder layers (self-attention q,k,v,o 2048x2048; wi_0, wi_1 5120x2048; "
     "wo 2048x5120) and 24 decoder layers (self- and cross-attention q,k,v,o 2048x2048; wi_0, wi_1, wo): "
     "288 blocks of 2048x2048, 96 of 5120x2048, 48 of 2048x5120; all k/v/o cost the same as the measured q."),
    ("RegMean also merges the untied lm_head 250112x2048 (the MaTS code has a [2048,2048] Gram for it): "
     "one prepare of a 2048 Gram plus the 2048x2048 block's row time scaled by 250112/2048."),
    ("MaTS K-FAC averages lm_head (no output Gram); the shared embedding, layer norms and relative "
     "attention biases are averaged by both methods; averaging and all I/O (weights and statistics) "
     "are not counted: this is compute only."),
    ("CG runs exactly k iterations (no early stop): k+2 matvecs (initial and recomputed final "
     "residual) plus the right-hand side; time(k) = rhs + cg10 * (k+2)/12."),
    ("Grams are well conditioned (ridge 1e-3 x mean diagonal), so the solver takes the Cholesky path; "
     "a numerically singular sum of Grams falls back to eigh, which costs several times more."),
    ("engine configuration = torch.set_num_threads(1) with 2 worker threads: prepare on one worker "
     "(one thread), rows split between the two; whole-model time is the sum of per-block times "
     "(running two blocks at once instead gives about the same throughput)."),
]


# ----------------------------------------------------------------------------- data
def spd_gram(d: int, g: torch.Generator) -> torch.Tensor:
    k = max(8, d // 16)
    x = torch.randn(TOKENS, k, generator=g) @ (torch.randn(k, d, generator=g) / k**0.5)
    x += 0.5 * torch.randn(TOKENS, d, generator=g)
    x *= torch.exp(0.5 * torch.randn(d, generator=g))
    gram = x.T @ x / TOKENS
    gram.diagonal().add_(RIDGE * float(gram.diagonal().mean()))
    return gram


class Stats:
    """Lazily generated, cached synthetic statistics and weights (seeded per item)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.cache: dict = {}

    def _gen(self, *key) -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(repr((self.seed,) + key).encode()))

    def gram(self, side: str, d: int, i: int) -> torch.Tensor:
        key = ("gram", side, d, i)
        if key not in self.cache:
            self.cache[key] = spd_gram(d, self._gen(side, d, i))
        return self.cache[key]

    def weights(self, out: int, inp: int) -> list[torch.Tensor]:
        key = ("w", out, inp)
        if key not in self.cache:
            g = self._gen("w", out, inp)
            base = 0.02 * torch.randn(out, inp, generator=g)
            self.cache[key] = [base + 1e-3 * torch.randn(out, inp, generator=g) for _ in range(N_MODELS)]
        return self.cache[key]


# ----------------------------------------------------------------------------- timing
def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, result


class Threads:
    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def bench_matmul(repeats: int, quick: bool) -> list[dict]:
    d = D_MODEL // QUICK_SCALE if quick else D_MODEL
    rows = []
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        for m in (d, D_FF // QUICK_SCALE if quick else D_FF):
            a = torch.randn(m, d, generator=g, dtype=dtype)
            b = torch.randn(d, d, generator=g, dtype=dtype)
            for threads in (torch.get_num_threads(), 1):
                with Threads(threads):
                    a @ b  # warm-up
                    med, times, _ = timed(lambda a=a, b=b: a @ b, repeats)
                flops = 2 * m * d * d
                rows.append({"dtype": str(dtype).removeprefix("torch."), "shape": f"{m}x{d} @ {d}x{d}",
                             "threads": threads, "seconds": med, "runs": times, "gflops": flops / med / 1e9})
                log(f"matmul {rows[-1]['dtype']} {rows[-1]['shape']} threads {threads}: {rows[-1]['gflops']:.1f} GFLOP/s")
    return rows


def regmean_engine(inputs, grams, pool: ThreadPoolExecutor, tile: int = TILE):
    """prepare on one worker, then the rows split in two halves (tile-aligned) over the pool."""
    t0 = time.perf_counter()
    fac = pool.submit(regmean_prepare, grams, ALPHA, [1.0] * N_MODELS).result()
    t1 = time.perf_counter()
    rows = inputs[0].shape[0]
    mid = (rows // 2 + tile - 1) // tile * tile
    parts = [(0, mid), (mid, rows)]
    futs = [pool.submit(regmean_rows, [x[a:b] for x in inputs], fac, tile) for a, b in parts if b > a]
    out = torch.cat([f.result() for f in futs])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


def bench_regmean(st: Stats, name: str, out_dim: int, in_dim: int, repeats: int) -> dict:
    ws = st.weights(out_dim, in_dim)
    grams = [st.gram("in", in_dim, i) for i in range(N_MODELS)]
    flops = {"products": N_MODELS * out_dim * in_dim * in_dim * 2, "factor": in_dim**3 / 3,
             "solves": 2 * out_dim * in_dim * in_dim}
    flops["total"] = sum(flops.values())
    prep_s, prep_runs, fac = timed(lambda: regmean_prepare(grams, ALPHA, [1.0] * N_MODELS), repeats)
    rows_s, rows_runs, ref = timed(lambda: regmean_rows(ws, fac, TILE), repeats)
    assert bool(torch.isfinite(ref).all())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="bench-compute") as pool:
            eng = []
            for _ in range(repeats):
                p, r, out = regmean_engine(ws, grams, pool)
                eng.append((p, r))
    finally:
        torch.set_num_threads(threads)
    # Not bitwise: LAPACK's Cholesky rounds differently with 1 and 2 threads (the rows do not).
    max_diff = float((out - ref).abs().max())
    if not torch.allclose(out, ref, rtol=1e-9, atol=1e-12):
        raise AssertionError(f"{name}: engine-style rows differ from one-call rows by {max_diff:g}")
    e_prep = statistics.median(p for p, _ in eng)
    e_rows = statistics.median(r for _, r in eng)
    e_total = statistics.median(p + r for p, r in eng)
    d_total = prep_s + rows_s
    res = {
        "shape": [out_dim, in_dim], "solver": fac.solver.kind, "flops": flops,
        "engine_vs_default_max_abs_diff": max_diff,
        "default": {"threads": threads, "prepare_s": prep_s, "rows_s": rows_s, "total_s": d_total,
                    "prepare_runs": prep_runs, "rows_runs": rows_runs,
                    "prepare_gflops": flops["factor"] / prep_s / 1e9,
                    "rows_gflops": (flops["products"] + flops["solves"]) / rows_s / 1e9,
                    "gflops": flops["total"] / d_total / 1e9},
        "engine": {"workers": WORKERS, "threads_per_worker": 1, "prepare_s": e_prep, "rows_s": e_rows,
                   "total_s": e_total, "runs": [list(x) for x in eng],
                   "prepare_gflops": flops["factor"] / e_prep / 1e9,
                   "rows_gflops": (flops["products"] + flops["solves"]) / e_rows / 1e9,
                   "gflops": flops["total"] / e_total / 1e9},
    }
    log(f"regmean {name} {out_dim}x{in_dim}: default prepare {prep_s:.2f} s rows {rows_s:.2f} s "
        f"({res['default']['gflops']:.1f} GFLOP/s); engine prepare {e_prep:.2f} s rows {e_rows:.2f} s "
        f"({res['engine']['gflops']:.1f} GFLOP/s)")
    return res


def tile_sweep(st: Stats, out_dim: int, in_dim: int, repeats: int, tiles=(64, 128, 256, 512, 1024)) -> list[dict]:
    """regmean_rows time against its tile on one block (the tile sets the shape of every product
    and of the triangular solves, so it decides how well BLAS/LAPACK run)."""
    ws = st.weights(out_dim, in_dim)
    grams = [st.gram("in", in_dim, i) for i in range(N_MODELS)]
    fac = regmean_prepare(grams, ALPHA, [1.0] * N_MODELS)
    work = (N_MODELS * 2 + 2) * out_dim * in_dim * in_dim
    out = []
    for tile in tiles:
        if tile > out_dim:
            continue
        d_s, d_runs, _ = timed(lambda tile=tile: regmean_rows(ws, fac, tile), repeats)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(WORKERS, thread_name_prefix="bench-compute") as pool:
                e_runs = [regmean_engine(ws, grams, pool, tile)[1] for _ in range(repeats)]
        finally:
            torch.set_num_threads(threads)
        e_s = statistics.median(e_runs)
        out.append({"shape": [out_dim, in_dim], "tile": tile, "default_rows_s": d_s, "default_runs": d_runs,
                    "engine_rows_s": e_s, "engine_runs": e_runs,
                    "default_gflops": work / d_s / 1e9, "engine_gflops": work / e_s / 1e9})
        log(f"tile sweep {out_dim}x{in_dim} tile {tile}: rows default {d_s:.2f} s, engine {e_s:.2f} s")
    return out


def bench_kfac(st: Stats, name: str, out_dim: int, in_dim: int, repeats: int) -> dict:
    ws = torch.stack(st.weights(out_dim, in_dim))
    a = torch.stack([scale_offdiag(st.gram("in", in_dim, i), ALPHA) for i in range(N_MODELS)])
    b = torch.stack([scale_offdiag(st.gram("out", out_dim, i), ALPHA) for i in range(N_MODELS)])
    apply = kfac_apply(a, b)
    counter = [0]

    def counted(x):
        counter[0] += 1
        return apply(x)

    x0 = ws.mean(0)
    rhs_s, rhs_runs, rhs = timed(lambda: kfac_rhs(a, b, ws), repeats)
    runs, res = [], None
    for _ in range(repeats):
        counter[0] = 0
        t0 = time.perf_counter()
        res = conjugate_gradient(counted, rhs, x0, CG_ITERS, 0.0)
        runs.append(time.perf_counter() - t0)
    if res.iterations != CG_ITERS:
        raise AssertionError(f"{name}: CG stopped after {res.iterations} iterations")
    cg_s = statistics.median(runs)
    matvecs = counter[0]
    per_mv = N_MODELS * (2 * out_dim * out_dim * in_dim + 2 * out_dim * in_dim * in_dim)
    out = {"shape": [out_dim, in_dim], "threads": torch.get_num_threads(), "flops_per_matvec": per_mv,
           "rhs_s": rhs_s, "rhs_runs": rhs_runs, "cg_iterations": res.iterations, "matvecs": matvecs,
           "cg_s": cg_s, "cg_runs": runs, "per_iteration_s": cg_s / CG_ITERS, "per_matvec_s": cg_s / matvecs,
           "gflops": matvecs * per_mv / cg_s / 1e9, "final_residual": res.residual}
    log(f"kfac {name} {out_dim}x{in_dim}: rhs {rhs_s:.2f} s, CG {CG_ITERS} it {cg_s:.2f} s "
        f"({out['per_iteration_s']:.2f} s/it, {out['gflops']:.1f} GFLOP/s)")
    return out


def extrapolate(reg: dict, kf: dict, quick: bool) -> dict:
    vocab = VOCAB // QUICK_SCALE if quick else VOCAB
    q = reg["q"]
    d_model = q["shape"][1]
    out: dict = {"block_counts": BLOCK_COUNTS, "lm_head": [vocab, d_model]}
    for cfg in ("engine", "default"):
        blocks = sum(BLOCK_COUNTS[k] * reg[k][cfg]["total_s"] for k in BLOCK_COUNTS)
        lm = q[cfg]["prepare_s"] + q[cfg]["rows_s"] * vocab / q["shape"][0]
        out[f"regmean_{cfg}_s"] = {"blocks": blocks, "lm_head": lm, "total": blocks + lm}
    for k in (10, 100):
        per = {name: kf[name]["rhs_s"] + kf[name]["cg_s"] * (k + 2) / (CG_ITERS + 2) for name in BLOCK_COUNTS}
        out[f"kfac_{k}_s"] = {"per_block": per, "total": sum(BLOCK_COUNTS[n] * per[n] for n in BLOCK_COUNTS)}
    return out


# ----------------------------------------------------------------------------- report
def fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"


def markdown(res: dict) -> str:
    L = ["| torch.matmul | threads | s | GFLOP/s |", "|---|---|---|---|"]
    for m in res["matmul"]:
        L.append(f"| {m['dtype']} {m['shape']} | {m['threads']} | {m['seconds']:.3f} | {m['gflops']:.1f} |")
    L += ["", "| block [out,in] | method | configuration | prepare s | rows / CG s | total s | GFLOP/s |",
          "|---|---|---|---|---|---|---|"]
    for name, r in res["regmean"].items():
        shp = "x".join(map(str, r["shape"]))
        for cfg, label in (("engine", "2 workers x 1 thread"), ("default", f"1 process, {r['default']['threads']} threads")):
            c = r[cfg]
            L.append(f"| {name} {shp} | RegMean | {label} | {c['prepare_s']:.2f} ({c['prepare_gflops']:.1f}) | "
                     f"{c['rows_s']:.2f} ({c['rows_gflops']:.1f}) | {c['total_s']:.2f} | {c['gflops']:.1f} |")
    for name, k in res["kfac"].items():
        shp = "x".join(map(str, k["shape"]))
        L.append(f"| {name} {shp} | MaTS K-FAC, {k['cg_iterations']} CG it | 1 process, {k['threads']} threads | "
                 f"rhs {k['rhs_s']:.2f} | {k['cg_s']:.2f} ({k['per_iteration_s']:.2f}/it) | "
                 f"{k['rhs_s'] + k['cg_s']:.2f} | {k['gflops']:.1f} |")
    L += ["", "(prepare and rows columns: seconds, GFLOP/s in parentheses)"]
    if res.get("regmean_tile_sweep"):
        L += ["", "| regmean_rows tile | block | 1 process, default threads: s (GFLOP/s) | 2 workers x 1 thread: s (GFLOP/s) |",
              "|---|---|---|---|"]
        for t in res["regmean_tile_sweep"]:
            L.append(f"| {t['tile']} | {'x'.join(map(str, t['shape']))} | {t['default_rows_s']:.2f} ({t['default_gflops']:.1f}) | "
                     f"{t['engine_rows_s']:.2f} ({t['engine_gflops']:.1f}) |")
    ex = res.get("extrapolation")
    if ex is None:
        return "\n".join(L)
    L += ["",
          "| whole mT5-XL (compute only) | blocks | lm_head | total |", "|---|---|---|---|"]
    for cfg, label in (("engine", "RegMean, 2 workers x 1 thread"), ("default", "RegMean, 1 process default threads")):
        e = ex[f"regmean_{cfg}_s"]
        L.append(f"| {label} | {fmt_s(e['blocks'])} | {fmt_s(e['lm_head'])} | {fmt_s(e['total'])} |")
    for k in (10, 100):
        L.append(f"| MaTS K-FAC, {k} CG iterations | {fmt_s(ex[f'kfac_{k}_s']['total'])} | averaged | "
                 f"{fmt_s(ex[f'kfac_{k}_s']['total'])} |")
    return "\n".join(L)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"shapes / {QUICK_SCALE}, one repeat (smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement (default 3, 1 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="q,wi,wo", help="comma-separated blocks to measure (default all)")
    ap.add_argument("--out", type=Path, default=RESULTS / "stats-bench.json", help="JSON output path")
    ap.add_argument("--tile-sweep-only", action="store_true",
                    help="only time regmean_rows against its tile on the q block and add that to the --out file")
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.tile_sweep_only:
        res = json.loads(args.out.read_text()) if args.out.exists() else {"quick": args.quick}
        o, i = shapes(args.quick)["q"]
        res["regmean_tile_sweep"] = tile_sweep(Stats(args.seed), o, i, repeats)
        res["markdown"] = md = markdown(res) if "regmean" in res else ""
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(md)
        return 0
    t_start = time.perf_counter()
    shp = {k: v for k, v in shapes(args.quick).items() if k in args.only.split(",")}
    res: dict = {
        "machine": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu_model": cpu_model(),
                    "cpu_cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "git_commit": git_commit()},
        "quick": args.quick, "repeats": repeats, "seed": args.seed, "n_models": N_MODELS, "alpha": ALPHA,
        "tile": TILE, "tokens": TOKENS, "ridge": RIDGE, "cg_iterations": CG_ITERS, "shapes": shp,
        "assumptions": ASSUMPTIONS,
    }
    res["matmul"] = bench_matmul(repeats, args.quick)
    st = Stats(args.seed)
    res["regmean"] = {name: bench_regmean(st, name, o, i, repeats) for name, (o, i) in shp.items()}
    res["kfac"] = {name: bench_kfac(st, name, o, i, repeats) for name, (o, i) in shp.items()}
    if "q" in shp:
        res["regmean_tile_sweep"] = tile_sweep(st, *shp["q"], repeats)
    if set(shp) == set(BLOCK_COUNTS):
        res["extrapolation"] = extrapolate(res["regmean"], res["kfac"], args.quick)
    res["seconds"] = time.perf_counter() - t_start
    md = markdown(res)
    res["markdown"] = md
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
