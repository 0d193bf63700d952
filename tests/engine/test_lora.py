"""PEFT adapters in, PEFT adapters out (engine/lora.py, SPEC §6).

Tiny Llama base, LoRA adapters made by PEFT (equal and unequal ranks, different alphas, rslora,
different target modules) and IA3 adapters. Each merge is loaded with
`PeftModel.from_pretrained` (or `from_pretrained` for `--lora full`) and its logits compared with
those of the same merge computed here in float64: ΔW_i = s_i B_i A_i read from the files and the
configs by this file's own code, merged by the method's formula, added to the base in memory.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests import helpers as H  # noqa: E402
from tests.methods.test_stats_methods import fisher_formula  # noqa: E402
from tests.methods.test_ties import reference_ties  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402
from tensormerge.api import MergeSpec, merge  # noqa: E402
from tensormerge.errors import TensorMergeError  # noqa: E402

PRE = "base_model.model."
MAX_MEMORY = "16KiB"


def _adapter(root: Path, name: str, cfg, seed: int) -> str:
    model = cm.llama()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, cfg)
    if isinstance(cfg, IA3Config):  # IA3 starts at ones: move it off, as training would
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "ia3_l" in n:
                    p.add_(0.3 * torch.randn_like(p))
    d = root / name
    peft_model.save_pretrained(str(d))
    conf = json.loads((d / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(root / "base")
    (d / "adapter_config.json").write_text(json.dumps(conf))
    return str(d)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    cm.save(cm.llama(), root / "base")
    lora = lambda **kw: LoraConfig(init_lora_weights=False, **kw)  # noqa: E731
    return {
        "root": root,
        "base": str(root / "base"),
        "equal": [_adapter(root, f"eq{i}", lora(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), 10 + i)
                  for i in range(2)],
        "unequal": [
            _adapter(root, "un0", lora(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), 20),
            _adapter(root, "un1", lora(r=4, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj"]), 21),
            _adapter(root, "un2", lora(r=3, lora_alpha=6, target_modules=["v_proj", "down_proj"]), 22),
        ],
        "ia3": [_adapter(root, f"ia{i}", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]), 30 + i) for i in range(2)],
    }


# ------------------------------------------------------------------ the reference, from the files
def deltas(adapter: str) -> dict[str, torch.Tensor]:
    """{base weight name: s·B·A} in float64, s = alpha/r (alpha/√r with rslora)."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    sd = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    out = {}
    for k, a in sd.items():
        if ".lora_A." not in k:
            continue
        module = k[len(PRE):].split(".lora_A.")[0]
        b = sd[k.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        alpha = cfg["lora_alpha"]
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[f"{module}.weight"] = s * b.double() @ a.double()
    return out


def base_sd(zoo) -> dict[str, torch.Tensor]:
    return load_file(str(Path(zoo["base"]) / "model.safetensors"))


def logits(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, cm.V, (2, 7), generator=g)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def base_model(zoo):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32)


