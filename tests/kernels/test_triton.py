"""The Triton kernels against the torch reference, under Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before anything imports triton).

Every comparison here is BITWISE (same bits, so -0.0 and +0.0 differ; NaN only at the same
places, its payload free since a GPU returns a canonical NaN), votes and masks exactly equal.
That holds because each kernel repeats the reference's float32 operations in its order: torch's
`add_(alpha=)` / `addcmul_` are FMAs and so are the kernels' (`tl.fma`), every other op rounds
separately, divisions are IEEE, and the sums over models (TIES mean, sum and normmass) run in
model order from zero in both (`reference.sum_models`; test_sum_order). So no
comparison needs a tolerance (none is within-one-ulp); the one configuration where the bits
differ, torch's generic x86 CPU kernels, is skipped (GENERIC_X86).

The check_* functions take the device the kernels run on, so test_triton_gpu.py runs the same
checks on CUDA tensors (the reference always runs on CPU copies: it is the definition).
"""

from __future__ import annotations

import platform

import pytest
import torch

triton = pytest.importorskip("triton")
# The kernels fuse what torch fuses where torch's CPU kernels are vectorised (AVX2, AVX512,
# NEON: `add_(alpha=)` is an FMA there, as on CUDA). torch's generic x86 kernels
# (ATEN_CPU_CAPABILITY=default, or a CPU without AVX2) round the product first instead.
GENERIC_X86 = torch.backends.cpu.get_cpu_capability() == "DEFAULT" and platform.machine() in ("x86_64", "AMD64")
pytestmark = [
    # numpy's warnings from inside the interpreter (0/0, Inf*0: the NaN cases tested below)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.skipif(GENERIC_X86, reason="torch runs its generic CPU kernels: the reference does not fuse add(alpha=)"),
]

import tensormerge.kernels.triton as T
from tensormerge.kernels import reference as R
from tensormerge.kernels import select as S

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (7,), (37,), (5, 7, 3), (1000,), (1031,)]  # numel 1, 7, 37, 105, 1000, 1031: masked tails
NS = [1, 2, 3, 5]
WEIGHTS = [0.3, 0.17, 0.29, 0.11, 0.13, 0.21, 0.07, 0.19]  # not dyadic: every product rounds


# ------------------------------------------------------------------------------------ helpers
def same(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape and bits; NaN exactly where the reference has NaN."""
    actual = actual.cpu()
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a_nan, e_nan = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(a_nan, e_nan), f"{what}: NaN at {a_nan.nonzero().tolist()[:5]} vs {e_nan.nonzero().tolist()[:5]}"
    int_t = torch.int64 if expected.dtype == torch.float64 else torch.int32
    a = actual.masked_fill(a_nan, 0).reshape(-1).view(int_t)
    e = expected.masked_fill(e_nan, 0).reshape(-1).view(int_t)
    bad = (a != e).nonzero().reshape(-1)
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {a.numel()} differ, e.g. [{int(bad[0])}] "
                              f"{actual.reshape(-1)[bad[0]].item()!r} vs {expected.reshape(-1)[bad[0]].item()!r}")


def family(shape, n: int, dtype: torch.dtype, seed: int = 0, kind: str = "random"):
    """(base, [θ_1..θ_n]) on CPU. "grid": multiples of 1/16, exact in every dtype, so task
    vectors cancel exactly (τ_2 = −τ_1 on ~40% of the entries), tie at thresholds and are all
    zero on ~10% of the entries. "random": magnitudes spread over many binades."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        base = torch.randn(shape, generator=g)
        taus = [0.05 * torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g)) for _ in range(n)]
    else:
        base = torch.randint(-32, 33, shape, generator=g) / 16
        taus = [torch.randint(-6, 7, shape, generator=g) / 16 for _ in range(n)]
        if n >= 2:
            opposite = torch.rand(shape, generator=g) < 0.4
            taus[1] = torch.where(opposite, -taus[0], taus[1])
            if n >= 3:
                taus[2] = torch.where(opposite & (torch.rand(shape, generator=g) < 0.5), 0.0, taus[2])
        zero = torch.rand(shape, generator=g) < 0.1
        taus = [torch.where(zero, 0.0, t) for t in taus]
    return base.to(dtype), [(base + t).to(dtype) for t in taus]


