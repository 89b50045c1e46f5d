"""End to end: tiny annotation files in each distributed form, scored through `evev2 eval score`."""

import base64
import csv
import importlib.util
import io
import json

import numpy as np
import pytest
from PIL import Image

from evev2.cli import main
from evev2.eval.choice_metrics import CIRCULAR_OFFSET
from evev2.eval.tasks import OPTION_LETTER_SUFFIX, SHORT_ANSWER_SUFFIX, get_task, load_items


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def score(tmp_path, task, annotations, predictions, *extra):
    out = tmp_path / f"{task}_metrics.json"
    document = main(["eval", "score", "--task", task, "--annotations", str(annotations), "--predictions",
                     str(predictions), "--output", str(out), *extra])
    assert json.loads(out.read_text()) == document
    return document["metrics"]


def test_textvqa_json_wrapper(tmp_path):
    data = {"data": [
        {"question_id": 1, "image_id": "a", "question": "what brand?", "answers": ["Coca-Cola"] * 3 + ["pepsi"] * 7},
        {"question_id": 2, "image_id": "b", "question": "what word?", "answers": ["stop"] * 2 + ["go"] * 8},
    ]}
    annotations = tmp_path / "TextVQA_val.json"
    annotations.write_text(json.dumps(data))
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 1, "text": "coca cola"},
                                                     {"question_id": 2, "text": "Stop."}])
    metrics = score(tmp_path, "textvqa", annotations, predictions)
    assert metrics["accuracy"] == pytest.approx(100 * (0.9 + 0.6) / 2)
    assert metrics["num_questions"] == 2 and metrics["num_missing_predictions"] == 0


def test_gqa_llava_questions_joined_with_id_map(tmp_path, capsys):
    questions = write_jsonl(tmp_path / "llava_gqa.jsonl", [
        {"question_id": "q1", "image": "n1.jpg", "text": f"Is it red?\n{SHORT_ANSWER_SUFFIX}"},
        {"question_id": "q2", "image": "n2.jpg", "text": "Which side?"},
        {"question_id": "q3", "image": "n3.jpg", "text": "What is it?"},
    ])
    annotations = tmp_path / "testdev_balanced_questions.json"
    annotations.write_text(json.dumps({"q1": {"answer": "yes"}, "q2": {"answer": "left"}, "q3": {"answer": "cup"}}))
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": "q1", "text": "Yes."},
                                                     {"question_id": "q2", "text": "right"}])
    metrics = score(tmp_path, "gqa", annotations, predictions, "--questions", str(questions))
    assert metrics["accuracy"] == pytest.approx(100 / 3)   # q3 has no prediction: wrong
    assert metrics["num_missing_predictions"] == 1
    assert "gqa" in capsys.readouterr().out
    items = load_items(get_task("gqa"), annotations, questions)
    assert items[0].prompt_text.count(SHORT_ANSWER_SUFFIX) == 1
    assert items[1].prompt_text == f"Which side?\n{SHORT_ANSWER_SUFFIX}"


def test_pope_per_split(tmp_path):
    labels = [("random", "yes", "Yes, there is."), ("random", "no", "No."), ("random", "no", "Yes"),
              ("adversarial", "yes", "There is not."), ("adversarial", "no", "no")]
    annotations = write_jsonl(tmp_path / "coco_pope.json", [
        {"question_id": i, "image": f"{i}.jpg", "text": "Is there a dog in the image?", "label": label,
         "category": split} for i, (split, label, _) in enumerate(labels)])
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": i, "text": out}
                                                     for i, (_, _, out) in enumerate(labels)])
    m = score(tmp_path, "pope", annotations, predictions)
    assert (m["random/tp"], m["random/fp"], m["random/tn"], m["random/fn"]) == (1, 1, 1, 0)
    assert m["random/f1"] == pytest.approx(100 * 2 / 3)
    assert (m["adversarial/tp"], m["adversarial/tn"], m["adversarial/fn"]) == (0, 1, 1)
    assert m["adversarial/f1"] == 0.0
    assert m["mean/f1"] == pytest.approx(100 / 3)


