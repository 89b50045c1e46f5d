"""The training engine: one process on CPU, FSDP2 under torchrun, exact resume.

Each optimiser step reads `global_batch` records (each rank its share, from its own shard of every source); DataLoader
workers decode them, pack the good ones into rows of at most `token_budget` spliced tokens and collate the rows into
micro-batches (`evev2.data.loader`), while the training process only moves ready micro-batches to the device. The loss
is the sum over all supervised tokens of the step divided by their global count, so the step is the same whatever the
number of ranks, workers, micro-batches or packing: a 2-rank run reproduces a 1-rank run, and a resumed run an
uninterrupted one.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm import tqdm

from evev2.data.datasets import LlavaJsonSource, Mixture, SampleSource, WebDatasetSource
from evev2.data.loader import PreparedStep, StepStream, default_num_workers, step_loader
from evev2.data.processor import EVEProcessor
from evev2.data.samples import DataStats, SampleBuilder
from evev2 import jsonio
from evev2.constants import IGNORE_INDEX
from evev2.model.weights import AtomicFolder
from evev2.distributed import distributed_session, init_distributed
from evev2.train.checkpoint import checkpoints, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from evev2.train.lora import export_lora
from evev2.train.parallel import build_training_model
from evev2.train.recipe import Recipe, RecipeError, load_recipe
from evev2.train.record import check_resume, write_run_record

log = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    step_time_s: float  # wall time of the whole step, data wait included
    data_wait_s: float  # time the step waited for its data (the slowest rank's)


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


def build_sources(recipe: Recipe, builder: SampleBuilder, rank: int = 0, world: int = 1) -> list[SampleSource]:
    sources: list[SampleSource] = []
    for spec in recipe.data.sources:
        if spec.type == "llava":
            sources.append(LlavaJsonSource(spec.name, spec.path, builder, image_root=spec.image_root or None,
                                           json_root=spec.json_root or None, seed=recipe.data.seed, rank=rank,
                                           world=world))
        else:
            shards = sorted(glob.glob(spec.path))
            if not shards:
                raise FileNotFoundError(f"data source {spec.name!r}: no shards match {spec.path}")
            sources.append(WebDatasetSource(spec.name, shards, builder, seed=recipe.data.seed, rank=rank, world=world))
    return sources


class Trainer:
    def __init__(self, recipe: Recipe, output: str | Path, resume: bool = False, max_steps: int | None = None,
                 show_progress: bool = True, force: bool = False):
        self.recipe, self.output = recipe, Path(output)
        if resume:  # before any weight is loaded
            check_resume(self.output, recipe, force)
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
        if attention == "flex_attention" and not cuda:
            raise RecipeError('model.attn_implementation = "flex_attention" trains only on CUDA (torch has no '
                              'FlexAttention backward on CPU); use "sdpa" or "auto"')
        compile = cuda if train.compile == "auto" else train.compile
        overrides = {"image_attention": recipe.model.image_attention} if recipe.model.image_attention else {}
        self.model, self.trainable = build_training_model(recipe.model.source, self.device, attention, train.trainable,
                                                          self.compute_dtype, train.activation_checkpointing, compile,
                                                          overrides, recipe.lora, train.seed)
        packed_rows = "sample by sample" if attention == "sdpa" else "one block-causal mask per row"
        log.info("attention: %s over packed rows (%s: one sample never attends to another), %s image attention",
                 attention, packed_rows, self.model.config.image_attention)
        log.info("trainable parameters: %s", ", ".join(f"{g} {sum(p.numel() for _, p in params):,}"
                                                       for g, params in self.trainable.items()))
        self.autocast = cuda and self.world == 1 and self.compute_dtype != torch.float32  # FSDP2 casts by itself
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(train.steps, recipe.optim.warmup_ratio, recipe.optim.min_lr_ratio))

        saved = EVEProcessor.from_pretrained(recipe.model.source, max_size=recipe.data.max_size,
                                             resize_policy=recipe.data.resize_policy)
        self.processor = EVEProcessor(saved.tokenizer, saved.image_processor, template=recipe.data.template)
        self.stats = DataStats(max_bad_fraction=recipe.data.max_bad_fraction,
                               min_seen=recipe.data.guard_min_samples)
        sources = build_sources(recipe, self._sample_builder(), self.rank, self.world)
        self.mixture = Mixture(sources, [s.weight for s in recipe.data.sources], seed=recipe.data.seed,
                               spans=[s.span for s in recipe.data.sources], steps=train.steps)
        self.data_state = self.mixture.state_dict()  # the stream's state after the last step taken
        workers = recipe.data.num_workers
        self.num_workers = default_num_workers(cuda) if workers == "auto" else workers
        self._steps: Iterator[PreparedStep] | None = None  # started by the first step, after any resume
        log.info("data: %d records per rank per step, prepared by %s", train.global_batch // self.world,
                 f"{self.num_workers} worker processes" if self.num_workers else "the training process")
        self.step = 0
        self.metrics_path = self.output / "metrics.jsonl"
        self.checkpoint_dir = self.output / "checkpoints"
        self._stop_requested = False
        if resume and checkpoints(self.checkpoint_dir):
            self._resume(checkpoints(self.checkpoint_dir)[-1])

    # ----- setup -----
    def _sample_builder(self) -> SampleBuilder:
        """Record -> sample (tokenize, decode, resize); runs in the data workers."""
        return SampleBuilder(self.processor, self.recipe.data.token_budget)

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
        data = json.loads(extra["data"])
        self.mixture.load_state_dict(data["mixture"])
        self.data_state = data["mixture"]
        self.stats.load_state_dict(data["stats"])
        set_rng_state(extra["rng"])
        if self.rank == 0 and self.metrics_path.exists():
            # drop the steps the killed run logged after the checkpoint, and a line it was killed while writing
            rows = [row for _, row in jsonio.json_lines(self.metrics_path) if isinstance(row, dict)]
            jsonio.write_jsonl(self.metrics_path, [row for row in rows if row["step"] <= self.step])
        log.info("resumed from %s at step %d", path, self.step)

    def _save(self) -> Path:
        extra = {"step": self.step, "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                 "data": json.dumps({"mixture": self.data_state, "stats": self.stats.state_dict()})}
        return save_checkpoint(self.checkpoint_dir, self.step, self.model, self.optimizer, extra,
                               self.recipe.checkpoint.keep_last)

    # ----- one optimiser step -----
    def _next_step_data(self) -> PreparedStep:
        if self._steps is None:
            data, train = self.recipe.data, self.recipe.train
            stream = StepStream(self.mixture, train.global_batch // self.world, data.token_budget,
                                train.micro_batch_rows, self.processor.tokenizer.pad_token_id, start_step=self.step)
            self._steps = step_loader(stream, self.num_workers, pin_memory=self.device.type == "cuda")
        prepared = next(self._steps)
        if prepared.index != self.step + 1:
            raise RuntimeError(f"data for step {prepared.index} arrived at step {self.step + 1}")
        return prepared

    def _empty_batch(self) -> dict[str, Any]:
        """One padding token without a label: the micro-batch of a rank whose step lost every record."""
        one = torch.ones(1, 1, dtype=torch.long)
        return {"input_ids": one * self.processor.tokenizer.pad_token_id, "attention_mask": one,
                "labels": one * IGNORE_INDEX, "images": []}

    def _forward_backward(self, batch: dict[str, Any], num_items: float, dummy: bool) -> torch.Tensor:
        to_device = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731 (pinned on GPU: the copy overlaps)
        labels = to_device(batch["labels"])
        if dummy:  # a rank with fewer micro-batches still joins every collective, contributing zero
            labels = torch.full_like(labels, IGNORE_INDEX)
        images = [to_device(img) for img in batch["images"]]
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.autocast):
            loss = self.model(input_ids=to_device(batch["input_ids"]), images=images,
                              attention_mask=to_device(batch["attention_mask"]), labels=labels,
                              num_items_in_batch=num_items).loss
        # FSDP averages gradients over ranks; the loss is already normalised by the global token count
        (loss * self.world).backward()
        return loss.detach()

    def train_step(self) -> StepMetrics:
        start = time.perf_counter()
        prepared = self._next_step_data()
        data_wait = time.perf_counter() - start
        self.stats.record_kept(prepared.kept)
        for skip in prepared.skips:
            self.stats.record_skip(skip.reason, skip.source, skip.detail)
        self.data_state = prepared.state
        batches = prepared.micro_batches
        global_supervised = _all_reduce(prepared.supervised_tokens)
        n_micro = int(_all_reduce(len(batches), "max"))
        loss = torch.zeros((), device=self.device)
        for i in range(n_micro):
            batch = batches[min(i, len(batches) - 1)] if batches else self._empty_batch()
            loss += self._forward_backward(batch, max(global_supervised, 1.0), dummy=i >= len(batches))
        params = [p for group in self.trainable.values() for _, p in group]
        torch.nn.utils.clip_grad_norm_(params, self.recipe.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        global_tokens = _all_reduce(prepared.tokens)
        budget = max(_all_reduce(prepared.rows), 1) * self.recipe.data.token_budget
        elapsed = time.perf_counter() - start
        return StepMetrics(step=self.step, loss=_all_reduce(loss.item()), lr=lr, tokens=int(global_tokens),
                           supervised_tokens=int(global_supervised), packing_efficiency=global_tokens / budget,
                           tokens_per_second=global_tokens / elapsed,
                           skipped_samples=int(_all_reduce(self.stats.num_skipped)), step_time_s=elapsed,
                           data_wait_s=_all_reduce(data_wait, "max"))

    # ----- the loop -----
    def train(self) -> Path | None:
        """Run to `stop_step`; export an HF folder at the end of the stage. Returns the export folder (rank 0)."""
        self.output.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            write_run_record(self.output, self.recipe, world_size=self.world, device=self.device)
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
                                    pack=f"{m.packing_efficiency:.2f}", wait=f"{m.data_wait_s:.2f}s",
                                    skipped=m.skipped_samples)
                    bar.update(1)
                every = self.recipe.checkpoint.every
                stop = bool(_all_reduce(int(self._stop_requested), "max"))
                if stop or (every and self.step % every == 0) or self.step == self.stop_step:
                    self._save()
                if stop:
                    log.warning("SIGTERM: saved a checkpoint at step %d and stopped", self.step)
                    return None
        finally:
            self._steps = None  # stops the data workers
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
        """An HF `save_pretrained` folder (safetensors + config + processor) that the next stage loads; after LoRA, the
        adapters merged into it, or a PEFT adapter folder (`lora.export`, see `export_lora`)."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            with AtomicFolder(folder, overwrite=True) as tmp:
                if self.recipe.lora:
                    export_lora(state, self.model.config, self.recipe.lora, self.recipe.train.trainable,
                                self.recipe.model.source, tmp)
                else:
                    if self.model.config.tie_word_embeddings:  # gathered copies no longer share storage for HF
                        state.pop("lm_head.weight", None)
                    self.model.save_pretrained(tmp, state_dict=state)
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


