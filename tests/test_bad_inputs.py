"""Bad inputs through the command line, each in its own process: a non-zero exit status, one
`error: ...` line on stderr naming the file / tensor / parameter at fault, no traceback, and
no OUT (nor OUT.partial) left behind (SPEC §1, last bullet)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import helpers as H  # noqa: E402


class NotAWeight:
    """Pickled by reference: loading it needs code beyond torch's weights_only allow-list."""

    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    base_spec, ft_specs, base, fts = H.write_family(root, n=3)
    return root, base_spec, ft_specs, base, fts


def run(args, cwd, quiet=True):
    return H.run_cli(["run", *(["--quiet"] if quiet else []), *map(str, args)], cwd=cwd)


def merge_args(method, inputs, base, out, *extra):
    args = ["--method", method, "--inputs", ",".join(map(str, inputs)), "--output", str(out)]
    if base is not None:
        args += ["--base", str(base)]
    return args + [str(x) for x in extra]


def copy_model(src, dst) -> pathlib.Path:
    shutil.copytree(src, dst)
    return pathlib.Path(dst)


# ---------------------------------------------------------------------------------- shapes / names
def test_mismatched_shapes_and_missing_tensors_all_listed(fam, tmp_path):
    _, base_spec, ft_specs, base, fts = fam
    a = dict(fts[0])
    a["embed.weight"] = torch.zeros(37, 20)
    a["layer.1.proj.weight"] = torch.zeros(7, 24, dtype=torch.float16)
    b = {k: v for k, v in fts[1].items() if k not in ("layer.0.attn.bias", "layer.1.norm.weight")}
    b["surprise.weight"] = torch.zeros(2)
    pa = H.save_safetensors_dir(tmp_path / "a", a)
    pb = H.save_safetensors_dir(tmp_path / "b", b)
    out = tmp_path / "out"
    res = run(merge_args("task_arithmetic", [pa, pb, ft_specs[2]], base_spec, out), tmp_path)
    line = H.assert_clean_error(res, "embed.weight", "[37, 19]", "[37, 20]", "layer.1.proj.weight", "[7, 24]",
                                "layer.0.attn.bias", "layer.1.norm.weight", "surprise.weight", str(pa), str(pb),
                                out_dir=out)
    assert ft_specs[2] not in line  # the good input is not blamed


def test_mismatch_without_base_uses_first_input(fam, tmp_path):
    _, _, ft_specs, _, fts = fam
    a = dict(fts[1])
    a["layer.0.mlp.weight"] = torch.zeros(64, 32, dtype=torch.bfloat16)
    pa = H.save_safetensors_dir(tmp_path / "a", a)
    out = tmp_path / "out"
    res = run(merge_args("average", [ft_specs[0], pa], None, out), tmp_path)
    H.assert_clean_error(res, "layer.0.mlp.weight", "[64, 33]", "[64, 32]", str(pa), out_dir=out)


# ---------------------------------------------------------------------------------- damaged files
def test_truncated_shard(fam, tmp_path):
    _, base_spec, ft_specs, base, fts = fam
    d = H.save_sharded_safetensors(tmp_path / "sharded", fts[0], n_shards=3)
    shard = d / "model-00002-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    out = tmp_path / "out"
    res = run(merge_args("average", [d, ft_specs[1]], base_spec, out), tmp_path)
    H.assert_clean_error(res, str(shard), out_dir=out)


def test_truncated_single_file_inside_header(fam, tmp_path):
    _, base_spec, ft_specs, _, _ = fam
    d = copy_model(ft_specs[0], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    out = tmp_path / "out"
    res = run(merge_args("average", [d, ft_specs[1]], None, out), tmp_path)
    H.assert_clean_error(res, str(f), out_dir=out)


def test_file_shorter_than_length_prefix(fam, tmp_path):
    _, _, ft_specs, _, _ = fam
    f = tmp_path / "tiny.safetensors"
    f.write_bytes(b"\x01\x02\x03")
    out = tmp_path / "out"
    res = run(merge_args("average", [f, ft_specs[1]], None, out), tmp_path)
    H.assert_clean_error(res, str(f), out_dir=out)


def _with_header(path: pathlib.Path, header: bytes, declared_len: int | None = None, data: bytes = b"") -> None:
    n = len(header) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + header + data)


@pytest.mark.parametrize("kind", ["garbage_json", "not_utf8", "not_an_object", "bad_entry", "overlap",
                                  "length_past_eof", "length_huge"])
