"""The numba-fused TIES merge (kernels/cpu.py) against the torch reference: the same bits, the
same votes and the same undecided entries, on odd sizes, both storage dtypes it takes, 1-5
models, exact cancellations, ties at the thresholds, untrimmed models and every zero-sign guess;
other modes fall back to the reference; a merge through the CLI writes the same bytes with
`--kernels auto` (numba) and `--kernels torch`."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from tensormerge.kernels import reference as R
from tensormerge.kernels.select import NBINS
from tests import helpers as H

pytest.importorskip("numba")
from tensormerge.kernels import cpu as C  # noqa: E402


def _chunk(n: int, n_models: int, dtype: torch.dtype, base_dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(base_dtype)
    fts = [(base.float() + 0.05 * torch.randn(n, generator=g)).to(dtype) for _ in range(n_models)]
    if n >= 12:
        fts[0][:4] = base[:4].to(dtype)  # zero task vectors
        if n_models >= 2:  # exact cancellation: τ_1 = -τ_0 where both are representable
            base[4:8] = 0
            fts[0][4:8] = 0.5
            fts[1][4:8] = -0.5
            for f in fts[2:]:
                f[4:8] = 0
    tau = R.task_vectors(fts, base.float())
    thresholds = [float(tau[i].abs().quantile(0.6)) for i in range(n_models)]
    thresholds[0] = float(tau[0].abs()[-1])  # an entry exactly at the threshold
    if n_models >= 3:
        thresholds[2] = 0.0  # an untrimmed model
    return fts, base, thresholds


@pytest.mark.parametrize("n,n_models,dtype,base_dtype", [
    (1, 1, torch.float32, torch.float32), (13, 2, torch.bfloat16, torch.bfloat16),
    (1001, 3, torch.bfloat16, torch.bfloat16), (1001, 3, torch.float32, torch.float32),
    (4099, 5, torch.bfloat16, torch.float32), (257, 4, torch.float32, torch.bfloat16),
])
def test_fused_ties_merge_gives_the_reference_bits(n, n_models, dtype, base_dtype):
    fts, base, thresholds = _chunk(n, n_models, dtype, base_dtype, seed=n + n_models)
    for guess, lam in itertools.product((1.0, -1.0, 0.0), (1.0, 0.37)):
        want = R.ties_merge(fts, base, thresholds, "mass", None, "dis-mean", lam, guess)
        got = C.ties_merge(fts, base, thresholds, "mass", None, "dis-mean", lam, guess)
        assert torch.equal(got[0].view(torch.int32), want[0].view(torch.int32)), (guess, lam)
        assert got[1] == want[1]
        assert torch.equal(got[2], want[2])
    if n >= 12 and n_models >= 2:
        assert bool(want[2][4:8].all())  # the cancelling entries are undecided in both


def test_other_modes_and_dtypes_are_the_reference():
    fts, base, th = _chunk(300, 3, torch.bfloat16, torch.bfloat16, seed=1)
    for sign, merge in (("normfrac", "dis-mean"), ("mass", "dis-max"), ("none", "mean")):
        want = R.ties_merge(fts, base, th, sign, [1.0, 2.0, 3.0], merge, 1.0, 1.0)
        got = C.ties_merge(fts, base, th, sign, [1.0, 2.0, 3.0], merge, 1.0, 1.0)
        assert torch.equal(got[0], want[0])
    half = [f.half() for f in fts]  # float16: not fused, still the reference's bits
    want = R.ties_merge(half, base.half(), th, "mass", None, "dis-mean", 1.0, 1.0)
    assert torch.equal(C.ties_merge(half, base.half(), th, "mass", None, "dis-mean", 1.0, 1.0)[0], want[0])


def test_merge_with_numba_writes_the_bytes_of_the_torch_reference(tmp_path):
    base, ins = H.save_cancelling_family(tmp_path)
    digests = []
    for kernels in ("auto", "torch"):
        out = tmp_path / kernels
        res = H.run_cli(["run", "--method", "ties", "--inputs", ",".join(ins), "--base", base, "--output", str(out),
                         "--max-memory", "200KiB", "--kernels", kernels, "-q", "--report", str(tmp_path / "r.json")])
        assert res.returncode == 0, res
        digests.append(H.shard_digests(out))
        assert json.loads((tmp_path / "r.json").read_text())["kernels"] == ("cpu" if kernels == "auto" else "reference")
    assert digests[0] == digests[1]


@pytest.mark.parametrize("n,n_models,dtype,base_dtype", [
    (1, 1, torch.float32, torch.float32), (13, 3, torch.bfloat16, torch.bfloat16),
    (5000, 3, torch.bfloat16, torch.bfloat16), (5000, 5, torch.float32, torch.float32),
    (777, 2, torch.bfloat16, torch.float32), (2048, 3, torch.bfloat16, torch.bfloat16),
    (4097, 2, torch.float32, torch.float32),  # the kernel works in blocks of 2048 entries
])
def test_fused_pass_a_counts_equal_the_reference(n, n_models, dtype, base_dtype):
    fts, base, _ = _chunk(n, n_models, dtype, base_dtype, seed=7 * n + n_models)
    tau = R.task_vectors(fts, base.float())
    # windows around each model's 60th percentile (and one at bin 0): entries fall below, in, above
    windows = [max(int(R.abs_bits_(tau[i].clone()).sort().values[int(0.6 * (n - 1))]) >> 16, 1) - 1
               for i in range(n_models)]
    windows[0] = 0
    want = R.ties_window_counts(fts, base, windows, 4)
    got = C.ties_window_counts(fts, base, windows, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] is want[2] is None
    tau64 = torch.stack([f.double() - base.double() for f in fts])  # exact for these dtypes
    assert torch.equal(got[3], want[3]) and got[3].tolist() == (tau64 == 0).sum(1).tolist()
    assert int(got[0].sum() + got[1].sum()) <= n * n_models
    if n > 3:  # NaN in the last model: both name it
        fts[-1][2] = float("nan")
        assert C.ties_window_counts(fts, base, windows, 4)[2] == R.ties_window_counts(fts, base, windows, 4)[2] \
            == n_models - 1


def test_fused_pass_a_window_at_the_top_and_infinities():
    """The highest window ends at +inf's bits: inf is not counted in it, and names its model; so
    does an inf in the first model of several (every model's count is still complete)."""
    fts, base, _ = _chunk(3000, 3, torch.float32, torch.float32, seed=11)
    top = 0x7F80 - 4
    fts[1][2100] = float("inf")  # past the first block of 2048
    for windows in ([top] * 3, [0, top, 5]):
        want, got = R.ties_window_counts(fts, base, windows, 4), C.ties_window_counts(fts, base, windows, 4)
        assert got[2] == want[2] == 1
    fts[1][2100] = 0.0
    fts[0][7] = float("-inf")
    assert C.ties_window_counts(fts, base, [top] * 3, 4)[2] == R.ties_window_counts(fts, base, [top] * 3, 4)[2] == 0


def test_module_is_a_drop_in_for_the_reference():
    import inspect

    for name, fn in vars(R).items():
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == R.__name__:
            assert inspect.signature(getattr(C, name)) == inspect.signature(fn), name


@pytest.mark.parametrize("n,n_models,dtype,base_dtype", [
    (1, 1, torch.float32, torch.float32), (13, 2, torch.bfloat16, torch.bfloat16),
    (1001, 3, torch.bfloat16, torch.bfloat16), (4099, 5, torch.bfloat16, torch.float32),
    (257, 4, torch.float32, torch.float32),
])
@pytest.mark.parametrize("p,rescale", [(0.0, True), (0.5, True), (0.9, False), (1.0, False), (0.3, True)])
def test_fused_dare_gives_the_reference_bits(n, n_models, dtype, base_dtype, p, rescale):
    fts, base, _ = _chunk(n, n_models, dtype, base_dtype, seed=3 * n + n_models)
    lambdas = [0.3 + 0.2 * i for i in range(n_models)]
    # element indices crossing 2^32 (the hash's high word changes inside the chunk)
    for start in (0, 12345, (1 << 32) - n // 2):
        want = R.dare(fts, base, p, lambdas, 7, rescale, "layer.0.w", start)
        got = C.dare(fts, base, p, lambdas, 7, rescale, "layer.0.w", start)
        assert got.dtype == want.dtype and torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_dare_falls_back_where_torch_does_not_fuse(monkeypatch):
    """Where torch's add_(alpha=) rounds twice (a build without FMA), the reference runs."""
    fts, base, _ = _chunk(300, 3, torch.bfloat16, torch.bfloat16, seed=5)
    calls = []
    monkeypatch.setattr(C, "_FUSES", False)
    monkeypatch.setattr(C._ref, "dare", lambda *a: calls.append(a) or "reference")
    assert C.dare(fts, base, 0.5, [1.0] * 3, 0, True, "w", 0) == "reference" and calls
    half = [f.half() for f in fts]  # float16: not fused either
    monkeypatch.setattr(C, "_FUSES", True)
    assert C.dare(half, base.half(), 0.5, [1.0] * 3, 0, True, "w", 0) == "reference"


def test_dare_with_numba_writes_the_bytes_of_the_torch_reference(tmp_path):
    base, ins = H.save_cancelling_family(tmp_path)
    digests = []
    for kernels in ("auto", "torch"):
        out = tmp_path / kernels
        res = H.run_cli(["run", "--method", "dare", "--inputs", ",".join(ins), "--base", base, "--output", str(out),
                         "--max-memory", "200KiB", "--kernels", kernels, "-q", "-p", "p=0.7", "-p", "seed=3"])
        assert res.returncode == 0, res
        digests.append(H.shard_digests(out))
    assert digests[0] == digests[1]


@pytest.mark.parametrize("n,n_models,dtype,base_dtype", [
    (1, 1, torch.float32, torch.float32), (13, 2, torch.bfloat16, torch.bfloat16),
    (1001, 3, torch.bfloat16, torch.bfloat16), (4099, 5, torch.bfloat16, torch.float32),
    (257, 4, torch.float32, torch.float32),
])
@pytest.mark.parametrize("n_cands", [1, 3, 9])  # 9: more than one kernel's group of 8
def test_fused_task_arithmetic_gives_the_reference_bits(n, n_models, dtype, base_dtype, n_cands):
    fts, base, _ = _chunk(n, n_models, dtype, base_dtype, seed=5 * n + n_models)
    if n >= 12:
        base[8:10] = -0.0  # signed zeros: τ = 0 - (-0) and products of -λ
        for f in fts:
            f[8:10] = 0.0
    lambdas = [[(-1) ** c * (0.1 + 0.37 * c) + 0.05 * i for i in range(n_models)] for c in range(n_cands)]
    lambdas[0][0] = 0.0
    want = R.task_arithmetic_many(fts, base, lambdas)
    got = C.task_arithmetic_many(fts, base, lambdas)
    assert len(got) == n_cands
    for w, g in zip(want, got):
        assert g.shape == w.shape and torch.equal(g.view(torch.int32), w.view(torch.int32))
    one = C.task_arithmetic(fts, base, lambdas[-1])
    assert torch.equal(one.view(torch.int32), R.task_arithmetic(fts, base, lambdas[-1]).view(torch.int32))


@pytest.mark.parametrize("method,params", [("task_arithmetic", ["-p", "lambda=0.7"]),
                                           ("task_arithmetic", ["-p", "lambdas=0.5,-0.3,1.1"])])
def test_task_arithmetic_with_numba_writes_the_bytes_of_the_torch_reference(tmp_path, method, params):
    base, ins = H.save_cancelling_family(tmp_path)
    digests = []
    for kernels in ("auto", "torch"):
        out = tmp_path / kernels
        res = H.run_cli(["run", "--method", method, "--inputs", ",".join(ins[:3]), "--base", base, "--output", str(out),
                         "--max-memory", "200KiB", "--kernels", kernels, "-q", *params])
        assert res.returncode == 0, res
        digests.append(H.shard_digests(out))
    assert digests[0] == digests[1]


def test_fused_pass_a_many_windows_equal_separate_calls():
    """A sweep's k values: several windows per model in one pass, each what its own call counts
    (and what the reference counts), across groups of MAX_WINDOWS; a NaN names its model."""
    fts, base, _ = _chunk(5000, 3, torch.bfloat16, torch.bfloat16, seed=13)
    tau = R.task_vectors(fts, base.float())
    windows = []
    for q in (0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99):  # 9: two groups
        windows.append([max(int(R.abs_bits_(tau[i].clone()).sort().values[int(q * 4999)]) >> 16, 1) - 1
                        for i in range(3)])
    windows[1] = [0, 0, 0]
    got = C.ties_window_counts_many(fts, base, windows, 4)
    assert len(got) == len(windows)
    for ws, (h, below, bad, zeros) in zip(windows, got):
        want = R.ties_window_counts(fts, base, ws, 4)
        assert torch.equal(h, want[0]) and torch.equal(below, want[1]) and bad is want[2] is None
        assert torch.equal(zeros, want[3])
    fts[2][4100] = float("nan")
    assert [g[2] for g in C.ties_window_counts_many(fts, base, windows, 4)] == [2] * len(windows)


@pytest.mark.parametrize("dtype,base_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                              (torch.float32, torch.float32)])
def test_fused_pass_b_bins_of_many_candidates_equal_the_reference(dtype, base_dtype):
    """A sweep's pass B: each candidate's threshold bin per model counted from one pass, where
    candidates share a bin, a bin is empty, and bins hold entries equal to the base (τ = 0, bin
    0); each candidate's histogram is the reference's one-bin window."""
    fts, base, _ = _chunk(6000, 3, dtype, base_dtype, seed=17)
    if dtype == torch.float32:  # |τ| subnormal with top 16 bits 0: bin 0 besides the exact zeros
        base[10:13] = 0.0
        fts[0][10:13] = torch.tensor([5e-41, -3e-41, 1e-45])
    tau = R.task_vectors(fts, base.float())
    bins = []
    for q in (0.5, 0.7, 0.9, 0.97):
        bins.append([int(R.abs_bits_(tau[i].clone()).sort().values[int(q * 5999)]) >> 16 for i in range(3)])
    bins.append(list(bins[1]))  # the same bins as another candidate
    bins.append([0, 0x7F00, bins[0][2]])  # τ = 0 entries, an empty bin
    got = C.ties_bin_counts_many(fts, base, bins)
    for bs, g in zip(bins, got):
        want = R.ties_window_counts(fts, base, bs, 1)[0]
        assert torch.equal(g, want), bs
    assert int(got[-1][0].sum()) > 0 and int(got[-1][1].sum()) == 0
    if dtype == torch.float32:
        assert int(got[-1][0][1:].sum()) >= 3  # the subnormal ones, beside τ = 0 in column 0


@pytest.mark.parametrize("n,n_models,dtype,base_dtype", [
    (1, 1, torch.float32, torch.float32), (1001, 3, torch.bfloat16, torch.bfloat16),
    (4099, 5, torch.bfloat16, torch.float32), (257, 2, torch.float32, torch.float32),
])
def test_fused_full_histograms_equal_the_reference(n, n_models, dtype, base_dtype):
    """TIES' recount after a missed window: per model, the top 16 bits of |τ_i| counted, as the
    reference's bincount of the task vectors' bits (infinities and NaNs in their own bins)."""
    fts, base, _ = _chunk(n, n_models, dtype, base_dtype, seed=17 * n + n_models)
    if n > 10:
        fts[0][3], fts[-1][5] = float("inf"), float("nan")
    want = R.ties_hist_high(fts, base)
    got = C.ties_hist_high(fts, base)
    assert got.shape == (n_models, 1 << 16) and torch.equal(got, want) and int(got.sum()) == n * n_models


def _votes64(fts, base, thresholds) -> int:
    """Σ sign(Σ_i τ̂_i) by the formula: float64 task vectors (exact for these dtypes), kept where
    |τ_i| >= v_i in float32 as the reference compares, summed in float64 in model order."""
    tau = torch.stack([f.double().reshape(-1) - base.double().reshape(-1) for f in fts])
    keep = tau.float().abs() >= torch.tensor(thresholds, dtype=torch.float32)[:, None]
    total = (tau * keep).sum(0)
    return int((total > 0).sum()) - int((total < 0).sum())


@pytest.mark.parametrize("n,n_models,dtype,base_dtype", [
    (1, 1, torch.float32, torch.float32), (13, 2, torch.bfloat16, torch.bfloat16),
    (1001, 3, torch.bfloat16, torch.bfloat16), (1001, 3, torch.float32, torch.float32),
    (4099, 5, torch.bfloat16, torch.float32), (257, 4, torch.float32, torch.bfloat16),
])
def test_fused_votes_equal_the_reference_and_the_merge(n, n_models, dtype, base_dtype):
    """The vote pass's kernel counts what the merge kernel returns as its vote, for each of
    several threshold sets at once (more than one kernel call holds), exact cancellations, signed
    zeros (τ = −0 votes nothing) and untrimmed models included; the float64 formula agrees."""
    fts, base, thresholds = _chunk(n, n_models, dtype, base_dtype, seed=5 * n + n_models)
    if n >= 12:
        base[8] = 0.0
        fts[0][8] = -0.0  # τ_0 = −0 − 0 = −0: no vote
        fts[-1][9] = float(base[9]) if n_models > 1 else fts[-1][9]
    sets = [thresholds, [0.0] * n_models] + [[t * f for t in thresholds] for f in (0.25, 0.5, 0.75, 1.25, 1.5,
                                                                                      2.0, 4.0, 8.0)]
    assert len(sets) > C.MAX_FUSED_CANDIDATES
    want = [R.ties_merge(fts, base, th, "mass", None, "dis-mean", 1.0, 1.0)[1] for th in sets]
    assert R.ties_votes_many(fts, base, sets, "mass", [None] * len(sets)) == want
    assert C.ties_votes_many(fts, base, sets, "mass", [None] * len(sets)) == want
    assert [C.ties_votes(fts, base, th, "mass", None) for th in sets[:2]] == want[:2]
    assert want == [_votes64(fts, base, th) for th in sets]
    if n >= 1000:
        assert len(set(want)) > 1  # the thresholds change the votes: the sets are not all alike


@pytest.mark.parametrize("n,n_models,dtype,base_dtype", [
    (1, 1, torch.float32, torch.float32), (13, 2, torch.bfloat16, torch.bfloat16),
    (1001, 3, torch.bfloat16, torch.bfloat16), (1001, 3, torch.float32, torch.float32),
    (4099, 5, torch.bfloat16, torch.float32), (257, 4, torch.float32, torch.bfloat16),
])
def test_fused_merge_of_many_candidates_gives_each_single_merge(n, n_models, dtype, base_dtype):
    """A sweep's candidates (thresholds, λ and majority each their own, more than one kernel
    call holds) merged from one pass: each the bits of the single merge with that majority as its
    guess (which the reference defines), exact cancellations and every majority included."""
    fts, base, thresholds = _chunk(n, n_models, dtype, base_dtype, seed=7 * n + n_models)
    sets = [thresholds, [0.0] * n_models] + [[t * f for t in thresholds] for f in (0.25, 0.5, 2.0, 4.0, 8.0, 0.1, 0.75)]
    assert len(sets) > C.MAX_FUSED_CANDIDATES
    lams = [1.0, 0.37, 2.5, 1.0, 0.5, 1.0, 0.8, 1.2, 0.9]
    majorities = [1.0, -1.0, 0.0, -1.0, 1.0, 0.0, 1.0, -1.0, 0.0]
    got = C.ties_merge_many(fts, base, sets, "mass", [None] * len(sets), "dis-mean", lams, majorities)
    ref = R.ties_merge_many(fts, base, sets, "mass", [None] * len(sets), "dis-mean", lams, majorities)
    for c, (th, lam, m) in enumerate(zip(sets, lams, majorities)):
        want = R.ties_merge(fts, base, th, "mass", None, "dis-mean", lam, m)[0]
        assert torch.equal(ref[c].view(torch.int32), want.view(torch.int32)), c
        assert torch.equal(got[c].view(torch.int32), want.view(torch.int32)), c


def test_fused_merge_of_many_candidates_matches_the_float64_formula():
    """Independent of the kernels: trim |τ_i| >= v_i, elect sign(Σ τ̂_i) (a zero one takes the
    majority), mean of the τ̂_i agreeing with it, × λ, + θ_0, in float64 from float32 values."""
    fts, base, thresholds = _chunk(2003, 3, torch.bfloat16, torch.bfloat16, seed=3)
    sets, lams, majorities = [thresholds, [t * 2 for t in thresholds]], [1.0, 0.5], [1.0, -1.0]
    got = C.ties_merge_many(fts, base, sets, "mass", [None, None], "dis-mean", lams, majorities)
    tau = torch.stack([f.double() - base.double() for f in fts])
    for g, th, lam, m in zip(got, sets, lams, majorities):
        kept = tau * (tau.float().abs() >= torch.tensor(th)[:, None]).double()
        sign = torch.sign(kept.sum(0))
        sign[sign == 0] = m
        agree = (kept * sign > 0).double()
        want = (kept * agree).sum(0) / agree.sum(0).clamp_min(1) * lam + base.double()
        assert torch.allclose(g.double(), want, rtol=1e-6, atol=1e-7)


def test_votes_of_other_modes_and_nonfinite_values_are_the_reference():
    """Other signs (and float16) are the reference's votes, as its merge returns them; ±inf
    (which the threshold pass refuses first) counts alike in both kernels, inf − inf as no vote.
    NaN is outside both: the reference's merge cannot count its vote either."""
    fts, base, th = _chunk(300, 3, torch.bfloat16, torch.bfloat16, seed=2)
    sq = [1.0, 2.0, 3.0]
    for sign in ("normfrac", "normmass", "none"):
        want = R.ties_merge(fts, base, th, sign, sq, "dis-mean", 1.0, 1.0)[1]
        assert R.ties_votes(fts, base, th, sign, sq) == C.ties_votes(fts, base, th, sign, sq) == want, sign
    half = [f.half() for f in fts]
    assert C.ties_votes(half, base.half(), th, "mass", None) == R.ties_merge(half, base.half(), th, "mass", None,
                                                                             "dis-mean", 1.0, 1.0)[1]
    f32, b32, th32 = _chunk(301, 3, torch.float32, torch.float32, seed=4)
    f32[0][3], f32[1][5], f32[1][6], f32[2][6] = float("inf"), float("inf"), float("inf"), float("-inf")
    f32[0][7] = float("-inf")
    got = C.ties_votes(f32, b32, th32, "mass", None)
    assert got == R.ties_votes(f32, b32, th32, "mass", None) == _votes64(f32, b32, th32)
    assert got == R.ties_votes([f[:3] for f in f32], b32[:3], th32, "mass", None) + \
        R.ties_votes([f[3:] for f in f32], b32[3:], th32, "mass", None)


# ------------------------------------------------------------------ pass A's votes
def _window_vote(votes, fts, base, windows, thresholds) -> int:
    """The vote pass A's three parts give for thresholds inside the windows: the entries it counted,
    the listed changes at offsets >= each threshold's, and its logged entries elected by the
    float64 formula."""
    fixed, where, change, log = votes
    span = 4 * NBINS
    delta = torch.zeros(len(fts) * span, dtype=torch.int64).index_add_(0, where, change).reshape(len(fts), span)
    offsets = [int(torch.tensor([v], dtype=torch.float32).view(torch.int32)) - (w << 16)
               for v, w in zip(thresholds, windows)]
    assert all(0 <= j < span for j in offsets)
    listed = 0
    if len(log):
        keep = log.float().abs() >= torch.tensor(thresholds, dtype=torch.float32)
        total = (log.double() * keep).sum(1)
        listed = int((total > 0).sum()) - int((total < 0).sum())
    return fixed + sum(int(delta[i, j:].sum()) for i, j in enumerate(offsets)) + listed


@pytest.mark.parametrize("n,n_models,dtype,base_dtype", [
    (1, 1, torch.float32, torch.float32), (13, 2, torch.bfloat16, torch.bfloat16),
    (5000, 3, torch.bfloat16, torch.bfloat16), (5000, 5, torch.float32, torch.float32),
    (777, 2, torch.bfloat16, torch.float32), (4097, 3, torch.float32, torch.float32),
    (6000, 3, torch.float16, torch.float16),  # the reference's (no fused form for float16)
])
def test_pass_a_votes_are_the_vote_pass_for_every_threshold_inside_the_windows(n, n_models, dtype, base_dtype):
    """Pass A's votes (`ties_window_votes`) give, for thresholds anywhere inside the windows
    (their first and last offsets, exactly at an entry's |τ| (a tie: kept), random ones, and 0
    in a window at bin 0), the vote the float64 formula counts; fused and reference agree part by
    part, and the window counts are `ties_window_counts`' own."""
    fts, base, _ = _chunk(n, n_models, dtype, base_dtype, seed=3 * n + n_models)
    if n_models >= 2 and n >= 100:
        fts[1][50:90] = fts[0][50:90]  # equal task vectors: both inside their windows together
    tau = torch.stack([f.float() - base.float() for f in fts])
    bits = [R.abs_bits_(t.clone()) for t in tau]
    windows = [max(int(b.sort().values[int(0.6 * (n - 1))]) >> 16, 1) - 1 for b in bits]
    if n_models >= 3:
        windows[2] = 0
    span = 4 * NBINS
    got = C.ties_window_votes(fts, base, windows, 4, n)
    want = R.ties_window_votes(fts, base, windows, 4, n)
    counts = R.ties_window_counts(fts, base, windows, 4)
    assert got[0].dim() == (2 if dtype == torch.float16 else 1)  # fused: one flat place per entry inside
    listed = got[0] if got[0].dim() == 2 else torch.bincount(got[0], minlength=n_models * span).reshape(n_models, span)
    for a, b, c in zip((listed,) + got[1:4], want[:4], counts):
        assert (a is b is c is None) or (torch.equal(a, b) and torch.equal(b, c))
    (gf, gw, gc, gl), (wf, ww, wc, wl) = got[4], want[4]
    dense = [torch.zeros(n_models * span, dtype=torch.int64).index_add_(0, w, c) for w, c in ((gw, gc), (ww, wc))]
    assert gf == wf and torch.equal(dense[0], dense[1]) and torch.equal(gl.to(wl.dtype), wl)
    g = torch.Generator().manual_seed(n)
    choices = []
    for i, (b, w) in enumerate(zip(bits, windows)):
        inside = b[(b >= w << 16) & (b < (w << 16) + span)]
        options = [w << 16, (w << 16) + span - 1] + [int(x) for x in inside[:3]]
        options += [(w << 16) + int(torch.randint(span, (1,), generator=g)) for _ in range(3)]
        choices.append(options)
    picks = list(itertools.product(*choices))
    for pick in picks[::max(1, len(picks) // 60)]:
        thresholds = [float(torch.tensor([p], dtype=torch.int32).view(torch.float32)) for p in pick]
        assert _window_vote(got[4], fts, base, windows, thresholds) == _votes64(fts, base, thresholds)
    if n >= 4000 and n_models >= 3:
        assert len(gl) and len(gw)  # entries of each kind were there to count


def test_pass_a_votes_give_up_past_their_log_and_on_nonfinite_values():
    """More entries with two τ_i inside than the log takes: no votes (the vote pass runs); a NaN:
    no votes and the model named, as the window counts name it."""
    fts, base, _ = _chunk(3000, 3, torch.bfloat16, torch.bfloat16, seed=2)
    fts[1] = fts[0].clone()  # every entry inside one window is inside the other's
    bits = R.abs_bits_(fts[0].float() - base.float())
    w = max(int(bits.sort().values[1800]) >> 16, 1) - 1
    for mod in (C, R):
        assert len(mod.ties_window_votes(fts, base, [w] * 3, 4, 3000)[4][3]) > 10
        assert mod.ties_window_votes(fts, base, [w] * 3, 4, 10)[4] is None
    fts[2][2500] = float("nan")
    for mod in (C, R):
        out = mod.ties_window_votes(fts, base, [w] * 3, 4, 3000)
        assert out[2] == 2 and out[4] is None
