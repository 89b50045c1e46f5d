"""bench/engine_step.py runs only on sessions lent a GPU; its smoke mode runs the same code path here, on the CPU."""

from __future__ import annotations

import io
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

BENCH = Path(__file__).resolve().parents[2] / "bench"
SMOKE_SAMPLE_TOKENS = 1 + 2 * (3 + 1) + 16  # a 64x96 image + 16 caption tokens


@pytest.fixture(scope="module")
def engine_step():
    sys.path.insert(0, str(BENCH))
    try:
        import engine_step
        yield engine_step
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def smoke(engine_step, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_step")
    args = ["--smoke", "--data", str(root / "data"), "--work", str(root / "work"), "--out", str(root / "out.jsonl")]
    return root, engine_step.main(args)


def test_shards_hold_real_jpegs_with_captions_of_the_intended_length(smoke):
    from evev2.data.processor import EVEProcessor

    root, _ = smoke
    shards = sorted((root / "data").glob("smoke-*/*.tar"))
    processor = EVEProcessor.from_pretrained(next((root / "data").glob("model-smoke-*")))
    assert processor.template.name == "plain"
    jpegs = captions = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".jpg"):
                    image = Image.open(io.BytesIO(data))
                    assert data[:2] == b"\xff\xd8" and image.format == "JPEG" and image.size == (96, 64)
                    image.load()
                    jpegs += 1
                else:
                    assert member.name.endswith(".txt")
                    conversation = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": data.decode()}]
                    encoded = processor.encode_conversation(conversation, num_images=1)
                    assert len(encoded.input_ids) == 17 and sum(label >= 0 for label in encoded.labels) == 16
                    captions += 1
    assert len(shards) == 2 and jpegs == captions == 16


def test_model_folder_has_vision_weights_unlike_the_text_weights(smoke):
    root, _ = smoke
    weights = load_file(next((root / "data").glob("model-smoke-*")) / "model.safetensors")
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    for text, vision in (("self_attn.q_proj.weight", "self_attn.vision_q_proj.weight"),
                         ("self_attn.q_proj.bias", "self_attn.vision_q_proj.bias"),
                         ("input_layernorm.weight", "vision_input_layernorm.weight")):
        assert not torch.equal(weights[f"model.layers.1.{text}"], weights[f"model.layers.1.{vision}"]), text


def test_the_trainer_ran_every_configuration(engine_step, smoke):
    root, records = smoke
    engine = {r["config"]: r for r in records if r["kind"] == "engine"}
    assert list(engine) == list(engine_step.CONFIGS)
    for name, r in engine.items():
        rows = [json.loads(line) for line in (root / "work" / name / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2, 3] and all(math.isfinite(row["loss"]) for row in rows)
        assert r["losses_finite"] and len(r["step_ms"]) == 3 and r["checkpoints_skipped"] == 1
        assert not (root / "work" / name / "checkpoints").exists() and not (root / "work" / name / "export").exists()
        assert r["ms"] > 0 and r["first_step_s"] > 0 and r["init_s"] > 0 and 0 <= r["data_wait_fraction"] < 1
        assert r["tokens_per_step"] == 2 * SMOKE_SAMPLE_TOKENS and r["tokens_per_s"] > 0 and r["mfu"] > 0
    assert engine["rows_compiled_w0"]["workers"] == 0 and engine["rows_compiled"]["workers"] == 2
    assert engine["packed_compiled"]["packed"] and not engine["rows_compiled"]["packed"]
    assert engine["packed_sdpa_compiled"]["packed"] and engine["packed_sdpa_compiled"]["attention"] == "sdpa"
    assert engine["seq4096_compiled"]["packed"] in (True, False)  # resolved from the anchor configurations


def test_comparison_with_the_synthetic_step_and_the_summary(smoke):
    root, records = smoke
    (synthetic,) = [r for r in records if r["kind"] == "synthetic"]
    assert synthetic["official"]["ms"] > 0 and synthetic["ours"]["ms"] > 0
    engine = [r for r in records if r["kind"] == "engine"]
    assert all(r["flops_per_step"] == synthetic["flops_per_step"] for r in engine)  # gpu_train_step's formula
    (summary,) = [r for r in records if r["kind"] == "summary"]
    for r in engine:
        ratio = summary["ratios"][r["config"]]
        assert ratio["official_over_engine"] > 0 and ratio["engine_over_synthetic"] > 0
        assert ratio["synthetic_kind"] == "ours"  # every smoke configuration is eager
    written = [json.loads(line) for line in (root / "out.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in written] == [r["kind"] for r in records]


def test_parts_past_the_time_budget_are_skipped(engine_step, smoke):
    root, _ = smoke
    records = engine_step.main(["--smoke", "--data", str(root / "data"), "--work", str(root / "work2"),
                                "--budget-s", "0", "--configs", "rows_compiled", "rows_eager"])
    assert [(r["kind"], r.get("skipped")) for r in records] == [
        ("setup", None), ("engine", "time budget"), ("engine", "time budget"), ("summary", None)]
