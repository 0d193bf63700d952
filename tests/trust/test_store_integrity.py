"""A statistics store is read completely or not at all, and --resume trusts nothing it did not
verify (issue 12, classes 3 and 4).

Zarr fills a chunk it cannot find with the array's fill value, so every case here (a deleted
chunk file, an array the consolidated metadata lists but the directory lacks, a fill value
that lies, a chunk replaced by another) merged silently different numbers before stores
recorded their chunks. The manifest cases plant what an attacker (or an old tensormerge) could
leave in OUT.partial: a pickle that would run code, a line that is not ours, a store replaced
between the crash and --resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from tensormerge.constants import RESUME_DIR
from tensormerge.engine.faults import ENV
from tensormerge.errors import InputError
from tensormerge.stats.store import StatsStore, row_chunks
from tests import helpers as H
from tests.conftest import write_family

TENSORS = {"big.w": ((2000, 8), torch.float32), "mid.w": ((600, 20), torch.float32), "vec": ((12,), torch.float32)}
BIG_ROWS = row_chunks((2000, 8))[0]  # 2000 rows of 8 float32 at ~1 MiB per chunk: one chunk
W_SHAPE = (2000, 300)  # 873 rows per chunk: three chunks, the last one short
CHUNKS_ATTR = "tensormerge_chunks"  # the array attribute of format 2 (SPEC §6), by its name on disk


def _fishers(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(shape, generator=g) + 0.1 for name, (shape, _) in TENSORS.items()}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    base, fts, _, _ = write_family(root / "models", TENSORS)
    stores = [H.write_store(root / f"s{i}.zarr", {"fisher": _fishers(10 + i)}) for i in range(3)]
    return {"root": root, "base": base, "inputs": fts, "stores": stores}


def _copy(fam, tmp_path, i=1) -> list[str]:
    """The family's stores with store `i` replaced by a copy under tmp_path, to be damaged."""
    stores = list(fam["stores"])
    stores[i] = str(tmp_path / f"copy{i}.zarr")
    shutil.copytree(fam["stores"][i], stores[i])
    return stores


def _run(fam, stores, out, method="fisher", *extra, timeout=120):
    return H.run_cli(["run", "--quiet", "--method", method, "--inputs", ",".join(fam["inputs"]),
                      "--base", fam["base"], "--stats", ",".join(stores), "--output", str(out), *extra],
                     timeout=timeout)


def _edit_metadata(store: str, edit) -> None:
    """Apply `edit(path_in_store, node_metadata)` to every node's zarr.json and to the copy in
    the root's consolidated metadata, as a hand edit or a copying tool would change both."""
    for dirpath, _, files in os.walk(store):
        if "zarr.json" in files:
            p = Path(dirpath) / "zarr.json"
            meta = json.loads(p.read_text())
            rel = os.path.relpath(dirpath, store).replace(os.sep, "/")
            edit(rel, meta)
            for key, node in (meta.get("consolidated_metadata") or {}).get("metadata", {}).items():
                edit(key, node)
            p.write_text(json.dumps(meta))


# ----------------------------------------------------------------------------- what is written
def test_every_array_records_its_chunk_count_and_crc32(tmp_path):
    w = torch.rand(W_SHAPE)
    w[873:1746] = 0  # an all-zero chunk: still written, so a missing file is never a legitimate fill
    path = H.write_store(tmp_path / "s.zarr", {"fisher": {"w": w, "s": torch.tensor(3.0), "e": torch.zeros(0)}})
    root = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert root["attributes"]["tensormerge_stats"] == 3
    rec = json.loads((tmp_path / "s.zarr" / "fisher" / "w" / "zarr.json").read_text())["attributes"][CHUNKS_ATTR]
    rows = 873
    data = w.numpy().astype("<f4")
    assert rec == {"rows": rows, "count": 3,
                   "crc32": [zlib.crc32(data[c * rows:(c + 1) * rows].tobytes()) for c in range(3)]}
    assert sorted(os.listdir(tmp_path / "s.zarr" / "fisher" / "w" / "c")) == ["0", "1", "2"]
    rec_s = json.loads((tmp_path / "s.zarr" / "fisher" / "s" / "zarr.json").read_text())["attributes"][CHUNKS_ATTR]
    assert rec_s == {"count": 1, "crc32": [zlib.crc32(np.array(3.0, dtype="<f4").tobytes())]}
    s = StatsStore(path)
    assert s.format == 3 and s.verified
    assert s.arrays["fisher"]["w"].attrs == {"count": None}  # the record is not one of the statistic's attrs
    assert torch.equal(s.read("fisher", "w", 900, 1000), w[900:1000])
    assert torch.equal(s.read("fisher", "w"), w) and s.read("fisher", "e").shape == (0,)
    for step in (97, 873, 1000):  # in order (the chunk a read ends inside is reused), then out of order
        got = [s.read("fisher", "w", r0, r0 + step) for r0 in range(0, 2000, step)]
        assert torch.equal(torch.cat(got), w)
    for r0, r1 in ((1800, 1900), (10, 20), (15, 900), (872, 874), (1999, 2000), (5, 5)):
        assert torch.equal(s.read("fisher", "w", r0, r1), w[r0:r1])


