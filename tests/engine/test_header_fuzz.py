"""Fuzzing the safetensors header parser: a header is a stranger's data, so whatever the bytes,
`read_header` (and `open_checkpoint` above it) must either return entries that lie inside the
file and describe real tensors, or raise tensormerge's InputError naming the file in one line.
Any other exception, a hang, or an allocation of a size the file merely claims is a bug.

Deterministic (derandomize) and bounded: a few hundred examples per strategy, seconds in all.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import pathlib
import signal
import struct
import sys
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tensormerge.constants import MAX_HEADER_BYTES, SAFETENSORS_DTYPES  # noqa: E402
from tensormerge.engine.safetensors_format import element_size, read_header  # noqa: E402
from tensormerge.engine.sources import open_checkpoint  # noqa: E402
from tensormerge.errors import InputError  # noqa: E402

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# outcomes per fuzz test: {test: {"accepted": n, "refused": n}}
STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

INT64_MAX = (1 << 63) - 1


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fuzz")


class Hang(Exception):
    """Raised by the alarm when a parse blocks."""


def _alarm(signum, frame):
    raise Hang("parsing took more than 10 s")


def _count(outcome: str) -> None:
    STATS[os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0].split("[")[0]][outcome] += 1


def parse(path: pathlib.Path):
    """read_header under a watchdog; returns its result or the InputError it raised. Anything
    else propagates and fails the example (hypothesis then shrinks it)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        result = read_header(str(path))
    except InputError as e:
        _count("refused")
        check_error(e, path)
        return e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    _count("accepted")
    check_entries(result, path)
    return result


def check_error(e: InputError, path: pathlib.Path) -> None:
    msg = str(e)
    assert msg.startswith(str(path)), msg
    assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg, repr(msg)
    assert len(msg) < len(str(path)) + 800, f"unbounded error line ({len(msg)} chars)"


def check_entries(result, path: pathlib.Path) -> None:
    """What a caller may trust about an accepted header."""
    entries, metadata, aliases = result
    size = os.path.getsize(path)
    (hlen,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    spans = []
    for name, e in entries.items():
        assert isinstance(name, str) and printable(name) and e.name == name and e.path == str(path)
        assert e.dtype in SAFETENSORS_DTYPES.values()
        assert all(type(d) is int and 0 <= d <= INT64_MAX for d in e.shape)
        assert 8 + hlen <= e.begin <= e.end <= size, (name, e.begin, e.end, size)
        assert e.nbytes == math.prod(e.shape) * element_size(e.dtype)
        if e.nbytes:
            spans.append((e.begin, e.end, name))
    alias_names = {a for a, _ in aliases}
    assert all(a in entries and c in entries and c not in alias_names for a, c in aliases)
    kept = sorted(s for s in spans if s[2] not in alias_names)
    for (_, end, a), (begin, _, b) in itertools.pairwise(kept):
        assert end <= begin, f"{a} and {b} overlap"


def printable(name: str) -> bool:
    """Safe to print and to write as UTF-8 JSON: no lone surrogates, no control characters."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name)


def write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def framed(header: bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


# ----------------------------------------------------------------------------------- strategies
# Placeholders drawn like any JSON value and replaced in the serialized text by what json.dumps
# cannot produce: an integer past Python's 4300-digit limit, nesting past the recursion limit.
BIGINT, DEEP = "\x00BIGINT\x00", "\x00DEEP\x00"
TEXT_SPECIALS = {json.dumps(BIGINT): "9" * 5000, json.dumps(DEEP): "[" * 20_000 + "]" * 20_000}

DTYPE_NAMES = sorted(SAFETENSORS_DTYPES)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=6), st.sampled_from([BIGINT, DEEP]))
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(st.text(max_size=4), inner,
                                                                               max_size=3)), max_leaves=8)
# names a file may use, including the ones a terminal or a UTF-8 encoder must never meet
NAMES = st.one_of(st.text(max_size=8), st.sampled_from(["w", "t0", "layer.0.weight", "__metadata__", ""]),
                  st.text(alphabet=st.characters(max_codepoint=0x9f), max_size=4),
                  st.sampled_from(["\ud800", "w\udfff", "\x1b[2J", "a\nb", "\x85", "\x7f"]))
HUGE = st.sampled_from([2**31, 2**62, 2**63 - 1, 2**63, 2**64, 10**30])
DIMS = st.one_of(st.integers(0, 6), st.integers(-3, -1), HUGE, st.booleans(), st.floats(allow_nan=True),
                 st.text(max_size=2))
OFFSETS = st.one_of(st.integers(-16, 300), st.sampled_from([2**63, 2**64 + 8, -2**63, 10**40]), st.booleans(),
                    st.floats(allow_nan=True))


@st.composite
def entry(draw):
    """A header entry: usually the right keys with wrong-ish values, sometimes no dict at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(ANY_JSON)
    e = {
        "dtype": draw(st.one_of(st.sampled_from(DTYPE_NAMES + ["F7", "f32", "", "C64", "U16"]), ANY_JSON)),
        "shape": draw(st.one_of(st.lists(DIMS, max_size=4), ANY_JSON)),
        "data_offsets": draw(st.one_of(st.lists(OFFSETS, min_size=0, max_size=3), ANY_JSON)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(e)), max_size=1)):
        del e[key]
    return e


