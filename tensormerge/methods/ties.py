"""TIES-Merging: trim each task vector, elect a sign per entry, disjoint-merge, θ_0 + λ τ*.

Defaults follow the TIES reference code: each task vector is trimmed over the whole model
flattened (tied tensors once), keeping |τ| ≥ the (D − floor(D·k))-th smallest |τ|, and entries
whose elected sign is exactly zero take the model-wide majority sign (when that is 0 too, the
disjoint merges select their negative entries, as the reference's where(s > 0, τ > 0, τ < 0)
does; kernels.reference.ties_disjoint). Both need the whole
model, so they come from streaming passes: radix-histogram passes give the exact thresholds,
and the elected signs are summed (integers: exact in any order) so the merge gives the
exactly-cancelling entries the majority itself. Pass A counts those votes as it counts the
thresholds' windows (`_WindowVotes`: an entry's sign is known there unless some |τ_i| lies
inside its window, and those few are kept in a form that gives the vote for any threshold in
the window), so where every threshold falls in its window a run reads its inputs twice: pass A,
then the merge. Otherwise (a missed window, a threshold among the exact zeros, a kernel without
the votes, a sweep) a vote pass after the thresholds sums them. Without either the majority is
known only after the merge: those entries were merged with the running vote as a guess and
patched where it was wrong, which on data with many of them (bf16 task vectors cancel exactly
often) rewrote entries on every page of the output. That path remains for chunks an
interrupted run logged.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from fractions import Fraction

import torch

from tensormerge.errors import InputError, ParameterError
from tensormerge.kernels import reference as K
from tensormerge.kernels.dispatch import ops
from tensormerge.kernels import select as S
from tensormerge.methods.base import BlockData, GlobalPass, Method, Params, Patch, param, register

GLOBAL = "\x00global"
RUNNING_VOTES = "ties_running_votes"
VOTES = "ties_votes"  # the exact votes per key, from the vote pass
WINDOW_VOTES = "ties_window_votes"  # the same, counted by pass A where every threshold fell in its window
LOG_BYTES = 64 << 20  # entries with several τ_i inside their windows, kept for their votes; beyond: vote pass
WINDOW_BINS = 4  # top bins around the sampled threshold whose low bits pass A also counts
NONFINITE_BIN = 0x7F80  # top 16 bits of +inf; NaNs fill the 127 bins above (sign bit is clear)


@dataclass
class TiesParams(Params):
    k: float = param(0.2, "fraction of each task vector kept (values > 1 are percent: 20 = 0.2)")
    lambda_: float = param(1.0, "scale of the merged task vector", key="lambda")
    sign: str = param("mass", "sign election", choices=K.SIGN_MODES)
    merge: str = param("dis-mean", "aggregation of the trimmed task vectors", choices=K.TIES_MERGES)
    scope: str = param("global", "trim over the whole model (TIES reference) or each tensor alone",
                       choices=("global", "tensor"))
    k_rule: str = param("reference", "reference keeps floor(D·k)+1 entries, exact keeps max(1, floor(D·k))",
                        choices=("reference", "exact"))

    def validate(self, method: str, n_models: int) -> None:
        super().validate(method, n_models)
        if self.k > 1:
            self.k = self.k / 100.0
        if not 0.0 < self.k <= 1.0:
            raise ParameterError(f"{method}: parameter 'k' must be in (0, 1] or a percent in (1, 100], got {self.k}")

    def check_varying(self, method: str, keys: list[str]) -> None:
        allowed = {"lambda"} | ({"k", "k_rule", "merge"} if self.scope == "tensor" else set())
        bad = [k for k in keys if k not in allowed]
        if bad:
            why = ("the global top-k needs one value for the whole model (-p scope=tensor trims each tensor alone)"
                   if self.scope == "global" and set(bad) <= {"k", "k_rule", "merge"} else
                   "it must be one value for the whole model")
            raise ParameterError(f"{method}: parameter {bad[0]!r} cannot vary per tensor with scope={self.scope}: {why}")

    @property
    def needs_norms(self) -> bool:
        return self.sign in ("normfrac", "normmass")


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


def _key(params: TiesParams, name: str) -> str:
    return GLOBAL if params.scope == "global" else name


class _HistogramPass(GlobalPass):
    """Histograms summed per key (the whole model, or one tensor for scope=tensor), compacted
    into a small result as soon as a key is complete so per-tensor scope stays small."""

    def __init__(self, params: TiesParams):
        self.params = params

    def reduce(self, acc: dict, partial: torch.Tensor, block: str) -> dict:
        key = _key(self.params, block)
        if key in acc["hist"]:
            acc["hist"][key] += partial
        else:
            acc["hist"][key] = partial.clone()
        return acc

    def end_block(self, acc: dict, block: str, numel: int) -> dict:
        if self.params.scope == "tensor":
            self._compact(acc, block)
        return acc

    def finish(self, acc: dict, state: dict) -> None:
        if GLOBAL in acc["hist"]:
            self._compact(acc, GLOBAL)
        state[self.name] = acc["result"]

    @abstractmethod
    def _compact(self, acc: dict, key: str) -> None:
        """Replace a complete key's histograms by the small result the next step needs."""


