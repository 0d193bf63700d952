"""The Python surface: `plan(spec)`, `merge(spec)` and `sweep(spec, candidates)`. The CLI is a
thin layer over these; what a spec is and how its plan is opened live in engine/spec.py."""

from __future__ import annotations

import dataclasses
import os
from contextlib import ExitStack
from dataclasses import dataclass

from tensormerge import constants as C
from tensormerge.engine import lora, outdir
from tensormerge.engine.plan import MergePlan
from tensormerge.engine.run import Runner
from tensormerge.engine.sources import open_checkpoint
from tensormerge.engine.spec import MergeSpec, checked, open_plan, run_options  # noqa: F401 (the API's names)
from tensormerge.errors import OutputError, ParameterError, short
from tensormerge.methods import get_method


def plan(spec: MergeSpec) -> str:
    """The plan table `tensormerge plan` prints; nothing is read beyond headers, nothing written."""
    spec = checked(spec)
    with ExitStack() as stack:
        p = open_plan(spec, stack)
        note = ""
        if p.lora is not None and p.lora.mode == "svd":
            note = (f"\n(stage 1 of --lora svd:{p.lora.rank}: the dense merged updates, then each re-factored to "
                    f"rank {p.lora.rank} by a truncated SVD)")
        return p.table() + note


def protected_paths(spec: MergeSpec) -> list[tuple[str, str]]:
    """What an output may never be, contain or lie inside: every model and store the spec names."""
    return ([("input", s) for s in spec.inputs] + [("the base", spec.base)]
            + [("statistics store", s) for s in spec.stats] + [("statistics store", spec.base_stats)])


def merge(spec: MergeSpec) -> dict:
    """Run the merge; returns the report (also written to `spec.report` when set)."""
    spec = checked(spec)
    if not spec.output:
        raise ParameterError("--output is required")
    out = os.path.abspath(spec.output)
    protected = protected_paths(spec)
    resuming_done = spec.resume and not spec.overwrite and not os.path.exists(out + C.PARTIAL_SUFFIX)
    outdir.check_output(out, overwrite=spec.overwrite, keep_existing=resuming_done, protected=protected)
    outdir.check_report(spec.report, out, protected)
    with ExitStack() as stack:
        lock = stack.enter_context(outdir.OutputLock(out, "run", quiet=spec.quiet))
        merge_plan = open_plan(spec, stack)
        cks = merge_plan.checkpoints + list(merge_plan.extras.values())
        places = outdir.checkpoint_places(cks)  # hub snapshots and their cache folders, MaTS' init
        outdir.check_paths(out, places)
        outdir.check_report(spec.report, out, places)
        if merge_plan.lora is not None and merge_plan.lora.mode == "svd":
            report = _merge_svd(spec, merge_plan, stack)
            if lock.stale:
                report["stale_lock"] = lock.stale
            _write_report(spec, report, out)
            return report
        runner = Runner(merge_plan, run_options(spec))
        if spec.workers is not None or spec.scheduler:
            from tensormerge.engine.distributed import DaskExecutor

            runner.cluster = DaskExecutor(spec, spec.workers, spec.scheduler, merge_plan.max_memory,
                                          spec.device or "cpu")
            stack.callback(runner.cluster.close)
        report = runner.execute()
        if lock.stale:
            report["stale_lock"] = lock.stale  # a killed run's lock, taken over: said even with --quiet
    _write_report(spec, report, out)
    return report


def _write_report(spec: MergeSpec, report: dict, out: str) -> None:
    if spec.report:
        try:
            outdir.write_report(spec.report, report)
        except OSError as e:
            raise OutputError(f"--report {spec.report}: cannot write ({e.strerror}); the merge itself is "
                              f"complete in {out}") from None


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


# ---------------------------------------------------------------------------- sweeps
@dataclass
class Evaluation:
    """How a sweep scores its candidates (tensormerge.evaluate)."""

    command: str | None = None  # shell command, {output} and {candidate} substituted
    python: str | None = None  # module:function called with the output path
    select: str | None = None  # metric[:max|min]
    keep: str = "all"  # all | best
    workers: int = 1
    timeout: float | None = None
    plot: bool = True


def candidate_specs(spec: MergeSpec, cands) -> list[MergeSpec]:
    """Each candidate as the `run` it stands for: its method and parameters, DIR/<name>."""
    root = os.path.abspath(spec.output)
    mixed = len({c.method for c in cands}) > 1

    def stats(c):  # in a mixed list, a method that uses no statistics is the run without them
        m = get_method(c.method)
        return dict(stats=spec.stats if m.uses_stats or not mixed else [],
                    base_stats=spec.base_stats if m.uses_base_stats or not mixed else None)
    return [dataclasses.replace(spec, method=c.method, params=dict(c.params), output=os.path.join(root, c.name),
                                report=None, **stats(c)) for c in cands]


