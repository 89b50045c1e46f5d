"""The benchmark registry: for each task, how to turn an annotation record into an `EvalItem` (images, prompt with
the LLaVA suffix, gold answer) and how to score predictions against those items.

`evev2 eval score` uses the scorers; a generation loop (`evev2 eval run`) reuses `load_items` and each item's
`prompt_text` / `image_paths`, so the prompts the model sees and the answers they are scored against come from one
place.
"""

from __future__ import annotations

import base64
import io
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from evev2.eval.chart_ocr_metrics import OCRBENCH_TEXT_RECOGNITION, ocrbench_correct, relaxed_correctness
from evev2.eval.choice_metrics import (CIRCULAR_OFFSET, LETTERS, answer_letter, circular_accuracy,
                                       extract_option_letter, rotate_options)
from evev2.eval.records import MAX_BAD_FRACTION, check_bad_fraction, read_records
from evev2.eval.synth_metrics import corpus_bleu4, per_type_accuracy
from evev2.eval.vqa_metrics import gqa_match, textvqa_accuracy, vqav2_accuracy
from evev2.eval.yesno_metrics import binary_metrics, mme_label, mme_scores, pope_label

logger = logging.getLogger(__name__)

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
OPTION_LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class EvalItem:
    """One question to ask: what the model sees (images, prompt) and what scoring needs (`meta`: gold answer etc.)."""

    question_id: str
    image_paths: tuple[str, ...]
    prompt_text: str
    meta: dict[str, Any] = field(default_factory=dict)


Scorer = Callable[[Sequence[EvalItem], dict[str, str]], dict[str, float]]


@dataclass(frozen=True)
class Task:
    """A benchmark: `make_item` maps a record to an item (None: not part of this benchmark, e.g. a ScienceQA
    question without an image), `expand` adds variants (MMBench rotations), `headline` names the paper's number."""

    name: str
    make_item: Callable[[dict[str, Any], Path | None], EvalItem | None]
    scorer: Scorer
    headline: str
    expand: Callable[[EvalItem], list[EvalItem]] | None = None

    def score(self, annotations: Sequence[EvalItem], predictions: dict[str, str]) -> dict[str, float]:
        """Metrics of `predictions` (question id -> text); a question without a prediction counts as wrong."""
        missing = [item.question_id for item in annotations if item.question_id not in predictions]
        if missing:
            logger.warning("%s: %d of %d questions have no prediction (scored as wrong), e.g. %s", self.name,
                           len(missing), len(annotations), missing[:3])
        filled = {item.question_id: predictions.get(item.question_id, "") for item in annotations}
        return {**self.scorer(annotations, filled), "num_questions": len(annotations),
                "num_missing_predictions": len(missing)}


# ---------------------------------------------------------------- record fields


def _field(record: dict[str, Any], *names: str) -> Any:
    """The first of `names` present in `record` with a value."""
    return next((record[name] for name in names if record.get(name) is not None), None)


def _required(record: dict[str, Any], *names: str) -> Any:
    value = _field(record, *names)
    if value is None:
        raise KeyError(f"record has none of the fields {names}")
    return value


def record_id(record: dict[str, Any]) -> str:
    return str(_required(record, "question_id", "questionId", "index", "id"))


def _question(record: dict[str, Any]) -> str:
    return str(_required(record, "text", "question", "prompt")).strip()


def _answer_list(value: Any) -> list[str]:
    """Gold answers as strings from a string, a list of strings or VQA's list of {"answer": ...} dicts."""
    values = value if isinstance(value, list) else [value]
    answers = [str(v["answer"] if isinstance(v, dict) else v) for v in values]
    if not answers:
        raise ValueError("empty answer list")
    return answers


def _save_embedded(data: bytes, image_root: Path, name: str) -> str:
    """Write an image stored inside the annotation file (Parquet bytes, TSV base64) so the model can open it."""
    image_format = Image.open(io.BytesIO(data)).format or "png"
    path = image_root / f"{name.replace('/', '_')}.{image_format.lower()}"
    if not path.exists():
        image_root.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(path)


def _is_base64_image(text: str) -> bool:
    """MMBench's TSV stores images as base64 text; file names always carry an extension, base64 never has a dot."""
    return len(text) > 100 and "." not in text


