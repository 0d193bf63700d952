"""Fused Triton kernels with the reference's API (kernels.dispatch picks this module for
--kernels triton): a drop-in for kernels.reference that writes the same bits.

Why fused: the reference makes N + a few passes over each chunk with a temporary per step; a
kernel reads every input once and writes the result once. Why the same bits: the engine's
outputs must not depend on --kernels, so each kernel repeats the reference's float32 ops in
its order (see _kernels.py for how torch's fused ops and reduction order are reproduced).

What still runs the torch reference (same results, by definition):
* float64 anywhere (work dtype float64: Triton would compute it in float32 otherwise), and
  input dtypes other than float32 / bfloat16 / float16;
* non-contiguous tensors, tensors of different shapes (the reference would broadcast), empty
  chunks, tensors on different devices, CPU tensors unless Triton's interpreter is on;
* more than MAX_MODELS models (the kernels unroll over models at compile time);
* argument mismatches the reference resolves by zip truncation or reports by raising.
Functions not defined here (task_vectors, ties_columns, all_finite, dare_keys, ...) are the
reference's own, re-exported unchanged.
"""

from __future__ import annotations

import os
import platform
import threading
from contextlib import nullcontext

import torch
import triton

from tensormerge.kernels import reference as _ref
from tensormerge.kernels import select as _sel
from tensormerge.kernels.reference import *  # (everything not overridden below)
from tensormerge.kernels.reference import (  # noqa: F401
    FLOOR_MODES,
    SIGN_MODES,
    TIES_MERGES,
    dare_keys,
    work_dtype,
)
from tensormerge.kernels.select import NBINS, abs_bits, window_offsets  # noqa: F401
from tensormerge.kernels.triton import _kernels as K

BLOCK = 1024
MAX_MODELS = 16  # the kernels unroll over models; torch's CPU sum(0) order is emulated up to 16 rows
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Decided when triton.jit wrapped the kernels: interpreted kernels also run on CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's interpreter keeps the current program id and its patched tl functions in globals,
# so the engine's CPU worker threads must take turns; compiled launches need no lock.
_INTERPRETER_LOCK = threading.Lock()
_SIGN = {m: i for i, m in enumerate(SIGN_MODES)}
_MERGE = {m: i for i, m in enumerate(TIES_MERGES)}


def _usable(tensors: list[torch.Tensor], shape: torch.Size) -> bool:
    """Whether the kernels can take these tensors as flat pointers and give the reference's bits."""
    if not tensors:
        return False
    device = tensors[0].device
    if device.type != "cuda" and not INTERPRETED:
        return False
    n = tensors[0].numel()
    if n == 0:
        return False
    for t in tensors:
        if (t.dtype not in DTYPES or t.device != device or t.shape != shape or not t.is_contiguous()):
            return False
    return True


