"""mergekit's methods (gta and its presets, slerp, model_stock) against float64 formulas written
here from mergekit 0.1.5's definitions (merge_methods/generalized_task_arithmetic.py, sparsify.py,
slerp.py, model_stock.py), with Python sorts for the rankings and the DARE hash in Python
integers for the random masks; degenerate inputs; row-chunk invariance; the command line."""

from __future__ import annotations

import math

import pytest
import torch

from tensormerge.errors import InputError, ParameterError
from tensormerge.kernels import reference as K
from tensormerge.methods import get_method
from tensormerge.methods.base import BlockData
from tests import helpers as H

PRESETS = {  # mergekit's registry: (sparsification, consensus, default normalize, default rescale)
    "dare_ties": ("random", "sum", False, True),
    "dare_linear": ("random", "none", False, True),
    "breadcrumbs": ("magnitude_outliers", "none", False, False),
    "breadcrumbs_ties": ("magnitude_outliers", "sum", False, False),
    "della": ("della_magprune", "sum", True, True),
    "della_linear": ("della_magprune", "none", False, True),
}


# ------------------------------------------------------------------------------ the formulas
def _fmix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def u32(seed: int, model: int, name: str, n: int) -> list[int]:
    """DARE's counter hash of elements 0..n-1 in Python integers (its keys from K.dare_keys)."""
    k1, k2 = K.dare_keys(seed, model, name)
    return [_fmix32(_fmix32((i & 0xFFFFFFFF) ^ k1) ^ (((i >> 32) * 0x27D4EB2F + k2) & 0xFFFFFFFF)) for i in range(n)]


def sparsify64(d: torch.Tensor, mode: str, density: float, *, gamma=0.01, epsilon=0.15, rescale=False,
               seed=0, model=0, name="t") -> torch.Tensor:
    """sparsify.py in float64; rankings by Python sorts with equal magnitudes in index order."""
    if mode == "none" or density >= 1:
        return d.clone()
    v = d.reshape(-1).tolist()
    n = len(v)
    keep = [0.0] * n
    if mode == "magnitude":
        if density <= 0:
            return torch.zeros_like(d)
        k = max(1, int(density * n))
        for j in sorted(range(n), key=lambda j: (-abs(v[j]), j))[:k]:
            keep[j] = 1.0
    elif mode == "magnitude_outliers":
        target, top = int(density * n), int(gamma * n)
        bot = max(0, n - target - top)
        for j in sorted(range(n), key=lambda j: (abs(v[j]), j))[bot:bot + target]:
            keep[j] = 1.0
    elif mode == "random":
        cut = int((1 - density) * 2**32)
        keep = [float(h >= cut) for h in u32(seed, model, name, n)]
    elif mode == "della_magprune":
        if density <= 0:
            return torch.zeros_like(d)
        rows = d.reshape(1, -1) if d.dim() < 2 else d.reshape(d.shape[0], d.shape[1], -1)
        h = u32(seed, model, name, n)
        probs = torch.empty(rows.shape, dtype=torch.float64)
        cols = rows.shape[1]
        for r in range(rows.shape[0]):
            for c in range(rows.shape[2] if rows.dim() == 3 else 1):
                line = rows[r, :, c] if rows.dim() == 3 else rows[r]
                order = sorted(range(cols), key=lambda j: (abs(float(line[j])), j))
                for q, j in enumerate(order):
                    p = density - epsilon + (q / (cols - 1) if cols > 1 else 0.5) * 2 * epsilon
                    if rows.dim() == 3:
                        probs[r, j, c] = p
                    else:
                        probs[r, j] = p
        keep = [float(hj / 2**32 >= 1 - p) for hj, p in zip(h, probs.reshape(-1).tolist())]
    masked = d * torch.tensor(keep, dtype=torch.float64).reshape(d.shape)
    if rescale:
        before, after = math.fsum(abs(x) for x in v), math.fsum(abs(x) for x in masked.reshape(-1).tolist())
        if before >= 1e-7 and after >= 1e-7:
            masked = masked * (before / after)
    return masked


