"""Reads past the page cache (engine/direct.py): the same bytes as a buffered read at any offset,
length, part split and file end; the merge's bytes the same read either way; auto reads a cold
checkpoint directly and a warm one through the cache; a truncated file and a bad setting are
one-line errors."""

from __future__ import annotations

import os
import random

import pytest
import torch

from tensormerge.engine import direct
from tensormerge.engine.sources import open_checkpoint
from tensormerge.errors import InputError
from tests import helpers as H

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


@pytest.fixture
def blob(tmp_path):
    data = random.Random(0).randbytes(3 * direct.ALIGN * 7 + 123)  # ends off a block boundary
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    fd = direct.open_direct(str(path))
    if fd is None:
        pytest.skip("this file system refuses O_DIRECT")
    yield str(path), fd, data
    os.close(fd)


def test_any_range_reads_the_files_bytes(blob, monkeypatch):
    path, fd, data = blob
    monkeypatch.setattr(direct, "PART", 2 * direct.ALIGN)  # spans of several parts, read at once
    rng = random.Random(1)
    ranges = [(0, len(data)), (1, 1), (direct.ALIGN - 1, 2), (len(data) - 5, 5), (len(data), 0)]
    ranges += [(p, rng.randint(0, len(data) - p)) for p in (rng.randint(0, len(data)) for _ in range(200))]
    for pos, n in ranges:
        got = direct.read(fd, path, "t", pos, n)
        assert got.dtype == torch.uint8 and got.numel() == n
        assert bytes(got.numpy()) == data[pos:pos + n], (pos, n)


def test_a_range_past_the_end_is_a_truncated_shard(blob):
    path, fd, data = blob
    with pytest.raises(InputError, match="tensor 'w': file ended early"):
        direct.read(fd, path, "w", len(data) - 10, 11)


def _family(tmp_path):
    """A model whose tensors include one at an odd offset of its file (after a 3-byte bool)."""
    base, fts = H.make_family(3, seed=2)
    for sd in [base, *fts]:
        sd["a.flag"] = torch.tensor([True, False, True])
        sd["b.w"] = sd["b.w"] if "b.w" in sd else torch.randn(64, 33)
    base_dir = H.save_safetensors_dir(tmp_path / "base", base)
    return str(base_dir), [str(H.save_safetensors_dir(tmp_path / f"ft{i}", sd)) for i, sd in enumerate(fts)]


@pytest.mark.parametrize("memory", ["64KiB", "8MiB"])  # a chunk at a time; many chunks read ahead
@pytest.mark.parametrize("method,params", [("average", []), ("ties", ["-p", "k=0.3"]), ("dare", ["-p", "p=0.4"])])
def test_a_merge_read_directly_writes_the_same_bytes(tmp_path, method, params, memory):
    base, fts = _family(tmp_path)
    outs = {}
    for io in ("buffered", "direct"):
        out = tmp_path / io
        res = H.run_cli(["run", "-m", method, "-i", ",".join(fts), "-b", base, "-o", out, "-q",
                         "--max-memory", memory, *params], env={direct.ENV: io})
        assert res.returncode == 0, res
        outs[io] = H.shard_digests(out)
    assert outs["direct"] == outs["buffered"]


def test_auto_reads_a_cold_checkpoint_directly_and_a_warm_one_through_the_cache(tmp_path, monkeypatch):
    base, _ = _family(tmp_path)
    monkeypatch.delenv(direct.ENV, raising=False)
    ck, want, warm = open_checkpoint(base), open_checkpoint(base), open_checkpoint(base)
    files = ck.files
    for f in files:
        with open(f, "rb") as fh:
            fh.read()
    assert direct.resident_fraction(files) == 1.0
    assert not direct.wanted(files)
    warm.read(next(iter(warm.tensors)))
    assert warm._direct is False
    for f in files:  # evicted as benchmarks/cold.py does it (no root needed), after the headers were read
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    share = direct.resident_fraction(files)
    if share is None or share >= direct.RESIDENT:
        pytest.skip("this kernel keeps the pages (no eviction without root here)")
    assert direct.wanted(files)
    want._direct = False
    for name in ck.tensors:
        assert torch.equal(ck.read(name).view(torch.uint8), want.read(name).view(torch.uint8))
    assert ck._direct is True