# ----------------------------------------------------------------------------- incomplete copies
def test_a_deleted_chunk_file_is_refused_naming_array_and_chunk(fam, tmp_path):
    stores = _copy(fam, tmp_path)
    os.remove(Path(stores[1]) / "fisher" / "mid.w" / "c" / "0" / "0")
    out = tmp_path / "out"
    H.assert_clean_error(_run(fam, stores, out), "copy1.zarr", "fisher/mid.w", "chunk 0 of 1", "missing",
                         out_dir=out)
    res = H.run_cli(["inspect", stores[1]])
    H.assert_clean_error(res, "fisher/mid.w", "chunk 0", "missing")


def test_a_chunk_lost_after_open_is_refused_when_read(tmp_path):
    w = torch.rand(W_SHAPE)
    path = H.write_store(tmp_path / "s.zarr", {"fisher": {"w": w}})
    for url in (path, "file://" + path):
        s = StatsStore(url)
        assert torch.equal(s.read("fisher", "w", 0, 10), w[:10])
        chunk = Path(path) / "fisher" / "w" / "c" / "1" / "0"
        saved = chunk.read_bytes()
        chunk.unlink()
        with pytest.raises(InputError, match=r"fisher/w: chunk 1 of 3 \(rows 873-1745\) is missing"):
            s.read("fisher", "w", 1000, 1001)  # a partial read of the chunk checks all of it
        assert torch.equal(s.read("fisher", "w", 1746, 2000), w[1746:])  # other chunks still read
        chunk.write_bytes(saved)


def test_an_array_listed_in_consolidated_metadata_but_gone_is_refused(fam, tmp_path):
    stores = _copy(fam, tmp_path, 2)
    shutil.rmtree(Path(stores[2]) / "fisher" / "vec")
    out = tmp_path / "out"
    H.assert_clean_error(_run(fam, stores, out), "copy2.zarr", "fisher/vec", "missing", out_dir=out)


def test_a_fill_value_that_lies_cannot_stand_in_for_a_chunk(tmp_path):
    w = torch.rand(W_SHAPE)
    w[873:1746] = 0  # the writer of format 1 left this chunk unwritten (it equals the fill value)
    path = H.write_store(tmp_path / "s.zarr", {"fisher": {"w": w}})

    def lie(rel, node):
        if rel == "fisher/w":
            node["fill_value"] = 0.5

    _edit_metadata(path, lie)
    assert torch.equal(StatsStore(path).read("fisher", "w"), w)  # the chunk file is there: the lie is moot
    chunk = Path(path) / "fisher" / "w" / "c" / "1" / "0"
    if chunk.exists():
        chunk.unlink()
    with pytest.raises(InputError, match="fisher/w: chunk 1 of 3 .* is missing"):
        StatsStore(path).read("fisher", "w")


def test_a_chunk_replaced_by_another_is_refused(fam, tmp_path):
    w = torch.rand(W_SHAPE)
    path = H.write_store(tmp_path / "s.zarr", {"fisher": {"w": w}})
    c = Path(path) / "fisher" / "w" / "c"
    shutil.copyfile(c / "0" / "0", c / "1" / "0")  # a valid chunk, other values
    s = StatsStore(path)
    assert torch.equal(s.read("fisher", "w", 0, 873), w[:873])
    with pytest.raises(InputError, match="fisher/w: chunk 1 of 3 .* does not match its recorded crc32"):
        s.read("fisher", "w", 900, 901)
    # through a merge: the Fisher block of mid.w (one chunk) swapped for another store's
    stores = _copy(fam, tmp_path, 0)
    shutil.copyfile(Path(fam["stores"][2]) / "fisher" / "mid.w" / "c" / "0" / "0",
                    Path(stores[0]) / "fisher" / "mid.w" / "c" / "0" / "0")
    out = tmp_path / "out"
    H.assert_clean_error(_run(fam, stores, out), "copy0.zarr", "fisher/mid.w", "crc32", out_dir=out)


def test_an_array_of_a_version_2_store_without_its_record_is_refused(fam, tmp_path):
    stores = _copy(fam, tmp_path)

    def drop(rel, node):
        if rel == "fisher/big.w":
            node["attributes"].pop(CHUNKS_ATTR, None)

    _edit_metadata(stores[1], drop)
    out = tmp_path / "out"
    H.assert_clean_error(_run(fam, stores, out), "copy1.zarr", "fisher/big.w", "no chunk checksums", out_dir=out)


