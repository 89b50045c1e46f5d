"""The run record: a resolved recipe that loads back equal, one run.json entry per launch, atomic writes, and
`check_resume` refusing a training-relevant change (and only that) unless forced."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from evev2 import jsonio
from evev2.train.recipe import RecipeError, load_recipe
from evev2.train.record import NOT_TRAINING_RELEVANT, RecipeChangedError, check_resume, write_run_record

RECIPE = Path("recipes/tiny/stage2_2.toml")  # two sources and per-group learning rates: the richest tiny recipe


def launch(output: Path, overrides: list[str] = (), **kwargs) -> dict:
    return write_run_record(output, load_recipe(RECIPE, list(overrides)), world_size=2, device="cuda:0",
                            argv=["evev2", "train", "--recipe", str(RECIPE), *overrides], **kwargs)


@pytest.mark.parametrize("path", sorted(Path("recipes").rglob("*.toml")), ids=str)
def test_resolved_recipe_loads_back_equal(tmp_path, path):
    overrides = ["train.steps=7", "optim.group_lr.patch_embed=1e-3", "data.num_workers=0", "train.compile=true",
                 "optim.eps=1e-9"]
    recipe = load_recipe(path, overrides)
    write_run_record(tmp_path, recipe, world_size=1, device="cpu")
    text = (tmp_path / "recipe.resolved.toml").read_text()
    assert load_recipe(tmp_path / "recipe.resolved.toml") == recipe
    # Every default is written out, not just what the file named.
    assert "keep_last = 2" in text and "resize_policy = " in text and "grad_clip = " in text


def test_run_json_records_what_ran_and_grows_by_one_entry_per_launch(tmp_path):
    first = launch(tmp_path)
    assert first["world_size"] == 2 and first["device"] == "cuda:0"
    assert first["command"] == ["evev2", "train", "--recipe", str(RECIPE)]
    assert set(first["versions"]) == {"evev2", "torch", "transformers"} and all(first["versions"].values())
    assert first["python"] and first["platform"] and first["time"] and first["cwd"] == os.getcwd()
    launch(tmp_path, ["train.steps=9"])  # e.g. a --resume --force with a changed recipe: both stay on record
    launches = json.loads((tmp_path / "run.json").read_text())["launches"]
    assert len(launches) == 2 and launches[0] == first
    assert [entry["recipe"]["train"]["steps"] for entry in launches] == [200, 9]
    assert load_recipe(tmp_path / "recipe.resolved.toml").train.steps == 9  # the latest launch's recipe


class HalfWriter:
    """A file that writes half of what it is given and then fails, as a full disk or a kill mid-write would."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise OSError("No space left on device")


@pytest.mark.parametrize("failing", ["recipe.resolved.toml", "run.json"])
def test_an_interrupted_write_leaves_the_previous_files_intact(tmp_path, monkeypatch, failing):
    launch(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("recipe.resolved.toml", "run.json")}

    def half_open(path, *args, **kwargs):
        f = open(path, *args, **kwargs)
        return HalfWriter(f) if failing in Path(path).name else f

    monkeypatch.setattr(jsonio, "open", half_open, raising=False)
    with pytest.raises(OSError, match="No space"):
        launch(tmp_path, ["train.steps=9"])
    assert (tmp_path / "run.json").read_bytes() == before["run.json"]  # written last: untouched either way
    if failing == "recipe.resolved.toml":
        assert (tmp_path / "recipe.resolved.toml").read_bytes() == before["recipe.resolved.toml"]
    else:  # the new recipe is complete; the launch history is the old one, whole
        assert load_recipe(tmp_path / "recipe.resolved.toml").train.steps == 9
        assert len(json.loads((tmp_path / "run.json").read_text())["launches"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.resolved.toml", "run.json"]  # no temp files left


def test_unchanged_or_bookkeeping_only_changes_resume(tmp_path, caplog):
    launch(tmp_path)
    with caplog.at_level(logging.WARNING):
        check_resume(tmp_path, load_recipe(RECIPE), force=False)
        check_resume(tmp_path, load_recipe(RECIPE, [
            "data.num_workers=0", "checkpoint.every=5", "checkpoint.keep_last=9", "train.log_every=10",
            "train.compile=false", "train.activation_checkpointing=true", "model.attn_implementation=sdpa",
            "name=renamed", "output=elsewhere"]), force=False)
    assert not caplog.records


def test_a_folder_without_a_record_resumes(tmp_path):
    check_resume(tmp_path / "new", load_recipe(RECIPE), force=False)


@pytest.mark.parametrize("overrides,fields", [
    (["optim.lr=1e-4"], ["optim.lr: 0.002 -> 0.0001"]),
    (["train.steps=400"], ["train.steps: 200 -> 400"]),
    (['data.sources=[{name = "level1-qa", type = "llava", path = "other/train.json"}]'],
     ["data.sources[0].path: 'runs/demo/world/level1/train_words.json' -> 'other/train.json'",
      "data.sources[0].span: [0.0, 0.25] -> [0.0, 1.0]", "data.sources[1].name: 'level2-words' -> (unset)"]),
    (["optim.group_lr.text=1e-3", "data.seed=1", "checkpoint.every=5"],
     ["optim.group_lr.text: 0.0005 -> 0.001", "data.seed: 0 -> 1"]),
])
def test_a_training_relevant_change_is_refused_with_the_fields_named(tmp_path, overrides, fields):
    launch(tmp_path)
    with pytest.raises(RecipeChangedError) as info:
        check_resume(tmp_path, load_recipe(RECIPE, overrides), force=False)
    message = str(info.value)
    assert all(field in message for field in fields), message
    assert "--force" in message and "checkpoint" not in message and "\n" not in message
    assert isinstance(info.value, RecipeError)  # a user error: `evev2` prints it as one line


def test_force_resumes_and_logs_the_changes(tmp_path, caplog):
    launch(tmp_path)
    with caplog.at_level(logging.WARNING, logger="evev2.train.record"):
        check_resume(tmp_path, load_recipe(RECIPE, ["optim.lr=1e-4", "train.steps=400"]), force=True)
    (warning,) = caplog.records
    assert warning.levelno == logging.WARNING
    assert "optim.lr: 0.002 -> 0.0001" in warning.getMessage() and "train.steps: 200 -> 400" in warning.getMessage()


def test_a_record_that_no_longer_loads_is_refused_unless_forced(tmp_path, caplog):
    launch(tmp_path)
    path = tmp_path / "recipe.resolved.toml"
    path.write_text(path.read_text().replace("[train]\n", "[train]\nretired_field = 1\n"))
    with pytest.raises(RecipeChangedError, match="train.retired_field: unknown field"):
        check_resume(tmp_path, load_recipe(RECIPE), force=False)
    with caplog.at_level(logging.WARNING, logger="evev2.train.record"):
        check_resume(tmp_path, load_recipe(RECIPE), force=True)
    assert "no longer loads" in caplog.text


def test_the_bookkeeping_list_names_real_fields():
    recipe = load_recipe(RECIPE)
    for pattern, reason in NOT_TRAINING_RELEVANT.items():
        section, _, name = pattern.partition(".")
        assert hasattr(recipe, section) and (name in ("", "*") or hasattr(getattr(recipe, section), name)), pattern
        assert reason