def test_a_bad_setting_is_one_line(tmp_path):
    base, fts = _family(tmp_path)
    out = tmp_path / "out"
    res = H.run_cli(["run", "-m", "average", "-i", ",".join(fts), "-o", out], env={direct.ENV: "fast"})
    H.assert_clean_error(res, "TENSORMERGE_IO='fast'", "buffered", out_dir=out)


def test_a_tensor_at_an_odd_offset_of_its_file_reads_the_same(tmp_path, monkeypatch):
    """safetensors does not align its tensors: a float32 tensor 3 bytes into the data is read
    directly into a view at an odd offset, which is copied to its own buffer, not viewed."""
    import json
    import struct

    w = torch.arange(40, dtype=torch.float32).reshape(8, 5)
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "w": {"dtype": "F32", "shape": [8, 5], "data_offsets": [3, 3 + w.numel() * 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    d = tmp_path / "odd"
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x01\x02\x03"
                                          + w.numpy().tobytes())
    monkeypatch.setenv(direct.ENV, "direct")
    ck = open_checkpoint(str(d))
    if direct.open_direct(ck.files[0]) is None:
        pytest.skip("this file system refuses O_DIRECT")
    assert torch.equal(ck.read("w"), w) and torch.equal(ck.read("w", 2, 5), w[2:5])
    assert ck.read("a").tolist() == [1, 2, 3] and ck._direct is True


# ------------------------------------------------------------------ Slabs: the reads' buffers
def test_a_buffer_is_page_aligned_and_reused_for_its_size_class_once_every_view_is_gone():
    slabs = direct.Slabs(keep=8 * direct.SIZE_CLASS)
    a = slabs.take(3 * direct.SIZE_CLASS + 5)
    assert a.numel() == 3 * direct.SIZE_CLASS + 5 and a.data_ptr() % direct.ALIGN == 0
    ptr = a.data_ptr()
    view = a[10:20].view(torch.int16)  # a view outlives the tensor it was cut from
    del a
    b = slabs.take(3 * direct.SIZE_CLASS + 5)
    assert b.data_ptr() != ptr and slabs.mapped == 2 * 4 * direct.SIZE_CLASS
    view.fill_(7)
    b.fill_(1)
    assert view.tolist() == [7] * 5  # the view's buffer was not handed out again
    del view, b
    assert slabs.free_bytes == 2 * 4 * direct.SIZE_CLASS
    c = slabs.take(4 * direct.SIZE_CLASS)  # the same size class: one of the two kept, no new mapping
    assert c.data_ptr() % direct.ALIGN == 0
    assert slabs.mapped == 2 * 4 * direct.SIZE_CLASS and slabs.free_bytes == 4 * direct.SIZE_CLASS


def test_free_buffers_past_keep_are_unmapped_oldest_first():
    mb = direct.SIZE_CLASS
    slabs = direct.Slabs(keep=5 * mb)
    held = [slabs.take(k * mb) for k in (1, 2, 3, 4)]
    assert slabs.mapped == 10 * mb
    while held:  # freed in the order taken: 1, 2, 3 and 4 MiB
        held.pop(0)
    assert slabs.free_bytes == 4 * mb and slabs.mapped == 4 * mb  # 1+2+3+4 > 5: kept only the newest
    assert list(slabs.free) == [4 * mb] and slabs.peak == 10 * mb


def test_buffers_taken_and_freed_on_many_threads_stay_within_what_is_held_plus_keep():
    from concurrent.futures import ThreadPoolExecutor
    mb = direct.SIZE_CLASS
    slabs = direct.Slabs(keep=16 * mb)
    sizes = [(i * 7919) % (6 * mb) + 2 for i in range(400)]

    def one(n):
        t = slabs.take(n)
        t[0], t[-1] = 1, 2  # touched: every page a real page
        return int(t[0]) + int(t[-1])

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(one, sizes)) == 3 * len(sizes)
    assert slabs.free_bytes <= 16 * mb and slabs.mapped == slabs.free_bytes
    assert slabs.peak <= 8 * 6 * mb + 16 * mb + 6 * mb  # eight held at once, keep, one in passing


