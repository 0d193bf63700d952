"""SLERP between two endpoints, as mergekit 0.1.5 defines it: per tensor, flattened.

The angle between the endpoints is that of the whole tensors: cos = Σab / (‖a‖‖b‖) (norms ≤ 1e-8
taken as 1), with mergekit's linear fallback where the tensors are nearly parallel or
antiparallel (|cos| > 0.9995). Those sums are per-row float64 sums added exactly, computed in the
merge for a tensor merged in one chunk and by a pass over the rows for one cut into several
(methods/per_tensor.py), so any chunking gives the same coefficients and bytes; the merge is
then c_a · a + c_b · b per element. (mergekit 0.1.5 batches same-shaped tensors along a new leading
axis; its slerp reduces over everything but that axis, so it is per tensor.)

Endpoints: with --base, t = 0 is the base and t = 1 the single input (mergekit's recipe form);
without, t = 0 is the first of exactly two inputs. The sums are float64 and the merge float32
(mergekit: float32 throughout), which shifts results by float32 rounding at most. Like mergekit's,
t is not confined to [0, 1]: the same coefficients extrapolate beyond the endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensormerge.errors import InputError, ParameterError
from tensormerge.kernels import reference as K
from tensormerge.methods.base import BlockData, GlobalPass, Method, Params, param, register
from tensormerge.methods.per_tensor import PerTensorPass


@dataclass
class SlerpParams(Params):
    t: float = param(0.5, "interpolation: 0 gives the first endpoint (the base, with --base), 1 the second; "
                          "outside [0, 1] it extrapolates along the arc, as mergekit's does")

    def validate(self, method: str, n_models: int) -> None:
        super().validate(method, n_models)
        if n_models not in (1, 2):
            raise ParameterError(f"{method}: takes two endpoints (--base and one input, or two inputs), "
                                 f"got {n_models} inputs")
        self._n_models = n_models  # one input: the base is the first endpoint (see requires_base)


def _endpoints(data: BlockData) -> tuple[torch.Tensor, torch.Tensor]:
    return (data.base, data.inputs[0]) if len(data.inputs) == 1 else (data.inputs[0], data.inputs[1])


class _AnglePass(PerTensorPass):
    """Per tensor Σa², Σb², Σab (per-row float64 sums, fsum'd) into the coefficients; folded
    into the merge for a tensor merged in one chunk (methods/per_tensor.py)."""

    name = "slerp_angle"
    label = "angles between endpoints"

    def __init__(self, params: SlerpParams):
        self.params = params

    def row_partials(self, data: BlockData) -> torch.Tensor:
        a, b = (x.double() for x in _endpoints(data))
        return torch.stack([K.row_sums(a * a), K.row_sums(b * b), K.row_sums(a * b)]).cpu()

    def result(self, totals: list[float], block: str, numel: int) -> list[float]:
        sq_a, sq_b, dot = totals
        if not all(map(torch.isfinite, torch.tensor([sq_a, sq_b, dot]))):
            raise InputError(f"tensor {block!r}: an endpoint holds NaN or Inf values, or its squared norm overflows")
        t = self.params.for_block(block).t  # a per-tensor t (methods.rules)
        return list(K.slerp_coefficients(t, sq_a, sq_b, dot, numel == 0))


@register
class Slerp(Method):
    name = "slerp"
    summary = "spherical interpolation of two endpoints per tensor (mergekit's slerp): --base and one input, or two inputs"
    citation = ('Goddard et al. 2024, "Arcee\'s MergeKit: A Toolkit for Merging Large Language Models", '
                'arXiv:2403.13257 (its slerp; Shoemake 1985, "Animating rotation with quaternion curves")')
    Params = SlerpParams

    def requires_base(self, params: SlerpParams) -> bool:
        return getattr(params, "_n_models", 2) == 1

    def check_inputs(self, params: SlerpParams, n_inputs: int, has_base: bool) -> None:
        if n_inputs == 2 and has_base:
            raise InputError("slerp: give --base and one input, or two inputs without --base (got --base and two)")

    def work_bytes_per_element(self, n_models: int, params: Params) -> int:
        return 8 * 4  # the pass's float64 endpoints and products

    def passes(self, params: SlerpParams) -> list[GlobalPass]:
        return [_AnglePass(params)]

    def prepares(self, params: SlerpParams) -> bool:
        return True

    def prepare(self, data: BlockData, params: SlerpParams):
        return _AnglePass(params).fold(data)

    def merge(self, data: BlockData, params: SlerpParams, state: dict):
        return K.slerp_merge(*_endpoints(data), *_AnglePass(params).lookup(data, state))
