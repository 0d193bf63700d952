"""--device cuda: every method on the GPU equals the CPU merge (to float32 rounding). Skipped
without a CUDA device; runs wherever one is present."""

import pytest
import torch
from safetensors.torch import load_file

from tensormerge.api import MergeSpec, merge
from tests.stats.test_stats_engine import TENSORS, make_stats
from tests.conftest import write_family

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CASES = {
    "average": {}, "task_arithmetic": {}, "ties": {}, "dare": {"p": "0.3"},
    "fisher": {}, "regmean": {}, "mats": {"iterations": "20"}, "ubgm": {},
}


@pytest.mark.parametrize("method", list(CASES))
@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_cuda_merge_equals_cpu(tmp_path, method, kernels):
    base, fts, base_sd, ft_sds = write_family(tmp_path / "models", TENSORS)
    stores = make_stats(tmp_path, ft_sds)
    base_store = make_stats(tmp_path / "b", [base_sd])[0]
    outs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"out-{device}"
        merge(MergeSpec(method, fts, str(out), base=base, params=CASES[method], device=device, quiet=True,
                        kernels=kernels if device == "cuda" else "torch",
                        stats=stores if method in ("fisher", "regmean", "mats", "ubgm") else [],
                        base_stats=base_store if method == "ubgm" else None, max_memory="256MiB"))
        outs[device] = load_file(str(out / "model.safetensors"))
    for name, cpu in outs["cpu"].items():
        gpu = outs["cuda"][name]
        if cpu.is_floating_point():
            tol = 1e-2 if cpu.dtype in (torch.bfloat16, torch.float16) else 1e-4
            torch.testing.assert_close(gpu.float(), cpu.float(), rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(gpu, cpu)
