"""`tensormerge stats import`: research code's Fisher and Gram files become stores whose keys
are full parameter names, in every input format, or the import is refused in one line with
nothing left at the output path."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import helpers as H

from tensormerge.errors import InputError, OutputError
from tensormerge.stats.importers import import_stats, tf_to_pt
from tensormerge.stats.store import StatsStore

Q, B = "enc.layer.0.q.weight", "enc.layer.0.q.bias"


@pytest.fixture
def model(tmp_path) -> str:
    """A tiny model: one Linear 3 -> 4."""
    d = tmp_path / "model"
    d.mkdir()
    save_file({Q: torch.randn(4, 3), B: torch.randn(4)}, str(d / "model.safetensors"))
    return str(d)


def fisher_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {Q: torch.rand(4, 3, generator=g, dtype=torch.float64), B: torch.rand(4, generator=g, dtype=torch.float64)}


def gram(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(10, n, generator=torch.Generator().manual_seed(seed))
    return x.t() @ x / 10


def read_all(path) -> dict[str, dict[str, torch.Tensor]]:
    s = StatsStore(str(path))
    return {k: {n: s.read(k, n) for n in arrays} for k, arrays in s.arrays.items() if arrays}


def refused(res: H.CliResult, out, *needles: str) -> str:
    return H.assert_clean_error(res, *needles, out_dir=out)


# ------------------------------------------------------------------------------ success
def test_torch_fisher_round_trip(tmp_path, model):
    src, out = tmp_path / "fisher.pt", tmp_path / "S.zarr"
    fisher = fisher_dict()
    torch.save(fisher, src)
    summary = import_stats(str(src), "fisher", str(out), model=model, count=1000, fisher_type="empirical")
    assert summary["arrays"] == 2 and summary["renamed"] == {} and summary["warnings"] == []
    got = read_all(out)["fisher"]
    assert set(got) == set(fisher)
    for k, v in fisher.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], v.float())
    s = StatsStore(str(out))
    from tensormerge.engine.sources import open_checkpoint

    assert s.attrs["model"] == {"spec": model, "identity": open_checkpoint(model).identity()}
    assert s.attrs["fisher_type"] == "empirical" and s.attrs["n_examples"] == 1000
    assert s.attrs["created_by"] == "tensormerge stats import fisher.pt"
    assert s.arrays["fisher"][Q].attrs["count"] == 1000
    ck = H.run_cli(["inspect", str(out), "--json"], cwd=tmp_path)
    assert ck.returncode == 0, str(ck)
    assert json.loads(ck.stdout)["arrays"]["fisher"][Q] == {"shape": [4, 3], "count": 1000}
    text = H.run_cli(["inspect", str(out)], cwd=tmp_path)
    assert text.returncode == 0 and Q in text.stdout and "count=1000" in text.stdout


def test_gram_bare_module_names_renamed_with_one_warning(tmp_path, model):
    src, out = tmp_path / "grams.pt", tmp_path / "S.zarr"
    torch.save({"state_dict": {"enc.layer.0.q": gram(3)}, "step": 7}, src)
    res = H.run_cli(["stats", "import", src, "--kind", "gram_in", "--output", out, "--model", model,
                     "--count", 512], cwd=tmp_path)
    assert res.returncode == 0, str(res)
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(res.stderr.splitlines()) == 2 and len(warnings) == 2, str(res)  # unwrapped + renamed
    assert any("renamed 1 bare module name" in w for w in warnings)
    assert res.stdout.startswith(f"wrote {out}: 1 gram_in arrays") and "1 renamed" in res.stdout
    got = read_all(out)["gram_in"]
    assert list(got) == [Q] and torch.equal(got[Q], gram(3))
    assert StatsStore(str(out)).arrays["gram_in"][Q].attrs == {"count": 512, "source": "enc.layer.0.q"}


def test_safetensors_gram_out(tmp_path, model):
    src, out = tmp_path / "g.safetensors", tmp_path / "S.zarr"
    save_file({Q: gram(4).to(torch.bfloat16)}, str(src))
    summary = import_stats(str(src), "gram_out", str(out), model=model)
    assert summary["arrays"] == 1
    got = read_all(out)["gram_out"][Q]
    assert got.dtype == torch.float32 and torch.equal(got, gram(4).to(torch.bfloat16).float())


def _write_matena_h5(path, variables: dict[str, np.ndarray]) -> None:
    """mmatena/model_merging hdf5_util.save_variables_to_hdf5: a `__list__` group of datasets
    "0".."n-1", each with the TF variable name (":0" dropped) in attribute `name`."""
    import h5py

    with h5py.File(path, "w") as f:
        ls = f.create_group("__list__")
        ls.attrs["length"] = len(variables)
        for i, (name, val) in enumerate(variables.items()):
            ds = ls.create_dataset(str(i), data=val)
            ds.attrs["name"] = name.removesuffix(":0")
            ds.attrs["trainable"] = True


def test_hdf5_matena_layout(tmp_path):
    pytest.importorskip("h5py")
    rng = np.random.default_rng(0)
    kernel = rng.random((3, 4), dtype=np.float32)  # TF Dense kernel [in, out]
    p = "tf_bert_model/bert/encoder/layer_._0"
    tf = {f"{p}/attention/self/query/kernel:0": kernel,
          f"{p}/attention/self/query/bias:0": rng.random(4, dtype=np.float32),
          f"{p}/attention/output/LayerNorm/gamma:0": rng.random(4, dtype=np.float32),
          f"{p}/attention/output/LayerNorm/beta:0": rng.random(4, dtype=np.float32),
          "tf_bert_model/bert/embeddings/position_embeddings/embeddings:0": rng.random((5, 4)).astype(np.float64)}
    src, out = tmp_path / "fisher.h5", tmp_path / "S.zarr"
    _write_matena_h5(src, tf)
    q = "bert.encoder.layer.0.attention.self.query"
    ln = "bert.encoder.layer.0.attention.output.LayerNorm"
    model_dir = tmp_path / "bert"
    model_dir.mkdir()
    save_file({f"{q}.weight": torch.zeros(4, 3), f"{q}.bias": torch.zeros(4), f"{ln}.weight": torch.zeros(4),
               f"{ln}.bias": torch.zeros(4), "bert.embeddings.position_embeddings.weight": torch.zeros(5, 4)},
              str(model_dir / "model.safetensors"))
    import_stats(str(src), "fisher", str(out), model=str(model_dir))
    got = read_all(out)["fisher"]
    assert set(got) == {f"{q}.weight", f"{q}.bias", f"{ln}.weight", f"{ln}.bias",
                        "bert.embeddings.position_embeddings.weight"}
    assert torch.equal(got[f"{q}.weight"], torch.from_numpy(kernel).t())
    assert torch.equal(got[f"{ln}.bias"], torch.from_numpy(tf[f"{p}/attention/output/LayerNorm/beta:0"]))
    assert got["bert.embeddings.position_embeddings.weight"].shape == (5, 4)


def test_hdf5_named_by_path_nested_groups(tmp_path):
    h5py = pytest.importorskip("h5py")
    src, out = tmp_path / "fisher.hdf5", tmp_path / "S.zarr"
    with h5py.File(src, "w") as f:
        f.create_dataset("tf_t5/encoder/block_._1/dense/kernel:0", data=np.ones((2, 5), np.float32))
    import_stats(str(src), "fisher", str(out))
    assert read_all(out)["fisher"]["encoder.block.1.dense.weight"].shape == (5, 2)


def test_tf_names():
    assert tf_to_pt("tf_bert_model/bert/encoder/layer_._11/output/dense/kernel:0") == \
        ("bert.encoder.layer.11.output.dense.weight", True)
    assert tf_to_pt("m/bert/embeddings/word_embeddings/weight:0") == ("bert.embeddings.word_embeddings.weight", False)
    assert tf_to_pt("m/classifier/bias") == ("classifier.bias", False)


def test_fisher_under_tied_alias_name_kept(tmp_path):
    w = torch.randn(6, 4)
    model_dir = tmp_path / "tied"
    model_dir.mkdir()
    torch.save({"shared.weight": w, "lm_head.weight": w}, model_dir / "pytorch_model.bin")
    src, out = tmp_path / "f.pt", tmp_path / "S.zarr"
    torch.save({"lm_head.weight": torch.rand(6, 4)}, src)
    import_stats(str(src), "fisher", str(out), model=str(model_dir))
    assert list(read_all(out)["fisher"]) == ["lm_head.weight"]


# ------------------------------------------------------------------------------ refusals
def test_unmatched_keys_listed_in_one_line(tmp_path, model):
    src, out = tmp_path / "f.pt", tmp_path / "S.zarr"
    torch.save({Q: torch.rand(3, 4), **{f"missing.{i}": torch.rand(2) for i in range(10)}}, src)
    res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", out, "--model", model], cwd=tmp_path)
    line = refused(res, out, "11 of 11", f"{Q} [3, 4] (expected [4, 3])", "missing.0 (no such tensor)", "+3 more")
    assert "missing.6" in line and "missing.7" not in line


def test_gram_for_vector_parameter_refused(tmp_path, model):
    src, out = tmp_path / "g.pt", tmp_path / "S.zarr"
    torch.save({B: gram(4)}, src)
    res = H.run_cli(["stats", "import", src, "--kind", "gram_in", "-o", out, "--model", model], cwd=tmp_path)
    refused(res, out, B, "no gram_in for a tensor of shape [4]")


def test_nan_value_names_key_and_leaves_nothing(tmp_path):
    src, out = tmp_path / "f.pt", tmp_path / "S.zarr"
    bad = torch.rand(4, 3)
    bad[1, 2] = float("nan")
    torch.save({"a.weight": torch.rand(2), Q: bad}, src)
    res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", out], cwd=tmp_path)
    refused(res, out, Q, "NaN")


def test_non_square_gram(tmp_path):
    src, out = tmp_path / "g.pt", tmp_path / "S.zarr"
    torch.save({Q: torch.rand(3, 4)}, src)
    res = H.run_cli(["stats", "import", src, "--kind", "gram_out", "-o", out], cwd=tmp_path)
    refused(res, out, Q, "square")


def test_pickle_code_refused(tmp_path):
    src, out = tmp_path / "f.pt", tmp_path / "S.zarr"
    torch.save({"w": torch.rand(2), "args": argparse.Namespace(lr=1e-3)}, src)
    res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", out], cwd=tmp_path)
    refused(res, out, str(src), "weights_only")


def test_a_pickle_that_would_run_code_is_refused_without_running_it_or_torch_warnings(tmp_path):
    """A legacy (not zip) pickle of protocol 4 whose object runs a command when unpickled: refused
    by weights_only, nothing run, and torch's protocol warning does not reach the user (-q)."""
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src, out = tmp_path / "evil.pt", tmp_path / "S.zarr"
    src.write_bytes(pickle.dumps({"w": Evil()}, protocol=4))
    res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", out, "-q"], cwd=tmp_path)
    refused(res, out, str(src), "weights_only")
    assert "Warning" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not marker.exists()


