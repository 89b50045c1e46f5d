"""Held-out evaluation of the demo's final model, through the project's eval code (`evev2 eval run` internals).

Three numbers per question type: the model's accuracy, chance, and a blind baseline - the same model with every
image replaced by a flat image of that image's mean colour and size, so it reads the question but sees no scene.
Questions that offer choices are scored as multiple choice (the choice the model finds likeliest, as lm-eval and
lmms-eval score multiple-choice tasks), their generated answers kept beside.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image, ImageStat

from evev2 import jsonio
from evev2.constants import IMAGE_TOKEN_INDEX
from evev2.data.image_processing import grid_token_index
from evev2.eval.likelihood import continuation_logprobs
from evev2.eval.run import run_benchmark
from evev2.eval.synth_metrics import synth_answer_matches
from evev2.infer.engine import Generate, GenerationRequest, GenerationResult, InferenceEngine
from evev2.infer.images import load_image
from evev2.synth.language import NAMING

CAPTION_MAX_NEW_TOKENS = 96
ANSWER_MAX_NEW_TOKENS = 8
CHOICE_BATCH_ROWS = 64
BINDING_TYPES = ("color", "shape")  # questions that name one object of the scene by its other attribute


def split_question_file(questions: Path, out_dir: Path, caption_images: int) -> tuple[Path, Path]:
    """Write the QA records, ordered by image size, and the first `caption_images` caption records into two files.

    Answers are one word and captions dozens, so they are decoded in separate batches: a batch runs until its
    longest row stops. A prefill pads every prompt to the longest, and images of similar size give prompts of similar
    length (measured on the demo's held-out questions: 1.22x faster than in scene order, the same answers).
    """
    records = jsonio.read_jsonl(questions)
    sizes = {}
    for r in records:
        if r["image"] not in sizes:
            with Image.open(questions.parent / r["image"]) as image:  # reads the header only
                sizes[r["image"]] = image.size[1], image.size[0]
    qa = sorted((r for r in records if r["type"] != "caption"), key=lambda r: sizes[r["image"]])
    captions = [r for r in records if r["type"] == "caption"][:caption_images]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "heldout_qa.jsonl", out_dir / "heldout_captions.jsonl"
    for path, rows in zip(paths, (qa, captions)):
        jsonio.write_jsonl(path, rows)
    return paths


def blank_like(image: Image.Image) -> Image.Image:
    """A flat image of the same size and mean colour: everything about the scene is gone but its size and tint."""
    mean = tuple(round(c) for c in ImageStat.Stat(image.convert("RGB")).mean)
    return Image.new("RGB", image.size, mean)


def blind(generate: Generate) -> Generate:
    """`generate` with every request's images replaced by `blank_like` versions (the blind baseline)."""
    def blind_generate(requests: list[GenerationRequest]) -> list[GenerationResult]:
        blinded = [GenerationRequest(r.messages, [blank_like(load_image(i)) for i in r.images], r.max_new_tokens,
                                     r.temperature, r.top_p, list(r.stop)) for r in requests]
        return generate(blinded)

    return blind_generate


def choose_answers(engine: InferenceEngine, records: list[dict[str, Any]], image_root: Path, blind_images: bool,
                   batch_rows: int = CHOICE_BATCH_ROWS) -> dict[str, str]:
    """{question_id: the choice with the highest log-likelihood} for the records that offer `choices` (with blank
    images when `blind_images`), scored `batch_rows` (question, choice) pairs per forward."""
    asked = [record for record in records if record.get("choices")]
    requests = []
    for record in asked:
        image = load_image(str(image_root / record["image"]))
        image = blank_like(image) if blind_images else image
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record["question"]}]}]
        # the answer follows "ASSISTANT:" after a space, as in training
        requests += [(messages, [image], f" {choice}") for choice in record["choices"]]
    scores = iter([score for start in range(0, len(requests), batch_rows) for score, _ in
                   continuation_logprobs(engine.model, engine.processor, requests[start:start + batch_rows])])
    picks = {}
    for record in asked:
        mine = [next(scores) for _ in record["choices"]]
        picks[str(record["question_id"])] = record["choices"][mine.index(max(mine))]
    return picks


