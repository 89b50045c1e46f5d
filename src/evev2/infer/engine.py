"""The one inference path: chat CLI, server, eval and recap all generate through `InferenceEngine`.

A request is first *prepared* (images loaded within limits, prompt rendered with the model's chat template, token
budget checked): everything that can be wrong with a request fails there, with an `InvalidRequestError`, before any
compute is spent. Prepared prompts are then *submitted* to the engine's continuous batcher (`batcher.py`), which
runs every prompt submitted by anyone (server requests, eval batches, chat turns) in one running batch: a prompt
joins at the next decode step after its prefill and leaves as soon as it is done, each row with its own sampling
parameters, stop strings, length cap and cancellation flag (see `decoding.py`).
"""

from __future__ import annotations

import math
import queue
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from evev2.constants import IMAGE_TOKEN_INDEX
from evev2.data.errors import SampleError
from evev2.data.image_processing import num_image_tokens
from evev2.data.processor import EVEProcessor
from evev2.infer.batcher import BatchStats, ContinuousBatcher, GenerationResult
from evev2.infer.decoding import RowControl
from evev2.infer.errors import ContextLengthError, InvalidRequestError
from evev2.infer.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ImageInput, ImageLimits, load_image
from evev2.infer.quantize import quantize_weights
from evev2.model import EVEForCausalLM

DEFAULT_MAX_IMAGES = 8
DEFAULT_MAX_BATCH_SIZE = 32
MAX_STOP_STRINGS = 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class GenerationRequest:
    """One conversation to continue.

    `messages` are OpenAI/HF style (`{"role", "content": [{"type": "image"}, {"type": "text", "text": ...}]}`) or
    LLaVA style (`{"from", "value"}` with `<image>` markers); `images` fill the image slots in order.
    `temperature` 0 means greedy.
    """

    messages: list[dict[str, Any]]
    images: list[ImageInput] = field(default_factory=list)
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)


#: What evaluation, re-captioning and the demo need of a model: requests in, results out, in order (an
#: `InferenceEngine.generate`, or a scripted stand-in in tests).
Generate = Callable[[list[GenerationRequest]], list[GenerationResult]]


