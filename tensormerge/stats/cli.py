"""`tensormerge stats ...`: statistics stores from the command line.

Kept apart from tensormerge/cli.py so the merge commands do not grow with the statistics
tooling; zarr, h5py and the importers load only when a statistics command runs.
"""

from __future__ import annotations

import json

import click

KIND_CHOICES = ("fisher", "gram_in", "gram_out", "fisher_block")


@click.group()
def stats() -> None:
    """Statistics stores (Fisher diagonals, Grams) for the statistics-based methods."""


@stats.command("import")
@click.argument("file")
@click.option("--kind", required=True, type=click.Choice(KIND_CHOICES), help="what FILE holds")
@click.option("--output", "-o", required=True, help="statistics store to write (S.zarr)")
@click.option("--model", help="check every key and shape against this model")
@click.option("--count", type=int, help="examples or tokens the statistics were divided by")
@click.option("--fisher-type", type=click.Choice(("empirical", "true")), help="how the Fisher was sampled")
@click.option("--weight-layout", type=click.Choice(("out_in", "in_out")), default="out_in", show_default=True,
              help="layout of the weights the Grams describe: out_in (torch Linear) or in_out (GPT-2 Conv1D)")
@click.option("--overwrite", is_flag=True, help="replace an existing store (with --append: that kind in it)")
@click.option("--append", is_flag=True, help="add this kind to an existing store (e.g. Grams beside a Fisher)")
@click.option("--quiet", "-q", is_flag=True, help="no summary line")
@click.option("--traceback", is_flag=True, hidden=True)
def import_cmd(file: str, kind: str, output: str, model: str | None, count: int | None,
               fisher_type: str | None, weight_layout: str, overwrite: bool, append: bool, quiet: bool,
               traceback: bool) -> None:
    """Convert research code's statistics FILE (.pt/.pth/.bin, .safetensors, .h5) into a store."""
    from tensormerge.stats.importers import import_stats

    summary = import_stats(file, kind, output, model=model, count=count, fisher_type=fisher_type,
                           overwrite=overwrite, append=append, weight_layout=weight_layout)
    for w in summary["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if not quiet:
        renamed = f", {len(summary['renamed'])} renamed" if summary["renamed"] else ""
        checked = f", checked against {model}" if model else ""
        click.echo(f"wrote {output}: {summary['arrays']} {kind} arrays from {file}{renamed}{checked}")



@stats.command("compute")
@click.option("--model", required=True, help="model directory (transformers) or PEFT adapter directory")
@click.option("--data", required=True, help="JSONL file (input/target, prompt/completion, messages (chat), text, "
              "input/choices/label, input_ids/labels, or image/label records), an image folder (one sub-folder "
              "per class) or a save_to_disk dataset")
@click.option("--kind", required=True, type=click.Choice(("fisher", "gram", "kfac", "blockwise", "all")),
              help="fisher, gram (gram_in), kfac (gram_in+gram_out), blockwise (fisher_block), all")
@click.option("--output", "-o", required=True, help="statistics store to write (S.zarr)")
@click.option("--fisher-type", type=click.Choice(("empirical", "true")), default="empirical", show_default=True,
              help="gold labels, or labels sampled from the model")
@click.option("--fisher-mode", type=click.Choice(("per-example", "squared-batch")), default="per-example",
              show_default=True, help="square per-example gradients, or mini-batch gradients (RegMean paper code)")
@click.option("--grad-mode", type=click.Choice(("auto", "vmap", "loop")), default="auto", show_default=True,
              help="per-example gradients with torch.func.vmap, one example per backward, or auto")
@click.option("--gram-normalize", type=click.Choice(("tokens", "examples")), default="tokens", show_default=True,
              help="divide Grams by non-pad tokens of the feeding side, or by examples")
@click.option("--batch-size", type=int, default=8, show_default=True, help="examples per forward pass")
@click.option("--max-examples", type=int, help="use at most this many examples [default: all]")
@click.option("--max-length", type=int, default=512, show_default=True,
              help="tokens per sequence; inputs are truncated, longer labels are an error")
@click.option("--padding-side", type=click.Choice(("left", "right")),
              help="pad batches on this side [default: the tokenizer's, else right]")
@click.option("--split", help="split of a saved DatasetDict [default: train]")
@click.option("--input-field", help="field holding the prompt / input text [default: input]")
@click.option("--target-field", help="field holding the answer to a prompt / input [default: target]")
@click.option("--text-field", help="field holding plain text (LM data, or the text to classify) [default: text]")
@click.option("--label-field", help="field holding the class, or the right choice's index [default: label]")
@click.option("--messages-field", help="field holding chat turns [{role, content}] [default: messages]")
@click.option("--prompt-field", help="field holding an instruction prompt [default: prompt]")
@click.option("--completion-field", help="field holding the prompt's completion [default: completion]")
@click.option("--choices-field", help="field holding a multiple-choice example's answers [default: choices]")
@click.option("--choice-score", type=click.Choice(("sum", "mean")), default="sum", show_default=True,
              help="true Fisher on multiple choice: score a choice by its summed or token-averaged log-likelihood")
@click.option("--base-model", help="base model directory of a PEFT adapter [default: from adapter_config.json]")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--dtype", type=click.Choice(("auto", "float32", "bfloat16", "float16")), default="float32",
              show_default=True, help="dtype the model runs in (auto: as stored)")
