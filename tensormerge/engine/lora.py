"""PEFT adapters in, PEFT adapters out (SPEC §6).

A LoRA adapter means the update ΔW = s·B·A of each target module (s = alpha/r, or alpha/√r with
rslora), not its factors: the mean of the Bs times the mean of the As is not the mean update.
So a merge of LoRA adapters is planned here, in one of four ways (`--lora`):

- `concat` (average, task arithmetic): Σ c_i s_i B_i A_i = [c_1 s_1 B_1 … c_n s_n B_n][A_1; …; A_n],
  exact, as a LoRA of the summed ranks; the scale is folded into B and lora_alpha = r (s = 1).
- `full`: every method on the dense ΔW_i, as fine-tunes W + ΔW_i of `--base` (the adapter's base
  model); the output is that full model. Tensors no adapter targets are copied from the base.
- `svd:R`: the method on the dense ΔW_i (a zero base), then each merged ΔW re-factored to rank R
  by a truncated SVD; the discarded energy Σσ²(dropped)/Σσ² is reported per module.
- `factors`: the old behaviour, A and B merged as separate tensors (not ΔW's merge), by name only.

IA3 (and any adapter without LoRA factors) is merged element-wise as any model, against a base of
ones (IA3's identity) when the method needs one and none is given. Adapter outputs are written as
`adapter_model.safetensors` beside an `adapter_config.json` stating what was written.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch

from tensormerge import constants as C
from tensormerge.engine.plan import Block, MergePlan, _chunks
from tensormerge.engine.provenance import hub_snapshot
from tensormerge.engine.safetensors_format import element_size, load_json
from tensormerge.engine.sources import Checkpoint, TensorInfo, confined, open_checkpoint
from tensormerge.errors import BudgetError, InputError, ParameterError, short
from tensormerge.methods.base import Method
from tensormerge.sizes import format_size

LINEAR = ("average", "task_arithmetic")
MODES = ("concat", "full", "svd:R", "factors")
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Module:
    """One target module of one adapter: its factor names, rank, dims and scale s."""

    path: str  # the module in the base model, e.g. model.layers.0.self_attn.q_proj
    a: str
    b: str
    r: int
    n_in: int
    n_out: int
    scale: float


@dataclass
class Adapter:
    ck: Checkpoint
    config: dict
    modules: dict[str, Module] = field(default_factory=dict)  # in file order

    @property
    def kind(self) -> str:
        return str(self.config.get("peft_type", "")).upper()


def parse_mode(text: str | None) -> tuple[str | None, int]:
    """`--lora` as (mode, rank); None when not given."""
    if text is None or text == "":
        return None, 0
    t = text.strip().lower()
    if t in ("concat", "full", "factors"):
        return t, 0
    m = re.fullmatch(r"svd:(\d+)", t)
    if m and int(m.group(1)) > 0:
        return "svd", int(m.group(1))
    raise ParameterError(f"--lora: {short(text)} is not one of concat, full, svd:R (R a positive rank), factors")


def read_config(ck: Checkpoint) -> dict | None:
    """The adapter_config.json beside an adapter's weights, or None for a model."""
    if not ck.config_dir or not any(os.path.basename(f) in (C.ADAPTER_SAFE, C.ADAPTER_BIN) for f in ck.files):
        return None
    path = os.path.join(ck.config_dir, CONFIG)
    if not os.path.isfile(path):
        raise InputError(f"{ck.config_dir}: a PEFT adapter without {CONFIG}")
    path = confined(path, ck.config_dir, CONFIG)
    try:
        if os.path.getsize(path) > C.MAX_HEADER_BYTES:
            raise InputError(f"{path}: larger than {C.MAX_HEADER_BYTES} bytes")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.__class__.__name__})") from None
    cfg = load_json(path, raw, CONFIG)
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: not a JSON object")
    return cfg


