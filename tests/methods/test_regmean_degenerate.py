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
        r = torch.ones(len(lams), dtype=F64) if same else 2.0 ** (2 * torch.rand(len(lams), generator=torch.Generator().manual_seed(seed + 1 + i), dtype=F64) - 1)
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
    # the float32 products' rounding, bounded row by row: M's row r is off by at most
    # (d + 2) u Σ_i ‖D_i,r‖ ‖E_i‖_F (D_i = W_i − W̄ and E_i = Ĝ_i − w_i S rounded to float32, then a
    # length-d dot product), and S^+ multiplies that by at most 1 / (smallest kept eigenvalue)
    shares = [g[live][:, live] - c * sl for c, g in zip(w, gh)]
    row_err = sum(d[:, live].norm(dim=1) * float(e.norm()) for d, e in zip(devs, shares))
    bound = (D_IN + 2) * U32 * row_err / float(lam[keep].min())
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
