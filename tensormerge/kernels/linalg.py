"""Matrix arithmetic of the statistics methods: off-diagonal scaling, the guarded SPD solve that
RegMean reuses across a weight's row chunks, and conjugate gradient with batched operators.

Layout is torch's: a linear weight W is [out, in], its input Gram A is [in, in] and its
output-gradient Gram B is [out, out]; the Kronecker-factored Fisher acts as W -> B W A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


def scale_offdiag(m: torch.Tensor, alpha: float) -> torch.Tensor:
    """S_α(M) = α M + (1 − α) diag(M) over the last two dims; always a new tensor."""
    out = m * alpha if alpha != 1.0 else m.clone()
    out.diagonal(dim1=-2, dim2=-1).copy_(m.diagonal(dim1=-2, dim2=-1))
    return out


def symmetric_defect(g: torch.Tensor) -> float:
    """max |G − Gᵀ| relative to max |G|: Grams accumulated in float32 are symmetric to ~1e-6."""
    scale = float(g.abs().max())
    return float((g - g.T).abs().max()) / scale if scale > 0 else 0.0


# ----------------------------------------------------------------------------- SPD solve
class IndefiniteError(ValueError):
    """The matrix factorised has an eigenvalue clearly below zero: not a sum of Grams."""

    def __init__(self, smallest: float, largest: float):
        super().__init__(f"smallest eigenvalue {smallest:.3g} against largest {largest:.3g}")
        self.smallest, self.largest = smallest, largest


# An eigenvalue below -INDEFINITE x λ_max is not rounding: float32 storage and accumulation move a
# PSD matrix's eigenvalues by about sqrt(n) 2^-24 λ_max (2^-24 n at worst, 1.7e-3 for n = 28672),
# while a symmetric matrix that is not a Gram has negative eigenvalues of the order of its others.
INDEFINITE = 1e-2


@dataclass
class SPDSolver:
    """A factorisation of a symmetric PSD S restricted to its live rows (non-zero diagonal),
    applied from the right (X S = M) as often as needed. Cholesky when S is safely positive
    definite; otherwise an eigendecomposition that drops the null space (X S^+, the minimum-norm
    X: RegMean solves for the deviation from the average, so what is dropped there is the
    deviation and the average is kept). Never an explicit inverse."""

    live: torch.Tensor
    kind: str
    chol: torch.Tensor | None = None
    eigvecs: torch.Tensor | None = None
    inv_eigvals: torch.Tensor | None = None

    def solve_right(self, m: torch.Tensor) -> torch.Tensor:
        """X with X S = M for M [rows, live] (float64)."""
        if self.kind == "cholesky":
            return torch.cholesky_solve(m.T.contiguous(), self.chol).T
        q = self.eigvecs
        return ((m @ q) * self.inv_eigvals) @ q.T


def noise_level(n: int) -> float:
    """Relative size, against λ_max, of the eigenvalues float32 storage leaves undetermined in an
    n x n PSD matrix: each entry is known to 2^-24 of the largest, and n such errors of random
    sign move an eigenvalue by about sqrt(n) of them."""
    return math.sqrt(n) * 2.0**-24


def spd_factor(s: torch.Tensor) -> SPDSolver:
    """Raises IndefiniteError when S has an eigenvalue below -INDEFINITE λ_max."""
    s = s.to(torch.float64)
    live = s.diagonal() > 0
    sl = s if bool(live.all()) else s[live][:, live]
    n = sl.shape[0]
    if n == 0:
        return SPDSolver(live, "empty")
    # Statistics are stored in float32, so each entry is known to about 2^-24 of itself, and of
    # sqrt(S_ii S_jj) at most (S is PSD). With the diagonal scaled to one (C = D^-1/2 S D^-1/2,
    # Jacobi), every entry is known to 2^-24 of the largest: directions of C with eigenvalues
    # below that are noise, and solving along them would amplify it. Scaled, an input channel
    # 2000x the others (an LLM's massive activation) no longer sends the rest below the cutoff;
    # unscaled, it did, and RegMean averaged directions every Gram determined.
    noise = noise_level(n)
    d = sl.diagonal().sqrt()
    c = sl / d.unsqueeze(1) / d.unsqueeze(0)
    chol_c, info = torch.linalg.cholesky_ex(c)
    if int(info) == 0 and _smallest_eigenvalue(c, chol_c) > noise:
        return SPDSolver(live, "cholesky", chol=chol_c * d.unsqueeze(1))  # S = (D^1/2 L)(D^1/2 L)^T
    # Not determined along some direction: the eigendecomposition of S itself, whose pseudo-
    # inverse drops what lies below the noise of its largest entries (the minimum-norm solution)
    evals, evecs = torch.linalg.eigh(sl)
    top = float(evals.max())
    if float(evals.min()) < -INDEFINITE * top:
        raise IndefiniteError(float(evals.min()), top)
    cutoff = top * noise
    inv = torch.where(evals > cutoff, 1.0 / evals.clamp_min(cutoff if cutoff > 0 else 1.0), torch.zeros_like(evals))
    return SPDSolver(live, "eigh", eigvecs=evecs, inv_eigvals=inv)


def _smallest_eigenvalue(s: torch.Tensor, chol: torch.Tensor, block: int = 8, iterations: int = 6) -> float:
    """An upper estimate of λ_min(S) by block inverse iteration with the Cholesky factor and a
    Rayleigh-Ritz step: a few solves with 8 right-hand sides cost about as much memory traffic
    as one, and O(n²) each against eigh's 9n³."""
    n = chol.shape[0]
    k = min(block, n)
    grid = torch.arange(n, dtype=chol.dtype, device=chol.device).unsqueeze(1)
    x = torch.cos(grid * torch.arange(1, k + 1, dtype=chol.dtype, device=chol.device) * (math.pi / (n + 1)) + 0.3)
    for _ in range(iterations):
        y = torch.cholesky_solve(x, chol)
        if not bool(torch.isfinite(y).all()):
            return 0.0
        x, _ = torch.linalg.qr(y)
    ritz = torch.linalg.eigvalsh(x.T @ (s @ x))
    return float(ritz.min())