def test_corrupted_header(fam, tmp_path, kind):
    _, _, ft_specs, _, _ = fam
    f = tmp_path / "bad.safetensors"
    if kind == "garbage_json":
        _with_header(f, b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]', data=b"\0" * 8)
    elif kind == "not_utf8":
        _with_header(f, b"\xff\xfe{}   ")
    elif kind == "not_an_object":
        _with_header(f, b"[1, 2, 3]")
    elif kind == "bad_entry":
        _with_header(f, json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(),
                     data=b"\0" * 12)
    elif kind == "overlap":
        _with_header(f, json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode(),
                     data=b"\0" * 12)
    elif kind == "length_past_eof":
        _with_header(f, b"{}      ", declared_len=4096)
    elif kind == "length_huge":
        _with_header(f, b"{}      ", declared_len=2**62)
    out = tmp_path / "out"
    res = run(merge_args("average", [f, ft_specs[1]], None, out), tmp_path)
    H.assert_clean_error(res, str(f), out_dir=out)


@pytest.mark.parametrize("target", ["../x.safetensors", "ABS", "sub/../../x.safetensors", "missing.safetensors"])
def test_index_pointing_outside_directory(fam, tmp_path, target):
    _, _, ft_specs, base, fts = fam
    # a real shard lies outside, so following the path would succeed if it were not refused
    outside = tmp_path / "x.safetensors"
    save_file({k: v.contiguous() for k, v in fts[0].items()}, str(outside))
    d = tmp_path / "model"
    d.mkdir()
    rel = str(outside) if target == "ABS" else target
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: rel for k in base}}))
    out = tmp_path / "out"
    res = run(merge_args("average", [d, ft_specs[1]], None, out), tmp_path)
    line = H.assert_clean_error(res, "model.safetensors.index.json", rel, out_dir=out)
    if target != "missing.safetensors":
        assert "outside" in line


def test_index_not_json(fam, tmp_path):
    _, _, ft_specs, _, _ = fam
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text("{not json")
    out = tmp_path / "out"
    res = run(merge_args("average", [d, ft_specs[1]], None, out), tmp_path)
    H.assert_clean_error(res, "model.safetensors.index.json", out_dir=out)


# ---------------------------------------------------------------------------------- methods, params
def test_unknown_method(fam, tmp_path):
    _, base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    res = run(merge_args("tie", ft_specs, base_spec, out), tmp_path)
    H.assert_clean_error(res, "'tie'", "average", "ties", "dare", "task_arithmetic", out_dir=out)


def test_unknown_parameter_names_the_methods_parameters(fam, tmp_path):
    _, base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    res = run(merge_args("ties", ft_specs, base_spec, out, "-p", "density=0.3"), tmp_path)
    H.assert_clean_error(res, "'density'", "ties", "k", "lambda", "sign", "merge", "scope", out_dir=out)


@pytest.mark.parametrize("method,param,needle", [
    ("dare", "p=1.5", "'p'"),
    ("dare", "p=-0.1", "'p'"),
    ("ties", "k=0", "'k'"),
    ("ties", "k=150", "'k'"),
    ("ties", "sign=majority", "'sign'"),
    ("dare", "seed=abc", "'seed'"),
    ("average", "weights=0.5,0.5", "'weights'"),  # 2 values for 3 models
    ("average", "weights=1,-1,0", "'weights'"),   # normalize below makes it 0-sum
])
def test_out_of_range_parameter(fam, tmp_path, method, param, needle):
    _, base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    extra = ["-p", param] + (["-p", "normalize=true"] if param == "weights=1,-1,0" else [])
    res = run(merge_args(method, ft_specs, base_spec, out, *extra), tmp_path)
    H.assert_clean_error(res, needle, out_dir=out)


def test_malformed_p_option(fam, tmp_path):
    _, base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    res = run(merge_args("dare", ft_specs, base_spec, out, "-p", "p0.3"), tmp_path)
    H.assert_clean_error(res, "p0.3", out_dir=out)


def test_method_needing_base_without_base(fam, tmp_path):
    _, _, ft_specs, _, _ = fam
    out = tmp_path / "out"
    res = run(merge_args("ties", ft_specs, None, out), tmp_path)
    H.assert_clean_error(res, "ties", "--base", out_dir=out)


def test_missing_input_path(fam, tmp_path):
    _, base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    missing = tmp_path / "nowhere"
    res = run(merge_args("average", [ft_specs[0], missing], base_spec, out), tmp_path)
    H.assert_clean_error(res, str(missing), out_dir=out)


