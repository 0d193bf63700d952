"""`stats compute`'s checkpoints and cluster shards: what a run saved is what --resume loads;
anything else at that path is refused naming it, never taken for this run's sums."""

import pytest
import torch

from tensormerge.errors import OutputError
from tensormerge.stats_compute.collect import load_state, save_state


def test_a_saved_state_loads_for_its_run_only(tmp_path):
    path = str(tmp_path / "S.zarr.partial" / ".resume" / "state.pt")
    sums = {"seen": 7, "fisher": {"w": torch.arange(6.0).reshape(2, 3)}}
    save_state(path, "run-a", sums)
    got = load_state(path, "run-a", str(tmp_path / "S.zarr"), "checkpoint")
    assert got["seen"] == 7 and torch.equal(got["fisher"]["w"], sums["fisher"]["w"])
    assert sorted(p.name for p in (tmp_path / "S.zarr.partial" / ".resume").iterdir()) == ["state.pt"]
    with pytest.raises(OutputError, match="checkpoint of a different run"):
        load_state(path, "run-b", str(tmp_path / "S.zarr"), "checkpoint")
    assert load_state(str(tmp_path / "none.pt"), "run-a", str(tmp_path / "S.zarr"), "checkpoint") is None


@pytest.mark.parametrize("content", ["a list", "garbage"])
def test_a_foreign_file_is_refused_naming_it(tmp_path, content):
    path = tmp_path / "shard-00000.pt"
    if content == "a list":
        torch.save([1, 2, 3], path)  # unpickles fine, but holds no run's sums
    else:
        path.write_bytes(b"\x00not a torch file")
    with pytest.raises(OutputError, match=str(path)):
        load_state(str(path), "run-a", str(tmp_path / "S.zarr"), "shard")


def test_a_save_interrupted_mid_write_leaves_the_last_whole_checkpoint_alone(tmp_path, monkeypatch):
    """Ctrl-C (or a full disk) while a checkpoint is written: the previous one stays and no
    temporary is left beside it."""
    from tensormerge.stats_compute import collect

    path = str(tmp_path / "S.zarr.partial" / ".resume" / "state.pt")
    save_state(path, "run-a", {"seen": 3})
    real = torch.save

    def interrupted(obj, f, *a, **kw):
        real(obj, f, *a, **kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(collect.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, "run-a", {"seen": 9})
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "S.zarr.partial" / ".resume").iterdir()) == ["state.pt"]
    assert load_state(path, "run-a", str(tmp_path / "S.zarr"), "checkpoint")["seen"] == 3
