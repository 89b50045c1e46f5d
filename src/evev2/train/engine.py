"""The training engine: one process on CPU, FSDP2 under torchrun, exact resume.

Each optimiser step draws `global_batch` samples (each rank draws its share from its own shard of every source),
packs them into rows of at most `token_budget` spliced tokens, and runs the rows in micro-batches. The loss is the
sum over all supervised tokens of the step divided by their global count, so the step is the same whatever the number
of ranks, micro-batches or packing: a 2-rank run reproduces a 1-rank run, and a resumed run an uninterrupted one.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from evev2.data.datasets import LlavaJsonSource, MixtureDataset, SampleSource, WebDatasetSource
from evev2.data.packing import collate_rows, first_fit_rows
from evev2.data.processor import EVEProcessor
from evev2.data.samples import DataStats, Sample, SampleBuilder
from evev2.data.templates import IGNORE_INDEX
from evev2.model import EVEForCausalLM
from evev2.model.convert import ShardWriter, AtomicFolder
from evev2.distributed import distributed_session, init_distributed
from evev2.train.checkpoint import checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from evev2.train.groups import freeze_except
from evev2.train.parallel import parallelize
from evev2.train.recipe import Recipe, load_recipe

log = logging.getLogger(__name__)


@dataclass
class StepMetrics:
    step: int
    loss: float
    lr: float
    tokens: int  # spliced tokens (text + image) of the step, all ranks
    supervised_tokens: int
    packing_efficiency: float
    tokens_per_second: float
    skipped_samples: int


def _all_reduce(value: float | int, op: str = "sum") -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.item()


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_ratio: float):
    warmup = max(1, round(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:  # `step` = optimiser steps already taken
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_sources(recipe: Recipe, builder: SampleBuilder, stats: DataStats) -> list[SampleSource]:
    sources: list[SampleSource] = []
    for spec in recipe.data.sources:
        if spec.type == "llava":
            sources.append(LlavaJsonSource(spec.name, spec.path, builder, stats, image_root=spec.image_root or None,
                                           json_root=spec.json_root or None, seed=recipe.data.seed))
        else:
            shards = sorted(glob.glob(spec.path))
            if not shards:
                raise FileNotFoundError(f"data source {spec.name!r}: no shards match {spec.path}")
            sources.append(WebDatasetSource(spec.name, shards, builder, stats, seed=recipe.data.seed))
    return sources


class Trainer:
    def __init__(self, recipe: Recipe, output: str | Path, resume: bool = False, max_steps: int | None = None,
                 show_progress: bool = True):
        self.recipe, self.output = recipe, Path(output)
        self.rank, self.world, self.device = init_distributed()
        train = recipe.train
        if train.global_batch % self.world:
            raise ValueError(f"train.global_batch {train.global_batch} is not divisible by {self.world} ranks")
        self.stop_step = min(max_steps, train.steps) if max_steps else train.steps
        self.show_progress = show_progress and self.rank == 0
        torch.manual_seed(train.seed)

        cuda = self.device.type == "cuda"
        self.compute_dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
                              "bfloat16": torch.bfloat16}[recipe.model.dtype]
        attention = recipe.model.attn_implementation
        if attention == "auto":  # packed rows need a block-causal mask; SDPA with a boolean mask is slow on GPU
            attention = "flex_attention" if cuda else "sdpa"
        log.info("attention: %s over packed rows (block-causal, one sample never attends to another)", attention)
        model = EVEForCausalLM.from_pretrained(recipe.model.source, dtype=torch.float32,  # fp32 master weights
                                               attn_implementation=attention)
        trainable = freeze_except(model, train.trainable)
        model.to(self.device).train()
        self.model = parallelize(model, self.device, self.compute_dtype, train.activation_checkpointing, train.compile)
        current = dict(self.model.named_parameters(remove_duplicate=False))  # FSDP2 swaps in sharded parameters
        self.trainable = {g: [(n, current[n]) for n, _ in params] for g, params in trainable.items()}
        self.autocast = cuda and self.world == 1 and self.compute_dtype != torch.float32  # FSDP2 casts by itself
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(train.steps, recipe.optim.warmup_ratio, recipe.optim.min_lr_ratio))

        saved = EVEProcessor.from_pretrained(recipe.model.source, max_size=recipe.data.max_size,
                                             resize_policy=recipe.data.resize_policy)
        self.processor = EVEProcessor(saved.tokenizer, saved.image_processor, template=recipe.data.template)
        self.stats = DataStats(max_bad_fraction=recipe.data.max_bad_fraction)
        builder = SampleBuilder(self.processor, recipe.data.token_budget)
        sources = build_sources(recipe, builder, self.stats)
        self.data = MixtureDataset(sources, [s.weight for s in recipe.data.sources], seed=recipe.data.seed)
        self.step = 0
        self.metrics_path = self.output / "metrics.jsonl"
        self.checkpoint_dir = self.output / "checkpoints"
        self._stop_requested = False
        if resume and checkpoints(self.checkpoint_dir):
            self._resume(checkpoints(self.checkpoint_dir)[-1])

    # ----- setup -----
    def _optimizer(self) -> torch.optim.AdamW:
        optim = self.recipe.optim
        groups = []
        for group, params in self.trainable.items():
            lr = optim.group_lr.get(group, optim.lr)
            decay = [p for _, p in params if p.ndim >= 2]  # no decay on norms, biases and marker vectors
            no_decay = [p for _, p in params if p.ndim < 2]
            groups += [{"params": decay, "lr": lr, "weight_decay": optim.weight_decay, "name": f"{group}"},
                       {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{group}/no_decay"}]
        groups = [g for g in groups if g["params"]]
        fused = self.device.type == "cuda"
        return torch.optim.AdamW(groups, betas=tuple(optim.betas), eps=optim.eps, fused=fused)

    def _resume(self, path: Path) -> None:
        extra = load_checkpoint(path, self.model, self.optimizer)
        self.step = int(extra["step"])
        self.scheduler.load_state_dict(extra["scheduler"])
        self.data.load_state_dict(json.loads(extra["data"]))
        set_rng_state(extra["rng"])
        if self.rank == 0 and self.metrics_path.exists():  # drop steps logged after the checkpoint by the killed run
            lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
            self.metrics_path.write_text("".join(ln + "\n" for ln in kept))
        log.info("resumed from %s at step %d", path, self.step)

    def _save(self) -> Path:
        extra = {"step": self.step, "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                 "data": json.dumps(self.data.state_dict())}
        return save_checkpoint(self.checkpoint_dir, self.step, self.model, self.optimizer, extra,
                               self.recipe.checkpoint.keep_last)

    # ----- one optimiser step -----
    def _micro_batches(self, samples: list[Sample]) -> list[Any]:
        rows = first_fit_rows(samples, self.recipe.data.token_budget)
        mb = self.recipe.train.micro_batch_rows
        pad = self.processor.tokenizer.pad_token_id
        return [collate_rows(rows[i:i + mb], pad) for i in range(0, len(rows), mb)]

    def _forward_backward(self, batch: Any, num_items: float, dummy: bool) -> torch.Tensor:
        labels = batch["labels"].to(self.device)
        if dummy:  # a rank with fewer micro-batches still joins every collective, contributing zero
            labels = torch.full_like(labels, IGNORE_INDEX)
        images = [img.to(self.device) for img in batch["images"]]
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.autocast):
            loss = self.model(input_ids=batch["input_ids"].to(self.device), images=images,
                              attention_mask=batch["attention_mask"].to(self.device), labels=labels,
                              num_items_in_batch=num_items).loss
            if not images and "patch_embed" in self.trainable:
                # keep the patch embedding in the graph (zero gradient) so that all ranks reduce the same tensors
                dummy_image = torch.zeros(3, 32, 32, device=self.device)
                loss = loss + 0.0 * self.model.model.patch_embed([dummy_image])[0].sum()
        # FSDP averages gradients over ranks; the loss is already normalised by the global token count
        (loss * self.world).backward()
        return loss.detach()

    def train_step(self) -> StepMetrics:
        start = time.perf_counter()
        per_rank = self.recipe.train.global_batch // self.world
        samples = [self.data.next_sample() for _ in range(per_rank)]
        supervised = sum(int((s.labels[1:] != IGNORE_INDEX).sum()) for s in samples)
        tokens = sum(s.num_tokens for s in samples)
        batches = self._micro_batches(samples)
        global_supervised = _all_reduce(supervised)
        n_micro = int(_all_reduce(len(batches), "max"))
        loss = torch.zeros((), device=self.device)
        for i in range(n_micro):
            loss += self._forward_backward(batches[min(i, len(batches) - 1)], max(global_supervised, 1.0),
                                           dummy=i >= len(batches))
        params = [p for group in self.trainable.values() for _, p in group]
        torch.nn.utils.clip_grad_norm_(params, self.recipe.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        rows = sum(b["input_ids"].shape[0] for b in batches)
        global_tokens = _all_reduce(tokens)
        budget = _all_reduce(rows) * self.recipe.data.token_budget
        return StepMetrics(step=self.step, loss=_all_reduce(loss.item()), lr=lr, tokens=int(global_tokens),
                           supervised_tokens=int(global_supervised), packing_efficiency=global_tokens / budget,
                           tokens_per_second=global_tokens / (time.perf_counter() - start),
                           skipped_samples=int(_all_reduce(self.stats.num_skipped)))

    # ----- the loop -----
    def train(self) -> Path | None:
        """Run to `stop_step`; export an HF folder at the end of the stage. Returns the export folder (rank 0)."""
        self.output.mkdir(parents=True, exist_ok=True)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        writer = _tensorboard(self.output / "tensorboard") if self.rank == 0 else None
        bar = tqdm(total=self.stop_step, initial=self.step, desc=self.recipe.name, disable=not self.show_progress,
                   dynamic_ncols=True)
        started = time.perf_counter()
        try:
            while self.step < self.stop_step:
                m = self.train_step()
                if self.rank == 0:
                    with self.metrics_path.open("a") as f:
                        f.write(json.dumps(asdict(m)) + "\n")
                    if writer is not None:
                        for key in ("loss", "lr", "tokens_per_second", "packing_efficiency"):
                            writer.add_scalar(f"train/{key}", getattr(m, key), m.step)
                    bar.set_postfix(loss=f"{m.loss:.4f}", lr=f"{m.lr:.2e}", tok_s=f"{m.tokens_per_second:.0f}",
                                    pack=f"{m.packing_efficiency:.2f}", skipped=m.skipped_samples)
                    bar.update(1)
                every = self.recipe.checkpoint.every
                stop = bool(_all_reduce(int(self._stop_requested), "max"))
                if stop or (every and self.step % every == 0) or self.step == self.stop_step:
                    self._save()
                if stop:
                    log.warning("SIGTERM: saved a checkpoint at step %d and stopped", self.step)
                    return None
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous)
            if writer is not None:
                writer.close()
        log.info("trained %d steps in %.1f s; data: %s", self.step, time.perf_counter() - started,
                 self.stats.summary())
        export = self.export(self.output / "export") if self.step >= self.recipe.train.steps else None
        if self.rank == 0:
            plot_loss_curves({self.recipe.name: self.metrics_path}, self.output / "loss_curve.png")
        return export

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop_requested = True

    def export(self, folder: Path) -> Path:
        """An HF `save_pretrained` folder (safetensors + config + processor) that the next stage loads."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            model = self.model
            if model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            with AtomicFolder(folder, overwrite=True) as tmp:
                writer = ShardWriter(tmp)
                for key, tensor in state.items():
                    writer.add(key, tensor)
                writer.close()
                model.config.save_pretrained(tmp)
                self.processor.save_pretrained(tmp)
        if dist.is_initialized():
            dist.barrier()
        return folder


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(folder))


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (one JSON object per logged step)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curves(runs: dict[str, Path], out: Path) -> None:
    """One PNG with the loss curve of each run (metrics.jsonl files), labelled by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, path in runs.items():
        rows = read_metrics(path)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (supervised tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def train_cli(*, recipe: Path, output: str | None = None, max_steps: int | None = None, resume: bool = False,
              overrides: list[str] | None = None) -> Path | None:
    """Train one stage from a TOML recipe (single process, or FSDP2 under torchrun).

    Args:
        recipe: the stage recipe (recipes/*.toml).
        output: run folder (checkpoints, metrics.jsonl, loss_curve.png, export/); default: the recipe's `output`.
        max_steps: stop after this many steps (the schedule still spans the recipe's `train.steps`).
        resume: continue from the newest checkpoint in the run folder.
        overrides: recipe fields as key=value, e.g. train.steps=20 optim.lr=1e-4.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = load_recipe(recipe, overrides)
    with distributed_session():
        trainer = Trainer(spec, output or spec.output, resume=resume, max_steps=max_steps)
        export = trainer.train()
        if export is not None and trainer.rank == 0:
            print(f"exported {export}")
    return export