def test_mmbench_tsv_circular(tmp_path):
    rows = [{"index": 0, "question": "Which animal?", "hint": "A pet.", "A": "dog", "B": "cat", "C": "bird",
             "D": "fish", "answer": "B", "category": "animals"},
            {"index": 1, "question": "Which colour?", "hint": "", "A": "red", "B": "blue", "C": "", "D": "",
             "answer": "A", "category": "colours"},
            {"index": CIRCULAR_OFFSET, "question": "Which colour?", "hint": "", "A": "blue", "B": "red", "C": "",
             "D": "", "answer": "B", "category": "colours"}]  # a shipped circular copy: regenerated, not doubled
    annotations = tmp_path / "mmbench_dev.tsv"
    with open(annotations, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    items = load_items(get_task("mmbench"), annotations)
    assert sorted(int(item.question_id) for item in items) == [0, 1, CIRCULAR_OFFSET, CIRCULAR_OFFSET + 1,
                                                                2 * CIRCULAR_OFFSET, 3 * CIRCULAR_OFFSET]
    first = next(item for item in items if item.question_id == "0")
    assert first.prompt_text == f"A pet.\nWhich animal?\nA. dog\nB. cat\nC. bird\nD. fish\n{OPTION_LETTER_SUFFIX}"
    # Question 0: "cat" is B, A, D, C in rotations 0..3; the model answers three right. Question 1: both right.
    answers = {"0": "B", str(CIRCULAR_OFFSET): "The answer is (A).", str(2 * CIRCULAR_OFFSET): "cat",
               str(3 * CIRCULAR_OFFSET): "D", "1": "red", str(CIRCULAR_OFFSET + 1): "B"}
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": k, "text": v} for k, v in answers.items()])
    m = score(tmp_path, "mmbench", annotations, predictions)
    assert m["circular_accuracy"] == pytest.approx(50.0)
    assert m["single_pass_accuracy"] == pytest.approx(100.0)
    assert m["animals/circular_accuracy"] == 0.0 and m["colours/circular_accuracy"] == 100.0


def test_scienceqa_problems_map_keeps_test_image_questions(tmp_path):
    problems = {
        "10": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1, "image": "image.png",
               "hint": "", "split": "test", "subject": "natural science"},
        "11": {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1, "image": None, "split": "test"},
        "12": {"question": "Pick one", "choices": ["x", "y"], "answer": 0, "image": "image.png", "split": "train"},
    }
    annotations = tmp_path / "problems.json"
    annotations.write_text(json.dumps(problems))
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": "10", "text": "B"}])
    m = score(tmp_path, "scienceqa_img", annotations, predictions)
    assert m["num_questions"] == 1 and m["accuracy"] == 100.0


def test_mme_pairs_questions_sharing_an_id(tmp_path):
    records = [{"question_id": "existence/1.png", "image": "existence/1.png", "question": "Is there a dog?",
                "answer": "Yes", "category": "existence"},
               {"question_id": "existence/1.png", "image": "existence/1.png", "question": "Is there a cat?",
                "answer": "No", "category": "existence"},
               {"question_id": "existence/2.png", "image": "existence/2.png", "question": "Is there a car?",
                "answer": "Yes", "category": "existence"},
               {"question_id": "existence/2.png", "image": "existence/2.png", "question": "Is there a bus?",
                "answer": "No", "category": "existence"}]
    annotations = write_jsonl(tmp_path / "mme.jsonl", records)
    items = load_items(get_task("mme"), annotations)
    assert [i.question_id for i in items] == ["existence/1.png", "existence/1.png#2", "existence/2.png",
                                              "existence/2.png#2"]
    outputs = ["Yes", "No", "Yes", "Yes"]
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": i.question_id, "text": o}
                                                     for i, o in zip(items, outputs)])
    m = score(tmp_path, "mme", annotations, predictions)
    assert m["existence/acc"] == 75.0 and m["existence/acc_plus"] == 50.0
    assert m["perception"] == 125.0 and m["total"] == 125.0


