"""Per-kernel throughput: each method's arithmetic on one engine sub-chunk, in GB/s of the
bytes it must touch (N inputs + base + statistics read, the output written), next to a plain
`torch.add` over the same bytes measured in the same run.

The engine runs kernels on sub-chunks of 2^18 elements, one per single-threaded worker, so
that is what this measures (threads=1), plus the same with torch's threads for contrast. On a
CUDA machine the Triton kernels are measured too (--kernels triton is only interpreted on CPU,
which is not a speed).

    .venv/bin/python benchmarks/kernels_bench.py [--elements 262144] [--out results/kernels.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from tensormerge.engine.alloc import keep_freed_buffers
from tensormerge.kernels import reference as R
from tensormerge.kernels import select as S

N = 3


def _inputs(n: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(dtype)
    xs = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(N)]
    fishers = [torch.rand(n, generator=g) for _ in range(N)]
    return base.to(device), [x.to(device) for x in xs], [f.to(device) for f in fishers]


def cases(ops, base, xs, fishers):
    """name -> (callable, bytes touched)."""
    n = base.numel()
    e = base.element_size()
    io = (N + 1) * n * e + n * e  # inputs + base read, output written (stored dtype)
    thr = [float(torch.quantile((x.float() - base.float()).abs()[:65536], 0.8)) for x in xs]
    bits = (xs[0].float() - base.float()).abs().view(torch.int32)
    windows = [max((int(torch.tensor(t).view(torch.int32)) >> 16) - 1, 0) for t in thr]  # around each threshold
    return {
        "weighted_sum": (lambda: ops.weighted_sum(xs, [1 / N] * N), N * n * e + n * e),
        "task_arithmetic": (lambda: ops.task_arithmetic(xs, base, [0.3] * N), io),
        "dare": (lambda: ops.dare(xs, base, 0.5, [1.0] * N, 0, True, "w", 0), io),
        "ties (mass, dis-mean)": (lambda: ops.ties_merge(xs, base, thr, "mass", None, "dis-mean", 1.0, 1.0), io),
        "fisher_merge": (lambda: ops.fisher_merge(xs, fishers, [1 / N] * N, 1e-8, "clamp", [True] * N),
                         N * n * (e + 4) + n * e),
        "ubgm": (lambda: ops.ubgm(xs, base, fishers, None, 1.0, 1e-12, 1.0, [1.0] * N), io + N * n * 4),
        "radix hist (top 16 bits)": (lambda: getattr(ops, "hist_high", S.hist_high)(bits), n * 4),
        "ties pass A (window counts)": (lambda: ops.ties_window_counts(xs, base, windows, 4), (N + 1) * n * e),
    }


WINDOW_S, WINDOWS = 0.2, 5  # --quick: one 10 ms window (a smoke test, not a measurement)


def timed(fn, seconds: float | None = None, windows: int | None = None) -> float:
    """Seconds per call: the best of several short windows, so a busy neighbour (this VM has 2
    cores) inflates a number less than a single long run would."""
    seconds, windows = seconds or WINDOW_S, windows or WINDOWS
    fn()
    best = float("inf")
    for _ in range(windows):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            reps += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 18)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    ap.add_argument("--quick", action="store_true", help="one 10 ms window per kernel: a smoke test")
    args = ap.parse_args()
    if args.quick:
        global WINDOW_S, WINDOWS
        WINDOW_S, WINDOWS = 0.01, 1
    keep_freed_buffers()  # as the engine does: reused buffers, not fresh page-faulted mappings
    dtype = getattr(torch, args.dtype)
    rows = []
    configs = [("cpu", "torch", 1)]  # the engine's configuration: one sub-chunk per single-threaded worker
    if importlib.util.find_spec("numba") is not None:
        configs.append(("cpu", "numba", 1))  # --kernels auto on CPU: the reference with TIES fused by numba
    if torch.cuda.is_available():
        configs += [("cuda", "torch", 0), ("cuda", "triton", 0)]
    for device, kind, threads in configs:
        if threads:
            torch.set_num_threads(threads)
        if kind == "triton":
            from tensormerge.kernels import triton as ops
        elif kind == "numba":
            from tensormerge.kernels import cpu as ops
        else:
            ops = R
        base, xs, fishers = _inputs(args.elements, dtype, device)
        for name, (fn, nbytes) in cases(ops, base, xs, fishers).items():
            # torch.add over the same bytes: the memory-bound floor of an elementwise kernel
            a = torch.empty(nbytes // 3 // 4, device=device)
            b = torch.empty_like(a)
            c = torch.empty_like(a)
            add_s = timed(lambda: torch.add(a, b, out=c))
            s = timed(fn)
            rows.append({"kernel": name, "device": device, "impl": kind, "threads": threads,
                         "elements": args.elements, "dtype": args.dtype, "bytes": nbytes, "seconds": s,
                         "gb_s": nbytes / s / 1e9, "torch_add_gb_s": nbytes / add_s / 1e9})
            r = rows[-1]
            print(f"| {name} | {device} {kind} | {threads or '-'} | {r['gb_s']:.2f} | {r['torch_add_gb_s']:.2f} | "
                  f"{r['gb_s'] / r['torch_add_gb_s']:.2f} |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
