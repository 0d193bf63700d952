"""`tensormerge` command line: parse, build a MergeSpec, call the api, print.

Every expected failure prints one line naming the file, tensor or parameter and exits
non-zero; `--traceback` (or TENSORMERGE_TRACEBACK=1) shows the Python stack as well.

Importing this module imports neither torch nor numba (seconds on a loaded machine): each
command imports what it needs, so `--help` and errors in the arguments are immediate.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from tensormerge import __version__
from tensormerge.engine.alloc import keep_freed_buffers
from tensormerge.errors import ParameterError, TensorMergeError, short

DTYPES = ("auto", "float32", "bfloat16", "float16")  # constants.DTYPE_CHOICES, without importing torch


def _split(values: tuple[str, ...], option: str = "--inputs") -> list[str]:
    """Comma-separated lists, repeatable; a value that names an existing path whole is that one
    path (so a path holding a comma can be given: repeat --inputs, one path each). An empty item
    is refused, not dropped: `A,$UNSET,C` would otherwise merge one model fewer without a word."""
    out = []
    for v in values:
        items = [v] if os.path.exists(v.strip()) else v.split(",")
        for i, x in enumerate(items, 1):
            if not x.strip():
                raise ParameterError(f"{option} {short(v)}: item {i} of {len(items)} is empty")
            out.append(x)
    return out


def _params(pairs: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"-p {short(p)}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


# What each recipe key may hold: YAML gives any type, and a wrong one would otherwise surface
# deep inside the merge as an internal error.
_PATH = (str,)
_SIZE = (str, int, float)
_RECIPE_TYPES = {"method": (str,), "inputs": (str, list), "base": _PATH, "stats": (str, list), "base_stats": _PATH,
                 "output": _PATH, "params": (dict,), "max_memory": _SIZE, "dtype": (str,), "shard_size": _SIZE,
                 "device": (str,), "kernels": (str,), "lora": (str,)}
_SCALARS = (str, int, float, bool)
_RECIPE_BYTES = 1 << 20


def _recipe_loader():
    import yaml

    class RecipeLoader(yaml.SafeLoader):
        """SafeLoader without anchors and aliases: nested aliases let a few hundred bytes expand
        to gigabytes (and a megabytes-long error line); a recipe has no use for them."""

        nodes = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None) is not None:
                mark = self.peek_event().start_mark
                raise _RecipeRefused(f"YAML anchors and aliases are not allowed in a recipe (line {mark.line + 1})")
            # pure-Python YAML costs ~0.1 ms a node, and the card echoes every value: a 1 MiB
            # gradient of 100k numbers took a minute; no recipe needs this many values
            self.nodes += 1
            if self.nodes > _RECIPE_NODES:
                mark = self.peek_event().start_mark
                raise _RecipeRefused(f"more than {_RECIPE_NODES} YAML values (line {mark.line + 1}); not a recipe")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            # PyYAML keeps the last of two equal keys: `merge_method: ties` then, further down,
            # `merge_method: linear` would merge silently with the second
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _RecipeRefused(f"key {short(key)} is given twice (lines {seen[key]} and {line}); "
                                             "which one was meant?")
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeConstructor names it
                    continue
            return super().construct_mapping(node, deep)

    return RecipeLoader


_RECIPE_NODES = 20_000


class _RecipeRefused(Exception):
    """A recipe refused while it is parsed (a key given twice, too many values): one line."""


def _recipe(path: str | None) -> dict:
    """A recipe's options; a mergekit configuration (it has `merge_method`) is translated first."""
    if not path:
        return {}
    data = _load_yaml(path)
    if isinstance(data, dict) and "merge_method" in data:
        from tensormerge.mergekit_config import translate

        data = translate(data, path)
    return _native(path, data)


