"""`stats compute` on a dask cluster (issue 17, item 2): the examples are cut into fixed shards
and their sums reduced in shard order, so the store is the same bytes for 1, 2 and 3 workers,
after a worker killed mid-shard, and after the client itself was killed and `--resume` computed
only the shards that were missing; it equals the single-process store within float32 summation."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("distributed")

from tensormerge.engine.faults import ENV, ONCE  # noqa: E402
from tensormerge.stats_compute.cluster import shard_path  # noqa: E402
from tensormerge.stats_compute.collect import ComputeOptions, compute_stats  # noqa: E402
from tensormerge.stats.store import StatsStore  # noqa: E402
from tests import helpers as H  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402

N, BATCH, SHARD = 10, 2, 4  # three shards: 4, 4 and 2 examples


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats-cluster")
    model = cm.save(cm.llama(), root / "model")
    data = cm.write_jsonl(root / "data.jsonl", cm.causal_records(N, seed=4))
    ref = str(root / "local.zarr")
    compute_stats(ComputeOptions(model=model, data=data, kind="all", output=ref, batch_size=BATCH, quiet=True))
    return {"root": root, "model": model, "data": data, "ref": ref}


@pytest.fixture(scope="module")
def cluster(fam):
    """Two workers; the first to reach its second batch of a shard is killed (once)."""
    from distributed import LocalCluster

    once = fam["root"] / "killed"
    saved = {k: os.environ.get(k) for k in (ENV, ONCE)}
    os.environ[ENV], os.environ[ONCE] = "stats-shard:2", str(once)  # inherited by the workers spawned now
    try:
        c = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                         scheduler_kwargs={"dashboard": False})
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    with c:
        yield c.scheduler_address, once


def _args(fam, out, *extra) -> list[str]:
    return ["stats", "compute", "--model", fam["model"], "--data", fam["data"], "--kind", "all", "--output", str(out),
            "--batch-size", str(BATCH), "--shard-examples", str(SHARD), "--quiet", *extra]


def _values(path: str) -> dict:
    s = StatsStore(path)
    return {(k, n): s.read(k, n) for k, g in s.arrays.items() for n in g}


def test_same_store_for_1_2_3_workers_and_a_killed_worker(fam, cluster):
    address, once = cluster
    outs = {}
    res = H.run_cli(_args(fam, fam["root"] / "w2.zarr", "--scheduler", address), timeout=600)
    assert res.returncode == 0, res
    assert once.exists(), "no worker was killed"
    outs[2] = str(fam["root"] / "w2.zarr")
    for n in (1, 3):
        outs[n] = str(fam["root"] / f"w{n}.zarr")
        res = H.run_cli(_args(fam, outs[n], "--workers", str(n)), timeout=600)
        assert res.returncode == 0, res
    digests = {n: StatsStore(p).digest for n, p in outs.items()}  # metadata and every chunk's crc32
    assert len(set(digests.values())) == 1, digests
    # the single-process store: the same sums in another order (one running sum, not three)
    ref, got = _values(fam["ref"]), _values(outs[2])
    assert set(ref) == set(got)
    for key, want in ref.items():
        torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6 * float(want.abs().max() or 1))
    assert StatsStore(outs[2]).attrs["n_examples"] == N
    assert not os.path.exists(outs[2] + ".partial")


def test_a_killed_client_resumes_only_the_missing_shards(fam, cluster):
    address, _ = cluster
    out = fam["root"] / "resumed.zarr"
    res = H.run_cli(_args(fam, out, "--scheduler", address), env={ENV: "stats-shard-done:1"}, timeout=600)
    assert res.returncode == -9, res
    done = [i for i in range(3) if os.path.exists(shard_path(str(out), i))]
    assert done, "no shard file survived the client"
    args = [a for a in _args(fam, out, "--scheduler", address, "--resume") if a != "--quiet"]
    res = H.run_cli(args, timeout=600)
    assert res.returncode == 0, res
    assert "resuming: " in res.stdout and " of 3 shards done" in res.stdout, res
    assert StatsStore(str(out)).digest == StatsStore(str(fam["root"] / "w2.zarr")).digest
    assert not os.path.exists(str(out) + ".partial")


def test_bad_cluster_options_are_one_line_errors(fam, tmp_path):
    out = tmp_path / "s.zarr"
    H.assert_clean_error(H.run_cli(_args(fam, out, "--workers", "0")), "--workers", out_dir=out)
    H.assert_clean_error(H.run_cli(_args(fam, out, "--workers", "2", "--scheduler", "tcp://x:1")),
                         "--workers", "--scheduler", out_dir=out)
    H.assert_clean_error(H.run_cli(_args(fam, out, "--workers", "1", "--shard-examples", "0")),
                         "--shard-examples", out_dir=out)
