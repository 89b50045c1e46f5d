"""`EVEProcessor`: the tokenizer, the image processor and the chat template that ties them together.

One object serves training (`encode_conversation`: ids + labels) and inference (`__call__`: padded prompts +
images), and both render through the same Jinja template, which is also stored with the tokenizer so that
`tokenizer.apply_chat_template` elsewhere (servers, eval harnesses) produces the same text. It is a transformers
processor: `AutoProcessor` loads it from a model folder and the `image-text-to-text` pipeline drives it.
"""

from __future__ import annotations

import base64
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import BatchFeature, PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_utils import load_image

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


class EVEProcessor(ProcessorMixin):
    """Tokenizer + `EVEImageProcessor` + a named chat template (`plain`, `eve` or `chatml`).

    The tokenizer is updated in place: its `chat_template` becomes the template's Jinja text, and it pads on the left,
    as generation needs (pipelines batch prompts with the tokenizer's padding side).
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, image_processor: EVEImageProcessor, template: str = "eve"
    ) -> None:
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer needs a pad token distinct from eos (Qwen: <|endoftext|> vs <|im_end|>)")
        self.template = get_template(template)
        tokenizer.chat_template = self.template.jinja
        tokenizer.padding_side = "left"
        super().__init__(tokenizer, image_processor, chat_template=self.template.jinja)

    # ----- training -----
    def encode_conversation(self, messages: Conversation, num_images: int,
                            max_tokens: int | None = None) -> EncodedText:
        """Messages (LLaVA or OpenAI/HF style) -> ids with one placeholder per image and answer-only labels.

        With `max_tokens`, a text that cannot fit raises `SampleTooLongError` before it is tokenized.
        """
        return encode_conversation(self.tokenizer, self.template, messages, num_images, max_tokens)

    # ----- inference -----
    def apply_chat_template(  # type: ignore[override]
        self,
        conversation: Conversation | Sequence[Conversation],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: Literal["pt"] | None = None,
        processor_kwargs: dict[str, Any] | None = None,
    ) -> str | list[str] | torch.Tensor | BatchFeature:
        """Render one conversation (or a list of them) exactly as training renders it, `<image>` markers included.

        transformers' signature and message forms: content as a string or a list of parts (`{"type": "text"}`, and
        `{"type": "image"}` carrying its image under `image`, `url`, `path` or `base64`, or OpenAI `image_url`), or
        LLaVA `from`/`value` messages. With `tokenize`, the images named in the parts are loaded and the prompts
        encoded by `__call__` (`processor_kwargs` go there): `input_ids`, or the whole batch with `return_dict`.
        `continue_final_message` leaves the final assistant message open for the model to continue (no generation
        prompt is added then).
        """
        conversations, batched = self._normalize_conversations(conversation)
        prompts = [self._render(messages, add_generation_prompt, continue_final_message) for messages in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [image for messages in conversations for image in _content_images(messages)]
        batch = self(prompts, images=images or None, return_tensors=return_tensors, **(processor_kwargs or {}))
        return batch if return_dict else batch["input_ids"]

    def _render(self, messages: Conversation, add_generation_prompt: bool, continue_final_message: bool) -> str:
        normalized = normalize_messages(messages)
        if not continue_final_message:
            return render(self.template, normalized, add_generation_prompt)[0]
        text = render(self.template, normalized)[0]
        final = normalized[-1]["content"].strip()  # the templates may trim it
        return text[:text.rindex(final) + len(final)]

    def __call__(  # type: ignore[override]
        self,
        text: str | Conversation | Sequence[str] | Sequence[Conversation],
        images: Any = None,
        add_generation_prompt: bool = True,
        padding_side: Literal["left", "right"] = "left",
        return_tensors: Literal["pt"] | None = None,
    ) -> BatchFeature:
        """Prompts (raw text with `<image>` markers, or conversations) -> BatchFeature(input_ids, attention_mask, ...).

        `images` is one image, a flat list in row-major order over the batch, or one list per row; an image is a PIL
        image, a file path, encoded bytes, or an http(s) or data URL. They come back as a list of normalised
        [3, H, W] tensors under `images`; with `return_tensors="pt"` (transformers' convention: every value one
        tensor) as `pixel_values` + `image_sizes` instead (see `pack_images`), which the model takes as well. Left
        padding suits generation: every row ends at its last prompt token.
        """
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        prompts = [
            row if isinstance(row, str) else self.apply_chat_template(row, add_generation_prompt)
            for row in _as_batch(text)
        ]
        flat_images = [_fetch(image) for image in _flatten_images(images)]
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
        pixels = self.image_processor(flat_images)["pixel_values"] if flat_images else []
        data = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_tensors is None:
            return BatchFeature(data={**data, "images": pixels})
        pixel_values, image_sizes = pack_images(pixels, self.image_processor.unit)
        return BatchFeature(data={**data, "pixel_values": pixel_values, "image_sizes": image_sizes})

    def decode(self, token_ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True, **kwargs: Any) -> str:
        """Decode one sequence; image placeholders and ignore ids (negative) are dropped."""
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=skip_special_tokens, **kwargs)

    def batch_decode(self, sequences: Sequence[Sequence[int]] | torch.Tensor, **kwargs: Any) -> list[str]:
        return [self.decode(row, **kwargs) for row in sequences]

    def post_process_image_text_to_text(self, generated_outputs: torch.Tensor, skip_special_tokens: bool = True,
                                        **kwargs: Any) -> list[str]:
        """What the pipeline decodes: `generate`'s rows, whose prompt part holds image placeholders (negative ids)."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    # ----- persistence -----
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> EVEProcessor:
        """transformers' loader. Keywords naming `EVEImageProcessor` fields (e.g. `max_size`, `resize_policy`) replace
        the saved values in the image processor alone: the tokenizer would keep them as init arguments and save them."""
        fields = inspect.signature(EVEImageProcessor).parameters.keys() - {"kwargs"}
        overrides = {key: kwargs.pop(key) for key in fields & kwargs.keys()}
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if overrides:
            processor.image_processor = EVEImageProcessor(**{**processor.image_processor.to_dict(), **overrides})
        return processor

    def to_dict(self) -> dict[str, Any]:
        """`processor_config.json` names the template; the tokenizer's Jinja text follows from it."""
        return {**super().to_dict(), "template": self.template.name}


