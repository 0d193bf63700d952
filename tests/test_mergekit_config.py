"""mergekit recipes: the translation `run --config` and `convert-config` make, and every key
that cannot be honoured refused in one line naming it. (Equality with mergekit's own output is
tests/test_mergekit_parity.py, which needs mergekit installed.)"""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import helpers as H  # noqa: E402

from tensormerge.errors import ParameterError  # noqa: E402
from tensormerge.mergekit_config import translate  # noqa: E402

TWO = {"models": [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.3}}]}


def _gta(method: str, **extra) -> dict:
    return {"merge_method": method, "base_model": "base",
            "models": [{"model": "base"},
                       {"model": "a", "parameters": {"weight": 0.7, "density": 0.5, **extra}},
                       {"model": "b", "parameters": {"weight": 0.3, "density": 0.4, **extra}}]}


# mergekit's presets (merge_methods/registry.py), written out by hand: normalize, rescale
PRESETS = {
    "task_arithmetic": ("gta", {"sparsify": "none", "consensus": "none"}, False, False),
    "ties": ("gta", {"sparsify": "magnitude", "consensus": "sum"}, True, False),
    "dare_ties": ("dare_ties", {}, False, True),
    "dare_linear": ("dare_linear", {}, False, True),
    "breadcrumbs": ("breadcrumbs", {}, False, False),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}, False, False),
    "della": ("della", {}, True, True),
    "della_linear": ("della_linear", {}, False, True),
}


@pytest.mark.parametrize("method", sorted(PRESETS))
def test_gta_family_translation(method):
    name, fixed, normalize, rescale = PRESETS[method]
    out = translate(_gta(method))
    want = {**fixed, "weights": [0.7, 0.3], "density": [0.5, 0.4]}
    if method.startswith("breadcrumbs"):
        want["gamma"] = 0.01
    if method.startswith("della"):
        want["epsilon"] = 0.15
    want.update({"lambda": 1.0, "normalize": normalize, "rescale": rescale})
    assert out == {"method": name, "params": want, "inputs": ["a", "b"], "base": "base"}


def test_other_methods_translation():
    assert translate({"merge_method": "linear", **TWO, "dtype": "float16"}) == {
        "method": "average", "params": {"weights": [0.7, 0.3], "normalize": True}, "inputs": ["a", "b"],
        "dtype": "float16"}
    slerp = {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
             "parameters": {"t": [0, 0.5, 1]}, "dtype": "bfloat16", "out_dtype": "float32"}
    assert translate(slerp) == {"method": "slerp", "params": {"t": {"gradient": [0, 0.5, 1]}}, "inputs": ["b"],
                                "base": "a", "dtype": "float32"}
    stock = {"merge_method": "model_stock", "base_model": "base", "tokenizer_source": "base",
             "models": [{"model": "a"}, {"model": "b"}]}
    assert translate(stock) == {"method": "model_stock", "params": {}, "inputs": ["a", "b"], "base": "base"}


def test_parameter_precedence_model_then_top_then_default():
    """A model's filters that match only some tensors fall through to the top level, then to
    the method's default (density 1.0), as mergekit's resolver does; shared ones come from the
    top level."""
    cfg = _gta("ties")
    cfg["models"][1]["parameters"] = {"weight": [{"filter": "mlp", "value": [0, 1]}],
                                      "density": [{"filter": "attn", "value": 0.2}]}
    cfg["models"][2]["parameters"] = {"density": 0.9}
    cfg["parameters"] = {"weight": [{"filter": "*", "value": 0.25}], "lambda": [{"filter": "norm", "value": 2}]}
    p = translate(cfg)["params"]
    assert p["weights"] == [[{"filter": "mlp", "value": {"gradient": [0, 1]}}, {"value": 0.25}], [{"value": 0.25}]]
    assert p["density"] == [[{"filter": "attn", "value": 0.2}, {"value": 1.0}], 0.9]
    assert p["lambda"] == [{"filter": "norm", "value": 2}, {"value": 1.0}]


def test_whole_range_slices_are_a_plain_merge(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    b = tmp_path / "b"
    b.mkdir()
    (b / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 4}}))  # as multimodal ones do
    cfg = {"merge_method": "slerp", "base_model": str(d),
           "slices": [{"sources": [{"model": str(d), "layer_range": [0, 4]},
                                   {"model": str(b), "layer_range": [0, 4], "parameters": {}}],
                       "parameters": {"t": 0.3}}]}
    assert translate(cfg) == {"method": "slerp", "params": {"t": 0.3}, "inputs": [str(b)], "base": str(d)}
    cfg["slices"][0]["sources"][1]["layer_range"] = [0, 3]
    with pytest.raises(ParameterError, match=r"layer_range"):
        translate(cfg)
    cfg["slices"][0]["sources"][0]["layer_range"] = [0, 3]
    with pytest.raises(ParameterError, match=r"slices\[0\]\.sources\[0\]\.layer_range \[0, 3\] does not cover"):
        translate(cfg)