def on(device, *tensors):
    return [t.to(device) if t is not None else None for t in tensors]


def _ties_case(xs, base, thresholds, sign, sq_norms, merge, lam, guess, device, what):
    got = T.ties_merge(on(device, *xs), on(device, base)[0], thresholds, sign, sq_norms, merge, lam, guess)
    ref = R.ties_merge(xs, base, thresholds, sign, sq_norms, merge, lam, guess)
    same(got[0], ref[0], what)
    assert got[1] == ref[1], f"{what}: votes {got[1]} != {ref[1]}"
    if ref[2] is None:
        assert got[2] is None
    else:
        assert torch.equal(got[2].cpu(), ref[2]), f"{what}: undecided masks differ"
    return ref


def _norms(xs, base, thresholds):
    """Squared norms of the trimmed task vectors, as the TIES passes would compute them."""
    tau = R.ties_trim_(R.task_vectors(xs, base.reshape(-1).float()), thresholds)
    return [float(t.double().square().sum()) for t in tau]


# ------------------------------------------------------------------------------------ linear, DARE
def check_linear(dtype, shape, n, device="cpu"):
    base, xs = family(shape, n, dtype, seed=n)
    w = WEIGHTS[:n]
    what = f"{dtype} {shape} N={n}"
    same(T.weighted_sum(on(device, *xs), w), R.weighted_sum(xs, w), "weighted_sum " + what)
    same(T.task_arithmetic(on(device, *xs), on(device, base)[0], w), R.task_arithmetic(xs, base, w),
         "task_arithmetic " + what)
    args = (0.3, w, 7, True, "layer.0.w", 2**33 + 5)
    same(T.dare(on(device, *xs), on(device, base)[0], *args), R.dare(xs, base, *args), "dare " + what)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_and_dare(dtype, shape, n):
    check_linear(dtype, shape, n)


DARE_EDGES = [(0.0, True), (0.5, True), (0.9999999, True), (1.0, False), (1.5, True), (-0.2, True)]


def check_dare_edges(p, rescale, device="cpu"):
    base, xs = family((37,), 3, torch.float32, seed=11)
    for flat_start in (0, 2**32 - 20, 2**40 + 17):
        args = (p, [1.0, 0.5, 0.25], 3, rescale, "w", flat_start)
        same(T.dare(on(device, *xs), on(device, base)[0], *args), R.dare(xs, base, *args), f"dare p={p} {flat_start}")


@pytest.mark.parametrize("p,rescale", DARE_EDGES)
def test_dare_edges(p, rescale):
    """p = 0 (no mask), p ≥ 1 (everything dropped), p < 0 (nothing dropped), flat indices that
    cross 2**32 inside the chunk and far above it."""
    check_dare_edges(p, rescale)


def test_dare_p_one_with_rescale_raises_like_the_reference():
    base, xs = family((7,), 2, torch.float32)
    with pytest.raises(ZeroDivisionError):
        R.dare(xs, base, 1.0, [1.0, 1.0], 0, True, "w", 0)
    with pytest.raises(ZeroDivisionError):
        T.dare(xs, base, 1.0, [1.0, 1.0], 0, True, "w", 0)


KEEP_STARTS = [0, 1000, 2**31 - 7, 2**32 - 500, 2**33 + 123, 2**45 + 1]


def check_dare_keep(flat_start, device="cpu"):
    for p in (0.0, 0.3, 0.5, 0.9999999, 1.0):
        for model, name in ((0, "a.weight"), (3, "layer.17.mlp.down_proj.weight")):
            got = T.dare_keep(5, model, name, flat_start, 1031, p, device)
            ref = R.dare_keep(5, model, name, flat_start, 1031, p)
            assert torch.equal(got.cpu(), ref), f"mask differs: start={flat_start} p={p} model={model}"


