"""Per-tensor parameter values (methods.rules): filters and gradients, resolved by the plan per
block, recorded in the output, refused where a method needs one model-wide value."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest
import torch
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import helpers as H  # noqa: E402

from tensormerge.errors import ParameterError  # noqa: E402
from tensormerge.methods import get_method  # noqa: E402
from tensormerge.methods.rules import Gradient, layer_positions  # noqa: E402


def test_layer_positions_follow_mergekit():
    """Layer i of L sits at i / (L - 1); tensors outside layers at 0; a one-layer stack at 1."""
    names = [f"model.layers.{i}.mlp.w" for i in (0, 1, 2, 3)] + ["model.embed.w", "lm_head.w", "enc.block.0.w"]
    t = layer_positions(names)
    assert [t[f"model.layers.{i}.mlp.w"] for i in range(4)] == [0.0, 1 / 3, 2 / 3, 1.0]
    assert t["model.embed.w"] == 0.0 and t["lm_head.w"] == 0.0
    assert t["enc.block.0.w"] == 1.0


def test_gradient_interpolation():
    g = Gradient((0.0, 0.5, 0.3, 0.7, 1.0))
    # t = 1/3 over 5 points: 4/3 -> between points 1 and 2, a third of the way
    assert g.at(1 / 3) == pytest.approx(0.5 * 2 / 3 + 0.3 / 3)
    assert g.at(0.0) == 0.0 and g.at(1.0) == 1.0
    assert Gradient((True, False)).at(0.99) is True  # discrete values step, never interpolate
    assert Gradient(("a", "b", "c")).at(0.5) == "b"


def test_parse_forms_and_errors():
    P = get_method("average").Params
    p = P.from_strings("average", {"weights": [{"gradient": [0, 1]}, [{"filter": "mlp", "value": 2}, {"value": 1}]]}, 2)
    assert p.varying() == ["weights"]
    assert p.at("average", 2, "x.3.mlp.w", 1.0).weights == [1.0, 2.0]
    assert p.at("average", 2, "x.attn.w", 0.5).weights == [0.5, 1.0]
    with pytest.raises(ParameterError, match="no rule matches tensor 'x.attn'"):
        P.from_strings("average", {"normalize": [{"filter": "mlp", "value": False}]}, 2).at("average", 2, "x.attn", 0)
    with pytest.raises(ParameterError, match="gradient"):
        P.from_strings("average", {"normalize": {"gradient": []}}, 2)
    with pytest.raises(ParameterError, match="only `filter` and `value`"):
        P.from_strings("average", {"normalize": [{"filter": "a", "value": True, "x": 1}]}, 2)
    # a glob matches the whole name; a plain filter is a substring
    g = P.from_strings("average", {"normalize": [{"filter": "*.bias", "value": False}, {"value": True}]}, 2)
    assert g.at("average", 2, "l.0.bias", 0).normalize is False
    assert g.at("average", 2, "l.0.bias_x", 0).normalize is True


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    return H.write_family(root, n=2)


def _recipe(tmp_path, name, **kw) -> pathlib.Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(kw))
    return path


def test_average_with_rules_and_gradients(family, tmp_path):
    """Weights by filter and by layer, each block checked against a float64 formula with the
    values worked out here by hand (the family's layers 0 and 1 are t = 0 and t = 1)."""
    base, fts, _, sds = family
    recipe = _recipe(tmp_path, "r.yaml", method="average", inputs=fts, params={
        "weights": [{"gradient": [1.0, 3.0]}, [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]],
        "normalize": [{"filter": "*.bias", "value": False}, {"value": True}]})
    out = tmp_path / "out"
    res = H.run_cli(["run", "--config", recipe, "-o", out, "-q"])
    assert res.returncode == 0, str(res)
    got = H.load_dir(out)
    t = {"embed.weight": 0, "layer.0.attn.weight": 0, "layer.0.attn.bias": 0, "layer.0.mlp.weight": 0,
         "layer.0.mlp.bias": 0, "layer.1.norm.weight": 1, "layer.1.proj.weight": 1}
    for name, pos in t.items():
        w = [1.0 + 2.0 * pos, 2.0 if "mlp" in name else 1.0]
        if not name.endswith(".bias"):
            w = [x / sum(w) for x in w]
        want = w[0] * H.f64(sds[0][name]) + w[1] * H.f64(sds[1][name])
        H.assert_close(got[name], want, sds[0][name].dtype, name)
    # recorded: the rules themselves, in the provenance, the card's recipe and the fingerprint
    prov = json.loads((out / "tensormerge.json").read_text())
    assert prov["params"]["weights"][0] == {"gradient": [1.0, 3.0]}
    assert prov["params"]["normalize"] == [{"filter": "*.bias", "value": False}, {"value": True}]
    card = (out / "README.md").read_text()
    assert "gradient" in card and "*.bias" in card


def test_rules_change_the_fingerprint(family, tmp_path):
    """Two recipes that differ only in a rule that matches nothing write the same tensors but
    are different recipes: their fingerprints (what --resume compares) differ."""
    base, fts, _, _ = family
    prints = []
    for i, pattern in enumerate(("nothing-a", "nothing-b")):
        recipe = _recipe(tmp_path, f"r{i}.yaml", method="average", inputs=fts,
                         params={"weights": [[{"filter": pattern, "value": 9.0}, {"value": 1.0}], 1.0]})
        res = H.run_cli(["run", "--config", recipe, "-o", tmp_path / f"o{i}", "-q"])
        assert res.returncode == 0, str(res)
        prints.append(json.loads((tmp_path / f"o{i}" / "tensormerge.json").read_text())["fingerprint"])
    assert H.shard_digests(tmp_path / "o0") == H.shard_digests(tmp_path / "o1")
    assert prints[0] != prints[1]


def test_no_matching_rule_is_refused_before_work(family, tmp_path):
    base, fts, _, _ = family
    recipe = _recipe(tmp_path, "r.yaml", method="average", inputs=fts,
                     params={"normalize": [{"filter": "mlp", "value": False}]})
    out = tmp_path / "out"
    H.assert_clean_error(H.run_cli(["run", "--config", recipe, "-o", out]), "normalize", "no rule matches",
                         out_dir=out)


def test_plan_shows_each_blocks_value(family, tmp_path):
    base, fts, _, _ = family
    recipe = _recipe(tmp_path, "r.yaml", method="task_arithmetic", inputs=fts, base=base,
                     params={"lambda": [{"filter": "mlp", "value": {"gradient": [0.1, 0.9]}}, {"value": 0.5}]})
    res = H.run_cli(["plan", "--config", recipe])
    assert res.returncode == 0, str(res)
    rows = {line.split()[0]: line for line in res.stdout.splitlines() if line.startswith(("layer.", "embed."))}
    assert rows["layer.0.mlp.weight"].endswith("lambda=0.1")
    assert rows["layer.0.attn.weight"].endswith("lambda=0.5")
    assert rows["embed.weight"].endswith("lambda=0.5")
    assert "lambda" in res.stdout.splitlines()[0]


def test_global_ties_refuses_a_per_tensor_k(family, tmp_path):
    base, fts, _, _ = family
    recipe = _recipe(tmp_path, "r.yaml", method="ties", inputs=fts, base=base,
                     params={"k": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]})
    out = tmp_path / "out"
    H.assert_clean_error(H.run_cli(["run", "--config", recipe, "-o", out]), "'k'", "scope=tensor", out_dir=out)