# ----------------------------------------------------------------------------- RegMean
class IndefiniteGram(ValueError):
    """Input `index`'s scaled Gram has a clearly negative eigenvalue (found once the sum's did)."""

    def __init__(self, index: int, smallest: float, largest: float):
        super().__init__(f"input {index + 1}: smallest eigenvalue {smallest:.3g} against largest {largest:.3g}")
        self.index, self.smallest, self.largest = index, smallest, largest


@dataclass
class RegMeanFactor:
    shares: torch.Tensor  # (N − 1, live, live): Ĝ_i − w_i S for i > 1, each Gram's departure from its share
    solver: SPDSolver  # of S = Σ Ĝ_i
    weights: list[float]  # normalised: the average W̄ = Σ w_i W_i
    product_dtype: torch.dtype


def regmean_prepare(grams: list[torch.Tensor], alpha: float, weights: list[float],
                    product_dtype: torch.dtype = torch.float32) -> RegMeanFactor:
    """Once per weight: the factorisation of S = Σ Ĝ_i (Ĝ_i = w_i S_α(G_i), float64) and the
    products' right factors E_i = Ĝ_i − w_i S (i > 1), cast to `product_dtype` (float32 as in the
    research code). E_i is zero when the Grams agree, and the rows multiply it by W_i − W_1: the
    rounding of float32 products scales with how much both the models and the Grams differ,
    never with the size of W or of S (which S's condition number would amplify)."""
    total = sum(weights)
    w = [x / total for x in weights]
    # float64 buffers reused across models (no fresh d² allocation per Gram); the live columns
    # (non-zero diagonal of the sum) are known after the first pass, so S and the shares are
    # made at (live, live) directly: at most e(N − 1) d² + 24 d² at once (`fixed_bytes`)
    acc = torch.zeros(grams[0].shape, dtype=torch.float64, device=grams[0].device)
    buf = torch.empty_like(acc)
    for i, (gi, wi) in enumerate(zip(grams, w)):
        _check_gram(_scaled_into(buf, gi, alpha, wi), i, wi)
        acc.add_(buf)
    live = acc.diagonal() > 0
    idx = None
    if not bool(live.all()):
        idx = live.nonzero().squeeze(1)
        acc = acc[idx.unsqueeze(1), idx]
        buf = torch.empty_like(acc)
    shares = torch.empty((len(grams) - 1,) + tuple(acc.shape), dtype=product_dtype, device=acc.device)
    for share, gi, wi in zip(shares, grams[1:], w[1:]):
        g = gi if idx is None else gi[idx.unsqueeze(1), idx]
        share.copy_(_scaled_into(buf, g, alpha, wi).sub_(acc, alpha=wi))
    del buf
    try:
        solver = spd_factor(acc)
    except IndefiniteError:
        raise _which_gram(grams, alpha, w) from None
    del acc
    solver.live = live  # acc was the live block: the rows need the mask over all d columns
    return RegMeanFactor(shares, solver, w, product_dtype)