LINEAR = {"merge_method": "linear", **TWO}
GTA = _gta("ties")

# Every mergekit key or value tensormerge refuses, each with what the one-line error must name.
REFUSED = [
    ({**LINEAR, "modules": {"text": {"models": []}}}, "'modules'"),
    ({**LINEAR, "tokenizer": {"source": "union"}}, "'tokenizer'"),
    ({**LINEAR, "chat_template": "chatml"}, "'chat_template'"),
    ({**LINEAR, "tokenizer_source": "union"}, "tokenizer_source"),
    ({**LINEAR, "tokenizer_source": "org/other"}, "tokenizer_source"),
    ({**LINEAR, "tokenizer_source": "base"}, "tokenizer_source: base needs base_model"),
    ({**LINEAR, "unknown_key": 1}, "unknown_key"),
    ({**LINEAR, "normalize": True}, "normalize"),
    ({**LINEAR, "rescale": True}, "rescale"),
    ({**LINEAR, "int8_mask": True}, "int8_mask"),
    ({**LINEAR, "merge_method": "passthrough"}, "passthrough"),
    ({**LINEAR, "merge_method": "nuslerp"}, "nuslerp"),
    ({**LINEAR, "merge_method": "sce"}, "sce"),
    ({**LINEAR, "merge_method": "karcher"}, "karcher"),
    ({**LINEAR, "models": [{"model": "a+lora", "parameters": {"weight": 1}}]}, "models[0].model"),
    ({**GTA, "base_model": "base+lora"}, "base_model"),
    ({**LINEAR, "models": [{"model": "a", "revision": "x", "parameters": {"weight": 1}}]}, "models[0].revision"),
    ({**LINEAR, "models": [{"model": "a", "parameters": {"weight": 1}}, {"model": "a", "parameters": {"weight": 1}}]},
     "models[1].model"),
    ({"merge_method": "linear"}, "`models` or `slices`"),
    ({**LINEAR, "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]}]}, "`models` or `slices`"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                                           {"sources": [{"model": "a", "layer_range": [2, 4]}]}]}, "slices"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [1, 4]}]}]},
     "slices[0].sources[0].layer_range"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]},
                                                        {"model": "b", "layer_range": [0, 2]}]}]}, "layer_range"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}],
                                            "residual_weight": 0.5}]}, "slices[0].residual_weight"),
    ({"merge_method": "linear", "base_model": "a",
      "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}], "base_model": "b"}]}, "slices[0].base_model"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "a", "layer_range": [0, 4], "extra": 1}]}]},
     "slices[0].sources[0].extra"),
    ({**LINEAR, "parameters": {"density": 0.5}}, "parameters.density"),
    ({**GTA, "parameters": {"t": 0.5}}, "parameters.t"),
    ({**GTA, "models": [{"model": "a", "parameters": {"weight": 1, "lambda": 2}}]}, "models[0].parameters.lambda"),
    ({**GTA, "models": [{"model": "a", "parameters": {"weight": 1, "foo": 2}}]}, "models[0].parameters.foo"),
    ({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 1}}]},
     "models[0].parameters.weight"),
    ({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]}, "parameters.t"),
    ({"merge_method": "slerp", "base_model": "a", "parameters": {"t": 0.5},
      "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]}, "slerp"),
    ({"merge_method": "model_stock", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]}, "model_stock"),
    ({**GTA, "base_model": None}, "base_model"),
    ({**LINEAR, "dtype": "float64"}, "dtype"),
    ({**LINEAR, "out_dtype": "int8"}, "out_dtype"),
    ({**LINEAR, "parameters": {"weight": [{"filter": "mlp*", "value": 1}]}}, "mlp*"),
    ({**LINEAR, "parameters": {"weight": [{"filter": "mlp", "value": 1, "when": 2}]}}, "when"),
]


