"""Sample sources (LLaVA JSON/JSONL, official index mode, WebDataset shards) and their weighted, resumable mixture.

Every source is an endless, deterministic stream of good `Sample`s: it walks its records epoch by epoch in a
seeded order, builds each with a `SampleBuilder`, and counts unusable ones in the shared `DataStats`. Its cursor
(`epoch`, `position` = records consumed this epoch) is its whole state, so `load_state_dict` resumes exactly.

Records are split across `torch.distributed` ranks and DataLoader workers (webdataset's `pytorch_worker_info`).
`MixtureDataset.state_dict()` is exact for the iterator it is called on (the main process with `num_workers=0`,
or a single worker).
"""

from __future__ import annotations

import json
import random
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.utils import pytorch_worker_info

from evev2.data.errors import MalformedRecordError, SampleError
from evev2.data.samples import DataStats, RawRecord, Sample, SampleBuilder
from evev2.data.templates import IMAGE_MARKER

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _epoch_seed(seed: int, epoch: int) -> int:
    """One well-mixed 63-bit seed per (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def record_from_llava(entry: Any, default_id: str, source: str, image_root: Path | None) -> RawRecord:
    """A LLaVA-style dict (`conversations`, optional `image`: path or list of paths, optional `id`) -> RawRecord."""
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise MalformedRecordError(f"record {default_id} has no 'conversations' list")
    image = entry.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise MalformedRecordError(f"record {default_id}: 'image' must be a path or a list of paths")
    root = image_root or Path(".")
    return RawRecord(str(entry.get("id", default_id)), source, entry["conversations"], [root / n for n in names])


class SampleSource:
    """Base class: the epoch/position cursor, the skip loop and the state dict; subclasses supply records."""

    def __init__(self, name: str, builder: SampleBuilder, stats: DataStats, seed: int = 0) -> None:
        self.name = name
        self.builder = builder
        self.stats = stats
        self.seed = seed
        self.epoch = 0
        self.position = 0  # records consumed in this epoch, good or bad
        self.kept_in_epoch = 0
        self._items: Iterator[Any] | None = None

    def _open_epoch(self, epoch: int, skip: int) -> Iterator[Any]:
        """The epoch's items in their deterministic order, the first `skip` already consumed."""
        raise NotImplementedError

    def _to_record(self, item: Any, position: int) -> RawRecord:
        """Parse one item; raises `SampleError` when it is malformed."""
        raise NotImplementedError

    def next_sample(self) -> Sample:
        """The next usable sample; bad records are counted and skipped, epochs roll over."""
        while True:
            if self._items is None:
                self._items = self._open_epoch(self.epoch, self.position)
            item = next(self._items, StopIteration)
            if item is StopIteration:
                if self.kept_in_epoch == 0:
                    raise RuntimeError(
                        f"source {self.name!r} yielded no usable sample in epoch {self.epoch} "
                        f"({self.position} records for this rank/worker): {self.stats.summary()}"
                    )
                self.epoch, self.position, self.kept_in_epoch, self._items = self.epoch + 1, 0, 0, None
                continue
            self.position += 1
            try:
                sample = self.builder(self._to_record(item, self.position - 1))
            except SampleError as err:
                self.stats.record_skip(err.reason, self.name, str(err))
                continue
            self.kept_in_epoch += 1
            self.stats.record_kept()
            return sample

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "kept_in_epoch": self.kept_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.kept_in_epoch = state["epoch"], state["position"], state["kept_in_epoch"]
        self._items = None


