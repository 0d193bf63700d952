"""An input file that changes under the merge, or that cannot be read, is never merged silently:
a file renamed over a shard after its header was read, one written to during the run, a read
error (one line naming the file and tensor), and a file system that opens a file with O_DIRECT
but refuses its reads (read through the page cache instead, same bytes)."""

from __future__ import annotations

import errno
import fcntl
import os

import pytest
import torch

from tensormerge.api import MergeSpec, merge
from tensormerge.engine import direct
from tensormerge.engine.sources import SafetensorsCheckpoint, open_checkpoint
from tensormerge.errors import InputError
from tests import helpers as H

IO = ["buffered", pytest.param("direct", marks=pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT"))]


@pytest.fixture
def fam(tmp_path):
    base, fts = H.make_family(2, seed=3)
    return (str(H.save_safetensors_dir(tmp_path / "base", base)),
            [str(H.save_safetensors_dir(tmp_path / f"ft{i}", sd)) for i, sd in enumerate(fts)], fts)


@pytest.mark.parametrize("io", IO)
def test_a_file_renamed_over_a_shard_after_its_header_was_read_is_refused(fam, tmp_path, monkeypatch, io):
    """The same names and sizes in another order: read through the old header, the new file's
    bytes would land under the wrong names (the red team merged lm_head as the embedding)."""
    monkeypatch.setenv(direct.ENV, io)
    _, fts, sds = fam
    ck = open_checkpoint(fts[0])
    path = ck.files[0]
    names = sorted(sds[0])
    other = tmp_path / "other.safetensors"
    H.save_safetensors_file(other, {n: sds[1][n] for n in reversed(names)})
    os.replace(other, path)
    if io == "direct" and direct.open_direct(path) is None:
        pytest.skip("this file system refuses O_DIRECT")
    with pytest.raises(InputError, match="changed since its header was read"):
        ck.read(names[0])


@pytest.mark.parametrize("io", IO)
def test_a_file_written_to_during_the_merge_fails_it_and_leaves_no_output(fam, tmp_path, monkeypatch, io):
    monkeypatch.setenv(direct.ENV, io)
    base, fts, _ = fam
    real = SafetensorsCheckpoint.check_unchanged
    grown = []

    def grow_then_check(self):
        if not grown and self.spec == fts[1]:
            with open(self.files[0], "ab") as f:  # an append to a file the merge has open
                f.write(b"\0" * 4096)
            grown.append(self.files[0])
        return real(self)

    monkeypatch.setattr(SafetensorsCheckpoint, "check_unchanged", grow_then_check)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="changed while the merge ran") as e:
        merge(MergeSpec("task_arithmetic", fts, str(out), base=base, quiet=True))
    assert grown[0] in str(e.value)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_an_unchanged_merge_passes_the_check(fam, tmp_path):
    base, fts, sds = fam
    out = tmp_path / "out"
    merge(MergeSpec("average", fts, str(out), base=base, quiet=True))
    got = H.load_dir(out)
    for n in sds[0]:
        if sds[0][n].is_floating_point():
            H.assert_close(got[n], (H.f64(sds[0][n]) + H.f64(sds[1][n])) / 2, sds[0][n].dtype, n)


def _fails_reads(monkeypatch, err: int, only_direct: bool):
    real = os.preadv

    def preadv(fd, buffers, offset, *a):
        if not only_direct or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(err, os.strerror(err))
        return real(fd, buffers, offset, *a)

    monkeypatch.setattr(os, "preadv", preadv)


@pytest.mark.parametrize("io", IO)
def test_a_read_error_names_the_file_and_tensor(fam, tmp_path, monkeypatch, io):
    _, fts, _ = fam
    monkeypatch.setenv(direct.ENV, io)
    ck = open_checkpoint(fts[0])
    if io == "direct" and direct.open_direct(ck.files[0]) is None:
        pytest.skip("this file system refuses O_DIRECT")
    name = next(iter(ck.tensors))
    _fails_reads(monkeypatch, errno.EIO, only_direct=False)
    with pytest.raises(InputError) as e:
        ck.read(name)
    msg = str(e.value)
    assert ck.files[0] in msg and repr(name) in msg and "cannot read (Input/output error)" in msg, msg


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT")
def test_direct_reads_refused_by_the_file_system_are_read_through_the_page_cache(fam, tmp_path, monkeypatch):
    base, fts, _ = fam
    want = tmp_path / "want"
    monkeypatch.setenv(direct.ENV, "buffered")
    merge(MergeSpec("ties", fts, str(want), base=base, quiet=True, params={"k": 0.4}))
    if direct.open_direct(open_checkpoint(fts[0]).files[0]) is None:
        pytest.skip("this file system refuses O_DIRECT")
    monkeypatch.setenv(direct.ENV, "direct")
    _fails_reads(monkeypatch, errno.EINVAL, only_direct=True)
    got = tmp_path / "got"
    merge(MergeSpec("ties", fts, str(got), base=base, quiet=True, params={"k": 0.4}))
    assert H.shard_digests(got) == H.shard_digests(want)
    ck = open_checkpoint(fts[0])
    x = ck.read(next(iter(ck.tensors)))
    assert isinstance(x, torch.Tensor) and ck._direct_fds[ck.files[0]] is None and len(ck._refused) == 1
    ck.close()
    assert not ck._refused
