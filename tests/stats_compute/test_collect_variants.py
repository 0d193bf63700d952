"""`stats compute` on the other model families against brute force: GPT-2 (Conv1D weights kept
[in, out]), a sequence classifier (label field), PEFT LoRA and IA3 adapters (statistics of the
adapter, keyed as adapter_model.safetensors stores them); and the true Fisher's sampling."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from tensormerge.errors import InputError  # noqa: E402
from tensormerge.stats_compute.collect import ComputeOptions, compute_stats  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402
from tests.stats_compute.test_collect import _assert_matches, _stored  # noqa: E402

N = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, model, data, name, **kw) -> dict:
    out = str(tmp_path / f"{name}.zarr")
    opts = dict(model=model, data=data, kind="all", output=out, quiet=True, batch_size=3, padding_side="left")
    opts.update(kw)
    summary = compute_stats(ComputeOptions(**opts))
    got = cm.read_store(out)
    got["summary"] = summary
    return got


def _computed_and_brute_force(tmp_path, make, records: list, task: str, name: str) -> tuple[dict, dict]:
    """`stats compute --kind all` on a saved `make()` model, and the brute-force statistics."""
    model = cm.save(make(), tmp_path / name)
    got = _run(tmp_path, model, cm.write_jsonl(tmp_path / f"{name}.jsonl", records), name)
    return got, cm.brute_force(make(), records, task, _stored(model))


def test_gpt2_conv1d_grams_follow_the_in_out_layout(tmp_path):
    got, ref = _computed_and_brute_force(tmp_path, cm.gpt2, cm.causal_records(N, seed=1), "causal", "g")
    _assert_matches(got, ref)
    # c_attn: weight [16, 48] = [in, out] -> gram_in [16, 16], gram_out [48, 48]
    assert tuple(got["gram_in"]["transformer.h.0.attn.c_attn.weight"].shape) == (16, 16)
    assert tuple(got["gram_out"]["transformer.h.0.attn.c_attn.weight"].shape) == (48, 48)


def test_gpt2_conv1d_weights_merge_with_regmean_as_their_transpose(tmp_path):
    """RegMean of a Conv1D weight W [in, out] (y = x W) is W̄ + (Σ G_i)^+ Σ G_i (W_i − W̄): the engine merges
    the block as its transpose, with the [out, in] formula, and writes it back [in, out]."""
    from safetensors.torch import load_file

    from tensormerge.api import MergeSpec, merge

    models, stores = [], []
    for i in range(3):
        models.append(cm.save(cm.gpt2(seed=i), tmp_path / f"m{i}"))
        data = cm.write_jsonl(tmp_path / f"d{i}.jsonl", cm.causal_records(N, seed=10 + i))
        stores.append(str(tmp_path / f"s{i}.zarr"))
        compute_stats(ComputeOptions(model=models[-1], data=data, kind="gram", output=stores[-1], quiet=True,
                                     batch_size=3))
    out = tmp_path / "merged"
    report = merge(MergeSpec("regmean", models, str(out), stats=stores, params={"precision": "float64"},
                             quiet=True))
    got = load_file(str(out / "model.safetensors"))
    sds = [load_file(f"{m}/model.safetensors") for m in models]
    grams = [cm.read_store(s)["gram_in"] for s in stores]
    conv = [n for n in grams[0] if ".attn.c_attn." in n or ".mlp.c_fc." in n or ".c_proj." in n]
    assert conv and all(tuple(sds[0][n].shape) == tuple(grams[0][n].shape[:1]) + tuple(sds[0][n].shape[1:])
                        for n in conv)  # [in, out] weights, [in, in] Grams
    for n in conv:
        g = [x[n].double() for x in grams]
        # inputs after a LayerNorm sum to zero, so their Grams are singular: the deviation from the
        # average is solved for, dropping directions at float32 noise (the Grams are float32)
        noise = g[0].shape[0] ** 0.5 * 2.0**-24
        avg = sum(sd[n].double() for sd in sds) / 3
        dev = sum(gi @ (sd[n].double() - avg) for gi, sd in zip(g, sds))
        want = avg + torch.linalg.pinv(sum(g), hermitian=True, rtol=noise) @ dev
        torch.testing.assert_close(got[n].double(), want, rtol=1e-5, atol=1e-6, msg=n)
    transposed = [b for b in report["blocks"] if b["name"] in conv]
    assert len(transposed) == len(conv) and all(b["chunks"] == 1 for b in transposed)
    n = "transformer.h.0.ln_1.weight"  # no Gram: averaged
    torch.testing.assert_close(got[n].double(), sum(sd[n].double() for sd in sds) / 3)


def test_sequence_classifier(tmp_path):
    got, ref = _computed_and_brute_force(tmp_path, cm.llama_classifier, cm.class_records(N, seed=2),
                                         "classification", "c")
    _assert_matches(got, ref, kinds=("fisher", "gram_in", "fisher_block"))
    assert set(got["counts"]["fisher"].values()) == {N}


def _adapter(tmp_path, name, cfg, seed: int = 0):
    from peft import get_peft_model

    tmp_path.mkdir(parents=True, exist_ok=True)
    base = cm.save(cm.llama(), tmp_path / "base")
    model = cm.llama()
    torch.manual_seed(seed)  # the adapter's own (non-identity) initialisation
    peft_model = get_peft_model(model, cfg)
    d = tmp_path / name
    peft_model.save_pretrained(str(d))
    conf = json.loads((d / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = base
    (d / "adapter_config.json").write_text(json.dumps(conf))
    return str(d), peft_model


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_peft_adapter_statistics_are_of_the_adapter(tmp_path, kind):
    from peft import IA3Config, LoraConfig

    cfg = (LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_alpha=4, init_lora_weights=False)
           if kind == "lora" else
           IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                     init_ia3_weights=False))
    adapter, peft_model = _adapter(tmp_path, kind, cfg)
    recs = cm.causal_records(N, seed=4)
    data = cm.write_jsonl(tmp_path / "d.jsonl", recs)
    got = _run(tmp_path, adapter, data, kind)
    stored = _stored(adapter)
    # brute force on the PEFT model, keyed by its own names; the store drops the adapter name
    own = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    own |= {f"{m}.weight" for m, mod in peft_model.named_modules()
            if isinstance(mod, torch.nn.Linear) and f"{m}.weight".replace(".default", "") in stored}
    ref = cm.brute_force(peft_model, recs, "causal", own)
    ref = {k: ({n.replace(".default", ""): v for n, v in d.items()} if isinstance(d, dict) else d)
           for k, d in ref.items()}
    ref["fisher"] = {n: v for n, v in ref["fisher"].items() if n in stored}
    ref["fisher_block"] = {n: v for n, v in ref["fisher_block"].items() if n in stored}
    for k in ("fisher", "gram_in", "gram_out", "fisher_block"):
        assert set(got[k]) <= stored
    assert set(got["fisher"]) == stored
    if kind == "ia3":  # vectors stored [d, 1] / [1, d]: a block [d, d] each, and no Grams
        assert not got["gram_in"]
        for n, v in got["fisher_block"].items():
            want = ref["fisher"][n]
            torch.testing.assert_close(torch.diagonal(v), want.reshape(-1), rtol=2e-4, atol=1e-10)
        _assert_matches(got, ref, kinds=("fisher",))
    else:
        _assert_matches(got, ref, kinds=("fisher", "gram_in", "gram_out"))


def test_true_fisher_samples_per_example_independent_of_batching(tmp_path):
    model = cm.save(cm.llama(), tmp_path / "m")
    data = cm.write_jsonl(tmp_path / "d.jsonl", cm.causal_records(N, seed=6))
    a = _run(tmp_path, model, data, "t1", kind="fisher", fisher_type="true", batch_size=1, seed=3)
    b = _run(tmp_path, model, data, "t3", kind="fisher", fisher_type="true", batch_size=3, seed=3)
    e = _run(tmp_path, model, data, "emp", kind="fisher", batch_size=3)
    assert a["attrs"]["fisher_type"] == "true"
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(a["fisher"][name], b["fisher"][name], rtol=1e-4, atol=1e-12)
    assert not torch.allclose(a["fisher"][name], e["fisher"][name], rtol=1e-3)


@pytest.mark.parametrize("make,records,task", [(cm.t5, cm.seq2seq_records, "seq2seq"),
                                               (cm.llama_classifier, cm.class_records, "classification")])
def test_true_fisher_runs_for_seq2seq_and_classifiers(tmp_path, make, records, task):
    model = cm.save(make(), tmp_path / task)
    data = cm.write_jsonl(tmp_path / "d.jsonl", records(4, seed=7))
    got = _run(tmp_path, model, data, "t", kind="fisher", fisher_type="true", seed=1)
    assert got["attrs"]["fisher_type"] == "true" and got["fisher"]
    assert all(torch.isfinite(v).all() for v in got["fisher"].values())


def test_ia3_blocks_feed_mats_blockwise(tmp_path):
    """Fisher blocks of IA3 vectors ([d, 1] / [1, d] as PEFT stores them) through `tensormerge run`."""
    from peft import IA3Config

    from tensormerge.api import MergeSpec, merge

    cfg = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                    init_ia3_weights=False)
    adapters, stores = [], []
    for i in range(2):
        d, _ = _adapter(tmp_path / f"a{i}", "ia3", cfg, seed=100 + i)
        data = cm.write_jsonl(tmp_path / f"d{i}.jsonl", cm.causal_records(4, seed=20 + i))
        _run(tmp_path, d, data, f"s{i}", kind="blockwise")
        adapters.append(d)
        stores.append(str(tmp_path / f"s{i}.zarr"))
    report = merge(MergeSpec("mats", adapters, str(tmp_path / "merged"), stats=stores, quiet=True,
                             params={"objective": "blockwise", "init": "average"}))
    assert not report.get("fallback_blocks"), report.get("fallback_blocks")
