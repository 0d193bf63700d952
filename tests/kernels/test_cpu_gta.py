"""The numba-fused gta merge (kernels/cpu.py gta_fused: mergekit's ties, dare_ties, dare_linear,
task_arithmetic through gta) against the torch code of methods/gta.py: the same bits, for every
mode the kernel takes, exact ties at the magnitude threshold, zero and cancelling task vectors,
density 0 and 1, per-model weights, and the modes it leaves to the torch code."""

from __future__ import annotations

import itertools

import pytest
import torch

from tensormerge.errors import InputError
from tensormerge.methods import get_method
from tensormerge.methods.base import BlockData

pytest.importorskip("numba")
from tensormerge.kernels import cpu as C  # noqa: E402

NAME = "model.layers.0.mlp.up_proj.weight"


def _family(shape, n_models, dtype, base_dtype, seed):
    """bf16-like weights N(0, 0.02), task vectors N(0, 1e-3) with half exact zeros, plus exact
    ties in |δ| (a repeated magnitude straddling the top-k threshold) and cancelling entries."""
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(shape, generator=g)).to(base_dtype)
    fts = []
    for i in range(n_models):
        tau = 1e-3 * torch.randn(shape, generator=g)
        tau[torch.rand(shape, generator=g) < 0.5] = 0
        fts.append((base.float() + tau).to(dtype))
    flat = [f.view(-1) for f in fts]
    b = base.view(-1)
    n = b.numel()
    if n >= 64:
        b[:40] = 0  # equal magnitudes (both signs) at many places: ties at any threshold
        for i, f in enumerate(flat):
            f[:40] = torch.tensor([(-1) ** (j + i) * 2.0 ** -10 for j in range(40)]).to(dtype)
            f[40:44] = b[40:44].to(dtype)  # zero task vectors
        if n_models >= 2:
            b[44:48] = 0
            flat[0][44:48] = 0.5
            flat[1][44:48] = -0.5
    return fts, base


def _merge(method, params, fts, base, shape, ops, state=None, row_start=0):
    m = get_method(method)
    p = m.Params.from_strings(method, params, len(fts))
    data = BlockData(NAME, fts, base, shape, row_start, ops=ops)
    return m.merge(data, p, state or {})


def _same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


CASES = [
    ("ties", {"density": "0.7,0.5,0.33", "weights": "1,0.3,0.5", "normalize": "true"}),
    ("ties", {"density": "0.2,1.0,0.0", "weights": "1,-0.5,2"}),
    ("ties", {"density": "0.5", "weights": "0.5", "normalize": "false", "lambda": "0.7"}),
    ("ties", {"density": "1.0"}),
    ("task_arithmetic", {"weights": "0.3,0.3,0.3"}),
    ("task_arithmetic", {"weights": "0.3,0.5,0.9", "normalize": "true"}),
    ("task_arithmetic", {"weights": "0.5,-0.5,0", "normalize": "true"}),
    ("dare_linear", {"density": "0.53", "weights": "0.4,0.3,0.3", "rescale": "false"}),
    ("dare_ties", {"density": "0.53", "weights": "0.4,0.3,0.3"}),
    ("dare_ties", {"density": "0.0,0.9,1.0", "weights": "1,2,3", "normalize": "true", "seed": "7"}),
]


def _method(name):
    """mergekit's ties and task_arithmetic are gta presets in its recipe reader; here as gta."""
    if name == "ties":
        return "gta", {"sparsify": "magnitude", "consensus": "sum"}
    if name == "task_arithmetic":
        return "gta", {}
    return name, {}


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("shape,dtype,base_dtype", [
    ((64, 48), torch.bfloat16, torch.bfloat16), ((3, 1000), torch.float32, torch.float32),
    ((777,), torch.bfloat16, torch.float32), ((1,), torch.bfloat16, torch.bfloat16),
])
def test_fused_gta_gives_the_torch_bits(case, shape, dtype, base_dtype):
    name, params = CASES[case]
    method, fixed = _method(name)
    params = {**fixed, **params}
    fts, base = _family(shape, 3, dtype, base_dtype, seed=case)
    state = {}
    if method in ("dare_ties", "dare_linear"):  # the rescale pass's norms, any values
        state = {"gta_l1": {NAME: [[3.0, 1.5], [2.0, 1e-9], [1.0, 0.7]]}}
    want = _merge(method, params, fts, base, shape, None, state)
    m = get_method(method)
    p = m.Params.from_strings(method, params, 3)
    data = BlockData(NAME, fts, base, shape, ops=C)
    assert m._fused(data, p, state.get("gta_l1", {}).get(NAME)) is not None  # the kernel ran, not the torch code
    got = _merge(method, params, fts, base, shape, C, state)
    _same(got, want)


