"""The real training engine on real JPEGs: `evev2 train`'s `Trainer` against the synthetic step.

`gpu_train_step.py` times forward + backward on random tensors. This script times what users run, the `Trainer` of
`evev2 train`: the model loaded from a folder as fp32 master weights under bf16 autocast, DataLoader workers that read
WebDataset shards, decode the JPEGs, tokenize and pack, then gradient clipping and fused AdamW. Same batches:
* data: WebDataset shards of seeded photo-like JPEGs (gradients, smooth texture at two scales, fine noise, filled
  shapes; quality 90), each with a `txt` caption (the plain template supervises it) cut to an exact token count for
  a byte-level BPE trained here on the caption language (built offline; its ids lie far below the Qwen2.5
  vocabulary that the model keeps). `anchor`: 1280x1600 (2041 tokens) + 400 caption tokens per sample;
  `seq4096`: 1664x1984 (3277) + 819. `data.max_size` = the longer side, `max_area`: the size is kept (asserted
  through the token counts of every step). Cached in `--data`.
* model: Qwen2.5 dims (`--dims`, gpu_train_step's `SHAPES`), random init, every vision copy different from its text
  twin, saved in bf16 with an `EVEProcessor` (plain template) and the tokenizer; cached in `--data`.
* configurations, as recipe overrides (global batch 2 = the anchor batch, all groups trainable, `model.dtype = "auto"`):
  `rows_*`: one sample per row, SDPA (`token_budget` = one sample, both rows in one micro-batch); `packed_*`: both
  samples in one row, `attn_implementation = "auto"` (FlexAttention on GPU), `packed_sdpa_*` "sdpa" (causal SDPA
  sample by sample); `*_compiled` / `*_eager`: `train.compile`; `*_w0`: `data.num_workers = 0` (else "auto");
  `seq4096_compiled`: the seq4096 batch with the packing and attention of the fastest anchor configuration.
Each configuration runs `Trainer(...).train()` in this process for `--warmup` + `--steps` steps and reads its
metrics.jsonl. Step time: mean `step_time_s` after the warm-up (the first step holds the compilation); unlike the
synthetic step it includes the data wait, the optimiser step and gradient clipping. Also tokens/s, MFU (gpu_train_step's
formula and peak), `data_wait_s` as a fraction of the step time, peak GPU memory (fp32 weights, gradients and AdamW
state included), the first step's time and the Trainer's construction time (model load). The Trainer checkpoints its
last step (model + optimiser, ~46 GB at 1.5B): a subclass skips that save, and the schedule is longer than the run, so
nothing is exported.
After the first configuration of each batch, the same process measures `gpu_train_step.measure_step` (the official
re-creation and ours, compiled or eager as the configurations are) on the same card and batch, for the goals:
official / engine >= 2.0, engine / synthetic <= 1.10, data wait < 5% of the step, MFU >= 45% on seq4096.
Parts run in order of importance (`--configs`); one that would end past `--budget-s` (estimated as the mean of the
earlier parts of its kind) is skipped and reported as skipped; one that fails is reported with its error.
`--smoke`: tiny dims, 64x96 images, every configuration eager (names kept), 3 steps each: checks the script on the CPU.
Results: a table on stdout and one JSON per measurement appended to `--out`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw
from transformers import AutoTokenizer, PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402
from gpu_train_step import BATCHES, H100_PEAK, SHAPES, dense_params, measure_step  # noqa: E402

from evev2.data.image_processing import EVEImageProcessor, num_image_tokens  # noqa: E402
from evev2.data.processor import EVEProcessor  # noqa: E402
from evev2.demo.tokenizer import train_world_tokenizer  # noqa: E402
from evev2.model import EVEConfig, EVEForCausalLM  # noqa: E402
from evev2.model.weights import AtomicFolder  # noqa: E402
from evev2 import jsonio  # noqa: E402
from evev2.train.engine import Trainer  # noqa: E402
from evev2.train.recipe import load_recipe  # noqa: E402

WORDS = ("a the photo of red blue green small large wooden metal old new house tree car dog cat person street "
         "window door table chair sky cloud light shadow near behind next to under over on in with and two three "
         "some bright dark field road river mountain building wall sign text people standing sitting walking "
         "holding looking white black yellow orange purple brown grey corner center left right top bottom "
         "background foreground scene view picture shows there is are several many its their one front side").split()
TOKENIZER_VOCAB = 2048
SAMPLES_PER_SHARD = 8
GOALS = {"official_over_engine": 2.0, "engine_over_synthetic": 1.10, "data_wait_fraction": 0.05, "seq4096_mfu": 0.45}


@dataclass(frozen=True)
class Config:
    """One Trainer configuration, applied as recipe overrides."""

    name: str
    batch: str  # a BATCHES key
    packed: bool | None  # both samples in one row; None: as the fastest anchor configuration
    compile: bool  # train.compile
    workers: int | str  # data.num_workers
    attention: str = "auto"  # model.attn_implementation of packed rows ("auto": FlexAttention on GPU)


CONFIGS = {c.name: c for c in (
    Config("rows_compiled", "anchor", False, True, "auto"),
    Config("packed_compiled", "anchor", True, True, "auto"),
    Config("packed_sdpa_compiled", "anchor", True, True, "auto", "sdpa"),
    Config("seq4096_compiled", "seq4096", None, True, "auto"),
    Config("rows_compiled_w0", "anchor", False, True, 0),
    Config("rows_eager", "anchor", False, False, "auto"),
)}


# ----- data -----
def _texture(rng: np.random.Generator, height: int, width: int, cell: int, sigma: float) -> np.ndarray:
    """Zero-mean smooth noise (H, W, 3): a coarse Gaussian grid upsampled bicubically."""
    coarse = rng.normal(128, sigma, (max(2, height // cell), max(2, width // cell), 3))
    grid = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    return np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) - 128


def photo_jpeg(seed: int, height: int, width: int, quality: int = 90) -> bytes:
    """A photo-like JPEG, so that decoding costs what a photo's does (1280x1600: ~400 KB)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None, None]
    x = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :, None]
    slope_y, slope_x = rng.uniform(-150, 150, (2, 3)).astype(np.float32)
    pixels = rng.uniform(60, 200, 3).astype(np.float32) + slope_y * y + slope_x * x
    pixels = pixels + _texture(rng, height, width, 64, 30) + _texture(rng, height, width, 6, 12)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.03, 0.2) * width, rng.uniform(0.03, 0.2) * height
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
    noisy = np.asarray(image, dtype=np.int16) + rng.integers(-5, 6, (height, width, 3), dtype=np.int16)
    out = BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _pieces(rng: np.random.Generator) -> Iterator[str]:
    """Endless caption text as pre-token pieces (" word", "." after each sentence; the first piece has no space), so
    that its byte-level BPE token count is the sum of the pieces' counts."""
    first = True
    while True:
        for i in range(int(rng.integers(6, 15))):
            word = WORDS[int(rng.integers(len(WORDS)))]
            word = word.capitalize() if i == 0 else word
            yield word if first else " " + word
            first = False
        yield "."


