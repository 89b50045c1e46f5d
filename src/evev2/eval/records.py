"""Reading benchmark annotation files into plain dict records, whatever form they were distributed in.

Supported: JSONL (LLaVA question files, POPE label files), JSON (a list; a {"data"|"annotations"|"questions": [...]}
wrapper as in TextVQA and VQAv2; an {id: record} map as in GQA and ScienceQA), TSV (MMBench, base64 images) and Parquet (Hugging Face exports; needs
the optional `pyarrow`, not a dependency of evev2). Malformed lines are skipped, counted and logged; too many fail
the run.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Any

from evev2 import jsonio

logger = logging.getLogger(__name__)

MAX_BAD_FRACTION = 0.05


def check_bad_fraction(bad: int, total: int, what: str, max_fraction: float = MAX_BAD_FRACTION) -> None:
    """Fail loudly once skipped entries stop being rare: a broken file must not turn into a quiet low score."""
    if bad:
        logger.warning("skipped %d of %d %s", bad, total, what)
    if total and bad / total > max_fraction:
        raise ValueError(f"{bad} of {total} {what} are malformed (more than {max_fraction:.0%}); fix the input")


def read_jsonl(path: Path, what: str = "lines") -> list[dict[str, Any]]:
    """Records of a JSONL file; blank lines are ignored, lines that are not JSON objects are skipped and counted."""
    records, bad, total = [], 0, 0
    for number, record in jsonio.json_lines(path):
        total += 1
        if not isinstance(record, dict):
            logger.warning("%s:%d: %s", path, number,
                           record if isinstance(record, ValueError) else "not a JSON object")
            bad += 1
            continue
        records.append(record)
    check_bad_fraction(bad, total, f"{what} of {path}")
    return records


def _json_records(data: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(data, dict):  # TextVQA {"data": [...]}, VQAv2 {"annotations": [...]} / {"questions": [...]}
        data = next((data[key] for key in ("data", "annotations", "questions") if isinstance(data.get(key), list)),
                    data)
    if isinstance(data, dict):  # {question id: record}
        return [{"question_id": key, **value} for key, value in data.items() if isinstance(value, dict)]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, a {{'data': [...]}} object or an id->record map")
    return [record for record in data if isinstance(record, dict)]


def _read_tsv(path: Path) -> list[dict[str, Any]]:
    csv.field_size_limit(sys.maxsize)  # MMBench stores base64 images in a column
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    # Empty cells (absent options, no hint) mean "no value", as pandas' NaN does for the official readers.
    return [{key: value for key, value in row.items() if value not in ("", "nan", None)} for row in rows]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise ImportError(f"reading {path} needs the optional package pyarrow (pip install pyarrow); or convert "
                          "the export to JSONL") from error
    return parquet.read_table(path).to_pylist()


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of an annotation or question file, chosen by its suffix."""
    path = Path(path)
    readers = {".jsonl": read_jsonl, ".tsv": _read_tsv, ".parquet": _read_parquet}
    if path.suffix == ".json":
        try:
            data = jsonio.read_json(path)
        except ValueError:  # POPE ships JSONL under a .json name
            return read_jsonl(path, "records")
        return _json_records(data, path)
    if path.suffix not in readers:
        raise ValueError(f"{path}: unsupported annotation format {path.suffix!r}; use one of "
                         f"{sorted([*readers, '.json'])}")
    return readers[path.suffix](path)
