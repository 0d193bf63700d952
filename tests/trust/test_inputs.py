"""Issue 12, classes 5 and 6: inputs whose meaning differs are refused or handled, never merged
silently; the Hugging Face cache works as the hub client lays it out (snapshot files are
symlinks into ../../blobs), and every file read or copied stays inside its checkpoint."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402

from tensormerge import api  # noqa: E402
from tensormerge.engine.sources import open_checkpoint  # noqa: E402
from tensormerge.errors import InputError  # noqa: E402

ALL_METHODS = ("average", "task_arithmetic", "ties", "dare", "fisher", "regmean", "mats", "ubgm")
NEEDS_BASE = ("task_arithmetic", "ties", "dare", "mats", "ubgm")
NEEDS_STATS = ("fisher", "regmean", "mats", "ubgm")


def run(args, cwd):
    return H.run_cli(["run", "--quiet", *map(str, args)], cwd=cwd)


def merge_args(method, inputs, base, out, *extra):
    args = ["--method", method, "--inputs", ",".join(map(str, inputs)), "--output", str(out)]
    if base is not None:
        args += ["--base", str(base)]
    return args + [str(x) for x in extra]


def raw_safetensors(path: pathlib.Path, header: dict, data: bytes) -> pathlib.Path:
    """A safetensors file with exactly this header and data section (no validation)."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def toy(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g),
            "ids": torch.arange(6, dtype=torch.int64).reshape(1, 6), "mask": torch.tensor([True, False, True])}


# ------------------------------------------------------------------------------- dtype kinds
@pytest.mark.parametrize("case", ["int_base_float_ft", "float_base_int_ft", "bool_vs_int"])
def test_dtype_kind_that_differs_is_refused_naming_tensor_and_models(tmp_path, case):
    """Before: an int64 base tensor with a float32 fine-tune of the same values was copied (torch.equal
    compares across dtypes); a float base with an int fine-tune was averaged as floats."""
    base, ft1, ft2 = toy(0), toy(0), toy(0)
    if case == "int_base_float_ft":
        ft2["ids"] = ft2["ids"].float()
    elif case == "float_base_int_ft":
        base["ids"], ft1["ids"] = base["ids"].float(), ft1["ids"].float()
    else:
        ft2["mask"] = ft2["mask"].to(torch.uint8)
    pb, p1, p2 = (H.save_safetensors_dir(tmp_path / n, sd) for n, sd in (("base", base), ("ft1", ft1), ("ft2", ft2)))
    out = tmp_path / "out"
    name = "'mask'" if case == "bool_vs_int" else "'ids'"
    res = run(merge_args("task_arithmetic", [p1, p2], pb, out), tmp_path)
    H.assert_clean_error(res, name, str(pb), str(p2), out_dir=out)


def test_integer_and_bool_tensors_that_agree_are_copied_from_the_base(tmp_path):
    """Equal values in another integer width still agree; the output has the base's dtype and bytes."""
    base, ft1, ft2 = toy(0), toy(1), toy(2)
    ft2["ids"] = ft2["ids"].to(torch.int32)
    pb, p1, p2 = (H.save_safetensors_dir(tmp_path / n, sd) for n, sd in (("base", base), ("ft1", ft1), ("ft2", ft2)))
    for method, b in (("task_arithmetic", pb), ("average", None)):
        out = tmp_path / f"out-{method}"
        res = run(merge_args(method, [p1, p2] if b else [p2, p1], b, out), tmp_path)
        assert res.returncode == 0, res
        got = load_file(str(out / "model.safetensors"))
        ref = base if b else ft2
        for n in ("ids", "mask"):
            assert got[n].dtype == ref[n].dtype and torch.equal(got[n], ref[n]), n


# ------------------------------------------------------------------------------- tied lm_head
def tied_family(tmp_path, tied_base: bool):
    g = torch.Generator().manual_seed(3)
    emb = [torch.randn(5, 3, generator=g) for _ in range(3)]
    head = [torch.randn(5, 3, generator=g) for _ in range(3)]
    w = [torch.randn(3, 3, generator=g) for _ in range(3)]
    paths = []
    for i in range(3):
        tied = (i == 0) == tied_base
        d = tmp_path / f"m{i}"
        if tied:  # .bin keeps shared storage: lm_head is the embedding, as a tied model holds it
            H.save_bin_dir(d, {"embed.weight": emb[i], "lm_head.weight": emb[i], "w": w[i]})
        else:
            H.save_safetensors_dir(d, {"embed.weight": emb[i], "lm_head.weight": head[i], "w": w[i]})
        paths.append(d)
    return paths, emb, head, w


