"""Uncertainty-based gradient matching (Daheim et al.): task arithmetic whose per-element
weights are the models' diagonal Hessian estimates (Fishers) against the base's.

Where the statistics say nothing the method's own limit applies, not another method: a
parameter without a Fisher in every model's store is merged at H_t = 0, which is θ_0 + α Σ τ_t
whatever H_0 (task arithmetic with λ = α). A parameter that only some stores cover takes the
same limit rather than H_t = 0 for the others alone, which would silently drop those models'
task vectors (their weight would fall to (s_0 H_0 + δ0) / H̄). A base store without the key
gives H_0 = 0; both cases are listed in the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tensormerge.errors import ParameterError
from tensormerge.kernels.dispatch import ops
from tensormerge.methods.base import BlockData, Method, Params, param, register


@dataclass
class UBGMParams(Params):
    alpha: float = param(1.0, "α: scales the task Hessians inside H̄ and the update")
    delta0: float = param(1e-12, "δ0: prior precision added everywhere (0: its 0⁺ limit where H̄ = 0)")
    base_scale: float = param(1.0, "s_0: scale of the base's Hessian (e.g. its training-set size)")
    scales: list[float] | None = param(None, "s_t per model (default 1 each; e.g. training-set sizes)")

    def validate(self, method: str, n_models: int) -> None:
        super().validate(method, n_models)
        for key in ("alpha", "delta0", "base_scale"):
            v = getattr(self, key)
            if v < 0 or not math.isfinite(v):
                raise ParameterError(f"{method}: parameter {key!r} must be a finite number >= 0, not {v}")
        if self.scales is not None and any(v < 0 or not math.isfinite(v) for v in self.scales):
            raise ParameterError(f"{method}: parameter 'scales' must be finite numbers >= 0")


@register
class UBGM(Method):
    name = "ubgm"
    summary = "θ_0 + α Σ (s_t H_t + s_0 H_0 + δ0)/H̄ ⊙ τ_t with Fishers as Hessians (--stats, --base-stats)"
    citation = 'Daheim et al. 2024, "Model Merging by Uncertainty-Based Gradient Matching", ICLR 2024, arXiv:2310.12808'
    Params = UBGMParams
    needs_base = True
    uses_stats = True
    uses_base_stats = True
    fallback_label = "merged as θ0 + α Σ τ (H = 0)"

    def block_stats(self, params: Params, shape: tuple[int, ...]) -> tuple[str, ...]:
        return ("fisher",)

    def base_block_stats(self, params: Params, shape: tuple[int, ...]) -> tuple[str, ...]:
        return ("fisher",)

    def describe_stats(self) -> str:
        return ("fisher/<param> of each input (a parameter some store lacks: θ0 + α Σ τ, the H = 0 limit); "
                "of the base with --base-stats (zero when absent)")

    def fallback(self, data: BlockData, params: UBGMParams) -> torch.Tensor:
        """The H_t = 0 limit: every weight (s_0 H_0 + δ0) / H̄ is 1, so θ_0 + α Σ_t τ_t."""
        return ops(data).task_arithmetic(data.inputs, data.base, [params.alpha] * len(data.inputs))

    def work_bytes_per_element(self, n_models: int, params: Params) -> int:
        return 4 * 6

    def merge(self, data: BlockData, params: UBGMParams, state: dict) -> torch.Tensor:
        n = len(data.inputs)
        return ops(data).ubgm(data.inputs, data.base, data.stats["fisher"], data.base_stats.get("fisher"), params.alpha,
                      params.delta0, params.base_scale, params.scales or [1.0] * n)