def test_fused_gta_chunk_of_a_hashed_tensor_keys_on_its_flat_start():
    """A random-mask chunk that starts mid-tensor hashes from its first element's index."""
    shape = (20, 64)
    fts, base = _family(shape, 3, torch.bfloat16, torch.bfloat16, seed=3)
    params = {"density": "0.4", "weights": "1,1,1", "rescale": "false"}
    want = _merge("dare_ties", params, [f[5:9] for f in fts], base[5:9], shape, None, row_start=5)
    got = _merge("dare_ties", params, [f[5:9] for f in fts], base[5:9], shape, C, row_start=5)
    _same(got, want)


def test_fused_gta_leaves_other_modes_and_bad_values_to_the_torch_code():
    shape = (16, 16)
    fts, base = _family(shape, 3, torch.bfloat16, torch.bfloat16, seed=5)
    for method, params in itertools.chain(
            [("breadcrumbs", {"density": "0.5"}), ("della", {"density": "0.5", "rescale": "false"})],
            [("gta", {"sparsify": "magnitude", "consensus": "count", "density": "0.5"}),
             ("gta", {"sparsify": "magnitude", "density": "0.5", "rescale": "true"})]):
        _same(_merge(method, params, fts, base, shape, C), _merge(method, params, fts, base, shape, None))
    half = [f.half() for f in fts]  # float16 inputs: the torch code
    p = {"sparsify": "magnitude", "consensus": "sum", "density": "0.5"}
    _same(_merge("gta", p, half, base.half(), shape, C), _merge("gta", p, half, base.half(), shape, None))
    fts[1].view(-1)[7] = float("nan")  # magnitude refuses NaN, named as the torch code names it
    with pytest.raises(InputError, match="model 1"):
        _merge("gta", p, fts, base, shape, C)


def test_fused_gta_on_several_threads_gives_the_torch_bits(monkeypatch):
    """A block large enough to be merged in row ranges on several threads (and its models'
    selections on their own threads): the equal-magnitude entries kept (the exact zeros, at a
    density above the nonzero fraction) end inside a later range; hashed entries key on their
    global index. The same bits as the torch code and as one thread."""
    from tensormerge.kernels import threads

    monkeypatch.setattr(threads, "workers", lambda: 4)
    shape = (2100, 1024)  # > 2 * 2^20 entries: two ranges at least
    fts, base = _family(shape, 3, torch.bfloat16, torch.bfloat16, seed=11)
    for method, params, state in (
            ("gta", {"sparsify": "magnitude", "consensus": "sum", "density": "0.85,0.55,0.3",
                     "weights": "1,0.5,0.7", "normalize": "true"}, {}),
            ("dare_ties", {"density": "0.53", "weights": "0.4,0.3,0.3"},
             {"gta_l1": {NAME: [[3.0, 1.5], [2.0, 1.0], [1.0, 0.7]]}})):
        m = get_method(method)
        p = m.Params.from_strings(method, params, 3)
        assert len(threads.ranges(base.numel(), 1 << 20)) >= 2
        assert m._fused(BlockData(NAME, fts, base, shape, ops=C), p, state.get("gta_l1", {}).get(NAME)) is not None
        want = _merge(method, params, fts, base, shape, None, state)
        _same(_merge(method, params, fts, base, shape, C, state), want)
        monkeypatch.setattr(threads, "workers", lambda: 1)
        _same(_merge(method, params, fts, base, shape, C, state), want)
        monkeypatch.setattr(threads, "workers", lambda: 4)


@pytest.mark.parametrize("normalize", ["true", "false"])
def test_weights_summing_past_float32_give_the_torch_bits_without_a_warning(normalize):
    """Two weights near float32's limit sum past it: the divisor is inf in float32 on both paths
    (torch casts the scalar the same way), and numpy's overflow warning does not leak."""
    import warnings

    shape = (64, 48)
    fts, base = _family(shape, 3, torch.bfloat16, torch.bfloat16, seed=11)
    params = {"weights": "3e38,3e38,1", "normalize": normalize}
    want = _merge("gta", params, fts, base, shape, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _merge("gta", params, fts, base, shape, C)
    _same(got, want)