def test_budget_too_small_says_how_much(fam, tmp_path):
    _, base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    res = run(merge_args("average", ft_specs, base_spec, out, "--max-memory", "64B"), tmp_path)
    H.assert_clean_error(res, "--max-memory", "64 B", out_dir=out)


@pytest.mark.parametrize("opt,value", [("--max-memory", "lots"), ("--shard-size", "-5GB")])
def test_bad_sizes(fam, tmp_path, opt, value):
    _, base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    res = run(merge_args("average", ft_specs, base_spec, out, opt, value), tmp_path)
    H.assert_clean_error(res, opt, out_dir=out)


# ---------------------------------------------------------------------------------- output
def test_output_exists_refused_then_overwritten(fam, tmp_path):
    _, base_spec, ft_specs, _, fts = fam
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = run(merge_args("average", ft_specs, base_spec, out), tmp_path)
    H.assert_clean_error(res, str(out), "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert not pathlib.Path(str(out) + ".partial").exists()

    res = run(merge_args("average", ft_specs, base_spec, out, "--overwrite"), tmp_path)
    H.assert_clean_error(res, str(out), "not a tensormerge output", "precious.txt")  # only a merge is replaced
    assert (out / "precious.txt").read_text() == "keep me"

    (out / "precious.txt").unlink()
    for _ in range(2):  # an empty directory, then the previous merge
        res = run(merge_args("average", ft_specs, base_spec, out, "--overwrite"), tmp_path)
        assert res.returncode == 0, res
    merged = H.load_dir(out)
    for n, e in H.expected_average(fts).items():
        H.assert_close(merged[n], e, fts[0][n].dtype, n)


def test_output_is_an_input(fam, tmp_path):
    _, base_spec, ft_specs, _, _ = fam
    d = copy_model(ft_specs[0], tmp_path / "m")
    before = H.tree_digest(d)
    res = run(merge_args("average", [d, ft_specs[1]], None, d, "--overwrite"), tmp_path)
    H.assert_clean_error(res, str(d))
    assert H.tree_digest(d) == before
    assert not pathlib.Path(str(d) + ".partial").exists()


# ---------------------------------------------------------------------------------- contents
def test_non_float_tensor_differs(fam, tmp_path):
    _, base_spec, ft_specs, base, fts = fam
    a = dict(fts[1])
    a["position_ids"] = a["position_ids"].clone()
    a["position_ids"][0, 3] = 99
    pa = H.save_safetensors_dir(tmp_path / "a", a)
    out = tmp_path / "out"
    res = run(merge_args("average", [ft_specs[0], pa, ft_specs[2]], base_spec, out), tmp_path)
    H.assert_clean_error(res, "position_ids", str(pa), out_dir=out)


def test_bin_needing_pickle_code_is_refused(fam, tmp_path):
    _, base_spec, ft_specs, base, fts = fam
    d = tmp_path / "evil"
    d.mkdir()
    sd = dict(fts[0])
    sd["optimizer_state"] = NotAWeight()
    torch.save(sd, d / "pytorch_model.bin")
    out = tmp_path / "out"
    res = run(merge_args("average", [d, ft_specs[1]], base_spec, out), tmp_path)
    line = H.assert_clean_error(res, str(d / "pytorch_model.bin"), "weights_only", out_dir=out)
    assert "NotAWeight" in line  # says what it met: the class that would need pickle code


def test_bin_that_is_not_a_state_dict(fam, tmp_path):
    _, _, ft_specs, _, _ = fam
    f = tmp_path / "list.bin"
    torch.save([torch.ones(2)], f)
    out = tmp_path / "out"
    res = run(merge_args("average", [f, ft_specs[1]], None, out), tmp_path)
    H.assert_clean_error(res, str(f), out_dir=out)


@pytest.mark.parametrize("method", ["ties", "average", "task_arithmetic"])
def test_nan_in_input(fam, tmp_path, method):
    _, base_spec, ft_specs, base, fts = fam
    a = dict(fts[2])
    w = a["layer.0.attn.weight"].clone()
    w[10, 7] = float("nan")
    a["layer.0.attn.weight"] = w
    pa = H.save_safetensors_dir(tmp_path / "a", a)
    out = tmp_path / "out"
    res = run(merge_args(method, [ft_specs[0], ft_specs[1], pa], base_spec, out), tmp_path)
    H.assert_clean_error(res, "layer.0.attn.weight", out_dir=out)


def test_nan_error_mid_run_with_progress_bars(fam, tmp_path):
    """Without --quiet the progress bars share stderr; the error is still the last line, alone."""
    _, base_spec, ft_specs, base, fts = fam
    a = dict(fts[2])
    w = a["layer.0.mlp.weight"].clone()
    w[0, 0] = float("inf")
    a["layer.0.mlp.weight"] = w
    pa = H.save_safetensors_dir(tmp_path / "a", a)
    out = tmp_path / "out"
    res = run(merge_args("ties", [ft_specs[0], pa], base_spec, out), tmp_path, quiet=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "layer.0.mlp.weight" in errors[0], res
    assert res.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    assert not out.exists() and not pathlib.Path(str(out) + ".partial").exists()


def _fp16_family(root, base_values, ft_values):
    """A base and fine-tunes of three fp16 tensors; `mid` (the one between two in-range
    tensors) holds the given values."""
    sds = []
    for i, mid in enumerate([base_values] + ft_values):
        sds.append({"first": torch.full((3, 4), 1.0 + i, dtype=torch.float16),
                    "mid": torch.tensor(mid, dtype=torch.float16).reshape(-1, 1).repeat(1, 4),
                    "last": torch.full((5,), 2.0 - i, dtype=torch.float16)})
    return [str(H.save_safetensors_dir(root / f"m{i}", sd)) for i, sd in enumerate(sds)]


def test_fp16_overflow_after_the_cast_names_tensor_and_value(tmp_path):
    """A finite float32 result above 65504 becomes inf in an fp16 checkpoint: refused in one
    line naming the tensor and the value, with nothing written (the check is on the cast)."""
    base, *fts = _fp16_family(tmp_path, [32768.0, 1.0], [[49152.0, 1.0], [49152.0, 2.0], [16384.0, 1.5]])
    out = tmp_path / "out"
    # 32768 + 1.0 * (16384 + 16384 - 16384) = 49152: in range (and exact), so it merges
    ok = run(merge_args("task_arithmetic", fts, base, out, "-p", "lambda=1.0"), tmp_path)
    assert ok.returncode == 0, str(ok)
    assert float(H.load_dir(out)["mid"][0, 0]) == 49152.0
    shutil.rmtree(out)
    # 32768 + 1.5 * (16384 + 16384) = 81920: finite in float32, inf in float16
    res = run(merge_args("task_arithmetic", fts, base, out, "-p", "lambdas=1.5,1.5,0"), tmp_path)
    line = H.assert_clean_error(res, "'mid'", "81920", "float16", out_dir=out)
    assert "first" not in line and "last" not in line


def test_fp16_overflow_in_a_ties_patch_is_refused(tmp_path):
    """TIES rewrites exactly cancelling entries once the model-wide majority sign is known; a
    rewritten value that overflows the output dtype is refused like a merged one."""
    # mid[0]: τ = (+30000, −30000) cancels; first guess 0 takes the negative: 30000 − 2·30000;
    # the majority (+1, from `last`) patches it to 30000 + 2·30000 = 90000: inf in fp16
    base, *fts = _fp16_family(tmp_path, [30000.0, 0.0], [[60000.0, 1.0], [0.0, 1.0]])
    out = tmp_path / "out"
    res = run(merge_args("ties", fts, base, out, "-p", "k=1.0", "-p", "lambda=2", "--max-memory", "1KiB"),
              tmp_path)
    H.assert_clean_error(res, "'mid'", "90000", "float16", out_dir=out)


def test_real_subprocess_entry_point(fam, tmp_path):
    """One case through a plain `python -m tensormerge` (the others use a forking launcher)."""
    _, base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    res = H.run_cli_subprocess(["run", "--quiet", *merge_args("dare", ft_specs, base_spec, out, "-p", "p=1.5")],
                               cwd=tmp_path)
    H.assert_clean_error(res, "'p'", "[0, 1)", out_dir=out)
    assert res.returncode == 2


def test_plan_refuses_the_same_way(fam, tmp_path):
    _, base_spec, ft_specs, _, _ = fam
    args = ["--method", "dare", "--inputs", ",".join(ft_specs), "--base", base_spec, "-p", "lambda=x"]
    res = H.run_cli(["plan", *args], cwd=tmp_path)
    H.assert_clean_error(res, "'lambda'")
    assert os.listdir(tmp_path) == []


def test_inspect_bad_file(tmp_path):
    f = tmp_path / "bad.safetensors"
    _with_header(f, b"not json at all!")
    res = H.run_cli(["inspect", f], cwd=tmp_path)
    H.assert_clean_error(res, str(f))
    assert os.listdir(tmp_path) == ["bad.safetensors"]
