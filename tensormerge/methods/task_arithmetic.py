"""Task arithmetic: θ_0 + λ Σ τ_i, a sum of task vectors (not a mean), or per-model λ_i."""

from __future__ import annotations

from dataclasses import dataclass

from tensormerge.kernels import reference as K
from tensormerge.kernels.dispatch import ops
from tensormerge.methods.base import BlockData, Method, Params, param, register


@dataclass
class TaskArithmeticParams(Params):
    lambda_: float = param(0.3, "scale of the summed task vectors", key="lambda")
    lambdas: list[float] | None = param(None, "per-model scales λ_i (override lambda)")

    def resolved(self, n: int) -> list[float]:
        return list(self.lambdas) if self.lambdas is not None else [self.lambda_] * n


@register
class TaskArithmetic(Method):
    name = "task_arithmetic"
    summary = "θ_0 + λ Σ (θ_i − θ_0)"
    citation = 'Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR 2023, arXiv:2212.04089'
    Params = TaskArithmeticParams
    needs_base = True

    def work_bytes_per_element(self, n_models: int, params: Params) -> int:
        return 12

    def merge(self, data: BlockData, params: TaskArithmeticParams, state: dict):
        return ops(data).task_arithmetic(data.inputs, data.base, params.resolved(len(data.inputs)))

    def fuse_key(self, params: TaskArithmeticParams):
        return ()  # every λ of a sweep shares the task vectors

    def merge_many(self, datas: list[BlockData], params: list[TaskArithmeticParams], states: list[dict]):
        """A sweep's candidates: each task vector formed once for every λ (the fused CPU kernel
        where it runs, else the reference; every kernel's bits are the reference's, so a run on
        any device writes the same)."""
        n = len(datas[0].inputs)
        many = getattr(ops(datas[0]), "task_arithmetic_many", K.task_arithmetic_many)
        return many(datas[0].inputs, datas[0].base, [p.resolved(n) for p in params])
