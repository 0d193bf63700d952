"""mergekit recipes, translated into tensormerge's own (method, params, inputs, base, dtype).

`run --config` hands a YAML with `merge_method` here; `convert-config` prints the result. The
translation is exact or refused: every key mergekit would read and tensormerge cannot honour
(layer stacking, tokenizer unions, LoRA suffixes, unknown keys) is a one-line error naming the
key, never silently dropped. mergekit's parameter precedence (a model's own value, then the
slice's, then the top-level `parameters`, then the method's default; config.py,
parameter_resolver.py) becomes one value per model: where a higher level has filters that do
not match every tensor, the lower levels follow as further rules. Values that vary by tensor
keep mergekit's forms in tensormerge's syntax (methods.rules): a list of numbers is a gradient,
`{filter, value}` mappings are rules (mergekit matches a filter as a substring).

mergekit computes in `dtype` and writes `out_dtype` (else `dtype`); tensormerge computes in
float32 or wider and writes `--dtype`, which is `out_dtype` or `dtype` here.
"""

from __future__ import annotations

import os
from typing import Any

from tensormerge.errors import ParameterError, short

_MISSING = object()

# mergekit's generalized task arithmetic presets (merge_methods/registry.py): its defaults of
# normalize and rescale, and which of the per-model parameters each one reads.
_GTA = {
    # name: (tensormerge method, fixed params, normalize, rescale, extra per-model parameter)
    "task_arithmetic": ("gta", {"sparsify": "none", "consensus": "none"}, False, False, None),
    "ties": ("gta", {"sparsify": "magnitude", "consensus": "sum"}, True, False, None),
    "dare_ties": ("dare_ties", {}, False, True, None),
    "dare_linear": ("dare_linear", {}, False, True, None),
    "breadcrumbs": ("breadcrumbs", {}, False, False, ("gamma", 0.01)),
    "breadcrumbs_ties": ("breadcrumbs_ties", {}, False, False, ("gamma", 0.01)),
    "della": ("della", {}, True, True, ("epsilon", 0.15)),
    "della_linear": ("della_linear", {}, False, True, ("epsilon", 0.15)),
}
SUPPORTED = ("linear", *_GTA, "slerp", "model_stock")

