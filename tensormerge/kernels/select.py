"""Exact streaming selection of the r-th smallest |x| over a whole model (TIES' global top-k).

For non-negative IEEE floats the bit pattern read as an integer is monotone in the value, so
two 65,536-bin histograms (top 16 bits, then the low 16 bits inside the one bin that holds
rank r) fix all 32 bits of the threshold: exact, deterministic, a few hundred KB of counters,
and no sort of anything. Squared norms of the kept entries (for TIES' normfrac / normmass
signs) come out of the same histograms exactly, as integers, so they do not depend on how the
stream was chunked.
"""

from __future__ import annotations

import math
import struct
import sys
from fractions import Fraction

import torch

NBINS = 1 << 16


def abs_bits(x: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of |x| for a float32 tensor (monotone in |x|)."""
    return x.abs().view(torch.int32).reshape(-1)


def abs_bits_(x: torch.Tensor) -> torch.Tensor:
    """abs_bits in place, for a float32 tensor not needed afterwards (a task vector row): an
    out-of-place abs allocates and faults in a new buffer, 10x the cost of the abs itself."""
    return x.abs_().view(torch.int32).reshape(-1)


def hist_high(bits: torch.Tensor) -> torch.Tensor:
    return torch.bincount(bits >> 16, minlength=NBINS)


def hist_high_moments(bits: torch.Tensor) -> torch.Tensor:
    """Per top-16-bit bin: count, sum of low 16 bits, sum of their squares ([3, NBINS] int64)."""
    hi = (bits >> 16).long()
    lo = (bits & 0xFFFF).long()
    out = torch.zeros(3, NBINS, dtype=torch.int64, device=bits.device)
    out[0].index_add_(0, hi, torch.ones_like(lo))
    out[1].index_add_(0, hi, lo)
    out[2].index_add_(0, hi, lo * lo)
    return out


def _top_half(bits: torch.Tensor) -> torch.Tensor:
    """The top 16 bits of each int32 (sign clear), as a strided int16 view when possible."""
    if sys.byteorder == "little":  # an int32's high int16 half is its top 16 bits
        return bits.view(torch.int16)[1::2]
    return bits >> 16


def window_offsets(bits: torch.Tensor, lo_bin: int, width: int) -> torch.Tensor:
    """For entries whose top bin lies in [lo_bin, lo_bin + width): their offset from the
    window's first bit pattern, i.e. (bin - lo_bin) * 65536 + low 16 bits, as int64."""
    top = _top_half(bits)
    inside = bits[(top >= lo_bin).logical_and_(top < lo_bin + width)]
    return (inside - (lo_bin << 16)).long()


def window_hist(bits: torch.Tensor, lo_bin: int, width: int) -> torch.Tensor:
    """Low-bit counts of the entries in the window of `width` top bins from lo_bin, one
    histogram of width * NBINS bins (TIES' pass A counts the sampled window this way).

    Offsets outside the window are clamped into two dump bins instead of being selected out:
    boolean indexing cost 3x the whole histogram here."""
    span = width * NBINS
    off = bits - ((lo_bin << 16) - 1)
    off.clamp_(0, span + 1)
    return torch.bincount(off, minlength=span + 2)[1:span + 1]


def window_hist_below_(bits: torch.Tensor, lo_bin: int, width: int) -> tuple[torch.Tensor, int]:
    """window_hist and the count of entries below the window (its lower dump bin), from one
    bincount, in place: `bits` (not needed afterwards) is overwritten with the offsets."""
    span = width * NBINS
    off = bits.sub_((lo_bin << 16) - 1).clamp_(0, span + 1)
    h = torch.bincount(off, minlength=span + 2)
    return h[1:span + 1], int(h[0])


def hist_low(bits: torch.Tensor, hi_bin: int) -> torch.Tensor:
    inside = bits[_top_half(bits) == hi_bin]
    return torch.bincount(inside & 0xFFFF, minlength=NBINS)


def keep_rank(numel: int, k: float, rule: str) -> int:
    """1-indexed ascending rank r of the threshold; 0 means keep everything.

    reference: r = D - floor(D k), which keeps floor(D k) + 1 entries (plus ties) like the TIES
    code; exact: keeps max(1, floor(D k)) entries (plus ties at the threshold).
    """
    kept = math.floor(numel * k)
    if rule == "exact":
        kept = max(1, kept)
        return max(0, numel - kept + 1) if kept < numel else 0
    return max(0, numel - kept)


def locate(hist: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th smallest entry, and the rank within that bin."""
    cum = torch.cumsum(hist, 0)
    b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype)).item())
    before = int(cum[b - 1]) if b > 0 else 0
    return b, rank - before


def bits_to_float(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _mantissa_scale(hi_bin: int) -> tuple[int, Fraction]:
    """For entries in top-bin hi_bin: value = (base + low16) * scale exactly."""
    exp = (hi_bin >> 7) & 0xFF
    top = (hi_bin & 0x7F) << 16
    if exp == 0:
        return top, Fraction(1, 2**149)
    return (1 << 23) + top, Fraction(2) ** (exp - 150)


def square_norm_above(moments: torch.Tensor, hi_bin: int) -> Fraction:
    """Exact Σ x² of the entries in top bins above hi_bin (all entries when hi_bin is -1)."""
    total = Fraction(0)
    cnt, s1, s2 = (m.tolist() for m in moments)
    for b in range(hi_bin + 1, NBINS):
        if cnt[b]:
            base, scale = _mantissa_scale(b)
            total += (cnt[b] * base * base + 2 * base * s1[b] + s2[b]) * scale * scale
    return total


def square_norm_in_bin(lo_hist: torch.Tensor, hi_bin: int, lo_bin: int) -> Fraction:
    """Exact Σ x² of the entries of top bin hi_bin whose low bits are >= lo_bin."""
    base, scale = _mantissa_scale(hi_bin)
    counts = lo_hist.tolist()
    total = sum(counts[low] * (base + low) ** 2 for low in range(lo_bin, NBINS) if counts[low])
    return Fraction(total) * scale * scale
