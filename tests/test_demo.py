"""`evev2 demo --quick`: the whole pipeline end to end (world, stage-0 LLM, convert, four stages, held-out eval).

One quick run is shared by every test; it takes about two minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from evev2.cli import main as cli
from evev2.demo.evaluate import accuracy_by_object_count, blank_like, blind, choose_answers, score_choices
from evev2.eval.likelihood import continuation_logprob
from evev2.demo.language import text_perplexity
from evev2.demo.pipeline import HELDOUT_SEED, build_world, stage_overrides
from evev2.demo.plan import QUICK_PLAN
from evev2.demo.tokenizer import train_world_tokenizer
from evev2.infer.engine import GenerationRequest, GenerationResult
from evev2.synth.world import write_world
from evev2.train.recipe import load_recipe

pytestmark = pytest.mark.slow  # the quick demo: minutes

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "tiny"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("demo")
    cli(["demo", "--quick", "--output", str(output)])
    return output, json.loads((output / "results.json").read_text())


def test_quick_demo_writes_every_artefact(demo_run):
    output, results = demo_run
    for name in ("results.json", "loss_curves.png", "contact_sheet.png"):
        assert (output / name).stat().st_size > 1000, name
    final = output / "final"
    assert (final / "config.json").exists() and (final / "model.safetensors").exists()
    assert json.loads((final / "processor_config.json").read_text())["template"] == "eve"
    # one metrics.jsonl per stage, each with the planned number of steps
    for stage in results["plan"]["stages"]:
        run = output / stage["recipe"].removesuffix(".toml")
        assert len((run / "metrics.jsonl").read_text().splitlines()) == stage["steps"]
    assert results["chat_command"].startswith(f"evev2 chat --model {final} --image ")


def test_quick_demo_scores_every_question_beside_chance_and_blind(demo_run):
    _, results = demo_run
    model, blind_model = results["heldout"]["model"], results["heldout"]["blind"]
    for kind in ("color", "shape", "count", "relation", "relation_choice", "text"):
        assert model[f"{kind}/count"] == blind_model[f"{kind}/count"] > 0
        assert 0 < model[f"{kind}/chance"] < 100
    assert model["num_missing_predictions"] == 0
    # the relation choice is scored by likelihood: every question gets one of its two choices, written beside
    picks = json.loads(Path(results["heldout"]["choices"]["final"]).read_text())
    assert len(picks) == model["relation_choice/count"]
    assert 0 <= model["relation_choice/generated_accuracy"] <= 100 and 0 <= model["relation_choice/accuracy"] <= 100
    # colour is learned first (one scene token carries it): it must leave chance and beat the blind model
    assert model["color/accuracy"] >= 2 * model["color/chance"]
    assert model["color/accuracy"] > blind_model["color/accuracy"] + 10
    assert results["heldout"]["captions"]["caption/count"] > 0
    for kind in ("color", "shape"):  # every colour and shape question lands in one object-count row
        assert sum(cell["count"] for cell in results["by_object_count"][kind].values()) == model[f"{kind}/count"]
        looked = results["named_object_attention"][kind]  # questions on 2+ objects: a share per layer and head
        share = torch.tensor(looked["share"])
        assert share.shape == (4, 4) and looked["questions"] > 0 and bool(((share > 0) & (share < 1)).all())
        assert looked["best"]["share"] == share.max().item() == share[looked["best"]["layer"], looked["best"]["head"]]
        assert 0.2 <= looked["random_object"] <= 0.5
    before, after = results["text_perplexity"]["stage0_llm"], results["text_perplexity"]["final_vlm"]
    vocabulary = len(AutoTokenizer.from_pretrained(demo_run[0] / "final"))
    assert 1 < before < vocabulary / 10  # the stage-0 LLM has learned the world's language: far below uniform
    assert 1 < after and math.isfinite(after)


def test_saved_model_reloads_and_answers_through_chat(demo_run, capsys):
    output, results = demo_run
    image = results["chat_command"].split("--image ")[1].split(" ")[0]
    capsys.readouterr()
    cli(["chat", "--model", str(output / "final"), "--image", image, "--prompt", "what color is the circle ?",
         "--max-new-tokens", "4"])
    answer = capsys.readouterr().out.strip()
    assert answer and answer.split()[0].isalpha()


def test_stage_overrides_move_recipe_paths_onto_the_output(tmp_path):
    recipe = load_recipe(RECIPES / "stage2_2.toml", stage_overrides(RECIPES / "stage2_2.toml", tmp_path, 7, ()))
    assert recipe.model.source == str(tmp_path / "stage2_1" / "export")
    assert recipe.output == str(tmp_path / "stage2_2")
    world = tmp_path / "world"
    assert [s.path for s in recipe.data.sources] == [
        *(str(world / f"level{n}" / f"train{kind}.json")
          for kind in ("_words", "", "_colors", "_shapes") for n in (1, 2, 3))]
    assert [s.span for s in recipe.data.sources] == [[0.0, 0.25]] * 3 + [[0.25, 1.0]] * 9  # the reading warm-up
    assert recipe.train.steps == 7 and recipe.train.trainable == ["patch_embed", "vision", "text", "embeddings"]


def test_world_folders_written_in_threads_equal_one_at_a_time(tmp_path):
    plan = dataclasses.replace(QUICK_PLAN, train_images={1: 24, 2: 12, 3: 30}, heldout_images=8)
    build_world(plan, tmp_path / "threads")
    for level, n in plan.train_images.items():
        write_world(tmp_path / "serial" / f"level{level}", n=n, seed=level, split="train", level=level)
    write_world(tmp_path / "serial" / "heldout", n=plan.heldout_images, seed=HELDOUT_SEED, split="heldout")
    files = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*") if p.is_file())
    assert len(files) > 4 * 8 and any(f.suffix == ".png" for f in files)
    assert sorted(p.relative_to(tmp_path / "threads") for p in (tmp_path / "threads").rglob("*") if p.is_file()) == files
    for f in files:
        assert (tmp_path / "threads" / f).read_bytes() == (tmp_path / "serial" / f).read_bytes(), f


def test_world_tokenizer_round_trips_and_keeps_words_whole():
    lines = ["what color is the red circle ? red", "there are two shapes . a blue star at top left ."] * 50
    tokenizer = train_world_tokenizer(lines, vocab_size=400)
    text = "what color is the blue star ? red"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) == len(text.split())  # every word of the corpus is one token
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_text_perplexity_matches_a_float64_reference():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    lines = ["a red circle at top .", "what shape is the green object ? star", "how many shapes are there ? two"]
    tokenizer = train_world_tokenizer(lines * 20, vocab_size=400)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).double()
    nll, count = 0.0, 0
    for line in lines:  # one unpadded sequence at a time, each ending in EOS
        ids = torch.tensor([tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        nll -= logprobs.gather(1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    expected = math.exp(nll / count)
    assert text_perplexity(model, tokenizer, lines, batch_size=2) == pytest.approx(expected, rel=1e-9)


def test_blind_baseline_sees_a_flat_image_of_the_same_size_and_mean(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    pixels = (torch.rand(96, 160, 3) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    flat = blank_like(image)
    assert flat.size == image.size and len(set(flat.getdata())) == 1
    assert flat.getpixel((0, 0)) == tuple(round(float(c)) for c in pixels.reshape(-1, 3).mean(0))
    seen: list[GenerationRequest] = []

    def record(requests: list[GenerationRequest]) -> list[GenerationResult]:
        seen.extend(requests)
        return [GenerationResult("red", 3, 1, "stop") for _ in requests]

    path = tmp_path / "scene.png"
    image.save(path)
    request = GenerationRequest([{"role": "user", "content": "<image>\nwhat color ?"}], [str(path)], 4)
    assert [r.text for r in blind(record)([request])] == ["red"]
    assert seen[0].messages == request.messages and seen[0].images[0].tobytes() == flat.tobytes()


def test_choices_are_picked_by_the_highest_log_likelihood(tiny_chat_engine, tmp_path):
    """Reference: `continuation_logprob` of each choice alone (itself checked against the model's loss), on random
    images of several sizes, scored in batches that mix them."""
    from PIL import Image

    engine, rng = tiny_chat_engine, np.random.default_rng(0)
    question = "which is higher , the red circle or the blue star ?"
    choices = ["the red circle", "the blue star", "the green cross"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    expected, expected_blind = {}, {}
    for seed in range(5):
        image = Image.fromarray(rng.integers(0, 256, (32 + 16 * seed, 64, 3), dtype=np.uint8))
        image.save(tmp_path / f"{seed}.png")
        for picks, shown in ((expected, image), (expected_blind, blank_like(image))):
            scores = [continuation_logprob(engine.model, engine.processor, messages, [shown], f" {c}")[0]
                      for c in choices]
            assert len(set(scores)) == len(choices)
            picks[f"q{seed}"] = choices[int(np.argmax(scores))]
    assert len(set(expected.values())) > 1  # the images decide
    records = [{"question_id": f"q{seed}", "image": f"{seed}.png", "question": question, "choices": choices}
               for seed in range(5)] + [{"question_id": "open", "image": "0.png", "question": "what color ?"}]
    # batches of 4 rows: several, some split inside a question's choices
    assert choose_answers(engine, records, tmp_path, blind_images=False, batch_rows=4) == expected
    assert choose_answers(engine, records, tmp_path, blind_images=True, batch_rows=4) == expected_blind
    assert choose_answers(engine, records, tmp_path, blind_images=False) == expected  # one batch


def test_score_choices_replaces_the_generated_accuracy_and_recomputes_the_overall():
    records = [{"question_id": f"r{i}", "type": "relation_choice", "answer": "the red circle"} for i in range(4)]
    records.append({"question_id": "c0", "type": "color", "answer": "the circle is red"})
    generated = {"relation_choice/accuracy": 0.0, "relation_choice/count": 4, "relation_choice/chance": 50.0,
                 "color/accuracy": 100.0, "color/count": 1, "color/chance": 12.5, "accuracy": 20.0,
                 "num_questions": 5}
    picks = {"r0": "the red circle", "r1": "the blue star", "r2": "The red circle.", "r3": "the red circle"}
    scored = score_choices(generated, records, picks)
    assert scored["relation_choice/accuracy"] == 75.0 and scored["relation_choice/generated_accuracy"] == 0.0
    assert scored["color/accuracy"] == 100.0 and "color/generated_accuracy" not in scored
    assert scored["accuracy"] == pytest.approx(100 * 4 / 5) and scored["num_questions"] == 5
    assert generated["relation_choice/accuracy"] == 0.0  # the input is left as it was


def test_accuracy_by_object_count_sets_each_count_beside_picking_a_random_object():
    def record(i: int, kind: str, objects: int, answer: str) -> dict:
        return {"question_id": f"q{i}", "type": kind, "objects": objects, "answer": answer}

    records = [record(0, "color", 1, "red"), record(1, "color", 2, "red"), record(2, "color", 2, "blue"),
               record(3, "shape", 3, "star"), record(4, "count", 3, "three"), record(5, "color", 2, "green")]
    predictions = {"q0": "red", "q1": "Red.", "q2": "red", "q3": "circle", "q4": "three"}  # q5 has no answer
    table = accuracy_by_object_count(records, predictions)
    assert table == {
        "color": {"1": {"accuracy": 1.0, "count": 1, "random_object": 1.0},
                  "2": {"accuracy": 0.5, "count": 2, "random_object": 0.5}},
        "shape": {"3": {"accuracy": 0.0, "count": 1, "random_object": 1 / 3}},
    }
