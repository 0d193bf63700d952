"""`tensormerge` command line: parse, build a MergeSpec, call the api, print.

Every expected failure prints one line naming the file, tensor or parameter and exits
non-zero; `--traceback` (or TENSORMERGE_TRACEBACK=1) shows the Python stack as well.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from tensormerge import __version__, api
from tensormerge import constants as C
from tensormerge.errors import ParameterError, TensorMergeError


def _split(values: tuple[str, ...]) -> list[str]:
    return [x for v in values for x in v.split(",") if x.strip()]


def _params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"-p {p!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _recipe(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ParameterError(f"--config {path}: cannot read ({e.strerror})") from None
    try:
        import yaml

        data = yaml.safe_load(text)
    except Exception as e:
        raise ParameterError(f"--config {path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ParameterError(f"--config {path}: expected a mapping of options")
    known = {"method", "inputs", "base", "stats", "base_stats", "output", "params", "max_memory", "dtype",
             "shard_size", "device", "kernels", "lora"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ParameterError(f"--config {path}: unknown keys {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return data


def _spec(kw: dict) -> api.MergeSpec:
    recipe = _recipe(kw.get("config"))
    inputs = _split(kw["inputs"]) or recipe.get("inputs") or []
    if isinstance(inputs, str):
        inputs = _split((inputs,))
    stats = _split(kw.get("stats") or ()) or recipe.get("stats") or []
    if isinstance(stats, str):
        stats = _split((stats,))
    params = dict(recipe.get("params") or {})
    params.update(_params(kw["param"]))
    method = kw["method"] or recipe.get("method")
    if not method:
        raise ParameterError("--method is required (see `tensormerge methods`)")
    return api.MergeSpec(
        method=method, inputs=inputs, output=kw.get("output") or recipe.get("output"),
        base=kw["base"] or recipe.get("base"), params=params,
        stats=stats, base_stats=kw.get("base_stats") or recipe.get("base_stats"),
        max_memory=kw["max_memory"] or recipe.get("max_memory") or C.DEFAULT_MAX_MEMORY,
        dtype=kw["dtype"] or recipe.get("dtype") or "auto",
        shard_size=kw["shard_size"] or recipe.get("shard_size") or C.DEFAULT_SHARD_SIZE,
        device=kw["device"] or recipe.get("device") or "cpu",
        kernels=kw.get("kernels") or recipe.get("kernels") or "auto",
        overwrite=kw.get("overwrite", False), resume=kw.get("resume", False), report=kw.get("report"),
        workers=kw.get("workers"), scheduler=kw.get("scheduler"),
        quiet=kw.get("quiet", False), lora=kw.get("lora") or recipe.get("lora"))


def merge_options(f):
    opts = [
        click.option("--method", "-m", help="merge method (see `tensormerge methods`)"),
        click.option("--inputs", "-i", multiple=True, help="fine-tuned models, comma-separated or repeated"),
        click.option("--base", "-b", help="the shared pretrained model"),
        click.option("--stats", multiple=True, help="statistics stores, one per input (statistics methods)"),
        click.option("--base-stats", help="statistics store of the base"),
        click.option("--param", "-p", multiple=True, metavar="KEY=VALUE", help="method parameter; repeat"),
        click.option("--config", type=click.Path(), help="YAML recipe with any of these options"),
        click.option("--max-memory", help="bound on tensor bytes held at once [default: 4GiB]"),
        click.option("--device", help="cpu, cuda or cuda:N [default: cpu]"),
        click.option("--kernels", type=click.Choice(["auto", "torch", "triton"]),
                     help="torch reference or fused Triton kernels; auto: Triton on CUDA when installed [default: auto]"),
        click.option("--dtype", type=click.Choice(list(C.DTYPE_CHOICES)), help="output dtype [default: auto]"),
        click.option("--shard-size", help="largest output shard [default: 5GB]"),
        click.option("--lora", metavar="concat|full|svd:R|factors",
                     help="LoRA adapters are merged as their updates ΔW = s·B·A: concat (exact, average and "
                     "task_arithmetic; the default for them), full (a full model: --base plus the merged ΔW; any "
                     "method), svd:R (the merged ΔW re-factored to rank R; any method), factors (A and B merged "
                     "separately, not ΔW's merge). Other methods need full or svd:R"),
        click.option("--workers", type=int, help="run on a local dask cluster of N worker processes"),
        click.option("--scheduler", help="run on an existing dask cluster: its scheduler tcp://HOST:PORT"),
        click.option("--output", "-o", help="output directory"),
        click.option("--overwrite", is_flag=True, help="replace an existing output directory"),
        click.option("--resume", is_flag=True,
                     help="continue an interrupted merge in OUTPUT.partial (checks what it wrote, reruns the rest)"),
        click.option("--report", type=click.Path(), help="write a JSON report of timings and memory"),
        click.option("--quiet", "-q", is_flag=True, help="no progress bars"),
        click.option("--traceback", is_flag=True, help="show the Python stack on errors"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.group()
@click.version_option(__version__, prog_name="tensormerge")
def cli() -> None:
    """Merge fine-tuned models that share a base, streaming block by block."""


@cli.command()
@merge_options
def run(**kw) -> None:
    """Merge INPUTS (and BASE) into OUTPUT."""
    spec = _spec(kw)
    report = api.merge(spec)
    if report.get("already_complete"):
        click.echo(f"{report['output']}: already complete (nothing to resume)")
    elif not spec.quiet:
        click.echo(f"wrote {report['output']} ({len(report['shards'])} shard(s)) in {report['seconds']:.2f} s, "
                   f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB")
        for line in report.get("summary", []):
            click.echo(line)


@cli.command()
@merge_options
def plan(**kw) -> None:
    """Print the blocks, passes and memory estimate of a merge; reads headers only.

    Takes the same arguments as `run`; --output, --overwrite, --report and --quiet are ignored."""
    click.echo(api.plan(_spec(kw)))


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--traceback", is_flag=True, hidden=True)
def inspect(path: str, as_json: bool, traceback: bool) -> None:
    """Tensors, shapes, dtypes, shards and tied names of a checkpoint, or a statistics store."""
    if path.rstrip("/").endswith(".zarr") or os.path.isfile(os.path.join(path, "zarr.json")):
        from tensormerge.stats.cli import inspect_store

        click.echo(inspect_store(path, as_json))
        return
    from tensormerge.engine.sources import open_checkpoint

    ck = open_checkpoint(path)
    try:
        if as_json:
            click.echo(json.dumps({
                "files": ck.files, "aliases": ck.aliases,
                "tensors": {n: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                            for n, t in ck.tensors.items()}}, indent=2))
            return
        total = sum(t.nbytes for n, t in ck.tensors.items() if n not in ck.aliases)
        click.echo(f"{path}: {len(ck.tensors)} tensors in {len(ck.files)} file(s), {total / 1e9:.3f} GB")
        for f in ck.files:
            click.echo(f"  file {os.path.relpath(f, ck.root)}")
        for n, t in ck.tensors.items():
            tied = f"  (tied to {ck.aliases[n]})" if n in ck.aliases else ""
            click.echo(f"  {n:<64} {str(t.dtype).replace('torch.', ''):<9} {list(t.shape)}{tied}")
    finally:
        ck.close()


@cli.command()
@click.argument("name", required=False)
def methods(name: str | None) -> None:
    """Every merge method, or one method's parameters and defaults."""
    from tensormerge.methods import REGISTRY, get_method

    if name is None:
        for m in sorted(REGISTRY.values(), key=lambda m: m.name):
            needs = ("base " if m.requires_base(m.Params()) else "     ") + ("stats" if m.uses_stats else "     ")
            click.echo(f"{m.name:<18} {needs}  {m.summary}")
        return
    d = get_method(name).describe()
    click.echo(f"{d['name']}: {d['summary']}")
    click.echo(f"  needs base: {'yes' if d['needs_base'] else 'no'}   split by rows: {'yes' if d['row_split'] else 'no'}")
    if d["statistics"]:
        click.echo(f"  statistics: {d['statistics']}")
    for p in d["parameters"]:
        choices = f" [{' | '.join(p['choices'])}]" if p["choices"] else ""
        click.echo(f"  -p {p['key']}={p['default']!s:<10} ({p['type']}) {p['help']}{choices}")


from tensormerge.stats.cli import stats as _stats_group

cli.add_command(_stats_group)


def main() -> None:
    show_tb = "--traceback" in sys.argv or os.environ.get("TENSORMERGE_TRACEBACK") == "1"
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:  # click's form of Ctrl-C
        click.echo("error: interrupted (run it again with --resume to continue a merge)", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except TensorMergeError as e:
        if show_tb:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted (run it again with --resume to continue a merge)", err=True)
        sys.exit(130)
    except Exception as e:
        if show_tb:
            traceback.print_exc()
        click.echo(f"error: internal error {e.__class__.__name__}: {e} (rerun with --traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