def _open_sweep(spec: MergeSpec, cands, stack: ExitStack) -> tuple[list[MergeSpec], list[MergePlan]]:
    specs = candidate_specs(spec, cands)
    opened: dict = {}
    plans = []
    for c, s in zip(cands, specs):
        try:
            plans.append(open_plan(s, stack, opened))
        except ParameterError as e:
            raise ParameterError(f"candidate {c.name}: {e}") from None
        if plans[-1].lora is not None and plans[-1].lora.mode == "svd":
            raise ParameterError("sweep: --lora svd:R is not supported in a sweep (run each candidate)")
    seen: dict = {}
    for c, p in zip(cands, plans):  # `lambda=0.30,0.3`: one merge written twice
        key = (c.method, repr(sorted(p.params.as_dict().items())))
        if key in seen:
            raise ParameterError(f"sweep: candidates {seen[key]} and {c.name} are the same merge ({c.method} "
                                 f"{short(p.params.as_dict())}); give each value once")
        seen[key] = c.name
    return specs, plans


def sweep_plan(spec: MergeSpec, cands) -> str:
    """What `plan` prints for a sweep: the candidates, their read groups, the first one's plan."""
    from tensormerge.engine.sweep import describe_groups

    spec = checked(dataclasses.replace(spec, output=spec.output or "sweep"))
    with ExitStack() as stack:
        specs, plans = _open_sweep(spec, cands, stack)
        max_memory = plans[0].max_memory
        lines = [f"  {c.name}: {c.method} {p.params.as_dict()}" for c, p in zip(cands, plans)]
        return "\n".join(describe_groups(plans, [c.name for c in cands], max_memory) + ["candidates:"] + lines
                         + ["", "first candidate's plan (each candidate's blocks are cut into the group's common "
                            "chunks):", plans[0].table()])


def sweep(spec: MergeSpec, cands, evaluation: Evaluation | None = None, log=None) -> dict:
    """Merge every candidate (one read of the inputs per group), then score, select and keep
    (tensormerge.evaluate); returns what DIR/sweep.json holds."""
    from tensormerge.engine.sweep import run_sweep
    from tensormerge import evaluate as E

    spec = checked(spec)
    evaluation = evaluation or Evaluation()
    if not spec.output:
        raise ParameterError("--output is required (the sweep's directory)")
    if evaluation.select:
        E.parse_select(evaluation.select)
    if evaluation.python:
        E.resolve_python(evaluation.python)  # a typo costs nothing: before any merge
    root = os.path.abspath(spec.output)
    protected = protected_paths(spec)
    outdir.check_paths(root, protected)
    _check_sweep_dir(root)
    outdir.check_report(spec.report, root, protected)
    say = log or (lambda msg: None)
    # DIR is held through scoring and --keep too: another sweep into DIR would otherwise replace
    # candidates being evaluated and write sweep.json over this one's record
    with outdir.OutputLock(root, "sweep", quiet=spec.quiet):
        with ExitStack() as stack:
            specs, plans = _open_sweep(spec, cands, stack)
            places = outdir.checkpoint_places([ck for p in plans for ck in p.checkpoints + list(p.extras.values())])
            outdir.check_paths(root, places)
            for s in specs:
                out = os.path.abspath(s.output)
                done = s.resume and not s.overwrite and not os.path.exists(out + C.PARTIAL_SUFFIX)
                outdir.check_output(out, overwrite=s.overwrite, keep_existing=done, protected=protected)
            os.makedirs(root, exist_ok=True)
            state = E.load_state(root)  # refuses a sweep.json that is not ours
            gone = _removed_earlier(state, spec, cands)
            state.update({"method": spec.method if len({c.method for c in cands}) == 1 else None,
                          "inputs": spec.inputs, "base": spec.base})
            E.save_state(root, state)  # DIR is a sweep's from here on (--resume finds it)
            keep_idx = [i for i, c in enumerate(cands) if c.name not in gone]
            specs, plans = [specs[i] for i in keep_idx], [plans[i] for i in keep_idx]
            for s in specs:
                stack.enter_context(outdir.OutputLock(os.path.abspath(s.output), "sweep", quiet=True))
            runners = [Runner(p, run_options(s, quiet=True if len(specs) > 1 else None)) for p, s in zip(plans, specs)]
            for r in runners:
                r.opts.quiet = spec.quiet  # the bars of the shared read are the lead's
            if spec.workers is not None or spec.scheduler:
                from tensormerge.engine.distributed import run_sweep_on_cluster

                results = run_sweep_on_cluster(spec, specs, runners, plans[0].max_memory, stack, say)
            else:
                results = run_sweep(runners, plans[0].max_memory, spec.quiet, say) if runners else []
        by_name = {os.path.basename(s.output): r for s, r in zip(specs, results)}
        if spec.report:  # every candidate's run report (or its error), as `run --report` writes one
            _write_report(spec, {"candidates": {os.path.basename(s.output): (
                {"error": short_error(r)} if isinstance(r, BaseException) else r) for s, r in zip(specs, results)}},
                root)
        cands_out = []
        for c in cands:
            res = by_name.get(c.name)
            if c.name in gone:  # not merged again: --keep best removed it in an earlier run
                cands_out.append(E.Candidate(c.name, c.method, get_method(c.method).Params.typed(c.method, c.params),
                                             dict(c.swept), os.path.join(root, c.name), status="removed",
                                             error="removed by --keep best of an earlier run"))
                continue
            s = specs[[os.path.basename(x.output) for x in specs].index(c.name)]
            typed = get_method(c.method).Params.typed(c.method, c.params)
            cand = E.Candidate(c.name, c.method, typed, {k: typed.get(k, v) for k, v in c.swept.items()},
                               os.path.abspath(s.output))
            if isinstance(res, BaseException):
                cand.status, cand.error = "failed", short_error(res)
            else:
                cand.status = "merged"
                cand.merge_seconds = None if res.get("already_complete") else round(res.get("seconds", 0.0), 3)
            cands_out.append(cand)
        return finish_sweep(root, cands_out, evaluation, quiet=spec.quiet, log=say)