def test_nested_dict_without_obvious_level_refused(tmp_path):
    src, out = tmp_path / "f.pt", tmp_path / "S.zarr"
    torch.save({"task_a": {Q: torch.rand(4, 3)}, "task_b": {Q: torch.rand(4, 3)}}, src)
    with pytest.raises(InputError, match="'task_a' is a dict"):
        import_stats(str(src), "fisher", str(out))
    assert not out.exists() and not pathlib.Path(f"{out}.partial").exists()


def test_existing_output_needs_overwrite(tmp_path):
    src, out = tmp_path / "f.safetensors", tmp_path / "S.zarr"
    save_file({Q: torch.rand(4, 3)}, str(src))
    import_stats(str(src), "fisher", str(out))
    res = H.run_cli(["stats", "import", src, "--kind", "fisher", "-o", out], cwd=tmp_path)
    assert "exists" in H.assert_clean_error(res, str(out), "--overwrite")
    with pytest.raises(OutputError):
        import_stats(str(src), "fisher", str(out))
    save_file({Q: torch.ones(4, 3)}, str(src))
    import_stats(str(src), "fisher", str(out), overwrite=True)
    assert torch.equal(read_all(out)["fisher"][Q], torch.ones(4, 3))


def test_failed_overwrite_keeps_old_store(tmp_path):
    src, out = tmp_path / "f.pt", tmp_path / "S.zarr"
    torch.save({Q: torch.ones(4, 3)}, src)
    import_stats(str(src), "fisher", str(out))
    torch.save({Q: torch.full((4, 3), float("inf"))}, src)
    with pytest.raises(InputError, match="Inf"):
        import_stats(str(src), "fisher", str(out), overwrite=True)
    assert torch.equal(read_all(out)["fisher"][Q], torch.ones(4, 3))
    assert not pathlib.Path(f"{out}.partial").exists()


