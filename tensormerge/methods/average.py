"""Weighted average of the models themselves: Σ w_i θ_i (uniform 1/N by default).

Weights are divided by their sum unless `normalize=false`, as mergekit's `linear` does: weights
1,2,3 mean 1/6, 2/6, 3/6, not a sum six times a model's scale."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tensormerge.errors import ParameterError
from tensormerge.kernels.dispatch import ops
from tensormerge.methods.base import BlockData, Method, Params, param, register


@dataclass
class AverageParams(Params):
    weights: list[float] | None = param(None, "per-model weights (default uniform 1/N)")
    normalize: bool = param(True, "divide the weights by their sum, as mergekit's linear (false: use them verbatim)")

    def validate(self, method: str, n_models: int) -> None:
        super().validate(method, n_models)
        if self.normalize and self.weights is not None and sum(self.weights) == 0:
            raise ParameterError(f"{method}: parameter 'weights' sums to 0, cannot normalize "
                                 f"(-p normalize=false uses them verbatim)")

    def resolved(self, n: int) -> list[float]:
        w = list(self.weights) if self.weights is not None else [1.0 / n] * n
        if self.normalize:
            total = sum(w)
            w = [x / total for x in w]
        return w


@register
class Average(Method):
    name = "average"
    summary = "Σ w_i θ_i over the models (no base needed)"
    citation = ('Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves '
                'accuracy without increasing inference time", ICML 2022, arXiv:2203.05482')
    Params = AverageParams

    def work_bytes_per_element(self, n_models: int, params: Params) -> int:
        return 4

    def run_warnings(self, params: AverageParams, notes: dict[str, dict]) -> list[str]:
        total = math.fsum(params.weights) if params.weights is not None else 1.0
        if params.normalize or abs(total - 1.0) <= 1e-6:
            return []
        return [f"average: weights sum to {total:g} with normalize=false, so the merge is their weighted sum, "
                f"{total:g} times the scale of a model (leave normalize at true for the weighted average)"]

    def merge(self, data: BlockData, params: AverageParams, state: dict):
        return ops(data).weighted_sum(data.inputs, params.resolved(len(data.inputs)))
