"""Provenance that identifies the inputs: `tensormerge.json` records, per input, the cheap
`fingerprint` (names, shapes, sizes: what --resume matches), a `content` digest of every byte
of every tensor, and for a hub input its commit and the blobs' sha256s.

Expected digests are computed here from the files alone (the safetensors header parsed with
json, tensor bytes checksummed with zlib, files hashed with hashlib), never by the engine."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import zlib
from pathlib import Path

import pytest
import torch

from tensormerge import api
from tensormerge.engine.faults import ENV
from tests import helpers as H

SPEC = H.CHUNKED_SPEC


def expected_content(model_dir: str) -> str:
    """The documented digest, from the files: sha256 over sorted 'name dtype shape crc32' lines,
    the crc32 of each tensor's bytes as stored (here every file is a plain safetensors file)."""
    d = Path(model_dir)
    files = sorted(p for p in d.iterdir() if p.name.endswith(".safetensors"))
    lines = []
    names = {"F32": "float32", "BF16": "bfloat16", "I64": "int64", "F16": "float16"}
    for p in files:
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        for name, e in header.items():
            if name == "__metadata__":
                continue
            a, b = e["data_offsets"]
            crc = zlib.crc32(raw[8 + n + a:8 + n + b])
            lines.append(f"{name}\t{names[e['dtype']]}\t{list(e['shape'])}\t{crc:08x}\n")
    return hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """CHUNKED_SPEC's base and two fine-tunes, plus a copy of the first fine-tune with one
    bf16 value changed (same names, shapes and file sizes: the same fingerprint)."""
    root = tmp_path_factory.mktemp("prov")
    base, fts = H.make_family(2, spec=SPEC)
    twin = {k: v.clone() for k, v in fts[0].items()}
    twin["emb.weight"][123, 7] += 1.0
    assert not torch.equal(twin["emb.weight"], fts[0]["emb.weight"])
    return {"base": H.save(root / "base", base), "ft0": H.save(root / "ft0", fts[0]),
            "ft1": H.save(root / "ft1", fts[1]), "twin": H.save(root / "twin", twin), "root": root}


def _args(fam, out: Path, inputs: list[str], *extra: str, method: str = "ties") -> list[str]:
    return ["run", "--method", method, "--inputs", ",".join(inputs), "--base", fam["base"], "--output", str(out),
            "--shard-size", "40KB", "-q", *extra]


def _provenance(fam, out: Path, *extra: str, inputs=None, method: str = "ties") -> dict:
    res = H.run_cli(_args(fam, out, inputs or [fam["ft0"], fam["ft1"]], *extra, method=method), timeout=300)
    assert res.returncode == 0, res
    return json.loads((out / "tensormerge.json").read_text())


def _digests(prov: dict) -> list[str]:
    return [x["content"]["digest"] for x in prov["inputs"]] + [prov["base"]["content"]["digest"]]


@pytest.fixture(scope="module")
def reference(fam):
    report = fam["root"] / "reference.json"
    prov = _provenance(fam, fam["root"] / "reference", "--max-memory", "200KiB", "--report", str(report))
    prov["report"] = json.loads(report.read_text())
    return prov


def test_content_digests_are_those_of_the_files(fam, reference):
    assert _digests(reference) == [expected_content(fam["ft0"]), expected_content(fam["ft1"]),
                                   expected_content(fam["base"])]
    for rec in reference["inputs"] + [reference["base"]]:
        assert rec["content"]["tensors"] == len(SPEC)
        assert rec["content"]["bytes"] == sum(torch.empty(s, dtype=d).nbytes for s, d in SPEC.values())
        assert "sha256" not in rec and len(rec["fingerprint"]) == 64
        assert not any(k in rec for k in ("repo", "revision", "hub_files"))  # local files
    assert reference["report"]["content_bytes_reread"] == 0  # all hashed as the merge read it


def test_two_finetunes_differing_in_one_value_record_different_content(fam, reference, tmp_path):
    prov = _provenance(fam, tmp_path / "twin", "--max-memory", "200KiB", inputs=[fam["twin"], fam["ft1"]])
    a, b = reference["inputs"][0], prov["inputs"][0]
    assert a["fingerprint"] == b["fingerprint"] and a["files"] == b["files"]  # the cheap identity cannot tell
    assert a["content"]["digest"] != b["content"]["digest"]
    assert b["content"]["digest"] == expected_content(fam["twin"])
    assert prov["inputs"][1] == reference["inputs"][1]


@pytest.mark.parametrize("budget", ["8MiB", "96KiB"])
def test_content_does_not_depend_on_chunking(fam, reference, tmp_path, budget):
    assert _digests(_provenance(fam, tmp_path / "out", "--max-memory", budget)) == _digests(reference)


def test_content_does_not_depend_on_thread_count(fam, reference, tmp_path):
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = tmp_path / f"t{n}"
            api.merge(api.MergeSpec(method="ties", inputs=[fam["ft0"], fam["ft1"]], base=fam["base"],
                                    output=str(out), max_memory="200KiB", shard_size="40KB", quiet=True))
            assert _digests(json.loads((out / "tensormerge.json").read_text())) == _digests(reference)
    finally:
        torch.set_num_threads(threads)


