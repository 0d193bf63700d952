"""`tensormerge run --method mats` on statistics that carry no information for one block: a
parameter that got no gradient has zero Fishers (or zero K-FAC factors) in every model. CG
from the task-arithmetic start must keep that start (never write zeros) and say so."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_cli, save_safetensors_dir, write_store

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def spd(d, seed):
    x = rand(3 * d, d, seed=seed)
    return (x.T @ x / x.shape[0]).float()


@pytest.mark.parametrize("objective", ["fisher", "kfac"])
def test_mats_zero_statistics_in_every_model_keep_the_start(tmp_path, objective):
    base = {"w": rand(4, 3, seed=0).float(), "u": rand(4, 3, seed=1).float(), "v": rand(4, seed=2).float()}
    models = [{k: (v.double() + 0.2 * rand(*v.shape, seed=10 * i + j)).float() for j, (k, v) in enumerate(base.items())}
              for i in range(1, 4)]
    paths = [str(save_safetensors_dir(tmp_path / f"m{i}", m)) for i, m in enumerate(models)]
    bpath = str(save_safetensors_dir(tmp_path / "base", base))
    if objective == "fisher":
        fu = [(rand(4, 3, seed=30 + i).abs() + 0.1).float() for i in range(3)]
        stats = [{"fisher": {"w": torch.zeros(4, 3), "u": f, "v": torch.ones(4)}} for f in fu]
    else:
        stats = [{"gram_in": {"w": torch.zeros(3, 3), "u": spd(3, 40 + i)},
                  "gram_out": {"w": torch.zeros(4, 4), "u": spd(4, 50 + i)}} for i in range(3)]
    stores = [write_store(tmp_path / f"s{i}.zarr", st) for i, st in enumerate(stats)]
    out, report = tmp_path / "out", tmp_path / "report.json"
    res = run_cli(["run", "--method", "mats", "--inputs", ",".join(paths), "--base", bpath,
                   "--stats", ",".join(stores), "-p", f"objective={objective}", "--output", out, "--report", report],
                  cwd=tmp_path)
    assert res.returncode == 0, str(res)
    got = load_file(str(out / "model.safetensors"))
    start = base["w"].double() + 0.3 * sum(m["w"].double() - base["w"].double() for m in models)
    assert bool(got["w"].abs().min() > 0)  # never zeros
    torch.testing.assert_close(got["w"].double(), start, rtol=1e-6, atol=1e-6)
    if objective == "fisher":  # the block with statistics is solved, not kept
        want = sum(f.double() * m["u"].double() for f, m in zip(fu, models)) / sum(f.double() for f in fu)
        torch.testing.assert_close(got["u"].double(), want, rtol=1e-4, atol=1e-4)
    rep = json.loads(report.read_text())
    blocks = {b["name"]: b for b in rep["blocks"]}
    assert blocks["w"]["cg_no_information"] is True and blocks["w"]["cg_iterations"] == 0
    assert blocks["w"]["cg_residual"] == 0.0
    assert blocks["u"]["cg_no_information"] is False and blocks["u"]["cg_iterations"] > 0
    assert "1 carried no information" in res.stdout and "0 did not reach tol" in res.stdout, str(res)
    assert rep["summary"] == res.stdout.splitlines()
    prov = json.loads((out / "tensormerge.json").read_text())
    assert prov["blocks"]["w"]["cg_no_information"] is True
