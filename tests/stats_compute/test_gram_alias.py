"""One input Gram per distinct input (issue 17, item 1): q/k/v, gate/up (wi_0/wi_1) and every
decoder layer's cross-attention k/v read the same tensor, so `stats compute` stores their
input Gram once, with an alias per other weight (store format 3).

What must hold: the sharing found is exactly the architecture's (written out by hand here,
not taken from the code); an alias-deduplicated store merges to the same bytes as a store with
a Gram per weight (regmean and mats kfac, tiny T5 and Llama); format-2 stores still open and
merge; a corrupted alias is a one-line error naming the store and the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tensormerge.errors import InputError  # noqa: E402
from tensormerge.stats_compute.collect import ComputeOptions, compute_stats  # noqa: E402
from tensormerge.stats.store import StatsStore  # noqa: E402
from tests import helpers as H  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=cm.V, d_model=16, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=8,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg)


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=cm.V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return LlamaForCausalLM(cfg)


def _t5_sharing() -> dict[str, str]:
    """By hand: each layer's q/k/v read its normed input, wi_0/wi_1 likewise, and every decoder
    layer's cross-attention k/v read the encoder's output: all of them share layer 0's k."""
    out = {}
    for stack in ("encoder", "decoder"):
        for i in range(2):
            att = f"{stack}.block.{i}.layer.0.SelfAttention"
            out[f"{att}.k.weight"] = out[f"{att}.v.weight"] = f"{att}.q.weight"
            ff = f"{stack}.block.{i}.layer.{2 if stack == 'decoder' else 1}.DenseReluDense"
            out[f"{ff}.wi_1.weight"] = f"{ff}.wi_0.weight"
    cross0 = "decoder.block.0.layer.1.EncDecAttention.k.weight"
    for i in range(2):
        for p in ("k", "v"):
            out[f"decoder.block.{i}.layer.1.EncDecAttention.{p}.weight"] = cross0
    del out[cross0]
    return out


def _llama_sharing() -> dict[str, str]:
    out = {}
    for i in range(2):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out[f"{a}.k_proj.weight"] = out[f"{a}.v_proj.weight"] = f"{a}.q_proj.weight"
        out[f"{m}.up_proj.weight"] = f"{m}.gate_proj.weight"
    return out


ARCHS = {"t5": (_t5, cm.seq2seq_records, _t5_sharing), "llama": (_llama, cm.causal_records, _llama_sharing)}


@pytest.fixture(scope="module", params=list(ARCHS))
def family(request, tmp_path_factory):
    """A base and three fine-tunes; a kfac store of each with shared Grams and with a Gram per weight."""
    make, records, sharing = ARCHS[request.param]
    root = tmp_path_factory.mktemp(f"alias-{request.param}")
    g = torch.Generator().manual_seed(5)
    dirs, shared, per_weight = [], [], []
    for i in range(3):
        ft = make(0)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        d = cm.save(ft, root / f"ft{i}")
        data = cm.write_jsonl(root / f"d{i}.jsonl", records(6, seed=20 + i))
        for flag, out in ((False, shared), (True, per_weight)):
            path = str(root / f"s{i}{'-pw' if flag else ''}.zarr")
            compute_stats(ComputeOptions(model=d, data=data, kind="kfac", output=path, batch_size=4, quiet=True,
                                         gram_per_weight=flag))
            out.append(path)
        dirs.append(d)
    return {"arch": request.param, "root": root, "inputs": dirs, "shared": shared, "per_weight": per_weight,
            "sharing": sharing()}


def _merge(fam, stores, name, method, *params) -> Path:
    out = fam["root"] / name
    res = H.run_cli(["run", "--quiet", "--method", method, "--inputs", ",".join(fam["inputs"]),
                     "--stats", ",".join(stores), "--output", str(out), *params])
    assert res.returncode == 0, res
    return out


def test_stats_compute_finds_exactly_the_architectures_shared_inputs(family):
    s, pw = StatsStore(family["shared"][0]), StatsStore(family["per_weight"][0])
    assert s.format == 3 and s.aliases == {"gram_in": family["sharing"]}
    assert pw.aliases == {}
    for name in family["sharing"].values():  # a shared Gram is stored under its first reader's name
        assert s.arrays["gram_in"][name].target is None
    # every alias reads the same bytes the per-weight store computed for that weight on its own
    assert set(s.arrays["gram_in"]) == set(pw.arrays["gram_in"])
    for name in pw.arrays["gram_in"]:
        assert torch.equal(s.read("gram_in", name), pw.read("gram_in", name)), name
        assert s.arrays["gram_in"][name].attrs["count"] == pw.arrays["gram_in"][name].attrs["count"]
    # gram_out is never shared; the shared store holds fewer gram_in arrays on disk
    assert set(s.arrays["gram_out"]) == set(pw.arrays["gram_out"])
    stored = lambda root: sorted(p.name for p in (Path(root) / "gram_in").iterdir())  # noqa: E731
    assert len(stored(family["shared"][0])) == len(stored(family["per_weight"][0])) - len(family["sharing"])