def pack_images(images: Sequence[torch.Tensor], unit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, H, W] images (sides multiples of `unit`) -> (`pixel_values`, `image_sizes`), one tensor each.

    `pixel_values` (P, 3 * unit * unit) holds every image's unit x unit patches (one image token each), row-major
    and image after image; `image_sizes` (N, 2) each image's (H, W). This is transformers' form for images of
    different sizes (Qwen2-VL's patches + grid): batches of any sizes concatenate, which is how pipelines batch.
    `EVEModel.image_inputs` inverts it.
    """
    patches = [image.reshape(3, image.shape[1] // unit, unit, image.shape[2] // unit, unit).permute(1, 3, 0, 2, 4)
               .reshape(-1, 3 * unit * unit) for image in images]  # (gh * gw, 3 * unit * unit) per image
    pixel_values = torch.cat(patches) if patches else torch.zeros(0, 3 * unit * unit)
    image_sizes = torch.tensor([list(image.shape[1:]) for image in images], dtype=torch.long).reshape(-1, 2)
    return pixel_values, image_sizes


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


def _content_images(messages: Conversation) -> list[Any]:
    """The image of every `{"type": "image"}` part that carries one, in order, under transformers' keys (`base64` is
    raw base64 text). Bare parts (`{"type": "image"}`, whose images go to `__call__` separately) name none."""
    images = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            key = next((k for k in ("image", "url", "path", "base64") if k in part), None)
            if part.get("type") == "image" and key is not None:
                images.append(base64.b64decode(part[key]) if key == "base64" else part[key])
    return images


def _fetch(image: Any) -> Any:
    """http(s) and data URLs are fetched the transformers way; anything else goes to `EVEImageProcessor`'s own loader
    (pixel cap checked before decoding, EXIF orientation, any mode to RGB)."""
    if isinstance(image, str) and image.startswith(("http://", "https://", "data:")):
        return load_image(image)
    return image
