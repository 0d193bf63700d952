"""The command line (SPEC §1): methods, plan, inspect, run and its options, each run as a
separate process (see helpers.run_cli)."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import helpers as H  # noqa: E402

# A family with few rows per tensor, so a tiny --max-memory gives a few dozen chunks, not hundreds.
SMALL_SPEC = {
    "w": ((24, 33), torch.float32),
    "v": ((12, 19), torch.bfloat16),
    "u": ((10, 7), torch.float16),
    "b": ((5,), torch.float32),
    "ids": ((1, 12), torch.int64),
}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    base_spec, ft_specs, base, fts = H.write_family(root, n=3)
    return root, base_spec, ft_specs, base, fts


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    base_spec, ft_specs, base, fts = H.write_family(root, n=3, seed=7, spec=SMALL_SPEC)
    return root, base_spec, ft_specs, base, fts


def ok(res: H.CliResult) -> H.CliResult:
    assert res.returncode == 0, str(res)
    assert "Traceback" not in res.stderr, str(res)
    return res


def run_args(method, inputs, base, out, *extra):
    args = ["run", "--quiet", "--method", method, "--inputs", ",".join(map(str, inputs)), "--output", str(out)]
    if base is not None:
        args += ["--base", str(base)]
    return args + [str(x) for x in extra]


# ---------------------------------------------------------------------------------- methods
def test_methods_lists_every_method(tmp_path):
    res = ok(H.run_cli(["methods"], cwd=tmp_path))
    lines = res.stdout.splitlines()
    names = [ln.split()[0] for ln in lines if ln.strip()]
    assert {"average", "task_arithmetic", "ties", "dare"} <= set(names)
    for ln in lines:
        if ln.split()[0] in ("ties", "dare", "task_arithmetic"):
            assert ln.split()[1] == "base", ln
        if ln.split()[0] == "average":
            assert ln.split()[1] != "base", ln


@pytest.mark.parametrize("method,expected", [
    ("ties", {"k": "0.2", "lambda": "1.0", "sign": "mass", "merge": "dis-mean", "scope": "global",
              "k_rule": "reference"}),
    ("dare", {"p": "0.5", "lambda": "1.0", "seed": "0", "rescale": "True"}),
    ("task_arithmetic", {"lambda": "0.3"}),
    ("average", {"weights": "None", "normalize": "True"}),
])
def test_methods_name_lists_parameters_and_defaults(tmp_path, method, expected):
    res = ok(H.run_cli(["methods", method], cwd=tmp_path))
    assert res.stdout.splitlines()[0].startswith(f"{method}:")
    found = {}
    for ln in res.stdout.splitlines():
        ln = ln.strip()
        if ln.startswith("-p "):
            key, _, rest = ln[3:].partition("=")
            found[key] = rest.split()[0]
    for key, default in expected.items():
        assert found.get(key) == default, (key, found)
    if method == "ties":
        assert "dis-mean | dis-sum" in res.stdout and "normfrac" in res.stdout
        assert "needs base: yes" in res.stdout


def test_version(tmp_path):
    res = ok(H.run_cli(["--version"], cwd=tmp_path))
    assert "tensormerge" in res.stdout


# ---------------------------------------------------------------------------------- plan
def test_plan_ties_prints_blocks_and_passes_and_writes_nothing(fam, tmp_path):
    root, base_spec, ft_specs, base, _ = fam
    before = sorted(os.listdir(root))
    args = ["plan", "--method", "ties", "--inputs", ",".join(ft_specs), "--base", base_spec, "-p", "k=0.3",
            "--max-memory", "8KiB"]
    res = ok(H.run_cli(args, cwd=tmp_path))
    out = res.stdout
    assert "ties_high -> ties_high_miss -> ties_low -> ties_votes -> merge" in out
    assert "method ties" in out and "'k': 0.3" in out
    assert "inputs 3 + base" in out
    for name in base:
        assert name in out, name
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split() and ln.split()[0] in base}
    assert rows["position_ids"][-3] == "copy"
    assert rows["embed.weight"][-3] == "merge"
    assert int(rows["layer.0.attn.weight"][-2]) > 1  # chunks under 8KiB
    assert "blocks 8 (7 merged)" in out
    assert os.listdir(tmp_path) == []
    assert sorted(os.listdir(root)) == before


def test_plan_average_has_no_passes(fam, tmp_path):
    _, _, ft_specs, _, _ = fam
    res = ok(H.run_cli(["plan", "-m", "average", "-i", ft_specs[0], "-i", ",".join(ft_specs[1:])], cwd=tmp_path))
    assert "passes merge" in res.stdout and "inputs 3 " in res.stdout
    assert os.listdir(tmp_path) == []


def test_plan_accepts_the_same_arguments_as_run(fam, tmp_path):
    """SPEC §1: `plan` takes the same arguments as `run`, so a run command line can be turned into
    a plan by changing the verb. It must accept --output (and the run-only flags) and write nothing."""
    _, base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    args = run_args("ties", ft_specs, base_spec, out, "--report", tmp_path / "r.json", "--overwrite")
    args[0] = "plan"
    res = ok(H.run_cli(args, cwd=tmp_path))
    assert "ties_high" in res.stdout
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------- inspect
def test_inspect_checkpoint(fam, tmp_path):
    _, _, ft_specs, base, _ = fam
    res = ok(H.run_cli(["inspect", ft_specs[0]], cwd=tmp_path))
    lines = res.stdout.splitlines()
    assert f"{len(base)} tensors in 1 file(s)" in lines[0]
    assert any(ln.strip() == "file model.safetensors" for ln in lines)
    for name, t in base.items():
        row = next(ln for ln in lines if ln.split() and ln.split()[0] == name)
        assert str(t.dtype).replace("torch.", "") in row and str(list(t.shape)) in row, row


def test_inspect_sharded_tied_json(tmp_path):
    t = torch.randn(6, 4)
    sd = {"shared.weight": t, "encoder.embed_tokens.weight": t, "lm_head.weight": torch.randn(6, 4)}
    d = H.save_sharded_bin(tmp_path / "m", sd, n_shards=1)
    res = ok(H.run_cli(["inspect", d], cwd=tmp_path))
    assert "(tied to shared.weight)" in res.stdout
    # a tied tensor's bytes are counted once: 2 tensors * 24 floats * 4 bytes, in human units
    assert res.stdout.splitlines()[0].endswith(", 192 B"), res.stdout
    d2 = H.save_sharded_safetensors(tmp_path / "s", {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)},
                                    n_shards=2)
    res = ok(H.run_cli(["inspect", "--json", d2], cwd=tmp_path))
    info = json.loads(res.stdout)
    assert [pathlib.Path(f).name for f in info["files"]] == ["model-00001-of-00002.safetensors",
                                                             "model-00002-of-00002.safetensors"]
    assert info["tensors"] == {"a": {"dtype": "float32", "shape": [3]}, "b": {"dtype": "bfloat16", "shape": [2, 2]}}
    assert info["aliases"] == {}


# ---------------------------------------------------------------------------------- run
def test_run_report_and_values(fam, tmp_path):
    _, base_spec, ft_specs, base, fts = fam
    out, rep = tmp_path / "out", tmp_path / "report.json"
    res = ok(H.run_cli(run_args("task_arithmetic", ft_specs, base_spec, out, "--report", rep), cwd=tmp_path))
    assert res.stdout == "" and res.stderr == ""  # --quiet
    report = json.loads(rep.read_text())
    assert report["seconds"] > 0 and report["peak_rss_bytes"] > 10 * 2**20
    assert report["method"] == "task_arithmetic" and report["params"]["lambda"] == 0.3
    assert report["output"] == str(out)
    assert {b["name"] for b in report["blocks"]} == set(base)
    for b in report["blocks"]:
        assert b["chunks"] >= 1 and len(b["crc32"]) == 8
        assert b["kind"] == ("copy" if b["name"] == "position_ids" else "merge")
    merged = H.load_dir(out)
    for n, e in H.expected_task_arithmetic(base, fts, 0.3).items():
        H.assert_close(merged[n], e, base[n].dtype, n)
    assert torch.equal(merged["position_ids"], base["position_ids"])


def test_run_prints_summary_without_quiet(small, tmp_path):
    _, base_spec, ft_specs, _, _ = small
    out = tmp_path / "out"
    args = [a for a in run_args("average", ft_specs, None, out) if a != "--quiet"]
    res = ok(H.run_cli(args, cwd=tmp_path))
    assert res.stdout.startswith(f"wrote {out} (1 shard, ")


def test_average_weights_honoured(fam, tmp_path):
    _, _, ft_specs, base, fts = fam
    out = tmp_path / "out"
    ok(H.run_cli(run_args("average", ft_specs, None, out, "-p", "weights=0.5,0.3,0.2"), cwd=tmp_path))
    merged = H.load_dir(out)
    exp = H.expected_average(fts, [0.5, 0.3, 0.2])
    uniform = H.expected_average(fts)
    for n, e in exp.items():
        H.assert_close(merged[n], e, fts[0][n].dtype, n)
    # and the weights made a difference beyond tolerance
    assert not torch.allclose(merged["embed.weight"].double(), uniform["embed.weight"], atol=1e-4)


def test_average_weights_normalize(fam, tmp_path):
    _, _, ft_specs, base, fts = fam
    out = tmp_path / "out"
    ok(H.run_cli(run_args("average", ft_specs, None, out, "-p", "weights=5,3,2", "-p", "normalize=true"),
                 cwd=tmp_path))
    merged = H.load_dir(out)
    for n, e in H.expected_average(fts, [0.5, 0.3, 0.2]).items():
        H.assert_close(merged[n], e, fts[0][n].dtype, n)


def test_inputs_repeated_and_per_model_lambdas(fam, tmp_path):
    _, base_spec, ft_specs, base, fts = fam
    out = tmp_path / "out"
    args = ["run", "-q", "-m", "task_arithmetic", "-i", ft_specs[0], "-i", f"{ft_specs[1]},{ft_specs[2]}",
            "-b", base_spec, "-o", out, "-p", "lambdas=1.0,0.5,-0.25"]
    ok(H.run_cli(args, cwd=tmp_path))
    merged = H.load_dir(out)
    for n, t in base.items():
        if not t.dtype.is_floating_point:
            continue
        e = H.f64(t) + sum(lam * (H.f64(sd[n]) - H.f64(t)) for lam, sd in zip([1.0, 0.5, -0.25], fts))
        H.assert_close(merged[n], e, t.dtype, n)


def test_config_recipe(fam, tmp_path):
    _, base_spec, ft_specs, base, fts = fam
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "method: task_arithmetic\n"
        "inputs:\n" + "".join(f"  - {s}\n" for s in ft_specs)
        + f"base: {base_spec}\n"
        + f"output: {out}\n"
        + "params:\n  lambda: 0.5\n"
        + "dtype: float32\n"
        + "shard_size: 20KB\n")
    ok(H.run_cli(["run", "-q", "--config", recipe], cwd=tmp_path))
    merged = H.load_dir(out)
    assert (out / "model.safetensors.index.json").exists()  # shard_size from the recipe
    for n, e in H.expected_task_arithmetic(base, fts, 0.5).items():
        H.assert_close(merged[n], e, torch.float32, n)  # dtype from the recipe
    prov = json.loads((out / "tensormerge.json").read_text())
    assert prov["params"]["lambda"] == 0.5

    # command-line options override the recipe
    out2 = tmp_path / "out2"
    ok(H.run_cli(["run", "-q", "--config", recipe, "--output", out2, "-p", "lambda=0.1", "--dtype", "auto"],
                 cwd=tmp_path))
    merged2 = H.load_dir(out2)
    for n, e in H.expected_task_arithmetic(base, fts, 0.1).items():
        H.assert_close(merged2[n], e, base[n].dtype, n)


def test_config_recipe_that_is_not_yaml_says_where(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: average\nparams: {weights: [1, 2\ninputs: [a, b]\n")
    res = H.run_cli(["run", "--config", recipe], cwd=tmp_path)
    H.assert_clean_error(res, str(recipe), "not valid YAML (line 3, column")


def test_config_recipe_unknown_key(fam, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: average\nlamda: 3\n")
    res = H.run_cli(["run", "--config", recipe], cwd=tmp_path)
    H.assert_clean_error(res, str(recipe), "lamda")


@pytest.mark.parametrize("method,params", [
    ("average", []),
    ("task_arithmetic", ["-p", "lambda=0.7"]),
    ("ties", ["-p", "k=0.3"]),
    ("dare", ["-p", "p=0.4", "-p", "seed=3"]),
])
def test_tiny_max_memory_is_byte_identical(small, tmp_path, method, params):
    _, base_spec, ft_specs, base, fts = small
    big, tiny = tmp_path / "big", tmp_path / "tiny"
    base_arg = None if method == "average" else base_spec
    rb, rt = tmp_path / "big.json", tmp_path / "tiny.json"
    ok(H.run_cli(run_args(method, ft_specs, base_arg, big, *params, "--report", rb), cwd=tmp_path))
    ok(H.run_cli(run_args(method, ft_specs, base_arg, tiny, *params, "--max-memory", "4KiB", "--report", rt),
                 cwd=tmp_path))
    chunks_big = {b["name"]: b["chunks"] for b in json.loads(rb.read_text())["blocks"]}
    report_tiny = json.loads(rt.read_text())
    chunks_tiny = {b["name"]: b["chunks"] for b in report_tiny["blocks"]}
    assert all(c == 1 for c in chunks_big.values())
    assert chunks_tiny["w"] > 2 and chunks_tiny["v"] > 1, chunks_tiny
    assert report_tiny["max_memory"] == 4096
    assert H.sha256_file(big / "model.safetensors") == H.sha256_file(tiny / "model.safetensors")
    merged = H.load_dir(tiny)
    if method == "average":
        exp = H.expected_average(fts)
    elif method == "task_arithmetic":
        exp = H.expected_task_arithmetic(base, fts, 0.7)
    else:
        exp = None
    if exp is not None:
        for n, e in exp.items():
            H.assert_close(merged[n], e, base[n].dtype, n)
    if method == "dare":
        # about p of each task vector was dropped: the merge is not plain task arithmetic
        ta = H.expected_task_arithmetic(base, fts, 1.0)["w"]
        assert not torch.allclose(merged["w"].double(), ta, atol=1e-3)


def test_tiny_max_memory_budget_is_respected(small, tmp_path):
    """SPEC §1: --max-memory bounds the tensor bytes held at once. The executor's own count of
    budgeted bytes (reads + intermediates + output buffers in flight) must stay under it, in
    every run (the overshoot, when there is one, depends on thread timing: a few runs)."""
    _, base_spec, ft_specs, _, _ = small
    peaks = []
    for i in range(4):
        rep = tmp_path / f"r{i}.json"
        ok(H.run_cli(run_args("task_arithmetic", ft_specs, base_spec, tmp_path / f"out{i}", "--max-memory", "4KiB",
                              "--report", rep), cwd=tmp_path))
        report = json.loads(rep.read_text())
        assert report["max_memory"] == 4096
        peaks.append(report["peak_budgeted_bytes"])
    assert all(0 < p <= 4096 for p in peaks), peaks


def test_dare_p0_is_task_arithmetic(small, tmp_path):
    _, base_spec, ft_specs, base, fts = small
    out = tmp_path / "out"
    ok(H.run_cli(run_args("dare", ft_specs, base_spec, out, "-p", "p=0", "-p", "lambda=0.6"), cwd=tmp_path))
    merged = H.load_dir(out)
    for n, e in H.expected_task_arithmetic(base, fts, 0.6).items():
        H.assert_close(merged[n], e, base[n].dtype, n)


def test_ties_k1_sign_none_dis_sum_is_task_arithmetic(small, tmp_path):
    """k=1 keeps everything, sign=none skips the election, dis-sum sums: θ_0 + λ Σ τ_i."""
    _, base_spec, ft_specs, base, fts = small
    out = tmp_path / "out"
    ok(H.run_cli(run_args("ties", ft_specs, base_spec, out, "-p", "k=1", "-p", "sign=none", "-p", "merge=sum",
                          "-p", "lambda=0.4"), cwd=tmp_path))
    merged = H.load_dir(out)
    for n, e in H.expected_task_arithmetic(base, fts, 0.4).items():
        H.assert_close(merged[n], e, base[n].dtype, n)


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                               ("float32", torch.float32)])
def test_dtype_changes_output_dtype(small, tmp_path, dtype, torch_dtype):
    _, base_spec, ft_specs, base, fts = small
    out = tmp_path / "out"
    ok(H.run_cli(run_args("average", ft_specs, None, out, "--dtype", dtype), cwd=tmp_path))
    merged = H.load_dir(out)
    exp = H.expected_average(fts)
    for n, t in base.items():
        if t.dtype.is_floating_point:
            H.assert_close(merged[n], exp[n], torch_dtype, n)
        else:
            assert merged[n].dtype == t.dtype and torch.equal(merged[n], t)


def test_dtype_auto_follows_base(small, tmp_path):
    _, base_spec, ft_specs, base, fts = small
    # fine-tunes stored in float32, base in mixed dtypes: the output takes the base's dtypes
    root = tmp_path / "f32"
    specs = [H.save(root / f"ft{i}", {k: (v.float() if v.dtype.is_floating_point else v) for k, v in sd.items()})
             for i, sd in enumerate(fts)]
    out = tmp_path / "out"
    ok(H.run_cli(run_args("task_arithmetic", specs, base_spec, out), cwd=tmp_path))
    merged = H.load_dir(out)
    for n, t in base.items():
        assert merged[n].dtype == t.dtype, n


# ---------------------------------------------------------------------------------- what a run says
def test_methods_parameter_columns_align(tmp_path):
    """`methods NAME`: the type and help columns start at the same place on every -p line."""
    for name in ("ties", "mats", "average"):
        res = ok(H.run_cli(["methods", name], cwd=tmp_path))
        rows = [ln for ln in res.stdout.splitlines() if ln.startswith("  -p ")]
        assert len(rows) >= 2
        type_at = {ln.index(" (") for ln in rows}
        help_at = {ln.index(") ") + 2 + len(ln[ln.index(") ") + 2:]) - len(ln[ln.index(") ") + 2:].lstrip())
                   for ln in rows}
        assert len(type_at) == 1 and len(help_at) == 1, "\n".join(rows)


def test_inspect_human_sizes(tmp_path):
    """A small model is not 0.000 GB: bytes in binary units."""
    d = H.save_safetensors_dir(tmp_path / "m", {"a": torch.ones(3), "b": torch.zeros(1024, 1024)}, side_files=False)
    first = ok(H.run_cli(["inspect", d], cwd=tmp_path)).stdout.splitlines()[0]
    assert first.endswith(", 4.00 MiB"), first  # (3 + 1024²) * 4 bytes


def test_help_does_not_import_torch(tmp_path):
    """`--help` and argument errors answer at once: the cli imports neither torch nor numba."""
    code = ("import runpy, sys\n"
            "sys.argv = ['tensormerge', '--help']\n"
            "try:\n    runpy.run_module('tensormerge', run_name='__main__', alter_sys=True)\n"
            "except SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'numba', 'numpy', 'dask', 'zarr') if m in sys.modules))\n")
    import subprocess
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Merge fine-tuned models" in p.stdout
    assert p.stdout.splitlines()[-1] == "heavy: []", p.stdout


def test_cli_dtype_choices_match_constants():
    from tensormerge import cli, constants

    assert list(cli.DTYPES) == list(constants.DTYPE_CHOICES)


def test_run_summary_lines_match_the_report(small, tmp_path):
    """After every run: output, size, seconds, peak memory, blocks merged and copied; the report
    holds the same lines; no warning for a plain average."""
    _, _, ft_specs, _, _ = small
    out, rep = tmp_path / "out", tmp_path / "r.json"
    args = [a for a in run_args("average", ft_specs, None, out, "--report", rep) if a != "--quiet"]
    res = ok(H.run_cli(args, cwd=tmp_path))
    report = json.loads(rep.read_text())
    assert res.stdout.splitlines() == report["summary"]
    size = (24 * 33 * 4 + 12 * 19 * 2 + 10 * 7 * 2 + 5 * 4 + 12 * 8) / 1024
    assert report["summary"][0].startswith(f"wrote {out} (1 shard, {size:.2f} KiB) in "), report["summary"]
    assert "peak RSS" in report["summary"][0] and " MiB" in report["summary"][0]
    assert report["summary"][1] == "blocks: 4 merged by average, 1 copied (not floating point)"
    assert report["warnings"] == [] and "warning" not in res.stderr


def test_average_weights_1_2_3_is_the_weighted_average(fam, tmp_path):
    """SPEC §4: `normalize` is true when weights are given (mergekit's linear): 1,2,3 -> Σ w_i θ_i / 6."""
    _, _, ft_specs, _, fts = fam
    out = tmp_path / "out"
    res = ok(H.run_cli(run_args("average", ft_specs, None, out, "-p", "weights=1,2,3"), cwd=tmp_path))
    assert "warning" not in res.stderr
    merged = H.load_dir(out)
    for n in merged:
        if fts[0][n].dtype.is_floating_point:
            e = sum(w * H.f64(sd[n]) for w, sd in zip((1, 2, 3), fts)) / 6
            H.assert_close(merged[n], e, fts[0][n].dtype, n)


def test_average_unnormalized_weights_warn(fam, tmp_path):
    """normalize=false keeps the weights verbatim (a sum 6 times a model's scale) and says so,
    even under --quiet."""
    _, _, ft_specs, _, fts = fam
    out, rep = tmp_path / "out", tmp_path / "r.json"
    res = ok(H.run_cli(run_args("average", ft_specs, None, out, "-p", "weights=1,2,3", "-p", "normalize=false",
                                "--report", rep), cwd=tmp_path))
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "weights sum to 6" in warnings[0] and "normalize" in warnings[0], res.stderr
    assert json.loads(rep.read_text())["warnings"] == [warnings[0][len("warning: "):]]
    merged = H.load_dir(out)
    e = sum(w * H.f64(sd["embed.weight"]) for w, sd in zip((1, 2, 3), fts))
    H.assert_close(merged["embed.weight"], e, torch.float32, "embed.weight")


def test_base_a_method_ignores_warns(small, tmp_path):
    _, base_spec, ft_specs, _, _ = small
    res = ok(H.run_cli(run_args("average", ft_specs, base_spec, tmp_path / "out"), cwd=tmp_path))
    assert res.stdout == ""  # --quiet: no summary
    assert res.stderr.startswith("warning: --base: method 'average'") and len(res.stderr.splitlines()) == 1, res.stderr
    res = ok(H.run_cli(run_args("task_arithmetic", ft_specs, base_spec, tmp_path / "out2"), cwd=tmp_path))
    assert res.stderr == ""


def test_an_input_named_twice_or_the_base_as_an_input_warns(small, tmp_path):
    """However the path is spelled (mergekit refuses a model listed twice; a run merges it and
    says so); a method that reads no base is not told its base is an input."""
    _, base_spec, ft_specs, _, _ = small
    again = os.path.join(os.path.dirname(ft_specs[0]), ".", os.path.basename(ft_specs[0])) + os.sep
    res = ok(H.run_cli(run_args("average", [ft_specs[0], again], None, tmp_path / "o1"), cwd=tmp_path))
    assert res.stderr.startswith("warning: --inputs: input 2 (") and "same files as input 1" in res.stderr, res.stderr
    res = ok(H.run_cli(run_args("task_arithmetic", [ft_specs[0], ft_specs[1]], ft_specs[0], tmp_path / "o2"),
                       cwd=tmp_path))
    assert res.stderr.startswith(f"warning: --base {ft_specs[0]} is also input 1: its task vector is zero"), res.stderr
    res = ok(H.run_cli(run_args("task_arithmetic", ft_specs, base_spec, tmp_path / "o3"), cwd=tmp_path))
    assert res.stderr == ""


def test_mats_stopping_early_says_so(tmp_path):
    """A MaTS run whose CG stops before tol prints the summary line and a warning."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(6, 5, generator=g), "v": torch.randn(7, generator=g)}
    models = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    paths = [str(H.save_safetensors_dir(tmp_path / f"m{i}", m)) for i, m in enumerate(models)]
    bpath = str(H.save_safetensors_dir(tmp_path / "base", base))
    stores = [H.write_store(tmp_path / f"s{i}.zarr",
                            {"fisher": {k: torch.rand(v.shape, generator=g) + 0.01 for k, v in base.items()}})
              for i in range(3)]
    out, rep = tmp_path / "out", tmp_path / "r.json"
    res = ok(H.run_cli(["run", "-m", "mats", "-i", ",".join(paths), "-b", bpath, "--stats", ",".join(stores),
                        "-p", "objective=fisher", "-p", "iterations=1", "-p", "tol=1e-9", "-o", out, "--report", rep],
                       cwd=tmp_path))
    report = json.loads(rep.read_text())
    assert res.stdout.splitlines() == report["summary"]
    assert "blocks: 2 merged by mats, 0 averaged for lack of statistics, 0 copied (not floating point)" in res.stdout
    assert "2 did not reach tol 1e-09" in res.stdout, res.stdout
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ") and "records no model" not in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: mats: 2 of 2 CG blocks stopped short of tol"), \
        res.stderr
    worst = max(b["cg_residual"] for b in report["blocks"])
    assert f"largest relative residual {worst:.1e}" in warnings[0]


def test_provenance_records_typed_params(small, tmp_path):
    """tensormerge.json records `-p` values as numbers, booleans and lists, as a YAML recipe's."""
    _, base_spec, ft_specs, _, _ = small
    flags = ["-p", "p=0.25", "-p", "seed=3", "-p", "rescale=false", "-p", "lambda=1"]
    ok(H.run_cli(run_args("dare", ft_specs, base_spec, tmp_path / "a", *flags), cwd=tmp_path))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("params:\n  p: 0.25\n  seed: 3\n  rescale: false\n  lambda: 1\n")
    ok(H.run_cli(run_args("dare", ft_specs, base_spec, tmp_path / "b", "--config", recipe), cwd=tmp_path))
    want = {"p": 0.25, "seed": 3, "rescale": False, "lambda": 1.0}
    for d in ("a", "b"):
        got = json.loads((tmp_path / d / "tensormerge.json").read_text())["settings"]["params"]
        assert got == want and type(got["seed"]) is int and type(got["lambda"]) is float, got
    ok(H.run_cli(run_args("average", ft_specs, None, tmp_path / "c", "-p", "weights=1,2,3"), cwd=tmp_path))
    got = json.loads((tmp_path / "c" / "tensormerge.json").read_text())["settings"]["params"]
    assert got == {"weights": [1.0, 2.0, 3.0]}


def test_progress_bars_say_what_each_pass_does(small, tmp_path):
    _, base_spec, ft_specs, _, _ = small
    args = [a for a in run_args("ties", ft_specs, base_spec, tmp_path / "out") if a != "--quiet"]
    res = ok(H.run_cli(args, cwd=tmp_path))
    bars = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if "%|" in ln]
    assert any(ln.startswith("1/6 top-k threshold: sample ") for ln in bars), res.stderr
    assert any(ln.startswith("2/6 top-k threshold: high bits ") for ln in bars), res.stderr
    assert any(ln.startswith("5/6 majority sign: votes ") for ln in bars), res.stderr
    assert any(ln.startswith("6/6 merge ") for ln in bars), res.stderr
    assert not any("ties_" in ln for ln in bars)  # what a pass does, not its internal name
    assert any("run ~0:00:" in ln for ln in bars)  # and the whole run's time left


