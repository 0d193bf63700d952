"""What the output says about itself: its model card, the recipe that remakes it, and the dtype
its `config.json` states.

A merge uploaded with the base's README.md would describe the wrong model, and a config.json
left saying float32 above bfloat16 weights makes `from_pretrained(dtype="auto")` load them in
the wrong precision. These are pure functions of the plan and the run's settings; the writer
puts their text into `OUT.partial` beside the weights, so they appear with the rename or not
at all.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import torch

from tensormerge import __version__
from tensormerge import constants as C

CARD = "README.md"
RECIPE = "tensormerge-recipe.yaml"
CONFIG = "config.json"
# A config.json is a few KB; a larger one is left as copied rather than parsed into memory.
MAX_CONFIG_BYTES = 16 * 1024 * 1024
# The base card's front matter is at its very start; no more of it is read.
MAX_CARD_HEAD_BYTES = 64 * 1024
_PIPELINE_TAG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ dtypes
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def written_dtype(blocks) -> torch.dtype | None:
    """The one dtype config.json states: that of most floating-point elements written (tied
    tensors counted once), the first such dtype in output order on a tie; None without any
    floating-point tensor. Under --dtype X every floating-point tensor is X, so this is X."""
    counts: dict[torch.dtype, int] = {}
    for b in blocks:  # merged, computed (LoRA factors) or copied (tensors no adapter updates)
        if b.out_dtype.is_floating_point:
            counts[b.out_dtype] = counts.get(b.out_dtype, 0) + b.numel
    if not counts:
        return None
    return max(counts, key=lambda d: counts[d])  # max keeps the first of equal counts


def auto_dtype_disagreements(plan, dtype_choice: str | None) -> str | None:
    """Under --dtype auto each tensor keeps the base's dtype (the first input's without a base);
    a line saying so when the models store some floating-point tensor in different dtypes."""
    if dtype_choice not in (None, "", "auto"):
        return None
    cks = plan.checkpoints
    labels = [f"input {i + 1}" for i in range(len(plan.inputs))] + (["the base"] if plan.base is not None else [])
    differing = []
    for b in plan.blocks:
        if b.kind != "merge":
            continue
        dtypes = [ck.tensors[r].dtype for ck, r in zip(cks, b.reads) if r is not None and r in ck.tensors]
        if len(set(dtypes)) > 1:
            differing.append((b, dtypes))
    if not differing:
        return None
    b, dtypes = differing[0]
    example = ", ".join(f"{dtype_name(d)} in {label}" for d, label in zip(dtypes, labels))
    keeps = "the base's" if plan.base is not None else "the first input's"
    return (f"--dtype auto: the models store {len(differing)} tensor(s) in different dtypes (e.g. {b.name!r}: "
            f"{example}); the output keeps {keeps} dtype for each (pass --dtype to choose one)")


def config_with_dtype(raw: bytes, dtype: torch.dtype, uniform: bool) -> bytes | None:
    """config.json stating `dtype`: `torch_dtype` always, `dtype` where the config has that key
    (transformers 5 writes it and prefers it), and the sub-configs' own dtype keys (text_config,
    vision_config, ...) when every floating-point tensor has this dtype. None when the text is
    not a JSON object; the original bytes when nothing changes."""
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(cfg, dict):
        return None
    name = dtype_name(dtype)
    before = json.dumps(cfg, sort_keys=True)

    def set_keys(d: dict, keys: tuple[str, ...], add: bool) -> None:
        for key in keys:
            if key not in d and not add:
                continue
            value = d.get(key)
            if value is None or isinstance(value, str):
                d[key] = name
            elif isinstance(value, dict) and uniform and all(v is None or isinstance(v, str) for v in value.values()):
                d[key] = {k: name for k in value}  # transformers 5's per-sub-model dtypes

    set_keys(cfg, ("torch_dtype",), add=True)
    set_keys(cfg, ("dtype",), add=False)
    if uniform:
        for key, sub in cfg.items():
            if isinstance(sub, dict) and (key.endswith("_config") or key in ("encoder", "decoder")):
                set_keys(sub, ("torch_dtype", "dtype"), add=False)
    if json.dumps(cfg, sort_keys=True) == before:
        return raw
    return (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# ------------------------------------------------------------------ where the models came from
def _local(path: str) -> bool:
    return os.path.exists(path)


def model_ref(ck) -> dict:
    """How the card and the recipe name a model: a hub input as its repo id and the commit of
    the snapshot read (a recipe then reads those very files again), a local one by its
    absolute path (a recipe must not depend on the directory it is run from)."""
    commit = getattr(ck, "hub_commit", None)
    if commit is not None:
        repo = ck.spec.partition("@")[0]
        return {"hub": True, "name": repo, "commit": commit, "spec": f"{repo}@{commit}"}
    path = os.path.abspath(ck.spec) if _local(ck.spec) else ck.spec
    return {"hub": False, "name": path, "commit": None, "spec": path}


def _store_ref(path: str | None) -> str | None:
    """A local statistics store as an absolute path; an fsspec URL as given."""
    if not path:
        return None
    return os.path.abspath(path) if "://" not in path and _local(path) else path


# ------------------------------------------------------------------ the recipe
def recipe(plan, settings: dict) -> dict:
    """The options `tensormerge run --config` reads that decide the output bytes, typed:
    every parameter with its value (defaults included, so a later default does not change the
    merge), models and stores as `model_ref` names them. `output` is left to the command line."""
    params = {}
    for key, value in plan.params.as_dict().items():
        if value is None:
            continue  # an unset optional parameter: its default behaviour
        if key in plan.extras:  # a checkpoint read beside the inputs (MaTS' init): named as they are
            value = model_ref(plan.extras[key])["spec"]
        params[key] = list(value) if isinstance(value, (list, tuple)) else value
    inputs, base = user_checkpoints(plan)
    out: dict[str, Any] = {"method": plan.method.name, "inputs": [model_ref(ck)["spec"] for ck in inputs]}
    if base is not None:
        out["base"] = model_ref(base)["spec"]
    stats = [_store_ref(s) for s in settings.get("stats") or []]
    if stats:
        out["stats"] = stats
    if settings.get("base_stats"):
        out["base_stats"] = _store_ref(settings["base_stats"])
    out["params"] = params
    for key, default in (("dtype", "auto"), ("shard_size", C.DEFAULT_SHARD_SIZE),
                         ("max_memory", C.DEFAULT_MAX_MEMORY), ("device", "cpu"), ("kernels", "auto")):
        value = settings.get(key)
        out[key] = default if value in (None, "") else value
    lora = getattr(plan, "lora", None)
    if lora is not None and lora.option() is not None:
        out["lora"] = lora.option()  # explicit, so a later default does not change the merge
    return out


def user_checkpoints(plan) -> tuple[list, Any]:
    """The inputs and base as the user named them (adapters: not the engine's virtual ones)."""
    lora = getattr(plan, "lora", None)
    return (plan.inputs, plan.base) if lora is None else lora.user_checkpoints(plan)


def _yaml(obj: Any) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # a loader that refuses aliases must still read it
            return True

    return yaml.dump(obj, Dumper=Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def recipe_text(plan, settings: dict) -> str:
    head = (f"# tensormerge {__version__} recipe of this merge. It remakes the same weights, byte for byte:\n"
            f"#   tensormerge run --config {RECIPE} --output DIR\n")
    return head + _yaml(recipe(plan, settings))


# ------------------------------------------------------------------ the card
def _front_matter(text: str) -> dict:
    """The YAML front matter of a Hub card, or {} (none, or not a mapping, or not YAML)."""
    import yaml

    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
        data = yaml.safe_load("\n".join(lines[1:end]))
    except Exception:  # no closing line, or YAML the base's authors got wrong: no metadata
        return {}
    return data if isinstance(data, dict) else {}


def base_pipeline_tag(config_dir: str | None) -> str | None:
    """`pipeline_tag` of the base's own card (README.md beside its config), when it has one."""
    if not config_dir:
        return None
    path = os.path.join(config_dir, CARD)
    try:
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            head = f.read(MAX_CARD_HEAD_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return None
    tag = _front_matter(head).get("pipeline_tag")
    return tag if isinstance(tag, str) and _PIPELINE_TAG.match(tag) else None


def is_adapter(ck) -> bool:
    names = {os.path.basename(f) for f in ck.files}
    return bool(names & {C.ADAPTER_SAFE, C.ADAPTER_BIN}) or (
        ck.config_dir is not None and os.path.isfile(os.path.join(ck.config_dir, "adapter_config.json")))


def _visible(text: str) -> str:
    """Control characters (a newline, a carriage return, a terminal escape in a path) shown
    escaped, as `\\n`: the card names the path the merge read, not one that looks like it."""
    return "".join(repr(c)[1:-1] if (ord(c) < 32 or ord(c) == 127) else c for c in str(text))


def _code(text: str) -> str:
    """Any text as one inline code span of a Markdown table cell: Markdown and HTML inside a code
    span are shown, never rendered (a path or a parameter value may hold `<img onerror=...>`);
    the fence is longer than any run of backticks in the text, so none can close it early."""
    text = _visible(text).replace("|", "\\|")
    runs = [len(r) for r in re.findall("`+", text)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or (text.startswith(" ") and text.endswith(" ")) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _plain(text: str) -> str:
    """Text outside a code span with the marks that start Markdown emphasis, links, code or HTML
    backslash-escaped (CommonMark lets any punctuation be): none of it is rendered."""
    return "".join("\\" + c if c in _PUNCTUATION else c for c in _visible(text))


_PUNCTUATION = set("\\`*_[]<>&!|~")


def _revision(commit: str | None) -> str:
    if not commit:
        return "local files"
    return commit if re.fullmatch("[0-9a-f]{7,64}", commit) else _code(commit)  # a hub ref's file may hold anything


def _fenced(body: str, info: str) -> list[str]:
    """A fenced code block whose fence no line of `body` can close."""
    runs = [len(r) for r in re.findall("`{3,}", body)]
    fence = "`" * max(3, max(runs, default=0) + 1)
    return [fence + info, body, fence]


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)) and not any(isinstance(x, (dict, list)) for x in v):
        return ", ".join(_value(x) for x in v)
    if isinstance(v, (dict, list)):  # per-tensor rules (methods.rules), in their YAML form
        return json.dumps(v)
    return str(v)


def card_text(plan, settings: dict, out_dir: str, written: torch.dtype | None) -> str:
    method = plan.method
    inputs, base = user_checkpoints(plan)
    refs = [("input " + str(i + 1), model_ref(ck)) for i, ck in enumerate(inputs)]
    if base is not None:
        refs.append(("base", model_ref(base)))
    extras = [(f"`{role}` parameter", model_ref(ck)) for role, ck in sorted(plan.extras.items())]
    base_models: list[str] = []
    for _, r in refs:
        if r["name"] not in base_models:
            base_models.append(r["name"])
    # an adapter output (engine.lora) is written as adapter_model.safetensors, whatever ref is
    adapter = getattr(plan, "weights_name", None) == C.ADAPTER_SAFE or (
        getattr(plan, "lora", None) is None and is_adapter(plan.ref))
    front: dict[str, Any] = {"base_model": base_models}
    if not adapter:
        front["base_model_relation"] = "merge"
    front["library_name"] = "peft" if adapter else "transformers"
    front["tags"] = ["merge", "tensormerge", method.name]
    tag = base_pipeline_tag(plan.ref.config_dir)
    if tag:
        front["pipeline_tag"] = tag

    rec = recipe(plan, settings)
    dtype_choice = rec["dtype"]
    lines = ["---", _yaml(front).rstrip("\n"), "---", "",
             f"# {_plain(os.path.basename(os.path.normpath(out_dir)))}", "",
             f"A merge of {len(plan.inputs)} model(s) made with tensormerge {__version__}.", "",
             "## Method", "", f"`{method.name}`: {method.summary}.", ""]
    if getattr(method, "citation", ""):
        lines += [f"Paper: {method.citation}", ""]
    lines += ["## Parameters", "", "| parameter | value |", "| --- | --- |"]
    for key, value in plan.params.as_dict().items():
        shown = "(default)" if value is None else _code(_value(value))
        lines.append(f"| `{key}` | {shown} |")
    written_name = dtype_name(written) if written is not None else "none (no floating-point tensors)"
    auto = " (auto: each tensor in the base's dtype, the first input's without a base)" if dtype_choice == "auto" else ""
    states = "" if adapter else "; `config.json` states it"  # an adapter's config names no dtype
    lines += ["", f"Output dtype: `{written_name}` (`--dtype {dtype_choice}`{auto}){states}.", "",
              "## Models", "", "| role | model | revision |", "| --- | --- | --- |"]
    for role, r in refs + extras:
        lines.append(f"| {role} | {_code(r['name'])} | {_revision(r['commit'])} |")
    lines += ["", "## Statistics", ""]
    stats = rec.get("stats") or []
    if stats:
        lines += ["| model | statistics store |", "| --- | --- |"]
        lines += [f"| input {i + 1} | {_code(s)} |" for i, s in enumerate(stats)]
        if rec.get("base_stats"):
            lines.append(f"| base | {_code(rec['base_stats'])} |")
        merged, fallback = plan.merge_blocks, plan.fallback_blocks
        lines += ["", f"{sum(1 for b in merged if b.stats)} of the {len(merged)} merged tensors were merged with their "
                  f"statistics; {len(fallback)} had none in the stores and were {plan.method.fallback_label} "
                  f"(`{C.PROVENANCE}`: `fallback_blocks`)."]
    else:
        lines.append("None: this method uses the weights alone.")
    lines += ["", "## Reproduce", "",
              f"`{RECIPE}` in this directory holds the recipe; with the same models and tensormerge {__version__}",
              "it writes the same weights, byte for byte:", "", "```bash",
              f"tensormerge run --config {RECIPE} --output merged", "```", "",
              *_fenced(_yaml(rec).rstrip("\n"), "yaml"), "",
              f"`{C.PROVENANCE}` records each model's fingerprint, the versions used, and a crc32 per tensor.", ""]
    return "\n".join(lines)


def generated_files(plan, settings: dict, out_dir: str, partial: str,
                    warn_fn: Callable[[str], None] | None = warn) -> dict[str, bytes]:
    """The files the writer adds to `OUT.partial` after copying the side files: the card, the
    recipe, and config.json (the copy just made, so whatever confines side-file copies holds)
    rewritten to state the written dtype."""
    written = written_dtype(plan.blocks)
    files = {CARD: card_text(plan, settings, out_dir, written).encode("utf-8"),
             RECIPE: recipe_text(plan, settings).encode("utf-8")}
    config = os.path.join(partial, CONFIG)
    if written is not None and os.path.isfile(config):
        if os.path.getsize(config) > MAX_CONFIG_BYTES:
            new = None
        else:
            with open(config, "rb") as f:
                new = config_with_dtype(f.read(), written, uniform=_uniform(plan.blocks))
        if new is None:
            if warn_fn is not None:
                warn_fn(f"{CONFIG}: not a JSON object of at most {MAX_CONFIG_BYTES} bytes; copied unchanged, "
                        f"without the written dtype ({dtype_name(written)})")
        else:
            files[CONFIG] = new
    return files


def _uniform(blocks) -> bool:
    return len({b.out_dtype for b in blocks if b.kind == "merge" and b.out_dtype.is_floating_point}) <= 1
