"""Statistics methods end to end on real `transformers` architectures (tiny T5 and Llama):
Grams captured by forward hooks on every nn.Linear and Fishers from a backward pass, keyed by
parameter name as the research code keys them, merged through the engine, loaded with
`from_pretrained`, and compared with the same merge computed here in float64."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tensormerge.api import MergeSpec, merge  # noqa: E402
from tests.helpers import write_store  # noqa: E402
from tests.test_transformers_models import _logits, family  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _statistics(fam: dict, sd: dict, seed: int) -> dict:
    """Input Grams of every linear layer whose weight is stored (tied-away lm_heads have none in
    the file, so none here) and a squared-gradient Fisher, from random token batches."""
    model = fam["make"]()
    model.load_state_dict(sd, strict=True)
    model.eval()
    stored = fam["stored"]
    grams, hooks = {}, []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{mod_name}.weight" in stored:
            def hook(m, args, out, key=f"{mod_name}.weight"):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                grams[key] = grams.get(key, 0) + x.T @ x / x.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (16, 12), generator=g)
    if fam["arch"].startswith("t5"):
        labels = torch.randint(0, 64, (16, 10), generator=g)
        logits = model(input_ids=ids, decoder_input_ids=labels).logits
    else:
        labels = ids
        logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
    for h in hooks:
        h.remove()
    fisher = {n: (p.grad.detach() ** 2).float() for n, p in model.named_parameters()
              if n in stored and p.grad is not None}
    return {"gram_in": {k: v.float() for k, v in grams.items()}, "fisher": fisher}


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_statistics_merge_loads_and_matches_in_memory_merge(family, method, tmp_path):
    fam = family
    stats = [_statistics(fam, sd, 7 + i) for i, sd in enumerate(fam["ft_sds"])]
    stores = [write_store(tmp_path / f"s{i}.zarr", s) for i, s in enumerate(stats)]
    out = str(tmp_path / "merged")
    params = {"precision": "float64"} if method == "regmean" else {}
    report = merge(MergeSpec(method, fam["ft_dirs"], out, stats=stores, max_memory="1MiB", shard_size="50KB",
                             params=params, quiet=True))
    model, info = fam["cls"].from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info

    kind = "fisher" if method == "fisher" else "gram_in"
    assert sum(1 for b in report["blocks"] if b.get("statistics")) == len(stats[0][kind])
    expected = {}
    for canon, names in fam["groups"].items():
        thetas = [sd[canon].double() for sd in fam["ft_sds"]]
        if not thetas[0].is_floating_point():
            value = fam["base_sd"][canon]
        elif method == "fisher" and canon in stats[0]["fisher"]:
            fs = [s["fisher"][canon].double().clamp(min=1e-8) for s in stats]
            value = sum(f * t for f, t in zip(fs, thetas)) / sum(fs)
        elif method == "regmean" and canon in stats[0]["gram_in"]:
            gs = [s["gram_in"][canon].double() for s in stats]
            value = torch.linalg.solve(sum(gs), sum(g @ t.T for g, t in zip(gs, thetas))).T
        else:
            value = sum(thetas) / len(thetas)
        for n in names:
            expected[n] = value
    got = model.state_dict()
    for name, want in expected.items():
        torch.testing.assert_close(got[name].double(), want.to(torch.float64), rtol=2e-5, atol=2e-6,
                                   msg=lambda m: f"{name}: {m}")
    ref = fam["make"]()
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in expected.items()}, strict=True)
    torch.testing.assert_close(_logits(model, fam["arch"]), _logits(ref, fam["arch"]), atol=1e-4, rtol=1e-4)
