"""RegMean: per linear weight, W* = (Σ W_i Ĝ_i)(Σ Ĝ_i)^-1 with Ĝ = α G + (1 − α) diag(G),
computed as W̄ + (Σ (W_i − W̄) Ĝ_i)(Σ Ĝ_i)^+ (W̄ the weighted average): the same where the sum is
invertible, exactly W̄ when the models agree, and W̄ along directions no Gram determines.

The factorisation of Σ Ĝ_i is made once per weight (`prepare`) and reused by every row chunk;
rows are multiplied in fixed tiles aligned to the weight's row index, so chunking never changes
the bytes. Parameters without an input Gram (biases, norms, embeddings) are averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tensormerge.errors import InputError, ParameterError
from tensormerge.kernels import linalg as L
from tensormerge.kernels import reference as K
from tensormerge.kernels.dispatch import ops
from tensormerge.methods.base import BlockData, Method, Params, param, register

ROW_TILE = 256


@dataclass
class RegMeanParams(Params):
    alpha: float = param(1.0, "off-diagonal scale of the Grams: 1 = exact least squares, 0 = per-column weighting")
    weights: list[float] | None = param(None, "per-model weights (default uniform): scale each Gram, and the "
                                              "average of parameters without one")
    precision: str = param("float32", "products with the Grams in float32 (as the research code; the solve is always "
                                      "float64) or float64 (exact to the Grams' float32 storage, 2x the time)",
                           choices=("float32", "float64"))

    def validate(self, method: str, n_models: int) -> None:
        super().validate(method, n_models)
        if not 0.0 <= self.alpha <= 1.0:
            raise ParameterError(f"{method}: parameter 'alpha' must be in [0, 1], not {self.alpha}")
        w = self.weights or [1.0] * n_models
        if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
            raise ParameterError(f"{method}: parameter 'weights' must be >= 0 with a positive sum")

    def resolved(self, n: int) -> list[float]:
        w = list(self.weights) if self.weights is not None else [1.0] * n
        return [x / sum(w) for x in w]


@register
class RegMean(Method):
    name = "regmean"
    summary = "least squares on the models' inputs per linear weight, from input Grams (--stats)"
    citation = ('Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models"'
                ', ICLR 2023, arXiv:2212.09849')
    Params = RegMeanParams
    uses_stats = True
    row_align = ROW_TILE

    def block_stats(self, params: Params, shape: tuple[int, ...]) -> tuple[str, ...]:
        return ("gram_in",) if len(shape) == 2 else ()

    def describe_stats(self) -> str:
        return "gram_in/<weight> [in, in] of each input; other parameters are averaged"

    def fixed_bytes(self, params: Params, shape: tuple[int, ...], n_models: int) -> int:
        d = shape[1]
        e = 8 if params.precision == "float64" else 4
        # the N − 1 E_i; S, its factor and a buffer in prepare (measured peak 47 d² at d = 2048, N = 6,
        # float32; 40 d² with dead columns); then the factor and the solve's column-major copy of it
        return d * d * (e * n_models + 24)

    def work_bytes_per_element(self, n_models: int, params: RegMeanParams) -> int:
        e = 8 if params.precision == "float64" else 4
        return 3 * e + 8 * 6  # float64 tiles W_1, W_i, W_i − W_1; that in e (live columns), the product; solve

    def prepare(self, data: BlockData, params: RegMeanParams) -> L.RegMeanFactor:
        dtype = torch.float64 if params.precision == "float64" else K.work_dtype(*data.inputs)
        try:
            return L.regmean_prepare(data.stats["gram_in"], params.alpha, params.resolved(len(data.inputs)), dtype)
        except L.IndefiniteGram as e:
            raise InputError(f"tensor {data.name!r}: gram_in of input {e.index + 1} (store {e.index + 1} of --stats) "
                             f"is not a Gram matrix: its smallest eigenvalue is {e.smallest:.3g} against a largest "
                             f"of {e.largest:.3g} (indefinite)") from None

    def merge(self, data: BlockData, params: RegMeanParams, state: dict) -> torch.Tensor:
        if data.prepared is None:  # no Gram for this shape: the research code averages
            return self.fallback(data, params)
        return L.regmean_rows(data.inputs, data.prepared, ROW_TILE)

    def fallback(self, data: BlockData, params: RegMeanParams) -> torch.Tensor:
        return ops(data).weighted_sum(data.inputs, params.resolved(len(data.inputs)))