@st.composite
def valid_layout(draw):
    """(header items, data bytes) that parse: consecutive tensors, sometimes a tied duplicate,
    sometimes an empty tensor whose other dimensions are huge (nothing to read, all to trust)."""
    items, pos = [], 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if draw(st.integers(0, 5)) == 0:
            shape = draw(st.permutations([0] + draw(st.lists(HUGE, min_size=1, max_size=2))))
        n = math.prod(shape) * element_size(SAFETENSORS_DTYPES[dtype])
        items.append((f"t{i}", {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}))
        pos += n
    if items and draw(st.booleans()):
        items.append(("tied", dict(draw(st.sampled_from(items))[1])))
    if draw(st.booleans()):
        items.append(("__metadata__", {"format": "pt"}))
    return items, draw(st.binary(min_size=pos, max_size=pos + 8))


def _as_bools(value):
    # JSON true/false where 1/0 were: Python reads them as ints, a parser must not
    return [bool(v) if type(v) is int and v in (0, 1) else v for v in value]


@st.composite
def json_file(draw):
    """Arbitrary JSON headers: a valid layout, then (each sometimes) entries added or replaced,
    tensors renamed, 0/1 turned into false/true, a key repeated, metadata of a wrong type, or
    a whole non-object; then a length prefix that is right, off, or absurd. Keys are written
    one by one, so a repeated key reaches the parser as a repeated key."""
    items, data = draw(valid_layout())
    if draw(st.booleans()):
        for name in draw(st.lists(NAMES, min_size=1, max_size=2)):
            items.append((name, draw(entry())))
    if items and draw(st.integers(0, 3)) == 0:
        i = draw(st.integers(0, len(items) - 1))
        items[i] = (draw(NAMES), items[i][1])
    if items and draw(st.integers(0, 3)) == 0:
        name, e = draw(st.sampled_from(items))
        if isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list):
            items.append((name, {**e, "shape": _as_bools(e["shape"]), "data_offsets": _as_bools(e["data_offsets"])}))
            items = [it for it in items if it[0] != name or it[1] is not e]
    if items and draw(st.integers(0, 5)) == 0:
        items.append(draw(st.sampled_from(items)))
    if draw(st.integers(0, 4)) == 0:
        items.append(("__metadata__", draw(st.one_of(ANY_JSON, st.dictionaries(st.text(max_size=3), ANY_JSON,
                                                                                 max_size=2)))))
    if draw(st.integers(0, 9)):
        text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v, allow_nan=True)}" for k, v in items) + "}"
    else:
        text = json.dumps(draw(ANY_JSON), allow_nan=True)
    for placeholder, replacement in TEXT_SPECIALS.items():
        text = text.replace(placeholder, replacement)
    raw = text.encode() + b" " * draw(st.integers(0, 7))
    declared = draw(st.one_of(st.none(), st.none(), st.integers(0, len(raw) + len(data) + 16),
                              st.sampled_from([2**64 - 1, 2**63, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1])))
    return framed(raw, data, declared)


def _sample_file() -> bytes:
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(4, generator=g).half(),
          "ids": torch.arange(5), "scalar": torch.tensor(1.5, dtype=torch.bfloat16), "empty": torch.zeros(0, 3)}
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        save_file(sd, os.path.join(td, "m.safetensors"), metadata={"format": "pt"})
        return pathlib.Path(td, "m.safetensors").read_bytes()


SAMPLE = _sample_file()
SAMPLE_HLEN = struct.unpack("<Q", SAMPLE[:8])[0]


