"""What a merge is, as the engine sees it: the spec (checked), its plan opened from the files,
and how the runner writes. The API, the CLI and every dask worker build a plan through here,
so a worker's view of a merge is the client's (and the engine never imports the API)."""

from __future__ import annotations

import os
import re
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any
import dataclasses

import torch

from tensormerge import constants as C
from tensormerge.engine import direct, lora
from tensormerge.engine.plan import MergePlan, build_plan
from tensormerge.engine.run import RunOptions
from tensormerge.engine.sources import open_checkpoint
from tensormerge.errors import InputError, ParameterError, short
from tensormerge.methods import get_method
from tensormerge.methods.rules import plain
from tensormerge.sizes import parse_size


@dataclass
class MergeSpec:
    """What to merge. Paths may be str or os.PathLike; where a list of paths is wanted, a single
    path is one path (never split on commas: a path may hold one)."""

    method: str
    inputs: list[str]
    output: str | None = None
    base: str | None = None
    stats: list[str] = field(default_factory=list)
    base_stats: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    max_memory: int | str = C.DEFAULT_MAX_MEMORY
    dtype: str = "auto"
    shard_size: int | str = C.DEFAULT_SHARD_SIZE
    device: str = "cpu"
    kernels: str = "auto"
    overwrite: bool = False
    resume: bool = False
    workers: int | None = None
    scheduler: str | None = None
    report: str | None = None
    quiet: bool = False
    lora: str | None = None  # merging LoRA adapters: concat | full | svd:R | factors (engine.lora)


