"""Numbers the demo's evaluation does not give: teacher-forced held-out caption loss, and tokens trained per run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from evev2.data.errors import SampleError
from evev2.data.packing import collate_unpacked
from evev2.data.processor import EVEProcessor
from evev2.data.samples import DataStats, RawRecord, Sample, SampleBuilder
from evev2.constants import IGNORE_INDEX
from evev2.data.templates import IMAGE_MARKER
from evev2.model import EVEForCausalLM
from evev2 import jsonio

log = logging.getLogger(__name__)


@torch.no_grad()
def caption_loss(model: EVEForCausalLM, processor: EVEProcessor, records: list[dict[str, Any]], image_root: Path,
                 batch_size: int = 32, max_tokens: int = 4096) -> dict[str, float]:
    """Mean next-token NLL of the reference caption given image + caption prompt, over every caption token.

    Each held-out caption record (`question` = the caption prompt, `answer` = the true caption) is encoded as the
    one-turn conversation the model was trained on, so only the answer tokens (and the end-of-turn token) count.
    Unusable records (missing or corrupt image) are skipped and counted, as in training.
    """
    model.eval()
    builder = SampleBuilder(processor, max_tokens)
    stats = DataStats()
    samples: list[Sample] = []
    for record in records:
        conversation = [{"from": "human", "value": f"{IMAGE_MARKER}\n{record['question']}"},
                        {"from": "gpt", "value": record["answer"]}]
        try:
            samples.append(builder(RawRecord(record["question_id"], "heldout-captions", conversation,
                                             [image_root / record["image"]])))
            stats.record_kept()
        except SampleError as err:
            stats.record_skip(type(err).__name__, "heldout-captions", f"{record['question_id']}: {err}")
    total_nll, total_tokens = 0.0, 0
    pad = processor.tokenizer.pad_token_id
    for start in range(0, len(samples), batch_size):
        batch = collate_unpacked(samples[start:start + batch_size], pad)
        # num_items_in_batch=1: the summed NLL of the batch's supervised tokens (never the first one of a row)
        total_nll += model(**batch, num_items_in_batch=1).loss.item()
        total_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    if not total_tokens:
        raise ValueError("no usable held-out caption records to score")
    return {"loss": total_nll / total_tokens, "tokens": total_tokens, "captions": len(samples),
            "skipped": stats.num_skipped}


def run_tokens(metrics: Path) -> dict[str, int]:
    """Spliced and supervised tokens of a training run, summed over its metrics.jsonl steps."""
    rows = jsonio.read_jsonl(metrics)
    return {"steps": len(rows), "tokens": sum(r["tokens"] for r in rows),
            "supervised_tokens": sum(r["supervised_tokens"] for r in rows)}
