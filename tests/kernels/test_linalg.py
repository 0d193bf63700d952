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
    # rank 3 of 6, as float32 storage leaves it: the null space is dropped (minimum-norm answer)
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
    assert evals[0] <= est <= 1.5 * evals[0]


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
