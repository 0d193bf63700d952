"""The store's writer: appending kinds to one model's store, and refusing what would mix models."""

import pytest
import torch

from tensormerge.errors import OutputError
from tensormerge.stats.store import StatsStore, StatsWriter


def test_append_adds_a_kind_and_refuses_mixing(tmp_path):
    path = str(tmp_path / "s.zarr")
    model = {"spec": "m", "identity": "abc"}
    w = StatsWriter(path, model=model, n_examples=10)
    w.add("fisher", "w", torch.ones(3, 2), count=10)
    w.close()
    w = StatsWriter(path, model=model, append=True)
    w.add("gram_in", "w", torch.eye(2), count=99)
    w.close()
    s = StatsStore(path)
    assert s.has("fisher", "w") and s.has("gram_in", "w") and s.attrs["n_examples"] == 10
    assert torch.equal(s.read("gram_in", "w"), torch.eye(2))
    with pytest.raises(OutputError, match="already holds fisher"):
        StatsWriter(path, model=model, append=True).add("fisher", "w", torch.ones(3, 2))
    with pytest.raises(OutputError, match="holds statistics of m"):
        StatsWriter(path, model={"spec": "other", "identity": "def"}, append=True)
    with pytest.raises(OutputError, match="exists"):
        StatsWriter(path)
    # a failed append removes only what it added
    w = StatsWriter(path, model=model, append=True)
    w.add("gram_out", "w", torch.eye(3))
    w.abort()
    s = StatsStore(path)
    assert not s.arrays["gram_out"] and s.has("fisher", "w") and s.has("gram_in", "w")
    # replacing a kind in place
    w = StatsWriter(path, model=model, append=True, overwrite=True)
    w.add("fisher", "w", torch.full((3, 2), 2.0))
    w.close()
    assert torch.equal(StatsStore(path).read("fisher", "w"), torch.full((3, 2), 2.0))
