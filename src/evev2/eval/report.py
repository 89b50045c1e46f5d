"""Collecting per-task metrics files into one tasks x models table (Markdown and JSON).

Layout: `RESULTS/<model>/<task>/metrics.json`, as `evev2 eval score` writes it next to
`RESULTS/<model>/<task>/predictions.jsonl`. Each file is `{"task", "model", "headline", "metrics": {...}}`, so a
folder of hand-written files (e.g. the numbers of the EVEv2 paper's Table 2) is reported like any model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from evev2 import jsonio
from evev2.eval.tasks import TASKS

logger = logging.getLogger(__name__)


def metrics_document(task: str, model: str, headline: str, metrics: dict[str, float], **sources: str
                     ) -> dict[str, Any]:
    """The metrics.json content for one (task, model)."""
    return {"task": task, "model": model, "headline": headline, "metrics": metrics, **sources}


def collect_results(dirs: list[Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """task -> model -> metrics.json document, from every metrics.json below `dirs`. Unreadable files are skipped
    and logged; a (task, model) pair found twice keeps the first."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for directory in dirs:
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"{directory} is not a directory")
        for path in sorted(Path(directory).rglob("metrics.json")):
            try:
                document = jsonio.read_json(path)
                task, model = document["task"], document["model"]
                document["metrics"][document["headline"]]
            except (ValueError, KeyError, TypeError) as error:
                logger.warning("skipped %s: not a metrics file (%s)", path, error)
                continue
            if model in table.setdefault(task, {}):
                logger.warning("skipped %s: %s on %s already read from another file", path, model, task)
                continue
            table[task][model] = document
    return table


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def render_markdown(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Rows are tasks (registry order first), columns models (first-seen order); "-" where a model lacks a task."""
    models = list(dict.fromkeys(model for task in table.values() for model in task))
    tasks = [t for t in TASKS if t in table] + sorted(t for t in table if t not in TASKS)
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---|---|" + "---:|" * len(models)]
    for task in tasks:
        documents = table[task]
        headline = next(iter(documents.values()))["headline"]
        cells = [_format(documents[m]["metrics"][documents[m]["headline"]]) if m in documents else "-"
                 for m in models]
        lines.append(f"| {task} | {headline} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
