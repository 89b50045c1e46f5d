"""Chat templates and loss labels.

A template is a Jinja chat template (the same text is stored with the tokenizer, so `apply_chat_template` at
inference renders exactly what training saw). Supervised text is wrapped in `{% generation %}` blocks;
`transformers.render_jinja_template` reports their character spans, and the labels are derived from the fast
tokenizer's offset mapping against those spans. Any disagreement raises `TemplateMismatchError`: a sample is never
masked silently.

Images follow the official rule: the rendered text is split on `"<image>"`, each chunk is tokenized on its own (Qwen has
no BOS), and the chunks are joined with one placeholder id (`IMAGE_TOKEN_INDEX`) per image.
"""

from __future__ import annotations

import reprlib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from evev2.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from evev2.data.errors import (
    EmptyConversationError,
    ImageCountMismatchError,
    MalformedRecordError,
    SampleTooLongError,
    TemplateMismatchError,
)

IMAGE_MARKER = "<image>"

EVE_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHATML_SYSTEM_PROMPT = "You are a helpful assistant."

# LLaVA `from` values and OpenAI/HF roles -> the roles the templates understand.
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Pretraining: the human turn is dropped (only its images survive), loss on caption + "\n".
_PLAIN_JINJA = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}"
    "{{ '<image>' * message.content.count('<image>') }}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- generation -%}{{ (message.content | trim) + '\\n' }}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# Official SFT format (Vicuna roles, `<|im_end|>` closes each answer). Images move to the front of their message,
# each followed by "\n" (official `preprocess_multimodal`). The supervised span starts right after "ASSISTANT:" so the
# space that Qwen's BPE glues to the first answer word belongs to it; it ends with `<|im_end|>`.
_EVE_JINJA = (
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{ messages[0].content }}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{{ '" + EVE_SYSTEM_PROMPT.replace("'", "\\'") + "' }}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{{ ' ' }}"
    "{%- for message in turns -%}"
    "{%- if message.role == 'user' -%}"
    "{%- set n_images = message.content.count('<image>') -%}"
    "{%- if n_images > 0 -%}"
    "{{ 'USER: ' + (('<image>\\n' * n_images) + (message.content.replace('<image>', '') | trim)) | trim + ' ' }}"
    "{%- else -%}"
    "{{ 'USER: ' + message.content + ' ' }}"
    "{%- endif -%}"
    "{%- else -%}"
    "{{ 'ASSISTANT:' }}{%- generation -%}{{ ' ' + message.content + '<|im_end|>' }}{%- endgeneration -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Native Qwen2.5 ChatML. Assistant text is trimmed (a leading "\n" would merge with the header's "\n" into one token)
# and supervised together with its `<|im_end|>`; the "\n" after `<|im_end|>` is NOT supervised: generation stops at
# `<|im_end|>` (eos), so the model never has to produce it.
_CHATML_JINJA = (
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- set turns = messages[1:] -%}"
    "{%- else -%}"
    "{{ '<|im_start|>system\\n" + CHATML_SYSTEM_PROMPT + "<|im_end|>\\n' }}{%- set turns = messages -%}"
    "{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if message.role == 'user' -%}"
    "{{ '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ (message.content | trim) + '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """A named Jinja chat template plus the conversation shapes it accepts."""

    name: str
    jinja: str
    allows_system: bool
    single_turn: bool  # `plain` takes exactly one user turn and one caption


TEMPLATES: dict[str, ChatTemplate] = {
    "plain": ChatTemplate("plain", _PLAIN_JINJA, allows_system=False, single_turn=True),
    "eve": ChatTemplate("eve", _EVE_JINJA, allows_system=True, single_turn=False),
    "chatml": ChatTemplate("chatml", _CHATML_JINJA, allows_system=True, single_turn=False),
}


@dataclass
class EncodedText:
    """Token ids with one `IMAGE_TOKEN_INDEX` per image, and labels aligned with them (`IGNORE_INDEX` = no loss)."""

    input_ids: list[int]
    labels: list[int]


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def _content_text(content: object) -> str:
    """Flatten string or OpenAI/HF part-list content to text with one `<image>` marker per image part."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MalformedRecordError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind in ("image", "image_url"):
            pieces.append(IMAGE_MARKER)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise MalformedRecordError(f"unsupported content part {reprlib.repr(part)}")  # short, depth-bounded
    return "".join(pieces)