@pytest.mark.parametrize("flat_start", KEEP_STARTS)
def test_dare_mask_is_the_reference_mask(flat_start):
    """The kernel's counter hash against reference.dare_keep, bit for bit, including chunks
    that straddle 2**32 (the high word enters the second fmix32 round)."""
    check_dare_keep(flat_start)


# ------------------------------------------------------------------------------------ Fisher, UBGM
def check_fisher(dtype, n, floor_mode, device="cpu"):
    for shape in ((), (5, 7, 3), (1031,)):
        _, xs = family(shape, n, dtype, seed=20 + n)
        g = torch.Generator().manual_seed(n)
        fishers = [torch.rand(shape, generator=g) ** 2 for _ in range(n)]
        for f in fishers:  # exact zeros, and entries where every Fisher is zero
            f.masked_fill_(torch.rand(shape, generator=g) < 0.15, 0.0)
        everywhere = torch.rand(shape, generator=g) < 0.1
        fishers = [f.masked_fill(everywhere, 0.0) for f in fishers]
        if dtype == torch.bfloat16:
            fishers = [f.to(torch.bfloat16) for f in fishers]
        w = [x / sum(WEIGHTS[:n]) for x in WEIGHTS[:n]]
        for floor, floored in ((1e-8, [True] * n), (3e-3, [True] + [False] * (n - 1)), (0.0, [True] * n)):
            args = (w, floor, floor_mode, floored)
            same(T.fisher_merge(on(device, *xs), on(device, *fishers), *args), R.fisher_merge(xs, fishers, *args),
                 f"fisher {dtype} {shape} N={n} floor={floor} {floored}")