def _check_gram(g: torch.Tensor, index: int, weight: float) -> None:
    """Refuses a scaled Gram that is clearly indefinite, each one, not only their sum (an
    indefinite Gram beside a large positive one leaves the sum definite). A Cholesky of
    Ĝ + INDEFINITE·max(diag)·I succeeds whenever λ_min > −INDEFINITE λ_max (max diag ≤ λ_max), so
    only a failure costs the eigenvalues that decide; and a zero diagonal entry with a non-zero
    entry in its row is never a Gram (Σ x_j² = 0 makes every Σ x_j x_k = 0). The eigenvalues
    reported are S_α(G)'s (g / weight), as the user's store holds them."""
    diag = g.diagonal()
    dead = diag == 0
    top = float(diag.max()) if diag.numel() else 0.0
    bad_row = bool(dead.any()) and bool(g[dead].any())
    if not bad_row:
        if top <= 0 and not bool((diag < 0).any()):
            return  # all zero
        if top > 0:
            saved = diag.clone()  # restored exactly: the sum must not see the shift's rounding
            diag.add_(INDEFINITE * top)
            _, info = torch.linalg.cholesky_ex(g)
            diag.copy_(saved)
            if int(info) == 0:
                return
    ev = torch.linalg.eigvalsh(g) / weight
    lo, hi = float(ev.min()), float(ev.max())
    if bad_row or lo < -INDEFINITE * max(hi, 0.0):
        raise IndefiniteGram(index, lo, hi)


def _scaled_into(buf: torch.Tensor, g: torch.Tensor, alpha: float, w: float) -> torch.Tensor:
    """buf = w S_α(g) in float64, in place."""
    buf.copy_(g)
    diag = buf.diagonal().clone()
    buf.mul_(alpha * w)
    buf.diagonal().copy_(diag.mul_(w))
    return buf


def _which_gram(grams: list[torch.Tensor], alpha: float, w: list[float]) -> IndefiniteGram:
    """The sum has a clearly negative eigenvalue, so some Gram has one: the most negative."""
    found = []
    for i, gi in enumerate(grams):
        ev = torch.linalg.eigvalsh(scale_offdiag(gi.to(torch.float64), alpha))
        found.append((float(ev.min()) / max(float(ev.max()), 1e-300), i, float(ev.min()), float(ev.max())))
    _, i, lo, hi = min(found)
    return IndefiniteGram(i, lo, hi)