def plot_loss_curves(runs: dict[str, Path], out: Path) -> None:
    """One PNG with the loss curve of each run (metrics.jsonl files), labelled by name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, path in runs.items():
        rows = jsonio.read_jsonl(path)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (supervised tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def train_cli(*, recipe: Path, output: str | None = None, max_steps: int | None = None, resume: bool = False,
              force: bool = False, overrides: list[str] | None = None) -> Path | None:
    """Train one stage from a TOML recipe (single process, or FSDP2 under torchrun).

    Args:
        recipe: the stage recipe: a TOML file (recipes/*.toml), or a shipped recipe by name (tiny/stage1,
            paper/stage2_2).
        output: run folder (checkpoints, metrics.jsonl, loss_curve.png, export/); default: the recipe's `output`.
        max_steps: stop after this many steps (the schedule still spans the recipe's `train.steps`).
        resume: continue from the newest checkpoint in the run folder (refused if the recipe changed since).
        force: resume even though training-relevant recipe fields changed (they are listed in a warning).
        overrides: recipe fields as key=value, e.g. train.steps=20 optim.lr=1e-4.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    spec = load_recipe(recipe, overrides)
    out = Path(output or spec.output)
    with distributed_session() as (rank, _, _), run_log(out / ("train.log" if rank == 0 else f"train.rank{rank}.log")):
        trainer = Trainer(spec, out, resume=resume, max_steps=max_steps, force=force)
        export = trainer.train()
        if export is not None and trainer.rank == 0:
            print(f"exported {export}")
    return export


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Copy every log line of the command into `path` (appended across launches), and the traceback of a failure:
    the console shows a user error as one line, the run folder keeps the details."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    except BaseException:
        handler.handle(logging.makeLogRecord({"name": __name__, "levelno": logging.ERROR, "levelname": "ERROR",
                                              "msg": "the command failed", "exc_info": sys.exc_info()}))
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
