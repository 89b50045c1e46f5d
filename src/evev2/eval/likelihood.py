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

#: (messages, the images they show, the continuation to score)
LikelihoodRequest = tuple[Conversation, Sequence[Any], str]


@torch.no_grad()
def continuation_logprobs(model: EVEForCausalLM, processor: EVEProcessor, requests: Sequence[LikelihoodRequest]
                          ) -> list[tuple[float, bool]]:
    """Per request, (sum of log p(continuation token | everything before it), whether greedy decoding would produce
    exactly the continuation), all requests in one left-padded forward (as generation prefills a batch)."""
    parameter = next(model.parameters())
    rows, targets, images = [], [], []
    for messages, request_images, continuation in requests:
        target = processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not target:
            raise ValueError("the continuation is empty: nothing to score")
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        encoded = processor(prompt, images=list(request_images) or None)
        rows.append(torch.cat([encoded["input_ids"][0], torch.tensor(target)]))
        targets.append(torch.tensor(target, device=parameter.device))
        images += [image.to(parameter.device, parameter.dtype) for image in encoded["images"]]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), processor.tokenizer.pad_token_id, dtype=torch.long)  # (B, T), left padded
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    ids, mask = ids.to(parameter.device), mask.to(parameter.device)
    if images:
        s = model.model.embed_inputs(ids, images, mask, padding_side="left")
        inputs = dict(inputs_embeds=s.inputs_embeds, attention_mask=s.attention_mask, position_ids=s.position_ids,
                      mm_token_type_ids=s.mm_token_type_ids, image_ids=s.image_ids)
    else:
        inputs = dict(input_ids=ids, attention_mask=mask)
    # Every row ends with its continuation: position -(n + 1) + i predicts target[i].
    keep = max(len(target) for target in targets) + 1
    logits = model(**inputs, logits_to_keep=keep).logits  # (B, keep, V)
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    scored = []
    for row, target in zip(logprobs, targets):
        predicting = row[keep - 1 - len(target):keep - 1]  # (n, V)
        scored.append((float(predicting.gather(1, target.unsqueeze(1)).sum()),
                       bool((predicting.argmax(dim=-1) == target).all())))
    return scored


def continuation_logprob(model: EVEForCausalLM, processor: EVEProcessor, messages: Conversation,
                         images: Sequence[Any], continuation: str) -> tuple[float, bool]:
    """`continuation_logprobs` of one request."""
    return continuation_logprobs(model, processor, [(messages, images, continuation)])[0]
