"""Hostile and broken inputs the older suites leave out (issue 6, part 3): each is refused with
one line naming the problem, a non-zero exit, and neither OUT nor OUT.partial left behind.

Already covered elsewhere, and not repeated here:
  header length past the file / past the limit   test_bad_inputs.py::test_corrupted_header[length_past_eof|length_huge]
  truncated data / header / length prefix        test_bad_inputs.py::test_truncated_shard, ..._inside_header,
                                                 ::test_file_shorter_than_length_prefix
  overlapping data offsets, span != shape        test_bad_inputs.py::test_corrupted_header[overlap|bad_entry]
  index with ../, absolute path, sub/../..       test_bad_inputs.py::test_index_pointing_outside_directory
  .bin needing pickle code                       test_bad_inputs.py::test_bin_needing_pickle_code_is_refused,
                                                 engine/test_sources.py::test_bin_with_pickled_code_names_the_global
  NaN in weights                                 test_bad_inputs.py::test_nan_in_input
  NaN in statistics                              stats/test_stats_engine.py::test_bad_statistics_are_refused_with_one_line
  Inf in statistics (on import)                  stats/test_importers.py::test_failed_overwrite_keeps_old_store
  the header parser against arbitrary bytes      engine/test_header_fuzz.py

Input cases are checked in-process (the InputError the CLI prints), and one of each kind through
the CLI. The full disk and the unwritable directory need a child process with its own limits (a
file-size rlimit, dropped capabilities, a system call that reports ENOSPC): helpers.run_cli runs
each case's `setup` in the child it forks from an interpreter that imported tensormerge once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import signal
import stat
import struct
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import helpers as H  # noqa: E402

from tensormerge.engine.sources import open_checkpoint  # noqa: E402
from tensormerge.errors import InputError  # noqa: E402


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base_spec, ft_specs, base, fts = H.write_family(root, n=2)
    return root, base_spec, ft_specs, base, fts


def merge_args(inputs, out, *extra) -> list[str]:
    return ["run", "--quiet", "--method", "average", "--inputs", ",".join(map(str, inputs)), "--output", str(out),
            *map(str, extra)]


def header_file(path: pathlib.Path, header: bytes | dict, data: bytes = b"") -> pathlib.Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def refused(spec, *needles) -> str:
    """In-process: the InputError the CLI prints as its one line. Per-case CLI runs cost a
    process each; the CLI's handling of InputError is the same whatever the case, and is
    checked for one case of each kind by test_cli_refuses_each_kind."""
    with pytest.raises(InputError) as ei:
        open_checkpoint(str(spec)).close()
    msg = str(ei.value)
    assert "\n" not in msg and "\x1b" not in msg, repr(msg)
    assert len(msg) < 600, f"values from the file are quoted short: {msg[:600]!r}..."
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------- headers
@pytest.mark.parametrize("dtype,needle", [("F7", "'F7'"), ("f32", "'f32'"), (["F32"], "['F32']"),
                                          ({"a": 1}, "{'a': 1}")])
def test_unknown_dtype(tmp_path, dtype, needle):
    # a list or object as dtype used to escape as TypeError (unhashable) from the dtype lookup
    f = header_file(tmp_path / "bad.safetensors", {"w": {**F32_2, "dtype": dtype}}, b"\0" * 8)
    refused(f, str(f), "unknown dtype", needle)


@pytest.mark.parametrize("offsets,shape", [([0, 4096], [1024]), ([16, 24], [2]), ([-8, 0], [2]), ([8, 0], [0])])
def test_data_offsets_outside_the_data_section(tmp_path, offsets, shape):
    # not a truncation: the file is whole, the header points elsewhere (past it, or before it)
    f = header_file(tmp_path / "bad.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}},
                    b"\0" * 8)
    refused(f, str(f), "'w'", "data_offsets")


# Each of these escaped the parser as another exception type (or was silently accepted) until
# the fuzz run in engine/test_header_fuzz.py and its probes found it.
HOSTILE_HEADERS = {
    "deep_nesting": (b"[" * 50_000 + b"]" * 50_000, "RecursionError"),
    "integer_past_digit_limit": (b'{"w": ' + b"9" * 5000 + b"}", "ValueError"),
    "duplicate_tensor_name": ((b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                               b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'), "appears twice"),
    "bool_shape": ({"w": {"dtype": "BOOL", "shape": [True], "data_offsets": [False, True]}}, "invalid shape"),
    "shape_past_int64": ({"w": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}}, "invalid shape"),
    "metadata_a_list": ({"__metadata__": ["format", "pt"], "w": F32_2}, "__metadata__"),
    "metadata_not_strings": ({"__metadata__": {"format": {"nested": 1}}, "w": F32_2}, "__metadata__"),
    "escape_codes_in_name": ({"\x1b[2J\x1b[31mw": F32_2}, "control"),
    "lone_surrogate_name": (b'{"\\ud800": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "unencodable"),
    "huge_name": ({"n" * 100_000: {**F32_2, "dtype": "F7"}}, "unknown dtype"),  # quoted, cut short
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_HEADERS))
def test_hostile_header_json(tmp_path, kind):
    header, needle = HOSTILE_HEADERS[kind]
    f = header_file(tmp_path / "bad.safetensors", header, b"\0" * 16)
    refused(f, str(f), needle)


@contextlib.contextmanager
def watchdog(seconds: float):
    """Fail instead of hanging the whole suite if a regression blocks on the input again."""
    def expired(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    # opening a FIFO for reading blocks until a writer comes: the merge would hang forever
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    d = tmp_path / "m"
    d.mkdir()
    os.mkfifo(d / "model.safetensors.index.json")
    with watchdog(10):
        refused(fifo, str(fifo), "not a regular file")
        refused(d / "model.safetensors.index.json", "not a regular file")


# ---------------------------------------------------------------------------------- index
def hostile_index(fam, d: pathlib.Path, kind: str) -> pathlib.Path:
    base = fam[3]
    d.mkdir()
    shard = "model-00001-of-00001.safetensors"
    H.save_safetensors_file(d / shard, base)
    weight_map = {k: shard for k in base}
    if kind == "nul_byte":  # os.path raises ValueError on NUL: it used to surface as an internal error
        text = json.dumps({"weight_map": {**weight_map, "embed.weight": shard + "\0../x"}})
    elif kind == "not_a_string":
        text = json.dumps({"weight_map": {**weight_map, "embed.weight": ["a", "b"]}})
    elif kind == "duplicate_key":  # two readers could disagree on which shard holds the tensor
        text = json.dumps({"weight_map": weight_map})[:-2] + f', "embed.weight": "{shard}"}}}}'
    elif kind == "deep_nesting":
        text = '{"weight_map": ' + "[" * 50_000 + "]" * 50_000 + "}"
    elif kind == "empty_weight_map":  # opened as a model of no tensors, merged into an empty output
        text = json.dumps({"metadata": {}, "weight_map": {}})
    else:
        text = json.dumps([{"weight_map": weight_map}])
    (d / "model.safetensors.index.json").write_text(text)
    return d


@pytest.mark.parametrize("kind", ["nul_byte", "not_a_string", "duplicate_key", "deep_nesting", "not_an_object",
                                  "empty_weight_map"])
def test_hostile_index(fam, tmp_path, kind):
    refused(hostile_index(fam, tmp_path / "model", kind), "model.safetensors.index.json")


# ---------------------------------------------------------------------------------- .bin
def odd_bin(fam, f: pathlib.Path, kind: str) -> pathlib.Path:
    sd = dict(fam[4][0])
    if kind == "complex":
        sd["rope.freqs"] = torch.ones(4, dtype=torch.complex64)
    elif kind == "sparse":
        sd["mask"] = torch.eye(3).to_sparse()
    elif kind == "int_key":
        sd[7] = torch.ones(2)
    else:
        sd["ids"] = torch.ones(3, dtype=torch.uint16)
    torch.save(sd, f)
    return f


@pytest.mark.parametrize("kind,needle", [("complex", "complex64"), ("sparse", "sparse"), ("int_key", "entry 7"),
                                         ("uint16", "uint16")])
def test_bin_values_a_safetensors_output_cannot_hold(fam, tmp_path, kind, needle):
    # weights_only=True admits these; they used to fail deep in the merge as KeyError or
    # NotImplementedError (internal errors) instead of being refused at the input
    f = odd_bin(fam, tmp_path / "odd.bin", kind)
    refused(f, str(f), needle)


# ---------------------------------------------------------------------------------- through the CLI
@pytest.mark.parametrize("kind", ["unknown_dtype", "offsets_past_file", "deep_nesting", "index_nul", "bin_complex",
                                  "fifo"])
def test_cli_refuses_each_kind(fam, tmp_path, kind):
    if kind == "unknown_dtype":
        bad = header_file(tmp_path / "bad.safetensors", {"w": {**F32_2, "dtype": ["F32"]}}, b"\0" * 8)
    elif kind == "offsets_past_file":
        bad = header_file(tmp_path / "bad.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}},
                          b"\0" * 8)
    elif kind == "deep_nesting":
        bad = header_file(tmp_path / "bad.safetensors", HOSTILE_HEADERS["deep_nesting"][0])
    elif kind == "index_nul":
        bad = hostile_index(fam, tmp_path / "model", "nul_byte") / "model.safetensors.index.json"
    elif kind == "bin_complex":
        bad = odd_bin(fam, tmp_path / "odd.bin", "complex")
    else:
        bad = tmp_path / "model.safetensors"
        os.mkfifo(bad)
    out = tmp_path / "out"
    res = H.run_cli(merge_args([bad, fam[2][1]], out), cwd=tmp_path, timeout=30)
    H.assert_clean_error(res, str(bad), out_dir=out)
    assert res.returncode == InputError.exit_code


# ---------------------------------------------------------------------------------- output
# The output cases need a child set up first: a file-size rlimit, dropped capabilities, a
# system call that reports a full disk (helpers.run_cli's `setup`, run in the forked child).
@pytest.fixture
def launch():
    """run(args, cwd, setup) -> CliResult."""
    return lambda args, cwd, setup="": H.run_cli(args, cwd=cwd, setup=setup)


def test_output_past_the_file_size_limit(fam, tmp_path, launch):
    """A full disk as `ulimit -f` makes one: writing past the limit raises SIGXFSZ, whose default
    action kills the process (no message, OUT.partial left). CPython ignores SIGXFSZ at
    startup, so the write fails with EFBIG instead and the writer refuses it in one line; the
    child keeps the disposition the interpreter gave it, so a CLI that stopped ignoring the
    signal would be killed here (returncode -25) and fail."""
    ft_specs = fam[2]
    out = tmp_path / "out"
    setup = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))"  # the shard is ~16 KB
    res = launch(merge_args(ft_specs, out), tmp_path, setup)
    assert res.returncode > 0, f"killed by signal {-res.returncode}?\n{res}"
    H.assert_clean_error(res, str(out), "model.safetensors", "file too large", out_dir=out)


ENOSPC_SETUPS = {
    # data blocks are written at offsets past the header (written at 0 when the shard is laid
    # out): the disk fills mid-merge, after the layout succeeded because shards are sparse
    "mid_merge": "import errno, os\n_real = os.pwrite\n"
                 "def _pwrite(fd, data, offset):\n"
                 "    if offset > 0:\n        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
                 "    return _real(fd, data, offset)\n"
                 "os.pwrite = _pwrite\n",
    # network and thin-provisioned filesystems may report the full disk only at fsync
    "at_fsync": "import errno, os\n"
                "def _fsync(fd):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
                "os.fsync = _fsync\n",
}


@pytest.mark.parametrize("when", sorted(ENOSPC_SETUPS))
def test_disk_full(fam, tmp_path, launch, when):
    ft_specs = fam[2]
    out = tmp_path / "out"
    res = launch(merge_args(ft_specs, out), tmp_path, ENOSPC_SETUPS[when])
    H.assert_clean_error(res, str(out), "model.safetensors", "disk full", out_dir=out)


# As root, permission bits are bypassed through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH. The
# child drops both from its effective and permitted sets (capset), after which a mode-0500
# directory refuses root too; it then checks that it really is refused before the merge runs.
_DROP_DAC = """
import ctypes, os
class _Hdr(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    hdr, data = _Hdr(0x20080522, 0), (_Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective &= ~0b110
    data[0].permitted &= ~0b110
    if libc.capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
try:
    os.mkdir(PROBE)
except PermissionError:
    pass
else:
    os.rmdir(PROBE)
    raise RuntimeError("the directory is still writable")
"""


def test_output_directory_without_write_permission(fam, tmp_path, launch):
    ft_specs = fam[2]
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)  # 0o500
    try:
        out = parent / "out"
        res = launch(merge_args(ft_specs, out), tmp_path, f"PROBE = {str(parent / 'probe')!r}\n" + _DROP_DAC)
        if res.returncode == 99:
            pytest.skip("permission bits do not apply to this process (root) and the capabilities that bypass "
                        f"them could not be dropped: {res.stderr.strip()}")
        H.assert_clean_error(res, str(out), "Permission denied", out_dir=out)
        assert os.listdir(parent) == []
    finally:
        parent.chmod(stat.S_IRWXU)


def test_errno_words():
    """The reasons the error lines above rely on, for each errno a full disk can raise."""
    from tensormerge.engine.writer import os_error_reason as _why

    assert "disk full" in _why(OSError(errno.ENOSPC, "x"))
    assert "quota" in _why(OSError(errno.EDQUOT, "x"))
    assert "file-size limit" in _why(OSError(errno.EFBIG, "x"))
    assert _why(OSError(errno.EACCES, "Permission denied")) == "Permission denied"


def test_empty_tensor_claiming_huge_rows_merges_quickly(tmp_path):
    """[2**62, 0] holds no element: the plan must not walk its rows one sub-chunk at a time."""
    from safetensors.torch import save_file

    from tensormerge.api import MergeSpec, merge

    paths = []
    for i in range(2):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({"w": torch.ones(3, 2) * i}, str(d / "model.safetensors"))
        header = {"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 24]},
                  "empty": {"dtype": "F32", "shape": [2**62, 0], "data_offsets": [24, 24]}}
        header_file(d / "model.safetensors", header, (torch.ones(3, 2) * i).numpy().tobytes())
        paths.append(str(d))
    with watchdog(60):
        merge(MergeSpec("average", paths, str(tmp_path / "out"), quiet=True))
    got = open_checkpoint(str(tmp_path / "out"))
    assert got.tensors["empty"].shape == (2**62, 0)


def test_disk_full_while_recording_the_resume_manifest(fam, tmp_path, launch):
    """The manifest's appends (os.write) fail like the shards' writes: one line, nothing left."""
    setup = ("import errno, os\n_real = os.write\n"
             "def _write(fd, data):\n"
             "    if b'\"chunk\"' in bytes(data):\n        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
             "    return _real(fd, data)\n"
             "os.write = _write\n")
    out = tmp_path / "out"
    res = launch(merge_args(fam[2], out), tmp_path, setup)
    H.assert_clean_error(res, "manifest.jsonl", "disk full", out_dir=out)
