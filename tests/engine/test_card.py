"""What the output says about itself (SPEC §6): its own model card README.md (Hub front matter,
method, parameters, models, statistics, version, recipe), never the base's; a recipe file that
`tensormerge run --config` turns into the same bytes; config.json stating the written dtype."""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402

from tensormerge import __version__, api  # noqa: E402
from tensormerge.engine import card  # noqa: E402
from tensormerge.methods import REGISTRY  # noqa: E402

BASE_CARD = "---\nlicense: mit\npipeline_tag: text-generation\ntags: [base-only]\n---\n# THE BASE'S OWN CARD\n"


def front_matter(text: str) -> dict:
    """The Hub's reading of a card: YAML between a first line `---` and the next `---`."""
    lines = text.splitlines()
    assert lines[0] == "---", text[:200]
    end = lines.index("---", 1)
    data = yaml.safe_load("\n".join(lines[1:end]))
    assert isinstance(data, dict)
    return data


def float_dtypes(out: pathlib.Path) -> set[torch.dtype]:
    return {t.dtype for t in H.load_dir(out).values() if t.dtype.is_floating_point}


@pytest.fixture
def fam(tmp_path):
    base_spec, ft_specs, base, fts = H.write_family(tmp_path / "models", n=2)
    (pathlib.Path(base_spec) / "README.md").write_text(BASE_CARD)
    return base_spec, ft_specs, base, fts


# ------------------------------------------------------------------ the card
def test_card_front_matter_and_body(fam, tmp_path):
    base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="ties", inputs=ft_specs, base=base_spec, output=str(out), quiet=True,
                            dtype="bfloat16", params={"k": "0.5", "lambda": "0.8"}))
    text = (out / "README.md").read_text()
    assert "THE BASE'S OWN CARD" not in text and "base-only" not in text  # the base's card is not copied
    front = front_matter(text)
    assert front["base_model"] == [os.path.abspath(s) for s in ft_specs] + [os.path.abspath(base_spec)]
    assert front["library_name"] == "transformers"
    assert front["tags"] == ["merge", "tensormerge", "ties"]
    assert front["pipeline_tag"] == "text-generation"  # from the base's card front matter
    assert "license" not in front
    # the method, one line and its paper; every parameter with its value; the version
    assert "`ties`: trim, elect sign, disjoint merge" in text
    assert 'Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"' in text
    for key, value in (("k", "0.5"), ("lambda", "0.8"), ("sign", "mass"), ("merge", "dis-mean"),
                       ("scope", "global"), ("k_rule", "reference")):
        assert f"| `{key}` | `{value}` |" in text, key
    assert f"tensormerge {__version__}" in text
    assert "Output dtype: `bfloat16`" in text
    for s in ft_specs + [base_spec]:
        assert f"`{os.path.abspath(s)}` | local files |" in text
    # the recipe, in the card and in its own file, the same options
    assert "tensormerge run --config tensormerge-recipe.yaml --output" in text
    in_card = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert in_card == yaml.safe_load((out / "tensormerge-recipe.yaml").read_text())


def test_card_without_base_card_or_base(tmp_path):
    """No base: the first input's side files; no README there, so no pipeline_tag; paths with
    YAML's special characters stay exact strings in the front matter."""
    _, fts = H.make_family(2, seed=3)
    a = H.save_safetensors_dir(tmp_path / "a: #[x]", fts[0])
    b = H.save_safetensors_dir(tmp_path / "b", fts[1])
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="average", inputs=[str(a), str(b)], output=str(out), quiet=True))
    front = front_matter((out / "README.md").read_text())
    assert front["base_model"] == [str(a), str(b)]
    assert "pipeline_tag" not in front
    assert front["tags"] == ["merge", "tensormerge", "average"]
    text = (out / "README.md").read_text()
    assert "Wortsman et al. 2022" in text and "| `weights` | (default) |" in text


def test_adapter_output_card_says_peft(tmp_path):
    a = H.save_adapter_dir(tmp_path / "a", H.make_adapter(seed=1))
    b = H.save_adapter_dir(tmp_path / "b", H.make_adapter(seed=2))
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="average", inputs=[str(a), str(b)], output=str(out), quiet=True))
    front = front_matter((out / "README.md").read_text())
    assert front["library_name"] == "peft"
    assert "base_model_relation" not in front


