"""The Triton kernels behind tensormerge.kernels.triton (launched from its __init__).

Every kernel reproduces the torch reference (kernels/reference.py) operation for operation in
float32, so that on the same inputs it writes the same bits:

* `x.add_(y, alpha=a)` and `x.addcmul_(y, z)` are fused multiply-adds in torch (AVX2 `fmadd` on
  CPU, contracted `a*b+c` on CUDA), hence `tl.fma` here; every other multiply and add of the
  reference is a separate, rounded op, so the kernels must be compiled with
  `enable_fp_fusion=False` (the launcher does) or Triton would fuse those too.
* divisions are `tl.div_rn` (IEEE), never the approximate `/` some backends may pick.
* models are accumulated in the reference's order: sequentially for its explicit loops, and in
  torch's CPU cascade order for its `.sum(0)` / `.mean(0)` reductions (`_sum_models`).

The N input tensors arrive as a tuple of pointers (a kernel argument per model, each with its
own dtype), never stacked into a new tensor: N is a constexpr, so each N (and set of dtypes) compiles
once.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Sign modes and merges as constexpr codes (order of reference.SIGN_MODES / TIES_MERGES).
# Globals read inside @triton.jit code must be constexpr.
MASS, NORMFRAC, NORMMASS, NONE = (tl.constexpr(i) for i in range(4))
DIS_MEAN, DIS_SUM, DIS_MAX, MEAN, SUM, MEDIAN, MAGNITUDE = (tl.constexpr(i) for i in range(7))
HIST_HIGH, HIST_MOMENTS, HIST_LOW, HIST_WINDOW = (tl.constexpr(i) for i in range(4))


@triton.jit
def _block(n, BLOCK: tl.constexpr):
    # int64 offsets: chunks past 2**31 elements must not wrap.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _load(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _isnan(x):
    return x != x  # noqa: PLR0124 - the IEEE NaN test, the same in compiled and interpreted code


@triton.jit
def _sign(x):
    # torch.sign: +0 for ±0 and for NaN (NaN compares false both ways).
    return tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)


@triton.jit
def _sum_models(vals, offs, plain_limit, N: tl.constexpr, INNER: tl.constexpr, VF: tl.constexpr):
    """Σ_i vals[i] in the order torch's CPU `sum(0)` adds the rows of a contiguous [N, D] tensor
    (aten/src/ATen/native/cpu/SumKernel.cpp, cascade_sum), so `mean`, `sum` and `normmass`
    match the reference bit for bit. Column j of D: for j < plain_limit (whole groups of 4*VF
    columns when D >= VF, of 4 when D < VF; VF = floats per torch CPU vector) a running sum
    from 0; for the rest an ILP-4 split (row r into partial r % 4, leftover rows into partial
    0, partials added in order); for D == 1 and N >= VF (INNER) the contiguous inner reduction
    (rows past the last whole vector first, then the VF lanes). With N <= 4 all are the running
    sum. Valid for N <= 16 (deeper cascades start at 16 rows)."""
    seq = tl.zeros_like(vals[0])
    for i in tl.static_range(N):
        seq = seq + vals[i]
    res = seq
    if N > 4:
        if INNER:
            VS: tl.constexpr = N // VF
            acc = tl.zeros_like(vals[0])
            for i in tl.static_range(VS * VF, N):
                acc = acc + vals[i]
            for k in tl.static_range(VF):
                lane = tl.zeros_like(vals[0])
                for r in tl.static_range(VS):
                    lane = lane + vals[r * VF + k]
                acc = acc + lane
            res = acc
        else:
            SI: tl.constexpr = N // 4
            p0 = tl.zeros_like(vals[0])
            p1 = tl.zeros_like(vals[0])
            p2 = tl.zeros_like(vals[0])
            p3 = tl.zeros_like(vals[0])
            for r in tl.static_range(SI):
                p0 = p0 + vals[r * 4]
                p1 = p1 + vals[r * 4 + 1]
                p2 = p2 + vals[r * 4 + 2]
                p3 = p3 + vals[r * 4 + 3]
            for i in tl.static_range(SI * 4, N):
                p0 = p0 + vals[i]
            ilp = ((p0 + p1) + p2) + p3
            res = tl.where(offs < plain_limit, seq, ilp)
    return res


@triton.jit
def _magnitude(vals, N: tl.constexpr):
    """The value with the largest |·|, first model on ties, NaN winning (torch.argmax)."""
    best = vals[0]
    best_abs = tl.abs(best)
    for i in tl.static_range(1, N):
        a = tl.abs(vals[i])
        upd = (a > best_abs) | (_isnan(a) & ~_isnan(best_abs))
        best = tl.where(upd, vals[i], best)
        best_abs = tl.where(upd, a, best_abs)
    return best


@triton.jit
def _median(vals, N: tl.constexpr):
    """torch.median over the models: the lower middle value, taken at its position in a stable
    sort (so which of +0 / -0 comes out is torch's too), NaN if any value is NaN."""
    K: tl.constexpr = (N - 1) // 2
    res = vals[0]
    for i in tl.static_range(N):
        rank = tl.zeros(vals[0].shape, tl.int32)
        for j in tl.static_range(N):
            if j < i:
                rank += (vals[j] <= vals[i]).to(tl.int32)
            elif j > i:
                rank += (vals[j] < vals[i]).to(tl.int32)
        res = tl.where(rank == K, vals[i], res)
    for i in tl.static_range(N):
        v = vals[N - 1 - i]
        res = tl.where(_isnan(v), v, res)
    return res


@triton.jit
def _selected(t, s, SIGN: tl.constexpr):
    if SIGN == NONE:
        sel = tl.where(tl.abs(t) > 0, 1.0, 0.0)
    else:  # the reference's where(s > 0, τ > 0, τ < 0): a zero sign selects the negative entries
        sel = tl.where(s > 0, tl.where(t > 0, 1.0, 0.0), tl.where(t < 0, 1.0, 0.0))
    return sel


# ------------------------------------------------------------------------------ linear merges
@triton.jit
def weighted_sum_kernel(X, W, out, n, N: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _block(n, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(N):
        acc = tl.fma(_load(X[i], offs, mask), tl.load(W + i), acc)
    tl.store(out + offs, acc, mask=mask)


@triton.jit
def task_arithmetic_kernel(X, B, W, out, n, N: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _block(n, BLOCK)
    b = _load(B, offs, mask)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(N):
        acc = tl.fma(_load(X[i], offs, mask) - b, tl.load(W + i), acc)
    tl.store(out + offs, acc + b, mask=mask)


# ------------------------------------------------------------------------------ DARE
@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _dare_hash(idx, k1, k2):
    """reference.dare_keep's two fmix32 rounds in wrapping uint32 arithmetic; idx is the int64
    flat index, whose high word enters the second round."""
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    x = _fmix32(lo ^ k1)
    return _fmix32(x ^ (hi * 0x27D4EB2F + k2))


@triton.jit
def dare_keep_kernel(KEYS, out, n, flat_start, cut, BLOCK: tl.constexpr):
    # keys come as a tensor: an int argument equal to 1 would be specialised into a constexpr
    offs, mask = _block(n, BLOCK)
    x = _dare_hash(flat_start + offs, tl.load(KEYS).to(tl.uint32), tl.load(KEYS + 1).to(tl.uint32))
    tl.store(out + offs, x.to(tl.int64) >= cut, mask=mask)


@triton.jit
def dare_kernel(X, B, W, KEYS, out, n, flat_start, cut, N: tl.constexpr, APPLY: tl.constexpr,
                BLOCK: tl.constexpr):
    offs, mask = _block(n, BLOCK)
    b = _load(B, offs, mask)
    idx = flat_start + offs
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(N):
        t = _load(X[i], offs, mask) - b
        if APPLY:
            k1 = tl.load(KEYS + 2 * i).to(tl.uint32)
            k2 = tl.load(KEYS + 2 * i + 1).to(tl.uint32)
            keep = _dare_hash(idx, k1, k2).to(tl.int64) >= cut
            t = t * tl.where(keep, 1.0, 0.0)  # a multiply, as the reference's, so Inf/NaN stay NaN
        acc = tl.fma(t, tl.load(W + i), acc)
    tl.store(out + offs, acc + b, mask=mask)


# ------------------------------------------------------------------------------ Fisher, UBGM
@triton.jit
def fisher_kernel(X, F, P, FL, out, n, N: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask = _block(n, BLOCK)
    floor = tl.load(P + N)
    num = tl.zeros([BLOCK], tl.float32)
    den = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(N):
        f = _load(F[i], offs, mask)
        if CLAMP:
            g = tl.where(f < floor, floor, f)  # torch.clamp: NaN and -0 pass through
        else:
            g = f + floor
        f = tl.where(tl.load(FL + i) != 0, g, f)
        f = f * tl.load(P + i)
        den = den + f
        num = tl.fma(f, _load(X[i], offs, mask), num)
    tl.store(out + offs, tl.div_rn(num, den), mask=mask)


@triton.jit
def ubgm_kernel(X, B, H, BH, P, out, n, N: tl.constexpr, HAS_BH: tl.constexpr, BLOCK: tl.constexpr):
    # P = [delta0, base_scale, alpha, s_0..s_{N-1}, alpha*s_0..alpha*s_{N-1}]
    offs, mask = _block(n, BLOCK)
    b = _load(B, offs, mask)
    prior = tl.zeros([BLOCK], tl.float32) + tl.load(P)
    if HAS_BH:
        prior = tl.fma(_load(BH, offs, mask), tl.load(P + 1), prior)
    hbar = prior
    hs = ()
    for i in tl.static_range(N):
        h = _load(H[i], offs, mask)
        hs = hs + (h,)
        hbar = tl.fma(h, tl.load(P + 3 + N + i), hbar)
    flat = hbar == 0.0  # the δ0 -> 0⁺ limit, as reference.ubgm
    prior = tl.where(flat, 1.0, prior)
    hbar = tl.where(flat, 1.0, hbar)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in tl.static_range(N):
        c = tl.fma(hs[i], tl.load(P + 3 + i), prior)
        acc = tl.fma(c, _load(X[i], offs, mask) - b, acc)
    res = tl.div_rn(acc, hbar) * tl.load(P + 2)
    tl.store(out + offs, res + b, mask=mask)


# ------------------------------------------------------------------------------ TIES
@triton.jit
def ties_kernel(X, B, P, out, UND, VOTES, n, plain_limit, N: tl.constexpr, SIGN: tl.constexpr,
                MERGE: tl.constexpr, INNER: tl.constexpr, VF: tl.constexpr, BLOCK: tl.constexpr):
    """Trim, elect, count votes, flag undecided entries, resolve, merge, scale and add, in one
    pass. P = [threshold_0..N-1 (0: no trim), clamped sq_norm_0..N-1, lam, guess]."""
    offs, mask = _block(n, BLOCK)
    b = _load(B, offs, mask)
    taus = ()
    for i in tl.static_range(N):
        t = _load(X[i], offs, mask) - b
        t = t * tl.where(tl.abs(t) >= tl.load(P + i), 1.0, 0.0)
        taus = taus + (t,)

    s = tl.zeros([BLOCK], tl.float32)
    if SIGN == MASS:
        total = taus[0]
        for i in tl.static_range(1, N):
            total = total + taus[i]
        s = _sign(total)
    elif SIGN == NORMFRAC:
        best_f = tl.div_rn(taus[0] * taus[0], tl.load(P + N))
        best_t = taus[0]
        for i in tl.static_range(1, N):
            f = tl.div_rn(taus[i] * taus[i], tl.load(P + N + i))
            upd = (f > best_f) | (_isnan(f) & ~_isnan(best_f))
            best_f = tl.where(upd, f, best_f)
            best_t = tl.where(upd, taus[i], best_t)
        s = _sign(best_t)
    elif SIGN == NORMMASS:
        terms = ()
        for i in tl.static_range(N):
            terms = terms + (_sign(taus[i]) * tl.div_rn(taus[i] * taus[i], tl.load(P + N + i)),)
        s = _sign(_sum_models(terms, offs, plain_limit, N, INNER, VF))

    if SIGN != NONE:
        tl.store(VOTES + tl.program_id(0), tl.sum(tl.where(mask, s, 0.0).to(tl.int32), axis=0))
        absmass = tl.abs(taus[0])
        for i in tl.static_range(1, N):
            absmass = absmass + tl.abs(taus[i])
        tl.store(UND + offs, (s == 0) & (absmass > 0), mask=mask)
        s = tl.where(s == 0, tl.load(P + 2 * N + 1), s)

    if MERGE == DIS_MEAN or MERGE == DIS_SUM:
        total = tl.zeros([BLOCK], tl.float32)
        count = tl.zeros([BLOCK], tl.float32)
        for i in tl.static_range(N):
            sel = _selected(taus[i], s, SIGN)
            total = tl.fma(taus[i], sel, total)
            count = count + sel
        if MERGE == DIS_MEAN:
            total = tl.div_rn(total, tl.maximum(count, 1.0))
        res = total
    elif MERGE == DIS_MAX:
        if SIGN == NONE:
            res = _magnitude(taus, N)
        else:
            big = tl.zeros([BLOCK], tl.float32)
            for i in tl.static_range(N):
                cand = tl.abs(taus[i]) * _selected(taus[i], s, SIGN)
                big = tl.maximum(big, cand, propagate_nan=tl.PropagateNan.ALL)
            res = big * s
    else:
        if MERGE == MEAN:
            total = _sum_models(taus, offs, plain_limit, N, INNER, VF)
            res = tl.div_rn(total, tl.full([BLOCK], N, tl.float32))  # the reference's sum(0).div_(N)
        elif MERGE == SUM:
            res = _sum_models(taus, offs, plain_limit, N, INNER, VF)
        elif MERGE == MEDIAN:
            res = _median(taus, N)
        else:
            res = _magnitude(taus, N)
        if SIGN != NONE:
            res = tl.abs(res) * s
    res = res * tl.load(P + 2 * N)
    tl.store(out + offs, res + b, mask=mask)


# ------------------------------------------------------------------------------ histograms
@triton.jit
def hist_kernel(BITS, out, bad, n, lo_bin, width, MODE: tl.constexpr, NBINS: tl.constexpr,
                BLOCK: tl.constexpr):
    """Radix histograms of int32 bit patterns with int64 atomics: the counts are exact
    integers, so any order of the atomics gives select.py's bincount / index_add_ results."""
    offs, mask = _block(n, BLOCK)
    x = tl.load(BITS + offs, mask=mask, other=0)
    top = x >> 16
    low = x & 0xFFFF
    one = tl.full([BLOCK], 1, tl.int64)
    if MODE == HIST_HIGH or MODE == HIST_MOMENTS:
        neg = x < 0  # bincount refuses these; count them instead of writing out of bounds
        tl.atomic_add(bad + tl.zeros([BLOCK], tl.int32), one, mask=mask & neg)
        ok = mask & (x >= 0)
        tl.atomic_add(out + top, one, mask=ok)
        if MODE == HIST_MOMENTS:
            lo = low.to(tl.int64)
            tl.atomic_add(out + NBINS + top, lo, mask=ok)
            tl.atomic_add(out + 2 * NBINS + top, lo * lo, mask=ok)
    elif MODE == HIST_LOW:
        tl.atomic_add(out + low, one, mask=mask & (top == lo_bin))
    else:
        inside = mask & (top >= lo_bin) & (top < lo_bin + width)
        tl.atomic_add(out + ((top - lo_bin).to(tl.int64) * NBINS + low), one, mask=inside)
