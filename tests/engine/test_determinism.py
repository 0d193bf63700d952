"""Same inputs, same bytes: whatever the row chunking (--max-memory) or torch thread count."""

import hashlib
import os

import pytest
import torch

from tensormerge.api import MergeSpec, merge
from tests.helpers import digests_per_thread_count

METHODS = {
    "average": {},
    "task_arithmetic": {},
    "ties": {},
    "ties-normmass": {"sign": "normmass", "merge": "dis-max"},
    "ties-tensor": {"scope": "tensor", "merge": "magnitude"},
    "dare": {"p": "0.3", "seed": "5"},
}


def digest(out) -> dict[str, str]:
    return {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(out)) if f.endswith(".safetensors")}


@pytest.mark.parametrize("label", list(METHODS))
def test_row_chunks_give_identical_bytes(family, tmp_path, label):
    base, fts, _, _ = family
    method = label.split("-")[0]
    runs = {}
    for mem in ("64MiB", "3KiB"):
        out = tmp_path / f"{label}-{mem}"
        rep = merge(MergeSpec(method, fts, str(out), base=base, params=METHODS[label], max_memory=mem, quiet=True))
        runs[mem] = digest(out)
        if mem == "3KiB":
            chunked = [b for b in rep["blocks"] if b["chunks"] > 1]
            assert {b["name"] for b in chunked} >= {"emb.weight", "layer.0.w"}  # really split by rows
            assert rep["peak_budgeted_bytes"] <= 3 * 1024 * 1.5
    assert runs["64MiB"] == runs["3KiB"]


def test_thread_count_does_not_change_bytes(family, tmp_path):
    base, fts, _, _ = family
    one, two = digests_per_thread_count(lambda out: merge(MergeSpec("ties", fts, str(out), base=base, quiet=True)),
                                        tmp_path)
    assert one == two


def test_sharded_and_single_outputs_hold_the_same_tensors(family, tmp_path):
    from safetensors.torch import load_file

    base, fts, _, _ = family
    merge(MergeSpec("task_arithmetic", fts, str(tmp_path / "one"), base=base, quiet=True))
    merge(MergeSpec("task_arithmetic", fts, str(tmp_path / "many"), base=base, shard_size="2KB", quiet=True))
    shards = sorted(f for f in os.listdir(tmp_path / "many") if f.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.exists(tmp_path / "many" / "model.safetensors.index.json")
    many = {}
    for f in shards:
        many.update(load_file(str(tmp_path / "many" / f)))
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert one.keys() == many.keys()
    for k in one:
        assert torch.equal(one[k], many[k])
