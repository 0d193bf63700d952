"""The dask executor: the same merge on a cluster (a LocalCluster started here and joined with
--scheduler, or --workers N) writes the same shard bytes as the local executor, for every
method and any --max-memory; a worker process killed mid-merge does not change the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tensormerge.engine.faults import ENV, ONCE
from tests import helpers as H

distributed = pytest.importorskip("distributed")

SPEC = H.CHUNKED_SPEC
METHODS = {  # method -> extra arguments (statistics methods get their stores in _args)
    "average": [], "task_arithmetic": ["-p", "lambda=0.5"], "ties": [], "dare": ["-p", "p=0.3"],
    "fisher": ["-p", "normalize=true"], "regmean": [], "mats": ["-p", "iterations=5"], "ubgm": [],
    # per-tensor sums folded into the merge of one-chunk tensors, a pass for the others
    "dare_ties": ["-p", "density=0.5,0.7,0.3"], "model_stock": [],
}
NO_BASE = ("average", "fisher", "regmean")
BUDGET = "1536KiB"  # regmean's 128-row tiles need about this; the other methods chunk at it too
MATS_BUDGET = "8MiB"  # a CG block is solved whole


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    b, ins = H.save_cancelling_family(root)
    g = torch.Generator().manual_seed(9)
    stores = []
    for i in range(4):  # three inputs, then the base (ubgm's --base-stats)
        stats = {"gram_in": {}, "gram_out": {}, "fisher": {}}
        for name, (shape, dtype) in SPEC.items():
            if not dtype.is_floating_point:
                continue
            stats["fisher"][name] = torch.rand(shape, generator=g)
            if len(shape) == 2:
                for kind, d in (("gram_in", shape[1]), ("gram_out", shape[0])):
                    x = torch.randn(2 * d, d, generator=g)
                    stats[kind][name] = x.T @ x / x.shape[0]
        stores.append(H.write_store(root / f"s{i}.zarr", stats))
    return {"root": root, "base": b, "inputs": ins, "stats": stores}


def _args(fam, method: str, out: Path, *extra: str, budget: str = BUDGET) -> list[str]:
    if method == "mats" and budget == BUDGET:
        budget = MATS_BUDGET
    args = ["run", "--method", method, "--inputs", ",".join(fam["inputs"]), "--output", str(out),
            "--max-memory", budget, "--shard-size", "40KB", "-q", *METHODS[method], *extra]
    if method not in NO_BASE:
        args += ["--base", fam["base"]]
    if method in ("fisher", "regmean", "mats", "ubgm"):
        args += ["--stats", ",".join(fam["stats"][:3])]
    if method == "ubgm":
        args += ["--base-stats", fam["stats"][3]]
    return args


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      scheduler_kwargs={"dashboard": False}) as c:
        yield c.scheduler_address


def _merge(fam, method, out, *extra, budget=BUDGET) -> dict[str, str]:
    res = H.run_cli(_args(fam, method, out, *extra, budget=budget), timeout=300)
    assert res.returncode == 0, res
    return H.shard_digests(out)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_cluster_writes_the_bytes_of_the_local_executor(fam, cluster, method, tmp_path):
    local = _merge(fam, method, tmp_path / "local")
    assert len(local) >= 2
    assert _merge(fam, method, tmp_path / "dask", "--scheduler", cluster) == local
    # other chunking (whole blocks), same bytes, locally and on the cluster
    assert _merge(fam, method, tmp_path / "local-big", budget="64MiB") == local
    assert _merge(fam, method, tmp_path / "dask-big", "--scheduler", cluster, budget="64MiB") == local


def test_workers_option_starts_a_local_cluster(fam, tmp_path):
    local = _merge(fam, "ties", tmp_path / "local")
    assert _merge(fam, "ties", tmp_path / "dask", "--workers", "2") == local


@pytest.mark.parametrize("point", ["chunk:2", "pass:3"])
def test_a_worker_killed_mid_merge_does_not_change_the_result(fam, tmp_path, point, monkeypatch):
    from distributed import LocalCluster

    local = _merge(fam, "ties", tmp_path / "local")
    once = tmp_path / "killed"
    monkeypatch.setenv(ENV, point)  # workers spawned now inherit it; the first to get there dies
    monkeypatch.setenv(ONCE, str(once))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      scheduler_kwargs={"dashboard": False}) as c:
        monkeypatch.delenv(ENV)
        monkeypatch.delenv(ONCE)
        got = _merge(fam, "ties", tmp_path / "dask", "--scheduler", c.scheduler_address)
    assert once.exists(), "no worker was killed"
    assert got == local


def test_bad_cluster_options_are_one_line_errors(fam, tmp_path):
    out = tmp_path / "out"
    H.assert_clean_error(H.run_cli(_args(fam, "average", out, "--workers", "0")), "--workers", out_dir=out)
    H.assert_clean_error(H.run_cli(_args(fam, "average", out, "--workers", "2", "--scheduler", "tcp://x:1")),
                         "--workers", "--scheduler", out_dir=out)
    res = H.run_cli(_args(fam, "average", out, "--scheduler", "tcp://127.0.0.1:9"), timeout=120)
    H.assert_clean_error(res, "--scheduler", out_dir=out)


def test_a_local_merge_killed_midway_resumes_on_the_cluster(fam, cluster, tmp_path):
    local = _merge(fam, "ties", tmp_path / "local", budget="200KiB")
    out = tmp_path / "out"
    res = H.run_cli(_args(fam, "ties", out, budget="200KiB"), env={ENV: "chunk:9"})
    assert res.returncode == -9, res
    report = tmp_path / "report.json"
    assert _merge(fam, "ties", out, "--resume", "--scheduler", cluster, "--report", str(report),
                  budget="200KiB") == local
    assert json.loads(report.read_text())["resumed"]["chunks"] == 9


@pytest.mark.parametrize("method", ["ties", "model_stock"])
def test_the_report_counts_the_bytes_each_pass_read_as_the_local_executor_does(fam, cluster, method, tmp_path):
    """Each pass's bytes_read is the rows its chunks read: TIES's 1/64 sample rounds each chunk's
    rows up, model_stock's pass skips the tensors merged in one chunk (their sums are folded into
    the merge), so at 200KiB it reads some tensors and not others. The seconds differ, the bytes
    may not."""
    reports = {}
    for where, extra in (("local", ()), ("dask", ("--scheduler", cluster))):
        report = tmp_path / f"{where}.json"
        _merge(fam, method, tmp_path / where, *extra, "--report", str(report), budget="200KiB")
        reports[where] = json.loads(report.read_text())
    local, dask = reports["local"], reports["dask"]
    assert [p["name"] for p in dask["passes"]] == [p["name"] for p in local["passes"]] != []
    assert local["passes"][0]["bytes_read"] > 0
    assert [p["bytes_read"] for p in dask["passes"]] == [p["bytes_read"] for p in local["passes"]]
    assert dask["bytes_read"] == local["bytes_read"]


def test_a_sweep_on_the_cluster_reports_the_pass_bytes_of_a_local_sweep(fam, cluster, tmp_path):
    """The same count for a sweep's shared pass reads (TIES's 1/64 sample rounded up per chunk;
    a sweep samples only for the norm-based signs, whose windows it counts)."""
    passes = {}
    for where, extra in (("local", ()), ("dask", ("--scheduler", cluster))):
        report = tmp_path / f"{where}.json"
        res = H.run_cli(["sweep", "-q", "-m", "ties", "-i", ",".join(fam["inputs"]), "-b", fam["base"],
                         "-o", str(tmp_path / where), "--max-memory", "200KiB", "-p", "k=0.1,0.3", "-p", "sign=normfrac",
                         "--report", str(report), *extra], timeout=300)
        assert res.returncode == 0, res
        text = json.loads(report.read_text())
        found = []

        def walk(o):
            if isinstance(o, dict):
                if isinstance(o.get("passes"), list):
                    found.append([(p["name"], p["bytes_read"]) for p in o["passes"]])
                for v in o.values():
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)

        walk(text)
        passes[where] = found
    assert len(passes["local"]) == 2 and passes["local"][0][0][0] == "ties_sample" and passes["local"][0][0][1] > 0
    assert passes["dask"] == passes["local"]


def _http_server():
    """Something that answers on a port, but is no dask scheduler."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(30)

    def serve():
        try:
            while True:
                c, _ = srv.accept()
                c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 4)
                c.close()
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_a_scheduler_address_that_is_no_dask_scheduler_is_one_line(fam, tmp_path):
    """A web server's reply was read as a frame length (an allocation of 3 EiB: MemoryError), a
    tls:// address without certificates a TypeError: both surfaced as internal errors."""
    srv = _http_server()
    try:
        for address in (f"tcp://127.0.0.1:{srv.getsockname()[1]}", "tls://127.0.0.1:1"):
            out = tmp_path / "out"
            res = H.run_cli(["run", "-m", "average", "-i", ",".join(fam["inputs"]), "-o", str(out), "--scheduler", address],
                            timeout=90)
            line = H.assert_clean_error(res, "--scheduler", "cannot connect to a dask scheduler", out_dir=out)
            assert res.returncode == 2, line
    finally:
        srv.close()


