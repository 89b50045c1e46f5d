"""Sample sources (LLaVA JSON/JSONL, official index mode, WebDataset shards) and their weighted, resumable mixture.

Reading a record is split in two, so that DataLoader workers can share one stream (see `evev2.data.loader`):
* `next_item()` advances the source's cursor and returns the raw item: cheap, no JSON parsing, no pixel decoding;
* `build(item)` turns an item into a `Sample` (parse, tokenize, decode and resize), or raises a `SampleError`.
Each source walks its records epoch by epoch in a seeded order; its cursor (`epoch`, `position` = items taken this
epoch) is its whole state, so `load_state_dict` resumes exactly. Records are split across `torch.distributed` ranks
(`rank`, `world` are given explicitly), never across DataLoader workers.
"""

from __future__ import annotations

import random
import tarfile
from collections import deque
from collections.abc import Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from evev2 import jsonio
from evev2.data.errors import MalformedRecordError
from evev2.data.image_processing import read_regular_file
from evev2.data.samples import RawRecord, Sample, SampleBuilder, Skip
from evev2.data.templates import IMAGE_MARKER

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _epoch_seed(seed: int, epoch: int) -> int:
    """One well-mixed 63-bit seed per (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def parse_json(data: str | bytes, where: str) -> Any:
    """One JSON document of a record, or `MalformedRecordError` naming `where` and what is wrong with it (not UTF-8,
    not JSON, nested too deeply, an integer too long: a bad record, not a bad run)."""
    try:
        return jsonio.loads(data)
    except ValueError as err:
        raise MalformedRecordError(f"{where}: {err}") from err


def record_from_llava(entry: Any, default_id: str, source: str, image_root: Path | None) -> RawRecord:
    """A LLaVA-style dict (`conversations`, optional `image`: path or list of paths, optional `id`) -> RawRecord."""
    if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
        raise MalformedRecordError(f"record {default_id} has no 'conversations' list")
    image = entry.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise MalformedRecordError(f"record {default_id}: 'image' must be a path or a list of paths")
    if any("\0" in name for name in names):
        raise MalformedRecordError(f"record {default_id}: an image path contains a NUL character")
    sample_id = entry.get("id")
    if sample_id is None:
        sample_id = default_id
    elif isinstance(sample_id, (str, int, float)) and not isinstance(sample_id, bool):
        sample_id = str(sample_id)
    else:
        raise MalformedRecordError(f"record {default_id}: 'id' must be a string or a number, "
                                   f"got {type(sample_id).__name__}")
    root = image_root or Path(".")
    return RawRecord(sample_id, source, entry["conversations"], [root / n for n in names])


class SampleSource:
    """Base class: the epoch/position cursor and the state dict; subclasses supply and parse the items.

    `read_skips` collects what was lost while *reading* (a truncated tar): the consumer drains it after each draw.
    """

    def __init__(self, name: str, builder: SampleBuilder, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.name = name
        self.builder = builder
        self.seed = seed
        self.rank, self.world = rank, world
        self.epoch = 0
        self.position = 0  # items taken in this epoch, good or bad
        self.read_skips: list[Skip] = []
        self._items: Iterator[Any] | None = None

    def _open_epoch(self, epoch: int, skip: int) -> Iterator[Any]:
        """This rank's items of the epoch in their deterministic order, the first `skip` already consumed."""
        raise NotImplementedError

    def _to_record(self, item: Any) -> RawRecord:
        """Parse one item; raises `SampleError` when it is malformed."""
        raise NotImplementedError

    def next_item(self) -> Any:
        """Advance the cursor by one item (epochs roll over); nothing is decoded."""
        while True:
            if self._items is None:
                self._items = self._open_epoch(self.epoch, self.position)
            item = next(self._items, StopIteration)
            if item is not StopIteration:
                self.position += 1
                return item
            if self.position == 0:
                raise RuntimeError(f"source {self.name!r} has no records for rank {self.rank} of {self.world} "
                                   f"in epoch {self.epoch}")
            self.epoch, self.position, self._items = self.epoch + 1, 0, None

    def build(self, item: Any) -> Sample:
        """The training sample of one item; raises `SampleError` (with a skip `reason`) when it is unusable."""
        return self.builder(self._to_record(item))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._items = None