def test_chartqa_ocrbench_synth(tmp_path):
    chart = write_jsonl(tmp_path / "chartqa.jsonl", [
        {"question_id": 0, "image": "a.png", "question": "Value?", "answer": "100", "type": "human"},
        {"question_id": 1, "image": "b.png", "question": "Label?", "answer": "Asia", "type": "augmented"}])
    preds = write_jsonl(tmp_path / "pc.jsonl", [{"question_id": 0, "text": "104"}, {"question_id": 1, "text": "Europe"}])
    m = score(tmp_path, "chartqa", chart, preds)
    assert m["accuracy"] == 50.0 and m["human/accuracy"] == 100.0 and m["augmented/accuracy"] == 0.0

    ocr = write_jsonl(tmp_path / "ocrbench.jsonl", [
        {"id": 0, "image": "a.png", "question": "What is written?", "answer": ["HELLO"],
         "question_type": "Regular Text Recognition"},
        {"id": 1, "image": "b.png", "question": "Formula?", "answer": ["x ^ 2"],
         "question_type": "Handwritten Mathematical Expression Recognition"},
        {"id": 2, "image": "c.png", "question": "Total?", "answer": ["$5"], "question_type": "Doc-oriented VQA"}])
    preds = write_jsonl(tmp_path / "po.jsonl", [{"question_id": 0, "text": "hello"}, {"question_id": 1, "text": "x^2"},
                                                {"question_id": 2, "text": "$3"}])
    m = score(tmp_path, "ocrbench", ocr, preds)
    assert m["score"] == 2 and m["Text Recognition/correct"] == 1

    synth = write_jsonl(tmp_path / "synth.jsonl", [
        {"question_id": 0, "image": "0.png", "question": "what color is the circle ?", "answer": "red",
         "type": "color", "chance": 0.125},
        {"question_id": 1, "image": "0.png", "question": "how many shapes are there ?", "answer": "two",
         "type": "count", "chance": 0.2},
        {"question_id": 2, "image": "0.png", "question": "describe", "answer": "a b c d e", "type": "caption"}])
    preds = write_jsonl(tmp_path / "ps.jsonl", [{"question_id": 0, "text": "Red."}, {"question_id": 1, "text": "one"},
                                                {"question_id": 2, "text": "a b c d e"}])
    m = score(tmp_path, "synth", synth, preds)
    assert m["accuracy"] == 50.0 and m["color/chance"] == 12.5 and m["caption/bleu4"] == pytest.approx(100.0)


def test_malformed_records_are_skipped_then_fatal(tmp_path):
    good = [{"question_id": i, "image": "x.png", "question": "q?", "answer": "yes"} for i in range(30)]
    annotations = write_jsonl(tmp_path / "gqa.jsonl", good + [{"question_id": 99, "image": "x.png"}])
    assert len(load_items(get_task("gqa"), annotations)) == 30
    annotations = write_jsonl(tmp_path / "bad.jsonl", good[:3] + [{"question_id": 99}] * 3)
    with pytest.raises(ValueError, match="malformed"):
        load_items(get_task("gqa"), annotations)


def test_unknown_task_and_parquet_without_pyarrow(tmp_path):
    predictions = write_jsonl(tmp_path / "p.jsonl", [{"question_id": 0, "text": "x"}])
    with pytest.raises(ValueError, match="known tasks"):
        main(["eval", "score", "--task", "nope", "--annotations", str(predictions), "--predictions",
              str(predictions)])
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(ImportError, match="pyarrow"):
            load_items(get_task("gqa"), tmp_path / "x.parquet")


def test_report_table(tmp_path):
    annotations = write_jsonl(tmp_path / "gqa.jsonl", [{"question_id": i, "image": "x.png", "question": "q?",
                                                        "answer": "yes"} for i in range(4)])
    for model, right in (("ours", 3), ("baseline", 1)):
        task_dir = tmp_path / "results" / model / "gqa"
        task_dir.mkdir(parents=True)
        write_jsonl(task_dir / "predictions.jsonl", [{"question_id": i, "text": "yes" if i < right else "no"}
                                                     for i in range(4)])
        main(["eval", "score", "--task", "gqa", "--annotations", str(annotations), "--predictions",
              str(task_dir / "predictions.jsonl")])
        assert (task_dir / "metrics.json").exists()
    (tmp_path / "results" / "broken" / "pope").mkdir(parents=True)
    (tmp_path / "results" / "broken" / "pope" / "metrics.json").write_text("{not json")
    out = tmp_path / "report" / "table"
    summary = main(["eval", "report", str(tmp_path / "results" / "ours"), str(tmp_path / "results"),
                    "--out-prefix", str(out)])
    assert summary["gqa"]["ours"]["value"] == 75.0 and summary["gqa"]["baseline"]["value"] == 25.0
    markdown = (tmp_path / "report" / "table.md").read_text()
    assert "| gqa | accuracy | 75 | 25 |" in markdown
    assert json.loads((tmp_path / "report" / "table.json").read_text()) == summary


def test_embedded_base64_image_is_written_to_image_root(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    annotations = tmp_path / "mmbench.tsv"
    annotations.write_text("index\tquestion\tA\tB\tanswer\timage\n"
                           f"5\tWhich?\tx\ty\tA\t{base64.b64encode(buffer.getvalue()).decode()}\n")
    items = load_items(get_task("mmbench"), annotations, image_root=tmp_path / "images")
    assert len(items) == 2 and items[0].image_paths == items[1].image_paths
    assert np.array_equal(np.asarray(Image.open(items[0].image_paths[0])), pixels)
    assert load_items(get_task("mmbench"), annotations)[0].image_paths == ()