def gta64(base, xs, *, sparsify="none", consensus="none", weights=None, density=None, lam=1.0, normalize=False,
          rescale=False, gamma=0.01, epsilon=0.15, seed=0, name="t") -> torch.Tensor:
    """generalized_task_arithmetic.merge_group in float64."""
    b = base.double()
    n = len(xs)
    w = weights or [1.0] * n
    dens = density or [1.0] * n
    deltas = [sparsify64(x.double() - b, sparsify, dens[i], gamma=gamma, epsilon=epsilon, rescale=rescale,
                         seed=seed, model=i, name=name) * w[i] for i, x in enumerate(xs)]
    if consensus == "none":
        mixed = sum(deltas)
        divisor = sum(w)
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    else:
        vote = sum(deltas) if consensus == "sum" else sum(torch.sign(d) for d in deltas)
        majority = torch.where(vote >= 0, 1.0, -1.0).double()
        masks = [(torch.sign(d) == majority).double() for d in deltas]
        mixed = sum(d * m for d, m in zip(deltas, masks))
        divisor = sum(wi * m for wi, m in zip(w, masks))
        divisor = torch.where(divisor == 0, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    return b + lam * mixed


def slerp64(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """slerp.py in float64 with math: mergekit 0.1.5 batches tensors along a new leading axis and
    reduces over everything else, so the angle is that of the whole flattened tensors."""
    x, y = v0.double().reshape(-1).tolist(), v1.double().reshape(-1).tolist()
    na = math.sqrt(math.fsum(v * v for v in x))
    nb = math.sqrt(math.fsum(v * v for v in y))
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = max(-1.0, min(1.0, math.fsum((p / na) * (q / nb) for p, q in zip(x, y))))
    if abs(dot) > 0.9995 or not x:
        ca, cb = 1 - t, t
    else:
        th = math.acos(dot)
        ca, cb = math.sin((1 - t) * th) / math.sin(th), math.sin(t * th) / math.sin(th)
    return torch.tensor([ca * p + cb * q for p, q in zip(x, y)], dtype=torch.float64).reshape(v0.shape)


def model_stock64(base, xs, filter_wise=False) -> torch.Tensor:
    """model_stock.py in float64."""
    shape = base.shape
    w0 = base.double()
    ws = [x.double() for x in xs]
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    off = [w - w0 for w in ws]
    cos = []
    for i in range(len(off)):
        for j in range(i + 1, len(off)):
            norm = torch.norm(off[i], dim=-1) * torch.norm(off[j], dim=-1)
            cos.append(((off[i] * off[j]).sum(-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    t = torch.where(den.abs() < 1e-6, 0.0, n * c / torch.where(den.abs() < 1e-6, 1.0, den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


# ------------------------------------------------------------------------------ direct calls
def run(method, inputs, base=None, name="t", **raw):
    """One block merged whole, its passes run over it first (as the engine does)."""
    m = get_method(method)
    params = m.Params.from_strings(method, {k: str(v) for k, v in raw.items()}, len(inputs))
    data = BlockData(name, inputs, base, tuple(inputs[0].shape))
    state: dict = {}
    for p in m.passes(params):
        acc = p.reduce(p.start(state), p.map(data, state), name)
        p.finish(p.end_block(acc, name, inputs[0].numel()), state)
    return m.merge(data, params, state)


def family(shape=(23, 17), n=3, seed=0, dtype=torch.float64, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    return base.to(dtype), [(base + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
                            for _ in range(n)]


def close(got, want, atol=1e-12):
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


SHAPES = [(23, 17), (31,), (4, 5, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsify", ["none", "magnitude", "random", "magnitude_outliers", "della_magprune"])
@pytest.mark.parametrize("consensus", ["none", "sum", "count"])
def test_gta_formula(shape, sparsify, consensus):
    """Non-default everything: per-model weights (one negative) and densities, λ, normalize, rescale."""
    base, xs = family(shape)
    raw = dict(sparsify=sparsify, consensus=consensus, weights="0.7,-0.4,1.3", density="0.35,0.6,0.8",
               normalize="true", rescale="true", seed=11, **{"lambda": 0.9})
    kw = dict(sparsify=sparsify, consensus=consensus, weights=[0.7, -0.4, 1.3], density=[0.35, 0.6, 0.8],
              lam=0.9, normalize=True, rescale=True, seed=11, name="blk")
    if sparsify == "magnitude_outliers":
        raw["gamma"], kw["gamma"] = "0.05,0.1,0.2", None
    if sparsify == "della_magprune":
        raw["epsilon"], kw["epsilon"] = "0.12", 0.12
    got = run("gta", xs, base, name="blk", **raw)
    if sparsify == "magnitude_outliers":  # per-model gamma: one model at a time
        b = base.double()
        w = [0.7, -0.4, 1.3]
        parts = [sparsify64(x.double() - b, sparsify, d, gamma=g, rescale=True) * wi
                 for x, d, g, wi in zip(xs, [0.35, 0.6, 0.8], [0.05, 0.1, 0.2], w)]
        want = _combine(b, parts, w, consensus, True, 0.9)
    else:
        want = gta64(base, xs, **kw)
    close(got, want)


def _combine(b, deltas, w, consensus, normalize, lam):
    """merge_group's combination of already weighted deltas (float64)."""
    if consensus == "none":
        mixed, divisor = sum(deltas), sum(w)
    else:
        vote = sum(deltas) if consensus == "sum" else sum(torch.sign(d) for d in deltas)
        majority = torch.where(vote >= 0, 1.0, -1.0).double()
        masks = [(torch.sign(d) == majority).double() for d in deltas]
        mixed = sum(d * m for d, m in zip(deltas, masks))
        divisor = sum(wi * m for wi, m in zip(w, masks))
        divisor = torch.where(divisor == 0, 1.0, divisor)
    return b + lam * (mixed / divisor if normalize else mixed)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_defaults_and_density(name):
    """Each preset at mergekit's defaults (density 1: no drop) and with a density (and gamma or
    epsilon where it has one) is gta with its sparsification, consensus, normalize and rescale."""
    sparsify, consensus, normalize, rescale = PRESETS[name]
    base, xs = family((19, 13))
    got = run(name, xs, base, name="w")
    close(got, gta64(base, xs, sparsify=sparsify, consensus=consensus, normalize=normalize, rescale=rescale))
    extra = {"gamma": "0.1"} if "breadcrumbs" in name else {"epsilon": "0.1"} if "della" in name else {}
    got = run(name, xs, base, name="w", density="0.4", weights="1,0.5,2", seed=3, **extra)
    kw = {k: float(v) for k, v in extra.items()}
    close(got, gta64(base, xs, sparsify=sparsify, consensus=consensus, normalize=normalize, rescale=rescale,
                     density=[0.4] * 3, weights=[1, 0.5, 2], seed=3, name="w", **kw))
    got = run(name, xs, base, name="w", density="0.4", normalize=str(not normalize), rescale=str(not rescale),
              **extra)
    close(got, gta64(base, xs, sparsify=sparsify, consensus=consensus, normalize=not normalize,
                     rescale=not rescale, density=[0.4] * 3, name="w", **kw))


def test_gta_defaults_are_task_arithmetic_with_lambda_one():
    """gta's defaults: no sparsification, no consensus, weights 1, no normalize: θ_0 + Σ τ_i;
    mergekit's ties (magnitude, sum, normalize) with weights 1 is the disjoint mean of the top-k."""
    base, xs = family((29, 7))
    b = base.double()
    close(run("gta", xs, base), b + sum(x.double() - b for x in xs))
    got = run("gta", xs, base, sparsify="magnitude", consensus="sum", normalize="true", density=0.3)
    tr = [sparsify64(x.double() - b, "magnitude", 0.3) for x in xs]
    sign = torch.where(sum(tr) >= 0, 1.0, -1.0).double()
    sel = [(torch.sign(t) == sign).double() for t in tr]
    count = sum(sel)
    close(got, b + sum(t * s for t, s in zip(tr, sel)) / torch.where(count == 0, 1.0, count))


def test_random_sparsify_is_dares_mask():
    """gta's random drop is DARE's hash mask with p = 1 − density: the same bits as `dare`."""
    base, xs = family((41, 9), dtype=torch.float32)
    got = run("gta", xs, base, name="x", sparsify="random", density=0.7, seed=5)
    want = run("dare", xs, base, name="x", p=0.3, seed=5, rescale="false", **{"lambda": 1.0})
    torch.testing.assert_close(got, want, rtol=0, atol=2e-7)
    assert torch.equal(K.random_keep(5, 1, "x", 17, 999, 0.7), K.dare_keep(5, 1, "x", 17, 999, 0.3))


def test_magnitude_exact_ties_go_by_index():
    """Equal magnitudes across the k-th place: the first in index order are kept (mergekit's
    argsort leaves the order unspecified; a stable sort, as torch's CPU sort, keeps these)."""
    base = torch.zeros(12, dtype=torch.float64)
    x = torch.tensor([0.5, -1, 1, 0.25, -1, 1, 2, 0, -1, 0.5, 1, -2], dtype=torch.float64)
    got = run("gta", [x], base, sparsify="magnitude", density=0.4)  # k = int(4.8) = 4: ±2, then two of the ±1s
    want = torch.tensor([0, -1, 1, 0, 0, 0, 2, 0, 0, 0, 0, -2], dtype=torch.float64)
    assert torch.equal(got, want)
    stable = torch.sort(x.abs(), descending=True, stable=True).indices[:4]
    assert sorted(stable.tolist()) == [1, 2, 6, 11]
    # breadcrumbs: n=12, density 0.5 -> 6 kept, gamma 0.1 -> 1 outlier, n_bot = 5 smallest dropped
    got = run("breadcrumbs", [x], base, density=0.5, gamma=0.1)
    order = sorted(range(12), key=lambda j: (abs(float(x[j])), j))[5:11]
    assert torch.equal(got != 0, torch.tensor([j in order for j in range(12)]))
    # gamma 0.05 on 12 entries: int(0.6) = 0 outliers, so the 6 largest (mergekit's [n_bot:-0]
    # would be empty and drop them all)
    got = run("breadcrumbs", [x], base, density=0.5, gamma=0.05)
    largest = sorted(range(12), key=lambda j: (abs(float(x[j])), j))[6:]
    assert torch.equal(got != 0, torch.tensor([j in largest for j in range(12)]))


@pytest.mark.parametrize("method", ["gta", *sorted(PRESETS)])
def test_zero_and_identical_task_vectors(method):
    """All models equal the base: the base, exactly. All models equal: with weights 1 and no
    normalize a sum (N τ); with normalize the model itself."""
    base, xs = family((9, 8), dtype=torch.float32)
    extra = {"sparsify": "magnitude", "consensus": "sum"} if method == "gta" else {}
    got = run(method, [base.clone() for _ in range(3)], base, density=0.5, **extra)
    assert torch.equal(got, base)
    same = [xs[0].clone() for _ in range(3)]
    got = run(method, same, base, density=1.0, normalize="true", **extra)
    torch.testing.assert_close(got, xs[0], rtol=0, atol=1e-6)


def test_density_zero_and_one():
    base, xs = family((9, 8))
    for method in ["gta", *PRESETS]:
        extra = {"sparsify": "magnitude"} if method == "gta" else {}
        assert torch.equal(run(method, xs, base, density=0.0, **extra), base)
    b = base.double()
    close(run("gta", xs, base, sparsify="magnitude", density=1.0), b + sum(x - b for x in xs))


def test_della_single_column_and_validation():
    """A single entry along axis 1 keeps with probability density (mergekit divides 0 by 0)."""
    base, xs = family((300, 1), n=1)
    got = run("della_linear", xs, base, density=0.5, epsilon=0.2, rescale="false")
    close(got, gta64(base, xs, sparsify="della_magprune", density=[0.5], epsilon=0.2))
    with pytest.raises(ParameterError, match="epsilon"):
        get_method("della").Params.from_strings("della", {"density": "0.9", "epsilon": "0.15"}, 2)
    with pytest.raises(ParameterError, match="gamma"):
        get_method("dare_ties").Params.from_strings("dare_ties", {"gamma": "0.1"}, 2)
    with pytest.raises(ParameterError, match="density"):
        get_method("gta").Params.from_strings("gta", {"density": "1.5"}, 2)
    with pytest.raises(ParameterError, match="2 values for 3 models"):
        get_method("gta").Params.from_strings("gta", {"weights": "1,2"}, 3)


def test_magnitude_refuses_nan():
    base, xs = family((5, 4), n=2)
    xs[1][2, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        run("gta", xs, base, name="w", sparsify="magnitude", density=0.5)


# ------------------------------------------------------------------------------ slerp
@pytest.mark.parametrize("shape", [(17, 11), (23,), (3, 4, 5)])
@pytest.mark.parametrize("t", [0.5, 0.3, 1.4])
def test_slerp_formula(shape, t):
    base, (x,) = family(shape, n=1, scale=1.0)
    close(run("slerp", [x], base, t=t), slerp64(t, base, x))
    a, b = family(shape, n=2, seed=4, scale=1.0)[1]
    close(run("slerp", [a, b], t=t), slerp64(t, a, b))
    close(run("slerp", [a, b]), slerp64(0.5, a, b))  # default t


def test_slerp_endpoints_parallel_and_zero_rows():
    base, (x,) = family((13, 9), n=1, scale=1.0, dtype=torch.bfloat16)
    assert torch.equal(run("slerp", [x], base, t=0.0).to(torch.bfloat16), base)
    assert torch.equal(run("slerp", [x], base, t=1.0).to(torch.bfloat16), x)
    v = torch.randn(6, 10, dtype=torch.float64)
    for other in (2.5 * v, -0.5 * v):  # parallel and antiparallel rows: linear interpolation
        close(run("slerp", [v, other], t=0.3), 0.7 * v + 0.3 * other)
    # per tensor, not per row: each row pair is (anti)parallel, the tensors are not
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    th = math.acos(1.0 / math.sqrt(2.0) / math.sqrt(5.0))
    want = (math.sin(0.5 * th) * a + math.sin(0.5 * th) * b) / math.sin(th)
    close(run("slerp", [a, b]), want, atol=1e-15)
    # a zero endpoint: its norm is taken as 1, so cos = 0 and θ = π/2, as in mergekit
    v = torch.randn(4, 3, dtype=torch.float64)
    close(run("slerp", [torch.zeros_like(v), v], t=0.3), math.sin(0.3 * math.pi / 2) * v, atol=1e-15)
    zero = torch.zeros(5, 4, dtype=torch.float64)
    close(run("slerp", [zero, zero.clone()], t=0.3), zero)


@pytest.mark.parametrize("t", [-0.5, 2.0])
def test_slerp_outside_0_1_extrapolates_as_mergekit(tmp_path, t):
    """mergekit 0.1.5 checks no range for t: sin((1 − t)θ)/sin θ and sin(tθ)/sin θ extrapolate
    along the great circle (and 1 − t, t along the line where the endpoints are parallel)."""
    base, (x,) = family((9, 7), n=1, scale=1.0)
    close(run("slerp", [x], base, t=t), slerp64(t, base, x))
    v = torch.randn(6, 10, dtype=torch.float64)
    close(run("slerp", [v, 2.5 * v], t=t), (1 - t) * v + t * 2.5 * v)
    base_path, ft_paths, bsd, fts = H.write_family(tmp_path / "m", n=1)
    out = tmp_path / "out"
    res = H.run_cli(["run", "-q", "-m", "slerp", "-b", base_path, "-i", ft_paths[0], "-o", out, "-p", f"t={t}"],
                    cwd=tmp_path)
    assert res.returncode == 0, str(res)
    for name, got in H.load_dir(out).items():
        if got.dtype.is_floating_point:
            H.assert_close(got, slerp64(t, bsd[name], fts[0][name]), bsd[name].dtype, name)


def test_slerp_inputs_and_base():
    m = get_method("slerp")
    with pytest.raises(ParameterError, match="two endpoints"):
        m.Params.from_strings("slerp", {}, 3)
    one = m.Params.from_strings("slerp", {}, 1)
    assert m.requires_base(one) and not m.requires_base(m.Params.from_strings("slerp", {}, 2))
    with pytest.raises(InputError, match="--base and two"):
        m.check_inputs(m.Params.from_strings("slerp", {}, 2), 2, True)


# ------------------------------------------------------------------------------ model_stock
@pytest.mark.parametrize("shape", [(15, 8), (21,), (3, 4, 5)])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_model_stock_formula(shape, filter_wise, n):
    base, xs = family(shape, n=n, seed=n)
    xs = [x + 0.05 * (k + 1) * (xs[0] - base) for k, x in enumerate(xs)]  # correlated task vectors
    close(run("model_stock", xs, base, filter_wise=str(filter_wise)), model_stock64(base, xs, filter_wise))


def test_model_stock_degenerate():
    base, xs = family((6, 5), n=2)
    assert torch.equal(run("model_stock", [base.clone(), base.clone()], base), base)  # zero task vectors: t = 0
    same = run("model_stock", [xs[0].clone(), xs[0].clone(), xs[0].clone()], base)  # cos 1: t = 1, the mean
    close(same, xs[0].double(), atol=1e-14)
    opposite = [xs[0], 2 * base - xs[0]]  # cos −1, N = 2: denominator 0, the base kept
    assert torch.equal(run("model_stock", opposite, base), base.double())
    with pytest.raises(ParameterError, match="at least two"):
        get_method("model_stock").Params.from_strings("model_stock", {}, 1)


# ------------------------------------------------------------------------------ the engine
CLI_CASES = [
    ("gta", ["sparsify=magnitude", "consensus=sum", "normalize=true", "density=0.5,0.3,0.7", "weights=1,0.5,2"]),
    ("dare_ties", ["density=0.6", "weights=0.5,1,1.5", "seed=4"]),
    ("dare_linear", ["density=0.4", "seed=2"]),
    ("breadcrumbs", ["density=0.8", "gamma=0.05"]),
    ("breadcrumbs_ties", ["density=0.6", "gamma=0.1"]),
    ("della", ["density=0.5", "epsilon=0.1", "seed=9"]),
    ("della_linear", ["density=0.7", "epsilon=0.2"]),
    ("model_stock", []),
    ("model_stock", ["filter_wise=true"]),
    ("slerp", ["t=0.3"]),
]


def _expected(method, opts, base, fts):
    kv = dict(o.split("=") for o in opts)
    out = {}
    for name, b in base.items():
        if not b.dtype.is_floating_point:
            continue
        xs = [ft[name] for ft in fts]
        if method == "model_stock":
            out[name] = model_stock64(b, xs, kv.get("filter_wise") == "true")
        elif method == "slerp":
            out[name] = slerp64(float(kv["t"]), b, xs[0])
        else:
            sparsify, consensus, normalize, rescale = PRESETS.get(method, ("", "", False, False))
            if method == "gta":
                sparsify, consensus, normalize = kv["sparsify"], kv["consensus"], kv["normalize"] == "true"
            n = len(xs)
            lists = {k: [float(v) for v in kv[k].split(",")] for k in ("density", "weights") if k in kv}
            lists = {k: v * n if len(v) == 1 else v for k, v in lists.items()}
            out[name] = gta64(b, xs, sparsify=sparsify, consensus=consensus, normalize=normalize, rescale=rescale,
                              density=lists.get("density"), weights=lists.get("weights"),
                              gamma=float(kv.get("gamma", 0.01)), epsilon=float(kv.get("epsilon", 0.15)),
                              seed=int(kv.get("seed", 0)), name=name)
    return out


@pytest.mark.parametrize("method,opts", CLI_CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CLI_CASES)])
def test_cli_against_formula_and_chunking(tmp_path, method, opts):
    """`tensormerge run --method X` on a family of mixed dtypes (bf16, fp16, fp32; 1-D, 2-D, an
    integer buffer) equals the float64 formula up to the output dtype's rounding, and gives the
    same bytes with a tiny --max-memory (many row chunks) as in one chunk."""
    spec = dict(H.CHUNKED_SPEC, **{"v.f16": ((40,), torch.float16), "m.f16": ((24, 7), torch.float16)})
    n = 1 if method == "slerp" else 3
    base_path, ft_paths, base, fts = H.write_family(tmp_path / "m", n=n, spec=spec)
    exp = _expected(method, opts, base, fts)
    whole = method in ("gta", "breadcrumbs", "breadcrumbs_ties")  # whole-tensor ranks: blocks unsplit
    digests = []
    for tag, mem in (("one", "64MiB"), ("many", "4MiB" if whole else "24KiB")):
        out = tmp_path / tag
        args = ["run", "-q", "-m", method, "-i", ",".join(ft_paths), "-b", base_path, "-o", out,
                "--max-memory", mem]
        for o in opts:
            args += ["-p", o]
        res = H.run_cli(args, cwd=tmp_path)
        assert res.returncode == 0, str(res)
        got = H.load_dir(out)
        for name, t in got.items():
            if name in exp:
                H.assert_close(t, exp[name], base[name].dtype, name)
            else:
                assert torch.equal(t, base[name])
        digests.append(H.shard_digests(out))
    assert digests[0] == digests[1]
    if not whole:
        res = H.run_cli(["plan", "-m", method, "-i", ",".join(ft_paths), "-b", base_path, "--max-memory", "24KiB",
                         *sum((["-p", o] for o in opts), [])], cwd=tmp_path)
        assert res.returncode == 0, str(res)
        assert any(int(line.split()[-2]) > 1 for line in res.stdout.splitlines() if line.startswith("emb.weight"))


def test_cli_slerp_two_inputs_and_refusals(tmp_path):
    base_path, ft_paths, base, fts = H.write_family(tmp_path / "m", n=2)
    out = tmp_path / "out"
    res = H.run_cli(["run", "-q", "-m", "slerp", "-i", ",".join(ft_paths), "-o", out, "-p", "t=0.25"], cwd=tmp_path)
    assert res.returncode == 0, str(res)
    got = H.load_dir(out)
    for name, t in got.items():
        if t.dtype.is_floating_point:
            H.assert_close(t, slerp64(0.25, fts[0][name], fts[1][name]), fts[0][name].dtype, name)
    res = H.run_cli(["run", "-q", "-m", "slerp", "-i", ",".join(ft_paths), "-b", base_path, "-o", tmp_path / "x"],
                    cwd=tmp_path)
    H.assert_clean_error(res, "slerp", "--base", out_dir=tmp_path / "x")
    res = H.run_cli(["run", "-q", "-m", "slerp", "-i", ft_paths[0], "-o", tmp_path / "y"], cwd=tmp_path)
    H.assert_clean_error(res, "slerp", "--base", out_dir=tmp_path / "y")
    res = H.run_cli(["run", "-q", "-m", "model_stock", "-i", ft_paths[0], "-b", base_path, "-o", tmp_path / "z"],
                    cwd=tmp_path)
    H.assert_clean_error(res, "model_stock", "two", out_dir=tmp_path / "z")
    res = H.run_cli(["run", "-q", "-m", "della", "-i", ",".join(ft_paths), "-b", base_path, "-o", tmp_path / "w",
                     "-p", "density=0.1"], cwd=tmp_path)
    H.assert_clean_error(res, "epsilon", out_dir=tmp_path / "w")


def test_rescale_pass_sums_are_chunking_free():
    """The L1 pass's per-row sums added in any grouping and order give the same norms."""
    from tensormerge.methods.gta import _L1Pass, GtaParams

    base, xs = family((37, 300), dtype=torch.float32)
    scale = torch.tensor([10.0 ** (4 if r % 2 else -4) for r in range(37)]).unsqueeze(1)
    xs = [base + (x - base) * scale for x in xs]  # rows of very different sizes: order shows in float64 sums
    params = GtaParams.from_strings("gta", {"sparsify": "random", "density": "0.5", "rescale": "true"}, 3)
    p = _L1Pass(params)
    results = []
    for cuts in ([0, 37], [0, 1, 2, 20, 37], list(range(38))):
        acc = p.start({})
        pieces = list(zip(cuts[:-1], cuts[1:]))
        for r0, r1 in reversed(pieces):
            data = BlockData("w", [x[r0:r1] for x in xs], base[r0:r1], (37, 300), r0)
            acc = p.reduce(acc, p.map(data, {}), "w")
        acc = p.end_block(acc, "w", 37 * 300)
        results.append(acc["result"]["w"])
    assert results[0] == results[1] == results[2]
    d = (xs[0] - base).double()  # the float32 task vector
    assert results[0][0][0] == math.fsum(d.abs().reshape(-1).tolist())


@pytest.mark.parametrize("consensus", ["none", "sum", "count"])
def test_normalize_by_zero_weight_sum(consensus):
    """Weights summing to 0 over the kept models: mergekit divides by 1 there (with a consensus:
    where the weighted signs agree; without: |Σ w| < 1e-8 everywhere)."""
    base, xs = family((11, 6), n=2)
    got = run("gta", xs, base, weights="1,-1", consensus=consensus, normalize="true")
    close(got, gta64(base, xs, weights=[1.0, -1.0], consensus=consensus, normalize=True))
    b = base.double()
    if consensus == "none":
        close(got, b + (xs[0] - b) - (xs[1] - b))


def test_rank_selections_against_python_sorts():
    """top-k and rank windows (histograms for float32, kthvalue for float64) select what Python's
    stable sorts select, on tie-heavy vectors: every tie straddling a boundary, both orders."""
    import random

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 60)
        vals = [rng.choice([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 1e-30]) for _ in range(n)]
        for dt in (torch.float32, torch.float64):
            w = torch.tensor(vals, dtype=dt)
            k = rng.randint(0, n)
            want = set(sorted(range(n), key=lambda j: (-vals[j], j))[:k])
            assert set(K.top_k_keep(w, k).nonzero().squeeze(1).tolist()) == want, (vals, k)
            lo = rng.randint(0, n)
            hi = rng.randint(lo, n)
            want = set(sorted(range(n), key=lambda j: (vals[j], j))[lo:hi])
            assert set(K.rank_window_keep(w, lo, hi).nonzero().squeeze(1).tolist()) == want, (vals, lo, hi)


@pytest.mark.parametrize("method,params", [
    ("della", {"density": "0.5", "seed": "3"}),
    ("breadcrumbs_ties", {"density": "0.6"}),
    ("model_stock", {}),
    ("slerp", {"t": "0.4"}),
])
def test_thread_count_does_not_change_bytes(tmp_path, method, params):
    """Rows longer than the fixed reduction piece (ROW_PIECE), summed with 1 and 2 torch threads."""
    from tensormerge.api import MergeSpec, merge

    spec = {"long.w": ((3, 3 * K.ROW_PIECE + 5), torch.float32), "v": ((70,), torch.bfloat16),
            "m": ((40, 30), torch.float16)}
    n = 1 if method == "slerp" else 3
    base, fts, base_sd, ft_sds = H.write_family(tmp_path / "m", n=n, spec=spec)
    one, two = H.digests_per_thread_count(
        lambda out: merge(MergeSpec(method, fts, str(out), base=base, params=params, quiet=True)), tmp_path)
    assert one == two
    got = H.load_dir(tmp_path / "threads1")
    if method == "slerp":
        H.assert_close(got["long.w"], slerp64(0.4, base_sd["long.w"], ft_sds[0]["long.w"]), torch.float32, "long.w")
    if method == "model_stock":
        want = model_stock64(base_sd["long.w"], [f["long.w"] for f in ft_sds])
        H.assert_close(got["long.w"], want, torch.float32, "long.w")


@pytest.mark.parametrize("method,opts", [("della", ["density=0.5"]), ("model_stock", [])])
def test_resume_after_a_kill_gives_the_same_bytes(tmp_path, method, opts):
    """Killed during the merge pass, --resume takes the recorded pass state (per-tensor norms
    or angles) and the written chunks, and finishes with the bytes of an uninterrupted run."""
    base_path, ft_paths, _, _ = H.write_family(tmp_path / "m", n=3, spec=H.CHUNKED_SPEC)
    args = ["run", "-q", "-m", method, "-i", ",".join(ft_paths), "-b", base_path, "--max-memory", "24KiB",
            *sum((["-p", o] for o in opts), [])]
    ok = H.run_cli(args + ["-o", tmp_path / "whole"], cwd=tmp_path)
    assert ok.returncode == 0, str(ok)
    killed = H.run_cli(args + ["-o", tmp_path / "out"], cwd=tmp_path, env={"TENSORMERGE_CRASH_AT": "chunk:5"})
    assert killed.returncode != 0 and (tmp_path / "out.partial").exists()
    res = H.run_cli(args + ["-o", tmp_path / "out", "--resume"], cwd=tmp_path)
    assert res.returncode == 0, str(res)
    assert H.shard_digests(tmp_path / "out") == H.shard_digests(tmp_path / "whole")


def test_rescale_pass_skipped_without_drops(tmp_path):
    """dare_ties at mergekit's default density 1 drops nothing: its L1 pass reads nothing."""
    import json

    base_path, ft_paths, base, fts = H.write_family(tmp_path / "m", n=2)
    out = tmp_path / "out"
    res = H.run_cli(["run", "-q", "-m", "dare_ties", "-i", ",".join(ft_paths), "-b", base_path, "-o", out,
                     "--report", tmp_path / "r.json"], cwd=tmp_path)
    assert res.returncode == 0, str(res)
    passes = json.loads((tmp_path / "r.json").read_text())["passes"]
    assert [p.get("skipped") for p in passes] == [True], passes
    for name, t in H.load_dir(out).items():
        if t.dtype.is_floating_point:
            H.assert_close(t, gta64(base[name], [f[name] for f in fts], sparsify="random", consensus="sum"),
                           base[name].dtype, name)
