"""Recap input and output: which shards there are, the samples inside them, and writing a shard atomically.

Inputs are WebDataset tar shards (one image member + `json` and/or `txt`, as `evev2 data synth` writes them) or a
LLaVA JSON/JSONL list, cut into output shards of `records_per_shard` records. Every input sample becomes an
`InputItem`; one that cannot be used carries a `problem` (reason, detail) instead of failing the run.

An output shard `NAME.tar` exists only when complete: it is written as `NAME.tar.tmp`, fsynced and renamed, after
its decision file `NAME.recap.json` (every sample's fate) was committed the same way. So "`NAME.tar` exists" is the
one test of "finished", and a killed job leaves at most a stray `.tmp` that the rerun overwrites.
"""

from __future__ import annotations

import glob
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from webdataset.shardlists import expand_urls

from evev2 import jsonio
from evev2.data.datasets import IMAGE_EXTENSIONS
from evev2.data.image_processing import ImageLoadError, open_image
from evev2.data.templates import IMAGE_MARKER

LLAVA_SUFFIXES = (".json", ".jsonl")
DECISIONS_SUFFIX = ".recap.json"
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class InputShard:
    """One unit of work: a tar shard, or records [start, start + len(records)) of a LLaVA file; `name` is its output
    file name."""

    name: str
    path: Path
    start: int = 0
    records: tuple[Any, ...] = field(default=(), repr=False, compare=False)  # LLaVA records of this unit

    @property
    def is_llava(self) -> bool:
        return self.path.suffix in LLAVA_SUFFIXES