def exact_caption(rng: np.random.Generator, tokenizer: PreTrainedTokenizerBase, length: int) -> str:
    """A caption of exactly `length` tokens as the plain template encodes it (the caption, then "\\n")."""
    count = functools.lru_cache(maxsize=None)(lambda piece: len(tokenizer(piece, add_special_tokens=False).input_ids))
    text, used = "", count("\n")
    for piece in _pieces(rng):
        if used + count(piece) > length:
            break
        text, used = text + piece, used + count(piece)
    if count(" and") != 1:
        raise RuntimeError("the caption tokenizer does not hold ' and' as one token")
    return text + " and" * (length - used)


def caption_tokenizer(folder: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """Byte-level BPE (Qwen-style special tokens) trained on the caption language; cached in `folder`."""
    if not folder.exists():
        rng = np.random.default_rng(0)
        pieces = _pieces(rng)
        corpus = ["".join(next(pieces) for _ in range(64)) for _ in range(500)]
        with AtomicFolder(folder, overwrite=False) as tmp:
            train_world_tokenizer(corpus, vocab_size).save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(folder)


def caption_conversation(caption: str) -> list[dict[str, str]]:
    """The conversation `WebDatasetSource` makes of an image + `txt` record."""
    return [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]


def write_shards(folder: Path, batch: str, samples: int, tokenizer: PreTrainedTokenizerBase) -> dict:
    """`samples` records (jpg + txt) of `batch` in tar shards of `SAMPLES_PER_SHARD`; kept when `folder` exists."""
    start = time.perf_counter()
    if not folder.exists():
        (height, width), text = BATCHES[batch]
        rng = np.random.default_rng([1, text])
        captions = [exact_caption(rng, tokenizer, text) for _ in range(samples)]
        processor = EVEProcessor(tokenizer, EVEImageProcessor(), template="plain")
        for caption in captions:  # the count the Trainer will see: one image placeholder + `text` supervised tokens
            encoded = processor.encode_conversation(caption_conversation(caption), num_images=1)
            assert len(encoded.input_ids) == text + 1 and sum(t >= 0 for t in encoded.labels) == text, caption
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # numpy and PIL release the GIL
            images = list(pool.map(lambda i: photo_jpeg(1000 * text + i, height, width), range(samples)))
        with AtomicFolder(folder, overwrite=False) as tmp:
            for first in range(0, samples, SAMPLES_PER_SHARD):
                with wds.TarWriter(str(tmp / f"shard-{first // SAMPLES_PER_SHARD:05d}.tar"), encoder=False) as sink:
                    for i in range(first, min(first + SAMPLES_PER_SHARD, samples)):
                        sink.write({"__key__": f"{i:06d}", "jpg": images[i], "txt": captions[i].encode()})
    shards = sorted(folder.glob("*.tar"))
    return {"shards": len(shards), "shard_mib": sum(p.stat().st_size for p in shards) / 2**20,
            "seconds": time.perf_counter() - start}


def build_model_folder(folder: Path, dims: str, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> dict:
    """A random EVEv2 model of `dims` saved in bf16 with a plain-template processor; kept when `folder` exists."""
    start = time.perf_counter()
    if not folder.exists():
        if len(tokenizer) > SHAPES[dims]["vocab_size"]:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids, over the model's vocabulary")
        torch.manual_seed(0)
        with torch.device(device):  # a CPU init of 3B parameters takes minutes
            model = EVEForCausalLM(EVEConfig(**SHAPES[dims], max_position_embeddings=8192))
            with torch.no_grad():  # independent init already; this also separates the norms and biases
                for name, p in model.named_parameters():
                    if ".vision_" in name:
                        p.add_(torch.randn_like(p) * 0.02)
        with AtomicFolder(folder, overwrite=False) as tmp:
            model.to(torch.bfloat16).save_pretrained(tmp)  # the Trainer loads fp32 master weights from it anyway
            EVEProcessor(tokenizer, EVEImageProcessor(), template="plain").save_pretrained(tmp)
        del model
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"model_gib": weights / 2**30, "seconds": time.perf_counter() - start}


# ----- measurements -----
def sample_tokens(batch: str) -> int:
    (height, width), text = BATCHES[batch]
    return num_image_tokens(height, width) + text


def flops_per_step(dims: str, batch: str) -> float:
    """gpu_train_step's count for 2 samples: 6*N*T + 6*L*d*B*S^2, N the parameters of one weight copy."""
    shape, S = SHAPES[dims], sample_tokens(batch)
    return 6 * dense_params(shape) * 2 * S + 6 * shape["num_hidden_layers"] * shape["hidden_size"] * 2 * S * S


def overrides(config: Config, shards: Path) -> list[str]:
    (height, width), _ = BATCHES[config.batch]
    sample = sample_tokens(config.batch)
    return [f"model.attn_implementation={config.attention if config.packed else 'sdpa'}",
            f"train.compile={str(config.compile).lower()}",
            f"data.num_workers={config.workers}",
            f"data.token_budget={2 * sample if config.packed else sample}",
            f"train.micro_batch_rows={1 if config.packed else 2}",
            f"data.max_size={max(height, width)}",
            f'data.sources=[{{ name = "jpeg", type = "webdataset", path = "{shards}/*.tar" }}]']


def write_recipe(path: Path, model: Path, schedule_steps: int) -> Path:
    """The base recipe; `schedule_steps` exceeds the run, so the Trainer never exports."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""name = "engine-bench"
output = "{path.parent / 'run'}"
[model]
source = "{model}"
dtype = "auto"
[data]
sources = [{{ name = "jpeg", type = "webdataset", path = "unset" }}]
template = "plain"
resize_policy = "max_area"
[optim]
lr = 1e-5
warmup_ratio = 0.0
[train]
trainable = ["patch_embed", "vision", "text", "embeddings"]
steps = {schedule_steps}
global_batch = 2
""")
    return path


