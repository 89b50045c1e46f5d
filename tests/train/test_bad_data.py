"""A training set with one record of every bad kind trains to the end, and the guard stops a run.

40 LLaVA records in JSONL: 12 bad ones (each kind once) among 28 good ones (CMYK JPEG, 16-bit PNG, EXIF-rotated JPEG,
palette GIF, RGBA PNG, emoji / right-to-left / combining-mark text, multi-turn, text-only). 5 steps of 8 records
read the file exactly once. The real `Trainer` with 2 data workers must finish, train on every good record (by id:
each step reports the ids of the samples it holds) and count every bad one under its reason. With a strict guard,
the console script must stop with exit code 2 and one `evev2: error:` line.
"""

from __future__ import annotations

import io
import json
import math
import random
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evev2 import jsonio
from evev2.train.engine import Trainer
from evev2.train.recipe import load_recipe

STEPS, BATCH = 5, 8  # 40 records: one epoch


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def picture(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_images(folder: Path) -> None:
    folder.mkdir()
    rotated = Image.Exif()
    rotated[0x0112] = 6
    good = {
        "photo.jpg": encode(picture(120, 90, 1), "JPEG"),
        "cmyk.jpg": encode(picture(96, 64, 2).convert("CMYK"), "JPEG"),
        "deep.png": encode(Image.fromarray(np.random.default_rng(3).integers(0, 65536, (70, 50), dtype=np.uint16)),
                           "PNG"),  # 16-bit greyscale, read as I;16
        "rotated.jpg": encode(picture(100, 60, 4), "JPEG", exif=rotated),
        "palette.gif": encode(picture(64, 64, 5).convert("P"), "GIF"),
        "alpha.png": encode(picture(80, 80, 6).convert("RGBA"), "PNG"),
        "grey.webp": encode(picture(72, 48, 7).convert("L"), "WEBP"),
    }
    for name, data in good.items():
        (folder / name).write_bytes(data)
    jpeg = encode(picture(120, 90, 8), "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "notes.png").write_text("these are notes, not a PNG\n")
    (folder / "empty.png").write_bytes(b"")
    png = encode(picture(8, 8, 9), "PNG")
    ihdr = struct.pack(">II", 30000, 30000) + png[24:29]  # a valid IHDR (CRC included) claiming 900M pixels
    (folder / "huge.png").write_bytes(png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:])


def qa(sample_id: str, question: str, answer: str, image: str | None = None) -> dict:
    record = {"id": sample_id, "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                                                 {"from": "gpt", "value": answer}]}
    if image:
        record["image"] = image
    return record


ODD_TEXT = [
    ("Que veut dire \U0001F600 ?", "Un visage souriant \U0001F600\U0001F44D."),
    ("Who is in \U0001F469\u200d\U0001F469\u200d\U0001F467?", "A family: \U0001F469\u200d\U0001F469\u200d\U0001F467."),
    ("\u05de\u05d4 \u05d6\u05d4?", "\u05d6\u05d4 \u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd."),  # Hebrew
    ("\u0645\u0627 \u0647\u0630\u0627\u061f",  # Arabic
     "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645."),
    ("Spell cafe\u0301 and nai\u0308ve.", "Cafe\u0301 and nai\u0308ve, with combining marks."),  # NFC-normalised
    ("Z\u0336a\u0301\u0317l\u0335g\u0310o?", "T\u0334e\u0301x\u0300t with stacked marks."),
    ("\u0928\u092e\u0938\u094d\u0924\u0947?",  # Devanagari
     "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e\u0964"),
    ("\u4f60\u597d\u5417\uff1f", "\u6211\u5f88\u597d\uff0c\u8c22\u8c22\u3002"),
]


def write_dataset(root: Path) -> dict:
    """The 40-line JSONL (in a seeded shuffled order), the ids of its good records and the skips expected by reason."""
    write_images(root / "images")
    good = [qa(f"img-{name}", f"Describe image {name}.", f"It is the picture {name}.", name)
            for name in ("photo.jpg", "cmyk.jpg", "deep.png", "rotated.jpg", "palette.gif", "alpha.png", "grey.webp")]
    good += [qa(f"img-again-{i}", f"Look again ({i}).", f"Still picture {i} \U0001F600.", "photo.jpg")
             for i in range(3)]
    good += [qa(f"odd-{i}", question, answer, "cmyk.jpg" if i % 2 else None) for i, (question, answer) in
             enumerate(ODD_TEXT)]
    good += [qa(f"text-{i}", f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(7)]
    good.append({"id": "multi-turn", "image": "alpha.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Many colours."},
        {"from": "human", "value": "Any text?"}, {"from": "gpt", "value": "No text."}]})
    good.append({"id": "multi-image", "image": ["photo.jpg", "deep.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nCompare."}, {"from": "gpt", "value": "Two pictures."}]})
    good.append({"id": "system", "conversations": [
        {"from": "system", "value": "Answer briefly."}, {"from": "human", "value": "Hi?"},
        {"from": "gpt", "value": "Hello."}]})
    assert len(good) == 28
    lines = [json.dumps(record, ensure_ascii=i % 2 == 0).encode() for i, record in enumerate(good)]
    bad = {
        "bad_image": [qa("truncated", "Q?", "A.", "truncated.jpg"), qa("text-as-png", "Q?", "A.", "notes.png"),
                      qa("zero-bytes", "Q?", "A.", "empty.png"), qa("huge-header", "Q?", "A.", "huge.png")],
        "missing_image": [qa("missing", "Q?", "A.", "no_such_file.jpg")],
        "malformed_record": [qa("nul-path", "Q?", "A.", "photo\x00.jpg"),
                             qa("surrogate", "Lone \udc80 surrogate?", "A."),
                             ["a", "list", "not", "a", "record"],
                             {"id": "conversations-not-a-list", "conversations": "Q? A."}],
        "image_count_mismatch": [{"id": "two-markers", "image": "photo.jpg", "conversations": [
            {"from": "human", "value": "<image>\n<image>\nTwo?"}, {"from": "gpt", "value": "One."}]}],
        "empty_conversation": [{"id": "no-answer", "conversations": [{"from": "human", "value": "Anyone?"}]}],
    }
    lines += [json.dumps(record).encode() for records in bad.values() for record in records]
    lines.append('{"id": "latin-1", "conversations": [{"from": "human", "value": "Caf\u00e9?"}, '
                 '{"from": "gpt", "value": "Oui."}]}'.encode("latin-1"))  # not UTF-8
    expected = Counter({reason: len(records) for reason, records in bad.items()})
    expected["malformed_record"] += 1
    assert len(lines) == STEPS * BATCH and sum(expected.values()) == 12
    random.Random(0).shuffle(lines)
    (root / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {"path": root / "train.jsonl", "good_ids": sorted(r["id"] for r in good), "expected": dict(expected)}


def write_bad_data_recipe(root: Path, model: Path, data: Path) -> Path:
    path = root / "bad_data.toml"
    path.write_text(f"""
name = "bad-data"
output = "{root / 'run'}"
[model]
source = "{model}"
[data]
sources = [{{ name = "messy", type = "llava", path = "{data}", image_root = "{data.parent / 'images'}" }}]
template = "eve"
max_size = 128
token_budget = 320
num_workers = 2
max_bad_fraction = 0.5
guard_min_samples = 1000
[optim]
lr = 1e-3
[train]
trainable = ["patch_embed", "vision"]
steps = {STEPS}
global_batch = {BATCH}
micro_batch_rows = 4
""")
    return path


class _IdRecordingTrainer(Trainer):
    """Collects the ids of the samples each step trains on, as the data workers report them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trained_ids: list[str] = []

    def _next_step_data(self):
        prepared = super()._next_step_data()
        self.trained_ids += prepared.sample_ids
        return prepared


@pytest.fixture(scope="module")
def messy(tmp_path_factory, tiny_vlm_dir) -> dict:
    root = tmp_path_factory.mktemp("bad_data")
    data = write_dataset(root)
    return {**data, "recipe": write_bad_data_recipe(root, tiny_vlm_dir, data["path"]), "root": root}


def test_a_run_over_every_kind_of_bad_record_trains_every_good_one(messy):
    trainer = _IdRecordingTrainer(load_recipe(messy["recipe"]), messy["root"] / "run", show_progress=False)
    assert trainer.num_workers == 2
    assert trainer.train() == messy["root"] / "run" / "export"  # to the end, export included
    assert sorted(trainer.trained_ids) == messy["good_ids"]  # every good record, each once
    assert trainer.stats.kept == 28 and trainer.stats.seen == 40
    assert dict(trainer.stats.skipped) == messy["expected"]
    rows = jsonio.read_jsonl(messy["root"] / "run" / "metrics.jsonl")
    assert len(rows) == STEPS and rows[-1]["skipped_samples"] == 12
    assert all(math.isfinite(row["loss"]) and row["supervised_tokens"] > 0 for row in rows)


def test_a_strict_guard_stops_the_console_script_with_one_line(messy):
    run = subprocess.run(
        [sys.executable, "-m", "evev2.cli", "train", "--recipe", str(messy["recipe"]), "--output",
         str(messy["root"] / "guarded"), "data.max_bad_fraction=0.05", "data.guard_min_samples=5"],
        capture_output=True, text=True, timeout=600)
    errors = [line for line in run.stderr.splitlines() if line.startswith("evev2: error:")]
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "unusable" in errors[0] and "> max_bad_fraction 5.0%" in errors[0], errors[0]
    assert not (messy["root"] / "guarded" / "export").exists()
