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
@click.option("--overwrite", is_flag=True, help="replace an existing store (with --append: that kind in it)")
@click.option("--append", is_flag=True, help="add this kind to an existing store (e.g. Grams beside a Fisher)")
@click.option("--quiet", "-q", is_flag=True, help="no summary line")
@click.option("--traceback", is_flag=True, hidden=True)
def import_cmd(file: str, kind: str, output: str, model: str | None, count: int | None,
               fisher_type: str | None, overwrite: bool, append: bool, quiet: bool, traceback: bool) -> None:
    """Convert research code's statistics FILE (.pt/.pth/.bin, .safetensors, .h5) into a store."""
    from tensormerge.stats.importers import import_stats

    summary = import_stats(file, kind, output, model=model, count=count, fisher_type=fisher_type,
                           overwrite=overwrite, append=append)
    for w in summary["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if not quiet:
        renamed = f", {len(summary['renamed'])} renamed" if summary["renamed"] else ""
        checked = f", checked against {model}" if model else ""
        click.echo(f"wrote {output}: {summary['arrays']} {kind} arrays from {file}{renamed}{checked}")


def inspect_store(path: str, as_json: bool) -> str:
    """A store's root attributes and arrays, for `tensormerge inspect S.zarr`."""
    from tensormerge.stats.store import StatsStore

    store = StatsStore(path)
    arrays = {kind: {name: {"shape": list(info.shape), "count": info.attrs.get("count")}
                     for name, info in group.items()}
              for kind, group in store.arrays.items() if group}
    if as_json:
        return json.dumps({"path": path, "attrs": store.attrs, "arrays": arrays}, indent=2)
    lines = [f"{path}: statistics store, {sum(len(a) for a in arrays.values())} arrays"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in store.attrs.items()]
    for kind, group in arrays.items():
        lines.append(f"  {kind} ({len(group)})")
        lines += [f"    {name:<64} {a['shape']!s:<16} count={a['count']}" for name, a in group.items()]
    return "\n".join(lines)