def reference_logits(zoo, merged_delta: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base with the merged ΔW added in float64, as float32 weights."""
    model = base_model(zoo)
    sd = model.state_dict()
    for n, d in merged_delta.items():
        sd[n] = (sd[n].double() + d).float()
    before = logits(model)
    model.load_state_dict(sd)
    after = logits(model)
    assert float((after - before).abs().max()) > 1e-3  # the merge is visible in the logits
    return after


def peft_logits(zoo, out: str) -> torch.Tensor:
    return logits(PeftModel.from_pretrained(base_model(zoo), out))


def union(ds: list[dict]) -> list[str]:
    names = []
    for d in ds:
        names += [n for n in d if n not in names]
    return names


def with_zeros(ds: list[dict], shapes: dict) -> list[dict]:
    """Each adapter's ΔW for every module any adapter targets (zero where it targets none)."""
    names = union(ds)
    return [{n: d.get(n, torch.zeros(shapes[n], dtype=torch.float64)) for n in names} for d in ds]


def run(zoo, tag, method, inputs, **kw):
    out = str(zoo["root"] / f"out-{tag}")
    report = merge(MergeSpec(method, inputs, out, quiet=True, max_memory=kw.pop("max_memory", MAX_MEMORY), **kw))
    return out, report


def assert_logits(got, want, tol=2e-5):
    err = float((got - want).abs().max())
    assert err <= tol * max(1.0, float(want.abs().max())), err


# ------------------------------------------------------------------ concat: linear methods, exact
@pytest.mark.parametrize("family", ["equal", "unequal"])
@pytest.mark.parametrize("method,params", [("average", {}), ("task_arithmetic", {"lambda": "0.7"}),
                                           ("average", {"weights": "0.2,-0.5,1.5"})])
def test_concat_is_the_merge_of_the_updates(zoo, family, method, params):
    ads = zoo[family]
    n = len(ads)
    if "weights" in params:
        params = {"weights": ",".join(params["weights"].split(",")[:n])}
    ds = [deltas(a) for a in ads]
    coef = ([float(x) for x in params["weights"].split(",")] if "weights" in params else
            [0.7] * n if method == "task_arithmetic" else [1 / n] * n)
    if "weights" in params:  # average divides the weights by their sum (normalize=true, the default)
        coef = [c / sum(coef) for c in coef]
    want = {name: sum(c * d[name] for c, d in zip(coef, ds) if name in d) for name in union(ds)}
    out, report = run(zoo, f"concat-{family}-{method}-{len(params)}", method, ads, params=params)
    assert report["lora"] == {"kind": "lora", "mode": "concat"}
    files = sorted(p.name for p in Path(out).iterdir())
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    # the file holds the concatenated factors: rank Σ r_i of the adapters targeting each module
    written = load_file(str(Path(out) / "adapter_model.safetensors"))
    cfg = json.loads((Path(out) / "adapter_config.json").read_text())
    for name in want:
        module = name[: -len(".weight")]
        ranks = [json.loads((Path(a) / "adapter_config.json").read_text())["r"] for a, d in zip(ads, ds) if name in d]
        a = written[f"{PRE}{module}.lora_A.weight"]
        assert a.shape[0] == sum(ranks)
        r_cfg = cfg["rank_pattern"].get(module, cfg["r"])
        assert r_cfg == sum(ranks) and cfg["alpha_pattern"].get(module, cfg["lora_alpha"]) == r_cfg
    assert sorted(cfg["target_modules"]) == sorted(n[: -len(".weight")] for n in want)
    assert not cfg["use_rslora"]
    assert_logits(peft_logits(zoo, out), reference_logits(zoo, want))


def test_concat_bytes_do_not_depend_on_chunking(zoo):
    a, _ = run(zoo, "chunk-small", "average", zoo["unequal"], max_memory="2KiB")
    b, _ = run(zoo, "chunk-large", "average", zoo["unequal"], max_memory="1GiB")
    assert H.sha256_file(Path(a) / "adapter_model.safetensors") == H.sha256_file(Path(b) / "adapter_model.safetensors")


# ------------------------------------------------------------------ full: any method on dense ΔW
def _merged_dense(zoo, method, ads, on_base: bool, stores_tag: str):
    """(merged ΔW per module, MergeSpec kwargs) in float64 for TIES and fisher, on the base (full)
    or on a zero base (svd)."""
    base = base_sd(zoo)
    ds = [deltas(a) for a in ads]
    shapes = {n: tuple(base[n].shape) for n in union(ds)}
    ds = with_zeros(ds, shapes)
    names = list(ds[0])
    if method == "ties":
        # on the base (full): the fine-tunes W + ΔW_i whole, every tensor no adapter updates a zero
        # task vector that TIES' global top-k counts; on a zero base (svd): the updates alone
        every = [n for n, t in base.items() if t.is_floating_point()] if on_base else names
        ds = [{n: d.get(n, torch.zeros(base[n].shape, dtype=torch.float64)) for n in every} for d in ds]
        b = {n: (base[n].double() if on_base else torch.zeros(shapes[n], dtype=torch.float64)) for n in every}
        fts = [{n: (b[n].float().double() + d[n]).float() for n in every} for d in ds]
        merged = reference_ties({n: b[n].float() for n in every}, fts, k=0.2, lam=1.0)
        return {n: merged[n] - b[n].float().double() for n in names}, {}
    g = torch.Generator().manual_seed(7)
    fishers = [{n: torch.rand(shapes[n], generator=g) + 0.05 for n in names} for _ in ads]
    stores = [H.write_store(zoo["root"] / f"{stores_tag}-f{i}.zarr", {"fisher": f}) for i, f in enumerate(fishers)]
    thetas = [{n: (base[n].double() if on_base else 0) + d[n] for n in names} for d in ds]
    w = [1 / len(ads)] * len(ads)
    merged = {n: fisher_formula([t[n] for t in thetas], [f[n] for f in fishers], w, 1e-8, "clamp", [True] * len(ads))
              - (base[n].double() if on_base else 0) for n in names}
    return merged, {"stats": stores}


@pytest.mark.parametrize("family", ["equal", "unequal"])
@pytest.mark.parametrize("method", ["ties", "fisher", "average", "task_arithmetic"])
def test_full_is_the_base_plus_the_merged_update(zoo, family, method):
    from transformers import AutoModelForCausalLM

    ads = zoo[family]
    tag = f"full-{family}-{method}"
    if method in ("ties", "fisher"):
        want, kw = _merged_dense(zoo, method, ads, True, tag)
    else:
        ds = [deltas(a) for a in ads]
        c = 0.3 if method == "task_arithmetic" else 1 / len(ads)
        want, kw = {n: sum(c * d[n] for d in ds if n in d) for n in union(ds)}, {}
    out, report = run(zoo, tag, method, ads, base=zoo["base"], lora="full", **kw)
    assert report["lora"]["mode"] == "full"
    assert (Path(out) / "model.safetensors").is_file() and (Path(out) / "config.json").is_file()
    got = load_file(str(Path(out) / "model.safetensors"))
    base = base_sd(zoo)
    for n, t in got.items():  # tensors no adapter updates are the base's, bit for bit
        if n not in want:
            assert torch.equal(t, base[n]), n
    got_logits = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert_logits(got_logits, reference_logits(zoo, want), tol=1e-4)


# ------------------------------------------------------------------ svd:R
@pytest.mark.parametrize("method", ["ties", "fisher", "average"])
def test_svd_refactors_the_merged_update_within_the_reported_energy(zoo, method):
    ads = zoo["unequal"]
    tag = f"svd-{method}"
    if method == "average":
        ds = [deltas(a) for a in ads]
        want, kw = {n: sum(d[n] / 3 for d in ds if n in d) for n in union(ds)}, {}
    else:
        want, kw = _merged_dense(zoo, method, ads, False, tag)
    rank = 3
    out, report = run(zoo, tag, method, ads, lora=f"svd:{rank}", **kw)
    assert not Path(out + ".lora-dense").exists()
    written = load_file(str(Path(out) / "adapter_model.safetensors"))
    cfg = json.loads((Path(out) / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["lora_alpha"] == rank and not cfg["rank_pattern"]
    energy = report["lora"]["modules"]
    truncated = {}
    for n, dw in want.items():
        module = n[: -len(".weight")]
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        truncated[n] = (u[:, :rank] * s[:rank]) @ vh[:rank]
        expect = float((s[rank:] ** 2).sum() / (s**2).sum())
        assert energy[module] == pytest.approx(expect, rel=1e-3, abs=1e-9)
        ba = written[f"{PRE}{module}.lora_B.weight"].double() @ written[f"{PRE}{module}.lora_A.weight"].double()
        # what is lost is exactly the reported share of ΔW's energy (Eckart–Young)
        lost = float(((dw - ba) ** 2).sum() / (dw**2).sum())
        assert lost == pytest.approx(expect, rel=1e-3, abs=1e-9)
        torch.testing.assert_close(ba, truncated[n], rtol=1e-4, atol=1e-5 * float(dw.abs().max()))
    assert_logits(peft_logits(zoo, out), reference_logits(zoo, truncated), tol=1e-4)


def test_svd_at_the_updates_rank_is_exact(zoo):
    """Two rank-2 updates average to a rank-4 one: svd:4 loses nothing."""
    ads = zoo["equal"]
    ds = [deltas(a) for a in ads]
    want = {n: (ds[0][n] + ds[1][n]) / 2 for n in ds[0]}
    out, report = run(zoo, "svd-exact", "average", ads, lora="svd:4")
    assert max(report["lora"]["modules"].values()) < 1e-12
    assert_logits(peft_logits(zoo, out), reference_logits(zoo, want), tol=1e-4)


# ------------------------------------------------------------------ IA3: element-wise, every method
@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "fisher"])
def test_ia3_merges_elementwise_and_loads(zoo, method):
    ads = zoo["ia3"]
    sds = [load_file(str(Path(a) / "adapter_model.safetensors")) for a in ads]
    names = list(sds[0])
    ones = {n: torch.ones_like(sds[0][n]) for n in names}
    kw = {}
    if method == "average":
        want = {n: sum(sd[n].double() for sd in sds) / 2 for n in names}
    elif method == "task_arithmetic":
        want = {n: 1 + 0.3 * sum(sd[n].double() - 1 for sd in sds) for n in names}
    elif method == "ties":
        want = reference_ties(ones, sds, k=0.2, lam=1.0)
    else:
        g = torch.Generator().manual_seed(3)
        fishers = [{n: torch.rand(sd[n].shape, generator=g) + 0.05 for n in names} for sd in sds]
        kw["stats"] = [H.write_store(zoo["root"] / f"ia3-f{i}.zarr", {"fisher": f}) for i, f in enumerate(fishers)]
        want = {n: fisher_formula([sd[n] for sd in sds], [f[n] for f in fishers], [0.5, 0.5], 1e-8, "clamp",
                                  [True, True]) for n in names}
    # a --base model (the adapters' base) is not the vectors' origin: ones are, for every method
    out, report = run(zoo, f"ia3-{method}", method, ads, base=zoo["base"], **kw)
    assert (Path(out) / "adapter_model.safetensors").is_file() and not (Path(out) / "model.safetensors").exists()
    got = load_file(str(Path(out) / "adapter_model.safetensors"))
    for n in names:
        H.assert_close(got[n], want[n], name=n)
    ref = PeftModel.from_pretrained(base_model(zoo), ads[0])
    with torch.no_grad():
        for n, p in ref.named_parameters():
            key = n.replace(".default", "")
            if key in want:
                p.copy_(want[key].float().reshape(p.shape))
    assert_logits(peft_logits(zoo, out), logits(ref))


# ------------------------------------------------------------------ factors, choices and errors
def test_factors_is_the_old_merge_under_its_name(zoo, capsys):
    ads = zoo["equal"]
    sds = [load_file(str(Path(a) / "adapter_model.safetensors")) for a in ads]
    out, _ = run(zoo, "factors", "average", ads, lora="factors")
    assert "not the merge" in capsys.readouterr().err
    got = load_file(str(Path(out) / "adapter_model.safetensors"))
    for n in sds[0]:
        H.assert_close(got[n], (sds[0][n].double() + sds[1][n].double()) / 2, name=n)
    assert json.loads((Path(out) / "adapter_config.json").read_text())["r"] == 2
    PeftModel.from_pretrained(base_model(zoo), out)


@pytest.mark.parametrize("case,needle", [
    ("ties-default", "--lora svd:R"),
    ("ties-concat", "exact only for linear methods"),
    ("full-no-base", "--lora full needs --base"),
    ("svd-too-large", "the rank cannot exceed"),
    ("factors-unequal", "equal ranks"),
    ("not-adapters", "not PEFT adapters"),
    ("bad-mode", "is not one of"),
    ("ia3-lora", "not LoRA"),
    ("svd-budget", "is re-factored whole and needs"),
])
def test_one_line_errors(zoo, case, needle):
    e, u, ia = zoo["equal"], zoo["unequal"], zoo["ia3"]
    specs = {
        "ties-default": ("ties", e, {}),
        "ties-concat": ("ties", e, {"lora": "concat"}),
        "full-no-base": ("ties", e, {"lora": "full"}),
        "svd-too-large": ("ties", e, {"lora": "svd:17"}),
        "factors-unequal": ("average", u, {"lora": "factors"}),
        "not-adapters": ("average", [zoo["base"], zoo["base"]], {"lora": "concat"}),
        "bad-mode": ("average", e, {"lora": "svd:x"}),
        "ia3-lora": ("average", ia, {"lora": "concat"}),
        "svd-budget": ("ties", e, {"lora": "svd:2", "max_memory": "4KiB"}),
    }
    method, inputs, kw = specs[case]
    out = zoo["root"] / f"err-{case}"
    with pytest.raises(TensorMergeError) as info:
        merge(MergeSpec(method, inputs, str(out), quiet=True, **kw))
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and not Path(str(out) + ".lora-dense").exists()


def test_adapters_of_different_base_models_and_mixed_inputs_are_refused(zoo, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(zoo["equal"][1], other)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/else"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TensorMergeError, match="different base models"):
        merge(MergeSpec("average", [zoo["equal"][0], str(other)], str(tmp_path / "o"), quiet=True))
    # the same base saved at two paths is one base
    shutil.copytree(zoo["base"], tmp_path / "base-copy")
    cfg["base_model_name_or_path"] = str(tmp_path / "base-copy")
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    merge(MergeSpec("average", [zoo["equal"][0], str(other)], str(tmp_path / "same"), quiet=True))
    cm.save(cm.llama(seed=1), tmp_path / "another")  # same architecture, other weights
    cfg["base_model_name_or_path"] = str(tmp_path / "another")
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TensorMergeError, match="different base models"):
        merge(MergeSpec("average", [zoo["equal"][0], str(other)], str(tmp_path / "o"), quiet=True))
    loha = tmp_path / "loha"
    shutil.copytree(zoo["equal"][0], loha)
    cfg = json.loads((loha / "adapter_config.json").read_text())
    cfg["peft_type"] = "LOHA"
    (loha / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TensorMergeError, match="merging supports LORA and IA3"):
        merge(MergeSpec("average", [str(loha), str(loha)], str(tmp_path / "o"), quiet=True))
    with pytest.raises(TensorMergeError, match="mix PEFT adapters and models"):
        merge(MergeSpec("average", [zoo["equal"][0], zoo["base"]], str(tmp_path / "o"), quiet=True))


def test_cli_lora_option(zoo, tmp_path):
    out = tmp_path / "cli"
    res = H.run_cli(["run", "-m", "ties", "-i", ",".join(zoo["equal"]), "-o", str(out), "-q"])
    H.assert_clean_error(res, "--lora svd:R", out_dir=out)
    res = H.run_cli(["run", "-m", "ties", "-i", ",".join(zoo["equal"]), "-o", str(out), "-q", "--lora", "svd:2"])
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    res = H.run_cli(["run", "-m", "ties", "-i", ",".join(zoo["equal"]), "-o", str(out), "--overwrite",
                     "--lora", "svd:2"])
    assert res.returncode == 0 and "lora svd:2: discarded energy" in res.stdout, res


def test_statistics_of_the_factors_do_not_weight_the_dense_update(zoo):
    ad = zoo["equal"]
    stores = []
    for i, a in enumerate(ad):
        sd = load_file(str(Path(a) / "adapter_model.safetensors"))
        stores.append(H.write_store(zoo["root"] / f"factor-f{i}.zarr", {"fisher": {n: t.abs() for n, t in sd.items()}}))
    out = zoo["root"] / "err-factor-stats"
    with pytest.raises(TensorMergeError, match="keyed by the base model's weight names") as info:
        merge(MergeSpec("fisher", ad, str(out), quiet=True, stats=stores, lora="full", base=zoo["base"]))
    assert "\n" not in str(info.value) and not out.exists()


def test_plan_prints_the_adapter_layout(zoo):
    res = H.run_cli(["plan", "-m", "task_arithmetic", "-i", ",".join(zoo["unequal"])])
    assert res.returncode == 0, res.stderr
    assert "lora_B.weight" in res.stdout and "derived" in res.stdout
    res = H.run_cli(["plan", "-m", "ties", "-i", ",".join(zoo["unequal"]), "--lora", "svd:2"])
    assert res.returncode == 0, res.stderr
    assert "stage 1 of --lora svd:2" in res.stdout and "q_proj.weight" in res.stdout


def test_full_on_a_conv1d_model(tmp_path):
    """GPT-2 stores its projections [in, out] (fan_in_fan_out): ΔW is added transposed."""
    from transformers import AutoModelForCausalLM

    cm.save(cm.gpt2(), tmp_path / "base")
    ads = []
    for i in range(2):
        model = cm.gpt2()
        torch.manual_seed(50 + i)
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights=False)
        d = tmp_path / f"g{i}"
        get_peft_model(model, cfg).save_pretrained(str(d))
        ads.append(str(d))
    out = tmp_path / "out"
    merge(MergeSpec("task_arithmetic", ads, str(out), base=str(tmp_path / "base"), lora="full", quiet=True,
                    max_memory=MAX_MEMORY, params={"lambda": "0.5"}))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    ds = [deltas(a) for a in ads]
    for n, t in got.items():
        want = base[n].double() + sum(0.5 * d[n].t() for d in ds if n in d)
        H.assert_close(t, want, name=n)
    assert any(n in ds[0] for n in got)
    AutoModelForCausalLM.from_pretrained(str(out))


