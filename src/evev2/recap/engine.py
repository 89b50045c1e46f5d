"""The re-captioning loop: input shards -> batched captioning through `InferenceEngine` -> filters -> output shards.

Work is split by unit (shard): rank r of W takes units r, r + W, ... and processes them in order. A unit is finished
once its output tar exists (see `shards.AtomicShardWriter`); a rerun skips finished units, redoes the others from
their start, and rebuilds the duplicate indexes from the finished units' decision files first, so an interrupted and
resumed job writes exactly what an uninterrupted one would: one output per input, no duplicates, no losses.

Dropped samples are not written to the output shards: training should never see a caption that failed the filters,
nor fall back to the noisy caption the recap exists to replace. Every dropped sample is still accounted for in its
unit's decision file (key, reason, generated text, original caption) and in `stats.json`.

The duplicate checks (exact captions, near-duplicate images) are global for one process and per rank under
`torchrun`: ranks do not exchange hashes, so a duplicate pair that lands on two ranks is kept twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from evev2 import jsonio
from evev2.data.image_processing import ImageLoadError, open_image
from evev2.data.samples import DataStats
from evev2.data.templates import IMAGE_MARKER
from evev2.infer.engine import Generate, GenerationRequest, GenerationResult
from evev2.infer.errors import InvalidRequestError
from evev2.recap.filters import (
    DUPLICATE_CAPTION,
    NEAR_DUPLICATE_IMAGE,
    CaptionDeduplicator,
    FilterConfig,
    check_caption,
)
from evev2.recap.hints import get_hint_source
from evev2.recap.image_hash import NearDuplicateIndex, dhash
from evev2.recap.prompts import build_prompt, get_instruction
from evev2.recap.shards import (
    AtomicShardWriter,
    InputItem,
    InputShard,
    is_finished,
    iter_items,
    read_decisions,
)

logger = logging.getLogger(__name__)

GENERATION_REFUSED = "generation_refused"  # the engine refused the request (e.g. prompt + answer over the context)


@dataclass(frozen=True)
class RecapSettings:
    """Everything that decides a recap's output; `captioner` is the model folder (for provenance)."""

    captioner: str
    prompt_set: str = "dense"
    hints: str = "none"
    batch_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    filters: FilterConfig = field(default_factory=FilterConfig)
    image_root: Path | None = None  # LLaVA inputs: folder the image paths are relative to (default: the JSON's)
    max_bad_fraction: float = 0.05  # unusable inputs (bad images, malformed records) above this fail the run

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        get_instruction(self.prompt_set)  # unknown names fail before any model is loaded
        get_hint_source(self.hints)

    def provenance(self) -> dict[str, Any]:
        """The run-level facts every output sample and `stats.json` record."""
        try:
            evev2_version = version("evev2")
        except PackageNotFoundError:
            evev2_version = "unknown"
        return {
            "captioner": self.captioner,
            "captioner_name": Path(self.captioner).name,
            "prompt_set": self.prompt_set,
            "instruction": get_instruction(self.prompt_set),
            "hint_source": self.hints,
            "generation": {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                           "top_p": self.top_p, "batch_size": self.batch_size},
            "filters": dataclasses.asdict(self.filters),
            "evev2_version": evev2_version,
        }