@click.option("--accumulate", type=click.Choice(("float32", "float64")), default="float32", show_default=True,
              help="dtype of the running sums")
@click.option("--max-memory", default="4GiB", show_default=True,
              help="bound on per-example gradients and Gram accumulators held at once")
@click.option("--checkpoint-every", type=int, default=50, show_default=True,
              help="save the accumulators for --resume every N batches")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of true-Fisher label sampling")
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last checkpoint")
@click.option("--overwrite", is_flag=True, help="replace an existing statistics store (nothing else)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar, warnings or summary line")
@click.option("--image-field", default="image", show_default=True,
              help="images: the JSONL/dataset field holding the image (JSONL paths are relative to the file)")
@click.option("--classes", help="zero-shot CLIPModel: class names, comma-separated or a file with one per line "
              "[default: folder names, the ClassLabel's names, or the sorted string labels]")
@click.option("--prompt", default="a photo of a {}.", show_default=True,
              help="zero-shot CLIPModel: the prompt of each class; its text embedding is the class's head row")
@click.option("--clip-towers", type=click.Choice(("vision", "both")), default="vision", show_default=True,
              help="zero-shot CLIPModel: statistics of the vision tower, or of both towers and the logit scale")
@click.option("--gram-per-weight", is_flag=True,
              help="store an input Gram per weight, even where layers read the same input (q/k/v, gate/up)")
@click.option("--workers", type=int, help="compute on a local dask cluster of N worker processes")
@click.option("--scheduler", help="compute on an existing dask cluster: its scheduler tcp://HOST:PORT")
@click.option("--shard-examples", type=int, default=256, show_default=True,
              help="examples per cluster task; the store depends on it, not on the number of workers")
@click.option("--gram-block-rows", type=int, hidden=True)
@click.option("--traceback", is_flag=True, hidden=True)
def compute_cmd(traceback: bool, max_memory: str, **kw) -> None:
    """Compute a model's merge statistics over a data set into a store (S.zarr)."""
    from tensormerge.sizes import parse_size
    from tensormerge.stats_compute.collect import ComputeOptions, compute_stats

    opts = ComputeOptions(max_memory=parse_size(max_memory, "--max-memory"), **kw)
    summary = compute_stats(opts)
    if not opts.quiet:
        for w in summary["warnings"]:
            click.echo(f"warning: {w}", err=True)
        shared = f" (+{summary['aliases']} aliases of shared input Grams)" if summary.get("aliases") else ""
        click.echo(f"wrote {summary['output']}: {summary['arrays']} arrays{shared} from {summary['examples']} examples "
                   f"({summary['tokens']} scored tokens) in {summary['seconds']:.2f} s, "
                   f"{summary['examples_per_s']:.1f} examples/s")

def inspect_store(path: str, as_json: bool) -> str:
    """A store's root attributes and arrays, for `tensormerge inspect S.zarr`."""
    from tensormerge.errors import printable
    from tensormerge.stats.store import StatsStore

    store = StatsStore(path)
    arrays = {kind: {name: {"shape": list(info.shape), "count": info.attrs.get("count")}
                     | ({"alias_of": info.target} if info.target else {})
                     for name, info in group.items()}
              for kind, group in store.arrays.items() if group}
    check = ("every chunk's crc32 recorded, verified on read" if store.verified
             else "no chunk checksums: reads cannot be verified")
    if as_json:
        return json.dumps({"path": path, "attrs": store.attrs, "format": store.format, "verified": store.verified,
                           "digest": store.digest, "arrays": arrays}, indent=2)
    lines = [f"{printable(path)}: statistics store (format {store.format}, {check}), "
             f"{sum(len(a) for a in arrays.values())} arrays"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in store.attrs.items() if k != "aliases"]
    for kind, group in arrays.items():
        shared = sum("alias_of" in a for a in group.values())
        lines.append(f"  {kind} ({len(group)}" + (f", {shared} of them aliases of a shared array)" if shared else ")"))
        lines += [f"    {printable(name):<64} {a['shape']!s:<16} " + (f"-> {printable(a['alias_of'])}" if "alias_of" in a
                                                             else f"count={a['count']}") for name, a in group.items()]
    return "\n".join(lines)