def _pattern(patterns: dict, path: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", path):
            return patterns[key]
    return default


def read_adapter(ck: Checkpoint, cfg: dict) -> Adapter:
    ad = Adapter(ck, cfg)
    if ad.kind == "IA3":
        return ad
    if ad.kind != "LORA":  # LoHa, LoKr, ...: products of factors too, which element-wise merging would break
        raise InputError(f"{ck.spec}: PEFT type {ad.kind or '(none)'!r}: merging supports LORA and IA3 adapters")
    where = os.path.join(ck.config_dir or ck.root, CONFIG)
    for key in ("lora_bias", "use_dora"):
        if cfg.get(key):
            raise InputError(f"{where}: {key}=true is not supported for merging (only plain LoRA)")
    pairs: dict[str, dict[str, str]] = {}
    for name in ck.tensors:
        m = _FACTOR.match(name)
        if not m or not name.startswith(PREFIX):
            raise InputError(f"{ck.spec}: tensor {name!r} is not a LoRA factor (lora_A/lora_B); modules_to_save, "
                             "biases and embedding adapters are not supported for merging")
        pairs.setdefault(m.group("module")[len(PREFIX):], {})[m.group("which")] = name
    for path, p in pairs.items():
        if set(p) != {"A", "B"}:
            raise InputError(f"{ck.spec}: module {path!r} has lora_{''.join(p)} but not its pair")
        a, b = ck.tensors[p["A"]], ck.tensors[p["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or not a.is_float or not b.is_float:
            raise InputError(f"{ck.spec}: module {path!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are "
                             "not the factors of a linear layer's update")
        r = a.shape[0]
        r_cfg = _pattern(cfg.get("rank_pattern") or {}, path, cfg.get("r"))
        if r_cfg != r:
            raise InputError(f"{where}: module {path!r} has rank {r} in the weights but {r_cfg} in the config")
        alpha = _pattern(cfg.get("alpha_pattern") or {}, path, cfg.get("lora_alpha", 8))
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise InputError(f"{where}: lora_alpha {alpha!r} is not a number")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        ad.modules[path] = Module(path, p["A"], p["B"], r, a.shape[1], b.shape[0], float(scale))
    if not ad.modules:
        raise InputError(f"{ck.spec}: a LoRA adapter without lora_A/lora_B tensors")
    return ad


def detect(inputs: list[Checkpoint]) -> list[Adapter] | None:
    """The inputs as adapters (all of one PEFT type and one base model), or None for models."""
    cfgs = [read_config(ck) for ck in inputs]
    if all(c is None for c in cfgs):
        return None
    if any(c is None for c in cfgs):
        which = ", ".join(ck.spec for ck, c in zip(inputs, cfgs) if c is None)
        raise InputError(f"inputs mix PEFT adapters and models ({which} not an adapter); merge adapters with adapters")
    kinds = {str(c.get("peft_type", "")).upper() for c in cfgs}
    if len(kinds) > 1:
        raise InputError(f"inputs are adapters of different PEFT types ({', '.join(sorted(kinds))})")
    fans = {bool(c.get("fan_in_fan_out")) for c in cfgs}
    if len(fans) > 1:  # their updates are stored transposed to one another: concat or factors would mix them
        which = ", ".join(f"{ck.spec}: {str(bool(c.get('fan_in_fan_out'))).lower()}" for ck, c in zip(inputs, cfgs))
        raise InputError(f"inputs are adapters with different fan_in_fan_out ({which})")
    bases = {c.get("base_model_name_or_path") for c in cfgs} - {None, ""}
    if len(bases) > 1 and len({_base_identity(b) for b in bases}) > 1:
        raise InputError(f"inputs are adapters of different base models ({', '.join(sorted(map(str, bases)))})")
    return [read_adapter(ck, c) for ck, c in zip(inputs, cfgs)]


def _base_identity(spec) -> str:
    """Which weights a base named in adapter_config.json holds: one model saved at two local
    paths is one base; a name that is no local model directory is only its name."""
    if not isinstance(spec, str) or not os.path.isdir(spec):
        return f"name:{spec}"
    try:
        ck = open_checkpoint(spec)
    except InputError:
        return f"name:{spec}"
    try:
        return ck.identity()
    finally:
        ck.close()


# ------------------------------------------------------------------ virtual checkpoints
class Virtual(Checkpoint):
    """Tensors computed on read (ΔW of an adapter, a fine-tune W + ΔW, zeros, ones): the engine
    reads them by row ranges like any checkpoint."""

    def __init__(self, spec: str, files: list[str], tensors: dict[str, TensorInfo], reader, config_dir=None):
        super().__init__(spec, os.path.dirname(files[0]) if files else "", files)
        self.tensors = tensors
        self._reader = reader
        self.config_dir = config_dir

    def read(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        info = self.tensors[name]
        row_end = info.rows if row_end is None else row_end
        return self._reader(name, row_start, row_end).to(info.dtype).contiguous()


def filled(like: Checkpoint, value: float, spec: str) -> Virtual:
    """A checkpoint with `like`'s names, shapes and dtypes, every element `value`."""
    def read(name, r0, r1):
        info = like.tensors[name]
        return torch.full((r1 - r0,) + info.shape[1:] if info.shape else (), value, dtype=info.dtype)
    return Virtual(spec, [], dict(like.tensors), read)


def delta_rows(ad: Adapter, m: Module, r0: int, r1: int, transpose: bool = False) -> torch.Tensor:
    """Rows [r0, r1) of ΔW = s·B·A in float64 (of ΔWᵀ for a Conv1D layer, fan_in_fan_out)."""
    a = ad.ck.read(m.a).double()
    if transpose:
        return (a[:, r0:r1].t() @ ad.ck.read(m.b).double().t()) * m.scale
    return (ad.ck.read(m.b, r0, r1).double() @ a) * m.scale


# ------------------------------------------------------------------ the plan
class LoraPlan:
    """What a merge of adapters reads, merges and writes; built before any tensor byte is read."""

    def __init__(self, adapters: list[Adapter], mode: str | None, rank: int, method, params, base: Checkpoint | None):
        self.adapters = adapters
        self.method = method
        self.params = params
        self.user_base = base
        self.kind = adapters[0].kind
        self.rank = rank
        self.notes: dict[str, dict] = {}  # per output module: discarded energy (svd)
        self.dense: Checkpoint | None = None  # svd: the first stage's merged updates
        self.mode = self._choose(mode)
        self.modules = self._modules() if self.kind == "LORA" else {}

    # -------------------------------------------------------------- choices
    def _choose(self, mode: str | None) -> str:
        name = self.method.name
        if self.kind != "LORA":
            if mode is not None:
                raise ParameterError(f"--lora {mode}: the inputs are {self.kind or 'non-LoRA'} adapters, not LoRA")
            return "elementwise"
        if mode is None:
            if name in LINEAR:
                return "concat"
            raise ParameterError(f"method {name!r} on LoRA adapters acts on the dense update ΔW = s·B·A: choose "
                                 "--lora svd:R (a LoRA of rank R) or --lora full (a full model; needs --base)")
        if mode == "concat" and name not in LINEAR:
            raise ParameterError(f"--lora concat is exact only for linear methods ({', '.join(LINEAR)}); "
                                 f"{name!r} needs --lora svd:R or --lora full")
        if mode == "full" and self.user_base is None:
            raise ParameterError("--lora full needs --base: the adapters' base model")
        if mode == "factors":
            print("warning: --lora factors merges lora_A and lora_B as separate tensors; the result is not the merge "
                  "of the updates ΔW = s·B·A (use concat, svd:R or full for that)", file=sys.stderr)
        return mode

    def _modules(self) -> dict[str, list[tuple[int, Module]]]:
        """Every target module (first appearance order), with (adapter index, module) per adapter."""
        out: dict[str, list[tuple[int, Module]]] = {}
        for i, ad in enumerate(self.adapters):
            for path, m in ad.modules.items():
                out.setdefault(path, []).append((i, m))
        for path, ms in out.items():
            dims = {(m.n_out, m.n_in) for _, m in ms}
            if len(dims) > 1:
                shown = ", ".join(f"{self.adapters[i].ck.spec}: [{m.n_out}, {m.n_in}]" for i, m in ms)
                raise InputError(f"module {path!r} has different shapes in the adapters ({shown})")
        if self.mode == "factors":
            ranks = {(m.r, m.scale) for ms in out.values() for _, m in ms}
            names = [set(ad.ck.tensors) for ad in self.adapters]
            if len(ranks) > 1 or any(n != names[0] for n in names):
                raise InputError("--lora factors needs adapters of equal ranks, alphas and target modules "
                                 "(use concat, svd:R or full)")
        if self.mode == "svd":
            for path, ms in out.items():
                n_out, n_in = ms[0][1].n_out, ms[0][1].n_in
                if self.rank > min(n_out, n_in):
                    raise ParameterError(f"--lora svd:{self.rank}: module {path!r} is [{n_out}, {n_in}]; the rank "
                                         f"cannot exceed {min(n_out, n_in)}")
        return out

    @property
    def adapter_output(self) -> bool:
        return self.mode != "full"

    # -------------------------------------------------------------- inputs the engine merges
    def engine_inputs(self) -> tuple[list[Checkpoint], Checkpoint | None]:
        """The checkpoints the method merges element-wise (concat merges nothing element-wise)."""
        ads = [ad.ck for ad in self.adapters]
        needs = self.method.requires_base(self.params)
        if self.mode == "elementwise":
            base = self.user_base
            if self.kind == "IA3" and (base is None or read_config(base) is None):
                # IA3 scales activations: its vectors' origin is ones, whatever model (--base) they adapt
                base = filled(ads[0], 1.0, "ones (IA3 identity)") if needs else None
            return ads, base
        if self.mode == "factors":
            base = self.user_base
            if base is None or read_config(base) is None:  # a LoRA's origin is the zero update
                base = filled(ads[0], 0.0, "zeros") if needs else None
            return ads, base
        if self.mode == "full":
            return [self._full(i) for i in range(len(self.adapters))], self.user_base
        if self.mode == "svd":
            deltas = [self._delta(i) for i in range(len(self.adapters))]
            return deltas, (filled(deltas[0], 0.0, "zero update") if needs else None)
        return ads, None  # concat: a LoRA's origin is the zero update; --base is not read

    def option(self) -> str | None:
        """The `--lora` value that remakes this merge (the recipe's), None where none is taken."""
        return {"svd": f"svd:{self.rank}", "elementwise": None}.get(self.mode, self.mode)

    def user_checkpoints(self, plan: MergePlan) -> tuple[list[Checkpoint], Checkpoint | None]:
        """The adapters and the --base the user named, as the recipe and provenance name them
        (not the virtual W + ΔW, ΔW, zeros or ones the engine reads); the base only where its
        values are read (full, or an adapter base of factors)."""
        return [ad.ck for ad in self.adapters], (self.user_base if plan.base is self.user_base else None)

    def warnings(self, plan: MergePlan) -> list[str]:
        """A --base the merge never reads, or one that is not the base the adapters record."""
        base = self.user_base
        if base is None:
            return []
        if self.user_checkpoints(plan)[1] is None:
            how = (f"LoRA adapters with --lora {self.mode} never reads the base's values (a LoRA's origin is the "
                   f"zero update)" if self.kind == "LORA" else f"{self.kind} adapters never reads the base's values")
            return [f"--base {base.spec}: merging {how}; the output is an adapter"]
        out = []
        for recorded in sorted({str(ad.config.get("base_model_name_or_path") or "") for ad in self.adapters} - {""}):
            if os.path.isdir(recorded):  # a local model: compared by its weights, wherever it lies
                differs = _base_identity(recorded) != base.identity()
            else:  # a hub name: compared with the repository of a cache snapshot, where --base is one
                snap = hub_snapshot(base)
                differs = snap is not None and snap["repo"].lower() != recorded.lower()
            if differs:
                out.append(f"--base {base.spec}: the adapters record another base model ({recorded!r}), so the "
                           f"output is their updates applied to a model they were not trained on")
        return out

    def stats_hint(self) -> str:
        """Why a statistics store keyed by LoRA factors does not bind to the dense updates."""
        if self.mode not in ("full", "svd"):
            return ""
        return (" (with --lora full or svd:R statistics weight the dense update of each module, keyed by the "
                "base model's weight names such as 'model.layers.0.self_attn.q_proj.weight': compute them on "
                "the base with each adapter merged in)")

    def _targets(self) -> dict[str, tuple[str, bool]]:
        """Module path -> (the base's weight name, whether it is stored [in, out] (Conv1D))."""
        base = self.user_base
        out = {}
        for path, ms in self.modules.items():
            name = f"{path}.weight"
            n_out, n_in = ms[0][1].n_out, ms[0][1].n_in
            fan = any(self.adapters[i].config.get("fan_in_fan_out") for i, _ in ms)
            if base is not None and self.mode == "full":
                info = base.tensors.get(name)
                if info is None:
                    raise InputError(f"{base.spec}: lacks {name!r}, which the adapters' module {path!r} updates "
                                     "(is --base the adapters' base model?)")
                want = (n_in, n_out) if fan else (n_out, n_in)
                if info.shape != want:
                    raise InputError(f"{base.spec}: {name!r} is {list(info.shape)} but the adapters' update is "
                                     f"{list(want)} (is --base the adapters' base model?)")
            out[path] = (name, fan)
        return out

    def _full(self, i: int) -> Virtual:
        ad, base = self.adapters[i], self.user_base
        targets = {name: (path, fan) for path, (name, fan) in self._targets().items() if path in ad.modules}
        tensors = dict(base.tensors)
        for name, _ in targets.items():
            info = base.tensors[name]
            tensors[name] = TensorInfo(name, info.dtype if element_size(info.dtype) >= 4 else torch.float32, info.shape)

        def read(name, r0, r1):
            if name not in targets:
                return base.read(name, r0, r1)
            path, fan = targets[name]
            return base.read(name, r0, r1).double() + delta_rows(ad, ad.modules[path], r0, r1, fan)
        v = Virtual(f"{ad.ck.spec} (+ {base.spec})", ad.ck.files + base.files, tensors, read, base.config_dir)
        v.aliases = dict(base.aliases)
        return v

    def _delta(self, i: int) -> Virtual:
        ad = self.adapters[i]
        # the dense updates are merged, written and re-factored in float32 at least
        dt = _float_dtype([m for ms in self.modules.values() for _, m in ms], self.adapters)
        dt = dt if element_size(dt) >= 4 else torch.float32
        tensors = {f"{p}.weight": TensorInfo(f"{p}.weight", dt, (ms[0][1].n_out, ms[0][1].n_in))
                   for p, ms in self.modules.items()}

        def read(name, r0, r1):
            path = name[: -len(".weight")]
            m = ad.modules.get(path)
            if m is None:  # a module this adapter does not target: its update is zero
                return torch.zeros((r1 - r0, tensors[name].shape[1]), dtype=torch.float64)
            return delta_rows(ad, m, r0, r1)
        return Virtual(f"ΔW of {ad.ck.spec}", ad.ck.files, tensors, read)

    def full_targets(self) -> set[str]:
        return {name for name, _ in self._targets().values()}

    # -------------------------------------------------------------- output: concat
    def concat_layout(self, dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple[int, ...], object, int]]:
        """(name, dtype, shape, produce(r0, r1), bytes read per row) of each output tensor."""
        coef = self._coefficients()
        out = []
        for path, ms in self.modules.items():
            ms = [(i, m) for i, m in ms if coef[i] != 0.0] or ms[:1]
            r = sum(m.r for _, m in ms)
            n_out, n_in = ms[0][1].n_out, ms[0][1].n_in
            dt = dtype or _float_dtype([m for _, m in ms], self.adapters)
            zero = all(coef[i] == 0.0 for i, _ in ms)
            out.append((f"{PREFIX}{path}.lora_A.weight", dt, (r, n_in), self._concat_a(ms), n_in * 4))
            out.append((f"{PREFIX}{path}.lora_B.weight", dt, (n_out, r), self._concat_b(ms, coef, zero), r * 8))
        return out

    def _coefficients(self) -> list[float]:
        return [float(c) for c in self.params.resolved(len(self.adapters))]

    def _concat_a(self, ms):
        ads = self.adapters

        def produce(r0, r1):
            parts, at = [], 0
            for i, m in ms:
                lo, hi = max(r0 - at, 0), min(r1 - at, m.r)
                if lo < hi:
                    parts.append(ads[i].ck.read(m.a, lo, hi).double())
                at += m.r
            return torch.cat(parts, 0)
        return produce

    def _concat_b(self, ms, coef, zero):
        ads = self.adapters

        def produce(r0, r1):
            return torch.cat([ads[i].ck.read(m.b, r0, r1).double() * (0.0 if zero else coef[i] * m.scale)
                              for i, m in ms], 1)
        return produce

    # -------------------------------------------------------------- output: svd
    def svd_layout(self, dense: Checkpoint, dtype: torch.dtype | None):
        """A and B of rank R from each merged dense ΔW (read whole, once for both factors)."""
        cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dense = dense
        out = []
        for path, ms in self.modules.items():
            name = f"{path}.weight"
            n_out, n_in = dense.tensors[name].shape
            dt = dtype or _float_dtype([m for _, m in ms], self.adapters)

            def factors(name=name, path=path):
                if name not in cache:
                    cache[name] = self._svd(path, dense.read(name).double())
                return cache[name]

            def produce_a(r0, r1, factors=factors):
                return factors()[0][r0:r1]

            def produce_b(r0, r1, factors=factors, name=name):
                b = cache.pop(name)[1] if name in cache else factors()[1]
                return b[r0:r1]
            out.append((f"{PREFIX}{path}.lora_A.weight", dt, (self.rank, n_in), produce_a, 0))
            out.append((f"{PREFIX}{path}.lora_B.weight", dt, (n_out, self.rank), produce_b, 0))
        return out

    def svd_fixed_bytes(self, path: str) -> int:
        m = self.modules[path][0][1]
        k = min(m.n_out, m.n_in)
        return 8 * (2 * m.n_out * m.n_in + m.n_out * k + k * m.n_in + k)

    def _svd(self, path: str, dw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW ≈ B A with B = U√S, A = √S Vᵀ (balanced, so neither factor is large in half precision)."""
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        total = float((s * s).sum())
        kept = s[: self.rank]
        root = kept.sqrt()
        discarded = float((s[self.rank:] ** 2).sum())
        self.notes[path] = {"rank": self.rank, "discarded_energy": discarded / total if total > 0 else 0.0}
        return root[:, None] * vh[: self.rank], u[:, : self.rank] * root[None, :]

    # -------------------------------------------------------------- adapter_config.json
    def output_config(self) -> dict:
        """The first adapter's config, made true of what is written."""
        cfg = json.loads(json.dumps(self.adapters[0].config))
        if self.mode in ("elementwise", "factors"):
            return cfg
        if self.mode == "concat":
            coef = self._coefficients()
            ranks = {p: sum(m.r for i, m in ms if coef[i] != 0.0) or ms[0][1].r for p, ms in self.modules.items()}
        else:
            ranks = {p: self.rank for p in self.modules}
        r = Counter(ranks.values()).most_common(1)[0][0] if ranks else cfg.get("r", 8)
        pattern = {p: v for p, v in ranks.items() if v != r}
        cfg.update(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False,
                   target_modules=list(self.modules))
        # a module path's dots are regex wildcards to PEFT's pattern lookup; anchored by (.*\.)?path$ they
        # still match only that module (every other module path differs in a non-dot character)
        for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):  # target_modules is exact now
            cfg.pop(key, None)
        return cfg

    def report(self) -> dict:
        out = {"kind": self.kind.lower(), "mode": self.mode}
        if self.mode == "svd":
            for p in self.modules:
                if p not in self.notes and getattr(self, "dense", None) is not None:  # factors a resumed run kept
                    self._svd(p, self.dense.read(f"{p}.weight").double())
            out["rank"] = self.rank
            out["modules"] = {p: self.notes[p]["discarded_energy"] for p in self.modules if p in self.notes}
        return out


def _float_dtype(mods: list[Module], adapters: list[Adapter]) -> torch.dtype:
    """The factors' dtype when they share one (the output's, unless --dtype says otherwise), else float32."""
    dts = {ad.ck.tensors[n].dtype for ad in adapters for m in mods if m in ad.modules.values() for n in (m.a, m.b)}
    return dts.pop() if len(dts) == 1 else torch.float32


# ------------------------------------------------------------------ building the engine's plan
class _Produced(Method):
    """Stands for the user's method in a plan whose blocks are computed by this module (concat,
    the svd re-factoring): it names the method and parameters and has no passes or patches."""

    def __init__(self, method: Method):
        self.name = method.name
        self.summary = method.summary
        self.Params = method.Params

    def merge(self, data, params, state):  # pragma: no cover - produced blocks are not merged
        raise AssertionError("a produced block is not merged")


def _produced_plan(lp: LoraPlan, layout, inputs: list[Checkpoint], max_memory: int, fixed=None) -> MergePlan:
    blocks = []
    for name, dt, shape, produce, read_per_row in layout:
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        b = Block(name, [name], shape, dt, "derived", [], read_per_row, 8 * row)
        b.produce = produce
        b.max_piece_row_bytes = 8 * row
        b.fixed_bytes = fixed(name) if fixed else 0
        b.splits = fixed is None
        whole = b.chunk_bytes(b.rows)
        if whole <= max_memory or not b.splits:
            if whole > max_memory:
                raise BudgetError(f"block {name!r} is re-factored whole and needs {format_size(whole)}; "
                                  f"--max-memory is {format_size(max_memory)}")
            b.chunks = [(0, b.rows)]
        else:
            per = max(1, (max_memory - b.fixed_bytes) // max(b.chunk_bytes(1) - b.fixed_bytes, 1))
            b.chunks = [(r, min(r + per, b.rows)) for r in range(0, b.rows, per)]
        blocks.append(b)
    plan = MergePlan(_Produced(lp.method), lp.params, inputs, None, blocks, max_memory, [])
    return plan


def finish_plan(lp: LoraPlan, plan: MergePlan) -> MergePlan:
    """The output's file name and adapter_config.json (adapters), or the base's copies (full)."""
    plan.lora = lp
    if lp.adapter_output:
        plan.weights_name = C.ADAPTER_SAFE
        plan.json_files = {CONFIG: lp.output_config()}
        plan.side_dir = lp.adapters[0].ck.config_dir
    else:
        targets = lp.full_targets()
        # tensors no adapter updates are the base's in every fine-tune W + ΔW_i: their merge is the
        # base (τ_i = 0), copied. TIES' global top-k merges them all the same: their zeros count
        # there (it keeps k of every entry of the model), so "full" stays the merge of those
        # fine-tunes
        if not plan.method.counts_unchanged_tensors(plan.params):
            for b in plan.blocks:
                if b.kind == "merge" and b.name not in targets:
                    b.kind, b.stats, b.fallback, b.base_stats, b.work_bytes_per_row = "copy", {}, None, {}, 0
        _count_virtual_reads(plan, targets)
    return plan


def _count_virtual_reads(plan: MergePlan, names: set[str]) -> None:
    """A read of W + ΔW_i (or ΔW_i) makes float64 rows of ΔW and of the sum before handing back the
    row chunk: held within --max-memory like the reads (which are counted twice, double-buffered)."""
    for b in plan.blocks:
        if b.kind == "merge" and b.name in names:
            b.read_bytes_per_row += 8 * (b.numel // b.rows if b.rows else 0)
            b.chunks = _chunks(plan.method, b, plan.max_memory)


def build(lp: LoraPlan, build_plan, inputs, base, max_memory: int, dtype, stats) -> MergePlan:
    """The engine's plan for a merge of adapters (for svd: its first stage, the dense merge)."""
    if lp.mode == "concat":
        plan = _produced_plan(lp, lp.concat_layout(dtype), [ad.ck for ad in lp.adapters], max_memory)
        return finish_plan(lp, plan)
    plan = build_plan(lp.method, lp.params, inputs, base, max_memory, dtype, stats)
    if lp.mode == "svd":
        svd_plan(lp, inputs[0], max_memory, dtype)  # the second stage's budget, checked before any work
        _count_virtual_reads(plan, {b.name for b in plan.blocks})
        plan.lora = lp
        return plan
    return finish_plan(lp, plan)


def svd_plan(lp: LoraPlan, dense: Checkpoint, max_memory: int, dtype) -> MergePlan:
    """The second stage of svd:R: each merged ΔW of the first, re-factored."""
    fixed = {f"{PREFIX}{p}.lora_{w}.weight": lp.svd_fixed_bytes(p) for p in lp.modules for w in "AB"}
    plan = _produced_plan(lp, lp.svd_layout(dense, dtype), [ad.ck for ad in lp.adapters], max_memory, fixed.get)
    return finish_plan(lp, plan)


def dense_dir(output: str) -> str:
    """Where svd:R's first stage writes the merged dense updates; removed when the output is done."""
    return os.path.abspath(output) + ".lora-dense"
