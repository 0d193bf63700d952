"""Diagonal Fisher merging: Σ w_i F̃_i θ_i / Σ w_i F̃_i, per element, with the safeguards of
SPEC §4 (floor by clamping or adding; all-zero entries fall back to the average or to the
first model; optional division of each model's weight by its Fisher's global L2 norm)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tensormerge.errors import InputError, ParameterError
from tensormerge.kernels import reference as K
from tensormerge.kernels.dispatch import ops
from tensormerge.kernels import select as S
from tensormerge.methods.base import BlockData, GlobalPass, Method, Params, param, register


@dataclass
class FisherParams(Params):
    weights: list[float] | None = param(None, "per-model weights (default uniform)")
    floor: float = param(1e-8, "lower bound on Fisher entries; 0 disables (entries where every Fisher is 0 then fail)")
    floor_mode: str = param("clamp", "clamp: max(F, floor); add: F + floor", choices=K.FLOOR_MODES)
    normalize: bool = param(False, "divide each model's weight by the global L2 norm of its Fisher (a global pass)")
    fallback: str = param("average", "entries where every Fisher is 0: average (floor on every model) or first "
                                     "(floor on the first model only, Matena's favor_target_model)",
                          choices=("average", "first"))

    def validate(self, method: str, n_models: int) -> None:
        super().validate(method, n_models)
        if self.floor < 0 or not math.isfinite(self.floor):
            raise ParameterError(f"{method}: parameter 'floor' must be a finite number >= 0, not {self.floor}")
        w = self.weights or [1.0] * n_models
        if any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
            raise ParameterError(f"{method}: parameter 'weights' must be >= 0 with a positive sum")
        if self.fallback == "first" and w[0] <= 0:
            raise ParameterError(f"{method}: fallback=first needs a positive weight for the first model")

    def resolved(self, n: int) -> list[float]:
        w = list(self.weights) if self.weights is not None else [1.0] * n
        total = sum(w)
        return [x / total for x in w]


def fisher_bits(f: torch.Tensor) -> torch.Tensor:
    """Bit patterns of |F|: a Fisher is >= 0 (negative values are refused on reading), but −0.0
    is a valid zero whose sign bit would make its pattern negative (no histogram bin)."""
    return S.abs_bits(f.to(torch.float32))


class FisherNorms(GlobalPass):
    """Σ F_i² per model over every block that has a Fisher, exact (integer moments of the bit
    patterns), so the weights and hence the bytes do not depend on chunking."""

    name = "fisher-norms"
    label = "Fisher norms (normalize)"
    needs_inputs = False

    def map(self, data: BlockData, state: dict) -> Any:
        fishers = data.stats.get("fisher")
        if not fishers:
            return None
        return torch.stack([ops(data).hist_high_moments(fisher_bits(f)) for f in fishers]).cpu()

    def reduce(self, acc: Any, partial: Any, block: str) -> Any:
        if partial is None:
            return acc
        return partial if not isinstance(acc, torch.Tensor) else acc + partial

    def finish(self, acc: Any, state: dict) -> None:
        if not isinstance(acc, torch.Tensor):
            raise InputError("fisher: normalize=true but no block has a Fisher in every store")
        norms = [math.sqrt(S.square_norm_above(m, -1)) for m in acc]
        for i, v in enumerate(norms):
            if v == 0:
                raise InputError(f"fisher: normalize=true but the Fisher of input {i + 1} is zero everywhere")
        state["fisher_norms"] = norms


@register
class Fisher(Method):
    name = "fisher"
    summary = "Σ w_i F_i θ_i / Σ w_i F_i per element with diagonal Fishers (--stats)"
    citation = 'Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022, arXiv:2111.09832'
    Params = FisherParams
    uses_stats = True

    def block_stats(self, params: Params, shape: tuple[int, ...]) -> tuple[str, ...]:
        return ("fisher",)

    def describe_stats(self) -> str:
        return "fisher/<param> of each input"

    def passes(self, params: FisherParams) -> list[GlobalPass]:
        return [FisherNorms()] if params.normalize else []

    def work_bytes_per_element(self, n_models: int, params: Params) -> int:
        return 4 * 4

    def weights(self, params: FisherParams, n: int, state: dict) -> list[float]:
        w = params.resolved(n)
        if params.normalize:
            w = [x / norm for x, norm in zip(w, state["fisher_norms"])]
        return w

    def merge(self, data: BlockData, params: FisherParams, state: dict):
        n = len(data.inputs)
        floored = [True] * n if params.fallback == "average" else [i == 0 for i in range(n)]
        w = self.weights(params, n, state)
        out = ops(data).fisher_merge(data.inputs, data.stats["fisher"], w, params.floor, params.floor_mode, floored)
        if params.floor == 0 and not bool(torch.isfinite(out).all()):
            # floor=0 leaves no fallback (the research code without a floor gives NaN): name the
            # cause when it is 0/0 rather than the engine's "non-finite input values?"
            den = sum(f.to(torch.float64) * wi for f, wi in zip(data.stats["fisher"], w))
            zeros = int((den == 0).sum())
            if zeros:
                raise InputError(f"tensor {data.name!r}: every model's Fisher (times its weight) is zero at {zeros} entr{'y' if zeros == 1 else 'ies'} "
                                 f"and floor=0 leaves 0/0 there; set -p floor=1e-8 (the default) for the "
                                 f"{params.fallback} fallback")
        return out

    def fallback(self, data: BlockData, params: FisherParams) -> torch.Tensor:
        return ops(data).weighted_sum(data.inputs, params.resolved(len(data.inputs)))
