"""MaTS' K-FAC CG alone, as the engine runs it on CPU, against this machine's matrix-product
rate measured in the same run: the CG's own rate, without the statistics reads that
mt5xl_stats.py's per-block seconds include.

The engine's compute runs with torch's intra-op threads set to 1 and spreads each K-FAC
product over every core by (model, row block) (kernels/linalg.py); this does the same:
`kfac_rhs`, then `conjugate_gradient` with `kfac_apply` for exactly 10 iterations (12 matvecs),
N=3 models of random SPD Grams on mT5-XL's shapes. The reference rate is one batched
(G_out @ X) @ G_in with torch's default threads, the best of --repeats.

    python benchmarks/kfac_cg_rate.py [--repeats 3] [--out results/kfac-cg-rate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tensormerge.kernels import linalg as L  # noqa: E402

SHAPES = [(2048, 2048), (5120, 2048), (2048, 5120)]
N, ITERS = 3, 10


def spd(d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(d, d // 2, generator=g)
    m = x @ x.T / d
    return m + 1e-3 * m.diagonal().mean() * torch.eye(d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kfac-cg-rate.json")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    rows = []
    for out, inp in SHAPES:
        g = torch.Generator().manual_seed(0)
        a = torch.stack([spd(inp, g) for _ in range(N)])
        b = torch.stack([spd(out, g) for _ in range(N)])
        ws = torch.randn(N, out, inp, generator=g) * 0.02
        per_mv = N * (2 * out * out * inp + 2 * out * inp * inp)
        torch.set_num_threads(threads)
        x = ws[0]
        best_mm = float("inf")
        for _ in range(args.repeats + 1):
            t0 = time.perf_counter()
            torch.matmul(torch.matmul(b, x), a)
            best_mm = min(best_mm, time.perf_counter() - t0)
        torch.set_num_threads(1)  # as the engine's compute
        count = [0]
        apply = L.kfac_apply(a, b)

        def counted(w):
            count[0] += 1
            return apply(w)
        best_cg = float("inf")
        for _ in range(args.repeats):
            count[0] = 0
            t0 = time.perf_counter()
            rhs = L.kfac_rhs(a, b, ws)
            res = L.conjugate_gradient(counted, rhs, ws.mean(0), ITERS, 0.0)
            best_cg = min(best_cg, time.perf_counter() - t0)
        torch.set_num_threads(threads)
        flops = (count[0] + 1) * per_mv  # the matvecs and the right-hand side
        rows.append({"shape": [out, inp], "matvecs": count[0], "cg_iterations": res.iterations, "cg_s": best_cg,
                     "cg_gflops": flops / best_cg / 1e9, "matmul_gflops": per_mv / best_mm / 1e9,
                     "fraction": (flops / best_cg) / (per_mv / best_mm)})
        print(f"{out}x{inp}: CG {best_cg:.2f} s ({count[0]} matvecs + rhs) {rows[-1]['cg_gflops']:.1f} GFLOP/s, "
              f"matmul {rows[-1]['matmul_gflops']:.1f} GFLOP/s ({threads} threads): {rows[-1]['fraction']:.2f}",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": threads, "loadavg": os.getloadavg(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