def regmean_rows(inputs: list[torch.Tensor], fac: RegMeanFactor, tile: int) -> torch.Tensor:
    """W* rows = W̄ + (Σ (W_i − W̄) Ĝ_i) S^+ for rows of [out, in] weights, in float64: the
    deviation from the average W̄ is what is solved for, so the models agreeing gives exactly W̄,
    and W̄ is kept along directions no Gram determines (the null space S^+ drops) and in the
    columns no model ever feeds (not live).

    Since Σ_i E_i = 0 and Σ_i w_i (W_i − W̄) = 0, Σ (W_i − W̄) Ĝ_i = Σ_{i>1} (W_i − W_1) E_i: N − 1
    products of differences, each zero when the models or the Grams agree. W̄ is
    W_1 + Σ w_i (W_i − W_1) in float64, exact when the models agree. Rows are taken `tile` at a
    time into buffers of their own, so each product has the same shape and operands whatever
    chunk the rows came in: the bytes do not depend on the chunking."""
    rows, d = inputs[0].shape
    out = torch.empty(rows, d, dtype=torch.float64, device=inputs[0].device)
    live = fac.solver.live
    all_live = bool(live.all())
    f64, pd = torch.float64, fac.product_dtype
    for t in range(0, rows, tile):
        e = min(t + tile, rows)
        first = inputs[0][t:e].to(f64, copy=True)
        avg = out[t:e]
        avg.copy_(first)
        m = None
        for x, c, ei in zip(inputs[1:], fac.weights[1:], fac.shares):
            diff = x[t:e].to(f64).sub(first)  # W_i − W_1 in float64
            avg.add_(diff, alpha=c)
            if fac.solver.kind == "empty":
                continue
            dp = diff.to(pd) if all_live else diff[:, live].to(pd)
            if m is None:
                m = torch.zeros(e - t, dp.shape[1], dtype=pd, device=out.device)
            m.addmm_(dp, ei)
        if m is None:  # one model, or no live input
            continue
        if all_live:
            avg.add_(fac.solver.solve_right(m.to(f64)))
        else:
            avg[:, live] += fac.solver.solve_right(m.to(f64))
    return out


# ----------------------------------------------------------------------------- CG
@dataclass
class CGResult:
    x: torch.Tensor
    iterations: int
    # ‖b − A x‖ of the returned x (recomputed, not the recurrence's) relative to ‖b‖; when b = 0,
    # relative to ‖A x0‖, the part of the start the system can see; 0 when that is zero too
    residual: float
    no_information: bool = False  # b = 0 and A x0 = 0: the system says nothing, x is the start
    # the lowest residual CG's recurrence reached on the way, relative as above: far below the
    # final one, rounding over many iterations led CG away from where it had been
    lowest_residual: float = 0.0


_DOT_ROW = 1 << 15  # elements summed by one thread (TensorIterator's grain): rows, never split
_DOT_SLICE = 1 << 20  # elements converted to float64 at once: 8 MiB per operand