# Keys of a mergekit configuration that tensormerge refuses, with the reason.
REFUSED = {
    "modules": "merges per module (multimodal models) are not supported; merge the whole model",
    "tokenizer": "tokenizer unions and token embeddings surgery are not supported",
    "chat_template": "tensormerge copies the base's tokenizer files as they are; it cannot set a chat template",
}
_TOP = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source",
        *REFUSED}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def is_mergekit(data: dict) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _shared_and_per_model(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """mergekit's parameters of a method: (shared ones, per-model ones), each with its default
    (_MISSING: required)."""
    if method == "linear":
        return {"normalize": True}, {"weight": _MISSING}
    if method == "slerp":
        return {"t": _MISSING}, {}
    if method == "model_stock":
        return {"filter_wise": False}, {}
    _, _, normalize, rescale, extra = _GTA[method]
    per_model = {"weight": _MISSING, "density": 1.0}
    if extra:
        per_model[extra[0]] = extra[1]
    return {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}, per_model


def translate(data: dict, path: str = "recipe") -> dict:
    """The native recipe of a mergekit configuration (the keys `--config` reads)."""
    where = f"--config {path}"
    unknown = sorted(map(str, set(data) - _TOP))
    if unknown:
        hint = (" (mergekit reads normalize, rescale and int8_mask under `parameters`)"
                if set(unknown) & {"normalize", "rescale", "int8_mask"} else "")
        raise ParameterError(f"{where}: unknown mergekit key {short(unknown[0])}{hint}")
    for key, why in REFUSED.items():
        if data.get(key) is not None:
            raise ParameterError(f"{where}: mergekit key {key!r} is not supported: {why}")
    method = data["merge_method"]
    if method not in SUPPORTED:
        why = ("layer stacking is not a merge tensormerge makes" if method == "passthrough"
               else f"supported: {', '.join(SUPPORTED)}")
        raise ParameterError(f"{where}: merge_method {short(method)} is not supported ({why})")
    base = data.get("base_model")
    if base is not None:
        base = _model(base, f"{where}: base_model")
    models, slice_params = _sources(data, where)
    top = _params_dict(data.get("parameters"), f"{where}: parameters")
    shared, per_model = _shared_and_per_model(method)
    for key in top:
        if key not in shared and key not in per_model:
            raise ParameterError(f"{where}: parameters.{key} is not a parameter of mergekit's {method} "
                                 f"(its parameters: {', '.join([*shared, *per_model])})")
    for key in slice_params:
        if key not in shared and key not in per_model:
            raise ParameterError(f"{where}: slices[0].parameters.{key} is not a parameter of mergekit's {method}")

    tokenizer = data.get("tokenizer_source")
    if tokenizer is not None and tokenizer != "base":
        raise ParameterError(f"{where}: tokenizer_source {short(tokenizer)} is not supported (only `base`: "
                             "tensormerge copies the base's tokenizer files)")
    if tokenizer == "base" and base is None:
        raise ParameterError(f"{where}: tokenizer_source: base needs base_model")

    uses_base = method != "linear"
    if uses_base and base is None:
        raise ParameterError(f"{where}: merge_method {method} needs base_model")
    inputs = [(m, p, i) for m, p, i in models if not (uses_base and _same(m, base))]
    for m, p, label in models:
        if uses_base and _same(m, base):
            continue  # mergekit reads no per-model parameter of the base (ParameterScope.NON_BASE)
        for key in p:
            if key in shared:
                raise ParameterError(f"{where}: {label}.parameters.{key} is a parameter of the whole merge in "
                                     f"mergekit's {method}, not of one model (put it under the top-level parameters)")
            if key not in per_model:
                raise ParameterError(f"{where}: {label}.parameters.{key} is not a parameter of mergekit's {method} "
                                     f"(per model: {', '.join(per_model) or 'none'})")
    if method == "slerp" and len(inputs) != 1:
        raise ParameterError(f"{where}: slerp merges base_model with exactly one other model, got {len(inputs)} "
                             "besides the base")
    if method == "model_stock" and len(inputs) < 2:
        raise ParameterError(f"{where}: model_stock needs at least two models besides base_model")
    if not inputs:
        raise ParameterError(f"{where}: no model to merge besides base_model")

    params: dict[str, Any] = {}
    for key, default in shared.items():
        value = _chain([slice_params.get(key, _MISSING), top.get(key, _MISSING)], default, f"{where}: {key}")
        if value is _MISSING:
            raise ParameterError(f"{where}: mergekit's {method} needs parameters.{key}")
        params[key] = value
    per: dict[str, list] = {}
    for key, default in per_model.items():
        values = []
        for m, p, label in inputs:
            value = _chain([p.get(key, _MISSING), slice_params.get(key, _MISSING), top.get(key, _MISSING)],
                           default, f"{where}: {label}.parameters.{key}")
            if value is _MISSING:
                raise ParameterError(f"{where}: {label}.parameters.{key} is required by mergekit's {method}")
            values.append(value)
        per[key] = values

    native: dict[str, Any]
    if method == "linear":
        native = {"method": "average", "params": {"weights": per["weight"], "normalize": params["normalize"]}}
    elif method == "slerp":
        native = {"method": "slerp", "params": {"t": params["t"]}}
    elif method == "model_stock":
        native = {"method": "model_stock", "params": ({"filter_wise": True} if params["filter_wise"] else {})}
    else:
        name, fixed, _, _, extra = _GTA[method]
        out = dict(fixed)
        out["weights"] = per["weight"]
        out["density"] = per["density"]
        if extra:
            values = per[extra[0]]
            out[extra[0]] = values[0] if all(v == values[0] for v in values) else values
        out["lambda"] = params["lambda"]
        out["normalize"] = params["normalize"]
        out["rescale"] = params["rescale"]
        if params["int8_mask"] is not False:
            out["int8_mask"] = params["int8_mask"]
        native = {"method": name, "params": out}
    native["inputs"] = [m for m, _, _ in inputs]
    if base is not None:
        native["base"] = base
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        key = "out_dtype" if data.get("out_dtype") else "dtype"
        name = str(dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise ParameterError(f"{where}: {key} {short(dtype)} is not one of {', '.join(_DTYPES)}")
        native["dtype"] = _DTYPES[name]
    return native


def _model(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ParameterError(f"{where}: expected a model path or hub name, got {short(value)}")
    if "+" in value:
        raise ParameterError(f"{where}: {short(value)} names a LoRA to apply (model+lora), which is not supported; "
                             "merge the adapter into its model first, or pass PEFT adapters as --inputs")
    return value


def _params_dict(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or any(not isinstance(k, str) for k in value):
        raise ParameterError(f"{where}: expected a mapping of parameter names to values, got {short(value)}")
    return value


def _sources(data: dict, where: str) -> tuple[list[tuple[str, dict, str]], dict]:
    """The models in order, each with its own parameters and its name in the recipe; and the
    slice's parameters (a single slice covering every model's whole layer range)."""
    models, slices = data.get("models"), data.get("slices")
    if (models is None) == (slices is None):
        raise ParameterError(f"{where}: a mergekit recipe has exactly one of `models` or `slices`")
    out = []
    if models is not None:
        if not isinstance(models, list) or not models:
            raise ParameterError(f"{where}: models must be a non-empty list")
        for i, entry in enumerate(models):
            label = f"models[{i}]"
            entry = {"model": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, dict):
                raise ParameterError(f"{where}: {label} must be a mapping with `model`")
            extra = sorted(map(str, set(entry) - {"model", "parameters"}))
            if extra:
                raise ParameterError(f"{where}: {label}.{extra[0]} is not a mergekit model key")
            out.append((_model(entry.get("model"), f"{where}: {label}.model"),
                        _params_dict(entry.get("parameters"), f"{where}: {label}.parameters"), label))
        return _distinct(out, where), {}
    if not isinstance(slices, list) or len(slices) != 1:
        raise ParameterError(f"{where}: slices: only one slice covering every model's whole layer range is "
                             "supported (layer stacking is not)")
    sl = slices[0]
    if not isinstance(sl, dict):
        raise ParameterError(f"{where}: slices[0] must be a mapping with `sources`")
    extra = sorted(map(str, set(sl) - {"sources", "parameters", "base_model"}))
    if extra:
        raise ParameterError(f"{where}: slices[0].{extra[0]} is not supported")
    if sl.get("base_model") is not None and sl["base_model"] != data.get("base_model"):
        raise ParameterError(f"{where}: slices[0].base_model differs from base_model, which is not supported")
    sources = sl.get("sources")
    if not isinstance(sources, list) or not sources:
        raise ParameterError(f"{where}: slices[0].sources must be a non-empty list")
    ranges = []
    for i, src in enumerate(sources):
        label = f"slices[0].sources[{i}]"
        if not isinstance(src, dict):
            raise ParameterError(f"{where}: {label} must be a mapping with `model` and `layer_range`")
        extra = sorted(map(str, set(src) - {"model", "layer_range", "parameters"}))
        if extra:
            raise ParameterError(f"{where}: {label}.{extra[0]} is not a mergekit source key")
        model = _model(src.get("model"), f"{where}: {label}.model")
        lr = src.get("layer_range")
        if (not isinstance(lr, list) or len(lr) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in lr)
                or lr[0] != 0 or lr[1] <= 0):
            raise ParameterError(f"{where}: {label}.layer_range {short(lr)}: only a whole range [0, layers] is "
                                 "supported (layer stacking is not)")
        layers = _layers(model)
        if layers is None:  # unchecked, a slice of the first layers would merge the whole model silently
            raise ParameterError(f"{where}: {label}.layer_range {lr}: cannot tell how many layers {model} has "
                                 "(no config.json stating num_hidden_layers); only whole ranges are supported, so "
                                 "list the models under `models:` instead of `slices:`")
        if lr[1] != layers:
            raise ParameterError(f"{where}: {label}.layer_range {lr} does not cover {model}'s {layers} layers "
                                 "(only whole ranges are supported)")
        ranges.append(tuple(lr))
        out.append((model, _params_dict(src.get("parameters"), f"{where}: {label}.parameters"), label))
    if len(set(ranges)) > 1:
        raise ParameterError(f"{where}: slices[0].sources: layer_range differs between models "
                             f"({', '.join(str(list(r)) for r in dict.fromkeys(ranges))}); only the same whole "
                             "range of every model is supported")
    return _distinct(out, where), _params_dict(sl.get("parameters"), f"{where}: slices[0].parameters")


def _key(model: str) -> str:
    """What a model names: a local path by its real path (`a`, `./a`, `a/` are one model)."""
    return os.path.realpath(model) if os.path.exists(model) else model


def _same(a: str, b: str | None) -> bool:
    return b is not None and _key(a) == _key(b)


def _distinct(models: list, where: str) -> list:
    seen = {}
    for m, _, label in models:
        if _key(m) in seen:
            same = f" (as {short(seen[_key(m)])})" if seen[_key(m)] != m else ""
            raise ParameterError(f"{where}: {label}.model {short(m)} is listed twice{same}")
        seen[_key(m)] = m
    return models


def _layers(model: str) -> int | None:
    """The layer count a model's config.json states (a local directory's, else a hub model's,
    downloading that one file unless offline), when it states one: at its top level or, for a
    multimodal model, in its text_config as mergekit reads it."""
    import json

    path = os.path.join(model, "config.json")
    if not os.path.exists(model):
        try:
            from huggingface_hub import hf_hub_download

            repo, _, revision = model.partition("@")
            path = hf_hub_download(repo, "config.json", revision=revision or None)
        except Exception:  # not a hub id, offline and not cached, no such repo: the count is unknown
            return None
    try:
        with open(path, "rb") as f:
            cfg = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(c, dict) and isinstance(c.get(key), int) and not isinstance(c.get(key), bool):
                return c[key]
    return None


def _chain(settings: list, default: Any, where: str) -> Any:
    """mergekit's precedence as one value: the first setting that gives a value for every
    tensor wins; rules that match only some tensors are followed by the lower settings."""
    rules: list = []
    settings = [_setting(s, where) if s is not _MISSING and s is not None else None for s in settings]  # all checked
    for s in settings:
        if s is None:  # not given, or an empty list: mergekit reads no value here
            continue
        if isinstance(s, list) and s and isinstance(s[0], dict) and "value" in s[0]:
            rules += s
            if any("filter" not in r for r in s):
                return _rules(rules)
            continue
        if not rules:
            return s
        return _rules(rules + [{"value": s}])
    if default is _MISSING:
        return _rules(rules) if rules else _MISSING
    return _rules(rules + [{"value": default}]) if rules else default


def _rules(rules: list) -> list:
    out = []
    for r in rules:
        out.append(r)
        if "filter" not in r:
            break  # rules after a catch-all are never reached
    return out


def _setting(s: Any, where: str) -> Any:
    """One mergekit ParameterSetting in tensormerge's syntax."""
    if isinstance(s, (bool, int, float, str)):
        return s
    if isinstance(s, dict):
        s = [s]
    if not isinstance(s, list):
        raise ParameterError(f"{where}: {short(s)} is not a mergekit parameter value")
    if not s:
        return None
    if all(isinstance(x, (bool, int, float, str)) for x in s):
        return {"gradient": list(s)}
    out = []
    for c in s:
        if not isinstance(c, dict) or "value" not in c or set(c) - {"filter", "value"}:
            raise ParameterError(f"{where}: {short(c)} is not a mergekit conditional parameter "
                                 "({filter: ..., value: ...})")
        value = c["value"]
        if isinstance(value, list):
            if not value or not all(isinstance(x, (bool, int, float, str)) for x in value):
                raise ParameterError(f"{where}: value {short(value)} is not a number or a gradient")
            value = {"gradient": list(value)}
        elif not isinstance(value, (bool, int, float, str)):
            raise ParameterError(f"{where}: value {short(value)} is not a number or a gradient")
        f = c.get("filter")
        if f is not None and not isinstance(f, str):
            raise ParameterError(f"{where}: filter {short(f)} is not a string")
        if f is not None and f != "*" and any(ch in f for ch in "*?["):
            raise ParameterError(f"{where}: filter {short(f)}: mergekit matches filters as plain substrings, "
                                 "so its glob characters would mean something else here")
        out.append({"value": value} if f is None or f == "*" else {"filter": f, "value": value})
    return out