def test_a_version_1_store_still_opens_unverified(fam, tmp_path):
    stores = _copy(fam, tmp_path)

    def downgrade(rel, node):
        node.get("attributes", {}).pop(CHUNKS_ATTR, None)
        if rel == ".":
            node["attributes"]["tensormerge_stats"] = 1

    _edit_metadata(stores[1], downgrade)
    s = StatsStore(stores[1])
    assert s.format == 1 and not s.verified
    assert torch.equal(s.read("fisher", "big.w", 5, 9), _fishers(11)["big.w"][5:9])
    out = tmp_path / "out"
    res = H.run_cli(["run", "--method", "fisher", "--inputs", ",".join(fam["inputs"]), "--stats", ",".join(stores),
                     "--output", str(out)])
    assert res.returncode == 0, res
    assert f"unverified {stores[1]}" in res.stderr  # the plan says which store cannot be verified
    ref = tmp_path / "ref"
    assert _run(fam, fam["stores"], ref).returncode == 0
    assert H.shard_digests(out) == H.shard_digests(ref)  # same values, same bytes
    assert "no chunk checksums" in H.run_cli(["inspect", stores[1]]).stdout


# ----------------------------------------------------------------------------- not regular files
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_a_store_is_refused_not_waited_on(fam, tmp_path):
    stores = _copy(fam, tmp_path)
    chunk = Path(stores[1]) / "fisher" / "big.w" / "c" / "0" / "0"
    chunk.unlink()
    os.mkfifo(chunk)  # a chunk that is a FIFO: reading it blocks until a writer comes
    out = tmp_path / "out"
    H.assert_clean_error(_run(fam, stores, out, timeout=60), str(chunk), "not a regular file", out_dir=out)
    H.assert_clean_error(H.run_cli(["inspect", stores[1]], timeout=60), str(chunk), "not a regular file")
    # array metadata as a FIFO (zarr reads it at open), and a FIFO as the store itself
    meta = Path(stores[1]) / "fisher" / "vec" / "zarr.json"
    meta.unlink()
    os.mkfifo(meta)
    H.assert_clean_error(H.run_cli(["inspect", stores[1]], timeout=60), "not a regular file")
    os.mkfifo(tmp_path / "fifo.zarr")
    stores[1] = str(tmp_path / "fifo.zarr")
    H.assert_clean_error(_run(fam, stores, out, timeout=60), "fifo.zarr", "not a regular file", out_dir=out)


# ----------------------------------------------------------------------------- resume
SPEC = H.CHUNKED_SPEC


@pytest.fixture(scope="module")
def rfam(tmp_path_factory):
    """TIES (global passes and exactly-cancelling entries whose patches are replayed from the
    manifest) and RegMean (statistics) on the resume tests' family."""
    root = tmp_path_factory.mktemp("resume-trust")
    base, ins = H.save_cancelling_family(root)
    stores = [H.write_store(root / f"s{i}.zarr", {"gram_in": _grams(i)}) for i in range(3)]
    fam = {"root": root, "base": base, "inputs": ins, "stats": stores}
    for method in ("ties", "regmean"):
        out = root / f"ref-{method}"
        assert H.run_cli(_rargs(fam, method, out)).returncode == 0
        fam[method] = H.shard_digests(out)
    return fam


