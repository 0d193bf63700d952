"""RegMean and MaTS at their default precision (float32 products, float32 CG) on the Grams real
models produce: well-conditioned, ill-conditioned (κ ≥ 1e7 as stored) and exactly singular,
merged through the engine from float32 checkpoints and compared with float64 computations
written here.

The reference for RegMean is the SPEC's form W̄ + (Σ (W_i − W̄) Ĝ_i)(Σ Ĝ_i)^+ in float64, where
^+ keeps the eigenvalues above sqrt(n) 2^-24 λ_max: the statistics are float32, and an n x n
matrix rounded to float32 has eigenvalues known only to about sqrt(n) 2^-24 of its largest, so
directions below that are not determined by the data (README, "statistics").
"""

import math

import pytest
import torch

from tests.methods.test_stats_methods import rand, run

F64 = torch.float64
U32 = 2.0**-24  # unit roundoff of float32
D_IN, D_OUT, N = 16, 12, 3


def orth(d, seed):
    q, _ = torch.linalg.qr(rand(d, d, seed=seed))
    return q


def spectral_grams(lams, seed, same=False):
    """N Grams sharing an eigenbasis (as the layers after one LayerNorm do), each with the spectrum
    `lams` scaled per direction by a factor in [0.5, 2] of its own (none when `same`), stored float32."""
    q = orth(len(lams), seed)
    out = []
    for i in range(N):
        u = torch.rand(len(lams), generator=torch.Generator().manual_seed(seed + 1 + i), dtype=F64)
        r = torch.ones(len(lams), dtype=F64) if same else 2.0 ** (2 * u - 1)
        out.append(((q * (lams * r)) @ q.T).float())
    return out


def singular_grams(seed, same=False):
    """Exactly singular in float32 and float64: integer features with 3 columns that are sums of
    others (rank 12 of 16) and one input that is always zero (a dead column), over 64 tokens."""
    out = []
    for i in range(N):
        g = torch.Generator().manual_seed(seed + (0 if same else i))
        x = torch.randint(-3, 4, (64, D_IN), generator=g).to(F64)
        x[:, 12] = x[:, 0] + x[:, 1]
        x[:, 13] = x[:, 2] - x[:, 3] + x[:, 4]
        x[:, 14] = x[:, 5] + x[:, 6] + x[:, 7] + x[:, 8]
        x[:, 15] = 0.0
        out.append((x.T @ x / 64).float())  # integers / 64: exact in float32
    return out


CASES = {
    "well": lambda same: spectral_grams(torch.logspace(0, -2, D_IN, dtype=F64), 100, same),
    "ill-1e6": lambda same: spectral_grams(torch.logspace(0, -6, D_IN, dtype=F64), 200, same),
    # 12 directions the data determines (down to 3e-6) and 4 it does not (1e-10 to 5e-9: below the
    # float32 noise level of 2.4e-7, where storage rounding decides them)
    "ill-1e8": lambda same: spectral_grams(torch.cat([torch.logspace(0, -5.5, 12, dtype=F64),
                                                      torch.tensor([5e-9, 3e-9, 1e-9, 1e-10], dtype=F64)]), 300, same),
    "singular": lambda same: singular_grams(400, same),
}


def finetunes(seed, delta=1e-3):
    """Fine-tunes of one O(1) base that differ from it by `delta` (relative), as float32."""
    base = rand(D_OUT, D_IN, seed=seed)
    return [(base + delta * rand(D_OUT, D_IN, seed=seed + 1 + i)).float() for i in range(N)]