@pytest.mark.parametrize("lora,crash", [("concat", "chunk:3"), ("svd:3", "chunk:3"), ("svd:3", "renamed:1"),
                                        ("svd:3", "stage2")])
def test_interrupted_adapter_merge_resumes_to_the_same_bytes(zoo, tmp_path, lora, crash):
    method = "average" if lora == "concat" else "ties"
    budget = "4KiB" if lora == "concat" else "16KiB"  # svd re-factors a module whole
    args = ["run", "-m", method, "-i", ",".join(zoo["unequal"]), "--lora", lora, "--max-memory", budget, "-q"]
    ref = tmp_path / "ref"
    assert H.run_cli(args + ["-o", ref, "--report", tmp_path / "r.json"]).returncode == 0
    if crash == "stage2":  # the second chunk of the re-factoring, after every chunk of the dense merge
        blocks = json.loads((tmp_path / "r.json").read_text())["blocks"]
        crash = f"chunk:{sum(b['chunks'] for b in blocks if '.lora_' not in b['name']) + 2}"
    out = tmp_path / "out"
    crashed = H.run_cli(args + ["-o", out], env={"TENSORMERGE_CRASH_AT": crash})
    assert crashed.returncode != 0 and not out.exists()
    if lora != "concat" and crash != "chunk:3":  # the dense stage had finished
        assert Path(str(out) + ".lora-dense").is_dir()
    res = H.run_cli(args + ["-o", out, "--resume"])
    assert res.returncode == 0, res.stderr
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert H.sha256_file(out / f) == H.sha256_file(ref / f), f
    if lora != "concat":  # a resumed run reports every module's discarded energy, as an uninterrupted one
        want = json.loads((ref / "tensormerge.json").read_text())["lora"]
        assert json.loads((out / "tensormerge.json").read_text())["lora"] == want
    assert not Path(str(out) + ".lora-dense").exists() and not Path(str(out) + ".partial").exists()


