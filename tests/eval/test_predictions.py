import json

import pytest

from evev2.eval.predictions import PredictionWriter, read_predictions


def test_rerun_skips_finished_ids(tmp_path):
    path = tmp_path / "run" / "predictions.jsonl"
    with PredictionWriter(path) as writer:
        writer.write(1, "cat")
        writer.write("q2", "dog", model="tiny")
    with PredictionWriter(path) as writer:
        assert writer.done(1) and writer.done("1") and writer.done("q2") and not writer.done(3)
        writer.write(3, "bird")
    assert read_predictions(path) == {"1": "cat", "q2": "dog", "3": "bird"}


def test_torn_last_line_is_cut_and_run_resumes(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"question_id": 1, "text": "a"}\n{"question_id": 2, "text": "b"}\n{"question_id": 3, "te')
    with PredictionWriter(path) as writer:
        assert writer.done(1) and writer.done(2) and not writer.done(3)
        writer.write(3, "c")
    lines = path.read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["a", "b", "c"]


def test_complete_last_line_without_newline_is_kept(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"question_id": 7, "text": "yes"}')
    with PredictionWriter(path) as writer:
        assert writer.done(7)
        writer.write(8, "no")
    assert read_predictions(path) == {"7": "yes", "8": "no"}


def test_only_line_torn(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"question_id": 1, "tex')
    with PredictionWriter(path) as writer:
        assert not writer.done(1)
        writer.write(1, "a")
    assert read_predictions(path) == {"1": "a"}


def test_reader_skips_rare_bad_lines_and_fails_on_many(tmp_path):
    good = [json.dumps({"question_id": i, "text": f"t{i}"}) for i in range(40)]
    path = tmp_path / "few_bad.jsonl"
    path.write_text("\n".join(good[:20] + ["{broken", '{"question_id": 99}'] + good[20:]) + "\n")
    predictions = read_predictions(path)
    assert len(predictions) == 40 and predictions["5"] == "t5"
    path = tmp_path / "many_bad.jsonl"
    path.write_text("\n".join(good[:5] + ["{broken"] * 5) + "\n")
    with pytest.raises(ValueError, match="malformed"):
        read_predictions(path)
