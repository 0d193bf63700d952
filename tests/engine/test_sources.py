"""Every input form of SPEC §1 becomes a Checkpoint that yields exactly the tensors written."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402

from tensormerge import api  # noqa: E402
from tensormerge.engine.sources import (  # noqa: E402
    BinCheckpoint,
    SafetensorsCheckpoint,
    open_checkpoint,
)
from tensormerge.errors import InputError  # noqa: E402


def assert_checkpoint_equals(ck, sd: dict[str, torch.Tensor]) -> None:
    assert set(ck.tensors) == set(sd)
    for name, t in sd.items():
        info = ck.tensors[name]
        assert info.dtype == t.dtype, name
        assert info.shape == tuple(t.shape), name
        got = ck.read(name)
        assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape), name
        assert torch.equal(got, t), name


def assert_row_ranges(ck, sd: dict[str, torch.Tensor]) -> None:
    for name, t in sd.items():
        rows = t.shape[0] if t.dim() else 1
        for r0, r1 in [(0, rows), (0, 1), (rows - 1, rows), (rows // 3, rows // 3 + max(1, rows // 2)), (2, 2)]:
            r1 = min(r1, rows)
            r0 = min(r0, r1)
            got = ck.read(name, r0, r1)
            assert torch.equal(got, t[r0:r1]), (name, r0, r1)
            assert got.is_contiguous()


@pytest.fixture(scope="module")
def family():
    return H.make_family(1)


@pytest.mark.parametrize("fmt", H.FORMATS)
def test_each_form_reads_what_was_written(tmp_path, family, fmt):
    base, _ = family
    spec = H.save(tmp_path / "m", base, fmt)
    ck = open_checkpoint(spec)
    try:
        assert_checkpoint_equals(ck, base)
        assert_row_ranges(ck, base)
        kind = BinCheckpoint if "bin" in fmt else SafetensorsCheckpoint
        assert isinstance(ck, kind)
        if fmt.startswith("sharded"):
            assert len(ck.files) > 1
        if fmt != "safetensors_file":
            assert pathlib.Path(ck.config_dir) == (tmp_path / "m").resolve()
        assert ck.aliases == {}
    finally:
        ck.close()


def test_sharded_index_opened_directly_and_read_in_any_order(tmp_path, family):
    base, _ = family
    d = H.save_sharded_safetensors(tmp_path / "m", base, n_shards=4)
    ck = open_checkpoint(str(d / "model.safetensors.index.json"))
    try:
        assert len(ck.files) == 4
        # the tensors come shard by shard, in shard order (the output follows it)
        groups = H._split_names(list(base), 4)
        order = list(ck.tensors)
        start = 0
        for g in groups:
            assert set(order[start:start + len(g)]) == set(g)
            start += len(g)
        for name in reversed(list(base)):
            assert torch.equal(ck.read(name), base[name])
    finally:
        ck.close()


def test_all_forms_agree(tmp_path, family):
    base, _ = family
    read = {}
    for fmt in H.FORMATS:
        ck = open_checkpoint(H.save(tmp_path / fmt, base, fmt))
        read[fmt] = {n: ck.read(n) for n in ck.tensors}
        ck.close()
    ref = read["safetensors_dir"]
    for fmt, sd in read.items():
        assert sd.keys() == ref.keys()
        for n in ref:
            assert torch.equal(sd[n], ref[n]), (fmt, n)


def test_fingerprint_tracks_content_shape(tmp_path, family):
    base, _ = family
    a = open_checkpoint(H.save(tmp_path / "a", base))
    b = open_checkpoint(H.save(tmp_path / "b", base, "sharded_safetensors"))
    changed = dict(base)
    changed["layer.0.attn.bias"] = torch.zeros(6)
    c = open_checkpoint(H.save(tmp_path / "c", changed))
    fa, fb, fc = a.fingerprint(), b.fingerprint(), c.fingerprint()
    assert fa["tensors"] == len(base)
    assert fa["files"] == {"model.safetensors": (tmp_path / "a" / "model.safetensors").stat().st_size}
    assert fa["fingerprint"] != fc["fingerprint"]
    assert len(fb["files"]) == 3
    for ck in (a, b, c):
        ck.close()


def test_peft_adapter_dir(tmp_path):
    sd = H.make_adapter(seed=3)
    d = H.save_adapter_dir(tmp_path / "adapter", sd)
    ck = open_checkpoint(str(d))
    try:
        assert ck.files == [str((d / "adapter_model.safetensors").resolve())] or \
            [pathlib.Path(f).name for f in ck.files] == ["adapter_model.safetensors"]
        assert_checkpoint_equals(ck, sd)
        assert_row_ranges(ck, sd)
        assert pathlib.Path(ck.config_dir) == d.resolve()
    finally:
        ck.close()


def test_zero_dim_and_empty_tensors(tmp_path):
    sd = {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "w": torch.randn(3, 2)}
    for fmt in ("safetensors_file", "bin_dir"):
        ck = open_checkpoint(H.save(tmp_path / fmt, sd, fmt))
        assert_checkpoint_equals(ck, sd)
        assert torch.equal(ck.read("scalar", 0, 1), sd["scalar"])
        ck.close()


# ---------------------------------------------------------------------------------- hub ids
def test_hub_repo_id_offline_from_cache(hub_cache, family):
    base, _ = family
    commit = H.make_hub_cache(hub_cache, "org/name", base)
    for spec in ("org/name", "org/name@main", f"org/name@{commit}"):
        ck = open_checkpoint(spec)
        try:
            assert ck.spec == spec
            assert_checkpoint_equals(ck, base)
            assert_row_ranges(ck, base)
            assert pathlib.Path(ck.config_dir).name == commit
            assert (pathlib.Path(ck.config_dir) / "config.json").read_text() == H.SIDE_FILES["config.json"]
        finally:
            ck.close()


@pytest.mark.parametrize("spec", ["org/missing", "org/name@no-such-branch", "other/name@" + "0" * 40])
def test_hub_repo_missing_is_input_error(hub_cache, family, spec):
    H.make_hub_cache(hub_cache, "org/name", family[0])
    with pytest.raises(InputError) as ei:
        open_checkpoint(spec)
    msg = str(ei.value)
    assert spec in msg and "\n" not in msg


def test_not_a_path_nor_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("./nope", "a/b/c", str(tmp_path / "absent")):
        with pytest.raises(InputError, match="no such file"):
            open_checkpoint(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no weights found"):
        open_checkpoint(str(tmp_path / "empty"))


def test_merge_with_hub_inputs(hub_cache, tmp_path):
    base, fts = H.make_family(2, seed=4)
    H.make_hub_cache(hub_cache, "org/base", base)
    H.make_hub_cache(hub_cache, "org/ft1", fts[0])
    H.make_hub_cache(hub_cache, "org/ft2", fts[1])
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="task_arithmetic", inputs=["org/ft1", "org/ft2@main"], base="org/base",
                            output=str(out), params={"lambda": "0.5"}, quiet=True))
    merged = H.load_dir(out)
    exp = H.expected_task_arithmetic(base, fts, 0.5)
    for n, e in exp.items():
        H.assert_close(merged[n], e, base[n].dtype, n)
    assert json.loads((out / "config.json").read_text()) == {**json.loads(H.SIDE_FILES["config.json"]),
                                                             "torch_dtype": "float32"}


# ---------------------------------------------------------------------------------- tied tensors
def t5_like(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "shared.weight": torch.randn(11, 6, generator=g),
        "encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(6, 6, generator=g),
        "decoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(6, 6, generator=g),
        "lm_head.weight": torch.randn(11, 6, generator=g),
    }


def tie(sd: dict[str, torch.Tensor], first: str = "shared.weight") -> dict[str, torch.Tensor]:
    """A torch.save-able dict where encoder/decoder embed_tokens share shared.weight's storage."""
    out = {}
    names = [first] + [n for n in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
                       if n != first]
    for n in names:
        out[n] = sd["shared.weight"]
    out.update({k: v for k, v in sd.items() if k != "shared.weight"})
    return out


