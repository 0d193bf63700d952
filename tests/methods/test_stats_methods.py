"""fisher, regmean, mats and ubgm, merged through the engine, against float64 computations
written here: formulas, least squares, explicit Kronecker solves and worked_examples.py."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tensormerge.api import MergeSpec, merge
from tensormerge.errors import BudgetError

from tests.helpers import write_store

F64 = torch.float64


def save_model(d, sd):
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    return str(d)


def run(tmp_path, method, models, stats, base=None, base_stats=None, tag="out", **kw):
    """Write models and stores, merge, return (merged tensors, report)."""
    paths = [save_model(tmp_path / f"{tag}-m{i}", sd) for i, sd in enumerate(models)]
    stores = [write_store(tmp_path / f"{tag}-s{i}.zarr", st) for i, st in enumerate(stats)] if stats else []
    bpath = save_model(tmp_path / f"{tag}-base", base) if base is not None else None
    bstats = write_store(tmp_path / f"{tag}-base.zarr", base_stats) if base_stats is not None else None
    out = tmp_path / tag
    params = kw.pop("params", {})
    rep = merge(MergeSpec(method, paths, str(out), base=bpath, stats=stores, base_stats=bstats, params=params,
                          quiet=True, **kw))
    return load_file(str(out / "model.safetensors")), rep


def rand(*shape, seed=0, scale=1.0):
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def spd(d, seed, n=None):
    x = rand(n or 3 * d, d, seed=seed)
    return (x.T @ x / x.shape[0]).float().double()  # representable in float32, as stored


# ----------------------------------------------------------------------------- fisher
def fisher_formula(thetas, fishers, w, floor, mode, floored):
    num, den = 0, 0
    for t, f, wi, fl in zip(thetas, fishers, w, floored):
        f = f.double()
        if fl:
            f = f.clamp(min=floor) if mode == "clamp" else f + floor
        num = num + wi * f * t
        den = den + wi * f
    return num / den


@pytest.mark.parametrize("mode", ["clamp", "add"])
@pytest.mark.parametrize("fallback", ["average", "first"])
def test_fisher_against_formula(tmp_path, mode, fallback):
    shapes = {"a.weight": (9, 7), "a.bias": (9,), "s": ()}
    models = [{k: rand(*s, seed=i * 10 + j) for j, (k, s) in enumerate(shapes.items())} for i in range(3)]
    fishers = []
    for i in range(3):
        f = {k: rand(*s, seed=100 + i * 10 + j).abs() ** 3 for j, (k, s) in enumerate(shapes.items())}
        f["a.weight"][0] = 0.0  # a row no model saw: all-zero entries exercise the fallback
        fishers.append(f)
    w = [0.5, 0.3, 0.2]
    got, rep = run(tmp_path, "fisher", models, [{"fisher": f} for f in fishers],
                   params={"weights": "0.5,0.3,0.2", "floor": "1e-6", "floor_mode": mode, "fallback": fallback})
    floored = [True] * 3 if fallback == "average" else [True, False, False]
    for k in shapes:
        want = fisher_formula([m[k] for m in models], [f[k].float() for f in fishers], w, 1e-6, mode, floored)
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-12)
    row0 = got["a.weight"][0]
    if fallback == "first":
        torch.testing.assert_close(row0, models[0]["a.weight"][0], rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(row0, sum(wi * m["a.weight"][0] for wi, m in zip(w, models)), rtol=1e-9, atol=1e-12)
    assert rep["fallback_blocks"] == {}


@pytest.mark.parametrize("fallback", ["average", "first"])
def test_fisher_floor_zero_with_all_zero_entries_is_a_named_error(tmp_path, fallback):
    """floor=0 disables the floor (the help: "0/0 entries then fail"): where every Fisher is zero
    the merge is 0/0, and the error says so, naming the tensor and the way out, not "non-finite
    input values". Fishers zero at some entries in one model only still merge, by the formula."""
    from tensormerge.errors import InputError

    ws = [rand(3, 4, seed=i) for i in range(2)]
    fw = [(rand(3, 4, seed=40 + i).abs() + 0.1).float() for i in range(2)]
    fw[0][0, :2] = 0.0
    got, _ = run(tmp_path, "fisher", [{"w": w} for w in ws], [{"fisher": {"w": f}} for f in fw],
                 params={"floor": "0", "fallback": fallback}, tag="ok")
    want = sum(f.double() * w for f, w in zip(fw, ws)) / sum(f.double() for f in fw)
    torch.testing.assert_close(got["w"], want, rtol=1e-6, atol=1e-9)
    fw[1][0, 1] = 0.0
    with pytest.raises(InputError) as e:
        run(tmp_path, "fisher", [{"w": w} for w in ws], [{"fisher": {"w": f}} for f in fw],
            params={"floor": "0", "fallback": fallback})
    msg = str(e.value)
    assert "'w'" in msg and "floor=0" in msg and "every" in msg and "\n" not in msg and "non-finite" not in msg


