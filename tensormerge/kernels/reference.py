"""The definition of each method's arithmetic, in torch, for any device.

Inputs arrive in their stored dtype (bf16, fp16, fp32, ...); every function computes in float32
at least (float64 stays float64) and converts each input element once. Functions are pure and
elementwise along the flattened tensor, so any row chunking of a block gives the same bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

# The exact top-k histograms belong to the same kernel surface (Triton has fused versions).
from tensormerge.kernels import select as _select  # noqa: E402
from tensormerge.kernels.select import (  # noqa: E402,F401
    abs_bits_,
    hist_high,
    hist_high_moments,
    hist_low,
    window_hist,
    window_hist_below_,
)

SIGN_MODES = ("mass", "normfrac", "normmass", "none")
TIES_MERGES = ("dis-mean", "dis-sum", "dis-max", "mean", "sum", "median", "magnitude")


def work_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def all_finite(x: torch.Tensor) -> bool:
    """NaN or Inf anywhere makes the sum non-finite; only then (or on overflow) look closer.
    One reduction instead of a boolean tensor the size of x."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def weighted_sum(inputs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i θ_i, accumulated in place (each input converted once, no stacked copy)."""
    acc = torch.zeros(inputs[0].shape, dtype=work_dtype(*inputs), device=inputs[0].device)
    tmp = torch.empty_like(acc)
    for x, w in zip(inputs, weights):
        acc.add_(tmp.copy_(x), alpha=w)  # convert first: a mixed-dtype add_ is 4x slower
    return acc