def test_missing_h5py_says_what_to_install(tmp_path, monkeypatch):
    src = tmp_path / "f.h5"
    src.write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(InputError, match=r"tensormerge\[hdf5\]"):
        import_stats(str(src), "fisher", str(tmp_path / "S.zarr"))


def test_unknown_format_refused(tmp_path):
    src = tmp_path / "f.npz"
    src.write_bytes(b"")
    with pytest.raises(InputError, match="unknown statistics format"):
        import_stats(str(src), "fisher", str(tmp_path / "S.zarr"))


# ------------------------------------------------------------------------------ Conv1D layout
C_PROJ, C_FC = "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight"


def test_conv1d_grams_imported_in_out_merge_as_their_transpose(tmp_path):
    """GPT-2 keeps Conv1D weights [in, out] (y = x W), so RegMean is (Σ G_i)^-1 Σ G_i W_i. A
    square c_proj Gram fits either layout: only --weight-layout in_out says which side it
    multiplies. With it the merge equals that formula; without it the merge solves on the other
    side (shown to differ), and a non-square c_fc Gram is refused as of the wrong layout."""
    d = 4
    g = torch.Generator().manual_seed(3)
    models, sds, grams = [], [], []
    for i in range(3):
        sd = {C_PROJ: torch.randn(d, d, generator=g), C_FC: torch.randn(d, 3 * d, generator=g)}  # [in, out]
        m = tmp_path / f"m{i}"
        m.mkdir()
        save_file(sd, str(m / "model.safetensors"))
        models.append(str(m))
        sds.append(sd)
        grams.append({C_PROJ: gram(d, seed=10 + i), C_FC: gram(d, seed=20 + i)})  # [in, in]
    stores, plain = [], []
    for i, (m, gr) in enumerate(zip(models, grams)):
        torch.save(gr, tmp_path / f"g{i}.pt")
        stores.append(tmp_path / f"s{i}.zarr")
        res = H.run_cli(["stats", "import", tmp_path / f"g{i}.pt", "--kind", "gram_in", "-o", stores[-1], "--model", m,
                         "--weight-layout", "in_out"], cwd=tmp_path)
        assert res.returncode == 0, str(res)
        assert StatsStore(str(stores[-1])).in_out("gram_in", C_PROJ)
        torch.save({C_PROJ: gr[C_PROJ]}, tmp_path / f"p{i}.pt")
        plain.append(tmp_path / f"p{i}.zarr")
        res = H.run_cli(["stats", "import", tmp_path / f"p{i}.pt", "--kind", "gram_in", "-o", plain[-1], "--model", m],
                        cwd=tmp_path)  # square: accepted in either layout
        assert res.returncode == 0, str(res)

    def merged(stats, tag):
        out = tmp_path / tag
        res = H.run_cli(["run", "-q", "-m", "regmean", "-i", ",".join(models), "--stats", ",".join(map(str, stats)),
                         "-o", out], cwd=tmp_path)
        assert res.returncode == 0, str(res)
        return H.load_dir(out)

    got = merged(stores, "in_out")
    for n in (C_PROJ, C_FC):
        gs = [gr[n].double() for gr in grams]
        want = torch.linalg.solve(sum(gs), sum(gi @ sd[n].double() for gi, sd in zip(gs, sds)))
        torch.testing.assert_close(got[n].double(), want, rtol=1e-4, atol=1e-5, msg=n)
    wrong = merged(plain, "out_in")[C_PROJ].double()
    gs = [gr[C_PROJ].double() for gr in grams]
    other_side = sum(sd[C_PROJ].double() @ gi for gi, sd in zip(gs, sds)) @ torch.linalg.inv(sum(gs))
    torch.testing.assert_close(wrong, other_side, rtol=1e-4, atol=1e-5)
    assert (wrong - got[C_PROJ].double()).abs().max() > 0.1

    out = tmp_path / "refused.zarr"
    res = H.run_cli(["stats", "import", tmp_path / "g0.pt", "--kind", "gram_in", "-o", out, "--model", models[0]],
                    cwd=tmp_path)
    refused(res, out, f"{C_FC} [4, 4] (expected [12, 12])")
    res = H.run_cli(["stats", "import", tmp_path / "g0.pt", "--kind", "fisher", "-o", out, "--weight-layout", "in_out"],
                    cwd=tmp_path)
    refused(res, out, "--weight-layout", "fisher")