def _load_yaml(path: str, option: str = "--config"):
    try:
        with open(path) as f:
            text = f.read(_RECIPE_BYTES + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise ParameterError(f"{option} {path}: cannot read ({getattr(e, 'strerror', None) or e.__class__.__name__})"
                             ) from None
    if len(text) > _RECIPE_BYTES:
        raise ParameterError(f"{option} {path}: larger than {_RECIPE_BYTES} characters; not a recipe")
    try:
        import yaml

        data = yaml.load(text, Loader=_recipe_loader())  # noqa: S506 (a SafeLoader, without aliases)
    except _RecipeRefused as e:
        raise ParameterError(f"{option} {path}: {e}") from None
    except RecursionError:
        raise ParameterError(f"{option} {path}: not valid YAML (nested too deeply)") from None
    except Exception as e:
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ParameterError(f"{option} {path}: not valid YAML ({where}{problem or e.__class__.__name__})") from None
    return data


def _native(path: str, data) -> dict:
    if not isinstance(data, dict):
        raise ParameterError(f"--config {path}: expected a mapping of options")
    unknown = sorted(map(short, set(data) - set(_RECIPE_TYPES)))
    if unknown:
        raise ParameterError(f"--config {path}: unknown keys {', '.join(unknown[:8])}"
                             f"{f' (+{len(unknown) - 8} more)' if len(unknown) > 8 else ''} "
                             f"(known: {', '.join(sorted(_RECIPE_TYPES))})")
    for key, value in data.items():
        _check_recipe_value(path, key, value)
    return {k: v for k, v in data.items() if v is not None}


def _check_recipe_value(path: str, key: str, value) -> None:
    types = _RECIPE_TYPES[key]
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, types):
        want = " or ".join(t.__name__ for t in types)
        raise ParameterError(f"--config {path}: {key} is {type(value).__name__} {short(value)}, expected {want}")
    if isinstance(value, list):
        bad = next((v for v in value if not isinstance(v, str)), None)
        if bad is not None:
            raise ParameterError(f"--config {path}: {key} lists {type(bad).__name__} {short(bad)}, expected paths")
    if isinstance(value, dict):  # params
        for k, v in value.items():
            if not isinstance(k, str):
                raise ParameterError(f"--config {path}: {key} key {short(k)} is not a string")
            if v is not None and not _param_value(v):
                raise ParameterError(f"--config {path}: {key}.{short(k)[1:-1]} is {short(v)}, expected a number, "
                                     "string, boolean, a list of them, or per-tensor rules ({gradient: [...]}, "
                                     "[{filter: ..., value: ...}, ...])")


def _param_value(v, depth: int = 0) -> bool:
    """Scalars, lists of them, and the per-tensor forms of methods.rules (nested a few deep)."""
    if isinstance(v, _SCALARS):
        return True
    if depth > 6:
        return False
    if isinstance(v, list):
        return all(_param_value(x, depth + 1) for x in v)
    return (isinstance(v, dict) and set(v) <= {"gradient", "filter", "value"}
            and all(_param_value(x, depth + 1) for x in v.values()))


def _spec(kw: dict, sweep: bool = False) -> "api.MergeSpec":
    from tensormerge import api
    from tensormerge import constants as C

    recipe = _recipe(kw.get("config"))
    method = kw["method"] or recipe.get("method")
    if recipe.get("params") and method and not sweep:  # a recipe's values, refused naming the recipe
        from tensormerge.methods import get_method

        m = get_method(method)
        try:
            m.Params.typed(m.name, recipe["params"])
        except ParameterError as e:
            raise ParameterError(f"--config {kw['config']}: params: {e}") from None
    inputs = _split(kw["inputs"]) or recipe.get("inputs") or []
    if isinstance(inputs, str):
        inputs = _split((inputs,), "inputs:")
    stats = _split(kw.get("stats") or (), "--stats") or recipe.get("stats") or []
    if isinstance(stats, str):
        stats = _split((stats,), "stats:")
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
        click.option("--dtype", type=click.Choice(DTYPES), help="output dtype; auto: each tensor keeps the base's dtype (the first input's without a base) [default: auto]"),
        click.option("--shard-size", help="largest output shard [default: 5GB]"),
        click.option("--lora", metavar="concat|full|svd:R|factors",
                     help="LoRA adapters are merged as their updates ΔW = s·B·A: concat (exact, average and "
                     "task_arithmetic; the default for them), full (a full model: --base plus the merged ΔW; any "
                     "method), svd:R (the merged ΔW re-factored to rank R; any method), factors (A and B merged "
                     "separately, not ΔW's merge). Other methods need full or svd:R"),
        click.option("--workers", type=int, help="run on a local dask cluster of N worker processes"),
        click.option("--scheduler", help="run on an existing dask cluster: its scheduler tcp://HOST:PORT"),
        click.option("--output", "-o", help="output directory"),
        click.option("--overwrite", is_flag=True, help="replace a previous tensormerge output (or an empty directory)"),
        click.option("--resume", is_flag=True,
                     help="continue an interrupted merge in OUTPUT.partial (checks what it wrote, reruns the rest)"),
        click.option("--report", type=click.Path(), help="write a JSON report of timings and memory"),
        click.option("--quiet", "-q", is_flag=True, help="no progress bars or summary (warnings still print)"),
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
    from tensormerge import api

    spec = _spec(kw)
    report = api.merge(spec)
    if report.get("already_complete"):
        click.echo(f"{report['output']}: already complete (nothing to resume)")
        return
    if not spec.quiet:
        for line in report["summary"]:
            click.echo(line)
    for line in report["warnings"]:
        click.echo(f"warning: {line}", err=True)


