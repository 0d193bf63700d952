"""average, task_arithmetic and DARE against float64 formulas written here."""

import pytest
import torch

from tensormerge.kernels import reference as K
from tensormerge.methods import get_method
from tensormerge.methods.base import BlockData
from tensormerge.errors import ParameterError

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(3,), (37, 19), (5, 7, 3), ()]
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-6, torch.float16: 1e-6}


def run(method, inputs, base=None, name="t", **raw):
    m = get_method(method)
    params = m.Params.from_strings(method, raw, len(inputs))
    return m.merge(BlockData(name, inputs, base, tuple(inputs[0].shape)), params, {})


def models(shape, dtype, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    return base, [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]


def test_worked_examples():
    m1, m2 = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -2.0, -1.0])
    assert torch.equal(run("average", [m1, m2]), torch.tensor([2.0, 0.0, -1.0]))
    ta = run("task_arithmetic", [m1, m2], torch.zeros(3), **{"lambda": "0.3"})
    torch.testing.assert_close(ta, torch.tensor([1.2, 0.0, -0.6]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_average_and_weights(dtype, shape):
    base, xs = models(shape, dtype)
    x64 = [x.double() for x in xs]
    got = run("average", xs)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), sum(x64) / 3, rtol=0, atol=TOL[dtype] * 4)
    got = run("average", xs, weights="0.5,0.3,0.2")
    torch.testing.assert_close(got.double(), 0.5 * x64[0] + 0.3 * x64[1] + 0.2 * x64[2], rtol=0, atol=1e-5)
    got = run("average", xs, weights="2,1,1", normalize="true")
    torch.testing.assert_close(got.double(), 0.5 * x64[0] + 0.25 * x64[1] + 0.25 * x64[2], rtol=0, atol=1e-5)
    got = run("average", xs, weights="2,1,1")  # SPEC: normalize is true when weights are given (mergekit's linear)
    torch.testing.assert_close(got.double(), 0.5 * x64[0] + 0.25 * x64[1] + 0.25 * x64[2], rtol=0, atol=1e-5)
    got = run("average", xs, weights="2,1,1", normalize="false")
    torch.testing.assert_close(got.double(), 2 * x64[0] + x64[1] + x64[2], rtol=0, atol=1e-5 * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic(dtype, shape):
    base, xs = models(shape, dtype)
    b64, x64 = base.double(), [x.double() for x in xs]
    got = run("task_arithmetic", xs, base)
    torch.testing.assert_close(got.double(), b64 + 0.3 * sum(x - b64 for x in x64), rtol=0, atol=1e-5)
    got = run("task_arithmetic", xs, base, lambdas="1,-0.5,0.25")
    exp = b64 + (x64[0] - b64) - 0.5 * (x64[1] - b64) + 0.25 * (x64[2] - b64)
    torch.testing.assert_close(got.double(), exp, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_formula(dtype):
    base, xs = models((37, 19), dtype)
    b64 = base.double()
    got = run("dare", xs, base, name="layer.w", p="0.3", seed="7", **{"lambda": "0.8"})
    exp = b64.clone()
    for i, x in enumerate(xs):
        keep = K.dare_keep(7, i, "layer.w", 0, x.numel(), 0.3).reshape(x.shape).double()
        exp += 0.8 * keep * (x.double() - b64) / 0.7
    torch.testing.assert_close(got.double(), exp, rtol=0, atol=1e-5)


def test_dare_mask_statistics_and_independence():
    n = 200_000
    masks = [K.dare_keep(0, i, "w", 0, n, 0.5) for i in range(3)]
    for m in masks:
        assert abs(m.float().mean().item() - 0.5) < 0.005
    both = (masks[0] & masks[1]).float().mean().item()
    assert abs(both - 0.25) < 0.005  # models get independent masks
    assert not torch.equal(K.dare_keep(0, 0, "w", 0, n, 0.5), K.dare_keep(0, 0, "v", 0, n, 0.5))
    assert not torch.equal(K.dare_keep(0, 0, "w", 0, n, 0.5), K.dare_keep(1, 0, "w", 0, n, 0.5))
    assert abs(K.dare_keep(0, 0, "w", 0, n, 0.9).float().mean().item() - 0.1) < 0.005


def test_dare_mask_is_chunking_free():
    whole = K.dare_keep(3, 1, "w", 0, 10_000, 0.4)
    parts = torch.cat([K.dare_keep(3, 1, "w", s, e - s, 0.4) for s, e in [(0, 17), (17, 5000), (5000, 10_000)]])
    assert torch.equal(whole, parts)
    # elements past 2**32 get masks of their own (no wrap of the counter)
    assert not torch.equal(K.dare_keep(3, 1, "w", 0, 64, 0.5), K.dare_keep(3, 1, "w", 2**32, 64, 0.5))


def test_dare_p0_is_task_arithmetic():
    base, xs = models((11, 4), torch.float32)
    assert torch.equal(run("dare", xs, base, p="0", **{"lambda": "0.3"}), run("task_arithmetic", xs, base))


@pytest.mark.parametrize("method,raw,msg", [
    ("dare", {"p": "1.0"}, "'p'"),
    ("dare", {"q": "1"}, "has no parameter 'q'"),
    ("average", {"weights": "1,2"}, "2 values for 3 models"),
    ("ties", {"k": "0"}, "'k'"),
    ("ties", {"sign": "bogus"}, "not one of"),
    ("task_arithmetic", {"lambda": "abc"}, "cannot read"),
    ("task_arithmetic", {"lambda": True}, "cannot read True as float"),  # YAML's `lambda: true`
    ("average", {"weights": [True, 1, 1]}, "cannot read .* as a list of float"),  # YAML `[true, 1, 1]`
    ("average", {"weights": "[1,2,3]"}, r"without brackets: weights=1,2\)$"),
    ("task_arithmetic", {"lambda": "0.3,0.5"}, "several values to try"),
    ("mats", {"iterations": "0"}, r"'iterations' must be in \[1, 100000\], not 0"),
    ("mats", {"iterations": "1000000000"}, r"'iterations' must be in \[1, 100000\]"),  # with tol=0: days per block
])
def test_bad_parameters(method, raw, msg):
    m = get_method(method)
    with pytest.raises(ParameterError, match=msg):
        m.Params.from_strings(method, raw, 3)


def _fmix32_py(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@pytest.mark.parametrize("start", [0, 2**31 - 3, 2**32 - 5, 3 * 2**32 + 11])
def test_dare_mask_equals_the_hash_in_python_integers(start):
    """The int32 tensor arithmetic gives the bits of the uint32 algorithm, across word boundaries."""
    k1, k2 = K.dare_keys(5, 2, "blk")
    got = K.dare_keep(5, 2, "blk", start, 40, 0.37)
    cut = int(0.37 * 2**32)
    want = []
    for i in range(start, start + 40):
        h = _fmix32_py(_fmix32_py((i & 0xFFFFFFFF) ^ k1) ^ (((i >> 32) * 0x27D4EB2F + k2) & 0xFFFFFFFF))
        want.append(h >= cut)
    assert got.tolist() == want
    assert not K.dare_keep(5, 2, "blk", start, 40, 1.0).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_average_normalizes_given_weights_by_default(dtype):
    """SPEC §4, as mergekit's linear: weights 1,2,3 are divided by their sum 6; normalize=false
    keeps them verbatim; no weights is 1/N either way."""
    _, xs = models((37, 19), dtype)
    x64 = [x.double() for x in xs]
    want = (1 * x64[0] + 2 * x64[1] + 3 * x64[2]) / 6
    torch.testing.assert_close(run("average", xs, weights="1,2,3").double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(run("average", xs, weights="1,2,3", normalize="false").double(), 6 * want,
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(run("average", xs, normalize="false").double(), sum(x64) / 3, rtol=0, atol=1e-5)
    with pytest.raises(ParameterError, match="normalize=false"):
        run("average", xs, weights="1,-1,0")
    torch.testing.assert_close(run("average", xs, weights="1,-1,0", normalize="false").double(), x64[0] - x64[1],
                               rtol=0, atol=1e-5)
