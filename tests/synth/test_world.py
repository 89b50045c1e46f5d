import io
import json
import math
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from evev2.cli import main
from evev2.synth.world import generate_world, write_world
from evev2.synth.language import NAMING, OPPOSITE, QA_TYPES, RELATIONS, true_relations
from evev2.synth.layout import CELL_PX, COLORS, FONT_SIZES, INSET_PX, NUMBER_WORDS, SHAPES, WORDS, text_extent


@pytest.fixture(scope="module")
def train_scenes():
    return generate_world(3000, seed=0, level=3, split="train", render=False)


@pytest.fixture(scope="module")
def heldout_scenes():
    return generate_world(2000, split="heldout", render=False)


@pytest.fixture(scope="module")
def rendered():
    return generate_world(200, seed=5, level=3)


def _questions(scenes, qa_type):
    return [item for scene in scenes for item in scene.qa if item.type == qa_type]


# ---- the world has what the demo needs ------------------------------------------------------------------------------

def test_world_covers_the_vocabulary(train_scenes):
    assert len(COLORS) >= 8 and len(SHAPES) >= 5 and len(WORDS) >= 20
    assert all(3 <= len(word) <= 5 for word in WORDS)
    objects = [o for scene in train_scenes for o in scene.objects]
    assert {o.color for o in objects} == set(COLORS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert Counter(len(s.objects) for s in train_scenes).keys() == {1, 2, 3, 4, 5}
    assert {s.word for s in train_scenes if s.word} == set(WORDS)
    assert {q.type for s in train_scenes for q in s.qa} == set(QA_TYPES)
    relation_words = {r for q in _questions(train_scenes, "relation") for r in RELATIONS if f" {r} the" in q.question}
    assert relation_words == set(RELATIONS)
    sizes = {(s.layout.width, s.layout.height) for s in train_scenes}
    assert min(min(size) for size in sizes) == 96 and max(max(size) for size in sizes) == 320
    assert len({round(w / h, 2) for w, h in sizes}) >= 10  # many aspect ratios
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in sizes)


