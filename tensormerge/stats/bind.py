"""Statistics stores bound to the models they describe: one per input, plus the base's.

The plan asks, per block, which statistics every model has for it (`lookup`); blocks that a
method wants statistics for but some model lacks are merged with the method's fallback and
listed in the report, so a mis-keyed store shows up as a list of averaged blocks, not silence.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensormerge.engine.sources import Checkpoint
from tensormerge.errors import InputError, ParameterError
from tensormerge.stats.store import StatsStore


@dataclass
class StatsBinding:
    stores: list[StatsStore]
    base: StatsStore | None

    def lookup(self, kind: str, names: list[str]) -> tuple[list[str] | None, list[int]]:
        """The key in each model's store for a block known by `names` (tied names included),
        or None with the indices of the models whose store lacks it."""
        keys, missing = [], []
        for i, store in enumerate(self.stores):
            key = next((n for n in names if store.has(kind, n)), None)
            if key is None:
                missing.append(i)
            keys.append(key)
        return (None, missing) if missing else (keys, [])

    def transposed(self, names: list[str]) -> bool:
        """Whether the block's Grams describe its transpose (a Conv1D weight stored [in, out]);
        every store must say the same."""
        marks = []
        for store in self.stores:
            for kind in ("gram_in", "gram_out"):
                key = next((n for n in names if store.has(kind, n)), None)
                if key is not None:
                    marks.append((store, store.in_out(kind, key)))
        if marks and any(m for _, m in marks) and not all(m for _, m in marks):
            odd = next(s.path for s, m in marks if m != marks[0][1])
            raise InputError(f"{odd}: the Grams of {names[0]!r} are of the other weight layout than in "
                             f"{marks[0][0].path} ([in, out] Conv1D vs [out, in] Linear)")
        return bool(marks) and marks[0][1]

    def lookup_base(self, kind: str, names: list[str]) -> str | None:
        if self.base is None:
            return None
        return next((n for n in names if self.base.has(kind, n)), None)

    def describe(self) -> dict:
        return {"stores": [s.describe() for s in self.stores],
                "base": self.base.describe() if self.base is not None else None}

    def fingerprint(self) -> dict:
        """What --resume must find unchanged: each store's metadata and chunk checksums."""
        return {"stores": [s.fingerprint() for s in self.stores],
                "base": self.base.fingerprint() if self.base is not None else None}

    def unverified(self) -> list[str]:
        """Stores without chunk checksums (format 1): their reads cannot be verified."""
        return [s.path for s in [*self.stores, self.base] if s is not None and not s.verified]

    def unidentified(self) -> list[str]:
        """Stores that record no model (`stats import` without --model): only their tensor
        names and shapes could be checked against the model they were given for."""
        return [s.path for s in [*self.stores, self.base] if s is not None and not _recorded(s)]


def bind_stats(paths: list[str], base_path: str | None, inputs: list[Checkpoint],
               base: Checkpoint | None, method: str) -> StatsBinding:
    """Open and validate each store against its own model (same order as --inputs)."""
    if len(paths) != len(inputs):
        raise ParameterError(f"--stats: {len(paths)} store(s) for {len(inputs)} input(s); {method} needs one per "
                             f"input, in the order of --inputs")
    stores = []
    for path, ck in zip(paths, inputs):
        store = StatsStore(path)
        store.validate(ck.tensors, ck.aliases, ck.identity() if _recorded(store) else None, ck.spec)
        stores.append(store)
    base_store = None
    if base_path:
        if base is None:
            raise ParameterError("--base-stats needs --base")
        base_store = StatsStore(base_path)
        base_store.validate(base.tensors, base.aliases, base.identity() if _recorded(base_store) else None, base.spec)
    return StatsBinding(stores, base_store)


def _recorded(store: StatsStore) -> bool:
    return bool((store.model or {}).get("identity"))


def check_gram(store: StatsStore, kind: str, key: str, g, tol: float = 1e-4) -> None:
    """A Gram or Fisher block must be symmetric with a non-negative diagonal."""
    from tensormerge.kernels.linalg import symmetric_defect

    defect = symmetric_defect(g)
    if defect > tol:
        raise InputError(f"{store.path}: {kind}/{key} is not symmetric (max |G - G^T| is {defect:.2g} of max |G|)")
    if bool((g.diagonal() < 0).any()):
        raise InputError(f"{store.path}: {kind}/{key} has a negative diagonal entry (not a Gram matrix)")