# `stats plan` takes every option of `stats compute` but the ones about the store it does not write
_NOT_PLANNED = ("output", "resume", "overwrite", "checkpoint_every", "quiet")


@click.option("--arch", help="a named architecture instead of --model: " + ", ".join(
    ("t5-base", "mt5-xl", "llama-1b", "llama-7b", "vit-b-16", "clip-vit-b-32")))
@click.option("--config", "config_path", help="a transformers config.json (or its directory) instead of --model: "
              "built on the meta device, nothing allocated")
@click.option("--gpu-tflops", type=float, help="with --arch/--config: the TFLOP/s your GPU sustains, for a time "
              "estimate [default: no time]")
@click.option("--measure-batches", type=int, default=3, show_default=True,
              help="with --model: real batches timed (after one warm-up) to extrapolate the run's time")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
def plan_cmd(arch, config_path, gpu_tflops, measure_batches, as_json, traceback: bool, **kw) -> None:
    """What `stats compute` with these options will need (memory, store size, time); writes nothing.

    Exits 4 (after printing the plan) when `stats compute` would refuse the run."""
    from tensormerge.errors import ParameterError
    from tensormerge.sizes import parse_size
    from tensormerge.stats_compute import planning

    given = [n for n, v in (("--model", kw.get("model")), ("--arch", arch), ("--config", config_path)) if v]
    if len(given) != 1:
        raise ParameterError(f"give one of --model, --arch, --config ({', '.join(given) or 'none'} given)")
    if kw["kind"] is None:
        raise ParameterError("--kind is required (fisher, gram, kfac, blockwise, all)")
    planning.check_sizes(kw["batch_size"], kw["max_length"], gpu_tflops, measure_batches)
    if kw.get("model"):
        if not kw.get("data"):
            raise ParameterError("--model needs --data (a few real batches are timed)")
        if gpu_tflops is not None:
            raise ParameterError("--gpu-tflops is for --arch/--config; with --model the time is measured")
        from tensormerge.stats_compute.collect import ComputeOptions

        kw["max_memory"] = parse_size(kw["max_memory"], "--max-memory")
        opts = ComputeOptions(output="(plan)", quiet=True, **kw)
        plan = planning.plan_model(opts, measure_batches)
    else:
        if kw.get("data"):
            raise ParameterError("--data is for --model; --arch/--config plan from shapes alone")
        from tensormerge.stats_compute.collect import ComputeOptions

        # the options' own checks, as with --model (--workers 0, --workers with --scheduler, ...)
        ComputeOptions(output="(plan)", quiet=True, **{**kw, "model": "(plan)", "data": "(plan)",
                                                       "max_memory": parse_size(kw["max_memory"], "--max-memory")}
                       ).check()
        plan = planning.plan_arch(arch, config_path, kw["kind"], kw["batch_size"], kw["max_length"],
                                  kw["accumulate"], kw["dtype"], kw["fisher_mode"], kw["fisher_type"],
                                  kw.get("max_examples"), gpu_tflops, bool(kw.get("gram_per_weight")),
                                  parse_size(kw["max_memory"], "--max-memory"), kw.get("grad_mode") or "auto")
    click.echo(json.dumps(plan, indent=2) if as_json else planning.render(plan))
    if plan.get("refused"):  # the plan is printed for the numbers; the status says it would not run
        from tensormerge.errors import BudgetError

        raise BudgetError(f"stats compute would refuse this run: {plan['refused']}")


def _plan_params() -> list:
    import copy

    out = []
    for p in compute_cmd.params:
        if p.name in _NOT_PLANNED:
            continue
        p = copy.copy(p)
        if p.name in ("model", "data", "kind"):
            p.required = False  # --arch/--config need no model or data; --kind is checked in one line
        out.append(p)
    return out


plan_cmd = stats.command("plan")(plan_cmd)
plan_cmd.params[:0] = _plan_params()
