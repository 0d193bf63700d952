"""The Python surface: `plan(spec)` and `merge(spec)`. The CLI is a thin layer over these."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tensormerge import constants as C
from tensormerge.engine import lora
from tensormerge.engine.plan import MergePlan, build_plan
from tensormerge.engine.run import Runner, RunOptions
from tensormerge.engine.sources import open_checkpoint
from tensormerge.errors import InputError, OutputError, ParameterError
from tensormerge.methods import get_method
from tensormerge.sizes import parse_size


@dataclass
class MergeSpec:
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


def _validate(spec: MergeSpec) -> None:
    if not spec.inputs:
        raise ParameterError("--inputs: at least one model is needed")
    if spec.dtype not in C.DTYPE_CHOICES:
        raise ParameterError(f"--dtype: {spec.dtype!r} is not one of {', '.join(C.DTYPE_CHOICES)}")
    dev = torch.device(spec.device) if spec.device else torch.device("cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"--device {spec.device}: no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ParameterError(f"--device: {spec.device!r} is not cpu, cuda or cuda:N")
    from tensormerge.kernels.dispatch import select

    select(spec.kernels or "auto", dev)  # refuses --kernels triton where it cannot run, before any work


def open_plan(spec: MergeSpec, stack: ExitStack) -> MergePlan:
    """Resolve inputs, parse parameters and build the plan; checkpoints close with `stack`."""
    _validate(spec)
    method = get_method(spec.method)
    params = method.Params.from_strings(method.name, spec.params, len(spec.inputs))
    inputs = []
    for s in spec.inputs:
        ck = open_checkpoint(s)
        stack.callback(ck.close)
        inputs.append(ck)
    base = None
    if spec.base:
        base = open_checkpoint(spec.base)
        stack.callback(base.close)
    mode, rank = lora.parse_mode(spec.lora)
    adapters = lora.detect(inputs)
    if adapters is None and mode is not None:
        raise ParameterError(f"--lora {spec.lora}: the inputs are not PEFT adapters")
    lp = lora.LoraPlan(adapters, mode, rank, method, params, base) if adapters else None
    if lp is not None:
        inputs, base = lp.engine_inputs()
    try:
        stats = _bind_stats(spec, method, params, inputs, base)
    except InputError as e:
        if lp is None or "names no tensor" not in str(e):
            raise
        raise InputError(str(e) + lp.stats_hint()) from None
    extras = {}
    for role, path in method.extra_checkpoints(params).items():
        extras[role] = open_checkpoint(path)
        stack.callback(extras[role].close)
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


def plan(spec: MergeSpec) -> str:
    """The plan table `tensormerge plan` prints; nothing is read beyond headers, nothing written."""
    with ExitStack() as stack:
        p = open_plan(spec, stack)
        note = ""
        if p.lora is not None and p.lora.mode == "svd":
            note = (f"\n(stage 1 of --lora svd:{p.lora.rank}: the dense merged updates, then each re-factored to "
                    f"rank {p.lora.rank} by a truncated SVD)")
        return p.table() + note


def run_options(spec: MergeSpec, quiet: bool | None = None) -> RunOptions:
    """How the runner writes (shared by the client and, quiet, by dask workers)."""
    settings = {k: v for k, v in asdict(spec).items()
                if k not in ("report", "quiet", "overwrite", "resume", "workers", "scheduler")}
    return RunOptions(os.path.abspath(spec.output), parse_size(spec.shard_size, "--shard-size"),
                      spec.device or "cpu", spec.overwrite, spec.quiet if quiet is None else quiet,
                      spec.kernels or "auto", spec.resume, settings)


def merge(spec: MergeSpec) -> dict:
    """Run the merge; returns the report (also written to `spec.report` when set)."""
    if not spec.output:
        raise ParameterError("--output is required")
    out = os.path.abspath(spec.output)
    if os.path.exists(out) and not spec.overwrite and not (spec.resume and not os.path.exists(out + C.PARTIAL_SUFFIX)):
        raise OutputError(f"{spec.output}: exists (pass --overwrite to replace it)")
    for s in spec.inputs + ([spec.base] if spec.base else []):
        if os.path.exists(s) and os.path.abspath(s) in (out, out + C.PARTIAL_SUFFIX):
            raise OutputError(f"{spec.output}: is also an input")
    with ExitStack() as stack:
        merge_plan = open_plan(spec, stack)
        if merge_plan.lora is not None and merge_plan.lora.mode == "svd":
            report = _merge_svd(spec, merge_plan, stack)
            if spec.report:
                with open(spec.report, "w") as f:
                    json.dump(report, f, indent=2)
            return report
        runner = Runner(merge_plan, run_options(spec))
        if spec.workers is not None or spec.scheduler:
            from tensormerge.engine.distributed import DaskExecutor

            runner.cluster = DaskExecutor(spec, spec.workers, spec.scheduler, merge_plan.max_memory,
                                          spec.device or "cpu")
            stack.callback(runner.cluster.close)
        report = runner.execute()
    if spec.report:
        with open(spec.report, "w") as f:
            json.dump(report, f, indent=2)
    return report


def _merge_svd(spec: MergeSpec, dense_plan: MergePlan, stack: ExitStack) -> dict:
    """--lora svd:R: the method merges the dense updates into a scratch directory beside the
    output, then each merged ΔW is re-factored into the output adapter; the scratch is removed."""
    if spec.workers is not None or spec.scheduler:
        raise ParameterError("--lora svd:R runs locally (no --workers or --scheduler)")
    scratch = lora.dense_dir(spec.output)
    if os.path.exists(scratch) and not os.path.isfile(os.path.join(scratch, C.PROVENANCE)):
        raise OutputError(f"{scratch}: exists and is not a tensormerge scratch output; move it away")
    opts = run_options(spec)
    opts.output, opts.overwrite = scratch, True
    first = Runner(dense_plan, opts).execute()
    dense = open_checkpoint(scratch)
    stack.callback(dense.close)
    lp = dense_plan.lora
    plan = lora.svd_plan(lp, dense, dense_plan.max_memory, C.DTYPE_CHOICES[spec.dtype])
    report = Runner(plan, run_options(spec)).execute()
    dense.close()
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    report["dense_stage"] = {k: first[k] for k in ("seconds", "passes", "peak_rss_bytes", "bytes_read",
                                                    "bytes_written", "summary") if k in first}
    report["blocks"] = first.get("blocks", []) + report["blocks"]
    energy = report.get("lora", {}).get("modules", {})
    if energy:
        worst = max(energy, key=energy.get)
        report["summary"] = list(report.get("summary") or []) + [
            f"lora svd:{lp.rank}: discarded energy {min(energy.values()):.3g} to {energy[worst]:.3g} of ΔW "
            f"({worst}); per module in tensormerge.json"]
    return report