@pytest.mark.parametrize("lora,method", [("concat", "task_arithmetic"), ("svd:3", "ties"), ("full", "ties")])
def test_same_bytes_whatever_the_thread_count_and_chunking(zoo, tmp_path, lora, method):
    def run_merge(out, max_memory="16KiB"):
        merge(MergeSpec(method, zoo["unequal"], str(out), quiet=True, lora=lora, max_memory=max_memory,
                        base=zoo["base"] if lora == "full" else None))

    a, b = H.digests_per_thread_count(run_merge, tmp_path)
    run_merge(tmp_path / "big", "1GiB")
    assert a == b == H.shard_digests(tmp_path / "big") and a


def test_dask_workers_write_the_same_bytes(zoo, tmp_path):
    pytest.importorskip("distributed")
    for lora, method, base in (("concat", "average", None), ("full", "ties", zoo["base"])):
        outs = []
        for workers in (None, 2):
            out = tmp_path / f"{lora}-{workers}"
            merge(MergeSpec(method, zoo["unequal"], str(out), base=base, lora=lora, quiet=True,
                            max_memory=MAX_MEMORY, workers=workers))
            outs.append(H.shard_digests(out))
        assert outs[0] == outs[1] and outs[0]


# ------------------------------------------------------------------ card and recipe of an adapter merge
@pytest.mark.parametrize("lora,method,with_base,library", [
    (None, "task_arithmetic", False, "peft"),  # concat, the default: the recipe states it
    ("svd:2", "ties", False, "peft"),
    ("factors", "task_arithmetic", False, "peft"),
    ("full", "ties", True, "transformers"),
])
def test_adapter_recipe_replays_byte_for_byte_and_card_names_the_library(zoo, tmp_path, lora, method, with_base,
                                                                         library):
    """The recipe names the adapter directories (not the W + ΔW, ΔW or zeros the engine reads)
    and `lora`, so `run --config` remakes every output file; the card says peft for an adapter."""
    import yaml

    ads = zoo["equal"]
    args = ["run", "--method", method, "--inputs", ",".join(ads), "--output", str(tmp_path / "out"), "--quiet",
            "--max-memory", MAX_MEMORY]
    args += ["--lora", lora] if lora else []
    args += ["--base", zoo["base"]] if with_base else []
    res = H.run_cli(args)
    assert res.returncode == 0, res
    out = tmp_path / "out"
    recipe = yaml.safe_load((out / "tensormerge-recipe.yaml").read_text())
    assert recipe["inputs"] == [os.path.abspath(a) for a in ads]
    assert recipe["lora"] == (lora or "concat")
    assert recipe.get("base") == (os.path.abspath(zoo["base"]) if with_base else None)
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == library
    weights = "adapter_model.safetensors" if library == "peft" else "model.safetensors"
    assert (out / weights).is_file()
    prov = json.loads((out / "tensormerge.json").read_text())
    assert [i["spec"] for i in prov["inputs"]] == ads  # the adapters as given, digested from their files
    assert all(i["content"]["tensors"] == len(load_file(str(Path(a) / "adapter_model.safetensors")))
               for i, a in zip(prov["inputs"], ads))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res2 = H.run_cli(["run", "--config", str(out / "tensormerge-recipe.yaml"), "--output", "again", "--quiet"],
                     cwd=elsewhere)
    assert res2.returncode == 0, res2
    again = elsewhere / "again"
    assert H.tree_digest(again, skip=("tensormerge.json", "README.md")) == H.tree_digest(
        out, skip=("tensormerge.json", "README.md"))
    assert not Path(str(again) + ".lora-dense").exists()