@pytest.mark.parametrize("method,params", [("regmean", ()), ("mats", ("-p", "objective=kfac", "-p", "init=average",
                                                                      "-p", "iterations=30"))])
def test_shared_grams_merge_to_the_same_bytes_as_a_gram_per_weight(family, method, params):
    a = _merge(family, family["shared"], f"{method}-shared", method, *params)
    b = _merge(family, family["per_weight"], f"{method}-pw", method, *params)
    assert H.shard_digests(a) == H.shard_digests(b)
    manifest = json.loads((a / "tensormerge.json").read_text())
    # the aliased blocks really used their (shared) Grams: none of them fell back to the average
    assert not set(manifest["fallback_blocks"]) & set(family["sharing"])


def _edit_root(store: str, edit) -> None:
    """Apply `edit(root_attributes)` to the root's zarr.json and its consolidated copy."""
    p = Path(store) / "zarr.json"
    meta = json.loads(p.read_text())
    edit(meta["attributes"])
    cons = (meta.get("consolidated_metadata") or {}).get("metadata", {})
    if "." in cons:  # zarr keeps the root's own attributes beside the consolidated arrays only sometimes
        edit(cons["."]["attributes"])
    p.write_text(json.dumps(meta))


def test_a_format_2_store_still_opens_and_merges(family, tmp_path):
    stores = []
    for i, src in enumerate(family["per_weight"]):  # a Gram per weight is exactly what version 2 wrote
        dst = str(tmp_path / f"v2-{i}.zarr")
        shutil.copytree(src, dst)
        _edit_root(dst, lambda a: a.update({"tensormerge_stats": 2}))
        stores.append(dst)
    assert StatsStore(stores[0]).format == 2
    old = _merge(family, stores, "regmean-v2", "regmean")
    new = _merge(family, family["shared"], "regmean-v3", "regmean")
    assert H.shard_digests(old) == H.shard_digests(new)
    # aliases in a version-2 store are refused: version 2 had none
    bad = str(tmp_path / "v2-aliased.zarr")
    shutil.copytree(family["shared"][0], bad)
    _edit_root(bad, lambda a: a.update({"tensormerge_stats": 2}))
    H.assert_clean_error(H.run_cli(["inspect", bad]), bad, "'aliases'", "version-2")


def _corrupt(fam, tmp_path, how: str) -> tuple[str, str]:
    """A copy of store 1 with one alias damaged; returns (path, the key the error must name)."""
    path = str(tmp_path / f"bad-{how}.zarr")
    shutil.copytree(fam["shared"][1], path)
    alias, target = sorted(fam["sharing"].items())[0]
    other = sorted(fam["sharing"].items())[-1][0]
    # a key of another shape: the largest stored Gram (the MLP's down projection reads d_ff)
    s = StatsStore(path)
    grams = s.arrays["gram_in"]
    wide = max((n for n, i in grams.items() if i.target is None), key=lambda n: grams[n].shape)

    def edit(attrs):
        group = attrs["aliases"]["gram_in"]
        if how == "missing":
            group[alias]["target"] = "no.such.weight"
        elif how == "shape":
            group[alias]["target"] = wide
        elif how == "model-shape":  # consistent in the store, wrong for the model's weight
            group[alias] = {"target": wide, "shape": list(s.arrays["gram_in"][wide].shape)}
        elif how == "cycle":
            group[alias]["target"] = other
            group[other]["target"] = alias
        elif how == "both":
            group[target] = {"target": alias, "shape": group[alias]["shape"]}
        elif how == "malformed":
            group[alias] = "q"

    _edit_root(path, edit)
    return path, (target if how == "both" else alias)


@pytest.mark.parametrize("how", ["missing", "shape", "cycle", "both", "malformed", "model-shape"])
def test_a_corrupted_alias_is_a_one_line_error_naming_store_and_key(family, tmp_path, how):
    path, key = _corrupt(family, tmp_path, how)
    if how != "model-shape":  # refused at open, before any model is looked at
        with pytest.raises(InputError, match="gram_in/"):
            StatsStore(path)
        H.assert_clean_error(H.run_cli(["inspect", path]), path, f"gram_in/{key}")
    stores = list(family["shared"])
    stores[1] = path
    out = tmp_path / "out"
    res = H.run_cli(["run", "--method", "regmean", "--inputs", ",".join(family["inputs"]), "--stats",
                     ",".join(stores), "--output", str(out)])
    H.assert_clean_error(res, path, f"gram_in/{key}", out_dir=out)


