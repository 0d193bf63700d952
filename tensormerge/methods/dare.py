"""DARE: drop each task-vector entry with probability p, rescale by 1/(1 − p), then task arithmetic.

The mask of an element is a hash of (seed, model index, tensor name, element index), so the
same merge gives the same bytes under any chunking, order, thread count or worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensormerge.errors import ParameterError
from tensormerge.kernels.dispatch import ops
from tensormerge.methods.base import BlockData, Method, Params, param, register
from tensormerge.methods.task_arithmetic import TaskArithmeticParams


@dataclass
class DareParams(TaskArithmeticParams):
    lambda_: float = param(1.0, "scale of the summed (dropped, rescaled) task vectors", key="lambda")
    p: float = param(0.5, "drop probability of each task-vector entry, in [0, 1)")
    seed: int = param(0, "seed of the drop masks")
    rescale: bool = param(True, "divide kept entries by 1 − p")

    def validate(self, method: str, n_models: int) -> None:
        super().validate(method, n_models)
        if not 0.0 <= self.p < 1.0:
            raise ParameterError(f"{method}: parameter 'p' must be in [0, 1), got {self.p}")


@register
class Dare(Method):
    name = "dare"
    summary = "random drop (p) and rescale of task vectors, then task arithmetic"
    citation = ('Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch"'
                ', ICML 2024, arXiv:2311.03099')
    Params = DareParams
    needs_base = True

    def work_bytes_per_element(self, n_models: int, params: Params) -> int:
        return 12 + 32  # fp32 base/acc/tmp + int64 counters of the hash

    def merge(self, data: BlockData, params: DareParams, state: dict):
        return ops(data).dare(data.inputs, data.base, params.p, params.resolved(len(data.inputs)), params.seed,
                      params.rescale, data.name, data.flat_start)
