"""SLERP between two endpoints, as mergekit 0.1.5 defines it: row by row along the first axis.

Each row of the output (each element of a 1-D tensor) interpolates on the great circle between
the two endpoints' rows, with mergekit's linear fallback where the rows are nearly parallel or
antiparallel (|cos| > 0.9995) and its treatment of rows with norm ≤ 1e-8 (taken as norm 1).
Rows are never split between chunks, so no pass is needed and any chunking gives the same bytes.

Endpoints: with --base, t = 0 is the base and t = 1 the single input (mergekit's recipe form);
without, t = 0 is the first of exactly two inputs. Norms, cosines and coefficients are float64
(mergekit: float32), which shifts results by float32 rounding at most.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensormerge.errors import InputError, ParameterError
from tensormerge.kernels import reference as K
from tensormerge.methods.base import BlockData, Method, Params, param, register


@dataclass
class SlerpParams(Params):
    t: float = param(0.5, "interpolation: 0 gives the first endpoint (the base, with --base), 1 the second")

    def validate(self, method: str, n_models: int) -> None:
        super().validate(method, n_models)
        if n_models not in (1, 2):
            raise ParameterError(f"{method}: takes two endpoints (--base and one input, or two inputs), "
                                 f"got {n_models} inputs")
        self._n_models = n_models  # one input: the base is the first endpoint (see requires_base)


@register
class Slerp(Method):
    name = "slerp"
    summary = "spherical interpolation of two endpoints, per row (mergekit's slerp): --base and one input, or two inputs"
    citation = ('Goddard et al. 2024, "Arcee\'s MergeKit: A Toolkit for Merging Large Language Models", '
                'arXiv:2403.13257 (its slerp; Shoemake 1985, "Animating rotation with quaternion curves")')
    Params = SlerpParams

    def requires_base(self, params: SlerpParams) -> bool:
        return getattr(params, "_n_models", 2) == 1

    def check_inputs(self, params: SlerpParams, n_inputs: int, has_base: bool) -> None:
        if n_inputs == 2 and has_base:
            raise InputError("slerp: give --base and one input, or two inputs without --base (got --base and two)")

    def work_bytes_per_element(self, n_models: int, params: Params) -> int:
        return 8 * 6  # float64 endpoints, their products and the result

    def merge(self, data: BlockData, params: SlerpParams, state: dict):
        v0, v1 = (data.base, data.inputs[0]) if len(data.inputs) == 1 else data.inputs
        return K.slerp_rows(params.t, v0, v1)