class LlavaJsonSource(SampleSource):
    """LLaVA JSON list, JSONL (one record per line), or the official index mode (a JSON list of per-sample files).

    A JSONL file is read as bytes and split on newlines only; each line is decoded when its record is built, so a
    line that is not UTF-8 (or not JSON) is one skipped record (`malformed_record`, naming the file and line).

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
        image_root: str | Path | None = None,
        json_root: str | Path | None = None,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        super().__init__(name, builder, seed, rank, world)
        path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else path.parent
        self.json_root = Path(json_root) if json_root is not None else path.parent
        self.shuffle = shuffle
        self.path = path
        if path.suffix == ".jsonl":
            self.mode = "jsonl"
            lines = jsonio.raw_lines(path)
            self.line_numbers = [number for number, _ in lines]
            self.entries: list[Any] = [line for _, line in lines]  # raw bytes, decoded in _to_record
        else:
            entries = jsonio.read_json(path)  # a broken list file is fatal, not a skip
            if not isinstance(entries, list):
                raise ValueError(f"{path}: expected a JSON list of records or of file names")
            self.mode = "index" if entries and all(isinstance(e, str) for e in entries) else "records"
            self.entries = entries

    def _open_epoch(self, epoch: int, skip: int) -> Iterator[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.entries)) if self.shuffle else (
            np.arange(len(self.entries))
        )
        return iter(order[self.rank::self.world][skip:].tolist())

    def _to_record(self, item: int) -> RawRecord:
        entry = self.entries[item]
        default_id = f"{self.name}:{item}"
        if self.mode == "jsonl":
            entry = parse_json(entry, f"record {default_id} ({self.path} line {self.line_numbers[item]})")
        elif self.mode == "index":
            default_id = entry
            try:
                data = read_regular_file(self.json_root / entry)
            except (OSError, ValueError) as err:  # ValueError: a NUL in the file name
                raise MalformedRecordError(f"record {default_id}: cannot read it ({err})") from err
            entry = parse_json(data, f"record {default_id}")
        return record_from_llava(entry, default_id, self.name, self.image_root)


class WebDatasetSource(SampleSource):
    """WebDataset tar shards of `jpg|jpeg|png|webp` + `txt` (a caption) or `json` (a LLaVA record), streamed.

    Shards are shuffled per epoch and split across ranks; samples pass through a seeded shuffle buffer. Unreadable or
    truncated tars are counted (in `read_skips`) through webdataset's handler hook and the stream goes on.

    Args:
        urls: shard paths or URLs (anything `webdataset.gopen` opens).
        shuffle_buffer: samples held for shuffling (<= 1 disables it).
    """

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        builder: SampleBuilder,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        super().__init__(name, builder, seed, rank, world)
        if not urls:
            raise ValueError(f"source {name!r} has no shards")
        self.urls = [str(url) for url in urls]
        self.shuffle_buffer = shuffle_buffer
        self._replaying = False

    def _on_shard_error(self, exn: Exception) -> bool:
        """webdataset handler: count the lost stretch of a shard and keep going (muted while resuming)."""
        if not self._replaying:
            reason = "truncated_tar" if isinstance(exn, (tarfile.TarError, EOFError)) else "bad_shard"
            self.read_skips.append(Skip(reason, self.name, repr(exn)))
        return True

    def _open_epoch(self, epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        rng = random.Random(_epoch_seed(self.seed, epoch))
        shards = rng.sample(self.urls, len(self.urls))[self.rank::self.world]
        stages: list[Any] = [
            wds.SimpleShardList(shards),
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

    def _to_record(self, item: dict[str, Any]) -> RawRecord:
        sample_id = f"{Path(item.get('__url__', '')).name}/{item.get('__key__')}"
        images = [item[ext] for ext in IMAGE_EXTENSIONS if ext in item][:1]
        if "json" in item:
            record = record_from_llava(parse_json(item["json"], f"record {sample_id}"), sample_id, self.name, None)
            return RawRecord(record.sample_id, self.name, record.conversations, images)
        if "txt" in item:
            try:
                caption = item["txt"].decode("utf-8")
            except UnicodeDecodeError as err:
                raise MalformedRecordError(f"record {sample_id}: caption is not valid UTF-8 ({err})") from err
            conversation = [{"from": "human", "value": IMAGE_MARKER}, {"from": "gpt", "value": caption}]
            return RawRecord(sample_id, self.name, conversation, images)
        raise MalformedRecordError(f"record {sample_id} has no txt or json member (keys {sorted(item)})")


def check_spans(spans: Sequence[Sequence[float]], steps: int) -> None:
    """Raise ValueError unless every span is [start, end) with 0 <= start < end <= 1 and every step has a source."""
    for span in spans:
        if len(span) != 2 or not 0 <= span[0] < span[1] <= 1:
            raise ValueError(f"a span is [start, end) with 0 <= start < end <= 1, got {list(span)}")
    if idle := [k for k in range(1, steps + 1) if not any(a <= (k - 1) / steps < b for a, b in spans)]:
        raise ValueError(f"no source spans step {idle[0]} of {steps}: together the spans must cover the stage")


class Mixture:
    """Draw each next item from a source chosen with probability proportional to its weight, among the sources whose
    span covers the current step.

    A span is the part of the stage in which a source is drawn, as fractions of its `steps`: [start, end) holds step k
    (1-based) when start <= (k - 1) / steps < end. Spans make a curriculum (a warm-up on one source, then the mix) or
    an annealing phase; by default every source is drawn at every step. Deterministic for a seed; `state_dict()` holds
    the chooser's RNG state and every source's cursor (JSON-safe), so a new mixture given that state draws exactly the
    remaining sequence.
    """

    def __init__(self, sources: Sequence[SampleSource], weights: Sequence[float], seed: int = 0,
                 spans: Sequence[Sequence[float]] | None = None, steps: int = 1) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError("give one weight per source, and at least one source")
        if any(w <= 0 for w in weights):
            raise ValueError(f"weights must be positive, got {list(weights)}")
        if len({s.name for s in sources}) != len(sources):
            raise ValueError("source names must be unique")
        spans = [(0.0, 1.0)] * len(sources) if spans is None else spans
        if len(spans) != len(sources):
            raise ValueError(f"give one span per source, got {len(spans)} for {len(sources)} sources")
        check_spans(spans, steps)
        self.sources = list(sources)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.spans = np.asarray(spans, dtype=np.float64)  # (sources, 2)
        self.steps = steps
        self._rng = np.random.default_rng(seed)

    def probabilities(self, step: int = 1) -> np.ndarray:
        """(sources,) draw probabilities at 1-based `step`: the weights of the sources whose span holds it."""
        fraction = (min(step, self.steps) - 1) / self.steps  # steps past the stage (prefetched) draw like its last
        active = (self.spans[:, 0] <= fraction) & (fraction < self.spans[:, 1])
        weights = self.weights * active
        return weights / weights.sum()

    def next_draw(self, step: int = 1) -> tuple[SampleSource, Any]:
        """The next (source, item) of `step`: only cursors move, nothing is decoded."""
        source = self.sources[int(self._rng.choice(len(self.sources), p=self.probabilities(step)))]
        return source, source.next_item()

    def drain_read_skips(self) -> list[Skip]:
        """What the sources lost while reading since the last call (truncated tars)."""
        skips = [skip for source in self.sources for skip in source.read_skips]
        for source in self.sources:
            source.read_skips.clear()
        return skips

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state,
                "sources": {source.name: source.state_dict() for source in self.sources}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]
        for source in self.sources:
            source.load_state_dict(state["sources"][source.name])