def score_choices(metrics: dict[str, Any], records: list[dict[str, Any]], picks: dict[str, str]) -> dict[str, Any]:
    """`metrics` with each choice type's accuracy taken from `picks` (its generated one kept as
    `<type>/generated_accuracy`) and the overall accuracy recomputed over every question."""
    right: dict[str, list[bool]] = {}
    for record in records:
        if str(record["question_id"]) in picks:
            right.setdefault(record["type"], []).append(
                synth_answer_matches(picks[str(record["question_id"])], record["answer"]))
    scored = dict(metrics)
    for kind, hits in right.items():
        scored[f"{kind}/generated_accuracy"] = metrics[f"{kind}/accuracy"]
        scored[f"{kind}/accuracy"] = 100 * sum(hits) / len(hits)
    types = [key.removesuffix("/count") for key in metrics if key.endswith("/count")]
    counted = sum(scored[f"{kind}/count"] for kind in types)
    scored["accuracy"] = sum(scored[f"{kind}/accuracy"] * scored[f"{kind}/count"] for kind in types) / counted
    return scored


def evaluate_heldout(engine: InferenceEngine, qa_file: Path, caption_file: Path, image_root: Path, output: Path,
                     batch_size: int) -> dict[str, Any]:
    """Per-type accuracy (model and blind), caption BLEU-4; every prediction file lands under `output`, the choices
    picked by likelihood in `<name>/synth/choices.json`."""
    common = {"task": "synth", "image_root": image_root, "batch_size": batch_size, "output": output}
    model = run_benchmark(engine.generate, "final", data=qa_file, max_new_tokens=ANSWER_MAX_NEW_TOKENS, **common)
    blind_model = run_benchmark(blind(engine.generate), "blind", data=qa_file, max_new_tokens=ANSWER_MAX_NEW_TOKENS,
                                **common)
    captions = run_benchmark(engine.generate, "final-captions", data=caption_file,
                             max_new_tokens=CAPTION_MAX_NEW_TOKENS, **common)
    records = jsonio.read_jsonl(qa_file)
    scored = {}
    for name, run in (("final", model), ("blind", blind_model)):
        picks = choose_answers(engine, records, image_root, blind_images=name == "blind")
        jsonio.write_json(output / name / "synth" / "choices.json", picks)
        scored[name] = score_choices(run["metrics"], records, picks)
    return {"model": scored["final"], "blind": scored["blind"], "captions": captions["metrics"],
            "predictions": {name: str(output / name / "synth" / "predictions.jsonl")
                            for name in ("final", "blind", "final-captions")},
            "choices": {name: str(output / name / "synth" / "choices.json") for name in ("final", "blind")}}