def test_adapters_stored_transposed_to_one_another_are_refused(zoo, tmp_path):
    """fan_in_fan_out = true stores B·A transposed (Conv1D): concatenated with a plain LoRA's
    factors, one update was merged transposed, with exit 0."""
    fan = tmp_path / "fan"
    shutil.copytree(zoo["equal"][1], fan)
    conf = json.loads((fan / "adapter_config.json").read_text())
    conf["fan_in_fan_out"] = True
    (fan / "adapter_config.json").write_text(json.dumps(conf))
    out = tmp_path / "out"
    res = H.run_cli(["run", "-m", "average", "-i", f"{zoo['equal'][0]},{fan}", "-o", str(out)])
    H.assert_clean_error(res, "fan_in_fan_out", str(fan), out_dir=out)


def test_a_deeply_nested_adapter_config_is_refused_in_one_line(zoo, tmp_path):
    bad = tmp_path / "nested"
    shutil.copytree(zoo["equal"][1], bad)
    (bad / "adapter_config.json").write_text("[" * 100000 + "]" * 100000)
    out = tmp_path / "out"
    for cmd in (["run", "-m", "average", "-o", str(out)], ["plan", "-m", "ties", "-b", zoo["base"], "--lora", "full"]):
        res = H.run_cli(cmd + ["-i", f"{zoo['equal'][0]},{bad}"])
        H.assert_clean_error(res, str(bad / "adapter_config.json"), "RecursionError", out_dir=out)