def test_fisher_worked_example_and_equal_fishers(tmp_path):
    models = [{"x": torch.tensor([1.0], dtype=F64)}, {"x": torch.tensor([3.0], dtype=F64)}]
    got, _ = run(tmp_path, "fisher", models, [{"fisher": {"x": torch.tensor([3.0])}}, {"fisher": {"x": torch.tensor([1.0])}}])
    assert float(got["x"]) == pytest.approx(1.5, abs=1e-12)
    zero = [{"fisher": {"x": torch.zeros(1)}}] * 2
    got, _ = run(tmp_path, "fisher", models, zero, tag="t", params={"floor": "1e-6", "fallback": "first"})
    assert float(got["x"]) == pytest.approx(1.0, abs=1e-12)
    got, _ = run(tmp_path, "fisher", models, zero, tag="u")
    assert float(got["x"]) == pytest.approx(2.0, abs=1e-12)
    # equal (non-trivial) Fishers: the average, whatever they are
    f = rand(6, 5, seed=3).abs().float()
    ms = [{"w": rand(6, 5, seed=i)} for i in range(3)]
    got, _ = run(tmp_path, "fisher", ms, [{"fisher": {"w": f}}] * 3, tag="v")
    torch.testing.assert_close(got["w"], sum(m["w"] for m in ms) / 3, rtol=1e-9, atol=1e-12)


def test_fisher_normalize_uses_global_norms(tmp_path):
    shapes = {"a": (8, 3), "b": (5,)}
    models = [{k: rand(*s, seed=i * 7 + j) for j, (k, s) in enumerate(shapes.items())} for i in range(2)]
    fishers = [{k: (rand(*s, seed=50 + i * 7 + j).abs() * (1 + 9 * i)).float() for j, (k, s) in enumerate(shapes.items())}
               for i in range(2)]
    got, rep = run(tmp_path, "fisher", models, [{"fisher": f} for f in fishers], params={"normalize": "true"})
    norms = [torch.sqrt(sum((f[k].double() ** 2).sum() for k in shapes)) for f in fishers]
    w = [0.5 / n for n in norms]
    for k in shapes:
        want = fisher_formula([m[k] for m in models], [f[k] for f in fishers], w, 1e-8, "clamp", [True, True])
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-12)
    assert [p["name"] for p in rep["passes"]] == ["fisher-norms"]


