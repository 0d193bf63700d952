"""`stats compute` against brute force: every kind on tiny Llama (tied and untied) and T5 built
from configs, with left and right padding, any batch size and Gram row blocks, vmap and the
one-example-per-backward fallback."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from tensormerge.stats_compute.collect import ComputeOptions, compute_stats  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _stored(path: str) -> set[str]:
    from tensormerge.engine.sources import open_checkpoint

    ck = open_checkpoint(path)
    try:
        return {n for n in ck.tensors if n not in ck.aliases}
    finally:
        ck.close()


ARCHS = {
    "llama": (lambda: cm.llama(tie=False), "causal", cm.causal_records),
    "llama-tied": (lambda: cm.llama(tie=True), "causal", cm.causal_records),
    "t5": (cm.t5, "seq2seq", cm.seq2seq_records),
}
N = 7


@pytest.fixture(scope="module", params=list(ARCHS))
def setup(request, tmp_path_factory):
    make, task, records = ARCHS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model = make()
    path = cm.save(model, root / "model")
    recs = records(N, seed=3)
    data = cm.write_jsonl(root / "data.jsonl", recs)
    stored = _stored(path)
    ref = cm.brute_force(make(), recs, task, stored)
    return {"arch": request.param, "root": root, "model": path, "data": data, "ref": ref, "stored": stored}


def _compute(s, name: str, **kw) -> dict:
    out = str(s["root"] / f"{name}.zarr")
    opts = dict(model=s["model"], data=s["data"], kind="all", output=out, quiet=True, overwrite=True)
    opts.update(kw)
    summary = compute_stats(ComputeOptions(**opts))
    got = cm.read_store(out)
    got["summary"] = summary
    return got


def _assert_matches(got: dict, ref: dict, kinds=("fisher", "gram_in", "gram_out", "fisher_block"), rtol=2e-4):
    for kind in kinds:
        want = ref[kind]
        keys = set(got.get(kind, {}))
        if kind == "gram_out":  # the output layer is skipped (vocabulary-sized), as the research code does
            want = {k: v for k, v in want.items() if not k.startswith("lm_head")}
        assert keys == set(want), f"{kind}: {sorted(keys ^ set(want))}"
        for k, w in want.items():
            scale = w.abs().max().item() or 1.0
            torch.testing.assert_close(got[kind][k], w, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{kind}/{k}: {m}")


@pytest.mark.parametrize("side", ["left", "right"])
def test_every_kind_equals_brute_force(setup, side):
    got = _compute(setup, f"all-{side}", batch_size=3, padding_side=side)
    _assert_matches(got, setup["ref"])
    # counts: examples for Fishers, rows (non-pad tokens of the feeding side) for Grams
    assert set(got["counts"]["fisher"].values()) == {N}
    for kind in ("gram_in", "gram_out"):
        for k, c in got["counts"][kind].items():
            assert c == setup["ref"]["rows"][k], (kind, k)
    assert got["attrs"]["n_examples"] == N and got["attrs"]["fisher_type"] == "empirical"
    assert got["summary"]["grad_mode"] == "vmap"  # the batched path, not the fallback
    if setup["arch"] == "llama-tied":  # a tied-away lm_head has no key, and no Gram under the embedding's name
        assert "lm_head.weight" not in got["gram_in"] and "model.embed_tokens.weight" not in got["gram_in"]
        assert "model.embed_tokens.weight" in got["fisher"]
    if setup["arch"] == "t5":  # encoder tokens for cross-attention k/v, decoder tokens for q
        c = got["counts"]["gram_in"]
        enc = c["encoder.block.0.layer.0.SelfAttention.q.weight"]
        assert c["decoder.block.0.layer.1.EncDecAttention.k.weight"] == enc
        assert c["decoder.block.0.layer.1.EncDecAttention.q.weight"] != enc


def test_batch_size_and_row_blocks_do_not_change_the_result(setup):
    if setup["arch"] == "llama-tied":
        pytest.skip("same code path as untied Llama")
    one = _compute(setup, "b1", batch_size=1, accumulate="float64")
    for name, kw in {"b4": dict(batch_size=4), "all-in-one-with-row-blocks": dict(batch_size=N, gram_block_rows=3)}.items():
        got = _compute(setup, name, accumulate="float64", **kw)
        for kind in ("fisher", "gram_in", "gram_out", "fisher_block"):
            for k, v in one[kind].items():
                torch.testing.assert_close(got[kind][k], v, rtol=1e-5, atol=1e-6 * (v.abs().max().item() or 1),
                                           msg=lambda m: f"{name} {kind}/{k}: {m}")


def test_loop_fallback_equals_vmap(setup):
    if setup["arch"] == "llama-tied":
        pytest.skip("one architecture per family is enough")
    got = _compute(setup, "loop", kind="fisher", grad_mode="loop", batch_size=4, padding_side="left")
    _assert_matches(got, setup["ref"], kinds=("fisher",))


def test_squared_batch_fisher_is_the_square_of_the_batch_gradient(setup):
    if setup["arch"] != "llama":
        pytest.skip("one architecture is enough")
    got = _compute(setup, "sq", kind="fisher", fisher_mode="squared-batch", batch_size=N)
    model = cm.llama(tie=False)
    losses = [cm._loss(model, r, "causal") for r in cm.causal_records(N, seed=3)]
    model.zero_grad()
    (-sum(losses) / N).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["fisher"][n], p.grad.double() ** 2, rtol=1e-4, atol=1e-9)
    assert set(got["counts"]["fisher"].values()) == {1}
