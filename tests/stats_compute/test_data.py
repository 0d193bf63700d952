"""JSONL records of `stats compute` (stats/data.py): every bad line is one error naming the file
and the line, raised while reading, before any model loads; none surfaces as an internal error."""

from __future__ import annotations

import pytest

from tensormerge.errors import InputError
from tensormerge.stats_compute.data import read_records

GOOD = b'{"text": "w3 w4"}\n'


@pytest.mark.parametrize("raw,line,needle", [
    (GOOD + b'{"text": "\xff\xfe"}\n', 2, "not UTF-8"),           # a stray byte
    (GOOD + '{"text": "caf\xe9"}\n'.encode("latin-1"), 2, "not UTF-8"),  # a Latin-1 file
    ('{"text": "w3"}\n'.encode("utf-16"), 1, "not UTF-8"),       # a UTF-16 file
    (GOOD + b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", 2, "nested too deeply"),
    (GOOD + b'{"messages": [{"role": "user", "content": "\\ud800"}]}\n', 2, "unpaired surrogate"),
])
def test_bad_line_is_named(tmp_path, raw, line, needle):
    """Non-UTF-8 bytes were decoded by the file iterator, outside the try that names the line
    (an internal UnicodeDecodeError); deep nesting was a RecursionError; a lone surrogate
    escape reached the tokenizer as an internal TypeError batches later."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(raw)
    with pytest.raises(InputError) as e:
        read_records(str(path), None)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: ") and needle in msg and "\n" not in msg, msg


def test_utf8_byte_order_mark_is_allowed(tmp_path):
    """Editors on Windows write one; `json.loads` refused the first line for it."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n" + '{"text": "café"}\r\n'.encode())
    assert [r for _, r in read_records(str(path), None)] == [{"text": "w3 w4"}, {"text": "café"}]


def test_saved_dataset_dict_split_choice(tmp_path):
    """A DatasetDict: --split names the split; without it its "train", or its only split; several
    others and no --split is a one-line error listing them (text and image data share this)."""
    datasets = pytest.importorskip("datasets")
    from tensormerge.stats_compute.data import load_saved_dataset

    rows = {name: datasets.Dataset.from_list([{"text": f"{name} {i}"} for i in range(n)])
            for name, n in (("train", 2), ("test", 3), ("val", 1))}
    datasets.DatasetDict(rows).save_to_disk(str(tmp_path / "all"))
    ds, where = load_saved_dataset(str(tmp_path / "all"), None)
    assert where == f"{tmp_path / 'all'}[train]" and ds["text"] == ["train 0", "train 1"]
    ds, where = load_saved_dataset(str(tmp_path / "all"), "test")
    assert where.endswith("[test]") and len(ds) == 3
    datasets.DatasetDict({"val": rows["val"]}).save_to_disk(str(tmp_path / "one"))
    assert load_saved_dataset(str(tmp_path / "one"), None)[0]["text"] == ["val 0"]
    datasets.DatasetDict({"test": rows["test"], "val": rows["val"]}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(InputError, match=r"choose a split with --split \(it holds test, val\)"):
        load_saved_dataset(str(tmp_path / "two"), None)
    with pytest.raises(InputError, match="holds test, val"):
        load_saved_dataset(str(tmp_path / "two"), "train")
    rows["train"].save_to_disk(str(tmp_path / "plain"))
    ds, where = load_saved_dataset(str(tmp_path / "plain"), None)
    assert where == str(tmp_path / "plain") and len(ds) == 2