# ------------------------------------------------------------------ what the run says of the base
def test_a_base_the_adapters_do_not_record_is_warned(zoo, tmp_path):
    """--lora full on another model than the adapters' base runs (applying adapters to a merged or
    further-trained model is a choice), with a warning naming the base they record."""
    other = tmp_path / "other"
    cm.save(cm.llama(seed=5), other)
    _, report = run(zoo, "full-other-base", "task_arithmetic", zoo["equal"], base=str(other), lora="full")
    assert any("the adapters record another base model" in w and str(other) in w for w in report["warnings"])
    _, report = run(zoo, "full-own-base", "task_arithmetic", zoo["equal"], base=zoo["base"], lora="full")
    assert not any("--base" in w for w in report["warnings"]), report["warnings"]
    copied = [line for line in report["summary"] if line.startswith("blocks:")][0]
    assert "copied from the base (no adapter updates them)" in copied and "not floating point" not in copied


@pytest.mark.parametrize("which,lora", [("equal", "concat"), ("ia3", None)])
def test_a_base_an_adapter_merge_never_reads_is_warned(zoo, which, lora):
    out, report = run(zoo, f"unread-base-{which}", "average", zoo[which], base=zoo["base"],
                      **({"lora": lora} if lora else {}))
    assert any("never reads the base's values" in w for w in report["warnings"]), report["warnings"]
    assert json.loads((Path(out) / "tensormerge.json").read_text())["base"] is None
    card = (Path(out) / "README.md").read_text()
    line = next(x for x in card.splitlines() if x.startswith("Output dtype:"))
    assert line.startswith("Output dtype: `float32`") and "config.json" not in line, line


