"""Resumable merges: a real merge killed with SIGKILL at chosen points continues with --resume
and writes the same bytes as an uninterrupted run; damage to the partial output is repaired;
a manifest made for another merge is refused.

Kill points come from `tensormerge.engine.faults` (the process SIGKILLs itself at the n-th
arrival at a named point), so each case stops at the same place every run; one test also kills
from outside at wall-clock times.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tensormerge.constants import RESUME_DIR
from tensormerge.engine.faults import ENV
from tensormerge.engine.outdir import REPLACED
from tests import helpers as H

SPEC = H.CHUNKED_SPEC
CHUNKS = 16  # merge-pass chunks of this family at 200KiB (the plan: 1 + 1 + 4 + 7 + 3)
PASS_CHUNKS = 15  # chunks of each ties pass (merged blocks only)
BUDGET = {"ties": "200KiB", "dare": "200KiB", "regmean": "1536KiB"}  # regmean's 128-row tiles need more


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    b, ins = H.save_cancelling_family(root)  # TIES' exact votes must survive a kill
    g = torch.Generator().manual_seed(5)
    stores = []
    for i in range(3):
        grams = {}
        for name in ("l0.w", "l1.w"):
            d = SPEC[name][0][1]
            x = torch.randn(4 * d, d, generator=g)
            grams[name] = x.T @ x / x.shape[0]
        stores.append(H.write_store(root / f"s{i}.zarr", {"gram_in": grams}))
    return {"root": root, "base": b, "inputs": ins, "stats": stores}


def _args(fam, method: str, out: Path, *extra: str) -> list[str]:
    args = ["run", "--method", method, "--inputs", ",".join(fam["inputs"]), "--output", str(out),
            "--max-memory", BUDGET[method], "--shard-size", "40KB", "-q", *extra]
    if method == "regmean":
        args += ["--stats", ",".join(fam["stats"])]
    else:
        args += ["--base", fam["base"]]
    return args


@pytest.fixture(scope="module")
def reference(fam):
    """Uninterrupted outputs, one per method."""
    refs = {}
    for method in ("ties", "dare", "regmean"):
        out = fam["root"] / f"ref-{method}"
        report = fam["root"] / f"ref-{method}.json"
        res = H.run_cli(_args(fam, method, out, "--report", str(report)))
        assert res.returncode == 0, res
        refs[method] = H.shard_digests(out)
        assert len(refs[method]) >= 3  # several shards, so "between shards" is a real point
        chunks = sum(b["chunks"] for b in json.loads(report.read_text())["blocks"])
        if method == "ties":
            # the vote pass gives the cancelling entries the exact majority: its state, not
            # patches replayed from the manifest, must survive the kill
            assert json.loads(report.read_text())["patched_entries"] == 0
        assert chunks == CHUNKS or method != "ties"
        refs[method + ":chunks"] = chunks
    return refs


def _kill_then_resume(fam, method: str, out: Path, point: str, n: int, *extra: str) -> dict:
    res = H.run_cli(_args(fam, method, out, *extra), env={ENV: f"{point}:{n}"})
    assert res.returncode == -signal.SIGKILL, f"not killed at {point}:{n}\n{res}"
    report = out.parent / (out.name + ".report.json")
    res = H.run_cli(_args(fam, method, out, "--resume", "--report", str(report), *extra))
    assert res.returncode == 0, res
    assert not Path(str(out) + ".partial").exists()
    assert not (out / RESUME_DIR).exists()
    return json.loads(report.read_text())


def _points(seed: int, chunks: int) -> list[tuple[str, int]]:
    """Random kill points of each kind: a global pass, between a chunk's bytes and its record
    (mid-block), after a recorded chunk, a shard boundary, after the files are finished."""
    rng = random.Random(seed)
    return [("pass", rng.randint(1, 4 * PASS_CHUNKS - 1)), ("chunk-bytes", rng.randint(2, chunks - 1)),
            ("chunk", rng.randint(1, chunks - 1)), ("shard", rng.randint(1, 2)), ("finished", 1)]


@pytest.mark.parametrize("method", ["ties", "dare", "regmean"])
def test_killed_merges_resume_to_identical_bytes(fam, reference, method, tmp_path):
    points = _points({"ties": 1, "dare": 2, "regmean": 3}[method], reference[method + ":chunks"])
    if method != "ties":
        points = [p for p in points if p[0] != "pass"]  # only ties has global passes
    for point, n in points:
        out = tmp_path / f"{point}-{n}"
        report = _kill_then_resume(fam, method, out, point, n)
        assert H.shard_digests(out) == reference[method], f"{method} killed at {point}:{n}"
        resumed = report["resumed"]
        if point in ("chunk", "shard"):
            assert resumed["chunks"] >= n, resumed  # everything recorded before the kill was kept
        if point == "chunk-bytes":
            assert resumed["chunks"] == n - 1, resumed  # the unrecorded chunk was merged again
        if point == "pass":
            assert resumed["chunks"] == 0
            assert resumed["passes"] == (n - 1) // PASS_CHUNKS, resumed
        if point == "finished":
            assert resumed["finished"] is True


@pytest.mark.parametrize("point,n", [("pass", 2 * PASS_CHUNKS + 3), ("chunk", 2)])
def test_ties_killed_in_or_after_the_vote_pass_resumes_to_identical_bytes(fam, reference, tmp_path, point, n):
    """Killed inside TIES' vote pass (after the sample and pass A; pass A2 and B are skipped on
    this family) it is run again; killed in the merge, its votes come back from the manifest:
    either way the same bytes, and nothing patched."""
    out = tmp_path / "out"
    report = _kill_then_resume(fam, "ties", out, point, n)
    assert H.shard_digests(out) == reference["ties"]
    assert report["patched_entries"] == 0
    votes = [p for p in report["passes"] if p["name"] == "ties_votes"]
    assert votes and bool(votes[0].get("resumed")) == (point == "chunk")


def test_block_checksums_of_a_resumed_merge_equal_an_uninterrupted_one(fam, reference, tmp_path):
    out = tmp_path / "out"
    _kill_then_resume(fam, "ties", out, "chunk", 9)
    ref = json.loads((fam["root"] / "ref-ties" / "tensormerge.json").read_text())["blocks"]
    got = json.loads((out / "tensormerge.json").read_text())["blocks"]
    assert {k: v["crc32"] for k, v in got.items()} == {k: v["crc32"] for k, v in ref.items()}


def test_killed_between_the_renames_of_an_overwrite(fam, reference, tmp_path):
    out = tmp_path / "out"
    res = H.run_cli(_args(fam, "dare", out))  # a previous output, which --overwrite may replace
    assert res.returncode == 0, res
    res = H.run_cli(_args(fam, "ties", out, "--overwrite"), env={ENV: "rename:1"})
    assert res.returncode == -signal.SIGKILL, res
    # OUT moved inside the finished OUT.partial (no name beside it), the new one not yet in place
    old = Path(str(out) + ".partial") / REPLACED / "tensormerge.json"
    assert not out.exists() and json.loads(old.read_text())["method"] == "dare"
    res = H.run_cli(_args(fam, "ties", out, "--overwrite", "--resume"))
    assert res.returncode == 0, res
    assert H.shard_digests(out) == reference["ties"]
    assert json.loads((out / "tensormerge.json").read_text())["method"] == "ties" and not (out / REPLACED).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_killed_after_the_rename_is_already_complete(fam, reference, tmp_path):
    out = tmp_path / "out"
    res = H.run_cli(_args(fam, "ties", out), env={ENV: "renamed:1"})
    assert res.returncode == -signal.SIGKILL, res
    assert (out / RESUME_DIR).exists()  # the only trace: the manifest, not yet removed
    res = H.run_cli(_args(fam, "ties", out, "--resume"))
    assert res.returncode == 0, res
    assert "already complete" in res.stdout
    assert not (out / RESUME_DIR).exists()
    assert H.shard_digests(out) == reference["ties"]


def test_resume_repairs_a_damaged_block(fam, reference, tmp_path):
    out = tmp_path / "out"
    res = H.run_cli(_args(fam, "ties", out), env={ENV: f"chunk:{CHUNKS - 1}"})
    assert res.returncode == -signal.SIGKILL, res
    partial = Path(str(out) + ".partial")
    shard = min(partial.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the last tensor of the first shard
    shard.write_bytes(bytes(data))
    report = out.parent / "report.json"
    res = H.run_cli(_args(fam, "ties", out, "--resume", "--report", str(report)))
    assert res.returncode == 0, res
    assert H.shard_digests(out) == reference["ties"]
    resumed = json.loads(report.read_text())["resumed"]
    assert resumed["chunks"] == CHUNKS - 2, resumed  # all recorded chunks but the damaged one


def test_resume_refuses_a_partial_output_of_another_merge(fam, tmp_path):
    out = tmp_path / "out"
    res = H.run_cli(_args(fam, "ties", out), env={ENV: "chunk:3"})
    assert res.returncode == -signal.SIGKILL, res
    res = H.run_cli(_args(fam, "ties", out, "--resume", "-p", "k=0.3"))
    H.assert_clean_error(res, "--resume", "different merge")
    assert Path(str(out) + ".partial").exists()  # refused, not destroyed
    res = H.run_cli(_args(fam, "dare", out, "--resume"))
    H.assert_clean_error(res, "--resume", "different merge")
    # without --resume a new merge starts over and says so
    res = H.run_cli(_args(fam, "ties", out, "-p", "k=0.3"))
    assert res.returncode == 0, res


def test_resume_without_a_partial_output_starts_afresh(fam, reference, tmp_path):
    out = tmp_path / "out"
    res = H.run_cli(_args(fam, "dare", out, "--resume"))
    assert res.returncode == 0, res
    assert H.shard_digests(out) == reference["dare"]
    res = H.run_cli(_args(fam, "ties", out, "--resume"))  # OUT exists and is another merge
    H.assert_clean_error(res, "exists")


def test_resume_with_other_memory_budget_reuses_matching_chunks(fam, reference, tmp_path):
    out = tmp_path / "out"
    res = H.run_cli(_args(fam, "ties", out), env={ENV: "chunk:12"})
    assert res.returncode == -signal.SIGKILL, res
    args = _args(fam, "ties", out, "--resume")
    args[args.index("--max-memory") + 1] = "150KiB"  # other chunking: only identical row ranges are kept
    res = H.run_cli(args)
    assert res.returncode == 0, res
    assert H.shard_digests(out) == reference["ties"]


def test_sigkill_from_outside_at_random_times(fam, reference, tmp_path):
    """Real kills at wall-clock times (wherever they land), then --resume until it completes."""
    rng = random.Random(11)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-m", "tensormerge", *_args(fam, "ties", out, "--resume")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 5.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():
            break
    res = H.run_cli(_args(fam, "ties", out, "--resume"))
    assert res.returncode == 0, res
    assert H.shard_digests(out) == reference["ties"]


def test_ctrl_c_keeps_the_partial_output_for_resume(fam, reference, tmp_path):
    """SIGINT (Ctrl-C) stops with status 130 and keeps OUT.partial (the one failure that does);
    --resume then completes it."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    p = subprocess.Popen([sys.executable, "-m", "tensormerge", *_args(fam, "ties", out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not Path(str(out) + ".partial").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    if p.returncode == 0:
        pytest.skip("the merge finished before SIGINT arrived")
    assert p.returncode == 130, err
    assert "--resume" in err
    assert Path(str(out) + ".partial").exists()
    res = H.run_cli(_args(fam, "ties", out, "--resume"))
    assert res.returncode == 0, res
    assert H.shard_digests(out) == reference["ties"]
