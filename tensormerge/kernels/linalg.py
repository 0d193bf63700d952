"""Matrix arithmetic of the statistics methods: off-diagonal scaling, the guarded SPD solve that
RegMean reuses across a weight's row chunks, and conjugate gradient with batched operators.

Layout is torch's: a linear weight W is [out, in], its input Gram A is [in, in] and its
output-gradient Gram B is [out, out]; the Kronecker-factored Fisher acts as W -> B W A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

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
@dataclass
class SPDSolver:
    """A factorisation of a symmetric PSD S restricted to its live rows (non-zero diagonal),
    applied from the right (X S = M) as often as needed. Cholesky when S is safely positive
    definite; otherwise an eigendecomposition that drops the null space (the minimum-norm
    solution). Never an explicit inverse."""

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


def spd_factor(s: torch.Tensor) -> SPDSolver:
    s = s.to(torch.float64)
    live = s.diagonal() > 0
    sl = s if bool(live.all()) else s[live][:, live]
    n = sl.shape[0]
    if n == 0:
        return SPDSolver(live, "empty")
    # Statistics are stored in float32, so S is known to about 2^-24 of its largest entries:
    # directions with eigenvalues below that are noise, and solving along them would amplify it.
    noise = math.sqrt(n) * 2.0**-24
    chol, info = torch.linalg.cholesky_ex(sl)
    if int(info) == 0 and _smallest_eigenvalue(sl, chol) > noise * float(sl.diagonal().max()):
        return SPDSolver(live, "cholesky", chol=chol)
    evals, evecs = torch.linalg.eigh(sl)
    cutoff = float(evals.max()) * noise
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
@dataclass
class RegMeanFactor:
    grams: torch.Tensor  # (N, live, live): w_i S_α(G_i), the products' right factors
    solver: SPDSolver
    weights: list[float]  # normalised, for the columns no model ever feeds (dead inputs)
    product_dtype: torch.dtype


def regmean_prepare(grams: list[torch.Tensor], alpha: float, weights: list[float],
                    product_dtype: torch.dtype = torch.float32) -> RegMeanFactor:
    """Once per weight: scaled Grams and the factorisation of their sum (float64); the products
    with the weights' rows run in `product_dtype` (float32 as in the research code)."""
    total = sum(weights)
    w = [x / total for x in weights]
    scaled, acc = [], None
    for gi, wi in zip(grams, w):  # one float64 Gram at a time: memory (4N + 24) d² bytes at most
        g64 = scale_offdiag(gi.to(torch.float64), alpha).mul_(wi)
        acc = g64.clone() if acc is None else acc.add_(g64)
        scaled.append(g64.to(product_dtype))
        del g64
    solver = spd_factor(acc)
    del acc
    live = solver.live
    if not bool(live.all()):
        scaled = [g[live][:, live] for g in scaled]
    return RegMeanFactor(torch.stack(scaled), solver, w, product_dtype)


def regmean_rows(inputs: list[torch.Tensor], fac: RegMeanFactor, tile: int) -> torch.Tensor:
    """W* rows = (Σ W_i Ĝ_i)(Σ Ĝ_i)^-1 for rows of [out, in] weights, in float64.

    Rows are taken `tile` at a time into fresh buffers, so each product has the same shape and
    operands whatever chunk the rows came in: the bytes do not depend on the chunking."""
    rows, d = inputs[0].shape
    out = torch.empty(rows, d, dtype=torch.float64, device=inputs[0].device)
    live = fac.solver.live
    dead = ~live
    for t in range(0, rows, tile):
        e = min(t + tile, rows)
        ws = [x[t:e].to(fac.product_dtype, copy=True) for x in inputs]
        if fac.solver.kind != "empty":
            m = torch.zeros(e - t, int(live.sum()), dtype=fac.product_dtype, device=out.device)
            for wi, gi in zip(ws, fac.grams):
                m.addmm_(wi[:, live], gi)
            out[t:e, live] = fac.solver.solve_right(m.to(torch.float64))
        if bool(dead.any()):
            avg = torch.zeros(e - t, int(dead.sum()), dtype=torch.float64, device=out.device)
            for wi, c in zip(ws, fac.weights):
                avg.add_(wi[:, dead].to(torch.float64), alpha=c)
            out[t:e, dead] = avg
    return out


# ----------------------------------------------------------------------------- CG
@dataclass
class CGResult:
    x: torch.Tensor
    iterations: int
    residual: float  # ‖b − A x‖ / ‖b‖ of the returned x, recomputed (not the recurrence's)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sum(a * b, dtype=torch.float64))


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x0: torch.Tensor,
                       max_iter: int, tol: float) -> CGResult:
    """CG on A x = b for PSD A, stopping when ‖r‖ ≤ tol‖b‖ (scipy's rule) or after max_iter
    matvecs; no preconditioner and no damping, as in the MaTS code."""
    bnorm = math.sqrt(_dot(b, b))
    if bnorm == 0.0:
        return CGResult(torch.zeros_like(b), 0, 0.0)
    x = x0.to(b.dtype, copy=True)
    r = b - apply(x)
    rr = _dot(r, r)
    p = r.clone()
    k = 0
    while k < max_iter and math.sqrt(rr) > tol * bnorm:
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
    res = b - apply(x)
    return CGResult(x, k, math.sqrt(_dot(res, res)) / bnorm)


def kfac_apply(a: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """W -> Σ_i B_i W A_i, batched over models: A (N, in, in), B (N, out, out)."""
    def apply(w: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(b, w), a).sum(0)
    return apply


def kfac_rhs(a: torch.Tensor, b: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """Σ_i B_i W_i A_i for stacked W (N, out, in)."""
    return torch.matmul(torch.matmul(b, ws), a).sum(0)