@cli.command()
@merge_options
@click.option("--candidates", type=click.Path(), help="a sweep's YAML list of candidates (see `sweep`)")
def plan(**kw) -> None:
    """Print the blocks, passes and memory estimate of a merge; reads headers only.

    Takes the same arguments as `run`; --output, --overwrite, --report and --quiet are ignored.
    With several values of a parameter (or --candidates), the plan of the sweep: its candidates
    and the groups that share a read under --max-memory."""
    from tensormerge import api

    spec, cands = _sweep_spec(kw, required=False)
    if cands is None:
        click.echo(api.plan(spec))
    else:
        click.echo(api.sweep_plan(spec, cands))


def _list_keys(method: str) -> set[str]:
    import typing

    from tensormerge.methods import get_method

    keys = set()
    for key, _, tp in get_method(method).Params.spec():
        args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is not list else []
        if typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in args):
            keys.add(key)
    return keys


def _sweep_spec(kw: dict, required: bool = True):
    """The spec and the candidates (None when nothing is swept and `required` is False)."""
    from tensormerge import grid

    raw = kw["param"]
    kw = dict(kw, param=(), method=kw["method"] or ("-" if kw.get("candidates") else None))
    spec = _spec(kw, sweep=True)
    pairs = _params(raw)
    if kw.get("candidates"):
        if pairs:
            raise ParameterError("--candidates: give the candidates' parameters there, not with -p as well")
        items = _recipe_list(kw["candidates"])
        cands = grid.from_yaml(kw["method"] or (spec.method if spec.method != "-" else None), items,
                               kw["candidates"])
        for c in cands:
            c.params = {**spec.params, **c.params}
        return spec, cands
    params = {**spec.params, **pairs}
    # per-tensor rules and gradients (methods.rules) from a recipe are one value, never alternatives
    def has_rule(v) -> bool:
        return isinstance(v, dict) or (isinstance(v, list) and any(has_rule(x) for x in v))

    fixed = {k: v for k, v in params.items() if has_rule(v)}
    cands = grid.from_params(spec.method, {k: _alternatives_text(v) for k, v in params.items() if k not in fixed},
                             _list_keys(spec.method))
    for c in cands:
        c.params.update(fixed)
    if len(cands) == 1 and not required:
        import dataclasses

        return dataclasses.replace(spec, params=params), None
    return spec, cands


def _alternatives_text(value) -> str:
    """A --config value as -p text: a YAML list is alternatives of a scalar parameter (or one
    list), a list of lists alternatives of a list-valued one."""
    if isinstance(value, list):
        if value and all(isinstance(v, list) for v in value):
            return "|".join(",".join(map(str, v)) for v in value)
        return ",".join(map(str, value))
    return str(value)


def _recipe_list(path: str):
    return _load_yaml(path, "--candidates")


@cli.command()
@merge_options
@click.option("--candidates", type=click.Path(), help="YAML list of candidates: each a mapping of parameters, or "
              "{name, method, params} (methods may differ; they share the inputs)")
@click.option("--eval", "eval_command", metavar="CMD",
              help="shell command run per candidate ({output} and {candidate} substituted); the last line it "
              "prints is a JSON object of metrics")
@click.option("--eval-python", metavar="MODULE:FUNCTION", help="called with each output path; returns a dict of metrics")
@click.option("--eval-workers", type=int, default=1, show_default=True, help="evaluations run at once")
@click.option("--eval-timeout", type=float, help="seconds an evaluation may take (then it is recorded as failed)")
@click.option("--select", "select_spec", metavar="METRIC[:max|min]", help="choose the best candidate by a metric")
@click.option("--keep", type=click.Choice(["all", "best"]), default="all", show_default=True,
              help="best: remove the other candidates' outputs once the best is chosen (never on a failure)")
