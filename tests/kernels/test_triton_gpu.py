"""The Triton kernels compiled for a GPU, where test_triton.py can only interpret them.

* test_kernels_compile_for_cuda: on any machine whose Triton has the NVIDIA backend (no GPU
  needed), every kernel variant goes through the real compiler down to a cubin for sm_90, and
  its PTX shows what bitwise equality with the reference rests on: IEEE divisions only, and no
  multiply-add contracted into an FMA beyond the kernels' explicit tl.fma.
* The CUDA checks: test_triton.py's checks on CUDA tensors against the reference on CPU copies
  (the definition), bitwise, and api.merge on cuda with kernels="triton" against cpu with
  kernels="torch", identical bytes. tests/conftest.py turns the interpreter on for the whole
  session, so they run in a child pytest with TRITON_INTERPRET=0; skipped without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels import test_triton as C

ROOT = Path(__file__).resolve().parents[2]
COMPILED = os.environ.get("TRITON_INTERPRET") != "1"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
# the CUDA checks proper: skipped without CUDA, and in the interpreted parent (test_cuda_checks runs them)
on_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and COMPILED),
                             reason="no CUDA device" if not torch.cuda.is_available()
                             else "runs in the compiled child of test_cuda_checks")
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _child_env() -> dict:
    return {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------------------------ compile
_COMPILE = textwrap.dedent(r'''
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tensormerge.kernels.triton import _kernels as K

    TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64", torch.bool: "i1"}

    def sig(a):
        if isinstance(a, tuple):
            return tuple(sig(x) for x in a)
        if isinstance(a, torch.Tensor):
            return "*" + TY[a.dtype]
        return "i32" if -2**31 <= a < 2**31 else "i64"

    def ptx(kernel, args, **constexprs):
        signature = {name: sig(a) for name, a in zip(kernel.arg_names, args)}
        signature.update({k: "constexpr" for k in list(constexprs) + ["BLOCK"]})
        src = ASTSource(kernel, signature=signature, constexprs=dict(constexprs, BLOCK=1024))
        # the options the launcher passes (tensormerge.kernels.triton._launch)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
        return out.asm["ptx"]

    e = lambda dt=torch.float32: torch.empty(0, dtype=dt)
    X = lambda n: tuple(e((torch.float32, torch.bfloat16, torch.float16)[i % 3]) for i in range(n))
    found = {}
    found["weighted_sum"] = ptx(K.weighted_sum_kernel, (X(3), e(), e(), 10), N=3)
    found["task_arithmetic"] = ptx(K.task_arithmetic_kernel, (X(3), e(), e(), e(), 10), N=3)
    found["dare"] = ptx(K.dare_kernel, (X(3), e(), e(), e(torch.int64), e(), 10, 2**33, 2**31), N=3, APPLY=True)
    found["dare_keep"] = ptx(K.dare_keep_kernel, (e(torch.int64), e(torch.bool), 10, 2**33, 2**32))
    found["fisher"] = ptx(K.fisher_kernel, (X(3), X(3), e(), e(torch.int32), e(), 10), N=3, CLAMP=True)
    found["ubgm"] = ptx(K.ubgm_kernel, (X(3), e(), X(3), e(), e(), e(), 10), N=3, HAS_BH=True)
    for mode in range(4):
        found[f"hist{mode}"] = ptx(K.hist_kernel, (e(torch.int32), e(torch.int64), e(torch.int64), 10, 3, 4),
                                   MODE=mode, NBINS=65536)
    ties = (X(3), e(), e(), e(), e(torch.bool), e(torch.int32), 10, 8)
    for sign, merges in ((0, range(7)), (1, (0, 3)), (2, (0, 5)), (3, range(7))):
        for merge in merges:
            found[f"ties{sign}{merge}"] = ptx(K.ties_kernel, ties, N=3, SIGN=sign, MERGE=merge, INNER=False, VF=8)
    found["ties23-n5"] = ptx(K.ties_kernel, (X(5),) + ties[1:], N=5, SIGN=2, MERGE=3, INNER=False, VF=8)
    found["ties24-inner"] = ptx(K.ties_kernel, (X(8),) + ties[1:], N=8, SIGN=2, MERGE=4, INNER=True, VF=8)
    for name, text in found.items():
        fmas = text.count("fma.rn.f32")
        approx = text.count("div.approx") + text.count("div.full")
        print(name, fmas, approx)
''')


def test_kernels_compile_for_cuda():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: no NVIDIA backend here
        pytest.skip(f"Triton has no NVIDIA backend here: {exc}")
    res = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=_child_env(), capture_output=True,
                         text=True, timeout=600, check=False)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's ptxas is not available")
    assert res.returncode == 0, res.stderr[-4000:]
    counts = {}
    for line in res.stdout.splitlines():
        name, fmas, approx = line.split()
        counts[name] = (int(fmas), int(approx))
    assert len(counts) == 6 + 4 + 18 + 2
    for name, (fmas, approx) in counts.items():
        assert approx == 0, f"{name}: approximate division in the PTX"
    # kernels whose source has tl.fma keep them; TIES merges without tl.fma (everything but
    # dis-mean / dis-sum) must have none, or `merged * lam + base` was contracted
    for name in ("weighted_sum", "task_arithmetic", "dare", "fisher", "ubgm", "ties00", "ties31"):
        assert counts[name][0] > 0, name
    for name, (fmas, _) in counts.items():
        if name.startswith("ties") and name[5] in "23456":  # ties{sign}{merge}[-variant]
            assert fmas == 0, f"{name}: contracted FMA"


# ------------------------------------------------------------------------------------ CUDA
@cuda
def test_cuda_checks():
    """Runs the CUDA tests below in a child pytest where Triton compiles instead of interpreting."""
    if COMPILED:
        pytest.skip("this is the child")
    res = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "on_cuda"],
                         cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=3000, check=False)
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-4000:]


@on_cuda
@pytest.mark.parametrize("n", C.NS)
@pytest.mark.parametrize("shape", C.SHAPES)
@pytest.mark.parametrize("dtype", C.DTYPES)
def test_linear_and_dare_on_cuda(dtype, shape, n):
    C.check_linear(dtype, shape, n, "cuda")


@on_cuda
@pytest.mark.parametrize("p,rescale", C.DARE_EDGES)
def test_dare_edges_on_cuda(p, rescale):
    C.check_dare_edges(p, rescale, "cuda")


@on_cuda
@pytest.mark.parametrize("flat_start", C.KEEP_STARTS)
def test_dare_mask_on_cuda(flat_start):
    C.check_dare_keep(flat_start, "cuda")


@on_cuda
@pytest.mark.parametrize("floor_mode", ("clamp", "add"))
@pytest.mark.parametrize("n", C.NS)
@pytest.mark.parametrize("dtype", C.DTYPES)
def test_fisher_on_cuda(dtype, n, floor_mode):
    C.check_fisher(dtype, n, floor_mode, "cuda")


@on_cuda
@pytest.mark.parametrize("n", C.NS)
@pytest.mark.parametrize("dtype", C.DTYPES)
def test_ubgm_on_cuda(dtype, n):
    C.check_ubgm(dtype, n, "cuda")


@on_cuda
@pytest.mark.parametrize("merge", ("dis-mean", "dis-sum", "dis-max", "mean", "sum", "median", "magnitude"))
@pytest.mark.parametrize("sign", ("mass", "normfrac", "normmass", "none"))
def test_ties_every_sign_and_merge_on_cuda(sign, merge):
    C.check_ties_modes(sign, merge, "cuda")


@on_cuda
@pytest.mark.parametrize("n", C.NS)
@pytest.mark.parametrize("shape", C.SHAPES)
@pytest.mark.parametrize("dtype", C.DTYPES)
def test_ties_dtypes_and_shapes_on_cuda(dtype, shape, n):
    C.check_ties_dtype_shape(dtype, shape, n, "cuda")


@on_cuda
@pytest.mark.parametrize("n,numel", C.SUM_ORDER)
def test_sum_order_on_cuda(n, numel):
    C.check_sum_order(n, numel, "cuda")


@on_cuda
@pytest.mark.parametrize("dtype", C.DTYPES)
def test_nan_and_inf_on_cuda(dtype):
    C.check_nonfinite(dtype, "cuda")


@on_cuda
@pytest.mark.parametrize("numel", [1, 7, 1031, 3000, 1 << 20])
def test_histograms_on_cuda(numel):
    C.check_histograms(numel, "cuda")


@on_cuda
@pytest.mark.parametrize("label", list(C.E2E))
def test_merge_on_cuda(tmp_path, label):
    """The engine on cuda with the Triton kernels writes the bytes the engine on cpu with the
    torch reference writes: every step outside the kernels is exact or the same op."""
    from tensormerge.api import MergeSpec, merge
    from tests.conftest import write_family
    from tests.helpers import shard_digests
    from tests.stats.test_stats_engine import make_stats

    base, fts, base_sd, ft_sds = write_family(tmp_path / "models", C.E2E_TENSORS)
    stores, base_store = make_stats(tmp_path, ft_sds), make_stats(tmp_path / "b", [base_sd])[0]
    method, params = C.E2E[label]
    digests = {}
    for device, kernels in (("cpu", "torch"), ("cuda", "triton")):
        out = tmp_path / device
        rep = merge(MergeSpec(method, fts, str(out), base=base, params=params, device=device, kernels=kernels,
                              quiet=True, stats=stores if method in C.STATS_METHODS else [],
                              base_stats=base_store if method == "ubgm" else None))
        assert rep["kernels"] == ("triton" if device == "cuda" else "reference")
        digests[device] = shard_digests(out)
    assert digests["cuda"] == digests["cpu"]
