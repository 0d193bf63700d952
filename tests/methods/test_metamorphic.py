"""Metamorphic relations of every method (issue 11), each checked against a statement written
here in float64, never against the code's own output except where the relation itself compares
two merges (a permutation, DARE p = 0 against task arithmetic):

- permuting the inputs (with their statistics and per-model parameters) leaves the merge
  unchanged up to summation order;
- identical inputs with identical statistics give that input back (average, fisher, regmean,
  mats with every objective, ubgm with H_0 = 0);
- λ = 0 gives the base (task_arithmetic, ties, dare; ubgm's α = 0);
- DARE with p = 0 is task arithmetic;
- scaling every model's Fisher by one constant leaves fisher unchanged;
- zero statistics in every model give each method's documented fallback (SPEC §4), never zeros;
- a block whose statistics exist for some models only is merged by the method's fallback and
  listed in the plan and the report (DESIGN.md "Statistics").

Checkpoints are drawn by hypothesis (model count 2-4, shapes, magnitudes, values from a drawn
seed, parameters, permutations) in float64 and in float32/bfloat16 with the default precision.
Tolerances are stated where they are used, in units of the machine epsilon of the arithmetic
(`eps_w`: float64 for float64 checkpoints, float32 otherwise, or the `precision` parameter) and
of the output dtype (`eps_o`), relative to the magnitudes involved; the solve-based methods add
the condition number of their system, computed here in float64.
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tensormerge.api import MergeSpec, merge, plan
from tests import helpers as H

F64 = torch.float64
# spacing of floating-point numbers at 1.0 (an element v is known to eps·|v| once rounded)
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
DTYPES = (torch.float64, torch.float32, torch.bfloat16)
W, B = "lin.weight", "lin.bias"

# TM_META_EXAMPLES=N runs N times the examples (a local stress run of the tolerances)
_SCALE = int(os.environ.get("TM_META_EXAMPLES", "1"))


def examples(n: int):
    # no shrinking: an example costs a few merges, and the failure report prints every draw
    return settings(max_examples=n * _SCALE, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(F64)


# ------------------------------------------------------------------------------------ the family
@dataclass
class Case:
    n: int
    out: int
    inn: int
    dtype: torch.dtype
    seed: int
    mag: float
    base: dict
    models: list

    @property
    def eps_w(self) -> float:
        """Elementwise methods compute in float32 at least, float64 stays float64."""
        return EPS[F64] if self.dtype == F64 else EPS[torch.float32]

    @property
    def eps_o(self) -> float:
        return EPS[self.dtype]

    def maxabs(self) -> float:
        return max(float(f64(t).abs().max()) for sd in [self.base] + self.models for t in sd.values())

    def gen(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 7919 + salt) % 2**63)


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=F64)


@st.composite
def cases(draw, dtypes=DTYPES, n_min: int = 2) -> Case:
    n = draw(st.integers(n_min, 4))
    out, inn = draw(st.integers(2, 6)), draw(st.integers(2, 5))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    mag = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    g = torch.Generator().manual_seed(seed)
    shapes = {W: (out, inn), B: (out,)}
    base = {k: (randn(g, *s) * mag).to(dtype) for k, s in shapes.items()}
    models = [{k: (f64(base[k]) + 0.5 * mag * randn(g, *s)).to(dtype) for k, s in shapes.items()} for _ in range(n)]
    return Case(n, out, inn, dtype, seed, mag, base, models)


# ------------------------------------------------------------------------------------ statistics
def fisher(case: Case, g: torch.Generator, scale: float = 1.0) -> dict:
    """Positive diagonal Fishers, far above the default floor (1e-8) so it never acts."""
    return {k: ((randn(g, *t.shape) ** 2 + 0.05) * scale).float() for k, t in case.base.items()}


def gram(g: torch.Generator, d: int, singular: bool = False) -> torch.Tensor:
    """A Gram as stored (float32, symmetric). Regular: XᵀX/m over m = 3d vectors plus a ridge,
    condition number below ~6. Singular: rank < d from fewer vectors, and a dead input."""
    if singular:
        x = randn(g, max(1, d // 2), d)
        x[:, -1] = 0.0  # an input that never varies
        gm = x.T @ x / x.shape[0]
    else:
        x = randn(g, 3 * d, d)
        gm = x.T @ x / (3 * d) + 0.5 * torch.eye(d, dtype=F64)
    return ((gm + gm.T) / 2).float()


def stats_for(kind_set: str, case: Case, g: torch.Generator, singular: bool = False) -> dict:
    """One model's statistics for an objective: fisher (every tensor), gram_in (the weight),
    kfac (gram_in and gram_out of the weight), blockwise (fisher_block of the bias)."""
    if kind_set == "fisher":
        return {"fisher": fisher(case, g)}
    if kind_set == "gram_in":
        return {"gram_in": {W: gram(g, case.inn, singular)}}
    if kind_set == "kfac":
        return {"gram_in": {W: gram(g, case.inn, singular)}, "gram_out": {W: gram(g, case.out, singular)}}
    if kind_set == "blockwise":
        return {"fisher_block": {B: gram(g, case.out, singular)}}
    raise ValueError(kind_set)


MATS_KINDS = {"kfac": "kfac", "regmean": "gram_in", "fisher": "fisher", "blockwise": "blockwise"}


# ------------------------------------------------------------------------------------ merging
class Merger:
    """Writes checkpoints and stores under one temporary directory per example and merges
    through the public API."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.k = 0

    def _next(self, tag: str) -> Path:
        self.k += 1
        return self.root / f"{tag}{self.k}"

    def models(self, sds: list[dict]) -> list[str]:
        return [str(H.save_safetensors_dir(self._next("m"), sd, side_files=False)) for sd in sds]

    def model(self, sd: dict) -> str:
        return self.models([sd])[0]

    def stores(self, stats: list[dict]) -> list[str]:
        return [H.write_store(str(self._next("s")) + ".zarr", {k: dict(v) for k, v in st_.items()}) for st_ in stats]

    def spec(self, method: str, inputs: list[str], base: str | None = None, stats=(), base_stats=None,
             params: dict | None = None) -> MergeSpec:
        return MergeSpec(method, list(inputs), str(self._next("out")), base=base, stats=list(stats),
                         base_stats=base_stats, params={k: str(v) for k, v in (params or {}).items()}, quiet=True)

    def __call__(self, *args, **kw) -> tuple[dict, dict]:
        spec = self.spec(*args, **kw)
        report = merge(spec)
        return H.load_dir(spec.output), report


