"""Model Stock, as mergekit defines it: θ_0 + t (mean θ_i − θ_0) with t from the angle between the
task vectors: t = N cos / (1 + (N − 1) cos), cos the mean pairwise cosine of τ_i = θ_i − θ_0
(each clamped to [−1, 1], norms' product floored at 1e-6); t = 0 (the base) where the
denominator is below 1e-6.

Per tensor by default: the cosines need dot products over the whole tensor, summed per row and
exactly combined (so chunking never changes them): in the merge for a tensor merged in one
chunk, by a pass for one cut into several (methods/per_tensor.py). With filter_wise, one t per vector
along the last axis, computed within the chunk (a 1-D tensor is one vector, merged whole).
mergekit computes in the recipe's dtype (bf16 dot products); here float64 sums, float32 merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tensormerge.errors import InputError, ParameterError
from tensormerge.kernels import reference as K
from tensormerge.methods.base import BlockData, GlobalPass, Method, Params, param, register
from tensormerge.methods.per_tensor import PerTensorPass


@dataclass
class ModelStockParams(Params):
    filter_wise: bool = param(False, "one t per vector along the last axis (rows of a matrix) instead of per tensor")

    def validate(self, method: str, n_models: int) -> None:
        super().validate(method, n_models)
        if n_models < 2:
            raise ParameterError(f"{method}: needs at least two fine-tuned models besides --base, got {n_models}")


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


class _AnglePass(PerTensorPass):
    """Per tensor: Σ τ_i² and Σ τ_i τ_j (per-row float64 sums, fsum'd) into the tensor's t;
    folded into the merge for a tensor merged in one chunk (methods/per_tensor.py)."""

    name = "model_stock_angle"
    label = "task-vector angles"

    def row_partials(self, data: BlockData) -> torch.Tensor:
        w0 = data.base.double()
        tau = [x.double() - w0 for x in data.inputs]
        sums = [K.row_sums(t * t) for t in tau]
        sums += [K.row_sums(tau[i] * tau[j]) for i, j in _pairs(len(tau))]
        return torch.stack(sums).cpu()

    def result(self, totals: list[float], block: str, numel: int) -> float:
        if not all(map(torch.isfinite, torch.tensor(totals))):
            raise InputError(f"tensor {block!r}: a model (or the base) holds NaN or Inf values, or a task "
                             f"vector's squared norm overflows")
        n = next(k for k in range(2, len(totals) + 1) if k + k * (k - 1) // 2 == len(totals))
        cos = [K.model_stock_cos(totals[n + p], totals[i], totals[j]) for p, (i, j) in enumerate(_pairs(n))]
        return K.model_stock_t(cos, n)


@register
class ModelStock(Method):
    name = "model_stock"
    summary = "interpolate from the base toward the models' mean by the angle between their task vectors (≥ 2 models)"
    citation = 'Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024, arXiv:2403.19522'
    Params = ModelStockParams
    needs_base = True

    def splits(self, params: ModelStockParams, shape: tuple[int, ...], with_stats: bool) -> bool:
        return not (params.filter_wise and len(shape) < 2)  # a vector is one filter

    def work_bytes_per_element(self, n_models: int, params: Params) -> int:
        return 8 * (n_models + 3)  # float64 task vectors for the angles (the pass's, or filter_wise's)

    def passes(self, params: ModelStockParams) -> list[GlobalPass]:
        return [] if params.filter_wise else [_AnglePass()]

    def prepares(self, params: ModelStockParams) -> bool:
        return not params.filter_wise

    def prepare(self, data: BlockData, params: ModelStockParams):
        return None if params.filter_wise else _AnglePass().fold(data)

    def merge(self, data: BlockData, params: ModelStockParams, state: dict):
        if not params.filter_wise:
            return K.model_stock_merge(data.inputs, data.base, _AnglePass().lookup(data, state))
        if data.base.dim() == 0:
            t = K.model_stock_filter_t([x.reshape(1) for x in data.inputs], data.base.reshape(1)).reshape(())
        else:
            t = K.model_stock_filter_t(data.inputs, data.base).reshape(*data.base.shape[:-1], 1)
        return K.model_stock_merge(data.inputs, data.base, t)