@click.option("--plot/--no-plot", default=True, help="sweep.png: the selected metric against each swept parameter")
def sweep(**kw) -> None:
    """Merge several candidates (values of parameters, a grid) from ONE read of the inputs.

    -p lambda=0.2,0.3,0.5 -p k=0.1,0.2 is a grid of six candidates; `|` separates alternatives of
    any parameter, and is how a list-valued one is swept (-p weights=0.3,0.7|0.5,0.5). Each
    candidate is written to OUTPUT/<name> exactly as `run` with its parameters writes it, and
    OUTPUT/sweep.json records them, with metrics from --eval and the choice of --select."""
    from tensormerge import api

    spec, cands = _sweep_spec(kw)
    evaluation = api.Evaluation(kw["eval_command"], kw["eval_python"], kw["select_spec"], kw["keep"],
                                kw["eval_workers"], kw["eval_timeout"], kw["plot"])
    if evaluation.workers < 1:
        raise ParameterError(f"--eval-workers: {evaluation.workers} is not a positive number")
    if evaluation.command and evaluation.python:
        raise ParameterError("--eval and --eval-python: give one")
    if evaluation.keep == "best" and not evaluation.select:
        raise ParameterError("--keep best needs --select METRIC (which candidate is best)")
    result = api.sweep(spec, cands, evaluation, log=None if spec.quiet else (lambda m: click.echo(m, err=True)))
    if result.get("table") and not spec.quiet:
        click.echo(result["table"])
    for line in result.get("notes", []):
        click.echo(line, err=True)
    if result.get("exit_code"):
        sys.exit(result["exit_code"])


@cli.command("convert-config")
@click.argument("path")
@click.option("--traceback", is_flag=True, hidden=True)
def convert_config(path: str, traceback: bool) -> None:
    """Print the tensormerge recipe a mergekit YAML runs as (what `run --config PATH` merges)."""
    import yaml

    data = _load_yaml(path)
    if isinstance(data, dict) and "merge_method" in data:
        from tensormerge.mergekit_config import translate

        data = translate(data, path)
    click.echo(yaml.safe_dump(_native(path, data), sort_keys=False, default_flow_style=None).rstrip("\n"))


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
    from tensormerge.errors import printable
    from tensormerge.sizes import format_size

    ck = open_checkpoint(path)
    try:
        if as_json:
            click.echo(json.dumps({
                "files": ck.files, "aliases": ck.aliases,
                "tensors": {n: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                            for n, t in ck.tensors.items()}}, indent=2))
            return
        total = sum(t.nbytes for n, t in ck.tensors.items() if n not in ck.aliases)
        click.echo(f"{printable(path)}: {len(ck.tensors)} tensors in {len(ck.files)} file(s), {format_size(total)}")
        for f in ck.files:
            click.echo(f"  file {printable(os.path.relpath(f, ck.root))}")
        for n, t in ck.tensors.items():
            tied = f"  (tied to {printable(ck.aliases[n])})" if n in ck.aliases else ""
            click.echo(f"  {printable(n):<64} {str(t.dtype).replace('torch.', ''):<9} {list(t.shape)}{tied}")
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
    if d["citation"]:
        click.echo(f"  paper: {d['citation']}")
    click.echo(f"  needs base: {'yes' if d['needs_base'] else 'no'}   split by rows: {'yes' if d['row_split'] else 'no'}")
    if d["statistics"]:
        click.echo(f"  statistics: {d['statistics']}")
    rows = [(f"{p['key']}={p['default']!s}", f"({p['type']})", p["help"]
             + (f" [{' | '.join(p['choices'])}]" if p["choices"] else "")) for p in d["parameters"]]
    wide = [max((len(r[i]) for r in rows), default=0) for i in (0, 1)]
    for setting, kind, text in rows:
        click.echo(f"  -p {setting:<{wide[0]}}  {kind:<{wide[1]}}  {text}")


from tensormerge.stats.cli import stats as _stats_group

cli.add_command(_stats_group)


def _one_line(text: str) -> str:
    """An error is one line whatever a path or name holds: control characters (a newline in a
    file name could forge a second `error:` line) are shown escaped."""
    return "".join(repr(c)[1:-1] if (ord(c) < 32 or ord(c) == 127) else c for c in text)


def main() -> None:
    keep_freed_buffers()  # before any thread first allocates (engine.alloc)
    show_tb = "--traceback" in sys.argv or os.environ.get("TENSORMERGE_TRACEBACK") == "1"
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:  # click's form of Ctrl-C
        click.echo("error: interrupted (run the same command again with --resume to continue)", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        sys.exit(e.exit_code)
    except TensorMergeError as e:
        if show_tb:
            traceback.print_exc()
        click.echo(f"error: {_one_line(str(e))}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted (run the same command again with --resume to continue)", err=True)
        sys.exit(130)
    except Exception as e:
        if show_tb:
            traceback.print_exc()
        hint = "" if show_tb else " (rerun with --traceback)"
        click.echo(f"error: internal error {e.__class__.__name__}: {_one_line(str(e))}{hint}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
