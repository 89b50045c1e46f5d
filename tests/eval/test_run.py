"""`evev2 eval run` end to end with a tiny random EVEv2 model: every input format, resume, skips, shards, run == score.

A random model answers nonsense, which would make every score 0 and "run == score" trivially true. So the gold
answers are built from what the model itself says (asked one question at a time): some golds are its answer, the
others are not, and the expected score is known exactly.
"""

from __future__ import annotations

import base64
import csv
import json

import numpy as np
import pytest
from PIL import Image

from evev2.cli import main
from evev2.errors import UserError
from evev2.eval.run import Shard, answer_items, item_request, run_benchmark
from evev2.eval.synth_metrics import normalize_synth_answer
from evev2.eval.tasks import get_task, load_items

MAX_NEW_TOKENS = 3


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Noise images of different sizes (so batched rows differ in image-token count)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("images")
    for i, (h, w) in enumerate([(64, 48), (40, 64), (64, 64), (32, 80), (48, 48), (64, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path / f"img{i}.png")
    return path


def alone(engine, item) -> str:
    """What the model answers to this question asked on its own."""
    return engine.generate([item_request(item, MAX_NEW_TOKENS)])[0].text


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tmp_path, model_dir, task, data, *extra):
    out = tmp_path / "results"
    document = main(["eval", "run", "--model", str(model_dir), "--task", task, "--data", str(data), "--output",
                     str(out), "--max-new-tokens", str(MAX_NEW_TOKENS), "--dtype", "float64", *extra])
    run_dir = out / model_dir.name / task
    assert json.loads((run_dir / "metrics.json").read_text()) == document
    return document, run_dir


def score(tmp_path, task, data, predictions, *extra):
    out = tmp_path / "rescored.json"
    return main(["eval", "score", "--task", task, "--annotations", str(data), "--predictions", str(predictions),
                 "--output", str(out), *extra])


def test_gqa_llava_questions_plus_annotations(tmp_path, tiny_eve_chat_dir, tiny_chat_engine, image_dir, capsys):
    questions = tmp_path / "llava_gqa_testdev.jsonl"
    questions.write_text("".join(json.dumps({"question_id": f"q{i}", "image": f"img{i}.png",
                                             "text": f"What is in picture {i}?"}) + "\n" for i in range(5)))
    # The gold file is built in two steps: placeholder answers to get the items, then the model's own answers.
    annotations = tmp_path / "testdev_balanced_questions.json"
    annotations.write_text(json.dumps({f"q{i}": {"answer": "x"} for i in range(5)}))
    items = load_items(get_task("gqa"), annotations, questions, image_dir)
    said = {item.question_id: alone(tiny_chat_engine, item) for item in items}
    right = {"q0", "q2", "q3"}
    gold = {qid: {"answer": text.strip().rstrip(".").lower() if qid in right else "definitely wrong"}
            for qid, text in said.items()}
    annotations.write_text(json.dumps(gold))

    document, run_dir = run(tmp_path, tiny_eve_chat_dir, "gqa", annotations, "--questions", str(questions),
                            "--image-root", str(image_dir), "--batch-size", "2")
    lines = read_lines(run_dir / "predictions.jsonl")
    assert sorted(line["question_id"] for line in lines) == sorted(said)
    assert {line["question_id"]: line["text"] for line in lines} == said  # batched == one at a time
    assert document["metrics"]["accuracy"] == pytest.approx(60.0)
    assert document["metrics"]["num_missing_predictions"] == 0
    printed = capsys.readouterr().out
    assert "gqa (tiny_eve" in printed and "accuracy = 60.00" in printed

    rescored = score(tmp_path, "gqa", annotations, run_dir / "predictions.jsonl", "--questions", str(questions))
    assert rescored["metrics"] == document["metrics"]
    assert rescored["model"] == document["model"] == tiny_eve_chat_dir.name


def synth_records(image_dir):
    kinds = [("color", 12.5), ("color", 12.5), ("count", 20.0), ("count", 20.0), ("caption", None)]
    return [{"question_id": f"s{i}", "image": str(image_dir / f"img{i}.png"), "type": kind,
             "question": f"Question {i} about the scene?", "answer": "x", "chance": None if chance is None
             else chance / 100} for i, (kind, chance) in enumerate(kinds)]


def test_synth_json_prints_per_type_accuracy_beside_chance(tmp_path, tiny_eve_chat_dir, tiny_chat_engine, image_dir,
                                                           capsys):
    records = synth_records(image_dir)
    data = tmp_path / "heldout.json"
    data.write_text(json.dumps(records))
    said = {item.question_id: alone(tiny_chat_engine, item) for item in load_items(get_task("synth"), data)}
    for record in records:  # color: 1 of 2 right; count: 2 of 2 right
        record["answer"] = "wrong answer" if record["question_id"] == "s1" else normalize_synth_answer(
            said[record["question_id"]])
    data.write_text(json.dumps(records))

    document, run_dir = run(tmp_path, tiny_eve_chat_dir, "synth", data, "--batch-size", "3")
    metrics = document["metrics"]
    assert metrics["color/accuracy"] == 50.0 and metrics["count/accuracy"] == 100.0
    assert metrics["accuracy"] == 75.0 and metrics["caption/count"] == 1
    printed = capsys.readouterr().out
    assert "accuracy  chance  count" in printed
    assert any(line.split() == ["color", "50.00", "12.50", "2"] for line in printed.splitlines())
    assert score(tmp_path, "synth", data, run_dir / "predictions.jsonl")["metrics"] == metrics


def test_mmbench_tsv_with_embedded_images(tmp_path, tiny_eve_chat_dir, image_dir):
    """Base64 images inside the TSV are written to --image-root; all four rotations are asked."""
    row = {"index": 0, "question": "Which animal?", "hint": "", "A": "dog", "B": "cat", "C": "bird", "D": "fish",
           "answer": "B", "category": "animals",
           "image": base64.b64encode((image_dir / "img0.png").read_bytes()).decode()}
    data = tmp_path / "mmbench_dev.tsv"
    with open(data, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row), delimiter="\t")
        writer.writeheader()
        writer.writerow(row)
    document, run_dir = run(tmp_path, tiny_eve_chat_dir, "mmbench", data, "--image-root", str(tmp_path / "extracted"))
    assert len(read_lines(run_dir / "predictions.jsonl")) == 4 == document["metrics"]["num_questions"]
    assert len(list((tmp_path / "extracted").iterdir())) == 1
    assert score(tmp_path, "mmbench", data, run_dir / "predictions.jsonl")["metrics"] == document["metrics"]