def _image_paths(record: dict[str, Any], image_root: Path | None) -> tuple[str, ...]:
    """Image files of a record: paths are taken relative to `image_root`; embedded images are written there
    (without an `image_root` they are left out, which scoring does not need)."""
    value = _field(record, "image", "image_path", "images", "image_file")
    values = value if isinstance(value, list) else [] if value is None else [value]
    paths = []
    for number, entry in enumerate(values):
        name = f"{record_id(record)}_{number}"
        if isinstance(entry, dict):  # Hugging Face image feature: {"bytes", "path"}
            if entry.get("bytes") is not None:
                if image_root is not None:
                    paths.append(_save_embedded(entry["bytes"], image_root, name))
                continue
            entry = entry["path"]
        entry = str(entry)
        if _is_base64_image(entry):
            if image_root is not None:
                paths.append(_save_embedded(base64.b64decode(entry), image_root, name))
            continue
        paths.append(str(image_root / entry) if image_root is not None else entry)
    return tuple(paths)


def _prompt(question: str, suffix: str) -> str:
    """Question plus the benchmark's instruction line, unless the question file already carries it (LLaVA's do)."""
    return question if not suffix or question.endswith(suffix) else f"{question}\n{suffix}"


def _category(record: dict[str, Any], *names: str) -> str:
    value = _field(record, *names)
    return "all" if value is None else str(value)


# ---------------------------------------------------------------- item makers


def _short_answer_item(suffix: str, answer_fields: tuple[str, ...], category_fields: tuple[str, ...] = ()
                       ) -> Callable[[dict[str, Any], Path | None], EvalItem]:
    def make(record: dict[str, Any], image_root: Path | None) -> EvalItem:
        meta = {"answers": _answer_list(_required(record, *answer_fields)),
                "category": _category(record, *category_fields)}
        return EvalItem(record_id(record), _image_paths(record, image_root), _prompt(_question(record), suffix), meta)
    return make


def _options(record: dict[str, Any]) -> list[str]:
    """Options from a list field, or from per-letter columns ("A".."J" as in MMBench, "choice_a".. as in SEED)."""
    listed = _field(record, "options", "choices")
    if isinstance(listed, list):
        options = [str(option) for option in listed]
    else:
        options = []
        for letter in LETTERS[:10]:
            value = _field(record, letter, f"choice_{letter.lower()}")
            if value is None:
                break
            options.append(str(value))
    if len(options) < 2:
        raise ValueError("a multiple-choice record needs at least two options")
    return options


def multiple_choice_prompt(question: str, options: Sequence[str], hint: str | None = None) -> str:
    """LLaVA's layout: optional hint, the question, one "A. option" line each, then the letter instruction."""
    lines = ([hint.strip()] if hint and hint.strip() else []) + [question]
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]
    return "\n".join(lines + [OPTION_LETTER_SUFFIX])


def _choice_item(keep: Callable[[dict[str, Any]], bool] = lambda record: True
                 ) -> Callable[[dict[str, Any], Path | None], EvalItem | None]:
    def make(record: dict[str, Any], image_root: Path | None) -> EvalItem | None:
        if not keep(record):
            return None
        question = str(_required(record, "question", "text")).strip()
        if OPTION_LETTER_SUFFIX in question:  # a LLaVA question file with options already laid out
            raise ValueError("use the annotation file with separate options, not a pre-rendered LLaVA prompt")
        options = _options(record)
        gold = answer_letter(_required(record, "answer", "label", "gt_answer"), options)
        hint = _field(record, "hint", "context")
        meta = {"options": options, "answer": gold, "hint": hint, "question": question, "group": record_id(record),
                "category": _category(record, "category", "question_type_id", "subject")}
        return EvalItem(record_id(record), _image_paths(record, image_root),
                        multiple_choice_prompt(question, options, hint), meta)
    return make


def circular_variants(item: EvalItem) -> list[EvalItem]:
    """MMBench CircularEval: the question once per rotation of its options; rotation k gets id index + k * 1e6."""
    options = item.meta["options"]
    variants = []
    for shift in range(len(options)):
        rotated, gold = rotate_options(options, item.meta["answer"], shift)
        qid = (str(int(item.question_id) + shift * CIRCULAR_OFFSET) if item.question_id.isdigit()
               else f"{item.question_id}#rot{shift}")
        meta = {**item.meta, "options": rotated, "answer": gold, "rotation": shift}
        variants.append(replace(item, question_id=qid, meta=meta,
                                prompt_text=multiple_choice_prompt(meta["question"], rotated, meta["hint"])))
    return variants


def _mmbench_item(record: dict[str, Any], image_root: Path | None) -> EvalItem | None:
    index = record_id(record)
    if index.isdigit() and int(index) >= CIRCULAR_OFFSET:
        return None  # a circular copy shipped in the file; rotations are regenerated from the original
    return _choice_item()(record, image_root)


def _pope_item(record: dict[str, Any], image_root: Path | None) -> EvalItem:
    label = str(_required(record, "label", "answer")).strip().lower()
    if label not in ("yes", "no"):
        raise ValueError(f"POPE label must be yes or no, got {label!r}")
    meta = {"answer": label, "category": _category(record, "category", "split")}
    return EvalItem(record_id(record), _image_paths(record, image_root), _prompt(_question(record),
                    SHORT_ANSWER_SUFFIX), meta)


