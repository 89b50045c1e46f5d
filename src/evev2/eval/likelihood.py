"""Log-likelihood of a given answer under an EVEv2 model: how harnesses (lmms-eval's `loglikelihood` requests)
score multiple-choice options without generating.

The context is rendered with the model's own chat template and generation prompt, and the continuation is
tokenized on its own and appended, so the continuation tokens are exactly the ones the model would have to
produce after "ASSISTANT:".
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from evev2.data.processor import Conversation, EVEProcessor
from evev2.model import EVEForCausalLM


@torch.no_grad()
def continuation_logprob(model: EVEForCausalLM, processor: EVEProcessor, messages: Conversation,
                         images: Sequence[Any], continuation: str) -> tuple[float, bool]:
    """(sum of log p(continuation token | everything before it), whether greedy decoding would produce exactly
    the continuation) for `continuation` as the assistant's answer to `messages` (which show `images`)."""
    target = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not target:
        raise ValueError("the continuation is empty: nothing to score")
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    encoded = processor(prompt, images=list(images) or None)
    parameter = next(model.parameters())
    target_ids = torch.tensor(target, device=parameter.device)  # (n,)
    input_ids = torch.cat([encoded["input_ids"][0].to(parameter.device), target_ids]).unsqueeze(0)  # (1, T + n)
    pixels = [image.to(parameter.device, parameter.dtype) for image in encoded["images"]]
    # The last n + 1 positions: the final context token predicts target[0], target[i] predicts target[i + 1].
    logits = model(input_ids=input_ids, images=pixels or None, logits_to_keep=len(target) + 1).logits  # (1, n+1, V)
    logits = logits[0, :-1]  # (n, V)
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    total = logprobs.gather(1, target_ids.unsqueeze(1)).sum()
    return float(total), bool((logprobs.argmax(dim=-1) == target_ids).all())