class Interrupted(RuntimeError):
    pass


def test_resume_after_interruption(tmp_path, tiny_eve_chat_dir, tiny_chat_engine, image_dir):
    data = tmp_path / "synth.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synth_records(image_dir)))
    asked: list[str] = []

    def recorded(requests):
        asked.extend(r.messages[0]["content"][-1]["text"] for r in requests)
        return tiny_chat_engine.generate(requests)

    def dies_on_third_batch(requests):
        if len(asked) >= 4:
            raise Interrupted("killed")
        return recorded(requests)

    with pytest.raises(Interrupted):
        run_benchmark(dies_on_third_batch, tiny_eve_chat_dir.name, "synth", data, batch_size=2,
                      output=tmp_path / "results", max_new_tokens=MAX_NEW_TOKENS)
    predictions = tmp_path / "results" / tiny_eve_chat_dir.name / "synth" / "predictions.jsonl"
    assert [line["question_id"] for line in read_lines(predictions)] == ["s0", "s1", "s2", "s3"]

    asked.clear()
    document = run_benchmark(recorded, tiny_eve_chat_dir.name, "synth", data, batch_size=2,
                             output=tmp_path / "results", max_new_tokens=MAX_NEW_TOKENS)
    assert asked == ["Question 4 about the scene?"]  # only what the killed run had not finished
    ids = [line["question_id"] for line in read_lines(predictions)]
    assert ids == ["s0", "s1", "s2", "s3", "s4"]  # no duplicates, all done
    assert document["metrics"]["num_missing_predictions"] == 0


