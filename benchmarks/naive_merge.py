"""Naive load-everything merge: the baseline tensormerge is compared against.

This is what a merge script written in a hurry does: load every checkpoint
fully with ``safetensors.torch.load_file``, compute in float32 with plain
torch, cast back and ``save_file`` one output file. Tensors are upcast one at
a time (upcasting whole models first would only make the baseline worse).

Run as a child process by run_bench.py; prints one JSON line with phase
timings and its own ``ru_maxrss`` so the parent can cross-check its polling.

    python naive_merge.py METHOD BASE_DIR FT_DIR[,FT_DIR...] OUT_FILE
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TASK_ARITHMETIC_LAMBDA = 0.3
DARE_DROP_P = 0.5
TIES_K = 0.2


def load_model(model_dir: Path) -> dict[str, torch.Tensor]:
    """Load every shard named in the HF index into one dict."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(model_dir / shard))
    return tensors


def merge_average(base, fts, name):
    """Plain mean of the fine-tuned models (the base is not an input)."""
    return torch.stack([ft[name].float() for ft in fts]).mean(0)


def merge_task_arithmetic(base, fts, name):
    """base + lambda * sum of task vectors."""
    b = base[name].float()
    return b + TASK_ARITHMETIC_LAMBDA * sum(ft[name].float() - b for ft in fts)


def merge_dare(base, fts, name):
    """Drop each task-vector entry with p=0.5, rescale by 1/(1-p), sum (lambda 1)."""
    b = base[name].float()
    out = b.clone()
    for ft in fts:
        tau = ft[name].float() - b
        keep = torch.rand(tau.shape) >= DARE_DROP_P
        out += tau * keep / (1.0 - DARE_DROP_P)
    return out


def ties_thresholds(base, fts) -> list[float]:
    """Per-model magnitude threshold keeping the global top 20% of |tau|.

    The whole flattened task vector of one model is materialised in fp32 and
    handed to torch.kthvalue, as a naive global top-k does; this is the
    memory peak of the naive TIES run.
    """
    thresholds = []
    for ft in fts:
        flat = torch.cat([(ft[n].float() - base[n].float()).abs().flatten() for n in base])
        kth = flat.numel() - int(TIES_K * flat.numel()) + 1
        thresholds.append(torch.kthvalue(flat, kth).values.item())
        del flat
    return thresholds


def merge_ties(base, fts, name, thresholds):
    """Trim to the global top-k, elect sign by sum, disjoint mean (lambda 1)."""
    b = base[name].float()
    taus = torch.stack([ft[name].float() - b for ft in fts])
    for tau, thr in zip(taus, thresholds):
        tau.masked_fill_(tau.abs() < thr, 0.0)
    sign = torch.sign(taus.sum(0))
    agree = (torch.sign(taus) == sign) & (taus != 0)
    merged = (taus * agree).sum(0) / agree.sum(0).clamp(min=1)
    return b + merged


def main(argv: list[str]) -> int:
    method, base_dir, ft_dirs, out_file = argv
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base = load_model(Path(base_dir))
    fts = [load_model(Path(d)) for d in ft_dirs.split(",")]
    t1 = time.perf_counter()
    if method == "ties":
        thresholds = ties_thresholds(base, fts)
        merge = lambda b, f, n: merge_ties(b, f, n, thresholds)  # noqa: E731
    else:
        merge = {"average": merge_average, "task_arithmetic": merge_task_arithmetic,
                 "dare": merge_dare}[method]
    merged = {n: merge(base, fts, n).to(t.dtype) for n, t in base.items()}
    t2 = time.perf_counter()
    save_file(merged, out_file, metadata={"format": "pt"})
    t3 = time.perf_counter()
    print(json.dumps({
        "load_s": t1 - t0, "merge_s": t2 - t1, "save_s": t3 - t2,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