def test_bin_tied_tensors_detected(tmp_path):
    sd = tie(t5_like(0))
    d = H.save_bin_dir(tmp_path / "t5", sd)
    ck = open_checkpoint(str(d))
    try:
        assert ck.aliases == {"encoder.embed_tokens.weight": "shared.weight",
                              "decoder.embed_tokens.weight": "shared.weight"}
        assert ck.canonical("encoder.embed_tokens.weight") == "shared.weight"
        assert "lm_head.weight" not in ck.aliases
        for n in sd:
            assert torch.equal(ck.read(n), sd[n])
    finally:
        ck.close()


def test_bin_equal_values_but_separate_storage_are_not_tied(tmp_path):
    sd = t5_like(0)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()
    ck = open_checkpoint(str(H.save_bin_dir(tmp_path / "t5", sd)))
    assert ck.aliases == {}
    ck.close()


def test_merge_of_tied_bin_checkpoints_writes_every_name(tmp_path):
    sds = [t5_like(s) for s in range(3)]
    specs = [str(H.save_bin_dir(tmp_path / f"m{i}", tie(sd))) for i, sd in enumerate(sds)]
    out = tmp_path / "out"
    report = api.merge(api.MergeSpec(method="average", inputs=specs, output=str(out), quiet=True))
    merged = H.load_dir(out)
    assert set(merged) == set(tie(sds[0]))
    exp = H.expected_average(sds)
    for n in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        H.assert_close(merged[n], exp["shared.weight"], torch.float32, n)
    assert torch.equal(merged["encoder.embed_tokens.weight"], merged["shared.weight"])
    assert torch.equal(merged["decoder.embed_tokens.weight"], merged["shared.weight"])
    H.assert_close(merged["lm_head.weight"], exp["lm_head.weight"], torch.float32)
    # merged once: one block for the tied group
    assert [b["name"] for b in report["blocks"]].count("shared.weight") == 1
    assert len(report["blocks"]) == 4