def reference(ws, grams, weights, alpha=1.0):
    """W̄ + (Σ (W_i − W̄) Ĝ_i) S^+ in float64 from the stored values, with its spectrum's facts."""
    w = [x / sum(weights) for x in weights]
    ws = [x.double() for x in ws]
    wbar = sum(c * x for c, x in zip(w, ws))
    gh = [c * (alpha * g.double() + (1 - alpha) * torch.diag(g.double().diagonal())) for c, g in zip(w, grams)]
    s = sum(gh)
    live = s.diagonal() > 0
    sl = s[live][:, live]
    lam, q = torch.linalg.eigh(sl)
    cut = math.sqrt(int(live.sum())) * U32 * float(lam.max())
    keep = lam > cut
    pinv = (q[:, keep] / lam[keep]) @ q[:, keep].T
    devs = [x - wbar for x in ws]
    m = sum(d[:, live] @ g[live][:, live] for d, g in zip(devs, gh))
    out = wbar.clone()
    out[:, live] += m @ pinv
    # the float32 products' rounding, bounded row by row. M = Σ (W_i − W̄) Ĝ_i equals Σ_i D_i E_i
    # for D_i any differences of the models (W_i − W̄, or W_i − W_1) and E_i = Ĝ_i − w_i S, whose
    # rounded products are off by at most (d + 2) u Σ_i ‖D_i,r‖ ‖E_i‖_F (D_i and E_i rounded to
    # float32, then a length-d dot product); ‖D_i,r‖ ≤ Σ_j ‖W_j,r − W̄_r‖ for either choice, and S^+
    # multiplies the error by at most 1 / (smallest kept eigenvalue)
    shares = [g[live][:, live] - c * sl for c, g in zip(w, gh)]
    row_err = sum(d[:, live].norm(dim=1) for d in devs) * sum(float(e.norm()) for e in shares)
    bound = (grams[0].shape[0] + 2) * U32 * row_err / float(lam[keep].min())
    facts = {"kappa": float(lam.max() / lam.min().clamp_min(1e-300)), "cut": cut, "lam": lam, "keep": int(keep.sum()),
             "maxdiag": float(sl.diagonal().max())}
    return out, wbar, bound, facts


def well_posed(facts):
    """No eigenvalue where the engine's Cholesky test (against the largest diagonal entry) and
    this file's cutoff (against λ_max) could disagree, nor within 2x of the cutoff."""
    lo = math.sqrt(len(facts["lam"])) * U32 * facts["maxdiag"] / 2
    return not bool(((facts["lam"] > lo) & (facts["lam"] < 2 * facts["cut"])).any())


@pytest.mark.parametrize("case", list(CASES))
def test_regmean_default_precision_against_float64(tmp_path, case):
    grams = CASES[case](False)
    weights = [0.5, 0.3, 0.2]
    ws = finetunes(1)
    _, _, _, facts = reference(ws, grams, weights)
    assert well_posed(facts), facts
    if case == "ill-1e8":
        assert facts["kappa"] >= 1e7 and facts["keep"] < D_IN  # as stored; the undetermined directions dropped
    if case == "singular":
        assert facts["keep"] == 12  # 15 live inputs of rank 12

    # identical models, different Grams: the input itself, to the bit
    same = [ws[0].clone() for _ in range(N)]
    got, _ = run(tmp_path, "regmean", [{"w": x} for x in same], [{"gram_in": {"w": g}} for g in grams], tag="sm")
    assert got["w"].dtype == torch.float32 and torch.equal(got["w"], ws[0])

    # different models, identical Grams: the weighted average, to float32's rounding of it
    same_g = CASES[case](True)
    got, _ = run(tmp_path, "regmean", [{"w": x} for x in ws], [{"gram_in": {"w": g}} for g in same_g], tag="sg",
                 params={"weights": "0.5,0.3,0.2"})
    wbar = sum(c * x.double() for c, x in zip(weights, ws))
    torch.testing.assert_close(got["w"].double(), wbar, rtol=U32, atol=0)

    # different models and Grams: the float64 solution, within the float32 products' rounding bound
    # (rows) plus the output's rounding; the old form's errors scale with |W| ≈ 1e3 |W_i − W̄| instead
    got, _ = run(tmp_path, "regmean", [{"w": x} for x in ws], [{"gram_in": {"w": g}} for g in grams], tag="df",
                 params={"weights": "0.5,0.3,0.2"})
    want, wbar, bound, _ = reference(ws, grams, weights)
    err = (got["w"].double() - want).abs()
    allowed = bound.unsqueeze(1) + U32 * want.abs()
    assert bool((err <= allowed).all()), f"{case}: worst error/allowed {float((err / allowed).max()):.3g}"
    if case == "singular":  # the dead input keeps the average column exactly as computed in float64
        torch.testing.assert_close(got["w"][:, 15].double(), wbar[:, 15], rtol=U32, atol=0)


def test_regmean_alpha_below_one_on_singular_grams(tmp_path):
    """α < 1 adds (1 − α) diag(G): the sum is invertible again; same reference, same bound."""
    grams = singular_grams(500)
    ws = finetunes(7)
    got, _ = run(tmp_path, "regmean", [{"w": x} for x in ws], [{"gram_in": {"w": g}} for g in grams],
                 params={"alpha": "0.9"})
    want, _, bound, facts = reference(ws, grams, [1.0] * N, alpha=0.9)
    assert well_posed(facts) and facts["keep"] == 15
    err = (got["w"].double() - want).abs()
    assert bool((err <= bound.unsqueeze(1) + U32 * want.abs()).all())


