"""What the user sees at the end of the demo: the results table, and a contact sheet of held-out answers."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from evev2.synth.language import QA_TYPES
from evev2.eval.synth_metrics import synth_answer_matches

TILE_IMAGE_PX = 320
TILE_TEXT_PX = 340
LINE_PX = 15


def results_table(results: dict[str, Any]) -> str:
    """Per question type: accuracy, blind baseline, chance and the issue's goal; then captions, perplexity, time."""
    model, blind, goals = results["heldout"]["model"], results["heldout"]["blind"], results["goals"]
    lines = [f"{'type':<15} {'model':>6} {'blind':>6} {'chance':>6} {'goal':>5} {'n':>5}"]
    for kind in [*QA_TYPES, "overall"]:
        key = "accuracy" if kind == "overall" else f"{kind}/accuracy"
        if key not in model:
            continue
        chance = "" if kind == "overall" else f"{model[f'{kind}/chance'] / 100:6.3f}"
        goal = f"{goals[kind]:5.2f}" if kind in goals else ""
        count = model.get(f"{kind}/count", model["num_questions"])
        lines.append(f"{kind:<15} {model[key] / 100:6.3f} {blind[key] / 100:6.3f} {chance:>6} {goal:>5} {count:5d}")
    for kind in QA_TYPES:
        if f"{kind}/generated_accuracy" in model:
            lines.append(f"{kind}: scored as multiple choice (the choice the model finds likeliest); its generated "
                         f"answers {model[f'{kind}/generated_accuracy'] / 100:.3f}, blind "
                         f"{blind[f'{kind}/generated_accuracy'] / 100:.3f}")
    for kind, by_n in results["by_object_count"].items():
        lines.append(f"{kind} by objects in the scene (model / 1/n, the score of seeing every object but not which one "
                     f"the question names): " + ", ".join(f"{n}: {cell['accuracy']:.2f}/{cell['random_object']:.2f}"
                                                           for n, cell in by_n.items()))
    for kind, looked in results["named_object_attention"].items():
        best = looked["best"]
        lines.append(f"{kind} questions, attention of the answer on the named object (share of its attention on "
                     f"objects; best head, layer {best['layer']} head {best['head']}): {best['share']:.2f}, against "
                     f"{looked['random_object']:.2f} for looking at every object alike")
    text = results["text_perplexity"]
    lines += [
        f"caption BLEU-4 (greedy, {results['heldout']['captions']['caption/count']} held-out images): "
        f"{results['heldout']['captions']['caption/bleu4']:.1f}",
        f"text-only perplexity on held-out text: stage-0 LLM {text['stage0_llm']:.2f} -> final VLM {text['final_vlm']:.2f}",
        f"wall time {results['timing']['total_s'] / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in results['timing']['phases'].items())})",
    ]
    return "\n".join(lines)


def contact_sheet(records: list[dict[str, Any]], predictions: dict[str, str], image_root: Path, out: Path,
                  images: int, columns: int = 4, choices: dict[str, str] | None = None) -> Path:
    """A grid of the first `images` held-out images, each above its questions with the model's answer and the truth
    (green when right), and under a question that offers choices the one the model found likeliest (`choices`, by
    question id: what its accuracy counts); a captioned image also shows the model's caption against the true one."""
    choices = choices or {}
    by_image: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_image.setdefault(record["image"], []).append(record)
    chosen = list(by_image.items())[:images]
    rows = (len(chosen) + columns - 1) // columns
    tile_w, tile_h = TILE_IMAGE_PX + 20, TILE_IMAGE_PX + TILE_TEXT_PX
    sheet = Image.new("RGB", (columns * tile_w, max(1, rows) * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for index, (image_path, questions) in enumerate(chosen):
        x0, y0 = (index % columns) * tile_w + 10, (index // columns) * tile_h + 10
        with Image.open(image_root / image_path) as image:
            sheet.paste(image.convert("RGB"), (x0, y0))
        y = y0 + TILE_IMAGE_PX + 8
        for record in questions:
            answer = predictions.get(str(record["question_id"]))
            if answer is None:
                continue
            right = synth_answer_matches(answer, record["answer"])
            lines = [(f"Q: {record['question']}", "black")]
            if record["type"] == "caption":
                lines += [(f"  {line}", (0, 0, 160)) for line in textwrap.wrap(f"model: {answer}", 52)]
                lines += [(f"  {line}", "black") for line in textwrap.wrap(f"truth: {record['answer']}", 52)]
            else:
                lines.append((f"   model: {answer}   truth: {record['answer']}", (0, 120, 0) if right else (190, 0, 0)))
                if (pick := choices.get(str(record["question_id"]))) is not None:
                    lines.append((f"   likeliest of the choices: {pick}",
                                  (0, 120, 0) if synth_answer_matches(pick, record["answer"]) else (190, 0, 0)))
            for text, colour in lines:
                draw.text((x0, y), text, fill=colour, font=font)
                y += LINE_PX
            y += 3
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