def test_corrupt_image_is_skipped_counted_and_guarded(tmp_path, tiny_chat_engine, image_dir):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    records = synth_records(image_dir)[:4]
    records[1]["image"] = str(tmp_path / "broken.png")
    data = tmp_path / "synth.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    items = load_items(get_task("synth"), data)
    predictions = tmp_path / "p.jsonl"
    skipped = answer_items(tiny_chat_engine.generate, items, predictions, batch_size=4,
                           max_new_tokens=MAX_NEW_TOKENS, show_progress=False, max_bad_fraction=0.5)
    assert skipped == 1
    assert [line["question_id"] for line in read_lines(predictions)] == ["s0", "s2", "s3"]
    with pytest.raises(ValueError, match="could not be asked"):
        answer_items(tiny_chat_engine.generate, items, tmp_path / "q.jsonl", batch_size=4,
                     max_new_tokens=MAX_NEW_TOKENS, show_progress=False)


def test_ranks_answer_strided_shards_and_rank0_merges(tmp_path, tiny_eve_chat_dir, tiny_chat_engine, image_dir):
    data = tmp_path / "synth.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synth_records(image_dir)))
    common = dict(output=tmp_path / "results", max_new_tokens=MAX_NEW_TOKENS, batch_size=2)
    # Run in-process one rank after the other; the barrier is what makes rank 0 wait under torchrun.
    assert run_benchmark(tiny_chat_engine.generate, "m", "synth", data, shard=Shard(1, 2), **common) is None
    document = run_benchmark(tiny_chat_engine.generate, "m", "synth", data, shard=Shard(0, 2), **common)
    run_dir = tmp_path / "results" / "m" / "synth"
    rank0 = [line["question_id"] for line in read_lines(run_dir / "predictions.rank0.jsonl")]
    rank1 = [line["question_id"] for line in read_lines(run_dir / "predictions.rank1.jsonl")]
    assert rank0 == ["s0", "s2", "s4"] and rank1 == ["s1", "s3"]
    merged = {line["question_id"]: line["text"] for line in read_lines(run_dir / "predictions.jsonl")}
    items = load_items(get_task("synth"), data)
    assert merged == {item.question_id: alone(tiny_chat_engine, item) for item in items}
    assert document["metrics"]["num_missing_predictions"] == 0
    assert document["predictions"] == str(run_dir / "predictions.jsonl")


def test_a_results_folder_of_another_run_is_refused_not_resumed(tmp_path, tiny_eve_chat_dir, image_dir):
    data = tmp_path / "synth.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synth_records(image_dir)))
    first, run_dir = run(tmp_path, tiny_eve_chat_dir, "synth", data)
    recorded = json.loads((run_dir / "run.json").read_text())
    assert recorded["model"] == str(tiny_eve_chat_dir.resolve()) and recorded["max_new_tokens"] == MAX_NEW_TOKENS
    assert run(tmp_path, tiny_eve_chat_dir, "synth", data)[0]["metrics"] == first["metrics"]  # the same run resumes
    predictions = (run_dir / "predictions.jsonl").read_text()
    with pytest.raises(UserError, match="max_new_tokens differ"):
        main(["eval", "run", "--model", str(tiny_eve_chat_dir), "--task", "synth", "--data", str(data), "--output",
              str(tmp_path / "results"), "--max-new-tokens", str(MAX_NEW_TOKENS + 1), "--dtype", "float64"])
    data.write_text(data.read_text() + "\n")  # another version of the question file (same ids)
    with pytest.raises(UserError, match="data differ"):
        run(tmp_path, tiny_eve_chat_dir, "synth", data)
    (run_dir / "run.json").unlink()  # answers nobody can vouch for
    with pytest.raises(UserError, match="no run.json"):
        run(tmp_path, tiny_eve_chat_dir, "synth", data)
    assert (run_dir / "predictions.jsonl").read_text() == predictions  # refusing loses nothing