def test_tied_base_with_untied_finetunes_is_refused(tmp_path):
    """Before: the fine-tunes' own lm_head was never read; the output's lm_head was the merged embedding."""
    paths, *_ = tied_family(tmp_path, tied_base=True)
    out = tmp_path / "out"
    res = run(merge_args("task_arithmetic", paths[1:], paths[0], out), tmp_path)
    H.assert_clean_error(res, "'lm_head.weight'", "'embed.weight'", str(paths[0]), str(paths[1]), out_dir=out)


def test_untied_base_with_tied_finetunes_reads_their_embedding_as_lm_head(tmp_path):
    """The reverse holds no loss: a tied fine-tune's lm_head is its embedding, and is merged as such."""
    paths, emb, head, w = tied_family(tmp_path, tied_base=False)
    out = tmp_path / "out"
    res = run(merge_args("task_arithmetic", paths[1:], paths[0], out, "-p", "lambda=1.0"), tmp_path)
    assert res.returncode == 0, res
    got = load_file(str(out / "model.safetensors"))
    f = H.f64
    H.assert_close(got["lm_head.weight"], f(head[0]) + (f(emb[1]) - f(head[0])) + (f(emb[2]) - f(head[0])))
    H.assert_close(got["embed.weight"], f(emb[0]) + (f(emb[1]) - f(emb[0])) + (f(emb[2]) - f(emb[0])))


# ------------------------------------------------------------------------------- ambiguous directory
def test_directory_with_single_file_and_index_of_other_shards_is_refused(tmp_path):
    """Before: the index was taken (transformers takes model.safetensors) and nothing was said."""
    a, b = toy(0), toy(1)
    d = H.save_sharded_safetensors(tmp_path / "both", a, n_shards=2)
    save_file(b, str(d / "model.safetensors"))
    with pytest.raises(InputError) as ei:
        open_checkpoint(str(d))
    msg = str(ei.value)
    assert "model.safetensors" in msg and "model.safetensors.index.json" in msg and str(d) in msg
    out = tmp_path / "out"
    H.assert_clean_error(run(merge_args("average", [d, d], None, out), tmp_path), "ambiguous", out_dir=out)
    # naming either file is not ambiguous
    for f, sd in (("model.safetensors", b), ("model.safetensors.index.json", a)):
        ck = open_checkpoint(str(d / f))
        assert all(torch.equal(ck.read(n), sd[n]) for n in sd)
        ck.close()


def test_index_naming_only_model_safetensors_is_not_ambiguous(tmp_path):
    a = toy(0)
    d = H.save_safetensors_dir(tmp_path / "one", a)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "model.safetensors" for n in a}}))
    ck = open_checkpoint(str(d))
    assert all(torch.equal(ck.read(n), a[n]) for n in a)
    ck.close()


