"""The linear algebra under RegMean and MaTS against float64 references written here."""

import pytest
import torch

from tensormerge.kernels import linalg as L

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_scale_offdiag_keeps_the_diagonal():
    m = rand(2, 4, 4)
    got = L.scale_offdiag(m, 0.25)
    for i in range(2):
        want = 0.25 * m[i] + 0.75 * torch.diag(torch.diagonal(m[i]))
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-15)
    assert L.scale_offdiag(m, 1.0) is not m


def test_spd_factor_cholesky_and_eigh_paths():
    x = rand(40, 6, seed=1)
    s = x.T @ x
    m = rand(3, 6, seed=2)
    f = L.spd_factor(s)
    assert f.kind == "cholesky"
    torch.testing.assert_close(f.solve_right(m), torch.linalg.solve(s, m.T).T, rtol=1e-10, atol=1e-12)
    # rank 3 of 6, as float32 storage leaves it: the null space is dropped (X S^+)
    low = rand(40, 3, seed=3) @ rand(3, 6, seed=4)
    s = (low.T @ low).float().double()
    f = L.spd_factor(s)
    assert f.kind == "eigh"
    torch.testing.assert_close(f.solve_right(m), m @ torch.linalg.pinv(s, hermitian=True, rtol=1e-6),
                               rtol=1e-6, atol=1e-8)
    # inputs that never vary are not live
    s = torch.zeros(5, 5, dtype=F64)
    s[:3, :3] = rand(10, 3, seed=5).T @ rand(10, 3, seed=5)
    f = L.spd_factor(s)
    assert f.live.tolist() == [True, True, True, False, False] and f.kind == "cholesky"


def test_smallest_eigenvalue_estimate():
    q, _ = torch.linalg.qr(rand(50, 50, seed=6))
    evals = torch.logspace(-6, 2, 50, dtype=F64)
    s = q @ torch.diag(evals) @ q.T
    est = L._smallest_eigenvalue(s, torch.linalg.cholesky(s))
    assert evals[0] * (1 - 1e-8) <= est <= 1.5 * evals[0]  # an upper estimate, to float64 rounding


def test_conjugate_gradient_matches_solve_and_caps():
    x = rand(30, 8, seed=7)
    a = x.T @ x
    b = rand(8, seed=8)
    res = L.conjugate_gradient(lambda v: a @ v, b, torch.zeros(8, dtype=F64), 100, 1e-12)
    torch.testing.assert_close(res.x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    assert res.residual <= 1e-12
    capped = L.conjugate_gradient(lambda v: a @ v, b, torch.zeros(8, dtype=F64), 2, 0.0)
    assert capped.iterations == 2
    assert capped.residual == pytest.approx(float((b - a @ capped.x).norm() / b.norm()), rel=1e-12)
    zero = L.conjugate_gradient(lambda v: a @ v, torch.zeros(8, dtype=F64), rand(8, seed=9), 10, 1e-5)
    assert zero.iterations == 0 and torch.equal(zero.x, torch.zeros(8, dtype=F64))


def test_spd_factor_refuses_an_indefinite_sum_and_regmean_names_the_gram():
    x = rand(30, 4, seed=10)
    good = x.T @ x / 30
    bad = torch.eye(4, dtype=F64)
    bad[:2, :2] = torch.tensor([[1.0, 2.0], [2.0, 1.0]]) * 50  # positive diagonal, eigenvalue -50
    with pytest.raises(L.IndefiniteError):
        L.spd_factor(good + bad)
    with pytest.raises(L.IndefiniteGram) as e:
        L.regmean_prepare([good.float(), good.float(), bad.float()], 1.0, [1.0, 1.0, 1.0])
    assert e.value.index == 2 and e.value.smallest == pytest.approx(-50.0)
    # a PSD sum whose float32 rounding leaves eigenvalues a little below zero is not refused
    low = rand(40, 2, seed=11) @ rand(2, 4, seed=12)
    f = L.spd_factor((low.T @ low).float().double())
    assert f.kind == "eigh"


def test_regmean_rows_keep_the_average_where_the_grams_say_nothing():
    """Identical models: exactly themselves, whatever the Grams; rows of different models along a
    null direction of Σ Ĝ: the average's, not zero (the minimum-norm answer)."""
    g = torch.zeros(4, 4, dtype=F64)
    g[:3, :3] = torch.tensor([[2.0, 1.0, 3.0], [1.0, 2.0, 3.0], [3.0, 3.0, 6.0]])  # x2 = x0 + x1; x3 dead
    w = rand(300, 4, seed=13).float()
    fac = L.regmean_prepare([g.float(), (2 * g).float()], 1.0, [0.7, 0.3])
    assert torch.equal(L.regmean_rows([w, w.clone()], fac, 256), w.double())
    w2 = rand(300, 4, seed=14).float()
    got = L.regmean_rows([w, w2], fac, 256)
    wbar = 0.7 * w.double() + 0.3 * w2.double()
    null = torch.tensor([1.0, 1.0, -1.0], dtype=F64) / 3**0.5
    torch.testing.assert_close(got[:, :3] @ null, wbar[:, :3] @ null, rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, 3], wbar[:, 3], rtol=0, atol=1e-12)
