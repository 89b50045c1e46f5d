"""Whatever a record or an image holds, the record -> sample path builds a well-formed sample or raises a `SampleError`.

Property tests (Hypothesis, the derandomised `ci` profile of tests/conftest.py) drive the real path: records written
to a JSONL file and read by `LlavaJsonSource`, image bytes written to files or WebDataset shards, the real Qwen
tokenizer and `EVEImageProcessor`. A `SampleError` is a counted skip; any other exception would kill a training run.
Each sample must take bounded time (the profile's deadline, and an explicit bound) and bounded memory (the
decompression-bomb guard), and every kept sample must be what the packer and the model expect.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import struct
import time
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hypothesis import currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoTokenizer

from evev2.data.datasets import LlavaJsonSource, WebDatasetSource
from evev2.data.errors import SampleError
from evev2.data.image_processing import EVEImageProcessor, num_image_tokens
from evev2.data.processor import EVEProcessor
from evev2.data.samples import RawRecord, Sample, SampleBuilder, Skip
from evev2.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

# Fuzzed files make Pillow warn about what it skips (corrupt EXIF, tags past the end): expected here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")

BUDGET = 384


def examples(n: int) -> int:
    """`n` under the "ci" profile of tests/conftest.py (100 by default), proportionally more under `explore`."""
    return max(1, n * settings.default.max_examples // 100)


MAX_SECONDS = 2.0  # per sample, build only (the profile's deadline also covers writing the file)
REASONS = {"bad_sample", "malformed_record", "empty_conversation", "image_count_mismatch", "template_mismatch",
           "too_long", "missing_image", "bad_image"}

# ---- strategies: text and JSON ---------------------------------------------------------------------------------------

ANY_CHAR = st.characters(exclude_categories=())  # every code point, lone surrogates included
SPECIAL = ["<image>", "<image>\n", "<ima", "ge>", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "\x00", "\udc80",
           "\ud800", "\U0001F600", "\U0001F469\u200d\U0001F469\u200d\U0001F467", "\u05e9\u05dc\u05d5\u05dd",
           "\u0645\u0631\u062d\u0628\u0627", "\u202e", "e\u0301", "\u0344", "\u2028", "\x85", "\x1c", "\r\n", "\r",
           "\ufeff", " ", "\t", "ASSISTANT:", "USER:", "{{ x }}", "{% if %}", "'s", "\u3000", "\U000e0001"]
HUGE = ["a" * 200_000, "word " * 40_000, "<image>" * 3000, "\U0001F600" * 60_000, "\n" * 50_000]

text = st.one_of(
    st.text(ANY_CHAR, max_size=24),
    st.lists(st.one_of(st.sampled_from(SPECIAL), st.text(ANY_CHAR, max_size=4)), max_size=8).map("".join),
)
long_text = st.integers(0, 7).flatmap(lambda k: st.sampled_from(HUGE) if k == 0 else text)  # huge one time in 8
# Text that can be kept: still every script, emoji, combining mark, control and special token, but no lone surrogate
# and no <image> marker; the plausible records below use it three times in four.
UNICODE = st.characters(exclude_categories=("Cs",))
NICE = [piece for piece in SPECIAL if piece not in ("<image>", "<image>\n", "\udc80", "\ud800")]
nice_text = st.one_of(
    st.text(UNICODE, max_size=24),
    st.lists(st.one_of(st.sampled_from(NICE), st.text(UNICODE, max_size=4)), max_size=8).map("".join),
)
turn_text = st.integers(0, 7).flatmap(lambda k: long_text if k < 2 else nice_text)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(10 ** 30), 10 ** 30),
                        st.floats(allow_nan=True, allow_infinity=True), text)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                               st.dictionaries(text, inner, max_size=3)),
                          max_leaves=8)

ROLES = ["human", "gpt", "user", "assistant", "system", "bot", "Human", ""]
role = st.one_of(st.sampled_from(ROLES), json_value)
part = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "image_url", "video", "Text"]), "text": text}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "image_url"])}),
    json_value,
)
content = st.one_of(long_text, st.lists(part, max_size=4), json_value)
message = st.one_of(
    st.fixed_dictionaries({"from": role, "value": content}),
    st.fixed_dictionaries({"role": role, "content": content}),
    json_value,
)


# ---- strategies: images ----------------------------------------------------------------------------------------------

# (format, mode) pairs PIL writes; they are read back whatever the file is called.
KINDS = [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "L"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "1"), ("PNG", "I;16"),
         ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("JPEG", "EXIF"), ("WEBP", "RGB"), ("WEBP", "RGBA"),
         ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "I;16"), ("TIFF", "F"), ("TIFF", "CMYK"), ("TIFF", "RGBA")]
SIZES = [(1, 1), (5, 3), (37, 23), (64, 64), (130, 70)]


@lru_cache(maxsize=None)
def encoded_image(fmt: str, mode: str, size: tuple[int, int], seed: int = 0) -> bytes:
    """A small image of `mode` saved as `fmt` (mode "EXIF": an RGB JPEG whose EXIF orientation rotates it)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.random((h, w), dtype=np.float32))
    else:
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image = rgb if mode in ("RGB", "EXIF") else rgb.convert(mode)
    buffer = io.BytesIO()
    if mode == "EXIF":
        exif = Image.Exif()
        exif[0x0112] = 6
        image.save(buffer, format=fmt, exif=exif)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def forge_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the declared size in the header (PNG IHDR with a valid CRC, JPEG SOF, GIF screen), pixels unchanged."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        ihdr = struct.pack(">II", width, height) + data[24:29]
        return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]
    if data[:2] == b"\xff\xd8":
        for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
            at = data.find(marker)
            if at > 0:
                return data[:at + 5] + struct.pack(">HH", height % 65536, width % 65536) + data[at + 9:]
    if data[:3] == b"GIF":
        return data[:6] + struct.pack("<HH", width % 65536, height % 65536) + data[10:]
    return data