def release_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # each configuration compiles afresh, as a new `evev2 train` process would
    if device.type == "cuda":
        torch.cuda.empty_cache()


class UncheckpointedTrainer(Trainer):
    """The Trainer without its checkpoint at the last step (model + AdamW: ~46 GB at 1.5B), which is not timed."""

    skipped_saves = 0

    def _save(self) -> None:
        self.skipped_saves += 1


def run_engine(config: Config, recipe: Path, shards: Path, dims: str, out: Path, warmup: int, steps: int,
               device: torch.device) -> dict:
    """`Trainer.train()` for warmup + steps steps; the per-step numbers come from its metrics.jsonl."""
    shutil.rmtree(out, ignore_errors=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = UncheckpointedTrainer(load_recipe(recipe, overrides(config, shards)), out, max_steps=warmup + steps,
                                    show_progress=False)
    init_s = time.perf_counter() - start
    attention, workers = trainer.model.config._attn_implementation, trainer.num_workers
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    skipped_saves = trainer.skipped_saves
    del trainer
    release_memory(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    left = torch.cuda.memory_allocated() / 2**30 if cuda else None  # not freed by the Trainer's end: a leak

    rows = jsonio.read_jsonl(out / "metrics.jsonl")
    sample = sample_tokens(config.batch)
    assert [r["step"] for r in rows] == list(range(1, warmup + steps + 1)), [r["step"] for r in rows]
    assert all(r["tokens"] == 2 * sample and r["packing_efficiency"] == 1.0 for r in rows), rows[0]
    measured = rows[warmup:]
    step_s = statistics.mean(r["step_time_s"] for r in measured)  # a mean: a stall every other step must show
    flops = flops_per_step(dims, config.batch)
    return {"kind": "engine", "config": config.name, "dims": dims, "batch": config.batch, "attention": attention,
            "packed": config.packed, "compile": config.compile, "workers": workers, "device": str(device),
            "tokens_per_step": 2 * sample, "flops_per_step": flops, "init_s": init_s, "train_s": train_s,
            "outside_steps_s": train_s - sum(r["step_time_s"] for r in rows),  # metrics, plot, worker shutdown
            "first_step_s": rows[0]["step_time_s"], "first_data_wait_s": rows[0]["data_wait_s"],
            "ms": step_s * 1e3, "tokens_per_s": 2 * sample / step_s, "mfu": flops / step_s / H100_PEAK,
            "data_wait_fraction": sum(r["data_wait_s"] for r in measured) / sum(r["step_time_s"] for r in measured),
            "peak_gib": peak, "left_allocated_gib": left, "checkpoints_skipped": skipped_saves,
            "losses_finite": all(math.isfinite(r["loss"]) for r in rows), "losses": [r["loss"] for r in rows],
            "step_ms": [r["step_time_s"] * 1e3 for r in rows], "data_wait_ms": [r["data_wait_s"] * 1e3 for r in rows]}


def synthetic_kinds(configs: list[Config], smoke: bool) -> list[str]:
    """The official re-creation and ours as the batch's configurations run (compiled or eager)."""
    return ["official", *dict.fromkeys("ours_compiled" if c.compile and not smoke else "ours" for c in configs)]


def ratios(records: list[dict], smoke: bool) -> dict:
    """Per engine configuration: official / engine, engine / synthetic (ours, compiled as it is), data wait, MFU."""
    synthetic = {r["batch"]: r for r in records if r["kind"] == "synthetic" and "skipped" not in r}
    out = {}
    for r in (r for r in records if r["kind"] == "engine" and "ms" in r):
        s = synthetic.get(r["batch"], {})
        twin = "ours_compiled" if r["compile"] and not smoke else "ours"
        entry = {"data_wait_fraction": r["data_wait_fraction"], "mfu": r["mfu"]}
        if "ms" in s.get("official", {}):
            entry["official_over_engine"] = s["official"]["ms"] / r["ms"]
        if "ms" in s.get(twin, {}):
            entry["engine_over_synthetic"] = r["ms"] / s[twin]["ms"]
            entry["synthetic_kind"] = twin
        out[r["config"]] = entry
    return out


def faster_packing(config: Config, records: list[dict]) -> Config:
    """`config` with the packing and attention of the fastest compiled anchor configuration."""
    ms = {r["config"]: r["ms"] for r in records if r["kind"] == "engine" and "ms" in r}
    best = CONFIGS[min(("rows_compiled", "packed_compiled", "packed_sdpa_compiled"), key=lambda n: ms.get(n, math.inf))]
    return replace(config, packed=best.packed, attention=best.attention)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny dims and images, eager, 3 steps (checks the script)")
    parser.add_argument("--dims", default="1.5B", choices=[d for d in SHAPES if d != "smoke"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                        help="in this order (the default is the order of importance)")
    parser.add_argument("--warmup", type=int, help="steps left out of the mean (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, help="measured steps per configuration (default 15; smoke 2)")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="skip a part that would end after this many seconds from the start")
    parser.add_argument("--data", type=Path, default=Path("runs/engine_bench/data"),
                        help="cache of the tokenizer, the shards and the model folder")
    parser.add_argument("--work", type=Path, default=Path("runs/engine_bench/work"), help="the Trainer runs")
    parser.add_argument("--out", type=Path, help="append one JSON line per measurement here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what the Trainer picks
    if device.type != "cuda" and not args.smoke:
        parser.error("needs a GPU (the 1.5B model does not train on a CPU); use --smoke to check the script")
    dims = "smoke" if args.smoke else args.dims
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    steps = args.steps if args.steps is not None else (2 if args.smoke else 15)
    configs = [CONFIGS[name] for name in args.configs]
    if args.smoke:  # tiny batch; eager, since inductor on the CPU would compile for minutes
        configs = [replace(c, batch="smoke", compile=False) for c in configs]
    records: list[dict] = []

    def emit(record: dict) -> None:
        records.append(record)
        print(json.dumps({k: v for k, v in record.items() if not isinstance(v, list)}), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")

    vocab = min(TOKENIZER_VOCAB, SHAPES[dims]["vocab_size"])
    tokenizer = caption_tokenizer(args.data / f"tokenizer-v{vocab}", vocab)
    samples = max(16, -(-2 * (warmup + steps) // SAMPLES_PER_SHARD) * SAMPLES_PER_SHARD)
    model = args.data / f"model-{dims}-v{vocab}"
    setup = {"kind": "setup", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
             "torch": torch.__version__, "dims": dims, "tokenizer_ids": len(tokenizer), "samples_per_batch": samples,
             "model_folder": build_model_folder(model, dims, tokenizer, device)}
    release_memory(device)
    emit(setup)
    recipe = write_recipe(args.work / "recipe.toml", model, schedule_steps=10 * (warmup + steps))

    durations: dict[str, list[float]] = {"engine": [], "synthetic": []}  # their mean: the next part's estimate

    def fits(kind: str) -> bool:
        estimate = statistics.mean(durations[kind]) if durations[kind] else 0.0
        return time.perf_counter() - started + estimate <= args.budget_s

    measured_batches: set[str] = set()
    for config in configs:
        if config.packed is None:
            config = faster_packing(config, records)
        if not fits("engine"):
            emit({"kind": "engine", "config": config.name, "batch": config.batch, "skipped": "time budget"})
            continue
        part = time.perf_counter()
        shards = args.data / f"{config.batch}-{samples}-v{vocab}"
        data = write_shards(shards, config.batch, samples, tokenizer)
        try:
            result = run_engine(config, recipe, shards, dims, args.work / config.name, warmup, steps, device)
        except Exception as error:  # one failing configuration must not lose the others' numbers
            logging.exception("configuration %s failed", config.name)
            result = {"kind": "engine", "config": config.name, "batch": config.batch,
                      "error": f"{type(error).__name__}: {error}"[:2000]}
        release_memory(device)
        emit({**result, "data": data, "wall_s": time.perf_counter() - part})
        durations["engine"].append(time.perf_counter() - part)
        if config.batch in measured_batches:
            continue
        measured_batches.add(config.batch)
        if not fits("synthetic"):
            emit({"kind": "synthetic", "batch": config.batch, "skipped": "time budget"})
            continue
        part = time.perf_counter()
        kinds = synthetic_kinds([c for c in configs if c.batch == config.batch], args.smoke)
        result = measure_step(dims, config.batch, kinds, device, steps)
        release_memory(device)
        emit({"kind": "synthetic", **result, "wall_s": time.perf_counter() - part})
        durations["synthetic"].append(time.perf_counter() - part)

    summary = {"kind": "summary", "goals": GOALS, "ratios": ratios(records, args.smoke),
               "wall_s": time.perf_counter() - started}
    emit(summary)
    engine = [r for r in records if r["kind"] == "engine" and "ms" in r]
    print_table(f"Trainer step, {dims} dims, global batch 2 ({device})",
                ["config", "batch", "attention", "compile", "workers", "init s", "first step s", "ms", "tokens/s",
                 "MFU", "data wait", "peak GiB", "official/engine", "engine/synthetic"],
                [[r["config"], r["batch"], r["attention"], r["compile"], r["workers"], r["init_s"], r["first_step_s"],
                  r["ms"], f"{r['tokens_per_s']:.0f}", f"{r['mfu']:.1%}", f"{r['data_wait_fraction']:.1%}",
                  "-" if r["peak_gib"] is None else r["peak_gib"],
                  summary["ratios"][r["config"]].get("official_over_engine", "-"),
                  summary["ratios"][r["config"]].get("engine_over_synthetic", "-")] for r in engine])
    for r in records:
        if "error" in r or "skipped" in r:
            why = r.get("error") or f"skipped ({r['skipped']})"
            print(f"{r['kind']} {r.get('config', r.get('batch'))}: {why}")
    print(f"\ngoals: official/engine >= {GOALS['official_over_engine']}, engine/synthetic <= "
          f"{GOALS['engine_over_synthetic']}, data wait < {GOALS['data_wait_fraction']:.0%}, seq4096 MFU >= "
          f"{GOALS['seq4096_mfu']:.0%}; the engine step includes clipping and the AdamW step, the synthetic one not")
    return records


if __name__ == "__main__":
    main()
