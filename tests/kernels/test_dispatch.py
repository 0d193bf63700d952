"""--kernels: which implementation runs, and a clear refusal where Triton cannot."""

import importlib.util

import pytest
import torch

from tensormerge.errors import ParameterError
from tensormerge.kernels import dispatch, reference
from tests.helpers import assert_clean_error, run_cli


def test_torch_is_the_reference_and_auto_on_cpu_the_numba_kernels():
    from tensormerge.kernels import cpu

    assert dispatch.select("torch", "cpu") is reference
    # the Triton interpreter is for tests, never chosen by auto; numba's fused TIES is
    assert dispatch.select("auto", "cpu") is (cpu if importlib.util.find_spec("numba") else reference)


def test_triton_on_cpu_only_interpreted(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from tensormerge.kernels import triton as triton_kernels

    assert dispatch.select("triton", torch.device("cpu")) is triton_kernels
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ParameterError, match="TRITON_INTERPRET=1"):
        dispatch.select("triton", "cpu")
    with pytest.raises(ParameterError, match="not one of"):
        dispatch.select("cuda-magic", "cpu")


def test_cli_refuses_triton_where_it_cannot_run(family, tmp_path):
    pytest.importorskip("triton")
    base, fts, _, _ = family
    out = tmp_path / "out"
    res = run_cli(["run", "--quiet", "--method", "average", "--inputs", ",".join(fts), "--output", str(out),
                   "--kernels", "triton"], env={"TRITON_INTERPRET": "0"})
    assert_clean_error(res, "--kernels triton", "TRITON_INTERPRET=1", out_dir=out)