# ------------------------------------------------------------------------------- file layout
F32 = {"dtype": "F32", "shape": [2]}
LAYOUTS = {  # header, data bytes: each refused by the safetensors library itself
    "hole_between_tensors": ({"a": {**F32, "data_offsets": [0, 8]}, "b": {**F32, "data_offsets": [12, 20]}}, 20),
    "trailing_bytes": ({"a": {**F32, "data_offsets": [0, 8]}}, 12),
    "leading_gap": ({"a": {**F32, "data_offsets": [4, 12]}}, 12),
    "empty_tensor_inside_another": ({"a": {**F32, "data_offsets": [0, 8]},
                                     "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}}, 8),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_the_reference_reader_refuses_are_refused_by_run_and_inspect(tmp_path, layout):
    header, n = LAYOUTS[layout]
    f = raw_safetensors(tmp_path / "m" / "model.safetensors", header, bytes(n))
    with pytest.raises(Exception), safe_open(str(f), framework="pt") as r:  # the reference's verdict
        [r.get_tensor(k) for k in r.keys()]
    H.assert_clean_error(H.run_cli(["inspect", str(f)], cwd=tmp_path), str(f))
    out = tmp_path / "out"
    H.assert_clean_error(run(merge_args("average", [f.parent, f.parent], None, out), tmp_path), str(f), out_dir=out)


def test_layouts_the_reference_reader_accepts_are_accepted(tmp_path):
    """Empty tensors at the ends of the data section, and our one extension: a tied tensor written
    twice at the same offsets (the reference refuses it; `inspect` shows it as tied)."""
    data = torch.tensor([1.0, 2.0]).numpy().tobytes()
    f = raw_safetensors(tmp_path / "ok.safetensors", {"e0": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
                                                       "a": {**F32, "data_offsets": [0, 8]},
                                                       "e1": {"dtype": "F32", "shape": [3, 0], "data_offsets": [8, 8]}},
                        data)
    with safe_open(str(f), framework="pt") as r:
        assert r.get_tensor("a").tolist() == [1.0, 2.0]
    ck = open_checkpoint(str(f))
    assert ck.read("a").tolist() == [1.0, 2.0] and ck.tensors["e1"].shape == (3, 0)
    t = raw_safetensors(tmp_path / "tied.safetensors", {"a": {**F32, "data_offsets": [0, 8]},
                                                        "b": {**F32, "data_offsets": [0, 8]}}, data)
    assert open_checkpoint(str(t)).aliases == {"b": "a"}
    res = H.run_cli(["inspect", str(t)], cwd=tmp_path)
    assert res.returncode == 0 and "tied to a" in res.stdout, res


# ------------------------------------------------------------------------------- empty tensors
def empty_family(with_empties: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    models, stores = [], []
    for i in range(3):
        sd = {"w": torch.randn(4, 3, generator=g).to(dtype), "v": torch.randn(3, generator=g).to(dtype)}
        st = {"fisher": {"w": torch.rand(4, 3, generator=g) + 0.1, "v": torch.rand(3, generator=g) + 0.1},
              "gram_in": {"w": torch.eye(3) + 0.1 * i}, "gram_out": {"w": torch.eye(4)}}
        if with_empties:
            sd = {"rows0": torch.zeros(0, 3, dtype=dtype), **sd, "cols0": torch.zeros(3, 0, dtype=dtype)}
            st["fisher"].update({"rows0": torch.zeros(0, 3), "cols0": torch.zeros(3, 0)})
            st["gram_in"].update({"rows0": torch.eye(3), "cols0": torch.zeros(0, 0)})
            st["gram_out"].update({"rows0": torch.zeros(0, 0), "cols0": torch.eye(3)})
        models.append(sd)
        stores.append(st)
    return models, stores


def merge_family(tmp_path, tag, method, models, stores, **kw):
    paths = [str(H.save_safetensors_dir(tmp_path / f"{tag}-m{i}", sd)) for i, sd in enumerate(models)]
    zs = [H.write_store(tmp_path / f"{tag}-s{i}.zarr", st) for i, st in enumerate(stores)]
    base = paths[0] if method in NEEDS_BASE else None
    inputs = paths[1:] if base else paths
    out = tmp_path / f"{tag}-out"
    api.merge(api.MergeSpec(method, inputs, str(out), base=base, quiet=True,
                            stats=(zs[1:] if base else zs) if method in NEEDS_STATS else [],
                            base_stats=zs[0] if method == "ubgm" else None, **kw))
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_empty_tensors_merge_with_every_method(tmp_path, method):
    """[0, n] and [n, 0] tensors are written empty, and change nothing else: the other tensors are
    byte-identical to the same merge without them. Before: TIES crashed (a [1, 3] view of nothing),
    regmean and mats crashed on max() of an empty tensor."""
    with_e, stores_e = empty_family(True)
    without, stores = empty_family(False)
    got = merge_family(tmp_path, "e", method, with_e, stores_e)
    ref = merge_family(tmp_path, "n", method, without, stores)
    assert got["rows0"].shape == (0, 3) and got["cols0"].shape == (3, 0)
    assert got["rows0"].dtype == got["cols0"].dtype == torch.float32
    for n in ref:
        assert torch.equal(got[n], ref[n]), n


def test_empty_tensor_takes_the_requested_dtype(tmp_path):
    models, stores = empty_family(True)
    got = merge_family(tmp_path, "d", "average", models, stores, dtype="bfloat16")
    assert got["rows0"].dtype == torch.bfloat16 and got["rows0"].shape == (0, 3)


# ------------------------------------------------------------------------------- Hugging Face cache
def test_make_hub_cache_lays_out_the_cache_as_the_hub_client_does(hub_cache):
    H.make_hub_cache(hub_cache, "org/name", toy(0), n_shards=2)
    repo = hub_cache / "models--org--name"
    snap = next((repo / "snapshots").iterdir())
    assert (repo / "refs" / "main").read_text() == snap.name
    files = sorted(os.listdir(snap))
    assert "model.safetensors.index.json" in files and "config.json" in files
    for f in files:
        link = os.readlink(snap / f)
        assert link.startswith("../../blobs/") and (snap / link).resolve().parent == (repo / "blobs").resolve(), f


def test_sharded_hub_model_loads_and_merges(hub_cache, tmp_path):
    """Before: refused, its shards 'pointing outside the checkpoint directory' (into ../../blobs)."""
    base, fts = H.make_family(2, seed=5)
    H.make_hub_cache(hub_cache, "org/base", base, n_shards=3)
    H.make_hub_cache(hub_cache, "org/ft1", fts[0], n_shards=2)
    H.make_hub_cache(hub_cache, "org/ft2", fts[1])
    ck = open_checkpoint("org/base")
    assert len(ck.files) == 3 and all(torch.equal(ck.read(n), base[n]) for n in base)
    ck.close()
    out = tmp_path / "out"
    api.merge(api.MergeSpec("task_arithmetic", ["org/ft1", "org/ft2"], str(out), base="org/base",
                            params={"lambda": "0.5"}, quiet=True))
    merged = H.load_dir(out)
    for n, e in H.expected_task_arithmetic(base, fts, 0.5).items():
        H.assert_close(merged[n], e, base[n].dtype, n)
    for f in ("config.json", "tokenizer.json"):  # side files are links into blobs: copied as files
        assert not (out / f).is_symlink()
    assert (out / "tokenizer.json").read_text() == H.SIDE_FILES["tokenizer.json"]
    config = json.loads((out / "config.json").read_text())  # the base's, stating the written dtype
    assert config.pop("torch_dtype") == "float32" and config == json.loads(H.SIDE_FILES["config.json"])
    # a snapshot directory named as a path is confined the same way
    snap = next((hub_cache / "models--org--base" / "snapshots").iterdir())
    ck = open_checkpoint(str(snap))
    assert len(ck.files) == 3
    ck.close()


def test_hub_snapshot_link_outside_its_repo_folder_is_refused(hub_cache, tmp_path):
    H.make_hub_cache(hub_cache, "org/base", toy(0), n_shards=2)
    H.make_hub_cache(hub_cache, "org/other", toy(1), n_shards=2)
    snap = next((hub_cache / "models--org--base" / "snapshots").iterdir())
    other = next((hub_cache / "models--org--other" / "blobs").iterdir())
    shard = sorted(f for f in os.listdir(snap) if f.startswith("model-"))[0]
    os.unlink(snap / shard)
    os.symlink(os.path.join("..", "..", "..", "models--org--other", "blobs", other.name), snap / shard)
    with pytest.raises(InputError, match="outside") as ei:
        open_checkpoint("org/base")
    assert shard in str(ei.value) and "models--org--base" in str(ei.value)
    ck = open_checkpoint("org/other")  # untouched, its links into its own blobs are fine
    assert len(ck.files) == 2
    ck.close()


# ------------------------------------------------------------------------------- local confinement
def test_local_weights_linked_outside_the_directory_are_refused(tmp_path):
    elsewhere = H.save_safetensors_file(tmp_path / "elsewhere" / "w.safetensors", toy(0))
    d = tmp_path / "m"
    d.mkdir()
    os.symlink(elsewhere, d / "model.safetensors")
    with pytest.raises(InputError, match="outside") as ei:
        open_checkpoint(str(d))
    assert "model.safetensors" in str(ei.value)
    assert open_checkpoint(str(elsewhere)).tensors  # named by the user: read wherever it is
    inside = tmp_path / "m2"
    inside.mkdir()
    H.save_safetensors_file(inside / "weights" / "w.safetensors", toy(0))
    os.symlink(os.path.join("weights", "w.safetensors"), inside / "model.safetensors")
    assert open_checkpoint(str(inside)).tensors  # a link inside the directory is fine


def test_side_file_linked_outside_the_checkpoint_is_refused_before_work(tmp_path):
    """Before: tokenizer.json -> a secret outside the base was copied into OUT."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    base, fts = H.make_family(2, seed=6)
    pb = H.save_safetensors_dir(tmp_path / "base", base)
    p1, p2 = (H.save_safetensors_dir(tmp_path / f"ft{i}", sd) for i, sd in enumerate(fts))
    os.unlink(pb / "tokenizer.json")
    os.symlink(secret, pb / "tokenizer.json")
    out = tmp_path / "out"
    res = run(merge_args("task_arithmetic", [p1, p2], pb, out), tmp_path)
    H.assert_clean_error(res, str(pb / "tokenizer.json"), "outside", out_dir=out)
    # a link to a file inside the checkpoint is copied as a file
    os.unlink(pb / "tokenizer.json")
    (pb / "tok").mkdir()
    (pb / "tok" / "real.json").write_text(H.SIDE_FILES["tokenizer.json"])
    os.symlink(os.path.join("tok", "real.json"), pb / "tokenizer.json")
    res = run(merge_args("task_arithmetic", [p1, p2], pb, out), tmp_path)
    assert res.returncode == 0, res
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_text() == H.SIDE_FILES["tokenizer.json"]
