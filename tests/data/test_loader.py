"""Steps prepared in DataLoader workers: the same data for any number of workers, skips counted once, exact resume."""

from __future__ import annotations

import json
import tarfile
from itertools import islice

import pytest
import torch
from transformers import AutoTokenizer

from evev2.data.datasets import LlavaJsonSource, Mixture, WebDatasetSource
from evev2.data.image_processing import EVEImageProcessor
from evev2.data.loader import StepStream, step_loader
from evev2.data.processor import EVEProcessor
from evev2.data.samples import SampleBuilder
from evev2.constants import IMAGE_TOKEN_INDEX

BUDGET = 128


@pytest.fixture(scope="module")
def data(tiny_world_dir, tmp_path_factory):
    """The tiny world's captions with broken records mixed in (JSONL), plus its shards and a truncated copy of one."""
    root = tmp_path_factory.mktemp("loader")
    records = json.loads((tiny_world_dir / "train_captions.json").read_text())
    lines = []
    for i, record in enumerate(records):
        lines.append(json.dumps({**record, "image": str(tiny_world_dir / record["image"])}))
        if i % 5 == 2:
            lines.append(json.dumps({**record, "image": str(root / "missing.png")}))
        if i % 7 == 3:
            lines.append("{not json")
    (root / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    shard = next((tiny_world_dir / "shards").glob("*.tar"))
    with tarfile.open(shard) as tar:  # cut inside the data of the middle member
        members = tar.getmembers()
        middle = members[len(members) // 2]
    (root / "truncated.tar").write_bytes(shard.read_bytes()[: middle.offset_data + middle.size // 2])
    return {"jsonl": root / "mixed.jsonl", "shards": [str(shard), str(root / "truncated.tar")]}


@pytest.fixture(scope="module")
def processor(qwen_tokenizer_dir):
    return EVEProcessor(AutoTokenizer.from_pretrained(qwen_tokenizer_dir), EVEImageProcessor(max_size=96), "plain")


def stream(data, processor, start_step=0, state=None, spans=None, steps=1) -> StepStream:
    builder = SampleBuilder(processor, BUDGET)
    sources = [LlavaJsonSource("jsonl", data["jsonl"], builder, seed=1),
               WebDatasetSource("web", data["shards"], builder, seed=1, shuffle_buffer=8)]
    mixture = Mixture(sources, [1, 1], seed=4, spans=spans, steps=steps)
    if state is not None:
        mixture.load_state_dict(state)
    return StepStream(mixture, records_per_step=8, token_budget=BUDGET, rows_per_micro_batch=2,
                      pad_token_id=processor.tokenizer.pad_token_id, start_step=start_step)


def fingerprint(step) -> tuple:
    """Everything a step feeds the model and the accounting, in comparable form."""
    batches = [(b["input_ids"].tolist(), b["labels"].tolist(), b["attention_mask"].tolist(),
                [img.sum().item() for img in b["images"]]) for b in step.micro_batches]
    return (step.index, batches, step.tokens, step.supervised_tokens, step.rows, step.kept,
            sorted((s.reason, s.source) for s in step.skips), json.dumps(step.state, sort_keys=True))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores, on purpose
def test_every_number_of_workers_prepares_the_same_steps(data, processor):
    steps = {workers: [fingerprint(s) for s in islice(step_loader(stream(data, processor), workers, False), 16)]
             for workers in (0, 1, 3)}
    assert steps[0] == steps[1] == steps[3]
    assert [s[0] for s in steps[0]] == list(range(1, 17))
    # every kind of loss is met; with 3 workers each is reported once (by the step's owner), as by the lone walker
    reasons = [reason for s in steps[0] for reason, _ in s[6]]
    assert {"missing_image", "malformed_record", "truncated_tar"} <= set(reasons)
    kept = sum(s[5] for s in steps[0])
    assert kept + len(reasons) - reasons.count("truncated_tar") == 16 * 8  # every record drawn: kept or skipped
    assert all(s[5] <= 8 for s in steps[0]) and any(s[5] < 8 for s in steps[0])  # a bad record shortens its step


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_step_state_resumes_the_stream_exactly_with_another_worker_count(data, processor):
    full = [fingerprint(s) for s in islice(step_loader(stream(data, processor), 2, False), 10)]
    fifth = next(islice(step_loader(stream(data, processor), 0, False), 4, None))
    state = json.loads(json.dumps(fifth.state))  # as it travels through a checkpoint
    resumed = [fingerprint(s) for s in islice(step_loader(stream(data, processor, 5, state), 3, False), 5)]
    assert resumed == full[5:]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_steps_draw_from_the_sources_their_spans_name_across_workers_and_resume(data, processor):
    spans, steps = [(0.0, 0.5), (0.5, 1.0)], 8  # the JSONL source for steps 1-4, the shards for steps 5-8
    full = list(islice(step_loader(stream(data, processor, spans=spans, steps=steps), 2, False), steps))
    cursors = [step.state["sources"] for step in full]  # each source's cursor after each step
    assert [c["web"] == cursors[0]["web"] for c in cursors[:4]] == [True] * 4  # the shards wait ...
    assert [c["jsonl"] == cursors[3]["jsonl"] for c in cursors[3:]] == [True] * 5  # ... then the JSONL does
    assert cursors[0]["jsonl"] != stream(data, processor).mixture.state_dict()["sources"]["jsonl"]
    assert cursors[7]["web"] != cursors[3]["web"] and all(step.kept for step in full)
    third = full[2]
    state = json.loads(json.dumps(third.state))
    resumed = list(islice(step_loader(stream(data, processor, 3, state, spans, steps), 3, False), 5))
    assert [fingerprint(s) for s in resumed] == [fingerprint(s) for s in full[3:]]


def test_micro_batches_follow_the_model_batch_contract(data, processor):
    step = next(step_loader(stream(data, processor), 0, False))
    for batch in step.micro_batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == batch["labels"].shape and ids.shape[0] <= 2
        assert int((ids == IMAGE_TOKEN_INDEX).sum()) == len(batch["images"])
        assert all(img.dtype == torch.float32 and img.shape[0] == 3 for img in batch["images"])
    assert step.rows == sum(b["input_ids"].shape[0] for b in step.micro_batches)