def _grams(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("l0.w", "l1.w"):
        d = SPEC[name][0][1]
        x = torch.randn(4 * d, d, generator=g)
        out[name] = scale * x.T @ x / x.shape[0]
    return out


def _rargs(fam, method: str, out: Path, *extra: str, stats=None) -> list[str]:
    args = ["run", "--method", method, "--inputs", ",".join(fam["inputs"]), "--output", str(out),
            "--max-memory", "200KiB" if method == "ties" else "1536KiB", "--shard-size", "40KB", "-q", *extra]
    if method == "regmean":
        return args + ["--stats", ",".join(stats or fam["stats"])]
    return args + ["--base", fam["base"]]


def _killed(fam, method: str, out: Path, point: str, stats=None, setup: str = "") -> Path:
    res = H.run_cli(_rargs(fam, method, out, stats=stats), env={ENV: point}, setup=setup)
    assert res.returncode == -signal.SIGKILL, res
    return Path(str(out) + ".partial") / RESUME_DIR


def _lines(resume: Path) -> list[dict]:
    return [json.loads(x) for x in (resume / "manifest.jsonl").read_text().splitlines()]


def _write_lines(resume: Path, lines: list[dict]) -> None:
    (resume / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


class _Plant:
    """Unpickling this creates a file: proof that a manifest's blob was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# TIES without its vote pass (as a run before it was added): its chunks log their undecided
# entries, which the manifest keeps as chunk blobs and a resume (with the pass) still patches
NO_VOTE_PASS = ("from tensormerge.methods import ties as T\n"
                "_passes = T.Ties.passes\n"
                "T.Ties.passes = lambda self, p: [x for x in _passes(self, p) if not isinstance(x, T._VotePass)]\n")


def test_the_manifest_holds_data_not_pickles(rfam, tmp_path):
    out = tmp_path / "out"
    resume = _killed(rfam, "ties", out, "chunk:14", setup=NO_VOTE_PASS)  # after the passes and logged chunks
    blobs = [p for p in resume.iterdir() if p.name != "manifest.jsonl"]
    assert any(p.name.startswith("pass") for p in blobs) and any(p.name.startswith("chunk") for p in blobs)
    for p in blobs:
        data = p.read_bytes()  # a safetensors file (not a pickle) whose metadata holds the state as JSON
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        json.loads(header["__metadata__"]["tensormerge_state"])
        safetensors.torch.load(data)
    res = H.run_cli(_rargs(rfam, "ties", out, "--resume"))
    assert res.returncode == 0, res
    assert H.shard_digests(out) == rfam["ties"]


def test_a_planted_pickle_is_never_loaded(rfam, tmp_path):
    out = tmp_path / "out"
    resume = _killed(rfam, "ties", out, "chunk:14")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Plant(str(marker)))
    lines = _lines(resume)
    planted = 0
    for rec in lines:
        if rec.get("blob"):  # every pass state and chunk extra, its sha256 made to match
            (resume / rec["blob"]).write_bytes(payload)
            rec["sha256"] = hashlib.sha256(payload).hexdigest()
            planted += 1
    assert planted >= 5
    _write_lines(resume, lines)
    res = H.run_cli(_rargs(rfam, "ties", out, "--resume"))
    assert not marker.exists(), "a blob of the manifest was unpickled"
    assert res.returncode == 0, res  # the planted blobs are treated as lost: their work is redone
    assert H.shard_digests(out) == rfam["ties"]


def test_a_manifest_of_the_pickle_format_is_refused_unread(rfam, tmp_path):
    out = tmp_path / "out"
    resume = _killed(rfam, "ties", out, "chunk:14")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Plant(str(marker)))
    lines = _lines(resume)
    lines[0]["tensormerge_manifest"] = 1  # as tensormerge wrote it before: pickled blobs
    for rec in lines:
        if rec.get("blob"):
            (resume / rec["blob"]).write_bytes(payload)
            rec["sha256"] = hashlib.sha256(payload).hexdigest()
    _write_lines(resume, lines)
    res = H.run_cli(_rargs(rfam, "ties", out, "--resume"))
    H.assert_clean_error(res, "manifest.jsonl", "format 1", "without --resume")
    assert not marker.exists()
    assert Path(str(out) + ".partial").exists()  # refused, not destroyed


def test_a_malformed_manifest_line_is_one_line_error_and_a_torn_last_line_is_cut(rfam, tmp_path):
    out = tmp_path / "out"
    resume = _killed(rfam, "ties", out, "chunk:6")
    log = resume / "manifest.jsonl"
    good = log.read_text()
    first, rest = good.split("\n", 1)
    for bad in ('{"chunk": "l0.w", "crc32": 1, "nbytes": 4}', "not json", '{"pass": "0"}'):
        log.write_text(first + "\n" + bad + "\n" + rest)
        res = H.run_cli(_rargs(rfam, "ties", out, "--resume"))
        H.assert_clean_error(res, "manifest.jsonl", "line 2", "without --resume")
    log.write_text(good + '{"chunk": ["l1.w", 0, ')  # a crash mid-append
    res = H.run_cli(_rargs(rfam, "ties", out, "--resume"))
    assert res.returncode == 0, res
    assert H.shard_digests(out) == rfam["ties"]


def test_a_store_replaced_between_the_crash_and_resume_is_detected(rfam, tmp_path):
    stores = []
    for i in range(3):
        stores.append(str(tmp_path / f"s{i}.zarr"))
        shutil.copytree(rfam["stats"][i], stores[i])
    out = tmp_path / "out"
    _killed(rfam, "regmean", out, "chunk:2", stats=stores)
    # the same names, shapes, attributes and sizes on disk; other Grams
    H.write_store(stores[1], {"gram_in": _grams(1, scale=2.0)})
    res = H.run_cli(_rargs(rfam, "regmean", out, "--resume", stats=stores))
    H.assert_clean_error(res, "--resume", "different merge")
    # put back, the interrupted merge resumes
    H.write_store(stores[1], {"gram_in": _grams(1)})
    res = H.run_cli(_rargs(rfam, "regmean", out, "--resume", "--report", str(tmp_path / "r.json"), stats=stores))
    assert res.returncode == 0, res
    assert json.loads((tmp_path / "r.json").read_text())["resumed"]["chunks"] >= 1
    assert H.shard_digests(out) == rfam["regmean"]