def test_content_on_a_dask_cluster(fam, reference, tmp_path):
    pytest.importorskip("distributed")
    assert _digests(_provenance(fam, tmp_path / "dask", "--max-memory", "200KiB", "--workers", "2")) \
        == _digests(reference)


@pytest.mark.parametrize("point", ["chunk:5", "finished:1"])
def test_content_of_a_resumed_merge(fam, reference, tmp_path, point):
    """Chunks the interrupted run finished are not merged again; their input rows are read once
    more after the merge, so the digests still cover every byte."""
    out = tmp_path / "out"
    args = _args(fam, out, [fam["ft0"], fam["ft1"]], "--max-memory", "200KiB")
    res = H.run_cli(args, env={ENV: point})
    assert res.returncode == -signal.SIGKILL, res
    report = tmp_path / "report.json"
    res = H.run_cli(args + ["--resume", "--report", str(report)])
    assert res.returncode == 0, res
    rep = json.loads(report.read_text())
    if point.startswith("chunk"):
        assert rep["resumed"]["chunks"] >= 5 and rep["content_bytes_reread"] > 0
    prov = json.loads((out / "tensormerge.json").read_text())
    assert _digests(prov) == _digests(reference)
    assert prov["fingerprint"] == reference["fingerprint"]


def test_a_base_the_method_does_not_read_is_hashed_after_the_merge(fam, tmp_path):
    report = tmp_path / "report.json"
    prov = _provenance(fam, tmp_path / "avg", "--max-memory", "200KiB", "--report", str(report), method="average")
    assert prov["base"]["content"]["digest"] == expected_content(fam["base"])
    floats = sum(torch.empty(s, dtype=d).nbytes for s, d in SPEC.values() if d.is_floating_point)
    assert json.loads(report.read_text())["content_bytes_reread"] == floats  # the copied int64 was read


def test_a_bin_checkpoint_records_the_content_of_its_safetensors_twin(fam, tmp_path):
    sd = H.load_dir(Path(fam["ft0"]))
    binary = H.save(tmp_path / "bin", sd, fmt="bin_dir")
    prov = _provenance(fam, tmp_path / "out", "--max-memory", "200KiB", inputs=[binary, fam["ft1"]])
    assert prov["inputs"][0]["content"]["digest"] == expected_content(fam["ft0"])


def test_hub_inputs_record_commit_and_blob_sha256(hub_cache, tmp_path):
    base, fts = H.make_family(2, seed=4)
    H.make_hub_cache(hub_cache, "org/base", base)
    c1 = H.make_hub_cache(hub_cache, "org/ft1", fts[0], commit="a" * 40, n_shards=2)
    c2 = H.make_hub_cache(hub_cache, "org/ft2", fts[1], commit="b" * 40)
    # a small file as the hub stores it: its blob named by the git blob sha1, not a sha256
    snap = hub_cache / "models--org--ft2" / "snapshots" / c2
    data = b'{"note": "small"}'
    sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    (hub_cache / "models--org--ft2" / "blobs" / sha1).write_bytes(data)
    os.symlink(os.path.join("..", "..", "blobs", sha1), snap / "small_note.txt")
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="task_arithmetic", inputs=["org/ft1", "org/ft2@main"], base="org/base",
                            output=str(out), params={"lambda": "0.5"}, quiet=True))
    prov = json.loads((out / "tensormerge.json").read_text())
    for rec, repo, commit in ((prov["inputs"][0], "org/ft1", c1), (prov["inputs"][1], "org/ft2", c2)):
        assert (rec["repo"], rec["revision"]) == (repo, commit)
        snap = hub_cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
        files = sorted(p.name for p in snap.iterdir())
        assert sorted(rec["hub_files"]) == files
        for f in files:
            if f == "small_note.txt":
                assert rec["hub_files"][f] == {"git_sha1": sha1}
            else:
                assert rec["hub_files"][f] == {"sha256": hashlib.sha256((snap / f).read_bytes()).hexdigest()}
        assert rec["content"]["digest"] == expected_content(snap)
    assert prov["base"]["repo"] == "org/base" and "safetensors" in "".join(prov["base"]["hub_files"])


def test_a_snapshot_named_by_path_is_recorded_as_the_hub_commit(hub_cache):
    from tensormerge.engine.provenance import hub_snapshot
    from tensormerge.engine.sources import open_checkpoint

    commit = H.make_hub_cache(hub_cache, "org/name", H.make_family(1, seed=2)[0], commit="c" * 40)
    snap = hub_cache / "models--org--name" / "snapshots" / commit
    for spec in (str(snap), str(snap / "model.safetensors")):
        ck = open_checkpoint(spec)
        try:
            rec = hub_snapshot(ck)
        finally:
            ck.close()
        assert (rec["repo"], rec["revision"]) == ("org/name", commit)
        digest = hashlib.sha256((snap / "model.safetensors").read_bytes()).hexdigest()
        assert rec["hub_files"]["model.safetensors"] == {"sha256": digest}
    local = hub_cache.parent / "local"
    H.save(local, H.make_family(1, seed=2)[0])
    ck = open_checkpoint(str(local))
    assert hub_snapshot(ck) is None
    ck.close()
