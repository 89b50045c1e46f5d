"""Predictions as JSONL (`{"question_id", "text"}` per line): a resumable writer and a tolerant reader.

Long evaluation runs get killed; the writer appends one flushed line per answer so a rerun skips finished questions,
and it cuts off a line torn by the kill instead of failing on it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from evev2 import jsonio
from evev2.eval.records import check_bad_fraction

logger = logging.getLogger(__name__)


def _parse_prediction(record: Any) -> tuple[str, str] | None:
    if not isinstance(record, dict) or "question_id" not in record or not isinstance(record.get("text"), str):
        return None
    return str(record["question_id"]), record["text"]


def read_predictions(path: Path) -> dict[str, str]:
    """question id (as a string) -> predicted text. Malformed lines are skipped, counted and logged (too many fail
    the run); for a repeated id the first answer is kept."""
    predictions: dict[str, str] = {}
    bad = total = repeated = 0
    for number, record in jsonio.json_lines(path):
        total += 1
        parsed = _parse_prediction(record)
        if parsed is None:
            logger.warning("%s:%d: not a {\"question_id\", \"text\"} object", path, number)
            bad += 1
        elif parsed[0] in predictions:
            repeated += 1
        else:
            predictions[parsed[0]] = parsed[1]
    if repeated:
        logger.warning("%s: %d repeated question ids; kept the first answer of each", path, repeated)
    check_bad_fraction(bad, total, f"prediction lines of {path}")
    return predictions


class PredictionWriter:
    """Append-only JSONL of predictions that survives kills: `done(id)` says what a previous run finished.

    Use as a context manager. On open, a last line without its newline is kept if it parses and cut off if it does
    not (a kill mid-write), so the file stays valid JSONL.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.finished: set[str] = set()
        self._handle: Any = None

    def __enter__(self) -> "PredictionWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._repair_tail()
            self.finished = set(read_predictions(self.path))
        self._handle = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._handle.close()

    def _repair_tail(self) -> None:
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1  # 0 when the only line is torn
        try:
            tail = _parse_prediction(jsonio.loads(data[cut:]))
        except ValueError:
            tail = None
        with open(self.path, "r+b") as handle:
            if tail is not None:
                handle.seek(0, os.SEEK_END)
                handle.write(b"\n")
            else:
                logger.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", self.path,
                               len(data) - cut)
                handle.truncate(cut)

    def done(self, question_id: str | int) -> bool:
        return str(question_id) in self.finished

    def write(self, question_id: str | int, text: str, **extra: Any) -> None:
        """Append one answer and flush it to the OS, so killing the process loses at most this line."""
        if self._handle is None:
            raise RuntimeError("PredictionWriter must be used inside a `with` block")
        line = json.dumps({"question_id": question_id, "text": text, **extra}, ensure_ascii=False)
        self._handle.write(line + "\n")
        self._handle.flush()
        self.finished.add(str(question_id))