def csv(xs) -> str:
    return ",".join(repr(float(x)) for x in xs)


def check(got: torch.Tensor, want64: torch.Tensor, atol: float, what: str, dtype: torch.dtype) -> None:
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    assert tuple(got.shape) == tuple(want64.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output {got}"
    diff = float((f64(got) - want64).abs().max()) if got.numel() else 0.0
    assert diff <= atol, f"{what}: max |got - expected| = {diff:.3e} > {atol:.3e}\ngot {f64(got)}\nexpected {want64}"


def weighted_average(case: Case, k: str, w: list[float], models=None) -> torch.Tensor:
    return sum(wi * f64(m[k]) for wi, m in zip(w, models or case.models))


def ta(case: Case, k: str, lams: list[float]) -> torch.Tensor:
    return f64(case.base[k]) + sum(lam * (f64(m[k]) - f64(case.base[k])) for lam, m in zip(lams, case.models))


def cond(mat: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(mat.to(F64))
    return float(ev.max() / ev.min())


# ------------------------------------------------------------------------------------ parameters
@st.composite
def elementwise_params(draw, method: str, n: int) -> tuple[dict, list[str]]:
    """Parameters of a method and the keys holding one value per model (permuted with them)."""
    pos = st.floats(0.1, 2.0)
    if method == "average":
        p = {}
        if draw(st.booleans()):
            p["weights"] = csv(draw(st.lists(pos, min_size=n, max_size=n)))
            normalize = draw(st.sampled_from([None, True, False]))  # None: the default
            if normalize is not None:
                p["normalize"] = normalize
        return p, ["weights"]
    if method == "task_arithmetic":
        if draw(st.booleans()):
            return {"lambdas": csv(draw(st.lists(st.floats(-1.0, 2.0), min_size=n, max_size=n)))}, ["lambdas"]
        return {"lambda": draw(st.floats(-1.0, 2.0))}, []
    if method == "ties":
        # normfrac elects the sign of the model with the largest τ²/‖τ‖², the first on exact ties
        # (the reference's argmax): with one kept entry per model every fraction is 1, and model
        # order decides. k >= 0.5 keeps enough entries for the fractions to differ.
        sign = draw(st.sampled_from(["mass", "normfrac", "normmass", "none"]))
        return {"k": draw(st.sampled_from([0.5, 1.0] if sign == "normfrac" else [0.1, 0.2, 0.5, 1.0])),
                "lambda": draw(st.floats(0.1, 2.0)), "sign": sign,
                "merge": draw(st.sampled_from(["dis-mean", "dis-sum", "dis-max", "mean", "sum", "median"])),
                "scope": draw(st.sampled_from(["global", "tensor"]))}, []
    if method == "dare":
        return {"p": 0.0, "lambda": draw(st.floats(-1.0, 2.0)), "seed": draw(st.integers(0, 99))}, []
    if method == "fisher":
        p = {"floor_mode": draw(st.sampled_from(["clamp", "add"])), "normalize": draw(st.booleans())}
        if draw(st.booleans()):
            p["weights"] = csv(draw(st.lists(pos, min_size=n, max_size=n)))
        return p, ["weights"]
    if method == "ubgm":
        p = {"alpha": draw(st.floats(0.1, 2.0)), "delta0": draw(st.sampled_from([1e-12, 1e-3])),
             "base_scale": draw(st.floats(0.0, 3.0))}
        if draw(st.booleans()):
            p["scales"] = csv(draw(st.lists(pos, min_size=n, max_size=n)))
        return p, ["scales"]
    raise ValueError(method)


def permute_params(params: dict, per_model: list[str], perm: list[int]) -> dict:
    out = dict(params)
    for key in per_model:
        if key in out:
            vals = out[key].split(",")
            out[key] = ",".join(vals[j] for j in perm)
    return out


def lam_bound(params: dict) -> float:
    """Largest scale a method puts on a task vector or model (for summation-error bounds)."""
    vals = [1.0]
    for key in ("lambda", "alpha", "base_scale"):
        if key in params:
            vals.append(abs(float(params[key])))
    for key in ("lambdas", "weights", "scales"):
        if key in params:
            vals += [abs(float(v)) for v in params[key].split(",")]
    return max(vals)


# ================================================================================== permutation
ELEMENTWISE = ["average", "task_arithmetic", "ties", "dare", "fisher", "ubgm"]


@pytest.mark.parametrize("method", ELEMENTWISE)
@given(data=st.data())
@examples(5)
def test_permutation_elementwise(method, data):
    """merge(π inputs, π stats, π per-model parameters) = merge(inputs) up to summation order,
    and both equal the float64 formula of SPEC §4 (except TIES, whose reference is in test_ties).
    Tolerance: the two sums differ by at most ~N·eps_w of the summed magnitudes
    (2·max|θ|·(1 + N·scale)), allowed 4x, plus one ulp of the output dtype (the rounding of a
    value sitting on a rounding boundary may flip). DARE draws p = 0 only: its masks are keyed by
    the model index (SPEC §4), so for p > 0 a permutation is another draw, not the same merge."""
    case = data.draw(cases())
    params, per_model = data.draw(elementwise_params(method, case.n))
    perm = data.draw(st.permutations(range(case.n)))
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        paths = m.models(case.models)
        base = m.model(case.base) if method != "average" and method != "fisher" else None
        stats, base_stats, stats_raw = [], None, []
        if method in ("fisher", "ubgm"):
            stats_raw = [{"fisher": fisher(case, case.gen(i))} for i in range(case.n)]
            stats = m.stores(stats_raw)
            if method == "ubgm" and data.draw(st.booleans()):
                stats_raw.append({"fisher": fisher(case, case.gen(99))})  # the base's, last
                base_stats = m.stores(stats_raw[-1:])[0]
        got, _ = m(method, paths, base, stats, base_stats, params)
        got_p, _ = m(method, [paths[j] for j in perm], base, [stats[j] for j in perm] if stats else [], base_stats,
                     permute_params(params, per_model, perm))
    scale = 2 * case.maxabs() * (1 + case.n * lam_bound(params))
    for k in case.base:
        out_max = float(f64(got[k]).abs().max())
        atol = 4 * case.n * case.eps_w * scale + case.eps_o * out_max
        check(got_p[k], f64(got[k]), atol, f"{method} {k} permuted {perm}", case.dtype)
        want = elementwise_formula(method, case, k, params, stats_raw)
        if want is not None:
            check(got[k], want, atol, f"{method} {k} against the float64 formula {params}", case.dtype)


def per_model(params: dict, key: str, n: int, default: float) -> list[float]:
    return [float(v) for v in params[key].split(",")] if key in params else [default] * n


def elementwise_formula(method: str, case: Case, k: str, params: dict, stats: list[dict]) -> torch.Tensor | None:
    """SPEC §4 in float64 (TIES has its reference in test_ties.py)."""
    n = case.n
    if method == "average":
        w = per_model(params, "weights", n, 1.0 / n)
        if params.get("normalize", "weights" in params):  # SPEC: normalize is true when weights are given
            w = [x / sum(w) for x in w]
        return weighted_average(case, k, w)
    if method in ("task_arithmetic", "dare"):  # dare draws p = 0 here
        return ta(case, k, per_model(params, "lambdas", n, float(params.get("lambda", 0.3))))
    if method == "fisher":
        w = per_model(params, "weights", n, 1.0)
        if params["normalize"]:
            w = [wi / math.sqrt(sum(float((f64(v) ** 2).sum()) for v in s["fisher"].values()))
                 for wi, s in zip(w, stats)]
        fk = [f64(s["fisher"][k]) + (1e-8 if params["floor_mode"] == "add" else 0.0) for s in stats]  # clamp: F > floor
        return sum(wi * f * f64(x[k]) for wi, f, x in zip(w, fk, case.models)) / sum(wi * f for wi, f in zip(w, fk))
    if method == "ubgm":
        a, d0, s0 = float(params["alpha"]), float(params["delta0"]), float(params["base_scale"])
        st_ = per_model(params, "scales", n, 1.0)
        h0 = f64(stats[-1]["fisher"][k]) if len(stats) > n else torch.zeros(())
        hs = [f64(s["fisher"][k]) for s in stats[:n]]
        hbar = a * sum(s * h for s, h in zip(st_, hs)) + s0 * h0 + d0
        th0 = f64(case.base[k])
        return th0 + a * sum(((s * h + s0 * h0 + d0) / hbar) * (f64(x[k]) - th0) for s, h, x in zip(st_, hs, case.models))
    return None


def regmean_expected(ws: list[torch.Tensor], grams: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """SPEC §4: W̄ + (Σ w_i (W_i − W̄) G_i)(Σ w_i G_i)^+ (α = 1), in float64 from the stored Grams."""
    wbar = sum(wi * x for wi, x in zip(w, ws))
    s = sum(wi * f64(g) for wi, g in zip(w, grams))
    m = sum(wi * (x - wbar) @ f64(g) for wi, x, g in zip(w, ws, grams))
    return wbar + m @ torch.linalg.pinv(s, hermitian=True)


def mats_system(objective: str, k: str, thetas: list[torch.Tensor], stats: list[dict]):
    """(Σ C_i, Σ C_i vec θ_i) as explicit float64 matrices on row-major vec(θ) for one block
    (α = 1): kfac Σ B_i ⊗ A_i, regmean Σ I ⊗ A_i, fisher diag Σ F_i, blockwise Σ F_i."""
    if objective == "kfac":
        cs = [torch.kron(f64(s["gram_out"][k]), f64(s["gram_in"][k])) for s in stats]
    elif objective == "regmean":
        cs = [torch.kron(torch.eye(thetas[0].shape[0], dtype=F64), f64(s["gram_in"][k])) for s in stats]
    elif objective == "fisher":
        cs = [torch.diag(f64(s["fisher"][k]).reshape(-1)) for s in stats]
    else:
        cs = [f64(s["fisher_block"][k]) for s in stats]
    return sum(cs), sum(c @ f64(t).reshape(-1) for c, t in zip(cs, thetas))


def mats_blocks(objective: str) -> tuple[str, ...]:
    """The blocks an objective solves for (the others are averaged by definition)."""
    return {"kfac": (W,), "regmean": (W,), "fisher": (W, B), "blockwise": (B,), "average": ()}[objective]


def mats_precision(case: Case, data) -> tuple[dict, float]:
    """float64 checkpoints: precision float64 and tol 1e-12, or the defaults (drawn);
    float32/bfloat16 checkpoints: the defaults (float32 CG, tol 1e-5). Returns (params, eps)."""
    if case.dtype == F64 and data.draw(st.booleans()):
        return {"precision": "float64", "tol": 1e-12}, EPS[F64]
    return {}, EPS[torch.float32]


def cg_tolerance(tol: float, eps: float, kappa: float, n: int) -> float:
    """Relative 2-norm error reachable by CG: the stopping rule ‖r‖ ≤ tol‖b‖ gives an error
    ≤ κ·tol; rounding in the work precision stops the residual near n·κ·eps (allowed 16x)."""
    return kappa * max(tol, 16 * n * eps * kappa)


@pytest.mark.parametrize("method", ["regmean", "mats-kfac", "mats-regmean", "mats-fisher", "mats-blockwise",
                                    "mats-average"])
@given(data=st.data())
@examples(4)
def test_permutation_solves(method, data):
    """Solve-based methods: the permuted merge and the original are each compared with the
    float64 solution of the system written here, and with each other. RegMean (regular Grams):
    the solve is float64 but the products W_i Ĝ_i are in the checkpoints' precision, so the
    error is ≤ κ(ΣĜ)·N·eps_w relative (allowed 16x) plus the output rounding. MaTS: CG stops at
    a relative residual tol (1e-5, or 1e-12 in float64), so each result is within
    κ·max(tol, rounding floor) of the solution in 2-norm (cg_tolerance)."""
    case = data.draw(cases())
    perm = data.draw(st.permutations(range(case.n)))
    objective = method.split("-")[1] if method.startswith("mats") else None
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        paths = m.models(case.models)
        w = [1.0 / case.n] * case.n
        if method == "regmean":
            params, eps = {}, case.eps_w
            if data.draw(st.booleans()):
                w = data.draw(st.lists(st.floats(0.1, 2.0), min_size=case.n, max_size=case.n))
                params["weights"] = csv(w)
                w = [x / sum(w) for x in w]
            raw = [stats_for("gram_in", case, case.gen(i)) for i in range(case.n)]
            base = None
        else:
            params, eps = mats_precision(case, data)
            params = {**params, "objective": objective}
            raw = [stats_for(MATS_KINDS[objective], case, case.gen(i)) for i in range(case.n)] \
                if objective != "average" else []
            base = m.model(case.base)
        stores = m.stores(raw) if raw else []
        got, _ = m(method.split("-")[0], paths, base, stores, None, params)
        got_p, _ = m(method.split("-")[0], [paths[j] for j in perm], base, [stores[j] for j in perm] if stores else [],
                     None, permute_params(params, ["weights"], perm))
    maxabs = case.maxabs()
    for k in case.base:
        if method == "regmean" and k == W:
            want = regmean_expected([f64(x[W]) for x in case.models], [r["gram_in"][W] for r in raw], w)
            kappa = cond(sum(wi * f64(r["gram_in"][W]) for wi, r in zip(w, raw)))
            atol = 16 * case.n * kappa * eps * 2 * maxabs + case.eps_o * maxabs
        elif objective and k in mats_blocks(objective):
            mat, rhs = mats_system(objective, k, [x[k] for x in case.models], raw)
            want = torch.linalg.solve(mat, rhs).reshape(case.base[k].shape)
            rel = cg_tolerance(float(params.get("tol", 1e-5)), eps, cond(mat), case.n)
            atol = rel * float(want.norm()) + case.eps_o * float(want.abs().max())
        else:  # averaged by definition (regmean's bias, mats' blocks without the objective's statistics)
            want = weighted_average(case, k, w)
            atol = 4 * case.n * eps * maxabs + case.eps_o * maxabs
        check(got[k], want, atol, f"{method} {k}", case.dtype)
        check(got_p[k], want, atol, f"{method} {k} permuted {perm}", case.dtype)
        check(got_p[k], f64(got[k]), 2 * atol, f"{method} {k} permuted vs original", case.dtype)


# ================================================================================== identical inputs
IDENTICAL = ["average", "fisher", "regmean", "mats-kfac", "mats-regmean", "mats-fisher", "mats-blockwise",
             "mats-average", "ubgm"]


@pytest.mark.parametrize("method", IDENTICAL)
@given(data=st.data())
@examples(4)
def test_identical_inputs_give_the_input(method, data):
    """N copies of θ with N copies of its statistics merge to θ. Elementwise methods: within
    4·N·eps_w·max|θ| (the weights 1/N are not exact for N = 3), which for a bfloat16 output
    means bit-exact. RegMean with regular Grams: κ(ΣĜ)·N·eps_w more (the products run in the
    checkpoints' precision). MaTS with regular statistics and the default start (task
    arithmetic, not θ): the CG error bound (cg_tolerance). UBGM with H_0 = 0 (no --base-stats):
    θ_0 + α τ (Σ s_t H + N δ0)/(α Σ s_t H + δ0), θ up to δ0·|Nα − 1|/(α Σ s_t H)·|τ|, which the
    tolerance adds."""
    case = data.draw(cases())
    one = case.models[0]
    objective = method.split("-")[1] if method.startswith("mats") else None
    maxabs = max(float(f64(t).abs().max()) for t in one.values())
    extra = {k: 0.0 for k in one}
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        path = m.model(one)
        inputs = [path] * case.n
        base, stats, params, eps = None, [], {}, case.eps_w
        raw = None
        if method == "average" and data.draw(st.booleans()):
            params = {"weights": csv(data.draw(st.lists(st.floats(0.1, 2.0), min_size=case.n, max_size=case.n))),
                      "normalize": "true"}
        elif method == "fisher":
            raw = {"fisher": fisher(case, case.gen(1), data.draw(st.sampled_from([1e-3, 1.0, 1e3])))}
            params = {"floor_mode": data.draw(st.sampled_from(["clamp", "add"])),
                      "fallback": data.draw(st.sampled_from(["average", "first"]))}
        elif method == "regmean":
            raw = stats_for("gram_in", case, case.gen(1))
        elif method == "ubgm":
            raw = {"fisher": fisher(case, case.gen(1))}
            alpha = data.draw(st.floats(0.1, 2.0))
            scales = data.draw(st.lists(st.floats(0.1, 2.0), min_size=case.n, max_size=case.n))
            params = {"alpha": alpha, "scales": csv(scales)}
            base = m.model(case.base)
            for k in one:
                tau = float((f64(one[k]) - f64(case.base[k])).abs().max())
                extra[k] = 1e-12 * abs(case.n * alpha - 1) / (alpha * sum(scales) * 0.05) * tau
        elif objective:
            params, eps = mats_precision(case, data)
            params["objective"] = objective
            base = m.model(case.base)
            if objective != "average":
                raw = stats_for(MATS_KINDS[objective], case, case.gen(1))
        if raw is not None:
            stats = m.stores([raw]) * case.n
        got, _ = m(method.split("-")[0], inputs, base, stats, None, params)
    for k in one:
        want = f64(one[k])
        atol = 4 * case.n * eps * maxabs + extra[k]
        if method == "regmean" and k == W:
            atol += 16 * case.n * cond(f64(raw["gram_in"][W])) * eps * maxabs
        if objective and k in mats_blocks(objective):
            mat, _ = mats_system(objective, k, [one[k]], [raw])
            rel = cg_tolerance(float(params.get("tol", 1e-5)), eps, cond(mat), case.n)
            atol = rel * float(want.norm()) + case.eps_o * maxabs
        check(got[k], want, atol, f"{method} {k} of {case.n} identical inputs", case.dtype)


@given(data=st.data())
@examples(5)
def test_regmean_identical_inputs_singular_grams(data):
    """SPEC §4: RegMean is computed as W̄ + (Σ (W_i − W̄) Ĝ_i)(Σ Ĝ_i)^+, so identical models give W̄
    = W even when the (identical) Grams are singular (rank-deficient, a dead input): W_i − W̄ is
    rounding, and Ĝ(NĜ)^+ is a projection, so nothing is amplified. Tolerance 8·N·eps_w·max|W|
    plus the output rounding."""
    case = data.draw(cases())
    one = case.models[0]
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        raw = stats_for("gram_in", case, case.gen(1), singular=True)
        alpha = data.draw(st.sampled_from([1.0, 0.5]))
        got, _ = m("regmean", [m.model(one)] * case.n, None, m.stores([raw]) * case.n, None, {"alpha": alpha})
    maxabs = float(f64(one[W]).abs().max())
    check(got[W], f64(one[W]), 8 * case.n * case.eps_w * maxabs + case.eps_o * maxabs, "regmean singular", case.dtype)


@pytest.mark.parametrize("objective", ["kfac", "regmean", "fisher", "blockwise"])
@given(data=st.data())
@examples(4)
def test_mats_identical_inputs_singular_statistics_from_the_average(objective, data):
    """With singular statistics CG only moves within the range of Σ C_i (SPEC §4), so identical
    inputs come back from any start only where Σ C_i is regular; started from their average
    (θ itself, up to the 1/N weights' rounding) they come back whatever the statistics.
    Tolerance: 4·N·eps_w·max|θ| for the start and κ_eff·tol on the range (the system's nonzero
    eigenvalues), plus the output rounding."""
    case = data.draw(cases())
    one = case.models[0]
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        if objective == "fisher":
            raw = {"fisher": {}}
            for k, v in fisher(case, case.gen(1)).items():  # about half the entries unseen, never all
                seen = torch.rand(v.shape, generator=case.gen(5)) > 0.5
                seen.view(-1)[0] = True
                raw["fisher"][k] = v * seen
        else:
            raw = stats_for(MATS_KINDS[objective], case, case.gen(1), singular=True)
        params, eps = mats_precision(case, data)
        got, _ = m("mats", [m.model(one)] * case.n, None, m.stores([raw]) * case.n, None,
                   {**params, "objective": objective, "init": "average"})
    maxabs = max(float(f64(t).abs().max()) for t in one.values())
    for k in one:
        atol = 4 * case.n * EPS[torch.float32] * maxabs + case.eps_o * maxabs
        check(got[k], f64(one[k]), atol, f"mats {objective} {k} singular, init average", case.dtype)


# ================================================================================== λ = 0
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "ubgm"])
@given(data=st.data())
@examples(5)
def test_zero_lambda_gives_the_base(method, data):
    """θ_0 + 0·(anything) = θ_0 exactly: the output equals the base element for element (== so
    that −0.0 and 0.0 are equal). UBGM's α plays λ's part. DARE draws any p."""
    case = data.draw(cases())
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        params: dict = {"lambda": 0.0}
        stats = []
        if method == "task_arithmetic" and data.draw(st.booleans()):
            params = {"lambdas": csv([0.0] * case.n)}
        elif method == "ties":
            params.update(k=data.draw(st.sampled_from([0.1, 0.2, 1.0])),
                          merge=data.draw(st.sampled_from(["dis-mean", "dis-sum", "dis-max", "sum", "median"])))
        elif method == "dare":
            params.update(p=data.draw(st.sampled_from([0.0, 0.3, 0.9])), seed=data.draw(st.integers(0, 9)))
        elif method == "ubgm":
            params = {"alpha": 0.0}
            stats = m.stores([{"fisher": fisher(case, case.gen(i))} for i in range(case.n)])
        got, _ = m(method, m.models(case.models), m.model(case.base), stats, None, params)
    for k, t in case.base.items():
        assert got[k].dtype == t.dtype and bool((got[k] == t).all()), f"{method} {k}: {got[k]} != base {t}"


# ================================================================================== DARE p = 0
@given(data=st.data())
@examples(4)
def test_dare_without_drops_is_task_arithmetic(data):
    """DARE with p = 0 keeps every entry and rescales by 1/(1 − 0) = 1: θ_0 + λ Σ τ_i, the float64
    formula within 4·N·eps_w of the summed magnitudes plus the output rounding, and the same
    bytes as task_arithmetic with that λ (the same sum in the same order)."""
    case = data.draw(cases())
    lam = data.draw(st.floats(-1.0, 2.0))
    rescale = data.draw(st.booleans())
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        paths, base = m.models(case.models), m.model(case.base)
        got, _ = m("dare", paths, base, params={"p": 0.0, "lambda": lam, "seed": data.draw(st.integers(0, 99)),
                                                 "rescale": rescale})
        got_ta, _ = m("task_arithmetic", paths, base, params={"lambda": lam})
    scale = 2 * case.maxabs() * (1 + case.n * max(1.0, abs(lam)))
    for k in case.base:
        want = ta(case, k, [lam] * case.n)
        check(got[k], want, 4 * case.n * case.eps_w * scale + case.eps_o * float(want.abs().max()), f"dare {k}",
              case.dtype)
        assert torch.equal(got[k], got_ta[k]), f"dare p=0 {k} differs from task_arithmetic"


# ================================================================================== Fisher scale
@given(data=st.data())
@examples(5)
def test_fisher_invariant_to_one_scale_of_every_fisher(data):
    """Σ w cF θ / Σ w cF = Σ w F θ / Σ w F while the floor does not act (clamp: every c·F ≥ 1.5e-6
    > the 1e-8 floor; add: floor 0). With normalize=true too (each weight is divided by c‖F_i‖). c = 2^k:
    every product and the quotient scale exactly, so the bytes are equal. Any other c: c·F is
    rounded to float32 on disk (relative 2^-24 per entry), which moves the result by at most
    2^-24·max|θ_i − θ*| (the derivative of the weighted mean in F_i is w_i(θ_i − θ*)/Σ w F);
    allowed 4x, plus 4·N·eps_w·max|θ| of arithmetic and the output rounding. Both are also
    compared with the float64 formula."""
    case = data.draw(cases())
    fs = [fisher(case, case.gen(i), 1.0) for i in range(case.n)]
    power = data.draw(st.booleans())
    c = 2.0 ** data.draw(st.integers(-15, 15)) if power else data.draw(st.floats(1e-3, 1e3))
    mode = data.draw(st.sampled_from(["clamp", "add"]))
    params = {"floor_mode": mode, "floor": 1e-8 if mode == "clamp" else 0.0, "normalize": data.draw(st.booleans())}
    if data.draw(st.booleans()):
        params["weights"] = csv(data.draw(st.lists(st.floats(0.1, 2.0), min_size=case.n, max_size=case.n)))
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        paths = m.models(case.models)
        got, _ = m("fisher", paths, None, m.stores([{"fisher": f} for f in fs]), None, params)
        scaled = [{k: (f64(v) * c).float() for k, v in f.items()} for f in fs]
        got_c, _ = m("fisher", paths, None, m.stores([{"fisher": f} for f in scaled]), None, params)
    maxabs = case.maxabs()
    w = [float(x) for x in params["weights"].split(",")] if "weights" in params else [1.0] * case.n
    norms = [math.sqrt(sum(float((f64(v) ** 2).sum()) for v in f.values())) for f in fs]
    if params["normalize"]:
        w = [wi / nv for wi, nv in zip(w, norms)]
    for k in case.base:
        fk = [f64(f[k]) for f in fs]
        want = sum(wi * f * f64(x[k]) for wi, f, x in zip(w, fk, case.models)) / sum(wi * f for wi, f in zip(w, fk))
        base_tol = 4 * case.n * case.eps_w * maxabs + case.eps_o * maxabs
        check(got[k], want, base_tol, f"fisher {k}", case.dtype)
        if power:
            assert torch.equal(got_c[k], got[k]), f"fisher {k}: Fishers scaled by {c} changed the merge"
        else:
            spread = max(float((f64(x[k]) - want).abs().max()) for x in case.models)
            check(got_c[k], f64(got[k]), 4 * 2.0**-24 * spread + 2 * base_tol, f"fisher {k} with Fishers × {c}",
                  case.dtype)


# ================================================================================== zero statistics
@pytest.mark.parametrize("method", [
    "fisher", "regmean", "ubgm", "mats-kfac", "mats-regmean", "mats-fisher", "mats-blockwise"])
@given(data=st.data())
@examples(5)
def test_zero_statistics_give_the_fallback(method, data):
    """Statistics that are zero in every model merge to the documented fallback, never zeros:
    fisher: the floor acts on every model (fallback=average), so the weighted average, or on the
    first model only (fallback=first), so θ_1; regmean: every input is dead, so the weighted
    average column by column; mats: Σ C_i = 0 has an empty range, so the block keeps its start
    (init task_arithmetic θ_0 + 0.3 Σ τ, average or base); ubgm: H_t = 0 is task arithmetic with
    λ = α, whatever H_0, also with δ0 = 0 (the δ0 -> 0⁺ limit; α = 0 gives θ_0). Tolerance 4·N·eps of the summed magnitudes (eps of CG's precision for
    mats, which computes its start in it) plus the output rounding."""
    case = data.draw(cases())
    objective = method.split("-")[1] if method.startswith("mats") else None
    n = case.n
    zero = {k: torch.zeros(t.shape) for k, t in case.base.items()}
    w = [1.0 / n] * n
    eps = case.eps_w
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        paths = m.models(case.models)
        base, base_stats, params = None, None, {}
        if method == "fisher":
            raw = {"fisher": zero}
            fb = data.draw(st.sampled_from(["average", "first"]))
            params = {"fallback": fb, "floor_mode": data.draw(st.sampled_from(["clamp", "add"])),
                      "floor": data.draw(st.sampled_from([1e-8, 1e-3]))}
            if data.draw(st.booleans()):
                w = data.draw(st.lists(st.floats(0.1, 2.0), min_size=n, max_size=n))
                params["weights"] = csv(w)
                w = [x / sum(w) for x in w]
            if fb == "first":
                w = [1.0] + [0.0] * (n - 1)
        elif method == "regmean":
            raw = {"gram_in": {W: torch.zeros(case.inn, case.inn)}}
            if data.draw(st.booleans()):
                w = data.draw(st.lists(st.floats(0.1, 2.0), min_size=n, max_size=n))
                params["weights"] = csv(w)
                w = [x / sum(w) for x in w]
        elif method == "ubgm":
            raw = {"fisher": zero}
            alpha = data.draw(st.sampled_from([0.0, 0.5]) | st.floats(0.1, 2.0))
            params = {"alpha": alpha}
            if data.draw(st.booleans()):  # δ0 = 0 (the research code's default): the δ0 -> 0⁺ limit
                params["delta0"] = 0.0
            if data.draw(st.booleans()):
                params["scales"] = csv([0.0] * n)
            base = m.model(case.base)
            if data.draw(st.booleans()):
                base_stats = m.stores([{"fisher": fisher(case, case.gen(7))}])[0]
        else:
            init = data.draw(st.sampled_from(["task_arithmetic", "average", "base"]))
            params, eps = mats_precision(case, data)  # the start is computed in CG's precision
            params.update(objective=objective, init=init)
            base = m.model(case.base)
            raw = {"kfac": {"gram_in": {W: torch.zeros(case.inn, case.inn)},
                            "gram_out": {W: torch.zeros(case.out, case.out)}},
                   "regmean": {"gram_in": {W: torch.zeros(case.inn, case.inn)}},
                   "fisher": {"fisher": zero},
                   "blockwise": {"fisher_block": {B: torch.zeros(case.out, case.out)}}}[objective]
        got, rep = m(method.split("-")[0], paths, base, m.stores([raw] * n), base_stats, params)
    assert rep["fallback_blocks"] == {}, rep["fallback_blocks"]  # every block had its (zero) statistics
    scale = 2 * case.maxabs() * (1 + n * lam_bound(params))
    for k in case.base:
        if method in ("fisher", "regmean"):
            want = weighted_average(case, k, w)
        elif method == "ubgm":
            want = ta(case, k, [alpha] * n)
        elif k in mats_blocks(objective):
            want = {"task_arithmetic": ta(case, k, [0.3] * n), "average": weighted_average(case, k, [1.0 / n] * n),
                    "base": f64(case.base[k])}[init]
        else:
            want = weighted_average(case, k, [1.0 / n] * n)
        atol = 4 * n * eps * scale + case.eps_o * float(want.abs().max())
        check(got[k], want, atol, f"{method} {k} with zero statistics {params}", case.dtype)


# ================================================================================== partial statistics
@pytest.mark.parametrize("method", ["fisher", "regmean", "mats-kfac", "mats-regmean", "mats-fisher",
                                    "mats-blockwise", "ubgm"])
@given(data=st.data())
@examples(5)
def test_statistics_of_some_models_only(method, data):
    """DESIGN.md "Statistics": a block gets statistics only when every model's store has them;
    otherwise the method's fallback merges it and the plan and the report list it, naming the
    stores that lack them. Fallbacks (SPEC §4): fisher and regmean the weighted average, mats
    the average, ubgm θ_0 + α Σ τ_t (the H_t = 0 limit, SPEC: "a parameter no store covers").
    A drawn non-empty subset of the stores lacks the block (all of them: no store covers it;
    for kfac, possibly gram_out only); the other block keeps its statistics and is not listed. Tolerance 4·N·eps_w of the summed magnitudes plus the output
    rounding."""
    case = data.draw(cases())
    n = case.n
    objective = method.split("-")[1] if method.startswith("mats") else None
    kinds = {"fisher": "fisher", "regmean": "gram_in", "ubgm": "fisher"}.get(method) or MATS_KINDS[objective]
    lacking = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    target = {"gram_in": W, "kfac": W, "blockwise": B}.get(kinds) or data.draw(st.sampled_from([W, B]))
    raw = [stats_for(kinds, case, case.gen(i)) for i in range(n)]
    drop = ["gram_in", "gram_out"] if kinds == "kfac" else [next(iter(raw[0]))]
    if kinds == "kfac":
        drop = data.draw(st.sampled_from([["gram_in", "gram_out"], ["gram_out"], ["gram_in"]]))
    for i in lacking:
        for kind in drop:
            del raw[i][kind][target]
    for r in raw:
        for kind in list(r):
            if not r[kind]:
                del r[kind]
    w = [1.0 / n] * n
    params: dict = {}
    base = None
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        paths = m.models(case.models)
        if method in ("fisher", "regmean") and data.draw(st.booleans()):
            w = data.draw(st.lists(st.floats(0.1, 2.0), min_size=n, max_size=n))
            params["weights"] = csv(w)
            w = [x / sum(w) for x in w]
        if method == "ubgm":
            params["alpha"] = data.draw(st.floats(0.1, 2.0))
        if objective:
            params.update(objective=objective, init="average")
        if method == "ubgm" or objective:
            base = m.model(case.base)
        stores = m.stores(raw)
        spec = m.spec(method.split("-")[0], paths, base, stores, None, params)
        table = plan(spec)
        rep = merge(spec)
        got = H.load_dir(spec.output)
    missing = [stores[i] for i in sorted(lacking)]
    assert list(rep["fallback_blocks"]) == [target], rep["fallback_blocks"]
    why = rep["fallback_blocks"][target]
    assert all(s in why for s in missing), f"report does not name {missing}: {why!r}"
    fb_lines = [line for line in table.splitlines() if target in line and missing[0] in line]
    assert fb_lines, f"the plan does not list {target} lacking statistics in {missing[0]}:\n{table}"
    scale = 2 * case.maxabs() * (1 + n * lam_bound(params))
    want = ta(case, target, [params["alpha"]] * n) if method == "ubgm" else weighted_average(case, target, w)
    atol = 4 * n * case.eps_w * scale + case.eps_o * float(want.abs().max())
    check(got[target], want, atol, f"{method} {target} lacking {drop} in stores {sorted(lacking)}", case.dtype)


@pytest.mark.parametrize("normalize", [False, True])
@given(data=st.data())
@examples(4)
def test_fisher_negative_zero_entries_are_zero_statistics(normalize, data):
    """A Fisher entry stored as −0.0 is a zero Fisher entry (a non-negative value; −0.0 comes out
    of sign-agnostic accumulation or a conversion): the merge is byte for byte the one with +0.0
    there, and the float64 formula with the floor. About half the entries are zero in every
    model (all fall back to the floor) or in some models."""
    case = data.draw(cases())
    fs = [fisher(case, case.gen(i)) for i in range(case.n)]
    for i, f in enumerate(fs):
        for k, v in f.items():
            unseen = torch.rand(v.shape, generator=case.gen(50 + i)) < 0.4
            unseen.view(-1)[0] = True  # the first entry: zero in every model
            unseen.view(-1)[-1] = False  # the last: seen (a Fisher zero everywhere has no norm to divide by)
            v[unseen] = 0.0
    neg = [{k: torch.where(v == 0, torch.tensor(-0.0), v) for k, v in f.items()} for f in fs]
    assert all(bool(torch.signbit(v.view(-1)[0])) for f in neg for v in f.values())
    params = {"normalize": normalize}
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        paths = m.models(case.models)
        got, _ = m("fisher", paths, None, m.stores([{"fisher": f} for f in fs]), None, params)
        got_neg, _ = m("fisher", paths, None, m.stores([{"fisher": f} for f in neg]), None, params)
    norms = [math.sqrt(sum(float((f64(v) ** 2).sum()) for v in f.values())) for f in fs]
    w = [1.0 / nv if normalize else 1.0 for nv in norms]
    maxabs = case.maxabs()
    for k in case.base:
        fk = [f64(f[k]).clamp(min=1e-8) for f in fs]
        want = sum(wi * f * f64(x[k]) for wi, f, x in zip(w, fk, case.models)) / sum(wi * f for wi, f in zip(w, fk))
        check(got[k], want, 4 * case.n * case.eps_w * maxabs + case.eps_o * maxabs, f"fisher {k}", case.dtype)
        assert torch.equal(got_neg[k], got[k]), f"fisher {k}: −0.0 Fisher entries changed the merge"


# ================================================================================== DARE p > 0
@given(data=st.data())
@examples(5)
def test_dare_entries_are_rescaled_subset_sums(data):
    """DARE keeps or drops each (model, element) entry: every output element is θ_0 + λ/(1 − p)
    Σ_{i∈S} τ_i for some subset S of the models (λ Σ_{i∈S} τ_i without rescale), and p = 0.9
    drops some entries somewhere. The nearest of the 2^N candidates (float64) must be within
    4·N·eps_w of the summed magnitudes plus the output rounding. (This is also what a
    permutation changes for p > 0: which entries are kept, never the form of the result.)"""
    case = data.draw(cases())
    p = data.draw(st.sampled_from([0.3, 0.5, 0.9]))
    lam = data.draw(st.floats(0.1, 2.0))
    rescale = data.draw(st.booleans())
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        got, _ = m("dare", m.models(case.models), m.model(case.base), params={"p": p, "lambda": lam, "rescale": rescale,
                                                                              "seed": data.draw(st.integers(0, 99))})
    s = lam / (1 - p) if rescale else lam
    scale = 2 * case.maxabs() * (1 + case.n * s)
    kept_all = True
    for k in case.base:
        th0 = f64(case.base[k])
        taus = [f64(x[k]) - th0 for x in case.models]
        cands = torch.stack([th0 + s * sum((t for t, keep in zip(taus, mask) if keep), torch.zeros_like(th0))
                             for mask in itertools.product([False, True], repeat=case.n)])
        dist = (cands - f64(got[k])).abs()
        best = dist.min(0)
        atol = 4 * case.n * case.eps_w * scale + case.eps_o * float(f64(got[k]).abs().max())
        assert float(best.values.max()) <= atol, f"dare {k}: an element is no rescaled subset sum ({best.values.max():.3e})"
        kept_all &= bool((best.indices == 2**case.n - 1).all())
    if p == 0.9:
        assert not kept_all, "dare p=0.9 kept every entry"


@given(data=st.data())
@examples(4)
def test_ubgm_base_statistics_of_some_blocks_only(data):
    """SPEC §4: the base's Fishers are optional, zero where absent: a block the base store lacks
    is merged with H_0 = 0, the others with theirs (float64 formula, tolerance as the
    permutation test's)."""
    case = data.draw(cases())
    hs = [fisher(case, case.gen(i)) for i in range(case.n)]
    h0 = fisher(case, case.gen(99))
    missing = data.draw(st.sampled_from([W, B]))
    params = {"alpha": data.draw(st.floats(0.1, 2.0)), "delta0": 1e-3, "base_scale": data.draw(st.floats(0.5, 3.0))}
    with tempfile.TemporaryDirectory(prefix="tm-meta-") as d:
        m = Merger(d)
        got, _ = m("ubgm", m.models(case.models), m.model(case.base), m.stores([{"fisher": h} for h in hs]),
                   m.stores([{"fisher": {k: v for k, v in h0.items() if k != missing}}])[0], params)
    scale = 2 * case.maxabs() * (1 + case.n * lam_bound(params))
    for k in case.base:
        stats = [{"fisher": h} for h in hs] + ([] if k == missing else [{"fisher": h0}])
        want = elementwise_formula("ubgm", case, k, {k_: str(v) for k_, v in params.items()}, stats)
        atol = 4 * case.n * case.eps_w * scale + case.eps_o * float(want.abs().max())
        check(got[k], want, atol, f"ubgm {k} (base store lacks {missing})", case.dtype)