def _box_tokens(box: list[int], scale: float, width: int, unit: int) -> list[int]:
    """Indices, among an image's tokens, of the patches a pixel box (scaled to the resized image) touches."""
    x0, y0, x1, y1 = (round(v * scale) for v in box)
    return [grid_token_index(r, c, width, unit)
            for r in range(y0 // unit, (y1 - 1) // unit + 1) for c in range(x0 // unit, (x1 - 1) // unit + 1)]


def named_object_attention(engine: InferenceEngine, records: list[dict[str, Any]], scenes: list[dict[str, Any]],
                           image_root: Path, per_type: int = 60) -> dict[str, dict[str, Any]]:
    """Where the answer looks: for colour and shape questions in scenes of 2+ objects, per layer and head, the share
    of the answering position's attention on object tokens that lands on the object the question names. The
    answering position is the one that predicts the answer's last word ("star" of "a red star": the colour word's).

    1/n (the mean of `random_object`) is a head that looks at every object alike; a head well above it finds the
    object, which is what binding needs. -> {type: {"share": [layer][head], "best": {...}, "random_object", "questions"}}
    """
    scene_of = {scene["image"]: scene for scene in scenes}
    model, unit = engine.model, engine.model.config.image_pixels_per_token
    shares: dict[str, list[torch.Tensor]] = {kind: [] for kind in BINDING_TYPES}
    random_object: dict[str, list[float]] = {kind: [] for kind in BINDING_TYPES}
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only backend that returns attention weights
    try:
        for record in records:
            kind, scene = record["type"], scene_of[record["image"]]
            objects = scene["objects"]
            if kind not in BINDING_TYPES or len(objects) < 2 or len(shares[kind]) >= per_type:
                continue
            named = next(i for i, o in enumerate(objects)
                         if NAMING[kind](SimpleNamespace(**o)).question == record["question"])
            prompt = engine.prepare(GenerationRequest([{"from": "human", "value": f"<image>\n{record['question']}"}],
                                                      [str(image_root / record["image"])]))
            lead = record["answer"].rpartition(" ")[0]  # the answer's words before the last, teacher-forced
            lead_ids = engine.tokenizer(f" {lead}", add_special_tokens=False, return_tensors="pt").input_ids[0]
            input_ids = torch.cat([prompt.input_ids, lead_ids]) if lead else prompt.input_ids
            image = prompt.images[0]
            scale = image.shape[2] / scene["width"]  # boxes are in the scene's pixels, tokens in the resized image's
            at = int((prompt.input_ids == IMAGE_TOKEN_INDEX).nonzero()[0])  # the image's tokens replace it
            cells = [[at + i for i in _box_tokens(o["box"], scale, image.shape[2], unit)] for o in objects]
            with torch.no_grad():
                attentions = model(input_ids=input_ids[None].to(engine.device),
                                   images=[image.to(engine.device, model.dtype)], output_attentions=True).attentions
            last = torch.stack([a[0, :, -1].float().cpu() for a in attentions])  # (layers, heads, S)
            on_objects = sum(last[..., tokens].sum(-1) for tokens in cells)
            shares[kind].append(last[..., cells[named]].sum(-1) / on_objects.clamp_min(1e-12))
            random_object[kind].append(1 / len(objects))
    finally:
        model.set_attn_implementation(previous)
    table = {}
    for kind, rows in shares.items():
        if not rows:
            continue
        share = torch.stack(rows).mean(0)  # (layers, heads)
        layer, head = divmod(int(share.argmax()), share.shape[1])
        table[kind] = {"share": share.tolist(), "best": {"layer": layer, "head": head, "share": float(share.max())},
                       "random_object": sum(random_object[kind]) / len(rows), "questions": len(rows)}
    return table


def accuracy_by_object_count(records: list[dict[str, Any]], predictions: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Colour and shape accuracy per number of objects in the scene, beside 1/n.

    "what color is the circle ?" in a scene of n objects needs two things: seeing each object's colour and shape,
    and binding the question's shape to one object. A model that sees every object but picks one at random scores
    1/n; above 1/n is binding. -> {type: {n: {"accuracy", "count", "random_object"}}}
    """
    table: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["type"] not in BINDING_TYPES or str(record["question_id"]) not in predictions:
            continue
        cell = table.setdefault(record["type"], {}).setdefault(str(record["objects"]), {"right": 0, "count": 0})
        cell["right"] += synth_answer_matches(predictions[str(record["question_id"])], record["answer"])
        cell["count"] += 1
    return {kind: {n: {"accuracy": cell["right"] / cell["count"], "count": cell["count"], "random_object": 1 / int(n)}
                   for n, cell in sorted(by_n.items(), key=lambda item: int(item[0]))}
            for kind, by_n in sorted(table.items())}