def test_every_item_fills_whole_token_cells_apart_from_the_others(train_scenes):
    for scene in train_scenes[:1000]:
        items = [o.box for o in scene.objects] + ([scene.layout.text.box] if scene.layout.text else [])
        for x0, y0, x1, y1 in items:
            assert 0 <= x0 < x1 <= scene.layout.width and 0 <= y0 < y1 <= scene.layout.height
        for o in scene.objects:  # one or two cells wide, INSET_PX inside them
            x0, y0, x1, y1 = o.box
            assert (x0 - INSET_PX) % CELL_PX == 0 and (y0 - INSET_PX) % CELL_PX == 0
            assert x1 - x0 == y1 - y0 and (x1 - x0 + 2 * INSET_PX) in (CELL_PX, 2 * CELL_PX)
        if scene.layout.text:  # a word starts INSET_PX into a cell and stays inside one row of cells
            x0, y0, x1, y1 = scene.layout.text.box
            assert (x0 - INSET_PX) % CELL_PX == 0 and y0 // CELL_PX == (y1 - 1) // CELL_PX
        cells = [{(x, y) for x in range(b[0] // CELL_PX, (b[2] - 1) // CELL_PX + 1)
                  for y in range(b[1] // CELL_PX, (b[3] - 1) // CELL_PX + 1)} for b in items]
        assert sum(map(len, cells)) == len(set().union(*cells))  # no two items share a cell
        assert len({o.color for o in scene.objects}) == len({o.shape for o in scene.objects}) == len(scene.objects)


def test_every_word_fits_the_narrowest_canvas():
    assert all(text_extent(word, max(FONT_SIZES))[0] + 2 * INSET_PX <= 96 for word in WORDS)


def test_answers_agree_with_the_scene(train_scenes):
    for scene in train_scenes[:1000]:
        by_shape = {o.shape: o for o in scene.objects}
        by_color = {o.color: o for o in scene.objects}
        for item in scene.qa:
            words = item.question.split()
            assert len(item.answer.split()) == {"color": 4, "shape": 3, "relation_choice": 3}.get(item.type, 1)
            if item.type == "color":
                named = by_shape[words[-2]]
                assert item.answer == f"the {named.shape} is {named.color}"
            elif item.type == "shape":
                named = by_color[words[-3]]
                assert item.answer == f"{'an' if named.color == 'orange' else 'a'} {named.color} {named.shape}"
            elif item.type == "count":
                assert item.answer == NUMBER_WORDS[len(scene.objects)]
            elif item.type == "text":
                assert item.answer == scene.word
            elif item.type == "relation":
                a, b = by_shape[words[3]], by_shape[words[-2]]
                assert (words[2], words[-3]) == (a.color, b.color)
                relation = next(r for r in RELATIONS if f" {r} the" in item.question)
                holds = relation in true_relations(a, b)
                assert item.answer == ("yes" if holds else "no")
                if not holds:  # a "no" is clearly false: the opposite relation holds
                    assert OPPOSITE[relation] in true_relations(a, b)
            elif item.type == "relation_choice":
                first, second = (by_shape[name.split()[-1]] for name in item.choices)
                assert item.question == (f"which is {words[2]}{' left' if words[3] == 'left' else ''} , "
                                         f"{item.choices[0]} or {item.choices[1]} ?")
                assert item.choices == (f"the {first.color} {first.shape}", f"the {second.color} {second.shape}")
                winner, loser = (first, second) if item.answer == item.choices[0] else (second, first)
                assert item.answer in item.choices and item.choices[0] != item.choices[1]
                if words[2] == "higher":  # wholly above
                    assert winner.box[3] <= loser.box[1]
                else:  # side by side (the same top edge), wholly to the left
                    assert words[2:4] == ["further", "left"]
                    assert winner.box[1] == loser.box[1] and winner.box[2] <= loser.box[0]


def test_relation_choice_asks_both_words_in_either_order(train_scenes):
    """Both relations are asked, the answer is named first or second equally often for each, and a scene of 2+
    objects lacks the question only when no pair is one above the other or side by side."""
    choices = _questions(train_scenes, "relation_choice")
    first = defaultdict(Counter)
    for q in choices:
        first[q.question.split(" , ")[0]][q.answer == q.choices[0]] += 1
    assert set(first) == {"which is higher", "which is further left"}
    for counts in first.values():
        assert 0.4 < counts[True] / (counts[True] + counts[False]) < 0.6
    several = [s for s in train_scenes if len(s.objects) >= 2]
    assert 0.9 * len(several) < len(choices) < len(several)


def test_caption_lists_every_object_and_the_word(train_scenes):
    for scene in train_scenes[:300]:
        for o in scene.objects:
            assert f" {o.color} {o.shape} at " in scene.caption
        assert (f"the word {scene.word} is written" in scene.caption) == (scene.word is not None)
        assert scene.caption.startswith("there is one shape" if len(scene.objects) == 1 else "there are ")


def test_rendered_pixels_match_the_metadata(rendered):
    for scene in rendered:
        pixels = np.asarray(scene.image)
        assert pixels.shape == (scene.layout.height, scene.layout.width, 3)
        for o in scene.objects:  # every shape is filled at its box centre
            cx, cy = (o.box[0] + o.box[2]) // 2, (o.box[1] + o.box[3]) // 2
            assert tuple(pixels[cy, cx]) == o.rgb
        if scene.layout.text:
            x0, y0, x1, y1 = scene.layout.text.box
            inked = np.all(pixels[y0:y1, x0:x1] == scene.layout.text.rgb, axis=-1).sum()
            assert inked > 30  # the glyphs are drawn where the box says
        assert tuple(pixels[0, 0]) == scene.layout.background  # the border stays background


# ---- no text-only shortcut ------------------------------------------------------------------------------------------

def test_relation_answers_are_balanced_exactly(train_scenes, heldout_scenes):
    for scenes in (train_scenes, heldout_scenes):
        answers = Counter(q.answer for q in _questions(scenes, "relation"))
        assert abs(answers["yes"] - answers["no"]) <= 1
        per_word = defaultdict(Counter)  # the relation word must not predict the answer
        for q in _questions(scenes, "relation"):
            per_word[next(r for r in RELATIONS if f" {r} the" in q.question)][q.answer] += 1
        for counts in per_word.values():
            assert 0.4 < counts["yes"] / (counts["yes"] + counts["no"]) < 0.6


class BagOfWordsProbe:
    """A blind question -> answer classifier (multinomial naive Bayes over question words)."""

    def fit(self, items):
        self.answer_counts = Counter(q.answer for q in items)
        self.word_counts = defaultdict(Counter)
        for q in items:
            self.word_counts[q.answer].update(q.question.split())
        self.vocab = {w for counts in self.word_counts.values() for w in counts}
        return self

    def predict(self, question):
        def score(answer):
            counts = self.word_counts[answer]
            total = sum(counts.values()) + len(self.vocab)
            return math.log(self.answer_counts[answer]) + sum(
                math.log((counts[w] + 1) / total) for w in question.split())
        return max(self.answer_counts, key=score)

    def accuracy(self, items):
        return float(np.mean([self.predict(q.question) == q.answer for q in items]))


def test_blind_model_scores_chance_on_held_out(train_scenes, heldout_scenes):
    relation_probe = BagOfWordsProbe().fit(_questions(train_scenes, "relation"))
    assert abs(relation_probe.accuracy(_questions(heldout_scenes, "relation")) - 0.5) < 0.05
    # a relation choice's answer is one of the two objects it names: named first or second, not told by the words
    def named_first(scenes):
        return [type(q)("relation_choice", q.question, "first" if q.answer == q.choices[0] else "second")
                for q in _questions(scenes, "relation_choice")]
    order_probe = BagOfWordsProbe().fit(named_first(train_scenes))
    assert abs(order_probe.accuracy(named_first(heldout_scenes)) - 0.5) < 0.05
    chance = {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "count": 1 / 5, "text": 1 / len(WORDS)}
    for qa_type, level in chance.items():
        train_majority = Counter(q.answer for q in _questions(train_scenes, qa_type)).most_common(1)[0][0]
        held = _questions(heldout_scenes, qa_type)
        majority_accuracy = np.mean([q.answer == train_majority for q in held])
        assert majority_accuracy < level + 0.04, qa_type
        probe_accuracy = BagOfWordsProbe().fit(_questions(train_scenes, qa_type)).accuracy(held)
        assert probe_accuracy < level + 0.05, qa_type


def test_the_probe_would_catch_a_wording_shortcut(train_scenes, heldout_scenes):
    """The feasibility study's bug: "left of"/"above" always meant yes. The same probe must find it."""
    def leaky(scenes):
        out = []
        for q in _questions(scenes, "relation"):
            positive = " left of " in q.question or " above " in q.question
            out.append(type(q)("relation", q.question, "yes" if positive else "no"))
        return out
    assert BagOfWordsProbe().fit(leaky(train_scenes)).accuracy(leaky(heldout_scenes)) > 0.95


# ---- splits, levels, determinism, files -----------------------------------------------------------------------------

def test_levels_form_a_curriculum():
    level1 = generate_world(300, level=1, render=False)
    assert {len(s.objects) for s in level1} == {1}
    assert max(max(s.layout.width, s.layout.height) for s in level1) <= 160
    assert not _questions(level1, "relation")
    level2 = generate_world(300, level=2, render=False)
    assert {len(s.objects) for s in level2} == {1, 2, 3}
    with pytest.raises(ValueError, match="full world"):
        generate_world(3, level=1, split="heldout")
    with pytest.raises(ValueError, match="unknown level"):
        generate_world(3, level=7)


def test_heldout_differs_from_every_train_seed(heldout_scenes):
    heldout = {(s.caption, s.layout.width, s.layout.height) for s in heldout_scenes[:200]}
    for seed in range(3):
        train = {(s.caption, s.layout.width, s.layout.height) for s in generate_world(200, seed=seed, render=False)}
        assert len(heldout & train) < 5  # only trivially simple scenes could coincide in caption and size
    def scene(s):  # everything drawn but the colour jitter (positions lie on the token grid, so they repeat)
        return s.layout.width, s.layout.height, s.layout.text, tuple((o.shape, o.color, o.box) for o in s.objects)

    heldout = {scene(s) for s in heldout_scenes}
    assert len(heldout & {scene(s) for s in generate_world(len(heldout_scenes), seed=0, render=False)}) <= 1
    assert all(s.level == 3 for s in heldout_scenes)


def _files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seeds_differ(tmp_path):
    write_world(tmp_path / "a", 40, seed=3)
    write_world(tmp_path / "b", 40, seed=3)
    write_world(tmp_path / "c", 40, seed=4)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    words = sum(scene.word is not None for scene in generate_world(40, seed=3, render=False))
    assert a == b and len(a) == 40 + words + 12  # images, cut-out words + json, captions, colours, shapes,
    # relations, counts, perception, words, questions, text, manifest, shard
    files = lambda tree: {k for k in tree if not k.endswith(".png")}  # noqa: E731
    assert files(a) == files(c) and all(a[k] != c[k] for k in ("train.json", "train_text.txt", "train_words.json"))


def test_cli_writes_llava_json_webdataset_and_text(tmp_path):
    out = tmp_path / "world"
    manifest = main(["data", "synth", "--out", str(out), "--n", "200", "--shard-size", "150"])
    records = json.loads((out / "train.json").read_text())
    assert len(records) == 200 and manifest["shards"] == ["train-000000.tar", "train-000001.tar"]
    first = records[0]
    assert first["conversations"][0]["from"] == "human" and first["conversations"][0]["value"].startswith("<image>\n")
    assert [t["from"] for t in first["conversations"]] == ["human", "gpt"] * (len(first["conversations"]) // 2)
    assert sum("<image>" in t["value"] for r in records for t in r["conversations"]) == 200
    image = Image.open(out / first["image"])
    assert image.size == (first["width"], first["height"])
    with tarfile.open(out / "shards" / "train-000000.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["000000.json", "000000.png"] and len(names) == 300
        assert json.loads(tar.extractfile("000000.json").read()) == first
        png = tar.extractfile("000000.png").read()
    assert png == (out / first["image"]).read_bytes()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(image))
    questions = [json.loads(line) for line in (out / "train_questions.jsonl").read_text().splitlines()]
    assert len(questions) == sum(len(r["qa"]) + 1 for r in records)
    first_relation = next(q for q in questions if q["type"] == "relation")
    assert first_relation["chance"] == 0.5 and first_relation["answer"] in ("yes", "no")
    assert questions[0]["image"] == first["image"] and questions[0]["chance"] == 1 / len(COLORS)
    assert all(q["objects"] == len(r["objects"]) for q, r in
               zip(questions, (r for r in records for _ in range(len(r["qa"]) + 1))))
    lines = (out / "train_text.txt").read_text().splitlines()
    # caption, every question but the relation choice, and a one-object scene's perception question
    assert len(lines) == sum(1 + sum(q["type"] != "relation_choice" for q in r["qa"]) + (len(r["objects"]) == 1)
                             for r in records)
    choice = next(q for q in questions if q["type"] == "relation_choice")
    assert choice["chance"] == 0.5 and choice["answer"] in choice["choices"] and len(choice["choices"]) == 2
    assert lines[0] == first["caption"]
    main(["data", "synth", "--out", str(out), "--n", "30", "--split", "heldout"])
    held = json.loads((out / "heldout.json").read_text())
    assert len(held) == 30 and held[0]["id"] == "synth-heldout-000000" and held[0]["caption"] != first["caption"]
    assert len(json.loads((out / "train.json").read_text())) == 200  # the other split is untouched


def test_caption_pairs_file_feeds_the_plain_template(tmp_path):
    write_world(tmp_path, 12, seed=1, level=2)
    records = json.loads((tmp_path / "train.json").read_text())
    pairs = json.loads((tmp_path / "train_captions.json").read_text())
    assert [p["image"] for p in pairs] == [r["image"] for r in records]
    for pair, record in zip(pairs, records):
        human, gpt = pair["conversations"]
        assert human == {"from": "human", "value": "<image>"} and gpt == {"from": "gpt", "value": record["caption"]}


@pytest.mark.parametrize("kind", ["shape", "color"])
def test_shapes_and_colors_files_ask_a_one_object_scene_its_question_alone(tmp_path, kind):
    manifest = write_world(tmp_path, 12, seed=1, level=1)
    records = json.loads((tmp_path / "train.json").read_text())
    naming = json.loads((tmp_path / manifest[f"{kind}s"]).read_text())
    scenes = generate_world(12, seed=1, level=1)
    assert [s["image"] for s in naming] == [r["image"] for r in records]
    for record, scene in zip(naming, scenes):
        item = next(q for q in scene.qa if q.type == kind)
        assert record["conversations"] == [{"from": "human", "value": f"<image>\n{item.question}"},
                                           {"from": "gpt", "value": item.answer}]
        assert item.answer.split()[-1] == getattr(scene.layout.objects[0], kind)


@pytest.mark.parametrize("kind", ["shape", "color"])
def test_naming_conversations_ask_about_every_object_once_in_varied_order(tmp_path, kind):
    manifest = write_world(tmp_path, 30, seed=2, level=3)
    naming = json.loads((tmp_path / manifest[f"{kind}s"]).read_text())
    scenes = generate_world(30, seed=2, level=3)
    other = "color" if kind == "shape" else "shape"
    first_asked = Counter()
    for record, scene in zip(naming, scenes):
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(scene.objects)
        assert turns[0]["value"].startswith("<image>\n") and all("<image>" not in t["value"] for t in turns[1:])
        asked = {}
        for human, gpt in zip(turns[::2], turns[1::2]):
            named = [o for o in scene.objects if f" {getattr(o, other)} " in human["value"]]
            assert len(named) == 1, human  # the question names exactly one object of the scene
            assert gpt["value"].split()[-1] == getattr(named[0], kind)
            asked[named[0]] = gpt["value"]
        assert set(asked) == set(scene.objects)  # every object once
        if len(scene.objects) > 1:
            ordered = sorted(scene.objects, key=lambda o: (o.box[1], o.box[0]))
            first_asked[turns[0]["value"] == f"<image>\n{NAMING[kind](ordered[0]).question}"] += 1
    assert first_asked[True] and first_asked[False]  # not always in reading order


def test_perception_file_asks_each_one_object_scene_its_shape_as_a_bare_word(tmp_path):
    manifest = write_world(tmp_path, 30, seed=2, level=2)
    perception = json.loads((tmp_path / manifest["perception"]).read_text())
    alone = [s for s in generate_world(30, seed=2, level=2) if len(s.objects) == 1]
    assert 0 < len(alone) < 30 and [r["image"] for r in perception] == [f"images/train/{s.key}.png" for s in alone]
    for record, scene in zip(perception, alone):
        assert record["conversations"] == [{"from": "human", "value": "<image>\nwhat shape is this ?"},
                                           {"from": "gpt", "value": scene.objects[0].shape}]


def test_words_file_cuts_each_word_out_with_its_cells(tmp_path):
    """The reading warm-up: every scene's word alone, on exactly the cells it fills, asked as evaluation asks it."""
    manifest = write_world(tmp_path, 40, seed=4, level=3)
    records = json.loads((tmp_path / manifest["words"]).read_text())
    with_word = [s for s in generate_world(40, seed=4, level=3) if s.word is not None]
    assert 0 < len(records) == len(with_word) < 40
    for record, scene in zip(records, with_word):
        assert record["conversations"] == [{"from": "human", "value": "<image>\nwhat word is written ?"},
                                           {"from": "gpt", "value": scene.word}]
        crop = np.asarray(Image.open(tmp_path / record["image"]))
        x0, y0, x1, y1 = scene.layout.text.box
        column, row = (x0 - INSET_PX) // CELL_PX, y0 // CELL_PX
        assert crop.shape[0] == CELL_PX and crop.shape[1] % CELL_PX == 0 and crop.shape[1] >= x1 - x0
        whole = np.asarray(scene.image)
        x, y = column * CELL_PX, row * CELL_PX
        assert (crop == whole[y:y + CELL_PX, x:x + crop.shape[1]]).all()
        inked = np.all(crop == scene.layout.text.rgb, axis=-1)
        assert inked.sum() == np.all(whole == scene.layout.text.rgb, axis=-1).sum() > 30  # the whole word
        assert not any(np.all(crop == o.rgb, axis=-1).any() for o in scene.objects)


def test_every_question_type_opens_some_training_conversations(train_scenes):
    """Evaluation asks each question alone: training must ask each type first, too."""
    firsts = Counter()
    for scene in train_scenes:
        kinds = {item.question: item.type for item in scene.qa}
        firsts[kinds.get(scene.conversation[0][0], "caption")] += 1
    assert set(firsts) == {"caption", *QA_TYPES} - {"relation_choice"}, firsts  # that one is asked alone


@pytest.mark.parametrize("kind, qa_type", [("relations", "relation_choice"), ("counts", "count")])
def test_alone_files_ask_each_scene_its_question_alone(tmp_path, kind, qa_type):
    manifest = write_world(tmp_path, 40, seed=3, level=3)
    written = json.loads((tmp_path / manifest[kind]).read_text())
    scenes = generate_world(40, seed=3, level=3)
    asked = [(s, q) for s in scenes for q in s.qa if q.type == qa_type]
    assert 0 < len(asked) <= 40 and [r["image"] for r in written] == [f"images/train/{s.key}.png" for s, _ in asked]
    for record, (scene, item) in zip(written, asked):
        assert record["conversations"] == [{"from": "human", "value": f"<image>\n{item.question}"},
                                           {"from": "gpt", "value": item.answer}]
        if qa_type == "count":
            assert item.answer == NUMBER_WORDS[len(scene.objects)]
    assert (len(asked) < 40) == (qa_type == "relation_choice")  # not every scene has a pair to compare; all count


def test_the_relation_choice_never_reaches_the_text_or_the_conversations(tmp_path):
    write_world(tmp_path, 40, seed=3, level=3)
    text = (tmp_path / "train_text.txt").read_text()
    conversations = json.dumps([r["conversations"] for r in json.loads((tmp_path / "train.json").read_text())])
    assert "which is" not in text and "which is" not in conversations


def test_no_training_answer_can_be_read_off_an_earlier_turn(train_scenes):
    """Evaluation asks each question alone: training must not let an answer be copied from the conversation."""
    for scene in train_scenes[:1000]:
        turns = list(scene.conversation)
        if turns[0][0] == "describe the image .":  # it states everything: a conversation of its own
            assert turns == [("describe the image .", scene.caption)]
            continue
        kinds = {item.question: item.type for item in scene.qa}
        order = [kinds[q] for q, _ in turns]
        if "relation" in order:  # it names two objects' colours and shapes: last, or first without them
            assert order[-1] == "relation" or (order[0] == "relation" and not {"color", "shape"} & set(order))
        for question, answer in turns:
            earlier = " ".join(f"{q} {a}" for q, a in turns[:turns.index((question, answer))])
            if kinds[question] in ("shape", "color", "text"):
                assert answer not in earlier.split(), (question, answer, earlier)