@st.composite
def mutated_sample(draw):
    """A real file with bytes overwritten (mostly inside the header, where they matter), bytes
    inserted or removed, or its tail cut off."""
    data = bytearray(SAMPLE)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "set", "set", "insert", "delete", "truncate", "digit"]))
        hi = len(data) - 1 if draw(st.integers(0, 4)) == 0 else min(len(data) - 1, 8 + SAMPLE_HLEN)
        if hi < 0:
            break
        i = draw(st.integers(0, hi))
        if op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[i:]
        else:  # a plausible-looking corruption: one ASCII digit for another (offsets, shapes)
            if chr(data[i]).isdigit():
                data[i] = ord(draw(st.sampled_from("0123456789")))
    return bytes(data)


# ----------------------------------------------------------------------------------- the fuzz
@FUZZ
@given(st.one_of(st.binary(max_size=64),
                 st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 80), st.binary(max_size=96))))
def test_arbitrary_bytes(scratch, data):
    parse(write(scratch / "bytes.safetensors", data))


@FUZZ
@given(json_file())
@example(framed(b'{"__metadata__": {"format": "pt"}, "w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}',
                b"\0" * 4))
@example(framed(b'{"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}', b"\0" * 4))
def test_arbitrary_json_headers(scratch, data):
    parse(write(scratch / "json.safetensors", data))


@FUZZ
@given(mutated_sample())
@example(SAMPLE)  # unmutated: accepted, so the invariants on accepted headers are exercised here
@example(SAMPLE[:-1])
def test_mutated_valid_file(scratch, data):
    parse(write(scratch / "mutated.safetensors", data))


@settings(FUZZ, max_examples=40)
@given(st.one_of(st.builds(lambda h: framed(json.dumps(dict(h[0])).encode(), h[1]), valid_layout()),
                 mutated_sample(), json_file()), st.booleans())
@example(SAMPLE, False)
@example(SAMPLE, True)
@example(SAMPLE[:-1], True)
def test_through_open_checkpoint(scratch, data, sharded):
    """The same inputs as a model directory (single file, or one shard behind an index) through
    open_checkpoint, and every accepted tensor read back in full: reads stay inside the file."""
    d = scratch / ("ck_sharded" if sharded else "ck_single")
    d.mkdir(exist_ok=True)
    shard = "model-00001-of-00001.safetensors" if sharded else "model.safetensors"
    write(d / shard, data)
    if sharded:
        try:
            header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
        except (ValueError, RecursionError, struct.error):  # broken anyway; the index just needs to exist
            header = {}
        names = [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    try:
        ck = open_checkpoint(str(d))
    except InputError as e:
        _count("refused")
        assert "\n" not in str(e) and str(d) in str(e), str(e)
        return
    _count("accepted")
    try:
        for name, info in ck.tensors.items():
            t = ck.read(ck.canonical(name))
            assert t.dtype == info.dtype and tuple(t.shape) == info.shape
    finally:
        ck.close()


@pytest.mark.parametrize("declared", [2**64 - 1, 2**63, MAX_HEADER_BYTES + 1, MAX_HEADER_BYTES, 10**9, 4096])
def test_claimed_length_is_never_allocated(scratch, declared):
    """A length prefix is a claim, not a size: the parser must refuse before reading (or
    allocating) what a 16-byte file says it holds."""
    f = write(scratch / "claim.safetensors", framed(b"{}      ", declared=declared))
    tracemalloc.start()
    try:
        result = parse(f)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, InputError)
    assert peak < 1 << 20, f"peak {peak} bytes while refusing a {declared}-byte claim"


def test_fuzz_reached_both_outcomes(capsys):
    """Runs after the fuzz tests above: strategies that only ever produced garbage would never
    test what an accepted header promises, so the structured ones must have reached both."""
    if not STATS:
        pytest.skip("the fuzz tests did not run in this session")
    with capsys.disabled():
        parts = ", ".join(f"{t.removeprefix('test_')} {c['accepted']}+{c['refused']}" for t, c in STATS.items())
        print(f"\nheader fuzz (accepted+refused, no other outcome): {parts}")
    for test in ("test_arbitrary_json_headers", "test_mutated_valid_file", "test_through_open_checkpoint"):
        if test in STATS:
            assert STATS[test]["accepted"] and STATS[test]["refused"], (test, STATS[test])
