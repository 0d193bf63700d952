"""Which implementation runs a method's arithmetic: the torch reference (any device, the
definition of each method), the fused Triton kernels (CUDA; on CPU only under Triton's
interpreter, which is how they are tested here), or on CPU the reference with TIES' merge fused
by numba (`kernels/cpu.py`). All expose the same functions and give the same bits, so a method
asks `ops(data)` and never knows which it got."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

from tensormerge.errors import ParameterError, short
from tensormerge.kernels import reference

CHOICES = ("auto", "torch", "triton")


def triton_status(device: torch.device) -> tuple[bool, str]:
    """(usable, why not) for Triton kernels on `device`."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install tensormerge[triton])"
    if device.type == "cuda":
        return True, ""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 to interpret them on {device.type})"


def check_device(value: str) -> torch.device:
    """--device as a torch device that exists here, or a one-line ParameterError."""
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ParameterError(f"--device: {short(value)} is not cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ParameterError(f"--device: {short(value)} is not cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"--device {short(value)}: no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ParameterError(f"--device {value}: there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def select(choice: str, device: torch.device | str) -> ModuleType:
    """The kernel module for --kernels CHOICE on DEVICE: auto takes Triton where it runs natively
    and the numba-fused CPU kernels on CPU when numba is installed; torch is the pure reference."""
    device = torch.device(device)
    if choice not in CHOICES:
        raise ParameterError(f"--kernels: {short(choice)} is not one of {', '.join(CHOICES)}")
    if choice == "torch":
        return reference
    usable, why = triton_status(device)
    if choice == "triton":
        if not usable:
            raise ParameterError(f"--kernels triton: {why}")
    elif not (usable and device.type == "cuda"):
        if device.type == "cpu" and importlib.util.find_spec("numba") is not None:
            from tensormerge.kernels import cpu

            return cpu
        return reference
    from tensormerge.kernels import triton as triton_kernels

    return triton_kernels


def ops(data) -> ModuleType:
    """The kernels chosen for this run (the reference when a method is called directly)."""
    return getattr(data, "ops", None) or reference
