"""The linear algebra under RegMean and MaTS against float64 references written here."""

import math

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
    # b = 0 with A invertible: the only solution is 0, reached from the start (not returned blindly)
    x0 = rand(8, seed=9)
    zero = L.conjugate_gradient(lambda v: a @ v, torch.zeros(8, dtype=F64), x0, 100, 1e-10)
    assert 0 < zero.iterations <= 8 and not zero.no_information
    assert float(zero.x.norm()) <= 1e-8 * float(x0.norm())
    # with ‖b‖ = 0 the residual is relative to ‖A x0‖, the start's own
    assert zero.residual == pytest.approx(float((a @ zero.x).norm() / (a @ x0).norm()), rel=1e-9)


def test_conjugate_gradient_without_information_keeps_the_start_exactly():
    """A = 0 (statistics zero in every model) forces b = 0: the start is the answer, bit for bit."""
    for dtype in (torch.float32, F64):
        x0 = rand(5, 4, seed=3).to(dtype)
        res = L.conjugate_gradient(lambda v: torch.zeros_like(v), torch.zeros(5, 4, dtype=dtype), x0, 100, 1e-5)
        assert torch.equal(res.x, x0) and res.x is not x0
        assert res.iterations == 0 and res.residual == 0.0 and res.no_information


def rank_r(n, r, seed):
    """A PSD [n, n] of rank r and the orthonormal basis of its range, in float64."""
    q, _ = torch.linalg.qr(rand(n, n, seed=seed))
    qr = q[:, :r]
    return qr @ torch.diag(torch.linspace(3.0, 0.7, r, dtype=F64)) @ qr.T, qr


@pytest.mark.parametrize("rhs", ["in_range", "zero"])
def test_conjugate_gradient_moves_the_start_only_within_the_range(rhs):
    """CG from x0 on A x = b (b in range(A)) ends at x0 − P x0 + A⁺ b, P the projector on range(A):
    the start's null-space part is untouched; with b = 0 that is the start's null-space part alone."""
    a, q = rank_r(8, 3, seed=11)
    theta = rand(8, seed=12)
    b = a @ theta if rhs == "in_range" else torch.zeros(8, dtype=F64)
    x0 = rand(8, seed=13)
    p = q @ q.T
    want = x0 - p @ x0 + (p @ theta if rhs == "in_range" else 0)
    res = L.conjugate_gradient(lambda v: a @ v, b, x0, 100, 1e-12)
    torch.testing.assert_close(res.x, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.x - p @ res.x, x0 - p @ x0, rtol=0, atol=1e-12)
    assert res.iterations <= 4 and res.residual <= 1e-12 and not res.no_information


def test_conjugate_gradient_tiny_right_hand_side_is_solved_not_zeroed():
    """float32 with ‖b‖ ~ 1e-24: squares of its entries underflow float32, not float64."""
    d = torch.linspace(0.5, 2.0, 16, dtype=torch.float32)
    theta = (rand(16, seed=5) * 1e-25).float()
    b = d * theta
    res = L.conjugate_gradient(lambda v: d * v, b, torch.zeros(16), 100, 1e-6)
    want = b.double() / d.double()
    assert not res.no_information and res.iterations > 0
    torch.testing.assert_close(res.x.double(), want, rtol=1e-4, atol=0)
    assert res.residual <= 1e-6


def test_dot_is_float64_and_sliced_deterministically():
    """Products of float32 entries near 1e-30 underflow in float32; the sum must not depend on
    how it is cut (slices, threads)."""
    a = (rand(70001, seed=1) * 1e-30).float()
    b = (rand(70001, seed=2) * 1e-30).float()
    want = float(a.double() @ b.double())
    got = L._dot(a, b)
    assert got == pytest.approx(want, rel=1e-12) and got != 0.0
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = L._dot(a, b)
    finally:
        torch.set_num_threads(threads)
    assert one == got


@pytest.mark.parametrize("top", [1e-30, 3e-3, 7e25, 1e-44])
def test_pow2_scale_is_exact_and_a_normal_float32(top):
    """Scaling statistics for CG must not change their bits' meaning: a power of two, undone
    exactly, bringing the largest entry to [0.5, 1) unless that needs more than 2^126."""
    g = [(rand(6, seed=i).abs() / 3 * top).float() for i in range(2)]
    c = L.pow2_scale(g)
    assert math.frexp(c)[0] == 0.5 and 2.0**-126 <= c <= 2.0**126
    scaled = [x * c for x in g]
    m = max(float(x.abs().max()) for x in scaled)
    assert (0.5 <= m < 1.0) if top > 1e-37 else m > 2.0**-30
    for x, y in zip(g, scaled):
        assert torch.isfinite(y).all() and torch.equal(y * (1 / c), x)
    assert L.pow2_scale([torch.zeros(3)]) == 1.0


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


@pytest.mark.parametrize("shape", [(9, 5), (3, 7), (1, 4), (0, 3)])
def test_kfac_products_equal_the_formula_and_not_the_thread_count(monkeypatch, shape):
    """Σ_i B_i W A_i and Σ_i B_i W_i A_i against float64 written here; on CPU the (model, row
    block) products run on threads, and their bytes do not depend on how many."""
    from tensormerge.kernels import threads

    out, inp = shape
    a32 = torch.stack([(lambda m: m @ m.T)(rand(inp, inp, seed=i)) for i in range(3)]).float()
    b32 = torch.stack([(lambda m: m @ m.T)(rand(out, out, seed=10 + i)) for i in range(3)]).float()
    w32, ws32 = rand(out, inp, seed=20).float(), rand(3, out, inp, seed=21).float()
    a, b, w, ws = a32.double(), b32.double(), w32.double(), ws32.double()
    want_apply = sum(b[i] @ w @ a[i] for i in range(3))
    want_rhs = sum(b[i] @ ws[i] @ a[i] for i in range(3))
    runs = []
    for n in (1, 2, 4):
        monkeypatch.setattr(threads, "workers", lambda n=n: n)
        runs.append((L.kfac_apply(a32, b32)(w32), L.kfac_rhs(a32, b32, ws32)))
    for got_apply, got_rhs in runs:
        assert got_apply.shape == (out, inp) and got_apply.dtype == torch.float32
        scale = max([1.0] + [float(t.abs().max()) for t in (want_apply, want_rhs) if t.numel()])
        torch.testing.assert_close(got_apply.double(), want_apply, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(got_rhs.double(), want_rhs, rtol=1e-5, atol=1e-5 * scale)
        assert torch.equal(got_apply, runs[0][0]) and torch.equal(got_rhs, runs[0][1])