def dot_workspace_bytes(numel: int) -> int:
    """Bytes `_dot` holds at once: both operands' float64 slices and their product."""
    return 24 * min(numel, _DOT_SLICE)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a b in float64, products included: float32 squares of entries below ~1e-23 underflow.
    Summed in fixed rows of 2^15 (each reduced whole by one thread) and the rows' sums added
    exactly (fsum), so the value depends neither on the thread count nor on the slicing."""
    a, b = a.reshape(-1), b.reshape(-1)
    n = a.numel()
    full = n - n % _DOT_ROW
    parts: list[float] = []
    for s in range(0, full, _DOT_SLICE):
        e = min(s + _DOT_SLICE, full)
        x = a[s:e].to(torch.float64).view(-1, _DOT_ROW)
        y = b[s:e].to(torch.float64).view(-1, _DOT_ROW)
        parts.extend(torch.sum(x * y, dim=1).tolist())
    if full < n:
        parts.append(float(torch.sum(a[full:].to(torch.float64) * b[full:].to(torch.float64))))
    return math.fsum(parts)


def pow2_scale(tensors: list[torch.Tensor]) -> float:
    """The power of two that brings the largest |entry| into [0.5, 1): multiplying a system's
    operator and right-hand side by it is exact and leaves CG's iterates unchanged, while
    statistics of 1e-30 (whose products with CG's vectors underflow float32) become ~1. Kept
    within 2^±126, a normal float32 itself (subnormal statistics are only brought up to ~2^-22)."""
    m = max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
    if m == 0.0 or not math.isfinite(m):
        return 1.0
    return math.ldexp(1.0, max(-126, min(126, -math.frexp(m)[1])))


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor,
                       max_iter: int, tol: float, record: Sequence[int] = ()) -> CGResult | dict[int, CGResult]:
    """CG on A x = b for PSD A from x0, stopping when ‖r‖ ≤ tol‖b‖ (scipy's rule) or after
    max_iter matvecs; no preconditioner and no damping, as in the MaTS code.

    Every step adds a multiple of a residual, and residuals lie in range(A) (b does, for
    b = Σ C_i θ_i): x only moves within A's range and keeps the start's null-space part. So
    A = 0 returns the start, and b = 0 with A ≠ 0 projects the start onto A's null space
    (the stopping rule then measures ‖r‖ against ‖A x0‖).

    `record`: iteration counts (each <= max_iter) whose results are wanted from this one solve:
    a dict of what `conjugate_gradient(..., max_iter=k, tol)` returns for each k, bit for bit
    (the iterates are the same up to k; a solve that stops earlier gives its result to every
    larger k), so a sweep of MaTS' iteration count is one solve."""
    wanted = sorted(set(record))
    if wanted and (wanted[0] < 0 or wanted[-1] > max_iter):
        raise ValueError(f"record {wanted}: counts must lie in [0, {max_iter}]")
    if wanted:
        max_iter = wanted[-1]
    x = x0.to(b.dtype, copy=True)
    bnorm = math.sqrt(_dot(b, b))
    r = b - apply(x)
    rr = _dot(r, r)
    scale = bnorm if bnorm > 0.0 else math.sqrt(rr)  # b = 0: r0 = −A x0
    if scale == 0.0:  # b = 0 and A x0 = 0: nothing to solve for, nothing to measure against
        if wanted:
            return {k: CGResult(x.clone(), 0, 0.0, no_information=True) for k in wanted}
        return CGResult(x, 0, 0.0, no_information=True)
    found: dict[int, CGResult] = {}
    lowest = rr

    def result(final: bool) -> CGResult:
        res = b - apply(x)
        return CGResult(x if final else x.clone(), k, math.sqrt(_dot(res, res)) / scale,
                        lowest_residual=math.sqrt(lowest) / scale)

    if 0 in wanted:
        found[0] = result(False)
    p = r.clone()
    k = 0
    while k < max_iter and math.sqrt(rr) > tol * scale:
        ap = apply(p)
        pap = _dot(p, ap)
        if pap <= 0.0:  # p in A's null space: nothing left to gain along it
            break
        a = rr / pap
        x.add_(p, alpha=a)
        r.sub_(ap, alpha=a)
        rr_new = _dot(r, r)
        k += 1
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
        lowest = min(lowest, rr)
        if k in wanted and k < wanted[-1]:
            found[k] = result(False)
    if not wanted:
        return result(True)
    last = result(True)
    for c in wanted:
        found.setdefault(c, last)
    return found


# Row blocks of a K-FAC product, fixed (not the core count), so the bytes never depend on it.
KFAC_ROW_PARTS = 4


def _kfac_sum(a: torch.Tensor, b: torch.Tensor, w_of: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Σ_i B_i W_i A_i. On CPU every (model, row block) product runs on its own thread
    (kernels/threads; the engine's compute is single-threaded there, so a whole block would
    otherwise use one core), and the models' products are added in model order; on a GPU one
    batched product."""
    n, out_rows = b.shape[0], b.shape[1]
    if b.device.type != "cpu":
        return torch.matmul(torch.matmul(b, torch.stack([w_of(i) for i in range(n)])), a).sum(0)
    from tensormerge.kernels.threads import pmap

    step = -(-out_rows // KFAC_ROW_PARTS) if out_rows else 1
    rows = [(r, min(r + step, out_rows)) for r in range(0, out_rows, step)]
    parts = pmap(lambda t: torch.matmul(torch.matmul(b[t[0], t[1][0]:t[1][1]], w_of(t[0])), a[t[0]]),
                 [(i, r) for r in rows for i in range(n)])
    out = torch.empty(out_rows, a.shape[-1], dtype=torch.result_type(b, a))
    for j, (r0, r1) in enumerate(rows):
        acc = out[r0:r1]
        acc.copy_(parts[j * n])
        for i in range(1, n):
            acc.add_(parts[j * n + i])
    return out


def kfac_apply(a: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """W -> Σ_i B_i W A_i over models: A (N, in, in), B (N, out, out)."""
    return lambda w: _kfac_sum(a, b, lambda i: w)


def kfac_rhs(a: torch.Tensor, b: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Σ_i B_i W_i A_i for stacked W (N, out, in)."""
    return _kfac_sum(a, b, lambda i: ws[i])