def test_t5_like_safetensors_without_embed_tokens(tmp_path):
    """safetensors drops tied duplicates: a T5 dir holds shared.weight only. Merging works."""
    sds = [t5_like(s) for s in range(3)]
    specs = [str(H.save_safetensors_dir(tmp_path / f"m{i}", sd)) for i, sd in enumerate(sds)]
    ck = open_checkpoint(specs[0])
    assert "encoder.embed_tokens.weight" not in ck.tensors and ck.aliases == {}
    ck.close()
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="task_arithmetic", inputs=specs[1:], base=specs[0], output=str(out),
                            quiet=True))
    merged = H.load_dir(out)
    assert set(merged) == set(sds[0])
    exp = H.expected_task_arithmetic(sds[0], sds[1:])
    for n, e in exp.items():
        H.assert_close(merged[n], e, torch.float32, n)


def test_tied_bin_base_with_untied_safetensors_inputs(tmp_path):
    """Base .bin has the tied names; the fine-tunes (safetensors) store shared.weight only:
    every tied name of the base is written, from the merged shared weight."""
    sds = [t5_like(s) for s in range(3)]
    base = str(H.save_bin_dir(tmp_path / "base", tie(sds[0])))
    specs = [str(H.save_safetensors_dir(tmp_path / f"m{i}", sd)) for i, sd in enumerate(sds[1:])]
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="task_arithmetic", inputs=specs, base=base, output=str(out), quiet=True))
    merged = H.load_dir(out)
    exp = H.expected_task_arithmetic(sds[0], sds[1:])
    assert set(merged) == set(tie(sds[0]))
    for n in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        H.assert_close(merged[n], exp["shared.weight"], torch.float32, n)


@pytest.mark.parametrize("first", ["shared.weight", "encoder.embed_tokens.weight"])
def test_untied_safetensors_base_with_tied_bin_inputs(tmp_path, first):
    """The reverse: the base stores shared.weight only; the inputs are .bin with tied names (in
    either order in the state dict). The inputs' extra names are aliases of shared.weight, not
    extra tensors, so the merge must go through and write what the base has."""
    sds = [t5_like(s) for s in range(3)]
    base = str(H.save_safetensors_dir(tmp_path / "base", sds[0]))
    specs = [str(H.save_bin_dir(tmp_path / f"m{i}", tie(sd, first))) for i, sd in enumerate(sds[1:])]
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="task_arithmetic", inputs=specs, base=base, output=str(out), quiet=True))
    merged = H.load_dir(out)
    exp = H.expected_task_arithmetic(sds[0], sds[1:])
    assert set(merged) == set(sds[0])
    for n, e in exp.items():
        H.assert_close(merged[n], e, torch.float32, n)


def test_index_listing_tensor_missing_from_shards(tmp_path, family):
    base, _ = family
    d = H.save_sharded_safetensors(tmp_path / "m", base)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(InputError, match="ghost.weight"):
        open_checkpoint(str(d))


def test_legacy_bin_format(tmp_path):
    """A pre-1.6 (non-zip) torch.save file: not memory-mappable, still read with weights_only."""
    sd = tie(t5_like(2))
    torch.save(sd, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ck = open_checkpoint(str(tmp_path))
    try:
        assert set(ck.aliases) == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
        for n, t in sd.items():
            assert torch.equal(ck.read(n), t)
            assert torch.equal(ck.read(n, 3, 5), t[3:5])
    finally:
        ck.close()


def test_bin_with_pickled_code_names_the_global(tmp_path):
    torch.save({"w": torch.ones(2), "obj": _Custom()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError) as ei:
        open_checkpoint(str(tmp_path))
    msg = str(ei.value)
    assert "weights_only" in msg and "_Custom" in msg and "pytorch_model.bin" in msg
    assert "\n" not in msg and "\x1b" not in msg


class _Custom:
    pass


def test_bin_with_non_tensor_entry(tmp_path):
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="'step'"):
        open_checkpoint(str(tmp_path))