class _SamplePass(_HistogramPass):
    """Pass 0: the top-16-bit histogram of a 1/64 row sample locates each threshold's bin
    roughly, so pass A can also count the low bits of a window of bins around it. When the
    exact bin falls inside the window (the sample would have to be badly skewed for it not to),
    pass B is skipped; otherwise it runs, so the result is exact either way."""

    name = "ties_sample"
    label = "top-k threshold: sample"
    sample = 1 / 64

    def start(self, state: dict) -> dict:
        return {"hist": {}, "numel": {}, "result": {}}

    def map(self, data: BlockData, state: dict) -> torch.Tensor:
        tau = K.task_vectors(data.inputs, data.base).float()
        return torch.stack([ops(data).hist_high(S.abs_bits_(t)) for t in tau]).cpu()

    def group_key(self):
        return (self.name,)  # the histograms do not depend on k: one for a sweep's every k

    def skip_in_sweep(self) -> bool:
        return not self.params.needs_norms  # pass A's map_group then counts whole bins, not windows

    def map_group(self, datas, passes, states):
        return [self.map(datas[0], states[0])] * len(datas)

    def reduce(self, acc: dict, partial: torch.Tensor, block: str) -> dict:
        key = _key(self.params, block)
        acc["numel"][key] = acc["numel"].get(key, 0) + partial[0].sum().item()
        return super().reduce(acc, partial, block)

    def _compact(self, acc: dict, key: str) -> None:
        hist = acc["hist"].pop(key)
        own = self.params.for_block(key)
        rank = S.keep_rank(acc["numel"].pop(key), own.k, own.k_rule)
        if rank == 0:
            acc["result"][key] = None
            return
        top = NONFINITE_BIN - WINDOW_BINS
        acc["result"][key] = [min(max(_sampled_bin(h, rank) - 1, 0), top) for h in hist]


def _sampled_bin(h: torch.Tensor, rank: int) -> int:
    """The sample's threshold bin, moved above the gap when it is bin 0: there (a k at the edge of
    a fine-tune's unchanged weights, τ = 0) the exact threshold is either 0, which pass A's count
    of exact zeros places, or in the first bins above the gap, which the window then holds."""
    b = S.locate(h, rank)[0]
    if b == 0:
        above = h[1:].nonzero()
        if len(above):
            b = int(above[0]) + 1
    return b


class _Listed:
    """Increments at flat places of an [N, window] table, listed by a chunk rather than dense.
    Only the few percent of entries inside the windows add anything, and a dense table per chunk
    (6 MB for three models, zeroed by the kernel and summed here, over a thousand chunks of a 1.1B
    model) cost more than pass A's counting. `values` None: each place adds 1 (window counts);
    else the listed changes (votes). Lists sum by concatenation (dask folds a block's partials
    with `+`) and are never changed after, so sums may share them."""

    __slots__ = ("where", "values", "size")

    def __init__(self, where: torch.Tensor, values: torch.Tensor | None = None):
        self.where = [where.cpu()]
        self.values = None if values is None else [values.cpu()]
        self.size = len(where)

    def __add__(self, other: "_Listed") -> "_Listed":
        out = _Listed.__new__(_Listed)
        out.where, out.size = self.where + other.where, self.size + other.size
        out.values = None if self.values is None else self.values + other.values
        return out

    def into(self, table: torch.Tensor) -> None:
        where = torch.cat(self.where)
        if self.values is None:
            table.view(-1).add_(torch.bincount(where, minlength=table.numel()))
        else:
            table.view(-1).index_add_(0, where, torch.cat(self.values))