def test_tensor_ties_with_per_tensor_k_and_lambda(family, tmp_path):
    """scope=tensor with k and λ by filter: each tensor equals the run with its own k and λ."""
    base, fts, _, _ = family
    rules = _recipe(tmp_path, "r.yaml", method="ties", inputs=fts, base=base, params={
        "scope": "tensor", "k": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}],
        "lambda": [{"filter": "attn", "value": 0.7}, {"value": 1.0}]})
    res = H.run_cli(["run", "--config", rules, "-o", tmp_path / "rules", "-q"])
    assert res.returncode == 0, str(res)
    got = H.load_dir(tmp_path / "rules")
    plain = {}
    for k in (0.5, 0.2):
        for lam in (0.7, 1.0):
            out = tmp_path / f"k{k}l{lam}"
            res = H.run_cli(["run", "-m", "ties", "-i", ",".join(fts), "-b", base, "-p", "scope=tensor",
                             "-p", f"k={k}", "-p", f"lambda={lam}", "-o", out, "-q"])
            assert res.returncode == 0, str(res)
            plain[k, lam] = H.load_dir(out)
    for name, tensor in got.items():
        if not tensor.dtype.is_floating_point:
            continue
        want = plain[0.5 if "mlp" in name else 0.2, 0.7 if "attn" in name else 1.0][name]
        assert torch.equal(tensor, want), name


