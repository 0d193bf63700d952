"""The exact streaming top-k threshold against a full sort (METHODS.md §9, worked_examples.py)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from tensormerge.kernels import select as S


def radix_threshold(blocks, k, rule="reference"):
    D = sum(b.numel() for b in blocks)
    r = S.keep_rank(D, k, rule)
    hi = sum(S.hist_high(S.abs_bits(b)) for b in blocks)
    h, r_in = S.locate(hi, r)
    lo = sum(S.hist_low(S.abs_bits(b), h) for b in blocks)
    low, _ = S.locate(lo, r_in)
    return S.bits_to_float((h << 16) | low)


def worked_blocks():
    rng = np.random.default_rng(1)
    blocks = [rng.standard_t(3, size=s).astype(np.float32) * 1e-3 for s in (1000, 4096, 37, 20000)]
    blocks[1][:500] = 0.0
    blocks[2][:] = blocks[0][:37]
    return [torch.from_numpy(b) for b in blocks]


@pytest.mark.parametrize("k", [0.2, 0.05, 0.9, 0.5, 0.001])
def test_threshold_equals_full_sort_with_zeros_and_duplicates(k):
    blocks = worked_blocks()
    flat = torch.cat(blocks).abs()
    D = flat.numel()
    expected = torch.sort(flat).values[D - math.floor(D * k) - 1].item()
    got = radix_threshold(blocks, k)
    assert got == expected
    # reference rule keeps floor(D k) + 1 entries, plus ties at the threshold
    kept = int((flat >= got).sum())
    assert kept >= math.floor(D * k) + 1
    assert kept == int((flat > got).sum()) + int((flat == got).sum())


def test_worked_example_numbers():
    # worked_examples.py prints these for the same data (frac 0.2, 0.05, 0.9)
    blocks = worked_blocks()
    flat = np.abs(torch.cat(blocks).numpy())
    for frac in (0.2, 0.05, 0.9):
        D = flat.size
        ref = np.sort(flat)[D - int(D * frac) - 1]
        assert radix_threshold(blocks, frac) == ref


def test_reference_keep_count_off_by_one():
    row = torch.arange(1, 11, dtype=torch.float32) * torch.tensor([1.0, -1.0] * 5)
    v = radix_threshold([row], 0.2)
    assert int((row.abs() >= v).sum()) == 3  # floor(10*0.2)+1, as the TIES code keeps
    v = radix_threshold([row], 0.2, "exact")
    assert int((row.abs() >= v).sum()) == 2


def test_keep_rank_edges():
    assert S.keep_rank(10, 1.0, "reference") == 0  # keep all
    assert S.keep_rank(10, 0.05, "reference") == 10  # keeps the max (+ties)
    assert S.keep_rank(10, 0.05, "exact") == 10
    assert S.keep_rank(10, 1.0, "exact") == 0


def test_negative_zero_and_subnormals():
    x = torch.tensor([-0.0, 0.0, 1e-45, -1e-44, 3e-39, 1.0, -2.0], dtype=torch.float32)
    for k in (0.1, 0.3, 0.5, 0.7, 0.99):
        D = x.numel()
        expected = torch.sort(x.abs()).values[D - math.floor(D * k) - 1].item()
        assert radix_threshold([x[:3], x[3:]], k) == expected


def test_square_norms_are_exact_and_chunking_free():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g) * torch.logspace(-6, 1, 5000)
    x[:100] = 0
    bits = S.abs_bits(x)
    for k in (0.3, 1.0):
        r = S.keep_rank(x.numel(), k, "reference")
        moments_whole = S.hist_high_moments(bits)
        moments_split = S.hist_high_moments(bits[:1234]) + S.hist_high_moments(bits[1234:])
        assert torch.equal(moments_whole, moments_split)
        if r == 0:
            got = float(S.square_norm_above(moments_whole, -1))
            v = 0.0
        else:
            h, r_in = S.locate(moments_whole[0], r)
            lo = S.hist_low(bits, h)
            low, _ = S.locate(lo, r_in)
            v = S.bits_to_float((h << 16) | low)
            got = float(S.square_norm_above(moments_whole, h) + S.square_norm_in_bin(lo, h, low))
        kept = x[x.abs() >= v].double()
        expected = float(sum(Fraction(float(t)) ** 2 for t in kept.tolist()))
        assert got == expected


@pytest.mark.parametrize("lo", [0, 1, 0x3C00, 0x7F7B])
def test_window_hist_equals_counting_the_selected_offsets(lo):
    g = torch.Generator().manual_seed(lo)
    edges = torch.tensor([lo << 16, (lo << 16) - 1 if lo else 0, ((lo + 4) << 16) - 1, (lo + 4) << 16,
                          0, 0x7FFFFFFF], dtype=torch.int64)
    near = (lo << 16) + torch.randint(-70000, 5 * 65536, (5000,), generator=g)
    bits = torch.cat([edges, near]).clamp(0, 0x7FFFFFFF).to(torch.int32)
    top = bits.long() >> 16
    inside = bits.long()[(top >= lo) & (top < lo + 4)] - (lo << 16)
    want = torch.bincount(inside, minlength=4 * S.NBINS)
    assert torch.equal(S.window_hist(bits, lo, 4), want)
    finite = bits[bits < 0x7F800000]  # (pass A refuses NaN/Inf before counting)
    hist, below = S.window_hist_below_(finite.clone(), lo, 4)
    assert torch.equal(hist, S.window_hist(finite, lo, 4))
    assert below == int((finite.long() < (lo << 16)).sum())


def test_abs_bits_in_place_equals_abs_bits():
    x = torch.tensor([-0.0, 0.0, -1.5, 2.0, -3e-39, float("-inf")])
    want = S.abs_bits(x)
    assert torch.equal(S.abs_bits_(x.clone()), want)
