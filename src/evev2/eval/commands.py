"""`evev2 eval score` and `evev2 eval report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from evev2.eval.predictions import read_predictions
from evev2.eval.report import collect_results, metrics_document, render_markdown
from evev2.eval.tasks import get_task, load_items


def score_cli(task: str | None = None, annotations: Path | None = None, predictions: Path | None = None,
              output: Path | None = None, questions: Path | None = None, model: str | None = None) -> dict[str, Any]:
    """Score a predictions JSONL against a benchmark's annotations, print the metrics and write them as JSON.

    Args:
        task: benchmark name: vqav2, gqa, textvqa, chartqa, ocrbench, scienceqa_img, mmbench, seed_image, ai2d,
            pope, mme or synth.
        annotations: annotation file (.jsonl, .json, .tsv, or .parquet when pyarrow is installed).
        predictions: JSONL with one {"question_id", "text"} per line.
        output: where to write the metrics JSON; default metrics.json next to the predictions.
        questions: optional LLaVA question JSONL, joined with the annotations on question_id.
        model: model name for reports; default the folder above the predictions' folder
            (RESULTS/<model>/<task>/predictions.jsonl).
    """
    if task is None or annotations is None or predictions is None:
        raise ValueError("eval score needs --task, --annotations and --predictions")
    benchmark = get_task(task)
    items = load_items(benchmark, annotations, questions)
    if not items:
        raise ValueError(f"{annotations} holds no {task} questions")
    metrics = benchmark.score(items, read_predictions(predictions))
    predictions = Path(predictions)
    document = metrics_document(task, model or predictions.resolve().parent.parent.name, benchmark.headline,
                                metrics, annotations=str(annotations), predictions=str(predictions))
    save_and_print_metrics(document, Path(output) if output is not None else predictions.with_name("metrics.json"))
    return document


def format_metrics(document: dict[str, Any]) -> str:
    """Human-readable metrics: the headline, then a per-type table (accuracy beside chance) for tasks that report
    chance levels (`synth`), then every other metric on its own line."""
    metrics = document["metrics"]
    lines = [f"{document['task']} ({document['model']}): {document['headline']} = "
             f"{metrics[document['headline']]:.2f}"]
    types = [key.removesuffix("/chance") for key in metrics if key.endswith("/chance")]
    if types:
        width = max(len("type"), *map(len, types))
        lines.append(f"  {'type':<{width}}  accuracy  chance  count")
        lines += [f"  {kind:<{width}}  {metrics[f'{kind}/accuracy']:8.2f}  {metrics[f'{kind}/chance']:6.2f}  "
                  f"{metrics[f'{kind}/count']:5d}" for kind in types]
    tabled = {f"{kind}/{column}" for kind in types for column in ("accuracy", "chance", "count")}
    rest = {key: value for key, value in metrics.items() if key not in tabled}
    width = max(map(len, rest), default=0)
    lines += [f"  {key:<{width}}  {value:.2f}" if isinstance(value, float) else f"  {key:<{width}}  {value}"
              for key, value in rest.items()]
    return "\n".join(lines)


def save_and_print_metrics(document: dict[str, Any], output: Path) -> None:
    """Write a metrics.json document (the layout `eval report` reads) and print it; `eval run` and `eval score`
    share this so that their outputs can be compared line by line."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(format_metrics(document))
    print(f"wrote {output}")


def report_cli(dirs: list[Path], out_prefix: Path = Path("eval_report")) -> dict[str, Any]:
    """Table of every task x model found under the result folders (RESULTS/<model>/<task>/metrics.json).

    Args:
        dirs: result folders to search for metrics.json files.
        out_prefix: writes OUT_PREFIX.md and OUT_PREFIX.json.
    """
    table = collect_results(dirs)
    if not table:
        raise ValueError(f"no metrics.json files under {', '.join(map(str, dirs))}")
    markdown = render_markdown(table)
    summary = {task: {model: {"headline": doc["headline"], "value": doc["metrics"][doc["headline"]],
                              "metrics": doc["metrics"]} for model, doc in models.items()}
               for task, models in table.items()}
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    out_prefix.with_suffix(".md").write_text(markdown, encoding="utf-8")
    out_prefix.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(markdown, end="")
    print(f"wrote {out_prefix.with_suffix('.md')} and {out_prefix.with_suffix('.json')}")
    return summary