@pytest.mark.parametrize("floor_mode", R.FLOOR_MODES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fisher(dtype, n, floor_mode):
    """Including floor 0 with all-zero Fishers: 0/0 = NaN in both, for the engine to report."""
    check_fisher(dtype, n, floor_mode)


def check_ubgm(dtype, n, device="cpu"):
    for shape in ((), (5, 7, 3), (1031,)):
        base, xs = family(shape, n, dtype, seed=30 + n)
        g = torch.Generator().manual_seed(100 + n)
        hs = [(torch.rand(shape, generator=g) ** 2).masked_fill(torch.rand(shape, generator=g) < 0.2, 0.0)
              for _ in range(n)]
        h0 = torch.rand(shape, generator=g).masked_fill(torch.rand(shape, generator=g) < 0.5, 0.0)
        scales = [1.0, 2.0, 0.5, 3.0, 0.25, 1.5, 0.75, 5.0][:n]
        for bh in (None, h0):
            # δ0 = 0: H̄ = 0 where every H is zero (the δ0 -> 0⁺ limit), and α = 0 too
            for args in ((0.8, 1e-12, 1.5, scales), (0.8, 0.0, 1.5, scales), (0.0, 0.0, 1.5, scales)):
                got = T.ubgm(on(device, *xs), on(device, base)[0], on(device, *hs), on(device, bh)[0], *args)
                same(got, R.ubgm(xs, base, hs, bh, *args),
                     f"ubgm {dtype} {shape} N={n} base_hessian={bh is not None} {args[:2]}")
                assert R.all_finite(got), f"ubgm {args[:2]}: non-finite"


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ubgm(dtype, n):
    check_ubgm(dtype, n)


# ------------------------------------------------------------------------------------ TIES
TIES_DATA = [  # kind, N, shape, guess
    ("grid", 2, (211,), 1.0),
    ("grid", 3, (5, 7, 3), -1.0),
    ("grid", 5, (211,), 0.0),
    ("random", 4, (1031,), 1.0),
]


def check_ties_modes(sign, merge, device="cpu"):
    for kind, n, shape, guess in TIES_DATA:
        base, xs = family(shape, n, torch.bfloat16 if kind == "grid" else torch.float32, seed=n, kind=kind)
        if kind == "grid":
            # exact ties at the thresholds; one model untrimmed; equal norms, so normfrac's
            # argmax ties between τ and −τ (first model wins)
            thresholds = [2 / 16, 0.0, 3 / 16, 1 / 16, 2 / 16][:n]
            sq_norms = [4.0] * n
        else:
            tau = R.task_vectors(xs, base.reshape(-1))
            thresholds = [float(t.abs().sort().values[int(0.3 * t.numel())]) for t in tau]  # a value of τ: a tie
            sq_norms = _norms(xs, base, thresholds)
        ref = _ties_case(xs, base, thresholds, sign, sq_norms, merge, 0.7, guess, device,
                         f"ties {sign}/{merge} {kind} N={n} {shape}")
        if kind == "grid" and n >= 2 and sign in ("mass", "normmass"):
            assert ref[2].any(), "the data should hold exactly cancelling entries"


@pytest.mark.parametrize("merge", R.TIES_MERGES)
@pytest.mark.parametrize("sign", R.SIGN_MODES)
def test_ties_every_sign_and_merge(sign, merge):
    """Merged values, votes and undecided masks, with exact cancellations (elected sign 0),
    ties at the thresholds, all-zero entries and each resolution of zero signs (guess ±1, 0)."""
    check_ties_modes(sign, merge)


TIES_SHAPE_MODES = [("mass", "dis-mean"), ("normmass", "median"), ("normfrac", "magnitude"), ("none", "mean")]


def check_ties_dtype_shape(dtype, shape, n, device="cpu"):
    for i, kind in enumerate(("random", "grid")):
        base, xs = family(shape, n, dtype, seed=40 + n, kind=kind)
        thresholds = ([0.02, 0.0, 0.05, 0.01, 0.03] if kind == "random" else [1 / 16, 2 / 16, 0.0, 1 / 16, 3 / 16])[:n]
        sq_norms = _norms(xs, base, thresholds)
        sign, merge = TIES_SHAPE_MODES[(NS.index(n) + i) % len(TIES_SHAPE_MODES)]
        _ties_case(xs, base, thresholds, sign, sq_norms, merge, 1.0, 1.0, device,
                   f"ties {sign}/{merge} {dtype} {shape} N={n} {kind}")


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("shape", SHAPES[:4] + SHAPES[5:])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_dtypes_and_shapes(dtype, shape, n):
    check_ties_dtype_shape(dtype, shape, n)


SUM_ORDER = [(n, numel) for n in (5, 6, 8, 9, 16) for numel in (1, 3, 5, 8, 37, 70)]


def check_sum_order(n, numel, device="cpu"):
    g = torch.Generator().manual_seed(n * 1000 + numel)
    base = torch.zeros(numel)
    # magnitudes over ~20 binades: any change in the order of the additions shows
    xs = [torch.randn(numel, generator=g) * torch.exp(torch.randn(numel, generator=g) * 6) for _ in range(n)]
    sq_norms = [float(x.double().square().sum()) for x in xs]
    for sign, merge in (("none", "sum"), ("none", "mean"), ("normmass", "sum")):
        _ties_case(xs, base, [0.0] * n, sign, sq_norms, merge, 1.0, 1.0, device,
                   f"ties {sign}/{merge} N={n} numel={numel}")


@pytest.mark.parametrize("n,numel", SUM_ORDER)
def test_sum_order(n, numel):
    """TIES mean / sum / normmass add the models in model order from zero, whatever N and the
    chunk's size (torch's own `sum(0)` order would depend on both): bitwise up to N = 16."""
    check_sum_order(n, numel)


# ------------------------------------------------------------------------------------ NaN / Inf
def check_nonfinite(dtype, device="cpu"):
    """NaN or Inf in an input reaches the output where the reference puts it, so the engine's
    finite check after the merge fires for either kernel set."""
    base, xs = family((1031,), 3, dtype, seed=9)
    xs[1][5] = float("nan")
    xs[0][700] = float("inf")
    xs[2][1030] = float("-inf")
    base[900] = float("nan")
    w = WEIGHTS[:3]
    d = lambda *t: on(device, *t)
    cases = {
        "weighted_sum": (T.weighted_sum(d(*xs), w), R.weighted_sum(xs, w)),
        "task_arithmetic": (T.task_arithmetic(d(*xs), d(base)[0], w), R.task_arithmetic(xs, base, w)),
        "dare": (T.dare(d(*xs), d(base)[0], 0.5, w, 1, True, "n", 0), R.dare(xs, base, 0.5, w, 1, True, "n", 0)),
        "fisher": (T.fisher_merge(d(*xs), d(*[x.abs() for x in xs]), w, 1e-8, "clamp", [True] * 3),
                   R.fisher_merge(xs, [x.abs() for x in xs], w, 1e-8, "clamp", [True] * 3)),
        "ubgm": (T.ubgm(d(*xs), d(base)[0], d(*[x.abs() for x in xs]), None, 1.0, 1e-12, 1.0, [1.0] * 3),
                 R.ubgm(xs, base, [x.abs() for x in xs], None, 1.0, 1e-12, 1.0, [1.0] * 3)),
    }
    for what, (got, ref) in cases.items():
        same(got, ref, f"{what} {dtype}")
        assert not R.all_finite(got), what
    for sign in R.SIGN_MODES:
        for merge in R.TIES_MERGES:
            ref = _ties_case(xs, base, [0.01, 0.0, 0.02], sign, [1.0, 2.0, 3.0], merge, 1.0, -1.0, device,
                             f"ties {sign}/{merge} {dtype} non-finite")
            assert not R.all_finite(ref[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate_like_the_reference(dtype):
    check_nonfinite(dtype)


# ------------------------------------------------------------------------------------ histograms
def _bits(numel: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=g) * torch.exp(torch.randn(numel, generator=g) * 3)
    x[::7] = 0.0
    x[::11] = x[-1]  # many equal values: one bin, many atomics
    x[numel // 2] = 1e-42  # subnormal
    return S.abs_bits(x)


def check_histograms(numel, device="cpu"):
    bits = _bits(numel, numel)
    dev = bits.to(device)
    assert torch.equal(T.hist_high(dev).cpu(), S.hist_high(bits))
    assert torch.equal(T.hist_high_moments(dev).cpu(), S.hist_high_moments(bits))
    for hi_bin in {int(bits[-1] >> 16), int(bits[0] >> 16), 0, 0x7F80}:
        assert torch.equal(T.hist_low(dev, hi_bin).cpu(), S.hist_low(bits, hi_bin)), hi_bin
    lo = max(int(bits[-1] >> 16) - 2, 0)
    assert torch.equal(T.window_hist(dev, lo, 4).cpu(),
                       torch.bincount(S.window_offsets(bits, lo, 4), minlength=4 * S.NBINS))
    got, below = T.window_hist_below_(dev, lo, 4)
    want, want_below = S.window_hist_below_(bits.clone(), lo, 4)
    assert torch.equal(got.cpu(), want) and below == want_below
    negative = bits.clone()
    negative[numel // 2] = -5
    for fn in (T.hist_high, T.hist_high_moments):
        with pytest.raises(RuntimeError):
            fn(negative.to(device))


@pytest.mark.parametrize("numel", [1, 7, 1031, 3000])
def test_histograms_equal_select(numel):
    """Exact int64 counts and moments: any order of the atomics gives select.py's results."""
    check_histograms(numel)


# ------------------------------------------------------------------------------------ fallbacks
def test_unsupported_inputs_fall_back_to_the_reference():
    base, xs = family((6, 5), 3, torch.float32, seed=3)
    w = WEIGHTS[:3]
    x64 = [x.double() for x in xs]  # float64: the reference keeps float64, the kernels cannot
    same(T.weighted_sum(x64, w), R.weighted_sum(x64, w), "float64")
    same(T.task_arithmetic(x64, base, w), R.task_arithmetic(x64, base, w), "float64 task arithmetic")
    got = T.ties_merge(x64, base.double(), [0.01] * 3, "mass", None, "dis-mean", 1.0, 1.0)
    ref = R.ties_merge(x64, base.double(), [0.01] * 3, "mass", None, "dis-mean", 1.0, 1.0)
    same(got[0], ref[0], "float64 ties")
    xt = [x.t() for x in xs]  # non-contiguous views
    same(T.weighted_sum(xt, w), R.weighted_sum(xt, w), "transposed")
    many = xs * 6  # more models than the kernels unroll
    same(T.weighted_sum(many, [0.05] * 18), R.weighted_sum(many, [0.05] * 18), "18 models")
    with pytest.raises(ValueError):
        T.ties_merge(xs, base, [0.0] * 3, "bogus", [1.0] * 3, "dis-mean", 1.0, 1.0)


def test_module_is_a_drop_in_for_the_reference():
    """Every public function of the reference exists on the Triton module with its signature."""
    import inspect

    for name, fn in vars(R).items():
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == R.__name__:
            assert hasattr(T, name), name
            assert inspect.signature(getattr(T, name)) == inspect.signature(fn), name
    for name in ("hist_high", "hist_high_moments", "hist_low"):
        assert inspect.signature(getattr(T, name)) == inspect.signature(getattr(S, name)), name


# ------------------------------------------------------------------------------------ end to end
E2E_TENSORS = {
    "emb.weight": ((41, 13), torch.float32),
    "layer.0.w": ((37, 29), torch.bfloat16),
    "layer.0.b": ((29,), torch.float16),
    "layer.1.w": ((7, 5, 3), torch.float32),
    "scalar": ((), torch.float32),
    "ids": ((1, 9), torch.int64),
}
E2E = {
    "ties": ("ties", {}),
    "ties-normmass": ("ties", {"sign": "normmass", "merge": "dis-max"}),
    "dare": ("dare", {"p": "0.3", "seed": "5"}),
    "average": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "fisher": ("fisher", {"floor_mode": "add"}),
    "ubgm": ("ubgm", {"alpha": "0.8"}),
}
STATS_METHODS = ("fisher", "ubgm")


@pytest.fixture(scope="module")
def e2e_family(tmp_path_factory):
    from tests.conftest import write_family
    from tests.stats.test_stats_engine import make_stats

    root = tmp_path_factory.mktemp("triton-e2e")
    base, fts, base_sd, ft_sds = write_family(root / "models", E2E_TENSORS)
    return base, fts, make_stats(root, ft_sds), make_stats(root / "b", [base_sd])[0]


@pytest.mark.parametrize("label", list(E2E))
def test_merge_with_triton_kernels_writes_the_same_bytes(e2e_family, tmp_path, monkeypatch, label):
    """api.merge with kernels="triton" and with kernels="torch": identical shards (sha256),
    also when the triton run is split into many row chunks (flat offsets, partial blocks)."""
    from tensormerge.api import MergeSpec, merge
    from tests.helpers import shard_digests

    base, fts, stores, base_store = e2e_family
    method, params = E2E[label]
    launches = []
    real_launch = T._launch
    monkeypatch.setattr(T, "_launch", lambda kernel, *a, **k: (launches.append(kernel), real_launch(kernel, *a, **k)))
    digests = {}
    small = "40KiB" if method in STATS_METHODS else "3KiB"
    for kernels, mem in (("torch", "64MiB"), ("triton", "64MiB"), ("triton", small)):
        out = tmp_path / f"{kernels}-{mem}"
        merge(MergeSpec(method, fts, str(out), base=base, params=params, kernels=kernels, max_memory=mem, quiet=True,
                        stats=stores if method in STATS_METHODS else [],
                        base_stats=base_store if method == "ubgm" else None))
        digests[(kernels, mem)] = shard_digests(out)
        if kernels == "torch":
            assert not launches
    assert launches, "the triton run never launched a kernel"
    assert digests[("triton", "64MiB")] == digests[("torch", "64MiB")]
    assert digests[("triton", small)] == digests[("torch", "64MiB")]


def test_triton_kernels_reported_in_provenance(e2e_family, tmp_path):
    from tensormerge.api import MergeSpec, merge

    base, fts, _, _ = e2e_family
    rep = merge(MergeSpec("average", fts, str(tmp_path / "o"), base=base, kernels="triton", quiet=True))
    assert rep["kernels"] == "triton"