def test_a_sweep_read_directly_and_ahead_writes_each_candidate_as_its_run(tmp_path):
    base, fts = _family(tmp_path)
    args = ["--method", "ties", "--base", base, "--inputs", ",".join(fts), "-p", "k=0.2,0.6", "-q"]
    res = H.run_cli(["sweep", *args, "--output", tmp_path / "sw", "--max-memory", "8MiB"], env={direct.ENV: "direct"})
    assert res.returncode == 0, res
    for k in ("0.2", "0.6"):
        one = ["--method", "ties", "--base", base, "--inputs", ",".join(fts), "-p", f"k={k}", "-q"]
        run = H.run_cli(["run", *one, "--output", tmp_path / f"run{k}"], env={direct.ENV: "buffered"})
        assert run.returncode == 0, run
        assert H.shard_digests(tmp_path / "sw" / f"k={k}") == H.shard_digests(tmp_path / f"run{k}")


def test_buffers_freed_by_the_garbage_collector_inside_the_pool_neither_hang_nor_fail():
    """A buffer reachable only through a reference cycle is freed by a collection, which an
    allocation inside the pool's own critical section can start: its finalizer must not wait on
    the lock its thread holds (it hung), nor change the free lists under the code filing them."""
    import gc
    import threading

    slabs = direct.Slabs(keep=0)
    errors: list = []
    hook = lambda args: errors.append(args)  # noqa: E731  (finalizer errors are only printed)
    old_hook, threading.excepthook = threading.excepthook, hook

    class Holder:
        pass

    def churn():
        for i in range(3000):
            h = Holder()
            h.me, h.buf = h, slabs.take((i % 3 + 1) * direct.SIZE_CLASS)
            del h  # left to the collector

    old_threshold = gc.get_threshold()
    gc.set_threshold(5)  # collections start inside the pool's own allocations
    try:
        with _no_unraisable() as unraisable:
            threads = [threading.Thread(target=churn) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads), "a finalizer deadlocked the pool"
            gc.collect()
            slabs.take(1)  # files what was handed back while another thread held the lock
        assert not unraisable and not errors
    finally:
        gc.set_threshold(*old_threshold)
        threading.excepthook = old_hook
    assert slabs.free_bytes == 0 and slabs.mapped == 0 and not getattr(slabs, "_returned", ())


class _no_unraisable:
    """Exceptions raised in finalizers (printed as 'Exception ignored in'), collected."""

    def __enter__(self):
        import sys
        self.seen, self._old = [], sys.unraisablehook
        sys.unraisablehook = lambda u: self.seen.append(u.exc_value)
        return self.seen

    def __exit__(self, *exc):
        import sys
        sys.unraisablehook = self._old
        return False


def test_a_buffer_freed_on_a_thread_that_holds_the_pool_lock_is_filed_without_waiting():
    """The collector can free a buffer inside the pool's own critical section (an allocation
    there starts a collection): its finalizer then runs on the thread that holds the lock. It
    must not wait for that lock (it did: the merge hung), and the buffer is filed at the next
    take."""
    import threading

    slabs = direct.Slabs(keep=8 * direct.SIZE_CLASS)
    held = [slabs.take(direct.SIZE_CLASS)]

    def free_under_the_lock():
        with slabs._lock:
            held.clear()  # the last reference: the finalizer runs here, on this thread

    t = threading.Thread(target=free_under_the_lock, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the finalizer waited on a lock its own thread holds"
    again = slabs.take(direct.SIZE_CLASS)  # filed now, and reused: no second mapping
    assert slabs.mapped == direct.SIZE_CLASS and again.numel() == direct.SIZE_CLASS