@pytest.mark.parametrize("method,params", [("model_stock", {}), ("fisher", {"normalize": "true"}),
                                           ("ties", {"scope": "tensor"})])
def test_full_copies_what_no_adapter_targets_unless_ties_counts_it(zoo, method, params):
    """Only global TIES reads the tensors no adapter updates (their zero task vectors count in its
    top-k); other methods with passes copy them: model_stock's angle of two zero task vectors is
    undefined, and a weighted mean of equal values need not round to them."""
    kw = {}
    if method == "fisher":
        base = base_sd(zoo)
        names = union([deltas(a) for a in zoo["equal"]])
        kw["stats"] = [H.write_store(zoo["root"] / f"copy-{method}-f{i}.zarr",
                                     {"fisher": {n: torch.rand(base[n].shape) + 0.1 for n in names}})
                       for i in range(len(zoo["equal"]))]
    out, report = run(zoo, f"full-copies-{method}", method, zoo["equal"], base=zoo["base"], lora="full",
                      params=params, **kw)
    targets = set(union([deltas(a) for a in zoo["equal"]]))
    kinds = {b["name"]: b["kind"] for b in report["blocks"]}
    assert {n for n, k in kinds.items() if k == "merge"} == targets
    got, base = load_file(str(Path(out) / "model.safetensors")), base_sd(zoo)
    assert all(torch.equal(got[n], base[n]) for n in base if n not in targets)
    assert not report["fallback_blocks"]
