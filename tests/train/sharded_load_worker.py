"""One rank of `test_sharded_load.py`, run as a file by torchrun: `build_training_model` on a saved folder, and what the
test checks written to OUT/rank{R}.pt.

Always: this rank's peak RSS growth across construction and load, requires_grad of every parameter, the trainable
groups and whether the embeddings are still tied. With --inputs (input_ids and images saved by the test): also every
parameter's local shard, every buffer, and the eval-mode logits on those inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from evev2.distributed import distributed_session
from evev2.train.parallel import build_training_model


def status_kb(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident so far), in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--trainable", nargs="+", required=True)
    parser.add_argument("--inputs", type=Path)
    args = parser.parse_args()
    with distributed_session() as (rank, _, device):
        before = status_kb("VmRSS")  # after imports and joining the group: what construction + load add
        model, trainable = build_training_model(args.folder, device, "sdpa", args.trainable, torch.float32,
                                                activation_checkpointing=False, compile=False)
        peak = status_kb("VmHWM")
        params = dict(model.named_parameters(remove_duplicate=False))
        result = {
            "rss_growth_kb": peak - before,
            "requires_grad": {n: p.requires_grad for n, p in params.items()},
            "trainable": {g: [n for n, _ in group] for g, group in trainable.items()},
            "trainable_are_current": all(p is params[n] for group in trainable.values() for n, p in group),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        }
        if args.inputs:
            result["shards"] = {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone()
                                for n, p in params.items()}  # FSDP2 shards dim 0: rank 0 holds the first half
            result["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
            ids, images = torch.load(args.inputs)
            with torch.no_grad():
                result["logits"] = model.eval()(input_ids=ids, images=images).logits
        torch.save(result, args.out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