class _Table:
    """An [N, window] int64 table summed from dense partials, `_Listed` ones (kept listed until
    they are as many as its places, then added to it) and other tables."""

    __slots__ = ("shape", "dense", "listed")
    fold_at = 0  # listed increments beyond this are added to the table; 0: as many as its places

    def __init__(self, n_models: int, span: int) -> None:
        self.shape = (n_models, span)
        self.dense: torch.Tensor | None = None
        self.listed: _Listed | None = None

    def __iadd__(self, part: "torch.Tensor | _Listed | _Table") -> "_Table":
        if isinstance(part, _Table):
            for own in (part.dense, part.listed):
                if own is not None:
                    self += own
        elif isinstance(part, torch.Tensor):
            self.dense = part.clone() if self.dense is None else self.dense.add_(part)
        else:
            self.listed = part if self.listed is None else self.listed + part
            if self.listed.size > (self.fold_at or self.shape[0] * self.shape[1]):
                self.table()
        return self

    def copy(self) -> "_Table":
        out = _Table(*self.shape)
        out += self
        return out

    def table(self) -> torch.Tensor:
        if self.dense is None:
            self.dense = torch.zeros(self.shape, dtype=torch.int64)
        if self.listed is not None:
            self.listed.into(self.dense)
            self.listed = None
        return self.dense


class _WindowVotes:
    """Pass A's count of the majority votes (`kernels.reference.window_votes`), summed over
    chunks: the votes of entries whose elected sign is the same wherever in the windows the
    thresholds fall; per model and window offset, the change in votes when that model's τ_i
    there is kept (`delta`); and the few entries with two or more τ_i inside, listed per work
    dtype (float64 tensors elect in float64, the others in float32) as bytes, like
    `_UndecidedLog`: millions of small tensors would fragment the heap. `logs` None: not counted
    (a kernel without it, or more than LOG_BYTES to list), and the vote pass runs; {}: nothing
    counted yet (an accumulator's start)."""

    __slots__ = ("fixed", "delta", "logs")
    span = WINDOW_BINS * S.NBINS

    def __init__(self, n_models: int, logs: dict | None = None):
        self.fixed = 0
        self.delta = _Table(n_models, self.span)
        self.logs = logs

    @classmethod
    def of_chunk(cls, n_models: int, counted: tuple | None) -> "_WindowVotes":
        """A chunk's votes from the kernel's (fixed, where, change, log), or None: not countable."""
        if counted is None:
            return cls(n_models)
        fixed, where, change, log = counted
        out = cls(n_models, {log.dtype: bytearray(log.cpu().numpy().tobytes())})
        out.fixed = fixed
        out.delta += _Listed(where, change)
        return out

    @property
    def known(self) -> bool:
        return self.logs is not None

    def log_bytes(self) -> int:
        return sum(len(b) for b in self.logs.values()) if self.logs else 0

    def copy(self) -> "_WindowVotes":
        out = _WindowVotes(self.delta.shape[0], None if self.logs is None else
                           {dt: bytearray(b) for dt, b in self.logs.items()})
        out.fixed, out.delta = self.fixed, self.delta.copy()
        return out

    def __iadd__(self, other: "_WindowVotes") -> "_WindowVotes":
        if not (self.known and other.known) or self.log_bytes() + other.log_bytes() > LOG_BYTES:
            self.fixed, self.delta, self.logs = 0, _Table(*self.delta.shape), None
            return self
        self.fixed += other.fixed
        self.delta += other.delta
        for dtype, rows in other.logs.items():
            self.logs.setdefault(dtype, bytearray()).extend(rows)
        return self

    def __add__(self, other: "_WindowVotes") -> "_WindowVotes":  # dask folds a block's partials
        out = self.copy()
        out += other
        return out

    def total(self, offsets: list[int], thresholds: list[float]) -> int:
        """The votes for thresholds at these offsets of their windows (values `thresholds`)."""
        delta = self.delta.table()
        votes = self.fixed + sum(int(delta[i, j:].sum()) for i, j in enumerate(offsets))
        for dtype, rows in self.logs.items():
            if rows:
                listed = torch.frombuffer(rows, dtype=dtype).reshape(-1, delta.shape[0])
                sign = K.ties_elect(K.ties_trim_(listed.t().contiguous(), thresholds), "mass")
                votes += int((sign > 0).sum()) - int((sign < 0).sum())
        return votes


