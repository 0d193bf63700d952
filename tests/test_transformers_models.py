"""End to end on real `transformers` architectures: tiny T5 and Llama, sharded checkpoints.

A randomly initialised base and three fine-tunes (base + seeded noise) are saved with
`save_pretrained(max_shard_size="50KB")`, so every input is sharded with an index and tied
duplicates (T5's `encoder/decoder.embed_tokens.weight`, `lm_head.weight`; tied Llama's
`lm_head.weight`) are absent from the files. Each method is run through `tensormerge.api.merge`
under a small `max_memory` (so tensors are row-chunked), the output is loaded with
`from_pretrained`, and its logits are compared with those of the same merge computed here, in
memory, in float64, from the formulas written out in this file.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration  # noqa: E402

from tensormerge.api import MergeSpec, merge  # noqa: E402
from tensormerge.kernels.reference import dare_keep  # noqa: E402

N_FT = 3
NOISE = 0.02
MAX_MEMORY = "16KiB"  # well under one whole tensor's chunk cost: every large tensor is row-chunked
INDEX = "model.safetensors.index.json"
TA_LAMBDA = 0.3
TIES_K = 0.2
DARE_P = 0.5
DARE_SEED = 0


def _t5(tie: bool = True) -> torch.nn.Module:
    # transformers 5 always ties T5's embeddings (lm_head included); `tie` is unused for T5
    cfg = T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8)
    return T5ForConditionalGeneration(cfg)


def _llama(tie: bool) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


ARCHS = {
    "t5-tied": (T5ForConditionalGeneration, lambda: _t5()),
    "llama-tied": (LlamaForCausalLM, lambda: _llama(True)),
    "llama-untied": (LlamaForCausalLM, lambda: _llama(False)),
}


def _logits(model: torch.nn.Module, arch: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, 64, (2, 9), generator=g)
    model.eval()
    with torch.no_grad():
        if arch.startswith("t5"):
            dec = torch.randint(0, 64, (2, 5), generator=g)
            return model(input_ids=input_ids, decoder_input_ids=dec).logits
        return model(input_ids=input_ids).logits


def _tie_groups(sd: dict[str, torch.Tensor], stored: set[str]) -> dict[str, list[str]]:
    """canonical name -> every state-dict name sharing its storage; canonical = the one saved."""
    by_storage: dict[tuple, list[str]] = {}
    for name, t in sd.items():
        by_storage.setdefault((t.data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype), []).append(name)
    groups = {}
    for names in by_storage.values():
        canon = [n for n in names if n in stored]
        assert len(canon) == 1, f"exactly one of the tied names {names} should be saved, got {canon}"
        groups[canon[0]] = names
    return groups


def _save_sharded(model: torch.nn.Module, path: str) -> set[str]:
    model.save_pretrained(path, max_shard_size="50KB")
    index = os.path.join(path, INDEX)
    assert os.path.isfile(index), f"{path} was not saved sharded: {sorted(os.listdir(path))}"
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 1, "expected several shards"
    return set(weight_map)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(ARCHS))
def family(request, tmp_path_factory):
    arch = request.param
    cls, make = ARCHS[arch]
    root = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    base_model = make().eval()
    base_dir = str(root / "base")
    stored = _save_sharded(base_model, base_dir)
    base_sd = base_model.state_dict()
    groups = _tie_groups(base_sd, stored)

    g = torch.Generator().manual_seed(42)
    ft_dirs, ft_sds = [], []
    for i in range(N_FT):
        sd = {}
        for canon, names in groups.items():
            t = base_sd[canon]
            if t.is_floating_point():
                t = t + NOISE * torch.randn(t.shape, generator=g, dtype=t.dtype)
            for n in names:  # tied names get the very same tensor, so loading is order-independent
                sd[n] = t.clone()
        ft = make()
        ft.load_state_dict(sd, strict=True)
        d = str(root / f"ft{i}")
        assert _save_sharded(ft, d) == stored
        ft_dirs.append(d)
        ft_sds.append({k: v.detach().clone() for k, v in ft.state_dict().items()})
    return {
        "arch": arch, "cls": cls, "make": make, "root": root, "base_dir": base_dir, "ft_dirs": ft_dirs,
        "base_sd": {k: v.detach().clone() for k, v in base_sd.items()}, "ft_sds": ft_sds,
        "groups": groups, "stored": stored, "base_logits": _logits(base_model, arch),
    }


# ------------------------------------------------------------------ in-memory reference merges
def _reference(method: str, fam: dict) -> dict[str, torch.Tensor]:
    """The merged state dict (every name, tied ones included), computed in float64."""
    base_sd, ft_sds, groups = fam["base_sd"], fam["ft_sds"], fam["groups"]
    floats = [c for c in groups if base_sd[c].is_floating_point()]
    b64 = {c: base_sd[c].double() for c in floats}
    taus = [{c: sd[c].double() - b64[c] for c in floats} for sd in ft_sds]
    merged: dict[str, torch.Tensor] = {}

    if method == "average":
        for c in floats:
            merged[c] = sum(sd[c].double() for sd in ft_sds) / len(ft_sds)
    elif method == "task_arithmetic":
        for c in floats:
            merged[c] = b64[c] + TA_LAMBDA * sum(t[c] for t in taus)
    elif method == "dare":
        for c in floats:
            acc = b64[c].clone()
            for i, t in enumerate(taus):
                keep = dare_keep(DARE_SEED, i, c, 0, t[c].numel(), DARE_P).reshape(t[c].shape)
                acc += 1.0 * keep.double() * t[c] / (1.0 - DARE_P)
            merged[c] = acc
    elif method == "ties":
        # one flat vector per model over every floating-point parameter, tied ones once
        flat64 = torch.stack([torch.cat([t[c].reshape(-1) for c in floats]) for t in taus])
        flat32 = torch.stack([torch.cat([(sd[c].float() - base_sd[c].float()).reshape(-1) for c in floats])
                              for sd in ft_sds])
        d = flat32.shape[1]
        kth = d - math.floor(d * TIES_K)
        keep = torch.zeros_like(flat32, dtype=torch.bool)
        for i in range(len(ft_sds)):
            v = flat32[i].abs().kthvalue(kth).values  # float32 threshold
            keep[i] = flat32[i].abs() >= v
        trimmed = flat64 * keep
        sign = torch.sign(trimmed.sum(0))
        majority = torch.sign(sign.sum())
        sign = torch.where(sign == 0, majority, sign)
        selected = trimmed * (torch.sign(trimmed) == sign)
        count = (selected != 0).sum(0).clamp_min(1)
        tau_star = selected.sum(0) / count
        base_flat = torch.cat([b64[c].reshape(-1) for c in floats])
        out = base_flat + 1.0 * tau_star
        pos = 0
        for c in floats:
            n = b64[c].numel()
            merged[c] = out[pos:pos + n].reshape(b64[c].shape)
            pos += n
    else:
        raise AssertionError(method)

    full = {}
    for c, names in groups.items():
        value = merged[c].float() if c in merged else base_sd[c].clone()
        for n in names:
            full[n] = value
    return full


SPECS = {
    "average": lambda fam: dict(base=None, params={}),
    "task_arithmetic": lambda fam: dict(base=fam["base_dir"], params={"lambda": TA_LAMBDA}),
    "ties": lambda fam: dict(base=fam["base_dir"], params={}),
    "dare": lambda fam: dict(base=fam["base_dir"], params={"p": DARE_P, "seed": DARE_SEED}),
}


@pytest.mark.parametrize("method", list(SPECS))
def test_merged_model_loads_and_matches_in_memory_merge(family, method):
    fam = family
    out = str(fam["root"] / f"merged-{method}")
    report = merge(MergeSpec(method=method, inputs=fam["ft_dirs"], output=out, max_memory=MAX_MEMORY,
                             shard_size="50KB", quiet=True, **SPECS[method](fam)))
    # the small budget really split tensors into row chunks
    assert any(b["chunks"] > 1 for b in report["blocks"]), report["blocks"]

    # output: sharded like the inputs, same stored names (tied duplicates absent, as in the base)
    assert os.path.isfile(os.path.join(out, INDEX)), sorted(os.listdir(out))
    with open(os.path.join(out, INDEX)) as f:
        assert set(json.load(f)["weight_map"]) == fam["stored"]

    model, info = fam["cls"].from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info

    expected_sd = _reference(method, fam)
    ref_model = fam["make"]()
    ref_model.load_state_dict(expected_sd, strict=True)

    # weights first (a precise diagnosis), then what the model computes
    got_sd = model.state_dict()
    assert set(got_sd) == set(expected_sd)
    for name, want in expected_sd.items():
        torch.testing.assert_close(got_sd[name], want, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")

    got = _logits(model, fam["arch"])
    want = _logits(ref_model, fam["arch"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the merge did something: the logits moved away from the base's
    assert (got - fam["base_logits"]).abs().max() > 1e-3


# ------------------------------------------------------------------ config.json states the written dtype
@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny Llama base saved in float32 and in bfloat16, and two float32 fine-tunes."""
    root = tmp_path_factory.mktemp("llama-dtype")
    torch.manual_seed(0)
    base = _llama(False).eval()
    base.save_pretrained(root / "base32")
    base.to(torch.bfloat16).save_pretrained(root / "base16")
    base.to(torch.float32)
    fts = []
    for i in range(2):
        ft = _llama(False)
        ft.load_state_dict({k: v + NOISE * torch.randn_like(v) for k, v in base.state_dict().items()})
        ft.save_pretrained(root / f"ft{i}")
        fts.append(str(root / f"ft{i}"))
    return root, fts


