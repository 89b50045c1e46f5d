"""Model folders on disk: safetensors read one tensor at a time, written in shards, and folders made atomically.

Conversion streams checkpoints far larger than memory through `iter_safetensors` and `ShardWriter`; the training
export and conversion both write under a temporary name with `AtomicFolder`, so a reader never sees half a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS_INDEX = "model.safetensors.index.json"


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from a folder's safetensors, sharded or not, loading one tensor at a time."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder} (PyTorch .bin files are not loaded: they unpickle)")
    for name in files:
        with safe_open(folder / name, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


class ShardWriter:
    """Writes tensors into `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_bytes`, plus the index."""

    def __init__(self, folder: Path, max_shard_bytes: int = 5 * 2**30):
        self.folder, self.max_bytes = Path(folder), max_shard_bytes
        self.shards: list[dict[str, torch.Tensor]] = [{}]
        self.sizes = [0]
        self.written: list[str] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.sizes[-1] and self.sizes[-1] + nbytes > self.max_bytes:
            self._flush()
        self.shards[-1][key] = tensor.contiguous()
        self.sizes[-1] += nbytes

    def _flush(self) -> None:
        name = f"part-{len(self.written):05d}.safetensors"
        save_file(self.shards[-1], str(self.folder / name), metadata={"format": "pt"})
        self.written.append(name)
        self.shards[-1], self.sizes[-1] = {}, 0  # free the tensors of the written shard

    def close(self) -> None:
        """Flush, then rename shards to the HF naming (the total is only known now) and write the index if sharded."""
        if self.shards[-1] or not self.written:
            self._flush()
        n = len(self.written)
        weight_map: dict[str, str] = {}
        for i, tmp in enumerate(self.written):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            with safe_open(self.folder / final, framework="pt") as f:
                weight_map.update({k: final for k in f.keys()})
        if n > 1:
            total = sum((self.folder / f).stat().st_size for f in set(weight_map.values()))
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))


class AtomicFolder:
    """Build a folder under a temporary name beside `dst` and rename it into place only when complete."""

    def __init__(self, dst: Path, overwrite: bool):
        self.dst = Path(dst)
        if self.dst.exists() and not overwrite:
            raise FileExistsError(f"{self.dst} exists; pass overwrite=True (--overwrite) to replace it")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.", dir=self.dst.parent))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.dst.exists():
            shutil.rmtree(self.dst)
        os.replace(self.tmp, self.dst)
