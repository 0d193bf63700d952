"""The output directory (SPEC §2): shards and index, side files, provenance, atomic finish."""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys
import zlib

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402

from tensormerge import api  # noqa: E402
from tensormerge.engine.safetensors_format import read_header  # noqa: E402
from tensormerge.engine.writer import ShardedWriter, shard_layout  # noqa: E402
from tensormerge.errors import OutputError  # noqa: E402


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    base_spec, ft_specs, base, fts = H.write_family(root, n=3)
    return root, base_spec, ft_specs, base, fts


def merge(fam, out, **kw):
    root, base_spec, ft_specs, _, _ = fam
    kw.setdefault("method", "average")
    spec = api.MergeSpec(inputs=ft_specs, base=base_spec, output=str(out), quiet=True, **kw)
    return api.merge(spec)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@pytest.fixture(scope="module")
def unsharded(fam, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    report = merge(fam, out)
    return out, report


def test_single_shard_output(fam, unsharded):
    _, _, _, base, fts = fam
    out, report = unsharded
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
    assert report["shards"] == ["model.safetensors"]
    merged = H.load_dir(out)
    assert list(merged) == sorted(base)  # safe_open lists sorted; every name present
    exp = H.expected_average(fts)
    for n, t in base.items():
        if t.dtype.is_floating_point:
            H.assert_close(merged[n], exp[n], t.dtype, n)
        else:
            assert torch.equal(merged[n], t)
    # the header is a valid safetensors header, with metadata format=pt, 8-byte aligned data
    entries, meta, aliases = read_header(str(out / "model.safetensors"))
    assert meta == {"format": "pt"} and aliases == []
    assert (min(e.begin for e in entries.values())) % 8 == 0
    assert set(entries) == set(base)


def test_sharded_layout_matches_unsharded(fam, unsharded, tmp_path):
    _, _, _, base, _ = fam
    single, _ = unsharded
    out = tmp_path / "out"
    report = merge(fam, out, shard_size="10KB")
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 2
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert report["shards"] == files
    assert not (out / "model.safetensors").exists()

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    ref = H.load_dir(single)
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in ref.values())
    assert set(index["weight_map"]) == set(base)
    assert set(index["weight_map"].values()) == set(files)

    seen = set()
    for fname in files:
        with safe_open(str(out / fname), framework="pt") as f:
            keys = set(f.keys())
            assert keys == {k for k, v in index["weight_map"].items() if v == fname}
            size = sum(nbytes(f.get_tensor(k)) for k in keys)
            # each shard within the limit unless a single tensor is larger than it
            assert size <= 10_000 or len(keys) == 1
            for k in keys:
                assert torch.equal(f.get_tensor(k), ref[k]), k
            seen |= keys
    assert seen == set(base)
    # data of each shard begins right after its header; file size = header + data
    for fname in files:
        entries, _, _ = read_header(str(out / fname))
        assert (out / fname).stat().st_size == max(e.end for e in entries.values())


def test_sharded_output_loads_with_transformers_style_index(fam, tmp_path):
    """The shard grouping is greedy in output order, like transformers' own sharding."""
    tensors = [("a", torch.float32, (10,)), ("b", torch.float32, (10,)), ("c", torch.float32, (30,)),
               ("d", torch.float16, (4,)), ("e", torch.float32, (1,))]
    assert shard_layout(tensors, 80) == [[0, 1], [2], [3, 4]]
    assert shard_layout(tensors, 10**9) == [[0, 1, 2, 3, 4]]
    assert shard_layout(tensors, 1) == [[0], [1], [2], [3], [4]]


def test_side_files_copied_byte_identical_weights_not(fam, unsharded):
    root, base_spec, _, _, _ = fam
    out, _ = unsharded
    base_dir = pathlib.Path(base_spec)
    for fname in H.SIDE_FILES:
        if fname != "config.json":
            assert (out / fname).read_bytes() == (base_dir / fname).read_bytes(), fname
    # config.json: the base's, stating the dtype of most written floating-point elements
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {**json.loads(H.SIDE_FILES["config.json"]), "torch_dtype": "float32"}
    names = {p.name for p in out.iterdir()}
    # the output's own card and recipe (engine/card.py), not the base's
    assert names == set(H.SIDE_FILES) | {"model.safetensors", "tensormerge.json", "README.md", "tensormerge-recipe.yaml"}


def test_side_files_from_first_input_without_base(tmp_path):
    base, fts = H.make_family(2, seed=5)
    a = H.save_sharded_safetensors(tmp_path / "a", fts[0], n_shards=2, side_files=False)
    (a / "config.json").write_text('{"from": "first input"}')
    (a / "tokenizer.model").write_bytes(bytes(range(256)))
    (a / "pytorch_model.bin").write_bytes(b"not copied")  # a stray weight file is not a side file
    b = H.save_safetensors_dir(tmp_path / "b", fts[1])
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="average", inputs=[str(a), str(b)], output=str(out), quiet=True))
    assert json.loads((out / "config.json").read_text()) == {"from": "first input", "torch_dtype": "float32"}
    assert (out / "tokenizer.model").read_bytes() == bytes(range(256))
    assert not (out / "pytorch_model.bin").exists()
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert not (out / "tokenizer.json").exists()  # b's side files are not used
    merged = H.load_dir(out)
    exp = H.expected_average(fts)
    for n, e in exp.items():
        H.assert_close(merged[n], e, fts[0][n].dtype, n)