class _HighPass(_HistogramPass):
    """Pass A: per model, the low bits of the entries inside the sampled window of bins and the
    count below it, which locate the exact threshold whenever it lies in the window. The full
    top-16-bit histogram (with moments for norms) is counted only where it is needed: for the
    norm-based signs, for keys without a window, and (pass A2) after a window missed."""

    name = "ties_high"
    label = "top-k threshold: high bits"

    def start(self, state: dict) -> dict:
        return {"hist": {}, "numel": {}, "result": {}, "window": {}, "below": {}, "zeros": {}, "votes": {},
                "counted": {}, "lo": state.get(_SamplePass.name, {})}

    def map(self, data: BlockData, state: dict):
        windows = state.get(_SamplePass.name, {}).get(_key(self.params, data.name))
        kern = ops(data)
        if windows is not None and not self.params.needs_norms:  # the window only (see the class)
            numel = len(data.base.reshape(-1))
            votes = None
            if self.params.sign == "mass":
                lows, below, bad, zeros, counted = kern.ties_window_votes(data.inputs, data.base, windows,
                                                                          WINDOW_BINS, max(numel // 16, 1024))
                votes = _WindowVotes.of_chunk(len(windows), counted)
            else:
                lows, below, bad, zeros = kern.ties_window_counts(data.inputs, data.base, windows, WINDOW_BINS)
            if bad is not None:
                raise InputError(f"tensor {data.name!r}: model {bad} (or the base) holds NaN or Inf values")
            lows = _Listed(lows) if lows.dim() == 1 else lows.cpu()  # the fused kernel lists its counts
            return None, lows, numel, below.cpu(), zeros.cpu(), votes
        tau = K.task_vectors(data.inputs, data.base).float()
        hists, lows = [], []
        for i in range(tau.shape[0]):
            bits = S.abs_bits_(tau[i])
            h = kern.hist_high_moments(bits) if self.params.needs_norms else kern.hist_high(bits).unsqueeze(0)
            if h[0, NONFINITE_BIN:NONFINITE_BIN + 128].any():
                raise InputError(f"tensor {data.name!r}: model {i} (or the base) holds NaN or Inf values")
            hists.append(h)
            if windows is not None:
                lows.append(kern.window_hist(bits, windows[i], WINDOW_BINS))
        return torch.stack(hists).cpu(), torch.stack(lows).cpu() if lows else None, tau.shape[1], None, None, None

    def group_key(self):
        return (self.name, self.params.needs_norms)

    def map_group(self, datas, passes, states):
        """A sweep's candidates (several k): the full top-16-bit histograms once, which do not
        depend on k (with moments for the norm-based signs). Without norms that is all: each
        candidate's threshold bin is then exact, and pass B counts the low bits of every
        candidate's bin in one shared pass. Counting each candidate's window of bins here
        instead cost 30 ms per million entries for four k (the increments inside four windows
        per model), against 4 ms for the histograms and 7 for pass B's table lookups. With norms, the low bits
        of each candidate's window too. `_compact` then takes its full-histogram path, whose
        thresholds are the same exact values."""
        data = datas[0]
        if not self.params.needs_norms:
            hist = ops(data).ties_hist_high(data.inputs, data.base).cpu()
            bad = hist[:, NONFINITE_BIN:NONFINITE_BIN + 128].any(1).nonzero()
            if len(bad):
                raise InputError(f"tensor {data.name!r}: model {int(bad[0])} (or the base) holds NaN or Inf values")
            return [(hist.unsqueeze(1), None, data.base.numel(), None, None, None)] * len(datas)
        kern = ops(data)
        tau = K.task_vectors(data.inputs, data.base).float()
        hists, bits = [], []
        for i in range(tau.shape[0]):
            b = S.abs_bits_(tau[i])
            h = kern.hist_high_moments(b) if self.params.needs_norms else kern.hist_high(b).unsqueeze(0)
            if h[0, NONFINITE_BIN:NONFINITE_BIN + 128].any():
                raise InputError(f"tensor {data.name!r}: model {i} (or the base) holds NaN or Inf values")
            hists.append(h)
            bits.append(b)
        hist = torch.stack(hists).cpu()
        out = []
        for p, d, s in zip(passes, datas, states):
            windows = s.get(_SamplePass.name, {}).get(_key(p.params, d.name))
            lows = None if windows is None else torch.stack(
                [kern.window_hist(b, windows[i], WINDOW_BINS) for i, b in enumerate(bits)]).cpu()
            out.append((hist, lows, tau.shape[1], None, None, None))
        return out

    def reduce(self, acc: dict, partial, block: str) -> dict:
        hist, lows, numel, below, zeros, votes = partial
        key = _key(self.params, block)
        if votes is not None:  # the first chunk's too is held to LOG_BYTES
            counted = acc["votes"].setdefault(key, _WindowVotes(votes.delta.shape[0], {}))
            counted += votes
        acc["numel"][key] = acc["numel"].get(key, 0) + numel
        if lows is not None:
            window = acc["window"].setdefault(key, _Table(len(acc["lo"][key]), WINDOW_BINS * S.NBINS))
            window += lows
        if below is not None:
            acc["below"][key] = acc["below"].get(key, 0) + below
        if zeros is not None:
            acc["zeros"][key] = acc["zeros"].get(key, 0) + zeros
        if hist is not None:
            return super().reduce(acc, hist, block)
        return acc

    def finish(self, acc: dict, state: dict) -> None:
        for key in list(acc["numel"]):
            self._compact(acc, key)
        state[self.name] = acc["result"]
        state[WINDOW_VOTES] = acc["counted"]

    def _compact(self, acc: dict, key: str) -> None:
        """Per model: its bin, rank in bin and mass above; and, when the exact bin lay inside
        the sampled window, the final threshold and trimmed norm (pass B is then not needed).
        None for a model whose threshold the window (counted without the full histogram)
        missed: pass A2 locates it. When every model's threshold lay inside its window, the
        key's votes too (`_WindowVotes`), and the vote pass is not needed either."""
        hist = acc["hist"].pop(key, None)
        numel = acc["numel"].pop(key)
        window, lows = acc["window"].pop(key, None), acc["lo"].get(key)
        if window is not None:
            window = window.table()
        below = acc["below"].pop(key, None)
        zeros = acc["zeros"].pop(key, None)
        votes = acc["votes"].pop(key, None)
        own = self.params.for_block(key)
        rank = S.keep_rank(numel, own.k, own.k_rule)
        per_model = []
        if hist is None:  # window only: the threshold is the (rank - below)-th entry inside it
            offsets = []  # each threshold's offset in its window, while all are inside
            for i in range(window.shape[0]):
                if rank == 0:
                    per_model.append((-1, 0, Fraction(0), (0.0, 0.0)))
                    continue
                inside = rank - int(below[i])
                if 1 <= inside <= int(window[i].sum()):
                    j, r_in = S.locate(window[i], inside)
                    bits = (lows[i] << 16) + j
                    per_model.append((bits >> 16, r_in, Fraction(0), (S.bits_to_float(bits), 0.0)))
                    offsets.append(j)
                elif inside < 1 and zeros is not None and rank <= int(zeros[i]):
                    # among the exact zeros below the window: the threshold is 0 (a model whose
                    # k is at the edge of its unchanged weights; no window spans both sides)
                    per_model.append((0, rank, Fraction(0), (0.0, 0.0)))
                else:
                    per_model.append(None)
            acc["result"][key] = per_model
            if votes is not None and votes.known and len(offsets) == len(per_model):
                acc["counted"][key] = votes.total(offsets, [m[3][0] for m in per_model])
            return
        for i, h in enumerate(hist):
            if rank == 0:  # keep everything
                above = S.square_norm_above(h, -1) if self.params.needs_norms else Fraction(0)
                per_model.append((-1, 0, above, (0.0, float(above))))
                continue
            b, r = S.locate(h[0], rank)
            above = S.square_norm_above(h, b) if self.params.needs_norms else Fraction(0)
            final = None
            if window is not None and lows[i] <= b < lows[i] + WINDOW_BINS:
                offset = (b - lows[i]) * S.NBINS
                final = _final(window[i][offset:offset + S.NBINS], b, r, above, self.params.needs_norms)
            per_model.append((b, r, above, final))
        acc["result"][key] = per_model


class _HighMissPass(_HistogramPass):
    """Pass A2, only after a window missed: the full top-16-bit histogram locates the threshold
    bin of the models pass A could not place (pass B then counts its low bits)."""

    name = "ties_high_miss"
    label = "top-k threshold: recount"

    def start(self, state: dict) -> dict:
        return {"hist": {}, "numel": {}, "result": {}, "high": state[_HighPass.name]}

    def skip(self, state: dict) -> bool:
        return all(m is not None for per_model in state[_HighPass.name].values() for m in per_model)

    def map(self, data: BlockData, state: dict):
        return ops(data).ties_hist_high(data.inputs, data.base).cpu(), data.base.numel()

    def group_key(self):
        return (self.name,)

    def map_group(self, datas, passes, states):
        return [self.map(datas[0], states[0])] * len(datas)

    def reduce(self, acc: dict, partial, block: str) -> dict:
        hist, numel = partial
        key = _key(self.params, block)
        acc["numel"][key] = acc["numel"].get(key, 0) + numel
        return super().reduce(acc, hist, block)

    def finish(self, acc: dict, state: dict) -> None:
        for key in list(acc["hist"]):
            self._compact(acc, key)
        state[_HighPass.name] = acc["high"]

    def _compact(self, acc: dict, key: str) -> None:
        hist = acc["hist"].pop(key)
        own = self.params.for_block(key)
        rank = S.keep_rank(acc["numel"].pop(key), own.k, own.k_rule)
        located = acc["high"][key]
        for i, m in enumerate(located):
            if m is None:
                b, r = S.locate(hist[i], rank)
                located[i] = (b, r, Fraction(0), None)


def _final(lo_hist: torch.Tensor, b: int, r: int, above: Fraction, norms: bool) -> tuple[float, float]:
    """Exact threshold and trimmed squared norm from the low-bit histogram of the threshold bin."""
    low_bin, _ = S.locate(lo_hist, r)
    inside = S.square_norm_in_bin(lo_hist, b, low_bin) if norms else Fraction(0)
    return S.bits_to_float((b << 16) | low_bin), float(above + inside)


class _LowPass(_HistogramPass):
    """Pass B: inside each model's chosen top bin, a histogram of the low 16 bits -> exact v_i.
    Skipped when pass A's window already held every threshold bin."""

    name = "ties_low"
    label = "top-k threshold: low bits"

    def start(self, state: dict) -> dict:
        return {"hist": {}, "result": {}, "high": dict(state[_HighPass.name])}

    def skip(self, state: dict) -> bool:
        return all(m[3] is not None for per_model in state[_HighPass.name].values() for m in per_model)

    def map(self, data: BlockData, state: dict) -> torch.Tensor:
        """Each model's low-bit histogram of its threshold bin (the fused bin-count kernel where
        there is one, else the window counts of a window one bin wide); zero for the models
        already placed. Pass B runs after a sampled window missed, typically where a k sits at
        the edge of the exact zeros (bin 0), which the bin-count kernel counts apart."""
        return self.map_group([data], [self], [state])[0]

    def group_key(self):
        return (self.name,)

    def map_group(self, datas, passes, states):
        """A sweep's candidates: every candidate's threshold bins counted in one pass over the
        chunk (the fused kernel looks each entry's bin up once for all of them), else one call
        each."""
        data = datas[0]
        kern = ops(data)
        located = [s[_HighPass.name][_key(p.params, d.name)] for p, d, s in zip(passes, datas, states)]
        bins = [[b if final is None else 0 for b, _, _, final in per_model] for per_model in located]
        many = getattr(kern, "ties_bin_counts_many", None)
        counted = many(data.inputs, data.base, bins) if many is not None else [
            kern.ties_window_counts(data.inputs, data.base, bs, 1)[0] for bs in bins]
        out = []
        for per_model, lows in zip(located, counted):
            lows = lows.cpu()
            for i, (_, _, _, final) in enumerate(per_model):
                if final is not None:
                    lows[i].zero_()
            out.append(lows)
        return out

    def finish(self, acc: dict, state: dict) -> None:
        for key in list(acc["high"]):
            self._compact(acc, key)
        state[self.name] = acc["result"]

    def _compact(self, acc: dict, key: str) -> None:
        hist = acc["hist"].pop(key, None)
        thresholds, sq_norms = [], []
        for i, (b, r, above, final) in enumerate(acc["high"].pop(key)):
            v, sq = final if final is not None else _final(hist[i], b, r, above, self.params.needs_norms)
            thresholds.append(v)
            sq_norms.append(sq)
        acc["result"][key] = {"v": thresholds, "sq": sq_norms}


class _VotePass(GlobalPass):
    """After the thresholds: per key, the sum of the elected signs (what the merge kernel returns
    as each chunk's vote), so the merge gives entries whose elected sign is zero the exact
    model-wide majority and nothing is patched after it. Integer sums: exact in any order."""

    name = VOTES
    label = "majority sign: votes"

    def __init__(self, params: TiesParams):
        self.params = params

    def skip(self, state: dict) -> bool:
        """No election (no zero signs), or pass A counted every key's votes."""
        counted = state.get(WINDOW_VOTES, {})
        return self.params.sign == "none" or all(key in counted for key in state[_LowPass.name])

    def start(self, state: dict) -> dict:
        return dict(state.get(WINDOW_VOTES, {})) if self.params.sign != "none" and self.skip(state) else {}

    def map(self, data: BlockData, state: dict) -> int:
        trim = state[_LowPass.name][_key(self.params, data.name)]
        return ops(data).ties_votes(data.inputs, data.base, trim["v"], self.params.sign, trim["sq"])

    def group_key(self):
        return (self.name, self.params.sign)

    def map_group(self, datas, passes, states):
        """A sweep's candidates (several k): every threshold set's votes from one pass over the
        chunk (the fused kernel shares the loads and task vectors)."""
        trims = [s[_LowPass.name][_key(p.params, d.name)] for p, d, s in zip(passes, datas, states)]
        return ops(datas[0]).ties_votes_many(datas[0].inputs, datas[0].base, [t["v"] for t in trims],
                                             self.params.sign, [t["sq"] for t in trims])

    def reduce(self, acc: dict, partial: int, block: str) -> dict:
        key = _key(self.params, block)
        acc[key] = acc.get(key, 0) + partial
        return acc


class _UndecidedLog:
    """Entries whose elected sign was exactly zero although some τ̂ was not, kept compactly.

    There can be millions (bf16 task vectors cancel exactly often). Appending them to a few
    growing byte buffers, rather than keeping one small tensor per chunk alive, keeps them from
    fragmenting the heap between the large chunk buffers (which cost ~800 MB RSS on 1.1B).
    """

    def __init__(self) -> None:
        self.votes: dict[str, int] = {}
        self.runs: list[tuple[str, str, int, torch.dtype, float]] = []  # key, tensor, entries, dtype, guess
        self.index = bytearray()
        self.columns = bytearray()  # [entries, N] trimmed task vectors, row-major
        self.base = bytearray()
        self.n_models = 0

    def add(self, key: str, votes: int, guess: float, name: str, index: torch.Tensor, columns: torch.Tensor,
            base: torch.Tensor) -> None:
        self.votes[key] = self.votes.get(key, 0) + votes
        if index.numel():
            self.n_models = columns.shape[0]
            self.runs.append((key, name, index.numel(), columns.dtype, guess))
            self.index += memoryview(index.cpu().numpy()).cast("B")
            self.columns += memoryview(columns.t().contiguous().cpu().numpy()).cast("B")
            self.base += memoryview(base.cpu().numpy()).cast("B")

    def entries(self):
        """(key, tensor, flat indices, [N, m] columns, base values, sign guessed) per run, no copies."""
        n_models = self.n_models
        pos_i = pos_c = pos_b = 0
        for key, name, m, dtype, guess in self.runs:
            size = torch.empty((), dtype=dtype).element_size()
            index = torch.frombuffer(self.index, dtype=torch.int64, count=m, offset=pos_i)
            columns = torch.frombuffer(self.columns, dtype=dtype, count=m * n_models, offset=pos_c)
            base = torch.frombuffer(self.base, dtype=dtype, count=m, offset=pos_b)
            pos_i, pos_c, pos_b = pos_i + 8 * m, pos_c + size * m * n_models, pos_b + size * m
            yield key, name, index, columns.reshape(m, n_models).t(), base, guess


@register
class Ties(Method):
    name = "ties"
    summary = "trim, elect sign, disjoint merge (TIES); global top-k over the whole model by default"
    citation = ('Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"'
                ', NeurIPS 2023, arXiv:2306.01708')
    Params = TiesParams
    needs_base = True

    def work_bytes_per_element(self, n_models: int, params: TiesParams) -> int:
        return 4 * (2 * n_models + 4) + (32 if params.needs_norms else 8)

    def passes(self, params: TiesParams) -> list[GlobalPass]:
        return [_SamplePass(params), _HighPass(params), _HighMissPass(params), _LowPass(params), _VotePass(params)]

    def counts_unchanged_tensors(self, params: TiesParams) -> bool:
        return params.scope == "global"

    def merge(self, data: BlockData, params: TiesParams, state: dict):
        key = _key(params, data.name)
        trim = state[_LowPass.name][key]
        exact = state.get(VOTES)
        if exact is not None:  # the vote pass ran: zero signs take the majority itself
            return self.merge_many([data], [params], [state])[0]
        # Without it, zero signs take the model-wide majority known only after the last block:
        # guessed from the votes so far; `patches` rewrites the entries where the guess was wrong.
        running = state.setdefault(RUNNING_VOTES, {})
        guess = float(_sign(running.get(key, 0)))
        merged, votes, undecided = ops(data).ties_merge(data.inputs, data.base, trim["v"], params.sign, trim["sq"],
                                                        params.merge, params.lambda_, guess)
        out = merged.reshape(data.base.shape)
        if undecided is None:
            return out
        running[key] = running.get(key, 0) + votes
        zero = K.flat_nonzero(undecided)
        columns = K.ties_columns(data.inputs, data.base, trim["v"], zero)
        base_w = data.base.reshape(-1)[zero].to(columns.dtype)
        return out, (key, votes, guess, data.name, zero + data.flat_start, columns, base_w)

    def fuse_key(self, params: TiesParams):
        return (params.sign, params.merge)  # a sweep's k and λ share each chunk's loads and τ_i

    def merge_many(self, datas: list[BlockData], params: list[TiesParams], states: list[dict]):
        """Candidates (a sweep's k and λ; a run is one) merged from one pass over the chunk,
        each with the exact majority of its vote pass. A candidate without it (resuming a
        partial output merged before the vote pass existed) is merged alone, as it was."""
        if any(s.get(VOTES) is None for s in states):
            return [self.merge(d, p, s) for d, p, s in zip(datas, params, states)]
        data = datas[0]
        trims = [s[_LowPass.name][_key(p, data.name)] for p, s in zip(params, states)]
        majorities = [float(_sign(s[VOTES].get(_key(p, data.name), 0))) for p, s in zip(params, states)]
        merged = ops(data).ties_merge_many(data.inputs, data.base, [t["v"] for t in trims], params[0].sign,
                                           [t["sq"] for t in trims], params[0].merge, [p.lambda_ for p in params],
                                           majorities)
        return [m.reshape(data.base.shape) for m in merged]

    def start_extras(self, params: TiesParams) -> _UndecidedLog:
        return _UndecidedLog()

    def add_extra(self, log: _UndecidedLog, extra: tuple) -> _UndecidedLog:
        log.add(*extra)
        return log

    def patches(self, params: TiesParams, state: dict, log: _UndecidedLog) -> list[Patch]:
        out = []
        exact = state.get(VOTES)  # logged only by chunks an interrupted run merged without it
        for key, name, index, columns, base, guess in log.entries():
            majority = float(_sign((exact if exact is not None else log.votes).get(key, 0)))
            if majority == guess:
                continue
            sign = torch.full((columns.shape[1],), majority, dtype=columns.dtype)
            own = params.for_block(name)
            merged = K.ties_disjoint(columns, sign, own.merge)
            out.append(Patch(name, index.clone(), merged.mul_(own.lambda_).add_(base)))
        return out
