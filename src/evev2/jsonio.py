"""JSON and JSON Lines files, read and written the same way everywhere.

Lines are split on "\\n" only (`str.splitlines` would also split inside a record, at U+2028, U+0085 or \\x1c) and
blank lines are ignored. Every way a document can be bad (not UTF-8, not JSON, nested too deeply, an integer too long
for Python) is a `ValueError`, so a tolerant reader catches one type and a strict one names the file and the line.
Writes go to a temporary file in the same folder that is renamed over the target: a kill leaves the old file or the
new one, never half of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def loads(data: str | bytes) -> Any:
    """One JSON document; UTF-8 bytes (a leading BOM is dropped) or text. Raises `ValueError` whatever is wrong."""
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8 ({err})") from err
    try:
        return json.loads(text)
    except RecursionError as err:
        raise ValueError("JSON nested too deeply") from err
    except ValueError as err:  # a syntax error, or an integer longer than Python converts
        raise ValueError(f"invalid JSON ({err})") from err


def read_json(path: str | Path) -> Any:
    """A whole JSON file; `ValueError` naming the file when it is not JSON."""
    try:
        return loads(Path(path).read_bytes())
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def raw_lines(path: str | Path) -> list[tuple[int, bytes]]:
    """(line number, bytes) of every non-blank line, undecoded: parse each one when (and where) it is needed."""
    lines = Path(path).read_bytes().split(b"\n")
    return [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]


def json_lines(path: str | Path) -> Iterator[tuple[int, Any | ValueError]]:
    """(line number, value) of every non-blank line, with the `ValueError` as the value of a line that is not JSON."""
    for number, line in raw_lines(path):
        try:
            yield number, loads(line)
        except ValueError as err:
            yield number, err


def read_jsonl(path: str | Path) -> list[Any]:
    """Every line of a JSONL file that evev2 wrote itself; a bad line is an error naming the file and the line."""
    values = []
    for number, value in json_lines(path):
        if isinstance(value, ValueError):
            raise ValueError(f"{path}:{number}: {value}")
        values.append(value)
    return values


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, fsynced and renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=1) + "\n")


def write_json_records(path: str | Path, rows: Iterable[Any]) -> None:
    """A JSON array with one element per line: LLaVA-style files that stay greppable and diffable."""
    write_text_atomic(path, "[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