def test_slerp_with_per_tensor_t(family, tmp_path):
    """The gradient-SLERP form natively: every tensor equals the plain run with its own t (the
    base is the t = 0 endpoint, which the method needs once its parameters are validated)."""
    base, fts, _, _ = family
    recipe = _recipe(tmp_path, "r.yaml", method="slerp", inputs=[fts[0]], base=base,
                     params={"t": [{"filter": "mlp", "value": {"gradient": [0.2, 0.6]}}, {"value": 0.5}]})
    res = H.run_cli(["run", "--config", recipe, "-o", tmp_path / "rules", "-q"])
    assert res.returncode == 0, str(res)
    got = H.load_dir(tmp_path / "rules")
    plain = {}
    for t in (0.2, 0.5):
        res = H.run_cli(["run", "-m", "slerp", "-i", fts[0], "-b", base, "-p", f"t={t}", "-o", tmp_path / f"t{t}", "-q"])
        assert res.returncode == 0, str(res)
        plain[t] = H.load_dir(tmp_path / f"t{t}")
    for name in ("layer.0.mlp.weight", "layer.0.mlp.bias", "layer.0.attn.weight", "embed.weight"):
        assert torch.equal(got[name], plain[0.2 if "mlp" in name else 0.5][name]), name


def test_rules_do_not_nest():
    """A rule's value is a value or a gradient: nested rule lists (which could nest without
    bound through the Python API) are refused in one line."""
    P = get_method("average").Params
    with pytest.raises(ParameterError, match="not further rules"):
        P.from_strings("average", {"normalize": [{"value": [{"value": True}]}]}, 2)


def test_a_filter_matching_no_tensor_is_warned(family, tmp_path):
    """mergekit's popular SLERP recipe filters `self_attn` and `mlp`; on a model whose tensors say
    `attn` the self_attn rule is never used and the default applies, silently. Merged as mergekit
    does, with a warning naming the parameter and the filter (the one that matched is not named)."""
    base, fts, base_sd, sds = family
    recipe = _recipe(tmp_path, "r.yaml", method="slerp", base=base, inputs=[fts[0]],
                     params={"t": [{"filter": "self_attn", "value": {"gradient": [0, 1]}},
                                   {"filter": "mlp", "value": 0.3}, {"value": 0.5}]})
    res = H.run_cli(["run", "--config", recipe, "-o", tmp_path / "out", "-q"])
    assert res.returncode == 0, str(res)
    assert "warning: parameter 't': filter 'self_attn' matches no tensor" in res.stderr, res.stderr  # a recipe's, not -p
    assert "'mlp'" not in res.stderr
    from tensormerge.methods.rules import unmatched_filters

    assert unmatched_filters([0.5, [{"filter": "x*", "value": 1}, {"value": 2}]], ["a.x", "x.1"]) == []
    assert unmatched_filters([[{"filter": "q", "value": 1}], {"gradient": [0, 1]}], ["a.x"]) == ["q"]
