"""The one JSON/JSONL reader and writer: what counts as a line, what counts as bad, and atomic writes."""

from __future__ import annotations

import json

import pytest

from evev2 import jsonio


def test_lines_split_on_newlines_only_and_every_bad_document_is_a_value_error(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = {"text": "a\u2028b\u0085c\x1cd", "n": 1}  # separators str.splitlines() would cut a record at
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(good).encode() + b"\n\n  \n{broken\n"  # a BOM, blank lines
                     + b'"\xff"\n' + b"[" * 100_000 + b"\n" + b"9" * 5000 + b"\n[1]\n")
    lines = list(jsonio.json_lines(path))
    assert [number for number, _ in lines] == [1, 4, 5, 6, 7, 8]
    assert lines[0][1] == good and lines[-1][1] == [1]
    errors = [str(value) for _, value in lines[1:-1]]
    assert all(isinstance(value, ValueError) for _, value in lines[1:-1])
    assert errors[0].startswith("invalid JSON") and errors[1].startswith("not valid UTF-8")
    assert errors[2] == "JSON nested too deeply" and errors[3].startswith("invalid JSON")  # int digit limit
    with pytest.raises(ValueError, match=r"mixed.jsonl:4: invalid JSON"):
        jsonio.read_jsonl(path)


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    jsonio.write_jsonl(path, [{"a": 1}, {"b": 2}])
    assert jsonio.read_jsonl(path) == [{"a": 1}, {"b": 2}]

    def failing_fsync(fd):  # the new text is in the temporary file when the disk fails
        raise OSError("disk full")

    monkeypatch.setattr(jsonio.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        jsonio.write_json(path, {"c": 3})
    assert jsonio.read_jsonl(path) == [{"a": 1}, {"b": 2}] and [p.name for p in tmp_path.iterdir()] == [path.name]