@pytest.mark.parametrize("dtype,base,want", [("auto", "base32", torch.float32), ("float32", "base16", torch.float32),
                                             ("bfloat16", "base32", torch.bfloat16),
                                             ("float16", "base32", torch.float16),
                                             ("auto", "base16", torch.bfloat16)])
def test_from_pretrained_auto_loads_the_written_dtype(llama_pair, dtype, base, want):
    """`from_pretrained(dtype="auto")` takes its dtype from config.json: the merge must state
    the dtype it wrote, whatever --dtype, so the weights load as written, not cast."""
    root, fts = llama_pair
    out = root / f"merged-{dtype}-{base}"
    merge(MergeSpec(method="task_arithmetic", inputs=fts, base=str(root / base), output=str(out), dtype=dtype,
                    quiet=True))
    model = LlamaForCausalLM.from_pretrained(str(out), dtype="auto")
    assert {p.dtype for p in model.parameters()} == {want}
    with open(out / "config.json") as f:
        cfg = json.load(f)
    name = str(want).replace("torch.", "")
    assert cfg["torch_dtype"] == name
    assert cfg["dtype"] == name  # transformers 5 writes (and prefers) `dtype`
    from safetensors.torch import load_file

    written = load_file(str(out / "model.safetensors"))
    got = model.state_dict()
    for name_, t in written.items():
        assert t.dtype == want and torch.equal(got[name_], t), name_