@dataclass
class PreparedPrompt:
    request: GenerationRequest
    input_ids: torch.Tensor  # (T,) long, one IMAGE_TOKEN_INDEX per image
    images: list[torch.Tensor]  # normalised [3, H, W] per image, in placeholder order
    prompt_tokens: int


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None
                         ) -> tuple[torch.device, torch.dtype]:
    """Defaults: cuda + bfloat16 when a GPU is present, else cpu + float32 (CPU bf16 matmuls are slow)."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    return device, dtype


class InferenceEngine:
    """A loaded model + processor that answers `GenerationRequest`s, batched or streamed.

    `max_batch_size` bounds the rows decoding at once; more prompts wait for a row to finish. `compile` (default: on
    for CUDA, off for CPU) runs decode steps as compiled CUDA graphs over a static KV cache and compiles the prefill
    (see `batcher.py`).
    """

    def __init__(
        self,
        model: EVEForCausalLM,
        processor: EVEProcessor,
        image_limits: ImageLimits = ImageLimits(),
        max_images: int = DEFAULT_MAX_IMAGES,
        eos_token_ids: set[int] | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        compile: bool | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_limits = image_limits
        self.max_images = max_images
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else self._default_eos_ids()
        compile = self.model.device.type == "cuda" if compile is None else compile
        self.batcher = ContinuousBatcher(self.model, self.tokenizer, self.eos_token_ids, max_batch_size, compile)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        template: str | None = None,
        allow_remote_images: bool = False,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_images: int = DEFAULT_MAX_IMAGES,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        quantize: str | None = None,
        compile: bool | None = None,
    ) -> InferenceEngine:
        """Load a model folder (weights + `EVEProcessor.save_pretrained` files); `template` overrides its template.

        `quantize="int8"` stores every decoder linear weight (text and vision copies) as int8 (`quantize.py`).
        """
        device, dtype = resolve_device_dtype(device, dtype)
        processor = EVEProcessor.from_pretrained(path)
        if template is not None:
            processor = EVEProcessor(processor.tokenizer, processor.image_processor, template=template)
        model = EVEForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        if quantize is not None:
            quantize_weights(model, quantize)
        limits = ImageLimits(max_pixels=max_pixels, max_bytes=max_image_bytes, allow_remote=allow_remote_images)
        return cls(model, processor, limits, max_images, max_batch_size=max_batch_size, compile=compile)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_window(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def _default_eos_ids(self) -> set[int]:
        """The tokenizer's EOS plus the chat terminators (`<|im_end|>` ends every official answer)."""
        ids = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return {i for i in ids if i is not None}

    # ----- preparing -----
    def prepare(self, request: GenerationRequest) -> PreparedPrompt:
        """Validate a request, load its images and render its prompt; raises `InvalidRequestError` if it cannot run."""
        _check_parameters(request)
        if len(request.images) > self.max_images:
            raise InvalidRequestError(f"{len(request.images)} images in one request; the limit is {self.max_images}",
                                      param="images")
        pil_images = [load_image(image, self.image_limits) for image in request.images]
        try:
            batch = self.processor(request.messages, images=pil_images or None)
        except SampleError as err:
            raise InvalidRequestError(str(err), param="messages") from err
        input_ids = batch["input_ids"][0]  # (T,): a batch of one has no padding
        images = list(batch["images"])
        unit = self.model.config.image_pixels_per_token
        image_tokens = sum(num_image_tokens(*image.shape[1:], unit=unit) for image in images)
        prompt_tokens = int((input_ids != IMAGE_TOKEN_INDEX).sum()) + image_tokens
        if prompt_tokens + request.max_new_tokens > self.context_window:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens ({image_tokens} of them image tokens) and "
                f"{request.max_new_tokens} new tokens were requested: {prompt_tokens + request.max_new_tokens} > the "
                f"context window of {self.context_window}", param="max_tokens")
        return PreparedPrompt(request, input_ids, images, prompt_tokens)

    @property
    def stats(self) -> BatchStats:
        return self.batcher.stats

    # ----- running -----
    def submit(self, prompts: list[PreparedPrompt], controls: list[RowControl] | None = None) -> list[Future]:
        """Queue prepared prompts for the running batch; each future resolves to its `GenerationResult`.

        `controls` stream each row's text deltas and cancel rows. A future cancelled before its prompt starts is
        never run.
        """
        return self.batcher.submit(prompts, controls or [RowControl() for _ in prompts])

    def run(self, prompts: list[PreparedPrompt], controls: list[RowControl] | None = None) -> list[GenerationResult]:
        """Generate for prepared prompts and wait; a prompt cancelled before it started gets a "cancelled" result."""
        results = []
        for prompt, future in zip(prompts, self.submit(prompts, controls), strict=True):
            try:
                results.append(future.result())
            except CancelledError:
                results.append(GenerationResult("", prompt.prompt_tokens, 0, "cancelled"))
        return results

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Answer several requests; each equals its request run alone (greedy), whatever else is running.

        Any invalid request refuses the whole batch (`InvalidRequestError`, a ValueError) before compute is spent.
        """
        return self.run([self.prepare(request) for request in requests])

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield text deltas as they are decoded; closing the iterator early cancels the generation."""
        prompt = self.prepare(request)
        deltas: queue.Queue[str | None] = queue.Queue()
        control = RowControl(on_delta=deltas.put)
        future = self.submit([prompt], [control])[0]
        future.add_done_callback(lambda _: deltas.put(None))
        try:
            while (delta := deltas.get()) is not None:
                yield delta
        finally:
            control.cancel()
        future.result()  # raises the generation's error, if any


def _check_parameters(request: GenerationRequest) -> None:
    if not isinstance(request.max_new_tokens, int) or isinstance(request.max_new_tokens, bool) \
            or request.max_new_tokens < 1:
        raise InvalidRequestError(f"max_new_tokens must be a positive integer, got {request.max_new_tokens!r}",
                                  param="max_tokens")
    if not isinstance(request.temperature, (int, float)) or not 0 <= request.temperature < math.inf:
        raise InvalidRequestError(f"temperature must be a number >= 0, got {request.temperature!r}",
                                  param="temperature")
    if not isinstance(request.top_p, (int, float)) or not 0 < request.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {request.top_p!r}", param="top_p")
    if len(request.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in request.stop):
        raise InvalidRequestError(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
    if not isinstance(request.images, list):
        raise InvalidRequestError("images must be a list", param="images")
