"""Chat templates, labels and the processor, with the real Qwen2 tokenizer."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from evev2.data.errors import (
    EmptyConversationError,
    ImageCountMismatchError,
    MalformedRecordError,
    TemplateMismatchError,
)
from evev2.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from evev2.data.image_processing import EVEImageProcessor
from evev2.data.processor import EVEProcessor
from evev2.data.templates import (
    CHATML_SYSTEM_PROMPT,
    EVE_SYSTEM_PROMPT,
    encode_conversation,
    get_template,
    normalize_messages,
    render,
    tokenize_with_labels,
)

SYS = EVE_SYSTEM_PROMPT
TWO_TURNS = [
    {"from": "human", "value": "What is in the picture?\n<image>"},
    {"from": "gpt", "value": "A red square next to 3 blue circles."},
    {"from": "human", "value": "图里有几个圆？"},
    {"from": "gpt", "value": "有三个圆。"},
]


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def supervised_text(tokenizer, encoded) -> list[str]:
    """Decode each maximal run of supervised labels separately."""
    runs, current = [], []
    for label in encoded.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_plain_renders_official_pretraining_text(tokenizer):
    conv = [{"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "  A cat sleeps.  "}]
    text, _ = render(get_template("plain"), normalize_messages(conv))
    assert text == "<image>A cat sleeps.\n"
    encoded = encode_conversation(tokenizer, get_template("plain"), conv, num_images=1)
    assert encoded.input_ids[0] == IMAGE_TOKEN_INDEX and encoded.labels[0] == IGNORE_INDEX
    assert encoded.labels[1:] == encoded.input_ids[1:]  # only the placeholder is masked
    assert tokenizer.decode(encoded.input_ids[1:]) == "A cat sleeps.\n"


def test_eve_renders_official_sft_text_byte_exact(tokenizer):
    text, _ = render(get_template("eve"), normalize_messages(TWO_TURNS))
    expected = (
        f"{SYS} USER: <image>\nWhat is in the picture? ASSISTANT: A red square next to 3 blue circles.<|im_end|>"
        "USER: 图里有几个圆？ ASSISTANT: 有三个圆。<|im_end|>"
    )
    assert text == expected
    prompt, _ = render(get_template("eve"), normalize_messages(TWO_TURNS[:3]), add_generation_prompt=True)
    assert prompt.endswith("USER: 图里有几个圆？ ASSISTANT:") and expected.startswith(prompt)


def test_eve_labels_cover_exactly_the_answers(tokenizer):
    encoded = encode_conversation(tokenizer, get_template("eve"), TWO_TURNS, num_images=1)
    assert supervised_text(tokenizer, encoded) == [
        " A red square next to 3 blue circles.<|im_end|>",
        " 有三个圆。<|im_end|>",
    ]
    assert encoded.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    text, _ = render(get_template("eve"), normalize_messages(TWO_TURNS))
    assert tokenizer.decode([i for i in encoded.input_ids if i >= 0]) == text.replace("<image>", "")


def test_chatml_renders_and_supervises_answer_and_im_end_only(tokenizer):
    text, _ = render(get_template("chatml"), normalize_messages(TWO_TURNS))
    assert text == (
        f"<|im_start|>system\n{CHATML_SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\nWhat is in the picture?\n<image><|im_end|>\n"
        "<|im_start|>assistant\nA red square next to 3 blue circles.<|im_end|>\n"
        "<|im_start|>user\n图里有几个圆？<|im_end|>\n"
        "<|im_start|>assistant\n有三个圆。<|im_end|>\n"
    )
    encoded = encode_conversation(tokenizer, get_template("chatml"), TWO_TURNS, num_images=1)
    assert supervised_text(tokenizer, encoded) == ["A red square next to 3 blue circles.<|im_end|>", "有三个圆。<|im_end|>"]
    assert encoded.labels[-1] == IGNORE_INDEX  # the trailing "\n" is not supervised


def test_openai_style_messages_and_multi_image_move_to_front(tokenizer):
    conv = [
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                     {"type": "text", "text": " and "}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Both are squares."}]},
    ]
    text, _ = render(get_template("eve"), normalize_messages(conv))
    assert text == f"{SYS} USER: <image>\n<image>\nCompare  and ASSISTANT: Both are squares.<|im_end|>"
    encoded = encode_conversation(tokenizer, get_template("eve"), conv, num_images=2)
    assert encoded.input_ids.count(IMAGE_TOKEN_INDEX) == 2
    assert all(l == IGNORE_INDEX for i, l in zip(encoded.input_ids, encoded.labels) if i == IMAGE_TOKEN_INDEX)
    llava = [{"from": "human", "value": "Compare <image> and <image>"}, {"from": "gpt", "value": "Both are squares."}]
    assert encode_conversation(tokenizer, get_template("eve"), llava, 2).input_ids == encoded.input_ids


@pytest.mark.parametrize("name", ["plain", "eve", "chatml"])
def test_random_conversations_label_exactly_the_supervised_spans(tokenizer, name):
    """Random mixed-script answers (digits, punctuation, spaces, newlines): labels always match the spans."""
    rng = random.Random(7)
    pool = ["cat", " dog", "42", "3.14", "你好", "世界", "é", "!!", "...", "\n", "  ", "(x)", "🙂", "ASSISTANT", ":"]
    template = get_template(name)
    for _ in range(30):
        turns = 1 if template.single_turn else rng.randint(1, 3)
        conv = []
        for t in range(turns):
            question = "".join(rng.choice(pool) for _ in range(rng.randint(1, 6)))
            conv.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + question})
            conv.append({"from": "gpt", "value": "".join(rng.choice(pool) for _ in range(rng.randint(1, 8))) + "x"})
        text, spans = render(template, normalize_messages(conv))
        encoded = encode_conversation(tokenizer, template, conv, num_images=1)
        assert supervised_text(tokenizer, encoded) == [text[a:b] for a, b in spans]


def test_mismatches_raise_instead_of_masking(tokenizer):
    with pytest.raises(TemplateMismatchError, match="straddles"):
        tokenize_with_labels(tokenizer, "Hello world", [(0, 8)])  # boundary inside the token " world"
    with pytest.raises(TemplateMismatchError, match="inside a supervised"):
        encode_conversation(tokenizer, get_template("eve"),
                            [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "see <image>"}], num_images=1)
    with pytest.raises(ImageCountMismatchError):
        encode_conversation(tokenizer, get_template("eve"), TWO_TURNS, num_images=2)
    with pytest.raises(EmptyConversationError):
        encode_conversation(tokenizer, get_template("eve"), [], num_images=0)
    with pytest.raises(MalformedRecordError):
        encode_conversation(tokenizer, get_template("eve"), [{"from": "gpt", "value": "a"}], num_images=0)
    with pytest.raises(MalformedRecordError):
        encode_conversation(tokenizer, get_template("plain"), TWO_TURNS, num_images=1)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return EVEProcessor(tokenizer, EVEImageProcessor(max_size=64), template="eve")


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_processor_batch_is_left_padded_with_images_in_row_major_order(processor, tokenizer):
    conv_a = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    conv_b = [{"from": "human", "value": "<image>\n<image>\nA much longer question about both of these pictures?"}]
    images = [random_image(1, (64, 32)), random_image(2, (32, 32)), random_image(3, (96, 64))]
    batch = processor([conv_a, conv_b], images=images)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert (ids == IMAGE_TOKEN_INDEX).sum(dim=1).tolist() == [1, 2]
    assert mask[:, -1].tolist() == [1, 1] and mask[0, 0] == 0  # left padding
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert [tuple(p.shape[1:]) for p in batch["images"]] == [(32, 64), (32, 32), (64, 64)]
    prompt = processor.decode(ids[0], skip_special_tokens=False)
    assert prompt.endswith("USER: \nWhat is it? ASSISTANT:") and "<|endoftext|>" in prompt
    with pytest.raises(ImageCountMismatchError):
        processor([conv_a, conv_b], images=images[:2])


def test_processor_round_trips_and_tokenizer_uses_the_same_template(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = EVEProcessor.from_pretrained(tmp_path)
    assert loaded.template.name == "eve" and loaded.image_processor.max_size == 64
    messages = [{"role": "user", "content": "<image>\nHi there"}]
    expected = processor.apply_chat_template(messages)
    assert loaded.tokenizer.apply_chat_template(normalize_messages(messages), tokenize=False,
                                                add_generation_prompt=True) == expected
    assert loaded.encode_conversation(TWO_TURNS, 1).labels == processor.encode_conversation(TWO_TURNS, 1).labels
    ids = torch.tensor([IMAGE_TOKEN_INDEX] + processor.tokenizer.encode("Hi") + [IGNORE_INDEX])
    assert loaded.decode(ids) == "Hi"