def test_regmean_indefinite_gram_is_refused(tmp_path):
    """Symmetric, positive diagonal, indefinite: refused with the tensor and the input named."""
    from tensormerge.errors import InputError

    good = singular_grams(600)[:2]
    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3 and -1
    bad16 = torch.eye(D_IN)
    bad16[:2, :2] = bad * 100
    ws = finetunes(3)
    with pytest.raises(InputError, match=r"tensor 'w': gram_in of input 2 .*not a Gram matrix.*indefinite"):
        run(tmp_path, "regmean", [{"w": x} for x in ws], [{"gram_in": {"w": g}} for g in (good[0], bad16, good[1])])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- mats, float32 CG
def kfac_matrix(ga, gb):
    """Σ_i B_i ⊗ A_i on row-major vec(W) (W [out, in], C_i W = B_i W A_i), in float64."""
    return sum(torch.kron(b.double(), a.double()) for a, b in zip(ga, gb))


@pytest.mark.parametrize("objective", ["kfac", "regmean"])
@pytest.mark.parametrize("conditioning", ["well", "ill"])
def test_mats_default_precision_against_float64_solve(tmp_path, objective, conditioning):
    """MaTS' defaults (float32 CG, tol 1e-5, 100 iterations, task-arithmetic start) against the
    float64 direct solve x* of (Σ C_i) x = Σ C_i θ_i. CG stops on its residual, not on the error:
    the float64 residual ‖b − K x‖/‖b‖ of what the engine returns must meet the requested tol
    1e-5 (not the residual the code reports), up to the float32 rounding of b and of one matvec
    (2 d u (‖b‖ + ‖K‖ ‖x‖), d the length of each dot product), within fewer than the 100
    iterations allowed; the reported residual must be that float64 one to the same slack. For SPD
    K, ‖x − x*‖ ≤ ‖K x − b‖ / λ_min(K) then bounds the error, which is tight where K is well
    conditioned (κ ≈ 1e2: also within 1e-3 of ‖x*‖). Where κ > 1e5 that bound is κ (1e-5 +
    slack) ‖x*‖-sized, larger than x* itself: no independent error bound is possible there from
    float32 storage (the Grams' rounding alone moves x* by κ u), so only the residual is held."""
    out_d, in_d = 6, 8
    span = {"well": 1.0, "ill": 6.0}[conditioning]
    ga = spectral_grams(torch.logspace(0, -span, in_d, dtype=F64), 700)
    gb = spectral_grams(torch.logspace(0, -1, out_d, dtype=F64), 800) if objective == "kfac" \
        else [torch.eye(out_d)] * N  # the regmean objective: C_i W = W A_i
    ws = finetunes(9, delta=1e-2)
    ws = [x[:out_d, :in_d].contiguous() for x in ws]
    base = (sum(x.double() for x in ws) / N + 1e-2 * rand(out_d, in_d, seed=77)).float()
    stats = [{"gram_in": {"w": a}} | ({"gram_out": {"w": b}} if objective == "kfac" else {}) for a, b in zip(ga, gb)]
    got, rep = run(tmp_path, "mats", [{"w": x} for x in ws], stats, base={"w": base},
                   params={"objective": objective})
    k = kfac_matrix(ga, gb)
    b = sum(torch.kron(bb.double(), a.double()) @ x.double().reshape(-1) for a, bb, x in zip(ga, gb, ws))
    want = torch.linalg.solve(k, b)
    lam = torch.linalg.eigvalsh(k)
    x = got["w"].double().reshape(-1)
    block = rep["blocks"][0]
    tol = 1e-5
    dot = in_d * (out_d if objective == "kfac" else 1) * N
    slack = 2 * dot * U32 * (float(b.norm()) + float(lam.max()) * float(x.norm())) / float(b.norm())
    res64 = float((b - k @ x).norm() / b.norm())
    assert block["cg_iterations"] < 100, block
    assert res64 <= tol + slack, (res64, tol, slack)
    assert abs(res64 - block["cg_residual"]) <= slack, (res64, block["cg_residual"], slack)
    assert float((x - want).norm()) <= (tol + slack) * float(b.norm()) / float(lam.min())
    if conditioning == "well":
        assert float(lam.max() / lam.min()) < 1e3
        assert float((x - want).norm()) <= 1e-3 * float(want.norm())
    else:
        assert float(lam.max() / lam.min()) > 1e5