@dataclass
class _Pending:
    """An item waiting in the batch for its caption."""

    item: InputItem
    request: GenerationRequest
    prompt: str
    hint: str
    image_hash: int | None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def caption_request(image: Image.Image, prompt: str, settings: RecapSettings) -> GenerationRequest:
    """One user turn with the image and the captioning prompt (the model's template places the image)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return GenerationRequest(messages, [image], settings.max_new_tokens, settings.temperature, settings.top_p)


def recap_record(item: InputItem, caption: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """The output JSON: the input record, its caption and a one-image caption conversation replaced by the new
    caption (so WebDataset readers and `plain`-template training use it), the originals kept beside them."""
    record = dict(item.record)
    if "conversations" in item.record:
        record["original_conversations"] = item.record["conversations"]
    record.update(caption=caption, original_caption=item.original_caption, recap=provenance,
                  conversations=[{"from": "human", "value": IMAGE_MARKER}, {"from": "gpt", "value": caption}])
    return record


def shard_counts(samples: Sequence[dict[str, Any]], shard_errors: Sequence[dict[str, str]]) -> dict[str, Any]:
    reasons = Counter(s["reason"] for s in samples if s["status"] == "dropped")
    kept = sum(s["status"] == "kept" for s in samples)
    return {"samples": len(samples), "kept": kept, "dropped": len(samples) - kept,
            "dropped_by_reason": dict(sorted(reasons.items())), "shard_errors": len(shard_errors)}


class Recaptioner:
    """Caption units of work with one `generate` function (normally `InferenceEngine.generate`)."""

    def __init__(self, generate: Generate, settings: RecapSettings) -> None:
        self.generate = generate
        self.settings = settings
        self.instruction = get_instruction(settings.prompt_set)
        self.hint_source = get_hint_source(settings.hints)
        self.provenance = settings.provenance()
        filters = settings.filters
        self.captions = CaptionDeduplicator() if filters.dedup_captions else None
        self.images = None if filters.image_dedup_distance is None else NearDuplicateIndex(filters.image_dedup_distance)
        self.input_stats = DataStats(max_bad_fraction=settings.max_bad_fraction)

    def run(self, shards: Sequence[InputShard], output: Path, rank: int = 0, world_size: int = 1) -> list[str]:
        """Process this rank's unfinished units in order; returns the names of the units done by this call."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        output.mkdir(parents=True, exist_ok=True)
        done = []
        for shard in tqdm(shards[rank::world_size], desc=f"recap rank {rank}", unit="shard", disable=rank != 0):
            if is_finished(output, shard):
                self._absorb(read_decisions(output, shard.name))
                logger.info("recap: %s is finished, skipped", shard.name)
                continue
            counts = self._recap_shard(shard, output)
            logger.info("recap: %s done: %s", shard.name, counts)
            done.append(shard.name)
        return done

    def _absorb(self, decisions: dict[str, Any]) -> None:
        """Register a finished unit's kept captions and captioned images, exactly as processing it did."""
        for sample in decisions["samples"]:
            if self.captions is not None and sample["status"] == "kept":
                self.captions.add(sample["caption"])
            if self.images is not None and sample["image_hash"] is not None \
                    and sample["reason"] != NEAR_DUPLICATE_IMAGE:
                self.images.add(int(sample["image_hash"], 16))

    def _recap_shard(self, shard: InputShard, output: Path) -> dict[str, Any]:
        writer = AtomicShardWriter(output, shard.name)
        samples: list[dict[str, Any]] = []
        shard_errors: list[dict[str, str]] = []
        pending: list[_Pending] = []
        try:
            for item in iter_items(shard, shard_errors, self.settings.image_root):
                ready = self._prepare(item, shard.name, samples)
                if ready is not None:
                    pending.append(ready)
                if len(pending) == self.settings.batch_size:
                    self._caption(pending, shard.name, writer, samples)
                    pending = []
            self._caption(pending, shard.name, writer, samples)
            for error in shard_errors:
                logger.warning("recap: %s: unreadable part skipped: %s", shard.name, error["detail"])
            counts = shard_counts(samples, shard_errors)
            writer.commit({"shard": shard.name, "input": str(shard.path), "finished": _now(),
                           "run": self.provenance, "counts": counts, "shard_errors": shard_errors,
                           "samples": samples})
        except BaseException:
            writer.abort()
            raise
        return counts

    def _drop(self, samples: list[dict[str, Any]], item: InputItem, reason: str, detail: str = "",
              caption: str | None = None, image_hash: int | None = None) -> None:
        samples.append({"key": item.key, "status": "dropped", "reason": reason, "caption": caption,
                        "original_caption": item.original_caption,
                        "image_hash": None if image_hash is None else f"{image_hash:016x}", "detail": detail})

    def _prepare(self, item: InputItem, shard_name: str, samples: list[dict[str, Any]]) -> _Pending | None:
        """Open the image and build the request; an unusable input or a near-duplicate image is dropped here,
        before any compute is spent on it."""
        if item.problem is not None:
            self.input_stats.record_skip(item.problem[0], shard_name, item.problem[1])
            self._drop(samples, item, *item.problem)
            return None
        try:
            image = open_image(item.members[item.image_ext])
        except ImageLoadError as err:
            self.input_stats.record_skip(err.reason, shard_name, f"{item.key}: {err}")
            self._drop(samples, item, err.reason, str(err))
            return None
        self.input_stats.record_kept()
        image_hash = None
        if self.images is not None:
            image_hash = dhash(image)
            if self.images.contains_near(image_hash):
                self._drop(samples, item, NEAR_DUPLICATE_IMAGE, image_hash=image_hash)
                return None
            self.images.add(image_hash)
        hint = self.hint_source(image, item.record) if self.hint_source is not None else ""
        prompt = build_prompt(self.instruction, hint)
        return _Pending(item, caption_request(image, prompt, self.settings), prompt, hint, image_hash)

    def _generate(self, batch: list[_Pending]) -> list[tuple[_Pending, GenerationResult | str]]:
        """Results for a batch; a refused batch is retried one by one so that only the bad request is lost
        (its refusal message stands in for the result)."""
        try:
            return list(zip(batch, self.generate([p.request for p in batch]), strict=True))
        except InvalidRequestError as err:
            if len(batch) == 1:
                return [(batch[0], str(err))]
        return [pair for pending in batch for pair in self._generate([pending])]

    def _caption(self, batch: list[_Pending], shard_name: str, writer: AtomicShardWriter,
                 samples: list[dict[str, Any]]) -> None:
        if not batch:
            return
        created = _now()
        for pending, result in self._generate(batch):
            item = pending.item
            if isinstance(result, str):
                self.input_stats.record_skip(GENERATION_REFUSED, shard_name, f"{item.key}: {result}")
                self._drop(samples, item, GENERATION_REFUSED, result, image_hash=pending.image_hash)
                continue
            caption = result.text.strip()
            reason = check_caption(caption, result.finish_reason, self.settings.filters)
            if reason is None and self.captions is not None:
                if caption in self.captions:
                    reason = DUPLICATE_CAPTION
                else:
                    self.captions.add(caption)
            if reason is not None:
                self._drop(samples, item, reason, caption=caption, image_hash=pending.image_hash)
                continue
            provenance = {**self.provenance, "prompt": pending.prompt, "hint": pending.hint, "created": created,
                          "finish_reason": result.finish_reason, "completion_tokens": result.completion_tokens}
            record = recap_record(item, caption, provenance)
            copied = {ext: data for ext, data in item.members.items() if ext not in ("json", "txt")}
            writer.write({"__key__": item.key, **copied, "json": json.dumps(record).encode("utf-8"),
                          "txt": caption.encode("utf-8")})
            samples.append({"key": item.key, "status": "kept", "reason": None, "caption": caption,
                            "original_caption": item.original_caption,
                            "image_hash": None if pending.image_hash is None else f"{pending.image_hash:016x}",
                            "detail": ""})