def test_inspect_lists_aliases_with_their_targets(family):
    res = H.run_cli(["inspect", family["shared"][0]])
    assert res.returncode == 0, res
    alias, target = sorted(family["sharing"].items())[0]
    line = next(ln for ln in res.stdout.splitlines() if ln.strip().startswith(alias + " "))
    assert line.rstrip().endswith(f"-> {target}")
    js = json.loads(H.run_cli(["inspect", "--json", family["shared"][0]]).stdout)
    assert js["arrays"]["gram_in"][alias]["alias_of"] == target


# ----------------------------------------------------------------------------- detection itself
class _Net(torch.nn.Module):
    """a, b, c read one input (b the same object, c a view of it with the same geometry); d
    reads it after an in-place change; `share = False` gives b a copy instead."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.d = (torch.nn.Linear(4, 3) for _ in range(4))
        self.share = True

    def forward(self, x):
        h = x * 1.0
        out = self.a(h) + self.b(h if self.share else h.clone()) + self.c(h.view(h.shape))
        h.mul_(2.0)
        return out + self.d(h)


def _hooks(net):
    from types import SimpleNamespace

    from tensormerge.stats_compute.hooks import GramHooks

    loaded = SimpleNamespace(model=net, task="causal", adapter=None, own_key=lambda n: n)
    return GramHooks(loaded, True, False, torch.float32, block_bytes=1 << 20)


def test_sharing_is_seen_by_identity_and_storage_never_across_an_in_place_change():
    net = _Net()
    hooks = _hooks(net)
    x = torch.randn(5, 4)
    assert hooks.probe(lambda: net(x)) == {"b.weight": "a.weight", "c.weight": "a.weight"}
    hooks.attach({})
    with torch.no_grad():
        net(x)
    hooks.check_sharing()
    hooks.detach()
    assert sorted(k for _, k in hooks.sums) == ["a.weight", "d.weight"]  # one Gram per distinct input
    x64 = x.double()
    torch.testing.assert_close(hooks.sums[("gram_in", "a.weight")].double(), x64.T @ x64)
    torch.testing.assert_close(hooks.sums[("gram_in", "d.weight")].double(), 4 * x64.T @ x64)
    # a later forward where b no longer reads a's input: refused, never a silently wrong Gram
    net.share = False
    hooks.attach({})
    with torch.no_grad():
        net(x)
    with pytest.raises(InputError, match="b.weight read the same input as a.weight"):
        hooks.check_sharing()
    hooks.detach()


def test_a_budget_that_fits_only_shared_grams(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tensormerge.errors import BudgetError

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=cm.V, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    d = cm.save(LlamaForCausalLM(cfg), tmp_path / "m")
    data = cm.write_jsonl(tmp_path / "d.jsonl", cm.causal_records(2, seed=1))
    # input Grams, float32: q/k/v/o/gate/up/lm_head 256^2 and down 512^2: 2.75 MiB one per weight,
    # 2.0 MiB when q/k/v and gate/up share
    budget = int(2.5 * 2**20)
    opts = dict(model=d, data=data, kind="gram", quiet=True, max_memory=budget)
    compute_stats(ComputeOptions(output=str(tmp_path / "s.zarr"), **opts))
    with pytest.raises(BudgetError, match="2.8 MiB"):
        compute_stats(ComputeOptions(output=str(tmp_path / "pw.zarr"), gram_per_weight=True, **opts))


def test_appending_a_kind_keeps_the_aliases_and_replacing_gram_in_drops_them(tmp_path):
    from tensormerge.stats.store import StatsWriter

    g = torch.eye(3)
    w = StatsWriter(str(tmp_path / "s.zarr"))
    w.add("gram_in", "q.weight", g, count=1)
    w.alias("gram_in", "k.weight", "q.weight")
    with pytest.raises(ValueError, match="not a stored array"):
        w.alias("gram_in", "v.weight", "k.weight")  # an alias of an alias is never written
    path = w.close()
    w = StatsWriter(path, append=True)
    w.add("fisher", "q.weight", torch.ones(3, 3), count=1)
    w.close()
    s = StatsStore(path)
    assert s.aliases == {"gram_in": {"k.weight": "q.weight"}} and torch.equal(s.read("gram_in", "k.weight"), g)
    w = StatsWriter(path, append=True, overwrite=True)
    w.add("gram_in", "k.weight", 2 * g, count=1)
    w.close()
    s = StatsStore(path)
    assert s.aliases == {} and set(s.arrays["gram_in"]) == {"k.weight"}