def test_fisher_normalize_with_negative_zero_entries_cli(tmp_path):
    """−0.0 is a valid zero Fisher (a squared gradient that underflowed through a negation, a
    NumPy round trip): normalize=true reads its bit pattern for the global norms, and must
    count it as 0, not crash on its sign bit. Through the CLI, against the float64 formula."""
    from tests import helpers as H

    shapes = {"a": (8, 3), "b": (5,)}
    models = [{k: rand(*s, seed=i * 7 + j) for j, (k, s) in enumerate(shapes.items())} for i in range(2)]
    fishers = [{k: (rand(*s, seed=50 + i * 7 + j).abs() * (1 + 9 * i)).float() for j, (k, s) in enumerate(shapes.items())}
               for i in range(2)]
    fishers[0]["a"][2, :] = -0.0  # a row no example reached, in both models' Fishers
    fishers[1]["a"][2, 1] = -0.0
    fishers[1]["b"][0] = -0.0
    assert torch.signbit(fishers[0]["a"][2]).all()
    paths = [save_model(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    stores = [write_store(tmp_path / f"s{i}.zarr", {"fisher": f}) for i, f in enumerate(fishers)]
    from tensormerge.stats.store import StatsStore

    assert torch.signbit(StatsStore(stores[0]).read("fisher", "a")[2]).all()  # the store kept the sign bit
    out = tmp_path / "out"
    res = H.run_cli(["run", "-q", "-m", "fisher", "-i", ",".join(paths), "--stats", ",".join(stores), "-o", out,
                     "-p", "normalize=true"], cwd=tmp_path)
    assert res.returncode == 0, str(res)
    got = load_file(str(out / "model.safetensors"))
    zeroed = [{k: v.abs() for k, v in f.items()} for f in fishers]  # −0.0 -> 0.0: the same Fisher
    norms = [torch.sqrt(sum((f[k].double() ** 2).sum() for k in shapes)) for f in zeroed]
    w = [0.5 / n for n in norms]
    for k in shapes:
        want = fisher_formula([m[k] for m in models], [f[k] for f in zeroed], w, 1e-8, "clamp", [True, True])
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-12)


def test_fisher_missing_key_falls_back_to_average_and_is_reported(tmp_path):
    models = [{"a": rand(4, 3, seed=i), "b": rand(2, seed=9 + i)} for i in range(2)]
    stats = [{"fisher": {"a": rand(4, 3, seed=20).abs().float(), "b": rand(2, seed=21).abs().float()}},
             {"fisher": {"a": rand(4, 3, seed=22).abs().float()}}]
    got, rep = run(tmp_path, "fisher", models, stats)
    assert list(rep["fallback_blocks"]) == ["b"] and "s1.zarr" in rep["fallback_blocks"]["b"]
    torch.testing.assert_close(got["b"], (models[0]["b"] + models[1]["b"]) / 2, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- regmean
def test_regmean_equals_least_squares_on_the_union(tmp_path):
    """Linear regressions fitted on disjoint data sets, merged with their input Grams (α = 1),
    equal the regression fitted on all the data: as sums, and as means over equal-sized sets."""
    d_in, d_out, n = 5, 3, 200
    xs = [rand(n, d_in, seed=1), rand(n, d_in, seed=2) * torch.tensor([1.0, 0.3, 2.0, 1.0, 0.5], dtype=F64),
          rand(n, d_in, seed=3) + 0.5]
    ys = [x @ rand(d_out, d_in, seed=10 + i).T + 0.1 * rand(n, d_out, seed=20 + i) for i, x in enumerate(xs)]
    ws = [torch.linalg.lstsq(x, y).solution.T for x, y in zip(xs, ys)]
    union = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    for label, norm in (("sum", 1.0), ("mean", float(n))):
        # Grams scaled so float32 storage keeps them exact enough; the ratio between models is what counts
        grams = [{"gram_in": {"lin.weight": (x.T @ x / norm).float()}} for x in xs]
        got, rep = run(tmp_path, "regmean", [{"lin.weight": w} for w in ws], grams, tag=label)
        torch.testing.assert_close(got["lin.weight"], union, rtol=2e-5, atol=2e-6)
        assert rep["fallback_blocks"] == {}


def test_regmean_identical_grams_average_and_diagonal_alpha0(tmp_path):
    ws = [rand(4, 6, seed=i) for i in range(3)]
    g = spd(6, seed=7)
    got, _ = run(tmp_path, "regmean", [{"w": w} for w in ws], [{"gram_in": {"w": g.float()}}] * 3)
    torch.testing.assert_close(got["w"], sum(ws) / 3, rtol=1e-5, atol=1e-6)
    grams = [spd(6, seed=20 + i) for i in range(3)]
    got, _ = run(tmp_path, "regmean", [{"w": w} for w in ws], [{"gram_in": {"w": gi.float()}} for gi in grams],
                 tag="diag", params={"alpha": "0"})
    diag = [gi.diagonal() for gi in grams]
    want = sum(w * d for w, d in zip(ws, diag)) / sum(diag)
    torch.testing.assert_close(got["w"], want, rtol=1e-5, atol=1e-6)


def test_regmean_worked_example(tmp_path):
    rng = np.random.default_rng(0)
    d_in, d_out, n = 3, 2, 50
    X1 = rng.normal(size=(n, d_in))
    X2 = rng.normal(size=(n, d_in)) * np.array([1.0, 0.1, 2.0])
    W1 = rng.normal(size=(d_out, d_in))
    W2 = rng.normal(size=(d_out, d_in))
    G1, G2 = X1.T @ X1 / n, X2.T @ X2 / n
    expected = {  # worked_examples.py, printed to 6 decimals
        1.0: [[0.596326, 0.667419, 0.176811], [-1.776964, 0.024431, -0.531814]],
        0.5: [[0.58201, 0.641417, 0.157808], [-1.790134, 0.137623, -0.461458]],
        0.0: [[0.567645, 0.613549, 0.139003], [-1.802601, 0.250898, -0.39051]],
    }
    for a, want in expected.items():
        got, _ = run(tmp_path, "regmean", [{"w": torch.tensor(W1)}, {"w": torch.tensor(W2)}],
                     [{"gram_in": {"w": torch.tensor(G1)}}, {"gram_in": {"w": torch.tensor(G2)}}],
                     tag=f"a{a}", params={"alpha": str(a)})
        torch.testing.assert_close(got["w"], torch.tensor(want, dtype=F64), rtol=0, atol=2e-6)


def test_regmean_dead_inputs_singular_sums_and_other_parameters(tmp_path):
    ws = [rand(5, 4, seed=i) for i in range(2)]
    bias = [rand(5, seed=30 + i) for i in range(2)]
    # input 2 never varies in any model: its column is the average; inputs 0,1,3 are collinear in
    # both models (rank 2 of 3), so the sum is singular: the deviation from the average is solved
    # for, and the average is kept along the direction no Gram determines
    grams = []
    for i in range(2):
        x = rand(40, 2, seed=40 + i)
        feats = torch.stack([x[:, 0], x[:, 1], torch.zeros(40, dtype=F64), x[:, 0] + x[:, 1]], 1)
        grams.append((feats.T @ feats / 40).float().double())
    got, _ = run(tmp_path, "regmean", [{"w": w, "b": b} for w, b in zip(ws, bias)],
                 [{"gram_in": {"w": g.float()}} for g in grams])
    live = [0, 1, 3]
    wbar = (ws[0] + ws[1]) / 2
    s = sum(g[live][:, live] for g in grams)
    m = sum((w - wbar)[:, live] @ g[live][:, live] for w, g in zip(ws, grams))
    want_live = wbar[:, live] + m @ torch.linalg.pinv(s, hermitian=True, rtol=1e-6)  # float32 noise is not signal
    torch.testing.assert_close(got["w"][:, live], want_live, rtol=1e-5, atol=1e-5)
    null = torch.tensor([1.0, 1.0, -1.0], dtype=F64) / 3**0.5  # x0 + x1 − x3 = 0 in both models
    torch.testing.assert_close(got["w"][:, live] @ null, wbar[:, live] @ null, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got["w"][:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["b"], (bias[0] + bias[1]) / 2, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- mats
def cg64(matvec, b, x0, iters, tol):
    """Textbook CG in float64 over flat vectors, written independently of the engine's."""
    x = x0.clone()
    r = b - matvec(x)
    p = r.clone()
    rr = float(r @ r)
    bn = float(b.norm())
    k = 0
    while k < iters and rr ** 0.5 > tol * bn:
        ap = matvec(p)
        a = rr / float(p @ ap)
        x = x + a * p
        r = r - a * ap
        new = float(r @ r)
        p = r + (new / rr) * p
        rr = new
        k += 1
    return x, float((b - matvec(x)).norm()) / bn


def kfac_system(ws, grams_in, grams_out, alpha=1.0):
    """Σ_i (B_i ⊗ A_i) on row-major vec(W) and its right-hand side, formed explicitly."""
    def s(m):
        return alpha * m + (1 - alpha) * torch.diag(torch.diagonal(m))
    K = sum(torch.kron(s(b), s(a)) for a, b in zip(grams_in, grams_out))
    rhs = sum(torch.kron(s(b), s(a)) @ w.reshape(-1) for a, b, w in zip(grams_in, grams_out, ws))
    return K, rhs


def test_mats_kfac_converges_to_the_direct_solve(tmp_path):
    out_d, in_d = 4, 3
    ws = [rand(out_d, in_d, seed=i) for i in range(3)]
    ga = [spd(in_d, seed=10 + i) for i in range(3)]
    gb = [spd(out_d, seed=20 + i) for i in range(3)]
    base = {"w": rand(out_d, in_d, seed=99), "v": rand(out_d, seed=98)}
    models = [{"w": w, "v": rand(out_d, seed=90 + i)} for i, w in enumerate(ws)]
    stats = [{"gram_in": {"w": a.float()}, "gram_out": {"w": b.float()}} for a, b in zip(ga, gb)]
    for alpha in (1.0, 0.6):
        got, rep = run(tmp_path, "mats", models, stats, base=base, tag=f"k{alpha}",
                       params={"precision": "float64", "tol": "1e-13", "alpha": str(alpha)})
        K, rhs = kfac_system(ws, ga, gb, alpha)
        want = torch.linalg.solve(K, rhs).reshape(out_d, in_d)
        torch.testing.assert_close(got["w"], want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(got["v"], sum(m["v"] for m in models) / 3, rtol=1e-12, atol=1e-12)
        block = next(b for b in rep["blocks"] if b["name"] == "w")
        assert block["cg_iterations"] <= 2 * out_d * in_d and block["cg_residual"] <= 1e-13
        assert rep["fallback_blocks"] == {}  # biases are averaged by definition, not for lack of stats


def test_mats_worked_example_kfac():
    """worked_examples.py §6: the 3->2 layer with two models and hand-picked output Grams."""
    from tensormerge.kernels import linalg as L

    rng = np.random.default_rng(0)
    X1 = rng.normal(size=(50, 3))
    X2 = rng.normal(size=(50, 3)) * np.array([1.0, 0.1, 2.0])
    W1, W2 = rng.normal(size=(2, 3)), rng.normal(size=(2, 3))
    A = torch.tensor(np.stack([X1.T @ X1 / 50, X2.T @ X2 / 50]))
    B = torch.tensor([[[2.0, 0.3], [0.3, 1.0]], [[0.5, -0.1], [-0.1, 1.5]]], dtype=F64)
    Ws = torch.tensor(np.stack([W1, W2]))
    res = L.conjugate_gradient(L.kfac_apply(A, B), L.kfac_rhs(A, B, Ws), Ws.mean(0), 100, 1e-12)
    want = torch.tensor([[0.618822, 0.68851, 0.344683], [-1.254824, -0.028362, -0.504168]], dtype=F64)
    torch.testing.assert_close(res.x, want, rtol=0, atol=2e-6)
    assert res.iterations <= 6


@pytest.mark.parametrize("init", ["task_arithmetic", "average", "base", "zeros", "path"])
def test_mats_capped_iterations_residual_and_inits(tmp_path, init):
    out_d, in_d = 5, 4
    ws = [rand(out_d, in_d, seed=i) for i in range(3)]
    ga = [spd(in_d, seed=10 + i) for i in range(3)]
    gb = [spd(out_d, seed=20 + i) for i in range(3)]
    base = rand(out_d, in_d, seed=50)
    start = rand(out_d, in_d, seed=51)
    x0 = {"task_arithmetic": base + 0.3 * sum(w - base for w in ws), "average": sum(ws) / 3, "base": base,
          "zeros": torch.zeros_like(base), "path": start}[init]
    init_param = save_model(tmp_path / "start", {"w": start}) if init == "path" else init
    got, rep = run(tmp_path, "mats", [{"w": w} for w in ws],
                   [{"gram_in": {"w": a.float()}, "gram_out": {"w": b.float()}} for a, b in zip(ga, gb)],
                   base={"w": base}, params={"precision": "float64", "iterations": "3", "init": init_param})
    K, rhs = kfac_system(ws, ga, gb)
    x, residual = cg64(lambda v: K @ v, rhs, x0.reshape(-1), 3, 1e-5)
    torch.testing.assert_close(got["w"].reshape(-1), x, rtol=1e-9, atol=1e-10)
    block = rep["blocks"][0]
    assert block["cg_iterations"] == 3
    mine = float((rhs - K @ got["w"].reshape(-1)).norm() / rhs.norm())
    assert block["cg_residual"] == pytest.approx(mine, rel=1e-6) and mine == pytest.approx(residual, rel=1e-6)


def test_mats_regmean_fisher_blockwise_objectives(tmp_path):
    ws = [rand(3, 4, seed=i) for i in range(2)]
    vs = [rand(5, seed=10 + i) for i in range(2)]
    ga = [spd(4, seed=20 + i) for i in range(2)]
    fb = [spd(5, seed=30 + i) for i in range(2)]
    fw = [(rand(3, 4, seed=40 + i).abs() + 0.1).float().double() for i in range(2)]
    models = [{"w": w, "v": v} for w, v in zip(ws, vs)]
    p = {"precision": "float64", "tol": "1e-13", "init": "average"}
    got, _ = run(tmp_path, "mats", models, [{"gram_in": {"w": g.float()}} for g in ga], tag="rm",
                 params={**p, "objective": "regmean"})
    want = sum(w @ g for w, g in zip(ws, ga)) @ torch.linalg.inv(sum(ga))
    torch.testing.assert_close(got["w"], want, rtol=1e-9, atol=1e-10)
    got, _ = run(tmp_path, "mats", models, [{"fisher_block": {"v": f.float()}} for f in fb], tag="bw",
                 params={**p, "objective": "blockwise", "alpha": "0.5"})
    sc = [0.5 * f + 0.5 * torch.diag(torch.diagonal(f)) for f in fb]
    want = torch.linalg.solve(sum(sc), sum(f @ v for f, v in zip(sc, vs)))
    torch.testing.assert_close(got["v"], want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got["w"], sum(ws) / 2, rtol=1e-12, atol=1e-12)  # matrices: average
    got, _ = run(tmp_path, "mats", models, [{"fisher": {"w": f.float(), "v": torch.ones(5)}} for f in fw], tag="fi",
                 params={**p, "objective": "fisher", "tol": "1e-14"})
    torch.testing.assert_close(got["w"], sum(f * w for f, w in zip(fw, ws)) / sum(fw), rtol=1e-9, atol=1e-10)


def test_mats_tiny_statistics_are_solved_not_zeroed(tmp_path):
    """Fishers near 1e-30 (F·θ ~ 1e-30) and K-FAC factors near 1e-16 (B W A ~ 1e-32): their
    squares underflow float32, but they are information all the same, at the default precision."""
    ws = [rand(4, 3, seed=i) for i in range(3)]
    base = rand(4, 3, seed=9)
    fw = [((rand(4, 3, seed=40 + i).abs() + 0.5) * 1e-30).float().double() for i in range(3)]
    got, rep = run(tmp_path, "mats", [{"w": w} for w in ws], [{"fisher": {"w": f.float()}} for f in fw],
                   base={"w": base}, tag="fi", params={"objective": "fisher", "tol": "1e-6"})
    want = sum(f * w for f, w in zip(fw, ws)) / sum(fw)
    torch.testing.assert_close(got["w"], want, rtol=1e-4, atol=1e-5)
    assert not rep["blocks"][0]["cg_no_information"] and rep["blocks"][0]["cg_residual"] <= 1e-6
    ga = [(spd(3, seed=10 + i) * 1e-16).float().double() for i in range(3)]
    gb = [(spd(4, seed=20 + i) * 1e-16).float().double() for i in range(3)]
    got, rep = run(tmp_path, "mats", [{"w": w} for w in ws],
                   [{"gram_in": {"w": a.float()}, "gram_out": {"w": b.float()}} for a, b in zip(ga, gb)],
                   base={"w": base}, tag="kf")
    K, rhs = kfac_system(ws, ga, gb)
    want = torch.linalg.solve(K, rhs).reshape(4, 3)
    torch.testing.assert_close(got["w"], want, rtol=1e-3, atol=1e-3)
    assert not rep["blocks"][0]["cg_no_information"] and rep["blocks"][0]["cg_residual"] <= 1e-5


@pytest.mark.parametrize("objective", ["kfac", "fisher"])
def test_mats_statistics_zero_in_some_models_solve_with_the_others(tmp_path, objective):
    """Model 0's statistics are exactly zero for w: C_0 = 0, so the system is the others' alone."""
    ws = [rand(4, 3, seed=i) for i in range(3)]
    base = rand(4, 3, seed=9)
    if objective == "kfac":
        ga = [torch.zeros(3, 3, dtype=F64)] + [spd(3, seed=10 + i) for i in range(1, 3)]
        gb = [spd(4, seed=20 + i) for i in range(3)]
        stats = [{"gram_in": {"w": a.float()}, "gram_out": {"w": b.float()}} for a, b in zip(ga, gb)]
        K, rhs = kfac_system(ws[1:], ga[1:], gb[1:])
        want = torch.linalg.solve(K, rhs).reshape(4, 3)
    else:
        fw = [torch.zeros(4, 3, dtype=F64)] + [(rand(4, 3, seed=40 + i).abs() + 0.1).float().double()
                                               for i in range(1, 3)]
        stats = [{"fisher": {"w": f.float()}} for f in fw]
        want = sum(f * w for f, w in zip(fw[1:], ws[1:])) / sum(fw[1:])
    got, rep = run(tmp_path, "mats", [{"w": w} for w in ws], stats, base={"w": base},
                   params={"objective": objective, "precision": "float64", "tol": "1e-13"})
    torch.testing.assert_close(got["w"], want, rtol=1e-9, atol=1e-10)
    assert not rep["blocks"][0]["cg_no_information"] and rep["blocks"][0]["cg_iterations"] > 0


def test_mats_block_over_budget_names_the_bytes(tmp_path):
    ws = [rand(64, 64, seed=i) for i in range(2)]
    g = spd(64, seed=3).float()
    with pytest.raises(BudgetError, match=r"block 'w' cannot be split and needs [0-9.]+ [KM]iB"):
        run(tmp_path, "mats", [{"w": w} for w in ws], [{"gram_in": {"w": g}, "gram_out": {"w": g}}] * 2,
            params={"init": "average"}, max_memory="64KiB")


# ----------------------------------------------------------------------------- ubgm
def ubgm_formula(base, thetas, hs, h0, alpha, d0, s0, st):
    hbar = alpha * sum(s * h for s, h in zip(st, hs)) + s0 * h0 + d0
    return base + alpha * sum(((s * h + s0 * h0 + d0) / hbar) * (t - base) for s, h, t in zip(st, hs, thetas))


def test_ubgm_against_formula_and_special_cases(tmp_path):
    base = {"w": rand(6, 4, seed=0), "b": rand(6, seed=1)}
    models = [{k: v + 0.1 * rand(*v.shape, seed=10 * i + j) for j, (k, v) in enumerate(base.items())} for i in range(1, 4)]
    hs = [{k: rand(*v.shape, seed=100 + 10 * i + j).abs().float() for j, (k, v) in enumerate(base.items())}
          for i in range(3)]
    h0 = {k: rand(*v.shape, seed=200 + j).abs().float() for j, (k, v) in enumerate(base.items())}
    params = {"alpha": "0.7", "delta0": "1e-3", "base_scale": "2", "scales": "1,3,0.5"}
    got, _ = run(tmp_path, "ubgm", models, [{"fisher": h} for h in hs], base=base, base_stats={"fisher": h0},
                 params=params)
    for k in base:
        want = ubgm_formula(base[k], [m[k] for m in models], [h[k].double() for h in hs], h0[k].double(), 0.7, 1e-3,
                            2.0, [1.0, 3.0, 0.5])
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-9)
    # H_t = 0: task arithmetic with λ = α (the base precision, here δ0 alone, dominates)
    zero = [{"fisher": {k: torch.zeros(v.shape) for k, v in base.items()}}] * 3
    got, _ = run(tmp_path, "ubgm", models, zero, base=base, tag="ta", params={"alpha": "0.4", "delta0": "1e-3"})
    for k in base:
        torch.testing.assert_close(got[k], base[k] + 0.4 * sum(m[k] - base[k] for m in models), rtol=1e-6, atol=1e-9)
    # H_0 = 0 and δ0 -> 0: Fisher averaging weighted by s_t
    got, _ = run(tmp_path, "ubgm", models, [{"fisher": h} for h in hs], base=base, tag="fa",
                 params={"delta0": "0", "scales": "1,3,0.5", "alpha": "0.5"})
    for k in base:
        f = [s * h[k].double() for s, h in zip([1.0, 3.0, 0.5], hs)]
        torch.testing.assert_close(got[k], sum(fi * m[k] for fi, m in zip(f, models)) / sum(f), rtol=1e-6, atol=1e-9)


def test_ubgm_without_fishers_takes_the_h_zero_limit_and_reports_missing_base_keys(tmp_path):
    """e: no store has it; b: one store lacks it -> both θ0 + α Σ τ (H_t = 0), listed as fallbacks.
    u: every model's store has it, the base's does not -> H0 = 0, listed as such; w: everything."""
    from tensormerge.api import plan

    shapes = {"w": (5, 3), "u": (4,), "b": (6,), "e": (3, 2)}
    base = {k: rand(*sh, seed=j) for j, (k, sh) in enumerate(shapes.items())}
    models = [{k: v + 0.1 * rand(*v.shape, seed=10 * i + j) for j, (k, v) in enumerate(base.items())}
              for i in range(1, 4)]
    hs = [{k: (rand(*shapes[k], seed=100 + 10 * i + j).abs() + 0.1).float() for j, k in enumerate(("w", "u", "b"))}
          for i in range(3)]
    del hs[1]["b"]
    h0 = {"w": (rand(5, 3, seed=200).abs() + 0.1).float()}
    params = {"alpha": "0.7", "delta0": "1e-3", "base_scale": "2"}
    got, rep = run(tmp_path, "ubgm", models, [{"fisher": h} for h in hs], base=base, base_stats={"fisher": h0},
                   params=params)
    for k in ("e", "b"):
        want = base[k] + 0.7 * sum(m[k] - base[k] for m in models)
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-9)
    zero = {"u": torch.zeros(4, dtype=F64), "w": h0["w"].double()}
    for k in ("w", "u"):
        want = ubgm_formula(base[k], [m[k] for m in models], [h[k].double() for h in hs], zero[k], 0.7, 1e-3, 2.0,
                            [1.0] * 3)
        torch.testing.assert_close(got[k], want, rtol=1e-6, atol=1e-9)
    assert sorted(rep["fallback_blocks"]) == ["b", "e"] and "s1.zarr" in rep["fallback_blocks"]["b"]
    assert list(rep["base_stats_missing"]) == ["u"] and "base.zarr" in rep["base_stats_missing"]["u"]
    block = {b["name"]: b for b in rep["blocks"]}
    assert "taken as zero" in block["u"]["base_stats_missing"] and "base_stats_missing" not in block["w"]
    paths = [str(tmp_path / f"out-m{i}") for i in range(3)]
    text = plan(MergeSpec("ubgm", paths, None, base=str(tmp_path / "out-base"), params=params,
                          stats=[str(tmp_path / f"out-s{i}.zarr") for i in range(3)],
                          base_stats=str(tmp_path / "out-base.zarr")))
    assert "2 merged as θ0 + α Σ τ (H = 0) for lack of statistics" in text
    assert "1 without base statistics, taken as zero" in text and "base statistics u: no fisher in" in text


@pytest.mark.parametrize("params", [{"delta0": "0"}, {"delta0": "0", "alpha": "0"}, {"delta0": "0", "alpha": "0.6"},
                                    {"delta0": "0", "scales": "0,0"}, {"delta0": "0", "alpha": "0", "scales": "2,0"}])
@pytest.mark.parametrize("with_base", [False, True])
def test_ubgm_delta0_zero_takes_the_limit_where_hbar_is_zero(tmp_path, params, with_base):
    """δ0 = 0 (accepted, the research code's default) with Fishers zero at some entries in every
    model (and H_0 zero there): H̄ = 0, and the δ0 -> 0⁺ limit applies. There every weight
    (s_t H_t + s_0 H_0 + δ0)/H̄ with H_t = H_0 = 0 is δ0/δ0 = 1 (α > 0), so θ_0 + α Σ τ_t; with
    α = 0 the update α Σ (...) is 0 for every δ0 > 0, so θ_0. Elsewhere the formula with δ0 = 0."""
    base = {"w": rand(6, 4, seed=0)}
    models = [{"w": base["w"] + 0.1 * rand(6, 4, seed=10 + i)} for i in range(2)]
    mask = (torch.arange(24).reshape(6, 4) % 3 == 0)
    hs = [(rand(6, 4, seed=100 + i).abs() + 0.1).float() for i in range(2)]
    hs = [torch.where(mask, 0.0, h) for h in hs]
    h0 = torch.where(mask, 0.0, (rand(6, 4, seed=200).abs() + 0.1).float())
    alpha = float(params.get("alpha", 1.0))
    s = [float(x) for x in params.get("scales", "1,1").split(",")]
    got, _ = run(tmp_path, "ubgm", models, [{"fisher": {"w": h}} for h in hs], base=base, params=params,
                 base_stats={"fisher": {"w": h0}} if with_base else None)
    h0d = h0.double() if with_base else torch.zeros(6, 4, dtype=F64)
    b, th, hd = base["w"].double(), [m["w"].double() for m in models], [h.double() for h in hs]
    hbar = alpha * sum(si * h for si, h in zip(s, hd)) + h0d
    safe = torch.where(hbar == 0, 1.0, hbar)
    update = sum(torch.where(hbar == 0, 1.0, (si * h + h0d) / safe) * (t - b) for si, h, t in zip(s, hd, th))
    want = b + alpha * update
    assert (hbar == 0).any()
    assert torch.isfinite(got["w"]).all()
    torch.testing.assert_close(got["w"].double(), want, rtol=1e-6, atol=1e-9)


def test_ubgm_worked_example(tmp_path):
    got, _ = run(tmp_path, "ubgm", [{"x": torch.tensor([1.0], dtype=F64)}, {"x": torch.tensor([3.0], dtype=F64)}],
                 [{"fisher": {"x": torch.tensor([3.0])}}, {"fisher": {"x": torch.tensor([1.0])}}],
                 base={"x": torch.tensor([0.0], dtype=F64)}, base_stats={"fisher": {"x": torch.tensor([2.0])}},
                 params={"delta0": "0"})
    assert float(got["x"]) == pytest.approx(2.3333333333, abs=1e-9)


def test_mats_no_information_only_when_the_statistics_are_zero(tmp_path):
    """Models and base all zero with positive Fishers: b = 0 and A x0 = 0, but the statistics
    are not zero, so the block is not "statistics zero in every model" (the summary would lie);
    the solution is 0 all the same. With zero Fishers the flag is set, and the summary counts
    one block in the singular."""
    from tensormerge.methods.mats import cg_summary

    zero = torch.zeros(4, 3, dtype=F64)
    fw = [(rand(4, 3, seed=40 + i).abs() + 0.1).float() for i in range(2)]
    got, rep = run(tmp_path, "mats", [{"w": zero}] * 2, [{"fisher": {"w": f}} for f in fw], base={"w": zero},
                   params={"objective": "fisher"})
    assert torch.equal(got["w"], zero.to(got["w"].dtype))
    assert rep["blocks"][0]["cg_no_information"] is False
    assert "0 carried no information" in cg_summary(rep["blocks"], 1e-5)
    got, rep = run(tmp_path, "mats", [{"w": zero}] * 2, [{"fisher": {"w": torch.zeros(4, 3)}}] * 2,
                   base={"w": zero}, params={"objective": "fisher"}, tag="z")
    assert rep["blocks"][0]["cg_no_information"] is True
    line = cg_summary(rep["blocks"], 1e-5)
    assert line.startswith("mats: 1 block solved by CG,") and "1 carried no information" in line


def test_ubgm_refuses_a_negative_base_fisher_as_it_does_a_models(tmp_path):
    """H₀ is a Fisher too: a negative entry in --base-stats made every (H_t + H₀)/H̄ weight
    negative (a red team: tasks subtracted, exit 0); it is refused as a model store's is."""


    from tensormerge.errors import InputError

    base = {"w": torch.zeros(2, 3)}
    models = [{"w": torch.full((2, 3), v)} for v in (1.0, 3.0)]
    stats = [{"fisher": {"w": torch.ones(2, 3)}} for _ in models]
    with pytest.raises(InputError, match=r"base\.zarr: fisher/w has negative values"):
        run(tmp_path, "ubgm", models, stats, base=base, base_stats={"fisher": {"w": torch.full((2, 3), -1.5)}})
    got, _ = run(tmp_path, "ubgm", models, stats, base=base, base_stats={"fisher": {"w": torch.full((2, 3), 0.5)}},
                 tag="ok")
    assert torch.isfinite(got["w"]).all()


def test_mats_warns_when_cg_loses_its_way():
    """CG can drift in float arithmetic over thousands of iterations (a red team, float64 on a
    real GPT-2's K-FAC statistics: residual 3.6e-3 at 100 iterations, 0.99 at 20000, weights
    87254 from inputs of 0.19). Its residual is not monotone, but a final one ten times the lowest
    it reached (and above 1e-3) is that drift: such a block is named, and not told to raise
    iterations."""
    from tensormerge.kernels import linalg as L
    from tensormerge.methods import get_method
    from tensormerge.methods.mats import _lost

    a = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]], dtype=F64)
    b, x0 = torch.tensor([1.0, -2.0, 1.0], dtype=F64), torch.tensor([0.5, 0.0, 3.0], dtype=F64)
    seen = [float((b - a @ x0).norm() / b.norm())]
    for k in range(1, 4):
        res = L.conjugate_gradient(lambda v: a @ v, b, x0, k, 0.0)
        seen.append(float((b - a @ res.x).norm() / b.norm()))
        assert res.lowest_residual == pytest.approx(min(seen), rel=1e-9, abs=1e-12)
        assert not _lost(res)
    assert _lost(L.CGResult(x0, 9000, 0.99, lowest_residual=3.6e-3))
    assert not _lost(L.CGResult(x0, 10, 2e-4, lowest_residual=1e-6))  # below 1e-3: float32's usual gap

    m = get_method("mats")
    params = m.Params.from_strings("mats", {"tol": "1e-9", "iterations": "20000"}, 2)
    notes = {"a": {"cg_iterations": 20000, "cg_residual": 0.99, "cg_lost_ground": True},
             "b": {"cg_iterations": 20000, "cg_residual": 1e-4, "cg_lost_ground": False},
             "c": {"cg_iterations": 12, "cg_residual": 1e-10, "cg_lost_ground": False}}
    short, lost = m.run_warnings(params, notes)
    assert short.startswith("mats: 1 of 3 CG blocks stopped short of tol 1e-09") and "raise -p iterations" in short
    assert lost.startswith("mats: 1 of 3 CG blocks lost their way to rounding")
    assert "e.g. a: relative residual 9.9e-01 after 20000 iterations" in lost
    assert m.run_warnings(params, {"c": notes["c"]}) == []
