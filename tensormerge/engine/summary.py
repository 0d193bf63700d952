"""What a run did, in words: the lines `run` prints after a merge, and its warnings.

Progress bars are erased when they finish, so these lines are the only lasting sign that blocks
fell back, CG stopped early or entries were patched. They are made from the report itself and
stored in it ("summary", "warnings"), so the JSON holds exactly what the user read.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from tensormerge.sizes import format_size

if TYPE_CHECKING:
    from tensormerge.engine.memory import MemoryMonitor
    from tensormerge.engine.run import Runner

SHOWN = 5  # blocks named one by one before "... N more"


def describe(plan, notes: dict[str, dict], report: dict[str, Any]) -> dict[str, list[str]]:
    """The report's "summary" and "warnings" for a finished run of `plan`."""
    return {"summary": summary_lines(plan, notes, report), "warnings": run_warnings(plan, notes)}


def summary_lines(plan, notes: dict[str, dict], report: dict[str, Any]) -> list[str]:
    n_shards = len(report["shards"])
    lines = [f"wrote {report['output']} ({n_shards} shard{'' if n_shards == 1 else 's'}, "
             f"{format_size(report['bytes_written'])}) in {report['seconds']:.2f} s, "
             f"peak RSS {format_size(report['peak_rss_bytes'])}"]
    blocks = report["blocks"]
    fallback = report.get("fallback_blocks") or {}
    merged = sum(1 for b in blocks if b["kind"] == "merge")
    label = plan.method.fallback_label
    line = f"blocks: {merged - len(fallback)} merged by {plan.method.name}"
    if plan.stats is not None or fallback:
        line += f", {len(fallback)} {label} for lack of statistics"
    derived = sum(1 for b in blocks if b["kind"] == "derived")  # LoRA factors engine.lora computes
    if derived:
        line += f", {derived} LoRA factors computed (--lora)"
    floats = sum(1 for b in plan.blocks if b.kind == "copy" and b.out_dtype.is_floating_point)
    if floats:  # --lora full: tensors no adapter updates are the base's
        line += f", {floats} copied from the base (no adapter updates them)"
    others = len(blocks) - merged - derived - floats
    if others or not floats:
        line += f", {others} copied (not floating point)"
    if report.get("patched_entries"):
        line += f"; {report['patched_entries']} entries patched after the merge pass"
    lines.append(line)
    for name, why in list(fallback.items())[:SHOWN]:
        lines.append(f"  {label} {name}: {why}")
    if len(fallback) > SHOWN:
        lines.append(f"  ... {len(fallback) - SHOWN} more (the report's fallback_blocks lists all)")
    missing = report.get("base_stats_missing") or {}
    if missing:
        lines.append(f"  {len(missing)} blocks without base statistics, taken as zero (base_stats_missing)")
    resumed = report.get("resumed") or {}
    if resumed.get("chunks") or resumed.get("passes"):
        lines.append(f"resumed: {resumed.get('passes', 0)} passes and {resumed.get('chunks', 0)} chunks "
                     f"kept from the interrupted run")
    return lines + plan.method.run_summary(plan.params, notes)


def run_warnings(plan, notes: dict[str, dict]) -> list[str]:
    """Results the user likely did not mean: a base the method never reads, the method's own
    (weights that do not sum to 1 verbatim, CG short of tol)."""
    out = plan.lora.warnings(plan) if plan.lora is not None else []
    out += _repeated_inputs(plan)
    if plan.base is not None and plan.lora is None and not plan.method.requires_base(plan.params):
        out.append(f"--base: method {plan.method.name!r} with these parameters does not use the base's values "
                   f"(the output only takes its tensor names, order, dtypes and side files)")
    merged = plan.merge_blocks
    for path in plan.stats.unidentified() if plan.stats is not None else []:
        out.append(f"--stats {path}: records no model (imported without --model?), so only its tensor names "
                   f"and shapes were checked against the model it was given for")
    if plan.stats is not None and merged and not any(b.stats for b in merged):
        out.append(f"--stats: no tensor found the statistics {plan.method.name!r} reads in the stores, so all "
                   f"{len(merged)} were {plan.method.fallback_label} instead (stores of another --kind? "
                   f"`tensormerge inspect STORE` lists what one holds)")
    from tensormerge.methods.rules import unmatched_filters

    names = list(getattr(plan.params, "per_block", None) or {})
    for key, value in (getattr(plan.params, "rules", None) or {}).items():
        for f in unmatched_filters(value, names):
            out.append(f"parameter {key!r}: filter {f!r} matches no tensor of the model, so its value was never used")
    return out + plan.method.run_warnings(plan.params, notes)


