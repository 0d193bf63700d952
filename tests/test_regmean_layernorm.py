"""RegMean end to end through the command line, at its default precision, on a tiny GPT-2: its
attention and MLP input projections are fed by LayerNorm, whose outputs (weight 1, bias 0) sum to
zero over the features, so their Grams from `tensormerge stats compute` are singular to float32
rounding (λ_min / λ_max ≈ 1e-10). Every merged tensor is compared with a float64 computation written in
tests/methods/test_regmean_degenerate.py (the SPEC's deviation form, with its rounding bound).
"""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from tests.methods.test_regmean_degenerate import U32, reference, well_posed  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402
from tests.stats_compute.test_collect_cli import cli  # noqa: E402

N = 3


def _finetune(i: int, g: torch.Generator):
    """The tiny GPT-2 with its matrices (not the LayerNorms, not the embeddings) moved by 2e-3 (10%)."""
    ft = cm.gpt2(seed=0)
    if i >= 0:
        with torch.no_grad():
            for name, p in ft.named_parameters():
                if p.dim() == 2 and "wte" not in name and "wpe" not in name:
                    p.add_(2e-3 * torch.randn(p.shape, generator=g))
    return ft


def _stores(root, dirs):
    stores = []
    for i, d in enumerate(dirs):
        data = cm.write_jsonl(root / f"d{i}.jsonl", cm.causal_records(6, seed=10 + i))
        out = root / f"{d.name}.zarr"
        res = cli(["stats", "compute", "--model", d, "--data", data, "--kind", "gram", "--output", out, "--quiet"])
        assert res.returncode == 0, res
        stores.append(str(out))
    return stores


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean-ln")
    g = torch.Generator().manual_seed(1)
    diff = [root / f"ft{i}" for i in range(N)]
    for i, d in enumerate(diff):
        cm.save(_finetune(i, g), d)
    same = [root / f"same{i}" for i in range(N)]  # one fine-tune three times, each with its own data
    for d in same:
        shutil.copytree(diff[0], d)
    return root, {"different": (diff, _stores(root, diff)), "identical": (same, _stores(root, same))}


def _merge(root, dirs, stores, tag):
    out = root / f"merged-{tag}"
    res = cli(["run", "--method", "regmean", "--inputs", ",".join(map(str, dirs)), "--stats", ",".join(stores),
               "--output", out, "--quiet"])
    assert res.returncode == 0, res
    return load_file(str(out / "model.safetensors"))


def _load(d):
    return load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("case", ["identical", "different"])
def test_regmean_cli_default_precision_on_layernorm_fed_layers(family, case):
    root, cases = family
    dirs, stores = cases[case]
    got = _merge(root, dirs, stores, case)
    models = [_load(d) for d in dirs]
    grams = [cm.read_store(s)["gram_in"] for s in stores]
    assert set(got) == set(models[0])
    with_grams = set(grams[0])
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"} <= with_grams
    singular = set()
    for name, x in got.items():
        ins = [m[name] for m in models]
        assert x.dtype == ins[0].dtype == torch.float32
        if name not in with_grams:  # embeddings, biases, LayerNorms: the average
            want = sum(t.double() for t in ins) / N
            torch.testing.assert_close(x.double(), want, rtol=4 * U32, atol=0, msg=name)
            continue
        gs = [gi[name].float() for gi in grams]
        ws = [t.T for t in ins]  # GPT-2's Conv1D stores [in, out]: RegMean merges the transpose
        want, wbar, bound, facts = reference(ws, gs, [1.0] * N)
        assert well_posed(facts), (name, facts)
        if facts["keep"] < len(facts["lam"]):
            singular.add(name)
        if case == "identical":  # the input itself, to the bit, though every Gram differs
            assert torch.equal(x, ins[0]), name
        else:
            err = (x.T.double() - want).abs()
            allowed = bound.unsqueeze(1) + U32 * want.abs()
            assert bool((err <= allowed).all()), f"{name}: worst error/allowed {float((err / allowed).max()):.3g}"
    # the LayerNorm-fed layers' sums of Grams have a direction no data determines (W̄ is kept there)
    assert {"transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"} <= singular