def normalize_messages(messages: Sequence[Mapping]) -> list[dict[str, str]]:
    """Accept OpenAI/HF (`role`/`content`) or LLaVA (`from`/`value`) messages; return `{role, content: str}` in NFC.

    NFC matters because the Qwen tokenizer normalizes to NFC: without it, decode(encode(text)) != text.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise MalformedRecordError("a conversation must be a list of messages")
    normalized = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise MalformedRecordError(f"a message must be a mapping, got {type(message).__name__}")
        raw_role, content = (
            (message.get("role"), message.get("content")) if "role" in message else (message.get("from"), message.get("value"))
        )
        role = _ROLE_ALIASES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise MalformedRecordError(f"unknown role {reprlib.repr(raw_role)}")
        normalized.append({"role": role, "content": unicodedata.normalize("NFC", _content_text(content))})
    return normalized


def check_roles(template: ChatTemplate, messages: list[dict[str, str]], add_generation_prompt: bool) -> None:
    """Roles must be: optional system, then user/assistant alternating from user; training ends on an assistant."""
    turns = messages
    if turns and turns[0]["role"] == "system":
        if not template.allows_system:
            raise MalformedRecordError(f"template {template.name!r} takes no system message")
        turns = turns[1:]
    if not any(m["role"] == "assistant" for m in turns) and not add_generation_prompt:
        raise EmptyConversationError("the conversation has no assistant turn")
    if not turns:
        raise EmptyConversationError("the conversation has no turns")
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise MalformedRecordError(f"turn {i} is {message['role']!r}, expected {expected!r}")
    last = turns[-1]["role"]
    if add_generation_prompt and last != "user":
        raise MalformedRecordError("a generation prompt must end with a user turn")
    if template.single_turn and len(turns) != (1 if add_generation_prompt else 2):
        raise MalformedRecordError(f"template {template.name!r} takes exactly one user turn and one answer")


def render(
    template: ChatTemplate, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """Render normalized messages; return the text and the character spans of its supervised segments."""
    check_roles(template, messages, add_generation_prompt)
    texts, spans = render_jinja_template(
        conversations=[messages],
        chat_template=template.jinja,
        return_assistant_tokens_mask=True,
        add_generation_prompt=add_generation_prompt,
    )
    return texts[0], [tuple(span) for span in spans[0]]


def tokenize_with_labels(
    tokenizer: PreTrainedTokenizerBase, text: str, supervised_spans: Sequence[tuple[int, int]]
) -> EncodedText:
    """Tokenize `text` chunk by chunk around `<image>` and label each token from its character offsets.

    A token inside a supervised span keeps its id as label; one outside gets `IGNORE_INDEX`; one that crosses a span
    edge, an `<image>` inside a span, a gap in the offsets or a chunk that does not decode back to itself raises
    `TemplateMismatchError`.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # the tokenizer would fail with a TypeError that names nothing
        raise MalformedRecordError(
            f"the text holds a lone surrogate {text[err.start]!r} at character {err.start} (not valid Unicode)"
        ) from err
    supervised = np.zeros(len(text), dtype=np.int64)  # (chars,) 1 = supervised
    for start, end in supervised_spans:
        supervised[start:end] = 1
    prefix = np.concatenate([[0], np.cumsum(supervised)])  # (chars + 1,) supervised chars before each position
    chunks = text.split(IMAGE_MARKER)
    encoded = tokenizer(chunks, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = []
    labels: list[int] = []
    chunk_start = 0
    for index, (chunk, chunk_ids, offsets) in enumerate(zip(chunks, encoded["input_ids"], encoded["offset_mapping"])):
        if index:
            if prefix[chunk_start] - prefix[chunk_start - len(IMAGE_MARKER)]:
                raise TemplateMismatchError("an <image> marker lies inside a supervised (answer) span")
            input_ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
        _check_chunk_tokens(tokenizer, chunk, chunk_ids, offsets)
        if chunk_ids:
            bounds = np.asarray(offsets, dtype=np.int64) + chunk_start  # (tokens, 2) global char span per token
            covered = prefix[bounds[:, 1]] - prefix[bounds[:, 0]]
            full = covered == bounds[:, 1] - bounds[:, 0]
            if np.any((covered > 0) & ~full):
                bad = int(np.argmax((covered > 0) & ~full))
                raise TemplateMismatchError(
                    f"token {tokenizer.decode([chunk_ids[bad]])!r} straddles a supervised/unsupervised boundary"
                )
            input_ids.extend(chunk_ids)
            labels.extend(t if keep else IGNORE_INDEX for t, keep in zip(chunk_ids, full.tolist()))
        chunk_start += len(chunk) + len(IMAGE_MARKER)
    return EncodedText(input_ids, labels)


def _check_chunk_tokens(tokenizer: PreTrainedTokenizerBase, chunk: str, ids: list[int], offsets) -> None:
    """The tokens must tile the chunk (byte-level pieces of one character share its offsets) and decode to it."""
    cursor = 0
    for start, end in offsets:
        if start > cursor:
            raise TemplateMismatchError(f"tokenizer offsets leave a gap at character {cursor} of {chunk[:40]!r}")
        cursor = max(cursor, end)
    if cursor != len(chunk) or tokenizer.decode(ids, skip_special_tokens=False) != chunk:
        raise TemplateMismatchError(f"tokens do not decode back to the rendered text {chunk[:40]!r}...")


def max_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most characters one token can cover: so `len(text) / max_token_chars` tokens is a lower bound.

    Byte-level vocabulary entries hold one character per byte, so their length bounds the text they decode to.
    """
    cached = _MAX_TOKEN_CHARS.get(id(tokenizer))
    if cached is None or cached[0] is not tokenizer:
        cached = _MAX_TOKEN_CHARS[id(tokenizer)] = (tokenizer, max(map(len, tokenizer.get_vocab())))
    return cached[1]


_MAX_TOKEN_CHARS: dict[int, tuple[PreTrainedTokenizerBase, int]] = {}


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate,
    messages: Sequence[Mapping],
    num_images: int,
    max_tokens: int | None = None,
) -> EncodedText:
    """Training path: messages -> ids with placeholders + labels on the answers only.

    With `max_tokens`, a text that cannot fit in that many tokens raises `SampleTooLongError` before it is
    tokenized, so a record with a huge string costs no more than one that fits.
    """
    normalized = normalize_messages(messages)
    text, spans = render(template, normalized)
    found = text.count(IMAGE_MARKER)
    if found != num_images:
        raise ImageCountMismatchError(f"{found} <image> markers but {num_images} images")
    if max_tokens is not None and len(text) > max_tokens * max_token_chars(tokenizer):
        raise SampleTooLongError(f"{len(text)} characters of text cannot fit in {max_tokens} tokens")
    encoded = tokenize_with_labels(tokenizer, text, spans)
    # The first label is never a target: the loss predicts token t + 1 from position t.
    if all(label == IGNORE_INDEX for label in encoded.labels[1:]):
        raise EmptyConversationError("no supervised tokens")
    return encoded