def _flat(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(t.reshape(-1) for t in tensors)


def _f32(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-model scalars rounded to float32 as torch rounds a Python scalar for a float32 op."""
    return torch.tensor(values, dtype=torch.float32).to(device)


def _launch(kernel, n: int, *args, **constexprs) -> None:
    grid = (triton.cdiv(n, BLOCK),)
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    with (_INTERPRETER_LOCK if INTERPRETED else nullcontext()), \
            (torch.cuda.device(device) if device.type == "cuda" else nullcontext()):
        # No FMA contraction beyond the explicit tl.fma calls: the reference rounds every other op.
        kernel[grid](*args, BLOCK=BLOCK, enable_fp_fusion=False, **constexprs)


# ---------------------------------------------------------------------------------- linear
def weighted_sum(inputs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    pairs = list(zip(inputs, weights))
    if not pairs or len(pairs) > MAX_MODELS or not _usable([x for x, _ in pairs], inputs[0].shape):
        return _ref.weighted_sum(inputs, weights)
    x0 = inputs[0]
    out = torch.empty(x0.shape, dtype=torch.float32, device=x0.device)
    n = x0.numel()
    _launch(K.weighted_sum_kernel, n, _flat([x for x, _ in pairs]), _f32([w for _, w in pairs], x0.device),
            out, n, N=len(pairs))
    return out


def task_arithmetic(inputs: list[torch.Tensor], base: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    pairs = list(zip(inputs, lambdas))
    if not pairs or len(pairs) > MAX_MODELS or not _usable([base] + [x for x, _ in pairs], base.shape):
        return _ref.task_arithmetic(inputs, base, lambdas)
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    n = base.numel()
    _launch(K.task_arithmetic_kernel, n, _flat([x for x, _ in pairs]), base.reshape(-1),
            _f32([lam for _, lam in pairs], base.device), out, n, N=len(pairs))
    return out


# ---------------------------------------------------------------------------------- DARE
def _cut(p: float) -> int:
    return min(int(p * 2**32), 2**32)


def dare_keep(seed: int, model: int, name: str, flat_start: int, numel: int, p: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """reference.dare_keep computed by the DARE kernel's own hash (so tests can compare the
    mask itself, bit for bit)."""
    device = torch.device(device)
    if numel <= 0 or (device.type != "cuda" and not INTERPRETED):
        return _ref.dare_keep(seed, model, name, flat_start, numel, p, device)
    keys = torch.tensor(dare_keys(seed, model, name), dtype=torch.int64).to(device)
    out = torch.empty(numel, dtype=torch.bool, device=device)
    _launch(K.dare_keep_kernel, numel, keys, out, numel, flat_start, _cut(p))
    return out


def dare(inputs: list[torch.Tensor], base: torch.Tensor, p: float, lambdas: list[float], seed: int,
         rescale: bool, name: str, flat_start: int) -> torch.Tensor:
    scale = 1.0 / (1.0 - p) if rescale else 1.0  # p == 1 with rescale raises here, as in the reference
    pairs = list(zip(inputs, lambdas))
    if not pairs or len(pairs) > MAX_MODELS or not _usable([base] + [x for x, _ in pairs], base.shape):
        return _ref.dare(inputs, base, p, lambdas, seed, rescale, name, flat_start)
    apply = p > 0
    cut = _cut(p) if apply else 0
    keys = [k for i in range(len(pairs)) for k in dare_keys(seed, i, name)] if apply else [0, 0] * len(pairs)
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    n = base.numel()
    _launch(K.dare_kernel, n, _flat([x for x, _ in pairs]), base.reshape(-1),
            _f32([lam * scale for _, lam in pairs], base.device),
            torch.tensor(keys, dtype=torch.int64).to(base.device), out, n, flat_start, cut,
            N=len(pairs), APPLY=apply)
    return out


# ---------------------------------------------------------------------------------- Fisher, UBGM
def fisher_merge(inputs: list[torch.Tensor], fishers: list[torch.Tensor], weights: list[float], floor: float,
                 floor_mode: str, floored: list[bool]) -> torch.Tensor:
    quads = list(zip(inputs, fishers, weights, floored))
    x0 = inputs[0] if inputs else None
    if (not quads or len(quads) > MAX_MODELS
            or not _usable([q[0] for q in quads] + [q[1] for q in quads], x0.shape)):
        return _ref.fisher_merge(inputs, fishers, weights, floor, floor_mode, floored)
    out = torch.empty(x0.shape, dtype=torch.float32, device=x0.device)
    n = x0.numel()
    _launch(K.fisher_kernel, n, _flat([q[0] for q in quads]), _flat([q[1] for q in quads]),
            _f32([q[2] for q in quads] + [floor], x0.device),
            torch.tensor([int(bool(q[3])) for q in quads], dtype=torch.int32).to(x0.device), out, n,
            N=len(quads), CLAMP=floor_mode == "clamp")
    return out


def ubgm(inputs: list[torch.Tensor], base: torch.Tensor, hessians: list[torch.Tensor], base_hessian: torch.Tensor | None,
         alpha: float, delta0: float, base_scale: float, scales: list[float]) -> torch.Tensor:
    n_models = len(inputs)
    extra = [] if base_hessian is None else [base_hessian]
    if (n_models == 0 or n_models > MAX_MODELS or len(hessians) != n_models or len(scales) != n_models
            or not _usable([base] + list(inputs) + list(hessians) + extra, base.shape)):
        return _ref.ubgm(inputs, base, hessians, base_hessian, alpha, delta0, base_scale, scales)
    out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    n = base.numel()
    params = [delta0, base_scale, alpha] + list(scales) + [alpha * s for s in scales]
    flat_base = base.reshape(-1)
    _launch(K.ubgm_kernel, n, _flat(inputs), flat_base, _flat(hessians),
            base_hessian.reshape(-1) if base_hessian is not None else flat_base, _f32(params, base.device), out, n,
            N=n_models, HAS_BH=base_hessian is not None)
    return out


# ---------------------------------------------------------------------------------- TIES
def _cpu_vector_floats() -> int:
    """Floats per vector in torch's CPU kernels (Vectorized<float>::size()), which sets the
    order of the reference's sum(0): 16 with AVX512, 4 with NEON (aarch64 DEFAULT), else 8."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        return 16
    if cap == "DEFAULT" and platform.machine().lower() in ("aarch64", "arm64"):
        return 4
    return 8


VF = _cpu_vector_floats()


def _sum_order(numel: int, n_models: int) -> tuple[int, bool]:
    """(columns summed as a running sum, inner-reduction order): every column, since the
    reference sums models sequentially from zero (`reference.sum_models`), which no chunking
    changes. `_kernels._sum_models` can still emulate torch's CPU `sum(0)` (cascade_sum) for
    other plain_limit/INNER values, checked bitwise against torch 2.13 on AVX2."""
    return numel, False


def ties_merge(inputs: list[torch.Tensor], base: torch.Tensor, thresholds: list[float], sign_mode: str,
               sq_norms: list[float] | None, merge: str, lam: float, guess: float
               ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """reference.ties_merge in one kernel: (θ_0 + λ τ* flattened, votes, undecided mask).

    The votes are counted as integers per block of the kernel and summed exactly; the
    reference's float32 sum of the signs is the same integer as long as its partial sums stay
    below 2**24 (any chunk of fewer than 16.7M elements), and only this one stays exact above."""
    n_models = len(inputs)
    if (sign_mode not in _SIGN or merge not in _MERGE or n_models == 0 or n_models > MAX_MODELS
            or len(thresholds) > n_models or not _usable([base] + list(inputs), base.shape)
            or (sign_mode in ("normfrac", "normmass") and (sq_norms is None or len(sq_norms) != n_models))):
        return _ref.ties_merge(inputs, base, thresholds, sign_mode, sq_norms, merge, lam, guess)
    device = base.device
    n = base.numel()
    # The reference trims model i only when v_i > 0, comparing |τ| with v_i rounded to float32;
    # a 0 threshold keeps every value (and 0 * NaN stays NaN, as an untouched NaN).
    thr = [v if v > 0 else 0.0 for v in thresholds] + [0.0] * (n_models - len(thresholds))
    if sign_mode in ("normfrac", "normmass"):
        norms = torch.tensor(sq_norms, dtype=torch.float32).clamp_min(torch.finfo(torch.float32).tiny).tolist()
    else:
        norms = [1.0] * n_models
    params = _f32(thr + norms + [lam, guess], device)
    out = torch.empty(n, dtype=torch.float32, device=device)
    elect = sign_mode != "none"
    grid = triton.cdiv(n, BLOCK)
    votes = torch.zeros(grid if elect else 1, dtype=torch.int32, device=device)
    undecided = torch.empty(n if elect else 1, dtype=torch.bool, device=device)
    plain, inner = _sum_order(n, n_models)
    _launch(K.ties_kernel, n, _flat(inputs), base.reshape(-1), params, out, undecided, votes, n, plain,
            N=n_models, SIGN=_SIGN[sign_mode], MERGE=_MERGE[merge], INNER=inner, VF=VF)
    if not elect:
        return out, 0, None
    return out, int(votes.sum().item()), undecided


def ties_merge_many(inputs: list[torch.Tensor], base: torch.Tensor, thresholds: list[list[float]], sign_mode: str,
                    sq_norms: list[list[float] | None], merge: str, lams: list[float], majorities: list[float]
                    ) -> list[torch.Tensor]:
    """reference.ties_merge_many: one `ties_merge` kernel per candidate (on a GPU the inputs are
    read from device memory, which a shared pass would save little of)."""
    return [ties_merge(inputs, base, th, sign_mode, sq, merge, lam, m)[0]
            for th, sq, lam, m in zip(thresholds, sq_norms, lams, majorities)]


# ---------------------------------------------------------------------------------- histograms
def _bits_usable(bits: torch.Tensor) -> bool:
    return (bits.dtype == torch.int32 and bits.dim() == 1 and bits.numel() > 0 and bits.is_contiguous()
            and (bits.device.type == "cuda" or INTERPRETED))


def _hist(bits: torch.Tensor, mode: int, size: int, lo_bin: int = 0, width: int = 0) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.int64, device=bits.device)
    bad = torch.zeros(1, dtype=torch.int64, device=bits.device)
    n = bits.numel()
    _launch(K.hist_kernel, n, bits, out, bad, n, lo_bin, width, MODE=mode, NBINS=NBINS)
    if mode in (K.HIST_HIGH.value, K.HIST_MOMENTS.value) and bad.item():
        raise RuntimeError("bincount only supports 1-d non-negative integral inputs.")
    return out


def hist_high(bits: torch.Tensor) -> torch.Tensor:
    """select.hist_high: counts of the top 16 bits ([NBINS] int64)."""
    if not _bits_usable(bits):
        return _sel.hist_high(bits)
    return _hist(bits, K.HIST_HIGH.value, NBINS)


def hist_high_moments(bits: torch.Tensor) -> torch.Tensor:
    """select.hist_high_moments: per top bin count, Σ low16, Σ low16² ([3, NBINS] int64)."""
    if not _bits_usable(bits):
        return _sel.hist_high_moments(bits)
    return _hist(bits, K.HIST_MOMENTS.value, 3 * NBINS).reshape(3, NBINS)


def hist_low(bits: torch.Tensor, hi_bin: int) -> torch.Tensor:
    """select.hist_low: counts of the low 16 bits of the entries in top bin hi_bin."""
    if not _bits_usable(bits) or not 0 <= hi_bin < 2**15:
        return _sel.hist_low(bits, hi_bin)
    return _hist(bits, K.HIST_LOW.value, NBINS, lo_bin=hi_bin)


def window_hist_below_(bits: torch.Tensor, lo_bin: int, width: int) -> tuple[torch.Tensor, int]:
    """select.window_hist_below_ (bits left as they are: the kernel needs no scratch)."""
    return window_hist(bits, lo_bin, width), int(torch.count_nonzero(bits < (lo_bin << 16)))


def ties_window_counts(inputs: list[torch.Tensor], base: torch.Tensor, windows: list[int], width: int
                       ) -> tuple[torch.Tensor, torch.Tensor, int | None, torch.Tensor]:
    """reference.ties_window_counts with the window histogram in Triton."""
    return _ref.window_counts_with(window_hist_below_, inputs, base, windows, width)


def ties_window_votes(inputs: list[torch.Tensor], base: torch.Tensor, windows: list[int], width: int,
                      max_log: int) -> tuple:
    """The window counts without pass A's votes (None), so TIES runs its vote pass: there is no
    Triton form of the votes yet, and the reference's (a dozen whole-chunk temporaries and
    scatters) has not been measured against that pass on a GPU."""
    return (*ties_window_counts(inputs, base, windows, width), None)


def window_hist(bits: torch.Tensor, lo_bin: int, width: int) -> torch.Tensor:
    """bincount(select.window_offsets(bits, lo_bin, width), minlength=width * NBINS) without
    materialising the offsets (what TIES' pass A does with them)."""
    if not _bits_usable(bits) or not (0 <= lo_bin and lo_bin + width <= 2**15 and width > 0):
        return torch.bincount(window_offsets(bits, lo_bin, width), minlength=width * NBINS)
    return _hist(bits, K.HIST_WINDOW.value, width * NBINS, lo_bin=lo_bin, width=width)