def task_arithmetic(inputs: list[torch.Tensor], base: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    """θ_0 + Σ λ_i (θ_i − θ_0): task vectors formed explicitly so small deltas keep their bits."""
    wd = work_dtype(base, *inputs)
    base_w = base.to(wd)
    acc = torch.zeros_like(base_w)
    tmp = torch.empty_like(base_w)
    for x, lam in zip(inputs, lambdas):
        tmp.copy_(x).sub_(base_w)  # convert, then subtract: a mixed-dtype sub is slower, same bits
        acc.add_(tmp, alpha=lam)
    return acc.add_(base_w)


def task_arithmetic_many(inputs: list[torch.Tensor], base: torch.Tensor,
                         lambdas: list[list[float]]) -> list[torch.Tensor]:
    """`task_arithmetic` for several λ lists (a sweep's candidates) with each task vector formed
    once: every candidate's accumulator sees the same operations in the same order, so each
    result is bit for bit the single call's."""
    wd = work_dtype(base, *inputs)
    base_w = base.to(wd)
    accs = [torch.zeros_like(base_w) for _ in lambdas]
    tmp = torch.empty_like(base_w)
    for i, x in enumerate(inputs):
        tmp.copy_(x).sub_(base_w)
        for acc, lams in zip(accs, lambdas):
            acc.add_(tmp, alpha=lams[i])
    return [acc.add_(base_w) for acc in accs]


# ---------------------------------------------------------------------------------- DARE
_M32 = 0xFFFFFFFF


def _i32(v: int) -> int:
    """A 32-bit pattern as the int32 holding it."""
    v &= _M32
    return v - (1 << 32) if v >= 1 << 31 else v


_C1, _C2, _C3 = _i32(0x85EBCA6B), _i32(0xC2B2AE35), 0x27D4EB2F
_SIGN = _i32(1 << 31)


def _fmix32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser in place on int32 holding uint32 bit patterns: products wrap
    mod 2^32 and `>>` then `&` makes the arithmetic shift a logical one, so the bits are those of
    the uint32 algorithm (checked against Python integers in the tests)."""
    torch.bitwise_right_shift(x, 16, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_(0xFFFF)).mul_(_C1)
    torch.bitwise_right_shift(x, 13, out=tmp)
    x.bitwise_xor_(tmp.bitwise_and_(0x7FFFF)).mul_(_C2)
    torch.bitwise_right_shift(x, 16, out=tmp)
    return x.bitwise_xor_(tmp.bitwise_and_(0xFFFF))


def dare_keys(seed: int, model: int, name: str) -> tuple[int, int]:
    """Two 32-bit keys from (seed, model index, tensor name), stable across processes."""
    digest = hashlib.blake2b(f"{seed}\x00{model}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def dare_keep(seed: int, model: int, name: str, flat_start: int, numel: int, p: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Bernoulli(1 − p) keep mask of elements [flat_start, flat_start + numel) of a tensor.

    A counter-based hash of (seed, model, name, element index): h = fmix32(fmix32(lo ^ k1) ^
    (hi·0x27D4EB2F + k2)) with lo/hi the index's 32-bit words, kept when h ≥ p·2^32. The mask of
    an element never depends on chunking, order or worker, and a GPU kernel reproduces it bit
    for bit. Computed in int32, 4x faster than in int64 here.
    """
    k1, k2 = dare_keys(seed, model, name)
    cut = min(int(p * 2**32), 2**32)
    if cut >= 2**32:
        return torch.zeros(numel, dtype=torch.bool, device=device)
    parts = []
    start, end = flat_start, flat_start + numel
    while start < end or not parts:
        stop = min(end, ((start >> 32) + 1) << 32)  # the high word is constant within a part
        x = torch.arange(stop - start, dtype=torch.int32, device=device).add_(_i32(start))
        tmp = torch.empty_like(x)
        _fmix32_(x.bitwise_xor_(_i32(k1)), tmp)
        _fmix32_(x.bitwise_xor_(_i32((start >> 32) * _C3 + k2)), tmp)
        parts.append(x.bitwise_xor_(_SIGN).ge_(_i32(cut) ^ _SIGN))  # unsigned h >= cut
        start = stop
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def dare(inputs: list[torch.Tensor], base: torch.Tensor, p: float, lambdas: list[float], seed: int,
         rescale: bool, name: str, flat_start: int) -> torch.Tensor:
    wd = work_dtype(base, *inputs)
    base_w = base.to(wd)
    acc = torch.zeros_like(base_w)
    tmp = torch.empty_like(base_w)
    scale = 1.0 / (1.0 - p) if rescale else 1.0
    for i, (x, lam) in enumerate(zip(inputs, lambdas)):
        torch.sub(x, base_w, out=tmp)
        if p > 0:
            keep = dare_keep(seed, i, name, flat_start, tmp.numel(), p, tmp.device).reshape(tmp.shape)
            tmp.mul_(keep)
        acc.add_(tmp, alpha=lam * scale)
    return acc.add_(base_w)


# ---------------------------------------------------------------------------------- TIES
def task_vectors(inputs: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """[N, numel] stacked τ_i = θ_i − θ_0 in the work dtype (pass the base already converted
    to it, flattened, to convert it once)."""
    wd = work_dtype(base, *inputs)
    base_w = base.reshape(-1).to(wd)
    out = torch.empty((len(inputs), base_w.numel()), dtype=wd, device=base_w.device)
    for i, x in enumerate(inputs):
        out[i].copy_(x.reshape(-1))  # convert, then subtract: 1.5x faster than a mixed-dtype sub
        out[i].sub_(base_w)
    return out


def ties_trim_(tau: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Zero entries with |τ_i| < v_i (ties at v_i kept, as in the reference), in place."""
    for i, v in enumerate(thresholds):
        if v <= 0:
            continue
        if tau.dtype == torch.float32:
            # |x| >= v  <=>  |x| > the float32 just below v: one fused op, 4x faster than a mask
            below = float(np.nextafter(np.float32(v), np.float32(0)))
            tau[i].copy_(torch.nn.functional.hardshrink(tau[i], below))
        else:  # thresholds select among float32 magnitudes (monotone rounding)
            tau[i].mul_(tau[i].abs().float().ge_(v).to(tau.dtype))
    return tau


def ties_elect(trimmed: torch.Tensor, mode: str, sq_norms: list[float] | None = None) -> torch.Tensor | None:
    """Elected sign per entry (−1, 0, +1), before zero signs are resolved; None for mode none."""
    if mode == "none":
        return None
    if mode == "mass":
        total = trimmed[0].clone()
        for t in trimmed[1:]:
            total.add_(t)
        return total.sign_()
    norms = torch.tensor(sq_norms, dtype=trimmed.dtype, device=trimmed.device)
    frac = trimmed.square() / norms.clamp_min(torch.finfo(trimmed.dtype).tiny).unsqueeze(1)
    if mode == "normfrac":
        pick = frac.argmax(0, keepdim=True)
        return torch.sign(trimmed.gather(0, pick)).squeeze(0)
    if mode == "normmass":
        return torch.sign(sum_models(torch.sign(trimmed) * frac))
    raise ValueError(f"unknown sign mode {mode!r}")


def sum_models(stacked: torch.Tensor) -> torch.Tensor:
    """Σ_i rows in model order from zero. Not `.sum(0)`: torch's CPU reduction order over
    N >= 5 rows depends on the number of columns and each column's position, so a row chunk
    would change the bits of its result."""
    total = torch.zeros_like(stacked[0])
    for row in stacked:
        total.add_(row)
    return total


def _selected(t: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    """1.0 where t agrees with `pick` (±1, see _pick; any nonzero t when there is no election).

    Kept as a float mask and built per model: reductions over a stacked bool tensor are an
    order of magnitude slower in torch than these 1-D float ops.
    """
    return (t * pick).gt_(0) if pick is not None else t.abs().gt_(0)


def _pick(sign: torch.Tensor | None) -> torch.Tensor | None:
    """The sign whose entries are selected: the reference's where(s > 0, τ > 0, τ < 0) keeps
    the negative entries where s is 0 (a model-wide majority of exactly 0), as s = −1 would."""
    return None if sign is None else (sign - 0.5).sign_()


def ties_disjoint(trimmed: torch.Tensor, sign: torch.Tensor | None, merge: str) -> torch.Tensor:
    """Disjoint (or plain) aggregation of trimmed task vectors under the elected sign."""
    if merge in ("dis-mean", "dis-sum"):
        total = torch.zeros_like(trimmed[0])
        count = torch.zeros_like(trimmed[0])
        pick = _pick(sign)
        for t in trimmed:
            sel = _selected(t, pick)
            total.addcmul_(t, sel)
            count.add_(sel)
        return total if merge == "dis-sum" else total.div_(count.clamp_min_(1))
    if merge == "dis-max":
        if sign is None:
            return _magnitude(trimmed)
        biggest = torch.zeros_like(trimmed[0])
        pick = _pick(sign)
        for t in trimmed:
            torch.maximum(biggest, t.abs().mul_(_selected(t, pick)), out=biggest)
        return biggest.mul_(sign)
    if merge == "mean":
        out = sum_models(trimmed).div_(trimmed.shape[0])
    elif merge == "sum":
        out = sum_models(trimmed)
    elif merge == "median":
        out = trimmed.median(0).values
    elif merge == "magnitude":
        out = _magnitude(trimmed)
    else:
        raise ValueError(f"unknown TIES merge {merge!r}")
    return out if sign is None else out.abs() * sign


def ties_merge(inputs: list[torch.Tensor], base: torch.Tensor, thresholds: list[float], sign_mode: str,
               sq_norms: list[float] | None, merge: str, lam: float, guess: float
               ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """One chunk of TIES: trim, elect, resolve zero signs to `guess`, merge, scale, add.

    Returns θ_0 + λ τ* (flattened, work dtype), the sum of the elected signs before resolution
    (the chunk's vote for the model-wide majority) and the mask of entries whose elected sign
    was exactly zero while some trimmed value was not (None without election)."""
    base_w = base.reshape(-1).to(work_dtype(base, *inputs))
    tau = task_vectors(inputs, base_w)
    ties_trim_(tau, thresholds)
    sign = ties_elect(tau, sign_mode, sq_norms)
    votes, undecided = 0, None
    if sign is not None:
        votes = int(sign.sum().item())
        undecided = (sign == 0).logical_and_(abs_mass(tau) > 0)
        resolve_zero_signs_(sign, guess)
    merged = ties_disjoint(tau, sign, merge)
    return merged.mul_(lam).add_(base_w), votes, undecided


def ties_merge_many(inputs: list[torch.Tensor], base: torch.Tensor, thresholds: list[list[float]], sign_mode: str,
                    sq_norms: list[list[float] | None], merge: str, lams: list[float], majorities: list[float]
                    ) -> list[torch.Tensor]:
    """`ties_merge`'s merged values (flattened, work dtype) for several candidates (a sweep's k
    and λ) whose zero signs take a known majority (the vote pass's), the task vectors formed
    once; each is bit for bit the single call's."""
    base_w = base.reshape(-1).to(work_dtype(base, *inputs))
    tau = task_vectors(inputs, base_w)
    out = []
    for k, (th, sq, lam, majority) in enumerate(zip(thresholds, sq_norms, lams, majorities)):
        trimmed = ties_trim_(tau if k == len(thresholds) - 1 else tau.clone(), th)
        sign = ties_elect(trimmed, sign_mode, sq)
        if sign is not None:
            resolve_zero_signs_(sign, majority)
        out.append(ties_disjoint(trimmed, sign, merge).mul_(lam).add_(base_w))
    return out


def ties_votes(inputs: list[torch.Tensor], base: torch.Tensor, thresholds: list[float], sign_mode: str,
               sq_norms: list[float] | None) -> int:
    """The vote `ties_merge` returns for this chunk (Σ of the elected signs before zero signs
    are resolved), without merging: TIES' vote pass, which knows the model-wide majority before
    the merge. Counted as integers, so any chunking sums to the same total."""
    return ties_votes_many(inputs, base, [thresholds], sign_mode, [sq_norms])[0]


def ties_votes_many(inputs: list[torch.Tensor], base: torch.Tensor, thresholds: list[list[float]], sign_mode: str,
                    sq_norms: list[list[float] | None]) -> list[int]:
    """`ties_votes` for several threshold sets (a sweep's k values), the task vectors formed once."""
    if sign_mode == "none":
        return [0] * len(thresholds)
    base_w = base.reshape(-1).to(work_dtype(base, *inputs))
    tau = task_vectors(inputs, base_w)
    out = []
    for k, (th, sq) in enumerate(zip(thresholds, sq_norms)):
        trimmed = ties_trim_(tau if k == len(thresholds) - 1 else tau.clone(), th)
        sign = ties_elect(trimmed, sign_mode, sq)
        out.append(int((sign > 0).sum()) - int((sign < 0).sum()))
    return out


def ties_hist_high(inputs: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """[N, NBINS] counts of the top 16 bits of each model's |τ_i| as float32 bits."""
    tau = task_vectors(inputs, base).float()
    return torch.stack([hist_high(abs_bits_(t)) for t in tau])


def ties_window_counts(inputs: list[torch.Tensor], base: torch.Tensor, windows: list[int], width: int
                       ) -> tuple[torch.Tensor, torch.Tensor, int | None, torch.Tensor]:
    """TIES' pass A over one chunk: per model, the low-bit histogram of |τ_i| inside its window
    of `width` top bins from windows[i] and the count of entries below it ([N, width * NBINS]
    and [N] int64), the first model holding a NaN or Inf in τ (None when all are finite), and
    the count of exact zeros τ_i = 0 ([N]): a threshold that falls among them is exactly 0,
    which a window above the gap between 0 and the smallest nonzero |τ| cannot see."""
    return window_counts_with(window_hist_below_, inputs, base, windows, width)


def window_counts_with(window_hist_below, inputs: list[torch.Tensor], base: torch.Tensor, windows: list[int],
                       width: int) -> tuple[torch.Tensor, torch.Tensor, int | None, torch.Tensor]:
    """ties_window_counts with another window histogram (the Triton kernels pass theirs)."""
    tau = task_vectors(inputs, base).float()
    lows, below, zeros = [], [], []
    for i in range(tau.shape[0]):
        bits = abs_bits_(tau[i])
        if bits.numel() and int(bits.max()) >= 0x7F800000:
            return torch.empty(0), torch.empty(0), i, torch.empty(0)
        zeros.append(int(torch.count_nonzero(bits == 0)))
        low, n_below = window_hist_below(bits, windows[i], width)
        lows.append(low)
        below.append(n_below)
    return (torch.stack(lows), torch.tensor(below, dtype=torch.int64), None,
            torch.tensor(zeros, dtype=torch.int64))


def ties_window_votes(inputs: list[torch.Tensor], base: torch.Tensor, windows: list[int], width: int,
                      max_log: int) -> tuple:
    """`ties_window_counts` (its window counts dense [N, span], or listed as 1-D flat places
    i * span + offset, one per entry inside, where a kernel finds that cheaper to sum) and, in
    the same pass, the mass-sign votes of the merge (`ties_votes`)
    as far as they do not depend on where inside each model's window its threshold falls: the
    5th item, (fixed, where, change, log) from `window_votes`, or None (a NaN or Inf; more than `max_log`
    entries to log). Kernels without it return None there and TIES runs its vote pass."""
    lows, below, bad, zeros = ties_window_counts(inputs, base, windows, width)
    votes = None if bad is not None else window_votes(inputs, base, windows, width, max_log)
    return lows, below, bad, zeros, votes


def window_votes(inputs: list[torch.Tensor], base: torch.Tensor, windows: list[int], width: int,
                 max_log: int) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The votes of one chunk for any thresholds v_i inside the windows, in three parts.

    An entry none of whose |τ_i| lies inside its model's window has the same elected sign for
    every such v: it is counted in `fixed`. An entry with exactly one τ_i inside (offset o in
    the window) has sign s_trim when τ_i is trimmed (v_i above it) and s_keep when kept: s_trim
    is counted in `fixed` and, where they differ, the change s_keep - s_trim listed at
    where = i * span + o (int64, any order), so the vote for thresholds at offsets j_i is fixed
    + Σ_i Σ_{o >= j_i} delta[i, o] with delta the sum of the changes at each place. Entries with
    two or more inside are listed in `log` ([m, N] task vectors in the work dtype) to be elected
    once v is known; None when there are more than max_log of them. Every sum is the merge's, in
    model order. Lists rather than a dense delta: it would be summed per chunk (6 MB for three
    models), which cost more than the votes themselves."""
    base_w = base.reshape(-1).to(work_dtype(base, *inputs))
    tau = task_vectors(inputs, base_w)
    span = width * _select.NBINS
    offs = [_select.abs_bits(t.float()).sub_(w << 16) for t, w in zip(tau, windows)]
    inside = [(o >= 0).logical_and_(o < span) for o in offs]
    count = torch.zeros(tau.shape[1], dtype=torch.int32, device=tau.device)  # int8 wraps at 128 models
    for m in inside:
        count.add_(m)
    one = count == 1
    decided, kept = torch.zeros_like(tau[0]), torch.zeros_like(tau[0])
    for t, o, m in zip(tau, offs, inside):
        above = o >= span
        decided.add_(torch.where(above, t, 0))
        kept.add_(torch.where(above.logical_or_(m & one), t, 0))
    s = decided.sign_()
    counted = count <= 1
    fixed = int((s > 0).logical_and_(counted).sum()) - int((s < 0).logical_and_(counted).sum())
    d = kept.sign_().sub_(s).to(torch.int64)
    where, change = [], []
    for i, (o, m) in enumerate(zip(offs, inside)):
        sel = m.logical_and_(one).logical_and_(d != 0)
        where.append(o[sel].long().add_(i * span))
        change.append(d[sel])
    many = count >= 2
    n_log = int(many.sum())
    log = tau[:, many].t().contiguous() if n_log <= max_log else None
    return None if log is None else (fixed, torch.cat(where), torch.cat(change), log)


def ties_columns(inputs: list[torch.Tensor], base: torch.Tensor, thresholds: list[float],
                 index: torch.Tensor) -> torch.Tensor:
    """The trimmed task vectors [N, len(index)] at a few flat indices (for the patch log)."""
    base_w = base.reshape(-1)[index].to(work_dtype(base, *inputs))
    return ties_trim_(task_vectors([x.reshape(-1)[index] for x in inputs], base_w), thresholds)


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Flat int64 indices of a bool mask's True entries: on CPU numpy's scan, ~6x faster than
    torch's nonzero, which cost TIES' merge half as much as its fused kernel."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.reshape(-1).numpy()))
    return mask.reshape(-1).nonzero().squeeze(1)


def resolve_zero_signs_(sign: torch.Tensor, value: float) -> torch.Tensor:
    """Set entries with sign 0 to `value` (±1 or 0) in place, with float ops only (a bool
    masked_fill costs as much as the rest of the TIES merge here)."""
    if value:
        sign.add_(sign.abs().neg_().add_(1.0), alpha=value)
    return sign


def abs_mass(trimmed: torch.Tensor) -> torch.Tensor:
    """Σ_i |τ̂_i| per entry: zero exactly when every trimmed task vector is zero there."""
    mass = trimmed[0].abs()
    for t in trimmed[1:]:
        mass.add_(t.abs())
    return mass


def _magnitude(t: torch.Tensor) -> torch.Tensor:
    """Per column, the entry with the largest |·| (first model on ties)."""
    return t.gather(0, t.abs().argmax(0, keepdim=True)).squeeze(0)


# ---------------------------------------------------------------------------------- Fisher
FLOOR_MODES = ("clamp", "add")


def fisher_merge(inputs: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float], floor: float,
                 floor_mode: str, floored: list[bool]) -> torch.Tensor:
    """Σ w_i F̃_i θ_i / Σ w_i F̃_i, F̃ = max(F, floor) or F + floor on the models in `floored`
    (all of them: all-zero entries fall back to the weighted average; the first only: to it)."""
    wd = work_dtype(*inputs)
    num = torch.zeros(inputs[0].shape, dtype=wd, device=inputs[0].device)
    den = torch.zeros_like(num)
    f = torch.empty_like(num)
    for x, fi, w, fl in zip(inputs, fishers, weights, floored):
        f.copy_(fi)
        if fl and floor_mode == "clamp":
            f.clamp_(min=floor)
        elif fl:
            f.add_(floor)
        f.mul_(w)
        den.add_(f)
        num.addcmul_(f, x)
    return num.div_(den)


# ---------------------------------------------------------------------------------- UBGM
def ubgm(inputs: list[torch.Tensor], base: torch.Tensor, hessians: list[torch.Tensor], base_hessian: torch.Tensor | None,
         alpha: float, delta0: float, base_scale: float, scales: list[float]) -> torch.Tensor:
    """θ_0 + α Σ_t ((s_t H_t + s_0 H_0 + δ0) / H̄) ⊙ τ_t with H̄ = α Σ_t s_t H_t + s_0 H_0 + δ0,
    and its δ0 -> 0⁺ limit where H̄ = 0."""
    wd = work_dtype(base, *inputs)
    base_w = base.to(wd)
    prior = torch.full_like(base_w, delta0)
    if base_hessian is not None:
        prior.add_(base_hessian.to(wd), alpha=base_scale)
    hbar = prior.clone()
    for h, s in zip(hessians, scales):
        hbar.add_(h.to(wd), alpha=alpha * s)
    # H̄ = 0 (δ0 = 0, every H zero there, or α = 0 and s_0 H_0 = 0): the δ0 -> 0⁺ limit, weight 1
    # where every H is zero (δ0/δ0) and an update α Σ (...) = 0 when α = 0: prior = H̄ = 1 gives both
    flat = hbar == 0
    prior.masked_fill_(flat, 1.0)
    hbar.masked_fill_(flat, 1.0)
    acc = torch.zeros_like(base_w)
    tmp = torch.empty_like(base_w)
    for x, h, s in zip(inputs, hessians, scales):
        torch.sub(x, base_w, out=tmp)
        acc.addcmul_(torch.add(prior, h.to(wd), alpha=s), tmp)
    return acc.div_(hbar).mul_(alpha).add_(base_w)


# ---------------------------------------------------------------------------------- mergekit's methods
# mergekit's generalized task arithmetic (gta and its presets), slerp and model_stock. Whole-tensor
# quantities (L1 norms, dot products) are sums of per-row sums: rows are never split between
# chunks, and each row is reduced in fixed pieces, so a sum has the same bits under any chunking.
ROW_PIECE = 8192  # torch may split one reduction longer than its grain (32768) over threads


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Σ over each row of x (first axis; a 0-d or 1-D tensor: each element its own row), in float64."""
    x = x.reshape(x.shape[0] if x.dim() else 1, -1).double()
    if x.shape[1] <= ROW_PIECE:
        return x.sum(1)
    pad = -x.shape[1] % ROW_PIECE
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(x.shape[0], -1, ROW_PIECE).sum(2).sum(1)


def exact_total(rows: torch.Tensor) -> float:
    """Σ of per-row sums, correctly rounded (fsum): the same whatever order they arrived in."""
    import math

    return math.fsum(rows.tolist())


def hash_u32(seed: int, model: int, name: str, flat_start: int, numel: int,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE's counter-based hash (dare_keep) of elements [flat_start, flat_start + numel), as int64
    values in [0, 2^32): dare_keep's mask is `hash_u32(...) >= int(p * 2^32)`."""
    k1, k2 = dare_keys(seed, model, name)
    parts = []
    start, end = flat_start, flat_start + numel
    while start < end or not parts:
        stop = min(end, ((start >> 32) + 1) << 32)
        x = torch.arange(stop - start, dtype=torch.int32, device=device).add_(_i32(start))
        tmp = torch.empty_like(x)
        _fmix32_(x.bitwise_xor_(_i32(k1)), tmp)
        _fmix32_(x.bitwise_xor_(_i32((start >> 32) * _C3 + k2)), tmp)
        parts.append(x.long().bitwise_and_(_M32))
        start = stop
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def random_keep(seed: int, model: int, name: str, flat_start: int, numel: int, density: float,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Bernoulli(density) keep mask (mergekit's `random` sparsification): DARE's mask, p = 1 − density."""
    cut = min(int((1.0 - density) * 2**32), 2**32)
    return hash_u32(seed, model, name, flat_start, numel, device) >= cut


def della_keep(delta: torch.Tensor, density: float, epsilon: float, seed: int, model: int, name: str,
               flat_start: int) -> torch.Tensor:
    """DELLA's MagPrune keep mask as mergekit draws it: along axis 1 (a 1-D tensor: the whole
    vector) each entry's magnitude rank r (0 = smallest; ties in index order) gives it the keep
    probability density − ε + 2ε r/(n − 1). `delta` holds whole rows (or the whole 1-D tensor).
    A single entry along the axis (n = 1), where mergekit divides 0 by 0, keeps with p = density."""
    x = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n = x.shape[1]
    ranks = x.abs().argsort(dim=1, stable=True).argsort(dim=1).double()
    norm = ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + norm.clamp_(0, 1) * (2 * epsilon)
    h = hash_u32(seed, model, name, flat_start, x.numel(), x.device).reshape(x.shape)
    return (h.double() >= (1.0 - probs) * 2**32).reshape(delta.shape)


class _Ranks:
    """Order statistics of flat non-negative `w`: for float32 from histograms of its bit patterns
    (kernels.select: exact; the top-16-bit one made once), else kthvalue and counts."""

    def __init__(self, w: torch.Tensor):
        self.w = w
        self.bits = w.view(torch.int32) if w.dtype == torch.float32 else None
        self.high = hist_high(self.bits) if self.bits is not None else None

    def at(self, r: int) -> tuple[float, int, int]:
        """The r-th smallest (1-indexed) value, how many entries are below it and equal to it."""
        if self.bits is None:
            v = float(self.w.kthvalue(r).values)
            return v, int((self.w < v).sum()), int((self.w == v).sum())
        hi, r_in = _select.locate(self.high, r)
        low = hist_low(self.bits, hi)
        lo, _ = _select.locate(low, r_in)
        less = int(self.high[:hi].sum()) + int(low[:lo].sum())
        return _select.bits_to_float((hi << 16) | lo), less, int(low[lo])


def _keep_ties(mask: torch.Tensor, w: torch.Tensor, v: float, equal: int, first: int, count: int) -> None:
    """Add to `mask` the entries equal to v whose place among them (index order, 0-based) is in
    [first, first + count)."""
    first, stop = max(0, first), min(equal, first + count)
    if stop <= first:
        return
    if first == 0 and stop == equal:
        mask.logical_or_(w == v)
        return
    where = torch.nonzero(w == v).squeeze(1)
    mask[where[first:stop]] = True


def top_k_keep(w: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest of flat non-negative `w`, equal values taken in index order (what a
    stable descending argsort's first k are; mergekit's argsort leaves the order of equal values
    unspecified)."""
    n = w.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=w.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=w.device)
    v, less, equal = _Ranks(w).at(n - k + 1)
    mask = w > v
    _keep_ties(mask, w, v, equal, 0, k - (n - less - equal))
    return mask


def rank_window_keep(w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mask of the entries of flat non-negative `w` whose rank in a stable ascending sort (equal
    values in index order) is in [lo, hi): mergekit's argsort-then-slice, its tie order fixed."""
    n = w.numel()
    lo, hi = max(0, lo), min(n, hi)
    if hi <= lo:
        return torch.zeros(n, dtype=torch.bool, device=w.device)
    ranks = _Ranks(w)
    at_lo, at_hi = ranks.at(lo + 1), ranks.at(hi)
    mask = (w > at_lo[0]).logical_and_(w < at_hi[0])
    for v, less, equal in {at_lo, at_hi}:  # the equal entries' ranks are less, less + 1, ...
        _keep_ties(mask, w, v, equal, lo - less, hi - lo)
    return mask


def magnitude_keep(delta: torch.Tensor, density: float) -> torch.Tensor | None:
    """mergekit's `magnitude`: the k = max(1, int(density·numel)) largest |δ| of the whole tensor
    (equal magnitudes in index order); None: keep everything (density ≥ 1)."""
    n = delta.numel()
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    k = max(1, int(density * n))
    return top_k_keep(delta.reshape(-1).abs(), k).reshape(delta.shape)


def outliers_keep(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """mergekit's `magnitude_outliers` (breadcrumbs): in ascending |δ| order keep ranks
    [n_bot, n_bot + int(density·n)) with n_bot = max(0, n − int(density·n) − int(gamma·n)), so the
    int(gamma·n) largest are dropped as outliers and the smallest to reach the density."""
    if density >= 1:
        return None
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bot = max(0, n - target - top)
    return rank_window_keep(delta.reshape(-1).abs(), bot, bot + target).reshape(delta.shape)


RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: norms below this leave the mask unscaled


def l1_rescale(before: float, after: float) -> float:
    """mergekit's L1 rescale of a masked task vector: ‖δ‖₁ / ‖m ⊙ δ‖₁, or 1 when either is tiny."""
    return 1.0 if before < RESCALE_EPS or after < RESCALE_EPS else before / after


def gta_combine(deltas: list[torch.Tensor], weights: list[float], consensus: str, normalize: bool,
                lam: float, base_w: torch.Tensor) -> torch.Tensor:
    """mergekit's generalized task arithmetic after sparsification: weight each δ_i; with a
    consensus keep the entries agreeing with the majority sign (`sum`: sign of Σ w_i δ_i, `count`:
    of Σ sign(w_i δ_i); ties go to +); add; divide by the weights summed over the kept entries
    (normalize; 1 where none is kept, or where |Σ w| < 1e-8 without consensus); scale by λ; add
    to the base. `deltas` (work dtype) are overwritten. Sums run in model order."""
    for d, w in zip(deltas, weights):
        d.mul_(w)
    mixed = torch.zeros_like(base_w)
    if consensus == "none":
        for d in deltas:
            mixed.add_(d)
        divisor = sum(weights)  # in model order, as Python floats
        if normalize:
            mixed.div_(1.0 if abs(divisor) < 1e-8 else divisor)
    else:
        vote = torch.zeros_like(base_w)
        for d in deltas:
            vote.add_(d if consensus == "sum" else torch.sign(d))
        majority = torch.where(vote >= 0, 1.0, -1.0).to(base_w.dtype)
        divisor = torch.zeros_like(base_w)
        for d, w in zip(deltas, weights):
            agree = torch.sign(d).eq_(majority)
            mixed.add_(d.mul_(agree))
            divisor.add_(agree.to(base_w.dtype), alpha=w)
        if normalize:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    return mixed.mul_(lam).add_(base_w)


SLERP_DOT_THRESHOLD = 0.9995  # mergekit: |cos| above this interpolates linearly
SLERP_EPS = 1e-8  # mergekit: a row norm at or below this is taken as 1


def slerp_coefficients(t: float, sq_a: float, sq_b: float, dot_ab: float, empty: bool = False) -> tuple[float, float]:
    """mergekit's slerp coefficients (c_a, c_b) of one tensor pair from Σa², Σb², Σab over the
    whole tensor: norms ≤ eps are taken as 1, cos = Σab / (‖a‖‖b‖) clamped to [−1, 1]; linear
    (1 − t, t) where |cos| > 0.9995 (or the tensor is empty), else sin((1 − t)θ)/sin θ, sin(tθ)/sin θ."""
    import math

    na, nb = math.sqrt(sq_a), math.sqrt(sq_b)
    na, nb = (na if na > SLERP_EPS else 1.0), (nb if nb > SLERP_EPS else 1.0)
    cos = min(1.0, max(-1.0, dot_ab / na / nb))
    if empty or abs(cos) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    return math.sin((1.0 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def slerp_merge(v0: torch.Tensor, v1: torch.Tensor, coef_a: float, coef_b: float) -> torch.Tensor:
    """c_a · v0 + c_b · v1 in the work dtype (the coefficients of t = 0 are exactly 1 and 0)."""
    wd = work_dtype(v0, v1)
    return v0.to(wd) * coef_a + v1.to(wd) * coef_b


def model_stock_t(cos: list[float], n: int) -> float:
    """Model Stock's interpolation ratio from the pairwise cosines of the task vectors:
    t = N·c / (1 + (N − 1)·c), c their mean; 0 (keep the base) where the denominator is < 1e-6."""
    c = sum(cos) / len(cos)
    den = 1 + (n - 1) * c
    return 0.0 if abs(den) < 1e-6 else n * c / den


def model_stock_cos(dot: float, sq_a: float, sq_b: float) -> float:
    """mergekit's clamped cosine: dot / max(‖a‖‖b‖, 1e-6), clamped to [−1, 1]."""
    import math

    return min(1.0, max(-1.0, dot / max(math.sqrt(sq_a) * math.sqrt(sq_b), 1e-6)))


def model_stock_merge(inputs: list[torch.Tensor], base: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """t · (Σ θ_i / N) + (1 − t) · θ_0, t a number or a column per filter (broadcast)."""
    wd = work_dtype(base, *inputs)
    avg = torch.zeros(base.shape, dtype=wd, device=base.device)
    for x in inputs:
        avg.add_(x.to(wd))
    avg.div_(len(inputs))
    if isinstance(t, torch.Tensor):
        t = t.to(wd)
    return avg.mul_(t).add_(base.to(wd) * (1 - t))


def model_stock_filter_t(inputs: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """Per filter (vector along the last axis) t of model_stock filter_wise, [filters, 1] float64."""
    w0 = base.reshape(-1, base.shape[-1]).double()
    offsets = [x.reshape(w0.shape).double() - w0 for x in inputs]
    sq = [row_sums(o * o) for o in offsets]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = row_sums(offsets[i] * offsets[j])
            cos.append((dot / (sq[i].sqrt() * sq[j].sqrt()).clamp_min(1e-6)).clamp_(-1, 1))
    c = sum(cos) / len(cos)
    n = len(inputs)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, 0.0, n * c / torch.where(singular, 1.0, den))
    return t.unsqueeze(1)