def _path(value, what: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ParameterError(f"{what}: expected a path, got {type(value).__name__} {short(value)}")
    return value


def _paths(value, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [_path(value, what)]
    if not isinstance(value, (list, tuple)):
        raise ParameterError(f"{what}: expected a list of paths, got {type(value).__name__} {short(value)}")
    return [_path(v, what, optional=False) for v in value]


def _typed(value, types: type | tuple, what: str, expected: str):
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        # a bool is an int to Python, not to us
        raise ParameterError(f"{what}: expected {expected}, got {short(value)}")
    if not isinstance(value, types):
        raise ParameterError(f"{what}: expected {expected}, got {type(value).__name__} {short(value)}")
    return value


# dask's addresses: [protocol://]host:port
_SCHEDULER = re.compile(r"(?:(?:tcp|tls|ucx|ws|wss)://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")


def checked(spec: MergeSpec) -> MergeSpec:
    """The spec with paths as str, refused in one line if any field has the wrong type or form,
    before anything is opened: the CLI gives strings, but the Python API takes what it is given."""
    if not isinstance(spec, MergeSpec):
        raise ParameterError(f"expected a MergeSpec, got {type(spec).__name__}")
    _typed(spec.method, str, "--method", "a method name")
    params = {} if spec.params is None else _typed(spec.params, dict, "params (-p)", "a dict of KEY: VALUE")
    bad = next((k for k in params if not isinstance(k, str)), None)
    if bad is not None:
        raise ParameterError(f"params (-p): key {short(bad)} is not a string")
    for name in ("max_memory", "shard_size"):
        option = "--" + name.replace("_", "-")
        parse_size(_typed(getattr(spec, name), (int, float, str), option, "a size such as 4GiB"), option)
    for name in ("dtype", "kernels"):
        value = getattr(spec, name)
        _typed("auto" if value is None and name == "kernels" else value, str, f"--{name}", "a string")
    device = spec.device if spec.device is not None else "cpu"
    if isinstance(device, torch.device):
        device = str(device)
    _typed(device, str, "--device", "cpu, cuda or cuda:N")
    for name in ("overwrite", "resume", "quiet"):
        if not isinstance(getattr(spec, name), bool):
            raise ParameterError(f"--{name}: expected True or False, got {short(getattr(spec, name))}")
    if spec.workers is not None:
        _typed(spec.workers, int, "--workers", "a number of worker processes")
    if spec.scheduler is not None:
        _typed(spec.scheduler, str, "--scheduler", "an address tcp://HOST:PORT")
        m = _SCHEDULER.fullmatch(spec.scheduler)
        if not m or not 0 < int(m.group(2)) < 65536:
            raise ParameterError(f"--scheduler: {short(spec.scheduler)} is not a dask scheduler address "
                                 "(tcp://HOST:PORT)")
    if spec.lora is not None:
        mode, _ = lora.parse_mode(_typed(spec.lora, str, "--lora", "concat, full, svd:R or factors"))
        if mode == "svd" and (spec.workers is not None or spec.scheduler):
            raise ParameterError("--lora svd:R runs locally (no --workers or --scheduler)")
    direct.policy()  # TENSORMERGE_IO, refused here rather than at the first read
    return dataclasses.replace(
        spec, inputs=_paths(spec.inputs, "--inputs"), stats=_paths(spec.stats, "--stats"),
        output=_path(spec.output, "--output"), base=_path(spec.base, "--base"),
        base_stats=_path(spec.base_stats, "--base-stats"), report=_path(spec.report, "--report"),
        params=dict(params), device=device, kernels=spec.kernels or "auto")


def _validate(spec: MergeSpec) -> None:
    if not spec.inputs:
        raise ParameterError("--inputs: at least one model is needed")
    if spec.dtype not in C.DTYPE_CHOICES:
        raise ParameterError(f"--dtype: {short(spec.dtype)} is not one of {', '.join(C.DTYPE_CHOICES)}")
    from tensormerge.kernels.dispatch import check_device, select

    dev = check_device(spec.device or "cpu")
    select(spec.kernels or "auto", dev)  # refuses --kernels triton where it cannot run, before any work


def open_plan(spec: MergeSpec, stack: ExitStack, opened: dict | None = None) -> MergePlan:
    """Resolve inputs, parse parameters and build the plan; checkpoints close with `stack`.
    `opened`: checkpoints and statistics already opened by path (a sweep's candidates share them)."""
    spec = checked(spec)
    _validate(spec)
    method = get_method(spec.method)
    params = method.Params.from_strings(method.name, spec.params, len(spec.inputs))

    def checkpoint(path: str):
        if opened is not None and ("ck", path) in opened:
            return opened[("ck", path)]
        ck = open_checkpoint(path)
        stack.callback(ck.close)
        if opened is not None:
            opened[("ck", path)] = ck
        return ck

    inputs = [checkpoint(s) for s in spec.inputs]
    base = checkpoint(spec.base) if spec.base else None
    mode, rank = lora.parse_mode(spec.lora)
    adapters = lora.detect(inputs)
    if adapters is None and mode is not None:
        raise ParameterError(f"--lora {spec.lora}: the inputs are not PEFT adapters")
    lp = lora.LoraPlan(adapters, mode, rank, method, params, base) if adapters else None
    if lp is not None:
        inputs, base = lp.engine_inputs()
    try:
        key = ("stats", tuple(spec.stats), spec.base_stats)
        if lp is None and opened is not None and key in opened and method.uses_stats and (
                not spec.base_stats or method.uses_base_stats):
            stats = opened[key]
        else:
            stats = _bind_stats(spec, method, params, inputs, base)
            if lp is None and opened is not None and stats is not None:
                opened[key] = stats
    except InputError as e:
        if lp is None or "names no tensor" not in str(e):
            raise
        raise InputError(str(e) + lp.stats_hint()) from None
    extras = {}
    for role, path in method.extra_checkpoints(params).items():
        extras[role] = checkpoint(path)
    max_memory, dtype = parse_size(spec.max_memory, "--max-memory"), C.DTYPE_CHOICES[spec.dtype]
    if lp is not None:
        if extras:
            raise ParameterError(f"method {method.name!r} with extra models cannot merge PEFT adapters")
        return lora.build(lp, build_plan, inputs, base, max_memory, dtype, stats)
    return build_plan(method, params, inputs, base, max_memory, dtype, stats, extras)


def _bind_stats(spec: MergeSpec, method, params, inputs, base):
    """Statistics stores for methods that use them; a clear error for those that do not."""
    if spec.stats and not method.uses_stats:
        raise ParameterError(f"--stats: method {method.name!r} uses no statistics")
    if spec.base_stats and not method.uses_base_stats:
        raise ParameterError(f"--base-stats: method {method.name!r} uses no statistics of the base")
    if not spec.stats:
        if method.requires_stats(params):
            raise ParameterError(f"method {method.name!r} needs --stats (one statistics store per input)")
        if spec.base_stats:
            raise ParameterError("--base-stats needs --stats for the inputs")
        return None
    from tensormerge.stats.bind import bind_stats

    return bind_stats(spec.stats, spec.base_stats, inputs, base, method.name)


def run_options(spec: MergeSpec, quiet: bool | None = None) -> RunOptions:
    """How the runner writes (shared by the client and, quiet, by dask workers)."""
    settings = {k: v for k, v in asdict(spec).items()
                if k not in ("report", "quiet", "overwrite", "resume", "workers", "scheduler")}
    method = get_method(spec.method)
    typed = method.Params.typed(method.name, spec.params)  # `-p` text as numbers, like YAML's
    settings["params"] = {k: plain(v) for k, v in typed.items()}  # per-tensor rules in their YAML form
    return RunOptions(os.path.abspath(spec.output), parse_size(spec.shard_size, "--shard-size"),
                      spec.device or "cpu", spec.overwrite, spec.quiet if quiet is None else quiet,
                      spec.kernels or "auto", spec.resume, settings)