class LlavaJsonSource(SampleSource):
    """LLaVA JSON list, JSONL (one record per line), or the official index mode (a JSON list of per-sample files).

    Args:
        path: `.json` list of records or of file names (index mode), or `.jsonl`.
        image_root: folder that record `image` paths are relative to.
        json_root: folder of the per-sample files in index mode (default: the index file's folder).
        shuffle: reshuffle the order every epoch (seeded); off = file order.
    """

    def __init__(
        self,
        name: str,
        path: str | Path,
        builder: SampleBuilder,
        stats: DataStats,
        image_root: str | Path | None = None,
        json_root: str | Path | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(name, builder, stats, seed)
        path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else path.parent
        self.json_root = Path(json_root) if json_root is not None else path.parent
        self.shuffle = shuffle
        if path.suffix == ".jsonl":
            self.mode = "jsonl"
            self.entries: list[Any] = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            entries = json.loads(path.read_text(encoding="utf-8"))  # a broken list file is fatal, not a skip
            if not isinstance(entries, list):
                raise ValueError(f"{path}: expected a JSON list of records or of file names")
            self.mode = "index" if entries and all(isinstance(e, str) for e in entries) else "records"
            self.entries = entries

    def _open_epoch(self, epoch: int, skip: int) -> Iterator[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.entries)) if self.shuffle else (
            np.arange(len(self.entries))
        )
        rank, world_size, worker, num_workers = pytorch_worker_info()
        shard, num_shards = rank * num_workers + worker, world_size * num_workers
        return iter(order[shard::num_shards][skip:].tolist())

    def _to_record(self, item: int, position: int) -> RawRecord:
        entry = self.entries[item]
        default_id = f"{self.name}:{item}"
        try:
            if self.mode == "jsonl":
                entry = json.loads(entry)
            elif self.mode == "index":
                default_id = entry
                entry = json.loads((self.json_root / entry).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MalformedRecordError(f"record {default_id}: {err}") from err
        return record_from_llava(entry, default_id, self.name, self.image_root)


class WebDatasetSource(SampleSource):
    """WebDataset tar shards of `jpg|jpeg|png|webp` + `txt` (a caption) or `json` (a LLaVA record), streamed.

    Shards are shuffled per epoch and split across ranks and workers; samples pass through a seeded shuffle
    buffer. Unreadable or truncated tars are counted through webdataset's handler hook and the stream goes on.

    Args:
        urls: shard paths or URLs (anything `webdataset.gopen` opens).
        shuffle_buffer: samples held for shuffling (<= 1 disables it).
    """

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        builder: SampleBuilder,
        stats: DataStats,
        seed: int = 0,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__(name, builder, stats, seed)
        if not urls:
            raise ValueError(f"source {name!r} has no shards")
        self.urls = [str(url) for url in urls]
        self.shuffle_buffer = shuffle_buffer
        self._replaying = False

    def _on_shard_error(self, exn: Exception) -> bool:
        """webdataset handler: count the lost stretch of a shard and keep going (muted while resuming)."""
        if not self._replaying:
            reason = "truncated_tar" if isinstance(exn, (tarfile.TarError, EOFError)) else "bad_shard"
            self.stats.record_skip(reason, self.name, repr(exn))
        return True

    def _open_epoch(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(_epoch_seed(self.seed, epoch))
        shards = rng.sample(self.urls, len(self.urls))
        stages: list[Any] = [
            wds.SimpleShardList(shards),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=self._on_shard_error),
        ]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        items = iter(wds.DataPipeline(*stages))
        self._replaying = True
        try:
            deque(islice(items, skip), maxlen=0)  # replay what was consumed before the checkpoint
        finally:
            self._replaying = False
        return items

    def _to_record(self, item: dict[str, Any], position: int) -> RawRecord:
        sample_id = f"{Path(item.get('__url__', '')).name}/{item.get('__key__')}"
        images = [item[ext] for ext in IMAGE_EXTENSIONS if ext in item][:1]
        try:
            if "json" in item:
                record = record_from_llava(json.loads(item["json"]), sample_id, self.name, None)
                return RawRecord(record.sample_id, self.name, record.conversations, images)
            if "txt" in item:
                caption = item["txt"].decode("utf-8")
                conversation = [{"from": "human", "value": IMAGE_MARKER}, {"from": "gpt", "value": caption}]
                return RawRecord(sample_id, self.name, conversation, images)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise MalformedRecordError(f"record {sample_id}: {err}") from err
        raise MalformedRecordError(f"record {sample_id} has no txt or json member (keys {sorted(item)})")


class MixtureDataset(torch.utils.data.IterableDataset):
    """Draw each next sample from a source chosen with probability proportional to its weight.

    Deterministic for a seed; `state_dict()` holds the chooser's RNG state, every source's cursor and the shared
    stats, so a new mixture given that state yields exactly the remaining sequence.
    """

    def __init__(self, sources: Sequence[SampleSource], weights: Sequence[float], seed: int = 0) -> None:
        super().__init__()
        if len(sources) != len(weights) or not sources:
            raise ValueError("give one weight per source, and at least one source")
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights must be positive, got {list(weights)}")
        if len({s.name for s in sources}) != len(sources):
            raise ValueError("source names must be unique")
        if any(s.stats is not sources[0].stats for s in sources):
            raise ValueError("all sources must share one DataStats")
        self.sources = list(sources)
        self.probabilities = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self._rng = np.random.default_rng(seed)

    @property
    def stats(self) -> DataStats:
        return self.sources[0].stats

    def next_sample(self) -> Sample:
        index = int(self._rng.choice(len(self.sources), p=self.probabilities))
        return self.sources[index].next_sample()

    def __iter__(self) -> Iterator[Sample]:
        while True:
            yield self.next_sample()

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self._rng.bit_generator.state,
            "sources": {source.name: source.state_dict() for source in self.sources},
            "stats": self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        for source in self.sources:
            source.load_state_dict(state["sources"][source.name])
        self.stats.load_state_dict(state["stats"])