bomb_side = st.one_of(st.sampled_from([30000, 65535, 2 ** 31 - 1]), st.integers(10001, 65535))


@st.composite
def image_bytes(draw, with_flag: bool = False) -> bytes | tuple[bytes, bool]:
    """A valid small image, then maybe broken: truncated, bit-flipped, header overwritten, size forged, or noise.

    A forged size is either plausible (at most 3000 a side: decoded until the data runs out) or a bomb (over the
    decode cap: refused before any pixel is decoded). `with_flag`: also say whether the image is such a bomb.
    """
    fmt, mode = draw(st.sampled_from(KINDS))
    data = encoded_image(fmt, mode, draw(st.sampled_from(SIZES)), draw(st.integers(0, 2)))
    how = draw(st.sampled_from(["intact", "truncate", "flip", "header", "forge", "bomb", "junk", "noise", "empty"]))
    note(f"{fmt} {mode}, {how}")
    bomb = False
    if how == "truncate":
        data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    elif how == "flip":
        buffer = bytearray(data)
        for position in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8)):
            buffer[position] ^= 1 << draw(st.integers(0, 7))
        data = bytes(buffer)
    elif how == "header":
        start = draw(st.integers(0, min(64, len(data))))
        patch = draw(st.binary(min_size=1, max_size=16))
        data = data[:start] + patch + data[start + len(patch):]
    elif how == "forge":
        data = forge_size(data, draw(st.integers(0, 3000)), draw(st.integers(0, 3000)))
    elif how == "bomb":
        forged = forge_size(data, draw(bomb_side), draw(bomb_side))
        data, bomb = forged, forged != data
    elif how == "junk":
        data = draw(st.binary(max_size=64)) + data + draw(st.binary(max_size=64))
    elif how == "noise":
        data = draw(st.binary(max_size=256))
    elif how == "empty":
        data = b""
    return (data, bomb) if with_flag else data


# ---- fixtures and checks ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def builders(qwen_tokenizer_dir) -> dict[str, SampleBuilder]:
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    image_processor = EVEImageProcessor(max_size=64)
    return {name: SampleBuilder(EVEProcessor(tokenizer, image_processor, name), BUDGET)
            for name in ("eve", "chatml", "plain")}