def run_report(runner: Runner, mem: MemoryMonitor, t_start: float) -> dict:
    """The JSON `--report` writes (and a sweep keeps per candidate): times, bytes, memory, what
    resumed, and a line per block; its "summary" and "warnings" are the lines `run` prints."""
    plan, writer, block_notes = runner.plan, runner.writer, runner.block_notes
    report = {
        "output": writer.out_dir,
        "method": plan.method.name,
        "params": plan.params.as_dict(),
        "kernels": runner.ops.__name__.rsplit(".", 1)[-1],
        "seconds": time.perf_counter() - t_start,
        "merge_seconds": runner.merge_seconds,
        "patch_seconds": runner.t_finish - runner.t_patch,
        "finish_seconds": runner.finish_seconds,
        "passes": runner.passes_report,
        "peak_rss_bytes": mem.peak_rss,
        "peak_anon_bytes": mem.peak_anon,
        "peak_budgeted_bytes": runner.executor.budget.peak,
        "max_memory": plan.max_memory,
        "bytes_read": plan.bytes_read_merge + sum(p["bytes_read"] for p in runner.passes_report),
        "bytes_written": plan.bytes_written,
        "shards": writer.files,
        "patched_entries": runner.patched,
        "content_bytes_reread": runner.content_reread,
        "resumed": {"passes": runner.resumed_passes, "chunks": len(runner.done), "finished": runner.finished},
        "statistics": plan.stats.describe() if plan.stats is not None else None,
        "fallback_blocks": plan.fallback_blocks,
        "base_stats_missing": plan.base_stats_missing,
        **({"lora": plan.lora.report()} if plan.lora is not None else {}),
        "blocks": [{"name": b.name, "kind": b.kind, "shape": list(b.shape), "chunks": runner.stats[b.name].chunks,
                    "seconds": runner.stats[b.name].seconds,
                    "bytes": runner.stats[b.name].bytes_read + runner.stats[b.name].bytes_written,
                    "crc32": f"{runner.stats[b.name].crc32:08x}",
                    **({"statistics": sorted(b.stats)} if b.stats else {}),
                    **({"fallback": b.fallback} if b.fallback else {}),
                    **({"base_stats_missing": b.base_missing} if b.base_missing else {}),
                    **block_notes.get(b.name, {})} for b in plan.blocks],
    }
    report.update(describe(plan, block_notes, report))  # "summary" and "warnings", in words
    return report


def _repeated_inputs(plan) -> list[str]:
    """An input named twice, or the base named as an input too (by the files they read, however
    the paths were spelled): a merge with itself, or a zero task vector, is rarely what was meant.
    mergekit refuses a recipe that lists a model twice; tensormerge merges it and says so."""
    if plan.lora is not None:  # the adapters and --base as given, whether or not it is read
        inputs, base = plan.lora.user_checkpoints(plan)[0], plan.lora.user_base
    else:
        inputs, base = plan.inputs, plan.base

    def files(ck) -> tuple:
        return tuple(sorted(os.path.realpath(f) for f in ck.files))
    first: dict[tuple, int] = {}
    out = []
    for i, ck in enumerate(inputs):
        key = files(ck)
        if key in first:
            out.append(f"--inputs: input {i + 1} ({ck.spec}) reads the same files as input {first[key] + 1}: "
                       f"the model is merged with itself")
        first.setdefault(key, i)
    same = first.get(files(base)) if base is not None else None
    if same is not None and plan.method.requires_base(plan.params):
        out.append(f"--base {base.spec} is also input {same + 1}: its task vector is zero")
    return out
