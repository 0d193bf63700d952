"""mergekit's generalized task arithmetic, per tensor: sparsify each task vector, weight it,
optionally keep only the entries agreeing with a majority sign, add, normalize, scale, add to θ_0.

One definition with mergekit's parameters (`gta`) and mergekit's named methods as presets of it
(`dare_ties`, `dare_linear`, `breadcrumbs`, `breadcrumbs_ties`, `della`, `della_linear`; mergekit's
`ties` is `gta` sparsify=magnitude consensus=sum normalize=true, its `task_arithmetic` gta with
the defaults). Unlike tensormerge's `ties` (the TIES reference: one top-k over the whole model),
everything here is per tensor, as in mergekit.

What needs the whole tensor is kept exact under any chunking:
- `magnitude` and `magnitude_outliers` rank |δ| over the whole tensor: such blocks are merged
  whole (row_split off); ties in magnitude are broken by index (mergekit's argsort leaves them
  unspecified).
- `random` and `della_magprune` masks are a counter-based hash of (seed, model, tensor, element),
  DARE's, so they never depend on chunking; mergekit's torch.bernoulli draws cannot be reproduced
  bit for bit, only in distribution. DELLA's ranks run along axis 1, within a row (a 1-D tensor
  is ranked whole, so merged whole).
- `rescale` (mergekit's L1 rescale of the masked vector to the unmasked one's norm) needs both
  norms of the whole tensor: for the random masks they are per-row sums, exactly combined,
  computed in the merge for a tensor merged in one chunk and by a pass for one cut into
  several (methods/per_tensor.py).

Computation is in float32 (float64 for float64 inputs) with one cast of the result; mergekit
computes in the recipe's dtype (bf16 deltas, weights and sums in bf16), so its results differ by
that rounding, and near a magnitude threshold a bf16-rounded |δ| may rank differently.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from tensormerge.errors import InputError, ParameterError
from tensormerge.kernels import reference as K
from tensormerge.kernels.dispatch import ops
from tensormerge.methods.base import BlockData, GlobalPass, Method, Params, param, register
from tensormerge.methods.per_tensor import PerTensorPass

SPARSIFY = ("none", "magnitude", "random", "magnitude_outliers", "della_magprune")
CONSENSUS = ("none", "sum", "count")
WHOLE = ("magnitude", "magnitude_outliers")  # rank over the whole tensor
HASHED = ("random", "della_magprune")  # masks from the hash; their rescale norms come from a pass
GAMMA, EPSILON = 0.01, 0.15  # mergekit's defaults


@dataclass
class GtaCommonParams(Params):
    weights: list[float] | None = param(None, "per-model weight of the task vector (1.0 each; one value: every model)")
    density: list[float] | None = param(None, "per-model fraction of the task vector kept, in [0, 1] (1.0: no sparsification)")
    lambda_: float = param(1.0, "scale of the merged task vector", key="lambda")
    normalize: bool = param(False, "divide by the sum of the weights (of the models kept at each entry, with a consensus)")
    rescale: bool = param(False, "rescale each masked task vector to its unmasked L1 norm (random and della masks)")
    gamma: list[float] | None = param(None, f"magnitude_outliers: fraction of largest |δ| dropped ({GAMMA}; per model)")
    epsilon: list[float] | None = param(None, f"della_magprune: half-width of the keep probabilities ({EPSILON}; per model)")
    seed: int = param(0, "seed of the random and della masks")
    int8_mask: bool = param(False, "mergekit's int8 consensus mask (memory only there; no effect on values)")

    def sparsify_mode(self) -> str:
        return getattr(self, "sparsify", "none")

    def consensus_mode(self) -> str:
        return getattr(self, "consensus", "none")

    def validate(self, method: str, n_models: int) -> None:
        for key in ("weights", "density", "gamma", "epsilon"):  # one value applies to every model
            value = getattr(self, key)
            if value is not None and len(value) == 1 and n_models > 1:
                setattr(self, key, value * n_models)
        super().validate(method, n_models)
        mode = self.sparsify_mode()
        for key, used in (("gamma", "magnitude_outliers"), ("epsilon", "della_magprune")):
            if getattr(self, key) is not None and mode != used:
                raise ParameterError(f"{method}: parameter {key!r} applies to sparsify={used} only (sparsify is {mode})")
        for d in self.density or []:
            if not 0.0 <= d <= 1.0:
                raise ParameterError(f"{method}: parameter 'density' must be in [0, 1], got {d}")
        for g in self.gamma or []:
            if not 0.0 <= g <= 1.0:
                raise ParameterError(f"{method}: parameter 'gamma' must be in [0, 1], got {g}")
        if mode == "della_magprune":
            for d, e in zip(self.densities(n_models), self.epsilons(n_models)):
                if 0 < d < 1 and not (e >= 0 and d - e > 0 and d + e < 1):
                    raise ParameterError(f"{method}: parameter 'epsilon' {e} with density {d}: density ± epsilon "
                                         f"must lie in (0, 1)")

    def model_weights(self, n: int) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * n

    def densities(self, n: int) -> list[float]:
        return list(self.density) if self.density is not None else [1.0] * n

    def gammas(self, n: int) -> list[float]:
        return list(self.gamma) if self.gamma is not None else [GAMMA] * n

    def epsilons(self, n: int) -> list[float]:
        return list(self.epsilon) if self.epsilon is not None else [EPSILON] * n

    def pass_rescale(self, n: int) -> list[bool]:
        """Per model: whether its mask is hashed and rescaled (needs the pass's norms)."""
        hashed = self.rescale and self.sparsify_mode() in HASHED
        return [hashed and 0 < d < 1 for d in self.densities(n)]


@dataclass
class GtaParams(GtaCommonParams):
    sparsify: str = param("none", "how each task vector is sparsified (mergekit's names)", choices=SPARSIFY)
    consensus: str = param("none", "sign consensus: sum (TIES: sign of Σ w δ), count (majority of signs), none",
                           choices=CONSENSUS)


def _hashed_mask(params: GtaCommonParams, i: int, delta: torch.Tensor, data: BlockData, density: float) -> torch.Tensor:
    if params.sparsify_mode() == "random":
        return K.random_keep(params.seed, i, data.name, data.flat_start, delta.numel(), density,
                             delta.device).reshape(delta.shape)
    return K.della_keep(delta, density, params.epsilons(len(data.inputs))[i], params.seed, i, data.name,
                        data.flat_start)


class _L1Pass(PerTensorPass):
    """Per model and tensor, ‖δ‖₁ and ‖m ⊙ δ‖₁ of the hashed masks, for `rescale`: per-row float64
    sums added with fsum (methods/per_tensor.py); folded into the merge for a tensor merged in
    one chunk, a pass over the rows for one cut into several."""

    name = "gta_l1"
    label = "rescale: L1 norms"

    def __init__(self, params: GtaCommonParams):
        self.params = params

    def skip(self, state: dict) -> bool:
        """No model is dropped (density 1, mergekit's default): nothing to rescale, nothing read."""
        every = [self.params, *getattr(self.params, "per_block", {}).values()]  # per-tensor densities too
        return all(p.density is None or not any(0 < d < 1 for d in p.density) for p in every)

    def wanted(self, data: BlockData) -> bool:
        return any(self.params.for_block(data.name).pass_rescale(len(data.inputs)))

    def row_partials(self, data: BlockData) -> torch.Tensor:
        """[2 n, rows]: per model ‖δ‖₁ and ‖m ⊙ δ‖₁ of each row (zeros for a model not rescaled)."""
        n = len(data.inputs)
        rows = data.inputs[0].shape[0] if data.full_shape else 1
        out = torch.zeros(2 * n, rows, dtype=torch.float64)
        wd = K.work_dtype(data.base, *data.inputs)
        base_w = None
        own = self.params.for_block(data.name)  # a per-tensor density (methods.rules)
        dens = own.densities(n)
        pair = getattr(ops(data), "gta_l1_rows", None)
        for i, (x, needed) in enumerate(zip(data.inputs, own.pass_rescale(n))):
            if not needed:
                continue
            fast = None
            if pair is not None and own.sparsify_mode() == "random":
                fast = pair(x, data.base, own.seed, i, data.name, data.flat_start, dens[i])
            if fast is not None:  # the same float64 values, summed by the same row_sums
                out[2 * i] = K.row_sums(fast[0])
                out[2 * i + 1] = K.row_sums(fast[1])
                continue
            base_w = data.base.to(wd) if base_w is None else base_w
            d = x.to(wd) - base_w
            keep = _hashed_mask(own, i, d, data, dens[i])
            out[2 * i] = K.row_sums(d.abs()).cpu()
            out[2 * i + 1] = K.row_sums(d.abs_().mul_(keep)).cpu()
        return out

    def result(self, totals: list[float], block: str, numel: int) -> list[list[float]]:
        norms = []
        for i in range(len(totals) // 2):
            pair = totals[2 * i:2 * i + 2]
            if not all(map(torch.isfinite, torch.tensor(pair))):
                raise InputError(f"tensor {block!r}: model {i} (or the base) holds NaN or Inf values, or its task "
                                 f"vector's L1 norm overflows")
            norms.append(pair)
        return norms


@register
class Gta(Method):
    name = "gta"
    summary = "mergekit's generalized task arithmetic, per tensor: sparsify, weight, sign consensus, normalize"
    citation = ('Goddard et al. 2024, "Arcee\'s MergeKit: A Toolkit for Merging Large Language Models", '
                'arXiv:2403.13257 (its generalized task arithmetic: TIES arXiv:2306.01708, DARE arXiv:2311.03099, '
                'Model Breadcrumbs arXiv:2312.06795, DELLA arXiv:2406.11617)')
    Params = GtaParams
    needs_base = True

    def splits(self, params: GtaCommonParams, shape: tuple[int, ...], with_stats: bool) -> bool:
        mode = params.sparsify_mode()
        if mode in WHOLE:
            return False
        return not (mode == "della_magprune" and len(shape) < 2)  # a vector is ranked whole

    def work_bytes_per_element(self, n_models: int, params: GtaCommonParams) -> int:
        # deltas kept for the consensus, base, sum, divisor, vote; a hash (int64 + int32) or the
        # rank selection's magnitudes, kthvalue copy and int32 tie ranks; della's two argsorts
        extra = {"none": 0, "random": 12, "magnitude": 16, "magnitude_outliers": 16, "della_magprune": 40}
        return 4 * (n_models + 4) + extra[params.sparsify_mode()]

    def passes(self, params: GtaCommonParams) -> list[GlobalPass]:
        return [_L1Pass(params)] if self.prepares(params) else []

    def prepares(self, params: GtaCommonParams) -> bool:
        return params.rescale and params.sparsify_mode() in HASHED

    def prepare(self, data: BlockData, params: GtaCommonParams):
        return _L1Pass(params).fold(data) if self.prepares(params) else None

    def merge(self, data: BlockData, params: GtaCommonParams, state: dict) -> torch.Tensor:
        n = len(data.inputs)
        mode = params.sparsify_mode()
        norms = _L1Pass(params).lookup(data, state)
        fused = self._fused(data, params, norms)
        if fused is not None:
            return fused
        wd = K.work_dtype(data.base, *data.inputs)
        base_w = data.base.to(wd)
        dens = params.densities(n)
        deltas = []
        for i, x in enumerate(data.inputs):
            d = x.to(wd) - base_w  # a new tensor: x.to(wd) may be the input itself
            if mode in WHOLE:
                d = self._whole(data, params, i, d, dens[i])
            elif mode in HASHED and dens[i] <= 0:
                d.zero_()
            elif mode in HASHED and dens[i] < 1:
                d.mul_(_hashed_mask(params, i, d, data, dens[i]))
                if params.pass_rescale(n)[i]:
                    d.mul_(K.l1_rescale(*norms[i]))
            deltas.append(d)
        return K.gta_combine(deltas, params.model_weights(n), params.consensus_mode(), params.normalize,
                             params.lambda_, base_w)

    def _fused(self, data: BlockData, params: GtaCommonParams, norms: list | None) -> torch.Tensor | None:
        """The merge by the run's kernels in one loop over the entries (kernels.cpu.gta_fused: the
        same bits), where they have one for these modes; None: the torch code below."""
        fused = getattr(ops(data), "gta_fused", None)
        mode = params.sparsify_mode()
        if fused is None or mode not in ("none", "magnitude", "random") or (mode == "magnitude" and params.rescale):
            return None
        n = len(data.inputs)
        if mode == "magnitude":
            self._check_whole(data, params)
        specs: list[tuple] = []
        rescaled = params.pass_rescale(n)
        for i, density in enumerate(params.densities(n)):
            if mode == "none" or density >= 1:
                specs.append(("none",))
            elif mode == "magnitude":
                specs.append(("magnitude", density))
            elif density <= 0:
                specs.append(("zero",))
            else:
                factor = K.l1_rescale(*norms[i]) if rescaled[i] else 1.0
                specs.append(("random", density, params.seed, i, data.name, factor))
        return fused(data.inputs, data.base, specs, params.model_weights(n), params.consensus_mode(),
                     params.normalize, params.lambda_, data.flat_start)

    @staticmethod
    def _check_whole(data: BlockData, params: GtaCommonParams) -> None:
        if data.row_start != 0 or data.base.numel() != torch.Size(data.full_shape).numel():
            raise RuntimeError(f"tensor {data.name!r}: {params.sparsify_mode()} needs the whole tensor in one chunk")

    def _whole(self, data: BlockData, params: GtaCommonParams, i: int, d: torch.Tensor, density: float) -> torch.Tensor:
        """Magnitude and breadcrumbs sparsification of one model's whole task vector."""
        self._check_whole(data, params)
        if density >= 1:
            return d
        if d.numel() and not K.all_finite(d):
            raise InputError(f"tensor {data.name!r}: model {i} (or the base) holds NaN or Inf values")
        if params.sparsify_mode() == "magnitude":
            keep = K.magnitude_keep(d, density)
        else:
            keep = K.outliers_keep(d, density, params.gammas(len(data.inputs))[i])
        if not params.rescale:
            return d.mul_(keep)
        before = K.exact_total(K.row_sums(d.abs()))
        d.mul_(keep)
        return d.mul_(K.l1_rescale(before, K.exact_total(K.row_sums(d.abs()))))


def _preset(name: str, sparsify: str, consensus: str, normalize: bool, rescale: bool, summary: str,
            citation: str) -> type[Method]:
    """One of mergekit's named methods: gta with its sparsification, consensus and defaults fixed."""
    base_fields = {"sparsify_mode": lambda self: sparsify, "consensus_mode": lambda self: consensus}
    annotations = {"normalize": bool, "rescale": bool}
    ns = {
        "__annotations__": annotations,
        "normalize": param(normalize, GtaCommonParams.__dataclass_fields__["normalize"].metadata["help"]),
        "rescale": param(rescale, GtaCommonParams.__dataclass_fields__["rescale"].metadata["help"]),
        **base_fields,
    }
    params_cls = dataclass(type(f"{name.title().replace('_', '')}Params", (GtaCommonParams,), ns))
    cls = type(name.title().replace("_", ""), (Gta,), {"name": name, "summary": summary, "citation": citation,
                                                        "Params": params_cls, "__doc__": summary})
    return register(cls)


_DARE = 'Yu et al. 2024, "Language Models are Super Mario", ICML 2024, arXiv:2311.03099 (as mergekit defines it)'
_BREAD = 'Davari & Belilovsky 2024, "Model Breadcrumbs", ECCV 2024, arXiv:2312.06795 (as mergekit defines it)'
_DELLA = 'Deep et al. 2024, "DELLA-Merging", arXiv:2406.11617 (as mergekit defines it)'
DareTies = _preset("dare_ties", "random", "sum", False, True,
                   "mergekit's dare_ties: gta with random drop (rescaled) and TIES' sign consensus", _DARE)
DareLinear = _preset("dare_linear", "random", "none", False, True,
                     "mergekit's dare_linear: gta with random drop (rescaled), no consensus", _DARE)
Breadcrumbs = _preset("breadcrumbs", "magnitude_outliers", "none", False, False,
                      "mergekit's breadcrumbs: drop the largest (gamma) and smallest |δ| per tensor", _BREAD)
BreadcrumbsTies = _preset("breadcrumbs_ties", "magnitude_outliers", "sum", False, False,
                          "mergekit's breadcrumbs_ties: breadcrumbs with TIES' sign consensus", _BREAD)
Della = _preset("della", "della_magprune", "sum", True, True,
                "mergekit's della: magnitude-ranked random drop (MagPrune), rescaled, sign consensus", _DELLA)
DellaLinear = _preset("della_linear", "della_magprune", "none", False, True,
                      "mergekit's della_linear: MagPrune drop, rescaled, no consensus", _DELLA)