@pytest.mark.parametrize("text,key", [
    ("method: task_arithmetic\ninputs: [A]\nparams: {lambda: 0.5}\nmethod: average\n", "'method'"),
    ("method: task_arithmetic\nparams: {lambda: 0.5, lambda: 2}\n", "'lambda'"),
    ("merge_method: ties\nbase_model: B\nmodels: [{model: A, parameters: {weight: 1}}]\nmerge_method: linear\n",
     "'merge_method'"),
])
def test_recipe_key_given_twice_is_refused(small, tmp_path, text, key):
    """PyYAML keeps the last of two equal keys, so a recipe with `method` twice merged silently
    with the second; refused naming the key and both lines, nothing written."""
    _, base, fts, _, _ = small
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("A", fts[0]).replace("B", base))
    out = tmp_path / "out"
    line = H.assert_clean_error(H.run_cli(["run", "--config", recipe, "-b", base, "-o", out]), str(recipe), key,
                                "twice", out_dir=out)
    assert "lines" in line
    H.assert_clean_error(H.run_cli(["convert-config", recipe]), key, "twice")


def test_recipe_with_a_huge_list_is_refused_quickly(small, tmp_path):
    """A recipe under the 1 MiB limit holding 150k values (a gradient no model has layers for)
    took a minute to parse and echo into the card; refused in about a second."""
    import time

    _, _, fts, _, _ = small
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: average\ninputs: [{fts[0]}, {fts[1]}]\nparams:\n  weights: [{{gradient: ["
                      + ",".join(["1"] * 150_000) + "]}, 1]\n")
    assert recipe.stat().st_size < 1 << 20
    out = tmp_path / "out"
    t0 = time.perf_counter()
    res = H.run_cli(["run", "--config", recipe, "-o", out])
    H.assert_clean_error(res, str(recipe), "YAML values", out_dir=out)
    assert time.perf_counter() - t0 < 15


def test_inspect_escapes_a_path_that_would_rewrite_the_terminal(tmp_path):
    """A directory named with a carriage return or an escape code is listed escaped (tensor names
    holding them are refused when the header is read)."""
    d = H.save_safetensors_dir(tmp_path / "m\rfake\x1b[2J", {"a.weight": torch.ones(2)}, side_files=False)
    out = ok(H.run_cli(["inspect", d], cwd=tmp_path)).stdout
    assert "\r" not in out and "\x1b" not in out
    assert out.splitlines()[0].startswith(str(tmp_path) + "/m\\rfake\\x1b[2J: 1 tensors"), out