def _mme_item(record: dict[str, Any], image_root: Path | None) -> EvalItem:
    answer = str(_required(record, "answer", "label")).strip().lower()
    if answer not in ("yes", "no"):
        raise ValueError(f"MME answer must be yes or no, got {answer!r}")
    image = _field(record, "image_path", "image")
    image_key = image if isinstance(image, str) and not _is_base64_image(image) else record_id(record)
    meta = {"answer": answer, "category": str(_required(record, "category")), "image_key": image_key}
    return EvalItem(record_id(record), _image_paths(record, image_root), _prompt(_question(record),
                    SHORT_ANSWER_SUFFIX), meta)


def _synth_item(record: dict[str, Any], image_root: Path | None) -> EvalItem:
    chance = _field(record, "chance")
    meta = {"answer": str(_required(record, "answer", "caption")), "type": str(_required(record, "type")),
            "chance": None if chance is None else float(chance)}
    return EvalItem(record_id(record), _image_paths(record, image_root), _question(record), meta)


# ---------------------------------------------------------------- scorers


def _percent(values: Sequence[float]) -> float:
    return 100 * sum(values) / len(values) if values else 0.0


def _with_categories(items: Sequence[EvalItem], scores: Sequence[float], name: str = "accuracy") -> dict[str, float]:
    """Overall mean (%) plus one mean per category when the benchmark has more than one."""
    by_category: dict[str, list[float]] = defaultdict(list)
    for item, value in zip(items, scores):
        by_category[item.meta.get("category", "all")].append(value)
    metrics = {name: _percent(scores)}
    if len(by_category) > 1:
        metrics.update({f"{category}/{name}": _percent(values) for category, values in sorted(by_category.items())})
    return metrics


def _per_question(rule: Callable[[str, EvalItem], float]) -> Scorer:
    def score(items: Sequence[EvalItem], predictions: dict[str, str]) -> dict[str, float]:
        return _with_categories(items, [float(rule(predictions[item.question_id], item)) for item in items])
    return score


def _choice_correct(prediction: str, item: EvalItem) -> bool:
    return extract_option_letter(prediction, item.meta["options"]) == item.meta["answer"]


def _score_mmbench(items: Sequence[EvalItem], predictions: dict[str, str]) -> dict[str, float]:
    correct = [_choice_correct(predictions[item.question_id], item) for item in items]
    circular, groups = circular_accuracy((item.meta["group"], ok) for item, ok in zip(items, correct))
    by_category: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    for item, ok in zip(items, correct):
        by_category[item.meta["category"]].append((item.meta["group"], ok))
    metrics = {"circular_accuracy": 100 * circular, "num_groups": groups,
               "single_pass_accuracy": _percent([ok for item, ok in zip(items, correct)
                                                 if item.meta.get("rotation", 0) == 0])}
    if len(by_category) > 1:
        metrics.update({f"{category}/circular_accuracy": 100 * circular_accuracy(pairs)[0]
                        for category, pairs in sorted(by_category.items())})
    return metrics


def _score_pope(items: Sequence[EvalItem], predictions: dict[str, str]) -> dict[str, float]:
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for item in items:
        pairs[item.meta["category"]].append((pope_label(predictions[item.question_id]), item.meta["answer"]))
    metrics: dict[str, float] = {}
    for split, split_pairs in sorted(pairs.items()):
        metrics.update({f"{split}/{key}": value for key, value in binary_metrics(split_pairs).items()})
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        metrics[f"mean/{key}"] = sum(metrics[f"{split}/{key}"] for split in pairs) / len(pairs) if pairs else 0.0
    return metrics


def _score_mme(items: Sequence[EvalItem], predictions: dict[str, str]) -> dict[str, float]:
    return mme_scores((item.meta["category"], item.meta["image_key"],
                       mme_label(predictions[item.question_id]) == item.meta["answer"]) for item in items)


def _score_ocrbench(items: Sequence[EvalItem], predictions: dict[str, str]) -> dict[str, float]:
    """OCRBench reports counts, not percentages: the final score is the number right (of 1000 in the full set)."""
    per_category: Counter[str] = Counter()
    for item in items:
        category = item.meta["category"]
        per_category[category] += ocrbench_correct(predictions[item.question_id], item.meta["answers"], category)
    metrics: dict[str, float] = {f"{category}/correct": count for category, count in sorted(per_category.items())}
    metrics["Text Recognition/correct"] = sum(per_category[c] for c in OCRBENCH_TEXT_RECOGNITION)
    metrics["score"] = sum(per_category.values())
    return metrics


