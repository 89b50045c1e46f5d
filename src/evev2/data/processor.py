"""`EVEProcessor`: the tokenizer, the image processor and the chat template that ties them together.

One object serves training (`encode_conversation`: ids + labels) and inference (`__call__`: padded prompts +
images), and both render through the same Jinja template, which is also stored with the tokenizer so that
`tokenizer.apply_chat_template` elsewhere (servers, eval harnesses) produces the same text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase

from evev2.data.errors import ImageCountMismatchError
from evev2.data.image_processing import EVEImageProcessor
from evev2.data.templates import (
    IMAGE_MARKER,
    EncodedText,
    encode_conversation,
    get_template,
    normalize_messages,
    render,
    tokenize_with_labels,
)

PROCESSOR_CONFIG_NAME = "processor_config.json"

Conversation = Sequence[Mapping[str, Any]]


class EVEProcessor:
    """Tokenizer + `EVEImageProcessor` + a named chat template (`plain`, `eve` or `chatml`).

    The tokenizer's `chat_template` is set to the template's Jinja text (the tokenizer object is updated in place).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, image_processor: EVEImageProcessor, template: str = "eve"
    ) -> None:
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer needs a pad token distinct from eos (Qwen: <|endoftext|> vs <|im_end|>)")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = get_template(template)
        tokenizer.chat_template = self.template.jinja

    # ----- training -----
    def encode_conversation(self, messages: Conversation, num_images: int,
                            max_tokens: int | None = None) -> EncodedText:
        """Messages (LLaVA or OpenAI/HF style) -> ids with one placeholder per image and answer-only labels.

        With `max_tokens`, a text that cannot fit raises `SampleTooLongError` before it is tokenized.
        """
        return encode_conversation(self.tokenizer, self.template, messages, num_images, max_tokens)

    # ----- inference -----
    def apply_chat_template(self, messages: Conversation, add_generation_prompt: bool = True) -> str:
        """Render a conversation as prompt text (with `<image>` markers), exactly as training renders it."""
        return render(self.template, normalize_messages(messages), add_generation_prompt)[0]

    def __call__(
        self,
        text: str | Conversation | Sequence[str] | Sequence[Conversation],
        images: Image.Image | Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        padding_side: Literal["left", "right"] = "left",
    ) -> BatchFeature:
        """Prompts (raw text with `<image>` markers, or conversations) -> BatchFeature(input_ids, attention_mask, images).

        `images` is one image, a flat list in row-major order over the batch, or one list per row. Left padding
        suits generation: every row ends at its last prompt token.
        """
        prompts = [
            row if isinstance(row, str) else self.apply_chat_template(row, add_generation_prompt)
            for row in _as_batch(text)
        ]
        flat_images = _flatten_images(images)
        markers = sum(prompt.count(IMAGE_MARKER) for prompt in prompts)
        if markers != len(flat_images):
            raise ImageCountMismatchError(f"{markers} <image> markers but {len(flat_images)} images")
        rows = [tokenize_with_labels(self.tokenizer, prompt, []).input_ids for prompt in prompts]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        pixel_values = self.image_processor(flat_images)["pixel_values"] if flat_images else []
        return BatchFeature(data={"input_ids": input_ids, "attention_mask": attention_mask, "images": pixel_values})

    def decode(self, token_ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Decode one sequence; image placeholders and ignore ids (negative) are dropped."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, **kwargs: Any) -> list[str]:
        return [self.decode(row, **kwargs) for row in sequences]

    # ----- persistence -----
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer (with the chat template), `preprocessor_config.json` and `processor_config.json`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)
        write_processor_config(directory, self.template.name)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **image_processor_overrides: Any) -> EVEProcessor:
        """Load what `save_pretrained` wrote; `image_processor_overrides` (e.g. resize_policy) replace saved fields."""
        directory = Path(directory)
        config = json.loads((directory / PROCESSOR_CONFIG_NAME).read_text())
        tokenizer = AutoTokenizer.from_pretrained(directory)
        image_processor = EVEImageProcessor.from_pretrained(directory, **image_processor_overrides)
        return cls(tokenizer, image_processor, template=config["template"])


def write_processor_config(directory: str | Path, template: str) -> None:
    """`processor_config.json`: which chat template a model folder's processor uses."""
    config = {"processor_class": EVEProcessor.__name__, "template": get_template(template).name}
    (Path(directory) / PROCESSOR_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def _as_batch(text: Any) -> list[str | Conversation]:
    """A str or one conversation is a batch of one; a list of those is a batch."""
    if isinstance(text, str):
        return [text]
    if isinstance(text, Sequence) and text and isinstance(text[0], Mapping):
        return [text]
    if isinstance(text, Sequence) and text and all(isinstance(row, (str, Sequence)) for row in text):
        return list(text)
    raise ValueError("text must be a string, a conversation (list of messages) or a non-empty list of either")


def _flatten_images(images: Any) -> list[Any]:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    return [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