GOOD_FILES = {f"{fmt.lower()}_{mode.replace(';', '')}.img": (fmt, mode) for fmt, mode in KINDS}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Image files records can point at: every kind above, broken files, and things that are not files at all."""
    root = tmp_path_factory.mktemp("robust")
    for name, (fmt, mode) in GOOD_FILES.items():
        (root / name).write_bytes(encoded_image(fmt, mode, (37, 23)))
    jpeg = encoded_image("JPEG", "RGB", (64, 64))
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "text.png").write_text("not a PNG")
    (root / "empty.png").write_bytes(b"")
    (root / "bomb.png").write_bytes(forge_size(encoded_image("PNG", "RGB", (8, 8)), 30000, 30000))
    (root / "folder.png").mkdir()
    os.mkfifo(root / "fifo.png")  # reading it would wait forever for a writer
    (root / "zero.png").symlink_to("/dev/zero")  # reading it would never end
    with open(root / "video.jpg", "wb") as sparse:  # 1 GiB (sparse): more than any image under the decode cap
        sparse.truncate(1 << 30)
    return root


@st.composite
def plausible_record(draw) -> dict:
    """Alternating turns (maybe a system turn first), one marker per image, images that decode: often kept.

    Even so a quarter of the texts are anything `long_text` makes (lone surrogates, markers, huge strings), and one
    time in ten the turns are shuffled or the image list loses an entry.
    """
    names = draw(st.lists(st.sampled_from(list(GOOD_FILES)), max_size=2))
    turns = []
    if draw(st.integers(0, 3)) == 0:
        turns.append({"from": "system", "value": draw(turn_text)})
    for turn in range(draw(st.sampled_from([1, 1, 2, 3]))):
        markers = "<image>\n" * len(names) if turn == 0 else ""
        user, assistant = draw(st.sampled_from([("human", "gpt"), ("user", "assistant")]))
        turns.append({"from": user, "value": markers + draw(turn_text)})
        turns.append({"from": assistant, "value": draw(turn_text)})
    entry: dict = {"conversations": turns}
    if names:
        entry["image"] = names[0] if len(names) == 1 and draw(st.booleans()) else names
    mutation = draw(st.integers(0, 9))
    if mutation == 0:
        entry["conversations"] = draw(st.permutations(turns))
    elif mutation == 1 and names:
        entry["image"] = names[1:]
    if draw(st.booleans()):
        entry["id"] = draw(st.integers(0, 9).flatmap(
            lambda k: json_value if k == 0 else st.one_of(text, st.integers())))
    return entry


FILE_NAMES = [*GOOD_FILES, "truncated.jpg", "text.png", "empty.png", "bomb.png", "folder.png", "fifo.png", "zero.png",
              "video.jpg", "missing.png", "a\x00b.png", "\ud800.png", "\udc80.png", "", ".", "..", "/", "x" * 300]
image_name = st.one_of(st.sampled_from(FILE_NAMES), text)
image_field = st.one_of(st.none(), image_name, st.lists(image_name, max_size=3), json_value)
record = st.one_of(
    plausible_record(),
    plausible_record(),  # twice: half of the records have a chance to be kept
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(message, max_size=5), json_value)},
                          optional={"image": image_field, "id": json_value}),
    json_value,
)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_timed(build, *args) -> Sample | SampleError:
    """Build one sample; a `SampleError` is returned (a skip), anything else propagates and fails the test."""
    start = time.perf_counter()
    try:
        result = build(*args)
    except SampleError as err:
        result = err
    elapsed = time.perf_counter() - start
    assert elapsed < MAX_SECONDS, f"one sample took {elapsed:.2f} s"
    return result


def check_outcome(result: Sample | SampleError, builder: SampleBuilder, num_images: int | None = None) -> None:
    """A skip has a known reason and a loggable detail; a kept sample is exactly what packing and the model expect."""
    if currently_in_test_context():  # statistics: pytest --hypothesis-show-statistics
        event("kept" if isinstance(result, Sample) else f"skipped: {result.reason}")
    if isinstance(result, SampleError):
        assert result.reason in REASONS
        skip = Skip(result.reason, "fuzz", str(result))
        skip.detail.encode("utf-8")  # loggable anywhere
        assert len(skip.detail) < 600
        return
    sample = result
    ids, labels = sample.input_ids, sample.labels
    assert ids.dtype == labels.dtype == torch.long
    assert ids.ndim == labels.ndim == 1 and len(ids) == len(labels) > 0
    placeholders = ids == IMAGE_TOKEN_INDEX
    assert int(placeholders.sum()) == len(sample.images)
    if num_images is not None:
        assert len(sample.images) == num_images
    assert (labels[placeholders] == IGNORE_INDEX).all()
    text_ids = ids[~placeholders]
    assert ((text_ids >= 0) & (text_ids < len(builder.processor.tokenizer))).all()
    supervised = labels != IGNORE_INDEX
    assert (labels[supervised] == ids[supervised]).all()
    assert supervised[1:].any(), "no token to learn from (the first label is never a target)"
    for pixels in sample.images:
        assert pixels.ndim == 3 and pixels.shape[0] == 3
        assert pixels.shape[1] % 32 == 0 and pixels.shape[2] % 32 == 0 and min(pixels.shape[1:]) >= 32
        assert pixels.dtype.is_floating_point and bool(pixels.isfinite().all())
    extra = sum(num_image_tokens(p.shape[1], p.shape[2]) - 1 for p in sample.images)
    assert sample.num_tokens == len(ids) + extra <= BUDGET


# ---- the properties --------------------------------------------------------------------------------------------------

@settings(max_examples=examples(150))
@given(entry=record, template=st.sampled_from(["eve", "chatml", "plain"]), ascii_only=st.booleans())
def test_any_jsonl_record_builds_a_well_formed_sample_or_is_a_counted_skip(builders, files, entry, template,
                                                                           ascii_only):
    # ensure_ascii=False with a lone surrogate writes bytes that are not UTF-8: that line must be a skip too
    line = json.dumps(entry, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    path = files / "records.jsonl"
    path.write_bytes(b"\n" + line + b"\n")
    builder = builders[template]
    source = LlavaJsonSource("fuzz", path, builder, image_root=files, shuffle=False)
    result = build_timed(source.build, source.next_item())
    if isinstance(result, Sample):  # then `image` was one path or a list of them
        image = entry.get("image") or []
        check_outcome(result, builder, num_images=1 if isinstance(image, str) else len(image))
    else:
        check_outcome(result, builder)


def test_any_image_bytes_build_a_well_formed_sample_or_are_a_counted_skip(builders, files):
    """As bytes (a shard member) and as a file; with bounded time (deadline) and bounded memory (the bomb guard)."""
    builder = builders["eve"]
    conversation = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A picture."}]
    before = peak_rss_bytes()

    @settings(max_examples=examples(150))
    @given(image=image_bytes(with_flag=True), as_file=st.booleans())
    def check(image: tuple[bytes, bool], as_file: bool) -> None:
        data, bomb = image
        source: Path | bytes = data
        if as_file:
            source = files / "fuzzed.img"
            source.write_bytes(data)
        result = build_timed(builder, RawRecord("fuzz", "fuzz", conversation, [source]))
        check_outcome(result, builder, num_images=1)
        if bomb:
            assert isinstance(result, SampleError) and result.reason == "bad_image"
            assert "decompression bomb" in str(result), result

    check()
    grown = peak_rss_bytes() - before
    assert grown < 1 << 30, f"peak memory grew by {grown / 2**20:.0f} MiB"


def test_every_good_image_kind_is_kept(builders, files):
    """The image kinds the fuzzer starts from are all decodable: the properties above do test kept samples."""
    builder = builders["chatml"]
    for name in GOOD_FILES:
        record = RawRecord(name, "files", [{"from": "human", "value": "<image>\nWhat is this?"},
                                           {"from": "gpt", "value": "A picture."}], [files / name])
        sample = builder(record)
        check_outcome(sample, builder, num_images=1)


@settings(max_examples=examples(40))
@given(members=st.lists(st.fixed_dictionaries({}, optional={
    "txt": st.one_of(text.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=32)),
    "json": st.one_of(record.map(lambda r: json.dumps(r).encode()), st.binary(max_size=32)),
    "png": image_bytes(), "jpg": image_bytes(), "webp": image_bytes(),
}).filter(bool), min_size=1, max_size=4))
def test_any_webdataset_member_builds_a_well_formed_sample_or_is_a_counted_skip(builders, files, members):
    shard = files / "fuzz.tar"
    with wds.TarWriter(str(shard)) as sink:
        for k, member in enumerate(members):
            sink.write({"__key__": f"k{k}", **member})
    builder = builders["plain"]
    source = WebDatasetSource("web", [str(shard)], builder, shuffle_buffer=1)
    for _ in members:
        item = source.next_item()
        if source.epoch:
            break
        check_outcome(build_timed(source.build, item), builder)


# ---- the known crashes, one by one -----------------------------------------------------------------------------------

def one_record_source(files: Path, builder: SampleBuilder, raw: bytes) -> LlavaJsonSource:
    path = files / "one.jsonl"
    path.write_bytes(raw + b"\n")
    return LlavaJsonSource("one", path, builder, image_root=files, shuffle=False)


def qa_line(question: str, answer: str = "An answer.", **fields) -> bytes:
    entry = {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], **fields}
    return json.dumps(entry).encode()


@pytest.mark.parametrize("raw, reason, match", [
    (qa_line("Hi \udc80 there"), "malformed_record", "lone surrogate"),  # was a TypeError from the tokenizer
    (qa_line("<image>\nHi", image="a\x00b.png"), "malformed_record", "NUL"),  # was ValueError: embedded null byte
    (qa_line("<image>\nHi", image="\ud800.png"), "bad_image", "invalid image path"),  # was UnicodeEncodeError
    (qa_line("<image>\nHi", image="fifo.png"), "bad_image", "not a regular file"),  # used to wait forever
    (qa_line("<image>\nHi", image="zero.png"), "bad_image", "not a regular file"),  # used to read until OOM
    (qa_line("<image>\nHi", image="folder.png"), "bad_image", "not a regular file"),
    (qa_line("<image>\nHi", image="video.jpg"), "bad_image", "over the limit"),  # used to be read whole
    (b"[" * 100_000 + b"]" * 100_000, "malformed_record", "nested too deeply"),  # was RecursionError
    (b'{"id": ' + b"9" * 5000 + b"}", "malformed_record", "invalid JSON"),  # was ValueError: int digit limit
    (qa_line("Hi", id=["a", "list"]), "malformed_record", "'id' must be"),
    (json.dumps({"conversations": [{"from": "human", "value": [json.loads("[" * 900 + "]" * 900)]},
                                   {"from": "gpt", "value": "A."}]}).encode(), "malformed_record",
     r"unsupported content part \[\[\[\[\[\[\[\.\.\.\]"),  # quoted short and depth-bounded
    (qa_line("Hi", "x" * 60_000), "too_long", "cannot fit"),  # refused before it is tokenized
    (qa_line("<image>\n" * 200 + "Hi", image=["png_RGB.img"] * 200), "too_long", "200 images"),  # before decoding
], ids=["surrogate", "nul-path", "unencodable-path", "fifo", "dev-zero", "folder", "huge-file", "deep-json", "huge-int",
        "list-id", "deep-part", "huge-text", "many-images"])
def test_each_found_crash_is_now_a_counted_skip(builders, files, raw, reason, match):
    source = one_record_source(files, builders["eve"], raw)
    result = build_timed(source.build, source.next_item())
    assert isinstance(result, SampleError) and result.reason == reason and re.search(match, str(result)), result


def test_a_plain_caption_of_one_token_has_nothing_to_learn(builders, files):
    """plain, no image: the caption "\\n" is token 0, which no position predicts: a skip, not a silent no-op sample."""
    source = one_record_source(files, builders["plain"], qa_line("Hi", ""))
    with pytest.raises(SampleError, match="no supervised tokens") as info:
        source.build(source.next_item())
    assert info.value.reason == "empty_conversation"


def test_a_jsonl_line_that_is_not_utf8_is_one_skip_naming_file_and_line(builders, files):
    path = files / "mixed.jsonl"
    lines = [qa_line("First?"), b"", qa_line("Caf\xe9?").replace(b"\\u00e9", b"\xe9"), qa_line("Third \u2028 line?"),
             qa_line("Caf\u00e9?", "\u00e9").replace(b"\\u00e9", "\u00e9".encode())]
    lines[3] = lines[3].replace(b"\\u2028", "\u2028".encode())  # a raw U+2028 inside a string is valid JSON
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\r\n")  # BOM and CRLF, as Windows tools write
    source = LlavaJsonSource("mixed", path, builders["eve"], image_root=files, shuffle=False)
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append(source.build(source.next_item()).sample_id)
        except SampleError as err:
            outcomes.append((err.reason, str(err)))
    assert outcomes[0] == "mixed:0" and outcomes[2] == "mixed:2" and outcomes[3] == "mixed:3"
    reason, detail = outcomes[1]
    assert reason == "malformed_record" and f"{path} line 3" in detail and "UTF-8" in detail
    assert source.epoch == 0 and len(source.entries) == 4


def test_index_mode_skips_sample_files_it_cannot_read(builders, files):
    """Official index mode: each entry names a per-sample JSON file; an unreadable one is one skip, never a hang."""
    folder = files / "index"
    folder.mkdir(exist_ok=True)
    (folder / "good.json").write_bytes(qa_line("Good?"))
    (folder / "bom.json").write_bytes(b"\xef\xbb\xbf" + qa_line("With a BOM?"))
    (folder / "latin1.json").write_bytes(qa_line("Caf\u00e9?").replace(b"\\u00e9", b"\xe9"))
    if not (folder / "fifo.json").exists():
        os.mkfifo(folder / "fifo.json")
    names = ["good.json", "bom.json", "latin1.json", "fifo.json", "a\x00b.json", "missing.json", ""]
    (folder / "index.json").write_text(json.dumps(names))
    source = LlavaJsonSource("index", folder / "index.json", builders["eve"], shuffle=False)
    outcomes = []
    for _ in names:
        try:
            outcomes.append(source.build(source.next_item()).sample_id)
        except SampleError as err:
            outcomes.append(err.reason)
    assert outcomes == ["good.json", "bom.json"] + ["malformed_record"] * 5  # index mode: ids are file names


def test_skip_details_are_short_and_loggable():
    skip = Skip("malformed_record", "s", "bad \udc80 " + "x" * 10_000)
    assert len(skip.detail) < 600 and "\\udc80" in skip.detail and skip.detail.endswith("(10006 characters)")
