"""A sweep's candidates: `-p` values with several alternatives (a grid), or a YAML list.

Alternatives of a parameter are separated by `|` (any parameter) or, for a parameter that is not
itself a list, by `,`: `-p lambda=0.2,0.3,0.5` is three candidates, `-p weights=0.3,0.7|0.5,0.5`
is two (each a list of two weights), and `-p weights=0.3,0.7` is one. The grid is the product of
every parameter's alternatives, in the order the parameters were given (the last varies
fastest). A YAML list (`--candidates FILE`) names each candidate's parameters in full, and may
give each its own `method` and `name`. Names are the directory each candidate is written to.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

from tensormerge.errors import ParameterError, short

MAX_CANDIDATES = 256
MAX_NAME = 200  # a candidate directory name: with .partial.lock or .tensormerge-removing- it stays under 255
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass
class CandidateSpec:
    name: str
    method: str
    params: dict[str, Any]  # as given (text from -p, values from YAML); typed by the method
    swept: dict[str, Any] = field(default_factory=dict)  # the parameters that vary, for names and tables


def alternatives(method: str, key: str, text: str, is_list: bool) -> list[str]:
    """One parameter's alternatives from its `-p` text."""
    if "|" in text:
        parts = text.split("|")
    elif is_list:
        parts = [text]
    else:
        parts = text.split(",")
    parts = [p.strip() for p in parts]
    if any(p == "" for p in parts):
        raise ParameterError(f"-p {key}={short(text)}: an empty alternative (separate values by "
                             f"{'|' if is_list else ', or |'})")
    if len(set(parts)) != len(parts):
        raise ParameterError(f"-p {key}={short(text)}: a value is given twice")
    return parts


def from_params(method: str, raw: dict[str, str], list_keys: set[str]) -> list[CandidateSpec]:
    """The grid of `-p` alternatives (text values, typed later by the method)."""
    keys = list(raw)
    choices = [alternatives(method, k, str(raw[k]), k in list_keys) for k in keys]
    total = 1
    for c in choices:
        total *= len(c)
    if total > MAX_CANDIDATES:
        raise ParameterError(f"sweep: {total} candidates (more than {MAX_CANDIDATES}); sweep fewer values")
    swept = [k for k, c in zip(keys, choices) if len(c) > 1]
    out = []
    for combo in itertools.product(*choices):
        params = dict(zip(keys, combo))
        out.append(CandidateSpec("", method, params, {k: params[k] for k in swept}))
    name_all(out)
    return out


def from_yaml(default_method: str | None, items: Any, path: str) -> list[CandidateSpec]:
    """A YAML list of candidates: each a mapping of parameters, or {name, method, params}."""
    if not isinstance(items, list) or not items:
        raise ParameterError(f"--candidates {path}: expected a non-empty list of candidates")
    if len(items) > MAX_CANDIDATES:
        raise ParameterError(f"--candidates {path}: {len(items)} candidates (more than {MAX_CANDIDATES})")
    out = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise ParameterError(f"--candidates {path}: candidate {i} is {short(item)}, expected a mapping")
        if "params" in item or "method" in item or "name" in item:
            unknown = sorted(set(item) - {"params", "method", "name"})
            if unknown:
                raise ParameterError(f"--candidates {path}: candidate {i} has unknown key {short(unknown[0])} "
                                     f"(known: name, method, params)")
            params, method, name = item.get("params") or {}, item.get("method") or default_method, item.get("name")
        else:
            params, method, name = item, default_method, None
        if not method or not isinstance(method, str):
            raise ParameterError(f"--candidates {path}: candidate {i} names no method (give --method or method:)")
        if not isinstance(params, dict) or any(not isinstance(k, str) for k in params):
            raise ParameterError(f"--candidates {path}: candidate {i}: params must be a mapping of names to values")
        if name is not None and (not isinstance(name, str) or not name or _SAFE.search(name) or _reserved(name)):
            raise ParameterError(f"--candidates {path}: candidate {i}: name {short(name)} must be a plain "
                                 f"directory name (letters, digits, . _ = + -), not starting with '.' or '-', "
                                 f"not ending in .partial or .lock, not sweep.json or sweep.png")
        if name is not None and len(name) > MAX_NAME:  # its OUT.partial.lock must still be a file name
            raise ParameterError(f"--candidates {path}: candidate {i}: name {short(name)} has {len(name)} "
                                 f"characters, more than {MAX_NAME}")
        out.append(CandidateSpec(name or "", method, dict(params)))
    keys = sorted({k for c in out for k in c.params})
    for c in out:
        # a key this candidate lacks is not its swept value (no `k=None` in its name)
        c.swept = {k: c.params[k] for k in keys if k in c.params and len({repr(o.params.get(k)) for o in out}) > 1}
    name_all(out)
    return out


def _reserved(name: str) -> bool:
    """Names the sweep directory uses itself: DIR/sweep.json, the plot, a candidate's OUT.partial
    and lock, hidden temporaries (.tensormerge-removing-<name>, .sweep.json.*.tmp)."""
    return (name.startswith((".", "-")) or name.endswith((".partial", ".lock"))
            or name.lower() in ("sweep.json", "sweep.png"))


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "-".join(_text(v) for v in value)
    return _SAFE.sub("-", str(value).strip())


def name_all(cands: list[CandidateSpec]) -> None:
    """Names from the swept values (`lambda=0.3_k=0.1`), the method first when methods differ;
    unique (a suffix -2, -3 ... on a repeat)."""
    methods = {c.method for c in cands}
    seen: dict[str, int] = {}
    given = [c.name for c in cands if c.name]
    if len(set(given)) != len(given):
        dup = next(n for n in given if given.count(n) > 1)
        raise ParameterError(f"sweep: two candidates are named {short(dup)}")
    taken = set(given)
    for c in cands:
        if c.name:
            continue
        parts = ([c.method] if len(methods) > 1 else []) + [f"{k}={_text(v)}" for k, v in c.swept.items()]
        name = ("_".join(parts) or c.method)[:120]
        if _reserved(name):
            name = name.strip(".-") + "_"  # e.g. a value ending in .partial
        n = seen.get(name, 0)
        c.name = name
        while c.name in taken:  # a repeat, or a name given to another candidate
            n += 1
            c.name = f"{name}-{n + 1}"
        seen[name] = n
        taken.add(c.name)
