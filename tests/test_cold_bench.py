"""benchmarks/cold.py and run_bench.py --cold: eviction without root empties a file's page cache
(checked by mincore), and a cold run records the floor and every method with its inputs evicted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import cold  # noqa: E402
import synth  # noqa: E402


def _on_tmpfs(path: Path) -> bool:
    """tmpfs pages are the file itself: DONTNEED cannot drop them."""
    best, fstype = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mnt, fs = line.split()[:3]
        if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
            best, fstype = mnt, fs
    return fstype in ("tmpfs", "ramfs")


def test_evict_empties_the_page_cache(tmp_path):
    if _on_tmpfs(tmp_path):
        pytest.skip("tmp_path is on tmpfs")
    f = tmp_path / "data.bin"
    f.write_bytes(os.urandom(8 << 20) + b"x")  # not a whole number of pages
    assert cold.read_all([f]) == (8 << 20) + 1
    assert cold.resident_fraction([f]) > 0.99  # just written and read: cached
    cold.evict([f])
    assert cold.resident_fraction([f]) == 0.0
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert cold.resident_bytes(empty) == 0
    check = cold.eviction_check([f])
    assert check["resident_after_evict"] == 0.0 and check["warm"]["resident_before"] > 0.99
    assert check["cold"]["bytes"] == check["warm"]["bytes"] == (8 << 20) + 1


def test_layers_size_a_preset():
    full, two = synth.get_preset("mt5-xl"), synth.get_preset("mt5-xl", layers=2)
    blocks = lambda p, stack: {s.name.split(".")[2] for s in p.specs if s.name.startswith(f"{stack}.block.")}  # noqa: E731
    assert blocks(full, "encoder") == {str(i) for i in range(24)} and blocks(two, "decoder") == {"0", "1"}
    assert two.config["num_layers"] == two.config["num_decoder_layers"] == 2
    shapes = lambda p: {s.name: s.shape for s in p.specs}  # noqa: E731
    assert all(shapes(full)[n] == s for n, s in shapes(two).items())  # the widths and the vocabulary stay
    assert shapes(two)["shared.weight"] == (250112, 2048)
    with pytest.raises(ValueError):
        synth.get_preset("tiny", layers=0)


def test_run_bench_cold_on_tiny(tmp_path):
    if _on_tmpfs(tmp_path):
        pytest.skip("tmp_path is on tmpfs")
    out = tmp_path / "cold.json"
    res = subprocess.run([sys.executable, str(BENCH / "run_bench.py"), "--preset", "tiny", "--data",
                          str(tmp_path / "data"), "--cold", "--repeats", "1", "--methods", "task_arithmetic,ties",
                          "--json", str(out), "--summary-md"], capture_output=True, text=True, timeout=900,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    c = r["cold"]
    assert c["eviction_check"]["resident_after_evict"] == 0.0
    assert len(c["floors"]) == 1 and c["floors"][0]["resident_before"] == 0.0
    assert c["floors"][0]["bytes"] == c["input_bytes"] == sum(
        p.stat().st_size for d in ("base", "ft1", "ft2", "ft3") for p in (tmp_path / "data" / d).glob("*.safetensors"))
    (direct,) = c["direct_floors"]  # the disk read past the page cache, where O_DIRECT is allowed
    assert direct is None or (direct["bytes"] == c["input_bytes"] and direct["resident_before"] == 0.0)
    for method in ("task_arithmetic", "ties"):
        (run,) = c["methods"][method]
        assert run["returncode"] == 0 and run["inputs_resident_before"] == 0.0
        assert run["report"]["seconds"] > 0
    assert "| method | best s | x cold read floor (best) |" in res.stdout
    assert "| task_arithmetic |" in res.stdout and "| ties |" in res.stdout
    assert not (tmp_path / "data" / "bench-out").exists()  # outputs removed


def test_cold_ab_alternates_commits_on_tiny(tmp_path):
    """benchmarks/cold_ab.py: each commit from a worktree of its own, taking turns, every run cold;
    the worktrees are gone after."""
    if _on_tmpfs(tmp_path):
        pytest.skip("tmp_path is on tmpfs")
    import cold_ab

    synth.generate("tiny", tmp_path / "data", 2, "bf16", log=lambda *a: None)
    r = cold_ab.main(["--data", str(tmp_path / "data"), "--method", "dare", "--max-memory", "1MiB",
                      "--commits", "HEAD,HEAD~0", "--repeats", "2", "--io", "direct",
                      "--out-dir", str(tmp_path), "--json", str(tmp_path / "ab.json")])
    assert [(run["commit"], run["repeat"]) for run in r["runs"]] == [("HEAD", 0), ("HEAD~0", 0), ("HEAD", 1), ("HEAD~0", 1)]
    assert all(run["returncode"] == 0 and run["seconds"] > 0 and run["peak_anon_bytes"] > 0 for run in r["runs"])
    assert len({run["sha"] for run in r["runs"]}) == 1
    assert json.loads((tmp_path / "ab.json").read_text())["runs"] == json.loads(json.dumps(r["runs"]))
    listed = subprocess.run(["git", "-C", str(BENCH.parent), "worktree", "list"], capture_output=True, text=True).stdout
    assert "cold-ab-" not in listed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ab.json", "data"]  # outputs removed