def _score_synth(items: Sequence[EvalItem], predictions: dict[str, str]) -> dict[str, float]:
    questions = [item for item in items if item.meta["type"] != "caption"]
    captions = [item for item in items if item.meta["type"] == "caption"]
    metrics = per_type_accuracy((item.meta["type"], predictions[item.question_id], item.meta["answer"],
                                 item.meta["chance"]) for item in questions)
    if captions:
        metrics["caption/bleu4"] = corpus_bleu4([predictions[item.question_id] for item in captions],
                                                [item.meta["answer"] for item in captions])
        metrics["caption/count"] = len(captions)
    return metrics


def _is_test_image_question(record: dict[str, Any]) -> bool:
    """ScienceQA-IMG: test questions that come with an image (problems.json holds every split)."""
    return bool(_field(record, "image", "image_path")) and record.get("split", "test") == "test"


def _is_image_question(record: dict[str, Any]) -> bool:
    """SEED-Bench's image part (its files mix in video questions)."""
    return record.get("data_type", "image") == "image"


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("vqav2", _short_answer_item(SHORT_ANSWER_SUFFIX, ("answers",), ("answer_type",)),
         _per_question(lambda p, item: vqav2_accuracy(p, item.meta["answers"])), "accuracy"),
    Task("gqa", _short_answer_item(SHORT_ANSWER_SUFFIX, ("answer",)),
         _per_question(lambda p, item: gqa_match(p, item.meta["answers"][0])), "accuracy"),
    Task("textvqa", _short_answer_item(SHORT_ANSWER_SUFFIX, ("answers",)),
         _per_question(lambda p, item: textvqa_accuracy(p, item.meta["answers"])), "accuracy"),
    Task("chartqa", _short_answer_item(SHORT_ANSWER_SUFFIX, ("answer", "label"), ("type", "category")),
         _per_question(lambda p, item: any(relaxed_correctness(p, a) for a in item.meta["answers"])),
         "accuracy"),
    Task("ocrbench", _short_answer_item("", ("answers", "answer"), ("category", "question_type", "type")),
         _score_ocrbench, "score"),
    Task("scienceqa_img", _choice_item(_is_test_image_question), _per_question(_choice_correct), "accuracy"),
    Task("mmbench", _mmbench_item, _score_mmbench, "circular_accuracy", expand=circular_variants),
    Task("seed_image", _choice_item(_is_image_question), _per_question(_choice_correct), "accuracy"),
    Task("ai2d", _choice_item(), _per_question(_choice_correct), "accuracy"),
    Task("pope", _pope_item, _score_pope, "mean/f1"),
    Task("mme", _mme_item, _score_mme, "total"),
    Task("synth", _synth_item, _score_synth, "accuracy"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def _merge_questions(records: list[dict[str, Any]], questions: Path) -> list[dict[str, Any]]:
    """Join a LLaVA question file with a separate annotation file on question id; annotation fields win."""
    gold = {}
    for record in records:
        try:
            gold[record_id(record)] = record
        except KeyError:
            continue
    asked = read_records(questions)
    merged = [{**question, **gold[record_id(question)]} for question in asked if record_id(question) in gold]
    if len(merged) < len(asked):
        logger.warning("%d of %d questions in %s have no annotation and are not scored", len(asked) - len(merged),
                       len(asked), questions)
    return merged


def load_items(task: Task, annotations: Path, questions: Path | None = None, image_root: Path | None = None,
               max_bad_fraction: float = MAX_BAD_FRACTION) -> list[EvalItem]:
    """Every question of `task` in `annotations` (joined with `questions` when given) as `EvalItem`s.

    Malformed records are skipped, counted and logged, and too many fail the run. A repeated question id (MME
    exports key both questions of an image by the image) gets "#2", "#3", ... on its later occurrences.
    """
    records = read_records(annotations)
    if questions is not None:
        records = _merge_questions(records, questions)
    items: list[EvalItem] = []
    bad = 0
    for record in records:
        try:
            item = task.make_item(record, image_root)
        except (KeyError, ValueError, TypeError) as error:
            logger.warning("%s: skipped record %s: %s", task.name, record.get("question_id", record.get("index")),
                           error)
            bad += 1
            continue
        if item is not None:
            items.extend(task.expand(item) if task.expand else [item])
    check_bad_fraction(bad, len(records), f"{task.name} records of {annotations}", max_bad_fraction)
    seen: Counter[str] = Counter()
    unique = []
    for item in items:
        seen[item.question_id] += 1
        count = seen[item.question_id]
        unique.append(item if count == 1 else replace(item, question_id=f"{item.question_id}#{count}"))
    return unique