@dataclass
class InputItem:
    """One input sample: its members (copied to the output), the image member's extension, the parsed record
    (`{}` when there is no JSON) and the caption it came with; `problem` = (reason, detail) when it is unusable."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    image_ext: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    original_caption: str = ""
    problem: tuple[str, str] | None = None


def _expand(pattern: str) -> list[Path]:
    """Brace (`a-{000..009}.tar`) and glob patterns -> existing paths, in a stable order; nothing found is an error."""
    paths: list[Path] = []
    for url in expand_urls(pattern):
        matches = sorted(glob.glob(url)) if glob.has_magic(url) else [url] if Path(url).exists() else []
        if not matches:
            raise FileNotFoundError(f"recap input {url!r} matches no file")
        paths += [Path(m) for m in matches]
    return paths


def read_llava_records(path: Path) -> list[Any]:
    """A LLaVA JSON list, or JSONL with one record per line (a line that is not JSON becomes a None record)."""
    if path.suffix == ".jsonl":
        return [None if isinstance(record, ValueError) else record for _, record in jsonio.json_lines(path)]
    records = jsonio.read_json(path)  # an unreadable list file is fatal, not a skip
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA records")
    return records


def list_input_shards(inputs: Sequence[str], records_per_shard: int = 1000) -> list[InputShard]:
    """Every unit of work of a recap job, in a fixed order (rank r of W takes units r, r + W, ...)."""
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    shards: list[InputShard] = []
    for path in (p for pattern in inputs for p in _expand(pattern)):
        if path.suffix in LLAVA_SUFFIXES:
            records = read_llava_records(path)
            shards += [InputShard(f"{path.stem}-{i // records_per_shard:06d}.tar", path, i,
                                  tuple(records[i:i + records_per_shard]))
                       for i in range(0, len(records), records_per_shard)]
        elif path.suffix == ".tar":
            shards.append(InputShard(path.name, path))
        else:
            raise ValueError(f"recap input {path}: expected WebDataset .tar shards or a LLaVA .json/.jsonl file")
    names = [shard.name for shard in shards]
    if clash := sorted({name for name in names if names.count(name) > 1}):
        raise ValueError(f"two inputs would write the same output shard(s) {clash}; rename one of them")
    return shards


def _first_answer(conversations: Any) -> str:
    """The first assistant turn of a LLaVA conversation, without image markers ("" when there is none)."""
    for turn in conversations if isinstance(conversations, list) else []:
        if isinstance(turn, dict) and turn.get("from", turn.get("role")) in ("gpt", "assistant"):
            return str(turn.get("value", turn.get("content", ""))).replace(IMAGE_MARKER, "").strip()
    return ""


def _original_caption(record: dict[str, Any], txt: str | None) -> str:
    if txt is not None:
        return txt.strip()
    caption = record.get("caption")
    return caption.strip() if isinstance(caption, str) else _first_answer(record.get("conversations"))


def _tar_item(sample: dict[str, Any]) -> InputItem:
    key = sample["__key__"]
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    item = InputItem(key, members, image_ext=next((e for e in IMAGE_EXTENSIONS if e in members), None))
    try:
        record = jsonio.loads(members["json"]) if "json" in members else {}
        txt = members["txt"].decode("utf-8") if "txt" in members else None
    except ValueError as err:  # not UTF-8, or not JSON
        item.problem = ("malformed_record", f"{key}: {err}")
        return item
    if not isinstance(record, dict):
        item.problem = ("malformed_record", f"{key}: the json member is not an object")
        return item
    item.record, item.original_caption = record, _original_caption(record, txt)
    if item.image_ext is None:
        item.problem = ("no_image", f"{key} has no {'/'.join(IMAGE_EXTENSIONS)} member (members {sorted(members)})")
    return item


def _llava_item(index: int, record: Any, image_root: Path) -> InputItem:
    item = InputItem(f"{index:08d}")
    if not isinstance(record, dict):
        item.problem = ("malformed_record", f"record {index} is not a JSON object")
        return item
    item.record, item.original_caption = record, _original_caption(record, None)
    image = record.get("image")
    names = [image] if isinstance(image, str) else image if isinstance(image, list) else []
    if len(names) != 1 or not isinstance(names[0], str):
        item.problem = ("no_image" if not names else "not_single_image",
                        f"record {index} names {len(names)} images; a caption describes exactly one")
        return item
    path = image_root / names[0]
    ext = path.suffix.lower().lstrip(".")
    try:
        data = path.read_bytes()
        if ext not in IMAGE_EXTENSIONS:  # a format WebDataset readers do not decode: store it as PNG
            data, ext = png_bytes(open_image(data)), "png"
    except FileNotFoundError as err:
        item.problem = ("missing_image", f"{path}: {err}")
        return item
    except (OSError, ImageLoadError) as err:
        item.problem = ("bad_image", f"{path}: {err}")
        return item
    item.members[ext], item.image_ext = data, ext
    return item


def iter_items(shard: InputShard, shard_errors: list[dict[str, str]], image_root: Path | None = None
               ) -> Iterator[InputItem]:
    """The samples of one unit of work. Unreadable stretches of a tar are appended to `shard_errors` and skipped."""
    if shard.is_llava:
        root = image_root if image_root is not None else shard.path.parent
        for offset, record in enumerate(shard.records):
            yield _llava_item(shard.start + offset, record, root)
        return

    def on_error(exn: Exception) -> bool:
        # a tar stream cannot be read past a damaged spot, and webdataset reports it at two levels: count it once
        if not shard_errors:
            shard_errors.append({"reason": "bad_shard", "detail": repr(exn)})
        return True

    for sample in wds.DataPipeline(wds.SimpleShardList([str(shard.path)]), wds.tarfile_to_samples(handler=on_error)):
        yield _tar_item(sample)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _fsync_replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself must survive a crash
    finally:
        os.close(directory)


def decisions_path(output: Path, shard_name: str) -> Path:
    return output / f"{shard_name.removesuffix('.tar')}{DECISIONS_SUFFIX}"


def is_finished(output: Path, shard: InputShard) -> bool:
    return (output / shard.name).exists() and decisions_path(output, shard.name).exists()


def read_decisions(output: Path, shard_name: str) -> dict[str, Any]:
    return jsonio.read_json(decisions_path(output, shard_name))


class AtomicShardWriter:
    """Write one output shard to `NAME.tar.tmp`; `commit(decisions)` makes it (and its decision file) final."""

    def __init__(self, output: Path, shard_name: str) -> None:
        self.final = output / shard_name
        self.tmp = self.final.with_name(self.final.name + TMP_SUFFIX)
        self._file = open(self.tmp, "wb")  # truncates a stray .tmp of a killed run
        self._tar = wds.TarWriter(self._file)

    def write(self, sample: dict[str, Any]) -> None:
        self._tar.write(sample)

    def commit(self, decisions: dict[str, Any]) -> None:
        self._tar.close()  # ends the tar stream; the file object is ours to close
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final_decisions = decisions_path(self.final.parent, self.final.name)
        tmp_decisions = final_decisions.with_name(final_decisions.name + TMP_SUFFIX)
        with open(tmp_decisions, "w", encoding="utf-8") as handle:
            json.dump(decisions, handle, indent=1)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_replace(tmp_decisions, final_decisions)
        _fsync_replace(self.tmp, self.final)  # last: the tar's existence marks the shard finished

    def abort(self) -> None:
        """Close without committing (the `.tmp` stays; a rerun overwrites it, as after a kill)."""
        if not self._file.closed:
            self._tar.close()
            self._file.close()
