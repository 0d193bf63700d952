"""`stats compute --workers N | --scheduler ADDR`: the statistics pass on a dask cluster.

Why shards of a fixed size, not one per worker: the examples are cut into shards of
`--shard-examples` consecutive examples whatever the number of workers, every shard's sums start
from zero, and the client adds the shards' sums in shard order. So the store depends on the
shard size only, never on how many workers ran or which worker ran what, and differs from the
single-process store by float32 summation order alone. Each shard task runs on one thread
(torch's results can change with the thread count); the cluster's parallelism is its workers.

A worker runs the ordinary single-process code on its range (stats/collect.py, `shard` set): it
loads its own copy of the model and the data, probes the shared inputs, and writes its sums to
OUT.partial/.resume/shard-NNNNN.pt (atomically, with the run's fingerprint), so the workers
need the client's filesystem (a LocalCluster has it). A shard lost with a killed worker is rerun
by dask from zero; `--resume` keeps every finished shard file of the same run and computes only
the others.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict, replace

import torch

from tensormerge.constants import PARTIAL_SUFFIX
from tensormerge.engine import faults
from tensormerge.errors import OutputError, ParameterError

SHARD_FILE = "shard-{:05d}.pt"


def shard_path(output: str, index: int) -> str:
    from tensormerge.stats_compute.collect import RESUME_DIR

    return os.path.join(output + PARTIAL_SUFFIX, RESUME_DIR, SHARD_FILE.format(index))


def shards(n: int, size: int) -> list[tuple[int, int, int]]:
    """(index, first example, end) of every shard: fixed by the data and the size alone."""
    return [(i, lo, min(lo + size, n)) for i, lo in enumerate(range(0, n, size))]


def shard_task(opts: dict, shard: tuple[int, int, int]) -> dict:
    """On a worker: one shard's sums into its file; returns what the client checks."""
    from tensormerge.stats_compute.collect import ComputeOptions, _compute_stats

    torch.set_num_threads(1)
    o = ComputeOptions(**{**opts, "shard": list(shard), "workers": None, "scheduler": None, "quiet": True,
                          "resume": False})
    return _compute_stats(o)


def save_shard(output: str, index: int, fingerprint: str, state: dict) -> None:
    from tensormerge.stats_compute.collect import save_state

    save_state(shard_path(output, index), fingerprint, state)


def _load_shard(output: str, index: int, fingerprint: str) -> dict | None:
    from tensormerge.stats_compute.collect import load_state

    return load_state(shard_path(output, index), fingerprint, output, "shard")


def _fold(total: dict | None, part: dict) -> dict:
    """total + part, sums added in place (the client calls this in shard order)."""
    if total is None:
        return part
    for group in ("acc", "hooks"):
        t, p = total[group], part[group]
        if t.get("aliases", {}) != p.get("aliases", {}):
            raise OutputError("dask workers found different shared inputs (different transformers versions?)")
        for key, v in p["sums"].items():
            if key in t["sums"]:
                t["sums"][key].add_(v)
                t["counts"][key] += p["counts"][key]
            else:
                t["sums"][key], t["counts"][key] = v, p["counts"][key]
    for key in ("n_examples", "n_batches", "n_tokens"):
        total[key] += part[key]
    return total


class _Cluster:
    def __init__(self, workers: int | None, scheduler: str | None, device: str):
        from tensormerge.engine.distributed import connect

        self.resources = {"GPU": 1} if device.startswith("cuda") else None
        self.client, self.cluster = connect(workers, scheduler, self.resources is not None)

    def close(self) -> None:
        for x in (getattr(self, "client", None), self.cluster):
            if x is not None:
                with contextlib.suppress(Exception):
                    x.close()


def compute(opts, fingerprint: str, n: int, say) -> tuple[dict, float, int]:
    """The reduced state of every shard (collect.Collector.load's format), the seconds the
    cluster took and the examples computed in this run (not taken from finished shards)."""
    if opts.shard_examples < 1:
        raise ParameterError(f"--shard-examples {opts.shard_examples}: must be at least 1")
    partial = opts.output + PARTIAL_SUFFIX
    if not opts.resume and os.path.exists(partial):
        shutil.rmtree(partial)
    os.makedirs(os.path.dirname(shard_path(opts.output, 0)), exist_ok=True)
    every = shards(n, opts.shard_examples)
    todo = [s for s in every if _load_shard(opts.output, s[0], fingerprint) is None]
    if len(todo) < len(every):
        say(f"resuming: {len(every) - len(todo)} of {len(every)} shards done")
    t0 = time.perf_counter()
    if todo:
        from distributed import as_completed

        cluster = _Cluster(opts.workers, opts.scheduler, opts.device)
        try:
            spec = asdict(replace(opts, resume=False))
            futures = [cluster.client.submit(shard_task, spec, s, pure=False, resources=cluster.resources)
                       for s in todo]
            for fut in as_completed(futures):
                fut.result()  # a worker's error (bad data, NaN) is raised here, as it would be locally
                faults.hit("stats-shard-done")
        finally:
            cluster.close()
    seconds = time.perf_counter() - t0
    total = None
    for index, _, _ in every:
        part = _load_shard(opts.output, index, fingerprint)
        if part is None:
            raise OutputError(f"{shard_path(opts.output, index)}: missing after its task finished (do the workers "
                              f"share this filesystem?)")
        part.pop("fingerprint")
        total = _fold(total, part)
    return total, seconds, sum(hi - lo for _, lo, hi in todo)