def _removed_earlier(state: dict, spec: MergeSpec, cands) -> set[str]:
    """Candidates an earlier --keep best removed and a --resume does not merge again: only the
    same candidate (method, parameters, inputs and base as recorded); any other is merged anew."""
    import json

    if not spec.resume or spec.overwrite or state.get("inputs") != spec.inputs or state.get("base") != spec.base:
        return set()
    removed = {os.path.basename(p) for p in (state.get("keep") or {}).get("removed") or [] if isinstance(p, str)}
    rows = {r.get("name"): r for r in state.get("candidates") or [] if isinstance(r, dict)}
    out = set()
    for c in cands:
        row = rows.get(c.name) or {}
        if c.name in removed and row.get("method") == c.method and row.get("params") == json.loads(
                json.dumps(get_method(c.method).Params.typed(c.method, c.params))):
            out.add(c.name)
    return out


def short_error(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else e.__class__.__name__


def _check_sweep_dir(root: str) -> None:
    """A sweep writes into DIR beside what an earlier sweep left there; anything else in it is refused."""
    if os.path.islink(root):
        raise OutputError(f"--output {root}: is a symbolic link; give the directory itself")
    if os.path.lexists(root) and not os.path.isdir(root):
        raise OutputError(f"--output {root}: is a file; a sweep writes a directory of candidates")
    if os.path.isdir(root) and os.listdir(root) and not os.path.isfile(os.path.join(root, C.SWEEP_JSON)):
        raise OutputError(f"--output {root}: exists, is not empty and holds no {C.SWEEP_JSON} (not a sweep's "
                          f"directory); choose another")


def finish_sweep(root: str, cands, evaluation: Evaluation, quiet: bool = False, log=None) -> dict:
    """Score (tensormerge.evaluate), select, record in sweep.json, keep; the table and plot."""
    from tensormerge import evaluate as E

    say = log or (lambda msg: None)
    if evaluation.command or evaluation.python:
        E.evaluate(cands, root, command=evaluation.command, python=evaluation.python, workers=evaluation.workers,
                   timeout=evaluation.timeout, quiet=quiet, log=say)
    best, notes = None, []
    if evaluation.select:
        best = E.select(cands, evaluation.select)
        if best is None:
            notes.append(f"sweep: no candidate selected: {E.no_selection(cands, evaluation.select)}")
        else:
            best.selected = True
    removed = E.keep(cands, best, evaluation.keep, root, select_spec=evaluation.select, log=say)
    png = None
    if evaluation.plot and evaluation.select and best is not None:
        png = E.plot(cands, E.parse_select(evaluation.select)[0], os.path.join(root, C.SWEEP_PLOT), log=say)
    failed = [c for c in cands if c.status == "failed"]
    eval_failed = [c for c in cands if c.eval_error]
    if failed:
        notes.append(f"sweep: {len(failed)} candidate(s) failed to merge: "
                     + "; ".join(f"{c.name}: {c.error}" for c in failed[:3]))
    if eval_failed:
        notes.append(f"sweep: {len(eval_failed)} evaluation(s) failed (recorded in {C.SWEEP_JSON}; a rerun with "
                     f"--resume retries them): " + "; ".join(f"{c.name}: {c.eval_error}" for c in eval_failed[:3]))
    state = E.load_state(root)
    return {**state, "table": E.table(cands, evaluation.select), "notes": notes, "removed": removed,
            "plot": png, "best": best.name if best is not None else None,
            "exit_code": 1 if failed or eval_failed or (evaluation.select and best is None) else 0}
