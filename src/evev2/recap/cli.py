"""`evev2 recap`: re-caption image shards with any model `InferenceEngine` loads (torchrun-aware, resumable)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from evev2.distributed import distributed_session
from evev2.infer.engine import Generate, InferenceEngine
from evev2.recap.engine import Recaptioner, RecapSettings, collect_stats, format_stats, write_stats
from evev2.recap.filters import FilterConfig
from evev2.recap.shards import list_input_shards

logger = logging.getLogger(__name__)


def run_recap(generate: Generate, inputs: Sequence[str], output: Path, settings: RecapSettings,
              records_per_shard: int = 1000, rank: int = 0, world_size: int = 1,
              barrier: Callable[[], None] = lambda: None) -> dict[str, Any] | None:
    """Caption this rank's share of the inputs, then (rank 0, after `barrier`) write and print `stats.json`.

    Returns the stats on rank 0 and None on the other ranks.
    """
    output = Path(output)
    shards = list_input_shards(inputs, records_per_shard)
    Recaptioner(generate, settings).run(shards, output, rank, world_size)
    barrier()
    if rank != 0:
        return None
    stats = collect_stats(output, shards, settings)
    path = write_stats(output, stats)
    print(format_stats(stats))
    print(f"stats: {path}")
    return stats


def recap_cli(*, captioner: Path, input: list[str], output: Path, prompt_set: str = "dense", batch_size: int = 8,
              max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0, hints: str = "none",
              records_per_shard: int = 1000, image_root: Path | None = None, min_words: int = 5,
              max_words: int = 300, repeat_ngram: int = 3, max_repeat_ratio: float = 0.3,
              min_ascii_ratio: float = 0.9, min_stopword_ratio: float = 0.15, drop_truncated: bool = True,
              dedup_captions: bool = True, image_dedup_distance: int | None = None, max_bad_fraction: float = 0.05,
              device: str | None = None, dtype: str | None = None) -> dict[str, Any] | None:
    """Re-caption WebDataset shards or a LLaVA JSON with a captioner model, filter the captions, write new shards.

    Output: OUTPUT/<shard>.tar with the input members, `txt` = the new caption and `json` = the input record with
    the new caption (as `caption` and as a one-turn caption conversation), `original_caption`, the input's
    `original_conversations` and `recap` provenance (captioner, prompt, hint, generation settings, time);
    OUTPUT/<shard>.recap.json: every sample's fate (kept, or dropped with its reason); OUTPUT/stats.json: counts per
    shard and in total. Dropped samples are left out of the tar. Under torchrun rank r takes shards r, r + W, ...;
    a rerun skips finished shards and redoes unfinished ones.

    Args:
        captioner: model folder that `InferenceEngine` loads (an EVEv2 checkpoint, a converted official one, the demo).
        input: WebDataset .tar shards (globs and {000..009} braces work) and/or LLaVA .json/.jsonl files.
        output: folder for the new shards, decision files and stats.json.
        prompt_set: captioning instruction: dense (general dense description) or synth (the synthetic world's).
        batch_size: images per generate call.
        max_new_tokens: caption length cap in tokens.
        temperature: 0 = greedy (reproducible; a resumed job then writes what an uninterrupted one would).
        top_p: nucleus sampling mass when temperature > 0.
        hints: grounding hint source put into the prompt: none, or synth-truth (the synthetic world's ground truth).
        records_per_shard: LLaVA inputs: records per output shard.
        image_root: LLaVA inputs: folder the image paths are relative to (default: the JSON file's folder).
        min_words: drop captions with fewer words.
        max_words: drop captions with more words.
        repeat_ngram: n of the repeated n-gram (degeneration) check.
        max_repeat_ratio: drop captions whose share of repeated n-grams is above this.
        min_ascii_ratio: language check: minimum share of plain-ASCII words.
        min_stopword_ratio: language check: minimum share of English function words (captions of 6+ words).
        drop_truncated: drop captions cut off by max_new_tokens.
        dedup_captions: drop a caption identical (case/punctuation aside) to one kept before.
        image_dedup_distance: drop images whose 64-bit dHash is within this many bits of an earlier one (off if unset).
        max_bad_fraction: fail when more than this share of inputs is unusable (bad images, malformed records).
        device: e.g. cpu, cuda, cuda:1; default cuda when available (each torchrun rank uses its LOCAL_RANK GPU).
        dtype: float32, bfloat16 or float16; default bfloat16 on GPU, float32 on CPU.
    """
    filters = FilterConfig(min_words, max_words, repeat_ngram, max_repeat_ratio, min_ascii_ratio, min_stopword_ratio,
                           drop_truncated, dedup_captions, image_dedup_distance)
    settings = RecapSettings(str(Path(captioner).resolve()), prompt_set, hints, batch_size, max_new_tokens,
                             temperature, top_p, filters, image_root, max_bad_fraction)
    list_input_shards(input, records_per_shard)  # bad inputs fail before the model is loaded
    with distributed_session() as (rank, world_size, rank_device):
        if device is None and world_size > 1:
            device = str(rank_device)  # each torchrun rank on its own GPU
        engine = InferenceEngine.from_pretrained(captioner, device=device, dtype=dtype)
        return run_recap(engine.generate, input, output, settings, records_per_shard, rank, world_size,
                         barrier=dist.barrier if world_size > 1 else lambda: None)
