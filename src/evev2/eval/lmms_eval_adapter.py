"""EVEv2 as an lmms-eval model: `lmms_eval --model evev2 --model_args pretrained=DIR --tasks gqa,...`.

Install with `pip install 'evev2[lmms]'`. The model is found through the `lmms_eval.models` entry point group
(lmms-eval >= 0.7 reads it; see `pyproject.toml`), which points at `lmms_eval_manifest`. Generation goes through
`InferenceEngine` (the same path as `evev2 eval run`, chat and serve); `loglikelihood` scores `batch_size`
continuations per forward pass (`evev2.eval.likelihood`).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from evev2.data.templates import IMAGE_MARKER
from evev2.eval.likelihood import continuation_logprobs
from evev2.infer.engine import GenerationRequest, InferenceEngine

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelManifest
except ImportError as error:  # pragma: no cover - depends on the optional extra
    raise ImportError("the lmms-eval adapter needs lmms-eval: pip install 'evev2[lmms]'") from error

logger = logging.getLogger(__name__)

MODEL_NAME = "evev2"


def lmms_eval_manifest() -> ModelManifest:
    """What the `lmms_eval.models` entry point hands lmms-eval: the model name and the class to load."""
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.EVEv2")


def user_turn(context: str, num_images: int) -> list[dict[str, Any]]:
    """The context as one user message. Tasks that place `<image>` markers themselves keep them; otherwise the
    images come first, as the template would put them anyway."""
    if IMAGE_MARKER in context:
        if context.count(IMAGE_MARKER) != num_images:
            raise ValueError(f"the context has {context.count(IMAGE_MARKER)} {IMAGE_MARKER} markers but the "
                             f"document has {num_images} images")
        return [{"role": "user", "content": context}]
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": context}]}]


def generation_options(gen_kwargs: dict[str, Any], default_max_new_tokens: int) -> dict[str, Any]:
    """lmms-eval's `generation_kwargs` (until, max_new_tokens, temperature, top_p, do_sample, num_beams) as
    `GenerationRequest` fields. Beam search is refused rather than silently replaced by greedy decoding."""
    options = dict(gen_kwargs)
    until = options.pop("until", None) or []
    stop = [until] if isinstance(until, str) else [s for s in until if s]
    temperature = float(options.pop("temperature", 0.0) or 0.0)
    if not options.pop("do_sample", temperature > 0):
        temperature = 0.0
    num_beams = options.pop("num_beams", 1)
    if num_beams not in (None, 1):
        raise ValueError(f"evev2 decodes greedily or by sampling; num_beams={num_beams} is not supported")
    top_p = options.pop("top_p", None)
    max_new_tokens = options.pop("max_new_tokens", None) or default_max_new_tokens
    if options:
        logger.info("ignoring generation options evev2 does not use: %s", sorted(options))
    return {"stop": stop, "temperature": temperature, "top_p": 1.0 if top_p is None else float(top_p),
            "max_new_tokens": int(max_new_tokens)}


class EVEv2(lmms):
    """lmms-eval "simple" model (string contexts + `doc_to_visual`) backed by `InferenceEngine`.

    Model args: pretrained (model folder), device, dtype, batch_size, max_new_tokens (default when a task sets
    none), template (chat template override).
    """

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_new_tokens: int | str = 128, template: str | None = None,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r} (auto is not supported)")
        self.batch_size = int(batch_size) if max_batch_size is None else min(int(batch_size), int(max_batch_size))
        self.max_new_tokens = int(max_new_tokens)
        self.engine = InferenceEngine.from_pretrained(pretrained, device=device, dtype=dtype, template=template)
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    def _images(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> list[Image.Image | str]:
        """The document's images; videos and audio are refused (EVEv2 reads images only)."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        images = [v for v in (visuals or []) if v is not None]
        for visual in images:
            if not isinstance(visual, (Image.Image, str)):
                raise ValueError(f"evev2 takes images only, got a {type(visual).__name__} visual from {task}")
        return images

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched generation; requests are grouped by generation options so each batch shares them."""
        answers: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(index)
        with tqdm(total=len(requests), desc="evev2 generate", disable=self.rank != 0) as progress:
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start:start + self.batch_size]
                    batch = []
                    for index in chunk:
                        context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[index].args
                        images = self._images(doc_to_visual, doc_id, task, split)
                        batch.append(GenerationRequest(messages=user_turn(context, len(images)), images=images,
                                                       **generation_options(gen_kwargs, self.max_new_tokens)))
                    for index, result in zip(chunk, self.engine.generate(batch), strict=True):
                        answers[index] = result.text
                    progress.update(len(chunk))
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log p(continuation | context, images), is greedy) per request, `batch_size` requests per left-padded
        forward (longest texts together, so rows pad little), answered in the original order. Requests are
        (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split), or (context, continuation)
        for the unconditional terms of mutual-information scoring."""
        texts = []
        for request in requests:
            context, target, *where = request.args
            doc_to_visual, doc_id, task, split = where if where else (None, None, None, None)
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            texts.append((context, continuation, doc_to_visual, doc_id, task, split))
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i][0]) - len(texts[i][1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(texts)
        with tqdm(total=len(texts), desc="evev2 loglikelihood", disable=self.rank != 0) as progress:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                batch = []
                for index in chunk:  # images are read chunk by chunk, never all held at once
                    context, continuation, doc_to_visual, doc_id, task, split = texts[index]
                    images = self._images(doc_to_visual, doc_id, task, split)
                    batch.append((user_turn(context, len(images)), images, continuation))
                for index, scored in zip(chunk, continuation_logprobs(self.engine.model, self.engine.processor,
                                                                      batch), strict=True):
                    results[index] = scored
                progress.update(len(chunk))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("evev2 does not implement lmms-eval's multi-round generation")
