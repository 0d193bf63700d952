"""`tensormerge stats plan`: the numbers it prints before a run are those the run produces.

- a tiny model's plan against a real `stats compute` store (array bytes, array count, bytes on
  disk) and against the accumulators a real Collector allocates (float64 too);
- a named architecture (Llama-7B, mT5-XL) against the hand count written here from the
  published shapes, and its FLOP-based time;
- `--config` builds on the meta device: peak RSS barely moves for a 7B model;
- bad arguments are one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from tests.helpers import assert_clean_error  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402
from tests.stats_compute.test_collect_cli import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    llama = cm.save(cm.llama(), root / "llama")
    t5 = cm.save(cm.t5(), root / "t5")
    causal = cm.write_jsonl(root / "c.jsonl", cm.causal_records(12))
    s2s = cm.write_jsonl(root / "s.jsonl", cm.seq2seq_records(12))
    return root, {"llama": (llama, causal), "t5": (t5, s2s)}


def _plan(args) -> dict:
    """The plan as JSON; it exits 4 exactly when it says stats compute would refuse the run."""
    res = cli(["stats", "plan", *map(str, args), "--json"])
    plan = json.loads(res.stdout)
    refused = "refused" in plan
    assert res.returncode == (4 if refused else 0), res
    assert ("error: stats compute would refuse this run" in res.stderr) == refused, res
    return plan


def _store_arrays(path) -> list[tuple[str, str, tuple]]:
    """(kind, name, shape) of every array the store really holds (zarr, not tensormerge's reader)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return [(kind, name, tuple(arr.shape)) for kind, group in root.groups() for name, arr in group.arrays()]


def _disk(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


@pytest.mark.parametrize("model,kind", [("llama", "all"), ("t5", "kfac")])
def test_plan_equals_the_store_compute_writes(tiny, model, kind):
    root, models = tiny
    mdir, data = models[model]
    plan = _plan(["--model", mdir, "--data", data, "--kind", kind, "--batch-size", "4"])
    out = root / f"{model}-{kind}.zarr"
    res = cli(["stats", "compute", "--model", mdir, "--data", data, "--kind", kind, "--batch-size", "4",
               "-o", out, "-q"])
    assert res.returncode == 0, res
    arrays = _store_arrays(out)
    by_kind = {}
    for k, _, shape in arrays:
        by_kind[k] = by_kind.get(k, 0) + 4 * math.prod(shape)
    for k in ("fisher", "gram_in", "gram_out", "fisher_block"):
        assert plan["store"][k] == by_kind.get(k, 0), k
        assert plan["accumulators"][k] == by_kind.get(k, 0), k  # float32 accumulators: the store's shapes
    assert plan["store"]["arrays"] == len(arrays)
    # on disk: the data uncompressed plus the stated metadata per array is an upper bound within 25%
    disk = _disk(out)
    assert 0.75 * plan["store"]["total"] <= disk <= plan["store"]["total"], (disk, plan["store"])
    assert plan["time"]["source"] == "measured" and plan["time"]["seconds"] > 0
    assert plan["time"]["examples"] == 12
    assert not (root / "(plan)").exists() and not list(Path.cwd().glob("(plan)*"))


def test_plan_float64_accumulators_are_the_real_ones(tiny):
    """The measured figure is the nbytes of the Collector's own sums after the timed batches."""
    _, models = tiny
    mdir, data = models["llama"]
    p32 = _plan(["--model", mdir, "--data", data, "--kind", "all", "--batch-size", "4"])
    p64 = _plan(["--model", mdir, "--data", data, "--kind", "all", "--batch-size", "4", "--accumulate", "float64"])
    assert p64["accumulators"]["total"] == 2 * p32["accumulators"]["total"]
    assert p64["time"]["accumulator_bytes_measured"] == p64["accumulators"]["total"]
    assert p32["time"]["accumulator_bytes_measured"] == p32["accumulators"]["total"]
    # per-example gradients: every parameter (float32) per example in the batch
    n = sum(4 * math.prod(s) for s in _param_shapes(mdir).values())
    assert p32["per_example_gradients"]["bytes_per_example"] == n
    assert p32["per_example_gradients"]["batch_bytes"] == 4 * n


def _param_shapes(mdir) -> dict:
    from safetensors import safe_open

    with safe_open(os.path.join(mdir, "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def test_config_plan_equals_model_plan(tiny, tmp_path):
    """--config (meta device, no weights, no data) accounts exactly as --model does."""
    _, models = tiny
    mdir, data = models["t5"]
    by_model = _plan(["--model", mdir, "--data", data, "--kind", "all", "--batch-size", "2"])
    by_config = _plan(["--config", os.path.join(mdir, "config.json"), "--kind", "all", "--batch-size", "2"])
    for k in ("accumulators", "store", "per_example_gradients", "gram_in_bytes", "parameters", "weights_bytes"):
        assert by_config[k] == by_model[k], k


def _llama7b_hand():
    d, f, layers, vocab = 4096, 11008, 32, 32000
    # per layer: q, k, v, o, gate, up read d-wide inputs; down reads f; lm_head reads d
    every = layers * (6 * d * d + f * f) + d * d
    shared = layers * (3 * d * d + f * f) + d * d  # q/k/v one Gram, gate/up one Gram
    out = layers * (5 * d * d + 2 * f * f)  # q, k, v, o, down: d_out = d; gate, up: f; lm_head skipped
    params = vocab * d * 2 + layers * (4 * d * d + 3 * d * f + 2 * d) + d
    return every, shared, out, params


def test_arch_llama7b_against_hand_count():
    every, shared, out, params = _llama7b_hand()
    plan = _plan(["--arch", "llama-7b", "--kind", "all", "--batch-size", "8", "--accumulate", "float64"])
    assert plan["parameters"] == params == 6_738_415_616
    assert plan["gram_in_bytes"] == {"per_weight": 8 * every, "shared": 8 * shared, "shared_weights": 3 * 32}
    assert plan["accumulators"]["gram_out"] == 8 * out
    assert plan["accumulators"]["fisher"] == 8 * params
    assert plan["accumulators"]["fisher_block"] == 8 * 4096 * 4096 * (32 * 2 + 1)  # the RMSNorm weights
    # one example's gradients (27 GB) exceed a quarter of --max-memory: the loop streams them, one
    # parameter's at a time (the largest: the embedding or lm_head, 32000 x 4096)
    assert plan["per_example_gradients"]["mode"] == "streamed"
    assert plan["per_example_gradients"]["peak_bytes"] == 4 * 32000 * 4096
    assert plan["memory_total_bytes"] == 4 * params + 4 * 32000 * 4096 + plan["accumulators"]["total"]
    vmap = _plan(["--arch", "llama-7b", "--kind", "all", "--batch-size", "8", "--grad-mode", "vmap"])
    assert vmap["per_example_gradients"]["batch_bytes"] == 8 * 4 * params  # float32, batch 8
    assert vmap["per_example_gradients"]["peak_bytes"] == 2 * 8 * 4 * params
    sq = _plan(["--arch", "llama-7b", "--kind", "fisher", "--fisher-mode", "squared-batch", "--grad-mode", "vmap"])
    assert sq["per_example_gradients"]["peak_bytes"] == 4 * 32000 * 4096  # mini-batch gradients: streamed too
    assert plan["store"]["gram_out"] == 4 * out
    assert plan["store"]["gram_in"] in (4 * every, 4 * shared)
    assert plan["store"]["fisher"] == 4 * params
    # stats compute refuses Gram accumulators over --max-memory (4GiB by default); the plan says so
    assert "--max-memory 4096.0 MiB" in plan["refused"]
    roomy = _plan(["--arch", "llama-7b", "--kind", "gram", "--max-memory", "40GiB"])
    assert "refused" not in roomy


def test_arch_time_from_flops():
    """gram at 512 tokens: 2 FLOPs per weight entry per token forward + 2 d_in^2 per distinct input Gram."""
    _, shared, _, params = _llama7b_hand()
    matmul = params - 32000 * 4096 - (32 * 2 * 4096 + 4096)  # every linear weight: all but embedding and norms
    plan = _plan(["--arch", "llama-7b", "--kind", "gram", "--max-length", "512", "--max-examples", "1000",
                  "--gpu-tflops", "100"])
    flops = 512 * (2 * matmul + 2 * shared)
    assert plan["time"]["flops_per_example"] == pytest.approx(flops, rel=1e-12)
    assert plan["time"]["seconds"] == pytest.approx(1000 * flops / 100e12, rel=1e-12)
    # kfac: the Grams' forward, and a backward with input gradients only (the weights are frozen)
    _, _, out, _ = _llama7b_hand()
    kfac = _plan(["--arch", "llama-7b", "--kind", "kfac", "--max-length", "512"])
    assert kfac["time"]["flops_per_example"] == pytest.approx(512 * (4 * matmul + 2 * shared + 2 * out), rel=1e-12)
    plain = _plan(["--arch", "llama-7b", "--kind", "gram"])
    assert "seconds" not in plain["time"] and "seconds_per_example" not in plain["time"]


def test_arch_mt5_xl_cross_attention_shares_one_gram():
    d, f, L = 2048, 5120, 24
    every = L * (6 * d * d + f * f) + L * (10 * d * d + f * f) + d * d
    # encoder layer: q/k/v one, o, wi_0/wi_1 one, wo; decoder layer: self q/k/v one, o, cross q, cross o,
    # wi_0/wi_1 one, wo; every decoder layer's cross k/v read the encoder output: one Gram for all 48
    shared = L * (3 * d * d + f * f) + L * (5 * d * d + f * f) + d * d + d * d
    plan = _plan(["--arch", "mt5-xl", "--kind", "gram"])
    # shared (= both stacks' embed_tokens) + lm_head, encoder layers (q, k, v, o, wi_0, wi_1, wo, 2 norms),
    # decoder layers (self and cross q, k, v, o, wi_0, wi_1, wo, 3 norms), 2 final norms, and each
    # stack's relative position bias (32 buckets x 32 heads)
    params = (2 * 250112 * d + L * (4 * d * d + 3 * d * f + 2 * d) + L * (8 * d * d + 3 * d * f + 3 * d) + 2 * d
              + 2 * 32 * 32)
    assert plan["parameters"] == params
    assert plan["gram_in_bytes"]["per_weight"] == 4 * every
    assert plan["gram_in_bytes"]["shared"] == 4 * shared


@pytest.mark.parametrize("arch", ["t5-base", "llama-1b", "vit-b-16", "clip-vit-b-32"])
def test_every_named_arch_plans(arch):
    plan = _plan(["--arch", arch, "--kind", "all", "--gpu-tflops", "50"])
    assert plan["accumulators"]["gram_in"] > 0 and plan["accumulators"]["fisher"] == 4 * plan["parameters"]
    assert plan["time"]["seconds_per_example"] > 0
    if arch == "llama-1b":  # Llama-3.2-1B's published count: the tied lm_head is not a parameter of its own
        assert plan["parameters"] == 1_235_814_400
        assert "lm_head.weight" not in json.dumps(plan)
    if arch.startswith(("vit", "clip")):
        assert plan["time"]["tokens_per_example"] == (224 // (16 if "16" in arch else 32)) ** 2 + 1


def test_meta_construction_allocates_nothing(tmp_path):
    """A 7B model built from its config: peak RSS grows far less than its 25 GiB of weights."""
    code = (
        "import resource, sys\n"
        "from tensormerge.stats_compute import planning\n"
        "import transformers, torch\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "p = planning.plan_arch('llama-7b', None, 'all', 8, 512, 'float32')\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(after - before, p['weights_bytes'])\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    grown_kib, weights = map(int, res.stdout.split()[-2:])
    assert weights > 25 * 2**30
    assert grown_kib * 1024 < 512 * 2**20, f"peak RSS grew {grown_kib / 1024:.0f} MiB"


BAD = [
    ([], ["--model, --arch, --config", "none"]),
    (["--arch", "llama-7b", "--config", "x.json"], ["--arch", "--config"]),
    (["--arch", "gpt-9"], ["--arch 'gpt-9'", "llama-7b"]),
    (["--model", "m"], ["--model needs --data"]),
    (["--arch", "llama-7b", "--data", "d.jsonl"], ["--data"]),
    (["--arch", "llama-7b", "--gpu-tflops", "0"], ["--gpu-tflops 0"]),
    (["--arch", "llama-7b", "--gpu-tflops", "nan"], ["--gpu-tflops"]),
    (["--arch", "llama-7b", "--batch-size", "0"], ["--batch-size 0"]),
    (["--config", "no/such/config.json"], ["no/such/config.json"]),
    # ignored without a word with --arch/--config before (a --model plan checked them)
    (["--arch", "llama-7b", "--workers", "2", "--scheduler", "tcp://h:1"], ["--workers and --scheduler"]),
    (["--arch", "llama-7b", "--workers", "0"], ["--workers 0"]),
    (["--arch", "llama-7b", "--max-examples", "0"], ["--max-examples 0"]),
]


@pytest.mark.parametrize("args,needles", BAD, ids=[" ".join(a) or "nothing" for a, _ in BAD])
def test_bad_arguments_are_one_line_errors(args, needles):
    assert_clean_error(cli(["stats", "plan", "--kind", "gram", *args]), *needles)


def test_missing_kind_and_bad_data_are_one_line_errors(tiny, tmp_path):
    _, models = tiny
    mdir, _ = models["llama"]
    assert_clean_error(cli(["stats", "plan", "--arch", "llama-7b"]), "--kind")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [3, 4]}\n{"input_ids": [3,\n')
    assert_clean_error(cli(["stats", "plan", "--model", mdir, "--data", bad, "--kind", "fisher"]), "bad.jsonl:2")
    cfg = tmp_path / "config.json"
    cfg.write_text('{"model_type": "llama", "architectures": ["NoSuchModel"]}')
    assert_clean_error(cli(["stats", "plan", "--config", cfg, "--kind", "gram"]), str(cfg))


@pytest.mark.parametrize("arch", ["vit", "clip_classifier"])
def test_plan_equals_the_store_of_an_image_classifier(tmp_path, arch):
    from tests.stats_compute import image_models as im

    mdir = im.save(getattr(im, arch)(), tmp_path / arch)
    data, _ = im.jsonl_images(tmp_path / "img", 6)
    plan = _plan(["--model", mdir, "--data", data, "--kind", "all", "--batch-size", "2"])
    out = tmp_path / "S.zarr"
    res = cli(["stats", "compute", "--model", mdir, "--data", data, "--kind", "all", "--batch-size", "2",
               "-o", out, "-q"])
    assert res.returncode == 0, res
    arrays = _store_arrays(out)
    assert plan["store"]["arrays"] == len(arrays)
    assert plan["store"]["total"] - plan["store"]["metadata"] == sum(4 * math.prod(s) for *_, s in arrays)
    assert plan["time"]["accumulator_bytes_measured"] == plan["accumulators"]["total"]
    assert plan["time"]["examples"] == 6


def test_config_with_absurd_layer_count_is_refused_before_building(tiny, tmp_path):
    """A 1 KB config.json stating 2 million layers built 2 million meta modules (killed after
    minutes, gigabytes of Python objects); a count above any model's is refused naming the key,
    by `stats plan --config` and by `stats compute --model` alike (here 1500 tiny layers, which
    the code before built and planned silently)."""
    from tensormerge.errors import InputError
    from tensormerge.stats_compute import planning
    from tensormerge.stats_compute.collect import ComputeOptions, compute_stats

    _, models = tiny
    mdir, _ = models["llama"]
    cfg = json.loads((Path(mdir) / "config.json").read_text())
    cfg["num_hidden_layers"] = 1500
    d = tmp_path / "deep"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"num_hidden_layers is 1500, more than 1024"):
        planning.arch_shapes(None, str(d / "config.json"), "float32")
    import shutil

    for name in os.listdir(mdir):
        if name != "config.json":
            shutil.copy(os.path.join(mdir, name), d / name)
    data = cm.write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [3, 4, 5]}])
    with pytest.raises(InputError, match=r"deep: num_hidden_layers is 1500"):
        compute_stats(ComputeOptions(model=str(d), data=data, kind="fisher", output=str(tmp_path / "s.zarr"),
                                     quiet=True))
    assert not (tmp_path / "s.zarr").exists()
