"""MaTS: merging as a linear system (Σ C_i) θ = Σ C_i θ_i per block, solved by conjugate
gradient from an initial merge. C_i is the objective's curvature: Kronecker-factored Fisher
(B_i W A_i), RegMean's input Gram (W A_i), a diagonal Fisher (F_i ⊙ W), a full Fisher block of
a vector parameter (F_i v), or the identity (the average).

CG's step sizes are global over a block, so a CG block is merged whole; blocks without the
objective's statistics are averaged (splittable), as the research code does. CG moves the start
only within the range of Σ C_i, so a block whose statistics are zero in every model (a head the
data never used) keeps its start, and the report says it carried no information.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from tensormerge.errors import ParameterError
from tensormerge.kernels import linalg as L
from tensormerge.kernels import reference as K
from tensormerge.methods.base import BlockData, Method, Params, param, register

OBJECTIVES = ("kfac", "regmean", "fisher", "blockwise", "average")
INITS = ("task_arithmetic", "average", "base", "zeros")
# The research code runs 10-100; CG that has not met `tol` in 100,000 matvecs will not, and a
# typo'd 1e9 with tol=0 would hold a block for days rather than fail.
MAX_ITERATIONS = 100_000
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class MatsParams(Params):
    objective: str = param("kfac", "curvature C_i: kfac (gram_in, gram_out), regmean (gram_in), fisher (fisher), "
                                   "blockwise (fisher_block, vectors), average", choices=OBJECTIVES)
    alpha: float = param(1.0, "off-diagonal scale of every factor (Grams, Fisher blocks)")
    iterations: int = param(100, f"most CG iterations per block (at most {MAX_ITERATIONS:,})")
    tol: float = param(1e-5, "stop when ‖b − Aθ‖ ≤ tol ‖b‖ (scipy's rule; ‖A θ_init‖ when b = 0)")
    init: str = param("task_arithmetic", "start: task_arithmetic, average, base, zeros, or a merged checkpoint path")
    init_lambda: float = param(0.3, "λ of the task_arithmetic start")
    precision: str = param("float32", "CG arithmetic (float32 as the research code; float64 for exactness)",
                           choices=tuple(PRECISIONS))

    def validate(self, method: str, n_models: int) -> None:
        super().validate(method, n_models)
        if not 0.0 <= self.alpha <= 1.0:
            raise ParameterError(f"{method}: parameter 'alpha' must be in [0, 1], not {self.alpha}")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise ParameterError(f"{method}: parameter 'iterations' must be in [1, {MAX_ITERATIONS}], not "
                                 f"{self.iterations} (each is a pass over every model's statistics of a block)")
        if not (self.tol >= 0 and math.isfinite(self.tol)):
            raise ParameterError(f"{method}: parameter 'tol' must be a finite number >= 0, not {self.tol}")


def is_vector(shape: tuple[int, ...]) -> bool:
    """A bias, a norm or an IA3 vector ([d], or [d, 1] / [1, d] as PEFT stores IA3): one axis > 1."""
    return len(shape) >= 1 and math.prod(shape) == max(shape)


def _lost(res) -> bool:
    """The final residual is ten times the lowest CG reached on the way, and above 1e-3: CG's
    residual is not monotone, but not by that much; rounding over many iterations led it away."""
    return res.residual > max(10 * res.lowest_residual, 1e-3)


def cg_summary(blocks: Iterable[dict], tol: float) -> str:
    """One line over the report's per-block entries: how CG went, the blocks that stopped above
    `tol`, and those whose statistics were zero in every model (kept their start)."""
    cg = [b for b in blocks if "cg_iterations" in b]
    if not cg:
        return ""
    short = sum(1 for b in cg if not b["cg_residual"] <= tol)
    blind = sum(1 for b in cg if b.get("cg_no_information"))
    return (f"mats: {len(cg)} block{'s' if len(cg) != 1 else ''} solved by CG, {max(b['cg_iterations'] for b in cg)} iterations at most, "
            f"largest final relative residual {max(b['cg_residual'] for b in cg):.1e}, {short} did not reach "
            f"tol {tol:g}, {blind} carried no information (statistics zero in every model: start kept)")


def _kinds(objective: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    if objective == "kfac":
        return ("gram_in", "gram_out") if len(shape) == 2 else ()
    if objective == "regmean":
        return ("gram_in",) if len(shape) == 2 else ()
    if objective == "fisher":
        return ("fisher",)
    if objective == "blockwise":
        return ("fisher_block",) if is_vector(shape) else ()
    return ()


@register
class Mats(Method):
    name = "mats"
    summary = "conjugate gradient on Σ C_i θ = Σ C_i θ_i per block (K-FAC, RegMean, Fisher or blockwise C_i)"
    citation = 'Tam et al. 2024, "Merging by Matching Models in Task Parameter Subspaces", TMLR 2024, arXiv:2312.04339'
    Params = MatsParams
    uses_stats = True
    row_split = False

    def requires_base(self, params: MatsParams) -> bool:
        return params.init in ("task_arithmetic", "base")

    def requires_stats(self, params: MatsParams) -> bool:
        return params.objective != "average"

    def extra_checkpoints(self, params: MatsParams) -> dict[str, str]:
        return {} if params.init in INITS else {"init": params.init}

    def block_stats(self, params: MatsParams, shape: tuple[int, ...]) -> tuple[str, ...]:
        return _kinds(params.objective, shape)

    def describe_stats(self) -> str:
        return ("kfac: gram_in and gram_out of linear weights; regmean: gram_in; fisher: fisher; blockwise: "
                "fisher_block of vectors; blocks without them are averaged")

    def splits(self, params: MatsParams, shape: tuple[int, ...], with_stats: bool) -> bool:
        return not with_stats

    def fixed_bytes(self, params: MatsParams, shape: tuple[int, ...], n_models: int) -> int:
        e = PRECISIONS[params.precision].itemsize
        kinds = _kinds(params.objective, shape)
        sizes = {"gram_in": shape[-1] ** 2 if shape else 0, "gram_out": shape[0] ** 2 if shape else 0,
                 "fisher_block": math.prod(shape) ** 2 if shape else 0}
        dots = L.dot_workspace_bytes(math.prod(shape)) if kinds else 0
        return dots + sum((n_models + 1) * e * sizes[k] for k in kinds if k in sizes)

    def work_bytes_per_element(self, n_models: int, params: MatsParams) -> int:
        e = PRECISIONS[params.precision].itemsize
        return e * (7 + 3 * n_models)  # x, r, p, Ap, b, init, residual; stacked θ and two batched products

    def start_extras(self, params: Params) -> Any:
        return {}

    def add_extra(self, acc: Any, extra: Any) -> Any:
        acc[extra["name"]] = {k: v for k, v in extra.items() if k != "name"}
        return acc

    def progress(self, extra: Any) -> str | None:
        if extra.get("cg_no_information"):
            return "cg: no information (statistics zero), start kept"
        return f"cg {extra['cg_iterations']} it, residual {extra['cg_residual']:.1e}"

    def block_report(self, extras: Any) -> dict[str, dict]:
        return extras

    def run_summary(self, params: MatsParams, notes: dict[str, dict]) -> list[str]:
        line = cg_summary(notes.values(), params.tol)
        return [line] if line else []

    def run_warnings(self, params: MatsParams, notes: dict[str, dict]) -> list[str]:
        cg = [b for b in notes.values() if "cg_iterations" in b]
        # rounding over many iterations can lead CG away from where it had been (`_lost`): more
        # iterations would not help such a block, so it is not told to raise them
        lost = [b for b in cg if b.get("cg_lost_ground")]
        short = [b for b in cg if not b["cg_residual"] <= params.tol and b not in lost]
        out = []
        if short:
            out.append(f"mats: {len(short)} of {len(cg)} CG blocks stopped short of tol {params.tol:g} (largest "
                       f"relative residual {max(b['cg_residual'] for b in short):.1e}, at most {params.iterations} "
                       f"iterations): their merge is not the solution asked for; raise -p iterations or loosen -p tol "
                       f"(the report's blocks give each one's cg_residual)")
        if lost:
            name, worst = max(((n, b) for n, b in notes.items() if b in lost), key=lambda nb: nb[1]["cg_residual"])
            out.append(f"mats: {len(lost)} of {len(cg)} CG blocks lost their way to rounding (their residual ended "
                       f"ten times above the lowest they reached; e.g. {name}: relative residual "
                       f"{worst['cg_residual']:.1e} after {worst['cg_iterations']} iterations): more iterations make "
                       f"them worse; fewer -p iterations, a looser -p tol or -p precision=float64")
        return out

    def _init(self, data: BlockData, params: MatsParams, thetas: list[torch.Tensor], wd: torch.dtype) -> torch.Tensor:
        if params.init == "task_arithmetic":
            return K.task_arithmetic(thetas, data.base.to(wd), [params.init_lambda] * len(thetas))
        if params.init == "average":
            return K.weighted_sum(thetas, [1.0 / len(thetas)] * len(thetas))
        if params.init == "base":
            return data.base.to(wd, copy=True)
        if params.init == "zeros":
            return torch.zeros_like(thetas[0])
        return data.extra["init"].to(wd, copy=True)

    def merge(self, data: BlockData, params: MatsParams, state: dict):
        return self._solve(data, params, [params.iterations])[0]

    def fuse_key(self, params: MatsParams):
        """Candidates that differ only in `iterations` share one CG solve (its iterates recorded)."""
        return tuple(sorted((k, repr(v)) for k, v in params.as_dict().items() if k != "iterations"))

    def merge_many(self, datas: list[BlockData], params: list[MatsParams], states: list[dict]):
        return self._solve(datas[0], params[0], [p.iterations for p in params])

    def _solve(self, data: BlockData, params: MatsParams, counts: list[int]) -> list:
        """What `merge` returns for each iteration count in `counts`, from one solve."""
        if not data.stats:  # nothing to weigh with (biases under kfac, the average objective)
            return [self.fallback(data, params) for _ in counts]
        wd = PRECISIONS[params.precision]
        thetas = [x.to(wd) for x in data.inputs]
        x0 = self._init(data, params, thetas, wd)
        apply, b = self._system(data, params, thetas, wd)
        if len(counts) == 1:
            found = {counts[0]: L.conjugate_gradient(apply, b, x0, counts[0], params.tol)}
        else:
            found = L.conjugate_gradient(apply, b, x0, max(counts), params.tol, record=counts)
        # b = 0 and A x0 = 0 also happen with statistics (models and start all zero): only zero
        # statistics in every model are "no information"
        zero = not any(bool(t.any()) for ts in data.stats.values() for t in ts)
        out = []
        for c in counts:
            res = found[c]
            out.append((res.x, {"name": data.name, "cg_iterations": res.iterations, "cg_residual": res.residual,
                                "cg_lost_ground": _lost(res),
                                "cg_no_information": res.no_information and zero}))
        return out

    def _system(self, data: BlockData, params: MatsParams, thetas: list[torch.Tensor], wd: torch.dtype):
        """The matvec θ -> Σ C_i θ and the right-hand side Σ C_i θ_i of the objective."""
        obj, a = params.objective, params.alpha

        def scaled(kind: str) -> torch.Tensor:
            # one power of two per kind over every model: exact, the solution unchanged, and
            # statistics of 1e-30 no longer underflow float32 once multiplied by CG's vectors
            c = L.pow2_scale(data.stats[kind])
            return torch.stack([L.scale_offdiag(g.to(wd), a).mul_(c) for g in data.stats[kind]])

        if obj == "kfac":
            ga, gb = scaled("gram_in"), scaled("gram_out")
            return L.kfac_apply(ga, gb), L.kfac_rhs(ga, gb, torch.stack(thetas))
        if obj == "regmean":
            g = scaled("gram_in")
            total = g.sum(0)
            return (lambda w: w @ total), torch.matmul(torch.stack(thetas), g).sum(0)
        if obj == "blockwise":
            f = scaled("fisher_block")
            total = f.sum(0)
            shape = thetas[0].shape  # IA3 vectors are stored [d, 1] or [1, d]: the block acts on the flat vector
            flat = torch.stack(thetas).reshape(len(thetas), -1, 1)
            return (lambda v: (total @ v.reshape(-1)).reshape(shape)), torch.matmul(f, flat).sum(0).reshape(shape)
        c = L.pow2_scale(data.stats["fisher"])
        total, rhs = torch.zeros_like(thetas[0]), torch.zeros_like(thetas[0])
        for f, t in zip(data.stats["fisher"], thetas):
            fc = f.to(wd) * c  # scaled before the product with θ, which could underflow
            total.add_(fc)
            rhs.addcmul_(fc, t)
        return (lambda w: total * w), rhs