def collect_stats(output: Path, shards: Sequence[InputShard], settings: RecapSettings) -> dict[str, Any]:
    """Per-unit and total counts over the finished units of a job (read back from their decision files)."""
    per_shard = {s.name: read_decisions(output, s.name)["counts"] for s in shards if is_finished(output, s)}
    reasons: Counter[str] = Counter()
    for counts in per_shard.values():
        reasons.update(counts["dropped_by_reason"])
    total = {key: sum(c[key] for c in per_shard.values()) for key in ("samples", "kept", "dropped", "shard_errors")}
    total["dropped_by_reason"] = dict(sorted(reasons.items()))
    return {"run": settings.provenance(), "shards_total": len(shards), "shards_finished": len(per_shard),
            "total": total, "shards": per_shard}


def write_stats(output: Path, stats: dict[str, Any]) -> Path:
    path = output / "stats.json"
    jsonio.write_json(path, stats)
    return path


def format_stats(stats: dict[str, Any]) -> str:
    """A short table: totals, then every drop reason with its count and share of the samples."""
    total = stats["total"]
    n = max(total["samples"], 1)
    lines = [f"recap: {total['samples']} samples in {stats['shards_finished']}/{stats['shards_total']} shards: "
             f"kept {total['kept']} ({total['kept'] / n:.1%}), dropped {total['dropped']} ({total['dropped'] / n:.1%})"]
    lines += [f"  dropped {reason:<22} {count:>8} ({count / n:.1%})"
              for reason, count in total["dropped_by_reason"].items()]
    if total["shard_errors"]:
        lines.append(f"  unreadable shard parts   {total['shard_errors']:>8}")
    return "\n".join(lines)