def test_provenance(fam, tmp_path):
    root, base_spec, ft_specs, base, _ = fam
    out = tmp_path / "out"
    report = merge(fam, out, method="ties", params={"k": "0.5", "lambda": "0.8"}, shard_size="20KB")
    prov = json.loads((out / "tensormerge.json").read_text())
    assert prov["method"] == "ties"
    assert prov["params"]["k"] == 0.5 and prov["params"]["lambda"] == 0.8 and prov["params"]["sign"] == "mass"
    assert prov["params"] == report["params"]
    assert [i["spec"] for i in prov["inputs"]] == ft_specs
    assert prov["base"]["spec"] == base_spec
    for fp, spec in zip(prov["inputs"] + [prov["base"]], ft_specs + [base_spec]):
        assert re.fullmatch(r"[0-9a-f]{64}", fp["fingerprint"])
        assert fp["tensors"] == len(base)
        assert fp["files"] == {"model.safetensors": (pathlib.Path(spec) / "model.safetensors").stat().st_size}
    # inputs differ in values only: fingerprints are of names/shapes/dtypes/sizes, so equal
    assert len({fp["fingerprint"] for fp in prov["inputs"] + [prov["base"]]}) == 1
    # ... and their content digests differ (tests/engine/test_provenance.py checks their values)
    assert len({fp["content"]["digest"] for fp in prov["inputs"] + [prov["base"]]}) == len(ft_specs) + 1
    assert "torch" in prov["versions"] and "safetensors" in prov["versions"]
    assert prov["tensormerge"]
    # per-block checksums are crc32 of the bytes written (after TIES' patches)
    merged = H.load_dir(out)
    assert set(prov["blocks"]) == set(base)
    for name, blk in prov["blocks"].items():
        crc = zlib.crc32(merged[name].contiguous().reshape(-1).view(torch.uint8).numpy())
        assert blk["crc32"] == f"{crc:08x}", name
        assert blk["chunks"] >= 1
    assert {b["name"]: b["crc32"] for b in report["blocks"]} == {n: b["crc32"] for n, b in prov["blocks"].items()}


def test_overwrite_and_refusal(fam, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputError, match="exists"):
        merge(fam, out)
    assert (out / "keep.txt").read_text() == "old"
    assert not pathlib.Path(str(out) + ".partial").exists()
    with pytest.raises(OutputError, match="not a tensormerge output"):
        merge(fam, out, overwrite=True)  # --overwrite replaces only a previous output (or an empty directory)
    assert (out / "keep.txt").read_text() == "old"
    (out / "keep.txt").unlink()
    merge(fam, out, overwrite=True)  # empty
    (out / "stale.txt").write_text("beside a previous output")
    with pytest.raises(OutputError, match="'stale.txt', which that merge did not write"):
        merge(fam, out, overwrite=True)  # a file the user put there is not the previous output's
    assert (out / "stale.txt").read_text() == "beside a previous output"
    (out / "stale.txt").unlink()
    merge(fam, out, overwrite=True)  # a previous tensormerge output
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old, .partial or lock beside it


def test_stale_partial_is_replaced(fam, tmp_path):
    out = tmp_path / "out"
    partial = pathlib.Path(str(out) + ".partial")
    (partial / ".tensormerge-resume").mkdir(parents=True)  # a run's manifest marks it as a run's (engine/outdir)
    (partial / ".tensormerge-resume" / "manifest.jsonl").write_text('{"tensormerge_manifest":2,"fingerprint":"x"}\n')
    (partial / "junk.safetensors").write_bytes(b"junk")
    merge(fam, out)
    assert not partial.exists()
    assert not (out / "junk.safetensors").exists()
    assert (out / "model.safetensors").exists()


def test_writer_offsets_and_abort(tmp_path):
    tensors = [("x", torch.float32, (5, 3)), ("y", torch.bfloat16, (7,)), ("z", torch.int64, (2, 2))]
    w = ShardedWriter(str(tmp_path / "o"), tensors, shard_size=40)
    assert w.files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                       "model-00003-of-00003.safetensors"]
    assert w.total_size == 60 + 14 + 32
    w.create()
    x = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    # rows written out of order at their byte offsets
    w.write("x", 3 * 12, x[3:])
    w.write("x", 0, x[:3])
    raw = x.reshape(-1).view(torch.uint8).numpy()
    assert w.crc32("x") == zlib.crc32(raw)
    assert w.crc32("x", 12, 24) == zlib.crc32(raw[12:36])
    assert w.last_in_file("x") and w.last_in_file("y")
    w.abort()
    assert not (tmp_path / "o.partial").exists() and not (tmp_path / "o").exists()


def test_writer_patch(tmp_path):
    tensors = [("x", torch.bfloat16, (4, 4))]
    w = ShardedWriter(str(tmp_path / "o"), tensors, shard_size=10**9)
    w.create()
    w.write("x", 0, torch.zeros(4, 4, dtype=torch.bfloat16))
    w.patch("x", torch.tensor([0, 5, 15]), torch.tensor([1.5, -2.0, 3.0]))
    w.finish(None, {"method": "test"}, overwrite=False)
    got = H.load_dir(tmp_path / "o")["x"]
    exp = torch.zeros(16, dtype=torch.bfloat16)
    exp[[0, 5, 15]] = torch.tensor([1.5, -2.0, 3.0], dtype=torch.bfloat16)
    assert torch.equal(got.reshape(-1), exp)
    assert json.loads((tmp_path / "o" / "tensormerge.json").read_text()) == {
        "method": "test", "files": ["model.safetensors", "tensormerge.json"]}
    assert math.prod(got.shape) == 16
