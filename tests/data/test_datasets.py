"""Sources, robustness accounting, the mixture and its resumability, on a folder seeded with broken files."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from evev2.data.datasets import LlavaJsonSource, Mixture, WebDatasetSource
from evev2.data.errors import SampleError, TooManyBadSamplesError
from evev2.data.image_processing import EVEImageProcessor, num_image_tokens
from evev2.data.processor import EVEProcessor
from evev2.data.samples import DataStats, SampleBuilder, Skip
from evev2.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

BUDGET = 160


def image_bytes(fmt: str, size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def qa(question: str, answer: str, image: str | None = None, sample_id: str | None = None) -> dict:
    record = {"conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                                {"from": "gpt", "value": answer}]}
    if image:
        record["image"] = image
    if sample_id:
        record["id"] = sample_id
    return record


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Good and broken records in JSONL, index mode and WebDataset form. `expected` lists the skips by reason."""
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    images.mkdir()
    for i in range(6):
        (images / f"good{i}.png").write_bytes(image_bytes("PNG", (40 + 16 * i, 48), seed=i))
    jpeg = image_bytes("JPEG", (64, 64), seed=99)
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "not_an_image.png").write_text("this is text, not a PNG")
    good = [qa(f"What is shape {i}?", f"Shape {i} is a square.", f"good{i}.png", f"img{i}") for i in range(6)]
    good += [qa(f"Say the number {i}.", f"The number is {i}.", sample_id=f"txt{i}") for i in range(4)]
    bad = [
        qa("Q", "A", "truncated.jpg"),
        qa("Q", "A", "not_an_image.png"),
        qa("Q", "A", "does_not_exist.png"),
        {"conversations": []},
        {"conversations": [{"from": "human", "value": "<image>\n<image>\nTwo?"}, {"from": "gpt", "value": "No."}],
         "image": "good0.png"},
        qa("Tell a long story.", "word " * 400, "good1.png"),
        {"no_conversations": True},
    ]
    lines = [json.dumps(r) for r in good + bad] + ['{"conversations": [ broken json']
    (root / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    expected = {"bad_image": 2, "missing_image": 1, "empty_conversation": 1, "image_count_mismatch": 1,
                "too_long": 1, "malformed_record": 2}

    samples_dir = root / "samples"
    samples_dir.mkdir()
    names = []
    for i, record in enumerate(good[:5]):
        names.append(f"samples/{i}.json")
        (samples_dir / f"{i}.json").write_text(json.dumps(record))
    (samples_dir / "broken.json").write_text("{not json")
    names.append("samples/broken.json")
    (root / "index.json").write_text(json.dumps(names))

    shards = []
    for s in range(3):
        path = root / f"shard-{s}.tar"
        with wds.TarWriter(str(path)) as sink:
            for k in range(8):
                entry = {"__key__": f"s{s}k{k}", "png": image_bytes("PNG", (64, 32 + 32 * (k % 2)), seed=100 + 8 * s + k)}
                if k % 2:
                    entry["json"] = json.dumps(qa("Describe.", f"Shard {s} item {k}.", "x")).encode()
                else:
                    entry["txt"] = f"A caption for shard {s} item {k}.".encode()
                sink.write(entry)
        shards.append(str(path))
    full = (root / "shard-0.tar").read_bytes()
    truncated = root / "shard-truncated.tar"
    truncated.write_bytes(full[: len(full) * 2 // 3])
    return {"root": root, "expected": expected, "num_good": len(good), "num_lines": len(lines),
            "shards": shards, "truncated": str(truncated)}


@pytest.fixture(scope="module")
def processor(qwen_tokenizer_dir):
    return EVEProcessor(AutoTokenizer.from_pretrained(qwen_tokenizer_dir), EVEImageProcessor(max_size=64), "eve")


def make_sources(world, processor, seed=0):
    builder = SampleBuilder(processor, max_tokens=BUDGET)
    root = world["root"]
    return [
        LlavaJsonSource("jsonl", root / "mixed.jsonl", builder, image_root=root / "images", seed=seed),
        LlavaJsonSource("index", root / "index.json", builder, image_root=root / "images", seed=seed),
        WebDatasetSource("web", world["shards"], builder, seed=seed, shuffle_buffer=5),
    ]


def first_epoch(source) -> tuple[list, list[Skip]]:
    """Build every item of the source's epoch 0: (samples, skips), in stream order."""
    samples, skips = [], []
    while True:
        item = source.next_item()
        skips += source.read_skips
        source.read_skips.clear()
        if source.epoch:
            return samples, skips
        try:
            samples.append(source.build(item))
        except SampleError as err:
            skips.append(Skip(err.reason, source.name, str(err)))


def record(stats: DataStats, samples: list, skips: list[Skip]) -> None:
    stats.record_kept(len(samples))
    for skip in skips:
        stats.record_skip(skip.reason, skip.source, skip.detail)


def test_jsonl_source_names_every_broken_record_and_keeps_going(world, processor, caplog):
    builder = SampleBuilder(processor, max_tokens=BUDGET)
    root = world["root"]
    source = LlavaJsonSource("jsonl", root / "mixed.jsonl", builder, image_root=root / "images", shuffle=False)
    samples, skips = first_epoch(source)
    assert Counter(s.reason for s in skips) == world["expected"]
    assert [s.sample_id for s in samples] == [f"img{i}" for i in range(6)] + [f"txt{i}" for i in range(4)]
    assert source.epoch == 1 and source.position == 1  # the stream goes on into the next epoch
    stats = DataStats(max_bad_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="evev2.data.samples"):
        record(stats, samples, skips)
    assert dict(stats.skipped) == world["expected"] and stats.kept == world["num_good"]
    assert stats.seen == world["num_lines"]
    assert "missing_image" in caplog.text and "too_long" in caplog.text and "bad_image" in caplog.text


def test_samples_carry_ids_labels_images_and_spliced_length(world, processor):
    samples, _ = first_epoch(make_sources(world, processor)[0])
    assert len(samples) == world["num_good"]
    for sample in samples:
        n_images = int((sample.input_ids == IMAGE_TOKEN_INDEX).sum())
        assert n_images == len(sample.images) == (1 if sample.sample_id.startswith("img") else 0)
        assert all(p.shape[0] == 3 and p.shape[1] % 32 == 0 and p.shape[2] % 32 == 0 for p in sample.images)
        extra = sum(num_image_tokens(p.shape[1], p.shape[2]) - 1 for p in sample.images)
        assert sample.num_tokens == len(sample.input_ids) + extra <= BUDGET
        assert (sample.labels[sample.input_ids == IMAGE_TOKEN_INDEX] == IGNORE_INDEX).all()
        supervised = sample.labels[sample.labels != IGNORE_INDEX]
        assert processor.decode(supervised, skip_special_tokens=False).endswith(".<|im_end|>")


def test_index_mode_reads_one_file_per_sample(world, processor):
    source = make_sources(world, processor)[1]
    assert source.mode == "index"
    samples, skips = first_epoch(source)
    assert {s.sample_id for s in samples} == {"img0", "img1", "img2", "img3", "img4"}
    assert [s.reason for s in skips] == ["malformed_record"]


def test_webdataset_source_streams_all_shards_and_counts_a_truncated_tar(world, processor):
    builder = SampleBuilder(processor, max_tokens=BUDGET)
    source = WebDatasetSource("web", world["shards"] + [world["truncated"]], builder, shuffle_buffer=4)
    samples, skips = first_epoch(source)
    ids = [s.sample_id for s in samples]
    clean = {f"shard-{s}.tar/s{s}k{k}" for s in range(3) for k in range(8)}
    assert clean <= set(ids) and len(set(ids)) == len(ids)
    assert "truncated_tar" in {s.reason for s in skips}
    assert ids != sorted(ids)  # the shuffle buffer is on


@pytest.mark.parametrize("kind", ["jsonl", "web"])
def test_records_split_across_ranks_are_disjoint_and_complete(world, processor, kind):
    builder = SampleBuilder(processor, max_tokens=BUDGET)
    root, ranks = world["root"], 2 if kind == "jsonl" else 3
    seen = []
    for rank in range(ranks):
        source = (LlavaJsonSource("jsonl", root / "mixed.jsonl", builder, image_root=root / "images", rank=rank,
                                  world=ranks) if kind == "jsonl" else
                  WebDatasetSource("web", world["shards"], builder, rank=rank, world=ranks))
        seen.append({s.sample_id for s in first_epoch(source)[0]})
    assert sum(len(ids) for ids in seen) == len(set.union(*seen))  # disjoint
    if kind == "jsonl":
        assert set.union(*seen) == {f"img{i}" for i in range(6)} | {f"txt{i}" for i in range(4)}
    else:  # one whole shard per rank
        assert set.union(*seen) == {f"shard-{s}.tar/s{s}k{k}" for s in range(3) for k in range(8)}
        assert all(len({i.split("/")[0] for i in ids}) == 1 for ids in seen)


def test_mixture_follows_its_weights(world, processor):
    mixture = Mixture(make_sources(world, processor), weights=[2, 1, 1], seed=3)
    draws = [mixture.next_draw()[0].name for _ in range(400)]
    shares = np.array([draws.count(name) for name in ("jsonl", "index", "web")]) / len(draws)
    assert np.allclose(shares, [0.5, 0.25, 0.25], atol=0.06), shares


def test_spans_draw_each_source_only_in_its_part_of_the_stage(world, processor):
    """A warm-up on one source, then another alone, then two mixed: spans are fractions of the stage's steps."""
    mixture = Mixture(make_sources(world, processor), weights=[2, 1, 3], seed=3,
                      spans=[(0.0, 0.25), (0.25, 1.0), (0.5, 1.0)], steps=8)
    drawn = {step: [mixture.next_draw(step)[0].name for _ in range(60)] for step in range(1, 9)}
    assert set(drawn[1]) == set(drawn[2]) == {"jsonl"}
    assert set(drawn[3]) == set(drawn[4]) == {"index"}
    late = [name for step in range(5, 9) for name in drawn[step]]
    assert set(late) == {"index", "web"} and 0.6 < late.count("web") / len(late) < 0.9  # weights 1:3 among them
    np.testing.assert_allclose(mixture.probabilities(5), [0.0, 0.25, 0.75])
    np.testing.assert_array_equal(mixture.probabilities(12), mixture.probabilities(8))  # prefetched past the end


@pytest.mark.parametrize("spans,steps,message", [
    ([(0.0, 0.5), (0.75, 1.0)], 8, "no source spans step 5 of 8"),
    ([(0.5, 0.2), (0.0, 1.0)], 8, r"0 <= start < end <= 1, got \[0.5, 0.2\]"),
    ([(0.0, 1.5), (0.0, 1.0)], 8, "0 <= start < end <= 1"),
    ([(0.0, 1.0)], 8, "one span per source"),
])
def test_spans_that_leave_a_step_without_source_are_refused(world, processor, spans, steps, message):
    with pytest.raises(ValueError, match=message):
        Mixture(make_sources(world, processor)[:2], weights=[1, 1], spans=spans, steps=steps)


def test_mixture_resumes_exactly_from_its_state(world, processor):
    def build(source, item):
        try:
            return source.build(item)
        except SampleError as err:
            return err.reason

    mixture = Mixture(make_sources(world, processor, seed=5), weights=[1, 1, 1], seed=11)
    for _ in range(23):
        mixture.next_draw()
    state = json.loads(json.dumps(mixture.state_dict()))  # the state survives a JSON round trip
    remainder = [build(*mixture.next_draw()) for _ in range(30)]

    resumed = Mixture(make_sources(world, processor, seed=5), weights=[1, 1, 1], seed=11)
    resumed.load_state_dict(state)
    again = [build(*resumed.next_draw()) for _ in range(30)]
    assert [getattr(s, "sample_id", s) for s in again] == [getattr(s, "sample_id", s) for s in remainder]
    assert any(isinstance(s, str) for s in again) and any(not isinstance(s, str) for s in again)
    assert all((a.input_ids == b.input_ids).all() and len(a.images) == len(b.images)
               for a, b in zip(again, remainder) if not isinstance(a, str))


def test_guard_fails_the_run_when_too_many_samples_are_bad(world, processor):
    stats = DataStats(max_bad_fraction=0.2, min_seen=5)
    samples, skips = first_epoch(make_sources(world, processor)[0])
    with pytest.raises(TooManyBadSamplesError, match="unusable"):
        record(stats, samples, skips)
    assert stats.bad_fraction > 0.2 and stats.seen >= 5
    quiet = DataStats(max_bad_fraction=0.2, min_seen=10_000)  # too few seen yet: the guard waits
    record(quiet, samples, skips)


def test_a_source_with_no_records_for_its_rank_fails_loudly(tmp_path, processor):
    (tmp_path / "one.jsonl").write_text('{"conversations": []}\n')
    source = LlavaJsonSource("one", tmp_path / "one.jsonl", SampleBuilder(processor, BUDGET), rank=1, world=2)
    with pytest.raises(RuntimeError, match="no records for rank 1 of 2"):
        source.next_item()
