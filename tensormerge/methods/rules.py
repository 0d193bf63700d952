"""Per-tensor parameter values: rules matched against tensor names, gradients across layers.

A parameter's value may vary by tensor, in two YAML forms that cannot be mistaken for a
per-model list (weights, lambdas), since their items are mappings:

    t: {gradient: [0, 0.5, 1]}                        interpolated across the layer index
    k: [{filter: "mlp", value: 0.3}, {value: 0.2}]    the first rule whose filter matches

A filter without glob characters matches as a substring of the tensor name (mergekit's rule);
with `*`, `?` or `[` it is a glob over the whole name; no filter, or `*`, matches every tensor.
A rule's value may be a gradient (rules do not nest). A per-model list may hold either form per model:
`weights: [0.5, {gradient: [0, 1]}]`. The plan resolves every block's values before any work
(`Params.at`), so a tensor that no rule matches is refused up front.

Gradients follow mergekit (parameter_resolver.py, plan.py): a tensor of layer i of a stack of L
layers sits at t = i / (L - 1) (t = 1 when L = 1), every other tensor at t = 0; numeric values
are interpolated linearly between the two nearest of the evenly spaced points, booleans and
strings take the point at or below t.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from tensormerge.errors import ParameterError, short


@dataclass(frozen=True)
class Gradient:
    values: tuple

    def at(self, t: float) -> Any:
        v = self.values
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            return v[int(t * (len(v) - 1))]
        scaled = t * (len(v) - 1)
        i0 = int(scaled)
        i1 = min(len(v) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * v[i0] + frac * v[i1]


@dataclass(frozen=True)
class Rules:
    rules: tuple  # ((filter or None, value), ...)

    def pick(self, name: str) -> tuple[bool, Any]:
        for pattern, value in self.rules:
            if matches(pattern, name):
                return True, value
        return False, None


def matches(pattern: str | None, name: str) -> bool:
    if pattern is None or pattern == "*":
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def is_form(x: Any) -> bool:
    """A gradient mapping or a list of rule mappings (each with `value`)."""
    if isinstance(x, dict):
        return "gradient" in x
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(r, dict) and "value" in r for r in x)


def parse(x: Any, leaf: Callable[[Any], Any], where: str) -> Any:
    """The rule objects of a YAML form, every leaf read by `leaf` (the parameter's type)."""
    if isinstance(x, dict):
        extra = set(x) - {"gradient"}
        values = x.get("gradient")
        if extra or not isinstance(values, list) or not values:
            raise ParameterError(f"{where}: a gradient is {{gradient: [v0, v1, ...]}} with at least one value, "
                                 f"got {short(x)}")
        if any(isinstance(v, (dict, list)) for v in values):
            raise ParameterError(f"{where}: gradient values must be numbers, strings or booleans, got {short(x)}")
        return Gradient(tuple(leaf(v) for v in values))
    rules = []
    for r in x:
        extra = set(r) - {"filter", "value"}
        if extra:
            raise ParameterError(f"{where}: a rule has only `filter` and `value`, got {', '.join(map(short, extra))}")
        pattern = r.get("filter")
        if pattern is not None and not isinstance(pattern, str):
            raise ParameterError(f"{where}: filter {short(pattern)} is not a string")
        value = r["value"]
        if is_form(value) and not isinstance(value, dict):
            raise ParameterError(f"{where}: a rule's value is a value or a gradient, not further rules")
        rules.append((pattern, parse(value, leaf, where) if is_form(value) else leaf(value)))
    return Rules(tuple(rules))


def varies(x: Any) -> bool:
    if isinstance(x, (Gradient, Rules)):
        return True
    return isinstance(x, (list, tuple)) and any(varies(v) for v in x)


class NoMatch(Exception):
    pass


def resolve(x: Any, name: str, t: float) -> Any:
    if isinstance(x, Gradient):
        return x.at(t)
    if isinstance(x, Rules):
        found, value = x.pick(name)
        if not found:
            raise NoMatch
        return resolve(value, name, t)
    if isinstance(x, list):
        return [resolve(v, name, t) for v in x]
    return x


def plain(x: Any) -> Any:
    """The YAML form of a value (what the recipe, card and fingerprint record)."""
    if isinstance(x, Gradient):
        return {"gradient": list(x.values)}
    if isinstance(x, Rules):
        return [({"filter": p} if p is not None else {}) | {"value": plain(v)} for p, v in x.rules]
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


_LAYER = re.compile(r"^(.*?)\.(\d+)\.")


def layer_positions(names: Iterable[str]) -> dict[str, float]:
    """Each tensor's t: its layer index over its stack's (the names before `.N.`) last index."""
    found = {}
    last: dict[str, int] = {}
    for n in names:
        m = _LAYER.match(n)
        if m:
            found[n] = (m.group(1), int(m.group(2)))
            last[m.group(1)] = max(last.get(m.group(1), 0), int(m.group(2)))
    out = {}
    for n in names:
        if n not in found:
            out[n] = 0.0
            continue
        stack, i = found[n]
        count = last[stack] + 1
        out[n] = i / (count - 1) if count > 1 else 1.0
    return out


def unmatched_filters(x: Any, names: Iterable[str]) -> list[str]:
    """The filters of a YAML form (a per-model list's too) that match none of `names`: a filter
    written for another architecture's names ("self_attn" where tensors say "attention") leaves
    its value unused and the next rule's applied, without an error (mergekit's rule as well)."""
    names = list(names)
    found: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            f = v.get("filter")
            if isinstance(f, str) and f not in found and not any(matches(f, n) for n in names):
                found.append(f)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)

    walk(x)
    return found