@pytest.mark.parametrize("cfg,needle", REFUSED, ids=[n for _, n in REFUSED])
def test_refused_keys_name_the_key(cfg, needle, tmp_path):
    with pytest.raises(ParameterError, match=None) as e:
        translate(cfg, "r.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_refused_through_the_cli_in_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**LINEAR, "merge_method": "passthrough"}))
    out = tmp_path / "out"
    H.assert_clean_error(H.run_cli(["run", "--config", recipe, "-o", out]), "merge_method", "passthrough",
                         out_dir=out)
    H.assert_clean_error(H.run_cli(["convert-config", recipe]), "passthrough")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return root, *H.write_family(root, n=2)


def test_linear_recipe_runs_and_convert_config_round_trips(family, tmp_path):
    """A mergekit linear recipe runs through `run --config`, giving the weighted average (float64
    formula here, with the per-tensor weight its filter picks); `convert-config`'s output, run
    as a native recipe, writes the same bytes."""
    root, base, fts, base_sd, sds = family
    recipe = tmp_path / "linear.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "linear", "base_model": base, "tokenizer_source": "base", "dtype": "float32",
        "models": [{"model": fts[0], "parameters": {"weight": [{"filter": "mlp", "value": 3.0}]}},
                   {"model": fts[1], "parameters": {"weight": 1.0}}],
        "parameters": {"weight": 1.0}}))
    res = H.run_cli(["run", "--config", recipe, "-o", tmp_path / "a", "-q"])
    assert res.returncode == 0, str(res)
    got = H.load_dir(tmp_path / "a")
    for name, t in sds[0].items():
        if not t.dtype.is_floating_point:
            continue
        w = 3.0 if "mlp" in name else 1.0
        want = (w * H.f64(sds[0][name]) + H.f64(sds[1][name])) / (w + 1.0)
        H.assert_close(got[name], want, torch.float32, name)
    conv = H.run_cli(["convert-config", recipe])
    assert conv.returncode == 0, str(conv)
    native = yaml.safe_load(conv.stdout)
    assert native["method"] == "average" and native["base"] == base
    assert native["params"]["weights"] == [[{"filter": "mlp", "value": 3.0}, {"value": 1.0}], 1.0]
    (tmp_path / "native.yaml").write_text(conv.stdout)
    res = H.run_cli(["run", "--config", tmp_path / "native.yaml", "-o", tmp_path / "b", "-q"])
    assert res.returncode == 0, str(res)
    assert H.shard_digests(tmp_path / "a") == H.shard_digests(tmp_path / "b")
    # tokenizer_source: base: the base's tokenizer files are the output's
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (pathlib.Path(base) / "tokenizer.json").read_bytes()


def test_plan_reads_a_mergekit_recipe(family, tmp_path):
    root, base, fts, _, _ = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": fts[0], "parameters": {"weight": [0.0, 1.0]}}, {"model": fts[1], "parameters": {"weight": 1.0}}]}))
    res = H.run_cli(["plan", "--config", recipe])
    assert res.returncode == 0, str(res)
    rows = {line.split()[0]: line for line in res.stdout.splitlines() if line.startswith(("layer.", "embed."))}
    # the family's layers 0 and 1: t = 0 and 1, so model 1's weight is 0 then 1; embed (no layer) t = 0
    assert rows["layer.0.attn.weight"].endswith("weights=[0,1]")
    assert rows["layer.1.proj.weight"].endswith("weights=[1,1]")
    assert rows["embed.weight"].endswith("weights=[0,1]")


def _slerp_slices(a: str, b: str, end: int) -> dict:
    return {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5},
            "slices": [{"sources": [{"model": a, "layer_range": [0, end]}, {"model": b, "layer_range": [0, end]}]}]}


def test_slices_of_a_model_whose_layer_count_is_unknown_are_refused(tmp_path, hub_cache):
    """A slice of the first layers of a model whose layer count was not read (a hub name, a
    directory without config.json) was taken for the whole model: mergekit writes a model of
    those layers, tensormerge merged every layer. Now the count comes from the hub's config.json
    too (here the cache; the family's config states 2 layers), and where none can be read the
    slice is refused naming it."""
    base, fts = H.make_family(1, seed=3)
    H.make_hub_cache(hub_cache, "org/a", base)
    H.make_hub_cache(hub_cache, "org/b", fts[0])
    with pytest.raises(ParameterError, match=r"slices\[0\]\.sources\[0\]\.layer_range \[0, 1\] does not cover org/a"):
        translate(_slerp_slices("org/a", "org/b", 1))
    assert translate(_slerp_slices("org/a", "org/b", 2))["inputs"] == ["org/b"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for model in (str(bare), "org/not-cached"):
        with pytest.raises(ParameterError, match=r"slices\[0\]\.sources\[1\]\.layer_range \[0, 2\]: cannot tell how "
                           r"many layers") as e:
            translate(_slerp_slices("org/a", model, 2), "r.yaml")
        assert model in str(e.value) and "\n" not in str(e.value)


def test_a_model_spelled_two_ways_is_one_model(tmp_path, monkeypatch):
    """`a` and `./a/` name one directory: listed twice is refused as with equal spellings (it was
    merged as two models), and base_model spelled another way is the base, not a further input
    with a zero task vector (which would shift model_stock's angles)."""
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = _gta("ties")
    cfg["models"][2]["model"] = "./a/"
    with pytest.raises(ParameterError, match=r"models\[2\]\.model '\./a/' is listed twice \(as 'a'\)"):
        translate(cfg)
    stock = {"merge_method": "model_stock", "base_model": "base",
             "models": [{"model": "./base"}, {"model": "a"}, {"model": "b"}]}
    assert translate(stock) == {"method": "model_stock", "params": {}, "inputs": ["a", "b"], "base": "base"}