def test_mats_regmean_objective_keeps_its_start_where_the_grams_are_singular(tmp_path):
    """CG moves only within the range of Σ A_i: along the null directions (collinear inputs) and
    the dead input, the result is the task-arithmetic start, at the default float32 precision
    (float32 rounding of the start and of CG's steps: 1e-5 of |θ|)."""
    ga = singular_grams(400)
    ws = finetunes(1)
    base = (sum(x.double() for x in ws) / N + 1e-2 * rand(D_OUT, D_IN, seed=77)).float()
    got, _ = run(tmp_path, "mats", [{"w": x} for x in ws], [{"gram_in": {"w": a}} for a in ga], base={"w": base},
                 params={"objective": "regmean"})
    s = sum(a.double() for a in ga)
    lam, q = torch.linalg.eigh(s)
    null = q[:, lam < 1e-9 * lam.max()]
    assert null.shape[1] == 4  # three collinear inputs and the dead one
    x0 = base.double() + 0.3 * sum(x.double() - base.double() for x in ws)
    g = got["w"].double()
    torch.testing.assert_close(g @ null, x0 @ null, rtol=0, atol=1e-5 * float(x0.abs().max()))


@pytest.mark.parametrize("kind", ["negative-eigenvalue", "zero-diagonal"])
def test_regmean_indefinite_gram_beside_a_large_one_is_refused(tmp_path, kind):
    """Each Gram is checked, not only their sum: [[1, 2], [2, 1]] (eigenvalues 3, −1) beside 10·I
    sums to a definite matrix, and so does a Gram whose zero diagonal entry has non-zero entries
    in its row (never a Gram: Σ x_j² = 0 makes every Σ x_j x_k zero). Both are refused, naming the
    input; nothing is written."""
    from tensormerge.errors import InputError

    bad = torch.tensor([[1.0, 2.0], [2.0, 1.0]]) if kind == "negative-eigenvalue" \
        else torch.tensor([[0.0, 0.5], [0.5, 4.0]])
    ws = [rand(3, 2, seed=i).float() for i in range(2)]
    with pytest.raises(InputError, match=r"tensor 'w': gram_in of input 1 .*not a Gram matrix.*indefinite"):
        run(tmp_path, "regmean", [{"w": x} for x in ws], [{"gram_in": {"w": g}} for g in (bad, 10 * torch.eye(2))])
    assert not (tmp_path / "out").exists()


def test_regmean_solves_every_direction_of_inputs_with_a_massive_channel(tmp_path):
    """One input channel ~2000x the others (an LLM's massive activation): Σ Ĝ spans 6.5 orders of
    magnitude, yet every entry is stored to 2^-24 of itself and every direction is determined.
    The merge is the exact (Σ W_i Ĝ_i)(Σ Ĝ_i)^-1, not the average along the small directions (a
    cutoff against λ_max dropped them: 0.7 off)."""
    grams, ws = [], finetunes(7, delta=0.3)
    for i in range(N):
        x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(50 + i), dtype=F64)
        x[:, 0] *= 2000.0
        grams.append((x.T @ x / 256).float())
    s = sum(g.double() for g in grams) / N
    d = s.diagonal().sqrt()
    scaled = torch.linalg.eigvalsh(s / d[:, None] / d[None, :])
    lam = torch.linalg.eigvalsh(s)
    assert float(lam.min()) < math.sqrt(D_IN) * U32 * float(lam.max())  # below the unscaled cutoff
    assert float(scaled.min()) > 100 * math.sqrt(D_IN) * U32  # yet well determined
    want = sum(w.double() @ g.double() for w, g in zip(ws, grams)) @ torch.linalg.inv(sum(g.double() for g in grams))
    got, _ = run(tmp_path, "regmean", [{"w": x} for x in ws], [{"gram_in": {"w": g}} for g in grams], tag="mc")
    scale = float(want.abs().max())
    assert float((got["w"].double() - want).abs().max()) < 1e-4 * scale
    wbar = sum(w.double() for w in ws) / N
    assert float((wbar - want).abs().max()) > 1e-2 * scale  # the average is far from it: the test can fail