def test_more_local_workers_than_the_machine_can_hold_are_refused_at_once(fam, tmp_path):
    out = tmp_path / "out"
    res = H.run_cli(["run", "-m", "average", "-i", ",".join(fam["inputs"]), "-o", str(out), "--workers", "1000"], timeout=30)
    H.assert_clean_error(res, "--workers", "1000", out_dir=out)


def test_a_task_failing_on_a_worker_is_one_line_not_the_workers_log(tmp_path):
    """A worker's error comes back as tensormerge's one line; dask's worker log of it (with its
    traceback) and the client's "Task exception was never retrieved" are not printed."""
    base = H.make_base(seed=1)
    bad = H.make_finetune(base, seed=2)
    name = next(n for n, t in bad.items() if t.is_floating_point() and t.ndim == 2)
    bad[name].view(-1)[3] = float("nan")
    b = H.save(tmp_path / "base", base)
    ins = [H.save(tmp_path / "a", H.make_finetune(base, seed=3)), H.save(tmp_path / "b", bad)]
    out = tmp_path / "out"
    res = H.run_cli(["run", "--method", "task_arithmetic", "--inputs", ",".join(ins), "--base", b,
                     "--output", str(out), "-q", "--workers", "2"], timeout=300)
    H.assert_clean_error(res, name, "NaN", out_dir=out)


def test_the_clients_loop_drops_only_dasks_stop_signal():
    import asyncio
    import logging

    from distributed.client import AllExit

    from tensormerge.engine.distributed import _quiet

    loop = asyncio.new_event_loop()
    seen: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    class Client:  # the attribute path _quiet reaches for
        class loop:  # noqa: N801
            asyncio_loop = loop

    h = Handler()
    logging.getLogger("asyncio").addHandler(h)
    try:
        _quiet(Client())
        loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": AllExit()})
        assert seen == []
        loop.call_exception_handler({"message": "something else", "exception": ValueError("x")})
        assert seen == ["something else"]
    finally:
        logging.getLogger("asyncio").removeHandler(h)
        loop.close()
