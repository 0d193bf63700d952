"""`stats compute`'s memory at large widths: K-FAC's backward computes no parameter gradients,
Fisher gradients are handed over one parameter at a time, a budget too small for vmap's
per-example gradients takes the loop, and a run that cannot fit is refused before any work."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")

from tensormerge.errors import BudgetError, ParameterError  # noqa: E402
from tensormerge.stats_compute.collect import ComputeOptions, compute_stats  # noqa: E402
from tensormerge.stats_compute.grads import streamed  # noqa: E402
from tests.stats_compute import collect_models as cm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
N = 5


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    path = cm.save(cm.llama(tie=False), root / "model")
    recs = cm.causal_records(N, seed=4)
    data = cm.write_jsonl(root / "data.jsonl", recs)
    return {"root": root, "model": path, "data": data, "recs": recs}


def _opts(s, name, **kw):
    return ComputeOptions(**{"model": s["model"], "data": s["data"], "output": str(s["root"] / f"{name}.zarr"),
                             "quiet": True, "overwrite": True, **kw})


def test_kfac_backward_accumulates_no_parameter_gradient(llama, monkeypatch):
    """Before: K-FAC's backward filled every parameter's .grad (a second model in memory)."""
    from tensormerge.stats_compute import collect

    fired = []
    real = collect.Collector._grams

    def watched(self, batch):
        handles = [p.register_post_accumulate_grad_hook(lambda p, n=n: fired.append(n))
                   for n, p in self.loaded.model.named_parameters()]
        try:
            real(self, batch)
        finally:
            for h in handles:
                h.remove()
        assert all(p.requires_grad for p in self.loaded.model.parameters())  # restored after the pass

    monkeypatch.setattr(collect.Collector, "_grams", watched)
    compute_stats(_opts(llama, "kfac", kind="kfac", batch_size=2))
    assert fired == []
    got = cm.read_store(str(llama["root"] / "kfac.zarr"))
    model = cm.llama(tie=False)
    ref = cm.brute_force(model, llama["recs"], "causal", set(dict(model.named_parameters())))
    for kind in ("gram_in", "gram_out"):
        want = {k: v for k, v in ref[kind].items() if not (kind == "gram_out" and k.startswith("lm_head"))}
        assert set(got[kind]) == set(want)
        for k, w in want.items():
            torch.testing.assert_close(got[kind][k], w, rtol=2e-4, atol=2e-4 * (w.abs().max().item() or 1))


def test_streamed_gradients_one_at_a_time_equal_autograd():
    """Each gradient is handed over as it completes and freed: while `use` runs, no other
    parameter holds a .grad; the values are autograd's, float64, tied uses summed."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(4, 6).double(), torch.nn.Linear(6, 4).double()
    model = torch.nn.Sequential(lin1, torch.nn.Tanh(), lin2)
    x = torch.randn(3, 4, dtype=torch.float64)
    lin2.weight = torch.nn.Parameter(lin1.weight.detach().T.clone())  # a separate parameter
    names = [n for n, _ in model.named_parameters()]

    def loss():
        return (model(x) ** 2).sum() + (model[0].weight ** 3).sum()

    want = dict(zip(names, torch.autograd.grad(loss(), list(model.parameters()))))
    got = {}

    def use(name, g):
        others = [n for n, p in model.named_parameters() if p.grad is not None]
        assert others == [], others
        got[name] = g.clone()

    streamed(model, names[1:], loss, use)  # the first weight frozen meanwhile
    assert set(got) == set(names[1:])
    for n in names[1:]:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-12)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_a_budget_too_small_for_vmap_takes_the_loop(llama, tmp_path):
    """One example's gradients over a quarter of --max-memory: the loop, said in a warning, and
    the same Fisher as vmap (float32 sums in another order)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=cm.V, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         pad_token_id=0))
    params = sum(p.numel() for p in model.parameters())
    assert 4 * params > (1 << 20) // 4  # one example's float32 gradients: over a quarter of 1 MiB
    s = {**llama, "model": cm.save(model, tmp_path / "m"), "root": tmp_path}
    vmap = compute_stats(_opts(s, "vmap", kind="fisher", batch_size=2, max_memory=64 * 2**20))
    assert vmap["grad_mode"] == "vmap"
    small = compute_stats(_opts(s, "loop", kind="fisher", batch_size=2, max_memory=1 << 20))
    assert small["grad_mode"] == "loop"
    assert any("exceed a quarter of --max-memory" in w for w in small["warnings"])
    a = cm.read_store(str(tmp_path / "vmap.zarr"))["fisher"]
    b = cm.read_store(str(tmp_path / "loop.zarr"))["fisher"]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-7 * (a[k].abs().max().item() or 1))


def test_a_run_that_cannot_fit_is_refused_before_any_work(llama, monkeypatch):
    from tensormerge.engine import memory
    from tensormerge.stats_compute import collect

    steps = []

    def step(self, batch):
        steps.append(batch)
        raise KeyboardInterrupt  # stands for the data pass: reached or not

    monkeypatch.setattr(collect.Collector, "step", step)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1000)
    out = llama["root"] / "refused.zarr"
    with pytest.raises(BudgetError) as e:
        compute_stats(_opts(llama, "refused", kind="all"))
    msg = str(e.value)
    assert "\n" not in msg and llama["model"] in msg and "--kind all" in msg and "available" in msg
    assert "fisher accumulators" in msg and "gram_out accumulators" in msg and "fewer kinds" in msg
    assert steps == [] and not out.exists() and not os.path.exists(str(out) + ".partial")
    monkeypatch.setenv("TENSORMERGE_STATS_NO_MEMORY_CHECK", "1")
    with pytest.raises(KeyboardInterrupt):  # past the check: the data pass is reached
        compute_stats(_opts(llama, "refused", kind="all"))
    assert steps


@pytest.mark.parametrize("size", [0, 1000, (1 << 20) - 1])
def test_max_memory_below_one_mib_is_refused(llama, size):
    """Before: silently raised to 1 MiB."""
    with pytest.raises(ParameterError, match=f"--max-memory {size} bytes: must be at least 1MiB"):
        compute_stats(_opts(llama, "tiny", kind="gram", max_memory=size))


def test_plan_says_what_compute_would_refuse_and_times_nothing(llama, monkeypatch):
    """`stats plan --model` does not run (and allocate) the measured batches of a run that
    `stats compute` would refuse for want of memory; the advice fits the run."""
    from tensormerge.engine import memory
    from tensormerge.stats_compute import collect, planning

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1000)
    monkeypatch.setattr(planning, "_measure", lambda *a, **k: pytest.fail("measured a refused run"))
    plan = planning.plan_model(_opts(llama, "plan", kind="kfac"))
    assert "available" in plan["refused"] and plan["time"] is None
    assert "fewer kinds" not in plan["refused"] and "--accumulate" not in plan["refused"]
    assert collect.Collector  # the refusal came from the same check stats compute makes
