"""The store's writer: appending kinds to one model's store, and refusing what would mix models."""

import pytest
import torch

from tensormerge.errors import InputError, OutputError
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
    assert not (tmp_path / "s.zarr" / "gram_out").exists()  # its files too (the metadata never listed them)
    # replacing a kind in place
    w = StatsWriter(path, model=model, append=True, overwrite=True)
    w.add("fisher", "w", torch.full((3, 2), 2.0))
    w.close()
    assert torch.equal(StatsStore(path).read("fisher", "w"), torch.full((3, 2), 2.0))


def test_an_array_on_disk_the_metadata_does_not_list_is_refused(tmp_path):
    """Read as absent it would be averaged for lack of statistics: metadata older than the arrays
    (or edited) is refused on open, naming the array."""
    import json

    path = tmp_path / "s.zarr"
    w = StatsWriter(str(path), model={"spec": "m", "identity": "abc"})
    w.add("gram_in", "a", torch.eye(2))
    w.add("gram_in", "b", torch.eye(2))
    w.close()
    root = json.loads((path / "zarr.json").read_text())
    del root["consolidated_metadata"]["metadata"]["gram_in/b"]
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(InputError, match=r"gram_in/b is on disk but the store's metadata does not list it"):
        StatsStore(str(path))