def test_base_card_pipeline_tag_is_read_defensively(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for text, want in (("---\npipeline_tag: fill-mask\n---\n", "fill-mask"),
                       ("---\npipeline_tag: [a, b]\n---\n", None),
                       ("---\npipeline_tag: 'x\n  y: z'\n---\n", None),
                       ("---\npipeline_tag: fill-mask\n", None),  # never closed
                       ("---\n: : :\n---\n", None),
                       ("# no front matter\npipeline_tag: fill-mask\n", None)):
        (d / "README.md").write_text(text)
        assert card.base_pipeline_tag(str(d)) == want, text
    (d / "README.md").write_bytes(b"---\npipeline_tag: fill-mask\n---\n" + b"x" * (1 << 24))
    assert card.base_pipeline_tag(str(d)) == "fill-mask"


def test_every_method_has_a_citation_shown_by_methods_name():
    from tensormerge.cli import cli

    for name, m in REGISTRY.items():
        assert " et al. 20" in m.citation or " & " in m.citation, name
        assert "arXiv:" in m.citation, name
        res = CliRunner().invoke(cli, ["methods", name])
        assert res.exit_code == 0, res.output
        assert f"  paper: {m.citation}" in res.output.splitlines()


# ------------------------------------------------------------------ the recipe
def test_recipe_reproduces_the_merge_byte_for_byte(fam, tmp_path):
    """Relative paths and string -p values at the first run; the recipe, run from elsewhere,
    writes the same shards, config and recipe."""
    base_spec, ft_specs, _, _ = fam
    rel = [os.path.relpath(s, tmp_path) for s in ft_specs]
    res = H.run_cli(["run", "--method", "dare", "--inputs", ",".join(rel), "--base", os.path.relpath(base_spec, tmp_path),
                     "-p", "p=0.3", "-p", "seed=7", "-p", "lambda=0.9", "--dtype", "float16", "--shard-size", "10KB",
                     "--output", "out", "--quiet"], cwd=tmp_path)
    assert res.returncode == 0, res
    out = tmp_path / "out"
    recipe_path = out / "tensormerge-recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text())
    assert recipe["method"] == "dare"
    assert recipe["inputs"] == [os.path.abspath(s) for s in ft_specs]
    assert recipe["base"] == os.path.abspath(base_spec)
    assert recipe["params"] == {"lambda": 0.9, "p": 0.3, "seed": 7, "rescale": True}  # typed, defaults included
    assert recipe["dtype"] == "float16" and recipe["shard_size"] == "10KB"
    assert "output" not in recipe
    assert len(H.shard_digests(out)) > 1  # sharded: the layout is part of what is reproduced

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res2 = H.run_cli(["run", "--config", str(recipe_path), "--output", "again", "--quiet"], cwd=elsewhere)
    assert res2.returncode == 0, res2
    again = elsewhere / "again"
    assert H.shard_digests(again) == H.shard_digests(out)
    assert H.tree_digest(again, skip=("tensormerge.json", "README.md")) == H.tree_digest(out, skip=("tensormerge.json", "README.md"))


@pytest.mark.parametrize("method", ["fisher", "ubgm"])
def test_recipe_records_statistics_stores(fam, tmp_path, monkeypatch, method):
    base_spec, ft_specs, base, fts = fam
    floats = [n for n, t in base.items() if t.dtype.is_floating_point]
    g = torch.Generator().manual_seed(0)
    stores = [H.write_store(tmp_path / f"s{i}.zarr", {"fisher": {n: torch.rand(base[n].shape, generator=g) for n in floats}})
              for i in range(2)]
    base_store = H.write_store(tmp_path / "s0.zarr", {"fisher": {n: torch.rand(base[n].shape, generator=g) for n in floats}})
    monkeypatch.chdir(tmp_path)
    spec = dict(method=method, inputs=ft_specs, stats=[os.path.basename(s) for s in stores], quiet=True)
    if method == "ubgm":
        spec.update(base=base_spec, base_stats=os.path.basename(base_store))
    api.merge(api.MergeSpec(output="out", **spec))
    out = tmp_path / "out"
    recipe = yaml.safe_load((out / "tensormerge-recipe.yaml").read_text())
    assert recipe["stats"] == [os.path.abspath(s) for s in stores]
    text = (out / "README.md").read_text()
    for i, s in enumerate(stores):
        assert f"| input {i + 1} | `{os.path.abspath(s)}` |" in text
    if method == "ubgm":
        assert recipe["base_stats"] == os.path.abspath(base_store)
        assert f"| base | `{os.path.abspath(base_store)}` |" in text
    monkeypatch.chdir(pathlib.Path(base_spec).parent)
    from tensormerge.cli import cli

    res = CliRunner().invoke(cli, ["run", "--config", str(out / "tensormerge-recipe.yaml"), "--output",
                                   str(tmp_path / "again"), "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert H.shard_digests(tmp_path / "again") == H.shard_digests(out)


def test_hub_inputs_named_with_their_commit(hub_cache, tmp_path):
    base, fts = H.make_family(2, seed=4)
    commits = {name: H.make_hub_cache(hub_cache, name, sd) for name, sd in
               (("org/base", base), ("org/ft1", fts[0]), ("org/ft2", fts[1]))}
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="task_arithmetic", inputs=["org/ft1", "org/ft2@main"], base="org/base",
                            output=str(out), params={"lambda": "0.5"}, quiet=True))
    text = (out / "README.md").read_text()
    front = front_matter(text)
    assert front["base_model"] == ["org/ft1", "org/ft2", "org/base"]  # repo ids, as the Hub links them
    for name, commit in commits.items():
        assert f"`{name}` | {commit} |" in text
    recipe = yaml.safe_load((out / "tensormerge-recipe.yaml").read_text())
    assert recipe["inputs"] == [f"org/ft1@{commits['org/ft1']}", f"org/ft2@{commits['org/ft2']}"]
    assert recipe["base"] == f"org/base@{commits['org/base']}"
    assert recipe["params"] == {"lambda": 0.5}  # lambdas unset: left out, not null

    from tensormerge.cli import cli

    res = CliRunner().invoke(cli, ["run", "--config", str(out / "tensormerge-recipe.yaml"), "--output", "again",
                                   "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert H.shard_digests(tmp_path / "again") == H.shard_digests(out)


def test_recipe_yaml_has_no_aliases():
    """One list object under two keys would be dumped as an anchor and an alias, which a
    loader refusing aliases (as `--config` may) rejects."""
    text = card._yaml({"a": [1, 2], "b": None, "c": {"x": 1}} | {"d": (shared := [0.5, 0.5]), "e": shared})
    assert "&" not in text and "*" not in text
    assert yaml.safe_load(text)["e"] == [0.5, 0.5]


# ------------------------------------------------------------------ config.json dtype
@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16", "float16"])
def test_config_states_the_written_dtype(fam, tmp_path, dtype):
    base_spec, ft_specs, base, _ = fam
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="task_arithmetic", inputs=ft_specs, base=base_spec, output=str(out),
                            dtype=dtype, quiet=True))
    cfg = json.loads((out / "config.json").read_text())
    written = float_dtypes(out)
    if dtype == "auto":
        # the family stores float32, bfloat16 and float16 tensors: the config names the dtype of
        # most floating-point elements (counted here from the written files)
        counts: dict[torch.dtype, int] = {}
        for t in H.load_dir(out).values():
            if t.dtype.is_floating_point:
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        assert len(counts) == 3
        want = str(max(counts, key=counts.get)).replace("torch.", "")
    else:
        assert written == {getattr(torch, dtype)}
        want = dtype
    assert cfg["torch_dtype"] == want
    assert "dtype" not in cfg  # the base's config has no `dtype` key
    # everything else of the base's config is kept
    assert {k: v for k, v in cfg.items() if k != "torch_dtype"} == json.loads(H.SIDE_FILES["config.json"])


def test_config_dtype_keys_transformers_5_and_sub_configs(tmp_path):
    raw = json.dumps({"dtype": "float32", "vocab": {"dtype": 3}, "text_config": {"dtype": "float32", "a": 1},
                      "vision_config": {"torch_dtype": "float32"}, "other": {"dtype": "keep"}}).encode()
    got = json.loads(card.config_with_dtype(raw, torch.bfloat16, uniform=True))
    assert got["dtype"] == got["torch_dtype"] == "bfloat16"
    assert got["text_config"] == {"dtype": "bfloat16", "a": 1}
    assert got["vision_config"] == {"torch_dtype": "bfloat16"}
    assert got["vocab"] == {"dtype": 3} and got["other"] == {"dtype": "keep"}  # not dtype settings
    mixed = json.loads(card.config_with_dtype(raw, torch.bfloat16, uniform=False))
    assert mixed["dtype"] == "bfloat16" and mixed["text_config"]["dtype"] == "float32"
    per_model = json.loads(card.config_with_dtype(b'{"dtype": {"text_config": "float32", "vision_config": null}}',
                                                  torch.float16, uniform=True))
    assert per_model["dtype"] == {"text_config": "float16", "vision_config": "float16"}
    same = b'{"torch_dtype": "float16"}'
    assert card.config_with_dtype(same, torch.float16, uniform=True) is same  # unchanged: the very bytes
    for bad in (b"[1, 2]", b"{not json", b"\xff\xfe", b"null"):
        assert card.config_with_dtype(bad, torch.float16, uniform=True) is None


def test_unreadable_config_copied_unchanged_with_a_warning(tmp_path):
    _, fts = H.make_family(2, seed=1)
    a = H.save_safetensors_dir(tmp_path / "a", fts[0])
    (a / "config.json").write_text("{not json")
    b = H.save_safetensors_dir(tmp_path / "b", fts[1])
    res = H.run_cli(["run", "--method", "average", "--inputs", f"{a},{b}", "--output", str(tmp_path / "out"),
                     "--dtype", "float16"])
    assert res.returncode == 0, res
    assert (tmp_path / "out" / "config.json").read_text() == "{not json"
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "config.json" in warnings[0] and "float16" in warnings[0], res.stderr


def test_written_dtype_is_the_majority_of_float_elements():
    from types import SimpleNamespace as NS

    def blk(dtype, numel, kind="merge"):
        return NS(kind=kind, out_dtype=dtype, numel=numel)

    assert card.written_dtype([blk(torch.float32, 10), blk(torch.bfloat16, 11)]) == torch.bfloat16
    assert card.written_dtype([blk(torch.float16, 5), blk(torch.float32, 5)]) == torch.float16  # tie: first
    assert card.written_dtype([blk(torch.int64, 100, "copy"), blk(torch.float32, 1)]) == torch.float32
    assert card.written_dtype([blk(torch.int64, 100, "copy")]) is None


def test_auto_dtype_warns_when_the_models_disagree(tmp_path):
    base, fts = H.make_family(2, seed=2)
    fts[1] = {k: (v.to(torch.float32) if v.dtype.is_floating_point else v) for k, v in fts[1].items()}
    b = H.save_safetensors_dir(tmp_path / "base", base)
    f1 = H.save_safetensors_dir(tmp_path / "ft1", fts[0])
    f2 = H.save_safetensors_dir(tmp_path / "ft2", fts[1])
    common = ["run", "--method", "task_arithmetic", "--inputs", f"{f1},{f2}", "--base", str(b)]
    res = H.run_cli(common + ["--output", str(tmp_path / "out")])
    assert res.returncode == 0, res
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: ")]
    n_diff = sum(1 for t in base.values() if t.dtype in (torch.bfloat16, torch.float16))
    assert len(warnings) == 1, res.stderr
    assert f"--dtype auto: the models store {n_diff} tensor(s) in different dtypes" in warnings[0]
    assert "float32 in input 2" in warnings[0] and "the base's dtype" in warnings[0]
    # the output keeps the base's dtype per tensor, as the warning says
    merged = H.load_dir(tmp_path / "out")
    assert all(merged[n].dtype == t.dtype for n, t in base.items())
    # an explicit dtype, or models that agree: no warning
    res = H.run_cli(common + ["--output", str(tmp_path / "out2"), "--dtype", "float32"])
    assert res.returncode == 0 and "warning:" not in res.stderr, res
    res = H.run_cli(["run", "--method", "task_arithmetic", "--inputs", f"{f1},{f1}", "--base", str(b),
                     "--output", str(tmp_path / "out3")])
    assert res.returncode == 0 and "--dtype auto" not in res.stderr, res  # (the input named twice is warned)


def test_safe_open_reads_what_config_states(fam, tmp_path):
    """The header of every shard agrees with config.json for an explicit dtype."""
    base_spec, ft_specs, _, _ = fam
    out = tmp_path / "out"
    api.merge(api.MergeSpec(method="average", inputs=ft_specs, output=str(out), dtype="bfloat16",
                            shard_size="10KB", quiet=True))
    cfg = json.loads((out / "config.json").read_text())
    for f in H.shard_digests(out):
        with safe_open(str(out / f), framework="pt") as s:
            for k in s.keys():
                t = s.get_tensor(k)
                if t.dtype.is_floating_point:
                    assert str(t.dtype) == "torch." + cfg["torch_dtype"]


def test_recipe_pins_a_checkpoint_parameter(fam, tmp_path, monkeypatch):
    """MaTS' `init` may name a checkpoint: the recipe gives its absolute path, the card lists it."""
    base_spec, ft_specs, _, _ = fam
    monkeypatch.chdir(pathlib.Path(base_spec).parent)
    api.merge(api.MergeSpec(method="mats", inputs=["ft1", "ft2"], base="base", output=str(tmp_path / "out"),
                            params={"objective": "average", "init": "ft2"}, quiet=True))
    out = tmp_path / "out"
    recipe = yaml.safe_load((out / "tensormerge-recipe.yaml").read_text())
    assert recipe["params"]["init"] == os.path.abspath("ft2")
    assert f"| `init` parameter | `{os.path.abspath('ft2')}` | local files |" in (out / "README.md").read_text()
    monkeypatch.chdir(tmp_path)
    from tensormerge.cli import cli

    res = CliRunner().invoke(cli, ["run", "--config", str(out / "tensormerge-recipe.yaml"), "--output", "again",
                                   "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert H.shard_digests(tmp_path / "again") == H.shard_digests(out)


def test_card_renders_hostile_names_and_values_as_text(tmp_path):
    """A path or a parameter value holding Markdown, HTML, backticks or control characters is shown
    as written, never rendered: a Hub page renders the card's HTML (an `<img onerror>` would run)."""
    markdown_it = pytest.importorskip("markdown_it")
    _, fts = H.make_family(2, seed=4)
    evil = "x`<img src=x onerror=alert(1)>`\n[click](javascript:alert(2)) **bold**"
    a = H.save_safetensors_dir(tmp_path / evil, fts[0])
    b = H.save_safetensors_dir(tmp_path / "b", fts[1])
    out = tmp_path / "<b>out_*x*_"
    rule = [{"filter": "zz<img src=y onerror=alert(3)> [c](javascript:x) ``` **b**", "value": 0.3}, {"value": 0.5}]
    api.merge(api.MergeSpec(method="average", inputs=[str(a), str(b)], output=str(out), quiet=True,
                            params={"weights": [rule, 0.5]}))
    text = (out / "README.md").read_text()
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(text.split("---\n", 2)[2])
    for tag in ("<img", "<a ", "<strong", "<b>", "<em"):
        assert tag not in html, (tag, html)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "&lt;img src=y onerror=alert(3)&gt;" in html
    assert "\\n[click]" in html  # the newline shown, not a line break that makes the path look otherwise
    tables = html.split("<table>")[1:]
    assert len(tables) == 2  # parameters, models
    for table in tables:  # no cell broken open: every row has its table's columns
        rows = re.findall(r"<tr>(.*?)</tr>", table.split("</table>")[0], re.S)
        assert len({len(re.findall(r"<t[dh][ >]", r)) for r in rows}) == 1, table
    assert len(re.findall(r"<tr>", tables[1])) == 3  # header, two inputs
    assert "<h1>&lt;b&gt;out_*x*_</h1>" in html
    front = front_matter(text)
    assert front["base_model"][0] == str(a)  # the front matter keeps the exact string
    in_card = yaml.safe_load(text.split("````yaml\n", 1)[1].split("\n````", 1)[0]) if "````yaml" in text else \
        yaml.safe_load(text.split("```yaml\n", 1)[1].split("\n```", 1)[0])
    assert in_card == yaml.safe_load((out / "tensormerge-recipe.yaml").read_text())
